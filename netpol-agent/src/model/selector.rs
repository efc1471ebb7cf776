//! Label selectors: validated once, then matched against label sets.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::model::Labels;

/// A selector that failed validation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SelectorError {
    /// Path of the offending field, such as `spec.podSelector.matchExpressions[0].operator`.
    pub field: String,
    pub reason: String,
}

/// One requirement on one label key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Requirement {
    /// The label is present with one of the values.
    In {
        key: String,
        values: BTreeSet<String>,
    },
    /// The label is absent, or present with none of the values.
    NotIn {
        key: String,
        values: BTreeSet<String>,
    },
    /// The label is present.
    Exists { key: String },
    /// The label is absent.
    DoesNotExist { key: String },
}

impl Requirement {
    /// Whether `labels` satisfy the requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Requirement::In { key, values } => labels.get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn { key, values } => {
                labels.get(key).is_none_or(|v| !values.contains(v))
            }
            Requirement::Exists { key } => labels.contains_key(key),
            Requirement::DoesNotExist { key } => !labels.contains_key(key),
        }
    }
}

/// A validated label selector: every requirement must hold (`matchLabels` become `In` with one
/// value). No requirement at all matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// The selector that matches every label set.
    pub fn everything() -> Self {
        Selector::default()
    }

    /// Validates `selector`; `field` is its path, used to name the offending field in errors.
    pub fn parse(selector: &LabelSelector, field: &str) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            requirements.push(Requirement::In {
                key: key.clone(),
                values: BTreeSet::from([value.clone()]),
            });
        }
        for (i, expr) in selector.match_expressions.iter().flatten().enumerate() {
            let here = format!("{field}.matchExpressions[{i}]");
            let error = |sub: &str, reason: String| SelectorError {
                field: format!("{here}.{sub}"),
                reason,
            };
            if expr.key.is_empty() {
                return Err(error("key", "must not be empty".into()));
            }
            let key = expr.key.clone();
            let values: BTreeSet<String> = expr.values.iter().flatten().cloned().collect();
            let requirement = match expr.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(error(
                        "values",
                        format!("must not be empty for operator {}", expr.operator),
                    ));
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(error(
                        "values",
                        format!("must be empty for operator {}", expr.operator),
                    ));
                }
                "In" => Requirement::In { key, values },
                "NotIn" => Requirement::NotIn { key, values },
                "Exists" => Requirement::Exists { key },
                "DoesNotExist" => Requirement::DoesNotExist { key },
                other => {
                    return Err(error(
                        "operator",
                        format!(
                            "unknown operator {other:?} (expected In, NotIn, Exists or DoesNotExist)"
                        ),
                    ));
                }
            };
            requirements.push(requirement);
        }
        Ok(Selector { requirements })
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// True for the selector that matches everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// The requirements, `matchLabels` first.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(json: serde_json::Value) -> Result<Selector, SelectorError> {
        Selector::parse(&serde_json::from_value(json).unwrap(), "spec.podSelector")
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_selector_matches_everything() {
        let s = sel(serde_json::json!({})).unwrap();
        assert!(s.is_empty());
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_all_must_match() {
        let s = sel(serde_json::json!({"matchLabels": {"app": "web", "tier": "fe"}})).unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "fe"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "be")])));
    }

    #[test]
    fn operators() {
        let s = |op: &str, values: &[&str]| {
            sel(serde_json::json!({"matchExpressions": [{"key": "env", "operator": op, "values": values}]}))
                .unwrap()
        };
        let prod = labels(&[("env", "prod")]);
        let dev = labels(&[("env", "dev")]);
        let none = labels(&[]);

        let is_in = s("In", &["prod", "staging"]);
        assert!(is_in.matches(&prod));
        assert!(!is_in.matches(&dev));
        assert!(!is_in.matches(&none));

        let not_in = s("NotIn", &["prod"]);
        assert!(!not_in.matches(&prod));
        assert!(not_in.matches(&dev));
        assert!(not_in.matches(&none), "NotIn matches an absent label");

        let exists = s("Exists", &[]);
        assert!(exists.matches(&dev));
        assert!(!exists.matches(&none));

        let absent = s("DoesNotExist", &[]);
        assert!(!absent.matches(&dev));
        assert!(absent.matches(&none));
    }

    #[test]
    fn labels_and_expressions_are_anded() {
        let s = sel(serde_json::json!({"matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["prod"]}]}))
        .unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("env", "dev")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("env", "prod")])));
        assert!(!s.matches(&labels(&[("app", "db"), ("env", "dev")])));
    }

    #[test]
    fn errors_name_the_field() {
        let err = sel(serde_json::json!({"matchExpressions": [
            {"key": "a", "operator": "Exists"},
            {"key": "b", "operator": "Equals", "values": ["x"]}]}))
        .unwrap_err();
        assert_eq!(err.field, "spec.podSelector.matchExpressions[1].operator");
        assert!(err.reason.contains("Equals"), "{err}");

        let err = sel(
            serde_json::json!({"matchExpressions": [{"key": "a", "operator": "In", "values": []}]}),
        )
        .unwrap_err();
        assert_eq!(err.field, "spec.podSelector.matchExpressions[0].values");

        let err = sel(serde_json::json!({"matchExpressions": [{"key": "a", "operator": "NotIn"}]}))
            .unwrap_err();
        assert_eq!(err.field, "spec.podSelector.matchExpressions[0].values");

        let err = sel(serde_json::json!({"matchExpressions": [
            {"key": "a", "operator": "Exists", "values": ["x"]}]}))
        .unwrap_err();
        assert_eq!(err.field, "spec.podSelector.matchExpressions[0].values");

        let err = sel(serde_json::json!({"matchExpressions": [
            {"key": "a", "operator": "DoesNotExist", "values": ["x"]}]}))
        .unwrap_err();
        assert_eq!(err.field, "spec.podSelector.matchExpressions[0].values");
    }
}
