//! Scheduling policies: how nodes are chosen (`hami.io/node-scheduler-policy`)
//! and how cards are chosen on a node (`hami.io/gpu-scheduler-policy`), with
//! HAMi v2.10's vocabulary and meaning.
//!
//! A node policy is one name, `binpack` or `spread`. A GPU policy is a comma
//! list of names, read in order, as HAMi reads it:
//!
//! - **sort keys** `binpack` (fullest card first), `spread` (emptiest card
//!   first) and `numa` (cards grouped by NUMA node): the first key orders the
//!   cards, each next key breaks the ties of the ones before it (`binpack,numa`
//!   is binpack with NUMA grouping among equally full cards; `numa,binpack`
//!   groups by NUMA first). A key written twice counts once. A list without
//!   a sort key orders as `spread`, HAMi's default.
//! - **modifiers** `mutex` (only cards no container holds yet) and
//!   `topology-aware` (for a multi-card container the set of cards with the
//!   best pairwise link scores, `hami.io/node-nvidia-score`; for a one-card
//!   container the card least linked to the other free ones, keeping
//!   well-linked groups whole). Their position in the list does not matter.
//!
//! Names are trimmed and compared case-insensitively; an empty value, an
//! empty item or an unknown name is an error naming what to write instead.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How the scheduler picks among nodes that fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum NodePolicy {
    /// Prefer the node whose GPUs are already most used (fill nodes first).
    #[default]
    Binpack,
    /// Prefer the node whose GPUs are least used.
    Spread,
}

/// One ordering key of a GPU policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CardSortKey {
    /// Fullest card first (co-locate pods on one card).
    Binpack,
    /// Emptiest card first (keep pods apart).
    Spread,
    /// Cards of one NUMA node together, lowest NUMA node first.
    Numa,
}

impl CardSortKey {
    fn name(self) -> &'static str {
        match self {
            Self::Binpack => "binpack",
            Self::Spread => "spread",
            Self::Numa => "numa",
        }
    }
}

/// The most sort keys a policy can name (each key counts once).
pub const MAX_SORT_KEYS: usize = 3;

/// How the scheduler picks cards on a node: ordering keys in priority order
/// plus the `mutex` and `topology-aware` modifiers (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GpuPolicy {
    /// Sort keys as written, deduplicated; `None` past the last.
    sort_keys: [Option<CardSortKey>; MAX_SORT_KEYS],
    /// `mutex`: only cards no container holds yet.
    pub mutex: bool,
    /// `topology-aware`: choose card sets by pairwise link scores.
    pub topology_aware: bool,
}

impl GpuPolicy {
    /// `binpack`.
    pub const BINPACK: Self = Self::ordered_by(CardSortKey::Binpack);
    /// `spread` (the default, as in HAMi).
    pub const SPREAD: Self = Self::ordered_by(CardSortKey::Spread);
    /// `numa`.
    pub const NUMA: Self = Self::ordered_by(CardSortKey::Numa);
    /// `topology-aware` (spread order for ties, as in HAMi).
    pub const TOPOLOGY_AWARE: Self = Self {
        sort_keys: [None; MAX_SORT_KEYS],
        mutex: false,
        topology_aware: true,
    };
    /// `mutex` (spread order among idle cards, as in HAMi).
    pub const MUTEX: Self = Self {
        sort_keys: [None; MAX_SORT_KEYS],
        mutex: true,
        topology_aware: false,
    };

    const fn ordered_by(key: CardSortKey) -> Self {
        Self {
            sort_keys: [Some(key), None, None],
            mutex: false,
            topology_aware: false,
        }
    }

    /// The sort keys as written (possibly none).
    pub fn written_sort_keys(&self) -> impl Iterator<Item = CardSortKey> + '_ {
        self.sort_keys.iter().map_while(|k| *k)
    }

    /// The sort keys that order the cards: those written, or `spread` when
    /// none is (HAMi's fallback for a list of modifiers only).
    pub fn sort_keys(&self) -> impl Iterator<Item = CardSortKey> + '_ {
        let none_written = self.sort_keys[0].is_none();
        self.written_sort_keys()
            .chain(none_written.then_some(CardSortKey::Spread))
    }

    /// [`GpuPolicy::sort_keys`] as a fixed array (`None` past the last),
    /// for hot loops that compare cards many times per decision.
    pub fn sort_key_array(&self) -> [Option<CardSortKey>; MAX_SORT_KEYS] {
        if self.sort_keys[0].is_none() {
            let mut keys = [None; MAX_SORT_KEYS];
            keys[0] = Some(CardSortKey::Spread);
            keys
        } else {
            self.sort_keys
        }
    }

    /// The first ordering key (`spread` when none is written).
    pub fn primary(&self) -> CardSortKey {
        self.sort_keys[0].unwrap_or(CardSortKey::Spread)
    }

    /// Whether the policy orders by NUMA node at all.
    pub fn groups_by_numa(&self) -> bool {
        self.written_sort_keys().any(|k| k == CardSortKey::Numa)
    }

    fn push_sort_key(&mut self, key: CardSortKey) {
        if self.written_sort_keys().any(|k| k == key) {
            return;
        }
        if let Some(slot) = self.sort_keys.iter_mut().find(|k| k.is_none()) {
            *slot = Some(key);
        }
    }
}

impl Default for GpuPolicy {
    fn default() -> Self {
        Self::SPREAD
    }
}

/// A policy value that HAMi does not accept either.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A name that is not a policy.
    #[error("`{name}` in `{value}` is not a {what} policy; write {expected}")]
    UnknownName {
        /// The offending name.
        name: String,
        /// The whole value as written.
        value: String,
        /// `GPU` or `node`.
        what: &'static str,
        /// What may be written.
        expected: &'static str,
    },
    /// Nothing written, or an empty item in a list.
    #[error("`{value}` names no {what} policy (empty value or empty list item); write {expected}")]
    Empty {
        /// The whole value as written.
        value: String,
        /// `GPU` or `node`.
        what: &'static str,
        /// What may be written.
        expected: &'static str,
    },
}

const GPU_EXPECTED: &str = "one or more of binpack, spread, numa, mutex, topology-aware separated by commas (e.g. `binpack,numa`)";
const NODE_EXPECTED: &str =
    "binpack or spread (a node policy is one name; HAMi has no list form for it)";

impl FromStr for NodePolicy {
    type Err = PolicyError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim().to_ascii_lowercase().as_str() {
            "binpack" => Ok(Self::Binpack),
            "spread" => Ok(Self::Spread),
            "" => Err(PolicyError::Empty {
                value: value.to_owned(),
                what: "node",
                expected: NODE_EXPECTED,
            }),
            other => Err(PolicyError::UnknownName {
                name: other.to_owned(),
                value: value.to_owned(),
                what: "node",
                expected: NODE_EXPECTED,
            }),
        }
    }
}

impl FromStr for GpuPolicy {
    type Err = PolicyError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let mut policy = Self {
            sort_keys: [None; MAX_SORT_KEYS],
            mutex: false,
            topology_aware: false,
        };
        for item in value.split(',') {
            match item.trim().to_ascii_lowercase().as_str() {
                "binpack" => policy.push_sort_key(CardSortKey::Binpack),
                "spread" => policy.push_sort_key(CardSortKey::Spread),
                "numa" => policy.push_sort_key(CardSortKey::Numa),
                "mutex" => policy.mutex = true,
                "topology-aware" => policy.topology_aware = true,
                "" => {
                    return Err(PolicyError::Empty {
                        value: value.to_owned(),
                        what: "GPU",
                        expected: GPU_EXPECTED,
                    })
                }
                other => {
                    return Err(PolicyError::UnknownName {
                        name: other.to_owned(),
                        value: value.to_owned(),
                        what: "GPU",
                        expected: GPU_EXPECTED,
                    })
                }
            }
        }
        Ok(policy)
    }
}

impl fmt::Display for NodePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Binpack => "binpack",
            Self::Spread => "spread",
        })
    }
}

impl fmt::Display for GpuPolicy {
    /// The canonical list: sort keys in order, then `mutex`, then
    /// `topology-aware`; parsing it gives the same policy back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = self
            .written_sort_keys()
            .map(CardSortKey::name)
            .chain(self.mutex.then_some("mutex"))
            .chain(self.topology_aware.then_some("topology-aware"));
        for (position, name) in names.enumerate() {
            if position > 0 {
                f.write_str(",")?;
            }
            f.write_str(name)?;
        }
        Ok(())
    }
}

impl Serialize for GpuPolicy {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GpuPolicy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_case_insensitively_and_rejects_unknown() {
        assert_eq!("Binpack".parse::<GpuPolicy>(), Ok(GpuPolicy::BINPACK));
        assert_eq!(
            "topology-aware".parse::<GpuPolicy>(),
            Ok(GpuPolicy::TOPOLOGY_AWARE)
        );
        assert_eq!(" spread".parse::<NodePolicy>(), Ok(NodePolicy::Spread));
        let err = "fast".parse::<NodePolicy>().expect_err("unknown");
        assert!(err.to_string().contains("binpack or spread"), "{err}");
    }

    #[test]
    fn every_name_hami_accepts_parses() {
        for (value, keys, mutex, topology) in [
            ("binpack", vec![CardSortKey::Binpack], false, false),
            ("spread", vec![CardSortKey::Spread], false, false),
            ("numa", vec![CardSortKey::Numa], false, false),
            ("mutex", vec![], true, false),
            ("topology-aware", vec![], false, true),
            (
                "binpack,numa",
                vec![CardSortKey::Binpack, CardSortKey::Numa],
                false,
                false,
            ),
            (
                "numa, spread",
                vec![CardSortKey::Numa, CardSortKey::Spread],
                false,
                false,
            ),
            ("mutex,topology-aware", vec![], true, true),
            (
                "binpack,spread,numa,binpack",
                vec![CardSortKey::Binpack, CardSortKey::Spread, CardSortKey::Numa],
                false,
                false,
            ),
            (
                "topology-aware,binpack",
                vec![CardSortKey::Binpack],
                false,
                true,
            ),
        ] {
            let policy: GpuPolicy = value.parse().expect(value);
            assert_eq!(
                policy.written_sort_keys().collect::<Vec<_>>(),
                keys,
                "{value}"
            );
            assert_eq!(policy.mutex, mutex, "{value}");
            assert_eq!(policy.topology_aware, topology, "{value}");
        }
    }

    #[test]
    fn modifiers_alone_order_as_spread() {
        let policy: GpuPolicy = "mutex".parse().expect("mutex");
        assert_eq!(
            policy.sort_keys().collect::<Vec<_>>(),
            [CardSortKey::Spread]
        );
        assert_eq!(policy.primary(), CardSortKey::Spread);
        let chained: GpuPolicy = "numa,binpack".parse().expect("chain");
        assert_eq!(chained.primary(), CardSortKey::Numa);
        assert!(chained.groups_by_numa());
        assert!(!GpuPolicy::BINPACK.groups_by_numa());
    }

    #[test]
    fn values_hami_rejects_are_errors_naming_the_bad_part() {
        for (value, needle) in [
            ("binpack,fast", "`fast`"),
            ("", "names no GPU policy"),
            ("  ", "names no GPU policy"),
            ("binpack,", "names no GPU policy"),
            ("numa-bind", "`numa-bind`"),
        ] {
            let error = value.parse::<GpuPolicy>().expect_err(value);
            assert!(error.to_string().contains(needle), "{value}: {error}");
            assert!(error.to_string().contains("binpack,numa"), "{error}");
        }
        let error = "binpack,spread".parse::<NodePolicy>().expect_err("list");
        assert!(error.to_string().contains("one name"), "{error}");
        assert!("topology-aware".parse::<NodePolicy>().is_err());
    }

    #[test]
    fn config_files_accept_chains() {
        #[derive(Deserialize, Serialize)]
        struct Holder {
            policy: GpuPolicy,
        }
        let holder: Holder = serde_json::from_str(r#"{"policy":"binpack,numa"}"#).expect("parses");
        assert_eq!(holder.policy.primary(), CardSortKey::Binpack);
        assert_eq!(
            serde_json::to_string(&holder).expect("serializes"),
            r#"{"policy":"binpack,numa"}"#
        );
        assert!(serde_json::from_str::<Holder>(r#"{"policy":"nope"}"#).is_err());
    }

    fn name() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["binpack", "spread", "numa", "mutex", "topology-aware"])
    }

    proptest! {
        #[test]
        fn display_round_trips(names in proptest::collection::vec(name(), 1..7)) {
            let policy: GpuPolicy = names.join(",").parse().expect("known names");
            let again: GpuPolicy = policy.to_string().parse().expect("canonical form parses");
            prop_assert_eq!(again, policy);
        }

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,40}") {
            let _ = text.parse::<GpuPolicy>();
            let _ = text.parse::<NodePolicy>();
        }
    }
}
