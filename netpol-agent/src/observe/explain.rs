//! `netpol-agent explain`: why a connection is allowed or denied, and by which policy and rule.
//!
//! Not a second model of NetworkPolicy: every answer is the compiler's output read through the
//! datapath's lookup model, for the whole state (the verdict), for each policy alone (which ones
//! isolate the pod) and for each of their rules alone (which ones allow the connection).

use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::compiler::tiers;
use crate::compiler::{self, CompileInput, PendingRule};
use crate::datapath::Capacities;
use crate::datapath::lookup::Decided;
use crate::model::mode::Mode;
use crate::model::{ClusterState, Pod, PodKey, Policy, Protocol};
use netpol_common::{Direction, PolicyValue, endpoint_flags};

/// The endpoint id the explained pod gets in its compilations.
const ENDPOINT: u32 = 1;

/// One end of the connection: a pod (`namespace/name`) or an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Party {
    Pod(PodKey),
    Address(IpAddr),
}

impl std::str::FromStr for Party {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse() {
            return Ok(Party::Address(ip));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Party::Pod(PodKey::new(ns, name)))
            }
            _ => Err(format!("{s:?} is neither namespace/pod nor an IP address")),
        }
    }
}

/// The connection to explain.
#[derive(Clone, Debug)]
pub struct Query {
    pub from: Party,
    pub to: Party,
    pub protocol: Protocol,
    pub port: u16,
    /// The mode of policies that set none (the agent's `--default-mode`).
    pub default_mode: Mode,
}

/// Allowed or denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allowed,
    Denied,
}

impl Verdict {
    fn of(allowed: bool) -> Self {
        if allowed {
            Verdict::Allowed
        } else {
            Verdict::Denied
        }
    }
}

/// What one pod's policies say about the connection, in one direction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Side {
    pub pod: String,
    /// `egress` (at the client) or `ingress` (at the server).
    pub direction: &'static str,
    pub verdict: Verdict,
    /// The policies that isolate the pod in this direction and decide: the enforced ones, or the
    /// audited ones when none enforces.
    pub isolated_by: Vec<String>,
    /// Those policies are in audit mode: a denial passes, recorded as a would-be drop.
    pub audit: bool,
    /// The rules that allow the connection: `namespace/policy egress[0]`.
    pub allowed_by: Vec<String>,
    pub reason: String,
    /// What the running agent's datapath decides (`--live`, for a pod on its node).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datapath: Option<Verdict>,
}

/// The running agent's datapath beside the compiler's answer (`--live`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Live {
    pub node: String,
    /// The policy generation whose buffer was read.
    pub generation: u32,
    /// The sides where the datapath decides otherwise than the compiler.
    pub disagreements: Vec<String>,
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub verdict: Verdict,
    pub from: String,
    pub to: String,
    /// The addresses the connection goes between.
    pub source: IpAddr,
    pub destination: IpAddr,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    pub port: u16,
    /// At the client pod; absent when the client is not a pod.
    pub egress: Option<Side>,
    /// At the server pod; absent when the server is not a pod (or is reached through a Service,
    /// whose backends are judged at their own veths).
    pub ingress: Option<Side>,
    /// The Service whose ClusterIP the connection goes to, judged on its backends.
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live: Option<Live>,
    /// IP protocol number.
    #[serde(skip)]
    protocol_number: u8,
}

impl Explanation {
    /// Reads each side whose pod has an endpoint on `node` (`ifindex_of`, by `namespace/name`)
    /// in the datapath's maps `maps` (the buffer of `generation`), and notes where they disagree
    /// with the compiler.
    pub fn compare_live(
        &mut self,
        node: &str,
        generation: u32,
        maps: &crate::datapath::Contents,
        ifindex_of: &std::collections::BTreeMap<String, u32>,
    ) {
        let mut disagreements = Vec::new();
        let (source, destination) = (self.source, self.destination);
        let (protocol, port) = (self.protocol_number, self.port);
        let sides = [
            (self.egress.as_mut(), Direction::Egress, destination),
            (self.ingress.as_mut(), Direction::Ingress, source),
        ];
        for (side, direction, peer) in sides {
            let Some(side) = side else { continue };
            let Some(&ifindex) = ifindex_of.get(&side.pod) else {
                continue;
            };
            let live = Verdict::of(maps.allows(ifindex, peer, direction, protocol, port));
            side.datapath = Some(live);
            if live != side.verdict {
                disagreements.push(format!(
                    "{} at {}: the compiler says {:?}, the datapath on {node} {:?}",
                    side.direction, side.pod, side.verdict, live
                ));
            }
        }
        self.live = Some(Live {
            node: node.to_owned(),
            generation,
            disagreements,
        });
    }
}

/// Why a query cannot be answered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExplainError {
    #[error("pod {0} is not in the cluster state")]
    UnknownPod(PodKey),
    #[error("pod {0} has no address (of the family of the other end)")]
    NoAddress(PodKey),
}

/// Explains `q` against `state`.
pub fn explain(state: &ClusterState, q: &Query) -> Result<Explanation, ExplainError> {
    let (to_pod, destination) = resolve(state, &q.to, None)?;
    let (from_pod, source) = resolve(state, &q.from, Some(destination))?;
    let protocol = q.protocol.number();
    let at = |pod, direction, peer| Probe {
        pod,
        direction,
        peer,
        protocol,
        port: q.port,
        default_mode: q.default_mode,
    };
    let egress = from_pod.map(|p| side(state, at(p, Direction::Egress, destination)));
    let service = service_of(state, destination);
    let ingress = match (to_pod, &service) {
        (Some(p), None) => Some(side(state, at(p, Direction::Ingress, source))),
        _ => None,
    };
    let allowed = [&egress, &ingress]
        .iter()
        .all(|s| s.as_ref().is_none_or(|s| s.verdict == Verdict::Allowed));
    Ok(Explanation {
        verdict: Verdict::of(allowed),
        from: party_name(&q.from),
        to: party_name(&q.to),
        source,
        destination,
        protocol: super::flows::protocol_name(protocol).to_uppercase(),
        port: q.port,
        egress,
        ingress,
        service,
        live: None,
        protocol_number: protocol,
    })
}

fn party_name(p: &Party) -> String {
    match p {
        Party::Pod(k) => k.to_string(),
        Party::Address(ip) => ip.to_string(),
    }
}

/// The pod (if one) and address of a party; a pod's address of `family_of`'s family when given,
/// else its IPv4 one when it has one.
fn resolve<'a>(
    state: &'a ClusterState,
    party: &Party,
    family_of: Option<IpAddr>,
) -> Result<(Option<&'a Pod>, IpAddr), ExplainError> {
    let key = match party {
        // A pod's address is that pod (of the family the address picks).
        Party::Address(ip) => {
            let pod = state
                .pods
                .values()
                .find(|p| p.is_policy_peer() && p.ips.contains(ip));
            return Ok((pod.map(Arc::as_ref), *ip));
        }
        Party::Pod(key) => key,
    };
    let pod = state
        .pods
        .get(key)
        .ok_or_else(|| ExplainError::UnknownPod(key.clone()))?;
    let want_v4 = family_of.is_none_or(|a| a.is_ipv4());
    let ip = pod
        .ips
        .iter()
        .find(|ip| ip.is_ipv4() == want_v4)
        .or(if family_of.is_none() {
            pod.ips.first()
        } else {
            None
        })
        .copied()
        .ok_or_else(|| ExplainError::NoAddress(key.clone()))?;
    Ok((Some(pod), ip))
}

/// The Service whose ClusterIP `ip` is.
fn service_of(state: &ClusterState, ip: IpAddr) -> Option<String> {
    state
        .services
        .values()
        .find(|s| s.cluster_ips.contains(&ip))
        .map(|s| s.key.to_string())
}

/// One end of the connection, as [`side`] judges it.
#[derive(Clone, Copy)]
struct Probe<'a> {
    pod: &'a Pod,
    direction: Direction,
    peer: IpAddr,
    protocol: u8,
    port: u16,
    default_mode: Mode,
}

/// What the pod's policies say about its connection with the peer in the probe's direction.
fn side(state: &ClusterState, at: Probe<'_>) -> Side {
    let (pod, direction) = (at.pod, at.direction);
    let allows = |s: &ClusterState| {
        let c = compile_for(s, pod, at.default_mode);
        let allowed = c.allows(ENDPOINT, at.peer, direction, at.protocol, at.port);
        (c, allowed)
    };
    let (compiled, allowed) = allows(state);
    let decided = compiled.decision(ENDPOINT, at.peer, direction, at.protocol, at.port);
    if let Some(Decided::Tier { tier, action, rule }) = decided {
        return tier_side(state, at, (tier, action, rule));
    }
    let audit = compiled.endpoints[&ENDPOINT].flags & endpoint_flags::audit(direction) != 0;
    let deciding: Vec<&Policy> = compiled.isolating[&(ENDPOINT, direction)]
        .iter()
        .filter_map(|k| state.policies.get(k).map(Arc::as_ref))
        .collect();
    let allowed_by = deciding
        .iter()
        .flat_map(|p| {
            let rules = rule_count(p, direction);
            (0..rules)
                .filter(|i| allows(&only(state, p, Some((direction, *i)))).1)
                .map(|i| format!("{} {}[{i}]", p.key, direction_name(direction)))
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>();
    let isolated_by: Vec<String> = deciding.iter().map(|p| p.key.to_string()).collect();
    let mut reason = match (isolated_by.is_empty(), allowed, allowed_by.is_empty()) {
        (true, _, _) => format!(
            "no policy isolates {} for {}: everything is allowed",
            pod.key,
            direction_name(direction)
        ),
        (false, true, false) => format!("allowed by {}", allowed_by.join(", ")),
        (false, true, true) => "allowed by the policies together".to_owned(),
        (false, false, _) => format!(
            "isolated by {}, and no rule of theirs allows it",
            isolated_by.join(", ")
        ),
    };
    if audit && !allowed {
        reason.push_str(" (audit mode: the packets pass, recorded as would-be drops)");
    }
    Side {
        pod: pod.key.to_string(),
        direction: direction_name(direction),
        verdict: Verdict::of(allowed),
        isolated_by,
        audit,
        allowed_by,
        reason,
        datapath: None,
    }
}

/// The side a ClusterNetworkPolicy rule decided: `tier`, its `action` and `rule` (policy id and
/// rule code).
fn tier_side(
    state: &ClusterState,
    at: Probe<'_>,
    (tier, action, rule): (u8, u8, PolicyValue),
) -> Side {
    let policy = state
        .cluster_policies
        .values()
        .find(|p| tiers::cluster_policy_id(&p.name) == rule.policy);
    let name = policy.map_or_else(
        || format!("#{:08x}", rule.policy),
        |p| tiers::display_key(p).to_string(),
    );
    let mut rule_label = crate::observe::policies::rule_name(rule.rule).unwrap_or_default();
    if let Some(n) = policy.and_then(|p| tiers::rule_names(p).remove(&rule.rule)) {
        rule_label = format!("{rule_label} ({n})");
    }
    let tier_name = if tier == netpol_common::tier::ADMIN {
        "Admin"
    } else {
        "Baseline"
    };
    let accepted = action == netpol_common::tier::ACCEPT;
    let what = format!("{name} {rule_label}");
    Side {
        pod: at.pod.key.to_string(),
        direction: direction_name(at.direction),
        verdict: Verdict::of(accepted),
        isolated_by: vec![name.clone()],
        audit: false,
        allowed_by: if accepted {
            vec![what.clone()]
        } else {
            Vec::new()
        },
        reason: format!(
            "{} by {what}, the first matching rule of the ClusterNetworkPolicy {tier_name} tier",
            if accepted { "accepted" } else { "denied" }
        ),
        datapath: None,
    }
}

fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

fn rule_count(p: &Policy, d: Direction) -> usize {
    match d {
        Direction::Ingress => p.spec.ingress.as_ref().map_or(0, Vec::len),
        Direction::Egress => p.spec.egress.as_ref().map_or(0, Vec::len),
    }
}

/// `state` with `policy` as its only policy; with `rule`, that policy keeps only that rule of its
/// direction and none of the other (its isolation, `policyTypes`, unchanged).
fn only(state: &ClusterState, policy: &Policy, rule: Option<(Direction, usize)>) -> ClusterState {
    let mut s = state.clone();
    let mut p = policy.clone();
    if let Some((d, i)) = rule {
        let types = p.spec.policy_types.clone().unwrap_or_else(|| {
            let mut t = vec!["Ingress".to_owned()];
            if p.spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                t.push("Egress".to_owned());
            }
            t
        });
        p.spec.policy_types = Some(types);
        keep_rule(&mut p.spec.ingress, (d == Direction::Ingress).then_some(i));
        keep_rule(&mut p.spec.egress, (d == Direction::Egress).then_some(i));
    }
    s.policies = [(p.key.clone(), Arc::new(p))].into_iter().collect();
    s
}

/// Keeps only rule `i` of `rules` (none at all without an `i`).
fn keep_rule<T>(rules: &mut Option<Vec<T>>, i: Option<usize>) {
    *rules = match (rules.take(), i) {
        (Some(mut r), Some(i)) if i < r.len() => Some(vec![r.swap_remove(i)]),
        _ => None,
    };
}

/// Compiles `state` with `pod` as the one local endpoint, on its node.
fn compile_for(state: &ClusterState, pod: &Pod, default_mode: Mode) -> compiler::Compiled {
    let endpoints = [(pod.key.clone(), ENDPOINT)].into_iter().collect();
    compiler::compile(&CompileInput {
        state,
        node_name: pod.node_name.as_deref().unwrap_or_default(),
        endpoints: &endpoints,
        host_addrs: &[],
        links: &Default::default(),
        pending: &Default::default(),
        pending_rule: PendingRule::Drop,
        exits_guarded: true,
        capacities: Capacities::default(),
        default_mode,
    })
}

/// The explanation as text, one line per side.
pub fn render_text(e: &Explanation) -> String {
    let mut out = format!(
        "{} -> {} {} {}: {}\n",
        e.from,
        e.to,
        e.protocol,
        e.port,
        match e.verdict {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
        }
    );
    if let Some(svc) = &e.service {
        out.push_str(&format!(
            "  {} is the ClusterIP of Service {svc}: egress is judged on the backend kube-proxy picks, ingress at that backend\n",
            e.destination
        ));
    }
    for s in [&e.egress, &e.ingress].into_iter().flatten() {
        out.push_str(&format!("  {} at {}: {}", s.direction, s.pod, s.reason));
        if let Some(v) = s.datapath {
            out.push_str(&format!(" (datapath: {v:?})"));
        }
        out.push('\n');
    }
    if let Some(live) = &e.live {
        for d in &live.disagreements {
            out.push_str(&format!("  DISAGREEMENT: {d}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Namespace, Object, Origin};

    fn pod(ns: &str, name: &str, app: &str, ip: &str) -> Object {
        Object::Pod(Pod {
            key: PodKey::new(ns, name),
            labels: Arc::new([("app".to_owned(), app.to_owned())].into_iter().collect()),
            node_name: Some("n1".into()),
            host_network: false,
            phase: Some("Running".into()),
            ips: vec![ip.parse().unwrap()],
            ports: Vec::new(),
        })
    }

    fn policy(ns: &str, name: &str, spec: &str) -> Object {
        Object::Policy(Policy {
            key: PodKey::new(ns, name),
            origin: Origin::Api,
            spec: serde_yaml_ng::from_str(spec).unwrap(),
            mode: None,
        })
    }

    fn state(objects: Vec<Object>) -> ClusterState {
        let mut s = ClusterState::default();
        for ns in ["x", "y"] {
            s.insert(Object::Namespace(Namespace::implicit(ns)));
        }
        for o in objects {
            s.insert(o);
        }
        s
    }

    fn query(from: &str, to: &str, port: u16) -> Query {
        Query {
            from: from.parse().unwrap(),
            to: to.parse().unwrap(),
            protocol: Protocol::Tcp,
            port,
            default_mode: Mode::Enforce,
        }
    }

    const DENY_ALL: &str = "podSelector: {}\npolicyTypes: [Ingress, Egress]";

    fn cnp(name: &str, spec: &str) -> Object {
        let yaml = format!(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec: {spec}"
        );
        let o: crate::model::cluster_policy::ClusterNetworkPolicyObject =
            serde_yaml_ng::from_str(&yaml).unwrap();
        Object::ClusterPolicy(
            crate::model::cluster_policy::ClusterPolicy::from_object(&o, Origin::Api).unwrap(),
        )
    }

    #[test]
    fn names_the_cluster_policy_rule_that_decides() {
        let s = state(vec![
            pod("x", "a", "web", "10.42.0.5"),
            pod("y", "b", "db", "10.42.1.6"),
            policy(
                "y",
                "db-in",
                "podSelector: {}\ningress:\n- ports: [{port: 80}]",
            ),
            cnp(
                "guard",
                "{tier: Admin, priority: 10, subject: {namespaces: {}}, ingress: [{name: pass-web, action: Pass, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}}], protocols: [{tcp: {destinationPort: {number: 80}}}]}, {name: no-web, action: Deny, from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: x}}}]}]}",
            ),
        ]);
        let e = explain(&s, &query("x/a", "y/b", 5432)).unwrap();
        assert_eq!(e.verdict, Verdict::Denied);
        let inside = e.ingress.as_ref().unwrap();
        assert_eq!(inside.isolated_by, vec!["cnp:admin/guard"]);
        assert!(
            inside
                .reason
                .contains("denied by cnp:admin/guard ingress[1] (no-web)"),
            "{}",
            inside.reason
        );
        // Passed on port 80: the NetworkPolicy decides, and allows.
        let e = explain(&s, &query("x/a", "y/b", 80)).unwrap();
        assert_eq!(e.verdict, Verdict::Allowed);
        assert_eq!(e.ingress.unwrap().allowed_by, vec!["y/db-in ingress[0]"]);
    }

    #[test]
    fn names_the_isolating_policies_and_the_rule_that_allows() {
        let s = state(vec![
            pod("x", "a", "web", "10.42.0.5"),
            pod("y", "b", "db", "10.42.1.6"),
            policy("x", "deny-all", DENY_ALL),
            policy(
                "x",
                "web-out",
                "podSelector: {matchLabels: {app: web}}\negress:\n- ports: [{port: 53, protocol: UDP}]\n- to: [{namespaceSelector: {}}]\n  ports: [{port: 5432}]",
            ),
            policy(
                "y",
                "db-in",
                "podSelector: {}\ningress:\n- ports: [{port: 80}]",
            ),
        ]);
        let e = explain(&s, &query("x/a", "y/b", 5432)).unwrap();
        assert_eq!(e.verdict, Verdict::Denied);
        let out = e.egress.as_ref().unwrap();
        assert_eq!(out.verdict, Verdict::Allowed);
        assert_eq!(out.isolated_by, vec!["x/deny-all", "x/web-out"]);
        assert_eq!(out.allowed_by, vec!["x/web-out egress[1]"]);
        let inside = e.ingress.as_ref().unwrap();
        assert_eq!(inside.verdict, Verdict::Denied);
        assert_eq!(inside.isolated_by, vec!["y/db-in"]);
        assert!(inside.allowed_by.is_empty());
        assert!(render_text(&e).contains("isolated by y/db-in, and no rule"));

        let e = explain(&s, &query("x/a", "y/b", 80)).unwrap();
        assert_eq!(e.verdict, Verdict::Denied, "x/a may not send to port 80");
        assert_eq!(e.ingress.unwrap().allowed_by, vec!["y/db-in ingress[0]"]);
        let json = serde_json::to_value(explain(&s, &query("x/a", "y/b", 5432)).unwrap()).unwrap();
        assert_eq!(json["verdict"], "denied");
        assert_eq!(json["egress"]["verdict"], "allowed");
    }

    #[test]
    fn audited_policies_decide_only_where_none_is_enforced() {
        let staged = |name: &str, spec: &str| {
            let Object::Policy(mut p) = policy("y", name, spec) else {
                unreachable!()
            };
            p.mode = Some("audit".into());
            Object::Policy(p)
        };
        let objects = vec![
            pod("x", "a", "web", "10.42.0.5"),
            pod("y", "b", "db", "10.42.1.6"),
            staged("db-in", "podSelector: {}\ningress:\n- ports: [{port: 80}]"),
        ];
        let e = explain(&state(objects.clone()), &query("x/a", "y/b", 5432)).unwrap();
        let inside = e.ingress.as_ref().unwrap();
        assert_eq!(inside.verdict, Verdict::Denied);
        assert!(inside.audit);
        assert_eq!(inside.isolated_by, vec!["y/db-in"]);
        assert!(render_text(&e).contains("audit mode: the packets pass"));
        let e = explain(&state(objects.clone()), &query("x/a", "y/b", 80)).unwrap();
        assert_eq!(e.ingress.unwrap().allowed_by, vec!["y/db-in ingress[0]"]);

        let mut enforced = objects;
        enforced.push(policy("y", "deny-all", DENY_ALL));
        let e = explain(&state(enforced), &query("x/a", "y/b", 80)).unwrap();
        let inside = e.ingress.unwrap();
        assert_eq!(
            inside.verdict,
            Verdict::Denied,
            "the audited allow does not count"
        );
        assert!(!inside.audit);
        assert_eq!(inside.isolated_by, vec!["y/deny-all"]);
    }

    #[test]
    fn an_address_end_is_judged_only_at_the_pod_end() {
        let s = state(vec![
            pod("x", "a", "web", "10.42.0.5"),
            policy("x", "deny-all", DENY_ALL),
        ]);
        let e = explain(&s, &query("192.0.2.1", "x/a", 443)).unwrap();
        assert_eq!(e.verdict, Verdict::Denied);
        assert!(e.egress.is_none());
        assert_eq!(e.ingress.unwrap().isolated_by, vec!["x/deny-all"]);
        let e = explain(&s, &query("x/a", "x/a", 1)).unwrap();
        assert_eq!(e.source, e.destination);
        assert_eq!(
            explain(&s, &query("x/zz", "x/a", 1)).unwrap_err(),
            ExplainError::UnknownPod(PodKey::new("x", "zz"))
        );
        let open = state(vec![pod("x", "a", "web", "10.42.0.5")]);
        let e = explain(&open, &query("x/a", "192.0.2.1", 443)).unwrap();
        assert_eq!(e.verdict, Verdict::Allowed);
        assert!(e.egress.unwrap().reason.contains("no policy isolates"));
        assert!("x/a/b".parse::<Party>().is_err() && "nonsense".parse::<Party>().is_err());
    }

    #[test]
    fn a_cluster_ip_is_judged_on_its_backends() {
        use crate::model::service::{Service, ServicePort, TargetPort};
        let db = Service {
            key: PodKey::new("y", "db"),
            cluster_ips: vec!["10.43.0.20".parse().unwrap()],
            ports: vec![ServicePort {
                name: "pg".into(),
                protocol: Protocol::Tcp,
                port: 5432,
                target: TargetPort::Number(5432),
            }],
            selector: Some([("app".to_owned(), "db".to_owned())].into_iter().collect()),
        };
        let s = state(vec![
            pod("x", "a", "web", "10.42.0.5"),
            pod("y", "b", "db", "10.42.1.6"),
            policy("x", "deny-all", DENY_ALL),
            policy(
                "x",
                "to-db",
                "podSelector: {}\negress:\n- to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}]\n  ports: [{port: 5432}]",
            ),
            Object::Service(db),
        ]);
        let e = explain(&s, &query("x/a", "10.43.0.20", 5432)).unwrap();
        assert_eq!(e.service.as_deref(), Some("y/db"));
        assert_eq!(e.verdict, Verdict::Allowed);
        assert!(e.ingress.is_none());
        assert_eq!(e.egress.unwrap().allowed_by, vec!["x/to-db egress[0]"]);
        let e = explain(&s, &query("x/a", "10.43.0.20", 5433)).unwrap();
        assert_eq!(e.verdict, Verdict::Denied);
    }

    #[test]
    fn the_live_datapath_is_compared_side_by_side() {
        let s = state(vec![
            pod("x", "a", "web", "10.42.0.5"),
            pod("x", "b", "db", "10.42.0.6"),
            policy("x", "deny-all", DENY_ALL),
        ]);
        let mut e = explain(&s, &query("x/a", "x/b", 80)).unwrap();
        // A datapath that still runs an older state where nothing isolated x/b (x/a not local).
        let open_b = state(vec![
            pod("x", "a", "web", "10.42.0.5"),
            pod("x", "b", "db", "10.42.0.6"),
        ]);
        let maps =
            compile_for(&open_b, &open_b.pods[&PodKey::new("x", "b")], Mode::Enforce).contents();
        let local = [("x/b".to_owned(), ENDPOINT)].into_iter().collect();
        e.compare_live("n1", 7, &maps, &local);
        let live = e.live.as_ref().unwrap();
        assert_eq!(live.disagreements.len(), 1, "{live:?}");
        assert!(live.disagreements[0].starts_with("ingress at x/b"));
        assert_eq!(e.ingress.as_ref().unwrap().datapath, Some(Verdict::Allowed));
        assert_eq!(
            e.egress.as_ref().unwrap().datapath,
            None,
            "x/a is not on this node"
        );
        assert!(render_text(&e).contains("DISAGREEMENT: ingress at x/b"));
    }
}
