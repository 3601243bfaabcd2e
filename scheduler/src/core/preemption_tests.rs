//! Tests of preemption: the fewest lower-priority victims by exact GPU
//! slices and CPU, `preemptionPolicy: Never`, equal priorities spared,
//! PodDisruptionBudgets and victim priority deciding the node,
//! PriorityClass lookup.

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::scheduling::v1::PriorityClass;
use serde_json::{json, Value};
use tessera_api::config::Config;
use tessera_api::inventory::{encode_inventory, GpuDevice};

use super::*;

fn gpu_node(name: &str, cpu: &str) -> Node {
    let cards = vec![GpuDevice {
        id: format!("GPU-{name}"),
        index: 0,
        count: 10,
        devmem: 15360,
        devcore: 100,
        device_type: "NVIDIA-Tesla T4".into(),
        numa: 0,
        mode: "hami-core".into(),
        health: true,
    }];
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name},
        "annotations": {"hami.io/node-nvidia-register": encode_inventory(&cards)}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}],
                   "allocatable": {"cpu": cpu, "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "10"}}}),
    )
    .expect("node")
}

/// A running pod on `node` holding `mib` of its card, with `priority`.
fn running(name: &str, node: &str, mib: u64, priority: i32, labels: Value) -> Pod {
    serde_json::from_value(
        json!({"metadata": {"name": name, "namespace": "ml", "labels": labels,
        "annotations": {"hami.io/vgpu-devices-allocated": format!("GPU-{node},NVIDIA,{mib},0:;")}},
        "spec": {"nodeName": node, "priority": priority,
            "containers": [{"name": "c", "resources": {"requests": {"cpu": "1"}}}]},
        "status": {"phase": "Running"}}),
    )
    .expect("pod")
}

fn incoming(mib: u64, spec: Value) -> Pod {
    let mut full = json!({"schedulerName": "tessera-scheduler",
        "containers": [{"name": "main", "resources": {"requests": {"cpu": "1"}, "limits": {"nvidia.com/gpumem": mib.to_string()}}}]});
    if let (Some(f), Some(e)) = (full.as_object_mut(), spec.as_object()) {
        for (k, v) in e {
            f.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(json!({"metadata": {"name": "urgent", "namespace": "ml"}, "spec": full}))
        .expect("pod")
}

fn preemption(state: &ClusterState, pod: &Pod) -> Option<preemption::Preemption> {
    assert!(
        state.schedule(pod).is_err(),
        "the pod must not fit before preempting"
    );
    let requirements = PodRequirements::from_pod(pod, state.config()).expect("valid");
    state.find_preemption(&requirements)
}

#[test]
fn evicts_the_fewest_lower_priority_pods_by_exact_gpu_slices() {
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&gpu_node("n1", "32"));
    state.observe_pod(&running("small", "n1", 4000, 10, json!({})));
    state.observe_pod(&running("large", "n1", 8000, 100, json!({})));
    // 3360 MiB free; 10000 needs the 8000 MiB pod gone (4000 would not do),
    // and then the 4000 MiB pod may stay.
    let pod = incoming(10000, json!({"priority": 1000}));
    let found = preemption(&state, &pod).expect("preempts");
    assert_eq!(found.node, "n1");
    assert_eq!(found.victims, vec!["ml/large".to_owned()]);
    assert_eq!(found.budget_violations, 0);
    // Once the victim is gone the pod fits.
    state.release("ml/large");
    assert_eq!(state.schedule(&pod).expect("fits").node, "n1");
}

#[test]
fn never_preempts_and_spares_equal_priorities() {
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&gpu_node("n1", "32"));
    state.observe_pod(&running("busy", "n1", 12000, 10, json!({})));
    assert!(preemption(
        &state,
        &incoming(
            10000,
            json!({"priority": 1000, "preemptionPolicy": "Never"})
        )
    )
    .is_none());
    assert!(preemption(&state, &incoming(10000, json!({"priority": 10}))).is_none());
    assert!(preemption(&state, &incoming(10000, json!({"priority": 11}))).is_some());
    // Never on the PriorityClass.
    let class: PriorityClass = serde_json::from_value(
        json!({"metadata": {"name": "batch-high"}, "value": 5000, "preemptionPolicy": "Never"}),
    )
    .expect("class");
    state.upsert_priority_class(&class);
    assert!(preemption(
        &state,
        &incoming(10000, json!({"priorityClassName": "batch-high"}))
    )
    .is_none());
}

#[test]
fn cpu_counts_too() {
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&gpu_node("n1", "2"));
    state.observe_pod(&running("a", "n1", 1000, 0, json!({})));
    state.observe_pod(&running("b", "n1", 1000, 5, json!({})));
    // The card has room; the two CPUs do not.
    let found = preemption(&state, &incoming(1000, json!({"priority": 100}))).expect("preempts");
    assert_eq!(
        found.victims,
        vec!["ml/a".to_owned()],
        "the lowest priority goes"
    );
}

#[test]
fn budgets_and_victim_priority_choose_the_node() {
    let mut state = ClusterState::new(Config::default());
    for name in ["n1", "n2", "n3"] {
        state.upsert_node(&gpu_node(name, "32"));
    }
    state.observe_pod(&running("db-0", "n1", 12000, 10, json!({"app": "db"})));
    state.observe_pod(&running("web-0", "n2", 12000, 50, json!({"app": "web"})));
    state.observe_pod(&running("job-0", "n3", 12000, 40, json!({"app": "job"})));
    let pod = incoming(10000, json!({"priority": 1000}));
    // Lowest victim priority: n1.
    assert_eq!(preemption(&state, &pod).expect("preempts").node, "n1");
    // A budget that allows no disruption of db moves it to the next lowest, n3.
    let budget: PodDisruptionBudget = serde_json::from_value(json!({"metadata": {"name": "db", "namespace": "ml"},
        "spec": {"selector": {"matchLabels": {"app": "db"}}, "minAvailable": 1},
        "status": {"disruptionsAllowed": 0, "currentHealthy": 1, "desiredHealthy": 1, "expectedPods": 1}})).expect("pdb");
    state.upsert_disruption_budget(&budget);
    let found = preemption(&state, &pod).expect("preempts");
    assert_eq!(
        (found.node.as_str(), found.victims.clone()),
        ("n3", vec!["ml/job-0".to_owned()])
    );
    // With every node protected, it still preempts, counting the violation.
    for app in ["web", "job"] {
        let budget: PodDisruptionBudget = serde_json::from_value(json!({"metadata": {"name": app, "namespace": "ml"},
            "spec": {"selector": {"matchLabels": {"app": app}}},
            "status": {"disruptionsAllowed": 0, "currentHealthy": 1, "desiredHealthy": 1, "expectedPods": 1}})).expect("pdb");
        state.upsert_disruption_budget(&budget);
    }
    let found = preemption(&state, &pod).expect("preempts");
    assert_eq!((found.node.as_str(), found.budget_violations), ("n1", 1));
}

#[test]
fn priority_comes_from_the_class_or_the_global_default() {
    let mut state = ClusterState::new(Config::default());
    let high: PriorityClass =
        serde_json::from_value(json!({"metadata": {"name": "high"}, "value": 1000}))
            .expect("class");
    let default: PriorityClass = serde_json::from_value(
        json!({"metadata": {"name": "default"}, "value": 7, "globalDefault": true}),
    )
    .expect("class");
    state.upsert_priority_class(&high);
    let info = |spec: Value| pod_info::PodInfo::from_pod(&incoming(1, spec));
    assert_eq!(
        state.priority_of(&info(json!({"priorityClassName": "high"}))),
        1000
    );
    assert_eq!(state.priority_of(&info(json!({}))), 0);
    state.upsert_priority_class(&default);
    assert_eq!(state.priority_of(&info(json!({}))), 7);
    assert_eq!(
        state.priority_of(&info(json!({"priority": 3, "priorityClassName": "high"}))),
        3,
        "spec.priority wins"
    );
}
