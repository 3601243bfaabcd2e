//! The scheduler's picture of the cluster: every node (facts, plain
//! resources, cards) and every pod's charge on them. Charges come from two
//! places: pods observed with an allocation (from their annotations, so a
//! restarted scheduler rebuilds the same picture) and assumptions this
//! scheduler made before the API server confirmed the bind.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use tessera_api::allocation::ContainerDevice;
use tessera_api::allocation_seal::{AllocationTrust, SealError};
use tessera_api::config::Config;
use tessera_api::inventory::decode_inventory;
use tessera_api::names::{NODE_PAIR_SCORE_ANNOTATION, NODE_REGISTER_ANNOTATION};
use tessera_api::pair_scores::decode_pair_scores;
use tessera_api::pod_allocation::PodAllocation;

use super::cards::CardState;
use super::node_liveness::NodeLiveness;
use super::node_predicates::NodeFacts;
use super::pod_info::{NamespaceLabels, PodInfo, SharedPodInfo};
use super::preemption::Priorities;
use super::requirements::pod_key;
use super::resources::ResourceAmounts;
use super::volumes::Storage;

/// Gives each card its link scores toward the node's cards from the
/// `hami.io/node-nvidia-score` value; on a value that does not decode the
/// cards keep none and the error says why.
fn attach_link_scores(cards: &mut [CardState], value: &str) -> Result<(), String> {
    let decoded = decode_pair_scores(value).map_err(|e| {
        format!(
            "{NODE_PAIR_SCORE_ANNOTATION} ignored, the node is scheduled without link scores: {e}"
        )
    })?;
    let uuids: Vec<String> = cards.iter().map(|c| c.device.id.clone()).collect();
    for card in cards.iter_mut() {
        let Some(entry) = decoded.iter().find(|e| e.uuid == card.device.id) else {
            continue;
        };
        let row: Vec<u32> = uuids
            .iter()
            .map(|other| entry.scores.get(other).copied().unwrap_or(0))
            .collect();
        card.set_link_scores(row.into());
    }
    Ok(())
}

/// One node as the core sees it.
#[derive(Debug, Clone)]
pub struct NodeState {
    /// Readiness, labels, taints.
    pub facts: NodeFacts,
    /// `status.allocatable`.
    pub allocatable: ResourceAmounts,
    /// Sum of the requests of pods charged here.
    pub requested: ResourceAmounts,
    /// Cards from the inventory annotation, with charges.
    pub cards: Vec<CardState>,
    /// Set when the inventory annotation did not decode.
    pub inventory_error: Option<String>,
    /// Set when the link score annotation (`hami.io/node-nvidia-score`) did
    /// not decode: the node is still scheduled, without link scores.
    pub pair_scores_error: Option<String>,
    /// Sum of the cards' fullness (kept current with the charges), the base
    /// the node score is computed from.
    pub fullness_sum: f64,
    /// Whether its agent is alive and kubelet's GPU devices cover a pod.
    pub liveness: NodeLiveness,
    pods: BTreeSet<String>,
    /// What the pods charged here show other pods' predicates.
    residents: BTreeMap<String, SharedPodInfo>,
}

impl NodeState {
    /// The node as it would be without the given pods (preemption's what-if).
    pub(crate) fn without(&self, pods: &[(&str, &PodCharge)]) -> NodeState {
        let mut node = self.clone();
        for (key, charge) in pods {
            apply(&mut node, charge, false);
            node.pods.remove(*key);
            node.residents.remove(*key);
        }
        node
    }

    /// Charges a pod here as if placed (the room a nominated pod waits for).
    pub(crate) fn add_charge(&mut self, key: &str, charge: &PodCharge) {
        apply(self, charge, true);
        self.pods.insert(key.to_owned());
        if let Some(info) = &charge.info {
            self.residents.insert(key.to_owned(), info.clone());
        }
    }

    /// Keys of the pods charged here.
    pub(crate) fn pod_keys(&self) -> impl Iterator<Item = &String> {
        self.pods.iter()
    }

    /// The pods charged to this node, as other pods' predicates see them.
    pub fn residents(&self) -> impl Iterator<Item = &PodInfo> + Clone {
        self.residents.values().map(|p| &**p)
    }
}

/// A card share charged to a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardCharge {
    /// Card UUID.
    pub uuid: String,
    /// MiB.
    pub memory_mib: u64,
    /// Cores.
    pub cores: u32,
    /// Containers of the pod on the card.
    pub slots: u32,
}

/// Everything one pod takes on its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCharge {
    /// Node name.
    pub node: String,
    /// Plain resources.
    pub resources: ResourceAmounts,
    /// Per-card charges (peak of init containers vs sum of app containers).
    pub cards: Vec<CardCharge>,
    /// True while it is only this scheduler's assumption (not yet observed bound).
    pub assumed: bool,
    /// Labels, ports and affinity terms the pod shows other pods.
    pub info: Option<SharedPodInfo>,
    /// PVs this placement binds to its claims (held until observed bound).
    pub volumes: Vec<String>,
}

impl CardCharge {
    fn empty(uuid: &str) -> Self {
        Self {
            uuid: uuid.to_owned(),
            memory_mib: 0,
            cores: 0,
            slots: 0,
        }
    }
}

impl PodCharge {
    /// Builds a charge from per-container devices, init containers first.
    pub fn from_devices(
        node: String,
        resources: ResourceAmounts,
        init: &[Vec<ContainerDevice>],
        app: &[Vec<ContainerDevice>],
        assumed: bool,
    ) -> Self {
        let mut per_card: BTreeMap<&str, CardCharge> = BTreeMap::new();
        for device in app.iter().flatten() {
            let charge = per_card
                .entry(device.uuid.as_str())
                .or_insert_with(|| CardCharge::empty(&device.uuid));
            charge.memory_mib += device.memory_mib;
            charge.cores += device.cores;
            charge.slots += 1;
        }
        // Init containers run one at a time before the app containers: the
        // card carries the larger of either, not their sum.
        for device in init.iter().flatten() {
            let charge = per_card
                .entry(device.uuid.as_str())
                .or_insert_with(|| CardCharge::empty(&device.uuid));
            charge.memory_mib = charge.memory_mib.max(device.memory_mib);
            charge.cores = charge.cores.max(device.cores);
            charge.slots = charge.slots.max(1);
        }
        Self {
            node,
            resources,
            cards: per_card.into_values().collect(),
            assumed,
            info: None,
            volumes: Vec::new(),
        }
    }

    /// The same charge carrying what the pod shows other pods.
    pub fn with_info(mut self, info: SharedPodInfo) -> Self {
        self.info = Some(info);
        self
    }
}

/// The cluster picture. Decisions read it; reflector events and
/// assumptions update it.
#[derive(Debug, Clone)]
pub struct ClusterState {
    pub(crate) config: Config,
    pub(crate) nodes: BTreeMap<String, NodeState>,
    charges: HashMap<String, PodCharge>,
    /// Lowercased card types seen in inventories; cards refer to them by index.
    pub(crate) card_types: Vec<String>,
    /// Which allocation annotations are believed.
    trust: AllocationTrust,
    /// Namespace labels, for affinity terms' `namespaceSelector`.
    pub(crate) namespace_labels: NamespaceLabels,
    /// Charged pods with inter-pod affinity terms (they constrain and
    /// score every later pod).
    affinity_pods: BTreeMap<String, SharedPodInfo>,
    /// How many of them have required anti-affinity terms.
    pub(crate) required_anti_affinity_pods: usize,
    /// How many of them have terms that score other pods (required
    /// affinity, preferred affinity or anti-affinity).
    pub(crate) scoring_affinity_pods: usize,
    /// PVs, claims and storage classes.
    pub(crate) storage: Storage,
    /// PriorityClasses and PodDisruptionBudgets (preemption).
    pub(crate) priorities: Priorities,
    /// Nodes whose agent stopped renewing its handshake (see
    /// `node_liveness`); the shell keeps this current.
    stale_agents: BTreeSet<String>,
    /// The GPU count resource name, shared by every node's liveness.
    gpu_resource: Arc<str>,
    /// Namespace GPU quotas and what each namespace's pods take.
    pub(crate) quotas: super::quota::QuotaBook,
    /// Workload selectors for cluster-default topology spread.
    pub(crate) workload_selectors: super::default_spread::WorkloadSelectors,
}

impl ClusterState {
    /// An empty cluster.
    pub fn new(config: Config) -> Self {
        Self {
            gpu_resource: Arc::from(config.resources.gpu.as_str()),
            stale_agents: BTreeSet::new(),
            config,
            nodes: BTreeMap::new(),
            charges: HashMap::new(),
            card_types: Vec::new(),
            trust: AllocationTrust::default(),
            namespace_labels: NamespaceLabels::new(),
            affinity_pods: BTreeMap::new(),
            required_anti_affinity_pods: 0,
            scoring_affinity_pods: 0,
            storage: Storage::default(),
            priorities: Priorities::default(),
            quotas: super::quota::QuotaBook::default(),
            workload_selectors: Default::default(),
        }
    }

    /// The same state believing only the allocations `trust` accepts (a
    /// cluster's scheduler believes only sealed ones).
    pub fn with_trust(mut self, trust: AllocationTrust) -> Self {
        self.trust = trust;
        self
    }

    /// Which allocations this state believes.
    pub fn trust(&self) -> &AllocationTrust {
        &self.trust
    }

    /// The config in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Nodes by name.
    pub fn nodes(&self) -> &BTreeMap<String, NodeState> {
        &self.nodes
    }

    /// The charge of a pod, if any.
    pub fn charge(&self, key: &str) -> Option<&PodCharge> {
        self.charges.get(key)
    }

    /// Records a namespace's labels (for `namespaceSelector`).
    pub fn upsert_namespace(&mut self, namespace: &Namespace) {
        if let Some(name) = &namespace.metadata.name {
            let labels = namespace.metadata.labels.clone().unwrap_or_default();
            self.namespace_labels.insert(name.clone(), labels);
        }
    }

    /// Forgets a namespace.
    pub fn remove_namespace(&mut self, name: &str) {
        self.namespace_labels.remove(name);
    }

    /// PVs, claims and storage classes.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// PVs, claims and storage classes, to update from watches.
    pub fn storage_mut(&mut self) -> &mut Storage {
        &mut self.storage
    }

    /// Charged pods with inter-pod affinity terms, with their nodes.
    pub(crate) fn pods_with_affinity_terms(&self) -> impl Iterator<Item = (&PodInfo, &NodeState)> {
        self.affinity_pods.iter().filter_map(|(key, info)| {
            let node = self.nodes.get(&self.charges.get(key)?.node)?;
            Some((&**info, node))
        })
    }

    /// Adds or refreshes a node. Returns the inventory error, if its
    /// annotation is corrupt (the node then offers no cards).
    pub fn upsert_node(&mut self, node: &Node) -> Option<String> {
        let facts = NodeFacts::from_node(node);
        let name = facts.name.clone();
        let annotation = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(NODE_REGISTER_ANNOTATION));
        let (cards, inventory_error) = match annotation.map(|a| decode_inventory(a)) {
            None => (Vec::new(), None),
            Some(Ok(devices)) => (
                devices
                    .into_iter()
                    .map(|device| {
                        let type_id = self.card_type_id(&device.device_type);
                        CardState::new(device, type_id)
                    })
                    .collect(),
                None,
            ),
            Some(Err(err)) => (Vec::new(), Some(err.to_string())),
        };
        let mut cards = cards;
        let pair_scores_error = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(NODE_PAIR_SCORE_ANNOTATION))
            .and_then(|value| attach_link_scores(&mut cards, value).err());
        let pods = match self.nodes.remove(&name) {
            Some(previous) => previous.pods,
            None => self
                .charges
                .iter()
                .filter(|(_, c)| c.node == name)
                .map(|(k, _)| k.clone())
                .collect(),
        };
        let mut state = NodeState {
            facts,
            allocatable: ResourceAmounts::node_allocatable(node, &self.config.resources),
            requested: ResourceAmounts::default(),
            cards,
            inventory_error: inventory_error.clone(),
            pair_scores_error,
            fullness_sum: 0.0,
            liveness: self.node_liveness(&name),
            pods,
            residents: BTreeMap::new(),
        };
        let charges: Vec<(String, &PodCharge)> = state
            .pods
            .iter()
            .filter_map(|k| Some((k.clone(), self.charges.get(k)?)))
            .collect();
        let mut residents = BTreeMap::new();
        for (key, charge) in charges {
            apply(&mut state, charge, true);
            if let Some(info) = &charge.info {
                residents.insert(key, info.clone());
            }
        }
        state.residents = residents;
        self.nodes.insert(name, state);
        inventory_error
    }

    /// Why the node's link score annotation is ignored, if it is.
    pub fn pair_scores_error(&self, node: &str) -> Option<&str> {
        self.nodes.get(node)?.pair_scores_error.as_deref()
    }

    fn card_type_id(&mut self, device_type: &str) -> usize {
        let lowercase = device_type.to_ascii_lowercase();
        match self.card_types.iter().position(|t| *t == lowercase) {
            Some(id) => id,
            None => {
                self.card_types.push(lowercase);
                self.card_types.len() - 1
            }
        }
    }

    /// Forgets a node (its pods' charges are kept for when it returns).
    pub fn remove_node(&mut self, name: &str) {
        self.nodes.remove(name);
    }

    fn node_liveness(&self, name: &str) -> NodeLiveness {
        NodeLiveness {
            stale_agent: self.stale_agents.contains(name).then(|| {
                std::time::Duration::from_secs(self.config.liveness.handshake_timeout_seconds)
            }),
            gpu_resource: Arc::clone(&self.gpu_resource),
        }
    }

    /// The nodes whose agent stopped renewing its handshake: no GPU pod is
    /// placed there until it renews again (pods already there stay).
    /// Returns the nodes whose verdict changed.
    pub fn set_stale_agents(&mut self, stale: BTreeSet<String>) -> Vec<String> {
        let changed: Vec<String> = self
            .stale_agents
            .symmetric_difference(&stale)
            .cloned()
            .collect();
        self.stale_agents = stale;
        for name in &changed {
            let liveness = self.node_liveness(name);
            if let Some(node) = self.nodes.get_mut(name) {
                node.liveness = liveness;
            }
        }
        changed
    }

    /// Marks one node's agent stale or live (see [`ClusterState::set_stale_agents`]);
    /// returns whether that changed its verdict.
    pub fn set_agent_stale(&mut self, name: &str, stale: bool) -> bool {
        let changed = if stale {
            self.stale_agents.insert(name.to_owned())
        } else {
            self.stale_agents.remove(name)
        };
        if changed {
            let liveness = self.node_liveness(name);
            if let Some(node) = self.nodes.get_mut(name) {
                node.liveness = liveness;
            }
        }
        changed
    }

    /// Nodes whose agent is stale now.
    pub fn stale_agents(&self) -> &BTreeSet<String> {
        &self.stale_agents
    }

    /// Records what an observed pod takes: bound, non-terminal pods are
    /// charged their plain requests and, when its seal verifies or it is a
    /// pre-install placement to adopt (see [`AllocationTrust`]), their
    /// allocation; terminal pods are released;
    /// an unbound pod keeps this scheduler's assumption, if any, and a pod
    /// that carries a believed allocation but is not bound (a bind cut off
    /// by a restart) stays charged until it is rescheduled or deleted.
    /// Returns why the pod's allocation annotations are not believed, when
    /// it carries some that are not (forged, edited, or not Tessera's):
    /// such a pod is charged no cards.
    pub fn observe_pod(&mut self, pod: &Pod) -> Option<SealError> {
        let key = pod_key(pod);
        self.track_nomination(pod, &key);
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if tessera_api::pod::is_terminal(pod)
            || pod.metadata.deletion_timestamp.is_some() && phase.is_none()
        {
            self.release(&key);
            return None;
        }
        let (allocation, distrust) = match self
            .trust
            .allocation_adopting(pod, &self.config.scheduler_name)
        {
            Ok(allocation) => (allocation, None),
            Err(error) => (None, Some(error)),
        };
        let bound_node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let allocated_node = allocation.as_ref().map(|a| a.node.clone());
        let Some(node) = bound_node.clone().or(allocated_node) else {
            return distrust;
        };
        if bound_node.is_none() && self.charges.get(&key).is_some_and(|c| c.assumed) {
            return distrust;
        }
        // Devices count only on the node they were allocated on.
        let devices = allocation
            .filter(|a| a.node == node)
            .map(|a| a.devices)
            .unwrap_or_default();
        let allocation = PodAllocation::read(pod, devices);
        let resources = ResourceAmounts::pod_requests(pod, &self.config.resources);
        let charge = PodCharge::from_devices(
            node,
            resources,
            allocation.init(),
            allocation.app(),
            bound_node.is_none(),
        )
        .with_info(Arc::new(PodInfo::from_pod(pod)));
        self.set_charge(key, charge);
        distrust
    }

    /// Forgets a deleted pod.
    pub fn remove_pod(&mut self, pod: &Pod) {
        self.forget_nomination(&pod_key(pod));
        self.release(&pod_key(pod));
    }

    /// Charges a decision before the bind is confirmed.
    pub fn assume(&mut self, key: &str, charge: PodCharge) {
        self.set_charge(key.to_owned(), charge);
    }

    /// Rolls back an assumption (bind failed). Observed charges stay.
    pub fn forget_assumed(&mut self, key: &str) {
        if self.charges.get(key).is_some_and(|c| c.assumed) {
            self.release(key);
        }
    }

    /// Releases whatever the pod is charged, assumed or observed.
    pub fn release(&mut self, key: &str) {
        if let Some(old) = self.charges.remove(key) {
            self.quotas.count(key, &old, false);
            if let Some(node) = self.nodes.get_mut(&old.node) {
                apply(node, &old, false);
                node.pods.remove(key);
                node.residents.remove(key);
            }
            if let Some(info) = self.affinity_pods.remove(key) {
                self.count_affinity_pod(&info, false);
            }
            for volume in &old.volumes {
                self.storage.assumed_volumes.remove(volume);
            }
        }
    }

    fn set_charge(&mut self, key: String, charge: PodCharge) {
        if self.charges.get(&key) == Some(&charge) {
            return;
        }
        self.release(&key);
        // A charge on a node not seen yet is attached when the node appears.
        if let Some(node) = self.nodes.get_mut(&charge.node) {
            apply(node, &charge, true);
            node.pods.insert(key.clone());
            if let Some(info) = &charge.info {
                node.residents.insert(key.clone(), info.clone());
            }
        }
        for volume in &charge.volumes {
            self.storage
                .assumed_volumes
                .insert(volume.clone(), key.clone());
        }
        if let Some(info) = charge.info.as_ref().filter(|i| i.has_affinity_terms()) {
            self.count_affinity_pod(info, true);
            self.affinity_pods.insert(key.clone(), info.clone());
        }
        self.quotas.count(&key, &charge, true);
        self.charges.insert(key, charge);
    }

    fn count_affinity_pod(&mut self, info: &PodInfo, add: bool) {
        let step = |count: &mut usize| {
            *count = if add {
                *count + 1
            } else {
                count.saturating_sub(1)
            }
        };
        if !info.required_anti_affinity.is_empty() {
            step(&mut self.required_anti_affinity_pods);
        }
        if !info.required_affinity.is_empty()
            || !info.preferred_affinity.is_empty()
            || !info.preferred_anti_affinity.is_empty()
        {
            step(&mut self.scoring_affinity_pods);
        }
    }
}

fn apply(node: &mut NodeState, charge: &PodCharge, add: bool) {
    if add {
        node.requested.add(&charge.resources);
    } else {
        node.requested.subtract(&charge.resources);
    }
    for card_charge in &charge.cards {
        if let Some(card) = node
            .cards
            .iter_mut()
            .find(|c| c.device.id == card_charge.uuid)
        {
            let usage = &mut card.usage;
            if add {
                usage.memory_mib += card_charge.memory_mib;
                usage.cores += card_charge.cores;
                usage.slots += card_charge.slots;
            } else {
                usage.memory_mib = usage.memory_mib.saturating_sub(card_charge.memory_mib);
                usage.cores = usage.cores.saturating_sub(card_charge.cores);
                usage.slots = usage.slots.saturating_sub(card_charge.slots);
            }
        }
    }
    node.fullness_sum = node.cards.iter().map(|c| c.fullness(c.usage)).sum();
}
