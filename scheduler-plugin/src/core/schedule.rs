//! The decision: filter every node (predicates, plain resources, GPU fit),
//! score the survivors by the node policy, and turn the winner's card picks
//! into a [`Placement`]; or explain, per reason, why no node fits.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::Pod;
use tessera_api::allocation::{encode_pod_devices, ContainerDevice, PodDevices, NVIDIA_VENDOR};
use tessera_api::error::RequestError;
use tessera_api::names::allocation as keys;
use tessera_api::pod_allocation::PodAllocation;
use tessera_api::policy::NodePolicy;

use super::gpu_fit::{fit_pod, FitScratch, PodPicks};
use super::requirements::PodRequirements;
use super::resources::ResourceAmounts;
use super::state::{ClusterState, NodeState, PodCharge};

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
        let parts: Vec<String> = reasons
            .iter()
            .map(|(reason, count)| format!("{count}/{} nodes: {reason}", self.total_nodes))
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
        let needs_gpu = pod.needs_gpu();
        let mut scratch = FitScratch::for_decision(&self.card_types, &pod.policy, false);
        let (_, best) = self.filter_and_score(pod, needs_gpu, &mut scratch, None);
        let Some(node) = best else {
            let mut explaining = FitScratch::for_decision(&self.card_types, &pod.policy, true);
            let mut reasons = BTreeMap::new();
            let (considered, _) =
                self.filter_and_score(pod, needs_gpu, &mut explaining, Some(&mut reasons));
            return Err(ScheduleError::Unschedulable(Unschedulable {
                total_nodes: considered,
                reasons,
            }));
        };
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
        let to_devices = |picks: Option<PodPicks>, count: usize| -> PodDevices {
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
        };
        let containers = to_devices(fit.containers, pod.containers.len());
        let init_containers = if pod.annotates_init_containers() {
            to_devices(fit.init_containers, pod.init_containers.len())
        } else {
            Vec::new()
        };
        let charge = PodCharge::from_devices(
            node.facts.name.clone(),
            pod.resources.clone(),
            &init_containers,
            &containers,
            true,
        );
        Ok(Placement {
            pod: pod.key.clone(),
            node: node.facts.name.clone(),
            init_containers,
            containers,
            charge,
        })
    }
}

impl ClusterState {
    /// Runs every node through the filter; returns how many were considered
    /// and the best by the pod's node policy (ties: the first by name).
    /// With `reasons`, counts why nodes were refused.
    fn filter_and_score(
        &self,
        pod: &PodRequirements,
        needs_gpu: bool,
        scratch: &mut FitScratch,
        mut reasons: Option<&mut BTreeMap<String, usize>>,
    ) -> (usize, Option<&NodeState>) {
        let mut best: Option<(f64, &NodeState)> = None;
        let mut considered = 0;
        for node in self.nodes.values() {
            if node.facts.name.is_empty() {
                continue;
            }
            considered += 1;
            match evaluate_node(node, pod, needs_gpu, scratch) {
                Err(reason) => {
                    if let Some(reasons) = reasons.as_deref_mut() {
                        *reasons.entry(reason).or_default() += 1;
                    }
                }
                Ok(fullness) => {
                    let better = best.is_none_or(|(current, _)| match pod.node_policy {
                        NodePolicy::Binpack => fullness > current,
                        NodePolicy::Spread => fullness < current,
                    });
                    if better {
                        best = Some((fullness, node));
                    }
                }
            }
        }
        (considered, best.map(|(_, node)| node))
    }
}

/// Ok(node fullness after placement) or the reason the node is refused.
fn evaluate_node(
    node: &NodeState,
    pod: &PodRequirements,
    needs_gpu: bool,
    scratch: &mut FitScratch,
) -> Result<f64, String> {
    if let Some(reason) = pod.constraints.rejects(&node.facts) {
        return Err(reason);
    }
    if let Some(reason) =
        ResourceAmounts::shortfall(&node.allocatable, &node.requested, &pod.resources)
    {
        return Err(reason);
    }
    if !needs_gpu {
        return Ok(0.0);
    }
    if let Some(error) = &node.inventory_error {
        let _ = error;
        return Err("GPU inventory annotation is corrupt (see the node's events)".to_owned());
    }
    fit_pod(&node.cards, node.fullness_sum, pod, scratch, false)
        .map(|fit| fit.fullness_after)
        .map_err(|misfit| misfit.reason)
}
