//! Allocate always knows its pod, under kubelet's real timing: the
//! scheduler shell, a node agent on fake cards and a kubelet stand-in that
//! admits pods as kubelet does (watch order, batches sorted by
//! second-resolution creation time with an unstable sort, one pod at a
//! time, GetPreferredAllocation then Allocate per GPU container, refusals
//! fail the pod with `UnexpectedAdmissionError`), all against one API
//! stand-in, with the seal key provisioned through the Secret as in a
//! cluster. Deployments of 1 to 50 replicas created at once (one and two
//! cards per pod mixed), then deleted and recreated at once: zero
//! refusals, every container gets exactly its own pod's cards and caps, and
//! the device IDs kubelet records name those cards.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use futures::future::join_all;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use tessera_api::allocation_seal::{SealKey, KEY_SECRET_NAME};
use tessera_api::config::Config;
use tessera_node_agent::inventory::card_of_device_id;
use tessera_node_agent::kubelet_admission::{AdmissionLog, AdmittingNode};
use tessera_node_agent::seal::SealSource;
use tessera_scheduler::shell::{seal_key, Scheduler, ShellOptions};
use tessera_testkit::ApiServer;

const NODE: &str = "gpu-node";
const NAMESPACE: &str = "tessera-system";

struct Cluster {
    api: ApiServer,
    node: AdmittingNode,
    key: SealKey,
    scheduler: tokio::task::JoinHandle<()>,
    _temp: tempfile::TempDir,
}

impl Cluster {
    async fn start(cards: &str) -> Self {
        let api = ApiServer::start().await.expect("API stand-in");
        let temp = tempfile::tempdir().expect("tempdir");
        api.insert(&ready_node(NODE));
        // The scheduler provisions the key; the agent reads it from the Secret.
        let key = seal_key::load_or_create(api.client(), NAMESPACE)
            .await
            .expect("seal key");
        let node = AdmittingNode::start(
            api.client(),
            NODE,
            cards,
            temp.path(),
            SealSource::Secret {
                namespace: NAMESPACE.to_owned(),
            },
            Duration::from_millis(20),
        )
        .await;
        // Wait for the inventory before scheduling.
        eventually("the node's GPU inventory", || {
            api.get::<k8s_openapi::api::core::v1::Node>(None, NODE)?
                .metadata
                .annotations?
                .get("hami.io/node-nvidia-register")
                .map(drop)
        })
        .await;
        let options = ShellOptions {
            seal_key: Some(
                seal_key::load_or_create(api.client(), NAMESPACE)
                    .await
                    .expect("the same key again"),
            ),
            ..ShellOptions::default()
        };
        let scheduler = Scheduler::new(api.client(), Config::default(), options);
        let scheduler = tokio::spawn(async move {
            let _ = scheduler.run().await;
        });
        Self {
            api,
            node,
            key,
            scheduler,
            _temp: temp,
        }
    }

    /// Creates `replicas` pods of one Deployment at once (within the same
    /// second, as a ReplicaSet does); every third asks for two cards.
    async fn create_deployment(&self, name: &str, replicas: usize) -> Vec<String> {
        let pods: Api<Pod> = Api::namespaced(self.api.client(), "apps");
        let names: Vec<String> = (0..replicas).map(|i| format!("{name}-{i:02}")).collect();
        let creates = names.iter().enumerate().map(|(i, pod_name)| {
            let pods = pods.clone();
            let cards = if i % 3 == 2 { 2 } else { 1 };
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": pod_name, "namespace": "apps", "labels": {"app": name}},
                "spec": {"schedulerName": "tessera-scheduler", "containers": [{"name": "main", "image": "cuda",
                    "resources": {"limits": {"nvidia.com/gpu": cards.to_string(),
                        "nvidia.com/gpumem": (1000 + i).to_string()}}}]}}))
            .expect("pod");
            async move {
                pods.create(&PostParams::default(), &pod)
                    .await
                    .expect("create");
            }
        });
        join_all(creates).await;
        names
    }

    async fn delete_all(&self, names: &[String]) {
        let pods: Api<Pod> = Api::namespaced(self.api.client(), "apps");
        let params = DeleteParams::default();
        join_all(names.iter().map(|n| pods.delete(n, &params))).await;
    }

    /// Waits until every named pod ran or failed admission.
    async fn settled(&self, names: &[String]) -> AdmissionLog {
        eventually(&format!("{} pods admitted or failed", names.len()), || {
            let pods: BTreeMap<String, Pod> = self
                .api
                .list::<Pod>()
                .into_iter()
                .map(|p| (p.metadata.name.clone().unwrap_or_default(), p))
                .collect();
            names
                .iter()
                .all(|n| {
                    pods.get(n)
                        .and_then(|p| p.status.as_ref()?.phase.clone())
                        .is_some_and(|phase| phase == "Running" || phase == "Failed")
                })
                .then_some(())
        })
        .await;
        self.node.kubelet.log()
    }

    /// Checks that every named pod was admitted once, with exactly its own
    /// sealed allocation, and kubelet's device IDs naming those cards.
    fn check_exact(&self, names: &[String], log: &AdmissionLog) {
        assert!(
            log.rejected.is_empty(),
            "UnexpectedAdmissionError for {:?}",
            log.rejected
        );
        for name in names {
            let pod: Pod = self.api.get(Some("apps"), name).expect("pod");
            let uid = pod.metadata.uid.clone().expect("uid");
            let sealed = self
                .key
                .verify_pod(&pod)
                .expect("a sealed allocation")
                .expect("allocated");
            let admitted: Vec<_> = log.admitted.iter().filter(|c| c.uid == uid).collect();
            assert_eq!(admitted.len(), 1, "{name} admitted once");
            let container = admitted[0];
            let cards: Vec<String> = sealed.devices[0].iter().map(|d| d.uuid.clone()).collect();
            assert_eq!(
                container.envs["NVIDIA_VISIBLE_DEVICES"],
                cards.join(","),
                "{name} got its own cards"
            );
            for (i, device) in sealed.devices[0].iter().enumerate() {
                assert_eq!(
                    container.envs[&format!("CUDA_DEVICE_MEMORY_LIMIT_{i}")],
                    format!("{}m", device.memory_mib),
                    "{name} got its own cap"
                );
            }
            let recorded: Vec<&str> = container
                .device_ids
                .iter()
                .map(|id| card_of_device_id(id).expect("a Tessera device ID"))
                .collect();
            assert_eq!(recorded, cards, "{name}: kubelet's record names its cards");
            assert_eq!(
                annotation(&pod, "hami.io/bind-phase").as_deref(),
                Some("success")
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_created_at_once_and_recreated_are_admitted_exactly() {
    let cluster = Cluster::start("8x NVIDIA A10G 23028").await;
    assert!(cluster
        .api
        .get::<k8s_openapi::api::core::v1::Secret>(Some(NAMESPACE), KEY_SECRET_NAME)
        .is_some());
    for (deployment, replicas) in [("solo", 1), ("team", 13), ("fleet", 50)] {
        let names = cluster.create_deployment(deployment, replicas).await;
        let log = cluster.settled(&names).await;
        cluster.check_exact(&names, &log);
        // `kubectl delete pods --all`, and the ReplicaSet recreates them at once.
        cluster.delete_all(&names).await;
        let again = cluster
            .create_deployment(&format!("{deployment}-again"), replicas)
            .await;
        let log = cluster.settled(&again).await;
        cluster.check_exact(&again, &log);
        cluster.delete_all(&again).await;
        eventually("the deleted pods gone", || {
            cluster.api.list::<Pod>().is_empty().then_some(())
        })
        .await;
    }
    cluster.scheduler.abort();
}
