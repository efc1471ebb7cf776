//! The scale ladder (issue 14) on the realistic [`mix`](crate::mix): the compiler in-process at
//! 5k/1k, 20k/4k and 50k/10k, with the changes a cluster sees (policy edits, relabels, pod churn).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use anyhow::{Context as _, bail};
use netpol_agent::compiler::{self, CompileInput, Compiled, PendingRule};
use netpol_agent::datapath::{Datapath, PinLayout};
use netpol_agent::model::{ClusterState, PodKey};
use netpol_agent::sources::manifests::state_from_objects;
use serde::{Deserialize, Serialize};

use crate::bpf::{self, Scratch};
use crate::control::{Latency, latency};
use crate::mix::{Mix, MixSpec, NODE};

/// A generated cluster as the compiler sees it.
pub struct Loaded {
    pub mix: Mix,
    pub state: ClusterState,
    pub endpoints: BTreeMap<PodKey, u32>,
    /// The agent's compiler, kept across changes as the agent keeps it.
    compiler: compiler::Compiler,
}

impl Loaded {
    pub fn new(spec: MixSpec) -> Self {
        let mix = Mix::new(spec);
        let mut state = ClusterState::default();
        mix.each_object(|value| {
            merge(&mut state, state_from_objects(vec![value]));
        });
        assert!(
            state.errors.is_empty(),
            "the mix does not convert: {:?}",
            state.errors.first()
        );
        let endpoints = (0..mix.tenant_pods())
            .filter(|i| mix.is_local(*i))
            .enumerate()
            .map(|(n, i)| {
                let (ns, name) = mix.pod_name(i);
                (PodKey::new(ns, name), n as u32 + 10)
            })
            .collect();
        Loaded {
            mix,
            state,
            endpoints,
            compiler: compiler::Compiler::default(),
        }
    }

    /// Compiles with the kept compiler (incremental after the first call).
    pub fn compile(&mut self) -> Compiled {
        self.compiler.compile(&CompileInput {
            state: &self.state,
            node_name: NODE,
            endpoints: &self.endpoints,
            host_addrs: &[IpAddr::V4(Ipv4Addr::new(192, 168, 0, 10))],
            links: &BTreeMap::new(),
            pending: &BTreeMap::new(),
            pending_rule: PendingRule::Drop,
            exits_guarded: true,
            capacities: capacities(),
            default_mode: Default::default(),
        })
    }
}

/// Times one full compile of `spec`, printing what it produced.
pub fn probe(spec: MixSpec) {
    let t = Instant::now();
    let mut loaded = Loaded::new(spec);
    let gen_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let c = loaded.compile();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "{spec:?}: generated+converted in {gen_ms:.0} ms; compile {ms:.0} ms: {} errors, {} pod ids, {} cidr ids, {} policy, {} ipcache, {} services, {} endpoints",
        c.errors.len(),
        c.stats.pod_identities,
        c.stats.cidr_identities,
        c.policy.len(),
        c.ipcache.len(),
        c.services.len(),
        c.endpoints.len(),
    );
}

/// Map sizes of the ladder: the agent's defaults, which take its largest cluster.
pub fn capacities() -> netpol_agent::datapath::capacities::Capacities {
    netpol_agent::datapath::capacities::Capacities::default()
}

/// The rungs: the three sizes, or one small one for `--quick`; 110 local pods each.
pub fn rungs(quick: bool) -> Vec<MixSpec> {
    let sizes: &[(usize, usize)] = if quick {
        &[(2_000, 400)]
    } else {
        &[(5_000, 1_000), (20_000, 4_000), (50_000, 10_000)]
    };
    sizes
        .iter()
        .map(|&(pods, policies)| MixSpec {
            pods,
            policies,
            local_pods: 110,
        })
        .collect()
}

/// What one rung measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Rung {
    pub spec: Option<MixSpec>,
    /// Compile + apply of the whole state into empty maps (what an agent does before it is ready,
    /// after reading its source).
    pub ready_ms: f64,
    pub ready_compile_ms: f64,
    pub policy_edits: Latency,
    pub relabels: Latency,
    /// One pod deleted and one created per change.
    pub churn: Latency,
    /// Mean CPU time (user + system) of the process per change.
    pub cpu_ms_per_change: f64,
    pub peak_rss_mib: f64,
    /// Entries per decision map after the full sync, with the map's size.
    pub maps: Vec<(String, usize, u32)>,
    pub shortfalls: usize,
}

/// Runs one rung in this process (the caller runs each in a child, for its own peak RSS).
pub fn run(spec: MixSpec, changes: usize) -> anyhow::Result<Rung> {
    let mut loaded = Loaded::new(spec);
    // The peak from here on: the generator's JSON is not the agent's (freed, and handed back to the
    // system so that the reset peak starts from what is live).
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe { libc::malloc_trim(0) };
    std::fs::write("/proc/self/clear_refs", "5").context("resetting the peak RSS")?;
    let scratch = Scratch::new("ladder")?;
    let caps = capacities();
    let mut dp = Datapath::open(PinLayout::new(scratch.dir.join("pins")), &caps)
        .context("opening the datapath")?;
    let t = Instant::now();
    let compiled = loaded.compile();
    let ready_compile_ms = ms(t);
    let errors = dp.apply(&compiled.contents());
    let ready_ms = ms(t);
    if !errors.is_empty() {
        bail!("{} map writes failed, first: {:?}", errors.len(), errors[0]);
    }
    let maps = map_use(&compiled, &caps);
    let shortfalls = compiled.shortfalls.len();
    drop(compiled);
    let cpu_before = cpu_ms();
    let mut step = |loaded: &mut Loaded| -> anyhow::Result<(f64, f64)> {
        let t = Instant::now();
        let c = loaded.compile();
        let compile = ms(t);
        let errors = dp.apply(&c.contents());
        if !errors.is_empty() {
            bail!("map writes failed: {:?}", errors[0]);
        }
        Ok((compile, ms(t) - compile))
    };
    let mut edits = Vec::new();
    for n in 0..changes {
        loaded.edit_policy(n);
        edits.push(step(&mut loaded)?);
    }
    let mut relabels = Vec::new();
    for n in 0..changes {
        loaded.relabel(n);
        relabels.push(step(&mut loaded)?);
    }
    let mut churn = Vec::new();
    for n in 0..changes {
        loaded.churn(n, changes);
        churn.push(step(&mut loaded)?);
    }
    let cpu_ms_per_change = (cpu_ms() - cpu_before) / (3 * changes).max(1) as f64;
    Ok(Rung {
        spec: Some(spec),
        ready_ms,
        ready_compile_ms,
        policy_edits: latency(&edits),
        relabels: latency(&relabels),
        churn: latency(&churn),
        cpu_ms_per_change,
        peak_rss_mib: bpf::vm_hwm_kib() as f64 / 1024.0,
        maps,
        shortfalls,
    })
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// CPU time of this process so far (user + system).
fn cpu_ms() -> f64 {
    // SAFETY: getrusage writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn map_use(
    c: &Compiled,
    caps: &netpol_agent::datapath::capacities::Capacities,
) -> Vec<(String, usize, u32)> {
    vec![
        ("endpoints".into(), c.endpoints.len(), caps.endpoints),
        ("ipcache".into(), c.ipcache.len(), caps.ipcache),
        ("cidrs".into(), c.cidrs.len(), caps.cidrs),
        ("policy".into(), c.policy.len(), caps.policy),
        ("services".into(), c.services.len(), caps.services),
        ("frontends".into(), c.frontends.len(), caps.frontends),
    ]
}

impl Loaded {
    /// Change `n`: the `tiers` policy of a namespace with local pods moves its ingress port.
    fn edit_policy(&mut self, n: usize) {
        let ns = self.local_namespace(n);
        let value = self.mix.policy(ns, 2, 1 + n as u16);
        self.apply(value);
    }

    /// Change `n`: a pod (every other one local) gets another tier.
    fn relabel(&mut self, n: usize) {
        let index = self.pod_for(n);
        let value = self.mix.pod(index, 1 + n);
        self.apply(value);
    }

    /// Change `n`: a pod is deleted and a replacement (new name, same deployment and address)
    /// created; `after` relabels came before (other pods, so no address is claimed twice).
    fn churn(&mut self, n: usize, after: usize) {
        let index = self.pod_for(n + after);
        let (ns, name) = self.mix.pod_name(index);
        let old = self.state.pods.remove(&PodKey::new(ns, name.clone()));
        let mut value = self.mix.pod(index, 0);
        value["metadata"]["name"] = format!("{name}-r{n}").into();
        self.apply(value);
        if let Some(old) = old
            && let Some(id) = self.endpoints.remove(&old.key)
        {
            let new = PodKey::new(old.key.namespace.clone(), format!("{name}-r{n}"));
            self.endpoints.insert(new, id);
        }
    }

    fn apply(&mut self, value: serde_json::Value) {
        let one = state_from_objects(vec![value]);
        assert!(one.errors.is_empty(), "{:?}", one.errors);
        merge(&mut self.state, one);
    }

    /// The namespace of the `n`-th local pod.
    fn local_namespace(&self, n: usize) -> usize {
        let keys: Vec<&PodKey> = self.endpoints.keys().collect();
        let ns = &keys[n % keys.len()].namespace;
        ns.trim_start_matches("t-").parse().unwrap_or(0)
    }

    /// Every other change a local pod, else a remote one.
    fn pod_for(&self, n: usize) -> usize {
        let stride = (self.mix.tenant_pods() / self.mix.spec.local_pods).max(1);
        let local = (n / 2 % self.mix.spec.local_pods) * stride;
        if n.is_multiple_of(2) {
            local
        } else {
            local + 1
        }
    }
}

/// The ladder as a Markdown table.
pub fn table(rungs: &[Rung]) -> String {
    use std::fmt::Write as _;
    let mut o = String::from(
        "Scale ladder (realistic mix, bench/src/mix.rs; compiler + map writes in one process; \
         110 local pods):\n\n\
         | pods / policies | ready | edit p50 / p99 | relabel p50 / p99 | churn p50 / p99 | CPU per change | peak RSS | POLICY / IPCACHE / SERVICES entries |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rungs {
        let Some(s) = r.spec else { continue };
        let entries = |name: &str| r.maps.iter().find(|m| m.0 == name).map_or(0, |m| m.1);
        let _ = writeln!(
            o,
            "| {} / {} | {:.0} ms | {:.0} / {:.0} ms | {:.0} / {:.0} ms | {:.0} / {:.0} ms | {:.0} ms | {:.0} MiB | {} / {} / {} |",
            s.pods,
            s.policies,
            r.ready_ms,
            r.policy_edits.p50_ms,
            r.policy_edits.p99_ms,
            r.relabels.p50_ms,
            r.relabels.p99_ms,
            r.churn.p50_ms,
            r.churn.p99_ms,
            r.cpu_ms_per_change,
            r.peak_rss_mib,
            entries("policy"),
            entries("ipcache"),
            entries("services"),
        );
    }
    o.push('\n');
    o
}

/// Adds the objects of `one` to `state`.
fn merge(state: &mut ClusterState, one: ClusterState) {
    state.namespaces.extend(one.namespaces);
    state.pods.extend(one.pods);
    state.policies.extend(one.policies);
    state.services.extend(one.services);
    state.endpoint_slices.extend(one.endpoint_slices);
    state.errors.extend(one.errors);
}
