//! Preemption as kube-scheduler's DefaultPreemption decides it: when a pod
//! fits nowhere, skip the nodes whose failure evicting cannot fix
//! (`UnschedulableAndUnresolvable`) and on the others run the full filter
//! chain in a what-if without the lower-priority pods (freeing CPU,
//! memory, host ports, attachable volumes and the exact GPU slices they
//! hold, and taking them out of spread and affinity counts); evict as few
//! as possible: every lower-priority pod is taken off, then put back,
//! highest priority first (those a PodDisruptionBudget protects before the
//! others), whenever the pod still fits. Nodes are ranked by fewest budget
//! violations, then lowest highest victim priority, lowest priority sum,
//! fewest victims, then name. A pod with `preemptionPolicy: Never` (its
//! own or its PriorityClass's) never preempts. Pods nominated to a node
//! (`status.nominatedNodeName`) keep its room from pods of lower priority.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::scheduling::v1::PriorityClass;

use super::cards::CardUsage;
use super::gpu_fit::{fit_pod, FitScratch};
use super::labels::Selector;
use super::pod_info::PodInfo;
use super::requirements::PodRequirements;
use super::schedule::{devices_from_picks, evaluate_node, Decision};
use super::state::{ClusterState, NodeState, PodCharge};

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
    /// Node → pods nominated there (`status.nominatedNodeName`), waiting
    /// for the room a preemption frees.
    nominated: BTreeMap<String, BTreeMap<String, Arc<PodRequirements>>>,
    /// Pod → its nominated node.
    nominated_nodes: HashMap<String, String>,
    /// Nominations made here whose `status.nominatedNodeName` is not
    /// written yet.
    unpublished: HashSet<String>,
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
        match self.preemption_outcome(pod, None) {
            PreemptionOutcome::Victims(preemption) => Some(preemption),
            _ => None,
        }
    }

    /// kube-scheduler's DefaultPreemption for a pod that fits nowhere
    /// (`nominated_node`: its `status.nominatedNodeName`). Nodes it fails
    /// for a reason evicting cannot fix (node predicates, volume binding,
    /// missing spread label, pod affinity) are skipped; on the others the
    /// full filter chain runs in a what-if without the lower-priority pods
    /// (so their resources, GPU slices, ports, attached volumes, their
    /// anti-affinity toward the pod and their weight in spread skew are
    /// all relieved), then the fewest victims are kept. Pure.
    pub fn preemption_outcome(
        &self,
        pod: &PodRequirements,
        nominated_node: Option<&str>,
    ) -> PreemptionOutcome {
        if !self.may_preempt(&pod.info) {
            return PreemptionOutcome::NotEligible(NEVER_PREEMPTS_MESSAGE);
        }
        let defaulted = self.with_default_spread(pod);
        let pod = defaulted.as_ref().unwrap_or(pod);
        let priority = self.priority_of(&pod.info);
        let needs_gpu = pod.needs_gpu();
        let mut decision = Decision::filters_only(self, pod);
        let mut scratch = FitScratch::for_decision(&self.card_types, &pod.policy, false);
        // An earlier preemption still under way: wait for its victims,
        // unless the nominated node can no longer take the pod at all
        // (then kube-scheduler preempts again elsewhere).
        if let Some(node) = nominated_node.and_then(|n| self.nodes.get(n)) {
            let lost = match evaluate_node(node, pod, &decision, needs_gpu, &mut scratch) {
                Err(reason) => decision.unresolvable(node, pod, &reason),
                Ok(_) => false,
            };
            if !lost && self.preemption_under_way(&pod.info, &node.facts.name) {
                return PreemptionOutcome::NotEligible(TERMINATING_VICTIM_MESSAGE);
            }
        }
        let mut best: Option<((usize, i32, i64, usize), Preemption)> = None;
        let (mut total_nodes, mut not_helpful, mut no_victims) = (0, 0, 0);
        for node in self.nodes.values() {
            if node.facts.name.is_empty() {
                continue;
            }
            total_nodes += 1;
            let reserved = self.reserve_nominated(node, pod);
            let view = reserved.as_ref().unwrap_or(node);
            match evaluate_node(view, pod, &decision, needs_gpu, &mut scratch) {
                // Fits already: nothing to evict here.
                Ok(_) => continue,
                Err(reason) if decision.unresolvable(view, pod, &reason) => {
                    not_helpful += 1;
                    continue;
                }
                Err(_) => {}
            }
            let Some((rank, preemption)) =
                self.select_victims(node, view, pod, priority, &mut decision, &mut scratch)
            else {
                no_victims += 1;
                continue;
            };
            if best.as_ref().is_none_or(|(current, _)| rank < *current) {
                best = Some((rank, preemption));
            }
        }
        match best {
            Some((_, preemption)) => PreemptionOutcome::Victims(preemption),
            None => PreemptionOutcome::NoCandidates {
                total_nodes,
                not_helpful,
                no_victims,
            },
        }
    }

    /// kube-scheduler's SelectVictimsOnNode: every lower-priority pod on
    /// `node` is taken off (from `view`, the node with the room nominated
    /// pods wait for, and from the decision's spread and affinity counts);
    /// if the pod then fits, they are put back one by one, highest
    /// priority first and budget-protected pods first, whenever it still
    /// fits. Returns the node's rank and victims, or `None`. The decision
    /// is left as it was found.
    fn select_victims<'s>(
        &'s self,
        node: &'s NodeState,
        view: &NodeState,
        pod: &PodRequirements,
        priority: i32,
        decision: &mut Decision<'s>,
        scratch: &mut FitScratch,
    ) -> Option<((usize, i32, i64, usize), Preemption)> {
        let needs_gpu = pod.needs_gpu();
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
            return None;
        }
        for (_, _, _, info) in &lower {
            decision.adjust(&node.facts, info, -1);
        }
        let all: Vec<(&str, &PodCharge)> = lower.iter().map(|(k, c, _, _)| (*k, *c)).collect();
        if evaluate_node(&view.without(&all), pod, decision, needs_gpu, scratch).is_err() {
            for (_, _, _, info) in &lower {
                decision.adjust(&node.facts, info, 1);
            }
            return None;
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
                    if budget.namespace == info.namespace && budget.selector.matches(&info.labels) {
                        let left = allowed.entry(key.as_str()).or_default();
                        *left -= 1;
                        violates |= *left < 0;
                    }
                }
                violates
            });
        let mut removed = all.clone();
        let mut victims: Vec<(&str, i32, &PodInfo)> = Vec::new();
        let mut violations = 0;
        for (is_protected, (key, _, p, info)) in protected
            .iter()
            .map(|v| (true, v))
            .chain(unprotected.iter().map(|v| (false, v)))
        {
            decision.adjust(&node.facts, info, 1);
            let trial: Vec<(&str, &PodCharge)> =
                removed.iter().copied().filter(|(k, _)| k != key).collect();
            if evaluate_node(&view.without(&trial), pod, decision, needs_gpu, scratch).is_ok() {
                removed = trial;
            } else {
                decision.adjust(&node.facts, info, -1);
                victims.push((key, *p, info));
                violations += usize::from(is_protected);
            }
        }
        for (_, _, info) in &victims {
            decision.adjust(&node.facts, info, 1);
        }
        let rank = (
            violations,
            victims.iter().map(|(_, p, _)| *p).max().unwrap_or(i32::MIN),
            victims.iter().map(|(_, p, _)| i64::from(*p)).sum::<i64>(),
            victims.len(),
        );
        let mut names: Vec<String> = victims.iter().map(|(k, _, _)| (*k).to_owned()).collect();
        names.sort();
        Some((
            rank,
            Preemption {
                node: node.facts.name.clone(),
                victims: names,
                budget_violations: violations,
            },
        ))
    }

    /// Records or clears a pod's nomination: an unbound, live pod with
    /// `status.nominatedNodeName` waits for room on that node. A
    /// nomination this scheduler made ([`ClusterState::nominate`]) holds
    /// until the pod's status names a node, or the pod is bound or gone.
    pub(crate) fn track_nomination(&mut self, pod: &Pod, key: &str) {
        let status_node = pod
            .status
            .as_ref()
            .and_then(|s| s.nominated_node_name.as_deref())
            .filter(|n| !n.is_empty());
        let live = pod.spec.as_ref().is_some_and(|s| s.node_name.is_none())
            && pod.metadata.deletion_timestamp.is_none()
            && !tessera_api::pod::is_terminal(pod);
        match (live, status_node) {
            (true, Some(node)) => self.record_nomination(pod, key, node),
            (true, None) if self.priorities.unpublished.contains(key) => {}
            _ => self.forget_nomination(key),
        }
    }

    /// Nominates `pod` to `node` at once, as kube-scheduler's nominator
    /// does before the API hears of it, so lower-priority pods decided
    /// while its victims are evicted do not take their room.
    pub fn nominate(&mut self, pod: &Pod, node: &str) {
        let key = super::pod_key(pod);
        self.record_nomination(pod, &key, node);
        if self.priorities.nominated_nodes.contains_key(&key) {
            self.priorities.unpublished.insert(key);
        }
    }

    fn record_nomination(&mut self, pod: &Pod, key: &str, node: &str) {
        self.forget_nomination(key);
        // A pod whose request does not read cannot be placed, so reserves nothing.
        let Ok(requirements) = PodRequirements::from_pod(pod, &self.config) else {
            return;
        };
        self.priorities
            .nominated_nodes
            .insert(key.to_owned(), node.to_owned());
        self.priorities
            .nominated
            .entry(node.to_owned())
            .or_default()
            .insert(key.to_owned(), Arc::new(requirements));
    }

    /// Forgets a pod's nomination (also one not yet published).
    pub fn forget_nomination(&mut self, key: &str) {
        self.priorities.unpublished.remove(key);
        let Some(node) = self.priorities.nominated_nodes.remove(key) else {
            return;
        };
        if let Some(waiting) = self.priorities.nominated.get_mut(&node) {
            waiting.remove(key);
            if waiting.is_empty() {
                self.priorities.nominated.remove(&node);
            }
        }
    }

    /// The pods nominated to `node` (`namespace/name`), as kube-scheduler's
    /// nominator holds them.
    pub fn nominated_pods(&self, node: &str) -> Vec<String> {
        self.priorities
            .nominated
            .get(node)
            .map(|waiting| waiting.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The pods nominated to each node that `pod` must make room for: of
    /// at least its priority, not `pod` itself, not yet placed (node name
    /// → pods). kube-scheduler adds them to their node before running the
    /// filters, so their labels, terms and host ports count there too.
    pub(super) fn nominated_before<'s>(
        &'s self,
        pod: &PodRequirements,
    ) -> HashMap<&'s str, Vec<&'s PodInfo>> {
        let mut before: HashMap<&str, Vec<&PodInfo>> = HashMap::new();
        if self.priorities.nominated.is_empty() {
            return before;
        }
        for (node, waiting) in &self.priorities.nominated {
            for other in self.ahead_of(waiting, pod) {
                before.entry(node.as_str()).or_default().push(&other.info);
            }
        }
        before
    }

    /// Of the pods `waiting` on one node, those `pod` must make room for:
    /// of at least its priority, not `pod` itself, not yet placed.
    fn ahead_of<'s, 'p>(
        &'s self,
        waiting: &'s BTreeMap<String, Arc<PodRequirements>>,
        pod: &'p PodRequirements,
    ) -> impl Iterator<Item = &'s PodRequirements> + use<'s, 'p> {
        let priority = self.priority_of(&pod.info);
        waiting.iter().filter_map(move |(key, other)| {
            (*key != pod.key
                && self.charge(key).is_none()
                && self.priority_of(&other.info) >= priority)
                .then_some(&**other)
        })
    }

    /// `node` as `pod` must see it: with the room of every pod nominated
    /// there of at least `pod`'s priority (other than `pod`, and not yet
    /// placed) charged, as kube-scheduler adds nominated pods before
    /// filtering, so a lower-priority pod cannot take what a preemption
    /// freed. A nominated pod's GPU share is fitted on the node's cards;
    /// when it does not fit yet (its victims are still terminating), the
    /// node's cards count as full for `pod`, as kube-scheduler's
    /// over-committed node refuses every pod asking for that resource.
    /// `None` when nothing is reserved there.
    pub(crate) fn reserve_nominated(
        &self,
        node: &NodeState,
        pod: &PodRequirements,
    ) -> Option<NodeState> {
        if self.priorities.nominated.is_empty() {
            return None;
        }
        let waiting = self.priorities.nominated.get(&node.facts.name)?;
        let mut view: Option<NodeState> = None;
        for other in self.ahead_of(waiting, pod) {
            let view = view.get_or_insert_with(|| node.clone());
            let (mut init, mut app) = (Vec::new(), Vec::new());
            if other.needs_gpu() {
                let mut scratch = FitScratch::for_decision(&self.card_types, &other.policy, false);
                match fit_pod(&view.cards, view.fullness_sum, other, &mut scratch, true) {
                    Ok(fit) => {
                        if other.annotates_init_containers() {
                            init = devices_from_picks(
                                view,
                                fit.init_containers,
                                other.init_containers.len(),
                            );
                        }
                        app = devices_from_picks(view, fit.containers, other.containers.len());
                    }
                    Err(_) => {
                        for card in &mut view.cards {
                            card.usage = CardUsage {
                                memory_mib: card.device.devmem,
                                cores: card.total_cores(),
                                slots: card.device.count,
                            };
                        }
                    }
                }
            }
            let charge = PodCharge::from_devices(
                node.facts.name.clone(),
                other.resources.clone(),
                &init,
                &app,
                true,
            )
            .with_info(other.info.clone());
            view.add_charge(&other.key, &charge);
        }
        view
    }
}

/// What preemption decided for a pod that fits nowhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreemptionOutcome {
    /// Evict these pods on this node.
    Victims(Preemption),
    /// The pod may not preempt now (kube-scheduler's message).
    NotEligible(&'static str),
    /// No node where evicting helps.
    NoCandidates {
        /// Nodes considered.
        total_nodes: usize,
        /// Nodes failing for a reason evicting cannot fix.
        not_helpful: usize,
        /// Nodes where even evicting every lower-priority pod is not enough.
        no_victims: usize,
    },
}

/// kube-scheduler's message for a pod whose `preemptionPolicy` is `Never`.
pub const NEVER_PREEMPTS_MESSAGE: &str = "not eligible due to preemptionPolicy=Never.";
/// kube-scheduler's message while an earlier preemption's victims terminate.
pub const TERMINATING_VICTIM_MESSAGE: &str =
    "not eligible due to a terminating pod on the nominated node.";
/// kube-scheduler's per-node reason: evicting cannot fix the node's failure.
pub const NOT_HELPFUL_REASON: &str = "Preemption is not helpful for scheduling";
/// kube-scheduler's per-node reason: evicting every lower-priority pod is not enough.
pub const NO_VICTIMS_REASON: &str = "No preemption victims found for incoming pod";

impl PreemptionOutcome {
    /// The `preemption: …` part kube-scheduler appends to the pod's
    /// `FailedScheduling` message; `None` when preemption found victims
    /// (then the message has no such part).
    pub fn message(&self) -> Option<String> {
        match self {
            Self::Victims(_) => None,
            Self::NotEligible(why) => Some(format!("preemption: {why}")),
            Self::NoCandidates {
                total_nodes,
                not_helpful,
                no_victims,
            } => {
                // kube-scheduler sorts the "<count> <reason>" strings.
                let mut parts: Vec<String> = [
                    (*not_helpful, NOT_HELPFUL_REASON),
                    (*no_victims, NO_VICTIMS_REASON),
                ]
                .into_iter()
                .filter(|(count, _)| *count > 0)
                .map(|(count, reason)| format!("{count} {reason}"))
                .collect();
                parts.sort();
                Some(format!(
                    "preemption: 0/{total_nodes} nodes are available: {}.",
                    parts.join(", ")
                ))
            }
        }
    }
}
