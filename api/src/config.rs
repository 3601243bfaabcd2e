//! The config file shared by every component (YAML), with defaults that
//! match HAMi's chart: split count 10, scaling 1, default memory 0 (the
//! whole card), default cores 0, one card per container by default.

use serde::{Deserialize, Serialize};

use crate::container_env::CorePolicy;
use crate::error::ConfigError;
use crate::names::{ResourceNames, DEFAULT_SCHEDULER_NAME};
use crate::policy::{GpuPolicy, NodePolicy};

/// The whole config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Config {
    /// `spec.schedulerName` our scheduler owns.
    pub scheduler_name: String,
    /// Names of the GPU extended resources.
    pub resources: ResourceNames,
    /// Values the webhook fills in when a container leaves them out.
    pub defaults: RequestDefaults,
    /// How cards are shared, cluster-wide.
    pub sharing: DeviceSharing,
    /// Per-node overrides of [`Config::sharing`], by node name.
    pub nodes: Vec<NodeSharingOverride>,
    /// Default scheduling policies when a pod does not name one.
    pub scheduling: SchedulingDefaults,
    /// Largest card memory in the cluster, MiB; when set, the webhook denies
    /// `gpumem` above it at admission instead of leaving the pod pending.
    #[serde(rename = "maxCardMemoryMiB", alias = "maxCardMemoryMib")]
    pub max_card_memory_mib: Option<u64>,
    /// Namespaces whose GPU pods may set `CUDA_DISABLE_CONTROL` and so run
    /// without the interceptor (no in-container cap; the node agent's
    /// host-side enforcement still applies). Empty by default: everywhere
    /// else the webhook denies a GPU pod that sets it.
    pub control_opt_out_namespaces: Vec<String>,
    /// What the node agent does when the driver shows a container holding
    /// more than its cap.
    pub enforcement: Enforcement,
    /// What `/metrics` exports beyond the default names.
    pub metrics: MetricsConfig,
    /// HAMi's `scheduler.overwriteEnv`: the webhook sets
    /// `NVIDIA_VISIBLE_DEVICES=none` on every container that asks for no
    /// GPU, so an image that bakes in `NVIDIA_VISIBLE_DEVICES=all` (CUDA
    /// base images do) gets no card from a runtime that reads it. Off by
    /// default, as in HAMi.
    pub overwrite_env: bool,
    /// `spec.runtimeClassName` the webhook sets on GPU pods that name none
    /// (HAMi's `runtimeClassName` chart value), e.g. `nvidia`: an
    /// alternative to making `nvidia` containerd's default runtime. Unset
    /// by default: pods keep the node's default runtime.
    pub runtime_class_name: Option<String>,
    /// How the node agent shows it is alive and how long the scheduler
    /// waits for it.
    pub liveness: Liveness,
    /// Topology spread constraints for pods that set none.
    pub default_topology_spread: DefaultTopologySpread,
}

/// The node agent's handshake (`hami.io/node-handshake`): the agent renews
/// it every `handshakePeriodSeconds`; the scheduler stops placing GPU pods
/// on a node whose handshake it has not seen change for
/// `handshakeTimeoutSeconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Liveness {
    /// Seconds between two renewals by the node agent (HAMi's device
    /// plugin reported every 30 s).
    pub handshake_period_seconds: u64,
    /// Seconds without an observed renewal after which the scheduler
    /// treats the node's agent as gone.
    pub handshake_timeout_seconds: u64,
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            handshake_period_seconds: 30,
            handshake_timeout_seconds: 90,
        }
    }
}

/// Spread constraints the scheduler gives pods that set no
/// `topologySpreadConstraints`, as kube-scheduler's PodTopologySpread
/// `defaultingType` does. They select the pods of the same Services,
/// ReplicaSets, StatefulSets and ReplicationControllers as the pod; a pod
/// none of them selects gets none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DefaultTopologySpread {
    /// `system` (the default, as kube-scheduler's default profile), `list`
    /// (the [`DefaultTopologySpread::constraints`] below) or `off`.
    pub mode: DefaultSpreadMode,
    /// The constraints of `mode: list` (kube-scheduler's
    /// `defaultConstraints`, without a `labelSelector`).
    pub constraints: Vec<DefaultSpreadConstraint>,
}

/// Which default spread constraints apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DefaultSpreadMode {
    /// kube-scheduler's `defaultingType: System`: `kubernetes.io/hostname`
    /// with `maxSkew: 3` and `topology.kubernetes.io/zone` with `maxSkew:
    /// 5`, both `ScheduleAnyway`.
    #[default]
    System,
    /// `defaultingType: List` with [`DefaultTopologySpread::constraints`].
    List,
    /// No default constraints.
    Off,
}

/// One default constraint (`mode: list`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DefaultSpreadConstraint {
    /// `maxSkew`, at least 1.
    pub max_skew: i32,
    /// `topologyKey`, a node label.
    pub topology_key: String,
    /// `DoNotSchedule` or `ScheduleAnyway`.
    pub when_unsatisfiable: String,
}

impl DefaultTopologySpread {
    /// The constraints in force: kube-scheduler's system defaults, the
    /// configured list, or none.
    pub fn constraints_in_force(&self) -> Vec<DefaultSpreadConstraint> {
        match self.mode {
            DefaultSpreadMode::Off => Vec::new(),
            DefaultSpreadMode::List => self.constraints.clone(),
            DefaultSpreadMode::System => vec![
                DefaultSpreadConstraint {
                    max_skew: 3,
                    topology_key: "kubernetes.io/hostname".to_owned(),
                    when_unsatisfiable: "ScheduleAnyway".to_owned(),
                },
                DefaultSpreadConstraint {
                    max_skew: 5,
                    topology_key: "topology.kubernetes.io/zone".to_owned(),
                    when_unsatisfiable: "ScheduleAnyway".to_owned(),
                },
            ],
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: String, reason: &str| ConfigError::Invalid {
            field,
            reason: reason.to_owned(),
        };
        let prefix = "defaultTopologySpread";
        match self.mode {
            DefaultSpreadMode::List if self.constraints.is_empty() => {
                return Err(invalid(
                    format!("{prefix}.constraints"),
                    "mode list needs at least one constraint (or use mode off)",
                ))
            }
            DefaultSpreadMode::System | DefaultSpreadMode::Off if !self.constraints.is_empty() => {
                return Err(invalid(
                    format!("{prefix}.constraints"),
                    "only apply with mode list; set mode: list or remove them",
                ))
            }
            _ => {}
        }
        for (i, c) in self.constraints.iter().enumerate() {
            if c.max_skew < 1 {
                return Err(invalid(
                    format!("{prefix}.constraints[{i}].maxSkew"),
                    "must be at least 1",
                ));
            }
            if c.topology_key.trim().is_empty() {
                return Err(invalid(
                    format!("{prefix}.constraints[{i}].topologyKey"),
                    "must name a node label, e.g. topology.kubernetes.io/zone",
                ));
            }
            if !matches!(
                c.when_unsatisfiable.as_str(),
                "DoNotSchedule" | "ScheduleAnyway"
            ) {
                return Err(invalid(
                    format!("{prefix}.constraints[{i}].whenUnsatisfiable"),
                    "must be DoNotSchedule or ScheduleAnyway",
                ));
            }
        }
        Ok(())
    }
}

/// The `/metrics` exposition of the scheduler and the node agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Also export HAMi's legacy CamelCase names (`GPUDeviceMemoryLimit`,
    /// `vGPU_device_memory_usage_in_bytes`, ...) with their legacy label
    /// names, next to the `hami_*` names, for dashboards built before HAMi
    /// v2.10. Off by default, as in HAMi.
    pub legacy_names: bool,
}

/// The node agent's host-side enforcement of memory caps: it reads each
/// card's per-process memory from the driver (NVML) and acts on containers
/// that hold more than their allocation, however they got there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Enforcement {
    /// `kill`, `report` or `off`.
    pub mode: EnforcementMode,
    /// MiB a container may hold above its cap on a card before the agent
    /// acts. An absolute figure, not a percentage: what the driver counts
    /// beyond what the interceptor charges (page rounding of small
    /// allocations, driver-internal reservations of a context) is a few MiB
    /// per process whatever the cap, while a percentage of an 80 GiB cap
    /// would let most of a gigabyte through.
    #[serde(rename = "marginMiB", alias = "marginMib")]
    pub margin_mib: u64,
    /// Milliseconds between two readings of the cards' processes.
    pub period_ms: u64,
    /// Namespaces whose pods the agent leaves alone entirely (for example
    /// the GPU operator's validators); empty by default.
    pub exempt_namespaces: Vec<String>,
}

/// What the agent does about a container over its cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EnforcementMode {
    /// Kill the container's processes on that card, largest first, until
    /// it holds no more than its cap; report it too.
    #[default]
    Kill,
    /// Only report (Warning Event, metric, log).
    Report,
    /// Do not read the cards' processes at all.
    Off,
}

impl Default for Enforcement {
    fn default() -> Self {
        Self {
            mode: EnforcementMode::Kill,
            margin_mib: 64,
            period_ms: 500,
            exempt_namespaces: Vec::new(),
        }
    }
}

/// Defaults for GPU requests (HAMi's `defaultMem`, `defaultCores`,
/// `defaultGPUNum`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RequestDefaults {
    /// Cards for a container that gives only memory or cores.
    pub gpu_count: u32,
    /// MiB for a container that gives no memory; 0 = the whole card.
    #[serde(rename = "memoryMiB", alias = "memoryMib")]
    pub memory_mib: u64,
    /// Cores for a container that gives none.
    pub cores: u32,
    /// HAMi's `devices.nvidia.gpuCorePolicy`: when GPU containers' SM caps
    /// apply (`default`: only while the card is shared; `force`: always;
    /// `disable`: never). The webhook writes `GPU_CORE_UTILIZATION_POLICY`
    /// into GPU containers that do not set it, and denies a container that
    /// sets a looser one (a tenant may not lift its own compute cap).
    pub gpu_core_policy: CorePolicy,
    /// HAMi's `devices.nvidia.libCudaLogLevel`: the interceptor's
    /// `LIBCUDA_LOG_LEVEL` for GPU containers that do not set it (0 errors
    /// only … 4 debug); unset leaves the interceptor's default.
    pub lib_cuda_log_level: Option<u8>,
}

/// How physical cards are presented for sharing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DeviceSharing {
    /// How many containers may share one card.
    pub split_count: u32,
    /// Factor applied to card memory (over 1 oversubscribes).
    pub memory_scaling: f64,
    /// Factor applied to card compute (over 1 oversubscribes).
    pub core_scaling: f64,
}

/// Sharing settings for one node; unset fields inherit the cluster's.
/// HAMi's device-plugin `nodeconfig` spellings (`devicesplitcount`,
/// `devicememoryscaling`, `devicecorescaling`, `filterdevices`,
/// `operatingmode`, `migstrategy`) are accepted too, so its entries carry over as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSharingOverride {
    /// Node name.
    pub name: String,
    /// Overrides [`DeviceSharing::split_count`].
    #[serde(alias = "devicesplitcount")]
    pub split_count: Option<u32>,
    /// Overrides [`DeviceSharing::memory_scaling`].
    #[serde(alias = "devicememoryscaling")]
    pub memory_scaling: Option<f64>,
    /// Overrides [`DeviceSharing::core_scaling`].
    #[serde(alias = "devicecorescaling")]
    pub core_scaling: Option<f64>,
    /// Cards of this node that are not shared: the node agent neither
    /// publishes them in the inventory nor registers them with kubelet.
    #[serde(
        default,
        alias = "filterdevices",
        skip_serializing_if = "CardFilter::is_empty"
    )]
    pub filter_devices: CardFilter,
    /// HAMi's per-node operating mode; Tessera shares cards through its
    /// interceptor only, so `hami-core` is the one value accepted.
    #[serde(
        default,
        alias = "operatingmode",
        skip_serializing_if = "Option::is_none"
    )]
    pub operating_mode: Option<String>,
    /// HAMi's per-node MIG strategy; Tessera creates no MIG instances, so
    /// `none` is the one value accepted.
    #[serde(
        default,
        alias = "migstrategy",
        skip_serializing_if = "Option::is_none"
    )]
    pub mig_strategy: Option<String>,
}

/// Cards left out of sharing on a node, by NVML index or by UUID (HAMi's
/// `filterdevices: {uuid: [...], index: [...]}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CardFilter {
    /// Card UUIDs (`GPU-...`) to leave out.
    pub uuid: Vec<String>,
    /// NVML card indexes (as `nvidia-smi` numbers them) to leave out.
    pub index: Vec<u32>,
}

impl CardFilter {
    /// Whether nothing is left out.
    pub fn is_empty(&self) -> bool {
        self.uuid.is_empty() && self.index.is_empty()
    }

    /// Whether the card with `uuid` and `index` is left out.
    pub fn excludes(&self, uuid: &str, index: u32) -> bool {
        self.index.contains(&index) || self.uuid.iter().any(|u| u == uuid)
    }
}

/// The only operating mode Tessera supports (HAMi's `hami-core`).
pub const SUPPORTED_OPERATING_MODE: &str = "hami-core";

/// Cluster-wide default policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct SchedulingDefaults {
    /// Node policy when the pod names none.
    pub node_policy: NodePolicy,
    /// GPU policy when the pod names none.
    pub gpu_policy: GpuPolicy,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            scheduler_name: DEFAULT_SCHEDULER_NAME.to_owned(),
            resources: ResourceNames::default(),
            defaults: RequestDefaults::default(),
            sharing: DeviceSharing::default(),
            nodes: Vec::new(),
            scheduling: SchedulingDefaults::default(),
            max_card_memory_mib: None,
            control_opt_out_namespaces: Vec::new(),
            enforcement: Enforcement::default(),
            metrics: MetricsConfig::default(),
            overwrite_env: false,
            runtime_class_name: None,
            liveness: Liveness::default(),
            default_topology_spread: DefaultTopologySpread::default(),
        }
    }
}

impl Default for RequestDefaults {
    fn default() -> Self {
        Self {
            gpu_count: 1,
            memory_mib: 0,
            cores: 0,
            gpu_core_policy: CorePolicy::Default,
            lib_cuda_log_level: None,
        }
    }
}

impl Default for DeviceSharing {
    fn default() -> Self {
        Self {
            split_count: 10,
            memory_scaling: 1.0,
            core_scaling: 1.0,
        }
    }
}

impl Config {
    /// Parses and validates a config file.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = if text.trim().is_empty() {
            Self::default()
        } else {
            serde_yaml::from_str(text).map_err(|source| ConfigError::Yaml { source })?
        };
        config.validate()?;
        Ok(config)
    }

    /// The sharing settings that apply to `node`.
    pub fn sharing_for_node(&self, node: &str) -> DeviceSharing {
        let mut sharing = self.sharing.clone();
        if let Some(o) = self.nodes.iter().find(|o| o.name == node) {
            sharing.split_count = o.split_count.unwrap_or(sharing.split_count);
            sharing.memory_scaling = o.memory_scaling.unwrap_or(sharing.memory_scaling);
            sharing.core_scaling = o.core_scaling.unwrap_or(sharing.core_scaling);
        }
        sharing
    }

    /// The cards of `node` that are left out of sharing (empty when the
    /// node has no override or its override filters nothing).
    pub fn card_filter_for_node(&self, node: &str) -> CardFilter {
        self.nodes
            .iter()
            .find(|o| o.name == node)
            .map(|o| o.filter_devices.clone())
            .unwrap_or_default()
    }

    /// Checks ranges; every error names the field and the valid range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: &str| ConfigError::Invalid {
            field: field.to_owned(),
            reason: reason.to_owned(),
        };
        if self.scheduler_name.trim().is_empty() {
            return Err(invalid("schedulerName", "must not be empty"));
        }
        if self.defaults.gpu_count == 0 {
            return Err(invalid("defaults.gpuCount", "must be at least 1"));
        }
        if self.defaults.cores > 100 {
            return Err(invalid(
                "defaults.cores",
                "must be between 0 and 100 (percent of a card)",
            ));
        }
        validate_sharing("sharing", &self.sharing)?;
        self.default_topology_spread.validate()?;
        for (i, node) in self.nodes.iter().enumerate() {
            if node.name.trim().is_empty() {
                return Err(invalid(&format!("nodes[{i}].name"), "must name a node"));
            }
            validate_sharing(&format!("nodes[{i}]"), &self.sharing_for_node(&node.name))?;
            if let Some(j) = node
                .filter_devices
                .uuid
                .iter()
                .position(|u| u.trim().is_empty())
            {
                return Err(invalid(
                    &format!("nodes[{i}].filterDevices.uuid[{j}]"),
                    "must be a card UUID such as GPU-8f2c... (see `nvidia-smi -L`)",
                ));
            }
            if let Some(mode) = node
                .operating_mode
                .as_deref()
                .filter(|m| *m != SUPPORTED_OPERATING_MODE)
            {
                return Err(invalid(
                    &format!("nodes[{i}].operatingMode"),
                    &format!("`{mode}` is not supported: Tessera shares cards through its interceptor only, so write `{SUPPORTED_OPERATING_MODE}` or leave it out (MIG and MPS are not available)"),
                ));
            }
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if let Some(strategy) = node.mig_strategy.as_deref().filter(|m| *m != "none") {
                return Err(invalid(
                    &format!("nodes[{i}].migStrategy"),
                    &format!("`{strategy}` is not supported: Tessera creates no MIG instances, so write `none` or leave it out"),
                ));
            }
        }
        if let Some(class) = &self.runtime_class_name {
            if !is_dns_subdomain(class) {
                return Err(invalid(
                    "runtimeClassName",
                    "must name a RuntimeClass (lower-case letters, digits, `-` and `.`, at most 253 characters), e.g. `nvidia`, or be left out",
                ));
            }
        }
        if self.liveness.handshake_period_seconds == 0 {
            return Err(invalid(
                "liveness.handshakePeriodSeconds",
                "must be at least 1 second (30 is HAMi's period)",
            ));
        }
        if self.liveness.handshake_timeout_seconds < 2 * self.liveness.handshake_period_seconds {
            return Err(invalid(
                "liveness.handshakeTimeoutSeconds",
                "must be at least twice liveness.handshakePeriodSeconds, so one late renewal does not take a node out",
            ));
        }
        if self
            .defaults
            .lib_cuda_log_level
            .is_some_and(|level| level > 4)
        {
            return Err(invalid(
                "defaults.libCudaLogLevel",
                "must be between 0 (errors only) and 4 (debug), or left out",
            ));
        }
        if self.max_card_memory_mib == Some(0) {
            return Err(invalid(
                "maxCardMemoryMiB",
                "must be the largest card's memory in MiB, or left out",
            ));
        }
        if !(50..=60_000).contains(&self.enforcement.period_ms) {
            return Err(invalid(
                "enforcement.periodMs",
                "must be between 50 and 60000 milliseconds (500 reacts within a second at a small cost)",
            ));
        }
        if let Some(i) = self
            .enforcement
            .exempt_namespaces
            .iter()
            .position(|ns| ns.trim().is_empty())
        {
            return Err(invalid(
                &format!("enforcement.exemptNamespaces[{i}]"),
                "must name a namespace",
            ));
        }
        for (i, namespace) in self.control_opt_out_namespaces.iter().enumerate() {
            if !is_namespace_name(namespace) {
                return Err(invalid(
                    &format!("controlOptOutNamespaces[{i}]"),
                    "must be a namespace name (lower-case letters, digits and `-`, at most 63 characters)",
                ));
            }
        }
        Ok(())
    }

    /// Whether GPU pods in `namespace` may opt out of the interceptor with
    /// `CUDA_DISABLE_CONTROL` ([`Config::control_opt_out_namespaces`]).
    pub fn may_opt_out_of_control(&self, namespace: &str) -> bool {
        self.control_opt_out_namespaces
            .iter()
            .any(|allowed| allowed == namespace)
    }
}

/// Whether `name` is a valid namespace name (an RFC 1123 label).
fn is_namespace_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Whether `name` is a valid RuntimeClass name (an RFC 1123 subdomain).
fn is_dns_subdomain(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn validate_sharing(prefix: &str, sharing: &DeviceSharing) -> Result<(), ConfigError> {
    let invalid = |field: &str, reason: &str| ConfigError::Invalid {
        field: format!("{prefix}.{field}"),
        reason: reason.to_owned(),
    };
    if sharing.split_count == 0 {
        return Err(invalid("splitCount", "must be at least 1 (1 = no sharing)"));
    }
    for (field, value) in [
        ("memoryScaling", sharing.memory_scaling),
        ("coreScaling", sharing.core_scaling),
    ] {
        if !(value.is_finite() && value > 0.0 && value <= 100.0) {
            return Err(invalid(
                field,
                "must be a number above 0 and at most 100 (1 = the card as it is)",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_hami_chart() {
        let config = Config::from_yaml("").expect("empty config is the default");
        assert_eq!(config.sharing.split_count, 10);
        assert!((config.sharing.memory_scaling - 1.0).abs() < f64::EPSILON);
        assert_eq!(config.defaults.memory_mib, 0);
        assert_eq!(config.defaults.cores, 0);
        assert_eq!(config.defaults.gpu_count, 1);
        assert_eq!(config.scheduler_name, "tessera-scheduler");
        assert_eq!(config.scheduling.gpu_policy, GpuPolicy::SPREAD);
        assert_eq!(config.scheduling.node_policy, NodePolicy::Binpack);
        assert!(config.control_opt_out_namespaces.is_empty());
        assert!(!config.may_opt_out_of_control("default"));
    }

    #[test]
    fn control_opt_out_is_per_listed_namespace() {
        let config =
            Config::from_yaml("controlOptOutNamespaces: [gpu-bench, perf]\n").expect("parses");
        assert!(config.may_opt_out_of_control("gpu-bench"));
        assert!(config.may_opt_out_of_control("perf"));
        assert!(!config.may_opt_out_of_control("gpu"));
        assert!(!config.may_opt_out_of_control("gpu-bench-2"));
        for bad in ["\"\"", "Gpu", "-x", "x_y"] {
            let error = Config::from_yaml(&format!("controlOptOutNamespaces: [ok, {bad}]\n"))
                .expect_err(bad);
            assert!(
                error.to_string().contains("controlOptOutNamespaces[1]"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn parses_overrides_and_applies_them_per_node() {
        let yaml = "
schedulerName: gpu-sched
resources:
  memory: example.com/vmem
sharing:
  splitCount: 4
nodes:
  - name: big
    memoryScaling: 1.5
scheduling:
  gpuPolicy: binpack
";
        let config = Config::from_yaml(yaml).expect("parses");
        assert_eq!(config.resources.memory, "example.com/vmem");
        assert_eq!(config.resources.gpu, "nvidia.com/gpu");
        assert_eq!(config.sharing_for_node("big").split_count, 4);
        assert!((config.sharing_for_node("big").memory_scaling - 1.5).abs() < f64::EPSILON);
        assert!((config.sharing_for_node("small").memory_scaling - 1.0).abs() < f64::EPSILON);
        assert_eq!(config.scheduling.gpu_policy, GpuPolicy::BINPACK);
    }

    #[test]
    fn mib_fields_accept_both_spellings() {
        let config = Config::from_yaml("defaults:\n  memoryMiB: 4096\nmaxCardMemoryMiB: 81920\n")
            .expect("MiB");
        assert_eq!(config.defaults.memory_mib, 4096);
        assert_eq!(config.max_card_memory_mib, Some(81920));
        let config = Config::from_yaml("defaults:\n  memoryMib: 2048\nmaxCardMemoryMib: 1024\n")
            .expect("Mib");
        assert_eq!(config.defaults.memory_mib, 2048);
        assert_eq!(config.max_card_memory_mib, Some(1024));
    }

    #[test]
    fn enforcement_defaults_to_kill_and_parses_every_mode() {
        let config = Config::from_yaml("").expect("defaults");
        assert_eq!(config.enforcement.mode, EnforcementMode::Kill);
        assert_eq!(config.enforcement.margin_mib, 64);
        assert_eq!(config.enforcement.period_ms, 500);
        let config = Config::from_yaml(
            "enforcement:\n  mode: report\n  marginMiB: 16\n  periodMs: 1000\n  exemptNamespaces: [gpu-operator]\n",
        )
        .expect("report");
        assert_eq!(config.enforcement.mode, EnforcementMode::Report);
        assert_eq!(config.enforcement.margin_mib, 16);
        assert_eq!(config.enforcement.period_ms, 1000);
        assert_eq!(config.enforcement.exempt_namespaces, ["gpu-operator"]);
        let off = Config::from_yaml("enforcement:\n  mode: off\n").expect("off");
        assert_eq!(off.enforcement.mode, EnforcementMode::Off);
        assert_eq!(off.enforcement.period_ms, 500, "unset fields keep defaults");
    }

    #[test]
    fn bad_enforcement_settings_are_named() {
        let mode = Config::from_yaml("enforcement:\n  mode: evict\n").expect_err("mode");
        assert!(mode.to_string().contains("evict"), "{mode}");
        let typo = Config::from_yaml("enforcement:\n  margin: 4\n").expect_err("typo");
        assert!(typo.to_string().contains("margin"), "{typo}");
        let period = Config::from_yaml("enforcement:\n  periodMs: 5\n").expect_err("period");
        assert!(
            period.to_string().contains("enforcement.periodMs"),
            "{period}"
        );
        let ns = Config::from_yaml("enforcement:\n  exemptNamespaces: [\"\"]\n").expect_err("ns");
        assert!(
            ns.to_string().contains("enforcement.exemptNamespaces[0]"),
            "{ns}"
        );
    }

    #[test]
    fn legacy_metric_names_are_off_unless_switched_on() {
        assert!(!Config::default().metrics.legacy_names);
        let on = Config::from_yaml("metrics:\n  legacyNames: true\n").expect("parses");
        assert!(on.metrics.legacy_names);
        let typo = Config::from_yaml("metrics:\n  legacy: true\n").expect_err("unknown field");
        assert!(typo.to_string().contains("legacy"), "{typo}");
    }

    #[test]
    fn typos_and_bad_ranges_are_named() {
        let typo = Config::from_yaml("sharing:\n  splitcount: 4\n").expect_err("unknown field");
        assert!(typo.to_string().contains("splitcount"), "{typo}");
        let zero = Config::from_yaml("sharing:\n  splitCount: 0\n").expect_err("zero split");
        assert!(zero.to_string().contains("sharing.splitCount"), "{zero}");
        let scaling =
            Config::from_yaml("nodes:\n  - name: a\n    coreScaling: -1\n").expect_err("negative");
        assert!(
            scaling.to_string().contains("nodes[0].coreScaling"),
            "{scaling}"
        );
    }

    #[test]
    fn hami_nodeconfig_entries_carry_over_with_their_filters() {
        let yaml = "
sharing:
  splitCount: 10
nodes:
  - name: gpu-a
    devicesplitcount: 4
    devicememoryscaling: 1.5
    operatingmode: hami-core
    migstrategy: none
    filterdevices:
      uuid: [GPU-aaaa]
      index: [3]
  - name: gpu-b
    splitCount: 2
    filterDevices: {index: [0, 1]}
";
        let config = Config::from_yaml(yaml).expect("parses");
        assert_eq!(config.sharing_for_node("gpu-a").split_count, 4);
        assert!((config.sharing_for_node("gpu-a").memory_scaling - 1.5).abs() < f64::EPSILON);
        let a = config.card_filter_for_node("gpu-a");
        assert!(a.excludes("GPU-aaaa", 0), "by UUID");
        assert!(a.excludes("GPU-other", 3), "by index");
        assert!(!a.excludes("GPU-other", 1));
        let b = config.card_filter_for_node("gpu-b");
        assert_eq!(b.index, [0, 1]);
        assert!(b.uuid.is_empty());
        assert!(config.card_filter_for_node("gpu-c").is_empty());
        assert_eq!(config.sharing_for_node("gpu-c").split_count, 10);
    }

    #[test]
    fn bad_node_overrides_are_named() {
        let mode =
            Config::from_yaml("nodes:\n  - name: a\n    operatingMode: mig\n").expect_err("mig");
        assert!(
            mode.to_string().contains("nodes[0].operatingMode") && mode.to_string().contains("mig"),
            "{mode}"
        );
        let mig = Config::from_yaml("nodes:\n  - name: a\n    migstrategy: single\n")
            .expect_err("mig strategy");
        assert!(
            mig.to_string().contains("nodes[0].migStrategy") && mig.to_string().contains("single"),
            "{mig}"
        );
        let uuid = Config::from_yaml("nodes:\n  - name: a\n    filterDevices: {uuid: [\"\"]}\n")
            .expect_err("empty uuid");
        assert!(
            uuid.to_string().contains("nodes[0].filterDevices.uuid[0]"),
            "{uuid}"
        );
        let typo = Config::from_yaml("nodes:\n  - name: a\n    filterDevices: {uuids: [x]}\n")
            .expect_err("typo");
        assert!(typo.to_string().contains("uuids"), "{typo}");
        let index = Config::from_yaml("nodes:\n  - name: a\n    filterDevices: {index: [-1]}\n")
            .expect_err("negative index");
        assert!(index.to_string().contains("-1"), "{index}");
    }

    #[test]
    fn runtime_class_is_unset_unless_named() {
        assert_eq!(Config::default().runtime_class_name, None);
        let set = Config::from_yaml("runtimeClassName: nvidia\n").expect("parses");
        assert_eq!(set.runtime_class_name.as_deref(), Some("nvidia"));
        for bad in ["\"\"", "Nvidia", "nv_idia", "-x"] {
            let error = Config::from_yaml(&format!("runtimeClassName: {bad}\n")).expect_err(bad);
            assert!(
                error.to_string().contains("runtimeClassName"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn liveness_defaults_and_bounds() {
        let config = Config::default();
        assert_eq!(config.liveness.handshake_period_seconds, 30);
        assert_eq!(config.liveness.handshake_timeout_seconds, 90);
        let short = Config::from_yaml(
            "liveness:\n  handshakePeriodSeconds: 1\n  handshakeTimeoutSeconds: 2\n",
        )
        .expect("parses");
        assert_eq!(short.liveness.handshake_timeout_seconds, 2);
        let tight = Config::from_yaml("liveness:\n  handshakeTimeoutSeconds: 45\n")
            .expect_err("timeout below twice the period");
        assert!(
            tight
                .to_string()
                .contains("liveness.handshakeTimeoutSeconds"),
            "{tight}"
        );
        let zero =
            Config::from_yaml("liveness:\n  handshakePeriodSeconds: 0\n").expect_err("zero period");
        assert!(
            zero.to_string().contains("liveness.handshakePeriodSeconds"),
            "{zero}"
        );
    }

    #[test]
    fn default_topology_spread_is_kube_schedulers_system_default() {
        let system = Config::default()
            .default_topology_spread
            .constraints_in_force();
        let keys: Vec<(&str, i32, &str)> = system
            .iter()
            .map(|c| {
                (
                    c.topology_key.as_str(),
                    c.max_skew,
                    c.when_unsatisfiable.as_str(),
                )
            })
            .collect();
        assert_eq!(
            keys,
            [
                ("kubernetes.io/hostname", 3, "ScheduleAnyway"),
                ("topology.kubernetes.io/zone", 5, "ScheduleAnyway")
            ]
        );
        let off = Config::from_yaml("defaultTopologySpread:\n  mode: off\n").expect("parses");
        assert!(off
            .default_topology_spread
            .constraints_in_force()
            .is_empty());
        let list = Config::from_yaml(
            "defaultTopologySpread:\n  mode: list\n  constraints:\n    - maxSkew: 1\n      topologyKey: topology.kubernetes.io/zone\n      whenUnsatisfiable: DoNotSchedule\n",
        )
        .expect("parses");
        assert_eq!(
            list.default_topology_spread.constraints_in_force()[0].when_unsatisfiable,
            "DoNotSchedule"
        );
        for (yaml, field) in [
            ("defaultTopologySpread:\n  mode: list\n", "constraints"),
            ("defaultTopologySpread:\n  mode: list\n  constraints:\n    - {maxSkew: 0, topologyKey: z, whenUnsatisfiable: DoNotSchedule}\n", "constraints[0].maxSkew"),
            ("defaultTopologySpread:\n  mode: list\n  constraints:\n    - {maxSkew: 1, topologyKey: z, whenUnsatisfiable: Maybe}\n", "constraints[0].whenUnsatisfiable"),
            ("defaultTopologySpread:\n  constraints:\n    - {maxSkew: 1, topologyKey: z, whenUnsatisfiable: DoNotSchedule}\n", "constraints"),
        ] {
            let error = Config::from_yaml(yaml).expect_err(yaml);
            assert!(
                error.to_string().contains(&format!("defaultTopologySpread.{field}")),
                "{error}"
            );
        }
    }
}
