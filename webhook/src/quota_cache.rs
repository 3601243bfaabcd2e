//! The ResourceQuota cache behind `--gpu-quotas`: a kube-rs reflector over
//! every namespace's `ResourceQuota` objects, read at each admission for
//! the GPU limits of the pod's namespace ([`crate::gpu_quota`]). Needs
//! list/watch on resourcequotas (`manifests/rbac-webhook.yaml`).

use std::future::Future;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::ResourceQuota;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::{Api, Client};
use tessera_api::gpu_quota::{object_limits, NamespaceQuota};
use tessera_api::names::ResourceNames;

/// Every namespace's ResourceQuotas, kept current by a watch.
#[derive(Debug, Clone)]
pub struct GpuQuotaCache {
    store: Store<ResourceQuota>,
}

impl GpuQuotaCache {
    /// The cache and the future that keeps it current (spawn it; it runs
    /// until dropped, retrying with backoff when the API fails).
    pub fn watch(client: Client) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let api: Api<ResourceQuota> = Api::all(client);
        let (store, writer) = reflector::store();
        let driver = watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .for_each(|event| async move {
                if let Err(error) = event {
                    tracing::warn!(%error, "resourcequota watch failed; retrying with backoff (needs list/watch on resourcequotas)");
                }
            });
        (Self { store }, driver)
    }

    /// Waits until the first list has been cached.
    pub async fn wait_until_ready(&self) {
        let _ = self.store.wait_until_ready().await;
    }

    /// The GPU limits of `namespace`, `None` when no quota there limits a
    /// GPU resource. Values that cannot be read are skipped (the scheduler
    /// logs them).
    pub fn namespace(&self, namespace: &str, names: &ResourceNames) -> Option<NamespaceQuota> {
        let mut quota = NamespaceQuota::default();
        for object in self.store.state() {
            if object.metadata.namespace.as_deref() != Some(namespace) {
                continue;
            }
            let (limits, _) = object_limits(&object, names);
            quota.set_object(object.metadata.name.as_deref().unwrap_or_default(), limits);
        }
        (!quota.is_empty()).then_some(quota)
    }
}
