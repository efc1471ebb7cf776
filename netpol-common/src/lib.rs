//! Types shared by the TC programs (`netpol-ebpf`) and the agent (`netpol-agent`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and a static size assertion:
//! the kernel hashes padding bytes as part of a key, so no type may have implicit padding.
//! Map names carry a layout version (`_V1`, `_V2`): a layout change gets a new name, so an
//! upgraded agent never reads a pinned map of an older layout.
//!
//! The maps a policy decision reads (endpoints, addresses, prefixes, policy, Service verdicts and
//! frontends) exist twice, as two [`buffer`]s: the datapath reads the one the policy generation
//! names, the agent writes the other and then switches with one write of the generation, so a
//! packet sees the whole old or the whole new policy, never a mix.
#![no_std]

use core::mem::size_of;

/// The two buffers of the decision maps.
///
/// An update writes the buffer packets do not read, then makes it the one they read with a single
/// write of [`super::CONFIG_GENERATION`] (whose lowest bit names the buffer read); no intermediate
/// state of a change is ever visible to a packet. The same write also makes every established flow
/// be re-checked against the new buffer.
pub mod buffer {
    /// How many buffers there are.
    pub const COUNT: usize = 2;
    /// The buffer packets read under policy generation `generation`.
    pub const fn of(generation: u32) -> usize {
        (generation & 1) as usize
    }
}

/// What metrics and `status` call each pair of buffered maps (they count the buffer packets read).
pub mod map_labels {
    pub const ENDPOINTS: &str = "NP_ENDPOINT_V2";
    pub const IPCACHE: &str = "NP_IPCACHE_V2";
    pub const CIDRS: &str = "NP_CIDRS_V2";
    pub const POLICY: &str = "NP_POLICY_V2";
    pub const SERVICES: &str = "NP_SERVICES_V2";
    pub const FRONTENDS: &str = "NP_FRONTEND_V2";
}

/// Names of every map, defined once. They are also the pin file names under `<pin-dir>/maps/`.
/// The decision maps have one name per [`buffer`].
pub mod map_names {
    /// `HashMap<u32 ifindex, EndpointInfo>`: the local pods, keyed by their host veth.
    pub const ENDPOINTS: [&str; 2] = ["NP_ENDPOINT0_V2", "NP_ENDPOINT1_V2"];
    /// `HashMap<IpKey, IpInfo>`: every known pod address in the cluster and the node's own addresses.
    pub const IPCACHE: [&str; 2] = ["NP_IPCACHE0_V2", "NP_IPCACHE1_V2"];
    /// `LpmTrie<IpKey, u32 identity>`: every ipBlock prefix (and except) used by a policy.
    pub const CIDRS: [&str; 2] = ["NP_CIDRS0_V2", "NP_CIDRS1_V2"];
    /// `LpmTrie<PolicyKey, PolicyValue>`: what each local endpoint allows, per direction.
    pub const POLICY: [&str; 2] = ["NP_POLICY0_V2", "NP_POLICY1_V2"];
    /// Maps of the layout before the buffers (`_V1`): an agent of this build removes their pins.
    pub const OBSOLETE: [&str; 6] = [
        "NP_ENDPOINTS_V1",
        "NP_IPCACHE_V1",
        "NP_CIDRS_V1",
        "NP_POLICY_V1",
        "NP_SERVICES_V1",
        "NP_FRONTENDS_V1",
    ];
    /// `LruHashMap<CtKey, CtValue>`: connections allowed so far, so replies pass.
    pub const CONNTRACK: &str = "NP_CT_V2";
    /// The conntrack map of the layout before rule counters (`CtValue` without its rule): an agent
    /// of this build copies its entries into [`CONNTRACK`], then unpins it.
    pub const CONNTRACK_V1: &str = "NP_CT_V1";
    /// `PerCpuHashMap<RuleKey, RuleHits>`: packets, bytes, connections and the last hit of each
    /// policy rule that allowed something. Not LRU: the agent removes the entries of policies that
    /// are gone.
    pub const RULE_HITS: &str = "NP_RULEHITS_V1";
    /// `Array<u32>` of length [`super::CONFIG_LEN`]: see [`super::CONFIG_GENERATION`].
    pub const CONFIG: &str = "NP_CONFIG_V1";
    /// `PerCpuArray<u64>` indexed by [`super::Reason`]: packets per verdict reason.
    pub const COUNTERS: &str = "NP_COUNTERS_V1";
    /// `LruPerCpuHashMap<FlowKey, FlowValue>`: recent flows per endpoint and direction, with their
    /// verdict and packet and byte counts (per CPU: summed by userspace).
    pub const FLOWS: &str = "NP_FLOWS_V1";
    /// `PerCpuHashMap<DropKey, DropValue>`: dropped packets and bytes per endpoint, direction,
    /// reason and protocol. Not LRU: these survive flow eviction; the agent removes the entries of
    /// endpoints that are gone.
    pub const DROPS: &str = "NP_DROPS_V1";
    /// `RingBuf` of [`super::DropEvent`]s, rate-limited per CPU.
    pub const EVENTS: &str = "NP_EVENTS_V1";
    /// `LruPerCpuHashMap<u32 endpoint, TokenBucket>`: the drop-event rate limiter of each endpoint
    /// on each CPU, so one pod's flood of drops cannot use up the events of the others.
    pub const EVENT_BUDGET: &str = "NP_EVBUDGET_V1";
    /// `PerCpuArray<u64>` of length [`super::LOST_SLOTS`] indexed by [`super::lost`]: what could
    /// not be recorded (events rate-limited or not fitting the ring, full drop counters).
    pub const LOST: &str = "NP_LOST_V1";
    /// `PerCpuArray<u64>` of length [`super::VERDICT_SLOTS`]: policy decisions of new flows per
    /// direction, action and [`super::PolicyMatch`]; see [`super::verdict_slot`].
    pub const VERDICTS: &str = "NP_VERDICTS_V2";
    /// Counters of an older layout, unpinned without being read: `NP_VERDICTS_V1` had no slots
    /// for audited decisions (counters restart from zero, which Prometheus takes as a reset).
    pub const RETIRED: [&str; 1] = ["NP_VERDICTS_V1"];
    /// `LruHashMap<FragKey, FragValue>`: fragmented datagrams whose first fragment was allowed, so
    /// their later fragments (which carry no ports) pass with it.
    pub const FRAGS: &str = "NP_FRAGS_V1";
    /// `HashMap<u32 endpoint, u64>`: how many conntrack entries each endpoint holds, against its
    /// quota ([`super::CONFIG_CT_QUOTA`]); recounted exactly by the agent's collection.
    pub const CT_COUNT: &str = "NP_CTCOUNT_V1";

    /// The kernel keeps 15 bytes of an object name (`BPF_OBJ_NAME_LEN` is 16 with the NUL): a longer
    /// name would show truncated in `bpftool` while its pin keeps the full one.
    const fn fits(name: &str) -> bool {
        name.len() <= 15
    }
    const fn both_fit(names: [&str; 2]) -> bool {
        fits(names[0]) && fits(names[1])
    }
    const _: () = assert!(
        both_fit(ENDPOINTS)
            && both_fit(IPCACHE)
            && both_fit(CIDRS)
            && both_fit(POLICY)
            && both_fit(super::service::MAP_NAME)
            && both_fit(super::service::FRONTENDS_MAP_NAME)
            && fits(CONNTRACK)
            && fits(CONFIG)
            && fits(COUNTERS)
            && fits(FLOWS)
            && fits(DROPS)
            && fits(EVENTS)
            && fits(EVENT_BUDGET)
            && fits(LOST)
            && fits(VERDICTS)
            && fits(FRAGS)
            && fits(CT_COUNT)
            && fits(RULE_HITS)
    );
}

/// Names of the two classifier programs, from the pod's point of view.
pub mod program_names {
    /// Attached to TC ingress of the host-side veth: packets the pod sends.
    pub const POD_EGRESS: &str = "pod_egress";
    /// Attached to TC egress of the host-side veth: packets delivered to the pod.
    pub const POD_INGRESS: &str = "pod_ingress";
    /// Attached to TC egress of Flannel's VXLAN devices: decides egress through a Service to a
    /// backend on another node (see [`super::service`]).
    pub const TUNNEL_EGRESS: &str = "tunnel_egress";
}

/// Capacities of the maps (max_entries), the defaults of the agent's `--max-*` flags. Sized for
/// 50,000 cluster pods (dual-stack), 110 local pods and 10,000 policies; docs/datapath.md says what
/// happens at capacity.
pub mod capacity {
    pub const ENDPOINTS: u32 = 1024;
    /// Every pod address of the cluster (two per dual-stack pod) and the nodes'. Not preallocated:
    /// kernel memory follows the entries written, not this bound.
    pub const IPCACHE: u32 = 131_072;
    pub const CIDRS: u32 = 16_384;
    pub const POLICY: u32 = 262_144;
    pub const CONNTRACK: u32 = 262_144;
    /// Per-CPU LRU: about `FLOWS * (100 + 48 * CPUs)` bytes (26 MiB on 32 CPUs).
    pub const FLOWS: u32 = 16_384;
    /// (endpoint, direction, reason, protocol) drop counters.
    pub const DROPS: u32 = 16_384;
    /// Bytes of the drop-event ring buffer (a power of two, a multiple of the page size).
    pub const EVENTS_BYTES: u32 = 256 * 1024;
    /// Fragmented datagrams in reassembly at once (LRU: the oldest is forgotten first).
    pub const FRAGS: u32 = 8_192;
    /// Policy rules with hit counters (per CPU: about `RULES x (70 + 32 x CPUs)` bytes).
    pub const RULES: u32 = 8_192;
}

/// Index of the policy generation in the CONFIG map. Its lowest bit names the [`buffer`] packets
/// read. The agent bumps it once per update, after writing the other buffer: that one write switches
/// the buffers, and a conntrack entry created under an older generation is re-checked against policy
/// on its next packet, so a revoked allow also ends established connections.
pub const CONFIG_GENERATION: u32 = 0;
/// Index of the drop-event rate in the CONFIG map: events per second and CPU (also the burst);
/// 0 means [`DEFAULT_EVENT_RATE`].
pub const CONFIG_EVENT_RATE: u32 = 1;
/// Drop events per second and CPU when [`CONFIG_EVENT_RATE`] is 0.
pub const DEFAULT_EVENT_RATE: u32 = 1_000;
/// Index of the first conntrack timeout in the CONFIG map, in seconds, in the order of
/// [`CtTimeouts`]'s fields; 0 means the default ([`CtTimeouts::DEFAULT`]).
pub const CONFIG_CT_TIMEOUTS: u32 = 2;
/// Index of the conntrack quota in the CONFIG map: the most entries one endpoint may hold, so one
/// pod's flood of new flows cannot evict everyone else's; 0 means [`DEFAULT_CT_QUOTA`].
pub const CONFIG_CT_QUOTA: u32 = 6;
/// Entries per endpoint when [`CONFIG_CT_QUOTA`] is 0: a quarter of the table.
pub const DEFAULT_CT_QUOTA: u32 = capacity::CONNTRACK / 4;
/// Length of the CONFIG array.
pub const CONFIG_LEN: u32 = 8;

/// How long a tracked flow lives without packets, in seconds, by state (as Cilium's conntrack does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtTimeouts {
    /// TCP with packets seen both ways and not closing.
    pub tcp_established: u32,
    /// TCP seen one way only so far (a SYN, or a lone ACK).
    pub tcp_opening: u32,
    /// TCP after a FIN or RST.
    pub tcp_closing: u32,
    /// UDP, SCTP, ICMP and everything else.
    pub other: u32,
}

impl CtTimeouts {
    /// Six hours established, a minute opening, ten seconds closing, a minute for the rest.
    pub const DEFAULT: CtTimeouts = CtTimeouts {
        tcp_established: 21_600,
        tcp_opening: 60,
        tcp_closing: 10,
        other: 60,
    };

    /// The CONFIG slot of the timeout that applies to a flow of `protocol` with [`ct_flags`]
    /// `flags`, and that timeout's default.
    pub const fn slot(protocol: u8, flags: u32) -> (u32, u32) {
        let d = Self::DEFAULT;
        if protocol != proto::TCP {
            (CONFIG_CT_TIMEOUTS + 3, d.other)
        } else if flags & ct_flags::CLOSING != 0 {
            (CONFIG_CT_TIMEOUTS + 2, d.tcp_closing)
        } else if flags & ct_flags::ESTABLISHED != 0 {
            (CONFIG_CT_TIMEOUTS, d.tcp_established)
        } else {
            (CONFIG_CT_TIMEOUTS + 1, d.tcp_opening)
        }
    }

    /// The timeouts as the CONFIG slots from [`CONFIG_CT_TIMEOUTS`] on.
    pub const fn slots(&self) -> [u32; 4] {
        [
            self.tcp_established,
            self.tcp_opening,
            self.tcp_closing,
            self.other,
        ]
    }

    /// The lifetime in seconds of a flow of `protocol` with `flags` under these timeouts.
    pub const fn lifetime(&self, protocol: u8, flags: u32) -> u32 {
        let (slot, _) = Self::slot(protocol, flags);
        self.slots()[(slot - CONFIG_CT_TIMEOUTS) as usize]
    }
}

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
    /// The agent has not matched the veth with a pod yet (or no longer can): the endpoint is
    /// isolated as the pending rule says and its denials are counted as `pending`.
    pub const PENDING: u32 = 1 << 2;
    /// The ingress isolation comes from policies in audit mode only: a packet no rule allows
    /// passes, counted as [`super::Reason::AuditedIngressDenied`]. Never set together with an
    /// enforced isolation of that direction (the compiler then writes the enforced rules alone).
    pub const AUDIT_INGRESS: u32 = 1 << 3;
    /// As [`AUDIT_INGRESS`], for egress ([`super::Reason::AuditedEgressDenied`]).
    pub const AUDIT_EGRESS: u32 = 1 << 4;
    /// An Admin-tier ClusterNetworkPolicy with ingress rules selects the pod: POLICY holds its
    /// [`super::tier`] entries for ingress, looked up before the NetworkPolicy tier.
    pub const ADMIN_INGRESS: u32 = 1 << 5;
    /// As [`ADMIN_INGRESS`], for egress.
    pub const ADMIN_EGRESS: u32 = 1 << 6;
    /// A Baseline-tier ClusterNetworkPolicy with ingress rules selects the pod: looked up when no
    /// NetworkPolicy isolates it for ingress (and the Admin tier decided nothing).
    pub const BASELINE_INGRESS: u32 = 1 << 7;
    /// As [`BASELINE_INGRESS`], for egress.
    pub const BASELINE_EGRESS: u32 = 1 << 8;
    /// Some policy of some tier decides for the endpoint in some direction: its flows are tracked.
    pub const POLICED: u32 = ISOLATED_INGRESS
        | ISOLATED_EGRESS
        | ADMIN_INGRESS
        | ADMIN_EGRESS
        | BASELINE_INGRESS
        | BASELINE_EGRESS;

    /// The isolation bit of `direction`.
    pub const fn isolated(direction: super::Direction) -> u32 {
        match direction {
            super::Direction::Ingress => ISOLATED_INGRESS,
            super::Direction::Egress => ISOLATED_EGRESS,
        }
    }

    /// The audit bit of `direction`.
    pub const fn audit(direction: super::Direction) -> u32 {
        match direction {
            super::Direction::Ingress => AUDIT_INGRESS,
            super::Direction::Egress => AUDIT_EGRESS,
        }
    }

    /// The bit of ClusterNetworkPolicy rules of `tier` ([`super::tier::ADMIN`] or
    /// [`super::tier::BASELINE`]) in `direction`.
    pub const fn tiered(direction: super::Direction, tier: u8) -> u32 {
        let admin = tier == super::tier::ADMIN;
        match direction {
            super::Direction::Ingress if admin => ADMIN_INGRESS,
            super::Direction::Egress if admin => ADMIN_EGRESS,
            super::Direction::Ingress => BASELINE_INGRESS,
            super::Direction::Egress => BASELINE_EGRESS,
        }
    }

    /// Whether any ClusterNetworkPolicy tier has rules for the endpoint in `direction`.
    pub const fn any_tier(flags: u32, direction: super::Direction) -> bool {
        flags & (tiered(direction, super::tier::ADMIN) | tiered(direction, super::tier::BASELINE))
            != 0
    }
}

/// ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2) in the datapath. Its rules are POLICY
/// entries too, apart from NetworkPolicy allows by the key's `direction` byte
/// ([`key_direction`]); the value's `rule` packs the rule's precedence, action and
/// [`super::rule_code`]. Per peer identity the compiler folds every rule that matches a port into
/// the longest prefix (its value is the rule of least rank among all prefixes covering it), so one
/// lookup per identity finds the first matching rule of that identity, and the least rank over the
/// peer's identities (pod, every pod, CIDR, any) is the tier's first matching rule.
pub mod tier {
    /// The tier evaluated before NetworkPolicy.
    pub const ADMIN: u8 = 1;
    /// The tier evaluated after NetworkPolicy (for pods no NetworkPolicy isolates).
    pub const BASELINE: u8 = 2;

    /// Deny: dropped; no later rule or tier is asked. (The action values order a tie between
    /// equal ranks: Deny, then Pass, then Accept, so a tie never opens anything.)
    pub const DENY: u8 = 0;
    /// Pass: the rest of this tier is skipped; the next tier decides.
    pub const PASS: u8 = 1;
    /// Accept: allowed, with replies; no later rule or tier is asked.
    pub const ACCEPT: u8 = 2;

    /// Ranks past this one share it.
    pub const MAX_RANK: u32 = 0xffff;

    /// The `direction` byte of a POLICY key of `tier`'s rules (NetworkPolicy allows use the bare
    /// direction, 0 or 1).
    pub const fn key_direction(direction: super::Direction, tier: u8) -> u8 {
        (tier << 1) | direction as u8
    }

    /// The value's `rule` of a tier entry: rank (lower first) in the top 16 bits, the action in
    /// bits 14-15, the [`super::rule_code`] below. The number orders by precedence: the smaller
    /// comes first ([`precedes`]), which the datapath compares with one instruction.
    pub const fn pack(rank: u32, action: u8, code: u32) -> u32 {
        let rank = if rank > MAX_RANK { MAX_RANK } else { rank };
        (rank << 16) | (((action & 3) as u32) << 14) | (code & 0x3fff)
    }

    /// The action of a packed `rule`.
    pub const fn action(rule: u32) -> u8 {
        ((rule >> 14) & 3) as u8
    }

    /// The rank of a packed `rule`.
    pub const fn rank(rule: u32) -> u32 {
        rule >> 16
    }

    /// The [`super::rule_code`] of a packed `rule`.
    pub const fn code(rule: u32) -> u32 {
        rule & 0x3fff
    }

    /// Whether the packed rule `a` takes precedence over `b`: the lower rank; between equal ranks
    /// (only past [`MAX_RANK`]) Deny, then Pass, then Accept.
    pub const fn precedes(a: u32, b: u32) -> bool {
        a < b
    }
}

/// Value of the ENDPOINTS map, keyed by the host veth's ifindex (which is also the endpoint id used
/// in [`PolicyKey`], [`IpInfo`] and [`CtKey`]).
///
/// The link identity (`mac`, `link_local`) is what the pod's interface really has, read by the agent
/// from the kernel; the datapath drops frames, ARP and neighbour discovery that claim any other.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointInfo {
    /// [`endpoint_flags`].
    pub flags: u32,
    /// Reserved, zero.
    pub _pad: u32,
    /// The MAC address of the pod's interface (the veth peer). All zero when unknown: then every
    /// frame the pod sends fails the source MAC check (fail closed).
    pub mac: [u8; 6],
    /// Reserved, zero.
    pub _pad2: [u8; 2],
    /// The pod interface's IPv6 link-local address, all zero when it has none: the one source besides
    /// `::` and the pod's own addresses that its neighbour discovery may use.
    pub link_local: [u8; 16],
}
const _: () = assert!(size_of::<EndpointInfo>() == 32);

impl EndpointInfo {
    /// An endpoint with `flags` and the given link identity.
    pub const fn new(flags: u32, mac: [u8; 6], link_local: [u8; 16]) -> Self {
        EndpointInfo {
            flags,
            _pad: 0,
            mac,
            _pad2: [0; 2],
            link_local,
        }
    }
}

/// An address as 16 bytes in network order: IPv6 as is, IPv4 as an IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`), so one map and one trie serve both families. An IPv4 prefix of length L is an
/// [`IpKey`] prefix of length 96 + L.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpKey {
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<IpKey>() == 16);

/// Byte order, as a derived `Ord` would give, compared as one big-endian integer: the agent keeps
/// 100,000 of these in ordered maps, where a byte-slice comparison is a `memcmp` call per step.
impl Ord for IpKey {
    fn cmp(&self, other: &Self) -> core::cmp::Ordering {
        u128::from_be_bytes(self.addr).cmp(&u128::from_be_bytes(other.addr))
    }
}

impl PartialOrd for IpKey {
    fn partial_cmp(&self, other: &Self) -> Option<core::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

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
    /// An address of a local endpoint whose pod is not identified yet: it matches no pod selector.
    pub const PENDING: u32 = 3;
    /// Wildcard peer in [`super::PolicyKey`]: every pod of the cluster (a peer that selects all
    /// namespaces and all their pods), matched by any peer whose IPCACHE identity is a pod's. One
    /// entry instead of one per pod identity.
    pub const ALL_PODS: u32 = 4;
    /// First identity given to pods.
    pub const FIRST_POD: u32 = 256;
    /// First identity given to ipBlock prefixes; pod identities stay below it.
    pub const FIRST_CIDR: u32 = 0x8000_0000;

    /// Whether `id` is a pod identity (of a peer pod of the cluster).
    pub const fn is_pod(id: u32) -> bool {
        id >= FIRST_POD && id < FIRST_CIDR
    }
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

/// Value of the POLICY trie: the rule that allows (one of them, when several do), which is also
/// the key of its hit counters.
pub type PolicyValue = RuleKey;

/// A rule of a policy: the policy's id and [`rule_code`] of the rule. Key of the RULE_HITS map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RuleKey {
    /// Identifier of the policy, for observability (a hash of `namespace/name`).
    pub policy: u32,
    /// [`rule_code`] of the rule, [`rule_code::NONE`] when it is not known (nothing is counted).
    pub rule: u32,
}
const _: () = assert!(size_of::<RuleKey>() == 8);

/// A rule's direction and index in its policy (`ingress[2]`) as one number that fits the 14 bits a
/// decision carries it in.
pub mod rule_code {
    /// No rule: nothing is counted.
    pub const NONE: u32 = 0;
    /// The largest rule index that gets a code (later rules allow, but are not counted).
    pub const MAX_INDEX: u32 = 0xfff;
    const PRESENT: u32 = 1 << 13;

    /// The code of rule `index` of `direction`, [`NONE`] past [`MAX_INDEX`].
    pub const fn of(direction: super::Direction, index: u32) -> u32 {
        if index > MAX_INDEX {
            return NONE;
        }
        PRESENT | ((direction as u32) << 12) | index
    }

    /// The direction and index of a code, `None` for [`NONE`] and non-codes.
    pub const fn parse(code: u32) -> Option<(super::Direction, u32)> {
        if code & !(PRESENT | 0x1fff) != 0 || code & PRESENT == 0 {
            return None;
        }
        let direction = if code & (1 << 12) == 0 {
            super::Direction::Ingress
        } else {
            super::Direction::Egress
        };
        Some((direction, code & MAX_INDEX))
    }
}

/// Value of the RULE_HITS map, one per CPU: userspace adds the counts and takes the latest hit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RuleHits {
    /// Packets of the connections the rule allowed, both ways.
    pub packets: u64,
    /// Bytes of those packets (`skb->len`).
    pub bytes: u64,
    /// Connections the rule allowed (first packets of untracked flows).
    pub connections: u64,
    /// `bpf_ktime_get_ns` of the last packet.
    pub last_hit_ns: u64,
}
const _: () = assert!(size_of::<RuleHits>() == 32);

impl RuleHits {
    /// Two CPUs' counts together: counts added, the later hit.
    pub const fn plus(self, other: RuleHits) -> RuleHits {
        RuleHits {
            packets: self.packets + other.packets,
            bytes: self.bytes + other.bytes,
            connections: self.connections + other.connections,
            last_hit_ns: if self.last_hit_ns > other.last_hit_ns {
                self.last_hit_ns
            } else {
                other.last_hit_ns
            },
        }
    }
}

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

/// Bits of [`CtValue::flags`].
pub mod ct_flags {
    /// The flow goes to a Service frontend whose egress verdict is decided after DNAT: every packet
    /// gets [`super::service::DEFER_MARK`].
    pub const SERVICE_DEFERRED: u32 = 1 << 0;
    /// A packet has been seen in the reply direction.
    pub const ESTABLISHED: u32 = 1 << 1;
    /// A TCP FIN or RST has been seen.
    pub const CLOSING: u32 = 1 << 2;
    /// The flow passed only because its direction's isolation is in audit mode: each packet of it
    /// in that direction counts as a would-be drop (replies do not).
    pub const AUDITED: u32 = 1 << 3;
}

/// Value of the CONNTRACK map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValue {
    /// Policy generation ([`CONFIG_GENERATION`]) under which the flow was last allowed.
    pub generation: u32,
    /// [`ct_flags`].
    pub flags: u32,
    /// `bpf_ktime_get_ns` of the last packet.
    pub last_seen_ns: u64,
    /// The rule that allowed the flow, whose counters its packets add to.
    pub rule: RuleKey,
}
const _: () = assert!(size_of::<CtValue>() == 24);

/// Value of the CONNTRACK map of the V1 layout ([`map_names::CONNTRACK_V1`]): [`CtValue`] without
/// its rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValueV1 {
    pub generation: u32,
    pub flags: u32,
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<CtValueV1>() == 16);

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
    /// Allowed: to a Service frontend whose every backend the pod's egress policy allows.
    AllowedService = 6,
    /// Allowed at the pod's veth to a Service frontend with some allowed backends; decided after
    /// kube-proxy's DNAT (see [`service`]).
    AllowedServiceDeferred = 7,
    /// Allowed: a later fragment of a datagram whose first fragment was allowed.
    AllowedFragment = 8,
    /// Passed, but only because the pod's ingress isolation is in audit mode: no rule allows it, so
    /// an enforced policy would drop it (a would-be drop, Hubble's `AUDIT` verdict).
    AuditedIngressDenied = 9,
    /// As [`Reason::AuditedIngressDenied`], for egress.
    AuditedEgressDenied = 10,
    /// Allowed by an Accept rule of a ClusterNetworkPolicy (Admin or Baseline tier).
    AllowedClusterPolicy = 11,
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
    /// Dropped: a pod's frame claims a link identity that is not its own (Ethernet source MAC, ARP
    /// sender, neighbour discovery source, target or link-layer option), or is a router's message
    /// (Router Advertisement, Redirect) that a pod has no business sending.
    DroppedSpoofedLink = 21,
    /// Dropped: an EtherType other than IPv4, IPv6 and ARP at a pod isolated in that direction.
    DroppedEtherType = 22,
    /// Dropped: a unicast IP packet delivered to a pod whose addresses do not include its
    /// destination (a poisoned neighbour or bridge entry handing one pod another's traffic).
    DroppedNotForPod = 23,
    /// Dropped: a packet whose Service egress verdict was deferred to after DNAT, but whose client
    /// pod cannot be identified there (masqueraded, or not a local pod): never left undecided.
    DroppedServiceUnresolved = 24,
    /// Dropped: the veth belongs to a pod the agent has not identified yet (attached on sight), or
    /// no longer can (its pod is gone or two veths claim one address); only the node may talk to it.
    DroppedPending = 25,
    /// Dropped by a Deny rule of a ClusterNetworkPolicy (Admin or Baseline tier).
    DroppedClusterPolicy = 26,
}

/// Length of the COUNTERS array: one slot per [`Reason`] code.
pub const REASON_SLOTS: u32 = 32;

impl Reason {
    /// Every reason, for userspace reporting.
    pub const ALL: [Reason; 23] = [
        Reason::AllowedNotPoliced,
        Reason::AllowedNotIsolated,
        Reason::AllowedPolicy,
        Reason::AllowedEstablished,
        Reason::AllowedReply,
        Reason::AllowedHost,
        Reason::AllowedService,
        Reason::AllowedServiceDeferred,
        Reason::AllowedFragment,
        Reason::AuditedIngressDenied,
        Reason::AuditedEgressDenied,
        Reason::AllowedClusterPolicy,
        Reason::DroppedIngressDenied,
        Reason::DroppedEgressDenied,
        Reason::DroppedSpoofedSource,
        Reason::DroppedMalformed,
        Reason::DroppedUnknownEndpoint,
        Reason::DroppedSpoofedLink,
        Reason::DroppedEtherType,
        Reason::DroppedNotForPod,
        Reason::DroppedServiceUnresolved,
        Reason::DroppedPending,
        Reason::DroppedClusterPolicy,
    ];

    /// True for the reasons that drop the packet.
    pub const fn is_drop(self) -> bool {
        (self as u32) >= 16
    }

    /// True for the would-be drops of audit mode (the packet passed).
    pub const fn is_audit(self) -> bool {
        matches!(
            self,
            Reason::AuditedIngressDenied | Reason::AuditedEgressDenied
        )
    }

    /// The [`verdict`] of a packet with this reason.
    pub const fn verdict(self) -> u8 {
        verdict::of(self as u8)
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
            Reason::AllowedService => "service",
            Reason::AllowedServiceDeferred => "service-deferred",
            Reason::AllowedFragment => "fragment",
            Reason::AuditedIngressDenied => "audit-ingress-denied",
            Reason::AuditedEgressDenied => "audit-egress-denied",
            Reason::DroppedIngressDenied => "ingress-denied",
            Reason::DroppedEgressDenied => "egress-denied",
            Reason::DroppedSpoofedSource => "spoofed-source",
            Reason::DroppedMalformed => "malformed",
            Reason::DroppedUnknownEndpoint => "unknown-endpoint",
            Reason::DroppedSpoofedLink => "spoofed-link",
            Reason::DroppedEtherType => "ethertype",
            Reason::DroppedNotForPod => "not-for-pod",
            Reason::DroppedServiceUnresolved => "service-unresolved",
            Reason::DroppedPending => "pending",
            Reason::AllowedClusterPolicy => "cluster-policy",
            Reason::DroppedClusterPolicy => "cluster-policy-denied",
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
    /// Every other protocol, in DROPS keys (IANA's reserved 255).
    pub const OTHER: u8 = 255;

    /// The protocol as DROPS counts it: the five above, 0 (not parsed), or [`OTHER`]. The sender
    /// picks the protocol number: bounding the classes bounds how many drop counters one pod can
    /// create for any endpoint.
    pub const fn class(protocol: u8) -> u8 {
        match protocol {
            0 | ICMP | TCP | UDP | ICMPV6 | SCTP => protocol,
            _ => OTHER,
        }
    }
}

/// Key of the FRAGS map: one fragmented datagram (RFC 791/8200: source, destination, protocol and
/// identification) as seen at one endpoint in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// IPv4 identification (16 bits) or IPv6 fragment header identification.
    pub id: u32,
    /// Endpoint id (host veth ifindex).
    pub endpoint: u32,
    pub protocol: u8,
    /// [`Direction`].
    pub direction: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FragKey>() == 44);

/// Value of the FRAGS map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragValue {
    /// Policy generation under which the first fragment was allowed: later fragments pass only
    /// under the same one.
    pub generation: u32,
    /// Reserved, zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<FragValue>() == 8);

/// Key of the FLOWS map: a packet's 5-tuple as seen at one endpoint in one direction. Ports are
/// host byte order; for ICMP echo, `src_port`/`dst_port` carry the echo id as in [`CtKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct FlowKey {
    pub src: IpKey,
    pub dst: IpKey,
    pub src_port: u16,
    pub dst_port: u16,
    /// Endpoint id (host veth ifindex).
    pub endpoint: u32,
    pub protocol: u8,
    /// [`Direction`] of the packets of this record.
    pub direction: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKey>() == 44);

/// [`FlowValue::verdict`] and [`DropEvent`] verdicts.
pub mod verdict {
    pub const ALLOWED: u8 = 0;
    pub const DROPPED: u8 = 1;
    /// Passed, but an enforced policy would have dropped it (audit mode).
    pub const AUDIT: u8 = 2;

    /// The verdict of a [`super::Reason`] code.
    pub const fn of(reason: u8) -> u8 {
        if reason >= super::Reason::DroppedIngressDenied as u8 {
            DROPPED
        } else if reason == super::Reason::AuditedIngressDenied as u8
            || reason == super::Reason::AuditedEgressDenied as u8
        {
            AUDIT
        } else {
            ALLOWED
        }
    }
}

/// What kind of policy rule decided a new flow (Hubble's `match` label).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyMatch {
    /// No rule: the pod is not isolated, the peer is the node, or nothing allowed it.
    None = 0,
    /// A rule with peers and no ports.
    L3 = 1,
    /// A rule with ports (with peers, or for every peer).
    L3L4 = 2,
    /// A rule with neither peers nor ports: allows everything.
    All = 3,
}

impl PolicyMatch {
    /// Every match kind.
    pub const ALL: [PolicyMatch; 4] = [
        PolicyMatch::None,
        PolicyMatch::L3,
        PolicyMatch::L3L4,
        PolicyMatch::All,
    ];

    /// The label value used in metrics.
    pub const fn name(self) -> &'static str {
        match self {
            PolicyMatch::None => "none",
            PolicyMatch::L3 => "l3",
            PolicyMatch::L3L4 => "l3-l4",
            PolicyMatch::All => "all",
        }
    }

    /// The kind of a code, [`PolicyMatch::None`] for unknown codes.
    pub const fn from_code(code: u8) -> Self {
        match code {
            1 => PolicyMatch::L3,
            2 => PolicyMatch::L3L4,
            3 => PolicyMatch::All,
            _ => PolicyMatch::None,
        }
    }
}

/// Length of the VERDICTS array.
pub const VERDICT_SLOTS: u32 = 32;

/// Slot of VERDICTS counting decisions in `direction` with `verdict` ([`verdict`]) and `matched`.
pub const fn verdict_slot(direction: u8, verdict: u8, matched: u8) -> u32 {
    ((direction as u32 & 1) << 4) | ((verdict as u32 & 3) << 2) | (matched as u32 & 3)
}

/// Value of the FLOWS map, one per CPU: userspace adds `packets` and `bytes` over CPUs, takes the
/// earliest `first_seen_ns` and the latest `last_seen_ns` of the CPUs that saw packets
/// (`packets > 0`), and the decision of the CPU that last took one (see [`FlowValue::decided_ns`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    pub packets: u64,
    pub bytes: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the first packet on this CPU.
    pub first_seen_ns: u64,
    /// `bpf_ktime_get_ns` of the last packet on this CPU.
    pub last_seen_ns: u64,
    /// When this CPU last took a decision for the flow (a policy evaluation rather than a
    /// conntrack hit); 0 when it only saw established packets or replies.
    pub decided_ns: u64,
    /// The [`PolicyValue::policy`] of the POLICY entry that allowed the flow, 0 if none did.
    pub policy: u32,
    /// [`Reason`] code of the last packet's verdict (of the decision, when `decided_ns` is set).
    pub reason: u8,
    /// [`verdict`] of that reason ([`verdict::of`]).
    pub verdict: u8,
    /// [`PolicyMatch`] code of the decision.
    pub matched: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<FlowValue>() == 48);

/// Key of the DROPS map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DropKey {
    /// Endpoint id (host veth ifindex).
    pub endpoint: u32,
    /// [`Direction`].
    pub direction: u8,
    /// [`Reason`] code.
    pub reason: u8,
    /// [`proto::class`] of the IP protocol, 0 when the packet was not parsed that far.
    pub protocol: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<DropKey>() == 8);

/// Value of the DROPS map, one per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DropValue {
    pub packets: u64,
    /// Bytes of the dropped frames (`skb->len`, Ethernet header included).
    pub bytes: u64,
    /// Of `packets`, those that got no drop event (the endpoint's event budget or the ring was
    /// exhausted): what a flood hid, counted where it happened.
    pub unreported: u64,
}
const _: () = assert!(size_of::<DropValue>() == 24);

impl DropValue {
    /// The two counts added up (userspace sums the per-CPU copies).
    pub const fn plus(self, other: DropValue) -> DropValue {
        DropValue {
            packets: self.packets + other.packets,
            bytes: self.bytes + other.bytes,
            unreported: self.unreported + other.unreported,
        }
    }
}

/// One dropped packet, as streamed through the EVENTS ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DropEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub timestamp_ns: u64,
    /// The packet's flow; only `endpoint` and `direction` are set when it was not parsed
    /// (`protocol` 0).
    pub key: FlowKey,
    /// Bytes of the frame.
    pub len: u32,
    /// [`Reason`] code.
    pub reason: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(size_of::<DropEvent>() == 64);

/// The per-CPU drop-event rate limiter: a token bucket refilled at the configured rate, holding at
/// most one second's worth. Tokens are scaled by 1e9 (one event costs 1e9).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TokenBucket {
    pub tokens: u64,
    pub last_ns: u64,
}
const _: () = assert!(size_of::<TokenBucket>() == 16);

/// Slots of the LOST array.
pub mod lost {
    /// Drop events not sent because the CPU's token bucket was empty.
    pub const RATE_LIMITED: u32 = 0;
    /// Drop events not sent because the ring buffer was full.
    pub const RING_FULL: u32 = 1;
    /// Drops not counted in DROPS because that map was full (they are still in COUNTERS).
    pub const DROPS_FULL: u32 = 2;
    /// Flow records that could not be created.
    pub const FLOWS_FULL: u32 = 3;
}
/// Length of the LOST array.
pub const LOST_SLOTS: u32 = 4;

impl Reason {
    /// The reason of a code, if it is one.
    pub const fn from_code(code: u32) -> Option<Reason> {
        let mut i = 0;
        while i < Reason::ALL.len() {
            if Reason::ALL[i] as u32 == code {
                return Some(Reason::ALL[i]);
            }
            i += 1;
        }
        None
    }
}

/// Services: what a local pod's egress may do through a Service's virtual IP (ClusterIP), which
/// kube-proxy rewrites to a backend only after the packet left the pod's veth.
pub mod service {
    /// Names of the `HashMap<SvcKey, SvcValue>` map, per [`super::buffer`].
    pub const MAP_NAME: [&str; 2] = ["NP_SERVICES0_V2", "NP_SERVICES1_V2"];
    /// Capacity: (egress-isolated local pod, service frontend) pairs whose verdict is not a plain deny.
    pub const CAPACITY: u32 = 65_536;
    /// Every backend of the frontend is allowed: the connection is allowed at the pod's veth.
    pub const VERDICT_ALLOW: u16 = 1;
    /// Some backends are allowed, some not: allowed at the pod's veth with [`DEFER_MARK`] set on the
    /// packet, and decided after kube-proxy's DNAT where the backend is known (the backend's veth for a
    /// local backend, the Flannel VXLAN device for a remote one).
    pub const VERDICT_DEFER: u16 = 2;
    /// Name of the `LpmTrie<IpKey, u32>` of every Service frontend address (ClusterIP): an egress
    /// packet to one is judged on the Service's backends (SERVICES), never by a rule that happens to
    /// match the virtual address (an ipBlock around it, a rule without peers). A trie, so that more
    /// frontends than it holds are written as the ranges around them: every address of a range is
    /// then judged as a frontend (denied without a verdict), never by a rule.
    /// One name per [`super::buffer`].
    pub const FRONTENDS_MAP_NAME: [&str; 2] = ["NP_FRONTEND0_V2", "NP_FRONTEND1_V2"];
    /// Capacity of the frontends map: ClusterIPs of the cluster, both families.
    pub const FRONTENDS_CAPACITY: u32 = 16_384;
    /// `skb->mark` bit of a packet whose egress check is deferred to after DNAT. Chosen clear of
    /// kube-proxy's 0x4000 (masquerade) and 0x8000 (drop) bits and of Flannel's marks.
    pub const DEFER_MARK: u32 = 1 << 25;
}

/// Key of the SERVICES map: a local pod and a service frontend (virtual IP, protocol, port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SvcKey {
    /// Endpoint id (host veth ifindex) of the client pod.
    pub endpoint: u32,
    /// The frontend address (ClusterIP), IPv4-mapped for IPv4.
    pub vip: IpKey,
    /// Frontend port in network byte order.
    pub port_be: [u8; 2],
    pub protocol: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<SvcKey>() == 24);

/// Value of the SERVICES map. (Before rule counters `verdict` was a `u32` whose high half was zero:
/// on the little-endian CPUs the datapath runs on, such an entry reads as rule NONE.)
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SvcValue {
    /// [`service::VERDICT_ALLOW`] or [`service::VERDICT_DEFER`].
    pub verdict: u16,
    /// [`rule_code`] of (one of) the rules that allow a backend: the rule a connection allowed
    /// outright at the pod's veth counts to (a deferred one counts to the rule that allows the
    /// backend kube-proxy picked).
    pub rule: u16,
    /// Id of the policy of that rule.
    pub policy: u32,
}
const _: () = assert!(size_of::<SvcValue>() == 8);

#[cfg(feature = "user")]
mod user {
    // SAFETY: every type is `repr(C)`, `Copy`, and has no implicit padding (sizes asserted above).
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::IpKey {}
    unsafe impl aya::Pod for super::IpInfo {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::RuleKey {}
    unsafe impl aya::Pod for super::RuleHits {}
    unsafe impl aya::Pod for super::CtValueV1 {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::DropKey {}
    unsafe impl aya::Pod for super::DropValue {}
    unsafe impl aya::Pod for super::DropEvent {}
    unsafe impl aya::Pod for super::TokenBucket {}
    unsafe impl aya::Pod for super::SvcKey {}
    unsafe impl aya::Pod for super::SvcValue {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragValue {}
}

#[cfg(test)]
mod ip_key_order {
    use super::IpKey;

    /// The integer comparison orders keys as their bytes do.
    #[test]
    fn orders_as_the_bytes() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..10_000 {
            let mut a = [0u8; 16];
            let mut b = [0u8; 16];
            for i in 0..16 {
                // Few distinct bytes, so that long common prefixes occur.
                a[i] = (next() % 3) as u8 * 0x7f;
                b[i] = (next() % 3) as u8 * 0x7f;
            }
            let (x, y) = (IpKey { addr: a }, IpKey { addr: b });
            assert_eq!(x.cmp(&y), a.cmp(&b), "{a:?} {b:?}");
        }
    }
}
