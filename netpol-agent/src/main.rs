//! `netpol-agent`: the node agent and its CLI.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use netpol_agent::{
    agent::{self, AgentConfig},
    control::{self, Status},
    datapath::{self, PinLayout},
    source::SourceConfig,
};

/// Enforces Kubernetes NetworkPolicy on a K3s/Flannel node with TC eBPF programs on pod veths.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where an agent keeps its node state; every subcommand that touches node state takes these.
#[derive(Args, Clone)]
struct NodeDirs {
    /// bpffs directory for pinned maps and links (a bpffs is mounted there if it is not on one).
    #[arg(long, default_value = "/sys/fs/bpf/netpol")]
    pin_dir: PathBuf,
    /// Directory for the control socket and runtime files.
    #[arg(long, default_value = "/run/netpol-agent")]
    state_dir: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: watch the cluster state and enforce its NetworkPolicies on this node.
    Run {
        /// This node's name: pods whose spec.nodeName matches are enforced here.
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// Directory of Kubernetes manifests (*.yaml, *.yml, *.json) holding the cluster state.
        /// Without it the agent watches the Kubernetes API.
        #[arg(long, conflicts_with = "kubeconfig")]
        manifests: Option<PathBuf>,
        /// kubeconfig for the Kubernetes API. Default: kube's inference (in-cluster service
        /// account, then KUBECONFIG, then ~/.kube/config).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Address for /healthz and /readyz ("off" to not serve them). Loopback by default: the
        /// agent runs with hostNetwork and the kubelet probes it on 127.0.0.1; 9101 is free on K3s
        /// nodes.
        #[arg(long, default_value = netpol_agent::health::DEFAULT_HEALTH_ADDR)]
        health_addr: String,
        #[command(flatten)]
        dirs: NodeDirs,
    },
    /// Show the running agent's endpoints, map use, counters and problems.
    Status {
        #[command(flatten)]
        dirs: NodeDirs,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Remove everything the agent attached and pinned (stops enforcement on this node).
    Cleanup {
        #[command(flatten)]
        dirs: NodeDirs,
    },
    /// Check, with evidence, whether NetworkPolicy is really enforced on this node and by what.
    /// Exit status: 0 every check passed, 1 a check failed, 2 only warnings.
    Verify {
        #[command(flatten)]
        dirs: NodeDirs,
        /// Also load the programs in scratch namespaces and prove, with real packets, that a deny-all
        /// drops and an allow rule passes.
        #[arg(long)]
        self_test: bool,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            // netlink-packet-route warns on every dump about attributes newer kernels add.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,netlink_packet_route=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Run {
                node_name,
                manifests,
                kubeconfig,
                health_addr,
                dirs,
            } => {
                let health_addr = match health_addr.as_str() {
                    "off" | "" => None,
                    a => Some(a.parse().with_context(|| {
                        format!("--health-addr {a:?} is not an address such as 127.0.0.1:9101")
                    })?),
                };
                agent::run(AgentConfig {
                    node_name,
                    source: match manifests {
                        Some(dir) => SourceConfig::Manifests(dir),
                        None => SourceConfig::Kubernetes { kubeconfig },
                    },
                    health_addr,
                    layout: PinLayout::new(dirs.pin_dir),
                    state_dir: dirs.state_dir,
                })
                .await
            }
            Command::Status { dirs, output } => {
                let status = control::request_status(&dirs.state_dir).await?;
                match output {
                    Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
                    Output::Table => print_status(&status),
                }
                Ok(())
            }
            Command::Verify { dirs, self_test, output } => {
                let report = netpol_agent::verify::verify(&netpol_agent::verify::VerifyOptions {
                    layout: PinLayout::new(dirs.pin_dir),
                    state_dir: dirs.state_dir,
                    self_test,
                })
                .await;
                match output {
                    Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                    Output::Table => print!("{}", report.render_text()),
                }
                std::process::exit(report.exit_code());
            }
            Command::Cleanup { dirs } => {
                if control::agent_is_running(&dirs.state_dir).await {
                    anyhow::bail!(
                        "an agent is running with --state-dir {}: stop it first, or it re-attaches",
                        dirs.state_dir.display()
                    );
                }
                let layout = PinLayout::new(&dirs.pin_dir);
                let removed = datapath::cleanup(&layout)
                    .with_context(|| format!("removing pins under {}", dirs.pin_dir.display()))?;
                let _ = std::fs::remove_file(control::socket_path(&dirs.state_dir));
                println!("removed {removed} pins under {}; NetworkPolicy is no longer enforced by netpol-agent on this node", dirs.pin_dir.display());
                Ok(())
            }
        }
    })
}

fn print_status(s: &Status) {
    println!("node:        {}", s.node);
    println!("source:      {}", s.source);
    println!("pin dir:     {}", s.pin_dir);
    println!("ready:       {}", s.ready);
    if let Some(t) = s.last_sync_unix {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(t);
        println!("last sync:   {}s ago (unix {t})", now.saturating_sub(t));
    }
    println!("generation:  {}", s.generation);
    println!(
        "cluster:     {} namespaces, {} pods, {} policies",
        s.namespaces, s.pods, s.policies
    );
    println!(
        "\nENDPOINT                        VETH             IFINDEX  IN-ISOLATED  EG-ISOLATED  ATTACHED  IPS"
    );
    for e in &s.endpoints {
        println!(
            "{:<31} {:<16} {:<8} {:<12} {:<12} {:<9} {}",
            e.pod,
            e.ifname,
            e.ifindex,
            e.isolated_ingress,
            e.isolated_egress,
            e.attached,
            e.ips.join(",")
        );
    }
    println!("\nMAP                ENTRIES  CAPACITY");
    for m in &s.maps {
        println!("{:<18} {:<8} {}", m.name, m.entries, m.capacity);
    }
    println!("\nVERDICT REASON       PACKETS");
    for (reason, n) in &s.counters {
        println!("{reason:<20} {n}");
    }
    if s.errors.is_empty() {
        println!("\nno problems");
    } else {
        println!("\nPROBLEMS");
        for e in &s.errors {
            println!("- {e}");
        }
    }
}
