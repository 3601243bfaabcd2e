//! Events the agent posts on pods (events.k8s.io/v1, through kube-rs's
//! recorder), so a person sees on `kubectl describe pod` why a GPU
//! allocation failed, or why enforcement killed a process of the pod.

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Resource;

/// Reason of the event posted when an allocation cannot be applied.
pub const ALLOCATION_FAILED: &str = "GPUAllocationFailed";
/// Reason of the warning on a pod whose allocation is not sealed by Tessera.
pub const UNTRUSTED_ALLOCATION: &str = "UntrustedGPUAllocation";

/// Posts Events as this node's agent.
#[derive(Clone)]
pub struct EventPoster {
    recorder: Recorder,
}

impl std::fmt::Debug for EventPoster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventPoster").finish_non_exhaustive()
    }
}

impl EventPoster {
    /// A poster reporting as `tessera-node-agent` on `node`.
    pub fn new(client: kube::Client, node: &str) -> Self {
        let reporter = Reporter {
            controller: "tessera-node-agent".into(),
            instance: Some(node.to_owned()),
        };
        Self {
            recorder: Recorder::new(client, reporter),
        }
    }

    /// A warning on `pod` about an allocation; failures to post are
    /// logged, never returned.
    pub async fn warn(&self, pod: &Pod, reason: &str, note: &str) {
        self.warn_for(pod, reason, "Allocate", note).await;
    }

    /// A warning on `pod` with the Event's `action` (what the agent was
    /// doing); failures to post are logged, never returned.
    pub async fn warn_for(&self, pod: &Pod, reason: &str, action: &str, note: &str) {
        let event = Event {
            type_: EventType::Warning,
            reason: reason.to_owned(),
            note: Some(note.chars().take(1000).collect()),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &pod.object_ref(&())).await {
            tracing::warn!(error = %e, "could not post an Event on the pod");
        }
    }
}
