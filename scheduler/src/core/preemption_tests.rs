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

/// A node with a hostname and a zone label (and `cpu` CPUs).
fn zonal_gpu_node(name: &str, zone: &str, cpu: &str) -> Node {
    let mut node = gpu_node(name, cpu);
    node.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("topology.kubernetes.io/zone".into(), zone.into());
    node
}

/// `running` with extra spec fields (affinity, tolerations, …).
fn running_with(name: &str, node: &str, priority: i32, labels: Value, spec: Value) -> Pod {
    let mut pod = running(name, node, 1000, priority, labels);
    let mut full = serde_json::to_value(pod.spec.take()).expect("spec");
    if let (Some(f), Some(e)) = (full.as_object_mut(), spec.as_object()) {
        for (k, v) in e {
            f.insert(k.clone(), v.clone());
        }
    }
    pod.spec = Some(serde_json::from_value(full).expect("spec"));
    pod
}

fn outcome(state: &ClusterState, pod: &Pod) -> preemption::PreemptionOutcome {
    assert!(state.schedule(pod).is_err(), "the pod must not fit first");
    let requirements = PodRequirements::from_pod(pod, state.config()).expect("valid");
    state.preemption_outcome(&requirements, None)
}

fn anti_affinity_to(app: &str) -> Value {
    json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": app}}, "topologyKey": "kubernetes.io/hostname"}]}})
}

#[test]
fn evicts_a_placed_pod_whose_anti_affinity_refuses_the_incoming_pod() {
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&gpu_node("n1", "32"));
    state.observe_pod(&running_with(
        "guard",
        "n1",
        10,
        json!({"app": "guard"}),
        json!({"affinity": anti_affinity_to("web")}),
    ));
    state.observe_pod(&running(
        "bystander",
        "n1",
        1000,
        5,
        json!({"app": "other"}),
    ));
    let mut pod = incoming(1000, json!({"priority": 1000}));
    pod.metadata.labels = Some([("app".to_owned(), "web".to_owned())].into());
    assert!(state
        .schedule(&pod)
        .expect_err("refused")
        .to_string()
        .contains(inter_pod_affinity::EXISTING_ANTI_AFFINITY_REASON));
    let found = preemption(&state, &pod).expect("preempts");
    assert_eq!(
        found.victims,
        vec!["ml/guard".to_owned()],
        "only the pod whose rule refuses it; the bystander stays"
    );
    state.release("ml/guard");
    assert_eq!(state.schedule(&pod).expect("fits").node, "n1");
}

#[test]
fn evicts_the_pods_its_own_anti_affinity_refuses() {
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&gpu_node("n1", "32"));
    state.observe_pod(&running("web-0", "n1", 1000, 10, json!({"app": "web"})));
    state.observe_pod(&running("batch", "n1", 1000, 5, json!({"app": "batch"})));
    let pod = incoming(
        1000,
        json!({"priority": 1000, "affinity": anti_affinity_to("web")}),
    );
    let found = preemption(&state, &pod).expect("preempts");
    assert_eq!(found.victims, vec!["ml/web-0".to_owned()]);
    // A pod of equal priority matching the term is no victim: nothing helps.
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&gpu_node("n1", "32"));
    state.observe_pod(&running("web-0", "n1", 1000, 1000, json!({"app": "web"})));
    assert_eq!(
        outcome(&state, &pod).message().as_deref(),
        Some(
            "preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod."
        )
    );
}

#[test]
fn evicts_to_bring_topology_spread_skew_back_within_max_skew() {
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&zonal_gpu_node("a1", "a", "32"));
    // Zone b's node is full of CPU held at a higher priority.
    state.upsert_node(&zonal_gpu_node("b1", "b", "1"));
    state.observe_pod(&running(
        "keeper",
        "b1",
        1000,
        5000,
        json!({"app": "keeper"}),
    ));
    state.observe_pod(&running("web-0", "a1", 1000, 10, json!({"app": "web"})));
    state.observe_pod(&running("other", "a1", 1000, 10, json!({"app": "other"})));
    let mut pod = incoming(
        1000,
        json!({"priority": 1000, "topologySpreadConstraints": [{"maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"app": "web"}}}]}),
    );
    pod.metadata.labels = Some([("app".to_owned(), "web".to_owned())].into());
    // a1: 1 matching + itself − minimum 0 = 2 > 1; b1: out of CPU.
    let found = preemption(&state, &pod).expect("preempts");
    assert_eq!(
        (found.node.as_str(), found.victims.clone()),
        ("a1", vec!["ml/web-0".to_owned()]),
        "the non-matching pod is spared"
    );
    // The what-if left the decision as it found it: asking again gives the same.
    assert_eq!(preemption(&state, &pod), Some(found));
}

#[test]
fn nodes_failing_for_reasons_eviction_cannot_fix_are_skipped() {
    let mut state = ClusterState::new(Config::default());
    // Tainted: the pod does not tolerate it (UnschedulableAndUnresolvable).
    let mut tainted = zonal_gpu_node("t1", "a", "32");
    tainted.spec = Some(
        serde_json::from_value(
            json!({"taints": [{"key": "dedicated", "value": "x", "effect": "NoSchedule"}]}),
        )
        .expect("spec"),
    );
    state.upsert_node(&tainted);
    // No zone label: the spread constraint's missing-label failure.
    state.upsert_node(&gpu_node("unlabelled", "32"));
    // Full of the card at a higher priority: no victims.
    state.upsert_node(&zonal_gpu_node("busy", "b", "32"));
    // Filters run in kube-scheduler's order: were the unlabelled node's
    // card full, its first failure would be resolvable (then no victims).
    state.observe_pod(&running("low", "t1", 12000, 1, json!({})));
    state.observe_pod(&running("high", "busy", 12000, 5000, json!({})));
    let pod = incoming(
        10000,
        json!({"priority": 1000, "topologySpreadConstraints": [{"maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"app": "web"}}}]}),
    );
    let found = outcome(&state, &pod);
    assert_eq!(
        found,
        preemption::PreemptionOutcome::NoCandidates {
            total_nodes: 3,
            not_helpful: 2,
            no_victims: 1
        }
    );
    assert_eq!(
        found.message().as_deref(),
        Some("preemption: 0/3 nodes are available: 1 No preemption victims found for incoming pod, 2 Preemption is not helpful for scheduling.")
    );
}

#[test]
fn unmet_pod_affinity_is_not_helped_by_evicting() {
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&gpu_node("n1", "32"));
    state.upsert_node(&gpu_node("n2", "32"));
    // The cache runs on n1, whose card is held at a higher priority.
    state.observe_pod(&running(
        "cache",
        "n1",
        12000,
        5000,
        json!({"app": "cache"}),
    ));
    state.observe_pod(&running("low", "n2", 12000, 1, json!({})));
    let pod = incoming(
        10000,
        json!({"priority": 1000, "affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "cache"}}, "topologyKey": "kubernetes.io/hostname"}]}}}),
    );
    // n2 passes the GPU check only after evicting `low`, but has no cache:
    // its first failure is the card (resolvable), then the dry run fails.
    let found = outcome(&state, &pod);
    assert_eq!(
        found,
        preemption::PreemptionOutcome::NoCandidates {
            total_nodes: 2,
            not_helpful: 0,
            no_victims: 2
        }
    );
    // With room on n2, its only failure is the affinity: not helpful.
    state.release("ml/low");
    assert_eq!(
        outcome(&state, &pod),
        preemption::PreemptionOutcome::NoCandidates {
            total_nodes: 2,
            not_helpful: 1,
            no_victims: 1
        }
    );
}

#[test]
fn never_and_terminating_victims_are_worded_as_kube_scheduler() {
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&gpu_node("n1", "32"));
    let mut leaving = running("leaving", "n1", 12000, 10, json!({}));
    leaving.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-01-01T00:00:00Z".parse().expect("time"),
        ));
    state.observe_pod(&leaving);
    let never = incoming(
        10000,
        json!({"priority": 1000, "preemptionPolicy": "Never"}),
    );
    assert_eq!(
        outcome(&state, &never).message().as_deref(),
        Some("preemption: not eligible due to preemptionPolicy=Never.")
    );
    let pod = incoming(10000, json!({"priority": 1000}));
    let requirements = PodRequirements::from_pod(&pod, state.config()).expect("valid");
    assert_eq!(
        state
            .preemption_outcome(&requirements, Some("n1"))
            .message()
            .as_deref(),
        Some("preemption: not eligible due to a terminating pod on the nominated node.")
    );
}

/// A pending pod asking for `mib` of a card at `priority`, nominated to `node`.
fn nominated(name: &str, mib: u64, priority: i32, node: Option<&str>) -> Pod {
    let mut pod = incoming(mib, json!({"priority": priority}));
    pod.metadata.name = Some(name.to_owned());
    pod.status = node.map(|n| {
        serde_json::from_value(json!({"phase": "Pending", "nominatedNodeName": n})).expect("status")
    });
    pod
}

#[test]
fn a_lower_priority_pod_cannot_take_the_room_a_preemption_freed() {
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&gpu_node("n1", "32"));
    // The preemptor, nominated to n1 after its victim left: 10000 of 15360 MiB.
    let preemptor = nominated("urgent", 10000, 1000, Some("n1"));
    state.observe_pod(&preemptor);
    assert_eq!(state.nominated_pods("n1"), vec!["ml/urgent".to_owned()]);
    let filler = nominated("filler", 10000, 100, None);
    assert!(
        state.schedule(&filler).is_err(),
        "the room is the preemptor's"
    );
    assert!(
        state
            .schedule(&nominated("peer", 10000, 1000, None))
            .is_err(),
        "equal priority counts the nominated pod too"
    );
    assert_eq!(
        state
            .schedule(&nominated("vip", 10000, 2000, None))
            .expect("a higher priority ignores it")
            .node,
        "n1"
    );
    assert_eq!(
        state
            .schedule(&nominated("small", 5000, 100, None))
            .expect("what is left beside the reservation is free")
            .node,
        "n1"
    );
    // The preemptor itself is not kept out by its own reservation.
    let placement = state.schedule(&preemptor).expect("fits");
    assert_eq!(placement.node, "n1");
    // Once it is assumed the reservation is its charge: not counted twice.
    state.assume(&placement.pod, placement.charge.clone());
    assert!(state.schedule(&nominated("small", 5000, 100, None)).is_ok());
    // Bound, the nomination is gone.
    let mut bound = preemptor.clone();
    bound.spec.as_mut().expect("spec").node_name = Some("n1".into());
    state.observe_pod(&bound);
    assert!(state.nominated_pods("n1").is_empty());
}

#[test]
fn a_preemptor_still_waiting_for_its_victims_keeps_gpu_pods_off_the_node() {
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&gpu_node("n1", "32"));
    let mut leaving = running("leaving", "n1", 3000, 10, json!({}));
    leaving.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-01-01T00:00:00Z".parse().expect("time"),
        ));
    state.observe_pod(&leaving);
    // Needs 14000: does not fit until `leaving` is gone.
    state.observe_pod(&nominated("urgent", 14000, 1000, Some("n1")));
    assert!(state
        .schedule(&nominated("filler", 10000, 100, None))
        .is_err());
    let cpu_only: Pod = serde_json::from_value(json!({"metadata": {"name": "web", "namespace": "ml"},
        "spec": {"priority": 100, "containers": [{"name": "c", "resources": {"requests": {"cpu": "1"}}}]}}))
    .expect("pod");
    assert_eq!(
        state
            .schedule(&cpu_only)
            .expect("a pod without GPUs is not held back")
            .node,
        "n1"
    );
    // The nomination withdrawn (or the pod deleted): the room is free again.
    state.remove_pod(&nominated("urgent", 14000, 1000, Some("n1")));
    assert!(state
        .schedule(&nominated("filler", 10000, 100, None))
        .is_ok());
}

#[test]
fn a_nomination_made_here_holds_until_the_status_names_a_node_or_the_pod_is_bound() {
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&gpu_node("n1", "32"));
    let preemptor = nominated("urgent", 10000, 1000, None);
    state.nominate(&preemptor, "n1");
    assert_eq!(state.nominated_pods("n1"), vec!["ml/urgent".to_owned()]);
    // An update before nominatedNodeName is written (e.g. its PodScheduled
    // condition) keeps the reservation.
    state.observe_pod(&preemptor);
    assert!(state
        .schedule(&nominated("filler", 10000, 100, None))
        .is_err());
    // The status written, then bound: gone.
    state.observe_pod(&nominated("urgent", 10000, 1000, Some("n1")));
    assert_eq!(state.nominated_pods("n1"), vec!["ml/urgent".to_owned()]);
    let mut bound = nominated("urgent", 10000, 1000, Some("n1"));
    bound.spec.as_mut().expect("spec").node_name = Some("n1".into());
    state.observe_pod(&bound);
    assert!(state.nominated_pods("n1").is_empty());
    // Withdrawn (an eviction refused): the room is free at once.
    state.nominate(&preemptor, "n1");
    state.forget_nomination("ml/urgent");
    state.observe_pod(&preemptor);
    assert!(state.nominated_pods("n1").is_empty());
    assert!(state
        .schedule(&nominated("filler", 10000, 100, None))
        .is_ok());
}

#[test]
fn a_nominated_node_the_pod_can_no_longer_use_does_not_hold_it_back() {
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&gpu_node("n1", "32"));
    state.upsert_node(&gpu_node("n2", "32"));
    let mut leaving = running("leaving", "n1", 12000, 10, json!({}));
    leaving.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-01-01T00:00:00Z".parse().expect("time"),
        ));
    state.observe_pod(&leaving);
    state.observe_pod(&running("low", "n2", 12000, 10, json!({})));
    let pod = incoming(10000, json!({"priority": 1000}));
    let requirements = PodRequirements::from_pod(&pod, state.config()).expect("valid");
    assert!(matches!(
        state.preemption_outcome(&requirements, Some("n1")),
        preemption::PreemptionOutcome::NotEligible(_)
    ));
    // n1 tainted since: the pod waits there no more and preempts on n2.
    let mut tainted = gpu_node("n1", "32");
    tainted.spec = Some(
        serde_json::from_value(json!({"taints": [{"key": "maintenance", "effect": "NoSchedule"}]}))
            .expect("spec"),
    );
    state.upsert_node(&tainted);
    match state.preemption_outcome(&requirements, Some("n1")) {
        preemption::PreemptionOutcome::Victims(found) => {
            assert_eq!(
                (found.node.as_str(), found.victims),
                ("n2", vec!["ml/low".to_owned()])
            );
        }
        other => panic!("expected victims on n2, got {other:?}"),
    }
}

/// `base` (a pod from [`nominated`]) with `labels` and more of its spec.
fn with_spec(mut pod: Pod, labels: Value, spec: Value) -> Pod {
    pod.metadata.labels = serde_json::from_value(labels).expect("labels");
    let mut full = serde_json::to_value(pod.spec.take()).expect("spec");
    if let (Some(f), Some(e)) = (full.as_object_mut(), spec.as_object()) {
        for (k, v) in e {
            f.insert(k.clone(), v.clone());
        }
    }
    pod.spec = serde_json::from_value(full).expect("spec");
    pod
}

#[test]
fn nominated_pods_count_in_spread_affinity_and_host_ports_on_their_node() {
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&gpu_node("n1", "32"));
    state.upsert_node(&gpu_node("n2", "32"));
    let anti = json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}]}});
    // Waiting on n1 (its victims still leaving): a replica that keeps other
    // replicas off its host, and holds host port 8080.
    let waiting = with_spec(
        nominated("urgent", 1000, 1000, Some("n1")),
        json!({"app": "web", "tier": "front"}),
        json!({"affinity": anti, "containers": [{"name": "main",
            "ports": [{"containerPort": 80, "hostPort": 8080}],
            "resources": {"requests": {"cpu": "1"}, "limits": {"nvidia.com/gpumem": "1000"}}}]}),
    );
    state.observe_pod(&waiting);
    let node_of = |state: &ClusterState, pod: &Pod| state.schedule(pod).map(|p| p.node);

    // Its anti-affinity keeps a lower-priority replica off n1...
    let replica = with_spec(
        nominated("replica", 1000, 100, None),
        json!({"app": "web"}),
        json!({}),
    );
    assert_eq!(node_of(&state, &replica).as_deref(), Ok("n2"));
    // ...its host port is taken there...
    let port = with_spec(
        nominated("port", 1000, 100, None),
        json!({}),
        json!({"containers": [{"name": "main", "ports": [{"containerPort": 80, "hostPort": 8080}],
            "resources": {"requests": {"cpu": "1"}, "limits": {"nvidia.com/gpumem": "1000"}}}]}),
    );
    assert_eq!(node_of(&state, &port).as_deref(), Ok("n2"));
    // ...and its labels count in a hard spread constraint's skew.
    let spread = with_spec(
        nominated("spread", 1000, 100, None),
        json!({"app": "batch", "tier": "front"}),
        json!({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"tier": "front"}}}]}),
    );
    assert_eq!(node_of(&state, &spread).as_deref(), Ok("n2"));
    // With n2's card full, each is refused on n1 for the nominated pod's
    // sake, with kube-scheduler's reason.
    state.observe_pod(&running("full", "n2", 15360, 5000, json!({})));
    for (pod, reason) in [
        (&replica, "didn't satisfy existing pods anti-affinity rules"),
        (&port, "didn't have free ports"),
        (&spread, "didn't match pod topology spread constraints"),
    ] {
        let refused = state.schedule(pod).expect_err("refused on n1");
        assert!(refused.to_string().contains(reason), "{refused}");
    }
    // A pod of higher priority does not wait for it: n1 is open to it.
    let vip = with_spec(
        nominated("vip", 1000, 2000, None),
        json!({"app": "web"}),
        json!({}),
    );
    assert_eq!(node_of(&state, &vip).as_deref(), Ok("n1"));
    // The nominated pod itself is not kept out by its own terms.
    assert_eq!(node_of(&state, &waiting).as_deref(), Ok("n1"));
}
