//! The policy compiler: a pure function from cluster state to the contents of the datapath maps.
//!
//! Kubernetes NetworkPolicy v1 semantics: a pod is isolated in a direction when a policy of its
//! namespace selects it with that policy type; what an isolated pod may do is the union of the
//! matching rules of every policy that selects it. Peers become identities ([`crate::model::identity`]);
//! the datapath looks up a packet's peer identity (from IPCACHE), the identity of the longest CIDR
//! prefix containing the peer address (from CIDRS), and [`identity::ANY`], each against POLICY.
//!
//! Fail closed: a policy with any invalid field allows nothing but still isolates what it selects.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::{IPBlock, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use netpol_common::{
    Direction, EndpointInfo, IpInfo, IpKey, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTOCOL,
    POLICY_PREFIX_FULL, PolicyKey, PolicyValue, endpoint_flags, identity, rule_code,
};

use crate::datapath::Contents;
use crate::datapath::capacities::Capacities;
use crate::model::identity::{Identities, PodIdentityKey, Prefix, fnv1a32};
use crate::model::mode::{self, Mode};
use crate::model::selector::Selector;
use crate::model::{ClusterState, NamedPort, Origin, Pod, PodKey, Policy, Protocol};
use label_index::LabelIndex;

pub mod capacity;
mod label_index;
mod pending;
mod pods;
mod services;
#[cfg(test)]
mod tests;
pub mod tiers;

pub use capacity::Shortfall;
pub use pending::{ISOLATED_BOTH, Pending, PendingEndpoints, PendingReason, PendingRule};

/// What the compiler needs besides the cluster state.
#[derive(Clone, Copy, Debug)]
pub struct CompileInput<'a> {
    pub state: &'a ClusterState,
    /// This node's name, as in `spec.nodeName`.
    pub node_name: &'a str,
    /// The local pods that have a datapath endpoint, with its id (the host veth's ifindex).
    pub endpoints: &'a BTreeMap<PodKey, u32>,
    /// The node's own addresses: traffic from them is the kubelet's and always reaches local pods.
    pub host_addrs: &'a [IpAddr],
    /// The link identity of each endpoint's pod interface, by endpoint id. An endpoint without one
    /// gets an all-zero MAC, so everything its pod sends is dropped (fail closed).
    pub links: &'a BTreeMap<u32, EndpointLink>,
    /// Veths that have programs but no pod: isolated as `pending_rule` says.
    pub pending: &'a PendingEndpoints,
    pub pending_rule: PendingRule,
    /// `tunnel_egress` guards every device pod traffic can leave the node by: a connection to a
    /// remote backend can then be decided after DNAT. When not (a device it could not be attached
    /// to), Service verdicts count on no such decision and fail closed.
    pub exits_guarded: bool,
    /// What the maps hold: the output is fitted into it ([`capacity`]).
    pub capacities: Capacities,
    /// The mode of policies whose object and namespace set none (`--default-mode`).
    pub default_mode: Mode,
}

/// The link identity of a local pod's interface (the veth peer), as the kernel reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointLink {
    /// MAC address.
    pub mac: [u8; 6],
    /// IPv6 link-local address, if any.
    pub link_local: Option<std::net::Ipv6Addr>,
}

impl EndpointLink {
    /// The ENDPOINTS value of an endpoint with this link identity and `flags`.
    pub fn info(&self, flags: u32) -> EndpointInfo {
        let link_local = self.link_local.map_or([0; 16], |a| a.octets());
        EndpointInfo::new(flags, self.mac, link_local)
    }
}

/// A problem with one policy. The policy then allows nothing (see the module docs).
/// Which kind of policy object an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PolicyKind {
    #[default]
    NetworkPolicy,
    /// Cluster-scoped: its [`CompileError::policy`] has an empty namespace.
    ClusterNetworkPolicy,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} ({origin}): {field}: {reason}", policy_ref(*kind, policy))]
pub struct CompileError {
    pub kind: PolicyKind,
    pub policy: PodKey,
    pub origin: Origin,
    /// Path of the offending field, such as `spec.ingress[0].from[1].ipBlock.cidr`.
    pub field: String,
    pub reason: String,
}

/// Counts for logs and `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Policies in the state.
    pub policies: usize,
    /// Policies with at least one error.
    pub invalid_policies: usize,
    pub pod_identities: usize,
    pub cidr_identities: usize,
    /// Endpoints compiled (every entry of [`CompileInput::endpoints`]).
    pub endpoints: usize,
    /// Endpoints whose pod is not in the state: isolated by every policy of their namespace.
    pub unknown_endpoints: usize,
    /// Peer pods on this node (by `spec.nodeName`) without an endpoint yet.
    pub local_pods_without_endpoint: usize,
    pub isolated_ingress: usize,
    pub isolated_egress: usize,
    pub policy_entries: usize,
}

/// The desired contents of the datapath maps, with what the compilation found on the way. Reads
/// as its [`Contents`]:
/// - ENDPOINTS: every endpoint of the input, with its isolation flags;
/// - IPCACHE: every peer pod address of the cluster, and the node's addresses as
///   [`identity::HOST`];
/// - CIDRS: (network, prefix length in [`IpKey`] bits) -> identity, as this node needs them;
/// - POLICY: (key, prefix length in bits) -> value;
/// - SERVICES: egress verdicts of egress-isolated endpoints through Service frontends;
/// - FRONTENDS: every Service frontend address (or range), judged on its backends only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub maps: Contents,
    pub errors: Vec<CompileError>,
    /// What the maps could not hold, and what was left out instead (only ever allows).
    pub shortfalls: Vec<Shortfall>,
    /// The identities behind the numbers, for observability.
    pub identities: Identities,
    /// The policies that isolate each endpoint, by (endpoint, direction): the enforced ones, or
    /// the audited ones where none enforces (what a denial there names).
    pub isolating: BTreeMap<(u32, Direction), Vec<PodKey>>,
    pub stats: Stats,
}

pub use crate::datapath::lookup::ip_key;

/// `NetworkPolicy ns/name` or `ClusterNetworkPolicy name`.
pub fn policy_ref(kind: PolicyKind, key: &PodKey) -> String {
    match kind {
        PolicyKind::NetworkPolicy => format!("NetworkPolicy {key}"),
        PolicyKind::ClusterNetworkPolicy => format!("ClusterNetworkPolicy {}", key.name),
    }
}

/// The id stored in [`PolicyValue::policy`] for the policy `key`.
pub fn policy_id(key: &PodKey) -> u32 {
    fnv1a32(key.to_string().as_bytes())
}

/// The fewest aligned port blocks covering `lo..=hi`, as (first port, POLICY prefix length): a block
/// of 2^k ports is a prefix of [`POLICY_PREFIX_FULL`] - k bits, since the port is big-endian last.
pub fn port_range_prefixes(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    let mut out = Vec::new();
    while lo <= hi {
        let mut k = lo.trailing_zeros().min(16);
        while lo + (1 << k) - 1 > hi {
            k -= 1;
        }
        out.push((lo as u16, POLICY_PREFIX_FULL - k));
        lo += 1 << k;
    }
    out
}

impl Compiled {
    /// What the datapath maps must hold for this compilation.
    pub fn contents(&self) -> Contents {
        self.maps.clone()
    }
}

impl std::ops::Deref for Compiled {
    type Target = Contents;

    fn deref(&self) -> &Contents {
        &self.maps
    }
}

impl std::ops::DerefMut for Compiled {
    fn deref_mut(&mut self) -> &mut Contents {
        &mut self.maps
    }
}

/// Which namespaces a pod peer may be in.
#[derive(Clone, Debug)]
enum NamespaceMatch {
    /// The policy's own namespace (no `namespaceSelector`).
    Same,
    Selector(Selector),
}

/// One validated element of `from` / `to`.
#[derive(Clone, Debug)]
enum Peer {
    Pods {
        namespaces: NamespaceMatch,
        pods: Selector,
    },
    IpBlock {
        cidr: Prefix,
        except: Vec<Prefix>,
    },
}

/// One validated element of `ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum PortMatch {
    /// No `ports`: every protocol and port.
    AnyProtocol,
    /// A protocol without a port.
    AnyPort(Protocol),
    /// `port` alone (`lo == hi`) or `port..=endPort`.
    Range(Protocol, u16, u16),
    /// A container port name, resolved against the pod receiving the connection.
    Named(Protocol, String),
}

/// A validated rule. `peers: None` means every peer.
#[derive(Clone, Debug)]
struct Rule {
    direction: Direction,
    /// Its index among the policy's rules of its direction (`ingress[index]`).
    index: u32,
    peers: Option<Vec<Peer>>,
    ports: Vec<PortMatch>,
}

/// What a policy object validates to, whatever the rest of the state (so [`Compiler`] keeps it
/// while the object does not change).
#[derive(Debug)]
struct Parsed {
    id: u32,
    /// `None` when the pod selector is invalid: the policy then isolates its whole namespace.
    selector: Option<Selector>,
    ingress: bool,
    egress: bool,
    /// Empty when the policy has an error.
    rules: Vec<Rule>,
    valid: bool,
    errors: Vec<CompileError>,
}

/// A validated policy, with the mode it is compiled in.
#[derive(Clone, Debug)]
struct ParsedPolicy<'a> {
    policy: &'a Policy,
    parsed: Arc<Parsed>,
    mode: Mode,
}

impl std::ops::Deref for ParsedPolicy<'_> {
    type Target = Parsed;

    fn deref(&self) -> &Parsed {
        &self.parsed
    }
}

impl Parsed {
    fn isolates(&self, direction: Direction) -> bool {
        match direction {
            Direction::Ingress => self.ingress,
            Direction::Egress => self.egress,
        }
    }
}

/// Collects the errors of one policy.
struct Errors<'a> {
    policy: &'a Policy,
    out: Vec<CompileError>,
}

impl Errors<'_> {
    fn push(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.out.push(CompileError {
            kind: PolicyKind::NetworkPolicy,
            policy: self.policy.key.clone(),
            origin: self.policy.origin.clone(),
            field: field.into(),
            reason: reason.into(),
        });
    }
}

fn parse_policy(policy: &Policy) -> Parsed {
    let mut errs = Errors {
        policy,
        out: Vec::new(),
    };
    let spec = &policy.spec;
    let selector = match &spec.pod_selector {
        None => Some(Selector::everything()),
        Some(s) => match Selector::parse(s, "spec.podSelector") {
            Ok(s) => Some(s),
            Err(e) => {
                errs.push(e.field, e.reason);
                None
            }
        },
    };

    let (mut ingress, mut egress) = (false, false);
    match &spec.policy_types {
        Some(types) if !types.is_empty() => {
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => ingress = true,
                    "Egress" => egress = true,
                    other => {
                        errs.push(
                            format!("spec.policyTypes[{i}]"),
                            format!("unknown policy type {other:?} (expected Ingress or Egress)"),
                        );
                        // Not knowing what was meant, isolate both ways.
                        ingress = true;
                        egress = true;
                    }
                }
            }
        }
        // As the API server defaults it: Ingress, and Egress when there is an egress rule (an empty
        // `egress: []` adds nothing).
        _ => {
            ingress = true;
            egress = spec.egress.as_ref().is_some_and(|rules| !rules.is_empty());
        }
    }

    // Every rule is validated, also those of a direction the policy types leave out: the API server
    // would reject the whole object, so the policy must not half-apply.
    let mut rules = Vec::new();
    for (i, rule) in spec.ingress.iter().flatten().enumerate() {
        let field = format!("spec.ingress[{i}]");
        rules.push(Rule {
            direction: Direction::Ingress,
            index: i as u32,
            peers: parse_peers(rule.from.as_deref(), &format!("{field}.from"), &mut errs),
            ports: parse_ports(rule.ports.as_deref(), &format!("{field}.ports"), &mut errs),
        });
    }
    for (i, rule) in spec.egress.iter().flatten().enumerate() {
        let field = format!("spec.egress[{i}]");
        rules.push(Rule {
            direction: Direction::Egress,
            index: i as u32,
            peers: parse_peers(rule.to.as_deref(), &format!("{field}.to"), &mut errs),
            ports: parse_ports(rule.ports.as_deref(), &format!("{field}.ports"), &mut errs),
        });
    }
    let valid = errs.out.is_empty();
    if !valid {
        rules.clear();
    }
    Parsed {
        id: policy_id(&policy.key),
        selector,
        ingress,
        egress,
        rules,
        valid,
        errors: errs.out,
    }
}

fn parse_peers(
    peers: Option<&[NetworkPolicyPeer]>,
    field: &str,
    errs: &mut Errors<'_>,
) -> Option<Vec<Peer>> {
    let peers = peers.filter(|p| !p.is_empty())?;
    let mut out = Vec::new();
    for (i, peer) in peers.iter().enumerate() {
        let field = format!("{field}[{i}]");
        match (&peer.pod_selector, &peer.namespace_selector, &peer.ip_block) {
            (None, None, None) => errs.push(
                field,
                "must specify podSelector, namespaceSelector or ipBlock",
            ),
            (None, None, Some(block)) => {
                if let Some(peer) = parse_ip_block(block, &format!("{field}.ipBlock"), errs) {
                    out.push(peer);
                }
            }
            (_, _, Some(_)) => errs.push(
                format!("{field}.ipBlock"),
                "ipBlock cannot be combined with podSelector or namespaceSelector",
            ),
            (pods, namespaces, None) => {
                let mut parse =
                    |sel, name: &str| match Selector::parse(sel, &format!("{field}.{name}")) {
                        Ok(s) => Some(s),
                        Err(e) => {
                            errs.push(e.field, e.reason);
                            None
                        }
                    };
                let pods = match pods {
                    Some(sel) => parse(sel, "podSelector"),
                    None => Some(Selector::everything()),
                };
                let namespaces = match namespaces {
                    Some(sel) => parse(sel, "namespaceSelector").map(NamespaceMatch::Selector),
                    None => Some(NamespaceMatch::Same),
                };
                if let (Some(pods), Some(namespaces)) = (pods, namespaces) {
                    out.push(Peer::Pods { namespaces, pods });
                }
            }
        }
    }
    Some(out)
}

fn parse_cidr(s: &str, field: &str, errs: &mut Errors<'_>) -> Option<ipnetwork::IpNetwork> {
    // ipnetwork takes a bare address as a host prefix; the API requires CIDR notation.
    let parsed = if s.contains('/') {
        s.parse().ok()
    } else {
        None
    };
    if parsed.is_none() {
        errs.push(field, format!("{s:?} is not a CIDR"));
    }
    parsed
}

fn parse_ip_block(block: &IPBlock, field: &str, errs: &mut Errors<'_>) -> Option<Peer> {
    let cidr = parse_cidr(&block.cidr, &format!("{field}.cidr"), errs)?;
    let cidr_prefix = Prefix::from_network(cidr);
    let mut except = Vec::new();
    let mut ok = true;
    for (i, e) in block.except.iter().flatten().enumerate() {
        let efield = format!("{field}.except[{i}]");
        let Some(net) = parse_cidr(e, &efield, errs) else {
            ok = false;
            continue;
        };
        let prefix = Prefix::from_network(net);
        if net.is_ipv4() != cidr.is_ipv4() {
            errs.push(
                efield,
                format!("{e} is not of the address family of cidr {}", block.cidr),
            );
            ok = false;
        } else if !cidr_prefix.contains(&prefix) {
            errs.push(efield, format!("{e} is not inside cidr {}", block.cidr));
            ok = false;
        } else {
            except.push(prefix);
        }
    }
    ok.then_some(Peer::IpBlock {
        cidr: cidr_prefix,
        except,
    })
}

fn parse_ports(
    ports: Option<&[NetworkPolicyPort]>,
    field: &str,
    errs: &mut Errors<'_>,
) -> Vec<PortMatch> {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return vec![PortMatch::AnyProtocol];
    };
    let mut out = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let field = format!("{field}[{i}]");
        let protocol = match p.protocol.as_deref() {
            None => Protocol::Tcp,
            Some(s) => match Protocol::parse(s) {
                Some(p) => p,
                None => {
                    errs.push(
                        format!("{field}.protocol"),
                        format!("unsupported protocol {s:?} (expected TCP, UDP or SCTP)"),
                    );
                    continue;
                }
            },
        };
        let port_number = |n: i32, sub: &str, errs: &mut Errors<'_>| {
            let port = u16::try_from(n).ok().filter(|&n| n != 0);
            if port.is_none() {
                errs.push(format!("{field}.{sub}"), format!("{n} is not in 1-65535"));
            }
            port
        };
        match (&p.port, p.end_port) {
            (None, None) => out.push(PortMatch::AnyPort(protocol)),
            (Some(IntOrString::Int(n)), end) => {
                let Some(lo) = port_number(*n, "port", errs) else {
                    continue;
                };
                let hi = match end {
                    None => lo,
                    Some(e) => {
                        let Some(hi) = port_number(e, "endPort", errs) else {
                            continue;
                        };
                        if hi < lo {
                            errs.push(
                                format!("{field}.endPort"),
                                format!("{hi} is less than port {lo}"),
                            );
                            continue;
                        }
                        hi
                    }
                };
                out.push(PortMatch::Range(protocol, lo, hi));
            }
            (Some(IntOrString::String(name)), None) => {
                if is_port_name(name) {
                    out.push(PortMatch::Named(protocol, name.clone()));
                } else {
                    errs.push(
                        format!("{field}.port"),
                        format!("{name:?} is not a port name"),
                    );
                }
            }
            (_, Some(_)) => errs.push(format!("{field}.endPort"), "requires a numeric port"),
        }
    }
    out
}

/// An IANA service name, as container port names are: 1-15 lowercase alphanumerics or '-', with at
/// least one letter.
fn is_port_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
}

/// A resolved peer of a rule.
#[derive(Clone, Copy, Debug)]
enum Target<'a> {
    Any,
    /// Every pod of the cluster: [`identity::ALL_PODS`].
    AllPods,
    Pod(u32, &'a PodIdentityKey),
    Cidr(u32),
}

/// A rule of a valid policy with its peers resolved to identities.
struct ResolvedRule<'a> {
    direction: Direction,
    /// [`rule_code`] of the rule in its policy.
    code: u32,
    targets: Vec<Target<'a>>,
    ports: &'a [PortMatch],
}

/// Compiles the state into map contents, from scratch: the reference that [`Compiler`], which keeps
/// what it can between compilations, must always agree with.
pub fn compile(input: &CompileInput<'_>) -> Compiled {
    let keys = input
        .state
        .peer_pods()
        .map(|p| Arc::new(PodIdentityKey::of(p)));
    let numbers = Arc::new(crate::model::identity::number_pods(keys));
    let ipcache = pod_ipcache(input, &numbers);
    // Peers by plain scan, so that the label index and the memo of [`Compiler`] are checked
    // against it.
    let pods = PodIdentities {
        numbers: &numbers,
        labels: None,
    };
    compile_with(input, &mut |p| Arc::new(parse_policy(p)), pods, ipcache)
}

/// The compiler with what it keeps between compilations: the pod-wide stage ([`pods::PodStage`]),
/// updated for the pods that changed. Its output is always what [`compile`] gives for the same input.
#[derive(Clone, Debug, Default)]
pub struct Compiler {
    pods: pods::PodStage,
    /// Each policy as last parsed, with the object it was parsed from.
    policies: BTreeMap<PodKey, (Arc<Policy>, Arc<Parsed>)>,
    /// The pod identities by label, for the stage's current numbering.
    labels: LabelIndex,
}

/// The pod identities a compilation resolves peers to, with their label index (`None`: every
/// peer by a plain scan, as the reference does).
#[derive(Clone, Copy)]
struct PodIdentities<'a> {
    numbers: &'a label_index::Numbers,
    labels: Option<&'a LabelIndex>,
}

impl Compiler {
    /// Compiles `input`, reusing what did not change since the last call.
    pub fn compile(&mut self, input: &CompileInput<'_>) -> Compiled {
        self.pods.update(input.state, input.endpoints);
        let policies = &input.state.policies;
        self.policies.retain(|key, (old, _)| {
            policies
                .get(key)
                .is_some_and(|new| Arc::ptr_eq(new, old) || new == old)
        });
        let kept = &mut self.policies;
        let mut parse = |p: &Arc<Policy>| {
            let (_, parsed) = kept
                .entry(p.key.clone())
                .or_insert_with(|| (p.clone(), Arc::new(parse_policy(p))));
            parsed.clone()
        };
        let pod_ipcache = self.pods.ipcache().clone();
        let numbers = self.pods.numbers();
        if !self.labels.is_for(numbers) {
            // The old one goes first: two at once at 50,000 identities is a peak for nothing.
            self.labels = LabelIndex::default();
            self.labels = LabelIndex::new(numbers);
        }
        let pods = PodIdentities {
            numbers,
            labels: Some(&self.labels),
        };
        compile_with(input, &mut parse, pods, pod_ipcache)
    }
}

/// The compilation given how to parse a policy, the pod identities and the IPCACHE entries of the
/// pods' addresses.
fn compile_with(
    input: &CompileInput<'_>,
    parse: &mut dyn FnMut(&Arc<Policy>) -> Arc<Parsed>,
    pods: PodIdentities<'_>,
    pod_ipcache: BTreeMap<IpKey, IpInfo>,
) -> Compiled {
    let state = input.state;
    let mut out = Compiled::default();
    let parsed: Vec<ParsedPolicy<'_>> = state
        .policies
        .values()
        .map(|policy| {
            let parsed = parse(policy);
            out.errors.extend(parsed.errors.iter().cloned());
            let resolved = state.policy_mode(policy, input.default_mode);
            out.errors
                .extend(resolved.error.map(|e| mode_error(policy, e)));
            ParsedPolicy {
                policy,
                parsed,
                mode: resolved.mode,
            }
        })
        .collect();
    let clusters: Vec<tiers::ParsedCluster> =
        state.cluster_policies.values().map(tiers::parse).collect();
    for c in &clusters {
        out.errors.extend(c.errors.iter().cloned());
    }
    let identities = Identities {
        pods: pods.numbers.clone(),
        cidrs: cidr_identities(state, &parsed, tiers::network_prefixes(&clusters)),
    };
    for (prefix, id) in &identities.cidrs {
        out.cidrs.insert((prefix.addr(), prefix.prefix_len()), *id);
    }
    out.ipcache = pod_ipcache;
    add_host_addrs(input, &mut out.ipcache);
    let emit_ctx = EmitContext {
        identities: &identities,
        host_ports: host_ports(state, &identities),
    };
    let peers = PeerIndex::new(state, &identities, pods.labels);
    let by_namespace = policies_by_namespace(&parsed);
    // Only the policies of namespaces with a local endpoint can select one: the others' peers are
    // never resolved (their rules cannot decide for this node).
    let resolved: Vec<Vec<ResolvedRule<'_>>> = parsed
        .iter()
        .map(|p| {
            let local = input
                .endpoints
                .range(PodKey::new(p.policy.key.namespace.clone(), String::new())..)
                .next()
                .is_some_and(|(k, _)| k.namespace == p.policy.key.namespace);
            if local { peers.rules(p) } else { Vec::new() }
        })
        .collect();
    let ranked = tiers::rank(&clusters);
    if let Some(p) = ranked.saturated {
        let origin = state.cluster_policies[&p.name].origin.clone();
        out.errors.push(tiers::saturation_error(p, origin));
    }
    let tier_rules = peers.tier_rules(ranked);
    let mut tier_entries = BTreeMap::new();
    for (key, &endpoint) in input.endpoints {
        let pod = state.pods.get(key).map(Arc::as_ref);
        let in_namespace = by_namespace
            .get(key.namespace.as_str())
            .map_or(&[][..], Vec::as_slice);
        let candidates = in_namespace.iter().map(|&i| (&parsed[i], &resolved[i]));
        let (mut flags, isolating) =
            endpoint_flags_and_rules(key, pod, candidates, |rule, policy| {
                let to = Emit {
                    endpoint,
                    direction: rule.direction,
                    key_direction: rule.direction as u8,
                    rule: PolicyValue {
                        policy,
                        rule: rule.code,
                    },
                    local_pod: pod,
                };
                let (targets, ports) = (&rule.targets, rule.ports);
                emit_rule(
                    &mut |key, value| {
                        out.policy.entry(key).or_insert(value);
                    },
                    to,
                    targets,
                    ports,
                    &emit_ctx,
                );
            });
        if let Some(pod) = pod {
            let at = EndpointAt { endpoint, pod };
            flags |= emit_tier_rules(&mut tier_entries, at, state, &tier_rules, &emit_ctx);
        }
        for (dir, policies) in [Direction::Ingress, Direction::Egress]
            .into_iter()
            .zip(isolating)
        {
            out.isolating.insert((endpoint, dir), policies);
        }
        out.stats.unknown_endpoints += usize::from(pod.is_none());
        out.stats.isolated_ingress += usize::from(flags & endpoint_flags::ISOLATED_INGRESS != 0);
        out.stats.isolated_egress += usize::from(flags & endpoint_flags::ISOLATED_EGRESS != 0);
        let link = input.links.get(&endpoint).copied().unwrap_or_default();
        out.endpoints.insert(endpoint, link.info(flags));
    }
    tiers::fold(&mut tier_entries);
    out.policy.extend(tier_entries);
    pending::compile(input, &parsed, &mut out);
    out.shortfalls = capacity::fit_rules(&mut out, &input.capacities);
    fill_stats(&mut out, &parsed, &identities);
    out.identities = identities;
    compile_services(input, &mut out);
    out
}

/// A bad mode annotation of `policy` (or of its namespace, `on_namespace`).
fn mode_error(policy: &Policy, (on_namespace, e): (bool, mode::ModeError)) -> CompileError {
    let field = if on_namespace {
        format!("Namespace {} {}", policy.key.namespace, mode::FIELD)
    } else {
        mode::FIELD.to_owned()
    };
    CompileError {
        kind: PolicyKind::NetworkPolicy,
        policy: policy.key.clone(),
        origin: policy.origin.clone(),
        field,
        reason: e.to_string(),
    }
}

/// The isolation flags of the endpoint of pod `key` (`pod` when the state has it); `emit` gets each
/// rule that decides for it, with its policy's id.
///
/// Per direction, enforced policies come first: when one isolates the pod, only enforced rules are
/// written, so an audited policy never changes what an enforced one drops. Otherwise, when an
/// audited policy isolates it, the audited rules are written and the direction is flagged audit:
/// what they do not allow passes as a would-be drop.
fn endpoint_flags_and_rules<'p, 'r: 'p>(
    key: &PodKey,
    pod: Option<&Pod>,
    policies: impl Iterator<Item = (&'p ParsedPolicy<'p>, &'r Vec<ResolvedRule<'r>>)>,
    mut emit: impl FnMut(&'r ResolvedRule<'r>, u32),
) -> (u32, [Vec<PodKey>; 2]) {
    // The isolating policies by mode and direction, and the rules of those that select the pod.
    let mut isolating: [[Vec<PodKey>; 2]; 2] = Default::default();
    let mut grants = Vec::new();
    for (policy, rules) in policies {
        debug_assert_eq!(policy.policy.key.namespace, key.namespace);
        let by_mode = &mut isolating[policy.mode as usize];
        let name = &policy.policy.key;
        let Some(selector) = &policy.selector else {
            by_mode.iter_mut().for_each(|d| d.push(name.clone()));
            continue;
        };
        // A pod not in the state is isolated by every policy of its namespace (its labels are
        // unknown), but only policies that select all pods grant it anything.
        let selected = pod.map_or(selector.is_empty(), |p| selector.matches(&p.labels));
        if !selected && pod.is_some() {
            continue;
        }
        for (dir, isolates) in [
            (Direction::Ingress, policy.ingress),
            (Direction::Egress, policy.egress),
        ] {
            if isolates {
                by_mode[dir as usize].push(name.clone());
            }
        }
        if selected {
            grants.extend(rules.iter().map(|rule| (rule, policy.id, policy.mode)));
        }
    }
    let [enforced, audited] = isolating;
    let mut flags = 0;
    let mut deciding = [None, None];
    let mut names: [Vec<PodKey>; 2] = Default::default();
    for ((dir, enforced), audited) in [Direction::Ingress, Direction::Egress]
        .into_iter()
        .zip(enforced)
        .zip(audited)
    {
        let d = dir as usize;
        if !enforced.is_empty() {
            flags |= endpoint_flags::isolated(dir);
            (deciding[d], names[d]) = (Some(Mode::Enforce), enforced);
        } else if !audited.is_empty() {
            flags |= endpoint_flags::isolated(dir) | endpoint_flags::audit(dir);
            (deciding[d], names[d]) = (Some(Mode::Audit), audited);
        }
    }
    for (rule, id, mode) in grants {
        if deciding[rule.direction as usize] == Some(mode) {
            emit(rule, id);
        }
    }
    (flags, names)
}

/// The indices of `parsed` by the policies' namespace.
fn policies_by_namespace<'a>(parsed: &'a [ParsedPolicy<'_>]) -> BTreeMap<&'a str, Vec<usize>> {
    let mut out: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, p) in parsed.iter().enumerate() {
        out.entry(p.policy.key.namespace.as_str())
            .or_default()
            .push(i);
    }
    out
}

/// The counts of `status` and the logs.
fn fill_stats(out: &mut Compiled, parsed: &[ParsedPolicy<'_>], identities: &Identities) {
    out.stats.policies = parsed.len();
    out.stats.invalid_policies = parsed.iter().filter(|p| !p.valid).count();
    out.stats.pod_identities = identities.pods.len();
    out.stats.cidr_identities = identities.cidrs.len();
    out.stats.endpoints = out.endpoints.len();
    out.stats.policy_entries = out.policy.len();
}

/// FRONTENDS and SERVICES (from the fitted rules), fitted in turn.
fn compile_services(input: &CompileInput<'_>, out: &mut Compiled) {
    let state = input.state;
    let local_pods: Vec<_> = state
        .peer_pods()
        .filter(|p| p.node_name.as_deref() == Some(input.node_name))
        .collect();
    out.stats.local_pods_without_endpoint = local_pods
        .iter()
        .filter(|p| !input.endpoints.contains_key(&p.key))
        .count();
    let local_ips: std::collections::BTreeSet<IpAddr> = local_pods
        .iter()
        .flat_map(|p| p.ips.iter().copied())
        .collect();
    let frontends = crate::model::service::frontends(state);
    out.frontends = frontends
        .iter()
        .map(|f| ((ip_key(f.vip), Prefix::host(ip_key(f.vip)).prefix_len()), 1))
        .collect();
    out.services = services::compile(out, &frontends, &local_ips, input.exits_guarded);
    let shortfalls = capacity::fit_services(out, &input.capacities);
    out.shortfalls.extend(shortfalls);
}

/// The pod identities a rule can name, grouped by namespace with the namespace's labels, gathered
/// once per compilation: a selector is matched once per identity (pods with the same namespace,
/// labels and ports share one), and only in the namespaces a peer's namespace part admits.
struct PeerIndex<'a> {
    namespaces: BTreeMap<&'a str, NamespaceIdentities<'a>>,
    identities: &'a Identities,
    /// Every pod identity, in key order: the positions [`LabelIndex`] gives.
    all: Vec<(u32, &'a PodIdentityKey)>,
    /// `None`: no index and no memo, every peer by a scan.
    labels: Option<&'a LabelIndex>,
    /// Peers resolved so far, by namespace selector then pod selector: policies of many
    /// namespaces repeat the same peers (DNS, monitoring).
    resolved: RefCell<HashMap<Selector, HashMap<Selector, Found<'a>>>>,
}

/// Resolved peers: identity and target.
type Found<'a> = Vec<(u32, Target<'a>)>;

/// The pod identities of one namespace.
struct NamespaceIdentities<'a> {
    labels: std::borrow::Cow<'a, crate::model::Labels>,
    pods: Vec<(u32, &'a PodIdentityKey)>,
}

impl<'a> PeerIndex<'a> {
    fn new(
        state: &'a ClusterState,
        identities: &'a Identities,
        labels: Option<&'a LabelIndex>,
    ) -> Self {
        let mut namespaces: BTreeMap<&str, NamespaceIdentities<'_>> = BTreeMap::new();
        let all: Vec<(u32, &PodIdentityKey)> =
            identities.pods.iter().map(|(k, id)| (*id, &**k)).collect();
        for &(id, key) in &all {
            let ns = key.namespace.as_str();
            namespaces
                .entry(ns)
                .or_insert_with(|| NamespaceIdentities {
                    labels: state.namespace_labels(ns),
                    pods: Vec::new(),
                })
                .pods
                .push((id, key));
        }
        PeerIndex {
            namespaces,
            identities,
            all,
            labels,
            resolved: RefCell::default(),
        }
    }

    /// The rules of `p` in the directions it isolates, peers resolved (once per rule: they depend
    /// on the policy alone).
    fn rules<'p>(&self, p: &'p ParsedPolicy<'_>) -> Vec<ResolvedRule<'a>>
    where
        'p: 'a,
    {
        p.rules
            .iter()
            .filter(|r| p.isolates(r.direction))
            .map(|r| ResolvedRule {
                direction: r.direction,
                code: rule_code::of(r.direction, r.index),
                targets: self.resolve(p, &r.peers),
                ports: &r.ports,
            })
            .collect()
    }

    fn resolve(&self, policy: &ParsedPolicy<'_>, peers: &Option<Vec<Peer>>) -> Vec<Target<'a>> {
        let Some(peers) = peers else {
            return vec![Target::Any];
        };
        let mut targets = BTreeMap::new();
        for peer in peers {
            match peer {
                Peer::Pods {
                    namespaces: NamespaceMatch::Same,
                    pods,
                } => {
                    let own = self.namespaces.get(policy.policy.key.namespace.as_str());
                    for (id, key) in own.into_iter().flat_map(|n| &n.pods) {
                        if pods.matches(&key.labels) {
                            targets.insert(*id, Target::Pod(*id, key));
                        }
                    }
                }
                Peer::Pods {
                    namespaces: NamespaceMatch::Selector(ns),
                    pods,
                } => targets.extend(self.pods_matching(ns, pods)),
                Peer::IpBlock { cidr, except } => targets.extend(self.in_block(cidr, except)),
            }
        }
        targets.into_values().collect()
    }

    /// The pods of the namespaces `namespaces` selects that `pods` selects: [`Target::AllPods`]
    /// when both select everything.
    fn pods_matching(&self, namespaces: &Selector, pods: &Selector) -> Vec<(u32, Target<'a>)> {
        let Some(labels) = self.labels else {
            return self.scan_pods(namespaces, pods);
        };
        let known = self
            .resolved
            .borrow()
            .get(namespaces)
            .and_then(|m| m.get(pods))
            .cloned();
        if let Some(found) = known {
            return found;
        }
        let found = self.resolve_pods(labels, namespaces, pods);
        let mut resolved = self.resolved.borrow_mut();
        let by_pods = resolved.entry(namespaces.clone()).or_default();
        by_pods.insert(pods.clone(), found.clone());
        found
    }

    /// [`Self::pods_matching`], worked out: through the label index when the identities with the
    /// pod selector's rarest label are fewer than those of the admitted namespaces.
    fn resolve_pods(
        &self,
        labels: &LabelIndex,
        namespaces: &Selector,
        pods: &Selector,
    ) -> Vec<(u32, Target<'a>)> {
        if namespaces.is_empty() && pods.is_empty() {
            return vec![(identity::ALL_PODS, Target::AllPods)];
        }
        let admitted: BTreeMap<&str, &NamespaceIdentities<'a>> = self
            .namespaces
            .iter()
            .filter(|(_, n)| namespaces.matches(&n.labels))
            .map(|(name, n)| (*name, n))
            .collect();
        let in_admitted: usize = admitted.values().map(|n| n.pods.len()).sum();
        let target = |&(id, key): &(u32, &'a PodIdentityKey)| (id, Target::Pod(id, key));
        match labels.candidates(pods) {
            Some(candidates) if candidates.len() < in_admitted => candidates
                .into_iter()
                .map(|position| self.all[position as usize])
                .filter(|(_, key)| {
                    pods.matches(&key.labels) && admitted.contains_key(key.namespace.as_str())
                })
                .map(|p| target(&p))
                .collect(),
            _ => admitted
                .values()
                .flat_map(|n| &n.pods)
                .filter(|(_, key)| pods.matches(&key.labels))
                .map(target)
                .collect(),
        }
    }

    /// [`Self::pods_matching`] by a scan of every identity of the admitted namespaces.
    fn scan_pods(&self, namespaces: &Selector, pods: &Selector) -> Vec<(u32, Target<'a>)> {
        if namespaces.is_empty() && pods.is_empty() {
            return vec![(identity::ALL_PODS, Target::AllPods)];
        }
        self.namespaces
            .values()
            .filter(|n| namespaces.matches(&n.labels))
            .flat_map(|n| &n.pods)
            .filter(|(_, key)| pods.matches(&key.labels))
            .map(|(id, key)| (*id, Target::Pod(*id, key)))
            .collect()
    }

    /// The CIDR identities inside `cidr` and outside `except`.
    fn in_block(&self, cidr: &Prefix, except: &[Prefix]) -> Vec<(u32, Target<'a>)> {
        self.identities
            .cidrs
            .iter()
            .filter(|(prefix, _)| {
                prefix.is_v4() == cidr.is_v4()
                    && cidr.contains(prefix)
                    && !except.iter().any(|e| e.contains(prefix))
            })
            .map(|(_, id)| (*id, Target::Cidr(*id)))
            .collect()
    }

    /// The ranked ClusterNetworkPolicy rules with their peers resolved.
    fn tier_rules<'p>(&self, ranked: tiers::Ranked<'p>) -> Vec<tiers::ResolvedTierRule<'a>>
    where
        'p: 'a,
    {
        let targets = |found: Vec<(u32, Target<'a>)>| found.into_iter().map(|(_, t)| t).collect();
        tiers::resolve(
            ranked,
            |ns, pods| targets(self.pods_matching(ns, pods)),
            |networks| {
                let mut found = BTreeMap::new();
                for n in networks {
                    found.extend(self.in_block(n, &[]));
                }
                found.into_values().collect()
            },
        )
    }
}

/// The ipBlock prefixes of every policy, numbered.
fn cidr_identities(
    state: &ClusterState,
    parsed: &[ParsedPolicy<'_>],
    networks: impl Iterator<Item = Prefix>,
) -> BTreeMap<Prefix, u32> {
    let mut prefixes: BTreeSet<Prefix> = networks.collect();
    for rule in parsed.iter().flat_map(|p| &p.rules) {
        let named = rule.ports.iter().any(|p| matches!(p, PortMatch::Named(..)));
        for peer in rule.peers.iter().flatten() {
            if let Peer::IpBlock { cidr, except } = peer {
                prefixes.insert(*cidr);
                prefixes.extend(except.iter().copied());
                if named && rule.direction == Direction::Egress {
                    prefixes.extend(pod_hosts_in(state, cidr, except));
                }
            }
        }
    }
    // IPv4 addresses are IPv4-mapped IPv6 keys, so a short IPv6 prefix such as ::/0 would be their
    // longest match; the IPv4 0.0.0.0/0 prefix keeps them apart (IPv6 rules never match it).
    if prefixes
        .iter()
        .any(|p| !p.is_v4() && p.contains(&Prefix::all_v4()))
    {
        prefixes.insert(Prefix::all_v4());
    }
    crate::model::identity::number_cidrs(prefixes)
}

/// IPCACHE entries of every peer pod address, in one pass over the pods in name order.
fn pod_ipcache(
    input: &CompileInput<'_>,
    numbers: &BTreeMap<Arc<PodIdentityKey>, u32>,
) -> BTreeMap<IpKey, IpInfo> {
    let mut ipcache = BTreeMap::new();
    for pod in input.state.peer_pods() {
        let Some(&identity) = numbers.get(&PodIdentityKey::of(pod)) else {
            continue;
        };
        let endpoint = input.endpoints.get(&pod.key).copied().unwrap_or(0);
        for ip in &pod.ips {
            let info = IpInfo { identity, endpoint };
            ipcache
                .entry(ip_key(*ip))
                // Two pods claiming one address: the local one keeps it, for the anti-spoofing check.
                .and_modify(|old: &mut IpInfo| {
                    if old.endpoint == 0 {
                        *old = info;
                    }
                })
                .or_insert(info);
        }
    }
    ipcache
}

/// The node's own addresses as [`identity::HOST`], where no pod claims them.
fn add_host_addrs(input: &CompileInput<'_>, ipcache: &mut BTreeMap<IpKey, IpInfo>) {
    for addr in input.host_addrs {
        // A pod address wins over a host address: HOST is allowed everywhere, the pod is not.
        ipcache.entry(ip_key(*addr)).or_insert(IpInfo {
            identity: identity::HOST,
            endpoint: 0,
        });
    }
}

/// What every rule's emission reads.
struct EmitContext<'a> {
    identities: &'a Identities,
    /// [`host_ports`].
    host_ports: BTreeMap<u32, Option<Vec<NamedPort>>>,
}

/// A local endpoint whose pod is known.
struct EndpointAt<'a> {
    endpoint: u32,
    pod: &'a Pod,
}

/// Writes the entries of the ClusterNetworkPolicy rules whose policies select the endpoint's pod
/// (kept per key by precedence, folded later); returns the tier flags they set.
fn emit_tier_rules(
    entries: &mut BTreeMap<(PolicyKey, u32), PolicyValue>,
    at: EndpointAt<'_>,
    state: &ClusterState,
    rules: &[tiers::ResolvedTierRule<'_>],
    ctx: &EmitContext<'_>,
) -> u32 {
    let namespace_labels = state.namespace_labels(&at.pod.key.namespace);
    let mut flags = 0;
    for r in rules {
        if !r.policy.subject.selects(at.pod, &namespace_labels) {
            continue;
        }
        flags |= r.flag();
        let to = Emit {
            endpoint: at.endpoint,
            direction: r.rule.direction,
            key_direction: r.key_direction(),
            rule: r.value,
            local_pod: Some(at.pod),
        };
        let mut insert = |key, value| tiers::put_first(entries, key, value);
        emit_rule(&mut insert, to, &r.targets, &r.rule.ports, ctx);
    }
    flags
}

/// What one rule is being emitted for.
struct Emit<'a> {
    endpoint: u32,
    direction: Direction,
    /// The `direction` byte of the keys: the direction, or a tier's (`netpol_common::tier`).
    key_direction: u8,
    /// The rule the entries come from (their value).
    rule: PolicyValue,
    /// The endpoint's pod, whose named ports ingress rules resolve against.
    local_pod: Option<&'a Pod>,
}

/// The host prefixes (/32, /128) of the peer pods' addresses inside `cidr` and outside `except`:
/// an egress rule to an ipBlock with a named port resolves the name on each such pod, through an
/// identity of the pod's address alone (a pod identity would also cover the pod's addresses of the
/// other family, or other pods with its labels, outside the block).
fn pod_hosts_in<'a>(
    state: &'a ClusterState,
    cidr: &'a Prefix,
    except: &'a [Prefix],
) -> impl Iterator<Item = Prefix> + 'a {
    state
        .peer_pods()
        .flat_map(|p| p.ips.iter())
        .map(|ip| Prefix::host(ip_key(*ip)))
        .filter(move |h| cidr.contains(h) && !except.iter().any(|e| e.contains(h)))
}

/// The named ports behind each host-prefix identity that is one peer pod's address (an address two
/// pods claim has none).
fn host_ports(
    state: &ClusterState,
    identities: &Identities,
) -> BTreeMap<u32, Option<Vec<NamedPort>>> {
    let mut out: BTreeMap<u32, Option<Vec<NamedPort>>> = BTreeMap::new();
    // Rarely any: a pass over every pod's addresses only when a policy names a host prefix.
    if !identities.cidrs.keys().any(Prefix::is_host) {
        return out;
    }
    for pod in state.peer_pods() {
        for ip in &pod.ips {
            if let Some(id) = identities.cidrs.get(&Prefix::host(ip_key(*ip))) {
                out.entry(*id)
                    .and_modify(|p| *p = None)
                    .or_insert_with(|| Some(pod.ports.clone()));
            }
        }
    }
    out
}

/// Writes the entries of one rule through `insert` (key, prefix length, value).
fn emit_rule(
    insert: &mut dyn FnMut((PolicyKey, u32), PolicyValue),
    at: Emit<'_>,
    targets: &[Target<'_>],
    ports: &[PortMatch],
    ctx: &EmitContext<'_>,
) {
    let (identities, host_ports) = (ctx.identities, &ctx.host_ports);
    let mut put = |identity: u32, protocol: u8, port: u16, len: u32| {
        let key = PolicyKey {
            endpoint: at.endpoint,
            identity,
            direction: at.key_direction,
            protocol,
            port_be: port.to_be_bytes(),
        };
        insert((key, len), at.rule);
    };
    for port in ports {
        for target in targets {
            let identity = match target {
                Target::Any => identity::ANY,
                Target::AllPods => identity::ALL_PODS,
                Target::Pod(id, _) | Target::Cidr(id) => *id,
            };
            match port {
                PortMatch::AnyProtocol => put(identity, 0, 0, POLICY_PREFIX_ANY_PROTOCOL),
                PortMatch::AnyPort(proto) => {
                    put(identity, proto.number(), 0, POLICY_PREFIX_ANY_PORT)
                }
                PortMatch::Range(proto, lo, hi) => {
                    for (first, len) in port_range_prefixes(*lo, *hi) {
                        put(identity, proto.number(), first, len);
                    }
                }
                PortMatch::Named(proto, name) => match (at.direction, target) {
                    // The local pod receives the connection.
                    (Direction::Ingress, _) => {
                        if let Some(n) = at.local_pod.and_then(|p| p.named_port(name, *proto)) {
                            put(identity, proto.number(), n, POLICY_PREFIX_FULL);
                        }
                    }
                    // The peer receives it: each pod identity carries its ports.
                    (Direction::Egress, Target::Pod(id, key)) => {
                        if let Some(n) = resolve_named(key, name, *proto) {
                            put(*id, proto.number(), n, POLICY_PREFIX_FULL);
                        }
                    }
                    (Direction::Egress, Target::Any | Target::AllPods) => {
                        for (key, id) in identities.pods.iter() {
                            if let Some(n) = resolve_named(key, name, *proto) {
                                put(*id, proto.number(), n, POLICY_PREFIX_FULL);
                            }
                        }
                    }
                    // A pod's own address inside the block: its port of that name.
                    (Direction::Egress, Target::Cidr(id)) => {
                        let port = host_ports
                            .get(id)
                            .and_then(Option::as_deref)
                            .and_then(|p| crate::model::resolve_named_port(p, name, *proto));
                        if let Some(n) = port {
                            put(*id, proto.number(), n, POLICY_PREFIX_FULL);
                        }
                    }
                },
            }
        }
    }
}

fn resolve_named(key: &PodIdentityKey, name: &str, protocol: Protocol) -> Option<u16> {
    key.ports
        .iter()
        .find(|p| p.name == name && p.protocol == protocol)
        .map(|p| p.port)
}
