//! The safe switch from kube-router, end to end: netpol-agent in audit mode beside a small
//! kube-router-like iptables ruleset (its chain names, in the node's FORWARD path) that drops one
//! flow the policies allow and passes one they deny. `verify --compare` reports exactly those two
//! differences, naming kube-router, and nothing about the flow both drop.
//!
//! Pods: x/a and x/c on n0. x/a admits x/c on UDP 80 only (audited). kube-router's rules for x/a
//! drop UDP 80 from x/c and UDP 82 from anyone, and let UDP 81 through.

use std::{
    ffi::OsString,
    process::Command,
    time::{Duration, Instant},
};

use netpol_tests::agent_cli::flood;
use netpol_tests::cluster::{Cluster, Family, default_agent_bin};
use serde_json::Value;

const PROBE_BIN: &str = env!("CARGO_BIN_EXE_netpol-probe");

const POLICY: &str = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-c, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {pod: c}}}]
    ports: [{protocol: UDP, port: 80}]
";

/// Installs kube-router's chains for pod `a` (address `a`) in node `netns`, as its controller
/// lays them out: FORWARD -> KUBE-ROUTER-FORWARD -> KUBE-POD-FW-<hash> -> KUBE-NWPLCY-<hash>.
fn kube_router_rules(netns: &str, a: &str, c: &str) {
    let pod_fw = "KUBE-POD-FW-4MIRAEXZSHZ6YWRO";
    let policy = "KUBE-NWPLCY-C5BVJ2QHR3ZFXEMN";
    let rules: Vec<Vec<&str>> = vec![
        vec!["-N", "KUBE-ROUTER-FORWARD"],
        vec!["-N", pod_fw],
        vec!["-N", policy],
        vec!["-I", "FORWARD", "1", "-j", "KUBE-ROUTER-FORWARD"],
        vec!["-A", "KUBE-ROUTER-FORWARD", "-d", a, "-j", pod_fw],
        vec![
            "-A",
            pod_fw,
            "-m",
            "conntrack",
            "--ctstate",
            "RELATED,ESTABLISHED",
            "-j",
            "ACCEPT",
        ],
        vec!["-A", pod_fw, "-j", policy],
        // Its view of the policy differs from netpol-agent's: 80 from x/c dropped, 81 allowed.
        vec![
            "-A", policy, "-p", "udp", "-s", c, "--dport", "80", "-j", "DROP",
        ],
        vec!["-A", policy, "-p", "udp", "--dport", "81", "-j", "ACCEPT"],
        vec!["-A", policy, "-p", "udp", "--dport", "82", "-j", "DROP"],
    ];
    for r in rules {
        let out = Command::new("ip")
            .args(["netns", "exec", netns, "iptables", "-w"])
            .args(&r)
            .output()
            .expect("running iptables");
        assert!(
            out.status.success(),
            "iptables {r:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `netpol-agent verify --compare -o json` on node 0: its exit status and the differences.
fn compare(c: &Cluster) -> (Option<i32>, Vec<Value>) {
    let n = &c.nodes[0];
    let out = Command::new("ip")
        .args(["netns", "exec", &n.name])
        .arg(default_agent_bin())
        .args(["verify", "--compare", "-o", "json", "--pin-dir"])
        .arg(&n.pin_dir)
        .arg("--state-dir")
        .arg(&n.state_dir)
        .output()
        .expect("running verify --compare");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), v.as_array().cloned().unwrap_or_default())
}

#[test]
fn verify_compare_reports_both_kinds_of_difference_with_kube_router_and_nothing_else() {
    if !netpol_tests::privileged_or_skip("switch_over", "needs root (network namespaces, bpffs)") {
        return;
    }
    let mut c = Cluster::new(PROBE_BIN).unwrap_or_else(|e| panic!("cluster setup: {e:#}"));
    c.apply_policies(POLICY).unwrap();
    let (a, cc) = (
        c.pod("x/a").ip(Family::V4).to_string(),
        c.pod("x/c").ip(Family::V4).to_string(),
    );
    kube_router_rules(&c.nodes[0].name.clone(), &a, &cc);
    let mut source: Vec<OsString> = vec!["--manifests".into(), c.manifest_dir.clone().into()];
    source.extend(["--default-mode", "audit"].map(OsString::from));
    for node in 0..c.nodes.len() {
        c.start_agent_with_source(node, &default_agent_bin(), &source)
            .unwrap_or_else(|e| panic!("starting agent {node}: {e:#}"));
    }
    c.wait_isolated_ingress("x/a", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));
    // The agent looks for kube-router's chains as it starts (then every minute).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !c
        .agent_status(0, &default_agent_bin())
        .is_ok_and(|s| s.kube_router_chains >= 3)
    {
        assert!(
            Instant::now() < deadline,
            "the agent never saw kube-router's chains"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    for (sport, port) in [(23001, 80), (23002, 81), (23003, 82)] {
        assert_eq!(flood(&c, "x/c", sport, ("x/a", port), 3, 16), 3);
    }
    // A missing reply counts once the flow has been quiet for a while: poll until it shows.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (code, diffs) = loop {
        let (code, diffs) = compare(&c);
        if diffs.iter().any(|d| d["kind"] == "allowed-no-reply") || Instant::now() > deadline {
            break (code, diffs);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let got: Vec<String> = diffs
        .iter()
        .map(|d| {
            format!(
                "{} {} -> {} {}",
                d["kind"], d["from"], d["to"], d["direction"]
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            "\"would-drop-went-on\" \"x/c:23002\" -> \"x/a:81\" \"ingress\"",
            "\"allowed-no-reply\" \"x/c:23001\" -> \"x/a:80\" \"egress\"",
        ],
        "{diffs:#?}"
    );
    assert_eq!(diffs[0]["policies"], serde_json::json!(["x/allow-c"]));
    assert_eq!(
        diffs[1]["policies"],
        serde_json::json!(["x/allow-c ingress[0]"])
    );
    assert!(
        diffs[1]["explanation"]
            .as_str()
            .unwrap()
            .contains("kube-router"),
        "{:?}",
        diffs[1]
    );
    assert_eq!(code, Some(1), "differences make the exit status 1");
}
