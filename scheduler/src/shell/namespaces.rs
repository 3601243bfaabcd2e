//! The Namespace reflector: namespace labels for inter-pod affinity terms'
//! `namespaceSelector`. Decisions wait for its initial list like they wait
//! for nodes and pods, so a term never sees a namespace as unlabelled
//! because the scheduler just started.

use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;

use super::inputs::follow;
use super::{lock, Scheduler, ShellError};

/// The list name decisions wait for.
pub(super) const NAMESPACES_LIST: &str = "namespaces";

impl Scheduler {
    pub(super) async fn reflect_namespaces(self) -> Result<(), ShellError> {
        let api: Api<Namespace> = Api::all(self.shared.client.clone());
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        let apply = |namespace: &Namespace| {
            lock(&self.shared.state).upsert_namespace(namespace);
            self.shared.queue.cluster_changed();
        };
        let delete = |namespace: &Namespace| {
            lock(&self.shared.state)
                .remove_namespace(namespace.metadata.name.as_deref().unwrap_or(""));
        };
        let synced = || self.list_synced(NAMESPACES_LIST);
        follow(stream, apply, delete, synced).await;
        Err(ShellError::WatchEnded("namespace"))
    }
}
