//! Volume binding through the shell against the API stand-in, the test
//! playing the PV controller and the CSI provisioner: a
//! `WaitForFirstConsumer` claim is handed to the chosen node
//! (`volume.kubernetes.io/selected-node`) and the pod bound only once the
//! claim is; an available local PV is bound to the claim (`claimRef`) and
//! decides the node; a scheduler that dies between selecting the node and
//! binding is replaced by one that keeps the node and finishes; a claim
//! that never binds rolls the decision back with a `FailedScheduling`.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::events::v1::Event;
use serde_json::{json, Value};
use tessera_api::config::Config;
use tessera_scheduler::shell::{Scheduler, ShellOptions};
use tessera_testkit::ApiServer;

const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

fn node(name: &str) -> Node {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}],
                   "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110", "nvidia.com/gpu": "100"}}}))
    .expect("node")
}

fn class(server: &ApiServer, name: &str, provisioner: &str) {
    server.insert_value(
        "storage.k8s.io/v1",
        "storageclasses",
        json!({"metadata": {"name": name},
        "provisioner": provisioner, "volumeBindingMode": "WaitForFirstConsumer"}),
    );
}

fn claim(server: &ApiServer, name: &str, class: &str) {
    server.insert_value("v1", "persistentvolumeclaims", json!({"metadata": {"name": name, "namespace": "ml"},
        "spec": {"storageClassName": class, "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}},
        "status": {"phase": "Pending"}}));
}

fn pod_with_claim(server: &ApiServer, name: &str, claim: &str) {
    let pod: Pod = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"schedulerName": "tessera-scheduler", "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
            "containers": [{"name": "main", "image": "x", "resources": {"requests": {"cpu": "100m"}}}]}}))
    .expect("pod");
    server.insert(&pod);
}

fn local_volume(name: &str, node: &str, class: &str, claim_ref: Option<&str>) -> Value {
    let mut volume = json!({"metadata": {"name": name}, "spec": {"capacity": {"storage": "10Gi"},
        "accessModes": ["ReadWriteOnce"], "storageClassName": class, "local": {"path": "/mnt/disk"},
        "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}},
        "status": {"phase": "Available"}});
    if let Some(claim) = claim_ref {
        volume["spec"]["claimRef"] = json!({"namespace": "ml", "name": claim});
        volume["status"]["phase"] = json!("Bound");
    }
    volume
}

/// What the PV controller does once a PV names the claim: bind the claim.
fn bind_claim(server: &ApiServer, claim: &str, volume: &str) {
    let mut stored = server
        .get_value("v1", "persistentvolumeclaims", Some("ml"), claim)
        .expect("claim");
    stored["spec"]["volumeName"] = json!(volume);
    stored["status"] = json!({"phase": "Bound"});
    server.insert_value("v1", "persistentvolumeclaims", stored);
}

fn selected_node(server: &ApiServer, claim: &str) -> Option<String> {
    server
        .get::<PersistentVolumeClaim>(Some("ml"), claim)?
        .metadata
        .annotations?
        .get(SELECTED_NODE)
        .cloned()
}

fn node_of(server: &ApiServer, pod: &str) -> Option<String> {
    server.get::<Pod>(Some("ml"), pod)?.spec?.node_name
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

fn start(server: &ApiServer, options: ShellOptions) -> tokio::task::JoinHandle<()> {
    let scheduler = Scheduler::new(server.client(), Config::default(), options);
    tokio::spawn(async move {
        let _ = scheduler.run().await;
    })
}

#[tokio::test]
async fn a_wait_for_first_consumer_claim_is_provisioned_on_the_chosen_node_before_the_bind() {
    let server = ApiServer::start().await.expect("server");
    for name in ["n1", "n2", "n3"] {
        server.insert(&node(name));
    }
    class(&server, "gp3", "ebs.csi.aws.com");
    claim(&server, "cache", "gp3");
    pod_with_claim(&server, "vllm", "cache");
    let handle = start(&server, ShellOptions::default());
    let chosen = wait_for("the claim handed to a node", || {
        selected_node(&server, "cache")
    })
    .await;
    // The pod waits for its volume.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        node_of(&server, "vllm"),
        None,
        "not bound before its claim is"
    );
    // The provisioner creates the volume on that node; the claim binds.
    server.insert_value(
        "v1",
        "persistentvolumes",
        local_volume("pvc-cache", &chosen, "gp3", Some("cache")),
    );
    bind_claim(&server, "cache", "pvc-cache");
    let bound = wait_for("the pod bound", || node_of(&server, "vllm")).await;
    assert_eq!(bound, chosen);
    handle.abort();
}

#[tokio::test]
async fn an_available_local_volume_is_bound_to_the_claim_and_decides_the_node() {
    let server = ApiServer::start().await.expect("server");
    for name in ["n1", "n2", "n3"] {
        server.insert(&node(name));
    }
    class(&server, "local", "kubernetes.io/no-provisioner");
    server.insert_value(
        "v1",
        "persistentvolumes",
        local_volume("disk-n2", "n2", "local", None),
    );
    claim(&server, "data", "local");
    pod_with_claim(&server, "trainer", "data");
    let handle = start(&server, ShellOptions::default());
    let reference = wait_for("the PV's claimRef", || {
        let volume = server.get::<PersistentVolume>(None, "disk-n2")?;
        volume.spec?.claim_ref
    })
    .await;
    assert_eq!(
        (reference.namespace.as_deref(), reference.name.as_deref()),
        (Some("ml"), Some("data"))
    );
    assert_eq!(
        node_of(&server, "trainer"),
        None,
        "not bound before its claim is"
    );
    bind_claim(&server, "data", "disk-n2");
    assert_eq!(
        wait_for("the pod bound", || node_of(&server, "trainer")).await,
        "n2"
    );
    handle.abort();
}

#[tokio::test]
async fn a_scheduler_restarted_between_selecting_the_node_and_binding_keeps_the_node() {
    let server = ApiServer::start().await.expect("server");
    for name in ["n1", "n2", "n3"] {
        server.insert(&node(name));
    }
    class(&server, "gp3", "ebs.csi.aws.com");
    claim(&server, "cache", "gp3");
    pod_with_claim(&server, "vllm", "cache");
    // The first scheduler runs on a runtime of its own, so that dropping it
    // ends every task it started: a crash.
    let client_a = server.client();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let first = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async move {
            let scheduler = Scheduler::new(client_a, Config::default(), ShellOptions::default());
            tokio::select! {
                _ = scheduler.run() => {}
                _ = stopped => {}
            }
        });
    });
    let chosen = wait_for("the claim handed to a node", || {
        selected_node(&server, "cache")
    })
    .await;
    let _ = stop.send(());
    first.join().expect("first scheduler stopped");
    assert_eq!(
        node_of(&server, "vllm"),
        None,
        "the first scheduler died before binding"
    );
    // The replacement finds the claim handed to `chosen` and waits for it.
    let handle = start(&server, ShellOptions::default());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(node_of(&server, "vllm"), None);
    server.insert_value(
        "v1",
        "persistentvolumes",
        local_volume("pvc-cache", &chosen, "gp3", Some("cache")),
    );
    bind_claim(&server, "cache", "pvc-cache");
    assert_eq!(
        wait_for("the pod bound", || node_of(&server, "vllm")).await,
        chosen
    );
    assert_eq!(
        selected_node(&server, "cache").as_deref(),
        Some(chosen.as_str())
    );
    handle.abort();
}

#[tokio::test]
async fn a_claim_that_never_binds_rolls_the_decision_back() {
    let server = ApiServer::start().await.expect("server");
    server.insert(&node("n1"));
    class(&server, "gp3", "ebs.csi.aws.com");
    claim(&server, "cache", "gp3");
    pod_with_claim(&server, "vllm", "cache");
    let options = ShellOptions {
        volume_binding_timeout: Duration::from_millis(300),
        ..ShellOptions::default()
    };
    let handle = start(&server, options);
    let event = wait_for("a FailedScheduling event about the volume", || {
        server.list::<Event>().into_iter().find(|e| {
            e.reason.as_deref() == Some("FailedScheduling")
                && e.note
                    .as_deref()
                    .is_some_and(|n| n.contains("VolumeBinding") && n.contains("cache"))
        })
    })
    .await;
    assert!(
        event
            .note
            .as_deref()
            .is_some_and(|n| n.contains("not bound within")),
        "{event:?}"
    );
    assert_eq!(node_of(&server, "vllm"), None);
    handle.abort();
}

/// The CSINode watch feeds the attach limits: a node whose CSINode allows
/// no more EBS volumes is skipped, so the claim is provisioned on the other.
#[tokio::test]
async fn a_node_at_its_csi_attach_limit_is_skipped() {
    let server = ApiServer::start().await.expect("server");
    server.insert(&node("n1"));
    server.insert(&node("n2"));
    for (name, count) in [("n1", 0), ("n2", 25)] {
        server.insert_value("storage.k8s.io/v1", "csinodes", json!({"metadata": {"name": name},
            "spec": {"drivers": [{"name": "ebs.csi.aws.com", "nodeID": name, "allocatable": {"count": count}}]}}));
    }
    class(&server, "gp3", "ebs.csi.aws.com");
    claim(&server, "cache", "gp3");
    pod_with_claim(&server, "loader", "cache");
    let handle = start(&server, ShellOptions::default());
    let node = wait_for("the claim handed to a node", || {
        selected_node(&server, "cache")
    })
    .await;
    assert_eq!(
        node, "n2",
        "n1 (first by name) attaches no more EBS volumes"
    );
    handle.abort();
}
