//! Tests of namespace GPU quotas in the placement core: gpumem × cards,
//! percentages as MiB of the card picked, cores, replicas decided one after
//! another, usage from observed pods, quota changes, and a property test
//! that placements never take a namespace past its limit.

use k8s_openapi::api::core::v1::{Node, Pod, ResourceQuota};
use proptest::prelude::*;
use serde_json::{json, Value};
use tessera_api::allocation::{encode_pod_devices, ContainerDevice};
use tessera_api::config::Config;
use tessera_api::gpu_quota::{QuotaAmounts, QuotaResource};
use tessera_api::inventory::{encode_inventory, GpuDevice};

use super::quota::QuotaFigure;
use super::*;

fn cards(prefix: &str, count: u32, kind: &str, mib: u64) -> Vec<GpuDevice> {
    tessera_testkit::fixtures::cards(&format!("GPU-{prefix}"), count, kind, mib)
}

fn node(name: &str, devices: &[GpuDevice]) -> Node {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name},
            "annotations": {"hami.io/node-nvidia-register": encode_inventory(devices)}},
           "status": {"conditions": [{"type": "Ready", "status": "True"}],
                      "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "200", "nvidia.com/gpu": "80"}}}))
    .expect("node")
}

fn pod_in(namespace: &str, name: &str, limits: Value) -> Pod {
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": namespace},
        "spec": {"schedulerName": "tessera-scheduler", "containers": [{"name": "main", "resources": {"limits": limits}}]}}))
    .expect("pod")
}

fn quota(namespace: &str, name: &str, hard: Value) -> ResourceQuota {
    serde_json::from_value(
        json!({"metadata": {"name": name, "namespace": namespace}, "spec": {"hard": hard}}),
    )
    .expect("quota")
}

/// Two nodes: four T4 (15360 MiB) and four A10G (23028 MiB).
fn cluster() -> ClusterState {
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&node("t4-node", &cards("t4", 4, "Tesla T4", 15360)));
    state.upsert_node(&node("a10g-node", &cards("a10g", 4, "NVIDIA A10G", 23028)));
    state
}

fn place(state: &mut ClusterState, pod: &Pod) -> Result<Placement, ScheduleError> {
    let placement = state.schedule(pod)?;
    state.assume(&placement.pod, placement.charge.clone());
    Ok(placement)
}

fn refusal(state: &ClusterState, pod: &Pod) -> String {
    match state.schedule(pod) {
        Err(ScheduleError::Unschedulable(why)) => why.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn gpumem_counts_once_per_card() {
    let mut state = cluster();
    state.upsert_resource_quota(&quota(
        "team",
        "gpu",
        json!({"limits.nvidia.com/gpumem": "10000"}),
    ));
    let two_cards = json!({"nvidia.com/gpu": "2", "nvidia.com/gpumem": "4000"});
    place(&mut state, &pod_in("team", "a", two_cards.clone())).expect("8000 of 10000 fits");
    assert_eq!(state.quotas().used("team").memory_mib, 8000);
    let message = refusal(&state, &pod_in("team", "b", two_cards));
    for part in [
        "2/2 nodes",
        "ResourceQuotaNotFit",
        "`gpu`",
        "nvidia.com/gpumem",
        "10000 MiB",
        "8000 MiB in use + 8000 MiB requested",
    ] {
        assert!(message.contains(part), "{part:?} missing from {message}");
    }
}

#[test]
fn a_percentage_counts_as_mib_of_the_card_picked() {
    // Without a quota the tie goes to the first node by name (a10g-node);
    // 50 % of an A10G (11514 MiB) is over the quota, 50 % of a T4 (7680) is not.
    let half = json!({"nvidia.com/gpumem-percentage": "50"});
    let free = cluster().schedule(&pod_in("team", "p", half.clone()));
    assert_eq!(free.expect("fits").node, "a10g-node");
    let mut state = cluster();
    state.upsert_resource_quota(&quota(
        "team",
        "gpu",
        json!({"limits.nvidia.com/gpumem": "8000"}),
    ));
    let placed = place(&mut state, &pod_in("team", "p", half.clone())).expect("fits on a T4");
    assert_eq!(placed.node, "t4-node");
    assert_eq!(state.quotas().used("team").memory_mib, 7680);
    let message = refusal(&state, &pod_in("team", "q", half));
    assert!(
        message.contains("7680 MiB in use + 7680 MiB requested"),
        "{message}"
    );
    assert!(
        message.contains("this pod alone asks for 11514 MiB (7680 MiB in use)"),
        "{message}"
    );
}

#[test]
fn a_whole_card_by_default_takes_its_memory_and_100_cores() {
    let mut state = cluster();
    state.upsert_resource_quota(&quota(
        "team",
        "gpu",
        json!({"limits.nvidia.com/gpucores": "150"}),
    ));
    place(
        &mut state,
        &pod_in("team", "a", json!({"nvidia.com/gpu": "1"})),
    )
    .expect("100 of 150");
    let used = state.quotas().used("team");
    assert_eq!(used.cores, 100);
    assert!(
        used.memory_mib == 15360 || used.memory_mib == 23028,
        "{used:?}"
    );
    let message = refusal(&state, &pod_in("team", "b", json!({"nvidia.com/gpu": "1"})));
    assert!(message.contains("nvidia.com/gpucores"), "{message}");
    assert!(
        message.contains("100 % of a card in use + 100 % of a card requested"),
        "{message}"
    );
    // Cores the quota allows still fit.
    place(
        &mut state,
        &pod_in(
            "team",
            "c",
            json!({"nvidia.com/gpumem": "1000", "nvidia.com/gpucores": "50"}),
        ),
    )
    .expect("150 of 150");
}

#[test]
fn ten_replicas_decided_at_once_place_exactly_three() {
    let mut state = cluster();
    state.upsert_resource_quota(&quota(
        "team",
        "gpu",
        json!({"limits.nvidia.com/gpumem": "6000", "limits.nvidia.com/gpucores": "300"}),
    ));
    let replica = json!({"nvidia.com/gpumem": "2000", "nvidia.com/gpucores": "10"});
    let placed = (0..10)
        .filter(|i| {
            place(
                &mut state,
                &pod_in("team", &format!("r-{i}"), replica.clone()),
            )
            .is_ok()
        })
        .count();
    assert_eq!(placed, 3);
    assert_eq!(state.quotas().used("team").memory_mib, 6000);
    // Another namespace is not limited by team's quota.
    place(&mut state, &pod_in("other", "x", replica.clone())).expect("no quota in other");
    // A released replica makes room for exactly one more.
    state.release("team/r-0");
    assert!(place(&mut state, &pod_in("team", "r-10", replica.clone())).is_ok());
    assert!(place(&mut state, &pod_in("team", "r-11", replica)).is_err());
}

#[test]
fn observed_pods_count_and_terminal_ones_do_not() {
    let mut state = cluster();
    state.upsert_resource_quota(&quota(
        "team",
        "gpu",
        json!({"limits.nvidia.com/gpumem": "5000"}),
    ));
    let device = ContainerDevice {
        uuid: "GPU-t4-0".into(),
        vendor: "NVIDIA".into(),
        memory_mib: 4000,
        cores: 0,
    };
    let mut running: Pod = serde_json::from_value(json!({
        "metadata": {"name": "old", "namespace": "team",
            "annotations": {"hami.io/vgpu-node": "t4-node",
                "hami.io/vgpu-devices-allocated": encode_pod_devices(&[vec![device]])}},
        "spec": {"nodeName": "t4-node", "containers": [{"name": "main",
            "resources": {"limits": {"nvidia.com/gpumem": "4000"}}}]},
        "status": {"phase": "Running"}}))
    .expect("pod");
    state.observe_pod(&running);
    assert_eq!(state.quotas().used("team").memory_mib, 4000);
    let ask = pod_in("team", "new", json!({"nvidia.com/gpumem": "2000"}));
    assert!(refusal(&state, &ask).contains("4000 MiB in use + 2000 MiB requested"));
    running.status = Some(serde_json::from_value(json!({"phase": "Succeeded"})).expect("status"));
    state.observe_pod(&running);
    assert_eq!(state.quotas().used("team"), QuotaAmounts::default());
    assert!(state.schedule(&ask).is_ok());
}

#[test]
fn quota_changes_take_effect_and_the_tightest_object_wins() {
    let mut state = cluster();
    let ask = pod_in("team", "p", json!({"nvidia.com/gpumem": "3000"}));
    let wide = quota("team", "wide", json!({"limits.nvidia.com/gpumem": "10000"}));
    let tight = quota("team", "tight", json!({"limits.nvidia.com/gpumem": "2000"}));
    state.upsert_resource_quota(&wide);
    state.upsert_resource_quota(&tight);
    let message = refusal(&state, &ask);
    assert!(
        message.contains("`tight`") && message.contains("can never fit"),
        "{message}"
    );
    state.remove_resource_quota(&tight);
    assert!(state.schedule(&ask).is_ok());
    // Lowering the wide quota to 0 forbids GPU memory outright.
    state.upsert_resource_quota(&quota(
        "team",
        "wide",
        json!({"limits.nvidia.com/gpumem": "0"}),
    ));
    assert!(refusal(&state, &ask).contains("`wide`"));
    // A quota that no longer limits GPU resources lifts the limit.
    state.upsert_resource_quota(&quota("team", "wide", json!({"pods": "10"})));
    assert!(state.quotas().namespace("team").is_none());
    assert!(state.schedule(&ask).is_ok());
}

#[test]
fn pods_without_gpus_and_nodes_that_fail_otherwise_keep_their_reasons() {
    let mut state = cluster();
    state.upsert_resource_quota(&quota(
        "team",
        "gpu",
        json!({"limits.nvidia.com/gpumem": "0"}),
    ));
    let cpu_only: Pod =
        serde_json::from_value(json!({"metadata": {"name": "cpu", "namespace": "team"},
        "spec": {"containers": [{"name": "main", "resources": {"requests": {"cpu": "1"}}}]}}))
        .expect("pod");
    assert!(state.schedule(&cpu_only).is_ok());
    // 20000 MiB fits no T4: that node keeps its GPU reason.
    let message = refusal(
        &state,
        &pod_in("team", "big", json!({"nvidia.com/gpumem": "20000"})),
    );
    assert!(
        message.contains("1/2 nodes: ResourceQuotaNotFit"),
        "{message}"
    );
    assert!(
        !message.contains("2/2 nodes: ResourceQuotaNotFit"),
        "{message}"
    );
}

#[test]
fn figures_cover_limits_and_usage() {
    let mut state = cluster();
    state.upsert_resource_quota(&quota(
        "team",
        "gpu",
        json!({"limits.nvidia.com/gpumem": "9000"}),
    ));
    place(
        &mut state,
        &pod_in(
            "team",
            "a",
            json!({"nvidia.com/gpumem": "1000", "nvidia.com/gpucores": "20"}),
        ),
    )
    .expect("fits");
    place(
        &mut state,
        &pod_in("free", "b", json!({"nvidia.com/gpumem": "500"})),
    )
    .expect("fits");
    let figure = |namespace: &str, resource, used, limit| QuotaFigure {
        namespace: namespace.into(),
        resource,
        used,
        limit,
    };
    assert_eq!(
        state.quotas().figures(),
        vec![
            figure("free", QuotaResource::Memory, 500, None),
            figure("team", QuotaResource::Memory, 1000, Some(9000)),
            figure("team", QuotaResource::Cores, 20, None),
        ]
    );
}

proptest! {
    /// Whatever pods arrive, in whatever order, the namespace's placed
    /// demand never passes its limits, and a pod is refused only when it
    /// would have passed one (the cluster has room for all of them).
    #[test]
    fn placements_never_pass_the_quota(
        limit_mem in 0u64..40_000,
        limit_cores in 0u64..400,
        pods in proptest::collection::vec((1u32..3, prop_oneof![(1u64..8000).prop_map(Some), Just(None)], 0u32..60), 1..14),
    ) {
        let mut state = ClusterState::new(Config::default());
        for n in 0..4 {
            state.upsert_node(&node(&format!("n{n}"), &cards(&format!("n{n}"), 8, "A100", 81920)));
        }
        state.upsert_resource_quota(&quota("team", "gpu", json!({
            "limits.nvidia.com/gpumem": limit_mem.to_string(),
            "limits.nvidia.com/gpucores": limit_cores.to_string()})));
        for (i, (count, mib, cores)) in pods.into_iter().enumerate() {
            let memory = match mib {
                Some(mib) => json!(mib.to_string()),
                None => json!(null),
            };
            let mut limits = json!({"nvidia.com/gpu": count.to_string(), "nvidia.com/gpucores": cores.to_string()});
            match mib {
                Some(_) => limits["nvidia.com/gpumem"] = memory,
                None => limits["nvidia.com/gpumem-percentage"] = json!("10"),
            }
            let per_card = mib.unwrap_or(8192);
            let demand = QuotaAmounts { memory_mib: per_card * u64::from(count), cores: u64::from(cores * count) };
            let before = state.quotas().used("team");
            let fits = before.memory_mib + demand.memory_mib <= limit_mem
                && (demand.cores == 0 || before.cores + demand.cores <= limit_cores);
            let placed = place(&mut state, &pod_in("team", &format!("p{i}"), limits)).is_ok();
            prop_assert_eq!(placed, fits, "pod {} demand {:?} used {:?}", i, demand, before);
            let after = state.quotas().used("team");
            prop_assert!(after.memory_mib <= limit_mem || after.memory_mib == 0);
            prop_assert!(after.cores <= limit_cores || after.cores == 0);
        }
    }
}

/// A running pod of namespace `ml` holding `mib` on the card of `n1`.
fn running_in_ml(name: &str, mib: u64, priority: i32) -> Pod {
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ml",
        "annotations": {"hami.io/vgpu-devices-allocated": format!("GPU-n1-0,NVIDIA,{mib},0:;")}},
        "spec": {"nodeName": "n1", "priority": priority, "containers": [{"name": "c"}]},
        "status": {"phase": "Running"}}))
    .expect("pod")
}

#[test]
fn preemption_evicts_nobody_for_a_pod_over_its_quota() {
    let cluster = |limit: &str| {
        let mut state = ClusterState::new(Config::default());
        state.upsert_node(&node("n1", &cards("n1", 1, "Tesla T4", 15360)));
        state.observe_pod(&running_in_ml("small", 4000, 10));
        state.observe_pod(&running_in_ml("large", 8000, 10));
        state.upsert_resource_quota(&quota(
            "ml",
            "gpu",
            json!({"limits.nvidia.com/gpumem": limit}),
        ));
        state
    };
    let urgent: Pod = serde_json::from_value(json!({"metadata": {"name": "urgent", "namespace": "ml"},
        "spec": {"schedulerName": "tessera-scheduler", "priority": 1000,
            "containers": [{"name": "main", "resources": {"limits": {"nvidia.com/gpumem": "10000"}}}]}}))
    .expect("pod");
    let requirements = PodRequirements::from_pod(&urgent, &Config::default()).expect("valid");
    // Within the quota (12000 + 10000 <= 30000) the card is the problem:
    // evicting the 8000 MiB pod helps.
    let roomy = cluster("30000");
    assert!(roomy.schedule(&urgent).is_err());
    let found = roomy.find_preemption(&requirements).expect("preempts");
    assert_eq!(found.victims, vec!["ml/large".to_owned()]);
    // Over the quota (12000 + 10000 > 20000) evicting frees cards, not
    // quota: nobody is evicted.
    let tight = cluster("20000");
    assert!(tight.schedule(&urgent).is_err());
    assert_eq!(tight.find_preemption(&requirements), None);
}

#[test]
fn only_sealed_allocations_use_quota_in_a_sealed_cluster() {
    use tessera_api::allocation_seal::{AllocationTrust, SealKey};
    let key = SealKey::generate().expect("key");
    let mut state = cluster().with_trust(AllocationTrust::Sealed(key.clone()));
    state.upsert_resource_quota(&quota(
        "team",
        "gpu",
        json!({"limits.nvidia.com/gpumem": "10000"}),
    ));
    let devices = encode_pod_devices(&[vec![ContainerDevice {
        uuid: "GPU-t4-0".into(),
        vendor: "NVIDIA".into(),
        memory_mib: 6000,
        cores: 0,
    }]]);
    let bound = |name: &str, uid: &str, seal: Option<String>| -> Pod {
        let mut annotations = json!({"hami.io/vgpu-node": "t4-node",
            "hami.io/vgpu-devices-allocated": devices});
        if let Some(seal) = seal {
            annotations["tessera.io/allocation-seal"] = json!(seal);
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "team", "uid": uid, "annotations": annotations},
            "spec": {"nodeName": "t4-node", "containers": [{"name": "main"}]},
            "status": {"phase": "Running"}}))
        .expect("pod")
    };
    // Written by hand (or by HAMi): not believed, so it takes no quota.
    state.observe_pod(&bound("forged", "uid-1", None));
    assert_eq!(state.quotas().used("team"), QuotaAmounts::default());
    // Sealed by this scheduler: counted.
    let seal = key.seal("uid-2", "t4-node", &devices);
    state.observe_pod(&bound("sealed", "uid-2", Some(seal)));
    assert_eq!(state.quotas().used("team").memory_mib, 6000);
    let ask = pod_in("team", "next", json!({"nvidia.com/gpumem": "5000"}));
    assert!(refusal(&state, &ask).contains("6000 MiB in use + 5000 MiB requested"));
}
