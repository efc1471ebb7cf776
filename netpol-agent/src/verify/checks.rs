//! The verdicts of `verify`: pure functions from gathered evidence to [`Check`]s.

use std::collections::{BTreeMap, BTreeSet};

use netpol_common::{endpoint_flags, map_labels, map_names};

use super::{
    Check,
    gather::{
        AgentEvidence, Chain, DatapathEvidence, HookEvidence, KernelEvidence, LocalPods,
        RulesetDump, parse_iptables_save, parse_nft_ruleset, parse_release,
    },
    selftest::SelfTestEvidence,
};
use crate::{datapath::Hook, observe::control::Status};

/// The first kernel with TCX links.
pub const TCX_MIN: (u32, u32, u32) = (6, 6, 0);

// ------------------------------------------------------------------------------------------ kernel

/// `kernel.bpf`, `kernel.jit`, `kernel.btf`, `kernel.tcx`, `kernel.bpffs`.
pub fn kernel(k: &KernelEvidence) -> Vec<Check> {
    let bpf = match &k.bpf_syscall {
        Ok(n) => Check::pass(
            "kernel.bpf",
            format!("bpf() syscall usable: BPF_PROG_GET_NEXT_ID listed {n} loaded programs"),
        ),
        Err(e) => Check::fail(
            "kernel.bpf",
            format!(
                "bpf() syscall refused: {e} (run as root, or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)"
            ),
        ),
    };
    let jit = match k.jit_enable.as_deref() {
        Ok("1") => Check::pass("kernel.jit", "BPF JIT on (net.core.bpf_jit_enable = 1)"),
        Ok("2") => Check::pass(
            "kernel.jit",
            "BPF JIT on, with debug output (net.core.bpf_jit_enable = 2)",
        ),
        Ok(v) => Check::warn(
            "kernel.jit",
            format!(
                "BPF JIT off (net.core.bpf_jit_enable = {v}): the programs run interpreted, slower per packet; `sysctl -w net.core.bpf_jit_enable=1`"
            ),
        ),
        Err(e) => match &k.jitted_program {
            Some((id, name)) => Check::pass(
                "kernel.jit",
                format!(
                    "BPF JIT on: loaded program {id} ({name}) is JIT-compiled (net.core.bpf_jit_enable is only visible from the initial network namespace)"
                ),
            ),
            None => Check::warn(
                "kernel.jit",
                format!("cannot read net.core.bpf_jit_enable: {e}"),
            ),
        },
    };
    let btf = match &k.btf_vmlinux {
        Ok(size) => Check::pass(
            "kernel.btf",
            format!("kernel BTF present (/sys/kernel/btf/vmlinux, {size} bytes)"),
        ),
        Err(e) => Check::warn(
            "kernel.btf",
            format!(
                "no kernel BTF (/sys/kernel/btf/vmlinux: {e}): enforcement works without it, but BTF-based inspection tools do not"
            ),
        ),
    };
    let tcx = match parse_release(&k.release) {
        Some(v) if v >= TCX_MIN => Check::pass(
            "kernel.tcx",
            format!(
                "Linux {}: TCX links available (needs {}.{})",
                k.release, TCX_MIN.0, TCX_MIN.1
            ),
        ),
        Some(_) => Check::fail(
            "kernel.tcx",
            format!(
                "Linux {} has no TCX (needs {}.{}): netpol-agent cannot attach its programs",
                k.release, TCX_MIN.0, TCX_MIN.1
            ),
        ),
        None => Check::warn(
            "kernel.tcx",
            format!("cannot parse the kernel release {:?}", k.release),
        ),
    };
    let bpffs = match &k.pin_dir_bpffs {
        Ok(true) => Check::pass("kernel.bpffs", format!("{} is on a bpffs", k.pin_dir)),
        Ok(false) => Check::fail(
            "kernel.bpffs",
            format!(
                "{} is not on a bpffs: no pins can be there (wrong --pin-dir, or /sys/fs/bpf is not mounted where verify runs)",
                k.pin_dir
            ),
        ),
        Err(e) => Check::fail(
            "kernel.bpffs",
            format!(
                "pin directory {}: {e} (no agent has run with this --pin-dir here)",
                k.pin_dir
            ),
        ),
    };
    vec![bpf, jit, btf, tcx, bpffs]
}

// ------------------------------------------------------------------------------------------- agent

/// `agent.ready`: the agent answers on its control socket and has programmed the datapath.
pub fn agent(a: &AgentEvidence) -> Check {
    let s = match &a.status {
        Ok(s) => s,
        Err(e) => {
            return Check::fail(
                "agent.ready",
                format!("no agent answers on {}: {e}", a.socket),
            )
            .with_details(vec![
                "without a running agent nothing follows pod and policy changes: new pods get no programs, the last programmed policy stays on existing veths".to_owned(),
            ]);
        }
    };
    let pid = a.pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
    if !s.ready {
        return Check::fail(
            "agent.ready",
            format!(
                "agent{pid} on node {} answers but is not ready: its first sync has not programmed the datapath",
                s.node
            ),
        );
    }
    let summary = format!(
        "agent{pid} on node {} ready: generation {}, {} endpoints, {} policies, source {}",
        s.node,
        s.generation,
        s.endpoints.len(),
        s.policies,
        s.source
    );
    if s.errors.is_empty() {
        Check::pass("agent.ready", summary)
    } else {
        Check::warn(
            "agent.ready",
            format!("{summary}; {} problems reported", s.errors.len()),
        )
        .with_details(s.errors.clone())
    }
}

// ------------------------------------------------------------------------------------- attachments

/// The program the agent means to run at `hook`, and how that is known: the one the agent process
/// holds, else the one most pinned links run.
fn current_program(
    hook: Hook,
    a: &AgentEvidence,
    d: &DatapathEvidence,
) -> Option<(u32, &'static str)> {
    let held: Vec<u32> = a
        .held_programs
        .iter()
        .copied()
        .filter(|id| d.programs.get(id).is_some_and(|p| p.name == hook.program()))
        .collect();
    if let [id] = held.as_slice() {
        return Some((*id, "held by the agent process"));
    }
    let mut votes: BTreeMap<u32, usize> = BTreeMap::new();
    for e in &d.endpoints {
        for h in e.hooks.iter().filter(|h| h.hook == hook) {
            if let Ok(l) = &h.link {
                *votes.entry(l.prog_id).or_default() += 1;
            }
        }
    }
    votes
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(id, _)| (id, "run by most pinned links (the agent's own are unknown)"))
}

/// `agent.attachments`: every endpoint's veth has both programs attached through the agent's pinned
/// links, and they are the agent's current programs, using the maps pinned under `--pin-dir`.
pub fn attachments(a: &AgentEvidence, d: &DatapathEvidence) -> Check {
    const NAME: &str = "agent.attachments";
    if d.endpoints.is_empty() {
        return if a.status.is_ok() {
            Check::pass(
                NAME,
                "no local endpoints: no pod of this node has a veth here",
            )
        } else {
            Check::fail(
                NAME,
                "no agent status and no pinned links: netpol-agent enforces nothing on this node",
            )
        };
    }
    let endpoint_map_id = d
        .pinned_maps
        .get(map_names::ENDPOINTS[0])
        .and_then(|r| r.as_ref().ok())
        .copied();
    let current: BTreeMap<Hook, (u32, &str)> = Hook::ALL
        .into_iter()
        .filter_map(|h| Some((h, current_program(h, a, d)?)))
        .collect();
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let mut bad_endpoints = BTreeSet::new();
    for e in &d.endpoints {
        let who = if e.pod.is_empty() {
            format!("{} (ifindex {})", e.ifname, e.ifindex)
        } else {
            format!("{} on {} (ifindex {})", e.pod, e.ifname, e.ifindex)
        };
        let mut fail = |msg: String| {
            problems.push(format!("{who}: {msg}"));
            bad_endpoints.insert(e.ifindex);
        };
        if e.agent_says_attached == Some(false) {
            fail("the agent reports it not attached".to_owned());
        }
        for h in &e.hooks {
            let (fails, warns) = hook_findings(h, &current, endpoint_map_id, d);
            fails.into_iter().for_each(&mut fail);
            warnings.extend(warns.into_iter().map(|w| format!("{who}: {w}")));
        }
    }
    let progs = Hook::ALL
        .into_iter()
        .filter_map(|h| {
            current
                .get(&h)
                .map(|(id, _)| format!("{} {id}", h.program()))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let how = current
        .values()
        .next()
        .map(|(_, how)| *how)
        .unwrap_or("unknown");
    let n = d.endpoints.len();
    if !problems.is_empty() {
        let mut details = problems;
        details.extend(warnings);
        let unattached: Vec<String> = d
            .endpoints
            .iter()
            .filter(|e| bad_endpoints.contains(&e.ifindex))
            .map(|e| {
                if e.pod.is_empty() {
                    e.ifname.clone()
                } else {
                    format!("{} ({})", e.ifname, e.pod)
                }
            })
            .collect();
        return Check::fail(
            NAME,
            format!(
                "{} of {n} endpoints (from {}) not enforced as the agent intends; veths without a correct attachment: {}",
                bad_endpoints.len(),
                d.endpoints_from,
                unattached.join(", ")
            ),
        )
        .with_details(details);
    }
    let summary = format!(
        "{n} endpoints (from {}): both hooks attached on every veth via pinned TCX links, running {progs} ({how}), using the maps under --pin-dir",
        d.endpoints_from
    );
    if warnings.is_empty() {
        Check::pass(NAME, summary)
    } else {
        Check::warn(NAME, summary).with_details(warnings)
    }
}

/// What is wrong (failures) or worth a look (warnings) with the agent's program at hook `h` of one
/// veth: the pinned link, its program, the maps it uses, and what else TCX runs there.
fn hook_findings(
    h: &HookEvidence,
    current: &BTreeMap<Hook, (u32, &str)>,
    endpoint_map_id: Option<u32>,
    d: &DatapathEvidence,
) -> (Vec<String>, Vec<String>) {
    let (mut fails, mut warns) = (Vec::new(), Vec::new());
    let program = h.hook.program();
    let link = match &h.link {
        Ok(l) => l,
        Err(err) => {
            fails.push(format!("{program}: {err}: not attached"));
            return (fails, warns);
        }
    };
    let attached = match &h.tcx {
        Ok(ids) => ids,
        Err(err) => {
            fails.push(format!("{program}: TCX query failed: {err}"));
            return (fails, warns);
        }
    };
    if !link.tcx {
        fails.push(format!(
            "{program}: pinned link {} is not a TCX link",
            link.path
        ));
    }
    if !attached.contains(&link.prog_id) {
        fails.push(format!(
            "{program}: the pinned link's program {} is not attached (attached: {attached:?})",
            link.prog_id
        ));
    }
    match d.programs.get(&link.prog_id) {
        Some(p) if p.name != program => fails.push(format!(
            "{program}: the pinned link runs program {} named {:?}",
            p.id, p.name
        )),
        Some(p) => {
            if let Some(map_id) = endpoint_map_id
                && !p.map_ids.contains(&map_id)
            {
                fails.push(format!(
                    "{program}: program {} does not use the {} pinned under --pin-dir (map id {map_id}): a stale program",
                    p.id,
                    map_labels::ENDPOINTS
                ));
            }
        }
        None => fails.push(format!(
            "{program}: program {} of the pinned link is not loaded",
            link.prog_id
        )),
    }
    if let Some((cur, how)) = current.get(&h.hook)
        && *cur != link.prog_id
    {
        fails.push(format!(
            "{program}: runs program {}, not the agent's current {program} {cur} ({how})",
            link.prog_id
        ));
    }
    let name_of = |id: &u32| match d.programs.get(id) {
        Some(p) => format!("{id} ({})", p.name),
        None => id.to_string(),
    };
    // TCX runs programs in order: one before ours can pass packets past the policy.
    let ours = attached.iter().position(|id| *id == link.prog_id);
    let before: Vec<String> = attached[..ours.unwrap_or(0)].iter().map(name_of).collect();
    if !before.is_empty() {
        fails.push(format!(
            "{program}: programs run before the agent's on this hook: {} (a packet they pass with TC_ACT_OK never reaches the policy)",
            before.join(", ")
        ));
    }
    let others: Vec<String> = attached[ours.map_or(0, |i| i + 1)..]
        .iter()
        .filter(|id| **id != link.prog_id)
        .map(name_of)
        .collect();
    if !others.is_empty() {
        warns.push(format!(
            "{program}: other programs after the agent's on the same hook: {} (they also decide on the packets it allows)",
            others.join(", ")
        ));
    }
    (fails, warns)
}

// ---------------------------------------------------------------------------------------- coverage

fn flags_text(flags: u32) -> String {
    let mut parts = Vec::new();
    if flags & endpoint_flags::ISOLATED_INGRESS != 0 {
        parts.push("ingress-isolated");
    }
    if flags & endpoint_flags::ISOLATED_EGRESS != 0 {
        parts.push("egress-isolated");
    }
    if flags & endpoint_flags::PENDING != 0 {
        parts.push("pending");
    }
    if parts.is_empty() {
        "not isolated".to_owned()
    } else {
        parts.join("+")
    }
}

/// How long a veth may stay pending before `verify` reports it: a new pod is pending until the
/// API reports its address (or the CNI plugin claims it), normally well under this.
pub const PENDING_GRACE_SECONDS: u64 = 5;

/// The veths pending for longer than [`PENDING_GRACE_SECONDS`]: their pod's traffic is dropped.
fn long_pending(s: &Status, now: u64) -> Vec<String> {
    s.endpoints
        .iter()
        .filter_map(|e| {
            let reason = e.pending.as_deref()?;
            let since = e.pending_since_unix?;
            let age = now.saturating_sub(since);
            (age > PENDING_GRACE_SECONDS).then(|| format!(
                "{} (ifindex {}, peer {}): pending ({reason}) for {age}s: only the node can reach it; is its pod in the cluster state with this address?",
                e.ifname,
                e.ifindex,
                e.ips.join(", ")
            ))
        })
        .collect()
}

/// `coverage.endpoints`: every local pod of the cluster state has an endpoint, and the datapath holds
/// that endpoint with the agent's isolation flags at the agent's generation. Pod veths the agent does
/// not know are listed.
pub fn coverage(
    status: Option<&Status>,
    pods: &LocalPods,
    d: &DatapathEvidence,
    now_unix: u64,
) -> Check {
    const NAME: &str = "coverage.endpoints";
    let Some(s) = status else {
        return Check::warn(NAME, "not checked: needs the agent's status");
    };
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let source_note = match pods {
        LocalPods::Listed { source, pods } => {
            for (pod, ips) in pods {
                if !s.endpoints.iter().any(|e| &e.pod == pod) {
                    let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
                    problems.push(format!(
                        "{pod} ({}): local pod without an endpoint: no veth here carries its address, so no policy applies to it",
                        ips.join(", ")
                    ));
                }
            }
            format!("{} local pods in {source}", pods.len())
        }
        LocalPods::Unavailable(why) => format!("the agent's own list of local pods ({why})"),
    };
    match &d.endpoint_map {
        Ok(map) => {
            for e in &s.endpoints {
                let mut want = 0;
                if e.isolated_ingress {
                    want |= endpoint_flags::ISOLATED_INGRESS;
                }
                if e.isolated_egress {
                    want |= endpoint_flags::ISOLATED_EGRESS;
                }
                if e.pending.is_some() {
                    want |= endpoint_flags::PENDING;
                }
                match map.get(&e.ifindex) {
                    None => problems.push(format!(
                        "{} on {}: no entry for ifindex {} in {} (its packets are dropped as unknown-endpoint)",
                        e.pod,
                        e.ifname,
                        e.ifindex,
                        map_labels::ENDPOINTS
                    )),
                    Some(f) if f & want != want || f & !want & 0b111 != 0 => problems.push(format!(
                        "{} on {}: datapath has {}, the agent computed {}",
                        e.pod,
                        e.ifname,
                        flags_text(*f),
                        flags_text(want)
                    )),
                    Some(_) => {}
                }
            }
        }
        Err(e) => problems.push(format!("cannot read {}: {e}", map_labels::ENDPOINTS)),
    }
    match &d.generation {
        Ok(g) if *g != s.generation => warnings.push(format!(
            "datapath policy generation {g}, the agent reported {} (a sync in flight? run again)",
            s.generation
        )),
        Ok(_) => {}
        Err(e) => problems.push(format!("cannot read {}: {e}", map_names::CONFIG)),
    }
    for v in &d.other_veths {
        if v.bridge.is_some() && v.attached.is_empty() {
            let ips: Vec<String> = v.peer_addrs.iter().map(ToString::to_string).collect();
            problems.push(format!(
                "{} (port of {}, peer {}): pod veth without the agent's programs: not policed (the agent attaches to every bridge port whose peer is in another namespace as soon as it appears)",
                v.ifname,
                v.bridge.as_deref().unwrap_or_default(),
                ips.join(", ")
            ));
        }
    }
    warnings.extend(long_pending(s, now_unix));
    if let Some(e) = &d.discovery_error {
        warnings.push(format!("could not list the veths: {e}"));
    }
    let generation = d
        .generation
        .as_ref()
        .map(|g| g.to_string())
        .unwrap_or_default();
    if !problems.is_empty() {
        let mut details = problems;
        details.extend(warnings);
        return Check::fail(
            NAME,
            format!(
                "{} problems with {source_note} and the datapath's endpoints",
                details.len()
            ),
        )
        .with_details(details);
    }
    let summary = format!(
        "{source_note}: each has an endpoint in {} with the agent's isolation flags, at generation {generation}",
        map_labels::ENDPOINTS
    );
    if warnings.is_empty() {
        Check::pass(NAME, summary)
    } else {
        Check::warn(NAME, summary).with_details(warnings)
    }
}

// ----------------------------------------------------------------------------------- other engines

/// Another NetworkPolicy engine, recognised by its chain names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Engine {
    KubeRouter,
    Calico,
    Cilium,
}

impl Engine {
    /// The engine a chain name belongs to.
    pub fn of_chain(name: &str) -> Option<Engine> {
        if crate::verify::kube_router::CHAIN_PREFIXES
            .iter()
            .any(|p| name.starts_with(p))
        {
            Some(Engine::KubeRouter)
        } else if name.starts_with("cali-") {
            Some(Engine::Calico)
        } else if name.starts_with("CILIUM_") {
            Some(Engine::Cilium)
        } else {
            None
        }
    }

    fn name(self) -> &'static str {
        match self {
            Engine::KubeRouter => "kube-router (K3s's embedded network policy controller)",
            Engine::Calico => "Calico",
            Engine::Cilium => "Cilium",
        }
    }

    fn advice(self) -> Vec<String> {
        match self {
            Engine::KubeRouter => vec![
                "K3s runs kube-router's network policy controller unless every server is started with --disable-network-policy (or `disable-network-policy: true` in /etc/rancher/k3s/config.yaml, then restart k3s)".to_owned(),
                "disabling it does not remove its rules: they keep enforcing the policies of the moment it stopped; remove them on every node: `iptables-save | grep -v KUBE-ROUTER | iptables-restore` and `ip6tables-save | grep -v KUBE-ROUTER | ip6tables-restore` (then check for KUBE-NWPLCY-/KUBE-POD-FW- leftovers), or reboot the node".to_owned(),
            ],
            Engine::Calico => vec![
                "Calico's chains on a Flannel node are either a second policy engine (Canal) or leftovers of an old install: remove Calico, then flush the cali-* chains (or reboot)".to_owned(),
            ],
            Engine::Cilium => vec![
                "Cilium's chains on a Flannel node are either a second CNI/policy engine or leftovers of an old install: uninstall Cilium (`cilium-dbg cleanup` removes its state), or reboot".to_owned(),
            ],
        }
    }
}

/// `engines.other`: no other NetworkPolicy engine (kube-router, Calico, Cilium) has chains in
/// iptables or nftables. Two engines enforce the intersection of what each allows.
pub fn other_engines(dumps: &[RulesetDump]) -> Check {
    const NAME: &str = "engines.other";
    // (engine, table, chain) -> (rules, tools that show it)
    let mut found: BTreeMap<(Engine, String, String), (usize, Vec<String>)> = BTreeMap::new();
    let mut read = Vec::new();
    let mut unread = Vec::new();
    let mut total = 0;
    for d in dumps {
        let out = match &d.output {
            Ok(out) => out,
            Err(e) => {
                unread.push(format!("{}: {e}", d.tool));
                continue;
            }
        };
        read.push(d.tool.clone());
        let chains: Vec<Chain> = if d.tool.starts_with("nft") {
            parse_nft_ruleset(out)
        } else {
            parse_iptables_save(out)
        };
        total += chains.len();
        for c in chains {
            if let Some(engine) = Engine::of_chain(&c.name) {
                // iptables-nft and nft show the same chain: key by name only, not by table spelling.
                let table = c.table.rsplit(' ').next().unwrap_or_default().to_owned();
                let entry = found.entry((engine, table, c.name)).or_default();
                entry.0 = entry.0.max(c.rules);
                entry.1.push(d.tool.clone());
            }
        }
    }
    if read.is_empty() {
        return Check::warn(
            NAME,
            "could not inspect iptables or nftables for other policy engines",
        )
        .with_details(unread);
    }
    if found.is_empty() {
        return Check::pass(
            NAME,
            format!(
                "no kube-router (KUBE-ROUTER-*, KUBE-NWPLCY-*, KUBE-POD-FW-*), Calico (cali-*) or Cilium (CILIUM_*) chains in {} ({total} chains): netpol-agent is the only engine",
                read.join(", ")
            ),
        );
    }
    let engines: BTreeSet<Engine> = found.keys().map(|(e, _, _)| *e).collect();
    let mut details = vec![
        "two engines enforce at once: a connection passes only when both allow it (the intersection), so their differences and their stale rules drop traffic netpol-agent allows".to_owned(),
    ];
    for ((engine, table, chain), (rules, tools)) in &found {
        let mut tools = tools.clone();
        tools.dedup();
        details.push(format!(
            "{chain} in table {table} ({rules} rules; seen by {}): {}",
            tools.join(", "),
            match engine {
                Engine::KubeRouter => "kube-router",
                Engine::Calico => "Calico",
                Engine::Cilium => "Cilium",
            }
        ));
    }
    for e in &engines {
        details.extend(e.advice());
    }
    let names: Vec<&str> = engines.iter().map(|e| e.name()).collect();
    Check::fail(
        NAME,
        format!(
            "another NetworkPolicy engine is present: {} ({} chains)",
            names.join(", "),
            found.len()
        ),
    )
    .with_details(details)
}

// --------------------------------------------------------------------------------------- self-test

/// `selftest`: the embedded programs, loaded in scratch namespaces, drop what a deny-all forbids and
/// pass what an allow rule allows; and the scratch state is gone afterwards.
pub fn self_test(e: &SelfTestEvidence) -> Check {
    const NAME: &str = "selftest";
    let data = serde_json::to_value(e).ok();
    let mut problems = Vec::new();
    if let Some(err) = &e.error {
        problems.push(format!("self-test stopped: {err}"));
    }
    for p in &e.probes {
        if p.passed != p.expect_pass {
            problems.push(format!(
                "{} {}: expected {}, got {} ({})",
                p.phase,
                p.target,
                if p.expect_pass {
                    "connected"
                } else {
                    "dropped"
                },
                if p.passed {
                    "connected"
                } else {
                    "no connection"
                },
                p.detail
            ));
        }
    }
    let drops = e.dropped_delta.unwrap_or(0);
    if e.error.is_none() && drops == 0 {
        problems.push("the ingress-denied counter did not move".to_owned());
    }
    if e.probes.is_empty() && e.error.is_none() {
        problems.push("no probes were sent".to_owned());
    }
    problems.extend(e.cleanup_errors.iter().map(|c| format!("cleanup: {c}")));
    let details: Vec<String> = e
        .probes
        .iter()
        .map(|p| {
            format!(
                "{} {}: {} ({})",
                p.phase,
                p.target,
                if p.passed { "connected" } else { "dropped" },
                p.detail
            )
        })
        .chain(e.steps.iter().map(|s| format!("step: {s}")))
        .collect();
    let check = if problems.is_empty() {
        let allowed = e
            .probes
            .iter()
            .filter(|p| p.phase == "policy" && p.passed)
            .count();
        let denied = e
            .probes
            .iter()
            .filter(|p| p.phase == "policy" && !p.passed)
            .count();
        Check::pass(
            NAME,
            format!(
                "scratch namespaces, deny-all ingress + allow tcp/{}: {allowed} allowed connections passed, {denied} denied ones dropped ({drops} packets counted ingress-denied), IPv4 and IPv6; everything removed afterwards",
                e.allowed_port
            ),
        )
        .with_details(details)
    } else {
        let mut all = problems.clone();
        all.extend(details);
        Check::fail(
            NAME,
            format!(
                "self-test failed: {}",
                problems.first().cloned().unwrap_or_default()
            ),
        )
        .with_details(all)
    };
    match data {
        Some(d) => check.with_data(d),
        None => check,
    }
}

#[cfg(test)]
mod tests;
