//! The agent's command line and the probe's flood, as the end-to-end tests drive them on a node of
//! the simulated cluster.

use std::process::Command;

use serde_json::Value;

use crate::cluster::{Cluster, Family, default_agent_bin};

/// `netpol-probe flood` from pod `from`: `count` UDP datagrams of `payload` bytes from port `sport`
/// to `to`:`port` (IPv4); returns how many were sent.
pub fn flood(
    c: &Cluster,
    from: &str,
    sport: u16,
    to: (&str, u16),
    count: u64,
    payload: usize,
) -> u64 {
    let (to, port) = to;
    let target = format!("udp/{}/{port}", c.pod(to).ip(Family::V4));
    let out = Command::new("ip")
        .args(["netns", "exec", &c.pod(from).netns])
        .arg(&c.probe_bin)
        .arg("flood")
        .args(["--count", &count.to_string(), "--sport", &sport.to_string()])
        .args(["--size", &payload.to_string(), &target])
        .output()
        .expect("running netpol-probe flood");
    assert!(
        out.status.success(),
        "flood: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("flood prints JSON");
    v["sent"].as_u64().expect("flood reports what it sent")
}

/// `netpol-agent SUBCOMMAND` on `node`, with that node's pin and state directories.
fn agent_cmd(c: &Cluster, node: usize, subcommand: &str) -> Command {
    let n = &c.nodes[node];
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &n.name])
        .arg(default_agent_bin())
        .args([subcommand, "--pin-dir"])
        .arg(&n.pin_dir)
        .arg("--state-dir")
        .arg(&n.state_dir);
    cmd
}

/// `netpol-agent flows` on `node`.
pub fn flows_cmd(c: &Cluster, node: usize) -> Command {
    agent_cmd(c, node, "flows")
}

/// `netpol-agent flows -o json ARGS` on `node`: the flows, and what it printed on stderr.
pub fn flows(c: &Cluster, node: usize, args: &[&str]) -> (Vec<Value>, String) {
    let out = flows_cmd(c, node)
        .args(["-o", "json"])
        .args(args)
        .output()
        .expect("running netpol-agent flows");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "flows failed: {stderr}");
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    (v.as_array().cloned().unwrap_or_default(), stderr)
}

/// The fields that identify and count a flow, for whole-set comparisons.
pub fn summary(f: &Value) -> String {
    let policies: Vec<&str> = f["policies"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    format!(
        "{} {}:{} -> {} {}:{} {} {} {} {} {:?} packets={} bytes={}",
        f["src_pod"].as_str().unwrap_or("-"),
        f["src_ip"].as_str().unwrap_or("?"),
        f["src_port"],
        f["dst_pod"].as_str().unwrap_or("-"),
        f["dst_ip"].as_str().unwrap_or("?"),
        f["dst_port"],
        f["protocol"].as_str().unwrap_or("?"),
        f["direction"].as_str().unwrap_or("?"),
        f["verdict"].as_str().unwrap_or("?"),
        f["reason"].as_str().unwrap_or("?"),
        policies,
        f["packets"],
        f["bytes"],
    )
}

/// `netpol-agent policies -o json` on `node`.
pub fn policies(c: &Cluster, node: usize) -> Vec<Value> {
    let out = agent_cmd(c, node, "policies")
        .args(["-o", "json"])
        .output()
        .expect("running netpol-agent policies");
    assert!(
        out.status.success(),
        "policies failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
        .as_array()
        .cloned()
        .unwrap_or_default()
}
