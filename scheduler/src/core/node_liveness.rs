//! Whether a GPU node can still take GPU pods beyond what its cards hold:
//! its node agent is alive, and kubelet still has the agent's devices to
//! hand out. Without this a node whose agent died, or a leftover inventory
//! annotation, keeps attracting pods that kubelet then rejects.
//!
//! - **Agent alive.** The agent renews `hami.io/node-handshake` every
//!   `liveness.handshakePeriodSeconds`. [`HandshakeTracker`] records when
//!   *this scheduler* saw the value change, and a node whose handshake has
//!   not changed for `liveness.handshakeTimeoutSeconds` is stale. The time
//!   written in the value is never compared with the scheduler's clock, so
//!   skewed node clocks do not matter. A node first seen (a scheduler that
//!   just started) gets the whole timeout before it can be stale, so a
//!   restart never takes every node out at once. A node without the
//!   annotation (an agent older than the handshake, a `tessera simulate`
//!   cluster file) is judged by kubelet's devices alone.
//! - **Kubelet's devices.** The agent's device plugin registers the GPU
//!   count resource (`nvidia.com/gpu`) with kubelet, which admits a pod only
//!   while the node's allocatable covers it. A node with an inventory whose
//!   allocatable is 0 or absent (plugin gone, a leftover annotation) or no
//!   longer covers the pod's devices on top of those already charged is
//!   refused, as kube-scheduler's NodeResourcesFit would.
//!
//! Pods already placed are never touched. The reasons are counted per node
//! in `FailedScheduling` like kube-scheduler's own.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use tessera_api::names::{HANDSHAKE_REPORTED_PREFIX, NODE_HANDSHAKE_ANNOTATION};

use super::resources::ResourceAmounts;

/// `FailedScheduling` reason: the node's agent stopped renewing its handshake.
pub fn stale_agent_reason(timeout: Duration) -> String {
    format!(
        "node(s) had no live GPU node agent ({NODE_HANDSHAKE_ANNOTATION} not renewed for {}s)",
        timeout.as_secs()
    )
}

/// `FailedScheduling` reason: the node has an inventory but kubelet offers
/// none of the GPU count resource.
pub fn no_allocatable_reason(resource: &str) -> String {
    format!("node(s) had no allocatable {resource} (the node agent's device plugin is not registered with kubelet)")
}

/// `FailedScheduling` reason: kubelet's allocatable GPU count resource does
/// not cover the pod on top of the pods already there.
pub fn insufficient_allocatable_reason(resource: &str) -> String {
    format!("node(s) had insufficient allocatable {resource} for the pod (kubelet would reject it)")
}

/// What decides, per node, whether GPU pods may still go there.
#[derive(Debug, Clone)]
pub struct NodeLiveness {
    /// Set while the node's agent is stale: the timeout its handshake missed.
    pub stale_agent: Option<Duration>,
    /// The GPU count resource kubelet accounts (`nvidia.com/gpu`), for the reasons.
    pub gpu_resource: Arc<str>,
}

impl NodeLiveness {
    /// Why a node with these facts refuses a GPU pod requesting `request`
    /// (its `gpu_devices` are kubelet's count), if it does. `has_inventory`:
    /// the node carries an inventory annotation; `allocatable` and `used`
    /// are the node's allocatable and what the pods charged there request.
    pub fn refuses_gpu_pod(
        &self,
        has_inventory: bool,
        allocatable: &ResourceAmounts,
        used: &ResourceAmounts,
        request: &ResourceAmounts,
    ) -> Option<String> {
        if let Some(timeout) = self.stale_agent {
            return Some(stale_agent_reason(timeout));
        }
        if !has_inventory {
            return None;
        }
        if allocatable.gpu_devices <= 0 {
            return Some(no_allocatable_reason(&self.gpu_resource));
        }
        if request.gpu_devices > 0
            && used.gpu_devices + request.gpu_devices > allocatable.gpu_devices
        {
            return Some(insufficient_allocatable_reason(&self.gpu_resource));
        }
        None
    }
}

/// The node's `hami.io/node-handshake`, if it has one.
pub fn handshake_of(node: &Node) -> Option<&str> {
    node.metadata
        .annotations
        .as_ref()?
        .get(NODE_HANDSHAKE_ANNOTATION)
        .map(String::as_str)
}

/// When this scheduler last saw each node's handshake renewed. Pure: the
/// caller passes the time of each observation and question.
#[derive(Debug, Clone)]
pub struct HandshakeTracker {
    timeout: Duration,
    nodes: HashMap<String, Renewal>,
}

#[derive(Debug, Clone)]
struct Renewal {
    value: String,
    seen_at: Instant,
}

impl HandshakeTracker {
    /// A tracker judging staleness after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            nodes: HashMap::new(),
        }
    }

    /// The timeout in force.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Records `node`'s handshake as observed at `now`. The first sight of
    /// a node counts as a renewal (the grace after a scheduler start); after
    /// that only a changed `Reported ...` value does (HAMi's scheduler's
    /// `Requesting_...`/`Deleted_...` values do not). No handshake: the
    /// node is not tracked. Returns whether this observation renewed it.
    pub fn observe(&mut self, node: &str, handshake: Option<&str>, now: Instant) -> bool {
        let Some(value) = handshake else {
            self.nodes.remove(node);
            return false;
        };
        match self.nodes.get_mut(node) {
            None => {
                self.nodes.insert(
                    node.to_owned(),
                    Renewal {
                        value: value.to_owned(),
                        seen_at: now,
                    },
                );
                true
            }
            Some(known) if known.value == value => false,
            Some(known) => {
                known.value = value.to_owned();
                let renewed = value.starts_with(HANDSHAKE_REPORTED_PREFIX);
                if renewed {
                    known.seen_at = now;
                }
                renewed
            }
        }
    }

    /// Forgets a deleted node.
    pub fn forget(&mut self, node: &str) {
        self.nodes.remove(node);
    }

    /// How long `node`'s handshake has gone unrenewed at `now`, when that
    /// is longer than the timeout.
    pub fn stale_for(&self, node: &str, now: Instant) -> Option<Duration> {
        let silent = now.saturating_duration_since(self.nodes.get(node)?.seen_at);
        (silent > self.timeout).then_some(silent)
    }

    /// The nodes whose agent is stale at `now`.
    pub fn stale_nodes(&self, now: Instant) -> BTreeSet<String> {
        self.nodes
            .keys()
            .filter(|node| self.stale_for(node, now).is_some())
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(90);

    fn amounts(gpu_devices: i64) -> ResourceAmounts {
        ResourceAmounts {
            gpu_devices,
            ..ResourceAmounts::default()
        }
    }

    fn live() -> NodeLiveness {
        NodeLiveness {
            stale_agent: None,
            gpu_resource: Arc::from("nvidia.com/gpu"),
        }
    }

    #[test]
    fn a_handshake_seen_changing_keeps_the_node_live_until_the_timeout() {
        let start = Instant::now();
        let mut tracker = HandshakeTracker::new(TIMEOUT);
        assert!(tracker.observe("a", Some("Reported 2020-01-01 00:00:00 UTC"), start));
        // The text is years old, but the scheduler only just saw it: grace.
        assert_eq!(tracker.stale_for("a", start + TIMEOUT), None);
        let later = start + TIMEOUT + Duration::from_secs(5);
        assert_eq!(
            tracker.stale_for("a", later),
            Some(TIMEOUT + Duration::from_secs(5))
        );
        assert_eq!(tracker.stale_nodes(later), BTreeSet::from(["a".to_owned()]));
        // The same value again (a relist) is no renewal.
        assert!(!tracker.observe("a", Some("Reported 2020-01-01 00:00:00 UTC"), later));
        assert!(tracker.stale_for("a", later).is_some());
        // A new value is, whatever time it claims.
        assert!(tracker.observe("a", Some("Reported 1999-01-01 00:00:00 UTC"), later));
        assert_eq!(tracker.stale_for("a", later + TIMEOUT), None);
    }

    #[test]
    fn values_other_agents_write_are_not_renewals() {
        let start = Instant::now();
        let mut tracker = HandshakeTracker::new(TIMEOUT);
        tracker.observe("a", Some("Reported 1"), start);
        let at = start + Duration::from_secs(60);
        assert!(!tracker.observe("a", Some("Requesting_2026.12.01 07:30:00"), at));
        assert!(!tracker.observe("a", Some("Deleted_2026.12.01 07:30:00"), at));
        assert!(tracker
            .stale_for("a", start + TIMEOUT + Duration::from_secs(1))
            .is_some());
        // Back to our agent's value after HAMi's: a renewal.
        assert!(tracker.observe("a", Some("Reported 1"), at));
    }

    #[test]
    fn nodes_without_a_handshake_are_never_stale() {
        let start = Instant::now();
        let mut tracker = HandshakeTracker::new(TIMEOUT);
        assert!(!tracker.observe("legacy", None, start));
        assert_eq!(tracker.stale_for("legacy", start + TIMEOUT * 10), None);
        tracker.observe("gone", Some("Reported 1"), start);
        tracker.forget("gone");
        assert!(tracker.stale_nodes(start + TIMEOUT * 10).is_empty());
    }

    #[test]
    fn a_stale_agent_refuses_gpu_pods_with_the_timeout_in_the_reason() {
        let stale = NodeLiveness {
            stale_agent: Some(Duration::from_secs(95)),
            ..live()
        };
        assert_eq!(
            stale
                .refuses_gpu_pod(true, &amounts(40), &amounts(0), &amounts(1))
                .as_deref(),
            Some("node(s) had no live GPU node agent (hami.io/node-handshake not renewed for 95s)")
        );
    }

    #[test]
    fn kubelets_allocatable_must_cover_the_pod_where_an_inventory_is() {
        let node = live();
        let no_gpus = no_allocatable_reason("nvidia.com/gpu");
        assert_eq!(
            node.refuses_gpu_pod(true, &amounts(0), &amounts(0), &amounts(1)),
            Some(no_gpus.clone()),
            "allocatable 0 or absent with a leftover inventory"
        );
        assert_eq!(
            node.refuses_gpu_pod(true, &amounts(0), &amounts(0), &amounts(0)),
            Some(no_gpus),
            "even a pod that names no device count"
        );
        assert_eq!(
            node.refuses_gpu_pod(true, &amounts(4), &amounts(3), &amounts(2)),
            Some(insufficient_allocatable_reason("nvidia.com/gpu"))
        );
        assert_eq!(
            node.refuses_gpu_pod(true, &amounts(4), &amounts(3), &amounts(1)),
            None
        );
        assert_eq!(
            node.refuses_gpu_pod(false, &amounts(0), &amounts(0), &amounts(1)),
            None,
            "a node without inventory is left to the card fit"
        );
    }

    fn gpu_node(name: &str, allocatable_gpus: Option<&str>) -> Node {
        let devices = vec![tessera_api::inventory::GpuDevice {
            id: format!("GPU-{name}"),
            index: 0,
            count: 4,
            devmem: 15360,
            devcore: 100,
            device_type: "NVIDIA-Tesla T4".into(),
            numa: 0,
            mode: "hami-core".into(),
            health: true,
        }];
        let mut allocatable = serde_json::json!({"cpu": "8", "memory": "32Gi", "pods": "110"});
        if let Some(gpus) = allocatable_gpus {
            allocatable["nvidia.com/gpu"] = gpus.into();
        }
        serde_json::from_value(serde_json::json!({"metadata": {"name": name,
            "annotations": {"hami.io/node-nvidia-register": tessera_api::inventory::encode_inventory(&devices)}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}], "allocatable": allocatable}}))
        .expect("node")
    }

    fn gpu_pod(name: &str) -> k8s_openapi::api::core::v1::Pod {
        serde_json::from_value(
            serde_json::json!({"metadata": {"name": name, "namespace": "default"},
            "spec": {"schedulerName": "tessera-scheduler", "containers": [{"name": "main",
                "resources": {"limits": {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000"}}}]}}),
        )
        .expect("pod")
    }

    #[test]
    fn the_decision_counts_each_liveness_reason_per_node_and_uses_a_node_again_when_it_renews() {
        use crate::core::{ClusterState, ScheduleError};
        let mut state = ClusterState::new(tessera_api::config::Config::default());
        state.upsert_node(&gpu_node("stale-1", Some("4")));
        state.upsert_node(&gpu_node("stale-2", Some("4")));
        state.upsert_node(&gpu_node("leftover-zero", Some("0")));
        state.upsert_node(&gpu_node("leftover-absent", None));
        let changed = state.set_stale_agents(BTreeSet::from(["stale-1".into(), "stale-2".into()]));
        assert_eq!(changed, ["stale-1", "stale-2"]);
        let Err(ScheduleError::Unschedulable(why)) = state.schedule(&gpu_pod("p")) else {
            panic!("no node may take the pod");
        };
        assert_eq!(
            why.to_string(),
            "2 node(s) had no allocatable nvidia.com/gpu (the node agent's device plugin is not registered with kubelet); \
             2 node(s) had no live GPU node agent (hami.io/node-handshake not renewed for 90s)"
        );
        // A node upserted while stale stays stale.
        state.upsert_node(&gpu_node("stale-1", Some("4")));
        assert!(state.schedule(&gpu_pod("p")).is_err());
        state.set_stale_agents(BTreeSet::from(["stale-2".into()]));
        let placement = state.schedule(&gpu_pod("p")).expect("stale-1 renewed");
        assert_eq!(placement.node, "stale-1");
    }

    #[test]
    fn kubelets_count_of_devices_already_charged_is_respected() {
        use crate::core::ScheduleError;
        let mut state = crate::core::ClusterState::new(tessera_api::config::Config::default());
        // Four slots on the card, but kubelet registered only two devices.
        state.upsert_node(&gpu_node("small", Some("2")));
        for name in ["a", "b"] {
            let placement = state.schedule(&gpu_pod(name)).expect("fits");
            state.assume(&placement.pod, placement.charge);
        }
        let Err(ScheduleError::Unschedulable(why)) = state.schedule(&gpu_pod("c")) else {
            panic!("kubelet has no device left");
        };
        assert_eq!(
            why.to_string(),
            "1 node(s) had insufficient allocatable nvidia.com/gpu for the pod (kubelet would reject it)"
        );
    }
}
