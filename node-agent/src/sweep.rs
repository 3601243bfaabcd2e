//! The periodic pod sweep: lists the pods bound to this node, rebuilds the
//! index of GPU containers the metrics and the tenant-table aggregation
//! read (with each container's cards and its `nvidia.com/priority` from the
//! pod spec), and removes the host directories of pods that no longer
//! exist. Besides its period, a sweep runs soon after the aggregation asks
//! for one (it found the directory of a container the index does not know
//! yet), at most once per [`MIN_ASKED_INTERVAL`].

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use tessera_api::allocation::decode_pod_devices;
use tessera_api::names::allocation as keys;
use tessera_api::names::ResourceNames;
use tessera_api::request::{annotated_container, container_request};
use tokio::sync::Notify;

use crate::host_files::{HostLayout, REGION_FILE};
use crate::k8s::pods::NodePods;
use crate::metrics::{ContainerIndex, ContainerRecord};

/// Shortest time between two sweeps asked for by [`Notify`].
pub const MIN_ASKED_INTERVAL: Duration = Duration::from_secs(1);

/// The GPU containers among `pods`, with their cards, priorities (read with
/// the resource `names`) and region files.
pub fn container_records(
    pods: &[Pod],
    layout: &HostLayout,
    names: &ResourceNames,
) -> Vec<ContainerRecord> {
    let mut records = Vec::new();
    for pod in pods {
        let Some(allocated) = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(keys::DEVICES_ALLOCATED))
            .and_then(|value| decode_pod_devices(value).ok())
        else {
            continue;
        };
        let uid = pod.metadata.uid.as_deref().unwrap_or("");
        let entries = allocated.len();
        for (entry, devices) in allocated.into_iter().enumerate() {
            if devices.is_empty() {
                continue;
            }
            let Some(container) = annotated_container(pod, entries, entry) else {
                continue;
            };
            records.push(ContainerRecord {
                namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                pod: pod.metadata.name.clone().unwrap_or_default(),
                container: container.name.clone(),
                region: layout.container_dir(uid, &container.name).join(REGION_FILE),
                card_memory_mib: devices.iter().map(|d| d.memory_mib).collect(),
                cards: devices.into_iter().map(|d| d.uuid).collect(),
                // Validated at admission; a value that no longer parses
                // counts as none (low).
                priority: container_request(container, names)
                    .ok()
                    .and_then(|r| r.priority),
            });
        }
    }
    records
}

/// One sweep: refresh the index, remove stale directories older than `min_age`.
pub async fn sweep_once(
    pods: &NodePods,
    layout: &HostLayout,
    names: &ResourceNames,
    index: &ContainerIndex,
    min_age: Duration,
) -> Result<(), kube::Error> {
    let listed = pods.list().await?;
    let records = container_records(&listed, layout, names);
    *index
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = records;
    let live: HashSet<String> = listed
        .iter()
        .filter_map(|p| p.metadata.uid.clone())
        .collect();
    for dir in layout.remove_stale_container_dirs(&live, min_age, SystemTime::now()) {
        tracing::info!(dir = %dir.display(), "removed the directory of a pod that no longer exists");
    }
    Ok(())
}

/// What a sweep needs besides its schedule.
#[derive(Debug, Clone)]
pub struct SweepSetup {
    /// The node's pods.
    pub pods: NodePods,
    /// Host files.
    pub layout: HostLayout,
    /// Resource names (for priorities).
    pub names: ResourceNames,
    /// The index to rebuild.
    pub index: ContainerIndex,
    /// Directories younger than this are kept even without a pod.
    pub min_age: Duration,
}

/// Sweeps every `period`, and when `asked` is notified (at most once per
/// [`MIN_ASKED_INTERVAL`]), forever.
pub async fn run(setup: SweepSetup, period: Duration, asked: Arc<Notify>) {
    let SweepSetup {
        pods,
        layout,
        names,
        index,
        min_age,
    } = setup;
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = tokio::time::Instant::now();
    loop {
        let was_asked = tokio::select! {
            _ = ticker.tick() => false,
            () = asked.notified() => true,
        };
        if was_asked {
            tracing::debug!("sweeping early: a container the index does not know yet");
            if let Some(wait) = MIN_ASKED_INTERVAL.checked_sub(last.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        last = tokio::time::Instant::now();
        if let Err(e) = sweep_once(&pods, &layout, &names, &index, min_age).await {
            tracing::warn!(error = %e, "pod sweep failed; retrying on the next period");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn records_name_init_containers_when_the_allocation_lists_them() {
        let layout = HostLayout::new("/host");
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "annotations": {
                keys::DEVICES_ALLOCATED: "GPU-a,NVIDIA,1000,10:;;GPU-b,NVIDIA,2000,20:;"
            }},
            "spec": {
                "initContainers": [{"name": "fetch"}, {"name": "idle"}],
                "containers": [{"name": "main", "resources": {"limits": {"nvidia.com/priority": "0"}}}]
            }
        }))
        .expect("pod");
        let records = container_records(&[pod], &layout, &ResourceNames::default());
        let named: Vec<_> = records
            .iter()
            .map(|r| (r.container.as_str(), r.cards.clone()))
            .collect();
        assert_eq!(
            named,
            vec![
                ("fetch", vec!["GPU-a".to_owned()]),
                ("main", vec!["GPU-b".to_owned()])
            ]
        );
        assert_eq!(
            records[1].region,
            layout.container_dir("u1", "main").join(REGION_FILE)
        );
        // Priorities come from the pod spec; the tenant id is the directory name.
        assert_eq!(records[0].priority, None);
        assert_eq!(records[1].priority, Some(0));
        assert_eq!(records[1].tenant_id(), "u1_main");
    }
}
