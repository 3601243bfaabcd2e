//! A fake `libnvidia-ml.so.1` for the interceptor's CI tests: NVML's memory
//! view of the cards simulated by the fake `libcuda.so.1` (same environment
//! variables). Used memory is read from the fake driver when it is loaded in
//! the process (`fake_cuda_device_used`), else it is zero, as on an idle card.
#![allow(clippy::missing_safety_doc)] // C ABI entry points; contracts are NVML's.
#![allow(non_snake_case)]

use std::ffi::{c_char, c_int, c_uint, CStr};

type NvmlReturn = c_int;
const SUCCESS: NvmlReturn = 0;
const INVALID_ARGUMENT: NvmlReturn = 2;
const NOT_FOUND: NvmlReturn = 6;
const INSUFFICIENT_SIZE: NvmlReturn = 7;

/// `nvmlMemory_t`.
#[repr(C)]
#[derive(Debug)]
pub struct Memory {
    total: u64,
    free: u64,
    used: u64,
}

/// `nvmlMemory_v2_t`.
#[repr(C)]
#[derive(Debug)]
pub struct MemoryV2 {
    version: c_uint,
    total: u64,
    reserved: u64,
    free: u64,
    used: u64,
}

/// Device handles are `&DEVICES[i]`.
static DEVICES: [u8; 16] = [0; 16];

fn device_count() -> usize {
    std::env::var("FAKE_CUDA_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2usize)
        .min(DEVICES.len())
}

fn index_of(device: *const u8) -> Option<usize> {
    let base = DEVICES.as_ptr() as usize;
    let i = (device as usize).checked_sub(base)?;
    (i < device_count()).then_some(i)
}

/// Size of card `index`: `FAKE_CUDA_TOTAL_MIB` is one size for all cards
/// or a comma list, one per card (the last repeats), as in the fake driver.
fn total_bytes(index: usize) -> u64 {
    let text = std::env::var("FAKE_CUDA_TOTAL_MIB").unwrap_or_default();
    let sizes: Vec<u64> = text
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    sizes.get(index).or(sizes.last()).copied().unwrap_or(16384) << 20
}

/// Usage as the fake driver in this process sees it (0 when it isn't loaded).
// (The handle from RTLD_NOLOAD is a reference count we never drop: test code.)
fn used_bytes(index: usize) -> u64 {
    // SAFETY: dlsym with a NUL-terminated name; the symbol, when present, is
    // `extern "C" fn(u32) -> u64` in the fake driver.
    unsafe {
        // The fake driver may be loaded RTLD_LOCAL (dlopen'ed by the
        // program), so look in it rather than the global scope.
        let driver = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if driver.is_null() {
            return 0;
        }
        let f = libc::dlsym(driver, c"fake_cuda_device_used".as_ptr());
        if f.is_null() {
            return 0;
        }
        let f: extern "C" fn(c_uint) -> u64 = std::mem::transmute(f);
        f(index as c_uint)
    }
}

fn uuid_string(index: usize) -> String {
    // Same bytes as the fake driver's cuDeviceGetUuid, in NVML's text form.
    let mut b = [0x5au8; 16];
    b[15] = index as u8;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[no_mangle]
pub extern "C" fn nvmlInit_v2() -> NvmlReturn {
    SUCCESS
}

#[no_mangle]
pub extern "C" fn nvmlInit() -> NvmlReturn {
    SUCCESS
}

#[no_mangle]
pub extern "C" fn nvmlShutdown() -> NvmlReturn {
    SUCCESS
}

#[no_mangle]
pub extern "C" fn nvmlErrorString(_result: NvmlReturn) -> *const c_char {
    c"fake nvml error".as_ptr()
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> NvmlReturn {
    unsafe { *count = device_count() as c_uint };
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut *const u8,
) -> NvmlReturn {
    if index as usize >= device_count() {
        return INVALID_ARGUMENT;
    }
    unsafe { *device = &DEVICES[index as usize] };
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut *const u8,
) -> NvmlReturn {
    let wanted = unsafe { CStr::from_ptr(uuid) }.to_string_lossy();
    match (0..device_count()).find(|&i| uuid_string(i) == wanted) {
        Some(i) => {
            unsafe { *device = &DEVICES[i] };
            SUCCESS
        }
        None => NOT_FOUND,
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetIndex(device: *const u8, index: *mut c_uint) -> NvmlReturn {
    match index_of(device) {
        Some(i) => {
            unsafe { *index = i as c_uint };
            SUCCESS
        }
        None => INVALID_ARGUMENT,
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: *const u8,
    out: *mut c_char,
    len: c_uint,
) -> NvmlReturn {
    let Some(i) = index_of(device) else {
        return INVALID_ARGUMENT;
    };
    let text = uuid_string(i);
    if text.len() + 1 > len as usize {
        return INVALID_ARGUMENT;
    }
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr() as *const c_char, out, text.len());
        *out.add(text.len()) = 0;
    }
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: *const u8,
    memory: *mut Memory,
) -> NvmlReturn {
    let Some(i) = index_of(device) else {
        return INVALID_ARGUMENT;
    };
    let (total, used) = (total_bytes(i), used_bytes(i));
    unsafe {
        *memory = Memory {
            total,
            free: total - used,
            used,
        }
    };
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: *const u8,
    memory: *mut MemoryV2,
) -> NvmlReturn {
    let Some(i) = index_of(device) else {
        return INVALID_ARGUMENT;
    };
    let reserved = 4 << 20;
    let (total, used) = (total_bytes(i), used_bytes(i));
    unsafe {
        let version = (*memory).version;
        *memory = MemoryV2 {
            version,
            total,
            reserved,
            free: total - used - reserved,
            used,
        }
    };
    SUCCESS
}

/// `nvmlProcessInfo_t` (v2/v3).
#[repr(C)]
#[derive(Debug)]
pub struct ProcessInfo {
    pid: c_uint,
    used_gpu_memory: u64,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

/// Lists this process (the only one the fake card knows) when it uses the
/// card. `FAKE_NVML_NO_PROCESSES=1` lists none; `FAKE_NVML_PID_OFFSET=<n>`
/// lists it under its pid plus `n`, as a host pid seen from inside a pid
/// namespace.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: *const u8,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> NvmlReturn {
    let Some(i) = index_of(device) else {
        return INVALID_ARGUMENT;
    };
    let used = used_bytes(i);
    let listed = used > 0 && std::env::var_os("FAKE_NVML_NO_PROCESSES").is_none();
    unsafe {
        if listed && *count >= 1 {
            *infos = ProcessInfo {
                pid: std::process::id() + pid_offset(),
                used_gpu_memory: used,
                gpu_instance_id: u32::MAX,
                compute_instance_id: u32::MAX,
            };
        }
        *count = listed as c_uint;
    }
    SUCCESS
}

/// `FAKE_NVML_PID_OFFSET` (default 0).
fn pid_offset() -> c_uint {
    std::env::var("FAKE_NVML_PID_OFFSET")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `nvmlProcessUtilizationSample_t`.
#[repr(C)]
#[derive(Debug)]
pub struct ProcessUtilizationSample {
    pid: c_uint,
    time_stamp: u64,
    sm_util: c_uint,
    mem_util: c_uint,
    enc_util: c_uint,
    dec_util: c_uint,
}

/// `nvmlUtilization_t`.
#[repr(C)]
#[derive(Debug)]
pub struct Utilization {
    gpu: c_uint,
    memory: c_uint,
}

/// SM utilisation the fake reports: `FAKE_NVML_SM_UTIL` percent (default 0).
fn sm_util() -> c_uint {
    std::env::var("FAKE_NVML_SM_UTIL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One fresh sample for this process at `FAKE_NVML_SM_UTIL` percent (under
/// a pid 100000 higher, as a host pid, with `FAKE_NVML_NO_PROCESSES=1`).
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    device: *const u8,
    samples: *mut ProcessUtilizationSample,
    count: *mut c_uint,
    last_seen: u64,
) -> NvmlReturn {
    if index_of(device).is_none() || count.is_null() {
        return INVALID_ARGUMENT;
    }
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    if now_us <= last_seen {
        return NOT_FOUND;
    }
    let pid = if std::env::var_os("FAKE_NVML_NO_PROCESSES").is_some() {
        std::process::id() + 100_000
    } else {
        std::process::id()
    };
    unsafe {
        if samples.is_null() || *count < 1 {
            *count = 1;
            return INSUFFICIENT_SIZE;
        }
        *samples = ProcessUtilizationSample {
            pid,
            time_stamp: now_us,
            sm_util: sm_util(),
            mem_util: 0,
            enc_util: 0,
            dec_util: 0,
        };
        *count = 1;
    }
    SUCCESS
}

/// The card at `FAKE_NVML_SM_UTIL` percent.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: *const u8,
    utilization: *mut Utilization,
) -> NvmlReturn {
    if index_of(device).is_none() || utilization.is_null() {
        return INVALID_ARGUMENT;
    }
    unsafe {
        *utilization = Utilization {
            gpu: sm_util(),
            memory: 0,
        }
    };
    SUCCESS
}
