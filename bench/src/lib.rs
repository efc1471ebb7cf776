//! `cargo xtask bench`: what enforcement costs, measured the same way every time, beside its baselines.
//!
//! 1. [`datapath`]: ns per packet of the classifier (`BPF_PROG_TEST_RUN`) with 10 to 10,000 policies,
//!    beside an empty classifier (the floor).
//! 2. [`iptables`]: the same flows against a linear iptables ruleset of the same size; the crossover.
//! 3. [`traffic`]: TCP throughput and connection rate between two pods of the simulated cluster, with
//!    the agent enforcing an allow policy against no agent.
//! 4. [`control`]: full sync, change-to-enforced latency and peak RSS for 5,000 pods, 1,000 policies
//!    and 110 local pods.
//! 5. [`api_memory`]: the real agent process on the Kubernetes API source (against the API server
//!    test double serving 5,000 pods and 1,000 policies, ~110 of the pods local): first sync time and
//!    peak RSS (`VmHWM`) after the sync and after churn.
//! 6. [`first_packet`]: how long a new pod in an unpoliced namespace waits before its first packet
//!    gets through, with no agent, with the agent (`--pending drop` and `allow-unselected`) and with
//!    the CNI plugin.
//!
//! The report goes to `target/bench/report.json`; [`Report::table`] renders it. Timed numbers are only
//! reported, never asserted: [`Report::missing`] says whether every part produced its numbers.

pub mod api_memory;
pub mod bpf;
pub mod control;
pub mod datapath;
pub mod first_packet;
pub mod iptables;
pub mod ladder;
pub mod mix;
pub mod synth;
pub mod traffic;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    pub quick: bool,
    /// This binary (re-run for the control-plane child and the connect loop).
    pub bench_bin: PathBuf,
    pub agent_bin: PathBuf,
    pub probe_bin: PathBuf,
    pub cni_bin: PathBuf,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu_model: String,
}

impl Machine {
    pub fn current() -> Self {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned();
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default();
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel,
            cpu_model,
        }
    }
}

/// A target of the issue, met or not.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    pub target: String,
    pub measured: String,
    pub met: bool,
}

/// Where iptables starts costing more per packet than the eBPF classifier.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Crossover {
    pub flow: String,
    /// Smallest measured size at which iptables (average over the four packet kinds) costs more.
    pub first_size_iptables_slower: Option<usize>,
    /// Rules at which a straight line through the iptables figures meets the eBPF figure (mean over sizes).
    pub break_even_rules: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub machine: Machine,
    pub quick: bool,
    pub started_unix: u64,
    pub seconds: f64,
    pub datapath: Option<datapath::Part>,
    pub iptables: Option<iptables::Part>,
    pub crossover: Vec<Crossover>,
    pub traffic: Option<traffic::Part>,
    pub control_plane: Option<control::Part>,
    #[serde(default)]
    pub api_memory: Option<api_memory::Part>,
    #[serde(default)]
    pub first_packet: Option<first_packet::Part>,
    /// The scale ladder on the realistic mix, one rung per size.
    #[serde(default)]
    pub ladder: Vec<ladder::Rung>,
    pub targets: Vec<Target>,
    /// Parts that failed, with why.
    pub errors: Vec<String>,
}

/// Sizes of the datapath and iptables parts.
pub fn sizes(quick: bool) -> Vec<usize> {
    if quick {
        vec![10]
    } else {
        vec![10, 100, 1_000, 10_000]
    }
}

/// The control-plane cluster: the issue's, or a tenth of it for `--quick`.
pub fn control_spec(quick: bool) -> (synth::Spec, usize) {
    if quick {
        (
            synth::Spec {
                pods: 500,
                policies: 100,
                local_pods: 110,
            },
            10,
        )
    } else {
        (
            synth::Spec {
                pods: 5_000,
                policies: 1_000,
                local_pods: 110,
            },
            100,
        )
    }
}

/// Runs one rung of the ladder in a child process (its own peak RSS).
fn rung_in_child(o: &Options, spec: mix::MixSpec) -> anyhow::Result<ladder::Rung> {
    let out = Command::new(&o.bench_bin)
        .arg("ladder-rung")
        .args(["--pods", &spec.pods.to_string()])
        .args(["--policies", &spec.policies.to_string()])
        .args(["--changes", if o.quick { "10" } else { "100" }])
        .output()
        .with_context(|| format!("running {} ladder-rung", o.bench_bin.display()))?;
    if !out.status.success() {
        bail!(
            "ladder rung {spec:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn control_in_child(o: &Options) -> anyhow::Result<control::Part> {
    let out = Command::new(&o.bench_bin)
        .arg("control-plane")
        .args(o.quick.then_some("--quick"))
        .output()
        .with_context(|| format!("running {} control-plane", o.bench_bin.display()))?;
    if !out.status.success() {
        bail!(
            "control-plane child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Runs every part; a part that fails is recorded in [`Report::errors`] and the others still run.
pub fn run(o: &Options) -> Report {
    let started = Instant::now();
    let mut r = Report {
        machine: Machine::current(),
        quick: o.quick,
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        ..Report::default()
    };
    let dp = datapath::Settings {
        sizes: sizes(o.quick),
        repeat: if o.quick { 200_000 } else { 1_000_000 },
        rounds: 3,
        samples: if o.quick { 500 } else { 2_000 },
    };
    eprintln!("bench: 1/7 datapath (BPF_PROG_TEST_RUN)");
    match datapath::run(&dp) {
        Ok(p) => r.datapath = Some(p),
        Err(e) => r.errors.push(format!("datapath: {e:#}")),
    }
    eprintln!("bench: 2/7 iptables");
    match iptables::run(&iptables::Settings {
        sizes: sizes(o.quick),
        packets: if o.quick { 50_000 } else { 100_000 },
        rounds: 3,
    }) {
        Ok(p) => r.iptables = Some(p),
        Err(e) => r.errors.push(format!("iptables: {e:#}")),
    }
    eprintln!("bench: 3/7 pod traffic");
    match traffic::run(&traffic::Settings {
        agent_bin: o.agent_bin.clone(),
        probe_bin: o.probe_bin.clone(),
        bench_bin: o.bench_bin.clone(),
        secs: if o.quick { 1 } else { 3 },
        reps: if o.quick { 1 } else { 3 },
    }) {
        Ok(p) => r.traffic = Some(p),
        Err(e) => r.errors.push(format!("traffic: {e:#}")),
    }
    eprintln!("bench: 4/7 control plane");
    match control_in_child(o) {
        Ok(p) => r.control_plane = Some(p),
        Err(e) => r.errors.push(format!("control plane: {e:#}")),
    }
    eprintln!("bench: 5/7 agent memory on the API source");
    match api_memory::run(&o.agent_bin, api_memory::Spec::new(o.quick)) {
        Ok(p) => r.api_memory = Some(p),
        Err(e) => r
            .errors
            .push(format!("agent memory on the API source: {e:#}")),
    }
    eprintln!("bench: 6/7 time to first packet");
    match first_packet::run(&first_packet::Settings::new(
        o.quick,
        &o.agent_bin,
        &o.probe_bin,
        &o.cni_bin,
    )) {
        Ok(p) => r.first_packet = Some(p),
        Err(e) => r.errors.push(format!("first packet: {e:#}")),
    }
    eprintln!("bench: 7/7 scale ladder");
    for spec in ladder::rungs(o.quick) {
        match rung_in_child(o, spec) {
            Ok(rung) => r.ladder.push(rung),
            Err(e) => r.errors.push(format!("scale ladder: {e:#}")),
        }
    }
    r.crossover = crossover(&r);
    r.targets = targets(&r);
    r.seconds = started.elapsed().as_secs_f64();
    r
}

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

/// eBPF and iptables ns per packet for `flow` at `size`, averaged over the four packet kinds.
fn pair(r: &Report, flow: &str, size: usize) -> Option<(f64, f64)> {
    let dp = r
        .datapath
        .as_ref()?
        .sizes
        .iter()
        .find(|s| s.policies == size)?;
    let ebpf = mean(dp.cases.iter().filter(|c| c.flow == flow).map(|c| c.ns))?;
    let ipt = mean(
        r.iptables
            .as_ref()?
            .cases
            .iter()
            .filter(|c| c.flow == flow && c.rules == size)
            .map(|c| c.ns),
    )?;
    Some((ebpf, ipt))
}

fn crossover(r: &Report) -> Vec<Crossover> {
    let sizes: Vec<usize> = r
        .datapath
        .as_ref()
        .map(|d| d.sizes.iter().map(|s| s.policies).collect())
        .unwrap_or_default();
    ["new", "established", "denied"]
        .into_iter()
        .map(|flow| {
            let points: Vec<(usize, f64, f64)> = sizes
                .iter()
                .filter_map(|&n| pair(r, flow, n).map(|(e, i)| (n, e, i)))
                .collect();
            let first = points.iter().find(|(_, e, i)| i > e).map(|p| p.0);
            let break_even = match (points.first(), points.last()) {
                (Some(a), Some(b)) if b.0 > a.0 && b.2 > a.2 => {
                    let slope = (b.2 - a.2) / (b.0 - a.0) as f64;
                    let ebpf = mean(points.iter().map(|p| p.1)).unwrap_or(0.0);
                    Some(((ebpf - a.2) / slope + a.0 as f64).max(0.0))
                }
                (Some(a), _) if a.2 > 0.0 => Some(a.1 / (a.2 / a.0 as f64)),
                _ => None,
            };
            Crossover {
                flow: flow.to_owned(),
                first_size_iptables_slower: first,
                break_even_rules: break_even,
            }
        })
        .collect()
}

fn targets(r: &Report) -> Vec<Target> {
    let mut t = Vec::new();
    let mut push = |name: &str, target: &str, measured: String, met: bool| {
        t.push(Target {
            name: name.into(),
            target: target.into(),
            measured,
            met,
        })
    };
    if let Some(dp) = &r.datapath {
        let worst = dp
            .sizes
            .iter()
            .flat_map(|s| s.cases.iter().map(move |c| (s.policies, c)))
            .max_by(|a, b| a.1.x_floor.total_cmp(&b.1.x_floor));
        if let Some((n, c)) = worst {
            push(
                "classifier cost vs floor",
                "every case within 3x of the floor",
                format!(
                    "worst {:.2}x ({} {} at {n} policies: {:.0} ns)",
                    c.x_floor, c.flow, c.packet, c.ns
                ),
                c.x_floor <= 3.0,
            );
        }
        if let (Some(small), Some(large)) = (dp.sizes.first(), dp.sizes.last())
            && large.policies > small.policies
        {
            let worst = large
                .cases
                .iter()
                .filter_map(|l| {
                    let s = small
                        .cases
                        .iter()
                        .find(|s| s.flow == l.flow && s.packet == l.packet)?;
                    Some((l, l.ns / s.ns.max(1.0), s.ns))
                })
                .max_by(|a, b| a.1.total_cmp(&b.1));
            if let Some((c, ratio, small_ns)) = worst {
                push(
                    "flat from 10 to 10,000 policies",
                    "largest size within 20% of the smallest",
                    format!(
                        "worst {:+.0}% ({} {}: {small_ns:.0} -> {:.0} ns)",
                        (ratio - 1.0) * 100.0,
                        c.flow,
                        c.packet,
                        c.ns
                    ),
                    ratio <= 1.2,
                );
            }
        }
    }
    if let Some(tr) = &r.traffic {
        push(
            "TCP throughput with agent",
            ">= 95% of no agent",
            format!(
                "{:.1}% ({:.2} vs {:.2} Gbit/s)",
                tr.throughput_ratio * 100.0,
                tr.agent_gbps,
                tr.baseline_gbps
            ),
            tr.throughput_ratio >= 0.95,
        );
        push(
            "connection rate with agent",
            ">= 90% of no agent",
            format!(
                "{:.1}% ({:.0} vs {:.0} conn/s)",
                tr.conn_rate_ratio * 100.0,
                tr.agent_conn_per_s,
                tr.baseline_conn_per_s
            ),
            tr.conn_rate_ratio >= 0.90,
        );
    }
    if let Some(cp) = &r.control_plane {
        push(
            "full sync",
            "< 1 s",
            format!("{:.0} ms", cp.full_sync_ms),
            cp.full_sync_ms < 1000.0,
        );
        push(
            "change-to-enforced p99",
            "< 100 ms",
            format!(
                "{:.1} ms (p50 {:.1} ms)",
                cp.all_changes.p99_ms, cp.all_changes.p50_ms
            ),
            cp.all_changes.p99_ms < 100.0,
        );
        push(
            "peak RSS",
            "< 100 MiB",
            format!("{:.1} MiB", cp.peak_rss_mib),
            cp.peak_rss_mib < 100.0,
        );
    }
    if let Some(top) = r.ladder.last()
        && let Some(spec) = top.spec
    {
        let at = format!("{} pods / {} policies", spec.pods, spec.policies);
        push(
            "ladder: ready",
            "< 10 s at 50,000 pods / 10,000 policies",
            format!("{:.0} ms at {at}", top.ready_ms),
            top.ready_ms < 10_000.0,
        );
        let worst = [&top.policy_edits, &top.relabels, &top.churn]
            .into_iter()
            .map(|l| l.p99_ms)
            .fold(0.0, f64::max);
        push(
            "ladder: change-to-enforced p99",
            "< 100 ms (edits, relabels, churn)",
            format!(
                "{:.0} / {:.0} / {:.0} ms at {at}",
                top.policy_edits.p99_ms, top.relabels.p99_ms, top.churn.p99_ms
            ),
            worst < 100.0,
        );
        push(
            "ladder: peak RSS",
            "< 256 MiB",
            format!("{:.0} MiB at {at}", top.peak_rss_mib),
            top.peak_rss_mib < 256.0,
        );
        push(
            "ladder: capacity",
            "no map short",
            format!("{} shortfalls at {at}", top.shortfalls),
            top.shortfalls == 0,
        );
    }
    if let Some(am) = &r.api_memory {
        push(
            "agent peak RSS, API source",
            "< 100 MiB",
            format!(
                "{:.1} MiB ({} pods, {} policies)",
                am.peak_rss_after_churn_mib, am.spec.pods, am.spec.policies
            ),
            am.peak_rss_after_churn_mib < 100.0,
        );
    }
    if let Some(fp) = &r.first_packet {
        let agent: Vec<&first_packet::Mode> = fp
            .modes
            .iter()
            .filter(|m| m.name != first_packet::NO_AGENT)
            .collect();
        let measured: Vec<String> = fp
            .modes
            .iter()
            .map(|m| format!("{} {:.0} ms", m.name, m.wait.median_ms))
            .collect();
        push(
            "first packet, new pod, unpoliced namespace",
            "< 100 ms from the pod's interface up (median of each agent mode)",
            measured.join("; "),
            !agent.is_empty()
                && agent
                    .iter()
                    .all(|m| m.wait.n > 0 && m.missed == 0 && m.wait.median_ms < 100.0),
        );
    }
    t
}

impl Report {
    /// What is missing from the report (empty: complete). Checks presence and sanity, not speed.
    pub fn missing(&self) -> Vec<String> {
        let mut m: Vec<String> = self.errors.clone();
        let expected = sizes(self.quick);
        match &self.datapath {
            None => m.push("datapath part missing".into()),
            Some(dp) => {
                if dp.floor.floor_ns <= 0.0 && dp.floor.floor_single_ns <= 0.0 {
                    m.push("no floor measured".into());
                }
                let got: Vec<usize> = dp.sizes.iter().map(|s| s.policies).collect();
                if got != expected {
                    m.push(format!("datapath sizes {got:?}, expected {expected:?}"));
                }
                for s in &dp.sizes {
                    if s.cases.len() != 12 {
                        m.push(format!(
                            "{} policies: {} cases, expected 12",
                            s.policies,
                            s.cases.len()
                        ));
                    }
                    for c in s.cases.iter().filter(|c| !c.verdict_ok || c.ns <= 0.0) {
                        m.push(format!(
                            "{} policies: {} {} bad: {c:?}",
                            s.policies, c.flow, c.packet
                        ));
                    }
                }
            }
        }
        match &self.iptables {
            None => m.push("iptables part missing".into()),
            Some(ip) if ip.cases.len() != 12 * expected.len() => m.push(format!(
                "iptables: {} cases, expected {}",
                ip.cases.len(),
                12 * expected.len()
            )),
            Some(_) => {}
        }
        match &self.traffic {
            None => m.push("traffic part missing".into()),
            Some(t)
                if !(t.baseline_gbps > 0.0
                    && t.agent_gbps > 0.0
                    && t.baseline_conn_per_s > 0.0
                    && t.agent_conn_per_s > 0.0
                    && t.run_time_ns.len() == 2
                    && t.run_time_ns.iter().all(|(_, ns)| *ns > 0.0)) =>
            {
                m.push(format!("traffic numbers missing: {t:?}"))
            }
            Some(_) => {}
        }
        match &self.control_plane {
            None => m.push("control-plane part missing".into()),
            Some(c)
                if !(c.full_sync_ms > 0.0 && c.peak_rss_mib > 0.0 && c.all_changes.count > 0) =>
            {
                m.push(format!("control-plane numbers missing: {c:?}"))
            }
            Some(_) => {}
        }
        match &self.first_packet {
            None => m.push("first-packet part missing".into()),
            Some(f) => m.extend(f.missing()),
        }
        let rungs = ladder::rungs(self.quick).len();
        if self.ladder.len() != rungs
            || self
                .ladder
                .iter()
                .any(|r| r.ready_ms <= 0.0 || r.churn.count == 0)
        {
            m.push(format!(
                "ladder: {} of {rungs} rungs complete",
                self.ladder.len()
            ));
        }
        if self.targets.len() < 6 + usize::from(!self.quick) {
            m.push(format!("only {} targets evaluated", self.targets.len()));
        }
        m
    }

    /// The report as Markdown tables.
    pub fn table(&self) -> String {
        let mut o = String::new();
        let m = &self.machine;
        let _ = writeln!(
            o,
            "Machine: {} CPUs ({}), Linux {}; {}run took {:.0} s\n",
            m.nproc,
            m.cpu_model,
            m.kernel,
            if self.quick { "--quick " } else { "" },
            self.seconds
        );
        if let Some(dp) = &self.datapath {
            let _ = writeln!(
                o,
                "Per-packet cost of `pod_ingress` (ns, BPF_PROG_TEST_RUN; x = over the floor). Floor (empty classifier): {:.0} ns per run at repeat, {:.0} ns as a single run.\n",
                dp.floor.floor_ns, dp.floor.floor_single_ns
            );
            let _ = writeln!(
                o,
                "| policies | pods / identities | policy entries | flow | tcp4 | udp4 | tcp6 | udp6 |"
            );
            let _ = writeln!(
                o,
                "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"
            );
            for s in &dp.sizes {
                for flow in ["new", "established", "denied"] {
                    let cells: Vec<String> = ["tcp4", "udp4", "tcp6", "udp6"]
                        .iter()
                        .map(|p| {
                            s.cases
                                .iter()
                                .find(|c| c.flow == flow && c.packet == *p)
                                .map_or("-".into(), |c| format!("{:.0} ({:.1}x)", c.ns, c.x_floor))
                        })
                        .collect();
                    let _ = writeln!(
                        o,
                        "| {} | {} / {} | {} | {flow} | {} |",
                        s.policies,
                        s.pods,
                        s.pod_identities,
                        s.policy_entries,
                        cells.join(" | ")
                    );
                }
            }
            o.push('\n');
        }
        if let Some(ip) = &self.iptables {
            let _ = writeln!(
                o,
                "Linear iptables ruleset ({}), added ns per packet over no netfilter, beside eBPF (mean of the four packet kinds):\n",
                ip.iptables_version
            );
            let _ = writeln!(
                o,
                "| rules = policies | flow | iptables tcp4 | udp4 | tcp6 | udp6 | iptables mean | eBPF mean |"
            );
            let _ = writeln!(
                o,
                "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
            );
            for n in sizes(self.quick) {
                for flow in ["new", "established", "denied"] {
                    let cells: Vec<String> = ["tcp4", "udp4", "tcp6", "udp6"]
                        .iter()
                        .map(|p| {
                            ip.cases
                                .iter()
                                .find(|c| c.rules == n && c.flow == flow && c.packet == *p)
                                .map_or("-".into(), |c| format!("{:.0}", c.ns))
                        })
                        .collect();
                    let (e, i) = pair(self, flow, n).map_or(("-".into(), "-".into()), |(e, i)| {
                        (format!("{e:.0}"), format!("{i:.0}"))
                    });
                    let _ = writeln!(o, "| {n} | {flow} | {} | {i} | {e} |", cells.join(" | "));
                }
            }
            o.push('\n');
            for c in &self.crossover {
                let _ = writeln!(
                    o,
                    "- crossover, {} flows: iptables costs more from {} measured; straight-line break-even at {} rules",
                    c.flow,
                    c.first_size_iptables_slower
                        .map_or("no size".into(), |n| format!("{n} rules")),
                    c.break_even_rules
                        .map_or("-".into(), |n| format!("~{n:.0}"))
                );
            }
            o.push('\n');
        }
        if let Some(t) = &self.traffic {
            traffic_table(
                &mut o,
                "| pod to pod (same node) | no agent | agent enforcing | ratio |",
                (t.baseline_gbps, t.agent_gbps),
                (t.baseline_conn_per_s, t.agent_conn_per_s),
            );
            if t.service_gbps > 0.0 {
                traffic_table(
                    &mut o,
                    "| through a ClusterIP (same node) | client not egress-isolated | verdict deferred to after DNAT | ratio |",
                    (t.service_gbps, t.deferred_gbps),
                    (t.service_conn_per_s, t.deferred_conn_per_s),
                );
            }
            for (program, ns) in &t.run_time_ns {
                let _ = writeln!(
                    o,
                    "{program} on that traffic (kernel.bpf_stats_enabled): {ns:.0} ns per packet"
                );
            }
            let _ = writeln!(o);
        }
        if let Some(c) = &self.control_plane {
            if let Some(s) = c.spec {
                let _ = writeln!(
                    o,
                    "Control plane, {} pods, {} policies, {} local pods ({} POLICY entries, {} IPCACHE entries):\n",
                    s.pods, s.policies, s.local_pods, c.policy_entries, c.ipcache_entries
                );
            }
            let _ = writeln!(o, "| measure | value |");
            let _ = writeln!(o, "| --- | ---: |");
            let _ = writeln!(
                o,
                "| full sync (compile + apply) | {:.0} ms ({:.0} + {:.0}) |",
                c.full_sync_ms, c.full_sync_compile_ms, c.full_sync_apply_ms
            );
            for (name, l) in [
                ("policy change", &c.policy_changes),
                ("pod label change", &c.label_changes),
                ("all changes", &c.all_changes),
            ] {
                let _ = writeln!(
                    o,
                    "| {name}, p50 / p99 / max ({} changes; compile share {:.0}%) | {:.1} / {:.1} / {:.1} ms |",
                    l.count,
                    l.compile_share * 100.0,
                    l.p50_ms,
                    l.p99_ms,
                    l.max_ms
                );
            }
            let _ = writeln!(o, "| peak RSS (VmHWM) | {:.1} MiB |\n", c.peak_rss_mib);
        }
        if !self.ladder.is_empty() {
            o.push_str(&ladder::table(&self.ladder));
        }
        if let Some(a) = &self.api_memory {
            let _ = writeln!(
                o,
                "The agent process on the API source (API server double), {} pods, {} policies, {} local pods:\n",
                a.spec.pods, a.spec.policies, a.local_pods
            );
            let _ = writeln!(o, "| measure | value |");
            let _ = writeln!(o, "| --- | ---: |");
            let _ = writeln!(
                o,
                "| start to first ready sync | {:.0} ms |",
                a.first_sync_ms
            );
            let _ = writeln!(
                o,
                "| peak RSS (VmHWM) after the first sync | {:.1} MiB |",
                a.peak_rss_after_sync_mib
            );
            let _ = writeln!(
                o,
                "| peak RSS (VmHWM) after {} changes | {:.1} MiB |",
                a.churn_changes, a.peak_rss_after_churn_mib
            );
            let _ = writeln!(o, "| RSS at the end (VmRSS) | {:.1} MiB |", a.rss_end_mib);
            let _ = writeln!(
                o,
                "| `/healthz` during the changes: answers, slowest, p99, failed | {}, {:.1} ms, {:.1} ms, {} |\n",
                a.health.polls, a.health.max_ms, a.health.p99_ms, a.health.failures
            );
        }
        if let Some(f) = &self.first_packet {
            o.push_str(&f.table());
        }
        if !self.targets.is_empty() {
            let _ = writeln!(o, "| target | wanted | measured | met |");
            let _ = writeln!(o, "| --- | --- | --- | --- |");
            for t in &self.targets {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} |",
                    t.name,
                    t.target,
                    t.measured,
                    if t.met { "yes" } else { "**no**" }
                );
            }
        }
        for e in &self.errors {
            let _ = writeln!(o, "\nERROR: {e}");
        }
        o
    }
}

/// A two-row table: throughput and connection rate, before and after, with their ratio.
fn traffic_table(o: &mut String, header: &str, gbps: (f64, f64), cps: (f64, f64)) {
    use std::fmt::Write as _;
    let _ = writeln!(o, "{header}\n| --- | ---: | ---: | ---: |");
    let _ = writeln!(
        o,
        "| TCP throughput (iperf3) | {:.2} Gbit/s | {:.2} Gbit/s | {:.1}% |",
        gbps.0,
        gbps.1,
        gbps.1 / gbps.0 * 100.0
    );
    let _ = writeln!(
        o,
        "| new connections | {:.0}/s | {:.0}/s | {:.1}% |\n",
        cps.0,
        cps.1,
        cps.1 / cps.0 * 100.0
    );
}
