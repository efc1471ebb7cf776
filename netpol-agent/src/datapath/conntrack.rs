//! The agent's side of the datapath's conntrack: its timeouts, and garbage collection of the
//! entries that outlived them. The programs already ignore (and remove) an expired entry when a
//! packet of its flow comes; collection frees the entries of flows that sent nothing since.

use std::collections::BTreeMap;
use std::path::Path;

use aya::maps::{HashMap, Map, MapData, MapError};
use netpol_common::{CtKey, CtTimeouts, CtValue, CtValueV1, RuleKey, map_names};

const NS_PER_SEC: u64 = 1_000_000_000;

/// Whether the entry `value` of a flow of `key.protocol` has outlived its timeout at `now_ns`
/// (`CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`). The same rule as the datapath's.
pub fn expired(key: &CtKey, value: &CtValue, timeouts: &CtTimeouts, now_ns: u64) -> bool {
    let lifetime = timeouts.lifetime(key.protocol, value.flags) as u64 * NS_PER_SEC;
    now_ns.saturating_sub(value.last_seen_ns) > lifetime
}

/// Splits conntrack `entries` into the keys that expired at `now_ns` and the number of live entries
/// per endpoint.
pub fn sweep(
    entries: impl Iterator<Item = (CtKey, CtValue)>,
    timeouts: &CtTimeouts,
    now_ns: u64,
) -> (Vec<CtKey>, BTreeMap<u32, u64>) {
    let mut stale = Vec::new();
    let mut counts = BTreeMap::new();
    for (key, value) in entries {
        if expired(&key, &value, timeouts, now_ns) {
            stale.push(key);
        } else {
            *counts.entry(key.endpoint).or_insert(0) += 1;
        }
    }
    (stale, counts)
}

/// Copies the entries of the V1 conntrack map pinned in `maps_dir` (if there is one) into `ct`,
/// without a rule (their packets are not counted until the flow is re-checked), then unpins it:
/// connections open through an agent of the older layout keep their replies. Returns how many
/// were copied. Entries the old programs create between the copy and their replacement are not
/// copied: those flows are decided again, as new ones.
pub fn adopt_v1(
    maps_dir: &Path,
    ct: &mut HashMap<MapData, CtKey, CtValue>,
) -> Result<usize, MapError> {
    let path = maps_dir.join(map_names::CONNTRACK_V1);
    if !path.exists() {
        return Ok(0);
    }
    let old: HashMap<_, CtKey, CtValueV1> =
        HashMap::try_from(Map::LruHashMap(MapData::from_pin(&path)?))?;
    let mut copied = 0;
    for (key, v) in old.iter().filter_map(Result::ok) {
        let value = CtValue {
            generation: v.generation,
            flags: v.flags,
            last_seen_ns: v.last_seen_ns,
            rule: RuleKey::default(),
        };
        if ct.insert(key, value, 0).is_ok() {
            copied += 1;
        }
    }
    std::fs::remove_file(&path).map_err(|e| {
        MapError::SyscallError(aya::sys::SyscallError {
            call: "unlink",
            io_error: e,
        })
    })?;
    Ok(copied)
}

/// `CLOCK_MONOTONIC` now, in nanoseconds.
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * NS_PER_SEC + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use netpol_common::{ct_flags, proto};

    use super::*;

    fn entry(protocol: u8, flags: u32, last_seen_s: u64) -> (CtKey, CtValue) {
        let key = CtKey {
            protocol,
            ..CtKey::default()
        };
        let value = CtValue {
            generation: 0,
            flags,
            last_seen_ns: last_seen_s * NS_PER_SEC,
            rule: RuleKey::default(),
        };
        (key, value)
    }

    #[test]
    fn each_state_has_its_own_lifetime() {
        let t = CtTimeouts::DEFAULT;
        let now = 100_000 * NS_PER_SEC;
        let age = |protocol, flags, seconds: u64| {
            let (k, v) = entry(protocol, flags, 100_000 - seconds);
            expired(&k, &v, &t, now)
        };
        // Opening TCP: a minute.
        assert!(!age(proto::TCP, 0, 60));
        assert!(age(proto::TCP, 0, 61));
        // Established TCP: six hours.
        assert!(!age(proto::TCP, ct_flags::ESTABLISHED, 21_600));
        assert!(age(proto::TCP, ct_flags::ESTABLISHED, 21_601));
        // Closing wins over established: ten seconds.
        let closing = ct_flags::ESTABLISHED | ct_flags::CLOSING;
        assert!(!age(proto::TCP, closing, 10));
        assert!(age(proto::TCP, closing, 11));
        // Everything else: a minute, established or not.
        assert!(!age(proto::UDP, ct_flags::ESTABLISHED, 60));
        assert!(age(proto::UDP, ct_flags::ESTABLISHED, 61));
        assert!(age(proto::ICMP, 0, 61));
    }

    #[test]
    fn settable_timeouts_apply() {
        let t = CtTimeouts {
            other: 5,
            ..CtTimeouts::DEFAULT
        };
        let (k, v) = entry(proto::UDP, 0, 10);
        assert!(expired(&k, &v, &t, 16 * NS_PER_SEC));
        assert!(!expired(&k, &v, &t, 15 * NS_PER_SEC));
    }

    #[test]
    fn a_sweep_counts_the_live_entries_of_each_endpoint() {
        let now = 1_000 * NS_PER_SEC;
        let at = |endpoint, last_seen_s| {
            let (mut k, v) = entry(proto::UDP, 0, last_seen_s);
            k.endpoint = endpoint;
            k.src_port = last_seen_s as u16;
            (k, v)
        };
        let entries = [at(7, 990), at(7, 995), at(7, 100), at(8, 999)];
        let (stale, counts) = sweep(entries.into_iter(), &CtTimeouts::DEFAULT, now);
        assert_eq!(stale.len(), 1);
        assert_eq!(counts, BTreeMap::from([(7, 2), (8, 1)]));
    }

    #[test]
    fn a_clock_behind_the_entry_never_expires_it() {
        let (k, v) = entry(proto::TCP, 0, 50);
        assert!(!expired(&k, &v, &CtTimeouts::DEFAULT, NS_PER_SEC));
    }
}
