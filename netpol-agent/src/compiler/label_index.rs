//! Pod identities by label, so that resolving a peer such as `namespaceSelector: {}` with
//! `podSelector: {app: dns}` costs the identities labelled `app=dns`, not one selector match per
//! identity of the cluster (50,000 of them, for each rule of each local policy).
//!
//! The index narrows, the selector decides: it gives every identity that can match (and perhaps
//! some that cannot), and each is then matched in full. It is built once per numbering of the
//! identities and kept while the numbering stays (a policy edit does not rebuild it).

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use crate::model::identity::PodIdentityKey;
use crate::model::selector::{Requirement, Selector};

/// The identity numbering an index is built from.
pub type Numbers = Arc<BTreeMap<Arc<PodIdentityKey>, u32>>;

/// Positions (in the numbering's key order) of the identities that have a label, by label.
#[derive(Clone, Debug, Default)]
pub struct LabelIndex {
    built_for: Option<Numbers>,
    /// By the hash of (key, value). A collision only adds candidates, which the selector then
    /// rejects: a label crafted to collide costs time, never a wrong match.
    by_pair: HashMap<u64, Vec<u32>>,
    /// By the hash of the key.
    by_key: HashMap<u64, Vec<u32>>,
}

fn hash_of(parts: &[&str]) -> u64 {
    let mut h = DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

impl LabelIndex {
    /// The index of `numbers`.
    pub fn new(numbers: &Numbers) -> Self {
        let mut index = LabelIndex {
            built_for: Some(numbers.clone()),
            ..LabelIndex::default()
        };
        for (position, key) in (0u32..).zip(numbers.keys()) {
            for (k, v) in key.labels.iter() {
                let pair = index.by_pair.entry(hash_of(&[k, v])).or_default();
                pair.push(position);
                let any = index.by_key.entry(hash_of(&[k])).or_default();
                any.push(position);
            }
        }
        index
    }

    /// Whether the index was built from `numbers` (the same allocation, so the same positions).
    pub fn is_for(&self, numbers: &Numbers) -> bool {
        self.built_for
            .as_ref()
            .is_some_and(|n| Arc::ptr_eq(n, numbers))
    }

    /// Positions, ascending, of every identity `selector` can match; `None` when no requirement
    /// of it narrows the search (only `NotIn` and `DoesNotExist`, or none).
    pub fn candidates(&self, selector: &Selector) -> Option<Vec<u32>> {
        let mut best: Option<Vec<u32>> = None;
        for requirement in selector.requirements() {
            let found = match requirement {
                Requirement::In { key, values } => {
                    let mut found: Vec<u32> = values
                        .iter()
                        .filter_map(|v| self.by_pair.get(&hash_of(&[key, v])))
                        .flatten()
                        .copied()
                        .collect();
                    found.sort_unstable();
                    found.dedup();
                    found
                }
                Requirement::Exists { key } => self
                    .by_key
                    .get(&hash_of(&[key]))
                    .cloned()
                    .unwrap_or_default(),
                Requirement::NotIn { .. } | Requirement::DoesNotExist { .. } => continue,
            };
            if best.as_ref().is_none_or(|b| found.len() < b.len()) {
                best = Some(found);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Labels;

    fn numbers(pods: &[(&str, &[(&str, &str)])]) -> Numbers {
        let keys = pods.iter().map(|(ns, labels)| {
            let labels: Labels = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Arc::new(PodIdentityKey {
                namespace: ns.to_string(),
                labels: Arc::new(labels),
                ports: Vec::new(),
            })
        });
        Arc::new(crate::model::identity::number_pods(keys))
    }

    fn selector(json: serde_json::Value) -> Selector {
        Selector::parse(&serde_json::from_value(json).unwrap(), "s").unwrap()
    }

    /// The candidates, as the (namespace, app) of each.
    fn found(n: &Numbers, s: &Selector) -> Option<Vec<(String, String)>> {
        let keys: Vec<_> = n.keys().collect();
        let index = LabelIndex::new(n);
        let named = |p: &u32| {
            let k = keys[*p as usize];
            (
                k.namespace.clone(),
                k.labels.get("app").cloned().unwrap_or_default(),
            )
        };
        index.candidates(s).map(|c| c.iter().map(named).collect())
    }

    #[test]
    fn narrows_by_the_rarest_required_label_and_never_drops_a_match() {
        let n = numbers(&[
            ("a", &[("app", "dns"), ("tier", "infra")]),
            ("b", &[("app", "dns"), ("tier", "infra")]),
            ("b", &[("app", "web"), ("tier", "front")]),
            ("c", &[("app", "db"), ("tier", "back")]),
        ]);
        let s = selector(serde_json::json!({"matchLabels": {"app": "dns"}}));
        let dns = vec![("a".into(), "dns".into()), ("b".into(), "dns".into())];
        assert_eq!(found(&n, &s), Some(dns));
        let s = selector(serde_json::json!({"matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["front", "back"]},
            {"key": "app", "operator": "Exists"}]}));
        let some = vec![("b".into(), "web".into()), ("c".into(), "db".into())];
        assert_eq!(found(&n, &s), Some(some));
        let s = selector(serde_json::json!({"matchLabels": {"app": "nothing"}}));
        assert_eq!(found(&n, &s), Some(vec![]));
    }

    #[test]
    fn selectors_that_cannot_narrow_ask_for_a_scan() {
        let n = numbers(&[("a", &[("app", "dns")])]);
        for s in [
            serde_json::json!({}),
            serde_json::json!({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}),
            serde_json::json!({"matchExpressions": [
                {"key": "app", "operator": "NotIn", "values": ["x"]}]}),
        ] {
            assert_eq!(found(&n, &selector(s.clone())), None, "{s}");
        }
    }

    /// Over generated identities and selectors: every identity a selector matches is a candidate.
    #[test]
    fn generated_selectors_never_lose_a_match() {
        let mut rng = fastrand::Rng::with_seed(7);
        let (keys, values) = (["app", "tier", "team"], ["a", "b", "c"]);
        for _ in 0..200 {
            let pods: Vec<(String, Vec<(&str, &str)>)> = (0..rng.usize(1..30))
                .map(|i| {
                    let mut labels = Vec::new();
                    for k in keys {
                        if rng.bool() {
                            labels.push((k, values[rng.usize(..3)]));
                        }
                    }
                    (format!("ns{}", i % 3), labels)
                })
                .collect();
            let borrowed: Vec<(&str, &[(&str, &str)])> = pods
                .iter()
                .map(|(ns, l)| (ns.as_str(), l.as_slice()))
                .collect();
            let n = numbers(&borrowed);
            let ops = ["In", "NotIn", "Exists", "DoesNotExist"];
            let expressions: Vec<serde_json::Value> = (0..rng.usize(0..3))
                .map(|_| {
                    let op = ops[rng.usize(..4)];
                    let vals: Vec<&str> = match op {
                        "In" | "NotIn" => vec![values[rng.usize(..3)], values[rng.usize(..3)]],
                        _ => vec![],
                    };
                    serde_json::json!({"key": keys[rng.usize(..3)], "operator": op, "values": vals})
                })
                .collect();
            let s = selector(serde_json::json!({"matchExpressions": expressions}));
            let Some(candidates) = LabelIndex::new(&n).candidates(&s) else {
                continue;
            };
            for (position, key) in (0u32..).zip(n.keys()) {
                if s.matches(&key.labels) {
                    assert!(candidates.contains(&position), "{s:?} lost {key:?}");
                }
            }
        }
    }

    #[test]
    fn an_index_belongs_to_one_numbering() {
        let n = numbers(&[("a", &[("app", "dns")])]);
        let index = LabelIndex::new(&n);
        assert!(index.is_for(&n));
        assert!(!index.is_for(&numbers(&[("a", &[("app", "dns")])])));
    }
}
