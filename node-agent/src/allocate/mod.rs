//! `Allocate`: from kubelet's device IDs to the containers' env and mounts.
//! The steps: check the IDs are ours; read the pods bound to this node from
//! the API server; choose the pod ([`matching`]); check its cards are on
//! this node and healthy; build each container's response ([`response`]),
//! finding the container of each annotation entry (init containers first
//! when the scheduler listed them) with `annotated_container`;
//! record the applied containers on the pod with a write conditional on its
//! resourceVersion. A conflicting write means another call applied that pod
//! first, so the decision is made again from a fresh listing. No lock is
//! held across calls.

pub mod matching;
pub mod response;

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use tessera_api::names::ResourceNames;
use tessera_api::request::annotated_container;
use thiserror::Error;
use tokio::sync::watch;

use crate::gpu::GpuInfo;
use crate::health::HealthSnapshot;
use crate::host_files::{HostFileError, HostLayout};
use crate::inventory::card_of_device_id;
use crate::k8s::events::{EventPoster, ALLOCATION_FAILED};
use crate::k8s::pods::{ApplyOutcome, NodePods};
use crate::proto::ContainerAllocateResponse;
use matching::{choose, pending_pods, pod_key, MatchError};

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
    ) -> Self {
        let cards = cards.iter().map(|c| (c.uuid.clone(), c.clone())).collect();
        Self {
            pods,
            events,
            layout,
            names,
            cards: Arc::new(cards),
            health,
        }
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
        for _ in 0..MAX_ATTEMPTS {
            let pods = self.pods.list().await?;
            let sorted = pending_pods(&pods, self.pods.node());
            for corrupt in &sorted.corrupt {
                self.fail_pod(corrupt.pod, &corrupt.error.to_string()).await;
            }
            let claim = choose(&sorted.pending, self.pods.node(), &shape)?;
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

    fn check_cards(&self, claim: &matching::Claim<'_>) -> Result<(), String> {
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
