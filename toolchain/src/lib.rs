//! The toolchains that build the eBPF programs and the image's agent binary, pinned in one place,
//! and the check of what the eBPF build is missing from this machine.
//!
//! The agent's build script calls [`missing`] before it builds `netpol-ebpf`, and stops with one
//! line naming what is missing and `cargo xtask setup`; `cargo xtask setup` calls it to decide what
//! to install. Both use the same constants, so a fresh machine next month builds with the same
//! nightly and the same linker.

use std::{fmt, path::PathBuf, process::Command};

/// The nightly toolchain that builds the eBPF programs (`-Z build-std=core` needs nightly and its
/// `rust-src`). A dated nightly, so the build does not change under us when `nightly` moves.
pub const EBPF_NIGHTLY: &str = "nightly-2026-05-20";

/// The stable Rust that builds the agent binary of the image (`cargo xtask image` builds with
/// exactly this one, installing it with rustup when it is missing): an exact release, so the image's
/// digest does not change when the machine's `stable` moves.
pub const IMAGE_STABLE: &str = "1.95.0";

/// The bpf-linker version whose default features use the Rust toolchain's own LLVM (newer ones
/// need a system LLVM that Debian 12 does not ship).
pub const BPF_LINKER_VERSION: &str = "0.10.4";

/// The command that installs everything [`missing`] can report.
pub const SETUP_COMMAND: &str = "cargo xtask setup";

/// A part of the eBPF toolchain that is not installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// `rustup` is not on the PATH (it installs the pinned nightly).
    Rustup,
    /// The pinned nightly toolchain is not installed.
    Nightly,
    /// The pinned nightly has no `rust-src` component (needed by `-Z build-std`).
    RustSrc,
    /// `bpf-linker` is not on the PATH, or is another version (the string is what it printed).
    BpfLinker(Option<String>),
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rustup => write!(f, "rustup is not on the PATH"),
            Self::Nightly => write!(f, "the {EBPF_NIGHTLY} toolchain is not installed"),
            Self::RustSrc => write!(f, "{EBPF_NIGHTLY} has no rust-src component"),
            Self::BpfLinker(None) => write!(f, "bpf-linker is not on the PATH"),
            Self::BpfLinker(Some(found)) => write!(
                f,
                "bpf-linker {BPF_LINKER_VERSION} is needed, found {}",
                found.trim()
            ),
        }
    }
}

/// What the eBPF build needs and this machine lacks, in install order; empty when it can build.
pub fn missing() -> Vec<Missing> {
    let mut missing = Vec::new();
    match nightly_sysroot() {
        Err(m) => missing.push(m),
        Ok(sysroot) if !has_rust_src(&sysroot) => missing.push(Missing::RustSrc),
        Ok(_) => {}
    }
    if let Err(m) = check_bpf_linker() {
        missing.push(m);
    }
    missing
}

/// One line for people: what is missing and the command that installs it.
pub fn explain(missing: &[Missing]) -> String {
    let what: Vec<String> = missing.iter().map(ToString::to_string).collect();
    format!(
        "the eBPF programs cannot be built: {}; run `{SETUP_COMMAND}` to install it",
        what.join(", ")
    )
}

/// The pinned nightly's sysroot, asking rustup not to install anything on the way.
fn nightly_sysroot() -> Result<PathBuf, Missing> {
    let out = Command::new("rustup")
        .args(["run", EBPF_NIGHTLY, "rustc", "--print", "sysroot"])
        .env("RUSTUP_AUTO_INSTALL", "0")
        .output()
        .map_err(|_| Missing::Rustup)?;
    if !out.status.success() {
        return Err(Missing::Nightly);
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// `-Z build-std` reads the standard library's workspace from here.
fn has_rust_src(sysroot: &std::path::Path) -> bool {
    sysroot
        .join("lib/rustlib/src/rust/library/Cargo.lock")
        .is_file()
}

fn check_bpf_linker() -> Result<(), Missing> {
    let out = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map_err(|_| Missing::BpfLinker(None))?;
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    // `bpf-linker 0.10.4`: compare the version word, not a substring (0.10.40 is another version).
    let version = printed.split_whitespace().nth(1);
    if out.status.success() && version == Some(BPF_LINKER_VERSION) {
        Ok(())
    } else {
        Err(Missing::BpfLinker(Some(printed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explanation_names_each_missing_part_and_the_setup_command() {
        let line = explain(&[Missing::RustSrc, Missing::BpfLinker(None)]);
        assert!(
            line.contains("nightly-2026-05-20 has no rust-src"),
            "{line}"
        );
        assert!(line.contains("bpf-linker is not on the PATH"), "{line}");
        assert!(
            line.ends_with("run `cargo xtask setup` to install it"),
            "{line}"
        );
        assert!(!line.contains('\n'), "one line: {line}");
    }

    #[test]
    fn pinned_stable_is_an_exact_release() {
        let parts: Vec<&str> = IMAGE_STABLE.split('.').collect();
        assert_eq!(parts.len(), 3, "{IMAGE_STABLE}: MAJOR.MINOR.PATCH");
        assert!(
            parts.iter().all(|p| p.parse::<u32>().is_ok()),
            "{IMAGE_STABLE}"
        );
    }

    #[test]
    fn pinned_nightly_is_dated() {
        let date = EBPF_NIGHTLY.strip_prefix("nightly-").expect("a nightly");
        let parts: Vec<&str> = date.split('-').collect();
        assert_eq!(parts.len(), 3, "{EBPF_NIGHTLY}: nightly-YYYY-MM-DD");
        assert!(parts.iter().all(|p| p.chars().all(|c| c.is_ascii_digit())));
    }
}
