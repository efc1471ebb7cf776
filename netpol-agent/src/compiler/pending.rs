//! Pending endpoints: veths that have the programs but no pod yet (attached on sight) or no longer
//! (their pod is gone, or an address is claimed twice). Only the node may talk to them, unless
//! `--pending allow-unselected` proves that whichever pod they turn out to be, no policy isolates it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use netpol_common::{
    Direction, EndpointInfo, IpInfo, POLICY_PREFIX_ANY_PROTOCOL, PolicyKey, PolicyValue,
    endpoint_flags, identity,
};
use serde::{Deserialize, Serialize};

use super::{CompileInput, Compiled, ParsedPolicy, ip_key};

/// What a pending endpoint may do (`--pending`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PendingRule {
    /// Isolated both ways: only the node may talk to it (the safe default).
    #[default]
    Drop,
    /// Not isolated in a direction when no policy isolates any pod of this node that has no
    /// endpoint yet in that direction: the veth can only be one of those pods.
    AllowUnselected,
}

/// Why a veth is pending.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PendingReason {
    /// The agent has no cluster state yet (the source has not listed, nothing persisted).
    NoClusterState,
    /// No pod of this node has the peer's addresses (yet: the API reports a pod's IP after its
    /// sandbox is up; or no longer: a force-deleted pod still running).
    UnknownPod,
    /// Another veth claims one of the same pod addresses: none of them gets it.
    Ambiguous,
}

impl PendingReason {
    /// Kebab-case name for status and logs.
    pub fn name(self) -> &'static str {
        match self {
            PendingReason::NoClusterState => "no-cluster-state",
            PendingReason::UnknownPod => "unknown-pod",
            PendingReason::Ambiguous => "ambiguous",
        }
    }
}

/// A veth with programs but no pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    /// The peer's addresses that no pod and no other veth has: the pod may send from them (the
    /// node's probes can reach it); they match no pod selector.
    pub addrs: Vec<IpAddr>,
    pub reason: PendingReason,
}

const ISOLATED_BOTH: u32 = endpoint_flags::ISOLATED_INGRESS | endpoint_flags::ISOLATED_EGRESS;

/// Writes the pending endpoints: ENDPOINTS entries, their own addresses in IPCACHE (after every pod
/// and host address, so they never take one over), and egress to the node.
pub(super) fn compile(input: &CompileInput<'_>, parsed: &[ParsedPolicy<'_>], out: &mut Compiled) {
    if input.pending.is_empty() {
        return;
    }
    let isolation = match input.pending_rule {
        PendingRule::Drop => ISOLATED_BOTH,
        PendingRule::AllowUnselected => unselected_isolation(input, parsed),
    };
    for (&endpoint, pending) in input.pending {
        let flags = isolation | endpoint_flags::PENDING;
        let link = input.links.get(&endpoint).copied().unwrap_or_default();
        let link_local = link.link_local.map_or([0; 16], |a| a.octets());
        out.endpoints
            .insert(endpoint, EndpointInfo::new(flags, link.mac, link_local));
        for addr in &pending.addrs {
            out.ipcache.entry(ip_key(*addr)).or_insert(IpInfo {
                identity: identity::PENDING,
                endpoint,
            });
        }
        if flags & endpoint_flags::ISOLATED_EGRESS != 0 {
            let to_node = PolicyKey {
                endpoint,
                identity: identity::HOST,
                direction: Direction::Egress as u8,
                protocol: 0,
                port_be: [0; 2],
            };
            out.policy.insert(
                (to_node, POLICY_PREFIX_ANY_PROTOCOL),
                PolicyValue { policy: 0, _pad: 0 },
            );
        }
    }
}

/// The isolation a pending veth needs under [`PendingRule::AllowUnselected`]: the union of what
/// policies impose on every local pod without an endpoint (both ways when there is none: the veth
/// is then a pod the agent does not know yet).
fn unselected_isolation(input: &CompileInput<'_>, parsed: &[ParsedPolicy<'_>]) -> u32 {
    let candidates: Vec<_> = input
        .state
        .pods
        .values()
        .filter(|p| {
            p.node_name.as_deref() == Some(input.node_name)
                && !p.host_network
                && !matches!(p.phase.as_deref(), Some("Succeeded" | "Failed"))
                && !input.endpoints.contains_key(&p.key)
        })
        .collect();
    if candidates.is_empty() {
        return ISOLATED_BOTH;
    }
    let mut flags = 0;
    for pod in candidates {
        for policy in parsed
            .iter()
            .filter(|p| p.policy.key.namespace == pod.key.namespace)
        {
            if policy
                .selector
                .as_ref()
                .is_some_and(|s| !s.matches(&pod.labels))
            {
                continue;
            }
            if policy.isolates(Direction::Ingress) {
                flags |= endpoint_flags::ISOLATED_INGRESS;
            }
            if policy.isolates(Direction::Egress) {
                flags |= endpoint_flags::ISOLATED_EGRESS;
            }
        }
    }
    flags
}

/// Pending endpoints by veth ifindex, as the compiler takes them.
pub type PendingEndpoints = BTreeMap<u32, Pending>;
