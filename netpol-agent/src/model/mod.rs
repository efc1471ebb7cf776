//! The cluster state the compiler works on: namespaces, pods and NetworkPolicies, slimmed down to
//! what policy needs, whatever source (manifest directory or API) they came from.

pub mod cluster_policy;
pub mod identity;
pub mod mode;
pub mod selector;
pub mod service;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as networking;
use k8s_openapi::api::networking::v1::NetworkPolicySpec;
use serde::{Deserialize, Serialize};

/// The label the API server sets on every namespace to its name; namespace selectors rely on it.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Namespace of a namespaced object that does not name one, as `kubectl apply` does.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Labels of an object.
pub type Labels = BTreeMap<String, String>;

/// The namespace and name of a namespaced object (a pod or a policy).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl PodKey {
    /// A key from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        PodKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Where an object was read from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Origin {
    /// A manifest file: `document` counts YAML documents from 1 (`None`: the file as a whole), `item`
    /// counts `List` items from 0.
    File {
        #[serde(serialize_with = "lossy_path")]
        path: PathBuf,
        document: Option<usize>,
        item: Option<usize>,
    },
    /// The Kubernetes API.
    Api,
}

/// Writes a path that is not UTF-8 with replacement characters rather than failing: an origin only
/// serves messages, and one such file name must not keep the whole state from being saved.
fn lossy_path<S: serde::Serializer>(
    path: &std::path::Path,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&path.to_string_lossy())
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File {
                path,
                document,
                item,
            } => {
                write!(f, "{}", path.display())?;
                if let Some(document) = document {
                    write!(f, " document {document}")?;
                }
                match item {
                    Some(item) => write!(f, " items[{item}]"),
                    None => Ok(()),
                }
            }
            Origin::Api => f.write_str("api"),
        }
    }
}

/// Which object an error is about, as far as it could be told.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ObjectRef {
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.as_deref().unwrap_or("<no kind>"))?;
        match (&self.namespace, &self.name) {
            (Some(ns), Some(name)) => write!(f, " {ns}/{name}"),
            (None, Some(name)) => write!(f, " {name}"),
            (_, None) => Ok(()),
        }
    }
}

/// An input object (or file) that could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{origin}{}{}: {reason}",
    object.as_ref().map(|o| format!(": {o}")).unwrap_or_default(),
    field.as_ref().map(|f| format!(": {f}")).unwrap_or_default())]
pub struct SourceError {
    pub origin: Origin,
    pub object: Option<ObjectRef>,
    /// Path of the offending field inside the object, such as `spec.containers[0].ports`.
    pub field: Option<String>,
    pub reason: String,
}

/// Why a Kubernetes object could not be converted into the model.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConvertError {
    pub field: String,
    pub reason: String,
}

impl ConvertError {
    /// An error at `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConvertError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// IP protocols a NetworkPolicy or a container port can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the Kubernetes spelling (`TCP`, `UDP`, `SCTP`; case-sensitive, as the API is).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => netpol_common::proto::TCP,
            Protocol::Udp => netpol_common::proto::UDP,
            Protocol::Sctp => netpol_common::proto::SCTP,
        }
    }
}

/// A named container port, which policies can refer to by name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// A namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    /// Always includes [`NAMESPACE_NAME_LABEL`].
    pub labels: Labels,
    /// The [`mode::ANNOTATION`], as written: the mode of the namespace's policies that set none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

impl Namespace {
    /// A namespace known only by name: its only label is [`NAMESPACE_NAME_LABEL`].
    pub fn implicit(name: &str) -> Self {
        Namespace {
            name: name.to_owned(),
            labels: namespace_labels(name, Labels::new()),
            mode: None,
        }
    }

    /// Converts an API object.
    pub fn from_k8s(ns: &core::Namespace) -> Result<Self, ConvertError> {
        let name = required_name(&ns.metadata)?;
        let labels = ns.metadata.labels.clone().unwrap_or_default();
        Ok(Namespace {
            labels: namespace_labels(&name, labels),
            name,
            mode: mode::annotation(&ns.metadata),
        })
    }
}

/// The API server always sets the name label, overriding whatever the object says.
fn namespace_labels(name: &str, mut labels: Labels) -> Labels {
    labels.insert(NAMESPACE_NAME_LABEL.to_owned(), name.to_owned());
    labels
}

/// A pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub key: PodKey,
    /// Shared with the pod's identity key, which the compiler keeps for every peer pod.
    pub labels: Arc<Labels>,
    pub node_name: Option<String>,
    pub host_network: bool,
    /// `status.phase`: `Pending`, `Running`, `Succeeded`, `Failed`, `Unknown`.
    pub phase: Option<String>,
    /// Addresses from `status.podIPs`, or `status.podIP` when that is empty.
    pub ips: Vec<IpAddr>,
    /// The containers' named ports.
    pub ports: Vec<NamedPort>,
}

impl Pod {
    /// Whether policies can see the pod as a peer: it has addresses of its own and is not finished.
    /// Host-network pods share the node's addresses, so they cannot be told apart from the node.
    pub fn is_policy_peer(&self) -> bool {
        !self.ips.is_empty() && !self.host_network && !self.is_finished()
    }

    /// Whether the pod can own a veth on `node`: it runs there in a network namespace of its own and
    /// is not finished.
    pub fn can_own_veth_on(&self, node: &str) -> bool {
        self.node_name.as_deref() == Some(node) && !self.host_network && !self.is_finished()
    }

    /// `status.phase` says its containers are done.
    fn is_finished(&self) -> bool {
        matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }

    /// Converts an API object.
    pub fn from_k8s(pod: &core::Pod) -> Result<Self, ConvertError> {
        let key = PodKey::new(namespace_of(&pod.metadata), required_name(&pod.metadata)?);
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips = Vec::new();
        if let Some(pod_ips) = status.and_then(|s| s.pod_ips.as_ref()) {
            for (i, ip) in pod_ips.iter().enumerate() {
                ips.push(parse_ip(&ip.ip, &format!("status.podIPs[{i}].ip"))?);
            }
        }
        if ips.is_empty()
            && let Some(ip) = status.and_then(|s| s.pod_ip.as_ref())
        {
            ips.push(parse_ip(ip, "status.podIP")?);
        }
        let mut ports = Vec::new();
        let containers = spec
            .map(|s| s.containers.as_slice())
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(c, container)| (format!("spec.containers[{c}]"), container));
        // Sidecars (init containers with `restartPolicy: Always`) run beside the others: their
        // ports are the pod's named ports too.
        let sidecars = spec
            .and_then(|s| s.init_containers.as_deref())
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter(|(_, c)| c.restart_policy.as_deref() == Some("Always"))
            .map(|(c, container)| (format!("spec.initContainers[{c}]"), container));
        for (at, container) in containers.chain(sidecars) {
            for (p, port) in container.ports.iter().flatten().enumerate() {
                if let Some(named) = named_port(port, &format!("{at}.ports[{p}]"))? {
                    ports.push(named);
                }
            }
        }
        ports.sort();
        ports.dedup();
        Ok(Pod {
            key,
            labels: Arc::new(pod.metadata.labels.clone().unwrap_or_default()),
            node_name: spec.and_then(|s| s.node_name.clone()),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            phase: status.and_then(|s| s.phase.clone()),
            ips,
            ports,
        })
    }

    /// The port number of the named port `name` for `protocol`, if the pod has one.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        resolve_named_port(&self.ports, name, protocol)
    }
}

/// A container port with a name, checked; `None` for an unnamed one.
fn named_port(port: &core::ContainerPort, field: &str) -> Result<Option<NamedPort>, ConvertError> {
    let Some(name) = &port.name else {
        return Ok(None);
    };
    let protocol = match port.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(s) => Protocol::parse(s).ok_or_else(|| {
            ConvertError::new(
                format!("{field}.protocol"),
                format!("unknown protocol {s:?}"),
            )
        })?,
    };
    let number = u16::try_from(port.container_port)
        .ok()
        .filter(|&n| n != 0)
        .ok_or_else(|| {
            ConvertError::new(
                format!("{field}.containerPort"),
                format!("{} is not a port number", port.container_port),
            )
        })?;
    Ok(Some(NamedPort {
        name: name.clone(),
        protocol,
        port: number,
    }))
}

/// Looks a named port up in a port list: name and protocol must both match.
pub fn resolve_named_port(ports: &[NamedPort], name: &str, protocol: Protocol) -> Option<u16> {
    ports
        .iter()
        .find(|p| p.name == name && p.protocol == protocol)
        .map(|p| p.port)
}

/// A NetworkPolicy, kept as written: the compiler validates the spec and reports errors by field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub key: PodKey,
    pub origin: Origin,
    pub spec: NetworkPolicySpec,
    /// The [`mode::ANNOTATION`], as written (the compiler resolves and checks it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

impl Policy {
    /// Converts an API object. A policy without a spec selects every pod of its namespace and allows
    /// nothing (that is what an all-default spec means), which errs on the closed side.
    pub fn from_k8s(
        policy: &networking::NetworkPolicy,
        origin: Origin,
    ) -> Result<Self, ConvertError> {
        Ok(Policy {
            key: PodKey::new(
                namespace_of(&policy.metadata),
                required_name(&policy.metadata)?,
            ),
            origin,
            spec: policy.spec.clone().unwrap_or_default(),
            mode: mode::annotation(&policy.metadata),
        })
    }
}

/// One object of a kind the model keeps.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Policy(Policy),
    Service(crate::model::service::Service),
    EndpointSlice(crate::model::service::EndpointSlice),
    ClusterPolicy(cluster_policy::ClusterPolicy),
}

impl Object {
    /// The object's kind and name, for messages.
    pub fn object_ref(&self) -> ObjectRef {
        let (kind, namespace, name) = match self {
            Object::Namespace(ns) => ("Namespace", None, &ns.name),
            Object::Pod(pod) => ("Pod", Some(&pod.key.namespace), &pod.key.name),
            Object::Policy(p) => ("NetworkPolicy", Some(&p.key.namespace), &p.key.name),
            Object::Service(svc) => ("Service", Some(&svc.key.namespace), &svc.key.name),
            Object::EndpointSlice(s) => ("EndpointSlice", Some(&s.key.namespace), &s.key.name),
            Object::ClusterPolicy(p) => (cluster_policy::KIND, None, &p.name),
        };
        ObjectRef {
            kind: Some(kind.to_owned()),
            namespace: namespace.cloned(),
            name: Some(name.clone()),
        }
    }
}

/// An object of a kind policy does not need, recorded so that `status` can show it was seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IgnoredObject {
    pub origin: Origin,
    pub object: ObjectRef,
}

/// Everything the compiler needs to know about the cluster.
///
/// The maps keyed by [`PodKey`] serialize as lists of `[key, value]` pairs: JSON object keys must be
/// strings, and a `namespace/name` string could not be split back if a name contained a `/`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    pub namespaces: BTreeMap<String, Namespace>,
    /// Shared with the source's store and earlier states: a new state costs a pointer per pod,
    /// not a copy of it.
    #[serde(with = "pairs")]
    pub pods: BTreeMap<PodKey, Arc<Pod>>,
    /// Shared like the pods: the compiler keeps each as it last parsed it.
    #[serde(with = "pairs")]
    pub policies: BTreeMap<PodKey, Arc<Policy>>,
    #[serde(with = "pairs")]
    pub services: BTreeMap<PodKey, crate::model::service::Service>,
    #[serde(with = "pairs")]
    pub endpoint_slices: BTreeMap<PodKey, crate::model::service::EndpointSlice>,
    /// ClusterNetworkPolicies by name.
    #[serde(default)]
    pub cluster_policies: BTreeMap<String, cluster_policy::ClusterPolicy>,
    /// Objects and files that could not be used.
    pub errors: Vec<SourceError>,
    /// Objects of other kinds.
    pub ignored: Vec<IgnoredObject>,
}

impl ClusterState {
    /// Adds or replaces an object; returns true if one of the same kind and name was replaced.
    pub fn insert(&mut self, object: Object) -> bool {
        match object {
            Object::Namespace(ns) => self.namespaces.insert(ns.name.clone(), ns).is_some(),
            Object::Pod(pod) => self.pods.insert(pod.key.clone(), Arc::new(pod)).is_some(),
            Object::Policy(p) => self.policies.insert(p.key.clone(), Arc::new(p)).is_some(),
            Object::Service(svc) => self.services.insert(svc.key.clone(), svc).is_some(),
            Object::EndpointSlice(s) => self.endpoint_slices.insert(s.key.clone(), s).is_some(),
            Object::ClusterPolicy(p) => self.cluster_policies.insert(p.name.clone(), p).is_some(),
        }
    }

    /// The labels of namespace `name`. A namespace that pods or policies refer to but that is not
    /// known as an object still has the name label, as it would in the API.
    pub fn namespace_labels(&self, name: &str) -> Cow<'_, Labels> {
        match self.namespaces.get(name) {
            Some(ns) => Cow::Borrowed(&ns.labels),
            None => Cow::Owned(Namespace::implicit(name).labels),
        }
    }

    /// The mode of `policy` on a node whose default is `default` ([`mode::resolve`]).
    pub fn policy_mode(&self, policy: &Policy, default: mode::Mode) -> mode::Resolved {
        let namespace = self
            .namespaces
            .get(&policy.key.namespace)
            .and_then(|ns| ns.mode.as_deref());
        mode::resolve(policy.mode.as_deref(), namespace, default)
    }

    /// The pods that policies can see as peers ([`Pod::is_policy_peer`]).
    pub fn peer_pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods
            .values()
            .map(Arc::as_ref)
            .filter(|p| p.is_policy_peer())
    }
}

/// Serde for a map whose keys are not strings, as a list of `[key, value]` pairs.
pub(crate) mod pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        map: &BTreeMap<K, V>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(map)
    }

    pub fn deserialize<'de, K, V, D>(deserializer: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(deserializer)?
            .into_iter()
            .collect())
    }
}

/// The namespace and name of a namespaced object.
pub fn required_key(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<PodKey, ConvertError> {
    Ok(PodKey::new(namespace_of(meta), required_name(meta)?))
}

fn namespace_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.namespace
        .clone()
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned())
}

fn required_name(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<String, ConvertError> {
    meta.name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ConvertError::new("metadata.name", "missing"))
}

fn parse_ip(s: &str, field: &str) -> Result<IpAddr, ConvertError> {
    s.parse()
        .map_err(|_| ConvertError::new(field, format!("{s:?} is not an IP address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_json(extra: serde_json::Value) -> core::Pod {
        let mut v = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 8080},
                {"containerPort": 9090},
                {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]},
        });
        merge(&mut v, extra);
        serde_json::from_value(v).unwrap()
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    #[test]
    fn pod_conversion() {
        let pod = Pod::from_k8s(&pod_json(serde_json::json!({"status": {
            "phase": "Running", "podIP": "10.0.0.1",
            "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]}})))
        .unwrap();
        assert_eq!(pod.key, PodKey::new("default", "p"));
        assert_eq!(pod.key.to_string(), "default/p");
        assert_eq!(pod.node_name.as_deref(), Some("n1"));
        assert_eq!(pod.ips.len(), 2);
        assert_eq!(pod.named_port("http", Protocol::Tcp), Some(8080));
        assert_eq!(pod.named_port("http", Protocol::Udp), None);
        assert_eq!(pod.named_port("dns", Protocol::Udp), Some(53));
        assert_eq!(pod.ports.len(), 2, "unnamed ports are not kept");
        assert!(pod.is_policy_peer());
    }

    #[test]
    fn sidecar_ports_are_named_ports_and_other_init_containers_are_not() {
        let pod = Pod::from_k8s(&pod_json(serde_json::json!({"spec": {"initContainers": [
            {"name": "proxy", "restartPolicy": "Always",
             "ports": [{"name": "admin", "containerPort": 15000}]},
            {"name": "setup", "ports": [{"name": "setup", "containerPort": 9999}]}]}})))
        .unwrap();
        assert_eq!(pod.named_port("admin", Protocol::Tcp), Some(15000));
        assert_eq!(pod.named_port("setup", Protocol::Tcp), None);
        assert_eq!(pod.named_port("http", Protocol::Tcp), Some(8080));
        let bad = Pod::from_k8s(&pod_json(serde_json::json!({"spec": {"initContainers": [
            {"name": "proxy", "restartPolicy": "Always",
             "ports": [{"name": "admin", "containerPort": 0}]}]}})))
        .unwrap_err();
        assert_eq!(bad.field, "spec.initContainers[0].ports[0].containerPort");
    }

    #[test]
    fn pod_ip_fallback_and_peer_rules() {
        let pod = Pod::from_k8s(&pod_json(
            serde_json::json!({"status": {"podIP": "10.0.0.2"}}),
        ))
        .unwrap();
        assert_eq!(pod.ips, vec!["10.0.0.2".parse::<IpAddr>().unwrap()]);
        assert!(pod.is_policy_peer());

        let no_ip = Pod::from_k8s(&pod_json(serde_json::json!({}))).unwrap();
        assert!(!no_ip.is_policy_peer());
        let done = Pod::from_k8s(&pod_json(
            serde_json::json!({"status": {"podIP": "10.0.0.2", "phase": "Succeeded"}}),
        ))
        .unwrap();
        assert!(!done.is_policy_peer());
        let host = Pod::from_k8s(&pod_json(
            serde_json::json!({"spec": {"hostNetwork": true}, "status": {"podIP": "10.0.0.2"}}),
        ))
        .unwrap();
        assert!(!host.is_policy_peer());
    }

    #[test]
    fn pod_bad_ip_names_field() {
        let err = Pod::from_k8s(&pod_json(
            serde_json::json!({"status": {"podIPs": [{"ip": "x"}]}}),
        ))
        .unwrap_err();
        assert_eq!(err.field, "status.podIPs[0].ip");
    }

    #[test]
    fn namespace_name_label_always_set() {
        let ns: core::Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "a", "labels": {"kubernetes.io/metadata.name": "lie", "x": "y"}}}))
        .unwrap();
        let ns = Namespace::from_k8s(&ns).unwrap();
        assert_eq!(ns.labels[NAMESPACE_NAME_LABEL], "a");
        assert_eq!(ns.labels["x"], "y");

        let state = ClusterState::default();
        let labels = state.namespace_labels("missing");
        assert_eq!(labels.len(), 1);
        assert_eq!(labels[NAMESPACE_NAME_LABEL], "missing");
    }

    #[test]
    fn insert_reports_replacement() {
        let mut state = ClusterState::default();
        assert!(!state.insert(Object::Namespace(Namespace::implicit("a"))));
        assert!(state.insert(Object::Namespace(Namespace::implicit("a"))));
    }
}
