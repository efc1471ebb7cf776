//! Builds the `netpol-ebpf` TC programs for the BPF target so that `main.rs` can embed the object.
use std::path::PathBuf;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let missing = netpol_toolchain::missing();
    if !missing.is_empty() {
        // One clear line instead of a page of cargo warnings from a build that cannot work.
        println!("cargo::error={}", netpol_toolchain::explain(&missing));
        return Ok(());
    }
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let root_dir = manifest_dir.join("../netpol-ebpf");
    let root_dir = root_dir.to_str().context("non-UTF-8 path to netpol-ebpf")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "netpol-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(netpol_toolchain::EBPF_NIGHTLY),
    )
}
