//! Every panel of deploy/grafana-dashboard-netpol.json against a real Prometheus that scrapes both
//! agents of the simulated cluster as prometheus-operator scrapes them from deploy/podmonitor.yaml:
//! the scrape job it generates (`honor_labels` as the PodMonitor sets it, its relabelling that puts
//! the *agent* pod's namespace, pod, container and job on every series, the PodMonitor's own
//! relabellings), with static targets carrying the labels Kubernetes service discovery would give
//! the agent pods. That reproduces the clash `honorLabels` resolves: the drop series name the pod
//! that lost packets in `namespace` and `pod`, and so does the target.
//!
//! Traffic: x/c -> x/a (n0) dropped at x/a's ingress, a flood that outruns x/a's drop-event budget;
//! y/a (n1) -> x/b dropped at y/a's egress; x/b -> x/a allowed. Each panel's query is run for
//! several selections of the dashboard's variables and must return exactly the series that traffic
//! makes: the pod that lost packets (never the agent's), its namespace, the reason, the node.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netpol_tests::apiserver_double::{http_get_in_netns, in_netns};
use netpol_tests::cluster::{Cluster, Family, Proto, default_agent_bin};
use serde_json::{Value, json};

const PROBE_BIN: &str = env!("CARGO_BIN_EXE_netpol-probe");
/// Where each agent serves /metrics (its default --metrics-addr, 0.0.0.0:9102) on its node.
const METRICS_PORT: u16 = 9102;
/// Datagrams x/c floods x/a with: far past x/a's drop-event budget (1,000 per second and CPU).
const FLOOD: u64 = 20_000;
/// Datagrams y/a sends (dropped at its egress) and x/b sends (allowed).
const SMALL: u64 = 200;

const POLICIES: &str = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-b
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels:
          pod: b
    ports:
    - protocol: UDP
      port: 80
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-egress-a
  namespace: y
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes: [Egress]
";

/// A third policy, applied once Prometheus scrapes: the change whose enforcement delay the delay
/// panel shows (it selects nothing that the traffic uses).
const CHANGE: &str = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-all
  namespace: z
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
  - {}
";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read_yaml(file: &str) -> serde_yaml_ng::Value {
    let text = std::fs::read_to_string(repo().join(file)).unwrap();
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[test]
fn every_dashboard_panel_shows_the_pods_that_lost_packets_through_the_podmonitor() {
    const TEST: &str =
        "every_dashboard_panel_shows_the_pods_that_lost_packets_through_the_podmonitor";
    if !netpol_tests::privileged_or_skip(TEST, "needs root (network namespaces, bpffs)") {
        return;
    }
    let started = Instant::now();
    let mut c = Cluster::new(PROBE_BIN).unwrap_or_else(|e| panic!("cluster setup: {e:#}"));
    c.apply_policies(POLICIES).unwrap();
    c.start_agents(&default_agent_bin())
        .unwrap_or_else(|e| panic!("starting agents: {e:#}"));
    let mut r = c.reachability(true);
    r.expect_all_ingress("x/a", false)
        .expect_peer("x/b", "x/a", true)
        .expect_all_egress("y/a", false);
    c.wait_for_all(&r, &[(80, Proto::Udp, Family::V4)], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));

    let podmonitor = read_yaml("deploy/podmonitor.yaml");
    let prom = Prometheus::start(&c, &podmonitor);
    // Every series must have a sample from before the traffic, or rate() sees no increase.
    prom.wait_for(
        "two scrapes of both agents",
        &format!(
            "min(count_over_time(up{{job=\"{}\"}}[1m])) >= 2 and count(up{{job=\"{}\"}} == 1) == 2",
            job(&podmonitor),
            job(&podmonitor)
        ),
    );
    send_traffic(&c);
    c.apply_policies(&format!("{POLICIES}{CHANGE}")).unwrap();

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana-dashboard-netpol.json")).unwrap(),
    )
    .expect("the dashboard parses");
    let truth = Truth::of(&c);
    let check = || check_dashboard(&prom, &dashboard, &podmonitor, &truth);
    // Scrapes come every second: poll until every panel shows the traffic, well within the panels'
    // rate window (1m), after which the rates would decay to nothing.
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut failures = check();
    while !failures.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        failures = check();
    }
    assert!(
        failures.is_empty(),
        "dashboard panels wrong:\n{}\n\nPrometheus targets: {}\nPrometheus log:\n{}",
        failures.join("\n"),
        prom.get("/api/v1/targets").unwrap_or_default(),
        prom.log()
    );
    c.check_agents().unwrap();
    eprintln!("{TEST}: {:?}", started.elapsed());
}

/// x/c floods x/a (dropped at x/a's ingress, on n0), y/a (n1) sends to x/b (dropped at its egress),
/// x/b sends to x/a UDP 80 (allowed). Fixed source ports: one new flow each.
fn send_traffic(c: &Cluster) {
    for (from, sport, to, port, count) in [
        ("x/c", 20001, "x/a", 81, FLOOD),
        ("y/a", 20002, "x/b", 80, SMALL),
        ("x/b", 20003, "x/a", 80, SMALL),
    ] {
        let target = format!("udp/{}/{port}", c.pod(to).ip(Family::V4));
        let out = Command::new("ip")
            .args(["netns", "exec", &c.pod(from).netns, PROBE_BIN, "flood"])
            .args(["--count", &count.to_string(), "--sport", &sport.to_string()])
            .args(["--size", "16", &target])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "flood from {from}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let sent: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(sent["sent"].as_u64(), Some(count), "flood from {from}");
    }
}

// ------------------------------------------------------------------------------------------------
// What the traffic should make the panels show.
// ------------------------------------------------------------------------------------------------

/// A pod that lost packets: where, which direction, why.
struct Loss {
    node: String,
    namespace: &'static str,
    pod: &'static str,
    direction: &'static str,
    reason: &'static str,
    /// At least this many were dropped after Prometheus' first scrape.
    at_least: u64,
}

struct Truth {
    nodes: Vec<String>,
    drops: Vec<Loss>,
    /// Local pods per node.
    endpoints: BTreeMap<String, usize>,
    policies: usize,
}

impl Truth {
    fn of(c: &Cluster) -> Truth {
        let node_of = |id: &str| c.nodes[c.pod(id).node].name.clone();
        let mut endpoints = BTreeMap::new();
        for p in &c.pods {
            *endpoints.entry(c.nodes[p.node].name.clone()).or_default() += 1;
        }
        Truth {
            nodes: c.nodes.iter().map(|n| n.name.clone()).collect(),
            drops: vec![
                Loss {
                    node: node_of("x/a"),
                    namespace: "x",
                    pod: "a",
                    direction: "ingress",
                    reason: "ingress-denied",
                    at_least: FLOOD,
                },
                Loss {
                    node: node_of("y/a"),
                    namespace: "y",
                    pod: "a",
                    direction: "egress",
                    reason: "egress-denied",
                    at_least: SMALL,
                },
            ],
            endpoints,
            policies: 3,
        }
    }
}

/// Values of the dashboard's variables: `None` is "All".
#[derive(Clone, Debug)]
struct Selection {
    node: Option<String>,
    namespace: Option<&'static str>,
}

impl Selection {
    /// All, one node, one namespace, and a node and namespace with no drops (panels must be empty).
    fn every(truth: &Truth) -> Vec<Selection> {
        let (n0, n1) = (truth.nodes[0].clone(), truth.nodes[1].clone());
        vec![
            Selection {
                node: None,
                namespace: None,
            },
            Selection {
                node: Some(n0),
                namespace: None,
            },
            Selection {
                node: None,
                namespace: Some("y"),
            },
            Selection {
                node: Some(n1),
                namespace: Some("x"),
            },
        ]
    }

    fn has_node(&self, node: &str) -> bool {
        self.node.as_deref().is_none_or(|n| n == node)
    }

    fn drops<'a>(&self, truth: &'a Truth) -> Vec<&'a Loss> {
        truth
            .drops
            .iter()
            .filter(|d| self.has_node(&d.node) && self.namespace.is_none_or(|n| n == d.namespace))
            .collect()
    }

    fn endpoints(&self, truth: &Truth) -> usize {
        truth
            .endpoints
            .iter()
            .filter(|(n, _)| self.has_node(n))
            .map(|(_, e)| e)
            .sum()
    }
}

// ------------------------------------------------------------------------------------------------
// The dashboard: panels, variables, and the check of each panel.
// ------------------------------------------------------------------------------------------------

struct Panel {
    title: String,
    exprs: Vec<String>,
}

/// Every panel with queries, rows' nested panels included.
fn panels(list: &Value) -> Vec<Panel> {
    let mut out = Vec::new();
    for p in list.as_array().into_iter().flatten() {
        out.extend(panels(&p["panels"]));
        let exprs: Vec<String> = p["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["expr"].as_str().map(str::to_owned))
            .collect();
        if !exprs.is_empty() {
            out.push(Panel {
                title: p["title"].as_str().unwrap_or_default().to_owned(),
                exprs,
            });
        }
    }
    out
}

/// The dashboard's query variables: (name, query, allValue).
fn variables(dashboard: &Value) -> Vec<(String, String, String)> {
    dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let field = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            (field("name"), field("query"), field("allValue"))
        })
        .collect()
}

/// Grafana's substitutions for `sel`. `$__rate_interval` is what Grafana computes for a data source
/// scraped at the PodMonitor's interval (four intervals: 1m at 15s); `$__range` the dashboard's
/// default time range. A selected value goes in as itself (node names have no regex characters).
fn substitutions(
    dashboard: &Value,
    podmonitor: &serde_yaml_ng::Value,
    sel: &Selection,
) -> Vec<(String, String)> {
    let interval = seconds(podmonitor["spec"]["podMetricsEndpoints"][0]["interval"].as_str());
    let range = dashboard["time"]["from"]
        .as_str()
        .and_then(|f| f.strip_prefix("now-"))
        .expect("time.from: now-<range>");
    let mut subs = vec![
        ("__rate_interval".to_owned(), format!("{}s", 4 * interval)),
        ("__interval".to_owned(), format!("{interval}s")),
        ("__range".to_owned(), range.to_owned()),
    ];
    for (name, _, all) in variables(dashboard) {
        let value = match name.as_str() {
            "node" => sel.node.clone(),
            "namespace" => sel.namespace.map(str::to_owned),
            other => panic!("dashboard variable ${other}: this test does not know what to select"),
        };
        subs.push((name, value.unwrap_or(all)));
    }
    // Longest first, so that no name is replaced inside a longer one.
    subs.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
    subs
}

/// "15s" -> 15 (the PodMonitor's default, 30s, when absent).
fn seconds(interval: Option<&str>) -> u64 {
    let i = interval.unwrap_or("30s");
    i.strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("interval {i:?}: whole seconds expected"))
}

fn substitute(expr: &str, subs: &[(String, String)]) -> String {
    let mut out = expr.to_owned();
    for (name, value) in subs {
        out = out
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    assert!(
        !out.contains('$') && !out.contains("[["),
        "{expr}: a variable this test does not substitute"
    );
    out
}

/// Every panel for every selection, and the variables' own queries: the failures, one a line.
fn check_dashboard(
    prom: &Prometheus,
    dashboard: &Value,
    podmonitor: &serde_yaml_ng::Value,
    truth: &Truth,
) -> Vec<String> {
    let mut failures = check_variables(prom, dashboard, truth);
    failures.extend(check_labels(prom));
    let panels = panels(&dashboard["panels"]);
    let titles: BTreeSet<&str> = panels.iter().map(|p| p.title.as_str()).collect();
    assert_eq!(
        titles,
        BTreeSet::from(PANELS),
        "the dashboard's panels are not the ones this test checks (expect_panel)"
    );
    for sel in Selection::every(truth) {
        let subs = substitutions(dashboard, podmonitor, &sel);
        for p in &panels {
            let exprs: Vec<String> = p.exprs.iter().map(|e| substitute(e, &subs)).collect();
            let results: Result<Vec<Vec<Series>>, String> =
                exprs.iter().map(|e| prom.query(e)).collect();
            let verdict = results.and_then(|r| expect_panel(&p.title, &r, &sel, truth));
            if let Err(e) = verdict {
                failures.push(format!("{:?} with {sel:?}: {e}\n    {exprs:?}", p.title));
            }
        }
    }
    failures
}

/// `label_values(METRIC, LABEL)` of each variable: the nodes, and the namespaces that lost
/// packets (not the agent's).
fn check_variables(prom: &Prometheus, dashboard: &Value, truth: &Truth) -> Vec<String> {
    let mut failures = Vec::new();
    for (name, query, _) in variables(dashboard) {
        let (metric, label) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.split_once(','))
            .unwrap_or_else(|| {
                panic!("variable ${name}: {query:?} is not label_values(METRIC, LABEL)")
            });
        let want: BTreeSet<String> = match name.as_str() {
            "node" => truth.nodes.iter().cloned().collect(),
            "namespace" => truth.drops.iter().map(|d| d.namespace.to_owned()).collect(),
            other => panic!("variable ${other}: no expectation"),
        };
        let got = prom.label_values(label.trim(), metric.trim());
        if got.as_ref() != Ok(&want) {
            failures.push(format!(
                "variable ${name} ({query}): {got:?}, want {want:?}"
            ));
        }
    }
    failures
}

/// The scrape set up the clash: series without namespace/pod (build info) carry the agent pod's,
/// and no drop series lost its own to `exported_*` or took the agent's.
fn check_labels(prom: &Prometheus) -> Vec<String> {
    let mut failures = Vec::new();
    match prom.query("netpol_build_info") {
        Ok(s) if s.len() == 2 && s.iter().all(|s| is_agent_pod(&s.labels)) => {}
        other => failures.push(format!(
            "netpol_build_info should carry the agent pods' labels: {other:?}"
        )),
    }
    for q in [
        "netpol_drop_total{namespace=\"netpol-system\"}",
        "{exported_namespace!=\"\"}",
        "{exported_pod!=\"\"}",
    ] {
        match prom.query(q) {
            Ok(s) if s.is_empty() => {}
            other => failures.push(format!("{q} should be empty: {other:?}")),
        }
    }
    failures
}

fn is_agent_pod(labels: &BTreeMap<String, String>) -> bool {
    labels.get("namespace").map(String::as_str) == Some(AGENT_NAMESPACE)
        && labels
            .get("pod")
            .is_some_and(|p| p.starts_with(AGENT_POD_PREFIX))
        && labels.get("container").map(String::as_str) == Some("agent")
}

/// The panels [`expect_panel`] knows: every panel of the dashboard, no more, no less.
const PANELS: [&str; 16] = [
    "Drops/s (all selected pods)",
    "Policies",
    "Local endpoints",
    "Problems",
    "Lost drop events/s",
    "Drops/s by namespace",
    "Drops/s by pod and reason",
    "Top dropping pods (drops over the range)",
    "Dropped bytes/s by pod",
    "Policy verdicts/s (new flows)",
    "Map use (entries / capacity)",
    "Policy implementation delay",
    "Lost drop events/s by source",
    "kube-router chains on the nodes",
    "Would-be drops/s (audit mode) by pod and reason",
    "Rule hits/s by policy and rule",
];

/// What panel `title` must show for `sel`: its queries' results are `r`, one per query.
fn expect_panel(
    title: &str,
    r: &[Vec<Series>],
    sel: &Selection,
    truth: &Truth,
) -> Result<(), String> {
    let drops = sel.drops(truth);
    // x/a's flood outran its drop-event budget on x/a's node (the panels filter only by node).
    let lost = sel.has_node(&truth.drops[0].node);
    match title {
        "Drops/s (all selected pods)" => one_or_none(&r[0], !drops.is_empty(), |v| v > 0.0),
        "Policies" => one_value(&r[0], |v| v == truth.policies as f64),
        "Local endpoints" => one_value(&r[0], |v| v == sel.endpoints(truth) as f64),
        "Problems" => one_value(&r[0], |v| v == 0.0),
        "Lost drop events/s" => one_value(&r[0], |v| (v > 0.0) == lost),
        "Drops/s by namespace" => exactly(
            &r[0],
            &["namespace"],
            &drops,
            |d| vec![d.namespace.into()],
            |_| 0.0,
        ),
        "Drops/s by pod and reason" => exactly(
            &r[0],
            &["namespace", "pod", "reason"],
            &drops,
            |d| vec![d.namespace.into(), d.pod.into(), d.reason.into()],
            |_| 0.0,
        ),
        "Top dropping pods (drops over the range)" => exactly(
            &r[0],
            &["namespace", "pod", "direction", "reason"],
            &drops,
            |d| {
                vec![
                    d.namespace.into(),
                    d.pod.into(),
                    d.direction.into(),
                    d.reason.into(),
                ]
            },
            |d| d.at_least as f64,
        ),
        "Dropped bytes/s by pod" => exactly(
            &r[0],
            &["namespace", "pod"],
            &drops,
            |d| vec![d.namespace.into(), d.pod.into()],
            |_| 0.0,
        ),
        "Policy verdicts/s (new flows)" => verdicts(&r[0], sel, truth),
        "Map use (entries / capacity)" => map_use(&r[0]),
        "Policy implementation delay" => r
            .iter()
            .try_for_each(|s| one_value(s, |v| v > 0.0 && v < 10.0)),
        "Lost drop events/s by source" => {
            let sources = nonzero(&r[0], &["source"]);
            let want = lost.then(|| vec!["rate-limit".to_owned()]);
            match want {
                Some(w) if !sources.contains(&w) => Err(format!("no rate-limit losses in {r:?}")),
                None if !sources.is_empty() => {
                    Err(format!("losses where there were none: {sources:?}"))
                }
                _ => Ok(()),
            }
        }
        "kube-router chains on the nodes" => one_value(&r[0], |v| v == 0.0),
        // No policy is audited here.
        "Would-be drops/s (audit mode) by pod and reason" if r[0].is_empty() => Ok(()),
        "Would-be drops/s (audit mode) by pod and reason" => Err(format!("got {r:?}")),
        "Rule hits/s by policy and rule" => rule_hits(&r[0], sel, truth),
        other => Err(format!(
            "no expectation for panel {other:?}: add one to this test"
        )),
    }
}

/// One series (no labels) whose value passes `ok`.
fn one_value(s: &[Series], ok: impl Fn(f64) -> bool) -> Result<(), String> {
    match s {
        [one] if one.labels.is_empty() && ok(one.value) => Ok(()),
        _ => Err(format!("got {s:?}")),
    }
}

/// [`one_value`] when `some`, else no series at all (Grafana: "No data").
fn one_or_none(s: &[Series], some: bool, ok: impl Fn(f64) -> bool) -> Result<(), String> {
    if some {
        one_value(s, ok)
    } else if s.is_empty() {
        Ok(())
    } else {
        Err(format!("expected no data, got {s:?}"))
    }
}

/// Exactly one series per drop in `want` (keyed by `labels`, each `key` of a drop), no other, each
/// above 0 and at least `min` of its drop.
fn exactly(
    s: &[Series],
    labels: &[&str],
    want: &[&Loss],
    key: impl Fn(&Loss) -> Vec<String>,
    min: impl Fn(&Loss) -> f64,
) -> Result<(), String> {
    let mut expected: BTreeMap<Vec<String>, f64> = BTreeMap::new();
    for d in want {
        let m = expected.entry(key(d)).or_default();
        *m += min(d);
    }
    let got: BTreeMap<Vec<String>, f64> = s.iter().map(|s| (s.key(labels), s.value)).collect();
    let keys_match = got.len() == s.len() && got.keys().eq(expected.keys());
    let values_ok = expected
        .iter()
        .all(|(k, &m)| got.get(k).is_some_and(|&v| v > 0.0 && v >= m));
    if keys_match && values_ok {
        Ok(())
    } else {
        Err(format!(
            "want {labels:?} {expected:?} (at least), got {got:?}"
        ))
    }
}

/// The label values `labels` of the series above 0.
fn nonzero(s: &[Series], labels: &[&str]) -> BTreeSet<Vec<String>> {
    s.iter()
        .filter(|s| s.value > 0.0)
        .map(|s| s.key(labels))
        .collect()
}

/// Rule hits: x/b's allowed flow into x/a counts to x/allow-b's `ingress[0]`, on x/a's node; no
/// other rule allowed anything.
fn rule_hits(s: &[Series], sel: &Selection, truth: &Truth) -> Result<(), String> {
    let labels = ["policy_namespace", "policy", "rule"];
    let seen = sel.has_node(&truth.drops[0].node) && sel.namespace.is_none_or(|n| n == "x");
    let want: BTreeSet<Vec<String>> = seen
        .then(|| {
            vec![
                "x".to_owned(),
                "allow-b".to_owned(),
                "ingress[0]".to_owned(),
            ]
        })
        .into_iter()
        .collect();
    if s.len() == want.len() && nonzero(s, &labels) == want {
        Ok(())
    } else {
        Err(format!("want {want:?}, got {s:?}"))
    }
}

/// New-flow decisions: drops at x/a's ingress and y/a's egress, and x/b's allowed flow into x/a,
/// each on its node; every series names its match kind.
fn verdicts(s: &[Series], sel: &Selection, truth: &Truth) -> Result<(), String> {
    let got = nonzero(s, &["direction", "action"]);
    let n0 = &truth.drops[0].node;
    let n1 = &truth.drops[1].node;
    let mut want = BTreeSet::new();
    if sel.has_node(n0) {
        want.insert(vec!["ingress".to_owned(), "dropped".to_owned()]);
        want.insert(vec!["ingress".to_owned(), "allowed".to_owned()]);
    }
    if sel.has_node(n1) {
        want.insert(vec!["egress".to_owned(), "dropped".to_owned()]);
    }
    let named = s
        .iter()
        .all(|s| s.labels.get("match").is_some_and(|m| !m.is_empty()));
    if want.is_subset(&got) && named {
        Ok(())
    } else {
        Err(format!(
            "want at least {want:?} above 0, each with a match label; got {s:?}"
        ))
    }
}

/// One ratio per map, each in [0, 1], the flow table in use.
fn map_use(s: &[Series]) -> Result<(), String> {
    let maps: BTreeSet<&str> = s
        .iter()
        .filter_map(|s| s.labels.get("map").map(String::as_str))
        .collect();
    let in_range = s.iter().all(|s| (0.0..=1.0).contains(&s.value));
    let flows = s
        .iter()
        .any(|s| s.labels.get("map").map(String::as_str) == Some("NP_FLOWS_V1") && s.value > 0.0);
    if maps.len() == s.len() && maps.len() >= 8 && in_range && flows {
        Ok(())
    } else {
        Err(format!(
            "want one ratio in [0, 1] per map (at least 8), NP_FLOWS_V1 above 0; got {s:?}"
        ))
    }
}

// ------------------------------------------------------------------------------------------------
// Prometheus, scraping as prometheus-operator would from the PodMonitor.
// ------------------------------------------------------------------------------------------------

const AGENT_NAMESPACE: &str = "netpol-system";
const AGENT_POD_PREFIX: &str = "netpol-agent-";

/// The `job` label prometheus-operator gives a PodMonitor's targets: `<namespace>/<name>`.
fn job(pm: &serde_yaml_ng::Value) -> String {
    format!(
        "{}/{}",
        pm["metadata"]["namespace"].as_str().unwrap(),
        pm["metadata"]["name"].as_str().unwrap()
    )
}

/// An agent to scrape: its address and the pod Kubernetes would report for it.
struct Target {
    addr: String,
    node: String,
    pod: String,
}

/// The scrape job prometheus-operator generates for the PodMonitor's first endpoint, with the
/// static `targets` standing in for Kubernetes pod discovery (their `__meta_kubernetes_*` labels
/// are what discovery would give the agent pods).
fn scrape_job(pm: &serde_yaml_ng::Value, targets: &[Target]) -> Value {
    let spec = &pm["spec"];
    let endpoint = &spec["podMetricsEndpoints"][0];
    let port = endpoint["port"].as_str().expect("the endpoint's port name");
    let mut relabel =
        vec![json!({"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"})];
    for (k, v) in spec["selector"]["matchLabels"]
        .as_mapping()
        .expect("selector.matchLabels")
    {
        let k = sanitize(k.as_str().unwrap());
        relabel.push(json!({
            "action": "keep",
            "source_labels": [format!("__meta_kubernetes_pod_label_{k}"), format!("__meta_kubernetes_pod_labelpresent_{k}")],
            "regex": format!("({});true", v.as_str().unwrap()),
        }));
    }
    relabel.extend([
        json!({"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": port}),
        json!({"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"}),
        json!({"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"}),
        json!({"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"}),
        json!({"target_label": "job", "replacement": job(pm)}),
        json!({"target_label": "endpoint", "replacement": port}),
    ]);
    relabel.extend(
        endpoint["relabelings"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(relabeling),
    );
    let app = spec["selector"]["matchLabels"].as_mapping().unwrap();
    json!({
        "job_name": format!("podMonitor/{}/0", job(pm)),
        "honor_labels": endpoint["honorLabels"].as_bool().unwrap_or(false),
        "metrics_path": endpoint["path"].as_str().unwrap_or("/metrics"),
        "scrape_interval": "1s",
        "relabel_configs": relabel,
        "static_configs": targets.iter().map(|t| static_target(t, app, port)).collect::<Vec<_>>(),
    })
}

/// One agent pod as discovery would describe it.
fn static_target(t: &Target, pod_labels: &serde_yaml_ng::Mapping, port: &str) -> Value {
    let mut labels = serde_json::Map::new();
    for (k, v) in [
        ("__meta_kubernetes_namespace", AGENT_NAMESPACE),
        ("__meta_kubernetes_pod_name", &t.pod),
        ("__meta_kubernetes_pod_container_name", "agent"),
        ("__meta_kubernetes_pod_container_port_name", port),
        ("__meta_kubernetes_pod_node_name", &t.node),
    ] {
        labels.insert(k.to_owned(), json!(v));
    }
    for (k, v) in pod_labels {
        let k = sanitize(k.as_str().unwrap());
        labels.insert(
            format!("__meta_kubernetes_pod_label_{k}"),
            json!(v.as_str().unwrap()),
        );
        labels.insert(
            format!("__meta_kubernetes_pod_labelpresent_{k}"),
            json!("true"),
        );
    }
    json!({"targets": [t.addr], "labels": labels})
}

/// A PodMonitor relabeling (camelCase) as Prometheus configuration (snake_case), as the operator
/// writes it.
fn relabeling(r: &serde_yaml_ng::Value) -> Value {
    let mut out = serde_json::Map::new();
    for (k, v) in r.as_mapping().expect("a relabeling") {
        let key = match k.as_str().unwrap() {
            "sourceLabels" => "source_labels",
            "targetLabel" => "target_label",
            "action" => "action",
            "regex" => "regex",
            "replacement" => "replacement",
            "separator" => "separator",
            "modulus" => "modulus",
            other => panic!("relabeling field {other}: teach this test its Prometheus name"),
        };
        let mut v: Value = serde_json::to_value(v).unwrap();
        if key == "action" {
            v = json!(v.as_str().unwrap().to_ascii_lowercase());
        }
        out.insert(key.to_owned(), v);
    }
    Value::Object(out)
}

/// A Kubernetes label name as discovery writes it into a Prometheus label name.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

#[derive(Debug)]
struct Series {
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Series {
    fn key(&self, labels: &[&str]) -> Vec<String> {
        labels
            .iter()
            .map(|l| self.labels.get(*l).cloned().unwrap_or_default())
            .collect()
    }
}

/// A Prometheus server in node 0's network namespace, on a free port of its loopback, scraping both
/// agents over the underlay; killed and its directory removed on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    netns: String,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(c: &Cluster, podmonitor: &serde_yaml_ng::Value) -> Prometheus {
        let netns = c.nodes[0].name.clone();
        let targets: Vec<Target> = c
            .nodes
            .iter()
            .map(|n| Target {
                addr: format!("{}:{METRICS_PORT}", n.underlay_v4),
                node: n.name.clone(),
                pod: format!("{AGENT_POD_PREFIX}{}", n.index),
            })
            .collect();
        let config = json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [scrape_job(podmonitor, &targets)],
        });
        let dir = c.tmp_dir.join("prometheus");
        std::fs::create_dir_all(dir.join("data")).unwrap();
        // JSON is YAML: Prometheus reads it as its configuration.
        std::fs::write(dir.join("prometheus.yml"), config.to_string()).unwrap();
        let addr = free_port(&netns);
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &netns, "prometheus"])
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect(
                "starting prometheus (Debian package `prometheus`; cargo xtask setup installs it)",
            );
        let prom = Prometheus {
            child,
            dir,
            netns,
            addr,
        };
        prom.wait_for("Prometheus to start", "vector(1)");
        prom
    }

    /// `GET path` on the server: the body of a 200.
    fn get(&self, path: &str) -> Result<String, String> {
        match http_get_in_netns(&self.netns, self.addr, path) {
            Ok((200, body)) => Ok(body),
            Ok((code, body)) => Err(format!("{path}: HTTP {code}: {body}")),
            Err(e) => Err(format!("{path}: {e:#}")),
        }
    }

    /// An instant query, now.
    fn query(&self, q: &str) -> Result<Vec<Series>, String> {
        let v = self.api(&format!("/api/v1/query?query={}", encode(q)))?;
        let result = v["data"]["result"]
            .as_array()
            .ok_or_else(|| format!("{q}: {v}"))?;
        result.iter().map(|r| series(q, r)).collect()
    }

    /// The values of `label` on the series of `metric` (Grafana's `label_values`).
    fn label_values(&self, label: &str, metric: &str) -> Result<BTreeSet<String>, String> {
        let v = self.api(&format!(
            "/api/v1/label/{label}/values?match[]={}",
            encode(metric)
        ))?;
        let values = v["data"].as_array().ok_or_else(|| format!("{v}"))?;
        Ok(values
            .iter()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect())
    }

    fn api(&self, path: &str) -> Result<Value, String> {
        let body = self.get(path)?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{path}: {e}: {body}"))?;
        if v["status"] != "success" {
            return Err(format!("{path}: {v}"));
        }
        Ok(v)
    }

    /// Polls until `q` returns a series (30 s at most).
    fn wait_for(&self, what: &str, q: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let last = self.query(q);
            if last.as_ref().is_ok_and(|s| !s.is_empty()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "waiting for {what} ({q}): {last:?}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port nobody listens on, on the loopback of `netns` (bound and released: nothing else runs
/// there that could take it meanwhile).
fn free_port(netns: &str) -> SocketAddr {
    in_netns(netns, || {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        Ok(l.local_addr()?)
    })
    .unwrap()
}

/// One result of an instant vector query.
fn series(q: &str, r: &Value) -> Result<Series, String> {
    let labels = r["metric"]
        .as_object()
        .ok_or_else(|| format!("{q}: {r}"))?
        .iter()
        .filter(|(k, _)| *k != "__name__")
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect();
    let value = r["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{q}: value of {r}"))?;
    Ok(Series { labels, value })
}

/// Percent-encoding for a URL query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
