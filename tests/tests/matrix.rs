//! End-to-end NetworkPolicy scenarios on the simulated two-node Flannel cluster.

use std::time::{Duration, Instant};

use netpol_tests::cluster::{Cluster, Family, Proto, RUN_ROOT};

const PROBE_BIN: &str = env!("CARGO_BIN_EXE_netpol-probe");

fn root_or_skip(test: &str) -> bool {
    if netpol_tests::cluster::is_root() {
        true
    } else {
        eprintln!("SKIP: {test} needs root (network namespaces, bpffs)");
        false
    }
}

#[test]
fn harness_connectivity_without_agent() {
    if !root_or_skip("harness_connectivity_without_agent") {
        return;
    }
    let t0 = Instant::now();
    let mut c = Cluster::new(PROBE_BIN).expect("cluster setup");
    let setup = t0.elapsed();
    let prefix = c.prefix.clone();
    let all = c.reachability(true);
    for (port, proto, family) in [
        (80, Proto::Tcp, Family::V4),
        (81, Proto::Udp, Family::V4),
        (80, Proto::Tcp, Family::V6),
        (81, Proto::Udp, Family::V6),
    ] {
        let t = Instant::now();
        c.wait_for_matrix(&all, port, proto, family, Duration::from_secs(10))
            .unwrap();
        eprintln!("matrix {port}/{proto:?}/{family:?}: {:?}", t.elapsed());
    }
    // Cross-node pairs really went through both VXLAN devices.
    for dev in ["flannel.1", "flannel-v6.1"] {
        let tx = tx_packets(&c.nodes[0].name, dev);
        assert!(tx > 0, "no packets sent on {dev}");
    }
    // Node to local and remote pods.
    assert!(
        c.probe_from_node(0, "x/a", 80, Proto::Tcp, Family::V4)
            .unwrap()
    );
    assert!(
        c.probe_from_node(0, "x/b", 80, Proto::Tcp, Family::V4)
            .unwrap()
    );
    // A port nobody serves is reported as blocked, quickly (TCP RST / ICMP unreachable).
    let t = Instant::now();
    let m = c.probe_matrix(82, Proto::Tcp, Family::V4).unwrap();
    assert!(m.cells.iter().flatten().all(|ok| !ok), "{m}");
    eprintln!("closed-port matrix: {:?}", t.elapsed());
    eprintln!("cluster setup: {setup:?}");
    let t = Instant::now();
    drop(c);
    eprintln!("teardown: {:?}", t.elapsed());

    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(
        !netns.lines().any(|l| l.starts_with(&format!("{prefix}-"))),
        "leftover namespaces: {netns}"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&format!("{RUN_ROOT}/{prefix}")),
        "leftover mounts"
    );
    assert!(!std::path::Path::new(RUN_ROOT).join(&prefix).exists());
}

fn tx_packets(netns: &str, dev: &str) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["-n", netns, "-j", "-s", "link", "show", dev])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["stats64"]["tx"]["packets"].as_u64().unwrap()
}
