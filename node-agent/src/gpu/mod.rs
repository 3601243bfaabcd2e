//! GPU discovery behind one trait, [`GpuBackend`]: the real backend reads
//! NVML ([`nvml::NvmlGpus`], the library is loaded at run time), the fake
//! backend ([`fake::FakeGpus`]) serves a described set of cards so the rest
//! of the agent runs and is tested without a GPU. Both report the same
//! facts: identity, memory, NUMA node, health events, host usage and the
//! processes holding memory on each card (the driver's own per-process
//! figures, which host-side enforcement trusts over anything a container
//! writes), and how each pair of cards is linked (PCIe path, NVLinks).

pub mod fake;
pub mod nvml;

use std::fmt;

use tessera_api::pair_scores::{LinkFacts, PcieLink};
use thiserror::Error;
use tokio::sync::mpsc;

/// One physical GPU as discovered on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// Card UUID (`GPU-…`).
    pub uuid: String,
    /// Index as NVML numbers the cards.
    pub index: u32,
    /// Product name as NVML reports it (e.g. `NVIDIA A10G`).
    pub name: String,
    /// Physical memory in MiB.
    pub memory_mib: u64,
    /// NUMA node of the card's PCI device (0 when the platform has none).
    pub numa: i32,
    /// Health at discovery time.
    pub healthy: bool,
}

/// How two cards of the node reach each other: for the discovery report
/// and for the link scores published on the node
/// (`hami.io/node-nvidia-score`, used by the `topology-aware` policy;
/// tensor-parallel and NCCL jobs care whether peers share NVLink).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuLink {
    /// NVML index of one card.
    pub from: u32,
    /// NVML index of the other.
    pub to: u32,
    /// Whether NVML reports peer-to-peer over NVLink between them.
    pub nvlink: bool,
    /// Whether NVML reports peer-to-peer reads between them (any path).
    pub p2p_read: bool,
    /// Their closest common ancestor in the PCIe topology (`internal`,
    /// `single-switch`, `multiple-switches`, `host-bridge`, `numa-node`,
    /// `system`), or `unknown`.
    pub topology: &'static str,
    /// The same ancestor, typed (`None` when NVML does not say).
    pub pcie: Option<PcieLink>,
    /// Active NVLinks between the two cards, directly or through NVSwitches.
    pub nvlinks: u32,
}

impl GpuLink {
    /// A link over PCIe only (`pcie` = `None`: NVML did not say).
    pub fn pcie(from: u32, to: u32, pcie: Option<PcieLink>) -> Self {
        Self {
            from,
            to,
            nvlink: false,
            p2p_read: pcie.is_some(),
            topology: pcie.map_or("unknown", PcieLink::name),
            pcie,
            nvlinks: 0,
        }
    }

    /// The facts HAMi scores.
    pub fn facts(&self) -> LinkFacts {
        LinkFacts {
            pcie: self.pcie,
            nvlinks: self.nvlinks,
        }
    }
}

/// Host-level usage of one card, for the host metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct HostGpuUsage {
    /// Card UUID.
    pub uuid: String,
    /// Device memory in use by every process, bytes.
    pub memory_used_bytes: u64,
    /// Share of time a kernel ran over the last sample period, 0 to 1.
    pub utilization_ratio: f64,
    /// Share of time device memory was being read or written over the last
    /// sample period, 0 to 1.
    pub memory_controller_utilization_ratio: f64,
}

/// One process holding a context on a card, as the driver reports it
/// (NVML's running compute and graphics processes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuProcess {
    /// Process id in the agent's pid namespace (the host's: the agent runs
    /// with `hostPID`).
    pub pid: u32,
    /// Device memory the process holds on the card, bytes; `None` when the
    /// driver does not say (NVML's "not available").
    pub used_bytes: Option<u64>,
}

/// Something happened to a card that decides its health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthEvent {
    /// Card UUID.
    pub uuid: String,
    /// What happened.
    pub kind: HealthEventKind,
}

/// The kinds of health events the backends report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthEventKind {
    /// An XID error; [`is_fatal_xid`] says whether it means a dead card.
    Xid(u64),
    /// An uncorrectable (double-bit) ECC error.
    UncorrectableEcc,
    /// The backend lost the card entirely.
    Lost,
}

impl HealthEventKind {
    /// Whether the event takes the card out of service.
    pub fn is_fatal(self) -> bool {
        match self {
            Self::Xid(xid) => is_fatal_xid(xid),
            Self::UncorrectableEcc | Self::Lost => true,
        }
    }
}

impl fmt::Display for HealthEventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Xid(xid) => write!(f, "XID {xid}"),
            Self::UncorrectableEcc => f.write_str("uncorrectable ECC error"),
            Self::Lost => f.write_str("card lost"),
        }
    }
}

/// XIDs caused by an application (bad memory access, a killed context,
/// a preempted or reset channel): they do not mean the card is broken.
/// Every other XID reported as critical takes the card out of service.
const APPLICATION_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

/// Whether an XID error means the card can no longer be trusted.
pub fn is_fatal_xid(xid: u64) -> bool {
    !APPLICATION_XIDS.contains(&xid)
}

/// Errors of the GPU backends.
#[derive(Debug, Error)]
pub enum GpuError {
    /// NVML could not be loaded or initialised: no driver on this machine.
    #[error("no NVIDIA driver found: NVML could not be loaded or initialised ({reason}); install the NVIDIA driver and make libnvidia-ml.so.1 visible to the agent (the DaemonSet mounts it from the host), or run with --fake-gpus for a machine without GPUs")]
    NoDriver {
        /// What NVML said.
        reason: String,
    },
    /// An NVML query failed for one card.
    #[error(
        "NVML query `{query}` failed for GPU {index}: {reason}; check `nvidia-smi` on the node"
    )]
    Query {
        /// Card index.
        index: u32,
        /// Which query.
        query: &'static str,
        /// What NVML said.
        reason: String,
    },
    /// The `--fake-gpus` description does not parse.
    #[error("--fake-gpus `{spec}` is not valid: {reason}; write e.g. `4x NVIDIA A10G 23028` (count, name, MiB), several groups separated by `;`, and optionally NVLinks between cards by index, e.g. `; nvlink 0-2:4 1-3:4`")]
    FakeSpec {
        /// The description as given.
        spec: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// A source of GPUs and their health.
pub trait GpuBackend: Send + Sync + fmt::Debug {
    /// Short name for logs (`nvml`, `fake`).
    fn kind(&self) -> &'static str;
    /// Lists the cards on this node.
    fn discover(&self) -> Result<Vec<GpuInfo>, GpuError>;
    /// How each pair of cards is linked; backends that cannot tell list none.
    fn links(&self) -> Vec<GpuLink> {
        Vec::new()
    }
    /// Current host-level usage of every card; cards that cannot be read are left out.
    fn host_usage(&self) -> Vec<HostGpuUsage>;
    /// Starts delivering health events; the channel closes when the backend stops watching.
    fn watch_health(&self) -> Result<mpsc::UnboundedReceiver<HealthEvent>, GpuError>;
    /// Every process holding a context on `card` with the memory each
    /// holds, compute and graphics contexts together (a process listed in
    /// both appears once, with the larger figure). Blocking: call it off
    /// the async runtime's worker threads.
    fn processes(&self, card: &GpuInfo) -> Result<Vec<GpuProcess>, GpuError>;
    /// Whether the card answers queries again (used to bring a card back
    /// after a quiet period without fatal events).
    fn is_responsive(&self, uuid: &str) -> bool;
}
