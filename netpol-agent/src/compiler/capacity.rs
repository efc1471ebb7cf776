//! Fitting a compilation into the maps' capacities, so that a full map can only ever deny.
//!
//! Nothing is left to a write failing at random: the compiler knows the sizes and decides what is
//! left out, always an allow (or an identity, whose absence only loses allows), never a deny, and
//! says so ([`Shortfall`]). CIDRS keeps only the prefixes this node's rules can need; when it is
//! still too small it keeps the longest prefixes (an `except` is always longer than its block, so
//! an excepted range never falls back to the block's identity) and drops the allows through the
//! rest. FRONTENDS, whose missing entry would let raw rules judge a ClusterIP, is written as ranges
//! instead: every address of a range is judged as a frontend.

use std::collections::{BTreeMap, BTreeSet};

use netpol_common::{Direction, IpKey, endpoint_flags, identity, map_labels};

use super::Compiled;
use crate::datapath::capacities::Capacities;
use crate::model::identity::Prefix;

/// What a map could not hold, for `status`, `/readyz` and the metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortfall {
    /// The map's metric label ([`map_labels`]).
    pub map: &'static str,
    /// Entries the compilation wanted and the map does not get.
    pub dropped: usize,
    /// What that means for traffic.
    pub effect: String,
}

/// How many of `len` entries a map of `cap` cannot hold; `None` when all fit.
fn excess(len: usize, cap: u32) -> Option<usize> {
    len.checked_sub(cap as usize).filter(|n| *n > 0)
}

/// Fits ENDPOINTS, CIDRS, POLICY and IPCACHE (before the Service verdicts are computed from them).
///
/// ClusterNetworkPolicy rules are not allows: a Deny left out, or an identity its peers need, would
/// open. What is left out is NetworkPolicy material first (tier entries are never dropped one by
/// one); when that is not enough, or a CIDRS prefix or IPCACHE address that a tier entry's identity
/// needs is left out, every endpoint with ClusterNetworkPolicy rules is closed instead: all its
/// entries removed, isolated both ways (its pod gets nothing but the node).
pub fn fit_rules(out: &mut Compiled, caps: &Capacities) -> Vec<Shortfall> {
    prune_cidrs(out);
    let exposed = TierExposure::of(out);
    let cidrs_needed = exposed.cidrs(out, caps.cidrs);
    let addrs_needed = exposed.addrs(out, caps.ipcache);
    let mut shortfalls: Vec<Shortfall> = [
        fit_endpoints(out, caps.endpoints),
        fit_cidrs(out, caps.cidrs),
        fit_policy(out, caps.policy),
        fit_ipcache(out, caps.ipcache),
    ]
    .into_iter()
    .flatten()
    .collect();
    let tiers_hit = out.policy.len() > caps.policy as usize
        || cidrs_needed.iter().any(|k| !out.cidrs.contains_key(k))
        || addrs_needed.iter().any(|k| !out.ipcache.contains_key(k));
    if tiers_hit {
        shortfalls.extend(close_tiered(out));
    }
    shortfalls
}

/// The identities that ClusterNetworkPolicy entries name: leaving out a prefix or an address of
/// one changes what a tier decides.
struct TierExposure {
    ids: BTreeSet<u32>,
    all_pods: bool,
}

impl TierExposure {
    fn of(out: &Compiled) -> Self {
        let ids: BTreeSet<u32> = out
            .policy
            .keys()
            .filter(|(k, _)| k.direction >= 2)
            .map(|(k, _)| k.identity)
            .collect();
        TierExposure {
            all_pods: ids.contains(&identity::ALL_PODS),
            ids,
        }
    }

    fn exposes(&self, id: u32) -> bool {
        self.ids.contains(&id) || (self.all_pods && identity::is_pod(id))
    }

    /// The CIDRS prefixes of exposed identities, when CIDRS will not hold them all.
    fn cidrs(&self, out: &Compiled, cap: u32) -> Vec<(IpKey, u32)> {
        if out.cidrs.len() <= cap as usize {
            return Vec::new();
        }
        out.cidrs
            .iter()
            .filter(|(_, id)| self.exposes(**id))
            .map(|(k, _)| *k)
            .collect()
    }

    /// The IPCACHE addresses of exposed identities, when IPCACHE will not hold them all.
    fn addrs(&self, out: &Compiled, cap: u32) -> Vec<IpKey> {
        if out.ipcache.len() <= cap as usize {
            return Vec::new();
        }
        out.ipcache
            .iter()
            .filter(|(_, info)| self.exposes(info.identity))
            .map(|(k, _)| *k)
            .collect()
    }
}

/// Closes every endpoint with ClusterNetworkPolicy rules (see [`fit_rules`]).
fn close_tiered(out: &mut Compiled) -> Option<Shortfall> {
    let tiered: BTreeSet<u32> = out
        .endpoints
        .iter()
        .filter(|(_, info)| {
            [Direction::Ingress, Direction::Egress]
                .into_iter()
                .any(|d| endpoint_flags::any_tier(info.flags, d))
        })
        .map(|(id, _)| *id)
        .collect();
    if tiered.is_empty() {
        return None;
    }
    let before = out.policy.len();
    out.policy.retain(|(k, _), _| !tiered.contains(&k.endpoint));
    for id in &tiered {
        if let Some(info) = out.endpoints.get_mut(id) {
            info.flags = endpoint_flags::ISOLATED_INGRESS | endpoint_flags::ISOLATED_EGRESS;
        }
    }
    Some(Shortfall {
        map: map_labels::POLICY,
        dropped: before - out.policy.len(),
        effect: format!(
            "a map is full, so the {} endpoints with ClusterNetworkPolicy rules are closed (all their traffic denied) rather than enforced in part: {:?}",
            tiered.len(),
            tiered
        ),
    })
}

/// Fits SERVICES and FRONTENDS.
pub fn fit_services(out: &mut Compiled, caps: &Capacities) -> Vec<Shortfall> {
    [
        fit_service_verdicts(out, caps.services),
        fit_frontends(out, caps.frontends),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Drops the prefixes no allow of this node can need: those inside no prefix whose identity a
/// POLICY entry names. For an address whose longest match was such a prefix, the next longest is
/// unreferenced too (it contains the dropped one), so no decision changes.
fn prune_cidrs(out: &mut Compiled) {
    let referenced: BTreeSet<u32> = out
        .policy
        .keys()
        .map(|(k, _)| k.identity)
        .filter(|id| *id >= identity::FIRST_CIDR)
        .collect();
    let needed: BTreeSet<(IpKey, u32)> = out
        .cidrs
        .iter()
        .filter(|(_, id)| referenced.contains(id))
        .map(|(k, _)| *k)
        .collect();
    // A prefix is needed when it or one of its ancestors is: at most 129 lookups each.
    out.cidrs.retain(|(net, len), _| {
        (0..=*len).any(|l| {
            let p = Prefix::new(*net, l);
            needed.contains(&(p.addr(), p.prefix_len()))
        })
    });
}

fn fit_endpoints(out: &mut Compiled, cap: u32) -> Option<Shortfall> {
    let dropped: BTreeSet<u32> = out.endpoints.keys().skip(cap as usize).copied().collect();
    if dropped.is_empty() {
        return None;
    }
    out.endpoints.retain(|k, _| !dropped.contains(k));
    out.policy
        .retain(|(k, _), _| !dropped.contains(&k.endpoint));
    Some(Shortfall {
        map: map_labels::ENDPOINTS,
        dropped: dropped.len(),
        effect: format!(
            "veths with ifindex {dropped:?} have no endpoint: every packet of theirs is dropped (unknown-endpoint)"
        ),
    })
}

fn fit_cidrs(out: &mut Compiled, cap: u32) -> Option<Shortfall> {
    let excess = excess(out.cidrs.len(), cap)?;
    let mut by_length: Vec<((IpKey, u32), u32)> = out.cidrs.iter().map(|(k, v)| (*k, *v)).collect();
    by_length.sort_by_key(|((net, len), _)| (std::cmp::Reverse(*len), *net));
    let dropped: BTreeSet<u32> = by_length[cap as usize..]
        .iter()
        .map(|(_, id)| *id)
        .collect();
    out.cidrs.retain(|_, id| !dropped.contains(id));
    let before = out.policy.len();
    out.policy
        .retain(|(k, _), _| !dropped.contains(&k.identity));
    Some(Shortfall {
        map: map_labels::CIDRS,
        dropped: excess,
        effect: format!(
            "the {excess} shortest ipBlock prefixes are left out with the {} allows through them (denied); excepts are kept",
            before - out.policy.len()
        ),
    })
}

/// Leaves out whole (endpoint, policy) groups of allows, the largest first, so that what remains of
/// a policy at a pod is all of it.
fn fit_policy(out: &mut Compiled, cap: u32) -> Option<Shortfall> {
    let excess = excess(out.policy.len(), cap)?;
    let mut groups: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    // NetworkPolicy allows only: tier entries are never left out one by one ([`fit_rules`]).
    for ((k, _), v) in out.policy.iter().filter(|((k, _), _)| k.direction < 2) {
        *groups.entry((k.endpoint, v.policy)).or_default() += 1;
    }
    let mut ranked: Vec<((u32, u32), usize)> = groups.into_iter().collect();
    ranked.sort_by_key(|(group, n)| (std::cmp::Reverse(*n), *group));
    let mut freed = 0;
    let mut dropped = BTreeSet::new();
    for (group, n) in ranked {
        if freed >= excess {
            break;
        }
        freed += n;
        dropped.insert(group);
    }
    out.policy
        .retain(|(k, _), v| k.direction >= 2 || !dropped.contains(&(k.endpoint, v.policy)));
    Some(Shortfall {
        map: map_labels::POLICY,
        dropped: freed,
        effect: format!(
            "the allows of {} (endpoint, policy) pairs are left out, whole (denied): {:?}",
            dropped.len(),
            dropped
        ),
    })
}

/// Keeps the local pods' own addresses (their anti-spoofing entries), then the node's and pending
/// ones, then peers; a peer left out loses the allows that name its pod identity.
fn fit_ipcache(out: &mut Compiled, cap: u32) -> Option<Shortfall> {
    let excess = excess(out.ipcache.len(), cap)?;
    let mut ranked: Vec<(u8, IpKey)> = out
        .ipcache
        .iter()
        .map(|(addr, info)| {
            let rank = match (info.endpoint, info.identity) {
                (0, identity::HOST | identity::PENDING) => 1,
                (0, _) => 2,
                _ => 0,
            };
            (rank, *addr)
        })
        .collect();
    ranked.sort();
    for (_, addr) in &ranked[cap as usize..] {
        out.ipcache.remove(addr);
    }
    Some(Shortfall {
        map: map_labels::IPCACHE,
        dropped: excess,
        effect: format!(
            "{excess} peer pod addresses have no identity: rules naming their pods do not allow them (denied)"
        ),
    })
}

fn fit_service_verdicts(out: &mut Compiled, cap: u32) -> Option<Shortfall> {
    let excess = excess(out.services.len(), cap)?;
    let dropped: Vec<_> = out.services.keys().skip(cap as usize).copied().collect();
    for k in &dropped {
        out.services.remove(k);
    }
    Some(Shortfall {
        map: map_labels::SERVICES,
        dropped: excess,
        effect: format!("{excess} Service verdicts are left out: those connections are denied"),
    })
}

/// Widens frontend addresses into the ranges around them until they fit: IPv4 /24, /16, /8, all;
/// IPv6 /112, /96, /64, all.
fn fit_frontends(out: &mut Compiled, cap: u32) -> Option<Shortfall> {
    let wanted = out.frontends.len();
    if wanted <= cap as usize {
        return None;
    }
    for (v4, v6) in [(24, 112), (16, 96), (8, 64), (0, 0)] {
        let ranges: BTreeSet<(IpKey, u32)> = out
            .frontends
            .keys()
            .map(|(net, len)| {
                let mapped = *len >= netpol_common::V4_MAPPED_PREFIX
                    && Prefix::all_v4().contains(&Prefix::new(*net, *len));
                let to = if mapped {
                    netpol_common::V4_MAPPED_PREFIX + v4
                } else {
                    v6
                };
                let p = Prefix::new(*net, to.min(*len));
                (p.addr(), p.prefix_len())
            })
            .collect();
        if ranges.len() <= cap as usize || (v4, v6) == (0, 0) {
            out.frontends = ranges.into_iter().map(|k| (k, 1)).collect();
            break;
        }
    }
    Some(Shortfall {
        map: map_labels::FRONTENDS,
        dropped: wanted - out.frontends.len(),
        effect: format!(
            "{wanted} Service frontends are written as {} ranges: every address in them is judged as a frontend (denied without a Service verdict)",
            out.frontends.len()
        ),
    })
}
