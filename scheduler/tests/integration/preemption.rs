//! Preemption through the shell against the API stand-in: a pod of higher
//! priority that fits nowhere evicts the lower-priority pod holding the GPU
//! slice it needs (through `pods/eviction`), is nominated to the node and
//! bound there once the victim is gone; a PodDisruptionBudget that allows
//! no disruption stops the eviction; `preemptionPolicy: Never` never evicts.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::events::v1::Event;
use serde_json::json;
use tessera_api::config::Config;
use tessera_api::inventory::{encode_inventory, GpuDevice};
use tessera_scheduler::shell::{Scheduler, ShellOptions};
use tessera_testkit::ApiServer;

fn gpu_node(server: &ApiServer) {
    let cards = vec![GpuDevice {
        id: "GPU-n1".into(),
        index: 0,
        count: 10,
        devmem: 15360,
        devcore: 100,
        device_type: "NVIDIA-Tesla T4".into(),
        numa: 0,
        mode: "hami-core".into(),
        health: true,
    }];
    let node: Node = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "n1"},
            "annotations": {"hami.io/node-nvidia-register": encode_inventory(&cards)}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}],
                   "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110", "nvidia.com/gpu": "100"}}}))
    .expect("node");
    server.insert(&node);
}

/// A running pod holding 12000 MiB of the card, priority 10.
fn low_priority_pod(server: &ApiServer) {
    server.insert_value("v1", "pods", json!({"metadata": {"name": "batch", "namespace": "ml", "labels": {"app": "batch"},
        "annotations": {"hami.io/vgpu-node": "n1", "hami.io/vgpu-devices-allocated": "GPU-n1,NVIDIA,12000,0:;",
            "hami.io/bind-phase": "success"}},
        "spec": {"nodeName": "n1", "priority": 10, "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running"}}));
}

fn urgent_pod(server: &ApiServer, extra_spec: serde_json::Value) {
    let mut spec = json!({"schedulerName": "tessera-scheduler", "priority": 1000,
        "containers": [{"name": "main", "image": "x", "resources": {"limits": {"nvidia.com/gpumem": "10000"}}}]});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra_spec.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    server.insert_value(
        "v1",
        "pods",
        json!({"metadata": {"name": "urgent", "namespace": "ml"}, "spec": spec}),
    );
}

async fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    for _ in 0..300 {
        if let Some(value) = check() {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn start(server: &ApiServer) -> tokio::task::JoinHandle<()> {
    let scheduler = Scheduler::new(server.client(), Config::default(), ShellOptions::default());
    tokio::spawn(async move {
        let _ = scheduler.run().await;
    })
}

#[tokio::test]
async fn a_higher_priority_pod_evicts_the_lower_one_and_takes_its_slice() {
    let server = ApiServer::start().await.expect("server");
    gpu_node(&server);
    low_priority_pod(&server);
    urgent_pod(&server, json!({}));
    let _kubelet = server.acknowledge_allocations(Duration::ZERO);
    let handle = start(&server);
    let node = wait_for("the urgent pod bound", || {
        server.get::<Pod>(Some("ml"), "urgent")?.spec?.node_name
    })
    .await;
    assert_eq!(node, "n1");
    assert!(
        server.get::<Pod>(Some("ml"), "batch").is_none(),
        "the victim was evicted"
    );
    assert_eq!(server.write_count("POST", "pods/eviction"), 1);
    let nominated = server
        .get::<Pod>(Some("ml"), "urgent")
        .and_then(|p| p.status?.nominated_node_name);
    assert_eq!(nominated.as_deref(), Some("n1"));
    // kube-scheduler's Event on the victim, naming the preemptor by UID.
    let uid = server
        .get::<Pod>(Some("ml"), "urgent")
        .and_then(|p| p.metadata.uid)
        .expect("uid");
    let preempted = wait_for("the Preempted event", || {
        server
            .list::<Event>()
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("Preempted"))
    })
    .await;
    assert_eq!(
        preempted.note.as_deref(),
        Some(format!("Preempted by pod {uid} on node n1").as_str())
    );
    assert_eq!(preempted.type_.as_deref(), Some("Normal"));
    assert_eq!(preempted.action.as_deref(), Some("Preempting"));
    assert_eq!(
        preempted.regarding.and_then(|r| r.name).as_deref(),
        Some("batch")
    );
    assert_eq!(
        preempted.related.and_then(|r| r.name).as_deref(),
        Some("urgent")
    );
    handle.abort();
}

#[tokio::test]
async fn a_disruption_budget_or_never_policy_keeps_the_victim() {
    for (budget, extra) in [
        (true, json!({})),
        (false, json!({"preemptionPolicy": "Never"})),
    ] {
        let server = ApiServer::start().await.expect("server");
        gpu_node(&server);
        low_priority_pod(&server);
        if budget {
            server.insert_value("policy/v1", "poddisruptionbudgets", json!({"metadata": {"name": "batch", "namespace": "ml"},
                "spec": {"selector": {"matchLabels": {"app": "batch"}}, "minAvailable": 1},
                "status": {"disruptionsAllowed": 0, "currentHealthy": 1, "desiredHealthy": 1, "expectedPods": 1}}));
        }
        urgent_pod(&server, extra);
        let handle = start(&server);
        wait_for("the urgent pod found unschedulable", || {
            server
                .get::<Pod>(Some("ml"), "urgent")?
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "PodScheduled" && c.status == "False")
                .then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            server.get::<Pod>(Some("ml"), "batch").is_some(),
            "budget {budget}: the victim stays"
        );
        assert_eq!(
            server
                .get::<Pod>(Some("ml"), "urgent")
                .and_then(|p| p.spec?.node_name),
            None
        );
        let evictions = server.write_count("POST", "pods/eviction");
        if budget {
            assert!(evictions >= 1, "the eviction was tried and refused (429)");
        } else {
            assert_eq!(evictions, 0, "preemptionPolicy Never never evicts");
            let message = server
                .get::<Pod>(Some("ml"), "urgent")
                .and_then(|p| p.status?.conditions)
                .and_then(|c| c.into_iter().find(|c| c.type_ == "PodScheduled"))
                .and_then(|c| c.message)
                .unwrap_or_default();
            assert!(
                message.ends_with(". preemption: not eligible due to preemptionPolicy=Never."),
                "kube-scheduler's wording: {message}"
            );
        }
        handle.abort();
    }
}

#[tokio::test]
async fn a_placed_pods_anti_affinity_is_relieved_by_preemption() {
    let server = ApiServer::start().await.expect("server");
    gpu_node(&server);
    server.insert_value("v1", "pods", json!({"metadata": {"name": "guard", "namespace": "ml", "labels": {"app": "guard"}},
        "spec": {"nodeName": "n1", "priority": 10, "containers": [{"name": "c", "image": "x"}],
            "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}]}}},
        "status": {"phase": "Running"}}));
    server.insert_value("v1", "pods", json!({"metadata": {"name": "web", "namespace": "ml", "labels": {"app": "web"}},
        "spec": {"schedulerName": "tessera-scheduler", "priority": 1000,
            "containers": [{"name": "main", "image": "x", "resources": {"limits": {"nvidia.com/gpumem": "1000"}}}]}}));
    let _kubelet = server.acknowledge_allocations(Duration::ZERO);
    let handle = start(&server);
    let node = wait_for("the web pod bound", || {
        server.get::<Pod>(Some("ml"), "web")?.spec?.node_name
    })
    .await;
    assert_eq!(node, "n1");
    assert!(
        server.get::<Pod>(Some("ml"), "guard").is_none(),
        "the guard was evicted"
    );
    handle.abort();
}

/// kube-scheduler counts pods nominated to a node (priority at least the
/// incoming pod's) as already there: a lower-priority pod cannot take the
/// room a preemptor waits for. The scheduler starts with the preemptor
/// already nominated (as after a restart between evicting and binding)
/// while a pod it cannot evict still holds part of the card.
#[tokio::test]
async fn a_lower_priority_pod_cannot_take_the_room_a_preemptor_waits_for() {
    let server = ApiServer::start().await.expect("server");
    gpu_node(&server);
    server.insert_value("v1", "pods", json!({"metadata": {"name": "holder", "namespace": "ml",
            "annotations": {"hami.io/vgpu-node": "n1", "hami.io/vgpu-devices-allocated": "GPU-n1,NVIDIA,3000,0:;",
                "hami.io/bind-phase": "success"}},
        "spec": {"nodeName": "n1", "priority": 5000, "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running"}}));
    server.insert_value("v1", "pods", json!({"metadata": {"name": "urgent", "namespace": "ml"},
        "spec": {"schedulerName": "tessera-scheduler", "priority": 1000,
            "containers": [{"name": "main", "image": "x", "resources": {"limits": {"nvidia.com/gpumem": "14000"}}}]},
        "status": {"phase": "Pending", "nominatedNodeName": "n1"}}));
    server.insert_value("v1", "pods", json!({"metadata": {"name": "filler", "namespace": "ml"},
        "spec": {"schedulerName": "tessera-scheduler", "priority": 100,
            "containers": [{"name": "main", "image": "x", "resources": {"limits": {"nvidia.com/gpumem": "10000"}}}]}}));
    let _kubelet = server.acknowledge_allocations(Duration::ZERO);
    let handle = start(&server);
    let refused = |name: &'static str| {
        let server = &server;
        move || {
            server
                .get::<Pod>(Some("ml"), name)?
                .status?
                .conditions?
                .into_iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")?
                .message
        }
    };
    // 12360 MiB are free, enough for the filler, but the room is the preemptor's.
    wait_for("the filler refused", refused("filler")).await;
    let waiting = wait_for("the preemptor refused", refused("urgent")).await;
    assert!(
        waiting.ends_with(
            ". preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod."
        ),
        "{waiting}"
    );
    // The holder leaves: the preemptor gets the card, the filler still not.
    server.delete_value("v1", "pods", Some("ml"), "holder");
    let node = wait_for("the preemptor bound", || {
        server.get::<Pod>(Some("ml"), "urgent")?.spec?.node_name
    })
    .await;
    assert_eq!(node, "n1");
    assert_eq!(
        server
            .get::<Pod>(Some("ml"), "filler")
            .and_then(|p| p.spec?.node_name),
        None,
        "the lower-priority pod never took the room"
    );
    assert_eq!(server.write_count("POST", "pods/eviction"), 0);
    handle.abort();
}
