//! kube-proxy (iptables mode) on the simulated cluster, programmed as K3s's embedded kube-proxy does,
//! plus the Service objects the agents read, a CoreDNS-like pod and a host outside the cluster.
//!
//! [`Cluster::enable_kube_proxy`] sets up, in every node netns:
//!
//! * nat `PREROUTING` and `OUTPUT` jump to `KUBE-SERVICES`, nat `POSTROUTING` to `KUBE-POSTROUTING`;
//! * `KUBE-MARK-MASQ`: `-j MARK --or-mark 0x4000`; `KUBE-POSTROUTING`: packets without the mark
//!   return, the mark is cleared (`--xor-mark 0x4000`, other mark bits kept) and the packet
//!   is masqueraded (`MASQUERADE --random-fully`);
//! * per Service port: `KUBE-SERVICES -d <clusterIP>/32 -p <proto> --dport <port> -j KUBE-SVC-*`;
//!   the `KUBE-SVC-*` chain masquerades traffic from outside the cluster CIDR
//!   (`! -s 10.42.0.0/16 ... -j KUBE-MARK-MASQ`, kube-proxy's `--cluster-cidr` rule), then picks a
//!   `KUBE-SEP-*` chain with `-m statistic --mode random --probability 1/(n-i)` (the last one
//!   unconditionally); each `KUBE-SEP-*` marks hairpin traffic (`-s <backend>/32 -j KUBE-MARK-MASQ`)
//!   and DNATs (`-p <proto> -j DNAT --to-destination <ip>:<port>`);
//! * NodePorts: the last rule of `KUBE-SERVICES` is `-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS`
//!   (so every address of the node), `KUBE-NODEPORTS -p <proto> --dport <nodePort> -j KUBE-EXT-*`.
//!   With `externalTrafficPolicy: Cluster`, `KUBE-EXT-*` marks for masquerade and jumps to the
//!   service's `KUBE-SVC-*` (any backend, source becomes the node's address on the way out:
//!   `cni0`'s `10.42.N.1` for a local backend, `flannel.1`'s `10.42.N.0` for a remote one). With
//!   `Local`, pod traffic (`-s 10.42.0.0/16`) goes to `KUBE-SVC-*`, traffic from the node itself
//!   is masqueraded and goes to `KUBE-SVC-*`, everything else goes to `KUBE-SVL-*`, which balances
//!   over the node's own backends only and keeps the client address (a node without local
//!   backends has an empty `KUBE-SVL-*`: the packet reaches the node itself, which resets it;
//!   kube-proxy drops it instead).
//!
//! Backends are the running pods of the cluster ([`Cluster::pods`]) in the Service's namespace whose
//! labels carry its selector, with the target port resolved per pod (a named `targetPort` against the
//! pod's container ports `serve-<port>-<proto>`; a pod without that name is no backend of that
//! port). The rules follow every change: [`Cluster::add_service`], [`Cluster::remove_service`], and
//! pods added, removed or relabelled. Services without backends get no `KUBE-SVC-*` rule (kube-proxy
//! rejects their traffic in the filter table; here it goes where the node routes it).
//!
//! The manifest dir gets `services.yaml`: a `kind: Service` per Service (`type: ClusterIP`, or
//! `NodePort` when a port has a node port, with `externalTrafficPolicy`) and, unless
//! [`Cluster::set_endpoint_slices`] turned them off, the EndpointSlices the endpoint-slice
//! controller would write (`kubernetes.io/service-name`, ready endpoints with `nodeName` and
//! `targetRef`, resolved port numbers; one slice per distinct set of resolved ports).
//!
//! Routing: pods already route everything via `cni0` (`10.42.N.1`), so their packets to a ClusterIP
//! reach the node's IP stack (through `br_netfilter` for bridged frames), are DNATed in nat
//! `PREROUTING` and forwarded. The host outside the cluster is the netns `<prefix>-ext` with `eth0`
//! `198.51.100.100/24` (default route via node 0), joined to node 0's `ext0` (`198.51.100.1/24`). Node 0
//! routes by default to the outside host, node 1 by default via node 0's underlay address, so both
//! nodes reach the outside host and the node's own traffic to a ClusterIP has a route before DNAT
//! (as on a real node with a default route).
//!
//! IPv4 only: Services get an IPv4 ClusterIP from `10.43.0.0/16`; no ip6tables rules.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;

use crate::cluster::{Cluster, Pod, Proto, parse_probe, run_stdin};

/// The service CIDR (K3s's default `--service-cidr`).
pub const SERVICE_CIDR: &str = "10.43.0.0/16";
/// The cluster (pod) CIDR (K3s's default `--cluster-cidr`), kube-proxy's `--cluster-cidr`.
pub const CLUSTER_CIDR: &str = "10.42.0.0/16";
/// ClusterIP of `kube-system/kube-dns` (K3s's `--cluster-dns`).
pub const KUBE_DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 10);
/// The address of the host outside the cluster.
pub const EXTERNAL_HOST_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
/// Node 0's address on the link to the outside host (`ext0`).
pub const EXTERNAL_GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// kube-proxy's masquerade mark.
pub const MASQ_MARK: u32 = 0x4000;
/// Namespace, pod name and node of the CoreDNS-like pod made by [`Cluster::add_coredns`].
pub const COREDNS_POD: &str = "kube-system/coredns";

/// Where a Service port sends traffic on the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    /// A container port name (`serve-81-tcp`...), resolved per backend pod.
    Name(String),
}

impl From<u16> for TargetPort {
    fn from(p: u16) -> Self {
        TargetPort::Number(p)
    }
}

impl From<&str> for TargetPort {
    fn from(s: &str) -> Self {
        TargetPort::Name(s.to_string())
    }
}

/// `spec.externalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrafficPolicy {
    /// Any backend; the client is masqueraded to the node's address.
    Cluster,
    /// Only the receiving node's backends; the client address is kept.
    Local,
}

/// One port of a [`Service`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Proto,
    pub port: u16,
    pub target: TargetPort,
    pub node_port: Option<u16>,
}

/// A Service as the harness programs it (IPv4 ClusterIP, selector-based endpoints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
    pub external_traffic_policy: TrafficPolicy,
}

impl Service {
    /// A ClusterIP Service with no selector and no ports yet.
    pub fn new(namespace: &str, name: &str, cluster_ip: Ipv4Addr) -> Service {
        Service {
            namespace: namespace.to_string(),
            name: name.to_string(),
            cluster_ip,
            selector: BTreeMap::new(),
            ports: Vec::new(),
            external_traffic_policy: TrafficPolicy::Cluster,
        }
    }

    /// Adds `key=value` to the selector.
    pub fn select(mut self, key: &str, value: &str) -> Service {
        self.selector.insert(key.to_string(), value.to_string());
        self
    }

    /// Adds a port.
    pub fn port(
        mut self,
        name: &str,
        protocol: Proto,
        port: u16,
        target: impl Into<TargetPort>,
    ) -> Service {
        self.ports.push(ServicePort {
            name: name.to_string(),
            protocol,
            port,
            target: target.into(),
            node_port: None,
        });
        self
    }

    /// Gives the last added port a node port (the Service becomes `type: NodePort`).
    pub fn node_port(mut self, node_port: u16) -> Service {
        self.ports
            .last_mut()
            .expect("node_port after port")
            .node_port = Some(node_port);
        self
    }

    /// Sets `spec.externalTrafficPolicy`.
    pub fn traffic_policy(mut self, p: TrafficPolicy) -> Service {
        self.external_traffic_policy = p;
        self
    }

    /// `kube-system/kube-dns` as K3s ships it: `10.43.0.10`, selector `k8s-app=kube-dns`, ports
    /// `dns` 53/UDP and `dns-tcp` 53/TCP.
    pub fn kube_dns() -> Service {
        Service::new("kube-system", "kube-dns", KUBE_DNS_IP)
            .select("k8s-app", "kube-dns")
            .port("dns", Proto::Udp, 53, 53)
            .port("dns-tcp", Proto::Tcp, 53, 53)
    }

    /// `"<namespace>/<name>"`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn is_node_port(&self) -> bool {
        self.ports.iter().any(|p| p.node_port.is_some())
    }

    fn port_named(&self, name: &str) -> Result<&ServicePort> {
        self.ports
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| anyhow!("service {} has no port {name:?}", self.id()))
    }
}

/// One endpoint of a Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Pod id (`"ns/name"`).
    pub pod: String,
    pub node: usize,
    pub ip: Ipv4Addr,
    /// The resolved target port.
    pub port: u16,
}

/// The kube-proxy simulation's state, kept in the [`Cluster`].
#[derive(Debug, Clone)]
pub(crate) struct KubeProxy {
    services: Vec<Service>,
    endpoint_slices: bool,
    external_netns: String,
}

/// One probe's outcome, with what a `netpol-probe serve --name` server said.
#[derive(Debug, Clone, Deserialize)]
pub struct ProbeReport {
    pub ok: bool,
    #[serde(default)]
    pub detail: String,
    #[serde(default)]
    pub reply: String,
}

impl ProbeReport {
    /// The pod id of the server that answered (`reply` is `"<ns/pod> at <local> from <peer>"`).
    pub fn answered_by(&self) -> Option<&str> {
        self.reply.split_once(" at ").map(|(who, _)| who)
    }

    /// The port the server answered on (after any DNAT).
    pub fn answered_on(&self) -> Option<u16> {
        let (_, rest) = self.reply.split_once(" at ")?;
        let (local, _) = rest.split_once(" from ")?;
        local.rsplit_once(':')?.1.parse().ok()
    }

    /// The client address the server saw.
    pub fn seen_from(&self) -> Option<IpAddr> {
        let (_, peer) = self.reply.split_once(" from ")?;
        peer.trim()
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|a| a.ip())
    }
}

fn fnv64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// kube-proxy names chains by a hash of what they serve; 16 characters, like its base32 hashes.
fn chain(kind: &str, what: &str) -> String {
    format!("KUBE-{kind}-{:016X}", fnv64(what))
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("string serializes")
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn proto_upper(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "TCP",
        Proto::Udp => "UDP",
    }
}

impl Cluster {
    /// Turns on the kube-proxy simulation (see the module docs): the outside host, routes, the
    /// base chains in every node, and `services.yaml`. Idempotent.
    pub fn enable_kube_proxy(&mut self) -> Result<()> {
        if self.kube_proxy.is_some() {
            return Ok(());
        }
        let ext = format!("{}-ext", self.prefix);
        self.netns.push(ext.clone());
        run(Command::new("ip").args(["netns", "add", &ext]))?;
        let n0 = self.nodes[0].name.clone();
        let n1 = self.nodes[1].name.clone();
        run(Command::new("ip").args([
            "-n", &n0, "link", "add", "ext0", "type", "veth", "peer", "name", "eth0", "netns", &ext,
        ]))?;
        let cmds: Vec<(String, Vec<String>)> = vec![
            (ext.clone(), vec!["link set lo up".into()]),
            (
                ext.clone(),
                vec![format!("addr add {EXTERNAL_HOST_IP}/24 dev eth0")],
            ),
            (ext.clone(), vec!["link set eth0 up".into()]),
            (
                ext.clone(),
                vec![format!("route add default via {EXTERNAL_GATEWAY_IP}")],
            ),
            (
                n0.clone(),
                vec![format!("addr add {EXTERNAL_GATEWAY_IP}/24 dev ext0")],
            ),
            (n0.clone(), vec!["link set ext0 up".into()]),
            (
                n0.clone(),
                vec![format!("route add default via {EXTERNAL_HOST_IP}")],
            ),
            (
                n1.clone(),
                vec![format!(
                    "route add default via {}",
                    self.nodes[0].underlay_v4
                )],
            ),
        ];
        for (ns, args) in cmds {
            for a in args {
                run(Command::new("ip")
                    .args(["-n", &ns])
                    .args(a.split_whitespace()))
                .with_context(|| format!("in {ns}"))?;
            }
        }
        for n in &self.nodes {
            // The jumps into kube-proxy's chains, once; the chains themselves are (re)written on
            // every sync.
            let base = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n\
                -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
                -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
                -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
                COMMIT\n";
            run_stdin(
                Command::new("ip").args([
                    "netns",
                    "exec",
                    &n.name,
                    "iptables-restore",
                    "--noflush",
                ]),
                base,
            )
            .with_context(|| format!("kube-proxy base chains on {}", n.name))?;
        }
        self.kube_proxy = Some(KubeProxy {
            services: Vec::new(),
            endpoint_slices: true,
            external_netns: ext,
        });
        self.sync_kube_proxy()
    }

    /// Adds (or replaces, by namespace/name) a Service: rules on every node and `services.yaml`.
    /// Turns the kube-proxy simulation on if needed.
    pub fn add_service(&mut self, svc: Service) -> Result<()> {
        self.enable_kube_proxy()?;
        let kp = self.kube_proxy.as_mut().expect("enabled");
        if let Some(other) = kp
            .services
            .iter()
            .find(|s| s.cluster_ip == svc.cluster_ip && s.id() != svc.id())
        {
            bail!("{} already has ClusterIP {}", other.id(), svc.cluster_ip);
        }
        kp.services.retain(|s| s.id() != svc.id());
        kp.services.push(svc);
        self.sync_kube_proxy()
    }

    /// Removes Service `namespace/name` (its rules and objects).
    pub fn remove_service(&mut self, namespace: &str, name: &str) -> Result<()> {
        let kp = self
            .kube_proxy
            .as_mut()
            .ok_or_else(|| anyhow!("kube-proxy simulation is off"))?;
        let before = kp.services.len();
        kp.services
            .retain(|s| !(s.namespace == namespace && s.name == name));
        if kp.services.len() == before {
            bail!("no service {namespace}/{name}");
        }
        self.sync_kube_proxy()
    }

    /// The Services programmed so far.
    pub fn services(&self) -> &[Service] {
        self.kube_proxy
            .as_ref()
            .map(|k| k.services.as_slice())
            .unwrap_or_default()
    }

    /// Service `"ns/name"`.
    pub fn service(&self, id: &str) -> &Service {
        self.services()
            .iter()
            .find(|s| s.id() == id)
            .unwrap_or_else(|| panic!("no service {id}"))
    }

    /// Whether `services.yaml` carries EndpointSlices (default: yes, as in a real cluster). Without
    /// them the agent derives backends from the Service selector and target port.
    pub fn set_endpoint_slices(&mut self, on: bool) -> Result<()> {
        self.enable_kube_proxy()?;
        self.kube_proxy.as_mut().expect("enabled").endpoint_slices = on;
        self.sync_kube_proxy()
    }

    /// The network namespace of the host outside the cluster (after [`Cluster::enable_kube_proxy`]).
    pub fn external_host(&self) -> Option<&str> {
        self.kube_proxy.as_ref().map(|k| k.external_netns.as_str())
    }

    /// The endpoints of port `port_name` of Service `id` (`"ns/name"`), in kube-proxy's order.
    pub fn service_backends(&self, id: &str, port_name: &str) -> Vec<Backend> {
        let svc = self.service(id);
        let sp = svc.port_named(port_name).unwrap_or_else(|e| panic!("{e}"));
        self.backends(svc, sp)
    }

    fn backends(&self, svc: &Service, sp: &ServicePort) -> Vec<Backend> {
        let mut out: Vec<Backend> = self
            .pods
            .iter()
            .filter(|p| p.namespace == svc.namespace)
            .filter(|p| {
                !svc.selector.is_empty()
                    && svc.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
            })
            .filter_map(|p| {
                let ports = self.pod_ports(&p.id());
                let port = match &sp.target {
                    TargetPort::Number(n) => *n,
                    TargetPort::Name(name) => *ports
                        .iter()
                        .find(|port| *name == format!("serve-{port}-{}", sp.protocol.as_str()))?,
                };
                Some(Backend {
                    pod: p.id(),
                    node: p.node,
                    ip: p.ipv4,
                    port,
                })
            })
            .collect();
        out.sort_by_key(|b| (b.ip, b.port));
        out
    }

    /// The `iptables-restore --noflush` input that programs node `node`'s kube-proxy chains.
    pub fn kube_proxy_rules(&self, node: usize) -> String {
        let mut chains: BTreeSet<String> = ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING"]
            .into_iter()
            .chain(["KUBE-MARK-MASQ"])
            .map(String::from)
            .collect();
        let mut rules = String::new();
        let r = &mut rules;
        let _ = writeln!(r, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK:#x}");
        let _ = writeln!(
            r,
            "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK:#x}/{MASQ_MARK:#x} -j RETURN"
        );
        let _ = writeln!(r, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK:#x}");
        let _ = writeln!(
            r,
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
        );
        let mut nodeports = String::new();
        for svc in self.services() {
            for sp in &svc.ports {
                let what = format!("{}:{}", svc.id(), sp.name);
                let proto = sp.protocol.as_str();
                let backends = self.backends(svc, sp);
                if backends.is_empty() {
                    continue;
                }
                let svc_chain = chain("SVC", &format!("{what}/{proto}"));
                chains.insert(svc_chain.clone());
                let _ = writeln!(
                    r,
                    "-A KUBE-SERVICES -d {}/32 -p {proto} -m comment --comment \"{what} cluster IP\" -m {proto} --dport {} -j {svc_chain}",
                    svc.cluster_ip, sp.port
                );
                let _ = writeln!(
                    r,
                    "-A {svc_chain} ! -s {CLUSTER_CIDR} -d {}/32 -p {proto} -m comment --comment \"{what} cluster IP\" -m {proto} --dport {} -j KUBE-MARK-MASQ",
                    svc.cluster_ip, sp.port
                );
                let seps: Vec<(String, &Backend)> = backends
                    .iter()
                    .map(|b| {
                        (
                            chain("SEP", &format!("{what}/{proto}/{}:{}", b.ip, b.port)),
                            b,
                        )
                    })
                    .collect();
                balance(r, &svc_chain, &what, &seps);
                for (sep, b) in &seps {
                    chains.insert(sep.clone());
                    let _ = writeln!(
                        r,
                        "-A {sep} -s {}/32 -m comment --comment \"{what}\" -j KUBE-MARK-MASQ",
                        b.ip
                    );
                    let _ = writeln!(
                        r,
                        "-A {sep} -p {proto} -m comment --comment \"{what}\" -m {proto} -j DNAT --to-destination {}:{}",
                        b.ip, b.port
                    );
                }
                let Some(np) = sp.node_port else { continue };
                let ext_chain = chain("EXT", &format!("{what}/{proto}"));
                chains.insert(ext_chain.clone());
                let _ = writeln!(
                    nodeports,
                    "-A KUBE-NODEPORTS -p {proto} -m comment --comment \"{what}\" -m {proto} --dport {np} -j {ext_chain}"
                );
                match svc.external_traffic_policy {
                    TrafficPolicy::Cluster => {
                        let _ = writeln!(
                            r,
                            "-A {ext_chain} -m comment --comment \"masquerade traffic for {what} external destinations\" -j KUBE-MARK-MASQ"
                        );
                        let _ = writeln!(r, "-A {ext_chain} -j {svc_chain}");
                    }
                    TrafficPolicy::Local => {
                        let svl_chain = chain("SVL", &format!("{what}/{proto}"));
                        chains.insert(svl_chain.clone());
                        let _ = writeln!(
                            r,
                            "-A {ext_chain} -s {CLUSTER_CIDR} -m comment --comment \"pod traffic for {what} external destinations\" -j {svc_chain}"
                        );
                        let _ = writeln!(
                            r,
                            "-A {ext_chain} -m comment --comment \"masquerade LOCAL traffic for {what} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"
                        );
                        let _ = writeln!(
                            r,
                            "-A {ext_chain} -m comment --comment \"route LOCAL traffic for {what} external destinations\" -m addrtype --src-type LOCAL -j {svc_chain}"
                        );
                        let _ = writeln!(r, "-A {ext_chain} -j {svl_chain}");
                        let local: Vec<(String, &Backend)> = seps
                            .iter()
                            .filter(|(_, b)| b.node == node)
                            .cloned()
                            .collect();
                        balance(r, &svl_chain, &what, &local);
                    }
                }
            }
        }
        rules.push_str(&nodeports);
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
        );
        let mut out = String::from("*nat\n");
        for c in &chains {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        out.push_str(&rules);
        out.push_str("COMMIT\n");
        out
    }

    /// Rewrites `services.yaml` and every node's kube-proxy chains from the current Services and
    /// pods. A no-op while the simulation is off.
    pub(crate) fn sync_kube_proxy(&self) -> Result<()> {
        let Some(kp) = &self.kube_proxy else {
            return Ok(());
        };
        for (i, n) in self.nodes.iter().enumerate() {
            let mut input = self.kube_proxy_rules(i);
            // Service chains no longer wanted: flush and delete them after the new rules are in.
            let current = run(Command::new("ip").args([
                "netns", "exec", &n.name, "iptables", "-w", "-t", "nat", "-S",
            ]))?;
            let stale: Vec<&str> = current
                .lines()
                .filter_map(|l| l.strip_prefix("-N "))
                .filter(|c| {
                    ["KUBE-SVC-", "KUBE-SEP-", "KUBE-EXT-", "KUBE-SVL-"]
                        .iter()
                        .any(|p| c.starts_with(p))
                })
                .filter(|c| !input.contains(&format!(":{c} ")))
                .collect();
            if !stale.is_empty() {
                input.truncate(input.len() - "COMMIT\n".len());
                let mut tail = String::new();
                for c in &stale {
                    let _ = writeln!(input, ":{c} - [0:0]");
                    let _ = writeln!(tail, "-X {c}");
                }
                input.push_str(&tail);
                input.push_str("COMMIT\n");
            }
            run_stdin(
                Command::new("ip").args([
                    "netns",
                    "exec",
                    &n.name,
                    "iptables-restore",
                    "-w",
                    "--noflush",
                ]),
                &input,
            )
            .with_context(|| format!("kube-proxy rules on {}", n.name))?;
        }
        let yaml = self.services_yaml(kp.endpoint_slices);
        let path = self.manifest_dir.join("services.yaml");
        let tmp = self.manifest_dir.join(".services.yaml.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// The `kind: Service` (and EndpointSlice) objects of the programmed Services.
    pub fn services_yaml(&self, endpoint_slices: bool) -> String {
        let mut y = String::new();
        for svc in self.services() {
            y.push_str("---\napiVersion: v1\nkind: Service\nmetadata:\n");
            let _ = writeln!(y, "  name: {}", yaml_str(&svc.name));
            let _ = writeln!(y, "  namespace: {}", yaml_str(&svc.namespace));
            let _ = writeln!(
                y,
                "  uid: {}",
                yaml_str(&format!(
                    "{:016x}-0000-4000-8000-00000000aaaa",
                    fnv64(&format!("{}/svc/{}", self.prefix, svc.id()))
                ))
            );
            y.push_str("spec:\n");
            let ty = if svc.is_node_port() {
                "NodePort"
            } else {
                "ClusterIP"
            };
            let _ = writeln!(y, "  type: {ty}");
            let _ = writeln!(y, "  clusterIP: {}", yaml_str(&svc.cluster_ip.to_string()));
            let _ = writeln!(
                y,
                "  clusterIPs: [{}]",
                yaml_str(&svc.cluster_ip.to_string())
            );
            y.push_str("  ipFamilies: [IPv4]\n  ipFamilyPolicy: SingleStack\n");
            if svc.is_node_port() {
                let p = match svc.external_traffic_policy {
                    TrafficPolicy::Cluster => "Cluster",
                    TrafficPolicy::Local => "Local",
                };
                let _ = writeln!(y, "  externalTrafficPolicy: {p}");
            }
            if !svc.selector.is_empty() {
                y.push_str("  selector:\n");
                for (k, v) in &svc.selector {
                    let _ = writeln!(y, "    {}: {}", yaml_str(k), yaml_str(v));
                }
            }
            y.push_str("  ports:\n");
            for sp in &svc.ports {
                let _ = writeln!(y, "  - name: {}", yaml_str(&sp.name));
                let _ = writeln!(y, "    protocol: {}", proto_upper(sp.protocol));
                let _ = writeln!(y, "    port: {}", sp.port);
                match &sp.target {
                    TargetPort::Number(n) => {
                        let _ = writeln!(y, "    targetPort: {n}");
                    }
                    TargetPort::Name(n) => {
                        let _ = writeln!(y, "    targetPort: {}", yaml_str(n));
                    }
                }
                if let Some(np) = sp.node_port {
                    let _ = writeln!(y, "    nodePort: {np}");
                }
            }
            if endpoint_slices {
                self.push_slices(&mut y, svc);
            }
        }
        y
    }

    fn push_slices(&self, y: &mut String, svc: &Service) {
        // Pod id -> resolved port per service port (None: the pod lacks a named port).
        let mut per_pod: BTreeMap<String, Vec<Option<u16>>> = BTreeMap::new();
        for (i, sp) in svc.ports.iter().enumerate() {
            for b in self.backends(svc, sp) {
                per_pod
                    .entry(b.pod)
                    .or_insert_with(|| vec![None; svc.ports.len()])[i] = Some(b.port);
            }
        }
        let mut groups: BTreeMap<Vec<Option<u16>>, Vec<&Pod>> = BTreeMap::new();
        for (id, ports) in per_pod {
            groups.entry(ports).or_default().push(self.pod(&id));
        }
        for (ports, pods) in groups {
            y.push_str("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n");
            let _ = writeln!(
                y,
                "  name: {}",
                yaml_str(&format!(
                    "{}-{:05x}",
                    svc.name,
                    fnv64(&format!("{ports:?}")) & 0xfffff
                ))
            );
            let _ = writeln!(y, "  namespace: {}", yaml_str(&svc.namespace));
            y.push_str("  labels:\n");
            let _ = writeln!(y, "    kubernetes.io/service-name: {}", yaml_str(&svc.name));
            y.push_str(
                "    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io\n",
            );
            y.push_str("addressType: IPv4\nendpoints:\n");
            for p in pods {
                let _ = writeln!(y, "- addresses: [{}]", yaml_str(&p.ipv4.to_string()));
                y.push_str("  conditions: {ready: true, serving: true, terminating: false}\n");
                let _ = writeln!(y, "  nodeName: {}", yaml_str(&self.nodes[p.node].name));
                let _ = writeln!(
                    y,
                    "  targetRef: {{kind: Pod, namespace: {}, name: {}, uid: {}}}",
                    yaml_str(&p.namespace),
                    yaml_str(&p.name),
                    yaml_str(&p.uid)
                );
            }
            y.push_str("ports:\n");
            for (sp, port) in svc.ports.iter().zip(&ports) {
                let Some(port) = port else { continue };
                let _ = writeln!(y, "- name: {}", yaml_str(&sp.name));
                let _ = writeln!(y, "  protocol: {}", proto_upper(sp.protocol));
                let _ = writeln!(y, "  port: {port}");
            }
        }
    }

    /// CoreDNS as K3s runs it, simplified: namespace `kube-system` (if missing), pod
    /// `kube-system/coredns` labelled `k8s-app=kube-dns` on node `node` serving UDP and TCP 53 (and
    /// 80, 81 like every pod, so the reachability matrices stay uniform), and the `kube-dns` Service
    /// at `10.43.0.10` ([`Service::kube_dns`]).
    pub fn add_coredns(&mut self, node: usize) -> Result<Pod> {
        if !self.namespaces.iter().any(|n| n.name == "kube-system") {
            self.add_namespace("kube-system", &[])?;
        }
        let pod = self.add_pod_with(
            "kube-system",
            "coredns",
            node,
            &[("k8s-app", "kube-dns"), ("pod", "coredns")],
            &[53, 80, 81],
        )?;
        self.add_service(Service::kube_dns())?;
        Ok(pod)
    }

    /// Probes `targets` (`"tcp/ADDR/PORT"`, `"udp/ADDR/PORT"`) from network namespace `netns`
    /// concurrently, with [`Cluster::probe_timeout`] each; reports who answered.
    pub fn probe_from(&self, netns: &str, targets: &[String]) -> Result<Vec<ProbeReport>> {
        let out = self
            .probe_cmd(netns, targets)
            .output()
            .with_context(|| format!("running probe in {netns}"))?;
        parse_probe(out, targets.len())
    }

    /// One probe from pod `from` (`"ns/name"`) to `addr:port`.
    pub fn probe_pod(
        &self,
        from: &str,
        proto: Proto,
        addr: impl Into<IpAddr>,
        port: u16,
    ) -> Result<ProbeReport> {
        let t = format!("{}/{}/{port}", proto.as_str(), addr.into());
        Ok(self.probe_from(&self.pod(from).netns, &[t])?.remove(0))
    }

    /// One probe from the host outside the cluster to `addr:port`.
    pub fn probe_external(
        &self,
        proto: Proto,
        addr: impl Into<IpAddr>,
        port: u16,
    ) -> Result<ProbeReport> {
        let ns = self
            .external_host()
            .ok_or_else(|| anyhow!("no outside host: enable_kube_proxy first"))?;
        let t = format!("{}/{}/{port}", proto.as_str(), addr.into());
        Ok(self.probe_from(ns, &[t])?.remove(0))
    }

    /// One probe from node `node`'s own netns to `addr:port`.
    pub fn probe_node(
        &self,
        node: usize,
        proto: Proto,
        addr: impl Into<IpAddr>,
        port: u16,
    ) -> Result<ProbeReport> {
        let t = format!("{}/{}/{port}", proto.as_str(), addr.into());
        Ok(self.probe_from(&self.nodes[node].name, &[t])?.remove(0))
    }
}

/// kube-proxy's load balancing: `-m statistic --mode random --probability 1/(n-i)` for all but
/// the last endpoint.
fn balance(r: &mut String, from: &str, what: &str, seps: &[(String, &Backend)]) {
    let n = seps.len();
    for (i, (sep, b)) in seps.iter().enumerate() {
        let stat = if i + 1 < n {
            format!(
                " -m statistic --mode random --probability {:.11}",
                1.0 / (n - i) as f64
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            r,
            "-A {from} -m comment --comment \"{what} -> {}:{}\"{stat} -j {sep}",
            b.ip, b.port
        );
    }
}
