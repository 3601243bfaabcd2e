//! Wires the agent together: GPU backend → the cards the config shares →
//! health monitor → inventory publisher, device-plugin server (with the
//! allocator), metrics and probes (one HTTP listener), the liveness
//! handshake, the host-pid socket, the pod sweep, the card
//! tenant-table aggregation (its own thread, stopped when [`run`] returns)
//! and memory-cap enforcement (unless the config turns it off); installs
//! the interceptor first.
//! [`run`] takes every input explicitly, so tests run the same wiring as
//! the binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tessera_api::config::{Config, EnforcementMode};
use tessera_api::inventory::encode_inventory;
use tessera_runtime::config::ConfigLoadError;
use thiserror::Error;
use tokio::sync::watch;

use crate::allocate::Allocator;
use crate::enforce::{EnforcementCounters, EnforcementSettings, Enforcer, TrustedAllocations};
use crate::gpu::fake::FakeGpus;
use crate::gpu::nvml::NvmlGpus;
use crate::gpu::{GpuBackend, GpuError};
use crate::health::HealthMonitor;
use crate::host_files::{HostFileError, HostLayout};
use crate::inventory::{node_inventory, select_shared_cards};
use crate::k8s::events::EventPoster;
use crate::k8s::handshake::HandshakeWriter;
use crate::k8s::node::InventoryPublisher;
use crate::k8s::pods::NodePods;
use crate::metrics::Metrics;
use crate::options::AgentOptions;
use crate::plugin::registration::{self, PluginError, PluginSettings};
use crate::plugin::service::DevicePluginService;
use crate::probes::{self, Readiness};
use crate::seal::{SealKeys, SealSource};

/// Why the agent could not start or stopped.
#[derive(Debug, Error)]
pub enum AgentError {
    /// GPU discovery failed.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// The config file could not be read or is invalid.
    #[error(transparent)]
    Config(#[from] ConfigLoadError),
    /// No node name was given.
    #[error("no node name: pass --node-name or set NODE_NAME (the DaemonSet sets it from spec.nodeName)")]
    NoNodeName,
    /// The interceptor could not be installed.
    #[error(transparent)]
    HostFiles(#[from] HostFileError),
    /// The device plugin failed.
    #[error(transparent)]
    Plugin(#[from] PluginError),
}

/// Reads the config file, or the defaults when none is given.
pub fn load_config(path: Option<&Path>) -> Result<Config, AgentError> {
    Ok(tessera_runtime::config::load_config(path)?)
}

/// The backend the options ask for: fake cards, or NVML.
pub fn backend_from_options(options: &AgentOptions) -> Result<Arc<dyn GpuBackend>, GpuError> {
    match &options.fake_gpus {
        Some(spec) => Ok(Arc::new(FakeGpus::parse(spec, &options.node_name)?)),
        None => {
            let nvml = NvmlGpus::init()?;
            if let Some(version) = nvml.driver_version() {
                tracing::info!(%version, "NVIDIA driver found");
            }
            Ok(Arc::new(nvml))
        }
    }
}

/// What `--discover-once` prints: every card, how each pair is linked (when
/// there are several and the backend can tell), and the inventory annotation.
pub fn discovery_report(
    backend: &dyn GpuBackend,
    config: &Config,
    node: &str,
) -> Result<String, GpuError> {
    let discovered = backend.discover()?;
    let mut out = format!("backend: {}\ncards: {}\n", backend.kind(), discovered.len());
    if discovered.is_empty() {
        out.push_str("no GPU found on this node\n");
    }
    for card in &discovered {
        out.push_str(&format!(
            "  [{}] {} {} {} MiB numa={} healthy={}\n",
            card.index, card.uuid, card.name, card.memory_mib, card.numa, card.healthy
        ));
    }
    let selection = select_shared_cards(discovered.clone(), &config.card_filter_for_node(node));
    for card in &selection.excluded {
        out.push_str(&format!(
            "left out by filterDevices: [{}] {}\n",
            card.index, card.uuid
        ));
    }
    for entry in &selection.unknown {
        out.push_str(&format!(
            "warning: filterDevices names {entry}, which this node does not have\n"
        ));
    }
    let cards = selection.shared;
    let links = if discovered.len() > 1 {
        backend.links()
    } else {
        Vec::new()
    };
    if discovered.len() > 1 {
        out.push_str(&format_links(&links));
    }
    let health = HealthMonitor::new(&cards, Duration::from_secs(1))
        .subscribe()
        .borrow()
        .clone();
    let inventory = node_inventory(&cards, &config.sharing_for_node(node), &health);
    out.push_str(&format!(
        "hami.io/node-nvidia-register: {}\n",
        encode_inventory(&inventory)
    ));
    if let Some(scores) = crate::inventory::pair_score_annotation(&cards, &links) {
        out.push_str(&format!("hami.io/node-nvidia-score: {scores}\n"));
    }
    Ok(out)
}

/// The `links:` section of the discovery report.
fn format_links(links: &[crate::gpu::GpuLink]) -> String {
    if links.is_empty() {
        return "links: not reported by this backend\n".to_owned();
    }
    let mut out = String::from("links:\n");
    for link in links {
        out.push_str(&format!(
            "  [{}]-[{}] nvlink={} nvlinks={} p2p_read={} topology={} score={}\n",
            link.from,
            link.to,
            link.nvlink,
            link.nvlinks,
            link.p2p_read,
            link.topology,
            link.facts().score()
        ));
    }
    out
}

/// Everything [`run`] needs.
#[derive(Clone)]
pub struct AgentSetup {
    /// This node's name.
    pub node: String,
    /// The config file.
    pub config: Config,
    /// Where GPUs come from.
    pub backend: Arc<dyn GpuBackend>,
    /// The Kubernetes client.
    pub client: kube::Client,
    /// Kubelet socket and polling.
    pub kubelet_socket: PathBuf,
    /// File name of the plugin socket.
    pub plugin_socket_name: String,
    /// How often sockets are checked.
    pub socket_poll: Duration,
    /// Host files.
    pub layout: HostLayout,
    /// The interceptor to install, if the image has one.
    pub interceptor_source: Option<PathBuf>,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` (none in most tests).
    pub metrics_addr: Option<SocketAddr>,
    /// Inventory check period.
    pub publish_interval: Duration,
    /// Quiet period before a card is healthy again.
    pub health_quiet: Duration,
    /// Pod sweep period.
    pub sweep_interval: Duration,
    /// Which allocations to believe (the seal key's source).
    pub seal: SealSource,
    /// Period of the card tenant-table aggregation.
    pub tenant_table_period: Duration,
    /// Where enforcement reads `<pid>/cgroup` (`/proc` on a node).
    pub proc_root: PathBuf,
}

impl std::fmt::Debug for AgentSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSetup")
            .field("node", &self.node)
            .field("backend", &self.backend)
            .field("kubelet_socket", &self.kubelet_socket)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl AgentSetup {
    /// The setup the command line describes.
    pub fn from_options(
        options: &AgentOptions,
        config: Config,
        backend: Arc<dyn GpuBackend>,
        client: kube::Client,
    ) -> Result<Self, AgentError> {
        if options.node_name.is_empty() {
            return Err(AgentError::NoNodeName);
        }
        Ok(Self {
            node: options.node_name.clone(),
            config,
            backend,
            client,
            kubelet_socket: options.kubelet_socket.clone(),
            plugin_socket_name: options.plugin_socket_name.clone(),
            socket_poll: options.socket_poll(),
            layout: HostLayout::new(&options.host_dir),
            interceptor_source: Some(options.interceptor_source.clone()),
            metrics_addr: Some(options.metrics_addr),
            publish_interval: options.publish_interval(),
            health_quiet: options.health_quiet(),
            sweep_interval: options.sweep_interval(),
            seal: SealSource::Secret {
                namespace: options.namespace.clone(),
            },
            tenant_table_period: options.tenant_table_period(),
            proc_root: options.proc_root.clone(),
        })
    }
}

/// Reads the seal key until it is there (the scheduler creates it on its
/// first start), every few seconds, logging why not.
async fn load_seal_key(keys: Arc<SealKeys>) {
    loop {
        match keys.trust(false).await {
            Ok(_) => return,
            Err(error) => tracing::warn!(%error, "allocation seal key not available yet; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// The cards the config shares on `node`: the filter's left-out cards
/// are logged, and so is every filter entry that names no card here.
fn shared_cards(
    discovered: Vec<crate::gpu::GpuInfo>,
    config: &Config,
    node: &str,
) -> Vec<crate::gpu::GpuInfo> {
    let selection = select_shared_cards(discovered, &config.card_filter_for_node(node));
    for entry in &selection.unknown {
        tracing::warn!(%node, card = %entry, "the config's nodes[].filterDevices for this node names {entry}, but this node has no such card; nothing is left out for it. Check the entry against `tessera-node-agent --discover-once` (or `nvidia-smi -L`)");
    }
    for card in &selection.excluded {
        tracing::info!(index = card.index, uuid = %card.uuid, name = %card.name, "GPU left out of sharing by the config's filterDevices: not published, not registered with kubelet");
    }
    selection.shared
}

/// Runs the agent until `shutdown` turns true.
pub async fn run(setup: AgentSetup, shutdown: watch::Receiver<bool>) -> Result<(), AgentError> {
    let cards: Arc<[_]> =
        shared_cards(setup.backend.discover()?, &setup.config, &setup.node).into();
    if cards.is_empty() {
        tracing::warn!(
            backend = setup.backend.kind(),
            "found no GPU on this node; advertising none"
        );
    }
    for card in cards.iter() {
        tracing::info!(index = card.index, uuid = %card.uuid, name = %card.name, memory_mib = card.memory_mib, numa = card.numa, "GPU discovered");
    }
    match &setup.interceptor_source {
        Some(source) if source.exists() => {
            setup.layout.install_interceptor(source)?;
            tracing::info!(path = %setup.layout.interceptor().display(), "interceptor installed");
        }
        Some(source) => {
            tracing::warn!(path = %source.display(), "interceptor library not found in the image; containers get their env but no memory cap until it is installed")
        }
        None => {}
    }
    let sharing = setup.config.sharing_for_node(&setup.node);
    let mut tasks = tokio::task::JoinSet::new();
    // Without it the interceptor measures contexts card-wide (slower
    // start-up, still correct): not worth refusing to run over.
    match crate::pid_socket::bind(&setup.layout.pid_socket()) {
        Ok(listener) => {
            tasks.spawn(crate::pid_socket::serve(listener));
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot serve the host-pid socket; CUDA start-up in GPU containers waits for NVML instead")
        }
    }
    let monitor = HealthMonitor::new(&cards, setup.health_quiet);
    let health = monitor.subscribe();
    let recovery_interval =
        (setup.health_quiet / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
    tasks.spawn(monitor.run(Arc::clone(&setup.backend), recovery_interval));

    let links = setup.backend.links();
    let publisher = InventoryPublisher::new(
        setup.client.clone(),
        &setup.node,
        Arc::clone(&cards),
        sharing.clone(),
    )
    .with_pair_scores(crate::inventory::pair_score_annotation(&cards, &links));
    let readiness = Readiness::new();
    tasks.spawn(publisher.run(health.clone(), setup.publish_interval, readiness.clone()));
    tasks.spawn(
        HandshakeWriter::new(setup.client.clone(), &setup.node).run(Duration::from_secs(
            setup.config.liveness.handshake_period_seconds.max(1),
        )),
    );

    let pods = NodePods::new(setup.client.clone(), &setup.node);
    let index = Arc::new(RwLock::new(Vec::new()));
    let ask_sweep = Arc::new(tokio::sync::Notify::new());
    tasks.spawn(crate::sweep::run(
        crate::sweep::SweepSetup {
            pods: pods.clone(),
            layout: setup.layout.clone(),
            names: setup.config.resources.clone(),
            index: Arc::clone(&index),
            min_age: Duration::from_secs(300),
        },
        setup.sweep_interval,
        Arc::clone(&ask_sweep),
    ));
    // Which allocations to believe, shared by Allocate and enforcement; the
    // key is read now (and retried) so enforcement has it early.
    let seal_keys = Arc::new(
        SealKeys::new(setup.seal.clone(), setup.client.clone())
            .with_scheduler_name(&setup.config.scheduler_name),
    );
    tasks.spawn(load_seal_key(Arc::clone(&seal_keys)));
    let enforcement = setup.config.enforcement.clone();
    let counters = EnforcementCounters::default();
    if enforcement.mode == EnforcementMode::Off {
        tracing::warn!("GPU memory enforcement is off (config enforcement.mode): containers that bypass the interceptor are not stopped");
    } else {
        let enforcer = Enforcer::new(
            Arc::clone(&setup.backend),
            Arc::clone(&cards),
            EnforcementSettings::from_config(&enforcement, setup.proc_root.clone()),
            Arc::clone(&seal_keys) as Arc<dyn TrustedAllocations>,
        );
        tasks.spawn(crate::enforce::enforcer::run(
            enforcer,
            setup.client.clone(),
            setup.node.clone(),
            EventPoster::new(setup.client.clone(), &setup.node),
            counters.clone(),
        ));
    }
    let metrics = Metrics::new(
        &setup.node,
        Arc::clone(&setup.backend),
        Arc::clone(&cards),
        Arc::clone(&index),
    )
    .with_legacy_names(setup.config.metrics.legacy_names);
    metrics.register(|registry| counters.register(registry));
    let _stop_tables = start_tenant_tables(&setup, &cards, &index, &metrics, ask_sweep);
    if let Some(addr) = setup.metrics_addr {
        let app = metrics.router().merge(probes::router(readiness.clone()));
        tasks.spawn(async move {
            if let Err(e) = serve_http(addr, app).await {
                tracing::error!(%addr, error = %e, "could not serve /metrics, /healthz and /readyz; check that the port is free");
            }
        });
    }

    let allocator = Allocator::new(
        pods,
        EventPoster::new(setup.client.clone(), &setup.node),
        setup.layout.clone(),
        setup.config.resources.clone(),
        &cards,
        health.clone(),
        Arc::clone(&seal_keys),
    );
    let settings = PluginSettings {
        kubelet_socket: setup.kubelet_socket.clone(),
        endpoint: setup.plugin_socket_name.clone(),
        resource_name: setup.config.resources.gpu.clone(),
        poll_interval: setup.socket_poll,
    };
    let split_count = sharing.split_count;
    let result = registration::run(
        settings,
        move |stopping| {
            DevicePluginService::new(
                Arc::clone(&cards),
                split_count,
                health.clone(),
                allocator.clone(),
                stopping,
            )
        },
        shutdown,
        readiness,
    )
    .await;
    tasks.abort_all();
    result.map_err(AgentError::from)
}

/// Sets its flag when dropped: stops the tenant-table thread when [`run`]
/// returns, however it returns.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Creates the card tenant tables and starts their aggregation thread. A
/// failure is logged, not fatal: containers then see no tables and learn
/// about their neighbours through NVML only.
fn start_tenant_tables(
    setup: &AgentSetup,
    cards: &[crate::gpu::GpuInfo],
    index: &crate::metrics::ContainerIndex,
    metrics: &Metrics,
    ask_sweep: Arc<tokio::sync::Notify>,
) -> StopOnDrop {
    let stop = Arc::new(AtomicBool::new(false));
    let uuids: Vec<String> = cards.iter().map(|c| c.uuid.clone()).collect();
    let files = setup
        .layout
        .prepare_cards_dir()
        .and_then(|dir| crate::tenant_tables::TableFiles::open(&dir, &uuids));
    match files {
        Ok(files) => {
            let aggregator = crate::tenant_tables::TenantAggregator::new(
                files,
                Arc::clone(index),
                setup.layout.clone(),
                metrics.region_warnings(),
                Some(ask_sweep),
            );
            if let Err(e) = aggregator.spawn(setup.tenant_table_period, Arc::clone(&stop)) {
                tracing::error!(error = %e, "cannot start the card tenant-table thread; SM limits see neighbours through NVML only");
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot create the card tenant tables; SM limits see neighbours through NVML only");
        }
    }
    StopOnDrop(stop)
}

/// Serves `app` on `addr` until the process ends.
async fn serve_http(addr: SocketAddr, app: axum::Router) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GpuLink;

    #[test]
    fn links_are_listed_per_pair() {
        let text = format_links(&[GpuLink {
            from: 0,
            to: 1,
            nvlink: true,
            p2p_read: true,
            topology: "system",
            pcie: Some(tessera_api::pair_scores::PcieLink::CrossCpu),
            nvlinks: 2,
        }]);
        assert_eq!(
            text,
            "links:\n  [0]-[1] nvlink=true nvlinks=2 p2p_read=true topology=system score=210\n"
        );
        assert_eq!(format_links(&[]), "links: not reported by this backend\n");
    }

    #[test]
    fn discovery_report_names_both_cards_and_their_numa_nodes() {
        let backend = FakeGpus::parse("2x NVIDIA H200 143771", "node-a").expect("fake cards");
        let report =
            discovery_report(&backend, &Config::default(), "node-a").expect("discovery report");
        assert!(report.contains("cards: 2\n"), "{report}");
        assert!(
            report.contains("numa=0") && report.contains("numa=1"),
            "{report}"
        );
        // Fake cards on different NUMA nodes are linked across sockets.
        assert!(
            report.contains("[0]-[1] nvlink=false nvlinks=0"),
            "{report}"
        );
        assert!(report.contains("topology=system score=10"), "{report}");
        assert!(report.contains("hami.io/node-nvidia-score: [{"), "{report}");
        let single = FakeGpus::parse("1x NVIDIA H100 81559", "node-a").expect("fake card");
        let report = discovery_report(&single, &Config::default(), "node-a").expect("report");
        assert!(!report.contains("links"), "{report}");
        assert!(!report.contains("node-nvidia-score"), "{report}");
    }

    #[test]
    fn discovery_report_shows_the_cards_the_filter_leaves_out() {
        let backend = FakeGpus::parse("2x NVIDIA H200 143771", "node-a").expect("fake cards");
        let config =
            Config::from_yaml("nodes:\n  - name: node-a\n    filterDevices: {index: [1, 5]}\n")
                .expect("config");
        let report = discovery_report(&backend, &config, "node-a").expect("report");
        assert!(report.contains("cards: 2\n"), "{report}");
        assert!(
            report.contains("left out by filterDevices: [1]"),
            "{report}"
        );
        assert!(
            report.contains("warning: filterDevices names index 5"),
            "{report}"
        );
        let inventory = report
            .lines()
            .find_map(|l| l.strip_prefix("hami.io/node-nvidia-register: "))
            .expect("inventory line");
        let devices = tessera_api::inventory::decode_inventory(inventory).expect("decodes");
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].index, 0);
    }
}
