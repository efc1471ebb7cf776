//! A userspace model of the datapath's policy decision for a new connection, read from the map
//! contents: what the compiler's tests check semantics through, and what the update tests replay
//! every intermediate state of an update through.

use std::net::IpAddr;

use netpol_common::{
    Direction, IpKey, PolicyKey, PolicyValue, SvcKey, endpoint_flags, identity, tier,
};

use super::Contents;
use crate::model::identity::Prefix;

/// The [`IpKey`] of an address (IPv4 as IPv4-mapped).
pub fn ip_key(addr: IpAddr) -> IpKey {
    match addr {
        IpAddr::V4(v4) => IpKey::from_v4(v4.octets()),
        IpAddr::V6(v6) => IpKey { addr: v6.octets() },
    }
}

impl Contents {
    /// Would a new connection between the local `endpoint` and `peer` (the source for ingress,
    /// the destination for egress) to destination `port` be allowed? Conntrack is not modelled.
    ///
    /// Unknown endpoints are denied; a direction the endpoint is not isolated in is allowed; at
    /// ingress the node itself ([`identity::HOST`]) is allowed; at egress a Service frontend is
    /// allowed when SERVICES has a verdict for it (outright or deferred); otherwise the peer's
    /// IPCACHE identity, [`identity::ALL_PODS`] when that is a pod's, its longest-prefix CIDR
    /// identity and [`identity::ANY`] are each looked up, longest prefix first, in POLICY.
    pub fn allows(
        &self,
        endpoint: u32,
        peer: IpAddr,
        direction: Direction,
        protocol: u8,
        port: u16,
    ) -> bool {
        self.decision(endpoint, peer, direction, protocol, port)
            .is_some_and(|d| d.allowed().is_some())
    }

    /// What decides a new connection as [`Contents::allows`] describes, `None` for an unknown
    /// endpoint (denied).
    pub fn decision(
        &self,
        endpoint: u32,
        peer: IpAddr,
        direction: Direction,
        protocol: u8,
        port: u16,
    ) -> Option<Decided> {
        let flags = self.endpoints.get(&endpoint)?.flags;
        if flags & endpoint_flags::isolated(direction) == 0
            && !endpoint_flags::any_tier(flags, direction)
        {
            return Some(Decided::Default);
        }
        let peer = ip_key(peer);
        if direction == Direction::Egress && self.is_frontend(peer) {
            // Judged on the backends: allowed at the veth (outright, or deferred to after DNAT).
            let key = SvcKey {
                endpoint,
                vip: peer,
                port_be: port.to_be_bytes(),
                protocol,
                _pad: 0,
            };
            let v = self.services.get(&key).map(|v| PolicyValue {
                policy: v.policy,
                rule: u32::from(v.rule),
            });
            return Some(Decided::Service(v));
        }
        let pod_identity = self.ipcache.get(&peer).map(|i| i.identity);
        if direction == Direction::Ingress && pod_identity == Some(identity::HOST) {
            return Some(Decided::Default);
        }
        let cidr_identity = self
            .cidrs
            .iter()
            .filter(|((net, len), _)| Prefix::new(*net, *len).contains(&Prefix::host(peer)))
            .max_by_key(|((_, len), _)| *len)
            .map(|(_, id)| *id);
        let all_pods = pod_identity
            .filter(|id| identity::is_pod(*id))
            .map(|_| identity::ALL_PODS);
        let ids = [pod_identity, all_pods, cidr_identity, Some(identity::ANY)];
        let lookup = |identity, direction| {
            let key = PolicyKey {
                endpoint,
                identity,
                direction,
                protocol,
                port_be: port.to_be_bytes(),
            };
            self.policy_lookup(&key).copied()
        };
        Some(decide(flags, direction, ids, lookup))
    }

    /// Whether `addr` is a frontend address or in a frontend range.
    pub fn is_frontend(&self, addr: IpKey) -> bool {
        self.frontends
            .keys()
            .any(|(net, len)| Prefix::new(*net, *len).contains(&Prefix::host(addr)))
    }

    /// Longest-prefix match of a full key in POLICY, as the kernel's LPM trie does it.
    pub fn policy_lookup(&self, key: &PolicyKey) -> Option<&PolicyValue> {
        let bytes = policy_key_bytes(key);
        self.policy
            .iter()
            .filter(|((k, len), _)| prefix_eq(&policy_key_bytes(k), &bytes, *len))
            .max_by_key(|((_, len), _)| *len)
            .map(|(_, v)| v)
    }
}

/// What decided a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decided {
    /// A ClusterNetworkPolicy rule of `tier` (`netpol_common::tier`) with `action`; `rule` is its
    /// policy and [`netpol_common::rule_code`].
    Tier {
        tier: u8,
        action: u8,
        rule: PolicyValue,
    },
    /// NetworkPolicy isolation: the allowing rule, `None` when none allows.
    NetworkPolicy(Option<PolicyValue>),
    /// A Service frontend's verdict: the rule it names, `None` when there is none (denied).
    Service(Option<PolicyValue>),
    /// Nothing decides: allowed.
    Default,
}

impl Decided {
    /// The rule that allows (a default one when nothing decided), `None` when denied.
    pub fn allowed(&self) -> Option<PolicyValue> {
        match *self {
            Decided::Tier { action, rule, .. } => (action == tier::ACCEPT).then_some(rule),
            Decided::NetworkPolicy(v) | Decided::Service(v) => v,
            Decided::Default => Some(PolicyValue::default()),
        }
    }
}

/// The datapath's policy decision for a new connection in `direction` at an endpoint with `flags`
/// (conntrack, the node and Service frontends aside): the Admin tier's first matching rule, then,
/// where NetworkPolicy isolates the endpoint, its allows, else the Baseline tier's first matching
/// rule, else allowed. `ids` are the peer's identities ([`identity::ANY`] included); `lookup` is
/// POLICY's longest-prefix match for one identity and key direction.
pub fn decide(
    flags: u32,
    direction: Direction,
    ids: [Option<u32>; 4],
    lookup: impl Fn(u32, u8) -> Option<PolicyValue>,
) -> Decided {
    let first_of = |t: u8| {
        ids.iter()
            .flatten()
            .filter_map(|id| lookup(*id, tier::key_direction(direction, t)))
            .reduce(|a, b| if tier::precedes(b.rule, a.rule) { b } else { a })
    };
    for t in [tier::ADMIN, tier::BASELINE] {
        if t == tier::BASELINE && flags & endpoint_flags::isolated(direction) != 0 {
            let allow = ids
                .iter()
                .flatten()
                .find_map(|id| lookup(*id, direction as u8));
            return Decided::NetworkPolicy(allow);
        }
        if flags & endpoint_flags::tiered(direction, t) == 0 {
            continue;
        }
        if let Some(v) = first_of(t).filter(|v| tier::action(v.rule) != tier::PASS) {
            let rule = PolicyValue {
                policy: v.policy,
                rule: tier::code(v.rule),
            };
            let action = tier::action(v.rule);
            return Decided::Tier {
                tier: t,
                action,
                rule,
            };
        }
    }
    Decided::Default
}

/// The key's bytes in memory order, which is what the trie compares.
fn policy_key_bytes(k: &PolicyKey) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0..4].copy_from_slice(&k.endpoint.to_ne_bytes());
    out[4..8].copy_from_slice(&k.identity.to_ne_bytes());
    out[8] = k.direction;
    out[9] = k.protocol;
    out[10..12].copy_from_slice(&k.port_be);
    out
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u32) -> bool {
    (0..bits as usize).all(|i| {
        let mask = 0x80u8 >> (i % 8);
        a[i / 8] & mask == b[i / 8] & mask
    })
}
