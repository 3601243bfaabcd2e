//! `tessera simulate`: runs admission (the webhook's defaulting and
//! validation) and the scheduler core over nodes and pods read from YAML,
//! pod by pod in input order, exactly as the real components would decide,
//! and reports where each pod landed and what its containers would see.

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use tessera_api::config::Config;
use tessera_scheduler::core::volumes::{VolumeAction, SELECTED_NODE_ANNOTATION};
use tessera_scheduler::core::{pod_key, ClusterState, PodRequirements, ScheduleError};

use crate::workloads::{Objects, WorkloadError};
use crate::{BUNDLED_CLUSTER, BUNDLED_WORKLOADS};

/// The admission step applied to each pod before it is scheduled: returns
/// the pod as the API server would store it, or the denial message.
pub type Admission<'a> = &'a dyn Fn(&Pod, &Config) -> Result<Pod, String>;

/// What `nvidia-smi` and the allocation show for one card of a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceReport {
    /// Card UUID.
    pub uuid: String,
    /// Card type as published (e.g. `NVIDIA-Tesla T4`).
    #[serde(rename = "type")]
    pub device_type: String,
    /// MiB given to the container on this card.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// Percent of the card's compute given.
    pub cores: u32,
    /// Memory total `nvidia-smi` shows inside the container: the cap, never
    /// more than the card.
    #[serde(rename = "nvidiaSmiMemoryTotalMiB")]
    pub nvidia_smi_memory_total_mib: u64,
}

/// One container of a placed pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerReport {
    /// Container name (init containers are prefixed `init:`).
    pub name: String,
    /// Cards, empty for containers without GPUs.
    pub devices: Vec<DeviceReport>,
}

/// A placed pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlacedPod {
    /// `namespace/name`.
    pub pod: String,
    /// Node it was bound to.
    pub node: String,
    /// Its containers.
    pub containers: Vec<ContainerReport>,
    /// What its unbound `WaitForFirstConsumer` claims get, e.g.
    /// `data: PV disk-n3` or `cache: provisioned on gpu-b1` (absent when none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
}

/// A pod that was not placed, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UnplacedPod {
    /// `namespace/name`.
    pub pod: String,
    /// Denied at admission, invalid request, or per-node reasons.
    pub reason: String,
}

/// One card's state after the simulation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CardReport {
    /// Node name.
    pub node: String,
    /// Card UUID.
    pub uuid: String,
    /// Card type.
    #[serde(rename = "type")]
    pub device_type: String,
    /// Card memory, MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// MiB allocated.
    #[serde(rename = "allocatedMemoryMiB")]
    pub allocated_memory_mib: u64,
    /// Percent of compute allocated.
    pub allocated_cores: u32,
    /// Pods holding a share, `namespace/name`.
    pub pods: Vec<String>,
}

/// The whole result; `--output json` prints this (format documented in
/// the README; fields are only ever added).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SimulationReport {
    /// Pods placed, in input order.
    pub placed: Vec<PlacedPod>,
    /// Pods not placed, in input order.
    pub unplaced: Vec<UnplacedPod>,
    /// Cards with at least one pod, by node then index.
    pub cards: Vec<CardReport>,
    /// Objects that were not nodes or workloads, `Kind/name`.
    pub skipped: Vec<String>,
    /// Nodes whose inventory annotation did not decode.
    pub warnings: Vec<String>,
}

/// Input files that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SimulateInputError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is invalid.
    #[error("in {path}: {source}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong.
        #[source]
        source: tessera_api::error::ConfigError,
    },
    /// A cluster or workload file is invalid.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
}

/// Where the simulation reads from. With no cluster file the bundled
/// example cluster is used, and with neither a cluster nor workload files
/// the bundled example workloads too.
#[derive(Debug, Clone, Copy, Default)]
pub struct SimulationFiles<'a> {
    /// Nodes (and already-bound pods).
    pub cluster: Option<&'a std::path::Path>,
    /// Workloads.
    pub workloads: &'a [std::path::PathBuf],
    /// Tessera config file.
    pub config: Option<&'a std::path::Path>,
}

fn read_file(path: &std::path::Path) -> Result<String, SimulateInputError> {
    std::fs::read_to_string(path).map_err(|source| SimulateInputError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// The webhook's own defaulting and validation, as the API server would
/// apply it at admission.
pub fn webhook_admission(pod: &Pod, config: &Config) -> Result<Pod, String> {
    tessera_webhook::decision::mutate_pod(pod, config).map_err(|e| e.to_string())
}

/// Reads the files and runs the simulation with the webhook's admission.
pub fn simulate_files(files: SimulationFiles<'_>) -> Result<SimulationReport, SimulateInputError> {
    let config = match files.config {
        Some(path) => {
            Config::from_yaml(&read_file(path)?).map_err(|source| SimulateInputError::Config {
                path: path.display().to_string(),
                source,
            })?
        }
        None => Config::default(),
    };
    let mut objects = Objects::default();
    match files.cluster {
        Some(path) => objects.read(&path.display().to_string(), &read_file(path)?)?,
        None => objects.read("bundled example cluster", BUNDLED_CLUSTER)?,
    }
    if files.workloads.is_empty() && files.cluster.is_none() {
        objects.read("bundled example workloads", BUNDLED_WORKLOADS)?;
    }
    for path in files.workloads {
        objects.read(&path.display().to_string(), &read_file(path)?)?;
    }
    Ok(simulate(&objects, &config, &webhook_admission))
}

/// Does what the PV controller and provisioner would for a placed pod's
/// claim, so later pods see it: a PV bound to the claim, or the claim
/// handed to the node. Returns the line for the report.
fn apply_volume_action(
    state: &mut ClusterState,
    namespace: &str,
    node: &str,
    action: &VolumeAction,
) -> String {
    let storage = state.storage_mut();
    let Some(mut claim) = storage.claim(namespace, action.claim()).cloned() else {
        return format!("{}: claim not found", action.claim());
    };
    match action {
        VolumeAction::BindVolume {
            claim: name,
            volume,
        } => {
            if let Some(mut pv) = storage.volume(volume).cloned() {
                if let Some(spec) = pv.spec.as_mut() {
                    spec.claim_ref = Some(k8s_openapi::api::core::v1::ObjectReference {
                        namespace: Some(namespace.to_owned()),
                        name: Some(name.clone()),
                        ..Default::default()
                    });
                }
                storage.upsert_volume(&pv);
            }
            if let Some(spec) = claim.spec.as_mut() {
                spec.volume_name = Some(volume.clone());
            }
            storage.upsert_claim(&claim);
            format!("{name}: PV {volume}")
        }
        VolumeAction::Provision { claim: name } => {
            claim
                .metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(SELECTED_NODE_ANNOTATION.to_owned(), node.to_owned());
            storage.upsert_claim(&claim);
            format!("{name}: provisioned on {node}")
        }
    }
}

/// Runs the simulation.
pub fn simulate(objects: &Objects, config: &Config, admission: Admission<'_>) -> SimulationReport {
    let mut state = ClusterState::new(config.clone());
    let mut report = SimulationReport {
        skipped: objects.skipped.clone(),
        ..SimulationReport::default()
    };
    for namespace in &objects.namespaces {
        state.upsert_namespace(namespace);
    }
    for class in &objects.priority_classes {
        state.upsert_priority_class(class);
    }
    for budget in &objects.disruption_budgets {
        state.upsert_disruption_budget(budget);
    }
    for quota in &objects.resource_quotas {
        for error in state.upsert_resource_quota(quota) {
            report.warnings.push(error.to_string());
        }
    }
    for (kind, namespace, name, selector) in &objects.workload_selectors {
        let metadata = ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.clone()),
            ..ObjectMeta::default()
        };
        state.upsert_workload_selector(*kind, &metadata, Some(selector.clone()));
    }
    for csi_node in &objects.csi_nodes {
        state.storage_mut().upsert_csi_node(csi_node);
    }
    for class in &objects.storage_classes {
        state.storage_mut().upsert_class(class);
    }
    for volume in &objects.volumes {
        state.storage_mut().upsert_volume(volume);
    }
    for claim in &objects.claims {
        state.storage_mut().upsert_claim(claim);
    }
    for node in &objects.nodes {
        let node = &with_registered_gpus(node, &config.resources.gpu);
        let name = node.metadata.name.as_deref().unwrap_or("?");
        if let Some(error) = state.upsert_node(node) {
            report.warnings.push(format!("node {name}: {error}"));
        }
        if let Some(error) = state.pair_scores_error(name) {
            report.warnings.push(format!("node {name}: {error}"));
        }
    }
    // Pods already bound in the input are existing load, not decisions.
    let (bound, pending): (Vec<&Pod>, Vec<&Pod>) = objects
        .pods
        .iter()
        .partition(|p| p.spec.as_ref().is_some_and(|s| s.node_name.is_some()));
    for pod in bound {
        state.observe_pod(pod);
    }
    let mut holders: Vec<(String, String, String)> = Vec::new();
    for original in pending {
        let key = pod_key(original);
        let pod = match admission(original, config) {
            Ok(pod) => pod,
            Err(denial) => {
                report.unplaced.push(UnplacedPod {
                    pod: key,
                    reason: format!("denied at admission: {denial}"),
                });
                continue;
            }
        };
        let mut result = state.schedule(&pod);
        if matches!(result, Err(ScheduleError::Unschedulable(_))) {
            // Preemption, as the scheduler would: evict the victims, then decide again.
            let preemption = PodRequirements::from_pod(&pod, config)
                .ok()
                .and_then(|requirements| state.find_preemption(&requirements));
            if let Some(preemption) = preemption {
                for victim in &preemption.victims {
                    state.release(victim);
                    holders.retain(|(_, _, holder)| holder != victim);
                    report.placed.retain(|p| p.pod != *victim);
                    report.unplaced.push(UnplacedPod {
                        pod: victim.clone(),
                        reason: format!("preempted by {key} on {}", preemption.node),
                    });
                }
                result = state.schedule(&pod);
            }
        }
        match result {
            Ok(placement) => {
                let node = &state.nodes()[&placement.node];
                let describe = |uuid: &str, memory_mib: u64, cores: u32| {
                    let card = node.cards.iter().find(|c| c.device.id == uuid);
                    DeviceReport {
                        uuid: uuid.to_owned(),
                        device_type: card
                            .map(|c| c.device.device_type.clone())
                            .unwrap_or_default(),
                        memory_mib,
                        cores,
                        nvidia_smi_memory_total_mib: card
                            .map_or(memory_mib, |c| memory_mib.min(c.device.devmem)),
                    }
                };
                let spec = pod.spec.as_ref();
                let init_names = spec
                    .and_then(|s| s.init_containers.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|c| format!("init:{}", c.name));
                let app_names = spec
                    .into_iter()
                    .flat_map(|s| s.containers.iter())
                    .map(|c| c.name.clone());
                let init_devices = placement.init_containers.iter();
                let containers = init_names
                    .zip(init_devices)
                    .chain(app_names.zip(placement.containers.iter()))
                    .map(|(name, devices)| ContainerReport {
                        name,
                        devices: devices
                            .iter()
                            .map(|d| describe(&d.uuid, d.memory_mib, d.cores))
                            .collect(),
                    })
                    .collect();
                for device in placement.annotated_devices().iter().flatten() {
                    holders.push((placement.node.clone(), device.uuid.clone(), key.clone()));
                }
                let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
                let volumes = placement
                    .volumes
                    .iter()
                    .map(|action| {
                        apply_volume_action(&mut state, namespace, &placement.node, action)
                    })
                    .collect();
                report.placed.push(PlacedPod {
                    pod: key,
                    node: placement.node.clone(),
                    containers,
                    volumes,
                });
                state.assume(&placement.pod, placement.charge.clone());
            }
            Err(error @ ScheduleError::SchedulingGated(_)) => report.unplaced.push(UnplacedPod {
                pod: key,
                reason: error.to_string(),
            }),
            Err(ScheduleError::InvalidRequest(error)) => report.unplaced.push(UnplacedPod {
                pod: key,
                reason: error.to_string(),
            }),
            Err(ScheduleError::Unschedulable(why)) => report.unplaced.push(UnplacedPod {
                pod: key,
                reason: why.to_string(),
            }),
        }
    }
    for (node_name, node) in state.nodes() {
        for card in &node.cards {
            if card.usage.slots == 0 {
                continue;
            }
            let mut pods: Vec<String> = holders
                .iter()
                .filter(|(n, uuid, _)| n == node_name && *uuid == card.device.id)
                .map(|(_, _, pod)| pod.clone())
                .collect();
            pods.dedup();
            report.cards.push(CardReport {
                node: node_name.clone(),
                uuid: card.device.id.clone(),
                device_type: card.device.device_type.clone(),
                memory_mib: card.device.devmem,
                allocated_memory_mib: card.usage.memory_mib,
                allocated_cores: card.usage.cores,
                pods,
            });
        }
    }
    report
}

/// The node as kubelet would show it once the node agent's device plugin
/// registered: a cluster file node with an inventory but no allocatable
/// `gpu_resource` gets the inventory's device count (cards × split), so
/// hand-written files need not repeat it. A value written in the file,
/// `"0"` included (a node whose device plugin is gone), is kept.
fn with_registered_gpus(node: &Node, gpu_resource: &str) -> Node {
    let inventory = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(tessera_api::names::NODE_REGISTER_ANNOTATION))
        .and_then(|a| tessera_api::inventory::decode_inventory(a).ok());
    let Some(devices) = inventory else {
        return node.clone();
    };
    let mut node = node.clone();
    let allocatable = node
        .status
        .get_or_insert_with(Default::default)
        .allocatable
        .get_or_insert_with(Default::default);
    if !allocatable.contains_key(gpu_resource) {
        let registered: u64 = devices.iter().map(|d| u64::from(d.count)).sum();
        allocatable.insert(gpu_resource.to_owned(), Quantity(registered.to_string()));
    }
    node
}
