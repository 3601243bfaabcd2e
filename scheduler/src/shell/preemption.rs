//! Preemption in the shell (kube-scheduler's PostFilter): when a pod fits
//! nowhere, the core names the node and the fewest lower-priority victims
//! ([`ClusterState::find_preemption`](crate::core::ClusterState::find_preemption));
//! the shell evicts them through the Eviction API (`pods/eviction`, so
//! PodDisruptionBudgets are enforced by the API server too) and records the
//! node in the pod's `status.nominatedNodeName`. The pod is decided again
//! when the victims are gone. While victims on its nominated node are still
//! terminating, no more are evicted. Each victim gets kube-scheduler's
//! `Preempted` Event; a pod preemption cannot help gets kube-scheduler's
//! `preemption: …` wording in its `FailedScheduling` message. A
//! PodDisruptionBudget reflector feeds the core.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, EvictParams, Patch, PatchParams};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use serde_json::json;

use super::inputs::follow;
use super::{lock, Scheduler, ShellError};
use crate::core::preemption::{Preemption, PreemptionOutcome};
use crate::core::{pod_key, PodRequirements};

/// The list name decisions wait for.
pub(super) const BUDGETS_LIST: &str = "poddisruptionbudgets";

impl Scheduler {
    pub(super) async fn reflect_disruption_budgets(self) -> Result<(), ShellError> {
        let api: Api<PodDisruptionBudget> = Api::all(self.shared.client.clone());
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        let apply = |budget: &PodDisruptionBudget| {
            lock(&self.shared.state).upsert_disruption_budget(budget);
        };
        let delete = |budget: &PodDisruptionBudget| {
            lock(&self.shared.state).remove_disruption_budget(
                budget.metadata.namespace.as_deref().unwrap_or("default"),
                budget.metadata.name.as_deref().unwrap_or(""),
            );
        };
        let synced = || self.list_synced(BUDGETS_LIST);
        follow(stream, apply, delete, synced).await;
        Err(ShellError::WatchEnded("poddisruptionbudget"))
    }

    /// Called for a pod that fits nowhere: evicts what the core picks, if
    /// anything, and nominates the node. Returns the `preemption: …` part
    /// kube-scheduler adds to the pod's `FailedScheduling` message, when
    /// preemption did not help.
    pub(super) fn preempt_for(&self, pod: &Pod) -> Option<String> {
        let outcome = {
            let mut state = lock(&self.shared.state);
            let nominated = pod
                .status
                .as_ref()
                .and_then(|s| s.nominated_node_name.as_deref())
                .filter(|n| !n.is_empty());
            let requirements = PodRequirements::from_pod(pod, state.config()).ok()?;
            let outcome = state.preemption_outcome(&requirements, nominated);
            if let PreemptionOutcome::Victims(preemption) = &outcome {
                // Reserved at once: the victims' room is this pod's.
                state.nominate(pod, &preemption.node);
            }
            outcome
        };
        let PreemptionOutcome::Victims(preemption) = outcome else {
            return outcome.message();
        };
        let key = pod_key(pod);
        // The client retries a refused eviction (429) with backoff; while it
        // does, later decisions of this pod start no second preemption.
        if !lock(&self.shared.preempting).insert(key.clone()) {
            return None;
        }
        let scheduler = self.clone();
        let pod = pod.clone();
        tokio::spawn(async move {
            scheduler.evict_and_nominate(&pod, &key, &preemption).await;
            lock(&scheduler.shared.preempting).remove(&key);
        });
        None
    }

    /// Evicts the victims (stopping at the first refusal), then nominates
    /// the node on the pod.
    async fn evict_and_nominate(&self, pod: &Pod, key: &str, preemption: &Preemption) {
        tracing::info!(pod = %key, node = %preemption.node, victims = ?preemption.victims,
            budget_violations = preemption.budget_violations, "preempting lower-priority pods");
        for victim in &preemption.victims {
            let (namespace, name) = victim.split_once('/').unwrap_or(("default", victim));
            let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), namespace);
            // Read first: the Event names the victim by UID (`kubectl
            // describe` finds it so); one already gone needs no eviction.
            let victim_pod = match api.get_opt(name).await {
                Ok(Some(found)) => found,
                Ok(None) => continue,
                Err(error) => {
                    tracing::warn!(pod = %key, %victim, %error, "could not read the victim");
                    lock(&self.shared.state).forget_nomination(key);
                    return;
                }
            };
            if let Err(error) = api.evict(name, &EvictParams::default()).await {
                // 429: a PodDisruptionBudget refuses; the pod stays pending
                // and preemption is tried again on the next change (it
                // holds no room meanwhile).
                tracing::warn!(pod = %key, %victim, %error, "eviction refused");
                lock(&self.shared.state).forget_nomination(key);
                return;
            }
            self.shared
                .notifier
                .preempted(&victim_pod, pod, &preemption.node)
                .await;
        }
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), namespace);
        let patch = json!({"status": {"nominatedNodeName": preemption.node}});
        if let Err(error) = api
            .patch_status(
                pod.metadata.name.as_deref().unwrap_or(""),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            tracing::warn!(pod = %key, %error, "could not set status.nominatedNodeName");
        }
    }
}
