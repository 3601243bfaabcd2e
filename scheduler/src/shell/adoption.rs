//! Adopting placements made before Tessera was installed: a running pod
//! HAMi's scheduler placed carries HAMi's allocation and no seal. When the
//! API server's own timestamps show it predates Tessera's seal key (see
//! [`tessera_api::allocation_seal::SealKey::adoption`] for the whole rule),
//! the scheduler seals its allocation as it stands, once, with a write
//! conditional on the pod's resourceVersion, and the leader says so in a
//! Normal `AdoptedGPUAllocation` Event. Every replica may write the seal
//! (it is the same seal); a replica that finds the pod already changed
//! leaves it to the next look.
//! From then on it is a Tessera allocation like any other: charged here,
//! enforced by the node agent, counted in quotas, and any later edit of it
//! breaks the seal. Until the write lands the state already charges it
//! ([`tessera_api::allocation_seal::AllocationTrust::allocation_adopting`]).

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tessera_api::names::allocation as keys;

use super::{lock, Scheduler};
use crate::core::pod_key;

/// Event reason on an adopted pod.
pub const ADOPTED_REASON: &str = "AdoptedGPUAllocation";

impl Scheduler {
    /// Seals `pod`'s allocation if it is a pre-install placement to adopt
    /// and no write for it is in flight.
    pub(super) fn adopt_if_preinstalled(&self, pod: &Pod) {
        let shared = &self.shared;
        let Some(key) = shared.options.seal_key.as_ref() else {
            return;
        };
        let Some(adoption) = key.adoption(pod, &shared.config.scheduler_name) else {
            return;
        };
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if !lock(&shared.adopting).insert(uid.clone()) {
            return;
        }
        let scheduler = self.clone();
        let pod = pod.clone();
        tokio::spawn(async move {
            let shared = &scheduler.shared;
            let (namespace, name) = (
                pod.metadata.namespace.clone().unwrap_or_default(),
                pod.metadata.name.clone().unwrap_or_default(),
            );
            let api: Api<Pod> = Api::namespaced(shared.client.clone(), &namespace);
            // Conditional on the version judged: an edit in between fails the
            // write, and the edited pod is judged again when it arrives.
            let patch = json!({"metadata": {
                "resourceVersion": pod.metadata.resource_version,
                "annotations": {keys::SEAL: adoption.seal}}});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(sealed) => {
                    let node = &adoption.allocation.node;
                    tracing::info!(pod = %pod_key(&pod), %node, "adopted a GPU allocation made before Tessera was installed");
                    let message = format!(
                        "Tessera adopted this pod's GPU allocation on {node}, made by {} before Tessera was installed: it is sealed as it stands, charged and enforced",
                        pod.spec
                            .as_ref()
                            .and_then(|s| s.scheduler_name.as_deref())
                            .unwrap_or("another scheduler")
                    );
                    if shared.leading.load(std::sync::atomic::Ordering::Relaxed) {
                        shared
                            .notifier
                            .pod_normal(&sealed, ADOPTED_REASON, message)
                            .await;
                    }
                }
                // Changed since (another replica sealed it, or an edit):
                // the new version is judged when it arrives.
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    tracing::debug!(pod = %pod_key(&pod), "the pod changed before its adoption seal was written");
                }
                Err(error) => {
                    tracing::warn!(pod = %pod_key(&pod), %error, "could not seal an adopted GPU allocation; trying again at the pod's next change");
                }
            }
            lock(&shared.adopting).remove(&uid);
        });
    }
}
