//! The pure part of the kubectl plugin: its command line, the pods it must locate, the agent pod
//! it picks on each node from `kubectl get -o json`, and the `kubectl exec` it runs there.

use std::collections::BTreeSet;

use clap::{ArgMatches, Args, Command, Parser, Subcommand, parser::ValueSource};
use serde::Deserialize;

use crate::observe::flows::{FlowFilter, args::FlowsArgs};
use crate::verify::cluster::{AGENT_NAMESPACE, AGENT_POD_LABEL};

/// Where the agent's binary is in its image (`cargo xtask image` and `deploy/Containerfile`): the
/// image from scratch has no PATH to search.
pub const AGENT_BINARY: &str = "/usr/local/bin/netpol-agent";
/// The agent's container in the DaemonSet (`deploy/daemonset.yaml`).
pub const AGENT_CONTAINER: &str = "agent";

/// `kubectl netpol`: asks the netpol-agent on the right node, so you never look for its pod.
#[derive(Parser, Debug)]
#[command(name = "kubectl-netpol", bin_name = "kubectl netpol", version)]
pub struct PluginCli {
    #[command(subcommand)]
    pub command: PluginCommand,
}

/// The plugin's subcommands.
#[derive(Subcommand, Debug)]
pub enum PluginCommand {
    /// `netpol-agent flows` on the node of the pods named by --pod, --from or --to (or --node):
    /// the same flags, run in the agent pod there through `kubectl exec`.
    Flows {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        args: FlowsArgs,
    },
}

/// Which cluster and node to ask; the flags kubectl itself takes are passed to every kubectl call.
#[derive(Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct Target {
    /// Ask the agent on this node (instead of the nodes of the pods named).
    #[arg(long)]
    pub node: Vec<String>,
    /// kubeconfig context (kubectl's --context).
    #[arg(long)]
    pub context: Option<String>,
    /// kubeconfig file (kubectl's --kubeconfig).
    #[arg(long)]
    pub kubeconfig: Option<String>,
    /// Namespace of the agent's DaemonSet.
    #[arg(long, default_value = AGENT_NAMESPACE)]
    pub agent_namespace: String,
}

/// The ids of [`Target`]'s flags: they stay with the plugin, the others go to the agent.
const TARGET_IDS: [&str; 4] = ["node", "context", "kubeconfig", "agent_namespace"];

impl Target {
    /// kubectl's own flags for every call: `--context`, `--kubeconfig`.
    pub fn kubectl_flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        if let Some(c) = &self.context {
            flags.push(format!("--context={c}"));
        }
        if let Some(k) = &self.kubeconfig {
            flags.push(format!("--kubeconfig={k}"));
        }
        flags
    }
}

/// The flags of `flows` as the user gave them, in their order (the meaning of `--not` depends on
/// it), without the plugin's own and without those whose ids are in `skip`.
pub fn forwarded(flows: &Command, matches: &ArgMatches, skip: &[&str]) -> Vec<String> {
    let mut given: Vec<(usize, String)> = Vec::new();
    for arg in flows.get_arguments() {
        let id = arg.get_id().as_str();
        let Some(long) = arg.get_long() else { continue };
        if TARGET_IDS.contains(&id) || skip.contains(&id) {
            continue;
        }
        if matches.value_source(id) != Some(ValueSource::CommandLine) {
            continue;
        }
        let takes_value = arg.get_num_args().is_none_or(|n| n.takes_values());
        let indices: Vec<usize> = matches.indices_of(id).into_iter().flatten().collect();
        let raw: Vec<String> = matches
            .get_raw(id)
            .into_iter()
            .flatten()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        for (n, at) in indices.into_iter().enumerate() {
            let flag = match (takes_value, raw.get(n)) {
                (true, Some(v)) => format!("--{long}={v}"),
                _ => format!("--{long}"),
            };
            given.push((at, flag));
        }
    }
    given.sort_unstable();
    given.into_iter().map(|(_, f)| f).collect()
}

/// A pod to locate: namespace (`None`: kubectl's current one) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodRef {
    pub namespace: Option<String>,
    pub name: String,
}

/// The pods whose nodes the filters point at: those given to --pod, --from and --to (not
/// negated, not CIDRs), in the namespace given with -n when the name has none.
pub fn pods_named(include: &FlowFilter) -> Result<Vec<PodRef>, String> {
    let namespace = match include.namespace.as_slice() {
        [] => None,
        [one] => Some(one.clone()),
        _ => None,
    };
    let mut pods = BTreeSet::new();
    for given in include.pod.iter().chain(&include.from).chain(&include.to) {
        if given.contains(':') || given.split('/').next().is_some_and(is_address) {
            continue;
        }
        let pod = match given.split_once('/') {
            Some((ns, name)) => PodRef {
                namespace: Some(ns.to_owned()),
                name: name.to_owned(),
            },
            None if include.namespace.len() > 1 => {
                return Err(format!(
                    "pod {given:?} with several -n: name it as namespace/{given}"
                ));
            }
            None => PodRef {
                namespace: namespace.clone(),
                name: given.clone(),
            },
        };
        pods.insert(pod);
    }
    Ok(pods.into_iter().collect())
}

fn is_address(s: &str) -> bool {
    s.parse::<std::net::IpAddr>().is_ok()
}

/// The parts of a pod that placing it needs.
#[derive(Debug, Deserialize)]
struct PodJson {
    metadata: Meta,
    #[serde(default)]
    spec: Spec,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Debug, Deserialize)]
struct Meta {
    name: String,
    #[serde(default)]
    namespace: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    node_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct PodStatus {
    phase: Option<String>,
    #[serde(default)]
    conditions: Vec<Condition>,
}

#[derive(Debug, Deserialize)]
struct Condition {
    #[serde(rename = "type")]
    kind: String,
    status: String,
}

impl PodJson {
    fn ready(&self) -> bool {
        let ready = |c: &Condition| c.kind == "Ready" && c.status == "True";
        self.status.phase.as_deref() == Some("Running") && self.status.conditions.iter().any(ready)
    }
}

/// The node of the pod in `json` (`kubectl get pod NAME -o json`).
pub fn node_of_pod(json: &str) -> Result<String, String> {
    let pod: PodJson = serde_json::from_str(json).map_err(|e| format!("reading the pod: {e}"))?;
    let who = format!("pod {}/{}", pod.metadata.namespace, pod.metadata.name);
    pod.spec
        .node_name
        .filter(|n| !n.is_empty())
        .ok_or_else(|| format!("{who} is not scheduled on a node yet (no spec.nodeName)"))
}

/// The agent pod on `node` among the agent pods in `json` (`kubectl get pods -l ... -o json`):
/// a Ready one first (during a rolling update the old and new pods may both be there).
pub fn agent_on_node(json: &str, node: &str) -> Result<String, String> {
    #[derive(Deserialize)]
    struct List {
        items: Vec<PodJson>,
    }
    let list: List =
        serde_json::from_str(json).map_err(|e| format!("reading the agent pods: {e}"))?;
    let mut on_node: Vec<&PodJson> = list
        .items
        .iter()
        .filter(|p| p.spec.node_name.as_deref() == Some(node))
        .collect();
    on_node.sort_by_key(|p| !p.ready());
    let Some(pod) = on_node.first() else {
        return Err(format!(
            "no netpol-agent pod on node {node} (label {}={}): is the DaemonSet running there?",
            AGENT_POD_LABEL.0, AGENT_POD_LABEL.1
        ));
    };
    if pod.status.phase.as_deref() != Some("Running") {
        let phase = pod.status.phase.as_deref().unwrap_or("unknown");
        return Err(format!(
            "the netpol-agent pod on node {node}, {}, is {phase}, not Running",
            pod.metadata.name
        ));
    }
    Ok(pod.metadata.name.clone())
}

/// kubectl's arguments to get `pod` as JSON.
pub fn get_pod_args(target: &Target, pod: &PodRef) -> Vec<String> {
    let mut args = target.kubectl_flags();
    if let Some(ns) = &pod.namespace {
        args.push(format!("--namespace={ns}"));
    }
    args.extend([
        "get".into(),
        "pod".into(),
        pod.name.clone(),
        "-o".into(),
        "json".into(),
    ]);
    args
}

/// kubectl's arguments to list the agent pods as JSON.
pub fn get_agents_args(target: &Target) -> Vec<String> {
    let mut args = target.kubectl_flags();
    args.push(format!("--namespace={}", target.agent_namespace));
    args.extend(["get".into(), "pods".into()]);
    args.push(format!(
        "--selector={}={}",
        AGENT_POD_LABEL.0, AGENT_POD_LABEL.1
    ));
    args.extend(["-o".into(), "json".into()]);
    args
}

/// kubectl's arguments to run `netpol-agent flows FORWARDED` in `agent`.
pub fn exec_args(target: &Target, agent: &str, forwarded: &[String]) -> Vec<String> {
    let mut args = target.kubectl_flags();
    args.push(format!("--namespace={}", target.agent_namespace));
    args.extend(["exec".into(), agent.to_owned()]);
    args.extend(["-c".into(), AGENT_CONTAINER.into(), "--".into()]);
    args.extend([AGENT_BINARY.into(), "flows".into()]);
    args.extend(forwarded.iter().cloned());
    args
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, FromArgMatches as _};
    use serde_json::json;

    use super::*;

    /// The plugin's parsed command line and the flags it forwards (skipping `skip`).
    fn parse(argv: &[&str], skip: &[&str]) -> (Target, FlowFilter, Vec<String>) {
        let mut cmd = PluginCli::command();
        cmd.build();
        let matches = cmd
            .clone()
            .try_get_matches_from(std::iter::once("kubectl-netpol").chain(argv.iter().copied()))
            .unwrap_or_else(|e| panic!("{e}"));
        let cli = PluginCli::from_arg_matches(&matches).unwrap();
        let (sub, flows_cmd) = (
            matches.subcommand_matches("flows").unwrap(),
            cmd.find_subcommand("flows").unwrap(),
        );
        let PluginCommand::Flows { target, args } = cli.command;
        let filter = args.filter(sub, 0).unwrap();
        (target, filter.include, forwarded(flows_cmd, sub, skip))
    }

    #[test]
    fn forwards_the_flows_flags_in_order_and_keeps_its_own() {
        let argv = [
            "flows",
            "--context",
            "prod",
            "--pod",
            "shop/web",
            "--not",
            "-l",
            "app=db",
            "-f",
            "-o",
            "jsonl",
            "--since=1h30m",
            "--node",
            "n1",
            "--not",
            "--verdict",
            "allowed",
            "--port",
            "80",
            "--port",
            "443",
        ];
        let (target, _, fwd) = parse(&argv, &[]);
        assert_eq!(target.context.as_deref(), Some("prod"));
        assert_eq!(target.node, ["n1"]);
        assert_eq!(
            fwd,
            [
                "--pod=shop/web",
                "--not",
                "--label=app=db",
                "--follow",
                "--output=jsonl",
                "--since=1h30m",
                "--not",
                "--verdict=allowed",
                "--port=80",
                "--port=443",
            ]
        );
        // The forwarded flags mean the same to the agent's own parser.
        let (_, _, again) = parse(
            &std::iter::once("flows")
                .chain(fwd.iter().map(String::as_str))
                .collect::<Vec<_>>(),
            &["output"],
        );
        assert_eq!(again, [&fwd[..4], &fwd[5..]].concat());
    }

    #[test]
    fn the_pods_to_locate_are_the_named_ones_not_cidrs_or_negated() {
        let (_, include, _) = parse(
            &[
                "flows",
                "-n",
                "shop",
                "--pod",
                "web",
                "--from",
                "10.42.0.0/16",
                "--to",
                "other/db",
                "--not",
                "--pod",
                "hidden",
                "--to",
                "fd00::1",
            ],
            &[],
        );
        let pods = pods_named(&include).unwrap();
        let refs = |ns: &str, name: &str| PodRef {
            namespace: Some(ns.into()),
            name: name.into(),
        };
        assert_eq!(pods, [refs("other", "db"), refs("shop", "web")]);
        let (_, include, _) = parse(&["flows", "--pod", "web"], &[]);
        assert_eq!(
            pods_named(&include).unwrap()[0].namespace,
            None,
            "kubectl's namespace"
        );
        let (_, include, _) = parse(&["flows", "-n", "a", "-n", "b", "--pod", "web"], &[]);
        assert!(pods_named(&include).unwrap_err().contains("namespace/web"));
    }

    fn pod(name: &str, node: Option<&str>, phase: &str, ready: bool) -> serde_json::Value {
        json!({
            "metadata": {"name": name, "namespace": "netpol-system"},
            "spec": {"nodeName": node},
            "status": {"phase": phase, "conditions": [
                {"type": "Ready", "status": if ready { "True" } else { "False" }}
            ]}
        })
    }

    #[test]
    fn finds_the_node_of_a_pod_and_the_ready_agent_on_it() {
        let web = pod("web", Some("n2"), "Running", true).to_string();
        assert_eq!(node_of_pod(&web), Ok("n2".into()));
        let pending = pod("web", None, "Pending", false).to_string();
        assert!(node_of_pod(&pending).unwrap_err().contains("not scheduled"));
        let agents = json!({"items": [
            pod("agent-a", Some("n1"), "Running", true),
            pod("agent-old", Some("n2"), "Running", false),
            pod("agent-new", Some("n2"), "Running", true),
            pod("agent-c", Some("n3"), "Pending", false),
        ]})
        .to_string();
        assert_eq!(agent_on_node(&agents, "n1"), Ok("agent-a".into()));
        assert_eq!(
            agent_on_node(&agents, "n2"),
            Ok("agent-new".into()),
            "Ready first"
        );
        assert!(
            agent_on_node(&agents, "n3")
                .unwrap_err()
                .contains("Pending")
        );
        let none = agent_on_node(&agents, "n9").unwrap_err();
        assert!(none.contains("no netpol-agent pod on node n9"), "{none}");
    }

    #[test]
    fn kubectl_calls_carry_the_cluster_flags_and_exec_the_agent_binary() {
        let target = Target {
            context: Some("prod".into()),
            kubeconfig: Some("/k".into()),
            agent_namespace: AGENT_NAMESPACE.into(),
            ..Target::default()
        };
        let pod = PodRef {
            namespace: Some("shop".into()),
            name: "web".into(),
        };
        assert_eq!(
            get_pod_args(&target, &pod),
            [
                "--context=prod",
                "--kubeconfig=/k",
                "--namespace=shop",
                "get",
                "pod",
                "web",
                "-o",
                "json"
            ]
        );
        assert_eq!(
            get_agents_args(&target)[2..],
            [
                "--namespace=netpol-system",
                "get",
                "pods",
                "--selector=app.kubernetes.io/name=netpol-agent",
                "-o",
                "json"
            ]
        );
        assert_eq!(
            exec_args(&target, "agent-a", &["--pod=shop/web".into()])[2..],
            [
                "--namespace=netpol-system",
                "exec",
                "agent-a",
                "-c",
                "agent",
                "--",
                "/usr/local/bin/netpol-agent",
                "flows",
                "--pod=shop/web"
            ]
        );
    }
}
