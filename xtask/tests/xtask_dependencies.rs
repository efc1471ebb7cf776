//! `cargo xtask` must build on a machine that has only stable Rust, since it is the command that
//! installs the eBPF toolchain: no crate in its dependency closure may build eBPF programs (the
//! agent's build script needs the pinned nightly, rust-src and bpf-linker).

use std::{
    collections::{BTreeSet, HashMap},
    process::Command,
};

use serde_json::Value;

/// `cargo metadata` of this workspace, with the resolved dependency graph.
fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

/// A package builds eBPF if it is the eBPF crate or its build script uses aya-build.
fn builds_ebpf(package: &Value) -> bool {
    package["name"] == "netpol-ebpf"
        || package["dependencies"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|d| d["kind"] == "build" && d["name"] == "aya-build")
}

/// The names of the packages that building `root` builds (normal and build dependencies, not dev).
fn closure(meta: &Value, root: &str) -> BTreeSet<String> {
    let packages: HashMap<&str, &Value> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| (p["id"].as_str().expect("id"), p))
        .collect();
    let nodes: HashMap<&str, &Value> = meta["resolve"]["nodes"]
        .as_array()
        .expect("resolve.nodes")
        .iter()
        .map(|n| (n["id"].as_str().expect("id"), n))
        .collect();
    let root_id = packages
        .iter()
        .find(|(_, p)| p["name"] == root && p["source"].is_null())
        .map(|(id, _)| *id)
        .unwrap_or_else(|| panic!("{root} is not a workspace package"));
    let mut seen = BTreeSet::from([root_id]);
    let mut todo = vec![root_id];
    while let Some(id) = todo.pop() {
        for dep in nodes[id]["deps"].as_array().expect("deps") {
            let not_dev = dep["dep_kinds"]
                .as_array()
                .expect("dep_kinds")
                .iter()
                .any(|k| k["kind"] != "dev");
            let dep_id = dep["pkg"].as_str().expect("pkg");
            if not_dev && seen.insert(dep_id) {
                todo.push(dep_id);
            }
        }
    }
    seen.iter()
        .filter(|id| builds_ebpf(packages[*id]))
        .map(|id| packages[id]["name"].as_str().expect("name").to_owned())
        .collect()
}

#[test]
fn xtask_builds_nothing_that_builds_ebpf() {
    let ebpf = closure(&metadata(), "xtask");
    assert!(
        ebpf.is_empty(),
        "xtask depends on {ebpf:?}, which build eBPF: `cargo xtask setup` could not run on a fresh machine"
    );
}

#[test]
fn the_check_sees_the_agent_build_through_the_test_crate() {
    // The same check on a crate that does depend on the agent, so the guard above cannot pass
    // vacuously (a renamed key in cargo's output, say).
    let ebpf = closure(&metadata(), "netpol-tests");
    assert!(ebpf.contains("netpol-agent"), "{ebpf:?}");
}
