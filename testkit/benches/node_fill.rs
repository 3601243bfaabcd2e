//! How long filling one node takes when every bind must be admitted by
//! kubelet before the next pod of its shape is bound: one node with 8 fake
//! A10G cards split 10 ways, 80 single-card pods created at once, the real
//! scheduler shell, the real node agent (Allocate over a unix socket, seal
//! checked through the Secret) and the kubelet admission stand-in, all on
//! the API stand-in. Prints the time from the first bind to the last
//! `bind-phase: success`, and per pod. A `hack/` figure, not a test.
//!
//! `cargo bench -p tessera-testkit --bench node_fill`

use std::time::{Duration, Instant};

use futures::future::join_all;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use serde_json::json;
use tessera_api::config::Config;
use tessera_node_agent::kubelet_admission::AdmittingNode;
use tessera_node_agent::seal::SealSource;
use tessera_scheduler::shell::{seal_key, Scheduler, ShellOptions};
use tessera_testkit::ApiServer;

const NODE: &str = "gpu-node";
const PODS: usize = 80;

async fn fill_once() -> (Duration, usize) {
    let api = ApiServer::start().await.expect("API stand-in");
    let temp = tempfile::tempdir().expect("tempdir");
    let node: Node = serde_json::from_value(json!({"metadata": {"name": NODE},
        "status": {"conditions": [{"type": "Ready", "status": "True"}],
            "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "100"}}}))
    .expect("node");
    api.insert(&node);
    let key = seal_key::load_or_create(api.client(), "tessera-system")
        .await
        .expect("key");
    let node = AdmittingNode::start(
        api.client(),
        NODE,
        "8x NVIDIA A10G 23028",
        temp.path(),
        SealSource::Secret {
            namespace: "tessera-system".into(),
        },
        Duration::from_millis(5),
    )
    .await;
    while api
        .get::<Node>(None, NODE)
        .and_then(|n| n.metadata.annotations)
        .is_none_or(|a| !a.contains_key("hami.io/node-nvidia-register"))
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let options = ShellOptions {
        seal_key: Some(key),
        scheduled_events: false,
        ..ShellOptions::default()
    };
    let scheduler = Scheduler::new(api.client(), Config::default(), options);
    let task = tokio::spawn(async move {
        let _ = scheduler.run().await;
    });
    let pods: Api<Pod> = Api::namespaced(api.client(), "bench");
    join_all((0..PODS).map(|i| {
        let pods = pods.clone();
        async move {
            let pod: Pod = serde_json::from_value(json!({"metadata": {"name": format!("p{i:02}"), "namespace": "bench"},
                "spec": {"schedulerName": "tessera-scheduler", "containers": [{"name": "main", "image": "x",
                    "resources": {"limits": {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "2000"}}}]}}))
            .expect("pod");
            pods.create(&PostParams::default(), &pod).await.expect("create");
        }
    }))
    .await;
    let mut first_bind: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    let done = loop {
        if first_bind.is_none() && api.write_count("POST", "pods/binding") > 0 {
            first_bind = Some(Instant::now());
        }
        let succeeded = api
            .list::<Pod>()
            .iter()
            .filter(|p| {
                p.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("hami.io/bind-phase"))
                    .is_some_and(|v| v == "success")
            })
            .count();
        if succeeded == PODS || Instant::now() > deadline {
            break succeeded;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let elapsed = first_bind.map(|t| t.elapsed()).unwrap_or_default();
    let rejected = node.kubelet.log().rejected;
    assert!(rejected.is_empty(), "{rejected:?}");
    task.abort();
    node.agent.stop().await;
    (elapsed, done)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!("fill one node of 8 A10G (split 10) with {PODS} one-card pods created at once:");
    for round in 1..=3 {
        let (elapsed, done) = runtime.block_on(fill_once());
        println!(
            "  round {round}: {done}/{PODS} at bind-phase success {:.3} s after the first bind ({:.1} ms per pod)",
            elapsed.as_secs_f64(),
            elapsed.as_secs_f64() * 1000.0 / PODS as f64
        );
    }
}
