//! `verify --compare`: where this node's recent flows show that netpol-agent and another filter on
//! the path (kube-router's iptables rules, during a switch-over) decide differently.
//!
//! The programs see a pod's packets at its veth: what it sends before the node's iptables, what it
//! receives after them. So two kinds of difference show in the flow records, and nothing else is
//! reported:
//! - [`Kind::WouldDropWentOn`]: netpol-agent (in audit mode) would drop the flow, and it went on: it
//!   was delivered to the local pod (ingress, after every filter of the node), or a reply came back
//!   (egress);
//! - [`Kind::AllowedNoReply`]: netpol-agent allows the connection end to end (both pods' policies, as
//!   `explain` judges it), a local pod sent it, and no reply ever came: something else on the way
//!   dropped it (or the peer never answers, which a UDP flow may do by design).
//!
//! Pure: the flows, the end-to-end verdict and the other engine's name come from the caller.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::observe::flows::Flow;

/// How long a flow must have been quiet before its missing reply counts: replies in flight are not
/// differences.
pub const SETTLE: Duration = Duration::from_secs(2);

/// The kind of a difference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// netpol-agent would drop it, and the packets went on.
    WouldDropWentOn,
    /// netpol-agent allows it, but no reply ever came.
    AllowedNoReply,
}

/// One flow on which the engines disagree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub kind: Kind,
    /// `namespace/pod` or address, and port.
    pub from: String,
    pub to: String,
    pub protocol: String,
    /// Where the agent saw it: `ingress` (delivered to the local pod) or `egress` (sent by it).
    pub direction: String,
    pub packets: u64,
    /// The policies that decide: those that would drop it (audited), or those that allow it.
    pub policies: Vec<String>,
    /// What else decided, in words.
    pub explanation: String,
}

/// What netpol-agent's policies say of a connection end to end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndToEnd {
    /// Both ends allow it.
    pub allowed: bool,
    /// The rules that allow it (`namespace/policy ingress[0]`).
    pub rules: Vec<String>,
}

/// Judges the connection of a flow end to end; `None` when it cannot tell (an unknown pod).
pub type Judge<'a> = &'a dyn Fn(&Flow) -> Option<EndToEnd>;

/// What [`differences`] needs besides the flows.
pub struct Context<'a> {
    /// When the flows were read.
    pub now: DateTime<Utc>,
    /// Whether netpol-agent's policies allow the connection of an egress flow end to end, with
    /// the policies that allow it; `None` when it cannot tell (an unknown pod).
    pub allowed_end_to_end: Judge<'a>,
    /// The other engine whose rules are on the node (`kube-router`), if any.
    pub other: Option<&'a str>,
}

/// The differences the flow records show.
pub fn differences(flows: &[Flow], cx: &Context<'_>) -> Vec<Difference> {
    let mut out: Vec<Difference> = flows
        .iter()
        .filter_map(|f| would_drop_went_on(f, flows, cx).or_else(|| allowed_no_reply(f, flows, cx)))
        .collect();
    out.sort_by(|a, b| (a.kind, &a.from, &a.to).cmp(&(b.kind, &b.from, &b.to)));
    out
}

fn would_drop_went_on(f: &Flow, flows: &[Flow], cx: &Context<'_>) -> Option<Difference> {
    if f.verdict != "audit" {
        return None;
    }
    let delivered = f.direction == "ingress";
    if !delivered && !has_reply(f, flows) {
        return None;
    }
    let passed = cx.other.unwrap_or("the node's other filters");
    let explanation = if delivered {
        format!("netpol-agent would drop it; {passed} let it reach the pod")
    } else {
        format!("netpol-agent would drop it; {passed} let it through (a reply came back)")
    };
    Some(difference(
        Kind::WouldDropWentOn,
        f,
        f.policies.clone(),
        explanation,
    ))
}

fn allowed_no_reply(f: &Flow, flows: &[Flow], cx: &Context<'_>) -> Option<Difference> {
    let connection = matches!(f.protocol.as_str(), "tcp" | "udp" | "sctp");
    let opens = !matches!(f.reason.as_str(), "reply" | "established");
    if f.direction != "egress" || f.verdict != "allowed" || !connection || !opens {
        return None;
    }
    if !settled(f, cx.now) || has_reply(f, flows) {
        return None;
    }
    let judged = (cx.allowed_end_to_end)(f)?;
    if !judged.allowed {
        return None;
    }
    let policies = judged.rules;
    let explanation = match cx.other {
        Some(other) => format!("netpol-agent allows it, but no reply came: {other} dropped it?"),
        None => "netpol-agent allows it, but no reply came: dropped on the way, or the peer never answers".to_owned(),
    };
    Some(difference(Kind::AllowedNoReply, f, policies, explanation))
}

fn difference(kind: Kind, f: &Flow, policies: Vec<String>, explanation: String) -> Difference {
    let end = |pod: &Option<String>, ip: &str, port: u16| {
        format!("{}:{port}", pod.as_deref().unwrap_or(ip))
    };
    Difference {
        kind,
        from: end(&f.src_pod, &f.src_ip, f.src_port),
        to: end(&f.dst_pod, &f.dst_ip, f.dst_port),
        protocol: f.protocol.clone(),
        direction: f.direction.clone(),
        packets: f.packets,
        policies,
        explanation,
    }
}

/// Whether a flow of the reverse tuple, the other way at the same pod, was seen.
fn has_reply(f: &Flow, flows: &[Flow]) -> bool {
    flows.iter().any(|r| {
        r.src_ip == f.dst_ip
            && r.dst_ip == f.src_ip
            && r.src_port == f.dst_port
            && r.dst_port == f.src_port
            && r.protocol == f.protocol
            && r.direction != f.direction
            && r.packets > 0
    })
}

/// Whether the flow's last packet is at least [`SETTLE`] old.
fn settled(f: &Flow, now: DateTime<Utc>) -> bool {
    DateTime::parse_from_rfc3339(&f.time).is_ok_and(|t| {
        now.signed_duration_since(t)
            .to_std()
            .is_ok_and(|age| age >= SETTLE)
    })
}

/// The differences as text, one line each.
pub fn render_text(diffs: &[Difference]) -> String {
    if diffs.is_empty() {
        return "no differences in this node's recent flows\n".to_owned();
    }
    let mut out = String::new();
    for d in diffs {
        let policies = if d.policies.is_empty() {
            "-".to_owned()
        } else {
            d.policies.join(",")
        };
        out.push_str(&format!(
            "{:?}: {} -> {} {} ({} at the pod, {} packets; policies {policies}): {}\n",
            d.kind, d.from, d.to, d.protocol, d.direction, d.packets, d.explanation
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(src: &str, dst: &str, sport: u16, dport: u16, direction: &str) -> Flow {
        Flow {
            time: "2026-11-30T10:00:00.000Z".into(),
            node: "n0".into(),
            src_ip: src.into(),
            src_port: sport,
            dst_ip: dst.into(),
            dst_port: dport,
            protocol: "udp".into(),
            direction: direction.into(),
            verdict: "allowed".into(),
            reason: "not-isolated".into(),
            policies: Vec::new(),
            packets: 3,
            bytes: 174,
            src_pod: None,
            dst_pod: None,
        }
    }

    fn cx(allowed: Judge<'_>) -> Context<'_> {
        Context {
            now: "2026-11-30T10:00:05Z".parse().unwrap(),
            allowed_end_to_end: allowed,
            other: Some("kube-router"),
        }
    }

    #[test]
    fn reports_both_kinds_and_nothing_else() {
        let (c, a) = ("10.42.0.3", "10.42.0.2");
        let mut audited_in = flow(c, a, 1000, 81, "ingress");
        audited_in.verdict = "audit".into();
        audited_in.policies = vec!["x/p".into()];
        let flows = vec![
            // Dropped on the way although allowed: no reply.
            flow(c, a, 1000, 80, "egress"),
            // Audited at delivery (would drop, went on); its egress side had a reply.
            flow(c, a, 1000, 81, "egress"),
            audited_in,
            flow(a, c, 81, 1000, "egress"),
            flow(a, c, 81, 1000, "ingress"),
            // Denied by both: no reply, but netpol-agent denies it end to end.
            flow(c, a, 1000, 82, "egress"),
        ];
        let verdict = |f: &Flow| {
            Some(EndToEnd {
                allowed: f.dst_port != 82,
                rules: vec!["x/p".to_owned()],
            })
        };
        let d = differences(&flows, &cx(&verdict));
        let got: Vec<(Kind, &str, &str)> = d
            .iter()
            .map(|d| (d.kind, d.to.as_str(), d.direction.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (Kind::WouldDropWentOn, "10.42.0.2:81", "ingress"),
                (Kind::AllowedNoReply, "10.42.0.2:80", "egress"),
            ]
        );
        assert!(d[1].explanation.contains("kube-router"));
        assert_eq!(d[0].policies, ["x/p"]);
    }

    #[test]
    fn a_reply_in_flight_is_not_a_difference() {
        let mut fresh = flow("10.42.0.3", "10.42.0.2", 1000, 80, "egress");
        fresh.time = "2026-11-30T10:00:04.500Z".into();
        let verdict = |_: &Flow| {
            Some(EndToEnd {
                allowed: true,
                rules: Vec::new(),
            })
        };
        assert!(differences(&[fresh], &cx(&verdict)).is_empty());
        // An audited egress flow without a reply: both drop it, as far as the node can tell.
        let mut audited_out = flow("10.42.0.3", "10.42.0.2", 1000, 80, "egress");
        audited_out.verdict = "audit".into();
        assert!(differences(&[audited_out], &cx(&verdict)).is_empty());
    }
}
