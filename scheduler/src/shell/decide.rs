//! The decision loop: while this replica leads, take the next pending pod
//! from the queue, ask the core for a placement, assume it at once (so the
//! next decision already sees it) and hand it to [`super::bind`]; a pod
//! that fits nowhere is parked with its reasons and a `FailedScheduling`
//! Event.

use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;

use super::{lock, pod_signature, Scheduler};
use crate::core::ScheduleError;

impl Scheduler {
    pub(super) async fn decision_loop(self, mut leading: watch::Receiver<bool>) {
        // Deciding before every bound pod is known could hand out its cards twice.
        let mut synced = self.shared.synced.subscribe();
        if synced.wait_for(|s| *s).await.is_err() {
            return;
        }
        loop {
            if leading.wait_for(|l| *l).await.is_err() {
                return;
            }
            let key = self.shared.queue.next().await;
            if !*leading.borrow() {
                // Lost the lease while waiting: give the pod back.
                self.shared.queue.finish(&key);
                if let Some(pod) = lock(&self.shared.pending).get(&key) {
                    self.shared.queue.pod_seen(&key, pod_signature(pod));
                }
                continue;
            }
            let Some(pod) = lock(&self.shared.pending).get(&key).cloned() else {
                self.shared.queue.finish(&key);
                continue;
            };
            if lock(&self.shared.recently_bound).contains(&key) {
                self.shared.queue.finish(&key);
                continue;
            }
            self.decide(key, pod).await;
        }
    }

    async fn decide(&self, key: String, pod: Pod) {
        let started = Instant::now();
        let result = {
            let mut state = lock(&self.shared.state);
            // An unbound pod's old charge (a bind cut off by a restart) is replaced by this decision.
            state.release(&key);
            let result = state.schedule(&pod);
            if let Ok(placement) = &result {
                state.assume(&placement.pod, placement.charge.clone());
            }
            result
        };
        self.shared
            .metrics
            .decision_seconds
            .observe(started.elapsed().as_secs_f64());
        let signature = pod_signature(&pod);
        match result {
            Ok(placement) => {
                self.shared.metrics.count_decision("placed");
                if placement.volumes.is_empty() {
                    self.submit_bind(pod, placement, signature);
                } else {
                    self.bind_volumes_then_pod(pod, placement, signature);
                }
            }
            Err(ScheduleError::Unschedulable(why)) => {
                self.shared.metrics.count_decision("unschedulable");
                // Parked before evicting, so the victims' deletion wakes it.
                self.shared.queue.park(&key, signature, true);
                let mut message = format!("0/{} nodes are available: {why}", why.total_nodes);
                // kube-scheduler appends what preemption found, when it did not help.
                if let Some(preemption) = self.preempt_for(&pod) {
                    message = format!("{message}. {preemption}");
                }
                tracing::info!(pod = %key, %message, "pod does not fit; waiting for the cluster to change");
                let notifier = self.shared.notifier.clone();
                tokio::spawn(async move { notifier.failed(&pod, "Unschedulable", &message).await });
            }
            Err(ScheduleError::SchedulingGated(gates)) => {
                // Not queued while gated; a gate added after queueing lands here.
                tracing::debug!(pod = %key, ?gates, "pod has scheduling gates; waiting for their removal");
                self.shared.queue.park(&key, signature, false);
            }
            Err(ScheduleError::InvalidRequest(error)) => {
                self.shared.metrics.count_decision("invalid");
                let message = error.to_string();
                tracing::warn!(pod = %key, %message, "invalid GPU request");
                self.shared.queue.park(&key, signature, false);
                let notifier = self.shared.notifier.clone();
                tokio::spawn(
                    async move { notifier.failed(&pod, "InvalidGPURequest", &message).await },
                );
            }
        }
    }
}
