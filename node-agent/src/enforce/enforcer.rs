//! The enforcement loop. [`Enforcer::tick`] is one blocking round (NVML
//! queries, `/proc` reads, kills), run on tokio's blocking pool so the
//! async workers never wait on the driver; [`run`] keeps the node's pods
//! current with a reflector (field selector `spec.nodeName=<node>`, one
//! watch instead of a list per tick), ticks every period once the first
//! list is in, and turns each action into a Warning Event on the pod (posted
//! off the loop, so a slow API server never delays the next tick), a
//! count in `tessera_enforcement_actions_total` and a log line.
//!
//! Repeats: a finding is an incident from the first tick it is seen until
//! a tick where it is not. In report mode (and for host processes) an
//! incident is reported once, when it starts; in kill mode every kill is
//! an action. Killed pids are left out of the sums for
//! [`KILLED_SETTLE`], since the driver may list a dying process for a
//! moment after SIGKILL while it frees its memory.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::Api;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tessera_api::config::{Enforcement, EnforcementMode};

use super::attribution::{NodeContainers, TrustedAllocations};
use super::cgroup::{read_owner, ProcessOwner};
use super::decide::{decide_card, Breach, CardProcess, Finding};
use super::kill::{kill_if_still_owned, KillError};
use crate::gpu::{GpuBackend, GpuInfo};
use crate::k8s::events::EventPoster;

/// How long a killed process is left out of the sums.
pub const KILLED_SETTLE: Duration = Duration::from_secs(10);

/// The Event action of enforcement Events.
pub const EVENT_ACTION: &str = "Enforce";

const MIB: u64 = 1 << 20;

/// What enforcement does and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnforcementSettings {
    /// Kill, report or off.
    pub mode: EnforcementMode,
    /// Bytes a subject may hold above its cap before the agent acts.
    pub margin_bytes: u64,
    /// Time between two rounds.
    pub period: Duration,
    /// Namespaces left alone.
    pub exempt_namespaces: Vec<String>,
    /// Where processes' `<pid>/cgroup` files are (`/proc` on a node).
    pub proc_root: PathBuf,
}

impl EnforcementSettings {
    /// The settings of the config file's `enforcement` section, reading
    /// processes under `proc_root`.
    pub fn from_config(config: &Enforcement, proc_root: PathBuf) -> Self {
        Self {
            mode: config.mode,
            margin_bytes: config.margin_mib.saturating_mul(MIB),
            period: Duration::from_millis(config.period_ms),
            exempt_namespaces: config.exempt_namespaces.clone(),
            proc_root,
        }
    }
}

/// Labels of `tessera_enforcement_actions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    /// Pod namespace (empty for host processes and unknown pods).
    pub namespace: String,
    /// Pod name (empty for host processes and unknown pods).
    pub pod: String,
    /// Container name (empty when unknown).
    pub container: String,
    /// Card UUID.
    pub device_uuid: String,
    /// `kill` or `report`.
    pub action: String,
}

/// `tessera_enforcement_actions_total`, shared by the loop and `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct EnforcementCounters {
    actions: Family<ActionLabels, Counter>,
}

impl EnforcementCounters {
    /// Registers the family in the agent's registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tessera_enforcement_actions",
            "Enforcement actions on containers (and host processes) holding more GPU memory than their cap, by the driver's count",
            self.actions.clone(),
        );
    }

    /// Counts one action.
    pub fn count(&self, labels: &ActionLabels) {
        self.actions.get_or_create(labels).inc();
    }

    /// The count for `labels` (0 when never counted).
    pub fn get(&self, labels: &ActionLabels) -> u64 {
        self.actions.get(labels).map_or(0, |c| c.get())
    }
}

/// What was done about a finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// These processes were sent SIGKILL.
    Killed {
        /// The pids.
        pids: Vec<u32>,
    },
    /// Reported only.
    Reported,
}

impl Taken {
    /// The metric's `action` label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Killed { .. } => "kill",
            Self::Reported => "report",
        }
    }
}

/// One action of a round.
#[derive(Debug, Clone)]
pub struct Action {
    /// What was found.
    pub finding: Finding,
    /// What was done.
    pub taken: Taken,
    /// The pod, when the agent knows it (the Event goes there).
    pub pod: Option<Arc<Pod>>,
}

impl Action {
    /// The metric labels of this action.
    pub fn labels(&self) -> ActionLabels {
        ActionLabels {
            namespace: self.finding.subject.namespace.clone(),
            pod: self.finding.subject.pod.clone(),
            container: self.finding.subject.container.clone(),
            device_uuid: self.finding.card_uuid.clone(),
            action: self.taken.label().to_owned(),
        }
    }

    /// The Event note / log message: who, what it holds against what cap,
    /// and what was done.
    pub fn note(&self) -> String {
        let f = &self.finding;
        let who = match (f.breach, f.subject.container.is_empty()) {
            (Breach::HostProcess, _) => "host processes outside every pod".to_owned(),
            (_, true) if f.subject.pod.is_empty() => format!(
                "processes of pod UID {} (not among this node's pods)",
                f.subject.pod_uid
            ),
            (_, true) => "processes of this pod outside every allocated container".to_owned(),
            (_, false) => format!("container `{}`", f.subject.container),
        };
        let holds = format!(
            "{} MiB on {} by the driver's count",
            f.used_bytes / MIB,
            f.card_uuid
        );
        let against = match f.breach {
            Breach::OverCap { cap_bytes } => format!("over its cap of {} MiB", cap_bytes / MIB),
            Breach::Unallocated => "without an allocation on that card".to_owned(),
            Breach::HostProcess => "which the agent reports but never kills".to_owned(),
        };
        let pids = |pids: &[u32]| {
            pids.iter()
                .map(|pid| {
                    let used = f
                        .processes
                        .iter()
                        .find(|(p, _)| p == pid)
                        .map_or(0, |(_, u)| u / MIB);
                    format!("{pid} ({used} MiB)")
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let done = match &self.taken {
            Taken::Killed { pids: killed } => format!("killed pid {}", pids(killed)),
            Taken::Reported => {
                let all: Vec<u32> = f.processes.iter().map(|(p, _)| *p).collect();
                format!("reported only; pids {}", pids(&all))
            }
        };
        format!("{who} held {holds}, {against}: {done}")
    }
}

/// What one round saw and did.
#[derive(Debug, Clone, Default)]
pub struct TickReport {
    /// Processes listed by the driver over all cards.
    pub processes_seen: usize,
    /// Actions taken.
    pub actions: Vec<Action>,
}

/// Identity of an incident.
type IncidentKey = (String, super::decide::Subject, Breach);

/// The blocking side of enforcement and its memory between rounds.
#[derive(Debug)]
pub struct Enforcer {
    backend: Arc<dyn GpuBackend>,
    cards: Arc<[GpuInfo]>,
    settings: EnforcementSettings,
    trusted: Arc<dyn TrustedAllocations>,
    unknown_since: HashMap<(u32, ProcessOwner), Instant>,
    killed: HashMap<(u32, ProcessOwner), Instant>,
    open_incidents: HashSet<IncidentKey>,
    unreadable_cards: HashSet<String>,
    owner_cache: HashMap<u32, ProcessOwner>,
    index: Option<(u64, Arc<NodeContainers>)>,
}

impl Enforcer {
    /// An enforcer over `cards`, trusting the allocations `trusted` vouches for.
    pub fn new(
        backend: Arc<dyn GpuBackend>,
        cards: Arc<[GpuInfo]>,
        settings: EnforcementSettings,
        trusted: Arc<dyn TrustedAllocations>,
    ) -> Self {
        Self {
            backend,
            cards,
            settings,
            trusted,
            unknown_since: HashMap::new(),
            killed: HashMap::new(),
            open_incidents: HashSet::new(),
            unreadable_cards: HashSet::new(),
            owner_cache: HashMap::new(),
            index: None,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &EnforcementSettings {
        &self.settings
    }

    /// One round over every card, with the node's current `pods`. Blocking.
    pub fn tick(&mut self, pods: &[Arc<Pod>], now: Instant) -> TickReport {
        let containers = self.containers(pods);
        self.killed
            .retain(|_, at| now.duration_since(*at) < KILLED_SETTLE);
        let mut report = TickReport::default();
        let mut owners: HashMap<u32, Option<ProcessOwner>> = HashMap::new();
        let mut seen_unknown = HashSet::new();
        let mut incidents = HashSet::new();
        let cards = Arc::clone(&self.cards);
        for card in cards.iter() {
            let listed = match self.backend.processes(card) {
                Ok(listed) => {
                    self.unreadable_cards.remove(&card.uuid);
                    listed
                }
                Err(e) => {
                    if self.unreadable_cards.insert(card.uuid.clone()) {
                        tracing::warn!(uuid = %card.uuid, error = %e, "cannot list the processes on a GPU; its caps are not enforced until it answers again");
                    }
                    continue;
                }
            };
            report.processes_seen += listed.len();
            let mut processes = Vec::with_capacity(listed.len());
            for process in listed {
                let owner = owners
                    .entry(process.pid)
                    .or_insert_with(|| self.owner_of(process.pid));
                let Some(owner) = owner.as_ref() else {
                    continue; // exited since the driver listed it
                };
                let key = (process.pid, owner.clone());
                if self.killed.contains_key(&key) {
                    continue;
                }
                let unknown_for = if containers.knows(owner) {
                    None
                } else {
                    let since = *self.unknown_since.entry(key.clone()).or_insert(now);
                    seen_unknown.insert(key);
                    Some(now.duration_since(since))
                };
                processes.push(CardProcess {
                    pid: process.pid,
                    used_bytes: process.used_bytes.unwrap_or(0),
                    attribution: containers.attribute(owner, &card.uuid, unknown_for),
                });
            }
            for finding in decide_card(&card.uuid, &processes, self.settings.margin_bytes) {
                let key = (
                    finding.card_uuid.clone(),
                    finding.subject.clone(),
                    finding.breach,
                );
                let new = !self.open_incidents.contains(&key);
                incidents.insert(key);
                let pod = containers
                    .pod(&finding.subject.pod_uid)
                    .map(|entry| Arc::clone(&entry.pod));
                let killing =
                    self.settings.mode == EnforcementMode::Kill && !finding.to_kill.is_empty();
                let taken = match self.kill_if_asked(killing, &finding, &owners, now, new) {
                    KillOutcome::Killed(pids) => Taken::Killed { pids },
                    // The driver listed processes that have exited since.
                    KillOutcome::AllGone => continue,
                    KillOutcome::NotKilled if new => Taken::Reported,
                    KillOutcome::NotKilled => continue,
                };
                report.actions.push(Action {
                    finding,
                    taken,
                    pod,
                });
            }
        }
        self.open_incidents = incidents;
        self.owner_cache = owners
            .into_iter()
            .filter_map(|(pid, owner)| Some((pid, owner?)))
            .collect();
        self.unknown_since
            .retain(|key, _| seen_unknown.contains(key));
        report
    }

    /// The pod index for `pods`, rebuilt only when a pod changed (same
    /// UIDs and resourceVersions as last round: the previous index).
    fn containers(&mut self, pods: &[Arc<Pod>]) -> Arc<NodeContainers> {
        let fingerprint = pods_fingerprint(pods);
        if let Some((seen, index)) = &self.index {
            if *seen == fingerprint {
                return Arc::clone(index);
            }
        }
        let index = Arc::new(NodeContainers::new(
            pods,
            self.trusted.as_ref(),
            &self.settings.exempt_namespaces,
        ));
        self.index = Some((fingerprint, Arc::clone(&index)));
        index
    }

    /// The owner of `pid`: from last round when the driver listed it then
    /// and it still exists (a process never leaves its container's cgroup,
    /// and a pid reused between two rounds would need the old process to
    /// exit and a new one to take its pid and open a context on a card
    /// within one period; a kill re-reads the cgroup anyway), otherwise
    /// read from its cgroup file.
    fn owner_of(&self, pid: u32) -> Option<ProcessOwner> {
        let dir = self.settings.proc_root.join(pid.to_string());
        match self.owner_cache.get(&pid) {
            Some(owner) if dir.exists() => Some(owner.clone()),
            _ => read_owner(&self.settings.proc_root, pid),
        }
    }

    /// Kills the finding's chosen processes when `killing`.
    fn kill_if_asked(
        &mut self,
        killing: bool,
        finding: &Finding,
        owners: &HashMap<u32, Option<ProcessOwner>>,
        now: Instant,
        new: bool,
    ) -> KillOutcome {
        if !killing {
            return KillOutcome::NotKilled;
        }
        let mut killed = Vec::new();
        let mut gone = 0;
        for &pid in &finding.to_kill {
            let Some(Some(owner)) = owners.get(&pid) else {
                continue;
            };
            match kill_if_still_owned(&self.settings.proc_root, pid, owner) {
                Ok(()) => {
                    self.killed.insert((pid, owner.clone()), now);
                    killed.push(pid);
                }
                Err(KillError::Gone { .. }) => {
                    self.killed.insert((pid, owner.clone()), now);
                    gone += 1;
                }
                Err(e @ (KillError::Reused { .. } | KillError::Protected { .. })) => {
                    tracing::debug!(error = %e, "not killed");
                }
                Err(e @ KillError::Signal { .. }) => {
                    if new {
                        tracing::warn!(error = %e, "enforcement could not kill a process over its cap; reporting it instead");
                    }
                }
            }
        }
        if !killed.is_empty() {
            KillOutcome::Killed(killed)
        } else if gone == finding.to_kill.len() {
            KillOutcome::AllGone
        } else {
            KillOutcome::NotKilled
        }
    }
}

/// Identifies a set of pod versions, whatever their order: the count and
/// the sum of a hash of each pod's UID and resourceVersion.
fn pods_fingerprint(pods: &[Arc<Pod>]) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    let hasher = BuildHasherDefault::<DefaultHasher>::default();
    pods.iter().fold(pods.len() as u64, |sum, pod| {
        sum.wrapping_add(hasher.hash_one((&pod.metadata.uid, &pod.metadata.resource_version)))
    })
}

/// What came of a finding's kills.
enum KillOutcome {
    /// These were sent SIGKILL.
    Killed(Vec<u32>),
    /// Every process to kill had exited already.
    AllGone,
    /// Nothing was killed (report mode, a host process, or the kernel refused).
    NotKilled,
}

/// Runs enforcement for `node` until the task is dropped: a reflector over
/// the node's pods, then a round every period on the blocking pool.
pub async fn run(
    enforcer: Enforcer,
    client: kube::Client,
    node: String,
    events: EventPoster,
    counters: EnforcementCounters,
) {
    let (store, writer) = reflector::store();
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let driver = watcher(Api::<Pod>::all(client), config)
        .default_backoff()
        .reflect(writer)
        .for_each(|event| async move {
            if let Err(error) = event {
                tracing::warn!(%error, "enforcement's pod watch failed; retrying with backoff (needs list and watch on pods)");
            }
        });
    let driver = tokio::spawn(driver);
    run_with_store(enforcer, &store, &events, &counters).await;
    driver.abort();
}

async fn run_with_store(
    enforcer: Enforcer,
    store: &Store<Pod>,
    events: &EventPoster,
    counters: &EnforcementCounters,
) {
    if store.wait_until_ready().await.is_err() {
        return;
    }
    tracing::info!(mode = ?enforcer.settings.mode, margin_mib = enforcer.settings.margin_bytes / MIB, period_ms = enforcer.settings.period.as_millis(), "GPU memory enforcement running");
    let mut ticker = tokio::time::interval(enforcer.settings.period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Moved onto the blocking pool for each round and back.
    let mut owned = Some(enforcer);
    loop {
        ticker.tick().await;
        let pods = store.state();
        let Some(mut current) = owned.take() else {
            return;
        };
        let round = tokio::task::spawn_blocking(move || {
            let report = current.tick(&pods, Instant::now());
            (current, report)
        })
        .await;
        let report = match round {
            Ok((back, report)) => {
                owned = Some(back);
                report
            }
            Err(e) => {
                tracing::error!(error = %e, "an enforcement round panicked; enforcement stops");
                return;
            }
        };
        for action in report.actions {
            publish(action, events, counters);
        }
    }
}

/// Counts, logs and posts the Event of one action.
fn publish(action: Action, events: &EventPoster, counters: &EnforcementCounters) {
    counters.count(&action.labels());
    let note = action.note();
    let f = &action.finding;
    tracing::warn!(
        namespace = %f.subject.namespace,
        pod = %f.subject.pod,
        container = %f.subject.container,
        device_uuid = %f.card_uuid,
        action = action.taken.label(),
        used_mib = f.used_bytes / MIB,
        cap_mib = f.breach.cap_bytes() / MIB,
        "{note}"
    );
    if let Some(pod) = action.pod {
        let events = events.clone();
        let reason = f.breach.reason();
        tokio::spawn(async move {
            events.warn_for(&pod, reason, EVENT_ACTION, &note).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enforce::attribution::{AnnotatedAllocations, UNKNOWN_GRACE};
    use crate::gpu::fake::FakeGpus;
    use crate::gpu::GpuProcess;
    use serde_json::json;

    const UID: &str = "0b7c2d52-7f3e-4a8b-9c1d-2e3f4a5b6c7d";
    const ID: &str = "aaaaaaaaaaaa1111";

    struct Setup {
        enforcer: Enforcer,
        gpus: FakeGpus,
        card: String,
        proc_root: tempfile::TempDir,
    }

    fn setup(mode: EnforcementMode) -> Setup {
        let gpus = FakeGpus::parse("1x A 100000", "n").expect("fake");
        let cards: Arc<[GpuInfo]> = gpus.discover().expect("cards").into();
        let proc_root = tempfile::tempdir().expect("tempdir");
        let settings = EnforcementSettings::from_config(
            &Enforcement {
                mode,
                ..Enforcement::default()
            },
            proc_root.path().to_owned(),
        );
        Setup {
            enforcer: Enforcer::new(
                Arc::new(gpus.clone()),
                Arc::clone(&cards),
                settings,
                Arc::new(AnnotatedAllocations),
            ),
            card: cards[0].uuid.clone(),
            gpus,
            proc_root,
        }
    }

    fn pod(card: &str, container_id: Option<&str>, rv: &str) -> Arc<Pod> {
        let statuses: Vec<_> = container_id
            .map(|id| json!({"name": "main", "containerID": format!("containerd://{id}"), "image": "x", "imageID": "", "ready": true, "restartCount": 0}))
            .into_iter()
            .collect();
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": "p", "namespace": "ns", "uid": UID, "resourceVersion": rv, "annotations": {
                    "hami.io/vgpu-devices-allocated": format!("{card},NVIDIA,1000,30:;")
                }},
                "spec": {"containers": [{"name": "main", "image": "x"}]},
                "status": {"containerStatuses": statuses}
            }))
            .expect("pod"),
        )
    }

    fn place(setup: &Setup, pid: u32, mib: u64) {
        let dir = setup.proc_root.path().join(pid.to_string());
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("cgroup"), format!("0::/kubepods/pod{UID}/{ID}\n"))
            .expect("cgroup");
        setup.gpus.control().set_processes(
            &setup.card,
            vec![GpuProcess {
                pid,
                used_bytes: Some(mib * MIB),
            }],
        );
    }

    #[test]
    fn an_incident_is_reported_once_until_it_clears() {
        let mut s = setup(EnforcementMode::Report);
        let pods = [pod(&s.card, Some(ID), "1")];
        place(&s, 5_000_001, 2000);
        let t0 = Instant::now();
        let first = s.enforcer.tick(&pods, t0);
        assert_eq!(first.actions.len(), 1, "{first:?}");
        assert_eq!(first.actions[0].taken, Taken::Reported);
        assert_eq!(first.actions[0].labels().action, "report");
        assert!(first.actions[0]
            .note()
            .contains("reported only; pids 5000001 (2000 MiB)"));
        assert!(
            s.enforcer.tick(&pods, t0).actions.is_empty(),
            "same incident"
        );
        place(&s, 5_000_001, 900);
        assert!(
            s.enforcer.tick(&pods, t0).actions.is_empty(),
            "under the cap"
        );
        place(&s, 5_000_001, 2000);
        assert_eq!(
            s.enforcer.tick(&pods, t0).actions.len(),
            1,
            "a new incident"
        );
    }

    #[test]
    fn a_container_not_in_the_status_yet_is_judged_after_the_grace_period() {
        let mut s = setup(EnforcementMode::Report);
        let starting = [pod(&s.card, None, "1")];
        place(&s, 5_000_002, 2000);
        let t0 = Instant::now();
        assert!(s.enforcer.tick(&starting, t0).actions.is_empty());
        let later = s.enforcer.tick(&starting, t0 + UNKNOWN_GRACE);
        assert_eq!(later.actions.len(), 1, "{later:?}");
        assert_eq!(later.actions[0].finding.breach, Breach::Unallocated);
        // Once the status names it, it is judged against its own cap.
        let mut s = setup(EnforcementMode::Report);
        place(&s, 5_000_002, 2000);
        assert!(s.enforcer.tick(&starting, t0).actions.is_empty());
        let started = [pod(&s.card, Some(ID), "2")];
        let judged = s.enforcer.tick(&started, t0);
        assert_eq!(
            judged.actions[0].finding.breach,
            Breach::OverCap {
                cap_bytes: 1000 * MIB
            }
        );
    }

    #[test]
    fn unreadable_cards_and_exited_processes_are_skipped() {
        let mut s = setup(EnforcementMode::Kill);
        let pods = [pod(&s.card, Some(ID), "1")];
        // Listed by the driver, but no /proc entry: exited.
        s.gpus.control().set_processes(
            &s.card,
            vec![GpuProcess {
                pid: 5_000_003,
                used_bytes: Some(5000 * MIB),
            }],
        );
        let report = s.enforcer.tick(&pods, Instant::now());
        assert_eq!(report.processes_seen, 1);
        assert!(report.actions.is_empty());
        place(&s, 5_000_003, 5000);
        s.gpus.control().set_processes_readable(&s.card, false);
        let report = s.enforcer.tick(&pods, Instant::now());
        assert_eq!(report.processes_seen, 0);
        assert!(report.actions.is_empty());
        // Readable again: the pid (5000003 is above the kernel's largest pid_max)
        // is listed and judged, but killing finds it gone: no action.
        s.gpus.control().set_processes_readable(&s.card, true);
        let report = s.enforcer.tick(&pods, Instant::now());
        assert_eq!(report.processes_seen, 1);
        assert!(report.actions.is_empty(), "{report:?}");
    }
}
