//! Tests of the predicates that read other pods: inter-pod affinity and
//! anti-affinity, topology spread, host ports and scheduling gates, with
//! kube-scheduler's wording; property tests compare spread and affinity
//! with a straightforward reference implementation.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use proptest::prelude::*;
use serde_json::{json, Value};
use tessera_api::config::Config;

use super::*;

/// A CPU-only node `name` in `zone`.
fn zonal_node(name: &str, zone: &str, extra_labels: Value) -> Node {
    let mut labels = json!({"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": zone});
    if let (Some(l), Some(e)) = (labels.as_object_mut(), extra_labels.as_object()) {
        for (k, v) in e {
            l.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels},
        "status": {"conditions": [{"type": "Ready", "status": "True"}],
                   "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110"}}}))
    .expect("node")
}

/// 6 nodes in 2 zones: n1–n3 in zone a, n4–n6 in zone b.
fn six_nodes() -> ClusterState {
    let mut state = ClusterState::new(Config::default());
    for i in 1..=6 {
        let zone = if i <= 3 { "a" } else { "b" };
        state.upsert_node(&zonal_node(&format!("n{i}"), zone, json!({})));
    }
    state
}

/// A pending pod `name` in `namespace` with `labels` and extra spec fields.
fn pod(name: &str, namespace: &str, labels: Value, spec: Value) -> Pod {
    let mut full = json!({"schedulerName": "tessera-scheduler",
        "containers": [{"name": "main", "resources": {"requests": {"cpu": "100m"}}}]});
    if let (Some(f), Some(e)) = (full.as_object_mut(), spec.as_object()) {
        for (k, v) in e {
            f.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(
        json!({"metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": full}),
    )
    .expect("pod")
}

/// The same pod already running on `node`.
fn running(mut pod: Pod, node: &str) -> Pod {
    if let Some(spec) = pod.spec.as_mut() {
        spec.node_name = Some(node.to_owned());
    }
    pod.status = Some(serde_json::from_value(json!({"phase": "Running"})).expect("status"));
    pod
}

fn place(state: &mut ClusterState, pod: &Pod) -> String {
    let placement = state.schedule(pod).expect("fits");
    state.assume(&placement.pod, placement.charge.clone());
    placement.node
}

fn refused(state: &ClusterState, pod: &Pod) -> String {
    match state.schedule(pod) {
        Err(ScheduleError::Unschedulable(u)) => u.to_string(),
        other => panic!("expected unschedulable, got {other:?}"),
    }
}

fn anti_affinity(key: &str, labels: Value) -> Value {
    json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": labels}, "topologyKey": key}]}}})
}

fn affinity(key: &str, labels: Value) -> Value {
    json!({"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": labels}, "topologyKey": key}]}}})
}

fn zone_spread(max_skew: i32, when: &str, extra: Value) -> Value {
    let mut constraint = json!({"maxSkew": max_skew, "topologyKey": "topology.kubernetes.io/zone",
        "whenUnsatisfiable": when, "labelSelector": {"matchLabels": {"app": "web"}}});
    if let (Some(c), Some(e)) = (constraint.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    json!({"topologySpreadConstraints": [constraint]})
}

fn zone_of(node: &str) -> &'static str {
    match node {
        "n1" | "n2" | "n3" => "a",
        _ => "b",
    }
}

#[test]
fn required_anti_affinity_on_hostname_puts_each_replica_on_its_own_node() {
    let mut state = six_nodes();
    let spec = anti_affinity("kubernetes.io/hostname", json!({"app": "vllm"}));
    let mut nodes: Vec<String> = (0..4)
        .map(|i| {
            place(
                &mut state,
                &pod(
                    &format!("vllm-{i}"),
                    "default",
                    json!({"app": "vllm"}),
                    spec.clone(),
                ),
            )
        })
        .collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(nodes.len(), 4, "four replicas on four nodes: {nodes:?}");
    for i in 4..6 {
        place(
            &mut state,
            &pod(
                &format!("vllm-{i}"),
                "default",
                json!({"app": "vllm"}),
                spec.clone(),
            ),
        );
    }
    let message = refused(
        &state,
        &pod("vllm-6", "default", json!({"app": "vllm"}), spec),
    );
    assert_eq!(message, "6 node(s) didn't match pod anti-affinity rules");
    // A pod without terms but selected by theirs is kept out by symmetry.
    let message = refused(
        &state,
        &pod("plain", "default", json!({"app": "vllm"}), json!({})),
    );
    assert_eq!(
        message,
        "6 node(s) didn't satisfy existing pods anti-affinity rules"
    );
}

#[test]
fn placed_pods_anti_affinity_keeps_matching_pods_out_of_their_domain() {
    let mut state = six_nodes();
    // A pod on n1 refuses app=noisy anywhere in its zone.
    state.observe_pod(&running(
        pod(
            "quiet",
            "default",
            json!({"app": "quiet"}),
            anti_affinity("topology.kubernetes.io/zone", json!({"app": "noisy"})),
        ),
        "n1",
    ));
    for i in 0..3 {
        let node = place(
            &mut state,
            &pod(
                &format!("noisy-{i}"),
                "default",
                json!({"app": "noisy"}),
                json!({"nodeSelector": {"topology.kubernetes.io/zone": "b"}}),
            ),
        );
        assert_eq!(zone_of(&node), "b");
    }
    let message = refused(
        &state,
        &pod(
            "noisy-a",
            "default",
            json!({"app": "noisy"}),
            json!({"nodeSelector": {"topology.kubernetes.io/zone": "a"}}),
        ),
    );
    assert!(
        message.contains("3 node(s) didn't satisfy existing pods anti-affinity rules"),
        "{message}"
    );
    // Pods it does not select are not affected.
    let other = place(
        &mut state,
        &pod(
            "calm",
            "default",
            json!({"app": "calm"}),
            json!({"nodeSelector": {"kubernetes.io/hostname": "n2"}}),
        ),
    );
    assert_eq!(other, "n2");
}

#[test]
fn required_affinity_follows_the_target_and_the_first_pod_may_match_itself() {
    let mut state = six_nodes();
    // No cache anywhere, and the pod is not a cache: nowhere to go.
    let wants_cache = affinity("topology.kubernetes.io/zone", json!({"app": "cache"}));
    let message = refused(
        &state,
        &pod(
            "server",
            "default",
            json!({"app": "server"}),
            wants_cache.clone(),
        ),
    );
    assert_eq!(message, "6 node(s) didn't match pod affinity rules");
    // A pod with affinity to its own kind lands although none exists yet
    // (the first-pod rule), and the next ones follow it into its zone.
    let self_affine = affinity("topology.kubernetes.io/zone", json!({"app": "cache"}));
    let first = place(
        &mut state,
        &pod(
            "cache-0",
            "default",
            json!({"app": "cache"}),
            self_affine.clone(),
        ),
    );
    for i in 1..5 {
        let node = place(
            &mut state,
            &pod(
                &format!("cache-{i}"),
                "default",
                json!({"app": "cache"}),
                self_affine.clone(),
            ),
        );
        assert_eq!(zone_of(&node), zone_of(&first));
    }
    let server = place(
        &mut state,
        &pod("server", "default", json!({"app": "server"}), wants_cache),
    );
    assert_eq!(zone_of(&server), zone_of(&first));
    // A node without the topology label never satisfies affinity.
    let mut bare = ClusterState::new(Config::default());
    let unlabelled: Node = serde_json::from_value(json!({"metadata": {"name": "x", "labels": {}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}], "allocatable": {"cpu": "4", "pods": "10"}}}))
    .expect("node");
    bare.upsert_node(&unlabelled);
    let message = refused(
        &bare,
        &pod("cache-0", "default", json!({"app": "cache"}), self_affine),
    );
    assert_eq!(message, "1 node(s) didn't match pod affinity rules");
}

#[test]
fn affinity_needs_one_pod_matching_every_term() {
    let mut state = six_nodes();
    state.observe_pod(&running(
        pod("a", "default", json!({"app": "x"}), json!({})),
        "n1",
    ));
    state.observe_pod(&running(
        pod("b", "default", json!({"tier": "y"}), json!({})),
        "n1",
    ));
    let both = json!({"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "x"}}, "topologyKey": "kubernetes.io/hostname"},
        {"labelSelector": {"matchLabels": {"tier": "y"}}, "topologyKey": "kubernetes.io/hostname"}]}}});
    // Two pods each matching one term are not one pod matching both; the
    // pod does not match its own terms, so the first-pod rule does not apply.
    assert_eq!(
        refused(&state, &pod("p", "default", json!({}), both.clone())),
        "6 node(s) didn't match pod affinity rules"
    );
    state.observe_pod(&running(
        pod("c", "default", json!({"app": "x", "tier": "y"}), json!({})),
        "n5",
    ));
    assert_eq!(
        place(&mut state, &pod("p", "default", json!({}), both)),
        "n5"
    );
}

#[test]
fn terms_look_in_their_namespaces() {
    let mut state = six_nodes();
    let mut labelled: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "team-a", "labels": {"team": "a"}}}))
            .expect("ns");
    state.upsert_namespace(&labelled);
    state.observe_pod(&running(
        pod("x1", "team-a", json!({"app": "x"}), json!({})),
        "n1",
    ));
    state.observe_pod(&running(
        pod("x2", "other", json!({"app": "x"}), json!({})),
        "n2",
    ));
    // Default: the pod's own namespace only.
    let own = anti_affinity("kubernetes.io/hostname", json!({"app": "x"}));
    let message = refused(
        &state,
        &pod(
            "p",
            "other",
            json!({}),
            json!({"nodeSelector": {"kubernetes.io/hostname": "n2"}, "affinity": own["affinity"]}),
        ),
    );
    assert!(
        message.contains("1 node(s) didn't match pod anti-affinity rules"),
        "{message}"
    );
    assert_eq!(
        place(
            &mut state.clone(),
            &pod(
                "p",
                "other",
                json!({}),
                json!({"nodeSelector": {"kubernetes.io/hostname": "n1"}, "affinity": own["affinity"]})
            )
        ),
        "n1"
    );
    // Named namespaces.
    let named = json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "x"}}, "namespaces": ["team-a"], "topologyKey": "kubernetes.io/hostname"}]}});
    let on = |node: &str, affinity: &Value| {
        pod(
            "p",
            "other",
            json!({}),
            json!({"nodeSelector": {"kubernetes.io/hostname": node}, "affinity": affinity}),
        )
    };
    assert!(state.schedule(&on("n1", &named)).is_err());
    assert!(state.schedule(&on("n2", &named)).is_ok());
    // namespaceSelector by the namespace's labels; {} is every namespace.
    let by_label = json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "x"}}, "namespaceSelector": {"matchLabels": {"team": "a"}}, "topologyKey": "kubernetes.io/hostname"}]}});
    assert!(state.schedule(&on("n1", &by_label)).is_err());
    assert!(state.schedule(&on("n2", &by_label)).is_ok());
    let every = json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "x"}}, "namespaceSelector": {}, "topologyKey": "kubernetes.io/hostname"}]}});
    assert!(state.schedule(&on("n1", &every)).is_err());
    assert!(state.schedule(&on("n2", &every)).is_err());
    assert!(state.schedule(&on("n3", &every)).is_ok());
    // Relabelled namespace: the selector follows.
    labelled.metadata.labels = Some(BTreeMap::from([("team".to_owned(), "b".to_owned())]));
    state.upsert_namespace(&labelled);
    assert!(state.schedule(&on("n1", &by_label)).is_ok());
}

#[test]
fn zone_spread_with_max_skew_one_lands_three_and_three() {
    let mut state = six_nodes();
    let spec = zone_spread(1, "DoNotSchedule", json!({}));
    let mut per_zone: BTreeMap<&str, usize> = BTreeMap::new();
    for i in 0..6 {
        let node = place(
            &mut state,
            &pod(
                &format!("web-{i}"),
                "default",
                json!({"app": "web"}),
                spec.clone(),
            ),
        );
        *per_zone.entry(zone_of(&node)).or_default() += 1;
        let counts: Vec<usize> = per_zone.values().copied().collect();
        let spread = counts.iter().max().unwrap_or(&0)
            - if counts.len() < 2 {
                0
            } else {
                *counts.iter().min().unwrap_or(&0)
            };
        assert!(spread <= 1, "after {} pods: {per_zone:?}", i + 1);
    }
    assert_eq!(per_zone, BTreeMap::from([("a", 3), ("b", 3)]));
    // A pod pinned to zone a, counting zone b too (nodeAffinityPolicy
    // Ignore): 3+1-3 = 1 is allowed, and after a fourth pod in zone a,
    // 4+1-3 = 2 is not.
    let ignore = zone_spread(1, "DoNotSchedule", json!({"nodeAffinityPolicy": "Ignore"}));
    let pinned = |name: &str, spread: &Value| {
        pod(
            name,
            "default",
            json!({"app": "web"}),
            json!({"nodeSelector": {"topology.kubernetes.io/zone": "a"},
        "topologySpreadConstraints": spread["topologySpreadConstraints"]}),
        )
    };
    assert!(state.schedule(&pinned("web-x", &ignore)).is_ok());
    place(
        &mut state,
        &pod(
            "web-6",
            "default",
            json!({"app": "web"}),
            json!({"nodeSelector": {"topology.kubernetes.io/zone": "a"}}),
        ),
    );
    let message = refused(&state, &pinned("web-7", &ignore));
    assert!(
        message.contains("3 node(s) didn't match pod topology spread constraints"),
        "{message}"
    );
    // By default (Honor) only zone a, where the pod may go, is a domain.
    assert!(state.schedule(&pinned("web-7", &spec)).is_ok());
}

#[test]
fn spread_counts_only_nodes_the_pod_could_use_unless_told_otherwise() {
    let mut state = six_nodes();
    // Zone c holds one node the pod's nodeSelector excludes.
    state.upsert_node(&zonal_node("c1", "c", json!({"pool": "other"})));
    for i in 1..=6 {
        let mut node = zonal_node(
            &format!("n{i}"),
            zone_of(&format!("n{i}")),
            json!({"pool": "gpu"}),
        );
        node.metadata.name = Some(format!("n{i}"));
        state.upsert_node(&node);
    }
    let honour = pod(
        "w",
        "default",
        json!({"app": "web"}),
        json!({"nodeSelector": {"pool": "gpu"},
        "topologySpreadConstraints": zone_spread(1, "DoNotSchedule", json!({}))["topologySpreadConstraints"]}),
    );
    let mut honoured = state.clone();
    for i in 0..4 {
        let mut p = honour.clone();
        p.metadata.name = Some(format!("w{i}"));
        place(&mut honoured, &p);
    }
    // With nodeAffinityPolicy: Ignore, zone c (empty, unreachable) is the
    // minimum: one pod per zone, then nothing.
    let ignore = pod(
        "v",
        "default",
        json!({"app": "web"}),
        json!({"nodeSelector": {"pool": "gpu"},
        "topologySpreadConstraints": zone_spread(1, "DoNotSchedule", json!({"nodeAffinityPolicy": "Ignore"}))["topologySpreadConstraints"]}),
    );
    let mut ignoring = state.clone();
    for i in 0..2 {
        let mut p = ignore.clone();
        p.metadata.name = Some(format!("v{i}"));
        place(&mut ignoring, &p);
    }
    let message = refused(&ignoring, &ignore);
    assert!(
        message.contains("6 node(s) didn't match pod topology spread constraints"),
        "{message}"
    );
    assert!(
        message.contains("1/7 nodes: node does not match nodeSelector"),
        "{message}"
    );
}

#[test]
fn spread_taint_policy_and_min_domains() {
    let mut state = six_nodes();
    let mut tainted = zonal_node("c1", "c", json!({}));
    tainted.spec = Some(
        serde_json::from_value(json!({"taints": [{"key": "maintenance", "effect": "NoSchedule"}]}))
            .expect("spec"),
    );
    state.upsert_node(&tainted);
    // Default (Ignore): the tainted node's empty zone c is a domain: 1 per zone.
    let spec = |extra: Value| zone_spread(1, "DoNotSchedule", extra);
    let mut ignoring = state.clone();
    place(
        &mut ignoring,
        &pod("a", "default", json!({"app": "web"}), spec(json!({}))),
    );
    place(
        &mut ignoring,
        &pod("b", "default", json!({"app": "web"}), spec(json!({}))),
    );
    assert!(ignoring
        .schedule(&pod("c", "default", json!({"app": "web"}), spec(json!({}))))
        .is_err());
    // Honor: zone c does not count.
    let mut honouring = state.clone();
    for name in ["a", "b", "c", "d"] {
        place(
            &mut honouring,
            &pod(
                name,
                "default",
                json!({"app": "web"}),
                spec(json!({"nodeTaintsPolicy": "Honor"})),
            ),
        );
    }
    // minDomains 3 with two reachable zones: the global minimum is 0, so
    // each zone takes at most maxSkew pods.
    let mut few = six_nodes();
    let min3 = spec(json!({"minDomains": 3}));
    place(
        &mut few,
        &pod("a", "default", json!({"app": "web"}), min3.clone()),
    );
    place(
        &mut few,
        &pod("b", "default", json!({"app": "web"}), min3.clone()),
    );
    let message = refused(&few, &pod("c", "default", json!({"app": "web"}), min3));
    assert_eq!(
        message,
        "6 node(s) didn't match pod topology spread constraints"
    );
}

#[test]
fn spread_selector_namespace_match_label_keys_and_terminating_pods() {
    let mut state = six_nodes();
    // Three old-revision pods in zone a, one in another namespace, one terminating.
    for i in 1..=3 {
        state.observe_pod(&running(
            pod(
                &format!("old{i}"),
                "default",
                json!({"app": "web", "rev": "1"}),
                json!({}),
            ),
            &format!("n{i}"),
        ));
    }
    state.observe_pod(&running(
        pod(
            "elsewhere",
            "other",
            json!({"app": "web", "rev": "2"}),
            json!({}),
        ),
        "n4",
    ));
    let mut leaving = running(
        pod(
            "leaving",
            "default",
            json!({"app": "web", "rev": "2"}),
            json!({}),
        ),
        "n1",
    );
    leaving.metadata.deletion_timestamp =
        serde_json::from_value(json!("2026-01-01T00:00:00Z")).expect("time");
    state.observe_pod(&leaving);
    // With matchLabelKeys [rev], only rev=2 pods of this namespace count:
    // none, so zone a is as good as zone b.
    let keyed = zone_spread(
        1,
        "DoNotSchedule",
        json!({"matchLabelKeys": ["rev"], "nodeAffinityPolicy": "Ignore"}),
    );
    let on_a = |name: &str, spec: &Value| {
        pod(
            name,
            "default",
            json!({"app": "web", "rev": "2"}),
            json!({"nodeSelector": {"topology.kubernetes.io/zone": "a"},
        "topologySpreadConstraints": spec["topologySpreadConstraints"]}),
        )
    };
    assert!(state.schedule(&on_a("new", &keyed)).is_ok());
    // Without it, the three rev=1 pods make zone a's skew 4.
    let plain = zone_spread(1, "DoNotSchedule", json!({"nodeAffinityPolicy": "Ignore"}));
    assert!(state.schedule(&on_a("new", &plain)).is_err());
    // A node without the topology label is refused with kube's wording.
    let mut unlabelled = ClusterState::new(Config::default());
    let node: Node = serde_json::from_value(json!({"metadata": {"name": "x", "labels": {}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}], "allocatable": {"cpu": "4", "pods": "10"}}})).expect("node");
    unlabelled.upsert_node(&node);
    assert_eq!(
        refused(
            &unlabelled,
            &pod("n", "default", json!({"app": "web"}), plain)
        ),
        "1 node(s) didn't match pod topology spread constraints (missing required label)"
    );
}

#[test]
fn schedule_anyway_and_preferred_terms_rank_before_the_node_policy() {
    let mut state = six_nodes();
    for i in 1..=3 {
        state.observe_pod(&running(
            pod(
                &format!("w{i}"),
                "default",
                json!({"app": "web"}),
                json!({}),
            ),
            &format!("n{i}"),
        ));
    }
    // ScheduleAnyway: zone b has no web pod yet.
    let soft = pod(
        "s",
        "default",
        json!({"app": "web"}),
        zone_spread(1, "ScheduleAnyway", json!({})),
    );
    assert_eq!(zone_of(&state.schedule(&soft).expect("fits").node), "b");
    // Preferred anti-affinity on hostname: away from the web pods, though
    // binpack (every node empty of GPUs: a tie) would pick n1 by name.
    let preferred = json!({"affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "podAffinityTerm": {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}}]}}});
    let placed = state
        .schedule(&pod("p", "default", json!({}), preferred))
        .expect("fits")
        .node;
    assert!(!["n1", "n2", "n3"].contains(&placed.as_str()), "{placed}");
    // Preferred affinity to zone b's cache.
    state.observe_pod(&running(
        pod("cache", "default", json!({"app": "cache"}), json!({})),
        "n6",
    ));
    let near = json!({"affinity": {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 10, "podAffinityTerm": {"labelSelector": {"matchLabels": {"app": "cache"}}, "topologyKey": "kubernetes.io/hostname"}}]}}});
    assert_eq!(
        state
            .schedule(&pod("q", "default", json!({}), near))
            .expect("fits")
            .node,
        "n6"
    );
    // A placed pod's preferred anti-affinity repels the incoming pod (symmetry).
    let mut symmetric = six_nodes();
    for i in 1..=5 {
        let repels = json!({"affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "podAffinityTerm": {"labelSelector": {"matchLabels": {"app": "batch"}}, "topologyKey": "kubernetes.io/hostname"}}]}}});
        symmetric.observe_pod(&running(
            pod(&format!("svc{i}"), "default", json!({"app": "svc"}), repels),
            &format!("n{i}"),
        ));
    }
    assert_eq!(
        symmetric
            .schedule(&pod("b", "default", json!({"app": "batch"}), json!({})))
            .expect("fits")
            .node,
        "n6"
    );
}

#[test]
fn host_ports_conflict_by_protocol_ip_and_port() {
    let mut state = six_nodes();
    let ports = |port: i32, protocol: &str, ip: &str| {
        let mut p = json!({"containerPort": port, "hostPort": port, "protocol": protocol});
        if !ip.is_empty() {
            p["hostIP"] = json!(ip);
        }
        json!({"nodeSelector": {"kubernetes.io/hostname": "n1"},
            "containers": [{"name": "main", "ports": [p], "resources": {"requests": {"cpu": "100m"}}}]})
    };
    state.observe_pod(&running(
        pod("web", "default", json!({}), ports(8080, "TCP", "")),
        "n1",
    ));
    let message = refused(
        &state,
        &pod("b", "default", json!({}), ports(8080, "TCP", "10.0.0.1")),
    );
    assert!(
        message.contains("1 node(s) didn't have free ports for the requested pod ports"),
        "{message}"
    );
    assert!(state
        .schedule(&pod("c", "default", json!({}), ports(8080, "UDP", "")))
        .is_ok());
    assert!(state
        .schedule(&pod("d", "default", json!({}), ports(8081, "TCP", "")))
        .is_ok());
    let mut specific = six_nodes();
    specific.observe_pod(&running(
        pod("web", "default", json!({}), ports(9000, "TCP", "10.0.0.1")),
        "n1",
    ));
    assert!(specific
        .schedule(&pod(
            "e",
            "default",
            json!({}),
            ports(9000, "TCP", "10.0.0.2")
        ))
        .is_ok());
    assert!(specific
        .schedule(&pod("f", "default", json!({}), ports(9000, "TCP", "")))
        .is_err());
    // Released with the pod.
    specific.remove_pod(&pod("web", "default", json!({}), json!({})));
    assert!(specific
        .schedule(&pod("f", "default", json!({}), ports(9000, "TCP", "")))
        .is_ok());
}

#[test]
fn gated_pods_wait() {
    let state = six_nodes();
    let gated = pod(
        "g",
        "default",
        json!({}),
        json!({"schedulingGates": [{"name": "example.com/quota"}]}),
    );
    match state.schedule(&gated) {
        Err(ScheduleError::SchedulingGated(gates)) => {
            assert_eq!(gates, vec!["example.com/quota".to_owned()])
        }
        other => panic!("expected gated, got {other:?}"),
    }
}

// ---- property tests against a reference implementation -------------------

/// A random cluster: nodes (zone index), resident pods (node, app, namespace).
#[derive(Debug, Clone)]
struct Scenario {
    zones: Vec<usize>,
    residents: Vec<(usize, u8, u8)>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (1usize..7).prop_flat_map(|nodes| {
        (
            proptest::collection::vec(0usize..3, nodes),
            proptest::collection::vec((0..nodes, 0u8..3, 0u8..2), 0..12),
        )
            .prop_map(|(zones, residents)| Scenario { zones, residents })
    })
}

const APPS: [&str; 3] = ["a", "b", "c"];
const NAMESPACES: [&str; 2] = ["default", "other"];

fn key_label(key: usize) -> &'static str {
    ["topology.kubernetes.io/zone", "kubernetes.io/hostname"][key]
}

impl Scenario {
    fn value(&self, node: usize, key: usize) -> String {
        if key == 0 {
            format!("z{}", self.zones[node])
        } else {
            format!("m{node}")
        }
    }

    fn state(&self, resident_spec: &Value) -> ClusterState {
        let mut state = ClusterState::new(Config::default());
        for (i, zone) in self.zones.iter().enumerate() {
            state.upsert_node(&zonal_node(
                &format!("m{i}"),
                &format!("z{zone}"),
                json!({}),
            ));
        }
        for (j, (node, app, ns)) in self.residents.iter().enumerate() {
            let p = pod(
                &format!("r{j}"),
                NAMESPACES[usize::from(*ns)],
                json!({"app": APPS[usize::from(*app)]}),
                resident_spec.clone(),
            );
            state.observe_pod(&running(p, &format!("m{node}")));
        }
        state
    }

    fn pinned(&self, node: usize, labels: Value, spec: &Value) -> Pod {
        let mut spec = spec.clone();
        spec["nodeSelector"] = json!({"kubernetes.io/hostname": format!("m{node}")});
        pod("incoming", "default", labels, spec)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// DoNotSchedule spread, per node, equals the textbook computation.
    #[test]
    fn spread_matches_reference(s in scenario(), key in 0usize..2, max_skew in 1i32..3,
                                min_domains in 1i32..4, self_app in 0u8..3) {
        let state = s.state(&json!({}));
        let spec = json!({"topologySpreadConstraints": [{"maxSkew": max_skew, "topologyKey": key_label(key),
            "whenUnsatisfiable": "DoNotSchedule", "minDomains": min_domains, "nodeAffinityPolicy": "Ignore",
            "labelSelector": {"matchLabels": {"app": "a"}}}]});
        // Reference: matching pods of the pod's namespace per domain.
        let mut counts: BTreeMap<String, i64> = BTreeMap::new();
        for node in 0..s.zones.len() {
            counts.entry(s.value(node, key)).or_default();
        }
        for (node, app, ns) in &s.residents {
            if *app == 0 && *ns == 0 {
                *counts.entry(s.value(*node, key)).or_default() += 1;
            }
        }
        let global_min = if (counts.len() as i64) < i64::from(min_domains) { 0 } else { *counts.values().min().unwrap_or(&0) };
        let self_match = i64::from(self_app == 0);
        for node in 0..s.zones.len() {
            let expected = counts[&s.value(node, key)] + self_match - global_min <= i64::from(max_skew);
            let incoming = s.pinned(node, json!({"app": APPS[usize::from(self_app)]}), &spec);
            prop_assert_eq!(state.schedule(&incoming).is_ok(), expected, "node m{}", node);
        }
    }

    /// Required affinity and anti-affinity (both sides), per node, equal
    /// the textbook computation.
    #[test]
    fn affinity_matches_reference(s in scenario(), anti_key in 0usize..2, affinity_key in 0usize..2,
                                  use_anti in any::<bool>(), use_affinity in any::<bool>(),
                                  residents_repel in any::<bool>(), self_app in 0u8..3) {
        // Residents of app b refuse app c in their zone when `residents_repel`.
        let resident_spec = if residents_repel { anti_affinity(key_label(0), json!({"app": "c"})) } else { json!({}) };
        let state = {
            let mut state = ClusterState::new(Config::default());
            for (i, zone) in s.zones.iter().enumerate() {
                state.upsert_node(&zonal_node(&format!("m{i}"), &format!("z{zone}"), json!({})));
            }
            for (j, (node, app, ns)) in s.residents.iter().enumerate() {
                let spec = if *app == 1 { resident_spec.clone() } else { json!({}) };
                let p = pod(&format!("r{j}"), NAMESPACES[usize::from(*ns)], json!({"app": APPS[usize::from(*app)]}), spec);
                state.observe_pod(&running(p, &format!("m{node}")));
            }
            state
        };
        let mut terms = json!({});
        if use_anti {
            terms["podAntiAffinity"] = json!({"requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": {"app": "a"}}, "topologyKey": key_label(anti_key)}]});
        }
        if use_affinity {
            terms["podAffinity"] = json!({"requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": {"app": "b"}}, "topologyKey": key_label(affinity_key)}]});
        }
        let spec = json!({"affinity": terms});
        let same_ns = |ns: u8| ns == 0;
        let any_b = s.residents.iter().any(|(_, app, ns)| *app == 1 && same_ns(*ns));
        for node in 0..s.zones.len() {
            let shares = |other: usize, key: usize| s.value(other, key) == s.value(node, key);
            let anti_ok = !use_anti || !s.residents.iter().any(|(m, app, ns)| *app == 0 && same_ns(*ns) && shares(*m, anti_key));
            let repelled = residents_repel
                && self_app == 2
                && s.residents.iter().any(|(m, app, ns)| *app == 1 && same_ns(*ns) && shares(*m, 0));
            let existing_ok = !repelled;
            let affinity_ok = !use_affinity
                || s.residents.iter().any(|(m, app, ns)| *app == 1 && same_ns(*ns) && shares(*m, affinity_key))
                || (!any_b && self_app == 1);
            let incoming = s.pinned(node, json!({"app": APPS[usize::from(self_app)]}), &spec);
            prop_assert_eq!(state.schedule(&incoming).is_ok(), anti_ok && existing_ok && affinity_ok, "node m{}", node);
        }
    }
}

/// `six_nodes` under `config`.
fn six_nodes_with(config: Config) -> ClusterState {
    let mut state = ClusterState::new(config);
    for i in 1..=6 {
        let zone = if i <= 3 { "a" } else { "b" };
        state.upsert_node(&zonal_node(&format!("n{i}"), zone, json!({})));
    }
    state
}

fn web_replica_set() -> k8s_openapi::api::apps::v1::ReplicaSet {
    serde_json::from_value(json!({"metadata": {"name": "web-7d9", "namespace": "ml"},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}}}}))
    .expect("replica set")
}

#[test]
fn system_default_spread_applies_to_pods_a_workload_selects() {
    let mut state = six_nodes();
    for i in 0..2 {
        state.observe_pod(&running(
            pod(&format!("web-{i}"), "ml", json!({"app": "web"}), json!({})),
            "n1",
        ));
    }
    let next = pod("web-2", "ml", json!({"app": "web"}), json!({}));
    // Nothing selects the pod: no constraints, binpack's tie goes to n1.
    assert_eq!(state.schedule(&next).expect("fits").node, "n1");
    // A ReplicaSet selects it: hostname maxSkew 3 and zone maxSkew 5,
    // ScheduleAnyway, rank the nodes without web pods (and zone b) first.
    state.upsert_replica_set(&web_replica_set());
    let node = state.schedule(&next).expect("fits").node;
    assert!(zone_of(&node) == "b", "spread to the other zone: {node}");
    // A pod that sets its own constraints keeps only them.
    let own = pod(
        "web-3",
        "ml",
        json!({"app": "web"}),
        json!({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": {"app": "none"}}}]}),
    );
    assert_eq!(state.schedule(&own).expect("fits").node, "n1");
    // The ReplicaSet gone: back to binpack.
    state.remove_workload_selector(
        default_spread::WorkloadKind::ReplicaSet,
        &web_replica_set().metadata,
    );
    assert_eq!(state.schedule(&next).expect("fits").node, "n1");
}

#[test]
fn default_spread_can_be_switched_off_or_listed() {
    let off: Config = Config::from_yaml("defaultTopologySpread:\n  mode: off\n").expect("config");
    let mut state = six_nodes_with(off);
    state.upsert_replica_set(&web_replica_set());
    state.observe_pod(&running(
        pod("web-0", "ml", json!({"app": "web"}), json!({})),
        "n1",
    ));
    let next = pod("web-1", "ml", json!({"app": "web"}), json!({}));
    assert_eq!(
        state.schedule(&next).expect("fits").node,
        "n1",
        "off: binpack"
    );
    let list = Config::from_yaml(
        "defaultTopologySpread:\n  mode: list\n  constraints:\n    - {maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: DoNotSchedule}\n",
    )
    .expect("config");
    let mut state = six_nodes_with(list);
    let unlabelled: Node = serde_json::from_value(
        json!({"metadata": {"name": "n0", "labels": {"kubernetes.io/hostname": "n0"}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}],
                   "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110"}}}),
    )
    .expect("node");
    state.upsert_node(&unlabelled);
    state.upsert_replica_set(&web_replica_set());
    state.observe_pod(&running(
        pod("web-0", "ml", json!({"app": "web"}), json!({})),
        "n1",
    ));
    let node = state.schedule(&next).expect("fits").node;
    assert_eq!(zone_of(&node), "b", "a hard zone default: {node}");
    // Zone b filled past zone a: back to zone a, never the unlabelled n0.
    state.observe_pod(&running(
        pod("web-b", "ml", json!({"app": "web"}), json!({})),
        "n4",
    ));
    state.observe_pod(&running(
        pod("web-b2", "ml", json!({"app": "web"}), json!({})),
        "n5",
    ));
    // With only the unlabelled node the hard default refuses it.
    let mut lonely = ClusterState::new(state.config().clone());
    lonely.upsert_node(&unlabelled);
    lonely.upsert_replica_set(&web_replica_set());
    let why = refused(&lonely, &next);
    assert!(
        why.contains(
            "1 node(s) didn't match pod topology spread constraints (missing required label)"
        ),
        "{why}"
    );
    assert_eq!(zone_of(&state.schedule(&next).expect("fits").node), "a");
}

#[test]
fn default_selectors_of_services_and_controllers_merge() {
    let mut state = six_nodes();
    let service: k8s_openapi::api::core::v1::Service = serde_json::from_value(
        json!({"metadata": {"name": "web", "namespace": "ml"}, "spec": {"selector": {"app": "web"}}}),
    )
    .expect("service");
    let set: k8s_openapi::api::apps::v1::StatefulSet =
        serde_json::from_value(json!({"metadata": {"name": "web-blue", "namespace": "ml"},
        "spec": {"serviceName": "web", "selector": {"matchLabels": {"app": "web", "track": "blue"}},
            "template": {"metadata": {"labels": {"app": "web", "track": "blue"}}}}}))
        .expect("statefulset");
    state.upsert_service(&service);
    state.upsert_stateful_set(&set);
    // Green pods match only the Service's selector; the blue pod's merged
    // selector (app=web, track=blue) does not count them.
    for i in 0..3 {
        state.observe_pod(&running(
            pod(
                &format!("green-{i}"),
                "ml",
                json!({"app": "web", "track": "green"}),
                json!({}),
            ),
            "n1",
        ));
    }
    state.observe_pod(&running(
        pod(
            "blue-0",
            "ml",
            json!({"app": "web", "track": "blue"}),
            json!({}),
        ),
        "n4",
    ));
    let blue = pod(
        "blue-1",
        "ml",
        json!({"app": "web", "track": "blue"}),
        json!({}),
    );
    let node = state.schedule(&blue).expect("fits").node;
    assert_eq!(
        zone_of(&node),
        "a",
        "away from the other blue pod, green pods ignored: {node}"
    );
    assert_ne!(node, "n4");
    let green = pod(
        "green-3",
        "ml",
        json!({"app": "web", "track": "green"}),
        json!({}),
    );
    let node = state.schedule(&green).expect("fits").node;
    assert_ne!(
        node, "n1",
        "green is spread by the Service's selector: {node}"
    );
    // Another namespace's Service selects nothing here.
    let other = pod("web-x", "other", json!({"app": "web"}), json!({}));
    assert_eq!(state.schedule(&other).expect("fits").node, "n1");
}
