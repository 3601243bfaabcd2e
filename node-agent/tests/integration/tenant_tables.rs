//! The card tenant tables end to end, through the real agent: pods are
//! allocated over the device-plugin API, their containers publish launch
//! figures in their own regions, and the agent's aggregation thread writes
//! the card's table (read-only to containers) with each container's
//! priority taken from its pod. The pod sweep is an hour away in these
//! agents, so the containers are found through the early sweep the
//! aggregation asks for. A container that breaks its region file loses its
//! entry and nothing else happens.

use crate::common;

use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};

use common::{allocate_request, annotation, bound_pod, device, eventually, Cluster};
use k8s_openapi::api::core::v1::Pod;
use tessera_api::card_tenants::{
    tenant_key, TenantRecord, TenantTable, PRIORITY_HIGH, PRIORITY_LOW, TABLE_SIZE,
};
use tessera_api::config::Config;
use tessera_api::shared_region::{LaunchFigures, SharedRegion, REGION_SIZE};
use tessera_node_agent::proto::ContainerAllocateResponse;
use tessera_node_agent::tenant_tables::monotonic_ns;

fn config() -> Config {
    Config::from_yaml("sharing:\n  splitCount: 4\n").expect("config")
}

/// `bound_pod` with `nvidia.com/priority` set on its one container.
fn pod_with_priority(name: &str, card: &str, priority: Option<&str>) -> Pod {
    let mut pod = bound_pod(name, &vec![vec![device(card, 1000, 30)]]);
    if let Some(priority) = priority {
        let limits = pod.spec.as_mut().expect("spec").containers[0]
            .resources
            .as_mut()
            .expect("resources")
            .limits
            .as_mut()
            .expect("limits");
        limits.insert(
            "nvidia.com/priority".into(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity(priority.into()),
        );
    }
    pod
}

/// Allocates `pod` (inserted now) on device id `id`; its one response.
async fn allocate(cluster: &Cluster, pod: &Pod, id: String) -> ContainerAllocateResponse {
    cluster.api.insert(pod);
    let mut client = cluster.kubelet.plugin_client().await;
    let mut response = client
        .allocate(allocate_request(&[vec![id]]))
        .await
        .expect("allocate")
        .into_inner();
    response.container_responses.remove(0)
}

fn mount(response: &ContainerAllocateResponse, container_path: &str) -> (PathBuf, bool) {
    let m = response
        .mounts
        .iter()
        .find(|m| m.container_path == container_path)
        .expect("mounted");
    (PathBuf::from(&m.host_path), m.read_only)
}

/// Writes a region publishing `figures` for the container's card 0.
fn publish(region: &Path, figures: LaunchFigures) {
    let mut bytes = vec![0u8; REGION_SIZE + 64];
    let offset = bytes.as_ptr().align_offset(64);
    let slice = &mut bytes[offset..offset + REGION_SIZE];
    // SAFETY: aligned slice of REGION_SIZE bytes, used only here.
    let map = unsafe { SharedRegion::from_raw(slice.as_mut_ptr(), REGION_SIZE) }.expect("region");
    map.initialise();
    map.publish[0].publish(figures);
    // Written through a new file and a rename, as a fresh region.
    let temp = region.with_extension("new");
    std::fs::write(&temp, &*slice).expect("write");
    std::fs::rename(&temp, region).expect("rename");
}

/// The entries of the table at `path`, read as a container would.
fn entries(path: &Path) -> Vec<TenantRecord> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    assert_eq!(bytes.len(), TABLE_SIZE);
    let mut aligned = vec![0u8; TABLE_SIZE + 64];
    let offset = aligned.as_ptr().align_offset(64);
    aligned[offset..offset + TABLE_SIZE].copy_from_slice(&bytes);
    // SAFETY: aligned copy of a whole table, all atomics.
    let table = unsafe { &*(aligned[offset..].as_ptr() as *const TenantTable) };
    assert!(table.is_valid());
    let mut records = table.records();
    records.sort_by_key(|r| r.priority);
    records
}

#[tokio::test]
async fn the_agent_writes_read_only_tables_with_the_pods_priority_and_survives_bad_regions() {
    let cluster = Cluster::start("1x NVIDIA A10G 23028", config()).await;
    let card = cluster.card(0);
    let ids = cluster.ids(0, 2);
    let high = allocate(
        &cluster,
        &pod_with_priority("high", &card, Some("0")),
        ids[0].clone(),
    )
    .await;
    let low = allocate(
        &cluster,
        &pod_with_priority("low", &card, None),
        ids[1].clone(),
    )
    .await;

    // The tables: the agent's, read-only to containers.
    let (cards_dir, read_only) = mount(&high, "/usr/local/tessera/cards");
    assert!(read_only, "the tables are mounted read-only");
    let table = cards_dir.join(format!("{card}.tenants"));
    let meta = std::fs::metadata(&table).expect("the agent made the table");
    assert_eq!(meta.mode() & 0o7777, 0o644);
    assert_eq!(
        std::fs::metadata(&cards_dir).expect("dir").mode() & 0o7777,
        0o755
    );

    let region_of = |r: &ContainerAllocateResponse| {
        mount(r, "/usr/local/tessera/shared").0.join("region.cache")
    };
    let id_of = |r: &ContainerAllocateResponse| r.envs["TESSERA_TENANT_ID"].clone();
    let uid = |name: &str| {
        cluster
            .api
            .get::<Pod>(Some("default"), name)
            .and_then(|p| p.metadata.uid)
            .expect("uid")
    };
    assert_eq!(id_of(&high), format!("{}_c0", uid("high")));
    let now = monotonic_ns();
    let figures = |rate| LaunchFigures {
        launch_rate: rate,
        last_launch_ns: now,
        beat_ns: now,
    };
    publish(&region_of(&high), figures(100));
    // The low one says nothing about priority (it cannot): it is low.
    publish(&region_of(&low), figures(200));

    let both = eventually("both containers in the card's table", || {
        let found = entries(&table);
        (found.len() == 2).then_some(found)
    })
    .await;
    assert_eq!(
        both.iter()
            .map(|r| (r.key, r.priority, r.launch_rate))
            .collect::<Vec<_>>(),
        vec![
            (tenant_key(&id_of(&high)), PRIORITY_HIGH, 100),
            (tenant_key(&id_of(&low)), PRIORITY_LOW, 200),
        ]
    );

    // The low container replaces its region by a link to a FIFO: its entry
    // goes, the agent carries on (the high one's new figures still arrive).
    let fifo = cluster.temp.path().join("fifo");
    let c_fifo = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).expect("path");
    // SAFETY: NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o666) }, 0);
    std::fs::remove_file(region_of(&low)).expect("rm");
    symlink(&fifo, region_of(&low)).expect("link");
    publish(&region_of(&high), figures(300));
    let left = eventually("only the high one, with its new rate", || {
        let found = entries(&table);
        (found.len() == 1 && found[0].launch_rate == 300).then_some(found)
    })
    .await;
    assert_eq!(left[0].key, tenant_key(&id_of(&high)));
    // Both pods were applied; the agent is still the node's device plugin.
    for name in ["high", "low"] {
        let pod = cluster.api.get::<Pod>(Some("default"), name).expect("pod");
        assert_eq!(
            annotation(&pod, "hami.io/bind-phase").as_deref(),
            Some("success"),
            "{name}"
        );
    }
    assert!(cluster
        .kubelet
        .plugin_client()
        .await
        .get_device_plugin_options(tessera_node_agent::proto::Empty {})
        .await
        .is_ok());
}
