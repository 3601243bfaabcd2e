//! The scheduler's `/metrics` against HAMi's reference
//! (`testkit/fixtures/hami-metrics.md`, the families of HAMi's
//! `cmd/scheduler/metrics.go`): every family with HAMi's name, help, label
//! names and label values (namespace GPU quotas included), legacy names
//! only behind the switch, and the
//! whole exposition valid strict OpenMetrics.

use k8s_openapi::api::core::v1::{Pod, ResourceQuota};
use serde_json::json;
use tessera_api::allocation::{encode_pod_devices, ContainerDevice};
use tessera_api::config::Config;
use tessera_scheduler::core::ClusterState;
use tessera_scheduler::shell::metrics::{BoundPod, SchedulerMetrics, HAMI_SCHEDULER_FAMILIES};
use tessera_testkit::fixtures::{gpu_node, t4_cards};
use tessera_testkit::openmetrics::{
    assert_matches_reference, differences_from_hami, parse_strict, Exposition, HamiComponent,
};

fn state() -> ClusterState {
    let cards = t4_cards("GPU-n", 2);
    let node = gpu_node("gpu-1", &cards, "20");
    let mut state = ClusterState::new(Config::default());
    state.upsert_node(&node);
    // The trainer below, charged, in a namespace with a GPU quota.
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "team-gpus", "namespace": "team"},
        "spec": {"hard": {"limits.nvidia.com/gpumem": "8192", "limits.nvidia.com/gpucores": "100"}}}))
    .expect("quota");
    assert!(state.upsert_resource_quota(&quota).is_empty());
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "trainer", "namespace": "team",
            "annotations": {"hami.io/vgpu-node": "gpu-1",
                "hami.io/vgpu-devices-allocated": bound_pods()[0].devices_allocated}},
        "spec": {"nodeName": "gpu-1", "containers": [{"name": "a"}, {"name": "b"}]},
        "status": {"phase": "Running"}}))
    .expect("pod");
    state.observe_pod(&pod);
    state
}

fn bound_pods() -> Vec<BoundPod> {
    let device = |uuid: &str, memory_mib, cores| ContainerDevice {
        uuid: uuid.to_owned(),
        vendor: "NVIDIA".to_owned(),
        memory_mib,
        cores,
    };
    vec![BoundPod {
        namespace: "team".into(),
        name: "trainer".into(),
        node: "gpu-1".into(),
        devices_allocated: encode_pod_devices(&[
            vec![device("GPU-n-0", 4096, 30)],
            vec![device("GPU-n-1", 2048, 0)],
        ]),
    }]
}

fn render(legacy: bool) -> (String, Exposition) {
    let metrics = SchedulerMetrics::new().with_legacy_names(legacy);
    metrics.count_decision("placed");
    let text = metrics.render(&state(), &bound_pods());
    let exposition = parse_strict(&text)
        .unwrap_or_else(|errors| panic!("not strict OpenMetrics: {errors:#?}\n{text}"));
    (text, exposition)
}

#[test]
fn the_family_table_is_hamis_reference() {
    assert_matches_reference(
        HamiComponent::Scheduler,
        HAMI_SCHEDULER_FAMILIES
            .iter()
            .map(|f| (f.name, f.labels, f.help, f.legacy)),
    );
}

#[test]
fn the_exposition_matches_hami_with_and_without_legacy_names() {
    for legacy in [false, true] {
        let (text, exposition) = render(legacy);
        // No MIG instances: those families have no series.
        let without_series = ["hami_node_gpu_mig_instance_info", "nodeGPUMigInstance"];
        let differences = differences_from_hami(
            &exposition,
            HamiComponent::Scheduler,
            legacy,
            &without_series,
        );
        assert!(differences.is_empty(), "{differences:#?}\n{text}");
        assert!(
            exposition.family("tessera_scheduler_decisions").is_some(),
            "Tessera's own metrics stay: {text}"
        );
    }
}

#[test]
fn label_values_and_units_are_hamis() {
    let (text, exposition) = render(true);
    let sample = |family: &str, uuid: &str| {
        exposition
            .family(family)
            .and_then(|f| {
                f.samples
                    .iter()
                    .find(|s| s.label("device_uuid").or(s.label("deviceuuid")) == Some(uuid))
            })
            .unwrap_or_else(|| panic!("no {family} sample for {uuid} in\n{text}"))
            .clone()
    };
    let limit = sample("hami_gpu_memory_limit_bytes", "GPU-n-1");
    assert_eq!(limit.value, (15360_u64 << 20) as f64);
    assert_eq!(limit.label("node"), Some("gpu-1"));
    assert_eq!(limit.label("device_index"), Some("1"));
    assert_eq!(limit.label("device_type"), Some("NVIDIA-Tesla T4"));
    assert_eq!(sample("hami_gpu_core_limit_ratio", "GPU-n-0").value, 100.0);
    let overview = sample("hami_node_gpu_overview", "GPU-n-0");
    assert_eq!(overview.label("device_memory_limit"), Some("15360"));
    assert_eq!(
        sample("GPUDeviceMemoryLimit", "GPU-n-1").label("nodeid"),
        Some("gpu-1")
    );
    let container = sample("hami_vgpu_memory_allocated_bytes", "GPU-n-1");
    assert_eq!(container.value, (2048_u64 << 20) as f64);
    assert_eq!(container.label("namespace"), Some("team"));
    assert_eq!(container.label("node"), Some("gpu-1"));
    assert_eq!(container.label("pod"), Some("trainer"));
    assert_eq!(container.label("container_index"), Some("1"));
    assert_eq!(
        sample("hami_vgpu_core_allocated_ratio", "GPU-n-0").value,
        30.0
    );
    assert_eq!(
        sample("vGPUMemoryAllocated", "GPU-n-0").label("nodename"),
        Some("gpu-1")
    );
}

#[test]
fn quota_series_carry_hamis_labels_and_units() {
    let (text, exposition) = render(true);
    let quota = |family: &str, name_label: &str, resource: &str| {
        exposition
            .family(family)
            .and_then(|f| {
                f.samples
                    .iter()
                    .find(|s| s.label(name_label) == Some(resource))
            })
            .unwrap_or_else(|| panic!("no {family} sample for {resource} in\n{text}"))
            .clone()
    };
    // 4096 + 2048 MiB on two cards, 30 + 0 cores, against 8192 MiB / 100.
    let memory = quota(
        "hami_resource_quota_used",
        "quota_name",
        "nvidia.com/gpumem",
    );
    assert_eq!(memory.value, 6144.0);
    assert_eq!(memory.label("namespace"), Some("team"));
    assert_eq!(memory.label("limit"), Some("8192"));
    let cores = quota(
        "hami_resource_quota_used",
        "quota_name",
        "nvidia.com/gpucores",
    );
    assert_eq!(cores.value, 30.0);
    assert_eq!(cores.label("limit"), Some("100"));
    let limit = quota(
        "hami_resource_quota_limit",
        "quota_name",
        "nvidia.com/gpumem",
    );
    assert_eq!(limit.value, 8192.0);
    assert_eq!(limit.label("namespace"), Some("team"));
    let legacy = quota("QuotaUsed", "quotaName", "nvidia.com/gpumem");
    assert_eq!(legacy.value, 6144.0);
    assert_eq!(legacy.label("quotanamespace"), Some("team"));
    assert_eq!(legacy.label("limit"), Some("8192"));
}
