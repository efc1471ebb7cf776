//! `netpol-agent explain` as a user runs it: against a manifest directory, text and JSON, with its
//! exit status (0 allowed, 1 denied, 2 no answer). No root needed.

use std::process::Command;

use netpol_tests::cluster::default_agent_bin;

const STATE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: web}}
spec: {nodeName: n1}
status: {phase: Running, podIP: 10.42.0.5, podIPs: [{ip: 10.42.0.5}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: db}}
spec: {nodeName: n2}
status: {phase: Running, podIP: 10.42.1.6, podIPs: [{ip: 10.42.1.6}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-in, namespace: x}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 5432}]
"#;

fn explain(dir: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(default_agent_bin())
        .arg("explain")
        .arg("--manifests")
        .arg(dir)
        .args(args)
        .output()
        .expect("run netpol-agent explain");
    let code = out.status.code().expect("an exit status");
    (code, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The manifest directory, removed on drop (also when the test fails).
struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn explain_answers_with_the_rule_and_an_exit_status() {
    let guard = Dir(std::env::temp_dir().join(format!("netpol-explain-{}", std::process::id())));
    let dir = &guard.0;
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("state.yaml"), STATE).unwrap();
    let ends = ["--from", "x/a", "--to", "x/b"];

    let (code, text) = explain(dir, &[&ends[..], &["--port", "5432"]].concat());
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("allowed by x/db-in ingress[0]"), "{text}");

    let (code, json) = explain(dir, &[&ends[..], &["--port", "80", "-o", "json"]].concat());
    assert_eq!(code, 1, "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("one JSON object");
    assert_eq!(v["verdict"], "denied");
    assert_eq!(v["ingress"]["isolated_by"][0], "x/db-in");

    let (code, _) = explain(dir, &["--from", "x/nope", "--to", "x/b", "--port", "80"]);
    assert_eq!(code, 2);
}

/// `explain --live` on a simulated node with a running agent: the datapath's own decision beside
/// the compiler's, and a disagreement (exit 3) when the state explained against is not the one the
/// datapath enforces.
#[test]
fn explain_live_compares_with_the_running_agents_maps() {
    use netpol_tests::cluster::{Cluster, default_probe_bin};
    if !netpol_tests::privileged_or_skip(
        "explain_live_compares_with_the_running_agents_maps",
        "needs root (network namespaces, bpffs, BPF)",
    ) {
        return;
    }
    const DENY_X_INGRESS: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
        metadata: {name: deny, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n";
    let mut c = Cluster::new(default_probe_bin()).expect("cluster");
    c.apply_policies(DENY_X_INGRESS).unwrap();
    c.start_agents(&default_agent_bin()).unwrap();
    let server = c.pod("x/a").clone();
    let node = server.node;
    c.wait_isolated_ingress("x/a", std::time::Duration::from_secs(30))
        .unwrap();
    let n = &c.nodes[node];
    let live = |manifests: &std::path::Path| {
        let out = Command::new("ip")
            .args(["netns", "exec", &n.name])
            .arg(default_agent_bin())
            .args([
                "explain", "--live", "-o", "json", "--from", "z/c", "--to", "x/a",
            ])
            .args(["--port", "80", "--manifests"])
            .arg(manifests)
            .arg("--pin-dir")
            .arg(&n.pin_dir)
            .arg("--state-dir")
            .arg(&n.state_dir)
            .output()
            .expect("run explain --live");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code().unwrap(), v)
    };
    let (code, v) = live(&c.manifest_dir);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["ingress"]["datapath"], "denied", "{v}");
    assert_eq!(
        v["live"]["disagreements"].as_array().unwrap().len(),
        0,
        "{v}"
    );
    // Explained against the same pods without the policy: the datapath still denies.
    let guard = Dir(c.tmp_dir.join("explain-without-policy"));
    std::fs::create_dir_all(&guard.0).unwrap();
    std::fs::copy(
        c.manifest_dir.join("objects.yaml"),
        guard.0.join("objects.yaml"),
    )
    .unwrap();
    let (code, v) = live(&guard.0);
    assert_eq!(code, 3, "{v}");
    assert_eq!(v["verdict"], "allowed");
    assert_eq!(v["ingress"]["datapath"], "denied");
    assert!(
        v["live"]["disagreements"][0]
            .as_str()
            .unwrap()
            .starts_with("ingress at x/a")
    );
}
