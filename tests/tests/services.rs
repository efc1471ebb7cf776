//! NetworkPolicy through Services (issue 5): ClusterIPs with local and remote backends, the DNS
//! policy against a CoreDNS-like pod, load balancing over an allowed and a denied backend, named
//! target ports, ipBlocks, replies, hairpin, NodePorts from a host outside the cluster, and the
//! nodes' own traffic. kube-proxy is simulated in every node (`netpol_tests::kube_proxy`).
//!
//! Pods (as in matrix.rs): x/a n0, x/b n1, x/c n0, y/a n1, y/b n0, y/c n1, z/a n0, z/b n1, z/c n0,
//! plus kube-system/coredns on n0. Services (all TCP and UDP unless said):
//!
//! | Service | ClusterIP | port -> target | backends |
//! | --- | --- | --- | --- |
//! | kube-system/kube-dns | 10.43.0.10 | 53/UDP `dns`, 53/TCP `dns-tcp` | coredns (n0) |
//! | y/local | 10.43.1.1 | 80 -> 80 | y/b (n0) |
//! | y/remote | 10.43.1.2 | 80 -> 80 | y/a (n1) |
//! | y/both | 10.43.1.3 | 80 -> 80 | y/b (n0), y/c (n1) |
//! | z/named | 10.43.1.4 | 80 -> `serve-81-tcp` / `serve-81-udp` | z/b (n1) |
//! | x/hair | 10.43.1.5 | 80 -> 80 | x/c (n0) |
//! | y/np-cluster | 10.43.2.1 | TCP 80 -> 80, nodePort 30080, externalTrafficPolicy Cluster | y/b (n0) |
//! | y/np-local | 10.43.2.2 | TCP 80 -> 80, nodePort 30081, externalTrafficPolicy Local | y/b (n0) |
//! | y/np-remote | 10.43.2.3 | TCP 80 -> 80, nodePort 30082, externalTrafficPolicy Cluster | y/a (n1) |
//!
//! What the backends see as the client (observed without agents, asserted in
//! `services_harness_without_agent`): pod clients keep their address through a ClusterIP; hairpin
//! (x/c to x/hair) arrives from cni0's `10.42.0.1`; the outside host through a `Cluster` NodePort
//! arrives from the receiving node's address on the way to the backend (`10.42.0.1`, cni0, for a
//! backend on that node; `10.42.0.0`, node 0's flannel.1, for a backend on node 1), through a
//! `Local` NodePort from its own `198.51.100.100`; node 0's own traffic to a ClusterIP from
//! `10.42.0.1` (masqueraded, it is not from the cluster CIDR); node 1's own traffic to a pod on
//! node 0 from `10.42.1.0` (its flannel.1 address).
//!
//! So for policies: an ingress ipBlock on the outside host's address can only match through
//! `Local`; through `Cluster` the backend sees a node address: its own node's (always allowed,
//! whatever the policy) or another node's (subject to policy, matched by an ipBlock on that
//! address, never by one on the outside host's).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use netpol_tests::cluster::{Backend, Cluster, Proto, default_agent_bin};
use netpol_tests::kube_proxy::{
    COREDNS_POD, EXTERNAL_HOST_IP, KUBE_DNS_IP, ProbeReport, Service, TrafficPolicy,
};

const PROBE_BIN: &str = env!("CARGO_BIN_EXE_netpol-probe");
/// Covers agent start-up (loading BPF, first sync) on a loaded machine.
const CONVERGE: Duration = Duration::from_secs(30);

const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 43, 1, 1);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 43, 1, 2);
const BOTH: Ipv4Addr = Ipv4Addr::new(10, 43, 1, 3);
const NAMED: Ipv4Addr = Ipv4Addr::new(10, 43, 1, 4);
const HAIR: Ipv4Addr = Ipv4Addr::new(10, 43, 1, 5);
const NP_CLUSTER: u16 = 30080;
const NP_LOCAL: u16 = 30081;
const NP_REMOTE: u16 = 30082;
const NODE0: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const NODE1: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
/// cni0 of node 0 and node 1, flannel.1 of node 0 and node 1.
const CNI0_N0: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 1);
const CNI0_N1: Ipv4Addr = Ipv4Addr::new(10, 42, 1, 1);
const FLANNEL_N0: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 0);
const FLANNEL_N1: Ipv4Addr = Ipv4Addr::new(10, 42, 1, 0);

fn root_or_skip(test: &str) -> bool {
    netpol_tests::privileged_or_skip(test, "needs root (network namespaces, iptables, bpffs)")
}

/// The cluster with CoreDNS, the Services of the module docs and their backends' labels.
fn services_cluster(test: &str) -> Option<Cluster> {
    services_cluster_on(test, Backend::Vxlan)
}

/// [`services_cluster`] with the Flannel backend `backend`.
fn services_cluster_on(test: &str, backend: Backend) -> Option<Cluster> {
    if !root_or_skip(test) {
        return None;
    }
    let mut c = Cluster::with_backend(PROBE_BIN, backend)
        .unwrap_or_else(|e| panic!("cluster setup: {e:#}"));
    setup_services(&mut c).unwrap_or_else(|e| panic!("services setup: {e:#}"));
    for (id, ip) in POD_IPS {
        assert_eq!(c.pod(id).ipv4, ip, "{id}");
    }
    Some(c)
}

fn setup_services(c: &mut Cluster) -> anyhow::Result<()> {
    c.enable_kube_proxy()?;
    c.add_coredns(0)?;
    c.set_pod_labels("y/a", &[("pod", "a"), ("app", "remote")])?;
    c.set_pod_labels("y/b", &[("pod", "b"), ("app", "local"), ("tier", "both")])?;
    c.set_pod_labels("y/c", &[("pod", "c"), ("tier", "both")])?;
    c.set_pod_labels("z/b", &[("pod", "b"), ("app", "named")])?;
    c.set_pod_labels("x/c", &[("pod", "c"), ("app", "hair")])?;
    let web = |ns: &str, name: &str, ip: Ipv4Addr, key: &str, value: &str| {
        Service::new(ns, name, ip)
            .select(key, value)
            .port("http", Proto::Tcp, 80, 80)
            .port("http-udp", Proto::Udp, 80, 80)
    };
    c.add_service(web("y", "local", LOCAL, "app", "local"))?;
    c.add_service(web("y", "remote", REMOTE, "app", "remote"))?;
    c.add_service(web("y", "both", BOTH, "tier", "both"))?;
    c.add_service(web("x", "hair", HAIR, "app", "hair"))?;
    c.add_service(
        Service::new("z", "named", NAMED)
            .select("app", "named")
            .port("http", Proto::Tcp, 80, "serve-81-tcp")
            .port("http-udp", Proto::Udp, 80, "serve-81-udp"),
    )?;
    let np = |name: &str, ip: Ipv4Addr, app: &str, node_port: u16, p: TrafficPolicy| {
        Service::new("y", name, ip)
            .select("app", app)
            .port("http", Proto::Tcp, 80, 80)
            .node_port(node_port)
            .traffic_policy(p)
    };
    let (o2, o3) = (Ipv4Addr::new(10, 43, 2, 1), Ipv4Addr::new(10, 43, 2, 2));
    c.add_service(np(
        "np-cluster",
        o2,
        "local",
        NP_CLUSTER,
        TrafficPolicy::Cluster,
    ))?;
    c.add_service(np("np-local", o3, "local", NP_LOCAL, TrafficPolicy::Local))?;
    c.add_service(np(
        "np-remote",
        Ipv4Addr::new(10, 43, 2, 3),
        "remote",
        NP_REMOTE,
        TrafficPolicy::Cluster,
    ))?;
    Ok(())
}

fn start_agents(c: &mut Cluster) {
    c.start_agents(&default_agent_bin())
        .unwrap_or_else(|e| panic!("starting agents: {e:#}"));
}

fn apply(c: &Cluster, policies: &str) {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    for doc in yaml_docs(policies) {
        let _: NetworkPolicy = serde_yaml_ng::from_value(doc.clone())
            .unwrap_or_else(|e| panic!("not a NetworkPolicy: {e}\n{doc:?}"));
    }
    c.apply_policies(policies).unwrap();
}

fn yaml_docs(s: &str) -> Vec<serde_yaml_ng::Value> {
    use serde::Deserialize as _;
    serde_yaml_ng::Deserializer::from_str(s)
        .map(|d| {
            serde_yaml_ng::Value::deserialize(d).unwrap_or_else(|e| panic!("bad YAML: {e}\n{s}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn np(name: &str, ns: &str, spec: &str) -> String {
    let mut s = format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n"
    );
    for l in spec.trim_matches('\n').lines() {
        s.push_str("  ");
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// Where a probe starts.
#[derive(Debug, Clone, Copy)]
enum Src {
    Pod(&'static str),
    Node(usize),
    External,
}

/// What a probe must see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Blocked,
    /// Answered by this pod.
    By(&'static str),
    /// Answered by this pod, on this port (after DNAT).
    ByOn(&'static str, u16),
    /// Answered by this pod, which saw this client address.
    BySeeing(&'static str, Ipv4Addr),
}

#[derive(Debug, Clone, Copy)]
struct Case {
    from: Src,
    proto: Proto,
    addr: Ipv4Addr,
    port: u16,
    want: Want,
}

fn case(from: Src, proto: Proto, addr: Ipv4Addr, port: u16, want: Want) -> Case {
    Case {
        from,
        proto,
        addr,
        port,
        want,
    }
}

fn tcp(from: &'static str, addr: Ipv4Addr, port: u16, want: Want) -> Case {
    case(Src::Pod(from), Proto::Tcp, addr, port, want)
}

fn udp(from: &'static str, addr: Ipv4Addr, port: u16, want: Want) -> Case {
    case(Src::Pod(from), Proto::Udp, addr, port, want)
}

/// Pod addresses, fixed by the harness's layout (checked in [`services_cluster`]).
const POD_IPS: [(&str, Ipv4Addr); 10] = [
    ("x/a", Ipv4Addr::new(10, 42, 0, 10)),
    ("x/b", Ipv4Addr::new(10, 42, 1, 11)),
    ("x/c", Ipv4Addr::new(10, 42, 0, 12)),
    ("y/a", Ipv4Addr::new(10, 42, 1, 13)),
    ("y/b", Ipv4Addr::new(10, 42, 0, 14)),
    ("y/c", Ipv4Addr::new(10, 42, 1, 15)),
    ("z/a", Ipv4Addr::new(10, 42, 0, 16)),
    ("z/b", Ipv4Addr::new(10, 42, 1, 17)),
    ("z/c", Ipv4Addr::new(10, 42, 0, 18)),
    (COREDNS_POD, Ipv4Addr::new(10, 42, 0, 19)),
];

fn pip(id: &str) -> Ipv4Addr {
    POD_IPS
        .iter()
        .find(|(p, _)| *p == id)
        .unwrap_or_else(|| panic!("no pod {id}"))
        .1
}

fn netns_of(c: &Cluster, s: Src) -> String {
    match s {
        Src::Pod(p) => c.pod(p).netns.clone(),
        Src::Node(n) => c.nodes[n].name.clone(),
        Src::External => c.external_host().expect("outside host").to_string(),
    }
}

fn judge(want: Want, r: &ProbeReport) -> bool {
    match want {
        Want::Blocked => !r.ok,
        Want::By(p) => r.ok && r.answered_by() == Some(p),
        Want::ByOn(p, port) => r.ok && r.answered_by() == Some(p) && r.answered_on() == Some(port),
        Want::BySeeing(p, a) => {
            r.ok && r.answered_by() == Some(p) && r.seen_from() == Some(IpAddr::V4(a))
        }
    }
}

/// Probes every case once (one probe process per source, all sources at once); returns the
/// reports in case order.
fn probe_cases(c: &Cluster, cases: &[Case]) -> Vec<ProbeReport> {
    let mut by_src: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, k) in cases.iter().enumerate() {
        by_src.entry(netns_of(c, k.from)).or_default().push(i);
    }
    let mut out: Vec<Option<ProbeReport>> = vec![None; cases.len()];
    std::thread::scope(|s| {
        let handles: Vec<_> = by_src
            .iter()
            .map(|(ns, idx)| {
                let targets: Vec<String> = idx
                    .iter()
                    .map(|&i| {
                        let k = &cases[i];
                        format!("{}/{}/{}", k.proto.as_str(), k.addr, k.port)
                    })
                    .collect();
                (
                    idx,
                    s.spawn(move || {
                        c.probe_from(ns, &targets)
                            .unwrap_or_else(|e| panic!("probing from {ns}: {e:#}"))
                    }),
                )
            })
            .collect();
        for (idx, h) in handles {
            for (&i, r) in idx.iter().zip(h.join().expect("probe thread")) {
                out[i] = Some(r);
            }
        }
    });
    out.into_iter()
        .map(|r| r.expect("every case probed"))
        .collect()
}

fn describe(cases: &[Case], reports: &[ProbeReport]) -> String {
    let mut s = String::new();
    for (k, r) in cases.iter().zip(reports) {
        let mark = if judge(k.want, r) { "ok  " } else { "FAIL" };
        s.push_str(&format!(
            "  {mark} {:?} -> {}/{}:{} want {:?}, got ok={} reply={:?} {}\n",
            k.from,
            k.proto.as_str(),
            k.addr,
            k.port,
            k.want,
            r.ok,
            r.reply,
            r.detail
        ));
    }
    s
}

/// Probes until every case holds in one round (or `timeout`), then fails listing every case.
fn expect(c: &mut Cluster, what: &str, cases: &[Case], timeout: Duration) {
    let start = Instant::now();
    let mut rounds = 0;
    loop {
        if let Err(e) = c.check_agents() {
            panic!("{what}: {e:#}");
        }
        let reports = probe_cases(c, cases);
        rounds += 1;
        if cases.iter().zip(&reports).all(|(k, r)| judge(k.want, r)) {
            eprintln!(
                "{what}: as expected after {rounds} rounds in {:.1?}:\n{}",
                start.elapsed(),
                describe(cases, &reports)
            );
            return;
        }
        if start.elapsed() > timeout {
            panic!(
                "{what}: not as expected after {rounds} rounds in {:.1?}:\n{}",
                start.elapsed(),
                describe(cases, &reports)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ------------------------------------------------------------------------------------------
// The harness itself, without agents: everything connects, through kube-proxy's rules.
// ------------------------------------------------------------------------------------------

#[test]
fn services_harness_without_agent() {
    let Some(mut c) = services_cluster("services_harness_without_agent") else {
        return;
    };
    validate_services_yaml(&c);
    agent_sees_the_same_frontends(&c);

    let dns = COREDNS_POD;
    let mut cases = vec![
        // ClusterIP, local and remote backends, TCP and UDP, from both nodes.
        tcp("x/a", LOCAL, 80, Want::BySeeing("y/b", pip("x/a"))),
        udp("x/a", LOCAL, 80, Want::BySeeing("y/b", pip("x/a"))),
        tcp("x/a", REMOTE, 80, Want::BySeeing("y/a", pip("x/a"))),
        udp("x/a", REMOTE, 80, Want::BySeeing("y/a", pip("x/a"))),
        tcp("x/b", LOCAL, 80, Want::BySeeing("y/b", pip("x/b"))),
        udp("x/b", REMOTE, 80, Want::BySeeing("y/a", pip("x/b"))),
        // DNS, from a pod on CoreDNS's node and from one on the other node.
        udp("x/a", KUBE_DNS_IP, 53, Want::ByOn(dns, 53)),
        tcp("x/a", KUBE_DNS_IP, 53, Want::ByOn(dns, 53)),
        udp("x/b", KUBE_DNS_IP, 53, Want::ByOn(dns, 53)),
        tcp("x/b", KUBE_DNS_IP, 53, Want::ByOn(dns, 53)),
        // Named targetPort: ClusterIP:80 lands on the backend's 81.
        tcp("x/a", NAMED, 80, Want::ByOn("z/b", 81)),
        udp("x/a", NAMED, 80, Want::ByOn("z/b", 81)),
        // Hairpin: the backend reaches itself through its Service, masqueraded to cni0.
        tcp("x/c", HAIR, 80, Want::BySeeing("x/c", CNI0_N0)),
        udp("x/c", HAIR, 80, Want::BySeeing("x/c", CNI0_N0)),
        // The node itself through a ClusterIP (masqueraded: not from the cluster CIDR).
        case(
            Src::Node(0),
            Proto::Tcp,
            LOCAL,
            80,
            Want::BySeeing("y/b", CNI0_N0),
        ),
        case(
            Src::Node(1),
            Proto::Tcp,
            REMOTE,
            80,
            Want::BySeeing("y/a", CNI0_N1),
        ),
        // Nodes to pods directly: own node from cni0, the other node from its flannel.1.
        case(
            Src::Node(0),
            Proto::Tcp,
            pip("x/a"),
            80,
            Want::BySeeing("x/a", CNI0_N0),
        ),
        case(
            Src::Node(1),
            Proto::Tcp,
            pip("x/a"),
            80,
            Want::BySeeing("x/a", FLANNEL_N1),
        ),
        // NodePorts from the outside host.
        case(
            Src::External,
            Proto::Tcp,
            NODE0,
            NP_CLUSTER,
            Want::BySeeing("y/b", CNI0_N0),
        ),
        case(
            Src::External,
            Proto::Tcp,
            NODE0,
            NP_LOCAL,
            Want::BySeeing("y/b", EXTERNAL_HOST_IP),
        ),
        case(
            Src::External,
            Proto::Tcp,
            NODE0,
            NP_REMOTE,
            Want::BySeeing("y/a", FLANNEL_N0),
        ),
        case(
            Src::External,
            Proto::Tcp,
            NODE1,
            NP_REMOTE,
            Want::BySeeing("y/a", CNI0_N1),
        ),
        case(
            Src::External,
            Proto::Tcp,
            NODE1,
            NP_CLUSTER,
            Want::BySeeing("y/b", FLANNEL_N1),
        ),
        // Local on a node without a local backend: nothing answers.
        case(Src::External, Proto::Tcp, NODE1, NP_LOCAL, Want::Blocked),
        // The outside host reaches the other node's NodePort through node 0 as its router.
    ];
    // Pods still reach each other directly.
    for p in ["x/b", "y/b", "z/c"] {
        let ip = pip(p);
        cases.push(tcp("x/a", ip, 80, Want::BySeeing(p, pip("x/a"))));
    }
    expect(&mut c, "without agents", &cases, Duration::from_secs(10));

    // Load balancing: over many connections, both backends of y/both answer.
    let seen = balance(&c, "x/a", Proto::Tcp, BOTH, 40);
    assert!(
        seen.get("y/b").is_some_and(|n| *n > 0) && seen.get("y/c").is_some_and(|n| *n > 0),
        "y/both did not balance over y/b and y/c: {seen:?}"
    );
    assert_eq!(seen.values().sum::<usize>(), 40, "{seen:?}");

    // kube-proxy follows the pods: relabelling y/c out of y/both leaves one backend.
    c.set_pod_labels("y/c", &[("pod", "c")]).unwrap();
    assert_eq!(c.service_backends("y/both", "http").len(), 1);
    let seen = balance(&c, "x/a", Proto::Tcp, BOTH, 10);
    assert_eq!(seen.get("y/b"), Some(&10), "{seen:?}");
    assert!(
        !c.kube_proxy_rules(0).contains(&pip("y/c").to_string()),
        "{}",
        c.kube_proxy_rules(0)
    );
    c.remove_service("y", "both").unwrap();
    let left = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.nodes[0].name,
            "iptables-save",
            "-t",
            "nat",
        ])
        .output()
        .unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(!left.contains("y/both"), "{left}");
    assert!(left.contains("y/local:http cluster IP"), "{left}");
}

/// `n` concurrent connections from pod `from` to `vip:80`; counts the answering pods (`"-"` for
/// failed ones).
fn balance(
    c: &Cluster,
    from: &str,
    proto: Proto,
    vip: Ipv4Addr,
    n: usize,
) -> BTreeMap<String, usize> {
    let targets = vec![format!("{}/{vip}/80", proto.as_str()); n];
    let reports = c.probe_from(&c.pod(from).netns, &targets).unwrap();
    let mut seen = BTreeMap::new();
    for r in &reports {
        let who = if r.ok {
            r.answered_by().unwrap_or("?").to_string()
        } else {
            "-".to_string()
        };
        *seen.entry(who).or_insert(0) += 1;
    }
    seen
}

/// The Service and EndpointSlice objects are what the API would serve.
fn validate_services_yaml(c: &Cluster) {
    use k8s_openapi::api::core::v1::Service as K8sService;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let text = std::fs::read_to_string(c.manifest_dir.join("services.yaml")).unwrap();
    let (mut services, mut slices) = (0, 0);
    for doc in yaml_docs(&text) {
        match doc["kind"].as_str() {
            Some("Service") => {
                let _: K8sService = serde_yaml_ng::from_value(doc.clone())
                    .unwrap_or_else(|e| panic!("bad Service: {e}\n{doc:?}"));
                services += 1;
            }
            Some("EndpointSlice") => {
                let _: EndpointSlice = serde_yaml_ng::from_value(doc.clone())
                    .unwrap_or_else(|e| panic!("bad EndpointSlice: {e}\n{doc:?}"));
                slices += 1;
            }
            k => panic!("unexpected kind {k:?}"),
        }
    }
    assert_eq!(services, c.services().len());
    assert!(slices >= services, "{text}");
}

/// The agent's reading of the manifest dir gives every frontend the backends kube-proxy uses,
/// from the EndpointSlices and (without them) from the selectors.
fn agent_sees_the_same_frontends(c: &Cluster) {
    let mut c2 = Vec::new();
    for slices in [true, false] {
        // set_endpoint_slices needs &mut; rebuild the YAML through the public renderer instead.
        let dir = c.tmp_dir.join(format!("frontends-{slices}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            c.manifest_dir.join("objects.yaml"),
            dir.join("objects.yaml"),
        )
        .unwrap();
        std::fs::write(dir.join("services.yaml"), c.services_yaml(slices)).unwrap();
        let state = netpol_agent::sources::manifests::ManifestSource::new()
            .load(&dir)
            .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
        assert!(state.errors.is_empty(), "{:?}", state.errors);
        let mut got: Vec<String> = netpol_agent::model::service::frontends(&state)
            .iter()
            .map(|f| {
                let mut b: Vec<String> = f
                    .backends
                    .iter()
                    .map(|(ip, port)| format!("{ip}:{port}"))
                    .collect();
                b.sort();
                format!("{}:{}/{:?} -> {}", f.vip, f.port, f.protocol, b.join(","))
            })
            .collect();
        got.sort();
        c2.push(got);
    }
    let mut want: Vec<String> = c
        .services()
        .iter()
        .flat_map(|s| {
            s.ports.iter().map(move |p| {
                let mut b: Vec<String> = c
                    .service_backends(&s.id(), &p.name)
                    .iter()
                    .map(|b| format!("{}:{}", b.ip, b.port))
                    .collect();
                b.sort();
                (s.cluster_ip, p.port, p.protocol, b)
            })
        })
        .map(|(ip, port, proto, b)| {
            let proto = match proto {
                Proto::Tcp => "Tcp",
                Proto::Udp => "Udp",
            };
            format!("{ip}:{port}/{proto} -> {}", b.join(","))
        })
        .collect();
    want.sort();
    assert_eq!(c2[0], want, "frontends from EndpointSlices");
    assert_eq!(c2[1], want, "frontends from selectors");
}

// ------------------------------------------------------------------------------------------
// With agents. Every expectation list holds at least one case that only the agent makes true
// (a block), so passing means the policy is enforced, not that the agent has not started yet.
// ------------------------------------------------------------------------------------------

/// The cluster with Services, `policies` applied and agents started.
fn with_agents(test: &str, policies: &str) -> Option<Cluster> {
    let mut c = services_cluster(test)?;
    apply(&c, policies);
    start_agents(&mut c);
    Some(c)
}

const WEB_PORTS: &str = "  ports:\n  - {port: 80, protocol: TCP}\n  - {port: 80, protocol: UDP}";

#[test]
fn clusterip_egress_allowed_to_local_and_remote_backends() {
    // x/a (n0) and x/b (n1) may reach the pods behind y/local (y/b, n0) and y/remote (y/a, n1) on
    // port 80: local for one client, remote for the other.
    let policy = np(
        "allow-web",
        "x",
        &format!(
            "podSelector: {{matchExpressions: [{{key: pod, operator: In, values: [a, b]}}]}}\n\
             policyTypes: [Egress]\negress:\n- to:\n  - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: y}}}}\n    \
             podSelector: {{matchExpressions: [{{key: app, operator: In, values: [local, remote]}}]}}\n{WEB_PORTS}"
        ),
    );
    let Some(mut c) = with_agents(
        "clusterip_egress_allowed_to_local_and_remote_backends",
        &policy,
    ) else {
        return;
    };
    let mut cases = Vec::new();
    for from in ["x/a", "x/b"] {
        cases.extend([
            tcp(from, LOCAL, 80, Want::By("y/b")),
            udp(from, LOCAL, 80, Want::By("y/b")),
            tcp(from, REMOTE, 80, Want::By("y/a")),
            udp(from, REMOTE, 80, Want::By("y/a")),
            // What the policy does not name stays denied, through Services and directly.
            tcp(from, HAIR, 80, Want::Blocked),
            udp(from, NAMED, 80, Want::Blocked),
            udp(from, KUBE_DNS_IP, 53, Want::Blocked),
            tcp(from, pip("y/c"), 80, Want::Blocked),
            tcp(from, pip("y/b"), 81, Want::Blocked),
        ]);
    }
    // A pod the policy does not select is not isolated.
    cases.push(tcp("x/c", REMOTE, 80, Want::By("y/a")));
    cases.push(tcp("z/a", HAIR, 80, Want::By("x/c")));
    expect(&mut c, "allowed backends", &cases, CONVERGE);
}

#[test]
fn clusterip_egress_denied_when_backends_are_not_allowed() {
    // Default deny egress for x/a and x/b, plus allows for other things: every pod of z on port 80,
    // the pods of y on port 81 only. The backends of y/local, y/remote (port 80) and z/named
    // (target port 81 on z/b) are not allowed.
    let policy = np(
        "allow-other",
        "x",
        "podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, b]}]}\n\
         policyTypes: [Egress]\negress:\n\
         - to:\n  - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}\n  ports:\n  - {port: 80, protocol: TCP}\n  - {port: 80, protocol: UDP}\n\
         - to:\n  - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n  ports:\n  - {port: 81, protocol: TCP}\n  - {port: 81, protocol: UDP}",
    );
    let Some(mut c) = with_agents(
        "clusterip_egress_denied_when_backends_are_not_allowed",
        &policy,
    ) else {
        return;
    };
    let mut cases = Vec::new();
    for from in ["x/a", "x/b"] {
        cases.extend([
            tcp(from, LOCAL, 80, Want::Blocked),
            udp(from, LOCAL, 80, Want::Blocked),
            tcp(from, REMOTE, 80, Want::Blocked),
            udp(from, REMOTE, 80, Want::Blocked),
            tcp(from, BOTH, 80, Want::Blocked),
            tcp(from, NAMED, 80, Want::Blocked),
            udp(from, NAMED, 80, Want::Blocked),
            // What the policy allows works.
            tcp(from, pip("z/a"), 80, Want::By("z/a")),
            udp(from, pip("z/b"), 80, Want::By("z/b")),
            tcp(from, pip("y/b"), 81, Want::By("y/b")),
            tcp(from, pip("y/a"), 81, Want::By("y/a")),
            tcp(from, pip("y/b"), 80, Want::Blocked),
        ]);
    }
    expect(&mut c, "backends not allowed", &cases, CONVERGE);
}

/// The DNS egress policy exactly as users write it (issue 5).
const ALLOW_DNS: &str = "podSelector: {}\npolicyTypes: [Egress]\negress:\n- to:\n  - namespaceSelector:\n      matchLabels:\n        kubernetes.io/metadata.name: kube-system\n    podSelector:\n      matchLabels:\n        k8s-app: kube-dns\n  ports:\n  - port: 53\n    protocol: UDP\n  - port: 53\n    protocol: TCP";

#[test]
fn dns_policy_resolves_through_kube_dns_and_reaches_nothing_else() {
    let policies = np(
        "default-deny-egress",
        "x",
        "podSelector: {}\npolicyTypes: [Egress]",
    ) + &np("allow-dns", "x", ALLOW_DNS);
    let Some(mut c) = with_agents(
        "dns_policy_resolves_through_kube_dns_and_reaches_nothing_else",
        &policies,
    ) else {
        return;
    };
    let dns = COREDNS_POD;
    let dns_ip = pip(dns);
    let mut cases = Vec::new();
    // x/a shares CoreDNS's node, x/b does not.
    for from in ["x/a", "x/b"] {
        cases.extend([
            udp(from, KUBE_DNS_IP, 53, Want::ByOn(dns, 53)),
            tcp(from, KUBE_DNS_IP, 53, Want::ByOn(dns, 53)),
            // The policy names the pod: its address works too.
            udp(from, dns_ip, 53, Want::By(dns)),
            // Nothing else: CoreDNS's other ports, other pods, other ClusterIPs.
            tcp(from, dns_ip, 80, Want::Blocked),
            udp(from, dns_ip, 81, Want::Blocked),
            tcp(from, LOCAL, 80, Want::Blocked),
            udp(from, REMOTE, 80, Want::Blocked),
            tcp(from, NAMED, 80, Want::Blocked),
            tcp(from, HAIR, 80, Want::Blocked),
            tcp(from, pip("y/b"), 80, Want::Blocked),
            udp(from, pip("y/a"), 53, Want::Blocked),
            tcp(from, pip("x/c"), 80, Want::Blocked),
        ]);
    }
    // Pods of other namespaces are not isolated.
    cases.push(tcp("y/c", LOCAL, 80, Want::By("y/b")));
    expect(&mut c, "DNS policy", &cases, CONVERGE);
}

#[test]
fn service_with_one_allowed_backend_of_two() {
    let Some(mut c) = with_agents("service_with_one_allowed_backend_of_two", &allow_yb()) else {
        return;
    };
    one_allowed_backend_of_two(&mut c);
}

/// The same with Flannel's `host-gw` backend: no VXLAN device, the remote backend is reached
/// through the uplink, where `tunnel_egress` decides the deferred connection.
#[test]
fn service_with_one_allowed_backend_of_two_on_host_gw() {
    let test = "service_with_one_allowed_backend_of_two_on_host_gw";
    let Some(mut c) = services_cluster_on(test, Backend::HostGw) else {
        return;
    };
    apply(&c, &allow_yb());
    start_agents(&mut c);
    // Across the nodes without a tunnel, directly and through ClusterIPs, where nothing isolates.
    expect(
        &mut c,
        "host-gw paths",
        &[
            tcp("x/b", pip("y/b"), 80, Want::By("y/b")),
            tcp("x/b", LOCAL, 80, Want::By("y/b")),
            udp("x/a", pip("y/a"), 80, Want::Blocked),
        ],
        CONVERGE,
    );
    one_allowed_backend_of_two(&mut c);
}

/// x/a may reach y/b (on its node) on the web ports, and nothing else.
fn allow_yb() -> String {
    np(
        "allow-yb",
        "x",
        &format!(
            "podSelector: {{matchLabels: {{pod: a}}}}\npolicyTypes: [Egress]\negress:\n- to:\n  - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: y}}}}\n    podSelector: {{matchLabels: {{pod: b}}}}\n{WEB_PORTS}"
        ),
    )
}

/// y/both balances over y/b (n0, allowed) and y/c (n1, not allowed) for x/a (n0): both outcomes
/// occur, and the denied one never connects.
fn one_allowed_backend_of_two(c: &mut Cluster) {
    let converged = [
        tcp("x/a", pip("y/b"), 80, Want::By("y/b")),
        tcp("x/a", pip("y/c"), 80, Want::Blocked),
        udp("x/a", pip("y/c"), 80, Want::Blocked),
        tcp("x/a", LOCAL, 80, Want::By("y/b")),
    ];
    expect(c, "policy in force", &converged, CONVERGE);
    for proto in [Proto::Tcp, Proto::Udp] {
        let (ok, failed) = one_of_two(c, proto, 40);
        // Both outcomes occur (each has probability 2^-40 of never happening).
        assert!(
            ok > 0 && failed > 0,
            "{proto:?}: {ok} connections to y/b, {failed} failed: expected both"
        );
    }
}

/// `n` connections from x/a to y/both: each must succeed exactly when kube-proxy picked y/b.
/// Successes must be answered by y/b; node 0's conntrack (the DNAT kube-proxy chose for each
/// connection) must show as many connections sent to y/c as failed. Returns (ok, failed).
fn one_of_two(c: &Cluster, proto: Proto, n: usize) -> (usize, usize) {
    let node = &c.nodes[0].name;
    let client = pip("x/a").to_string();
    let conntrack = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(["netns", "exec", node, "conntrack"])
            .args(args)
            .output()
            .expect("conntrack")
    };
    let p = proto.as_str();
    let both = BOTH.to_string();
    let _ = conntrack(&["-D", "-p", p, "-s", &client, "-d", &both]);
    let targets = vec![format!("{p}/{BOTH}/80"); n];
    let reports = c.probe_from(&c.pod("x/a").netns, &targets).unwrap();
    let ok = reports.iter().filter(|r| r.ok).count();
    for r in reports.iter().filter(|r| r.ok) {
        assert_eq!(
            r.answered_by(),
            Some("y/b"),
            "{proto:?}: a connection to y/both succeeded on a backend the policy denies: {r:?}"
        );
    }
    let failed = n - ok;
    let out = conntrack(&["-L", "-p", p, "-s", &client, "-d", &both]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    // The second src= of an entry is the reply's source: the backend kube-proxy picked.
    let mut picked: BTreeMap<String, usize> = BTreeMap::new();
    for line in table.lines() {
        if let Some(backend) = line
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("src="))
            .nth(1)
        {
            *picked.entry(backend.to_string()).or_default() += 1;
        }
    }
    let yb = pip("y/b").to_string();
    let yc = pip("y/c").to_string();
    assert_eq!(
        picked.get(&yc).copied().unwrap_or(0),
        failed,
        "{proto:?}: connections kube-proxy sent to y/c vs failed ones (ok {ok}); conntrack:\n{table}"
    );
    assert_eq!(
        picked.get(&yb).copied().unwrap_or(0),
        ok,
        "{proto:?}: connections kube-proxy sent to y/b vs successful ones; conntrack:\n{table}"
    );
    eprintln!("{proto:?} over y/both: {ok} answered by y/b, {failed} failed (sent to y/c)");
    (ok, failed)
}

#[test]
fn named_target_port_is_the_port_matched() {
    // z/named: port 80 -> targetPort serve-81-tcp / serve-81-udp on z/b (n1).
    let to_named = |ports: &str| {
        np(
            "to-named",
            "x",
            &format!(
                "podSelector: {{matchLabels: {{pod: a}}}}\npolicyTypes: [Egress]\negress:\n- to:\n  - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: z}}}}\n    podSelector: {{matchLabels: {{app: named}}}}\n  ports:\n{ports}"
            ),
        )
    };
    let numeric_81 = to_named("  - {port: 81, protocol: TCP}\n  - {port: 81, protocol: UDP}");
    let Some(mut c) = with_agents("named_target_port_is_the_port_matched", &numeric_81) else {
        return;
    };
    let zb = pip("z/b");
    expect(
        &mut c,
        "policy allows the backend's port 81",
        &[
            tcp("x/a", NAMED, 80, Want::ByOn("z/b", 81)),
            udp("x/a", NAMED, 80, Want::ByOn("z/b", 81)),
            tcp("x/a", zb, 80, Want::Blocked),
            tcp("x/a", zb, 81, Want::By("z/b")),
        ],
        CONVERGE,
    );
    // The Service's own port (80) is not what the policy matches.
    apply(
        &c,
        &to_named("  - {port: 80, protocol: TCP}\n  - {port: 80, protocol: UDP}"),
    );
    expect(
        &mut c,
        "policy allows only port 80",
        &[
            tcp("x/a", NAMED, 80, Want::Blocked),
            udp("x/a", NAMED, 80, Want::Blocked),
            tcp("x/a", zb, 80, Want::By("z/b")),
            tcp("x/a", zb, 81, Want::Blocked),
        ],
        CONVERGE,
    );
    // Named ports in the policy, and backends from the Service selector (no EndpointSlices): the
    // agent resolves the target port name on the backend pod itself.
    c.set_endpoint_slices(false).unwrap();
    apply(
        &c,
        &to_named(
            "  - {port: serve-81-tcp, protocol: TCP}\n  - {port: serve-81-udp, protocol: UDP}",
        ),
    );
    expect(
        &mut c,
        "named policy ports, selector backends",
        &[
            tcp("x/a", NAMED, 80, Want::ByOn("z/b", 81)),
            udp("x/a", NAMED, 80, Want::ByOn("z/b", 81)),
            tcp("x/a", zb, 80, Want::Blocked),
        ],
        CONVERGE,
    );
}

#[test]
fn egress_ipblock_matches_service_cidr_and_real_destinations() {
    let block = |spec: &str| {
        np(
            "ipblock",
            "x",
            &format!(
                "podSelector: {{matchLabels: {{pod: a}}}}\npolicyTypes: [Egress]\negress:\n- to:\n  - ipBlock: {spec}"
            ),
        )
    };
    // The service CIDR itself: a ClusterIP is judged on the backend kube-proxy picks, never on
    // its own address, so a block around the ClusterIPs allows none of them (their backends are
    // pods outside it), and no pod directly.
    let Some(mut c) = with_agents(
        "egress_ipblock_matches_service_cidr_and_real_destinations",
        &block("{cidr: 10.43.0.0/16}"),
    ) else {
        return;
    };
    expect(
        &mut c,
        "ipBlock 10.43.0.0/16",
        &[
            tcp("x/a", LOCAL, 80, Want::Blocked),
            udp("x/a", REMOTE, 80, Want::Blocked),
            tcp("x/a", NAMED, 80, Want::Blocked),
            udp("x/a", KUBE_DNS_IP, 53, Want::Blocked),
            tcp("x/a", pip("y/b"), 80, Want::Blocked),
            tcp("x/a", pip("y/a"), 80, Want::Blocked),
        ],
        CONVERGE,
    );
    // Upstream's "except clause ... to server in CIDR block" through a Service: a block around
    // everything except one backend's address reaches that backend neither directly nor through its
    // ClusterIP, and the other backends both ways.
    apply(
        &c,
        &block(&format!("{{cidr: 0.0.0.0/0, except: [{}/32]}}", pip("y/b"))),
    );
    expect(
        &mut c,
        "ipBlock 0.0.0.0/0 except y/b",
        &[
            tcp("x/a", LOCAL, 80, Want::Blocked),
            udp("x/a", LOCAL, 80, Want::Blocked),
            tcp("x/a", pip("y/b"), 80, Want::Blocked),
            udp("x/a", REMOTE, 80, Want::By("y/a")),
            tcp("x/a", pip("y/a"), 80, Want::By("y/a")),
            udp("x/a", KUBE_DNS_IP, 53, Want::By(COREDNS_POD)),
        ],
        CONVERGE,
    );
    // An ipBlock on pod addresses matches the backend kube-proxy picked, not the ClusterIP:
    // node 0's pods yes, node 1's no.
    apply(&c, &block("{cidr: 10.42.0.0/16, except: [10.42.1.0/24]}"));
    expect(
        &mut c,
        "ipBlock 10.42.0.0/16 except 10.42.1.0/24",
        &[
            tcp("x/a", LOCAL, 80, Want::By("y/b")),
            udp("x/a", LOCAL, 80, Want::By("y/b")),
            udp("x/a", KUBE_DNS_IP, 53, Want::By(COREDNS_POD)),
            tcp("x/a", REMOTE, 80, Want::Blocked),
            udp("x/a", REMOTE, 80, Want::Blocked),
            tcp("x/a", NAMED, 80, Want::Blocked),
            tcp("x/a", pip("y/b"), 80, Want::By("y/b")),
            tcp("x/a", pip("y/a"), 80, Want::Blocked),
        ],
        CONVERGE,
    );
}

#[test]
fn replies_through_services_and_hairpin() {
    // x/a: egress to y/local's and y/remote's backends, ingress isolated with no rule: the
    // replies (un-DNATed back to the ClusterIP) must pass. x/c (backend of x/hair): no egress.
    let client = np(
        "client",
        "x",
        &format!(
            "podSelector: {{matchLabels: {{pod: a}}}}\npolicyTypes: [Ingress, Egress]\negress:\n- to:\n  - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: y}}}}\n    podSelector: {{matchExpressions: [{{key: app, operator: In, values: [local, remote]}}]}}\n{WEB_PORTS}"
        ),
    );
    let hair_deny = np(
        "hair",
        "x",
        "podSelector: {matchLabels: {pod: c}}\npolicyTypes: [Egress]",
    );
    let Some(mut c) = with_agents(
        "replies_through_services_and_hairpin",
        &format!("{client}{hair_deny}"),
    ) else {
        return;
    };
    let xa = pip("x/a");
    expect(
        &mut c,
        "replies pass, hairpin denied by the backend's egress",
        &[
            tcp("x/a", LOCAL, 80, Want::BySeeing("y/b", xa)),
            udp("x/a", LOCAL, 80, Want::BySeeing("y/b", xa)),
            tcp("x/a", REMOTE, 80, Want::BySeeing("y/a", xa)),
            udp("x/a", REMOTE, 80, Want::BySeeing("y/a", xa)),
            tcp("x/b", xa, 80, Want::Blocked),
            tcp("x/c", HAIR, 80, Want::Blocked),
            udp("x/c", HAIR, 80, Want::Blocked),
            // x/c still answers others through its Service (replies of allowed connections).
            tcp("y/b", HAIR, 80, Want::By("x/c")),
            udp("y/a", HAIR, 80, Want::By("x/c")),
        ],
        CONVERGE,
    );
    // x/c may reach its own Service's pods, and is ingress isolated: hairpin works (it arrives
    // masqueraded to cni0's address, the node, which ingress always allows), others are denied.
    let hair_allow = np(
        "hair",
        "x",
        "podSelector: {matchLabels: {pod: c}}\npolicyTypes: [Ingress, Egress]\negress:\n- to:\n  - podSelector: {matchLabels: {app: hair}}\n  ports:\n  - {port: 80, protocol: TCP}\n  - {port: 80, protocol: UDP}",
    );
    apply(&c, &format!("{client}{hair_allow}"));
    expect(
        &mut c,
        "hairpin allowed by the backend's egress",
        &[
            tcp("x/c", HAIR, 80, Want::BySeeing("x/c", CNI0_N0)),
            udp("x/c", HAIR, 80, Want::BySeeing("x/c", CNI0_N0)),
            tcp("y/b", HAIR, 80, Want::Blocked),
            tcp("x/c", LOCAL, 80, Want::Blocked),
            tcp("x/a", LOCAL, 80, Want::BySeeing("y/b", xa)),
        ],
        CONVERGE,
    );
}

#[test]
fn nodeport_from_outside_host() {
    // y/b (n0) admits only the outside host; y/a (n1) admits nobody.
    let policies = |b_from: &str, a_ingress: &str| {
        np(
            "b-ingress",
            "y",
            &format!(
                "podSelector: {{matchLabels: {{pod: b}}}}\npolicyTypes: [Ingress]\ningress:\n- from:\n  - ipBlock: {{cidr: {b_from}}}\n  ports:\n  - {{port: 80, protocol: TCP}}"
            ),
        ) + &np(
            "a-ingress",
            "y",
            &format!(
                "podSelector: {{matchLabels: {{pod: a}}}}\npolicyTypes: [Ingress]\n{a_ingress}"
            ),
        )
    };
    let ext =
        |node: Ipv4Addr, port: u16, want: Want| case(Src::External, Proto::Tcp, node, port, want);
    let Some(mut c) = with_agents(
        "nodeport_from_outside_host",
        &policies("198.51.100.100/32", ""),
    ) else {
        return;
    };
    expect(
        &mut c,
        "ipBlock on the outside host",
        &[
            // Local keeps the client address: the ipBlock on it allows.
            ext(NODE0, NP_LOCAL, Want::BySeeing("y/b", EXTERNAL_HOST_IP)),
            // Cluster, backend on the receiving node: SNAT to cni0's address, the backend's own
            // node, always allowed.
            ext(NODE0, NP_CLUSTER, Want::BySeeing("y/b", CNI0_N0)),
            ext(NODE1, NP_REMOTE, Want::BySeeing("y/a", CNI0_N1)),
            // Cluster, backend on the other node: SNAT to the receiving node's flannel.1 address,
            // which the policy does not allow (an ipBlock on the outside host cannot match).
            ext(NODE1, NP_CLUSTER, Want::Blocked),
            ext(NODE0, NP_REMOTE, Want::Blocked),
            tcp("x/a", pip("y/b"), 80, Want::Blocked),
            tcp("x/a", pip("y/a"), 80, Want::Blocked),
        ],
        CONVERGE,
    );
    // ipBlocks on the other node's addresses are what admit Cluster NodePort traffic from it.
    apply(
        &c,
        &policies(
            "10.42.1.0/32",
            "ingress:\n- from:\n  - ipBlock: {cidr: 10.42.0.0/32}",
        ),
    );
    expect(
        &mut c,
        "ipBlocks on node addresses",
        &[
            ext(NODE0, NP_LOCAL, Want::Blocked),
            ext(NODE1, NP_CLUSTER, Want::BySeeing("y/b", FLANNEL_N1)),
            ext(NODE0, NP_REMOTE, Want::BySeeing("y/a", FLANNEL_N0)),
            ext(NODE0, NP_CLUSTER, Want::BySeeing("y/b", CNI0_N0)),
            tcp("x/a", pip("y/a"), 80, Want::Blocked),
        ],
        CONVERGE,
    );
}

#[test]
fn own_node_allowed_other_node_subject_to_policy() {
    let deny = np(
        "deny-ingress",
        "x",
        "podSelector: {}\npolicyTypes: [Ingress]",
    );
    let Some(mut c) = with_agents("own_node_allowed_other_node_subject_to_policy", &deny) else {
        return;
    };
    let (xa, xb) = (pip("x/a"), pip("x/b"));
    let node = |n: usize, addr: Ipv4Addr, port: u16, want: Want| {
        case(Src::Node(n), Proto::Tcp, addr, port, want)
    };
    expect(
        &mut c,
        "default deny ingress in x",
        &[
            node(0, xa, 80, Want::BySeeing("x/a", CNI0_N0)),
            node(1, xb, 80, Want::BySeeing("x/b", CNI0_N1)),
            node(1, xa, 80, Want::Blocked),
            node(0, xb, 80, Want::Blocked),
            // Through a ClusterIP: masqueraded to the node's address on the way to the backend.
            node(0, HAIR, 80, Want::BySeeing("x/c", CNI0_N0)),
            node(1, HAIR, 80, Want::Blocked),
            tcp("y/b", xa, 80, Want::Blocked),
        ],
        CONVERGE,
    );
    // The other node's address is an ordinary peer: an ipBlock admits it.
    let allow = np(
        "from-node1",
        "x",
        "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Ingress]\ningress:\n- from:\n  - ipBlock: {cidr: 10.42.1.0/32}",
    );
    apply(&c, &format!("{deny}{allow}"));
    expect(
        &mut c,
        "ipBlock on node 1's flannel.1 address",
        &[
            node(1, xa, 80, Want::BySeeing("x/a", FLANNEL_N1)),
            node(0, xb, 80, Want::Blocked),
            node(1, HAIR, 80, Want::Blocked),
            tcp("y/b", xa, 80, Want::Blocked),
        ],
        CONVERGE,
    );
}
