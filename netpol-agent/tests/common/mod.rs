//! What the agent crate's integration tests share.

/// True when the test can run (root). Otherwise prints `SKIP: <what>` and returns false, or fails
/// when `NETPOL_REQUIRE_PRIVILEGED` says this machine must run it: the same rule as
/// `netpol_tests::privileged_or_skip` (this crate cannot depend on the tests crate).
pub fn privileged(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("NETPOL_REQUIRE_PRIVILEGED").is_none(),
        "NETPOL_REQUIRE_PRIVILEGED is set but {what} is not root"
    );
    eprintln!("SKIP: {what} needs root");
    false
}
