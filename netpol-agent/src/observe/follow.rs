//! `flows --follow`: every verdict the filter asks for, as it happens. Drops and would-be drops
//! come from the drop events (one per packet, within milliseconds); allowed packets send no
//! events, so when the filter can match allowed flows the flow table is also read every
//! [`POLL`], and each allowed flow that had packets since the previous read is reported once,
//! with that interval's packets and bytes.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use netpol_common::DropEvent;
use tokio::{
    sync::broadcast,
    time::{Interval, MissedTickBehavior, interval},
};

use super::{
    ObserveMaps, clock,
    flows::{self, Filter, Flow, Matcher, RawFlow, Resolver, View, activity::AllowedActivity},
};
use crate::datapath::PinLayout;

/// How often the flow table is read for allowed flows.
pub const POLL: Duration = Duration::from_secs(1);

/// What a follow reads and how it names what it reads.
pub struct Sources<'a, R> {
    /// The drop events, from the agent's drain task or the pinned ring buffer.
    pub drops: broadcast::Receiver<DropEvent>,
    /// Where the flow table is pinned.
    pub layout: &'a PinLayout,
    /// The current names (the agent's change as it syncs).
    pub resolver: R,
    pub node: &'a str,
    /// Counts the drop events this follower was too slow to take.
    pub lost: &'a AtomicU64,
}

/// A follow under way.
pub struct Follow<'a, R> {
    sources: Sources<'a, R>,
    /// The flow table as last read, when the filter can match allowed flows.
    allowed: Option<AllowedActivity>,
    tick: Interval,
}

impl<'a, R: Fn() -> Arc<Resolver>> Follow<'a, R> {
    /// Starts following: what the flow table holds already is not new.
    pub async fn start(sources: Sources<'a, R>, filter: &Filter) -> anyhow::Result<Self> {
        let allowed = match filter.wants_allowed() {
            true => Some(AllowedActivity::new(&read_flows(sources.layout).await?)),
            false => None,
        };
        let mut tick = interval(POLL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Ok(Follow {
            sources,
            allowed,
            tick,
        })
    }

    /// The next new flows that pass `matcher` (possibly none); `None` once the events end.
    pub async fn next(&mut self, matcher: &Matcher) -> anyhow::Result<Option<Vec<Flow>>> {
        let batch = tokio::select! {
            event = self.sources.drops.recv() => match event {
                Ok(e) => vec![flows::from_event(&e)],
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    self.sources.lost.fetch_add(n, Ordering::Relaxed);
                    Vec::new()
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(None),
            },
            _ = self.tick.tick(), if self.allowed.is_some() => {
                let now = read_flows(self.sources.layout).await?;
                self.allowed.as_mut().map(|a| a.next(&now)).unwrap_or_default()
            }
        };
        Ok(Some(self.pass(&batch, matcher)))
    }

    /// The records of `batch` that pass `matcher`, resolved.
    fn pass(&self, batch: &[RawFlow], matcher: &Matcher) -> Vec<Flow> {
        if batch.is_empty() {
            return Vec::new();
        }
        let resolver = (self.sources.resolver)();
        let view = View {
            resolver: &resolver,
            clock: clock(),
            node: self.sources.node,
        };
        batch
            .iter()
            .map(|raw| (raw.last_seen_ns, flows::resolve(raw, &view)))
            .filter(|(t, f)| matcher.matches(f, view.clock.unix_ns(*t), &*resolver))
            .map(|(_, f)| f)
            .collect()
    }
}

/// Every record of the flow table, off the async threads (a full table is thousands of syscalls).
async fn read_flows(layout: &PinLayout) -> anyhow::Result<Vec<RawFlow>> {
    let layout = layout.clone();
    tokio::task::spawn_blocking(move || Ok(ObserveMaps::open(&layout)?.flows())).await?
}
