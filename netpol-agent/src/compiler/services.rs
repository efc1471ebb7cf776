//! Egress through Services. A pod's packet to a ClusterIP leaves its veth before kube-proxy picks a
//! backend, so the verdict per (pod, frontend) is precomputed from the backends (see
//! [`frontend_verdict`] and `netpol_common::service`): deferred to after DNAT, where the backend is
//! known, wherever a hook can decide there; allowed outright where it cannot and every backend is
//! allowed; denied otherwise. The frontend's own address never matches a rule (FRONTENDS).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use netpol_common::{
    Direction, IpKey, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTOCOL, POLICY_PREFIX_FULL,
    PolicyKey, PolicyValue, SvcKey, SvcValue, endpoint_flags, identity, service,
};

use super::{Compiled, ip_key};
use crate::datapath::lookup::Decided;
use crate::model::service::Frontend;

/// Zeroes every bit of `bytes` after the first `bits`.
fn mask<const N: usize>(mut bytes: [u8; N], bits: u32) -> [u8; N] {
    for (i, b) in bytes.iter_mut().enumerate() {
        let start = (i as u32) * 8;
        if start >= bits {
            *b = 0;
        } else if bits - start < 8 {
            *b &= 0xffu8 << (8 - (bits - start));
        }
    }
    bytes
}

/// `key` cut to its first `len` bits (at least the endpoint, identity and direction), as the trie
/// stores a prefix: only protocol and port are ever cut.
pub(super) fn key_prefix(key: &PolicyKey, len: u32) -> PolicyKey {
    let tail = [key.direction, key.protocol, key.port_be[0], key.port_be[1]];
    let tail = mask(tail, len - 64);
    PolicyKey {
        direction: tail[0],
        protocol: tail[1],
        port_be: [tail[2], tail[3]],
        ..*key
    }
}

/// The identities the datapath looks a peer address up by: its IPCACHE identity and the identity
/// of its longest CIDR prefix. The egress decision depends on the address through these alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PeerIds {
    pod: Option<u32>,
    cidr: Option<u32>,
}

impl PeerIds {
    /// [`identity::ALL_PODS`] when the peer is a pod.
    fn all_pods(&self) -> Option<u32> {
        self.pod
            .filter(|id| identity::is_pod(*id))
            .map(|_| identity::ALL_PODS)
    }

    /// The identities of `peer`; `lens` are the prefix lengths CIDRS has, longest first.
    fn of(c: &Compiled, peer: IpAddr, lens: &[u32]) -> Self {
        let key = ip_key(peer);
        let cidr = lens.iter().find_map(|&len| {
            let masked = IpKey {
                addr: mask(key.addr, len),
            };
            c.cidrs.get(&(masked, len)).copied()
        });
        PeerIds {
            pod: c.ipcache.get(&key).map(|info| info.identity),
            cidr,
        }
    }
}

/// The datapath's egress decision for a new connection to a peer with `ids` from an endpoint with
/// `flags`, computed on the compiled contents with exact lookups per prefix length (instead of
/// [`Compiled::allows`]'s scan). Returns an allowing rule.
fn egress_allows(
    c: &Compiled,
    (endpoint, flags): (u32, u32),
    peer: PeerIds,
    protocol: u8,
    port: u16,
) -> Option<PolicyValue> {
    let ids = [peer.pod, peer.all_pods(), peer.cidr, Some(identity::ANY)];
    let lookup = |id, direction| policy_lpm(c, endpoint, id, direction, protocol, port);
    match crate::datapath::lookup::decide(flags, Direction::Egress, ids, lookup) {
        // Audit mode at a pod with tier rules: what only the NetworkPolicy denies passes (the
        // datapath drops a frontend without a verdict there, see `policy()`); after DNAT the
        // backend's hook records the would-be drop.
        Decided::NetworkPolicy(None)
            if flags & endpoint_flags::AUDIT_EGRESS != 0
                && endpoint_flags::any_tier(flags, Direction::Egress) =>
        {
            Some(PolicyValue::default())
        }
        decided => decided.allowed(),
    }
}

/// POLICY's longest-prefix match of a full key, by exact lookups per prefix length.
fn policy_lpm(
    c: &Compiled,
    endpoint: u32,
    identity: u32,
    direction: u8,
    protocol: u8,
    port: u16,
) -> Option<PolicyValue> {
    let lens = std::iter::once(POLICY_PREFIX_FULL)
        .chain((POLICY_PREFIX_ANY_PORT + 1..POLICY_PREFIX_FULL).rev())
        .chain([POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTOCOL]);
    let full = PolicyKey {
        endpoint,
        identity,
        direction,
        protocol,
        port_be: port.to_be_bytes(),
    };
    for len in lens {
        let k = key_prefix(&full, len);
        if let Some(v) = c.policy.get(&(k, len)) {
            return Some(*v);
        }
    }
    None
}

/// Whether a hook decides a connection to the backend `ip` after DNAT: it is a pod's address, and
/// a local pod has an attached endpoint (its veth decides) while a remote pod is reached through an
/// exit device that `tunnel_egress` guards (Flannel's VXLAN or WireGuard device, or the uplink
/// with `host-gw`). A node address (host-network pods, the API server),
/// an address outside the cluster, or a local pod not attached yet is reached where nothing
/// decides: the frontend then fails closed.
fn decided_after_dnat(c: &Compiled, ip: IpAddr, local: &Locality<'_>) -> bool {
    c.ipcache.get(&ip_key(ip)).is_some_and(|info| {
        let pod = identity::is_pod(info.identity);
        let remote = !local.ips.contains(&ip);
        pod && (info.endpoint != 0 || (remote && local.exits_guarded))
    })
}

/// What tells where a backend is decided after DNAT.
struct Locality<'a> {
    /// This node's pods' addresses.
    ips: &'a BTreeSet<IpAddr>,
    /// Every exit device has `tunnel_egress`.
    exits_guarded: bool,
}

/// The verdict of one endpoint towards a frontend whose backends get `verdicts`; `None` denies
/// (no entry: a frontend address is judged on its SERVICES entry only).
///
/// Deferred (decided after kube-proxy's DNAT, on the backend it picked) whenever a hook can decide
/// every backend there (`deferrable`), even when all are allowed: kube-proxy may send to a backend
/// the agent does not know yet (a new canary pod), which the hook then judges as what it is. Allowed
/// outright only when every backend is allowed and some cannot be decided after DNAT (node or
/// external addresses, the `kubernetes` Service); with some denied there, denied (fail closed).
fn frontend_verdict(deferrable: bool, verdicts: &[Option<PolicyValue>]) -> Option<u16> {
    let allowed = verdicts.iter().flatten().count();
    if allowed == 0 {
        return None;
    }
    if deferrable {
        Some(service::VERDICT_DEFER)
    } else if allowed == verdicts.len() {
        Some(service::VERDICT_ALLOW)
    } else {
        None
    }
}

/// A frontend with what every endpoint's verdict on it needs, worked out once.
struct Judged<'a> {
    frontend: &'a Frontend,
    /// Every backend is decided after DNAT ([`decided_after_dnat`]).
    deferrable: bool,
    /// Each backend's lookup identities and port.
    backends: Vec<(PeerIds, u16)>,
}

impl<'a> Judged<'a> {
    fn new(c: &Compiled, frontend: &'a Frontend, local: &Locality<'_>, lens: &[u32]) -> Self {
        Judged {
            frontend,
            deferrable: frontend
                .backends
                .iter()
                .all(|(ip, _)| decided_after_dnat(c, *ip, local)),
            backends: frontend
                .backends
                .iter()
                .map(|(ip, port)| (PeerIds::of(c, *ip, lens), *port))
                .collect(),
        }
    }

    /// The identities an entry must name for the frontend to allow anything.
    fn named_by(&self) -> impl Iterator<Item = u32> + '_ {
        self.backends
            .iter()
            .flat_map(|(ids, _)| [ids.pod, ids.all_pods(), ids.cidr])
            .flatten()
    }
}

/// The SERVICES entries for the egress-isolated endpoints of `c`; `local_ips` are the addresses of
/// this node's pods.
///
/// An endpoint can get an entry only for a frontend with a backend whose identities one of its
/// egress entries names (or any, with an [`identity::ANY`] entry): the frontends are indexed by
/// those identities, so each endpoint looks at its candidates only.
pub(super) fn compile(
    c: &Compiled,
    frontends: &[Frontend],
    local_ips: &BTreeSet<IpAddr>,
    exits_guarded: bool,
) -> BTreeMap<SvcKey, SvcValue> {
    let local = Locality {
        ips: local_ips,
        exits_guarded,
    };
    let lens = cidr_lengths(c);
    let judged: Vec<Judged<'_>> = frontends
        .iter()
        .filter(|f| !f.backends.is_empty())
        .map(|f| Judged::new(c, f, &local, &lens))
        .collect();
    let mut by_identity: HashMap<u32, BTreeSet<usize>> = HashMap::new();
    for (i, j) in judged.iter().enumerate() {
        for id in j.named_by() {
            by_identity.entry(id).or_default().insert(i);
        }
    }
    let mut egress_ids: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    for (key, _) in c.policy.keys() {
        // Egress entries of NetworkPolicy and of either tier (the direction's bit).
        if key.direction & 1 == Direction::Egress as u8 {
            egress_ids
                .entry(key.endpoint)
                .or_default()
                .insert(key.identity);
        }
    }
    let mut out = BTreeMap::new();
    for (&endpoint, info) in &c.endpoints {
        // A pending endpoint reaches no Service: nothing of its own opens a way through one.
        let isolated = info.flags & endpoint_flags::ISOLATED_EGRESS != 0;
        let tiered = endpoint_flags::any_tier(info.flags, Direction::Egress);
        if !(isolated || tiered) || info.flags & endpoint_flags::PENDING != 0 {
            continue;
        }
        let named = egress_ids.get(&endpoint);
        // Without NetworkPolicy isolation (or with audit-mode isolation where tiers have rules),
        // what no tier denies is allowed: any frontend may be.
        let audited = info.flags & endpoint_flags::AUDIT_EGRESS != 0;
        let every =
            !isolated || (tiered && audited) || named.is_some_and(|n| n.contains(&identity::ANY));
        let candidates: BTreeSet<usize> = if every {
            (0..judged.len()).collect()
        } else {
            named
                .into_iter()
                .flatten()
                .filter_map(|id| by_identity.get(id))
                .flatten()
                .copied()
                .collect()
        };
        let candidates = candidates.into_iter().map(|i| &judged[i]);
        endpoint_services(c, (endpoint, info.flags), candidates, &mut out);
    }
    out
}

/// The prefix lengths CIDRS has, longest first: the only ones a longest-prefix match can end on.
fn cidr_lengths(c: &Compiled) -> Vec<u32> {
    let lens: BTreeSet<u32> = c.cidrs.keys().map(|(_, len)| *len).collect();
    lens.into_iter().rev().collect()
}

/// The SERVICES entries of one endpoint for the frontends it may reach. Backends with the same
/// lookup identities and port get the same decision, so each is asked once (replicas share an
/// identity).
fn endpoint_services<'j, 'f: 'j>(
    c: &Compiled,
    (endpoint, flags): (u32, u32),
    candidates: impl Iterator<Item = &'j Judged<'f>>,
    out: &mut BTreeMap<SvcKey, SvcValue>,
) {
    let mut decided: HashMap<(PeerIds, u8, u16), Option<PolicyValue>> = HashMap::new();
    for j in candidates {
        let protocol = j.frontend.protocol.number();
        let verdicts: Vec<Option<PolicyValue>> = j
            .backends
            .iter()
            .map(|&(ids, port)| {
                *decided
                    .entry((ids, protocol, port))
                    .or_insert_with(|| egress_allows(c, (endpoint, flags), ids, protocol, port))
            })
            .collect();
        let Some(verdict) = frontend_verdict(j.deferrable, &verdicts) else {
            continue;
        };
        let key = SvcKey {
            endpoint,
            vip: ip_key(j.frontend.vip),
            port_be: j.frontend.port.to_be_bytes(),
            protocol,
            _pad: 0,
        };
        let rule = verdicts
            .iter()
            .flatten()
            .next()
            .copied()
            .unwrap_or_default();
        let value = SvcValue {
            verdict,
            rule: rule.rule as u16,
            policy: rule.policy,
        };
        out.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_keeps_leading_bits() {
        assert_eq!(mask([0xff, 0xff], 0), [0, 0]);
        assert_eq!(mask([0xff, 0xff], 4), [0xf0, 0]);
        assert_eq!(mask([0xff, 0xff], 12), [0xff, 0xf0]);
        assert_eq!(mask([0xab, 0xcd], 16), [0xab, 0xcd]);
    }
}
