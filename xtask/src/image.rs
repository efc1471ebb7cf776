//! `cargo xtask image`: the agent as a static (musl) binary in an OCI image from scratch, for amd64
//! and arm64, as OCI archives that `k3s ctr images import` and K3s's images directory take.
//!
//! Built without a daemon and without a base image: `umoci` assembles the layout (one layer holding
//! `/usr/local/bin/netpol-agent`), every date in it is the commit's (`SOURCE_DATE_EPOCH`), and the
//! archive is written with sorted entries and fixed owners, so two assemblies of one binary give
//! the same digest (checked each time). The binary is built with the pinned stable Rust
//! ([`IMAGE_STABLE`]) and with every build path remapped (checked: the binary names none of
//! them); `--check-reproducible` builds amd64 a second time from a copy of the checkout into a
//! fresh target directory, both at other paths, and compares binaries and digests. The arm64
//! binary is cross-linked with Debian's aarch64 GCC and run under `qemu-aarch64-static` before it
//! is packed. As root, each archive is then imported by a private containerd with `ctr`, and the
//! image of this machine's architecture is run by it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, ensure};
use netpol_toolchain::IMAGE_STABLE;

use crate::{check, containerd, repro, setup, target_dir, workspace_root};

/// The reference install.yaml runs (`deploy/daemonset.yaml`'s image, set by the kustomization).
pub const IMAGE_REPOSITORY: &str = "localhost/netpol-agent";

/// Debian packages the image build needs: umoci assembles the layout, skopeo reads it back,
/// qemu-user-static runs the arm64 binary, musl-gcc and the aarch64 GCC build and link ring's C,
/// containerd (with ctr) imports the archives and runc runs the image.
const PACKAGES: &[&str] = &[
    "umoci",
    "skopeo",
    "qemu-user-static",
    "musl-tools",
    "gcc-aarch64-linux-gnu",
    "containerd",
    "runc",
];

/// One architecture of the image.
pub struct Arch {
    /// OCI / Go name.
    pub oci: &'static str,
    /// Rust target.
    pub target: &'static str,
    /// Environment for the cross build (C compiler and linker).
    env: &'static [(&'static str, &'static str)],
    /// How to run the binary here.
    runner: &'static [&'static str],
}

impl Arch {
    /// True for the architecture of this machine (its image can be run here without emulation).
    pub fn is_host(&self) -> bool {
        self.target.starts_with(std::env::consts::ARCH)
    }
}

/// The architectures, amd64 first.
pub const ARCHES: [Arch; 2] = [
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

/// What `cargo xtask image` is asked to do besides building.
pub struct Options {
    /// Build amd64 a second time from other paths and compare binaries and digests.
    pub check_reproducible: bool,
    /// Do not import the archives into a private containerd.
    pub skip_containerd: bool,
}

/// What every image of one run shares: the tag, the dates, the compiler label.
pub struct Meta {
    /// The agent's version, the image tag.
    pub version: String,
    /// The commit's time: every date in the image.
    pub epoch: i64,
    /// `rustc -V` of the pinned stable, recorded in the image's labels.
    pub rustc: String,
}

impl Meta {
    /// The image reference, `localhost/netpol-agent:<version>`.
    pub fn reference(&self) -> String {
        format!("{IMAGE_REPOSITORY}:{}", self.version)
    }
}

/// Where a build reads its sources and writes its outputs (absolute paths).
pub struct Tree {
    /// The checkout (workspace root).
    pub checkout: PathBuf,
    /// The cargo target directory.
    pub target: PathBuf,
}

/// One built image.
pub struct Image {
    /// Its architecture.
    pub arch: &'static Arch,
    /// The static binary in it.
    pub bin: PathBuf,
    /// The OCI archive.
    pub archive: PathBuf,
    /// The manifest digest (`sha256:...`).
    pub digest: String,
}

/// Builds both images into `target/image/`, imports them into a private containerd (as root),
/// and with `check_reproducible` proves that a second clean build gives the same amd64 image.
pub fn run(options: &Options) -> anyhow::Result<()> {
    setup::install_ebpf_toolchain()?;
    setup::install_packages(PACKAGES)?;
    let targets: Vec<&str> = ARCHES.iter().map(|a| a.target).collect();
    let rustc = setup::install_image_toolchain(&targets)?;
    let checkout = workspace_root().canonicalize()?;
    let meta = Meta {
        version: agent_version(&checkout)?,
        epoch: commit_epoch(&checkout)?,
        rustc,
    };
    let target = target_dir();
    std::fs::create_dir_all(&target)?;
    let tree = Tree {
        checkout,
        target: target.canonicalize()?,
    };
    let out = tree.target.join("image");
    std::fs::create_dir_all(&out)?;
    let mut images = Vec::new();
    for arch in &ARCHES {
        images.push(build_image(arch, &tree, &meta, &out)?);
    }
    if !options.skip_containerd {
        containerd::check_import(&images, &meta)?;
    }
    if options.check_reproducible {
        repro::check(&images[0], &tree, &meta)?;
    }
    for image in &images {
        println!("{}  {}", image.archive.display(), image.digest);
    }
    println!("image reference: {}", meta.reference());
    Ok(())
}

/// Builds, tests and packs the image of `arch` from `tree` into `out`.
pub fn build_image(
    arch: &'static Arch,
    tree: &Tree,
    meta: &Meta,
    out: &Path,
) -> anyhow::Result<Image> {
    let started = Instant::now();
    let bin = build(arch, tree)?;
    eprintln!(
        "xtask: {} binary built in {:.0?} ({})",
        arch.oci,
        started.elapsed(),
        tree.target.display()
    );
    smoke_test(arch, &bin, &meta.version)?;
    repro::check_no_build_paths(&bin, tree)?;
    let archive = out.join(format!(
        "netpol-agent-{}-{}.oci.tar",
        meta.version, arch.oci
    ));
    let digest = assemble(arch, &bin, meta, &archive)?;
    let again_path = out.join(format!("again-{}.oci.tar", arch.oci));
    let again = assemble(arch, &bin, meta, &again_path)?;
    std::fs::remove_file(&again_path)?;
    ensure!(
        digest == again,
        "two assemblies of the {} image differ: {digest} and {again}",
        arch.oci
    );
    Ok(Image {
        arch,
        bin,
        archive,
        digest,
    })
}

/// The agent's version (its Cargo.toml), which is also the image tag install.yaml uses.
pub fn agent_version(root: &Path) -> anyhow::Result<String> {
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

/// Builds the static agent for `arch` with the pinned stable, from `tree.checkout` into
/// `tree.target`; returns the binary.
fn build(arch: &Arch, tree: &Tree) -> anyhow::Result<PathBuf> {
    let remap = repro::Remap::of(tree)?;
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        IMAGE_STABLE,
        "cargo",
        "build",
        "--locked",
        "--release",
    ])
    .args(["-p", "netpol-agent", "--target", arch.target])
    .arg("--manifest-path")
    .arg(tree.checkout.join("Cargo.toml"))
    // The eBPF programs are built by the agent's build script with the pinned nightly, whose
    // cargo trims every path (its workspace, its target directory, the registry, the
    // standard library's sources); `[env]` reaches that cargo and not this stable one.
    .args(["--config", "env.CARGO_UNSTABLE_TRIM_PATHS=\"true\""])
    .args(["--config", "env.CARGO_PROFILE_RELEASE_TRIM_PATHS=\"all\""])
    .current_dir(&tree.checkout)
    .env("RUSTUP_AUTO_INSTALL", "0")
    .env("CARGO_TARGET_DIR", &tree.target)
    .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
    // No build path may end up in the binary: not the checkout's, the target directory's or
    // the registry's (panic locations, C sources).
    .env_remove("RUSTFLAGS")
    .env("CARGO_ENCODED_RUSTFLAGS", remap.rustflags())
    .env(c_flags_var(arch), remap.c_flags());
    for (k, v) in arch.env {
        cmd.env(k, v);
    }
    check(&mut cmd)?;
    Ok(tree
        .target
        .join(arch.target)
        .join("release")
        .join("netpol-agent"))
}

/// The variable cc-rs reads C flags for `arch`'s target from (`CFLAGS_x86_64_unknown_linux_musl`).
fn c_flags_var(arch: &Arch) -> String {
    format!("CFLAGS_{}", arch.target.replace('-', "_"))
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
    let elf = std::fs::read(bin).with_context(|| format!("reading {}", bin.display()))?;
    ensure!(
        !repro::contains(&elf, b"ld-linux"),
        "the {} binary asks for a dynamic loader",
        arch.oci
    );
    Ok(())
}

/// Assembles the image of `bin` for `arch` into the OCI archive `archive`; returns its manifest
/// digest.
pub fn assemble(arch: &Arch, bin: &Path, meta: &Meta, archive: &Path) -> anyhow::Result<String> {
    let work = archive.with_extension("work");
    let _ = std::fs::remove_dir_all(&work);
    let (layout, rootfs) = (work.join("layout"), work.join("rootfs"));
    stage_rootfs(bin, &rootfs, meta.epoch)?;
    let date = rfc3339(meta.epoch)?;
    let image = format!("{}:{}", layout.display(), meta.version);
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
            .args(["--created", &date, "--history.created", &date])
            .args(["--architecture", arch.oci, "--os", "linux"])
            .args(["--config.entrypoint", "/usr/local/bin/netpol-agent"])
            .args(["--config.cmd", "run"])
            .args(["--config.label", &format!("io.netpol.rustc={}", meta.rustc)]),
    )?;
    check(Command::new("umoci").args(["gc", "--layout"]).arg(&layout))?;
    let digest = name_image(&layout, &meta.reference())?;
    write_archive(&layout, archive, meta.epoch)?;
    std::fs::remove_dir_all(&work)?;
    Ok(digest)
}

/// `rootfs/usr/local/bin/netpol-agent`, every date the commit's.
fn stage_rootfs(bin: &Path, rootfs: &Path, epoch: i64) -> anyhow::Result<()> {
    let bin_dir = rootfs.join("usr/local/bin");
    std::fs::create_dir_all(&bin_dir)?;
    check(
        Command::new("install")
            .args(["-m", "0755"])
            .arg(bin)
            .arg(bin_dir.join("netpol-agent")),
    )?;
    check(Command::new("find").arg(rootfs).args([
        "-exec",
        "touch",
        "-h",
        "-d",
        &format!("@{epoch}"),
        "{}",
        "+",
    ]))
}

/// The layout as a tar archive with sorted entries, fixed owners and dates; read back by skopeo.
fn write_archive(layout: &Path, archive: &Path, epoch: i64) -> anyhow::Result<()> {
    check(
        Command::new("tar")
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
            .arg(format!("--mtime=@{epoch}"))
            .arg("-cf")
            .arg(archive)
            .arg("-C")
            .arg(layout)
            .arg("."),
    )?;
    check(
        Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci-archive:{}", archive.display()))
            .stdout(std::process::Stdio::null()),
    )
    .context("skopeo cannot read the archive")
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

/// RFC 3339 (UTC) of a Unix time, with `date` (xtask builds with stable Rust alone and few crates).
fn rfc3339(epoch: i64) -> anyhow::Result<String> {
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{epoch}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()?;
    ensure!(out.status.success(), "date failed");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pinned_stable_meets_the_workspace_rust_version() {
        let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        let rust_version = manifest
            .lines()
            .find_map(|l| l.strip_prefix("rust-version = \""))
            .and_then(|v| v.strip_suffix('"'))
            .expect("rust-version in the workspace Cargo.toml");
        assert!(
            IMAGE_STABLE.starts_with(&format!("{rust_version}.")),
            "the image's Rust {IMAGE_STABLE} is not the workspace's rust-version {rust_version}"
        );
    }

    #[test]
    fn exactly_one_architecture_is_this_machines() {
        let host: Vec<&str> = ARCHES
            .iter()
            .filter(|a| a.is_host())
            .map(|a| a.oci)
            .collect();
        assert_eq!(host.len(), 1, "{host:?}");
    }
}
