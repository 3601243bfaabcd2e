//! One pod's whole path through Tessera, with every component real and one
//! API stand-in: the bundled example workloads (two A10G deployments at
//! 45%, a two-replica T4 deployment at 7500 MiB, all GPU binpack) are
//! expanded into pods as a ReplicaSet would, each pod is admitted by the
//! webhook over TLS (AdmissionReview, JSON Patch applied as the API server
//! does) and created; the scheduler shell places and binds them; two node
//! agents on fake cards (`t4`: 4 × T4, `a10g`: 4 × A10G) publish their
//! inventory and answer a kubelet stand-in's `Allocate` over real unix
//! sockets, the stand-in admitting each bound pod as kubelet does. The checks: our scheduler name, the sharing of one card per
//! type, the env kubelet gets, `bind-phase: success`, both components'
//! metrics and `tessera inspect`.

use crate::common;

use std::collections::BTreeMap;

use common::*;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use tessera_api::allocation::decode_pod_devices;
use tessera_api::config::Config;
use tessera_api::inventory::decode_inventory;
use tessera_api::names::{allocation as keys, NODE_REGISTER_ANNOTATION};
use tessera_cli::workloads::Objects;
use tessera_node_agent::kubelet_admission::AdmittingKubelet;
use tessera_scheduler::shell::{Scheduler, ShellOptions};
use tessera_testkit::ApiServer;

const A10G_MIB: u64 = 23028;
const A10G_SLICE_MIB: u64 = A10G_MIB * 45 / 100; // 10362
const T4_SLICE_MIB: u64 = 7500;

/// The card UUID each container of a pod was given.
fn cards_of(pod: &Pod) -> Vec<String> {
    let allocated = annotation(pod, keys::DEVICES_ALLOCATED).expect("allocation annotation");
    decode_pod_devices(&allocated)
        .expect("allocation decodes")
        .into_iter()
        .flatten()
        .map(|d| d.uuid)
        .collect()
}

fn node_of(pod: &Pod) -> Option<String> {
    pod.spec.as_ref()?.node_name.clone()
}

fn gpu_count(container: &k8s_openapi::api::core::v1::Container) -> usize {
    container
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("nvidia.com/gpu"))
        .map_or(0, |q| q.0.parse().expect("whole number of cards"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundled_workloads_flow_from_admission_to_allocate() {
    let api = ApiServer::start().await.expect("API stand-in");
    let temp = tempfile::tempdir().expect("tempdir");

    // Node agents first: the scheduler reads the fake cards' UUIDs from
    // the inventory they publish.
    let mut kubelets = BTreeMap::new();
    let mut agents = BTreeMap::new();
    let mut agent_metrics = BTreeMap::new();
    for (node, spec) in [
        ("t4", "4x Tesla T4 15360"),
        ("a10g", "4x NVIDIA A10G 23028"),
    ] {
        api.insert(&ready_node(node));
        let kubelet = KubeletStandIn::start(&temp.path().join(node).join("kubelet"));
        let metrics = free_local_addr();
        let agent = start_agent(
            api.client(),
            node,
            spec,
            &temp.path().join(node).join("host"),
            kubelet.socket(),
            Some(metrics),
        );
        kubelets.insert(node, kubelet);
        agents.insert(node, agent);
        agent_metrics.insert(node, metrics);
    }
    for (node, agent) in &agents {
        let inventory = eventually(&format!("the inventory on node {node}"), || {
            let node: Node = api.get(None, node)?;
            let value = node
                .metadata
                .annotations?
                .get(NODE_REGISTER_ANNOTATION)?
                .clone();
            Some(decode_inventory(&value).expect("the agent's inventory decodes"))
        })
        .await;
        let published: Vec<_> = inventory.iter().map(|d| d.id.clone()).collect();
        let discovered: Vec<_> = agent.cards.iter().map(|c| c.uuid.clone()).collect();
        assert_eq!(published, discovered);
    }
    // Kubelet admits each pod bound to its node: GetPreferredAllocation,
    // then Allocate, one container at a time.
    let mut admissions = BTreeMap::new();
    for (node, kubelet) in &kubelets {
        let plugin = kubelet.connect_plugin(WAIT).await;
        admissions.insert(
            *node,
            AdmittingKubelet::start(
                api.client(),
                node,
                plugin,
                "nvidia.com/gpu",
                std::time::Duration::from_millis(20),
            ),
        );
    }

    let scheduler = Scheduler::new(api.client(), Config::default(), ShellOptions::default());
    let scheduler_task = tokio::spawn(scheduler.clone().run());
    let mut webhook = Webhook::start(None, &[]).await;

    // The ReplicaSets' pods, admitted and created in order.
    let mut objects = Objects::default();
    objects
        .read("bundled workloads", tessera_cli::BUNDLED_WORKLOADS)
        .expect("bundled workloads parse");
    assert_eq!(objects.pods.len(), 4);
    let pods_api: Api<Pod> = Api::namespaced(api.client(), "inference");
    for (i, pod) in objects.pods.iter().enumerate() {
        let admitted = webhook.admit(pod, &format!("uid-{i}")).await;
        let spec = admitted.spec.as_ref().expect("spec");
        assert_eq!(spec.scheduler_name.as_deref(), Some("tessera-scheduler"));
        pods_api
            .create(&PostParams::default(), &admitted)
            .await
            .expect("pod created");
    }

    let bound: Vec<Pod> = eventually("all four pods bound and admitted", || {
        let pods = api.list::<Pod>();
        (pods.len() == 4
            && pods.iter().all(|p| {
                node_of(p).is_some()
                    && annotation(p, keys::BIND_PHASE).as_deref() == Some(keys::PHASE_SUCCESS)
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            }))
        .then_some(pods)
    })
    .await;
    let by_name: BTreeMap<String, Pod> = bound
        .into_iter()
        .map(|p| (p.metadata.name.clone().expect("name"), p))
        .collect();
    let placement = |name: &str| {
        let pod = &by_name[name];
        (node_of(pod).expect("bound"), cards_of(pod))
    };
    let (chat_node, chat_cards) = placement("chat-a10g-0");
    let (embed_node, embed_cards) = placement("embed-a10g-0");
    assert_eq!((chat_node.as_str(), embed_node.as_str()), ("a10g", "a10g"));
    assert_eq!(chat_cards.len(), 1);
    assert_eq!(
        chat_cards, embed_cards,
        "binpack puts both A10G pods on one card"
    );
    let (t4_node_0, t4_cards_0) = placement("chat-t4-0");
    let (t4_node_1, t4_cards_1) = placement("chat-t4-1");
    assert_eq!((t4_node_0.as_str(), t4_node_1.as_str()), ("t4", "t4"));
    assert_eq!(t4_cards_0.len(), 1);
    assert_eq!(
        t4_cards_0, t4_cards_1,
        "binpack puts both T4 replicas on one card"
    );
    // What kubelet got for each container: the pod's slice of the shared card.
    for pod in by_name.values() {
        let node = node_of(pod).expect("bound");
        let (shared_card, limit) = if node == "t4" {
            (&t4_cards_0[0], T4_SLICE_MIB)
        } else {
            (&chat_cards[0], A10G_SLICE_MIB)
        };
        let log = admissions[node.as_str()].log();
        assert!(log.rejected.is_empty(), "{:?}", log.rejected);
        for container in &pod.spec.as_ref().expect("spec").containers {
            assert_eq!(
                gpu_count(container),
                1,
                "the webhook keeps nvidia.com/gpu: 1"
            );
            let admitted = log
                .admitted
                .iter()
                .find(|c| {
                    Some(&c.uid) == pod.metadata.uid.as_ref() && c.container == container.name
                })
                .expect("the container was admitted");
            assert_eq!(
                admitted
                    .envs
                    .get("CUDA_DEVICE_MEMORY_LIMIT_0")
                    .map(String::as_str),
                Some(format!("{limit}m").as_str()),
                "{:?}",
                admitted.envs
            );
            assert_eq!(
                admitted.envs.get("NVIDIA_VISIBLE_DEVICES"),
                Some(shared_card),
                "{:?}",
                admitted.envs
            );
        }
    }
    // The scheduler's metrics count both slices on each shared card.
    let text = scheduler.metrics_text();
    let allocated = |node: &str, uuid: &str| -> Option<f64> {
        let prefix =
            format!("hami_gpu_memory_allocated_bytes{{node=\"{node}\",device_uuid=\"{uuid}\"");
        text.lines()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    #[allow(clippy::cast_precision_loss)]
    {
        assert_eq!(
            allocated("t4", &t4_cards_0[0]),
            Some(((2 * T4_SLICE_MIB) << 20) as f64),
            "{text}"
        );
        assert_eq!(
            allocated("a10g", &chat_cards[0]),
            Some(((2 * A10G_SLICE_MIB) << 20) as f64),
            "{text}"
        );
    }

    // Each agent's /metrics lists the containers it gave a slice to, on the
    // shared card (usage 0: no interceptor runs in this test).
    for (node, pods, card) in [
        ("t4", ["chat-t4-0", "chat-t4-1"], &t4_cards_0[0]),
        ("a10g", ["chat-a10g-0", "embed-a10g-0"], &chat_cards[0]),
    ] {
        let addr = agent_metrics[node];
        let mut last = String::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some((200, body)) = http_get(addr, "/metrics").await {
                let all = pods.iter().all(|pod| {
                    body.contains(&format!(
                        "hami_vgpu_memory_limit_bytes{{namespace=\"inference\",pod=\"{pod}\",container=\"vllm\",vdevice_index=\"0\",device_uuid=\"{card}\"}}"
                    ))
                });
                if all {
                    break;
                }
                last = body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {node}'s agent metrics never listed {pods:?} on {card}:\n{last}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    // `tessera inspect` reads the same picture back.
    let report = tessera_cli::inspect::inspect(api.client())
        .await
        .expect("inspect");
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    for node in &report.nodes {
        let used: Vec<_> = node
            .cards
            .iter()
            .filter(|c| !c.holders.is_empty())
            .collect();
        assert_eq!(used.len(), 1, "one shared card on {}", node.name);
        assert_eq!(used[0].holders.len(), 2);
        let expected = if node.name == "t4" {
            T4_SLICE_MIB
        } else {
            A10G_SLICE_MIB
        };
        assert_eq!(used[0].allocated_memory_mib, 2 * expected);
    }

    scheduler_task.abort();
    drop(webhook);
    for (_, agent) in agents {
        agent.stop().await;
    }
}
