//! The state of the sync loop and one pass of it: read the node, match veths with pods, compile,
//! write the maps, attach.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use netpol_common::endpoint_flags;

use super::{AgentConfig, cni::Claims};
use crate::{
    compiler::{self, CompileInput, Compiled, PendingReason},
    datapath::{Datapath, Hook},
    discovery::endpoints::{self, MatchInput, Matching},
    discovery::{Discovery, NodeView},
    model::{ClusterState, PodKey},
    observe::Observer,
    observe::control::{CniRequest, EndpointStatus, MapStatus, SharedStatus},
    sources::Snapshot,
    sources::persisted,
};

/// How often expired conntrack entries are collected (the datapath already ignores them).
const CT_GC_INTERVAL: Duration = Duration::from_secs(30);
/// How often the order of the programs on the agent's TCX hooks is checked.
const TCX_ORDER_INTERVAL: Duration = Duration::from_secs(5);
/// How long a repair of the agent's attachments stays listed under problems.
const REPAIR_SHOWN_FOR: Duration = Duration::from_secs(300);
/// Least time between two saves of the cluster state (each change is saved, at most this often).
const SAVE_INTERVAL: Duration = Duration::from_secs(5);

/// A save that runs this long is reported as a problem, and the agent stops without waiting for it.
const SAVE_STALLED: Duration = Duration::from_secs(60);

/// The save under way, on its own thread.
struct Saving {
    thread: std::thread::JoinHandle<Result<(), persisted::PersistError>>,
    since: Instant,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The state of the sync loop.
pub(super) struct Sync {
    cfg: AgentConfig,
    datapath: Datapath,
    discovery: Discovery,
    status: SharedStatus,
    /// None until the source has read the whole cluster once and nothing was persisted: until then
    /// only new veths are touched (attached, pending).
    state: Option<Arc<ClusterState>>,
    /// Set while `state` is the one saved on disk, not yet the source's: what status says of it.
    persisted_note: Option<String>,
    /// The veths the saved state's local pods had (same boot only), by ifindex: while the saved
    /// state is in use, a pod matches only the veth it had, with the same name.
    saved_bindings: BTreeMap<u32, persisted::Binding>,
    source_problem: Option<String>,
    state_changed: bool,
    last_view: Option<NodeView>,
    last_matching: Matching,
    /// Veths this process has attached (or adopted) its programs on.
    attached: BTreeMap<u32, String>,
    /// Tunnel devices this process has attached (or adopted) `tunnel_egress` on.
    tunnels: BTreeSet<u32>,
    /// Their names.
    tunnel_names: BTreeMap<u32, String>,
    /// Attachments the agent had to repair lately, with when.
    repairs: Vec<(Instant, String)>,
    /// Since when (unix seconds) each pending veth has been pending.
    pending_since: BTreeMap<u32, u64>,
    claims: Claims,
    last_errors: Vec<String>,
    /// Flows and metrics: what was programmed, and when the source saw it.
    pub(super) observer: Option<Arc<Observer>>,
    /// When the source saw the oldest change not yet programmed.
    unprogrammed_since: Option<Instant>,
    last_ct_gc: Instant,
    last_tcx_check: Instant,
    /// Programs that run before the agent's on the hooks it attached to, as problems.
    tcx_order_problems: Vec<String>,
    /// kube-router NetworkPolicy chains on the node (kept by a watcher task), and the count last
    /// reported.
    pub(super) kube_router_chains: Arc<std::sync::atomic::AtomicUsize>,
    kube_router_reported: usize,
    /// The source's state not saved yet, and when the last save was.
    unsaved: bool,
    last_save: Option<Instant>,
    /// The save under way, on a thread of its own: encoding a 50,000-pod state takes longer than
    /// the loop may stall.
    saving: Option<Saving>,
    /// Whether a stalled save is among the reported problems.
    save_stalled: bool,
    /// The compiler, with what it keeps between compilations.
    compiler: compiler::Compiler,
}

impl Sync {
    pub(super) fn new(
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
            persisted_note: None,
            saved_bindings: BTreeMap::new(),
            source_problem: None,
            state_changed: true,
            last_view: None,
            last_matching: Matching::default(),
            attached: BTreeMap::new(),
            tunnels: BTreeSet::new(),
            tunnel_names: BTreeMap::new(),
            repairs: Vec::new(),
            pending_since: BTreeMap::new(),
            claims: Claims::default(),
            last_errors: Vec::new(),
            observer: None,
            unprogrammed_since: None,
            last_ct_gc: Instant::now(),
            last_tcx_check: Instant::now(),
            tcx_order_problems: Vec::new(),
            kube_router_chains: Arc::default(),
            kube_router_reported: 0,
            unsaved: false,
            last_save: None,
            saving: None,
            save_stalled: false,
            compiler: compiler::Compiler::default(),
        }
    }

    /// Starts from the cluster state saved by the last agent of this node, if any: the node then
    /// enforces it before the source has listed (after a reboot, before the API is reachable).
    pub(super) fn load_persisted(&mut self) {
        let dir = &self.cfg.state_dir;
        match persisted::load(dir, &self.cfg.node_name) {
            Ok(None) => tracing::info!(
                "no saved cluster state: new veths stay pending until the source lists"
            ),
            Ok(Some(saved)) => {
                let saved_unix = saved.saved_unix;
                let (state, bindings, rebooted) =
                    saved.for_boot(persisted::current_boot_id().as_deref());
                self.saved_bindings = bindings.into_iter().map(|b| (b.ifindex, b)).collect();
                let note = format!(
                    "enforcing the cluster state saved at unix {} until the source lists{}",
                    saved_unix,
                    if rebooted {
                        " (saved before a reboot: local pods are matched again only through the source or the CNI plugin)"
                    } else {
                        ""
                    }
                );
                tracing::warn!(
                    saved_unix = saved_unix,
                    rebooted,
                    pods = state.pods.len(),
                    policies = state.policies.len(),
                    "{note}"
                );
                self.state = Some(Arc::new(state));
                self.persisted_note = Some(note);
            }
            Err(e) => {
                tracing::error!(error = %e, "the saved cluster state cannot be used; new veths stay pending until the source lists")
            }
        }
    }

    /// Saves the source's state when it changed, at most every [`SAVE_INTERVAL`] unless `now`.
    /// With `now`, waits for the save to be on disk (for [`SAVE_STALLED`] at most).
    pub(super) fn save_state(&mut self, now: bool) {
        self.settle_save(now);
        self.note_stalled_save();
        if self.saving.is_some() || !self.unsaved || self.persisted_note.is_some() {
            return;
        }
        let Some(state) = self.state.clone() else {
            return;
        };
        if !now && self.last_save.is_some_and(|t| t.elapsed() < SAVE_INTERVAL) {
            return;
        }
        self.last_save = Some(Instant::now());
        // A state that arrives during the save sets it again.
        self.unsaved = false;
        let bindings = self.bindings();
        let (dir, node) = (self.cfg.state_dir.clone(), self.cfg.node_name.clone());
        let save = move || persisted::save(&dir, &node, &state, &bindings);
        match std::thread::Builder::new()
            .name("save-state".into())
            .spawn(save)
        {
            Ok(thread) => {
                self.saving = Some(Saving {
                    thread,
                    since: Instant::now(),
                });
                if now {
                    self.settle_save(true);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "starting the thread that saves the cluster state");
                self.unsaved = true;
            }
        }
    }

    /// Collects the save under way if it has ended. With `wait`, waits for it first until it ends
    /// or has run for [`SAVE_STALLED`] (a hung disk must not hang the agent's stop).
    fn settle_save(&mut self, wait: bool) {
        let Some(saving) = &self.saving else { return };
        while wait && !saving.thread.is_finished() && saving.since.elapsed() < SAVE_STALLED {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(done) = self.saving.take_if(|s| s.thread.is_finished()) {
            self.finish_save(done.thread);
        }
    }

    /// A save running for longer than [`SAVE_STALLED`], as a problem: the saved state (what a
    /// rebooted node enforces before the API answers) is getting older meanwhile.
    fn stalled_save(&self) -> Option<String> {
        let since = self.saving.as_ref()?.since;
        (since.elapsed() >= SAVE_STALLED).then(|| {
            format!(
                "saving the cluster state to {} has not finished in {}s (a hung disk?): the saved state grows old",
                self.cfg.state_dir.display(),
                since.elapsed().as_secs()
            )
        })
    }

    /// Logs a save that stalls (or recovers) once, and has the next pass report it.
    fn note_stalled_save(&mut self) {
        let stalled = self.stalled_save();
        if stalled.is_some() == self.save_stalled {
            return;
        }
        self.save_stalled = stalled.is_some();
        self.state_changed = true;
        match stalled {
            Some(problem) => tracing::error!(problem, "saving the cluster state stalls"),
            None => tracing::info!("the stalled save of the cluster state ended"),
        }
    }

    /// Waits for a save; one that failed is tried again at the next interval.
    fn finish_save(&mut self, save: std::thread::JoinHandle<Result<(), persisted::PersistError>>) {
        let failed = match save.join() {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "the saving thread panicked".to_owned(),
        };
        tracing::warn!(error = %failed, "saving the cluster state");
        self.unsaved = true;
    }

    /// The veth of every matched local pod, as saved with the state.
    fn bindings(&self) -> Vec<persisted::Binding> {
        self.last_matching
            .endpoints
            .iter()
            .filter_map(|(pod, ifindex)| {
                Some(persisted::Binding {
                    pod: pod.clone(),
                    ifindex: *ifindex,
                    ifname: self.attached.get(ifindex)?.clone(),
                })
            })
            .collect()
    }

    /// The pod each veth had before: the saved bindings of veths that still have their name while
    /// the saved state is in use, else the last pass's matching.
    fn previous(&self, view: &NodeView) -> BTreeMap<u32, PodKey> {
        if self.persisted_note.is_some() {
            return view
                .veths
                .iter()
                .filter_map(|v| {
                    let b = self.saved_bindings.get(&v.ifindex)?;
                    (b.ifname == v.name).then(|| (v.ifindex, b.pod.clone()))
                })
                .collect();
        }
        self.last_matching
            .endpoints
            .iter()
            .map(|(pod, ifindex)| (*ifindex, pod.clone()))
            .collect()
    }

    /// A CNI request: remember or forget the claim, and match again at once.
    pub(super) fn take_cni(&mut self, request: CniRequest) {
        if self.claims.take(request, Instant::now()) {
            self.state_changed = true;
        }
        self.reconcile();
    }

    /// The periodic work besides the scan.
    pub(super) fn housekeeping(&mut self) {
        let chains = self
            .kube_router_chains
            .load(std::sync::atomic::Ordering::Relaxed);
        if chains != self.kube_router_reported {
            self.kube_router_reported = chains;
            self.state_changed = true;
        }
        self.heal();
        self.collect_conntrack();
        self.check_tcx_order();
        self.save_state(false);
        let state = self.state.clone();
        let node = self.cfg.node_name.clone();
        let why = |pod: &PodKey| explain_unmatched(state.as_deref(), &node, pod);
        self.claims.expire(Instant::now(), &self.last_matching, why);
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

    /// Puts the agent's programs back wherever they went missing (detached, or another program
    /// swapped into the link): checked every tick, so within a second. Each repair is logged and
    /// listed under problems for [`REPAIR_SHOWN_FOR`].
    fn heal(&mut self) {
        let hooks = self
            .attached
            .iter()
            .flat_map(|(i, n)| Hook::ALL.into_iter().map(move |h| (*i, n.clone(), h)))
            .chain(
                self.tunnel_names
                    .iter()
                    .map(|(i, n)| (*i, n.clone(), Hook::Tunnel)),
            );
        let mut repairs = Vec::new();
        for (ifindex, ifname, hook) in hooks.collect::<Vec<_>>() {
            // A query that fails (the device just went) is the next scan's business.
            if self.datapath.runs_ours(&ifname, hook).unwrap_or(true) {
                continue;
            }
            let at = unix_now();
            let note = match self.datapath.reattach(ifindex, &ifname, hook) {
                Ok(()) => format!(
                    "{ifname} (ifindex {ifindex}): {} was detached or replaced by someone else; re-attached at unix {at}",
                    hook.program()
                ),
                Err(e) => format!(
                    "{ifname} (ifindex {ifindex}): {} was detached or replaced by someone else and cannot be re-attached: {e:#}",
                    hook.program()
                ),
            };
            tracing::warn!(ifindex, ifname, program = hook.program(), "{note}");
            repairs.push((Instant::now(), note));
        }
        let before = self.repairs.len();
        self.repairs.retain(|(t, _)| t.elapsed() < REPAIR_SHOWN_FOR);
        if !repairs.is_empty() || self.repairs.len() != before {
            self.repairs.extend(repairs);
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

    pub(super) fn take_snapshot(&mut self, snapshot: &Snapshot) {
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
            if self.persisted_note.take().is_some() {
                tracing::info!("the source has listed: its state replaces the saved one");
                self.saved_bindings.clear();
            }
            self.state = Some(state.clone());
            self.state_changed = true;
            self.unsaved = true;
            self.unprogrammed_since.get_or_insert(snapshot.seen_at);
        }
    }

    /// The veths to keep programs on whatever they look like: those attached before.
    fn policed(&self) -> BTreeSet<u32> {
        // Pod programs only: an exit device's `tunnel_egress` makes no endpoint of it.
        self.datapath
            .pinned_links()
            .into_iter()
            .filter(|(_, hook)| *hook != Hook::Tunnel)
            .map(|(ifindex, _)| ifindex)
            .chain(self.attached.keys().copied())
            .collect()
    }

    pub(super) fn reconcile(&mut self) {
        let view = match self.discovery.scan() {
            Ok(v) => v,
            Err(e) => {
                self.report_errors(vec![format!("discovery: {e:#}")]);
                return;
            }
        };
        let policed = self.policed();
        let Some(state) = self.state.clone() else {
            self.police_on_sight(&view, &policed);
            return;
        };
        if !self.state_changed && self.last_view.as_ref() == Some(&view) {
            self.refresh_counters();
            return;
        }
        self.state_changed = false;
        let claims = self.claims.list();
        let node = self.cfg.node_name.clone();
        let previous = self.previous(&view);
        let matching = endpoints::match_endpoints(&MatchInput {
            state: Some(&state),
            node_name: &node,
            view: &view,
            claims: &claims,
            policed: &policed,
            previous: &previous,
            only_previous: self.persisted_note.is_some(),
        });
        let effective = endpoints::with_claimed(&state, &matching.claimed);
        let wanted = wanted_veths(&view, &matching);
        let exits = view.exits(|i| wanted.contains_key(&i));
        let exits_guarded = exits.iter().all(|e| self.tunnels.contains(&e.ifindex));
        let compiled = self.compiler.compile(&CompileInput {
            state: &effective,
            node_name: &node,
            endpoints: &matching.endpoints,
            host_addrs: &view.host_addrs,
            links: &view.endpoint_links(),
            pending: &matching.pending,
            pending_rule: self.cfg.pending_rule,
            exits_guarded,
            capacities: self.cfg.capacities,
            default_mode: self.cfg.default_mode,
        });
        let mut errors = self.base_errors();
        errors.extend(effective.errors.iter().map(|e| e.to_string()));
        errors.extend(compiled.errors.iter().map(|e| e.to_string()));
        errors.extend(compiled.shortfalls.iter().map(|s| {
            format!(
                "map {}: {} entries do not fit (--max-* flags): {}",
                s.map, s.dropped, s.effect
            )
        }));
        self.detach_gone(&view, &wanted, &exits, &mut errors);
        self.write(&compiled, &mut errors);
        self.attach_tunnels(&exits, &mut errors);
        if !exits_guarded && exits.iter().all(|e| self.tunnels.contains(&e.ifindex)) {
            // Compiled without counting on the exits; now that they are guarded, again.
            self.state_changed = true;
        }
        self.attach_veths(&wanted, &mut errors);
        self.track_pending(&matching);
        self.publish(&effective, &view, &matching, &compiled);
        self.claims.answer(&matching, &self.attached);
        if let Some(observer) = &self.observer {
            observer.publish(
                &effective,
                &matching.endpoints,
                &compiled.isolating,
                self.cfg.default_mode,
            );
            if let Some(seen_at) = self.unprogrammed_since.take() {
                observer.programmed(seen_at);
            }
        }
        self.report_errors(errors);
        self.last_matching = matching;
        self.last_view = Some(view);
    }

    /// Problems that do not come from this compilation.
    fn base_errors(&self) -> Vec<String> {
        let mut errors: Vec<String> = self.source_problem.iter().cloned().collect();
        errors.extend(self.persisted_note.iter().cloned());
        errors.extend(self.tcx_order_problems.iter().cloned());
        errors.extend(self.repairs.iter().map(|(_, note)| note.clone()));
        errors.extend(self.stalled_save());
        if self.kube_router_reported > 0 {
            errors.push(format!(
                "kube-router's NetworkPolicy rules are on this node ({} chains): traffic passes only where both engines allow it; disable K3s's network policy controller and remove them (README, section K3s)",
                self.kube_router_reported
            ));
        }
        errors
    }

    /// Before any cluster state: every veth that should be policed gets the programs and, if it
    /// has no ENDPOINTS entry yet, a pending one. Entries a previous agent left are not touched.
    fn police_on_sight(&mut self, view: &NodeView, policed: &BTreeSet<u32>) {
        let matching = endpoints::match_endpoints(&MatchInput {
            state: None,
            node_name: &self.cfg.node_name,
            view,
            claims: &[],
            policed,
            previous: &BTreeMap::new(),
            only_previous: false,
        });
        let links = view.endpoint_links();
        let mut errors = self.base_errors();
        for ifindex in matching.pending.keys() {
            let link = links.get(ifindex).copied().unwrap_or_default();
            let info = link.info(compiler::ISOLATED_BOTH | endpoint_flags::PENDING);
            if let Err(e) = self.datapath.add_endpoint_if_absent(*ifindex, info) {
                errors.push(format!("pending entry for ifindex {ifindex}: {e}"));
            }
        }
        let wanted = wanted_veths(view, &matching);
        self.attach_veths(&wanted, &mut errors);
        self.track_pending(&matching);
        self.report_errors(errors);
    }

    /// Detaches only from veths that are gone (a veth that lives keeps its programs: pending when
    /// it matches no pod) and from tunnels that are gone.
    fn detach_gone(
        &mut self,
        view: &NodeView,
        wanted: &BTreeMap<u32, String>,
        exits: &[crate::discovery::Tunnel],
        errors: &mut Vec<String>,
    ) {
        let stale: BTreeSet<u32> = self
            .datapath
            .pinned_links()
            .into_iter()
            .map(|(ifindex, _)| ifindex)
            .chain(self.attached.keys().copied())
            .chain(self.tunnels.iter().copied())
            .filter(|i| !wanted.contains_key(i) && !exits.iter().any(|t| t.ifindex == *i))
            // Never while the veth lives (by construction it is wanted then; this makes sure).
            .filter(|i| !view.veths.iter().any(|v| v.ifindex == *i))
            .collect();
        for ifindex in stale {
            match self.datapath.detach(ifindex) {
                Ok(()) => {
                    let ifname = self.attached.remove(&ifindex).unwrap_or_default();
                    self.tunnels.remove(&ifindex);
                    self.tunnel_names.remove(&ifindex);
                    tracing::info!(ifindex, ifname, "detached");
                }
                Err(e) => errors.push(format!("detach ifindex {ifindex}: {e:#}")),
            }
        }
    }

    fn write(&mut self, compiled: &Compiled, errors: &mut Vec<String>) {
        let before = self.datapath.generation();
        let write_errors = self.datapath.apply(&compiled.contents());
        if !write_errors.is_empty() {
            // Retried on the next tick (deletes of this pass may have made room), not only on the
            // next change.
            self.state_changed = true;
        }
        errors.extend(write_failures(&write_errors));
        if self.datapath.switch_pending() {
            errors.push(format!(
                "policy generation {} is not switched to: the datapath still enforces generation {} (including allows the new policy revokes); retried every second",
                self.datapath.generation().wrapping_add(1),
                self.datapath.generation()
            ));
        }
        if self.datapath.generation() != before {
            tracing::info!(
                generation = self.datapath.generation(),
                endpoints = compiled.endpoints.len(),
                policy_entries = self.datapath.contents().policy.len(),
                "datapath updated"
            );
        }
    }

    /// The exit devices (Flannel's VXLAN or WireGuard device, the uplinks) decide egress through
    /// Services to remote backends, whichever Flannel backend carries it.
    fn attach_tunnels(&mut self, exits: &[crate::discovery::Tunnel], errors: &mut Vec<String>) {
        for t in exits {
            if self.tunnels.contains(&t.ifindex) {
                continue;
            }
            match self.datapath.attach_hook(t.ifindex, &t.name, Hook::Tunnel) {
                Ok(()) => {
                    tracing::info!(ifindex = t.ifindex, ifname = %t.name, "attached to tunnel device");
                    self.tunnels.insert(t.ifindex);
                    self.tunnel_names.insert(t.ifindex, t.name.clone());
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
    }

    fn attach_veths(&mut self, wanted: &BTreeMap<u32, String>, errors: &mut Vec<String>) {
        for (ifindex, ifname) in wanted {
            // The same ifindex under another name is another veth (an index reused).
            if self.attached.get(ifindex) == Some(ifname) {
                continue;
            }
            // `reattach` also replaces a pin whose link died with its device (a veth gone while
            // no agent ran, its index since given to a new one).
            let attached = Hook::ALL
                .into_iter()
                .try_for_each(|hook| self.datapath.reattach(*ifindex, ifname, hook));
            match attached {
                Ok(()) => {
                    tracing::info!(ifindex, ifname, "attached to veth");
                    self.attached.insert(*ifindex, ifname.clone());
                }
                Err(e) => {
                    // Retried on the next tick, not only on the next change.
                    self.state_changed = true;
                    errors.push(format!("{e:#}"));
                }
            }
        }
    }

    /// Logs veths that become or stop being pending, and remembers since when they are.
    fn track_pending(&mut self, matching: &Matching) {
        let now = unix_now();
        self.pending_since.retain(|ifindex, _| {
            let still = matching.pending.contains_key(ifindex);
            if !still {
                tracing::info!(ifindex, "no longer pending");
            }
            still
        });
        for (ifindex, pending) in &matching.pending {
            self.pending_since.entry(*ifindex).or_insert_with(|| {
                tracing::info!(
                    ifindex,
                    reason = pending.reason.name(),
                    "pending: only the node may talk to this veth"
                );
                now
            });
        }
        if let Ok(mut s) = self.status.lock() {
            s.endpoints
                .retain(|e| e.pending.is_none() || matching.pending.contains_key(&e.ifindex));
        }
        if self.state.is_none() {
            self.publish_pending(matching);
        }
    }

    /// Status of the pending veths while there is no cluster state.
    fn publish_pending(&self, matching: &Matching) {
        let eps = self.pending_status(matching, None);
        if let Ok(mut s) = self.status.lock() {
            s.endpoints = eps;
        }
    }

    fn pending_status(&self, matching: &Matching, view: Option<&NodeView>) -> Vec<EndpointStatus> {
        let view = view.or(self.last_view.as_ref());
        matching
            .pending
            .iter()
            .map(|(ifindex, p)| {
                let veth = view.and_then(|v| v.veths.iter().find(|v| v.ifindex == *ifindex));
                EndpointStatus {
                    pod: String::new(),
                    ifname: self
                        .attached
                        .get(ifindex)
                        .cloned()
                        .or_else(|| veth.map(|v| v.name.clone()))
                        .unwrap_or_default(),
                    ifindex: *ifindex,
                    ips: veth
                        .map(|v| v.peer_addrs.iter().map(|a| a.to_string()).collect())
                        .unwrap_or_default(),
                    isolated_ingress: true,
                    isolated_egress: true,
                    attached: self.attached.contains_key(ifindex),
                    pending: Some(p.reason.name().to_owned()),
                    pending_since_unix: self.pending_since.get(ifindex).copied(),
                }
            })
            .collect()
    }

    /// Counters change with traffic, not with state: refreshed on every tick.
    fn refresh_counters(&self) {
        let counters = self.counters_by_name();
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
        matching: &Matching,
        compiled: &Compiled,
    ) {
        let mut eps: Vec<EndpointStatus> = matching
            .endpoints
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
                    pending: None,
                    pending_since_unix: None,
                }
            })
            .collect();
        let mut pending = self.pending_status(matching, Some(view));
        for e in &mut pending {
            let flags = compiled.endpoints.get(&e.ifindex).map_or(0, |i| i.flags);
            e.isolated_ingress = flags & endpoint_flags::ISOLATED_INGRESS != 0;
            e.isolated_egress = flags & endpoint_flags::ISOLATED_EGRESS != 0;
        }
        eps.extend(pending);
        let maps = self.map_status(compiled);
        let counters = self.counters_by_name();
        // Held briefly: the probes' thread reads this status.
        let Ok(mut s) = self.status.lock() else {
            return;
        };
        // Ready once the source's own state is programmed, not a saved one.
        s.ready = self.persisted_note.is_none() && !self.datapath.switch_pending();
        s.last_sync_unix = Some(unix_now());
        s.kube_router_chains = self.kube_router_reported;
        s.generation = self.datapath.generation();
        s.policies = state.policies.len();
        s.cluster_policies = state.cluster_policies.len();
        s.pods = state.pods.len();
        s.namespaces = state.namespaces.len();
        s.endpoints = eps;
        s.maps = maps;
        s.counters = counters;
    }

    /// The datapath's drop and pass counters, by reason name.
    fn counters_by_name(&self) -> Vec<(String, u64)> {
        self.datapath
            .counters()
            .into_iter()
            .map(|(r, n)| (r.name().to_owned(), n))
            .collect()
    }

    /// Each map's use and capacity, with the entries the compile left out of it.
    fn map_status(&self, compiled: &Compiled) -> Vec<MapStatus> {
        self.datapath
            .usage()
            .into_iter()
            .map(|u| MapStatus {
                name: u.name.to_owned(),
                entries: u.entries,
                capacity: u.capacity,
                left_out: compiled
                    .shortfalls
                    .iter()
                    .filter(|s| s.map == u.name)
                    .map(|s| s.dropped)
                    .sum(),
            })
            .collect()
    }
}

/// One problem line per map whose writes failed: how many, and the first reason (a full map fails
/// thousands of writes alike). What failed is only ever an allow or a classification that would
/// have allowed, so the traffic concerned stays denied.
fn write_failures(failures: &[crate::datapath::WriteError]) -> Vec<String> {
    let mut by_map: BTreeMap<&str, (usize, &str)> = BTreeMap::new();
    for f in failures {
        by_map.entry(f.map).or_insert((0, &f.error)).0 += 1;
    }
    by_map
        .into_iter()
        .map(|(map, (n, first))| format!("map {map}: {n} writes failed ({first})"))
        .collect()
}

/// Every veth that gets the programs: matched endpoints and pending ones, by ifindex.
fn wanted_veths(view: &NodeView, matching: &Matching) -> BTreeMap<u32, String> {
    view.veths
        .iter()
        .filter(|v| {
            matching.pending.contains_key(&v.ifindex)
                || matching.endpoints.values().any(|i| *i == v.ifindex)
        })
        .map(|v| (v.ifindex, v.name.clone()))
        .collect()
}

/// Why the claimed pod `pod` has no endpoint, for the CNI plugin's error.
fn explain_unmatched(state: Option<&ClusterState>, node: &str, pod: &PodKey) -> String {
    let Some(state) = state else {
        return format!(
            "pod {pod}: the agent has no cluster state yet (the source has not listed)"
        );
    };
    match state.pods.get(pod) {
        None => format!("pod {pod} is not in the agent's cluster state yet"),
        Some(p) if p.node_name.as_deref() != Some(node) => format!(
            "pod {pod} is on node {:?} in the agent's cluster state, not on {node}",
            p.node_name
        ),
        Some(_) => format!(
            "pod {pod}: no veth of node {node} carries exactly the claimed addresses (or another veth claims them too: {})",
            PendingReason::Ambiguous.name()
        ),
    }
}
