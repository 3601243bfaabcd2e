//! What this node offers, in the shapes it is published in: the
//! `hami.io/node-nvidia-register` inventory (one entry per card, with the
//! configured split count and scaling), the `hami.io/node-nvidia-score` link
//! scores between its cards, kubelet's device list (each card split into
//! `split_count` device IDs `<UUID>-<n>`), and which of the node's cards are
//! shared at all (the config's per-node `filterDevices`).

use tessera_api::config::{CardFilter, DeviceSharing};
use tessera_api::inventory::{GpuDevice, DEFAULT_MODE};
use tessera_api::pair_scores::{encode_pair_scores, scores_from_links, CardPairScores};

use crate::gpu::{GpuInfo, GpuLink};
use crate::health::HealthSnapshot;

/// Prefix of the card type in the inventory.
pub const TYPE_PREFIX: &str = "NVIDIA-";

/// The inventory entries of this node's cards.
pub fn node_inventory(
    cards: &[GpuInfo],
    sharing: &DeviceSharing,
    health: &HealthSnapshot,
) -> Vec<GpuDevice> {
    cards
        .iter()
        .map(|card| GpuDevice {
            id: card.uuid.clone(),
            index: card.index,
            count: sharing.split_count,
            devmem: scaled_memory_mib(card.memory_mib, sharing.memory_scaling),
            devcore: scaled_cores(sharing.core_scaling),
            device_type: format!("{TYPE_PREFIX}{}", card.name),
            numa: card.numa,
            mode: DEFAULT_MODE.to_owned(),
            health: health.get(&card.uuid).map_or(card.healthy, |h| h.healthy),
        })
        .collect()
}

/// HAMi's link scores between `cards` from the backend's `links` (pairs the
/// backend does not report score 0).
pub fn pair_scores(cards: &[GpuInfo], links: &[GpuLink]) -> Vec<CardPairScores> {
    let uuids: Vec<String> = cards.iter().map(|c| c.uuid.clone()).collect();
    scores_from_links(&uuids, |a, b| {
        let (a, b) = (cards[a].index, cards[b].index);
        links
            .iter()
            .find(|l| (l.from, l.to) == (a, b) || (l.from, l.to) == (b, a))
            .map(GpuLink::facts)
    })
}

/// The `hami.io/node-nvidia-score` value for `cards`, or `None` when there
/// is nothing to score (fewer than two cards, or no link reported).
pub fn pair_score_annotation(cards: &[GpuInfo], links: &[GpuLink]) -> Option<String> {
    (cards.len() > 1 && !links.is_empty()).then(|| encode_pair_scores(&pair_scores(cards, links)))
}

/// Card memory after scaling, truncated to whole MiB.
pub fn scaled_memory_mib(memory_mib: u64, scaling: f64) -> u64 {
    // Card sizes are far below 2^52 MiB, so the f64 round trip is exact enough.
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let scaled = (memory_mib as f64 * scaling) as u64;
    scaled
}

/// Compute of one card in percent after scaling, truncated.
pub fn scaled_cores(scaling: f64) -> u32 {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let scaled = (100.0 * scaling) as u32;
    scaled
}

/// The kubelet device IDs of one card.
pub fn kubelet_device_ids(card: &GpuInfo, split_count: u32) -> impl Iterator<Item = String> + '_ {
    (0..split_count).map(move |n| format!("{}-{n}", card.uuid))
}

/// The card UUID a kubelet device ID belongs to.
pub fn card_of_device_id(device_id: &str) -> Option<&str> {
    let (uuid, n) = device_id.rsplit_once('-')?;
    n.parse::<u32>().ok().map(|_| uuid)
}

/// The node's cards split by the config's per-node filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardSelection {
    /// Cards published and registered with kubelet.
    pub shared: Vec<GpuInfo>,
    /// Cards the filter leaves out: neither published nor registered.
    pub excluded: Vec<GpuInfo>,
    /// Filter entries that name no card of this node (`index 7`,
    /// `UUID GPU-...`), to warn about: a typo there silently shares a
    /// card meant to be kept out.
    pub unknown: Vec<String>,
}

/// Applies `filter` to the discovered `cards`.
pub fn select_shared_cards(cards: Vec<GpuInfo>, filter: &CardFilter) -> CardSelection {
    let unknown = filter
        .index
        .iter()
        .filter(|i| !cards.iter().any(|c| c.index == **i))
        .map(|i| format!("index {i}"))
        .chain(
            filter
                .uuid
                .iter()
                .filter(|u| !cards.iter().any(|c| c.uuid == **u))
                .map(|u| format!("UUID {u}")),
        )
        .collect();
    let (excluded, shared) = cards
        .into_iter()
        .partition(|card| filter.excludes(&card.uuid, card.index));
    CardSelection {
        shared,
        excluded,
        unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::fake::FakeGpus;
    use crate::gpu::GpuBackend;
    use crate::health::HealthMonitor;

    #[test]
    fn inventory_applies_split_and_scaling() {
        let cards = FakeGpus::parse("2x NVIDIA A10G 23028", "n")
            .expect("parses")
            .discover()
            .expect("lists");
        let sharing = DeviceSharing {
            split_count: 4,
            memory_scaling: 1.5,
            core_scaling: 2.0,
        };
        let health = HealthMonitor::new(&cards, std::time::Duration::from_secs(1))
            .subscribe()
            .borrow()
            .clone();
        let devices = node_inventory(&cards, &sharing, &health);
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[1].index, 1);
        assert_eq!(devices[0].count, 4);
        assert_eq!(devices[0].devmem, 34542);
        assert_eq!(devices[0].devcore, 200);
        assert_eq!(devices[0].device_type, "NVIDIA-NVIDIA A10G");
        assert_eq!(devices[0].mode, "hami-core");
        assert!(devices[0].health);
        let decoded = tessera_api::inventory::decode_inventory(
            &tessera_api::inventory::encode_inventory(&devices),
        )
        .expect("our own inventory decodes");
        assert_eq!(decoded, devices);
    }

    #[test]
    fn fake_links_become_the_score_annotation() {
        // Eight fake cards alternate NUMA nodes; 0–2 carry 4 NVLinks, 1–3 two.
        let gpus = FakeGpus::parse("8x NVIDIA A100 40960", "n")
            .expect("parses")
            .with_nvlinks(&[(0, 2, 4), (3, 1, 2)]);
        let cards = gpus.discover().expect("lists");
        let value = pair_score_annotation(&cards, &gpus.links()).expect("eight cards are scored");
        let decoded = tessera_api::pair_scores::decode_pair_scores(&value).expect("decodes");
        assert_eq!(decoded.len(), 8);
        let score = |a: usize, b: usize| decoded[a].scores[&cards[b].uuid];
        assert_eq!(decoded[0].uuid, cards[0].uuid);
        assert_eq!(score(0, 2), 420, "same NUMA node (20) + 4 NVLinks");
        assert_eq!(score(2, 0), 420);
        assert_eq!(score(1, 3), 220);
        assert_eq!(score(0, 4), 20, "same NUMA node, no NVLink");
        assert_eq!(score(0, 1), 10, "across sockets");
        assert!(decoded.iter().all(|c| c.scores.len() == 7));
        assert_eq!(pair_score_annotation(&cards[..1], &gpus.links()), None);
    }

    #[test]
    fn device_ids_round_trip_to_their_card() {
        let card = &FakeGpus::parse("1x A 100", "n")
            .expect("parses")
            .discover()
            .expect("lists")[0];
        let ids: Vec<String> = kubelet_device_ids(card, 3).collect();
        assert_eq!(ids.len(), 3);
        assert!(ids.iter().all(|id| id.len() <= 63));
        for id in &ids {
            assert_eq!(card_of_device_id(id), Some(card.uuid.as_str()));
        }
        assert_eq!(card_of_device_id("nonsense"), None);
    }

    #[test]
    fn the_filter_leaves_cards_out_by_index_and_uuid_and_names_unknown_entries() {
        let cards = FakeGpus::parse("4x NVIDIA A10G 23028", "n")
            .expect("parses")
            .discover()
            .expect("lists");
        let filter = CardFilter {
            uuid: vec![cards[2].uuid.clone(), "GPU-not-here".into()],
            index: vec![0, 9],
        };
        let selection = select_shared_cards(cards.clone(), &filter);
        let indexes = |list: &[GpuInfo]| list.iter().map(|c| c.index).collect::<Vec<_>>();
        assert_eq!(indexes(&selection.shared), [1, 3]);
        assert_eq!(indexes(&selection.excluded), [0, 2]);
        assert_eq!(selection.unknown, ["index 9", "UUID GPU-not-here"]);

        let everything = select_shared_cards(cards.clone(), &CardFilter::default());
        assert_eq!(everything.shared, cards);
        assert!(everything.excluded.is_empty() && everything.unknown.is_empty());
    }
}
