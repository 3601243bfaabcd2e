//! Tests of the placement core: every predicate and policy, the example
//! co-location, concurrency of assumptions, restart recovery and corrupt
//! input.

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{json, Value};
use tessera_api::allocation::{decode_pod_devices, PodDevices};
use tessera_api::config::Config;
use tessera_api::inventory::{encode_inventory, GpuDevice};
use tessera_api::names::allocation as keys;

use super::*;

fn cards(prefix: &str, count: u32, kind: &str, mib: u64) -> Vec<GpuDevice> {
    (0..count)
        .map(|i| GpuDevice {
            id: format!("GPU-{prefix}-{i}"),
            index: i,
            count: 10,
            devmem: mib,
            devcore: 100,
            device_type: format!("NVIDIA-{kind}"),
            numa: i32::try_from(i / 2).unwrap_or(0),
            mode: "hami-core".into(),
            health: true,
        })
        .collect()
}

fn node_json(name: &str, devices: &[GpuDevice]) -> Value {
    json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name},
            "annotations": {"hami.io/node-nvidia-register": encode_inventory(devices)}},
           "status": {"conditions": [{"type": "Ready", "status": "True"}],
                      "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110", "nvidia.com/gpu": "40"}}})
}

fn node(name: &str, devices: &[GpuDevice]) -> Node {
    serde_json::from_value(node_json(name, devices)).expect("node")
}

fn pod_with(name: &str, limits: Value, annotations: Value) -> Pod {
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": "default", "annotations": annotations},
        "spec": {"schedulerName": "tessera-scheduler", "containers": [{"name": "main", "resources": {"limits": limits}}]}}))
    .expect("pod")
}

fn gpu_pod(name: &str, limits: Value) -> Pod {
    pod_with(name, limits, json!({}))
}

fn example_cluster() -> ClusterState {
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&node("t4-node", &cards("t4", 4, "Tesla T4", 15360)));
    state.upsert_node(&node("a10g-node", &cards("a10g", 4, "NVIDIA A10G", 23028)));
    state
}

fn place(state: &mut ClusterState, pod: &Pod) -> Placement {
    let placement = state.schedule(pod).expect("fits");
    state.assume(&placement.pod, placement.charge.clone());
    placement
}

fn unschedulable(state: &ClusterState, pod: &Pod) -> String {
    match state.schedule(pod) {
        Err(ScheduleError::Unschedulable(u)) => u.to_string(),
        other => panic!("expected unschedulable, got {other:?}"),
    }
}

#[test]
fn binpack_colocates_percentage_pods_on_one_a10g() {
    let mut state = example_cluster();
    let annotations =
        json!({"hami.io/gpu-scheduler-policy": "binpack", "nvidia.com/use-gputype": "A10G"});
    let a = place(
        &mut state,
        &pod_with(
            "a",
            json!({"nvidia.com/gpumem-percentage": "45"}),
            annotations.clone(),
        ),
    );
    let b = place(
        &mut state,
        &pod_with(
            "b",
            json!({"nvidia.com/gpumem-percentage": "45"}),
            annotations,
        ),
    );
    assert_eq!(a.node, "a10g-node");
    assert_eq!(a.containers[0][0].uuid, b.containers[0][0].uuid);
    assert_eq!(a.containers[0][0].memory_mib, 23028 * 45 / 100);
}

#[test]
fn spread_keeps_pods_apart() {
    let mut state = example_cluster();
    let annotations =
        json!({"hami.io/gpu-scheduler-policy": "spread", "nvidia.com/use-gputype": "T4"});
    let a = place(
        &mut state,
        &pod_with(
            "a",
            json!({"nvidia.com/gpumem": "7500"}),
            annotations.clone(),
        ),
    );
    let b = place(
        &mut state,
        &pod_with("b", json!({"nvidia.com/gpumem": "7500"}), annotations),
    );
    assert_ne!(a.containers[0][0].uuid, b.containers[0][0].uuid);
}

#[test]
fn t4_replicas_share_a_card_with_7500_each_and_a_third_moves_on() {
    let mut state = example_cluster();
    let annotations =
        json!({"hami.io/gpu-scheduler-policy": "binpack", "nvidia.com/use-gputype": "T4"});
    let placements: Vec<Placement> = (0..3)
        .map(|i| {
            place(
                &mut state,
                &pod_with(
                    &format!("t{i}"),
                    json!({"nvidia.com/gpumem": "7500"}),
                    annotations.clone(),
                ),
            )
        })
        .collect();
    assert_eq!(
        placements[0].containers[0][0].uuid,
        placements[1].containers[0][0].uuid
    );
    assert_eq!(placements[0].containers[0][0].memory_mib, 7500);
    assert_ne!(
        placements[2].containers[0][0].uuid, placements[0].containers[0][0].uuid,
        "15000 of 15360 MiB used"
    );
}

#[test]
fn node_policies_pick_fullest_or_emptiest_node() {
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&node("n1", &cards("a", 2, "T4", 15360)));
    state.upsert_node(&node("n2", &cards("b", 2, "T4", 15360)));
    let first = place(
        &mut state,
        &gpu_pod("p1", json!({"nvidia.com/gpumem": "1000"})),
    );
    let binpack = state
        .schedule(&gpu_pod("p2", json!({"nvidia.com/gpumem": "1000"})))
        .expect("fits");
    assert_eq!(
        binpack.node, first.node,
        "binpack is the default node policy"
    );
    let spread = state
        .schedule(&pod_with(
            "p3",
            json!({"nvidia.com/gpumem": "1000"}),
            json!({"hami.io/node-scheduler-policy": "spread"}),
        ))
        .expect("fits");
    assert_ne!(spread.node, first.node);
}

#[test]
fn multi_card_containers_get_distinct_cards_and_numa_binding() {
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&node("n", &cards("a", 4, "A100", 40000)));
    let two = place(
        &mut state,
        &gpu_pod(
            "p",
            json!({"nvidia.com/gpu": "2", "nvidia.com/gpumem": "1000"}),
        ),
    );
    assert_eq!(two.containers[0].len(), 2);
    assert_ne!(two.containers[0][0].uuid, two.containers[0][1].uuid);

    // Cards 0,1 are on NUMA 0 and 2,3 on NUMA 1; fill card 1 so NUMA 0 has one free card.
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&node("n", &cards("a", 4, "A100", 40000)));
    place(
        &mut state,
        &pod_with(
            "fill",
            json!({"nvidia.com/gpumem": "40000"}),
            json!({"nvidia.com/use-gpuuuid": "GPU-a-0"}),
        ),
    );
    let bound = place(
        &mut state,
        &pod_with(
            "numa",
            json!({"nvidia.com/gpu": "2", "nvidia.com/gpumem": "1000"}),
            json!({"nvidia.com/numa-bind": "true"}),
        ),
    );
    let uuids: Vec<&str> = bound.containers[0]
        .iter()
        .map(|d| d.uuid.as_str())
        .collect();
    assert_eq!(uuids.len(), 2);
    assert!(
        uuids.contains(&"GPU-a-2") && uuids.contains(&"GPU-a-3"),
        "{uuids:?}"
    );
    place(
        &mut state,
        &pod_with(
            "fill2",
            json!({"nvidia.com/gpumem": "39000"}),
            json!({"nvidia.com/use-gpuuuid": "GPU-a-2"}),
        ),
    );
    let message = unschedulable(
        &state,
        &pod_with(
            "numa2",
            json!({"nvidia.com/gpu": "2", "nvidia.com/gpumem": "30000"}),
            json!({"nvidia.com/numa-bind": "true"}),
        ),
    );
    assert!(message.contains("NUMA"), "{message}");
}

#[test]
fn cores_split_count_and_exclusivity() {
    let mut state = ClusterState::new(Config::default());
    let mut one = cards("a", 1, "T4", 15360);
    one[0].count = 2;
    state.upsert_node(&node("n", &one));
    place(
        &mut state,
        &gpu_pod(
            "c70",
            json!({"nvidia.com/gpumem": "100", "nvidia.com/gpucores": "70"}),
        ),
    );
    let message = unschedulable(
        &state,
        &gpu_pod(
            "c40",
            json!({"nvidia.com/gpumem": "100", "nvidia.com/gpucores": "40"}),
        ),
    );
    assert!(
        message.contains("insufficient GPU cores on every card"),
        "{message}"
    );
    place(
        &mut state,
        &gpu_pod(
            "c30",
            json!({"nvidia.com/gpumem": "100", "nvidia.com/gpucores": "30"}),
        ),
    );
    let message = unschedulable(&state, &gpu_pod("c0", json!({"nvidia.com/gpumem": "100"})));
    assert!(message.contains("split count"), "{message}");

    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&node("n", &cards("a", 1, "T4", 15360)));
    place(
        &mut state,
        &gpu_pod("whole", json!({"nvidia.com/gpu": "1"})),
    );
    let message = unschedulable(
        &state,
        &gpu_pod(
            "small",
            json!({"nvidia.com/gpumem": "10", "nvidia.com/gpucores": "1"}),
        ),
    );
    assert!(message.contains("exclusively"), "{message}");

    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&node("n", &cards("a", 1, "T4", 15360)));
    place(
        &mut state,
        &gpu_pod("small", json!({"nvidia.com/gpumem": "10"})),
    );
    let message = unschedulable(
        &state,
        &gpu_pod(
            "exclusive",
            json!({"nvidia.com/gpumem": "10", "nvidia.com/gpucores": "100"}),
        ),
    );
    assert!(message.contains("exclusive card requested"), "{message}");
}

#[test]
fn type_and_uuid_filters_and_health() {
    let state = example_cluster();
    let message = unschedulable(
        &state,
        &pod_with(
            "h",
            json!({"nvidia.com/gpumem": "1000"}),
            json!({"nvidia.com/use-gputype": "H100"}),
        ),
    );
    assert_eq!(
        message,
        "2/2 nodes: card type not in use-gputype [h100] on every card"
    );
    let placed = state
        .schedule(&pod_with(
            "not-t4",
            json!({"nvidia.com/gpumem": "1000"}),
            json!({"nvidia.com/nouse-gputype": "t4"}),
        ))
        .expect("fits");
    assert_eq!(placed.node, "a10g-node");
    let pinned = state
        .schedule(&pod_with(
            "pin",
            json!({"nvidia.com/gpumem": "1000"}),
            json!({"nvidia.com/use-gpuuuid": "GPU-t4-3"}),
        ))
        .expect("fits");
    assert_eq!(pinned.containers[0][0].uuid, "GPU-t4-3");
    let avoided = state
        .schedule(&pod_with("avoid", json!({"nvidia.com/gpumem": "1000"}), json!({"nvidia.com/use-gputype": "T4", "nvidia.com/nouse-gpuuuid": "GPU-t4-0,GPU-t4-1"})))
        .expect("fits");
    assert_eq!(avoided.containers[0][0].uuid, "GPU-t4-2");

    let mut state = ClusterState::new(Config::default());
    let mut sick = cards("s", 2, "T4", 15360);
    sick[0].health = false;
    state.upsert_node(&node("n", &sick));
    let placed = state
        .schedule(&gpu_pod("p", json!({"nvidia.com/gpumem": "1000"})))
        .expect("fits");
    assert_eq!(placed.containers[0][0].uuid, "GPU-s-1");
    sick[1].health = false;
    state.upsert_node(&node("n", &sick));
    assert!(
        unschedulable(&state, &gpu_pod("p", json!({"nvidia.com/gpumem": "1000"})))
            .contains("card unhealthy on every card")
    );
}

#[test]
fn memory_reasons_are_counted_per_node() {
    let state = example_cluster();
    let message = unschedulable(
        &state,
        &gpu_pod("big", json!({"nvidia.com/gpumem": "30000"})),
    );
    assert_eq!(message, "2/2 nodes: insufficient GPU memory on every card");
}

#[test]
fn node_predicates_and_plain_resources_apply() {
    let mut state = ClusterState::new(Config::default());
    let mut tainted = node_json("tainted", &cards("a", 1, "T4", 15360));
    tainted["spec"] =
        json!({"taints": [{"key": "dedicated", "value": "x", "effect": "NoSchedule"}]});
    state.upsert_node(&serde_json::from_value(tainted).expect("node"));
    let mut not_ready = node_json("down", &cards("b", 1, "T4", 15360));
    not_ready["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
    state.upsert_node(&serde_json::from_value(not_ready).expect("node"));
    let mut small = node_json("small", &cards("c", 1, "T4", 15360));
    small["status"]["allocatable"]["cpu"] = json!("1");
    state.upsert_node(&serde_json::from_value(small).expect("node"));
    let pod: Pod = serde_json::from_value(
        json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "main",
        "resources": {"requests": {"cpu": "2"}, "limits": {"nvidia.com/gpumem": "100"}}}]}}),
    )
    .expect("pod");
    let message = unschedulable(&state, &pod);
    assert!(message.contains("1/3 nodes: insufficient cpu"), "{message}");
    assert!(
        message.contains("1/3 nodes: node is not Ready"),
        "{message}"
    );
    assert!(
        message.contains("1/3 nodes: untolerated taint dedicated=x:NoSchedule"),
        "{message}"
    );
}

#[test]
fn corrupt_inventory_skips_the_node_with_a_reason() {
    let mut state = example_cluster();
    let mut bad = node_json("bad", &[]);
    bad["metadata"]["annotations"]["hami.io/node-nvidia-register"] =
        json!("GPU-x,notanumber,1,1,T,0,true:");
    let error = state.upsert_node(&serde_json::from_value(bad).expect("node"));
    assert!(error.is_some_and(|e| e.contains("count")));
    let message = unschedulable(&state, &gpu_pod("p", json!({"nvidia.com/gpumem": "99999"})));
    assert!(
        message.contains("1/3 nodes: GPU inventory annotation is corrupt"),
        "{message}"
    );
    assert!(state
        .schedule(&gpu_pod("q", json!({"nvidia.com/gpumem": "100"})))
        .is_ok());
}

#[test]
fn invalid_requests_are_not_retryable() {
    let state = example_cluster();
    let result = state.schedule(&gpu_pod(
        "p",
        json!({"nvidia.com/gpumem-percentage": "150"}),
    ));
    assert!(
        matches!(result, Err(ScheduleError::InvalidRequest(_))),
        "{result:?}"
    );
}

#[test]
fn many_assumptions_on_one_node_never_exceed_a_card() {
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&node("n", &cards("a", 2, "T4", 15360)));
    let mut placed = 0;
    for i in 0..50 {
        if let Ok(p) = state.schedule(&gpu_pod(
            &format!("p{i}"),
            json!({"nvidia.com/gpumem": "4000"}),
        )) {
            state.assume(&p.pod, p.charge.clone());
            placed += 1;
        }
    }
    assert_eq!(placed, 6, "3 × 4000 MiB fit on each 15360 MiB card");
    for card in &state.nodes()["n"].cards {
        assert!(card.usage.memory_mib <= card.device.devmem);
    }
    state.forget_assumed("default/p0");
    assert!(
        state
            .schedule(&gpu_pod("again", json!({"nvidia.com/gpumem": "4000"})))
            .is_ok(),
        "rollback frees the card"
    );
}

#[test]
fn restart_rebuilds_charges_from_annotations() {
    let state = example_cluster();
    let annotations =
        json!({"hami.io/gpu-scheduler-policy": "binpack", "nvidia.com/use-gputype": "T4"});
    let first = state
        .schedule(&pod_with(
            "a",
            json!({"nvidia.com/gpumem": "15000"}),
            annotations.clone(),
        ))
        .expect("fits");
    // The bind landed (annotations + nodeName), then the scheduler restarted.
    let mut bound = serde_json::to_value(pod_with(
        "a",
        json!({"nvidia.com/gpumem": "15000"}),
        annotations.clone(),
    ))
    .expect("json");
    bound["metadata"]["annotations"] =
        serde_json::to_value(first.annotations(1_700_000_000)).expect("json");
    bound["spec"]["nodeName"] = json!("t4-node");
    let bound: Pod = serde_json::from_value(bound).expect("pod");
    let mut restarted = example_cluster();
    restarted.observe_pod(&bound);
    let second = restarted
        .schedule(&pod_with(
            "b",
            json!({"nvidia.com/gpumem": "15000"}),
            annotations,
        ))
        .expect("fits");
    assert_ne!(
        second.containers[0][0].uuid, first.containers[0][0].uuid,
        "the card is not double-allocated"
    );
    let recorded = decode_pod_devices(
        &bound.metadata.annotations.as_ref().expect("a")[keys::DEVICES_ALLOCATED],
    )
    .expect("decodes");
    assert_eq!(recorded, first.containers);

    // A finished pod gives its card back.
    let mut done = serde_json::to_value(&bound).expect("json");
    done["status"] = json!({"phase": "Succeeded"});
    restarted.observe_pod(&serde_json::from_value(done).expect("pod"));
    assert_eq!(
        restarted.nodes()["t4-node"]
            .cards
            .iter()
            .map(|c| c.usage.memory_mib)
            .sum::<u64>(),
        0
    );
}

#[test]
fn pods_seen_before_their_node_are_charged_when_it_appears() {
    let mut state = ClusterState::new(Config::default());
    let devices = cards("a", 1, "T4", 15360);
    let mut bound =
        serde_json::to_value(gpu_pod("a", json!({"nvidia.com/gpumem": "15000"}))).expect("json");
    bound["metadata"]["annotations"] = json!({"hami.io/devices-x": "", "hami.io/vgpu-devices-allocated": "GPU-a-0,NVIDIA,15000,0:;"});
    bound["spec"]["nodeName"] = json!("n");
    state.observe_pod(&serde_json::from_value(bound).expect("pod"));
    state.upsert_node(&node("n", &devices));
    assert_eq!(state.nodes()["n"].cards[0].usage.memory_mib, 15000);
}

#[test]
fn init_containers_are_charged_at_their_peak_not_added() {
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&node("n", &cards("a", 1, "T4", 15360)));
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {
        "initContainers": [{"name": "init", "resources": {"limits": {"nvidia.com/gpumem": "10000"}}}],
        "containers": [{"name": "main", "resources": {"limits": {"nvidia.com/gpumem": "4000"}}}]}}))
    .expect("pod");
    let placement = place(&mut state, &pod);
    assert_eq!(
        placement.annotated_devices().len(),
        2,
        "init container listed first"
    );
    assert_eq!(state.nodes()["n"].cards[0].usage.memory_mib, 10000);
}

#[test]
fn decisions_are_deterministic() {
    // Identical nodes and cards tie on every score: the same pods must land
    // in the same places however the nodes arrived (reflector order is not
    // a contract) and whichever policy breaks the ties.
    let orders = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    let names = ["gpu-a", "gpu-b", "gpu-c"];
    let pods: Vec<Pod> = (0..12)
        .map(|i| {
            let policy = if i % 2 == 0 { "spread" } else { "binpack" };
            pod_with(
                &format!("p{i}"),
                json!({"nvidia.com/gpumem": (1000 + 500 * (i % 3)).to_string()}),
                json!({"hami.io/gpu-scheduler-policy": policy, "hami.io/node-scheduler-policy": policy}),
            )
        })
        .collect();
    let placements = |order: &[usize; 3]| -> Vec<(String, PodDevices)> {
        let mut state = ClusterState::new(Config::default());
        for &n in order {
            state.upsert_node(&node(names[n], &cards(names[n], 4, "NVIDIA A10G", 23028)));
        }
        pods.iter()
            .map(|pod| {
                let placement = place(&mut state, pod);
                (placement.node.clone(), placement.containers.clone())
            })
            .collect()
    };
    let first = placements(&orders[0]);
    let nodes_used: std::collections::BTreeSet<&String> = first.iter().map(|(n, _)| n).collect();
    assert!(
        nodes_used.len() > 1,
        "spread pods used several nodes: {first:?}"
    );
    for order in &orders[1..] {
        assert_eq!(placements(order), first, "node order {order:?}");
    }
}
