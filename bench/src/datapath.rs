//! Part 1: per-packet cost of the classifier with `BPF_PROG_TEST_RUN`.
//!
//! For each size, a synthetic cluster (N policies, N pods, N pod identities, 110 local pods at most)
//! is compiled by the real compiler and written with `Datapath::apply` into a scratch bpffs; a second
//! copy of the object is loaded on the same pinned maps to run `pod_ingress` of local pod 0 (endpoint 1,
//! the loopback ifindex that test runs see) on crafted IPv4/IPv6 TCP/UDP frames from its allowed peer.
//!
//! - `established`: the allowed frame, `repeat` runs; the first inserts the conntrack entry, every
//!   other run is a conntrack hit. The kernel's average per run.
//! - `denied`: the allowed peer to a port no policy allows, `repeat` runs: every run walks the whole
//!   path (conntrack forward and reply lookups, identity, CIDR and three policy trie lookups).
//! - `new`: `repeat` cannot measure it (every run after the first is established), so it is
//!   `samples` single runs, deleting the flow's conntrack entry after each (the deletion also checks
//!   that the run inserted it, i.e. took the new-flow path); the median. A single run's duration
//!   includes one clock read, so its floor is the floor program measured the same way
//!   (`floor_single_ns`).

use std::net::IpAddr;
use std::os::fd::{AsFd as _, AsRawFd as _, RawFd};
use std::time::Instant;

use anyhow::{Context as _, bail};
use aya::maps::HashMap;
use aya::programs::SchedClassifier;
use aya::{Ebpf, EbpfLoader};
use netpol_agent::compiler::ip_key;
use netpol_agent::datapath::{Datapath, EBPF_OBJECT, PinLayout};
use netpol_common::{CtKey, CtValue, Direction, map_names, program_names};
use netpol_tests::packets::Packet;
use serde::{Deserialize, Serialize};

use crate::bpf::{self, Scratch};
use crate::synth::{Spec, Synthetic};

const TC_ACT_OK: u32 = 0;
/// What the classifiers return for an allowed packet (`TC_ACT_UNSPEC`: on to the next program).
const TCX_NEXT: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;

/// Settings of part 1.
#[derive(Clone, Debug)]
pub struct Settings {
    pub sizes: Vec<usize>,
    pub repeat: u32,
    pub rounds: usize,
    pub samples: usize,
}

/// The floor: the empty classifier.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Floor {
    /// Average per run over `repeat` runs.
    pub floor_ns: f64,
    /// Median of single runs (compare with `new`).
    pub floor_single_ns: f64,
}

/// One measured case.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Case {
    /// `tcp4`, `udp4`, `tcp6`, `udp6`.
    pub packet: String,
    /// `new`, `established`, `denied`.
    pub flow: String,
    pub ns: f64,
    /// `ns` over the floor measured the same way.
    pub x_floor: f64,
    /// The verdict was the expected one on every run.
    pub verdict_ok: bool,
}

/// One size.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Size {
    pub policies: usize,
    pub pods: usize,
    pub local_pods: usize,
    pub pod_identities: usize,
    pub policy_entries: usize,
    pub ipcache_entries: usize,
    pub cidr_entries: usize,
    pub compile_ms: f64,
    pub apply_ms: f64,
    pub cases: Vec<Case>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Part {
    pub floor: Floor,
    pub sizes: Vec<Size>,
    pub method: String,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn repeat_ns(
    fd: RawFd,
    frame: &[u8],
    repeat: u32,
    rounds: usize,
    want: u32,
) -> anyhow::Result<(f64, bool)> {
    let mut ok = true;
    let mut v = Vec::new();
    for _ in 0..rounds {
        let (ret, ns) = bpf::test_run(fd, frame, repeat).context("BPF_PROG_TEST_RUN")?;
        ok &= ret == want;
        v.push(f64::from(ns));
    }
    Ok((median(&mut v), ok))
}

pub fn measure_floor(s: &Settings) -> anyhow::Result<Floor> {
    let floor = bpf::load_floor().context("loading the floor program")?;
    let fd = floor.as_raw_fd();
    let frame = Packet::tcp("10.0.0.1".parse()?, "10.0.0.2".parse()?, 1, 2).build();
    let (floor_ns, ok) = repeat_ns(fd, &frame, s.repeat, s.rounds, TC_ACT_OK)?;
    if !ok {
        bail!("the floor program did not return TC_ACT_OK");
    }
    let mut single = Vec::with_capacity(s.samples);
    for _ in 0..s.samples {
        single.push(f64::from(bpf::test_run(fd, &frame, 1)?.1));
    }
    Ok(Floor {
        floor_ns,
        floor_single_ns: median(&mut single),
    })
}

/// The four probe packets of local pod 0's policy 0: (name, allowed frame, denied frame, ct key).
fn packets(syn: &Synthetic) -> Vec<(&'static str, Vec<u8>, Vec<u8>, CtKey)> {
    let peer = syn.peer_of(0);
    let port = syn.port_of(0);
    let sport = 40_000;
    let mut out = Vec::new();
    for (v6, tcp, name) in [
        (false, true, "tcp4"),
        (false, false, "udp4"),
        (true, true, "tcp6"),
        (true, false, "udp6"),
    ] {
        let (src, dst): (IpAddr, IpAddr) = if v6 {
            (Synthetic::ip6(peer).into(), Synthetic::ip6(0).into())
        } else {
            (Synthetic::ip4(peer).into(), Synthetic::ip4(0).into())
        };
        let mk = |dport| {
            if tcp {
                Packet::tcp(src, dst, sport, dport).build()
            } else {
                Packet::udp(src, dst, sport, dport).build()
            }
        };
        let key = CtKey {
            src: ip_key(src).addr,
            dst: ip_key(dst).addr,
            src_port: sport,
            dst_port: port,
            endpoint: 1,
            protocol: if tcp { 6 } else { 17 },
            direction: Direction::Ingress as u8,
            _pad: [0; 2],
        };
        out.push((name, mk(port), mk(9), key));
    }
    out
}

pub fn measure_size(n: usize, s: &Settings, floor: &Floor) -> anyhow::Result<Size> {
    let spec = Spec {
        pods: n.max(2),
        policies: n,
        local_pods: n.clamp(1, 110),
    };
    let syn = Synthetic::new(spec);
    let t = Instant::now();
    let compiled = syn.compile();
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    if !compiled.errors.is_empty() {
        bail!(
            "synthetic policies did not compile: {:?}",
            compiled.errors[0]
        );
    }
    let scratch = Scratch::new(&format!("dp{n}"))?;
    let layout = PinLayout::new(scratch.dir.join("pins"));
    let mut dp =
        Datapath::open(layout.clone(), &Default::default()).context("opening the datapath")?;
    let t = Instant::now();
    let errors = dp.apply(&compiled.contents());
    let apply_ms = t.elapsed().as_secs_f64() * 1e3;
    if !errors.is_empty() {
        bail!("{} map writes failed, first: {:?}", errors.len(), errors[0]);
    }
    // A second copy of the programs on the same pinned maps, to run them.
    let mut ebpf: Ebpf = EbpfLoader::new()
        .default_map_pin_directory(layout.maps_dir())
        .load(EBPF_OBJECT)
        .context("loading the eBPF object on the pinned maps")?;
    let prog: &mut SchedClassifier = ebpf
        .program_mut(program_names::POD_INGRESS)
        .context("pod_ingress missing")?
        .try_into()?;
    prog.load().context("loading pod_ingress")?;
    let fd = prog.fd()?.as_fd().as_raw_fd();
    let mut ct: HashMap<_, CtKey, CtValue> = HashMap::try_from(
        ebpf.take_map(map_names::CONNTRACK)
            .context("conntrack map missing")?,
    )?;

    let mut cases = Vec::new();
    for (name, allowed, denied, key) in packets(&syn) {
        // New: single runs, each followed by removing the entry it must have inserted.
        let _ = ct.remove(&key);
        let mut v = Vec::with_capacity(s.samples);
        let mut ok = true;
        for _ in 0..s.samples {
            let (ret, ns) = bpf::test_run(fd, &allowed, 1)?;
            ok &= ret == TCX_NEXT;
            ok &= ct.remove(&key).is_ok();
            v.push(f64::from(ns));
        }
        let new_ns = median(&mut v);
        cases.push(Case {
            packet: name.into(),
            flow: "new".into(),
            ns: new_ns,
            x_floor: new_ns / floor.floor_single_ns.max(1.0),
            verdict_ok: ok,
        });
        // Established: the first run inserts, the rest hit.
        let (ns, ok) = repeat_ns(fd, &allowed, s.repeat, s.rounds, TCX_NEXT)?;
        let ok = ok && ct.get(&key, 0).is_ok();
        cases.push(Case {
            packet: name.into(),
            flow: "established".into(),
            ns,
            x_floor: ns / floor.floor_ns.max(1.0),
            verdict_ok: ok,
        });
        let (ns, ok) = repeat_ns(fd, &denied, s.repeat, s.rounds, TC_ACT_SHOT)?;
        cases.push(Case {
            packet: name.into(),
            flow: "denied".into(),
            ns,
            x_floor: ns / floor.floor_ns.max(1.0),
            verdict_ok: ok,
        });
    }
    drop(ct);
    drop(ebpf);
    drop(dp);
    drop(scratch);
    Ok(Size {
        policies: n,
        pods: spec.pods,
        local_pods: spec.local_pods,
        pod_identities: compiled.stats.pod_identities,
        policy_entries: compiled.policy.len(),
        ipcache_entries: compiled.ipcache.len(),
        cidr_entries: compiled.cidrs.len(),
        compile_ms,
        apply_ms,
        cases,
    })
}

pub fn run(s: &Settings) -> anyhow::Result<Part> {
    let floor = measure_floor(s)?;
    let mut sizes = Vec::new();
    for &n in &s.sizes {
        eprintln!("bench: datapath with {n} policies");
        sizes.push(measure_size(n, s, &floor)?);
    }
    Ok(Part {
        floor,
        sizes,
        method: format!(
            "BPF_PROG_TEST_RUN of pod_ingress (endpoint isolated for ingress) on 54/74-byte TCP SYN and \
             UDP frames (IPv4/IPv6) from the allowed peer; established and denied: median over {} runs of \
             the kernel's average over repeat={}; new: median of {} single runs, the flow's conntrack \
             entry deleted after each (x_floor against the floor's single-run median)",
            s.rounds, s.repeat, s.samples
        ),
    })
}
