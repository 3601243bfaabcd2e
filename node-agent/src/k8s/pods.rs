//! Pods bound to this node: a consistent listing (field selector
//! `spec.nodeName`), and the allocation writes. Applying an allocation is a
//! merge patch that carries the pod's `resourceVersion`, so the API server
//! refuses it (409) when anyone changed the pod since it was read: two
//! concurrent `Allocate` calls can never both apply one pod's containers,
//! without any lock.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use tessera_api::allocation::{encode_pod_devices, PodDevices};
use tessera_api::names::allocation as keys;
use tessera_api::pod::BindPhase;

/// Outcome of a conditional allocation write.
#[derive(Debug)]
pub enum ApplyOutcome {
    /// Written.
    Applied,
    /// The pod changed since it was read; read again and decide again.
    Conflict,
}

/// Access to the pods of one node.
#[derive(Debug, Clone)]
pub struct NodePods {
    node: String,
    api: Api<Pod>,
}

impl NodePods {
    /// Pods of `node`, in every namespace.
    pub fn new(client: kube::Client, node: &str) -> Self {
        Self {
            node: node.to_owned(),
            api: Api::all(client),
        }
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Every pod bound to this node, read from the API server (not a cache).
    pub async fn list(&self) -> Result<Vec<Pod>, kube::Error> {
        let params = ListParams::default().fields(&format!("spec.nodeName={}", self.node));
        Ok(self.api.list(&params).await?.items)
    }

    fn pod_api(&self, pod: &Pod) -> Api<Pod> {
        Api::namespaced(
            self.api.clone().into_client(),
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        )
    }

    /// Records that containers got their devices: `remaining` becomes the
    /// new `hami.io/vgpu-devices-to-allocate`, and the bind phase becomes
    /// `success` when nothing remains. Conditional on the pod's resourceVersion.
    pub async fn apply_allocation(
        &self,
        pod: &Pod,
        remaining: &PodDevices,
    ) -> Result<ApplyOutcome, kube::Error> {
        let mut annotations = BTreeMap::new();
        annotations.insert(keys::DEVICES_TO_ALLOCATE, encode_pod_devices(remaining));
        if remaining.iter().all(Vec::is_empty) {
            annotations.insert(keys::BIND_PHASE, BindPhase::Success.as_str().to_owned());
        }
        let patch = json!({
            "metadata": {
                "resourceVersion": pod.metadata.resource_version,
                "annotations": annotations,
            }
        });
        let name = pod.metadata.name.as_deref().unwrap_or("");
        match self
            .pod_api(pod)
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(ApplyOutcome::Applied),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(ApplyOutcome::Conflict),
            Err(e) => Err(e),
        }
    }

    /// Marks the pod's allocation as failed (`hami.io/bind-phase: failed`).
    pub async fn mark_failed(&self, pod: &Pod) -> Result<(), kube::Error> {
        let patch =
            json!({"metadata": {"annotations": {keys::BIND_PHASE: BindPhase::Failed.as_str()}}});
        let name = pod.metadata.name.as_deref().unwrap_or("");
        self.pod_api(pod)
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
    }
}
