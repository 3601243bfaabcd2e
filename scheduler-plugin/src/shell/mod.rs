//! The Kubernetes shell around the placement core. Reflectors keep the
//! [`ClusterState`] current from node, pod, namespace, storage and
//! PodDisruptionBudget watches; pending pods of ours
//! flow through the [`SchedulingQueue`]; the decision loop asks the core,
//! assumes the result at once (so the next decision already sees it) and
//! hands the bind to [`bind`]. One bind request carries the sealed
//! allocation annotations (the API server copies them onto the pod), so a
//! placed pod costs one API write; binds run concurrently across nodes, and
//! on one node at most one per shape is unacknowledged at a time
//! ([`node_gate`]), with no lock annotation; a failed bind rolls its
//! assumption back and retries.

pub mod bind;
pub mod events;
pub mod leader;
pub mod metrics;
mod namespaces;
pub mod node_gate;
mod preemption;
pub mod queue;
pub mod seal_key;
pub mod volumes;

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::Client;
use tessera_api::allocation_seal::{AllocationTrust, SealKey};
use tessera_api::config::Config;
use tessera_api::names::allocation as keys;
use tokio::sync::{watch, Semaphore};

use crate::core::{pod_key, ClusterState, ScheduleError};
use events::Notifier;
use leader::LeaseSettings;
use metrics::{set_gauge, SchedulerMetrics};
use queue::SchedulingQueue;

/// Lists besides nodes and pods that decisions wait for.
const OTHER_LISTS: [&str; 5] = [
    namespaces::NAMESPACES_LIST,
    preemption::BUDGETS_LIST,
    volumes::STORAGE_LISTS[0],
    volumes::STORAGE_LISTS[1],
    volumes::STORAGE_LISTS[2],
];

/// How the shell runs.
#[derive(Debug, Clone)]
pub struct ShellOptions {
    /// This replica's name (events, lease holder).
    pub identity: String,
    /// Leader election; `None` schedules without a lease (one replica).
    pub lease: Option<LeaseSettings>,
    /// Binds in flight at once.
    pub bind_concurrency: usize,
    /// Publish a `Scheduled` Event per placed pod (one more API write each).
    pub scheduled_events: bool,
    /// The key that seals allocations. In a cluster always set (loaded with
    /// [`seal_key::load_or_create`]): binds are sealed and only sealed
    /// allocations are charged. `None` believes every allocation annotation
    /// and seals nothing (placement tests).
    pub seal_key: Option<SealKey>,
    /// How long a bound pod may stay `allocating` (no kubelet admitted it)
    /// before it is marked failed and its node's gate opens.
    pub allocation_timeout: Duration,
    /// How long the claims of a pod with `WaitForFirstConsumer` volumes may
    /// take to bind after its node was selected (kube-scheduler's
    /// `bindTimeoutSeconds`, 600 s) before the decision is rolled back.
    pub volume_binding_timeout: Duration,
}

impl Default for ShellOptions {
    fn default() -> Self {
        Self {
            identity: "tessera-scheduler".to_owned(),
            lease: None,
            bind_concurrency: 64,
            scheduled_events: true,
            seal_key: None,
            allocation_timeout: Duration::from_secs(120),
            volume_binding_timeout: Duration::from_secs(600),
        }
    }
}

/// Errors that stop the shell.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// A watch stream ended, which only happens when the process is shutting down.
    #[error("the {0} watch ended")]
    WatchEnded(&'static str),
}

struct Shared {
    client: Client,
    config: Config,
    options: ShellOptions,
    state: Mutex<ClusterState>,
    pending: Mutex<HashMap<String, Pod>>,
    allocated: Mutex<HashMap<String, (String, String, String)>>,
    recently_bound: Mutex<HashSet<String>>,
    node_errors: Mutex<HashMap<String, String>>,
    gates: Mutex<bind::Gates>,
    /// Pods already warned about (by UID) for allocations not believed.
    distrust_warned: Mutex<HashSet<String>>,
    queue: SchedulingQueue,
    metrics: SchedulerMetrics,
    notifier: Notifier,
    bind_slots: Arc<Semaphore>,
    nodes_synced: AtomicBool,
    pods_synced: AtomicBool,
    /// Other lists decisions wait for ([`OTHER_LISTS`]) that are in.
    lists_synced: Mutex<HashSet<&'static str>>,
    /// Pods whose evictions are in flight (one preemption at a time each).
    preempting: Mutex<HashSet<String>>,
    synced: watch::Sender<bool>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The running scheduler. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("identity", &self.shared.options.identity)
            .finish()
    }
}

/// Identifies the schedulable content of a pod, so a parked pod is retried
/// at once when its own spec changes but not on its own status updates.
fn pod_signature(pod: &Pod) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&pod.spec)
        .unwrap_or_default()
        .hash(&mut hasher);
    pod.metadata.labels.hash(&mut hasher);
    pod.metadata.annotations.hash(&mut hasher);
    hasher.finish()
}

pub(crate) fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

impl Scheduler {
    /// A scheduler over `client` with `config`.
    pub fn new(client: Client, config: Config, options: ShellOptions) -> Self {
        let notifier = Notifier::new(client.clone(), "tessera-scheduler", &options.identity);
        let trust = match &options.seal_key {
            Some(key) => AllocationTrust::Sealed(key.clone()),
            None => AllocationTrust::Annotations,
        };
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(ClusterState::new(config.clone()).with_trust(trust)),
                bind_slots: Arc::new(Semaphore::new(options.bind_concurrency.max(1))),
                client,
                config,
                options,
                pending: Mutex::default(),
                allocated: Mutex::default(),
                recently_bound: Mutex::default(),
                node_errors: Mutex::default(),
                gates: Mutex::default(),
                distrust_warned: Mutex::default(),
                queue: SchedulingQueue::default(),
                metrics: SchedulerMetrics::new(),
                notifier,
                nodes_synced: AtomicBool::new(false),
                pods_synced: AtomicBool::new(false),
                lists_synced: Mutex::default(),
                preempting: Mutex::default(),
                synced: watch::channel(false).0,
            }),
        }
    }

    /// The metrics text for `/metrics`.
    pub fn metrics_text(&self) -> String {
        let (ready, parked) = self.shared.queue.depth();
        set_gauge(&self.shared.metrics.queue_depth, ready + parked);
        let allocated: Vec<(String, String, String)> =
            lock(&self.shared.allocated).values().cloned().collect();
        let state = lock(&self.shared.state);
        self.shared.metrics.render(&state, &allocated)
    }

    /// Whether the reflectors (nodes, pods and [`OTHER_LISTS`]) finished their initial list.
    pub fn is_synced(&self) -> bool {
        self.shared.nodes_synced.load(Ordering::Relaxed)
            && self.shared.pods_synced.load(Ordering::Relaxed)
            && {
                let lists = lock(&self.shared.lists_synced);
                OTHER_LISTS.iter().all(|l| lists.contains(l))
            }
    }

    /// Records that one of [`OTHER_LISTS`] finished its initial list.
    fn list_synced(&self, list: &'static str) {
        lock(&self.shared.lists_synced).insert(list);
        self.shared.synced.send_replace(self.is_synced());
    }

    /// A copy of the current cluster state (for tests and `inspect`).
    pub fn state_snapshot(&self) -> ClusterState {
        lock(&self.shared.state).clone()
    }

    /// The scheduling metrics.
    pub fn metrics(&self) -> &SchedulerMetrics {
        &self.shared.metrics
    }

    /// `/metrics`, `/healthz` and `/readyz`.
    pub fn router(&self) -> axum::Router {
        use axum::http::StatusCode;
        use axum::routing::get;
        let metrics = self.clone();
        let ready = self.clone();
        axum::Router::new()
            .route(
                "/metrics",
                get(move || {
                    let scheduler = metrics.clone();
                    async move {
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            scheduler.metrics_text(),
                        )
                    }
                }),
            )
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/readyz",
                get(move || {
                    let scheduler = ready.clone();
                    async move {
                        if scheduler.is_synced() {
                            (StatusCode::OK, "ok")
                        } else {
                            (
                                StatusCode::SERVICE_UNAVAILABLE,
                                "waiting for the initial node, pod, namespace, storage and PodDisruptionBudget lists",
                            )
                        }
                    }
                }),
            )
    }

    /// Runs reflectors, leader election and the decision loop until a
    /// watch ends.
    pub async fn run(self) -> Result<(), ShellError> {
        let (leading_tx, leading_rx) = watch::channel(self.shared.options.lease.is_none());
        if let Some(settings) = self.shared.options.lease.clone() {
            tokio::spawn(leader::run_election(
                self.shared.client.clone(),
                settings,
                leading_tx,
            ));
        }
        let nodes = tokio::spawn(self.clone().reflect_nodes());
        let pods = tokio::spawn(self.clone().reflect_pods());
        let namespaces = tokio::spawn(self.clone().reflect_namespaces());
        let storage = tokio::spawn(self.clone().reflect_storage());
        let budgets = tokio::spawn(self.clone().reflect_disruption_budgets());
        let decide = tokio::spawn(self.clone().decision_loop(leading_rx));
        let expiry = tokio::spawn(self.clone().expire_gates(Duration::from_secs(1)));
        tokio::select! {
            r = nodes => r.unwrap_or(Err(ShellError::WatchEnded("node"))),
            r = pods => r.unwrap_or(Err(ShellError::WatchEnded("pod"))),
            r = namespaces => r.unwrap_or(Err(ShellError::WatchEnded("namespace"))),
            r = storage => r.unwrap_or(Err(ShellError::WatchEnded("storage"))),
            r = budgets => r.unwrap_or(Err(ShellError::WatchEnded("poddisruptionbudget"))),
            _ = decide => Err(ShellError::WatchEnded("leadership")),
            _ = expiry => Err(ShellError::WatchEnded("bind gate expiry")),
        }
    }

    async fn reflect<K, S>(
        stream: S,
        mut on_apply: impl FnMut(&K),
        mut on_delete: impl FnMut(&K),
        mut on_synced: impl FnMut(),
        key_of: impl Fn(&K) -> String,
    ) -> Result<(), ShellError>
    where
        S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    {
        let mut stream = std::pin::pin!(stream);
        let mut known: HashMap<String, K> = HashMap::new();
        let mut relisted: Option<HashSet<String>> = None;
        let known_keys =
            |known: &mut HashMap<String, K>, key: String, object: Option<K>| match object {
                Some(o) => {
                    known.insert(key, o);
                }
                None => {
                    known.remove(&key);
                }
            };
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => relisted = Some(HashSet::new()),
                Ok(watcher::Event::InitApply(object)) => {
                    let key = key_of(&object);
                    on_apply(&object);
                    if let Some(seen) = relisted.as_mut() {
                        seen.insert(key.clone());
                    }
                    known_keys(&mut known, key, Some(object));
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(seen) = relisted.take() {
                        let gone: Vec<String> = known
                            .keys()
                            .filter(|k| !seen.contains(*k))
                            .cloned()
                            .collect();
                        for key in gone {
                            if let Some(object) = known.remove(&key) {
                                on_delete(&object);
                            }
                        }
                    }
                    on_synced();
                }
                Ok(watcher::Event::Apply(object)) => {
                    on_apply(&object);
                    known_keys(&mut known, key_of(&object), Some(object));
                }
                Ok(watcher::Event::Delete(object)) => {
                    on_delete(&object);
                    known_keys(&mut known, key_of(&object), None);
                }
                Err(error) => {
                    tracing::warn!(%error, "watch error; the watcher retries with backoff")
                }
            }
        }
        Ok(())
    }

    async fn reflect_nodes(self) -> Result<(), ShellError> {
        let api: Api<Node> = Api::all(self.shared.client.clone());
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        let apply = |node: &Node| self.node_changed(node);
        let delete = |node: &Node| {
            lock(&self.shared.state).remove_node(node.metadata.name.as_deref().unwrap_or(""));
        };
        let synced = || {
            self.shared.nodes_synced.store(true, Ordering::Relaxed);
            self.shared.synced.send_replace(self.is_synced());
        };
        Self::reflect(stream, apply, delete, synced, |n: &Node| {
            n.metadata.name.clone().unwrap_or_default()
        })
        .await?;
        Err(ShellError::WatchEnded("node"))
    }

    fn node_changed(&self, node: &Node) {
        let error = lock(&self.shared.state).upsert_node(node);
        let name = node.metadata.name.clone().unwrap_or_default();
        let mut errors = lock(&self.shared.node_errors);
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

    async fn reflect_pods(self) -> Result<(), ShellError> {
        let api: Api<Pod> = Api::all(self.shared.client.clone());
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        let apply = |pod: &Pod| self.pod_changed(pod);
        let delete = |pod: &Pod| self.pod_deleted(pod);
        let synced = || {
            self.shared.pods_synced.store(true, Ordering::Relaxed);
            self.shared.synced.send_replace(self.is_synced());
        };
        Self::reflect(stream, apply, delete, synced, pod_key).await?;
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
                let namespace = pod.metadata.namespace.clone().unwrap_or_default();
                let name = pod.metadata.name.clone().unwrap_or_default();
                lock(&self.shared.allocated).insert(key, (namespace, name, devices.clone()));
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

    async fn decision_loop(self, mut leading: watch::Receiver<bool>) {
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
                let message = format!("0/{} nodes are available: {why}", why.total_nodes);
                tracing::info!(pod = %key, %message, "pod does not fit; waiting for the cluster to change");
                self.shared.queue.park(&key, signature, true);
                self.preempt_for(&pod);
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
