//! The Kubernetes shell around the placement core. Reflectors keep the
//! [`ClusterState`] current from node, pod, namespace, storage,
//! PodDisruptionBudget and ResourceQuota watches; pending pods of ours
//! flow through the [`SchedulingQueue`]; the decision loop asks the core,
//! assumes the result at once (so the next decision already sees it) and
//! hands the bind to [`bind`]. One bind request carries the sealed
//! allocation annotations (the API server copies them onto the pod), so a
//! placed pod costs one API write; binds run concurrently across nodes, and
//! on one node at most one per shape is unacknowledged at a time
//! ([`node_gate`]), with no lock annotation; a failed bind rolls its
//! assumption back and retries.

mod adoption;
pub mod bind;
pub mod decide;
pub mod events;
pub mod http;
pub mod inputs;
pub mod leader;
mod liveness;
pub mod metrics;
mod namespaces;
pub mod node_gate;
mod preemption;
pub mod queue;
mod quotas;
pub mod seal_key;
pub mod volumes;
mod workloads;

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use tessera_api::allocation_seal::{AllocationTrust, SealKey};
use tessera_api::config::Config;
use tokio::sync::{watch, Semaphore};

use crate::core::node_liveness::HandshakeTracker;
use crate::core::ClusterState;
use events::Notifier;
use leader::LeaseSettings;
use metrics::SchedulerMetrics;
use queue::SchedulingQueue;

/// Lists besides nodes and pods that decisions wait for.
const OTHER_LISTS: [&str; 11] = [
    namespaces::NAMESPACES_LIST,
    preemption::BUDGETS_LIST,
    volumes::STORAGE_LISTS[0],
    volumes::STORAGE_LISTS[1],
    volumes::STORAGE_LISTS[2],
    quotas::QUOTAS_LIST,
    volumes::STORAGE_LISTS[3],
    workloads::WORKLOAD_LISTS[0],
    workloads::WORKLOAD_LISTS[1],
    workloads::WORKLOAD_LISTS[2],
    workloads::WORKLOAD_LISTS[3],
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
    allocated: Mutex<HashMap<String, metrics::BoundPod>>,
    recently_bound: Mutex<HashSet<String>>,
    node_errors: Mutex<HashMap<String, String>>,
    gates: Mutex<bind::Gates>,
    /// Pods already warned about (by UID) for allocations not believed.
    distrust_warned: Mutex<HashSet<String>>,
    /// Pods (by UID) whose adoption seal is being written.
    adopting: Mutex<HashSet<String>>,
    /// Whether this replica holds the lease (always, without election):
    /// only the leader posts Node Events, so replicas do not repeat them.
    leading: AtomicBool,
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
    /// When each node's agent handshake was last seen renewed.
    handshakes: Mutex<HandshakeTracker>,
    /// Each node's content apart from its handshake (see `liveness`).
    node_signatures: Mutex<HashMap<String, u64>>,
    synced: watch::Sender<bool>,
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
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
pub(crate) fn pod_signature(pod: &Pod) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&pod.spec)
        .unwrap_or_default()
        .hash(&mut hasher);
    pod.metadata.labels.hash(&mut hasher);
    pod.metadata.annotations.hash(&mut hasher);
    hasher.finish()
}

impl Scheduler {
    /// A scheduler over `client` with `config`.
    pub fn new(client: Client, config: Config, options: ShellOptions) -> Self {
        let notifier = Notifier::new(client.clone(), "tessera-scheduler", &options.identity);
        let trust = match &options.seal_key {
            Some(key) => AllocationTrust::Sealed(key.clone()),
            None => AllocationTrust::Annotations,
        };
        let metrics = SchedulerMetrics::new().with_legacy_names(config.metrics.legacy_names);
        let handshake_timeout = Duration::from_secs(config.liveness.handshake_timeout_seconds);
        let without_election = options.lease.is_none();
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
                adopting: Mutex::default(),
                leading: AtomicBool::new(without_election),
                queue: SchedulingQueue::default(),
                metrics,
                notifier,
                nodes_synced: AtomicBool::new(false),
                pods_synced: AtomicBool::new(false),
                lists_synced: Mutex::default(),
                preempting: Mutex::default(),
                handshakes: Mutex::new(HandshakeTracker::new(handshake_timeout)),
                node_signatures: Mutex::default(),
                synced: watch::channel(false).0,
            }),
        }
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
        let mirrored = self.clone();
        let verdict = leading_rx.clone();
        tokio::spawn(async move { leader::mirror(verdict, &mirrored.shared.leading).await });
        let nodes = tokio::spawn(self.clone().reflect_nodes());
        let pods = tokio::spawn(self.clone().reflect_pods());
        let namespaces = tokio::spawn(self.clone().reflect_namespaces());
        let storage = tokio::spawn(self.clone().reflect_storage());
        let budgets = tokio::spawn(self.clone().reflect_disruption_budgets());
        let quotas = tokio::spawn(self.clone().reflect_resource_quotas());
        let workloads = tokio::spawn(self.clone().reflect_workloads());
        let decide = tokio::spawn(self.clone().decision_loop(leading_rx));
        let expiry = tokio::spawn(self.clone().expire_gates(Duration::from_secs(1)));
        let liveness = tokio::spawn(self.clone().watch_handshakes());
        tokio::select! {
            r = nodes => r.unwrap_or(Err(ShellError::WatchEnded("node"))),
            r = pods => r.unwrap_or(Err(ShellError::WatchEnded("pod"))),
            r = namespaces => r.unwrap_or(Err(ShellError::WatchEnded("namespace"))),
            r = storage => r.unwrap_or(Err(ShellError::WatchEnded("storage"))),
            r = budgets => r.unwrap_or(Err(ShellError::WatchEnded("poddisruptionbudget"))),
            r = quotas => r.unwrap_or(Err(ShellError::WatchEnded("resourcequota"))),
            r = workloads => r.unwrap_or(Err(ShellError::WatchEnded("workload selectors"))),
            _ = decide => Err(ShellError::WatchEnded("leadership")),
            _ = expiry => Err(ShellError::WatchEnded("bind gate expiry")),
            _ = liveness => Err(ShellError::WatchEnded("node handshake watch")),
        }
    }
}
