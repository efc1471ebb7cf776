//! `netpol-agent`: the node agent and its CLI.

use std::{io::IsTerminal as _, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{
    ArgMatches, Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum,
};
use netpol_agent::{
    agent::{self, AgentConfig},
    datapath::{self, PinLayout, capacities::Capacities},
    model::Protocol,
    observe,
    observe::control::{self, Status},
    observe::flows::{
        self, Filter,
        args::{self as flow_args, FlowsArgs},
        render::{self, Format},
    },
    observe::metrics,
    sources::SourceConfig,
};

/// Enforces Kubernetes NetworkPolicy on a K3s/Flannel node with TC eBPF programs on pod veths.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log lines as text, or as one JSON object per line (for a log collector).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr in `format`, filtered by `RUST_LOG` (default: info, and quieter where noted).
fn init_logging(format: LogFormat) {
    // kube's client and watchers log every failed request and retry, while the API source reports
    // faults itself, once per change.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube_client=off,kube_runtime=off".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal: `kubectl logs` and log collectors get plain lines.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
}

/// Where an agent keeps its node state; every subcommand that touches node state takes these.
#[derive(Args, Clone)]
struct NodeDirs {
    /// bpffs directory for pinned maps and links (a bpffs is mounted there if it is not on one).
    #[arg(long, default_value = "/sys/fs/bpf/netpol")]
    pin_dir: PathBuf,
    /// Directory for the control socket and the saved cluster state; on a disk that survives
    /// reboots, so a rebooted node enforces the last state before the API answers.
    #[arg(long, default_value = "/var/lib/netpol-agent")]
    state_dir: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

/// How long the datapath keeps a flow without packets, by state (`6h`, `90s`, `1m30s`).
#[derive(Args)]
struct CtTimeoutArgs {
    /// TCP flows with packets seen both ways.
    #[arg(long, default_value = "6h", value_parser = humantime::parse_duration)]
    ct_timeout_tcp_established: Duration,
    /// TCP flows seen one way only (a SYN without answer, a lone ACK).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    ct_timeout_tcp_opening: Duration,
    /// TCP flows after a FIN or RST.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    ct_timeout_tcp_closing: Duration,
    /// UDP, SCTP, ICMP and other flows.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    ct_timeout_other: Duration,
    /// Most tracked flows one pod may hold (a quarter of the table by default): past it, only that
    /// pod's new flows go untracked, nobody else's are evicted for them.
    #[arg(long, default_value_t = netpol_common::DEFAULT_CT_QUOTA, value_parser = clap::value_parser!(u32).range(1..))]
    ct_quota_per_endpoint: u32,
}

impl CtTimeoutArgs {
    /// The timeouts in whole seconds, each at least one.
    fn timeouts(&self) -> anyhow::Result<netpol_common::CtTimeouts> {
        let secs = |flag: &str, d: Duration| -> anyhow::Result<u32> {
            let s = u32::try_from(d.as_secs())
                .with_context(|| format!("--{flag}: {d:?} is too long"))?;
            anyhow::ensure!(s >= 1, "--{flag}: {d:?} is shorter than a second");
            Ok(s)
        };
        Ok(netpol_common::CtTimeouts {
            tcp_established: secs(
                "ct-timeout-tcp-established",
                self.ct_timeout_tcp_established,
            )?,
            tcp_opening: secs("ct-timeout-tcp-opening", self.ct_timeout_tcp_opening)?,
            tcp_closing: secs("ct-timeout-tcp-closing", self.ct_timeout_tcp_closing)?,
            other: secs("ct-timeout-other", self.ct_timeout_other)?,
        })
    }
}

/// Sizes of the decision maps, each of its two buffers (fixed when the maps are first pinned; a
/// new size needs `netpol-agent cleanup` first). What does not fit is left out as denied, and
/// reported.
#[derive(Args)]
struct MapSizeArgs {
    /// Local pods (host veths).
    #[arg(long, default_value_t = netpol_common::capacity::ENDPOINTS)]
    max_endpoints: u32,
    /// Pod and node addresses (dual-stack pods take two).
    #[arg(long, default_value_t = netpol_common::capacity::IPCACHE)]
    max_addresses: u32,
    /// ipBlock prefixes this node's rules need (excepts included).
    #[arg(long, default_value_t = netpol_common::capacity::CIDRS)]
    max_cidr_prefixes: u32,
    /// Allow entries: (local pod, peer identity, port) triples.
    #[arg(long, default_value_t = netpol_common::capacity::POLICY)]
    max_policy_entries: u32,
    /// (egress-isolated local pod, Service port) verdicts.
    #[arg(long, default_value_t = netpol_common::service::CAPACITY)]
    max_service_verdicts: u32,
    /// Service frontend addresses (written as ranges past it).
    #[arg(long, default_value_t = netpol_common::service::FRONTENDS_CAPACITY)]
    max_frontends: u32,
}

impl MapSizeArgs {
    fn capacities(&self) -> anyhow::Result<Capacities> {
        let caps = Capacities {
            endpoints: self.max_endpoints,
            ipcache: self.max_addresses,
            cidrs: self.max_cidr_prefixes,
            policy: self.max_policy_entries,
            services: self.max_service_verdicts,
            frontends: self.max_frontends,
        };
        if let Some((map, n)) = caps.too_small() {
            anyhow::bail!(
                "map {map}: {n} entries is too small (at least {})",
                netpol_agent::datapath::capacities::MIN_ENTRIES
            );
        }
        Ok(caps)
    }
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
        #[arg(long, default_value = netpol_agent::observe::health::DEFAULT_HEALTH_ADDR)]
        health_addr: String,
        #[command(flatten)]
        dirs: NodeDirs,
        /// Address of the Prometheus `/metrics` endpoint ("off" to not serve it). Every interface by
        /// default, for Prometheus to scrape the node (hostNetwork); 9102 is free on K3s nodes.
        #[arg(long, default_value = metrics::DEFAULT_METRICS_ADDR)]
        metrics_addr: String,
        /// Whether the drop metrics name the pod (`pod`) or only its namespace (`none`: fewer
        /// series where pods come and go by the thousand; the dashboard's per-pod panels then
        /// show namespaces only).
        #[arg(long, value_enum, default_value = "pod")]
        metrics_pod_label: metrics::PodLabel,
        #[command(flatten)]
        ct: CtTimeoutArgs,
        #[command(flatten)]
        sizes: MapSizeArgs,
        /// What a pod veth may do before the agent knows its pod (programs are attached as soon
        /// as the veth appears): `drop` lets only the node talk to it; `allow-unselected` also
        /// leaves it open in a direction when no policy isolates any pod of this node that has no
        /// endpoint yet (the veth can only be one of them).
        #[arg(long, value_enum, default_value = "drop")]
        pending: netpol_agent::compiler::PendingRule,
        /// The mode of policies that set none, themselves or through their namespace (annotation
        /// `netpol.io/mode`): `audit` passes what they deny and records it as a would-be drop, for
        /// a first install beside another engine.
        #[arg(long, value_enum, default_value = "enforce")]
        default_mode: netpol_agent::model::mode::Mode,
    },
    /// Show the running agent's endpoints, map use, counters and problems.
    Status {
        #[command(flatten)]
        dirs: NodeDirs,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Show recent flows through the local pods (allowed, dropped, audit), or follow new ones.
    Flows {
        #[command(flatten)]
        dirs: NodeDirs,
        #[command(flatten)]
        args: FlowsArgs,
    },
    /// Every policy with its mode, the local pods it decides for, and the hit counters of each of
    /// its rules on this node (`never matched` where nothing hit a rule), from the running agent.
    Policies {
        #[command(flatten)]
        dirs: NodeDirs,
        /// Also call `never matched` the rules whose last hit is older than this (`30d`, `12h`):
        /// the rules a review should question.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Print the shell completions of netpol-agent (`source <(netpol-agent completions bash)`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (netpol-agent.1, netpol-agent-flows.1, ...) into DIR.
    Man { dir: PathBuf },
    /// Remove everything the agent attached and pinned (stops enforcement on this node).
    Cleanup {
        #[command(flatten)]
        dirs: NodeDirs,
    },
    /// Check, with evidence, whether NetworkPolicy is really enforced on this node and by what
    /// (or, with --cluster, on every node). Exit status: 0 every check passed, 1 a check failed, 2
    /// only warnings.
    Verify {
        #[command(flatten)]
        dirs: NodeDirs,
        /// Also load the programs in scratch namespaces and prove, with real packets, that a deny-all
        /// drops and an allow rule passes.
        #[arg(long, conflicts_with = "cluster")]
        self_test: bool,
        /// Instead of this node, every node of the cluster through the Kubernetes API: whether a
        /// Ready agent pod is on it, and the nodes where NetworkPolicies exist but no agent enforces
        /// them.
        #[arg(long)]
        cluster: bool,
        /// kubeconfig for --cluster. Default: kube's inference (in-cluster service account, then
        /// KUBECONFIG, then ~/.kube/config).
        #[arg(long, requires = "cluster")]
        kubeconfig: Option<PathBuf>,
        /// Instead of checks, where this node's recent flows show netpol-agent and another filter
        /// (kube-router) disagree: flows it would drop (audit mode) that went on, and flows it
        /// allows that got no reply. Exit status 1 when there are any.
        #[arg(long, conflicts_with_all = ["cluster", "self_test"])]
        compare: bool,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Explain a connection: its verdict, the policies that isolate each end, and the rules that
    /// allow it, from the compiler that programs the datapath. Offline, against a manifest
    /// directory or the Kubernetes API; with --live, also against the running agent's maps on this
    /// node. Exit status: 0 allowed, 1 denied, 2 no answer (an unknown pod, an unreadable source),
    /// 3 the datapath disagrees with the compiler.
    Explain {
        /// The client: namespace/pod or an IP address.
        #[arg(long)]
        from: netpol_agent::observe::explain::Party,
        /// The server: namespace/pod, a ClusterIP or another IP address.
        #[arg(long)]
        to: netpol_agent::observe::explain::Party,
        /// Destination port.
        #[arg(long)]
        port: u16,
        /// TCP, UDP or SCTP.
        #[arg(long, default_value = "TCP", value_parser = parse_protocol)]
        protocol: Protocol,
        /// Read the cluster state from this manifest directory.
        #[arg(long, conflicts_with = "kubeconfig")]
        manifests: Option<PathBuf>,
        /// kubeconfig for the Kubernetes API (the default without --manifests: kube's inference).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Also read the running agent's maps on this node (its status socket and pins) for the
        /// ends that are its pods, and say where they disagree. Without --manifests or
        /// --kubeconfig, the cluster state is the one the agent saved.
        #[arg(long)]
        live: bool,
        /// The agent's `--default-mode`: the mode of policies that set none.
        #[arg(long, value_enum, default_value = "enforce")]
        default_mode: netpol_agent::model::mode::Mode,
        #[command(flatten)]
        dirs: NodeDirs,
        /// Output format; `json` prints one object whose `verdict` is `allowed` or `denied`.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

fn parse_protocol(s: &str) -> Result<Protocol, String> {
    Protocol::parse(&s.to_uppercase()).ok_or_else(|| format!("{s:?}: TCP, UDP or SCTP"))
}

/// Where `flows` reads: the running agent, or the pinned maps when none answers.
struct FlowSource {
    dirs: NodeDirs,
    /// An agent answers on the control socket.
    running: bool,
    /// The node's name for records read from the pins (the agent names its own).
    node: String,
}

impl FlowSource {
    async fn new(dirs: NodeDirs) -> Self {
        let running = control::agent_is_running(&dirs.state_dir).await;
        let node = match running {
            true => String::new(),
            false => observe::node_name_without_agent(&dirs.state_dir),
        };
        FlowSource {
            dirs,
            running,
            node,
        }
    }

    /// The recent flows that `filter` lets through.
    async fn recent(&self, filter: &Filter) -> anyhow::Result<Vec<flows::Flow>> {
        if self.running {
            return observe::request_flows(&self.dirs.state_dir, filter).await;
        }
        let layout = PinLayout::new(&self.dirs.pin_dir);
        let maps = observe::ObserveMaps::open(&layout)
            .context("no agent is running and the pinned maps cannot be read")?;
        let resolver = flows::Resolver::default();
        let view = flows::View {
            resolver: &resolver,
            clock: observe::clock(),
            node: &self.node,
        };
        Ok(flows::select(&maps.flows(), &view, &filter.compile()?))
    }

    /// Follows new flows until the agent goes (or forever on the pins).
    async fn follow(
        &self,
        filter: &Filter,
        each: impl FnMut(flows::Flow) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        if self.running {
            observe::follow_flows(&self.dirs.state_dir, filter, each).await
        } else {
            let layout = PinLayout::new(&self.dirs.pin_dir);
            observe::follow_pinned(&layout, &self.node, filter, each).await
        }
    }
}

async fn run_flows(dirs: NodeDirs, args: FlowsArgs, matches: &ArgMatches) -> anyhow::Result<()> {
    let filter = args
        .filter(matches, flow_args::now_ms())
        .map_err(anyhow::Error::msg)?;
    let matcher = filter.compile()?;
    let source = FlowSource::new(dirs).await;
    if !source.running {
        let socket = control::socket_path(&source.dirs.state_dir);
        anyhow::ensure!(
            !matcher.uses_labels(),
            "-l, --from-label and --to-label need the pods' labels, which only a running agent \
             has, and no agent answers at {}",
            socket.display()
        );
        eprintln!(
            "note: no agent answers at {}; reading the pinned maps under {} directly: addresses are not \
             resolved to pods and policies are not named",
            socket.display(),
            source.dirs.pin_dir.display()
        );
    }
    if args.follow {
        return follow_flows(&source, filter, args.format()).await;
    }
    let found = source.recent(&filter).await?;
    print!("{}", render::render(&found, args.format()));
    Ok(())
}

/// `flows --follow`: the recent flows first when --since or --last asks for them, then every new
/// one, one line each (compact for the table, JSON lines for JSON).
async fn follow_flows(source: &FlowSource, filter: Filter, format: Format) -> anyhow::Result<()> {
    use std::io::Write as _;
    let print = |flow: flows::Flow| -> anyhow::Result<()> {
        let line = match format {
            Format::Table => render::compact(&flow),
            Format::Json | Format::Jsonl => serde_json::to_string(&flow)?,
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
        Ok(())
    };
    if filter.last.is_some() || filter.since_unix_ms.is_some() {
        source
            .recent(&filter)
            .await?
            .into_iter()
            .try_for_each(print)?;
    }
    let live = Filter {
        since_unix_ms: None,
        until_unix_ms: None,
        first: None,
        last: None,
        ..filter
    };
    source.follow(&live, print).await
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if netpol_agent::kubectl::invoked_as_plugin(argv.first()) {
        init_logging(LogFormat::Text);
        return netpol_agent::kubectl::main(argv);
    }
    let matches = Cli::command().get_matches_from(argv);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_logging(cli.log_format);
    // Two workers for the spawned tasks (probes, metrics, the status socket, the API watchers),
    // so that they answer while the sync loop, on this thread, compiles.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Completions { shell } => {
                let mut cmd = Cli::command();
                clap_complete::generate(shell, &mut cmd, "netpol-agent", &mut std::io::stdout());
                Ok(())
            }
            Command::Man { dir } => {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                clap_mangen::generate_to(Cli::command(), &dir)
                    .with_context(|| format!("writing the man pages into {}", dir.display()))
            }
            Command::Run {
                node_name,
                manifests,
                kubeconfig,
                health_addr,
                metrics_addr,
                metrics_pod_label,
                dirs,
                ct,
                sizes,
                pending,
                default_mode,
            } => {
                let health_addr = match health_addr.as_str() {
                    "off" | "" => None,
                    a => Some(a.parse().with_context(|| {
                        format!("--health-addr {a:?} is not an address such as 127.0.0.1:9101")
                    })?),
                };
                let metrics_addr = match metrics_addr.as_str() {
                    "off" | "" => None,
                    a => Some(a.parse().with_context(|| {
                        format!("--metrics-addr {a:?} is not an address such as 0.0.0.0:9102")
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
                    metrics_addr,
                    metrics_pod_label,
                    ct_timeouts: ct.timeouts()?,
                    ct_quota: ct.ct_quota_per_endpoint,
                    pending_rule: pending,
                    capacities: sizes.capacities()?,
                    default_mode,
                })
                .await
            }
            Command::Flows { dirs, args } => {
                let flows = matches.subcommand_matches("flows").unwrap_or(&matches);
                run_flows(dirs, args, flows).await
            }
            Command::Policies {
                dirs,
                since,
                output,
            } => {
                let mut reports = netpol_agent::observe::policies::request(&dirs.state_dir).await?;
                if let Some(since) = since {
                    let cutoff = chrono::Utc::now() - since;
                    netpol_agent::observe::policies::forget_hits_before(&mut reports, cutoff);
                }
                match output {
                    Output::Json => println!("{}", serde_json::to_string_pretty(&reports)?),
                    Output::Table => {
                        println!("{}", netpol_agent::observe::policies::render_table(&reports))
                    }
                }
                Ok(())
            }
            Command::Status { dirs, output } => {
                let status = control::request_status(&dirs.state_dir).await?;
                match output {
                    Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
                    Output::Table => print_status(&status),
                }
                Ok(())
            }
            Command::Verify {
                dirs,
                self_test,
                cluster,
                kubeconfig,
                compare,
                output,
            } => {
                if compare {
                    let diffs = netpol_agent::verify::compare_flows(&dirs.state_dir).await?;
                    match output {
                        Output::Json => println!("{}", serde_json::to_string_pretty(&diffs)?),
                        Output::Table => print!(
                            "{}",
                            netpol_agent::verify::compare::render_text(&diffs)
                        ),
                    }
                    std::process::exit(i32::from(!diffs.is_empty()));
                }
                let report = if cluster {
                    netpol_agent::verify::verify_cluster(kubeconfig.as_ref()).await
                } else {
                    netpol_agent::verify::verify(&netpol_agent::verify::VerifyOptions {
                        layout: PinLayout::new(dirs.pin_dir),
                        state_dir: dirs.state_dir,
                        self_test,
                    })
                    .await
                };
                match output {
                    Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                    Output::Table => print!("{}", report.render_text()),
                }
                std::process::exit(report.exit_code());
            }
            Command::Explain {
                from,
                to,
                port,
                protocol,
                manifests,
                kubeconfig,
                live,
                default_mode,
                dirs,
                output,
            } => {
                let query = netpol_agent::observe::explain::Query {
                    from,
                    to,
                    protocol,
                    port,
                    default_mode,
                };
                let offline = match (manifests, kubeconfig) {
                    (Some(dir), _) => Some(SourceConfig::Manifests(dir)),
                    (None, Some(kc)) => Some(SourceConfig::Kubernetes {
                        kubeconfig: Some(kc),
                    }),
                    (None, None) if live => None,
                    (None, None) => Some(SourceConfig::Kubernetes { kubeconfig: None }),
                };
                let explained = explain_connection(offline, live.then_some(&dirs), &query).await;
                let e = match explained {
                    Ok(e) => e,
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        std::process::exit(2);
                    }
                };
                match output {
                    Output::Json => println!("{}", serde_json::to_string_pretty(&e)?),
                    Output::Table => print!("{}", netpol_agent::observe::explain::render_text(&e)),
                }
                let disagrees = e.live.as_ref().is_some_and(|l| !l.disagreements.is_empty());
                let denied = e.verdict != netpol_agent::observe::explain::Verdict::Allowed;
                std::process::exit(if disagrees { 3 } else { i32::from(denied) });
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
    })?;
    Ok(std::process::ExitCode::SUCCESS)
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
        "cluster:     {} namespaces, {} pods, {} policies, {} cluster policies",
        s.namespaces, s.pods, s.policies, s.cluster_policies
    );
    println!(
        "\nENDPOINT                        VETH             IFINDEX  IN-ISOLATED  EG-ISOLATED  ATTACHED  IPS"
    );
    for e in &s.endpoints {
        let who = match &e.pending {
            Some(reason) => format!("(pending: {reason})"),
            None => e.pod.clone(),
        };
        println!(
            "{:<31} {:<16} {:<8} {:<12} {:<12} {:<9} {}",
            who,
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

/// The first full cluster state `source` publishes (at most 60 s of waiting for the API).
async fn read_state_once(
    source: &SourceConfig,
) -> anyhow::Result<std::sync::Arc<netpol_agent::model::ClusterState>> {
    let mut rx = netpol_agent::sources::spawn(source).await?;
    let wait = async {
        loop {
            if let Some(state) = rx.borrow_and_update().state.clone() {
                return Ok(state);
            }
            rx.changed().await.context("the source stopped")?;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .with_context(|| format!("{} did not list within 60 s", source.describe()))?
}

/// `explain`: the compiler's answer for `query` over the state of `source` (or, with `live` and no
/// source, the state the agent saved), compared with the running agent's maps when `live`.
async fn explain_connection(
    source: Option<SourceConfig>,
    live: Option<&NodeDirs>,
    query: &netpol_agent::observe::explain::Query,
) -> anyhow::Result<netpol_agent::observe::explain::Explanation> {
    let status = match live {
        Some(dirs) => Some(control::request_status(&dirs.state_dir).await?),
        None => None,
    };
    let (state, from) = match (&source, &status, live) {
        (Some(source), _, _) => (read_state_once(source).await?, source.describe()),
        (None, Some(status), Some(dirs)) => {
            let saved = netpol_agent::sources::persisted::load(&dirs.state_dir, &status.node)?
                .context(
                    "the agent has saved no cluster state yet: give --manifests or --kubeconfig",
                )?;
            (
                std::sync::Arc::new(saved.state),
                "the agent's saved state".to_owned(),
            )
        }
        _ => anyhow::bail!("no cluster state to explain against"),
    };
    let mut e = netpol_agent::observe::explain::explain(&state, query)
        .with_context(|| format!("in the cluster state of {from}"))?;
    if let (Some(status), Some(dirs)) = (status, live) {
        let maps_dir = PinLayout::new(&dirs.pin_dir).maps_dir();
        let (generation, maps) = datapath::pinned_read::read_live(&maps_dir)
            .with_context(|| format!("reading the maps pinned under {}", maps_dir.display()))?;
        let local = status
            .endpoints
            .iter()
            .filter(|ep| !ep.pod.is_empty())
            .map(|ep| (ep.pod.clone(), ep.ifindex))
            .collect();
        e.compare_live(&status.node, generation, &maps, &local);
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/man holds what `netpol-agent man` writes now: `cargo xtask man` after a change of flags.
    #[test]
    fn the_man_pages_in_docs_are_current() {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/man");
        let fresh = std::env::temp_dir().join(format!("netpol-man-{}", std::process::id()));
        std::fs::create_dir_all(&fresh).unwrap();
        clap_mangen::generate_to(Cli::command(), &fresh).unwrap();
        let names = |dir: &std::path::Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let stale = "docs/man is stale: run `cargo xtask man`";
        assert_eq!(names(&docs), names(&fresh), "{stale}");
        for name in names(&fresh) {
            let read = |dir: &std::path::Path| std::fs::read_to_string(dir.join(&name)).unwrap();
            assert!(read(&docs) == read(&fresh), "{name}: {stale}");
        }
        std::fs::remove_dir_all(&fresh).unwrap();
    }

    #[test]
    fn completions_cover_every_subcommand() {
        let mut out = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "netpol-agent",
            &mut out,
        );
        let script = String::from_utf8(out).unwrap();
        for sub in Cli::command().get_subcommands() {
            assert!(script.contains(sub.get_name()), "{}", sub.get_name());
        }
        assert!(
            script.contains("--traffic-direction"),
            "flows' flags complete too"
        );
    }
}
