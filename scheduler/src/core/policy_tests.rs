//! Tests of HAMi's GPU policies in the placement core: chained sort keys
//! (`binpack,numa` against `numa,binpack`), `mutex`, `topology-aware` over
//! the `hami.io/node-nvidia-score` link scores (NVLink-best set, the
//! least-linked single card, a corrupt annotation), and `nvidia.com/vgpu-mode`.

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{json, Value};
use tessera_api::config::Config;
use tessera_api::inventory::{encode_inventory, GpuDevice};
use tessera_api::names::{NODE_PAIR_SCORE_ANNOTATION, NODE_REGISTER_ANNOTATION};
use tessera_api::pair_scores::{encode_pair_scores, scores_from_links, LinkFacts, PcieLink};

use super::*;

fn cards(count: u32, numa: impl Fn(u32) -> i32) -> Vec<GpuDevice> {
    (0..count)
        .map(|i| GpuDevice {
            id: format!("GPU-{i}"),
            index: i,
            count: 10,
            devmem: 40000,
            devcore: 100,
            device_type: "NVIDIA-A100".into(),
            numa: numa(i),
            mode: "hami-core".into(),
            health: true,
        })
        .collect()
}

fn node(name: &str, devices: &[GpuDevice], scores: Option<String>) -> Node {
    let mut annotations = json!({NODE_REGISTER_ANNOTATION: encode_inventory(devices)});
    if let Some(scores) = scores {
        annotations[NODE_PAIR_SCORE_ANNOTATION] = Value::String(scores);
    }
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}, "annotations": annotations},
        "status": {"conditions": [{"type": "Ready", "status": "True"}],
                   "allocatable": {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": "80"}}}))
    .expect("node")
}

fn pod(name: &str, limits: Value, annotations: Value) -> Pod {
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": "default", "annotations": annotations},
        "spec": {"schedulerName": "tessera-scheduler", "containers": [{"name": "main", "resources": {"limits": limits}}]}}))
    .expect("pod")
}

fn cards_of(placement: &Placement) -> Vec<String> {
    let mut uuids: Vec<String> = placement.containers[0]
        .iter()
        .map(|d| d.uuid.clone())
        .collect();
    uuids.sort();
    uuids
}

fn place(state: &mut ClusterState, pod: &Pod) -> Placement {
    let placement = state.schedule(pod).expect("fits");
    state.assume(&placement.pod, placement.charge.clone());
    placement
}

/// Eight cards, two NUMA nodes (0–3, 4–7), all on PCIe; NVLink pairs
/// 1–6 (4 links) and 2–5 (2 links), the best quad {1, 2, 5, 6} with
/// 1–2 and 5–6 also linked once; card 7 crosses sockets to everyone.
fn eight_card_scores() -> String {
    let uuids: Vec<String> = (0..8).map(|i| format!("GPU-{i}")).collect();
    let nvlinks = |a: usize, b: usize| match (a, b) {
        (1, 6) => 4,
        (2, 5) => 2,
        (1, 2) | (5, 6) => 1,
        _ => 0,
    };
    encode_pair_scores(&scores_from_links(&uuids, |a, b| {
        let pcie = if a == 7 || b == 7 || a / 4 != b / 4 {
            PcieLink::CrossCpu
        } else {
            PcieLink::SameCpu
        };
        Some(LinkFacts {
            pcie: Some(pcie),
            nvlinks: nvlinks(a, b),
        })
    }))
}

fn eight_card_state(scores: Option<String>) -> ClusterState {
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&node("dgx", &cards(8, |i| i32::from(i >= 4)), scores));
    state
}

#[test]
fn topology_aware_picks_the_nvlink_best_pair_on_an_eight_card_node() {
    let two = json!({"nvidia.com/gpu": "2", "nvidia.com/gpumem": "1000"});
    let topology = json!({"hami.io/gpu-scheduler-policy": "topology-aware"});

    let mut state = eight_card_state(Some(eight_card_scores()));
    let pair = place(&mut state, &pod("pair", two.clone(), topology.clone()));
    assert_eq!(cards_of(&pair), ["GPU-1", "GPU-6"]);

    // Shared cards still fit, so the same pair wins again, as in HAMi ...
    let again = place(&mut state, &pod("again", two.clone(), topology));
    assert_eq!(cards_of(&again), ["GPU-1", "GPU-6"]);
    // ... unless mutex asks for idle cards: then the 2-link pair.
    let next = place(
        &mut state,
        &pod(
            "next",
            two.clone(),
            json!({"hami.io/gpu-scheduler-policy": "mutex,topology-aware"}),
        ),
    );
    assert_eq!(cards_of(&next), ["GPU-2", "GPU-5"]);

    // Without topology-aware the same node gives the spread order's first two.
    let mut plain = eight_card_state(Some(eight_card_scores()));
    let ordered = place(&mut plain, &pod("ordered", two, json!({})));
    assert_eq!(cards_of(&ordered), ["GPU-0", "GPU-1"]);
}

#[test]
fn topology_aware_picks_the_best_linked_quad_and_chains_with_binpack() {
    let mut state = eight_card_state(Some(eight_card_scores()));
    let quad = place(
        &mut state,
        &pod(
            "quad",
            json!({"nvidia.com/gpu": "4", "nvidia.com/gpumem": "1000"}),
            json!({"hami.io/gpu-scheduler-policy": "binpack,topology-aware"}),
        ),
    );
    assert_eq!(cards_of(&quad), ["GPU-1", "GPU-2", "GPU-5", "GPU-6"]);
}

#[test]
fn topology_aware_single_card_takes_the_least_linked_card() {
    // HAMi keeps well-linked cards for multi-card pods: a one-card pod gets
    // the card whose links to the other free cards sum lowest (card 7).
    let mut state = eight_card_state(Some(eight_card_scores()));
    let single = place(
        &mut state,
        &pod(
            "single",
            json!({"nvidia.com/gpumem": "1000"}),
            json!({"hami.io/gpu-scheduler-policy": "topology-aware"}),
        ),
    );
    assert_eq!(cards_of(&single), ["GPU-7"]);
}

#[test]
fn numa_bind_with_topology_aware_stays_on_one_numa_node() {
    let mut state = eight_card_state(Some(eight_card_scores()));
    let bound = place(
        &mut state,
        &pod(
            "bound",
            json!({"nvidia.com/gpu": "2", "nvidia.com/gpumem": "1000"}),
            json!({"hami.io/gpu-scheduler-policy": "topology-aware", "nvidia.com/numa-bind": "true"}),
        ),
    );
    // 1–6 crosses NUMA nodes; on NUMA 0 the NVLinked pair is 1–2.
    assert_eq!(cards_of(&bound), ["GPU-1", "GPU-2"]);
}

#[test]
fn corrupt_score_annotation_falls_back_without_breaking_the_node() {
    let mut state = eight_card_state(Some("[{\"uuid\": 3}".to_owned()));
    let error = state.pair_scores_error("dgx").expect("reported");
    assert!(error.contains(NODE_PAIR_SCORE_ANNOTATION), "{error}");
    assert!(error.contains("without link scores"), "{error}");
    let plain = place(
        &mut state,
        &pod("plain", json!({"nvidia.com/gpumem": "1000"}), json!({})),
    );
    assert_eq!(cards_of(&plain), ["GPU-0"]);
    let topology = place(
        &mut state,
        &pod(
            "topology",
            json!({"nvidia.com/gpu": "2", "nvidia.com/gpumem": "1000"}),
            json!({"hami.io/gpu-scheduler-policy": "topology-aware"}),
        ),
    );
    // No scores: the policy's order decides (spread: the idle cards 1, 2).
    assert_eq!(cards_of(&topology), ["GPU-1", "GPU-2"]);
    let healthy = eight_card_state(Some(eight_card_scores()));
    assert_eq!(healthy.pair_scores_error("dgx"), None);
}

/// Four empty cards with NUMA nodes 0, 1, 0, 1 and card 1 half used.
fn interleaved_state() -> ClusterState {
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&node("n", &cards(4, |i| (i % 2) as i32), None));
    place(
        &mut state,
        &pod(
            "load",
            json!({"nvidia.com/gpumem": "20000", "nvidia.com/gpucores": "50"}),
            json!({"nvidia.com/use-gpuuuid": "GPU-1"}),
        ),
    );
    state
}

#[test]
fn chained_binpack_numa_orders_like_hami() {
    let two = json!({"nvidia.com/gpu": "2", "nvidia.com/gpumem": "1000"});
    // binpack first: the used card 1, then among the equally empty 0, 2, 3
    // NUMA breaks the tie (lowest node first: card 0), then the index.
    let mut state = interleaved_state();
    let binpack_numa = place(
        &mut state,
        &pod(
            "bn",
            two.clone(),
            json!({"hami.io/gpu-scheduler-policy": "binpack,numa"}),
        ),
    );
    assert_eq!(cards_of(&binpack_numa), ["GPU-0", "GPU-1"]);

    // numa first: NUMA node 0's cards 0 and 2, whatever their fullness.
    let mut state = interleaved_state();
    let numa_binpack = place(
        &mut state,
        &pod(
            "nb",
            two.clone(),
            json!({"hami.io/gpu-scheduler-policy": "numa,binpack"}),
        ),
    );
    assert_eq!(cards_of(&numa_binpack), ["GPU-0", "GPU-2"]);

    // spread,numa: the empty cards, NUMA 0's first (0 and 2).
    let mut state = interleaved_state();
    let spread_numa = place(
        &mut state,
        &pod(
            "sn",
            two.clone(),
            json!({"hami.io/gpu-scheduler-policy": "spread,numa"}),
        ),
    );
    assert_eq!(cards_of(&spread_numa), ["GPU-0", "GPU-2"]);

    // plain spread ends in the card index: 0 and 2 too, but binpack alone
    // pairs the used card with card 0 by index.
    let mut state = interleaved_state();
    let binpack = place(
        &mut state,
        &pod("b", two, json!({"hami.io/gpu-scheduler-policy": "binpack"})),
    );
    assert_eq!(cards_of(&binpack), ["GPU-0", "GPU-1"]);
}

#[test]
fn chained_numa_key_keeps_a_container_on_one_numa_node_without_numa_bind() {
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&node("n", &cards(4, |i| (i % 2) as i32), None));
    let numa = place(
        &mut state,
        &pod(
            "numa",
            json!({"nvidia.com/gpu": "2", "nvidia.com/gpumem": "1000"}),
            json!({"hami.io/gpu-scheduler-policy": "numa"}),
        ),
    );
    assert_eq!(cards_of(&numa), ["GPU-0", "GPU-2"]);
    let spread = place(
        &mut ClusterState::new(Config::default()).tap_node(&node(
            "n",
            &cards(4, |i| (i % 2) as i32),
            None,
        )),
        &pod(
            "spread",
            json!({"nvidia.com/gpu": "2", "nvidia.com/gpumem": "1000"}),
            json!({"hami.io/gpu-scheduler-policy": "spread"}),
        ),
    );
    assert_eq!(cards_of(&spread), ["GPU-0", "GPU-1"]);
}

trait TapNode {
    fn tap_node(self, node: &Node) -> Self;
}

impl TapNode for ClusterState {
    fn tap_node(mut self, node: &Node) -> Self {
        self.upsert_node(node);
        self
    }
}

#[test]
fn mutex_takes_only_idle_cards() {
    let binpack_mutex = json!({"hami.io/gpu-scheduler-policy": "binpack,mutex"});
    let mut state = interleaved_state();
    // binpack alone would join the used card 1; mutex skips it.
    let one = place(
        &mut state,
        &pod(
            "one",
            json!({"nvidia.com/gpumem": "1000"}),
            binpack_mutex.clone(),
        ),
    );
    assert_eq!(cards_of(&one), ["GPU-0"]);
    let joined = place(
        &mut interleaved_state(),
        &pod(
            "joined",
            json!({"nvidia.com/gpumem": "1000"}),
            json!({"hami.io/gpu-scheduler-policy": "binpack"}),
        ),
    );
    assert_eq!(cards_of(&joined), ["GPU-1"]);
    // Cards 0 and 1 are in use now: a 3-card mutex container cannot fit.
    let Err(ScheduleError::Unschedulable(why)) = state.schedule(&pod(
        "three",
        json!({"nvidia.com/gpu": "3", "nvidia.com/gpumem": "1000"}),
        binpack_mutex,
    )) else {
        panic!("mutex must refuse used cards");
    };
    assert!(why.to_string().contains("mutex"), "{why}");
}

#[test]
fn vgpu_mode_keeps_cards_of_the_named_mode() {
    let mut state = ClusterState::new(Config::default());
    let mut mig = cards(2, |_| 0);
    for card in &mut mig {
        card.mode = "mig".into();
        card.id = card.id.replace("GPU", "MIG");
    }
    state.upsert_node(&node("a-mig", &mig, None));
    state.upsert_node(&node("b-core", &cards(2, |_| 0), None));
    let hami_core = json!({"nvidia.com/vgpu-mode": "hami-core"});
    let placed = place(
        &mut state,
        &pod("core", json!({"nvidia.com/gpumem": "1000"}), hami_core),
    );
    assert_eq!(placed.node, "b-core");
    let mut only_mig = ClusterState::new(Config::default());
    only_mig.upsert_node(&node("a-mig", &mig, None));
    let Err(ScheduleError::Unschedulable(why)) = only_mig.schedule(&pod(
        "core",
        json!({"nvidia.com/gpumem": "1000"}),
        json!({"nvidia.com/vgpu-mode": "hami-core"}),
    )) else {
        panic!("no hami-core card");
    };
    assert!(why.to_string().contains("vgpu-mode"), "{why}");
}
