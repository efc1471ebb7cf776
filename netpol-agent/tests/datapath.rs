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
    let mut first = Datapath::open(layout.clone(), &Default::default()).expect("open");
    assert!(first.apply(&one_endpoint()).is_empty());
    let after_first = first.generation();
    assert!(after_first > 0);
    // Nothing changes: nothing to write, no bump.
    assert!(first.apply(&one_endpoint()).is_empty());
    assert_eq!(first.generation(), after_first);
    drop(first);

    let mut second = Datapath::open(layout, &Default::default()).expect("adopt");
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
    let err = match Datapath::open(layout, &Default::default()) {
        Ok(_) => panic!("an incompatible pinned map was adopted"),
        Err(e) => e,
    };
    assert!(matches!(err, DatapathError::PinnedMap(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(map_names::ENDPOINTS[0]), "{msg}");
    assert!(msg.contains("value size 8, this build expects 32"), "{msg}");
    assert!(msg.contains("netpol-agent cleanup"), "{msg}");
}

/// Creates a pinned map with bpftool.
fn bpftool_map(path: &std::path::Path, name: &str, spec: &[&str]) {
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(path)
        .args(spec)
        .args(["name", name])
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An agent of the layout before the buffers (`_V1`) left its decision maps pinned: an agent of
/// this build copies them into both buffers (the old programs and the new ones enforce the same
/// policy, before any cluster state), then unpins them; other files are left alone.
#[test]
fn the_decision_maps_of_the_unbuffered_layout_are_adopted_then_unpinned() {
    if !common::privileged("the datapath test") {
        return;
    }
    use aya::maps::{HashMap, LpmTrie, Map, MapData, lpm_trie::Key};
    use netpol_common::{IpInfo, IpKey, PolicyKey, PolicyValue};

    let dir = PinDir::new("obsolete");
    let layout = PinLayout::new(&dir.0);
    layout.prepare().expect("prepare the pin directory");
    let maps = layout.maps_dir();
    let [endpoints, ipcache, cidrs, policy, services, frontends] = map_names::OBSOLETE;
    let hash =
        |k: &'static str, v: &'static str| ["type", "hash", "key", k, "value", v, "entries", "64"];
    let lpm = |k: &'static str, v: &'static str| {
        [
            "type", "lpm_trie", "key", k, "value", v, "entries", "64", "flags", "1",
        ]
    };
    bpftool_map(&maps.join(endpoints), endpoints, &hash("4", "32"));
    bpftool_map(&maps.join(ipcache), ipcache, &hash("16", "8"));
    bpftool_map(&maps.join(cidrs), cidrs, &lpm("20", "4"));
    bpftool_map(&maps.join(policy), policy, &lpm("16", "8"));
    bpftool_map(&maps.join(services), services, &hash("24", "8"));
    bpftool_map(&maps.join(frontends), frontends, &hash("16", "4"));
    // A counter map of an older layout is unpinned, not read.
    let [verdicts_v1] = map_names::RETIRED;
    let array = [
        "type",
        "percpu_array",
        "key",
        "4",
        "value",
        "8",
        "entries",
        "16",
    ];
    bpftool_map(&maps.join(verdicts_v1), verdicts_v1, &array);
    let mut want = one_endpoint();
    let addr = IpKey::from_v4([10, 42, 0, 7]);
    let info = IpInfo {
        identity: 300,
        endpoint: 7,
    };
    want.ipcache.insert(addr, info);
    let key = PolicyKey {
        endpoint: 7,
        identity: 301,
        direction: 0,
        protocol: 6,
        port_be: 80u16.to_be_bytes(),
    };
    want.policy
        .insert((key, 96), PolicyValue { policy: 5, rule: 0 });
    let vip = IpKey::from_v4([10, 43, 0, 10]);
    want.frontends.insert((vip, 128), 1);
    let open = |name: &str| MapData::from_pin(maps.join(name)).expect("pinned");
    let mut m: HashMap<_, u32, EndpointInfo> =
        HashMap::try_from(Map::HashMap(open(endpoints))).unwrap();
    m.insert(7, want.endpoints[&7], 0).unwrap();
    let mut m: HashMap<_, IpKey, IpInfo> = HashMap::try_from(Map::HashMap(open(ipcache))).unwrap();
    m.insert(addr, info, 0).unwrap();
    let mut m: LpmTrie<_, PolicyKey, PolicyValue> =
        LpmTrie::try_from(Map::LpmTrie(open(policy))).unwrap();
    m.insert(&Key::new(96, key), PolicyValue { policy: 5, rule: 0 }, 0)
        .unwrap();
    let mut m: HashMap<_, IpKey, u32> = HashMap::try_from(Map::HashMap(open(frontends))).unwrap();
    m.insert(vip, 1, 0).unwrap();

    let mut dp = Datapath::open(layout.clone(), &Default::default()).expect("open");
    for name in map_names::OBSOLETE.into_iter().chain(map_names::RETIRED) {
        assert!(!maps.join(name).exists(), "{name} is still pinned");
    }
    assert!(maps.join(map_names::VERDICTS).exists());
    assert_eq!(
        dp.contents(),
        &want,
        "the V1 contents are what packets read"
    );
    // Both buffers hold them: an update that changes nothing switches to an identical buffer.
    assert!(dp.apply(&want).is_empty());
    assert_eq!(dp.contents(), &want);
    assert_eq!(netpol_common::buffer::of(dp.generation()), 1);
}

/// The decision maps get the sizes the flags ask for, in both buffers; a later agent asking for
/// other sizes gets maps of those sizes holding the same entries (never a map whose size the
/// compiler would not fit into).
#[test]
fn map_sizes_come_from_the_flags_and_other_sizes_are_adopted_by_copy() {
    if !common::privileged("the datapath test") {
        return;
    }
    use netpol_agent::datapath::Capacities;

    let dir = PinDir::new("sizes");
    let layout = PinLayout::new(&dir.0);
    let caps = Capacities {
        policy: 4096,
        ..Capacities::default()
    };
    let mut dp = Datapath::open(layout.clone(), &caps).expect("open");
    for name in map_names::POLICY {
        let info = aya::maps::MapInfo::from_pin(layout.maps_dir().join(name)).expect("pinned");
        assert_eq!(info.max_entries(), 4096, "{name}");
    }
    let usage = dp.usage();
    let policy = usage
        .iter()
        .find(|u| u.name == netpol_common::map_labels::POLICY)
        .unwrap();
    assert_eq!(policy.capacity, 4096);
    let contents = pinned_example();
    assert!(dp.apply(&contents).is_empty());
    let generation = dp.generation();
    drop(dp);

    // Another size for POLICY and IPCACHE: the maps are made anew with the entries copied.
    let bigger = Capacities {
        policy: 8192,
        ipcache: 2048,
        ..Capacities::default()
    };
    let dp = Datapath::open(layout.clone(), &bigger).expect("adopt with other sizes");
    assert_eq!(dp.contents(), &contents, "the entries were copied");
    assert_eq!(dp.generation(), generation);
    let maps = layout.maps_dir();
    for (names, size) in [(map_names::POLICY, 8192), (map_names::IPCACHE, 2048)] {
        for name in names {
            let info = aya::maps::MapInfo::from_pin(maps.join(name)).expect("pinned");
            assert_eq!(info.max_entries(), size, "{name}");
            assert!(
                !maps.join(format!("{name}_RESIZED")).exists(),
                "{name} left aside"
            );
        }
    }
}

/// The contents the resize tests pin: an endpoint, a peer address and an allow.
fn pinned_example() -> Contents {
    let mut contents = one_endpoint();
    contents.ipcache.insert(
        netpol_common::IpKey::from_v4([10, 42, 0, 7]),
        netpol_common::IpInfo {
            identity: 3,
            endpoint: 7,
        },
    );
    for port in [80u16, 443] {
        let key = netpol_common::PolicyKey {
            endpoint: 7,
            identity: 3,
            direction: 0,
            protocol: 6,
            port_be: port.to_be_bytes(),
        };
        contents.policy.insert((key, 96), Default::default());
    }
    contents
}

/// A size too small for what the pinned maps hold is refused before anything is swapped: the old
/// maps keep their names (and stay what the attached programs read), nothing is left aside.
#[test]
fn a_size_too_small_for_the_pinned_entries_is_refused_and_the_old_maps_stay() {
    if !common::privileged("the datapath test") {
        return;
    }
    use netpol_agent::datapath::Capacities;

    let dir = PinDir::new("toosmall");
    let layout = PinLayout::new(&dir.0);
    let small = Capacities {
        policy: 16,
        ipcache: 16,
        ..Capacities::default()
    };
    // Fill POLICY past 16 entries first.
    let mut many = pinned_example();
    for port in 1000..1020u16 {
        let key = netpol_common::PolicyKey {
            endpoint: 7,
            identity: 3,
            direction: 0,
            protocol: 17,
            port_be: port.to_be_bytes(),
        };
        many.policy.insert((key, 96), Default::default());
    }
    let mut dp = Datapath::open(layout.clone(), &Capacities::default()).expect("open");
    assert!(dp.apply(&many).is_empty());
    drop(dp);
    let err = match Datapath::open(layout.clone(), &small) {
        Ok(_) => panic!("the entries were cut to fit"),
        Err(e) => e,
    };
    assert!(matches!(err, DatapathError::Resize(_)), "{err:?}");
    assert!(err.to_string().contains("NP_POLICY"), "{err}");
    let maps = layout.maps_dir();
    for name in map_names::POLICY.into_iter().chain(map_names::IPCACHE) {
        let info = aya::maps::MapInfo::from_pin(maps.join(name)).expect("the old pin is back");
        assert_ne!(info.max_entries(), 16, "{name}");
        assert!(
            !maps.join(format!("{name}_RESIZED")).exists(),
            "{name} left aside"
        );
    }
    let dp = Datapath::open(layout, &Capacities::default()).expect("the old sizes still open");
    assert_eq!(dp.contents(), &many);
}

/// An agent stopped mid-resize leaves the old maps aside and, perhaps, a half-made new map under
/// the name. The next agent copies from the aside (what the old programs read), not the half-made
/// map, whatever size it asks for.
#[test]
fn a_resize_stopped_midway_is_finished_from_the_maps_set_aside() {
    if !common::privileged("the datapath test") {
        return;
    }
    use netpol_agent::datapath::Capacities;

    let dir = PinDir::new("midway");
    let layout = PinLayout::new(&dir.0);
    let mut dp = Datapath::open(layout.clone(), &Capacities::default()).expect("open");
    assert!(dp.apply(&pinned_example()).is_empty());
    drop(dp);
    let maps = layout.maps_dir();
    let value = size_of::<netpol_common::PolicyValue>().to_string();
    for name in map_names::POLICY {
        std::fs::rename(maps.join(name), maps.join(format!("{name}_RESIZED"))).unwrap();
        // The new map the stopped agent had made, still empty.
        bpftool_map(
            &maps.join(name),
            name,
            &[
                "type", "lpm_trie", "key", "16", "value", &value, "entries", "1024", "flags", "1",
            ],
        );
    }
    let other = Capacities {
        policy: 4096,
        ..Capacities::default()
    };
    let dp = Datapath::open(layout.clone(), &other).expect("finish the resize");
    assert_eq!(dp.contents(), &pinned_example(), "copied from the aside");
    for name in map_names::POLICY {
        let info = aya::maps::MapInfo::from_pin(maps.join(name)).expect("pinned");
        assert_eq!(info.max_entries(), 4096, "{name}");
        assert!(
            !maps.join(format!("{name}_RESIZED")).exists(),
            "{name} left aside"
        );
    }
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
    let mut dp = Datapath::open(layout.clone(), &Default::default()).expect("open");
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
        rule: Default::default(),
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

/// Connections tracked by an agent of the layout before rule counters keep their replies: the V1
/// conntrack entries are copied (without a rule) into the current map, then the V1 pin goes.
#[test]
fn the_conntrack_entries_of_the_v1_layout_are_adopted_then_unpinned() {
    if !common::privileged("the datapath test") {
        return;
    }
    use aya::maps::{HashMap, Map, MapData};
    use netpol_common::{CtKey, CtValue, CtValueV1, RuleKey, ct_flags, proto};

    let dir = PinDir::new("ctv1");
    let layout = PinLayout::new(&dir.0);
    layout.prepare().expect("prepare the pin directory");
    let maps = layout.maps_dir();
    let v1 = map_names::CONNTRACK_V1;
    let spec = [
        "type", "lru_hash", "key", "44", "value", "16", "entries", "64",
    ];
    bpftool_map(&maps.join(v1), v1, &spec);
    let mut old: HashMap<_, CtKey, CtValueV1> =
        HashMap::try_from(Map::LruHashMap(MapData::from_pin(maps.join(v1)).unwrap())).unwrap();
    let key = CtKey {
        src_port: 40000,
        dst_port: 5432,
        endpoint: 7,
        protocol: proto::TCP,
        ..CtKey::default()
    };
    let value = CtValueV1 {
        generation: 3,
        flags: ct_flags::ESTABLISHED,
        last_seen_ns: 12_345,
    };
    old.insert(key, value, 0).unwrap();
    drop(old);

    let _dp = Datapath::open(layout.clone(), &Default::default()).expect("open");
    assert!(
        !maps.join(v1).exists(),
        "the V1 conntrack map is still pinned"
    );
    let ct: HashMap<_, CtKey, CtValue> = HashMap::try_from(Map::LruHashMap(
        MapData::from_pin(maps.join(map_names::CONNTRACK)).unwrap(),
    ))
    .unwrap();
    let entries: Vec<(CtKey, CtValue)> = ct.iter().map(Result::unwrap).collect();
    let want = CtValue {
        generation: 3,
        flags: ct_flags::ESTABLISHED,
        last_seen_ns: 12_345,
        rule: RuleKey::default(),
    };
    assert_eq!(entries, [(key, want)]);
}

/// A buffer whose mirror is unknown (here: the agent found an ENDPOINTS entry there that its mirror
/// lacked) is read back whole before it is switched to: a stale allow left in a map the update has
/// nothing to write to is found and deleted, never switched live.
#[test]
fn a_buffer_the_mirror_does_not_know_is_read_back_whole_before_a_switch() {
    use aya::maps::{HashMap, LpmTrie, Map, MapData, lpm_trie::Key};
    use netpol_common::{POLICY_PREFIX_ANY_PROTOCOL, PolicyKey, PolicyValue, buffer, identity};
    if !common::privileged("the datapath test") {
        return;
    }
    let dir = PinDir::new("unknown");
    let layout = PinLayout::new(&dir.0);
    let mut dp = Datapath::open(layout.clone(), &Default::default()).expect("open");
    assert!(dp.apply(&one_endpoint()).is_empty());
    let idle = 1 - buffer::of(dp.generation());
    let maps = layout.maps_dir();
    let open = |name: &str| MapData::from_pin(maps.join(name)).expect("pinned");
    // Left in the idle buffer, unknown to the mirror: endpoint 9 and an allow-everything for 7.
    let info = EndpointInfo::new(0, [2, 0, 0, 0, 0, 9], [0; 16]);
    let mut endpoints: HashMap<_, u32, EndpointInfo> =
        HashMap::try_from(Map::HashMap(open(map_names::ENDPOINTS[idle]))).unwrap();
    endpoints.insert(9, info, 0).unwrap();
    let stale = PolicyKey {
        endpoint: 7,
        identity: identity::ANY,
        direction: 0,
        protocol: 0,
        port_be: [0, 0],
    };
    let mut policy: LpmTrie<_, PolicyKey, PolicyValue> =
        LpmTrie::try_from(Map::LpmTrie(open(map_names::POLICY[idle]))).unwrap();
    let key = Key::new(POLICY_PREFIX_ANY_PROTOCOL, stale);
    policy.insert(&key, PolicyValue::default(), 0).unwrap();
    // The agent meets endpoint 9 in the idle buffer: that buffer's mirror is no longer trusted.
    dp.add_endpoint_if_absent(9, info).expect("add endpoint 9");
    // The next policy isolates endpoint 7 (a write to ENDPOINTS only; POLICY stays empty).
    let mut desired = Contents::default();
    let isolated = netpol_common::endpoint_flags::ISOLATED_INGRESS;
    desired
        .endpoints
        .insert(7, EndpointInfo::new(isolated, [2, 0, 0, 0, 0, 7], [0; 16]));
    desired.endpoints.insert(9, info);
    let generation = dp.generation();
    let errors = dp.apply(&desired);
    assert!(!errors.is_empty(), "the stale allow must be found");
    assert_eq!(dp.generation(), generation, "and not switched to");
    assert!(dp.apply(&desired).is_empty(), "the retry deletes it");
    assert_eq!(buffer::of(dp.generation()), idle);
    assert!(
        policy.get(&key, 0).is_err(),
        "the live buffer has no stale allow"
    );
}

/// IPCACHE is read back key by key for the addresses an update wrote. An address the kernel
/// refused (the map is full) is not in the mirror: no switch, and the next update writes it again;
/// once it fits, the live buffer holds exactly what was asked, deletions included.
#[test]
fn written_addresses_are_read_back_one_by_one_and_a_refused_one_is_retried() {
    use netpol_agent::datapath::Capacities;
    use netpol_agent::datapath::pinned_read::read_live;
    use netpol_common::{IpInfo, IpKey, identity};
    if !common::privileged("the datapath test") {
        return;
    }
    let dir = PinDir::new("addresses");
    let layout = PinLayout::new(&dir.0);
    let caps = Capacities {
        ipcache: 16,
        ..Capacities::default()
    };
    let mut dp = Datapath::open(layout.clone(), &caps).expect("open");
    let with = |hosts: std::ops::Range<u8>| {
        let mut c = one_endpoint();
        for h in hosts {
            let info = IpInfo {
                identity: identity::FIRST_POD + u32::from(h),
                endpoint: 0,
            };
            c.ipcache.insert(IpKey::from_v4([10, 42, 1, h]), info);
        }
        c
    };
    assert!(dp.apply(&with(0..10)).is_empty());
    // Both buffers hold the ten (an update writes the idle one; the next, the other).
    assert!(dp.apply(&with(0..10)).is_empty());
    let generation = dp.generation();
    let errors = dp.apply(&with(3..20));
    assert!(!errors.is_empty(), "17 addresses do not fit in 16");
    assert_eq!(dp.generation(), generation, "not switched to");
    for _ in 0..2 {
        assert!(dp.apply(&with(4..20)).is_empty(), "16 fit");
    }
    let (_, live) = read_live(&layout.maps_dir()).expect("read the live buffer");
    assert_eq!(live.ipcache, with(4..20).ipcache);
}
