//! Label selectors as kube-scheduler evaluates them for pod affinity and
//! topology spread: `matchLabels` and `matchExpressions` (In, NotIn,
//! Exists, DoesNotExist), compiled once per decision. A missing selector
//! matches nothing; an empty one matches everything.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// One compiled requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A compiled label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    /// `None`: matches nothing (a missing or unreadable selector).
    requirements: Option<Vec<Requirement>>,
}

impl Selector {
    /// The selector that matches nothing.
    pub fn nothing() -> Self {
        Self { requirements: None }
    }

    /// Compiles a Kubernetes selector; `None` or an unknown operator
    /// matches nothing, as `metav1.LabelSelectorAsSelector` errors do.
    pub fn from_label_selector(selector: Option<&LabelSelector>) -> Self {
        let Some(selector) = selector else {
            return Self::nothing();
        };
        let mut requirements = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            requirements.push(Requirement::In(key.clone(), vec![value.clone()]));
        }
        for expression in selector.match_expressions.iter().flatten() {
            let key = expression.key.clone();
            let values = expression.values.clone().unwrap_or_default();
            requirements.push(match expression.operator.as_str() {
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                _ => return Self::nothing(),
            });
        }
        Self {
            requirements: Some(requirements),
        }
    }

    /// Adds `key In (value)` (`matchLabelKeys`) or `key NotIn (value)`.
    pub fn require(&mut self, key: &str, value: &str, equal: bool) {
        if let Some(requirements) = self.requirements.as_mut() {
            let values = vec![value.to_owned()];
            requirements.push(if equal {
                Requirement::In(key.to_owned(), values)
            } else {
                Requirement::NotIn(key.to_owned(), values)
            });
        }
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let Some(requirements) = &self.requirements else {
            return false;
        };
        requirements.iter().all(|r| match r {
            Requirement::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(key, values) => labels.get(key).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(key) => labels.contains_key(key),
            Requirement::DoesNotExist(key) => !labels.contains_key(key),
        })
    }

    /// Whether this selector matches every label set (`{}`).
    pub fn is_everything(&self) -> bool {
        self.requirements.as_ref().is_some_and(Vec::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn selector(value: serde_json::Value) -> Selector {
        let parsed: LabelSelector = serde_json::from_value(value).expect("selector");
        Selector::from_label_selector(Some(&parsed))
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn missing_matches_nothing_and_empty_matches_everything() {
        assert!(!Selector::from_label_selector(None).matches(&labels(&[])));
        assert!(selector(json!({})).matches(&labels(&[("a", "b")])));
        assert!(selector(json!({})).is_everything());
    }

    #[test]
    fn operators() {
        let s = selector(json!({"matchLabels": {"app": "web"}, "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["a", "b"]},
            {"key": "canary", "operator": "DoesNotExist"},
            {"key": "env", "operator": "NotIn", "values": ["dev"]},
            {"key": "team", "operator": "Exists"}]}));
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "a"), ("team", "x")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "c"), ("team", "x")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "a")])));
        assert!(!s.matches(&labels(&[
            ("app", "web"),
            ("tier", "a"),
            ("team", "x"),
            ("canary", "1")
        ])));
        assert!(!s.matches(&labels(&[
            ("app", "web"),
            ("tier", "a"),
            ("team", "x"),
            ("env", "dev")
        ])));
        let bad = selector(
            json!({"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]}),
        );
        assert!(!bad.matches(&labels(&[("a", "2")])));
    }

    #[test]
    fn added_requirements() {
        let mut s = selector(json!({"matchLabels": {"app": "web"}}));
        s.require("rev", "7", true);
        assert!(s.matches(&labels(&[("app", "web"), ("rev", "7")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("rev", "8")])));
        s.require("shard", "1", false);
        assert!(!s.matches(&labels(&[("app", "web"), ("rev", "7"), ("shard", "1")])));
    }
}
