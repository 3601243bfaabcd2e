//! Shell benchmark: a backlog of 1,000 pending GPU pods on 1,000 nodes
//! against the in-process API stand-in (real HTTP, real kube-rs client).
//! Prints pods bound per second and API writes per placed pod, with and
//! without the per-pod `Scheduled` Event. The node side of the allocation
//! handshake is the testkit's acknowledger (each bound pod marked admitted
//! at once), since the scheduler binds the next pod of a shape on a node
//! only once the previous one is acknowledged. A third run gives 30% of
//! the pods a zone topology spread constraint and 30% a preferred pod
//! anti-affinity term on the hostname (nodes in 3 zones).
//!
//! `cargo bench -p tessera-scheduler --bench bind_throughput`

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::json;
use tessera_api::config::Config;
use tessera_api::inventory::{encode_inventory, GpuDevice};
use tessera_scheduler::shell::{Scheduler, ShellOptions};
use tessera_testkit::ApiServer;

const NODES: u32 = 1000;
const PODS: u32 = 1000;

async fn run(scheduled_events: bool, topology: bool) {
    let server = ApiServer::start().await.expect("server");
    for n in 0..NODES {
        let devices: Vec<GpuDevice> = (0..8)
            .map(|i| GpuDevice {
                id: format!("GPU-{n:04}-{i}"),
                index: i,
                count: 10,
                devmem: 23028,
                devcore: 100,
                device_type: "NVIDIA-NVIDIA A10G".into(),
                numa: 0,
                mode: "hami-core".into(),
                health: true,
            })
            .collect();
        let node: Node = serde_json::from_value(json!({"metadata": {"name": format!("node-{n:04}"),
            "labels": {"kubernetes.io/hostname": format!("node-{n:04}"), "topology.kubernetes.io/zone": format!("zone-{}", n % 3)},
            "annotations": {"hami.io/node-nvidia-register": encode_inventory(&devices)}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}], "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "100"}}}))
        .expect("node");
        server.insert(&node);
    }
    for p in 0..PODS {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": format!("pod-{p:04}"), "namespace": "bench",
            "annotations": {"hami.io/gpu-scheduler-policy": "binpack"}},
            "spec": {"schedulerName": "tessera-scheduler", "containers": [{"name": "main", "image": "x",
                "resources": {"limits": {"nvidia.com/gpumem-percentage": "45", "nvidia.com/gpucores": "30"}}}]}}))
        .expect("pod");
        server.insert(&with_topology(pod, p, topology));
    }
    server.clear_requests();
    let _kubelets = server.acknowledge_allocations(Duration::ZERO);
    let options = ShellOptions {
        scheduled_events,
        ..ShellOptions::default()
    };
    let scheduler = Scheduler::new(server.client(), Config::default(), options);
    let started = Instant::now();
    let running = scheduler.clone();
    let handle = tokio::spawn(async move {
        let _ = running.run().await;
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let bound = server.write_count("POST", "pods/binding");
        if bound >= PODS as usize || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    // Let trailing event writes land before counting them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    handle.abort();
    let bound = server
        .list::<Pod>()
        .iter()
        .filter(|p| p.spec.as_ref().is_some_and(|s| s.node_name.is_some()))
        .count();
    let writes = server.write_count("*", "*");
    println!(
        "backlog {PODS} GPU pods, {NODES} nodes x 8 A10G, scheduled events {}{}:",
        if scheduled_events { "on" } else { "off" },
        if topology {
            ", 30% zone spread + 30% preferred anti-affinity"
        } else {
            ""
        }
    );
    println!(
        "  bound:            {bound}/{PODS} in {:.2} s (from start, initial lists included)",
        elapsed.as_secs_f64()
    );
    println!(
        "  throughput:       {:.0} pods/s",
        f64::from(PODS) / elapsed.as_secs_f64()
    );
    println!(
        "  API writes / pod: {:.2}",
        writes as f64 / bound.max(1) as f64
    );
    for ((method, target), count) in server.write_counts() {
        println!("    {method} {target}: {count}");
    }
}

/// With `topology`, 30% of the pods get a zone spread constraint
/// (DoNotSchedule, maxSkew 1) and 30% a preferred anti-affinity term on the
/// hostname, over pods of their own group.
fn with_topology(mut pod: Pod, p: u32, topology: bool) -> Pod {
    if !topology {
        return pod;
    }
    let group = format!("group-{}", p % 8);
    pod.metadata.labels = Some([("app".to_owned(), group.clone())].into());
    let selector = json!({"matchLabels": {"app": group}});
    let spec = pod.spec.as_mut().expect("spec");
    match p % 10 {
        0..=2 => {
            spec.topology_spread_constraints = Some(vec![serde_json::from_value(json!({
                "maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "DoNotSchedule", "labelSelector": selector}))
            .expect("constraint")]);
        }
        3..=5 => {
            spec.affinity = Some(
                serde_json::from_value(json!({"podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 50,
                "podAffinityTerm": {"labelSelector": selector, "topologyKey": "kubernetes.io/hostname"}}]}}))
                .expect("affinity"),
            );
        }
        _ => {}
    }
    pod
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(false, false));
    runtime.block_on(run(true, false));
    runtime.block_on(run(false, true));
}
