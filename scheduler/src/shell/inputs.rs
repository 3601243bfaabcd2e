//! The shell's inputs: the node and pod watches, followed through
//! kube-runtime's reflector and its store, and what each change does to the
//! scheduler's picture ([`ClusterState`]), its queue, its bind gates and its
//! metrics. A relist (after a watch expired or the API server restarted)
//! also reports as deleted every object the store held before and the new
//! list lacks, which a bare reflector store would drop silently.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::atomic::Ordering;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::runtime::reflector::{self, reflector, ObjectRef};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::Resource;
use serde::de::DeserializeOwned;
use tessera_api::names::allocation as keys;
use tessera_api::pod::is_terminal;

use super::{lock, pod_signature, Scheduler, ShellError};
use crate::core::pod_key;

/// Follows `stream` through a reflector store: `on_apply` for every object
/// listed or changed, `on_delete` for every object deleted (including those
/// a relist no longer has), `on_synced` after every complete list. Returns
/// when the stream ends.
pub async fn follow<K, S>(
    stream: S,
    mut on_apply: impl FnMut(&K),
    mut on_delete: impl FnMut(&K),
    mut on_synced: impl FnMut(),
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let (reader, writer) = reflector::store::<K>();
    let mut stream = std::pin::pin!(reflector(writer, stream));
    let mut before_relist = None;
    while let Some(event) = stream.next().await {
        match event {
            // The store keeps the old list until the new one is complete.
            Ok(watcher::Event::Init) => before_relist = Some(reader.state()),
            Ok(watcher::Event::InitApply(object) | watcher::Event::Apply(object)) => {
                on_apply(&object);
            }
            Ok(watcher::Event::InitDone) => {
                for old in before_relist.take().unwrap_or_default() {
                    if reader.get(&ObjectRef::from_obj(&*old)).is_none() {
                        on_delete(&old);
                    }
                }
                on_synced();
            }
            Ok(watcher::Event::Delete(object)) => on_delete(&object),
            Err(error) => {
                tracing::warn!(%error, "watch error; the watcher retries with backoff")
            }
        }
    }
}

impl Scheduler {
    pub(super) async fn reflect_nodes(self) -> Result<(), ShellError> {
        let api: Api<Node> = Api::all(self.shared.client.clone());
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        let apply = |node: &Node| self.node_changed(node);
        let delete = |node: &Node| {
            lock(&self.shared.state).remove_node(node.metadata.name.as_deref().unwrap_or(""));
            self.forget_handshake(node.metadata.name.as_deref().unwrap_or(""));
        };
        let synced = || {
            self.shared.nodes_synced.store(true, Ordering::Relaxed);
            self.shared.synced.send_replace(self.is_synced());
        };
        follow(stream, apply, delete, synced).await;
        Err(ShellError::WatchEnded("node"))
    }

    fn node_changed(&self, node: &Node) {
        self.observe_handshake(node);
        if self.only_handshake_renewed(node) {
            return;
        }
        let name = node.metadata.name.clone().unwrap_or_default();
        let (error, pair_scores_error) = {
            let mut state = lock(&self.shared.state);
            let error = state.upsert_node(node);
            (error, state.pair_scores_error(&name).map(str::to_owned))
        };
        let mut errors = lock(&self.shared.node_errors);
        // The link scores' error is remembered under its own key so it is
        // logged once per distinct value, like the inventory's.
        let pair_key = format!("{name} {}", tessera_api::names::NODE_PAIR_SCORE_ANNOTATION);
        match pair_scores_error {
            Some(error) if errors.get(&pair_key) != Some(&error) => {
                tracing::warn!(node = %name, %error, "GPU link score annotation is corrupt; topology-aware pods are placed on the node without link scores");
                errors.insert(pair_key, error);
            }
            Some(_) => {}
            None => {
                errors.remove(&pair_key);
            }
        }
        match error {
            Some(error) if errors.get(&name) != Some(&error) => {
                tracing::warn!(node = %name, %error, "GPU inventory annotation is corrupt; node skipped for GPU pods");
                errors.insert(name, error.clone());
                let notifier = self.shared.notifier.clone();
                let node = node.clone();
                tokio::spawn(async move { notifier.corrupt_inventory(&node, &error).await });
            }
            Some(_) => {}
            None => {
                errors.remove(&name);
            }
        }
        drop(errors);
        self.shared.queue.cluster_changed();
    }

    pub(super) async fn reflect_pods(self) -> Result<(), ShellError> {
        let api: Api<Pod> = Api::all(self.shared.client.clone());
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        let apply = |pod: &Pod| self.pod_changed(pod);
        let delete = |pod: &Pod| self.pod_deleted(pod);
        let synced = || {
            self.shared.pods_synced.store(true, Ordering::Relaxed);
            self.shared.synced.send_replace(self.is_synced());
        };
        follow(stream, apply, delete, synced).await;
        Err(ShellError::WatchEnded("pod"))
    }

    fn pod_changed(&self, pod: &Pod) {
        let key = pod_key(pod);
        let (was_charged, distrust) = {
            let mut state = lock(&self.shared.state);
            let before = state.charge(&key).is_some();
            let distrust = state.observe_pod(pod);
            (before && state.charge(&key).is_none(), distrust)
        };
        if let Some(error) = distrust {
            self.warn_distrusted(pod, &error);
        }
        self.adopt_if_preinstalled(pod);
        self.track_gate(pod);
        let spec = pod.spec.as_ref();
        let bound = spec.is_some_and(|s| s.node_name.is_some());
        let ours = spec.and_then(|s| s.scheduler_name.as_deref())
            == Some(self.shared.config.scheduler_name.as_str());
        // A pod with scheduling gates waits, unqueued and without events,
        // until its gates are removed (an update that queues it).
        let gated = !crate::core::requirements::scheduling_gates(pod).is_empty();
        let pending = ours
            && !bound
            && !gated
            && pod.metadata.deletion_timestamp.is_none()
            && !is_terminal(pod);
        if pending {
            lock(&self.shared.pending).insert(key.clone(), pod.clone());
            self.shared.queue.pod_seen(&key, pod_signature(pod));
        } else {
            lock(&self.shared.pending).remove(&key);
            self.shared.queue.pod_gone(&key);
            if bound {
                lock(&self.shared.recently_bound).remove(&key);
            }
        }
        let annotation = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(keys::DEVICES_ALLOCATED));
        match annotation {
            Some(devices) if bound && !is_terminal(pod) => {
                let bound_pod = super::metrics::BoundPod {
                    namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                    name: pod.metadata.name.clone().unwrap_or_default(),
                    node: pod
                        .spec
                        .as_ref()
                        .and_then(|spec| spec.node_name.clone())
                        .unwrap_or_default(),
                    devices_allocated: devices.clone(),
                };
                lock(&self.shared.allocated).insert(key, bound_pod);
            }
            _ => {
                lock(&self.shared.allocated).remove(&key);
            }
        }
        if was_charged {
            self.shared.queue.cluster_changed();
        }
    }

    /// A Warning Event, once per pod, on a pod whose allocation annotations
    /// are not believed: it is charged no cards.
    fn warn_distrusted(&self, pod: &Pod, error: &tessera_api::allocation_seal::SealError) {
        let uid = pod.metadata.uid.clone().unwrap_or_else(|| pod_key(pod));
        if !lock(&self.shared.distrust_warned).insert(uid) {
            return;
        }
        tracing::warn!(pod = %pod_key(pod), %error, "ignoring GPU allocation annotations not written by this scheduler");
        let notifier = self.shared.notifier.clone();
        let pod = pod.clone();
        let message = format!("Tessera ignores this pod's GPU allocation: {error}");
        tokio::spawn(async move {
            notifier
                .pod_warning(&pod, "UntrustedGPUAllocation", message)
                .await
        });
    }

    fn pod_deleted(&self, pod: &Pod) {
        let key = pod_key(pod);
        self.release_gate(&key);
        if let Some(uid) = &pod.metadata.uid {
            lock(&self.shared.distrust_warned).remove(uid);
        }
        lock(&self.shared.state).remove_pod(pod);
        lock(&self.shared.pending).remove(&key);
        lock(&self.shared.allocated).remove(&key);
        lock(&self.shared.recently_bound).remove(&key);
        self.shared.queue.pod_gone(&key);
        self.shared.queue.cluster_changed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use serde_json::json;

    fn object(name: &str) -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "n"}}))
            .expect("object")
    }

    #[tokio::test]
    async fn a_relist_reports_what_it_no_longer_has_as_deleted() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let events = vec![
            Init,
            InitApply(object("a")),
            InitApply(object("b")),
            InitDone,
            Apply(object("c")),
            Apply(object("d")),
            Delete(object("d")),
            // The watch expired: the new list has only `a` (and a new `e`).
            Init,
            InitApply(object("a")),
            InitApply(object("e")),
            InitDone,
        ];
        let mut applied = Vec::new();
        let mut deleted = Vec::new();
        let mut synced = 0;
        follow(
            futures::stream::iter(events.into_iter().map(Ok)),
            |o: &ConfigMap| applied.push(o.metadata.name.clone().unwrap_or_default()),
            |o: &ConfigMap| deleted.push(o.metadata.name.clone().unwrap_or_default()),
            || synced += 1,
        )
        .await;
        assert_eq!(applied, ["a", "b", "c", "d", "a", "e"]);
        deleted.sort();
        assert_eq!(deleted, ["b", "c", "d"]);
        assert_eq!(synced, 2);
    }
}
