//! Reproducibility of the image's binary: the build paths it must not contain, how they are
//! remapped, and `cargo xtask image --check-reproducible`, which builds amd64 a second time from a
//! copy of the checkout into a fresh target directory (both at other absolute paths) and compares
//! the binaries and the image digests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail, ensure};

use crate::image::{self, Image, Meta, Tree};

/// A new directory under the system's temporary directory, removed (with what is in it) on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    /// Creates `<tmp>/<prefix>.<pid>.<n>`, mode 0700, with the first free `n`.
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        use std::os::unix::fs::DirBuilderExt as _;
        let base = std::env::temp_dir();
        for n in 0..100 {
            let dir = base.join(format!("{prefix}.{}.{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(Self(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
            }
        }
        bail!("no free directory name {prefix}.* in {}", base.display())
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("xtask: removing {}: {e}", self.0.display());
        }
    }
}

/// The absolute paths of one build and what they are remapped to in its outputs.
pub struct Remap {
    /// (path, replacement), the most specific last: rustc applies the last prefix that matches.
    pairs: Vec<(PathBuf, &'static str)>,
}

impl Remap {
    /// The checkout, cargo's home (registry sources) and the target directory of `tree`.
    pub fn of(tree: &Tree) -> anyhow::Result<Self> {
        let mut pairs = vec![(cargo_home()?, "/cargo"), (tree.checkout.clone(), "/src")];
        pairs.push((tree.target.clone(), "/target"));
        for (path, _) in &pairs {
            ensure!(
                !path.to_string_lossy().contains(char::is_whitespace),
                "{} has white space: the C flags cannot name it",
                path.display()
            );
        }
        Ok(Self { pairs })
    }

    /// `CARGO_ENCODED_RUSTFLAGS` for rustc: `--remap-path-prefix` for each path.
    pub fn rustflags(&self) -> String {
        self.joined("--remap-path-prefix", "\x1f")
    }

    /// C flags for cc-rs: `-ffile-prefix-map` for each path (`__FILE__`, debug info).
    pub fn c_flags(&self) -> String {
        self.joined("-ffile-prefix-map", " ")
    }

    /// `FLAG=FROM=TO` for each path, joined by `separator`.
    fn joined(&self, flag: &str, separator: &str) -> String {
        let flags: Vec<String> = self
            .pairs
            .iter()
            .map(|(from, to)| format!("{flag}={}={to}", from.display()))
            .collect();
        flags.join(separator)
    }
}

/// Cargo's home (`CARGO_HOME`, else `~/.cargo`), resolved.
fn cargo_home() -> anyhow::Result<PathBuf> {
    let home = match std::env::var_os("CARGO_HOME") {
        Some(h) => PathBuf::from(h),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cargo"),
    };
    home.canonicalize()
        .with_context(|| format!("resolving cargo's home {}", home.display()))
}

/// Rustup's home (`RUSTUP_HOME`, else `~/.rustup`): the pinned nightly's sources are under it.
fn rustup_home() -> Option<PathBuf> {
    std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".rustup")))
        .and_then(|h| h.canonicalize().ok())
}

/// Fails, naming them, when `bin` contains the checkout's, the target directory's, cargo's or
/// rustup's absolute path: a build at other paths would give another binary.
pub fn check_no_build_paths(bin: &Path, tree: &Tree) -> anyhow::Result<()> {
    let elf = std::fs::read(bin).with_context(|| format!("reading {}", bin.display()))?;
    let mut paths = vec![tree.checkout.clone(), tree.target.clone(), cargo_home()?];
    paths.extend(rustup_home());
    let found: Vec<String> = paths
        .iter()
        .filter(|p| contains(&elf, p.as_os_str().as_encoded_bytes()))
        .map(|p| p.display().to_string())
        .collect();
    ensure!(
        found.is_empty(),
        "{} contains build paths: {}",
        bin.display(),
        found.join(", ")
    );
    Ok(())
}

/// True when `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Builds `first`'s architecture again from a copy of the checkout into a fresh target directory,
/// both under a new temporary directory, and fails, naming what differs, unless the binary and
/// the image digest are the same.
pub fn check(first: &Image, tree: &Tree, meta: &Meta) -> anyhow::Result<()> {
    let scratch = Scratch::new("netpol-xtask-repro")?;
    let second = Tree {
        checkout: scratch.path().join("checkout"),
        target: scratch.path().join("target"),
    };
    copy_checkout(&tree.checkout, &second.checkout)?;
    let out = scratch.path().join("image");
    std::fs::create_dir_all(&out)?;
    eprintln!(
        "xtask: building {} again, from {} into {}",
        first.arch.oci,
        second.checkout.display(),
        second.target.display()
    );
    let started = Instant::now();
    let again = image::build_image(first.arch, &second, meta, &out)?;
    eprintln!(
        "xtask: second clean {} build and image in {:.0?}",
        first.arch.oci,
        started.elapsed()
    );
    let kept = tree
        .target
        .join("image")
        .join(format!("second-build-{}-netpol-agent", first.arch.oci));
    compare(first, &again, tree, &second).inspect_err(|_| {
        let _ = std::fs::copy(&again.bin, &kept);
    })?;
    let _ = std::fs::remove_file(&kept);
    println!(
        "reproducible: two clean {} builds give binary sha256 {} and image {}",
        first.arch.oci,
        sha256(&first.bin)?,
        first.digest
    );
    Ok(())
}

/// Compares two builds; the error names each difference.
fn compare(a: &Image, b: &Image, tree_a: &Tree, tree_b: &Tree) -> anyhow::Result<()> {
    let (sum_a, sum_b) = (sha256(&a.bin)?, sha256(&b.bin)?);
    if sum_a == sum_b && a.digest == b.digest {
        return Ok(());
    }
    let mut what = vec![format!(
        "the {} binaries differ: {} (sha256 {sum_a}) and {} (sha256 {sum_b}){}",
        a.arch.oci,
        a.bin.display(),
        b.bin.display(),
        first_difference(&a.bin, &b.bin)?
    )];
    if a.digest != b.digest {
        what.push(format!(
            "the image digests differ: {} and {}",
            a.digest, b.digest
        ));
    }
    match (ebpf_object(tree_a, a), ebpf_object(tree_b, b)) {
        (Some(x), Some(y)) if sha256(&x)? != sha256(&y)? => what.push(format!(
            "the embedded eBPF objects differ too: {} and {}",
            x.display(),
            y.display()
        )),
        (Some(_), Some(_)) => what.push("the embedded eBPF objects are the same".into()),
        _ => what.push("the eBPF objects were not found to compare".into()),
    }
    bail!(
        "two clean builds are not the same (the second binary is kept beside the archives as \
         second-build-{}-netpol-agent):\n  {}",
        a.arch.oci,
        what.join("\n  ")
    )
}

/// ` (first at byte N of M)`, or the sizes when one is a prefix of the other.
fn first_difference(a: &Path, b: &Path) -> anyhow::Result<String> {
    let (a, b) = (std::fs::read(a)?, std::fs::read(b)?);
    Ok(match a.iter().zip(&b).position(|(x, y)| x != y) {
        Some(at) => format!(", first at byte {at} of {}", a.len()),
        None => format!(", sizes {} and {}", a.len(), b.len()),
    })
}

/// The eBPF object the agent's build script made for `image` (newest, if there are several).
fn ebpf_object(tree: &Tree, image: &Image) -> Option<PathBuf> {
    let build = tree.target.join(image.arch.target).join("release/build");
    std::fs::read_dir(build)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("netpol-agent-"))
        .map(|e| e.path().join("out/netpol"))
        .filter(|p| p.is_file())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
}

/// `sha256sum` of a file (xtask links no hashing crate).
pub fn sha256(file: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum")
        .arg(file)
        .output()
        .context("running sha256sum")?;
    ensure!(out.status.success(), "sha256sum {} failed", file.display());
    let printed = String::from_utf8_lossy(&out.stdout);
    printed
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .context("sha256sum printed nothing")
}

/// Copies the files git tracks, as they are in the working tree (uncommitted changes included),
/// from `from` to the new directory `to`.
fn copy_checkout(from: &Path, to: &Path) -> anyhow::Result<()> {
    let out = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(from)
        .output()
        .context("running git ls-files")?;
    ensure!(
        out.status.success(),
        "git ls-files failed in {}",
        from.display()
    );
    for name in out.stdout.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = Path::new(std::str::from_utf8(name).context("a non-UTF-8 file name")?);
        let (src, dst) = (from.join(name), to.join(name));
        let Ok(meta) = src.symlink_metadata() else {
            continue; // deleted in the working tree
        };
        std::fs::create_dir_all(dst.parent().unwrap_or(to))?;
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else {
            std::fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_directory_is_remapped_after_the_checkout_that_holds_it() {
        let tree = Tree {
            checkout: "/w/repo".into(),
            target: "/w/repo/target".into(),
        };
        let remap = Remap::of(&tree).unwrap();
        let encoded = remap.rustflags();
        let flags: Vec<&str> = encoded.split('\x1f').collect();
        let at = |f: &str| {
            flags
                .iter()
                .position(|x| *x == f)
                .unwrap_or_else(|| panic!("{f}: {flags:?}"))
        };
        assert!(
            at("--remap-path-prefix=/w/repo=/src")
                < at("--remap-path-prefix=/w/repo/target=/target"),
            "{flags:?}"
        );
        assert!(remap.c_flags().contains("-ffile-prefix-map=/w/repo=/src"));
    }

    #[test]
    fn a_build_path_in_a_binary_is_named() {
        let dir = Scratch::new("netpol-xtask-paths").unwrap();
        let tree = Tree {
            checkout: dir.path().join("checkout"),
            target: dir.path().join("target"),
        };
        let bin = dir.path().join("bin");
        let mut elf = b"\x7fELF panicked at ".to_vec();
        elf.extend(tree.target.as_os_str().as_encoded_bytes());
        std::fs::write(&bin, &elf).unwrap();
        let err = check_no_build_paths(&bin, &tree).unwrap_err().to_string();
        assert!(err.contains(&tree.target.display().to_string()), "{err}");
        assert!(!err.contains(&tree.checkout.display().to_string()), "{err}");
        std::fs::write(&bin, b"\x7fELF panicked at /src/netpol-agent/src/main.rs").unwrap();
        check_no_build_paths(&bin, &tree).unwrap();
    }

    #[test]
    fn two_builds_that_differ_are_named_with_their_sums_and_digests() {
        let dir = Scratch::new("netpol-xtask-compare").unwrap();
        let tree = |name: &str| Tree {
            checkout: dir.path().join(name),
            target: dir.path().join(name).join("target"),
        };
        let image = |name: &str, bytes: &[u8], digest: &str| {
            let bin = dir.path().join(name);
            std::fs::write(&bin, bytes).unwrap();
            Image {
                arch: &image::ARCHES[0],
                bin,
                archive: dir.path().join(format!("{name}.oci.tar")),
                digest: digest.into(),
            }
        };
        let a = image("a", b"\x7fELF /src/x", "sha256:aa");
        let same = image("same", b"\x7fELF /src/x", "sha256:aa");
        compare(&a, &same, &tree("a"), &tree("same")).unwrap();
        let b = image("b", b"\x7fELF /tmp/x", "sha256:bb");
        let err = compare(&a, &b, &tree("a"), &tree("b"))
            .unwrap_err()
            .to_string();
        for part in [
            &format!("sha256 {}", sha256(&a.bin).unwrap()),
            &format!("sha256 {}", sha256(&b.bin).unwrap()),
            "first at byte 6 of 11",
            "the image digests differ: sha256:aa and sha256:bb",
            "the eBPF objects were not found",
        ] {
            assert!(err.contains(part), "{part:?} missing from: {err}");
        }
    }

    #[test]
    fn a_copied_checkout_has_the_tracked_files_as_they_are() {
        let dir = Scratch::new("netpol-xtask-copy").unwrap();
        let root = crate::workspace_root().canonicalize().unwrap();
        copy_checkout(&root, &dir.path().join("c")).unwrap();
        for f in ["Cargo.toml", "Cargo.lock", "xtask/src/repro.rs"] {
            assert_eq!(
                std::fs::read(root.join(f)).unwrap(),
                std::fs::read(dir.path().join("c").join(f)).unwrap(),
                "{f}"
            );
        }
        assert!(
            !dir.path().join("c/target").exists(),
            "the target directory is not tracked"
        );
    }
}
