//! Audit mode end to end, on the simulated two-node cluster: a policy in audit mode lets what it
//! denies pass and records it as a would-be drop naming the policy; an enforced policy beside it
//! still drops; `--default-mode audit` audits the policies that set no mode.
//!
//! Pods: x/a and x/c on n0, x/b on n1. Senders flood UDP from fixed source ports outside the
//! ephemeral range, so their flows are told apart from the probes that wait for enforcement.

use std::{
    ffi::OsString,
    sync::Mutex,
    time::{Duration, Instant},
};

use netpol_tests::agent_cli::{flood, flows, summary};
use netpol_tests::cluster::{Cluster, Family, Proto, default_agent_bin};
use serde_json::Value;

const PROBE_BIN: &str = env!("CARGO_BIN_EXE_netpol-probe");
/// Frames are 14 + 20 + 8 + 16 = 58 bytes.
const PAYLOAD: usize = 16;
const FRAME: u64 = 58;

/// One cluster at a time (they share the machine's addresses).
static SERIAL: Mutex<()> = Mutex::new(());

/// Only x/b may send to x/a, on UDP 80; `mode` is the policy's annotation, if any.
fn allow_b(mode: Option<&str>) -> String {
    let annotation = mode.map_or(String::new(), |m| {
        format!("  annotations:\n    netpol.io/mode: {m}\n")
    });
    format!(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-b
  namespace: x
{annotation}spec:
  podSelector: {{matchLabels: {{pod: a}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{{podSelector: {{matchLabels: {{pod: b}}}}}}]
    ports: [{{protocol: UDP, port: 80}}]
"
    )
}

/// Enforced: nothing may reach x/a.
const LOCKDOWN: &str = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: lockdown
  namespace: x
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
";

fn cluster(test: &str, policies: &str, agent_args: &[&str]) -> Option<Cluster> {
    if !netpol_tests::privileged_or_skip(test, "needs root (network namespaces, bpffs)") {
        return None;
    }
    let mut c = Cluster::new(PROBE_BIN).unwrap_or_else(|e| panic!("cluster setup: {e:#}"));
    c.apply_policies(policies).unwrap();
    let mut source: Vec<OsString> = vec!["--manifests".into(), c.manifest_dir.clone().into()];
    source.extend(agent_args.iter().map(OsString::from));
    for node in 0..c.nodes.len() {
        c.start_agent_with_source(node, &default_agent_bin(), &source)
            .unwrap_or_else(|e| panic!("starting agent {node}: {e:#}"));
    }
    c.wait_isolated_ingress("x/a", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));
    Some(c)
}

/// Floods x/c -> x/a UDP 81 (from `sport`, 5 datagrams) until node 0 reports the flow at x/a with
/// `verdict`; returns its record. Panics after 30 s.
fn wait_for_verdict(c: &mut Cluster, sport: u16, verdict: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    let port = sport.to_string();
    loop {
        flood(c, "x/c", sport, ("x/a", 81), 5, PAYLOAD);
        let (got, _) = flows(
            c,
            0,
            &["--port", &port, "--to", "x/a", "--verdict", verdict],
        );
        if let Some(f) = got.into_iter().find(|f| f["direction"] == "ingress") {
            return f;
        }
        c.check_agents().unwrap();
        assert!(
            Instant::now() < deadline,
            "no {verdict} flow from x/c to x/a within 30 s; agent log:\n{}",
            c.agent_log(0)
        );
    }
}

#[test]
fn an_audited_policy_passes_and_records_what_it_denies_and_never_weakens_an_enforced_one() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let test = "an_audited_policy_passes_and_records_what_it_denies";
    let Some(mut c) = cluster(test, &allow_b(Some("audit")), &[]) else {
        return;
    };
    let (a, cc) = (
        c.pod("x/a").ip(Family::V4).to_string(),
        c.pod("x/c").ip(Family::V4).to_string(),
    );
    // Denied by the audited policy: passes, recorded as audit, naming it.
    wait_for_verdict(&mut c, 21001, "audit");
    assert_eq!(flood(&c, "x/c", 21002, ("x/a", 81), 7, PAYLOAD), 7);
    let (got, _) = flows(&c, 0, &["--port", "21002", "--to", "x/a"]);
    let mut got: Vec<String> = got.iter().map(summary).collect();
    got.sort();
    let mut want = vec![
        format!(
            "x/c {cc}:21002 -> x/a {a}:81 udp egress allowed not-isolated [] packets=7 bytes={}",
            7 * FRAME
        ),
        format!(
            "x/c {cc}:21002 -> x/a {a}:81 udp ingress audit audit-ingress-denied [\"x/allow-b\"] packets=7 bytes={}",
            7 * FRAME
        ),
    ];
    want.sort();
    assert_eq!(got, want);
    // The pod answered: the datagrams really were delivered.
    let (echo, _) = flows(&c, 0, &["--port", "21002", "--from", "x/a"]);
    let echo: Vec<_> = echo
        .into_iter()
        .filter(|f| f["direction"] == "egress")
        .collect();
    assert_eq!(echo.len(), 1, "{echo:?}");
    assert_eq!(echo[0]["reason"], "reply");
    assert_eq!(echo[0]["packets"], 7);
    // The same traffic, seen through the reachability matrix: everything still connects.
    let mut open = c.reachability(true);
    open.allow_loopback();
    c.wait_for_all(
        &open,
        &[(81, Proto::Udp, Family::V4)],
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("audit mode dropped something: {e:#}"));

    // An enforced policy beside it: x/a is closed, even to what the audited policy allows.
    c.apply_policies(&format!("{}{LOCKDOWN}", allow_b(Some("audit"))))
        .unwrap();
    let mut closed = c.reachability(true);
    closed.expect_all_ingress("x/a", false).allow_loopback();
    c.wait_for_all(
        &closed,
        &[(80, Proto::Udp, Family::V4)],
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let dropped = wait_for_verdict(&mut c, 21003, "dropped");
    assert_eq!(dropped["reason"], "ingress-denied");
    assert_eq!(dropped["policies"], serde_json::json!(["x/lockdown"]));
}

#[test]
fn default_mode_audit_audits_policies_that_set_no_mode() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let test = "default_mode_audit_audits_policies_that_set_no_mode";
    let Some(mut c) = cluster(test, &allow_b(None), &["--default-mode", "audit"]) else {
        return;
    };
    let f = wait_for_verdict(&mut c, 21101, "audit");
    assert_eq!(f["policies"], serde_json::json!(["x/allow-b"]));
    // The policy asks to be enforced: its denials drop.
    c.apply_policies(&allow_b(Some("enforce"))).unwrap();
    let f = wait_for_verdict(&mut c, 21102, "dropped");
    assert_eq!(f["reason"], "ingress-denied");
    let mut r = c.reachability(true);
    r.expect_all_ingress("x/a", false)
        .expect_peer("x/b", "x/a", true)
        .allow_loopback();
    c.wait_for_all(&r, &[(80, Proto::Udp, Family::V4)], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));
}
