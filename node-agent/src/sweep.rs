//! The periodic pod sweep: lists the pods bound to this node, rebuilds the
//! index of GPU containers the metrics read, and removes the host
//! directories of pods that no longer exist.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use tessera_api::allocation::decode_pod_devices;
use tessera_api::names::allocation as keys;
use tessera_api::request::annotated_container;

use crate::host_files::{HostLayout, REGION_FILE};
use crate::k8s::pods::NodePods;
use crate::metrics::{ContainerIndex, ContainerRecord};

/// The GPU containers among `pods`, with their cards and region files.
pub fn container_records(pods: &[Pod], layout: &HostLayout) -> Vec<ContainerRecord> {
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
                cards: devices.into_iter().map(|d| d.uuid).collect(),
            });
        }
    }
    records
}

/// One sweep: refresh the index, remove stale directories older than `min_age`.
pub async fn sweep_once(
    pods: &NodePods,
    layout: &HostLayout,
    index: &ContainerIndex,
    min_age: Duration,
) -> Result<(), kube::Error> {
    let listed = pods.list().await?;
    let records = container_records(&listed, layout);
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

/// Sweeps every `period`, forever.
pub async fn run(
    pods: NodePods,
    layout: HostLayout,
    index: ContainerIndex,
    period: Duration,
    min_age: Duration,
) {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Err(e) = sweep_once(&pods, &layout, &index, min_age).await {
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
                "containers": [{"name": "main"}]
            }
        }))
        .expect("pod");
        let records = container_records(&[pod], &layout);
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
    }
}
