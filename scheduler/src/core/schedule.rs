//! The decision: filter every node (node predicates, host ports, plain
//! resources, GPU fit, attachable-volume limits, volumes, topology spread,
//! inter-pod affinity — kube-scheduler's order — with the room of pods
//! nominated there counted, and cluster-default spread for pods without
//! constraints), score the survivors (preferred inter-pod affinity and
//! `ScheduleAnyway` spread first, the GPU node policy breaking ties), and
//! turn the winner's card picks into a [`Placement`]; or explain, per
//! reason, why no node fits.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use k8s_openapi::api::core::v1::Pod;
use tessera_api::allocation::{encode_pod_devices, ContainerDevice, PodDevices, NVIDIA_VENDOR};
use tessera_api::error::RequestError;
use tessera_api::names::allocation as keys;
use tessera_api::pod_allocation::PodAllocation;
use tessera_api::policy::NodePolicy;

use super::attach_limits::AttachLimits;
use super::gpu_fit::{fit_pod, FitScratch, PodPicks};
use super::inter_pod_affinity::{self, AffinityFilter, AffinityScore};
use super::node_predicates::NodeFacts;
use super::pod_info::PodInfo;
use super::quota::QuotaCheck;
use super::requirements::PodRequirements;
use super::resources::ResourceAmounts;
use super::state::{ClusterState, NodeState, PodCharge};
use super::topology_spread::{self, SpreadFilter};
use super::volumes::{VolumeAction, VolumeCheck};

/// Where a pod goes and what each container gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// `namespace/name`.
    pub pod: String,
    /// Node name.
    pub node: String,
    /// Devices of each init container (empty when none asks for a GPU).
    pub init_containers: PodDevices,
    /// Devices of each app container.
    pub containers: PodDevices,
    /// The charge to assume until the bind is confirmed.
    pub charge: PodCharge,
    /// What to do for the pod's unbound claims before binding it (bind a
    /// PV, or have one provisioned on the node).
    pub volumes: Vec<VolumeAction>,
}

impl Placement {
    /// The per-container device list as annotated: init containers first
    /// when one of them has a GPU, then app containers.
    pub fn annotated_devices(&self) -> PodDevices {
        PodAllocation::new(self.init_containers.clone(), self.containers.clone()).annotated()
    }

    /// The scheduler-owned annotations that record this placement.
    pub fn annotations(&self, unix_time: i64) -> BTreeMap<String, String> {
        let devices = encode_pod_devices(&self.annotated_devices());
        BTreeMap::from([
            (keys::VGPU_NODE.to_owned(), self.node.clone()),
            (keys::VGPU_TIME.to_owned(), unix_time.to_string()),
            (keys::DEVICES_ALLOCATED.to_owned(), devices.clone()),
            (keys::DEVICES_TO_ALLOCATE.to_owned(), devices),
            (
                keys::BIND_PHASE.to_owned(),
                tessera_api::pod::BindPhase::Allocating.as_str().to_owned(),
            ),
            (keys::BIND_TIME.to_owned(), unix_time.to_string()),
        ])
    }
}

/// No node fits: how many nodes failed for each reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unschedulable {
    /// Nodes considered.
    pub total_nodes: usize,
    /// Reason → number of nodes.
    pub reasons: BTreeMap<String, usize>,
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.total_nodes == 0 {
            return f.write_str("0/0 nodes: no nodes in the cluster");
        }
        let mut reasons: Vec<_> = self.reasons.iter().collect();
        reasons.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        // kube-scheduler's own predicates read as it words them
        // ("2 node(s) didn't match pod anti-affinity rules").
        let parts: Vec<String> = reasons
            .iter()
            .map(|(reason, count)| {
                if reason.starts_with("node(s) ") {
                    format!("{count} {reason}")
                } else {
                    format!("{count}/{} nodes: {reason}", self.total_nodes)
                }
            })
            .collect();
        f.write_str(&parts.join("; "))
    }
}

/// Why a pod was not placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The pod's GPU request is invalid; retrying will not help.
    #[error("invalid GPU request: {0}")]
    InvalidRequest(#[from] RequestError),
    /// No node fits now; retry when the cluster changes.
    #[error("{0}")]
    Unschedulable(Unschedulable),
    /// The pod still has `spec.schedulingGates`; it waits until they are removed.
    #[error("waiting for scheduling gates to be removed: {}", .0.join(", "))]
    SchedulingGated(Vec<String>),
}

/// `FailedScheduling` reason: a requested host port is taken on the node.
pub const HOST_PORTS_REASON: &str = "node(s) didn't have free ports for the requested pod ports";
/// `FailedScheduling` reason: the node's GPU inventory annotation does not decode.
pub const CORRUPT_INVENTORY_REASON: &str =
    "GPU inventory annotation is corrupt (see the node's events)";

/// What one decision checks beyond the node itself, computed once from
/// the whole cluster (only for the features the pod or the cluster use).
pub(super) struct Decision<'a> {
    volumes: Option<VolumeCheck<'a>>,
    attach_limits: Option<AttachLimits<'a>>,
    affinity: Option<AffinityFilter<'a>>,
    spread: Option<SpreadFilter<'a>>,
    affinity_score: Option<AffinityScore<'a>>,
    spread_score: bool,
    quota: Option<QuotaCheck<'a>>,
    /// Node name → the nominated pods the pod must make room for there
    /// ([`ClusterState::nominated_before`]); empty without nominations.
    nominated: HashMap<&'a str, Vec<&'a PodInfo>>,
}

impl<'a> Decision<'a> {
    fn new(state: &'a ClusterState, pod: &'a PodRequirements) -> Self {
        Self::build(state, pod, true)
    }

    /// The filters only, no scores (preemption's what-if).
    pub(super) fn filters_only(state: &'a ClusterState, pod: &'a PodRequirements) -> Self {
        Self::build(state, pod, false)
    }

    fn build(state: &'a ClusterState, pod: &'a PodRequirements, scores: bool) -> Self {
        let info = &*pod.info;
        let volumes = (!pod.claims.is_empty())
            .then(|| VolumeCheck::new(&state.storage, &info.namespace, &pod.claims, &pod.key));
        let nominated = state.nominated_before(pod);
        // A nominated pod's required anti-affinity counts on its node even
        // when no placed pod has any.
        let nominated_anti_affinity = nominated
            .values()
            .flatten()
            .any(|other| !other.required_anti_affinity.is_empty());
        Self {
            volumes,
            attach_limits: (!pod.claims.is_empty())
                .then(|| AttachLimits::new(&state.storage, &info.namespace, &pod.claims))
                .flatten(),
            affinity: (nominated_anti_affinity || AffinityFilter::needed(state, info))
                .then(|| AffinityFilter::new(state, info)),
            spread: pod
                .spread
                .iter()
                .any(|c| c.hard)
                .then(|| SpreadFilter::new(state, &pod.spread, &pod.constraints, &info.namespace)),
            affinity_score: (scores && AffinityScore::needed(state, info))
                .then(|| AffinityScore::new(state, info)),
            spread_score: scores && pod.spread.iter().any(|c| !c.hard),
            quota: QuotaCheck::new(state, pod),
            nominated,
        }
    }

    /// kube-scheduler's second filter pass for a node with nominated pods
    /// (`RunFilterPluginsWithNominatedPods`): the pod must also fit with
    /// their labels and anti-affinity terms counted on `node` in the
    /// spread and affinity filters. Their resources, cards and host ports
    /// are already in the node's view ([`ClusterState::reserve_nominated`]).
    fn rejects_with_nominated(&self, node: &NodeFacts) -> Option<&'static str> {
        let waiting = self.nominated.get(node.name.as_str())?;
        if let Some(filter) = &self.spread {
            let mut with = filter.clone();
            for other in waiting {
                with.adjust(node, other, 1);
            }
            if let Some(reason) = with.rejects(node) {
                return Some(reason);
            }
        }
        if let Some(filter) = &self.affinity {
            let mut with = filter.clone();
            for other in waiting {
                with.adjust(node, other, 1);
            }
            if let Some(reason) = with.rejects(node) {
                return Some(reason);
            }
        }
        None
    }

    /// Preemption's what-if: counts a placed pod on `node` out of
    /// (`delta` −1) or back into (+1) the spread and affinity filters.
    pub(super) fn adjust(&mut self, node: &'a NodeFacts, existing: &'a PodInfo, delta: i64) {
        if let Some(spread) = &mut self.spread {
            spread.adjust(node, existing, delta);
        }
        if let Some(affinity) = &mut self.affinity {
            affinity.adjust(node, existing, delta);
        }
    }

    /// Whether `reason`, the first filter `node` failed, is one evicting
    /// pods cannot fix (kube-scheduler's `UnschedulableAndUnresolvable`):
    /// node predicates, a corrupt inventory, volume binding and zone, a
    /// missing spread topology label, unmet pod affinity.
    pub(super) fn unresolvable(
        &self,
        node: &NodeState,
        pod: &PodRequirements,
        reason: &str,
    ) -> bool {
        pod.constraints.rejects(&node.facts).is_some()
            || reason == CORRUPT_INVENTORY_REASON
            || reason == topology_spread::SPREAD_LABEL_REASON
            || reason == inter_pod_affinity::AFFINITY_REASON
            // Evicting pods brings no agent back and registers no device
            // plugin, and frees cards, not quota.
            || node.liveness.stale_agent.is_some()
            || reason == super::node_liveness::no_allocatable_reason(&node.liveness.gpu_resource)
            || reason.starts_with(tessera_api::gpu_quota::RESOURCE_QUOTA_NOT_FIT)
            || self
                .volumes
                .as_ref()
                .is_some_and(|check| check.on_node(&node.facts).err().as_deref() == Some(reason))
    }

    fn scores(&self) -> bool {
        self.affinity_score.is_some() || self.spread_score
    }
}

impl ClusterState {
    /// Decides where `pod` goes. Pure: the state is not changed (call
    /// [`ClusterState::assume`] with the placement's charge to keep it).
    pub fn schedule(&self, pod: &Pod) -> Result<Placement, ScheduleError> {
        let requirements = PodRequirements::from_pod(pod, &self.config)?;
        self.schedule_requirements(&requirements)
    }

    /// [`ClusterState::schedule`] for requirements already read. Nodes are
    /// filtered and scored without building reasons; only when no node fits
    /// is the filter run again to explain why, node by node.
    pub fn schedule_requirements(&self, pod: &PodRequirements) -> Result<Placement, ScheduleError> {
        if !pod.scheduling_gates.is_empty() {
            return Err(ScheduleError::SchedulingGated(pod.scheduling_gates.clone()));
        }
        let defaulted = self.with_default_spread(pod);
        let pod = defaulted.as_ref().unwrap_or(pod);
        let needs_gpu = pod.needs_gpu();
        let decision = Decision::new(self, pod);
        let mut scratch = FitScratch::for_decision(&self.card_types, &pod.policy, false);
        let (_, best) = self.filter_and_score(pod, &decision, needs_gpu, &mut scratch, None);
        let Some(node) = best else {
            let mut explaining = FitScratch::for_decision(&self.card_types, &pod.policy, true);
            let mut reasons = BTreeMap::new();
            let (considered, _) = self.filter_and_score(
                pod,
                &decision,
                needs_gpu,
                &mut explaining,
                Some(&mut reasons),
            );
            return Err(ScheduleError::Unschedulable(Unschedulable {
                total_nodes: considered,
                reasons,
            }));
        };
        // The room nominated pods of at least this priority wait for stays theirs.
        let reserved = self.reserve_nominated(node, pod);
        let node = reserved.as_ref().unwrap_or(node);
        let fit = if needs_gpu {
            fit_pod(&node.cards, node.fullness_sum, pod, &mut scratch, true).map_err(|m| {
                ScheduleError::Unschedulable(Unschedulable {
                    total_nodes: 1,
                    reasons: BTreeMap::from([(m.reason, 1)]),
                })
            })?
        } else {
            super::gpu_fit::NodeFit {
                fullness_after: 0.0,
                containers: None,
                init_containers: None,
            }
        };
        let to_devices =
            |picks: Option<PodPicks>, count: usize| devices_from_picks(node, picks, count);
        let containers = to_devices(fit.containers, pod.containers.len());
        let init_containers = if pod.annotates_init_containers() {
            to_devices(fit.init_containers, pod.init_containers.len())
        } else {
            Vec::new()
        };
        let volumes = match &decision.volumes {
            Some(check) => check.on_node(&node.facts).unwrap_or_default(),
            None => Vec::new(),
        };
        let mut charge = PodCharge::from_devices(
            node.facts.name.clone(),
            pod.resources.clone(),
            &init_containers,
            &containers,
            true,
        )
        .with_info(pod.info.clone());
        charge.volumes = volumes
            .iter()
            .filter_map(|action| match action {
                VolumeAction::BindVolume { volume, .. } => Some(volume.clone()),
                VolumeAction::Provision { .. } => None,
            })
            .collect();
        Ok(Placement {
            pod: pod.key.clone(),
            node: node.facts.name.clone(),
            init_containers,
            containers,
            charge,
            volumes,
        })
    }
}

impl ClusterState {
    /// Runs every node through the filter; returns how many were considered
    /// and the best by the pod's node policy (ties: the first by name).
    /// With `reasons`, counts why nodes were refused.
    /// When the pod or the cluster use preferred terms, the feasible nodes
    /// are ranked first by the sum of the InterPodAffinity and
    /// PodTopologySpread scores (each 0–100, weight 2 as in kube-scheduler's
    /// default profile), then by the node policy.
    fn filter_and_score<'s>(
        &'s self,
        pod: &PodRequirements,
        decision: &Decision<'_>,
        needs_gpu: bool,
        scratch: &mut FitScratch,
        mut reasons: Option<&mut BTreeMap<String, usize>>,
    ) -> (usize, Option<&'s NodeState>) {
        let mut best: Option<(f64, &NodeState)> = None;
        let mut feasible: Vec<(f64, &NodeState)> = Vec::new();
        let ranking = decision.scores();
        let better = |fullness: f64, current: f64| match pod.node_policy {
            NodePolicy::Binpack => fullness > current,
            NodePolicy::Spread => fullness < current,
        };
        let mut considered = 0;
        for node in self.nodes.values() {
            if node.facts.name.is_empty() {
                continue;
            }
            considered += 1;
            let reserved = self.reserve_nominated(node, pod);
            match evaluate_node(
                reserved.as_ref().unwrap_or(node),
                pod,
                decision,
                needs_gpu,
                scratch,
            ) {
                Err(reason) => {
                    if let Some(reasons) = reasons.as_deref_mut() {
                        *reasons.entry(reason).or_default() += 1;
                    }
                }
                Ok(fullness) if ranking => feasible.push((fullness, node)),
                Ok(fullness) => {
                    if best.is_none_or(|(current, _)| better(fullness, current)) {
                        best = Some((fullness, node));
                    }
                }
            }
        }
        if !ranking || feasible.is_empty() {
            return (considered, best.map(|(_, node)| node));
        }
        let nodes: Vec<&NodeState> = feasible.iter().map(|(_, n)| *n).collect();
        let mut preference = vec![0i64; nodes.len()];
        if let Some(affinity) = &decision.affinity_score {
            let raw: Vec<i64> = nodes.iter().map(|n| affinity.raw(&n.facts)).collect();
            for (total, score) in preference
                .iter_mut()
                .zip(inter_pod_affinity::normalize(&raw))
            {
                *total += PREFERENCE_WEIGHT * score;
            }
        }
        if decision.spread_score {
            let scores = topology_spread::score(
                self,
                &pod.spread,
                &pod.constraints,
                &pod.info.namespace,
                &nodes,
            );
            for (total, score) in preference.iter_mut().zip(scores) {
                *total += PREFERENCE_WEIGHT * score;
            }
        }
        let mut winner: Option<(i64, f64, &NodeState)> = None;
        for ((fullness, node), score) in feasible.into_iter().zip(preference) {
            let wins = winner.is_none_or(|(best_score, best_fullness, _)| {
                score > best_score || score == best_score && better(fullness, best_fullness)
            });
            if wins {
                winner = Some((score, fullness, node));
            }
        }
        (considered, winner.map(|(_, _, node)| node))
    }
}

/// Weight of the InterPodAffinity and PodTopologySpread scores, as in
/// kube-scheduler's default profile.
pub const PREFERENCE_WEIGHT: i64 = 2;

/// Ok(node fullness after placement) or the reason the node is refused.
pub(super) fn evaluate_node(
    node: &NodeState,
    pod: &PodRequirements,
    decision: &Decision<'_>,
    needs_gpu: bool,
    scratch: &mut FitScratch,
) -> Result<f64, String> {
    if let Some(reason) = pod.constraints.rejects(&node.facts) {
        return Err(reason);
    }
    if host_ports_taken(node, pod) {
        return Err(HOST_PORTS_REASON.to_owned());
    }
    if let Some(reason) =
        ResourceAmounts::shortfall(&node.allocatable, &node.requested, &pod.resources)
    {
        return Err(reason);
    }
    let fullness = if !needs_gpu {
        0.0
    } else if node.inventory_error.is_some() {
        return Err(CORRUPT_INVENTORY_REASON.to_owned());
    } else if let Some(reason) = node.liveness.refuses_gpu_pod(
        !node.cards.is_empty(),
        &node.allocatable,
        &node.requested,
        &pod.resources,
    ) {
        return Err(reason);
    } else {
        let with_picks = decision.quota.as_ref().is_some_and(QuotaCheck::needs_picks);
        let fit = fit_pod(&node.cards, node.fullness_sum, pod, scratch, with_picks)
            .map_err(|misfit| misfit.reason)?;
        if let Some(quota) = &decision.quota {
            quota.admits(&node.cards, pod, &fit)?;
        }
        fit.fullness_after
    };
    // kube-scheduler's order: NodeVolumeLimits, then VolumeBinding/VolumeZone.
    if let Some(reason) = decision
        .attach_limits
        .as_ref()
        .and_then(|limits| limits.rejects(node))
    {
        return Err(reason.to_owned());
    }
    if let Some(check) = &decision.volumes {
        check.on_node(&node.facts)?;
    }
    if let Some(reason) = decision
        .spread
        .as_ref()
        .and_then(|f| f.rejects(&node.facts))
    {
        return Err(reason.to_owned());
    }
    if let Some(reason) = decision
        .affinity
        .as_ref()
        .and_then(|f| f.rejects(&node.facts))
    {
        return Err(reason.to_owned());
    }
    if let Some(reason) = decision.rejects_with_nominated(&node.facts) {
        return Err(reason.to_owned());
    }
    Ok(fullness)
}

/// The devices of each container from its card picks on `node`.
pub(super) fn devices_from_picks(
    node: &NodeState,
    picks: Option<PodPicks>,
    count: usize,
) -> PodDevices {
    match picks {
        None => vec![Vec::new(); count],
        Some(picks) => picks
            .into_iter()
            .map(|container| {
                container
                    .unwrap_or_default()
                    .into_iter()
                    .map(|p| ContainerDevice {
                        uuid: node.cards[p.card].device.id.clone(),
                        vendor: NVIDIA_VENDOR.to_owned(),
                        memory_mib: p.memory_mib,
                        cores: p.cores,
                    })
                    .collect()
            })
            .collect(),
    }
}

/// Whether a host port the pod asks for is already taken on the node.
fn host_ports_taken(node: &NodeState, pod: &PodRequirements) -> bool {
    let wanted = &pod.info.host_ports;
    !wanted.is_empty()
        && node.residents().any(|resident| {
            resident
                .host_ports
                .iter()
                .any(|taken| wanted.iter().any(|w| w.conflicts_with(taken)))
        })
}
