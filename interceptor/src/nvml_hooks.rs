//! NVML: the intercepted memory queries (`nvmlDeviceGetMemoryInfo` v1 and
//! v2), which show the container's cap as the card's total and the
//! container's charges as used, so `nvidia-smi` in the container shows the
//! slice; and the usage readings that measure what a CUDA context costs.
//!
//! Measuring a context costs as little NVML as exactness allows: NVML is
//! initialised once, on a helper thread started at `cuInit`
//! ([`state::start_nvml_warm_up`]); each card's NVML handle is looked up
//! once (by UUID) and kept; before a context, one process-list call and one
//! memory call; after it, one process-list call, plus the memory call only
//! where NVML does not list this process (inside a pid namespace whose host
//! pid the node agent could not tell us, [`crate::host_pid`]).

use crate::cards;
use crate::ffi::*;
use crate::hook_table::{NvmlMemoryInfo, NvmlMemoryInfoV2};
use crate::nvml::NvmlLibrary;
use crate::state;
use std::ffi::{c_char, c_uint, CStr, CString};
use std::sync::atomic::{AtomicUsize, Ordering};
use tessera_api::shared_region::MAX_DEVICES;
use tessera_api::visible_cards::position_of;

/// The container card an NVML device is: by its UUID's place in the
/// container's list when there is one, else by NVML's index.
fn container_card(nvml: &NvmlLibrary, device: NvmlDevice) -> Option<usize> {
    let config = state::config().ok()?;
    if let (Some(list), Some(device_uuid)) = (&config.visible_uuids, nvml.device_uuid) {
        let mut text = [0 as c_char; 96];
        // SAFETY: NVML's nvmlDeviceGetUUID with a buffer of the stated size.
        let rc = unsafe { device_uuid(device, text.as_mut_ptr(), text.len() as c_uint) };
        if rc == NVML_SUCCESS {
            // SAFETY: NVML wrote a NUL-terminated string into the buffer.
            let uuid = unsafe { CStr::from_ptr(text.as_ptr()) }.to_string_lossy();
            match position_of(list, &uuid) {
                Some(i) => return (i < MAX_DEVICES).then_some(i),
                None if config.visible_uuids_from_agent => return None,
                None => {}
            }
        }
    }
    let device_index = nvml.device_index?;
    let mut index: c_uint = 0;
    // SAFETY: NVML's nvmlDeviceGetIndex with a valid out-pointer.
    let rc = unsafe { device_index(device, &mut index) };
    (rc == NVML_SUCCESS).then_some(index as usize)
}

/// `(cap, container usage)` for an NVML device, when it is capped.
fn capped_view(device: NvmlDevice) -> Option<(u64, u64)> {
    let nvml = state::nvml()?;
    let Ok(Some(accounting)) = state::accounting() else {
        return None;
    };
    let card = container_card(nvml, device)?;
    let limit = accounting.limit(card)?;
    // A query is rare and not on any hot path: show live usage only.
    accounting.reclaim_dead();
    Some((limit, accounting.used(card)))
}

/// `(total, used, free)` as the container should see them.
fn shown(limit: u64, used: u64, real_total: u64, real_free: u64) -> (u64, u64, u64) {
    let total = limit.min(real_total);
    let used = used.min(total);
    (total, used, (total - used).min(real_free))
}

/// # Safety
/// `nvmlDeviceGetMemoryInfo`'s contract: `memory` is null or a valid
/// `nvmlMemory_t` out-pointer.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: NvmlDevice,
    memory: *mut NvmlMemory,
) -> NvmlReturn {
    let Some(real) = state::nvml().and_then(|n| n.real::<NvmlMemoryInfo>()) else {
        return NVML_ERROR_FUNCTION_NOT_FOUND;
    };
    // SAFETY: NVML's own function with the caller's arguments.
    let rc = unsafe { real(device, memory) };
    if rc == NVML_SUCCESS && !memory.is_null() {
        if let Some((limit, used)) = capped_view(device) {
            // SAFETY: non-null out-pointer NVML just filled.
            let m = unsafe { &mut *memory };
            (m.total, m.used, m.free) = shown(limit, used, m.total, m.free);
        }
    }
    rc
}

/// # Safety
/// `nvmlDeviceGetMemoryInfo_v2`'s contract: `memory` is null or a valid
/// `nvmlMemory_v2_t` out-pointer with its version set.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: NvmlDevice,
    memory: *mut NvmlMemoryV2,
) -> NvmlReturn {
    let Some(real) = state::nvml().and_then(|n| n.real::<NvmlMemoryInfoV2>()) else {
        return NVML_ERROR_FUNCTION_NOT_FOUND;
    };
    // SAFETY: NVML's own function with the caller's arguments.
    let rc = unsafe { real(device, memory) };
    if rc == NVML_SUCCESS && !memory.is_null() {
        if let Some((limit, used)) = capped_view(device) {
            // SAFETY: non-null out-pointer NVML just filled.
            let m = unsafe { &mut *memory };
            (m.total, m.used, m.free) = shown(limit, used, m.total, m.free);
            // The slice has no driver reservation of its own.
            m.reserved = 0;
        }
    }
    rc
}

/// How NVML sees a card's usage, for measuring what a context costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageSample {
    /// This process's usage, when NVML lists it under our pid (not inside a
    /// pid namespace, where NVML reports host pids).
    pub own: Option<u64>,
    /// Device-wide usage (every process on the card). Read before a
    /// context always, after it only when `own` is `None`.
    pub device: u64,
}

impl UsageSample {
    /// Before a first context, in a process NVML lists by its own pid and
    /// that holds nothing on the card: its own usage is zero.
    pub const NOTHING_OF_OURS: UsageSample = UsageSample {
        own: Some(0),
        device: 0,
    };

    /// Bytes added between `before` and `after`: our own usage when NVML
    /// shows it (immune to other processes allocating meanwhile), else the
    /// device-wide difference.
    pub fn growth(before: UsageSample, after: UsageSample) -> u64 {
        match after.own {
            Some(own) => own.saturating_sub(before.own.unwrap_or(0)),
            None => after.device.saturating_sub(before.device),
        }
    }
}

/// This process's usage of `device` per NVML's process list, if listed.
fn own_usage(nvml: &NvmlLibrary, device: NvmlDevice) -> Option<u64> {
    let running = nvml.running_processes?;
    let me = crate::host_pid::nvml_pids();
    let mut list = [NvmlProcessInfo::default(); 256];
    let mut count = list.len() as c_uint;
    // SAFETY: NVML's process query with a buffer of `count` entries.
    let rc = unsafe { running(device, &mut count, list.as_mut_ptr()) };
    if rc != NVML_SUCCESS {
        return None;
    }
    // Both our own and our host pid listed (one of them is another
    // process's): the larger, so a context is never charged too little.
    list[..(count as usize).min(list.len())]
        .iter()
        .filter(|p| me.matches(p.pid))
        .map(|p| p.used_gpu_memory)
        .max()
}

/// Device-wide bytes in use per NVML (the real query, not our hook).
fn device_used(nvml: &NvmlLibrary, handle: NvmlDevice) -> Option<u64> {
    let memory_info = nvml.real::<NvmlMemoryInfo>()?;
    let mut memory = NvmlMemory {
        total: 0,
        free: 0,
        used: 0,
    };
    // SAFETY: NVML's real nvmlDeviceGetMemoryInfo with a valid out-pointer.
    let rc = unsafe { memory_info(handle, &mut memory) };
    (rc == NVML_SUCCESS).then_some(memory.used)
}

/// No handle: the card is not in NVML (looked up, not found).
const NO_HANDLE: usize = 1;

/// NVML handles of CUDA ordinals, looked up once by UUID (0 = not yet).
static HANDLES: [AtomicUsize; MAX_DEVICES] = [const { AtomicUsize::new(0) }; MAX_DEVICES];

/// The NVML handle of CUDA card `ordinal` (CUDA and NVML may number cards
/// differently, so it is found by UUID), kept after the first lookup.
fn card_handle(nvml: &NvmlLibrary, ordinal: CuDevice) -> Option<NvmlDevice> {
    let slot = usize::try_from(ordinal).ok().and_then(|o| HANDLES.get(o));
    match slot.map(|s| s.load(Ordering::Relaxed)) {
        Some(NO_HANDLE) => return None,
        Some(0) | None => {}
        Some(handle) => return Some(handle as NvmlDevice),
    }
    let handle_by_uuid = nvml.handle_by_uuid?;
    let text = CString::new(cards::cuda_uuid(ordinal)?).ok()?;
    let mut handle: NvmlDevice = std::ptr::null_mut();
    // SAFETY: NVML's lookup with a NUL-terminated UUID and a valid out-pointer.
    let rc = unsafe { handle_by_uuid(text.as_ptr(), &mut handle) };
    let found = (rc == NVML_SUCCESS && handle as usize > NO_HANDLE).then_some(handle);
    if let Some(slot) = slot {
        slot.store(found.map_or(NO_HANDLE, |h| h as usize), Ordering::Relaxed);
    }
    found
}

/// Looks up the NVML handle of every CUDA card (ordinal 0 first) on the
/// warm-up helper, once the driver is initialised: the first lookup of a
/// card costs NVML about 6 ms (measured on an H200), which would otherwise
/// fall on the first context of the process, after it is made.
pub fn prefetch_card_handles(nvml: &NvmlLibrary) {
    let Some(device_count) = state::cuda().and_then(|d| d.device_get_count) else {
        return;
    };
    let mut count: std::ffi::c_int = 0;
    // SAFETY: the driver's cuDeviceGetCount with a valid out-pointer, after
    // cuInit.
    let rc = unsafe { device_count(&mut count) };
    if rc != CUDA_SUCCESS {
        return;
    }
    for ordinal in 0..count.min(MAX_DEVICES as std::ffi::c_int) {
        card_handle(nvml, ordinal);
    }
}

/// NVML's view of CUDA card `ordinal` just before a context is made on it.
/// `None` when NVML is absent; waits for the NVML warm-up if it is running.
pub fn usage_before_context(ordinal: CuDevice) -> Option<UsageSample> {
    let nvml = state::measuring_nvml()?;
    nvml.real::<NvmlMemoryInfo>()?;
    let handle = card_handle(nvml, ordinal)?;
    Some(UsageSample {
        own: own_usage(nvml, handle),
        device: device_used(nvml, handle)?,
    })
}

/// This process's usage of CUDA card `ordinal` per NVML's process list;
/// `None` where NVML is absent or does not list this process.
pub fn own_usage_of(ordinal: CuDevice) -> Option<u64> {
    let nvml = state::measuring_nvml()?;
    let handle = card_handle(nvml, ordinal)?;
    own_usage(nvml, handle)
}

/// NVML's view of CUDA card `ordinal` just after a context was made on it:
/// the device-wide reading only where NVML does not list this process.
pub fn usage_after_context(ordinal: CuDevice) -> Option<UsageSample> {
    let nvml = state::measuring_nvml()?;
    let handle = card_handle(nvml, ordinal)?;
    match own_usage(nvml, handle) {
        Some(own) => Some(UsageSample {
            own: Some(own),
            device: 0,
        }),
        None => Some(UsageSample {
            own: None,
            device: device_used(nvml, handle)?,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_prefers_own_usage() {
        let before = UsageSample {
            own: None,
            device: 1000,
        };
        let after = UsageSample {
            own: Some(300),
            device: 0,
        };
        assert_eq!(UsageSample::growth(before, after), 300);
        let after = UsageSample {
            own: None,
            device: 1500,
        };
        assert_eq!(UsageSample::growth(before, after), 500);
        let before = UsageSample {
            own: Some(200),
            device: 9,
        };
        let after = UsageSample {
            own: Some(250),
            device: 0,
        };
        assert_eq!(UsageSample::growth(before, after), 50);
    }

    #[test]
    fn shown_never_underflows() {
        assert_eq!(shown(10, 4, 100, 90), (10, 4, 6));
        assert_eq!(shown(10, 14, 100, 90), (10, 10, 0));
        assert_eq!(shown(200, 4, 100, 3), (100, 4, 3));
    }
}
