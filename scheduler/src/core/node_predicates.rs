//! Node predicates a standalone scheduler must still honour: readiness,
//! `spec.unschedulable`, taints and tolerations, `nodeSelector` and required
//! node affinity. Resource fit lives in `resources`, GPU fit in `gpu_fit`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, Taint, Toleration,
};

/// The parts of a Node the predicates read, extracted once per node change.
#[derive(Debug, Clone, Default)]
pub struct NodeFacts {
    /// Node name.
    pub name: String,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// NoSchedule / NoExecute taints.
    pub taints: Vec<Taint>,
    /// Ready condition is True.
    pub ready: bool,
    /// `spec.unschedulable`.
    pub unschedulable: bool,
}

impl NodeFacts {
    /// Reads the facts from a Node object.
    pub fn from_node(node: &Node) -> Self {
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        let spec = node.spec.as_ref();
        Self {
            name: node.metadata.name.clone().unwrap_or_default(),
            labels: node.metadata.labels.clone().unwrap_or_default(),
            taints: spec
                .and_then(|s| s.taints.clone())
                .unwrap_or_default()
                .into_iter()
                .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
                .collect(),
            ready,
            unschedulable: spec.and_then(|s| s.unschedulable).unwrap_or(false),
        }
    }
}

/// A pod's node constraints, extracted once per decision.
#[derive(Debug, Clone, Default)]
pub struct NodeConstraints {
    node_selector: BTreeMap<String, String>,
    required_terms: Option<Vec<NodeSelectorTerm>>,
    tolerations: Vec<Toleration>,
}

impl NodeConstraints {
    /// Reads the constraints from a Pod.
    pub fn from_pod(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        Self {
            node_selector: spec
                .and_then(|s| s.node_selector.clone())
                .unwrap_or_default(),
            required_terms: spec
                .and_then(|s| s.affinity.as_ref())
                .and_then(|a| a.node_affinity.as_ref())
                .and_then(|a| {
                    a.required_during_scheduling_ignored_during_execution
                        .as_ref()
                })
                .map(|r| r.node_selector_terms.clone()),
            tolerations: spec.and_then(|s| s.tolerations.clone()).unwrap_or_default(),
        }
    }

    /// `None` when the node passes; otherwise the reason, in words.
    pub fn rejects(&self, node: &NodeFacts) -> Option<String> {
        if !node.ready {
            return Some("node is not Ready".to_owned());
        }
        if node.unschedulable && !self.tolerates_unschedulable() {
            return Some("node is cordoned (unschedulable)".to_owned());
        }
        if let Some(taint) = node.taints.iter().find(|t| !self.tolerates(t)) {
            return Some(format!(
                "untolerated taint {}={}:{}",
                taint.key,
                taint.value.as_deref().unwrap_or(""),
                taint.effect
            ));
        }
        if self
            .node_selector
            .iter()
            .any(|(k, v)| node.labels.get(k) != Some(v))
        {
            return Some("node does not match nodeSelector".to_owned());
        }
        if let Some(terms) = &self.required_terms {
            if !terms.iter().any(|term| term_matches(term, node)) {
                return Some("node does not match required node affinity".to_owned());
            }
        }
        None
    }

    /// Whether the node passes `nodeSelector` and required node affinity
    /// (topology spread's `nodeAffinityPolicy: Honor`).
    pub fn matches_node_affinity(&self, node: &NodeFacts) -> bool {
        self.node_selector
            .iter()
            .all(|(k, v)| node.labels.get(k) == Some(v))
            && self
                .required_terms
                .as_ref()
                .is_none_or(|terms| terms.iter().any(|term| term_matches(term, node)))
    }

    /// Whether every NoSchedule/NoExecute taint of the node is tolerated
    /// (topology spread's `nodeTaintsPolicy: Honor`).
    pub fn tolerates_taints(&self, node: &NodeFacts) -> bool {
        node.taints.iter().all(|t| self.tolerates(t))
    }

    fn tolerates_unschedulable(&self) -> bool {
        self.tolerations.iter().any(|t| {
            (t.key.as_deref() == Some("node.kubernetes.io/unschedulable")
                || (t.key.is_none() && t.operator.as_deref() == Some("Exists")))
                && t.effect
                    .as_deref()
                    .is_none_or(|e| e.is_empty() || e == "NoSchedule")
        })
    }

    fn tolerates(&self, taint: &Taint) -> bool {
        self.tolerations
            .iter()
            .any(|t| toleration_matches(t, taint))
    }
}

fn toleration_matches(toleration: &Toleration, taint: &Taint) -> bool {
    if let Some(effect) = toleration.effect.as_deref() {
        if !effect.is_empty() && effect != taint.effect {
            return false;
        }
    }
    let exists = toleration.operator.as_deref() == Some("Exists");
    match toleration.key.as_deref() {
        None | Some("") => exists,
        Some(key) if key != taint.key => false,
        Some(_) if exists => true,
        Some(_) => {
            toleration.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
    }
}

/// Whether a node selector term matches the node (an empty term matches nothing).
pub(crate) fn term_matches(term: &NodeSelectorTerm, node: &NodeFacts) -> bool {
    let expressions = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if expressions.is_empty() && fields.is_empty() {
        // An empty term matches nothing, as in kube-scheduler.
        return false;
    }
    expressions
        .iter()
        .all(|r| requirement_matches(r, node.labels.get(&r.key).map(String::as_str)))
        && fields.iter().all(|r| {
            let value = (r.key == "metadata.name").then_some(node.name.as_str());
            requirement_matches(r, value)
        })
}

fn requirement_matches(requirement: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = requirement.values.as_deref().unwrap_or_default();
    let number = |v: &str| v.parse::<i64>().ok();
    match requirement.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => {
            matches!((value.and_then(number), values.first().and_then(|v| number(v))), (Some(a), Some(b)) if a > b)
        }
        "Lt" => {
            matches!((value.and_then(number), values.first().and_then(|v| number(v))), (Some(a), Some(b)) if a < b)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(extra: serde_json::Value) -> NodeFacts {
        let mut base = json!({"metadata": {"name": "n1", "labels": {"zone": "a", "gpus": "8"}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        NodeFacts::from_node(&serde_json::from_value(base).expect("node"))
    }

    fn constraints(spec: serde_json::Value) -> NodeConstraints {
        let mut spec = spec;
        spec["containers"] = json!([]);
        NodeConstraints::from_pod(&serde_json::from_value(json!({"spec": spec})).expect("pod"))
    }

    #[test]
    fn readiness_and_cordon() {
        let none = constraints(json!({}));
        assert_eq!(none.rejects(&node(json!({}))), None);
        let not_ready =
            node(json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}));
        assert_eq!(
            none.rejects(&not_ready).as_deref(),
            Some("node is not Ready")
        );
        let cordoned = node(json!({"spec": {"unschedulable": true}}));
        assert!(none
            .rejects(&cordoned)
            .is_some_and(|r| r.contains("cordoned")));
        let tolerant = constraints(
            json!({"tolerations": [{"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"}]}),
        );
        assert_eq!(tolerant.rejects(&cordoned), None);
    }

    #[test]
    fn taints_and_tolerations() {
        let tainted = node(
            json!({"spec": {"taints": [{"key": "gpu", "value": "true", "effect": "NoSchedule"}, {"key": "soft", "effect": "PreferNoSchedule"}]}}),
        );
        assert!(constraints(json!({}))
            .rejects(&tainted)
            .is_some_and(|r| r.contains("gpu=true:NoSchedule")));
        assert_eq!(
            constraints(
                json!({"tolerations": [{"key": "gpu", "operator": "Equal", "value": "true"}]})
            )
            .rejects(&tainted),
            None
        );
        assert!(constraints(
            json!({"tolerations": [{"key": "gpu", "operator": "Equal", "value": "false"}]})
        )
        .rejects(&tainted)
        .is_some());
        assert_eq!(
            constraints(json!({"tolerations": [{"operator": "Exists"}]})).rejects(&tainted),
            None
        );
        assert!(constraints(
            json!({"tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoExecute"}]})
        )
        .rejects(&tainted)
        .is_some());
    }

    #[test]
    fn selector_and_affinity() {
        let n = node(json!({}));
        assert_eq!(
            constraints(json!({"nodeSelector": {"zone": "a"}})).rejects(&n),
            None
        );
        assert!(constraints(json!({"nodeSelector": {"zone": "b"}}))
            .rejects(&n)
            .is_some());
        let affinity = |expr: serde_json::Value| {
            constraints(
                json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [expr]}]}}}}),
            )
        };
        assert_eq!(
            affinity(json!({"key": "zone", "operator": "In", "values": ["a", "c"]})).rejects(&n),
            None
        );
        assert!(
            affinity(json!({"key": "zone", "operator": "NotIn", "values": ["a"]}))
                .rejects(&n)
                .is_some()
        );
        assert_eq!(
            affinity(json!({"key": "missing", "operator": "DoesNotExist"})).rejects(&n),
            None
        );
        assert!(affinity(json!({"key": "missing", "operator": "Exists"}))
            .rejects(&n)
            .is_some());
        assert_eq!(
            affinity(json!({"key": "gpus", "operator": "Gt", "values": ["4"]})).rejects(&n),
            None
        );
        assert!(
            affinity(json!({"key": "gpus", "operator": "Lt", "values": ["4"]}))
                .rejects(&n)
                .is_some()
        );
        let by_name = constraints(
            json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n2"]}]},
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}]}}}}),
        );
        assert_eq!(by_name.rejects(&n), None, "terms are ORed");
    }
}
