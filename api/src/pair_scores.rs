//! How well the cards of a node are linked to each other, as HAMi publishes
//! it on the `hami.io/node-nvidia-score` node annotation: a JSON array with
//! one entry per card, `{"uuid": "GPU-…", "score": {"GPU-…": 240, …}}`, the
//! score of the card toward every other card of the node. The node agent
//! computes it from NVML's link facts ([`LinkFacts::score`]: HAMi's values,
//! the PCIe path's weight plus 100 per NVLink), encodes it
//! ([`encode_pair_scores`]); the scheduler decodes it ([`decode_pair_scores`])
//! for the `topology-aware` GPU policy. Higher means more bandwidth.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// The closest common ancestor of two cards in the PCIe tree (NVML's
/// topology levels), nearest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PcieLink {
    /// Both on one board (NVML `internal`, e.g. a dual-GPU card).
    SameBoard,
    /// Behind one PCIe switch (`single`).
    SingleSwitch,
    /// Behind several PCIe switches, no host bridge between (`multiple`).
    MultiSwitch,
    /// Behind one host bridge (`hostbridge`).
    HostBridge,
    /// On one NUMA node / CPU socket (`node`, formerly `cpu`).
    SameCpu,
    /// Across CPU sockets (`system`).
    CrossCpu,
}

impl PcieLink {
    /// HAMi's score for the path (60 on one board down to 10 across sockets).
    pub fn score(self) -> u32 {
        match self {
            Self::SameBoard => 60,
            Self::SingleSwitch => 50,
            Self::MultiSwitch => 40,
            Self::HostBridge => 30,
            Self::SameCpu => 20,
            Self::CrossCpu => 10,
        }
    }

    /// The name the discovery report prints.
    pub fn name(self) -> &'static str {
        match self {
            Self::SameBoard => "internal",
            Self::SingleSwitch => "single-switch",
            Self::MultiSwitch => "multiple-switches",
            Self::HostBridge => "host-bridge",
            Self::SameCpu => "numa-node",
            Self::CrossCpu => "system",
        }
    }
}

/// The most NVLinks HAMi scores between two cards; more reads as none, as in
/// HAMi (no current GPU has more than 18).
pub const MAX_SCORED_NVLINKS: u32 = 18;

/// Score of one NVLink between two cards.
pub const NVLINK_SCORE: u32 = 100;

/// What NVML says about how two cards reach each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LinkFacts {
    /// Their PCIe path, when NVML reports one.
    pub pcie: Option<PcieLink>,
    /// Active NVLinks between them (directly, or through NVSwitches: the
    /// smaller of the two cards' switch link counts).
    pub nvlinks: u32,
}

impl LinkFacts {
    /// HAMi's pair score: the PCIe path's score plus 100 per NVLink.
    pub fn score(&self) -> u32 {
        let nvlink = if self.nvlinks <= MAX_SCORED_NVLINKS {
            self.nvlinks * NVLINK_SCORE
        } else {
            0
        };
        self.pcie.map_or(0, PcieLink::score) + nvlink
    }
}

/// One card's scores toward the other cards of its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardPairScores {
    /// The card's UUID.
    pub uuid: String,
    /// Score toward each other card, by UUID.
    #[serde(rename = "score")]
    pub scores: BTreeMap<String, u32>,
}

/// The score annotation does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairScoreError {
    /// Not a JSON array of `{"uuid", "score"}` objects with whole, non-negative scores.
    #[error("not a JSON array of {{\"uuid\": \"GPU-…\", \"score\": {{\"GPU-…\": <whole number ≥ 0>}}}} entries ({reason}); the node agent rewrites it, or delete the annotation to schedule without link scores")]
    Malformed {
        /// What the JSON parser said.
        reason: String,
    },
    /// An entry without a UUID.
    #[error("entry {position} has an empty uuid; every entry names its card")]
    EmptyUuid {
        /// 0-based position in the array.
        position: usize,
    },
    /// Two entries for one card.
    #[error("card {uuid} has two entries; each card is listed once")]
    DuplicateCard {
        /// The repeated UUID.
        uuid: String,
    },
}

/// Builds every card's scores from the facts of each unordered pair:
/// `link(a, b)` for card positions `a < b`, `None` when the pair is not
/// linked in a way NVML reports (HAMi then leaves a score of 0, which this
/// writes out so every pair is listed).
pub fn scores_from_links(
    uuids: &[String],
    mut link: impl FnMut(usize, usize) -> Option<LinkFacts>,
) -> Vec<CardPairScores> {
    let mut all: Vec<CardPairScores> = uuids
        .iter()
        .map(|uuid| CardPairScores {
            uuid: uuid.clone(),
            scores: BTreeMap::new(),
        })
        .collect();
    for a in 0..uuids.len() {
        for b in a + 1..uuids.len() {
            let score = link(a, b).map_or(0, |facts| facts.score());
            all[a].scores.insert(uuids[b].clone(), score);
            all[b].scores.insert(uuids[a].clone(), score);
        }
    }
    all
}

/// Encodes the scores as the annotation value.
pub fn encode_pair_scores(cards: &[CardPairScores]) -> String {
    // Strings and integers only: serialising cannot fail.
    serde_json::to_string(cards).unwrap_or_else(|_| "[]".to_owned())
}

/// Decodes the annotation value.
pub fn decode_pair_scores(value: &str) -> Result<Vec<CardPairScores>, PairScoreError> {
    let cards: Vec<CardPairScores> =
        serde_json::from_str(value).map_err(|e| PairScoreError::Malformed {
            reason: e.to_string(),
        })?;
    let mut seen = BTreeSet::new();
    for (position, card) in cards.iter().enumerate() {
        if card.uuid.trim().is_empty() {
            return Err(PairScoreError::EmptyUuid { position });
        }
        if !seen.insert(card.uuid.as_str()) {
            return Err(PairScoreError::DuplicateCard {
                uuid: card.uuid.clone(),
            });
        }
    }
    Ok(cards)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn scores_are_hamis() {
        let pcie_only = LinkFacts {
            pcie: Some(PcieLink::CrossCpu),
            nvlinks: 0,
        };
        assert_eq!(pcie_only.score(), 10);
        let nvlinked = LinkFacts {
            pcie: Some(PcieLink::SameCpu),
            nvlinks: 4,
        };
        assert_eq!(nvlinked.score(), 420);
        let switch = LinkFacts {
            pcie: Some(PcieLink::SingleSwitch),
            nvlinks: 18,
        };
        assert_eq!(switch.score(), 1850);
        let unscored = LinkFacts {
            pcie: None,
            nvlinks: 19,
        };
        assert_eq!(unscored.score(), 0);
        assert_eq!(PcieLink::SameBoard.score(), 60);
        assert_eq!(PcieLink::MultiSwitch.score(), 40);
        assert_eq!(PcieLink::HostBridge.score(), 30);
    }

    #[test]
    fn hami_written_annotation_decodes() {
        let value = r#"[{"uuid":"GPU-0","score":{"GPU-1":620,"GPU-2":20}},{"uuid":"GPU-1","score":{"GPU-0":620,"GPU-2":20}},{"uuid":"GPU-2","score":{"GPU-0":20,"GPU-1":20}}]"#;
        let cards = decode_pair_scores(value).expect("decodes");
        assert_eq!(cards.len(), 3);
        assert_eq!(cards[0].scores["GPU-1"], 620);
        assert_eq!(encode_pair_scores(&cards), value);
    }

    #[test]
    fn corrupt_values_are_errors_that_say_what_to_do() {
        for (value, needle) in [
            ("", "not a JSON array"),
            ("{}", "not a JSON array"),
            (r#"[{"uuid":"a","score":{"b":-3}}]"#, "not a JSON array"),
            (r#"[{"uuid":"a","score":{"b":1.5}}]"#, "not a JSON array"),
            (r#"[{"uuid":"a"}]"#, "not a JSON array"),
            (r#"[{"uuid":"","score":{}}]"#, "entry 0 has an empty uuid"),
            (
                r#"[{"uuid":"a","score":{}},{"uuid":"a","score":{}}]"#,
                "card a has two entries",
            ),
        ] {
            let error = decode_pair_scores(value).expect_err(value);
            assert!(error.to_string().contains(needle), "{value}: {error}");
        }
        let error = decode_pair_scores("[").expect_err("truncated");
        assert!(
            error.to_string().contains("delete the annotation"),
            "{error}"
        );
    }

    #[test]
    fn scores_from_links_lists_every_pair_both_ways() {
        let uuids: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let cards = scores_from_links(&uuids, |a, b| {
            (a == 0 && b == 1).then_some(LinkFacts {
                pcie: Some(PcieLink::HostBridge),
                nvlinks: 2,
            })
        });
        assert_eq!(cards[0].scores["b"], 230);
        assert_eq!(cards[1].scores["a"], 230);
        assert_eq!(cards[2].scores["a"], 0);
        assert_eq!(cards[2].scores.len(), 2);
    }

    fn cards_strategy() -> impl Strategy<Value = Vec<CardPairScores>> {
        proptest::collection::btree_map(
            "GPU-[a-f0-9]{1,8}",
            proptest::collection::btree_map("GPU-[a-f0-9]{1,8}", 0u32..5000, 0..8),
            0..8,
        )
        .prop_map(|cards| {
            cards
                .into_iter()
                .map(|(uuid, scores)| CardPairScores { uuid, scores })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn round_trip(cards in cards_strategy()) {
            let decoded = decode_pair_scores(&encode_pair_scores(&cards)).expect("our encoding decodes");
            prop_assert_eq!(decoded, cards);
        }

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC*") {
            let _ = decode_pair_scores(&text);
        }

        #[test]
        fn scores_from_links_is_symmetric(n in 0usize..8, seed in 0u32..1000) {
            let uuids: Vec<String> = (0..n).map(|i| format!("GPU-{i}")).collect();
            let cards = scores_from_links(&uuids, |a, b| Some(LinkFacts {
                pcie: Some(PcieLink::SameCpu),
                nvlinks: (seed + a as u32 * 7 + b as u32) % 20,
            }));
            for a in &cards {
                prop_assert_eq!(a.scores.len(), n - 1);
                for (other, score) in &a.scores {
                    let back = cards.iter().find(|c| &c.uuid == other).expect("listed");
                    prop_assert_eq!(back.scores[&a.uuid], *score);
                }
            }
        }
    }
}
