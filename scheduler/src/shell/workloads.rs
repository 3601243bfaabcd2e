//! Reflectors for the workloads whose selectors give pods cluster-default
//! topology spread constraints (kube-scheduler's `DefaultSelector`):
//! Services, ReplicationControllers, ReplicaSets and StatefulSets. Only a
//! selector change wakes parked pods (status updates do not). Decisions
//! wait for their initial lists.

use std::fmt::Debug;
use std::hash::Hash;

use k8s_openapi::api::apps::v1::{ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{ReplicationController, Service};
use kube::api::Api;
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::Resource;
use serde::de::DeserializeOwned;

use super::inputs::follow;
use super::{lock, Scheduler, ShellError};
use crate::core::default_spread::WorkloadKind;
use crate::core::ClusterState;

/// The list names decisions wait for.
pub(super) const WORKLOAD_LISTS: [&str; 4] = [
    "services",
    "replicationcontrollers",
    "replicasets",
    "statefulsets",
];

impl Scheduler {
    pub(super) async fn reflect_workloads(self) -> Result<(), ShellError> {
        let _ = tokio::join!(
            self.follow_workload::<Service>(
                WORKLOAD_LISTS[0],
                WorkloadKind::Service,
                ClusterState::upsert_service
            ),
            self.follow_workload::<ReplicationController>(
                WORKLOAD_LISTS[1],
                WorkloadKind::ReplicationController,
                ClusterState::upsert_replication_controller
            ),
            self.follow_workload::<ReplicaSet>(
                WORKLOAD_LISTS[2],
                WorkloadKind::ReplicaSet,
                ClusterState::upsert_replica_set
            ),
            self.follow_workload::<StatefulSet>(
                WORKLOAD_LISTS[3],
                WorkloadKind::StatefulSet,
                ClusterState::upsert_stateful_set
            ),
        );
        Err(ShellError::WatchEnded("workload selectors"))
    }

    async fn follow_workload<K>(
        &self,
        list: &'static str,
        kind: WorkloadKind,
        upsert: fn(&mut ClusterState, &K) -> bool,
    ) where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + Debug
            + Send
            + Sync
            + 'static,
        K::DynamicType: Default + Eq + Hash + Clone,
    {
        let api: Api<K> = Api::all(self.shared.client.clone());
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        let apply = |object: &K| {
            if upsert(&mut lock(&self.shared.state), object) {
                self.shared.queue.cluster_changed();
            }
        };
        let delete = |object: &K| {
            if lock(&self.shared.state).remove_workload_selector(kind, object.meta()) {
                self.shared.queue.cluster_changed();
            }
        };
        let synced = || self.list_synced(list);
        follow(stream, apply, delete, synced).await;
    }
}
