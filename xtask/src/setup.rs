//! Installs what the build and the tests need; quick when everything is already there.

use std::process::Command;

use anyhow::Context as _;

use netpol_toolchain::{BPF_LINKER_VERSION, EBPF_NIGHTLY, Missing};

use crate::check;

/// Debian packages the tests, the demo and the bench use (commands: ip, bridge, iptables, conntrack,
/// modprobe, bpftool, iperf3, prometheus, promtool).
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "iptables",
    "conntrack",
    "kmod",
    "bpftool",
    "iperf3",
    // prometheus and promtool, for the metrics tests.
    "prometheus",
    // A venv for kubernetes-validate (deploy manifest tests).
    "python3-venv",
];

/// Debian's kubectl (`kubectl kustomize deploy/` in the deploy tests), installed only when no
/// `kubectl` is on PATH (another package may provide it).
const KUBECTL_PACKAGE: &str = "kubernetes-client";

/// kubernetes-validate from PyPI validates the rendered deploy manifests against the Kubernetes
/// schemas offline; it goes into a venv under the target directory.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// True when this machine can run the privileged tests: root, and a kernel with BTF (BPF-capable).
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::path::Path::new("/sys/kernel/btf/vmlinux").exists()
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs whatever is missing.
pub fn run() -> anyhow::Result<()> {
    install_ebpf_toolchain()?;
    install_debian_packages()?;
    install_kubernetes_validate()
}

/// Installs the pinned nightly with rust-src and bpf-linker, whatever of them is missing: all that
/// the agent's build script needs to build the eBPF programs.
pub fn install_ebpf_toolchain() -> anyhow::Result<()> {
    for missing in netpol_toolchain::missing() {
        eprintln!("xtask: {missing}: installing it");
        match missing {
            Missing::Rustup => anyhow::bail!(
                "rustup is needed to install {EBPF_NIGHTLY} (the eBPF programs build with it)"
            ),
            // `toolchain install` also adds the component to an installed toolchain.
            Missing::Nightly | Missing::RustSrc => check(Command::new("rustup").args([
                "toolchain",
                "install",
                EBPF_NIGHTLY,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))?,
            Missing::BpfLinker(_) => check(Command::new("cargo").args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
            ]))?,
        }
    }
    let left = netpol_toolchain::missing();
    anyhow::ensure!(
        left.is_empty(),
        "still missing after installing: {}",
        netpol_toolchain::explain(&left)
    );
    Ok(())
}

fn install_debian_packages() -> anyhow::Result<()> {
    let mut wanted = DEBIAN_PACKAGES.to_vec();
    if output(Command::new("kubectl").args(["version", "--client"])).is_none() {
        wanted.push(KUBECTL_PACKAGE);
    }
    install_packages(&wanted)
}

/// Installs the Debian packages of `wanted` that are missing (as root; otherwise says what is).
pub fn install_packages(wanted: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        if !privileged() {
            eprintln!(
                "xtask: missing Debian packages {missing:?}, and not root: install them to run the privileged tests"
            );
            return Ok(());
        }
        eprintln!("xtask: installing Debian packages {missing:?}");
        check(
            Command::new("apt-get")
                .arg("update")
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .context("apt-get update")?;
        check(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    Ok(())
}

/// The venv holding kubernetes-validate: `<target dir>/tools/venv` (the deploy tests look there).
pub fn tools_venv() -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("tools").join("venv")
}

fn install_kubernetes_validate() -> anyhow::Result<()> {
    let venv = tools_venv();
    let bin = venv.join("bin").join("kubernetes-validate");
    if output(Command::new(&bin).arg("--version")).is_some() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing {KUBERNETES_VALIDATE} into {}",
        venv.display()
    );
    check(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .context("creating the tools venv (python3-venv)")?;
    check(Command::new(venv.join("bin").join("pip")).args([
        "install",
        "--quiet",
        KUBERNETES_VALIDATE,
    ]))
    .context("pip install kubernetes-validate")
}
