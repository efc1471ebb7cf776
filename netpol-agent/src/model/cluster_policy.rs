//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`, network-policy-api v0.2.0): the
//! cluster administrator's policies, in the Admin tier (before NetworkPolicy) or the Baseline tier
//! (after it). The API types as written, with only what the objects need; the compiler validates
//! them (`compiler::tiers`). No crate publishes these types for Rust, hence written here from
//! `apis/v1alpha2/clusternetworkpolicy_types.go`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};

use super::{ConvertError, Origin};

/// The API group and version of the objects this agent reads.
pub const API_VERSION: &str = "policy.networking.k8s.io/v1alpha2";
/// Their kind.
pub const KIND: &str = "ClusterNetworkPolicy";

/// A ClusterNetworkPolicy object as the API serves it (status left out).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicyObject {
    /// Empty in the items of a list from the API (the list names the type).
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: Spec,
}

/// `spec`. Unknown fields are ignored, as the API server's pruning would.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// `Admin` or `Baseline`.
    pub tier: String,
    /// 0 to 1000, lower first.
    pub priority: i64,
    pub subject: Subject,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<Rule>,
}

/// `spec.subject`: exactly one of the two.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
}

/// Pods by namespace selector and pod selector (both must match).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedPod {
    #[serde(default)]
    pub namespace_selector: LabelSelector,
    /// Required by the API: a missing one is an error, not "every pod".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
}

/// An ingress or egress rule (`from` for ingress, `to` for egress).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// `Accept`, `Deny` or `Pass`.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<Peer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<Peer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocols: Option<Vec<ProtocolMatch>>,
}

/// One peer: exactly one field set. `nodes` and `domainNames` (experimental) are read only to be
/// refused by name.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_names: Option<serde_json::Value>,
}

/// One element of `protocols`: exactly one field set.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<ProtocolPorts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<ProtocolPorts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sctp: Option<ProtocolPorts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_named_port: Option<String>,
}

/// `tcp`, `udp` or `sctp`: a destination port, or (without one) every port of the protocol.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolPorts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<Port>,
}

/// A port number or a range: exactly one.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<PortRange>,
}

/// An inclusive port range, `start < end`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct PortRange {
    pub start: i64,
    pub end: i64,
}

/// A ClusterNetworkPolicy in the cluster state.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct ClusterPolicy {
    /// Cluster-scoped: the name alone.
    pub name: String,
    pub origin: Origin,
    pub spec: Spec,
}

impl ClusterPolicy {
    /// Converts an object (one from a manifest must say its `apiVersion`; the items of an API
    /// list need not).
    pub fn from_object(
        object: &ClusterNetworkPolicyObject,
        origin: Origin,
    ) -> Result<Self, ConvertError> {
        let from_api = origin == Origin::Api;
        if !(from_api && object.api_version.is_empty()) && object.api_version != API_VERSION {
            return Err(ConvertError::new(
                "apiVersion",
                format!(
                    "{:?} is not supported (this agent reads {API_VERSION})",
                    object.api_version
                ),
            ));
        }
        let name = object
            .metadata
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ConvertError::new("metadata.name", "missing"))?;
        Ok(ClusterPolicy {
            name,
            origin,
            spec: object.spec.clone(),
        })
    }

    /// What a ClusterNetworkPolicy that does not parse is enforced as: an Admin-tier policy of the
    /// highest precedence that denies every pod all traffic both ways. Its subject could have been
    /// any pod, and a Deny whose peers cannot be read is a Deny of everything (as the API says of
    /// peers it does not know); only the node's own traffic to its pods still passes.
    pub fn stand_in(name: &str, origin: Origin) -> Self {
        let deny_all = |peers: Option<Vec<Peer>>, to: bool| Rule {
            name: "unparsed-deny-all".into(),
            action: "Deny".into(),
            from: if to { None } else { peers.clone() },
            to: if to { peers } else { None },
            protocols: None,
        };
        let everyone = Some(vec![Peer::default()]);
        ClusterPolicy {
            name: name.to_owned(),
            origin,
            spec: Spec {
                tier: "Admin".into(),
                priority: 0,
                subject: Subject {
                    namespaces: Some(LabelSelector::default()),
                    pods: None,
                },
                ingress: vec![deny_all(everyone.clone(), false)],
                egress: vec![deny_all(everyone, true)],
            },
        }
    }
}
