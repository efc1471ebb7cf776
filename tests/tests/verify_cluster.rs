//! `netpol-agent verify --cluster` against the API server double on loopback (no root): three
//! nodes, agent pods Ready on one, not Ready on another, absent from the third; the verdict per node
//! and the exit status with a NetworkPolicy, without one, and with every agent Ready.

use std::path::PathBuf;
use std::process::Command;

use netpol_agent::verify::cluster::{AGENT_NAMESPACE, AGENT_POD_LABEL};
use netpol_tests::apiserver_double::{ApiServerDouble, Resource};
use netpol_tests::cluster::default_agent_bin;
use serde_json::{Value, json};

/// A temp dir with the double's kubeconfig; removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(double: &ApiServerDouble, test: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "netpol-verify-cluster-{test}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        double.write_kubeconfig(0, &dir.join("kubeconfig")).unwrap();
        TempDir(dir)
    }

    fn kubeconfig(&self) -> PathBuf {
        self.0.join("kubeconfig")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ready(status: bool) -> &'static str {
    if status { "True" } else { "False" }
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "spec": {"podCIDR": "10.42.0.0/24"},
        "status": {"conditions": [
            {"type": "MemoryPressure", "status": "False"},
            {"type": "Ready", "status": "True", "reason": "KubeletReady"}]}})
}

fn pod(ns: &str, name: &str, node: &str, labels: Value, is_ready: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "i"}]},
        "status": {"phase": "Running", "podIP": "10.42.9.9",
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": ready(is_ready),
                 "reason": if is_ready { Value::Null } else { json!("ContainersNotReady") }}]}})
}

fn agent_pod(name: &str, node: &str, is_ready: bool) -> Value {
    pod(
        AGENT_NAMESPACE,
        name,
        node,
        json!({AGENT_POD_LABEL.0: AGENT_POD_LABEL.1, "controller-revision-hash": "abc"}),
        is_ready,
    )
}

const DENY_WEB: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-web
  namespace: x
spec:
  podSelector:
    matchLabels:
      app: web
  policyTypes: [Ingress]
";

/// node-a: Ready agent; node-b: agent not Ready; node-c: no agent, but decoys that must not count
/// (the agent label in another namespace, another pod of netpol-system) and a pod the policy selects.
fn three_nodes() -> ApiServerDouble {
    let d = ApiServerDouble::start().expect("API server double");
    for n in ["node-a", "node-b", "node-c"] {
        d.apply(node(n)).unwrap();
    }
    d.apply(agent_pod("netpol-agent-aaaaa", "node-a", true))
        .unwrap();
    d.apply(agent_pod("netpol-agent-bbbbb", "node-b", false))
        .unwrap();
    d.apply(pod(
        "elsewhere",
        "impostor",
        "node-c",
        json!({AGENT_POD_LABEL.0: AGENT_POD_LABEL.1}),
        true,
    ))
    .unwrap();
    d.apply(pod(
        AGENT_NAMESPACE,
        "debug-shell",
        "node-c",
        json!({"run": "debug"}),
        true,
    ))
    .unwrap();
    d.apply(pod("x", "web-1", "node-c", json!({"app": "web"}), true))
        .unwrap();
    d.apply(pod("x", "db-1", "node-c", json!({"app": "db"}), true))
        .unwrap();
    d
}

/// Runs `netpol-agent verify --cluster --kubeconfig KC` with `extra`: (exit status, stdout).
fn run(kubeconfig: &PathBuf, extra: &[&str]) -> (i32, String) {
    let out = Command::new(default_agent_bin())
        .args(["verify", "--cluster", "--kubeconfig"])
        .arg(kubeconfig)
        .args(extra)
        .env_remove("KUBECONFIG")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running {} (cargo build --bins first): {e}",
                default_agent_bin().display()
            )
        });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.code().is_some(),
        "killed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap(), stdout)
}

fn run_json(kubeconfig: &PathBuf) -> (i32, Value) {
    let (code, stdout) = run(kubeconfig, &["-o", "json"]);
    let report = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("verify printed no JSON ({e}), exit {code}:\n{stdout}"));
    (code, report)
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name} in {report:#}"))
}

/// Asserts that the summary of check `name` contains `text`.
fn assert_summary_has(report: &Value, name: &str, text: &str) {
    let c = check(report, name);
    let summary = c["summary"].as_str().unwrap_or_default();
    assert!(summary.contains(text), "{c:#}");
}

fn outcomes(report: &Value) -> Vec<(String, String)> {
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn nodes_without_a_ready_agent_fail_when_policies_exist() {
    let d = three_nodes();
    d.apply_yaml(DENY_WEB).unwrap();
    let tmp = TempDir::new(&d, "policies");
    let (code, report) = run_json(&tmp.kubeconfig());
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(
        outcomes(&report),
        pairs(&[
            ("cluster.policies", "PASS"),
            ("node/node-a", "PASS"),
            ("node/node-b", "FAIL"),
            ("node/node-c", "FAIL"),
        ]),
        "{report:#}"
    );
    let a = check(&report, "node/node-a");
    assert_eq!(
        a["summary"],
        "agent pod netpol-system/netpol-agent-aaaaa Ready"
    );
    let b = check(&report, "node/node-b");
    let summary = b["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("NOT enforcing: agent pod netpol-system/netpol-agent-bbbbb not Ready"),
        "{b:#}"
    );
    assert!(summary.contains("ContainersNotReady"), "{b:#}");
    assert!(summary.contains("1 NetworkPolicy in the cluster"), "{b:#}");
    // node-c: the impostor (other namespace) and the debug pod (no agent label) are not agents; the
    // policy selects web-1 there, not db-1.
    let c = check(&report, "node/node-c");
    assert_eq!(
        c["summary"],
        "NOT enforcing: no agent pod; 1 NetworkPolicy in the cluster, 1 pod on this node selected by it",
        "{c:#}"
    );
    assert_eq!(
        c["details"][0],
        "x/web-1 is selected by deny-web but not isolated here"
    );
    assert_eq!(c["data"]["agent_pods"], json!([]));
    assert_eq!(
        c["data"]["unenforced_pods"],
        json!([{"pod": "x/web-1", "policies": ["deny-web"]}])
    );
    assert_eq!(check(&report, "cluster.policies")["data"]["agent_pods"], 2);
    // The agent pods are listed in their namespace by label, not from every pod.
    let requests = d.requests();
    assert!(
        requests.iter().any(|r| r.starts_with(
            "GET /api/v1/namespaces/netpol-system/pods?labelSelector=app.kubernetes.io%2Fname%3Dnetpol-agent"
        )),
        "{requests:#?}"
    );

    // The text form: one line per node, the verdict last.
    let (code, text) = run(&tmp.kubeconfig(), &[]);
    assert_eq!(code, 1, "{text}");
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in\n{text}"))
            .to_owned()
    };
    assert!(
        line("PASS  node/node-a ").ends_with(" agent pod netpol-system/netpol-agent-aaaaa Ready"),
        "{text}"
    );
    assert!(
        line("FAIL  node/node-b ").contains(" NOT enforcing: "),
        "{text}"
    );
    assert!(
        line("FAIL  node/node-c ").contains(" NOT enforcing: "),
        "{text}"
    );
    assert!(
        text.contains("- x/web-1 is selected by deny-web but not isolated here"),
        "{text}"
    );
    // cluster.policies and node-a passed.
    assert!(
        text.ends_with("\nNOT proven enforced on every node: 2 passed, 0 warnings, 2 failed\n"),
        "{text}"
    );
}

#[test]
fn without_policies_missing_agents_only_warn() {
    let d = three_nodes();
    let tmp = TempDir::new(&d, "no-policies");
    let (code, report) = run_json(&tmp.kubeconfig());
    assert_eq!(code, 2, "{report:#}");
    assert_eq!(
        outcomes(&report),
        pairs(&[
            ("cluster.policies", "PASS"),
            ("node/node-a", "PASS"),
            ("node/node-b", "WARN"),
            ("node/node-c", "WARN"),
        ]),
        "{report:#}"
    );
    assert_eq!(check(&report, "node/node-c")["summary"], "no agent pod");
    // No pod list is needed to judge: nothing is left unenforced.
    assert!(
        !d.requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/pods")),
        "{:#?}",
        d.requests()
    );
}

#[test]
fn every_agent_ready_passes() {
    let d = three_nodes();
    d.apply_yaml(DENY_WEB).unwrap();
    d.apply(agent_pod("netpol-agent-bbbbb", "node-b", true))
        .unwrap();
    d.apply(agent_pod("netpol-agent-ccccc", "node-c", true))
        .unwrap();
    let tmp = TempDir::new(&d, "all-ready");
    let (code, report) = run_json(&tmp.kubeconfig());
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        outcomes(&report),
        pairs(&[
            ("cluster.policies", "PASS"),
            ("node/node-a", "PASS"),
            ("node/node-b", "PASS"),
            ("node/node-c", "PASS"),
        ])
    );
    // A NotReady node: its agent pod's readiness is stale.
    let mut b = node("node-b");
    b["status"]["conditions"][1] =
        json!({"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown"});
    d.apply(b).unwrap();
    let (code, report) = run_json(&tmp.kubeconfig());
    assert_eq!(code, 2, "{report:#}");
    assert_eq!(check(&report, "node/node-b")["outcome"], "WARN");
    assert_summary_has(
        &report,
        "node/node-b",
        "node Ready=Unknown (NodeStatusUnknown)",
    );
}

/// Each Ready agent is asked, through the API server's pod proxy, whether kube-router's rules are
/// on its node: a node where they are fails; one where the agent cannot be asked is judged on the
/// agent's readiness alone.
#[test]
fn a_node_with_kube_router_rules_fails() {
    let d = three_nodes();
    d.apply_yaml(DENY_WEB).unwrap();
    for (name, node) in [
        ("netpol-agent-bbbbb", "node-b"),
        ("netpol-agent-ccccc", "node-c"),
    ] {
        let mut p = agent_pod(name, node, true);
        p["spec"]["containers"][0]["ports"] = json!([{"name": "metrics", "containerPort": 9102}]);
        d.apply(p).unwrap();
    }
    let proxy =
        |name: &str| format!("/api/v1/namespaces/{AGENT_NAMESPACE}/pods/{name}:9102/proxy/metrics");
    let gauge = |n: u32| {
        format!(
            "# HELP netpol_kube_router_chains kube-router chains.\n# TYPE netpol_kube_router_chains gauge\nnetpol_kube_router_chains {n}\n"
        )
    };
    d.set_proxied(&proxy("netpol-agent-bbbbb"), &gauge(0));
    d.set_proxied(&proxy("netpol-agent-ccccc"), &gauge(2));
    let tmp = TempDir::new(&d, "kube-router");
    let (code, report) = run_json(&tmp.kubeconfig());
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(
        outcomes(&report),
        pairs(&[
            ("cluster.policies", "PASS"),
            ("node/node-a", "PASS"),
            ("node/node-b", "PASS"),
            ("node/node-c", "FAIL"),
        ])
    );
    assert_summary_has(
        &report,
        "node/node-c",
        "kube-router's NetworkPolicy rules are on this node too (2 chains)",
    );
    assert!(
        d.requests()
            .iter()
            .any(|r| r == &format!("GET {}", proxy("netpol-agent-ccccc"))),
        "the agent on node-c was not asked"
    );
}

#[test]
fn an_api_that_refuses_is_a_failure() {
    let d = three_nodes();
    d.set_forbidden(Resource::Nodes, true);
    let tmp = TempDir::new(&d, "forbidden");
    let (code, report) = run_json(&tmp.kubeconfig());
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(check(&report, "cluster.api")["outcome"], "FAIL");
    assert_summary_has(&report, "cluster.api", "listing nodes: forbidden (403)");
    drop(d);
    // Nothing listening any more: refused at once, still a FAIL with exit 1.
    let (code, report) = run_json(&tmp.kubeconfig());
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(outcomes(&report), pairs(&[("cluster.api", "FAIL")]));
}
