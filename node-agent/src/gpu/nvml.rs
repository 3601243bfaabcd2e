//! The NVML backend. `libnvidia-ml.so.1` is loaded when the agent starts
//! (nvml-wrapper opens it at run time), so the binary runs on a machine
//! without a driver and reports [`GpuError::NoDriver`] there. Health events
//! (critical XIDs, uncorrectable ECC) are read on a dedicated thread that
//! blocks in NVML's event wait. Per-process memory comes from
//! `nvmlDeviceGetComputeRunningProcesses` and
//! `nvmlDeviceGetGraphicsRunningProcesses` (v3 where the driver has them).
//! Links between cards: the PCIe common ancestor
//! (`nvmlDeviceGetTopologyCommonAncestor`) and the active NVLinks, counted
//! by matching each link's remote PCI bus ID to the other card's; a link
//! whose far end is no GPU of the node ends at an NVSwitch, and two cards
//! that both reach NVSwitches count the fewer of their switch links (HAMi's
//! rule; nvml-wrapper's remote-device-type query cannot be used for this).

use std::sync::Arc;

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;
use tokio::sync::mpsc;

use nvml_wrapper::enum_wrappers::device::{P2pCapabilitiesIndex, P2pStatus, TopologyLevel};

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::struct_wrappers::device::ProcessInfo;
use tessera_api::pair_scores::PcieLink;

use super::{
    GpuBackend, GpuError, GpuInfo, GpuLink, GpuProcess, HealthEvent, HealthEventKind, HostGpuUsage,
};

/// How long one NVML event wait blocks before checking whether anyone still listens.
const EVENT_WAIT_MS: u32 = 5_000;

/// The cards NVML reports.
#[derive(Clone)]
pub struct NvmlGpus {
    nvml: Arc<Nvml>,
}

impl std::fmt::Debug for NvmlGpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlGpus").finish_non_exhaustive()
    }
}

impl NvmlGpus {
    /// Loads and initialises NVML.
    pub fn init() -> Result<Self, GpuError> {
        let nvml = Nvml::init().map_err(|e| GpuError::NoDriver {
            reason: e.to_string(),
        })?;
        Ok(Self {
            nvml: Arc::new(nvml),
        })
    }

    /// The driver version NVML reports, for the startup log.
    pub fn driver_version(&self) -> Option<String> {
        self.nvml.sys_driver_version().ok()
    }
}

fn query_error(index: u32, query: &'static str) -> impl Fn(NvmlError) -> GpuError {
    move |e| GpuError::Query {
        index,
        query,
        reason: e.to_string(),
    }
}

/// NVML's `NVML_NVLINK_MAX_LINKS`: the most NVLinks a card has.
const NVML_NVLINK_MAX_LINKS: u32 = 18;

/// The PCI bus IDs (lowercase) at the far end of each active NVLink of a
/// card; links NVML does not support or cannot read are left out.
fn active_nvlink_remotes(device: &nvml_wrapper::Device<'_>) -> Vec<String> {
    (0..NVML_NVLINK_MAX_LINKS)
        .filter_map(|link| {
            let link = device.link_wrapper_for(link);
            if !link.is_active().ok()? {
                return None;
            }
            Some(link.remote_pci_info().ok()?.bus_id.to_ascii_lowercase())
        })
        .collect()
}

/// The NUMA node of a PCI device from sysfs (`-1`, meaning none, becomes 0).
fn numa_from_sysfs(bus_id: &str) -> Option<i32> {
    // NVML writes an 8-digit domain (`00000000:17:00.0`); sysfs uses 4.
    let short = bus_id
        .get(bus_id.len().checked_sub(12)?..)?
        .to_ascii_lowercase();
    let text = std::fs::read_to_string(format!("/sys/bus/pci/devices/{short}/numa_node")).ok()?;
    text.trim().parse::<i32>().ok().map(|n| n.max(0))
}

impl GpuBackend for NvmlGpus {
    fn kind(&self) -> &'static str {
        "nvml"
    }

    fn discover(&self) -> Result<Vec<GpuInfo>, GpuError> {
        let count = self
            .nvml
            .device_count()
            .map_err(query_error(0, "device_count"))?;
        let mut cards = Vec::new();
        for index in 0..count {
            let device = self
                .nvml
                .device_by_index(index)
                .map_err(query_error(index, "device_by_index"))?;
            let uuid = device.uuid().map_err(query_error(index, "uuid"))?;
            let name = device.name().map_err(query_error(index, "name"))?;
            let memory = device
                .memory_info()
                .map_err(query_error(index, "memory_info"))?;
            let numa = device
                .numa_node_id()
                .ok()
                .and_then(|n| i32::try_from(n).ok())
                .or_else(|| {
                    device
                        .pci_info()
                        .ok()
                        .and_then(|pci| numa_from_sysfs(&pci.bus_id))
                })
                .unwrap_or(0);
            cards.push(GpuInfo {
                uuid,
                index,
                name,
                memory_mib: memory.total / (1024 * 1024),
                numa,
                healthy: true,
            });
        }
        Ok(cards)
    }

    fn links(&self) -> Vec<GpuLink> {
        let count = self.nvml.device_count().unwrap_or(0);
        let devices: Vec<_> = (0..count)
            .map(|index| self.nvml.device_by_index(index).ok())
            .collect();
        let bus_ids: Vec<Option<String>> = devices
            .iter()
            .map(|d| {
                d.as_ref()?
                    .pci_info()
                    .ok()
                    .map(|p| p.bus_id.to_ascii_lowercase())
            })
            .collect();
        let remotes: Vec<Vec<String>> = devices
            .iter()
            .map(|d| d.as_ref().map(active_nvlink_remotes).unwrap_or_default())
            .collect();
        // Links whose far end is no GPU of this node end at an NVSwitch.
        let switch_links: Vec<u32> = remotes
            .iter()
            .map(|ends| {
                let to_switch = ends
                    .iter()
                    .filter(|end| !bus_ids.iter().flatten().any(|gpu| gpu == *end))
                    .count();
                u32::try_from(to_switch).unwrap_or(u32::MAX)
            })
            .collect();
        let mut links = Vec::new();
        for from in 0..count {
            for to in from + 1..count {
                let (Some(a), Some(b)) = (&devices[from as usize], &devices[to as usize]) else {
                    continue;
                };
                let status = |index| matches!(a.p2p_status(b, index), Ok(P2pStatus::Ok));
                let ancestor = self
                    .nvml
                    .device_by_index(to)
                    .and_then(|other| a.topology_common_ancestor(other));
                let pcie = match ancestor {
                    Ok(TopologyLevel::Internal) => Some(PcieLink::SameBoard),
                    Ok(TopologyLevel::Single) => Some(PcieLink::SingleSwitch),
                    Ok(TopologyLevel::Multiple) => Some(PcieLink::MultiSwitch),
                    Ok(TopologyLevel::HostBridge) => Some(PcieLink::HostBridge),
                    Ok(TopologyLevel::Node) => Some(PcieLink::SameCpu),
                    Ok(TopologyLevel::System) => Some(PcieLink::CrossCpu),
                    Err(_) => None,
                };
                let direct = bus_ids[to as usize].as_ref().map_or(0, |bus| {
                    remotes[from as usize]
                        .iter()
                        .filter(|end| *end == bus)
                        .count()
                });
                let nvlinks = if direct > 0 {
                    u32::try_from(direct).unwrap_or(u32::MAX)
                } else {
                    // Through NVSwitches: the fewer of the two cards' switch links.
                    switch_links[from as usize].min(switch_links[to as usize])
                };
                links.push(GpuLink {
                    from,
                    to,
                    nvlink: status(P2pCapabilitiesIndex::NvLink) || nvlinks > 0,
                    p2p_read: status(P2pCapabilitiesIndex::Read),
                    topology: pcie.map_or("unknown", PcieLink::name),
                    pcie,
                    nvlinks,
                });
            }
        }
        links
    }

    fn host_usage(&self) -> Vec<HostGpuUsage> {
        let Ok(count) = self.nvml.device_count() else {
            return Vec::new();
        };
        (0..count)
            .filter_map(|index| {
                let device = self.nvml.device_by_index(index).ok()?;
                let memory = device.memory_info().ok()?;
                let utilization = device.utilization_rates().ok()?;
                Some(HostGpuUsage {
                    uuid: device.uuid().ok()?,
                    memory_used_bytes: memory.used,
                    utilization_ratio: f64::from(utilization.gpu) / 100.0,
                    memory_controller_utilization_ratio: f64::from(utilization.memory) / 100.0,
                })
            })
            .collect()
    }

    fn processes(&self, card: &GpuInfo) -> Result<Vec<GpuProcess>, GpuError> {
        let device = self
            .nvml
            .device_by_index(card.index)
            .map_err(query_error(card.index, "device_by_index"))?;
        let compute = device
            .running_compute_processes()
            .map_err(query_error(card.index, "running_compute_processes"))?;
        // Graphics contexts are rare on compute nodes and not every card
        // or driver answers for them: a failure there leaves them out.
        let graphics = device.running_graphics_processes().unwrap_or_default();
        Ok(merge_process_lists(compute.into_iter().chain(graphics)))
    }

    fn watch_health(&self) -> Result<mpsc::UnboundedReceiver<HealthEvent>, GpuError> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let nvml = Arc::clone(&self.nvml);
        std::thread::Builder::new()
            .name("nvml-health".into())
            .spawn(move || watch_events(&nvml, &sender))
            .map_err(|e| GpuError::Query {
                index: 0,
                query: "start the health thread",
                reason: e.to_string(),
            })?;
        Ok(receiver)
    }

    fn is_responsive(&self, uuid: &str) -> bool {
        self.nvml
            .device_by_uuid(uuid)
            .and_then(|device| device.memory_info())
            .is_ok()
    }
}

/// One entry per pid: a process holding both a compute and a graphics
/// context is listed by both queries, each time with its whole usage, so
/// the larger figure is kept rather than the sum.
fn merge_process_lists(listed: impl Iterator<Item = ProcessInfo>) -> Vec<GpuProcess> {
    let mut merged: Vec<GpuProcess> = Vec::new();
    for info in listed {
        let used_bytes = match info.used_gpu_memory {
            UsedGpuMemory::Used(bytes) => Some(bytes),
            UsedGpuMemory::Unavailable => None,
        };
        match merged.iter_mut().find(|p| p.pid == info.pid) {
            Some(seen) => seen.used_bytes = seen.used_bytes.max(used_bytes),
            None => merged.push(GpuProcess {
                pid: info.pid,
                used_bytes,
            }),
        }
    }
    merged
}

/// Registers every card that supports the wanted events on one event set.
/// A card whose registration fails is skipped: the failed call frees the
/// set, so the set is rebuilt without it.
fn build_event_set(nvml: &Nvml) -> Option<nvml_wrapper::EventSet<'_>> {
    let wanted = EventTypes::CRITICAL_XID_ERROR | EventTypes::DOUBLE_BIT_ECC_ERROR;
    let count = nvml.device_count().unwrap_or(0);
    let mut skipped = std::collections::HashSet::new();
    'rebuild: loop {
        let mut set = match nvml.create_event_set() {
            Ok(set) => set,
            Err(e) => {
                tracing::warn!(error = %e, "NVML event sets are not available; GPU health comes from discovery only");
                return None;
            }
        };
        for index in (0..count).filter(|i| !skipped.contains(i)) {
            let Ok(device) = nvml.device_by_index(index) else {
                continue;
            };
            let events = wanted
                & device
                    .supported_event_types()
                    .unwrap_or(EventTypes::empty());
            if events.is_empty() {
                tracing::warn!(
                    index,
                    "GPU supports no health events; its health is not watched"
                );
                continue;
            }
            set = match device.register_events(events, set) {
                Ok(set) => set,
                Err(e) => {
                    tracing::warn!(index, error = %e.error, "could not watch GPU health events; its health is not watched");
                    skipped.insert(index);
                    continue 'rebuild;
                }
            };
        }
        return Some(set);
    }
}

fn watch_events(nvml: &Nvml, sender: &mpsc::UnboundedSender<HealthEvent>) {
    let Some(set) = build_event_set(nvml) else {
        return;
    };
    loop {
        if sender.is_closed() {
            return;
        }
        match set.wait(EVENT_WAIT_MS) {
            Ok(event) => {
                let Ok(uuid) = event.device.uuid() else {
                    continue;
                };
                let kind = if event.event_type.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
                    HealthEventKind::UncorrectableEcc
                } else {
                    match event.event_data {
                        Some(XidError::Value(xid)) => HealthEventKind::Xid(xid),
                        _ => HealthEventKind::Xid(0),
                    }
                };
                if sender.send(HealthEvent { uuid, kind }).is_err() {
                    return;
                }
            }
            Err(NvmlError::Timeout) => {}
            Err(NvmlError::GpuLost) => {
                tracing::error!("NVML reports a GPU fell off the bus");
            }
            Err(e) => {
                tracing::warn!(error = %e, "NVML event wait failed; GPU health watching stops");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(pid: u32, used: UsedGpuMemory) -> ProcessInfo {
        ProcessInfo {
            pid,
            used_gpu_memory: used,
            gpu_instance_id: None,
            compute_instance_id: None,
        }
    }

    #[test]
    fn a_pid_listed_twice_keeps_its_larger_figure() {
        let merged = merge_process_lists(
            [
                info(7, UsedGpuMemory::Used(100)),
                info(8, UsedGpuMemory::Unavailable),
                info(7, UsedGpuMemory::Used(300)),
                info(8, UsedGpuMemory::Used(5)),
            ]
            .into_iter(),
        );
        assert_eq!(
            merged,
            vec![
                GpuProcess {
                    pid: 7,
                    used_bytes: Some(300)
                },
                GpuProcess {
                    pid: 8,
                    used_bytes: Some(5)
                },
            ]
        );
    }
}
