//! The deploy/ kustomize base: it renders with `kubectl kustomize`, the result validates against the
//! Kubernetes schemas offline (`kubernetes-validate --strict`, installed by `cargo xtask setup`), and
//! the security-relevant fields are what docs/install.md promises.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use netpol_tests::apiserver_double::Resource;
use netpol_tests::cluster::{Cluster, Family, Proto, default_agent_bin};
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

fn docs(yaml: &str) -> Vec<serde_yaml_ng::Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| serde_yaml_ng::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<T: serde::de::DeserializeOwned>(docs: &[serde_yaml_ng::Value], kind: &str) -> Vec<T> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .map(|d| serde_yaml_ng::from_value(d.clone()).unwrap_or_else(|e| panic!("{kind}: {e}")))
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

    validate_offline("kustomize_renders_and_validates_offline", &rendered, 5);
}

/// `yaml` passes `kubernetes-validate --strict` (the schemas `kubectl apply` is checked against) with
/// `resources` objects, for the newest Kubernetes it knows and an older one still common on K3s.
fn validate_offline(test: &str, yaml: &str, resources: usize) {
    let validate = netpol_tests::tools_venv()
        .join("bin")
        .join("kubernetes-validate");
    if !tool_or_skip(test, &validate, "--version") {
        return;
    }
    let file = Scratch(
        std::env::temp_dir().join(format!("netpol-deploy-{test}-{}.yaml", std::process::id())),
    );
    std::fs::write(&file.0, yaml).unwrap();
    for version in [None, Some("1.30.0")] {
        let mut cmd = Command::new(&validate);
        cmd.arg("--strict");
        if let Some(v) = version {
            cmd.args(["-k", v]);
        }
        let out = cmd.arg(&file.0).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{test}: kubernetes-validate {version:?}:\n{text}"
        );
        assert_eq!(
            text.matches("passed for resource").count(),
            resources,
            "{test}: {text}"
        );
    }
}

/// A scratch file, removed on drop (also when the test fails).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn security_fields() {
    let Some(rendered) = render() else { return };
    let d = docs(&rendered);
    let ds: DaemonSet = of_kind(&d, "DaemonSet").pop().expect("a DaemonSet");
    let spec = &ds.spec;
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
    let watched = Resource::ALL;
    let expected: BTreeSet<(String, String)> = watched
        .iter()
        .map(|r| (r.group().to_owned(), r.plural().to_owned()))
        .collect();
    assert!(
        expected.contains(&("".to_owned(), "services".to_owned()))
            && expected.contains(&("discovery.k8s.io".to_owned(), "endpointslices".to_owned()))
            && expected.contains(&(
                "policy.networking.k8s.io".to_owned(),
                "clusternetworkpolicies".to_owned()
            ))
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
    let read = |f: &str| -> serde_yaml_ng::Value {
        let text = std::fs::read_to_string(root().join("deploy").join(f)).unwrap();
        serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{f}: {e}"))
    };
    let pm = read("podmonitor.yaml");
    let kustomization = read("kustomization.yaml");
    let ds: DaemonSet = serde_yaml_ng::from_value(read("daemonset.yaml")).unwrap();
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
    let spec = ds.spec;
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

// ------------------------------------------------------------------------------------------------
// The single-file manifests: install.yaml and monitoring.yaml (rendered by `cargo xtask manifests`)
// and cleanup.yaml (hand-written).
// ------------------------------------------------------------------------------------------------

/// The first line `cargo xtask manifests` writes (xtask/src/manifests.rs).
const GENERATED: &str = "# GENERATED by `cargo xtask manifests`: do not edit.";

fn read_deploy(file: &str) -> String {
    std::fs::read_to_string(root().join("deploy").join(file))
        .unwrap_or_else(|e| panic!("deploy/{file}: {e} (cargo xtask manifests renders it)"))
}

/// A rendered file: it starts with the generated-file header, which says how to render it again.
fn rendered_file(file: &str) -> String {
    let text = read_deploy(file);
    assert_eq!(
        text.lines().next(),
        Some(GENERATED),
        "deploy/{file} must start with the generated-file header"
    );
    text
}

const STALE: &str = "stale: run `cargo xtask manifests` and commit the result";

#[test]
fn install_yaml_is_the_current_base_in_one_self_contained_file() {
    let install = rendered_file("install.yaml");
    let Some(fresh) = render() else { return };
    // Compared as objects, not bytes: another kubectl may format the same objects differently.
    let have = docs(&install);
    assert!(have == docs(&fresh), "deploy/install.yaml is {STALE}");
    assert_self_contained("install.yaml", &have);
    validate_offline(
        "install_yaml_is_the_current_base_in_one_self_contained_file",
        &install,
        5,
    );
}

/// What `kubectl apply -f` and K3s's deploy controller need from one file: every object complete
/// (no kustomize construct left, images resolved), only built-in kinds (K3s retries the whole file
/// while one of its kinds is unknown), and each Namespace before the objects in it (`kubectl apply
/// -f` creates in file order).
fn assert_self_contained(file: &str, d: &[serde_yaml_ng::Value]) {
    let built_in = ["v1", "apps/v1", "rbac.authorization.k8s.io/v1"];
    let mut namespaces = BTreeSet::new();
    for doc in d {
        let (api, kind) = (doc["apiVersion"].as_str(), doc["kind"].as_str());
        let name = doc["metadata"]["name"].as_str();
        assert!(
            api.is_some_and(|a| built_in.contains(&a)) && kind.is_some() && name.is_some(),
            "{file}: {api:?} {kind:?} {name:?}: only complete objects of built-in kinds"
        );
        if kind == Some("Namespace") {
            namespaces.insert(name.unwrap());
        }
        if let Some(ns) = doc["metadata"]["namespace"].as_str() {
            assert!(
                namespaces.contains(ns),
                "{file}: {kind:?} {name:?} comes before its Namespace {ns}"
            );
        }
    }
    assert_eq!(d[0]["kind"].as_str(), Some("Namespace"), "{file}: first");
    for ds in of_kind::<DaemonSet>(d, "DaemonSet") {
        let pod = ds.spec.template.spec.unwrap();
        for c in pod
            .containers
            .iter()
            .chain(pod.init_containers.iter().flatten())
        {
            let image = c.image.as_deref().unwrap_or_default();
            // `netpol-agent` alone is the name only kustomize's images transformer resolves.
            let (repo, tag) = image.rsplit_once(':').unwrap_or_default();
            assert!(
                repo.contains('/') && !tag.is_empty(),
                "{file}: container {}: image {image:?} is not a full reference",
                c.name
            );
        }
    }
}

#[test]
fn monitoring_yaml_is_the_podmonitor_and_the_rules_in_one_file() {
    let monitoring = rendered_file("monitoring.yaml");
    let have = docs(&monitoring);
    let want: Vec<_> = ["podmonitor.yaml", "prometheusrule.yaml"]
        .iter()
        .flat_map(|f| docs(&read_deploy(f)))
        .collect();
    assert!(have == want, "deploy/monitoring.yaml is {STALE}");
    let kinds: Vec<&str> = have.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["PodMonitor", "PrometheusRule"]);
    for d in &have {
        assert_eq!(d["metadata"]["namespace"].as_str(), Some("netpol-system"));
    }
    // The CRD kinds stay out of install.yaml (see assert_self_contained).
    let install = docs(&rendered_file("install.yaml"));
    assert!(
        install
            .iter()
            .all(|d| !kinds.contains(&d["kind"].as_str().unwrap_or_default())),
        "install.yaml must not need prometheus-operator's CRDs"
    );
}

/// The agent's container in install.yaml.
fn installed_agent() -> k8s_openapi::api::core::v1::Container {
    let ds: DaemonSet = of_kind(&docs(&rendered_file("install.yaml")), "DaemonSet")
        .pop()
        .expect("install.yaml has a DaemonSet");
    ds.spec.template.spec.unwrap().containers.remove(0)
}

/// The value of `--flag=VALUE` in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .find_map(|a| a.strip_prefix(flag)?.strip_prefix('='))
}

/// cleanup.yaml's DaemonSet.
fn cleanup_daemonset() -> DaemonSet {
    of_kind(&docs(&read_deploy("cleanup.yaml")), "DaemonSet")
        .pop()
        .expect("cleanup.yaml has a DaemonSet")
}

#[test]
fn cleanup_yaml_cleans_what_the_agent_pins_on_every_node() {
    let text = read_deploy("cleanup.yaml");
    let d = docs(&text);
    assert_self_contained("cleanup.yaml", &d);
    let ds = cleanup_daemonset();
    let ns = ds.metadata.namespace.clone().unwrap();
    assert_ne!(
        ns, "netpol-system",
        "install.yaml's namespace is being deleted when the cleanup runs"
    );
    let pod = ds.spec.template.spec.unwrap();
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "runs wherever the agent ran: every node, whatever its taints"
    );
    let init = pod.init_containers.clone().unwrap_or_default();
    assert_eq!(init.len(), 1, "one init container: the cleanup");
    let cleanup = &init[0];
    let agent = installed_agent();
    assert_eq!(cleanup.image, agent.image, "the agent's own image");
    let (args, agent_args) = (
        cleanup.args.clone().unwrap_or_default(),
        agent.args.clone().unwrap_or_default(),
    );
    assert_eq!(args.first().map(String::as_str), Some("cleanup"));
    for dir in ["--pin-dir", "--state-dir"] {
        let path = flag(&args, dir).unwrap_or_else(|| panic!("cleanup without {dir}"));
        assert_eq!(Some(path), flag(&agent_args, dir), "{dir} as the agent's");
        assert_host_path_mounted(&pod, cleanup, path);
    }
    for c in pod.containers.iter().chain(&init) {
        let sc = c.security_context.as_ref().expect("securityContext");
        assert_ne!(sc.privileged, Some(true), "{}", c.name);
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
        let caps = sc.capabilities.as_ref().expect("capabilities");
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
        assert!(caps.add.is_none(), "{}: no capability needed", c.name);
    }
    validate_offline(
        "cleanup_yaml_cleans_what_the_agent_pins_on_every_node",
        &text,
        2,
    );
}

/// `path` in `container` is the same path on the host: a hostPath volume mounted at itself or at a
/// directory above it.
fn assert_host_path_mounted(
    pod: &k8s_openapi::api::core::v1::PodSpec,
    container: &k8s_openapi::api::core::v1::Container,
    path: &str,
) {
    let found = container.volume_mounts.iter().flatten().any(|m| {
        let host = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == m.name)
            .and_then(|v| v.host_path.as_ref());
        host.is_some_and(|h| h.path == m.mount_path)
            && Path::new(path).starts_with(&m.mount_path)
            && m.read_only != Some(true)
    });
    assert!(
        found,
        "{}: {path} is not the host's, writable",
        container.name
    );
}

/// cleanup.yaml's command, run on a simulated node as its container runs it (uid 0, no capability,
/// no new privileges): it refuses while the agent runs; once the agent is stopped, which leaves the
/// policy enforced, it removes the pins and the policy is lifted.
#[test]
fn the_cleanup_command_lifts_enforcement_without_capabilities() {
    const TEST: &str = "the_cleanup_command_lifts_enforcement_without_capabilities";
    if !netpol_tests::privileged_or_skip(TEST, "needs root (network namespaces, bpffs)") {
        return;
    }
    let ds = cleanup_daemonset();
    let args = ds.spec.template.spec.unwrap().init_containers.unwrap()[0]
        .args
        .clone()
        .unwrap();
    let mut c = Cluster::new(env!("CARGO_BIN_EXE_netpol-probe"))
        .unwrap_or_else(|e| panic!("cluster setup: {e:#}"));
    c.apply_policies(DENY_X_A).unwrap();
    c.start_agents(&default_agent_bin())
        .unwrap_or_else(|e| panic!("starting agents: {e:#}"));
    let mut denied = c.reachability(true);
    denied.expect_all_ingress("x/a", false);
    let case = [(80, Proto::Tcp, Family::V4)];
    c.wait_for_all(&denied, &case, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));

    let out = cleanup_without_capabilities(&c, &args);
    assert!(!out.status.success(), "cleanup ran beside a running agent");
    assert!(!pins(&c).is_empty(), "the refused cleanup removed pins");

    // x/a is on node 0: its agent gone, its policy stays.
    c.stop_agent(0);
    c.wait_for_all(&denied, &case, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("a stopped agent must leave its policy enforced: {e:#}"));
    let out = cleanup_without_capabilities(&c, &args);
    assert!(
        out.status.success(),
        "cleanup with no capability: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(pins(&c), Vec::<String>::new(), "pins left after cleanup");
    let open = c.reachability(true);
    c.wait_for_all(&open, &case, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("still enforced after cleanup: {e:#}"));
}

const DENY_X_A: &str = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-a
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes: [Ingress]
";

/// cleanup.yaml's `args` on node 0 of `c` (its pin and state directories for the DaemonSet's
/// paths), as uid 0 with every capability dropped and no new privileges (`drop: [ALL]`,
/// `allowPrivilegeEscalation: false`).
fn cleanup_without_capabilities(c: &Cluster, args: &[String]) -> std::process::Output {
    let n = &c.nodes[0];
    let args: Vec<String> = args
        .iter()
        .map(|a| match a.split_once('=') {
            Some(("--pin-dir", _)) => format!("--pin-dir={}", n.pin_dir.display()),
            Some(("--state-dir", _)) => format!("--state-dir={}", n.state_dir.display()),
            _ => a.clone(),
        })
        .collect();
    Command::new("ip")
        .args(["netns", "exec", &n.name])
        .args([
            "setpriv",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
        ])
        .arg(default_agent_bin())
        .args(&args)
        .output()
        .unwrap()
}

/// Every pin under node 0's pin directory (a bpffs mount: the kernel's own `maps.debug` and
/// `progs.debug` at its root are not pins).
fn pins(c: &Cluster) -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_none_or(|x| x != "debug") {
                out.push(p.display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(&c.nodes[0].pin_dir, &mut out);
    out
}
