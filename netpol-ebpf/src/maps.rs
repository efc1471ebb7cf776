//! Every map of the datapath, defined once. Layouts, names and capacities come from `netpol-common`
//! (the contract with the agent); the `#[map(name = ...)]` literals are checked against
//! `netpol_common::map_names` at compile time.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use netpol_common::{
    CONFIG_LEN, CtKey, CtValue, EndpointInfo, IpInfo, IpKey, PolicyKey, PolicyValue, REASON_SLOTS,
    capacity, map_names,
};

/// Local endpoints keyed by host veth ifindex.
#[map(name = "NP_ENDPOINTS_V1")]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(capacity::ENDPOINTS, 0);

/// Known addresses: identity and owning local endpoint.
#[map(name = "NP_IPCACHE_V1")]
pub static IPCACHE: HashMap<IpKey, IpInfo> = HashMap::pinned(capacity::IPCACHE, 0);

/// ipBlock prefixes to CIDR identities.
#[map(name = "NP_CIDRS_V1")]
pub static CIDRS: LpmTrie<IpKey, u32> = LpmTrie::pinned(capacity::CIDRS, BPF_F_NO_PREALLOC);

/// What each endpoint allows.
#[map(name = "NP_POLICY_V1")]
pub static POLICY: LpmTrie<PolicyKey, PolicyValue> =
    LpmTrie::pinned(capacity::POLICY, BPF_F_NO_PREALLOC);

/// Flows allowed so far.
#[map(name = "NP_CT_V1")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(capacity::CONNTRACK, 0);

/// Agent-controlled settings; see `netpol_common::CONFIG_GENERATION`.
#[map(name = "NP_CONFIG_V1")]
pub static CONFIG: Array<u32> = Array::pinned(CONFIG_LEN, 0);

/// Packets per verdict reason, per CPU.
#[map(name = "NP_COUNTERS_V1")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(REASON_SLOTS, 0);

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

const _: () = assert!(str_eq("NP_ENDPOINTS_V1", map_names::ENDPOINTS));
const _: () = assert!(str_eq("NP_IPCACHE_V1", map_names::IPCACHE));
const _: () = assert!(str_eq("NP_CIDRS_V1", map_names::CIDRS));
const _: () = assert!(str_eq("NP_POLICY_V1", map_names::POLICY));
const _: () = assert!(str_eq("NP_CT_V1", map_names::CONNTRACK));
const _: () = assert!(str_eq("NP_CONFIG_V1", map_names::CONFIG));
const _: () = assert!(str_eq("NP_COUNTERS_V1", map_names::COUNTERS));
