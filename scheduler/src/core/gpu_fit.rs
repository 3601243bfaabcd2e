//! Choosing cards on one node for every container of a pod: app containers
//! are placed one after another (each sees what the earlier ones took),
//! init containers each against the node as it is (they run before the app
//! containers, one at a time). Cards are ordered by the GPU policy's sort
//! keys (`binpack`, `spread`, `numa`, chained as written; card index last);
//! `mutex` keeps only idle cards; NUMA binding keeps a container's cards on
//! one NUMA node; `topology-aware` picks, among the cards that fit, the set
//! with the best pairwise link scores (one card: the one least linked to the
//! rest), the order breaking ties.

use tessera_api::policy::{CardSortKey, MAX_SORT_KEYS};
use tessera_api::request::{PodGpuPolicy, ResolvedGpuRequest};

use super::cards::{CardRejection, CardState, CardUsage};
use super::requirements::{ContainerNeed, PodRequirements};

/// Per-decision context and reusable buffers, so the filter loop does not
/// allocate per node.
#[derive(Debug, Default)]
pub struct FitScratch {
    usage: Vec<CardUsage>,
    candidates: Vec<Candidate>,
    rejections: Vec<CardRejection>,
    /// Whether the pod's type lists allow each type of the cluster's table.
    type_allowed: Vec<bool>,
    /// Build reasons for misfits (off on the first pass: most nodes that
    /// fail do not need words unless no node fits).
    explain: bool,
    /// How much fuller the picked cards became (sum of card fullness).
    fullness_added: f64,
}

impl FitScratch {
    /// A scratch for one decision over a cluster whose lowercased card types
    /// are `card_types`.
    pub fn for_decision(card_types: &[String], policy: &PodGpuPolicy, explain: bool) -> Self {
        let type_allowed = card_types
            .iter()
            .map(|t| {
                (policy.use_types.is_empty()
                    || policy.use_types.iter().any(|u| t.contains(u.as_str())))
                    && !policy.avoid_types.iter().any(|u| t.contains(u.as_str()))
            })
            .collect();
        Self {
            type_allowed,
            explain,
            ..Self::default()
        }
    }
}

/// A card that can take the container: index, MiB it would take, and its
/// fullness before (the ordering key).
#[derive(Debug, Clone, Copy)]
struct Candidate {
    card: usize,
    memory_mib: u64,
    fullness: f64,
}

/// A card picked for a container: index into the node's cards, MiB, cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CardPick {
    /// Index into the node's card list.
    pub card: usize,
    /// MiB given.
    pub memory_mib: u64,
    /// Cores given.
    pub cores: u32,
}

/// Why a pod's GPU containers do not fit on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuMisfit {
    /// The reason in words, the same for every node failing the same way
    /// (so reasons can be counted across nodes).
    pub reason: String,
}

/// Picks for every container: `None` for containers without GPUs.
pub type PodPicks = Vec<Option<Vec<CardPick>>>;

/// The result of fitting a pod on a node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeFit {
    /// Node fullness after placement (higher = fuller), for node scoring.
    pub fullness_after: f64,
    /// Picks for app containers (`Some` only when `with_picks`).
    pub containers: Option<PodPicks>,
    /// Picks for init containers (`Some` only when `with_picks`).
    pub init_containers: Option<PodPicks>,
}

/// Fits the pod's GPU containers on `cards`. With `with_picks` false only the
/// score is computed (no allocation in the common case).
pub fn fit_pod(
    cards: &[CardState],
    fullness_sum: f64,
    pod: &PodRequirements,
    scratch: &mut FitScratch,
    with_picks: bool,
) -> Result<NodeFit, GpuMisfit> {
    if cards.is_empty() {
        return Err(GpuMisfit {
            reason: "no GPUs registered on the node".to_owned(),
        });
    }
    let mut init_picks = with_picks.then(Vec::new);
    for need in &pod.init_containers {
        // Each init container is placed alone against the node as it is.
        let picks = fit_container(cards, need, pod, scratch, with_picks, true)?;
        if let Some(all) = init_picks.as_mut() {
            all.push(picks);
        }
    }
    // With one GPU container nothing accumulates: read the cards' usage in
    // place instead of copying it.
    let alone = pod.containers.iter().filter(|c| c.gpu.is_some()).count() <= 1;
    if !alone {
        scratch.usage.clear();
        scratch.usage.extend(cards.iter().map(|c| c.usage));
    }
    scratch.fullness_added = 0.0;
    let mut app_picks = with_picks.then(Vec::new);
    for need in &pod.containers {
        let picks = fit_container(cards, need, pod, scratch, with_picks, alone)?;
        if let Some(all) = app_picks.as_mut() {
            all.push(picks);
        }
    }
    let fullness_after = (fullness_sum + scratch.fullness_added) / cards.len() as f64;
    Ok(NodeFit {
        fullness_after,
        containers: app_picks,
        init_containers: init_picks,
    })
}

/// Places one container. With `alone` it is judged against the cards'
/// own usage; otherwise against `scratch.usage`, which it updates so the
/// next container of the pod sees it.
fn fit_container(
    cards: &[CardState],
    need: &ContainerNeed,
    pod: &PodRequirements,
    scratch: &mut FitScratch,
    with_picks: bool,
    alone: bool,
) -> Result<Option<Vec<CardPick>>, GpuMisfit> {
    let Some(request) = need.gpu.as_ref() else {
        return Ok(None);
    };
    let wanted = request.count as usize;
    scratch.candidates.clear();
    scratch.rejections.clear();
    for (index, card) in cards.iter().enumerate() {
        let usage = if alone {
            card.usage
        } else {
            scratch.usage[index]
        };
        match card.fits(
            usage,
            request,
            &pod.policy,
            scratch
                .type_allowed
                .get(card.type_id)
                .copied()
                .unwrap_or(true),
            pod.gpu_policy.mutex,
        ) {
            Ok(memory) => scratch.candidates.push(Candidate {
                card: index,
                memory_mib: memory,
                fullness: card.fullness(usage),
            }),
            Err(rejection) => scratch.rejections.push(rejection),
        }
    }
    if scratch.candidates.len() < wanted {
        return Err(misfit(need, request, &pod.policy, cards.len(), scratch));
    }
    let keys = pod.gpu_policy.sort_key_array();
    let numa_bind = pod.policy.numa_bind;
    let by_topology = pod.gpu_policy.topology_aware
        && scratch.candidates.len() > wanted
        && cards.iter().any(CardState::has_link_scores);
    if wanted == 1 && !numa_bind && !by_topology {
        // The common case: one card; no need to order the rest.
        let best = scratch.candidates.iter().copied().reduce(|a, b| {
            if prefer(cards, &keys, &b, &a) {
                b
            } else {
                a
            }
        });
        scratch.candidates.clear();
        scratch.candidates.extend(best);
    } else {
        order_candidates(cards, &keys, &mut scratch.candidates);
    }
    if numa_bind && !keep_one_numa_node(cards, wanted, &mut scratch.candidates) {
        scratch.rejections.clear();
        scratch.rejections.push(CardRejection::NumaMismatch);
        return Err(misfit(need, request, &pod.policy, cards.len(), scratch));
    }
    if by_topology && scratch.candidates.len() > wanted {
        choose_by_link_scores(cards, wanted, &mut scratch.candidates);
    }
    let mut picks = with_picks.then(|| Vec::with_capacity(wanted));
    for candidate in scratch.candidates.iter().take(wanted) {
        let card = &cards[candidate.card];
        let after = if alone {
            let mut usage = card.usage;
            usage.add(candidate.memory_mib, request.cores);
            usage
        } else {
            let usage = &mut scratch.usage[candidate.card];
            usage.add(candidate.memory_mib, request.cores);
            *usage
        };
        scratch.fullness_added += card.fullness(after) - candidate.fullness;
        if let Some(picks) = picks.as_mut() {
            picks.push(CardPick {
                card: candidate.card,
                memory_mib: candidate.memory_mib,
                cores: request.cores,
            });
        }
    }
    Ok(picks)
}

/// Whether `a` comes before `b` in the policy's order.
fn prefer(cards: &[CardState], keys: &SortKeys, a: &Candidate, b: &Candidate) -> bool {
    order(cards, keys, a, b) == std::cmp::Ordering::Less
}

/// The GPU policy's sort keys (`GpuPolicy::sort_key_array`), read once
/// per container rather than per comparison.
type SortKeys = [Option<CardSortKey>; MAX_SORT_KEYS];

/// The policy's order: each sort key in turn (binpack fullest first, spread
/// emptiest first, numa lowest NUMA node first), then card index so
/// decisions are deterministic.
fn order(cards: &[CardState], keys: &SortKeys, a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    let (card_a, card_b) = (&cards[a.card].device, &cards[b.card].device);
    for key in keys.iter().flatten() {
        let ordering = match key {
            CardSortKey::Binpack => b.fullness.total_cmp(&a.fullness),
            CardSortKey::Spread => a.fullness.total_cmp(&b.fullness),
            CardSortKey::Numa => card_a.numa.cmp(&card_b.numa),
        };
        if ordering.is_ne() {
            return ordering;
        }
    }
    card_a.index.cmp(&card_b.index)
}

/// Orders candidate cards by the GPU policy.
fn order_candidates(cards: &[CardState], keys: &SortKeys, candidates: &mut [Candidate]) {
    candidates.sort_by(|a, b| order(cards, keys, a, b));
}

/// The most card sets the exhaustive search of [`choose_by_link_scores`]
/// scores per container and node (every 8-card node is far below it: at
/// most 70 sets); past it (e.g. 8 of 16 cards, 12870 sets) a greedy choice
/// keeps the filter pass cheap across many nodes.
const MAX_CARD_SETS: u64 = 5_000;

/// Moves the cards `topology-aware` picks to the front of `candidates`
/// (which are in policy order, so the first best wins ties), as HAMi does:
/// for one card, the card whose link scores toward the other candidates sum
/// lowest (it keeps well-linked cards together for later multi-card pods);
/// for several, the set whose pairwise link scores sum highest.
fn choose_by_link_scores(cards: &[CardState], wanted: usize, candidates: &mut Vec<Candidate>) {
    let positions: Vec<usize> = candidates.iter().map(|c| c.card).collect();
    let pair = |a: usize, b: usize| u64::from(cards[positions[a]].link_score(positions[b]));
    let chosen: Vec<usize> = if wanted == 1 {
        let total = |a: usize| {
            (0..positions.len())
                .filter(|&b| b != a)
                .map(|b| pair(a, b))
                .sum::<u64>()
        };
        let worst = (0..positions.len())
            .min_by_key(|&a| (total(a), a))
            .unwrap_or(0);
        vec![worst]
    } else if card_sets(positions.len(), wanted) <= MAX_CARD_SETS {
        best_card_set(positions.len(), wanted, &pair)
    } else {
        greedy_card_set(positions.len(), wanted, &pair)
    };
    let mut reordered: Vec<Candidate> = chosen.iter().map(|&i| candidates[i]).collect();
    reordered.extend(
        candidates
            .iter()
            .enumerate()
            .filter(|(i, _)| !chosen.contains(i))
            .map(|(_, c)| *c),
    );
    *candidates = reordered;
}

/// `n` choose `k`, saturating.
fn card_sets(n: usize, k: usize) -> u64 {
    let k = k.min(n - k.min(n));
    (0..k).fold(1u64, |acc, i| {
        acc.saturating_mul((n - i) as u64) / (i as u64 + 1)
    })
}

/// The `k`-subset of `0..n` with the highest sum of pairwise scores; the
/// first in lexicographic order among equals.
fn best_card_set(n: usize, k: usize, pair: &dyn Fn(usize, usize) -> u64) -> Vec<usize> {
    let mut current: Vec<usize> = (0..k).collect();
    let mut best = current.clone();
    let mut best_score = None;
    loop {
        let score: u64 = (0..k)
            .flat_map(|i| (i + 1..k).map(move |j| (i, j)))
            .map(|(i, j)| pair(current[i], current[j]))
            .sum();
        if best_score.is_none_or(|b| score > b) {
            best_score = Some(score);
            best.clone_from(&current);
        }
        // Next combination in lexicographic order.
        let Some(i) = (0..k).rev().find(|&i| current[i] < n - k + i) else {
            return best;
        };
        current[i] += 1;
        for j in i + 1..k {
            current[j] = current[j - 1] + 1;
        }
    }
}

/// A good `k`-subset without trying them all: the best-linked pair, then
/// each time the card best linked to those chosen.
fn greedy_card_set(n: usize, k: usize, pair: &dyn Fn(usize, usize) -> u64) -> Vec<usize> {
    let mut chosen = best_card_set(n, 2, pair);
    while chosen.len() < k {
        let next = (0..n)
            .filter(|c| !chosen.contains(c))
            .max_by_key(|&c| {
                let linked: u64 = chosen.iter().map(|&d| pair(d, c)).sum();
                (linked, std::cmp::Reverse(c))
            })
            .unwrap_or(0);
        chosen.push(next);
    }
    chosen.sort_unstable();
    chosen
}

/// Keeps, in order, the candidates of the first NUMA node (in candidate
/// order) that has `wanted` of them. Returns false when none has.
fn keep_one_numa_node(cards: &[CardState], wanted: usize, candidates: &mut Vec<Candidate>) -> bool {
    let chosen = candidates
        .iter()
        .map(|c| cards[c.card].device.numa)
        .find(|numa| {
            candidates
                .iter()
                .filter(|c| cards[c.card].device.numa == *numa)
                .count()
                >= wanted
        });
    match chosen {
        Some(numa) => {
            candidates.retain(|c| cards[c.card].device.numa == numa);
            true
        }
        None => false,
    }
}

fn misfit(
    need: &ContainerNeed,
    request: &ResolvedGpuRequest,
    policy: &PodGpuPolicy,
    total: usize,
    scratch: &FitScratch,
) -> GpuMisfit {
    if !scratch.explain {
        return GpuMisfit {
            reason: String::new(),
        };
    }
    let mut reasons: Vec<CardRejection> = scratch.rejections.clone();
    reasons.sort();
    reasons.dedup();
    let describe = |r: &CardRejection| match r {
        CardRejection::TypeNotAllowed if !policy.use_types.is_empty() => {
            format!(
                "card type not in use-gputype [{}]",
                policy.use_types.join(",")
            )
        }
        CardRejection::TypeNotAllowed => format!(
            "card type in nouse-gputype [{}]",
            policy.avoid_types.join(",")
        ),
        other => other.to_string(),
    };
    let reason = match reasons.as_slice() {
        [only] if scratch.candidates.is_empty() && scratch.rejections.len() == total => {
            format!("{} on every card", describe(only))
        }
        [CardRejection::NumaMismatch] => format!(
            "{} for container `{}` ({} cards)",
            describe(&CardRejection::NumaMismatch),
            need.name,
            request.count
        ),
        _ => format!(
            "container `{}` needs {} card(s), {} fit ({})",
            need.name,
            request.count,
            scratch.candidates.len(),
            reasons.iter().map(describe).collect::<Vec<_>>().join(", ")
        ),
    };
    GpuMisfit { reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn score_of(matrix: &[Vec<u64>], set: &[usize]) -> u64 {
        set.iter()
            .enumerate()
            .flat_map(|(i, &a)| set[i + 1..].iter().map(move |&b| matrix[a][b]))
            .sum()
    }

    /// Every `k`-subset of `0..n`, by bitmask.
    fn all_sets(n: usize, k: usize) -> Vec<Vec<usize>> {
        (0u32..1 << n)
            .filter(|mask| mask.count_ones() as usize == k)
            .map(|mask| (0..n).filter(|i| mask & (1 << i) != 0).collect())
            .collect()
    }

    #[test]
    fn card_sets_counts_combinations() {
        assert_eq!(card_sets(8, 2), 28);
        assert_eq!(card_sets(8, 4), 70);
        assert_eq!(card_sets(16, 8), 12870);
        assert_eq!(card_sets(5, 5), 1);
        assert!(card_sets(64, 32) > MAX_CARD_SETS);
        assert!(card_sets(8, 4) <= MAX_CARD_SETS);
    }

    proptest! {
        #[test]
        fn best_card_set_is_the_best_and_first_among_equals(
            n in 2usize..9,
            k_seed in 0usize..8,
            values in proptest::collection::vec(0u64..4, 81),
        ) {
            let k = 2 + k_seed % (n - 1);
            let matrix: Vec<Vec<u64>> = (0..n)
                .map(|a| (0..n).map(|b| values[a.min(b) * 9 + a.max(b)] * 100).collect())
                .collect();
            let pair = |a: usize, b: usize| matrix[a][b];
            let chosen = best_card_set(n, k, &pair);
            prop_assert_eq!(chosen.len(), k);
            let best = all_sets(n, k).iter().map(|s| score_of(&matrix, s)).max().expect("sets");
            prop_assert_eq!(score_of(&matrix, &chosen), best);
            // Lexicographically first among the best (policy order wins ties).
            let first = all_sets(n, k)
                .into_iter()
                .filter(|s| score_of(&matrix, s) == best)
                .min()
                .expect("one");
            prop_assert_eq!(chosen, first);
        }

        #[test]
        fn greedy_card_set_gives_distinct_cards(n in 3usize..12, k_seed in 0usize..10) {
            let k = 2 + k_seed % (n - 2);
            let pair = |a: usize, b: usize| ((a * 7 + b * 3) % 5) as u64;
            let chosen = greedy_card_set(n, k, &pair);
            let mut unique = chosen.clone();
            unique.dedup();
            prop_assert_eq!(unique.len(), k);
            prop_assert!(chosen.iter().all(|&c| c < n));
        }
    }
}
