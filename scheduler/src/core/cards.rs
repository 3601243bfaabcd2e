//! One card's state on a node (its inventory entry, its link scores toward
//! the node's other cards, plus what is charged to it) and the per-card fit
//! check with the reason a card is refused.

use std::fmt;
use std::sync::Arc;

use tessera_api::inventory::GpuDevice;
use tessera_api::request::{PodGpuPolicy, ResolvedGpuRequest};

/// What is charged to a card.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CardUsage {
    /// MiB charged.
    pub memory_mib: u64,
    /// Percent of compute charged.
    pub cores: u32,
    /// Containers sharing the card.
    pub slots: u32,
}

impl CardUsage {
    /// Adds a container's share.
    pub fn add(&mut self, memory_mib: u64, cores: u32) {
        self.memory_mib += memory_mib;
        self.cores += cores;
        self.slots += 1;
    }
}

/// A card of a node with its charges.
#[derive(Debug, Clone)]
pub struct CardState {
    /// The inventory entry.
    pub device: GpuDevice,
    /// Index of the card's type in the cluster's type table, so type
    /// filters are evaluated once per type and decision, not per card.
    pub type_id: usize,
    /// What pods are charged on it.
    pub usage: CardUsage,
    /// 1 / memory, 1 / cores, 1 / split count: fullness without divisions.
    inverse_capacity: [f64; 3],
    /// Link score toward each card of the node, by position in the node's
    /// card list (`hami.io/node-nvidia-score`); empty when the node
    /// publishes none.
    link_scores: Arc<[u32]>,
}

/// Why a card cannot take a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CardRejection {
    /// The card reported a fatal error.
    Unhealthy,
    /// Its type is not in use-gputype / is in nouse-gputype.
    TypeNotAllowed,
    /// Its UUID is not in use-gpuuuid / is in nouse-gpuuuid.
    UuidNotAllowed,
    /// Its split count is used up.
    NoSharingSlot,
    /// Not enough free memory.
    Memory,
    /// Not enough free compute.
    Cores,
    /// The container wants the card exclusively but it is shared.
    NotExclusive,
    /// Another container holds the card exclusively.
    HeldExclusively,
    /// Not on the NUMA node the other cards of the container are on.
    NumaMismatch,
    /// The `mutex` GPU policy wants a card no container holds yet.
    InUseMutex,
    /// The card's mode is not one `nvidia.com/vgpu-mode` names.
    ModeNotAllowed,
}

impl fmt::Display for CardRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unhealthy => "card unhealthy",
            Self::TypeNotAllowed => "card type not allowed by use-gputype/nouse-gputype",
            Self::UuidNotAllowed => "card UUID not allowed by use-gpuuuid/nouse-gpuuuid",
            Self::NoSharingSlot => "card shared by its split count already",
            Self::Memory => "insufficient GPU memory",
            Self::Cores => "insufficient GPU cores",
            Self::NotExclusive => "exclusive card requested (gpucores 100) but card is in use",
            Self::HeldExclusively => "card held exclusively by another pod",
            Self::NumaMismatch => "cards not on one NUMA node (numa-bind)",
            Self::InUseMutex => "card already in use (mutex policy wants an idle card)",
            Self::ModeNotAllowed => "card mode not in nvidia.com/vgpu-mode",
        })
    }
}

impl CardState {
    /// Wraps an inventory entry with no charges; `type_id` indexes the
    /// cluster's table of lowercased card types.
    pub fn new(device: GpuDevice, type_id: usize) -> Self {
        let total_cores = if device.devcore == 0 {
            100
        } else {
            device.devcore
        };
        Self {
            type_id,
            inverse_capacity: [
                1.0 / device.devmem.max(1) as f64,
                1.0 / f64::from(total_cores),
                0.01 / f64::from(device.count.max(1)),
            ],
            device,
            usage: CardUsage::default(),
            link_scores: Arc::from(Vec::new()),
        }
    }

    /// Sets the card's link scores toward the node's cards, by position.
    pub fn set_link_scores(&mut self, scores: Arc<[u32]>) {
        self.link_scores = scores;
    }

    /// Whether the node published link scores for this card.
    pub fn has_link_scores(&self) -> bool {
        !self.link_scores.is_empty()
    }

    /// Link score toward the card at `position` of the node (0 when unknown).
    pub fn link_score(&self, position: usize) -> u32 {
        self.link_scores.get(position).copied().unwrap_or(0)
    }

    /// Whether the pod's UUID lists allow this card.
    fn uuid_allowed(&self, policy: &PodGpuPolicy) -> bool {
        (policy.use_uuids.is_empty() && policy.avoid_uuids.is_empty())
            || policy.allows_uuid(&self.device.id)
    }

    /// Checks whether a container's request fits given `usage` (the card's
    /// charges plus what this decision already put on it) and whether the
    /// pod's type lists allow the card's type (`type_allowed`); with `mutex`
    /// only an idle card fits. On success, the MiB it would take.
    pub fn fits(
        &self,
        usage: CardUsage,
        request: &ResolvedGpuRequest,
        policy: &PodGpuPolicy,
        type_allowed: bool,
        mutex: bool,
    ) -> Result<u64, CardRejection> {
        if !self.device.health {
            return Err(CardRejection::Unhealthy);
        }
        if !type_allowed {
            return Err(CardRejection::TypeNotAllowed);
        }
        if policy
            .vgpu_mode
            .as_ref()
            .is_some_and(|mode| !mode.allows(&self.device.mode))
        {
            return Err(CardRejection::ModeNotAllowed);
        }
        if !self.uuid_allowed(policy) {
            return Err(CardRejection::UuidNotAllowed);
        }
        if usage.slots >= self.device.count {
            return Err(CardRejection::NoSharingSlot);
        }
        if mutex && usage.slots > 0 {
            return Err(CardRejection::InUseMutex);
        }
        let total_cores = self.total_cores();
        if usage.slots > 0 && usage.cores >= total_cores {
            return Err(CardRejection::HeldExclusively);
        }
        if request.cores >= 100 && usage.slots > 0 {
            return Err(CardRejection::NotExclusive);
        }
        if usage.cores + request.cores > total_cores {
            return Err(CardRejection::Cores);
        }
        let memory = request.memory.on_card(self.device.devmem);
        if usage.memory_mib + memory > self.device.devmem {
            return Err(CardRejection::Memory);
        }
        Ok(memory)
    }

    /// Compute of the card in percent (an inventory without it means 100).
    pub fn total_cores(&self) -> u32 {
        if self.device.devcore == 0 {
            100
        } else {
            self.device.devcore
        }
    }

    /// How full the card is, 0 (empty) to about 2 (memory and cores full),
    /// for binpack and spread ordering.
    pub fn fullness(&self, usage: CardUsage) -> f64 {
        let [memory, cores, slots] = self.inverse_capacity;
        usage.memory_mib as f64 * memory
            + f64::from(usage.cores) * cores
            + f64::from(usage.slots) * slots
    }
}
