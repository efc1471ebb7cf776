//! Developer tasks: `cargo xtask setup | test | demo | bench | manifests | image | man`.

mod containerd;
mod image;
mod manifests;
mod repro;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "netpol-agent developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (pinned nightly with rust-src, bpf-linker, Debian
    /// packages, kubernetes-validate).
    Setup {
        /// Only what building the agent needs (the pinned nightly with rust-src, bpf-linker).
        #[arg(long)]
        build_only: bool,
    },
    /// Build everything and show the agent enforcing example policies on a simulated Flannel cluster.
    Demo,
    /// Set up, build, and run every test: unit, classifier (BPF_PROG_TEST_RUN) and end-to-end.
    Test {
        /// Extra arguments for `cargo test` (for example a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up, build release, and run the benchmark: prints a table, writes target/bench/report.json.
    Bench {
        /// Smallest sizes only (about a minute).
        #[arg(long)]
        quick: bool,
    },
    /// Render the single-file manifests from deploy/: install.yaml (the kustomize base, for
    /// `kubectl apply -f` and K3s's auto-deploy directory) and monitoring.yaml (PodMonitor and
    /// PrometheusRule).
    Manifests,
    /// Build the agent as a static binary in an OCI image from scratch, for amd64 and arm64:
    /// target/image/netpol-agent-<version>-<arch>.oci.tar (for `k3s ctr images import` or K3s's
    /// images directory), with the pinned stable Rust; as root, import each archive into a private
    /// containerd and run the image of this machine's architecture.
    Image {
        /// Also build amd64 a second time, from a copy of the checkout into a fresh target
        /// directory (other absolute paths), and fail unless binary and image digest are the same
        /// (a cold build: several minutes).
        #[arg(long)]
        check_reproducible: bool,
        /// Do not import the archives into a private containerd (which needs root, runc and a
        /// kernel that can run containers).
        #[arg(long)]
        skip_containerd: bool,
    },
    /// Write the man pages of netpol-agent and its subcommands into docs/man (from its clap
    /// definitions; a test fails while they are stale).
    Man,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup { build_only: true } => setup::install_ebpf_toolchain(),
        Task::Setup { build_only: false } => setup::run(),
        Task::Demo => demo(),
        Task::Test { args } => test(&args),
        Task::Bench { quick } => bench(quick),
        Task::Manifests => manifests::run(&workspace_root()),
        Task::Image {
            check_reproducible,
            skip_containerd,
        } => image::run(&image::Options {
            check_reproducible,
            skip_containerd,
        }),
        Task::Man => man(),
    }
}

/// Runs `cmd`, failing with its description when it fails.
pub fn check(cmd: &mut Command) -> anyhow::Result<()> {
    let desc = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {desc}"))?;
    if !status.success() {
        bail!("{desc} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn test(args: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    // One build first, so the test binaries and the agent come from a warm cache.
    check(cargo().args([
        "build",
        "--locked",
        "--workspace",
        "--exclude",
        "netpol-ebpf",
        "--bins",
        "--tests",
    ]))?;
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--locked",
        "--workspace",
        "--exclude",
        "netpol-ebpf",
    ]);
    if setup::privileged() {
        // On a machine that can run them, the root/BPF/netns tests must run: a skip is a failure.
        cmd.env("NETPOL_REQUIRE_PRIVILEGED", "1");
    } else {
        eprintln!("xtask: not root or no BPF here: privileged tests will skip (and say so)");
    }
    cmd.args(args);
    check(&mut cmd)
}

/// `netpol-agent man docs/man`, run from a debug build.
fn man() -> anyhow::Result<()> {
    setup::install_ebpf_toolchain()?;
    let dir = workspace_root().join("docs/man");
    check(
        cargo()
            .args([
                "run",
                "--locked",
                "--quiet",
                "-p",
                "netpol-agent",
                "--",
                "man",
            ])
            .arg(&dir),
    )
}

/// The workspace root.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The workspace's target directory (honouring `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Builds the binaries of `packages` in release mode; returns the directory they are in.
pub fn build_release(packages: &[&str]) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--locked", "--release", "--bins"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    check(&mut cmd)?;
    Ok(target_dir().join("release"))
}

/// Sets up, builds, and runs the demo binary (it lives in the test crate, with the simulated
/// cluster, so that xtask itself links nothing that builds eBPF).
fn demo() -> anyhow::Result<()> {
    setup::run()?;
    if !setup::privileged() {
        bail!(
            "the demo builds network namespaces and loads BPF programs: run it as root on a BPF-capable kernel"
        );
    }
    let release = build_release(&["netpol-agent", "netpol-tests"])?;
    check(
        Command::new(release.join("netpol-demo"))
            .arg(release.join("netpol-agent"))
            .arg(release.join("netpol-probe")),
    )
}

fn bench(quick: bool) -> anyhow::Result<()> {
    setup::run()?;
    let release = build_release(&["netpol-agent", "netpol-cni", "netpol-tests", "netpol-bench"])?;
    let mut cmd = Command::new(release.join("netpol-bench"));
    cmd.current_dir(workspace_root())
        .arg("--out")
        .arg(target_dir().join("bench/report.json"));
    if quick {
        cmd.arg("--quick");
    }
    check(&mut cmd)
}
