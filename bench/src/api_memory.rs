//! The real agent process on the Kubernetes API source: `netpol-agent run --kubeconfig` against the
//! API server test double serving a generated cluster (5,000 pods, 1,000 policies by default), with
//! about 110 of those pods local (a veth each, in a node network namespace of its own). Reported:
//! time from start to the first ready sync, and the agent's peak RSS (`VmHWM` of its process: the
//! watch decoding, the slim model, the snapshots, the compile and the datapath shadow together), after
//! the first sync and after a round of churn (label and policy changes through the double).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use netpol_tests::apiserver_double::{ApiServerDouble, generated_cluster, http_get_in_netns};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Sizes of the measured cluster.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Spec {
    pub pods: usize,
    pub policies: usize,
    pub namespaces: usize,
    /// Nodes the pods are spread over; node 0 is the measured one.
    pub nodes: usize,
}

impl Spec {
    /// The sizes (about 110 local pods), or a tenth of them.
    pub fn new(quick: bool) -> Spec {
        if quick {
            Spec {
                pods: 500,
                policies: 100,
                namespaces: 10,
                nodes: 5,
            }
        } else {
            Spec {
                pods: 5_000,
                policies: 1_000,
                namespaces: 100,
                nodes: 45,
            }
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Part {
    pub spec: Spec,
    pub local_pods: usize,
    /// Agent start to `status.ready` with every pod in its state.
    pub first_sync_ms: f64,
    /// VmHWM of the agent after its first sync, and after the churn.
    pub peak_rss_after_sync_mib: f64,
    pub peak_rss_after_churn_mib: f64,
    /// VmRSS at the end.
    pub rss_end_mib: f64,
    pub churn_changes: usize,
    /// `/healthz` asked every 100 ms while the changes were compiled: how often, the slowest
    /// answer and the 99th percentile, and how many got no 200 within 5 s.
    #[serde(default)]
    pub health: HealthPolls,
}

/// Answers of `/healthz` during the churn.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HealthPolls {
    pub polls: usize,
    pub max_ms: f64,
    pub p99_ms: f64,
    pub failures: usize,
}

/// Where the measured agent serves `/healthz` (inside the node's network namespace).
const HEALTH_ADDR: &str = "127.0.0.1:9101";

/// Asks `/healthz` in `netns` every 100 ms until `stop` is set; returns what it saw.
fn poll_health(netns: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<HealthPolls> {
    std::thread::spawn(move || {
        let addr: std::net::SocketAddr = HEALTH_ADDR.parse().expect("a socket address");
        let mut times = Vec::new();
        let mut failures = 0;
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            match http_get_in_netns(&netns, addr, "/healthz") {
                Ok((200, _)) => times.push(t.elapsed().as_secs_f64() * 1000.0),
                _ => failures += 1,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        times.sort_by(f64::total_cmp);
        HealthPolls {
            polls: times.len() + failures,
            max_ms: times.last().copied().unwrap_or_default(),
            p99_ms: crate::control::pct(&times, 99.0),
            failures,
        }
    })
}

fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim().to_owned()
        );
    }
    Ok(())
}

fn ip_batch(args: &[&str], batch: &str) -> anyhow::Result<()> {
    let path = std::env::temp_dir().join(format!("netpol-api-mem-{}.batch", std::process::id()));
    std::fs::write(&path, batch)?;
    let r = run_cmd(Command::new("ip").args(args).arg("-batch").arg(&path));
    let _ = std::fs::remove_file(&path);
    r
}

/// Everything made for one measurement; dropping it removes it all.
struct Setup {
    prefix: String,
    node: String,
    netns: Vec<String>,
    pin_dir: PathBuf,
    state_dir: PathBuf,
    agent_bin: PathBuf,
    agent: Option<Child>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
            let _ = a.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.node])
            .arg(&self.agent_bin)
            .arg("cleanup")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output();
        let batch: String = self
            .netns
            .iter()
            .map(|n| format!("netns del {n}\n"))
            .collect();
        let _ = ip_batch(&["-force"], &batch);
        let _ = Command::new("umount").arg(&self.pin_dir).output();
        let _ = std::fs::remove_dir_all(Path::new("/run/netpol-bench").join(&self.prefix));
    }
}

/// Runs the measurement with the agent binary `agent_bin` (root: netns, bpffs, BPF).
pub fn run(agent_bin: &Path, spec: Spec) -> anyhow::Result<Part> {
    let prefix = format!("npam{}", std::process::id() % 100_000);
    let root = Path::new("/run/netpol-bench").join(&prefix);
    let node = format!("{prefix}-node");
    let mut setup = Setup {
        prefix: prefix.clone(),
        node: node.clone(),
        netns: vec![node.clone()],
        pin_dir: root.join("bpf"),
        state_dir: root.join("state"),
        agent_bin: agent_bin.to_owned(),
        agent: None,
    };
    std::fs::create_dir_all(&setup.pin_dir)?;
    std::fs::create_dir_all(&setup.state_dir)?;
    run_cmd(
        Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&setup.pin_dir),
    )?;

    let objects = generated_cluster(spec.namespaces, spec.pods, spec.policies, spec.nodes);
    // The local pods: those on node-0, each with a netns and a veth into the node.
    let local: Vec<(String, String)> = objects
        .iter()
        .filter(|o| o["kind"] == "Pod" && o["spec"]["nodeName"] == "node-0")
        .map(|o| {
            (
                o["status"]["podIPs"][0]["ip"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                o["status"]["podIPs"][1]["ip"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    let mut add = format!("netns add {node}\n");
    for i in 0..local.len() {
        let ns = format!("{prefix}-p{i}");
        let _ = writeln!(add, "netns add {ns}");
        setup.netns.push(ns);
    }
    ip_batch(&[], &add)?;
    let mut n = String::from("link set lo up\n");
    for i in 0..local.len() {
        let _ = writeln!(
            n,
            "link add vp{i} type veth peer name eth0 netns {prefix}-p{i}\nlink set vp{i} up"
        );
    }
    ip_batch(&["-n", &node], &n)?;
    for (i, (v4, v6)) in local.iter().enumerate() {
        ip_batch(
            &["-n", &format!("{prefix}-p{i}")],
            &format!(
                "link set lo up\naddr add {v4}/32 dev eth0\naddr add {v6}/128 dev eth0 nodad\nlink set eth0 up\n"
            ),
        )?;
    }

    let double = ApiServerDouble::start_in_netns(&[&node])?;
    for o in &objects {
        double.apply(o.clone())?;
    }
    drop(objects);
    let kubeconfig = double.write_kubeconfig(0, &root.join("kubeconfig"))?;

    let log = std::fs::File::create(root.join("agent.log"))?;
    let started = Instant::now();
    let child = Command::new("ip")
        .args(["netns", "exec", &node])
        .arg(agent_bin)
        .args(["run", "--node-name", "node-0", "--kubeconfig"])
        .arg(&kubeconfig)
        .arg("--pin-dir")
        .arg(&setup.pin_dir)
        .arg("--state-dir")
        .arg(&setup.state_dir)
        .args(["--health-addr", HEALTH_ADDR, "--metrics-addr", "off"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the agent")?;
    // `ip netns exec` execs the agent: this pid is the agent's.
    let pid = child.id();
    setup.agent = Some(child);
    let ready = |want_pods: usize| -> anyhow::Result<bool> {
        let out = Command::new(agent_bin)
            .args(["status", "-o", "json", "--state-dir"])
            .arg(&setup.state_dir)
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        Ok(v["ready"] == json!(true) && v["pods"] == json!(want_pods))
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while !ready(spec.pods)? {
        if Instant::now() > deadline {
            bail!(
                "the agent did not sync in time; log:\n{}",
                std::fs::read_to_string(root.join("agent.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let first_sync_ms = started.elapsed().as_secs_f64() * 1000.0;
    std::thread::sleep(Duration::from_millis(500));
    let after_sync = proc_status_kib(pid, "VmHWM:")?;

    let stop_health = Arc::new(AtomicBool::new(false));
    let poller = poll_health(node.clone(), stop_health.clone());
    // Churn: relabel pods and change policies through the API, then let the agent settle.
    let churn = 50;
    for i in 0..churn {
        let p = i * (spec.pods / churn).max(1);
        if let Some(mut pod) = double.get(
            netpol_tests::apiserver_double::Resource::Pods,
            &format!("ns-{}", p % spec.namespaces.max(1)),
            &format!("app-{}-{p:06x}", p % 50),
        ) {
            pod["metadata"]["labels"]["tier"] = json!("churned");
            double.apply(pod)?;
        }
        double.apply(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("churn-{i}"), "namespace": "ns-0"},
            "spec": {"podSelector": {"matchLabels": {"app": format!("app-{}", i % 50)}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "churned"}}}]}]}}))?;
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(2));
    stop_health.store(true, Ordering::Relaxed);
    let health = poller
        .join()
        .map_err(|_| anyhow::anyhow!("the /healthz poller panicked"))?;
    let after_churn = proc_status_kib(pid, "VmHWM:")?;
    let rss_end = proc_status_kib(pid, "VmRSS:")?;
    Ok(Part {
        spec,
        local_pods: local.len(),
        first_sync_ms,
        peak_rss_after_sync_mib: after_sync as f64 / 1024.0,
        peak_rss_after_churn_mib: after_churn as f64 / 1024.0,
        rss_end_mib: rss_end as f64 / 1024.0,
        churn_changes: churn * 2,
        health,
    })
}
