//! What the policy maps hold, as plain data; the plan that turns one content into another; and the
//! update of the two buffers ([`netpol_common::buffer`]) as the sequence of writes the datapath
//! makes.
//!
//! Pure: no syscalls, so what an update exposes to packets while it is being written is tested
//! without root, write by write (see `update_tests`).

use std::collections::BTreeMap;

use netpol_common::{
    EndpointInfo, IpInfo, IpKey, PolicyKey, PolicyValue, SvcKey, SvcValue, buffer, map_names,
    service,
};

/// The content of the policy maps. Trie keys carry their prefix length in bits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contents {
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    pub ipcache: BTreeMap<IpKey, IpInfo>,
    pub cidrs: BTreeMap<(IpKey, u32), u32>,
    pub policy: BTreeMap<(PolicyKey, u32), PolicyValue>,
    pub services: BTreeMap<SvcKey, SvcValue>,
    /// Service frontend addresses or ranges, with their prefix length (value unused, 1).
    pub frontends: BTreeMap<(IpKey, u32), u32>,
}

impl Contents {
    /// How many entries each map of buffer `b` holds, by the map's pinned name.
    pub fn entries_by_map(&self, b: usize) -> [(&'static str, usize); 6] {
        [
            (map_names::ENDPOINTS[b], self.endpoints.len()),
            (map_names::IPCACHE[b], self.ipcache.len()),
            (map_names::CIDRS[b], self.cidrs.len()),
            (map_names::POLICY[b], self.policy.len()),
            (service::MAP_NAME[b], self.services.len()),
            (service::FRONTENDS_MAP_NAME[b], self.frontends.len()),
        ]
    }
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

/// The changes that turn the current contents into the desired ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub endpoints: MapChanges<u32, EndpointInfo>,
    pub ipcache: MapChanges<IpKey, IpInfo>,
    pub cidrs: MapChanges<(IpKey, u32), u32>,
    pub policy: MapChanges<(PolicyKey, u32), PolicyValue>,
    pub services: MapChanges<SvcKey, SvcValue>,
    pub frontends: MapChanges<(IpKey, u32), u32>,
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

    /// The writes, in order: deletes first (they make room), then upserts in the order that a full
    /// map refusing the rest could only deny.
    pub fn writes(&self) -> Vec<Write<'_>> {
        let mut out = Vec::with_capacity(self.len());
        out.extend(
            self.endpoints
                .deletes
                .iter()
                .map(|k| Write::Endpoint(*k, None)),
        );
        out.extend(self.ipcache.deletes.iter().map(|k| Write::Address(k, None)));
        out.extend(self.cidrs.deletes.iter().map(|k| Write::Cidr(k, None)));
        out.extend(self.policy.deletes.iter().map(|k| Write::Policy(k, None)));
        out.extend(
            self.services
                .deletes
                .iter()
                .map(|k| Write::Service(k, None)),
        );
        out.extend(
            self.frontends
                .deletes
                .iter()
                .map(|k| Write::Frontend(k, None)),
        );
        out.extend(
            self.policy
                .upserts
                .iter()
                .map(|(k, v)| Write::Policy(k, Some(v))),
        );
        out.extend(
            self.services
                .upserts
                .iter()
                .map(|(k, v)| Write::Service(k, Some(v))),
        );
        out.extend(
            self.frontends
                .upserts
                .iter()
                .map(|(k, v)| Write::Frontend(k, Some(v))),
        );
        out.extend(
            self.cidrs
                .upserts
                .iter()
                .map(|(k, v)| Write::Cidr(k, Some(v))),
        );
        out.extend(
            self.ipcache
                .upserts
                .iter()
                .map(|(k, v)| Write::Address(k, Some(v))),
        );
        out.extend(
            self.endpoints
                .upserts
                .iter()
                .map(|(k, v)| Write::Endpoint(*k, Some(v))),
        );
        out
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

/// One write to a buffer's map: an upsert (`Some`) or a delete (`None`) of one key; or the switch of
/// the buffer packets read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write<'a> {
    Endpoint(u32, Option<&'a EndpointInfo>),
    Address(&'a IpKey, Option<&'a IpInfo>),
    Cidr(&'a (IpKey, u32), Option<&'a u32>),
    Policy(&'a (PolicyKey, u32), Option<&'a PolicyValue>),
    Service(&'a SvcKey, Option<&'a SvcValue>),
    Frontend(&'a (IpKey, u32), Option<&'a u32>),
    /// Sets the policy generation: packets read the buffer it names from then on.
    Switch(u32),
}

/// What both buffers hold and which one packets read: the agent's mirror of the decision maps, and
/// the model the update tests replay writes into.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Buffers {
    /// The policy generation ([`netpol_common::CONFIG_GENERATION`]).
    pub generation: u32,
    pub contents: [Contents; buffer::COUNT],
}

impl Buffers {
    /// The buffer packets read.
    pub fn active(&self) -> &Contents {
        &self.contents[buffer::of(self.generation)]
    }

    /// Applies one write to `buffer` (a switch ignores it).
    pub fn apply(&mut self, buffer: usize, write: Write<'_>) {
        fn put<K: Ord + Clone, V: Clone>(map: &mut BTreeMap<K, V>, k: &K, v: Option<&V>) {
            match v {
                Some(v) => map.insert(k.clone(), v.clone()),
                None => map.remove(k),
            };
        }
        let c = &mut self.contents[buffer];
        match write {
            Write::Endpoint(k, v) => put(&mut c.endpoints, &k, v),
            Write::Address(k, v) => put(&mut c.ipcache, k, v),
            Write::Cidr(k, v) => put(&mut c.cidrs, k, v),
            Write::Policy(k, v) => put(&mut c.policy, k, v),
            Write::Service(k, v) => put(&mut c.services, k, v),
            Write::Frontend(k, v) => put(&mut c.frontends, k, v),
            Write::Switch(generation) => self.generation = generation,
        }
    }
}

/// An update of the buffered maps to new contents: the plan for the buffer packets do not read,
/// then the switch to it. Packets see the old contents until the switch and the new ones after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    /// The buffer written: the one packets do not read.
    pub buffer: usize,
    pub plan: Plan,
    /// The generation switched to, which names `buffer`.
    pub generation: u32,
}

impl Update {
    /// The update that makes packets read `desired`.
    pub fn new(buffers: &Buffers, desired: &Contents) -> Self {
        let generation = buffers.generation.wrapping_add(1);
        let buffer = buffer::of(generation);
        Update {
            buffer,
            plan: Plan::new(&buffers.contents[buffer], desired),
            generation,
        }
    }

    /// Every write, in order; the switch last.
    pub fn writes(&self) -> Vec<Write<'_>> {
        let mut out = self.plan.writes();
        out.push(Write::Switch(self.generation));
        out
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
            .insert(key(1, 300), PolicyValue { policy: 1, rule: 0 });
        current
            .policy
            .insert(key(1, 301), PolicyValue { policy: 1, rule: 0 });
        current.endpoints.insert(1, EndpointInfo::default());
        let mut desired = current.clone();
        desired.policy.remove(&key(1, 301));
        desired
            .policy
            .insert(key(1, 302), PolicyValue { policy: 2, rule: 0 });
        desired
            .endpoints
            .insert(1, EndpointInfo::new(ISOLATED_INGRESS, [0; 6], [0; 16]));

        let plan = Plan::new(&current, &desired);
        assert_eq!(
            plan.policy.upserts,
            vec![(key(1, 302), PolicyValue { policy: 2, rule: 0 })]
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
    fn an_update_writes_the_buffer_packets_do_not_read_and_switches_last() {
        let mut desired = Contents::default();
        desired
            .policy
            .insert(key(1, 300), PolicyValue { policy: 1, rule: 0 });
        desired.endpoints.insert(1, EndpointInfo::default());
        for generation in [0, 1, 7, u32::MAX] {
            let buffers = Buffers {
                generation,
                ..Buffers::default()
            };
            let update = Update::new(&buffers, &desired);
            assert_ne!(update.buffer, buffer::of(generation));
            assert_eq!(buffer::of(update.generation), update.buffer);
            let writes = update.writes();
            assert_eq!(
                writes.last(),
                Some(&Write::Switch(generation.wrapping_add(1)))
            );
            assert_eq!(writes.len(), 3);
        }
    }

    #[test]
    fn deletes_come_before_upserts() {
        let mut current = Contents::default();
        current
            .policy
            .insert(key(1, 300), PolicyValue { policy: 1, rule: 0 });
        let mut desired = Contents::default();
        desired
            .policy
            .insert(key(1, 301), PolicyValue { policy: 1, rule: 0 });
        let plan = Plan::new(&current, &desired);
        let writes = plan.writes();
        assert!(matches!(writes[0], Write::Policy(_, None)));
        assert!(matches!(writes[1], Write::Policy(_, Some(_))));
    }
}
