//! A synthetic cluster for the benchmarks: `pods` pods (each with its own labels, so one identity
//! per pod), `policies` NetworkPolicies and `local_pods` pods on this node, built directly as a
//! [`ClusterState`] and compiled by the real compiler.
//!
//! Policy `k` selects local pod `k % local_pods` for ingress and allows one peer pod of the same
//! namespace (every tenth policy: one ipBlock /32 instead) on TCP and UDP port `10000 + k % 20000`.
//! Local pod `j` has endpoint id (ifindex) `j + 1`, so local pod 0 is endpoint 1: the loopback
//! ifindex that `BPF_PROG_TEST_RUN` runs see.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::networking::v1::NetworkPolicySpec;
use netpol_agent::compiler::{self, CompileInput, Compiled};
use netpol_agent::model::{ClusterState, Namespace, Origin, Pod, PodKey, Policy};

/// The node name of the local pods.
pub const NODE: &str = "bench-node";

/// Sizes of a synthetic cluster.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Spec {
    pub pods: usize,
    pub policies: usize,
    pub local_pods: usize,
}

/// A synthetic cluster state and its local endpoints.
pub struct Synthetic {
    pub spec: Spec,
    pub namespaces: usize,
    pub state: ClusterState,
    pub endpoints: BTreeMap<PodKey, u32>,
    /// Port override per policy (policy changes).
    ports: BTreeMap<usize, u16>,
}

impl Synthetic {
    pub fn new(spec: Spec) -> Self {
        assert!(spec.pods >= 2 && spec.local_pods >= 1 && spec.local_pods <= spec.pods);
        let namespaces = (spec.pods / 50).max(1);
        let mut s = Synthetic {
            spec,
            namespaces,
            state: ClusterState::default(),
            endpoints: BTreeMap::new(),
            ports: BTreeMap::new(),
        };
        for n in 0..namespaces {
            let ns = Namespace::implicit(&format!("ns-{n}"));
            s.state.namespaces.insert(ns.name.clone(), ns);
        }
        for i in 0..spec.pods {
            let pod = s.pod(i, None);
            if i < spec.local_pods {
                s.endpoints.insert(pod.key.clone(), i as u32 + 1);
            }
            s.state
                .pods
                .insert(pod.key.clone(), std::sync::Arc::new(pod));
        }
        for k in 0..spec.policies {
            let p = s.policy(k);
            s.state
                .policies
                .insert(p.key.clone(), std::sync::Arc::new(p));
        }
        s
    }

    pub fn ns_of(&self, i: usize) -> usize {
        i % self.namespaces
    }

    pub fn pod_key(&self, i: usize) -> PodKey {
        PodKey::new(format!("ns-{}", self.ns_of(i)), format!("p-{i}"))
    }

    pub fn ip4(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 64 + (i >> 16) as u8, (i >> 8) as u8, i as u8)
    }

    pub fn ip6(i: usize) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, (i >> 16) as u16, i as u16)
    }

    /// The ipBlock address of policy `k` (for policies with `k % 10 == 9`).
    pub fn cidr_addr(k: usize) -> Ipv4Addr {
        Ipv4Addr::new(100, 64 + (k >> 16) as u8, (k >> 8) as u8, k as u8)
    }

    fn pod(&self, i: usize, revision: Option<usize>) -> Pod {
        let mut labels = BTreeMap::new();
        labels.insert("app".to_owned(), format!("a{i}"));
        labels.insert("tier".to_owned(), format!("t{}", i % 7));
        if let Some(r) = revision {
            labels.insert("app".to_owned(), format!("a{i}-r{r}"));
        }
        Pod {
            key: self.pod_key(i),
            labels: std::sync::Arc::new(labels),
            node_name: Some(if i < self.spec.local_pods {
                NODE.to_owned()
            } else {
                format!("node-{}", 1 + i % 40)
            }),
            host_network: false,
            phase: Some("Running".to_owned()),
            ips: vec![IpAddr::V4(Self::ip4(i)), IpAddr::V6(Self::ip6(i))],
            ports: Vec::new(),
        }
    }

    /// The local pod policy `k` selects.
    pub fn target_of(&self, k: usize) -> usize {
        k % self.spec.local_pods
    }

    /// The peer pod policy `k` allows (same namespace as its target, never the target itself).
    pub fn peer_of(&self, k: usize) -> usize {
        let j = self.target_of(k);
        let ns = self.ns_of(j);
        let slots = ((self.spec.pods - ns - 1) / self.namespaces).max(1);
        let i = ns + self.namespaces * (1 + (k / self.spec.local_pods) % slots);
        if i >= self.spec.pods || i == j {
            // Tiny clusters: any other pod of the (single) namespace.
            (j + 1) % self.spec.pods
        } else {
            i
        }
    }

    pub fn port_of(&self, k: usize) -> u16 {
        self.ports
            .get(&k)
            .copied()
            .unwrap_or(10_000 + (k % 20_000) as u16)
    }

    fn policy(&self, k: usize) -> Policy {
        let j = self.target_of(k);
        let from = if k % 10 == 9 {
            serde_json::json!([{"ipBlock": {"cidr": format!("{}/32", Self::cidr_addr(k))}}])
        } else {
            serde_json::json!([{"podSelector": {"matchLabels": {"app": format!("a{}", self.peer_of(k))}}}])
        };
        let port = self.port_of(k);
        let spec: NetworkPolicySpec = serde_json::from_value(serde_json::json!({
            "podSelector": {"matchLabels": {"app": format!("a{j}")}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": from, "ports": [
                {"protocol": "TCP", "port": port}, {"protocol": "UDP", "port": port}]}],
        }))
        .expect("synthetic policy spec");
        Policy {
            key: PodKey::new(format!("ns-{}", self.ns_of(j)), format!("np-{k}")),
            origin: Origin::Api,
            spec,
            mode: None,
        }
    }

    /// A single-policy change: policy `k` now allows port `port`.
    pub fn change_policy(&mut self, k: usize, port: u16) {
        self.ports.insert(k, port);
        let p = self.policy(k);
        self.state
            .policies
            .insert(p.key.clone(), std::sync::Arc::new(p));
    }

    /// A pod label change: pod `i` gets a new `app` label (a new identity; policies that named the
    /// old label stop allowing it).
    pub fn change_pod_labels(&mut self, i: usize, revision: usize) {
        let pod = self.pod(i, Some(revision));
        self.state
            .pods
            .insert(pod.key.clone(), std::sync::Arc::new(pod));
    }

    /// Runs the real compiler.
    pub fn compile(&self) -> Compiled {
        compiler::compile(&CompileInput {
            state: &self.state,
            node_name: NODE,
            endpoints: &self.endpoints,
            host_addrs: &[IpAddr::V4(Ipv4Addr::new(10, 64, 255, 254))],
            links: &BTreeMap::new(),
            pending: &BTreeMap::new(),
            pending_rule: netpol_agent::compiler::PendingRule::Drop,
            exits_guarded: true,
            capacities: Default::default(),
            default_mode: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netpol_common::{Direction, proto};

    #[test]
    fn synthetic_policies_allow_their_peer_only() {
        for spec in [
            Spec {
                pods: 10,
                policies: 10,
                local_pods: 10,
            },
            Spec {
                pods: 1000,
                policies: 300,
                local_pods: 110,
            },
        ] {
            let s = Synthetic::new(spec);
            let c = s.compile();
            assert!(c.errors.is_empty(), "{:?}", c.errors);
            assert_eq!(c.stats.pod_identities, spec.pods);
            let peer = IpAddr::V4(Synthetic::ip4(s.peer_of(0)));
            let port = s.port_of(0);
            assert!(c.allows(1, peer, Direction::Ingress, proto::TCP, port));
            assert!(c.allows(1, peer, Direction::Ingress, proto::UDP, port));
            assert!(!c.allows(1, peer, Direction::Ingress, proto::TCP, 9));
            let peer6 = IpAddr::V6(Synthetic::ip6(s.peer_of(0)));
            assert!(c.allows(1, peer6, Direction::Ingress, proto::TCP, port));
        }
    }
}
