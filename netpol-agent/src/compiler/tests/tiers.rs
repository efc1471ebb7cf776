//! ClusterNetworkPolicy semantics: tiers, priorities, rule order, actions, fail-closed input.

use super::*;
use crate::model::cluster_policy::{ClusterNetworkPolicyObject, ClusterPolicy};

impl Cluster {
    /// A ClusterNetworkPolicy from the YAML of its spec.
    fn cnp(&mut self, name: &str, spec: &str) {
        let object: ClusterNetworkPolicyObject = serde_yaml_ng::from_str(&format!(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n{}",
            spec.lines().map(|l| format!("  {l}\n")).collect::<String>()
        ))
        .unwrap();
        let p = ClusterPolicy::from_object(&object, Origin::Api).unwrap();
        self.state.insert(Object::ClusterPolicy(p));
    }
}

/// `web` (local, in `shop`), `client` (remote, in `shop`), `mon` (remote, in `monitoring`).
fn shop() -> (Cluster, u32) {
    let mut c = Cluster::new();
    c.namespace("shop", &[("team", "shop")]);
    c.namespace("monitoring", &[("team", "ops")]);
    let web = c.local("shop", "web", &[("app", "web")], &["10.0.0.2", "fd00::2"]);
    c.remote(
        "shop",
        "client",
        &[("app", "client")],
        &["10.0.1.2", "fd00::1:2"],
    );
    c.remote("monitoring", "mon", &[("app", "prom")], &["10.0.2.2"]);
    (c, web)
}

const SUBJECT_SHOP: &str = "subject:\n  namespaces:\n    matchLabels: {team: shop}";

#[test]
fn admin_deny_overrides_a_network_policy_allow() {
    let (mut c, web) = shop();
    c.policy("shop", "allow-all", "podSelector: {}\ningress:\n- {}");
    c.cnp(
        "deny-ops",
        &format!("tier: Admin\npriority: 10\n{SUBJECT_SHOP}\ningress:\n- action: Deny\n  from:\n  - namespaces: {{matchLabels: {{team: ops}}}}"),
    );
    let out = c.compile();
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert!(!tcp_in(&out, web, "10.0.2.2", 80));
    assert!(tcp_in(&out, web, "10.0.1.2", 80));
}

#[test]
fn admin_accept_overrides_network_policy_isolation() {
    let (mut c, web) = shop();
    c.policy("shop", "deny", "podSelector: {}");
    c.cnp(
        "scrape",
        &format!("tier: Admin\npriority: 1\n{SUBJECT_SHOP}\ningress:\n- action: Accept\n  from:\n  - namespaces: {{matchLabels: {{team: ops}}}}\n  protocols:\n  - tcp: {{destinationPort: {{number: 9090}}}}"),
    );
    let out = c.compile();
    assert!(tcp_in(&out, web, "10.0.2.2", 9090));
    assert!(!tcp_in(&out, web, "10.0.2.2", 80));
    assert!(!tcp_in(&out, web, "10.0.1.2", 9090));
}

#[test]
fn pass_skips_the_tier_and_network_policy_decides() {
    let (mut c, web) = shop();
    c.cnp(
        "guard",
        &format!("tier: Admin\npriority: 1\n{SUBJECT_SHOP}\ningress:\n- action: Pass\n  from:\n  - namespaces: {{matchLabels: {{team: shop}}}}\n- action: Deny\n  from:\n  - namespaces: {{}}"),
    );
    let out = c.compile();
    // Passed to NetworkPolicy, which isolates nothing: allowed by default.
    assert!(tcp_in(&out, web, "10.0.1.2", 80));
    assert!(!tcp_in(&out, web, "10.0.2.2", 80));
    c.policy("shop", "deny", "podSelector: {}");
    let out = c.compile();
    assert!(!tcp_in(&out, web, "10.0.1.2", 80));
}

#[test]
fn baseline_decides_only_where_no_network_policy_isolates() {
    let (mut c, web) = shop();
    c.cnp(
        "baseline-deny",
        &format!("tier: Baseline\npriority: 1\n{SUBJECT_SHOP}\ningress:\n- action: Deny\n  from:\n  - namespaces: {{}}"),
    );
    let out = c.compile();
    assert!(!tcp_in(&out, web, "10.0.1.2", 80));
    assert!(
        tcp_out(&out, web, "10.0.1.2", 80),
        "no egress rules: egress untouched"
    );
    c.policy(
        "shop",
        "allow-client",
        "podSelector: {}\ningress:\n- from:\n  - podSelector: {matchLabels: {app: client}}",
    );
    let out = c.compile();
    assert!(
        tcp_in(&out, web, "10.0.1.2", 80),
        "NetworkPolicy overrides the baseline"
    );
    assert!(!tcp_in(&out, web, "10.0.2.2", 80), "and isolates");
}

#[test]
fn the_first_rule_wins_whatever_the_port_prefix() {
    let (mut c, web) = shop();
    let deny80 = "- action: Deny\n  from:\n  - namespaces: {matchLabels: {team: shop}}\n  protocols:\n  - tcp: {destinationPort: {number: 80}}";
    let accept = "- action: Accept\n  from:\n  - namespaces: {matchLabels: {team: shop}}";
    let deny = "- action: Deny\n  from:\n  - namespaces: {}";
    c.cnp(
        "p",
        &format!("tier: Admin\npriority: 1\n{SUBJECT_SHOP}\ningress:\n{deny80}\n{accept}\n{deny}"),
    );
    let out = c.compile();
    assert!(!tcp_in(&out, web, "10.0.1.2", 80));
    assert!(tcp_in(&out, web, "10.0.1.2", 81));
    assert!(!tcp_in(&out, web, "10.0.2.2", 81));
    c.cnp(
        "p",
        &format!("tier: Admin\npriority: 1\n{SUBJECT_SHOP}\ningress:\n{accept}\n{deny80}\n{deny}"),
    );
    let out = c.compile();
    assert!(
        tcp_in(&out, web, "10.0.1.2", 80),
        "an earlier broad Accept beats a later port Deny"
    );
}

#[test]
fn lower_priority_value_first_across_policies_and_identities() {
    let (mut c, web) = shop();
    // A Deny by network (CIDR identity) at priority 5, an Accept by namespace (pod identity) at 3.
    c.cnp(
        "net-deny",
        &format!("tier: Admin\npriority: 5\n{SUBJECT_SHOP}\negress:\n- action: Deny\n  to:\n  - networks: [10.0.0.0/8]"),
    );
    c.cnp(
        "shop-accept",
        &format!("tier: Admin\npriority: 3\n{SUBJECT_SHOP}\negress:\n- action: Accept\n  to:\n  - namespaces: {{matchLabels: {{team: shop}}}}"),
    );
    let out = c.compile();
    assert!(
        tcp_out(&out, web, "10.0.1.2", 443),
        "priority 3 Accept first"
    );
    assert!(
        !tcp_out(&out, web, "10.0.2.2", 443),
        "a pod inside the network"
    );
    assert!(
        !tcp_out(&out, web, "10.9.9.9", 443),
        "an address inside the network"
    );
    assert!(tcp_out(&out, web, "192.0.2.1", 443), "outside: not decided");
    assert!(
        tcp_out(&out, web, "fd00::1:2", 443),
        "IPv6 untouched by an IPv4 network"
    );
    c.state
        .cluster_policies
        .get_mut("shop-accept")
        .unwrap()
        .spec
        .priority = 7;
    let out = c.compile();
    assert!(
        !tcp_out(&out, web, "10.0.1.2", 443),
        "now the Deny comes first"
    );
}

#[test]
fn named_ports_resolve_on_the_receiving_pod() {
    let (mut c, web) = shop();
    c.ports("shop", "web", &[("http", Protocol::Tcp, 8080)]);
    c.cnp(
        "p",
        &format!("tier: Admin\npriority: 1\n{SUBJECT_SHOP}\ningress:\n- action: Deny\n  from:\n  - namespaces: {{}}\n  protocols:\n  - destinationNamedPort: http"),
    );
    let out = c.compile();
    assert!(!tcp_in(&out, web, "10.0.1.2", 8080));
    assert!(tcp_in(&out, web, "10.0.1.2", 80));
}

#[test]
fn a_peer_not_understood_fails_closed_by_action() {
    let (mut c, web) = shop();
    c.cnp(
        "exp",
        &format!("tier: Admin\npriority: 1\n{SUBJECT_SHOP}\negress:\n- action: Accept\n  to:\n  - domainNames: [example.com]\n- action: Deny\n  to:\n  - nodes: {{}}\n  protocols:\n  - tcp: {{destinationPort: {{number: 22}}}}"),
    );
    let out = c.compile();
    let fields: Vec<&str> = out.errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.egress[0].to[0].domainNames",
            "spec.egress[1].to[0].nodes"
        ]
    );
    assert!(
        out.errors[0]
            .to_string()
            .starts_with("ClusterNetworkPolicy exp"),
        "{}",
        out.errors[0]
    );
    assert!(
        !tcp_out(&out, web, "10.0.1.2", 22),
        "the Deny matches every peer"
    );
    assert!(!tcp_out(&out, web, "192.0.2.1", 22));
    assert!(
        !tcp_out(&out, web, "10.0.1.2", 80),
        "a Deny of all, as the API says: not only its own ports"
    );
}

#[test]
fn an_object_not_understood_denies_its_subject_everything() {
    let (mut c, web) = shop();
    c.cnp("bad", &format!("tier: Admin\npriority: 5000\n{SUBJECT_SHOP}\ningress:\n- action: Accept\n  from:\n  - namespaces: {{}}"));
    let out = c.compile();
    assert_eq!(out.errors.len(), 1);
    assert_eq!(out.errors[0].field, "spec.priority");
    assert!(!tcp_in(&out, web, "10.0.1.2", 80));
    assert!(!tcp_out(&out, web, "10.0.1.2", 80));
    assert!(
        tcp_in(&out, web, "192.168.1.10", 80),
        "the node still reaches its pods"
    );
}

#[test]
fn pods_outside_the_subject_are_untouched() {
    let (mut c, _) = shop();
    let other = c.local("monitoring", "local-mon", &[("app", "prom")], &["10.0.0.3"]);
    c.cnp("p", &format!("tier: Admin\npriority: 1\n{SUBJECT_SHOP}\ningress:\n- action: Deny\n  from:\n  - namespaces: {{}}"));
    let out = c.compile();
    assert_eq!(flags(&out, other), 0);
    assert!(tcp_in(&out, other, "10.0.1.2", 80));
}

#[test]
fn a_full_map_closes_the_endpoints_with_cluster_policies() {
    let (mut c, web) = shop();
    let plain = c.local("monitoring", "local-mon", &[("app", "prom")], &["10.0.0.3"]);
    c.policy("monitoring", "open", "podSelector: {}\ningress:\n- {}");
    c.cnp("p", &format!("tier: Admin\npriority: 1\n{SUBJECT_SHOP}\ningress:\n- action: Deny\n  from:\n  - namespaces: {{matchLabels: {{team: ops}}}}"));
    c.capacities.ipcache = 3;
    let out = c.compile();
    assert!(
        out.shortfalls
            .iter()
            .any(|s| s.effect.contains("ClusterNetworkPolicy"))
    );
    assert_eq!(flags(&out, web), BOTH);
    assert!(
        !tcp_in(&out, web, "10.0.1.2", 80),
        "closed, not half-enforced"
    );
    assert!(!tcp_out(&out, web, "10.0.1.2", 80));
    assert!(
        tcp_in(&out, plain, "10.0.0.2", 80),
        "other pods keep their policy"
    );
}

#[test]
fn egress_through_a_service_is_judged_with_the_tiers() {
    let (mut c, web) = shop();
    c.cnp("p", &format!("tier: Admin\npriority: 1\n{SUBJECT_SHOP}\negress:\n- action: Deny\n  to:\n  - namespaces: {{matchLabels: {{team: ops}}}}"));
    c.service("{apiVersion: v1, kind: Service, metadata: {name: prom, namespace: monitoring}, spec: {clusterIP: 10.43.0.10, selector: {app: prom}, ports: [{port: 9090}]}}");
    c.service("{apiVersion: v1, kind: Service, metadata: {name: api, namespace: shop}, spec: {clusterIP: 10.43.0.11, selector: {app: client}, ports: [{port: 80}]}}");
    let out = c.compile();
    assert!(
        !tcp_out(&out, web, "10.43.0.10", 9090),
        "every backend denied"
    );
    assert!(tcp_out(&out, web, "10.43.0.11", 80));
}

#[test]
fn a_pass_not_understood_is_a_deny_of_everything() {
    let (mut c, web) = shop();
    // Were it a Pass of everything, it would skip the Deny after it.
    c.cnp(
        "p",
        &format!("tier: Admin\npriority: 1\n{SUBJECT_SHOP}\negress:\n- action: Pass\n  to:\n  - nodes: {{}}\n- action: Deny\n  to:\n  - networks: [169.254.169.254/32]"),
    );
    let out = c.compile();
    assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
    assert!(!tcp_out(&out, web, "169.254.169.254", 80));
    assert!(!tcp_out(&out, web, "10.0.1.2", 80), "a Deny of every peer");
}

#[test]
fn a_named_port_with_networks_fails_closed() {
    let (mut c, web) = shop();
    c.ports("shop", "client", &[("metrics", Protocol::Tcp, 9100)]);
    c.cnp(
        "p",
        &format!("tier: Admin\npriority: 1\n{SUBJECT_SHOP}\negress:\n- action: Deny\n  to:\n  - networks: [10.0.0.0/8]\n  protocols:\n  - destinationNamedPort: metrics"),
    );
    let out = c.compile();
    assert_eq!(out.errors[0].field, "spec.egress[0].protocols");
    assert!(!tcp_out(&out, web, "10.0.1.2", 9100));
    assert!(
        !tcp_out(&out, web, "192.0.2.1", 443),
        "denies everything, not nothing"
    );
}

#[test]
fn subject_with_both_kinds_is_an_error_that_denies_everything() {
    let (mut c, web) = shop();
    c.cnp(
        "both",
        "tier: Baseline\npriority: 1\nsubject:\n  namespaces: {}\n  pods: {namespaceSelector: {}, podSelector: {}}\ningress:\n- action: Accept\n  from:\n  - namespaces: {}",
    );
    let out = c.compile();
    assert_eq!(out.errors[0].field, "spec.subject");
    assert!(!tcp_in(&out, web, "10.0.1.2", 80));
}

#[test]
fn an_invalid_object_comes_before_every_valid_one() {
    let (mut c, web) = shop();
    c.cnp("a-accept", &format!("tier: Admin\npriority: 0\n{SUBJECT_SHOP}\ningress:\n- action: Accept\n  from:\n  - namespaces: {{}}"));
    c.cnp("b-broken", "tier: Admin\npriority: 0\nsubject: {}\n");
    let out = c.compile();
    assert!(
        !tcp_in(&out, web, "10.0.1.2", 80),
        "the broken object's Deny first"
    );
}

#[test]
fn network_policy_overflow_leaves_the_tiers_alone() {
    let (mut c, web) = shop();
    let tenant = c.local("monitoring", "local-mon", &[("app", "prom")], &["10.0.0.3"]);
    let blocks: String = (0..20)
        .map(|i| format!("  - ipBlock: {{cidr: 198.51.100.{i}/32}}\n"))
        .collect();
    c.policy(
        "monitoring",
        "many",
        &format!("podSelector: {{}}\npolicyTypes: [Egress]\negress:\n- to:\n{blocks}"),
    );
    c.cnp("p", &format!("tier: Admin\npriority: 1\n{SUBJECT_SHOP}\negress:\n- action: Deny\n  to:\n  - networks: [169.254.169.254/32]"));
    c.capacities.cidrs = 16;
    let out = c.compile();
    assert!(!out.shortfalls.is_empty());
    assert!(
        out.shortfalls
            .iter()
            .all(|s| !s.effect.contains("ClusterNetworkPolicy")),
        "{:?}",
        out.shortfalls
    );
    assert_ne!(
        flags(&out, web) & endpoint_flags::ADMIN_EGRESS,
        0,
        "not closed"
    );
    assert!(!tcp_out(&out, web, "169.254.169.254", 80), "the Deny holds");
    assert!(tcp_out(&out, web, "10.0.1.2", 80));
    assert!(
        !tcp_out(&out, tenant, "198.51.100.0", 80) || !tcp_out(&out, tenant, "198.51.100.19", 80)
    );
}

#[test]
fn pending_endpoints_are_not_relaxed_when_cluster_policies_exist() {
    let (mut c, _) = shop();
    // A pod of this node whose veth the agent has not matched yet.
    c.pod_on(NODE, "shop", "new", &[], &["10.0.0.9"]);
    c.endpoints.remove(&PodKey::new("shop", "new"));
    c.pending_rule = PendingRule::AllowUnselected;
    c.pending.insert(
        77,
        Pending {
            addrs: vec![ip("10.0.0.9")],
            reason: PendingReason::UnknownPod,
        },
    );
    let relaxed = c.compile();
    assert_eq!(
        flags(&relaxed, 77) & BOTH,
        0,
        "no policy: open as the rule says"
    );
    c.cnp("p", &format!("tier: Admin\npriority: 1\n{SUBJECT_SHOP}\negress:\n- action: Deny\n  to:\n  - networks: [169.254.169.254/32]"));
    let out = c.compile();
    assert_eq!(flags(&out, 77) & BOTH, BOTH);
}

#[test]
fn audit_mode_egress_reaches_services_the_tiers_allow_only() {
    let (mut c, web) = shop();
    c.policy("shop", "quiet", "podSelector: {}\npolicyTypes: [Egress]");
    c.policy_mode("shop", "quiet", "audit");
    c.cnp("p", &format!("tier: Admin\npriority: 1\n{SUBJECT_SHOP}\negress:\n- action: Deny\n  to:\n  - namespaces: {{matchLabels: {{team: ops}}}}"));
    c.service("{apiVersion: v1, kind: Service, metadata: {name: prom, namespace: monitoring}, spec: {clusterIP: 10.43.0.10, selector: {app: prom}, ports: [{port: 9090}]}}");
    c.service("{apiVersion: v1, kind: Service, metadata: {name: api, namespace: shop}, spec: {clusterIP: 10.43.0.11, selector: {app: client}, ports: [{port: 80}]}}");
    let out = c.compile();
    assert_eq!(
        svc_verdict(&out, web, "10.43.0.10", TCP, 9090),
        None,
        "the tier denies its backend"
    );
    assert!(
        svc_verdict(&out, web, "10.43.0.11", TCP, 80).is_some(),
        "only the audited policy denies it: it passes, judged again after DNAT"
    );
}
