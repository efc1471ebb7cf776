//! Which pod each veth of the node belongs to, from what the node knows: the pod's addresses from
//! the API (or, before the API has them, from the CNI plugin's claim) and the addresses the kernel
//! shows on the veth's peer. Pure: the agent feeds it a [`NodeView`] and the cluster state.
//!
//! Fail closed: a veth that cannot be tied to exactly one pod (none yet, or an address two veths
//! claim) is *pending*, never left without programs while it lives.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

pub use crate::compiler::{Pending, PendingReason};
use crate::discovery::NodeView;
use crate::model::{ClusterState, Pod, PodKey};

/// The CNI plugin's word for a pod's addresses, used until the API reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub pod: PodKey,
    pub ips: Vec<IpAddr>,
}

/// The outcome of matching.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Matching {
    /// Local pods and their endpoint (host veth ifindex).
    pub endpoints: BTreeMap<PodKey, u32>,
    /// Veths that get programs without a pod, by ifindex.
    pub pending: BTreeMap<u32, Pending>,
    /// Pods whose addresses came from a claim (the API has none yet), for the compiler.
    pub claimed: BTreeMap<PodKey, Vec<IpAddr>>,
}

/// Whether a pod of this node can own a veth: it has its own network namespace and is not done.
fn is_local_candidate(pod: &Pod, node_name: &str) -> bool {
    pod.node_name.as_deref() == Some(node_name)
        && !pod.host_network
        && !matches!(pod.phase.as_deref(), Some("Succeeded" | "Failed"))
}

/// Ties veths to pods. `policed` are the veths to keep programs on even when they are not bridge
/// ports (those the agent attached before); every bridged veth is policed on sight.
pub fn match_endpoints(
    state: Option<&ClusterState>,
    node_name: &str,
    view: &NodeView,
    claims: &[Claim],
    policed: &BTreeSet<u32>,
) -> Matching {
    let mut out = Matching::default();
    let owners = state.map(|s| addresses(s, node_name, claims, &mut out.claimed));
    // Which pods each veth's peer addresses point at, and which veths point at each pod.
    let mut pods_of_veth: BTreeMap<u32, BTreeSet<&PodKey>> = BTreeMap::new();
    let mut veths_of_pod: BTreeMap<&PodKey, BTreeSet<u32>> = BTreeMap::new();
    let mut veths_of_addr: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for veth in &view.veths {
        for addr in &veth.peer_addrs {
            *veths_of_addr.entry(*addr).or_default() += 1;
            if let Some(pod) = owners.as_ref().and_then(|o| o.get(addr)) {
                pods_of_veth.entry(veth.ifindex).or_default().insert(pod);
                veths_of_pod.entry(pod).or_default().insert(veth.ifindex);
            }
        }
    }
    for veth in &view.veths {
        let pods = pods_of_veth.get(&veth.ifindex);
        let single = pods
            .filter(|p| p.len() == 1)
            .and_then(|p| p.first().copied())
            .filter(|pod| veths_of_pod[pod].len() == 1);
        if let Some(pod) = single {
            out.endpoints.insert(pod.clone(), veth.ifindex);
            continue;
        }
        if !veth.bridged && !policed.contains(&veth.ifindex) {
            continue;
        }
        let reason = match (&owners, pods) {
            (None, _) => PendingReason::NoClusterState,
            (Some(_), Some(_)) => PendingReason::Ambiguous,
            (Some(_), None) if veth.peer_addrs.iter().any(|a| veths_of_addr[a] > 1) => {
                PendingReason::Ambiguous
            }
            (Some(_), None) => PendingReason::UnknownPod,
        };
        let addrs = veth
            .peer_addrs
            .iter()
            .filter(|a| {
                veths_of_addr[*a] == 1 && !owners.as_ref().is_some_and(|o| o.contains_key(a))
            })
            .copied()
            .collect();
        out.pending.insert(veth.ifindex, Pending { addrs, reason });
    }
    out
}

/// Every address a local pod may have a veth with: the API's addresses, or the claim's for a pod
/// the API reports none for. Claims for pods the state does not put on this node are ignored.
fn addresses<'a>(
    state: &'a ClusterState,
    node_name: &str,
    claims: &[Claim],
    claimed: &mut BTreeMap<PodKey, Vec<IpAddr>>,
) -> BTreeMap<IpAddr, &'a PodKey> {
    let mut owners = BTreeMap::new();
    for pod in state.pods.values() {
        if !is_local_candidate(pod, node_name) {
            continue;
        }
        let ips = if pod.ips.is_empty() {
            let Some(claim) = claims.iter().find(|c| c.pod == pod.key) else {
                continue;
            };
            claimed.insert(pod.key.clone(), claim.ips.clone());
            &claim.ips
        } else {
            &pod.ips
        };
        for ip in ips {
            owners.insert(*ip, &pod.key);
        }
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
            pod.ips = ips.clone();
        }
    }
    std::borrow::Cow::Owned(state)
}

#[cfg(test)]
#[path = "endpoints_tests.rs"]
mod tests;
