//! What the scheduler tells people through the API: `Scheduled` and
//! `FailedScheduling` Events on pods, `Preempted` on preemption's victims,
//! the `PodScheduled=False` condition with the reasons (as kube-scheduler
//! sets it), and Events on a Node whose GPU inventory annotation is
//! corrupt or whose GPU agent stopped (or resumed) renewing its handshake.

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource};
use serde_json::json;

/// Publishes events and conditions; failures are logged, never fatal.
#[derive(Clone)]
pub struct Notifier {
    client: Client,
    recorder: Recorder,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Notifier")
    }
}

impl Notifier {
    /// A notifier reporting as `controller`/`instance`.
    pub fn new(client: Client, controller: &str, instance: &str) -> Self {
        let reporter = kube::runtime::events::Reporter {
            controller: controller.to_owned(),
            instance: Some(instance.to_owned()),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
        }
    }

    async fn publish(
        &self,
        reference: k8s_openapi::api::core::v1::ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(truncate(note, 1000)),
            action: "Scheduling".to_owned(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &reference).await {
            tracing::warn!(%error, reason, "could not publish an event");
        }
    }

    /// `Scheduled` on the pod.
    pub async fn scheduled(&self, pod: &Pod, node: &str) {
        let name = pod.metadata.name.as_deref().unwrap_or("");
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        self.publish(
            pod.object_ref(&()),
            EventType::Normal,
            "Scheduled",
            format!("Successfully assigned {namespace}/{name} to {node}"),
        )
        .await;
    }

    /// A Normal Event with `reason` on the pod.
    pub async fn pod_normal(&self, pod: &Pod, reason: &str, message: String) {
        self.publish(pod.object_ref(&()), EventType::Normal, reason, message)
            .await;
    }

    /// A Warning Event with `reason` on the pod.
    pub async fn pod_warning(&self, pod: &Pod, reason: &str, message: String) {
        self.publish(pod.object_ref(&()), EventType::Warning, reason, message)
            .await;
    }

    /// `FailedScheduling` on the pod and `PodScheduled=False` with the
    /// reasons, unless the condition already says exactly that.
    pub async fn failed(&self, pod: &Pod, reason: &str, message: &str) {
        self.publish(
            pod.object_ref(&()),
            EventType::Warning,
            "FailedScheduling",
            message.to_owned(),
        )
        .await;
        let current = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"));
        if current.is_some_and(|c| c.status == "False" && c.message.as_deref() == Some(message)) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(
            self.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        );
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let patch = json!({"status": {"conditions": [{"type": "PodScheduled", "status": "False", "reason": reason,
            "message": truncate(message.to_owned(), 4000), "lastTransitionTime": now}]}});
        let name = pod.metadata.name.as_deref().unwrap_or("");
        if let Err(error) = api
            .patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
        {
            tracing::warn!(%error, pod = name, "could not set the PodScheduled condition");
        }
    }

    /// kube-scheduler's `Preempted` Event on a victim: Normal, action
    /// `Preempting`, related to the preemptor, "Preempted by pod <UID> on
    /// node <node>".
    pub async fn preempted(&self, victim: &Pod, preemptor: &Pod, node: &str) {
        let uid = preemptor.metadata.uid.as_deref().unwrap_or("");
        let event = Event {
            type_: EventType::Normal,
            reason: "Preempted".to_owned(),
            note: Some(format!("Preempted by pod {uid} on node {node}")),
            action: "Preempting".to_owned(),
            secondary: Some(preemptor.object_ref(&())),
        };
        if let Err(error) = self.recorder.publish(&event, &victim.object_ref(&())).await {
            tracing::warn!(%error, "could not publish the Preempted event");
        }
    }

    /// An Event with `reason` on the node named `node`.
    pub async fn node_event(&self, node: &str, type_: EventType, reason: &str, note: String) {
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Node".to_owned()),
            name: Some(node.to_owned()),
            ..Default::default()
        };
        self.publish(reference, type_, reason, note).await;
    }

    /// A warning on a node whose inventory annotation does not decode.
    pub async fn corrupt_inventory(&self, node: &Node, error: &str) {
        self.publish(
            node.object_ref(&()),
            EventType::Warning,
            "InvalidGPUInventory",
            format!("GPU inventory annotation is corrupt, node skipped for GPU pods: {error}"),
        )
        .await;
    }
}

fn truncate(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut cut = limit;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}
