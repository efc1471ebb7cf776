//! The datapath's adoption of pins left by a previous agent (root only): the generation bump after
//! start-up, and the refusal of maps pinned by a build with another layout.

mod common;

use std::{ffi::CString, os::unix::ffi::OsStrExt as _, path::PathBuf, process::Command};

use netpol_agent::datapath::{Contents, Datapath, DatapathError, PinLayout};
use netpol_common::{EndpointInfo, map_names};

/// A pin directory of its own (the datapath mounts a bpffs there), unmounted and removed on drop,
/// also when the test fails.
struct PinDir(PathBuf);

impl PinDir {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("netpol-dp-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        PinDir(dir)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Ok(path) = CString::new(self.0.as_os_str().as_bytes()) {
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn one_endpoint() -> Contents {
    let mut c = Contents::default();
    c.endpoints
        .insert(7, EndpointInfo::new(0, [2, 0, 0, 0, 0, 7], [0; 16]));
    c
}

/// An agent killed between its map writes and its generation bump leaves revoked flows marked
/// current. The next agent finds nothing to write, yet must bump once, or they live forever.
#[test]
fn a_new_agent_bumps_the_generation_even_with_nothing_to_write() {
    if !common::privileged("the datapath test") {
        return;
    }
    let dir = PinDir::new("gen");
    let layout = PinLayout::new(&dir.0);
    let mut first = Datapath::open(layout.clone()).expect("open");
    assert!(first.apply(&one_endpoint()).is_empty());
    let after_first = first.generation();
    assert!(after_first > 0);
    // Nothing changes: nothing to write, no bump.
    assert!(first.apply(&one_endpoint()).is_empty());
    assert_eq!(first.generation(), after_first);
    drop(first);

    let mut second = Datapath::open(layout).expect("adopt");
    assert_eq!(
        second.contents(),
        &one_endpoint(),
        "adopted the pinned contents"
    );
    assert!(second.apply(&one_endpoint()).is_empty());
    assert_eq!(
        second.generation(),
        after_first.wrapping_add(1),
        "the adopting agent bumps once"
    );
    assert!(second.apply(&one_endpoint()).is_empty());
    assert_eq!(second.generation(), after_first.wrapping_add(1));
}

/// aya would reuse a pinned map of the same name whatever its layout; the agent refuses one that
/// does not match this build, naming the map, the difference and the way out.
#[test]
fn a_map_pinned_with_another_layout_is_refused() {
    if !common::privileged("the datapath test") {
        return;
    }
    let dir = PinDir::new("layout");
    let layout = PinLayout::new(&dir.0);
    layout.prepare().expect("prepare the pin directory");
    // The endpoints map as an older build pinned it: an 8-byte value.
    let pin = layout.maps_dir().join(map_names::ENDPOINTS[0]);
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args(["type", "hash", "key", "4", "value", "8", "entries", "1024"])
        .args(["name", map_names::ENDPOINTS[0]])
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool map create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = match Datapath::open(layout) {
        Ok(_) => panic!("an incompatible pinned map was adopted"),
        Err(e) => e,
    };
    assert!(matches!(err, DatapathError::PinnedMap(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(map_names::ENDPOINTS[0]), "{msg}");
    assert!(msg.contains("value size 8, this build expects 32"), "{msg}");
    assert!(msg.contains("netpol-agent cleanup"), "{msg}");
}

/// The maps of the layout before the buffers (`_V1`) are unpinned when an agent of this build
/// opens the pin directory (programs still attached keep them alive until replaced); other files
/// are left alone.
#[test]
fn the_pins_of_the_unbuffered_layout_are_removed() {
    if !common::privileged("the datapath test") {
        return;
    }
    let dir = PinDir::new("obsolete");
    let layout = PinLayout::new(&dir.0);
    layout.prepare().expect("prepare the pin directory");
    let old = layout.maps_dir().join("NP_POLICY_V1");
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&old)
        .args(["type", "hash", "key", "4", "value", "8", "entries", "16"])
        .args(["name", "NP_POLICY_V1"])
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut dp = Datapath::open(layout.clone()).expect("open");
    assert!(!old.exists(), "the V1 pin is still there");
    assert!(layout.maps_dir().join(map_names::POLICY[1]).exists());
    // And the buffers work: the first update goes to buffer 1 and switches to it.
    assert!(dp.apply(&one_endpoint()).is_empty());
    assert_eq!(netpol_common::buffer::of(dp.generation()), 1);
    assert_eq!(dp.contents(), &one_endpoint());
}

/// Flows that went quiet are collected by the agent: the entries past their timeout go, the live
/// ones stay.
#[test]
fn expired_conntrack_entries_are_collected() {
    if !common::privileged("the datapath test") {
        return;
    }
    use aya::maps::{HashMap, Map, MapData};
    use netpol_common::{CtKey, CtTimeouts, CtValue, proto};

    let dir = PinDir::new("ctgc");
    let layout = PinLayout::new(&dir.0);
    let mut dp = Datapath::open(layout.clone()).expect("open");
    let pinned = MapData::from_pin(layout.maps_dir().join(map_names::CONNTRACK)).expect("pin");
    let mut ct: HashMap<_, CtKey, CtValue> =
        HashMap::try_from(Map::LruHashMap(pinned)).expect("conntrack map");
    let now = netpol_agent::datapath::conntrack::monotonic_now_ns();
    let flow = |sport| CtKey {
        src_port: sport,
        dst_port: 53,
        endpoint: 7,
        protocol: proto::UDP,
        ..CtKey::default()
    };
    let seen = |ago_s: u64| CtValue {
        generation: 0,
        flags: 0,
        last_seen_ns: now.saturating_sub(ago_s * 1_000_000_000),
    };
    ct.insert(flow(1), seen(120), 0).unwrap();
    ct.insert(flow(2), seen(5), 0).unwrap();
    // The datapath's per-endpoint counts drift (lost racing increments, LRU evictions it never
    // sees); collection recounts them exactly.
    let pinned = MapData::from_pin(layout.maps_dir().join(map_names::CT_COUNT)).expect("pin");
    let mut counts: HashMap<_, u32, u64> =
        HashMap::try_from(Map::HashMap(pinned)).expect("count map");
    counts.insert(7, 40, 0).unwrap();
    counts.insert(9, 3, 0).unwrap();
    assert_eq!(dp.expire_conntrack(&CtTimeouts::DEFAULT).unwrap(), 1);
    let left: Vec<u16> = ct.keys().map(|k| k.unwrap().src_port).collect();
    assert_eq!(left, [2], "only the quiet flow goes");
    let now: Vec<(u32, u64)> = counts.iter().map(Result::unwrap).collect();
    assert_eq!(
        now,
        [(7, 1)],
        "exact counts, endpoints without entries forgotten"
    );
}
