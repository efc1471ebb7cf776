//! The realistic mix of the scale ladder: what a multi-tenant cluster looks like, as Kubernetes
//! objects (JSON), so the same cluster feeds the compiler in-process and a real agent through its
//! manifest directory.
//!
//! - `kube-system`: two kube-dns pods behind the `kube-dns` Service (10.43.0.10, fd43::a), port 53.
//! - `monitoring` (label `purpose: monitoring`): two Prometheus pods.
//! - `policies / 5` tenant namespaces `t-<n>` (label `team: team-<n % 20>`), the other pods spread
//!   over them in deployments of 5 replicas (`app`, `tier` of frontend/backend/db/batch,
//!   `pod-template-hash`; named ports `http` 8080 and `metrics` 9090, db pods also `postgres` 5432);
//!   every other deployment has a Service (port 80 -> `http`) and its EndpointSlice: 10% as many
//!   Services as pods. Dual-stack addresses.
//! - Five policies per namespace: default-deny both ways; DNS egress to kube-dns (namespaceSelector +
//!   podSelector, through the Service); the tier rules (matchLabels in, matchExpressions out); the
//!   monitoring namespace by namespaceSelector on the named port `metrics`; and one of: ipBlock
//!   egress with except on 443, ingress from `namespaceSelector: {}` on the named port `http`, or
//!   ingress from the frontends of the namespaces of the same team.
//! - `local_pods` of the pods run on [`NODE`], spread over the namespaces; the rest on 40 others.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::{Value, json};

/// The node the local pods run on.
pub const NODE: &str = "bench-node";

/// Replicas per deployment.
const REPLICAS: usize = 5;
const TIERS: [&str; 4] = ["frontend", "backend", "db", "batch"];

/// Sizes of a generated cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MixSpec {
    pub pods: usize,
    pub policies: usize,
    pub local_pods: usize,
}

/// One tenant pod's place in the mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Its index among all tenant pods (addresses derive from it).
    pub index: usize,
    pub namespace: usize,
    pub deployment: usize,
    pub replica: usize,
}

/// A generated cluster: its objects and what the changes of the ladder need to know.
pub struct Mix {
    pub spec: MixSpec,
    pub namespaces: usize,
}

impl Mix {
    pub fn new(spec: MixSpec) -> Self {
        assert!(spec.pods > 4 + REPLICAS && spec.local_pods >= 1 && spec.policies >= 5);
        Mix {
            spec,
            namespaces: spec.policies / 5,
        }
    }

    /// Tenant pods (all but the four system pods).
    pub fn tenant_pods(&self) -> usize {
        self.spec.pods - 4
    }

    /// Where tenant pod `index` sits: namespaces filled round-robin, deployments of [`REPLICAS`].
    pub fn slot(&self, index: usize) -> Slot {
        let namespace = index % self.namespaces;
        let within = index / self.namespaces;
        Slot {
            index,
            namespace,
            deployment: within / REPLICAS,
            replica: within % REPLICAS,
        }
    }

    /// Whether tenant pod `index` runs on [`NODE`]: every `tenant_pods / local_pods`-th pod.
    pub fn is_local(&self, index: usize) -> bool {
        let stride = (self.tenant_pods() / self.spec.local_pods).max(1);
        index.is_multiple_of(stride) && index / stride < self.spec.local_pods
    }

    /// Every object of the cluster, namespaces first.
    pub fn objects(&self) -> Vec<Value> {
        let mut out = Vec::new();
        self.each_object(|v| out.push(v));
        out
    }

    /// Every object of the cluster, namespaces first, one at a time (no cluster-sized JSON).
    pub fn each_object(&self, mut sink: impl FnMut(Value)) {
        system_objects().into_iter().for_each(&mut sink);
        for n in 0..self.namespaces {
            sink(namespace(
                &tenant_ns(n),
                json!({"team": format!("team-{}", n % 20)}),
            ));
        }
        for index in 0..self.tenant_pods() {
            sink(self.pod(index, 0));
        }
        for (ns, deployment, pods) in self.services() {
            service_objects(ns, deployment, &pods)
                .into_iter()
                .for_each(&mut sink);
        }
        for n in 0..self.namespaces {
            (0..5).for_each(|k| sink(policy(n, k, 0)));
        }
        let extra = self.spec.policies - 5 * self.namespaces;
        for k in 0..extra {
            sink(policy(k % self.namespaces, 5 + k / self.namespaces, 0));
        }
    }

    /// The deployments with a Service: (namespace, deployment, their pods' indices).
    fn services(&self) -> Vec<(usize, usize, Vec<usize>)> {
        let mut by: std::collections::BTreeMap<(usize, usize), Vec<usize>> = Default::default();
        for index in 0..self.tenant_pods() {
            let s = self.slot(index);
            if s.deployment.is_multiple_of(2) {
                by.entry((s.namespace, s.deployment))
                    .or_default()
                    .push(index);
            }
        }
        by.into_iter().map(|((n, d), pods)| (n, d, pods)).collect()
    }

    /// Tenant pod `index`; `revision` > 0 relabels it (a new `tier`, so a new identity and other
    /// policies selecting it).
    pub fn pod(&self, index: usize, revision: usize) -> Value {
        let s = self.slot(index);
        let tier = TIERS[(s.deployment + revision) % TIERS.len()];
        let mut ports = vec![
            json!({"name": "http", "containerPort": 8080, "protocol": "TCP"}),
            json!({"name": "metrics", "containerPort": 9090, "protocol": "TCP"}),
        ];
        if tier == "db" {
            ports.push(json!({"name": "postgres", "containerPort": 5432, "protocol": "TCP"}));
        }
        let node = if self.is_local(index) {
            NODE.to_owned()
        } else {
            format!("node-{}", 1 + index % 40)
        };
        let labels = json!({
            "app": format!("app-{}", s.deployment),
            "tier": tier,
            "pod-template-hash": format!("h{}", s.deployment),
        });
        pod_object(
            &tenant_ns(s.namespace),
            &format!("app-{}-{}", s.deployment, s.replica),
            labels,
            &node,
            pod_ips(index),
            ports,
        )
    }

    /// Policy `k` (0..5) of namespace `n` with its ports moved by `revision` (a policy edit).
    pub fn policy(&self, n: usize, k: usize, revision: u16) -> Value {
        policy(n, k, revision)
    }

    /// The name of tenant pod `index` as (namespace, name).
    pub fn pod_name(&self, index: usize) -> (String, String) {
        let s = self.slot(index);
        (
            tenant_ns(s.namespace),
            format!("app-{}-{}", s.deployment, s.replica),
        )
    }
}

/// The name of tenant namespace `n`.
pub fn tenant_ns(n: usize) -> String {
    format!("t-{n}")
}

/// The addresses of tenant pod `index` (10.42.0.0/16 and fd42::/64 are the pod networks).
pub fn pod_ips(index: usize) -> [IpAddr; 2] {
    let i = index + 16;
    [
        IpAddr::V4(Ipv4Addr::new(
            10,
            42 + (i >> 16) as u8,
            (i >> 8) as u8,
            i as u8,
        )),
        IpAddr::V6(Ipv6Addr::new(
            0xfd42,
            0,
            0,
            0,
            0,
            0,
            (i >> 16) as u16,
            i as u16,
        )),
    ]
}

fn system_pod_ips(k: usize) -> [IpAddr; 2] {
    [
        IpAddr::V4(Ipv4Addr::new(10, 42, 0, 2 + k as u8)),
        IpAddr::V6(Ipv6Addr::new(0xfd42, 0, 0, 0, 0, 0, 0, 2 + k as u16)),
    ]
}

fn system_objects() -> Vec<Value> {
    let mut out = vec![
        namespace("kube-system", json!({})),
        namespace("monitoring", json!({"purpose": "monitoring"})),
    ];
    let dns_ports = vec![
        json!({"name": "dns", "containerPort": 53, "protocol": "UDP"}),
        json!({"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"}),
    ];
    for k in 0..2 {
        let labels = json!({"k8s-app": "kube-dns"});
        out.push(pod_object(
            "kube-system",
            &format!("coredns-{k}"),
            labels,
            "node-1",
            system_pod_ips(k),
            dns_ports.clone(),
        ));
        let labels = json!({"app": "prometheus"});
        out.push(pod_object(
            "monitoring",
            &format!("prometheus-{k}"),
            labels,
            "node-2",
            system_pod_ips(2 + k),
            vec![],
        ));
    }
    let dns: Vec<String> = (0..2)
        .flat_map(system_pod_ips)
        .map(|a| a.to_string())
        .collect();
    out.push(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "kube-system", "name": "kube-dns"},
        "spec": {"clusterIPs": ["10.43.0.10", "fd43::a"], "selector": {"k8s-app": "kube-dns"},
                 "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                           {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}]},
    }));
    for (family, addrs) in [("IPv4", &dns[..2]), ("IPv6", &dns[2..])] {
        out.push(slice(
            "kube-system",
            "kube-dns",
            family,
            addrs,
            json!([
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]),
        ));
    }
    out
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod_object(
    ns: &str,
    name: &str,
    labels: Value,
    node: &str,
    ips: [IpAddr; 2],
    ports: Vec<Value>,
) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "app", "ports": ports}]},
        "status": {"phase": "Running", "podIP": ips[0].to_string(),
                   "podIPs": [{"ip": ips[0].to_string()}, {"ip": ips[1].to_string()}]},
    })
}

/// The Service of a deployment (ClusterIPs from its position) and one EndpointSlice per family.
fn service_objects(n: usize, deployment: usize, pods: &[usize]) -> Vec<Value> {
    let ns = tenant_ns(n);
    let name = format!("app-{deployment}");
    let k = n * 1000 + deployment + 16;
    let v4 = Ipv4Addr::new(10, 43, (k >> 8) as u8, k as u8);
    let v6 = Ipv6Addr::new(0xfd43, 0, 0, 0, 0, 0, (k >> 16) as u16, k as u16);
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"clusterIPs": [v4.to_string(), v6.to_string()],
                 "selector": {"app": name},
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}]},
    });
    let ports = json!([{"name": "http", "port": 8080, "protocol": "TCP"}]);
    let addrs =
        |f: usize| -> Vec<String> { pods.iter().map(|i| pod_ips(*i)[f].to_string()).collect() };
    vec![
        svc,
        slice(&ns, &name, "IPv4", &addrs(0), ports.clone()),
        slice(&ns, &name, "IPv6", &addrs(1), ports),
    ]
}

fn slice(ns: &str, service: &str, family: &str, addrs: &[String], ports: Value) -> Value {
    let endpoints: Vec<Value> = addrs
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": format!("{service}-{}", family.to_lowercase()),
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": family, "endpoints": endpoints, "ports": ports,
    })
}

/// Policy `k` of tenant namespace `n`; `revision` moves its ports (a policy edit).
fn policy(n: usize, k: usize, revision: u16) -> Value {
    let (name, spec) = match k {
        0 => (
            "default-deny",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        ),
        1 => (
            "allow-dns",
            json!({
            "podSelector": {}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]}),
        ),
        2 => (
            "tiers",
            json!({
            "podSelector": {"matchLabels": {"tier": "backend"}}, "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "frontend"}}}],
                         "ports": [{"protocol": "TCP", "port": 8080 + revision}]}],
            "egress": [{"to": [{"podSelector": {"matchExpressions": [
                            {"key": "tier", "operator": "In", "values": ["db", "batch"]}]}}],
                        "ports": [{"protocol": "TCP", "port": 5432}]}]}),
        ),
        3 => (
            "allow-monitoring",
            json!({
            "podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"purpose": "monitoring"}}}],
                         "ports": [{"protocol": "TCP", "port": "metrics"}]}]}),
        ),
        _ => variant(n, k, revision),
    };
    let name = if k < 5 {
        name.to_owned()
    } else {
        format!("{name}-{k}")
    };
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": tenant_ns(n), "name": name}, "spec": spec,
    })
}

/// The fifth policy of a namespace (and any beyond): one of three kinds by namespace.
fn variant(n: usize, k: usize, revision: u16) -> (&'static str, Value) {
    match (n + k) % 3 {
        0 => (
            "egress-internet",
            json!({
            "podSelector": {"matchLabels": {"tier": "frontend"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "169.254.169.254/32"]}},
                               {"ipBlock": {"cidr": "::/0", "except": ["fd00::/8"]}}],
                        "ports": [{"protocol": "TCP", "port": 443 + revision}]}]}),
        ),
        1 => (
            "from-anywhere",
            json!({
            "podSelector": {"matchLabels": {"tier": "frontend"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"namespaceSelector": {}}],
                         "ports": [{"protocol": "TCP", "port": "http"}, {"protocol": "TCP", "port": 8443 + revision}]}]}),
        ),
        _ => (
            "from-team",
            json!({
            "podSelector": {"matchLabels": {"tier": "frontend"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("team-{}", n % 20)}},
                                   "podSelector": {"matchLabels": {"tier": "frontend"}}}],
                         "ports": [{"protocol": "TCP", "port": 8080 + revision}]}]}),
        ),
    }
}
