//! Namespace GPU quotas through the scheduler shell against the API
//! stand-in over real HTTP: ten replicas created at once against a quota
//! for three place exactly three, the others are told why in
//! `FailedScheduling` (quota, resource, used / requested / limit); raising
//! the quota and ending a pod retry them at once; `/metrics` shows HAMi's
//! quota series.

use crate::common::{bound_pods, start_scheduler, wait_until};

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod, ResourceQuota};
use k8s_openapi::api::events::v1::Event;
use serde_json::json;
use tessera_api::config::Config;
use tessera_scheduler::shell::metrics::decision_count;
use tessera_scheduler::shell::ShellOptions;
use tessera_testkit::fixtures::{gpu_node, t4_cards};
use tessera_testkit::ApiServer;

fn node(name: &str) -> Node {
    gpu_node(name, &t4_cards(&format!("GPU-{name}"), 4), "100")
}

fn replica(name: &str) -> Pod {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "team", "labels": {"app": "llm"}},
        "spec": {"schedulerName": "tessera-scheduler",
                 "containers": [{"name": "main", "image": "x", "resources": {"limits": {
                     "nvidia.com/gpu": "2", "nvidia.com/gpumem": "1000", "nvidia.com/gpucores": "10"}}}]}}))
    .expect("pod")
}

/// A quota that holds `replicas` of [`replica`] (2 cards × 1000 MiB each).
fn quota_for(replicas: u64) -> ResourceQuota {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "ResourceQuota",
        "metadata": {"name": "gpu-quota", "namespace": "team"},
        "spec": {"hard": {"limits.nvidia.com/gpumem": (replicas * 2000).to_string(), "pods": "100"}}}))
    .expect("quota")
}

fn quota_events(server: &ApiServer) -> Vec<String> {
    server
        .list::<Event>()
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("FailedScheduling"))
        .filter_map(|e| e.note)
        .filter(|note| note.contains("ResourceQuotaNotFit"))
        .collect()
}

#[tokio::test]
async fn ten_replicas_against_a_quota_for_three_place_exactly_three() {
    let server = ApiServer::start().await.expect("server");
    server.insert(&node("gpu-1"));
    server.insert(&node("gpu-2"));
    server.insert(&quota_for(3));
    for i in 0..10 {
        server.insert(&replica(&format!("llm-{i}")));
    }
    let _kubelet = server.acknowledge_allocations(Duration::ZERO);
    let (scheduler, handle) = start_scheduler(&server, Config::default(), ShellOptions::default());

    wait_until("seven refusals", || {
        decision_count(scheduler.metrics(), "unschedulable") >= 7
    })
    .await;
    wait_until("three binds", || bound_pods(&server).len() == 3).await;
    assert_eq!(server.write_count("POST", "pods/binding"), 3);
    wait_until("FailedScheduling naming the quota", || {
        !quota_events(&server).is_empty()
    })
    .await;
    let note = quota_events(&server).remove(0);
    for part in [
        "0/2 nodes are available",
        "2/2 nodes: ResourceQuotaNotFit",
        "namespace `team` ResourceQuota `gpu-quota` limits nvidia.com/gpumem to 6000 MiB",
        "6000 MiB in use + 2000 MiB requested by this pod",
        "limits.nvidia.com/gpumem",
    ] {
        assert!(note.contains(part), "{part:?} missing from {note}");
    }
    let metrics = scheduler.metrics_text();
    assert!(
        metrics.contains(
            "hami_resource_quota_used{namespace=\"team\",quota_name=\"nvidia.com/gpumem\",limit=\"6000\"} 6000"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "hami_resource_quota_limit{namespace=\"team\",quota_name=\"nvidia.com/gpumem\"} 6000"
        ),
        "{metrics}"
    );

    // Raising the quota retries the parked replicas at once: two more fit.
    server.insert(&quota_for(5));
    wait_until("five bound after the quota grew", || {
        bound_pods(&server).len() == 5
    })
    .await;

    // A replica that ends frees its share for exactly one more.
    let api: kube::Api<Pod> = kube::Api::namespaced(server.client(), "team");
    let first = bound_pods(&server)[0].metadata.name.clone().expect("name");
    api.delete(&first, &Default::default())
        .await
        .expect("delete");
    wait_until("a sixth bind after a replica ended", || {
        server.write_count("POST", "pods/binding") == 6
    })
    .await;
    assert_eq!(
        bound_pods(&server).len(),
        5,
        "never more than the quota holds"
    );
    handle.abort();
}

#[tokio::test]
async fn deleting_the_quota_releases_every_parked_pod() {
    let server = ApiServer::start().await.expect("server");
    server.insert(&node("gpu-1"));
    server.insert(&quota_for(1));
    for i in 0..3 {
        server.insert(&replica(&format!("llm-{i}")));
    }
    let _kubelet = server.acknowledge_allocations(Duration::ZERO);
    let (scheduler, handle) = start_scheduler(&server, Config::default(), ShellOptions::default());
    wait_until("two refusals", || {
        decision_count(scheduler.metrics(), "unschedulable") >= 2
    })
    .await;
    wait_until("one bound", || bound_pods(&server).len() == 1).await;
    let quotas: kube::Api<ResourceQuota> = kube::Api::namespaced(server.client(), "team");
    quotas
        .delete("gpu-quota", &Default::default())
        .await
        .expect("delete");
    wait_until("all three bound", || bound_pods(&server).len() == 3).await;
    handle.abort();
}
