//! `netpol-agent verify`: is NetworkPolicy really enforced on this node, and by what?
//!
//! Evidence is gathered first ([`gather`]: bpf syscalls, TCX queries, pinned links and maps, the
//! agent's control socket, iptables/nftables dumps; [`selftest`]: packets in scratch namespaces), then
//! judged by pure functions ([`checks`]), so the verdicts are unit-tested without root. Every check is
//! one line: PASS, WARN or FAIL, with the evidence it rests on.

pub mod checks;
pub mod cluster;
pub mod compare;
pub mod gather;
pub mod kube_router;
pub mod links;
pub mod netfilter;
pub mod selftest;

use std::{borrow::Cow, fmt::Write as _, path::PathBuf};

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
    /// Stable dotted name, such as `kernel.tcx` or `agent.attachments`; `node/<node name>` for the
    /// per-node checks of `verify --cluster`.
    pub name: Cow<'static, str>,
    pub outcome: Outcome,
    /// The verdict's evidence, one line.
    pub summary: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Check {
    pub fn new(
        name: impl Into<Cow<'static, str>>,
        outcome: Outcome,
        summary: impl Into<String>,
    ) -> Self {
        Check {
            name: name.into(),
            outcome,
            summary: summary.into(),
            details: Vec::new(),
            data: None,
        }
    }

    pub fn pass(name: impl Into<Cow<'static, str>>, summary: impl Into<String>) -> Self {
        Self::new(name, Outcome::Pass, summary)
    }

    pub fn warn(name: impl Into<Cow<'static, str>>, summary: impl Into<String>) -> Self {
        Self::new(name, Outcome::Warn, summary)
    }

    pub fn fail(name: impl Into<Cow<'static, str>>, summary: impl Into<String>) -> Self {
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

/// What a report is about: this node, or every node of the cluster (`--cluster`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    #[default]
    Node,
    Cluster,
}

/// Every check of one run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    /// Only words the closing line of the text form.
    #[serde(skip)]
    pub scope: Scope,
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
            match (self.scope, self.outcome()) {
                (Scope::Node, Outcome::Pass) => {
                    "NetworkPolicy is enforced by netpol-agent on this node"
                }
                (Scope::Cluster, Outcome::Pass) => {
                    "a Ready netpol-agent enforces NetworkPolicy on every node"
                }
                (_, Outcome::Warn) => "enforced, with warnings",
                (Scope::Node, Outcome::Fail) => "NOT proven enforced on this node",
                (Scope::Cluster, Outcome::Fail) => "NOT proven enforced on every node",
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
/// `verify --compare` on the node of the agent behind `state_dir`: its recent flows, judged against
/// the cluster state it saved ([`compare`]).
pub async fn compare_flows(
    state_dir: &std::path::Path,
) -> anyhow::Result<Vec<compare::Difference>> {
    use anyhow::Context as _;
    let status = crate::observe::control::request_status(state_dir).await?;
    let flows = crate::observe::request_flows(state_dir, &Default::default()).await?;
    let saved = crate::sources::persisted::load(state_dir, &status.node)?
        .context("the agent has saved no cluster state yet")?;
    let state = saved.state;
    let allowed = |f: &crate::observe::flows::Flow| end_to_end(&state, f);
    let other = (status.kube_router_chains > 0).then_some("kube-router");
    let cx = compare::Context {
        now: chrono::Utc::now(),
        allowed_end_to_end: &allowed,
        other,
    };
    Ok(compare::differences(&flows, &cx))
}

/// Whether `state`'s policies allow the connection of flow `f` at both ends, with the rules that do.
fn end_to_end(
    state: &crate::model::ClusterState,
    f: &crate::observe::flows::Flow,
) -> Option<compare::EndToEnd> {
    use crate::observe::explain::{self, Party, Verdict};
    let party = |pod: &Option<String>, ip: &str| match pod {
        Some(p) => p.parse().ok(),
        None => ip.parse().ok().map(Party::Address),
    };
    let query = explain::Query {
        from: party(&f.src_pod, &f.src_ip)?,
        // A pod, or an address (a ClusterIP is judged as its Service).
        to: party(&f.dst_pod, &f.dst_ip)?,
        protocol: crate::model::Protocol::parse(&f.protocol.to_uppercase())?,
        port: f.dst_port,
        default_mode: Default::default(),
    };
    let e = explain::explain(state, &query).ok()?;
    let rules = [&e.egress, &e.ingress]
        .into_iter()
        .flatten()
        .flat_map(|s| s.allowed_by.iter().cloned())
        .collect();
    Some(compare::EndToEnd {
        allowed: e.verdict == Verdict::Allowed,
        rules,
    })
}

pub async fn verify(opts: &VerifyOptions) -> Report {
    let kernel = gather::kernel(&opts.layout);
    let agent = gather::agent(&opts.state_dir).await;
    let local_pods = gather::local_pods(agent.status.as_ref().ok());
    let datapath = gather::datapath(&opts.layout, agent.status.as_ref().ok());
    let engines = gather::engines();

    let mut checks = checks::kernel(&kernel);
    checks.push(checks::agent(&agent));
    checks.push(checks::attachments(&agent, &datapath));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    checks.push(checks::coverage(
        agent.status.as_ref().ok(),
        &local_pods,
        &datapath,
        now,
    ));
    checks.push(checks::other_engines(&engines));
    if opts.self_test {
        let evidence = selftest::run();
        checks.push(checks::self_test(&evidence));
    }
    Report {
        checks,
        scope: Scope::Node,
    }
}

/// `verify --cluster`: every node, through the Kubernetes API (`kubeconfig`, or kube's inference).
/// A client that cannot be built is a `cluster.api` FAIL, like an API that does not answer.
pub async fn verify_cluster(kubeconfig: Option<&PathBuf>) -> Report {
    let checks = match crate::sources::kube::client(kubeconfig).await {
        Ok(client) => {
            let api = match kubeconfig {
                Some(path) => format!("the kubeconfig {}", path.display()),
                None => "kube's inferred configuration".to_owned(),
            };
            cluster::judge(&cluster::gather(&client, api).await)
        }
        Err(e) => vec![Check::fail("cluster.api", format!("{e:#}"))],
    };
    Report {
        checks,
        scope: Scope::Cluster,
    }
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
            ..Report::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["checks"][0]["outcome"], "FAIL");
        assert_eq!(v["checks"][0]["name"], "kernel.tcx");
        assert_eq!(v["checks"][0]["details"][0], "x");
        assert!(v["checks"][0].get("data").is_none());
    }
}
