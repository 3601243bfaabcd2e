//! Preemption as kube-scheduler's DefaultPreemption decides it: when a pod
//! fits nowhere, find the node where evicting pods of lower priority frees
//! enough (CPU, memory, host ports and the exact GPU slices they hold),
//! evicting as few as possible: every lower-priority pod is taken off in a
//! what-if, then put back, highest priority first (those a
//! PodDisruptionBudget protects before the others), whenever the pod still
//! fits. Nodes are ranked by fewest budget violations, then lowest highest
//! victim priority, lowest priority sum, fewest victims, then name. A pod
//! with `preemptionPolicy: Never` (its own or its PriorityClass's) never
//! preempts.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::scheduling::v1::PriorityClass;

use super::gpu_fit::FitScratch;
use super::labels::Selector;
use super::pod_info::PodInfo;
use super::requirements::PodRequirements;
use super::schedule::{evaluate_node, Decision};
use super::state::{ClusterState, PodCharge};

/// A PriorityClass as preemption reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriorityLevel {
    /// `value`.
    pub value: i32,
    /// `globalDefault`.
    pub global_default: bool,
    /// `preemptionPolicy: Never`.
    pub never_preempts: bool,
}

/// A PodDisruptionBudget as preemption reads it.
#[derive(Debug, Clone)]
pub struct DisruptionBudget {
    namespace: String,
    selector: Selector,
    /// `status.disruptionsAllowed`.
    disruptions_allowed: i32,
}

/// PriorityClasses and PodDisruptionBudgets.
#[derive(Debug, Clone, Default)]
pub struct Priorities {
    classes: HashMap<String, PriorityLevel>,
    budgets: BTreeMap<String, DisruptionBudget>,
}

/// Where preempting helps, and whom it evicts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preemption {
    /// The node (`status.nominatedNodeName`).
    pub node: String,
    /// Pods to evict, `namespace/name`.
    pub victims: Vec<String>,
    /// How many of them a PodDisruptionBudget would rather keep.
    pub budget_violations: usize,
}

impl ClusterState {
    /// Records a PriorityClass.
    pub fn upsert_priority_class(&mut self, class: &PriorityClass) {
        if let Some(name) = &class.metadata.name {
            self.priorities.classes.insert(
                name.clone(),
                PriorityLevel {
                    value: class.value,
                    global_default: class.global_default.unwrap_or(false),
                    never_preempts: class.preemption_policy.as_deref() == Some("Never"),
                },
            );
        }
    }

    /// Forgets a PriorityClass.
    pub fn remove_priority_class(&mut self, name: &str) {
        self.priorities.classes.remove(name);
    }

    /// Records a PodDisruptionBudget.
    pub fn upsert_disruption_budget(&mut self, budget: &PodDisruptionBudget) {
        let namespace = budget
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = budget.metadata.name.clone().unwrap_or_default();
        let selector =
            Selector::from_label_selector(budget.spec.as_ref().and_then(|s| s.selector.as_ref()));
        let disruptions_allowed = budget.status.as_ref().map_or(0, |s| s.disruptions_allowed);
        self.priorities.budgets.insert(
            format!("{namespace}/{name}"),
            DisruptionBudget {
                namespace,
                selector,
                disruptions_allowed,
            },
        );
    }

    /// Forgets a PodDisruptionBudget.
    pub fn remove_disruption_budget(&mut self, namespace: &str, name: &str) {
        self.priorities
            .budgets
            .remove(&format!("{namespace}/{name}"));
    }

    /// A pod's priority: `spec.priority`, else its PriorityClass's value,
    /// else the global default class's, else 0.
    pub fn priority_of(&self, pod: &PodInfo) -> i32 {
        if let Some(priority) = pod.priority {
            return priority;
        }
        let classes = &self.priorities.classes;
        pod.priority_class
            .as_ref()
            .and_then(|c| classes.get(c))
            .or_else(|| classes.values().find(|c| c.global_default))
            .map_or(0, |c| c.value)
    }

    fn may_preempt(&self, pod: &PodInfo) -> bool {
        !pod.never_preempts
            && !pod
                .priority_class
                .as_ref()
                .and_then(|c| self.priorities.classes.get(c))
                .is_some_and(|c| c.never_preempts)
    }

    /// Whether an earlier preemption for this pod is still under way: its
    /// nominated node holds lower-priority pods that are terminating (then
    /// it waits for them instead of evicting more).
    pub fn preemption_under_way(&self, pod: &PodInfo, nominated_node: &str) -> bool {
        let priority = self.priority_of(pod);
        self.nodes.get(nominated_node).is_some_and(|node| {
            node.residents()
                .any(|r| r.terminating && self.priority_of(r) < priority)
        })
    }

    /// For a pod that fits nowhere: the node where evicting lower-priority
    /// pods makes it fit, and the fewest such pods; `None` when no node
    /// would, or the pod may not preempt. Pure.
    pub fn find_preemption(&self, pod: &PodRequirements) -> Option<Preemption> {
        if !self.may_preempt(&pod.info) {
            return None;
        }
        let priority = self.priority_of(&pod.info);
        let needs_gpu = pod.needs_gpu();
        let decision = Decision::node_and_quota(self, pod);
        let mut scratch = FitScratch::for_decision(&self.card_types, &pod.policy, false);
        let mut best: Option<((usize, i32, i64, usize), Preemption)> = None;
        for node in self.nodes.values() {
            if node.facts.name.is_empty() || pod.constraints.rejects(&node.facts).is_some() {
                continue;
            }
            // Fits already on what preemption changes: refused for another
            // reason (affinity, spread, volumes) that evicting does not fix.
            if evaluate_node(node, pod, &decision, needs_gpu, &mut scratch).is_ok() {
                continue;
            }
            let mut lower: Vec<(&str, &PodCharge, i32, &PodInfo)> = node
                .pod_keys()
                .filter_map(|key| {
                    let charge = self.charge(key)?;
                    let info = charge.info.as_deref()?;
                    let p = self.priority_of(info);
                    (p < priority).then_some((key.as_str(), charge, p, info))
                })
                .collect();
            if lower.is_empty() {
                continue;
            }
            let all: Vec<(&str, &PodCharge)> = lower.iter().map(|(k, c, _, _)| (*k, *c)).collect();
            if evaluate_node(&node.without(&all), pod, &decision, needs_gpu, &mut scratch).is_err()
            {
                continue;
            }
            // Highest priority first; budget-protected pods get the first
            // chance to stay.
            lower.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(b.0)));
            let mut allowed: BTreeMap<&str, i32> = self
                .priorities
                .budgets
                .iter()
                .map(|(k, b)| (k.as_str(), b.disruptions_allowed))
                .collect();
            let (protected, unprotected): (Vec<_>, Vec<_>) =
                lower.iter().partition(|(_, _, _, info)| {
                    let mut violates = false;
                    for (key, budget) in &self.priorities.budgets {
                        if budget.namespace == info.namespace
                            && budget.selector.matches(&info.labels)
                        {
                            let left = allowed.entry(key.as_str()).or_default();
                            *left -= 1;
                            violates |= *left < 0;
                        }
                    }
                    violates
                });
            let mut removed = all.clone();
            let mut victims: Vec<(&str, i32)> = Vec::new();
            let mut violations = 0;
            for (is_protected, (key, _, p, _)) in protected
                .iter()
                .map(|v| (true, v))
                .chain(unprotected.iter().map(|v| (false, v)))
            {
                let trial: Vec<(&str, &PodCharge)> =
                    removed.iter().copied().filter(|(k, _)| k != key).collect();
                if evaluate_node(
                    &node.without(&trial),
                    pod,
                    &decision,
                    needs_gpu,
                    &mut scratch,
                )
                .is_ok()
                {
                    removed = trial;
                } else {
                    victims.push((key, *p));
                    violations += usize::from(is_protected);
                }
            }
            let rank = (
                violations,
                victims.iter().map(|(_, p)| *p).max().unwrap_or(i32::MIN),
                victims.iter().map(|(_, p)| i64::from(*p)).sum::<i64>(),
                victims.len(),
            );
            if best.as_ref().is_none_or(|(current, _)| rank < *current) {
                let mut names: Vec<String> = victims.iter().map(|(k, _)| (*k).to_owned()).collect();
                names.sort();
                best = Some((
                    rank,
                    Preemption {
                        node: node.facts.name.clone(),
                        victims: names,
                        budget_violations: violations,
                    },
                ));
            }
        }
        best.map(|(_, preemption)| preemption)
    }
}
