//! `cargo xtask image`: the agent as a static (musl) binary in an OCI image from scratch, for amd64
//! and arm64, as OCI archives that `k3s ctr images import` and K3s's images directory take.
//!
//! Built without a daemon and without a base image: `umoci` assembles the layout (one layer holding
//! `/usr/local/bin/netpol-agent`), every date in it is the commit's (`SOURCE_DATE_EPOCH`), and the
//! archive is written with sorted entries and fixed owners, so two builds of one commit give the
//! same digest (checked here by assembling each image twice). The arm64 binary is cross-linked with
//! Debian's aarch64 GCC and run under `qemu-aarch64-static` before it is packed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, ensure};

use crate::{cargo, check, setup, target_dir, workspace_root};

/// The reference install.yaml runs (`deploy/daemonset.yaml`'s image, set by the kustomization).
const IMAGE_REPOSITORY: &str = "localhost/netpol-agent";

/// Debian packages the image build needs: umoci assembles the layout, skopeo reads it back,
/// qemu-user-static runs the arm64 binary, musl-gcc and the aarch64 GCC build and link ring's C.
const PACKAGES: &[&str] = &[
    "umoci",
    "skopeo",
    "qemu-user-static",
    "musl-tools",
    "gcc-aarch64-linux-gnu",
];

/// One architecture of the image.
struct Arch {
    /// OCI / Go name.
    oci: &'static str,
    /// Rust target.
    target: &'static str,
    /// Environment for the cross build (C compiler and linker).
    env: &'static [(&'static str, &'static str)],
    /// How to run the binary here.
    runner: &'static [&'static str],
}

const ARCHES: [Arch; 2] = [
    Arch {
        oci: "amd64",
        target: "x86_64-unknown-linux-musl",
        env: &[("CC_x86_64_unknown_linux_musl", "musl-gcc")],
        runner: &[],
    },
    Arch {
        oci: "arm64",
        target: "aarch64-unknown-linux-musl",
        env: &[
            ("CC_aarch64_unknown_linux_musl", "aarch64-linux-gnu-gcc"),
            (
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER",
                "aarch64-linux-gnu-gcc",
            ),
        ],
        runner: &["qemu-aarch64-static"],
    },
];

/// Builds both images into `target/image/`; prints their files and digests.
pub fn run() -> anyhow::Result<()> {
    setup::install_ebpf_toolchain()?;
    setup::install_packages(PACKAGES)?;
    let root = workspace_root();
    let version = agent_version(&root)?;
    let epoch = commit_epoch(&root)?;
    let out = target_dir().canonicalize()?.join("image");
    std::fs::create_dir_all(&out)?;
    for arch in &ARCHES {
        let bin = build(arch)?;
        smoke_test(arch, &bin, &version)?;
        let archive = out.join(format!("netpol-agent-{version}-{}.oci.tar", arch.oci));
        let digest = assemble(arch, &bin, &version, epoch, &archive)?;
        let again = assemble(arch, &bin, &version, epoch, &out.join("again.oci.tar"))?;
        std::fs::remove_file(out.join("again.oci.tar"))?;
        ensure!(
            digest == again,
            "two assemblies of the {} image differ: {digest} and {again}",
            arch.oci
        );
        println!("{}  {digest}", archive.display());
    }
    println!("image reference: {IMAGE_REPOSITORY}:{version}");
    Ok(())
}

/// The agent's version (its Cargo.toml), which is also the image tag install.yaml uses.
fn agent_version(root: &Path) -> anyhow::Result<String> {
    let manifest = std::fs::read_to_string(root.join("netpol-agent/Cargo.toml"))?;
    manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .map(str::to_owned)
        .context("no version in netpol-agent/Cargo.toml")
}

/// The commit's time (seconds since the epoch): every date in the image.
fn commit_epoch(root: &Path) -> anyhow::Result<i64> {
    let out = Command::new("git")
        .args(["log", "-1", "--format=%ct"])
        .current_dir(root)
        .output()
        .context("running git log")?;
    ensure!(out.status.success(), "git log failed");
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// Builds the static agent for `arch`; returns the binary.
fn build(arch: &Arch) -> anyhow::Result<PathBuf> {
    check(Command::new("rustup").args(["target", "add", arch.target]))?;
    let root = workspace_root().canonicalize()?;
    let mut cmd = cargo();
    cmd.args(["build", "--locked", "--release", "-p", "netpol-agent"])
        .args(["--target", arch.target])
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        // The checkout's path must not end up in the binary.
        .env(
            "RUSTFLAGS",
            format!("--remap-path-prefix={}=/src", root.display()),
        );
    for (k, v) in arch.env {
        cmd.env(k, v);
    }
    check(&mut cmd)?;
    Ok(target_dir()
        .join(arch.target)
        .join("release")
        .join("netpol-agent"))
}

/// The binary runs (under qemu for arm64) and is static: nothing in a scratch image to load it.
fn smoke_test(arch: &Arch, bin: &Path, version: &str) -> anyhow::Result<()> {
    let mut cmd = match arch.runner {
        [runner, rest @ ..] => {
            let mut c = Command::new(runner);
            c.args(rest).arg(bin);
            c
        }
        [] => Command::new(bin),
    };
    let out = cmd
        .arg("--version")
        .output()
        .with_context(|| format!("running the {} binary", arch.oci))?;
    let printed = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && printed.trim() == format!("netpol-agent {version}"),
        "the {} binary printed {printed:?}",
        arch.oci
    );
    let elf = std::fs::read(bin)?;
    ensure!(
        !elf.windows(b"ld-linux".len()).any(|w| w == b"ld-linux"),
        "the {} binary asks for a dynamic loader",
        arch.oci
    );
    Ok(())
}

/// Assembles the image of `bin` for `arch` into the OCI archive `archive`; returns its manifest
/// digest.
fn assemble(
    arch: &Arch,
    bin: &Path,
    version: &str,
    epoch: i64,
    archive: &Path,
) -> anyhow::Result<String> {
    let work = archive.with_extension("work");
    let _ = std::fs::remove_dir_all(&work);
    let (layout, rootfs) = (work.join("layout"), work.join("rootfs"));
    let bin_dir = rootfs.join("usr/local/bin");
    std::fs::create_dir_all(&bin_dir)?;
    check(
        Command::new("install")
            .args(["-m", "0755"])
            .arg(bin)
            .arg(bin_dir.join("netpol-agent")),
    )?;
    let at = format!("@{epoch}");
    check(
        Command::new("find")
            .arg(&rootfs)
            .args(["-exec", "touch", "-h", "-d", &at, "{}", "+"]),
    )?;
    let date = rfc3339(epoch)?;
    let image = format!("{}:{version}", layout.display());
    check(
        Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout),
    )?;
    check(Command::new("umoci").args(["new", "--image", &image]))?;
    check(
        Command::new("umoci")
            .args(["insert", "--image", &image, "--history.created", &date])
            .args(["--history.created_by", "cargo xtask image"])
            .arg(&rootfs)
            .arg("/"),
    )?;
    check(
        Command::new("umoci")
            .args(["config", "--image", &image])
            .args([
                "--created",
                &date,
                "--history.created",
                &date,
                "--architecture",
                arch.oci,
                "--os",
                "linux",
                "--config.entrypoint",
                "/usr/local/bin/netpol-agent",
                "--config.cmd",
                "run",
                "--config.label",
                &format!("io.netpol.rustc={}", rustc_version()?),
            ]),
    )?;
    check(Command::new("umoci").args(["gc", "--layout"]).arg(&layout))?;
    let digest = name_image(&layout, &format!("{IMAGE_REPOSITORY}:{version}"))?;
    check(
        Command::new("tar")
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
            .arg(format!("--mtime={at}"))
            .arg("-cf")
            .arg(archive)
            .arg("-C")
            .arg(&layout)
            .arg("."),
    )?;
    check(
        Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci-archive:{}", archive.display()))
            .stdout(std::process::Stdio::null()),
    )
    .context("skopeo cannot read the archive")?;
    std::fs::remove_dir_all(&work)?;
    Ok(digest)
}

/// Names the layout's one image `reference` the way containerd's import reads it (full reference
/// in both annotations); returns the manifest digest.
fn name_image(layout: &Path, reference: &str) -> anyhow::Result<String> {
    let path = layout.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    let manifests = index["manifests"]
        .as_array_mut()
        .context("index.json without manifests")?;
    ensure!(
        manifests.len() == 1,
        "expected one image in {}",
        path.display()
    );
    let m = &mut manifests[0];
    m["annotations"] = serde_json::json!({
        "org.opencontainers.image.ref.name": reference,
        "io.containerd.image.name": reference,
    });
    let digest = m["digest"].as_str().unwrap_or_default().to_owned();
    std::fs::write(&path, serde_json::to_vec(&index)?)?;
    Ok(digest)
}

/// `rustc -V` of the toolchain that builds the agent: the one input of the binary the commit does
/// not pin.
fn rustc_version() -> anyhow::Result<String> {
    let out = Command::new("rustc")
        .arg("-V")
        .output()
        .context("running rustc -V")?;
    ensure!(out.status.success(), "rustc -V failed");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// RFC 3339 (UTC) of a Unix time, with `date` (xtask builds with stable Rust alone and few crates).
fn rfc3339(epoch: i64) -> anyhow::Result<String> {
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{epoch}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()?;
    ensure!(out.status.success(), "date failed");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
