//! The scale ladder (issue 14) on the realistic [`mix`](crate::mix): the compiler in-process at
//! 5k/1k, 20k/4k and 50k/10k, with the changes a cluster sees (policy edits, relabels, pod churn).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use netpol_agent::compiler::{self, CompileInput, Compiled, PendingRule};
use netpol_agent::model::{ClusterState, PodKey};
use netpol_agent::sources::manifests::state_from_objects;

use crate::mix::{Mix, MixSpec, NODE};

/// A generated cluster as the compiler sees it.
pub struct Loaded {
    pub mix: Mix,
    pub state: ClusterState,
    pub endpoints: BTreeMap<PodKey, u32>,
}

impl Loaded {
    pub fn new(spec: MixSpec) -> Self {
        let mix = Mix::new(spec);
        let state = state_from_objects(mix.objects());
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
        }
    }

    pub fn compile(&self) -> Compiled {
        compiler::compile(&CompileInput {
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
    let loaded = Loaded::new(spec);
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

/// Map sizes for the ladder's largest cluster (IPCACHE: 50,000 dual-stack pods, as the README says).
pub fn capacities() -> netpol_agent::datapath::capacities::Capacities {
    netpol_agent::datapath::capacities::Capacities {
        ipcache: 131_072,
        ..Default::default()
    }
}
