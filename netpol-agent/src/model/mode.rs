//! Enforcement modes. A policy in audit mode is compiled and evaluated like any other, but the
//! denials it alone causes pass as would-be drops (`audit` in flows, events and metrics). The mode
//! of a policy is its own `netpol.io/mode` annotation, else its namespace's, else the node's
//! `--default-mode`: the most specific setting wins.

use serde::{Deserialize, Serialize};

/// The annotation that sets the mode of a NetworkPolicy or of every policy of a Namespace.
pub const ANNOTATION: &str = "netpol.io/mode";

/// Where a mode is read from, for error messages.
pub const FIELD: &str = "metadata.annotations[\"netpol.io/mode\"]";

/// How a policy's denials are applied.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Denied packets are dropped.
    #[default]
    Enforce,
    /// Denied packets pass and are recorded as `audit`.
    Audit,
}

impl Mode {
    /// The annotation value of the mode.
    pub const fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }

    /// The mode an annotation value names.
    pub fn parse(value: &str) -> Result<Mode, ModeError> {
        match value {
            "enforce" => Ok(Mode::Enforce),
            "audit" => Ok(Mode::Audit),
            other => Err(ModeError {
                value: other.to_owned(),
            }),
        }
    }
}

/// An annotation value that names no mode: the object is enforced (fail closed) and reported.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a mode (expected \"enforce\" or \"audit\"); enforced")]
pub struct ModeError {
    pub value: String,
}

/// Which setting decided a policy's mode, and its error when it named none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub mode: Mode,
    /// A bad value of the policy's own annotation (`Some(false)`) or of its namespace's
    /// (`Some(true)`), with the error.
    pub error: Option<(bool, ModeError)>,
}

/// The mode of a policy with annotation `own`, in a namespace with annotation `namespace`, on a node
/// whose default is `default`. A bad value is enforced, whatever the settings around it say.
pub fn resolve(own: Option<&str>, namespace: Option<&str>, default: Mode) -> Resolved {
    let (value, from_namespace) = match (own, namespace) {
        (Some(v), _) => (v, false),
        (None, Some(v)) => (v, true),
        (None, None) => {
            return Resolved {
                mode: default,
                error: None,
            };
        }
    };
    match Mode::parse(value) {
        Ok(mode) => Resolved { mode, error: None },
        Err(e) => Resolved {
            mode: Mode::Enforce,
            error: Some((from_namespace, e)),
        },
    }
}

/// The mode annotation of an object, as written.
pub fn annotation(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<String> {
    meta.annotations.as_ref()?.get(ANNOTATION).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_specific_setting_wins() {
        let r = |own, ns, default| resolve(own, ns, default).mode;
        assert_eq!(r(None, None, Mode::Audit), Mode::Audit);
        assert_eq!(r(None, Some("audit"), Mode::Enforce), Mode::Audit);
        assert_eq!(
            r(Some("enforce"), Some("audit"), Mode::Audit),
            Mode::Enforce
        );
        assert_eq!(
            r(Some("audit"), Some("enforce"), Mode::Enforce),
            Mode::Audit
        );
    }

    #[test]
    fn a_bad_value_is_enforced_and_reported_where_it_was_written() {
        let own = resolve(Some("Audit"), Some("audit"), Mode::Audit);
        assert_eq!(own.mode, Mode::Enforce);
        assert_eq!(
            own.error.map(|(ns, e)| (ns, e.value)),
            Some((false, "Audit".into()))
        );
        let ns = resolve(None, Some("dry-run"), Mode::Audit);
        assert_eq!(ns.mode, Mode::Enforce);
        assert_eq!(ns.error.map(|(ns, _)| ns), Some(true));
    }
}
