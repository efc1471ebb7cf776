//! Audit mode: an audited policy isolates and allows as written, but its denials pass as would-be
//! drops; it never changes what an enforced policy decides.

use super::*;

const AUDIT_IN: u32 = endpoint_flags::ISOLATED_INGRESS | endpoint_flags::AUDIT_INGRESS;

/// `web` in `default` allows ingress from `app: client` on TCP 80 only.
const ALLOW_CLIENT: &str = "podSelector: {}\ningress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 80}]}]";

fn names(out: &Compiled, ep: u32, dir: Direction) -> Vec<String> {
    out.isolating[&(ep, dir)]
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn an_audited_policy_isolates_in_audit_mode_with_its_own_rules() {
    let (mut c, web) = web_and_client();
    c.policy("default", "staged", ALLOW_CLIENT);
    c.policy_mode("default", "staged", "audit");
    let out = c.compile();
    assert_eq!(flags(&out, web), AUDIT_IN);
    assert!(tcp_in(&out, web, "10.0.1.2", 80), "its rule allows");
    assert!(!tcp_in(&out, web, "10.0.1.2", 81), "a would-be drop");
    assert_eq!(names(&out, web, Ingress), ["default/staged"]);
    assert!(out.errors.is_empty());
}

#[test]
fn an_enforced_policy_decides_alone_whatever_the_audited_ones_allow() {
    let (mut c, web) = web_and_client();
    c.policy("default", "deny-all", "podSelector: {}");
    c.policy("default", "staged", ALLOW_CLIENT);
    c.policy_mode("default", "staged", "audit");
    let out = c.compile();
    assert_eq!(
        flags(&out, web),
        endpoint_flags::ISOLATED_INGRESS,
        "no audit bit"
    );
    assert!(
        !tcp_in(&out, web, "10.0.1.2", 80),
        "the audited allow is not written"
    );
    assert!(out.policy.is_empty());
    assert_eq!(names(&out, web, Ingress), ["default/deny-all"]);
}

#[test]
fn modes_are_per_direction() {
    let (mut c, web) = web_and_client();
    c.policy("default", "in", "podSelector: {}\npolicyTypes: [Ingress]");
    c.policy(
        "default",
        "out",
        "podSelector: {}\npolicyTypes: [Egress]\negress: [{ports: [{port: 53, protocol: UDP}]}]",
    );
    c.policy_mode("default", "out", "audit");
    let out = c.compile();
    let want = BOTH | endpoint_flags::AUDIT_EGRESS;
    assert_eq!(flags(&out, web), want);
    assert!(out.allows(web, ip("8.8.8.8"), Egress, UDP, 53));
    assert!(!tcp_out(&out, web, "8.8.8.8", 443));
}

#[test]
fn the_most_specific_setting_decides_a_policys_mode() {
    let (mut c, web) = web_and_client();
    c.policy("default", "p", ALLOW_CLIENT);
    c.namespace_mode("default", "audit");
    assert_eq!(flags(&c.compile(), web), AUDIT_IN, "from the namespace");
    c.policy_mode("default", "p", "enforce");
    assert_eq!(flags(&c.compile(), web), endpoint_flags::ISOLATED_INGRESS);

    let (mut c, web) = web_and_client();
    c.policy("default", "p", ALLOW_CLIENT);
    c.default_mode = Mode::Audit;
    assert_eq!(flags(&c.compile(), web), AUDIT_IN, "from the node");
    c.namespace_mode("default", "enforce");
    assert_eq!(flags(&c.compile(), web), endpoint_flags::ISOLATED_INGRESS);
}

#[test]
fn a_bad_mode_is_enforced_and_reported_with_its_object_and_field() {
    let (mut c, web) = web_and_client();
    c.policy("default", "p", ALLOW_CLIENT);
    c.default_mode = Mode::Audit;
    c.policy_mode("default", "p", "Audit");
    let out = c.compile();
    assert_eq!(flags(&out, web), endpoint_flags::ISOLATED_INGRESS);
    assert!(
        tcp_in(&out, web, "10.0.1.2", 80),
        "the policy is valid otherwise"
    );
    let e = &out.errors[0];
    assert_eq!(
        (e.policy.to_string(), e.field.as_str()),
        ("default/p".into(), mode::FIELD)
    );
    assert!(e.to_string().contains("\"Audit\" is not a mode"), "{e}");

    Arc::make_mut(
        c.state
            .policies
            .get_mut(&PodKey::new("default", "p"))
            .unwrap(),
    )
    .mode = None;
    c.namespace_mode("default", "dry-run");
    let out = c.compile();
    assert_eq!(flags(&out, web), endpoint_flags::ISOLATED_INGRESS);
    assert!(
        out.errors[0]
            .field
            .starts_with("Namespace default metadata"),
        "{:?}",
        out.errors
    );
}

#[test]
fn pending_veths_are_audited_only_when_nothing_is_enforced() {
    let mut c = Cluster::new();
    c.local("default", "a", &[("app", "a")], &["10.42.0.10"]);
    c.policy("default", "p", ALLOW_CLIENT);
    pending(&mut c, 99, &["10.42.0.99"]);
    let pending_flags = |c: &Cluster| c.compile().endpoints[&99].flags;
    let closed = BOTH | endpoint_flags::PENDING;
    assert_eq!(pending_flags(&c), closed);
    c.default_mode = Mode::Audit;
    let audit = endpoint_flags::AUDIT_INGRESS | endpoint_flags::AUDIT_EGRESS;
    assert_eq!(pending_flags(&c), closed | audit);
    c.policy(
        "default",
        "strict",
        "podSelector: {matchLabels: {app: other}}",
    );
    c.policy_mode("default", "strict", "enforce");
    assert_eq!(
        pending_flags(&c),
        closed,
        "one enforced policy keeps pending veths closed"
    );
}
