//! What a pending pod needs, read once per decision: plain resources, node
//! constraints, and each container's resolved GPU request with the pod's
//! placement preferences and policies.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use tessera_api::config::Config;
use tessera_api::error::RequestError;
use tessera_api::policy::{GpuPolicy, NodePolicy};
use tessera_api::request::{PodGpuPolicy, PodGpuRequest, ResolvedGpuRequest};

use super::node_predicates::NodeConstraints;
use super::pod_info::{PodInfo, SharedPodInfo};
use super::resources::ResourceAmounts;
use super::topology_spread::SpreadConstraint;

/// One container's GPU need.
#[derive(Debug, Clone)]
pub struct ContainerNeed {
    /// Container name, for messages.
    pub name: String,
    /// Resolved request; `None` when the container asks for no GPU.
    pub gpu: Option<ResolvedGpuRequest>,
}

/// Everything the core needs to place one pod.
#[derive(Debug, Clone)]
pub struct PodRequirements {
    /// `namespace/name`.
    pub key: String,
    /// CPU, memory, pod slot and other resources.
    pub resources: ResourceAmounts,
    /// Node selector, affinity, tolerations.
    pub constraints: NodeConstraints,
    /// use/nouse type and UUID lists, NUMA binding.
    pub policy: PodGpuPolicy,
    /// App containers, in pod order.
    pub containers: Vec<ContainerNeed>,
    /// Init containers, in pod order.
    pub init_containers: Vec<ContainerNeed>,
    /// How cards are chosen on a node.
    pub gpu_policy: GpuPolicy,
    /// How nodes are chosen.
    pub node_policy: NodePolicy,
    /// Namespace, labels, host ports and inter-pod affinity terms.
    pub info: SharedPodInfo,
    /// `topologySpreadConstraints`.
    pub spread: Vec<SpreadConstraint>,
    /// `spec.schedulingGates` still on the pod: it waits.
    pub scheduling_gates: Vec<String>,
    /// Names of the PersistentVolumeClaims it uses (its namespace).
    pub claims: Vec<String>,
}

impl PodRequirements {
    /// Reads a pod, applying the config's defaults and policies.
    pub fn from_pod(pod: &Pod, config: &Config) -> Result<Self, RequestError> {
        let request = PodGpuRequest::from_pod(pod, &config.resources)?;
        let needs = |list: &[tessera_api::request::ContainerGpuRequest]| {
            list.iter()
                .map(|c| ContainerNeed {
                    name: c.name.clone(),
                    gpu: c.resolve(&config.defaults).filter(|r| r.count > 0),
                })
                .collect::<Vec<_>>()
        };
        Ok(Self {
            key: pod_key(pod),
            resources: ResourceAmounts::pod_requests(pod, &config.resources),
            constraints: NodeConstraints::from_pod(pod),
            gpu_policy: request
                .policy
                .gpu_policy
                .unwrap_or(config.scheduling.gpu_policy),
            node_policy: request
                .policy
                .node_policy
                .unwrap_or(config.scheduling.node_policy),
            info: Arc::new(PodInfo::from_pod(pod)),
            spread: SpreadConstraint::from_pod(pod),
            scheduling_gates: scheduling_gates(pod),
            claims: super::volumes::pod_claims(pod),
            containers: needs(&request.containers),
            init_containers: needs(&request.init_containers),
            policy: request.policy,
        })
    }

    /// Whether any container needs a GPU.
    pub fn needs_gpu(&self) -> bool {
        self.containers
            .iter()
            .chain(&self.init_containers)
            .any(|c| c.gpu.is_some())
    }

    /// Whether the allocation annotation lists init containers first (only
    /// when one of them asks for a GPU).
    pub fn annotates_init_containers(&self) -> bool {
        self.init_containers.iter().any(|c| c.gpu.is_some())
    }
}

/// Names of the pod's `spec.schedulingGates`; a pod with any is not
/// scheduled until they are all removed.
pub fn scheduling_gates(pod: &Pod) -> Vec<String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.scheduling_gates.as_ref())
        .into_iter()
        .flatten()
        .map(|g| g.name.clone())
        .collect()
}

pub use tessera_api::pod::pod_key;
