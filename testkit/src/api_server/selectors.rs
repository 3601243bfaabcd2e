//! Label and field selectors as list and watch requests carry them
//! (`labelSelector`, `fieldSelector`): parsing, with a 400 for anything the
//! real server would refuse, and matching against stored JSON objects.

use serde_json::Value;

use super::store::ApiError;

#[derive(Debug, Clone, PartialEq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
struct FieldRequirement {
    path: String,
    value: String,
    equal: bool,
}

/// Both selectors of one request; every requirement must hold (AND).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Selector {
    labels: Vec<LabelRequirement>,
    fields: Vec<FieldRequirement>,
}

impl Selector {
    pub fn parse(
        resource: &str,
        labels: Option<&str>,
        fields: Option<&str>,
    ) -> Result<Self, ApiError> {
        let mut selector = Self::default();
        for term in split_top_level(labels.unwrap_or("")) {
            let requirement = parse_label_term(term).map_err(|why| {
                ApiError::bad_request(format!(
                    "unable to parse labelSelector term {term:?}: {why}"
                ))
            })?;
            selector.labels.push(requirement);
        }
        for term in fields.unwrap_or("").split(',').map(str::trim) {
            if term.is_empty() {
                continue;
            }
            let (path, value, equal) = if let Some((p, v)) = term.split_once("!=") {
                (p, v, false)
            } else if let Some((p, v)) = term.split_once("==") {
                (p, v, true)
            } else if let Some((p, v)) = term.split_once('=') {
                (p, v, true)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid fieldSelector term {term:?}: expected field=value, field==value or field!=value"
                )));
            };
            let path = path.trim();
            if !field_supported(resource, path) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {path}"
                )));
            }
            selector.fields.push(FieldRequirement {
                path: path.to_owned(),
                value: value.trim().to_owned(),
                equal,
            });
        }
        Ok(selector)
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|req| match req {
            LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::NotExists(k) => label(k).is_none(),
            LabelRequirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelRequirement::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
        });
        labels_ok
            && self
                .fields
                .iter()
                .all(|req| (field_value(object, &req.path) == req.value) == req.equal)
    }
}

/// Splits on commas that are not inside `( )`.
fn split_top_level(input: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in input.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(input[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(input[start..].trim());
    terms.retain(|t| !t.is_empty());
    terms
}

fn parse_label_term(term: &str) -> Result<LabelRequirement, String> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(LabelRequirement::NotExists(label_key(key)?));
    }
    if let Some(open) = term.find('(') {
        let values = term[open + 1..]
            .strip_suffix(')')
            .ok_or("missing closing parenthesis")?;
        let values = values
            .split(',')
            .map(|v| label_value(v.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        let head = term[..open].trim_end();
        let (key, op) = head
            .rsplit_once(char::is_whitespace)
            .ok_or("expected `key in (...)` or `key notin (...)`")?;
        let key = label_key(key)?;
        return match op {
            "in" => Ok(LabelRequirement::In(key, values)),
            "notin" => Ok(LabelRequirement::NotIn(key, values)),
            other => Err(format!("unknown set operator {other:?}")),
        };
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Ok(LabelRequirement::NotEquals(
            label_key(k)?,
            label_value(v.trim())?,
        ));
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(LabelRequirement::Equals(
            label_key(k)?,
            label_value(v.trim())?,
        ));
    }
    Ok(LabelRequirement::Exists(label_key(term)?))
}

fn label_key(key: &str) -> Result<String, String> {
    let key = key.trim();
    let ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok {
        Ok(key.to_owned())
    } else {
        Err(format!("invalid label key {key:?}"))
    }
}

fn label_value(value: &str) -> Result<String, String> {
    if value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Ok(value.to_owned())
    } else {
        Err(format!("invalid label value {value:?}"))
    }
}

/// The field labels the real server indexes for each resource.
fn field_supported(resource: &str, path: &str) -> bool {
    if matches!(path, "metadata.name" | "metadata.namespace") {
        return true;
    }
    match resource {
        "pods" => matches!(
            path,
            "spec.nodeName"
                | "spec.schedulerName"
                | "spec.restartPolicy"
                | "spec.serviceAccountName"
                | "spec.hostNetwork"
                | "status.phase"
                | "status.podIP"
                | "status.nominatedNodeName"
        ),
        "nodes" => path == "spec.unschedulable",
        "namespaces" => path == "status.phase",
        "secrets" => path == "type",
        "events" => {
            path.starts_with("involvedObject.")
                || path.starts_with("regarding.")
                || matches!(
                    path,
                    "reason" | "type" | "reportingController" | "reportingComponent"
                )
        }
        _ => false,
    }
}

/// The selector's view of a field: strings as they are, booleans and
/// numbers printed, a missing field as the empty string.
fn field_value(object: &Value, path: &str) -> String {
    let found = path
        .split('.')
        .try_fold(object, |node, segment| node.get(segment));
    match found {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ if path == "spec.hostNetwork" || path == "spec.unschedulable" => "false".to_owned(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Value {
        json!({
            "metadata": {"name": "p", "namespace": "ns", "labels": {"app": "web", "tier": "gpu"}},
            "spec": {"nodeName": "n1", "schedulerName": "tessera"},
            "status": {"phase": "Running"}
        })
    }

    fn matches(labels: &str, fields: &str) -> bool {
        Selector::parse("pods", Some(labels), Some(fields))
            .unwrap()
            .matches(&pod())
    }

    #[test]
    fn label_operators() {
        assert!(matches("app=web", ""));
        assert!(matches("app==web,tier", ""));
        assert!(!matches("app!=web", ""));
        assert!(matches("missing!=x", ""));
        assert!(matches("!missing", ""));
        assert!(!matches("!app", ""));
        assert!(matches("app in (db, web),tier notin (cpu)", ""));
        assert!(!matches("app notin (web)", ""));
        assert!(!matches("missing in (a,b)", ""));
        assert!(matches("missing notin (a,b)", ""));
    }

    #[test]
    fn field_operators() {
        assert!(matches("", "spec.nodeName=n1,status.phase!=Failed"));
        assert!(!matches("", "spec.nodeName="));
        assert!(matches(
            "",
            "spec.schedulerName==tessera,metadata.namespace=ns"
        ));
        assert!(!matches("", "metadata.name!=p"));
    }

    #[test]
    fn rejects_bad_selectors() {
        assert!(Selector::parse("pods", Some("app in (a"), None).is_err());
        assert!(Selector::parse("pods", Some("a b=c"), None).is_err());
        assert!(Selector::parse("pods", None, Some("spec.containers=x")).is_err());
        assert!(Selector::parse("pods", None, Some("spec.nodeName")).is_err());
    }
}
