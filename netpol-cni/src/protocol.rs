//! The wire protocol between the CNI plugin and netpol-agent's control socket
//! (`<state-dir>/agent.sock`), shared by both sides.
//!
//! One request per connection: the client writes one line, `<verb> <one-line JSON>\n`
//! ([`request_line`]), and reads one JSON [`Answer`] until end of file; the agent writes the answer
//! and closes the connection. [`ADD_VERB`] carries an [`EndpointClaim`], [`DEL_VERB`] a [`Forget`].

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Request line verbs on the agent's control socket (`<state-dir>/agent.sock`).
/// `cni-add`: program the endpoint of a new pod ([`EndpointClaim`]), answered once it is
/// programmed ([`Answer::Programmed`]) or when it cannot be ([`Answer::Failed`]).
pub const ADD_VERB: &str = "cni-add";
/// `cni-del`: forget a pod's sandbox ([`Forget`]), answered with [`Answer::Forgotten`].
pub const DEL_VERB: &str = "cni-del";

/// What the plugin knows about a new pod sandbox when it asks the agent to program it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointClaim {
    /// `CNI_CONTAINERID`: the sandbox's container id.
    pub container_id: String,
    /// `K8S_POD_NAMESPACE` from `CNI_ARGS`.
    pub namespace: String,
    /// `K8S_POD_NAME` from `CNI_ARGS`.
    pub name: String,
    /// The pod's addresses: `prevResult.ips[].address` without the prefix length, sorted, without
    /// duplicates.
    pub ips: Vec<IpAddr>,
    /// `CNI_NETNS`: the path of the pod's network namespace.
    pub netns: String,
    /// The names of `prevResult.interfaces` that have no `sandbox`: the host side (the bridge and
    /// the pod's host-side veth).
    pub host_interfaces: Vec<String>,
    /// How long the agent may take before the plugin gives up (milliseconds).
    pub timeout_ms: u64,
}

/// A pod sandbox that is gone (CNI `DEL`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forget {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `K8S_POD_NAMESPACE` from `CNI_ARGS` (empty when the runtime did not pass it).
    pub namespace: String,
    /// `K8S_POD_NAME` from `CNI_ARGS` (empty when the runtime did not pass it).
    pub name: String,
}

/// The agent's answer to a request, tagged by `result`:
/// `{"result":"programmed","ifname":"veth1","ifindex":7}`, `{"result":"forgotten"}`,
/// `{"result":"failed","reason":"..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Answer {
    /// The endpoint is programmed: its policy programs are attached to this host interface.
    Programmed {
        /// Host-side interface the programs are attached to.
        ifname: String,
        /// Its interface index.
        ifindex: u32,
    },
    /// The sandbox is forgotten (also when the agent never knew it).
    Forgotten,
    /// The request cannot be carried out.
    Failed {
        /// Why, for the operator.
        reason: String,
    },
}

/// The request line `"<verb> <one-line json>\n"` for `body`.
///
/// # Panics
///
/// If `body`'s `Serialize` implementation fails, which the types of this module never do.
pub fn request_line(verb: &str, body: &impl Serialize) -> String {
    // JSON from serde_json is a single line: newlines inside strings are escaped.
    let json = serde_json::to_string(body).expect("protocol bodies serialize to JSON");
    format!("{verb} {json}\n")
}

/// Splits a request line into its verb and its JSON body (both trimmed); `None` when the line has
/// no body.
pub fn parse_request(line: &str) -> Option<(&str, &str)> {
    let (verb, json) = line.trim().split_once(' ')?;
    let json = json.trim();
    (!verb.is_empty() && !json.is_empty()).then_some((verb, json))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim() -> EndpointClaim {
        EndpointClaim {
            container_id: "3f1c0a".into(),
            namespace: "shop".into(),
            name: "web-0".into(),
            ips: vec!["10.42.0.12".parse().unwrap(), "fd00:42::c".parse().unwrap()],
            netns: "/var/run/netns/cni-1234".into(),
            host_interfaces: vec!["cni0".into(), "veth0a1b2c3d".into()],
            timeout_ms: 10_000,
        }
    }

    #[test]
    fn claim_round_trips_through_a_request_line() {
        let line = request_line(ADD_VERB, &claim());
        assert!(line.starts_with("cni-add {"), "{line}");
        assert!(line.ends_with("}\n"), "{line}");
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        let (verb, json) = parse_request(&line).unwrap();
        assert_eq!(verb, ADD_VERB);
        assert_eq!(
            serde_json::from_str::<EndpointClaim>(json).unwrap(),
            claim()
        );
    }

    #[test]
    fn forget_round_trips_through_a_request_line() {
        let forget = Forget {
            container_id: "3f1c0a".into(),
            namespace: "shop".into(),
            name: "web\n0".into(),
        };
        let line = request_line(DEL_VERB, &forget);
        assert_eq!(
            line.matches('\n').count(),
            1,
            "newlines in strings are escaped: {line}"
        );
        let (verb, json) = parse_request(&line).unwrap();
        assert_eq!(verb, DEL_VERB);
        assert_eq!(serde_json::from_str::<Forget>(json).unwrap(), forget);
    }

    #[test]
    fn claim_json_uses_the_field_names_of_the_protocol() {
        let json: serde_json::Value = serde_json::to_value(claim()).unwrap();
        assert_eq!(json["container_id"], "3f1c0a");
        assert_eq!(json["ips"], serde_json::json!(["10.42.0.12", "fd00:42::c"]));
        assert_eq!(json["host_interfaces"][1], "veth0a1b2c3d");
        assert_eq!(json["timeout_ms"], 10_000);
    }

    #[test]
    fn answers_have_their_exact_json() {
        let programmed = Answer::Programmed {
            ifname: "veth1".into(),
            ifindex: 7,
        };
        let json = serde_json::to_string(&programmed).unwrap();
        assert_eq!(
            json,
            r#"{"result":"programmed","ifname":"veth1","ifindex":7}"#
        );
        assert_eq!(
            serde_json::to_string(&Answer::Forgotten).unwrap(),
            r#"{"result":"forgotten"}"#
        );
        let failed = Answer::Failed {
            reason: "no pod".into(),
        };
        assert_eq!(
            serde_json::to_string(&failed).unwrap(),
            r#"{"result":"failed","reason":"no pod"}"#
        );
    }

    #[test]
    fn answers_round_trip() {
        for answer in [
            Answer::Programmed {
                ifname: "veth1".into(),
                ifindex: 7,
            },
            Answer::Forgotten,
            Answer::Failed { reason: "x".into() },
        ] {
            let json = serde_json::to_vec(&answer).unwrap();
            assert_eq!(serde_json::from_slice::<Answer>(&json).unwrap(), answer);
        }
    }

    #[test]
    fn an_agent_error_object_is_not_an_answer() {
        // What an agent that does not know the verb answers.
        let old = br#"{"error":"unknown request \"cni-add {}\""}"#;
        assert!(serde_json::from_slice::<Answer>(old).is_err());
    }

    #[test]
    fn parse_request_needs_a_verb_and_a_body() {
        assert_eq!(
            parse_request("cni-del {\"a\":1}\r\n"),
            Some(("cni-del", "{\"a\":1}"))
        );
        assert_eq!(parse_request("status\n"), None);
        assert_eq!(parse_request("cni-add \n"), None);
        assert_eq!(parse_request(""), None);
        assert_eq!(parse_request(" {\"a\":1}"), None, "leading blank: no verb");
    }
}
