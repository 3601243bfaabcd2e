//! Benchmark harness (prints figures, asserts nothing): `Allocate` latency
//! through the real unix socket against the API stand-in with 8 fake
//! cards, and the resident memory of the release binary at idle with 8
//! fake cards. Run: `cargo bench -p tessera-node-agent --bench allocate`.

#[path = "../tests/integration/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use tessera_api::config::Config;

const CARDS: &str = "8x NVIDIA A10G 23028";
const CALLS: usize = 400;
/// Pods already finished on the node, so the listing is not trivially small.
const BACKGROUND_PODS: usize = 40;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

async fn allocate_latency() {
    let cluster = Cluster::start(CARDS, Config::default()).await;
    let card = cluster.card(3);
    for i in 0..BACKGROUND_PODS {
        let mut pod = bound_pod(&format!("done-{i}"), &vec![vec![device(&card, 1000, 10)]]);
        pod.metadata
            .annotations
            .as_mut()
            .expect("annotations")
            .insert("hami.io/bind-phase".into(), "success".into());
        cluster.api.insert(&pod);
    }
    let mut client = cluster.kubelet.plugin_client().await;
    let mut latencies = Vec::with_capacity(CALLS);
    for i in 0..CALLS {
        let name = format!("bench-{i}");
        cluster
            .api
            .insert(&bound_pod(&name, &vec![vec![device(&card, 1000, 10)]]));
        let request = allocate_request(&[cluster.ids(3, 1)]);
        let start = Instant::now();
        client.allocate(request).await.expect("Allocate succeeds");
        latencies.push(start.elapsed());
        cluster
            .api
            .delete_value("v1", "pods", Some("default"), &name);
    }
    latencies.sort();
    println!(
        "Allocate latency over {CALLS} calls (unix socket, API stand-in, {BACKGROUND_PODS} other pods on the node): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().expect("calls").as_secs_f64() * 1e3,
    );
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

async fn idle_rss() {
    let api = tessera_testkit::ApiServer::start()
        .await
        .expect("API stand-in");
    api.insert(&node_object());
    let temp = tempfile::tempdir().expect("tempdir");
    let kubelet_dir = temp.path().join("kubelet");
    std::fs::create_dir_all(&kubelet_dir).expect("dir");
    let kubelet = KubeletStandIn::start(&kubelet_dir);
    let kubeconfig = temp.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: s\n  cluster:\n    server: {}\ncontexts:\n- name: s\n  context:\n    cluster: s\n    user: u\nusers:\n- name: u\n  user: {{}}\ncurrent-context: s\n",
            api.url()
        ),
    )
    .expect("kubeconfig");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tessera-node-agent"))
        .args(["--node-name", NODE, "--fake-gpus", CARDS])
        .arg("--kubelet-socket")
        .arg(kubelet.socket())
        .arg("--host-dir")
        .arg(temp.path().join("host"))
        .args(["--metrics-addr", "127.0.0.1:0"])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start the agent binary");
    kubelet.wait_registrations(1, WAIT).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut client = kubelet.plugin_client().await;
    client
        .get_device_plugin_options(tessera_node_agent::proto::Empty {})
        .await
        .expect("agent answers");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    match rss {
        Some(kib) => println!(
            "agent binary RSS at idle with 8 fake cards: {:.1} MiB ({kib} KiB)",
            kib as f64 / 1024.0
        ),
        None => println!(
            "agent binary RSS: could not read /proc/{}/status",
            child.id()
        ),
    }
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    allocate_latency().await;
    idle_rss().await;
}
