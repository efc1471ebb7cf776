//! Hit counters per policy rule end to end, on the simulated two-node cluster: a known number of
//! connections and packets through one rule shows exactly in `netpol-agent policies` and in
//! `/metrics`; a rule nothing uses says `never matched`.
//!
//! Pods: x/a and x/c on n0, x/b on n1. x/a admits x/b on UDP 80 (`ingress[0]`) and x/c on TCP
//! 9999 (`ingress[1]`, which nothing uses).

use std::{process::Command, time::Duration};

use netpol_tests::agent_cli::{flood, policies};
use netpol_tests::cluster::{Cluster, Family, Proto, default_agent_bin};
use serde_json::Value;

const PROBE_BIN: &str = env!("CARGO_BIN_EXE_netpol-probe");
/// Frames are 14 + 20 + 8 + 16 = 58 bytes.
const PAYLOAD: usize = 16;
const FRAME: u64 = 58;

const POLICY: &str = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: admit, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
    ports: [{protocol: UDP, port: 80}]
  - from: [{podSelector: {matchLabels: {pod: c}}}]
    ports: [{protocol: TCP, port: 9999}]
";

/// The counters of rule `rule` of x/admit on node 0: (connections, packets, bytes, last hit).
fn rule(c: &Cluster, rule: &str) -> (u64, u64, u64, Value) {
    let all = policies(c, 0);
    let p = all
        .iter()
        .find(|p| p["policy"] == "x/admit")
        .unwrap_or_else(|| panic!("x/admit not reported: {all:?}"));
    assert_eq!(p["mode"], "enforce");
    assert_eq!(
        p["local_pods"], 1,
        "x/a is the one local pod it decides for"
    );
    let r = p["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == rule)
        .unwrap_or_else(|| panic!("no {rule} in {p}"));
    let n = |f: &str| r[f].as_u64().unwrap();
    (
        n("connections"),
        n("packets"),
        n("bytes"),
        r["last_hit"].clone(),
    )
}

#[test]
fn rule_hits_are_exact_and_unused_rules_say_never_matched() {
    if !netpol_tests::privileged_or_skip("rule_hits", "needs root (network namespaces, bpffs)") {
        return;
    }
    let mut c = Cluster::new(PROBE_BIN).unwrap_or_else(|e| panic!("cluster setup: {e:#}"));
    c.apply_policies(POLICY).unwrap();
    c.start_agents(&default_agent_bin())
        .unwrap_or_else(|e| panic!("starting agents: {e:#}"));
    let mut r = c.reachability(true);
    r.expect_all_ingress("x/a", false)
        .expect_peer("x/b", "x/a", true)
        .allow_loopback();
    c.wait_for_all(&r, &[(80, Proto::Udp, Family::V4)], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));

    let before = rule(&c, "ingress[0]");
    // Three connections (source ports) of 10 datagrams each, every one echoed by x/a.
    for sport in [22001, 22002, 22003] {
        assert_eq!(flood(&c, "x/b", sport, ("x/a", 80), 10, PAYLOAD), 10);
    }
    // The echoes are counted when they leave x/a: wait until all of them have.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let now = rule(&c, "ingress[0]");
        if now.1 >= before.1 + 60 || std::time::Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(after.0 - before.0, 3, "connections");
    assert_eq!(after.1 - before.1, 60, "packets, both ways");
    assert_eq!(after.2 - before.2, 60 * FRAME, "bytes");
    assert!(
        after.3.as_str().is_some_and(|t| t.ends_with('Z')),
        "{:?}",
        after.3
    );
    // Denied traffic counts to no rule; the rule nothing uses never matched.
    assert_eq!(flood(&c, "x/c", 22004, ("x/a", 80), 5, PAYLOAD), 5);
    let unused = rule(&c, "ingress[1]");
    assert_eq!((unused.0, unused.1, unused.3), (0, 0, Value::Null));
    assert_eq!(rule(&c, "ingress[0]").1, after.1, "x/c's denied datagrams");

    // The same counts in /metrics.
    let metrics = Command::new("ip")
        .args(["netns", "exec", &c.nodes[0].name, "curl", "-sf"])
        .arg("http://127.0.0.1:9102/metrics")
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&metrics.stdout);
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("netpol_policy_rule_connections_total{")
                && l.contains("policy=\"admit\"")
                && l.contains("rule=\"ingress[0]\"")
        })
        .unwrap_or_else(|| panic!("no rule counter in /metrics:\n{text}"));
    assert!(line.contains("policy_namespace=\"x\""), "{line}");
    assert!(line.contains("direction=\"ingress\""), "{line}");
    let value: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(value, after.0, "{line}");
}
