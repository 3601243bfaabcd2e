//! The node agent against the API and kubelet stand-ins: the liveness
//! handshake it keeps on its Node, and the config's per-node overrides
//! (cards left out by index or UUID, the node's own split) applied to both
//! the published inventory and the devices registered with kubelet.

use crate::common;

use common::*;
use k8s_openapi::api::core::v1::Node;
use tessera_api::config::Config;
use tessera_api::inventory::decode_inventory;
use tessera_api::names::{NODE_HANDSHAKE_ANNOTATION, NODE_REGISTER_ANNOTATION};
use tessera_node_agent::proto::{Empty, ListAndWatchResponse};

fn node_annotation(api: &ApiServer, key: &str) -> Option<String> {
    api.get::<Node>(None, NODE)?
        .metadata
        .annotations?
        .get(key)
        .cloned()
}

#[tokio::test]
async fn the_agent_writes_and_renews_its_handshake() {
    let config =
        Config::from_yaml("liveness:\n  handshakePeriodSeconds: 1\n  handshakeTimeoutSeconds: 3\n")
            .expect("config");
    let cluster = Cluster::start("1x NVIDIA A10G 23028", config).await;
    let first = eventually("the handshake annotation", || {
        node_annotation(&cluster.api, NODE_HANDSHAKE_ANNOTATION)
    })
    .await;
    assert!(first.starts_with("Reported "), "{first}");
    let renewed = eventually("a renewed handshake", || {
        node_annotation(&cluster.api, NODE_HANDSHAKE_ANNOTATION).filter(|v| *v != first)
    })
    .await;
    assert!(renewed.starts_with("Reported "), "{renewed}");
}

#[tokio::test]
async fn filtered_cards_are_neither_published_nor_registered_and_the_node_split_applies() {
    // The fake cards' UUIDs are derived from the node name and index; read
    // them from a first discovery so the filter can name one by UUID.
    let discovered =
        tessera_node_agent::gpu::fake::FakeGpus::parse("4x NVIDIA A10G 23028", NODE).expect("spec");
    let cards =
        tessera_node_agent::gpu::GpuBackend::discover(&discovered).expect("fake cards list");
    let config = Config::from_yaml(&format!(
        "sharing:\n  splitCount: 10\nnodes:\n  - name: {NODE}\n    devicesplitcount: 3\n    filterdevices:\n      index: [0, 7]\n      uuid: [{}]\n",
        cards[2].uuid
    ))
    .expect("config");
    let cluster = Cluster::start("4x NVIDIA A10G 23028", config).await;

    let inventory = eventually("the inventory", || {
        node_annotation(&cluster.api, NODE_REGISTER_ANNOTATION)
    })
    .await;
    let devices = decode_inventory(&inventory).expect("decodes");
    let published: Vec<u32> = devices.iter().map(|d| d.index).collect();
    assert_eq!(
        published,
        [1, 3],
        "cards 0 (by index) and 2 (by UUID) are left out"
    );
    assert!(devices.iter().all(|d| d.count == 3), "the node's own split");

    let mut client = cluster.kubelet.plugin_client().await;
    let mut stream = client
        .list_and_watch(Empty {})
        .await
        .expect("ListAndWatch")
        .into_inner();
    let list: ListAndWatchResponse = stream.message().await.expect("stream").expect("list");
    assert_eq!(list.devices.len(), 6, "2 shared cards x split 3");
    for left_out in [&cards[0].uuid, &cards[2].uuid] {
        assert!(
            list.devices
                .iter()
                .all(|d| !d.id.starts_with(left_out.as_str())),
            "{left_out} is not registered with kubelet"
        );
    }
}
