//! Pod-topology rules through the shell against the API stand-in: required
//! anti-affinity spreads replicas and explains the leftover with
//! kube-scheduler's wording, a `namespaceSelector` reads the watched
//! Namespaces' labels, and a pod with scheduling gates waits without
//! Events until its gates are removed.

use crate::common::wait_until;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::events::v1::Event;
use serde_json::{json, Value};
use tessera_api::config::Config;
use tessera_scheduler::shell::{Scheduler, ShellOptions};
use tessera_testkit::ApiServer;

fn node(name: &str) -> Node {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}],
                   "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110", "nvidia.com/gpu": "100"}}}))
    .expect("node")
}

fn pod(name: &str, namespace: &str, labels: Value, spec: Value) -> Pod {
    let mut full = json!({"schedulerName": "tessera-scheduler",
        "containers": [{"name": "main", "image": "x", "resources": {"requests": {"cpu": "100m"}}}]});
    if let (Some(f), Some(e)) = (full.as_object_mut(), spec.as_object()) {
        for (k, v) in e {
            f.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels}, "spec": full}))
    .expect("pod")
}

fn anti_affinity(term: Value) -> Value {
    json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}})
}

fn node_of(server: &ApiServer, namespace: &str, name: &str) -> Option<String> {
    server
        .get::<Pod>(Some(namespace), name)
        .and_then(|p| p.spec.and_then(|s| s.node_name))
}

fn events_about(server: &ApiServer, name: &str) -> Vec<Event> {
    server
        .list::<Event>()
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect()
}

fn start(server: &ApiServer) -> tokio::task::JoinHandle<()> {
    let scheduler = Scheduler::new(server.client(), Config::default(), ShellOptions::default());
    tokio::spawn(async move {
        let _ = scheduler.run().await;
    })
}

#[tokio::test]
async fn anti_affinity_replicas_take_one_node_each_and_the_leftover_is_explained() {
    let server = ApiServer::start().await.expect("server");
    server.insert(&node("n1"));
    server.insert(&node("n2"));
    let term = json!({"labelSelector": {"matchLabels": {"app": "vllm"}}, "topologyKey": "kubernetes.io/hostname"});
    for i in 0..3 {
        server.insert(&pod(
            &format!("vllm-{i}"),
            "team",
            json!({"app": "vllm"}),
            anti_affinity(term.clone()),
        ));
    }
    let handle = start(&server);
    wait_until("two replicas bound", || {
        (0..3)
            .filter(|i| node_of(&server, "team", &format!("vllm-{i}")).is_some())
            .count()
            == 2
    })
    .await;
    let mut nodes: Vec<String> = (0..3)
        .filter_map(|i| node_of(&server, "team", &format!("vllm-{i}")))
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["n1", "n2"]);
    let leftover = (0..3)
        .map(|i| format!("vllm-{i}"))
        .find(|name| node_of(&server, "team", name).is_none())
        .expect("one left over");
    wait_until("FailedScheduling on the leftover", || {
        events_about(&server, &leftover).iter().any(|e| {
            e.reason.as_deref() == Some("FailedScheduling")
                && e.note.as_deref().is_some_and(|n| {
                    n.contains(
                        "0/2 nodes are available: 2 node(s) didn't match pod anti-affinity rules",
                    )
                })
        })
    })
    .await;
    handle.abort();
}

#[tokio::test]
async fn namespace_selectors_read_the_watched_namespaces() {
    let server = ApiServer::start().await.expect("server");
    server.insert(&node("n1"));
    server.insert(&node("n2"));
    let labelled: Namespace =
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "team-a", "labels": {"team": "a"}}}))
        .expect("namespace");
    server.insert(&labelled);
    let mut cache = pod("cache", "team-a", json!({"app": "cache"}), json!({}));
    if let Some(spec) = cache.spec.as_mut() {
        spec.node_name = Some("n1".into());
        spec.scheduler_name = None;
    }
    server.insert(&cache);
    // Away from any app=cache pod in namespaces labelled team=a.
    let term = json!({"labelSelector": {"matchLabels": {"app": "cache"}},
        "namespaceSelector": {"matchLabels": {"team": "a"}}, "topologyKey": "kubernetes.io/hostname"});
    server.insert(&pod("server", "team", json!({}), anti_affinity(term)));
    let handle = start(&server);
    wait_until("server bound", || {
        node_of(&server, "team", "server").is_some()
    })
    .await;
    assert_eq!(node_of(&server, "team", "server").as_deref(), Some("n2"));
    handle.abort();
}

#[tokio::test]
async fn gated_pods_wait_quietly_until_their_gates_are_removed() {
    let server = ApiServer::start().await.expect("server");
    server.insert(&node("n1"));
    server.insert(&pod(
        "gated",
        "team",
        json!({}),
        json!({"schedulingGates": [{"name": "example.com/quota"}]}),
    ));
    server.insert(&pod("free", "team", json!({}), json!({})));
    let handle = start(&server);
    wait_until("the ungated pod bound", || {
        node_of(&server, "team", "free").is_some()
    })
    .await;
    // The decision loop has run; the gated pod was not scheduled nor reported.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(node_of(&server, "team", "gated"), None);
    assert!(
        events_about(&server, "gated").is_empty(),
        "no FailedScheduling for a gated pod"
    );
    // The gate's owner removes it: the pod is scheduled.
    let mut ungated = server.get::<Pod>(Some("team"), "gated").expect("pod");
    if let Some(spec) = ungated.spec.as_mut() {
        spec.scheduling_gates = None;
    }
    server.insert(&ungated);
    wait_until("the ungated pod bound", || {
        node_of(&server, "team", "gated").is_some()
    })
    .await;
    handle.abort();
}
