//! The one binding of the real NVML (`libnvidia-ml.so.1`): the rows of the
//! hook table (the memory queries) resolved by address, and every other
//! NVML function the interceptor calls, typed: the context measurements
//! (`nvml_hooks`) and the SM updater (`sm_updater`) share it.

use crate::ffi::*;
use crate::hook_table::{NvmlHook, NVML_HOOK_COUNT, NVML_ROWS};
use crate::loader::{function_at, Library};
use std::ffi::{c_char, c_uint};

/// `nvmlInit_v2`.
pub type InitFn = unsafe extern "C" fn() -> NvmlReturn;
/// `nvmlDeviceGetIndex`.
pub type IndexFn = unsafe extern "C" fn(NvmlDevice, *mut c_uint) -> NvmlReturn;
/// `nvmlDeviceGetHandleByUUID`.
pub type HandleByUuidFn = unsafe extern "C" fn(*const c_char, *mut NvmlDevice) -> NvmlReturn;
/// `nvmlDeviceGetUUID`.
pub type UuidFn = unsafe extern "C" fn(NvmlDevice, *mut c_char, c_uint) -> NvmlReturn;
/// `nvmlDeviceGetComputeRunningProcesses_v3` (`_v2`: the same layout).
pub type RunningProcessesFn =
    unsafe extern "C" fn(NvmlDevice, *mut c_uint, *mut NvmlProcessInfo) -> NvmlReturn;
/// `nvmlDeviceGetProcessUtilization`.
pub type ProcessUtilizationFn = unsafe extern "C" fn(
    NvmlDevice,
    *mut NvmlProcessUtilizationSample,
    *mut c_uint,
    u64,
) -> NvmlReturn;
/// `nvmlDeviceGetUtilizationRates`.
pub type UtilizationRatesFn = unsafe extern "C" fn(NvmlDevice, *mut NvmlUtilization) -> NvmlReturn;

/// The real NVML.
#[derive(Debug)]
pub struct NvmlLibrary {
    /// The real functions of the NVML rows (0: absent).
    real: [usize; NVML_HOOK_COUNT],
    /// `nvmlInit_v2` (NVML counts initialisations: each user calls it).
    pub init: Option<InitFn>,
    /// `nvmlDeviceGetIndex`.
    pub device_index: Option<IndexFn>,
    /// `nvmlDeviceGetHandleByUUID`.
    pub handle_by_uuid: Option<HandleByUuidFn>,
    /// `nvmlDeviceGetUUID`, to find an NVML card in the container's list.
    pub device_uuid: Option<UuidFn>,
    /// `nvmlDeviceGetComputeRunningProcesses_v3` (or `_v2`, same layout).
    pub running_processes: Option<RunningProcessesFn>,
    /// `nvmlDeviceGetProcessUtilization`.
    pub process_utilization: Option<ProcessUtilizationFn>,
    /// `nvmlDeviceGetUtilizationRates`.
    pub utilization_rates: Option<UtilizationRatesFn>,
}

impl NvmlLibrary {
    /// Loads `libnvidia-ml.so.1` (no initialisation: see [`Self::initialise`]).
    pub fn load() -> Option<NvmlLibrary> {
        let lib = Library::open(c"libnvidia-ml.so.1")?;
        let real = std::array::from_fn(|i| lib.symbol(NVML_ROWS[i]));
        // SAFETY: each type is the named function's signature in nvml.h
        // (see the type aliases above).
        let nvml = unsafe {
            NvmlLibrary {
                real,
                init: lib.function(c"nvmlInit_v2"),
                device_index: lib.function(c"nvmlDeviceGetIndex"),
                handle_by_uuid: lib.function(c"nvmlDeviceGetHandleByUUID"),
                device_uuid: lib.function(c"nvmlDeviceGetUUID"),
                running_processes: lib
                    .function(c"nvmlDeviceGetComputeRunningProcesses_v3")
                    .or_else(|| lib.function(c"nvmlDeviceGetComputeRunningProcesses_v2")),
                process_utilization: lib.function(c"nvmlDeviceGetProcessUtilization"),
                utilization_rates: lib.function(c"nvmlDeviceGetUtilizationRates"),
            }
        };
        Some(nvml)
    }

    /// `nvmlInit_v2`: whether NVML is ready for this caller.
    pub fn initialise(&self) -> bool {
        // SAFETY: nvmlInit_v2(void), callable any number of times.
        self.init
            .is_some_and(|init| unsafe { init() } == NVML_SUCCESS)
    }

    /// The real function behind NVML row `H`, typed as the row says.
    #[inline]
    pub fn real<H: NvmlHook>(&self) -> Option<H::Fn> {
        // SAFETY: 0 or the address NVML exports under the row's exact name,
        // whose C signature the row's type states; NVML is never unloaded.
        unsafe { function_at::<H::Fn>(self.real[H::INDEX]) }
    }

    /// The NVML row whose real address `address` is, if any.
    pub fn row_at(&self, address: usize) -> Option<usize> {
        (address != 0)
            .then(|| self.real.iter().position(|&a| a == address))
            .flatten()
    }
}
