//! The scheduler's side of exact allocation, against the API stand-in over
//! real HTTP: on one node at most one bind per shape waits for kubelet and
//! the node agent; the next is bound when the first is acknowledged, ends,
//! is deleted or times out; a restarted scheduler keeps the gate of a bind
//! still unacknowledged; and only allocations sealed with Tessera's key are
//! charged (forged ones get a Warning Event).

use crate::common::bound_pods;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{json, Value};
use tessera_api::allocation_seal::SealKey;
use tessera_api::config::Config;
use tessera_scheduler::shell::{Scheduler, ShellOptions};
use tessera_testkit::fixtures::{gpu_node, t4_cards};
use tessera_testkit::{annotation, eventually_within, ApiServer};

const WAIT: Duration = Duration::from_secs(15);

fn node(name: &str, cards: u32) -> Node {
    gpu_node(name, &t4_cards(&format!("GPU-{name}"), cards), "100")
}

fn pod(name: &str, memory_mib: u64) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "team", "annotations": {}},
        "spec": {"schedulerName": "tessera-scheduler",
                 "containers": [{"name": "main", "image": "x", "resources": {"limits": {"nvidia.com/gpumem": memory_mib.to_string()}}}]}})
}

fn start(server: &ApiServer, options: ShellOptions) -> tokio::task::JoinHandle<()> {
    let scheduler = Scheduler::new(server.client(), Config::default(), options);
    tokio::spawn(async move {
        let _ = scheduler.run().await;
    })
}

fn names(pods: &[Pod]) -> Vec<String> {
    pods.iter()
        .map(|p| p.metadata.name.clone().unwrap_or_default())
        .collect()
}

/// Sets a pod's bind phase as the node agent would.
fn set_phase(server: &ApiServer, name: &str, phase: &str) {
    let mut pod = server
        .get_value("v1", "pods", Some("team"), name)
        .expect("pod");
    pod["metadata"]["annotations"]["hami.io/bind-phase"] = json!(phase);
    server.insert_value("v1", "pods", pod);
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(600)).await;
}

#[tokio::test]
async fn one_bind_per_node_and_shape_waits_for_its_acknowledgement() {
    let server = ApiServer::start().await.expect("server");
    server.insert(&node("gpu-1", 2));
    for name in ["a", "b", "c"] {
        server.insert_value("v1", "pods", pod(name, 1000));
    }
    let handle = start(&server, ShellOptions::default());
    eventually_within(WAIT, "the first bind", || {
        (bound_pods(&server).len() == 1).then_some(())
    })
    .await;
    settle().await;
    assert_eq!(
        bound_pods(&server).len(),
        1,
        "the others wait for the first"
    );
    let first = names(&bound_pods(&server))[0].clone();
    set_phase(&server, &first, "success");
    eventually_within(WAIT, "the second bind", || {
        (bound_pods(&server).len() == 2).then_some(())
    })
    .await;
    settle().await;
    assert_eq!(bound_pods(&server).len(), 2);
    // Deleted mid-allocation: its gate opens and its charge is freed.
    let second = names(&bound_pods(&server))
        .into_iter()
        .find(|n| *n != first)
        .expect("second");
    server.delete_value("v1", "pods", Some("team"), &second);
    eventually_within(WAIT, "the third bind", || {
        (bound_pods(&server).len() == 2 && !names(&bound_pods(&server)).contains(&second))
            .then_some(())
    })
    .await;
    // A finished pod opens its gate too.
    server.insert_value("v1", "pods", pod("d", 1000));
    let third = names(&bound_pods(&server))
        .into_iter()
        .find(|n| *n != first)
        .expect("third");
    let mut done = server
        .get_value("v1", "pods", Some("team"), &third)
        .expect("pod");
    done["status"]["phase"] = json!("Failed");
    server.insert_value("v1", "pods", done);
    eventually_within(WAIT, "the fourth bind", || {
        names(&bound_pods(&server))
            .contains(&"d".to_owned())
            .then_some(())
    })
    .await;
    handle.abort();
}

#[tokio::test]
async fn pods_of_another_shape_or_node_do_not_wait() {
    let server = ApiServer::start().await.expect("server");
    server.insert(&node("gpu-1", 2));
    server.insert_value("v1", "pods", pod("one", 1000));
    let mut two = pod("two", 1000);
    two["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = json!("2");
    server.insert_value("v1", "pods", two);
    let handle = start(&server, ShellOptions::default());
    eventually_within(WAIT, "both shapes bound at once", || {
        (bound_pods(&server).len() == 2).then_some(())
    })
    .await;
    handle.abort();
}

#[tokio::test]
async fn an_unadmitted_bind_times_out_and_the_next_pod_proceeds() {
    let server = ApiServer::start().await.expect("server");
    server.insert(&node("gpu-1", 1));
    server.insert_value("v1", "pods", pod("stuck", 1000));
    let options = ShellOptions {
        allocation_timeout: Duration::from_secs(1),
        ..ShellOptions::default()
    };
    let handle = start(&server, options);
    eventually_within(WAIT, "the first bind", || {
        (bound_pods(&server).len() == 1).then_some(())
    })
    .await;
    server.insert_value("v1", "pods", pod("next", 1000));
    eventually_within(WAIT, "the stuck pod failed and the next bound", || {
        let pods = bound_pods(&server);
        let stuck = pods
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some("stuck"))?;
        (pods.len() == 2 && annotation(stuck, "hami.io/bind-phase").as_deref() == Some("failed"))
            .then_some(())
    })
    .await;
    eventually_within(WAIT, "a GPUAllocationTimeout event", || {
        server
            .list_values("events.k8s.io/v1", "events", None)
            .iter()
            .any(|e| e["reason"] == "GPUAllocationTimeout" && e["regarding"]["name"] == "stuck")
            .then_some(())
    })
    .await;
    handle.abort();
}

#[tokio::test]
async fn a_restarted_scheduler_keeps_the_gate_of_an_unacknowledged_bind() {
    let server = ApiServer::start().await.expect("server");
    let key = SealKey::from_bytes(&[5; 32]).expect("key");
    server.insert(&node("gpu-1", 1));
    server.insert_value("v1", "pods", pod("before", 1000));
    let sealed = || ShellOptions {
        seal_key: Some(key.clone()),
        ..ShellOptions::default()
    };
    let first = start(&server, sealed());
    eventually_within(WAIT, "the first bind", || {
        (bound_pods(&server).len() == 1).then_some(())
    })
    .await;
    first.abort();
    // Restart between the bind and kubelet's admission.
    server.insert_value("v1", "pods", pod("after", 1000));
    let second = start(&server, sealed());
    settle().await;
    settle().await;
    assert_eq!(
        names(&bound_pods(&server)),
        vec!["before"],
        "the restarted scheduler waits for the unacknowledged bind"
    );
    set_phase(&server, "before", "success");
    eventually_within(WAIT, "the next bind after the acknowledgement", || {
        (bound_pods(&server).len() == 2).then_some(())
    })
    .await;
    second.abort();
}

#[tokio::test]
async fn forged_allocations_are_not_charged_and_get_a_warning() {
    let server = ApiServer::start().await.expect("server");
    let key = SealKey::from_bytes(&[6; 32]).expect("key");
    server.insert(&node("gpu-1", 1));
    // A busybox pod claiming the whole card with hand-written annotations.
    let mut forged = placed_elsewhere("forged", "default-scheduler", "15360,100");
    forged["spec"]["containers"][0]["resources"] = json!({});
    server.insert_value("v1", "pods", forged);
    server.insert_value("v1", "pods", pod("honest", 15000));
    let _kubelet = server.acknowledge_allocations(Duration::ZERO);
    let handle = start_sealed(&server, &key);
    let honest = eventually_within(WAIT, "the honest pod placed on the card", || {
        bound_pods(&server)
            .into_iter()
            .find(|p| p.metadata.name.as_deref() == Some("honest"))
    })
    .await;
    // Its allocation carries a seal that verifies with the key.
    let sealed = key.verify_pod(&honest).expect("sealed").expect("allocated");
    assert_eq!(sealed.devices[0][0].uuid, "GPU-gpu-1-0");
    eventually_within(WAIT, "an UntrustedGPUAllocation event", || {
        server
            .list_values("events.k8s.io/v1", "events", None)
            .iter()
            .any(|e| e["reason"] == "UntrustedGPUAllocation" && e["regarding"]["name"] == "forged")
            .then_some(())
    })
    .await;
    handle.abort();
}

/// A running pod `scheduler` placed on gpu-1's card, holding `share`
/// (`<MiB>,<cores>`) of it, with HAMi's annotations and no seal.
fn placed_elsewhere(name: &str, scheduler: &str, share: &str) -> Value {
    let mut placed = pod(name, 1);
    placed["spec"]["schedulerName"] = json!(scheduler);
    placed["spec"]["nodeName"] = json!("gpu-1");
    placed["metadata"]["annotations"] = json!({
        "hami.io/vgpu-node": "gpu-1",
        "hami.io/vgpu-devices-allocated": format!("GPU-gpu-1-0,NVIDIA,{share}:;"),
        "hami.io/vgpu-devices-to-allocate": ";",
        "hami.io/bind-phase": "success"});
    placed["status"] = json!({"phase": "Running"});
    placed
}

/// A pod HAMi's scheduler placed, holding `memory_mib` of gpu-1's card.
fn hami_placed(name: &str, memory_mib: u64) -> Value {
    placed_elsewhere(name, "hami-scheduler", &format!("{memory_mib},0"))
}

/// The scheduler, sealing with and believing only `key`.
fn start_sealed(server: &ApiServer, key: &SealKey) -> tokio::task::JoinHandle<()> {
    start(
        server,
        ShellOptions {
            seal_key: Some(key.clone()),
            ..ShellOptions::default()
        },
    )
}

#[tokio::test]
async fn placements_made_before_tessera_are_adopted_and_later_ones_are_not() {
    let server = ApiServer::start().await.expect("server");
    server.insert(&node("gpu-1", 1));
    // Placed by HAMi before the install: 10000 of the card's 15360 MiB.
    server.insert_value("v1", "pods", hami_placed("legacy", 10000));
    // Timestamps have one-second resolution: the key comes a second later.
    tokio::time::sleep(Duration::from_millis(1050)).await;
    let key = tessera_scheduler::shell::seal_key::load_or_create(server.client(), "tessera")
        .await
        .expect("key");
    // The same annotations written after the install prove nothing.
    server.insert_value("v1", "pods", hami_placed("later", 5000));
    let _kubelet = server.acknowledge_allocations(Duration::ZERO);
    let handle = start_sealed(&server, &key);
    let legacy = eventually_within(WAIT, "the pre-install pod sealed", || {
        server
            .list::<Pod>()
            .into_iter()
            .find(|p| p.metadata.name.as_deref() == Some("legacy"))
            .filter(|p| annotation(p, "tessera.io/allocation-seal").is_some())
    })
    .await;
    let sealed = key
        .verify_pod(&legacy)
        .expect("verifies")
        .expect("allocated");
    assert_eq!(sealed.devices[0][0].memory_mib, 10000);
    let reasons = |name: &str| -> Vec<String> {
        server
            .list_values("events.k8s.io/v1", "events", None)
            .iter()
            .filter(|e| e["regarding"]["name"] == name)
            .map(|e| e["reason"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    eventually_within(WAIT, "adopted and untrusted events", || {
        (reasons("legacy") == ["AdoptedGPUAllocation"]
            && reasons("later") == ["UntrustedGPUAllocation"])
        .then_some(())
    })
    .await;
    let later = server
        .list::<Pod>()
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some("later"))
        .expect("later");
    assert_eq!(annotation(&later, "tessera.io/allocation-seal"), None);
    // The adopted 10000 MiB are charged, the later claim is not: 5000 fits
    // beside it, 6000 does not.
    server.insert_value("v1", "pods", pod("too-big", 6000));
    server.insert_value("v1", "pods", pod("fits", 5000));
    eventually_within(WAIT, "the pod that fits placed", || {
        names(&bound_pods(&server))
            .contains(&"fits".to_owned())
            .then_some(())
    })
    .await;
    settle().await;
    assert_eq!(names(&bound_pods(&server)), ["fits", "later", "legacy"]);
    handle.abort();
}
