//! End to end through the Kubernetes API source: agents on the simulated two-node cluster started
//! with `--kubeconfig` pointing at the API server double (a listener on each node's own loopback,
//! since `ip netns exec` nodes cannot reach the host's 127.0.0.1), a NetworkPolicy created and
//! deleted through the double is enforced and lifted, an outage is reported (status, /readyz) while
//! enforcement stays, a restarted agent that cannot reach the API keeps the pinned policy and is not
//! ready, and kube-router's leftover chains draw the start-up warning. With the kube-proxy
//! simulation, the DNS egress policy works through kube-dns's ClusterIP only once the Service and
//! its EndpointSlices come through the API, and stops when the Service is deleted.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use netpol_agent::observe::control::Status;
use netpol_tests::apiserver_double::{
    ApiServerDouble, Resource, http_get_in_netns, load_manifest_file,
};
use netpol_tests::cluster::{Cluster, Family, Proto, default_agent_bin};
use netpol_tests::kube_proxy::{COREDNS_POD, KUBE_DNS_IP, ProbeReport, Service};

const PROBE_BIN: &str = env!("CARGO_BIN_EXE_netpol-probe");
const CONVERGE: Duration = Duration::from_secs(30);
const HEALTH: &str = "127.0.0.1:9101";

fn status(c: &Cluster, node: usize) -> Option<Status> {
    let n = &c.nodes[node];
    let out = Command::new("ip")
        .args(["netns", "exec", &n.name])
        .arg(default_agent_bin())
        .args(["status", "-o", "json", "--state-dir"])
        .arg(&n.state_dir)
        .arg("--pin-dir")
        .arg(&n.pin_dir)
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

fn wait_status(c: &mut Cluster, node: usize, what: &str, f: impl Fn(&Status) -> bool) -> Status {
    let deadline = Instant::now() + CONVERGE;
    loop {
        c.check_agents().unwrap_or_else(|e| panic!("{e:#}"));
        let s = status(c, node);
        if let Some(s) = &s
            && f(s)
        {
            return s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "node {node}: timed out waiting for {what}; status {s:#?}\nlog:\n{}",
            c.agent_log(node)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts an agent on every node with a kubeconfig for `double`.
fn start_on_double(c: &mut Cluster, double: &ApiServerDouble, bin: &std::path::Path) {
    for i in 0..c.nodes.len() {
        let kc = double
            .write_kubeconfig(i, &c.tmp_dir.join(format!("kubeconfig-n{i}")))
            .unwrap();
        c.start_agent_with_source(i, bin, &[OsString::from("--kubeconfig"), kc.into()])
            .unwrap_or_else(|e| panic!("starting agent {i}: {e:#}"));
    }
}

fn health(c: &Cluster, node: usize, path: &str) -> (u16, String) {
    let addr: SocketAddr = HEALTH.parse().unwrap();
    http_get_in_netns(&c.nodes[node].name, addr, path)
        .unwrap_or_else(|e| panic!("GET {path} on node {node}: {e:#}"))
}

const DENY_X_INGRESS: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-ingress
  namespace: x
spec:
  podSelector: {}
  policyTypes: [Ingress]
";

#[test]
fn policy_created_through_the_api_double_is_enforced() {
    if !netpol_tests::privileged_or_skip(
        "policy_created_through_the_api_double_is_enforced",
        "needs root (network namespaces, bpffs, BPF)",
    ) {
        return;
    }
    let mut c = Cluster::new(PROBE_BIN).unwrap_or_else(|e| panic!("cluster setup: {e:#}"));
    let nodes: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).collect();
    let node_refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
    let double = ApiServerDouble::start_in_netns(&node_refs).expect("API server double");
    // The Namespaces and Pods the harness writes for the manifest source, served by the double.
    let n = load_manifest_file(&double, &c.manifest_dir.join("objects.yaml")).unwrap();
    assert_eq!(n, 3 + 9);
    // kube-router's chains (as K3s leaves them) on node 1 only.
    for chain in ["KUBE-ROUTER-INPUT", "KUBE-NWPLCY-DEFAULT"] {
        let st = Command::new("ip")
            .args(["netns", "exec", &nodes[1], "iptables", "-N", chain])
            .status()
            .unwrap();
        assert!(st.success(), "iptables -N {chain}");
    }
    let bin = default_agent_bin();
    start_on_double(&mut c, &double, &bin);
    for i in 0..nodes.len() {
        // Node 1's kube-router chains are a problem of its own, and only that.
        let chains = if i == 1 { 2 } else { 0 };
        let s = wait_status(&mut c, i, "ready", |s| {
            s.ready && s.pods == 9 && s.kube_router_chains == chains && s.errors.len() == chains / 2
        });
        assert!(s.source.starts_with("kubernetes:"), "{}", s.source);
        assert!(
            s.errors.iter().all(
                |e| e.contains("kube-router's NetworkPolicy rules are on this node (2 chains)")
            ),
            "{:?}",
            s.errors
        );
        let (code, body) = health(&c, i, "/readyz");
        assert_eq!(code, 200, "{body}");
        let (code, body) = health(&c, i, "/healthz");
        assert_eq!(code, 200, "{body}");
    }
    let all = c.reachability(true);
    c.wait_for_matrix(&all, 80, Proto::Tcp, Family::V4, CONVERGE)
        .unwrap_or_else(|e| panic!("{e:#}"));

    // A policy created through the API is enforced on both nodes.
    double.apply_yaml(DENY_X_INGRESS).unwrap();
    let mut denied = c.reachability(true);
    denied.expect_all_ingress("x/*", false);
    for (port, proto, family) in [(80, Proto::Tcp, Family::V4), (81, Proto::Udp, Family::V6)] {
        c.wait_for_matrix(&denied, port, proto, family, CONVERGE)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    // The API server goes away: reported (status, /readyz body), enforcement unchanged.
    double.set_unreachable(true);
    for i in 0..nodes.len() {
        wait_status(&mut c, i, "the outage", |s| {
            s.errors
                .iter()
                .any(|e| e.contains("cannot reach the API server"))
        });
        let (code, body) = health(&c, i, "/readyz");
        assert_eq!(code, 200, "stays ready once synced: {body}");
        assert!(body.contains("cannot reach the API server"), "{body}");
    }
    c.wait_for_matrix(&denied, 80, Proto::Tcp, Family::V4, CONVERGE)
        .unwrap_or_else(|e| panic!("{e:#}"));

    // A restarted agent that cannot reach the API changes nothing (the pinned policy stays) and is
    // not ready.
    c.start_agent_with_source(
        0,
        &bin,
        &[
            OsString::from("--kubeconfig"),
            c.tmp_dir.join("kubeconfig-n0").into(),
        ],
    )
    .unwrap();
    let s = wait_status(&mut c, 0, "the restarted agent's problem", |s| {
        !s.errors.is_empty()
    });
    assert!(!s.ready);
    let (code, body) = health(&c, 0, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("cannot reach the API server"), "{body}");
    c.wait_for_matrix(&denied, 80, Proto::Tcp, Family::V4, CONVERGE)
        .unwrap_or_else(|e| panic!("{e:#}"));

    // Back: the policy deleted through the API is lifted everywhere.
    double.set_unreachable(false);
    for i in 0..nodes.len() {
        // Only node 1's kube-router problem stays.
        let chains_problem = usize::from(i == 1);
        wait_status(&mut c, i, "recovery", |s| {
            s.ready && s.errors.len() == chains_problem
        });
    }
    assert!(
        double
            .delete(Resource::NetworkPolicies, "x", "deny-ingress")
            .unwrap()
    );
    c.wait_for_matrix(&all, 80, Proto::Tcp, Family::V4, CONVERGE)
        .unwrap_or_else(|e| panic!("{e:#}"));

    // kube-router's chains were found on node 1, and only there.
    let warning = "kube-router's NetworkPolicy rules are on this node (K3s's built-in";
    assert!(
        c.agent_log(1).contains(warning),
        "no kube-router warning on node 1:\n{}",
        c.agent_log(1)
    );
    assert!(!c.agent_log(0).contains(warning));
    assert_eq!(
        c.agent_log(1).matches(warning).count(),
        1,
        "warned once per start"
    );
}

const DNS_POLICIES: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: default-deny-egress
  namespace: x
spec:
  podSelector: {}
  policyTypes: [Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-dns
  namespace: x
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: kube-system
      podSelector:
        matchLabels:
          k8s-app: kube-dns
    ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
";

/// y/web: ClusterIP 10.43.1.1, TCP and UDP 80 -> y/b (node 0).
const WEB: Ipv4Addr = Ipv4Addr::new(10, 43, 1, 1);

/// What a probe must see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Blocked,
    /// Answered by this pod, on this port (after DNAT).
    ByOn(&'static str, u16),
}

/// (from pod, protocol, address, port, want).
type Case = (&'static str, Proto, Ipv4Addr, u16, Want);

fn judge(want: Want, r: &ProbeReport) -> bool {
    match want {
        Want::Blocked => !r.ok,
        Want::ByOn(p, port) => r.ok && r.answered_by() == Some(p) && r.answered_on() == Some(port),
    }
}

/// Probes until every case holds in one round, or fails after [`CONVERGE`] listing every case.
fn expect(c: &mut Cluster, what: &str, cases: &[Case]) {
    let start = Instant::now();
    loop {
        c.check_agents().unwrap_or_else(|e| panic!("{what}: {e:#}"));
        let reports: Vec<ProbeReport> = cases
            .iter()
            .map(|(from, proto, addr, port, _)| {
                c.probe_pod(from, *proto, *addr, *port)
                    .unwrap_or_else(|e| panic!("probing from {from}: {e:#}"))
            })
            .collect();
        let ok = cases.iter().zip(&reports).all(|(k, r)| judge(k.4, r));
        if ok || start.elapsed() > CONVERGE {
            let table: String = cases
                .iter()
                .zip(&reports)
                .map(|(k, r)| {
                    format!(
                        "  {} {} -> {}/{}:{} want {:?}, got ok={} reply={:?} {}\n",
                        if judge(k.4, r) { "ok  " } else { "FAIL" },
                        k.0,
                        k.1.as_str(),
                        k.2,
                        k.3,
                        k.4,
                        r.ok,
                        r.reply,
                        r.detail
                    )
                })
                .collect();
            assert!(
                ok,
                "{what}: not as expected after {:.1?}:\n{table}node 0 log:\n{}",
                start.elapsed(),
                c.agent_log(0)
            );
            eprintln!(
                "{what}: as expected after {:.1?}:\n{table}",
                start.elapsed()
            );
            return;
        }
    }
}

#[test]
fn dns_policy_through_kube_dns_with_services_from_the_api_double() {
    if !netpol_tests::privileged_or_skip(
        "dns_policy_through_kube_dns_with_services_from_the_api_double",
        "needs root (network namespaces, iptables, bpffs, BPF)",
    ) {
        return;
    }
    let mut c = Cluster::new(PROBE_BIN).unwrap_or_else(|e| panic!("cluster setup: {e:#}"));
    c.enable_kube_proxy().unwrap();
    c.add_coredns(0).unwrap();
    c.add_service(
        Service::new("y", "web", WEB)
            .select("pod", "b")
            .port("http", Proto::Tcp, 80, 80)
            .port("http-udp", Proto::Udp, 80, 80),
    )
    .unwrap();
    let dns_ip = c.pod(COREDNS_POD).ipv4;
    let yb = c.pod("y/b").ipv4;
    let ya = c.pod("y/a").ipv4;
    let nodes: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).collect();
    let node_refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
    let double = ApiServerDouble::start_in_netns(&node_refs).expect("API server double");
    // Namespaces and Pods (CoreDNS included) and the policies, but no Services yet: what an agent
    // that does not watch Services and EndpointSlices sees.
    let n = load_manifest_file(&double, &c.manifest_dir.join("objects.yaml")).unwrap();
    assert_eq!(
        n,
        4 + 10,
        "namespaces x, y, z, kube-system; 9 pods and CoreDNS"
    );
    assert_eq!(double.apply_yaml(DNS_POLICIES).unwrap(), 2);
    let bin = default_agent_bin();
    start_on_double(&mut c, &double, &bin);
    for i in 0..nodes.len() {
        let s = wait_status(&mut c, i, "ready", |s| s.ready && s.pods == 10);
        assert!(s.errors.is_empty(), "{:?}", s.errors);
    }
    // x/a shares CoreDNS's node, x/b does not.
    let mut without: Vec<Case> = Vec::new();
    for from in ["x/a", "x/b"] {
        without.extend([
            // No frontend known: the ClusterIP is just an address the policy does not allow.
            (from, Proto::Udp, KUBE_DNS_IP, 53, Want::Blocked),
            (from, Proto::Tcp, KUBE_DNS_IP, 53, Want::Blocked),
            // The policy names the pod: its own address works.
            (from, Proto::Udp, dns_ip, 53, Want::ByOn(COREDNS_POD, 53)),
        ]);
    }
    // kube-proxy works: an unisolated pod reaches y/web's backend.
    without.push(("y/c", Proto::Tcp, WEB, 80, Want::ByOn("y/b", 80)));
    expect(&mut c, "no Services in the API", &without);

    // The Services and their EndpointSlices, as the harness wrote them for the manifest source.
    let n = load_manifest_file(&double, &c.manifest_dir.join("services.yaml")).unwrap();
    assert_eq!(n, 4, "kube-dns and y/web, one EndpointSlice each");
    let mut cases: Vec<Case> = Vec::new();
    for from in ["x/a", "x/b"] {
        cases.extend([
            (
                from,
                Proto::Udp,
                KUBE_DNS_IP,
                53,
                Want::ByOn(COREDNS_POD, 53),
            ),
            (
                from,
                Proto::Tcp,
                KUBE_DNS_IP,
                53,
                Want::ByOn(COREDNS_POD, 53),
            ),
            (from, Proto::Udp, dns_ip, 53, Want::ByOn(COREDNS_POD, 53)),
            // Nothing else: CoreDNS's other ports, another ClusterIP, other pods.
            (from, Proto::Tcp, dns_ip, 80, Want::Blocked),
            (from, Proto::Udp, dns_ip, 81, Want::Blocked),
            (from, Proto::Tcp, WEB, 80, Want::Blocked),
            (from, Proto::Udp, WEB, 80, Want::Blocked),
            (from, Proto::Tcp, yb, 80, Want::Blocked),
            (from, Proto::Udp, ya, 53, Want::Blocked),
        ]);
    }
    cases.push(("y/c", Proto::Tcp, WEB, 80, Want::ByOn("y/b", 80)));
    expect(&mut c, "Services from the API", &cases);
    for i in 0..nodes.len() {
        let s = wait_status(&mut c, i, "no errors", |s| s.ready);
        assert!(s.errors.is_empty(), "{:?}", s.errors);
    }

    // kube-dns deleted through the API (kube-proxy's rules stay): the ClusterIP is denied again.
    assert!(
        double
            .delete(Resource::Services, "kube-system", "kube-dns")
            .unwrap()
    );
    let mut gone: Vec<Case> = Vec::new();
    for from in ["x/a", "x/b"] {
        gone.extend([
            (from, Proto::Udp, KUBE_DNS_IP, 53, Want::Blocked),
            (from, Proto::Tcp, KUBE_DNS_IP, 53, Want::Blocked),
            (from, Proto::Udp, dns_ip, 53, Want::ByOn(COREDNS_POD, 53)),
        ]);
    }
    expect(&mut c, "kube-dns deleted", &gone);
}

const DENY_Y_TO_X: &str = "\
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata:
  name: x-guard
spec:
  tier: Admin
  priority: 5
  subject:
    namespaces:
      matchLabels: {kubernetes.io/metadata.name: x}
  ingress:
  - name: no-y
    action: Deny
    from:
    - namespaces:
        matchLabels: {kubernetes.io/metadata.name: y}
";

/// Without the ClusterNetworkPolicy CRD the agents sync and are ready (there are none); once it is
/// installed, a ClusterNetworkPolicy created through the API is enforced, and deleting it lifts it.
#[test]
fn cluster_network_policy_through_the_api_double_once_its_crd_is_installed() {
    let test = "cluster_network_policy_through_the_api_double_once_its_crd_is_installed";
    if !netpol_tests::privileged_or_skip(test, "needs root (network namespaces, bpffs, BPF)") {
        return;
    }
    let mut c = Cluster::new(PROBE_BIN).unwrap_or_else(|e| panic!("cluster setup: {e:#}"));
    let nodes: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).collect();
    let node_refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
    let double = ApiServerDouble::start_in_netns(&node_refs).expect("API server double");
    load_manifest_file(&double, &c.manifest_dir.join("objects.yaml")).unwrap();
    let bin = default_agent_bin();
    start_on_double(&mut c, &double, &bin);
    for i in 0..nodes.len() {
        wait_status(&mut c, i, "ready without the CRD", |s| {
            s.ready && s.pods == 9 && s.errors.is_empty()
        });
    }
    let all = c.reachability(true);
    c.wait_for_matrix(&all, 80, Proto::Tcp, Family::V4, CONVERGE)
        .unwrap_or_else(|e| panic!("{e:#}"));

    double.set_installed(Resource::ClusterNetworkPolicies, true);
    double.apply_yaml(DENY_Y_TO_X).unwrap();
    let mut denied = c.reachability(true);
    denied.expect_peer("y/*", "x/*", false);
    // The watch of the missing CRD retries with kube-runtime's backoff (up to 30 s apart): the
    // first probe gets that much more time.
    let found = CONVERGE * 2;
    c.wait_for_matrix(&denied, 80, Proto::Tcp, Family::V4, found)
        .unwrap_or_else(|e| panic!("{e:#}"));
    c.wait_for_matrix(&denied, 81, Proto::Udp, Family::V6, CONVERGE)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        double
            .delete(Resource::ClusterNetworkPolicies, "", "x-guard")
            .unwrap()
    );
    c.wait_for_matrix(&all, 80, Proto::Tcp, Family::V4, CONVERGE)
        .unwrap_or_else(|e| panic!("{e:#}"));
}
