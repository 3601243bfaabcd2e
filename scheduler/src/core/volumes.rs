//! Persistent volumes as kube-scheduler's VolumeBinding and VolumeZone
//! plugins decide them. A pod's bound claims restrict it to nodes their
//! PV's node affinity (and zone labels) allow; its unbound
//! `WaitForFirstConsumer` claims need, on the node, an available PV that
//! matches (class, size, access modes, selector, node affinity) or a
//! class that can provision there (`allowedTopologies`). A claim an
//! earlier decision already handed to a node (`volume.kubernetes.io/
//! selected-node`, e.g. before a restart) stays with that node.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{NodeSelectorTerm, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use tessera_api::quantity::parse_quantity;

use super::labels::Selector;
use super::node_predicates::{term_matches, NodeFacts};

/// The claim annotation naming the node a `WaitForFirstConsumer` claim is
/// provisioned for.
pub const SELECTED_NODE_ANNOTATION: &str = "volume.kubernetes.io/selected-node";
/// The provisioner of classes that only bind pre-created PVs.
pub const NO_PROVISIONER: &str = "kubernetes.io/no-provisioner";

/// `FailedScheduling` reason: a bound PV's node affinity excludes the node.
pub const NODE_AFFINITY_CONFLICT_REASON: &str = "node(s) had volume node affinity conflict";
/// `FailedScheduling` reason: no PV and no provisioning for a claim here.
pub const NO_VOLUME_REASON: &str = "node(s) didn't find available persistent volumes to bind";
/// `FailedScheduling` reason: a bound PV's zone labels exclude the node.
pub const VOLUME_ZONE_REASON: &str = "node(s) had no available volume zone";
/// `FailedScheduling` reason: a claim is bound to a PV that does not exist.
pub const MISSING_PV_REASON: &str =
    "node(s) unavailable due to one or more pvc(s) bound to non-existent pv(s)";
/// `FailedScheduling` reason: an unbound claim binds immediately (its
/// class is `Immediate`); the PV controller must bind it first.
pub const UNBOUND_IMMEDIATE_REASON: &str = "pod has unbound immediate PersistentVolumeClaims";
/// `FailedScheduling` reason: the claim was handed to another node.
pub const SELECTED_NODE_REASON: &str =
    "node(s) didn't match the node selected for the pod's volume (volume.kubernetes.io/selected-node)";

const ZONE_LABELS: [&str; 4] = [
    "topology.kubernetes.io/zone",
    "topology.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/zone",
    "failure-domain.beta.kubernetes.io/region",
];

/// What the scheduler does for one claim before binding the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeAction {
    /// Bind this available PV to the claim (set the PV's `claimRef`).
    BindVolume {
        /// Claim name (in the pod's namespace).
        claim: String,
        /// PV name.
        volume: String,
    },
    /// Have the claim provisioned on the chosen node (write
    /// `volume.kubernetes.io/selected-node`).
    Provision {
        /// Claim name (in the pod's namespace).
        claim: String,
    },
}

impl VolumeAction {
    /// The claim the action is for.
    pub fn claim(&self) -> &str {
        match self {
            Self::BindVolume { claim, .. } | Self::Provision { claim } => claim,
        }
    }
}

/// PVs, claims and storage classes the core knows.
#[derive(Debug, Clone, Default)]
pub struct Storage {
    volumes: BTreeMap<String, PersistentVolume>,
    claims: HashMap<String, PersistentVolumeClaim>,
    classes: HashMap<String, StorageClass>,
    /// PV → pod key, for PVs an assumed placement takes.
    pub(crate) assumed_volumes: HashMap<String, String>,
    /// CSINodes' attach limits (see [`super::attach_limits`]).
    pub(crate) node_volume_limits: super::attach_limits::NodeVolumeLimits,
}

fn claim_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl Storage {
    /// Adds or refreshes a PV.
    pub fn upsert_volume(&mut self, volume: &PersistentVolume) {
        if let Some(name) = &volume.metadata.name {
            self.volumes.insert(name.clone(), volume.clone());
        }
    }

    /// Forgets a PV.
    pub fn remove_volume(&mut self, name: &str) {
        self.volumes.remove(name);
    }

    /// Adds or refreshes a claim.
    pub fn upsert_claim(&mut self, claim: &PersistentVolumeClaim) {
        let namespace = claim.metadata.namespace.as_deref().unwrap_or("default");
        if let Some(name) = &claim.metadata.name {
            self.claims
                .insert(claim_key(namespace, name), claim.clone());
        }
    }

    /// Forgets a claim.
    pub fn remove_claim(&mut self, namespace: &str, name: &str) {
        self.claims.remove(&claim_key(namespace, name));
    }

    /// Adds or refreshes a storage class.
    pub fn upsert_class(&mut self, class: &StorageClass) {
        if let Some(name) = &class.metadata.name {
            self.classes.insert(name.clone(), class.clone());
        }
    }

    /// Forgets a storage class.
    pub fn remove_class(&mut self, name: &str) {
        self.classes.remove(name);
    }

    /// A claim by namespace and name.
    pub fn claim(&self, namespace: &str, name: &str) -> Option<&PersistentVolumeClaim> {
        self.claims.get(&claim_key(namespace, name))
    }

    /// A storage class by name.
    pub fn class(&self, name: &str) -> Option<&StorageClass> {
        self.classes.get(name)
    }

    /// A PV by name.
    pub fn volume(&self, name: &str) -> Option<&PersistentVolume> {
        self.volumes.get(name)
    }
}

/// The claim names a pod uses: `persistentVolumeClaim` volumes and the
/// claims of generic ephemeral volumes (`<pod>-<volume>`).
pub fn pod_claims(pod: &Pod) -> Vec<String> {
    let pod_name = pod.metadata.name.as_deref().unwrap_or("");
    pod.spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|v| {
            if let Some(claim) = &v.persistent_volume_claim {
                Some(claim.claim_name.clone())
            } else {
                v.ephemeral
                    .as_ref()
                    .map(|_| format!("{pod_name}-{}", v.name))
            }
        })
        .collect()
}

fn node_selector_terms(volume: &PersistentVolume) -> Option<&Vec<NodeSelectorTerm>> {
    volume
        .spec
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required
        .as_ref()
        .map(|r| &r.node_selector_terms)
}

fn volume_fits_node(volume: &PersistentVolume, node: &NodeFacts) -> bool {
    node_selector_terms(volume).is_none_or(|terms| terms.iter().any(|t| term_matches(t, node)))
}

fn volume_zone_fits(volume: &PersistentVolume, node: &NodeFacts) -> bool {
    let labels = volume.metadata.labels.as_ref();
    ZONE_LABELS
        .iter()
        .all(|key| match labels.and_then(|l| l.get(*key)) {
            None => true,
            Some(values) => node
                .labels
                .get(*key)
                .is_some_and(|v| values.split("__").any(|z| z == v)),
        })
}

fn storage_request(claim: &PersistentVolumeClaim) -> i64 {
    claim
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .and_then(|q| parse_quantity(&q.0).ok())
        .and_then(|q| q.to_integer_ceil())
        .unwrap_or(0)
}

fn volume_capacity(volume: &PersistentVolume) -> i64 {
    volume
        .spec
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .and_then(|q| parse_quantity(&q.0).ok())
        .and_then(|q| q.to_integer())
        .unwrap_or(0)
}

fn claim_class(claim: &PersistentVolumeClaim) -> &str {
    claim
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
        .unwrap_or("")
}

/// Whether an unbound PV can serve the claim (class, size, access modes,
/// volume mode, selector; not the node).
fn volume_matches_claim(
    volume: &PersistentVolume,
    claim: &PersistentVolumeClaim,
    namespace: &str,
    name: &str,
) -> bool {
    let Some(spec) = volume.spec.as_ref() else {
        return false;
    };
    if volume.metadata.deletion_timestamp.is_some() {
        return false;
    }
    if let Some(reference) = &spec.claim_ref {
        // Pre-bound to this claim is fine; to another, not.
        if reference.namespace.as_deref() != Some(namespace)
            || reference.name.as_deref() != Some(name)
        {
            return false;
        }
    }
    let phase = volume.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Released" | "Failed")) {
        return false;
    }
    let claim_spec = claim.spec.as_ref();
    if spec.storage_class_name.as_deref().unwrap_or("") != claim_class(claim) {
        return false;
    }
    if volume_capacity(volume) < storage_request(claim) {
        return false;
    }
    let volume_mode = |mode: Option<&String>| mode.map_or("Filesystem", String::as_str).to_owned();
    if volume_mode(spec.volume_mode.as_ref())
        != volume_mode(claim_spec.and_then(|s| s.volume_mode.as_ref()))
    {
        return false;
    }
    let offered = spec.access_modes.clone().unwrap_or_default();
    let wanted = claim_spec
        .and_then(|s| s.access_modes.clone())
        .unwrap_or_default();
    if !wanted.iter().all(|m| offered.contains(m)) {
        return false;
    }
    match claim_spec.and_then(|s| s.selector.as_ref()) {
        None => true,
        Some(selector) => Selector::from_label_selector(Some(selector))
            .matches(volume.metadata.labels.as_ref().unwrap_or(&BTreeMap::new())),
    }
}

/// How the pod's claims stand, read once per decision.
#[derive(Debug, Default)]
pub struct VolumeCheck<'a> {
    /// Bound claims' PVs.
    bound: Vec<&'a PersistentVolume>,
    /// Unbound `WaitForFirstConsumer` claims: (name, claim, class,
    /// node already selected for it).
    unbound: Vec<(
        &'a str,
        &'a PersistentVolumeClaim,
        Option<&'a StorageClass>,
        Option<&'a str>,
    )>,
    /// Candidate PVs per unbound claim, smallest first.
    candidates: Vec<Vec<&'a PersistentVolume>>,
    /// A reason that refuses every node.
    everywhere: Option<String>,
}

impl<'a> VolumeCheck<'a> {
    /// Reads the claims of a pod in `namespace` (`pod_key` owns assumptions).
    pub fn new(storage: &'a Storage, namespace: &str, claims: &'a [String], pod_key: &str) -> Self {
        let mut check = Self::default();
        for name in claims {
            let Some(claim) = storage.claim(namespace, name) else {
                check.everywhere = Some(format!("persistentvolumeclaim \"{name}\" not found"));
                return check;
            };
            if claim.metadata.deletion_timestamp.is_some() {
                check.everywhere =
                    Some(format!("persistentvolumeclaim \"{name}\" is being deleted"));
                return check;
            }
            let bound_to = claim
                .spec
                .as_ref()
                .and_then(|s| s.volume_name.as_deref())
                .filter(|v| !v.is_empty());
            if let Some(volume) = bound_to {
                match storage.volume(volume) {
                    Some(volume) => check.bound.push(volume),
                    None => {
                        check.everywhere = Some(MISSING_PV_REASON.to_owned());
                        return check;
                    }
                }
                continue;
            }
            let class = storage.classes.get(claim_class(claim));
            let waits = class
                .is_some_and(|c| c.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer"));
            if !waits {
                check.everywhere = Some(UNBOUND_IMMEDIATE_REASON.to_owned());
                return check;
            }
            let selected = claim
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SELECTED_NODE_ANNOTATION))
                .map(String::as_str);
            let mut candidates: Vec<&PersistentVolume> = storage
                .volumes
                .values()
                .filter(|v| volume_matches_claim(v, claim, namespace, name))
                .filter(|v| {
                    v.metadata.name.as_ref().is_none_or(|n| {
                        storage
                            .assumed_volumes
                            .get(n)
                            .is_none_or(|owner| owner == pod_key)
                    })
                })
                .collect();
            candidates.sort_by_key(|v| (volume_capacity(v), v.metadata.name.clone()));
            check.unbound.push((name, claim, class, selected));
            check.candidates.push(candidates);
        }
        check
    }

    /// Whether the pod uses any claim.
    pub fn is_empty(&self) -> bool {
        self.bound.is_empty() && self.unbound.is_empty() && self.everywhere.is_none()
    }

    /// On `node`: the actions that make every claim usable there, or the
    /// reason it cannot.
    pub fn on_node(&self, node: &NodeFacts) -> Result<Vec<VolumeAction>, String> {
        if let Some(reason) = &self.everywhere {
            return Err(reason.clone());
        }
        for volume in &self.bound {
            if !volume_zone_fits(volume, node) {
                return Err(VOLUME_ZONE_REASON.to_owned());
            }
            if !volume_fits_node(volume, node) {
                return Err(NODE_AFFINITY_CONFLICT_REASON.to_owned());
            }
        }
        let mut actions = Vec::with_capacity(self.unbound.len());
        let mut taken: Vec<&str> = Vec::new();
        for ((name, _claim, class, selected), candidates) in
            self.unbound.iter().zip(&self.candidates)
        {
            if selected.is_some_and(|s| s != node.name) {
                return Err(SELECTED_NODE_REASON.to_owned());
            }
            let volume = candidates.iter().find(|v| {
                let volume_name = v.metadata.name.as_deref().unwrap_or("");
                !taken.contains(&volume_name) && volume_fits_node(v, node)
            });
            if let Some(volume) = volume {
                let volume_name = volume.metadata.name.as_deref().unwrap_or("");
                taken.push(volume_name);
                actions.push(VolumeAction::BindVolume {
                    claim: (*name).to_owned(),
                    volume: volume_name.to_owned(),
                });
                continue;
            }
            let provisions = class.is_some_and(|c| {
                c.provisioner != NO_PROVISIONER
                    && c.allowed_topologies.as_ref().is_none_or(|terms| {
                        terms.is_empty()
                            || terms.iter().any(|term| {
                                term.match_label_expressions.iter().flatten().all(|e| {
                                    node.labels
                                        .get(&e.key)
                                        .is_some_and(|v| e.values.contains(v))
                                })
                            })
                    })
            });
            if !provisions {
                return Err(NO_VOLUME_REASON.to_owned());
            }
            actions.push(VolumeAction::Provision {
                claim: (*name).to_owned(),
            });
        }
        Ok(actions)
    }
}
