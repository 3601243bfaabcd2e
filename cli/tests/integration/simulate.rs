//! `tessera simulate` as a user runs it: the bundled example shows the
//! expected co-location; JSON output is parseable and stable; bad input
//! gets a clear error; impossible and forged pods are reported, not placed.

use std::process::Command;

use serde_json::Value;

fn tessera(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .expect("runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path.display().to_string()
}

#[test]
fn bundled_example_colocates_as_documented() {
    let (ok, stdout, stderr) = tessera(&["simulate", "--output", "json"]);
    assert!(ok, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("json");
    let placed = report["placed"].as_array().expect("placed");
    assert_eq!(placed.len(), 4);
    assert!(report["unplaced"].as_array().expect("unplaced").is_empty());
    let card_of = |pod: &str| -> (String, String, u64, u64) {
        let entry = placed
            .iter()
            .find(|p| p["pod"] == pod)
            .unwrap_or_else(|| panic!("{pod} placed"));
        let device = &entry["containers"][0]["devices"][0];
        (
            entry["node"].as_str().expect("node").to_owned(),
            device["uuid"].as_str().expect("uuid").to_owned(),
            device["memoryMiB"].as_u64().expect("memory"),
            device["nvidiaSmiMemoryTotalMiB"].as_u64().expect("smi"),
        )
    };
    let chat = card_of("inference/chat-a10g-0");
    let embed = card_of("inference/embed-a10g-0");
    assert_eq!(chat.0, "gpu-a10g-a");
    assert_eq!(chat.1, embed.1, "both A10G pods share one card");
    assert_eq!(chat.2, 23028 * 45 / 100);
    let t0 = card_of("inference/chat-t4-0");
    let t1 = card_of("inference/chat-t4-1");
    assert_eq!(t0.0, "gpu-t4-a");
    assert_eq!(t0.1, t1.1, "both T4 replicas share one card");
    assert_eq!((t0.2, t0.3, t1.2), (7500, 7500, 7500));
    let cards = report["cards"].as_array().expect("cards");
    assert_eq!(cards.len(), 2, "exactly two cards in use");

    let (ok, table, _) = tessera(&["simulate"]);
    assert!(ok);
    assert!(
        table.contains("inference/chat-t4-1") && table.contains("15000/15360 MiB"),
        "{table}"
    );
}

#[test]
fn user_files_unplaced_pods_and_admission_denials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = write(
        dir.path(),
        "cluster.yaml",
        r#"
apiVersion: v1
kind: Node
metadata:
  name: one-t4
  annotations:
    hami.io/node-nvidia-register: '[{"id":"GPU-1","index":0,"count":4,"devmem":15360,"devcore":100,"type":"NVIDIA-Tesla T4","numa":0,"mode":"hami-core","health":true}]'
status:
  conditions: [{type: Ready, status: "True"}]
  allocatable: {cpu: "8", memory: 32Gi, pods: "20"}
"#,
    );
    let workloads = write(
        dir.path(),
        "pods.yaml",
        r#"
apiVersion: v1
kind: Pod
metadata: {name: too-big}
spec:
  containers: [{name: c, resources: {limits: {nvidia.com/gpumem: "20000"}}}]
---
apiVersion: v1
kind: Pod
metadata: {name: bad-percent}
spec:
  containers: [{name: c, resources: {limits: {nvidia.com/gpumem-percentage: "150"}}}]
---
apiVersion: v1
kind: Pod
metadata: {name: whole-card}
spec:
  containers: [{name: c, resources: {limits: {nvidia.com/gpu: "1"}}}]
---
apiVersion: v1
kind: Pod
metadata: {name: after-whole}
spec:
  containers: [{name: c, resources: {limits: {nvidia.com/gpumem: "1000"}}}]
"#,
    );
    let (ok, stdout, stderr) =
        tessera(&["simulate", "--cluster", &cluster, &workloads, "-o", "json"]);
    assert!(ok, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("json");
    let reason = |pod: &str| -> String {
        report["unplaced"]
            .as_array()
            .expect("unplaced")
            .iter()
            .find(|u| u["pod"] == pod)
            .map(|u| u["reason"].as_str().expect("reason").to_owned())
            .unwrap_or_else(|| panic!("{pod} should be unplaced: {report}"))
    };
    assert_eq!(
        reason("default/too-big"),
        "1/1 nodes: insufficient GPU memory on every card"
    );
    assert!(
        reason("default/bad-percent").contains("denied at admission")
            && reason("default/bad-percent").contains("1 to 100")
    );
    let whole = &report["placed"][0];
    assert_eq!(whole["pod"], "default/whole-card");
    assert_eq!(
        whole["containers"][0]["devices"][0]["cores"], 100,
        "a plain whole card is exclusive"
    );
    assert!(reason("default/after-whole").contains("exclusively"));
}

#[test]
fn unreadable_input_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = write(dir.path(), "broken.yaml", "kind: Pod\nmetadata: {name: [\n");
    let (ok, _, stderr) = tessera(&["simulate", &broken]);
    assert!(!ok);
    assert!(
        stderr.contains("broken.yaml: document 1 is not valid YAML"),
        "{stderr}"
    );
    let (ok, _, stderr) = tessera(&["simulate", "/nonexistent.yaml"]);
    assert!(!ok);
    assert!(stderr.contains("cannot read /nonexistent.yaml"), "{stderr}");
}

/// `tessera simulate --output json` on `cli/examples/<name>/`.
fn simulate_example(name: &str) -> Value {
    let dir = format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"));
    let cluster = format!("{dir}/cluster.yaml");
    let workloads = format!("{dir}/workloads.yaml");
    let (ok, stdout, stderr) = tessera(&[
        "simulate",
        "--cluster",
        &cluster,
        &workloads,
        "--output",
        "json",
    ]);
    assert!(ok, "{stderr}");
    serde_json::from_str(&stdout).expect("json")
}

#[test]
fn pod_topology_example_spreads_replicas_holds_gated_pods_and_follows_volumes() {
    let report = simulate_example("pod-topology");
    let placed = report["placed"].as_array().expect("placed");
    let nodes_of = |prefix: &str| -> Vec<String> {
        placed
            .iter()
            .filter(|p| p["pod"].as_str().is_some_and(|n| n.starts_with(prefix)))
            .map(|p| p["node"].as_str().expect("node").to_owned())
            .collect()
    };
    let mut vllm = nodes_of("inference/vllm-");
    assert_eq!(vllm.len(), 4);
    vllm.sort();
    vllm.dedup();
    assert_eq!(
        vllm.len(),
        4,
        "required anti-affinity: one replica per node"
    );
    let embed = nodes_of("inference/embed-");
    assert_eq!(embed.len(), 6);
    let in_zone_a = embed.iter().filter(|n| n.starts_with("gpu-a")).count();
    assert_eq!(
        (in_zone_a, embed.len() - in_zone_a),
        (3, 3),
        "zone spread 3+3"
    );
    let loader = placed
        .iter()
        .find(|p| p["pod"] == "inference/loader")
        .expect("loader placed");
    let node = loader["node"].as_str().expect("node");
    assert!(
        node.starts_with("gpu-b"),
        "the claim provisions only in zone b: {node}"
    );
    assert_eq!(
        loader["volumes"],
        serde_json::json!([format!("model-cache: provisioned on {node}")])
    );
    let unplaced = report["unplaced"].as_array().expect("unplaced");
    assert_eq!(unplaced.len(), 1);
    assert_eq!(unplaced[0]["pod"], "inference/batch");
    assert!(unplaced[0]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("scheduling gates")));
}

#[test]
fn preemption_example_evicts_the_unprotected_lower_priority_pod() {
    let report = simulate_example("preemption");
    let placed = report["placed"].as_array().expect("placed");
    assert_eq!(placed.len(), 1);
    assert_eq!(placed[0]["pod"], "inference/chat");
    assert_eq!(placed[0]["node"], "gpu-1");
    let reason_of = |pod: &str| -> String {
        report["unplaced"]
            .as_array()
            .expect("unplaced")
            .iter()
            .find(|u| u["pod"] == pod)
            .and_then(|u| u["reason"].as_str())
            .unwrap_or_else(|| panic!("{pod} not placed"))
            .to_owned()
    };
    assert_eq!(
        reason_of("batch/sweep"),
        "preempted by inference/chat on gpu-1"
    );
    assert!(
        reason_of("inference/polite").contains("insufficient GPU memory"),
        "preemptionPolicy Never waits"
    );
    assert_eq!(report["cards"][0]["allocatedMemoryMiB"], 10000 + 9000);
}

#[test]
fn topology_aware_example_takes_nvlinked_pairs_from_the_score_annotation() {
    let report = simulate_example("topology-aware");
    let cards_of = |pod: &str| -> Vec<String> {
        let placed = report["placed"]
            .as_array()
            .expect("placed")
            .iter()
            .find(|p| p["pod"] == pod)
            .unwrap_or_else(|| panic!("{pod} placed"));
        let mut cards: Vec<String> = placed["containers"][0]["devices"]
            .as_array()
            .expect("devices")
            .iter()
            .map(|d| d["uuid"].as_str().expect("uuid").to_owned())
            .collect();
        cards.sort();
        cards
    };
    assert_eq!(cards_of("ml/plain-pair"), ["GPU-dgx1-0", "GPU-dgx1-1"]);
    assert_eq!(cards_of("ml/tp-pair"), ["GPU-dgx1-4", "GPU-dgx1-6"]);
    assert_eq!(cards_of("ml/single"), ["GPU-dgx1-2"]);
    assert_eq!(cards_of("ml/tp-pair-2"), ["GPU-dgx1-5", "GPU-dgx1-7"]);
}

#[test]
fn a_corrupt_score_annotation_is_a_warning_and_the_node_still_schedules() {
    let dir = std::env::temp_dir().join(format!("tessera-scores-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let example = format!("{}/examples/topology-aware", env!("CARGO_MANIFEST_DIR"));
    let cluster = std::fs::read_to_string(format!("{example}/cluster.yaml")).expect("example");
    let start = cluster
        .find("hami.io/node-nvidia-score: '")
        .expect("score line");
    let end = start + cluster[start..].find('\n').expect("line end");
    let corrupt = format!(
        "{}hami.io/node-nvidia-score: '[{{\"uuid\": 7}}]'{}",
        &cluster[..start],
        &cluster[end..]
    );
    let cluster_path = write(&dir, "cluster.yaml", &corrupt);
    let workloads = format!("{example}/workloads.yaml");
    let (ok, stdout, stderr) = tessera(&[
        "simulate",
        "--cluster",
        &cluster_path,
        &workloads,
        "--output",
        "json",
    ]);
    assert!(ok, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(report["placed"].as_array().expect("placed").len(), 4);
    let warnings = report["warnings"].to_string();
    assert!(
        warnings.contains("hami.io/node-nvidia-score ignored"),
        "{warnings}"
    );
}

#[test]
fn nodes_without_allocatable_gpus_in_the_file_count_as_registered_and_zero_means_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = |name: &str, gpus: &str| {
        format!(
            r#"
apiVersion: v1
kind: Node
metadata:
  name: {name}
  annotations:
    hami.io/node-nvidia-register: '[{{"id":"GPU-{name}","index":0,"count":4,"devmem":15360,"devcore":100,"type":"NVIDIA-Tesla T4","numa":0,"mode":"hami-core","health":true}}]'
status:
  conditions: [{{type: Ready, status: "True"}}]
  allocatable: {{cpu: "8", memory: 32Gi, pods: "20"{gpus}}}
"#
        )
    };
    let cluster = write(
        dir.path(),
        "cluster.yaml",
        &format!(
            "{}---{}",
            node("plugin-gone", ", nvidia.com/gpu: \"0\""),
            node("as-written", "")
        ),
    );
    let mut pods = String::new();
    for i in 0..5 {
        pods.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}}}\nspec:\n  containers: [{{name: c, resources: {{limits: {{nvidia.com/gpumem: \"1000\"}}}}}}]\n"
        ));
    }
    let workloads = write(dir.path(), "pods.yaml", &pods);
    let (ok, stdout, stderr) =
        tessera(&["simulate", "--cluster", &cluster, &workloads, "-o", "json"]);
    assert!(ok, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("json");
    let placed = report["placed"].as_array().expect("placed");
    assert_eq!(
        placed.len(),
        4,
        "the card's 4 slots, as registered: {report}"
    );
    assert!(placed.iter().all(|p| p["node"] == "as-written"), "{report}");
    let unplaced = &report["unplaced"][0]["reason"];
    assert_eq!(
        unplaced.as_str().expect("reason"),
        "1 node(s) had insufficient allocatable nvidia.com/gpu for the pod (kubelet would reject it); 1 node(s) had no allocatable nvidia.com/gpu (the node agent's device plugin is not registered with kubelet)",
        "{report}"
    );
}

#[test]
fn preemption_affinity_example_evicts_the_pod_anti_affinity_refuses() {
    let report = simulate_example("preemption-affinity");
    let placed: Vec<(String, String)> = report["placed"]
        .as_array()
        .expect("placed")
        .iter()
        .map(|p| {
            (
                p["pod"].as_str().unwrap_or("").to_owned(),
                p["node"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        placed,
        [
            ("inference/chat-0".to_owned(), "gpu-1".to_owned()),
            ("inference/chat-1".to_owned(), "gpu-1".to_owned())
        ]
    );
    let unplaced = report["unplaced"].as_array().expect("unplaced");
    assert_eq!(unplaced.len(), 1, "only sweep-1 is evicted: {unplaced:?}");
    assert_eq!(unplaced[0]["pod"], "batch/sweep-1");
    assert_eq!(
        unplaced[0]["reason"],
        "preempted by inference/chat-0 on gpu-1"
    );
}

/// `tessera simulate` applies the cluster-default spread as the scheduler
/// does: a Deployment's replicas spread over equal nodes (binpack alone,
/// or `defaultTopologySpread: {mode: off}`, stacks them on the first).
#[test]
fn deployment_replicas_get_the_cluster_default_spread() {
    let mut yaml = String::new();
    for name in ["n1", "n2", "n3"] {
        yaml.push_str(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{kubernetes.io/hostname: {name}, topology.kubernetes.io/zone: a}}}}\nstatus: {{conditions: [{{type: Ready, status: \"True\"}}], allocatable: {{cpu: \"32\", memory: 64Gi, pods: \"110\"}}}}\n---\n"
        ));
    }
    yaml.push_str("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: ml}\nspec:\n  replicas: 3\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: c, image: x, resources: {requests: {cpu: 100m}}}]}\n");
    let mut objects = tessera_cli::workloads::Objects::default();
    objects.read("inline.yaml", &yaml).expect("reads");
    let nodes = |config: &tessera_api::config::Config| -> Vec<String> {
        let report = tessera_cli::simulate::simulate(
            &objects,
            config,
            &tessera_cli::simulate::webhook_admission,
        );
        report.placed.iter().map(|p| p.node.clone()).collect()
    };
    assert_eq!(
        nodes(&tessera_api::config::Config::default()),
        ["n1", "n2", "n3"]
    );
    let off = tessera_api::config::Config::from_yaml("defaultTopologySpread: {mode: off}\n")
        .expect("config");
    assert_eq!(nodes(&off), ["n1", "n1", "n1"]);
}
