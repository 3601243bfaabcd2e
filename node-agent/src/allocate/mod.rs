//! `Allocate`: from kubelet's device IDs to the containers' env and mounts.
//! The steps: check the IDs are ours; read the pods bound to this node from
//! the API server; keep those whose allocation is sealed by Tessera's
//! scheduler (a forged or edited one gets a Warning Event and is never
//! honoured); choose the pod ([`matching`]); check its cards are on
//! this node and healthy; build each container's response ([`response`]),
//! finding the container of each annotation entry (init containers first
//! when the scheduler listed them) with `annotated_container`;
//! record the applied containers on the pod with a write conditional on its
//! resourceVersion. A conflicting write means another call applied that pod
//! first, so the decision is made again from a fresh listing. No lock is
//! held across calls.

pub mod matching;
pub mod response;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Pod;
use tessera_api::names::ResourceNames;
use tessera_api::request::annotated_container;
use thiserror::Error;
use tokio::sync::watch;

use crate::gpu::GpuInfo;
use crate::health::HealthSnapshot;
use crate::host_files::{HostFileError, HostLayout};
use crate::inventory::card_of_device_id;
use crate::k8s::events::{EventPoster, ALLOCATION_FAILED, UNTRUSTED_ALLOCATION};
use crate::k8s::pods::{ApplyOutcome, NodePods};
use crate::proto::ContainerAllocateResponse;
use crate::seal::{SealKeyUnavailable, SealKeys};
use matching::{choose, pending_pods, pod_key, Claim, MatchError};

/// How often a decision is retried after losing a conditional write.
const MAX_ATTEMPTS: usize = 8;

/// Why an `Allocate` call failed.
#[derive(Debug, Error)]
pub enum AllocateError {
    /// Kubelet named a device this agent never advertised.
    #[error("kubelet asked for device `{0}`, which this node agent does not advertise; kubelet's device list is out of date, it refreshes on the next ListAndWatch update")]
    UnknownDevice(String),
    /// The request matched no pod, or could not be attributed safely.
    #[error(transparent)]
    NoMatch(#[from] MatchError),
    /// The chosen pod's allocation cannot be applied on this node.
    #[error("pod {pod} cannot get its devices: {reason}; the pod is marked hami.io/bind-phase=failed, delete it so the scheduler places it again")]
    Unusable {
        /// `namespace/name`.
        pod: String,
        /// What is wrong.
        reason: String,
    },
    /// The API server could not be read or written.
    #[error("the Kubernetes API failed while allocating ({0}); kubelet will retry the pod")]
    Api(#[from] kube::Error),
    /// A host file could not be prepared.
    #[error(transparent)]
    HostFiles(#[from] HostFileError),
    /// The seal key is not available, so no allocation can be believed.
    #[error(transparent)]
    SealKey(#[from] SealKeyUnavailable),
    /// Every attempt lost its conditional write to a concurrent change.
    #[error("the pod changed under every one of {MAX_ATTEMPTS} attempts to apply its allocation; kubelet will retry")]
    TooMuchContention,
}

/// Applies pod allocations on this node.
#[derive(Debug, Clone)]
pub struct Allocator {
    pods: NodePods,
    events: EventPoster,
    layout: HostLayout,
    names: ResourceNames,
    cards: Arc<HashMap<String, GpuInfo>>,
    health: watch::Receiver<HealthSnapshot>,
    seal: Arc<SealKeys>,
    /// Pods (by UID) already warned about for unsealed allocations.
    warned: Arc<Mutex<HashSet<String>>>,
}

impl Allocator {
    /// An allocator for the node `pods` reads.
    pub fn new(
        pods: NodePods,
        events: EventPoster,
        layout: HostLayout,
        names: ResourceNames,
        cards: &[GpuInfo],
        health: watch::Receiver<HealthSnapshot>,
        seal: Arc<SealKeys>,
    ) -> Self {
        let cards = cards.iter().map(|c| (c.uuid.clone(), c.clone())).collect();
        Self {
            pods,
            events,
            layout,
            names,
            cards: Arc::new(cards),
            health,
            seal,
            warned: Arc::default(),
        }
    }

    /// The pod the next container of `count` devices belongs to, without
    /// applying anything: for `GetPreferredAllocation`, so the device IDs
    /// kubelet records name the cards the container really gets. Returns
    /// the card UUIDs of that container, in order.
    pub async fn preferred_cards(&self, count: usize) -> Result<Vec<String>, AllocateError> {
        let pods = self.pods.list().await?;
        let trust = self.seal.trust(false).await?;
        let sorted = pending_pods(&pods, self.pods.node(), &trust);
        let claim = choose(&sorted.pending, self.pods.node(), &[count])?;
        Ok(claim
            .containers
            .first()
            .map(|(_, devices)| devices.iter().map(|d| d.uuid.clone()).collect())
            .unwrap_or_default())
    }

    async fn warn_untrusted(&self, pod: &Pod, error: &tessera_api::allocation_seal::SealError) {
        let uid = pod.metadata.uid.clone().unwrap_or_else(|| pod_key(pod));
        let first = self
            .warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(uid);
        if !first {
            return;
        }
        tracing::warn!(pod = %pod_key(pod), %error, "ignoring a GPU allocation Tessera's scheduler did not write");
        self.events
            .warn(
                pod,
                UNTRUSTED_ALLOCATION,
                &format!("Tessera's node agent ignores this pod's GPU allocation: {error}"),
            )
            .await;
    }

    /// The responses for kubelet's request, one per container request.
    pub async fn allocate(
        &self,
        requests: &[Vec<String>],
    ) -> Result<Vec<ContainerAllocateResponse>, AllocateError> {
        for id in requests.iter().flatten() {
            if !card_of_device_id(id).is_some_and(|uuid| self.cards.contains_key(uuid)) {
                return Err(AllocateError::UnknownDevice(id.clone()));
            }
        }
        let shape: Vec<usize> = requests.iter().map(Vec::len).collect();
        let mut stale_key = false;
        for _ in 0..MAX_ATTEMPTS {
            let pods = self.pods.list().await?;
            let trust = self.seal.trust(stale_key).await?;
            let sorted = pending_pods(&pods, self.pods.node(), &trust);
            for corrupt in &sorted.corrupt {
                self.fail_pod(corrupt.pod, &corrupt.error).await;
            }
            for untrusted in &sorted.untrusted {
                self.warn_untrusted(untrusted.pod, &untrusted.error).await;
            }
            let claim = match choose(&sorted.pending, self.pods.node(), &shape) {
                Ok(claim) => claim,
                // The key may have been replaced since it was read: read it
                // again (rate-limited) before giving up.
                Err(error) if !sorted.untrusted.is_empty() && !stale_key => {
                    tracing::debug!(%error, "no sealed pod matches; re-reading the seal key");
                    stale_key = true;
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            if let Err(reason) = self.check_cards(&claim) {
                self.fail_pod(claim.pod, &reason).await;
                return Err(AllocateError::Unusable {
                    pod: pod_key(claim.pod),
                    reason,
                });
            }
            let mut responses = Vec::with_capacity(claim.containers.len());
            for (index, devices) in &claim.containers {
                let Some(container) = annotated_container(claim.pod, claim.remaining.len(), *index)
                else {
                    let reason = format!(
                        "its allocation names container #{index}, which the pod does not have"
                    );
                    self.fail_pod(claim.pod, &reason).await;
                    return Err(AllocateError::Unusable {
                        pod: pod_key(claim.pod),
                        reason,
                    });
                };
                responses.push(response::container_response(
                    &self.layout,
                    &self.names,
                    claim.pod,
                    container,
                    devices,
                )?);
            }
            match self
                .pods
                .apply_allocation(claim.pod, &claim.remaining)
                .await?
            {
                ApplyOutcome::Applied => {
                    tracing::info!(
                        pod = %pod_key(claim.pod),
                        containers = ?claim.containers.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
                        complete = claim.completes_pod(),
                        "applied the GPU allocation"
                    );
                    return Ok(responses);
                }
                ApplyOutcome::Conflict => {
                    tracing::debug!(pod = %pod_key(claim.pod), "pod changed while allocating; deciding again");
                }
            }
        }
        Err(AllocateError::TooMuchContention)
    }

    fn check_cards(&self, claim: &Claim<'_>) -> Result<(), String> {
        let health = self.health.borrow();
        for device in claim.containers.iter().flat_map(|(_, d)| d) {
            if !self.cards.contains_key(&device.uuid) {
                return Err(format!("card {} is not on this node", device.uuid));
            }
            if let Some(card) = health.get(&device.uuid).filter(|h| !h.healthy) {
                return Err(format!(
                    "card {} is unhealthy ({})",
                    device.uuid, card.reason
                ));
            }
        }
        Ok(())
    }

    async fn fail_pod(&self, pod: &Pod, reason: &str) {
        tracing::warn!(pod = %pod_key(pod), %reason, "GPU allocation failed");
        if let Err(e) = self.pods.mark_failed(pod).await {
            tracing::warn!(pod = %pod_key(pod), error = %e, "could not mark the pod's bind phase failed");
        }
        self.events
            .warn(
                pod,
                ALLOCATION_FAILED,
                &format!(
                    "GPU allocation failed on node {}: {reason}",
                    self.pods.node()
                ),
            )
            .await;
    }
}
