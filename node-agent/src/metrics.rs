//! `/metrics` in OpenMetrics text, exactly as HAMi's device-plugin monitor
//! (`cmd/vGPUmonitor`) exports it: the same metric names, label names,
//! label values and units (see [`HAMI_MONITOR_FAMILIES`]), and HAMi's
//! legacy CamelCase names too when the config's `metrics.legacyNames` is
//! on. Per card (from the GPU backend): `hami_host_gpu_memory_used_bytes`,
//! `hami_host_gpu_utilization_ratio` and
//! `hami_host_gpu_memory_controller_utilization_ratio` (percent, 0–100, as
//! NVML and HAMi give them). Per container and card (from the containers'
//! accounting regions, see [`crate::usage`]): memory used, memory limit
//! (from the allocation until the interceptor has written the cap, so a
//! container shows its limit before any process runs), SM utilization
//! (percent), seconds since its last kernel, and the memory split
//! (`hami_vgpu_memory_{context,module,buffer}_bytes`). Then Tessera's own:
//! `tessera_region_read_failures_total` (reads of a container's region that
//! were refused, see [`crate::region_file::RegionWarnings`]) and whatever
//! else is [`Metrics::register`]ed (enforcement's counters). One block per
//! family, one `# EOF`. Values are gathered when scraped, on a blocking
//! thread (the region files are read there, never on the async runtime's
//! workers). The agent serves [`Metrics::router`] together with the probes
//! (`crate::probes`).

use std::sync::{Arc, Mutex, PoisonError, RwLock};

use axum::routing::get;
use prometheus_client::registry::Registry;
use tessera_api::exposition::{
    gauge_family as family, join_with_encoded, write_gauge_family, GaugeFamily, GaugeSample,
};

use crate::gpu::{GpuBackend, GpuInfo};
use crate::region_file::{RegionBuffer, RegionOwner, RegionWarnings};
use crate::usage::{read_region, DeviceUsage};

const MIB: u64 = 1024 * 1024;

/// One GPU container on this node, as the metrics need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRecord {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Container name.
    pub container: String,
    /// Host path of its accounting region.
    pub region: std::path::PathBuf,
    /// UUIDs of its cards, in visible order.
    pub cards: Vec<String>,
    /// Its memory on each card of [`ContainerRecord::cards`] (same order),
    /// MiB, from the allocation: the limit reported until the interceptor
    /// has written the cap into the region.
    pub card_memory_mib: Vec<u64>,
    /// Its `nvidia.com/priority` from the pod spec (0 high, 1 low), if any:
    /// the priority its entries in the card tenant tables get.
    pub priority: Option<u32>,
}

impl ContainerRecord {
    /// Its id in the card tenant tables: the name of its host directory
    /// (`<pod UID>_<container>`), which the agent also passes it as
    /// `TESSERA_TENANT_ID`.
    pub fn tenant_id(&self) -> String {
        self.region
            .parent()
            .and_then(|dir| dir.file_name())
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Who owns the region, for warnings.
    pub fn owner(&self) -> RegionOwner<'_> {
        RegionOwner {
            namespace: &self.namespace,
            pod: &self.pod,
            container: &self.container,
        }
    }
}

/// The GPU containers currently on this node, refreshed by the pod sweep.
pub type ContainerIndex = Arc<RwLock<Vec<ContainerRecord>>>;

const HOST_LABELS: &[&str] = &["node", "device_index", "device_uuid", "device_type"];
const LEGACY_HOST_LABELS: &[&str] = &["nodeid", "deviceidx", "deviceuuid", "devicetype"];
const CONTAINER_LABELS: &[&str] = &[
    "namespace",
    "pod",
    "container",
    "vdevice_index",
    "device_uuid",
];
const LEGACY_CONTAINER_LABELS: &[&str] = &[
    "podnamespace",
    "podname",
    "ctrname",
    "vdeviceid",
    "deviceuuid",
];

/// Every family HAMi's device-plugin monitor exports
/// (`cmd/vGPUmonitor/metrics.go`), with its name, help text and label
/// names, in the order they are rendered.
pub const HAMI_MONITOR_FAMILIES: &[GaugeFamily] = &[
    family(
        "hami_host_gpu_memory_used_bytes",
        "GPU device memory usage in bytes",
        HOST_LABELS,
        false,
    ),
    family(
        "hami_host_gpu_utilization_ratio",
        "GPU core utilization ratio (0-100)",
        HOST_LABELS,
        false,
    ),
    family(
        "hami_host_gpu_memory_controller_utilization_ratio",
        "GPU memory controller utilization ratio (0-100)",
        &["device_index", "device_uuid", "device_type"],
        false,
    ),
    family(
        "hami_vgpu_memory_used_bytes",
        "vGPU device memory usage in bytes",
        CONTAINER_LABELS,
        false,
    ),
    family(
        "hami_vgpu_memory_limit_bytes",
        "vGPU device memory limit in bytes",
        CONTAINER_LABELS,
        false,
    ),
    family(
        "hami_container_device_utilization_ratio",
        "Container device SM utilization ratio",
        CONTAINER_LABELS,
        false,
    ),
    family(
        "hami_container_last_kernel_elapsed_seconds",
        "Seconds since last kernel execution in container",
        CONTAINER_LABELS,
        false,
    ),
    family(
        "hami_mig_device_info",
        "MIG runtime identity for a container allocation",
        &[
            "namespace",
            "pod",
            "container",
            "vdevice_index",
            "device_uuid",
            "mig_uuid",
            "profile",
            "gpu_instance_id",
            "compute_instance_id",
        ],
        false,
    ),
    family(
        "hami_vgpu_memory_context_bytes",
        "Container device memory context size in bytes",
        CONTAINER_LABELS,
        false,
    ),
    family(
        "hami_vgpu_memory_module_bytes",
        "Container device memory module size in bytes",
        CONTAINER_LABELS,
        false,
    ),
    family(
        "hami_vgpu_memory_buffer_bytes",
        "Container device memory buffer size in bytes",
        CONTAINER_LABELS,
        false,
    ),
    family(
        "HostGPUMemoryUsage",
        "GPU device memory usage",
        LEGACY_HOST_LABELS,
        true,
    ),
    family(
        "HostCoreUtilization",
        "GPU core utilization",
        LEGACY_HOST_LABELS,
        true,
    ),
    family(
        "vGPU_device_memory_usage_in_bytes",
        "vGPU device usage",
        LEGACY_CONTAINER_LABELS,
        true,
    ),
    family(
        "vGPU_device_memory_limit_in_bytes",
        "vGPU device limit",
        LEGACY_CONTAINER_LABELS,
        true,
    ),
    family(
        "Device_memory_desc_of_container",
        "Container device memory description",
        &[
            "podnamespace",
            "podname",
            "ctrname",
            "vdeviceid",
            "deviceuuid",
            "context",
            "module",
            "data",
            "offset",
        ],
        true,
    ),
    family(
        "Device_utilization_desc_of_container",
        "Container device utilization description",
        LEGACY_CONTAINER_LABELS,
        true,
    ),
    family(
        "Device_last_kernel_of_container",
        "Container device last kernel description",
        LEGACY_CONTAINER_LABELS,
        true,
    ),
    family(
        "MigInfo",
        "Mig device information for container",
        &[
            "podnamespace",
            "podname",
            "ctrname",
            "vdeviceid",
            "deviceuuid",
            "instanceid",
        ],
        true,
    ),
];

/// One card's host figures at scrape time.
struct HostFigures {
    index: String,
    uuid: String,
    device_type: String,
    memory_used_bytes: u64,
    utilization_percent: f64,
    memory_controller_percent: f64,
}

/// One container's figures on one of its cards at scrape time.
struct ContainerFigures {
    namespace: String,
    pod: String,
    container: String,
    vdevice_index: String,
    uuid: String,
    used_bytes: u64,
    limit_bytes: u64,
    utilization_percent: f64,
    /// Seconds since its last kernel on the card; none before the first.
    last_kernel_seconds: Option<f64>,
}

/// The agent's metrics.
#[derive(Clone)]
pub struct Metrics {
    /// Tessera's own families (region read failures, enforcement).
    registry: Arc<Mutex<Registry>>,
    node: Arc<str>,
    legacy_names: bool,
    backend: Arc<dyn GpuBackend>,
    cards: Arc<[GpuInfo]>,
    containers: ContainerIndex,
    region_warnings: RegionWarnings,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Metrics of node `node` over these cards and containers.
    pub fn new(
        node: &str,
        backend: Arc<dyn GpuBackend>,
        cards: Arc<[GpuInfo]>,
        containers: ContainerIndex,
    ) -> Self {
        let mut registry = Registry::default();
        let region_warnings = RegionWarnings::new();
        registry.register(
            "tessera_region_read_failures",
            "Reads of a container's accounting region the agent refused (a link, a special file, the wrong size, an unknown layout)",
            region_warnings.family(),
        );
        Self {
            registry: Arc::new(Mutex::new(registry)),
            node: Arc::from(node),
            legacy_names: false,
            backend,
            cards,
            containers,
            region_warnings,
        }
    }

    /// Also exports HAMi's legacy CamelCase names (config
    /// `metrics.legacyNames`).
    #[must_use]
    pub fn with_legacy_names(mut self, legacy_names: bool) -> Self {
        self.legacy_names = legacy_names;
        self
    }

    /// Where bad region files are reported; shared with the tenant-table
    /// aggregation so both count into one metric.
    pub fn region_warnings(&self) -> RegionWarnings {
        self.region_warnings.clone()
    }

    /// Gathers current values and renders them. Blocking (reads files).
    pub fn render(&self) -> String {
        let hosts = self.host_figures();
        let containers = self.container_figures();
        let mut out = String::new();
        for family in HAMI_MONITOR_FAMILIES {
            if family.legacy && !self.legacy_names {
                continue;
            }
            let samples = self.samples_of(family.name, &hosts, &containers);
            write_gauge_family(&mut out, family, &samples);
        }
        let mut ours = String::new();
        {
            let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
            if let Err(e) = prometheus_client::encoding::text::encode(&mut ours, &registry) {
                tracing::warn!(error = %e, "could not encode the agent's own metrics");
                ours.clear();
            }
        }
        join_with_encoded(out, &ours)
    }

    fn host_figures(&self) -> Vec<HostFigures> {
        self.backend
            .host_usage()
            .into_iter()
            // Cards the config leaves out of sharing are not Tessera's.
            .filter_map(|usage| {
                let card = self.cards.iter().find(|c| c.uuid == usage.uuid)?;
                Some(HostFigures {
                    index: card.index.to_string(),
                    device_type: format!("{}{}", crate::inventory::TYPE_PREFIX, card.name),
                    uuid: usage.uuid,
                    memory_used_bytes: usage.memory_used_bytes,
                    utilization_percent: usage.utilization_ratio * 100.0,
                    memory_controller_percent: usage.memory_controller_utilization_ratio * 100.0,
                })
            })
            .collect()
    }

    fn container_figures(&self) -> Vec<ContainerFigures> {
        let containers = self
            .containers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let now_ns = crate::tenant_tables::monotonic_ns();
        let mut buffer = RegionBuffer::new();
        let mut figures = Vec::new();
        for record in containers {
            let outcome = read_region(&record.region, record.cards.len(), &mut buffer);
            self.region_warnings
                .observe(record.owner(), &record.region, &outcome);
            let Ok(usage) = outcome else {
                continue;
            };
            for (i, (uuid, device)) in record.cards.iter().zip(usage).enumerate() {
                let allocated_bytes = record.card_memory_mib.get(i).copied().unwrap_or(0) * MIB;
                figures.push(container_figures(
                    &record,
                    i,
                    uuid,
                    &device,
                    allocated_bytes,
                    now_ns,
                ));
            }
        }
        figures
    }

    #[allow(clippy::cast_precision_loss)]
    fn samples_of(
        &self,
        name: &str,
        hosts: &[HostFigures],
        containers: &[ContainerFigures],
    ) -> Vec<GaugeSample> {
        let host = |h: &HostFigures| {
            vec![
                self.node.to_string(),
                h.index.clone(),
                h.uuid.clone(),
                h.device_type.clone(),
            ]
        };
        let per_host = |value: &dyn Fn(&HostFigures) -> f64| -> Vec<GaugeSample> {
            hosts.iter().map(|h| (host(h), value(h))).collect()
        };
        let container = |c: &ContainerFigures| {
            vec![
                c.namespace.clone(),
                c.pod.clone(),
                c.container.clone(),
                c.vdevice_index.clone(),
                c.uuid.clone(),
            ]
        };
        let per_container = |value: &dyn Fn(&ContainerFigures) -> f64| -> Vec<GaugeSample> {
            containers
                .iter()
                .map(|c| (container(c), value(c)))
                .collect()
        };
        match name {
            "hami_host_gpu_memory_used_bytes" | "HostGPUMemoryUsage" => {
                per_host(&|h| h.memory_used_bytes as f64)
            }
            "hami_host_gpu_utilization_ratio" | "HostCoreUtilization" => {
                per_host(&|h| h.utilization_percent)
            }
            "hami_host_gpu_memory_controller_utilization_ratio" => hosts
                .iter()
                .map(|h| {
                    (
                        vec![h.index.clone(), h.uuid.clone(), h.device_type.clone()],
                        h.memory_controller_percent,
                    )
                })
                .collect(),
            "hami_vgpu_memory_used_bytes" | "vGPU_device_memory_usage_in_bytes" => {
                per_container(&|c| c.used_bytes as f64)
            }
            "hami_vgpu_memory_limit_bytes" | "vGPU_device_memory_limit_in_bytes" => {
                per_container(&|c| c.limit_bytes as f64)
            }
            "hami_container_device_utilization_ratio" | "Device_utilization_desc_of_container" => {
                per_container(&|c| c.utilization_percent)
            }
            "hami_container_last_kernel_elapsed_seconds" | "Device_last_kernel_of_container" => {
                containers
                    .iter()
                    .filter_map(|c| Some((container(c), c.last_kernel_seconds?)))
                    .collect()
            }
            // The interceptor charges every allocation it admits as one
            // figure; it does not measure context and module memory apart
            // (HAMi-core does), so those read 0 and the buffer figure is
            // everything charged.
            "hami_vgpu_memory_context_bytes" | "hami_vgpu_memory_module_bytes" => {
                per_container(&|_| 0.0)
            }
            "hami_vgpu_memory_buffer_bytes" => per_container(&|c| c.used_bytes as f64),
            "Device_memory_desc_of_container" => containers
                .iter()
                .map(|c| {
                    let mut labels = container(c);
                    labels.extend([
                        "0".to_owned(),
                        "0".to_owned(),
                        c.used_bytes.to_string(),
                        "0".to_owned(),
                    ]);
                    (labels, c.used_bytes as f64)
                })
                .collect(),
            // Tessera does not hand out MIG instances: no series.
            _ => Vec::new(),
        }
    }

    /// Registers more metric families in the same registry (e.g.
    /// enforcement's `tessera_enforcement_actions_total`).
    pub fn register(&self, add: impl FnOnce(&mut Registry)) {
        let mut registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        add(&mut registry);
    }

    /// The `/metrics` route, to serve on the agent's HTTP listener.
    pub fn router(self) -> axum::Router {
        axum::Router::new().route(
            "/metrics",
            get(move || {
                let metrics = self.clone();
                async move {
                    // Region files are read with blocking calls: off the
                    // runtime's workers.
                    let text = tokio::task::spawn_blocking(move || metrics.render())
                        .await
                        .unwrap_or_else(|e| {
                            format!("# metrics could not be gathered: {e}\n# EOF\n")
                        });
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        )
    }
}

/// One container's figures on its `i`-th card. The limit is the cap the
/// interceptor wrote, or the allocation's memory before it has.
fn container_figures(
    record: &ContainerRecord,
    i: usize,
    uuid: &str,
    device: &DeviceUsage,
    allocated_bytes: u64,
    now_ns: u64,
) -> ContainerFigures {
    #[allow(clippy::cast_precision_loss)]
    let last_kernel_seconds = (device.last_launch_ns != 0)
        .then(|| now_ns.saturating_sub(device.last_launch_ns) as f64 / 1e9);
    ContainerFigures {
        namespace: record.namespace.clone(),
        pod: record.pod.clone(),
        container: record.container.clone(),
        vdevice_index: i.to_string(),
        uuid: uuid.to_owned(),
        used_bytes: device.used_bytes,
        limit_bytes: if device.limit_bytes == 0 {
            allocated_bytes
        } else {
            device.limit_bytes
        },
        utilization_percent: device.utilization_ratio * 100.0,
        last_kernel_seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::fake::FakeGpus;
    use crate::host_files::HostLayout;
    use crate::sweep::container_records;
    use serde_json::json;
    use tessera_api::shared_region::{SharedRegion, REGION_SIZE};
    use tessera_testkit::openmetrics::{
        assert_matches_reference, differences_from_hami, parse_strict, HamiComponent,
    };

    #[repr(C, align(64))]
    struct Lines([[u8; 64]; REGION_SIZE.div_ceil(64)]);

    #[test]
    fn renders_host_and_container_usage_with_hami_names() {
        let temp = tempfile::tempdir().expect("tempdir");
        let layout = HostLayout::new(temp.path());
        let gpus = FakeGpus::parse("2x NVIDIA A10G 23028", "n").expect("parses");
        let cards: Arc<[GpuInfo]> = gpus.discover().expect("cards").into();
        gpus.control().set_usage(&cards[1].uuid, 3 << 30, 0.25);
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "annotations": {
                "hami.io/vgpu-devices-allocated": format!("{},NVIDIA,4096,30:;", cards[1].uuid)
            }},
            "spec": {"containers": [{"name": "main", "image": "x"}]}
        }))
        .expect("pod");
        let dir = layout
            .prepare_container_dir("u1", "main", None)
            .expect("dir");
        let mut lines = Box::new(Lines([[0; 64]; REGION_SIZE.div_ceil(64)]));
        // SAFETY: aligned, large enough, used only here.
        let region =
            unsafe { SharedRegion::from_raw(lines.0.as_mut_ptr().cast::<u8>(), REGION_SIZE) }
                .expect("region");
        region.initialise();
        region.devices[0]
            .limit_bytes
            .store(4096 << 20, std::sync::atomic::Ordering::Relaxed);
        region.charge(0, 0, 1000 << 20, 4096 << 20).expect("fits");
        region.cores[0]
            .utilization_permille
            .store(250, std::sync::atomic::Ordering::Relaxed);
        region.publish[0].publish(tessera_api::shared_region::LaunchFigures {
            launch_rate: 1,
            last_launch_ns: crate::tenant_tables::monotonic_ns().saturating_sub(2_000_000_000),
            beat_ns: 1,
        });
        let bytes: Vec<u8> = lines
            .0
            .iter()
            .flatten()
            .copied()
            .take(REGION_SIZE)
            .collect();
        std::fs::write(dir.join(crate::host_files::REGION_FILE), bytes).expect("write");

        let index: ContainerIndex = Arc::new(RwLock::new(container_records(
            &[pod],
            &layout,
            &tessera_api::names::ResourceNames::default(),
        )));
        let metrics = Metrics::new("n", Arc::new(gpus), Arc::clone(&cards), index);
        let uuid = &cards[1].uuid;
        for legacy in [false, true] {
            let metrics = metrics.clone().with_legacy_names(legacy);
            let text = metrics.render();
            let exposition = parse_strict(&text)
                .unwrap_or_else(|errors| panic!("not strict OpenMetrics: {errors:#?}\n{text}"));
            // No MIG devices: those families have no series.
            let differences = differences_from_hami(
                &exposition,
                HamiComponent::Monitor,
                legacy,
                &["hami_mig_device_info", "MigInfo"],
            );
            assert!(differences.is_empty(), "{differences:#?}\n{text}");
            let expect =
                |line: String| assert!(text.contains(&line), "missing `{line}` in\n{text}");
            let container = format!("{{namespace=\"ns\",pod=\"p\",container=\"main\",vdevice_index=\"0\",device_uuid=\"{uuid}\"}}");
            expect(format!("hami_vgpu_memory_used_bytes{container} 1048576000"));
            expect(format!(
                "hami_vgpu_memory_limit_bytes{container} 4294967296"
            ));
            expect(format!(
                "hami_container_device_utilization_ratio{container} 25"
            ));
            expect(format!(
                "hami_vgpu_memory_buffer_bytes{container} 1048576000"
            ));
            expect(format!("hami_host_gpu_memory_used_bytes{{node=\"n\",device_index=\"1\",device_uuid=\"{uuid}\",device_type=\"NVIDIA-NVIDIA A10G\"}} 3221225472"));
            expect(format!("hami_host_gpu_utilization_ratio{{node=\"n\",device_index=\"1\",device_uuid=\"{uuid}\",device_type=\"NVIDIA-NVIDIA A10G\"}} 25"));
            expect(format!("hami_host_gpu_memory_controller_utilization_ratio{{device_index=\"1\",device_uuid=\"{uuid}\",device_type=\"NVIDIA-NVIDIA A10G\"}} 0"));
            let elapsed = exposition
                .family("hami_container_last_kernel_elapsed_seconds")
                .and_then(|f| f.samples.first())
                .map(|s| s.value)
                .expect("a last-kernel sample");
            assert!(elapsed >= 2.0, "launched at least 2 s ago, reads {elapsed}");
            if legacy {
                expect(format!("vGPU_device_memory_limit_in_bytes{{podnamespace=\"ns\",podname=\"p\",ctrname=\"main\",vdeviceid=\"0\",deviceuuid=\"{uuid}\"}} 4294967296"));
                expect(format!("HostCoreUtilization{{nodeid=\"n\",deviceidx=\"1\",deviceuuid=\"{uuid}\",devicetype=\"NVIDIA-NVIDIA A10G\"}} 25"));
            } else {
                assert!(
                    !text.contains("vGPU_device_memory_limit_in_bytes"),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn cards_left_out_of_sharing_export_no_host_figures() {
        let gpus = FakeGpus::parse("2x NVIDIA A10G 23028", "n").expect("parses");
        let all = gpus.discover().expect("cards");
        let shared: Arc<[GpuInfo]> = all[..1].to_vec().into();
        let index: ContainerIndex = Arc::new(RwLock::new(Vec::new()));
        let text = Metrics::new("n", Arc::new(gpus), shared, index).render();
        assert!(text.contains(&all[0].uuid), "{text}");
        assert!(!text.contains(&all[1].uuid), "{text}");
    }

    #[test]
    fn the_family_table_is_hamis_reference() {
        assert_matches_reference(
            HamiComponent::Monitor,
            HAMI_MONITOR_FAMILIES
                .iter()
                .map(|f| (f.name, f.labels, f.help, f.legacy)),
        );
    }

    #[test]
    fn the_limit_comes_from_the_allocation_before_any_process_runs() {
        let temp = tempfile::tempdir().expect("tempdir");
        let layout = HostLayout::new(temp.path());
        let gpus = FakeGpus::parse("1x NVIDIA A10G 23028", "n").expect("parses");
        let cards: Arc<[GpuInfo]> = gpus.discover().expect("cards").into();
        let dir = layout
            .prepare_container_dir("u1", "main", None)
            .expect("dir");
        let record = ContainerRecord {
            namespace: "ns".into(),
            pod: "p".into(),
            container: "main".into(),
            region: dir.join(crate::host_files::REGION_FILE),
            cards: vec![cards[0].uuid.clone()],
            card_memory_mib: vec![4096],
            priority: None,
        };
        let index: ContainerIndex = Arc::new(RwLock::new(vec![record]));
        let text = Metrics::new("n", Arc::new(gpus), Arc::clone(&cards), index).render();
        let uuid = &cards[0].uuid;
        assert!(
            text.contains(&format!("hami_vgpu_memory_limit_bytes{{namespace=\"ns\",pod=\"p\",container=\"main\",vdevice_index=\"0\",device_uuid=\"{uuid}\"}} 4294967296")),
            "{text}"
        );
        assert!(
            !text.contains("hami_container_last_kernel_elapsed_seconds{"),
            "no kernel ran yet: {text}"
        );
    }

    #[test]
    fn a_bad_region_is_counted_and_the_others_still_render() {
        let temp = tempfile::tempdir().expect("tempdir");
        let layout = HostLayout::new(temp.path());
        let gpus = FakeGpus::parse("1x NVIDIA A10G 23028", "n").expect("parses");
        let cards: Arc<[GpuInfo]> = gpus.discover().expect("cards").into();
        let record = |uid: &str| {
            let dir = layout
                .prepare_container_dir(uid, "main", None)
                .expect("dir");
            ContainerRecord {
                namespace: "ns".into(),
                pod: uid.into(),
                container: "main".into(),
                region: dir.join(crate::host_files::REGION_FILE),
                cards: vec![cards[0].uuid.clone()],
                card_memory_mib: vec![1024],
                priority: None,
            }
        };
        let (good, bad) = (record("good"), record("bad"));
        // `truncate -s 300M` on the bad one's region.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&bad.region)
            .expect("open")
            .set_len(300 << 20)
            .expect("grow");
        let index: ContainerIndex = Arc::new(RwLock::new(vec![bad, good]));
        let metrics = Metrics::new("n", Arc::new(gpus), Arc::clone(&cards), index);
        metrics.render();
        let text = metrics.render();
        let exposition = parse_strict(&text)
            .unwrap_or_else(|errors| panic!("not strict OpenMetrics: {errors:#?}\n{text}"));
        assert!(
            differences_from_hami(
                &exposition,
                HamiComponent::Monitor,
                false,
                &[
                    "hami_mig_device_info",
                    "hami_container_last_kernel_elapsed_seconds",
                ],
            )
            .is_empty(),
            "{text}"
        );
        assert!(
            text.contains("tessera_region_read_failures_total{namespace=\"ns\",pod=\"bad\",container=\"main\",reason=\"wrong_size\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("hami_vgpu_memory_used_bytes{namespace=\"ns\",pod=\"good\""),
            "{text}"
        );
        assert!(!text.contains("hami_vgpu_memory_used_bytes{namespace=\"ns\",pod=\"bad\""));
    }
}
