use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1 as core;

use super::*;
use crate::verify::{Outcome, Report, Scope};

fn node_info(name: &str) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        ready: NodeReady::True,
        ready_reason: None,
        unschedulable: false,
    }
}

fn agent(name: &str, node: &str, ready: bool) -> AgentPod {
    AgentPod {
        name: name.into(),
        node: Some(node.into()),
        ready,
        not_ready_reason: (!ready)
            .then(|| "phase Running, Ready=False (ContainersNotReady)".into()),
        terminating: false,
        metrics_port: Some(9102),
        kube_router_chains: None,
    }
}

fn policy(ns: &str, name: &str, app: Option<&str>) -> PolicyInfo {
    PolicyInfo {
        namespace: ns.into(),
        name: name.into(),
        pod_selector: LabelSelector {
            match_labels: app.map(|a| [("app".to_owned(), a.to_owned())].into()),
            ..LabelSelector::default()
        },
    }
}

fn pod(ns: &str, name: &str, node: &str, app: &str) -> PodInfo {
    PodInfo {
        namespace: ns.into(),
        name: name.into(),
        node: Some(node.into()),
        labels: [("app".to_owned(), app.to_owned())].into(),
        host_network: false,
        finished: false,
    }
}

/// node-a: Ready agent; node-b: agent not Ready; node-c: none.
fn three_nodes(policies: Vec<PolicyInfo>, pods: Option<Vec<PodInfo>>) -> ClusterEvidence {
    ClusterEvidence {
        api: "test".into(),
        nodes: Ok(vec![
            node_info("node-a"),
            node_info("node-b"),
            node_info("node-c"),
        ]),
        agent_pods: Ok(vec![
            agent("netpol-agent-a", "node-a", true),
            agent("netpol-agent-b", "node-b", false),
        ]),
        policies: Ok(policies),
        pods: pods.map(Ok),
    }
}

fn outcomes(checks: &[Check]) -> Vec<(&str, Outcome)> {
    checks
        .iter()
        .map(|c| (c.name.as_ref(), c.outcome))
        .collect()
}

fn named<'a>(checks: &'a [Check], name: &str) -> &'a Check {
    checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no {name} in {checks:#?}"))
}

#[test]
fn policies_and_nodes_without_a_ready_agent_fail() {
    let e = three_nodes(
        vec![policy("x", "deny", Some("web"))],
        Some(vec![
            pod("x", "web-1", "node-c", "web"),
            pod("x", "db-1", "node-c", "db"),
            pod("y", "web-2", "node-c", "web"),
            pod("x", "web-3", "node-a", "web"),
        ]),
    );
    assert!(needs_pods(&e));
    let checks = judge(&e);
    assert_eq!(
        outcomes(&checks),
        [
            ("cluster.policies", Outcome::Pass),
            ("node/node-a", Outcome::Pass),
            ("node/node-b", Outcome::Fail),
            ("node/node-c", Outcome::Fail),
        ]
    );
    let a = named(&checks, "node/node-a");
    assert!(
        a.summary
            .contains("agent pod netpol-system/netpol-agent-a Ready"),
        "{a:#?}"
    );
    let b = named(&checks, "node/node-b");
    assert!(b.summary.contains("not Ready"), "{b:#?}");
    assert!(b.summary.contains("ContainersNotReady"), "{b:#?}");
    assert!(
        b.summary.contains("1 NetworkPolicy in the cluster"),
        "{b:#?}"
    );
    let c = named(&checks, "node/node-c");
    assert!(
        c.summary
            .contains("NOT enforcing: no agent pod; 1 NetworkPolicy in the cluster, 1 pod on this node selected by it"),
        "{c:#?}"
    );
    // Only x/web-1: db-1 is not selected, y/web-2 is in another namespace.
    assert_eq!(
        c.details[0], "x/web-1 is selected by deny but not isolated here",
        "{c:#?}"
    );
    let data = c.data.as_ref().unwrap();
    assert_eq!(data["unenforced_pods"][0]["pod"], "x/web-1");
    assert_eq!(data["policies"], 1);
    let report = Report {
        checks,
        scope: Scope::Cluster,
    };
    assert_eq!(report.exit_code(), 1);
    assert!(
        report
            .render_text()
            .contains("NOT proven enforced on every node")
    );
}

#[test]
fn without_policies_missing_agents_warn() {
    let e = three_nodes(vec![], None);
    assert!(!needs_pods(&e));
    let checks = judge(&e);
    assert_eq!(
        outcomes(&checks),
        [
            ("cluster.policies", Outcome::Pass),
            ("node/node-a", Outcome::Pass),
            ("node/node-b", Outcome::Warn),
            ("node/node-c", Outcome::Warn),
        ]
    );
    let report = Report {
        checks,
        scope: Scope::Cluster,
    };
    assert_eq!(report.exit_code(), 2);
}

#[test]
fn all_ready_passes() {
    let mut e = three_nodes(vec![policy("x", "deny", None)], None);
    e.agent_pods = Ok(vec![
        agent("netpol-agent-a", "node-a", true),
        agent("netpol-agent-b", "node-b", true),
        agent("netpol-agent-c", "node-c", true),
    ]);
    assert!(!needs_pods(&e), "every node has a Ready agent");
    let report = Report {
        checks: judge(&e),
        scope: Scope::Cluster,
    };
    assert_eq!(report.exit_code(), 0, "{report:#?}");
    assert!(
        report
            .render_text()
            .contains("a Ready netpol-agent enforces NetworkPolicy on every node")
    );
}

/// An agent that finds kube-router's chains on its node fails the node: two engines judge each
/// packet and the stale rules keep the policies of the moment kube-router stopped.
#[test]
fn kube_router_rules_next_to_a_ready_agent_fail_the_node() {
    let n = node_info("n");
    let mut a = agent("p", "n", true);
    a.kube_router_chains = Some(Ok(3));
    let c = node(&n, &[&a], 1, None);
    assert_eq!(c.outcome, Outcome::Fail, "{c:#?}");
    assert!(
        c.summary.contains("kube-router's NetworkPolicy rules"),
        "{c:#?}"
    );
    assert!(c.summary.contains("3 chains"), "{c:#?}");
    // None found, or not readable (a proxy refused): the agent's readiness decides.
    for chains in [Some(Ok(0)), Some(Err("forbidden".to_owned())), None] {
        a.kube_router_chains = chains.clone();
        assert_eq!(
            node(&n, &[&a], 1, None).outcome,
            Outcome::Pass,
            "{chains:?}"
        );
    }
}

#[test]
fn the_kube_router_gauge_is_read_from_the_metrics_text() {
    let text = "# HELP netpol_kube_router_chains kube-router chains\n\
                # TYPE netpol_kube_router_chains gauge\n\
                netpol_kube_router_chains 4\n\
                netpol_ready 1\n";
    assert_eq!(kube_router_chains(text), Ok(4));
    assert_eq!(kube_router_chains("netpol_kube_router_chains{} 2\n"), Ok(2));
    assert!(kube_router_chains("netpol_ready 1\n").is_err());
}

#[test]
fn node_state() {
    // Cordoned with a Ready agent: still enforcing.
    let mut n = node_info("n");
    n.unschedulable = true;
    let a = agent("p", "n", true);
    let c = node(&n, &[&a], 3, None);
    assert_eq!(c.outcome, Outcome::Pass, "{c:#?}");
    assert!(c.summary.contains("node cordoned"), "{c:#?}");
    // NotReady: the agent's readiness is stale.
    n.ready = NodeReady::False;
    n.ready_reason = Some("KubeletNotReady: PLEG is not healthy".into());
    let c = node(&n, &[&a], 3, None);
    assert_eq!(c.outcome, Outcome::Warn, "{c:#?}");
    assert!(
        c.summary.contains("node NotReady (KubeletNotReady"),
        "{c:#?}"
    );
    let b = agent("p", "n", false);
    assert_eq!(node(&n, &[&b], 3, None).outcome, Outcome::Warn);
    // NotReady and no agent ever there, with policies: not enforcing.
    assert_eq!(node(&n, &[], 3, None).outcome, Outcome::Fail);
    assert_eq!(node(&n, &[], 0, None).outcome, Outcome::Warn);
    // A Ready agent among several (a rollout) counts.
    n.ready = NodeReady::True;
    assert_eq!(node(&n, &[&b, &a], 3, None).outcome, Outcome::Pass);
    // The pod list failed: still a FAIL, saying so.
    let c = node(&n, &[], 3, Some(Err("listing pods: forbidden".into())));
    assert_eq!(c.outcome, Outcome::Fail);
    assert!(c.details[0].contains("forbidden"), "{c:#?}");
}

#[test]
fn a_failed_list_is_one_api_failure() {
    let mut e = three_nodes(vec![], None);
    e.nodes = Err("listing nodes: forbidden (403): nope".into());
    let checks = judge(&e);
    assert_eq!(outcomes(&checks), [("cluster.api", Outcome::Fail)]);
    assert!(checks[0].summary.contains("forbidden"), "{checks:#?}");
}

#[test]
fn selection_skips_host_network_finished_and_unscheduled_pods() {
    let mut host = pod("x", "host", "n", "web");
    host.host_network = true;
    let mut done = pod("x", "done", "n", "web");
    done.finished = true;
    let mut pending = pod("x", "pending", "n", "web");
    pending.node = None;
    let pods = vec![host, done, pending, pod("x", "web", "n", "web")];
    let policies = vec![
        policy("x", "all", None),
        policy("x", "web-only", Some("web")),
    ];
    let s = selected_pods(&pods, &policies);
    assert_eq!(
        s["n"],
        [SelectedPod {
            pod: "x/web".into(),
            policies: vec!["all".into(), "web-only".into()],
        }]
    );
}

#[test]
fn conversions_from_api_objects() {
    let node: core::Node = serde_json::from_value(json!({
        "metadata": {"name": "node-a"},
        "spec": {"unschedulable": true},
        "status": {"conditions": [
            {"type": "MemoryPressure", "status": "False"},
            {"type": "Ready", "status": "False", "reason": "KubeletNotReady", "message": "runtime down"}]}
    }))
    .unwrap();
    assert_eq!(
        NodeInfo::from_k8s(&node),
        NodeInfo {
            name: "node-a".into(),
            ready: NodeReady::False,
            ready_reason: Some("KubeletNotReady: runtime down".into()),
            unschedulable: true,
        }
    );
    let pod: core::Pod = serde_json::from_value(json!({
        "metadata": {"name": "netpol-agent-x", "namespace": "netpol-system"},
        "spec": {"nodeName": "node-a", "containers": [{"name": "agent"}]},
        "status": {"phase": "Running",
            "conditions": [{"type": "Ready", "status": "False", "reason": "ContainersNotReady"}],
            "containerStatuses": [{"name": "agent", "ready": false, "restartCount": 3, "image": "i", "imageID": "",
                "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}
    }))
    .unwrap();
    let a = AgentPod::from_k8s(&pod);
    assert!(!a.ready);
    assert_eq!(a.node.as_deref(), Some("node-a"));
    assert_eq!(
        a.not_ready_reason.as_deref(),
        Some(
            "phase Running, Ready=False (ContainersNotReady), container agent waiting: CrashLoopBackOff, container agent restarted 3 times"
        )
    );
    let mut ready = pod.clone();
    ready.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "True".into();
    assert!(AgentPod::from_k8s(&ready).ready);
    assert_eq!(AgentPod::from_k8s(&ready).not_ready_reason, None);
}

/// The one definition of where the agent pods are and how they are labelled agrees with the
/// manifests that create them.
#[test]
fn agent_namespace_and_label_match_deploy() {
    let ds: DaemonSet =
        serde_yaml_ng::from_str(include_str!("../../../../deploy/daemonset.yaml")).unwrap();
    assert_eq!(ds.metadata.namespace.as_deref(), Some(AGENT_NAMESPACE));
    let spec = ds.spec;
    let (key, value) = AGENT_POD_LABEL;
    assert_eq!(
        spec.selector
            .match_labels
            .unwrap()
            .get(key)
            .map(String::as_str),
        Some(value),
        "the DaemonSet's selector"
    );
    assert_eq!(
        spec.template
            .metadata
            .unwrap()
            .labels
            .unwrap()
            .get(key)
            .map(String::as_str),
        Some(value),
        "the pod template's labels"
    );
    let ns: core::Namespace =
        serde_yaml_ng::from_str(include_str!("../../../../deploy/namespace.yaml")).unwrap();
    assert_eq!(ns.metadata.name.as_deref(), Some(AGENT_NAMESPACE));
    assert_eq!(
        agent_label_selector(),
        "app.kubernetes.io/name=netpol-agent"
    );
}
