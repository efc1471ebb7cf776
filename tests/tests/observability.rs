//! Flows, drop events and metrics end to end, on the simulated two-node cluster: traffic of known
//! size and count, then `netpol-agent flows`, `flows --follow`, `/metrics`, `promtool check metrics`
//! and a real Prometheus server scraping the agent.
//!
//! Pods: x/a on n0 (isolated for ingress: only x/b may send to UDP 80), x/b on n1, x/c on n0.
//! Senders use fixed source ports outside the ephemeral range, so their flows are told apart from
//! the probes that wait for enforcement.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use netpol_tests::agent_cli::{self, flows, flows_cmd, summary};
use netpol_tests::cluster::{Cluster, Family, Proto, default_agent_bin};
use serde_json::Value;

const PROBE_BIN: &str = env!("CARGO_BIN_EXE_netpol-probe");
const METRICS: &str = "127.0.0.1:9102";
/// UDP payload bytes of every datagram sent: frames are 14 + 20 + 8 + 16 = 58 bytes.
const PAYLOAD: usize = 16;
const FRAME: u64 = 58;

/// The tests load the machine (a flood, timing assertions): one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const POLICY: &str = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-b
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels:
          pod: b
    ports:
    - protocol: UDP
      port: 80
";

fn cluster(test: &str) -> Option<Cluster> {
    if !netpol_tests::privileged_or_skip(test, "needs root (network namespaces, bpffs)") {
        return None;
    }
    let mut c = Cluster::new(PROBE_BIN).unwrap_or_else(|e| panic!("cluster setup: {e:#}"));
    c.apply_policies(POLICY).unwrap();
    c.start_agents(&default_agent_bin())
        .unwrap_or_else(|e| panic!("starting agents: {e:#}"));
    let mut r = c.reachability(true);
    r.expect_all_ingress("x/a", false);
    r.expect_peer("x/b", "x/a", true);
    c.wait_for_all(&r, &[(80, Proto::Udp, Family::V4)], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));
    Some(c)
}

/// `netpol-probe flood` from pod `from`: `count` datagrams from `sport` to `to`:`port`.
fn flood(c: &Cluster, from: &str, sport: u16, to: &str, port: u16, count: u64) -> u64 {
    agent_cli::flood(c, from, sport, (to, port), count, PAYLOAD)
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn flows_report_exactly_the_traffic_and_follow_sees_new_drops() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut c) = cluster("flows_report_exactly_the_traffic_and_follow_sees_new_drops") else {
        return;
    };
    let (a, b, cc) = (
        c.pod("x/a").ip(Family::V4).to_string(),
        c.pod("x/b").ip(Family::V4).to_string(),
        c.pod("x/c").ip(Family::V4).to_string(),
    );
    // Allowed: x/b (n1) to x/a UDP 80, echoed back. Denied: x/c (n0) to x/a UDP 81.
    assert_eq!(flood(&c, "x/b", 20001, "x/a", 80, 20), 20);
    assert_eq!(flood(&c, "x/c", 20002, "x/a", 81, 30), 30);
    std::thread::sleep(Duration::from_millis(300));
    c.check_agents().unwrap();

    let (got, _) = flows(&c, 0, &["--port", "20001"]);
    let got = sorted(got.iter().map(summary).collect());
    let want = sorted(vec![
        format!(
            "x/b {b}:20001 -> x/a {a}:80 udp ingress allowed policy [\"x/allow-b\"] packets=20 bytes={}",
            20 * FRAME
        ),
        format!(
            "x/a {a}:80 -> x/b {b}:20001 udp egress allowed reply [] packets=20 bytes={}",
            20 * FRAME
        ),
    ]);
    assert_eq!(got, want, "node 0, the allowed flow");

    let (got, _) = flows(&c, 0, &["--port", "20002"]);
    let got = sorted(got.iter().map(summary).collect());
    let want = sorted(vec![
        // Leaving x/c (not isolated)...
        format!(
            "x/c {cc}:20002 -> x/a {a}:81 udp egress allowed not-isolated [] packets=30 bytes={}",
            30 * FRAME
        ),
        // ... and dropped on its way into x/a, naming the policy that isolates x/a.
        format!(
            "x/c {cc}:20002 -> x/a {a}:81 udp ingress dropped ingress-denied [\"x/allow-b\"] packets=30 bytes={}",
            30 * FRAME
        ),
    ]);
    assert_eq!(got, want, "node 0, the denied flow");

    // The sender's node saw its side of the allowed flow.
    let (got, _) = flows(&c, 1, &["--port", "20001", "--from", "x/b"]);
    assert_eq!(
        got.iter().map(summary).collect::<Vec<_>>(),
        vec![format!(
            "x/b {b}:20001 -> x/a {a}:80 udp egress allowed not-isolated [] packets=20 bytes={}",
            20 * FRAME
        )]
    );

    // Filters.
    let (got, _) = flows(
        &c,
        0,
        &["--verdict", "dropped", "--to", "x/a", "--port", "20002"],
    );
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["verdict"], "dropped");
    let (got, _) = flows(
        &c,
        0,
        &[
            "-n",
            "x",
            "--pod",
            "c",
            "--protocol",
            "udp",
            "--last",
            "1",
            "--since",
            "5m",
            "--port",
            "20002",
        ],
    );
    assert_eq!(got.len(), 1);
    let (got, _) = flows(
        &c,
        0,
        &[
            "--from",
            &format!("{cc}/32"),
            "--to",
            "10.42.0.0/24",
            "--port",
            "20002",
        ],
    );
    assert_eq!(got.len(), 2, "CIDR filters: {got:?}");
    let (got, _) = flows(&c, 0, &["--port", "20002", "--protocol", "tcp"]);
    assert!(got.is_empty());
    // Every documented field, and nothing else.
    let mut keys: Vec<&str> = got_fields();
    keys.sort_unstable();
    let (one, _) = flows(&c, 0, &["--port", "20002", "--last", "1"]);
    let mut have: Vec<&str> = one[0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    have.sort_unstable();
    assert_eq!(have, keys);
    assert!(one[0]["time"].as_str().unwrap().ends_with('Z'));

    hubble_level_filters(&c, &cc);

    // --follow: a new drop shows within a second.
    let mut follow = flows_cmd(&c, 0)
        .args(["-f", "-o", "jsonl", "--verdict", "dropped", "--to", "x/a"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    // Let the client subscribe.
    std::thread::sleep(Duration::from_millis(700));
    let sent_at = Instant::now();
    assert_eq!(flood(&c, "x/c", 20003, "x/a", 81, 1), 1);
    let (seen_at, line) = rx
        .recv_timeout(Duration::from_secs(3))
        .expect("follow printed nothing for a new drop");
    let _ = follow.kill();
    let _ = follow.wait();
    let f: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        summary(&f),
        format!(
            "x/c {cc}:20003 -> x/a {a}:81 udp ingress dropped ingress-denied [\"x/allow-b\"] packets=1 bytes={FRAME}"
        )
    );
    let latency = seen_at.duration_since(sent_at);
    assert!(latency < Duration::from_secs(1), "follow took {latency:?}");

    // With the agent stopped, flows still come from the pinned maps, unresolved, saying so.
    c.stop_agent(0);
    let (got, stderr) = flows(&c, 0, &["--port", "20002", "--verdict", "dropped"]);
    assert!(stderr.contains("reading the pinned maps"), "{stderr}");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["src_pod"], Value::Null);
    assert_eq!(got[0]["src_ip"], cc.as_str());
    assert_eq!(got[0]["packets"], 30);
    assert_eq!(
        got[0]["node"],
        c.nodes[0].name.as_str(),
        "the node the saved state names"
    );
}

fn got_fields() -> Vec<&'static str> {
    vec![
        "time",
        "node",
        "src_ip",
        "src_port",
        "dst_ip",
        "dst_port",
        "protocol",
        "direction",
        "verdict",
        "reason",
        "policies",
        "packets",
        "bytes",
        "src_pod",
        "dst_pod",
    ]
}

/// The filters beyond the first set, on the traffic of the test above: x/b -> x/a UDP 80 from port
/// 20001 (allowed), x/c (`cc`) -> x/a UDP 81 from port 20002 (dropped at x/a, allowed out of x/c).
fn hubble_level_filters(c: &Cluster, cc: &str) {
    let count = |args: &[&str]| flows(c, 0, args).0.len();
    let both_ports = ["--port", "20001", "--port", "20002"];
    // Repeated filters are alternatives; different filters all apply.
    assert_eq!(
        count(&[&both_ports[..], &["--pod", "x/b", "--pod", "x/c"]].concat()),
        4
    );
    assert_eq!(count(&[&both_ports[..], &["--pod", "x/b"]].concat()), 2);
    // --not hides what the next filter matches.
    let (got, _) = flows(c, 0, &["--port", "20002", "--not", "--verdict", "dropped"]);
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0]["verdict"].as_str(), got[0]["direction"].as_str()),
        (Some("allowed"), Some("egress"))
    );
    let (got, _) = flows(c, 0, &["--port", "20002", "--traffic-direction", "ingress"]);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["reason"], "ingress-denied");
    let (got, _) = flows(c, 0, &["--port", "20002", "--reason", "not-isolated"]);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["src_ip"], cc);
    // Label selectors, on the pods' labels (pod=<name>).
    assert_eq!(count(&["--port", "20002", "-l", "pod=c"]), 2);
    assert_eq!(
        count(&[
            "--port",
            "20002",
            "--from-label",
            "pod=c",
            "--to-label",
            "pod in (a,b)"
        ]),
        2
    );
    assert_eq!(count(&["--port", "20002", "--to-label", "pod=c"]), 0);
    assert_eq!(
        count(&["--port", "20002", "--not", "-l", "pod notin (a)"]),
        0
    );
    // Time window and counts.
    assert_eq!(count(&[&both_ports[..], &["--since", "10m"]].concat()), 4);
    assert_eq!(count(&[&both_ports[..], &["--until", "10m"]].concat()), 0);
    let (first, _) = flows(c, 0, &[&both_ports[..], &["--first", "1"]].concat());
    let (all, _) = flows(c, 0, &both_ports);
    assert_eq!(first, all[..1]);
    // Every record names the node; the table fits it and the pod names.
    assert!(
        all.iter().all(|f| f["node"] == c.nodes[0].name.as_str()),
        "{all:?}"
    );
    let table = flows_cmd(c, 0).args(["--port", "20002"]).output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].contains("NODE") && lines[1].contains(&c.nodes[0].name),
        "{table}"
    );
    assert!(
        lines.iter().skip(1).all(|l| l.contains("x/c:20002")),
        "{table}"
    );
}

/// Lines of a running `flows -f -o jsonl`, as they come.
fn follow_lines(
    mut follow: std::process::Child,
) -> (std::process::Child, std::sync::mpsc::Receiver<Value>) {
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                break;
            };
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    (follow, rx)
}

#[test]
fn follow_reports_allowed_flows_as_well_as_drops() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(c) = cluster("follow_reports_allowed_flows_as_well_as_drops") else {
        return;
    };
    // No --verdict: every verdict; two ports: either.
    let child = flows_cmd(&c, 0)
        .args(["-f", "-o", "jsonl", "--port", "20004", "--port", "20005"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (mut child, rx) = follow_lines(child);
    // Send until both kinds show (the follower may start after the first datagrams).
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut allowed, mut dropped) = (None, None);
    while (allowed.is_none() || dropped.is_none()) && Instant::now() < deadline {
        flood(&c, "x/b", 20004, "x/a", 80, 1);
        flood(&c, "x/c", 20005, "x/a", 81, 1);
        while let Ok(f) = rx.recv_timeout(Duration::from_millis(1500)) {
            match (
                f["verdict"].as_str(),
                f["direction"].as_str(),
                f["src_port"].as_u64(),
            ) {
                (Some("allowed"), Some("ingress"), Some(20004)) => allowed = Some(f),
                (Some("dropped"), _, Some(20005)) => dropped = Some(f),
                _ => {}
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let allowed = allowed.expect("follow printed no allowed flow");
    let dropped = dropped.expect("follow printed no drop");
    assert_eq!(allowed["reason"], "policy");
    assert_eq!(allowed["policies"], serde_json::json!(["x/allow-b"]));
    assert_eq!(allowed["src_pod"], "x/b");
    assert!(allowed["packets"].as_u64().unwrap() >= 1);
    assert_eq!(dropped["reason"], "ingress-denied");
    for f in [&allowed, &dropped] {
        assert_eq!(f["node"], c.nodes[0].name.as_str());
    }
    // Only allowed flows when asked: drops of the same ports stay out.
    let child = flows_cmd(&c, 0)
        .args([
            "-f",
            "-o",
            "jsonl",
            "--verdict",
            "allowed",
            "--port",
            "20005",
            "--port",
            "20004",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (mut child, rx) = follow_lines(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while !seen.iter().any(|f: &Value| f["src_port"] == 20004) && Instant::now() < deadline {
        flood(&c, "x/c", 20005, "x/a", 81, 1);
        flood(&c, "x/b", 20004, "x/a", 80, 1);
        seen.extend(rx.recv_timeout(Duration::from_millis(1500)));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.iter().any(|f| f["src_port"] == 20004),
        "no allowed flow: {seen:?}"
    );
    assert!(seen.iter().all(|f| f["verdict"] == "allowed"), "{seen:?}");
}

/// A stand-in for kubectl that knows the simulated cluster: `get pod` answers each pod's node,
/// `get pods` lists one agent pod per node, `exec` runs the command in that node's namespace with
/// its directories. Every call is appended to `calls`.
fn fake_kubectl(c: &Cluster, dir: &Path) -> PathBuf {
    let mut pods = String::new();
    for ns in ["x", "y", "z"] {
        for name in ["a", "b", "c"] {
            let node = &c.nodes[c.pod(&format!("{ns}/{name}")).node].name;
            pods.push_str(&format!(
                "  {ns}/{name}) echo '{{\"metadata\":{{\"name\":\"{name}\",\"namespace\":\"{ns}\"}},\"spec\":{{\"nodeName\":\"{node}\"}}}}' ;;\n"
            ));
        }
    }
    let items: Vec<Value> = c
        .nodes
        .iter()
        .map(|n| {
            serde_json::json!({
                "metadata": {"name": format!("agent-{}", n.name), "namespace": "netpol-system"},
                "spec": {"nodeName": n.name},
                "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
            })
        })
        .collect();
    let mut execs = String::new();
    for n in &c.nodes {
        execs.push_str(&format!(
            "  agent-{0}) exec ip netns exec {0} {1} \"$1\" --pin-dir {2} --state-dir {3} \"${{@:2}}\" ;;\n",
            n.name,
            default_agent_bin().display(),
            n.pin_dir.display(),
            n.state_dir.display()
        ));
    }
    let script = format!(
        "#!/bin/bash\necho \"$*\" >> {calls}\nns=default\n\
         while [[ $1 == --* ]]; do [[ $1 == --namespace=* ]] && ns=${{1#--namespace=}}; shift; done\n\
         if [[ $1 == get && $2 == pod ]]; then\ncase $ns/$3 in\n{pods}esac\nexit 0\nfi\n\
         if [[ $1 == get && $2 == pods ]]; then echo '{agents}'; exit 0; fi\n\
         agent=$2; shift 6\ncase $agent in\n{execs}esac\nexit 3\n",
        calls = dir.join("calls").display(),
        agents = serde_json::json!({ "items": items }),
    );
    let path = dir.join("kubectl");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

#[test]
fn kubectl_plugin_asks_the_agent_on_the_node_of_the_pod() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(c) = cluster("kubectl_plugin_asks_the_agent_on_the_node_of_the_pod") else {
        return;
    };
    let dir = c.tmp_dir.join("kubectl-plugin");
    std::fs::create_dir_all(&dir).unwrap();
    let kubectl = fake_kubectl(&c, &dir);
    let plugin = dir.join("kubectl-netpol");
    std::os::unix::fs::symlink(default_agent_bin(), &plugin).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(&plugin)
            .arg("flows")
            .args(args)
            .env("KUBECTL", &kubectl)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr,
        )
    };
    let json = |args: &[&str]| -> Vec<Value> {
        let (ok, out, err) = run(&[args, &["-o", "json", "--port", "20006"]].concat());
        assert!(ok, "{err}");
        serde_json::from_str::<Value>(&out)
            .unwrap()
            .as_array()
            .cloned()
            .unwrap()
    };
    assert_eq!(flood(&c, "x/b", 20006, "x/a", 80, 5), 5);
    let (n0, n1) = (c.nodes[0].name.as_str(), c.nodes[1].name.as_str());
    // x/a is on n0: its agent answers, with x/a's side of the flow.
    let got = json(&["--context", "sim", "--pod", "x/a"]);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.iter().all(|f| f["node"] == n0), "{got:?}");
    let calls = std::fs::read_to_string(dir.join("calls")).unwrap();
    assert!(
        calls.contains("--context=sim --namespace=x get pod a -o json"),
        "{calls}"
    );
    assert!(
        calls.contains(&format!(
            "exec agent-{n0} -c agent -- /usr/local/bin/netpol-agent flows"
        )),
        "{calls}"
    );
    // x/b (by -n) is on n1.
    let got = json(&["-n", "x", "--from", "b"]);
    assert!(
        !got.is_empty() && got.iter().all(|f| f["node"] == n1),
        "{got:?}"
    );
    // Both: each node's agent, merged by time.
    let got = json(&["--pod", "x/a", "--pod", "x/b"]);
    let nodes: std::collections::BTreeSet<&str> =
        got.iter().filter_map(|f| f["node"].as_str()).collect();
    assert_eq!(nodes, [n0, n1].into());
    let times: Vec<&str> = got.iter().filter_map(|f| f["time"].as_str()).collect();
    assert!(times.is_sorted(), "{times:?}");
    // No pod to locate, or a bad filter: a clear error before any exec.
    let (ok, _, err) = run(&["--port", "1"]);
    assert!(!ok && err.contains("which node?"), "{err}");
    let (ok, _, err) = run(&["--pod", "x/a", "--reason", "nope"]);
    assert!(!ok && err.contains("--reason \"nope\""), "{err}");
}

/// `curl` in the network namespace `netns`.
fn curl(netns: &str, url: &str) -> Option<String> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "curl",
            "-sf",
            "--max-time",
            "5",
            url,
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value of the series of `name` whose labels include every `labels` pair.
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A Prometheus server in `netns`, scraping the agent every second; killed on drop.
struct Prometheus {
    child: std::process::Child,
    dir: PathBuf,
}

impl Prometheus {
    fn start(netns: &str, dir: &Path) -> Prometheus {
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n- job_name: netpol-agent\n  static_configs:\n  - targets: ['{METRICS}']\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "prometheus"])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:9090")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect(
                "starting prometheus (Debian package `prometheus`; `cargo xtask test` installs it)",
            );
        Prometheus {
            child,
            dir: dir.to_owned(),
        }
    }

    /// The value of an instant query with one result, once it has one.
    fn query(&self, netns: &str, q: &str) -> Option<f64> {
        let url = format!(
            "http://127.0.0.1:9090/api/v1/query?query={}",
            q.replace('"', "%22")
                .replace('{', "%7B")
                .replace('}', "%7D")
                .replace(' ', "%20")
                .replace(',', "%2C")
                .replace('=', "%3D")
        );
        let v: Value = serde_json::from_str(&curl(netns, &url)?).ok()?;
        let r = v["data"]["result"].as_array()?;
        (r.len() == 1).then(|| r[0]["value"][1].as_str()?.parse().ok())?
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn drop_counters_are_exact_under_a_flood_and_prometheus_scrapes_them() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut c) = cluster("drop_counters_are_exact_under_a_flood_and_prometheus_scrapes_them")
    else {
        return;
    };
    let node = c.nodes[0].name.clone();
    let prom = Prometheus::start(&node, &c.tmp_dir.join("prometheus"));

    let labels = [
        ("reason", "ingress-denied"),
        ("protocol", "udp"),
        ("direction", "ingress"),
        ("namespace", "x"),
        ("pod", "a"),
    ];
    // The probes that waited for enforcement were dropped too: the flood comes on top of them.
    let before = curl(&node, &format!("http://{METRICS}/metrics")).expect("scraping /metrics");
    let base = sample(&before, "netpol_drop_total", &labels).unwrap_or(0.0) as u64;
    let base_bytes = sample(&before, "netpol_drop_bytes_total", &labels).unwrap_or(0.0) as u64;

    // The flood: 100k denied datagrams from x/c to x/a, while `status` keeps answering.
    const FLOOD: u64 = 100_000;
    let target = format!("udp/{}/81", c.pod("x/a").ip(Family::V4));
    let mut flooder = Command::new("ip")
        .args(["netns", "exec", &c.pod("x/c").netns, PROBE_BIN, "flood"])
        .args(["--count", &FLOOD.to_string(), "--sport", "20010"])
        .args(["--size", &PAYLOAD.to_string(), &target])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let n = &c.nodes[0];
    let mut status_times = Vec::new();
    let flood_start = Instant::now();
    let out = loop {
        let t = Instant::now();
        let st = Command::new("ip")
            .args(["netns", "exec", &n.name])
            .arg(default_agent_bin())
            .args(["status", "-o", "json", "--pin-dir"])
            .arg(&n.pin_dir)
            .arg("--state-dir")
            .arg(&n.state_dir)
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "status during the flood: {}",
            String::from_utf8_lossy(&st.stderr)
        );
        status_times.push(t.elapsed());
        if flooder.try_wait().unwrap().is_some() {
            break flooder.wait_with_output().unwrap();
        }
        assert!(
            flood_start.elapsed() < Duration::from_secs(120),
            "the flood did not finish in 120 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let sent: Value = serde_json::from_slice(&out.stdout).unwrap();
    let sent = sent["sent"].as_u64().unwrap();
    assert_eq!(sent, FLOOD);
    let slowest = status_times.iter().max().copied().unwrap_or_default();
    eprintln!(
        "flood of {FLOOD} took {:?}; {} status answers during it, slowest {slowest:?}",
        flood_start.elapsed(),
        status_times.len()
    );
    assert!(
        status_times.len() >= 2,
        "status was not asked during the flood"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "status took {slowest:?} during the flood"
    );
    c.check_agents().unwrap();

    // Counted exactly: the drop counter, the flow record.
    let metrics = curl(&node, &format!("http://{METRICS}/metrics")).expect("scraping /metrics");
    // `verify --cluster` reads this gauge off the real exposition: no kube-router here.
    assert_eq!(
        netpol_agent::verify::cluster::kube_router_chains(&metrics),
        Ok(0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "netpol_drop_total", &labels),
        Some((base + FLOOD) as f64),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "netpol_drop_bytes_total", &labels),
        Some((base_bytes + FLOOD * FRAME) as f64)
    );
    // The flood outran x/a's drop-event budget (1,000 per second and CPU): what it hid is counted
    // at x/a, and never more than was dropped.
    let unreported = sample(&metrics, "netpol_drop_unreported_total", &labels)
        .expect("netpol_drop_unreported_total for x/a");
    assert!(
        unreported > 0.0 && unreported < (base + FLOOD) as f64,
        "{unreported} unreported of {} drops",
        base + FLOOD
    );
    let (f, _) = flows(&c, 0, &["--port", "20010", "--verdict", "dropped"]);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0]["packets"], FLOOD);
    // Each new flow (here: one) is a policy decision; the flood's other packets too (no conntrack
    // for drops), so the verdict counter has at least the flood.
    let denied = sample(
        &metrics,
        "netpol_policy_verdicts_total",
        &[
            ("direction", "ingress"),
            ("action", "dropped"),
            ("match", "none"),
        ],
    )
    .unwrap();
    assert!(denied >= FLOOD as f64, "{denied}");
    // Far more drops than the event rate: the rest is counted as lost, not silently gone.
    let rate_limited = sample(
        &metrics,
        "netpol_lost_events_total",
        &[("source", "rate-limit")],
    )
    .unwrap();
    assert!(rate_limited > 0.0, "{metrics}");
    for name in [
        "netpol_policy_implementation_delay_seconds_count",
        "netpol_policies",
        "netpol_endpoints",
        "netpol_errors",
        "netpol_build_info",
    ] {
        assert!(
            sample(&metrics, name, &[]).is_some(),
            "{name} missing:\n{metrics}"
        );
    }
    assert!(
        sample(
            &metrics,
            "netpol_policy_implementation_delay_seconds_count",
            &[]
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(sample(&metrics, "netpol_policies", &[]), Some(1.0));
    assert_eq!(
        sample(&metrics, "netpol_endpoints", &[]),
        Some(5.0),
        "x/a, x/c, y/b, z/a, z/c"
    );
    assert_eq!(sample(&metrics, "netpol_pending_endpoints", &[]), Some(0.0));
    assert!(sample(&metrics, "netpol_map_capacity", &[("map", "NP_FLOWS_V1")]).is_some());
    // Only local pods: x/b lives on n1.
    assert!(!metrics.contains("namespace=\"x\",pod=\"b\""));

    // promtool accepts the exposition.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`)");
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), metrics.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Prometheus scraped the same numbers.
    let q = "sum(netpol_drop_total{namespace=\"x\",pod=\"a\",reason=\"ingress-denied\"})";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if prom.query(&node, q) == Some((base + FLOOD) as f64) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never returned {base} + {FLOOD} for {q} (last: {:?}); log:\n{}",
            prom.query(&node, q),
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let bytes = prom.query(
        &node,
        "sum(netpol_drop_bytes_total{namespace=\"x\",pod=\"a\",direction=\"ingress\"})",
    );
    assert_eq!(bytes, Some((base_bytes + FLOOD * FRAME) as f64));
}
