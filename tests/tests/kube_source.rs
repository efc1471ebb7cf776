//! The Kubernetes API source (kube-runtime watchers) against the API server test double: initial
//! sync gating, updates and deletes, 410 Gone relists, disconnects, RBAC 403 and an unreachable API
//! server (problem reported, last state kept, recovery), pod address reuse, and Services and
//! EndpointSlices (gating, updates, deletes, endpoint readiness, the frontends they make).
//!
//! No root needed: the double listens on 127.0.0.1 of the test's own network namespace.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use netpol_agent::model::service::{Frontend, frontends};
use netpol_agent::model::{ClusterState, PodKey, Protocol};
use netpol_agent::sources::{self, Snapshot, SourceConfig};
use netpol_tests::apiserver_double::{ApiServerDouble, Resource};
use serde_json::{Value, json};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(20);
/// Namespaces, Pods, NetworkPolicies, Services, EndpointSlices: one watch each.
const WATCHES: usize = 5;

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str, ip: &str, app: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
        "spec": {"nodeName": "node-0", "containers": [{"name": "c", "image": "i",
            "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

/// A ClusterIP Service selecting `app=<app>`, ports `dns` 53/UDP and `dns-tcp` 53/TCP.
fn service(ns: &str, name: &str, ip: &str, app: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
            "selector": {"app": app},
            "ports": [{"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 53},
                      {"name": "dns-tcp", "protocol": "TCP", "port": 53, "targetPort": 53}]}})
}

/// An EndpointSlice of Service `svc`: (address, ready) endpoints on ports `dns`/`dns-tcp` `port`.
fn slice(ns: &str, name: &str, svc: &str, endpoints: &[(&str, bool)], port: u16) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, ready)| {
            json!({"addresses": [ip],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "nodeName": "node-0"})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns,
            "labels": {"kubernetes.io/service-name": svc,
                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "dns", "protocol": "UDP", "port": port},
                  {"name": "dns-tcp", "protocol": "TCP", "port": port}]})
}

fn deny_all(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns}, "spec": {"podSelector": {}}})
}

/// A temp dir with the double's kubeconfig; removed on drop.
struct Kubeconfig(PathBuf);

impl Kubeconfig {
    fn new(double: &ApiServerDouble, test: &str) -> Kubeconfig {
        let dir =
            std::env::temp_dir().join(format!("netpol-kube-source-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        double.write_kubeconfig(0, &dir.join("kubeconfig")).unwrap();
        Kubeconfig(dir)
    }

    fn path(&self) -> PathBuf {
        self.0.join("kubeconfig")
    }
}

impl Drop for Kubeconfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn start(kc: &Kubeconfig) -> watch::Receiver<Snapshot> {
    sources::spawn(&SourceConfig::Kubernetes {
        kubeconfig: Some(kc.path()),
    })
    .await
    .expect("source starts")
}

/// Waits until a snapshot satisfies `f`; panics with the last one on timeout.
async fn wait_for(
    rx: &mut watch::Receiver<Snapshot>,
    what: &str,
    f: impl Fn(&Snapshot) -> bool,
) -> Snapshot {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        {
            let s = rx.borrow_and_update();
            if f(&s) {
                return s.clone();
            }
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            let s = rx.borrow();
            panic!(
                "timed out waiting for {what}; last snapshot: problem {:?}, state {:?}",
                s.problem,
                s.state.as_ref().map(|st| (
                    st.namespaces.keys().collect::<Vec<_>>(),
                    st.pods.keys().map(ToString::to_string).collect::<Vec<_>>(),
                    st.policies
                        .keys()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                ))
            );
        }
    }
}

/// Waits (without blocking the runtime the source runs on) until `f` holds for the double.
async fn wait_double(double: &ApiServerDouble, what: &str, f: impl Fn(&ApiServerDouble) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f(double) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; requests: {:#?}",
            double.requests()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn state(s: &Snapshot) -> &ClusterState {
    s.state.as_deref().expect("state")
}

fn has_pod(s: &Snapshot, ns: &str, name: &str) -> bool {
    s.state
        .as_ref()
        .is_some_and(|st| st.pods.contains_key(&PodKey::new(ns, name)))
}

fn has_policy(s: &Snapshot, ns: &str, name: &str) -> bool {
    s.state
        .as_ref()
        .is_some_and(|st| st.policies.contains_key(&PodKey::new(ns, name)))
}

/// Labels (`app`) of the peer pods holding `ip`.
fn holders(s: &Snapshot, ip: &str) -> Vec<String> {
    let ip: IpAddr = ip.parse().unwrap();
    s.state
        .as_ref()
        .map(|st| {
            st.peer_pods()
                .filter(|p| p.ips.contains(&ip))
                .map(|p| p.labels["app"].clone())
                .collect()
        })
        .unwrap_or_default()
}

fn problem_has(s: &Snapshot, text: &str) -> bool {
    s.problem.as_deref().is_some_and(|p| p.contains(text))
}

fn base(double: &ApiServerDouble) {
    double.apply(namespace("x", json!({"team": "a"}))).unwrap();
    double.apply(pod("x", "a", "10.42.0.10", "a")).unwrap();
    double.apply(pod("x", "b", "10.42.0.11", "b")).unwrap();
}

#[test]
fn initial_sync_gates_then_updates_and_deletes_flow() {
    let double = ApiServerDouble::start().unwrap();
    base(&double);
    // Policies cannot be listed yet: nothing may be published, and the problem is named.
    double.set_forbidden(Resource::NetworkPolicies, true);
    let kc = Kubeconfig::new(&double, "sync");
    runtime().block_on(async {
        let mut rx = start(&kc).await;
        let s = wait_for(&mut rx, "the 403 problem", |s| {
            problem_has(s, "networkpolicies: forbidden (403)")
        })
        .await;
        assert!(s.state.is_none(), "published before every watch listed");
        assert!(
            s.problem
                .as_deref()
                .unwrap()
                .contains("get, list and watch"),
            "{:?}",
            s.problem
        );
        double.apply(deny_all("x", "deny")).unwrap();
        double.set_forbidden(Resource::NetworkPolicies, false);
        let s = wait_for(&mut rx, "the first full state", |s| s.state.is_some()).await;
        let st = state(&s);
        assert_eq!(st.pods.len(), 2);
        assert_eq!(st.policies.len(), 1);
        assert_eq!(st.namespaces["x"].labels["team"], "a");
        assert_eq!(
            st.namespaces["x"].labels["kubernetes.io/metadata.name"],
            "x"
        );
        assert_eq!(
            st.pods[&PodKey::new("x", "a")].ports[0].name,
            "http",
            "named ports kept"
        );
        wait_for(&mut rx, "the problem to clear", |s| s.problem.is_none()).await;

        // Updates: a label change, a new pod, a deleted policy, a namespace label.
        double.apply(pod("x", "a", "10.42.0.10", "a2")).unwrap();
        double.apply(pod("x", "c", "10.42.0.12", "c")).unwrap();
        double
            .delete(Resource::NetworkPolicies, "x", "deny")
            .unwrap();
        double.apply(namespace("x", json!({"team": "b"}))).unwrap();
        let s = wait_for(&mut rx, "the updates", |s| {
            let st = state(s);
            has_pod(s, "x", "c")
                && !has_policy(s, "x", "deny")
                && st.pods[&PodKey::new("x", "a")].labels["app"] == "a2"
                && st.namespaces["x"].labels["team"] == "b"
        })
        .await;
        assert_eq!(state(&s).pods.len(), 3);

        // A finished pod and a pod without address leave the peer sets (but stay known).
        let mut done = pod("x", "b", "10.42.0.11", "b");
        done["status"]["phase"] = json!("Succeeded");
        double.apply(done).unwrap();
        let mut pending = pod("x", "c", "10.42.0.12", "c");
        pending["status"] = json!({"phase": "Pending"});
        double.apply(pending).unwrap();
        let s = wait_for(&mut rx, "finished pods out of the peers", |s| {
            holders(s, "10.42.0.11").is_empty() && holders(s, "10.42.0.12").is_empty()
        })
        .await;
        assert_eq!(state(&s).peer_pods().count(), 1);
        double.delete(Resource::Pods, "x", "a").unwrap();
        wait_for(&mut rx, "the delete", |s| !has_pod(s, "x", "a")).await;
    });
}

#[test]
fn expired_watch_relists_and_drops_what_was_deleted_meanwhile() {
    let double = ApiServerDouble::start().unwrap();
    base(&double);
    let kc = Kubeconfig::new(&double, "gone");
    runtime().block_on(async {
        let mut rx = start(&kc).await;
        wait_for(&mut rx, "the first state", |s| has_pod(s, "x", "b")).await;
        wait_double(&double, "every watch", |d| d.open_watches() == WATCHES).await;
        let lists = double.list_count(Resource::Pods);

        // 410 on an open watch: the source lists again; the state stays.
        double.expire_watches();
        wait_double(&double, "a pod relist", |d| {
            d.list_count(Resource::Pods) > lists && d.open_watches() == WATCHES
        })
        .await;
        let s = rx.borrow().clone();
        assert!(has_pod(&s, "x", "a") && has_pod(&s, "x", "b"));

        // While the API server is away, pod a is deleted and its address goes to a new pod
        // (whose name sorts after it); history is compacted, so the next watch gets 410 and the
        // relist must drop a, not merge.
        let lists = double.list_count(Resource::Pods);
        double.set_unreachable(true);
        wait_for(&mut rx, "the outage to show", |s| {
            problem_has(s, "cannot reach the API server")
        })
        .await;
        assert!(has_pod(&rx.borrow(), "x", "a"), "last good state kept");
        double.delete(Resource::Pods, "x", "a").unwrap();
        double
            .apply(pod("x", "z-new", "10.42.0.10", "new"))
            .unwrap();
        double.compact();
        double.set_unreachable(false);
        let s = wait_for(&mut rx, "the relisted state", |s| {
            has_pod(s, "x", "z-new") && !has_pod(s, "x", "a")
        })
        .await;
        assert_eq!(holders(&s, "10.42.0.10"), ["new"]);
        assert!(double.list_count(Resource::Pods) > lists, "relisted");
        wait_for(&mut rx, "recovery", |s| s.problem.is_none()).await;
    });
}

#[test]
fn reused_address_never_keeps_the_old_identity() {
    let double = ApiServerDouble::start().unwrap();
    double.apply(namespace("x", json!({}))).unwrap();
    let mut old = pod("x", "old", "10.42.0.20", "old");
    old["metadata"]["creationTimestamp"] = json!("2024-01-01T00:00:00Z");
    double.apply(old.clone()).unwrap();
    let kc = Kubeconfig::new(&double, "reuse");
    runtime().block_on(async {
        let mut rx = start(&kc).await;
        wait_for(&mut rx, "the old pod", |s| {
            holders(s, "10.42.0.20") == ["old"]
        })
        .await;
        // The old pod object is still there (terminating: deletionTimestamp set, phase Running)
        // when the new pod with its address is added; "a-new" sorts before "old".
        old["metadata"]["deletionTimestamp"] = json!("2024-01-01T01:00:00Z");
        double.apply(old.clone()).unwrap();
        let mut new = pod("x", "a-new", "10.42.0.20", "new");
        new["metadata"]["creationTimestamp"] = json!("2024-01-01T00:59:00Z");
        double.apply(new).unwrap();
        let s = wait_for(&mut rx, "the new holder", |s| has_pod(s, "x", "a-new")).await;
        assert_eq!(holders(&s, "10.42.0.20"), ["new"]);
        assert!(
            state(&s).pods[&PodKey::new("x", "old")].ips.is_empty(),
            "the old pod object keeps no claim on the address"
        );
        // Its delete arrives later: nothing changes for the address.
        double.delete(Resource::Pods, "x", "old").unwrap();
        let s = wait_for(&mut rx, "the delete", |s| !has_pod(s, "x", "old")).await;
        assert_eq!(holders(&s, "10.42.0.20"), ["new"]);
        // Delete then add with the address (the usual order): the new pod, never the old one.
        double.delete(Resource::Pods, "x", "a-new").unwrap();
        double
            .apply(pod("x", "b-next", "10.42.0.20", "next"))
            .unwrap();
        let s = wait_for(&mut rx, "the next holder", |s| has_pod(s, "x", "b-next")).await;
        assert_eq!(holders(&s, "10.42.0.20"), ["next"]);
    });
}

#[test]
fn disconnect_resumes_the_watch_without_relisting() {
    let double = ApiServerDouble::start().unwrap();
    base(&double);
    let kc = Kubeconfig::new(&double, "cut");
    runtime().block_on(async {
        let mut rx = start(&kc).await;
        wait_for(&mut rx, "the first state", |s| has_pod(s, "x", "a")).await;
        wait_double(&double, "every watch", |d| d.open_watches() == WATCHES).await;
        let lists = double.list_count(Resource::Pods);
        double.cut_watches();
        double.apply(pod("x", "c", "10.42.0.12", "c")).unwrap();
        let s = wait_for(&mut rx, "the change after the cut", |s| {
            has_pod(s, "x", "c")
        })
        .await;
        assert!(s.problem.is_none(), "{:?}", s.problem);
        assert_eq!(
            double.list_count(Resource::Pods),
            lists,
            "a cut watch resumes from its resourceVersion"
        );
    });
}

#[test]
fn forbidden_after_sync_keeps_the_last_state_and_recovers() {
    let double = ApiServerDouble::start().unwrap();
    base(&double);
    double.apply(deny_all("x", "deny")).unwrap();
    let kc = Kubeconfig::new(&double, "rbac");
    runtime().block_on(async {
        let mut rx = start(&kc).await;
        wait_for(&mut rx, "the first state", |s| has_policy(s, "x", "deny")).await;
        double.set_forbidden(Resource::Pods, true);
        let s = wait_for(&mut rx, "the 403", |s| {
            problem_has(s, "pods: forbidden (403)")
        })
        .await;
        assert!(has_pod(&s, "x", "a") && has_policy(&s, "x", "deny"));
        // Other kinds keep flowing meanwhile.
        double.apply(deny_all("x", "deny2")).unwrap();
        wait_for(&mut rx, "a policy while pods are forbidden", |s| {
            has_policy(s, "x", "deny2")
        })
        .await;
        double.set_forbidden(Resource::Pods, false);
        wait_for(&mut rx, "recovery", |s| s.problem.is_none()).await;
        double.apply(pod("x", "c", "10.42.0.12", "c")).unwrap();
        wait_for(&mut rx, "pods flowing again", |s| has_pod(s, "x", "c")).await;
    });
}

#[test]
fn unreachable_at_start_publishes_nothing_until_it_answers() {
    let double = ApiServerDouble::start().unwrap();
    base(&double);
    double.set_unreachable(true);
    let kc = Kubeconfig::new(&double, "down");
    runtime().block_on(async {
        let mut rx = start(&kc).await;
        let s = wait_for(&mut rx, "the outage", |s| {
            problem_has(s, "cannot reach the API server")
        })
        .await;
        assert!(s.state.is_none());
        double.set_unreachable(false);
        let s = wait_for(&mut rx, "the first state", |s| {
            s.state.is_some() && s.problem.is_none()
        })
        .await;
        assert_eq!(state(&s).pods.len(), 2);
    });
}

#[test]
fn bad_kubeconfig_fails_at_start() {
    runtime().block_on(async {
        let err = sources::spawn(&SourceConfig::Kubernetes {
            kubeconfig: Some("/nonexistent/kubeconfig".into()),
        })
        .await
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("/nonexistent/kubeconfig"),
            "{err:#}"
        );
    });
}

/// The backends of frontend `vip`:53/`protocol` in the snapshot, sorted; `None` without the frontend.
fn backends(s: &Snapshot, vip: &str, protocol: Protocol) -> Option<Vec<(IpAddr, u16)>> {
    let vip: IpAddr = vip.parse().unwrap();
    let st = s.state.as_deref()?;
    frontends(st)
        .into_iter()
        .find(|f: &Frontend| f.vip == vip && f.protocol == protocol && f.port == 53)
        .map(|f| {
            let mut b = f.backends;
            b.sort();
            b
        })
}

fn ep(ip: &str, port: u16) -> (IpAddr, u16) {
    (ip.parse().unwrap(), port)
}

#[test]
fn services_and_endpoint_slices_gate_the_first_state_and_flow_through() {
    let double = ApiServerDouble::start().unwrap();
    base(&double);
    double.apply(namespace("kube-system", json!({}))).unwrap();
    double
        .apply(pod("kube-system", "coredns", "10.42.0.19", "dns"))
        .unwrap();
    double
        .apply(service("kube-system", "kube-dns", "10.43.0.10", "dns"))
        .unwrap();
    double
        .apply(slice(
            "kube-system",
            "kube-dns-a",
            "kube-dns",
            &[("10.42.0.19", true)],
            53,
        ))
        .unwrap();
    // Neither Services nor EndpointSlices can be listed: nothing is published, both are named.
    double.set_forbidden(Resource::Services, true);
    double.set_forbidden(Resource::EndpointSlices, true);
    let kc = Kubeconfig::new(&double, "services");
    runtime().block_on(async {
        let mut rx = start(&kc).await;
        let s = wait_for(&mut rx, "both 403 problems", |s| {
            problem_has(s, "services: forbidden (403)")
                && problem_has(s, "endpointslices: forbidden (403)")
        })
        .await;
        assert!(s.state.is_none(), "published before every watch listed");
        assert!(
            problem_has(&s, "in API group \"discovery.k8s.io\""),
            "{:?}",
            s.problem
        );
        // Services may be listed now, EndpointSlices still not: still nothing published.
        double.set_forbidden(Resource::Services, false);
        let s = wait_for(&mut rx, "the services problem to clear", |s| {
            !problem_has(s, "services: forbidden")
        })
        .await;
        assert!(
            problem_has(&s, "endpointslices: forbidden (403)"),
            "{:?}",
            s.problem
        );
        // The Services watch has listed (its problem is gone); give the source a moment to (not)
        // publish, then check it did not.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            rx.borrow().state.is_none(),
            "published before the EndpointSlices watch listed"
        );
        double.set_forbidden(Resource::EndpointSlices, false);
        let s = wait_for(&mut rx, "the first full state", |s| {
            s.state.is_some() && s.problem.is_none()
        })
        .await;
        let st = state(&s);
        let dns = &st.services[&PodKey::new("kube-system", "kube-dns")];
        assert_eq!(dns.cluster_ips, ["10.43.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(dns.ports.len(), 2);
        let sl = &st.endpoint_slices[&PodKey::new("kube-system", "kube-dns-a")];
        assert_eq!(sl.service, "kube-dns");
        assert_eq!(sl.addresses, ["10.42.0.19".parse::<IpAddr>().unwrap()]);
        assert!(st.errors.is_empty(), "{:?}", st.errors);
        assert_eq!(
            backends(&s, "10.43.0.10", Protocol::Udp),
            Some(vec![ep("10.42.0.19", 53)])
        );
        assert_eq!(
            backends(&s, "10.43.0.10", Protocol::Tcp),
            Some(vec![ep("10.42.0.19", 53)])
        );

        // A second slice with a ready and a not-ready endpoint: only the ready one is a backend.
        double
            .apply(slice(
                "kube-system",
                "kube-dns-b",
                "kube-dns",
                &[("10.42.1.20", true), ("10.42.1.21", false)],
                53,
            ))
            .unwrap();
        wait_for(&mut rx, "the second slice", |s| {
            backends(s, "10.43.0.10", Protocol::Udp)
                == Some(vec![ep("10.42.0.19", 53), ep("10.42.1.20", 53)])
        })
        .await;
        // Readiness flips: 10.42.1.20 goes not-ready, 10.42.1.21 becomes ready.
        double
            .apply(slice(
                "kube-system",
                "kube-dns-b",
                "kube-dns",
                &[("10.42.1.20", false), ("10.42.1.21", true)],
                53,
            ))
            .unwrap();
        wait_for(&mut rx, "the readiness change", |s| {
            backends(s, "10.43.0.10", Protocol::Udp)
                == Some(vec![ep("10.42.0.19", 53), ep("10.42.1.21", 53)])
        })
        .await;
        // The target port moves (slice update) and the ClusterIP changes (Service update).
        double
            .apply(slice(
                "kube-system",
                "kube-dns-a",
                "kube-dns",
                &[("10.42.0.19", true)],
                5353,
            ))
            .unwrap();
        double
            .apply(service("kube-system", "kube-dns", "10.43.0.11", "dns"))
            .unwrap();
        wait_for(&mut rx, "the Service and slice updates", |s| {
            backends(s, "10.43.0.10", Protocol::Tcp).is_none()
                && backends(s, "10.43.0.11", Protocol::Tcp)
                    == Some(vec![ep("10.42.0.19", 5353), ep("10.42.1.21", 53)])
        })
        .await;
        // Deleting slices: with none left, the selector over the pods decides (targetPort 53).
        double
            .delete(Resource::EndpointSlices, "kube-system", "kube-dns-b")
            .unwrap();
        wait_for(&mut rx, "the slice delete", |s| {
            backends(s, "10.43.0.11", Protocol::Udp) == Some(vec![ep("10.42.0.19", 5353)])
        })
        .await;
        double
            .delete(Resource::EndpointSlices, "kube-system", "kube-dns-a")
            .unwrap();
        let s = wait_for(&mut rx, "the last slice delete", |s| {
            s.state
                .as_ref()
                .is_some_and(|st| st.endpoint_slices.is_empty())
        })
        .await;
        assert_eq!(
            backends(&s, "10.43.0.11", Protocol::Udp),
            Some(vec![ep("10.42.0.19", 53)])
        );
        // A Service that cannot be converted is an error naming it; deleting it clears the error.
        let mut bad = service("x", "bad", "10.43.9.9", "a");
        bad["spec"]["ports"][0]["protocol"] = json!("ICMP");
        double.apply(bad).unwrap();
        let s = wait_for(&mut rx, "the bad Service's error", |s| {
            s.state.as_ref().is_some_and(|st| !st.errors.is_empty())
        })
        .await;
        let e = &state(&s).errors[0];
        assert!(
            e.to_string().contains("Service x/bad")
                && e.field.as_deref() == Some("spec.ports[0].protocol"),
            "{e}"
        );
        assert!(!state(&s).services.contains_key(&PodKey::new("x", "bad")));
        double.delete(Resource::Services, "x", "bad").unwrap();
        double
            .delete(Resource::Services, "kube-system", "kube-dns")
            .unwrap();
        let s = wait_for(&mut rx, "the Service deletes", |s| {
            s.state
                .as_ref()
                .is_some_and(|st| st.services.is_empty() && st.errors.is_empty())
        })
        .await;
        assert!(frontends(state(&s)).is_empty());
    });
}

#[test]
fn services_and_slices_relist_after_410_and_drop_what_was_deleted_meanwhile() {
    let double = ApiServerDouble::start().unwrap();
    base(&double);
    double.apply(service("x", "one", "10.43.1.1", "a")).unwrap();
    double.apply(service("x", "two", "10.43.1.2", "b")).unwrap();
    double
        .apply(slice("x", "one-a", "one", &[("10.42.0.10", true)], 53))
        .unwrap();
    double
        .apply(slice("x", "two-a", "two", &[("10.42.0.11", true)], 53))
        .unwrap();
    let kc = Kubeconfig::new(&double, "services-gone");
    runtime().block_on(async {
        let mut rx = start(&kc).await;
        wait_for(&mut rx, "the first state", |s| {
            s.state
                .as_ref()
                .is_some_and(|st| st.services.len() == 2 && st.endpoint_slices.len() == 2)
        })
        .await;
        wait_double(&double, "every watch", |d| d.open_watches() == WATCHES).await;
        // While the API server is away, Service two and its slice go, and Service one's slice is
        // replaced by another; history is compacted, so the relist must drop, not merge.
        let (svc_lists, slice_lists) = (
            double.list_count(Resource::Services),
            double.list_count(Resource::EndpointSlices),
        );
        double.set_unreachable(true);
        wait_for(&mut rx, "the outage", |s| {
            problem_has(s, "cannot reach the API server")
        })
        .await;
        double.delete(Resource::Services, "x", "two").unwrap();
        double
            .delete(Resource::EndpointSlices, "x", "two-a")
            .unwrap();
        double
            .delete(Resource::EndpointSlices, "x", "one-a")
            .unwrap();
        double
            .apply(slice("x", "one-b", "one", &[("10.42.0.12", true)], 53))
            .unwrap();
        double.compact();
        double.set_unreachable(false);
        let s = wait_for(&mut rx, "the relisted state", |s| {
            s.state.as_ref().is_some_and(|st| {
                st.services.len() == 1 && st.endpoint_slices.keys().eq([&PodKey::new("x", "one-b")])
            })
        })
        .await;
        assert!(state(&s).services.contains_key(&PodKey::new("x", "one")));
        assert_eq!(
            backends(&s, "10.43.1.1", Protocol::Udp),
            Some(vec![ep("10.42.0.12", 53)])
        );
        assert!(backends(&s, "10.43.1.2", Protocol::Udp).is_none());
        assert!(
            double.list_count(Resource::Services) > svc_lists,
            "relisted"
        );
        assert!(
            double.list_count(Resource::EndpointSlices) > slice_lists,
            "relisted"
        );
        wait_for(&mut rx, "recovery", |s| s.problem.is_none()).await;
    });
}
