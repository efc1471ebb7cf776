//! The `run` loop: source -> cluster state -> compiler -> datapath, re-run on every change of the
//! cluster, of the node's links and addresses, and on every request of the CNI plugin.

mod cni;
mod sync;

use std::{
    fs::File,
    net::SocketAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{net::UnixListener, signal::unix::SignalKind, sync::mpsc};

use crate::{
    compiler::PendingRule,
    datapath::{Datapath, PinLayout, capacities::Capacities},
    discovery::{Discovery, events},
    observe::control::{self, SharedStatus, Status},
    observe::metrics,
    observe::{self, Observer},
    sources::{self, SourceConfig},
};

/// How often the node's veths are re-read even without a notification (a safety net: link and
/// address notifications wake the loop within milliseconds), and the counters refreshed.
const RESCAN_INTERVAL: Duration = Duration::from_secs(1);

/// How long a notification waits for the rest of its burst before the scan.
const EVENT_COALESCE: Duration = Duration::from_millis(5);

/// Settings of `netpol-agent run`.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    pub source: SourceConfig,
    pub layout: PinLayout,
    /// Control socket and the persisted cluster state (a directory that survives reboots).
    pub state_dir: PathBuf,
    /// Where `/healthz` and `/readyz` are served (`None`: not served).
    pub health_addr: Option<std::net::SocketAddr>,
    /// Where `/metrics` is served (`--metrics-addr`); None: not served.
    pub metrics_addr: Option<SocketAddr>,
    /// Whether per-pod series carry the pod's name (`--metrics-pod-label`).
    pub metrics_pod_label: metrics::PodLabel,
    /// How long the datapath keeps idle flows, by state.
    pub ct_timeouts: netpol_common::CtTimeouts,
    /// Most conntrack entries one endpoint may hold.
    pub ct_quota: u32,
    /// What a veth that has programs but no pod yet may do (`--pending`).
    pub pending_rule: PendingRule,
    /// Sizes of the decision maps (`--max-*`).
    pub capacities: Capacities,
    /// The mode of policies that set none (`--default-mode`).
    pub default_mode: crate::model::mode::Mode,
}

/// Takes an exclusive `flock` on a directory, so two agents can never share a pin or state directory.
fn lock_dir(path: &Path, what: &str) -> anyhow::Result<File> {
    let dir = File::open(path).with_context(|| format!("opening {what} {}", path.display()))?;
    // SAFETY: flock on a valid, owned file descriptor.
    let rc = unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        bail!(
            "{what} {} is in use by another netpol-agent (pick another directory or stop that agent)",
            path.display()
        );
    }
    Ok(dir)
}

fn check_kernel() -> anyhow::Result<()> {
    let v = aya::util::KernelVersion::current().context("reading the kernel version")?;
    if v < aya::util::KernelVersion::new(6, 6, 0) {
        bail!(
            "kernel {v:?} has no TCX (needs Linux 6.6 or newer): netpol-agent cannot attach its programs"
        );
    }
    Ok(())
}

/// The servers beside the sync loop, stopped when the loop ends.
struct Servers(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Servers {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT. Enforcement stays in place when it returns.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    // Everything that can fail on bad settings fails before anything is attached.
    check_kernel()?;
    let mut snapshots = sources::spawn(&cfg.source).await?;
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating the state directory {}", cfg.state_dir.display()))?;
    let _state_lock = lock_dir(&cfg.state_dir, "state directory")?;
    cfg.layout.prepare().with_context(|| {
        format!(
            "preparing the pin directory {}",
            cfg.layout.root().display()
        )
    })?;
    let _pin_lock = lock_dir(cfg.layout.root(), "pin directory")?;
    let mut datapath =
        Datapath::open(cfg.layout.clone(), &cfg.capacities).context("loading the datapath")?;
    datapath
        .set_conntrack(&cfg.ct_timeouts, cfg.ct_quota)
        .context("setting the conntrack timeouts and quota")?;
    let discovery = Discovery::new().context("opening rtnetlink")?;
    let link_events = events::subscribe().context("subscribing to rtnetlink notifications")?;

    let socket = control::socket_path(&cfg.state_dir);
    let _ = std::fs::remove_file(&socket);
    let listener =
        UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
    // Root only, whatever the umask: the socket programs endpoints (CNI claims).
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("restricting {} to root", socket.display()))?;
    let status: SharedStatus = Arc::new(Mutex::new(Status {
        node: cfg.node_name.clone(),
        pin_dir: cfg.layout.root().display().to_string(),
        source: cfg.source.describe(),
        ..Status::default()
    }));
    let observer = Observer::new(cfg.layout.clone());
    let (cni_tx, mut cni_rx) = mpsc::channel(256);
    let heartbeat = crate::observe::health::Heartbeat::default();
    let mut servers = Servers(vec![
        tokio::spawn(observe::run(observer.clone())),
        tokio::spawn(control::serve(
            listener,
            status.clone(),
            Some(observer.clone()),
            Some(cni_tx),
        )),
    ]);
    if let Some(addr) = cfg.metrics_addr {
        let registry = metrics::registry(observer.clone(), status.clone(), cfg.metrics_pod_label);
        servers
            .0
            .push(tokio::spawn(metrics::bind(addr, registry).await?));
    }
    if let Some(addr) = cfg.health_addr {
        crate::observe::health::spawn(addr, status.clone(), heartbeat.clone())?;
    }
    // kube-router's rules on the node, looked for again every minute, off the sync loop's thread.
    let kube_router_chains = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    servers
        .0
        .push(tokio::spawn(crate::verify::kube_router::watch(
            kube_router_chains.clone(),
        )));

    tracing::info!(node = %cfg.node_name, source = %cfg.source.describe(), pin_dir = %cfg.layout.root().display(), pending = ?cfg.pending_rule, default_mode = cfg.default_mode.name(), "agent started");
    let mut sync = sync::Sync::new(cfg.clone(), datapath, discovery, status);
    sync.observer = Some(observer);
    sync.kube_router_chains = kube_router_chains;
    sync.load_persisted();
    sync.take_snapshot(&snapshots.borrow_and_update());
    sync.reconcile();
    // The probes answer from other threads: the loop is alive from its first pass on.
    heartbeat.beat();
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    let mut tick = tokio::time::interval(RESCAN_INTERVAL);
    loop {
        tokio::select! {
            _ = link_events.notified() => {
                // A burst (CNI configuring a veth, or a pod toggling its addresses) costs one scan.
                tokio::time::sleep(EVENT_COALESCE).await;
                sync.reconcile();
            }
            Some(request) = cni_rx.recv() => sync.take_cni(request),
            changed = snapshots.changed() => {
                if changed.is_err() {
                    bail!("the cluster-state source stopped");
                }
                sync.take_snapshot(&snapshots.borrow_and_update());
                sync.reconcile();
            }
            _ = tick.tick() => {
                // Repairs first, so that the reconcile right after reports them.
                sync.housekeeping();
                sync.reconcile();
            }
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
        heartbeat.beat();
    }
    sync.save_state(true);
    drop(servers);
    let _ = std::fs::remove_file(&socket);
    tracing::info!("agent stopped; the last programmed policy stays enforced");
    Ok(())
}
