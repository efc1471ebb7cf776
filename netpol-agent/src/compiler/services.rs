//! Egress through Services. A pod's packet to a ClusterIP leaves its veth before kube-proxy picks a
//! backend, so the verdict per (pod, frontend) is precomputed from the backends (see
//! [`frontend_verdict`] and `netpol_common::service`): deferred to after DNAT, where the backend is
//! known, wherever a hook can decide there; allowed outright where it cannot and every backend is
//! allowed; denied otherwise. The frontend's own address never matches a rule (FRONTENDS).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use netpol_common::{
    Direction, IpKey, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTOCOL, POLICY_PREFIX_FULL,
    PolicyKey, PolicyValue, SvcKey, SvcValue, endpoint_flags, identity, service,
};

use super::{Compiled, ip_key};
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

/// The datapath's egress decision for a new connection, computed on the compiled contents with exact
/// lookups per prefix length (instead of [`Compiled::allows`]'s scan). Returns an allowing rule.
fn egress_allows(
    c: &Compiled,
    endpoint: u32,
    peer: IpAddr,
    protocol: u8,
    port: u16,
) -> Option<PolicyValue> {
    let key = ip_key(peer);
    let mut ids = Vec::with_capacity(3);
    if let Some(info) = c.ipcache.get(&key) {
        ids.push(info.identity);
    }
    if let Some(id) = (0..=128u32).rev().find_map(|len| {
        c.cidrs.get(&(
            IpKey {
                addr: mask(key.addr, len),
            },
            len,
        ))
    }) {
        ids.push(*id);
    }
    ids.push(identity::ANY);
    let lens = std::iter::once(POLICY_PREFIX_FULL)
        .chain((POLICY_PREFIX_ANY_PORT + 1..POLICY_PREFIX_FULL).rev())
        .chain([POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTOCOL]);
    for id in ids {
        let full = PolicyKey {
            endpoint,
            identity: id,
            direction: Direction::Egress as u8,
            protocol,
            port_be: port.to_be_bytes(),
        };
        for len in lens.clone() {
            // Only direction, protocol and port (the last 32 bits) are ever cut by a prefix.
            let tail = mask(
                [
                    full.direction,
                    full.protocol,
                    full.port_be[0],
                    full.port_be[1],
                ],
                len - 64,
            );
            let k = PolicyKey {
                direction: tail[0],
                protocol: tail[1],
                port_be: [tail[2], tail[3]],
                ..full
            };
            if let Some(v) = c.policy.get(&(k, len)) {
                return Some(*v);
            }
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
        let pod = (identity::FIRST_POD..identity::FIRST_CIDR).contains(&info.identity);
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
/// every backend there, even when all are allowed: kube-proxy may send to a backend the agent does
/// not know yet (a new canary pod), which the hook then judges as what it is. Allowed outright only
/// when every backend is allowed and some cannot be decided after DNAT (node or external
/// addresses, the `kubernetes` Service); with some denied there, denied (fail closed).
fn frontend_verdict(
    c: &Compiled,
    backends: &[(IpAddr, u16)],
    verdicts: &[Option<PolicyValue>],
    local: &Locality<'_>,
) -> Option<u16> {
    let allowed = verdicts.iter().flatten().count();
    if allowed == 0 {
        return None;
    }
    let deferrable = backends
        .iter()
        .all(|(ip, _)| decided_after_dnat(c, *ip, local));
    if deferrable {
        Some(service::VERDICT_DEFER)
    } else if allowed == verdicts.len() {
        Some(service::VERDICT_ALLOW)
    } else {
        None
    }
}

/// The SERVICES entries for the egress-isolated endpoints of `c`; `local_ips` are the addresses of
/// this node's pods.
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
    let mut out = BTreeMap::new();
    for (&endpoint, info) in &c.endpoints {
        // A pending endpoint reaches no Service: nothing of its own opens a way through one.
        if info.flags & endpoint_flags::ISOLATED_EGRESS == 0
            || info.flags & endpoint_flags::PENDING != 0
        {
            continue;
        }
        for f in frontends.iter().filter(|f| !f.backends.is_empty()) {
            let protocol = f.protocol.number();
            let verdicts: Vec<Option<PolicyValue>> = f
                .backends
                .iter()
                .map(|(ip, port)| egress_allows(c, endpoint, *ip, protocol, *port))
                .collect();
            let Some(verdict) = frontend_verdict(c, &f.backends, &verdicts, &local) else {
                continue;
            };
            let key = SvcKey {
                endpoint,
                vip: ip_key(f.vip),
                port_be: f.port.to_be_bytes(),
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
    out
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
