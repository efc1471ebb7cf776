//! The shipped alert rules (deploy/prometheusrule.yaml) load in Prometheus' own checker and fire
//! on the series that mean trouble, in `promtool test rules` (inputs: tests/data/alerts-test.yaml).

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A scratch directory, removed on drop (also when the test fails).
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn promtool(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("promtool")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("promtool (Debian's prometheus package, installed by cargo xtask setup)");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_alert_rules_load_and_fire() {
    let rule: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo().join("deploy/prometheusrule.yaml")).unwrap(),
    )
    .expect("deploy/prometheusrule.yaml parses");
    assert_eq!(rule["kind"], "PrometheusRule");
    let dir = Dir(std::env::temp_dir().join(format!("netpol-alerts-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let rules = serde_yaml_ng::to_string(&rule["spec"]).unwrap();
    std::fs::write(dir.0.join("rules.yaml"), rules).unwrap();
    std::fs::copy(
        repo().join("tests/data/alerts-test.yaml"),
        dir.0.join("test.yaml"),
    )
    .unwrap();
    promtool(&dir.0, &["check", "rules", "rules.yaml"]);
    promtool(&dir.0, &["test", "rules", "test.yaml"]);
}
