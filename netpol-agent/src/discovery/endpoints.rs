//! Which pod each veth of the node belongs to, from what the node knows: the pod's addresses from
//! the API (or, before the API has them, from the CNI plugin's claim) and the addresses the kernel
//! shows on the veth's peer. Pure: the agent feeds it a [`NodeView`] and the cluster state.
//!
//! Fail closed: a veth that cannot be tied to exactly one pod (none yet, an address two pods or
//! two veths claim) is *pending*, never left without programs while it lives. A veth that had the
//! pod before keeps it against a newcomer claiming the same address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

pub use crate::compiler::{Pending, PendingReason};
use crate::discovery::{NodeView, PodVeth};
use crate::model::{ClusterState, Pod, PodKey};

/// The CNI plugin's word for a pod's addresses, used until the API reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub pod: PodKey,
    pub ips: Vec<IpAddr>,
}

/// What matching looks at.
#[derive(Clone, Copy, Debug)]
pub struct MatchInput<'a> {
    /// None before the source has listed and when nothing was saved.
    pub state: Option<&'a ClusterState>,
    pub node_name: &'a str,
    pub view: &'a NodeView,
    pub claims: &'a [Claim],
    /// Veths to keep programs on even when they are not bridge ports (those attached before);
    /// every bridge port is policed on sight.
    pub policed: &'a BTreeSet<u32>,
    /// The pod each veth had before (the last pass, or the saved state's bindings).
    pub previous: &'a BTreeMap<u32, PodKey>,
    /// Only `previous` bindings may match: the state is a saved one, whose addresses of this node's
    /// pods may have been given to new pods since.
    pub only_previous: bool,
}

/// The outcome of matching.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Matching {
    /// Local pods and their endpoint (host veth ifindex).
    pub endpoints: BTreeMap<PodKey, u32>,
    /// Veths that get programs without a pod, by ifindex.
    pub pending: BTreeMap<u32, Pending>,
    /// Matched pods whose addresses came from a claim (the API has none yet), for the compiler.
    pub claimed: BTreeMap<PodKey, Vec<IpAddr>>,
}

/// Who an address belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner<'a> {
    Pod(&'a PodKey),
    /// Two pods (or a pod and a claim) say it is theirs: nobody gets it.
    Conflict,
}

/// Ties veths to pods (see the module docs).
pub fn match_endpoints(input: &MatchInput<'_>) -> Matching {
    let mut out = Matching::default();
    let mut claimed = BTreeMap::new();
    let owners = input
        .state
        .map(|s| owners(s, input.node_name, input.claims, &mut claimed));
    let owner_of = |addr: &IpAddr| owners.as_ref().and_then(|o| o.get(addr).copied());
    let mut veths_of_pod: BTreeMap<&PodKey, BTreeSet<u32>> = BTreeMap::new();
    let mut veths_of_addr: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for veth in &input.view.veths {
        for addr in &veth.peer_addrs {
            *veths_of_addr.entry(*addr).or_default() += 1;
            if let Some(Owner::Pod(pod)) = owner_of(addr) {
                veths_of_pod.entry(pod).or_default().insert(veth.ifindex);
            }
        }
    }
    for veth in &input.view.veths {
        let owned: BTreeSet<Option<&PodKey>> = veth
            .peer_addrs
            .iter()
            .filter_map(owner_of)
            .map(|o| match o {
                Owner::Pod(p) => Some(p),
                Owner::Conflict => None,
            })
            .collect();
        let single = match owned.iter().collect::<Vec<_>>().as_slice() {
            [Some(pod)] => Some(*pod),
            _ => None,
        };
        let won = single.filter(|pod| wins(input, veth.ifindex, pod, &veths_of_pod[pod]));
        if let Some(pod) = won {
            out.endpoints.insert(pod.clone(), veth.ifindex);
            if let Some(ips) = claimed.get(pod) {
                out.claimed.insert(pod.clone(), ips.clone());
            }
            continue;
        }
        if !veth.bridged && !input.policed.contains(&veth.ifindex) {
            continue;
        }
        let reason = pending_reason(input, veth, !owned.is_empty(), &veths_of_addr);
        let addrs = veth
            .peer_addrs
            .iter()
            .filter(|a| veths_of_addr[*a] == 1 && owner_of(a).is_none())
            .filter(|a| veth.bridge_networks.iter().any(|n| n.contains(**a)))
            .copied()
            .collect();
        out.pending.insert(veth.ifindex, Pending { addrs, reason });
    }
    out
}

/// Whether `veth` gets `pod`, whose addresses `claimants` carry: the only claimant, or the one that
/// had the pod before; with a saved state, only the one that had it before.
fn wins(input: &MatchInput<'_>, veth: u32, pod: &PodKey, claimants: &BTreeSet<u32>) -> bool {
    let had_it = input.previous.get(&veth) == Some(pod);
    if input.only_previous {
        return had_it;
    }
    if claimants.len() == 1 {
        return true;
    }
    let holders = claimants
        .iter()
        .filter(|v| input.previous.get(v) == Some(pod))
        .count();
    had_it && holders == 1
}

fn pending_reason(
    input: &MatchInput<'_>,
    veth: &PodVeth,
    points_at_pods: bool,
    veths_of_addr: &BTreeMap<IpAddr, usize>,
) -> PendingReason {
    if input.state.is_none() {
        return PendingReason::NoClusterState;
    }
    if input.only_previous && points_at_pods {
        return PendingReason::Unconfirmed;
    }
    if points_at_pods || veth.peer_addrs.iter().any(|a| veths_of_addr[a] > 1) {
        return PendingReason::Ambiguous;
    }
    if input.previous.contains_key(&veth.ifindex) {
        return PendingReason::PodGone;
    }
    PendingReason::UnknownPod
}

/// Every address a local pod may have a veth with: the API's addresses, or the claim's for a pod
/// the API reports none for. An address two pods (or a pod and a claim) name is a conflict.
/// Claims for pods the state does not put on this node are ignored. `claimed` gets the claims used.
fn owners<'a>(
    state: &'a ClusterState,
    node_name: &str,
    claims: &[Claim],
    claimed: &mut BTreeMap<PodKey, Vec<IpAddr>>,
) -> BTreeMap<IpAddr, Owner<'a>> {
    let mut owners = BTreeMap::new();
    let mut add = |ip: IpAddr, pod: &'a PodKey| {
        owners
            .entry(ip)
            .and_modify(|o| {
                if *o != Owner::Pod(pod) {
                    *o = Owner::Conflict;
                }
            })
            .or_insert(Owner::Pod(pod));
    };
    let local: Vec<&Pod> = state
        .pods
        .values()
        .map(Arc::as_ref)
        .filter(|p| p.can_own_veth_on(node_name))
        .collect();
    for pod in &local {
        for ip in &pod.ips {
            add(*ip, &pod.key);
        }
    }
    for pod in local.iter().filter(|p| p.ips.is_empty()) {
        // The newest claim of the pod (a retried sandbox claims again).
        let Some(claim) = claims.iter().rev().find(|c| c.pod == pod.key) else {
            continue;
        };
        for ip in &claim.ips {
            add(*ip, &pod.key);
        }
        claimed.insert(pod.key.clone(), claim.ips.clone());
    }
    owners
}

/// The state with the claimed addresses filled in, for the compiler (a claimed pod is a peer and
/// an endpoint like any other). Borrowed unchanged when nothing is claimed.
pub fn with_claimed<'a>(
    state: &'a ClusterState,
    claimed: &BTreeMap<PodKey, Vec<IpAddr>>,
) -> std::borrow::Cow<'a, ClusterState> {
    if claimed.is_empty() {
        return std::borrow::Cow::Borrowed(state);
    }
    let mut state = state.clone();
    for (key, ips) in claimed {
        if let Some(pod) = state.pods.get_mut(key) {
            Arc::make_mut(pod).ips = ips.clone();
        }
    }
    std::borrow::Cow::Owned(state)
}

#[cfg(test)]
#[path = "endpoints_tests.rs"]
mod tests;
