//! Allowed packets send no events (only drops and would-be drops do, through the ring buffer), so
//! `flows --follow` finds new allowed traffic by reading the flow table again and again: this is
//! the difference between two reads.

use std::collections::HashMap;

use netpol_common::{FlowKey, verdict};

use super::RawFlow;

/// Counters of a flow at the last read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    packets: u64,
    bytes: u64,
    last_seen_ns: u64,
}

/// The allowed flows that had packets since the previous read of the flow table.
#[derive(Debug, Default)]
pub struct AllowedActivity {
    seen: HashMap<FlowKey, Seen>,
}

impl AllowedActivity {
    /// Starts from the table as it is now: what it holds already is not new.
    pub fn new(now: &[RawFlow]) -> Self {
        let mut a = AllowedActivity::default();
        a.next(now);
        a
    }

    /// The allowed flows of `now` with packets since the previous read, each with the packets and
    /// bytes of that interval (all of them for a flow new to the table, or one evicted and created
    /// again), oldest first. Forgets flows the table no longer has.
    pub fn next(&mut self, now: &[RawFlow]) -> Vec<RawFlow> {
        let mut out = Vec::new();
        let mut seen = HashMap::with_capacity(now.len());
        for raw in now {
            let current = Seen {
                packets: raw.packets,
                bytes: raw.bytes,
                last_seen_ns: raw.last_seen_ns,
            };
            let before = self.seen.get(&raw.key).copied();
            seen.insert(raw.key, current);
            if raw.verdict != verdict::ALLOWED || before.is_some_and(|b| b == current) {
                continue;
            }
            out.push(interval(raw, before));
        }
        self.seen = seen;
        out.sort_by_key(|r| r.last_seen_ns);
        out
    }
}

/// `raw` with the counts since `before` (all its counts if it started again since).
fn interval(raw: &RawFlow, before: Option<Seen>) -> RawFlow {
    match before {
        Some(b) if b.packets <= raw.packets && b.last_seen_ns <= raw.last_seen_ns => RawFlow {
            packets: raw.packets - b.packets,
            bytes: raw.bytes.saturating_sub(b.bytes),
            first_seen_ns: b.last_seen_ns.max(raw.first_seen_ns),
            ..*raw
        },
        _ => *raw,
    }
}

#[cfg(test)]
mod tests {
    use netpol_common::{IpKey, Reason};

    use super::*;

    fn flow(port: u16, packets: u64, last_seen_ns: u64, verdict: u8) -> RawFlow {
        RawFlow {
            key: FlowKey {
                src: IpKey::from_v4([10, 42, 0, 1]),
                dst: IpKey::from_v4([10, 42, 0, 2]),
                src_port: port,
                dst_port: 80,
                endpoint: 7,
                protocol: netpol_common::proto::TCP,
                direction: 0,
                _pad: [0; 2],
            },
            packets,
            bytes: packets * 100,
            first_seen_ns: 1,
            last_seen_ns,
            reason: Reason::AllowedPolicy as u8,
            verdict,
            matched: 0,
            policy: 0,
        }
    }

    #[test]
    fn reports_only_what_changed_since_the_last_read_with_its_counts() {
        let allowed = verdict::ALLOWED;
        let mut a = AllowedActivity::new(&[flow(1, 5, 10, allowed)]);
        // Nothing moved: nothing new.
        assert!(a.next(&[flow(1, 5, 10, allowed)]).is_empty());
        // Flow 1 got 3 packets; flow 2 is new with 2; a drop record is left to the drop events.
        let got = a.next(&[
            flow(1, 8, 30, allowed),
            flow(2, 2, 20, allowed),
            flow(3, 9, 25, verdict::DROPPED),
        ]);
        let summary: Vec<(u16, u64, u64, u64)> = got
            .iter()
            .map(|r| (r.key.src_port, r.packets, r.bytes, r.first_seen_ns))
            .collect();
        assert_eq!(
            summary,
            vec![(2, 2, 200, 1), (1, 3, 300, 10)],
            "oldest first"
        );
        // Flow 1 evicted and created again with fewer packets: all of its new counts.
        let got = a.next(&[flow(1, 2, 50, allowed)]);
        assert_eq!((got[0].packets, got[0].last_seen_ns), (2, 50));
        // Gone flows are forgotten, so the state follows the table's size.
        a.next(&[]);
        assert!(a.seen.is_empty());
    }
}
