//! Flows, as `netpol-agent flows` shows them: pure functions from the raw datapath records (FLOWS
//! entries and drop events) to resolved, filtered and formatted flows. Reading the maps is
//! [`crate::observe`]'s job; nothing here touches the kernel.

pub mod activity;
pub mod args;
pub mod filter;
pub mod render;
pub mod selector;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv6Addr},
    sync::Arc,
};

use netpol_common::{Direction, DropEvent, FlowKey, FlowValue, IpKey, Reason, proto, verdict};
use serde::{Deserialize, Serialize};

pub use self::filter::{DirectionFilter, Filter, FilterError, FlowFilter, Matcher, VerdictFilter};
use crate::{
    compiler::{policy_id, tiers},
    model::{ClusterState, Labels, Pod, PodKey, mode::Mode},
};

/// A flow record with its per-CPU values merged, or one drop event. Times are CLOCK_MONOTONIC ns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawFlow {
    pub key: FlowKey,
    pub packets: u64,
    pub bytes: u64,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// [`Reason`] code.
    pub reason: u8,
    /// [`verdict`] code.
    pub verdict: u8,
    /// [`netpol_common::PolicyMatch`] code.
    pub matched: u8,
    /// Id of the policy that allowed the flow, 0 if none.
    pub policy: u32,
}

/// Merges the per-CPU copies of a FLOWS value: counts add up, first/last seen are the extremes over
/// the CPUs that saw packets, and the decision is the latest one taken (a CPU that only saw
/// established packets counts only when no CPU took a decision). `None` when no CPU saw a packet.
pub fn merge(key: FlowKey, per_cpu: &[FlowValue]) -> Option<RawFlow> {
    let seen: Vec<&FlowValue> = per_cpu.iter().filter(|v| v.packets > 0).collect();
    let decision = seen
        .iter()
        .copied()
        .max_by_key(|v| (v.decided_ns, v.last_seen_ns))?;
    Some(RawFlow {
        key,
        packets: seen.iter().map(|v| v.packets).sum(),
        bytes: seen.iter().map(|v| v.bytes).sum(),
        first_seen_ns: seen.iter().map(|v| v.first_seen_ns).min().unwrap_or(0),
        last_seen_ns: seen.iter().map(|v| v.last_seen_ns).max().unwrap_or(0),
        reason: decision.reason,
        verdict: decision.verdict,
        matched: decision.matched,
        policy: decision.policy,
    })
}

/// A drop event as a one-packet flow.
pub fn from_event(e: &DropEvent) -> RawFlow {
    RawFlow {
        key: e.key,
        packets: 1,
        bytes: u64::from(e.len),
        first_seen_ns: e.timestamp_ns,
        last_seen_ns: e.timestamp_ns,
        reason: e.reason,
        verdict: verdict::of(e.reason),
        matched: 0,
        policy: 0,
    }
}

/// A CLOCK_MONOTONIC and a wall-clock reading taken together, to turn datapath times into dates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    pub mono_ns: u64,
    pub unix_ns: u64,
}

impl Clock {
    /// Unix time (ns) of a CLOCK_MONOTONIC time.
    pub fn unix_ns(&self, mono_ns: u64) -> u64 {
        (self.unix_ns + mono_ns).saturating_sub(self.mono_ns)
    }
}

/// Names for addresses, endpoints and policy ids, from the cluster state the agent enforces.
#[derive(Clone, Debug, Default)]
pub struct Resolver {
    /// Shared with the cluster state: an address costs a pointer, not a copy of the pod.
    pods_by_ip: HashMap<IpAddr, Arc<Pod>>,
    /// Every pod by name, for the label filters.
    pods: BTreeMap<PodKey, Arc<Pod>>,
    endpoints: BTreeMap<u32, PodKey>,
    policies: HashMap<u32, String>,
    /// (endpoint, direction) -> `namespace/name` of the policies that isolate it that way.
    isolating: HashMap<(u32, u8), Vec<String>>,
    /// Every policy, for `policies`.
    catalog: Vec<PolicyInfo>,
    /// Made from a published cluster state (not the empty default of an agent just started).
    published: bool,
}

/// What `policies` reports of a policy besides its counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyInfo {
    pub key: PodKey,
    pub id: u32,
    pub mode: Mode,
    /// Rules of each direction in the spec (a direction the policy does not isolate included).
    pub ingress_rules: u32,
    pub egress_rules: u32,
    /// Local pods it isolates and decides for, in either direction.
    pub local_pods: usize,
    /// The names of its rules, by rule code (ClusterNetworkPolicy rules may have one).
    pub rule_names: BTreeMap<u32, String>,
}

impl PolicyInfo {
    /// How reports and metrics name one of its rules: `ingress[0]`, followed by the rule's name
    /// where it has one (`ingress[0] monitoring-may-scrape`); `None` for no rule code.
    pub fn rule_label(&self, code: u32) -> Option<String> {
        let index = super::policies::rule_name(code)?;
        Some(match self.rule_names.get(&code) {
            Some(name) => format!("{index} {name}"),
            None => index,
        })
    }
}

impl Resolver {
    /// A resolver for `state`, with the local `endpoints` (pod -> host veth ifindex) and the
    /// policies that isolate them as compiled ([`crate::compiler::Compiled::isolating`]).
    pub fn new(
        state: &ClusterState,
        endpoints: &BTreeMap<PodKey, u32>,
        isolating: &BTreeMap<(u32, Direction), Vec<PodKey>>,
        default_mode: Mode,
    ) -> Self {
        let local: Vec<&Pod> = endpoints
            .keys()
            .filter_map(|k| state.pods.get(k).map(Arc::as_ref))
            .collect();
        let catalog = catalog(state, isolating, default_mode, &local);
        let pods_by_ip = state
            .pods
            .values()
            .filter(|p| !p.host_network)
            .flat_map(|p| p.ips.iter().map(move |ip| (*ip, p.clone())))
            .collect();
        let policies = catalog.iter().map(|p| (p.id, p.key.to_string())).collect();
        let isolating = isolating
            .iter()
            .map(|((ifindex, dir), keys)| {
                let names = keys.iter().map(PodKey::to_string).collect();
                ((*ifindex, *dir as u8), names)
            })
            .collect();
        Resolver {
            pods_by_ip,
            pods: state.pods.clone(),
            endpoints: endpoints.iter().map(|(k, v)| (*v, k.clone())).collect(),
            policies,
            isolating,
            catalog,
            published: true,
        }
    }

    /// Whether this resolver comes from a published cluster state.
    pub fn published(&self) -> bool {
        self.published
    }

    /// Whether a policy of the state has id `id`.
    pub fn knows_policy(&self, id: u32) -> bool {
        self.policies.contains_key(&id)
    }

    /// Every policy of the state, by namespace and name.
    pub fn catalog(&self) -> &[PolicyInfo] {
        &self.catalog
    }

    /// The pod that has `ip`, if any.
    pub fn pod(&self, ip: IpAddr) -> Option<&PodKey> {
        self.pods_by_ip.get(&ip).map(|p| &p.key)
    }

    /// The local pod of an endpoint id.
    pub fn endpoint(&self, ifindex: u32) -> Option<&PodKey> {
        self.endpoints.get(&ifindex)
    }

    /// The local endpoints.
    pub fn endpoints(&self) -> &BTreeMap<u32, PodKey> {
        &self.endpoints
    }

    /// `namespace/name` of a policy id, or `#<id>` when no known policy has it.
    pub fn policy(&self, id: u32) -> String {
        self.policies
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("#{id:08x}"))
    }

    /// The policies isolating `endpoint` in `direction`.
    pub fn isolating(&self, endpoint: u32, direction: u8) -> &[String] {
        self.isolating
            .get(&(endpoint, direction))
            .map(Vec::as_slice)
            .unwrap_or_default()
    }
}

impl filter::PodLabels for Resolver {
    fn labels_of(&self, pod: &str) -> Option<&Labels> {
        let (namespace, name) = pod.split_once('/')?;
        let pod = self.pods.get(&PodKey::new(namespace, name))?;
        Some(&pod.labels)
    }
}

/// Every policy of `state` with its mode, rule counts and the local pods it decides for.
fn catalog(
    state: &ClusterState,
    isolating: &BTreeMap<(u32, Direction), Vec<PodKey>>,
    default_mode: Mode,
    local: &[&Pod],
) -> Vec<PolicyInfo> {
    let mut local_pods: HashMap<&PodKey, BTreeSet<u32>> = HashMap::new();
    for ((endpoint, _), keys) in isolating {
        for k in keys {
            local_pods.entry(k).or_default().insert(*endpoint);
        }
    }
    let count = |rules: Option<usize>| rules.unwrap_or(0) as u32;
    state
        .policies
        .values()
        .map(|p| PolicyInfo {
            key: p.key.clone(),
            id: policy_id(&p.key),
            mode: state.policy_mode(p, default_mode).mode,
            ingress_rules: count(p.spec.ingress.as_ref().map(Vec::len)),
            egress_rules: count(p.spec.egress.as_ref().map(Vec::len)),
            local_pods: local_pods.get(&p.key).map_or(0, BTreeSet::len),
            rule_names: BTreeMap::new(),
        })
        .chain(cluster_catalog(state, local))
        .collect()
}

/// Every ClusterNetworkPolicy of `state`, named as [`tiers::display_key`] says, with the `local`
/// pods its subject selects.
fn cluster_catalog<'a>(
    state: &'a ClusterState,
    local: &'a [&'a Pod],
) -> impl Iterator<Item = PolicyInfo> + 'a {
    state.cluster_policies.values().map(move |p| PolicyInfo {
        key: tiers::display_key(p),
        id: tiers::cluster_policy_id(&p.name),
        mode: Mode::Enforce,
        ingress_rules: p.spec.ingress.len() as u32,
        egress_rules: p.spec.egress.len() as u32,
        local_pods: tiers::selected(p, state, local.iter().copied()),
        rule_names: tiers::rule_names(p),
    })
}

/// One flow as `flows` prints it. The JSON fields are a stable interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// RFC 3339 (UTC, milliseconds) of the last packet.
    pub time: String,
    /// The node whose datapath saw the flow (empty from an agent older than this field).
    #[serde(default)]
    pub node: String,
    pub src_ip: String,
    pub src_port: u16,
    pub dst_ip: String,
    pub dst_port: u16,
    /// `tcp`, `udp`, `sctp`, `icmp`, `icmpv6` or the protocol number.
    pub protocol: String,
    /// `ingress` (to the local pod) or `egress` (from it).
    pub direction: String,
    /// `allowed`, `dropped`, or `audit` (passed, but denied by the audited policies that isolate
    /// the pod: a would-be drop).
    pub verdict: String,
    /// The reason code's name (`policy`, `established`, `ingress-denied`, ...).
    pub reason: String,
    /// For an allow by policy: the policy that allowed it. For a ClusterNetworkPolicy's Accept or
    /// Deny: that policy (`cnp:admin/<name>`). For a denial by isolation (dropped or audit): the
    /// policies that isolate the pod in that direction (in audit mode for an audit). Otherwise empty.
    pub policies: Vec<String>,
    pub packets: u64,
    pub bytes: u64,
    /// `namespace/name`, or null when the address is not a known pod's.
    pub src_pod: Option<String>,
    pub dst_pod: Option<String>,
}

/// The address of an [`IpKey`] (IPv4-mapped addresses as IPv4).
pub fn ip_of(key: &IpKey) -> IpAddr {
    let v6 = Ipv6Addr::from(key.addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Name of an IP protocol number.
pub fn protocol_name(p: u8) -> String {
    match p {
        proto::TCP => "tcp".into(),
        proto::UDP => "udp".into(),
        proto::SCTP => "sctp".into(),
        proto::ICMP => "icmp".into(),
        proto::ICMPV6 => "icmpv6".into(),
        proto::OTHER => "other".into(),
        0 => "unknown".into(),
        n => n.to_string(),
    }
}

/// Name of a reason code.
pub fn reason_name(code: u8) -> String {
    Reason::from_code(u32::from(code)).map_or_else(|| format!("reason-{code}"), |r| r.name().into())
}

/// Name of a [`verdict`] code.
pub fn verdict_name(code: u8) -> &'static str {
    match code {
        verdict::DROPPED => "dropped",
        verdict::AUDIT => "audit",
        _ => "allowed",
    }
}

/// Name of a direction code.
pub fn direction_name(code: u8) -> &'static str {
    if code == Direction::Ingress as u8 {
        "ingress"
    } else {
        "egress"
    }
}

/// RFC 3339 (UTC, milliseconds) of a Unix time in ns.
pub fn rfc3339(unix_ns: u64) -> String {
    let t = chrono::DateTime::from_timestamp_nanos(i64::try_from(unix_ns).unwrap_or(i64::MAX));
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// What resolving a record needs besides the record: names, the clock, and the node's name.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    pub resolver: &'a Resolver,
    pub clock: Clock,
    pub node: &'a str,
}

/// Resolves a raw flow into what `flows` shows.
pub fn resolve(raw: &RawFlow, view: &View) -> Flow {
    let resolver = view.resolver;
    let (src, dst) = (ip_of(&raw.key.src), ip_of(&raw.key.dst));
    let policies = match Reason::from_code(u32::from(raw.reason)) {
        // The rule that decided: a NetworkPolicy's allow, a ClusterNetworkPolicy's Accept or Deny
        // (`cnp:admin/<name>`, `cnp:baseline/<name>`).
        Some(
            Reason::AllowedPolicy | Reason::AllowedClusterPolicy | Reason::DroppedClusterPolicy,
        ) if raw.policy != 0 => {
            vec![resolver.policy(raw.policy)]
        }
        Some(
            Reason::DroppedIngressDenied
            | Reason::DroppedEgressDenied
            | Reason::AuditedIngressDenied
            | Reason::AuditedEgressDenied,
        ) => resolver
            .isolating(raw.key.endpoint, raw.key.direction)
            .to_vec(),
        _ => Vec::new(),
    };
    Flow {
        time: rfc3339(view.clock.unix_ns(raw.last_seen_ns)),
        node: view.node.to_owned(),
        src_ip: src.to_string(),
        src_port: raw.key.src_port,
        dst_ip: dst.to_string(),
        dst_port: raw.key.dst_port,
        protocol: protocol_name(raw.key.protocol),
        direction: direction_name(raw.key.direction).into(),
        verdict: verdict_name(raw.verdict).into(),
        reason: reason_name(raw.reason),
        policies,
        packets: raw.packets,
        bytes: raw.bytes,
        src_pod: resolver.pod(src).map(ToString::to_string),
        dst_pod: resolver.pod(dst).map(ToString::to_string),
    }
}

/// A protocol given by name or number.
pub fn parse_protocol(s: &str) -> Option<u8> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Some(proto::TCP),
        "udp" => Some(proto::UDP),
        "sctp" => Some(proto::SCTP),
        "icmp" => Some(proto::ICMP),
        "icmpv6" | "ipv6-icmp" => Some(proto::ICMPV6),
        n => n.parse().ok(),
    }
}

/// Resolves, filters and orders raw flows: oldest first, then the `--first` or `--last` N.
pub fn select(raw: &[RawFlow], view: &View, matcher: &Matcher) -> Vec<Flow> {
    let mut picked: Vec<(u64, Flow)> = raw
        .iter()
        .map(|r| (r.last_seen_ns, resolve(r, view)))
        .filter(|(t, f)| matcher.matches(f, view.clock.unix_ns(*t), view.resolver))
        .collect();
    picked.sort_by(|a, b| (a.0, &a.1.src_ip, a.1.src_port).cmp(&(b.0, &b.1.src_ip, b.1.src_port)));
    let (first, last) = matcher.counts();
    if let Some(n) = first {
        picked.truncate(n);
    }
    if let Some(n) = last {
        let skip = picked.len().saturating_sub(n);
        picked.drain(..skip);
    }
    picked.into_iter().map(|(_, f)| f).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Pod, Policy};

    fn key(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, dir: Direction) -> FlowKey {
        FlowKey {
            src: IpKey::from_v4(src),
            dst: IpKey::from_v4(dst),
            src_port: sport,
            dst_port: dport,
            endpoint: 7,
            protocol: proto::TCP,
            direction: dir as u8,
            _pad: [0; 2],
        }
    }

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        for (name, ip) in [("a", [10, 42, 0, 10]), ("b", [10, 42, 1, 11])] {
            let key = PodKey::new("x", name);
            s.pods.insert(
                key.clone(),
                Arc::new(Pod {
                    key,
                    labels: Arc::new([("pod".to_owned(), name.to_owned())].into()),
                    node_name: Some("n0".into()),
                    host_network: false,
                    phase: Some("Running".into()),
                    ips: vec![IpAddr::from(ip)],
                    ports: Vec::new(),
                }),
            );
        }
        let policy: k8s_openapi::api::networking::v1::NetworkPolicySpec =
            serde_json::from_value(serde_json::json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "policyTypes": ["Ingress"]
            }))
            .unwrap();
        let key = PodKey::new("x", "deny-a");
        s.policies.insert(
            key.clone(),
            Arc::new(Policy {
                key,
                origin: crate::model::Origin::Api,
                spec: policy,
                mode: None,
            }),
        );
        s
    }

    #[test]
    fn merge_adds_counts_and_keeps_the_latest_decision() {
        let k = key(
            [10, 42, 1, 11],
            [10, 42, 0, 10],
            4000,
            80,
            Direction::Ingress,
        );
        let cpu0 = FlowValue {
            packets: 2,
            bytes: 200,
            first_seen_ns: 10,
            last_seen_ns: 50,
            decided_ns: 10,
            policy: 9,
            reason: Reason::AllowedPolicy as u8,
            verdict: verdict::ALLOWED,
            matched: 2,
            _pad: 0,
        };
        let cpu1 = FlowValue {
            packets: 3,
            bytes: 300,
            first_seen_ns: 20,
            last_seen_ns: 90,
            decided_ns: 0,
            reason: Reason::AllowedEstablished as u8,
            ..FlowValue::default()
        };
        let m = merge(k, &[cpu0, FlowValue::default(), cpu1]).unwrap();
        assert_eq!((m.packets, m.bytes), (5, 500));
        assert_eq!((m.first_seen_ns, m.last_seen_ns), (10, 90));
        assert_eq!((m.reason, m.policy), (Reason::AllowedPolicy as u8, 9));
        assert_eq!(merge(k, &[FlowValue::default()]), None);
    }

    #[test]
    fn resolves_pods_policies_and_isolation() {
        let mut s = state();
        let guard: crate::model::cluster_policy::ClusterNetworkPolicyObject =
            serde_json::from_value(serde_json::json!({
                "apiVersion": "policy.networking.k8s.io/v1alpha2",
                "kind": "ClusterNetworkPolicy",
                "metadata": {"name": "guard"},
                "spec": {"tier": "Baseline", "priority": 3, "subject": {"namespaces": {}}},
            }))
            .unwrap();
        let guard = crate::model::cluster_policy::ClusterPolicy::from_object(
            &guard,
            crate::model::Origin::Api,
        )
        .unwrap();
        s.cluster_policies.insert("guard".into(), guard);
        let endpoints = BTreeMap::from([(PodKey::new("x", "a"), 7)]);
        let isolating = BTreeMap::from([
            ((7, Direction::Ingress), vec![PodKey::new("x", "deny-a")]),
            ((7, Direction::Egress), vec![]),
        ]);
        let r = Resolver::new(&s, &endpoints, &isolating, Mode::Enforce);
        let clock = Clock {
            mono_ns: 1_000_000_000,
            unix_ns: 1_700_000_000_000_000_000,
        };
        let raw = RawFlow {
            key: key(
                [10, 42, 1, 11],
                [10, 42, 0, 10],
                4000,
                81,
                Direction::Ingress,
            ),
            packets: 1,
            bytes: 60,
            first_seen_ns: 500_000_000,
            last_seen_ns: 500_000_000,
            reason: Reason::DroppedIngressDenied as u8,
            verdict: verdict::DROPPED,
            matched: 0,
            policy: 0,
        };
        let view = View {
            resolver: &r,
            clock,
            node: "n0",
        };
        let f = resolve(&raw, &view);
        assert_eq!(f.time, "2023-11-14T22:13:19.500Z");
        assert_eq!(f.node, "n0");
        assert_eq!(f.src_ip, "10.42.1.11");
        assert_eq!(f.src_pod.as_deref(), Some("x/b"));
        assert_eq!(f.dst_pod.as_deref(), Some("x/a"));
        assert_eq!(f.verdict, "dropped");
        assert_eq!(f.reason, "ingress-denied");
        assert_eq!(f.policies, vec!["x/deny-a".to_owned()]);
        let allowed = RawFlow {
            reason: Reason::AllowedPolicy as u8,
            verdict: verdict::ALLOWED,
            policy: policy_id(&PodKey::new("x", "deny-a")),
            ..raw
        };
        assert_eq!(resolve(&allowed, &view).policies, vec!["x/deny-a"]);
        let denied_by_tier = RawFlow {
            reason: Reason::DroppedClusterPolicy as u8,
            policy: crate::compiler::tiers::cluster_policy_id("guard"),
            ..raw
        };
        assert_eq!(
            resolve(&denied_by_tier, &view).policies,
            vec!["cnp:baseline/guard"]
        );
        let json = serde_json::to_value(&f).unwrap();
        let fields: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut want = vec![
            "time",
            "node",
            "src_ip",
            "src_port",
            "dst_ip",
            "dst_port",
            "protocol",
            "direction",
            "verdict",
            "reason",
            "policies",
            "packets",
            "bytes",
            "src_pod",
            "dst_pod",
        ];
        want.sort_unstable();
        let mut fields = fields;
        fields.sort_unstable();
        assert_eq!(fields, want);
    }

    /// Three dropped flows from x/b to x/a, 100 ms apart (source ports 1, 2, 3).
    fn three_flows() -> Vec<RawFlow> {
        (1..=3u16)
            .map(|i| RawFlow {
                key: key([10, 42, 1, 11], [10, 42, 0, 10], i, 80, Direction::Ingress),
                packets: 1,
                bytes: 60,
                first_seen_ns: u64::from(i) * 100_000_000,
                last_seen_ns: u64::from(i) * 100_000_000,
                reason: Reason::DroppedIngressDenied as u8,
                verdict: verdict::DROPPED,
                matched: 0,
                policy: 0,
            })
            .collect()
    }

    #[test]
    fn select_orders_windows_counts_and_filters_by_label() {
        let r = Resolver::new(&state(), &BTreeMap::new(), &BTreeMap::new(), Mode::Enforce);
        let clock = Clock {
            mono_ns: 1_000_000_000,
            unix_ns: 1_700_000_000_000_000_000,
        };
        let view = View {
            resolver: &r,
            clock,
            node: "n0",
        };
        let ports = |filter: Filter| -> Vec<u16> {
            let mut raw = three_flows();
            raw.reverse();
            select(&raw, &view, &filter.compile().unwrap())
                .iter()
                .map(|f| f.src_port)
                .collect()
        };
        assert_eq!(ports(Filter::default()), [1, 2, 3], "oldest first");
        let unix_ms = |mono_ms: u64| (clock.unix_ns(mono_ms * 1_000_000)) / 1_000_000;
        let window = Filter {
            since_unix_ms: Some(unix_ms(200)),
            until_unix_ms: Some(unix_ms(200)),
            ..Filter::default()
        };
        assert_eq!(ports(window), [2], "both ends of the window are in it");
        let first = Filter {
            first: Some(2),
            ..Filter::default()
        };
        assert_eq!(ports(first), [1, 2]);
        let last = Filter {
            last: Some(2),
            ..Filter::default()
        };
        assert_eq!(ports(last), [2, 3]);
        let labelled = |from: &str, to: &str| Filter {
            include: FlowFilter {
                from_label: vec![from.into()],
                to_label: vec![to.into()],
                ..FlowFilter::default()
            },
            ..Filter::default()
        };
        assert_eq!(ports(labelled("pod=b", "pod in (a, z)")), [1, 2, 3]);
        assert!(
            ports(labelled("pod=a", "pod=a")).is_empty(),
            "x/a is not the source"
        );
    }
}
