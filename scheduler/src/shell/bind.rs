//! Binding placed pods. A decision is assumed at once; its bind then goes
//! through the node's [`BindGates`] (at most one unacknowledged bind per
//! node and shape, which is what lets the node agent tell pods apart in
//! `Allocate`) and runs as one `pods/binding` request that carries the
//! sealed allocation annotations. The gate opens again when the pod reports
//! back through the pod watch ([`Scheduler::track_gate`]), when its bind
//! fails, or when no kubelet admitted it within the timeout
//! ([`Scheduler::expire_gates`]: the pod is marked `failed` and the pods
//! queued behind it are decided again).

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Binding, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tessera_api::names::allocation as keys;
use tessera_api::pod::{annotation, is_live, BindPhase};

use super::node_gate::{bind_shape, BindGates};
use super::{lock, Scheduler};
use crate::core::{pod_key, Placement};

/// A decided pod waiting for, or running, its bind.
#[derive(Debug)]
pub struct BindJob {
    pod: Pod,
    placement: Placement,
    signature: u64,
}

/// The gates of every node, over the shell's bind jobs.
pub type Gates = BindGates<BindJob>;

impl Scheduler {
    /// Hands a decided (and assumed) pod to its node's gate; binds it now if
    /// the gate is open.
    pub(super) fn submit_bind(&self, pod: Pod, placement: Placement, signature: u64) {
        let shape = bind_shape(&placement.annotated_devices());
        let node = placement.node.clone();
        let key = placement.pod.clone();
        let job = BindJob {
            pod,
            placement,
            signature,
        };
        let runnable = lock(&self.shared.gates).offer(&node, shape, &key, job, Instant::now());
        match runnable {
            Some(job) => self.spawn_bind(job),
            None => {
                tracing::debug!(pod = %key, %node, shape, "waiting for the node's previous bind of this shape to be acknowledged")
            }
        }
    }

    fn spawn_bind(&self, job: BindJob) {
        let scheduler = self.clone();
        let slots = Arc::clone(&self.shared.bind_slots);
        tokio::spawn(async move {
            let permit = slots.acquire_owned().await;
            scheduler.bind(job).await;
            drop(permit);
        });
    }

    /// Opens the pod's gate (or drops it from a gate's queue) and binds what
    /// was waiting behind it.
    pub(super) fn release_gate(&self, key: &str) {
        let released = lock(&self.shared.gates).acknowledge(key, Instant::now());
        for job in released {
            self.spawn_bind(job);
        }
    }

    /// Follows an observed pod through its gate: a bound pod still
    /// `allocating` holds its node's gate (after a restart too); one whose
    /// phase moved on, or that ended or is going away, releases it.
    pub(super) fn track_gate(&self, pod: &Pod) {
        let key = pod_key(pod);
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        let allocating = BindPhase::of(pod) == Some(BindPhase::Allocating);
        let live = is_live(pod);
        match node {
            Some(node) if allocating && live => {
                let believed = lock(&self.shared.state).trust().allocation(pod);
                let Ok(Some(allocation)) = believed else {
                    return;
                };
                if allocation.node != node {
                    return;
                }
                let bound_at = annotation(pod, keys::BIND_TIME)
                    .and_then(|t| t.parse::<i64>().ok())
                    .unwrap_or_else(|| chrono::Utc::now().timestamp());
                let age = chrono::Utc::now()
                    .timestamp()
                    .saturating_sub(bound_at)
                    .max(0);
                let since = Instant::now()
                    .checked_sub(Duration::from_secs(age.unsigned_abs()))
                    .unwrap_or_else(Instant::now);
                lock(&self.shared.gates).observe_in_flight(
                    node,
                    bind_shape(&allocation.devices),
                    &key,
                    since,
                );
            }
            Some(_) => self.release_gate(&key),
            None if !live => self.release_gate(&key),
            None => {}
        }
    }

    async fn bind(&self, job: BindJob) {
        let BindJob {
            pod,
            placement,
            signature,
        } = job;
        let key = placement.pod.clone();
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let mut annotations =
            placement.annotations(k8s_openapi::jiff::Timestamp::now().as_second());
        if let Some(seal_key) = &self.shared.options.seal_key {
            // Sealed exactly as written: the devices annotation just encoded.
            let uid = pod.metadata.uid.as_deref().unwrap_or_default();
            let seal = seal_key.seal(uid, &placement.node, &annotations[keys::DEVICES_ALLOCATED]);
            annotations.insert(keys::SEAL.to_owned(), seal);
        }
        let binding = Binding {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                // Only the pod with this UID may be bound: a pod deleted and
                // recreated under the same name since the decision is refused.
                uid: pod.metadata.uid.clone(),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            target: ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Node".to_owned()),
                name: Some(placement.node.clone()),
                ..ObjectReference::default()
            },
        };
        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), &namespace);
        let started = Instant::now();
        let result = api
            .create_subresource::<Binding, serde_json::Value>(
                "binding",
                &name,
                &PostParams::default(),
                &binding,
            )
            .await;
        self.shared
            .metrics
            .bind_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(_) => {
                lock(&self.shared.recently_bound).insert(key.clone());
                self.shared.queue.finish(&key);
                tracing::debug!(pod = %key, node = %placement.node, "bound");
                if self.shared.options.scheduled_events {
                    // Off the bind slot: the Event is bookkeeping, and the
                    // node's next bind may be waiting on this pod's answer.
                    let notifier = self.shared.notifier.clone();
                    let node = placement.node.clone();
                    tokio::spawn(async move { notifier.scheduled(&pod, &node).await });
                }
            }
            Err(error) => {
                self.shared.metrics.bind_failures.inc();
                lock(&self.shared.state).forget_assumed(&key);
                self.release_gate(&key);
                let code = match &error {
                    kube::Error::Api(status) => Some(status.code),
                    _ => None,
                };
                match code {
                    Some(404) => {
                        tracing::info!(pod = %key, "pod vanished before its bind");
                        self.shared.queue.pod_gone(&key);
                        self.shared.queue.finish(&key);
                    }
                    Some(409) => {
                        tracing::info!(pod = %key, %error, "pod already bound; keeping the API server's answer");
                        self.shared.queue.finish(&key);
                    }
                    _ => {
                        tracing::warn!(pod = %key, %error, "bind failed; rolled back, retrying");
                        self.shared.queue.retry_later(&key, signature);
                    }
                }
                self.shared.queue.cluster_changed();
            }
        }
    }

    /// Every `period`: fails the in-flight binds no kubelet admitted within
    /// the allocation timeout, and decides again the pods queued behind them.
    pub(super) async fn expire_gates(self, period: Duration) {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let timeout = self.shared.options.allocation_timeout;
            let expired = lock(&self.shared.gates).expired(Instant::now(), timeout);
            for stale in expired {
                let requeued = lock(&self.shared.gates).drain_waiting(&stale.node);
                for (key, job) in requeued {
                    lock(&self.shared.state).forget_assumed(&key);
                    self.shared.queue.retry_later(&key, job.signature);
                }
                self.fail_unadmitted(&stale.pod, &stale.node, stale.waited)
                    .await;
                self.release_gate(&stale.pod);
                self.shared.queue.cluster_changed();
            }
        }
    }

    async fn fail_unadmitted(&self, key: &str, node: &str, waited: Duration) {
        let (namespace, name) = key.split_once('/').unwrap_or(("default", key));
        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), namespace);
        let message = format!(
            "node {node} did not admit the pod within {}s of its bind (kubelet or the Tessera node agent is down?): its GPU allocation is marked failed so the node's next GPU pod can be placed; delete the pod to have it placed again",
            waited.as_secs()
        );
        tracing::warn!(pod = %key, %node, "{message}");
        let patch =
            json!({"metadata": {"annotations": {keys::BIND_PHASE: BindPhase::Failed.as_str()}}});
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(pod) => {
                self.shared
                    .notifier
                    .pod_warning(&pod, "GPUAllocationTimeout", message)
                    .await;
            }
            Err(error) => {
                tracing::warn!(pod = %key, %error, "could not mark the unadmitted pod failed")
            }
        }
    }
}
