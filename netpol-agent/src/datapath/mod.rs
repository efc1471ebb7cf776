//! The datapath: the embedded eBPF object, its pinned maps, and the TC attachments on pod veths.
//!
//! Everything here is a side effect (bpf syscalls); what to write comes from [`contents`], which is pure.

pub mod conntrack;
pub mod contents;
pub mod pinned_maps;
pub mod pins;

use std::{collections::BTreeMap, io};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, lpm_trie::Key},
    programs::{
        LinkOrder, ProgramError, SchedClassifier,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use netpol_common::{
    CONFIG_CT_QUOTA, CONFIG_CT_TIMEOUTS, CONFIG_GENERATION, CtKey, CtTimeouts, CtValue,
    EndpointInfo, IpInfo, IpKey, PolicyKey, PolicyValue, REASON_SLOTS, Reason, SvcKey, SvcValue,
    capacity, map_names, service,
};
use thiserror::Error;

pub use contents::{Contents, Plan, STEP_ORDER, Step};
pub use pins::{Hook, PinLayout};

/// The compiled `netpol-ebpf` object (both classifier programs and every map), built by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netpol"));

/// Errors of the datapath.
#[derive(Debug, Error)]
pub enum DatapathError {
    #[error(transparent)]
    Pins(#[from] pins::PinError),
    #[error(transparent)]
    PinnedMap(#[from] pinned_maps::PinnedMapError),
    #[error("loading the eBPF object with maps pinned under {dir}")]
    Load {
        dir: String,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("opening map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("loading program {name} into the kernel")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching {program} to {ifname} (ifindex {ifindex}); TCX needs Linux 6.6 or newer")]
    Attach {
        program: &'static str,
        ifname: String,
        ifindex: u32,
        #[source]
        source: ProgramError,
    },
    #[error("adopting or pinning the TCX link of {ifname} (ifindex {ifindex})")]
    Link {
        ifname: String,
        ifindex: u32,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pinning or unpinning the link at {path}")]
    LinkPin {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// A map entry that could not be written: the map is full or the kernel refused it. The traffic the
/// entry would have allowed stays denied (allow entries are all the datapath can miss).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct WriteError {
    pub map: &'static str,
    pub error: String,
}

/// Use of one map.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapUsage {
    pub name: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

/// The loaded programs and the pinned maps of one agent.
pub struct Datapath {
    layout: PinLayout,
    ebpf: Ebpf,
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    ipcache: HashMap<MapData, IpKey, IpInfo>,
    cidrs: LpmTrie<MapData, IpKey, u32>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    services: HashMap<MapData, SvcKey, SvcValue>,
    frontends: HashMap<MapData, IpKey, u32>,
    config: Array<MapData, u32>,
    counters: PerCpuArray<MapData, u64>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    ct_count: HashMap<MapData, u32, u64>,
    /// Mirror of what the four policy maps hold.
    current: Contents,
    /// The policy generation still has to be bumped: set at start-up (a previous agent may have
    /// been killed between its map writes and its bump) and by every change, cleared only once a
    /// bump succeeded, so revoked flows always get re-checked.
    bump_pending: bool,
}

fn take_map<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, DatapathError> {
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

impl Datapath {
    /// Loads the programs and opens (or creates) the pinned maps under `layout`, adopting whatever a
    /// previous agent left there: the current map contents are read back, not assumed empty.
    pub fn open(layout: PinLayout) -> Result<Self, DatapathError> {
        layout.prepare()?;
        let maps_dir = layout.maps_dir();
        pinned_maps::check(&maps_dir, EBPF_OBJECT)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(EBPF_OBJECT)
            .map_err(|source| DatapathError::Load {
                dir: maps_dir.display().to_string(),
                source: Box::new(source),
            })?;
        for hook in [Hook::PodEgress, Hook::PodIngress, Hook::Tunnel] {
            let name = hook.program();
            program_mut(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        let endpoints = take_map(&mut ebpf, map_names::ENDPOINTS)?;
        let ipcache = take_map(&mut ebpf, map_names::IPCACHE)?;
        let cidrs = take_map(&mut ebpf, map_names::CIDRS)?;
        let policy = take_map(&mut ebpf, map_names::POLICY)?;
        let services = take_map(&mut ebpf, service::MAP_NAME)?;
        let frontends = take_map(&mut ebpf, service::FRONTENDS_MAP_NAME)?;
        let config = take_map(&mut ebpf, map_names::CONFIG)?;
        let counters = take_map(&mut ebpf, map_names::COUNTERS)?;
        let conntrack = take_map(&mut ebpf, map_names::CONNTRACK)?;
        let ct_count = take_map(&mut ebpf, map_names::CT_COUNT)?;
        let mut datapath = Datapath {
            layout,
            ebpf,
            endpoints,
            ipcache,
            cidrs,
            policy,
            services,
            frontends,
            config,
            counters,
            conntrack,
            ct_count,
            current: Contents::default(),
            bump_pending: true,
        };
        datapath.current = datapath.read_contents();
        Ok(datapath)
    }

    /// The pin layout.
    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    /// What the policy maps hold now.
    pub fn contents(&self) -> &Contents {
        &self.current
    }

    fn read_contents(&self) -> Contents {
        Contents {
            endpoints: self.endpoints.iter().filter_map(Result::ok).collect(),
            ipcache: self.ipcache.iter().filter_map(Result::ok).collect(),
            cidrs: self
                .cidrs
                .iter()
                .filter_map(Result::ok)
                .map(|(k, v)| ((k.data(), k.prefix_len()), v))
                .collect(),
            policy: self
                .policy
                .iter()
                .filter_map(Result::ok)
                .map(|(k, v)| ((k.data(), k.prefix_len()), v))
                .collect(),
            services: self.services.iter().filter_map(Result::ok).collect(),
            frontends: self.frontends.iter().filter_map(Result::ok).collect(),
        }
    }

    /// Writes `desired` into the maps in [`STEP_ORDER`]. Returns the entries that could not be written;
    /// the rest is applied regardless.
    pub fn apply(&mut self, desired: &Contents) -> Vec<WriteError> {
        let plan = Plan::new(&self.current, desired);
        if plan.is_empty() && !self.bump_pending {
            return Vec::new();
        }
        self.bump_pending = true;
        let mut errors = Vec::new();
        let mut note = |map: &'static str, r: Result<(), MapError>| {
            if let Err(e) = r {
                errors.push(WriteError {
                    map,
                    error: e.to_string(),
                });
            }
        };
        for step in STEP_ORDER {
            match step {
                Step::ServiceUpserts => {
                    for (k, v) in &plan.services.upserts {
                        note(service::MAP_NAME, self.services.insert(k, v, 0));
                    }
                }
                Step::ServiceDeletes => {
                    for k in &plan.services.deletes {
                        note(service::MAP_NAME, ignore_missing(self.services.remove(k)));
                    }
                }
                Step::PolicyUpserts => {
                    for ((k, len), v) in &plan.policy.upserts {
                        note(
                            map_names::POLICY,
                            self.policy.insert(&Key::new(*len, *k), *v, 0),
                        );
                    }
                }
                Step::FrontendUpserts => {
                    for (k, v) in &plan.frontends.upserts {
                        note(service::FRONTENDS_MAP_NAME, self.frontends.insert(k, v, 0));
                    }
                }
                Step::FrontendDeletes => {
                    for k in &plan.frontends.deletes {
                        note(
                            service::FRONTENDS_MAP_NAME,
                            ignore_missing(self.frontends.remove(k)),
                        );
                    }
                }
                Step::CidrUpserts => {
                    for ((k, len), v) in &plan.cidrs.upserts {
                        note(
                            map_names::CIDRS,
                            self.cidrs.insert(&Key::new(*len, *k), *v, 0),
                        );
                    }
                }
                Step::IpcacheUpserts => {
                    for (k, v) in &plan.ipcache.upserts {
                        note(map_names::IPCACHE, self.ipcache.insert(k, v, 0));
                    }
                }
                Step::EndpointUpserts => {
                    for (k, v) in &plan.endpoints.upserts {
                        note(map_names::ENDPOINTS, self.endpoints.insert(k, v, 0));
                    }
                }
                Step::EndpointDeletes => {
                    for k in &plan.endpoints.deletes {
                        note(
                            map_names::ENDPOINTS,
                            ignore_missing(self.endpoints.remove(k)),
                        );
                    }
                }
                Step::CidrDeletes => {
                    for (k, len) in &plan.cidrs.deletes {
                        note(
                            map_names::CIDRS,
                            ignore_missing(self.cidrs.remove(&Key::new(*len, *k))),
                        );
                    }
                }
                Step::IpcacheDeletes => {
                    for k in &plan.ipcache.deletes {
                        note(map_names::IPCACHE, ignore_missing(self.ipcache.remove(k)));
                    }
                }
                Step::PolicyDeletes => {
                    for (k, len) in &plan.policy.deletes {
                        note(
                            map_names::POLICY,
                            ignore_missing(self.policy.remove(&Key::new(*len, *k))),
                        );
                    }
                }
                Step::BumpGeneration => {
                    let next = self.generation().wrapping_add(1);
                    let bumped = self.config.set(CONFIG_GENERATION, next, 0);
                    self.bump_pending = bumped.is_err();
                    note(map_names::CONFIG, bumped);
                }
            }
        }
        // Re-read rather than assume: an entry the kernel refused is not there.
        self.current = self.read_contents();
        errors
    }

    /// Gives the veth `ifindex` an ENDPOINTS entry if it has none, without touching anything else:
    /// before the agent has any cluster state it may attach to a new veth (pending), but must not
    /// rewrite what a previous agent left. Returns whether it wrote one.
    pub fn add_endpoint_if_absent(
        &mut self,
        ifindex: u32,
        info: EndpointInfo,
    ) -> Result<bool, MapError> {
        if self.current.endpoints.contains_key(&ifindex) {
            return Ok(false);
        }
        // BPF_NOEXIST (linux/bpf.h; libc has no constant): an entry already there is kept.
        const BPF_NOEXIST: u64 = 1;
        match self.endpoints.insert(ifindex, info, BPF_NOEXIST) {
            Ok(()) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        self.current.endpoints.insert(ifindex, info);
        Ok(true)
    }

    /// Sets how long the datapath keeps idle flows, by state, and how many entries one endpoint may
    /// hold (0: [`netpol_common::DEFAULT_CT_QUOTA`]).
    pub fn set_conntrack(&mut self, timeouts: &CtTimeouts, quota: u32) -> Result<(), MapError> {
        for (i, seconds) in timeouts.slots().into_iter().enumerate() {
            self.config.set(CONFIG_CT_TIMEOUTS + i as u32, seconds, 0)?;
        }
        self.config.set(CONFIG_CT_QUOTA, quota, 0)
    }

    /// Removes the conntrack entries that outlived `timeouts`, then recounts each endpoint's
    /// entries exactly for the quota (the datapath's own counting is approximate); returns how many
    /// entries it removed. An entry that disappears meanwhile (its flow's packet found it expired,
    /// the LRU evicted it) is no error.
    pub fn expire_conntrack(&mut self, timeouts: &CtTimeouts) -> Result<usize, MapError> {
        let now = conntrack::monotonic_now_ns();
        let (stale, counts) =
            conntrack::sweep(self.conntrack.iter().filter_map(Result::ok), timeouts, now);
        for key in &stale {
            ignore_missing(self.conntrack.remove(key))?;
        }
        let counted: Vec<u32> = self.ct_count.keys().filter_map(Result::ok).collect();
        for endpoint in counted.iter().filter(|e| !counts.contains_key(e)) {
            ignore_missing(self.ct_count.remove(endpoint))?;
        }
        for (endpoint, n) in counts {
            self.ct_count.insert(endpoint, n, 0)?;
        }
        Ok(stale.len())
    }

    /// The ids of the programs that TCX runs before this agent's at `hook` of `ifname` (empty when
    /// ours is first; ours missing altogether counts every program as before it).
    pub fn programs_before(&mut self, ifname: &str, hook: Hook) -> Result<Vec<u32>, ProgramError> {
        let ours = self.program_id(hook);
        let (_, attached) = SchedClassifier::query_tcx(ifname, hook.tc_attach_type())?;
        Ok(attached
            .iter()
            .map(|p| p.id())
            .take_while(|id| Some(*id) != ours)
            .collect())
    }

    /// Whether this agent's program runs at `hook` of `ifname` (someone may have detached it, or
    /// swapped another program into its link).
    pub fn runs_ours(&mut self, ifname: &str, hook: Hook) -> Result<bool, ProgramError> {
        let ours = self.program_id(hook);
        let (_, attached) = SchedClassifier::query_tcx(ifname, hook.tc_attach_type())?;
        Ok(attached.iter().any(|p| Some(p.id()) == ours))
    }

    /// Puts this agent's program back at `hook`: through its pinned link if that still lives (a
    /// program swapped in is swapped out), else through a new link replacing the dead pin.
    pub fn reattach(
        &mut self,
        ifindex: u32,
        ifname: &str,
        hook: Hook,
    ) -> Result<(), DatapathError> {
        if self.attach_hook(ifindex, ifname, hook).is_ok()
            && self.runs_ours(ifname, hook).unwrap_or(false)
        {
            return Ok(());
        }
        self.remove_link_pin(ifindex, hook)?;
        self.attach_hook(ifindex, ifname, hook)
    }

    /// The kernel's id of this agent's program for `hook`.
    fn program_id(&mut self, hook: Hook) -> Option<u32> {
        program_mut(&mut self.ebpf, hook.program())
            .ok()
            .and_then(|p| p.info().ok())
            .map(|i| i.id())
    }

    /// Removes the pin of the link at `hook` of `ifindex` (none is fine); with no other holder,
    /// that detaches the program.
    fn remove_link_pin(&self, ifindex: u32, hook: Hook) -> Result<(), DatapathError> {
        let path = self.layout.link(ifindex, hook);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DatapathError::LinkPin {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// The policy generation the datapath checks conntrack entries against.
    pub fn generation(&self) -> u32 {
        self.config.get(&CONFIG_GENERATION, 0).unwrap_or(0)
    }

    /// Packets counted per verdict reason, summed over CPUs.
    pub fn counters(&self) -> BTreeMap<Reason, u64> {
        Reason::ALL
            .into_iter()
            .filter(|r| (*r as u32) < REASON_SLOTS)
            .map(|r| {
                let sum = self
                    .counters
                    .get(&(r as u32), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (r, sum)
            })
            .collect()
    }

    /// Entries and capacity of each policy map.
    pub fn usage(&self) -> Vec<MapUsage> {
        vec![
            MapUsage {
                name: map_names::ENDPOINTS,
                entries: self.current.endpoints.len(),
                capacity: capacity::ENDPOINTS,
            },
            MapUsage {
                name: map_names::IPCACHE,
                entries: self.current.ipcache.len(),
                capacity: capacity::IPCACHE,
            },
            MapUsage {
                name: map_names::CIDRS,
                entries: self.current.cidrs.len(),
                capacity: capacity::CIDRS,
            },
            MapUsage {
                name: map_names::POLICY,
                entries: self.current.policy.len(),
                capacity: capacity::POLICY,
            },
            MapUsage {
                name: service::MAP_NAME,
                entries: self.current.services.len(),
                capacity: service::CAPACITY,
            },
            MapUsage {
                name: service::FRONTENDS_MAP_NAME,
                entries: self.current.frontends.len(),
                capacity: service::FRONTENDS_CAPACITY,
            },
        ]
    }

    /// The (ifindex, hook) pairs that have a pinned link.
    pub fn pinned_links(&self) -> Vec<(u32, Hook)> {
        let Ok(dir) = std::fs::read_dir(self.layout.links_dir()) else {
            return Vec::new();
        };
        let mut links: Vec<_> = dir
            .filter_map(Result::ok)
            .filter_map(|e| PinLayout::parse_link_name(e.file_name().to_str()?))
            .collect();
        links.sort();
        links
    }

    /// Attaches both programs to the pod veth `ifname`/`ifindex`, or atomically replaces the programs
    /// of links a previous agent pinned for it. The links are pinned, so enforcement outlives this
    /// process.
    pub fn attach(&mut self, ifindex: u32, ifname: &str) -> Result<(), DatapathError> {
        for hook in Hook::ALL {
            self.attach_hook(ifindex, ifname, hook)?;
        }
        Ok(())
    }

    /// Attaches (or adopts) one program at `hook` of the device `ifname`/`ifindex`.
    pub fn attach_hook(
        &mut self,
        ifindex: u32,
        ifname: &str,
        hook: Hook,
    ) -> Result<(), DatapathError> {
        let path = self.layout.link(ifindex, hook);
        let program = hook.program();
        let attach_err = |source| DatapathError::Attach {
            program,
            ifname: ifname.to_owned(),
            ifindex,
            source,
        };
        let link_err = |source| DatapathError::Link {
            ifname: ifname.to_owned(),
            ifindex,
            source,
        };
        let prog = program_mut(&mut self.ebpf, program)?;
        match PinnedLink::from_pin(&path) {
            Ok(pinned) => {
                let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(link_err)?;
                let id = prog.attach_to_link(link).map_err(attach_err)?;
                // The pin keeps the link; our fd can go.
                drop(prog.take_link(id).map_err(attach_err)?);
            }
            Err(_) => {
                let id = prog
                    .attach_with_options(
                        ifname,
                        hook.tc_attach_type(),
                        // First in the chain: policy decides before any other TCX program;
                        // allowed packets go on to the rest (TCX_NEXT).
                        TcAttachOptions::TcxOrder(LinkOrder::first()),
                    )
                    .map_err(attach_err)?;
                let link = prog.take_link(id).map_err(attach_err)?;
                let fd_link = FdLink::try_from(link).map_err(link_err)?;
                fd_link.pin(&path).map_err(|e| DatapathError::LinkPin {
                    path: path.display().to_string(),
                    source: io::Error::other(e),
                })?;
            }
        }
        Ok(())
    }

    /// Detaches every program from the device with `ifindex` by removing their pins (a device that is
    /// gone has already lost its links; this removes the stale pins).
    pub fn detach(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        for hook in [Hook::PodEgress, Hook::PodIngress, Hook::Tunnel] {
            self.remove_link_pin(ifindex, hook)?;
        }
        Ok(())
    }
}

fn program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    let prog = ebpf.program_mut(name).ok_or(DatapathError::Missing {
        kind: "program",
        name,
    })?;
    prog.try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Removes everything an agent pinned under `layout`: links (which detaches the programs from every
/// pod veth) and maps. Returns how many pins were removed.
pub fn cleanup(layout: &PinLayout) -> io::Result<usize> {
    let mut removed = 0;
    for dir in [layout.links_dir(), layout.maps_dir()] {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            std::fs::remove_file(entry?.path())?;
            removed += 1;
        }
        std::fs::remove_dir(&dir)?;
    }
    Ok(removed)
}
