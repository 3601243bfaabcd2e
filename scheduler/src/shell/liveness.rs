//! Follows every node's `hami.io/node-handshake` (see
//! [`crate::core::node_liveness`]): each node change records whether the
//! handshake was renewed, and once a second the nodes whose handshake has
//! gone unrenewed past `liveness.handshakeTimeoutSeconds` are handed to the
//! [`crate::core::ClusterState`], which stops placing GPU pods there
//! (counted in `tessera_scheduler_stale_gpu_node_agents`, and said in a
//! Warning Event on the Node by the leader). A node that comes back is
//! used again at once, and the pods waiting for it are retried.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::runtime::events::EventType;

use super::{lock, Scheduler};
use crate::core::node_liveness::handshake_of;

/// How often staleness is re-judged.
pub const LIVENESS_PERIOD: Duration = Duration::from_secs(1);

impl Scheduler {
    /// Records the node's handshake as seen now; called before the node is
    /// upserted so its state carries the current verdict.
    pub(super) fn observe_handshake(&self, node: &Node) {
        let name = node.metadata.name.as_deref().unwrap_or_default();
        let now = Instant::now();
        let stale = {
            let mut tracker = lock(&self.shared.handshakes);
            tracker.observe(name, handshake_of(node), now);
            tracker.stale_for(name, now).is_some()
        };
        let changed = lock(&self.shared.state).set_agent_stale(name, stale);
        if changed {
            self.report_verdict(name, stale);
        }
    }

    /// Forgets a deleted node's handshake.
    pub(super) fn forget_handshake(&self, name: &str) {
        lock(&self.shared.handshakes).forget(name);
        lock(&self.shared.node_signatures).remove(name);
        lock(&self.shared.state).set_agent_stale(name, false);
    }

    /// Whether this node update changed nothing but the handshake (and the
    /// resourceVersion): then the node's state and the waiting pods need
    /// no second look, which keeps the renewal of every node every period
    /// from re-deciding every parked pod. Records the node's new signature.
    pub(super) fn only_handshake_renewed(&self, node: &Node) -> bool {
        let name = node.metadata.name.clone().unwrap_or_default();
        let signature = signature_without_handshake(node);
        lock(&self.shared.node_signatures).insert(name, signature) == Some(signature)
    }

    /// Re-judges every node's handshake every [`LIVENESS_PERIOD`], forever.
    pub(super) async fn watch_handshakes(self) {
        let mut ticker = tokio::time::interval(LIVENESS_PERIOD);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let stale = lock(&self.shared.handshakes).stale_nodes(Instant::now());
            self.apply_stale_agents(stale);
        }
    }

    fn apply_stale_agents(&self, stale: std::collections::BTreeSet<String>) {
        let changed: Vec<(String, bool)> = {
            let mut state = lock(&self.shared.state);
            state
                .set_stale_agents(stale)
                .into_iter()
                .map(|node| {
                    let now_stale = state.stale_agents().contains(&node);
                    (node, now_stale)
                })
                .collect()
        };
        for (node, now_stale) in changed {
            self.report_verdict(&node, now_stale);
        }
    }

    /// Logs a node's new verdict and, on the leader, posts it on the Node
    /// (Warning `GPUAgentStale`, Normal `GPUAgentResumed`); a node back to
    /// life retries the pods waiting for room.
    fn report_verdict(&self, node: &str, stale: bool) {
        let stale_nodes = lock(&self.shared.state).stale_agents().len();
        self.shared
            .metrics
            .stale_gpu_agents
            .set(i64::try_from(stale_nodes).unwrap_or(i64::MAX));
        let (type_, reason, note) = if stale {
            let timeout = lock(&self.shared.handshakes).timeout();
            tracing::warn!(%node, timeout_secs = timeout.as_secs(), "the node's GPU agent has not renewed hami.io/node-handshake; no GPU pods are placed there until it does (pods already there are not touched). Check the tessera-node-agent pod on that node");
            (
                EventType::Warning,
                STALE_REASON,
                format!(
                    "the Tessera node agent has not renewed hami.io/node-handshake for {}s: no GPU pods are placed on this node until it does (pods already here are not touched); check the tessera-node-agent pod on it",
                    timeout.as_secs()
                ),
            )
        } else {
            tracing::info!(%node, "the node's GPU agent renewed its handshake again; GPU pods may be placed there");
            self.shared.queue.cluster_changed();
            (
                EventType::Normal,
                RESUMED_REASON,
                "the Tessera node agent renewed hami.io/node-handshake again: GPU pods are placed on this node again".to_owned(),
            )
        };
        if self.shared.leading.load(Ordering::Relaxed) {
            let notifier = self.shared.notifier.clone();
            let node = node.to_owned();
            tokio::spawn(async move { notifier.node_event(&node, type_, reason, note).await });
        }
    }
}

/// Event reason on a Node whose agent stopped renewing its handshake.
pub const STALE_REASON: &str = "GPUAgentStale";
/// Event reason on a Node whose agent renewed its handshake again.
pub const RESUMED_REASON: &str = "GPUAgentResumed";

/// A hash of everything about the node but its handshake annotation and
/// its resourceVersion / managed fields.
fn signature_without_handshake(node: &Node) -> u64 {
    let mut node = node.clone();
    node.metadata.resource_version = None;
    node.metadata.managed_fields = None;
    if let Some(annotations) = node.metadata.annotations.as_mut() {
        annotations.remove(tessera_api::names::NODE_HANDSHAKE_ANNOTATION);
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(
        &serde_json::to_string(&node).unwrap_or_default(),
        &mut hasher,
    );
    std::hash::Hasher::finish(&hasher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(handshake: &str, version: &str, ready: &str) -> Node {
        serde_json::from_value(json!({"metadata": {"name": "n", "resourceVersion": version,
            "annotations": {"hami.io/node-handshake": handshake, "hami.io/node-nvidia-register": "[]"}},
            "status": {"conditions": [{"type": "Ready", "status": ready}]}}))
        .expect("node")
    }

    #[test]
    fn the_signature_ignores_the_handshake_and_nothing_else() {
        let base = signature_without_handshake(&node("Reported 1", "1", "True"));
        assert_eq!(
            base,
            signature_without_handshake(&node("Reported 2", "2", "True"))
        );
        assert_ne!(
            base,
            signature_without_handshake(&node("Reported 2", "2", "False"))
        );
    }
}
