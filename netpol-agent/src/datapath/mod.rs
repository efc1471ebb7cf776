//! The datapath: the embedded eBPF object, its pinned maps, and the TC attachments on pod veths.
//!
//! Everything here is a side effect (bpf syscalls); what to write comes from [`contents`], which is pure.

pub mod capacities;
pub mod conntrack;
pub mod contents;
mod grace;
pub mod lookup;
pub mod pinned_maps;
pub mod pinned_read;
pub mod pins;

use std::{collections::BTreeMap, io, sync::Arc};

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
    buffer, map_names, service,
};
use thiserror::Error;

pub use capacities::Capacities;
pub use contents::{Buffers, Contents, Plan, Update, Write};
use grace::Grace;
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
    #[error(
        "resizing the decision maps: {0}; the old maps stay pinned and in force (raise the --max-* \
         flag, or run `netpol-agent cleanup` first)"
    )]
    Resize(String),
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
    #[error("creating or updating the map-in-map that waits for RCU grace periods")]
    Grace(#[source] io::Error),
    #[error("pinning or unpinning {path}")]
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

impl WriteError {
    fn new(map: &'static str, error: impl std::fmt::Display) -> Self {
        WriteError {
            map,
            error: error.to_string(),
        }
    }
}

/// Use of one map.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapUsage {
    pub name: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

/// The decision maps of one buffer ([`netpol_common::buffer`]).
struct BufferMaps {
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    ipcache: HashMap<MapData, IpKey, IpInfo>,
    cidrs: LpmTrie<MapData, IpKey, u32>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    services: HashMap<MapData, SvcKey, SvcValue>,
    frontends: LpmTrie<MapData, IpKey, u32>,
}

impl BufferMaps {
    fn take(ebpf: &mut Ebpf, buffer: usize) -> Result<Self, DatapathError> {
        Ok(BufferMaps {
            endpoints: take_map(ebpf, map_names::ENDPOINTS[buffer])?,
            ipcache: take_map(ebpf, map_names::IPCACHE[buffer])?,
            cidrs: take_map(ebpf, map_names::CIDRS[buffer])?,
            policy: take_map(ebpf, map_names::POLICY[buffer])?,
            services: take_map(ebpf, service::MAP_NAME[buffer])?,
            frontends: take_map(ebpf, service::FRONTENDS_MAP_NAME[buffer])?,
        })
    }

    /// What the buffer holds; an error when any map cannot be read whole (a partial read must
    /// never stand for the contents: a key missing from it would never be deleted).
    fn read(&self) -> Result<Contents, MapError> {
        let tries = (&self.cidrs, &self.policy);
        let mut c = read_shared(&self.endpoints, &self.ipcache, tries, &self.services)?;
        c.frontends = read_trie(&self.frontends)?;
        Ok(c)
    }

    /// The maps that were `written`, read back, and the others as `last` has them.
    fn read_written(&self, written: &Written, last: &Contents) -> Result<Contents, MapError> {
        let addresses = written.addresses.as_deref();
        Ok(Contents {
            endpoints: hash_or(written.endpoints, &self.endpoints, &last.endpoints)?,
            ipcache: addresses_or(written.ipcache, addresses, &self.ipcache, &last.ipcache)?,
            cidrs: trie_or(written.cidrs, &self.cidrs, &last.cidrs)?,
            policy: trie_or(written.policy, &self.policy, &last.policy)?,
            services: hash_or(written.services, &self.services, &last.services)?,
            frontends: trie_or(written.frontends, &self.frontends, &last.frontends)?,
        })
    }

    /// Makes one write (not a switch); returns the map it went to and the kernel's answer.
    fn write(&mut self, buffer: usize, write: Write<'_>) -> (&'static str, Result<(), MapError>) {
        // Upsert `$v` at `$k` in `$map`, or delete `$k` when `$v` is `None`.
        macro_rules! put {
            ($map:expr, $k:expr, $v:expr) => {
                match $v {
                    Some(v) => $map.insert($k, v, 0),
                    None => ignore_missing($map.remove($k)),
                }
            };
        }
        match write {
            Write::Endpoint(k, v) => (map_names::ENDPOINTS[buffer], put!(self.endpoints, &k, v)),
            Write::Address(k, v) => (map_names::IPCACHE[buffer], put!(self.ipcache, k, v)),
            Write::Cidr((k, len), v) => (
                map_names::CIDRS[buffer],
                put!(self.cidrs, &Key::new(*len, *k), v),
            ),
            Write::Policy((k, len), v) => (
                map_names::POLICY[buffer],
                put!(self.policy, &Key::new(*len, *k), v),
            ),
            Write::Service(k, v) => (service::MAP_NAME[buffer], put!(self.services, k, v)),
            Write::Frontend((k, len), v) => (
                service::FRONTENDS_MAP_NAME[buffer],
                put!(self.frontends, &Key::new(*len, *k), v),
            ),
            Write::Switch(_) => (map_names::CONFIG, Ok(())),
        }
    }
}

/// ENDPOINTS, IPCACHE, CIDRS (with POLICY, in `tries`) and SERVICES read whole; FRONTENDS, whose
/// map type the V1 layout had otherwise, is left empty for the caller.
fn read_shared(
    endpoints: &HashMap<MapData, u32, EndpointInfo>,
    ipcache: &HashMap<MapData, IpKey, IpInfo>,
    tries: (
        &LpmTrie<MapData, IpKey, u32>,
        &LpmTrie<MapData, PolicyKey, PolicyValue>,
    ),
    services: &HashMap<MapData, SvcKey, SvcValue>,
) -> Result<Contents, MapError> {
    Ok(Contents {
        endpoints: endpoints.iter().collect::<Result<_, _>>()?,
        ipcache: ipcache.iter().collect::<Result<_, _>>()?,
        cidrs: read_trie(tries.0)?,
        policy: read_trie(tries.1)?,
        services: services.iter().collect::<Result<_, _>>()?,
        frontends: Default::default(),
    })
}

/// A hash map read whole when `read`, else `last`.
fn hash_or<K: aya::Pod + Ord, V: aya::Pod>(
    read: bool,
    map: &HashMap<MapData, K, V>,
    last: &BTreeMap<K, V>,
) -> Result<BTreeMap<K, V>, MapError> {
    if read {
        map.iter().collect()
    } else {
        Ok(last.clone())
    }
}

/// A trie read whole when `read`, else `last`.
fn trie_or<K: aya::Pod + Ord, V: aya::Pod>(
    read: bool,
    t: &LpmTrie<MapData, K, V>,
    last: &BTreeMap<(K, u32), V>,
) -> Result<BTreeMap<(K, u32), V>, MapError> {
    if read { read_trie(t) } else { Ok(last.clone()) }
}

/// A whole LPM trie, keys with their prefix lengths.
fn read_trie<K: aya::Pod + Ord, V: aya::Pod>(
    t: &LpmTrie<MapData, K, V>,
) -> Result<BTreeMap<(K, u32), V>, MapError> {
    t.iter()
        .map(|r| r.map(|(k, v)| ((k.data(), k.prefix_len()), v)))
        .collect()
}

/// Which maps of a buffer an update wrote to.
#[derive(Clone, Debug, Default)]
struct Written {
    endpoints: bool,
    ipcache: bool,
    cidrs: bool,
    policy: bool,
    services: bool,
    frontends: bool,
    /// The IPCACHE keys written (upserted or deleted), `None` when the whole map is to be read.
    addresses: Option<Vec<IpKey>>,
}

impl Written {
    /// Every map, whole, when the mirror cannot be trusted (`unknown`); else what was written.
    fn or_all(self, unknown: bool) -> Written {
        if !unknown {
            return self;
        }
        Written {
            endpoints: true,
            ipcache: true,
            cidrs: true,
            policy: true,
            services: true,
            frontends: true,
            addresses: None,
        }
    }

    fn note(&mut self, write: &Write<'_>) {
        match write {
            Write::Endpoint(..) => self.endpoints = true,
            Write::Address(k, _) => {
                self.ipcache = true;
                self.addresses.get_or_insert_default().push(**k);
            }
            Write::Cidr(..) => self.cidrs = true,
            Write::Policy(..) => self.policy = true,
            Write::Service(..) => self.services = true,
            Write::Frontend(..) => self.frontends = true,
            Write::Switch(_) => {}
        }
    }
}

/// IPCACHE as `last` has it with the `written` keys read back one by one (present: the kernel's
/// value; absent: removed), or read whole when `written` is `None`. A relabel writes a few of its
/// 100,000 entries at 50,000 pods: reading those back costs a lookup each, not a walk of the map.
fn addresses_or(
    read: bool,
    written: Option<&[IpKey]>,
    map: &HashMap<MapData, IpKey, IpInfo>,
    last: &BTreeMap<IpKey, IpInfo>,
) -> Result<BTreeMap<IpKey, IpInfo>, MapError> {
    let keys = match (read, written) {
        (false, _) => return Ok(last.clone()),
        (true, None) => return map.iter().collect(),
        (true, Some(keys)) => keys,
    };
    let mut out = last.clone();
    for k in keys {
        match map.get(k, 0) {
            Ok(v) => {
                out.insert(*k, v);
            }
            Err(MapError::KeyNotFound) => {
                out.remove(k);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The loaded programs and the pinned maps of one agent.
pub struct Datapath {
    layout: PinLayout,
    ebpf: Ebpf,
    buffers: [BufferMaps; buffer::COUNT],
    config: Array<MapData, u32>,
    counters: PerCpuArray<MapData, u64>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    ct_count: HashMap<MapData, u32, u64>,
    /// Mirror of what both buffers hold, and the generation.
    mirror: Buffers,
    /// The sizes the decision maps were created with.
    capacities: Capacities,
    /// Waits for RCU grace periods.
    grace: Arc<Grace>,
    /// The grace period after the last switch, still running.
    pending_grace: Option<grace::Pending>,
    /// A switch happened and no grace period is known to have passed since.
    grace_owed: bool,
    /// The buffers still have to be switched: set at start-up (a previous agent may have been
    /// killed between writing a buffer and switching to it), cleared only once a switch
    /// succeeded, so revoked flows always get re-checked.
    switch_pending: bool,
    /// Per buffer: the mirror may lack what the kernel holds (a read failed, or an entry was found
    /// there that the mirror did not have), so the next read-back reads every map.
    mirror_unknown: [bool; 2],
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
    /// Loads the programs and opens (or creates, sized as `capacities` says) the pinned maps under
    /// `layout`, adopting whatever a previous agent left there: the current map contents are read
    /// back, not assumed empty.
    pub fn open(layout: PinLayout, capacities: &Capacities) -> Result<Self, DatapathError> {
        layout.prepare()?;
        let maps_dir = layout.maps_dir();
        let sizes: Vec<(&str, u32)> = capacities
            .by_map()
            .into_iter()
            .flat_map(|(names, _, n)| names.map(|name| (name, n)))
            .collect();
        pinned_maps::check(&maps_dir, EBPF_OBJECT, &sizes)?;
        pinned_maps::set_aside_resized(&maps_dir, EBPF_OBJECT, &sizes)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&maps_dir);
        for (name, n) in &sizes {
            loader.map_max_entries(name, *n);
        }
        let mut ebpf = loader
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
        let buffers = [
            BufferMaps::take(&mut ebpf, 0)?,
            BufferMaps::take(&mut ebpf, 1)?,
        ];
        let config = take_map(&mut ebpf, map_names::CONFIG)?;
        let counters = take_map(&mut ebpf, map_names::COUNTERS)?;
        let conntrack = take_map(&mut ebpf, map_names::CONNTRACK)?;
        let ct_count = take_map(&mut ebpf, map_names::CT_COUNT)?;
        let mut datapath = Datapath {
            layout,
            ebpf,
            buffers,
            config,
            counters,
            conntrack,
            ct_count,
            mirror: Buffers::default(),
            capacities: *capacities,
            grace: Arc::new(Grace::new().map_err(DatapathError::Grace)?),
            pending_grace: None,
            grace_owed: false,
            switch_pending: true,
            mirror_unknown: [false; 2],
        };
        let read_err = |source| DatapathError::Map {
            name: map_names::CONFIG,
            source,
        };
        datapath.mirror = Buffers {
            generation: datapath
                .config
                .get(&CONFIG_GENERATION, 0)
                .map_err(read_err)?,
            contents: [
                datapath.buffers[0].read().map_err(read_err)?,
                datapath.buffers[1].read().map_err(read_err)?,
            ],
        };
        datapath.adopt_resized(&maps_dir, &sizes)?;
        datapath.adopt_v1(&maps_dir)?;
        datapath.adopt_conntrack_v1(&maps_dir);
        // A previous agent may have died between its switch and its grace period.
        datapath.grace.wait().map_err(DatapathError::Grace)?;
        Ok(datapath)
    }

    /// Copies the conntrack entries an agent of the V1 layout pinned. Failing to copy only costs
    /// those flows their fast path (they are decided again, closed where policy says so); refusing
    /// to start would leave new pods without programs.
    fn adopt_conntrack_v1(&mut self, maps_dir: &std::path::Path) {
        match conntrack::adopt_v1(maps_dir, &mut self.conntrack) {
            Ok(0) => {}
            Ok(copied) => {
                tracing::info!(
                    entries = copied,
                    "adopted the conntrack entries of the V1 layout"
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not copy the V1 conntrack entries; their flows are decided again");
                let _ = std::fs::remove_file(maps_dir.join(map_names::CONNTRACK_V1));
            }
        }
    }

    /// Decision maps moved aside because this agent asks for another size or flags: copies their
    /// entries into the new maps (both buffers), moves every pinned link to this agent's programs,
    /// which read the new maps, then removes the old pins. Until the swap the old programs enforce
    /// the old maps; after it the new programs enforce the same entries: no gap, no change. When
    /// the entries do not fit or a step fails, the old pins are put back before the error: the old
    /// programs go on with the old maps.
    fn adopt_resized(
        &mut self,
        maps_dir: &std::path::Path,
        sizes: &[(&'static str, u32)],
    ) -> Result<(), DatapathError> {
        let aside = pinned_maps::aside_name;
        let resized: Vec<&str> = sizes
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| maps_dir.join(aside(name)).exists())
            .collect();
        if resized.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.copy_resized(maps_dir, &resized, sizes) {
            pinned_maps::restore_aside(maps_dir, &resized)
                .map_err(|e| DatapathError::Resize(format!("putting the old pins back: {e}")))?;
            return Err(e);
        }
        for name in &resized {
            let path = maps_dir.join(aside(name));
            std::fs::remove_file(&path).map_err(|source| DatapathError::LinkPin {
                path: path.display().to_string(),
                source,
            })?;
        }
        tracing::info!(maps = ?resized, "resized decision maps: entries copied, programs swapped in");
        Ok(())
    }

    /// The copy and the swap of [`Self::adopt_resized`]: every entry of both old buffers must fit
    /// and be written, and every link of a device that still exists must take the new program.
    fn copy_resized(
        &mut self,
        maps_dir: &std::path::Path,
        resized: &[&str],
        sizes: &[(&'static str, u32)],
    ) -> Result<(), DatapathError> {
        let pin = |name: &'static str| match resized.contains(&name) {
            true => pinned_maps::aside_name(name),
            false => name.to_owned(),
        };
        let mut old = Vec::new();
        for b in 0..buffer::COUNT {
            let c = pinned_read::read_buffer(maps_dir, b, pin)
                .map_err(|e| DatapathError::Resize(format!("reading buffer {b}: {e}")))?;
            for (name, entries) in c.entries_by_map(b) {
                let capacity = sizes
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or(0, |(_, n)| *n);
                if entries > capacity as usize {
                    return Err(DatapathError::Resize(format!(
                        "{name} holds {entries} entries, more than the {capacity} asked for"
                    )));
                }
            }
            old.push(c);
        }
        for (b, c) in old.iter().enumerate() {
            let failed = self.fill_buffer(b, c, "copying a resized decision map")?;
            if failed > 0 {
                return Err(DatapathError::Resize(format!(
                    "{failed} entries of buffer {b} could not be written"
                )));
            }
        }
        self.relink_pinned()
    }

    /// Writes into buffer `b` what it lacks of `target`, then reads it back; returns how many
    /// writes failed (counted in one warning).
    fn fill_buffer(
        &mut self,
        b: usize,
        target: &Contents,
        what: &str,
    ) -> Result<usize, DatapathError> {
        let plan = Plan::new(&self.mirror.contents[b], target);
        let mut failed = 0usize;
        let mut last = None;
        for write in plan.writes() {
            if let (map, Err(e)) = self.buffers[b].write(b, write) {
                failed += 1;
                last = Some((map, e));
            }
        }
        if let Some((map, e)) = last {
            tracing::warn!(failed, map, error = %e, "{what}: entries left out");
        }
        self.mirror.contents[b] = self.buffers[b]
            .read()
            .map_err(|source| DatapathError::Map {
                name: "a decision map buffer",
                source,
            })?;
        Ok(failed)
    }

    /// Moves every pinned link to this agent's program for its hook, each an atomic replace. A
    /// link whose device is gone is left to the sync; any other failure is an error.
    fn relink_pinned(&mut self) -> Result<(), DatapathError> {
        for (ifindex, hook) in self.pinned_links() {
            let path = self.layout.link(ifindex, hook);
            let swapped = PinnedLink::from_pin(&path)
                .map_err(|e| DatapathError::Resize(format!("opening {}: {e}", path.display())))
                .and_then(|pinned| {
                    self.swap_into(pinned, ifindex, &format!("ifindex {ifindex}"), hook)
                });
            match swapped {
                Ok(()) => {}
                Err(_) if !device_exists(ifindex) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Takes over the decision maps an agent of the V1 layout pinned (into both buffers, when they
    /// are new), then unpins them; the old programs keep them until they are replaced.
    fn adopt_v1(&mut self, maps_dir: &std::path::Path) -> Result<(), DatapathError> {
        let read_err = |source| DatapathError::Map {
            name: map_names::OBSOLETE[0],
            source,
        };
        let fresh = self
            .mirror
            .contents
            .iter()
            .all(|c| c == &Contents::default());
        if let Some(v1) = pinned_read::read_v1(maps_dir).map_err(read_err)?
            && fresh
        {
            for b in 0..buffer::COUNT {
                self.fill_buffer(b, &v1, "adopting the V1 decision maps")?;
            }
            tracing::info!(
                endpoints = v1.endpoints.len(),
                policy_entries = v1.policy.len(),
                "adopted the decision maps of the V1 layout"
            );
        }
        let obsolete =
            pinned_maps::remove_obsolete(maps_dir).map_err(|source| DatapathError::LinkPin {
                path: maps_dir.display().to_string(),
                source,
            })?;
        if !obsolete.is_empty() {
            tracing::info!(maps = ?obsolete, "unpinned the maps of an older layout");
        }
        Ok(())
    }

    /// The pin layout.
    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    /// What packets read now.
    pub fn contents(&self) -> &Contents {
        self.mirror.active()
    }

    /// Makes packets read `desired`: waits until no packet reads the buffer they do not read (the
    /// grace period after the last switch), writes `desired` into it, switches with one write of
    /// the generation (which also has every established flow re-checked; on weakly ordered CPUs
    /// after another grace period, so that a packet that sees the new generation sees these
    /// writes), and starts the next grace period in the background. Only a buffer whose read-back equals `desired` is switched to: after any
    /// failed write the previous policy stays in force and the update is retried
    /// ([`Datapath::switch_pending`]).
    pub fn apply(&mut self, desired: &Contents) -> Vec<WriteError> {
        if self.mirror.active() == desired && !self.switch_pending {
            return Vec::new();
        }
        self.switch_pending = true;
        if let Err(e) = self.settle() {
            return vec![e];
        }
        let update = Update::new(&self.mirror, desired);
        let b = update.buffer;
        let mut errors = Vec::new();
        let mut written = Written::default();
        for write in update.writes() {
            if let Write::Switch(generation) = write {
                self.reread(b, std::mem::take(&mut written), &mut errors);
                if errors.is_empty() && self.mirror.contents[b] != *desired {
                    // Keys a failed read had hidden: the next update deletes them.
                    errors.push(WriteError::new(
                        map_names::POLICY[b],
                        "the buffer read back differs from what was written",
                    ));
                }
                if errors.is_empty() {
                    errors.extend(self.switch(generation).err());
                }
                break;
            }
            written.note(&write);
            if let (map, Err(e)) = self.buffers[b].write(b, write) {
                errors.push(WriteError::new(map, e));
            }
        }
        errors
    }

    /// Re-reads the maps of buffer `b` that were `written` into the mirror rather than assume: an
    /// entry the kernel refused is not there. (A map not written holds what was read back last
    /// time: reading back 100,000 unchanged IPCACHE entries on every policy edit was a third of its
    /// cost.) Contents it cannot read whole are unknown: the next update rewrites all of it and
    /// reads every map back, also those with nothing to write (a map desired empty would otherwise
    /// keep, unseen, what an earlier attempt left in it).
    fn reread(&mut self, b: usize, written: Written, errors: &mut Vec<WriteError>) {
        let to_read = written.or_all(self.mirror_unknown[b]);
        match self.buffers[b].read_written(&to_read, &self.mirror.contents[b]) {
            Ok(c) => {
                self.mirror.contents[b] = c;
                self.mirror_unknown[b] = false;
            }
            Err(e) => {
                self.mirror.contents[b] = Contents::default();
                self.mirror_unknown[b] = true;
                errors.push(WriteError::new(map_names::POLICY[b], e));
            }
        }
    }

    /// The switch to `generation` (after a grace period where loads may be reordered), then a grace
    /// period in the background: the next update waits for it before rewriting the buffer packets
    /// read until now ([`Datapath::settle`]).
    fn switch(&mut self, generation: u32) -> Result<(), WriteError> {
        if grace::BEFORE_SWITCH {
            self.grace.wait().map_err(grace_error)?;
        }
        self.config
            .set(CONFIG_GENERATION, generation, 0)
            .map_err(|e| WriteError::new(map_names::CONFIG, e))?;
        self.mirror.generation = generation;
        self.switch_pending = false;
        self.grace_owed = true;
        self.pending_grace = Some(self.grace.start());
        Ok(())
    }

    /// Returns once no packet reads the buffer packets do not read now: the grace period started
    /// after the last switch is over (or one is waited for here, if that one failed).
    fn settle(&mut self) -> Result<(), WriteError> {
        if let Some(pending) = self.pending_grace.take()
            && pending.finish().is_ok()
        {
            self.grace_owed = false;
        }
        if self.grace_owed {
            self.grace.wait().map_err(grace_error)?;
            self.grace_owed = false;
        }
        Ok(())
    }

    /// Whether the last update is not in force yet: a write or the switch failed, and packets
    /// still read the previous policy (including allows the new one revokes).
    pub fn switch_pending(&self) -> bool {
        self.switch_pending
    }

    /// Gives the veth `ifindex` an ENDPOINTS entry in both buffers where it has none, without
    /// touching anything else: before the agent has any cluster state it may attach to a new veth
    /// (pending), but must not rewrite what a previous agent left. Returns whether it wrote one.
    pub fn add_endpoint_if_absent(
        &mut self,
        ifindex: u32,
        info: EndpointInfo,
    ) -> Result<bool, MapError> {
        let active = buffer::of(self.mirror.generation);
        let mut wrote_active = false;
        for b in [1 - active, active] {
            if self.mirror.contents[b].endpoints.contains_key(&ifindex) {
                continue;
            }
            // BPF_NOEXIST (linux/bpf.h; libc has no constant): an entry already there is kept.
            const BPF_NOEXIST: u64 = 1;
            match self.buffers[b].endpoints.insert(ifindex, info, BPF_NOEXIST) {
                Ok(()) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
                {
                    // The kernel has an entry the mirror lacks: read all of it back next time.
                    self.mirror_unknown[b] = true;
                    continue;
                }
                Err(e) => return Err(e),
            }
            self.mirror.contents[b].endpoints.insert(ifindex, info);
            wrote_active |= b == active;
        }
        Ok(wrote_active)
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

    /// The policy generation the datapath checks conntrack entries against (and whose buffer
    /// packets read), as this agent last wrote or read it.
    pub fn generation(&self) -> u32 {
        self.mirror.generation
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

    /// Entries (of the buffer packets read) and capacity of each decision map.
    pub fn usage(&self) -> Vec<MapUsage> {
        let c = self.mirror.active();
        let entries = [
            c.endpoints.len(),
            c.ipcache.len(),
            c.cidrs.len(),
            c.policy.len(),
            c.services.len(),
            c.frontends.len(),
        ];
        self.capacities
            .by_map()
            .into_iter()
            .zip(entries)
            .map(|((_, name, capacity), entries)| MapUsage {
                name,
                entries,
                capacity,
            })
            .collect()
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
        let attach_err = attach_error(hook, ifname, ifindex);
        let link_err = |source| DatapathError::Link {
            ifname: ifname.to_owned(),
            ifindex,
            source,
        };
        if let Ok(pinned) = PinnedLink::from_pin(&path) {
            return self.swap_into(pinned, ifindex, ifname, hook);
        }
        let prog = program_mut(&mut self.ebpf, program)?;
        let id = prog
            .attach_with_options(
                ifname,
                hook.tc_attach_type(),
                // First in the chain: policy decides before any other TCX program; allowed
                // packets go on to the rest (TCX_NEXT).
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .map_err(&attach_err)?;
        let link = prog.take_link(id).map_err(&attach_err)?;
        let fd_link = FdLink::try_from(link).map_err(link_err)?;
        fd_link.pin(&path).map_err(|e| DatapathError::LinkPin {
            path: path.display().to_string(),
            source: io::Error::other(e),
        })?;
        Ok(())
    }

    /// Puts this agent's program for `hook` into the `pinned` link (an atomic replace).
    fn swap_into(
        &mut self,
        pinned: PinnedLink,
        ifindex: u32,
        ifname: &str,
        hook: Hook,
    ) -> Result<(), DatapathError> {
        let attach_err = attach_error(hook, ifname, ifindex);
        let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|source| {
            DatapathError::Link {
                ifname: ifname.to_owned(),
                ifindex,
                source,
            }
        })?;
        let prog = program_mut(&mut self.ebpf, hook.program())?;
        let id = prog.attach_to_link(link).map_err(&attach_err)?;
        // The pin keeps the link; our fd can go.
        drop(prog.take_link(id).map_err(attach_err)?);
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

fn grace_error(e: io::Error) -> WriteError {
    WriteError::new("grace period (ARRAY_OF_MAPS update)", e)
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The error of attaching `hook`'s program to `ifname`/`ifindex`.
fn attach_error(hook: Hook, ifname: &str, ifindex: u32) -> impl Fn(ProgramError) -> DatapathError {
    let ifname = ifname.to_owned();
    move |source| DatapathError::Attach {
        program: hook.program(),
        ifname: ifname.clone(),
        ifindex,
        source,
    }
}

/// Whether a network device with `ifindex` exists in this network namespace.
fn device_exists(ifindex: u32) -> bool {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` has the IF_NAMESIZE bytes if_indextoname writes at most.
    !unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) }.is_null()
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
