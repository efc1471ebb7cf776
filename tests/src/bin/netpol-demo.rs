//! The demo that `cargo xtask demo` runs once it has set up and built everything: brings up a
//! simulated two-node Flannel cluster (network namespaces, cni0 bridges, veths, VXLAN), runs one agent
//! per node, and shows real connections before and after the example policies.
//!
//! Usage: `netpol-demo AGENT PROBE` (the paths of the `netpol-agent` and `netpol-probe` binaries).
//! It lives here rather than in xtask so that xtask depends on nothing that builds eBPF.

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use netpol_tests::cluster::{Cluster, Family, Matrix, Proto};

/// The example policies, embedded so the demo needs nothing but the checkout.
const POLICIES: &str = include_str!("../../demo/policies.yaml");

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let (Some(agent), Some(probe), None) = (args.next(), args.next(), args.next()) else {
        bail!("usage: netpol-demo AGENT PROBE");
    };
    if !netpol_tests::cluster::is_root() {
        bail!(
            "the demo builds network namespaces and loads BPF programs: run it as root on a BPF-capable kernel"
        );
    }
    let mut cluster = Cluster::new(probe).context("building the simulated cluster")?;
    println!(
        "\n== Simulated K3s/Flannel cluster {}: 2 nodes, namespaces x y z, pods a b c in each",
        cluster.prefix
    );
    for pod in &cluster.pods {
        println!(
            "   {:<4} node {}  {}  {}",
            pod.id(),
            pod.node,
            pod.ip(Family::V4),
            pod.ip(Family::V6)
        );
    }

    cluster
        .start_agents(&agent)
        .context("starting the agents")?;
    println!(
        "\n== Agents running, no NetworkPolicy yet: TCP port 80, IPv4 (rows: from, columns: to)"
    );
    println!(
        "{}",
        render(&cluster.probe_matrix(80, Proto::Tcp, Family::V4)?)
    );

    println!("== Applying the example policies (tests/demo/policies.yaml):");
    println!(
        "   x: default-deny-ingress; x/a accepts TCP 80 from namespace y and from x; z/c may only reach z"
    );
    cluster.apply_policies(POLICIES)?;
    let mut expected = cluster.reachability(true);
    expected
        .expect_all_ingress("x/*", false)
        .expect_peer("y/*", "x/a", true)
        .expect_peer("x/*", "x/a", true)
        .expect_all_egress("z/c", false)
        .expect_peer("z/c", "z/*", true)
        .expect_peer("z/c", "x/a", false)
        .allow_loopback();
    cluster
        .wait_for_matrix(
            &expected,
            80,
            Proto::Tcp,
            Family::V4,
            Duration::from_secs(30),
        )
        .context("the example policies were not enforced as expected")?;
    println!("\n== Enforced, TCP port 80, IPv4:");
    println!(
        "{}",
        render(&cluster.probe_matrix(80, Proto::Tcp, Family::V4)?)
    );
    println!("== The same over IPv6:");
    println!(
        "{}",
        render(&cluster.probe_matrix(80, Proto::Tcp, Family::V6)?)
    );
    println!("== TCP port 81 (x/a only allows 80, so y -> x/a is dropped here):");
    println!(
        "{}",
        render(&cluster.probe_matrix(81, Proto::Tcp, Family::V4)?)
    );

    let node = &cluster.nodes[0];
    let agent_cli = |args: &[&str]| {
        run(Command::new("ip")
            .args(["netns", "exec", &node.name])
            .arg(&agent)
            .args(args)
            .arg("--pin-dir")
            .arg(&node.pin_dir)
            .arg("--state-dir")
            .arg(&node.state_dir))
    };
    println!("== `netpol-agent status` on {}:", node.name);
    agent_cli(&["status"])?;
    println!(
        "\n== `netpol-agent flows --verdict dropped --last 10` on {}: what was dropped, and why",
        node.name
    );
    agent_cli(&["flows", "--verdict", "dropped", "--last", "10"])?;
    println!("\n== Done: the cluster, the agents and their pins are removed now.");
    Ok(())
}

/// Runs `cmd` (its output goes to ours), failing when it fails.
fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// A connectivity matrix for people: `ok` where the connection succeeded, `--` where it was dropped.
fn render(m: &Matrix) -> String {
    let mut out = format!("{:<10}", "from \\ to");
    for to in &m.pods {
        out.push_str(&format!("{to:>5}"));
    }
    for from in &m.pods {
        out.push_str(&format!("\n{from:<10}"));
        for to in &m.pods {
            out.push_str(&format!("{:>5}", if m.get(from, to) { "ok" } else { "--" }));
        }
    }
    out.push('\n');
    out
}
