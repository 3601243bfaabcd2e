//! Inter-pod affinity and anti-affinity as kube-scheduler's InterPodAffinity
//! plugin decides them. Filter: the incoming pod's required anti-affinity
//! terms, every placed pod's required anti-affinity terms against the
//! incoming pod (symmetry), and the incoming pod's required affinity terms,
//! with the self-match rule that lets the first pod of a group that wants
//! to be next to itself land. Score: preferred terms of both sides, and
//! placed pods' required affinity terms at weight 1, summed per topology
//! domain and normalised to 0–100 over the feasible nodes.

use std::collections::HashMap;

use super::node_predicates::NodeFacts;
use super::pod_info::{NamespaceLabels, PodInfo, WeightedTerm};
use super::state::{ClusterState, NodeState};

/// kube-scheduler's `hardPodAffinityWeight` default: how much a placed
/// pod's required affinity term counts in the incoming pod's score.
pub const HARD_POD_AFFINITY_WEIGHT: i64 = 1;

/// `FailedScheduling` reason: a placed pod's anti-affinity forbids the node.
pub const EXISTING_ANTI_AFFINITY_REASON: &str =
    "node(s) didn't satisfy existing pods anti-affinity rules";
/// `FailedScheduling` reason: the pod's anti-affinity forbids the node.
pub const ANTI_AFFINITY_REASON: &str = "node(s) didn't match pod anti-affinity rules";
/// `FailedScheduling` reason: the pod's affinity is not met on the node.
pub const AFFINITY_REASON: &str = "node(s) didn't match pod affinity rules";

/// Counts per topology domain: key → value → count.
type DomainCounts<'a> = HashMap<&'a str, HashMap<&'a str, i64>>;

fn add<'a>(counts: &mut DomainCounts<'a>, key: &'a str, value: &'a str, amount: i64) {
    *counts.entry(key).or_default().entry(value).or_default() += amount;
}

fn lookup(counts: &DomainCounts<'_>, key: &str, node: &NodeFacts) -> i64 {
    match (counts.get(key), node.labels.get(key)) {
        (Some(values), Some(value)) => values.get(value.as_str()).copied().unwrap_or(0),
        _ => 0,
    }
}

/// The filter's per-decision counts.
#[derive(Debug, Default, Clone)]
pub struct AffinityFilter<'a> {
    existing_anti: DomainCounts<'a>,
    anti: DomainCounts<'a>,
    affinity: DomainCounts<'a>,
    /// Placed pods that match every required affinity term.
    affinity_matches: i64,
    self_matches_all: bool,
    pod: Option<&'a PodInfo>,
    namespaces: Option<&'a NamespaceLabels>,
}

impl<'a> AffinityFilter<'a> {
    /// Whether the filter has anything to check for `pod` in `state`.
    pub fn needed(state: &ClusterState, pod: &PodInfo) -> bool {
        !pod.required_affinity.is_empty()
            || !pod.required_anti_affinity.is_empty()
            || state.required_anti_affinity_pods > 0
    }

    /// Counts, over every placed pod, the domains the terms reach.
    pub fn new(state: &'a ClusterState, pod: &'a PodInfo) -> Self {
        let namespaces = &state.namespace_labels;
        let mut filter = Self {
            pod: Some(pod),
            namespaces: Some(namespaces),
            ..Self::default()
        };
        for (existing, node) in state.pods_with_affinity_terms() {
            for term in &existing.required_anti_affinity {
                if let Some(value) = node.facts.labels.get(&term.topology_key) {
                    if term.matches_pod(pod, namespaces) {
                        add(&mut filter.existing_anti, &term.topology_key, value, 1);
                    }
                }
            }
        }
        if pod.required_affinity.is_empty() && pod.required_anti_affinity.is_empty() {
            return filter;
        }
        for node in state.nodes.values() {
            for existing in node.residents() {
                if !pod.required_affinity.is_empty()
                    && pod
                        .required_affinity
                        .iter()
                        .all(|t| t.matches_pod(existing, namespaces))
                {
                    filter.affinity_matches += 1;
                    for term in &pod.required_affinity {
                        if let Some(value) = node.facts.labels.get(&term.topology_key) {
                            add(&mut filter.affinity, &term.topology_key, value, 1);
                        }
                    }
                }
                for term in &pod.required_anti_affinity {
                    if let Some(value) = node.facts.labels.get(&term.topology_key) {
                        if term.matches_pod(existing, namespaces) {
                            add(&mut filter.anti, &term.topology_key, value, 1);
                        }
                    }
                }
            }
        }
        filter.self_matches_all = pod
            .required_affinity
            .iter()
            .all(|t| t.matches_pod(pod, namespaces));
        filter
    }

    /// Preemption's what-if, as kube-scheduler's `RemovePod`/`AddPod`:
    /// counts `existing` on `node` out of (`delta` −1) or back into (+1)
    /// every term's domains.
    pub fn adjust(&mut self, node: &'a NodeFacts, existing: &'a PodInfo, delta: i64) {
        let (Some(pod), Some(namespaces)) = (self.pod, self.namespaces) else {
            return;
        };
        for term in &existing.required_anti_affinity {
            if let Some(value) = node.labels.get(&term.topology_key) {
                if term.matches_pod(pod, namespaces) {
                    add(&mut self.existing_anti, &term.topology_key, value, delta);
                }
            }
        }
        if !pod.required_affinity.is_empty()
            && pod
                .required_affinity
                .iter()
                .all(|t| t.matches_pod(existing, namespaces))
        {
            self.affinity_matches += delta;
            for term in &pod.required_affinity {
                if let Some(value) = node.labels.get(&term.topology_key) {
                    add(&mut self.affinity, &term.topology_key, value, delta);
                }
            }
        }
        for term in &pod.required_anti_affinity {
            if let Some(value) = node.labels.get(&term.topology_key) {
                if term.matches_pod(existing, namespaces) {
                    add(&mut self.anti, &term.topology_key, value, delta);
                }
            }
        }
    }

    /// `None` when `node` passes; otherwise kube-scheduler's reason.
    pub fn rejects(&self, node: &NodeFacts) -> Option<&'static str> {
        let pod = self.pod?;
        // kube-scheduler's order: affinity, anti-affinity, placed pods' anti-affinity.
        if !pod.required_affinity.is_empty() {
            let mut pods_exist = true;
            for term in &pod.required_affinity {
                if !node.labels.contains_key(&term.topology_key) {
                    // Every topology label must be on the node.
                    return Some(AFFINITY_REASON);
                }
                if lookup(&self.affinity, &term.topology_key, node) <= 0 {
                    pods_exist = false;
                }
            }
            // The first pod of a group with affinity to itself: no pod
            // anywhere matches, and the pod matches its own terms.
            if !pods_exist && (self.affinity_matches > 0 || !self.self_matches_all) {
                return Some(AFFINITY_REASON);
            }
        }
        if pod
            .required_anti_affinity
            .iter()
            .any(|t| lookup(&self.anti, &t.topology_key, node) > 0)
        {
            return Some(ANTI_AFFINITY_REASON);
        }
        for (key, values) in &self.existing_anti {
            if let Some(value) = node.labels.get(*key) {
                if values.get(value.as_str()).is_some_and(|c| *c > 0) {
                    return Some(EXISTING_ANTI_AFFINITY_REASON);
                }
            }
        }
        None
    }
}

/// The score's per-decision sums per topology domain.
#[derive(Debug, Default)]
pub struct AffinityScore<'a> {
    sums: DomainCounts<'a>,
}

impl<'a> AffinityScore<'a> {
    /// Whether any term in the pod or the cluster can score.
    pub fn needed(state: &ClusterState, pod: &PodInfo) -> bool {
        !pod.preferred_affinity.is_empty()
            || !pod.preferred_anti_affinity.is_empty()
            || state.scoring_affinity_pods > 0
    }

    /// Sums the weights of every term between `pod` and the placed pods.
    pub fn new(state: &'a ClusterState, pod: &'a PodInfo) -> Self {
        let namespaces = &state.namespace_labels;
        let mut score = Self::default();
        let add_terms = |sums: &mut DomainCounts<'a>,
                         node: &'a NodeState,
                         terms: &'a [WeightedTerm],
                         target: &PodInfo,
                         sign: i64| {
            for weighted in terms {
                if let Some(value) = node.facts.labels.get(&weighted.term.topology_key) {
                    if weighted.term.matches_pod(target, namespaces) {
                        add(
                            sums,
                            &weighted.term.topology_key,
                            value,
                            sign * weighted.weight,
                        );
                    }
                }
            }
        };
        if !pod.preferred_affinity.is_empty() || !pod.preferred_anti_affinity.is_empty() {
            for node in state.nodes.values() {
                for existing in node.residents() {
                    add_terms(&mut score.sums, node, &pod.preferred_affinity, existing, 1);
                    add_terms(
                        &mut score.sums,
                        node,
                        &pod.preferred_anti_affinity,
                        existing,
                        -1,
                    );
                }
            }
        }
        for (existing, node) in state.pods_with_affinity_terms() {
            for term in &existing.required_affinity {
                if let Some(value) = node.facts.labels.get(&term.topology_key) {
                    if term.matches_pod(pod, namespaces) {
                        add(
                            &mut score.sums,
                            &term.topology_key,
                            value,
                            HARD_POD_AFFINITY_WEIGHT,
                        );
                    }
                }
            }
            add_terms(&mut score.sums, node, &existing.preferred_affinity, pod, 1);
            add_terms(
                &mut score.sums,
                node,
                &existing.preferred_anti_affinity,
                pod,
                -1,
            );
        }
        score
    }

    /// The node's raw score: the sums of the domains it is in.
    pub fn raw(&self, node: &NodeFacts) -> i64 {
        self.sums
            .iter()
            .map(|(key, values)| {
                node.labels
                    .get(*key)
                    .and_then(|v| values.get(v.as_str()))
                    .copied()
                    .unwrap_or(0)
            })
            .sum()
    }
}

/// kube-scheduler's InterPodAffinity normalisation: min..max → 0..100.
pub fn normalize(raw: &[i64]) -> Vec<i64> {
    let (Some(min), Some(max)) = (raw.iter().min(), raw.iter().max()) else {
        return Vec::new();
    };
    let span = max - min;
    raw.iter()
        .map(|s| {
            if span > 0 {
                (100.0 * ((s - min) as f64 / span as f64)) as i64
            } else {
                0
            }
        })
        .collect()
}
