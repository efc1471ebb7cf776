//! Installs what the build and the tests need; quick when everything is already there.

use std::process::Command;

use anyhow::Context as _;

use netpol_toolchain::{BPF_LINKER_VERSION, EBPF_NIGHTLY, IMAGE_STABLE, Missing};

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

/// Makes sure rustup has the pinned stable [`IMAGE_STABLE`] with `targets` (installing what is
/// missing, without updating rustup itself); returns its `rustc -V`. Fails with one line when it
/// cannot be installed, or when the toolchain of that name is another release (a hand-made link).
pub fn install_image_toolchain(targets: &[&str]) -> anyhow::Result<String> {
    install_image_toolchain_with(targets, |cmd| cmd)
}

/// [`install_image_toolchain`] with every rustup command passed through `env` first (the tests
/// point `RUSTUP_HOME` and the download server elsewhere).
pub fn install_image_toolchain_with(
    targets: &[&str],
    env: impl Fn(&mut Command) -> &mut Command,
) -> anyhow::Result<String> {
    let rustup = |args: &[&str]| {
        let mut cmd = Command::new("rustup");
        cmd.args(args)
            .env("RUSTUP_AUTO_INSTALL", "0")
            .env("RUST_BACKTRACE", "0");
        env(&mut cmd);
        cmd.output()
    };
    let installed = rustup(&["run", IMAGE_STABLE, "rustc", "-V"]);
    let version = match installed {
        Err(e) => {
            anyhow::bail!("rustup is needed to install Rust {IMAGE_STABLE} for the image: {e}")
        }
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Ok(_) => {
            eprintln!(
                "xtask: Rust {IMAGE_STABLE} (pinned for the image) is missing: installing it"
            );
            let mut args = vec!["toolchain", "install", IMAGE_STABLE, "--profile", "minimal"];
            args.push("--no-self-update");
            for t in targets {
                args.extend(["--target", t]);
            }
            let out = rustup(&args).context("running rustup toolchain install")?;
            anyhow::ensure!(
                out.status.success(),
                "cannot install the pinned Rust {IMAGE_STABLE} that builds the image: `rustup {}` failed: {}",
                args.join(" "),
                error_line(&out.stderr)
            );
            let out = rustup(&["run", IMAGE_STABLE, "rustc", "-V"])?;
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        }
    };
    anyhow::ensure!(
        version.starts_with(&format!("rustc {IMAGE_STABLE} ")),
        "the toolchain named {IMAGE_STABLE} is `{version}`, not Rust {IMAGE_STABLE}: remove it (`rustup toolchain uninstall {IMAGE_STABLE}`) and run again"
    );
    let mut args = vec!["target", "add", "--toolchain", IMAGE_STABLE];
    args.extend(targets);
    let out = rustup(&args).context("running rustup target add")?;
    anyhow::ensure!(
        out.status.success(),
        "cannot add {targets:?} to Rust {IMAGE_STABLE}: {}",
        error_line(&out.stderr)
    );
    Ok(version)
}

/// rustup's first `error:` line (else the last line it printed), for a one-line message.
fn error_line(out: &[u8]) -> String {
    let text = String::from_utf8_lossy(out);
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let error = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("error:"));
    error
        .or_else(|| lines.next_back())
        .unwrap_or("(no output)")
        .to_owned()
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

/// The installed version of a Debian package (for reports), if it is installed.
pub fn debian_version(package: &str) -> Option<String> {
    output(Command::new("dpkg-query").args(["-W", "-f=${Version}", package]))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A rustup home of its own under the system's temporary directory, removed afterwards.
    struct RustupHome(std::path::PathBuf);

    impl RustupHome {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("{name}.{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for RustupHome {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn an_image_toolchain_that_cannot_be_installed_fails_in_one_line() {
        let home = RustupHome::new("netpol-xtask-rustup-unreachable");
        // Nothing listens on port 9 of loopback: the download fails at once.
        let err = install_image_toolchain_with(&["x86_64-unknown-linux-musl"], |cmd| {
            cmd.env("RUSTUP_HOME", &home.0)
                .env("RUSTUP_DIST_SERVER", "http://127.0.0.1:9")
                .env("RUSTUP_UPDATE_ROOT", "http://127.0.0.1:9/rustup")
        })
        .expect_err("nothing to install from");
        let line = format!("{err:#}");
        assert!(
            line.contains(&format!("Rust {IMAGE_STABLE}")),
            "names the toolchain: {line}"
        );
        assert!(
            line.contains(&format!("rustup toolchain install {IMAGE_STABLE}")),
            "names the command: {line}"
        );
        assert!(
            line.contains("failed: error:"),
            "carries rustup's error: {line}"
        );
        assert!(!line.contains('\n'), "one line: {line}");
    }

    /// Downloads the pinned stable (about 80 MB) into an empty rustup home: the install does not
    /// depend on what this machine's rustup already has. `cargo test -p xtask -- --ignored`.
    #[test]
    #[ignore = "downloads a toolchain"]
    fn the_image_toolchain_installs_into_an_empty_rustup_home() {
        let home = RustupHome::new("netpol-xtask-rustup-empty");
        let version = install_image_toolchain_with(&["x86_64-unknown-linux-musl"], |cmd| {
            cmd.env("RUSTUP_HOME", &home.0)
        })
        .unwrap();
        assert!(
            version.starts_with(&format!("rustc {IMAGE_STABLE} ")),
            "{version}"
        );
        let host = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
        let musl = home.0.join(format!(
            "toolchains/{IMAGE_STABLE}-{host}/lib/rustlib/x86_64-unknown-linux-musl"
        ));
        assert!(musl.is_dir(), "{} is missing", musl.display());
    }
}
