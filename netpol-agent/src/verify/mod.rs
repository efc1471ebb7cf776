//! `netpol-agent verify`: is NetworkPolicy really enforced on this node, and by what?
//!
//! Evidence is gathered first ([`gather`]: bpf syscalls, TCX queries, pinned links and maps, the
//! agent's control socket, iptables/nftables dumps; [`selftest`]: packets in scratch namespaces), then
//! judged by pure functions ([`checks`]), so the verdicts are unit-tested without root. Every check is
//! one line: PASS, WARN or FAIL, with the evidence it rests on.

pub mod checks;
pub mod gather;
pub mod selftest;

use std::{fmt::Write as _, path::PathBuf};

use serde::Serialize;

use crate::datapath::PinLayout;

/// The verdict of one check. Ordered: the worst outcome of a report is its maximum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Outcome {
    Pass,
    Warn,
    Fail,
}

impl Outcome {
    /// `PASS`, `WARN` or `FAIL`.
    pub const fn label(self) -> &'static str {
        match self {
            Outcome::Pass => "PASS",
            Outcome::Warn => "WARN",
            Outcome::Fail => "FAIL",
        }
    }
}

/// One check: a name, a verdict and the evidence in one line, plus optional detail lines (lists of
/// offending objects, what to do) and machine-readable data for `-o json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Check {
    /// Stable dotted name, such as `kernel.tcx` or `agent.attachments`.
    pub name: &'static str,
    pub outcome: Outcome,
    /// The verdict's evidence, one line.
    pub summary: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Check {
    pub fn new(name: &'static str, outcome: Outcome, summary: impl Into<String>) -> Self {
        Check {
            name,
            outcome,
            summary: summary.into(),
            details: Vec::new(),
            data: None,
        }
    }

    pub fn pass(name: &'static str, summary: impl Into<String>) -> Self {
        Self::new(name, Outcome::Pass, summary)
    }

    pub fn warn(name: &'static str, summary: impl Into<String>) -> Self {
        Self::new(name, Outcome::Warn, summary)
    }

    pub fn fail(name: &'static str, summary: impl Into<String>) -> Self {
        Self::new(name, Outcome::Fail, summary)
    }

    pub fn with_details(mut self, details: Vec<String>) -> Self {
        self.details = details;
        self
    }

    pub fn with_data(mut self, data: serde_json::Value) -> Self {
        self.data = Some(data);
        self
    }
}

/// Every check of one run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    /// The worst outcome (PASS for an empty report).
    pub fn outcome(&self) -> Outcome {
        self.checks
            .iter()
            .map(|c| c.outcome)
            .max()
            .unwrap_or(Outcome::Pass)
    }

    /// Exit status: 0 when every check passed, 1 when any failed, 2 when the worst is a warning.
    pub fn exit_code(&self) -> i32 {
        match self.outcome() {
            Outcome::Pass => 0,
            Outcome::Fail => 1,
            Outcome::Warn => 2,
        }
    }

    /// The human-readable form: one line per check, detail lines indented under it, a verdict last.
    pub fn render_text(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut s = String::new();
        for c in &self.checks {
            let _ = writeln!(
                s,
                "{}  {:<width$}  {}",
                c.outcome.label(),
                c.name,
                c.summary
            );
            for d in &c.details {
                let _ = writeln!(s, "      {:<width$}  - {d}", "");
            }
        }
        let count = |o| self.checks.iter().filter(|c| c.outcome == o).count();
        let _ = writeln!(
            s,
            "\n{}: {} passed, {} warnings, {} failed",
            match self.outcome() {
                Outcome::Pass => "NetworkPolicy is enforced by netpol-agent on this node",
                Outcome::Warn => "enforced, with warnings",
                Outcome::Fail => "NOT proven enforced on this node",
            },
            count(Outcome::Pass),
            count(Outcome::Warn),
            count(Outcome::Fail)
        );
        s
    }
}

/// What `netpol-agent verify` looks at.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// The agent's `--pin-dir`.
    pub layout: PinLayout,
    /// The agent's `--state-dir`.
    pub state_dir: PathBuf,
    /// Also run the active self-test in scratch namespaces.
    pub self_test: bool,
}

/// Gathers the evidence and judges it.
pub async fn verify(opts: &VerifyOptions) -> Report {
    let kernel = gather::kernel(&opts.layout);
    let agent = gather::agent(&opts.state_dir).await;
    let local_pods = gather::local_pods(agent.status.as_ref().ok());
    let datapath = gather::datapath(&opts.layout, agent.status.as_ref().ok());
    let engines = gather::engines();

    let mut checks = checks::kernel(&kernel);
    checks.push(checks::agent(&agent));
    checks.push(checks::attachments(&agent, &datapath));
    checks.push(checks::coverage(
        agent.status.as_ref().ok(),
        &local_pods,
        &datapath,
    ));
    checks.push(checks::other_engines(&engines));
    if opts.self_test {
        let evidence = selftest::run();
        checks.push(checks::self_test(&evidence));
    }
    Report { checks }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        let mut r = Report::default();
        assert_eq!(r.exit_code(), 0);
        r.checks.push(Check::pass("a", "ok"));
        assert_eq!(r.exit_code(), 0);
        r.checks.push(Check::warn("b", "hmm"));
        assert_eq!(r.exit_code(), 2);
        r.checks.push(Check::fail("c", "no"));
        assert_eq!(r.exit_code(), 1);
        let text = r.render_text();
        assert!(text.contains("PASS  a  ok"), "{text}");
        assert!(text.contains("FAIL  c  no"), "{text}");
        assert!(text.contains("1 passed, 1 warnings, 1 failed"), "{text}");
    }

    #[test]
    fn json_shape() {
        let r = Report {
            checks: vec![Check::fail("kernel.tcx", "old").with_details(vec!["x".into()])],
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["checks"][0]["outcome"], "FAIL");
        assert_eq!(v["checks"][0]["name"], "kernel.tcx");
        assert_eq!(v["checks"][0]["details"][0], "x");
        assert!(v["checks"][0].get("data").is_none());
    }
}
