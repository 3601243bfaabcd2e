//! Shared test helpers: an agent started against the API stand-in with
//! fake cards and the kubelet stand-in (`tessera_node_agent::testing`), pod
//! builders, and a raw HTTP/2 client for odd `:authority` values.

// Each target including this module (tests, the bench) uses a subset.
#![allow(dead_code, unused_imports)]

pub mod raw_h2;

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::json;
use tessera_api::allocation::{encode_pod_devices, ContainerDevice, PodDevices, NVIDIA_VENDOR};
use tessera_api::config::Config;
use tessera_api::names::allocation as keys;
use tessera_node_agent::agent::AgentSetup;
use tessera_node_agent::gpu::fake::FakeGpus;
pub use tessera_node_agent::testing::{
    allocate_request, KubeletStandIn, RunningAgent, PLUGIN_SOCKET,
};
use tessera_node_agent::testing::{fake_agent_setup, KUBELET_SOCKET};
use tessera_testkit::eventually_within;
pub use tessera_testkit::{annotation, ApiServer};

pub const NODE: &str = "gpu-node-1";
pub const WAIT: Duration = Duration::from_secs(10);

/// Polls `check` until it returns `Some` or [`WAIT`] passes.
pub async fn eventually<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    eventually_within(WAIT, what, check).await
}

pub fn node_object() -> Node {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}))
        .expect("node")
}

pub struct AgentConfig<'a> {
    pub fake_gpus: &'a str,
    pub config: Config,
    pub host_dir: &'a Path,
    pub kubelet_dir: &'a Path,
    pub publish_interval: Duration,
    pub health_quiet: Duration,
}

/// Starts an agent of [`NODE`] against `api`; sweeps stay out of the way.
pub fn start_agent(api: &ApiServer, c: AgentConfig<'_>) -> RunningAgent {
    let gpus = FakeGpus::parse(c.fake_gpus, NODE).expect("fake spec");
    let kubelet_socket = c.kubelet_dir.join(KUBELET_SOCKET);
    let defaults = fake_agent_setup(NODE, &gpus, api.client(), c.host_dir, kubelet_socket);
    let setup = AgentSetup {
        config: c.config,
        publish_interval: c.publish_interval,
        health_quiet: c.health_quiet,
        sweep_interval: Duration::from_secs(3600),
        ..defaults
    };
    RunningAgent::spawn(&gpus, setup)
}

/// Everything a test of the plugin needs: API stand-in, kubelet stand-in, agent.
pub struct Cluster {
    pub api: ApiServer,
    pub kubelet: KubeletStandIn,
    pub agent: Option<RunningAgent>,
    pub temp: tempfile::TempDir,
}

impl Cluster {
    pub async fn start(fake_gpus: &str, config: Config) -> Self {
        let api = ApiServer::start().await.expect("API stand-in");
        api.insert(&node_object());
        let temp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(temp.path().join("kubelet")).expect("dir");
        let kubelet = KubeletStandIn::start(&temp.path().join("kubelet"));
        let mut cluster = Self {
            api,
            kubelet,
            agent: None,
            temp,
        };
        cluster.start_agent(fake_gpus, config);
        cluster.kubelet.wait_registrations(1, WAIT).await;
        cluster
    }

    pub fn start_agent(&mut self, fake_gpus: &str, config: Config) {
        let host_dir = self.temp.path().join("host");
        let kubelet_dir = self.temp.path().join("kubelet");
        self.agent = Some(start_agent(
            &self.api,
            AgentConfig {
                fake_gpus,
                config,
                host_dir: &host_dir,
                kubelet_dir: &kubelet_dir,
                publish_interval: Duration::from_millis(100),
                health_quiet: Duration::from_millis(200),
            },
        ));
    }

    pub fn agent(&self) -> &RunningAgent {
        self.agent.as_ref().expect("agent running")
    }

    pub fn card(&self, i: usize) -> String {
        self.agent().cards[i].uuid.clone()
    }

    /// Kubelet device IDs of card `i` (first `n`).
    pub fn ids(&self, card: usize, n: usize) -> Vec<String> {
        (0..n).map(|k| format!("{}-{k}", self.card(card))).collect()
    }
}

pub fn device(uuid: &str, memory_mib: u64, cores: u32) -> ContainerDevice {
    ContainerDevice {
        uuid: uuid.into(),
        vendor: NVIDIA_VENDOR.into(),
        memory_mib,
        cores,
    }
}

/// A pod as the scheduler leaves it after binding to [`NODE`]: one app
/// container per entry of `devices` (an empty entry is a container without GPU).
pub fn bound_pod(name: &str, devices: &PodDevices) -> Pod {
    let containers: Vec<_> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let limits = if d.is_empty() {
                json!({})
            } else {
                json!({"nvidia.com/gpu": d.len().to_string()})
            };
            json!({"name": format!("c{i}"), "image": "cuda", "resources": {"limits": limits}})
        })
        .collect();
    let encoded = encode_pod_devices(devices);
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "annotations": {
                keys::VGPU_NODE: NODE,
                keys::VGPU_TIME: "1700000000",
                keys::DEVICES_ALLOCATED: encoded,
                keys::DEVICES_TO_ALLOCATE: encoded,
                keys::BIND_PHASE: keys::PHASE_ALLOCATING,
                keys::BIND_TIME: "1700000000",
            }
        },
        "spec": {"nodeName": NODE, "containers": containers}
    }))
    .expect("pod")
}

/// Sleeps until just after the next whole second: the API stand-in stamps
/// `creationTimestamp` with whole seconds, so pods inserted after this
/// and within the same second share it.
pub async fn next_second() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    let into_second = Duration::from_nanos(u64::from(now.subsec_nanos()));
    tokio::time::sleep(Duration::from_secs(1) - into_second + Duration::from_millis(5)).await;
}

/// Inserts pods so that each has a later creation second than the one before.
pub async fn insert_in_order(api: &ApiServer, pods: &[Pod]) {
    for pod in pods {
        next_second().await;
        api.insert(pod);
    }
}

/// Inserts pods within one creation second.
pub async fn insert_same_second(api: &ApiServer, pods: &[Pod]) {
    next_second().await;
    for pod in pods {
        api.insert(pod);
    }
}
