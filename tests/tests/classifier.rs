//! The TC classifiers run with `BPF_PROG_TEST_RUN` on crafted frames: each case checks the TC
//! verdict and the COUNTERS slot of the reason; the observability maps (FLOWS, DROPS, VERDICTS,
//! LOST and the EVENTS ring buffer) are checked by the `flow_*`, `drop_*` and `event_*` tests.
//!
//! Needs root and BPF; prints `SKIP: ...` and returns otherwise. Each test loads its own copy of the
//! object with its maps pinned in a fresh bpffs, so tests are independent and may run in parallel.
//! Test runs see the skb of loopback (ifindex 1): the local pod's endpoint id is 1.

use std::{
    ffi::CString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::ffi::OsStrExt as _,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap, RingBuf, lpm_trie::Key},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use netpol_common::{
    CONFIG_EVENT_RATE, CONFIG_GENERATION, CtKey, CtValue, Direction, DropEvent, DropKey, DropValue,
    EndpointInfo, FlowKey, FlowValue, IpInfo, IpKey, LOST_SLOTS, POLICY_PREFIX_ANY_PORT,
    POLICY_PREFIX_ANY_PROTOCOL, POLICY_PREFIX_FULL, PolicyKey, PolicyMatch, PolicyValue,
    REASON_SLOTS, Reason, RuleHits, RuleKey, V4_MAPPED_PREFIX, VERDICT_SLOTS, ct_flags,
    endpoint_flags, identity, lost, map_names, program_names, proto, rule_code, tier, verdict,
    verdict_slot,
};
use netpol_tests::packets::{self, Ext, L4, Packet};

/// What a POLICY entry matches: (identity, direction, protocol, port, prefix length).
type AllowKey = (u32, Direction, u8, u16, u32);

/// What an allowed packet returns: `TCX_NEXT` (`TC_ACT_UNSPEC`, -1), so later TCX programs and
/// legacy clsact filters still run.
const TCX_NEXT: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;

/// The endpoint id the test runs see (loopback's ifindex).
const EP: u32 = 1;

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 5);
const POD_A6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x42, 0, 0, 0, 0, 5);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 42, 1, 7);
const POD_B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x42, 1, 0, 0, 0, 7);
const POD_C: Ipv4Addr = Ipv4Addr::new(10, 42, 1, 8);
const NODE: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 1);
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
const EXTERNAL_EXCEPT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 200);
/// The local pod's IPv6 link-local address (EUI-64 of [`packets::POD_MAC`]).
const POD_A_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0x0858, 0x0aff, 0xfe2a, 0x0005);
/// Another pod's MAC on the same bridge.
const OTHER_MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0x2a, 0x00, 0x09];

const ID_A: u32 = identity::FIRST_POD;
const ID_B: u32 = identity::FIRST_POD + 44;
const ID_C: u32 = identity::FIRST_POD + 45;
const ID_CIDR: u32 = identity::FIRST_CIDR;
const ID_CIDR_EXCEPT: u32 = identity::FIRST_CIDR + 1;

fn a() -> IpAddr {
    POD_A.into()
}
fn a6() -> IpAddr {
    POD_A6.into()
}
fn b() -> IpAddr {
    POD_B.into()
}
fn b6() -> IpAddr {
    POD_B6.into()
}

fn ip_key(addr: IpAddr) -> IpKey {
    match addr {
        IpAddr::V4(v4) => IpKey::from_v4(v4.octets()),
        IpAddr::V6(v6) => IpKey { addr: v6.octets() },
    }
}

/// A bpffs mounted on a fresh directory, unmounted and removed on drop.
struct Bpffs {
    dir: PathBuf,
}

impl Bpffs {
    fn mount() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "netpol-classifier-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create bpffs mount point");
        let guard = Bpffs { dir };
        let path = CString::new(guard.dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid NUL-terminated strings; a null data pointer is allowed.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                path.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mount bpffs on {}: {}",
            guard.dir.display(),
            std::io::Error::last_os_error()
        );
        guard
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if let Ok(path) = CString::new(self.dir.as_os_str().as_bytes()) {
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The loaded object with both programs, on its own maps.
struct Env {
    // Dropped before the bpffs.
    ebpf: Ebpf,
    _fs: Bpffs,
}

/// `let Some(mut env) = env!() else { return };`
macro_rules! env {
    () => {
        Env::new()
    };
}

impl Env {
    /// Loads the programs; `None` (after printing why) when this machine cannot run them.
    fn new() -> Option<Env> {
        if !netpol_tests::privileged_or_skip(
            "classifier",
            "needs root (BPF_PROG_LOAD, BPF_PROG_TEST_RUN, mount)",
        ) {
            return None;
        }
        let fs = Bpffs::mount();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&fs.dir)
            .load(netpol_agent::datapath::EBPF_OBJECT)
            .expect("load eBPF object");
        for name in [
            program_names::POD_EGRESS,
            program_names::POD_INGRESS,
            program_names::TUNNEL_EGRESS,
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("program {name} missing"))
                .try_into()
                .expect("a classifier");
            if let Err(e) = prog.load() {
                panic!("verifier rejected {name}: {e:?}");
            }
            let verified = prog
                .info()
                .ok()
                .and_then(|i| i.verified_instruction_count());
            eprintln!("{name}: verifier processed {verified:?} instructions (limit 1,000,000)");
        }
        let mut env = Env { ebpf, _fs: fs };
        env.base();
        Some(env)
    }

    /// The common cluster: local pod A (endpoint 1, not isolated), remote pods B and C, the node.
    fn base(&mut self) {
        self.endpoint(EP, 0);
        self.ip(a(), ID_A, EP);
        self.ip(a6(), ID_A, EP);
        self.ip(b(), ID_B, 0);
        self.ip(b6(), ID_B, 0);
        self.ip(POD_C.into(), ID_C, 0);
        self.ip(NODE.into(), identity::HOST, 0);
    }

    /// A hash map of both buffers, each in turn: the harness keeps them equal, so that the
    /// generation bumps of the conntrack tests switch between identical policies.
    fn both_hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        names: [&str; 2],
        mut f: impl FnMut(&mut HashMap<&mut aya::maps::MapData, K, V>),
    ) {
        for name in names {
            f(&mut HashMap::try_from(self.ebpf.map_mut(name).unwrap()).unwrap());
        }
    }

    /// An LPM trie of both buffers, each in turn (see [`Env::both_hash`]).
    fn both_trie<K: aya::Pod, V: aya::Pod>(
        &mut self,
        names: [&str; 2],
        mut f: impl FnMut(&mut LpmTrie<&mut aya::maps::MapData, K, V>),
    ) {
        for name in names {
            f(&mut LpmTrie::try_from(self.ebpf.map_mut(name).unwrap()).unwrap());
        }
    }

    fn endpoint(&mut self, ifindex: u32, flags: u32) {
        let info = EndpointInfo::new(flags, packets::POD_MAC, POD_A_LL.octets());
        self.both_hash(map_names::ENDPOINTS, |m| {
            m.insert(ifindex, info, 0).unwrap()
        });
    }

    fn isolate(&mut self, ingress: bool, egress: bool) {
        let mut flags = 0;
        if ingress {
            flags |= endpoint_flags::ISOLATED_INGRESS;
        }
        if egress {
            flags |= endpoint_flags::ISOLATED_EGRESS;
        }
        self.endpoint(EP, flags);
    }

    fn remove_endpoint(&mut self, ifindex: u32) {
        self.both_hash::<u32, EndpointInfo>(map_names::ENDPOINTS, |m| m.remove(&ifindex).unwrap());
    }

    fn ip(&mut self, addr: IpAddr, identity: u32, endpoint: u32) {
        let info = IpInfo { identity, endpoint };
        self.both_hash(map_names::IPCACHE, |m| {
            m.insert(ip_key(addr), info, 0).unwrap()
        });
    }

    /// An ipBlock prefix; `len` is the family's prefix length (IPv4 /24 is 24).
    fn cidr(&mut self, addr: IpAddr, len: u32, identity: u32) {
        let len = if addr.is_ipv4() {
            len + V4_MAPPED_PREFIX
        } else {
            len
        };
        let key = Key::new(len, ip_key(addr));
        self.both_trie(map_names::CIDRS, |m| m.insert(&key, identity, 0).unwrap());
    }

    fn policy_key(
        identity: u32,
        dir: Direction,
        protocol: u8,
        port: u16,
        prefix: u32,
    ) -> Key<PolicyKey> {
        Key::new(
            prefix,
            PolicyKey {
                endpoint: EP,
                identity,
                direction: dir as u8,
                protocol,
                port_be: port.to_be_bytes(),
            },
        )
    }

    /// Allows with rule `[0]` of policy 7 in `dir` (whose hits are counted).
    fn allow(&mut self, identity: u32, dir: Direction, protocol: u8, port: u16, prefix: u32) {
        let rule = PolicyValue {
            policy: 7,
            rule: rule_code::of(dir, 0),
        };
        self.allow_by(rule, (identity, dir, protocol, port, prefix));
    }

    /// Allows `(identity, dir, protocol, port, prefix)` with the entry value `rule`.
    fn allow_by(&mut self, rule: PolicyValue, (identity, dir, protocol, port, prefix): AllowKey) {
        let key = Self::policy_key(identity, dir, protocol, port, prefix);
        self.both_trie(map_names::POLICY, |m| m.insert(&key, rule, 0).unwrap());
    }

    /// A ClusterNetworkPolicy rule of `tier` with `action` and `rank` (its index in its direction is
    /// the rank too), as the compiler writes it (folded entries are the caller's business).
    fn tier_rule(&mut self, (t, action, rank): (u8, u8, u32), key: AllowKey) {
        let (identity, dir, protocol, port, prefix) = key;
        let data = PolicyKey {
            direction: tier::key_direction(dir, t),
            ..Self::policy_key(identity, dir, protocol, port, prefix).data()
        };
        let k = Key::new(prefix, data);
        let v = PolicyValue {
            policy: 9,
            rule: tier::pack(rank, action, rule_code::of(dir, rank)),
        };
        self.both_trie(map_names::POLICY, |m| m.insert(&k, v, 0).unwrap());
    }

    /// RULE_HITS, summed over CPUs (the latest hit).
    fn rule_hits(&self) -> Vec<(RuleKey, RuleHits)> {
        let m: PerCpuHashMap<_, RuleKey, RuleHits> =
            PerCpuHashMap::try_from(self.ebpf.map(map_names::RULE_HITS).unwrap()).unwrap();
        m.iter()
            .map(Result::unwrap)
            .map(|(k, per_cpu)| {
                let sum = per_cpu.iter().fold(RuleHits::default(), |a, v| a.plus(*v));
                (k, sum)
            })
            .collect()
    }

    fn revoke(&mut self, identity: u32, dir: Direction, protocol: u8, port: u16, prefix: u32) {
        let key = Self::policy_key(identity, dir, protocol, port, prefix);
        self.both_trie::<PolicyKey, PolicyValue>(map_names::POLICY, |m| m.remove(&key).unwrap());
    }

    /// Sets (`Some`) or removes the Service verdict at `key`.
    fn service(&mut self, key: netpol_common::SvcKey, verdict: Option<netpol_common::SvcValue>) {
        self.both_hash(netpol_common::service::MAP_NAME, |m| match verdict {
            Some(v) => m.insert(key, v, 0).unwrap(),
            None => m.remove(&key).unwrap(),
        });
    }

    /// Makes `vip` a Service frontend address.
    fn frontend(&mut self, vip: IpAddr) {
        self.frontend_range(vip, 128);
    }

    /// Makes every address of `net`/`len` (IpKey bits) judged as a Service frontend, as the agent
    /// writes frontends that do not fit one by one.
    fn frontend_range(&mut self, net: IpAddr, len: u32) {
        let key = Key::new(len, ip_key(net));
        self.both_trie(netpol_common::service::FRONTENDS_MAP_NAME, |m| {
            m.insert(&key, 1u32, 0).unwrap()
        });
    }

    fn set_generation(&mut self, generation: u32) {
        let mut m: Array<_, u32> =
            Array::try_from(self.ebpf.map_mut(map_names::CONFIG).unwrap()).unwrap();
        m.set(CONFIG_GENERATION, generation, 0).unwrap();
    }

    fn conntrack(&self) -> Vec<(CtKey, CtValue)> {
        let m: HashMap<_, CtKey, CtValue> =
            HashMap::try_from(self.ebpf.map(map_names::CONNTRACK).unwrap()).unwrap();
        m.iter().map(Result::unwrap).collect()
    }

    fn counters(&self) -> Vec<u64> {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(map_names::COUNTERS).unwrap()).unwrap();
        (0..REASON_SLOTS)
            .map(|i| m.get(&i, 0).unwrap().iter().sum())
            .collect()
    }

    fn set_event_rate(&mut self, rate: u32) {
        self.set_config(CONFIG_EVENT_RATE, rate);
    }

    fn set_config(&mut self, slot: u32, value: u32) {
        let mut m: Array<_, u32> =
            Array::try_from(self.ebpf.map_mut(map_names::CONFIG).unwrap()).unwrap();
        m.set(slot, value, 0).unwrap();
    }

    /// FLOWS with the per-CPU values merged as the agent does: counts added, the decision of the
    /// CPU that took the latest one.
    fn flows(&self) -> Vec<(FlowKey, FlowValue)> {
        let m: PerCpuHashMap<_, FlowKey, FlowValue> =
            PerCpuHashMap::try_from(self.ebpf.map(map_names::FLOWS).unwrap()).unwrap();
        m.iter()
            .map(Result::unwrap)
            .map(|(k, per_cpu)| {
                let mut merged = FlowValue::default();
                let mut decided = None::<FlowValue>;
                for v in per_cpu.iter().filter(|v| v.packets > 0) {
                    merged.packets += v.packets;
                    merged.bytes += v.bytes;
                    if decided.is_none_or(|d| v.decided_ns > d.decided_ns) {
                        decided = Some(*v);
                    }
                }
                let d = decided.unwrap_or_default();
                merged.reason = d.reason;
                merged.verdict = d.verdict;
                merged.matched = d.matched;
                merged.policy = d.policy;
                (k, merged)
            })
            .collect()
    }

    fn flow(&self, key: FlowKey) -> FlowValue {
        let flows = self.flows();
        flows
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no flow {key:?} in {flows:#?}"))
    }

    fn drops(&self) -> Vec<(DropKey, DropValue)> {
        let m: PerCpuHashMap<_, DropKey, DropValue> =
            PerCpuHashMap::try_from(self.ebpf.map(map_names::DROPS).unwrap()).unwrap();
        let mut v: Vec<_> = m
            .iter()
            .map(Result::unwrap)
            .map(|(k, per_cpu)| {
                let sum = per_cpu.iter().fold(DropValue::default(), |a, v| a.plus(*v));
                (k, sum)
            })
            .collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }

    fn per_cpu_sums(&self, name: &str, len: u32) -> Vec<u64> {
        let m: PerCpuArray<_, u64> = PerCpuArray::try_from(self.ebpf.map(name).unwrap()).unwrap();
        (0..len)
            .map(|i| m.get(&i, 0).unwrap().iter().sum())
            .collect()
    }

    fn verdicts(&self) -> Vec<u64> {
        self.per_cpu_sums(map_names::VERDICTS, VERDICT_SLOTS)
    }

    fn lost(&self) -> Vec<u64> {
        self.per_cpu_sums(map_names::LOST, LOST_SLOTS)
    }

    /// Drains the EVENTS ring buffer.
    fn events(&mut self) -> Vec<DropEvent> {
        let mut ring = RingBuf::try_from(self.ebpf.map_mut(map_names::EVENTS).unwrap()).unwrap();
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            assert_eq!(item.len(), std::mem::size_of::<DropEvent>());
            // SAFETY: the datapath writes whole `DropEvent`s; read unaligned from the ring.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<DropEvent>()) });
        }
        out
    }

    /// Runs the program of `dir` on `frame`: the TC action and the one reason counted.
    fn run(&self, dir: Direction, frame: &[u8]) -> (u32, Reason) {
        self.try_run(dir, frame)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {} bytes: {e}", frame.len()))
    }

    /// Like [`Env::run`]; `Err` when the kernel refuses to run the frame at all.
    fn try_run(
        &self,
        dir: Direction,
        frame: &[u8],
    ) -> Result<(u32, Reason), aya::programs::ProgramError> {
        let name = match dir {
            Direction::Ingress => program_names::POD_INGRESS,
            Direction::Egress => program_names::POD_EGRESS,
        };
        self.try_run_program(name, frame, None)
    }

    /// Runs the program `name` on `frame`, with `skb->mark` set to `mark` when given.
    fn try_run_program(
        &self,
        name: &str,
        frame: &[u8],
        mark: Option<u32>,
    ) -> Result<(u32, Reason), aya::programs::ProgramError> {
        let prog: &SchedClassifier = self.ebpf.program(name).unwrap().try_into().unwrap();
        // A `struct __sk_buff` with only `mark` (offset 8) set.
        let mut skb = [0u8; 192];
        let ctx_in = mark.map(|m| {
            skb[8..12].copy_from_slice(&m.to_ne_bytes());
            &skb[..]
        });
        let before = self.counters();
        let result = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in,
            ..Default::default()
        })?;
        let after = self.counters();
        let changed: Vec<(usize, u64)> = before
            .iter()
            .zip(&after)
            .enumerate()
            .filter(|(_, (b, a))| a != b)
            .map(|(i, (b, a))| (i, a - b))
            .collect();
        assert_eq!(
            changed.len(),
            1,
            "exactly one counter must move, got {changed:?}"
        );
        assert_eq!(changed[0].1, 1, "the counter must move by one");
        let reason = *Reason::ALL
            .iter()
            .find(|r| **r as usize == changed[0].0)
            .unwrap_or_else(|| panic!("counter slot {} is not a Reason", changed[0].0));
        Ok((result.return_value, reason))
    }

    /// Runs and asserts both the reason and the matching TC action.
    #[track_caller]
    fn expect(&self, dir: Direction, frame: &[u8], want: Reason) {
        check(dir, self.run(dir, frame), want);
    }

    /// [`Env::expect`] for frames that `BPF_PROG_TEST_RUN` may refuse (EINVAL) before running the
    /// program, such as IP frames shorter than the fixed IP header.
    #[track_caller]
    fn expect_unless_refused(&self, dir: Direction, frame: &[u8], want: Reason) {
        match self.try_run(dir, frame) {
            Ok(outcome) => check(dir, outcome, want),
            Err(e) => eprintln!("note: the kernel refused a {}-byte frame: {e}", frame.len()),
        }
    }
}

#[track_caller]
fn check(dir: Direction, (action, reason): (u32, Reason), want: Reason) {
    assert_eq!(reason, want, "{dir:?}: wrong reason");
    let want_action = if want.is_drop() {
        TC_ACT_SHOT
    } else {
        TCX_NEXT
    };
    assert_eq!(
        action, want_action,
        "{dir:?}: wrong TC action for {reason:?}"
    );
}

use Direction::{Egress, Ingress};

#[test]
fn programs_load_and_verify() {
    let Some(env) = env!() else { return };
    // A map per contract name exists in the object.
    let buffered = [
        map_names::ENDPOINTS,
        map_names::IPCACHE,
        map_names::CIDRS,
        map_names::POLICY,
        netpol_common::service::MAP_NAME,
        netpol_common::service::FRONTENDS_MAP_NAME,
    ];
    for name in buffered.into_iter().flatten().chain([
        map_names::CONNTRACK,
        map_names::CONFIG,
        map_names::COUNTERS,
        map_names::FLOWS,
        map_names::DROPS,
        map_names::EVENTS,
        map_names::EVENT_BUDGET,
        map_names::LOST,
        map_names::VERDICTS,
        map_names::FRAGS,
    ]) {
        assert!(env.ebpf.map(name).is_some(), "map {name} missing");
        assert!(env._fs.dir.join(name).exists(), "map {name} not pinned");
    }
    // Headroom against the verifier's 1M-instruction budget (printed with --nocapture).
    for name in [program_names::POD_EGRESS, program_names::POD_INGRESS] {
        let prog: &SchedClassifier = env.ebpf.program(name).unwrap().try_into().unwrap();
        let info = prog.info().unwrap();
        println!(
            "{name}: {} instructions verified",
            info.verified_instruction_count().unwrap_or(0)
        );
    }
}

#[test]
fn unknown_endpoint_is_dropped() {
    let Some(mut env) = env!() else { return };
    env.remove_endpoint(EP);
    let frame = Packet::tcp(b(), a(), 40000, 80).build();
    env.expect(Ingress, &frame, Reason::DroppedUnknownEndpoint);
    let frame = Packet::tcp(a(), b(), 40000, 80).build();
    env.expect(Egress, &frame, Reason::DroppedUnknownEndpoint);
    // Even ARP: an unknown veth is closed entirely.
    env.expect(
        Egress,
        &packets::arp_request(POD_A.octets(), NODE.octets()),
        Reason::DroppedUnknownEndpoint,
    );
}

#[test]
fn not_isolated_passes_and_is_not_tracked() {
    let Some(mut env) = env!() else { return };
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 40000, 80).build(),
        Reason::AllowedNotIsolated,
    );
    env.expect(
        Egress,
        &Packet::udp(a(), b(), 5353, 53).build(),
        Reason::AllowedNotIsolated,
    );
    env.expect(
        Egress,
        &Packet::tcp(a6(), b6(), 40000, 443).build(),
        Reason::AllowedNotIsolated,
    );
    // Nothing isolates either direction: tracking would only fill the shared table.
    assert_eq!(env.conntrack().len(), 0, "{:?}", env.conntrack());
    // Isolated one way: flows are tracked (replies must pass), and the same flow is established.
    env.isolate(false, true);
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 40000, 80).build(),
        Reason::AllowedNotIsolated,
    );
    assert_eq!(env.conntrack().len(), 1, "{:?}", env.conntrack());
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 40000, 80).build(),
        Reason::AllowedEstablished,
    );
}

#[test]
fn arp_passes_isolated_pod() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, true);
    let arp = packets::arp_request(POD_A.octets(), NODE.octets());
    env.expect(Egress, &arp, Reason::AllowedNotPoliced);
    env.expect(Ingress, &arp, Reason::AllowedNotPoliced);
}

#[test]
fn ingress_exact_port() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, false);
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 40000, 80).build(),
        Reason::DroppedIngressDenied,
    );
    env.allow(ID_B, Ingress, proto::TCP, 80, POLICY_PREFIX_FULL);
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 40001, 80).build(),
        Reason::AllowedPolicy,
    );
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 40002, 81).build(),
        Reason::DroppedIngressDenied,
    );
    env.expect(
        Ingress,
        &Packet::udp(b(), a(), 40003, 80).build(),
        Reason::DroppedIngressDenied,
    );
    env.expect(
        Ingress,
        &Packet::tcp(POD_C.into(), a(), 40004, 80).build(),
        Reason::DroppedIngressDenied,
    );
    // Unknown source address: no identity.
    env.expect(
        Ingress,
        &Packet::tcp(EXTERNAL.into(), a(), 40005, 80).build(),
        Reason::DroppedIngressDenied,
    );
    // A rule for the other direction does not allow this one.
    env.allow(ID_C, Egress, proto::TCP, 80, POLICY_PREFIX_FULL);
    env.expect(
        Ingress,
        &Packet::tcp(POD_C.into(), a(), 40006, 80).build(),
        Reason::DroppedIngressDenied,
    );
}

#[test]
fn ingress_port_range_any_port_any_protocol() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, false);
    // 8000-8003: 0x1f40..0x1f43, one prefix of 94 bits.
    env.allow(ID_B, Ingress, proto::TCP, 8000, POLICY_PREFIX_FULL - 2);
    for port in 8000..=8003 {
        env.expect(
            Ingress,
            &Packet::tcp(b(), a(), 41000 + port, port).build(),
            Reason::AllowedPolicy,
        );
    }
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 42000, 7999).build(),
        Reason::DroppedIngressDenied,
    );
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 42001, 8004).build(),
        Reason::DroppedIngressDenied,
    );

    // Any UDP port from C.
    env.allow(ID_C, Ingress, proto::UDP, 0, POLICY_PREFIX_ANY_PORT);
    env.expect(
        Ingress,
        &Packet::udp(POD_C.into(), a(), 1, 1).build(),
        Reason::AllowedPolicy,
    );
    env.expect(
        Ingress,
        &Packet::udp(POD_C.into(), a(), 2, 65535).build(),
        Reason::AllowedPolicy,
    );
    env.expect(
        Ingress,
        &Packet::tcp(POD_C.into(), a(), 3, 80).build(),
        Reason::DroppedIngressDenied,
    );

    // Everything from B (a rule without ports).
    env.allow(ID_B, Ingress, 0, 0, POLICY_PREFIX_ANY_PROTOCOL);
    env.expect(
        Ingress,
        &Packet::udp(b(), a(), 4, 9).build(),
        Reason::AllowedPolicy,
    );
    env.expect(
        Ingress,
        &Packet::sctp(b(), a(), 5, 9).build(),
        Reason::AllowedPolicy,
    );
    env.expect(
        Ingress,
        &Packet::new(b(), a(), L4::echo(false, true, 77)).build(),
        Reason::AllowedPolicy,
    );
    env.expect(
        Ingress,
        &Packet::new(
            b(),
            a(),
            L4::Raw {
                protocol: 47,
                payload: vec![0; 8],
            },
        )
        .build(),
        Reason::AllowedPolicy,
    );
}

#[test]
fn any_identity_rule() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, false);
    env.allow(identity::ANY, Ingress, proto::TCP, 443, POLICY_PREFIX_FULL);
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 40000, 443).build(),
        Reason::AllowedPolicy,
    );
    env.expect(
        Ingress,
        &Packet::tcp(EXTERNAL.into(), a(), 40001, 443).build(),
        Reason::AllowedPolicy,
    );
    env.expect(
        Ingress,
        &Packet::tcp(b6(), a6(), 40002, 443).build(),
        Reason::AllowedPolicy,
    );
    env.expect(
        Ingress,
        &Packet::tcp(EXTERNAL.into(), a(), 40003, 444).build(),
        Reason::DroppedIngressDenied,
    );
}

/// A rule for every pod (`namespaceSelector: {}`) is one ALL_PODS entry: it matches a peer that
/// IPCACHE knows as a pod, of either family. What a hostile pod could pass off as a pod does not
/// match: an address outside the cluster (also one with an ipBlock identity), the node, a pending
/// endpoint's address, or an address of the pod network that no pod holds.
#[test]
fn all_pods_rule_matches_pod_identities_only() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, true);
    env.cidr(EXTERNAL.into(), 24, ID_CIDR);
    let pending = Ipv4Addr::new(10, 42, 1, 50);
    env.ip(pending.into(), identity::PENDING, 0);
    env.allow(
        identity::ALL_PODS,
        Ingress,
        proto::TCP,
        80,
        POLICY_PREFIX_FULL,
    );
    env.allow(
        identity::ALL_PODS,
        Egress,
        proto::TCP,
        80,
        POLICY_PREFIX_FULL,
    );
    let cases = [
        (Ingress, b(), a(), 80, Reason::AllowedPolicy),
        (Ingress, b6(), a6(), 80, Reason::AllowedPolicy),
        (Ingress, POD_C.into(), a(), 80, Reason::AllowedPolicy),
        (Ingress, b(), a(), 81, Reason::DroppedIngressDenied),
        (
            Ingress,
            EXTERNAL.into(),
            a(),
            80,
            Reason::DroppedIngressDenied,
        ),
        (
            Ingress,
            pending.into(),
            a(),
            80,
            Reason::DroppedIngressDenied,
        ),
        (
            Ingress,
            Ipv4Addr::new(10, 42, 1, 99).into(),
            a(),
            80,
            Reason::DroppedIngressDenied,
        ),
        (Egress, a(), b(), 80, Reason::AllowedPolicy),
        (Egress, a6(), b6(), 80, Reason::AllowedPolicy),
        (
            Egress,
            a(),
            EXTERNAL.into(),
            80,
            Reason::DroppedEgressDenied,
        ),
        (Egress, a(), NODE.into(), 80, Reason::DroppedEgressDenied),
        (Egress, a(), pending.into(), 80, Reason::DroppedEgressDenied),
    ];
    for (n, (dir, src, dst, port, reason)) in cases.into_iter().enumerate() {
        let sport = 40000 + n as u16;
        env.expect(dir, &Packet::tcp(src, dst, sport, port).build(), reason);
    }
}

#[test]
fn cidr_identity_with_except() {
    let Some(mut env) = env!() else { return };
    env.isolate(false, true);
    // ipBlock 203.0.113.0/24 except 203.0.113.128/25.
    env.cidr(EXTERNAL.into(), 24, ID_CIDR);
    env.cidr(EXTERNAL_EXCEPT.into(), 25, ID_CIDR_EXCEPT);
    env.allow(ID_CIDR, Egress, proto::TCP, 443, POLICY_PREFIX_FULL);
    env.expect(
        Egress,
        &Packet::tcp(a(), EXTERNAL.into(), 40000, 443).build(),
        Reason::AllowedPolicy,
    );
    env.expect(
        Egress,
        &Packet::tcp(a(), EXTERNAL_EXCEPT.into(), 40001, 443).build(),
        Reason::DroppedEgressDenied,
    );
    env.expect(
        Egress,
        &Packet::tcp(a(), Ipv4Addr::new(203, 0, 114, 1).into(), 40002, 443).build(),
        Reason::DroppedEgressDenied,
    );
    // IPv6 prefixes too.
    let net6: IpAddr = "2001:db8:1::".parse().unwrap();
    env.cidr(net6, 48, ID_CIDR + 2);
    env.allow(ID_CIDR + 2, Egress, proto::UDP, 0, POLICY_PREFIX_ANY_PORT);
    env.expect(
        Egress,
        &Packet::udp(a6(), "2001:db8:1::53".parse().unwrap(), 5000, 53).build(),
        Reason::AllowedPolicy,
    );
    env.expect(
        Egress,
        &Packet::udp(a6(), "2001:db8:2::53".parse().unwrap(), 5000, 53).build(),
        Reason::DroppedEgressDenied,
    );
    // A pod address inside an ipBlock is matched by the pod identity first, then by the CIDR.
    env.cidr(b(), 16, ID_CIDR + 3);
    env.allow(ID_CIDR + 3, Egress, proto::TCP, 22, POLICY_PREFIX_FULL);
    env.expect(
        Egress,
        &Packet::tcp(a(), b(), 40003, 22).build(),
        Reason::AllowedPolicy,
    );
}

#[test]
fn egress_rules() {
    let Some(mut env) = env!() else { return };
    env.isolate(false, true);
    env.allow(ID_B, Egress, proto::UDP, 53, POLICY_PREFIX_FULL);
    env.expect(
        Egress,
        &Packet::udp(a(), b(), 5353, 53).build(),
        Reason::AllowedPolicy,
    );
    env.expect(
        Egress,
        &Packet::tcp(a(), b(), 5353, 53).build(),
        Reason::DroppedEgressDenied,
    );
    env.expect(
        Egress,
        &Packet::udp(a(), POD_C.into(), 5353, 53).build(),
        Reason::DroppedEgressDenied,
    );
    env.expect(
        Egress,
        &Packet::udp(a6(), b6(), 5353, 53).build(),
        Reason::AllowedPolicy,
    );
    // Ingress is not isolated: unaffected.
    env.expect(
        Ingress,
        &Packet::tcp(POD_C.into(), a(), 1234, 80).build(),
        Reason::AllowedNotIsolated,
    );
}

#[test]
fn host_always_reaches_pod() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, true);
    env.expect(
        Ingress,
        &Packet::tcp(NODE.into(), a(), 50000, 8080).build(),
        Reason::AllowedHost,
    );
    // The probe's reply leaves through the isolated egress as a reply.
    env.expect(
        Egress,
        &Packet::tcp(a(), NODE.into(), 8080, 50000).build(),
        Reason::AllowedReply,
    );
    // Host identity is no free pass for the pod's own egress.
    env.expect(
        Egress,
        &Packet::tcp(a(), NODE.into(), 50001, 10250).build(),
        Reason::DroppedEgressDenied,
    );
}

/// A pending endpoint (a veth whose pod the agent does not know): the node reaches it, its replies
/// to the node pass, everything else both ways is dropped as `pending`, including what a pod's
/// namespace-wide allow rule would let through and connections to the node itself.
#[test]
fn pending_endpoint_talks_only_to_the_node() {
    let Some(mut env) = env!() else { return };
    env.endpoint(
        EP,
        endpoint_flags::ISOLATED_INGRESS
            | endpoint_flags::ISOLATED_EGRESS
            | endpoint_flags::PENDING,
    );
    env.ip(a(), identity::PENDING, EP);
    env.expect(
        Ingress,
        &Packet::tcp(NODE.into(), a(), 50000, 8080).build(),
        Reason::AllowedHost,
    );
    env.expect(
        Egress,
        &Packet::tcp(a(), NODE.into(), 8080, 50000).build(),
        Reason::AllowedReply,
    );
    for (dir, pkt) in [
        (Egress, Packet::tcp(a(), NODE.into(), 40000, 30080).build()),
        (Egress, Packet::udp(a(), NODE.into(), 40000, 8472).build()),
        (Egress, Packet::tcp(a(), b(), 40000, 80).build()),
        (Ingress, Packet::tcp(b(), a(), 40000, 80).build()),
        (Ingress, Packet::udp(POD_C.into(), a(), 40000, 53).build()),
    ] {
        env.expect(dir, &pkt, Reason::DroppedPending);
    }
}

#[test]
fn spoofed_source_dropped_at_egress() {
    let Some(mut env) = env!() else { return };
    // Not isolated at all: anti-spoofing still applies.
    let unknown: IpAddr = Ipv4Addr::new(10, 42, 0, 99).into();
    env.expect(
        Egress,
        &Packet::tcp(unknown, b(), 1, 80).build(),
        Reason::DroppedSpoofedSource,
    );
    // Another pod's address (remote or local on another veth).
    env.expect(
        Egress,
        &Packet::tcp(b(), POD_C.into(), 1, 80).build(),
        Reason::DroppedSpoofedSource,
    );
    env.ip(Ipv4Addr::new(10, 42, 0, 6).into(), ID_C, 7);
    env.expect(
        Egress,
        &Packet::tcp(Ipv4Addr::new(10, 42, 0, 6).into(), b(), 1, 80).build(),
        Reason::DroppedSpoofedSource,
    );
    env.expect(
        Egress,
        &Packet::tcp(b6(), a6(), 1, 80).build(),
        Reason::DroppedSpoofedSource,
    );
    // Own addresses pass.
    env.expect(
        Egress,
        &Packet::tcp(a(), b(), 1, 80).build(),
        Reason::AllowedNotIsolated,
    );
    env.expect(
        Egress,
        &Packet::tcp(a6(), b6(), 1, 80).build(),
        Reason::AllowedNotIsolated,
    );
    // Ingress has no such check: any source can be delivered to the pod.
    env.expect(
        Ingress,
        &Packet::tcp(unknown, a(), 1, 80).build(),
        Reason::AllowedNotIsolated,
    );
}

#[test]
fn reply_passes_via_conntrack() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, true);
    env.allow(ID_B, Egress, proto::TCP, 5432, POLICY_PREFIX_FULL);
    // No forward packet yet: the "reply" is a new connection and denied.
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 5432, 40000).build(),
        Reason::DroppedIngressDenied,
    );
    env.expect(
        Egress,
        &Packet::tcp(a(), b(), 40000, 5432).build(),
        Reason::AllowedPolicy,
    );
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 5432, 40000).build(),
        Reason::AllowedReply,
    );
    env.expect(
        Egress,
        &Packet::tcp(a(), b(), 40000, 5432).build(),
        Reason::AllowedEstablished,
    );
    // A different port pair is not part of the flow.
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 5432, 40001).build(),
        Reason::DroppedIngressDenied,
    );
    // Nor is another protocol with the same ports.
    env.expect(
        Ingress,
        &Packet::udp(b(), a(), 5432, 40000).build(),
        Reason::DroppedIngressDenied,
    );

    // The other way round: allowed in, reply out.
    env.allow(ID_B, Ingress, proto::UDP, 53, POLICY_PREFIX_FULL);
    env.expect(
        Egress,
        &Packet::udp(a6(), b6(), 53, 3000).build(),
        Reason::DroppedEgressDenied,
    );
    env.expect(
        Ingress,
        &Packet::udp(b6(), a6(), 3000, 53).build(),
        Reason::AllowedPolicy,
    );
    env.expect(
        Egress,
        &Packet::udp(a6(), b6(), 53, 3000).build(),
        Reason::AllowedReply,
    );

    // ICMP echo: request id in src_port, reply id in dst_port.
    env.allow(ID_B, Egress, proto::ICMP, 0, POLICY_PREFIX_ANY_PORT);
    env.expect(
        Ingress,
        &Packet::new(b(), a(), L4::echo(false, false, 99)).build(),
        Reason::DroppedIngressDenied,
    );
    env.expect(
        Egress,
        &Packet::new(a(), b(), L4::echo(false, true, 99)).build(),
        Reason::AllowedPolicy,
    );
    env.expect(
        Ingress,
        &Packet::new(b(), a(), L4::echo(false, false, 99)).build(),
        Reason::AllowedReply,
    );
    env.expect(
        Ingress,
        &Packet::new(b(), a(), L4::echo(false, false, 98)).build(),
        Reason::DroppedIngressDenied,
    );
}

/// A packet reads only the buffer its generation names: what the agent writes into the other one
/// (the next policy, half-written) decides nothing until the switch, and after the switch the old
/// buffer decides nothing; a change of isolation, identity or allow takes effect at once, whole.
#[test]
fn packets_read_only_the_buffer_the_generation_names() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, false);
    let from_b = Packet::tcp(b(), a(), 40000, 80).build();
    env.expect(Ingress, &from_b, Reason::DroppedIngressDenied);
    // The next policy, in buffer 1 only: B is allowed.
    let key = Env::policy_key(ID_B, Ingress, proto::TCP, 80, POLICY_PREFIX_FULL);
    {
        let mut m: LpmTrie<_, PolicyKey, PolicyValue> =
            LpmTrie::try_from(env.ebpf.map_mut(map_names::POLICY[1]).unwrap()).unwrap();
        m.insert(&key, PolicyValue { policy: 7, rule: 0 }, 0)
            .unwrap();
    }
    env.expect(Ingress, &from_b, Reason::DroppedIngressDenied);
    env.set_generation(1);
    env.expect(Ingress, &from_b, Reason::AllowedPolicy);
    env.expect(Ingress, &from_b, Reason::AllowedEstablished);
    // Back to buffer 0 (generation 2): the allow is gone with it, established flows included.
    env.set_generation(2);
    env.expect(Ingress, &from_b, Reason::DroppedIngressDenied);
    // An endpoint that only the other buffer knows is unknown here, whatever it sends.
    {
        let mut m: HashMap<_, u32, EndpointInfo> =
            HashMap::try_from(env.ebpf.map_mut(map_names::ENDPOINTS[0]).unwrap()).unwrap();
        m.remove(&EP).unwrap();
    }
    let to_b = Packet::tcp(a(), b(), 40002, 80).build();
    env.expect(Egress, &to_b, Reason::DroppedUnknownEndpoint);
    env.set_generation(3);
    env.expect(Egress, &to_b, Reason::AllowedNotIsolated);
}

/// Every decision map is read from the packet's buffer: an identity, a prefix, a frontend and a
/// Service verdict written into buffer 1 only decide nothing at generation 0 and decide at 1.
#[test]
fn every_decision_map_is_read_from_the_packets_buffer() {
    use netpol_common::{SvcKey, SvcValue, service};

    let Some(mut env) = env!() else { return };
    env.isolate(true, true);
    // IPCACHE: B has C's identity in buffer 1, and C's identity is allowed in.
    env.allow(ID_C, Ingress, proto::TCP, 80, POLICY_PREFIX_FULL);
    {
        let mut m: HashMap<_, IpKey, IpInfo> =
            HashMap::try_from(env.ebpf.map_mut(map_names::IPCACHE[1]).unwrap()).unwrap();
        let info = IpInfo {
            identity: ID_C,
            endpoint: 0,
        };
        m.insert(ip_key(b()), info, 0).unwrap();
    }
    // CIDRS: 1.1.1.0/24 is a prefix in buffer 1 only, allowed out.
    env.allow(ID_CIDR, Egress, proto::TCP, 443, POLICY_PREFIX_FULL);
    {
        let mut m: LpmTrie<_, IpKey, u32> =
            LpmTrie::try_from(env.ebpf.map_mut(map_names::CIDRS[1]).unwrap()).unwrap();
        let key = Key::new(
            V4_MAPPED_PREFIX + 24,
            ip_key(Ipv4Addr::new(1, 1, 1, 0).into()),
        );
        m.insert(&key, ID_CIDR, 0).unwrap();
    }
    // FRONTENDS and SERVICES: two frontends everywhere allowed by a rule on port 80; in buffer 1
    // the first is a frontend without a verdict, the second one with an allow verdict.
    env.allow(identity::ANY, Egress, proto::TCP, 80, POLICY_PREFIX_FULL);
    let (vip1, vip2): (IpAddr, IpAddr) = (
        Ipv4Addr::new(10, 43, 0, 1).into(),
        Ipv4Addr::new(10, 43, 0, 2).into(),
    );
    {
        let mut m: LpmTrie<_, IpKey, u32> =
            LpmTrie::try_from(env.ebpf.map_mut(service::FRONTENDS_MAP_NAME[1]).unwrap()).unwrap();
        m.insert(&Key::new(128, ip_key(vip1)), 1, 0).unwrap();
        m.insert(&Key::new(128, ip_key(vip2)), 1, 0).unwrap();
    }
    {
        let mut m: HashMap<_, SvcKey, SvcValue> =
            HashMap::try_from(env.ebpf.map_mut(service::MAP_NAME[1]).unwrap()).unwrap();
        let key = SvcKey {
            endpoint: EP,
            vip: ip_key(vip2),
            port_be: 8080u16.to_be_bytes(),
            protocol: proto::TCP,
            _pad: 0,
        };
        let verdict = SvcValue {
            verdict: service::VERDICT_ALLOW,
            rule: 0,
            policy: 9,
        };
        m.insert(key, verdict, 0).unwrap();
    }
    let outcomes = |env: &Env, sport: u16| {
        [
            env.run(Ingress, &Packet::tcp(b(), a(), sport, 80).build())
                .1,
            env.run(
                Egress,
                &Packet::tcp(a(), Ipv4Addr::new(1, 1, 1, 1).into(), sport, 443).build(),
            )
            .1,
            env.run(Egress, &Packet::tcp(a(), vip1, sport, 80).build())
                .1,
            env.run(Egress, &Packet::tcp(a(), vip2, sport, 8080).build())
                .1,
        ]
    };
    use Reason::*;
    assert_eq!(
        outcomes(&env, 41000),
        [
            DroppedIngressDenied,
            DroppedEgressDenied,
            AllowedPolicy,
            DroppedEgressDenied
        ],
        "generation 0 reads buffer 0"
    );
    env.set_generation(1);
    assert_eq!(
        outcomes(&env, 42000),
        [
            AllowedPolicy,
            AllowedPolicy,
            DroppedEgressDenied,
            AllowedService
        ],
        "generation 1 reads buffer 1"
    );
}

#[test]
fn generation_bump_rechecks_established() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, true);
    env.allow(ID_B, Ingress, proto::TCP, 80, POLICY_PREFIX_FULL);
    env.allow(ID_C, Ingress, proto::TCP, 80, POLICY_PREFIX_FULL);
    let from_b = Packet::tcp(b(), a(), 40000, 80).build();
    let from_c = Packet::tcp(POD_C.into(), a(), 40000, 80).build();
    let reply_b = Packet::tcp(a(), b(), 80, 40000).build();
    env.expect(Ingress, &from_b, Reason::AllowedPolicy);
    env.expect(Ingress, &from_c, Reason::AllowedPolicy);
    env.expect(Ingress, &from_b, Reason::AllowedEstablished);

    // Revoked but not yet announced: the flow goes on.
    env.revoke(ID_B, Ingress, proto::TCP, 80, POLICY_PREFIX_FULL);
    env.expect(Ingress, &from_b, Reason::AllowedEstablished);

    env.set_generation(1);
    env.expect(Ingress, &from_b, Reason::DroppedIngressDenied);
    assert!(
        !env.conntrack()
            .iter()
            .any(|(k, _)| k.src == ip_key(b()).addr),
        "the revoked flow is gone from conntrack"
    );
    // Its replies no longer pass, and it does not come back.
    env.expect(Egress, &reply_b, Reason::DroppedEgressDenied);
    env.expect(Ingress, &from_b, Reason::DroppedIngressDenied);

    // A flow still allowed survives the bump and is re-stamped.
    env.expect(Ingress, &from_c, Reason::AllowedPolicy);
    env.expect(Ingress, &from_c, Reason::AllowedEstablished);
    let entry = env
        .conntrack()
        .into_iter()
        .find(|(k, _)| k.src == ip_key(POD_C.into()).addr)
        .unwrap();
    assert_eq!(entry.1.generation, 1);
    assert_eq!(entry.0.endpoint, EP);
    assert_eq!(entry.0.direction, Ingress as u8);
    assert_eq!(
        (entry.0.src_port, entry.0.dst_port, entry.0.protocol),
        (40000, 80, proto::TCP)
    );
}

/// ClusterNetworkPolicy tiers as a hostile peer meets them. Admin: rank 0 Accepts pod B on TCP 80,
/// rank 1 Denies the whole pod range (a CIDR identity, which pod C and any address a pod could
/// spoof into it fall in), rank 2 Passes everyone on UDP. NetworkPolicy isolates nothing, so a Pass
/// goes to the Baseline tier, which Denies UDP 53 to all. Another EtherType is dropped where a
/// tier has rules, a revoked Accept ends the established flow at the next generation, and the
/// decision names the rule.
#[test]
fn cluster_policy_tiers_decide_in_order() {
    let Some(mut env) = env!() else { return };
    let flags = endpoint_flags::ADMIN_INGRESS | endpoint_flags::BASELINE_INGRESS;
    env.endpoint(EP, flags);
    env.cidr(Ipv4Addr::new(10, 42, 1, 0).into(), 24, ID_CIDR);
    let accept_b = (tier::ADMIN, tier::ACCEPT, 0);
    env.tier_rule(
        accept_b,
        (ID_B, Ingress, proto::TCP, 80, POLICY_PREFIX_FULL),
    );
    let deny_range = (tier::ADMIN, tier::DENY, 1);
    env.tier_rule(
        deny_range,
        (ID_CIDR, Ingress, 0, 0, POLICY_PREFIX_ANY_PROTOCOL),
    );
    // Folded as the compiler does: B's port-80 entry already holds the Accept; B's other ports
    // fall to the CIDR Deny (rank 1) across identities.
    let pass_udp = (tier::ADMIN, tier::PASS, 2);
    env.tier_rule(
        pass_udp,
        (
            identity::ANY,
            Ingress,
            proto::UDP,
            0,
            POLICY_PREFIX_ANY_PORT,
        ),
    );
    let base_deny = (tier::BASELINE, tier::DENY, 0);
    env.tier_rule(
        base_deny,
        (identity::ANY, Ingress, proto::UDP, 53, POLICY_PREFIX_FULL),
    );
    env.ip(b(), ID_B, 0);
    env.ip(POD_C.into(), ID_C, 0);
    let cases = [
        (
            Packet::tcp(b(), a(), 40000, 80),
            Reason::AllowedClusterPolicy,
        ),
        (
            Packet::tcp(b(), a(), 40001, 81),
            Reason::DroppedClusterPolicy,
        ),
        (
            Packet::tcp(POD_C.into(), a(), 40002, 80),
            Reason::DroppedClusterPolicy,
        ),
        // An address no pod holds inside the range: still the range's Deny.
        (
            Packet::tcp(Ipv4Addr::new(10, 42, 1, 99).into(), a(), 40003, 80),
            Reason::DroppedClusterPolicy,
        ),
        // Outside the range: UDP is passed on; the baseline denies 53, not 54.
        (
            Packet::udp(EXTERNAL.into(), a(), 40004, 53),
            Reason::DroppedClusterPolicy,
        ),
        (
            Packet::udp(EXTERNAL.into(), a(), 40005, 54),
            Reason::AllowedNotIsolated,
        ),
        (
            Packet::tcp(EXTERNAL.into(), a(), 40006, 80),
            Reason::AllowedNotIsolated,
        ),
        // The node always reaches its pods.
        (
            Packet::tcp(NODE.into(), a(), 40007, 81),
            Reason::AllowedHost,
        ),
    ];
    env.ip(NODE.into(), identity::HOST, 0);
    for (pkt, reason) in cases {
        env.expect(Ingress, &pkt.build(), reason);
    }
    // Replies of the accepted flow pass; the flow is established.
    env.expect(
        Egress,
        &Packet::tcp(a(), b(), 80, 40000).build(),
        Reason::AllowedReply,
    );
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 40000, 80).build(),
        Reason::AllowedEstablished,
    );
    let mut lldp = packets::ethernet(0x88cc);
    lldp.extend_from_slice(&[0; 46]);
    env.expect(Ingress, &lldp, Reason::DroppedEtherType);
    env.expect(Egress, &lldp, Reason::AllowedNotPoliced);

    // A Deny that now comes first ends the established flow at the next generation.
    env.tier_rule(
        (tier::ADMIN, tier::DENY, 0),
        (ID_B, Ingress, proto::TCP, 80, POLICY_PREFIX_FULL),
    );
    env.set_generation(1);
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 40000, 80).build(),
        Reason::DroppedClusterPolicy,
    );
}

/// The Admin tier decides before NetworkPolicy isolation: an Accept opens what isolation denies, a
/// Deny closes what a NetworkPolicy rule allows; a Pass leaves it to NetworkPolicy, whose isolation
/// then keeps the Baseline tier out.
#[test]
fn admin_tier_comes_before_network_policy_and_baseline_after() {
    let Some(mut env) = env!() else { return };
    let flags = endpoint_flags::ISOLATED_EGRESS
        | endpoint_flags::ADMIN_EGRESS
        | endpoint_flags::BASELINE_EGRESS;
    env.endpoint(EP, flags);
    env.ip(b(), ID_B, 0);
    env.ip(POD_C.into(), ID_C, 0);
    env.allow(ID_B, Egress, proto::TCP, 443, POLICY_PREFIX_FULL);
    env.allow(ID_C, Egress, proto::TCP, 443, POLICY_PREFIX_FULL);
    env.tier_rule(
        (tier::ADMIN, tier::ACCEPT, 0),
        (ID_B, Egress, proto::TCP, 22, POLICY_PREFIX_FULL),
    );
    env.tier_rule(
        (tier::ADMIN, tier::DENY, 1),
        (ID_C, Egress, 0, 0, POLICY_PREFIX_ANY_PROTOCOL),
    );
    env.tier_rule(
        (tier::ADMIN, tier::PASS, 2),
        (identity::ALL_PODS, Egress, 0, 0, POLICY_PREFIX_ANY_PROTOCOL),
    );
    env.tier_rule(
        (tier::BASELINE, tier::ACCEPT, 0),
        (identity::ANY, Egress, 0, 0, POLICY_PREFIX_ANY_PROTOCOL),
    );
    let cases = [
        (b(), 22, Reason::AllowedClusterPolicy),
        (b(), 443, Reason::AllowedPolicy),
        (b(), 80, Reason::DroppedEgressDenied),
        (POD_C.into(), 443, Reason::DroppedClusterPolicy),
        (EXTERNAL.into(), 80, Reason::DroppedEgressDenied),
    ];
    for (n, (dst, port, reason)) in cases.into_iter().enumerate() {
        let pkt = Packet::tcp(a(), dst, 41000 + n as u16, port).build();
        env.expect(Egress, &pkt, reason);
    }
}

/// A pod with tier rules whose NetworkPolicy egress isolation is in audit mode: a packet to a
/// Service frontend without a SERVICES verdict (the tiers deny every backend) is dropped, not passed
/// as a would-be drop that nothing would judge after DNAT.
#[test]
fn audit_mode_does_not_carry_a_tier_denied_service_connection() {
    let Some(mut env) = env!() else { return };
    let vip: IpAddr = Ipv4Addr::new(10, 43, 0, 10).into();
    env.frontend(vip);
    let pkt = Packet::tcp(a(), vip, 40000, 80).build();
    let audit = endpoint_flags::ISOLATED_EGRESS | endpoint_flags::AUDIT_EGRESS;
    env.endpoint(EP, audit);
    env.expect(Egress, &pkt, Reason::AuditedEgressDenied);
    env.endpoint(EP, audit | endpoint_flags::ADMIN_EGRESS);
    let pkt = Packet::tcp(a(), vip, 40001, 80).build();
    env.expect(Egress, &pkt, Reason::DroppedEgressDenied);
}

#[test]
fn sctp_ports() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, false);
    env.allow(ID_B, Ingress, proto::SCTP, 9000, POLICY_PREFIX_FULL);
    env.expect(
        Ingress,
        &Packet::sctp(b(), a(), 1000, 9000).build(),
        Reason::AllowedPolicy,
    );
    env.expect(
        Ingress,
        &Packet::sctp(b(), a(), 1000, 9001).build(),
        Reason::DroppedIngressDenied,
    );
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 1000, 9000).build(),
        Reason::DroppedIngressDenied,
    );
    env.expect(
        Ingress,
        &Packet::sctp(b6(), a6(), 1000, 9000).build(),
        Reason::AllowedPolicy,
    );
    // An SCTP common header needs 12 bytes.
    let short = Packet::new(
        b(),
        a(),
        L4::Raw {
            protocol: proto::SCTP,
            payload: vec![0x03, 0xe8, 0x23, 0x28, 0, 0, 0, 0],
        },
    );
    env.expect(Ingress, &short.build(), Reason::DroppedMalformed);
}

#[test]
fn ipv4_options_shift_l4() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, false);
    env.allow(ID_B, Ingress, proto::TCP, 80, POLICY_PREFIX_FULL);
    // IHL 6: 4 bytes of NOPs. Reading ports at a fixed offset would see 0x0101.
    let p = Packet::tcp(b(), a(), 40000, 80).ipv4_options(&[1, 1, 1, 1]);
    assert_eq!(p.build()[14], 0x46);
    env.expect(Ingress, &p.build(), Reason::AllowedPolicy);
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 40001, 81)
            .ipv4_options(&[1, 1, 1, 1])
            .build(),
        Reason::DroppedIngressDenied,
    );
    // IHL 15: 40 bytes of options (NOPs then end of list).
    let mut opts = vec![1u8; 39];
    opts.push(0);
    let p = Packet::tcp(b(), a(), 40002, 80).ipv4_options(&opts);
    assert_eq!(p.build()[14], 0x4f);
    env.expect(Ingress, &p.build(), Reason::AllowedPolicy);
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 40003, 81).ipv4_options(&opts).build(),
        Reason::DroppedIngressDenied,
    );
}

#[test]
fn ipv6_extension_headers() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, false);
    env.allow(ID_B, Ingress, proto::TCP, 443, POLICY_PREFIX_FULL);
    let p = |dport| {
        Packet::tcp(b6(), a6(), 40000, dport)
            .ext(Ext::HopByHop)
            .ext(Ext::DestOpts)
    };
    env.expect(Ingress, &p(443).build(), Reason::AllowedPolicy);
    env.expect(Ingress, &p(444).build(), Reason::DroppedIngressDenied);
    let p = Packet::tcp(b6(), a6(), 40001, 443)
        .ext(Ext::HopByHop)
        .ext(Ext::Routing)
        .ext(Ext::DestOpts);
    env.expect(Ingress, &p.build(), Reason::AllowedPolicy);
    // Six extension headers are walked; a seventh is more than the datapath follows: fail closed.
    let mut six = Packet::tcp(b6(), a6(), 40002, 443);
    for _ in 0..6 {
        six = six.ext(Ext::DestOpts);
    }
    env.expect(Ingress, &six.clone().build(), Reason::DroppedMalformed);
    let mut five = Packet::tcp(b6(), a6(), 40003, 443);
    for _ in 0..5 {
        five = five.ext(Ext::DestOpts);
    }
    env.expect(Ingress, &five.build(), Reason::AllowedPolicy);
    // An extension header running past the payload.
    let cut = Packet::tcp(b6(), a6(), 40004, 443)
        .ext(Ext::HopByHop)
        .build();
    let mut bad = cut.clone();
    bad[14 + 40 + 1] = 200; // hdr ext len far beyond the packet
    env.expect(Ingress, &bad, Reason::DroppedMalformed);
}

#[test]
fn fragments() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, false);
    env.allow(ID_B, Ingress, proto::UDP, 53, POLICY_PREFIX_FULL);
    // First fragments carry the ports.
    let first6 = Packet::udp(b6(), a6(), 3000, 53)
        .ext(Ext::Fragment {
            offset: 0,
            more: true,
        })
        .build();
    env.expect(Ingress, &first6, Reason::AllowedPolicy);
    let first6_other = Packet::udp(b6(), a6(), 3000, 54)
        .ext(Ext::Fragment {
            offset: 0,
            more: true,
        })
        .build();
    env.expect(Ingress, &first6_other, Reason::DroppedIngressDenied);
    let first4 = Packet::udp(b(), a(), 3000, 53)
        .ipv4_fragment(0, true)
        .build();
    env.expect(Ingress, &first4, Reason::AllowedPolicy);
    let ct_before = env.conntrack().len();

    // Later fragments of those datagrams go with their first fragment ...
    let later6 = Packet::udp(b6(), a6(), 3000, 53).ext(Ext::Fragment {
        offset: 185,
        more: false,
    });
    let later4 = Packet::udp(b(), a(), 3000, 53).ipv4_fragment(185, false);
    env.expect(Ingress, &later6.build(), Reason::AllowedFragment);
    env.expect(Ingress, &later4.build(), Reason::AllowedFragment);
    // ... but not those of the denied one, nor of any other datagram (another id, or a policy
    // change since): they have no ports, so a port rule does not match them ...
    let denied6 = Packet::udp(b6(), a6(), 3000, 54)
        .ext(Ext::Fragment {
            offset: 185,
            more: false,
        })
        .ip_id(7);
    let later6 = later6.ip_id(0x99);
    let later4 = later4.ip_id(0x99);
    env.expect(Ingress, &denied6.build(), Reason::DroppedIngressDenied);
    env.expect(Ingress, &later6.build(), Reason::DroppedIngressDenied);
    env.expect(Ingress, &later4.build(), Reason::DroppedIngressDenied);
    let tracked4 = Packet::udp(b(), a(), 3000, 53).ipv4_fragment(185, false);
    env.set_generation(9);
    env.expect(Ingress, &tracked4.build(), Reason::DroppedIngressDenied);
    // ... a protocol-wide rule does, and they never create flows.
    env.allow(ID_B, Ingress, proto::UDP, 0, POLICY_PREFIX_ANY_PORT);
    let (later6, later4) = (later6.build(), later4.build());
    env.expect(Ingress, &later6, Reason::AllowedPolicy);
    env.expect(Ingress, &later4, Reason::AllowedPolicy);
    env.expect(Ingress, &later4, Reason::AllowedPolicy);
    assert_eq!(
        env.conntrack().len(),
        ct_before,
        "non-first fragments do not touch conntrack"
    );
    // A later fragment too short to hold a UDP header is still fine: it has none.
    let tiny = Packet::new(
        b(),
        a(),
        L4::Raw {
            protocol: proto::UDP,
            payload: vec![1, 2],
        },
    )
    .ipv4_fragment(3, false);
    env.expect(Ingress, &tiny.build(), Reason::AllowedPolicy);
}

#[test]
fn truncated_headers_are_malformed() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, true);
    env.allow(identity::ANY, Ingress, 0, 0, POLICY_PREFIX_ANY_PROTOCOL);
    let tcp4 = Packet::tcp(b(), a(), 40000, 80);
    env.expect(Ingress, &tcp4.build(), Reason::AllowedPolicy);
    // IPv4 header cut short. BPF_PROG_TEST_RUN itself refuses IP frames shorter than the fixed
    // header (EINVAL) on current kernels; where it runs them they must be malformed.
    for len in [15usize, 20, 26, 33] {
        env.expect_unless_refused(
            Ingress,
            &tcp4.clone().truncate(len).build(),
            Reason::DroppedMalformed,
        );
    }
    // Options announced by IHL but missing.
    env.expect(
        Ingress,
        &tcp4.clone().version_ihl(0x4f).truncate(14 + 40).build(),
        Reason::DroppedMalformed,
    );
    // IHL below 5, and a wrong version.
    env.expect(
        Ingress,
        &tcp4.clone().version_ihl(0x44).build(),
        Reason::DroppedMalformed,
    );
    env.expect(
        Ingress,
        &tcp4.clone().version_ihl(0x65).build(),
        Reason::DroppedMalformed,
    );
    // The frame shorter than the IP total length.
    env.expect(
        Ingress,
        &tcp4.clone().truncate(14 + 20 + 10).build(),
        Reason::DroppedMalformed,
    );
    // A consistent packet whose TCP header is too short.
    let short_tcp = Packet::new(
        b(),
        a(),
        L4::Raw {
            protocol: proto::TCP,
            payload: vec![0x9c, 0x40, 0, 80, 0, 0, 0, 0, 0, 0],
        },
    );
    env.expect(Ingress, &short_tcp.build(), Reason::DroppedMalformed);
    let short_udp = Packet::new(
        b(),
        a(),
        L4::Raw {
            protocol: proto::UDP,
            payload: vec![0x9c, 0x40, 0, 53],
        },
    );
    env.expect(Ingress, &short_udp.build(), Reason::DroppedMalformed);
    let short_icmp = Packet::new(
        b(),
        a(),
        L4::Raw {
            protocol: proto::ICMP,
            payload: vec![8, 0, 0, 0],
        },
    );
    env.expect(Ingress, &short_icmp.build(), Reason::DroppedMalformed);
    // IPv6 fixed header cut short, and a TCP header cut short behind it.
    let tcp6 = Packet::tcp(b6(), a6(), 40000, 80);
    env.expect(Ingress, &tcp6.build(), Reason::AllowedPolicy);
    env.expect_unless_refused(
        Ingress,
        &tcp6.clone().truncate(14 + 30).build(),
        Reason::DroppedMalformed,
    );
    env.expect(
        Ingress,
        &tcp6.clone().truncate(14 + 40 + 8).build(),
        Reason::DroppedMalformed,
    );
    let short_tcp6 = Packet::new(
        b6(),
        a6(),
        L4::Raw {
            protocol: proto::TCP,
            payload: vec![0; 12],
        },
    );
    env.expect(Ingress, &short_tcp6.build(), Reason::DroppedMalformed);
    // Ethernet header alone: no EtherType-driven parse possible beyond it.
    env.expect_unless_refused(
        Ingress,
        &packets::ethernet(packets::ETH_P_IP),
        Reason::DroppedMalformed,
    );
    // Malformed at egress too (before the anti-spoofing check can even run).
    env.expect(
        Egress,
        &Packet::tcp(a(), b(), 1, 2).truncate(14 + 20 + 19).build(),
        Reason::DroppedMalformed,
    );
}

#[test]
fn vlan_tagged_frames_are_dropped() {
    let Some(env) = env!() else { return };
    let mut frame = packets::ethernet(0x8100);
    frame.extend_from_slice(&[0, 100, 0x08, 0x00]);
    frame.extend_from_slice(&Packet::tcp(a(), b(), 1, 80).ip_bytes());
    env.expect(Egress, &frame, Reason::DroppedMalformed);
}

fn icmpv6(src: IpAddr, dst: IpAddr, kind: u8) -> Packet {
    Packet::icmp(src, dst, kind, [0; 4], vec![0; 16])
}

/// The solicited-node multicast group of `addr` (`ff02::1:ffXX:XXXX`).
fn solicited_node(addr: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = addr else { unreachable!() };
    let o = v6.octets();
    let mut g = [0u8; 16];
    g[0] = 0xff;
    g[1] = 2;
    g[11] = 1;
    g[12] = 0xff;
    g[13..].copy_from_slice(&o[13..]);
    Ipv6Addr::from(g).into()
}

fn nd(src: IpAddr, dst: IpAddr, kind: u8, target: IpAddr, ll: Option<[u8; 6]>) -> Packet {
    match target {
        IpAddr::V6(t) => packets::neighbour(src, dst, kind, t, ll),
        IpAddr::V4(_) => unreachable!(),
    }
}

/// An MLDv2 report (hop limit 1, to ff02::16) with one record per group and `sources` sources each.
fn mld2_report(src: IpAddr, groups: &[Ipv6Addr], sources: u16) -> Packet {
    let mut body = Vec::new();
    for g in groups {
        body.extend_from_slice(&[4, 0]); // CHANGE_TO_EXCLUDE_MODE, no aux data
        body.extend_from_slice(&sources.to_be_bytes());
        body.extend_from_slice(&g.octets());
        for i in 0..sources {
            body.extend_from_slice(&Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i).octets());
        }
    }
    let n = (groups.len() as u16).to_be_bytes();
    let all_mldv2_routers = "ff02::16".parse().unwrap();
    Packet::icmp(src, all_mldv2_routers, 143, [0, 0, n[0], n[1]], body)
        .ext(Ext::HopByHop)
        .hop_limit(1)
}

#[test]
fn neighbour_discovery_of_the_pod_itself_passes() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, true);
    let ll: IpAddr = POD_A_LL.into();
    let unspecified: IpAddr = Ipv6Addr::UNSPECIFIED.into();
    let all_nodes: IpAddr = "ff02::1".parse().unwrap();
    let gateway: IpAddr = "fd00:10:42::1".parse().unwrap();
    env.ip(gateway, identity::HOST, 0);
    let own = Some(packets::POD_MAC);
    let pass = |p: Packet, dir| env.expect(dir, &p.build(), Reason::AllowedNotPoliced);
    // Solicitations for the gateway, from its link-local or global address, to the target's
    // solicited-node group or to the target itself (reachability probe).
    pass(nd(ll, solicited_node(gateway), 135, gateway, own), Egress);
    pass(nd(a6(), gateway, 135, gateway, own), Egress);
    // Duplicate address detection of its own address, from ::.
    pass(
        nd(unspecified, solicited_node(a6()), 135, a6(), None),
        Egress,
    );
    // Advertisements of its own addresses, solicited or to all nodes.
    pass(nd(a6(), gateway, 136, a6(), own), Egress);
    pass(nd(ll, all_nodes, 136, ll, own), Egress);
    // A router solicitation, and MLD reports (hop limit 1, behind a hop-by-hop router alert).
    let mut source_lladdr = vec![1, 1];
    source_lladdr.extend_from_slice(&packets::POD_MAC);
    let rs =
        Packet::icmp(ll, "ff02::2".parse().unwrap(), 133, [0; 4], source_lladdr).hop_limit(255);
    pass(rs, Egress);
    for kind in [131, 132] {
        let mld = icmpv6(ll, "ff02::fb".parse().unwrap(), kind)
            .ext(Ext::HopByHop)
            .hop_limit(1);
        pass(mld, Egress);
    }
    let groups = ["ff02::fb".parse().unwrap(), "ff05::1:3".parse().unwrap()];
    pass(mld2_report(ll, &groups, 0), Egress);
    pass(mld2_report(unspecified, &groups[..1], 0), Egress);
    // Delivered to the pod: the node's solicitations for its addresses, advertisements, queries.
    pass(nd(gateway, solicited_node(a6()), 135, a6(), None), Ingress);
    pass(nd(gateway, ll, 135, ll, None), Ingress);
    pass(nd(gateway, a6(), 136, gateway, None), Ingress);
    let query = icmpv6("fe80::1".parse().unwrap(), all_nodes, 130).hop_limit(1);
    pass(query, Ingress);
    // The link's multicast chatter the bridge floods to every port: neighbours' and the node's
    // MLD reports, router solicitations.
    let other_ll: IpAddr = "fe80::858:aff:fe2a:9".parse().unwrap();
    pass(mld2_report(other_ll, &groups, 0), Ingress);
    pass(
        icmpv6(other_ll, "ff02::2".parse().unwrap(), 133).hop_limit(255),
        Ingress,
    );
    // Other ICMPv6 is policed: an echo request from the isolated pod, link-local source -> spoofed.
    env.expect(
        Egress,
        &Packet::new(ll, b6(), L4::echo(true, true, 1)).build(),
        Reason::DroppedSpoofedSource,
    );
    env.expect(
        Egress,
        &Packet::new(a6(), b6(), L4::echo(true, true, 1)).build(),
        Reason::DroppedEgressDenied,
    );
    // ND types in ICMP (v4) mean nothing.
    let fake = Packet::new(
        b(),
        a(),
        L4::Icmp {
            kind: 135,
            code: 0,
            rest: [0; 4],
            body: vec![],
        },
    );
    env.expect(Ingress, &fake.build(), Reason::DroppedIngressDenied);
}

/// A hostile pod's neighbour discovery: impersonating another pod or the gateway, acting as a
/// router or querier, or using ND/MLD as a channel past policy (data in options, sources, extra
/// bytes, off-link destinations). None of it is isolated traffic: these checks hold for a pod that
/// no policy selects, too.
#[test]
fn neighbour_discovery_cannot_impersonate_or_carry_data() {
    let Some(mut env) = env!() else { return };
    let gateway: IpAddr = "fd00:10:42::1".parse().unwrap();
    env.ip(gateway, identity::HOST, 0);
    let ll: IpAddr = POD_A_LL.into();
    let unspecified: IpAddr = Ipv6Addr::UNSPECIFIED.into();
    let all_nodes: IpAddr = "ff02::1".parse().unwrap();
    let outside: IpAddr = "2001:db8::99".parse().unwrap();
    let other_ll: IpAddr = "fe80::858:aff:fe2a:9".parse().unwrap();
    let own = Some(packets::POD_MAC);
    let sn = solicited_node;
    let spoofed = |p: Packet| env.expect(Egress, &p.build(), Reason::DroppedSpoofedLink);
    // Advertising another pod's address (cache poisoning), with its own or another MAC.
    spoofed(nd(a6(), all_nodes, 136, b6(), own));
    spoofed(nd(ll, all_nodes, 136, other_ll, own));
    // Advertising its own address with another pod's MAC in the target link-layer option.
    spoofed(nd(a6(), all_nodes, 136, a6(), Some(OTHER_MAC)));
    // Soliciting with another MAC in the source link-layer option, or from another's address.
    spoofed(nd(ll, sn(gateway), 135, gateway, Some(OTHER_MAC)));
    spoofed(nd(b6(), sn(gateway), 135, gateway, own));
    spoofed(nd(other_ll, sn(gateway), 135, gateway, own));
    // DAD probes for someone else's address (to make their DAD fail).
    spoofed(nd(unspecified, sn(b6()), 135, b6(), None));
    // Hop limit other than 255: forged or forwarded.
    spoofed(nd(ll, sn(gateway), 135, gateway, own).hop_limit(64));
    // ND-typed packets to an address off the link: the node would forward them (exfiltration).
    spoofed(nd(a6(), outside, 135, outside, own));
    spoofed(nd(a6(), outside, 136, a6(), own));
    // A solicitation to a group that is not its target's.
    spoofed(nd(ll, sn(b6()), 135, gateway, own));
    // Data in ND: an unknown option, a nonce outside DAD, bytes after the options.
    let mut carrier = nd(ll, sn(gateway), 135, gateway, own);
    if let L4::Icmp { body, .. } = &mut carrier.l4 {
        body.extend_from_slice(&[200, 1, b's', b'e', b'c', b'r', b'e', b't']);
    }
    spoofed(carrier.clone());
    if let L4::Icmp { body, .. } = &mut carrier.l4 {
        body.truncate(24);
        body.extend_from_slice(&[14, 1, 1, 2, 3, 4, 5, 6]);
    }
    spoofed(carrier.clone());
    if let L4::Icmp { body, .. } = &mut carrier.l4 {
        body.truncate(24);
        body.extend_from_slice(b"trailing");
    }
    spoofed(carrier);
    // Data in MLD: sources in a report, bytes after a v1 report, a query from a pod.
    let group: Ipv6Addr = "ff02::fb".parse().unwrap();
    spoofed(mld2_report(ll, &[group], 3));
    let mut long = icmpv6(ll, "ff02::fb".parse().unwrap(), 131).hop_limit(1);
    if let L4::Icmp { body, .. } = &mut long.l4 {
        body.extend_from_slice(&[0xab; 64]);
    }
    spoofed(long);
    spoofed(icmpv6(ll, all_nodes, 130).hop_limit(1));
    // MLD that could be forwarded, or from another address.
    spoofed(icmpv6(ll, "ff0e::1".parse().unwrap(), 131).hop_limit(64));
    spoofed(icmpv6(a6(), "ff02::fb".parse().unwrap(), 131).hop_limit(1));
    // A pod is not a router: Router Advertisements and Redirects are dropped, from any source.
    spoofed(icmpv6(ll, all_nodes, 134).hop_limit(255));
    spoofed(icmpv6(a6(), b6(), 137).hop_limit(255));
    // A frame from another MAC is dropped whatever it carries.
    let other = Packet::tcp(a(), b(), 40000, 80).src_mac(OTHER_MAC);
    env.expect(Egress, &other.build(), Reason::DroppedSpoofedLink);
    // Delivered to the pod: forwarded ND or MLD, unicast ND to another address (handed over by MAC:
    // a channel between pods), a unicast solicitation about someone else.
    let to_pod = |p: Packet| env.expect(Ingress, &p.build(), Reason::DroppedSpoofedLink);
    to_pod(nd(b6(), a6(), 136, b6(), None).hop_limit(64));
    to_pod(nd(b6(), outside, 135, outside, None));
    to_pod(nd(b6(), other_ll, 136, b6(), None));
    to_pod(nd(
        b6(),
        "fe80::dead:beef".parse().unwrap(),
        135,
        "fe80::dead:beef".parse().unwrap(),
        None,
    ));
    to_pod(nd(b6(), a6(), 135, b6(), None));
    to_pod(mld2_report(other_ll, &[group], 0).hop_limit(2));
    to_pod(icmpv6(other_ll, "ff02::2".parse().unwrap(), 133).hop_limit(64));
    // The link's flooded chatter about others passes (the pod's stack ignores it).
    let chatter = |p: Packet| env.expect(Ingress, &p.build(), Reason::AllowedNotPoliced);
    chatter(nd(b6(), sn(b6()), 135, b6(), None));
    chatter(nd(other_ll, sn(gateway), 135, gateway, None));
}

#[test]
fn arp_only_for_the_pod_itself() {
    let Some(env) = env!() else { return };
    let mac = packets::POD_MAC;
    let arp = |frame_src, sender_mac, sender: Ipv4Addr| {
        packets::arp(frame_src, sender_mac, sender.octets(), NODE.octets())
    };
    env.expect(Egress, &arp(mac, mac, POD_A), Reason::AllowedNotPoliced);
    // An RFC 5227 probe (sender 0.0.0.0) teaches nobody anything.
    env.expect(
        Egress,
        &arp(mac, mac, Ipv4Addr::UNSPECIFIED),
        Reason::AllowedNotPoliced,
    );
    // Claiming another pod's address or the gateway's (ARP spoofing), or another MAC.
    env.expect(Egress, &arp(mac, mac, POD_C), Reason::DroppedSpoofedLink);
    env.expect(Egress, &arp(mac, mac, NODE), Reason::DroppedSpoofedLink);
    env.expect(
        Egress,
        &arp(mac, OTHER_MAC, POD_A),
        Reason::DroppedSpoofedLink,
    );
    env.expect(
        Egress,
        &arp(OTHER_MAC, OTHER_MAC, POD_A),
        Reason::DroppedSpoofedLink,
    );
    // What the node asks the pod passes.
    env.expect(
        Ingress,
        &arp(OTHER_MAC, OTHER_MAC, NODE),
        Reason::AllowedNotPoliced,
    );
}

#[test]
fn other_ethertypes_reach_only_pods_not_isolated_that_way() {
    let Some(mut env) = env!() else { return };
    let mut lldp = packets::ethernet(0x88cc);
    lldp.extend_from_slice(&[0; 46]);
    env.expect(Egress, &lldp, Reason::AllowedNotPoliced);
    env.expect(Ingress, &lldp, Reason::AllowedNotPoliced);
    env.isolate(false, true);
    env.expect(Egress, &lldp, Reason::DroppedEtherType);
    env.expect(Ingress, &lldp, Reason::AllowedNotPoliced);
    env.isolate(true, false);
    env.expect(Egress, &lldp, Reason::AllowedNotPoliced);
    env.expect(Ingress, &lldp, Reason::DroppedEtherType);
}

#[test]
fn unicast_for_another_address_is_not_delivered() {
    let Some(env) = env!() else { return };
    // A poisoned neighbour entry or bridge FDB hands the pod another pod's traffic.
    let for_c = Packet::tcp(b(), POD_C.into(), 40000, 80);
    env.expect(Ingress, &for_c.build(), Reason::DroppedNotForPod);
    let unknown = Packet::udp(b(), EXTERNAL.into(), 5000, 53);
    env.expect(Ingress, &unknown.build(), Reason::DroppedNotForPod);
    let for_b6 = Packet::tcp(b6(), b6(), 40000, 80);
    env.expect(Ingress, &for_b6.build(), Reason::DroppedNotForPod);
    // Broadcast and multicast are for whoever listens: policed as usual.
    let broadcast = Packet::udp(b(), Ipv4Addr::BROADCAST.into(), 68, 67);
    env.expect(Ingress, &broadcast.build(), Reason::AllowedNotIsolated);
    let mdns = Packet::udp(b(), Ipv4Addr::new(224, 0, 0, 251).into(), 5353, 5353);
    env.expect(Ingress, &mdns.build(), Reason::AllowedNotIsolated);
    let mdns6 = Packet::udp(b6(), "ff02::fb".parse().unwrap(), 5353, 5353);
    env.expect(Ingress, &mdns6.build(), Reason::AllowedNotIsolated);
}

#[test]
fn icmp_errors_about_known_flows() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, true);
    env.allow(ID_B, Egress, proto::UDP, 53, POLICY_PREFIX_FULL);
    let query = Packet::udp(a(), b(), 5000, 53);
    env.expect(Egress, &query.build(), Reason::AllowedPolicy);
    // Port unreachable from B quoting the query: a reply.
    let unreachable = Packet::new(b(), a(), L4::icmp_error(3, 3, query.ip_bytes()));
    env.expect(Ingress, &unreachable.build(), Reason::AllowedReply);
    // From a router (another address) too.
    let router: IpAddr = Ipv4Addr::new(10, 42, 1, 0).into();
    let ttl = Packet::new(router, a(), L4::icmp_error(11, 0, query.ip_bytes()));
    env.expect(Ingress, &ttl.build(), Reason::AllowedReply);
    // About a flow nobody allowed: policed like any packet (and denied).
    let other = Packet::udp(a(), b(), 5001, 53);
    let unknown = Packet::new(b(), a(), L4::icmp_error(3, 3, other.ip_bytes()));
    env.expect(Ingress, &unknown.build(), Reason::DroppedIngressDenied);
    // Quoted packet truncated to less than the L4 ports: not a reply.
    let mut cut = query.ip_bytes();
    cut.truncate(22);
    env.expect(
        Ingress,
        &Packet::new(b(), a(), L4::icmp_error(3, 3, cut)).build(),
        Reason::DroppedIngressDenied,
    );

    // An error that is not a reply but is allowed by policy is tracked as itself (outer
    // addresses, ICMP), not as the flow it quotes, even when the quote is unusable.
    env.allow(ID_C, Ingress, proto::ICMP, 0, POLICY_PREFIX_ANY_PORT);
    let mut cut = other.ip_bytes();
    cut.truncate(22);
    let from_c = Packet::new(POD_C.into(), a(), L4::icmp_error(3, 3, cut));
    env.expect(Ingress, &from_c.build(), Reason::AllowedPolicy);
    let from_c = Packet::new(POD_C.into(), a(), L4::icmp_error(3, 3, other.ip_bytes()));
    env.expect(Ingress, &from_c.build(), Reason::AllowedEstablished);
    let tracked: Vec<CtKey> = env.conntrack().into_iter().map(|(k, _)| k).collect();
    assert!(tracked.iter().any(|k| k.src == ip_key(POD_C.into()).addr
        && k.dst == ip_key(a()).addr
        && k.protocol == proto::ICMP
        && k.direction == Ingress as u8));
    assert!(
        !tracked
            .iter()
            .any(|k| k.protocol == proto::UDP && k.src_port == 5001),
        "the quoted flow must not be tracked: {tracked:?}"
    );

    // The pod sending an error about a flow allowed in: a reply too.
    env.allow(ID_B, Ingress, proto::UDP, 9999, POLICY_PREFIX_FULL);
    let inbound = Packet::udp(b(), a(), 6000, 9999);
    env.expect(Ingress, &inbound.build(), Reason::AllowedPolicy);
    let err = Packet::new(a(), b(), L4::icmp_error(3, 3, inbound.ip_bytes()));
    env.expect(Egress, &err.build(), Reason::AllowedReply);
    // ... but a spoofed error is still spoofed.
    let spoofed = Packet::new(POD_C.into(), b(), L4::icmp_error(3, 3, inbound.ip_bytes()));
    env.expect(Egress, &spoofed.build(), Reason::DroppedSpoofedSource);

    // ICMPv6 packet too big about an allowed TCP flow, quoting an ICMP echo flow as well.
    env.allow(ID_B, Egress, proto::TCP, 443, POLICY_PREFIX_FULL);
    let tls = Packet::tcp(a6(), b6(), 40000, 443);
    env.expect(Egress, &tls.build(), Reason::AllowedPolicy);
    let ptb = Packet::new(b6(), a6(), L4::icmp_error(2, 0, tls.ip_bytes()));
    env.expect(Ingress, &ptb.build(), Reason::AllowedReply);
    let unrelated = Packet::tcp(a6(), b6(), 40001, 443);
    let ptb = Packet::new(b6(), a6(), L4::icmp_error(2, 0, unrelated.ip_bytes()));
    env.expect(Ingress, &ptb.build(), Reason::DroppedIngressDenied);
    env.allow(ID_B, Egress, proto::ICMP, 0, POLICY_PREFIX_ANY_PORT);
    let ping = Packet::new(a(), b(), L4::echo(false, true, 4242));
    env.expect(Egress, &ping.build(), Reason::AllowedPolicy);
    let err = Packet::new(router, a(), L4::icmp_error(3, 1, ping.ip_bytes()));
    env.expect(Ingress, &err.build(), Reason::AllowedReply);
}

fn flow_key(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    protocol: u8,
    dir: Direction,
) -> FlowKey {
    FlowKey {
        src: ip_key(src),
        dst: ip_key(dst),
        src_port: sport,
        dst_port: dport,
        endpoint: EP,
        protocol,
        direction: dir as u8,
        _pad: [0; 2],
    }
}

#[test]
fn flow_records_count_packets_and_keep_the_decision() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, false);
    env.allow(ID_B, Ingress, proto::TCP, 80, POLICY_PREFIX_FULL);
    let allowed = Packet::tcp(b(), a(), 40000, 80).build();
    let denied = Packet::tcp(b(), a(), 40001, 81).build();
    env.expect(Ingress, &allowed, Reason::AllowedPolicy);
    env.expect(Ingress, &allowed, Reason::AllowedEstablished);
    env.expect(Ingress, &allowed, Reason::AllowedEstablished);
    for _ in 0..4 {
        env.expect(Ingress, &denied, Reason::DroppedIngressDenied);
    }
    // The reply of the allowed flow, at the same endpoint in the other direction.
    let reply = Packet::tcp(a(), b(), 80, 40000).build();
    env.expect(Egress, &reply, Reason::AllowedReply);

    let f = env.flow(flow_key(b(), a(), 40000, 80, proto::TCP, Ingress));
    assert_eq!((f.packets, f.bytes), (3, 3 * allowed.len() as u64));
    assert_eq!(
        f.reason,
        Reason::AllowedPolicy as u8,
        "established packets keep the decision"
    );
    assert_eq!(f.verdict, verdict::ALLOWED);
    assert_eq!(
        f.policy, 7,
        "the PolicyValue.policy of the entry that allowed it"
    );
    assert_eq!(f.matched, PolicyMatch::L3L4 as u8);

    let f = env.flow(flow_key(b(), a(), 40001, 81, proto::TCP, Ingress));
    assert_eq!((f.packets, f.bytes), (4, 4 * denied.len() as u64));
    assert_eq!(f.reason, Reason::DroppedIngressDenied as u8);
    assert_eq!(f.verdict, verdict::DROPPED);
    assert_eq!(f.policy, 0);

    let f = env.flow(flow_key(a(), b(), 80, 40000, proto::TCP, Egress));
    assert_eq!((f.packets, f.reason), (1, Reason::AllowedReply as u8));
    assert_eq!(
        env.flows().len(),
        3,
        "one record per (tuple, endpoint, direction)"
    );

    // Drop counters: one key per (endpoint, direction, reason, protocol).
    assert_eq!(
        env.drops(),
        vec![(
            DropKey {
                endpoint: EP,
                direction: Ingress as u8,
                reason: Reason::DroppedIngressDenied as u8,
                protocol: proto::TCP,
                _pad: 0
            },
            DropValue {
                packets: 4,
                bytes: 4 * denied.len() as u64,
                unreported: 0
            }
        )]
    );
    // Policy decisions of new flows: one allow (an l3-l4 rule), four denies; conntrack hits are no
    // decisions.
    let v = env.verdicts();
    let slot = |dir: Direction, action: u8, m: PolicyMatch| {
        v[verdict_slot(dir as u8, action, m as u8) as usize]
    };
    assert_eq!(slot(Ingress, verdict::ALLOWED, PolicyMatch::L3L4), 1);
    assert_eq!(slot(Ingress, verdict::DROPPED, PolicyMatch::None), 4);
    assert_eq!(v.iter().sum::<u64>(), 5, "{v:?}");

    // Every drop was streamed (well under the rate limit).
    let events = env.events();
    assert_eq!(events.len(), 4);
    for e in &events {
        assert_eq!(e.key, flow_key(b(), a(), 40001, 81, proto::TCP, Ingress));
        assert_eq!(e.reason, Reason::DroppedIngressDenied as u8);
        assert_eq!(e.len as usize, denied.len());
        assert!(e.timestamp_ns > 0);
    }
    assert_eq!(env.lost(), vec![0; LOST_SLOTS as usize]);
}

#[test]
fn flow_match_kinds() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, false);
    // Peers without ports (l3), and a rule allowing everything (all) that B's rule shadows.
    env.allow(ID_B, Ingress, 0, 0, POLICY_PREFIX_ANY_PROTOCOL);
    env.expect(
        Ingress,
        &Packet::udp(b(), a(), 5000, 53).build(),
        Reason::AllowedPolicy,
    );
    env.allow(identity::ANY, Ingress, 0, 0, POLICY_PREFIX_ANY_PROTOCOL);
    env.expect(
        Ingress,
        &Packet::udp(POD_C.into(), a(), 5000, 53).build(),
        Reason::AllowedPolicy,
    );
    // Egress is not isolated: allowed, decided by no rule.
    env.expect(
        Egress,
        &Packet::udp(a(), b(), 5000, 53).build(),
        Reason::AllowedNotIsolated,
    );
    let f = env.flow(flow_key(b(), a(), 5000, 53, proto::UDP, Ingress));
    assert_eq!(f.matched, PolicyMatch::L3 as u8);
    let f = env.flow(flow_key(POD_C.into(), a(), 5000, 53, proto::UDP, Ingress));
    assert_eq!(f.matched, PolicyMatch::All as u8);
    let f = env.flow(flow_key(a(), b(), 5000, 53, proto::UDP, Egress));
    assert_eq!(
        (f.reason, f.matched, f.policy),
        (Reason::AllowedNotIsolated as u8, PolicyMatch::None as u8, 0)
    );
    let v = env.verdicts();
    assert_eq!(
        v[verdict_slot(Ingress as u8, verdict::ALLOWED, PolicyMatch::L3 as u8) as usize],
        1
    );
    assert_eq!(
        v[verdict_slot(Ingress as u8, verdict::ALLOWED, PolicyMatch::All as u8) as usize],
        1
    );
    assert_eq!(
        v[verdict_slot(Egress as u8, verdict::ALLOWED, PolicyMatch::None as u8) as usize],
        1
    );
}

#[test]
fn drop_counters_without_a_flow() {
    let Some(mut env) = env!() else { return };
    // Unknown endpoint: dropped before parsing, so no flow, but counted and streamed.
    env.remove_endpoint(EP);
    let frame = Packet::tcp(b(), a(), 40000, 80).build();
    env.expect(Ingress, &frame, Reason::DroppedUnknownEndpoint);
    env.expect(Egress, &frame, Reason::DroppedUnknownEndpoint);
    assert!(env.flows().is_empty());
    let drops = env.drops();
    assert_eq!(drops.len(), 2, "{drops:?}");
    for (k, v) in &drops {
        assert_eq!(
            (k.endpoint, k.reason, k.protocol),
            (EP, Reason::DroppedUnknownEndpoint as u8, 0)
        );
        assert_eq!((v.packets, v.bytes), (1, frame.len() as u64));
    }
    let events = env.events();
    assert_eq!(events.len(), 2);
    assert!(
        events
            .iter()
            .all(|e| e.key.endpoint == EP && e.key.protocol == 0)
    );
}

#[test]
fn event_rate_limit_counts_what_it_does_not_send() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, false);
    env.set_event_rate(5);
    let frame = Packet::udp(b(), a(), 40000, 9).build();
    const SENT: u64 = 50;
    for _ in 0..SENT {
        env.expect(Ingress, &frame, Reason::DroppedIngressDenied);
    }
    let events = env.events().len() as u64;
    let lost = env.lost();
    let cpus = aya::util::nr_cpus().unwrap() as u64;
    // Each CPU's bucket starts full (5 events) and barely refills during the test.
    assert!((5..=5 * cpus + 1).contains(&events), "{events} events");
    assert_eq!(events + lost[lost::RATE_LIMITED as usize], SENT, "{lost:?}");
    assert_eq!(lost[lost::RING_FULL as usize], 0);
    // The counters themselves are exact whatever the event rate, and say how many went unreported.
    assert_eq!(env.drops()[0].1.packets, SENT);
    assert_eq!(
        env.drops()[0].1.unreported,
        lost[lost::RATE_LIMITED as usize]
    );
    assert_eq!(
        env.flow(flow_key(b(), a(), 40000, 9, proto::UDP, Ingress))
            .packets,
        SENT
    );
    // The budget is per endpoint: the flood above used up endpoint 1's, another pod's drops are
    // still reported. (Endpoint 2's drop comes through `tunnel_egress`, which charges the client.)
    let pod_d: IpAddr = Ipv4Addr::new(10, 42, 0, 6).into();
    env.endpoint(2, endpoint_flags::ISOLATED_EGRESS);
    env.ip(pod_d, ID_A, 2);
    let lost_before = env.lost()[lost::RATE_LIMITED as usize];
    env.expect(Ingress, &frame, Reason::DroppedIngressDenied);
    assert_eq!(
        env.lost()[lost::RATE_LIMITED as usize],
        lost_before + 1,
        "endpoint 1 is still out of budget"
    );
    let deferred = Packet::tcp(pod_d, b(), 40000, 80).build();
    let mark = Some(netpol_common::service::DEFER_MARK);
    let (_, reason) = env
        .try_run_program(program_names::TUNNEL_EGRESS, &deferred, mark)
        .unwrap();
    assert_eq!(reason, Reason::DroppedEgressDenied);
    let events = env.events();
    assert!(
        events.iter().any(|e| e.key.endpoint == 2),
        "endpoint 2's drop was reported: {events:?}"
    );
}

/// An ICMP error is a reply only when it fits the flow it quotes: the quoted packet's sender gets
/// it, and a pod only sends errors about packets it received. Otherwise it is a packet like any
/// other, so a known flow cannot be quoted to reach a peer that policy denies.
#[test]
fn icmp_errors_must_fit_the_flow_they_quote() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, true);
    env.allow(ID_B, Ingress, proto::UDP, 9999, POLICY_PREFIX_FULL);
    let inbound = Packet::udp(b(), a(), 6000, 9999);
    env.expect(Ingress, &inbound.build(), Reason::AllowedPolicy);
    // Exfiltration: an "error" about B's flow, sent to C (denied), with data after the quote.
    let mut quote = inbound.ip_bytes();
    quote.extend_from_slice(b"secret data riding on a quoted flow");
    let to_c = Packet::new(a(), POD_C.into(), L4::icmp_error(3, 3, quote.clone()));
    env.expect(Egress, &to_c.build(), Reason::DroppedEgressDenied);
    let to_outside = Packet::new(a(), EXTERNAL.into(), L4::icmp_error(3, 3, quote));
    env.expect(Egress, &to_outside.build(), Reason::DroppedEgressDenied);
    // The same error to B, who sent the quoted packet, is a reply.
    let to_b = Packet::new(a(), b(), L4::icmp_error(3, 3, inbound.ip_bytes()));
    env.expect(Egress, &to_b.build(), Reason::AllowedReply);

    // Delivered to the pod: an error about the pod's own flow, but addressed to a group.
    env.allow(ID_B, Egress, proto::UDP, 53, POLICY_PREFIX_FULL);
    let query = Packet::udp(a(), b(), 5000, 53);
    env.expect(Egress, &query.build(), Reason::AllowedPolicy);
    let broadcast = Packet::new(
        POD_C.into(),
        Ipv4Addr::BROADCAST.into(),
        L4::icmp_error(3, 3, query.ip_bytes()),
    );
    env.expect(Ingress, &broadcast.build(), Reason::DroppedIngressDenied);
    // To the pod, from a router on the way: a reply.
    let router: IpAddr = Ipv4Addr::new(10, 42, 1, 0).into();
    let ttl = Packet::new(router, a(), L4::icmp_error(11, 0, query.ip_bytes()));
    env.expect(Ingress, &ttl.build(), Reason::AllowedReply);
    // From another pod (C), forging an error about the pod's flow with B to reach it: policed.
    let forged = Packet::new(POD_C.into(), a(), L4::icmp_error(3, 3, query.ip_bytes()));
    env.expect(Ingress, &forged.build(), Reason::DroppedIngressDenied);
    // After a policy change, an error about a flow not re-checked since is policed too: it cannot
    // keep a revoked flow's channel open.
    env.set_generation(5);
    let unreachable = Packet::new(b(), a(), L4::icmp_error(3, 3, query.ip_bytes()));
    env.expect(Ingress, &unreachable.build(), Reason::DroppedIngressDenied);
    let to_b = Packet::new(a(), b(), L4::icmp_error(3, 3, inbound.ip_bytes()));
    env.expect(Egress, &to_b.build(), Reason::DroppedEgressDenied);
}

/// Drop counters are keyed by endpoint, direction, reason and a protocol class: a pod cycling
/// through every protocol number creates a handful of counters, not 256 per victim.
#[test]
fn drop_counters_are_bounded_per_endpoint() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, true);
    for protocol in 0..=255u8 {
        let p = Packet::new(
            b(),
            a(),
            L4::Raw {
                protocol,
                payload: vec![0; 32],
            },
        );
        let (action, _) = env.run(Ingress, &p.build());
        assert_eq!(action, TC_ACT_SHOT, "protocol {protocol}");
    }
    let drops = env.drops();
    assert!(drops.len() <= 7, "{} counters: {drops:?}", drops.len());
    let total: u64 = drops.iter().map(|(_, v)| v.packets).sum();
    assert_eq!(total, 256, "every drop counted");
    assert!(drops.iter().any(|(k, _)| k.protocol == proto::OTHER));
}

/// A revoked allow ends the connection both ways: the peer's packets on an established flow are
/// re-checked against the pod's egress policy after the change, not passed as replies forever.
#[test]
fn revoked_allow_ends_replies_too() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, true);
    env.allow(ID_B, Egress, proto::TCP, 80, POLICY_PREFIX_FULL);
    let syn = Packet::tcp(a(), b(), 40000, 80);
    let reply = Packet::tcp(b(), a(), 80, 40000);
    env.expect(Egress, &syn.build(), Reason::AllowedPolicy);
    env.expect(Ingress, &reply.build(), Reason::AllowedReply);
    // A change that keeps the allow: replies go on after the re-check.
    env.set_generation(1);
    env.expect(Ingress, &reply.build(), Reason::AllowedReply);
    env.expect(Egress, &syn.build(), Reason::AllowedEstablished);
    // The allow is revoked: the peer's next packet is dropped and the flow forgotten.
    env.revoke(ID_B, Egress, proto::TCP, 80, POLICY_PREFIX_FULL);
    env.set_generation(2);
    env.expect(Ingress, &reply.build(), Reason::DroppedEgressDenied);
    assert!(env.conntrack().is_empty(), "{:?}", env.conntrack());
    env.expect(Egress, &syn.build(), Reason::DroppedEgressDenied);

    // The same for a flow the pod accepted: its own replies stop after the revocation.
    env.allow(ID_B, Ingress, proto::TCP, 8080, POLICY_PREFIX_FULL);
    let inbound = Packet::tcp(b(), a(), 50000, 8080);
    let answer = Packet::tcp(a(), b(), 8080, 50000);
    env.expect(Ingress, &inbound.build(), Reason::AllowedPolicy);
    env.expect(Egress, &answer.build(), Reason::AllowedReply);
    env.revoke(ID_B, Ingress, proto::TCP, 8080, POLICY_PREFIX_FULL);
    env.set_generation(3);
    env.expect(Egress, &answer.build(), Reason::DroppedIngressDenied);
}

/// `tunnel_egress` decides deferred Service packets; one whose client it cannot identify (a
/// masqueraded or unknown source) is dropped, never passed undecided. Unmarked packets pass on.
#[test]
fn tunnel_egress_never_leaves_a_deferred_packet_undecided() {
    let Some(mut env) = env!() else { return };
    env.isolate(false, true);
    fn run(env: &Env, frame: &[u8]) -> (u32, Reason) {
        let mark = Some(netpol_common::service::DEFER_MARK);
        env.try_run_program(program_names::TUNNEL_EGRESS, frame, mark)
            .expect("test run")
    }
    // Unmarked: not ours to decide; passes on without a counter (so no `try_run` bookkeeping).
    let prog: &SchedClassifier = env
        .ebpf
        .program(program_names::TUNNEL_EGRESS)
        .unwrap()
        .try_into()
        .unwrap();
    let plain = Packet::tcp(EXTERNAL.into(), b(), 40000, 80).build();
    let out = prog
        .test_run(TestRunOptions {
            data_in: Some(&plain),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(out.return_value, TCX_NEXT);
    // Marked, from a source that is no local pod (masqueraded to an outside address, say).
    let (action, reason) = run(&env, &plain);
    assert_eq!(
        (action, reason),
        (TC_ACT_SHOT, Reason::DroppedServiceUnresolved)
    );
    // Marked, from the local pod, to a backend its egress policy denies / allows.
    let from_a = Packet::tcp(a(), b(), 40000, 80).build();
    let (action, reason) = run(&env, &from_a);
    assert_eq!((action, reason), (TC_ACT_SHOT, Reason::DroppedEgressDenied));
    env.allow(ID_B, Egress, proto::TCP, 80, POLICY_PREFIX_FULL);
    let (action, reason) = run(&env, &from_a);
    assert_eq!((action, reason), (TCX_NEXT, Reason::AllowedPolicy));
}

impl Env {
    /// Moves every conntrack entry's last packet `age_s` seconds into the past.
    fn age_conntrack(&mut self, age_s: u64) {
        let mut m: HashMap<_, CtKey, CtValue> =
            HashMap::try_from(self.ebpf.map_mut(map_names::CONNTRACK).unwrap()).unwrap();
        let entries: Vec<(CtKey, CtValue)> = m.iter().map(Result::unwrap).collect();
        for (k, mut v) in entries {
            // The clock `bpf_ktime_get_ns` reads.
            let now = netpol_agent::datapath::conntrack::monotonic_now_ns();
            v.last_seen_ns = now.saturating_sub(age_s * 1_000_000_000);
            m.insert(k, v, 0).unwrap();
        }
    }

    fn tcp_flags_of_only_entry(&self) -> u32 {
        let ct = self.conntrack();
        assert_eq!(ct.len(), 1, "{ct:?}");
        ct[0].1.flags
    }
}

fn tcp_with_flags(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut frame = Packet::tcp(src, dst, sport, dport).build();
    let tcp = 14 + if src.is_ipv4() { 20 } else { 40 };
    frame[tcp + 13] = flags;
    frame
}

/// Conntrack follows TCP: a lone RST opens nothing, a reply makes a flow established, FIN or RST
/// make it closing; and entries expire by state (opening a minute, established hours, closing
/// seconds), after which the flow's next packet is decided by policy again.
#[test]
fn conntrack_follows_tcp_state_and_expires() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, true);
    env.allow(ID_B, Egress, proto::TCP, 80, POLICY_PREFIX_FULL);
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const FIN: u8 = 0x01;
    const RST: u8 = 0x04;
    // A lone RST (allowed by policy) passes but tracks nothing.
    env.expect(
        Egress,
        &tcp_with_flags(a(), b(), 40000, 80, RST),
        Reason::AllowedPolicy,
    );
    assert!(env.conntrack().is_empty(), "{:?}", env.conntrack());
    // SYN: opening. An opening flow expires after a minute without packets.
    env.expect(
        Egress,
        &tcp_with_flags(a(), b(), 40000, 80, SYN),
        Reason::AllowedPolicy,
    );
    assert_eq!(env.tcp_flags_of_only_entry() & ct_flags::ESTABLISHED, 0);
    env.revoke(ID_B, Egress, proto::TCP, 80, POLICY_PREFIX_FULL);
    env.age_conntrack(61);
    let ack = tcp_with_flags(a(), b(), 40000, 80, ACK);
    env.expect(Egress, &ack, Reason::DroppedEgressDenied);
    assert!(env.conntrack().is_empty(), "{:?}", env.conntrack());

    // A reply makes it established: two minutes of silence are nothing then.
    env.allow(ID_B, Egress, proto::TCP, 80, POLICY_PREFIX_FULL);
    env.expect(
        Egress,
        &tcp_with_flags(a(), b(), 40001, 80, SYN),
        Reason::AllowedPolicy,
    );
    let syn_ack = tcp_with_flags(b(), a(), 80, 40001, SYN | ACK);
    env.expect(Ingress, &syn_ack, Reason::AllowedReply);
    assert_ne!(env.tcp_flags_of_only_entry() & ct_flags::ESTABLISHED, 0);
    env.age_conntrack(120);
    let ack = tcp_with_flags(a(), b(), 40001, 80, ACK);
    env.expect(Egress, &ack, Reason::AllowedEstablished);
    // A FIN makes it closing: gone after ten seconds.
    env.expect(
        Egress,
        &tcp_with_flags(a(), b(), 40001, 80, FIN | ACK),
        Reason::AllowedEstablished,
    );
    assert_ne!(env.tcp_flags_of_only_entry() & ct_flags::CLOSING, 0);
    env.age_conntrack(11);
    env.revoke(ID_B, Egress, proto::TCP, 80, POLICY_PREFIX_FULL);
    env.expect(
        Ingress,
        &tcp_with_flags(b(), a(), 80, 40001, ACK),
        Reason::DroppedIngressDenied,
    );

    // UDP: a minute, and the timeouts are settable (CONFIG, seconds).
    env.allow(ID_B, Egress, proto::UDP, 53, POLICY_PREFIX_FULL);
    let query = Packet::udp(a(), b(), 5000, 53).build();
    env.expect(Egress, &query, Reason::AllowedPolicy);
    env.age_conntrack(30);
    env.expect(Egress, &query, Reason::AllowedEstablished);
    env.set_config(netpol_common::CtTimeouts::slot(proto::UDP, 0).0, 20);
    env.age_conntrack(30);
    env.revoke(ID_B, Egress, proto::UDP, 53, POLICY_PREFIX_FULL);
    env.expect(Egress, &query, Reason::DroppedEgressDenied);
}

impl Env {
    /// What NP_CTCOUNT_V1 holds for `endpoint`.
    fn ct_count(&self, endpoint: u32) -> u64 {
        let m: HashMap<_, u32, u64> =
            HashMap::try_from(self.ebpf.map(map_names::CT_COUNT).unwrap()).unwrap();
        m.get(&endpoint, 0).unwrap_or(0)
    }
}

/// One pod's flows are counted against its quota: past it, its new flows still follow policy but
/// go untracked, so they cannot evict other pods' entries; a flow that ends frees its slot.
#[test]
fn conntrack_quota_bounds_one_pods_share() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, true);
    env.allow(ID_B, Egress, proto::UDP, 0, POLICY_PREFIX_ANY_PORT);
    env.set_config(netpol_common::CONFIG_CT_QUOTA, 2);
    for sport in [1000, 1001, 1002] {
        let p = Packet::udp(a(), b(), sport, 53).build();
        env.expect(Egress, &p, Reason::AllowedPolicy);
    }
    assert_eq!(env.conntrack().len(), 2, "{:?}", env.conntrack());
    assert_eq!(env.ct_count(EP), 2);
    // The third flow is untracked: its packets are decided by policy each time.
    env.expect(
        Egress,
        &Packet::udp(a(), b(), 1002, 53).build(),
        Reason::AllowedPolicy,
    );
    // A revoked allow ends a tracked flow: its slot is free again.
    env.revoke(ID_B, Egress, proto::UDP, 0, POLICY_PREFIX_ANY_PORT);
    env.set_generation(1);
    env.expect(
        Egress,
        &Packet::udp(a(), b(), 1000, 53).build(),
        Reason::DroppedEgressDenied,
    );
    assert_eq!(env.ct_count(EP), 1);
    env.allow(ID_B, Egress, proto::UDP, 0, POLICY_PREFIX_ANY_PORT);
    env.expect(
        Egress,
        &Packet::udp(a(), b(), 1003, 53).build(),
        Reason::AllowedPolicy,
    );
    assert_eq!(env.ct_count(EP), 2);
    assert_eq!(env.conntrack().len(), 2);
}

/// A flow allowed through a Service frontend (every backend allowed) keeps its replies across a
/// policy change that keeps the frontend's verdict: the re-check of a reply from the ClusterIP goes
/// through that verdict, not only through the rules (which know no ClusterIP). When the verdict is
/// gone, the replies stop.
#[test]
fn replies_through_a_service_are_rechecked_against_its_verdict() {
    use netpol_common::{SvcKey, SvcValue, service};

    let Some(mut env) = env!() else { return };
    env.isolate(true, true);
    let vip: IpAddr = Ipv4Addr::new(10, 43, 0, 10).into();
    let key = SvcKey {
        endpoint: EP,
        vip: ip_key(vip),
        port_be: 53u16.to_be_bytes(),
        protocol: proto::UDP,
        _pad: 0,
    };
    let verdict = SvcValue {
        verdict: service::VERDICT_ALLOW,
        rule: rule_code::of(Egress, 1) as u16,
        policy: 9,
    };
    env.service(key, Some(verdict));
    let query = Packet::udp(a(), vip, 5000, 53).build();
    let answer = Packet::udp(vip, a(), 53, 5000).build();
    env.expect(Egress, &query, Reason::AllowedService);
    env.expect(Ingress, &answer, Reason::AllowedReply);
    // Allowed outright at the pod's veth: the connection counts to the verdict's rule.
    let rule = RuleKey {
        policy: 9,
        rule: rule_code::of(Egress, 1),
    };
    let hits = env.rule_hits();
    let counted = hits
        .iter()
        .find(|(k, _)| *k == rule)
        .map(|(_, h)| (h.connections, h.packets));
    assert_eq!(counted, Some((1, 2)), "{hits:?}");
    env.set_generation(1);
    env.expect(Ingress, &answer, Reason::AllowedReply);
    env.service(key, None);
    env.set_generation(2);
    env.expect(Ingress, &answer, Reason::DroppedEgressDenied);
}

/// A Service frontend address is judged on its SERVICES verdict only: a rule that matches the
/// address itself (an ipBlock around it, a rule without peers) does not allow it, so an excepted
/// backend is not reached through its ClusterIP (upstream's "except clause" through a Service).
/// Frontends past FRONTENDS' capacity are written as ranges: a pod cannot reach an address of the
/// range through a rule that matches the address (an ipBlock, a rule without peers), whether or not
/// the address is a ClusterIP; only a Service verdict opens it.
#[test]
fn an_address_in_a_frontend_range_is_judged_as_a_frontend() {
    let Some(mut env) = env!() else { return };
    env.isolate(false, true);
    env.cidr(Ipv4Addr::new(10, 43, 0, 0).into(), 16, ID_CIDR);
    env.allow(ID_CIDR, Egress, 0, 0, POLICY_PREFIX_ANY_PROTOCOL);
    env.allow(identity::ANY, Egress, proto::TCP, 443, POLICY_PREFIX_FULL);
    let inside: IpAddr = Ipv4Addr::new(10, 43, 7, 99).into();
    let outside: IpAddr = Ipv4Addr::new(10, 43, 8, 1).into();
    env.expect(
        Egress,
        &Packet::tcp(a(), inside, 40000, 80).build(),
        Reason::AllowedPolicy,
    );
    env.frontend_range(Ipv4Addr::new(10, 43, 7, 0).into(), V4_MAPPED_PREFIX + 24);
    for (port, sport) in [(80, 40001), (443, 40002)] {
        env.expect(
            Egress,
            &Packet::tcp(a(), inside, sport, port).build(),
            Reason::DroppedEgressDenied,
        );
    }
    // Next to the range, the rules decide as before.
    env.expect(
        Egress,
        &Packet::tcp(a(), outside, 40003, 80).build(),
        Reason::AllowedPolicy,
    );
}

#[test]
fn a_frontend_address_is_judged_on_its_service_verdict_only() {
    use netpol_common::{SvcKey, SvcValue, service};

    let Some(mut env) = env!() else { return };
    env.isolate(false, true);
    let vip: IpAddr = Ipv4Addr::new(10, 43, 0, 54).into();
    // Egress to 0.0.0.0/0 on any port, and to every peer on port 80.
    env.cidr(Ipv4Addr::UNSPECIFIED.into(), 0, ID_CIDR);
    env.allow(ID_CIDR, Egress, 0, 0, POLICY_PREFIX_ANY_PROTOCOL);
    env.allow(identity::ANY, Egress, proto::TCP, 80, POLICY_PREFIX_FULL);
    let to_vip = Packet::tcp(a(), vip, 40000, 80).build();
    env.expect(Egress, &to_vip, Reason::AllowedPolicy);
    env.frontend(vip);
    env.expect(
        Egress,
        &Packet::tcp(a(), vip, 40001, 80).build(),
        Reason::DroppedEgressDenied,
    );
    // Other addresses of the block are still allowed by it.
    env.expect(
        Egress,
        &Packet::tcp(a(), Ipv4Addr::new(1, 1, 1, 1).into(), 40002, 443).build(),
        Reason::AllowedPolicy,
    );
    // With a verdict for the frontend, its verdict decides.
    let key = SvcKey {
        endpoint: EP,
        vip: ip_key(vip),
        port_be: 80u16.to_be_bytes(),
        protocol: proto::TCP,
        _pad: 0,
    };
    let verdict = SvcValue {
        verdict: service::VERDICT_DEFER,
        rule: rule_code::of(Egress, 1) as u16,
        policy: 9,
    };
    env.service(key, Some(verdict));
    env.expect(
        Egress,
        &Packet::tcp(a(), vip, 40003, 80).build(),
        Reason::AllowedServiceDeferred,
    );
    assert!(
        !env.rule_hits().iter().any(|(k, _)| k.policy == 9),
        "a deferred connection counts after DNAT, to the backend's rule, not here"
    );
    // Ingress from the address is unaffected (not a client's destination).
    env.expect(
        Ingress,
        &Packet::tcp(vip, a(), 80, 40004).build(),
        Reason::AllowedNotIsolated,
    );
}

/// What a hostile pod with raw sockets sends from a pending veth (a pod the agent does not know
/// yet): another pod's or the node's source address, ARP claiming them, a frame with a foreign
/// MAC, another EtherType, a packet to a Service frontend. All dropped; only its own address (if
/// the agent gave it one) passes the link checks, and even then policy keeps it closed.
#[test]
fn a_pending_pod_cannot_spoof_or_slip_out_sideways() {
    let Some(mut env) = env!() else { return };
    env.endpoint(
        EP,
        endpoint_flags::ISOLATED_INGRESS
            | endpoint_flags::ISOLATED_EGRESS
            | endpoint_flags::PENDING,
    );
    env.ip(a(), identity::PENDING, EP);
    let mac = packets::POD_MAC;
    let arp = |frame_src, sender_mac, sender: Ipv4Addr| {
        packets::arp(frame_src, sender_mac, sender.octets(), NODE.octets())
    };
    // Its own address: ARP passes (it must reach the node), a connection does not.
    env.expect(Egress, &arp(mac, mac, POD_A), Reason::AllowedNotPoliced);
    env.expect(
        Egress,
        &Packet::tcp(a(), NODE.into(), 40000, 22).build(),
        Reason::DroppedPending,
    );
    // Another pod's, the node's, or an unowned address of the pod network.
    for claimed in [POD_C, NODE, Ipv4Addr::new(10, 42, 0, 77)] {
        env.expect(Egress, &arp(mac, mac, claimed), Reason::DroppedSpoofedLink);
        env.expect(
            Egress,
            &Packet::udp(claimed.into(), b(), 40000, 53).build(),
            Reason::DroppedSpoofedSource,
        );
    }
    // A foreign MAC on the frame, another EtherType (LLDP).
    env.expect(
        Egress,
        &arp(OTHER_MAC, OTHER_MAC, POD_A),
        Reason::DroppedSpoofedLink,
    );
    env.expect(
        Egress,
        &packets::ethernet_from(mac, 0x88cc),
        Reason::DroppedEtherType,
    );
    // A Service frontend, even one a namespace-wide rule would match: no verdict of its own.
    let vip: IpAddr = Ipv4Addr::new(10, 43, 0, 10).into();
    env.frontend(vip);
    env.allow(identity::ANY, Egress, proto::UDP, 53, POLICY_PREFIX_FULL);
    env.expect(
        Egress,
        &Packet::udp(a(), vip, 40001, 53).build(),
        Reason::DroppedPending,
    );
}

// Audit mode: the isolation of a direction comes from audited policies only. What no rule allows
// passes as a would-be drop, counted, recorded and reported like a drop; nothing else is relaxed.

const AUDIT_BOTH: u32 = endpoint_flags::ISOLATED_INGRESS
    | endpoint_flags::ISOLATED_EGRESS
    | endpoint_flags::AUDIT_INGRESS
    | endpoint_flags::AUDIT_EGRESS;

#[test]
fn audit_mode_passes_denials_as_would_be_drops_and_records_them() {
    let Some(mut env) = env!() else { return };
    env.set_event_rate(1000);
    env.endpoint(EP, AUDIT_BOTH);
    env.allow(ID_B, Ingress, proto::TCP, 80, POLICY_PREFIX_FULL);
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 40000, 80).build(),
        Reason::AllowedPolicy,
    );
    let denied = Packet::tcp(b(), a(), 40001, 81).build();
    env.expect(Ingress, &denied, Reason::AuditedIngressDenied);
    // Every packet of the flow stays a would-be drop; its replies pass as replies.
    env.expect(Ingress, &denied, Reason::AuditedIngressDenied);
    env.expect(
        Egress,
        &Packet::tcp(a(), b(), 81, 40001).build(),
        Reason::AllowedReply,
    );
    env.expect(
        Egress,
        &Packet::udp(a6(), b6(), 5000, 53).build(),
        Reason::AuditedEgressDenied,
    );

    let key = flow_key(b(), a(), 40001, 81, proto::TCP, Ingress);
    let flow = env.flow(key);
    assert_eq!(flow.verdict, verdict::AUDIT);
    assert_eq!(flow.packets, 2);
    let audit_drops: Vec<_> = env
        .drops()
        .into_iter()
        .filter(|(k, _)| k.reason == Reason::AuditedIngressDenied as u8)
        .collect();
    assert_eq!(audit_drops.len(), 1, "{audit_drops:?}");
    assert_eq!(audit_drops[0].1.packets, 2);
    // One event per decision: the audited flow's later packets are counted, not reported.
    let events = env.events();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].key, key);
    assert_eq!(verdict::of(events[0].reason), verdict::AUDIT);
    let v = env.verdicts();
    assert_eq!(
        v[verdict_slot(Ingress as u8, verdict::AUDIT, 0) as usize],
        1
    );
    assert_eq!(v[verdict_slot(Egress as u8, verdict::AUDIT, 0) as usize], 1);
    assert_eq!(
        v[verdict_slot(Ingress as u8, verdict::DROPPED, 0) as usize],
        0
    );
}

#[test]
fn audit_mode_relaxes_only_policy_denials() {
    let Some(mut env) = env!() else { return };
    env.endpoint(EP, AUDIT_BOTH);
    // A hostile pod in audit mode still cannot spoof its source, address or link.
    env.expect(
        Egress,
        &Packet::tcp(b(), POD_C.into(), 1, 80).build(),
        Reason::DroppedSpoofedSource,
    );
    env.expect(
        Egress,
        &packets::ethernet_from(OTHER_MAC, 0x88cc),
        Reason::DroppedSpoofedLink,
    );
    // Nor reach another pod's address through this veth.
    env.expect(
        Ingress,
        &Packet::tcp(b(), POD_C.into(), 1, 80).build(),
        Reason::DroppedNotForPod,
    );
    // Non-IP frames at a pod isolated in audit mode are would-be drops, not drops.
    let mut lldp = packets::ethernet(0x88cc);
    lldp.extend_from_slice(&[0; 46]);
    env.expect(Egress, &lldp, Reason::AuditedEgressDenied);
    env.expect(Ingress, &lldp, Reason::AuditedIngressDenied);
    // Audit in one direction leaves the other enforced.
    env.endpoint(
        EP,
        endpoint_flags::ISOLATED_INGRESS
            | endpoint_flags::ISOLATED_EGRESS
            | endpoint_flags::AUDIT_EGRESS,
    );
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 40000, 80).build(),
        Reason::DroppedIngressDenied,
    );
    env.expect(
        Egress,
        &Packet::tcp(a(), b(), 40000, 80).build(),
        Reason::AuditedEgressDenied,
    );
    // An audit bit without its isolation bit changes nothing (not isolated: allowed).
    env.endpoint(EP, endpoint_flags::AUDIT_INGRESS);
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 40001, 80).build(),
        Reason::AllowedNotIsolated,
    );
}

#[test]
fn an_audited_flow_is_dropped_once_its_policy_is_enforced() {
    let Some(mut env) = env!() else { return };
    env.endpoint(EP, AUDIT_BOTH);
    let syn = Packet::tcp(b(), a(), 40000, 81).build();
    env.expect(Ingress, &syn, Reason::AuditedIngressDenied);
    // The same policy switched to enforce (a new generation): the tracked flow is re-checked.
    env.endpoint(
        EP,
        endpoint_flags::ISOLATED_INGRESS | endpoint_flags::ISOLATED_EGRESS,
    );
    env.set_generation(2);
    env.expect(Ingress, &syn, Reason::DroppedIngressDenied);
    env.expect(
        Egress,
        &Packet::tcp(a(), b(), 81, 40000).build(),
        Reason::DroppedEgressDenied,
    );
    assert!(env.conntrack().is_empty(), "the audited flow was forgotten");
}

#[test]
fn a_pending_endpoint_in_audit_mode_passes_would_be_drops() {
    let Some(mut env) = env!() else { return };
    env.endpoint(EP, AUDIT_BOTH | endpoint_flags::PENDING);
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 40000, 80).build(),
        Reason::AuditedIngressDenied,
    );
    env.endpoint(
        EP,
        endpoint_flags::ISOLATED_INGRESS
            | endpoint_flags::ISOLATED_EGRESS
            | endpoint_flags::PENDING,
    );
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 40001, 80).build(),
        Reason::DroppedPending,
    );
}

// Hit counters: every packet of a connection a rule allowed, both ways, counts to that rule; a
// connection counts once; nothing denied, audited or merely not isolated counts anywhere.

#[test]
fn rule_hits_count_exactly_the_connections_and_packets_a_rule_allowed() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, true);
    let web = PolicyValue {
        policy: 11,
        rule: rule_code::of(Ingress, 2),
    };
    let dns = PolicyValue {
        policy: 12,
        rule: rule_code::of(Egress, 0),
    };
    env.allow_by(web, (ID_B, Ingress, proto::TCP, 80, POLICY_PREFIX_FULL));
    env.allow_by(
        dns,
        (identity::ANY, Egress, proto::UDP, 53, POLICY_PREFIX_FULL),
    );
    let mut bytes = 0;
    for sport in [40000, 40001, 40002] {
        let syn = Packet::tcp(b(), a(), sport, 80).build();
        let answer = Packet::tcp(a(), b(), 80, sport).build();
        env.expect(Ingress, &syn, Reason::AllowedPolicy);
        env.expect(Egress, &answer, Reason::AllowedReply);
        env.expect(Ingress, &syn, Reason::AllowedEstablished);
        bytes += 2 * syn.len() as u64 + answer.len() as u64;
    }
    let query = Packet::udp(a6(), b6(), 5353, 53).build();
    env.expect(Egress, &query, Reason::AllowedPolicy);
    // A hostile pod's denied or spoofed packets count to no rule.
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 40003, 81).build(),
        Reason::DroppedIngressDenied,
    );
    env.expect(
        Egress,
        &Packet::udp(b(), POD_C.into(), 5353, 53).build(),
        Reason::DroppedSpoofedSource,
    );
    let mut hits = env.rule_hits();
    hits.sort_by_key(|(k, _)| *k);
    assert_eq!(hits.len(), 2, "{hits:?}");
    let (k, h) = hits[0];
    assert_eq!(k, web);
    assert_eq!((h.connections, h.packets, h.bytes), (3, 9, bytes));
    assert!(h.last_hit_ns > 0);
    let (k, h) = hits[1];
    assert_eq!(k, dns);
    assert_eq!(
        (h.connections, h.packets, h.bytes),
        (1, 1, query.len() as u64)
    );
}

#[test]
fn a_rechecked_flow_counts_to_the_rule_that_allows_it_now() {
    let Some(mut env) = env!() else { return };
    env.isolate(true, false);
    let old = PolicyValue {
        policy: 21,
        rule: rule_code::of(Ingress, 0),
    };
    let new = PolicyValue {
        policy: 22,
        rule: rule_code::of(Ingress, 4),
    };
    env.allow_by(old, (ID_B, Ingress, proto::TCP, 80, POLICY_PREFIX_FULL));
    let syn = Packet::tcp(b(), a(), 40000, 80).build();
    env.expect(Ingress, &syn, Reason::AllowedPolicy);
    env.allow_by(new, (ID_B, Ingress, proto::TCP, 80, POLICY_PREFIX_FULL));
    env.set_generation(2);
    env.expect(Ingress, &syn, Reason::AllowedPolicy);
    env.expect(Ingress, &syn, Reason::AllowedEstablished);
    let hits = env.rule_hits();
    let of = |rule: PolicyValue| hits.iter().find(|(k, _)| *k == rule).map(|(_, h)| *h);
    let (o, n) = (of(old).unwrap(), of(new).unwrap());
    assert_eq!((o.connections, o.packets), (1, 1));
    assert_eq!(
        (n.connections, n.packets),
        (0, 2),
        "a re-check is not a new connection"
    );
    // Audited and unisolated traffic counts nowhere.
    env.endpoint(
        EP,
        endpoint_flags::ISOLATED_INGRESS | endpoint_flags::AUDIT_INGRESS,
    );
    env.set_generation(4);
    env.expect(
        Ingress,
        &Packet::tcp(b(), a(), 40001, 81).build(),
        Reason::AuditedIngressDenied,
    );
    env.expect(
        Egress,
        &Packet::tcp(a(), b(), 40002, 443).build(),
        Reason::AllowedNotIsolated,
    );
    assert_eq!(env.rule_hits().len(), 2);
}

/// A Service connection whose egress was deferred to after DNAT is decided, and counted, under
/// its client: at a local backend's veth an audited denial is recorded as the client's would-be
/// drop (the packet's own verdict is the backend's), and an allowed one counts to the rule that
/// allows the backend, there and at the tunnel.
#[test]
fn deferred_service_egress_is_audited_and_counted_under_the_client() {
    let Some(mut env) = env!() else { return };
    let client = 2;
    let pod_d: IpAddr = Ipv4Addr::new(10, 42, 0, 6).into();
    env.endpoint(
        client,
        endpoint_flags::ISOLATED_EGRESS | endpoint_flags::AUDIT_EGRESS,
    );
    env.ip(pod_d, ID_C, client);
    let mark = Some(netpol_common::service::DEFER_MARK);
    let to_backend = |sport| Packet::tcp(pod_d, a(), sport, 80).build();
    let (_, reason) = env
        .try_run_program(program_names::POD_INGRESS, &to_backend(40000), mark)
        .unwrap();
    assert_eq!(
        reason,
        Reason::AllowedNotIsolated,
        "the backend's own verdict"
    );
    let audited: Vec<_> = env
        .drops()
        .into_iter()
        .filter(|(k, _)| k.endpoint == client)
        .map(|(k, v)| (k.reason, v.packets))
        .collect();
    assert_eq!(audited, [(Reason::AuditedEgressDenied as u8, 1)]);

    let rule = |index| PolicyValue {
        policy: 31,
        rule: rule_code::of(Egress, index),
    };
    for (peer, index) in [(ID_A, 0), (ID_B, 1)] {
        let key = Key::new(
            POLICY_PREFIX_FULL,
            PolicyKey {
                endpoint: client,
                identity: peer,
                direction: Egress as u8,
                protocol: proto::TCP,
                port_be: 80u16.to_be_bytes(),
            },
        );
        env.both_trie(map_names::POLICY, |m| {
            m.insert(&key, rule(index), 0).unwrap()
        });
    }
    env.try_run_program(program_names::POD_INGRESS, &to_backend(40001), mark)
        .unwrap();
    let remote = Packet::tcp(pod_d, b(), 40002, 80).build();
    let (action, reason) = env
        .try_run_program(program_names::TUNNEL_EGRESS, &remote, mark)
        .unwrap();
    assert_eq!((action, reason), (TCX_NEXT, Reason::AllowedPolicy));
    let hits = env.rule_hits();
    let packets = |r: PolicyValue| hits.iter().find(|(k, _)| *k == r).map(|(_, h)| h.packets);
    assert_eq!(packets(rule(0)), Some(1), "the local backend: {hits:?}");
    assert_eq!(packets(rule(1)), Some(1), "the remote backend: {hits:?}");
}
