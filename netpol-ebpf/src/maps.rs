//! Every map of the datapath, defined once. Layouts, names and capacities come from `netpol-common`
//! (the contract with the agent); the `#[map(name = ...)]` literals are checked against
//! `netpol_common::map_names` at compile time.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, RingBuf,
        lpm_trie::Key,
    },
};
use netpol_common::{
    CONFIG_GENERATION, CONFIG_LEN, CtKey, CtValue, DropKey, DropValue, EndpointInfo, FlowKey,
    FlowValue, FragKey, FragValue, IpInfo, IpKey, LOST_SLOTS, PolicyKey, PolicyValue, REASON_SLOTS,
    RuleHits, RuleKey, SvcKey, SvcValue, TokenBucket, VERDICT_SLOTS, buffer, capacity, map_names,
    service,
};

// The decision maps, once per buffer (see `netpol_common::buffer`): packets read the buffer the
// policy generation names, through [`Buffer`].

/// Local endpoints keyed by host veth ifindex.
#[map(name = "NP_ENDPOINT0_V2")]
static ENDPOINTS_0: HashMap<u32, EndpointInfo> = HashMap::pinned(capacity::ENDPOINTS, 0);
#[map(name = "NP_ENDPOINT1_V2")]
static ENDPOINTS_1: HashMap<u32, EndpointInfo> = HashMap::pinned(capacity::ENDPOINTS, 0);

/// Known addresses: identity and owning local endpoint.
#[map(name = "NP_IPCACHE0_V2")]
static IPCACHE_0: HashMap<IpKey, IpInfo> = HashMap::pinned(capacity::IPCACHE, BPF_F_NO_PREALLOC);
#[map(name = "NP_IPCACHE1_V2")]
static IPCACHE_1: HashMap<IpKey, IpInfo> = HashMap::pinned(capacity::IPCACHE, BPF_F_NO_PREALLOC);

/// ipBlock prefixes to CIDR identities.
#[map(name = "NP_CIDRS0_V2")]
static CIDRS_0: LpmTrie<IpKey, u32> = LpmTrie::pinned(capacity::CIDRS, BPF_F_NO_PREALLOC);
#[map(name = "NP_CIDRS1_V2")]
static CIDRS_1: LpmTrie<IpKey, u32> = LpmTrie::pinned(capacity::CIDRS, BPF_F_NO_PREALLOC);

/// What each endpoint allows.
#[map(name = "NP_POLICY0_V2")]
static POLICY_0: LpmTrie<PolicyKey, PolicyValue> =
    LpmTrie::pinned(capacity::POLICY, BPF_F_NO_PREALLOC);
#[map(name = "NP_POLICY1_V2")]
static POLICY_1: LpmTrie<PolicyKey, PolicyValue> =
    LpmTrie::pinned(capacity::POLICY, BPF_F_NO_PREALLOC);

/// Egress verdicts of local pods through Service frontends; see `netpol_common::service`.
#[map(name = "NP_SERVICES0_V2")]
static SERVICES_0: HashMap<SvcKey, SvcValue> = HashMap::pinned(service::CAPACITY, 0);
#[map(name = "NP_SERVICES1_V2")]
static SERVICES_1: HashMap<SvcKey, SvcValue> = HashMap::pinned(service::CAPACITY, 0);

/// Service frontend addresses and ranges; see `netpol_common::service::FRONTENDS_MAP_NAME`.
#[map(name = "NP_FRONTEND0_V2")]
static FRONTENDS_0: LpmTrie<IpKey, u32> =
    LpmTrie::pinned(service::FRONTENDS_CAPACITY, BPF_F_NO_PREALLOC);
#[map(name = "NP_FRONTEND1_V2")]
static FRONTENDS_1: LpmTrie<IpKey, u32> =
    LpmTrie::pinned(service::FRONTENDS_CAPACITY, BPF_F_NO_PREALLOC);

/// The decision maps one packet reads: the buffer its policy generation names, chosen once when its
/// classification starts, so that a packet never mixes two policies.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Buffer {
    /// The policy generation the packet is judged under.
    pub generation: u32,
}

/// `$second` when the buffer is the second one, else `$first`.
macro_rules! pick {
    ($buffer:expr, $first:ident, $second:ident) => {
        if buffer::of($buffer.generation) == 0 {
            &$first
        } else {
            &$second
        }
    };
}

impl Buffer {
    /// The buffer of the current policy generation.
    #[inline(always)]
    pub fn current() -> Self {
        Buffer {
            generation: CONFIG.get(CONFIG_GENERATION).copied().unwrap_or(0),
        }
    }

    /// The endpoint of the host veth `ifindex`.
    #[inline(always)]
    pub fn endpoint(self, ifindex: u32) -> Option<*const EndpointInfo> {
        pick!(self, ENDPOINTS_0, ENDPOINTS_1).get_ptr(ifindex)
    }

    /// What is known of an address.
    #[inline(always)]
    pub fn address(self, addr: &[u8; 16]) -> Option<*const IpInfo> {
        pick!(self, IPCACHE_0, IPCACHE_1).get_ptr(IpKey { addr: *addr })
    }

    /// The identity of the longest ipBlock prefix holding `addr`.
    #[inline(always)]
    pub fn cidr(self, addr: &[u8; 16]) -> Option<u32> {
        pick!(self, CIDRS_0, CIDRS_1)
            .get(Key::new(128, IpKey { addr: *addr }))
            .copied()
    }

    /// The longest POLICY entry matching `key`.
    #[inline(always)]
    pub fn policy(self, key: &Key<PolicyKey>) -> Option<PolicyValue> {
        pick!(self, POLICY_0, POLICY_1).get(key).copied()
    }

    /// A Service verdict.
    #[inline(always)]
    pub fn service(self, key: &SvcKey) -> Option<*const SvcValue> {
        pick!(self, SERVICES_0, SERVICES_1).get_ptr(key)
    }

    /// Whether `addr` is a Service frontend (or in a range the agent wrote as frontends).
    #[inline(always)]
    pub fn is_frontend(self, addr: &[u8; 16]) -> bool {
        pick!(self, FRONTENDS_0, FRONTENDS_1)
            .get(Key::new(128, IpKey { addr: *addr }))
            .is_some()
    }
}

/// Flows allowed so far.
#[map(name = "NP_CT_V2")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(capacity::CONNTRACK, 0);

/// Agent-controlled settings; see `netpol_common::CONFIG_GENERATION`.
#[map(name = "NP_CONFIG_V1")]
pub static CONFIG: Array<u32> = Array::pinned(CONFIG_LEN, 0);

/// Packets per verdict reason, per CPU.
#[map(name = "NP_COUNTERS_V1")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(REASON_SLOTS, 0);

/// Recent flows and their counts. Per-CPU LRU: a packet only ever writes its own CPU's copy of the
/// value, so counting needs neither atomics nor a shared cache line, and a hot flow spread over
/// several CPUs (RSS, several senders) never contends; userspace adds the copies up.
#[map(name = "NP_FLOWS_V1")]
pub static FLOWS: LruPerCpuHashMap<FlowKey, FlowValue> =
    LruPerCpuHashMap::pinned(capacity::FLOWS, 0);

/// Drops per endpoint, direction, reason and protocol, per CPU; survive flow eviction.
#[map(name = "NP_DROPS_V1")]
pub static DROPS: PerCpuHashMap<DropKey, DropValue> = PerCpuHashMap::pinned(capacity::DROPS, 0);

/// Drop events for the agent.
#[map(name = "NP_EVENTS_V1")]
pub static EVENTS: RingBuf = RingBuf::pinned(capacity::EVENTS_BYTES, 0);

/// Per-endpoint, per-CPU token buckets limiting drop events (LRU: the buckets of endpoints that
/// are gone make room).
#[map(name = "NP_EVBUDGET_V1")]
pub static EVENT_BUDGET: LruPerCpuHashMap<u32, TokenBucket> =
    LruPerCpuHashMap::pinned(capacity::ENDPOINTS, 0);

/// What could not be recorded, per CPU; see `netpol_common::lost`.
#[map(name = "NP_LOST_V1")]
pub static LOST: PerCpuArray<u64> = PerCpuArray::pinned(LOST_SLOTS, 0);

/// Policy decisions of new flows, per CPU; see `netpol_common::verdict_slot`.
#[map(name = "NP_VERDICTS_V2")]
pub static VERDICTS: PerCpuArray<u64> = PerCpuArray::pinned(VERDICT_SLOTS, 0);

/// Hits of each policy rule, per CPU.
#[map(name = "NP_RULEHITS_V1")]
pub static RULE_HITS: PerCpuHashMap<RuleKey, RuleHits> = PerCpuHashMap::pinned(capacity::RULES, 0);

/// Conntrack entries per endpoint, against the quota.
#[map(name = "NP_CTCOUNT_V1")]
pub static CT_COUNT: HashMap<u32, u64> = HashMap::pinned(capacity::ENDPOINTS, 0);

/// Fragmented datagrams whose first fragment was allowed.
#[map(name = "NP_FRAGS_V1")]
pub static FRAGS: LruHashMap<FragKey, FragValue> = LruHashMap::pinned(capacity::FRAGS, 0);

/// This CPU's (or the shared) value of `$map` for `$key`, created as `$init` when missing;
/// `None` when the map is full. Created with `BPF_NOEXIST`, so that a creation racing on another
/// CPU never resets the value made there (a per-CPU map creates the other CPUs' copies zeroed).
macro_rules! get_or_create {
    ($map:expr, $key:expr, $init:expr) => {{
        let mut ptr = $map.get_ptr_mut($key);
        if ptr.is_none() {
            let _ = $map.insert($key, $init, aya_ebpf::bindings::BPF_NOEXIST as u64);
            ptr = $map.get_ptr_mut($key);
        }
        ptr
    }};
}
pub(crate) use get_or_create;

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

const _: () = assert!(str_eq("NP_ENDPOINT0_V2", map_names::ENDPOINTS[0]));
const _: () = assert!(str_eq("NP_ENDPOINT1_V2", map_names::ENDPOINTS[1]));
const _: () = assert!(str_eq("NP_IPCACHE0_V2", map_names::IPCACHE[0]));
const _: () = assert!(str_eq("NP_IPCACHE1_V2", map_names::IPCACHE[1]));
const _: () = assert!(str_eq("NP_CIDRS0_V2", map_names::CIDRS[0]));
const _: () = assert!(str_eq("NP_CIDRS1_V2", map_names::CIDRS[1]));
const _: () = assert!(str_eq("NP_POLICY0_V2", map_names::POLICY[0]));
const _: () = assert!(str_eq("NP_POLICY1_V2", map_names::POLICY[1]));
const _: () = assert!(str_eq("NP_SERVICES0_V2", service::MAP_NAME[0]));
const _: () = assert!(str_eq("NP_SERVICES1_V2", service::MAP_NAME[1]));
const _: () = assert!(str_eq("NP_FRONTEND0_V2", service::FRONTENDS_MAP_NAME[0]));
const _: () = assert!(str_eq("NP_FRONTEND1_V2", service::FRONTENDS_MAP_NAME[1]));
const _: () = assert!(str_eq("NP_CT_V2", map_names::CONNTRACK));
const _: () = assert!(str_eq("NP_CONFIG_V1", map_names::CONFIG));
const _: () = assert!(str_eq("NP_COUNTERS_V1", map_names::COUNTERS));
const _: () = assert!(str_eq("NP_FLOWS_V1", map_names::FLOWS));
const _: () = assert!(str_eq("NP_DROPS_V1", map_names::DROPS));
const _: () = assert!(str_eq("NP_RULEHITS_V1", map_names::RULE_HITS));
const _: () = assert!(str_eq("NP_EVENTS_V1", map_names::EVENTS));
const _: () = assert!(str_eq("NP_EVBUDGET_V1", map_names::EVENT_BUDGET));
const _: () = assert!(str_eq("NP_LOST_V1", map_names::LOST));
const _: () = assert!(str_eq("NP_VERDICTS_V2", map_names::VERDICTS));
const _: () = assert!(str_eq("NP_FRAGS_V1", map_names::FRAGS));
const _: () = assert!(str_eq("NP_CTCOUNT_V1", map_names::CT_COUNT));
