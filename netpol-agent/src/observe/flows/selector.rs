//! Label selectors in the Kubernetes string syntax (`kubectl get -l`), for `flows -l`,
//! `--from-label` and `--to-label`: `app=web`, `app==web`, `tier!=db`, `env in (prod,staging)`,
//! `env notin (dev)`, `app`, `!canary`, comma-separated (all must hold).
//!
//! The string is turned into the API's [`LabelSelector`] and validated by the model's
//! [`Selector::parse`], so a selector here matches exactly as the same selector in a policy.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

use crate::model::selector::Selector;

/// Parses `text`; the error says which requirement is wrong and why.
pub fn parse(text: &str) -> Result<Selector, String> {
    let mut expressions = Vec::new();
    for term in split_terms(text)? {
        expressions.push(requirement(term.trim())?);
    }
    let selector = LabelSelector {
        match_labels: None,
        match_expressions: Some(expressions),
    };
    Selector::parse(&selector, "selector").map_err(|e| e.to_string())
}

/// The comma-separated requirements of `text`; commas inside `( )` belong to a value set.
fn split_terms(text: &str) -> Result<Vec<&str>, String> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0u32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' if depth == 0 => depth = 1,
            '(' => return Err("nested \"(\"".into()),
            ')' if depth == 1 => depth = 0,
            ')' => return Err("\")\" without \"(\"".into()),
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("\"(\" without \")\"".into());
    }
    terms.push(&text[start..]);
    if terms.iter().any(|t| t.trim().is_empty()) {
        return Err("empty requirement (a stray comma, or nothing at all)".into());
    }
    Ok(terms)
}

/// One requirement: `!key`, `key`, `key=v`, `key==v`, `key!=v`, `key in (..)`, `key notin (..)`.
fn requirement(term: &str) -> Result<LabelSelectorRequirement, String> {
    if let Some(key) = term.strip_prefix('!') {
        return expression(key.trim(), "DoesNotExist", Vec::new());
    }
    if let Some((key, value)) = term.split_once("!=") {
        return expression(key.trim(), "NotIn", vec![value_of(value.trim())?]);
    }
    if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return expression(key.trim(), "In", vec![value_of(value.trim())?]);
    }
    let mut words = term.splitn(2, char::is_whitespace);
    let key = words.next().unwrap_or_default();
    let Some(rest) = words.next().map(str::trim) else {
        return expression(key, "Exists", Vec::new());
    };
    let split = rest.find(|c: char| c == '(' || c.is_whitespace());
    let (word, set) = rest.split_at(split.unwrap_or(rest.len()));
    let operator = match word {
        "in" => "In",
        "notin" => "NotIn",
        _ => {
            return Err(format!(
                "{term:?}: expected =, ==, !=, in (...) or notin (...) after {key:?}"
            ));
        }
    };
    expression(key, operator, value_set(term, set.trim())?)
}

fn expression(
    key: &str,
    operator: &str,
    values: Vec<String>,
) -> Result<LabelSelectorRequirement, String> {
    if key.is_empty() || !key.chars().all(is_label_char) {
        return Err(format!(
            "{key:?} is not a label key (letters, digits, '-', '_', '.', one '/')"
        ));
    }
    Ok(LabelSelectorRequirement {
        key: key.to_owned(),
        operator: operator.to_owned(),
        values: (!values.is_empty()).then_some(values),
    })
}

/// The values of `(a, b)`.
fn value_set(term: &str, set: &str) -> Result<Vec<String>, String> {
    let inner = set
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("{term:?}: the values of in/notin go in parentheses: (a,b)"))?;
    let values: Vec<String> = inner
        .split(',')
        .map(|v| value_of(v.trim()))
        .collect::<Result<_, _>>()?;
    if values.iter().any(String::is_empty) {
        return Err(format!("{term:?}: an empty value in the set"));
    }
    Ok(values)
}

fn value_of(value: &str) -> Result<String, String> {
    if value.chars().all(is_label_char) {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "{value:?} is not a label value (letters, digits, '-', '_', '.')"
        ))
    }
}

fn is_label_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Labels;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn matches(selector: &str, pairs: &[(&str, &str)]) -> bool {
        parse(selector)
            .unwrap_or_else(|e| panic!("{selector}: {e}"))
            .matches(&labels(pairs))
    }

    #[test]
    fn every_operator_matches_as_kubectl_does() {
        let web = [("app", "web"), ("env", "prod")];
        assert!(matches("app=web", &web));
        assert!(matches("app==web", &web));
        assert!(!matches("app=db", &web));
        assert!(matches("app!=db", &web));
        assert!(
            matches("app!=db", &[]),
            "!= holds where the label is absent"
        );
        assert!(!matches("app!=web", &web));
        assert!(matches("env in (staging, prod)", &web));
        assert!(!matches("env in (staging)", &web));
        assert!(matches("env notin (dev)", &web));
        assert!(!matches("env notin (dev,prod)", &web));
        assert!(matches("app", &web));
        assert!(!matches("tier", &web));
        assert!(matches("!tier", &web));
        assert!(!matches("!app", &web));
        assert!(matches("app=web,env in (prod),!canary", &web));
        assert!(!matches("app=web,env=dev", &web));
        assert!(matches(
            "app.kubernetes.io/name=web",
            &[("app.kubernetes.io/name", "web")]
        ));
        assert!(matches("app=", &[("app", "")]), "an empty value is a value");
    }

    #[test]
    fn bad_selectors_say_what_is_wrong() {
        for (bad, says) in [
            ("", "empty requirement"),
            ("app=web,", "empty requirement"),
            ("env in (a", "without \")\""),
            ("env in a,b", "parentheses"),
            ("env in ()", "empty value"),
            ("env like (a)", "expected =, ==, !="),
            ("app=we b", "not a label value"),
            ("=web", "not a label key"),
            ("a)b", "without \"(\""),
        ] {
            let e = parse(bad).expect_err(bad);
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }
}
