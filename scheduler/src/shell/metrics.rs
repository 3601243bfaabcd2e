//! Prometheus metrics on `/metrics`: the allocation picture exactly as
//! HAMi's scheduler exports it (same metric names, label names, label
//! values and units, see [`HAMI_SCHEDULER_FAMILIES`]; HAMi's legacy
//! CamelCase names too when `metrics.legacyNames` is on), computed from the
//! cluster state at scrape time so dashboards built for HAMi keep working,
//! and Tessera's own scheduling figures (decisions, latency, queue depth,
//! bind failures). Namespace GPU quotas (`hami_resource_quota_*`) come
//! from the same state. One block per family, one `# EOF`: valid OpenMetrics.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tessera_api::allocation::decode_pod_devices;
use tessera_api::exposition::{
    gauge_family as family, join_with_encoded, write_gauge_family, GaugeFamily, GaugeSample,
};

use crate::core::ClusterState;

const MIB: u64 = 1024 * 1024;

/// Label of the decisions counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `placed`, `unschedulable` or `invalid`.
    pub result: &'static str,
}

/// Tessera's own scheduling metrics.
#[derive(Debug)]
pub struct SchedulerMetrics {
    registry: Registry,
    /// Decisions by result.
    pub decisions: Family<DecisionLabels, Counter>,
    /// Time to decide one pod, seconds.
    pub decision_seconds: Histogram,
    /// Time from decision to confirmed bind, seconds.
    pub bind_seconds: Histogram,
    /// Binds that failed (rolled back and retried).
    pub bind_failures: Counter,
    /// Pods waiting to be decided.
    pub queue_depth: Gauge<i64, AtomicI64>,
    /// 1 while this replica leads.
    pub leader: Gauge<i64, AtomicI64>,
    /// Nodes whose GPU agent stopped renewing its handshake.
    pub stale_gpu_agents: Gauge<i64, AtomicI64>,
    /// Whether HAMi's legacy names are exported too.
    legacy_names: bool,
}

impl Default for SchedulerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl SchedulerMetrics {
    /// Registers the metrics.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "tessera_scheduler_decisions",
            "Scheduling decisions by result",
            decisions.clone(),
        );
        let decision_seconds = Histogram::new(exponential_buckets(0.000_01, 2.0, 20));
        registry.register(
            "tessera_scheduler_decision_duration_seconds",
            "Time to decide where one pod goes",
            decision_seconds.clone(),
        );
        let bind_seconds = Histogram::new(exponential_buckets(0.000_5, 2.0, 16));
        registry.register(
            "tessera_scheduler_bind_duration_seconds",
            "Time of the bind request carrying the allocation",
            bind_seconds.clone(),
        );
        let bind_failures = Counter::default();
        registry.register(
            "tessera_scheduler_bind_failures",
            "Binds that failed and were rolled back",
            bind_failures.clone(),
        );
        let queue_depth = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "tessera_scheduler_queue_depth",
            "Pods waiting to be scheduled (ready and backing off)",
            queue_depth.clone(),
        );
        let leader = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "tessera_scheduler_leader",
            "1 while this replica holds the scheduler lease",
            leader.clone(),
        );
        let stale_gpu_agents = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "tessera_scheduler_stale_gpu_node_agents",
            "GPU nodes whose node agent has not renewed hami.io/node-handshake within the timeout (no GPU pods are placed there)",
            stale_gpu_agents.clone(),
        );
        Self {
            registry,
            decisions,
            decision_seconds,
            bind_seconds,
            bind_failures,
            queue_depth,
            leader,
            stale_gpu_agents,
            legacy_names: false,
        }
    }

    /// Counts one decision.
    pub fn count_decision(&self, result: &'static str) {
        self.decisions
            .get_or_create(&DecisionLabels { result })
            .inc();
    }

    /// Also exports HAMi's legacy CamelCase names (config
    /// `metrics.legacyNames`).
    #[must_use]
    pub fn with_legacy_names(mut self, legacy_names: bool) -> Self {
        self.legacy_names = legacy_names;
        self
    }

    /// The OpenMetrics text exposition: HAMi's allocation gauges from
    /// `state` and `bound_pods`, then ours, each family in one block, one
    /// `# EOF` at the end.
    pub fn render(&self, state: &ClusterState, bound_pods: &[BoundPod]) -> String {
        let hami = render_allocation(state, bound_pods, self.legacy_names);
        let mut ours = String::new();
        if let Err(e) = encode(&mut ours, &self.registry) {
            tracing::warn!(error = %e, "could not encode the scheduler's own metrics");
            ours.clear();
        }
        join_with_encoded(hami, &ours)
    }

    /// Current queue depth as a plain number (for tests).
    pub fn queue_depth_value(&self) -> i64 {
        self.queue_depth.get()
    }
}

/// A pod with an allocation, as the per-container metrics need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundPod {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Node it is bound to.
    pub node: String,
    /// Its `hami.io/vgpu-devices-allocated` annotation.
    pub devices_allocated: String,
}

const CARD_LABELS: &[&str] = &["node", "device_uuid", "device_index", "device_type"];
const CARD_LABELS_WITH_CORES: &[&str] = &[
    "node",
    "device_uuid",
    "device_index",
    "device_cores",
    "device_type",
];
const LEGACY_CARD_LABELS: &[&str] = &["nodeid", "deviceuuid", "deviceidx", "devicetype"];
const CONTAINER_LABELS: &[&str] = &["namespace", "node", "pod", "container_index", "device_uuid"];
const LEGACY_CONTAINER_LABELS: &[&str] = &[
    "podnamespace",
    "nodename",
    "podname",
    "containeridx",
    "deviceuuid",
];

/// Every family HAMi's scheduler exports (`cmd/scheduler/metrics.go`), with
/// its name, help text and label names, in the order they are rendered.
pub const HAMI_SCHEDULER_FAMILIES: &[GaugeFamily] = &[
    family(
        "hami_gpu_memory_limit_bytes",
        "Device memory limit for a certain GPU",
        CARD_LABELS,
        false,
    ),
    family(
        "hami_gpu_core_limit_ratio",
        "Device core limit for a certain GPU",
        CARD_LABELS,
        false,
    ),
    family(
        "hami_gpu_memory_allocated_bytes",
        "Device memory allocated for a certain GPU",
        CARD_LABELS_WITH_CORES,
        false,
    ),
    family(
        "hami_gpu_shared_count",
        "Number of containers sharing this GPU",
        CARD_LABELS,
        false,
    ),
    family(
        "hami_gpu_core_allocated_ratio",
        "Device core allocated for a certain GPU",
        CARD_LABELS,
        false,
    ),
    family(
        "hami_node_gpu_overview",
        "GPU overview on a certain node",
        &[
            "node",
            "device_uuid",
            "device_index",
            "device_cores",
            "device_memory_limit",
            "device_type",
        ],
        false,
    ),
    family(
        "hami_node_gpu_memory_allocated_ratio",
        "GPU Memory Allocated Percentage on a certain GPU",
        CARD_LABELS,
        false,
    ),
    family(
        "hami_node_gpu_mig_instance_info",
        "Realized MIG instance identity and scheduler placement",
        &[
            "node",
            "device_uuid",
            "device_index",
            "mig_uuid",
            "profile",
            "gpu_instance_id",
            "compute_instance_id",
            "placement_start",
            "placement_size",
        ],
        false,
    ),
    family(
        "GPUDeviceMemoryLimit",
        "Device memory limit for a certain GPU",
        LEGACY_CARD_LABELS,
        true,
    ),
    family(
        "GPUDeviceCoreLimit",
        "Device memory core limit for a certain GPU",
        LEGACY_CARD_LABELS,
        true,
    ),
    family(
        "GPUDeviceMemoryAllocated",
        "Device memory allocated for a certain GPU",
        &[
            "nodeid",
            "deviceuuid",
            "deviceidx",
            "devicecores",
            "devicetype",
        ],
        true,
    ),
    family(
        "GPUDeviceSharedNum",
        "Number of containers sharing this GPU",
        LEGACY_CARD_LABELS,
        true,
    ),
    family(
        "GPUDeviceCoreAllocated",
        "Device core allocated for a certain GPU",
        LEGACY_CARD_LABELS,
        true,
    ),
    family(
        "nodeGPUOverview",
        "GPU overview on a certain node",
        &[
            "nodeid",
            "deviceuuid",
            "deviceidx",
            "devicecores",
            "devicememorylimit",
            "devicetype",
        ],
        true,
    ),
    family(
        "nodeGPUMemoryPercentage",
        "GPU Memory Allocated Percentage on a certain GPU",
        &["nodeid", "deviceuuid", "deviceidx"],
        true,
    ),
    family(
        "nodeGPUMigInstance",
        "GPU Sharing mode. 0 for hami-core, 1 for mig, 2 for mps",
        &["nodeid", "deviceuuid", "deviceidx", "migname"],
        true,
    ),
    family(
        "hami_resource_quota_used",
        "resourcequota usage for a certain device",
        &["namespace", "quota_name", "limit"],
        false,
    ),
    family(
        "hami_resource_quota_limit",
        "resourcequota limit for a certain device",
        &["namespace", "quota_name"],
        false,
    ),
    family(
        "QuotaUsed",
        "resourcequota usage for a certain device",
        &["quotanamespace", "quotaName", "limit"],
        true,
    ),
    family(
        "hami_vgpu_memory_allocated_bytes",
        "vGPU memory allocated from a container",
        CONTAINER_LABELS,
        false,
    ),
    family(
        "hami_vgpu_core_allocated_ratio",
        "vGPU core allocated from a container",
        CONTAINER_LABELS,
        false,
    ),
    family(
        "vGPUMemoryAllocated",
        "vGPU memory allocated from a container",
        LEGACY_CONTAINER_LABELS,
        true,
    ),
    family(
        "vGPUCoreAllocated",
        "vGPU core allocated from a container",
        LEGACY_CONTAINER_LABELS,
        true,
    ),
];

/// The allocation figures of one card.
struct CardFigures<'a> {
    node: &'a str,
    uuid: &'a str,
    index: String,
    device_type: &'a str,
    total_mib: u64,
    total_cores: u32,
    used_mib: u64,
    used_cores: u32,
    containers: u32,
}

/// HAMi's allocation gauges, one block per family, computed from `state`
/// (cards) and `bound_pods` (containers). Legacy families only when
/// `legacy_names`.
fn render_allocation(state: &ClusterState, bound_pods: &[BoundPod], legacy_names: bool) -> String {
    let mut cards = Vec::new();
    for (node_name, node) in state.nodes() {
        for card in &node.cards {
            cards.push(CardFigures {
                node: node_name,
                uuid: &card.device.id,
                index: card.device.index.to_string(),
                device_type: &card.device.device_type,
                total_mib: card.device.devmem,
                total_cores: card.total_cores(),
                used_mib: card.usage.memory_mib,
                used_cores: card.usage.cores,
                containers: card.usage.slots,
            });
        }
    }
    let mut out = String::new();
    for family in HAMI_SCHEDULER_FAMILIES {
        if family.legacy && !legacy_names {
            continue;
        }
        let samples = quota_samples(family.name, state)
            .unwrap_or_else(|| samples_of(family.name, &cards, bound_pods));
        write_gauge_family(&mut out, family, &samples);
    }
    out
}

#[allow(clippy::cast_precision_loss)]
fn samples_of(name: &str, cards: &[CardFigures<'_>], bound_pods: &[BoundPod]) -> Vec<GaugeSample> {
    let card = |c: &CardFigures<'_>| {
        vec![
            c.node.to_owned(),
            c.uuid.to_owned(),
            c.index.clone(),
            c.device_type.to_owned(),
        ]
    };
    let card_with_cores = |c: &CardFigures<'_>| {
        vec![
            c.node.to_owned(),
            c.uuid.to_owned(),
            c.index.clone(),
            c.used_cores.to_string(),
            c.device_type.to_owned(),
        ]
    };
    let overview = |c: &CardFigures<'_>| {
        vec![
            c.node.to_owned(),
            c.uuid.to_owned(),
            c.index.clone(),
            c.used_cores.to_string(),
            c.total_mib.to_string(),
            c.device_type.to_owned(),
        ]
    };
    let memory_share = |c: &CardFigures<'_>| {
        if c.total_mib == 0 {
            0.0
        } else {
            c.used_mib as f64 / c.total_mib as f64
        }
    };
    let per_card = |labels: &dyn Fn(&CardFigures<'_>) -> Vec<String>,
                    value: &dyn Fn(&CardFigures<'_>) -> f64| {
        cards.iter().map(|c| (labels(c), value(c))).collect()
    };
    match name {
        "hami_gpu_memory_limit_bytes" | "GPUDeviceMemoryLimit" => {
            per_card(&card, &|c| (c.total_mib * MIB) as f64)
        }
        "hami_gpu_core_limit_ratio" | "GPUDeviceCoreLimit" => {
            per_card(&card, &|c| f64::from(c.total_cores))
        }
        "hami_gpu_memory_allocated_bytes" | "GPUDeviceMemoryAllocated" => {
            per_card(&card_with_cores, &|c| (c.used_mib * MIB) as f64)
        }
        "hami_gpu_shared_count" | "GPUDeviceSharedNum" => {
            per_card(&card, &|c| f64::from(c.containers))
        }
        "hami_gpu_core_allocated_ratio" | "GPUDeviceCoreAllocated" => {
            per_card(&card, &|c| f64::from(c.used_cores))
        }
        "hami_node_gpu_overview" | "nodeGPUOverview" => per_card(&overview, &|c| c.used_mib as f64),
        "hami_node_gpu_memory_allocated_ratio" => per_card(&card, &memory_share),
        "nodeGPUMemoryPercentage" => per_card(
            &|c| vec![c.node.to_owned(), c.uuid.to_owned(), c.index.clone()],
            &memory_share,
        ),
        "hami_vgpu_memory_allocated_bytes" | "vGPUMemoryAllocated" => {
            per_container(bound_pods, |device| (device.memory_mib * MIB) as f64)
        }
        "hami_vgpu_core_allocated_ratio" | "vGPUCoreAllocated" => {
            per_container(bound_pods, |device| f64::from(device.cores))
        }
        // MIG instances: Tessera creates none, so the family has no series
        // (and is not written).
        _ => Vec::new(),
    }
}

/// HAMi's namespace quota families (`None` for any other family), in
/// HAMi's units (MiB for `gpumem`, percent of a card for `gpucores`):
/// usage for every namespace and resource a quota limits or a pod uses,
/// with the limit as the `limit` label (`0` where no quota is set, as
/// HAMi writes it); the limit itself only where a quota sets one.
#[allow(clippy::cast_precision_loss)]
fn quota_samples(name: &str, state: &ClusterState) -> Option<Vec<GaugeSample>> {
    let names = &state.config().resources;
    let figures = state.quotas().figures();
    let samples = match name {
        "hami_resource_quota_used" | "QuotaUsed" => figures
            .iter()
            .map(|f| {
                (
                    vec![
                        f.namespace.clone(),
                        f.resource.resource_name(names).to_owned(),
                        f.limit.unwrap_or(0).to_string(),
                    ],
                    f.used as f64,
                )
            })
            .collect(),
        "hami_resource_quota_limit" => figures
            .iter()
            .filter_map(|f| {
                let limit = f.limit?;
                Some((
                    vec![
                        f.namespace.clone(),
                        f.resource.resource_name(names).to_owned(),
                    ],
                    limit as f64,
                ))
            })
            .collect(),
        _ => return None,
    };
    Some(samples)
}

fn per_container(
    bound_pods: &[BoundPod],
    value: impl Fn(&tessera_api::allocation::ContainerDevice) -> f64,
) -> Vec<GaugeSample> {
    let mut samples = Vec::new();
    for pod in bound_pods {
        let Ok(devices) = decode_pod_devices(&pod.devices_allocated) else {
            continue;
        };
        for (container, list) in devices.iter().enumerate() {
            for device in list {
                samples.push((
                    vec![
                        pod.namespace.clone(),
                        pod.node.clone(),
                        pod.name.clone(),
                        container.to_string(),
                        device.uuid.clone(),
                    ],
                    value(device),
                ));
            }
        }
    }
    samples
}

/// Reads the counter value of one decision result (for tests).
pub fn decision_count(metrics: &SchedulerMetrics, result: &'static str) -> u64 {
    metrics
        .decisions
        .get_or_create(&DecisionLabels { result })
        .get()
}

/// Records a gauge as a plain number.
pub fn set_gauge(gauge: &Gauge<i64, AtomicI64>, value: usize) {
    gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
}
