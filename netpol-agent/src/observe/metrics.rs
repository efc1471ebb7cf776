//! Prometheus metrics on `--metrics-addr` (default [`DEFAULT_METRICS_ADDR`]), `GET /metrics`, in the
//! Prometheus text format (0.0.4) through `prometheus-client`.
//!
//! The datapath keeps the counters (DROPS, VERDICTS, LOST, per CPU); they are read at scrape time, so
//! no packet ever waits for the agent. Labels follow Hubble's metrics, and only name local pods:
//! cardinality is bounded by (local pods x reasons x protocols x directions), and a pod's series go
//! away [`crate::observe::GONE_GRACE`] after the pod does.
//!
//! Port 9102: the health endpoints use 9101, node-exporter 9100, and K3s none of 9100-9102. The
//! address defaults to every interface (the agent runs with `hostNetwork`, and Prometheus scrapes the
//! node's address); the series name namespaces and pods, so restrict it (`127.0.0.1:9102`) or firewall
//! it where that matters.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use netpol_common::{
    Direction, DropKey, PolicyMatch, capacity, lost, map_names, verdict, verdict_slot,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::{
    model::PodKey,
    observe::control::{MapStatus, SharedStatus, Status},
    observe::flows::{PolicyInfo, direction_name, protocol_name, reason_name},
    observe::{ObserveMaps, Observer},
};

/// Default `--metrics-addr`.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9102";

/// The registry: the implementation-delay histogram, and a collector reading the maps and status.
pub fn registry(observer: Arc<Observer>, status: SharedStatus, pod_label: PodLabel) -> Registry {
    let mut registry = Registry::default();
    registry.register(
        "netpol_policy_implementation_delay_seconds",
        "Time from a change seen by the cluster-state source to the datapath programmed with it",
        observer.implementation_delay.clone(),
    );
    registry.register_collector(Box::new(DatapathCollector {
        observer,
        status,
        pod_label,
    }));
    registry
}

/// The registry rendered in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        tracing::error!(error = %e, "encoding metrics");
    }
    out
}

#[derive(Debug)]
struct DatapathCollector {
    observer: Arc<Observer>,
    status: SharedStatus,
    pod_label: PodLabel,
}

/// Whether the per-pod series carry the pod's name (`--metrics-pod-label`): one series per pod,
/// or, for clusters where that is too many, per namespace (the pods' counts summed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PodLabel {
    /// `namespace` and `pod` labels.
    #[default]
    Pod,
    /// Only `namespace`: the pods of a namespace are summed.
    None,
}

type Labels = Vec<(&'static str, String)>;

/// The labels of a pod's drop series: `reason`, `protocol`, `direction`, then where it happened.
fn drop_labels(k: &DropKey, pod: &PodKey, pod_label: PodLabel) -> Labels {
    let mut labels = vec![
        ("reason", reason_name(k.reason)),
        ("protocol", protocol_name(k.protocol)),
        ("direction", direction_name(k.direction).to_owned()),
        ("namespace", pod.namespace.clone()),
    ];
    if pod_label == PodLabel::Pod {
        labels.push(("pod", pod.name.clone()));
    }
    labels
}

fn counter_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &BTreeMap<Labels, u64>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        ConstCounter::new(*v).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels, i64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        ConstGauge::new(*v).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = self.counters();
        let counters = [
            (
                "netpol_drop",
                "Packets dropped by NetworkPolicy enforcement, by local pod",
                &c.drops,
            ),
            (
                "netpol_drop_bytes",
                "Bytes dropped by NetworkPolicy enforcement, by local pod",
                &c.drop_bytes,
            ),
            (
                "netpol_drop_unreported",
                "Dropped packets that got no drop event (the pod's event budget or the ring was exhausted), by local pod",
                &c.unreported,
            ),
            (
                "netpol_audit",
                "Packets that passed only because the policies isolating their pod are in audit mode (would-be drops), by local pod",
                &c.audits,
            ),
            (
                "netpol_policy_verdicts",
                "Policy decisions on new flows, by direction, action and what kind of rule decided",
                &c.verdicts,
            ),
            (
                "netpol_policy_rule_hits",
                "Packets (both ways) of the connections each policy rule allowed on this node",
                &c.rule_hits,
            ),
            (
                "netpol_policy_rule_bytes",
                "Bytes (both ways) of the connections each policy rule allowed on this node",
                &c.rule_bytes,
            ),
            (
                "netpol_policy_rule_connections",
                "Connections each policy rule allowed on this node",
                &c.rule_connections,
            ),
            (
                "netpol_lost_events",
                "Drop events (or counts) that could not be delivered or recorded, by where they were lost",
                &c.lost_events,
            ),
        ];
        for (name, help, values) in counters {
            counter_family(&mut encoder, name, help, values)?;
        }
        let status = self.status.lock().map(|s| s.clone()).unwrap_or_default();
        for (name, help, values) in status_gauges(&status, &c.entries) {
            gauge_family(&mut encoder, name, help, &values)?;
        }
        Ok(())
    }
}

/// What the metrics read from the datapath's counters.
#[derive(Default)]
struct Counters {
    drops: BTreeMap<Labels, u64>,
    drop_bytes: BTreeMap<Labels, u64>,
    unreported: BTreeMap<Labels, u64>,
    audits: BTreeMap<Labels, u64>,
    verdicts: BTreeMap<Labels, u64>,
    rule_hits: BTreeMap<Labels, u64>,
    rule_bytes: BTreeMap<Labels, u64>,
    rule_connections: BTreeMap<Labels, u64>,
    lost_events: BTreeMap<Labels, u64>,
    /// Entries of the observed maps (conntrack, flows, drops), by name.
    entries: Vec<(&'static str, usize)>,
}

impl DatapathCollector {
    fn counters(&self) -> Counters {
        let mut c = Counters::default();
        if let Ok(maps) = &ObserveMaps::open(self.observer.layout()) {
            self.drop_counts(maps, &mut c);
            c.verdicts = verdict_counts(maps);
            self.rule_counts(maps, &mut c);
            let l = maps.lost();
            for (source, slot) in [
                ("rate-limit", lost::RATE_LIMITED),
                ("ring-full", lost::RING_FULL),
                ("drop-counters-full", lost::DROPS_FULL),
                ("flow-table-full", lost::FLOWS_FULL),
            ] {
                c.lost_events
                    .insert(vec![("source", source.to_owned())], l[slot as usize]);
            }
            c.entries = maps.entries().to_vec();
        }
        let follow = self
            .observer
            .follow_lost
            .load(std::sync::atomic::Ordering::Relaxed);
        c.lost_events
            .insert(vec![("source", "follow-client".to_owned())], follow);
        c
    }

    /// Drops per local pod (and, for a grace period, pods that just went away).
    fn drop_counts(&self, maps: &ObserveMaps, c: &mut Counters) {
        for (k, v) in maps.drops() {
            let Some(pod) = self.observer.endpoint_name(k.endpoint) else {
                continue;
            };
            let labels = drop_labels(&k, &pod, self.pod_label);
            if verdict::of(k.reason) == verdict::AUDIT {
                *c.audits.entry(labels).or_default() += v.packets;
                continue;
            }
            *c.drops.entry(labels.clone()).or_default() += v.packets;
            *c.unreported.entry(labels.clone()).or_default() += v.unreported;
            *c.drop_bytes.entry(labels).or_default() += v.bytes;
        }
    }
}

impl DatapathCollector {
    /// Hits per policy rule (of policies the agent knows: a gone policy's counters are removed).
    fn rule_counts(&self, maps: &ObserveMaps, c: &mut Counters) {
        let resolver = self.observer.resolver();
        let policies: HashMap<u32, &PolicyInfo> =
            resolver.catalog().iter().map(|p| (p.id, p)).collect();
        for (key, hits) in maps.rule_hits() {
            let Some(policy) = policies.get(&key.policy) else {
                continue;
            };
            let (Some(rule), Some((dir, _))) = (
                policy.rule_label(key.rule),
                netpol_common::rule_code::parse(key.rule),
            ) else {
                continue;
            };
            let direction = direction_name(dir as u8).to_owned();
            let labels = vec![
                ("policy_namespace", policy.key.namespace.clone()),
                ("policy", policy.key.name.clone()),
                ("rule", rule),
                ("direction", direction),
                ("action", "allowed".to_owned()),
            ];
            c.rule_hits.insert(labels.clone(), hits.packets);
            c.rule_bytes.insert(labels.clone(), hits.bytes);
            c.rule_connections.insert(labels, hits.connections);
        }
    }
}

/// Policy decisions of new flows by direction, action and match kind.
fn verdict_counts(maps: &ObserveMaps) -> BTreeMap<Labels, u64> {
    let counts = maps.verdicts();
    let mut out = BTreeMap::new();
    for dir in [Direction::Ingress, Direction::Egress] {
        let actions = [
            ("allowed", verdict::ALLOWED),
            ("dropped", verdict::DROPPED),
            ("audit", verdict::AUDIT),
        ];
        for (action, code) in actions {
            for m in PolicyMatch::ALL {
                let n = counts[verdict_slot(dir as u8, code, m as u8) as usize];
                let labels = vec![
                    ("direction", direction_name(dir as u8).to_owned()),
                    ("action", action.to_owned()),
                    ("match", m.name().to_owned()),
                ];
                out.insert(labels, n);
            }
        }
    }
    out
}

type Gauge = (&'static str, &'static str, Vec<(Labels, i64)>);

/// The gauges read from the agent's status, and the map sizes.
fn status_gauges(status: &Status, observed: &[(&'static str, usize)]) -> Vec<Gauge> {
    let pending = status
        .endpoints
        .iter()
        .filter(|e| e.pending.is_some())
        .count();
    let one = |v: i64| vec![(vec![], v)];
    let per_map = |f: &dyn Fn(&MapStatus) -> i64| -> Vec<(Labels, i64)> {
        status
            .maps
            .iter()
            .map(|m| (vec![("map", m.name.clone())], f(m)))
            .collect()
    };
    let (mut entries, mut capacities) = (
        per_map(&|m| m.entries as i64),
        per_map(&|m| i64::from(m.capacity)),
    );
    for (name, n) in observed {
        entries.push((vec![("map", (*name).to_owned())], *n as i64));
        let cap = match *name {
            map_names::FLOWS => capacity::FLOWS,
            map_names::DROPS => capacity::DROPS,
            map_names::RULE_HITS => capacity::RULES,
            _ => capacity::CONNTRACK,
        };
        capacities.push((vec![("map", (*name).to_owned())], i64::from(cap)));
    }
    vec![
        (
            "netpol_policies",
            "NetworkPolicies in the cluster state",
            one(status.policies as i64),
        ),
        (
            "netpol_cluster_policies",
            "ClusterNetworkPolicies in the cluster state",
            one(status.cluster_policies as i64),
        ),
        (
            "netpol_endpoints",
            "Local pods enforced on this node",
            one((status.endpoints.len() - pending) as i64),
        ),
        (
            "netpol_pending_endpoints",
            "Pod veths with the programs but no pod matched yet (or any more): only the node reaches them",
            one(pending as i64),
        ),
        (
            "netpol_errors",
            "Current problems (bad input, failed map writes, attach failures), as `status` lists them",
            one(status.errors.len() as i64),
        ),
        (
            "netpol_kube_router_chains",
            "kube-router NetworkPolicy chains in this node's iptables (K3s's built-in controller or its leftovers), looked for every minute",
            one(status.kube_router_chains as i64),
        ),
        (
            "netpol_ready",
            "1 once the datapath has been programmed from a full read of the cluster state",
            one(i64::from(status.ready)),
        ),
        (
            "netpol_map_entries",
            "Entries in each datapath map",
            entries,
        ),
        (
            "netpol_map_capacity",
            "Capacity (max entries) of each datapath map",
            capacities,
        ),
        (
            "netpol_map_left_out_entries",
            "Entries the compiled policy wanted that a decision map could not hold (left out as denied; raise --max-*)",
            per_map(&|m| m.left_out as i64),
        ),
        (
            "netpol_build_info",
            "Build information; always 1",
            vec![(vec![("version", env!("CARGO_PKG_VERSION").to_owned())], 1)],
        ),
    ]
}

/// Binds `addr`; the returned future serves `/metrics` until dropped.
pub async fn bind(
    addr: SocketAddr,
    registry: Registry,
) -> anyhow::Result<impl Future<Output = ()>> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr} (--metrics-addr)"))?;
    Ok(serve(listener, Arc::new(registry)))
}

async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let registry = registry.clone();
                async move {
                    let (code, body) = if req.uri().path() == "/metrics" {
                        // Reading the maps is a few syscalls per entry: off the runtime thread.
                        let body = tokio::task::spawn_blocking(move || render(&registry))
                            .await
                            .unwrap_or_default();
                        (StatusCode::OK, body)
                    } else {
                        (StatusCode::NOT_FOUND, "see /metrics\n".to_owned())
                    };
                    Response::builder()
                        .status(code)
                        .header(
                            "content-type",
                            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                        )
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use netpol_common::{Direction, DropKey, Reason, proto};

    use super::*;

    #[test]
    fn drop_series_name_the_pod_unless_told_not_to() {
        let k = DropKey {
            endpoint: 7,
            direction: Direction::Ingress as u8,
            reason: Reason::DroppedIngressDenied as u8,
            protocol: proto::UDP,
            ..DropKey::default()
        };
        let pod = PodKey::new("shop", "cart-7d9f");
        let with = drop_labels(&k, &pod, PodLabel::Pod);
        assert_eq!(with.last(), Some(&("pod", "cart-7d9f".to_owned())));
        assert!(with.contains(&("namespace", "shop".to_owned())));
        let without = drop_labels(&k, &pod, PodLabel::None);
        assert!(
            without.iter().all(|(name, _)| *name != "pod"),
            "{without:?}"
        );
        assert_eq!(without.last(), Some(&("namespace", "shop".to_owned())));
        assert_eq!(with.len(), without.len() + 1);
    }
}
