//! What the policy maps hold, as plain data, and the ordered plan that turns one content into another.
//!
//! Pure: no syscalls, so the update order (the thing that keeps enforcement tight during a change) is
//! unit-tested without root.

use std::collections::BTreeMap;

use netpol_common::{EndpointInfo, IpInfo, IpKey, PolicyKey, PolicyValue, SvcKey, SvcValue};

/// The content of the policy maps. Trie keys carry their prefix length in bits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contents {
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    pub ipcache: BTreeMap<IpKey, IpInfo>,
    pub cidrs: BTreeMap<(IpKey, u32), u32>,
    pub policy: BTreeMap<(PolicyKey, u32), PolicyValue>,
    pub services: BTreeMap<SvcKey, SvcValue>,
    /// Service frontend addresses (value unused, 1).
    pub frontends: BTreeMap<IpKey, u32>,
}

/// Changes to one map: entries to write (new or changed) and keys to delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapChanges<K, V> {
    pub upserts: Vec<(K, V)>,
    pub deletes: Vec<K>,
}

impl<K, V> MapChanges<K, V> {
    fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty()
    }
}

fn diff<K: Ord + Clone, V: PartialEq + Clone>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> MapChanges<K, V> {
    let upserts = desired
        .iter()
        .filter(|(k, v)| current.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let deletes = current
        .keys()
        .filter(|k| !desired.contains_key(*k))
        .cloned()
        .collect();
    MapChanges { upserts, deletes }
}

/// One step of a plan, in the order it must be applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    PolicyUpserts,
    ServiceUpserts,
    FrontendUpserts,
    CidrUpserts,
    IpcacheUpserts,
    EndpointUpserts,
    EndpointDeletes,
    CidrDeletes,
    IpcacheDeletes,
    ServiceDeletes,
    FrontendDeletes,
    PolicyDeletes,
    BumpGeneration,
}

/// The order of a plan's steps. Allows are added before anything that can make them reachable
/// (identities, isolation), and removed only after nothing points at them any more, so during an
/// update a packet sees either the old or the new decision for every lookup: traffic that both the
/// old and the new policy deny never passes. The generation bump comes last, so established flows
/// are re-checked against the finished state. A new frontend address comes after its Service
/// verdicts (from then on only they decide for it); a removed one goes after them (until then the
/// verdicts still decide).
pub const STEP_ORDER: [Step; 13] = [
    Step::PolicyUpserts,
    Step::ServiceUpserts,
    Step::FrontendUpserts,
    Step::CidrUpserts,
    Step::IpcacheUpserts,
    Step::EndpointUpserts,
    Step::EndpointDeletes,
    Step::CidrDeletes,
    Step::IpcacheDeletes,
    Step::ServiceDeletes,
    Step::FrontendDeletes,
    Step::PolicyDeletes,
    Step::BumpGeneration,
];

/// The changes that turn the current contents into the desired ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub endpoints: MapChanges<u32, EndpointInfo>,
    pub ipcache: MapChanges<IpKey, IpInfo>,
    pub cidrs: MapChanges<(IpKey, u32), u32>,
    pub policy: MapChanges<(PolicyKey, u32), PolicyValue>,
    pub services: MapChanges<SvcKey, SvcValue>,
    pub frontends: MapChanges<IpKey, u32>,
}

impl Plan {
    /// Computes the plan from `current` to `desired`.
    ///
    /// Within a map, writes that a full map could refuse are ordered so that a refusal can only
    /// deny: CIDRS longest prefixes first (an `except` prefix before the block around it, which
    /// would otherwise classify the excepted addresses as the block), IPCACHE the local pods' own
    /// addresses first (their anti-spoofing entries), then the node's, then remote peers'.
    pub fn new(current: &Contents, desired: &Contents) -> Self {
        let mut cidrs = diff(&current.cidrs, &desired.cidrs);
        cidrs
            .upserts
            .sort_by_key(|((addr, len), _)| (std::cmp::Reverse(*len), *addr));
        let mut ipcache = diff(&current.ipcache, &desired.ipcache);
        ipcache.upserts.sort_by_key(|(addr, info)| {
            let rank = match (info.endpoint, info.identity) {
                (0, netpol_common::identity::HOST) => 1,
                (0, _) => 2,
                _ => 0,
            };
            (rank, *addr)
        });
        Plan {
            endpoints: diff(&current.endpoints, &desired.endpoints),
            ipcache,
            cidrs,
            policy: diff(&current.policy, &desired.policy),
            services: diff(&current.services, &desired.services),
            frontends: diff(&current.frontends, &desired.frontends),
        }
    }

    /// True when nothing changes.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
            && self.ipcache.is_empty()
            && self.cidrs.is_empty()
            && self.policy.is_empty()
            && self.services.is_empty()
            && self.frontends.is_empty()
    }

    /// Number of entries written or deleted.
    pub fn len(&self) -> usize {
        fn n<K, V>(c: &MapChanges<K, V>) -> usize {
            c.upserts.len() + c.deletes.len()
        }
        n(&self.endpoints)
            + n(&self.ipcache)
            + n(&self.cidrs)
            + n(&self.policy)
            + n(&self.services)
            + n(&self.frontends)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netpol_common::endpoint_flags::ISOLATED_INGRESS;

    fn key(endpoint: u32, identity: u32) -> (PolicyKey, u32) {
        (
            PolicyKey {
                endpoint,
                identity,
                direction: 0,
                protocol: 6,
                port_be: 80u16.to_be_bytes(),
            },
            96,
        )
    }

    #[test]
    fn diff_finds_new_changed_and_removed() {
        let mut current = Contents::default();
        current
            .policy
            .insert(key(1, 300), PolicyValue { policy: 1, _pad: 0 });
        current
            .policy
            .insert(key(1, 301), PolicyValue { policy: 1, _pad: 0 });
        current.endpoints.insert(1, EndpointInfo::default());
        let mut desired = current.clone();
        desired.policy.remove(&key(1, 301));
        desired
            .policy
            .insert(key(1, 302), PolicyValue { policy: 2, _pad: 0 });
        desired
            .endpoints
            .insert(1, EndpointInfo::new(ISOLATED_INGRESS, [0; 6], [0; 16]));

        let plan = Plan::new(&current, &desired);
        assert_eq!(
            plan.policy.upserts,
            vec![(key(1, 302), PolicyValue { policy: 2, _pad: 0 })]
        );
        assert_eq!(plan.policy.deletes, vec![key(1, 301)]);
        assert_eq!(plan.endpoints.upserts.len(), 1);
        assert!(plan.endpoints.deletes.is_empty());
        assert_eq!(plan.len(), 3);
        assert!(Plan::new(&desired, &desired).is_empty());
    }

    #[test]
    fn writes_a_full_map_could_refuse_come_in_the_order_that_only_denies() {
        let v4 = |a: u8, b: u8| IpKey::from_v4([10, a, b, 0]);
        let mut desired = Contents::default();
        desired.cidrs.insert((v4(0, 0), 96 + 8), 1);
        desired.cidrs.insert((v4(1, 0), 96 + 24), 2);
        desired.cidrs.insert((v4(1, 0), 96 + 16), 3);
        let info = |identity, endpoint| IpInfo { identity, endpoint };
        desired.ipcache.insert(v4(0, 1), info(300, 0));
        desired
            .ipcache
            .insert(v4(0, 2), info(netpol_common::identity::HOST, 0));
        desired.ipcache.insert(v4(0, 3), info(301, 7));
        let plan = Plan::new(&Contents::default(), &desired);
        let lens: Vec<u32> = plan.cidrs.upserts.iter().map(|((_, l), _)| *l).collect();
        assert_eq!(lens, vec![120, 112, 104], "longest prefixes first");
        let ranks: Vec<(u32, u32)> = plan
            .ipcache
            .upserts
            .iter()
            .map(|(_, i)| (i.identity, i.endpoint))
            .collect();
        assert_eq!(
            ranks,
            vec![(301, 7), (netpol_common::identity::HOST, 0), (300, 0)],
            "local pods, then the node, then peers"
        );
    }

    #[test]
    fn allows_are_added_first_and_removed_last() {
        let pos = |s| {
            STEP_ORDER
                .iter()
                .position(|x| *x == s)
                .unwrap_or(usize::MAX)
        };
        for s in [
            Step::CidrUpserts,
            Step::IpcacheUpserts,
            Step::EndpointUpserts,
        ] {
            assert!(
                pos(Step::PolicyUpserts) < pos(s),
                "{s:?} before policy upserts"
            );
        }
        for s in [
            Step::EndpointDeletes,
            Step::CidrDeletes,
            Step::IpcacheDeletes,
        ] {
            assert!(
                pos(s) < pos(Step::PolicyDeletes),
                "{s:?} after policy deletes"
            );
        }
        assert_eq!(STEP_ORDER.last(), Some(&Step::BumpGeneration));
    }
}
