//! `/metrics` in Prometheus text format, with HAMi's metric and label
//! names so its dashboards work: per container and card
//! `hami_vgpu_memory_used_bytes`, `hami_vgpu_memory_limit_bytes` and
//! `hami_container_device_utilization_ratio` (the container's measured share
//! of the card's compute, written by the interceptor's SM updater) (from
//! the containers' accounting regions), per card
//! `hami_host_gpu_memory_used_bytes` and `hami_host_gpu_utilization_ratio`
//! (from the GPU backend), and `tessera_region_read_failures_total` (reads
//! of a container's region that were refused, see
//! [`crate::region_file::RegionWarnings`]). Values are gathered when
//! scraped, on a blocking thread (the region files are read there, never
//! on the async runtime's workers). The agent serves [`Metrics::router`]
//! together with the probes (`crate::probes`).

use std::sync::{Arc, Mutex, PoisonError, RwLock};

use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::gpu::{GpuBackend, GpuInfo};
use crate::region_file::{RegionBuffer, RegionOwner, RegionWarnings};
use crate::usage::read_region;

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ContainerLabels {
    podnamespace: String,
    podname: String,
    ctrname: String,
    vdeviceid: String,
    deviceuuid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    deviceidx: String,
    deviceuuid: String,
    devicetype: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

struct Families {
    registry: Registry,
    vgpu_used: Family<ContainerLabels, FloatGauge>,
    vgpu_limit: Family<ContainerLabels, FloatGauge>,
    container_util: Family<ContainerLabels, FloatGauge>,
    host_used: Family<HostLabels, FloatGauge>,
    host_util: Family<HostLabels, FloatGauge>,
}

/// The agent's metrics.
#[derive(Clone)]
pub struct Metrics {
    families: Arc<Mutex<Families>>,
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
    /// Metrics over these cards and containers.
    pub fn new(
        backend: Arc<dyn GpuBackend>,
        cards: Arc<[GpuInfo]>,
        containers: ContainerIndex,
    ) -> Self {
        let mut registry = Registry::default();
        let vgpu_used = Family::<ContainerLabels, FloatGauge>::default();
        let vgpu_limit = Family::<ContainerLabels, FloatGauge>::default();
        let container_util = Family::<ContainerLabels, FloatGauge>::default();
        let host_used = Family::<HostLabels, FloatGauge>::default();
        let host_util = Family::<HostLabels, FloatGauge>::default();
        registry.register(
            "hami_vgpu_memory_used_bytes",
            "Device memory charged by a container on a card",
            vgpu_used.clone(),
        );
        registry.register(
            "hami_vgpu_memory_limit_bytes",
            "Device memory cap of a container on a card",
            vgpu_limit.clone(),
        );
        registry.register(
            "hami_container_device_utilization_ratio",
            "Share of a card's compute a container used, as its SM limiter measured it",
            container_util.clone(),
        );
        registry.register(
            "hami_host_gpu_memory_used_bytes",
            "Device memory in use on a card, all processes",
            host_used.clone(),
        );
        registry.register(
            "hami_host_gpu_utilization_ratio",
            "Share of time a kernel ran on a card",
            host_util.clone(),
        );
        let region_warnings = RegionWarnings::new();
        registry.register(
            "tessera_region_read_failures",
            "Reads of a container's accounting region the agent refused (a link, a special file, the wrong size, an unknown layout)",
            region_warnings.family(),
        );
        Self {
            families: Arc::new(Mutex::new(Families {
                registry,
                vgpu_used,
                vgpu_limit,
                container_util,
                host_used,
                host_util,
            })),
            backend,
            cards,
            containers,
            region_warnings,
        }
    }

    /// Where bad region files are reported; shared with the tenant-table
    /// aggregation so both count into one metric.
    pub fn region_warnings(&self) -> RegionWarnings {
        self.region_warnings.clone()
    }

    /// Gathers current values and renders them. Blocking (reads files).
    pub fn render(&self) -> String {
        let families = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        families.host_used.clear();
        families.host_util.clear();
        for usage in self.backend.host_usage() {
            let card = self.cards.iter().find(|c| c.uuid == usage.uuid);
            let labels = HostLabels {
                deviceidx: card.map(|c| c.index.to_string()).unwrap_or_default(),
                deviceuuid: usage.uuid.clone(),
                devicetype: card
                    .map(|c| format!("{}{}", crate::inventory::TYPE_PREFIX, c.name))
                    .unwrap_or_default(),
            };
            #[allow(clippy::cast_precision_loss)]
            families
                .host_used
                .get_or_create(&labels)
                .set(usage.memory_used_bytes as f64);
            families
                .host_util
                .get_or_create(&labels)
                .set(usage.utilization_ratio);
        }
        families.vgpu_used.clear();
        families.vgpu_limit.clear();
        families.container_util.clear();
        let containers = self
            .containers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut buffer = RegionBuffer::new();
        for record in containers {
            let outcome = read_region(&record.region, record.cards.len(), &mut buffer);
            self.region_warnings
                .observe(record.owner(), &record.region, &outcome);
            let Ok(usage) = outcome else {
                continue;
            };
            for (i, (uuid, device)) in record.cards.iter().zip(usage).enumerate() {
                let labels = ContainerLabels {
                    podnamespace: record.namespace.clone(),
                    podname: record.pod.clone(),
                    ctrname: record.container.clone(),
                    vdeviceid: i.to_string(),
                    deviceuuid: uuid.clone(),
                };
                #[allow(clippy::cast_precision_loss)]
                {
                    families
                        .vgpu_used
                        .get_or_create(&labels)
                        .set(device.used_bytes as f64);
                    families
                        .vgpu_limit
                        .get_or_create(&labels)
                        .set(device.limit_bytes as f64);
                    families
                        .container_util
                        .get_or_create(&labels)
                        .set(device.utilization_ratio);
                }
            }
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &families.registry) {
            tracing::warn!(error = %e, "could not encode metrics");
        }
        out
    }

    /// Registers more metric families in the same registry (e.g.
    /// enforcement's `tessera_enforcement_actions_total`).
    pub fn register(&self, add: impl FnOnce(&mut Registry)) {
        let mut families = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        add(&mut families.registry);
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
                        .unwrap_or_else(|e| format!("# metrics could not be gathered: {e}\n"));
                    (
                        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                        text,
                    )
                }
            }),
        )
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
        let metrics = Metrics::new(Arc::new(gpus), Arc::clone(&cards), index);
        let text = metrics.render();
        let uuid = &cards[1].uuid;
        let expect = |line: String| assert!(text.contains(&line), "missing `{line}` in\n{text}");
        expect(format!("hami_vgpu_memory_used_bytes{{podnamespace=\"ns\",podname=\"p\",ctrname=\"main\",vdeviceid=\"0\",deviceuuid=\"{uuid}\"}} 1048576000"));
        expect(format!("hami_vgpu_memory_limit_bytes{{podnamespace=\"ns\",podname=\"p\",ctrname=\"main\",vdeviceid=\"0\",deviceuuid=\"{uuid}\"}} 4294967296"));
        expect(format!("hami_container_device_utilization_ratio{{podnamespace=\"ns\",podname=\"p\",ctrname=\"main\",vdeviceid=\"0\",deviceuuid=\"{uuid}\"}} 0.25"));
        expect(format!("hami_host_gpu_memory_used_bytes{{deviceidx=\"1\",deviceuuid=\"{uuid}\",devicetype=\"NVIDIA-NVIDIA A10G\"}} 3221225472"));
        expect(format!("hami_host_gpu_utilization_ratio{{deviceidx=\"1\",deviceuuid=\"{uuid}\",devicetype=\"NVIDIA-NVIDIA A10G\"}} 0.25"));
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
        let metrics = Metrics::new(Arc::new(gpus), Arc::clone(&cards), index);
        metrics.render();
        let text = metrics.render();
        assert!(
            text.contains("tessera_region_read_failures_total{podnamespace=\"ns\",podname=\"bad\",ctrname=\"main\",reason=\"wrong_size\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("hami_vgpu_memory_used_bytes{podnamespace=\"ns\",podname=\"good\""),
            "{text}"
        );
        assert!(!text.contains("hami_vgpu_memory_used_bytes{podnamespace=\"ns\",podname=\"bad\""));
    }
}
