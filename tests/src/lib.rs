//! Test support for netpol-agent: the simulated Flannel cluster ([`cluster`]) with kube-proxy's
//! Service rules ([`kube_proxy`]), a test double of the Kubernetes API server ([`apiserver_double`]),
//! crafted packets
//! ([`packets`]), a pod that talks from its first instant and the CNI plugin as a runtime runs it
//! ([`first_packet`]), and the rule that privileged tests may only skip where they cannot run.
pub mod agent_cli;
pub mod apiserver_double;
pub mod cluster;
pub mod cnp_cases;
pub mod first_packet;
pub mod kube_proxy;
pub mod packets;

/// Environment variable set by `cargo xtask test` on machines that can run privileged tests (root, BPF,
/// network namespaces): there a test that would skip fails instead, so a green run means they ran.
pub const REQUIRE_PRIVILEGED: &str = "NETPOL_REQUIRE_PRIVILEGED";

/// True when the test can run (root). Otherwise prints `SKIP: <test>: <why>` and returns false, or
/// panics when [`REQUIRE_PRIVILEGED`] says this machine must run it.
pub fn privileged_or_skip(test: &str, why: &str) -> bool {
    if cluster::is_root() {
        return true;
    }
    assert!(
        std::env::var_os(REQUIRE_PRIVILEGED).is_none(),
        "{test} would skip ({why}), but {REQUIRE_PRIVILEGED} is set: this machine must run it"
    );
    println!("SKIP: {test}: {why}");
    false
}

/// The venv where `cargo xtask setup` installs Python tools (kubernetes-validate):
/// `<target dir>/tools/venv`.
pub fn tools_venv() -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("tools").join("venv")
}
