//! Policy updates open no window: while policies are swapped back and forth, a connection that both
//! the old and the new policy deny never gets through, even for a moment.

use std::{
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use netpol_tests::cluster::{Cluster, Family, Proto, default_agent_bin};

const PROBE_BIN: &str = env!("CARGO_BIN_EXE_netpol-probe");

/// Allows x/b -> x/a on TCP 80 (and isolates x/a).
const ALLOW_B: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-ingress, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
    - from: [{podSelector: {matchLabels: {pod: b}}}]
      ports: [{port: 80}]
"#;

/// Allows x/c -> x/a on TCP 80 instead: same policy object, changed rule.
const ALLOW_C: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-ingress, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
    - from: [{podSelector: {matchLabels: {pod: c}}}]
      ports: [{port: 80}]
"#;

/// One TCP probe from pod `from` to `target` (`tcp/ADDR/PORT`); true when it connected.
fn probe_once(netns: &str, target: &str) -> bool {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            PROBE_BIN,
            "probe",
            "--timeout-ms",
            "300",
            target,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run probe");
    String::from_utf8_lossy(&out.stdout).contains("\"ok\":true")
}

#[test]
fn swapping_policies_never_lets_doubly_denied_traffic_through() {
    if !netpol_tests::privileged_or_skip(
        "swapping_policies_never_lets_doubly_denied_traffic_through",
        "needs root (network namespaces, BPF)",
    ) {
        return;
    }
    let mut c = Cluster::new(PROBE_BIN).expect("cluster");
    c.apply_policies(ALLOW_B).expect("apply");
    c.start_agents(&default_agent_bin()).expect("agents");
    let mut initial = c.reachability(true);
    initial
        .expect_all_ingress("x/a", false)
        .expect_peer("x/b", "x/a", true)
        .allow_loopback();
    c.wait_for_matrix(
        &initial,
        80,
        Proto::Tcp,
        Family::V4,
        Duration::from_secs(30),
    )
    .expect("initial policy enforced");

    // y/a -> x/a is denied by both versions; probe it without pause during every swap.
    let denied_src = c.pod("y/a").netns.clone();
    let target = format!("tcp/{}/80", c.pod("x/a").ip(Family::V4));
    let stop = Arc::new(AtomicBool::new(false));
    let (attempts, leaks) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let prober = {
        let (stop, attempts, leaks) = (stop.clone(), attempts.clone(), leaks.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                attempts.fetch_add(1, Ordering::Relaxed);
                if probe_once(&denied_src, &target) {
                    leaks.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let deadline = Duration::from_secs(30);
    for round in 0..5 {
        for (policy, allowed, denied) in [(ALLOW_C, "x/c", "x/b"), (ALLOW_B, "x/b", "x/c")] {
            c.apply_policies(policy).expect("apply");
            let mut r = c.reachability(true);
            r.expect_all_ingress("x/a", false)
                .expect_peer(allowed, "x/a", true)
                .allow_loopback();
            // Only the cells that change need to settle; the whole matrix is checked on port 80.
            c.wait_for_matrix(&r, 80, Proto::Tcp, Family::V4, deadline)
                .unwrap_or_else(|e| panic!("round {round}: {allowed} -> x/a not enforced: {e:#}"));
            assert!(
                !c.probe_matrix(80, Proto::Tcp, Family::V4)
                    .expect("probe")
                    .get(denied, "x/a")
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    prober.join().expect("prober");
    let attempts = attempts.load(Ordering::Relaxed);
    assert!(
        attempts >= 20,
        "only {attempts} probes ran during the swaps: the test proves nothing"
    );
    assert_eq!(
        leaks.load(Ordering::Relaxed),
        0,
        "y/a reached x/a during a policy swap ({attempts} probes)"
    );
}
