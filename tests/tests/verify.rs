//! `netpol-agent verify` on the simulated cluster: it passes where the agent enforces, and fails,
//! naming the cause, where enforcement is broken or shared with another engine. `--self-test` proves
//! the programs on real packets and leaves nothing behind.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use netpol_tests::cluster::{Cluster, default_agent_bin};
use serde_json::Value;

const PROBE_BIN: &str = env!("CARGO_BIN_EXE_netpol-probe");
/// Agent start-up (loading BPF, first sync) on a loaded 2-core machine.
const CONVERGE: Duration = Duration::from_secs(60);

fn cluster_with_agents(test: &str) -> Option<Cluster> {
    if !netpol_tests::privileged_or_skip(test, "needs root (network namespaces, bpffs, BPF)") {
        return None;
    }
    let mut c = Cluster::new(PROBE_BIN).unwrap_or_else(|e| panic!("cluster setup: {e:#}"));
    c.start_agents(&default_agent_bin())
        .unwrap_or_else(|e| panic!("starting agents: {e:#}"));
    Some(c)
}

/// Runs `netpol-agent verify -o json` in node `node`'s namespace with that node's directories.
fn verify(c: &Cluster, node: usize, extra: &[&str]) -> (i32, Value) {
    let n = &c.nodes[node];
    let out = Command::new("ip")
        .args(["netns", "exec", &n.name])
        .arg(default_agent_bin())
        .arg("verify")
        .arg("--pin-dir")
        .arg(&n.pin_dir)
        .arg("--state-dir")
        .arg(&n.state_dir)
        .args(["-o", "json"])
        .args(extra)
        .output()
        .expect("running netpol-agent verify");
    let code = out.status.code().unwrap_or(-1);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify printed no JSON ({e}), exit {code}:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, report)
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name} in {report:#}"))
}

fn outcome(report: &Value, name: &str) -> String {
    check(report, name)["outcome"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Re-runs verify until it exits with `want`, or panics with the last report.
fn wait_for_exit(c: &mut Cluster, node: usize, extra: &[&str], want: i32) -> Value {
    let deadline = Instant::now() + CONVERGE;
    loop {
        c.check_agents().unwrap_or_else(|e| panic!("{e:#}"));
        let (code, report) = verify(c, node, extra);
        if code == want {
            return report;
        }
        if Instant::now() > deadline {
            panic!("verify did not exit {want} (last exit {code}):\n{report:#}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn assert_all_pass(report: &Value) {
    for c in report["checks"].as_array().expect("checks") {
        assert_eq!(c["outcome"], "PASS", "{c:#}");
    }
}

fn ip_out(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ifindex_in(netns: &str, ifname: &str) -> u32 {
    let v: Value =
        serde_json::from_str(&ip_out(&["-n", netns, "-j", "link", "show", ifname])).unwrap();
    v[0]["ifindex"].as_u64().expect("ifindex") as u32
}

#[test]
fn verify_passes_with_the_agent_and_fails_when_a_veth_is_detached() {
    let Some(mut c) =
        cluster_with_agents("verify_passes_with_the_agent_and_fails_when_a_veth_is_detached")
    else {
        return;
    };
    let report = wait_for_exit(&mut c, 0, &[], 0);
    assert_all_pass(&report);
    let local = c.pods.iter().filter(|p| p.node == 0).count();
    let attach = check(&report, "agent.attachments")["summary"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        attach.starts_with(&format!("{local} endpoints")),
        "{attach}"
    );
    let coverage = check(&report, "coverage.endpoints")["summary"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        coverage.starts_with(&format!("{local} local pods")),
        "{coverage}"
    );

    // Detach pod_ingress from x/c's veth by hand (removing the link's pin releases the TCX link)
    // while the agent is frozen, so that it cannot repair it before verify looks.
    let pod = c.pod("x/c").clone();
    assert_eq!(pod.node, 0);
    let ifindex = ifindex_in(&c.nodes[0].name, &pod.host_veth);
    let pin = c.nodes[0]
        .pin_dir
        .join("links")
        .join(format!("{ifindex}-ingress"));
    let agent = c.agent_pid(0).expect("agent running") as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent, libc::SIGSTOP) };
    std::fs::remove_file(&pin).unwrap_or_else(|e| panic!("removing {}: {e}", pin.display()));

    let (code, report) = verify(&c, 0, &[]);
    // SAFETY: as above.
    unsafe { libc::kill(agent, libc::SIGCONT) };
    assert_eq!(code, 1, "{report:#}");
    let attach = check(&report, "agent.attachments");
    assert_eq!(attach["outcome"], "FAIL", "{attach:#}");
    let summary = attach["summary"].as_str().unwrap();
    assert!(summary.contains(&pod.host_veth), "{summary}");
    let details = attach["details"].to_string();
    assert!(
        details.contains("pod_ingress") && details.contains("no pinned link"),
        "{details}"
    );
    // A frozen agent does not answer: said, not waited for.
    let ready = check(&report, "agent.ready");
    assert_eq!(ready["outcome"], "FAIL", "{ready:#}");
    assert_eq!(outcome(&report, "engines.other"), "PASS");

    // Thawed, the agent puts the program back: the attachments pass again, and the agent reports
    // the repair (a warning: someone detached a program).
    let report = wait_for_exit(&mut c, 0, &[], 2);
    assert_eq!(outcome(&report, "agent.attachments"), "PASS", "{report:#}");
    let ready = check(&report, "agent.ready");
    assert_eq!(ready["outcome"], "WARN", "{ready:#}");
    assert!(
        ready["details"].to_string().contains("re-attached"),
        "{ready:#}"
    );
}

#[test]
fn verify_fails_when_the_agent_is_stopped() {
    let Some(mut c) = cluster_with_agents("verify_fails_when_the_agent_is_stopped") else {
        return;
    };
    wait_for_exit(&mut c, 0, &[], 0);
    c.stop_agent(0);
    let (code, report) = verify(&c, 0, &[]);
    assert_eq!(code, 1, "{report:#}");
    let ready = check(&report, "agent.ready");
    assert_eq!(ready["outcome"], "FAIL", "{ready:#}");
    assert!(
        ready["summary"]
            .as_str()
            .unwrap()
            .contains("no agent answers"),
        "{ready:#}"
    );
    // The pinned links keep the last policy enforced, and verify still sees them.
    let attach = check(&report, "agent.attachments");
    assert!(
        attach["summary"]
            .as_str()
            .unwrap()
            .contains("pinned links (no agent status)"),
        "{attach:#}"
    );
}

#[test]
fn verify_fails_when_a_kube_router_chain_is_present() {
    let Some(mut c) = cluster_with_agents("verify_fails_when_a_kube_router_chain_is_present")
    else {
        return;
    };
    wait_for_exit(&mut c, 0, &[], 0);
    let node = c.nodes[0].name.clone();
    ip_out(&[
        "netns",
        "exec",
        &node,
        "iptables",
        "-N",
        "KUBE-ROUTER-INPUT",
    ]);

    let (code, report) = verify(&c, 0, &[]);
    assert_eq!(code, 1, "{report:#}");
    let engines = check(&report, "engines.other");
    assert_eq!(engines["outcome"], "FAIL", "{engines:#}");
    assert!(
        engines["summary"].as_str().unwrap().contains("kube-router"),
        "{engines:#}"
    );
    let details = engines["details"].to_string();
    for needle in [
        "KUBE-ROUTER-INPUT",
        "intersection",
        "--disable-network-policy",
        "iptables-restore",
    ] {
        assert!(details.contains(needle), "{needle} not in {details}");
    }
    // The other node's iptables are its own: it still passes.
    assert_eq!(outcome(&verify(&c, 1, &[]).1, "engines.other"), "PASS");

    ip_out(&[
        "netns",
        "exec",
        &node,
        "iptables",
        "-X",
        "KUBE-ROUTER-INPUT",
    ]);
    let (code, report) = verify(&c, 0, &[]);
    assert_eq!(code, 0, "{report:#}");
}

/// Network namespace inodes some process (or thread) is in.
fn live_netns_inodes() -> Vec<u64> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            if let Ok(link) = std::fs::read_link(t.path().join("ns/net"))
                && let Some(ino) = link
                    .to_string_lossy()
                    .strip_prefix("net:[")
                    .and_then(|s| s.strip_suffix(']'))
                    .and_then(|s| s.parse().ok())
            {
                out.push(ino);
            }
        }
    }
    out
}

#[test]
fn self_test_passes_and_leaves_nothing_behind() {
    let Some(mut c) = cluster_with_agents("self_test_passes_and_leaves_nothing_behind") else {
        return;
    };
    wait_for_exit(&mut c, 0, &[], 0);
    let report = wait_for_exit(&mut c, 0, &["--self-test"], 0);
    assert_all_pass(&report);
    let st = check(&report, "selftest");
    let data = &st["data"];
    let probes = data["probes"].as_array().expect("probes");
    // Baseline and policy phase, allowed and denied port, IPv4 and IPv6.
    assert_eq!(probes.len(), 8, "{st:#}");
    for p in probes {
        assert_eq!(p["passed"], p["expect_pass"], "{p:#}");
    }
    assert!(
        probes
            .iter()
            .any(|p| p["phase"] == "policy" && p["passed"] == false)
    );
    assert!(data["dropped_delta"].as_u64().unwrap_or(0) > 0, "{st:#}");

    // Nothing left: scratch directory, mounts, programs, links, namespaces, the veth.
    let dir = data["scratch_dir"].as_str().expect("scratch_dir");
    assert!(!std::path::Path::new(dir).exists(), "{dir} left behind");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains("netpol-verify-selftest"), "{mounts}");
    let ids = |key: &str| -> Vec<u32> {
        data[key]
            .as_array()
            .expect(key)
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let (progs, links) = (ids("program_ids"), ids("link_ids"));
    assert_eq!((progs.len(), links.len()), (2, 2), "{st:#}");
    let loaded: Vec<u32> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| p.id())
        .collect();
    assert!(
        progs.iter().all(|id| !loaded.contains(id)),
        "{progs:?} still loaded"
    );
    let live_links: Vec<u32> = aya::programs::loaded_links()
        .filter_map(Result::ok)
        .map(|l| l.id())
        .collect();
    assert!(
        links.iter().all(|id| !live_links.contains(id)),
        "{links:?} still exist"
    );
    let inodes: Vec<u64> = data["netns_inodes"]
        .as_array()
        .expect("netns_inodes")
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(inodes.len(), 2);
    let live = live_netns_inodes();
    assert!(
        inodes.iter().all(|i| !live.contains(i)),
        "a scratch namespace {inodes:?} is still in use"
    );
    let node = &c.nodes[0].name;
    let veth = Command::new("ip")
        .args(["-n", node, "link", "show", "npst0"])
        .output()
        .unwrap();
    assert!(
        !veth.status.success(),
        "npst0 appeared in the node namespace"
    );
}
