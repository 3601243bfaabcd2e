//! GPU node liveness against the API stand-in: a node whose agent stops
//! renewing `hami.io/node-handshake` is avoided once the timeout passes and
//! used again when the handshake resumes; a leftover inventory on a node
//! whose kubelet offers no `nvidia.com/gpu` is avoided; a restarted
//! scheduler does not take every node for dead at once. Pods already placed
//! are never touched. The leader says so on the Node; a follower does not.

use crate::common::{start_scheduler, wait_until};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tessera_api::config::Config;
use tessera_scheduler::shell::leader::{try_acquire, LeaseSettings};
use tessera_scheduler::shell::{Scheduler, ShellOptions};
use tessera_testkit::fixtures::{self, t4_cards};
use tessera_testkit::ApiServer;

fn gpu_node(name: &str, allocatable_gpus: &str, handshake: Option<&str>) -> Node {
    let mut node = fixtures::gpu_node(name, &t4_cards(&format!("GPU-{name}"), 4), allocatable_gpus);
    if let Some(value) = handshake {
        node.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert("hami.io/node-handshake".into(), value.into());
    }
    node
}

fn gpu_pod(name: &str) -> Pod {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "team"},
        "spec": {"schedulerName": "tessera-scheduler",
                 "containers": [{"name": "main", "image": "x", "resources": {"limits": {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "2000"}}}]}}))
    .expect("pod")
}

fn node_of(server: &ApiServer, name: &str) -> Option<String> {
    server.get::<Pod>(Some("team"), name)?.spec?.node_name
}

/// Reasons of the Events on Node `node`.
fn node_event_reasons(server: &ApiServer, node: &str) -> Vec<String> {
    server
        .list::<Event>()
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().is_some_and(|r| {
                r.kind.as_deref() == Some("Node") && r.name.as_deref() == Some(node)
            })
        })
        .filter_map(|e| e.reason)
        .collect()
}

fn failed_scheduling_notes(server: &ApiServer, pod: &str) -> Vec<String> {
    server
        .list::<Event>()
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod))
        .filter(|e| e.reason.as_deref() == Some("FailedScheduling"))
        .filter_map(|e| e.note)
        .collect()
}

fn start(server: &ApiServer, config: Config) -> (Scheduler, tokio::task::JoinHandle<()>) {
    start_scheduler(server, config, ShellOptions::default())
}

/// Stands in for the node agent's handshake: renews `node`'s handshake
/// every 200 ms, through the API, while `renewing` is set.
fn renew_handshake(server: &ApiServer, node: &str, renewing: Arc<AtomicBool>) {
    let nodes: Api<Node> = Api::all(server.client());
    let node = node.to_owned();
    tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            if renewing.load(Ordering::Relaxed) {
                n += 1;
                let patch = json!({"metadata": {"annotations": {"hami.io/node-handshake": format!("Reported {n}")}}});
                nodes
                    .patch(&node, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .expect("handshake patch");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

#[tokio::test]
async fn a_node_whose_handshake_stops_is_avoided_after_the_timeout_and_used_again_when_it_resumes()
{
    let server = ApiServer::start().await.expect("server");
    server.insert(&gpu_node("gpu-1", "40", Some("Reported 0")));
    let renewing = Arc::new(AtomicBool::new(true));
    renew_handshake(&server, "gpu-1", Arc::clone(&renewing));
    let _kubelet = server.acknowledge_allocations(Duration::ZERO);
    let config =
        Config::from_yaml("liveness:\n  handshakePeriodSeconds: 1\n  handshakeTimeoutSeconds: 2\n")
            .expect("config");
    let (scheduler, handle) = start(&server, config);

    server.insert(&gpu_pod("before"));
    wait_until("the first pod placed", || {
        node_of(&server, "before").as_deref() == Some("gpu-1")
    })
    .await;

    // The agent goes away: after the timeout the node takes no GPU pod.
    renewing.store(false, Ordering::Relaxed);
    wait_until("the node judged stale", || {
        scheduler.state_snapshot().stale_agents().contains("gpu-1")
    })
    .await;
    wait_until("the stale node counted", || {
        scheduler.metrics().stale_gpu_agents.get() == 1
    })
    .await;
    wait_until("a GPUAgentStale Warning on the Node", || {
        node_event_reasons(&server, "gpu-1") == ["GPUAgentStale"]
    })
    .await;
    server.insert(&gpu_pod("after"));
    wait_until("FailedScheduling naming the dead agent", || {
        failed_scheduling_notes(&server, "after").iter().any(|note| {
            note.contains("1 node(s) had no live GPU node agent (hami.io/node-handshake not renewed for 2s)")
        })
    })
    .await;
    assert_eq!(node_of(&server, "after"), None);
    assert_eq!(
        node_of(&server, "before").as_deref(),
        Some("gpu-1"),
        "the pod already placed is not touched"
    );

    // The agent is back: the waiting pod lands without being created again.
    renewing.store(true, Ordering::Relaxed);
    wait_until("the waiting pod placed once the handshake resumes", || {
        node_of(&server, "after").as_deref() == Some("gpu-1")
    })
    .await;
    wait_until("no stale node counted", || {
        scheduler.metrics().stale_gpu_agents.get() == 0
    })
    .await;
    wait_until("a GPUAgentResumed Event on the Node", || {
        let mut reasons = node_event_reasons(&server, "gpu-1");
        reasons.sort();
        reasons == ["GPUAgentResumed", "GPUAgentStale"]
    })
    .await;
    handle.abort();
}

#[tokio::test]
async fn a_leftover_inventory_on_a_node_without_allocatable_gpus_is_avoided() {
    let server = ApiServer::start().await.expect("server");
    // A node whose device plugin is gone (kubelet offers 0) but whose
    // inventory annotation is still there; no handshake at all.
    server.insert(&gpu_node("leftover", "0", None));
    let _kubelet = server.acknowledge_allocations(Duration::ZERO);
    let (_scheduler, handle) = start(&server, Config::default());
    server.insert(&gpu_pod("p"));
    wait_until("FailedScheduling naming kubelet's missing devices", || {
        failed_scheduling_notes(&server, "p").iter().any(|note| {
            note.contains("1 node(s) had no allocatable nvidia.com/gpu (the node agent's device plugin is not registered with kubelet)")
        })
    })
    .await;
    assert_eq!(node_of(&server, "p"), None);

    // A live node appears: the pod goes there, never to the leftover.
    server.insert(&gpu_node("live", "40", Some("Reported 1")));
    wait_until("the pod placed on the live node", || {
        node_of(&server, "p").is_some()
    })
    .await;
    assert_eq!(node_of(&server, "p").as_deref(), Some("live"));
    handle.abort();
}

#[tokio::test]
async fn a_restarted_scheduler_gives_every_node_the_timeout_before_judging_it() {
    let server = ApiServer::start().await.expect("server");
    // Handshakes written long ago (by node clocks that may be off): a
    // scheduler that just started has not seen them renewed yet, and must
    // not conclude that every node is dead.
    for name in ["gpu-1", "gpu-2"] {
        server.insert(&gpu_node(
            name,
            "40",
            Some("Reported 2020-01-01 00:00:00.000 UTC"),
        ));
    }
    let _kubelet = server.acknowledge_allocations(Duration::ZERO);
    let (scheduler, handle) = start(&server, Config::default());
    server.insert(&gpu_pod("p"));
    wait_until("the pod placed during the grace", || {
        node_of(&server, "p").is_some()
    })
    .await;
    assert!(
        scheduler.state_snapshot().stale_agents().is_empty(),
        "no node is stale before the 90 s timeout"
    );
    handle.abort();
}

#[tokio::test]
async fn a_follower_judges_a_node_stale_but_leaves_the_node_event_to_the_leader() {
    let server = ApiServer::start().await.expect("server");
    server.insert(&gpu_node("gpu-1", "40", Some("Reported 0")));
    let lease = |identity: &str| LeaseSettings {
        namespace: "tessera-system".into(),
        name: "tessera-scheduler".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(60),
        retry_period: Duration::from_millis(100),
    };
    // Another replica holds the lease for the whole test.
    assert!(try_acquire(&server.client(), &lease("leader"))
        .await
        .expect("lease"));
    let config =
        Config::from_yaml("liveness:\n  handshakePeriodSeconds: 1\n  handshakeTimeoutSeconds: 2\n")
            .expect("config");
    let options = ShellOptions {
        lease: Some(lease("follower")),
        ..ShellOptions::default()
    };
    let (follower, handle) = start_scheduler(&server, config, options);
    wait_until("the follower judges the node stale", || {
        follower.metrics().stale_gpu_agents.get() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        node_event_reasons(&server, "gpu-1").is_empty(),
        "only the leader posts on the Node"
    );
    handle.abort();
}
