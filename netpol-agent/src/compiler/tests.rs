//! Semantics of the compiler, checked through [`Compiled::allows`] (the model of the datapath lookup)
//! rather than through map dumps. Each point has an allow and a deny case.

use std::collections::BTreeMap;
use std::net::IpAddr;

use netpol_common::Direction::{Egress, Ingress};
use netpol_common::proto::{ICMP, SCTP, TCP, UDP};
use netpol_common::{POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTOCOL, endpoint_flags, identity};

use super::*;
use crate::model::mode::Mode;
use crate::model::{NamedPort, Namespace, Object};

mod audit;
mod capacity;
mod incremental;
mod peers;
mod rule_codes;
mod tiers;
mod updates;

const NODE: &str = "node-a";

/// A cluster under construction. Pods on [`NODE`] get endpoints numbered from 10.
struct Cluster {
    /// Whether `tunnel_egress` guards every exit device (see [`CompileInput::exits_guarded`]).
    exits_guarded: bool,
    state: ClusterState,
    endpoints: BTreeMap<PodKey, u32>,
    host_addrs: Vec<IpAddr>,
    pending: PendingEndpoints,
    pending_rule: PendingRule,
    capacities: Capacities,
    default_mode: Mode,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> crate::model::Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Cluster {
    fn new() -> Self {
        let mut c = Cluster {
            exits_guarded: true,
            state: ClusterState::default(),
            endpoints: BTreeMap::new(),
            host_addrs: vec![ip("192.168.1.10")],
            pending: BTreeMap::new(),
            pending_rule: PendingRule::Drop,
            capacities: Capacities::default(),
            default_mode: Mode::Enforce,
        };
        c.namespace("default", &[]);
        c
    }

    fn namespace(&mut self, name: &str, l: &[(&str, &str)]) {
        let mut ns = Namespace::implicit(name);
        ns.labels.extend(labels(l));
        self.state.insert(Object::Namespace(ns));
    }

    fn pod_on(
        &mut self,
        node: &str,
        ns: &str,
        name: &str,
        l: &[(&str, &str)],
        ips: &[&str],
    ) -> &mut Pod {
        let key = PodKey::new(ns, name);
        let pod = Pod {
            key: key.clone(),
            labels: Arc::new(labels(l)),
            node_name: Some(node.into()),
            host_network: false,
            phase: Some("Running".into()),
            ips: ips.iter().map(|s| ip(s)).collect(),
            ports: Vec::new(),
        };
        if node == NODE {
            let next = 10 + self.endpoints.len() as u32;
            self.endpoints.insert(key.clone(), next);
        }
        self.state.insert(Object::Pod(pod));
        Arc::make_mut(self.state.pods.get_mut(&key).unwrap())
    }

    /// A pod on this node; returns its endpoint id.
    fn local(&mut self, ns: &str, name: &str, l: &[(&str, &str)], ips: &[&str]) -> u32 {
        self.pod_on(NODE, ns, name, l, ips);
        self.endpoints[&PodKey::new(ns, name)]
    }

    /// A pod on another node.
    fn remote(&mut self, ns: &str, name: &str, l: &[(&str, &str)], ips: &[&str]) -> &mut Pod {
        self.pod_on("node-b", ns, name, l, ips)
    }

    fn ports(&mut self, ns: &str, name: &str, ports: &[(&str, Protocol, u16)]) {
        let pod = Arc::make_mut(self.state.pods.get_mut(&PodKey::new(ns, name)).unwrap());
        pod.ports = ports
            .iter()
            .map(|(n, protocol, port)| NamedPort {
                name: n.to_string(),
                protocol: *protocol,
                port: *port,
            })
            .collect();
    }

    /// A policy from the YAML of its spec.
    fn policy(&mut self, ns: &str, name: &str, spec: &str) {
        self.state.insert(Object::Policy(Policy {
            key: PodKey::new(ns, name),
            origin: Origin::Api,
            spec: serde_yaml_ng::from_str(spec).unwrap(),
            mode: None,
        }));
    }

    /// Sets the mode annotation of a policy.
    fn policy_mode(&mut self, ns: &str, name: &str, mode: &str) {
        let key = PodKey::new(ns, name);
        Arc::make_mut(self.state.policies.get_mut(&key).unwrap()).mode = Some(mode.into());
    }

    /// Sets the mode annotation of a namespace.
    fn namespace_mode(&mut self, ns: &str, mode: &str) {
        self.state.namespaces.get_mut(ns).unwrap().mode = Some(mode.into());
    }

    fn compile(&self) -> Compiled {
        let c = compile(&CompileInput {
            state: &self.state,
            node_name: NODE,
            endpoints: &self.endpoints,
            host_addrs: &self.host_addrs,
            links: &BTreeMap::new(),
            pending: &self.pending,
            pending_rule: self.pending_rule,
            exits_guarded: self.exits_guarded,
            capacities: self.capacities,
            default_mode: self.default_mode,
        });
        check_invariants(&c);
        c
    }
}

/// What must hold of every compilation.
fn check_invariants(c: &Compiled) {
    for (key, len) in c.policy.keys() {
        assert!(
            (POLICY_PREFIX_ANY_PROTOCOL..=POLICY_PREFIX_FULL).contains(len),
            "bad prefix {len}"
        );
        assert!(c.endpoints.contains_key(&key.endpoint));
        assert_ne!(key.identity, identity::NONE);
        // The node is a rule peer only for a pending endpoint's egress (its one way out).
        if key.identity == identity::HOST {
            assert_ne!(
                c.endpoints[&key.endpoint].flags & endpoint_flags::PENDING,
                0
            );
            assert_eq!(key.direction, Egress as u8);
        }
    }
    for (net, len) in c.cidrs.keys() {
        assert_eq!(Prefix::new(*net, *len).addr(), *net, "host bits set");
    }
}

fn tcp_in(c: &Compiled, ep: u32, peer: &str, port: u16) -> bool {
    c.allows(ep, ip(peer), Ingress, TCP, port)
}

fn tcp_out(c: &Compiled, ep: u32, peer: &str, port: u16) -> bool {
    c.allows(ep, ip(peer), Egress, TCP, port)
}

fn flags(c: &Compiled, ep: u32) -> u32 {
    c.endpoints[&ep].flags
}

const BOTH: u32 = endpoint_flags::ISOLATED_INGRESS | endpoint_flags::ISOLATED_EGRESS;

/// A web pod on this node, a client pod on another node, in `default`.
fn web_and_client() -> (Cluster, u32) {
    let mut c = Cluster::new();
    let web = c.local("default", "web", &[("app", "web")], &["10.0.0.2"]);
    c.remote("default", "client", &[("app", "client")], &["10.0.1.2"]);
    (c, web)
}

#[test]
fn no_policy_means_not_isolated() {
    let (c, web) = web_and_client();
    let out = c.compile();
    assert_eq!(flags(&out, web), 0);
    assert!(tcp_in(&out, web, "1.2.3.4", 80));
    assert!(tcp_out(&out, web, "1.2.3.4", 80));
    assert!(out.policy.is_empty());
}

#[test]
fn default_policy_types_isolate_ingress_only() {
    let (mut c, web) = web_and_client();
    c.policy("default", "deny", "podSelector: {}");
    let out = c.compile();
    assert_eq!(flags(&out, web), endpoint_flags::ISOLATED_INGRESS);
    assert!(!tcp_in(&out, web, "10.0.1.2", 80));
    assert!(tcp_out(&out, web, "10.0.1.2", 80));
}

#[test]
fn egress_rules_add_the_egress_type_an_empty_list_does_not() {
    // As the API server defaults policyTypes: Egress only when there is at least one egress rule.
    let (mut c, web) = web_and_client();
    c.policy("default", "deny", "podSelector: {}\negress: []");
    let out = c.compile();
    assert_eq!(flags(&out, web), endpoint_flags::ISOLATED_INGRESS);
    assert!(tcp_out(&out, web, "10.0.1.2", 80));
    assert!(!tcp_in(&out, web, "10.0.1.2", 80));
    c.policy(
        "default",
        "deny",
        "podSelector: {}\negress: [{to: [{podSelector: {matchLabels: {app: nothing}}}]}]",
    );
    let out = c.compile();
    assert_eq!(flags(&out, web), BOTH);
    assert!(!tcp_out(&out, web, "10.0.1.2", 80));
}

#[test]
fn egress_only_policy() {
    let (mut c, web) = web_and_client();
    c.policy(
        "default",
        "out",
        "podSelector: {}\npolicyTypes: [Egress]\negress:\n- to:\n  - podSelector: {matchLabels: {app: client}}",
    );
    let out = c.compile();
    assert_eq!(flags(&out, web), endpoint_flags::ISOLATED_EGRESS);
    assert!(tcp_in(&out, web, "8.8.8.8", 80), "ingress not isolated");
    assert!(tcp_out(&out, web, "10.0.1.2", 80));
    assert!(!tcp_out(&out, web, "8.8.8.8", 53));
}

#[test]
fn rules_of_a_type_the_policy_does_not_have_are_ignored() {
    let (mut c, web) = web_and_client();
    c.policy(
        "default",
        "a",
        "podSelector: {}\npolicyTypes: [Egress]\negress: []",
    );
    // Ingress rules of an egress-only policy neither isolate nor allow.
    c.policy(
        "default",
        "b",
        "podSelector: {}\npolicyTypes: [Egress]\ningress: [{}]\negress: []",
    );
    let out = c.compile();
    assert_eq!(flags(&out, web), endpoint_flags::ISOLATED_EGRESS);
    assert!(out.policy.is_empty());
}

#[test]
fn pod_selector_picks_which_local_pods_are_isolated() {
    let (mut c, web) = web_and_client();
    let other = c.local("default", "other", &[("app", "other")], &["10.0.0.3"]);
    c.policy("default", "web", "podSelector: {matchLabels: {app: web}}");
    let out = c.compile();
    assert_eq!(flags(&out, web), endpoint_flags::ISOLATED_INGRESS);
    assert_eq!(flags(&out, other), 0);
    assert!(!tcp_in(&out, web, "10.0.1.2", 80));
    assert!(tcp_in(&out, other, "10.0.1.2", 80));
}

#[test]
fn policies_apply_in_their_namespace_only() {
    let (mut c, web) = web_and_client();
    c.namespace("prod", &[]);
    let prod_web = c.local("prod", "web", &[("app", "web")], &["10.0.0.5"]);
    c.policy("prod", "deny", "podSelector: {}");
    let out = c.compile();
    assert_eq!(flags(&out, web), 0);
    assert_eq!(flags(&out, prod_web), endpoint_flags::ISOLATED_INGRESS);
}

#[test]
fn allow_is_the_union_of_policies() {
    let mut c = Cluster::new();
    let web = c.local("default", "web", &[("app", "web")], &["10.0.0.2"]);
    c.remote("default", "a", &[("role", "a")], &["10.0.1.1"]);
    c.remote("default", "b", &[("role", "b")], &["10.0.1.2"]);
    c.remote("default", "x", &[("role", "x")], &["10.0.1.3"]);
    c.policy(
        "default",
        "from-a",
        "podSelector: {}\ningress:\n- from: [{podSelector: {matchLabels: {role: a}}}]\n  ports: [{port: 80}]",
    );
    c.policy(
        "default",
        "from-b",
        "podSelector: {matchLabels: {app: web}}\ningress:\n- from: [{podSelector: {matchLabels: {role: b}}}]",
    );
    let out = c.compile();
    assert!(tcp_in(&out, web, "10.0.1.1", 80));
    assert!(!tcp_in(&out, web, "10.0.1.1", 81));
    assert!(tcp_in(&out, web, "10.0.1.2", 81));
    assert!(!tcp_in(&out, web, "10.0.1.3", 80));
}

#[test]
fn rules_within_one_policy_are_ored() {
    let mut c = Cluster::new();
    let web = c.local("default", "web", &[("app", "web")], &["10.0.0.2"]);
    c.remote("default", "a", &[("role", "a")], &["10.0.1.1"]);
    c.remote("default", "b", &[("role", "b")], &["10.0.1.2"]);
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress:\n- from: [{podSelector: {matchLabels: {role: a}}}]\n  ports: [{port: 80}]\n- from: [{podSelector: {matchLabels: {role: b}}}]\n  ports: [{port: 443}]",
    );
    let out = c.compile();
    assert!(tcp_in(&out, web, "10.0.1.1", 80));
    assert!(
        !tcp_in(&out, web, "10.0.1.1", 443),
        "ports of one rule, peers of the other"
    );
    assert!(tcp_in(&out, web, "10.0.1.2", 443));
    assert!(!tcp_in(&out, web, "10.0.1.2", 80));
}

/// Namespaces `dev` (env=dev) and `prod` (env=prod), each with pods app=db and app=web elsewhere.
fn two_namespaces() -> (Cluster, u32) {
    let mut c = Cluster::new();
    c.namespace("dev", &[("env", "dev")]);
    c.namespace("prod", &[("env", "prod")]);
    let target = c.local("default", "target", &[("app", "target")], &["10.0.0.2"]);
    c.remote("dev", "db", &[("app", "db")], &["10.1.0.1"]);
    c.remote("dev", "web", &[("app", "web")], &["10.1.0.2"]);
    c.remote("prod", "db", &[("app", "db")], &["10.2.0.1"]);
    c.remote("prod", "web", &[("app", "web")], &["10.2.0.2"]);
    c.remote("default", "db", &[("app", "db")], &["10.0.1.1"]);
    (c, target)
}

#[test]
fn pod_selector_alone_means_own_namespace() {
    let (mut c, t) = two_namespaces();
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress:\n- from: [{podSelector: {matchLabels: {app: db}}}]",
    );
    let out = c.compile();
    assert!(tcp_in(&out, t, "10.0.1.1", 1));
    assert!(!tcp_in(&out, t, "10.1.0.1", 1));
    assert!(!tcp_in(&out, t, "10.2.0.1", 1));
}

#[test]
fn namespace_selector_alone_means_all_pods_there() {
    let (mut c, t) = two_namespaces();
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress:\n- from: [{namespaceSelector: {matchLabels: {env: prod}}}]",
    );
    let out = c.compile();
    assert!(tcp_in(&out, t, "10.2.0.1", 1));
    assert!(tcp_in(&out, t, "10.2.0.2", 1));
    assert!(!tcp_in(&out, t, "10.1.0.1", 1));
    assert!(!tcp_in(&out, t, "10.0.1.1", 1));
}

#[test]
fn empty_namespace_selector_means_every_namespace() {
    let (mut c, t) = two_namespaces();
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress:\n- from: [{namespaceSelector: {}}]",
    );
    let out = c.compile();
    for peer in ["10.0.1.1", "10.1.0.1", "10.2.0.2"] {
        assert!(tcp_in(&out, t, peer, 1), "{peer}");
    }
    assert!(!tcp_in(&out, t, "8.8.8.8", 1), "not outside the cluster");
}

/// Every pod of the cluster is one wildcard entry per port, whatever the number of pods; the node,
/// addresses outside the cluster and a pod created after the compilation that IPCACHE does not know
/// never match it. Egress to a named port still resolves the name on each pod.
#[test]
fn a_peer_of_every_pod_is_one_wildcard_entry() {
    let (mut c, t) = two_namespaces();
    c.ports("prod", "web", &[("http", Protocol::Tcp, 8080)]);
    c.policy(
        "default",
        "p",
        "podSelector: {}\npolicyTypes: [Ingress, Egress]\n\
         ingress:\n- from: [{namespaceSelector: {}, podSelector: {}}]\n  ports: [{port: 80}]\n\
         egress:\n- to: [{namespaceSelector: {}}]\n  ports: [{port: http}]",
    );
    let out = c.compile();
    let ingress: Vec<_> = out
        .policy
        .keys()
        .filter(|(k, _)| k.direction == Ingress as u8)
        .collect();
    assert_eq!(ingress.len(), 1, "{ingress:?}");
    assert_eq!(ingress[0].0.identity, identity::ALL_PODS);
    for peer in ["10.0.1.1", "10.1.0.1", "10.2.0.2"] {
        assert!(tcp_in(&out, t, peer, 80), "{peer}");
        assert!(!tcp_in(&out, t, peer, 81), "{peer} on another port");
    }
    for outsider in ["8.8.8.8", "10.9.9.9"] {
        assert!(!tcp_in(&out, t, outsider, 80), "{outsider} is no pod");
    }
    assert!(
        !tcp_out(&out, t, "192.168.1.10", 8080),
        "the node is no pod"
    );
    assert!(
        tcp_out(&out, t, "10.2.0.2", 8080),
        "the named port of prod/web"
    );
    assert!(
        !tcp_out(&out, t, "10.1.0.2", 8080),
        "dev/web has no port named http"
    );
    assert!(
        out.policy
            .keys()
            .all(|(k, _)| k.direction == Ingress as u8 || k.identity != identity::ALL_PODS),
        "named egress ports are per pod"
    );
}

#[test]
fn namespace_and_pod_selector_in_one_peer_are_anded() {
    let (mut c, t) = two_namespaces();
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {env: prod}}\n    podSelector: {matchLabels: {app: db}}",
    );
    let out = c.compile();
    assert!(tcp_in(&out, t, "10.2.0.1", 1));
    assert!(!tcp_in(&out, t, "10.2.0.2", 1), "prod web");
    assert!(!tcp_in(&out, t, "10.1.0.1", 1), "dev db");
    assert!(!tcp_in(&out, t, "10.0.1.1", 1), "default db");
}

#[test]
fn separate_peers_are_ored() {
    let (mut c, t) = two_namespaces();
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {env: prod}}\n  - podSelector: {matchLabels: {app: db}}",
    );
    let out = c.compile();
    assert!(tcp_in(&out, t, "10.2.0.1", 1));
    assert!(tcp_in(&out, t, "10.2.0.2", 1), "prod web, by namespace");
    assert!(tcp_in(&out, t, "10.0.1.1", 1), "default db, by pod");
    assert!(!tcp_in(&out, t, "10.1.0.1", 1), "dev db: neither");
}

#[test]
fn namespace_name_label_selects_namespaces_without_objects() {
    let mut c = Cluster::new();
    let t = c.local("default", "t", &[], &["10.0.0.2"]);
    // No Namespace object for `ghost`.
    c.remote("ghost", "p", &[], &["10.9.0.1"]);
    c.remote("other", "p", &[], &["10.9.0.2"]);
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress:\n- from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ghost}}}]",
    );
    let out = c.compile();
    assert!(tcp_in(&out, t, "10.9.0.1", 1));
    assert!(!tcp_in(&out, t, "10.9.0.2", 1));
}

#[test]
fn match_expressions_in_peer_selectors() {
    let (mut c, t) = two_namespaces();
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress:\n- from:\n  - namespaceSelector:\n      matchExpressions: [{key: env, operator: NotIn, values: [prod]}]\n    podSelector:\n      matchExpressions: [{key: app, operator: In, values: [db, cache]}]",
    );
    let out = c.compile();
    assert!(tcp_in(&out, t, "10.1.0.1", 1), "dev db");
    assert!(
        tcp_in(&out, t, "10.0.1.1", 1),
        "default has no env label: NotIn matches"
    );
    assert!(!tcp_in(&out, t, "10.2.0.1", 1), "prod db");
    assert!(!tcp_in(&out, t, "10.1.0.2", 1), "dev web");
}

#[test]
fn exists_and_does_not_exist_in_pod_selector() {
    let mut c = Cluster::new();
    let tagged = c.local("default", "tagged", &[("team", "x")], &["10.0.0.2"]);
    let plain = c.local("default", "plain", &[], &["10.0.0.3"]);
    c.policy(
        "default",
        "p",
        "podSelector: {matchExpressions: [{key: team, operator: Exists}]}",
    );
    c.policy(
        "default",
        "q",
        "podSelector: {matchExpressions: [{key: team, operator: DoesNotExist}]}\npolicyTypes: [Egress]",
    );
    let out = c.compile();
    assert_eq!(flags(&out, tagged), endpoint_flags::ISOLATED_INGRESS);
    assert_eq!(flags(&out, plain), endpoint_flags::ISOLATED_EGRESS);
}

#[test]
fn missing_or_empty_from_means_any_peer() {
    for (spec, name) in [
        (
            "podSelector: {}\ningress:\n- ports: [{port: 80}]",
            "missing",
        ),
        (
            "podSelector: {}\ningress:\n- from: []\n  ports: [{port: 80}]",
            "empty",
        ),
    ] {
        let (mut c, web) = web_and_client();
        c.policy("default", "p", spec);
        let out = c.compile();
        assert!(tcp_in(&out, web, "10.0.1.2", 80), "{name}");
        assert!(
            tcp_in(&out, web, "8.8.8.8", 80),
            "{name}: outside the cluster too"
        );
        assert!(!tcp_in(&out, web, "8.8.8.8", 81), "{name}");
        assert!(out.policy.keys().all(|(k, _)| k.identity == identity::ANY));
    }
}

#[test]
fn empty_rule_allows_everything() {
    let (mut c, web) = web_and_client();
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress: [{}]\negress: [{}]",
    );
    let out = c.compile();
    assert_eq!(flags(&out, web), BOTH);
    assert!(tcp_in(&out, web, "8.8.8.8", 80));
    assert!(out.allows(web, ip("8.8.8.8"), Ingress, ICMP, 0));
    assert!(out.allows(web, ip("8.8.8.8"), Egress, UDP, 53));
}

#[test]
fn empty_rule_list_allows_nothing() {
    let (mut c, web) = web_and_client();
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress: []\npolicyTypes: [Ingress, Egress]",
    );
    let out = c.compile();
    assert_eq!(flags(&out, web), BOTH);
    assert!(out.policy.is_empty());
    assert!(!tcp_in(&out, web, "10.0.1.2", 80));
    assert!(!tcp_out(&out, web, "10.0.1.2", 80));
}

#[test]
fn ip_block_with_except() {
    let (mut c, web) = web_and_client();
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress:\n- from: [{ipBlock: {cidr: 172.16.0.0/12, except: [172.17.0.0/16, 172.18.1.0/24]}}]",
    );
    let out = c.compile();
    assert!(tcp_in(&out, web, "172.16.0.1", 80));
    assert!(tcp_in(&out, web, "172.18.2.1", 80));
    assert!(tcp_in(&out, web, "172.31.255.255", 80));
    assert!(!tcp_in(&out, web, "172.17.5.5", 80));
    assert!(!tcp_in(&out, web, "172.18.1.7", 80));
    assert!(!tcp_in(&out, web, "172.32.0.1", 80));
    assert!(!tcp_in(&out, web, "10.0.1.2", 80), "pod outside the block");

    // One identity per prefix; only the cidr itself is allowed.
    assert_eq!(out.cidrs.len(), 3);
    let allowed: BTreeSet<u32> = out.policy.keys().map(|(k, _)| k.identity).collect();
    let cidr = out.identities.cidrs[&Prefix::from_network("172.16.0.0/12".parse().unwrap())];
    assert_eq!(allowed, BTreeSet::from([cidr]));
    assert!(
        out.cidrs
            .contains_key(&(IpKey::from_v4([172, 16, 0, 0]), 108))
    );
}

#[test]
fn ip_block_prefixes_are_shared_across_policies() {
    // Another policy's prefix inside this block must still count as inside it.
    let mut c = Cluster::new();
    let a = c.local("default", "a", &[("app", "a")], &["10.0.0.2"]);
    let b = c.local("default", "b", &[("app", "b")], &["10.0.0.3"]);
    c.policy(
        "default",
        "a",
        "podSelector: {matchLabels: {app: a}}\ningress:\n- from: [{ipBlock: {cidr: 10.0.0.0/8}}]",
    );
    c.policy(
        "default",
        "b",
        "podSelector: {matchLabels: {app: b}}\ningress:\n- from: [{ipBlock: {cidr: 10.1.0.0/16, except: [10.1.2.0/24]}}]",
    );
    let out = c.compile();
    for peer in ["10.1.0.1", "10.1.2.1", "10.200.0.1"] {
        assert!(tcp_in(&out, a, peer, 1), "{peer}");
    }
    assert!(tcp_in(&out, b, "10.1.0.1", 1));
    assert!(!tcp_in(&out, b, "10.1.2.1", 1));
    assert!(!tcp_in(&out, b, "10.200.0.1", 1));
    let a_ids: BTreeSet<u32> = out
        .policy
        .keys()
        .filter(|(k, _)| k.endpoint == a)
        .map(|(k, _)| k.identity)
        .collect();
    assert_eq!(a_ids.len(), 3, "10/8 contains 10.1/16 and 10.1.2/24");
}

#[test]
fn ip_block_matches_pod_addresses() {
    let (mut c, web) = web_and_client();
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress:\n- from: [{ipBlock: {cidr: 10.0.1.0/24}}]",
    );
    let out = c.compile();
    assert!(
        tcp_in(&out, web, "10.0.1.2", 80),
        "the client pod is in the block"
    );
}

#[test]
fn ipv6_and_dual_stack() {
    let mut c = Cluster::new();
    let web = c.local(
        "default",
        "web",
        &[("app", "web")],
        &["10.0.0.2", "fd00::2"],
    );
    c.remote(
        "default",
        "client",
        &[("app", "client")],
        &["10.0.1.2", "fd00:1::2"],
    );
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress:\n- from: [{podSelector: {matchLabels: {app: client}}}]\n- from: [{ipBlock: {cidr: '2001:db8::/32', except: ['2001:db8:1::/48']}}]",
    );
    let out = c.compile();
    assert_eq!(out.ipcache[&ip_key(ip("fd00::2"))].endpoint, web);
    assert_eq!(
        out.ipcache[&ip_key(ip("fd00:1::2"))].identity,
        out.ipcache[&ip_key(ip("10.0.1.2"))].identity
    );
    assert!(tcp_in(&out, web, "fd00:1::2", 80));
    assert!(tcp_in(&out, web, "10.0.1.2", 80));
    assert!(tcp_in(&out, web, "2001:db8:2::1", 80));
    assert!(!tcp_in(&out, web, "2001:db8:1::1", 80));
    assert!(!tcp_in(&out, web, "2001:db9::1", 80));
}

#[test]
fn ipv6_all_does_not_match_ipv4() {
    let (mut c, web) = web_and_client();
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress:\n- from: [{ipBlock: {cidr: '::/0'}}]",
    );
    let out = c.compile();
    assert!(tcp_in(&out, web, "2001:db8::1", 80));
    assert!(
        !tcp_in(&out, web, "8.8.8.8", 80),
        "IPv4-mapped keys are inside ::/0"
    );
    let (mut c, web) = web_and_client();
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress:\n- from: [{ipBlock: {cidr: '::/0'}}, {ipBlock: {cidr: 0.0.0.0/0}}]",
    );
    let out = c.compile();
    assert!(tcp_in(&out, web, "8.8.8.8", 80));
    assert!(tcp_in(&out, web, "2001:db8::1", 80));
}

#[test]
fn ports_and_protocols() {
    let (mut c, web) = web_and_client();
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress:\n- ports: [{port: 80}, {protocol: UDP, port: 53}, {protocol: SCTP}]",
    );
    let out = c.compile();
    assert!(tcp_in(&out, web, "10.0.1.2", 80));
    assert!(!tcp_in(&out, web, "10.0.1.2", 53));
    assert!(out.allows(web, ip("10.0.1.2"), Ingress, UDP, 53));
    assert!(!out.allows(web, ip("10.0.1.2"), Ingress, UDP, 80));
    assert!(out.allows(web, ip("10.0.1.2"), Ingress, SCTP, 9999));
    assert!(
        !out.allows(web, ip("10.0.1.2"), Ingress, ICMP, 0),
        "ports given: not every protocol"
    );
    assert!(
        out.policy
            .keys()
            .any(|(k, len)| k.protocol == SCTP && *len == POLICY_PREFIX_ANY_PORT)
    );
}

#[test]
fn no_ports_means_every_protocol() {
    let (mut c, web) = web_and_client();
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress:\n- from: [{podSelector: {}}]",
    );
    let out = c.compile();
    assert!(out.allows(web, ip("10.0.1.2"), Ingress, ICMP, 0));
    assert!(out.allows(web, ip("10.0.1.2"), Ingress, UDP, 5353));
    assert!(!out.allows(web, ip("8.8.8.8"), Ingress, ICMP, 0));
    assert!(
        out.policy
            .keys()
            .all(|(_, len)| *len == POLICY_PREFIX_ANY_PROTOCOL)
    );
}

#[test]
fn port_range_decomposition() {
    assert_eq!(port_range_prefixes(80, 80), vec![(80, 96)]);
    assert_eq!(port_range_prefixes(80, 81), vec![(80, 95)]);
    assert_eq!(port_range_prefixes(81, 82), vec![(81, 96), (82, 96)]);
    assert_eq!(port_range_prefixes(0, 65535), vec![(0, 80)]);
    assert_eq!(port_range_prefixes(65535, 65535), vec![(65535, 96)]);
    assert_eq!(port_range_prefixes(1, 65535).len(), 16);
    let blocks = port_range_prefixes(1000, 2000);
    // Exactly covers the range, in order, with aligned blocks.
    let mut next = 1000u32;
    for (first, len) in &blocks {
        let size = 1u32 << (96 - len);
        assert_eq!(u32::from(*first), next);
        assert_eq!(u32::from(*first) % size, 0, "aligned");
        next += size;
    }
    assert_eq!(next, 2001);
    assert!(blocks.len() <= 2 * 16);
}

#[test]
fn end_port_range() {
    let (mut c, web) = web_and_client();
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress:\n- ports: [{port: 1000, endPort: 2000}]",
    );
    let out = c.compile();
    for port in [1000, 1001, 1500, 1999, 2000] {
        assert!(tcp_in(&out, web, "10.0.1.2", port), "{port}");
    }
    for port in [999, 2001, 80, 65535] {
        assert!(!tcp_in(&out, web, "10.0.1.2", port), "{port}");
    }
    let (mut c, web) = web_and_client();
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress:\n- ports: [{port: 1, endPort: 65535, protocol: UDP}]",
    );
    let out = c.compile();
    assert!(out.allows(web, ip("10.0.1.2"), Ingress, UDP, 1));
    assert!(out.allows(web, ip("10.0.1.2"), Ingress, UDP, 65535));
    assert!(!out.allows(web, ip("10.0.1.2"), Ingress, UDP, 0));
    assert!(!out.allows(web, ip("10.0.1.2"), Ingress, TCP, 80));
}

#[test]
fn named_port_ingress_resolves_on_the_local_pod() {
    let (mut c, web) = web_and_client();
    c.ports(
        "default",
        "web",
        &[("http", Protocol::Tcp, 8080), ("dns", Protocol::Udp, 5353)],
    );
    let other = c.local("default", "other", &[], &["10.0.0.3"]);
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress:\n- ports: [{port: http}, {port: dns}, {port: dns, protocol: UDP}]\n  from: [{ipBlock: {cidr: 10.0.0.0/8}}]",
    );
    let out = c.compile();
    assert!(tcp_in(&out, web, "10.0.1.2", 8080));
    assert!(!tcp_in(&out, web, "10.0.1.2", 80));
    assert!(!tcp_in(&out, web, "10.0.1.2", 5353), "dns is UDP");
    assert!(out.allows(web, ip("10.0.1.2"), Ingress, UDP, 5353));
    assert!(
        !tcp_in(&out, other, "10.0.1.2", 8080),
        "other has no port named http"
    );
    assert_eq!(flags(&out, other), endpoint_flags::ISOLATED_INGRESS);
}

#[test]
fn named_port_egress_resolves_per_peer() {
    let mut c = Cluster::new();
    let client = c.local("default", "client", &[("app", "client")], &["10.0.0.2"]);
    c.remote("default", "a", &[("app", "srv")], &["10.0.1.1"]);
    c.ports("default", "a", &[("http", Protocol::Tcp, 8080)]);
    c.remote("default", "b", &[("app", "srv")], &["10.0.1.2"]);
    c.ports("default", "b", &[("http", Protocol::Tcp, 9090)]);
    c.remote("default", "c", &[("app", "srv")], &["10.0.1.3"]);
    c.policy(
        "default",
        "p",
        "podSelector: {matchLabels: {app: client}}\npolicyTypes: [Egress]\negress:\n- to: [{podSelector: {matchLabels: {app: srv}}}]\n  ports: [{port: http}]",
    );
    let out = c.compile();
    assert!(tcp_out(&out, client, "10.0.1.1", 8080));
    assert!(!tcp_out(&out, client, "10.0.1.1", 9090));
    assert!(tcp_out(&out, client, "10.0.1.2", 9090));
    assert!(!tcp_out(&out, client, "10.0.1.2", 8080));
    assert!(
        !tcp_out(&out, client, "10.0.1.3", 8080),
        "c has no http port"
    );
}

#[test]
fn named_port_egress_to_all_peers_means_pods_with_that_port() {
    let mut c = Cluster::new();
    let client = c.local("default", "client", &[], &["10.0.0.2"]);
    c.remote("default", "a", &[], &["10.0.1.1"]);
    c.ports("default", "a", &[("http", Protocol::Tcp, 8080)]);
    c.remote("default", "b", &[("x", "y")], &["10.0.1.2"]);
    c.policy(
        "default",
        "p",
        "podSelector: {}\npolicyTypes: [Egress]\negress:\n- ports: [{port: http}]",
    );
    let out = c.compile();
    assert!(tcp_out(&out, client, "10.0.1.1", 8080));
    assert!(!tcp_out(&out, client, "10.0.1.2", 8080));
    assert!(!tcp_out(&out, client, "8.8.8.8", 8080));
}

/// As network-config-analyzer and Calico read it: a named port towards an ipBlock is the port of
/// that name on each pod whose address is in the block (and outside its excepts), for that address.
#[test]
fn named_port_egress_to_ip_block_resolves_on_the_pods_inside() {
    let mut c = Cluster::new();
    let client = c.local("default", "client", &[], &["10.0.0.2"]);
    c.remote("default", "a", &[("app", "web")], &["10.0.1.1", "fd00::1"]);
    c.ports("default", "a", &[("http", Protocol::Tcp, 8080)]);
    // Same labels and ports (one pod identity) but outside the block.
    c.remote("default", "twin", &[("app", "web")], &["192.168.5.5"]);
    c.ports("default", "twin", &[("http", Protocol::Tcp, 8080)]);
    c.remote("default", "other", &[], &["10.0.1.2"]);
    c.ports("default", "other", &[("http", Protocol::Tcp, 9090)]);
    c.remote("default", "excepted", &[], &["10.0.9.9"]);
    c.ports("default", "excepted", &[("http", Protocol::Tcp, 8080)]);
    c.policy(
        "default",
        "p",
        "podSelector: {}\npolicyTypes: [Egress]\negress:\n- to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.9.0/24]}}]\n  ports: [{port: http}]\n- to: [{ipBlock: {cidr: 10.0.0.0/8}}]\n  ports: [{port: 53, protocol: UDP}]",
    );
    let out = c.compile();
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert!(tcp_out(&out, client, "10.0.1.1", 8080), "a's http");
    assert!(!tcp_out(&out, client, "10.0.1.1", 9090));
    assert!(
        !tcp_out(&out, client, "fd00::1", 8080),
        "a's IPv6 address is not in the block"
    );
    assert!(
        !tcp_out(&out, client, "192.168.5.5", 8080),
        "the twin is not in the block"
    );
    assert!(
        tcp_out(&out, client, "10.0.1.2", 9090),
        "other's http is 9090"
    );
    assert!(!tcp_out(&out, client, "10.0.1.2", 8080));
    assert!(!tcp_out(&out, client, "10.0.9.9", 8080), "excepted");
    assert!(!tcp_out(&out, client, "10.0.7.7", 8080), "no pod there");
    // The other rule still covers the pods' own addresses.
    assert!(out.allows(client, ip("10.0.1.1"), Egress, UDP, 53));
    assert!(out.allows(client, ip("10.0.7.7"), Egress, UDP, 53));
}

#[test]
fn host_addresses_reach_isolated_pods_at_ingress() {
    let (mut c, web) = web_and_client();
    c.policy(
        "default",
        "p",
        "podSelector: {}\npolicyTypes: [Ingress, Egress]",
    );
    let out = c.compile();
    assert_eq!(
        out.ipcache[&ip_key(ip("192.168.1.10"))].identity,
        identity::HOST
    );
    assert_eq!(out.ipcache[&ip_key(ip("192.168.1.10"))].endpoint, 0);
    assert!(tcp_in(&out, web, "192.168.1.10", 10250));
    assert!(
        !tcp_out(&out, web, "192.168.1.10", 6443),
        "egress to the node is policed"
    );
    assert!(!tcp_in(&out, web, "192.168.1.11", 10250));
}

#[test]
fn remote_pods_are_peers_but_not_endpoints() {
    let (c, web) = web_and_client();
    let out = c.compile();
    assert_eq!(out.endpoints.keys().copied().collect::<Vec<_>>(), vec![web]);
    let remote = out.ipcache[&ip_key(ip("10.0.1.2"))];
    assert_eq!(remote.endpoint, 0);
    assert!(remote.identity >= identity::FIRST_POD && remote.identity < identity::FIRST_CIDR);
    assert_eq!(out.ipcache[&ip_key(ip("10.0.0.2"))].endpoint, web);
    assert_eq!(out.stats.endpoints, 1);
}

#[test]
fn finished_and_host_network_pods_are_not_peers() {
    let (mut c, web) = web_and_client();
    c.remote("default", "done", &[("app", "client")], &["10.0.1.3"])
        .phase = Some("Succeeded".into());
    c.remote("default", "failed", &[("app", "client")], &["10.0.1.4"])
        .phase = Some("Failed".into());
    c.remote(
        "default",
        "hostnet",
        &[("app", "client")],
        &["192.168.1.20"],
    )
    .host_network = true;
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress:\n- from: [{podSelector: {matchLabels: {app: client}}}]",
    );
    let out = c.compile();
    assert!(tcp_in(&out, web, "10.0.1.2", 1));
    for peer in ["10.0.1.3", "10.0.1.4", "192.168.1.20"] {
        assert!(!out.ipcache.contains_key(&ip_key(ip(peer))), "{peer}");
        assert!(!tcp_in(&out, web, peer, 1), "{peer}");
    }
}

#[test]
fn identical_pods_share_an_identity() {
    let mut c = Cluster::new();
    c.remote("default", "a", &[("app", "x")], &["10.0.1.1"]);
    c.remote("default", "b", &[("app", "x")], &["10.0.1.2"]);
    c.remote("default", "c", &[("app", "y")], &["10.0.1.3"]);
    c.remote("other", "a", &[("app", "x")], &["10.0.1.4"]);
    let out = c.compile();
    let id = |s| out.ipcache[&ip_key(ip(s))].identity;
    assert_eq!(id("10.0.1.1"), id("10.0.1.2"));
    assert_ne!(id("10.0.1.1"), id("10.0.1.3"));
    assert_ne!(
        id("10.0.1.1"),
        id("10.0.1.4"),
        "namespace is part of the identity"
    );
    assert_eq!(out.stats.pod_identities, 3);
}

#[test]
fn compilation_is_deterministic() {
    let build = |reverse: bool| {
        let mut c = Cluster::new();
        let mut pods = vec![
            ("a", "x", "10.0.1.1"),
            ("b", "y", "10.0.1.2"),
            ("c", "z", "10.0.1.3"),
        ];
        if reverse {
            pods.reverse();
        }
        for (name, app, addr) in pods {
            c.remote("default", name, &[("app", app)], &[addr]);
        }
        c.local("default", "web", &[], &["10.0.0.2"]);
        c.policy("default", "p", "podSelector: {}\ningress:\n- from: [{podSelector: {matchLabels: {app: x}}}, {ipBlock: {cidr: 1.0.0.0/8}}]");
        c.compile()
    };
    assert_eq!(build(false), build(true));
    assert_eq!(
        build(false).policy.values().next().unwrap().policy,
        policy_id(&PodKey::new("default", "p"))
    );
}

// Fail closed.

fn error_fields(out: &Compiled) -> Vec<&str> {
    out.errors.iter().map(|e| e.field.as_str()).collect()
}

#[test]
fn invalid_policy_isolates_but_allows_nothing() {
    let cases = [
        (
            "ingress:\n- from: [{ipBlock: {cidr: 10.0.0.0/33}}]",
            "spec.ingress[0].from[0].ipBlock.cidr",
        ),
        (
            "ingress:\n- from: [{ipBlock: {cidr: 10.0.0.1}}]",
            "spec.ingress[0].from[0].ipBlock.cidr",
        ),
        (
            "ingress:\n- from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]",
            "spec.ingress[0].from[0].ipBlock.except[0]",
        ),
        (
            "ingress:\n- from: [{ipBlock: {cidr: 10.0.0.0/8, except: ['fd00::/64']}}]",
            "spec.ingress[0].from[0].ipBlock.except[0]",
        ),
        (
            "ingress:\n- ports: [{protocol: ICMP}]",
            "spec.ingress[0].ports[0].protocol",
        ),
        (
            "ingress:\n- ports: [{protocol: tcp}]",
            "spec.ingress[0].ports[0].protocol",
        ),
        (
            "ingress:\n- ports: [{endPort: 90}]",
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            "ingress:\n- ports: [{port: http, endPort: 90}]",
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            "ingress:\n- ports: [{port: 90, endPort: 80}]",
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            "ingress:\n- ports: [{port: 0}]",
            "spec.ingress[0].ports[0].port",
        ),
        (
            "ingress:\n- ports: [{port: 70000}]",
            "spec.ingress[0].ports[0].port",
        ),
        (
            "ingress:\n- ports: [{port: 'Not A Name'}]",
            "spec.ingress[0].ports[0].port",
        ),
        ("ingress:\n- from: [{}]", "spec.ingress[0].from[0]"),
        (
            "ingress:\n- from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]",
            "spec.ingress[0].from[0].ipBlock",
        ),
        (
            "ingress:\n- {}\n- from: [{podSelector: {}}, {namespaceSelector: {matchExpressions: [{key: a, operator: Equals}]}}]",
            "spec.ingress[1].from[1].namespaceSelector.matchExpressions[0].operator",
        ),
        (
            "policyTypes: [Ingress]\negress:\n- to: [{ipBlock: {cidr: nope}}]",
            "spec.egress[0].to[0].ipBlock.cidr",
        ),
    ];
    for (rules, field) in cases {
        let (mut c, web) = web_and_client();
        c.policy("default", "bad", &format!("podSelector: {{}}\n{rules}"));
        c.policy(
            "default",
            "good",
            "podSelector: {}\ningress:\n- ports: [{port: 22}]",
        );
        let out = c.compile();
        assert_eq!(error_fields(&out), vec![field], "{rules}");
        let err = &out.errors[0];
        assert_eq!(err.policy, PodKey::new("default", "bad"));
        assert!(err.to_string().contains("default/bad"), "{err}");
        assert_eq!(out.stats.invalid_policies, 1);
        assert_eq!(
            flags(&out, web) & endpoint_flags::ISOLATED_INGRESS,
            endpoint_flags::ISOLATED_INGRESS
        );
        // The other policies still apply; the bad one contributes nothing.
        assert!(tcp_in(&out, web, "10.0.1.2", 22), "{rules}");
        assert!(!tcp_in(&out, web, "10.0.1.2", 80), "{rules}");
        assert!(
            out.policy
                .values()
                .all(|v| v.policy != policy_id(&PodKey::new("default", "bad")))
        );
    }
}

#[test]
fn invalid_policy_alone_denies() {
    let (mut c, web) = web_and_client();
    c.policy(
        "default",
        "bad",
        "podSelector: {}\ningress:\n- ports: [{protocol: ICMP}]",
    );
    let out = c.compile();
    assert_eq!(flags(&out, web), endpoint_flags::ISOLATED_INGRESS);
    assert!(!tcp_in(&out, web, "10.0.1.2", 80));
    assert!(out.policy.is_empty());
}

#[test]
fn invalid_egress_policy_isolates_egress() {
    let (mut c, web) = web_and_client();
    c.policy(
        "default",
        "bad",
        "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]\negress:\n- ports: [{port: 0}]",
    );
    let out = c.compile();
    assert_eq!(flags(&out, web), endpoint_flags::ISOLATED_EGRESS);
    assert!(!tcp_out(&out, web, "10.0.1.2", 80));
}

#[test]
fn invalid_pod_selector_isolates_the_whole_namespace() {
    let (mut c, web) = web_and_client();
    let other = c.local("default", "other", &[("app", "other")], &["10.0.0.3"]);
    c.namespace("prod", &[]);
    let prod = c.local("prod", "p", &[], &["10.0.0.4"]);
    c.policy(
        "default",
        "bad",
        "podSelector: {matchLabels: {app: web}, matchExpressions: [{key: a, operator: In}]}\ningress: [{}]",
    );
    let out = c.compile();
    assert_eq!(
        error_fields(&out),
        vec!["spec.podSelector.matchExpressions[0].values"]
    );
    assert_eq!(flags(&out, web), BOTH);
    assert_eq!(flags(&out, other), BOTH);
    assert_eq!(flags(&out, prod), 0);
    assert!(!tcp_in(&out, web, "10.0.1.2", 80));
}

#[test]
fn unknown_policy_type_isolates_both_directions() {
    let (mut c, web) = web_and_client();
    c.policy(
        "default",
        "bad",
        "podSelector: {}\npolicyTypes: [Ingress, Sideways]\ningress: [{}]",
    );
    let out = c.compile();
    assert_eq!(error_fields(&out), vec!["spec.policyTypes[1]"]);
    assert_eq!(flags(&out, web), BOTH);
    assert!(!tcp_in(&out, web, "10.0.1.2", 80));
    assert!(!tcp_out(&out, web, "10.0.1.2", 80));
}

#[test]
fn endpoint_without_pod_is_isolated_by_its_namespace_policies() {
    let (mut c, web) = web_and_client();
    c.endpoints.insert(PodKey::new("default", "ghost"), 99);
    c.endpoints.insert(PodKey::new("elsewhere", "ghost"), 98);
    c.policy(
        "default",
        "web",
        "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]",
    );
    c.policy(
        "default",
        "all",
        "podSelector: {}\ningress:\n- ports: [{port: 80}]",
    );
    let out = c.compile();
    assert_eq!(flags(&out, 99), BOTH);
    assert_eq!(flags(&out, 98), 0);
    assert!(
        tcp_in(&out, 99, "10.0.1.2", 80),
        "a policy that selects every pod applies"
    );
    assert!(!tcp_in(&out, 99, "10.0.1.2", 81));
    assert!(!tcp_out(&out, 99, "10.0.1.2", 81));
    assert_eq!(flags(&out, web), BOTH);
    assert_eq!(out.stats.unknown_endpoints, 2);
}

#[test]
fn unknown_endpoint_id_is_denied() {
    let (c, _) = web_and_client();
    let out = c.compile();
    assert!(!tcp_in(&out, 12345, "10.0.1.2", 80));
}

#[test]
fn stats() {
    let (mut c, _) = web_and_client();
    c.pod_on(NODE, "default", "new", &[], &["10.0.0.9"]);
    c.endpoints.remove(&PodKey::new("default", "new"));
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress:\n- from: [{ipBlock: {cidr: 1.0.0.0/8}}]",
    );
    c.policy("default", "bad", "podSelector: {}\npolicyTypes: [X]");
    let out = c.compile();
    assert_eq!(out.stats.policies, 2);
    assert_eq!(out.stats.invalid_policies, 1);
    assert_eq!(out.stats.cidr_identities, 1);
    assert_eq!(out.stats.pod_identities, 3);
    assert_eq!(out.stats.endpoints, 1);
    assert_eq!(out.stats.local_pods_without_endpoint, 1);
    assert_eq!(out.stats.isolated_ingress, 1);
    assert_eq!(out.stats.isolated_egress, 1);
    assert_eq!(out.stats.policy_entries, out.policy.len());
}

#[test]
fn address_claimed_twice_stays_with_the_local_pod() {
    let mut c = Cluster::new();
    // "a-stale" sorts first and is remote; the local pod must keep the address.
    c.remote("default", "a-stale", &[], &["10.0.0.2"]);
    let web = c.local("default", "web", &[("app", "web")], &["10.0.0.2"]);
    let out = c.compile();
    assert_eq!(out.ipcache[&ip_key(ip("10.0.0.2"))].endpoint, web);
    // A host address never takes over a pod address.
    let mut c = Cluster::new();
    c.host_addrs.push(ip("10.0.1.2"));
    c.remote("default", "client", &[], &["10.0.1.2"]);
    let out = c.compile();
    assert_ne!(
        out.ipcache[&ip_key(ip("10.0.1.2"))].identity,
        identity::HOST
    );
}

#[test]
fn named_port_of_an_unknown_endpoint_resolves_to_nothing() {
    let (mut c, _) = web_and_client();
    c.endpoints.insert(PodKey::new("default", "ghost"), 99);
    c.policy(
        "default",
        "p",
        "podSelector: {}\ningress:\n- ports: [{port: http}, {port: 22}]",
    );
    let out = c.compile();
    assert!(tcp_in(&out, 99, "10.0.1.2", 22));
    assert!(out.policy.keys().filter(|(k, _)| k.endpoint == 99).count() == 1);
}

// ---- Egress through Services (ClusterIP frontends) ----

use netpol_common::{SvcKey, service};

impl Cluster {
    fn service(&mut self, yaml: &str) {
        let svc: k8s_openapi::api::core::v1::Service = serde_yaml_ng::from_str(yaml).unwrap();
        self.state.insert(Object::Service(
            crate::model::service::Service::from_k8s(&svc).unwrap(),
        ));
    }

    fn endpoint_slice(&mut self, yaml: &str) {
        let s: k8s_openapi::api::discovery::v1::EndpointSlice =
            serde_yaml_ng::from_str(yaml).unwrap();
        self.state.insert(Object::EndpointSlice(
            crate::model::service::EndpointSlice::from_k8s(&s).unwrap(),
        ));
    }
}

fn svc_verdict(c: &Compiled, ep: u32, vip: &str, protocol: u8, port: u16) -> Option<u16> {
    let key = SvcKey {
        endpoint: ep,
        vip: ip_key(ip(vip)),
        port_be: port.to_be_bytes(),
        protocol,
        _pad: 0,
    };
    c.services.get(&key).map(|v| v.verdict)
}

const KUBE_DNS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: 10.43.0.10
  selector: {k8s-app: kube-dns}
  ports:
    - {name: dns, port: 53, protocol: UDP, targetPort: 53}
    - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
"#;

const DNS_ONLY_EGRESS: &str = r#"
podSelector: {}
policyTypes: [Egress]
egress:
  - to:
      - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}
        podSelector: {matchLabels: {k8s-app: kube-dns}}
    ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]
"#;

#[test]
fn dns_policy_allows_the_kube_dns_cluster_ip_and_nothing_else() {
    let mut c = Cluster::new();
    c.namespace("kube-system", &[]);
    let client = c.local("default", "client", &[], &["10.42.0.5"]);
    c.remote(
        "kube-system",
        "coredns",
        &[("k8s-app", "kube-dns")],
        &["10.42.1.9"],
    );
    c.remote("default", "web", &[("app", "web")], &["10.42.1.20"]);
    c.service(KUBE_DNS);
    c.service(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.43.0.80, selector: {app: web}, ports: [{port: 80}]}
"#,
    );
    c.policy("default", "dns-only", DNS_ONLY_EGRESS);
    let out = c.compile();
    assert_eq!(
        svc_verdict(&out, client, "10.43.0.10", UDP, 53),
        Some(service::VERDICT_DEFER)
    );
    assert_eq!(
        svc_verdict(&out, client, "10.43.0.10", TCP, 53),
        Some(service::VERDICT_DEFER)
    );
    assert_eq!(
        svc_verdict(&out, client, "10.43.0.80", TCP, 80),
        None,
        "web is not allowed"
    );
    // The verdict names the rule that allows a backend, whose hit counters it adds to.
    let key = SvcKey {
        endpoint: client,
        vip: ip_key(ip("10.43.0.10")),
        port_be: 53u16.to_be_bytes(),
        protocol: UDP,
        _pad: 0,
    };
    let v = out.services[&key];
    assert_eq!(v.policy, policy_id(&PodKey::new("default", "dns-only")));
    assert_eq!(u32::from(v.rule), netpol_common::rule_code::of(Egress, 0));
    // The ClusterIP is judged on its backends: allowed (deferred to after DNAT), web's is not.
    assert!(out.allows(client, ip("10.43.0.10"), Egress, UDP, 53));
    assert!(!out.allows(client, ip("10.43.0.80"), Egress, TCP, 80));
}

#[test]
fn service_with_some_backends_allowed_is_deferred() {
    let mut c = Cluster::new();
    let client = c.local("default", "client", &[], &["10.42.0.5"]);
    c.remote(
        "default",
        "db-1",
        &[("app", "db"), ("tier", "gold")],
        &["10.42.1.7"],
    );
    c.remote("default", "db-2", &[("app", "db")], &["10.42.1.8"]);
    c.service(
        r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec: {clusterIP: 10.43.0.54, selector: {app: db}, ports: [{port: 5432}]}
"#,
    );
    c.policy(
        "default",
        "to-gold",
        "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{podSelector: {matchLabels: {tier: gold}}}], ports: [{port: 5432}]}]}",
    );
    let out = c.compile();
    assert_eq!(
        svc_verdict(&out, client, "10.43.0.54", TCP, 5432),
        Some(service::VERDICT_DEFER)
    );
    // Both backends allowed: still decided after DNAT (kube-proxy may pick a backend the agent does
    // not know yet), which a hook can do for pod backends.
    c.policy(
        "default",
        "to-gold",
        "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{podSelector: {matchLabels: {app: db}}}], ports: [{port: 5432}]}]}",
    );
    let out = c.compile();
    assert_eq!(
        svc_verdict(&out, client, "10.43.0.54", TCP, 5432),
        Some(service::VERDICT_DEFER)
    );
}

#[test]
fn named_target_port_is_the_port_matched() {
    let mut c = Cluster::new();
    let client = c.local("default", "client", &[], &["10.42.0.5"]);
    c.remote("default", "api", &[("app", "api")], &["10.42.1.7"]);
    c.ports("default", "api", &[("http", Protocol::Tcp, 8080)]);
    c.service(
        r#"
apiVersion: v1
kind: Service
metadata: {name: api, namespace: default}
spec: {clusterIP: 10.43.0.8, selector: {app: api}, ports: [{port: 80, targetPort: http}]}
"#,
    );
    c.policy(
        "default",
        "p",
        "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{podSelector: {}}], ports: [{port: 8080}]}]}",
    );
    assert_eq!(
        svc_verdict(&c.compile(), client, "10.43.0.8", TCP, 80),
        Some(service::VERDICT_DEFER),
        "the rule for the backend's 8080 allows the frontend's 80"
    );
    c.policy(
        "default",
        "p",
        "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{podSelector: {}}], ports: [{port: 80}]}]}",
    );
    assert_eq!(
        svc_verdict(&c.compile(), client, "10.43.0.8", TCP, 80),
        None,
        "80 is the frontend port only"
    );
}

#[test]
fn endpoint_slices_decide_the_backends_and_clients_without_egress_isolation_need_nothing() {
    let mut c = Cluster::new();
    let client = c.local("default", "client", &[], &["10.42.0.5"]);
    let free = c.local("other", "free", &[], &["10.42.0.6"]);
    c.remote("default", "a", &[("app", "x"), ("ok", "y")], &["10.42.1.7"]);
    c.remote("default", "b", &[("app", "x")], &["10.42.1.8"]);
    c.service(
        r#"
apiVersion: v1
kind: Service
metadata: {name: x, namespace: default}
spec: {clusterIP: 10.43.0.9, selector: {app: x}, ports: [{name: web, port: 80}]}
"#,
    );
    // kube-proxy only sends to the slice's ready endpoint, which is the allowed one.
    c.endpoint_slice(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: x-1, namespace: default, labels: {kubernetes.io/service-name: x}}
addressType: IPv4
endpoints:
  - {addresses: [10.42.1.7], conditions: {ready: true}}
  - {addresses: [10.42.1.8], conditions: {ready: false}}
ports: [{name: web, port: 80, protocol: TCP}]
"#,
    );
    c.policy(
        "default",
        "p",
        "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{podSelector: {matchLabels: {ok: y}}}]}]}",
    );
    let out = c.compile();
    assert_eq!(
        svc_verdict(&out, client, "10.43.0.9", TCP, 80),
        Some(service::VERDICT_DEFER)
    );
    assert!(
        out.services.keys().all(|k| k.endpoint != free),
        "not egress-isolated: nothing to precompute"
    );
}

#[test]
fn partial_allow_with_a_denied_backend_on_this_node_fails_closed() {
    let mut c = Cluster::new();
    let client = c.local("default", "client", &[], &["10.42.0.5"]);
    c.remote(
        "default",
        "db-1",
        &[("app", "db"), ("tier", "gold")],
        &["10.42.1.7"],
    );
    c.service(
        r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec: {clusterIP: 10.43.0.54, ports: [{name: pg, port: 5432}]}
"#,
    );
    // The second backend is this node's own address (a hostNetwork pod): a deferred packet kube-proxy
    // sends there is delivered locally, past every hook, so the frontend must not be deferred.
    c.endpoint_slice(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: default, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
endpoints: [{addresses: [10.42.1.7]}, {addresses: [192.168.1.10]}]
ports: [{name: pg, port: 5432, protocol: TCP}]
"#,
    );
    c.policy(
        "default",
        "to-gold",
        "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{podSelector: {matchLabels: {tier: gold}}}], ports: [{port: 5432}]}]}",
    );
    assert_eq!(
        svc_verdict(&c.compile(), client, "10.43.0.54", TCP, 5432),
        None
    );
}

/// A frontend is deferred only when a hook decides every denied backend after DNAT: a remote pod
/// (Flannel's device), a local pod with an endpoint (its veth). Another node's address, an address
/// outside the cluster, or a local pod whose veth is not attached yet is reached where nothing
/// decides: the frontend fails closed instead of passing undecided.
#[test]
fn deferred_only_where_a_hook_decides_every_denied_backend() {
    let slice_with = |second: &str| {
        format!(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: db-1, namespace: default, labels: {{kubernetes.io/service-name: db}}}}
addressType: IPv4
endpoints: [{{addresses: [10.42.1.7]}}, {{addresses: [{second}]}}]
ports: [{{name: pg, port: 5432, protocol: TCP}}]
"#
        )
    };
    let verdict_with = |second: &str, local_unattached: bool| {
        let mut c = Cluster::new();
        let client = c.local("default", "client", &[], &["10.42.0.5"]);
        c.remote("default", "db-1", &[("tier", "gold")], &["10.42.1.7"]);
        c.remote("default", "db-2", &[], &["10.42.1.8"]);
        c.local("default", "db-3", &[], &["10.42.0.9"]);
        if local_unattached {
            c.endpoints.remove(&PodKey::new("default", "db-3"));
        }
        c.service(
            "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: default}\nspec: {clusterIP: 10.43.0.54, ports: [{name: pg, port: 5432}]}\n",
        );
        c.endpoint_slice(&slice_with(second));
        c.policy(
            "default",
            "to-gold",
            "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{podSelector: {matchLabels: {tier: gold}}}], ports: [{port: 5432}]}]}",
        );
        svc_verdict(&c.compile(), client, "10.43.0.54", TCP, 5432)
    };
    let defer = Some(service::VERDICT_DEFER);
    assert_eq!(
        verdict_with("10.42.1.8", false),
        defer,
        "remote pod: tunnel decides"
    );
    assert_eq!(
        verdict_with("10.42.0.9", false),
        defer,
        "local pod: its veth decides"
    );
    assert_eq!(
        verdict_with("10.42.0.9", true),
        None,
        "local pod, no endpoint yet"
    );
    assert_eq!(
        verdict_with("192.168.1.12", false),
        None,
        "another node's address"
    );
    assert_eq!(
        verdict_with("203.0.113.7", false),
        None,
        "outside the cluster"
    );
}

// Pending endpoints: veths with programs whose pod the agent does not know (yet).

/// A pending veth with peer addresses `addrs`.
fn pending(c: &mut Cluster, ifindex: u32, addrs: &[&str]) {
    c.pending.insert(
        ifindex,
        Pending {
            addrs: addrs.iter().map(|s| ip(s)).collect(),
            reason: PendingReason::UnknownPod,
        },
    );
}

#[test]
fn a_pending_endpoint_is_reached_by_the_node_only_and_opens_nothing() {
    let mut c = Cluster::new();
    let a = c.local("default", "a", &[("app", "a")], &["10.42.0.10"]);
    c.policy(
        "default",
        "allow-all",
        "podSelector: {}\ningress: [{}]\negress: [{}]\npolicyTypes: [Ingress, Egress]",
    );
    pending(&mut c, 99, &["10.42.0.99"]);
    let out = c.compile();
    let info = out.endpoints[&99];
    assert_eq!(
        info.flags,
        endpoint_flags::ISOLATED_INGRESS
            | endpoint_flags::ISOLATED_EGRESS
            | endpoint_flags::PENDING
    );
    // Its own address is its own (anti-spoofing passes), as no pod's.
    let own = out.ipcache[&ip_key(ip("10.42.0.99"))];
    assert_eq!((own.identity, own.endpoint), (identity::PENDING, 99));
    // The node reaches it (probes; replies are tracked); it opens nothing, not even to the node
    // (NodePorts, hostPorts, VXLAN). An allow-all policy of a namespace does not reach it.
    assert!(out.allows(99, ip("192.168.1.10"), Ingress, TCP, 8080));
    assert!(!out.allows(99, ip("192.168.1.10"), Egress, TCP, 30080));
    assert!(!out.allows(99, ip("192.168.1.10"), Egress, UDP, 8472));
    assert!(!out.allows(99, ip("10.42.0.10"), Ingress, TCP, 80));
    assert!(!out.allows(99, ip("10.42.0.10"), Egress, TCP, 80));
    assert!(!out.allows(99, ip("1.1.1.1"), Egress, TCP, 443));
    assert!(
        out.allows(a, ip("10.42.0.99"), Egress, TCP, 80),
        "allow-all lets a send"
    );
}

#[test]
fn a_pending_endpoint_gets_no_service_verdicts() {
    let mut c = Cluster::new();
    pending(&mut c, 99, &["10.42.0.99"]);
    c.state
        .insert(Object::Service(crate::model::service::Service {
            key: PodKey::new("default", "api"),
            cluster_ips: vec![ip("10.43.0.1")],
            ports: vec![crate::model::service::ServicePort {
                name: "https".into(),
                protocol: Protocol::Tcp,
                port: 443,
                target: crate::model::service::TargetPort::Number(6443),
            }],
            selector: None,
        }));
    c.state.insert(Object::EndpointSlice(
        crate::model::service::EndpointSlice {
            key: PodKey::new("default", "api-1"),
            service: "api".into(),
            addresses: vec![ip("192.168.1.10")],
            ports: vec![crate::model::service::SlicePort {
                name: "https".into(),
                protocol: Protocol::Tcp,
                port: 6443,
            }],
        },
    ));
    let out = c.compile();
    assert!(
        out.services.keys().all(|k| k.endpoint != 99),
        "{:?}",
        out.services
    );
}

#[test]
fn a_pending_endpoint_never_takes_a_pod_or_node_address() {
    let mut c = Cluster::new();
    c.local("default", "a", &[], &["10.42.0.10"]);
    pending(&mut c, 99, &["10.42.0.10", "192.168.1.10"]);
    let out = c.compile();
    assert_ne!(out.ipcache[&ip_key(ip("10.42.0.10"))].endpoint, 99);
    assert_eq!(
        out.ipcache[&ip_key(ip("192.168.1.10"))].identity,
        identity::HOST
    );
}

#[test]
fn allow_unselected_opens_only_the_directions_no_policy_isolates_for_any_candidate_pod() {
    let mut c = Cluster::new();
    c.pending_rule = PendingRule::AllowUnselected;
    // No local pod without an endpoint: the veth is a pod the agent does not know, closed.
    pending(&mut c, 99, &["10.42.0.99"]);
    let both = endpoint_flags::ISOLATED_INGRESS | endpoint_flags::ISOLATED_EGRESS;
    assert_eq!(c.compile().endpoints[&99].flags & both, both);

    // One candidate (on this node, no endpoint yet) in a namespace without policy: open.
    c.namespace("free", &[]);
    c.pod_on("node-b", "free", "new", &[("app", "new")], &[]);
    Arc::make_mut(c.state.pods.get_mut(&PodKey::new("free", "new")).unwrap()).node_name =
        Some(NODE.into());
    assert_eq!(c.compile().endpoints[&99].flags & both, 0);

    // A policy that isolates the candidate for ingress only: ingress closed, egress open.
    c.policy(
        "free",
        "deny-in",
        "podSelector: {matchLabels: {app: new}}\npolicyTypes: [Ingress]",
    );
    assert_eq!(
        c.compile().endpoints[&99].flags & both,
        endpoint_flags::ISOLATED_INGRESS
    );

    // A veth pending for another reason than "unknown pod" is never relaxed.
    for reason in [
        PendingReason::Ambiguous,
        PendingReason::PodGone,
        PendingReason::Unconfirmed,
    ] {
        c.pending.get_mut(&99).unwrap().reason = reason;
        assert_eq!(c.compile().endpoints[&99].flags & both, both, "{reason:?}");
    }
    c.pending.get_mut(&99).unwrap().reason = PendingReason::UnknownPod;

    // A second candidate whose namespace denies egress: both closed.
    c.namespace("locked", &[]);
    c.pod_on("node-b", "locked", "other", &[], &[]);
    Arc::make_mut(
        c.state
            .pods
            .get_mut(&PodKey::new("locked", "other"))
            .unwrap(),
    )
    .node_name = Some(NODE.into());
    c.policy(
        "locked",
        "deny-out",
        "podSelector: {}\npolicyTypes: [Egress]",
    );
    assert_eq!(c.compile().endpoints[&99].flags & both, both);
}

/// Upstream's "except clause ... egress access to server in CIDR block" through a Service: an
/// ipBlock around the ClusterIP allows nothing by itself; the backends decide.
#[test]
fn an_ip_block_around_a_cluster_ip_does_not_allow_it() {
    let mut c = Cluster::new();
    let client = c.local("default", "client", &[], &["10.42.0.5"]);
    c.remote("default", "server", &[("app", "server")], &["10.42.1.7"]);
    c.service(
        r#"
apiVersion: v1
kind: Service
metadata: {name: server, namespace: default}
spec: {clusterIP: 10.43.0.54, selector: {app: server}, ports: [{port: 80}]}
"#,
    );
    c.policy(
        "default",
        "cidr-except-server",
        "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.42.1.7/32]}}]}]}",
    );
    let out = c.compile();
    assert!(out.frontends.contains_key(&(ip_key(ip("10.43.0.54")), 128)));
    assert_eq!(svc_verdict(&out, client, "10.43.0.54", TCP, 80), None);
    assert!(
        !tcp_out(&out, client, "10.43.0.54", 80),
        "the ClusterIP leads to the excepted server"
    );
    assert!(!tcp_out(&out, client, "10.42.1.7", 80));
    assert!(
        tcp_out(&out, client, "10.42.1.8", 80),
        "the rest of the block"
    );
    // A rule without peers does not reach the frontend on another port either.
    c.policy(
        "default",
        "cidr-except-server",
        "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: 80}]}]}",
    );
    let out = c.compile();
    assert_eq!(
        svc_verdict(&out, client, "10.43.0.54", TCP, 80),
        Some(service::VERDICT_DEFER)
    );
    assert!(!tcp_out(&out, client, "10.43.0.54", 81));
}

/// Backends that no hook decides after DNAT (node addresses: the `kubernetes` Service on an HA
/// server): allowed outright only when every one is allowed, else denied.
#[test]
fn node_backends_are_allowed_outright_or_not_at_all() {
    let mut c = Cluster::new();
    let client = c.local("default", "client", &[], &["10.42.0.5"]);
    c.service(
        r#"
apiVersion: v1
kind: Service
metadata: {name: kubernetes, namespace: default}
spec: {clusterIP: 10.43.0.1, ports: [{name: https, port: 443, targetPort: 6443}]}
"#,
    );
    c.endpoint_slice(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: kubernetes, namespace: default, labels: {kubernetes.io/service-name: kubernetes}}
addressType: IPv4
endpoints:
  - {addresses: [192.168.1.10], conditions: {ready: true}}
  - {addresses: [192.168.1.11], conditions: {ready: true}}
ports: [{name: https, port: 6443, protocol: TCP}]
"#,
    );
    c.policy(
        "default",
        "api",
        "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 192.168.1.0/24}}], ports: [{port: 6443}]}]}",
    );
    let out = c.compile();
    assert_eq!(
        svc_verdict(&out, client, "10.43.0.1", TCP, 443),
        Some(service::VERDICT_ALLOW)
    );
    c.policy(
        "default",
        "api",
        "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 192.168.1.10/32}}], ports: [{port: 6443}]}]}",
    );
    let out = c.compile();
    assert_eq!(
        svc_verdict(&out, client, "10.43.0.1", TCP, 443),
        None,
        "fails closed"
    );
}

/// Without `tunnel_egress` on every exit device (a device it could not be attached to), nothing
/// decides a remote backend after DNAT: all allowed is allowed outright, some denied denies.
#[test]
fn unguarded_exits_make_remote_backends_undecidable() {
    let mut c = Cluster::new();
    let client = c.local("default", "client", &[], &["10.42.0.5"]);
    c.remote(
        "default",
        "db-1",
        &[("app", "db"), ("tier", "gold")],
        &["10.42.1.7"],
    );
    c.remote("default", "db-2", &[("app", "db")], &["10.42.1.8"]);
    c.service(
        r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec: {clusterIP: 10.43.0.54, selector: {app: db}, ports: [{port: 5432}]}
"#,
    );
    let to = |selector: &str| {
        format!(
            "{{podSelector: {{}}, policyTypes: [Egress], egress: [{{to: [{{podSelector: {{matchLabels: {selector}}}}}], ports: [{{port: 5432}}]}}]}}"
        )
    };
    c.exits_guarded = false;
    c.policy("default", "p", &to("{tier: gold}"));
    assert_eq!(
        svc_verdict(&c.compile(), client, "10.43.0.54", TCP, 5432),
        None
    );
    c.policy("default", "p", &to("{app: db}"));
    assert_eq!(
        svc_verdict(&c.compile(), client, "10.43.0.54", TCP, 5432),
        Some(service::VERDICT_ALLOW)
    );
    c.exits_guarded = true;
    assert_eq!(
        svc_verdict(&c.compile(), client, "10.43.0.54", TCP, 5432),
        Some(service::VERDICT_DEFER)
    );
}
