//! The scheduler shell against the API stand-in over real HTTP: many binds
//! to one node (acknowledged by the testkit's kubelet stand-in), event-driven retry, bind failure rollback, restart
//! recovery, corrupt inventory, leader election.

use crate::common::{bound_pods, start_scheduler, wait_until};

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{json, Value};
use tessera_api::allocation::decode_pod_devices;
use tessera_api::config::Config;
use tessera_api::inventory::{encode_inventory, GpuDevice};
use tessera_scheduler::shell::leader::{try_acquire, LeaseSettings};
use tessera_scheduler::shell::metrics::decision_count;
use tessera_scheduler::shell::{Scheduler, ShellOptions};
use tessera_testkit::{fixtures, ApiServer};

fn cards(prefix: &str, count: u32, mib: u64) -> Vec<GpuDevice> {
    fixtures::cards(&format!("GPU-{prefix}"), count, "Tesla T4", mib)
}

fn node(name: &str, annotation: &str) -> Node {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": {"hami.io/node-nvidia-register": annotation}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}],
                   "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110", "nvidia.com/gpu": "100"}}}))
    .expect("node")
}

fn pod(name: &str, memory_mib: u64, extra_annotations: Value) -> Pod {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "team", "annotations": extra_annotations},
        "spec": {"schedulerName": "tessera-scheduler",
                 "containers": [{"name": "main", "image": "x", "resources": {"limits": {"nvidia.com/gpumem": memory_mib.to_string()}}}]}}))
    .expect("pod")
}

fn memory_per_card(pods: &[Pod]) -> std::collections::BTreeMap<String, u64> {
    let mut per_card = std::collections::BTreeMap::new();
    for pod in pods {
        let annotation = &pod.metadata.annotations.as_ref().expect("annotations")
            ["hami.io/vgpu-devices-allocated"];
        for device in decode_pod_devices(annotation)
            .expect("decodes")
            .iter()
            .flatten()
        {
            *per_card.entry(device.uuid.clone()).or_insert(0) += device.memory_mib;
        }
    }
    per_card
}

fn start(server: &ApiServer, options: ShellOptions) -> (Scheduler, tokio::task::JoinHandle<()>) {
    start_scheduler(server, Config::default(), options)
}

#[tokio::test]
async fn many_pods_bind_to_one_node_at_once_and_never_overfill_a_card() {
    let server = ApiServer::start().await.expect("server");
    server.insert(&node("gpu-1", &encode_inventory(&cards("a", 2, 15360))));
    for i in 0..10 {
        server.insert(&pod(&format!("p{i}"), 4000, json!({})));
    }
    // Kubelet and the node agent admit each pod, so the node's gate opens.
    let _kubelet = server.acknowledge_allocations(Duration::ZERO);
    let (scheduler, handle) = start(&server, ShellOptions::default());
    wait_until("six binds", || bound_pods(&server).len() == 6).await;
    wait_until("four failed decisions", || {
        decision_count(scheduler.metrics(), "unschedulable") >= 4
    })
    .await;
    let bound = bound_pods(&server);
    for (card, used) in memory_per_card(&bound) {
        assert!(used <= 15360, "{card} holds {used} MiB");
    }
    for pod in &bound {
        let annotations = pod.metadata.annotations.as_ref().expect("annotations");
        assert_eq!(annotations["hami.io/vgpu-node"], "gpu-1");
        assert_eq!(
            annotations["hami.io/bind-phase"], "success",
            "acknowledged by the kubelet stand-in"
        );
        assert_eq!(
            annotations["hami.io/vgpu-devices-allocated"],
            annotations["hami.io/vgpu-devices-to-allocate"]
        );
    }
    assert_eq!(
        server.write_count("POST", "pods/binding"),
        6,
        "one bind per placed pod, no node lock writes"
    );
    assert_eq!(
        server.write_count("PATCH", "pods"),
        0,
        "annotations ride on the binding"
    );

    // The four left over carry PodScheduled=False with the reasons.
    wait_until("PodScheduled=False on the pending pods", || {
        server
            .list::<Pod>()
            .iter()
            .filter(|p| p.spec.as_ref().is_some_and(|s| s.node_name.is_none()))
            .all(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| {
                        c.iter().any(|c| {
                            c.type_ == "PodScheduled"
                                && c.status == "False"
                                && c.message
                                    .as_deref()
                                    .is_some_and(|m| m.contains("insufficient GPU memory"))
                        })
                    })
            })
    })
    .await;

    // Event-driven retry: deleting two bound pods lets two pending ones in, without a long timer.
    let api: kube::Api<Pod> = kube::Api::namespaced(server.client(), "team");
    for pod in bound.iter().take(2) {
        api.delete(
            pod.metadata.name.as_deref().expect("name"),
            &Default::default(),
        )
        .await
        .expect("delete");
    }
    wait_until("two more binds after deletions", || {
        bound_pods(&server).len() == 6 && server.write_count("POST", "pods/binding") == 8
    })
    .await;
    for (card, used) in memory_per_card(&bound_pods(&server)) {
        assert!(used <= 15360, "{card} holds {used} MiB");
    }
    let metrics = scheduler.metrics_text();
    assert!(
        metrics.contains("hami_gpu_memory_allocated_bytes{node=\"gpu-1\",device_uuid=\"GPU-a-0\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("hami_vgpu_memory_allocated_bytes{namespace=\"team\",node=\"gpu-1\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("tessera_scheduler_decisions_total{result=\"placed\"} 8"),
        "{metrics}"
    );
    handle.abort();
}

#[tokio::test]
async fn a_failed_bind_is_rolled_back_and_retried() {
    let server = ApiServer::start().await.expect("server");
    server.insert(&node("gpu-1", &encode_inventory(&cards("a", 1, 15360))));
    server.fail_next("POST", "pods/binding", 500, 1);
    server.insert(&pod("p", 15000, json!({})));
    let (scheduler, handle) = start(&server, ShellOptions::default());
    wait_until("bound after retry", || bound_pods(&server).len() == 1).await;
    assert_eq!(server.write_count("POST", "pods/binding"), 2);
    assert!(scheduler
        .metrics_text()
        .contains("tessera_scheduler_bind_failures_total 1"));
    let state = scheduler.state_snapshot();
    assert_eq!(
        state.nodes()["gpu-1"].cards[0].usage.memory_mib,
        15000,
        "the failed attempt left no charge behind"
    );
    handle.abort();
}

#[tokio::test]
async fn a_restarted_scheduler_rebuilds_from_annotations_and_redoes_a_cut_off_bind() {
    let server = ApiServer::start().await.expect("server");
    server.insert(&node("gpu-1", &encode_inventory(&cards("a", 2, 15360))));
    // Bound before the restart: holds card 0.
    let mut running: Value = serde_json::to_value(pod("running", 15000, json!({
        "hami.io/vgpu-node": "gpu-1", "hami.io/vgpu-devices-allocated": "GPU-a-0,NVIDIA,15000,0:;",
        "hami.io/vgpu-devices-to-allocate": "GPU-a-0,NVIDIA,15000,0:;", "hami.io/bind-phase": "success"})))
    .expect("json");
    running["spec"]["nodeName"] = json!("gpu-1");
    running["status"] = json!({"phase": "Running"});
    server.insert_value("v1", "pods", running);
    // Decided but never bound before the restart: claims card 1 in its annotations.
    server.insert(&pod("cut-off", 15000, json!({"hami.io/vgpu-node": "gpu-1", "hami.io/vgpu-devices-allocated": "GPU-a-1,NVIDIA,15000,0:;"})));
    server.insert(&pod("newcomer", 15000, json!({})));
    let (scheduler, handle) = start(&server, ShellOptions::default());
    wait_until("both pending pods handled", || {
        bound_pods(&server).len() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bound = bound_pods(&server);
    assert_eq!(bound.len(), 2, "only one card was free after the restart");
    let per_card = memory_per_card(&bound);
    assert_eq!(per_card.get("GPU-a-0"), Some(&15000));
    assert_eq!(per_card.get("GPU-a-1"), Some(&15000));
    assert!(decision_count(scheduler.metrics(), "unschedulable") >= 1);
    handle.abort();
}

#[tokio::test]
async fn a_corrupt_inventory_skips_the_node_with_an_event() {
    let server = ApiServer::start().await.expect("server");
    server.insert(&node("broken", "GPU-x,ten,1,1,T,0,true:"));
    server.insert(&node("good", &encode_inventory(&cards("g", 1, 15360))));
    server.insert(&pod("p", 1000, json!({})));
    let (_scheduler, handle) = start(&server, ShellOptions::default());
    wait_until("bound to the good node", || bound_pods(&server).len() == 1).await;
    assert_eq!(
        bound_pods(&server)[0]
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .as_deref(),
        Some("good")
    );
    wait_until("warning event on the broken node", || {
        server
            .list_values("events.k8s.io/v1", "events", None)
            .iter()
            .any(|e| e["reason"] == "InvalidGPUInventory" && e["regarding"]["name"] == "broken")
    })
    .await;
    handle.abort();
}

#[tokio::test]
async fn only_one_replica_holds_the_lease_until_it_expires() {
    let server = ApiServer::start().await.expect("server");
    let settings = |identity: &str| LeaseSettings {
        namespace: "tessera-system".into(),
        name: "tessera-scheduler".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(1),
        retry_period: Duration::from_millis(200),
    };
    let client = server.client();
    assert!(try_acquire(&client, &settings("a")).await.expect("a"));
    assert!(
        !try_acquire(&client, &settings("b")).await.expect("b"),
        "b waits while a's lease is fresh"
    );
    assert!(try_acquire(&client, &settings("a"))
        .await
        .expect("a renews"));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(try_acquire(&client, &settings("b"))
        .await
        .expect("b takes over"));
    assert!(!try_acquire(&client, &settings("a"))
        .await
        .expect("a lost it"));

    // A replica without the lease does not bind.
    server.insert(&node("gpu-1", &encode_inventory(&cards("a", 1, 15360))));
    server.insert(&pod("p", 1000, json!({})));
    let (_follower, handle) = start(
        &server,
        ShellOptions {
            lease: Some(settings("c")),
            ..ShellOptions::default()
        },
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        bound_pods(&server).is_empty(),
        "the follower must not bind while b holds the lease"
    );
    handle.abort();
}
