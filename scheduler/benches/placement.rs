//! Placement-core benchmark: decisions per second on a snapshot of 1,000
//! nodes × 8 GPUs in 3 zones with half the cards partly used (4 labelled
//! pods per node). Each decision is timed on its own; prints throughput,
//! median and p99, first for pods without pod-topology rules, then for a
//! mix where 30% carry a zone topology spread constraint and 30% a
//! preferred pod anti-affinity term, then with every node publishing link
//! scores (`hami.io/node-nvidia-score`, NVLinked pairs 0-1, 2-3, 4-5, 6-7)
//! and every pod `topology-aware`, then with every pod selected by a
//! ReplicaSet (so the cluster-default spread constraints apply).
//!
//! `cargo bench -p tessera-scheduler --bench placement`

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::json;
use tessera_api::config::Config;
use tessera_api::inventory::{encode_inventory, GpuDevice};
use tessera_api::pair_scores::{encode_pair_scores, scores_from_links, LinkFacts, PcieLink};
use tessera_scheduler::core::{ClusterState, PodRequirements};

const NODES: u32 = 1000;
const CARDS: u32 = 8;

fn snapshot(with_link_scores: bool) -> ClusterState {
    let mut state = ClusterState::new(Config::default());
    for n in 0..NODES {
        let kind = if n % 2 == 0 {
            "Tesla T4"
        } else {
            "NVIDIA A10G"
        };
        let devmem = if n % 2 == 0 { 15360 } else { 23028 };
        let devices: Vec<GpuDevice> = (0..CARDS)
            .map(|i| GpuDevice {
                id: format!("GPU-{n:04}-{i}"),
                index: i,
                count: 10,
                devmem,
                devcore: 100,
                device_type: format!("NVIDIA-{kind}"),
                numa: i32::try_from(i / 4).unwrap_or(0),
                mode: "hami-core".into(),
                health: true,
            })
            .collect();
        let mut annotations = json!({"hami.io/node-nvidia-register": encode_inventory(&devices)});
        if with_link_scores {
            annotations["hami.io/node-nvidia-score"] = json!(link_scores(&devices));
        }
        let node: Node = serde_json::from_value(json!({"metadata": {"name": format!("node-{n:04}"),
            "labels": {"gpu": "on", "kubernetes.io/hostname": format!("node-{n:04}"), "topology.kubernetes.io/zone": format!("zone-{}", n % 3)}, "annotations": annotations},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                       "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "100"}}}))
        .expect("node");
        state.upsert_node(&node);
        // Half the cards partly used: cards 0..4 of every node carry a pod.
        for i in 0..CARDS / 2 {
            let pod: Pod = serde_json::from_value(json!({"metadata": {"name": format!("load-{n}-{i}"), "namespace": "bench",
                "labels": {"app": format!("svc-{}", (n + i) % 16)},
                "annotations": {"hami.io/vgpu-devices-allocated": format!("GPU-{n:04}-{i},NVIDIA,{},{}:;", 2000 + 500 * i, 10 * i)}},
                "spec": {"nodeName": format!("node-{n:04}"), "containers": [{"name": "c", "resources": {"requests": {"cpu": "1"}}}]},
                "status": {"phase": "Running"}}))
            .expect("pod");
            state.observe_pod(&pod);
        }
    }
    state
}

/// Scores of a node whose cards are NVLinked in pairs (0-1, 2-3, …).
fn link_scores(devices: &[GpuDevice]) -> String {
    let uuids: Vec<String> = devices.iter().map(|d| d.id.clone()).collect();
    encode_pair_scores(&scores_from_links(&uuids, |a, b| {
        Some(LinkFacts {
            pcie: Some(if a / 4 == b / 4 {
                PcieLink::SameCpu
            } else {
                PcieLink::CrossCpu
            }),
            nvlinks: if a / 2 == b / 2 { 4 } else { 0 },
        })
    }))
}

/// The same pods, all `topology-aware`.
fn topology_aware_pods() -> Vec<Pod> {
    pods()
        .into_iter()
        .map(|mut pod| {
            pod.metadata.annotations = Some(
                [(
                    "hami.io/gpu-scheduler-policy".to_owned(),
                    "topology-aware".to_owned(),
                )]
                .into(),
            );
            pod
        })
        .collect()
}

/// The same pods, 30% with a zone spread constraint (DoNotSchedule, over
/// pods like the residents) and 30% with a preferred anti-affinity term on
/// the hostname.
fn topology_pods() -> Vec<Pod> {
    pods()
        .into_iter()
        .enumerate()
        .map(|(i, mut pod)| {
            let selector = json!({"matchLabels": {"app": format!("svc-{}", i % 16)}});
            let spec = pod.spec.as_mut().expect("spec");
            match i % 10 {
                0..=2 => {
                    spec.topology_spread_constraints = Some(vec![serde_json::from_value(json!({
                        "maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                        "whenUnsatisfiable": "DoNotSchedule", "labelSelector": selector}))
                    .expect("constraint")]);
                }
                3..=5 => {
                    spec.affinity = Some(serde_json::from_value(json!({"podAntiAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 50,
                        "podAffinityTerm": {"labelSelector": selector, "topologyKey": "kubernetes.io/hostname"}}]}}))
                    .expect("affinity"));
                }
                _ => {}
            }
            pod
        })
        .collect()
}

fn pods() -> Vec<Pod> {
    let shapes = [
        json!({"nvidia.com/gpumem": "7500"}),
        json!({"nvidia.com/gpumem-percentage": "45", "nvidia.com/gpucores": "30"}),
        json!({"nvidia.com/gpu": "2", "nvidia.com/gpumem": "4000"}),
        json!({"nvidia.com/gpumem": "12000", "nvidia.com/gpucores": "50"}),
    ];
    let policies = [
        json!({}),
        json!({"hami.io/gpu-scheduler-policy": "binpack"}),
        json!({"nvidia.com/use-gputype": "A10G"}),
        json!({"hami.io/node-scheduler-policy": "spread"}),
    ];
    (0..64)
        .map(|i| {
            serde_json::from_value(json!({"metadata": {"name": format!("p{i}"), "namespace": "bench", "annotations": policies[i % 4]},
                "spec": {"schedulerName": "tessera-scheduler", "containers": [{"name": "main",
                    "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": shapes[(i / 4) % 4]}}]}}))
            .expect("pod")
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// The same pods, each labelled as one of 16 ReplicaSets' pods (like the
/// residents), so the cluster-default spread constraints apply.
fn owned_pods() -> Vec<Pod> {
    pods()
        .into_iter()
        .enumerate()
        .map(|(i, mut pod)| {
            pod.metadata.labels = Some([("app".to_owned(), format!("svc-{}", i % 16))].into());
            pod
        })
        .collect()
}

fn main() {
    let state = snapshot(false);
    measure(&state, "pods without pod-topology rules", pods());
    measure(
        &state,
        "30% zone spread (DoNotSchedule), 30% preferred anti-affinity",
        topology_pods(),
    );
    measure(
        &snapshot(true),
        "every node with link scores, every pod topology-aware",
        topology_aware_pods(),
    );
    let mut owned = state.clone();
    for app in 0..16 {
        let set: ReplicaSet = serde_json::from_value(
            json!({"metadata": {"name": format!("svc-{app}"), "namespace": "bench"},
            "spec": {"selector": {"matchLabels": {"app": format!("svc-{app}")}},
                "template": {"metadata": {"labels": {"app": format!("svc-{app}")}}}}}),
        )
        .expect("replica set");
        owned.upsert_replica_set(&set);
    }
    measure(
        &owned,
        "every pod a ReplicaSet's (system default spread: hostname maxSkew 3, zone maxSkew 5, ScheduleAnyway)",
        owned_pods(),
    );
}

fn measure(state: &ClusterState, label: &str, pods: Vec<Pod>) {
    let config = Config::default();
    let requirements: Vec<PodRequirements> = pods
        .iter()
        .map(|p| PodRequirements::from_pod(p, &config).expect("valid"))
        .collect();
    // Warm up.
    for r in requirements.iter().cycle().take(200) {
        let _ = state.schedule_requirements(r);
    }
    let iterations = 20_000;
    let mut times = Vec::with_capacity(iterations);
    let mut placed = 0usize;
    let started = Instant::now();
    for r in requirements.iter().cycle().take(iterations) {
        let t = Instant::now();
        let result = state.schedule_requirements(r);
        times.push(t.elapsed());
        placed += usize::from(result.is_ok());
    }
    let total = started.elapsed();
    // From a Pod object, including reading the request.
    let raw = pods;
    let t = Instant::now();
    for p in raw.iter().cycle().take(5_000) {
        let _ = state.schedule(p);
    }
    let with_parsing = t.elapsed() / 5_000;
    times.sort();
    println!("placement core: {NODES} nodes x {CARDS} GPUs, half the cards partly used, one core; {label}");
    println!("  decisions:          {iterations} ({placed} placed)");
    println!(
        "  throughput:         {:.0} decisions/s",
        iterations as f64 / total.as_secs_f64()
    );
    println!(
        "  median:             {:.1} us",
        percentile(&times, 0.5).as_secs_f64() * 1e6
    );
    println!(
        "  p99:                {:.1} us",
        percentile(&times, 0.99).as_secs_f64() * 1e6
    );
    println!(
        "  from Pod (incl. request parsing): {:.1} us/decision",
        with_parsing.as_secs_f64() * 1e6
    );
}
