//! Shared test helpers: a kubelet stand-in (a `Registration` server on a
//! unix socket that records registrations and connects back to the
//! plugin), an agent started against the API stand-in with fake cards, pod
//! builders, and a raw HTTP/2 client for odd `:authority` values.

#![allow(dead_code)]

pub mod raw_h2;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::json;
use tessera_api::allocation::{encode_pod_devices, ContainerDevice, PodDevices, NVIDIA_VENDOR};
use tessera_api::config::Config;
use tessera_api::names::allocation as keys;
use tessera_node_agent::agent::{self, AgentSetup};
use tessera_node_agent::gpu::fake::{FakeGpuControl, FakeGpus};
use tessera_node_agent::gpu::{GpuBackend, GpuInfo};
use tessera_node_agent::host_files::HostLayout;
use tessera_node_agent::plugin::socket;
use tessera_node_agent::proto::device_plugin_client::DevicePluginClient;
use tessera_node_agent::proto::registration_server::{Registration, RegistrationServer};
use tessera_node_agent::proto::{Empty, RegisterRequest};
use tessera_testkit::ApiServer;
use tokio::net::UnixListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Channel;

pub const NODE: &str = "gpu-node-1";
pub const WAIT: Duration = Duration::from_secs(10);
pub const PLUGIN_SOCKET: &str = "tessera-nvidia.sock";

/// Polls `check` until it returns `Some` or [`WAIT`] passes.
pub async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Debug, Default, Clone)]
struct Recorder {
    requests: Arc<Mutex<Vec<RegisterRequest>>>,
    notify: Arc<Notify>,
}

#[tonic::async_trait]
impl Registration for Recorder {
    async fn register(
        &self,
        request: tonic::Request<RegisterRequest>,
    ) -> Result<tonic::Response<Empty>, tonic::Status> {
        self.requests
            .lock()
            .expect("lock")
            .push(request.into_inner());
        self.notify.notify_waiters();
        Ok(tonic::Response::new(Empty {}))
    }
}

/// Kubelet's side of the device-plugin protocol, over real unix sockets.
#[derive(Debug)]
pub struct KubeletStandIn {
    pub dir: PathBuf,
    recorder: Recorder,
    stop: Option<watch::Sender<bool>>,
    server: Option<JoinHandle<()>>,
}

impl KubeletStandIn {
    pub async fn start(dir: &Path) -> Self {
        let mut kubelet = Self {
            dir: dir.to_owned(),
            recorder: Recorder::default(),
            stop: None,
            server: None,
        };
        kubelet.serve();
        kubelet
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("kubelet.sock")
    }

    fn serve(&mut self) {
        let listener = UnixListener::bind(self.socket()).expect("bind kubelet.sock");
        let (stop, mut stopping) = watch::channel(false);
        let recorder = self.recorder.clone();
        self.server = Some(tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(RegistrationServer::new(recorder))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                    let _ = stopping.wait_for(|s| *s).await;
                })
                .await
                .expect("kubelet stand-in serves");
        }));
        self.stop = Some(stop);
    }

    /// Stops, removes every socket in the directory (as kubelet does when
    /// it starts) and serves on a new `kubelet.sock`.
    pub async fn restart(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
        for entry in std::fs::read_dir(&self.dir).expect("list").flatten() {
            if entry.path().extension().is_some_and(|e| e == "sock") {
                std::fs::remove_file(entry.path()).expect("remove socket");
            }
        }
        self.serve();
    }

    pub fn registrations(&self) -> Vec<RegisterRequest> {
        self.recorder.requests.lock().expect("lock").clone()
    }

    pub async fn wait_registrations(&self, n: usize) -> Vec<RegisterRequest> {
        eventually(&format!("{n} registrations"), || {
            let all = self.registrations();
            (all.len() >= n).then_some(all)
        })
        .await
    }

    /// A client of the plugin the last registration named.
    pub async fn plugin_client(&self) -> DevicePluginClient<Channel> {
        let endpoint = self
            .registrations()
            .last()
            .expect("registered")
            .endpoint
            .clone();
        let channel = socket::connect(self.dir.join(endpoint), "http://localhost")
            .await
            .expect("connect to the plugin");
        DevicePluginClient::new(channel)
    }
}

impl Drop for KubeletStandIn {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
    }
}

/// A running agent.
#[derive(Debug)]
pub struct AgentHandle {
    pub control: FakeGpuControl,
    pub cards: Vec<GpuInfo>,
    pub layout: HostLayout,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), agent::AgentError>>,
}

impl AgentHandle {
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.task
            .await
            .expect("agent task")
            .expect("agent stops cleanly");
    }
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

pub fn start_agent(api: &ApiServer, c: AgentConfig<'_>) -> AgentHandle {
    let gpus = FakeGpus::parse(c.fake_gpus, NODE).expect("fake spec");
    let control = gpus.control();
    let cards = gpus.discover().expect("cards");
    let layout = HostLayout::new(c.host_dir);
    let setup = AgentSetup {
        node: NODE.into(),
        config: c.config,
        backend: Arc::new(gpus),
        client: api.client(),
        kubelet_socket: c.kubelet_dir.join("kubelet.sock"),
        plugin_socket_name: PLUGIN_SOCKET.into(),
        socket_poll: Duration::from_millis(50),
        layout: layout.clone(),
        interceptor_source: None,
        metrics_addr: None,
        publish_interval: c.publish_interval,
        health_quiet: c.health_quiet,
        sweep_interval: Duration::from_secs(3600),
    };
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(agent::run(setup, shutdown));
    AgentHandle {
        control,
        cards,
        layout,
        stop,
        task,
    }
}

/// Everything a test of the plugin needs: API stand-in, kubelet stand-in, agent.
pub struct Cluster {
    pub api: ApiServer,
    pub kubelet: KubeletStandIn,
    pub agent: Option<AgentHandle>,
    pub temp: tempfile::TempDir,
}

impl Cluster {
    pub async fn start(fake_gpus: &str, config: Config) -> Self {
        let api = ApiServer::start().await.expect("API stand-in");
        api.insert(&node_object());
        let temp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(temp.path().join("kubelet")).expect("dir");
        let kubelet = KubeletStandIn::start(&temp.path().join("kubelet")).await;
        let mut cluster = Self {
            api,
            kubelet,
            agent: None,
            temp,
        };
        cluster.start_agent(fake_gpus, config);
        cluster.kubelet.wait_registrations(1).await;
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

    pub fn agent(&self) -> &AgentHandle {
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

pub fn annotation(pod: &Pod, key: &str) -> Option<String> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .cloned()
}
