//! Test infrastructure, not part of the agent: compiled only with the
//! `test-support` feature, which only dev-dependencies turn on.
//!
//! [`KubeletStandIn`] is kubelet's side of the device-plugin protocol over
//! real unix sockets: it serves `kubelet.sock` (the `Registration`
//! service), records every `RegisterRequest`, can restart as kubelet does
//! (removing every socket in its directory), and connects back to the
//! plugin over the socket the plugin registered. [`PluginConnection`]
//! admits containers the way kubelet does (GetPreferredAllocation, then
//! Allocate), and [`allocate_request`] builds a raw `AllocateRequest`.
//! [`RunningAgent`] is the agent spawned on fake cards, from an
//! [`AgentSetup`] with test defaults ([`fake_agent_setup`]).
//! Waits panic with what was awaited when their time limit passes.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tessera_api::config::Config;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Channel;

use crate::agent::{self, AgentError, AgentSetup};
use crate::gpu::fake::{FakeGpuControl, FakeGpus};
use crate::gpu::{GpuBackend, GpuInfo};
use crate::host_files::HostLayout;
use crate::plugin::socket;
use crate::proto::device_plugin_client::DevicePluginClient;
use crate::proto::registration_server::{Registration, RegistrationServer};
use crate::proto::{
    AllocateRequest, ContainerAllocateRequest, ContainerAllocateResponse,
    ContainerPreferredAllocationRequest, Empty, PreferredAllocationRequest, RegisterRequest,
};
use crate::seal::SealSource;

/// The registration socket's file name in the kubelet directory.
pub const KUBELET_SOCKET: &str = "kubelet.sock";

/// The plugin socket name test agents register.
pub const PLUGIN_SOCKET: &str = "tessera-nvidia.sock";

/// An `AllocateRequest` with one container request per entry of `containers`.
pub fn allocate_request(containers: &[Vec<String>]) -> AllocateRequest {
    AllocateRequest {
        container_requests: containers
            .iter()
            .map(|ids| ContainerAllocateRequest {
                devices_ids: ids.clone(),
            })
            .collect(),
    }
}

/// Every registration received, in order; kept across restarts.
#[derive(Debug, Clone)]
struct Recorder(Arc<watch::Sender<Vec<RegisterRequest>>>);

#[tonic::async_trait]
impl Registration for Recorder {
    async fn register(
        &self,
        request: tonic::Request<RegisterRequest>,
    ) -> Result<tonic::Response<Empty>, tonic::Status> {
        let request = request.into_inner();
        self.0.send_modify(|all| all.push(request));
        Ok(tonic::Response::new(Empty {}))
    }
}

/// Kubelet's device-plugin side for one node, serving
/// `dir/kubelet.sock` on the current tokio runtime until dropped.
#[derive(Debug)]
pub struct KubeletStandIn {
    dir: PathBuf,
    recorder: Recorder,
    stop: Option<watch::Sender<bool>>,
    server: Option<JoinHandle<()>>,
}

impl KubeletStandIn {
    /// Creates `dir` if needed and serves `dir/kubelet.sock`.
    pub fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("create the kubelet directory");
        let mut kubelet = Self {
            dir: dir.to_owned(),
            recorder: Recorder(Arc::new(watch::channel(Vec::new()).0)),
            stop: None,
            server: None,
        };
        kubelet.serve();
        kubelet
    }

    /// The kubelet directory (device-plugin sockets live here).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The registration socket the agent dials.
    pub fn socket(&self) -> PathBuf {
        self.dir.join(KUBELET_SOCKET)
    }

    fn serve(&mut self) {
        let listener = UnixListener::bind(self.socket()).expect("bind kubelet.sock");
        let (stop, mut stopping) = watch::channel(false);
        let service = RegistrationServer::new(self.recorder.clone());
        self.server = Some(tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
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
        for entry in std::fs::read_dir(&self.dir)
            .expect("list the kubelet directory")
            .flatten()
        {
            if entry.path().extension().is_some_and(|e| e == "sock") {
                std::fs::remove_file(entry.path()).expect("remove socket");
            }
        }
        self.serve();
    }

    /// Every registration received so far, oldest first.
    pub fn registrations(&self) -> Vec<RegisterRequest> {
        self.recorder.0.borrow().clone()
    }

    /// Waits until at least `n` registrations arrived; panics after `within`.
    pub async fn wait_registrations(&self, n: usize, within: Duration) -> Vec<RegisterRequest> {
        let mut updates = self.recorder.0.subscribe();
        let waited = tokio::time::timeout(within, updates.wait_for(|all| all.len() >= n)).await;
        let all = match waited {
            Ok(Ok(all)) => all.clone(),
            Ok(Err(_)) => unreachable!("the stand-in holds the sender"),
            Err(_) => panic!("timed out after {within:?} waiting for {n} registrations"),
        };
        all
    }

    /// A client of the plugin the last registration named.
    pub async fn plugin_client(&self) -> DevicePluginClient<Channel> {
        let endpoint = self
            .registrations()
            .last()
            .expect("a plugin registered")
            .endpoint
            .clone();
        let channel = socket::connect(self.dir.join(endpoint), "http://localhost")
            .await
            .expect("connect to the plugin socket");
        DevicePluginClient::new(channel)
    }

    /// Waits (up to `within`) for a plugin of `nvidia.com/gpu` to register,
    /// connects to it and reads its first device list, as kubelet does.
    pub async fn connect_plugin(&self, within: Duration) -> PluginConnection {
        let registration = self
            .wait_registrations(1, within)
            .await
            .pop()
            .expect("one registration");
        assert_eq!(
            registration.resource_name,
            tessera_api::names::GPU_COUNT_RESOURCE
        );
        let mut client = self.plugin_client().await;
        let mut stream = client
            .list_and_watch(Empty {})
            .await
            .expect("ListAndWatch")
            .into_inner();
        let first = stream
            .message()
            .await
            .expect("ListAndWatch stream")
            .expect("a first device list");
        let healthy = first
            .devices
            .iter()
            .filter(|d| d.health == "Healthy")
            .map(|d| d.id.clone())
            .collect();
        PluginConnection {
            client,
            healthy,
            in_use: HashSet::new(),
        }
    }
}

impl Drop for KubeletStandIn {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
    }
}

/// Kubelet's connection to one registered plugin: the device IDs it
/// advertised and those already handed to containers.
#[derive(Debug)]
pub struct PluginConnection {
    client: DevicePluginClient<Channel>,
    /// Healthy device IDs from the first ListAndWatch message.
    pub healthy: Vec<String>,
    in_use: HashSet<String>,
}

impl PluginConnection {
    /// Hands device IDs back (their container's pod ended).
    pub fn release(&mut self, ids: &[String]) {
        for id in ids {
            self.in_use.remove(id);
        }
    }

    /// Admits one container asking for `count` devices as kubelet does:
    /// asks the plugin for a preferred choice among the free device IDs,
    /// then calls `Allocate` with it. Returns the device IDs and the answer.
    pub async fn allocate_container(
        &mut self,
        count: usize,
    ) -> (
        Vec<String>,
        Result<ContainerAllocateResponse, tonic::Status>,
    ) {
        let available: Vec<String> = self
            .healthy
            .iter()
            .filter(|id| !self.in_use.contains(*id))
            .cloned()
            .collect();
        let preferred = self
            .client
            .get_preferred_allocation(PreferredAllocationRequest {
                container_requests: vec![ContainerPreferredAllocationRequest {
                    available_device_i_ds: available,
                    must_include_device_i_ds: Vec::new(),
                    allocation_size: i32::try_from(count).expect("small count"),
                }],
            })
            .await
            .expect("GetPreferredAllocation")
            .into_inner();
        let ids = preferred.container_responses[0].device_i_ds.clone();
        assert_eq!(ids.len(), count, "the plugin prefers exactly {count} IDs");
        let answer = self
            .client
            .allocate(allocate_request(std::slice::from_ref(&ids)))
            .await
            .map(|r| r.into_inner().container_responses.remove(0));
        if answer.is_ok() {
            self.in_use.extend(ids.iter().cloned());
        }
        (ids, answer)
    }
}

/// An [`AgentSetup`] for a test agent of `node` on `gpus`: default config,
/// host files under `host_dir`, registering at `kubelet_socket` as
/// [`PLUGIN_SOCKET`] (polled every 50 ms), no interceptor, no `/metrics`,
/// publishing every 100 ms, health quiet 200 ms, sweeping every 100 ms,
/// tenant tables every 20 ms, believing allocation annotations without a
/// seal, enforcement reading the real `/proc` and trusting the allocation
/// annotations as written.
/// Tests override fields with struct update syntax.
pub fn fake_agent_setup(
    node: &str,
    gpus: &FakeGpus,
    client: kube::Client,
    host_dir: &Path,
    kubelet_socket: PathBuf,
) -> AgentSetup {
    AgentSetup {
        node: node.to_owned(),
        config: Config::default(),
        backend: Arc::new(gpus.clone()),
        client,
        kubelet_socket,
        plugin_socket_name: PLUGIN_SOCKET.to_owned(),
        socket_poll: Duration::from_millis(50),
        layout: HostLayout::new(host_dir),
        interceptor_source: None,
        metrics_addr: None,
        publish_interval: Duration::from_millis(100),
        health_quiet: Duration::from_millis(200),
        sweep_interval: Duration::from_millis(100),
        seal: SealSource::TrustAnnotations,
        tenant_table_period: Duration::from_millis(20),
        proc_root: PathBuf::from("/proc"),
    }
}

/// A node agent running on the current runtime, on fake cards.
#[derive(Debug)]
pub struct RunningAgent {
    /// Drives the fake cards' health and usage.
    pub control: FakeGpuControl,
    /// The fake cards, as discovered.
    pub cards: Vec<GpuInfo>,
    /// Its host directory layout.
    pub layout: HostLayout,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), AgentError>>,
}

impl RunningAgent {
    /// Spawns [`agent::run`] with `setup`, whose backend is `gpus`.
    pub fn spawn(gpus: &FakeGpus, setup: AgentSetup) -> Self {
        let control = gpus.control();
        let cards = gpus.discover().expect("fake cards");
        let layout = setup.layout.clone();
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(agent::run(setup, shutdown));
        Self {
            control,
            cards,
            layout,
            stop,
            task,
        }
    }

    /// Stops the agent and checks it stopped cleanly.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.task
            .await
            .expect("agent task")
            .expect("agent stops cleanly");
    }
}
