//! `topologySpreadConstraints` as kube-scheduler's PodTopologySpread plugin
//! decides them. Filter (`DoNotSchedule`): placing the pod in a node's
//! domain must keep `count + self − global minimum ≤ maxSkew`, counting
//! matching pods of the pod's namespace on the nodes that pass the
//! node-inclusion policies (nodeAffinity honoured, taints ignored by
//! default) and carry every constraint's topology key; with fewer domains
//! than `minDomains` the minimum is 0. Score (`ScheduleAnyway`): fewer
//! matching pods in the node's domain scores higher, each constraint
//! weighted by the log of its domain count, normalised to 0–100.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{Pod, TopologySpreadConstraint};
use tessera_api::config::DefaultSpreadConstraint;

use super::labels::Selector;
use super::node_predicates::{NodeConstraints, NodeFacts};
use super::pod_info::PodInfo;
use super::state::{ClusterState, NodeState};

/// `FailedScheduling` reason: placing here would exceed a `maxSkew`.
pub const SPREAD_REASON: &str = "node(s) didn't match pod topology spread constraints";
/// `FailedScheduling` reason: the node lacks a constraint's topology key.
pub const SPREAD_LABEL_REASON: &str =
    "node(s) didn't match pod topology spread constraints (missing required label)";

/// The node label kube-scheduler treats per node when scoring.
pub const HOSTNAME_KEY: &str = "kubernetes.io/hostname";

/// One constraint, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpreadConstraint {
    /// `maxSkew`.
    pub max_skew: i64,
    /// `topologyKey`.
    pub topology_key: String,
    /// `whenUnsatisfiable: DoNotSchedule`.
    pub hard: bool,
    /// `minDomains` (only for `DoNotSchedule`), 1 when unset.
    pub min_domains: i64,
    /// `labelSelector` with `matchLabelKeys` merged in.
    pub selector: Selector,
    /// `nodeAffinityPolicy: Honor` (the default).
    pub honor_node_affinity: bool,
    /// `nodeTaintsPolicy: Honor` (default Ignore).
    pub honor_taints: bool,
    /// Whether the incoming pod matches its own selector.
    pub self_match: bool,
    /// Given by kube-scheduler's system defaults, not the pod: nodes
    /// lacking a topology key are still scored by the keys they have.
    pub system_defaulted: bool,
}

impl SpreadConstraint {
    /// Reads the pod's constraints.
    pub fn from_pod(pod: &Pod) -> Vec<Self> {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        pod.spec
            .as_ref()
            .and_then(|s| s.topology_spread_constraints.as_ref())
            .into_iter()
            .flatten()
            .map(|c| Self::new(c, &labels))
            .collect()
    }

    fn new(constraint: &TopologySpreadConstraint, labels: &BTreeMap<String, String>) -> Self {
        let mut selector = Selector::from_label_selector(constraint.label_selector.as_ref());
        if constraint.label_selector.is_some() {
            for key in constraint.match_label_keys.iter().flatten() {
                if let Some(value) = labels.get(key) {
                    selector.require(key, value, true);
                }
            }
        }
        let hard = constraint.when_unsatisfiable != "ScheduleAnyway";
        Self {
            max_skew: i64::from(constraint.max_skew),
            topology_key: constraint.topology_key.clone(),
            hard,
            min_domains: if hard {
                i64::from(constraint.min_domains.unwrap_or(1).max(1))
            } else {
                1
            },
            self_match: selector.matches(labels),
            selector,
            honor_node_affinity: constraint.node_affinity_policy.as_deref() != Some("Ignore"),
            honor_taints: constraint.node_taints_policy.as_deref() == Some("Honor"),
            system_defaulted: false,
        }
    }

    /// A cluster-default constraint (see [`super::default_spread`]) over
    /// `selector`, for a pod with `labels`.
    pub fn defaulted(
        constraint: &DefaultSpreadConstraint,
        selector: Selector,
        labels: &BTreeMap<String, String>,
        system_defaulted: bool,
    ) -> Self {
        let hard = constraint.when_unsatisfiable == "DoNotSchedule";
        Self {
            max_skew: i64::from(constraint.max_skew),
            topology_key: constraint.topology_key.clone(),
            hard,
            min_domains: 1,
            self_match: selector.matches(labels),
            selector,
            honor_node_affinity: true,
            honor_taints: false,
            system_defaulted,
        }
    }

    fn includes(&self, node: &NodeFacts, constraints: &NodeConstraints) -> bool {
        (!self.honor_node_affinity || constraints.matches_node_affinity(node))
            && (!self.honor_taints || constraints.tolerates_taints(node))
    }

    fn count(&self, node: &NodeState, namespace: &str) -> i64 {
        node.residents()
            .filter(|p| {
                !p.terminating && p.namespace == namespace && self.selector.matches(&p.labels)
            })
            .count() as i64
    }
}

fn has_keys<'c>(
    node: &NodeFacts,
    mut constraints: impl Iterator<Item = &'c SpreadConstraint>,
) -> bool {
    constraints.all(|c| node.labels.contains_key(&c.topology_key))
}

/// The filter's per-decision counts (hard constraints only).
#[derive(Debug, Clone)]
pub struct SpreadFilter<'a> {
    constraints: Vec<&'a SpreadConstraint>,
    counts: Vec<HashMap<&'a str, i64>>,
    minimums: Vec<i64>,
    node_constraints: &'a NodeConstraints,
    namespace: &'a str,
}

impl<'a> SpreadFilter<'a> {
    /// Counts matching pods per domain over the included nodes.
    pub fn new(
        state: &'a ClusterState,
        spread: &'a [SpreadConstraint],
        node_constraints: &'a NodeConstraints,
        namespace: &'a str,
    ) -> Self {
        let constraints: Vec<&SpreadConstraint> = spread.iter().filter(|c| c.hard).collect();
        let mut counts: Vec<HashMap<&str, i64>> = vec![HashMap::new(); constraints.len()];
        for node in state.nodes.values() {
            if !has_keys(&node.facts, constraints.iter().copied()) {
                continue;
            }
            for (i, c) in constraints.iter().enumerate() {
                if !c.includes(&node.facts, node_constraints) {
                    continue;
                }
                let value = node.facts.labels[&c.topology_key].as_str();
                *counts[i].entry(value).or_default() += c.count(node, namespace);
            }
        }
        let mut filter = Self {
            constraints,
            counts,
            minimums: Vec::new(),
            node_constraints,
            namespace,
        };
        filter.update_minimums();
        filter
    }

    fn update_minimums(&mut self) {
        self.minimums = self
            .constraints
            .iter()
            .zip(&self.counts)
            .map(|(c, domains)| {
                if (domains.len() as i64) < c.min_domains {
                    0
                } else {
                    domains.values().copied().min().unwrap_or(i64::MAX)
                }
            })
            .collect();
    }

    /// Preemption's what-if, as kube-scheduler's `RemovePod`/`AddPod`:
    /// counts `pod` on `node` out of (`delta` −1) or back into (+1) its
    /// domains, and recomputes the global minimums.
    pub fn adjust(&mut self, node: &'a NodeFacts, pod: &PodInfo, delta: i64) {
        if pod.terminating
            || pod.namespace != self.namespace
            || !has_keys(node, self.constraints.iter().copied())
        {
            return;
        }
        let mut changed = false;
        for (i, c) in self.constraints.iter().enumerate() {
            if c.includes(node, self.node_constraints) && c.selector.matches(&pod.labels) {
                let value = node.labels[&c.topology_key].as_str();
                *self.counts[i].entry(value).or_default() += delta;
                changed = true;
            }
        }
        if changed {
            self.update_minimums();
        }
    }

    /// `None` when `node` passes; otherwise kube-scheduler's reason.
    pub fn rejects(&self, node: &NodeFacts) -> Option<&'static str> {
        for (i, c) in self.constraints.iter().enumerate() {
            let Some(value) = node.labels.get(&c.topology_key) else {
                return Some(SPREAD_LABEL_REASON);
            };
            let matching = self.counts[i].get(value.as_str()).copied().unwrap_or(0);
            let skew = (matching + i64::from(c.self_match)).saturating_sub(self.minimums[i]);
            if skew > c.max_skew {
                return Some(SPREAD_REASON);
            }
        }
        None
    }
}

/// Scores the feasible nodes for the soft constraints, kube-scheduler's
/// way; returns 0–100 per node, in the order given.
pub fn score(
    state: &ClusterState,
    spread: &[SpreadConstraint],
    node_constraints: &NodeConstraints,
    namespace: &str,
    feasible: &[&NodeState],
) -> Vec<i64> {
    let soft: Vec<&SpreadConstraint> = spread.iter().filter(|c| !c.hard).collect();
    if soft.is_empty() {
        return vec![0; feasible.len()];
    }
    // kube-scheduler's requireAllTopologies: only system defaults score a
    // node that lacks some of the keys (by the keys it has).
    let require_all = !soft.iter().any(|c| c.system_defaulted);
    let ignored: Vec<bool> = feasible
        .iter()
        .map(|n| require_all && !has_keys(&n.facts, soft.iter().copied()))
        .collect();
    let considered = || {
        feasible
            .iter()
            .zip(&ignored)
            .filter(|(_, ignored)| !**ignored)
            .map(|(n, _)| *n)
    };
    // Per constraint: domains of the feasible nodes, then counts over every node.
    let mut counts: Vec<HashMap<&str, i64>> = Vec::with_capacity(soft.len());
    let mut weights = Vec::with_capacity(soft.len());
    for c in &soft {
        let mut domains: HashMap<&str, i64> = HashMap::new();
        for node in considered() {
            if let Some(value) = node.facts.labels.get(&c.topology_key) {
                domains.insert(value.as_str(), 0);
            }
        }
        let size = if c.topology_key == HOSTNAME_KEY {
            considered().count()
        } else {
            domains.len()
        };
        weights.push(((size + 2) as f64).ln());
        counts.push(domains);
    }
    for node in state.nodes.values() {
        if require_all && !has_keys(&node.facts, soft.iter().copied()) {
            continue;
        }
        for (i, c) in soft.iter().enumerate() {
            if c.topology_key == HOSTNAME_KEY || !c.includes(&node.facts, node_constraints) {
                continue;
            }
            let Some(value) = node.facts.labels.get(&c.topology_key) else {
                continue;
            };
            if let Some(total) = counts[i].get_mut(value.as_str()) {
                *total += c.count(node, namespace);
            }
        }
    }
    let raw: Vec<i64> = feasible
        .iter()
        .zip(&ignored)
        .map(|(node, ignored)| {
            if *ignored {
                return 0;
            }
            let mut total = 0.0;
            for (i, c) in soft.iter().enumerate() {
                let Some(value) = node.facts.labels.get(&c.topology_key) else {
                    // Only with system defaults: the key does not score here.
                    continue;
                };
                let matching = if c.topology_key == HOSTNAME_KEY {
                    c.count(node, namespace)
                } else {
                    counts[i].get(value.as_str()).copied().unwrap_or(0)
                };
                total += matching as f64 * weights[i] + (c.max_skew - 1) as f64;
            }
            total.round() as i64
        })
        .collect();
    let considered_raw = raw
        .iter()
        .zip(&ignored)
        .filter(|(_, i)| !**i)
        .map(|(s, _)| *s);
    let max = considered_raw.clone().max().unwrap_or(0);
    let min = considered_raw.min().unwrap_or(0);
    raw.iter()
        .zip(&ignored)
        .map(|(s, ignored)| {
            if *ignored {
                0
            } else if max == 0 {
                100
            } else {
                100 * (max + min - s) / max
            }
        })
        .collect()
}
