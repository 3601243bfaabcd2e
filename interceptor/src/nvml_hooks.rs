//! NVML: the intercepted memory queries (`nvmlDeviceGetMemoryInfo` v1 and
//! v2), which show the container's cap as the card's total and the
//! container's charges as used, so `nvidia-smi` in the container shows the
//! slice; and the device-wide usage reading that measures what a CUDA
//! context costs.

use crate::ffi::*;
use crate::state;
use std::ffi::{c_char, c_uint, CString};
use std::sync::OnceLock;

type MemoryInfoFn = unsafe extern "C" fn(NvmlDevice, *mut NvmlMemory) -> NvmlReturn;
type MemoryInfoV2Fn = unsafe extern "C" fn(NvmlDevice, *mut NvmlMemoryV2) -> NvmlReturn;
type IndexFn = unsafe extern "C" fn(NvmlDevice, *mut c_uint) -> NvmlReturn;
type ByUuidFn = unsafe extern "C" fn(*const c_char, *mut NvmlDevice) -> NvmlReturn;
type UuidFn = unsafe extern "C" fn(*mut u8, CuDevice) -> CuResult;

/// `(cap, container usage)` for an NVML device, when it is capped.
fn capped_view(device: NvmlDevice) -> Option<(u64, u64)> {
    let nvml = state::nvml()?;
    let Ok(Some(accounting)) = state::accounting() else {
        return None;
    };
    if nvml.device_index == 0 {
        return None;
    }
    let mut index: c_uint = 0;
    // SAFETY: NVML's nvmlDeviceGetIndex with a valid out-pointer.
    let rc =
        unsafe { std::mem::transmute::<usize, IndexFn>(nvml.device_index)(device, &mut index) };
    if rc != NVML_SUCCESS {
        return None;
    }
    let limit = accounting.limit(index as usize)?;
    // A query is rare and not on any hot path: show live usage only.
    accounting.reclaim_dead();
    Some((limit, accounting.used(index as usize)))
}

/// `(total, used, free)` as the container should see them.
fn shown(limit: u64, used: u64, real_total: u64, real_free: u64) -> (u64, u64, u64) {
    let total = limit.min(real_total);
    let used = used.min(total);
    (total, used, (total - used).min(real_free))
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: NvmlDevice,
    memory: *mut NvmlMemory,
) -> NvmlReturn {
    let Some(real) = state::nvml().map(|n| n.memory_info[0]).filter(|&f| f != 0) else {
        return NVML_ERROR_FUNCTION_NOT_FOUND;
    };
    // SAFETY: NVML's own function with the caller's arguments.
    let rc = unsafe { std::mem::transmute::<usize, MemoryInfoFn>(real)(device, memory) };
    if rc == NVML_SUCCESS && !memory.is_null() {
        if let Some((limit, used)) = capped_view(device) {
            // SAFETY: non-null out-pointer NVML just filled.
            let m = unsafe { &mut *memory };
            (m.total, m.used, m.free) = shown(limit, used, m.total, m.free);
        }
    }
    rc
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: NvmlDevice,
    memory: *mut NvmlMemoryV2,
) -> NvmlReturn {
    let Some(real) = state::nvml().map(|n| n.memory_info[1]).filter(|&f| f != 0) else {
        return NVML_ERROR_FUNCTION_NOT_FOUND;
    };
    // SAFETY: NVML's own function with the caller's arguments.
    let rc = unsafe { std::mem::transmute::<usize, MemoryInfoV2Fn>(real)(device, memory) };
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

/// NVML's text form of a CUDA UUID: `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
fn nvml_uuid(bytes: &[u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// `nvmlProcessInfo_t` (v2/v3 layout).
#[repr(C)]
#[derive(Clone, Copy)]
struct ProcessInfo {
    pid: c_uint,
    used_gpu_memory: u64,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

type RunningProcessesFn =
    unsafe extern "C" fn(NvmlDevice, *mut c_uint, *mut ProcessInfo) -> NvmlReturn;

/// How NVML sees a card's usage, for measuring what a context costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageSample {
    /// This process's usage, when NVML lists it under our pid (not inside a
    /// pid namespace, where NVML reports host pids).
    pub own: Option<u64>,
    /// Device-wide usage (every process on the card).
    pub device: u64,
}

impl UsageSample {
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
fn own_usage(running: usize, device: NvmlDevice) -> Option<u64> {
    if running == 0 {
        return None;
    }
    let mut list = [ProcessInfo {
        pid: 0,
        used_gpu_memory: 0,
        gpu_instance_id: 0,
        compute_instance_id: 0,
    }; 256];
    let mut count = list.len() as c_uint;
    // SAFETY: NVML's process query with a buffer of `count` entries.
    let rc = unsafe {
        std::mem::transmute::<usize, RunningProcessesFn>(running)(
            device,
            &mut count,
            list.as_mut_ptr(),
        )
    };
    if rc != NVML_SUCCESS {
        return None;
    }
    let me = std::process::id();
    list[..(count as usize).min(list.len())]
        .iter()
        .find(|p| p.pid == me)
        .map(|p| p.used_gpu_memory)
}

/// NVML's view of CUDA card `device`, matched by UUID (CUDA and NVML may
/// number cards differently). `None` when NVML is absent.
pub fn usage_per_nvml(device: CuDevice) -> Option<UsageSample> {
    static NVML_READY: OnceLock<bool> = OnceLock::new();
    let cuda = state::cuda()?;
    let nvml = state::nvml()?;
    if cuda.device_get_uuid == 0 || nvml.handle_by_uuid == 0 || nvml.memory_info[0] == 0 {
        return None;
    }
    let ready = *NVML_READY.get_or_init(|| {
        // SAFETY: nvmlInit_v2(void).
        nvml.init != 0
            && unsafe {
                std::mem::transmute::<usize, unsafe extern "C" fn() -> NvmlReturn>(nvml.init)()
            } == NVML_SUCCESS
    });
    if !ready {
        return None;
    }
    let mut uuid = [0u8; 16];
    // SAFETY: the driver's cuDeviceGetUuid with a 16-byte buffer.
    let rc = unsafe {
        std::mem::transmute::<usize, UuidFn>(cuda.device_get_uuid)(uuid.as_mut_ptr(), device)
    };
    if rc != CUDA_SUCCESS {
        return None;
    }
    let text = CString::new(nvml_uuid(&uuid)).ok()?;
    let mut handle: NvmlDevice = std::ptr::null_mut();
    // SAFETY: NVML calls with valid buffers; the memory call is the real
    // one, not our hook.
    unsafe {
        if std::mem::transmute::<usize, ByUuidFn>(nvml.handle_by_uuid)(text.as_ptr(), &mut handle)
            != NVML_SUCCESS
        {
            return None;
        }
        let mut memory = NvmlMemory {
            total: 0,
            free: 0,
            used: 0,
        };
        if std::mem::transmute::<usize, MemoryInfoFn>(nvml.memory_info[0])(handle, &mut memory)
            != NVML_SUCCESS
        {
            return None;
        }
        Some(UsageSample {
            own: own_usage(nvml.running_processes, handle),
            device: memory.used,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_text() {
        let mut b = [0u8; 16];
        b[0] = 0xab;
        b[15] = 0x01;
        assert_eq!(nvml_uuid(&b), "GPU-ab000000-0000-0000-0000-000000000001");
    }

    #[test]
    fn shown_never_underflows() {
        assert_eq!(shown(10, 4, 100, 90), (10, 4, 6));
        assert_eq!(shown(10, 14, 100, 90), (10, 10, 0));
        assert_eq!(shown(200, 4, 100, 3), (100, 4, 3));
    }
}
