//! `kubectl netpol`: the binary, installed (or linked) as `kubectl-netpol` on the PATH, is a kubectl
//! plugin. `kubectl netpol flows --pod shop/web` finds the node of `shop/web`, the netpol-agent pod
//! on that node, and runs `netpol-agent flows --pod shop/web` there with `kubectl exec`, so nobody
//! has to look for the right agent pod. Pods on several nodes: each agent is asked and the flows
//! are merged (not with `--follow`, which follows one node).
//!
//! kubectl is found on the PATH, or at `$KUBECTL`.

pub mod plan;

use std::{
    collections::BTreeSet,
    ffi::OsString,
    process::{Command, ExitCode, Stdio},
};

use anyhow::Context as _;
use clap::{CommandFactory as _, FromArgMatches as _};

use self::plan::{PluginCli, PluginCommand, Target};
use crate::observe::flows::{Flow, args::FlowsArgs, render};

/// Whether the program was started under the plugin's name (`kubectl-netpol`).
pub fn invoked_as_plugin(argv0: Option<&OsString>) -> bool {
    argv0
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|name| name == "kubectl-netpol")
}

/// Runs the plugin with `argv` (the program's name first).
pub fn main(argv: Vec<OsString>) -> anyhow::Result<ExitCode> {
    let mut cmd = PluginCli::command();
    cmd.build();
    let matches = cmd.clone().get_matches_from(argv);
    let cli = PluginCli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let PluginCommand::Flows { target, args } = cli.command;
    let sub = matches
        .subcommand_matches("flows")
        .context("kubectl netpol: no subcommand")?;
    let flows_cmd = cmd.find_subcommand("flows").context("no flows command")?;
    let filter = args
        .filter(sub, crate::observe::flows::args::now_ms())
        .map_err(anyhow::Error::msg)?;
    filter.compile()?;
    let nodes = nodes_to_ask(&target, &filter.include)?;
    if let [node] = nodes.as_slice() {
        let forwarded = plan::forwarded(flows_cmd, sub, &[]);
        return exec_on(&target, node, &forwarded);
    }
    anyhow::ensure!(
        !args.follow,
        "the pods are on nodes {}: --follow follows one node; add --node NAME",
        nodes.join(", ")
    );
    let forwarded = plan::forwarded(flows_cmd, sub, &["output"]);
    merged(&target, &nodes, &forwarded, &args)
}

/// The nodes to ask: those given with --node, else those of the pods the filters name.
fn nodes_to_ask(
    target: &Target,
    include: &crate::observe::flows::FlowFilter,
) -> anyhow::Result<Vec<String>> {
    if !target.node.is_empty() {
        return Ok(target.node.clone());
    }
    let pods = plan::pods_named(include).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        !pods.is_empty(),
        "which node? name a pod with --pod, --from or --to (its node's agent is asked), or give --node"
    );
    let mut nodes = BTreeSet::new();
    for pod in &pods {
        let json = kubectl_output(&plan::get_pod_args(target, pod))?;
        nodes.insert(plan::node_of_pod(&json).map_err(anyhow::Error::msg)?);
    }
    Ok(nodes.into_iter().collect())
}

/// The agent pod on `node`.
fn agent_pod(target: &Target, node: &str) -> anyhow::Result<String> {
    let json = kubectl_output(&plan::get_agents_args(target))?;
    plan::agent_on_node(&json, node).map_err(anyhow::Error::msg)
}

/// Runs `flows` in the agent of `node`, its output straight to ours (so --follow streams).
fn exec_on(target: &Target, node: &str, forwarded: &[String]) -> anyhow::Result<ExitCode> {
    let agent = agent_pod(target, node)?;
    tracing::debug!(node, agent, "asking the agent");
    let status = kubectl()
        .args(plan::exec_args(target, &agent, forwarded))
        .status()
        .context("running kubectl exec")?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

/// Asks the agent of every node in `nodes` for JSON lines, and prints the flows merged by time.
fn merged(
    target: &Target,
    nodes: &[String],
    forwarded: &[String],
    args: &FlowsArgs,
) -> anyhow::Result<ExitCode> {
    let mut flows: Vec<Flow> = Vec::new();
    for node in nodes {
        let agent = agent_pod(target, node)?;
        let mut exec = plan::exec_args(target, &agent, forwarded);
        exec.push("--output=jsonl".into());
        let out = kubectl_output(&exec).with_context(|| format!("asking the agent on {node}"))?;
        for line in out.lines().filter(|l| !l.trim().is_empty()) {
            flows.push(serde_json::from_str(line).with_context(|| format!("a flow from {node}"))?);
        }
    }
    // RFC 3339 in UTC with milliseconds: the text sorts as the time does.
    flows.sort_by(|a, b| a.time.cmp(&b.time));
    if let Some(n) = args.first {
        flows.truncate(n);
    }
    if let Some(n) = args.last {
        flows.drain(..flows.len().saturating_sub(n));
    }
    print!("{}", render::render(&flows, args.format()));
    Ok(ExitCode::SUCCESS)
}

fn kubectl() -> Command {
    Command::new(std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into()))
}

/// Runs kubectl with `args` and returns what it printed; its stderr in the error when it fails.
fn kubectl_output(args: &[String]) -> anyhow::Result<String> {
    let out = kubectl()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running kubectl (is it on the PATH, or $KUBECTL set?)")?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8(out.stdout).context("kubectl printed something that is not UTF-8")
}
