//! GPU node liveness with both sides real: a node agent on fake cards keeps
//! `hami.io/node-handshake` renewed and the scheduler shell places GPU pods
//! on its node; once the agent stops, the scheduler stops placing there
//! (`FailedScheduling` names the dead agent) without touching the pod
//! already placed; when an agent starts again the waiting pod lands.

use crate::common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::events::v1::Event;
use serde_json::json;
use tessera_api::config::Config;
use tessera_node_agent::agent::AgentSetup;
use tessera_node_agent::gpu::fake::FakeGpus;
use tessera_node_agent::testing::fake_agent_setup;
use tessera_scheduler::shell::{Scheduler, ShellOptions};
use tessera_testkit::ApiServer;

const NODE: &str = "gpu-a";

fn config() -> Config {
    Config::from_yaml("liveness:\n  handshakePeriodSeconds: 1\n  handshakeTimeoutSeconds: 2\n")
        .expect("config")
}

fn agent(api: &ApiServer, kubelet: &KubeletStandIn, host_dir: &std::path::Path) -> RunningAgent {
    let gpus = FakeGpus::parse("2x Tesla T4 15360", NODE).expect("fake cards");
    let defaults = fake_agent_setup(NODE, &gpus, api.client(), host_dir, kubelet.socket());
    RunningAgent::spawn(
        &gpus,
        AgentSetup {
            config: config(),
            ..defaults
        },
    )
}

fn gpu_pod(name: &str) -> Pod {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "team"},
        "spec": {"schedulerName": "tessera-scheduler",
                 "containers": [{"name": "main", "image": "x", "resources": {"limits": {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "2000"}}}]}}))
    .expect("pod")
}

fn node_of(api: &ApiServer, name: &str) -> Option<String> {
    api.get::<Pod>(Some("team"), name)?.spec?.node_name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_follows_a_real_agents_handshake() {
    let api = ApiServer::start().await.expect("API stand-in");
    let temp = tempfile::tempdir().expect("tempdir");
    api.insert(&ready_node(NODE));
    let kubelet = KubeletStandIn::start(&temp.path().join("kubelet"));
    let host_dir = temp.path().join("host");
    let first_agent = agent(&api, &kubelet, &host_dir);
    eventually("the agent's handshake", || {
        api.get::<Node>(None, NODE)?
            .metadata
            .annotations?
            .get("hami.io/node-handshake")
            .cloned()
    })
    .await;
    let _acknowledger = api.acknowledge_allocations(Duration::ZERO);
    let scheduler = Scheduler::new(api.client(), config(), ShellOptions::default());
    let running = scheduler.clone();
    let shell = tokio::spawn(async move {
        let _ = running.run().await;
    });

    api.insert(&gpu_pod("before"));
    eventually("the first pod placed", || {
        node_of(&api, "before").filter(|n| n == NODE)
    })
    .await;

    first_agent.stop().await;
    eventually("the node judged stale", || {
        scheduler
            .state_snapshot()
            .stale_agents()
            .contains(NODE)
            .then_some(())
    })
    .await;
    api.insert(&gpu_pod("after"));
    eventually("FailedScheduling naming the dead agent", || {
        api.list::<Event>().into_iter().find(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("after")
                && e.note.as_deref().is_some_and(|n| {
                    n.contains("1 node(s) had no live GPU node agent (hami.io/node-handshake not renewed for 2s)")
                })
        })
    })
    .await;
    assert_eq!(node_of(&api, "after"), None);
    assert_eq!(
        node_of(&api, "before").as_deref(),
        Some(NODE),
        "not touched"
    );

    let second_agent = agent(&api, &kubelet, &host_dir);
    eventually("the waiting pod placed once an agent is back", || {
        node_of(&api, "after").filter(|n| n == NODE)
    })
    .await;
    second_agent.stop().await;
    shell.abort();
}
