//! Volume binding in the shell (kube-scheduler's VolumeBinding PreBind):
//! reflectors for PersistentVolumes, PersistentVolumeClaims,
//! StorageClasses and CSINodes (attach limits) feed the core; before a pod with unbound
//! `WaitForFirstConsumer` claims is bound, each claim is given its PV
//! (the PV's `claimRef`) or handed to the chosen node for provisioning
//! (`volume.kubernetes.io/selected-node` on the claim), and the pod is
//! bound only once every claim is `Bound`, within
//! [`ShellOptions::volume_binding_timeout`](super::ShellOptions). A failure
//! or timeout rolls the decision back and retries. A scheduler restarted in
//! between finds the annotation, keeps the claim's node, and carries on.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSINode, StorageClass};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use serde_json::json;

use super::inputs::follow;
use super::{lock, Scheduler, ShellError};
use crate::core::volumes::{VolumeAction, SELECTED_NODE_ANNOTATION};
use crate::core::Placement;

/// The names of the storage lists decisions wait for.
pub(super) const STORAGE_LISTS: [&str; 4] = [
    "persistentvolumes",
    "persistentvolumeclaims",
    "storageclasses",
    "csinodes",
];

/// Why a pod's claims could not be made ready for its node.
#[derive(Debug, thiserror::Error)]
pub enum VolumeBindingError {
    /// An API write failed.
    #[error("updating {what}: {source}")]
    Write {
        /// The object.
        what: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The claims were not all bound in time.
    #[error("claims {claims} not bound within {}s of selecting node {node} (is the CSI provisioner running? see the claims' events)", .timeout.as_secs())]
    Timeout {
        /// Claims still unbound.
        claims: String,
        /// Chosen node.
        node: String,
        /// The limit.
        timeout: Duration,
    },
}

fn claim_bound(claim: &PersistentVolumeClaim) -> bool {
    claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .is_some_and(|v| !v.is_empty())
        && claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
}

impl Scheduler {
    pub(super) async fn reflect_storage(self) -> Result<(), ShellError> {
        let client = self.shared.client.clone();
        let volumes = {
            let this = &self;
            let stream = watcher(
                Api::<PersistentVolume>::all(client.clone()),
                watcher::Config::default(),
            )
            .default_backoff();
            follow(
                stream,
                |v: &PersistentVolume| this.storage_changed(|s| s.upsert_volume(v)),
                |v: &PersistentVolume| {
                    this.storage_changed(|s| {
                        s.remove_volume(v.metadata.name.as_deref().unwrap_or(""))
                    })
                },
                || this.list_synced(STORAGE_LISTS[0]),
            )
        };
        let claims = {
            let this = &self;
            let stream = watcher(
                Api::<PersistentVolumeClaim>::all(client.clone()),
                watcher::Config::default(),
            )
            .default_backoff();
            follow(
                stream,
                |c: &PersistentVolumeClaim| this.storage_changed(|s| s.upsert_claim(c)),
                |c: &PersistentVolumeClaim| {
                    this.storage_changed(|s| {
                        s.remove_claim(
                            c.metadata.namespace.as_deref().unwrap_or("default"),
                            c.metadata.name.as_deref().unwrap_or(""),
                        )
                    })
                },
                || this.list_synced(STORAGE_LISTS[1]),
            )
        };
        let classes = {
            let this = &self;
            let stream = watcher(Api::<StorageClass>::all(client), watcher::Config::default())
                .default_backoff();
            follow(
                stream,
                |c: &StorageClass| this.storage_changed(|s| s.upsert_class(c)),
                |c: &StorageClass| {
                    this.storage_changed(|s| {
                        s.remove_class(c.metadata.name.as_deref().unwrap_or(""))
                    })
                },
                || this.list_synced(STORAGE_LISTS[2]),
            )
        };
        let csi_nodes = {
            let this = &self;
            let stream = watcher(
                Api::<CSINode>::all(self.shared.client.clone()),
                watcher::Config::default(),
            )
            .default_backoff();
            follow(
                stream,
                |n: &CSINode| this.storage_changed(|s| s.upsert_csi_node(n)),
                |n: &CSINode| {
                    this.storage_changed(|s| {
                        s.remove_csi_node(n.metadata.name.as_deref().unwrap_or(""))
                    })
                },
                || this.list_synced(STORAGE_LISTS[3]),
            )
        };
        let _ = tokio::join!(volumes, claims, classes, csi_nodes);
        Err(ShellError::WatchEnded("storage"))
    }

    fn storage_changed(&self, change: impl FnOnce(&mut crate::core::volumes::Storage)) {
        change(lock(&self.shared.state).storage_mut());
        self.shared.queue.cluster_changed();
    }

    /// Makes the placement's claims ready on its node, then binds the pod;
    /// on failure rolls the decision back and retries the pod later.
    pub(super) fn bind_volumes_then_pod(&self, pod: Pod, placement: Placement, signature: u64) {
        let scheduler = self.clone();
        tokio::spawn(async move {
            match scheduler.bind_volumes(&pod, &placement).await {
                Ok(()) => scheduler.submit_bind(pod, placement, signature),
                Err(error) => {
                    let key = placement.pod.clone();
                    tracing::warn!(pod = %key, %error, "volume binding failed; rolled back, retrying");
                    lock(&scheduler.shared.state).forget_assumed(&key);
                    scheduler.shared.queue.retry_later(&key, signature);
                    let message = format!("running PreBind plugin \"VolumeBinding\": {error}");
                    scheduler
                        .shared
                        .notifier
                        .failed(&pod, "FailedScheduling", &message)
                        .await;
                    scheduler.shared.queue.cluster_changed();
                }
            }
        });
    }

    async fn bind_volumes(
        &self,
        pod: &Pod,
        placement: &Placement,
    ) -> Result<(), VolumeBindingError> {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let claims: Api<PersistentVolumeClaim> =
            Api::namespaced(self.shared.client.clone(), namespace);
        let volumes: Api<PersistentVolume> = Api::all(self.shared.client.clone());
        for action in &placement.volumes {
            match action {
                VolumeAction::BindVolume { claim, volume } => {
                    let uid = lock(&self.shared.state)
                        .storage()
                        .claim(namespace, claim)
                        .and_then(|c| c.metadata.uid.clone());
                    let patch = json!({"spec": {"claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                        "namespace": namespace, "name": claim, "uid": uid}}});
                    volumes
                        .patch(volume, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map_err(|source| VolumeBindingError::Write {
                            what: format!("PersistentVolume {volume}"),
                            source,
                        })?;
                }
                VolumeAction::Provision { claim } => {
                    let patch = json!({"metadata": {"annotations": {SELECTED_NODE_ANNOTATION: placement.node}}});
                    claims
                        .patch(claim, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map_err(|source| VolumeBindingError::Write {
                            what: format!("PersistentVolumeClaim {namespace}/{claim}"),
                            source,
                        })?;
                }
            }
        }
        let timeout = self.shared.options.volume_binding_timeout;
        let started = Instant::now();
        loop {
            let unbound: Vec<&str> = {
                let state = lock(&self.shared.state);
                placement
                    .volumes
                    .iter()
                    .map(VolumeAction::claim)
                    .filter(|claim| {
                        !state
                            .storage()
                            .claim(namespace, claim)
                            .is_some_and(claim_bound)
                    })
                    .collect()
            };
            if unbound.is_empty() {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                return Err(VolumeBindingError::Timeout {
                    claims: unbound.join(", "),
                    node: placement.node.clone(),
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
