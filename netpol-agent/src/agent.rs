//! The `run` loop: source -> cluster state -> compiler -> datapath, re-run on every change.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::IpAddr,
    net::SocketAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use netpol_common::endpoint_flags;
use tokio::{net::UnixListener, signal::unix::SignalKind};

use crate::{
    compiler::{self, CompileInput, Compiled},
    control::{self, EndpointStatus, MapStatus, SharedStatus, Status},
    datapath::{Datapath, Hook, PinLayout},
    discovery::{Discovery, NodeView},
    metrics,
    model::{ClusterState, PodKey},
    observe::{self, Observer},
    source::{self, Snapshot, SourceConfig},
};

/// How often the node's veths are re-read: pods appear and disappear without any event in the
/// manifest directory.
const RESCAN_INTERVAL: Duration = Duration::from_millis(250);
/// How often expired conntrack entries are collected (the datapath already ignores them).
const CT_GC_INTERVAL: Duration = Duration::from_secs(30);
/// How often the order of the programs on the agent's TCX hooks is checked.
const TCX_ORDER_INTERVAL: Duration = Duration::from_secs(5);

/// Settings of `netpol-agent run`.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    pub source: SourceConfig,
    pub layout: PinLayout,
    pub state_dir: PathBuf,
    /// Where `/healthz` and `/readyz` are served (`None`: not served).
    pub health_addr: Option<std::net::SocketAddr>,
    /// Where `/metrics` is served (`--metrics-addr`); None: not served.
    pub metrics_addr: Option<SocketAddr>,
    /// How long the datapath keeps idle flows, by state.
    pub ct_timeouts: netpol_common::CtTimeouts,
    /// Most conntrack entries one endpoint may hold.
    pub ct_quota: u32,
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

/// Runs the agent until SIGTERM or SIGINT. Enforcement stays in place when it returns.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    // Everything that can fail on bad settings fails before anything is attached.
    check_kernel()?;
    let mut snapshots = source::spawn(&cfg.source).await?;
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
    let mut datapath = Datapath::open(cfg.layout.clone()).context("loading the datapath")?;
    datapath
        .set_conntrack(&cfg.ct_timeouts, cfg.ct_quota)
        .context("setting the conntrack timeouts and quota")?;
    let discovery = Discovery::new().context("opening rtnetlink")?;

    let socket = control::socket_path(&cfg.state_dir);
    let _ = std::fs::remove_file(&socket);
    let listener =
        UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
    let status: SharedStatus = Arc::new(Mutex::new(Status {
        node: cfg.node_name.clone(),
        pin_dir: cfg.layout.root().display().to_string(),
        source: cfg.source.describe(),
        ..Status::default()
    }));
    let observer = Observer::new(cfg.layout.clone());
    let metrics_server = match cfg.metrics_addr {
        Some(addr) => Some(tokio::spawn(
            metrics::bind(addr, metrics::registry(observer.clone(), status.clone())).await?,
        )),
        None => None,
    };
    let drain = tokio::spawn(observe::run(observer.clone()));
    let server = tokio::spawn(control::serve(
        listener,
        status.clone(),
        Some(observer.clone()),
    ));
    let heartbeat = crate::health::Heartbeat::default();
    let health = match cfg.health_addr {
        Some(addr) => Some(tokio::spawn(
            crate::health::bind(addr, status.clone(), heartbeat.clone()).await?,
        )),
        None => None,
    };
    // One look at the node's iptables for kube-router's rules, off the sync loop's thread.
    tokio::task::spawn_blocking(crate::kube_router::warn_if_present);

    tracing::info!(node = %cfg.node_name, source = %cfg.source.describe(), pin_dir = %cfg.layout.root().display(), "agent started");
    let mut sync = Sync::new(cfg.clone(), datapath, discovery, status);
    sync.observer = Some(observer);
    sync.take_snapshot(&snapshots.borrow_and_update());
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    let mut tick = tokio::time::interval(RESCAN_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                sync.reconcile();
                sync.collect_conntrack();
                sync.check_tcx_order();
                heartbeat.beat();
            }
            changed = snapshots.changed() => {
                if changed.is_err() {
                    bail!("the cluster-state source stopped");
                }
                sync.take_snapshot(&snapshots.borrow_and_update());
                sync.reconcile();
            }
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    server.abort();
    drain.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    if let Some(health) = health {
        health.abort();
    }
    let _ = std::fs::remove_file(&socket);
    tracing::info!("agent stopped; the last programmed policy stays enforced");
    Ok(())
}

/// The state of the sync loop.
struct Sync {
    cfg: AgentConfig,
    datapath: Datapath,
    discovery: Discovery,
    status: SharedStatus,
    /// None until the source has read the whole cluster once: until then nothing is changed.
    state: Option<Arc<ClusterState>>,
    source_problem: Option<String>,
    state_changed: bool,
    last_view: Option<NodeView>,
    /// Veths this process has attached (or adopted) its programs on.
    attached: BTreeMap<u32, String>,
    /// Tunnel devices this process has attached (or adopted) `tunnel_egress` on.
    tunnels: BTreeSet<u32>,
    last_errors: Vec<String>,
    /// Flows and metrics: what was programmed, and when the source saw it.
    observer: Option<Arc<Observer>>,
    /// When the source saw the oldest change not yet programmed.
    unprogrammed_since: Option<Instant>,
    /// When expired conntrack entries were last collected.
    last_ct_gc: Instant,
    /// When the TCX order was last checked.
    last_tcx_check: Instant,
    /// Programs that run before the agent's on the hooks it attached to, as problems.
    tcx_order_problems: Vec<String>,
}

impl Sync {
    fn new(
        cfg: AgentConfig,
        datapath: Datapath,
        discovery: Discovery,
        status: SharedStatus,
    ) -> Self {
        Sync {
            cfg,
            datapath,
            discovery,
            status,
            state: None,
            source_problem: None,
            state_changed: true,
            last_view: None,
            attached: BTreeMap::new(),
            tunnels: BTreeSet::new(),
            last_errors: Vec::new(),
            observer: None,
            unprogrammed_since: None,
            last_ct_gc: Instant::now(),
            last_tcx_check: Instant::now(),
            tcx_order_problems: Vec::new(),
        }
    }

    /// Every [`TCX_ORDER_INTERVAL`], finds programs that run before the agent's on its veths
    /// (attached after it with "first", say): they could pass packets past the policy. A change is
    /// reported through the next reconcile.
    fn check_tcx_order(&mut self) {
        if self.last_tcx_check.elapsed() < TCX_ORDER_INTERVAL {
            return;
        }
        self.last_tcx_check = Instant::now();
        let mut problems = Vec::new();
        for (ifindex, ifname) in &self.attached {
            for hook in Hook::ALL {
                match self.datapath.programs_before(ifname, hook) {
                    Ok(before) if before.is_empty() => {}
                    Ok(before) => problems.push(format!(
                        "{ifname} (ifindex {ifindex}): programs {before:?} run before {} on its TCX hook and could pass packets past the policy",
                        hook.program()
                    )),
                    Err(e) => problems.push(format!(
                        "{ifname} (ifindex {ifindex}): querying the TCX hook of {}: {e}",
                        hook.program()
                    )),
                }
            }
        }
        if problems != self.tcx_order_problems {
            self.tcx_order_problems = problems;
            self.state_changed = true;
        }
    }

    /// Collects expired conntrack entries every [`CT_GC_INTERVAL`].
    fn collect_conntrack(&mut self) {
        if self.last_ct_gc.elapsed() < CT_GC_INTERVAL {
            return;
        }
        self.last_ct_gc = Instant::now();
        match self.datapath.expire_conntrack(&self.cfg.ct_timeouts) {
            Ok(0) => {}
            Ok(removed) => tracing::debug!(removed, "expired conntrack entries collected"),
            Err(e) => tracing::warn!(error = %e, "collecting expired conntrack entries"),
        }
    }

    fn take_snapshot(&mut self, snapshot: &Snapshot) {
        if snapshot.problem != self.source_problem {
            match &snapshot.problem {
                Some(p) => tracing::error!(problem = %p, "source problem; keeping the last state"),
                None => tracing::info!("source recovered"),
            }
            self.source_problem = snapshot.problem.clone();
            // Re-run the sync so that status (and /readyz) list the problem, or stop listing it.
            self.state_changed = true;
        }
        if let Some(state) = &snapshot.state
            && self.state.as_ref().is_none_or(|s| !Arc::ptr_eq(s, state))
        {
            self.state = Some(state.clone());
            self.state_changed = true;
            self.unprogrammed_since.get_or_insert(snapshot.seen_at);
        }
    }

    fn reconcile(&mut self) {
        let view = match self.discovery.scan() {
            Ok(v) => v,
            Err(e) => {
                self.report_errors(vec![format!("discovery: {e:#}")]);
                return;
            }
        };
        let Some(state) = self.state.clone() else {
            // Nothing is enforced or changed yet, but a source that cannot read is a problem to show.
            self.report_errors(self.source_problem.iter().cloned().collect());
            return;
        };
        if !self.state_changed && self.last_view.as_ref() == Some(&view) {
            self.refresh_counters();
            return;
        }
        self.state_changed = false;
        let endpoints = match_endpoints(&state, &self.cfg.node_name, &view);
        let links = view.endpoint_links();
        let compiled = compiler::compile(&CompileInput {
            state: &state,
            node_name: &self.cfg.node_name,
            endpoints: &endpoints,
            host_addrs: &view.host_addrs,
            links: &links,
        });
        let mut errors: Vec<String> = self.source_problem.iter().cloned().collect();
        errors.extend(self.tcx_order_problems.iter().cloned());
        errors.extend(state.errors.iter().map(|e| e.to_string()));
        errors.extend(compiled.errors.iter().map(|e| e.to_string()));

        let wanted: BTreeMap<u32, &str> = view
            .veths
            .iter()
            .filter(|v| endpoints.values().any(|i| *i == v.ifindex))
            .map(|v| (v.ifindex, v.name.as_str()))
            .collect();
        // Detach first: a veth that stops being an endpoint loses its programs before its entry.
        let stale: BTreeSet<u32> = self
            .datapath
            .pinned_links()
            .into_iter()
            .map(|(ifindex, _)| ifindex)
            .chain(self.attached.keys().copied())
            .chain(self.tunnels.iter().copied())
            .filter(|i| !wanted.contains_key(i) && !view.tunnels.iter().any(|t| t.ifindex == *i))
            .collect();
        for ifindex in stale {
            match self.datapath.detach(ifindex) {
                Ok(()) => {
                    let ifname = self.attached.remove(&ifindex).unwrap_or_default();
                    self.tunnels.remove(&ifindex);
                    tracing::info!(ifindex, ifname, "detached");
                }
                Err(e) => errors.push(format!("detach ifindex {ifindex}: {e:#}")),
            }
        }
        let before = self.datapath.generation();
        let write_errors = self.datapath.apply(&compiled.contents());
        errors.extend(
            write_errors
                .iter()
                .map(|w| format!("map {} write failed: {}", w.map, w.error)),
        );
        if self.datapath.generation() != before {
            tracing::info!(
                generation = self.datapath.generation(),
                endpoints = compiled.endpoints.len(),
                policy_entries = self.datapath.contents().policy.len(),
                "datapath updated"
            );
        }
        // Flannel's VXLAN devices decide egress through Services to remote backends.
        for t in &view.tunnels {
            if self.tunnels.contains(&t.ifindex) {
                continue;
            }
            match self.datapath.attach_hook(t.ifindex, &t.name, Hook::Tunnel) {
                Ok(()) => {
                    tracing::info!(ifindex = t.ifindex, ifname = %t.name, "attached to tunnel device");
                    self.tunnels.insert(t.ifindex);
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        for (ifindex, ifname) in &wanted {
            if self.attached.contains_key(ifindex) {
                continue;
            }
            match self.datapath.attach(*ifindex, ifname) {
                Ok(()) => {
                    tracing::info!(ifindex, ifname, "attached to veth");
                    self.attached.insert(*ifindex, (*ifname).to_owned());
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        self.publish(&state, &view, &endpoints, &compiled);
        if let Some(observer) = &self.observer {
            observer.publish(&state, &endpoints);
            if let Some(seen_at) = self.unprogrammed_since.take() {
                observer.programmed(seen_at);
            }
        }
        self.report_errors(errors);
        self.last_view = Some(view);
    }

    /// Counters change with traffic, not with state: refreshed on every tick.
    fn refresh_counters(&self) {
        let counters = self
            .datapath
            .counters()
            .into_iter()
            .map(|(r, n)| (r.name().to_owned(), n))
            .collect();
        if let Ok(mut s) = self.status.lock() {
            s.counters = counters;
        }
    }

    fn report_errors(&mut self, errors: Vec<String>) {
        if errors != self.last_errors {
            for e in errors.iter().filter(|e| !self.last_errors.contains(e)) {
                tracing::error!(error = %e, "problem");
            }
            if errors.is_empty() {
                tracing::info!("all problems resolved");
            }
            self.last_errors = errors.clone();
        }
        if let Ok(mut s) = self.status.lock() {
            s.errors = errors;
        }
    }

    fn publish(
        &self,
        state: &ClusterState,
        view: &NodeView,
        endpoints: &BTreeMap<PodKey, u32>,
        compiled: &Compiled,
    ) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let eps = endpoints
            .iter()
            .map(|(pod, ifindex)| {
                let veth = view.veths.iter().find(|v| v.ifindex == *ifindex);
                let flags = compiled
                    .endpoints
                    .get(ifindex)
                    .map(|e| e.flags)
                    .unwrap_or(0);
                EndpointStatus {
                    pod: pod.to_string(),
                    ifname: veth.map(|v| v.name.clone()).unwrap_or_default(),
                    ifindex: *ifindex,
                    ips: veth
                        .map(|v| v.peer_addrs.iter().map(|a| a.to_string()).collect())
                        .unwrap_or_default(),
                    isolated_ingress: flags & endpoint_flags::ISOLATED_INGRESS != 0,
                    isolated_egress: flags & endpoint_flags::ISOLATED_EGRESS != 0,
                    attached: self.attached.contains_key(ifindex),
                }
            })
            .collect();
        let Ok(mut s) = self.status.lock() else {
            return;
        };
        s.ready = true;
        s.last_sync_unix = Some(now);
        s.generation = self.datapath.generation();
        s.policies = state.policies.len();
        s.pods = state.pods.len();
        s.namespaces = state.namespaces.len();
        s.endpoints = eps;
        s.maps = self
            .datapath
            .usage()
            .into_iter()
            .map(|u| MapStatus {
                name: u.name.to_owned(),
                entries: u.entries,
                capacity: u.capacity,
            })
            .collect();
        s.counters = self
            .datapath
            .counters()
            .into_iter()
            .map(|(r, n)| (r.name().to_owned(), n))
            .collect();
    }
}

/// The local pods that have a veth here: a pod of this node whose address is on a veth's peer.
pub fn match_endpoints(
    state: &ClusterState,
    node_name: &str,
    view: &NodeView,
) -> BTreeMap<PodKey, u32> {
    let by_ip: BTreeMap<IpAddr, &PodKey> = state
        .pods
        .values()
        .filter(|p| p.node_name.as_deref() == Some(node_name) && p.is_policy_peer())
        .flat_map(|p| p.ips.iter().map(move |ip| (*ip, &p.key)))
        .collect();
    let mut endpoints = BTreeMap::new();
    for veth in &view.veths {
        if let Some(pod) = veth.peer_addrs.iter().find_map(|a| by_ip.get(a)) {
            endpoints.entry((*pod).clone()).or_insert(veth.ifindex);
        }
    }
    endpoints
}
