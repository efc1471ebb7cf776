//! Runs `netpol-bench --quick` and checks that the report is complete: every part produced its numbers
//! and every verdict was the expected one. How fast anything was is never checked here.

use netpol_bench::Report;
use netpol_tests::cluster::{default_agent_bin, default_probe_bin};

#[test]
fn quick_bench_produces_a_complete_report() {
    if !netpol_tests::privileged_or_skip(
        "quick_bench_produces_a_complete_report",
        "needs root (BPF, bpffs, network namespaces, iptables)",
    ) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("netpol-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("report.json");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_netpol-bench"))
        .arg("--quick")
        .arg("--out")
        .arg(&out)
        .arg("--agent-bin")
        .arg(default_agent_bin())
        .arg("--probe-bin")
        .arg(default_probe_bin())
        .status()
        .expect("running netpol-bench");
    let report: Report =
        serde_json::from_slice(&std::fs::read(&out).expect("the report was written"))
            .expect("the report parses");
    let _ = std::fs::remove_dir_all(&dir);
    let missing = report.missing();
    assert!(missing.is_empty(), "incomplete report: {missing:#?}");
    assert!(status.success(), "netpol-bench failed: {status}");
    assert!(report.table().contains("| target |"));
}
