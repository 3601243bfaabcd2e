//! Resource names, annotation keys, labels and container environment
//! variable names of the HAMi-compatible protocol (see DESIGN.md,
//! "The protocol"). Resource names that HAMi makes configurable live in
//! [`ResourceNames`]; the fixed keys are constants.

use serde::{Deserialize, Serialize};

/// Default number of distinct physical cards a container asks for.
pub const GPU_COUNT_RESOURCE: &str = "nvidia.com/gpu";
/// Default name of the memory-per-card resource (MiB).
pub const GPU_MEMORY_RESOURCE: &str = "nvidia.com/gpumem";
/// Default name of the memory-per-card resource as a percentage of the card.
pub const GPU_MEMORY_PERCENTAGE_RESOURCE: &str = "nvidia.com/gpumem-percentage";
/// Default name of the compute share resource (percent of SMs).
pub const GPU_CORES_RESOURCE: &str = "nvidia.com/gpucores";
/// Default name of the task priority resource (0 high, 1 low).
pub const GPU_PRIORITY_RESOURCE: &str = "nvidia.com/priority";

/// Our scheduler's default `spec.schedulerName`.
pub const DEFAULT_SCHEDULER_NAME: &str = "tessera-scheduler";

/// Pod annotations a user writes.
pub mod pod {
    /// Comma list of card types to use (case-insensitive substring).
    pub const USE_GPU_TYPE: &str = "nvidia.com/use-gputype";
    /// Comma list of card types to avoid (case-insensitive substring).
    pub const NOUSE_GPU_TYPE: &str = "nvidia.com/nouse-gputype";
    /// Comma list of card UUIDs to use.
    pub const USE_GPU_UUID: &str = "nvidia.com/use-gpuuuid";
    /// Comma list of card UUIDs to avoid.
    pub const NOUSE_GPU_UUID: &str = "nvidia.com/nouse-gpuuuid";
    /// `true`: all cards of a container on one NUMA node.
    pub const NUMA_BIND: &str = "nvidia.com/numa-bind";
    /// `true` | `false`: whether the webhook writes
    /// `NVIDIA_VISIBLE_DEVICES=none` into this pod's containers without a
    /// GPU, over the config's `overwriteEnv`.
    pub const OVERWRITE_ENV: &str = "hami.io/overwrite-env";
    /// JSON map of container name to `true` | `false`, over
    /// [`OVERWRITE_ENV`] for the containers it names.
    pub const OVERWRITE_ENV_CONTAINERS: &str = "hami.io/overwrite-env-containers";
    /// How cards are chosen on a node: a comma list of `binpack`, `spread`,
    /// `numa`, `mutex`, `topology-aware` (see [`crate::policy`]).
    pub const GPU_SCHEDULER_POLICY: &str = "hami.io/gpu-scheduler-policy";
    /// `binpack` | `spread`: how nodes are chosen.
    pub const NODE_SCHEDULER_POLICY: &str = "hami.io/node-scheduler-policy";
    /// Device mode the pod's cards must be in (`hami-core`; HAMi also has
    /// `mig` and `mps`, which Tessera refuses, see [`crate::vgpu_mode`]).
    pub const VGPU_MODE: &str = "nvidia.com/vgpu-mode";
}

/// Label that opts a pod or namespace out of the webhook, and its value.
pub const WEBHOOK_IGNORE_LABEL: &str = "hami.io/webhook";
/// Value of [`WEBHOOK_IGNORE_LABEL`] that opts out.
pub const WEBHOOK_IGNORE_VALUE: &str = "ignore";

/// Node annotation carrying the GPU inventory, written by the node agent.
pub const NODE_REGISTER_ANNOTATION: &str = "hami.io/node-nvidia-register";

/// Node annotation carrying the cards' pairwise link scores, written by the
/// node agent (see [`crate::pair_scores`]).
pub const NODE_PAIR_SCORE_ANNOTATION: &str = "hami.io/node-nvidia-score";

/// Pod annotations owned by the scheduler (and node agent). A pod that
/// arrives at admission carrying any of these is forging an allocation.
pub mod allocation {
    /// Node the scheduler placed the pod on.
    pub const VGPU_NODE: &str = "hami.io/vgpu-node";
    /// Unix time (seconds) of the scheduling decision.
    pub const VGPU_TIME: &str = "hami.io/vgpu-time";
    /// The devices allocated to each container.
    pub const DEVICES_ALLOCATED: &str = "hami.io/vgpu-devices-allocated";
    /// The devices the node agent still has to hand to containers.
    pub const DEVICES_TO_ALLOCATE: &str = "hami.io/vgpu-devices-to-allocate";
    /// `allocating` → `success` | `failed`.
    pub const BIND_PHASE: &str = "hami.io/bind-phase";
    /// Unix time (seconds) the bind started.
    pub const BIND_TIME: &str = "hami.io/bind-time";

    /// Every scheduler-owned key, for the webhook's forgery check.
    pub const SCHEDULER_OWNED: [&str; 6] = [
        VGPU_NODE,
        VGPU_TIME,
        DEVICES_ALLOCATED,
        DEVICES_TO_ALLOCATE,
        BIND_PHASE,
        BIND_TIME,
    ];

    /// Tessera's seal over the allocation: an HMAC that only Tessera's
    /// scheduler can write and every Tessera component checks (see
    /// `tessera_api::allocation_seal`). Not part of HAMi's protocol.
    pub const SEAL: &str = "tessera.io/allocation-seal";
    /// Prefix of every pod annotation Tessera owns; users never set these.
    pub const TESSERA_PREFIX: &str = "tessera.io/";

    /// `hami.io/bind-phase` while the node agent has not applied it yet.
    pub const PHASE_ALLOCATING: &str = "allocating";
    /// `hami.io/bind-phase` once every container got its devices.
    pub const PHASE_SUCCESS: &str = "success";
    /// `hami.io/bind-phase` when the node agent could not apply it.
    pub const PHASE_FAILED: &str = "failed";
}

/// Environment variables set inside GPU containers by the node agent and
/// read by the interceptor: the names are spelled once, in
/// [`crate::container_env`]; these are the same constants under the names
/// the webhook and the agent use.
pub mod env {
    pub use crate::container_env::{
        CORE_UTILIZATION_POLICY, DISABLE_CONTROL, LOG_LEVEL, MEMORY_LIMIT_ALL as MEMORY_LIMIT,
        SHARED_CACHE, SM_LIMIT, TASK_PRIORITY, VISIBLE_DEVICES as NVIDIA_VISIBLE_DEVICES,
    };
}

/// The extended-resource names GPU pods use. HAMi lets operators rename
/// them; the defaults are `nvidia.com/*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ResourceNames {
    /// Number of distinct cards (`nvidia.com/gpu`).
    pub gpu: String,
    /// MiB per card (`nvidia.com/gpumem`).
    pub memory: String,
    /// Percent of each card's memory (`nvidia.com/gpumem-percentage`).
    pub memory_percentage: String,
    /// Percent of each card's SMs (`nvidia.com/gpucores`).
    pub cores: String,
    /// Task priority (`nvidia.com/priority`).
    pub priority: String,
}

impl Default for ResourceNames {
    fn default() -> Self {
        Self {
            gpu: GPU_COUNT_RESOURCE.to_owned(),
            memory: GPU_MEMORY_RESOURCE.to_owned(),
            memory_percentage: GPU_MEMORY_PERCENTAGE_RESOURCE.to_owned(),
            cores: GPU_CORES_RESOURCE.to_owned(),
            priority: GPU_PRIORITY_RESOURCE.to_owned(),
        }
    }
}

impl ResourceNames {
    /// Whether `name` is one of the GPU resources (so it is ours to account,
    /// not an extended resource the node must advertise).
    pub fn is_gpu_resource(&self, name: &str) -> bool {
        name == self.gpu
            || name == self.memory
            || name == self.memory_percentage
            || name == self.cores
            || name == self.priority
    }
}

/// Node annotation through which the node agent shows it is alive (HAMi's
/// handshake key). The agent renews it with `Reported <time>`; the
/// scheduler judges liveness by when it saw the value change, never by the
/// time written in it (clocks of nodes and scheduler may differ).
pub const NODE_HANDSHAKE_ANNOTATION: &str = "hami.io/node-handshake";
/// Prefix of a handshake value the node agent wrote (HAMi's device plugin
/// wrote `Reported <time>` too; HAMi's scheduler wrote `Requesting_<time>`
/// and `Deleted_<time>`, which are not renewals).
pub const HANDSHAKE_REPORTED_PREFIX: &str = "Reported ";
