//! Prometheus metrics on `/metrics`: the allocation picture under HAMi's
//! names (computed from the cluster state at scrape time, so dashboards
//! built for HAMi keep working) and Tessera's own scheduling figures
//! (decisions, latency, queue depth, bind failures).

use std::fmt::Write as _;
use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tessera_api::allocation::decode_pod_devices;

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
        Self {
            registry,
            decisions,
            decision_seconds,
            bind_seconds,
            bind_failures,
            queue_depth,
            leader,
        }
    }

    /// Counts one decision.
    pub fn count_decision(&self, result: &'static str) {
        self.decisions
            .get_or_create(&DecisionLabels { result })
            .inc();
    }

    /// The text exposition: HAMi allocation gauges from `state`, then ours.
    pub fn render(&self, state: &ClusterState, bound_pods: &[(String, String, String)]) -> String {
        let mut out = render_allocation(state, bound_pods);
        let mut ours = String::new();
        if encode(&mut ours, &self.registry).is_err() {
            ours = "# EOF\n".to_owned();
        }
        out.push_str(&ours);
        out
    }

    /// Current queue depth as a plain number (for tests).
    pub fn queue_depth_value(&self) -> i64 {
        self.queue_depth.get()
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// HAMi's allocation gauges. `bound_pods` lists (namespace, name,
/// devices-allocated annotation) of pods with allocations.
fn render_allocation(state: &ClusterState, bound_pods: &[(String, String, String)]) -> String {
    let mut out = String::new();
    let families = [
        (
            "hami_gpu_memory_limit_bytes",
            "GPU memory of each card, bytes",
        ),
        (
            "hami_gpu_memory_allocated_bytes",
            "GPU memory allocated on each card, bytes",
        ),
        ("hami_gpu_core_limit_ratio", "Compute of each card, percent"),
        (
            "hami_gpu_core_allocated_ratio",
            "Compute allocated on each card, percent",
        ),
        ("hami_gpu_shared_count", "Containers sharing each card"),
    ];
    for (index, (name, help)) in families.iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} gauge");
        for (node_name, node) in state.nodes() {
            for card in &node.cards {
                let value = match index {
                    0 => card.device.devmem * MIB,
                    1 => card.usage.memory_mib * MIB,
                    2 => u64::from(card.total_cores()),
                    3 => u64::from(card.usage.cores),
                    _ => u64::from(card.usage.slots),
                };
                let _ = writeln!(
                    out,
                    "{name}{{nodeid=\"{}\",deviceuuid=\"{}\",deviceidx=\"{}\",devicetype=\"{}\"}} {value}",
                    escape(node_name),
                    escape(&card.device.id),
                    card.device.index,
                    escape(&card.device.device_type)
                );
            }
        }
    }
    let _ = writeln!(out, "# HELP hami_vgpu_memory_allocated_bytes GPU memory allocated to each container on each card, bytes.\n# TYPE hami_vgpu_memory_allocated_bytes gauge");
    let _ = writeln!(out, "# HELP hami_vgpu_core_allocated_ratio Compute allocated to each container on each card, percent.\n# TYPE hami_vgpu_core_allocated_ratio gauge");
    for (namespace, pod, annotation) in bound_pods {
        let Ok(devices) = decode_pod_devices(annotation) else {
            continue;
        };
        for (container, list) in devices.iter().enumerate() {
            for device in list {
                let labels = format!(
                    "podnamespace=\"{}\",podname=\"{}\",containeridx=\"{container}\",deviceuuid=\"{}\"",
                    escape(namespace),
                    escape(pod),
                    escape(&device.uuid)
                );
                let _ = writeln!(
                    out,
                    "hami_vgpu_memory_allocated_bytes{{{labels}}} {}",
                    device.memory_mib * MIB
                );
                let _ = writeln!(
                    out,
                    "hami_vgpu_core_allocated_ratio{{{labels}}} {}",
                    device.cores
                );
            }
        }
    }
    out
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
