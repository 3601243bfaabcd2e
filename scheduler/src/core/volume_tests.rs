//! Tests of volume placement: bound PVs' node affinity and zone labels,
//! `WaitForFirstConsumer` claims served by a matching PV or provisioned
//! within `allowedTopologies`, claims pinned by `selected-node`, PVs not
//! handed out twice, and kube-scheduler's wording.

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use serde_json::{json, Value};
use tessera_api::config::Config;

use super::volumes::VolumeAction;
use super::*;

fn zonal_node(name: &str, zone: &str) -> Node {
    serde_json::from_value(json!({"metadata": {"name": name,
        "labels": {"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": zone}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}],
                   "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110"}}}))
    .expect("node")
}

/// n1–n3 in zone a, n4–n6 in zone b, and the storage classes: `local`
/// (no provisioner, WaitForFirstConsumer), `gp3` (provisions in zone b
/// only, WaitForFirstConsumer), `fast` (Immediate).
fn cluster() -> ClusterState {
    let mut state = ClusterState::new(Config::default());
    for i in 1..=6 {
        state.upsert_node(&zonal_node(
            &format!("n{i}"),
            if i <= 3 { "a" } else { "b" },
        ));
    }
    let classes = [
        json!({"metadata": {"name": "local"}, "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "WaitForFirstConsumer"}),
        json!({"metadata": {"name": "gp3"}, "provisioner": "ebs.csi.aws.com", "volumeBindingMode": "WaitForFirstConsumer",
            "allowedTopologies": [{"matchLabelExpressions": [{"key": "topology.kubernetes.io/zone", "values": ["b"]}]}]}),
        json!({"metadata": {"name": "fast"}, "provisioner": "ebs.csi.aws.com", "volumeBindingMode": "Immediate"}),
    ];
    for class in classes {
        let class: StorageClass = serde_json::from_value(class).expect("class");
        state.storage_mut().upsert_class(&class);
    }
    state
}

fn local_volume(name: &str, node: &str, size: &str, extra: Value) -> PersistentVolume {
    let mut volume = json!({"metadata": {"name": name}, "spec": {"capacity": {"storage": size},
        "accessModes": ["ReadWriteOnce"], "storageClassName": "local", "local": {"path": "/mnt/disk"},
        "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}},
        "status": {"phase": "Available"}});
    if let (Some(v), Some(e)) = (volume.as_object_mut(), extra.as_object()) {
        for (k, val) in e {
            v.insert(k.clone(), val.clone());
        }
    }
    serde_json::from_value(volume).expect("pv")
}

fn claim(
    name: &str,
    class: &str,
    size: &str,
    extra_spec: Value,
    annotations: Value,
) -> PersistentVolumeClaim {
    let mut spec = json!({"storageClassName": class, "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": size}}});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra_spec.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ml", "annotations": annotations}, "spec": spec}))
        .expect("pvc")
}

fn pod_with_claims(name: &str, claims: &[&str]) -> Pod {
    let volumes: Vec<Value> = claims
        .iter()
        .map(|c| json!({"name": c, "persistentVolumeClaim": {"claimName": c}}))
        .collect();
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ml"},
        "spec": {"schedulerName": "tessera-scheduler", "volumes": volumes,
            "containers": [{"name": "main", "resources": {"requests": {"cpu": "100m"}}}]}}))
    .expect("pod")
}

fn refused(state: &ClusterState, pod: &Pod) -> String {
    match state.schedule(pod) {
        Err(ScheduleError::Unschedulable(u)) => u.to_string(),
        other => panic!("expected unschedulable, got {other:?}"),
    }
}

#[test]
fn a_bound_local_volume_pins_the_pod_to_its_node() {
    let mut state = cluster();
    state
        .storage_mut()
        .upsert_volume(&local_volume("pv-n2", "n2", "100Gi", json!({})));
    state.storage_mut().upsert_claim(&claim(
        "cache",
        "local",
        "50Gi",
        json!({"volumeName": "pv-n2"}),
        json!({}),
    ));
    let placement = state
        .schedule(&pod_with_claims("p", &["cache"]))
        .expect("fits");
    assert_eq!(placement.node, "n2");
    assert!(placement.volumes.is_empty(), "a bound claim needs nothing");
    // With n2 full, the others are refused for the volume.
    let mut full = state.clone();
    let mut cordoned = zonal_node("n2", "a");
    cordoned.spec = Some(serde_json::from_value(json!({"unschedulable": true})).expect("spec"));
    full.upsert_node(&cordoned);
    let message = refused(&full, &pod_with_claims("p", &["cache"]));
    assert!(
        message.contains("5 node(s) had volume node affinity conflict"),
        "{message}"
    );
}

#[test]
fn a_zonal_disk_keeps_the_pod_in_its_zone() {
    let mut state = cluster();
    let disk: PersistentVolume = serde_json::from_value(json!({"metadata": {"name": "ebs-1",
        "labels": {"topology.kubernetes.io/zone": "b"}},
        "spec": {"capacity": {"storage": "100Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "gp3",
            "csi": {"driver": "ebs.csi.aws.com", "volumeHandle": "vol-1"}}}))
    .expect("pv");
    state.storage_mut().upsert_volume(&disk);
    state.storage_mut().upsert_claim(&claim(
        "models",
        "gp3",
        "100Gi",
        json!({"volumeName": "ebs-1"}),
        json!({}),
    ));
    let pod = pod_with_claims("p", &["models"]);
    let mut pinned = pod.clone();
    if let Some(spec) = pinned.spec.as_mut() {
        spec.node_selector =
            Some([("topology.kubernetes.io/zone".to_owned(), "a".to_owned())].into());
    }
    let message = refused(&state, &pinned);
    assert!(
        message.contains("3 node(s) had no available volume zone"),
        "{message}"
    );
    assert!(["n4", "n5", "n6"].contains(&state.schedule(&pod).expect("fits").node.as_str()));
}

#[test]
fn wait_for_first_consumer_binds_a_matching_local_volume_once() {
    let mut state = cluster();
    // Too small, wrong class, and the right one on n3.
    state
        .storage_mut()
        .upsert_volume(&local_volume("small-n1", "n1", "10Gi", json!({})));
    let mut other_class = local_volume("other-n2", "n2", "500Gi", json!({}));
    if let Some(spec) = other_class.spec.as_mut() {
        spec.storage_class_name = Some("manual".into());
    }
    state.storage_mut().upsert_volume(&other_class);
    state
        .storage_mut()
        .upsert_volume(&local_volume("disk-n3", "n3", "200Gi", json!({})));
    state
        .storage_mut()
        .upsert_claim(&claim("data-0", "local", "100Gi", json!({}), json!({})));
    state
        .storage_mut()
        .upsert_claim(&claim("data-1", "local", "100Gi", json!({}), json!({})));
    let first = state
        .schedule(&pod_with_claims("p0", &["data-0"]))
        .expect("fits");
    assert_eq!(first.node, "n3");
    assert_eq!(
        first.volumes,
        vec![VolumeAction::BindVolume {
            claim: "data-0".into(),
            volume: "disk-n3".into()
        }]
    );
    state.assume(&first.pod, first.charge.clone());
    // The only matching PV is taken by the assumption.
    let message = refused(&state, &pod_with_claims("p1", &["data-1"]));
    assert_eq!(
        message,
        "6 node(s) didn't find available persistent volumes to bind"
    );
    // Rolled back: available again.
    state.forget_assumed(&first.pod);
    assert_eq!(
        state
            .schedule(&pod_with_claims("p1", &["data-1"]))
            .expect("fits")
            .node,
        "n3"
    );
}

#[test]
fn wait_for_first_consumer_provisions_within_allowed_topologies() {
    let mut state = cluster();
    state
        .storage_mut()
        .upsert_claim(&claim("cache", "gp3", "100Gi", json!({}), json!({})));
    let placement = state
        .schedule(&pod_with_claims("p", &["cache"]))
        .expect("fits");
    assert!(
        ["n4", "n5", "n6"].contains(&placement.node.as_str()),
        "{}",
        placement.node
    );
    assert_eq!(
        placement.volumes,
        vec![VolumeAction::Provision {
            claim: "cache".into()
        }]
    );
    let mut in_a = pod_with_claims("p", &["cache"]);
    if let Some(spec) = in_a.spec.as_mut() {
        spec.node_selector =
            Some([("topology.kubernetes.io/zone".to_owned(), "a".to_owned())].into());
    }
    assert!(refused(&state, &in_a)
        .contains("3 node(s) didn't find available persistent volumes to bind"));
    // A claim already handed to a node (a restart between selecting and binding) stays there.
    state.storage_mut().upsert_claim(&claim(
        "cache",
        "gp3",
        "100Gi",
        json!({}),
        json!({"volume.kubernetes.io/selected-node": "n5"}),
    ));
    assert_eq!(
        state
            .schedule(&pod_with_claims("p", &["cache"]))
            .expect("fits")
            .node,
        "n5"
    );
}

#[test]
fn missing_and_immediate_claims_wait() {
    let mut state = cluster();
    assert_eq!(
        refused(&state, &pod_with_claims("p", &["nope"])),
        "6/6 nodes: persistentvolumeclaim \"nope\" not found"
    );
    state
        .storage_mut()
        .upsert_claim(&claim("now", "fast", "1Gi", json!({}), json!({})));
    assert_eq!(
        refused(&state, &pod_with_claims("p", &["now"])),
        "6/6 nodes: pod has unbound immediate PersistentVolumeClaims"
    );
    state.storage_mut().upsert_claim(&claim(
        "gone",
        "local",
        "1Gi",
        json!({"volumeName": "pv-missing"}),
        json!({}),
    ));
    assert_eq!(
        refused(&state, &pod_with_claims("p", &["gone"])),
        "6 node(s) unavailable due to one or more pvc(s) bound to non-existent pv(s)"
    );
}

/// A bound EBS volume (CSI) and its bound claim in `ml`.
fn ebs_pair(state: &mut ClusterState, claim_name: &str, handle: &str) {
    let volume: PersistentVolume = serde_json::from_value(json!({"metadata": {"name": format!("pv-{claim_name}")},
        "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "gp3",
            "csi": {"driver": "ebs.csi.aws.com", "volumeHandle": handle}},
        "status": {"phase": "Bound"}}))
    .expect("pv");
    state.storage_mut().upsert_volume(&volume);
    state.storage_mut().upsert_claim(&claim(
        claim_name,
        "gp3",
        "10Gi",
        json!({"volumeName": format!("pv-{claim_name}")}),
        json!({}),
    ));
}

fn csi_node(name: &str, count: i32) -> k8s_openapi::api::storage::v1::CSINode {
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"drivers": [
        {"name": "ebs.csi.aws.com", "nodeID": name, "allocatable": {"count": count}},
        {"name": "efs.csi.aws.com", "nodeID": name}]}}))
    .expect("csinode")
}

/// `pod_with_claims` pinned to n1, at `priority`.
fn pinned_to_n1(name: &str, claims: &[&str], priority: i32) -> Pod {
    let mut pod = pod_with_claims(name, claims);
    let spec = pod.spec.as_mut().expect("spec");
    spec.node_selector = Some([("kubernetes.io/hostname".to_owned(), "n1".to_owned())].into());
    spec.priority = Some(priority);
    pod
}

fn placed_on_n1(name: &str, claims: &[&str], priority: i32) -> Pod {
    let mut pod = pinned_to_n1(name, claims, priority);
    pod.spec.as_mut().expect("spec").node_name = Some("n1".into());
    pod.status = Some(serde_json::from_value(json!({"phase": "Running"})).expect("status"));
    pod
}

#[test]
fn csi_attach_limits_count_each_nodes_unique_volumes_per_driver() {
    let mut state = cluster();
    for name in ["a", "b", "c"] {
        ebs_pair(&mut state, name, &format!("vol-{name}"));
    }
    let in_tree: StorageClass = serde_json::from_value(json!({"metadata": {"name": "gp2"},
        "provisioner": "kubernetes.io/aws-ebs", "volumeBindingMode": "WaitForFirstConsumer"}))
    .expect("class");
    let efs: StorageClass = serde_json::from_value(json!({"metadata": {"name": "efs"},
        "provisioner": "efs.csi.aws.com", "volumeBindingMode": "WaitForFirstConsumer"}))
    .expect("class");
    state.storage_mut().upsert_class(&in_tree);
    state.storage_mut().upsert_class(&efs);
    state
        .storage_mut()
        .upsert_claim(&claim("scratch", "gp2", "1Gi", json!({}), json!({})));
    state
        .storage_mut()
        .upsert_claim(&claim("shared", "efs", "1Gi", json!({}), json!({})));
    state.storage_mut().upsert_csi_node(&csi_node("n1", 2));
    state.observe_pod(&placed_on_n1("resident", &["a", "b"], 0));
    // Without CSINode limits nothing is counted; with n1 at 2 EBS volumes:
    let why = refused(&state, &pinned_to_n1("third", &["c"], 0));
    assert!(why.contains("1 node(s) exceed max volume count"), "{why}");
    assert_eq!(
        state
            .schedule(&pinned_to_n1("sharing", &["a"], 0))
            .expect("an attached volume is not attached again")
            .node,
        "n1"
    );
    let why = refused(&state, &pinned_to_n1("in-tree", &["scratch"], 0));
    assert!(
        why.contains("exceed max volume count"),
        "an unbound kubernetes.io/aws-ebs claim counts under ebs.csi.aws.com: {why}"
    );
    assert!(
        state
            .schedule(&pinned_to_n1("files", &["shared"], 0))
            .is_ok(),
        "a driver without a count is not limited"
    );
    state.storage_mut().upsert_csi_node(&csi_node("n1", 3));
    assert!(state.schedule(&pinned_to_n1("third", &["c"], 0)).is_ok());
    state.storage_mut().remove_csi_node("n1");
    state.storage_mut().upsert_csi_node(&csi_node("n1", 1));
    assert!(
        state.schedule(&pinned_to_n1("sharing", &["a"], 0)).is_err(),
        "already over its count"
    );
}

#[test]
fn preemption_frees_attach_slots() {
    let mut state = cluster();
    for name in ["a", "b", "c"] {
        ebs_pair(&mut state, name, &format!("vol-{name}"));
    }
    state.storage_mut().upsert_csi_node(&csi_node("n1", 2));
    state.observe_pod(&placed_on_n1("holder", &["a", "b"], 10));
    state.observe_pod(&placed_on_n1("no-volumes", &[], 1));
    let pod = pinned_to_n1("urgent", &["c"], 1000);
    let requirements = PodRequirements::from_pod(&pod, state.config()).expect("valid");
    let found = state.find_preemption(&requirements).expect("preempts");
    assert_eq!(
        (found.node.as_str(), found.victims),
        ("n1", vec!["ml/holder".to_owned()]),
        "the pod without volumes frees no slot and stays"
    );
}
