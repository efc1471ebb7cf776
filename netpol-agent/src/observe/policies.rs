//! `netpol-agent policies`: every policy with its mode, the local pods it decides for, and the hit
//! counters of each of its rules, so that a review finds the rules nothing uses.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use netpol_common::{Direction, RuleHits, RuleKey, rule_code};

use super::flows::{Clock, PolicyInfo, Resolver, direction_name, rfc3339};

/// One rule of a policy and what it allowed on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleReport {
    /// `ingress[0]`, `egress[2]`: the rule's index in its policy, as Calico and Cilium name it;
    /// followed by its name where it has one (ClusterNetworkPolicy).
    pub rule: String,
    /// Packets, both ways, of the connections it allowed.
    pub packets: u64,
    pub bytes: u64,
    /// Connections it allowed.
    pub connections: u64,
    /// RFC 3339 of its last packet; null when it never matched (since its counters began).
    pub last_hit: Option<String>,
}

/// One policy as `policies` prints it. The JSON fields are a stable interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyReport {
    /// `namespace/name`, or `cnp:admin/name` and `cnp:baseline/name` for a ClusterNetworkPolicy.
    pub policy: String,
    /// `enforce` or `audit`.
    pub mode: String,
    /// Local pods it isolates and decides for.
    pub local_pods: usize,
    pub rules: Vec<RuleReport>,
}

/// The report of the running agent behind `observer`, as the control socket serves it.
pub fn answer(observer: &super::Observer) -> serde_json::Value {
    match super::ObserveMaps::open(observer.layout()) {
        Ok(maps) => {
            let reports = report(&observer.resolver(), &maps.rule_hits(), &super::clock());
            serde_json::json!({ "policies": reports })
        }
        Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
    }
}

/// Asks the agent behind `state_dir` for its policy report.
pub async fn request(state_dir: &std::path::Path) -> anyhow::Result<Vec<PolicyReport>> {
    super::request_answer(state_dir, "policies", "policies").await
}

/// Marks the rules whose last hit is before `cutoff` as never matched (their counts stay): what
/// `policies --since` reviews.
pub fn forget_hits_before(reports: &mut [PolicyReport], cutoff: chrono::DateTime<chrono::Utc>) {
    for r in reports.iter_mut().flat_map(|p| p.rules.iter_mut()) {
        let old = r
            .last_hit
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .is_some_and(|t| t < cutoff);
        if old {
            r.last_hit = None;
        }
    }
}

/// The rule name of a [`rule_code`] (`ingress[0]`).
pub fn rule_name(code: u32) -> Option<String> {
    let (direction, index) = rule_code::parse(code)?;
    Some(format!("{}[{index}]", direction_name(direction as u8)))
}

/// The report of every policy `resolver` knows, with the counters `hits` read from the datapath.
pub fn report(
    resolver: &Resolver,
    hits: &[(RuleKey, RuleHits)],
    clock: &Clock,
) -> Vec<PolicyReport> {
    let hits: HashMap<RuleKey, RuleHits> = hits.iter().copied().collect();
    resolver
        .catalog()
        .iter()
        .map(|p| PolicyReport {
            policy: p.key.to_string(),
            mode: p.mode.name().to_owned(),
            local_pods: p.local_pods,
            rules: rules_of(p, &hits, clock),
        })
        .collect()
}

fn rules_of(p: &PolicyInfo, hits: &HashMap<RuleKey, RuleHits>, clock: &Clock) -> Vec<RuleReport> {
    let rules = [
        (Direction::Ingress, p.ingress_rules),
        (Direction::Egress, p.egress_rules),
    ];
    rules
        .into_iter()
        .flat_map(|(dir, n)| (0..n).map(move |i| rule_code::of(dir, i)))
        .filter_map(|code| {
            let key = RuleKey {
                policy: p.id,
                rule: code,
            };
            let h = hits.get(&key).copied().unwrap_or_default();
            Some(RuleReport {
                rule: p.rule_label(code)?,
                packets: h.packets,
                bytes: h.bytes,
                connections: h.connections,
                last_hit: (h.packets > 0).then(|| rfc3339(clock.unix_ns(h.last_hit_ns))),
            })
        })
        .collect()
}

/// The report as a table: one line per rule, `never matched` where nothing hit it.
pub fn render_table(reports: &[PolicyReport]) -> String {
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::NOTHING)
        .set_header([
            "POLICY",
            "MODE",
            "LOCAL PODS",
            "RULE",
            "CONNECTIONS",
            "PACKETS",
            "BYTES",
            "LAST HIT",
        ]);
    for p in reports {
        if p.rules.is_empty() {
            table.add_row([
                &p.policy,
                &p.mode,
                &p.local_pods.to_string(),
                "-",
                "",
                "",
                "",
                "",
            ]);
        }
        for r in &p.rules {
            let last = r.last_hit.clone().unwrap_or_else(|| "never matched".into());
            table.add_row([
                p.policy.clone(),
                p.mode.clone(),
                p.local_pods.to_string(),
                r.rule.clone(),
                r.connections.to_string(),
                r.packets.to_string(),
                r.bytes.to_string(),
                last,
            ]);
        }
    }
    table.to_string()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::compiler::policy_id;
    use crate::model::mode::Mode;
    use crate::model::{ClusterState, Object, PodKey, Policy};

    #[test]
    fn every_rule_is_listed_with_its_hits_or_as_never_matched() {
        let mut s = ClusterState::default();
        let spec = "podSelector: {}\ningress: [{}, {ports: [{port: 80}]}]\negress: [{}]";
        s.insert(Object::Policy(Policy {
            key: PodKey::new("x", "p"),
            origin: crate::model::Origin::Api,
            spec: serde_yaml_ng::from_str(spec).unwrap(),
            mode: Some("audit".into()),
        }));
        let isolating = BTreeMap::from([((7, Direction::Ingress), vec![PodKey::new("x", "p")])]);
        let r = Resolver::new(&s, &BTreeMap::new(), &isolating, Mode::Enforce);
        let key = RuleKey {
            policy: policy_id(&PodKey::new("x", "p")),
            rule: rule_code::of(Direction::Ingress, 1),
        };
        let hits = [(
            key,
            RuleHits {
                packets: 5,
                bytes: 500,
                connections: 2,
                last_hit_ns: 1_000_000_000,
            },
        )];
        let clock = Clock {
            mono_ns: 0,
            unix_ns: 1_700_000_000_000_000_000,
        };
        let out = report(&r, &hits, &clock);
        assert_eq!(out.len(), 1);
        let p = &out[0];
        assert_eq!(
            (p.policy.as_str(), p.mode.as_str(), p.local_pods),
            ("x/p", "audit", 1)
        );
        let names: Vec<&str> = p.rules.iter().map(|r| r.rule.as_str()).collect();
        assert_eq!(names, ["ingress[0]", "ingress[1]", "egress[0]"]);
        assert_eq!(p.rules[0].last_hit, None);
        let hit = &p.rules[1];
        assert_eq!((hit.packets, hit.bytes, hit.connections), (5, 500, 2));
        assert_eq!(hit.last_hit.as_deref(), Some("2023-11-14T22:13:21.000Z"));
        let table = render_table(&out);
        assert_eq!(table.matches("never matched").count(), 2, "{table}");
        let mut since = out.clone();
        forget_hits_before(&mut since, "2023-11-14T22:13:22Z".parse().unwrap());
        assert_eq!(since[0].rules[1].last_hit, None, "hit before the cutoff");
        let mut since = out;
        forget_hits_before(&mut since, "2023-11-14T22:13:20Z".parse().unwrap());
        assert!(since[0].rules[1].last_hit.is_some(), "hit after the cutoff");
    }

    #[test]
    fn rule_codes_name_their_rules() {
        assert_eq!(
            rule_name(rule_code::of(Direction::Egress, 3)).as_deref(),
            Some("egress[3]")
        );
        assert_eq!(rule_name(rule_code::NONE), None);
        assert_eq!(
            rule_code::of(Direction::Ingress, rule_code::MAX_INDEX + 1),
            rule_code::NONE
        );
    }
}
