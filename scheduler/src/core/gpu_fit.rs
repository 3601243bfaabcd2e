//! Choosing cards on one node for every container of a pod: app containers
//! are placed one after another (each sees what the earlier ones took),
//! init containers each against the node as it is (they run before the app
//! containers, one at a time). Cards are ordered by the GPU policy; NUMA
//! binding keeps a container's cards on one NUMA node.

use tessera_api::policy::GpuPolicy;
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
    let numa_matters =
        pod.policy.numa_bind || (pod.gpu_policy == GpuPolicy::TopologyAware && wanted > 1);
    if wanted == 1 && !numa_matters {
        // The common case: one card; no need to order the rest.
        let best = scratch.candidates.iter().copied().reduce(|a, b| {
            if prefer(cards, pod.gpu_policy, &b, &a) {
                b
            } else {
                a
            }
        });
        scratch.candidates.clear();
        scratch.candidates.extend(best);
    } else {
        order_candidates(cards, pod.gpu_policy, &mut scratch.candidates);
    }
    if numa_matters
        && !keep_one_numa_node(cards, wanted, &mut scratch.candidates)
        && pod.policy.numa_bind
    {
        scratch.rejections.clear();
        scratch.rejections.push(CardRejection::NumaMismatch);
        return Err(misfit(need, request, &pod.policy, cards.len(), scratch));
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

/// Whether `a` comes before `b`: binpack fullest first, spread emptiest
/// first, ties by card index so decisions are deterministic.
fn prefer(cards: &[CardState], policy: GpuPolicy, a: &Candidate, b: &Candidate) -> bool {
    order(cards, policy, a, b) == std::cmp::Ordering::Less
}

fn order(
    cards: &[CardState],
    policy: GpuPolicy,
    a: &Candidate,
    b: &Candidate,
) -> std::cmp::Ordering {
    let by_fullness = match policy {
        GpuPolicy::Binpack | GpuPolicy::TopologyAware => b.fullness.total_cmp(&a.fullness),
        GpuPolicy::Spread => a.fullness.total_cmp(&b.fullness),
    };
    by_fullness.then(cards[a.card].device.index.cmp(&cards[b.card].device.index))
}

/// Orders candidate cards by the GPU policy.
fn order_candidates(cards: &[CardState], policy: GpuPolicy, candidates: &mut [Candidate]) {
    candidates.sort_by(|a, b| order(cards, policy, a, b));
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
