//! The deploy/ kustomize base: it renders with `kubectl kustomize`, the result validates against the
//! Kubernetes schemas offline (`kubernetes-validate --strict`, installed by `cargo xtask setup`), and
//! the security-relevant fields are what the README promises.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use netpol_tests::apiserver_double::Resource;
use serde::Deserialize as _;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `cmd` is usable, or the test skips (fails where `cargo xtask test` says the tools are installed).
fn tool_or_skip(test: &str, cmd: &Path, probe_arg: &str) -> bool {
    if Command::new(cmd)
        .arg(probe_arg)
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return true;
    }
    assert!(
        std::env::var_os(netpol_tests::REQUIRE_PRIVILEGED).is_none(),
        "{test}: {} is missing, but `cargo xtask setup` installs it",
        cmd.display()
    );
    println!(
        "SKIP: {test}: {} not installed (cargo xtask setup)",
        cmd.display()
    );
    false
}

fn render() -> Option<String> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join("deploy"))
        .output();
    match out {
        Ok(o) if o.status.success() => Some(String::from_utf8(o.stdout).unwrap()),
        Ok(o) => panic!(
            "kubectl kustomize deploy/ failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => {
            assert!(
                std::env::var_os(netpol_tests::REQUIRE_PRIVILEGED).is_none(),
                "kubectl not found ({e}), but `cargo xtask setup` installs it"
            );
            println!("SKIP: deploy: kubectl not installed (cargo xtask setup)");
            None
        }
    }
}

fn docs(yaml: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<T: serde::de::DeserializeOwned>(docs: &[serde_yaml::Value], kind: &str) -> Vec<T> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .map(|d| serde_yaml::from_value(d.clone()).unwrap_or_else(|e| panic!("{kind}: {e}")))
        .collect()
}

#[test]
fn kustomize_renders_and_validates_offline() {
    let Some(rendered) = render() else { return };
    let d = docs(&rendered);
    let kinds: BTreeSet<&str> = d.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "Namespace",
            "ServiceAccount"
        ])
    );
    for doc in &d {
        let kind = doc["kind"].as_str().unwrap();
        if matches!(kind, "ServiceAccount" | "DaemonSet") {
            assert_eq!(doc["metadata"]["namespace"].as_str(), Some("netpol-system"));
        }
    }

    let validate = netpol_tests::tools_venv()
        .join("bin")
        .join("kubernetes-validate");
    if !tool_or_skip(
        "kustomize_renders_and_validates_offline",
        &validate,
        "--version",
    ) {
        return;
    }
    let file = std::env::temp_dir().join(format!("netpol-deploy-{}.yaml", std::process::id()));
    std::fs::write(&file, &rendered).unwrap();
    // The newest schemas it ships, and an older release still common on K3s clusters.
    for version in [None, Some("1.30.0")] {
        let mut cmd = Command::new(&validate);
        cmd.arg("--strict");
        if let Some(v) = version {
            cmd.args(["-k", v]);
        }
        let out = cmd.arg(&file).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "kubernetes-validate {version:?}:\n{text}"
        );
        assert_eq!(text.matches("passed for resource").count(), 5, "{text}");
    }
    let _ = std::fs::remove_file(&file);
}

#[test]
fn security_fields() {
    let Some(rendered) = render() else { return };
    let d = docs(&rendered);
    let ds: DaemonSet = of_kind(&d, "DaemonSet").pop().expect("a DaemonSet");
    let spec = ds.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "tolerates every taint (control-plane included)"
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("netpol-agent"));
    let rolling = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.rolling_update.as_ref())
        .expect("RollingUpdate");
    assert_eq!(
        rolling.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    assert_eq!(pod.containers.len(), 1);
    for c in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        let sc = c.security_context.as_ref().expect("securityContext");
        assert_ne!(sc.privileged, Some(true), "{}: privileged", c.name);
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
        let caps = sc.capabilities.as_ref().expect("capabilities");
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
        let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
        let allowed = BTreeSet::from([
            "BPF",
            "NET_ADMIN",
            "SYS_ADMIN",
            "NET_RAW",
            "NET_BROADCAST",
            "PERFMON",
        ]);
        assert!(
            added.is_subset(&allowed),
            "unexpected capabilities {added:?}"
        );
        assert!(added.contains("BPF") && added.contains("NET_ADMIN"));
        // What the API server itself rejects for unprivileged containers.
        if added.contains("SYS_ADMIN") {
            assert_ne!(sc.allow_privilege_escalation, Some(false));
        }
        for m in c.volume_mounts.iter().flatten() {
            assert_ne!(
                m.mount_propagation.as_deref(),
                Some("Bidirectional"),
                "{}: Bidirectional needs a privileged container",
                m.mount_path
            );
        }
        let mounts: BTreeSet<&str> = c
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert!(mounts.contains("/sys/fs/bpf") && mounts.contains("/var/run/netns"));
        // NODE_NAME from the downward API.
        let node = c
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "NODE_NAME")
            .expect("NODE_NAME");
        assert_eq!(
            node.value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str()),
            Some("spec.nodeName")
        );
        // Probes on the health address the agent is given.
        let args = c.args.clone().unwrap_or_default();
        assert!(
            args.contains(&"--health-addr=127.0.0.1:9101".to_owned()),
            "{args:?}"
        );
        for (probe, path) in [
            (c.liveness_probe.as_ref(), "/healthz"),
            (c.readiness_probe.as_ref(), "/readyz"),
        ] {
            let get = probe
                .and_then(|p| p.http_get.as_ref())
                .unwrap_or_else(|| panic!("{path} probe"));
            assert_eq!(get.path.as_deref(), Some(path));
            assert_eq!(get.host.as_deref(), Some("127.0.0.1"));
            assert_eq!(
                get.port,
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9101)
            );
        }
        let res = c.resources.as_ref().expect("resources");
        assert!(
            res.requests
                .as_ref()
                .is_some_and(|r| r.contains_key("memory"))
        );
        assert!(
            res.limits
                .as_ref()
                .is_some_and(|r| r.contains_key("memory"))
        );
        assert!(
            c.ports
                .iter()
                .flatten()
                .any(|p| p.name.as_deref() == Some("metrics")),
            "a port named metrics"
        );
    }
    // Every added capability is explained in the manifest.
    let raw = std::fs::read_to_string(root().join("deploy/daemonset.yaml")).unwrap();
    let lines: Vec<&str> = raw.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim();
        if [
            "- BPF",
            "- NET_ADMIN",
            "- SYS_ADMIN",
            "- NET_RAW",
            "- NET_BROADCAST",
            "- PERFMON",
        ]
        .contains(&t)
        {
            assert!(
                i > 0 && lines[i - 1].trim().starts_with('#'),
                "capability {t} has no comment saying why"
            );
        }
    }

    // RBAC: read-only, and exactly what the API source watches.
    let roles: Vec<ClusterRole> = of_kind(&d, "ClusterRole");
    assert_eq!(roles.len(), 1);
    let rules = roles[0].rules.clone().unwrap_or_default();
    let read = BTreeSet::from(["get", "list", "watch"]);
    let mut granted = BTreeSet::new();
    for r in &rules {
        let verbs: BTreeSet<&str> = r.verbs.iter().map(String::as_str).collect();
        assert!(
            verbs.is_subset(&read),
            "verbs {verbs:?} beyond get/list/watch"
        );
        assert!(
            r.non_resource_urls.is_none() && r.resource_names.is_none(),
            "{r:?}"
        );
        for g in r.api_groups.iter().flatten() {
            assert_ne!(g, "*");
            for res in r.resources.iter().flatten() {
                assert_ne!(res, "*");
                if verbs.contains("list") && verbs.contains("watch") {
                    granted.insert((g.clone(), res.clone()));
                }
            }
        }
    }
    // What sources/kube.rs watches (and the API server double serves for its tests).
    let watched = [
        Resource::Namespaces,
        Resource::Pods,
        Resource::NetworkPolicies,
        Resource::Services,
        Resource::EndpointSlices,
    ];
    let expected: BTreeSet<(String, String)> = watched
        .iter()
        .map(|r| (r.group().to_owned(), r.plural().to_owned()))
        .collect();
    assert!(
        expected.contains(&("".to_owned(), "services".to_owned()))
            && expected.contains(&("discovery.k8s.io".to_owned(), "endpointslices".to_owned()))
    );
    assert_eq!(
        granted, expected,
        "the ClusterRole must grant list+watch on exactly what the agent watches"
    );
    let with_get: BTreeSet<(String, String)> = rules
        .iter()
        .filter(|r| r.verbs.iter().any(|v| v == "get"))
        .flat_map(|r| {
            let groups = r.api_groups.clone().unwrap_or_default();
            let resources = r.resources.clone().unwrap_or_default();
            groups.into_iter().flat_map(move |g| {
                resources
                    .clone()
                    .into_iter()
                    .map(move |res| (g.clone(), res))
            })
        })
        .collect();
    assert!(expected.is_subset(&with_get), "get too: {with_get:?}");
    let bindings: Vec<ClusterRoleBinding> = of_kind(&d, "ClusterRoleBinding");
    assert_eq!(bindings.len(), 1);
    assert_eq!(
        bindings[0].role_ref.name,
        roles[0].metadata.name.clone().unwrap()
    );
    let subject = &bindings[0].subjects.as_ref().unwrap()[0];
    assert_eq!(
        (
            subject.kind.as_str(),
            subject.name.as_str(),
            subject.namespace.as_deref()
        ),
        ("ServiceAccount", "netpol-agent", Some("netpol-system"))
    );
}

/// `deploy/podmonitor.yaml` (not in the kustomize base: it needs prometheus-operator's CRD) selects
/// the DaemonSet's pods where the base installs them, and scrapes the port the agent serves metrics
/// on.
#[test]
fn podmonitor_scrapes_the_agents_metrics_port() {
    let read = |f: &str| -> serde_yaml::Value {
        let text = std::fs::read_to_string(root().join("deploy").join(f)).unwrap();
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{f}: {e}"))
    };
    let pm = read("podmonitor.yaml");
    let kustomization = read("kustomization.yaml");
    let ds: DaemonSet = serde_yaml::from_value(read("daemonset.yaml")).unwrap();
    assert_eq!(pm["kind"].as_str(), Some("PodMonitor"));
    let namespace = kustomization["namespace"].as_str().expect("namespace");
    assert_eq!(namespace, "netpol-system");
    assert_eq!(ds.metadata.namespace.as_deref(), Some(namespace));
    assert_eq!(pm["metadata"]["namespace"].as_str(), Some(namespace));
    let names: Vec<&str> = pm["spec"]["namespaceSelector"]["matchNames"]
        .as_sequence()
        .expect("namespaceSelector.matchNames")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(names, [namespace], "selects the agent's namespace");
    assert!(
        pm["spec"]["namespaceSelector"]["any"].as_bool() != Some(true),
        "namespaceSelector.any would scrape every namespace"
    );

    // The pod selector matches the DaemonSet's pod template.
    let spec = ds.spec.unwrap();
    let pod_labels = spec.template.metadata.unwrap().labels.unwrap_or_default();
    let selector = pm["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .expect("selector.matchLabels");
    assert!(!selector.is_empty());
    for (k, v) in selector {
        let (k, v) = (k.as_str().unwrap(), v.as_str().unwrap());
        assert_eq!(
            pod_labels.get(k).map(String::as_str),
            Some(v),
            "the PodMonitor selects {k}={v}, the DaemonSet's pods are labelled {pod_labels:?}"
        );
    }

    // Every endpoint names the container port `metrics`, 9102, where --metrics-addr listens.
    let container = &spec.template.spec.unwrap().containers[0];
    let endpoints = pm["spec"]["podMetricsEndpoints"]
        .as_sequence()
        .expect("podMetricsEndpoints");
    assert_eq!(endpoints.len(), 1);
    for e in endpoints {
        assert_eq!(e["port"].as_str(), Some("metrics"));
        assert_eq!(e["path"].as_str(), Some("/metrics"));
        // The drop series' namespace and pod are the pod that lost packets, not the agent's.
        assert_eq!(e["honorLabels"].as_bool(), Some(true));
    }
    let port = container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .expect("a container port named metrics");
    assert_eq!(port.container_port, 9102);
    let args = container.args.clone().unwrap_or_default();
    assert!(
        args.contains(&"--metrics-addr=0.0.0.0:9102".to_owned()),
        "{args:?}"
    );
}
