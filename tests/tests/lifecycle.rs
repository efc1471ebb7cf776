//! End-to-end lifecycle of the agent on the simulated two-node Flannel cluster: SIGTERM and restart,
//! `cleanup`, following pod veths as they come and go, failing closed on bad input, CLI failures,
//! `status`, and anti-spoofing.
//!
//! Pods: x/a n0, x/b n1, x/c n0, y/a n1, y/b n0, y/c n1, z/a n0, z/b n1, z/c n0.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use netpol_agent::observe::control::Status;
use netpol_tests::cluster::{Cluster, Family, Pod, Proto, Reachability, default_agent_bin};
use netpol_tests::first_packet::{self, Running};
use netpol_tests::packets;

const PROBE_BIN: &str = env!("CARGO_BIN_EXE_netpol-probe");

const TCP80: (u16, Proto, Family) = (80, Proto::Tcp, Family::V4);
const UDP81: (u16, Proto, Family) = (81, Proto::Udp, Family::V4);
const TCP80_V6: (u16, Proto, Family) = (80, Proto::Tcp, Family::V6);
const UDP80_V6: (u16, Proto, Family) = (80, Proto::Udp, Family::V6);
const CASES: &[(u16, Proto, Family)] = &[TCP80, UDP81, TCP80_V6, UDP80_V6];

/// Generous: covers agent start-up (loading BPF, first sync) on a loaded 2-core machine.
const CONVERGE: Duration = Duration::from_secs(30);
/// How long a CLI invocation that must fail may take.
const CLI_DEADLINE: Duration = Duration::from_secs(30);

fn cluster(test: &str) -> Option<Cluster> {
    if !netpol_tests::privileged_or_skip(test, "needs root (network namespaces, bpffs)") {
        return None;
    }
    Some(Cluster::new(PROBE_BIN).unwrap_or_else(|e| panic!("cluster setup: {e:#}")))
}

fn agent_bin() -> PathBuf {
    let bin = default_agent_bin();
    assert!(
        bin.is_file(),
        "agent binary {} not found: `cargo build -p netpol-agent` first",
        bin.display()
    );
    bin
}

fn start(c: &mut Cluster) {
    c.start_agents(&agent_bin())
        .unwrap_or_else(|e| panic!("starting agents: {e:#}"));
}

fn np(name: &str, ns: &str, spec: &str) -> String {
    let mut s = format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n"
    );
    for l in spec.trim_matches('\n').lines() {
        s.push_str("  ");
        s.push_str(l);
        s.push('\n');
    }
    s
}

fn deny_ingress(ns: &str) -> String {
    np(
        &format!("deny-ingress-{ns}"),
        ns,
        "podSelector: {}\npolicyTypes: [Ingress]",
    )
}

fn expect(c: &mut Cluster, r: &Reachability, cases: &[(u16, Proto, Family)], timeout: Duration) {
    if let Err(e) = c.wait_for_all(r, cases, timeout) {
        panic!("{e:#}");
    }
}

/// Polls `f` every 50 ms until it returns `Ok(Some(_))`; panics with `what` and the last answer at
/// the deadline.
fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f() {
            Ok(Some(v)) => return v,
            Ok(None) => "condition not met".to_string(),
            Err(e) => e,
        };
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `netpol-agent ARGS` inside the netns of node `node` and waits for it (killed at `deadline`).
fn agent_cli(c: &Cluster, node: usize, args: &[OsString], deadline: Duration) -> Output {
    let child = Command::new("ip")
        .args(["netns", "exec", &c.nodes[node].name])
        .arg(agent_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning netpol-agent");
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(deadline) {
        Ok(out) => out.expect("waiting for netpol-agent"),
        Err(_) => {
            // SAFETY: the child has not been reaped (its waiter has not returned).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let out = rx
                .recv()
                .expect("waiter")
                .expect("waiting for netpol-agent");
            panic!(
                "netpol-agent {args:?} did not exit within {deadline:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

fn dirs_args(pin_dir: &Path, state_dir: &Path) -> Vec<OsString> {
    vec![
        "--pin-dir".into(),
        pin_dir.into(),
        "--state-dir".into(),
        state_dir.into(),
    ]
}

fn node_cli(c: &Cluster, node: usize, args: &[&str]) -> Output {
    let n = &c.nodes[node];
    let mut a = os(args);
    a.extend(dirs_args(&n.pin_dir, &n.state_dir));
    agent_cli(c, node, &a, CLI_DEADLINE)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `netpol-agent status -o json` of node `node`.
fn status(c: &Cluster, node: usize) -> Result<Status, String> {
    let out = node_cli(c, node, &["status", "-o", "json"]);
    if !out.status.success() {
        return Err(format!(
            "status failed ({}): {}",
            out.status,
            text(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("status JSON: {e}: {}", text(&out.stdout)))
}

fn local_pods(c: &Cluster, node: usize) -> Vec<String> {
    c.pods
        .iter()
        .filter(|p| p.node == node)
        .map(|p| p.id())
        .collect()
}

/// Waits until the agent of `node` is ready and lists exactly its local pods, all attached.
fn wait_synced(c: &Cluster, node: usize) -> Status {
    let mut want = local_pods(c, node);
    want.sort();
    wait_until(
        &format!("agent on node {node} to attach {want:?}"),
        CONVERGE,
        || {
            let s = status(c, node)?;
            let mut have: Vec<String> = s
                .endpoints
                .iter()
                .filter(|e| e.pending.is_none())
                .map(|e| e.pod.clone())
                .collect();
            have.sort();
            let ok = s.ready && have == want && s.endpoints.iter().all(|e| e.attached);
            Ok(ok.then_some(s))
        },
    )
}

fn counter(s: &Status, reason: &str) -> u64 {
    s.counters
        .iter()
        .find(|(r, _)| r == reason)
        .map(|(_, n)| *n)
        .unwrap_or_else(|| panic!("no counter {reason} in {:?}", s.counters))
}

/// Pin file name -> inode, for every pin under `dir/{maps,links}`.
fn pins(dir: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for sub in ["maps", "links"] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for e in entries.flatten() {
            let ino = e.metadata().map(|m| m.ino()).unwrap_or(0);
            out.insert(format!("{sub}/{}", e.file_name().to_string_lossy()), ino);
        }
    }
    out
}

fn link_pins(dir: &Path) -> Vec<String> {
    pins(dir)
        .into_keys()
        .filter(|k| k.starts_with("links/"))
        .collect()
}

fn ifindex(netns: &str, dev: &str) -> u32 {
    let out = Command::new("ip")
        .args(["-n", netns, "-j", "link", "show", "dev", dev])
        .output()
        .expect("ip link show");
    assert!(
        out.status.success(),
        "ip link show {dev}: {}",
        text(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
    v[0]["ifindex"].as_u64().expect("ifindex") as u32
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(out.status.success(), "ip {args:?}: {}", text(&out.stderr));
}

fn is_mountpoint(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let d = dir.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m == d))
}

/// Unmounts (if the agent mounted a bpffs there) and removes a directory a test made.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if is_mountpoint(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A netns the test made outside the harness; deleted on drop (its veths go with it).
struct ScratchNetns(String);

impl Drop for ScratchNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

// ------------------------------------------------------------------------------------------------
// 1. SIGTERM leaves enforcement in place; a new agent adopts the pins.
// ------------------------------------------------------------------------------------------------

#[test]
fn sigterm_keeps_enforcement_and_restart_adopts_pins() {
    let Some(mut c) = cluster("sigterm_keeps_enforcement_and_restart_adopts_pins") else {
        return;
    };
    c.apply_policies(&deny_ingress("x")).unwrap();
    start(&mut c);
    let mut denied_x = c.reachability(true);
    denied_x.expect_all_ingress("x/*", false);
    expect(&mut c, &denied_x, CASES, CONVERGE);
    let before: Vec<Status> = (0..2).map(|n| wait_synced(&c, n)).collect();
    let pins_before: Vec<_> = c.nodes.iter().map(|n| pins(&n.pin_dir)).collect();
    for (n, p) in pins_before.iter().enumerate() {
        let links = link_pins(&c.nodes[n].pin_dir);
        let tunnels = links.iter().filter(|l| l.ends_with("-tunnel")).count();
        assert_eq!(
            links.len() - tunnels,
            2 * local_pods(&c, n).len(),
            "two link pins per local pod on node {n}: {p:?}"
        );
        assert_eq!(
            tunnels, 3,
            "one link pin per exit device (flannel.1, flannel-v6.1, the underlay eth0) on node {n}: {p:?}"
        );
    }

    let t = Instant::now();
    for n in 0..2 {
        let st = c.stop_agent(n).expect("agent was running");
        assert!(
            st.success(),
            "agent on node {n} exited with {st} on SIGTERM"
        );
    }
    eprintln!("SIGTERM to exit, both agents: {:?}", t.elapsed());
    for (n, pins_before) in pins_before.iter().enumerate() {
        assert_eq!(
            &pins(&c.nodes[n].pin_dir),
            pins_before,
            "SIGTERM changed pins on node {n}"
        );
        let out = node_cli(&c, n, &["status"]);
        assert!(
            !out.status.success(),
            "status answered with the agent stopped"
        );
    }
    // With no agent at all: denied stays denied, allowed still flows.
    expect(&mut c, &denied_x, CASES, Duration::from_secs(10));
    for (node, pod) in [(0, "x/a"), (1, "x/b")] {
        assert!(
            c.probe_from_node(node, pod, 80, Proto::Tcp, Family::V4)
                .unwrap(),
            "node {node} -> {pod} blocked with the agent down"
        );
    }

    let log_len: Vec<usize> = (0..2).map(|n| c.agent_log(n).len()).collect();
    let t = Instant::now();
    start(&mut c);
    let after: Vec<Status> = (0..2).map(|n| wait_synced(&c, n)).collect();
    eprintln!("restart to synced: {:?}", t.elapsed());
    for n in 0..2 {
        assert_eq!(
            pins(&c.nodes[n].pin_dir),
            pins_before[n],
            "the new agent on node {n} re-created pins instead of adopting them"
        );
        // One bump and nothing else: the previous agent may have died between its map writes and
        // its bump, so revoked flows must be re-checked; the maps already held the policy.
        assert_eq!(
            after[n].generation,
            before[n].generation.wrapping_add(1),
            "the new agent on node {n} must bump the generation exactly once on adoption"
        );
        let log = c.agent_log(n);
        let new = &log[log_len[n]..];
        assert!(new.contains("agent started"), "node {n} log:\n{new}");
    }
    // Enforcement continued through the restart, and a change after it is enforced.
    expect(&mut c, &denied_x, &[TCP80], Duration::from_secs(10));
    c.apply_policies(&deny_ingress("y")).unwrap();
    let mut denied_y = c.reachability(true);
    denied_y.expect_all_ingress("y/*", false);
    expect(&mut c, &denied_y, CASES, CONVERGE);
    for (n, before) in before.iter().enumerate() {
        let s = status(&c, n).unwrap();
        assert!(
            s.generation > before.generation,
            "generation did not move on node {n}"
        );
    }
}

/// An agent restarted with other map sizes (`--max-*`, or a build that allocates a map otherwise)
/// replaces the pinned decision maps without a gap: while it copies the entries into maps of the
/// new size and swaps its programs into the pinned links, a denied peer's datagrams never arrive
/// and an allowed peer's, allowed through the resized IPCACHE and POLICY, all do.
#[test]
fn restart_with_other_map_sizes_resizes_without_a_gap() {
    let Some(mut c) = cluster("restart_with_other_map_sizes_resizes_without_a_gap") else {
        return;
    };
    let from_z = np(
        "from-z",
        "x",
        "podSelector: {}\npolicyTypes: [Ingress]\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {ns: z}}",
    );
    // First everything open, then only z into x: the buffer not in use keeps the open state, which
    // programs still reading the old maps would switch to when the new agent first switches.
    start(&mut c);
    let open = c.reachability(true);
    expect(&mut c, &open, &[UDP81], CONVERGE);
    c.apply_policies(&from_z).unwrap();
    let mut only_z = c.reachability(true);
    only_z
        .expect_all_ingress("x/*", false)
        .expect_peer("z/*", "x/*", true);
    expect(&mut c, &only_z, CASES, CONVERGE);
    let before = wait_synced(&c, 0);
    let target = c
        .pods
        .iter()
        .find(|p| p.node == 0 && p.namespace == "x")
        .expect("a pod of x on node 0")
        .clone();
    let (attacker, friend) = (c.pod("y/a").clone(), c.pod("z/a").clone());
    let for_ms = 12_000;
    let probe = Path::new(PROBE_BIN);
    // One port per sender, so each counter counts one peer.
    let rx = |port| Running::counter_on(probe, &target.netns, port, for_ms + 3_000).unwrap();
    let (denied_rx, allowed_rx) = (rx(9097), rx(9098));
    let tx = |from, port| Running::ticker_to(probe, from, &target, port, 10, for_ms).unwrap();
    let (denied_tx, allowed_tx) = (tx(&attacker, 9097), tx(&friend, 9098));

    let log_len = c.agent_log(0).len();
    let maps = c.nodes[0].pin_dir.join("maps");
    let mut args = os(&["--manifests", c.manifest_dir.to_str().unwrap()]);
    args.extend(os(&[
        "--max-addresses",
        "4096",
        "--max-policy-entries",
        "8192",
    ]));
    c.start_agent_with_source(0, &agent_bin(), &args)
        .unwrap_or_else(|e| panic!("restarting the agent: {e:#}"));
    let after = wait_synced(&c, 0);
    assert!(after.generation > before.generation);
    let log = c.agent_log(0)[log_len..].to_owned();
    assert!(log.contains("resized decision maps"), "log:\n{log}");
    for (name, size) in [("NP_IPCACHE0_V2", 4096), ("NP_POLICY1_V2", 8192)] {
        let info = aya::maps::MapInfo::from_pin(maps.join(name)).expect("pinned");
        assert_eq!(info.max_entries(), size, "{name}");
        assert!(
            !maps.join(format!("{name}_RESIZED")).exists(),
            "{name} left aside"
        );
    }

    let (sent, received, got) = tick_results(denied_tx, denied_rx);
    assert!(sent > 500, "the attacker sent only {sent} datagrams");
    assert_eq!(
        received, 0,
        "denied datagrams arrived during the resize: {got}"
    );
    let (sent, received, got) = tick_results(allowed_tx, allowed_rx);
    assert!(sent > 500, "the allowed peer sent only {sent} datagrams");
    assert_eq!(
        received, sent,
        "allowed datagrams were lost during the resize: {got}"
    );
    expect(&mut c, &only_z, CASES, CONVERGE);
}

// ------------------------------------------------------------------------------------------------
// 2. `cleanup`: refused while the agent runs; afterwards every pin is gone and nothing is enforced.
// ------------------------------------------------------------------------------------------------

#[test]
fn cleanup_refuses_while_running_then_removes_everything() {
    let Some(mut c) = cluster("cleanup_refuses_while_running_then_removes_everything") else {
        return;
    };
    c.apply_policies(&deny_ingress("x")).unwrap();
    start(&mut c);
    let mut denied_x = c.reachability(true);
    denied_x.expect_all_ingress("x/*", false);
    expect(&mut c, &denied_x, CASES, CONVERGE);
    for n in 0..2 {
        wait_synced(&c, n);
    }

    for n in 0..2 {
        let before = pins(&c.nodes[n].pin_dir);
        let out = node_cli(&c, n, &["cleanup"]);
        let err = text(&out.stderr);
        assert!(
            !out.status.success(),
            "cleanup with a running agent succeeded: {err}"
        );
        assert!(
            err.contains("agent is running")
                && err.contains(&*c.nodes[n].state_dir.to_string_lossy()),
            "unclear refusal: {err}"
        );
        assert_eq!(
            pins(&c.nodes[n].pin_dir),
            before,
            "refused cleanup touched pins"
        );
    }
    c.check_agents().unwrap();
    expect(&mut c, &denied_x, &[TCP80], Duration::from_secs(10));

    for n in 0..2 {
        c.stop_agent(n).expect("agent was running");
    }
    for n in 0..2 {
        let node = &c.nodes[n];
        let had = pins(&node.pin_dir).len();
        let out = node_cli(&c, n, &["cleanup"]);
        assert!(
            out.status.success(),
            "cleanup on node {n} failed: {}",
            text(&out.stderr)
        );
        let said = text(&out.stdout);
        assert!(said.contains(&format!("removed {had} pins")), "{said}");
        for sub in ["maps", "links"] {
            let d = node.pin_dir.join(sub);
            let left: Vec<_> = std::fs::read_dir(&d)
                .map(|r| r.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            assert!(left.is_empty(), "{} still holds {left:?}", d.display());
        }
        assert!(!node.state_dir.join("agent.sock").exists());
    }
    let t = Instant::now();
    let all = c.reachability(true);
    // TCP80 was denied a moment ago, so this cannot pass by looking at a stale state.
    expect(&mut c, &all, CASES, Duration::from_secs(15));
    eprintln!("cleanup to all-allowed: {:?}", t.elapsed());
}

// ------------------------------------------------------------------------------------------------
// 3. Following veths: pods go, pods come, a stray bridge port is policed on sight (pending).
// ------------------------------------------------------------------------------------------------

#[test]
fn follows_pod_veths_and_polices_unknown_ones_as_pending() {
    let Some(mut c) = cluster("follows_pod_veths_and_polices_unknown_ones_as_pending") else {
        return;
    };
    c.apply_policies(&deny_ingress("x")).unwrap();
    start(&mut c);
    let mut r = c.reachability(true);
    r.expect_all_ingress("x/*", false);
    expect(&mut c, &r, &[TCP80, UDP81], CONVERGE);
    let s0 = wait_synced(&c, 0);

    // A pod whose sandbox dies: its veth goes, and with it the pins and the status entry.
    let gone = s0
        .endpoints
        .iter()
        .find(|e| e.pod == "z/a")
        .expect("z/a in status")
        .clone();
    let pin_dir = c.nodes[0].pin_dir.clone();
    let gone_pins = [
        format!("links/{}-egress", gone.ifindex),
        format!("links/{}-ingress", gone.ifindex),
    ];
    assert!(gone_pins.iter().all(|p| pins(&pin_dir).contains_key(p)));
    let t = Instant::now();
    c.remove_pod("z/a").unwrap();
    wait_until(
        "z/a's pins and status entry to go",
        Duration::from_secs(10),
        || {
            let p = pins(&pin_dir);
            let s = status(&c, 0)?;
            let done = gone_pins.iter().all(|g| !p.contains_key(g))
                && s.endpoints.iter().all(|e| e.pod != "z/a");
            Ok(done.then_some(()))
        },
    );
    eprintln!(
        "veth deleted -> pins and status entry gone: {:?}",
        t.elapsed()
    );

    // A pod created after the agent started is attached and enforced by the existing policy.
    let t = Instant::now();
    let new = c.add_pod("x", "d", 1).unwrap();
    let ep = wait_until(
        "x/d to be attached on node 1",
        Duration::from_secs(10),
        || {
            let s = status(&c, 1)?;
            Ok(s.endpoints
                .into_iter()
                .find(|e| e.pod == "x/d" && e.attached))
        },
    );
    eprintln!("pod added -> attached: {:?}", t.elapsed());
    assert_eq!(ep.ifname, new.host_veth);
    assert!(ep.isolated_ingress && !ep.isolated_egress, "{ep:?}");
    assert_eq!(ep.ifindex, ifindex(&c.nodes[1].name, &new.host_veth));
    let mut r = c.reachability(true);
    r.expect_all_ingress("x/*", false);
    assert!(!r.get("y/a", "x/d"));
    expect(&mut c, &r, &[TCP80, UDP81, TCP80_V6], CONVERGE);
    eprintln!("pod added -> enforced: {:?}", t.elapsed());

    // A bridge port whose peer carries no pod's address gets the programs at once, pending: only
    // the node may talk to it, and it stays so through reconciles.
    let stray = ScratchNetns(format!("{}-stray", c.prefix));
    let node0 = c.nodes[0].name.clone();
    ip(&["netns", "add", &stray.0]);
    ip(&[
        "-n", &node0, "link", "add", "vstray0", "type", "veth", "peer", "name", "eth0", "netns",
        &stray.0,
    ]);
    ip(&["-n", &node0, "link", "set", "vstray0", "master", "cni0"]);
    ip(&["-n", &node0, "link", "set", "vstray0", "up"]);
    let stray_ifindex = ifindex(&node0, "vstray0");
    let stray_pins = [
        format!("links/{stray_ifindex}-egress"),
        format!("links/{stray_ifindex}-ingress"),
    ];
    let t = Instant::now();
    wait_until("the stray veth to be attached", CONVERGE, || {
        let p = pins(&pin_dir);
        Ok(stray_pins.iter().all(|s| p.contains_key(s)).then_some(()))
    });
    eprintln!("stray veth created -> attached: {:?}", t.elapsed());
    ip(&[
        "-n",
        &stray.0,
        "addr",
        "add",
        "10.42.0.250/24",
        "dev",
        "eth0",
    ]);
    ip(&[
        "-n",
        &stray.0,
        "addr",
        "add",
        "fd00:10:42::250/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    ip(&["-n", &stray.0, "link", "set", "eth0", "up"]);
    ip(&[
        "-n",
        &stray.0,
        "route",
        "add",
        "default",
        "via",
        "10.42.0.1",
    ]);
    let entry = wait_until("the stray veth listed as pending", CONVERGE, || {
        let s = status(&c, 0)?;
        Ok(s.endpoints
            .into_iter()
            .find(|e| e.ifindex == stray_ifindex && e.ips.contains(&"10.42.0.250".to_owned())))
    });
    assert_eq!(entry.pending.as_deref(), Some("unknown-pod"), "{entry:?}");
    assert!(entry.attached && entry.pod.is_empty(), "{entry:?}");
    assert!(entry.isolated_ingress && entry.isolated_egress, "{entry:?}");
    // Nothing between it and a pod, either way; the node reaches it.
    let server = Server::start(&stray.0, 80);
    let y_b = c.pod("y/b").ipv4.to_string();
    let from_stray = probe_in(
        &stray.0,
        &[&format!("tcp/{y_b}/80"), &format!("udp/{y_b}/80")],
    );
    assert!(
        from_stray.iter().all(|ok| !ok),
        "the stray veth reached y/b: {from_stray:?}"
    );
    assert_eq!(
        probe_in(&c.pod("y/b").netns, &["tcp/10.42.0.250/80"]),
        [false]
    );
    assert_eq!(
        probe_in(&node0, &["tcp/10.42.0.250/80"]),
        [true],
        "the node cannot reach a pending veth"
    );
    // Two policy changes, each a full reconcile that re-reads the veths: it stays pending.
    let mut generation = status(&c, 0).unwrap().generation;
    for (round, policies) in [
        format!("{}{}", deny_ingress("x"), deny_ingress("z")),
        deny_ingress("x"),
    ]
    .iter()
    .enumerate()
    {
        c.apply_policies(policies).unwrap();
        generation = wait_until(
            &format!("reconcile round {round} on node 0"),
            CONVERGE,
            || {
                let s = status(&c, 0)?;
                Ok((s.generation > generation).then_some(s.generation))
            },
        );
        let p = pins(&pin_dir);
        assert!(
            stray_pins.iter().all(|s| p.contains_key(s)),
            "stray veth detached in round {round}"
        );
    }
    let s = status(&c, 0).unwrap();
    assert!(counter(&s, "pending") > 0, "{:?}", s.counters);
    // The veth goes: so do its pins and its status entry.
    drop(server);
    drop(stray);
    wait_until("the stray veth's pins to go", CONVERGE, || {
        let p = pins(&pin_dir);
        let s = status(&c, 0)?;
        let gone = stray_pins.iter().all(|g| !p.contains_key(g))
            && s.endpoints.iter().all(|e| e.ifindex != stray_ifindex);
        Ok(gone.then_some(()))
    });
    // Every scan above parsed the kernel's link and address dumps (IPv6 addresses included): the
    // netlink crates must understand what this kernel sends, not log a complaint per scan.
    let log = c.agent_log(0);
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("netlink_packet"))
        .collect();
    assert!(
        complaints.is_empty(),
        "netlink parse complaints: {complaints:#?}"
    );
}

/// A probe server in a netns, killed when dropped (a process would keep a deleted netns alive).
struct Server(std::process::Child);

impl Server {
    /// Starts `netpol-probe serve` on TCP and UDP `port` in `netns` and waits until it listens.
    fn start(netns: &str, port: u16) -> Server {
        use std::io::BufRead as _;
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                PROBE_BIN,
                "serve",
                "--ports",
                &port.to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning a probe server");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading the server's READY");
        assert_eq!(line.trim(), "READY");
        Server(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Probes `targets` (`proto/addr/port`) from inside `netns`; whether each answered.
fn probe_in(netns: &str, targets: &[&str]) -> Vec<bool> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            PROBE_BIN,
            "probe",
            "--timeout-ms",
            "800",
        ])
        .args(targets)
        .output()
        .unwrap();
    let results: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("probe output: {e}: {}", text(&out.stdout)));
    results.iter().map(|r| r["ok"] == true).collect()
}

// ------------------------------------------------------------------------------------------------
// 4. Bad input fails closed and reports where; a file that stops parsing keeps its last good objects.
// ------------------------------------------------------------------------------------------------

#[test]
fn bad_input_fails_closed_and_keeps_last_good() {
    let Some(mut c) = cluster("bad_input_fails_closed_and_keeps_last_good") else {
        return;
    };
    let broken = np(
        "broken",
        "x",
        "podSelector:\n  matchLabels:\n    pod: a\npolicyTypes: [Ingress]\ningress:\n- from:\n  - ipBlock:\n      cidr: 10.42.0.0/33\n- ports:\n  - protocol: QUIC\n    port: 80",
    );
    c.apply_policies(&format!("{}{broken}", deny_ingress("y")))
        .unwrap();
    start(&mut c);
    let mut r = c.reachability(true);
    r.expect_all_ingress("y/*", false)
        .expect_all_ingress("x/a", false);
    expect(&mut c, &r, CASES, CONVERGE);
    // x/a's own node still reaches it.
    assert!(
        c.probe_from_node(0, "x/a", 80, Proto::Tcp, Family::V4)
            .unwrap()
    );
    for n in 0..2 {
        let s = wait_synced(&c, n);
        let e = s
            .errors
            .iter()
            .find(|e| e.contains("policies.yaml") && e.contains("x/broken"))
            .unwrap_or_else(|| panic!("no error naming the file and x/broken: {:?}", s.errors));
        assert!(
            e.contains("ipBlock") && e.contains("cidr"),
            "no field in {e}"
        );
        let e = s
            .errors
            .iter()
            .find(|e| e.contains("x/broken") && e.contains("protocol"))
            .unwrap_or_else(|| panic!("no error naming the protocol field: {:?}", s.errors));
        assert!(e.contains("policies.yaml") && e.contains("QUIC"), "{e}");
        if n == 0 {
            eprintln!("reported: {:#?}", s.errors);
        }
        if n == 0 {
            let ep = s.endpoints.iter().find(|e| e.pod == "x/a").unwrap();
            assert!(ep.isolated_ingress && !ep.isolated_egress, "{ep:?}");
        }
    }

    // Fixed: x/a now admits its own namespace.
    let fixed = np(
        "broken",
        "x",
        "podSelector:\n  matchLabels:\n    pod: a\npolicyTypes: [Ingress]\ningress:\n- from:\n  - podSelector: {}",
    );
    c.apply_policies(&format!("{}{fixed}", deny_ingress("y")))
        .unwrap();
    let mut good = c.reachability(true);
    good.expect_all_ingress("y/*", false)
        .expect_all_ingress("x/a", false)
        .expect_peer("x/*", "x/a", true);
    expect(&mut c, &good, &[TCP80, UDP81, TCP80_V6], CONVERGE);
    let good_gen: Vec<u32> = (0..2)
        .map(|n| {
            wait_until(&format!("no errors on node {n}"), CONVERGE, || {
                let s = status(&c, n)?;
                Ok(s.errors.is_empty().then_some(s.generation))
            })
        })
        .collect();

    // Garbage: the last good objects stay enforced, and the file is reported.
    c.apply_policies("{{{ this is: not [ YAML\n").unwrap();
    for (n, good_gen) in good_gen.iter().enumerate() {
        let s = wait_until(
            &format!("node {n} to report the bad file"),
            CONVERGE,
            || {
                let s = status(&c, n)?;
                Ok(s.errors
                    .iter()
                    .any(|e| e.contains("policies.yaml") && e.contains("last good"))
                    .then_some(s))
            },
        );
        assert_eq!(
            s.generation, *good_gen,
            "node {n} changed its maps on a bad file"
        );
        assert_eq!(s.policies, 2, "node {n} dropped policies: {:?}", s.errors);
    }
    expect(
        &mut c,
        &good,
        &[TCP80, UDP81, TCP80_V6],
        Duration::from_secs(10),
    );
}

// ------------------------------------------------------------------------------------------------
// 5. CLI failures: fail before touching anything, and leave a running agent alone.
// ------------------------------------------------------------------------------------------------

#[test]
fn run_failures_exit_non_zero_before_attaching() {
    let Some(mut c) = cluster("run_failures_exit_non_zero_before_attaching") else {
        return;
    };
    // A missing manifest directory.
    let pin = ScratchDir(c.tmp_dir.join("pins-missing"));
    let state = ScratchDir(c.tmp_dir.join("state-missing"));
    let missing = c.tmp_dir.join("no-such-manifests");
    let mut args = os(&[
        "run",
        "--node-name",
        &c.nodes[0].name.clone(),
        "--manifests",
    ]);
    args.push(missing.clone().into());
    args.extend(dirs_args(&pin.0, &state.0));
    let out = agent_cli(&c, 0, &args, CLI_DEADLINE);
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "run with a missing manifest dir succeeded"
    );
    assert!(
        err.contains(&*missing.to_string_lossy()),
        "does not name the dir: {err}"
    );
    assert!(!is_mountpoint(&pin.0), "mounted a bpffs before failing");
    assert!(pins(&pin.0).is_empty(), "left pins: {:?}", pins(&pin.0));
    for p in c.pods.iter().filter(|p| p.node == 0) {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &c.nodes[0].name,
                "bpftool",
                "net",
                "show",
                "dev",
                &p.host_veth,
            ])
            .output()
            .unwrap();
        assert!(
            !text(&out.stdout).contains("pod_"),
            "attached to {}",
            p.host_veth
        );
    }

    // A second agent on the same pin directory.
    c.apply_policies(&deny_ingress("x")).unwrap();
    start(&mut c);
    let mut r = c.reachability(true);
    r.expect_all_ingress("x/*", false);
    expect(&mut c, &r, &[TCP80], CONVERGE);
    wait_synced(&c, 0);
    let pins_before = pins(&c.nodes[0].pin_dir);
    let state2 = ScratchDir(c.tmp_dir.join("state-second"));
    let mut args = os(&[
        "run",
        "--node-name",
        &c.nodes[0].name.clone(),
        "--manifests",
    ]);
    args.push(c.manifest_dir.clone().into());
    args.extend(dirs_args(&c.nodes[0].pin_dir, &state2.0));
    let t = Instant::now();
    let out = agent_cli(&c, 0, &args, CLI_DEADLINE);
    let err = text(&out.stderr);
    eprintln!("second agent refused in {:?}", t.elapsed());
    assert!(
        !out.status.success(),
        "a second agent on the same pin dir ran: {err}"
    );
    assert!(
        err.contains(&*c.nodes[0].pin_dir.to_string_lossy()) && err.contains("in use"),
        "does not name the pin dir clash: {err}"
    );
    assert!(!state2.0.join("agent.sock").exists());
    c.check_agents().unwrap();
    let s = status(&c, 0).unwrap();
    assert!(s.ready && s.endpoints.iter().all(|e| e.attached));
    assert_eq!(
        pins(&c.nodes[0].pin_dir),
        pins_before,
        "the refused agent touched pins"
    );
    expect(&mut c, &r, &[TCP80, UDP81], Duration::from_secs(10));
}

// ------------------------------------------------------------------------------------------------
// 6. status: endpoints, isolation, maps and live counters, as JSON and as a table.
// ------------------------------------------------------------------------------------------------

#[test]
fn status_reports_endpoints_maps_and_counters() {
    let Some(mut c) = cluster("status_reports_endpoints_maps_and_counters") else {
        return;
    };
    let deny_egress_zc = np(
        "deny-egress-c",
        "z",
        "podSelector:\n  matchLabels:\n    pod: c\npolicyTypes: [Egress]",
    );
    c.apply_policies(&format!("{}{deny_egress_zc}", deny_ingress("x")))
        .unwrap();
    start(&mut c);
    let mut r = c.reachability(true);
    r.expect_all_ingress("x/*", false)
        .expect_all_egress("z/c", false);
    expect(&mut c, &r, &[TCP80, UDP81], CONVERGE);

    for n in 0..2 {
        let s = wait_synced(&c, n);
        assert_eq!(s.node, c.nodes[n].name);
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        assert_eq!((s.namespaces, s.pods, s.policies), (3, 9, 2));
        for p in c.pods.iter().filter(|p| p.node == n) {
            let e = s.endpoints.iter().find(|e| e.pod == p.id()).unwrap();
            assert_eq!(e.ifname, p.host_veth, "{}", p.id());
            assert_eq!(e.ifindex, ifindex(&c.nodes[n].name, &p.host_veth));
            assert!(e.attached);
            assert!(e.ips.contains(&p.ipv4.to_string()) && e.ips.contains(&p.ipv6.to_string()));
            assert_eq!(e.isolated_ingress, p.namespace == "x", "{e:?}");
            assert_eq!(e.isolated_egress, p.id() == "z/c", "{e:?}");
        }
        let map = |name: &str| {
            s.maps
                .iter()
                .find(|m| m.name == name)
                .unwrap_or_else(|| panic!("no map {name} in {:?}", s.maps))
                .clone()
        };
        use netpol_common::{capacity, map_labels};
        let eps = map(map_labels::ENDPOINTS);
        assert_eq!(
            (eps.entries, eps.capacity),
            (local_pods(&c, n).len(), capacity::ENDPOINTS)
        );
        let ipc = map(map_labels::IPCACHE);
        assert!(
            ipc.entries >= 18 && ipc.capacity == capacity::IPCACHE,
            "{ipc:?}"
        );
        assert_eq!(map(map_labels::POLICY).capacity, capacity::POLICY);
        assert_eq!(map(map_labels::CIDRS).capacity, capacity::CIDRS);
    }

    // Denied probes show up in the counters of the receiving node, without any other change.
    let before = status(&c, 0).unwrap();
    let denied_before = counter(&before, "ingress-denied");
    for _ in 0..3 {
        assert!(
            !c.probe_matrix(80, Proto::Tcp, Family::V4)
                .unwrap()
                .get("y/a", "x/a")
        );
    }
    let after = wait_until(
        "ingress-denied to increase on node 0",
        Duration::from_secs(10),
        || {
            let s = status(&c, 0)?;
            Ok((counter(&s, "ingress-denied") > denied_before).then_some(s))
        },
    );
    assert_eq!(after.generation, before.generation);
    assert!(counter(&after, "policy") + counter(&after, "not-isolated") > 0);
    // Well-behaved pods (their ARP, neighbour discovery, MLD, IPv4 and IPv6 traffic) never trip the
    // hostile-pod checks: those counters only ever count attacks.
    for reason in [
        "spoofed-link",
        "spoofed-source",
        "not-for-pod",
        "ethertype",
        "malformed",
    ] {
        assert_eq!(counter(&after, reason), 0, "{reason} on a quiet node");
    }

    let out = node_cli(&c, 0, &["status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(table.contains("ready:       true"), "{table}");
    for p in c.pods.iter().filter(|p| p.node == 0) {
        let line = table
            .lines()
            .find(|l| l.starts_with(&p.id()))
            .unwrap_or_else(|| panic!("no line for {}:\n{table}", p.id()));
        assert!(
            line.contains(&p.host_veth) && line.contains(&p.ipv4.to_string()),
            "{line}"
        );
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            fields[3..6],
            [
                (p.namespace == "x").to_string().as_str(),
                (p.id() == "z/c").to_string().as_str(),
                "true"
            ],
            "{line}"
        );
    }
    let denied_line = table
        .lines()
        .find(|l| l.starts_with("ingress-denied"))
        .unwrap_or_else(|| panic!("no ingress-denied line:\n{table}"));
    let shown: u64 = denied_line
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(shown > denied_before, "{denied_line}");
    assert!(table.contains(netpol_common::map_labels::POLICY) && table.contains("no problems"));
}

// ------------------------------------------------------------------------------------------------
// 7. Anti-spoofing, IPv4 and IPv6.
// ------------------------------------------------------------------------------------------------

/// Sends one UDP datagram from `src` (an address on an interface of `netns`) to `dst` and waits
/// `timeout` for the probe server's echo.
fn udp_echo_from(
    netns: &str,
    src: IpAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<bool, String> {
    let ns = std::fs::File::open(Path::new("/run/netns").join(netns)).map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        // SAFETY: setns on a valid fd; only this short-lived thread changes namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        let s = UdpSocket::bind(SocketAddr::new(src, 0)).map_err(|e| format!("bind {src}: {e}"))?;
        s.connect(dst).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let msg = format!("spoof-test {src} {:?}", Instant::now());
        s.send(msg.as_bytes()).map_err(|e| format!("send: {e}"))?;
        let mut buf = [0u8; 512];
        match s.recv(&mut buf) {
            Ok(n) => Ok(buf[..n].starts_with(msg.as_bytes())),
            Err(_) => Ok(false),
        }
    })
    .join()
    .map_err(|_| "sender thread panicked".to_string())?
}

#[test]
fn spoofed_source_is_dropped_dual_stack() {
    let Some(mut c) = cluster("spoofed_source_is_dropped_dual_stack") else {
        return;
    };
    let from = c.pod("x/a").clone();
    let to = c.pod("x/b").clone();
    // (spoofed source, its prefix on x/a's eth0, real source, destination) per family.
    let cases: [(IpAddr, &str, IpAddr, SocketAddr); 2] = [
        (
            "10.42.0.200".parse().unwrap(),
            "10.42.0.200/32",
            IpAddr::V4(from.ipv4),
            SocketAddr::new(IpAddr::V4(to.ipv4), 80),
        ),
        (
            "fd00:10:42::200".parse().unwrap(),
            "fd00:10:42::200/128",
            IpAddr::V6(from.ipv6),
            SocketAddr::new(IpAddr::V6(to.ipv6), 80),
        ),
    ];
    let echo = |src: IpAddr, dst: SocketAddr| {
        udp_echo_from(&from.netns, src, dst, Duration::from_millis(500))
    };
    for (spoofed, prefix, _, dst) in cases {
        ip(&[
            "-n",
            &from.netns,
            "addr",
            "add",
            prefix,
            "dev",
            "eth0",
            "nodad",
        ]);
        // Without the agent the spoofed source gets through: the setup itself does not drop it.
        wait_until(
            &format!("spoofed {spoofed} -> {dst} to pass without the agent"),
            Duration::from_secs(10),
            || Ok(echo(spoofed, dst)?.then_some(())),
        );
    }

    c.apply_policies("").unwrap();
    start(&mut c);
    for n in 0..2 {
        wait_synced(&c, n);
    }
    let before = counter(&status(&c, 0).unwrap(), "spoofed-source");
    for (spoofed, _, real, dst) in cases {
        wait_until(
            &format!("real {real} -> {dst} to pass with the agent"),
            Duration::from_secs(10),
            || Ok(echo(real, dst)?.then_some(())),
        );
        for attempt in 0..3 {
            assert!(
                !echo(spoofed, dst).unwrap(),
                "spoofed {spoofed} reached {dst} (attempt {attempt})"
            );
        }
    }
    let after = wait_until(
        "spoofed-source to count both families",
        Duration::from_secs(10),
        || {
            let n = counter(&status(&c, 0)?, "spoofed-source");
            Ok((n >= before + 6).then_some(n))
        },
    );
    eprintln!("spoofed-source: {before} -> {after}");
    c.check_agents().unwrap();
}

// ------------------------------------------------------------------------------------------------
// A hostile pod on a live node: frames crafted inside a pod (raw socket, as CAP_NET_RAW allows)
// against the node's neighbour table. First without agents, to show the attack works here; then
// with them, where it must not.
// ------------------------------------------------------------------------------------------------

/// The MAC of `dev` in network namespace `netns`.
fn mac_of(netns: &str, dev: &str) -> [u8; 6] {
    let out = Command::new("ip")
        .args(["-n", netns, "-j", "link", "show", dev])
        .output()
        .expect("ip link show");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    parse_mac(links[0]["address"].as_str().expect("an address")).expect("a MAC")
}

/// `aa:bb:cc:dd:ee:ff` as bytes.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    hex::decode(text.replace(':', "")).ok()?.try_into().ok()
}

/// The MAC the node's neighbour table holds for `ip` on cni0, if any.
fn neighbour_mac(node: &str, ip: IpAddr) -> Option<[u8; 6]> {
    let out = Command::new("ip")
        .args([
            "-n",
            node,
            "-j",
            "neigh",
            "show",
            &ip.to_string(),
            "dev",
            "cni0",
        ])
        .output()
        .expect("ip neigh show");
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    parse_mac(entries.get(0)?.get("lladdr")?.as_str()?)
}

/// The ICMPv6 checksum of `icmp` from `src` to `dst` (RFC 8200 8.1 pseudo-header).
fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, icmp: &[u8]) -> u16 {
    let mut data = Vec::new();
    data.extend_from_slice(&src.octets());
    data.extend_from_slice(&dst.octets());
    data.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    data.extend_from_slice(&[0, 0, 0, 58]);
    data.extend_from_slice(icmp);
    packets::checksum(&data)
}

/// A gratuitous ARP claiming `victim` and an advertisement of `victim6` (with the node as its
/// destination), both with the attacker's own MAC and addresses everywhere else: only the claimed
/// address is a lie. Broadcast, so the node takes them whatever MAC it has.
fn poison_frames(attacker: &Pod, mac: [u8; 6], victim: &Pod, gateway6: Ipv6Addr) -> Vec<String> {
    let mut arp = packets::arp(mac, mac, victim.ipv4.octets(), victim.ipv4.octets());
    arp[..6].copy_from_slice(&[0xff; 6]);
    let na = packets::neighbour(
        attacker.ipv6.into(),
        gateway6.into(),
        136,
        victim.ipv6,
        Some(mac),
    )
    .src_mac(mac);
    let mut na = na.build();
    na[..6].copy_from_slice(&[0xff; 6]);
    let icmp = 14 + 40;
    let sum = icmpv6_checksum(attacker.ipv6, gateway6, &na[icmp..]);
    na[icmp + 2..icmp + 4].copy_from_slice(&sum.to_be_bytes());
    vec![hex::encode(arp), hex::encode(na)]
}

/// Sends `frames` from inside `pod`.
fn send_from_pod(pod: &Pod, frames: &[String]) {
    let out = Command::new("ip")
        .args(["netns", "exec", &pod.netns])
        .arg(PROBE_BIN)
        .args(["raw", "--dev", "eth0"])
        .args(frames)
        .output()
        .expect("netpol-probe raw");
    assert!(out.status.success(), "raw send: {}", text(&out.stderr));
}

/// The node reaches `pod` over both families (and so has neighbour entries for it).
fn reach_from_node(c: &Cluster, pod: &str) {
    for family in [Family::V4, Family::V6] {
        assert!(
            c.probe_from_node(0, pod, 80, Proto::Tcp, family).unwrap(),
            "the node must reach {pod} over {family:?}"
        );
    }
}

#[test]
fn a_pod_cannot_poison_the_nodes_neighbour_entries() {
    let Some(mut c) = cluster("a_pod_cannot_poison_the_nodes_neighbour_entries") else {
        return;
    };
    let on_node0: Vec<Pod> = c.pods.iter().filter(|p| p.node == 0).cloned().collect();
    let (attacker, victim) = (&on_node0[0], &on_node0[1]);
    let node = c.nodes[0].name.clone();
    let gateway6 = c.nodes[0].gateway_v6();
    // Entries may be overridden at once (the default locktime would hide a second attempt).
    let sysctl = Command::new("ip")
        .args(["netns", "exec", &node, "sysctl", "-qw"])
        .args([
            "net.ipv4.neigh.cni0.locktime=0",
            "net.ipv6.neigh.cni0.locktime=0",
        ])
        .status()
        .expect("sysctl");
    assert!(sysctl.success());
    let attacker_mac = mac_of(&attacker.netns, "eth0");
    let victim_mac = mac_of(&victim.netns, "eth0");
    let frames = poison_frames(attacker, attacker_mac, victim, gateway6);
    let victim_id = victim.id();
    let entries = |c: &Cluster| {
        [Family::V4, Family::V6].map(|f| neighbour_mac(&node, c.pod(&victim_id).ip(f)))
    };

    // Without agents the node believes the attacker: the test can fail.
    reach_from_node(&c, &victim_id);
    assert_eq!(entries(&c), [Some(victim_mac); 2], "primed");
    send_from_pod(attacker, &frames);
    wait_until("the unprotected node to take the poison", CONVERGE, || {
        let now = entries(&c);
        Ok((now == [Some(attacker_mac); 2]).then_some(()))
    });

    // With the agents, the same frames are dropped at the attacker's veth (and counted there).
    let flush = Command::new("ip")
        .args(["-n", &node, "neigh", "flush", "dev", "cni0"])
        .status()
        .expect("ip neigh flush");
    assert!(flush.success());
    start(&mut c);
    wait_synced(&c, 0);
    reach_from_node(&c, &victim_id);
    assert_eq!(entries(&c), [Some(victim_mac); 2], "primed again");
    let spoofed = |c: &Cluster| -> Result<u64, String> {
        let s = status(c, 0)?;
        Ok(s.counters
            .iter()
            .find(|(name, _)| name == "spoofed-link")
            .map_or(0, |(_, n)| *n))
    };
    let before = spoofed(&c).unwrap();
    send_from_pod(attacker, &frames);
    wait_until("both spoofed frames to be dropped", CONVERGE, || {
        Ok((spoofed(&c)? >= before + 2).then_some(()))
    });
    assert_eq!(
        entries(&c),
        [Some(victim_mac); 2],
        "the node's entries for {victim_id} must stay the victim's"
    );
    reach_from_node(&c, &victim_id);
}

// ------------------------------------------------------------------------------------------------
// Another TCX program put before the agent's on a pod veth is reported (status problems), and the
// report goes away with it.
// ------------------------------------------------------------------------------------------------

#[test]
fn a_program_attached_before_the_agents_is_reported() {
    use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttachOptions};

    let Some(mut c) = cluster("a_program_attached_before_the_agents_is_reported") else {
        return;
    };
    start(&mut c);
    wait_synced(&c, 0);
    let pod = c.pods.iter().find(|p| p.node == 0).unwrap().clone();
    let node = c.nodes[0].name.clone();
    let pins = c.tmp_dir.join("foreign-bpffs");
    std::fs::create_dir_all(&pins).unwrap();
    /// Unmounts the scratch bpffs when the test ends, also when it fails.
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let mounted = Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(&pins)
        .status()
        .unwrap();
    assert!(mounted.success());
    let _unmount = Unmount(pins.clone());
    // A copy of the agent's own egress program, loaded on scratch maps and attached first, in the
    // node's namespace, by a thread that keeps the link until told to drop it.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let pins_in = pins.clone();
    let veth = pod.host_veth.clone();
    let holder = std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/var/run/netns/{node}")).unwrap();
        // SAFETY: setns on this thread only, with a valid namespace fd.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let attach = || -> Result<_, String> {
            let mut ebpf = aya::EbpfLoader::new()
                .default_map_pin_directory(&pins_in)
                .load(netpol_agent::datapath::EBPF_OBJECT)
                .map_err(|e| e.to_string())?;
            let prog: &mut SchedClassifier =
                ebpf.program_mut("pod_egress").unwrap().try_into().unwrap();
            prog.load().map_err(|e| e.to_string())?;
            let order = TcAttachOptions::TcxOrder(LinkOrder::first());
            prog.attach_with_options(&veth, TcAttachType::Ingress, order)
                .map_err(|e| e.to_string())?;
            Ok(ebpf)
        };
        match attach() {
            Ok(ebpf) => {
                ready_tx.send(Ok(())).unwrap();
                let _ = rx.recv();
                drop(ebpf);
            }
            Err(e) => ready_tx.send(Err(e)).unwrap(),
        }
    });
    ready_rx
        .recv()
        .unwrap()
        .expect("attaching the foreign program");
    let reported = |c: &Cluster| -> Result<bool, String> {
        Ok(status(c, 0)?
            .errors
            .iter()
            .any(|e| e.contains(&pod.host_veth) && e.contains("run before pod_egress")))
    };
    wait_until("the foreign program to be reported", CONVERGE, || {
        Ok(reported(&c)?.then_some(()))
    });
    tx.send(()).unwrap();
    holder.join().unwrap();
    wait_until("the report to clear", CONVERGE, || {
        Ok((!reported(&c)?).then_some(()))
    });
}

// ------------------------------------------------------------------------------------------------
// 8. From the first packet: a new pod is policed before it can send, also while the agent is
//    down (with the CNI plugin), and a node whose pins are gone enforces the saved state before
//    the API answers.
// ------------------------------------------------------------------------------------------------

/// How long the new pod sends (every 10 ms) and the receiver counts.
const TICK_FOR: Duration = Duration::from_millis(3000);

/// The counting receiver in `netns`, for the ticker's time and some.
fn start_receiver(netns: &str) -> Running {
    let ms = (TICK_FOR + Duration::from_secs(3)).as_millis() as u64;
    Running::counter(Path::new(PROBE_BIN), netns, ms).expect("counter")
}

/// The new pod's ticker towards the receiver in `target`.
fn start_ticker(pod: &Pod, target: &Pod) -> Running {
    let ms = TICK_FOR.as_millis() as u64;
    Running::ticker(Path::new(PROBE_BIN), pod, target, 10, ms).expect("ticker")
}

/// Runs `netpol-cni` for `pod` as the container runtime does.
fn run_cni(c: &Cluster, pod: &Pod, command: &str) -> Output {
    let bin = netpol_tests::cluster::default_cni_bin();
    assert!(bin.is_file(), "{} not built", bin.display());
    first_packet::run_cni(&bin, c, pod, command).expect("running netpol-cni")
}

/// A cluster whose namespace x denies all egress, agents running and synced.
fn deny_egress_cluster(test: &str) -> Option<Cluster> {
    let mut c = cluster(test)?;
    c.apply_policies(&np(
        "deny-egress",
        "x",
        "podSelector: {}\npolicyTypes: [Egress]",
    ))
    .unwrap();
    start(&mut c);
    wait_synced(&c, 0);
    Some(c)
}

/// Waits until node 0's agent has the programs on `pod`'s veth (pending or matched).
fn wait_attached(c: &Cluster, pod: &Pod) -> Duration {
    let t = Instant::now();
    let pin_dir = c.nodes[0].pin_dir.clone();
    let index = ifindex(&c.nodes[0].name, &pod.host_veth);
    wait_until("the new veth to be attached", CONVERGE, || {
        let p = pins(&pin_dir);
        Ok(["egress", "ingress"]
            .iter()
            .all(|h| p.contains_key(&format!("links/{index}-{h}")))
            .then_some(()))
    });
    t.elapsed()
}

/// The ticker's and the counter's results: how many datagrams the new pod sent, how many arrived.
fn tick_results(ticker: Running, counter: Running) -> (u64, u64, serde_json::Value) {
    let sent = ticker.result().expect("ticker result");
    let got = counter.result().expect("counter result");
    (
        sent["sent"].as_u64().unwrap(),
        got["received"].as_u64().unwrap(),
        got,
    )
}

#[test]
fn a_new_pod_is_policed_from_its_first_packet() {
    let Some(mut c) = deny_egress_cluster("a_new_pod_is_policed_from_its_first_packet") else {
        return;
    };
    let target = c.pod("y/b").clone();
    // Without the plugin: the veth appears (the bridge plugin's first step) and is attached on
    // sight, pending; the pod's side then comes up and its process talks from its first instant.
    let receiver = start_receiver(&target.netns);
    let pod = c.schedule_pod("x", "new", 0, &[("pod", "new")]).unwrap();
    c.wire_link(&pod).unwrap();
    let attached = wait_attached(&c, &pod);
    eprintln!("veth created -> programs attached (pending): {attached:?}");
    c.configure_pod(&pod).unwrap();
    let ticker = start_ticker(&pod, &target);
    // The kubelet reports the pod's address halfway: from pending to x's deny-all egress.
    std::thread::sleep(TICK_FOR / 2);
    c.report_pod_ip("x/new").unwrap();
    let (sent, received, got) = tick_results(ticker, receiver);
    assert!(sent > 100, "the pod sent only {sent} datagrams");
    assert_eq!(
        received, 0,
        "packets of a deny-all-egress pod arrived: {got}"
    );
    let s = status(&c, 0).unwrap();
    assert!(
        counter(&s, "pending") > 0,
        "pending drops: {:?}",
        s.counters
    );
    let ep = s
        .endpoints
        .iter()
        .find(|e| e.pod == "x/new")
        .expect("x/new matched");
    assert!(ep.isolated_egress && ep.pending.is_none(), "{ep:?}");

    // With the plugin: ADD returns once the endpoint is programmed, before the API has the IP.
    let receiver = start_receiver(&target.netns);
    let pod = c.schedule_pod("x", "cni", 0, &[("pod", "cni")]).unwrap();
    c.wire(&pod).unwrap();
    let t = Instant::now();
    let add = run_cni(&c, &pod, "ADD");
    eprintln!("CNI ADD -> programmed: {:?}", t.elapsed());
    assert!(
        add.status.success(),
        "CNI ADD failed: {} {}",
        text(&add.stdout),
        text(&add.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&add.stdout).unwrap();
    assert_eq!(
        result["ips"][0]["address"],
        format!("{}/24", pod.ipv4),
        "prevResult passed on"
    );
    let s = status(&c, 0).unwrap();
    let ep = s
        .endpoints
        .iter()
        .find(|e| e.pod == "x/cni")
        .expect("x/cni matched by its claim");
    assert!(ep.attached && ep.isolated_egress, "{ep:?}");
    let ticker = start_ticker(&pod, &target);
    let (sent, received, got) = tick_results(ticker, receiver);
    assert!(sent > 100, "the pod sent only {sent} datagrams");
    assert_eq!(
        received, 0,
        "packets of a deny-all-egress pod arrived: {got}"
    );
    let del = run_cni(&c, &pod, "DEL");
    assert!(
        del.status.success(),
        "CNI DEL failed: {}",
        text(&del.stderr)
    );
}

#[test]
fn with_the_cni_plugin_a_pod_created_while_the_agent_is_down_waits_for_it() {
    let Some(mut c) = deny_egress_cluster(
        "with_the_cni_plugin_a_pod_created_while_the_agent_is_down_waits_for_it",
    ) else {
        return;
    };
    let target = c.pod("y/b").clone();
    c.stop_agent(0);
    let pod = c.schedule_pod("x", "late", 0, &[("pod", "late")]).unwrap();
    c.wire(&pod).unwrap();
    // The agent is down: ADD fails (the kubelet tears the sandbox down and retries).
    let add = run_cni(&c, &pod, "ADD");
    assert!(!add.status.success(), "ADD succeeded without an agent");
    let err: serde_json::Value = serde_json::from_slice(&add.stdout).unwrap();
    assert_eq!(err["code"], 11, "{err}");
    assert!(err["msg"].as_str().unwrap().contains("x/late"), "{err}");
    // Two seconds later the agent is back; the kubelet's retries then succeed.
    std::thread::sleep(Duration::from_secs(2));
    c.start_agent(0, &agent_bin()).unwrap();
    let t = Instant::now();
    wait_until(
        "CNI ADD to succeed once the agent is back",
        CONVERGE,
        || {
            let add = run_cni(&c, &pod, "ADD");
            Ok(add.status.success().then_some(()))
        },
    );
    eprintln!("agent restarted -> CNI ADD succeeds: {:?}", t.elapsed());
    let receiver = start_receiver(&target.netns);
    let ticker = start_ticker(&pod, &target);
    let (sent, received, got) = tick_results(ticker, receiver);
    assert!(sent > 100, "the pod sent only {sent} datagrams");
    assert_eq!(
        received, 0,
        "packets of a deny-all-egress pod arrived: {got}"
    );
}

#[test]
fn a_node_without_pins_enforces_the_saved_state_while_the_api_is_unreachable() {
    let Some(mut c) =
        cluster("a_node_without_pins_enforces_the_saved_state_while_the_api_is_unreachable")
    else {
        return;
    };
    c.apply_policies(&deny_ingress("x")).unwrap();
    start(&mut c);
    let mut r = c.reachability(true);
    r.expect_all_ingress("x/*", false);
    expect(&mut c, &r, &[TCP80], CONVERGE);
    let saved = c.nodes[0].state_dir.join("cluster-state.json");
    // SIGTERM saves the state at once (otherwise within seconds of each change).
    c.stop_agent(0);
    assert!(saved.is_file(), "no saved state at {}", saved.display());
    // As after a reboot: no programs, no pins.
    let out = node_cli(&c, 0, &["cleanup"]);
    assert!(out.status.success(), "cleanup: {}", text(&out.stderr));
    // Node 1 still enforces for x/b; node 0's x pods are open.
    let mut open0 = c.reachability(true);
    open0.expect_all_ingress("x/b", false);
    expect(&mut c, &open0, &[TCP80], CONVERGE);
    // The agent comes back with an API server that does not answer.
    let kubeconfig = c.tmp_dir.join("unreachable.kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}\nusers:\n- name: u\n  user: {token: t}\ncontexts:\n- name: c\n  context: {cluster: c, user: u}\ncurrent-context: c\n",
    )
    .unwrap();
    c.start_agent_with_source(
        0,
        &agent_bin(),
        &os(&["--kubeconfig", kubeconfig.to_str().unwrap()]),
    )
    .unwrap();
    expect(&mut c, &r, &[TCP80, UDP81], CONVERGE);
    let s = status(&c, 0).unwrap();
    assert!(!s.ready, "ready on a saved state");
    assert!(
        s.errors
            .iter()
            .any(|e| e.contains("enforcing the cluster state saved at")),
        "{:?}",
        s.errors
    );
    let local: Vec<&str> = s.endpoints.iter().map(|e| e.pod.as_str()).collect();
    for p in local_pods(&c, 0) {
        assert!(
            local.contains(&p.as_str()),
            "{p} not matched from the saved state: {local:?}"
        );
    }
}

/// The capabilities `deploy/daemonset.yaml` adds to the agent's container, lower case.
fn daemonset_capabilities() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let yaml: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let add = &yaml["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]
        ["add"];
    add.as_sequence()
        .expect("capabilities.add")
        .iter()
        .map(|c| c.as_str().unwrap().to_ascii_lowercase())
        .collect()
}

#[test]
fn the_daemonsets_capabilities_are_enough_for_the_agent() {
    let Some(mut c) = cluster("the_daemonsets_capabilities_are_enough_for_the_agent") else {
        return;
    };
    let caps = daemonset_capabilities();
    assert!(caps.contains(&"bpf".to_owned()), "{caps:?}");
    let bounding: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
    c.agent_wrapper = os(&[
        "setpriv",
        "--inh-caps=-all",
        &format!("--bounding-set=-all,{}", bounding.join(",")),
        "--",
    ]);
    c.apply_policies(&deny_ingress("x")).unwrap();
    start(&mut c);
    let mut r = c.reachability(true);
    r.expect_all_ingress("x/*", false);
    expect(&mut c, &r, &[TCP80], CONVERGE);
    wait_synced(&c, 0);
    // A pod's address is heard from its namespace (NET_BROADCAST), not found by the periodic scan.
    let log = c.agent_log(0);
    assert!(!log.contains("CAP_NET_BROADCAST missing"), "{log}");
    assert!(!log.contains("Operation not permitted"), "{log}");
}

// ------------------------------------------------------------------------------------------------
// 9. Self-healing: programs detached or swapped out by someone else come back within a second.
// ------------------------------------------------------------------------------------------------

/// The names of the TCX programs on both hooks of `dev` in `netns`, as the kernel lists them
/// (bpftool 7.1 does not show TCX): queried from a thread that enters the namespace.
fn tcx_programs(netns: &str, dev: &str) -> String {
    use aya::programs::{SchedClassifier, TcAttachType};
    let (netns, dev) = (netns.to_owned(), dev.to_owned());
    std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/var/run/netns/{netns}")).unwrap();
        // SAFETY: setns on this thread only, with a valid namespace fd.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let mut names = Vec::new();
        for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
            if let Ok((_, progs)) = SchedClassifier::query_tcx(&dev, hook) {
                names.extend(
                    progs
                        .iter()
                        .filter_map(|p| p.name_as_str().map(str::to_owned)),
                );
            }
        }
        names.join(" ")
    })
    .join()
    .unwrap()
}

#[test]
fn a_detached_program_is_reattached_and_reported() {
    let Some(mut c) = cluster("a_detached_program_is_reattached_and_reported") else {
        return;
    };
    c.apply_policies(&deny_ingress("x")).unwrap();
    start(&mut c);
    let mut r = c.reachability(true);
    r.expect_all_ingress("x/*", false);
    expect(&mut c, &r, &[TCP80], CONVERGE);
    wait_synced(&c, 0);
    let pod = c.pod("x/a").clone();
    let node0 = c.nodes[0].name.clone();
    let index = ifindex(&node0, &pod.host_veth);
    let links = c.nodes[0].pin_dir.join("links");
    // One link detached in the kernel (its pin stays), the other's pin removed (which releases it).
    let detach = Command::new("ip")
        .args([
            "netns", "exec", &node0, "bpftool", "link", "detach", "pinned",
        ])
        .arg(links.join(format!("{index}-ingress")))
        .output()
        .unwrap();
    assert!(
        detach.status.success(),
        "bpftool link detach: {}",
        text(&detach.stderr)
    );
    std::fs::remove_file(links.join(format!("{index}-egress"))).unwrap();
    let t = Instant::now();
    wait_until("both programs back on x/a's veth", CONVERGE, || {
        let shown = tcx_programs(&node0, &pod.host_veth);
        if shown.contains("pod_ingress") && shown.contains("pod_egress") {
            return Ok(Some(()));
        }
        Err(format!("bpftool shows: {shown}"))
    });
    eprintln!("detached -> re-attached: {:?}", t.elapsed());
    let s = wait_until("the repairs reported", CONVERGE, || {
        let s = status(&c, 0)?;
        let n = s
            .errors
            .iter()
            .filter(|e| e.contains("re-attached"))
            .count();
        Ok((n == 2).then_some(s))
    });
    assert!(
        s.errors
            .iter()
            .any(|e| e.contains(&pod.host_veth) && e.contains("pod_ingress")),
        "{:?}",
        s.errors
    );
    expect(&mut c, &r, &[TCP80, UDP81], CONVERGE);
}

/// A veth that went while no agent ran leaves pins to dead links; a new veth given the same
/// ifindex gets working programs when the agent comes back (the dead pin is replaced, not adopted).
#[test]
fn a_reused_ifindex_gets_fresh_programs() {
    let Some(mut c) = cluster("a_reused_ifindex_gets_fresh_programs") else {
        return;
    };
    c.apply_policies(&deny_ingress("x")).unwrap();
    start(&mut c);
    let s = wait_synced(&c, 0);
    let gone = s.endpoints.iter().find(|e| e.pod == "z/a").unwrap().clone();
    c.stop_agent(0);
    c.remove_pod("z/a").unwrap();
    let links = c.nodes[0].pin_dir.join("links");
    assert!(
        links.join(format!("{}-egress", gone.ifindex)).exists(),
        "pins stay"
    );
    // A new veth takes the index (a bridge port whose peer has no pod: pending).
    let stray = ScratchNetns(format!("{}-reuse", c.prefix));
    let node0 = c.nodes[0].name.clone();
    ip(&["netns", "add", &stray.0]);
    let index = gone.ifindex.to_string();
    // The kernel destroys a deleted namespace's veth pair asynchronously.
    wait_until("the removed pod's veth to be gone", CONVERGE, || {
        let out = Command::new("ip")
            .args(["-n", &node0, "-o", "link", "show"])
            .output()
            .map_err(|e| e.to_string())?;
        let prefix = format!("{index}: ");
        let listed = String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.starts_with(&prefix));
        if listed {
            Err(format!("ifindex {index} still listed"))
        } else {
            Ok(Some(()))
        }
    });
    ip(&[
        "-n", &node0, "link", "add", "vreuse0", "index", &index, "type", "veth", "peer", "name",
        "eth0", "netns", &stray.0,
    ]);
    ip(&["-n", &node0, "link", "set", "vreuse0", "master", "cni0"]);
    ip(&["-n", &node0, "link", "set", "vreuse0", "up"]);
    c.start_agent(0, &agent_bin()).unwrap();
    wait_until(
        "programs on the veth that reused the index",
        CONVERGE,
        || {
            let shown = tcx_programs(&node0, "vreuse0");
            if shown.contains("pod_ingress") && shown.contains("pod_egress") {
                return Ok(Some(()));
            }
            Err(format!("TCX programs: {shown:?}"))
        },
    );
    let s = status(&c, 0).unwrap();
    let e = s
        .endpoints
        .iter()
        .find(|e| e.ifname == "vreuse0")
        .expect("listed");
    assert!(e.attached && e.pending.is_some(), "{e:?}");
    assert!(
        !s.errors
            .iter()
            .any(|e| e.contains(&index) && e.contains("attach")),
        "{:?}",
        s.errors
    );
    drop(stray);
}
