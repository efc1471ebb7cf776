//! ClusterNetworkPolicy: validation ([`parse`]) and the POLICY entries of its tiers ([`emit`]).
//!
//! Each rule gets a rank: policies of a tier in order of priority (then name, a deterministic
//! choice where the API leaves the order of equal priorities open), rules in the order written.
//! Per (endpoint, peer identity, tier, direction) the entries of every rule are written at their
//! port prefixes and then folded: each entry holds the rule of least rank among all entries that
//! cover it, so the datapath's longest-prefix match on one identity finds that identity's first
//! matching rule, and the least rank over the peer's identities is the tier's
//! (`netpol_common::tier`).
//!
//! Invalid input fails closed as the API says: a peer that is not understood (none or several
//! fields set, the experimental `nodes` and `domainNames`) makes an Accept rule match nothing and a
//! Deny or Pass rule match every peer; protocols that are not understood make an Accept match
//! nothing and a Deny or Pass match every port. An object whose tier, priority or subject is not
//! understood denies everything, both ways, to the pods it may select (all pods when the subject is
//! unreadable), in the Admin tier before every other rule.

use std::collections::BTreeMap;

use netpol_common::{
    Direction, POLICY_PREFIX_ANY_PROTOCOL, PolicyKey, PolicyValue, endpoint_flags, rule_code, tier,
};

use super::{CompileError, PolicyKind, PortMatch, Target, policy_id};
use crate::model::cluster_policy::{self as api, ClusterPolicy};
use crate::model::identity::Prefix;
use crate::model::selector::Selector;
use crate::model::{Labels, Pod, PodKey, Protocol};

/// Which pods a policy applies to.
#[derive(Clone, Debug)]
pub(super) struct Subject {
    pub namespaces: Selector,
    pub pods: Selector,
}

impl Subject {
    fn everything() -> Self {
        Subject {
            namespaces: Selector::everything(),
            pods: Selector::everything(),
        }
    }

    /// Whether the subject selects `pod` (host-network pods never: they have no endpoint).
    pub fn selects(&self, pod: &Pod, namespace_labels: &Labels) -> bool {
        !pod.host_network
            && self.namespaces.matches(namespace_labels)
            && self.pods.matches(&pod.labels)
    }
}

/// A validated peer.
#[derive(Clone, Debug)]
pub(super) enum TierPeer {
    Pods {
        namespaces: Selector,
        pods: Selector,
    },
    Networks(Vec<Prefix>),
    /// Every peer: a Deny or Pass peer that is not understood.
    Everything,
}

/// A validated rule.
#[derive(Clone, Debug)]
pub(super) struct TierRule {
    pub direction: Direction,
    pub index: u32,
    pub action: u8,
    pub peers: Vec<TierPeer>,
    pub ports: Vec<PortMatch>,
}

/// A validated ClusterNetworkPolicy.
#[derive(Clone, Debug)]
pub(super) struct ParsedCluster {
    /// Its tier, priority or subject is not understood: enforced as a Deny of everything, ahead
    /// of every valid policy.
    pub invalid: bool,
    pub id: u32,
    pub name: String,
    pub tier: u8,
    pub priority: u32,
    pub subject: Subject,
    pub rules: Vec<TierRule>,
    pub errors: Vec<CompileError>,
}

/// The key of a ClusterNetworkPolicy where keys of namespaced objects are expected (errors, ids):
/// an empty namespace, which no namespaced object has.
pub fn cluster_key(name: &str) -> PodKey {
    PodKey::new(String::new(), name.to_owned())
}

/// The id of a ClusterNetworkPolicy in flow records and hit counters.
pub fn cluster_policy_id(name: &str) -> u32 {
    policy_id(&cluster_key(name))
}

/// How observers name a ClusterNetworkPolicy where they name a NetworkPolicy `namespace/name`:
/// `cnp:admin/<name>` or `cnp:baseline/<name>` (no namespace has a colon, so no NetworkPolicy is
/// ever named so).
pub fn display_key(policy: &ClusterPolicy) -> PodKey {
    let tier = match policy.spec.tier.as_str() {
        "Admin" => "admin",
        "Baseline" => "baseline",
        _ => "invalid",
    };
    PodKey::new(format!("cnp:{tier}"), policy.name.clone())
}

/// The names the rules of `policy` have, by [`rule_code`] (unnamed rules left out).
pub fn rule_names(policy: &ClusterPolicy) -> BTreeMap<u32, String> {
    let spec = &policy.spec;
    [
        (Direction::Ingress, &spec.ingress),
        (Direction::Egress, &spec.egress),
    ]
    .into_iter()
    .flat_map(|(d, rules)| {
        rules
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.name.is_empty())
            .map(move |(i, r)| (rule_code::of(d, i as u32), r.name.clone()))
    })
    .collect()
}

/// The pods of `pods` (with their namespaces' labels from `state`) that `policy` selects.
pub fn selected<'a>(
    policy: &ClusterPolicy,
    state: &crate::model::ClusterState,
    pods: impl Iterator<Item = &'a Pod>,
) -> usize {
    let subject = parse(policy).subject;
    pods.filter(|p| subject.selects(p, &state.namespace_labels(&p.key.namespace)))
        .count()
}

struct Errors<'a> {
    policy: &'a ClusterPolicy,
    out: Vec<CompileError>,
}

impl Errors<'_> {
    fn push(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.out.push(CompileError {
            kind: PolicyKind::ClusterNetworkPolicy,
            policy: cluster_key(&self.policy.name),
            origin: self.policy.origin.clone(),
            field: field.into(),
            reason: reason.into(),
        });
    }

    fn selector(
        &mut self,
        s: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
        field: &str,
    ) -> Option<Selector> {
        Selector::parse(s, field)
            .map_err(|e| self.push(e.field, e.reason))
            .ok()
    }
}

/// Validates `policy`.
pub(super) fn parse(policy: &ClusterPolicy) -> ParsedCluster {
    let mut errs = Errors {
        policy,
        out: Vec::new(),
    };
    let spec = &policy.spec;
    let tier = match spec.tier.as_str() {
        "Admin" => Some(tier::ADMIN),
        "Baseline" => Some(tier::BASELINE),
        other => {
            errs.push(
                "spec.tier",
                format!("{other:?} is not a tier (expected Admin or Baseline)"),
            );
            None
        }
    };
    let priority = u32::try_from(spec.priority).ok().filter(|p| *p <= 1000);
    if priority.is_none() {
        errs.push(
            "spec.priority",
            format!("{} is not in 0-1000", spec.priority),
        );
    }
    let subject = parse_subject(&spec.subject, &mut errs);
    let mut parsed = ParsedCluster {
        invalid: false,
        id: cluster_policy_id(&policy.name),
        name: policy.name.clone(),
        tier: tier.unwrap_or(tier::ADMIN),
        priority: priority.unwrap_or(0),
        subject: subject.clone().unwrap_or_else(Subject::everything),
        rules: Vec::new(),
        errors: Vec::new(),
    };
    let object_ok = errs.out.is_empty();
    for (direction, rules) in [
        (Direction::Ingress, &spec.ingress),
        (Direction::Egress, &spec.egress),
    ] {
        for (i, rule) in rules.iter().enumerate() {
            let parsed_rule = parse_rule(rule, direction, i as u32, &mut errs);
            parsed.rules.push(parsed_rule);
        }
    }
    if !object_ok {
        // Tier, priority or subject not understood: deny everything to what it may select.
        parsed.invalid = true;
        parsed.tier = tier::ADMIN;
        parsed.priority = 0;
        parsed.rules = [Direction::Ingress, Direction::Egress]
            .into_iter()
            .map(|direction| TierRule {
                direction,
                index: 0,
                action: tier::DENY,
                peers: vec![TierPeer::Everything],
                ports: vec![PortMatch::AnyProtocol],
            })
            .collect();
    }
    parsed.errors = errs.out;
    parsed
}

fn parse_subject(subject: &api::Subject, errs: &mut Errors<'_>) -> Option<Subject> {
    match (&subject.namespaces, &subject.pods) {
        (Some(ns), None) => Some(Subject {
            namespaces: errs.selector(ns, "spec.subject.namespaces")?,
            pods: Selector::everything(),
        }),
        (None, Some(pods)) => {
            let (namespaces, pods) = parse_namespaced(pods, "spec.subject.pods", errs)?;
            Some(Subject { namespaces, pods })
        }
        (None, None) => {
            errs.push("spec.subject", "must set namespaces or pods");
            None
        }
        (Some(_), Some(_)) => {
            errs.push("spec.subject", "must set only one of namespaces and pods");
            None
        }
    }
}

fn parse_namespaced(
    p: &api::NamespacedPod,
    field: &str,
    errs: &mut Errors<'_>,
) -> Option<(Selector, Selector)> {
    let namespaces = errs.selector(&p.namespace_selector, &format!("{field}.namespaceSelector"));
    let pods = match &p.pod_selector {
        Some(s) => errs.selector(s, &format!("{field}.podSelector")),
        None => {
            errs.push(format!("{field}.podSelector"), "missing (required)");
            None
        }
    };
    Some((namespaces?, pods?))
}

fn parse_rule(
    rule: &api::Rule,
    direction: Direction,
    index: u32,
    errs: &mut Errors<'_>,
) -> TierRule {
    let (list, peers_name) = match direction {
        Direction::Ingress => ("spec.ingress", "from"),
        Direction::Egress => ("spec.egress", "to"),
    };
    let field = format!("{list}[{index}]");
    let action = match rule.action.as_str() {
        "Accept" => tier::ACCEPT,
        "Deny" => tier::DENY,
        "Pass" => tier::PASS,
        other => {
            errs.push(
                format!("{field}.action"),
                format!(
                    "{other:?} is not an action (expected Accept, Deny or Pass): enforced as Deny"
                ),
            );
            tier::DENY
        }
    };
    let (wrong, peers) = match direction {
        Direction::Ingress => (&rule.to, &rule.from),
        Direction::Egress => (&rule.from, &rule.to),
    };
    if wrong.is_some() {
        let other = if peers_name == "from" { "to" } else { "from" };
        errs.push(
            format!("{field}.{other}"),
            format!("not a field of {list} rules"),
        );
    }
    let failing = errs.out.len();
    let mut parsed_peers = Vec::new();
    match peers.as_deref() {
        None | Some([]) => errs.push(
            format!("{field}.{peers_name}"),
            "must list at least one peer",
        ),
        Some(peers) => {
            for (i, peer) in peers.iter().enumerate() {
                let at = format!("{field}.{peers_name}[{i}]");
                parsed_peers.extend(parse_peer(peer, direction, &at, errs));
            }
        }
    }
    let peers_ok = errs.out.len() == failing;
    let at = format!("{field}.protocols");
    let ports = parse_protocols(rule.protocols.as_deref(), &at, errs);
    let ports = no_named_port_to_networks(ports, &parsed_peers, &at, errs);
    let (action, peers, ports) = fail_closed(action, peers_ok, parsed_peers, ports);
    TierRule {
        direction,
        index,
        action,
        peers,
        ports,
    }
}

/// `ports`, or `None` (not understood) when they name a port by name and a peer is `networks`:
/// an address range has no container ports (the API forbids it; a Deny must not quietly match
/// nothing).
fn no_named_port_to_networks(
    ports: Option<Vec<PortMatch>>,
    peers: &[TierPeer],
    field: &str,
    errs: &mut Errors<'_>,
) -> Option<Vec<PortMatch>> {
    let named = ports
        .iter()
        .flatten()
        .any(|p| matches!(p, PortMatch::Named(..)));
    let networks = peers.iter().any(|p| matches!(p, TierPeer::Networks(_)));
    if named && networks {
        errs.push(
            field,
            "destinationNamedPort cannot be used with networks peers: the rule fails closed",
        );
        return None;
    }
    ports
}

/// What a rule with parts not understood is enforced as, as the API says: an Accept matches
/// nothing; a Deny or a Pass becomes a Deny of every peer on every port (a Pass of everything
/// would skip the tier's later Denies).
fn fail_closed(
    action: u8,
    peers_ok: bool,
    peers: Vec<TierPeer>,
    ports: Option<Vec<PortMatch>>,
) -> (u8, Vec<TierPeer>, Vec<PortMatch>) {
    match (peers_ok, ports) {
        (true, Some(ports)) => (action, peers, ports),
        _ if action == tier::ACCEPT => (action, Vec::new(), Vec::new()),
        _ => (
            tier::DENY,
            vec![TierPeer::Everything],
            vec![PortMatch::AnyProtocol],
        ),
    }
}

fn parse_peer(
    peer: &api::Peer,
    direction: Direction,
    field: &str,
    errs: &mut Errors<'_>,
) -> Option<TierPeer> {
    if peer.nodes.is_some() || peer.domain_names.is_some() {
        let which = if peer.nodes.is_some() {
            "nodes"
        } else {
            "domainNames"
        };
        errs.push(
            format!("{field}.{which}"),
            "experimental peer, not supported by this agent: the rule fails closed",
        );
        return None;
    }
    let set = [
        peer.namespaces.is_some(),
        peer.pods.is_some(),
        peer.networks.is_some(),
    ];
    if set.iter().filter(|s| **s).count() != 1 {
        errs.push(
            field,
            "must set exactly one of namespaces, pods and networks: the rule fails closed",
        );
        return None;
    }
    if let Some(ns) = &peer.namespaces {
        let namespaces = errs.selector(ns, &format!("{field}.namespaces"))?;
        return Some(TierPeer::Pods {
            namespaces,
            pods: Selector::everything(),
        });
    }
    if let Some(p) = &peer.pods {
        let (namespaces, pods) = parse_namespaced(p, &format!("{field}.pods"), errs)?;
        return Some(TierPeer::Pods { namespaces, pods });
    }
    let networks = peer.networks.as_deref().unwrap_or_default();
    if direction == Direction::Ingress {
        errs.push(format!("{field}.networks"), "not a peer of ingress rules");
        return None;
    }
    if networks.is_empty() {
        errs.push(format!("{field}.networks"), "must list at least one CIDR");
        return None;
    }
    let mut prefixes = Vec::new();
    for (i, n) in networks.iter().enumerate() {
        match n
            .parse::<ipnetwork::IpNetwork>()
            .ok()
            .filter(|_| n.contains('/'))
        {
            Some(net) => prefixes.push(Prefix::from_network(net)),
            None => {
                errs.push(
                    format!("{field}.networks[{i}]"),
                    format!("{n:?} is not a CIDR"),
                );
                return None;
            }
        }
    }
    Some(TierPeer::Networks(prefixes))
}

/// The port matches of `protocols` (every protocol and port when absent); `None` when any element is
/// not understood.
fn parse_protocols(
    protocols: Option<&[api::ProtocolMatch]>,
    field: &str,
    errs: &mut Errors<'_>,
) -> Option<Vec<PortMatch>> {
    let Some(protocols) = protocols else {
        return Some(vec![PortMatch::AnyProtocol]);
    };
    if protocols.is_empty() {
        errs.push(field, "must list at least one protocol when present");
        return None;
    }
    let mut out = Vec::new();
    let mut ok = true;
    for (i, p) in protocols.iter().enumerate() {
        let at = format!("{field}[{i}]");
        match parse_protocol(p, &at, errs) {
            Some(ports) => out.extend(ports),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn parse_protocol(
    p: &api::ProtocolMatch,
    field: &str,
    errs: &mut Errors<'_>,
) -> Option<Vec<PortMatch>> {
    let by_protocol = [
        (Protocol::Tcp, "tcp", &p.tcp),
        (Protocol::Udp, "udp", &p.udp),
        (Protocol::Sctp, "sctp", &p.sctp),
    ];
    let set = by_protocol.iter().filter(|(_, _, v)| v.is_some()).count()
        + usize::from(p.destination_named_port.is_some());
    if set != 1 {
        errs.push(
            field,
            "must set exactly one of tcp, udp, sctp and destinationNamedPort",
        );
        return None;
    }
    if let Some(name) = &p.destination_named_port {
        if !super::is_port_name(name) {
            errs.push(
                format!("{field}.destinationNamedPort"),
                format!("{name:?} is not a port name"),
            );
            return None;
        }
        // A container port name, whatever its protocol.
        return Some(
            [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
                .into_iter()
                .map(|proto| PortMatch::Named(proto, name.clone()))
                .collect(),
        );
    }
    let (protocol, sub, ports) = by_protocol.into_iter().find(|(_, _, v)| v.is_some())?;
    let at = format!("{field}.{sub}.destinationPort");
    let Some(port) = ports.as_ref().and_then(|p| p.destination_port.as_ref()) else {
        return Some(vec![PortMatch::AnyPort(protocol)]);
    };
    let number = |n: i64, sub: &str, errs: &mut Errors<'_>| {
        let ok = u16::try_from(n).ok().filter(|n| *n != 0);
        if ok.is_none() {
            errs.push(format!("{at}.{sub}"), format!("{n} is not in 1-65535"));
        }
        ok
    };
    match (port.number, &port.range) {
        (Some(n), None) => {
            let n = number(n, "number", errs)?;
            Some(vec![PortMatch::Range(protocol, n, n)])
        }
        (None, Some(r)) => {
            let (lo, hi) = (
                number(r.start, "range.start", errs)?,
                number(r.end, "range.end", errs)?,
            );
            if lo >= hi {
                errs.push(
                    format!("{at}.range"),
                    format!("start {lo} must be less than end {hi}"),
                );
                return None;
            }
            Some(vec![PortMatch::Range(protocol, lo, hi)])
        }
        _ => {
            errs.push(at, "must set exactly one of number and range");
            None
        }
    }
}

/// The ranked rules of every policy, by tier, in precedence order.
pub(super) struct Ranked<'a> {
    /// (rank, policy, rule) per tier, best first.
    pub rules: Vec<(u32, &'a ParsedCluster, &'a TierRule)>,
    /// The first policy whose rules went past the last rank (`tier::MAX_RANK`): from there on
    /// rules share it.
    pub saturated: Option<&'a ParsedCluster>,
}

/// Ranks the rules of `parsed`: invalid objects first, then by tier, priority, name, then rule
/// order.
pub(super) fn rank(parsed: &[ParsedCluster]) -> Ranked<'_> {
    let mut order: Vec<&ParsedCluster> = parsed.iter().collect();
    let order_key = |p: &&ParsedCluster| (p.tier, !p.invalid, p.priority, p.name.clone());
    order.sort_by_key(order_key);
    let mut rules = Vec::new();
    let mut next = [0u32; 3];
    let mut saturated = None;
    for p in order {
        for r in &p.rules {
            let n = &mut next[p.tier as usize];
            if *n > tier::MAX_RANK {
                saturated.get_or_insert(p);
            }
            rules.push((*n, p, r));
            *n = n.saturating_add(1);
        }
    }
    Ranked { rules, saturated }
}

/// The error of a policy whose rules share the last rank.
pub(super) fn saturation_error(p: &ParsedCluster, origin: crate::model::Origin) -> CompileError {
    CompileError {
        kind: PolicyKind::ClusterNetworkPolicy,
        policy: cluster_key(&p.name),
        origin,
        field: "spec".into(),
        reason: format!(
            "its tier has more than {} rules before these: they share the last place (between them Deny, then Pass, then Accept)",
            tier::MAX_RANK + 1
        ),
    }
}

/// The packed `rule` of a tier entry.
pub(super) fn packed(rank: u32, rule: &TierRule) -> u32 {
    tier::pack(rank, rule.action, rule_code::of(rule.direction, rule.index))
}

/// Keeps, per key, the rule that takes precedence.
pub(super) fn put_first(
    map: &mut BTreeMap<(PolicyKey, u32), PolicyValue>,
    key: (PolicyKey, u32),
    value: PolicyValue,
) {
    map.entry(key)
        .and_modify(|old| {
            if tier::precedes(value.rule, old.rule) {
                *old = value;
            }
        })
        .or_insert(value);
}

/// Folds every tier entry with the entries that cover it (shorter prefixes of the same endpoint,
/// identity and tier direction): each ends up with the rule of least rank among them, which is what
/// a longest-prefix match must find.
pub(super) fn fold(entries: &mut BTreeMap<(PolicyKey, u32), PolicyValue>) {
    let snapshot = entries.clone();
    for ((key, len), value) in entries.iter_mut() {
        for shorter in POLICY_PREFIX_ANY_PROTOCOL..*len {
            let covering = (super::services::key_prefix(key, shorter), shorter);
            if let Some(v) = snapshot.get(&covering)
                && tier::precedes(v.rule, value.rule)
            {
                *value = *v;
            }
        }
    }
}

/// A ranked rule with its peers resolved to identities.
pub(super) struct ResolvedTierRule<'a> {
    pub policy: &'a ParsedCluster,
    pub rule: &'a TierRule,
    /// The entries' value.
    pub value: PolicyValue,
    pub targets: Vec<Target<'a>>,
}

impl ResolvedTierRule<'_> {
    /// The endpoint flag the rule sets where its policy selects the pod.
    pub fn flag(&self) -> u32 {
        endpoint_flags::tiered(self.rule.direction, self.policy.tier)
    }

    /// The `direction` byte of its POLICY keys.
    pub fn key_direction(&self) -> u8 {
        tier::key_direction(self.rule.direction, self.policy.tier)
    }
}

/// Resolves the ranked rules' peers with `resolve` (pods and namespaces: `Some((namespaces, pods))`;
/// networks: their CIDR targets; every peer: [`Target::Any`]).
pub(super) fn resolve<'a>(
    ranked: Ranked<'a>,
    mut pods: impl FnMut(&Selector, &Selector) -> Vec<Target<'a>>,
    mut networks: impl FnMut(&[Prefix]) -> Vec<Target<'a>>,
) -> Vec<ResolvedTierRule<'a>> {
    ranked
        .rules
        .into_iter()
        .map(|(rank, policy, rule)| {
            let mut targets = Vec::new();
            for peer in &rule.peers {
                match peer {
                    TierPeer::Pods {
                        namespaces,
                        pods: p,
                    } => targets.extend(pods(namespaces, p)),
                    TierPeer::Networks(n) => targets.extend(networks(n)),
                    TierPeer::Everything => targets.push(Target::Any),
                }
            }
            ResolvedTierRule {
                policy,
                rule,
                value: PolicyValue {
                    policy: policy.id,
                    rule: packed(rank, rule),
                },
                targets,
            }
        })
        .collect()
}

/// The CIDR prefixes that tier rules name.
pub(super) fn network_prefixes(parsed: &[ParsedCluster]) -> impl Iterator<Item = Prefix> + '_ {
    parsed
        .iter()
        .flat_map(|p| &p.rules)
        .flat_map(|r| &r.peers)
        .flat_map(|peer| match peer {
            TierPeer::Networks(n) => n.as_slice(),
            _ => &[],
        })
        .copied()
}
