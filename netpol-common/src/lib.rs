//! Types shared by the TC programs (`netpol-ebpf`) and the agent (`netpol-agent`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and a static size assertion:
//! the kernel hashes padding bytes as part of a key, so no type may have implicit padding.
//! Map names carry a layout version (`_V1`): a future layout change gets a new name, so an
//! upgraded agent never reads a pinned map of an older layout.
#![no_std]

use core::mem::size_of;

/// Names of every map, defined once. They are also the pin file names under `<pin-dir>/maps/`.
pub mod map_names {
    /// `HashMap<u32 ifindex, EndpointInfo>`: the local pods, keyed by their host veth.
    pub const ENDPOINTS: &str = "NP_ENDPOINTS_V1";
    /// `HashMap<IpKey, IpInfo>`: every known pod address in the cluster and the node's own addresses.
    pub const IPCACHE: &str = "NP_IPCACHE_V1";
    /// `LpmTrie<IpKey, u32 identity>`: every ipBlock prefix (and except) used by a policy.
    pub const CIDRS: &str = "NP_CIDRS_V1";
    /// `LpmTrie<PolicyKey, PolicyValue>`: what each local endpoint allows, per direction.
    pub const POLICY: &str = "NP_POLICY_V1";
    /// `LruHashMap<CtKey, CtValue>`: connections allowed so far, so replies pass.
    pub const CONNTRACK: &str = "NP_CT_V1";
    /// `Array<u32>` of length [`super::CONFIG_LEN`]: see [`super::CONFIG_GENERATION`].
    pub const CONFIG: &str = "NP_CONFIG_V1";
    /// `PerCpuArray<u64>` indexed by [`super::Reason`]: packets per verdict reason.
    pub const COUNTERS: &str = "NP_COUNTERS_V1";
}

/// Names of the two classifier programs, from the pod's point of view.
pub mod program_names {
    /// Attached to TC ingress of the host-side veth: packets the pod sends.
    pub const POD_EGRESS: &str = "pod_egress";
    /// Attached to TC egress of the host-side veth: packets delivered to the pod.
    pub const POD_INGRESS: &str = "pod_ingress";
}

/// Capacities of the maps (max_entries). Sized for 5,000 cluster pods (dual-stack), 110 local pods and
/// 1,000 policies on one node; see the README for what happens at capacity.
pub mod capacity {
    pub const ENDPOINTS: u32 = 1024;
    pub const IPCACHE: u32 = 32_768;
    pub const CIDRS: u32 = 16_384;
    pub const POLICY: u32 = 262_144;
    pub const CONNTRACK: u32 = 262_144;
}

/// Index of the policy generation in the CONFIG map. The agent bumps it after every update that removed
/// an allow; a conntrack entry created under an older generation is re-checked against policy on its next
/// forward packet, so a revoked allow also ends established connections.
pub const CONFIG_GENERATION: u32 = 0;
/// Length of the CONFIG array.
pub const CONFIG_LEN: u32 = 4;

/// Direction from the local pod's point of view.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Traffic delivered to the local pod.
    Ingress = 0,
    /// Traffic sent by the local pod.
    Egress = 1,
}

impl Direction {
    /// The other direction.
    pub const fn opposite(self) -> Self {
        match self {
            Direction::Ingress => Direction::Egress,
            Direction::Egress => Direction::Ingress,
        }
    }
}

/// Bits of [`EndpointInfo::flags`].
pub mod endpoint_flags {
    /// Some policy selects the pod for ingress: only allowed traffic may reach it.
    pub const ISOLATED_INGRESS: u32 = 1 << 0;
    /// Some policy selects the pod for egress: only allowed traffic may leave it.
    pub const ISOLATED_EGRESS: u32 = 1 << 1;
}

/// Value of the ENDPOINTS map, keyed by the host veth's ifindex (which is also the endpoint id used
/// in [`PolicyKey`], [`IpInfo`] and [`CtKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointInfo {
    /// [`endpoint_flags`].
    pub flags: u32,
    /// Reserved, zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<EndpointInfo>() == 8);

/// An address as 16 bytes in network order: IPv6 as is, IPv4 as an IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`), so one map and one trie serve both families. An IPv4 prefix of length L is an
/// [`IpKey`] prefix of length 96 + L.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct IpKey {
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<IpKey>() == 16);

impl IpKey {
    /// The IPv4-mapped form of an IPv4 address given as 4 bytes in network order.
    pub const fn from_v4(octets: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12] = octets[0];
        addr[13] = octets[1];
        addr[14] = octets[2];
        addr[15] = octets[3];
        IpKey { addr }
    }
}

/// Prefix length added to an IPv4 prefix to make it an [`IpKey`] prefix.
pub const V4_MAPPED_PREFIX: u32 = 96;

/// Reserved security identities. Pod identities (one per distinct namespace, label set and named
/// ports) start at [`identity::FIRST_POD`]; CIDR identities (one per ipBlock prefix) at
/// [`identity::FIRST_CIDR`].
pub mod identity {
    /// No identity: never stored.
    pub const NONE: u32 = 0;
    /// An address of the local node itself (kubelet probes): always allowed to reach local pods.
    pub const HOST: u32 = 1;
    /// Wildcard peer in [`super::PolicyKey`]: a rule that allows every peer (no `from`/`to`).
    pub const ANY: u32 = 2;
    /// First identity given to pods.
    pub const FIRST_POD: u32 = 256;
    /// First identity given to ipBlock prefixes; pod identities stay below it.
    pub const FIRST_CIDR: u32 = 0x8000_0000;
}

/// Value of the IPCACHE map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IpInfo {
    /// The security identity of the address ([`identity`]).
    pub identity: u32,
    /// The endpoint id (host veth ifindex) of the local pod that owns the address, or 0 when the
    /// address is not a local pod's. Used for the anti-spoofing check.
    pub endpoint: u32,
}
const _: () = assert!(size_of::<IpInfo>() == 8);

/// Data of a POLICY trie key. Fields are ordered from most to least specific so that the wildcards a
/// NetworkPolicy rule can express are prefixes:
/// - a rule without ports matches every protocol: prefix [`POLICY_PREFIX_ANY_PROTOCOL`];
/// - a rule for a protocol without a port: prefix [`POLICY_PREFIX_ANY_PORT`];
/// - one port: prefix [`POLICY_PREFIX_FULL`];
/// - a port range (`endPort`): a few prefixes between the last two, since `port` is big-endian.
///
/// The datapath always looks up a full-length key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PolicyKey {
    /// Endpoint id (host veth ifindex) of the local pod.
    pub endpoint: u32,
    /// Identity of the peer ([`identity`]).
    pub identity: u32,
    /// [`Direction`] as u8.
    pub direction: u8,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP, 1 ICMP, 58 ICMPv6).
    pub protocol: u8,
    /// Destination port in network byte order (0 where the protocol has none).
    pub port_be: [u8; 2],
}
const _: () = assert!(size_of::<PolicyKey>() == 12);

/// Prefix length (bits) of a policy key that matches every protocol and port.
pub const POLICY_PREFIX_ANY_PROTOCOL: u32 = 72;
/// Prefix length (bits) of a policy key that matches every port of one protocol.
pub const POLICY_PREFIX_ANY_PORT: u32 = 80;
/// Prefix length (bits) of a policy key that matches one port.
pub const POLICY_PREFIX_FULL: u32 = 96;

/// Value of the POLICY trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyValue {
    /// Identifier of (one of) the policies that allow this, for observability.
    pub policy: u32,
    /// Reserved, zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<PolicyValue>() == 8);

/// Key of the CONNTRACK map: a flow as its first packet was seen at one endpoint, in one direction.
/// For ICMP echo, `src_port` is the echo id for requests and `dst_port` for replies (the other is 0),
/// so a reply's reversed tuple equals its request's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host byte order.
    pub src_port: u16,
    /// Host byte order.
    pub dst_port: u16,
    /// Endpoint id (host veth ifindex) where the flow was seen.
    pub endpoint: u32,
    pub protocol: u8,
    /// [`Direction`] of the first packet at that endpoint.
    pub direction: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<CtKey>() == 44);

/// Value of the CONNTRACK map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValue {
    /// Policy generation ([`CONFIG_GENERATION`]) under which the flow was last allowed.
    pub generation: u32,
    /// Reserved, zero.
    pub _pad: u32,
    /// `bpf_ktime_get_ns` of the last packet.
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<CtValue>() == 16);

/// Why a packet got its verdict. Stable codes: never reused, never renumbered. Index into COUNTERS.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Allowed: not an IP packet (ARP) or IPv6 neighbour discovery / MLD.
    AllowedNotPoliced = 0,
    /// Allowed: the pod is not isolated in this direction.
    AllowedNotIsolated = 1,
    /// Allowed by a policy rule.
    AllowedPolicy = 2,
    /// Allowed: belongs to a connection already allowed (same direction).
    AllowedEstablished = 3,
    /// Allowed: a reply to (or ICMP error about) a connection allowed in the other direction.
    AllowedReply = 4,
    /// Allowed: from the pod's own node (kubelet probes).
    AllowedHost = 5,
    /// Dropped: the pod is isolated for ingress and no rule allows it.
    DroppedIngressDenied = 16,
    /// Dropped: the pod is isolated for egress and no rule allows it.
    DroppedEgressDenied = 17,
    /// Dropped: sent by a pod with a source address that is not one of its own.
    DroppedSpoofedSource = 18,
    /// Dropped: headers truncated or inconsistent.
    DroppedMalformed = 19,
    /// Dropped: seen on a veth that has programs attached but no endpoint entry (fail closed).
    DroppedUnknownEndpoint = 20,
}

/// Length of the COUNTERS array: one slot per [`Reason`] code.
pub const REASON_SLOTS: u32 = 32;

impl Reason {
    /// Every reason, for userspace reporting.
    pub const ALL: [Reason; 11] = [
        Reason::AllowedNotPoliced,
        Reason::AllowedNotIsolated,
        Reason::AllowedPolicy,
        Reason::AllowedEstablished,
        Reason::AllowedReply,
        Reason::AllowedHost,
        Reason::DroppedIngressDenied,
        Reason::DroppedEgressDenied,
        Reason::DroppedSpoofedSource,
        Reason::DroppedMalformed,
        Reason::DroppedUnknownEndpoint,
    ];

    /// True for the reasons that drop the packet.
    pub const fn is_drop(self) -> bool {
        (self as u32) >= 16
    }

    /// The stable, kebab-case name used in logs, `status` and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::AllowedNotPoliced => "not-policed",
            Reason::AllowedNotIsolated => "not-isolated",
            Reason::AllowedPolicy => "policy",
            Reason::AllowedEstablished => "established",
            Reason::AllowedReply => "reply",
            Reason::AllowedHost => "host",
            Reason::DroppedIngressDenied => "ingress-denied",
            Reason::DroppedEgressDenied => "egress-denied",
            Reason::DroppedSpoofedSource => "spoofed-source",
            Reason::DroppedMalformed => "malformed",
            Reason::DroppedUnknownEndpoint => "unknown-endpoint",
        }
    }
}

/// IP protocol numbers the datapath and the compiler agree on.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: every type is `repr(C)`, `Copy`, and has no implicit padding (sizes asserted above).
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::IpKey {}
    unsafe impl aya::Pod for super::IpInfo {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
}
