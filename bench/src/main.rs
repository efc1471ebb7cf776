//! `netpol-bench`: runs the benchmark (see the library docs), writes the JSON report and prints the
//! table. `cargo xtask bench [--quick]` builds everything and runs it.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use netpol_bench::{Options, control, control_spec, traffic};

#[derive(Parser)]
#[command(
    about = "netpol-agent benchmark: datapath, iptables, pod traffic, control plane, first packet"
)]
struct Cli {
    /// Smallest sizes only (about a minute).
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/bench/report.json")]
    out: PathBuf,
    /// The agent binary for the pod-traffic part.
    #[arg(long, env = "NETPOL_AGENT_BIN")]
    agent_bin: Option<PathBuf>,
    /// The netpol-probe binary for the pod-traffic part.
    #[arg(long, env = "NETPOL_PROBE_BIN")]
    probe_bin: Option<PathBuf>,
    /// The netpol-cni binary for the first-packet part (built when missing).
    #[arg(long, env = "NETPOL_CNI_BIN")]
    cni_bin: Option<PathBuf>,
    #[command(subcommand)]
    internal: Option<Internal>,
}

#[derive(Subcommand)]
enum Internal {
    /// (internal) The control-plane part, in a process of its own; prints JSON.
    #[command(hide = true)]
    ControlPlane {
        #[arg(long)]
        quick: bool,
    },
    /// Only the agent-memory part (agent on the API source against the API server double); prints
    /// JSON.
    ApiMemory {
        #[arg(long)]
        quick: bool,
        /// Another cluster size (pods; policies a fifth of them, 50 pods per namespace, 110 per
        /// node).
        #[arg(long)]
        pods: Option<usize>,
    },
    /// Only the time-to-first-packet part (simulated cluster, agents on the manifest source); prints
    /// its table, then its JSON.
    FirstPacket {
        #[arg(long)]
        quick: bool,
    },
    /// (internal) Connect/read/close loop; prints JSON.
    /// One rung of the scale ladder (JSON on stdout).
    #[command(hide = true)]
    LadderRung {
        #[arg(long)]
        pods: usize,
        #[arg(long)]
        policies: usize,
        #[arg(long, default_value_t = 100)]
        changes: usize,
    },
    /// One full compile of the realistic mix at each size (pods/policies/local pods).
    #[command(hide = true)]
    ProbeCompile {
        #[arg(long, num_args = 1.., default_values = ["5000/1000/110"])]
        sizes: Vec<String>,
    },
    #[command(hide = true)]
    ConnectLoop {
        #[arg(long)]
        addr: IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        secs: f64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.internal {
        Some(Internal::ControlPlane { quick }) => {
            let (spec, changes) = control_spec(quick);
            let part = control::run(spec, changes)?;
            println!("{}", serde_json::to_string(&part)?);
            return Ok(());
        }
        Some(Internal::ApiMemory { quick, pods }) => {
            let dir = std::env::current_exe()?
                .parent()
                .map(PathBuf::from)
                .unwrap_or_default();
            let agent = cli.agent_bin.unwrap_or_else(|| dir.join("netpol-agent"));
            let spec = match pods {
                Some(pods) => netpol_bench::api_memory::Spec {
                    pods,
                    policies: pods / 5,
                    namespaces: pods / 50,
                    nodes: pods / 110,
                },
                None => netpol_bench::api_memory::Spec::new(quick),
            };
            let part = netpol_bench::api_memory::run(&agent, spec)?;
            println!("{}", serde_json::to_string_pretty(&part)?);
            return Ok(());
        }
        Some(Internal::FirstPacket { quick }) => {
            let dir = std::env::current_exe()?
                .parent()
                .map(PathBuf::from)
                .unwrap_or_default();
            let part =
                netpol_bench::first_packet::run(&netpol_bench::first_packet::Settings::new(
                    quick,
                    &cli.agent_bin.unwrap_or_else(|| dir.join("netpol-agent")),
                    &cli.probe_bin.unwrap_or_else(|| dir.join("netpol-probe")),
                    &cli.cni_bin.unwrap_or_else(|| dir.join("netpol-cni")),
                ))?;
            eprintln!("{}", part.table());
            println!("{}", serde_json::to_string_pretty(&part)?);
            return Ok(());
        }
        Some(Internal::LadderRung {
            pods,
            policies,
            changes,
        }) => {
            let spec = netpol_bench::mix::MixSpec {
                pods,
                policies,
                local_pods: 110,
            };
            let rung = netpol_bench::ladder::run(spec, changes)?;
            eprint!(
                "{}",
                netpol_bench::ladder::table(std::slice::from_ref(&rung))
            );
            println!("{}", serde_json::to_string(&rung)?);
            return Ok(());
        }
        Some(Internal::ProbeCompile { sizes }) => {
            for size in sizes {
                let n: Vec<usize> = size
                    .split('/')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .context("sizes are pods/policies/local")?;
                netpol_bench::ladder::probe(netpol_bench::mix::MixSpec {
                    pods: n[0],
                    policies: n[1],
                    local_pods: n[2],
                });
            }
            return Ok(());
        }
        Some(Internal::ConnectLoop { addr, port, secs }) => {
            println!("{}", traffic::connect_loop(addr, port, secs));
            return Ok(());
        }
        None => {}
    }
    let bench_bin = std::env::current_exe().context("locating this binary")?;
    let dir = bench_bin.parent().map(PathBuf::from).unwrap_or_default();
    let o = Options {
        quick: cli.quick,
        agent_bin: cli.agent_bin.unwrap_or_else(|| dir.join("netpol-agent")),
        probe_bin: cli.probe_bin.unwrap_or_else(|| dir.join("netpol-probe")),
        cni_bin: cli.cni_bin.unwrap_or_else(|| dir.join("netpol-cni")),
        bench_bin,
    };
    let report = netpol_bench::run(&o);
    if let Some(parent) = cli.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&cli.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", cli.out.display()))?;
    println!("{}", report.table());
    println!("report: {}", cli.out.display());
    let missing = report.missing();
    if !missing.is_empty() {
        anyhow::bail!("the report is incomplete: {missing:?}");
    }
    Ok(())
}
