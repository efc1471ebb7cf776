//! The observability side of the datapath: reading the pinned FLOWS, DROPS, VERDICTS and LOST maps,
//! draining the EVENTS ring buffer, and what the sync loop publishes for flows and metrics
//! ([`Observer`]). Pure decoding and formatting live in [`flows`].
//!
//! Every map is opened from its pin (`<pin-dir>/maps/<NAME>`), so the same code serves the running
//! agent and `netpol-agent flows` when no agent runs.

pub mod control;
pub mod explain;
pub mod flows;
mod flows_answer;
pub mod follow;
pub mod health;
pub mod metrics;
pub mod policies;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, RwLock, atomic::AtomicU64},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use netpol_common::{
    CtKey, CtValue, DropEvent, DropKey, DropValue, FlowKey, FlowValue, LOST_SLOTS, RuleHits,
    RuleKey, VERDICT_SLOTS, map_names,
};
use prometheus_client::metrics::histogram::Histogram;
use tokio::{io::unix::AsyncFd, sync::broadcast};

use crate::{
    datapath::PinLayout,
    model::{ClusterState, PodKey},
    observe::flows::{Clock, Filter, Flow, RawFlow, Resolver},
};

pub use flows_answer::answer_flows;

/// How long the drop counters (and metric series) of a pod that is gone are kept.
pub const GONE_GRACE: Duration = Duration::from_secs(60);

/// Opens the pinned map `name` under `layout`.
fn open(layout: &PinLayout, name: &'static str) -> anyhow::Result<Map> {
    let path = layout.maps_dir().join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening the pinned map {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("map {name}"))
}

/// The observability maps, opened from their pins.
pub struct ObserveMaps {
    flows: PerCpuHashMap<MapData, FlowKey, FlowValue>,
    drops: PerCpuHashMap<MapData, DropKey, DropValue>,
    verdicts: PerCpuArray<MapData, u64>,
    lost: PerCpuArray<MapData, u64>,
    conntrack: BpfHashMap<MapData, CtKey, CtValue>,
    rule_hits: PerCpuHashMap<MapData, RuleKey, RuleHits>,
}

impl ObserveMaps {
    /// Opens the pinned maps of `layout`.
    pub fn open(layout: &PinLayout) -> anyhow::Result<Self> {
        Ok(ObserveMaps {
            flows: open(layout, map_names::FLOWS)?.try_into()?,
            drops: open(layout, map_names::DROPS)?.try_into()?,
            verdicts: open(layout, map_names::VERDICTS)?.try_into()?,
            lost: open(layout, map_names::LOST)?.try_into()?,
            conntrack: open(layout, map_names::CONNTRACK)?.try_into()?,
            rule_hits: open(layout, map_names::RULE_HITS)?.try_into()?,
        })
    }

    /// The hit counters of every rule that allowed something, summed over CPUs (the latest hit).
    pub fn rule_hits(&self) -> Vec<(RuleKey, RuleHits)> {
        self.rule_hits
            .iter()
            .filter_map(Result::ok)
            .map(|(k, per_cpu)| {
                let sum = per_cpu.iter().fold(RuleHits::default(), |a, v| a.plus(*v));
                (k, sum)
            })
            .collect()
    }

    /// Removes the hit counters of rules whose policy `known` does not know.
    pub fn remove_rule_hits(&mut self, known: impl Fn(u32) -> bool) {
        let stale: Vec<RuleKey> = self
            .rule_hits
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !known(k.policy))
            .collect();
        for k in stale {
            let _ = self.rule_hits.remove(&k);
        }
    }

    /// Every flow record, per-CPU values merged.
    pub fn flows(&self) -> Vec<RawFlow> {
        self.flows
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, v)| flows::merge(k, &v))
            .collect()
    }

    /// The drop counters, summed over CPUs.
    pub fn drops(&self) -> Vec<(DropKey, DropValue)> {
        self.drops
            .iter()
            .filter_map(Result::ok)
            .map(|(k, per_cpu)| {
                let sum = per_cpu.iter().fold(DropValue::default(), |a, v| a.plus(*v));
                (k, sum)
            })
            .collect()
    }

    fn sums(map: &PerCpuArray<MapData, u64>, len: u32) -> Vec<u64> {
        (0..len)
            .map(|i| map.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0))
            .collect()
    }

    /// VERDICTS, summed over CPUs (see `netpol_common::verdict_slot`).
    pub fn verdicts(&self) -> Vec<u64> {
        Self::sums(&self.verdicts, VERDICT_SLOTS)
    }

    /// LOST, summed over CPUs (see `netpol_common::lost`).
    pub fn lost(&self) -> Vec<u64> {
        Self::sums(&self.lost, LOST_SLOTS)
    }

    /// Entries of FLOWS, DROPS, CONNTRACK and RULE_HITS.
    pub fn entries(&self) -> [(&'static str, usize); 4] {
        [
            (map_names::FLOWS, self.flows.keys().count()),
            (map_names::DROPS, self.drops.keys().count()),
            (map_names::CONNTRACK, self.conntrack.keys().count()),
            (map_names::RULE_HITS, self.rule_hits.keys().count()),
        ]
    }

    /// Removes the drop counters of `endpoint`.
    pub fn remove_drops(&mut self, endpoint: u32) {
        let keys: Vec<DropKey> = self
            .drops
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.endpoint == endpoint)
            .collect();
        for k in keys {
            let _ = self.drops.remove(&k);
        }
    }
}

/// A CLOCK_MONOTONIC (what `bpf_ktime_get_ns` reads) and a wall-clock reading, taken together.
pub fn clock() -> Clock {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Clock {
        mono_ns: ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64,
        unix_ns: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    }
}

/// What the sync loop publishes for `flows` and the metrics, and the drop-event stream.
#[derive(Debug)]
pub struct Observer {
    layout: PinLayout,
    resolver: RwLock<Arc<Resolver>>,
    /// Every endpoint seen, with when it went away (None while it is there): metric labels for drop
    /// counters of pods that are gone, until [`GONE_GRACE`] has passed.
    names: Mutex<HashMap<u32, (PodKey, Option<Instant>)>>,
    events: broadcast::Sender<DropEvent>,
    /// Drop events a `follow` client was too slow to take.
    pub follow_lost: AtomicU64,
    /// From a change seen by the source to the datapath programmed.
    pub implementation_delay: Histogram,
}

impl Observer {
    /// An observer of the maps pinned under `layout`.
    pub fn new(layout: PinLayout) -> Arc<Self> {
        let (events, _) = broadcast::channel(4096);
        Arc::new(Observer {
            layout,
            resolver: RwLock::new(Arc::new(Resolver::default())),
            names: Mutex::new(HashMap::new()),
            events,
            follow_lost: AtomicU64::new(0),
            implementation_delay: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        })
    }

    /// The pin layout.
    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    /// Publishes the cluster state and local endpoints the datapath was just programmed with.
    pub fn publish(
        &self,
        state: &ClusterState,
        endpoints: &BTreeMap<PodKey, u32>,
        isolating: &BTreeMap<(u32, netpol_common::Direction), Vec<PodKey>>,
        default_mode: crate::model::mode::Mode,
    ) {
        let resolver = Resolver::new(state, endpoints, isolating, default_mode);
        if let Ok(mut names) = self.names.lock() {
            update_names(&mut names, resolver.endpoints(), Instant::now());
        }
        if let Ok(mut r) = self.resolver.write() {
            *r = Arc::new(resolver);
        }
    }

    /// Records that a change the source saw at `seen_at` is now in the datapath.
    pub fn programmed(&self, seen_at: Instant) {
        self.implementation_delay
            .observe(seen_at.elapsed().as_secs_f64());
    }

    /// The current resolver.
    pub fn resolver(&self) -> Arc<Resolver> {
        self.resolver.read().map(|r| r.clone()).unwrap_or_default()
    }

    /// The pod an endpoint belongs (or, within [`GONE_GRACE`], belonged) to.
    pub fn endpoint_name(&self, ifindex: u32) -> Option<PodKey> {
        let names = self.names.lock().ok()?;
        match names.get(&ifindex)? {
            (pod, None) => Some(pod.clone()),
            (pod, Some(gone)) if gone.elapsed() < GONE_GRACE => Some(pod.clone()),
            _ => None,
        }
    }

    /// A receiver of drop events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<DropEvent> {
        self.events.subscribe()
    }

    /// Removes the drop counters of endpoints gone for longer than [`GONE_GRACE`] (or never known
    /// for that long), so their metric series end and a reused ifindex starts from zero.
    fn reap(&self, maps: &mut ObserveMaps, unknown_since: &mut HashMap<u32, Instant>) {
        let resolver = self.resolver();
        if resolver.published() {
            maps.remove_rule_hits(|id| resolver.knows_policy(id));
        }
        let current = resolver.endpoints().clone();
        let mut stale: Vec<u32> = maps
            .drops()
            .into_iter()
            .map(|(k, _)| k.endpoint)
            .filter(|e| !current.contains_key(e))
            .collect();
        stale.sort_unstable();
        stale.dedup();
        unknown_since.retain(|e, _| stale.contains(e));
        for e in stale {
            let since = *unknown_since.entry(e).or_insert_with(Instant::now);
            if since.elapsed() >= GONE_GRACE && self.endpoint_name(e).is_none() {
                maps.remove_drops(e);
                unknown_since.remove(&e);
                if let Ok(mut names) = self.names.lock() {
                    names.remove(&e);
                }
            }
        }
    }
}

/// Endpoint names after a publish at `now`: current endpoints named, the others marked gone, and
/// those gone for longer than [`GONE_GRACE`] forgotten (the table follows the node's pods, not
/// every pod it ever had).
fn update_names(
    names: &mut HashMap<u32, (PodKey, Option<Instant>)>,
    current: &BTreeMap<u32, PodKey>,
    now: Instant,
) {
    names.retain(|ifindex, (_, gone)| {
        if current.contains_key(ifindex) {
            return true;
        }
        let since = *gone.get_or_insert(now);
        now.duration_since(since) < GONE_GRACE
    });
    for (ifindex, pod) in current {
        names.insert(*ifindex, (pod.clone(), None));
    }
}

/// Decodes one ring-buffer record.
pub fn decode_event(bytes: &[u8]) -> Option<DropEvent> {
    (bytes.len() >= size_of::<DropEvent>())
        // SAFETY: the datapath writes whole `DropEvent`s (plain integers); read unaligned.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DropEvent>()) })
}

/// Opens the EVENTS ring buffer for reading. Only one reader should drain it at a time.
pub fn open_events(layout: &PinLayout) -> anyhow::Result<AsyncFd<RingBuf<MapData>>> {
    let ring: RingBuf<MapData> = open(layout, map_names::EVENTS)?.try_into()?;
    // SAFETY: the ring buffer owns its map fd, which stays open and the same until it is dropped
    // together with the `AsyncFd`.
    unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the drop-event ring buffer: {e}"))
}

/// Waits for the next batch of drop events.
pub async fn next_events(ring: &mut AsyncFd<RingBuf<MapData>>) -> anyhow::Result<Vec<DropEvent>> {
    loop {
        let mut guard = ring.readable_mut().await?;
        let mut out = Vec::new();
        let inner = guard.get_inner_mut();
        while let Some(item) = inner.next() {
            out.extend(decode_event(&item));
        }
        guard.clear_ready();
        if !out.is_empty() {
            return Ok(out);
        }
    }
}

/// The agent's drain task: streams drop events to subscribers and reaps the drop counters of
/// endpoints that are gone. Runs until dropped.
pub async fn run(observer: Arc<Observer>) {
    let mut ring = match open_events(observer.layout()) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "drop events are not available");
            return;
        }
    };
    let mut reap = tokio::time::interval(Duration::from_secs(10));
    let mut unknown_since = HashMap::new();
    loop {
        tokio::select! {
            events = next_events(&mut ring) => match events {
                Ok(events) => {
                    for e in events {
                        // No subscriber is fine: events only matter to `follow`.
                        let _ = observer.events.send(e);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "reading drop events");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            _ = reap.tick() => {
                match ObserveMaps::open(observer.layout()) {
                    Ok(mut maps) => observer.reap(&mut maps, &mut unknown_since),
                    Err(e) => tracing::debug!(error = %format!("{e:#}"), "reaping drop counters"),
                }
            }
        }
    }
}

/// Client side of `flows`: the agent's flows matching `filter`.
pub async fn request_flows(
    state_dir: &std::path::Path,
    filter: &Filter,
) -> anyhow::Result<Vec<Flow>> {
    let req = format!("flows {}", serde_json::to_string(filter)?);
    request_answer(state_dir, &req, "flows").await
}

/// Sends the one-line `request` to the agent behind `state_dir` and decodes the field `key` of its
/// JSON answer (`{"<key>": ...}`, or `{"error": "..."}`).
async fn request_answer<T: serde::de::DeserializeOwned>(
    state_dir: &std::path::Path,
    request: &str,
    key: &str,
) -> anyhow::Result<T> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = connect(state_dir).await?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .await
        .with_context(|| format!("sending the {key} request"))?;
    let mut body = Vec::new();
    stream
        .read_to_end(&mut body)
        .await
        .with_context(|| format!("reading the {key} answer"))?;
    let mut answer: serde_json::Value =
        serde_json::from_slice(&body).with_context(|| format!("decoding the {key} answer"))?;
    if let Some(e) = answer.get("error").and_then(serde_json::Value::as_str) {
        anyhow::bail!("{e}");
    }
    match answer.get_mut(key).map(serde_json::Value::take) {
        Some(v) => serde_json::from_value(v).with_context(|| format!("decoding the {key} answer")),
        None => anyhow::bail!("the agent does not serve {key} (an older agent?)"),
    }
}

/// Client side of `flows --follow`: calls `each` for every new matching flow until the agent goes.
pub async fn follow_flows(
    state_dir: &std::path::Path,
    filter: &Filter,
    mut each: impl FnMut(Flow) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let stream = connect(state_dir).await?;
    let (read, mut write) = stream.into_split();
    let req = format!("follow {}\n", serde_json::to_string(filter)?);
    write.write_all(req.as_bytes()).await?;
    let mut lines = tokio::io::BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let v: serde_json::Value = serde_json::from_str(&line)?;
        if let Some(e) = v.get("error").and_then(serde_json::Value::as_str) {
            anyhow::bail!("{e}");
        }
        each(serde_json::from_value(v)?)?;
    }
    anyhow::bail!("the agent closed the stream")
}

/// Without an agent: follows the pinned EVENTS ring buffer and flow table directly (raw
/// addresses, no policy names), as node `node`.
pub async fn follow_pinned(
    layout: &PinLayout,
    node: &str,
    filter: &Filter,
    mut each: impl FnMut(Flow) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let matcher = filter.compile()?;
    let mut ring = open_events(layout)?;
    let (tx, drops) = broadcast::channel(4096);
    let drain = tokio::spawn(async move {
        while let Ok(events) = next_events(&mut ring).await {
            for e in events {
                if tx.send(e).is_err() {
                    return;
                }
            }
        }
    });
    let lost = AtomicU64::new(0);
    let sources = follow::Sources {
        drops,
        layout,
        resolver: || Arc::new(Resolver::default()),
        node,
        lost: &lost,
    };
    let result = async {
        let mut follow = follow::Follow::start(sources, filter).await?;
        while let Some(batch) = follow.next(&matcher).await? {
            batch.into_iter().try_for_each(&mut each)?;
        }
        anyhow::bail!("the drop events ended")
    }
    .await;
    drain.abort();
    result
}

/// The name of this node when no agent answers: `NODE_NAME` (the DaemonSet sets it), else the
/// node the saved cluster state was written by, else the host name.
pub fn node_name_without_agent(state_dir: &std::path::Path) -> String {
    #[derive(serde::Deserialize)]
    struct Saved {
        node: String,
    }
    let saved = || {
        let path = state_dir.join(crate::sources::persisted::FILE_NAME);
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice::<Saved>(&bytes).ok().map(|s| s.node)
    };
    let host = || std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(saved)
        .or_else(host)
        .map(|n| n.trim().to_owned())
        .unwrap_or_default()
}

async fn connect(state_dir: &std::path::Path) -> anyhow::Result<tokio::net::UnixStream> {
    let path = crate::observe::control::socket_path(state_dir);
    tokio::net::UnixStream::connect(&path)
        .await
        .with_context(|| format!("connecting to the agent at {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_gone_endpoints_are_kept_for_the_grace_then_forgotten() {
        let mut names = HashMap::new();
        let t0 = Instant::now();
        let a = PodKey::new("x", "a");
        update_names(&mut names, &BTreeMap::from([(7, a.clone())]), t0);
        assert_eq!(names[&7], (a.clone(), None));
        // Gone: still named (its last drops get labels), then forgotten.
        update_names(&mut names, &BTreeMap::new(), t0 + Duration::from_secs(1));
        assert_eq!(names[&7].1, Some(t0 + Duration::from_secs(1)));
        update_names(&mut names, &BTreeMap::new(), t0 + GONE_GRACE);
        assert!(names.contains_key(&7));
        update_names(
            &mut names,
            &BTreeMap::new(),
            t0 + GONE_GRACE + Duration::from_secs(2),
        );
        assert!(names.is_empty());
        // Churn does not grow the table: a thousand pods come and go.
        for i in 0..1000u32 {
            let now = t0 + GONE_GRACE * 2 + Duration::from_secs(u64::from(i) * 61);
            update_names(&mut names, &BTreeMap::from([(i, a.clone())]), now);
        }
        assert!(names.len() <= 2, "{}", names.len());
    }
}
