//! Part 6: how long a new pod waits before its traffic flows (issue 13 item 5), in a namespace that
//! no policy selects (the unpoliced case).
//!
//! On the simulated cluster, a pod is scheduled in namespace `fp` (no policies; namespace z has a
//! deny-all-ingress policy so that the agent has something to enforce) on node 0, its sandbox is
//! wired as the bridge plugin does (veth bridged and up, then the pod side configured; without the
//! CNI plugin, the pod side only once the agent has attached the veth), and at once
//! `netpol-probe ticker` in it sends a UDP datagram every 10 ms to `netpol-probe count` in x/c
//! (same node). The wait is the counter's first arrival (`first_ns`) minus the ticker's start
//! (`start_ns`), both `CLOCK_MONOTONIC`; its resolution is the 10 ms send interval. Modes, each
//! repeated (new pod every time):
//!
//! 1. no agent on the node (nothing attached: the baseline, run before any agent starts);
//! 2. `--pending drop` (the default), no CNI plugin: the veth is attached pending on sight and the
//!    pod's IP is published in the manifest directory right as the pod comes up;
//! 3. `--pending allow-unselected`, no CNI plugin, the IP not published during the measurement;
//! 4. `--pending drop` with the chained CNI plugin: `netpol-cni` ADD runs after the pod side is
//!    configured and before the ticker starts (the runtime starts the container after it), so the
//!    wait is from ADD's start; ADD's own duration is reported too.
//!
//! Every sample also gives the wait from the veth's creation (before `wire_link`), the time to the
//! attachment, and the packets node 0's agent dropped meanwhile, by reason (its counters).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use netpol_agent::observe::control::Status;
use netpol_tests::cluster::{Cluster, Pod};
use netpol_tests::first_packet::{Running, run_cni};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug)]
pub struct Settings {
    pub agent_bin: PathBuf,
    pub probe_bin: PathBuf,
    pub cni_bin: PathBuf,
    /// Repetitions per mode.
    pub reps: usize,
    /// How long each new pod sends (every 10 ms): a first packet later than that is a miss.
    pub window_ms: u64,
}

impl Settings {
    pub fn new(quick: bool, agent_bin: &Path, probe_bin: &Path, cni_bin: &Path) -> Settings {
        Settings {
            agent_bin: agent_bin.to_owned(),
            probe_bin: probe_bin.to_owned(),
            cni_bin: cni_bin.to_owned(),
            reps: if quick { 2 } else { 5 },
            window_ms: 1500,
        }
    }
}

/// min / median / max of the samples that got a packet through, in ms.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    pub n: usize,
    pub min_ms: f64,
    pub median_ms: f64,
    pub max_ms: f64,
}

impl Stats {
    fn of(mut v: Vec<f64>) -> Stats {
        if v.is_empty() {
            return Stats::default();
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Stats {
            n,
            min_ms: v[0],
            median_ms: if n % 2 == 1 {
                v[n / 2]
            } else {
                (v[n / 2 - 1] + v[n / 2]) / 2.0
            },
            max_ms: v[n - 1],
        }
    }

    fn cell(&self) -> String {
        if self.n == 0 {
            return "-".into();
        }
        format!(
            "{:.1} / {:.1} / {:.1}",
            self.min_ms, self.median_ms, self.max_ms
        )
    }
}

/// One new pod.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Sample {
    pub pod: String,
    /// Veth creation (before `wire_link`) to the pod side up (after `configure_pod`).
    pub link_to_up_ms: f64,
    /// Veth creation to both programs attached (their links pinned), in the modes without the CNI
    /// plugin, where the pod side comes up only then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_to_attached_ms: Option<f64>,
    /// The wait: from the ticker's start, or from ADD's start with the CNI plugin, to the first
    /// datagram received. None: nothing arrived within the window.
    pub wait_ms: Option<f64>,
    /// Veth creation to the first datagram received.
    pub link_to_first_ms: Option<f64>,
    /// CNI ADD's duration (spawn to exit of `netpol-cni`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_ms: Option<f64>,
    pub sent: u64,
    pub received: u64,
    /// Packets node 0's agent dropped during the run, by reason (its counters before and after).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub drops: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Mode {
    pub name: String,
    /// Agent arguments after the source (None: no agent on the node).
    pub agent_args: Option<Vec<String>>,
    pub cni: bool,
    /// The wait (see [`Sample::wait_ms`]).
    pub wait: Stats,
    /// Veth creation to first packet.
    pub from_link: Stats,
    /// Veth creation to programs attached (pending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach: Option<Stats>,
    /// CNI ADD duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add: Option<Stats>,
    /// Repetitions where nothing arrived within the window.
    pub missed: usize,
    /// [`Sample::drops`] summed over the runs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub drops: BTreeMap<String, u64>,
    pub samples: Vec<Sample>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Part {
    pub reps: usize,
    pub interval_ms: u64,
    pub window_ms: u64,
    pub modes: Vec<Mode>,
    pub notes: String,
}

impl Part {
    /// The mode named `name`.
    pub fn mode(&self, name: &str) -> Option<&Mode> {
        self.modes.iter().find(|m| m.name == name)
    }

    /// What is missing (a mode without a single packet through).
    pub fn missing(&self) -> Vec<String> {
        let mut m = Vec::new();
        if self.modes.len() != MODES.len() {
            m.push(format!(
                "first packet: {} modes, expected {}",
                self.modes.len(),
                MODES.len()
            ));
        }
        for mode in self.modes.iter().filter(|x| x.wait.n == 0) {
            m.push(format!(
                "first packet, {}: no packet through in {} runs",
                mode.name,
                mode.samples.len()
            ));
        }
        m
    }

    /// Markdown table.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "Time to first packet, new pod in an unpoliced namespace -> pod on the same node (UDP every {} ms, {} runs per mode; ms min / median / max):\n",
            self.interval_ms, self.reps
        );
        let _ = writeln!(
            o,
            "| mode | pod up -> first packet | veth created -> first packet | veth created -> attached | CNI ADD | drops (all runs) | missed |"
        );
        let _ = writeln!(o, "| --- | ---: | ---: | ---: | ---: | --- | ---: |");
        for m in &self.modes {
            let _ = writeln!(
                o,
                "| {} | {}{} | {} | {} | {} | {} | {} |",
                m.name,
                m.wait.cell(),
                if m.cni { " (from ADD start)" } else { "" },
                m.from_link.cell(),
                m.attach.map_or("-".into(), |a| a.cell()),
                m.add.map_or("-".into(), |a| a.cell()),
                if m.drops.is_empty() {
                    "-".to_owned()
                } else {
                    m.drops
                        .iter()
                        .map(|(r, n)| format!("{r} {n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                m.missed
            );
        }
        let _ = writeln!(o, "\n{}\n", self.notes);
        o
    }
}

/// The modes, in the order they run.
pub const MODES: [&str; 4] = [
    NO_AGENT,
    "pending drop, IP from the API",
    "pending allow-unselected, no IP",
    "CNI plugin ADD",
];
/// The baseline.
pub const NO_AGENT: &str = "no agent (baseline)";

/// The UDP port the counter listens on in x/c.
const INTERVAL_MS: u64 = 10;
/// The counter outlasts the ticker by this much (it starts before the sandbox is wired).
const COUNTER_EXTRA_MS: u64 = 1000;
/// Agent start or reprogramming deadline.
const CONVERGE: Duration = Duration::from_secs(30);

/// Enforced elsewhere, so the agent has a policy to compile; `fp`, the new pods' namespace, has none.
const POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-ingress
  namespace: z
spec:
  podSelector: {}
  policyTypes: [Ingress]
";

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn ms(from_ns: u64, to_ns: u64) -> f64 {
    to_ns.saturating_sub(from_ns) as f64 / 1e6
}

/// Runs `netpol-cni ADD` for `pod`; an error when it fails.
fn cni_add(cni_bin: &Path, c: &Cluster, pod: &Pod) -> anyhow::Result<()> {
    let out = run_cni(cni_bin, c, pod, "ADD")?;
    if !out.status.success() {
        bail!(
            "netpol-cni ADD for {} failed: {} {}",
            pod.id(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Builds the CNI plugin when it is missing beside the other binaries (`cargo xtask bench` builds
/// the agent, the test binaries and the bench, not the plugin).
fn ensure_cni(bin: &Path) -> anyhow::Result<()> {
    if bin.is_file() {
        return Ok(());
    }
    let profile_dir = bin.parent().context("CNI plugin path")?;
    let (Some(target_dir), Some(profile)) = (
        profile_dir.parent(),
        profile_dir.file_name().and_then(|p| p.to_str()),
    ) else {
        bail!("{} not found", bin.display());
    };
    eprintln!("bench: building netpol-cni ({profile})");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .args([
            "build",
            "--locked",
            "-p",
            "netpol-cni",
            "--bin",
            "netpol-cni",
        ])
        .args([
            "--profile",
            if profile == "debug" { "dev" } else { profile },
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .status()
        .context("running cargo build -p netpol-cni")?;
    if !status.success() || !bin.is_file() {
        bail!(
            "{} not found and building it failed ({status}): `cargo build --release -p netpol-cni` or set NETPOL_CNI_BIN",
            bin.display()
        );
    }
    Ok(())
}

/// `netpol-agent status -o json` of node `node`.
fn status(c: &Cluster, agent_bin: &Path, node: usize) -> anyhow::Result<Status> {
    let n = &c.nodes[node];
    let out = Command::new("ip")
        .args(["netns", "exec", &n.name])
        .arg(agent_bin)
        .args(["status", "-o", "json", "--pin-dir"])
        .arg(&n.pin_dir)
        .arg("--state-dir")
        .arg(&n.state_dir)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("running netpol-agent status")?;
    if !out.status.success() {
        bail!("netpol-agent status failed ({})", out.status);
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Node `node`'s drop counters by reason.
fn drops(c: &Cluster, agent_bin: &Path, node: usize) -> anyhow::Result<BTreeMap<String, u64>> {
    let s = status(c, agent_bin, node)?;
    Ok(netpol_common::Reason::ALL
        .iter()
        .filter(|r| r.is_drop())
        .map(|r| {
            let n = s
                .counters
                .iter()
                .find(|(x, _)| x == r.name())
                .map_or(0, |x| x.1);
            (r.name().to_owned(), n)
        })
        .collect())
}

/// Waits until the agent has both programs on `pod`'s veth (their TCX links pinned as
/// `<pin-dir>/links/<ifindex>-<hook>`); returns `CLOCK_MONOTONIC` then.
fn wait_attached(c: &Cluster, pod: &Pod) -> anyhow::Result<u64> {
    let n = &c.nodes[pod.node];
    let out = Command::new("ip")
        .args(["-n", &n.name, "-j", "link", "show", "dev", &pod.host_veth])
        .output()
        .context("ip link show")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let index = v[0]["ifindex"]
        .as_u64()
        .with_context(|| format!("no ifindex for {}", pod.host_veth))?;
    let links = n.pin_dir.join("links");
    let pins = ["egress", "ingress"].map(|h| links.join(format!("{index}-{h}")));
    let deadline = Instant::now() + CONVERGE;
    loop {
        if pins.iter().all(|p| p.exists()) {
            return Ok(monotonic_ns());
        }
        if Instant::now() > deadline {
            bail!(
                "{} ({}) not attached within {CONVERGE:?}; log:\n{}",
                pod.host_veth,
                pod.id(),
                c.agent_log(pod.node)
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until node `node`'s agent is ready and has every local pod of `c.pods` matched and
/// attached.
fn wait_synced(c: &mut Cluster, agent_bin: &Path, node: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        c.check_agents()?;
        let want: Vec<String> = c
            .pods
            .iter()
            .filter(|p| p.node == node)
            .map(Pod::id)
            .collect();
        if let Ok(s) = status(c, agent_bin, node) {
            let matched = |id: &String| {
                s.endpoints
                    .iter()
                    .any(|e| &e.pod == id && e.pending.is_none() && e.attached)
            };
            if s.ready && want.iter().all(matched) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the agent on node {node} did not match {want:?} within {CONVERGE:?}; log:\n{}",
                c.agent_log(node)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One new pod of `mode` (index into [`MODES`]).
fn sample(
    s: &Settings,
    c: &mut Cluster,
    target: &Pod,
    mode: usize,
    k: usize,
) -> anyhow::Result<Sample> {
    let name = format!("{}-{k}", ["base", "drop", "allow", "cni"][mode]);
    let pod = c.schedule_pod("fp", &name, 0, &[("pod", &name)])?;
    let id = pod.id();
    if mode > 0 {
        // As in a cluster, the scheduled Pod object is seen before its sandbox is made (50 ms
        // debounce of the manifest watch, then a sync).
        std::thread::sleep(Duration::from_millis(150));
    }
    let drops_before = if mode > 0 {
        Some(drops(c, &s.agent_bin, 0)?)
    } else {
        None
    };
    let counter = Running::counter(&s.probe_bin, &target.netns, s.window_ms + COUNTER_EXTRA_MS)?;
    let link_ns = monotonic_ns();
    c.wire_link(&pod)?;
    // Without the plugin, the pod side comes up once the veth is attached (pending): in a cluster
    // the bridge plugin's address management and the container start come between the two, and
    // a pod that sends before the attachment is the known edge of docs/security.md, not a wait.
    let attached_ns = if mode == 1 || mode == 2 {
        Some(wait_attached(c, &pod)?)
    } else {
        None
    };
    c.configure_pod(&pod)?;
    let up_ns = monotonic_ns();
    let add = if mode == 3 {
        let t = monotonic_ns();
        cni_add(&s.cni_bin, c, &pod)?;
        Some((t, monotonic_ns()))
    } else {
        None
    };
    let ticker = Running::ticker(&s.probe_bin, &pod, target, INTERVAL_MS, s.window_ms)?;
    if mode == 1 {
        c.report_pod_ip(&id)?;
    }
    let sent = ticker.result()?;
    let got = counter.result()?;
    if mode != 1 {
        c.report_pod_ip(&id)?;
    }
    let mut dropped = BTreeMap::new();
    if let Some(before) = drops_before {
        for (reason, n) in drops(c, &s.agent_bin, 0)? {
            let d = n.saturating_sub(before.get(&reason).copied().unwrap_or(0));
            if d > 0 {
                dropped.insert(reason, d);
            }
        }
    }
    let start_ns = sent["start_ns"].as_u64().context("ticker start_ns")?;
    let first_ns = got["first_ns"].as_u64();
    let from = add.map_or(start_ns, |(t, _)| t);
    let sample = Sample {
        pod: id,
        link_to_up_ms: ms(link_ns, up_ns),
        link_to_attached_ms: attached_ns.map(|a| ms(link_ns, a)),
        wait_ms: first_ns.map(|f| ms(from, f)),
        link_to_first_ms: first_ns.map(|f| ms(link_ns, f)),
        add_ms: add.map(|(a, b)| ms(a, b)),
        sent: sent["sent"].as_u64().unwrap_or(0),
        received: got["received"].as_u64().unwrap_or(0),
        drops: dropped,
    };
    if mode > 0 {
        // Settle: the agent has the pod matched before the next one starts.
        wait_synced(c, &s.agent_bin, 0)?;
    }
    Ok(sample)
}

fn mode_of(name: &str, agent_args: Option<&[&str]>, samples: Vec<Sample>) -> Mode {
    let of = |f: fn(&Sample) -> Option<f64>| Stats::of(samples.iter().filter_map(f).collect());
    let cni = samples.iter().any(|x| x.add_ms.is_some());
    Mode {
        name: name.to_owned(),
        agent_args: agent_args.map(|a| a.iter().map(|x| x.to_string()).collect()),
        cni,
        wait: of(|x| x.wait_ms),
        from_link: of(|x| x.link_to_first_ms),
        attach: samples
            .iter()
            .any(|x| x.link_to_attached_ms.is_some())
            .then(|| of(|x| x.link_to_attached_ms)),
        add: cni.then(|| of(|x| x.add_ms)),
        missed: samples.iter().filter(|x| x.wait_ms.is_none()).count(),
        drops: samples
            .iter()
            .flat_map(|x| &x.drops)
            .fold(BTreeMap::new(), |mut t, (r, n)| {
                *t.entry(r.clone()).or_insert(0) += n;
                t
            }),
        samples,
    }
}

pub fn run(s: &Settings) -> anyhow::Result<Part> {
    ensure_cni(&s.cni_bin)?;
    let mut c = Cluster::new(&s.probe_bin).context("building the simulated cluster")?;
    c.add_namespace("fp", &[("ns", "fp")])?;
    c.apply_policies(POLICY)?;
    let target = c.pod("x/c").clone();
    if target.node != 0 {
        bail!("x/c is expected on node 0");
    }
    let mut modes = Vec::new();
    let agent_args: [Option<&[&str]>; 4] = [
        None,
        Some(&["--pending", "drop"]),
        Some(&["--pending", "allow-unselected"]),
        Some(&["--pending", "drop"]),
    ];
    for (m, (name, args)) in MODES.iter().zip(agent_args).enumerate() {
        eprintln!("bench: first packet, {name}");
        if let Some(args) = args {
            if m == 1 {
                c.start_agent(1, &s.agent_bin)?;
            }
            let mut source: Vec<std::ffi::OsString> =
                vec!["--manifests".into(), c.manifest_dir.clone().into()];
            source.extend(args.iter().map(Into::into));
            c.start_agent_with_source(0, &s.agent_bin, &source)?;
            wait_synced(&mut c, &s.agent_bin, 0)?;
        }
        let samples = (0..s.reps)
            .map(|k| sample(s, &mut c, &target, m, k))
            .collect::<anyhow::Result<Vec<_>>>()
            .with_context(|| format!("first packet, {name}"))?;
        modes.push(mode_of(name, args, samples));
    }
    c.check_agents()?;
    drop(c);
    Ok(Part {
        reps: s.reps,
        interval_ms: INTERVAL_MS,
        window_ms: s.window_ms,
        modes,
        notes: NOTES.to_owned(),
    })
}

const NOTES: &str = "Simulated cluster, manifest source. A new pod in namespace fp (no policy \
selects it; z has a deny-all-ingress policy) on node 0 sends a UDP datagram every 10 ms to a \
counter in x/c (same node) from the instant its interface is up (veth made, bridged and up, then \
the pod side configured, as the bridge plugin does); the wait ends at the first datagram received \
(resolution: the 10 ms interval). 'no agent (baseline)': no agent has run on the node yet, nothing \
attached. Without the CNI plugin the pod side comes up once the veth is attached (pending), as in a \
cluster the bridge plugin's address management and the container start come between the two (a \
pod sending before the attachment is the known edge of docs/security.md). 'pending drop, IP from \
the API': the default; the pod's IP is written to the manifest directory right as the pod comes \
up, so this is the source's reaction (50 ms file-watch debounce) and reprogramming; the latency of \
a real K3s API server (kubelet status update, watch delivery) is not simulated and comes on top. \
'pending allow-unselected, no IP': `--pending allow-unselected`, the IP never published during the \
measurement; the pending veth is open because no policy isolates the node's pods without an \
endpoint. In both, a run near 1 s is the pod's first ARP request dropped as spoofed-link (sent \
before the agent had read the pod's new address from the kernel, so the sender is not yet the \
veth's own): Linux retries ARP after 1 s (retrans_time_ms) and then delivers the queued datagrams. \
'CNI plugin ADD': the chained netpol-cni plugin's ADD runs after the pod side is configured and \
before the ticker starts (a runtime starts the container after it); the wait is from ADD's start \
and includes it; the CNI ADD column is ADD alone (process spawn to exit). 'drops': node 0's agent's \
drop counters over the runs. 'missed': runs with nothing through within the ticker's window.";
