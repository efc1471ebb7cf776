//! Part 4: the control plane. Runs in its own process (`netpol-bench control-plane`) so that its
//! peak RSS (`VmHWM`) is that of a process holding what the agent holds: the cluster state, the
//! compiled contents, the loaded object and the datapath's mirror of the maps.
//!
//! Full sync: compile + `Datapath::apply` into an empty scratch bpffs. Then single changes, each
//! timed from the state change to `apply` returning (what the agent does on a change, minus reading
//! the manifest file): policy changes (one policy's port) and pod label changes (a peer pod gets a
//! new `app` label, so a new identity).

use std::time::Instant;

use anyhow::{Context as _, bail};
use netpol_agent::datapath::{Datapath, PinLayout};
use serde::{Deserialize, Serialize};

use crate::bpf::{self, Scratch};
use crate::synth::{Spec, Synthetic};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Median share of the latency spent compiling (the rest is the map writes).
    pub compile_share: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Part {
    pub spec: Option<Spec>,
    pub full_sync_ms: f64,
    pub full_sync_compile_ms: f64,
    pub full_sync_apply_ms: f64,
    pub policy_entries: usize,
    pub ipcache_entries: usize,
    pub policy_changes: Latency,
    pub label_changes: Latency,
    /// Both kinds of change together.
    pub all_changes: Latency,
    pub peak_rss_mib: f64,
    pub method: String,
}

/// The `p`th percentile of `sorted` (nearest rank); 0 when empty.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

pub fn latency(samples: &[(f64, f64)]) -> Latency {
    let mut total: Vec<f64> = samples.iter().map(|(c, a)| c + a).collect();
    total.sort_by(f64::total_cmp);
    let mut share: Vec<f64> = samples.iter().map(|(c, a)| c / (c + a).max(1e-9)).collect();
    share.sort_by(f64::total_cmp);
    Latency {
        count: samples.len(),
        p50_ms: pct(&total, 50.0),
        p99_ms: pct(&total, 99.0),
        max_ms: total.last().copied().unwrap_or(0.0),
        compile_share: pct(&share, 50.0),
    }
}

pub fn run(spec: Spec, changes: usize) -> anyhow::Result<Part> {
    let mut syn = Synthetic::new(spec);
    let scratch = Scratch::new("cp")?;
    let mut dp = Datapath::open(
        PinLayout::new(scratch.dir.join("pins")),
        &Default::default(),
    )
    .context("opening the datapath")?;

    let t = Instant::now();
    let compiled = syn.compile();
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let errors = dp.apply(&compiled.contents());
    let apply_ms = t.elapsed().as_secs_f64() * 1e3;
    if !errors.is_empty() {
        bail!("{} map writes failed, first: {:?}", errors.len(), errors[0]);
    }
    let (policy_entries, ipcache_entries) = (compiled.policy.len(), compiled.ipcache.len());
    drop(compiled);

    let step = |syn: &Synthetic, dp: &mut Datapath| -> anyhow::Result<(f64, f64)> {
        let t = Instant::now();
        let c = syn.compile();
        let contents = c.contents();
        let compile = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let errors = dp.apply(&contents);
        let apply = t.elapsed().as_secs_f64() * 1e3;
        if !errors.is_empty() {
            bail!("map writes failed: {:?}", errors[0]);
        }
        Ok((compile, apply))
    };
    let mut policy = Vec::new();
    for n in 0..changes {
        let k = (n * 7) % spec.policies;
        syn.change_policy(k, 40_000 + n as u16);
        policy.push(step(&syn, &mut dp)?);
    }
    let mut labels = Vec::new();
    for n in 0..changes {
        let i = syn.peer_of((n * 11) % spec.policies);
        syn.change_pod_labels(i, n);
        labels.push(step(&syn, &mut dp)?);
    }
    let all: Vec<_> = policy.iter().chain(&labels).copied().collect();
    let peak_rss_mib = bpf::vm_hwm_kib() as f64 / 1024.0;
    drop(dp);
    drop(scratch);
    Ok(Part {
        spec: Some(spec),
        full_sync_ms: compile_ms + apply_ms,
        full_sync_compile_ms: compile_ms,
        full_sync_apply_ms: apply_ms,
        policy_entries,
        ipcache_entries,
        policy_changes: latency(&policy),
        label_changes: latency(&labels),
        all_changes: latency(&all),
        peak_rss_mib,
        method: format!(
            "in a child process: synthetic state -> real compiler -> Datapath::apply into a fresh bpffs \
             (full sync), then {changes} single-policy changes and {changes} pod label changes, each \
             timed from the state change to apply returning (manifest parsing and file-watch delay \
             excluded); peak RSS = VmHWM of that process"
        ),
    })
}
