//! `tessera inspect` against the Kubernetes API stand-in: the library call
//! over a kube client, and the binary as a user (or kubectl, as the
//! `kubectl-tessera` plugin) runs it, through a kubeconfig file and context.

use std::process::Command;

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{json, Value};
use tessera_api::inventory::encode_inventory;
use tessera_api::names::{allocation as keys, NODE_REGISTER_ANNOTATION};
use tessera_cli::inspect::inspect;
use tessera_testkit::{fixtures, ApiServer};

fn cards(prefix: &str, kind: &str, mib: u64) -> String {
    encode_inventory(&fixtures::cards(&format!("GPU-{prefix}"), 2, kind, mib))
}

fn node(name: &str, register: &str) -> Node {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": {NODE_REGISTER_ANNOTATION: register}}}))
    .expect("node")
}

fn pod(name: &str, node: &str, allocated: &str, phase: &str) -> Pod {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "inference", "annotations": {
            keys::VGPU_NODE: node, keys::DEVICES_ALLOCATED: allocated, keys::BIND_PHASE: "success"}},
        "spec": {"nodeName": node, "containers": [{"name": "vllm", "image": "x"}]},
        "status": {"phase": phase}}))
    .expect("pod")
}

/// Two GPU nodes, a CPU node, three live pods (one with a garbled
/// allocation), and one finished pod whose share no longer counts.
async fn cluster() -> ApiServer {
    let server = ApiServer::start().await.expect("API stand-in");
    server.insert(&node("t4", &cards("t4", "Tesla T4", 15360)));
    server.insert(&node("a10g", &cards("a10g", "NVIDIA A10G", 23028)));
    server.insert::<Node>(
        &serde_json::from_value(
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "cpu"}}),
        )
        .expect("node"),
    );
    server.insert(&pod(
        "chat-t4-0",
        "t4",
        "GPU-t4-1,NVIDIA,7500,0:;",
        "Running",
    ));
    server.insert(&pod(
        "chat-t4-1",
        "t4",
        "GPU-t4-1,NVIDIA,7500,0:;",
        "Pending",
    ));
    server.insert(&pod(
        "old-job",
        "t4",
        "GPU-t4-0,NVIDIA,15360,100:;",
        "Succeeded",
    ));
    server.insert(&pod(
        "garbled",
        "a10g",
        "GPU-a10g-0,NVIDIA,many,0:;",
        "Running",
    ));
    server
}

#[tokio::test]
async fn reports_cards_holders_and_warnings_from_the_api() {
    let server = cluster().await;
    let report = inspect(server.client()).await.expect("inspect");
    let names: Vec<_> = report.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["a10g", "t4"], "only GPU nodes, by name");
    let t4 = &report.nodes[1];
    assert_eq!(
        t4.cards[0].allocated_memory_mib, 0,
        "a finished pod holds nothing"
    );
    assert_eq!(t4.cards[1].allocated_memory_mib, 15000);
    assert_eq!(t4.cards[1].memory_mib, 15360);
    let holders: Vec<_> = t4.cards[1]
        .holders
        .iter()
        .map(|h| (h.pod.as_str(), h.container.as_str()))
        .collect();
    assert_eq!(
        holders,
        [
            ("inference/chat-t4-0", "vllm"),
            ("inference/chat-t4-1", "vllm")
        ]
    );
    assert!(report.nodes[0].cards.iter().all(|c| c.holders.is_empty()));
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(
        report.warnings[0].contains("inference/garbled"),
        "{:?}",
        report.warnings
    );
}

#[tokio::test]
async fn an_unreachable_cluster_is_an_error_that_says_what_to_check() {
    let server = ApiServer::start().await.expect("API stand-in");
    server.fail_next("GET", "nodes", 403, 1);
    let error = inspect(server.client()).await.expect_err("forbidden");
    let message = error.to_string();
    assert!(
        message.contains("could not list nodes") && message.contains("list nodes"),
        "{message}"
    );
}

fn kubeconfig(dir: &std::path::Path, url: &str) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: elsewhere\n\
         clusters:\n- name: standin\n  cluster: {{server: \"{url}\"}}\n- name: nowhere\n  cluster: {{server: \"http://127.0.0.1:9\"}}\n\
         users:\n- name: me\n  user: {{}}\n\
         contexts:\n- name: standin\n  context: {{cluster: standin, user: me}}\n- name: elsewhere\n  context: {{cluster: nowhere, user: me}}\n"
    );
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

/// Runs a binary with `args` off the runtime, so the stand-in keeps serving.
async fn run(binary: std::path::PathBuf, args: Vec<String>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        let output = Command::new(binary)
            .args(&args)
            .env_remove("KUBECONFIG")
            .output()
            .expect("runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
    .await
    .expect("joins")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reads_the_kubeconfig_context_and_prints_table_and_json() {
    let server = cluster().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = kubeconfig(dir.path(), server.url()).display().to_string();
    let tessera = std::path::PathBuf::from(env!("CARGO_BIN_EXE_tessera"));
    let args = |extra: &[&str]| -> Vec<String> {
        ["inspect", "--kubeconfig", &config, "--context", "standin"]
            .iter()
            .chain(extra)
            .map(|s| (*s).to_owned())
            .collect()
    };

    let (ok, stdout, stderr) = run(tessera.clone(), args(&["--output", "json"])).await;
    assert!(ok, "{stderr}");
    let json: Value = serde_json::from_str(&stdout).expect("JSON output");
    let card = &json["nodes"][1]["cards"][1];
    assert_eq!(json["nodes"][1]["name"], "t4");
    assert_eq!(card["uuid"], "GPU-t4-1");
    assert_eq!(card["type"], "NVIDIA-Tesla T4");
    assert_eq!(card["memoryMiB"], 15360);
    assert_eq!(card["allocatedMemoryMiB"], 15000);
    assert_eq!(card["splitCount"], 10);
    assert_eq!(card["holders"][0]["pod"], "inference/chat-t4-0");
    assert_eq!(card["holders"][0]["container"], "vllm");
    assert_eq!(card["holders"][0]["memoryMiB"], 7500);
    assert_eq!(card["holders"][0]["bindPhase"], "success");
    assert_eq!(json["warnings"].as_array().expect("warnings").len(), 1);

    let (ok, table, stderr) = run(tessera.clone(), args(&[])).await;
    assert!(ok, "{stderr}");
    assert!(
        table.contains("15000/15360") && table.contains("inference/chat-t4-1"),
        "{table}"
    );
    assert!(table.contains("warning: pod inference/garbled"), "{table}");

    // Installed as `kubectl-tessera`, kubectl runs it with the same arguments.
    let plugin = dir.path().join("kubectl-tessera");
    std::fs::copy(&tessera, &plugin).expect("copy binary");
    let (ok, stdout, stderr) = run(plugin.clone(), args(&["-o", "json"])).await;
    assert!(ok, "{stderr}");
    assert_eq!(serde_json::from_str::<Value>(&stdout).expect("JSON"), json);
    let (_, help, _) = run(plugin, vec!["--help".into()]).await;
    assert!(help.contains("kubectl tessera"), "{help}");

    // The current context points nowhere: the error says what to check.
    let (ok, _, stderr) = run(
        tessera,
        vec!["inspect".into(), "--kubeconfig".into(), config.clone()],
    )
    .await;
    assert!(!ok);
    assert!(stderr.contains("could not list nodes"), "{stderr}");
}
