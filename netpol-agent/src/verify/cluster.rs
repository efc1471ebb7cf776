//! `verify --cluster`: every node of the cluster, whether an agent pod is Ready there, and the nodes
//! where NetworkPolicies exist but no agent enforces them.
//!
//! [`gather`] lists, through the Kubernetes API, every Node, the agent pods (namespace
//! [`AGENT_NAMESPACE`], label [`AGENT_POD_LABEL`]) and every NetworkPolicy, and, only when a node
//! lacks a Ready agent while policies exist, every Pod (to name the unenforced ones). [`judge`] turns
//! that into one [`Check`] per node, `node/<name>`, by pure functions:
//!
//! | node | agent pod on it | NetworkPolicies in the cluster | verdict |
//! | --- | --- | --- | --- |
//! | Ready (cordoned or not) | Ready | any | PASS |
//! | Ready | none, or not Ready | some | FAIL: not enforcing; the pods there that policies select are named |
//! | Ready | none, or not Ready | none | WARN: nothing to enforce yet, but a first policy would not be enforced there |
//! | NotReady / Unknown | any agent pod | any | WARN: the kubelet does not report, the pod's readiness is stale |
//! | NotReady / Unknown | none | some | FAIL |
//! | NotReady / Unknown | none | none | WARN |
//!
//! A not-Ready agent is a FAIL when policies exist, as `agent.ready` is on the node: the agent is
//! starting (its first sync has not programmed the datapath) or cannot reach the API; a restarting
//! agent keeps the policy it last programmed, but changes and new pods are not enforced until it is
//! ready again. A cordoned node is noted in the evidence: cordoning does not change enforcement.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::{core::v1 as core, networking::v1 as networking};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{Api, Client, api::ListParams};
use serde_json::json;

use super::Check;
use crate::{model::Labels, model::selector::Selector};

/// The namespace the agent's DaemonSet runs in (`deploy/namespace.yaml`, `deploy/daemonset.yaml`).
pub const AGENT_NAMESPACE: &str = "netpol-system";
/// The label on every agent pod: the DaemonSet's `spec.selector.matchLabels` and
/// `spec.template.metadata.labels` in `deploy/daemonset.yaml` (a unit test checks they agree).
pub const AGENT_POD_LABEL: (&str, &str) = ("app.kubernetes.io/name", "netpol-agent");
/// Each list gives up after this long (an unreachable API server must not hang a Job).
const LIST_TIMEOUT: Duration = Duration::from_secs(20);
/// Unenforced pods named per node; the rest are counted.
const MAX_NAMED_PODS: usize = 10;

/// `n` and the noun, singular or plural.
fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The label selector of the agent pods, as the API takes it: `app.kubernetes.io/name=netpol-agent`.
pub fn agent_label_selector() -> String {
    format!("{}={}", AGENT_POD_LABEL.0, AGENT_POD_LABEL.1)
}

// ---------------------------------------------------------------------------------------- evidence

/// A node's `Ready` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeReady {
    True,
    False,
    /// `Unknown` (the node controller lost the kubelet), or no condition at all.
    Unknown,
}

/// A Node, as far as enforcement is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub ready: NodeReady,
    /// The `Ready` condition's reason and message, when not Ready.
    pub ready_reason: Option<String>,
    /// `spec.unschedulable` (cordoned).
    pub unschedulable: bool,
}

impl NodeInfo {
    pub fn from_k8s(node: &core::Node) -> Self {
        let ready = condition(
            node.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .into_iter()
                .flatten()
                .map(|c| (&c.type_, &c.status, &c.reason, &c.message)),
        );
        NodeInfo {
            name: node.metadata.name.clone().unwrap_or_default(),
            ready: match ready.as_ref().map(|r| r.0.as_str()) {
                Some("True") => NodeReady::True,
                Some("False") => NodeReady::False,
                _ => NodeReady::Unknown,
            },
            ready_reason: ready.and_then(|r| r.1),
            unschedulable: node
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false),
        }
    }
}

/// The `Ready` condition among `conditions` (type, status, reason, message): its status and, when
/// there is one, "reason: message".
fn condition<'a>(
    mut conditions: impl Iterator<
        Item = (
            &'a String,
            &'a String,
            &'a Option<String>,
            &'a Option<String>,
        ),
    >,
) -> Option<(String, Option<String>)> {
    conditions
        .find(|(t, ..)| t.as_str() == "Ready")
        .map(|(_, status, reason, message)| {
            let why = match (reason, message) {
                (Some(r), Some(m)) => Some(format!("{r}: {m}")),
                (Some(r), None) => Some(r.clone()),
                (None, Some(m)) => Some(m.clone()),
                (None, None) => None,
            };
            (status.clone(), why)
        })
}

/// An agent pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentPod {
    pub name: String,
    /// `spec.nodeName`; `None` while unscheduled.
    pub node: Option<String>,
    /// The pod's `Ready` condition is `True` (its readiness probe, `/readyz`, answers: synced and
    /// programmed).
    pub ready: bool,
    /// Why it is not Ready: phase, the condition's reason, a waiting container's reason.
    pub not_ready_reason: Option<String>,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
    /// The container port named `metrics`, where `/metrics` is served.
    pub metrics_port: Option<i32>,
    /// kube-router NetworkPolicy chains the agent finds on its node (`netpol_kube_router_chains`,
    /// read through the API server's pod proxy): `None` when not asked (not Ready, no port).
    pub kube_router_chains: Option<Result<u64, String>>,
}

impl AgentPod {
    pub fn from_k8s(pod: &core::Pod) -> Self {
        let status = pod.status.as_ref();
        let ready = condition(
            status
                .and_then(|s| s.conditions.as_ref())
                .into_iter()
                .flatten()
                .map(|c| (&c.type_, &c.status, &c.reason, &c.message)),
        );
        let is_ready = ready.as_ref().is_some_and(|r| r.0 == "True");
        let not_ready_reason = (!is_ready).then(|| {
            let mut why = vec![format!(
                "phase {}",
                status.and_then(|s| s.phase.as_deref()).unwrap_or("unknown")
            )];
            match ready {
                Some((_, Some(r))) => why.push(format!("Ready=False ({r})")),
                Some(_) => why.push("Ready=False".into()),
                None => why.push("no Ready condition".into()),
            }
            for cs in status
                .and_then(|s| s.container_statuses.as_ref())
                .into_iter()
                .flatten()
            {
                if let Some(w) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) {
                    why.push(format!(
                        "container {} waiting: {}",
                        cs.name,
                        w.reason.as_deref().unwrap_or("no reason")
                    ));
                }
                if cs.restart_count > 0 {
                    why.push(format!(
                        "container {} restarted {} times",
                        cs.name, cs.restart_count
                    ));
                }
            }
            why.join(", ")
        });
        AgentPod {
            name: pod.metadata.name.clone().unwrap_or_default(),
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            ready: is_ready,
            not_ready_reason,
            terminating: pod.metadata.deletion_timestamp.is_some(),
            metrics_port: pod
                .spec
                .iter()
                .flat_map(|s| &s.containers)
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| p.name.as_deref() == Some("metrics"))
                .map(|p| p.container_port),
            kube_router_chains: None,
        }
    }
}

/// The value of `netpol_kube_router_chains` in a Prometheus text exposition.
pub fn kube_router_chains(metrics: &str) -> Result<u64, String> {
    metrics
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix("netpol_kube_router_chains")?;
            rest.strip_prefix("{} ").or_else(|| rest.strip_prefix(' '))
        })
        .ok_or_else(|| "no netpol_kube_router_chains in the agent's metrics".to_owned())?
        .trim()
        .parse::<f64>()
        .map(|v| v as u64)
        .map_err(|e| format!("netpol_kube_router_chains: {e}"))
}

/// Asks a Ready agent pod's `/metrics`, through the API server's pod proxy, how many kube-router
/// chains are on its node.
async fn ask_kube_router(client: &Client, agent: &AgentPod) -> Option<Result<u64, String>> {
    let port = agent.metrics_port.filter(|_| agent.ready)?;
    let path = format!(
        "/api/v1/namespaces/{AGENT_NAMESPACE}/pods/{}:{port}/proxy/metrics",
        agent.name
    );
    let request = match hyper::Request::get(&path).body(Vec::new()) {
        Ok(r) => r,
        Err(e) => return Some(Err(e.to_string())),
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), client.request_text(request)).await;
    Some(match answer {
        Ok(Ok(text)) => kube_router_chains(&text),
        Ok(Err(e)) => Err(format!("reading {path}: {}", error_chain(&e))),
        Err(_) => Err(format!("reading {path}: no answer in 10 s")),
    })
}

/// A NetworkPolicy: where it is and which pods of its namespace it selects.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyInfo {
    pub namespace: String,
    pub name: String,
    pub pod_selector: LabelSelector,
}

impl PolicyInfo {
    pub fn from_k8s(p: &networking::NetworkPolicy) -> Self {
        PolicyInfo {
            namespace: p.metadata.namespace.clone().unwrap_or_default(),
            name: p.metadata.name.clone().unwrap_or_default(),
            pod_selector: p
                .spec
                .as_ref()
                .and_then(|s| s.pod_selector.clone())
                .unwrap_or_default(),
        }
    }
}

/// A pod that a policy could select.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    pub labels: Labels,
    pub host_network: bool,
    /// `Succeeded` or `Failed`: no traffic any more.
    pub finished: bool,
}

impl PodInfo {
    pub fn from_k8s(pod: &core::Pod) -> Self {
        let spec = pod.spec.as_ref();
        PodInfo {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            node: spec.and_then(|s| s.node_name.clone()),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            finished: matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ),
        }
    }
}

/// Everything `verify --cluster` judges. A list that failed holds the error.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterEvidence {
    /// Which API configuration was used (for the evidence): the kubeconfig's path, or inference.
    pub api: String,
    pub nodes: Result<Vec<NodeInfo>, String>,
    pub agent_pods: Result<Vec<AgentPod>, String>,
    pub policies: Result<Vec<PolicyInfo>, String>,
    /// Every pod; listed only when policies exist and some node has no Ready agent.
    pub pods: Option<Result<Vec<PodInfo>, String>>,
}

// ----------------------------------------------------------------------------------------- gather

/// Lists what [`judge`] needs through `client`.
pub async fn gather(client: &Client, api: String) -> ClusterEvidence {
    let nodes = list(
        Api::<core::Node>::all(client.clone()),
        ListParams::default(),
    )
    .await
    .map(|l| l.iter().map(NodeInfo::from_k8s).collect::<Vec<_>>());
    let mut agent_pods = list(
        Api::<core::Pod>::namespaced(client.clone(), AGENT_NAMESPACE),
        ListParams::default().labels(&agent_label_selector()),
    )
    .await
    .map(|l| l.iter().map(AgentPod::from_k8s).collect::<Vec<_>>());
    for a in agent_pods.iter_mut().flatten() {
        a.kube_router_chains = ask_kube_router(client, a).await;
    }
    let policies = list(
        Api::<networking::NetworkPolicy>::all(client.clone()),
        ListParams::default(),
    )
    .await
    .map(|l| l.iter().map(PolicyInfo::from_k8s).collect::<Vec<_>>());
    let mut evidence = ClusterEvidence {
        api,
        nodes,
        agent_pods,
        policies,
        pods: None,
    };
    if needs_pods(&evidence) {
        evidence.pods = Some(
            list(Api::<core::Pod>::all(client.clone()), ListParams::default())
                .await
                .map(|l| l.iter().map(PodInfo::from_k8s).collect()),
        );
    }
    evidence
}

async fn list<K>(api: Api<K>, params: ListParams) -> Result<Vec<K>, String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let plural = K::plural(&K::DynamicType::default()).into_owned();
    match tokio::time::timeout(LIST_TIMEOUT, api.list(&params)).await {
        Ok(Ok(l)) => Ok(l.items),
        Ok(Err(kube::Error::Api(s))) if s.code == 403 => Err(format!(
            "listing {plural}: forbidden (403): {} (verify --cluster needs list on nodes, pods and networkpolicies)",
            s.message
        )),
        Ok(Err(kube::Error::Api(s))) => Err(format!(
            "listing {plural}: {} {}: {}",
            s.code, s.reason, s.message
        )),
        Ok(Err(e)) => Err(format!("listing {plural}: {}", error_chain(&e))),
        Err(_) => Err(format!(
            "listing {plural}: no answer within {}s",
            LIST_TIMEOUT.as_secs()
        )),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        source = cause.source();
    }
    s
}

/// Whether the pods must be listed: policies exist and some node has no Ready agent pod.
pub fn needs_pods(e: &ClusterEvidence) -> bool {
    let (Ok(nodes), Ok(agents), Ok(policies)) = (&e.nodes, &e.agent_pods, &e.policies) else {
        return false;
    };
    !policies.is_empty()
        && nodes.iter().any(|n| {
            !agents
                .iter()
                .any(|a| a.ready && a.node.as_deref() == Some(&n.name))
        })
}

// ------------------------------------------------------------------------------------------ judge

/// The checks of `verify --cluster`: `cluster.api` (FAIL) when a list failed; otherwise
/// `cluster.policies` (an overview, PASS) and one `node/<name>` per node.
pub fn judge(e: &ClusterEvidence) -> Vec<Check> {
    let (nodes, agents, policies) = match (&e.nodes, &e.agent_pods, &e.policies) {
        (Ok(n), Ok(a), Ok(p)) => (n, a, p),
        _ => {
            let errors: Vec<String> = [
                e.nodes.as_ref().err(),
                e.agent_pods.as_ref().err(),
                e.policies.as_ref().err(),
            ]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
            return vec![
                Check::fail(
                    "cluster.api",
                    format!(
                        "cannot read the cluster from the Kubernetes API ({}): {}",
                        e.api, errors[0]
                    ),
                )
                .with_details(errors),
            ];
        }
    };
    let selected = e
        .pods
        .as_ref()
        .map(|p| p.as_ref().map(|pods| selected_pods(pods, policies)));
    let mut checks = vec![overview(nodes, agents, policies)];
    if nodes.is_empty() {
        checks.push(Check::warn(
            "cluster.nodes",
            format!("the Kubernetes API ({}) lists no nodes", e.api),
        ));
    }
    for n in nodes {
        let on_node: Vec<&AgentPod> = agents
            .iter()
            .filter(|a| a.node.as_deref() == Some(&n.name))
            .collect();
        let unenforced = selected.as_ref().map(|s| match s {
            Ok(by_node) => Ok(by_node.get(n.name.as_str()).cloned().unwrap_or_default()),
            Err(e) => Err(e.to_string()),
        });
        checks.push(node(n, &on_node, policies.len(), unenforced));
    }
    checks
}

/// `cluster.policies`: how many policies, where, and how many agents are Ready.
fn overview(nodes: &[NodeInfo], agents: &[AgentPod], policies: &[PolicyInfo]) -> Check {
    let namespaces: std::collections::BTreeSet<&str> =
        policies.iter().map(|p| p.namespace.as_str()).collect();
    let ready = agents.iter().filter(|a| a.ready).count();
    let unscheduled: Vec<String> = agents
        .iter()
        .filter(|a| a.node.is_none())
        .map(|a| format!("agent pod {AGENT_NAMESPACE}/{} is not scheduled", a.name))
        .collect();
    Check::pass(
        "cluster.policies",
        format!(
            "{} in {}; {}; {} ({AGENT_NAMESPACE}, {}), {ready} Ready",
            count(policies.len(), "NetworkPolicy", "NetworkPolicies"),
            count(namespaces.len(), "namespace", "namespaces"),
            count(nodes.len(), "node", "nodes"),
            count(agents.len(), "agent pod", "agent pods"),
            agent_label_selector(),
        ),
    )
    .with_details(unscheduled)
    .with_data(json!({
        "policies": policies.len(),
        "policy_namespaces": namespaces,
        "nodes": nodes.len(),
        "agent_pods": agents.len(),
        "agent_pods_ready": ready,
    }))
}

/// A pod left unenforced: `namespace/name` and the policies that select it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectedPod {
    pub pod: String,
    pub policies: Vec<String>,
}

/// Per node, the pods that some policy selects (hostNetwork and finished pods are never isolated).
/// A policy whose podSelector does not validate is counted as selecting its whole namespace (the
/// agent fails closed on it).
pub fn selected_pods<'a>(
    pods: &'a [PodInfo],
    policies: &[PolicyInfo],
) -> BTreeMap<&'a str, Vec<SelectedPod>> {
    let parsed: Vec<(&PolicyInfo, Selector)> = policies
        .iter()
        .map(|p| {
            let s = Selector::parse(&p.pod_selector, "spec.podSelector")
                .unwrap_or_else(|_| Selector::everything());
            (p, s)
        })
        .collect();
    let mut out: BTreeMap<&str, Vec<SelectedPod>> = BTreeMap::new();
    for pod in pods {
        let Some(node) = pod.node.as_deref() else {
            continue;
        };
        if pod.host_network || pod.finished {
            continue;
        }
        let by: Vec<String> = parsed
            .iter()
            .filter(|(p, s)| p.namespace == pod.namespace && s.matches(&pod.labels))
            .map(|(p, _)| p.name.clone())
            .collect();
        if !by.is_empty() {
            out.entry(node).or_default().push(SelectedPod {
                pod: format!("{}/{}", pod.namespace, pod.name),
                policies: by,
            });
        }
    }
    out
}

/// `node/<name>`: the verdict for one node (see the module's table).
///
/// `unenforced`: the pods on the node that policies select, when the pods were listed.
pub fn node(
    n: &NodeInfo,
    agents: &[&AgentPod],
    policies: usize,
    unenforced: Option<Result<Vec<SelectedPod>, String>>,
) -> Check {
    let name = format!("node/{}", n.name);
    let ready_agent = agents.iter().find(|a| a.ready);
    let mut state = Vec::new();
    match n.ready {
        NodeReady::True => {}
        NodeReady::False => state.push("node NotReady".to_owned()),
        NodeReady::Unknown => state.push("node Ready=Unknown".to_owned()),
    }
    if let (NodeReady::False | NodeReady::Unknown, Some(r)) = (n.ready, &n.ready_reason) {
        state.push(format!("({r})"));
    }
    if n.unschedulable {
        state.push("node cordoned".to_owned());
    }
    let node_state = if state.is_empty() {
        String::new()
    } else {
        format!("; {}", state.join(" "))
    };
    let agent_data: Vec<_> = agents
        .iter()
        .map(|a| {
            json!({"pod": format!("{AGENT_NAMESPACE}/{}", a.name), "ready": a.ready,
            "terminating": a.terminating, "reason": a.not_ready_reason,
            "kube_router_chains": a.kube_router_chains.as_ref().map(|c| match c {
                Ok(n) => json!(n),
                Err(e) => json!({"unknown": e}),
            })})
        })
        .collect();
    let mut data = json!({
        "node": n.name,
        "node_ready": match n.ready { NodeReady::True => "True", NodeReady::False => "False", NodeReady::Unknown => "Unknown" },
        "cordoned": n.unschedulable,
        "agent_pods": agent_data,
        "policies": policies,
    });
    let describe = |a: &AgentPod| {
        let mut s = format!("{AGENT_NAMESPACE}/{}", a.name);
        if a.terminating {
            s.push_str(" (terminating)");
        }
        s
    };
    let node_reporting = n.ready == NodeReady::True;

    if let Some(a) = ready_agent {
        if let Some(Ok(chains @ 1..)) = a.kube_router_chains {
            return Check::fail(
                name,
                format!(
                    "agent pod {} Ready, but kube-router's NetworkPolicy rules are on this node too ({}){node_state}",
                    describe(a),
                    count(chains as usize, "chain", "chains")
                ),
            )
            .with_details(vec![
                "two engines judge each packet, and the stale rules kube-router leaves behind keep enforcing the policies of the moment it stopped: turn its controller off (--disable-network-policy) and remove its chains and ipsets (README, K3s quick start, step 3)".to_owned(),
            ])
            .with_data(data);
        }
        let summary = format!("agent pod {} Ready{node_state}", describe(a));
        let check = if node_reporting {
            Check::pass(name, summary)
        } else {
            Check::warn(name, summary).with_details(vec![
                "the node's kubelet does not report: the agent pod's readiness is stale; the policy it last programmed stays enforced while the node runs".to_owned(),
            ])
        };
        return check.with_data(data);
    }

    // No Ready agent.
    let agent_state = match agents {
        [] => "no agent pod".to_owned(),
        _ => format!(
            "agent pod {} not Ready: {}",
            agents
                .iter()
                .map(|a| describe(a))
                .collect::<Vec<_>>()
                .join(", "),
            agents
                .iter()
                .filter_map(|a| a.not_ready_reason.clone())
                .collect::<Vec<_>>()
                .join("; ")
        ),
    };
    if !node_reporting && !agents.is_empty() {
        return Check::warn(
            name,
            format!("{agent_state}{node_state}"),
        )
        .with_details(vec![
            "the node's kubelet does not report: the agent pod's state is stale; check the node first".to_owned(),
        ])
        .with_data(data);
    }
    if policies == 0 {
        let mut details =
            vec!["no NetworkPolicy exists, so nothing is left unenforced now; a first policy would not be enforced on this node".to_owned()];
        if agents.is_empty() {
            details.push(format!(
                "the DaemonSet {AGENT_NAMESPACE}/netpol-agent runs on every node: is it installed (kubectl apply -k deploy/)?"
            ));
        }
        return Check::warn(name, format!("{agent_state}{node_state}"))
            .with_details(details)
            .with_data(data);
    }
    let mut details = Vec::new();
    let pods_part = match &unenforced {
        Some(Ok(pods)) => {
            data["unenforced_pods"] = json!(
                pods.iter()
                    .map(|p| json!({"pod": p.pod, "policies": p.policies}))
                    .collect::<Vec<_>>()
            );
            for p in pods.iter().take(MAX_NAMED_PODS) {
                details.push(format!(
                    "{} is selected by {} but not isolated here",
                    p.pod,
                    p.policies.join(", ")
                ));
            }
            if pods.len() > MAX_NAMED_PODS {
                details.push(format!("... and {} more", pods.len() - MAX_NAMED_PODS));
            }
            format!(
                ", {} on this node selected by {}",
                count(pods.len(), "pod", "pods"),
                if policies == 1 { "it" } else { "them" }
            )
        }
        Some(Err(e)) => {
            details.push(format!("cannot tell which pods are selected: {e}"));
            String::new()
        }
        None => String::new(),
    };
    if agents.is_empty() {
        details.push(format!(
            "the DaemonSet {AGENT_NAMESPACE}/netpol-agent tolerates every taint: see `kubectl -n {AGENT_NAMESPACE} describe ds/netpol-agent`"
        ));
    } else {
        details.push(format!(
            "`kubectl -n {AGENT_NAMESPACE} logs {}`; a restarting agent keeps the policy it last programmed, but changes and new pods are not enforced until it is Ready",
            agents[0].name
        ));
    }
    Check::fail(
        name,
        format!(
            "NOT enforcing: {agent_state}{node_state}; {} in the cluster{pods_part}",
            count(policies, "NetworkPolicy", "NetworkPolicies")
        ),
    )
    .with_details(details)
    .with_data(data)
}

#[cfg(test)]
mod tests;
