//! Services and EndpointSlices, slimmed to what egress policy through a ClusterIP needs: each
//! frontend (virtual IP, protocol, port) and the backends kube-proxy may send it to.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

use crate::model::{ClusterState, ConvertError, Labels, PodKey, Protocol, required_key};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Where a service port sends traffic on a backend pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, resolved on each backend pod.
    Name(String),
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub target: TargetPort,
}

/// A Service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub key: PodKey,
    /// `spec.clusterIPs` (or `spec.clusterIP`); empty for headless services.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `spec.selector`; `None` for services whose endpoints are managed by hand.
    pub selector: Option<Labels>,
}

/// One port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// An EndpointSlice: ready backend addresses of one Service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSlice {
    pub key: PodKey,
    /// The Service it belongs to (same namespace).
    pub service: String,
    /// Addresses of endpoints that are ready (or whose readiness is unknown).
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<SlicePort>,
}

fn protocol(p: Option<&String>, field: &str) -> Result<Protocol, ConvertError> {
    match p {
        None => Ok(Protocol::Tcp),
        Some(s) => Protocol::parse(s)
            .ok_or_else(|| ConvertError::new(field, format!("unknown protocol {s:?}"))),
    }
}

fn port_number(n: i32, field: &str) -> Result<u16, ConvertError> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ConvertError::new(field, format!("{n} is not a port")))
}

fn parse_ip(s: &str, field: &str) -> Result<IpAddr, ConvertError> {
    s.parse()
        .map_err(|_| ConvertError::new(field, format!("{s:?} is not an IP address")))
}

impl Service {
    /// Converts an API object.
    pub fn from_k8s(svc: &core::Service) -> Result<Self, ConvertError> {
        let key = required_key(&svc.metadata)?;
        let spec = svc.spec.clone().unwrap_or_default();
        let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
        if ips.is_empty() {
            ips.extend(spec.cluster_ip.clone());
        }
        let cluster_ips = ips
            .iter()
            .enumerate()
            .filter(|(_, ip)| !ip.is_empty() && *ip != "None")
            .map(|(i, ip)| parse_ip(ip, &format!("spec.clusterIPs[{i}]")))
            .collect::<Result<_, _>>()?;
        let mut ports = Vec::new();
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            let field = |f: &str| format!("spec.ports[{i}].{f}");
            let port = port_number(p.port, &field("port"))?;
            let target = match &p.target_port {
                None => TargetPort::Number(port),
                Some(IntOrString::Int(n)) => {
                    TargetPort::Number(port_number(*n, &field("targetPort"))?)
                }
                Some(IntOrString::String(s)) => match s.parse::<i32>() {
                    Ok(n) => TargetPort::Number(port_number(n, &field("targetPort"))?),
                    Err(_) => TargetPort::Name(s.clone()),
                },
            };
            ports.push(ServicePort {
                name: p.name.clone().unwrap_or_default(),
                protocol: protocol(p.protocol.as_ref(), &field("protocol"))?,
                port,
                target,
            });
        }
        Ok(Service {
            key,
            cluster_ips,
            ports,
            selector: spec.selector.clone().map(|s| s.into_iter().collect()),
        })
    }
}

impl EndpointSlice {
    /// Converts an API object.
    pub fn from_k8s(slice: &discovery::EndpointSlice) -> Result<Self, ConvertError> {
        let key = required_key(&slice.metadata)?;
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned()
            .ok_or_else(|| {
                ConvertError::new(format!("metadata.labels.{SERVICE_NAME_LABEL}"), "missing")
            })?;
        let mut addresses = Vec::new();
        for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
            // Not-ready endpoints get no traffic from kube-proxy; unknown readiness counts as ready.
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for (j, a) in ep.addresses.iter().enumerate() {
                addresses.push(parse_ip(a, &format!("endpoints[{i}].addresses[{j}]"))?);
            }
        }
        let mut ports = Vec::new();
        for (i, p) in slice.ports.iter().flatten().enumerate() {
            let Some(port) = p.port else { continue };
            ports.push(SlicePort {
                name: p.name.clone().unwrap_or_default(),
                protocol: protocol(p.protocol.as_ref(), &format!("ports[{i}].protocol"))?,
                port: port_number(port, &format!("ports[{i}].port"))?,
            });
        }
        Ok(EndpointSlice {
            key,
            service,
            addresses,
            ports,
        })
    }
}

/// One way into a Service: a virtual IP, protocol and port, and where kube-proxy may send it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub service: PodKey,
    pub vip: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
    /// (backend address, backend port) pairs, of the frontend's address family.
    pub backends: Vec<(IpAddr, u16)>,
}

/// Every frontend of every Service with a cluster IP. Backends come from the Service's EndpointSlices
/// when it has any (as kube-proxy uses them), else from its selector over the state's pods.
pub fn frontends(state: &ClusterState) -> Vec<Frontend> {
    let mut slices: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in state.endpoint_slices.values() {
        slices
            .entry((s.key.namespace.as_str(), s.service.as_str()))
            .or_default()
            .push(s);
    }
    let mut out = Vec::new();
    for svc in state.services.values() {
        let svc_slices = slices.get(&(svc.key.namespace.as_str(), svc.key.name.as_str()));
        for sp in &svc.ports {
            let backends: Vec<(IpAddr, u16)> = match svc_slices {
                Some(list) => list
                    .iter()
                    .flat_map(|s| {
                        let port = s
                            .ports
                            .iter()
                            .find(|p| p.name == sp.name && p.protocol == sp.protocol)
                            .map(|p| p.port);
                        s.addresses.iter().filter_map(move |a| Some((*a, port?)))
                    })
                    .collect(),
                None => selector_backends(state, svc, sp),
            };
            for vip in &svc.cluster_ips {
                out.push(Frontend {
                    service: svc.key.clone(),
                    vip: *vip,
                    protocol: sp.protocol,
                    port: sp.port,
                    backends: backends
                        .iter()
                        .copied()
                        .filter(|(a, _)| a.is_ipv4() == vip.is_ipv4())
                        .collect(),
                });
            }
        }
    }
    out
}

fn selector_backends(state: &ClusterState, svc: &Service, sp: &ServicePort) -> Vec<(IpAddr, u16)> {
    let Some(selector) = &svc.selector else {
        return Vec::new();
    };
    state
        .peer_pods()
        .filter(|p| p.key.namespace == svc.key.namespace)
        .filter(|p| selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
        .filter_map(|p| {
            let port = match &sp.target {
                TargetPort::Number(n) => *n,
                TargetPort::Name(name) => p.named_port(name, sp.protocol)?,
            };
            Some(p.ips.iter().map(move |ip| (*ip, port)))
        })
        .flatten()
        .collect()
}
