//! Cluster objects the Kubernetes-facing tests share: a GPU node with its
//! inventory annotation, Ready, and its device plugin registered
//! (allocatable `nvidia.com/gpu`), carrying T4 cards.

use k8s_openapi::api::core::v1::Node;
use serde_json::json;
use tessera_api::inventory::{encode_inventory, GpuDevice};

/// `count` healthy `NVIDIA-<kind>` cards of `mib` MiB (split 10, NUMA 0)
/// with the UUIDs `<id_prefix>-0`, `<id_prefix>-1`, ….
pub fn cards(id_prefix: &str, count: u32, kind: &str, mib: u64) -> Vec<GpuDevice> {
    (0..count)
        .map(|i| GpuDevice {
            id: format!("{id_prefix}-{i}"),
            index: i,
            count: 10,
            devmem: mib,
            devcore: 100,
            device_type: format!("NVIDIA-{kind}"),
            numa: 0,
            mode: "hami-core".into(),
            health: true,
        })
        .collect()
}

/// `count` healthy Tesla T4 cards (15360 MiB, split 10, NUMA 0) with the
/// UUIDs `<id_prefix>-0`, `<id_prefix>-1`, ….
pub fn t4_cards(id_prefix: &str, count: u32) -> Vec<GpuDevice> {
    cards(id_prefix, count, "Tesla T4", 15360)
}

/// A Ready node `name` (32 CPUs, 128 GiB, 110 pods) publishing `cards` in
/// `hami.io/node-nvidia-register`, with `allocatable_gpus` as its
/// allocatable `nvidia.com/gpu` (what the device plugin registered).
pub fn gpu_node(name: &str, cards: &[GpuDevice], allocatable_gpus: &str) -> Node {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": {"hami.io/node-nvidia-register": encode_inventory(cards)}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}],
                   "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110", "nvidia.com/gpu": allocatable_gpus}}}))
    .expect("a valid Node")
}
