//! Pending endpoints: veths that have the programs but no pod yet (attached on sight) or no longer
//! (their pod is gone, or an address is claimed twice). Only the node may open connections to them
//! (kubelet probes; the replies are tracked), unless `--pending allow-unselected` proves that
//! whichever pod they turn out to be, no policy isolates it. They may open none: not even to the
//! node, where NodePorts, hostPorts and Flannel's VXLAN port would lead them past policy.

use std::collections::BTreeMap;
use std::net::IpAddr;

use netpol_common::{Direction, IpInfo, endpoint_flags, identity};
use serde::{Deserialize, Serialize};

use super::{CompileInput, Compiled, ParsedPolicy, ip_key};
use crate::model::mode::Mode;

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
    /// Its addresses point at two pods, or another veth claims one of them: none gets it.
    Ambiguous,
    /// It had a pod that is gone (deleted, finished, readdressed) while the veth lives on.
    PodGone,
    /// The cluster state is the saved one and this veth is not the one its pod had then.
    Unconfirmed,
}

impl PendingReason {
    /// Kebab-case name for status and logs.
    pub fn name(self) -> &'static str {
        match self {
            PendingReason::NoClusterState => "no-cluster-state",
            PendingReason::UnknownPod => "unknown-pod",
            PendingReason::Ambiguous => "ambiguous",
            PendingReason::PodGone => "pod-gone",
            PendingReason::Unconfirmed => "unconfirmed",
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

/// Isolated both ways.
pub const ISOLATED_BOTH: u32 = endpoint_flags::ISOLATED_INGRESS | endpoint_flags::ISOLATED_EGRESS;

/// Writes the pending endpoints: ENDPOINTS entries, and their own addresses in IPCACHE (after every
/// pod and host address, so they never take one over) so that they can answer the node.
pub(super) fn compile(input: &CompileInput<'_>, parsed: &[ParsedPolicy<'_>], out: &mut Compiled) {
    if input.pending.is_empty() {
        return;
    }
    // A ClusterNetworkPolicy may select the pod behind the veth, and its rules are always
    // enforced: with any in the state, neither relaxation applies.
    let guarded = !input.state.cluster_policies.is_empty();
    let relaxed = match input.pending_rule {
        PendingRule::AllowUnselected if !guarded => unselected_isolation(input, parsed),
        _ => ISOLATED_BOTH,
    };
    let audit = if guarded {
        0
    } else {
        audit_bits(input, parsed)
    };
    for (&endpoint, pending) in input.pending {
        // Only a veth that never had a pod can be a new one; any other stays closed.
        let isolation = match pending.reason {
            PendingReason::UnknownPod => relaxed,
            _ => ISOLATED_BOTH,
        };
        let isolation = isolation | (audit & isolation_as_audit(isolation));
        let link = input.links.get(&endpoint).copied().unwrap_or_default();
        out.endpoints
            .insert(endpoint, link.info(isolation | endpoint_flags::PENDING));
        for addr in &pending.addrs {
            out.ipcache.entry(ip_key(*addr)).or_insert(IpInfo {
                identity: identity::PENDING,
                endpoint,
            });
        }
    }
}

/// The audit bits of both directions when a pending veth's denials may pass as would-be drops: the
/// node's default mode is audit and no policy enforces anything (a pending veth may be any pod, so
/// a single enforced policy keeps them all closed). Otherwise none.
fn audit_bits(input: &CompileInput<'_>, parsed: &[ParsedPolicy<'_>]) -> u32 {
    let all_audited = parsed.iter().all(|p| p.mode == Mode::Audit);
    if input.default_mode == Mode::Audit && all_audited {
        endpoint_flags::AUDIT_INGRESS | endpoint_flags::AUDIT_EGRESS
    } else {
        0
    }
}

/// The audit bits matching the isolated directions of `isolation`.
fn isolation_as_audit(isolation: u32) -> u32 {
    [Direction::Ingress, Direction::Egress]
        .into_iter()
        .filter(|d| isolation & endpoint_flags::isolated(*d) != 0)
        .fold(0, |bits, d| bits | endpoint_flags::audit(d))
}

/// The isolation a pending veth needs under [`PendingRule::AllowUnselected`]: the union of what
/// policies impose on every local pod without an endpoint (both ways when there is none: the veth
/// is then a pod the agent does not know yet).
fn unselected_isolation(input: &CompileInput<'_>, parsed: &[ParsedPolicy<'_>]) -> u32 {
    let candidates: Vec<_> = input
        .state
        .pods
        .values()
        .filter(|p| p.can_own_veth_on(input.node_name) && !input.endpoints.contains_key(&p.key))
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
