//! Publishes this node's GPU inventory on its `hami.io/node-nvidia-register`
//! annotation, and the link scores between its cards on
//! `hami.io/node-nvidia-score` (fixed for the agent's life). The desired value is recomputed when card health changes
//! and on a timer; the node is written only when its annotation differs
//! (changed inventory, or someone wiped or overwrote it), so a steady node
//! costs one read per period and no writes. Whatever the annotation held
//! before is never parsed, only replaced.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tessera_api::config::DeviceSharing;
use tessera_api::inventory::encode_inventory;
use tessera_api::names::{NODE_PAIR_SCORE_ANNOTATION, NODE_REGISTER_ANNOTATION};
use tokio::sync::watch;

use crate::gpu::GpuInfo;
use crate::health::HealthSnapshot;
use crate::inventory::node_inventory;
use crate::probes::Readiness;

/// Outcome of one publication attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// The node already carried the value.
    Unchanged,
    /// The annotation was written.
    Written,
}

/// Writes the inventory annotation of one node.
#[derive(Debug, Clone)]
pub struct InventoryPublisher {
    api: Api<Node>,
    node: String,
    cards: Arc<[GpuInfo]>,
    sharing: DeviceSharing,
    /// The `hami.io/node-nvidia-score` value, when the cards are scored.
    pair_scores: Option<String>,
}

impl InventoryPublisher {
    /// A publisher for `node` with its cards and sharing settings.
    pub fn new(
        client: kube::Client,
        node: &str,
        cards: Arc<[GpuInfo]>,
        sharing: DeviceSharing,
    ) -> Self {
        Self {
            api: Api::all(client),
            node: node.to_owned(),
            cards,
            sharing,
            pair_scores: None,
        }
    }

    /// Also publishes `pair_scores` as the `hami.io/node-nvidia-score` value.
    pub fn with_pair_scores(mut self, pair_scores: Option<String>) -> Self {
        self.pair_scores = pair_scores;
        self
    }

    /// The annotation value for the given health.
    pub fn desired(&self, health: &HealthSnapshot) -> String {
        encode_inventory(&node_inventory(&self.cards, &self.sharing, health))
    }

    /// Writes the annotation if the node does not carry `desired` already.
    pub async fn publish(&self, desired: &str) -> Result<Published, kube::Error> {
        let node = self.api.get(&self.node).await?;
        let current = |key: &str| {
            node.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(key))
                .map(String::as_str)
        };
        let scores_current = self
            .pair_scores
            .as_deref()
            .is_none_or(|scores| current(NODE_PAIR_SCORE_ANNOTATION) == Some(scores));
        if current(NODE_REGISTER_ANNOTATION) == Some(desired) && scores_current {
            return Ok(Published::Unchanged);
        }
        let mut annotations = json!({NODE_REGISTER_ANNOTATION: desired});
        if let Some(scores) = &self.pair_scores {
            annotations[NODE_PAIR_SCORE_ANNOTATION] = json!(scores);
        }
        let patch = json!({"metadata": {"annotations": annotations}});
        self.api
            .patch(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        tracing::info!(node = %self.node, cards = self.cards.len(), "published the GPU inventory");
        Ok(Published::Written)
    }

    /// Publishes now, on every health change and every `period`, until the
    /// health channel closes; marks `readiness` published after the first
    /// success.
    pub async fn run(
        self,
        mut health: watch::Receiver<HealthSnapshot>,
        period: Duration,
        readiness: Readiness,
    ) {
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let desired = self.desired(&health.borrow_and_update());
            match self.publish(&desired).await {
                Ok(_) => readiness.mark_published(),
                Err(e) => {
                    tracing::warn!(node = %self.node, error = %e, "could not publish the GPU inventory; retrying on the next period. Check that the node exists and the agent's RBAC allows get and patch on nodes");
                }
            }
            tokio::select! {
                _ = ticker.tick() => {}
                changed = health.changed() => if changed.is_err() { return },
            }
        }
    }
}
