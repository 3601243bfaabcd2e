//! `tessera inspect`: where the GPU slices of a live cluster are. Reads the
//! nodes' inventory annotation (`hami.io/node-nvidia-register`) and the
//! allocation annotation of every pod that has not ended
//! (`hami.io/vgpu-devices-allocated` on the node named by
//! `hami.io/vgpu-node`, else `spec.nodeName`), and builds a per-node,
//! per-card [`Report`]: memory and cores allocated against the card's
//! total, and which containers hold them. [`build_report`] is the pure
//! part; [`inspect`] lists the objects through a kube client. Annotations
//! that do not decode become warnings, never errors.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use serde::Serialize;
use tessera_api::allocation::decode_pod_devices;
use tessera_api::inventory::decode_inventory;
use tessera_api::names::{allocation as keys, NODE_REGISTER_ANNOTATION};

/// A container's share of one card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Holder {
    /// `namespace/name` of the pod.
    pub pod: String,
    /// Container name.
    pub container: String,
    /// MiB of the card given to the container.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// Percent of the card's compute given to the container.
    pub cores: u32,
    /// The pod's `hami.io/bind-phase` (`allocating`, `success`, `failed`), if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind_phase: Option<String>,
}

/// One card of a node and what is allocated on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CardReport {
    /// Card UUID.
    pub uuid: String,
    /// NVML index on the node.
    pub index: u32,
    /// Card type as published (e.g. `NVIDIA-Tesla T4`).
    #[serde(rename = "type")]
    pub device_type: String,
    /// Whether the node agent reports the card healthy.
    pub healthy: bool,
    /// How many containers may share the card.
    pub split_count: u32,
    /// Card memory in MiB (after the configured scaling).
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// Sum of the holders' memory.
    #[serde(rename = "allocatedMemoryMiB")]
    pub allocated_memory_mib: u64,
    /// Card compute in percent (100 × core scaling).
    pub cores: u32,
    /// Sum of the holders' cores.
    pub allocated_cores: u32,
    /// The containers holding a share, ordered by pod then container.
    pub holders: Vec<Holder>,
}

/// One GPU node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    /// Node name.
    pub name: String,
    /// Its cards, by index.
    pub cards: Vec<CardReport>,
}

/// The whole cluster's GPU allocation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// GPU nodes (those carrying an inventory annotation), by name.
    pub nodes: Vec<NodeReport>,
    /// Annotations that did not decode and allocations naming unknown
    /// nodes or cards, one sentence each.
    pub warnings: Vec<String>,
}

/// Why the cluster could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// Listing nodes or pods failed.
    #[error("could not list {what} from the cluster: {source}; check that the kubeconfig points at a reachable cluster and that you may list {what} cluster-wide")]
    List {
        /// `nodes` or `pods`.
        what: &'static str,
        /// The client error.
        #[source]
        source: kube::Error,
    },
}

fn annotation<'a>(
    meta: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &str,
) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

use tessera_api::pod::is_terminal;

/// Builds the report from nodes and pods (pods that ended are ignored).
pub fn build_report(nodes: &[Node], pods: &[Pod]) -> Report {
    let mut report = Report::default();
    let mut by_name: BTreeMap<String, NodeReport> = BTreeMap::new();
    for node in nodes {
        let name = node.metadata.name.clone().unwrap_or_default();
        let Some(value) = annotation(&node.metadata, NODE_REGISTER_ANNOTATION) else {
            continue;
        };
        match decode_inventory(value) {
            Ok(devices) => {
                let mut cards: Vec<CardReport> = devices
                    .into_iter()
                    .map(|d| CardReport {
                        uuid: d.id,
                        index: d.index,
                        device_type: d.device_type,
                        healthy: d.health,
                        split_count: d.count,
                        memory_mib: d.devmem,
                        allocated_memory_mib: 0,
                        cores: d.devcore,
                        allocated_cores: 0,
                        holders: Vec::new(),
                    })
                    .collect();
                cards.sort_by_key(|c| c.index);
                by_name.insert(name.clone(), NodeReport { name, cards });
            }
            Err(error) => report.warnings.push(format!(
                "node {name}: its {NODE_REGISTER_ANNOTATION} annotation does not decode ({error}); its cards are not shown. The node agent rewrites it when it runs: check the agent's logs on that node"
            )),
        }
    }

    let mut ordered: Vec<&Pod> = pods.iter().filter(|p| !is_terminal(p)).collect();
    ordered.sort_by_key(|p| (p.metadata.namespace.clone(), p.metadata.name.clone()));
    for pod in ordered {
        let Some(value) = annotation(&pod.metadata, keys::DEVICES_ALLOCATED) else {
            continue;
        };
        let pod_name = format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or("default"),
            pod.metadata.name.as_deref().unwrap_or("")
        );
        let node_name = annotation(&pod.metadata, keys::VGPU_NODE)
            .map(str::to_owned)
            .or_else(|| pod.spec.as_ref().and_then(|s| s.node_name.clone()));
        let Some(node_name) = node_name else {
            report.warnings.push(format!(
                "pod {pod_name}: it carries {} but names no node ({} and spec.nodeName are empty); its allocation is not counted",
                keys::DEVICES_ALLOCATED,
                keys::VGPU_NODE
            ));
            continue;
        };
        let devices = match decode_pod_devices(value) {
            Ok(devices) => devices,
            Err(error) => {
                report.warnings.push(format!(
                    "pod {pod_name}: its {} annotation does not decode ({error}); its allocation is not counted. The scheduler writes it: delete the pod to have it placed again",
                    keys::DEVICES_ALLOCATED
                ));
                continue;
            }
        };
        let Some(node) = by_name.get_mut(&node_name) else {
            report.warnings.push(format!(
                "pod {pod_name}: allocated on node {node_name}, which publishes no readable GPU inventory; its allocation is not counted"
            ));
            continue;
        };
        let bind_phase = annotation(&pod.metadata, keys::BIND_PHASE).map(str::to_owned);
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.as_slice())
            .unwrap_or_default();
        for (position, container_devices) in devices.iter().enumerate() {
            let container = containers
                .get(position)
                .map_or_else(|| format!("#{position}"), |c| c.name.clone());
            for device in container_devices {
                let Some(card) = node.cards.iter_mut().find(|c| c.uuid == device.uuid) else {
                    report.warnings.push(format!(
                        "pod {pod_name}: container {container} holds card {} which node {node_name} does not publish; that share is not counted",
                        device.uuid
                    ));
                    continue;
                };
                card.allocated_memory_mib += device.memory_mib;
                card.allocated_cores += device.cores;
                card.holders.push(Holder {
                    pod: pod_name.clone(),
                    container: container.clone(),
                    memory_mib: device.memory_mib,
                    cores: device.cores,
                    bind_phase: bind_phase.clone(),
                });
            }
        }
    }
    report.nodes = by_name.into_values().collect();
    report
}

/// Lists nodes and the pods that have not ended through `client` and builds the report.
pub async fn inspect(client: kube::Client) -> Result<Report, InspectError> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|source| InspectError::List {
            what: "nodes",
            source,
        })?;
    let not_ended = ListParams::default().fields("status.phase!=Succeeded,status.phase!=Failed");
    let pods = Api::<Pod>::all(client)
        .list(&not_ended)
        .await
        .map_err(|source| InspectError::List {
            what: "pods",
            source,
        })?;
    Ok(build_report(&nodes.items, &pods.items))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, register: Option<&str>) -> Node {
        let annotations =
            register.map_or_else(|| json!({}), |r| json!({NODE_REGISTER_ANNOTATION: r}));
        serde_json::from_value(json!({"metadata": {"name": name, "annotations": annotations}}))
            .expect("node")
    }

    fn pod(name: &str, node: Option<&str>, allocated: &str, phase: &str) -> Pod {
        let mut annotations =
            json!({keys::DEVICES_ALLOCATED: allocated, keys::BIND_PHASE: "success"});
        if let Some(node) = node {
            annotations[keys::VGPU_NODE] = json!(node);
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ml", "annotations": annotations},
            "spec": {"containers": [{"name": "main"}, {"name": "side"}]},
            "status": {"phase": phase}
        }))
        .expect("pod")
    }

    const T4: &str = r#"[{"id":"GPU-b","index":1,"count":10,"devmem":15360,"devcore":100,"type":"NVIDIA-Tesla T4","numa":0,"mode":"hami-core","health":true},
        {"id":"GPU-a","index":0,"count":10,"devmem":15360,"devcore":100,"type":"NVIDIA-Tesla T4","numa":0,"mode":"hami-core","health":false}]"#;

    #[test]
    fn sums_holders_per_card_and_orders_cards_by_index() {
        let nodes = [node("t4", Some(T4)), node("cpu-only", None)];
        let pods = [
            pod(
                "b",
                Some("t4"),
                "GPU-a,NVIDIA,7500,30:;GPU-a,NVIDIA,500,0:;",
                "Running",
            ),
            pod("a", Some("t4"), "GPU-a,NVIDIA,1000,10:;;", "Pending"),
            pod("done", Some("t4"), "GPU-b,NVIDIA,9000,0:;", "Succeeded"),
        ];
        let report = build_report(&nodes, &pods);
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
        assert_eq!(
            report.nodes.len(),
            1,
            "nodes without inventory are not GPU nodes"
        );
        let cards = &report.nodes[0].cards;
        assert_eq!(
            cards.iter().map(|c| c.uuid.as_str()).collect::<Vec<_>>(),
            ["GPU-a", "GPU-b"]
        );
        assert!(!cards[0].healthy);
        assert_eq!(
            (cards[0].allocated_memory_mib, cards[0].allocated_cores),
            (9000, 40)
        );
        let holders: Vec<_> = cards[0]
            .holders
            .iter()
            .map(|h| format!("{} {} {}", h.pod, h.container, h.memory_mib))
            .collect();
        assert_eq!(
            holders,
            ["ml/a main 1000", "ml/b main 7500", "ml/b side 500"]
        );
        assert_eq!(
            cards[1].allocated_memory_mib, 0,
            "a finished pod holds nothing"
        );
    }

    #[test]
    fn corrupt_and_dangling_annotations_become_warnings() {
        let nodes = [
            node("t4", Some(T4)),
            node("broken", Some("not json, not legacy")),
        ];
        let pods = [
            pod("garbled", Some("t4"), "GPU-a,NVIDIA,lots,0:;", "Running"),
            pod("elsewhere", Some("broken"), "GPU-x,NVIDIA,1,0:;", "Running"),
            pod("ghost-card", Some("t4"), "GPU-zzz,NVIDIA,1,0:;", "Running"),
            pod("nowhere", None, "GPU-a,NVIDIA,1,0:;", "Pending"),
            pod("fine", Some("t4"), "GPU-b,NVIDIA,100,0:;", "Running"),
        ];
        let report = build_report(&nodes, &pods);
        assert_eq!(report.nodes.len(), 1);
        assert_eq!(report.nodes[0].cards[1].allocated_memory_mib, 100);
        assert_eq!(report.nodes[0].cards[0].allocated_memory_mib, 0);
        let warnings = report.warnings.join("\n");
        for needle in [
            "node broken",
            "pod ml/garbled",
            "pod ml/elsewhere",
            "GPU-zzz",
            "pod ml/nowhere",
        ] {
            assert!(warnings.contains(needle), "missing {needle} in\n{warnings}");
        }
        assert_eq!(report.warnings.len(), 5);
    }

    #[test]
    fn falls_back_to_spec_node_name() {
        let mut bound = pod("p", None, "GPU-b,NVIDIA,10,5:;", "Running");
        bound.spec.as_mut().expect("spec").node_name = Some("t4".into());
        let report = build_report(&[node("t4", Some(T4))], &[bound]);
        assert_eq!(report.nodes[0].cards[1].allocated_cores, 5);
        assert!(report.warnings.is_empty());
    }
}
