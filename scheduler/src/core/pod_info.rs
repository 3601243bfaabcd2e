//! What a pod shows the pods scheduled after it: namespace, labels, host
//! ports and inter-pod affinity terms, read once when the pod is observed
//! or placed and shared (behind an `Arc`) by its charge and its node.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, PodAffinityTerm, WeightedPodAffinityTerm};

use super::labels::Selector;

/// Namespace labels by namespace name (for `namespaceSelector`).
pub type NamespaceLabels = HashMap<String, BTreeMap<String, String>>;

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// A `hostPort` a container asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// `hostIP`, `0.0.0.0` when unset.
    pub ip: String,
    /// `TCP` when unset.
    pub protocol: String,
    /// The port.
    pub port: i32,
}

impl HostPort {
    /// Whether two host ports cannot share a node: same protocol and port,
    /// and the same IP or either one the wildcard (kube-scheduler's NodePorts).
    pub fn conflicts_with(&self, other: &HostPort) -> bool {
        self.port == other.port
            && self.protocol == other.protocol
            && (self.ip == other.ip || self.ip == "0.0.0.0" || other.ip == "0.0.0.0")
    }
}

/// One pod (anti-)affinity term, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AffinityTerm {
    /// Which pods the term is about.
    pub selector: Selector,
    /// Namespaces listed by name (the owner's own when neither list nor
    /// selector is given).
    pub namespaces: Vec<String>,
    /// `namespaceSelector`, when given (`{}`: every namespace).
    pub namespace_selector: Option<Selector>,
    /// Node label whose value is the term's domain.
    pub topology_key: String,
}

/// A preferred term with its weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedTerm {
    /// 1–100.
    pub weight: i64,
    /// The term.
    pub term: AffinityTerm,
}

impl AffinityTerm {
    /// Compiles `term`, owned by a pod in `namespace` with `labels`:
    /// `matchLabelKeys` / `mismatchLabelKeys` become `In` / `NotIn`
    /// requirements on the owner's values, as the API server merges them.
    pub fn new(term: &PodAffinityTerm, namespace: &str, labels: &BTreeMap<String, String>) -> Self {
        let mut selector = Selector::from_label_selector(term.label_selector.as_ref());
        if term.label_selector.is_some() {
            for (keys, equal) in [
                (&term.match_label_keys, true),
                (&term.mismatch_label_keys, false),
            ] {
                for key in keys.iter().flatten() {
                    if let Some(value) = labels.get(key) {
                        selector.require(key, value, equal);
                    }
                }
            }
        }
        let mut namespaces = term.namespaces.clone().unwrap_or_default();
        let namespace_selector = term
            .namespace_selector
            .as_ref()
            .map(|s| Selector::from_label_selector(Some(s)));
        if namespaces.is_empty() && namespace_selector.is_none() {
            namespaces.push(namespace.to_owned());
        }
        Self {
            selector,
            namespaces,
            namespace_selector,
            topology_key: term.topology_key.clone(),
        }
    }

    /// Whether a pod in `namespace` with `labels` is one the term is about.
    pub fn matches(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        namespace_labels: &NamespaceLabels,
    ) -> bool {
        let in_namespace = self.namespaces.iter().any(|n| n == namespace)
            || self.namespace_selector.as_ref().is_some_and(|s| {
                s.is_everything()
                    || s.matches(namespace_labels.get(namespace).unwrap_or(&NO_LABELS))
            });
        in_namespace && self.selector.matches(labels)
    }

    /// [`AffinityTerm::matches`] for a pod's info.
    pub fn matches_pod(&self, pod: &PodInfo, namespace_labels: &NamespaceLabels) -> bool {
        self.matches(&pod.namespace, &pod.labels, namespace_labels)
    }
}

/// What other pods' predicates read of one pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// Namespace.
    pub namespace: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Being deleted (topology spread does not count it).
    pub terminating: bool,
    /// `spec.priority` (set at admission from the PriorityClass); `None`
    /// when unset (then [`PodInfo::priority_class`] is looked up).
    pub priority: Option<i32>,
    /// `spec.priorityClassName`.
    pub priority_class: Option<String>,
    /// `spec.preemptionPolicy: Never`.
    pub never_preempts: bool,
    /// Host ports of its containers.
    pub host_ports: Vec<HostPort>,
    /// Required pod affinity terms.
    pub required_affinity: Vec<AffinityTerm>,
    /// Required pod anti-affinity terms.
    pub required_anti_affinity: Vec<AffinityTerm>,
    /// Preferred pod affinity terms.
    pub preferred_affinity: Vec<WeightedTerm>,
    /// Preferred pod anti-affinity terms.
    pub preferred_anti_affinity: Vec<WeightedTerm>,
    /// Names of the PersistentVolumeClaims it uses (attach limits).
    pub claims: Vec<String>,
}

impl PodInfo {
    /// Reads a pod.
    pub fn from_pod(pod: &Pod) -> Self {
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let spec = pod.spec.as_ref();
        let host_ports = spec
            .into_iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .filter(|p| p.host_port.is_some_and(|port| port > 0))
            .map(|p| HostPort {
                ip: p
                    .host_ip
                    .clone()
                    .filter(|ip| !ip.is_empty())
                    .unwrap_or_else(|| "0.0.0.0".to_owned()),
                protocol: p
                    .protocol
                    .clone()
                    .filter(|p| !p.is_empty())
                    .unwrap_or_else(|| "TCP".to_owned()),
                port: p.host_port.unwrap_or(0),
            })
            .collect();
        let affinity = spec.and_then(|s| s.affinity.as_ref());
        let required = |terms: Option<&Vec<PodAffinityTerm>>| -> Vec<AffinityTerm> {
            terms
                .into_iter()
                .flatten()
                .map(|t| AffinityTerm::new(t, &namespace, &labels))
                .collect()
        };
        let preferred = |terms: Option<&Vec<WeightedPodAffinityTerm>>| -> Vec<WeightedTerm> {
            terms
                .into_iter()
                .flatten()
                .map(|t| WeightedTerm {
                    weight: i64::from(t.weight),
                    term: AffinityTerm::new(&t.pod_affinity_term, &namespace, &labels),
                })
                .collect()
        };
        let pod_affinity = affinity.and_then(|a| a.pod_affinity.as_ref());
        let anti_affinity = affinity.and_then(|a| a.pod_anti_affinity.as_ref());
        Self {
            required_affinity: required(pod_affinity.and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })),
            required_anti_affinity: required(anti_affinity.and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })),
            preferred_affinity: preferred(pod_affinity.and_then(|a| {
                a.preferred_during_scheduling_ignored_during_execution
                    .as_ref()
            })),
            preferred_anti_affinity: preferred(anti_affinity.and_then(|a| {
                a.preferred_during_scheduling_ignored_during_execution
                    .as_ref()
            })),
            terminating: pod.metadata.deletion_timestamp.is_some(),
            priority: spec.and_then(|s| s.priority),
            priority_class: spec.and_then(|s| s.priority_class_name.clone()),
            never_preempts: spec.and_then(|s| s.preemption_policy.as_deref()) == Some("Never"),
            host_ports,
            claims: super::volumes::pod_claims(pod),
            namespace,
            labels,
        }
    }

    /// Whether the pod has any inter-pod affinity term.
    pub fn has_affinity_terms(&self) -> bool {
        !(self.required_affinity.is_empty()
            && self.required_anti_affinity.is_empty()
            && self.preferred_affinity.is_empty()
            && self.preferred_anti_affinity.is_empty())
    }
}

/// A pod's info shared between its charge and its node.
pub type SharedPodInfo = Arc<PodInfo>;
