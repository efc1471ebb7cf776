//! `deploy/cni/10-flannel-netpol.conflist` is K3s's own Flannel conflist with netpol-cni appended,
//! pointed at the agent's default state directory.

use std::path::{Path, PathBuf};

use netpol_cni::plugin;
use serde_json::{Value, json};

/// K3s's CNI configuration for Flannel on Linux, as written to
/// `<data-dir>/agent/etc/cni/net.d/10-flannel.conflist` when `--flannel-cni-conf` is not given
/// (`cniConf` in k3s-io/k3s `pkg/agent/flannel/setup_linux.go`; earlier releases had it in
/// `setup.go`).
const K3S_CNI_CONF: &str = r#"{
  "name":"cbr0",
  "cniVersion":"1.0.0",
  "plugins":[
    {
      "type":"flannel",
      "delegate":{
        "hairpinMode":true,
        "forceAddress":true,
        "isDefaultGateway":true
      }
    },
    {
      "type":"portmap",
      "capabilities":{
        "portMappings":true
      }
    },
    {
      "type":"bandwidth",
      "capabilities":{
        "bandwidth":true
      }
    }
  ]
}
"#;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(relative: &str) -> String {
    let path = workspace().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn conflist() -> Value {
    let text = read("deploy/cni/10-flannel-netpol.conflist");
    serde_json::from_str(&text).expect("the conflist is JSON")
}

fn plugins(list: &Value) -> &Vec<Value> {
    list["plugins"].as_array().expect("plugins is a list")
}

#[test]
fn netpol_cni_is_appended_last() {
    let list = conflist();
    let last = plugins(&list).last().expect("plugins");
    assert_eq!(
        last,
        &json!({"type": "netpol-cni", "stateDir": "/var/lib/netpol-agent", "timeoutMs": 10000})
    );
    let types: Vec<&str> = plugins(&list)
        .iter()
        .map(|p| p["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        types.iter().filter(|t| **t == "netpol-cni").count(),
        1,
        "{types:?}"
    );
}

#[test]
fn the_rest_is_k3s_chain_unchanged() {
    let list = conflist();
    let k3s: Value = serde_json::from_str(K3S_CNI_CONF).unwrap();
    assert_eq!(list["name"], k3s["name"]);
    assert_eq!(list["cniVersion"], k3s["cniVersion"]);
    let ours = plugins(&list);
    assert_eq!(&ours[..ours.len() - 1], plugins(&k3s).as_slice());
    let keys: Vec<&String> = list.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 3, "only name, cniVersion and plugins: {keys:?}");
}

#[test]
fn the_plugin_version_is_supported() {
    let version = conflist()["cniVersion"].as_str().unwrap_or("").to_owned();
    assert!(
        plugin::SUPPORTED_VERSIONS.contains(&version.as_str()),
        "{version}"
    );
}

/// The `default_value` of the agent's `--state-dir` (the `state_dir` field of its CLI), read from
/// its source: this crate does not depend on the agent.
fn agent_default_state_dir() -> String {
    let main = read("netpol-agent/src/main.rs");
    let field = main
        .find("state_dir: PathBuf")
        .expect("the agent's state_dir argument");
    let before = &main[..field];
    let start = before
        .rfind("default_value = \"")
        .expect("a default_value before state_dir")
        + "default_value = \"".len();
    let len = before[start..].find('"').expect("closing quote");
    before[start..start + len].to_owned()
}

#[test]
fn the_state_dir_is_the_agents_default() {
    let list = conflist();
    let state_dir = plugins(&list).last().unwrap()["stateDir"].clone();
    assert_eq!(state_dir, "/var/lib/netpol-agent");
    assert_eq!(state_dir, plugin::DEFAULT_STATE_DIR);
    assert_eq!(
        state_dir,
        agent_default_state_dir().as_str(),
        "netpol-agent run --state-dir default"
    );
    assert_eq!(
        plugins(&list).last().unwrap()["timeoutMs"],
        plugin::DEFAULT_TIMEOUT_MS
    );
}
