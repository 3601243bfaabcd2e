//! The ResourceQuota reflector: namespace GPU quotas
//! (`limits.nvidia.com/gpumem`, `limits.nvidia.com/gpucores`) for the
//! core's quota step. Decisions wait for its initial list like they wait
//! for nodes and pods, so a restarted scheduler never places past a quota
//! it has not read yet. A change to a namespace's GPU limits retries the
//! parked pods at once; the quota controller's frequent `status.used`
//! rewrites do not (usage is the scheduler's own count of card charges).

use std::collections::HashMap;

use k8s_openapi::api::core::v1::ResourceQuota;
use kube::api::Api;
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;

use super::inputs::follow;
use super::{lock, Scheduler, ShellError};

/// The list name decisions wait for.
pub(super) const QUOTAS_LIST: &str = "resourcequotas";

impl Scheduler {
    pub(super) async fn reflect_resource_quotas(self) -> Result<(), ShellError> {
        let api: Api<ResourceQuota> = Api::all(self.shared.client.clone());
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        // Unreadable values are warned about once per spec generation, not
        // on every status rewrite.
        let mut warned: HashMap<String, Option<i64>> = HashMap::new();
        let apply = |quota: &ResourceQuota| {
            let (changed, errors) = {
                let mut state = lock(&self.shared.state);
                let namespace = quota.metadata.namespace.as_deref().unwrap_or_default();
                let before = state.quotas().namespace(namespace).cloned();
                let errors = state.upsert_resource_quota(quota);
                (
                    state.quotas().namespace(namespace) != before.as_ref(),
                    errors,
                )
            };
            let key = format!(
                "{}/{}",
                quota.metadata.namespace.as_deref().unwrap_or_default(),
                quota.metadata.name.as_deref().unwrap_or_default()
            );
            if !errors.is_empty() && warned.get(&key) != Some(&quota.metadata.generation) {
                for error in errors {
                    tracing::warn!(%error, "GPU quota value ignored");
                }
                warned.insert(key, quota.metadata.generation);
            }
            if changed {
                self.shared.queue.cluster_changed();
            }
        };
        let delete = |quota: &ResourceQuota| {
            lock(&self.shared.state).remove_resource_quota(quota);
            self.shared.queue.cluster_changed();
        };
        let synced = || self.list_synced(QUOTAS_LIST);
        follow(stream, apply, delete, synced).await;
        Err(ShellError::WatchEnded("resourcequota"))
    }
}
