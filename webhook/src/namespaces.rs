//! Optional namespace opt-out lookup. An AdmissionReview does not carry the
//! namespace's labels; in a cluster the webhook configuration's
//! `namespaceSelector` keeps `hami.io/webhook: ignore` namespaces away.
//! With `--watch-namespaces` the server also keeps a cache (a kube-rs
//! reflector over only the opted-out namespaces) and honours the label
//! itself, for configurations that lack the selector.

use std::collections::BTreeMap;
use std::future::Future;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::{Api, Client};
use tessera_api::names::{WEBHOOK_IGNORE_LABEL, WEBHOOK_IGNORE_VALUE};

/// The namespaces labelled `hami.io/webhook: ignore`, kept current by a
/// watch.
#[derive(Debug, Clone)]
pub struct OptedOutNamespaces {
    store: Store<Namespace>,
}

impl OptedOutNamespaces {
    /// The cache and the future that keeps it current (spawn it; it runs
    /// until dropped, retrying with backoff when the API fails).
    pub fn watch(client: Client) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let api: Api<Namespace> = Api::all(client);
        let (store, writer) = reflector::store();
        let config = watcher::Config::default()
            .labels(&format!("{WEBHOOK_IGNORE_LABEL}={WEBHOOK_IGNORE_VALUE}"));
        let driver = watcher(api, config)
            .default_backoff()
            .reflect(writer)
            .for_each(|event| async move {
                if let Err(error) = event {
                    tracing::warn!(%error, "namespace watch failed; retrying with backoff (needs list/watch on namespaces)");
                }
            });
        (Self { store }, driver)
    }

    /// Waits until the first list has been cached.
    pub async fn wait_until_ready(&self) {
        // The writer lives in the driver future; if it is dropped there is
        // nothing to wait for.
        let _ = self.store.wait_until_ready().await;
    }

    /// The labels of `namespace` when it opted out, `None` otherwise.
    pub fn labels(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        self.store
            .get(&ObjectRef::new(namespace))
            .and_then(|ns| ns.metadata.labels.clone())
    }
}
