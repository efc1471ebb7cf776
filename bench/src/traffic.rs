//! Part 3: TCP throughput (iperf3) and new-connection rate (a connect/read/close loop against the
//! pod's `netpol-probe` server on port 80) between pods x/a and x/c of the simulated cluster (both
//! on node 0, through its `cni0` bridge and their veths): first with no agent at all, then with the
//! agents running and enforcing a policy that isolates x/c for ingress and allows x/a on TCP 5201
//! and 80 (checked: x/b is refused). Medians of `reps` runs each.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use netpol_common::program_names;
use netpol_tests::cluster::{Cluster, Family};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug)]
pub struct Settings {
    pub agent_bin: PathBuf,
    pub probe_bin: PathBuf,
    pub bench_bin: PathBuf,
    pub secs: u32,
    pub reps: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Part {
    pub baseline_gbps: f64,
    pub agent_gbps: f64,
    pub throughput_ratio: f64,
    pub baseline_conn_per_s: f64,
    pub agent_conn_per_s: f64,
    pub conn_rate_ratio: f64,
    /// Mean run time of each classifier on the real traffic of the "with agent" runs, in ns per
    /// packet, from `kernel.bpf_stats_enabled` (`run_time_ns / run_cnt` of every loaded program of
    /// that name: both agents' copies).
    pub run_time_ns: Vec<(String, f64)>,
    /// The same through a ClusterIP of x/c (kube-proxy DNAT in both), x/a not egress-isolated.
    #[serde(default)]
    pub service_gbps: f64,
    #[serde(default)]
    pub service_conn_per_s: f64,
    /// Through the ClusterIP with x/a egress-isolated: its verdict deferred at its veth and
    /// decided on x/c's veth after DNAT (the cost of judging Services on the backend).
    #[serde(default)]
    pub deferred_gbps: f64,
    #[serde(default)]
    pub deferred_conn_per_s: f64,
    pub method: String,
}

/// `kernel.bpf_stats_enabled`: the kernel counts each program's runs and run time while it is 1.
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// (run time ns, runs) summed over the loaded programs named `name`.
fn run_stats(name: &str) -> (u128, u64) {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some(name))
        .fold((0, 0), |(t, n), p| {
            (t + p.run_time().as_nanos(), n + p.run_count())
        })
}

/// Runs `f` with the kernel's BPF run-time statistics on; returns its result and the mean ns per
/// run of each of `programs` during it.
fn with_bpf_stats<T>(
    programs: &[&str],
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, Vec<(String, f64)>)> {
    let was = std::fs::read_to_string(BPF_STATS).context("reading kernel.bpf_stats_enabled")?;
    std::fs::write(BPF_STATS, "1").context("enabling kernel.bpf_stats_enabled")?;
    let before: Vec<(u128, u64)> = programs.iter().map(|p| run_stats(p)).collect();
    let out = f();
    let after: Vec<(u128, u64)> = programs.iter().map(|p| run_stats(p)).collect();
    let _ = std::fs::write(BPF_STATS, was.trim());
    let per_run = programs
        .iter()
        .zip(before.iter().zip(&after))
        .map(|(name, ((t0, n0), (t1, n1)))| {
            let runs = n1.saturating_sub(*n0).max(1);
            (
                name.to_string(),
                t1.saturating_sub(*t0) as f64 / runs as f64,
            )
        })
        .collect();
    Ok((out?, per_run))
}

const IPERF_PORT: u16 = 5201;

/// x/a's egress isolated, allowed to x/c only: through x/c's ClusterIP its verdict is deferred.
const EGRESS_POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: bench-egress
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes: [Egress]
  egress:
  - to:
    - podSelector:
        matchLabels:
          pod: c
    ports:
    - {protocol: TCP, port: 5201}
    - {protocol: TCP, port: 80}
";

/// x/c's ClusterIP in the bench.
const SERVICE_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 43, 200, 10);

const POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: bench-allow
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: c
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels:
          pod: a
    ports:
    - {protocol: TCP, port: 5201}
    - {protocol: TCP, port: 80}
";

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn iperf(netns: &str, server: &str, secs: u32) -> anyhow::Result<f64> {
    let mut last = String::new();
    for _ in 0..20 {
        let out = Command::new("ip")
            .args(["netns", "exec", netns, "iperf3", "-c", server, "-p"])
            .arg(IPERF_PORT.to_string())
            .args(["-t", &secs.to_string(), "-J"])
            .output()
            .context("running iperf3")?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
            return Ok(bps / 1e9);
        }
        last = format!("{} {}", v["error"], String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("iperf3 client failed: {last}")
}

fn conn_rate(bench_bin: &Path, netns: &str, server: &str, secs: u32) -> anyhow::Result<f64> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(bench_bin)
        .args(["connect-loop", "--addr", server, "--port", "80", "--secs"])
        .arg(secs.to_string())
        .output()
        .context("running the connect loop")?;
    if !out.status.success() {
        bail!(
            "connect loop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    if v["errors"].as_u64().unwrap_or(0) > 0 {
        bail!("connect loop had errors: {v}");
    }
    Ok(v["per_second"].as_f64().unwrap_or(0.0))
}

fn probe(probe_bin: &Path, netns: &str, target: &str) -> anyhow::Result<bool> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(probe_bin)
        .args(["probe", "--timeout-ms", "500", target])
        .stderr(Stdio::null())
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    Ok(v[0]["ok"].as_bool().unwrap_or(false))
}

fn measure(s: &Settings, client: &str, server: &str) -> anyhow::Result<(f64, f64)> {
    let mut gbps = Vec::new();
    let mut cps = Vec::new();
    for _ in 0..s.reps {
        gbps.push(iperf(client, server, s.secs)?);
        cps.push(conn_rate(&s.bench_bin, client, server, s.secs)?);
    }
    Ok((median(gbps), median(cps)))
}

pub fn run(s: &Settings) -> anyhow::Result<Part> {
    let mut cluster = Cluster::new(&s.probe_bin).context("building the simulated cluster")?;
    let a = cluster.pod("x/a").clone();
    let b = cluster.pod("x/b").clone();
    let c = cluster.pod("x/c").clone();
    if a.node != c.node {
        bail!("x/a and x/c are expected on the same node");
    }
    let server_ip = c.ip(Family::V4).to_string();
    let _iperf_server = Killed(
        Command::new("ip")
            .args(["netns", "exec", &c.netns, "iperf3", "-s", "-p"])
            .arg(IPERF_PORT.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the iperf3 server")?,
    );
    eprintln!("bench: pod traffic without agent");
    let (base_gbps, base_cps) = measure(s, &a.netns, &server_ip)?;

    cluster.apply_policies(POLICY)?;
    cluster.start_agents(&s.agent_bin)?;
    let target = format!("tcp/{server_ip}/80");
    wait_until(&mut cluster, "the allow policy", |_| {
        Ok(!probe(&s.probe_bin, &b.netns, &target)? && probe(&s.probe_bin, &a.netns, &target)?)
    })?;
    eprintln!("bench: pod traffic with agent");
    let programs = [program_names::POD_EGRESS, program_names::POD_INGRESS];
    let ((agent_gbps, agent_cps), run_time_ns) =
        with_bpf_stats(&programs, || measure(s, &a.netns, &server_ip))?;
    cluster.check_agents()?;
    let (service, deferred) = through_service(s, &mut cluster, (&a.netns, a.node), &b)?;
    drop(cluster);
    Ok(Part {
        service_gbps: service.0,
        service_conn_per_s: service.1,
        deferred_gbps: deferred.0,
        deferred_conn_per_s: deferred.1,
        baseline_gbps: base_gbps,
        agent_gbps,
        throughput_ratio: agent_gbps / base_gbps,
        baseline_conn_per_s: base_cps,
        agent_conn_per_s: agent_cps,
        conn_rate_ratio: agent_cps / base_cps,
        run_time_ns,
        method: format!(
            "simulated cluster, x/a -> x/c on the same node (veth - cni0 bridge - veth); iperf3 -t {} \
             (one TCP stream, IPv4) and a {} s connect/read/close loop against x/c's probe server on \
             TCP 80; median of {} runs each; baseline with no agent, then both agents enforcing an \
             ingress policy on x/c that allows x/a on 5201 and 80 (x/b verified refused); then the \
             same through a ClusterIP of x/c ({SERVICE_IP}, iptables DNAT as kube-proxy), before and \
             after an egress policy on x/a (allowing x/c) makes its verdict deferred to x/c's veth",
            s.secs, s.secs, s.reps
        ),
    })
}

/// Measures through x/c's ClusterIP: first with x/a not egress-isolated, then with its verdict
/// deferred (checked in the agent's counters). Returns (Gbit/s, conn/s) of each.
fn through_service(
    s: &Settings,
    cluster: &mut Cluster,
    (client, node): (&str, usize),
    b: &netpol_tests::cluster::Pod,
) -> anyhow::Result<((f64, f64), (f64, f64))> {
    use netpol_tests::{cluster::Proto, kube_proxy::Service};
    cluster.enable_kube_proxy()?;
    cluster.add_service(
        Service::new("x", "bench-c", SERVICE_IP)
            .select("pod", "c")
            .port("http", Proto::Tcp, 80, 80)
            .port("iperf", Proto::Tcp, IPERF_PORT, IPERF_PORT),
    )?;
    let vip = SERVICE_IP.to_string();
    let to_vip = format!("tcp/{vip}/80");
    wait_until(cluster, "the ClusterIP to answer", |_| {
        probe(&s.probe_bin, client, &to_vip)
    })?;
    eprintln!("bench: pod traffic through a ClusterIP");
    let service = measure(s, client, &vip)?;
    cluster.apply_policies(EGRESS_POLICY)?;
    let to_b = format!("tcp/{}/80", b.ip(Family::V4));
    wait_until(cluster, "x/a's egress policy", |_| {
        Ok(!probe(&s.probe_bin, client, &to_b)? && probe(&s.probe_bin, client, &to_vip)?)
    })?;
    let deferred_count = |c: &Cluster| -> anyhow::Result<u64> {
        let status = c.agent_status(node, &s.agent_bin)?;
        Ok(status
            .counters
            .iter()
            .find(|(name, _)| name == "service-deferred")
            .map_or(0, |(_, n)| *n))
    };
    let before = deferred_count(cluster)?;
    eprintln!("bench: pod traffic through a ClusterIP, egress decided after DNAT");
    let deferred = measure(s, client, &vip)?;
    let after = deferred_count(cluster)?;
    anyhow::ensure!(
        after > before,
        "the connections through the ClusterIP were not deferred ({before} -> {after} service-deferred)"
    );
    Ok((service, deferred))
}

/// Polls `ready` every 200 ms until it holds, for at most 30 s.
fn wait_until(
    cluster: &mut Cluster,
    what: &str,
    mut ready: impl FnMut(&Cluster) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        cluster.check_agents()?;
        if ready(cluster)? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "waited 30 s for {what}; agent logs:\n{}\n{}",
                cluster.agent_log(0),
                cluster.agent_log(1)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `netpol-bench connect-loop`: connects, reads to EOF and closes, as fast as it can, for `secs`.
pub fn connect_loop(addr: std::net::IpAddr, port: u16, secs: f64) -> serde_json::Value {
    use std::io::Read as _;
    let target = std::net::SocketAddr::new(addr, port);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let (mut ok, mut errors) = (0u64, 0u64);
    let mut buf = [0u8; 16];
    while Instant::now() < end {
        match std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
            Ok(mut c) => {
                while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
                ok += 1;
            }
            Err(_) => errors += 1,
        }
    }
    let took = start.elapsed().as_secs_f64();
    serde_json::json!({"connections": ok, "errors": errors, "secs": took, "per_second": ok as f64 / took})
}
