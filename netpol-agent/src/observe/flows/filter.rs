//! The filters of `flows`, combined as Hubble's `observe` combines its own: the values given to
//! one filter are alternatives (`--pod a --pod b`: either pod), different filters must all match
//! (`--pod a --port 80`), and the filters after `--not` form a second set of the same shape whose
//! matches are hidden (`--not --verdict allowed`). A time window (`--since`, `--until`) and a count
//! (`--first`, `--last`) apply to what is left.
//!
//! [`Filter`] is what the command line builds and sends to the agent (JSON over the control
//! socket); [`Filter::compile`] checks it once, naming the flag of a bad value, and gives the
//! [`Matcher`] that is run against every flow.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use netpol_common::Reason;
use serde::{Deserialize, Serialize};

use super::{Flow, parse_protocol, protocol_name, selector};
use crate::model::{Labels, selector::Selector};

/// `--verdict`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum VerdictFilter {
    Allowed,
    Dropped,
    /// Would-be drops of audit mode.
    Audit,
}

impl VerdictFilter {
    /// The name [`Flow::verdict`] has.
    pub fn name(self) -> &'static str {
        match self {
            VerdictFilter::Allowed => "allowed",
            VerdictFilter::Dropped => "dropped",
            VerdictFilter::Audit => "audit",
        }
    }
}

/// `--traffic-direction`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DirectionFilter {
    /// Into the local pod.
    Ingress,
    /// Out of the local pod.
    Egress,
}

impl DirectionFilter {
    /// The name [`Flow::direction`] has.
    pub fn name(self) -> &'static str {
        match self {
            DirectionFilter::Ingress => "ingress",
            DirectionFilter::Egress => "egress",
        }
    }
}

/// One set of filters: every filter given must match, and any of the values given to a filter
/// will do. Empty: matches every flow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FlowFilter {
    /// Either side is a pod of one of these namespaces; also the namespace of the pod names below
    /// given without one.
    pub namespace: Vec<String>,
    /// Either side is one of these pods (`namespace/name`, or `name`).
    pub pod: Vec<String>,
    /// The source is one of these pods or in one of these CIDRs.
    pub from: Vec<String>,
    /// The destination is one of these pods or in one of these CIDRs.
    pub to: Vec<String>,
    /// Either side is a pod whose labels match one of these selectors (Kubernetes syntax).
    pub label: Vec<String>,
    /// The source is a pod whose labels match one of these selectors.
    pub from_label: Vec<String>,
    /// The destination is a pod whose labels match one of these selectors.
    pub to_label: Vec<String>,
    /// Either port is one of these.
    pub port: Vec<u16>,
    /// Protocol names or numbers.
    pub protocol: Vec<String>,
    pub verdict: Vec<VerdictFilter>,
    pub traffic_direction: Vec<DirectionFilter>,
    /// Reason names (`ingress-denied`, `policy`, ...).
    pub reason: Vec<String>,
}

impl FlowFilter {
    /// True when no filter is set.
    pub fn is_empty(&self) -> bool {
        *self == FlowFilter::default()
    }
}

/// What `flows` asks the agent for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Filter {
    /// Flows shown: those that match (every flow when empty).
    pub include: FlowFilter,
    /// Flows hidden (`--not`): those that match (none when empty).
    pub exclude: FlowFilter,
    /// Only flows whose last packet was at or after this Unix time (ms).
    pub since_unix_ms: Option<u64>,
    /// Only flows whose last packet was at or before this Unix time (ms).
    pub until_unix_ms: Option<u64>,
    /// Only the first N flows (by time of the last packet).
    pub first: Option<usize>,
    /// Only the last N flows (by time of the last packet).
    pub last: Option<usize>,
}

/// A value of a filter that cannot be used, with the flag it was given to.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}--{flag} {value:?}: {reason}", if *.negated { "--not " } else { "" })]
pub struct FilterError {
    /// The flag, without dashes (`from-label`).
    pub flag: &'static str,
    pub value: String,
    pub reason: String,
    /// Given after `--not`.
    pub negated: bool,
}

impl Filter {
    /// Checks every value and prepares the matching.
    pub fn compile(&self) -> Result<Matcher, FilterError> {
        let include =
            Compiled::new(&self.include, &self.include.namespace).map_err(|e| e.negated(false))?;
        let exclude = if self.exclude.is_empty() {
            None
        } else {
            // `-n x --not --pod a` hides x/a: pod names after --not take the namespace given with
            // -n when no negated -n gives them another.
            let namespaces = match self.exclude.namespace.is_empty() {
                true => &self.include.namespace,
                false => &self.exclude.namespace,
            };
            Some(Compiled::new(&self.exclude, namespaces).map_err(|e| e.negated(true))?)
        };
        Ok(Matcher {
            include,
            exclude,
            since_ns: self.since_unix_ms.map(|ms| ms.saturating_mul(1_000_000)),
            until_ns: self.until_unix_ms.map(|ms| ms.saturating_mul(1_000_000)),
            first: self.first,
            last: self.last,
        })
    }

    /// Whether the filter can match an allowed flow: `flows -f` then also watches the flow table,
    /// since allowed packets send no events.
    pub fn wants_allowed(&self) -> bool {
        let v = &self.include.verdict;
        v.is_empty() || v.contains(&VerdictFilter::Allowed)
    }
}

impl FilterError {
    fn new(flag: &'static str, value: &str, reason: impl Into<String>) -> Self {
        FilterError {
            flag,
            value: value.to_owned(),
            reason: reason.into(),
            negated: false,
        }
    }

    fn negated(self, negated: bool) -> Self {
        FilterError { negated, ..self }
    }
}

/// Labels of pods by `namespace/name`, for the label filters.
pub trait PodLabels {
    /// The labels of `pod`, if it is a known pod.
    fn labels_of(&self, pod: &str) -> Option<&Labels>;
}

/// A peer given to `--from`/`--to`.
#[derive(Clone, Debug)]
enum Peer {
    Net(IpNetwork),
    Pod(String),
}

/// A checked [`FlowFilter`].
#[derive(Clone, Debug, Default)]
struct Compiled {
    namespaces: Vec<String>,
    /// Qualified with each namespace when given without one; a bare name matches in any namespace.
    pods: Vec<String>,
    from: Vec<Peer>,
    to: Vec<Peer>,
    label: Vec<Selector>,
    from_label: Vec<Selector>,
    to_label: Vec<Selector>,
    ports: Vec<u16>,
    /// Canonical names, as [`Flow::protocol`] has them.
    protocols: Vec<String>,
    verdicts: Vec<&'static str>,
    directions: Vec<&'static str>,
    reasons: Vec<String>,
}

impl Compiled {
    /// `f` checked, its pod names without a namespace put in each of `namespaces`.
    fn new(f: &FlowFilter, namespaces: &[String]) -> Result<Self, FilterError> {
        let qualify = |names: &[String]| qualify(namespaces, names);
        Ok(Compiled {
            namespaces: f.namespace.clone(),
            pods: qualify(&f.pod),
            from: peers("from", &qualify(&f.from))?,
            to: peers("to", &qualify(&f.to))?,
            label: selectors("label", &f.label)?,
            from_label: selectors("from-label", &f.from_label)?,
            to_label: selectors("to-label", &f.to_label)?,
            ports: f.port.clone(),
            protocols: protocols(&f.protocol)?,
            verdicts: f.verdict.iter().map(|v| v.name()).collect(),
            directions: f.traffic_direction.iter().map(|d| d.name()).collect(),
            reasons: reasons(&f.reason)?,
        })
    }

    fn matches(&self, flow: &Flow, labels: &dyn PodLabels) -> bool {
        let (src, dst) = (flow.src_pod.as_deref(), flow.dst_pod.as_deref());
        let either = |one: &dyn Fn(Option<&str>) -> bool| one(src) || one(dst);
        any(&self.namespaces, |ns| either(&|p| in_namespace(p, ns)))
            && any(&self.pods, |want| either(&|p| pod_is(p, want)))
            && any(&self.from, |peer| peer_is(peer, &flow.src_ip, src))
            && any(&self.to, |peer| peer_is(peer, &flow.dst_ip, dst))
            && any(&self.label, |s| either(&|p| labelled(labels, p, s)))
            && any(&self.from_label, |s| labelled(labels, src, s))
            && any(&self.to_label, |s| labelled(labels, dst, s))
            && any(&self.ports, |p| flow.src_port == *p || flow.dst_port == *p)
            && any(&self.protocols, |p| flow.protocol == *p)
            && any(&self.verdicts, |v| flow.verdict == *v)
            && any(&self.directions, |d| flow.direction == *d)
            && any(&self.reasons, |r| flow.reason == *r)
    }
}

/// True when no value is given, or one of them matches.
fn any<T>(values: &[T], matches: impl Fn(&T) -> bool) -> bool {
    values.is_empty() || values.iter().any(matches)
}

fn in_namespace(pod: Option<&str>, ns: &str) -> bool {
    pod.is_some_and(|p| p.split('/').next() == Some(ns))
}

fn pod_is(pod: Option<&str>, want: &str) -> bool {
    let Some(pod) = pod else { return false };
    if want.contains('/') {
        pod == want
    } else {
        pod.rsplit('/').next() == Some(want)
    }
}

fn peer_is(peer: &Peer, ip: &str, pod: Option<&str>) -> bool {
    match peer {
        Peer::Net(net) => ip.parse::<IpAddr>().is_ok_and(|ip| net.contains(ip)),
        Peer::Pod(want) => pod_is(pod, want),
    }
}

fn labelled(labels: &dyn PodLabels, pod: Option<&str>, selector: &Selector) -> bool {
    pod.and_then(|p| labels.labels_of(p))
        .is_some_and(|l| selector.matches(l))
}

/// Pod names given without a namespace, in each of `namespaces` (unchanged when there is none).
/// Addresses are left as they are.
fn qualify(namespaces: &[String], names: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for name in names {
        if namespaces.is_empty() || name.contains('/') || looks_like_address(name) {
            out.push(name.clone());
        } else {
            out.extend(namespaces.iter().map(|ns| format!("{ns}/{name}")));
        }
    }
    out
}

fn looks_like_address(s: &str) -> bool {
    s.contains(':')
        || s.split('/')
            .next()
            .is_some_and(|a| a.parse::<IpAddr>().is_ok())
}

fn peers(flag: &'static str, values: &[String]) -> Result<Vec<Peer>, FilterError> {
    values
        .iter()
        .map(|v| {
            if !looks_like_address(v) {
                return Ok(Peer::Pod(v.clone()));
            }
            v.parse::<IpNetwork>()
                .map(Peer::Net)
                .map_err(|e| FilterError::new(flag, v, format!("not a CIDR or address: {e}")))
        })
        .collect()
}

fn selectors(flag: &'static str, values: &[String]) -> Result<Vec<Selector>, FilterError> {
    values
        .iter()
        .map(|v| selector::parse(v).map_err(|e| FilterError::new(flag, v, e)))
        .collect()
}

fn protocols(values: &[String]) -> Result<Vec<String>, FilterError> {
    values
        .iter()
        .map(|v| {
            parse_protocol(v).map(protocol_name).ok_or_else(|| {
                FilterError::new("protocol", v, "tcp, udp, sctp, icmp, icmpv6 or a number")
            })
        })
        .collect()
}

fn reasons(values: &[String]) -> Result<Vec<String>, FilterError> {
    let known: Vec<&str> = Reason::ALL.iter().map(|r| r.name()).collect();
    values
        .iter()
        .map(|v| {
            if known.contains(&v.as_str()) {
                Ok(v.clone())
            } else {
                let one_of = known.join(", ");
                Err(FilterError::new(
                    "reason",
                    v,
                    format!("unknown reason (one of {one_of})"),
                ))
            }
        })
        .collect()
}

/// A [`Filter`] ready to run.
#[derive(Clone, Debug)]
pub struct Matcher {
    include: Compiled,
    exclude: Option<Compiled>,
    since_ns: Option<u64>,
    until_ns: Option<u64>,
    first: Option<usize>,
    last: Option<usize>,
}

impl Matcher {
    /// Whether `flow`, whose last packet was at Unix time `unix_ns`, passes the filters (the
    /// count limits aside). `labels` resolves pod names for the label filters.
    pub fn matches(&self, flow: &Flow, unix_ns: u64, labels: &dyn PodLabels) -> bool {
        self.since_ns.is_none_or(|t| unix_ns >= t)
            && self.until_ns.is_none_or(|t| unix_ns <= t)
            && self.include.matches(flow, labels)
            && !self
                .exclude
                .as_ref()
                .is_some_and(|x| x.matches(flow, labels))
    }

    /// `--first` and `--last`.
    pub fn counts(&self) -> (Option<usize>, Option<usize>) {
        (self.first, self.last)
    }

    /// Whether a label filter is set (they need the pods' labels: a running agent).
    pub fn uses_labels(&self) -> bool {
        [&self.include]
            .into_iter()
            .chain(self.exclude.as_ref())
            .any(|c| !(c.label.is_empty() && c.from_label.is_empty() && c.to_label.is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Labels of x/b (app=web) and y/a (app=db); other pods have none known.
    struct Known(HashMap<String, Labels>);

    impl PodLabels for Known {
        fn labels_of(&self, pod: &str) -> Option<&Labels> {
            self.0.get(pod)
        }
    }

    fn known() -> Known {
        let labels = |app: &str| Labels::from([("app".to_owned(), app.to_owned())]);
        Known(HashMap::from([
            ("x/b".to_owned(), labels("web")),
            ("y/a".to_owned(), labels("db")),
        ]))
    }

    /// x/b:4000 -> y/a:80, TCP, ingress at y/a, dropped.
    fn flow() -> Flow {
        Flow {
            time: String::new(),
            node: "n0".into(),
            src_ip: "10.42.1.11".into(),
            src_port: 4000,
            dst_ip: "10.42.0.10".into(),
            dst_port: 80,
            protocol: "tcp".into(),
            direction: "ingress".into(),
            verdict: "dropped".into(),
            reason: "ingress-denied".into(),
            policies: vec![],
            packets: 1,
            bytes: 1,
            src_pod: Some("x/b".into()),
            dst_pod: Some("y/a".into()),
        }
    }

    fn shown(include: FlowFilter, exclude: FlowFilter) -> bool {
        let filter = Filter {
            include,
            exclude,
            ..Filter::default()
        };
        let matcher = filter.compile().unwrap_or_else(|e| panic!("{e}"));
        matcher.matches(&flow(), 0, &known())
    }

    fn only(f: FlowFilter) -> bool {
        shown(f, FlowFilter::default())
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn each_filter_matches_its_field() {
        let f = FlowFilter::default;
        assert!(only(f()));
        assert!(only(FlowFilter {
            namespace: strings(&["y"]),
            ..f()
        }));
        assert!(!only(FlowFilter {
            namespace: strings(&["z"]),
            ..f()
        }));
        assert!(
            only(FlowFilter {
                pod: strings(&["a"]),
                ..f()
            }),
            "a bare name: any namespace"
        );
        assert!(only(FlowFilter {
            pod: strings(&["x/b"]),
            ..f()
        }));
        assert!(!only(FlowFilter {
            namespace: strings(&["x"]),
            pod: strings(&["a"]),
            ..f()
        }));
        assert!(only(FlowFilter {
            from: strings(&["10.42.1.0/24"]),
            ..f()
        }));
        assert!(!only(FlowFilter {
            to: strings(&["10.42.1.0/24"]),
            ..f()
        }));
        assert!(only(FlowFilter {
            to: strings(&["y/a"]),
            ..f()
        }));
        assert!(!only(FlowFilter {
            from: strings(&["y/a"]),
            ..f()
        }));
        assert!(
            only(FlowFilter {
                port: vec![4000],
                ..f()
            }),
            "either port"
        );
        assert!(!only(FlowFilter {
            port: vec![81],
            ..f()
        }));
        assert!(only(FlowFilter {
            protocol: strings(&["6"]),
            ..f()
        }));
        assert!(!only(FlowFilter {
            protocol: strings(&["udp"]),
            ..f()
        }));
        assert!(only(FlowFilter {
            verdict: vec![VerdictFilter::Dropped],
            ..f()
        }));
        assert!(!only(FlowFilter {
            verdict: vec![VerdictFilter::Allowed],
            ..f()
        }));
        let ingress = vec![DirectionFilter::Ingress];
        assert!(only(FlowFilter {
            traffic_direction: ingress,
            ..f()
        }));
        let egress = vec![DirectionFilter::Egress];
        assert!(!only(FlowFilter {
            traffic_direction: egress,
            ..f()
        }));
        assert!(only(FlowFilter {
            reason: strings(&["ingress-denied"]),
            ..f()
        }));
        assert!(!only(FlowFilter {
            reason: strings(&["policy"]),
            ..f()
        }));
    }

    #[test]
    fn label_selectors_match_either_side_or_the_side_named() {
        let f = FlowFilter::default;
        assert!(only(FlowFilter {
            label: strings(&["app=db"]),
            ..f()
        }));
        assert!(only(FlowFilter {
            label: strings(&["app=web"]),
            ..f()
        }));
        assert!(!only(FlowFilter {
            label: strings(&["app=cache"]),
            ..f()
        }));
        assert!(only(FlowFilter {
            from_label: strings(&["app=web"]),
            ..f()
        }));
        assert!(!only(FlowFilter {
            from_label: strings(&["app=db"]),
            ..f()
        }));
        assert!(only(FlowFilter {
            to_label: strings(&["app in (db,cache)"]),
            ..f()
        }));
        assert!(!only(FlowFilter {
            to_label: strings(&["app notin (db)"]),
            ..f()
        }));
    }

    #[test]
    fn values_of_one_filter_are_alternatives_and_filters_all_apply() {
        let f = FlowFilter::default;
        assert!(only(FlowFilter {
            pod: strings(&["x/zz", "y/a"]),
            ..f()
        }));
        assert!(!only(FlowFilter {
            pod: strings(&["x/zz", "y/zz"]),
            ..f()
        }));
        assert!(only(FlowFilter {
            port: vec![1, 80],
            protocol: strings(&["udp", "tcp"]),
            ..f()
        }));
        assert!(!only(FlowFilter {
            port: vec![1, 80],
            protocol: strings(&["udp"]),
            ..f()
        }));
        let two = vec![VerdictFilter::Allowed, VerdictFilter::Dropped];
        assert!(only(FlowFilter {
            verdict: two,
            ..f()
        }));
        // Several namespaces qualify a bare pod name in each.
        assert!(only(FlowFilter {
            namespace: strings(&["x", "y"]),
            pod: strings(&["a"]),
            ..f()
        }));
        assert!(only(FlowFilter {
            label: strings(&["app=cache", "app=web"]),
            ..f()
        }));
    }

    #[test]
    fn not_hides_what_its_filters_match_together() {
        let f = FlowFilter::default;
        let dropped = || FlowFilter {
            verdict: vec![VerdictFilter::Dropped],
            ..f()
        };
        assert!(!shown(f(), dropped()));
        assert!(shown(
            f(),
            FlowFilter {
                verdict: vec![VerdictFilter::Allowed],
                ..f()
            }
        ));
        // Shown only when the included part matches and the hidden part does not.
        assert!(!shown(
            FlowFilter {
                pod: strings(&["y/a"]),
                ..f()
            },
            dropped()
        ));
        assert!(shown(
            FlowFilter {
                pod: strings(&["y/a"]),
                ..f()
            },
            FlowFilter {
                port: vec![9],
                ..f()
            }
        ));
        // The negated filters together describe what is hidden: dropped AND port 9 is not this flow.
        assert!(shown(
            f(),
            FlowFilter {
                port: vec![9],
                ..dropped()
            }
        ));
        assert!(!shown(
            f(),
            FlowFilter {
                label: strings(&["app=db"]),
                ..dropped()
            }
        ));
        // Pod names after --not take the namespace of -n: y/a is hidden, x/a is not this flow.
        let in_ns = |ns: &str| FlowFilter {
            namespace: strings(&[ns]),
            ..f()
        };
        assert!(!shown(
            in_ns("y"),
            FlowFilter {
                pod: strings(&["a"]),
                ..f()
            }
        ));
        assert!(shown(
            in_ns("x"),
            FlowFilter {
                pod: strings(&["a"]),
                ..f()
            }
        ));
    }

    #[test]
    fn time_window_bounds_are_inclusive() {
        let filter = Filter {
            since_unix_ms: Some(1_000),
            until_unix_ms: Some(2_000),
            ..Filter::default()
        };
        let m = filter.compile().unwrap();
        let at = |ms: u64| m.matches(&flow(), ms * 1_000_000, &known());
        assert!(!at(999));
        assert!(at(1_000));
        assert!(at(2_000));
        assert!(!at(2_001));
    }

    #[test]
    fn bad_values_name_their_flag() {
        let bad = |include: FlowFilter, exclude: FlowFilter| {
            Filter {
                include,
                exclude,
                ..Filter::default()
            }
            .compile()
            .unwrap_err()
            .to_string()
        };
        let f = FlowFilter::default;
        let e = bad(
            FlowFilter {
                from: strings(&["10.0.0.0/99"]),
                ..f()
            },
            f(),
        );
        assert!(e.starts_with("--from \"10.0.0.0/99\": not a CIDR"), "{e}");
        let e = bad(
            f(),
            FlowFilter {
                to_label: strings(&["app in (a"]),
                ..f()
            },
        );
        assert!(e.starts_with("--not --to-label \"app in (a\": "), "{e}");
        let e = bad(
            FlowFilter {
                reason: strings(&["denied"]),
                ..f()
            },
            f(),
        );
        assert!(
            e.contains("--reason \"denied\": unknown reason (one of ")
                && e.contains("ingress-denied"),
            "{e}"
        );
        let e = bad(
            FlowFilter {
                protocol: strings(&["tcpp"]),
                ..f()
            },
            f(),
        );
        assert!(e.starts_with("--protocol \"tcpp\""), "{e}");
    }

    #[test]
    fn follow_watches_the_flow_table_only_when_allowed_flows_can_match() {
        let with = |verdict: Vec<VerdictFilter>| Filter {
            include: FlowFilter {
                verdict,
                ..FlowFilter::default()
            },
            ..Filter::default()
        };
        assert!(with(vec![]).wants_allowed());
        assert!(with(vec![VerdictFilter::Allowed, VerdictFilter::Audit]).wants_allowed());
        assert!(!with(vec![VerdictFilter::Dropped, VerdictFilter::Audit]).wants_allowed());
    }

    #[test]
    fn label_filters_are_known_to_need_labels() {
        let m = |exclude: FlowFilter| {
            Filter {
                exclude,
                ..Filter::default()
            }
            .compile()
            .unwrap()
        };
        assert!(!m(FlowFilter::default()).uses_labels());
        assert!(
            m(FlowFilter {
                label: strings(&["a"]),
                ..FlowFilter::default()
            })
            .uses_labels()
        );
    }
}
