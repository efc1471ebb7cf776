use std::io;

use serde_json::json;

use super::*;

/// A fake agent: answers every exchange with `reply` and records what it was sent.
struct Fake {
    reply: fn(&Path, Duration) -> Result<Vec<u8>, AgentError>,
    sent: Vec<(PathBuf, String, Duration)>,
    listening: bool,
}

impl Fake {
    fn answering(answer: Answer) -> Self {
        let mut fake = Self::replying(|_, _| Ok(Vec::new()));
        fake.reply = match answer {
            Answer::Programmed { .. } => |_, _| {
                Ok(br#"{"result":"programmed","ifname":"veth0a1b2c3d","ifindex":9}"#.to_vec())
            },
            Answer::Forgotten => |_, _| Ok(br#"{"result":"forgotten"}"#.to_vec()),
            Answer::Failed { .. } => |_, _| {
                Ok(
                    br#"{"result":"failed","reason":"pod shop/web-0 is not in the API yet"}"#
                        .to_vec(),
                )
            },
        };
        fake
    }

    fn replying(reply: fn(&Path, Duration) -> Result<Vec<u8>, AgentError>) -> Self {
        Self {
            reply,
            sent: Vec::new(),
            listening: true,
        }
    }

    fn missing() -> Self {
        let mut fake = Self::replying(|path, _| {
            Err(AgentError::Missing {
                path: path.to_owned(),
            })
        });
        fake.listening = false;
        fake
    }

    /// The one request line sent, split.
    fn request(&self) -> (String, Value) {
        assert_eq!(self.sent.len(), 1, "{:?}", self.sent);
        let line = &self.sent[0].1;
        assert!(line.ends_with('\n'), "{line:?}");
        let (verb, json) = protocol::parse_request(line).expect("verb and body");
        (
            verb.to_owned(),
            serde_json::from_str(json).expect("JSON body"),
        )
    }
}

impl AgentClient for Fake {
    fn exchange(
        &mut self,
        socket: &Path,
        line: &str,
        timeout: Duration,
    ) -> Result<Vec<u8>, AgentError> {
        self.sent
            .push((socket.to_owned(), line.to_owned(), timeout));
        (self.reply)(socket, timeout)
    }

    fn probe(&mut self, socket: &Path) -> Result<(), AgentError> {
        match self.listening {
            true => Ok(()),
            false => Err(AgentError::Refused {
                path: socket.to_owned(),
            }),
        }
    }
}

/// What the flannel -> bridge -> portmap -> bandwidth chain passes on, as in K3s.
fn prev_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cni0", "mac": "6a:1f:0c:33:90:01"},
            {"name": "veth0a1b2c3d", "mac": "9e:55:21:0b:7c:4d"},
            {"name": "eth0", "mac": "3a:d2:6f:19:8e:02", "sandbox": "/var/run/netns/cni-5d0c1a2b-77e4-4f3c-9a1e-0c2b3d4e5f60"}
        ],
        "ips": [{"address": "10.42.0.12/24", "gateway": "10.42.0.1", "interface": 2}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.42.0.1"}],
        "dns": {}
    })
}

fn conf(extra: Value) -> Vec<u8> {
    let mut conf = json!({
        "cniVersion": "1.0.0",
        "name": "cbr0",
        "type": "netpol-cni",
        "stateDir": "/run/test-agent",
        "timeoutMs": 3000,
        "prevResult": prev_result(),
    });
    for (key, value) in extra.as_object().expect("object") {
        match value {
            Value::Null => conf.as_object_mut().unwrap().remove(key),
            value => conf
                .as_object_mut()
                .unwrap()
                .insert(key.clone(), value.clone()),
        };
    }
    serde_json::to_vec(&conf).unwrap()
}

fn env(command: &str) -> CniEnv {
    CniEnv {
        command: command.into(),
        container_id: "5d0c1a2b77e4".into(),
        netns: "/var/run/netns/cni-5d0c1a2b-77e4-4f3c-9a1e-0c2b3d4e5f60".into(),
        ifname: "eth0".into(),
        args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=5d0c1a2b77e4;K8S_POD_UID=0b1c".into(),
    }
}

fn programmed() -> Fake {
    Fake::answering(Answer::Programmed {
        ifname: String::new(),
        ifindex: 0,
    })
}

fn error_of(outcome: &Outcome) -> CniError {
    assert_eq!(outcome.exit_code, 1, "{outcome:?}");
    assert_eq!(outcome.stdout.matches('\n').count(), 1, "{outcome:?}");
    serde_json::from_str(&outcome.stdout).expect("a CNI error object")
}

#[test]
fn add_passes_prev_result_on_once_programmed() {
    let mut agent = programmed();
    let outcome = run(
        &env("ADD"),
        &conf(json!({"cniVersion": "1.1.0"})),
        &mut agent,
    );
    assert_eq!(outcome.exit_code, 0, "{outcome:?}");
    assert_eq!(outcome.stderr, "");
    let mut expected = prev_result();
    expected["cniVersion"] = json!("1.1.0");
    let printed: Value = serde_json::from_str(&outcome.stdout).unwrap();
    assert_eq!(
        printed, expected,
        "prevResult unchanged but for the version"
    );
    let (verb, claim) = agent.request();
    assert_eq!(verb, protocol::ADD_VERB);
    let claim: EndpointClaim = serde_json::from_value(claim).unwrap();
    assert_eq!(
        claim,
        EndpointClaim {
            container_id: "5d0c1a2b77e4".into(),
            namespace: "shop".into(),
            name: "web-0".into(),
            ips: vec!["10.42.0.12".parse().unwrap()],
            netns: "/var/run/netns/cni-5d0c1a2b-77e4-4f3c-9a1e-0c2b3d4e5f60".into(),
            host_interfaces: vec!["cni0".into(), "veth0a1b2c3d".into()],
            timeout_ms: 3000,
        }
    );
    assert_eq!(agent.sent[0].0, Path::new("/run/test-agent/agent.sock"));
    assert_eq!(agent.sent[0].2, Duration::from_millis(3000));
}

#[test]
fn add_defaults_to_the_agents_state_dir_and_ten_seconds() {
    let mut agent = programmed();
    let stdin = conf(json!({"stateDir": null, "timeoutMs": null}));
    let outcome = run(&env("ADD"), &stdin, &mut agent);
    assert_eq!(outcome.exit_code, 0, "{outcome:?}");
    assert_eq!(
        agent.sent[0].0,
        Path::new("/var/lib/netpol-agent/agent.sock")
    );
    assert_eq!(agent.sent[0].2, Duration::from_secs(10));
    assert_eq!(agent.request().1["timeout_ms"], 10_000);
}

#[test]
fn add_claims_every_address_once_in_order() {
    let mut prev = prev_result();
    prev["ips"] = json!([
        {"address": "fd00:42::c/64", "interface": 2},
        {"address": "10.42.0.12/24", "interface": 2},
        {"address": "10.42.0.12/24", "interface": 2}
    ]);
    let mut agent = programmed();
    let outcome = run(
        &env("ADD"),
        &conf(json!({ "prevResult": prev })),
        &mut agent,
    );
    assert_eq!(outcome.exit_code, 0, "{outcome:?}");
    assert_eq!(
        agent.request().1["ips"],
        json!(["10.42.0.12", "fd00:42::c"])
    );
}

#[test]
fn add_fails_with_try_again_later_when_the_agent_fails() {
    let mut agent = Fake::answering(Answer::Failed {
        reason: String::new(),
    });
    let outcome = run(&env("ADD"), &conf(json!({})), &mut agent);
    let error = error_of(&outcome);
    assert_eq!(error.code, 11);
    assert_eq!(error.cni_version, "1.0.0");
    assert!(error.msg.contains("pod shop/web-0"), "{error:?}");
    assert!(
        error.msg.contains("/run/test-agent/agent.sock"),
        "{error:?}"
    );
    assert!(
        error.msg.contains("is not in the API yet"),
        "the agent's reason: {error:?}"
    );
    assert!(error.details.contains("not started unpoliced"), "{error:?}");
    assert!(error.details.contains("5d0c1a2b77e4"), "{error:?}");
}

#[test]
fn add_fails_with_try_again_later_when_the_agent_is_not_there() {
    let mut agent = Fake::missing();
    let outcome = run(&env("ADD"), &conf(json!({})), &mut agent);
    let error = error_of(&outcome);
    assert_eq!(error.code, 11);
    assert!(error.msg.contains("pod shop/web-0"), "{error:?}");
    assert!(
        error
            .msg
            .contains("no control socket at /run/test-agent/agent.sock"),
        "{error:?}"
    );
    assert!(error.details.contains("not started unpoliced"), "{error:?}");
}

#[test]
fn add_fails_with_try_again_later_when_the_agent_is_too_slow() {
    let mut agent = Fake::replying(|path, timeout| {
        Err(AgentError::Timeout {
            path: path.to_owned(),
            ms: timeout.as_millis() as u64,
        })
    });
    let error = error_of(&run(&env("ADD"), &conf(json!({})), &mut agent));
    assert_eq!(error.code, 11);
    assert!(error.msg.contains("pod shop/web-0"), "{error:?}");
    assert!(
        error
            .msg
            .contains("/run/test-agent/agent.sock within 3000 ms"),
        "{error:?}"
    );
}

#[test]
fn add_fails_when_the_agent_does_not_know_the_verb() {
    let mut agent =
        Fake::replying(|_, _| Ok(br#"{"error":"unknown request \"cni-add {}\""}"#.to_vec()));
    let error = error_of(&run(&env("ADD"), &conf(json!({})), &mut agent));
    assert_eq!(error.code, 11);
    assert!(error.msg.contains("older than this plugin"), "{error:?}");
    assert!(error.msg.contains("unknown request"), "{error:?}");
}

#[test]
fn add_fails_on_an_io_error_or_a_wrong_answer() {
    let mut agent = Fake::replying(|path, _| {
        Err(AgentError::Io {
            path: path.to_owned(),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        })
    });
    let error = error_of(&run(&env("ADD"), &conf(json!({})), &mut agent));
    assert_eq!(error.code, 11);
    assert!(
        error.msg.contains("/run/test-agent/agent.sock"),
        "{error:?}"
    );
    let mut agent = Fake::answering(Answer::Forgotten);
    let error = error_of(&run(&env("ADD"), &conf(json!({})), &mut agent));
    assert_eq!(error.code, 11);
    assert!(error.msg.contains("\"forgotten\""), "{error:?}");
}

#[test]
fn add_only_chains() {
    let mut agent = Fake::missing();
    let error = error_of(&run(
        &env("ADD"),
        &conf(json!({"prevResult": null})),
        &mut agent,
    ));
    assert_eq!(error.code, 7);
    assert!(error.msg.contains("prevResult"), "{error:?}");
    assert!(agent.sent.is_empty());
}

#[test]
fn add_needs_the_pod_name_and_namespace() {
    for (args, missing) in [
        ("IgnoreUnknown=1;K8S_POD_NAME=web-0", "K8S_POD_NAMESPACE"),
        (
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=",
            "K8S_POD_NAME",
        ),
        ("", "K8S_POD_NAMESPACE"),
    ] {
        let mut agent = Fake::missing();
        let env = CniEnv {
            args: args.into(),
            ..env("ADD")
        };
        let error = error_of(&run(&env, &conf(json!({})), &mut agent));
        assert_eq!(error.code, 4, "{args}: {error:?}");
        assert!(error.msg.contains(missing), "{args}: {error:?}");
        assert!(agent.sent.is_empty());
    }
}

#[test]
fn add_needs_the_container_and_its_netns() {
    let mut agent = Fake::missing();
    let no_netns = CniEnv {
        netns: String::new(),
        ..env("ADD")
    };
    let error = error_of(&run(&no_netns, &conf(json!({})), &mut agent));
    assert_eq!(
        (error.code, error.msg.as_str()),
        (4, "CNI_NETNS is not set")
    );
    let no_id = CniEnv {
        container_id: String::new(),
        ..env("ADD")
    };
    let error = error_of(&run(&no_id, &conf(json!({})), &mut agent));
    assert_eq!(
        (error.code, error.msg.as_str()),
        (4, "CNI_CONTAINERID is not set")
    );
}

#[test]
fn add_rejects_an_address_that_is_not_one() {
    let mut prev = prev_result();
    prev["ips"][0]["address"] = json!("10.42.0/24");
    let mut agent = Fake::missing();
    let error = error_of(&run(
        &env("ADD"),
        &conf(json!({ "prevResult": prev })),
        &mut agent,
    ));
    assert_eq!(error.code, 7);
    assert!(error.msg.contains("prevResult.ips[0].address"), "{error:?}");
}

#[test]
fn del_forgets_the_pod() {
    let mut agent = Fake::answering(Answer::Forgotten);
    let outcome = run(&env("DEL"), &conf(json!({})), &mut agent);
    assert_eq!(
        outcome,
        Outcome {
            stdout: String::new(),
            stderr: String::new(),
            exit_code: 0
        }
    );
    let (verb, forget) = agent.request();
    assert_eq!(verb, protocol::DEL_VERB);
    let expected = Forget {
        container_id: "5d0c1a2b77e4".into(),
        namespace: "shop".into(),
        name: "web-0".into(),
    };
    assert_eq!(serde_json::from_value::<Forget>(forget).unwrap(), expected);
    assert_eq!(agent.sent[0].2, Duration::from_secs(2), "bounded by 2 s");
}

#[test]
fn del_succeeds_when_the_agent_is_unreachable() {
    let mut agent = Fake::missing();
    let stdin = conf(json!({"prevResult": null}));
    let outcome = run(&env("DEL"), &stdin, &mut agent);
    assert_eq!(
        (outcome.exit_code, outcome.stdout.as_str()),
        (0, ""),
        "{outcome:?}"
    );
    assert!(outcome.stderr.contains("pod shop/web-0"), "{outcome:?}");
    assert!(
        outcome.stderr.contains("/run/test-agent/agent.sock"),
        "{outcome:?}"
    );
    let mut agent = Fake::answering(Answer::Failed {
        reason: String::new(),
    });
    let no_args = CniEnv {
        args: String::new(),
        netns: String::new(),
        ..env("DEL")
    };
    let outcome = run(&no_args, &stdin, &mut agent);
    assert_eq!(
        (outcome.exit_code, outcome.stdout.as_str()),
        (0, ""),
        "{outcome:?}"
    );
}

#[test]
fn del_waits_less_when_the_configuration_says_so() {
    let mut agent = Fake::answering(Answer::Forgotten);
    run(&env("DEL"), &conf(json!({"timeoutMs": 300})), &mut agent);
    assert_eq!(agent.sent[0].2, Duration::from_millis(300));
}

#[test]
fn check_needs_prev_result() {
    let mut agent = Fake::missing();
    let outcome = run(&env("CHECK"), &conf(json!({})), &mut agent);
    assert_eq!((outcome.exit_code, outcome.stdout.as_str()), (0, ""));
    let error = error_of(&run(
        &env("CHECK"),
        &conf(json!({"prevResult": null})),
        &mut agent,
    ));
    assert_eq!(error.code, 7);
    let old = conf(json!({"cniVersion": "0.3.1"}));
    let error = error_of(&run(&env("CHECK"), &old, &mut agent));
    assert_eq!(error.code, 1, "CHECK came with 0.4.0: {error:?}");
    assert!(agent.sent.is_empty());
}

#[test]
fn status_is_the_agents_socket() {
    let stdin = conf(json!({"cniVersion": "1.1.0", "prevResult": null}));
    let mut agent = Fake::answering(Answer::Forgotten);
    let outcome = run(&env("STATUS"), &stdin, &mut agent);
    assert_eq!((outcome.exit_code, outcome.stdout.as_str()), (0, ""));
    let error = error_of(&run(&env("STATUS"), &stdin, &mut Fake::missing()));
    assert_eq!(error.code, 50);
    assert_eq!(error.cni_version, "1.1.0");
    assert!(
        error.msg.contains("/run/test-agent/agent.sock"),
        "{error:?}"
    );
    let error = error_of(&run(&env("STATUS"), &conf(json!({})), &mut agent));
    assert_eq!(error.code, 1, "STATUS came with 1.1.0: {error:?}");
}

#[test]
fn gc_succeeds() {
    let stdin = conf(json!({"cniVersion": "1.1.0", "cni.dev/valid-attachments": []}));
    let outcome = run(&env("GC"), &stdin, &mut Fake::missing());
    assert_eq!((outcome.exit_code, outcome.stdout.as_str()), (0, ""));
}

#[test]
fn version_lists_the_supported_versions() {
    let outcome = run(
        &env("VERSION"),
        br#"{"cniVersion":"1.0.0"}"#,
        &mut Fake::missing(),
    );
    assert_eq!(outcome.exit_code, 0);
    assert_eq!(
        outcome.stdout,
        "{\"cniVersion\":\"1.1.0\",\"supportedVersions\":[\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\"]}\n"
    );
    let outcome = run(&env("VERSION"), b"", &mut Fake::missing());
    assert_eq!(
        outcome.exit_code, 0,
        "VERSION does not need a configuration"
    );
}

#[test]
fn unsupported_versions_and_bad_input_are_errors() {
    let mut agent = Fake::missing();
    let error = error_of(&run(
        &env("ADD"),
        &conf(json!({"cniVersion": "0.2.0"})),
        &mut agent,
    ));
    assert_eq!((error.code, error.cni_version.as_str()), (1, "1.1.0"));
    let error = error_of(&run(&env("ADD"), b"{not json", &mut agent));
    assert_eq!(error.code, 6);
    let error = error_of(&run(
        &env("ADD"),
        &conf(json!({"timeoutMs": 0})),
        &mut agent,
    ));
    assert_eq!(error.code, 7);
    let error = error_of(&run(&env(""), &conf(json!({})), &mut agent));
    assert_eq!(
        (error.code, error.msg.as_str()),
        (4, "CNI_COMMAND is not set")
    );
    let error = error_of(&run(&env("UP"), &conf(json!({})), &mut agent));
    assert_eq!(error.code, 4);
    assert!(agent.sent.is_empty());
}

#[test]
fn cni_args_are_trimmed_pairs() {
    let args = cni_args("IgnoreUnknown=1; K8S_POD_NAME = web-0 ;junk;;A=b=c");
    assert_eq!(
        args,
        vec![
            ("IgnoreUnknown", "1"),
            ("K8S_POD_NAME", "web-0"),
            ("A", "b=c")
        ]
    );
}

#[test]
fn env_is_read_through_the_lookup() {
    let env = CniEnv::from_vars(|key| (key == "CNI_COMMAND").then(|| "DEL".to_owned()));
    assert_eq!(
        env,
        CniEnv {
            command: "DEL".into(),
            ..CniEnv::default()
        }
    );
}
