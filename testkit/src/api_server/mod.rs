//! The API server stand-in's handle: starts the HTTP listener on
//! `127.0.0.1:0`, owns the shared state (store, request log, injected
//! faults), and offers the Rust-side test hooks. Dropping the handle stops
//! the server and ends open watches.
//!
//! The pieces: `store` keeps objects and history, `routes` is the HTTP
//! surface, `watch` streams events, `selectors` and `patch` are the request
//! languages.

mod acknowledge;
mod patch;
mod pod_update;
mod routes;
mod selectors;
mod store;
mod watch;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

pub use acknowledge::AllocationAcknowledger;
use store::{ObjectKey, Store};

/// One request the server answered, as the request log keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// HTTP method: `GET`, `POST`, `PUT`, `PATCH`, `DELETE`.
    pub method: String,
    /// `v1` or `group/version`.
    pub api_version: String,
    /// Resource plural, e.g. `pods`.
    pub resource: String,
    /// Subresource, e.g. `binding` or `status`.
    pub subresource: Option<String>,
    /// Namespace from the path, if any.
    pub namespace: Option<String>,
    /// Object name from the path, if any.
    pub name: Option<String>,
    /// HTTP status code of the answer (200 for a watch that started).
    pub status: u16,
    /// Whether this was a watch.
    pub watch: bool,
}

impl RequestRecord {
    /// `resource` or `resource/subresource`, as [`ApiServer::fail_next`] and
    /// [`ApiServer::write_count`] name targets.
    pub fn target(&self) -> String {
        match &self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.clone(),
        }
    }

    /// Whether the request could change state (any method but GET).
    pub fn is_write(&self) -> bool {
        self.method != "GET"
    }
}

#[derive(Debug)]
struct Fault {
    method: String,
    target: String,
    status: u16,
    remaining: usize,
}

/// State shared by the handle and every request.
#[derive(Debug)]
pub(crate) struct Shared {
    store: Mutex<Store>,
    shutdown: tokio::sync::watch::Sender<bool>,
    requests: Mutex<Vec<RequestRecord>>,
    faults: Mutex<Vec<Fault>>,
}

/// Locks a mutex, ignoring poisoning: a panicking test must not cascade.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    pub(crate) fn lock_store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    fn record(&self, record: RequestRecord) {
        lock(&self.requests).push(record);
    }

    /// The status code of the first fault matching this request, consuming one use.
    fn take_fault(&self, method: &str, target: &routes::Target) -> Option<u16> {
        let name = match &target.subresource {
            Some(sub) => format!("{}/{sub}", target.resource),
            None => target.resource.clone(),
        };
        let mut faults = lock(&self.faults);
        let index = faults.iter().position(|f| {
            (f.method == "*" || f.method.eq_ignore_ascii_case(method))
                && (f.target == "*" || f.target == name)
        })?;
        let status = faults[index].status;
        faults[index].remaining -= 1;
        if faults[index].remaining == 0 {
            faults.remove(index);
        }
        Some(status)
    }
}

/// A running in-process Kubernetes API server stand-in.
///
/// ```no_run
/// # async fn demo() {
/// use k8s_openapi::api::core::v1::Pod;
/// let server = tessera_testkit::ApiServer::start().await.unwrap();
/// let pods: kube::Api<Pod> = kube::Api::namespaced(server.client(), "default");
/// # }
/// ```
pub struct ApiServer {
    url: String,
    shared: Arc<Shared>,
}

impl fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiServer")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl ApiServer {
    /// Binds `127.0.0.1:0` and serves on the current tokio runtime.
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new()),
            shutdown: tokio::sync::watch::channel(false).0,
            requests: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
        });
        let app = routes::router(Arc::clone(&shared));
        let mut stop = shared.shutdown.subscribe();
        tokio::spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|stop| *stop).await;
            };
            // An accept error ends the server; tests then see connection errors.
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await;
        });
        Ok(Self { url, shared })
    }

    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A kube client talking to this server (default namespace `default`).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn client(&self) -> kube::Client {
        let url = self.url.parse().expect("the server URL is a valid URI");
        kube::Client::try_from(kube::Config::new(url))
            .expect("a plain-HTTP kube client builds from a URL alone")
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock_store().resource_version()
    }

    /// Creates or replaces an object without going through HTTP (no request
    /// log entry, no faults, no preconditions; `.status` is taken from
    /// `object`). Bumps the resourceVersion and notifies watches. A
    /// namespaced object without a namespace goes to `default`.
    ///
    /// # Panics
    /// When `object` is not a JSON object or has neither name nor generateName.
    pub fn insert_value(&self, api_version: &str, resource: &str, object: Value) -> Value {
        self.shared
            .lock_store()
            .upsert(api_version, resource, object)
            .unwrap_or_else(|e| {
                panic!(
                    "ApiServer::insert_value({api_version}, {resource}): {}",
                    e.message
                )
            })
    }

    /// The stored object, if any. `namespace` is `None` for cluster-scoped resources.
    pub fn get_value(
        &self,
        api_version: &str,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let key = ObjectKey::new(api_version, resource, namespace.unwrap_or(""), name);
        self.shared.lock_store().get(&key).map(|o| Value::clone(o))
    }

    /// Stored objects of one resource; `namespace` `None` means all namespaces.
    pub fn list_values(
        &self,
        api_version: &str,
        resource: &str,
        namespace: Option<&str>,
    ) -> Vec<Value> {
        self.shared
            .lock_store()
            .list(api_version, resource, namespace)
            .map(|o| Value::clone(o))
            .collect()
    }

    /// Deletes an object without going through HTTP; returns it if it existed.
    pub fn delete_value(
        &self,
        api_version: &str,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let key = ObjectKey::new(api_version, resource, namespace.unwrap_or(""), name);
        self.shared.lock_store().delete(&key, &Value::Null).ok()
    }

    /// Typed [`insert_value`](Self::insert_value).
    ///
    /// # Panics
    /// As `insert_value`, or when the stored object does not read back as `K`.
    pub fn insert<K>(&self, object: &K) -> K
    where
        K: k8s_openapi::Resource + Serialize + DeserializeOwned,
    {
        let value = serde_json::to_value(object).expect("k8s-openapi objects serialize to JSON");
        let stored = self.insert_value(K::API_VERSION, K::URL_PATH_SEGMENT, value);
        serde_json::from_value(stored).expect("the stored object reads back as its own type")
    }

    /// Typed [`get_value`](Self::get_value).
    pub fn get<K>(&self, namespace: Option<&str>, name: &str) -> Option<K>
    where
        K: k8s_openapi::Resource + DeserializeOwned,
    {
        self.get_value(K::API_VERSION, K::URL_PATH_SEGMENT, namespace, name)
            .and_then(|v| serde_json::from_value(v).ok())
    }

    /// Typed [`list_values`](Self::list_values) over all namespaces.
    pub fn list<K>(&self) -> Vec<K>
    where
        K: k8s_openapi::Resource + DeserializeOwned,
    {
        self.list_values(K::API_VERSION, K::URL_PATH_SEGMENT, None)
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect()
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.requests).clone()
    }

    /// The requests that were writes (any method but GET).
    pub fn writes(&self) -> Vec<RequestRecord> {
        lock(&self.shared.requests)
            .iter()
            .filter(|r| r.is_write())
            .cloned()
            .collect()
    }

    /// How many writes matched `method` (`"*"` for any) and `target`
    /// (`"pods"`, `"pods/binding"`, `"nodes/status"`, or `"*"`), whatever
    /// their outcome.
    pub fn write_count(&self, method: &str, target: &str) -> usize {
        lock(&self.shared.requests)
            .iter()
            .filter(|r| r.is_write())
            .filter(|r| method == "*" || r.method.eq_ignore_ascii_case(method))
            .filter(|r| target == "*" || r.target() == target)
            .count()
    }

    /// Writes grouped by (method, target), e.g. `("POST", "pods/binding") => 10`.
    pub fn write_counts(&self) -> BTreeMap<(String, String), usize> {
        let mut counts = BTreeMap::new();
        for r in lock(&self.shared.requests).iter().filter(|r| r.is_write()) {
            *counts.entry((r.method.clone(), r.target())).or_insert(0) += 1;
        }
        counts
    }

    /// Empties the request log.
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// Makes the next `count` requests matching `method` (`"*"` for any) and
    /// `target` (`"pods/binding"`, `"pods"`, `"*"`, ...) fail with `status`
    /// and a matching `Status` body, without touching the store. Faults are
    /// matched in the order they were added.
    pub fn fail_next(&self, method: &str, target: &str, status: u16, count: usize) {
        if count == 0 {
            return;
        }
        lock(&self.shared.faults).push(Fault {
            method: method.to_owned(),
            target: target.to_owned(),
            status,
            remaining: count,
        });
    }

    /// Drops every injected fault not yet used.
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
    }
}
