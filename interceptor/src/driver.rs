//! The real CUDA driver behind the hooks: `libcuda.so.1` loaded, every row
//! of the hook table resolved (by its exported name and by the driver's own
//! `cuGetProcAddress` for the row's name, version and flags), and the
//! driver functions the interceptor calls for itself, typed.
//!
//! A pointer handed to the application is replaced only when it is one of
//! the addresses a row resolved to ([`CudaDriver::row_at`]); anything else
//! (older ABIs such as the 32-bit `cuMemAlloc`, functions we don't hook)
//! passes through untouched.

use crate::ffi::*;
use crate::hook_table::{CudaHook, GetProcAddress, GetProcAddressV2, CUDA_HOOK_COUNT, CUDA_ROWS};
use crate::loader::{function_at, Library};
use std::ffi::{c_int, c_uint, c_void};

/// `cuCtxGetDevice`.
pub type CtxGetDeviceFn = unsafe extern "C" fn(*mut CuDevice) -> CuResult;
/// `cuDeviceGetUuid` and `cuDeviceGetUuid_v2` (a `CUuuid` is 16 bytes).
pub type DeviceGetUuidFn = unsafe extern "C" fn(*mut u8, CuDevice) -> CuResult;
/// `cuMemGetAllocationPropertiesFromHandle`.
pub type AllocationPropertiesFn = unsafe extern "C" fn(*mut MemAllocationProp, u64) -> CuResult;
/// `cuDeviceGetCount`.
pub type DeviceGetCountFn = unsafe extern "C" fn(*mut c_int) -> CuResult;
/// `cuMipmappedArrayGetMemoryRequirements`.
pub type MipmapRequirementsFn =
    unsafe extern "C" fn(*mut ArrayMemoryRequirements, Opaque, CuDevice) -> CuResult;
/// `cuCtxGetLimit`.
pub type CtxGetLimitFn = unsafe extern "C" fn(*mut usize, c_uint) -> CuResult;
/// `cuFuncGetAttribute`.
pub type FuncGetAttributeFn = unsafe extern "C" fn(*mut c_int, c_int, Opaque) -> CuResult;
/// `cuKernelGetAttribute` (CUDA 12.0+: the runtime launches library
/// kernels, `CUkernel`, which `cuFuncGetAttribute` does not describe).
pub type KernelGetAttributeFn =
    unsafe extern "C" fn(*mut c_int, c_int, Opaque, CuDevice) -> CuResult;
/// `cuDeviceGetAttribute`.
pub type DeviceGetAttributeFn = unsafe extern "C" fn(*mut c_int, c_int, CuDevice) -> CuResult;
/// `cuMemPoolGetAttribute`.
pub type MemPoolGetAttributeFn = unsafe extern "C" fn(Opaque, c_int, *mut c_void) -> CuResult;
/// `cuDeviceGetGraphMemAttribute`.
pub type GraphMemAttributeFn = unsafe extern "C" fn(CuDevice, c_int, *mut c_void) -> CuResult;
/// `cuGraphGetNodes`.
pub type GraphGetNodesFn = unsafe extern "C" fn(Opaque, *mut Opaque, *mut usize) -> CuResult;
/// `cuGraphNodeGetType`.
pub type GraphNodeGetTypeFn = unsafe extern "C" fn(Opaque, *mut c_int) -> CuResult;

/// The real driver behind the hooks.
#[derive(Debug)]
pub struct CudaDriver {
    /// What each row's hook calls: the export, or the proc address when the
    /// library exports no such symbol (0: neither).
    real: [usize; CUDA_HOOK_COUNT],
    exported: [usize; CUDA_HOOK_COUNT],
    proc: [usize; CUDA_HOOK_COUNT],
    /// `cuCtxGetDevice`, for charging the current context's card.
    pub ctx_get_device: Option<CtxGetDeviceFn>,
    /// `cuDeviceGetUuid_v2` or `cuDeviceGetUuid`, to find a card in NVML.
    pub device_get_uuid: Option<DeviceGetUuidFn>,
    /// `cuMemGetAllocationPropertiesFromHandle`, for the card of an
    /// imported allocation.
    pub allocation_properties: Option<AllocationPropertiesFn>,
    /// `cuDeviceGetCount`, for looking up NVML handles in advance.
    pub device_get_count: Option<DeviceGetCountFn>,
    /// `cuMipmappedArrayGetMemoryRequirements`, for what an array reserved.
    pub mipmap_requirements: Option<MipmapRequirementsFn>,
    /// `cuCtxGetLimit`, for what a limit was before `cuCtxSetLimit`.
    pub ctx_get_limit: Option<CtxGetLimitFn>,
    /// `cuFuncGetAttribute`, for a kernel's local memory per thread.
    pub func_get_attribute: Option<FuncGetAttributeFn>,
    /// `cuKernelGetAttribute`, the same for a library kernel.
    pub kernel_get_attribute: Option<KernelGetAttributeFn>,
    /// `cuDeviceGetAttribute`, for the threads a card holds at once.
    pub device_get_attribute: Option<DeviceGetAttributeFn>,
    /// `cuMemPoolGetAttribute`, for what a trimmed pool still reserves.
    pub mempool_get_attribute: Option<MemPoolGetAttributeFn>,
    /// `cuDeviceGetGraphMemAttribute`, for what graphs reserve on a card.
    pub graph_mem_attribute: Option<GraphMemAttributeFn>,
    /// `cuGraphGetNodes` and `cuGraphNodeGetType`, to find allocation
    /// nodes in a captured graph.
    pub graph_get_nodes: Option<GraphGetNodesFn>,
    /// See `graph_get_nodes`.
    pub graph_node_get_type: Option<GraphNodeGetTypeFn>,
}

/// The driver's answer to `cuGetProcAddress` for `row` (0 when it has none).
fn proc_address(
    get_v2: Option<<GetProcAddressV2 as CudaHook>::Fn>,
    get_v1: Option<<GetProcAddress as CudaHook>::Fn>,
    row: &crate::hook_table::HookEntry,
) -> usize {
    let mut pfn: *mut c_void = std::ptr::null_mut();
    let rc = if let Some(get) = get_v2 {
        let mut found = 0;
        // SAFETY: the driver's cuGetProcAddress_v2 with its documented
        // arguments: a NUL-terminated name and valid out-pointers.
        unsafe {
            get(
                row.proc_name.as_ptr(),
                &mut pfn,
                row.proc_version,
                row.proc_flags,
                &mut found,
            )
        }
    } else if let Some(get) = get_v1 {
        // SAFETY: the driver's cuGetProcAddress with its documented
        // arguments: a NUL-terminated name and a valid out-pointer.
        unsafe {
            get(
                row.proc_name.as_ptr(),
                &mut pfn,
                row.proc_version,
                row.proc_flags,
            )
        }
    } else {
        return 0;
    };
    if rc == CUDA_SUCCESS {
        pfn as usize
    } else {
        0
    }
}

impl CudaDriver {
    /// Loads `libcuda.so.1` and resolves every row.
    pub fn load() -> Option<CudaDriver> {
        let lib = Library::open(c"libcuda.so.1")?;
        let exported: [usize; CUDA_HOOK_COUNT] =
            std::array::from_fn(|i| lib.symbol(CUDA_ROWS[i].export));
        // SAFETY: the row types of cuGetProcAddress_v2 and cuGetProcAddress
        // are their signatures in cuda.h.
        let (get_v2, get_v1) = unsafe {
            (
                lib.function(CUDA_ROWS[GetProcAddressV2::INDEX].export),
                lib.function(CUDA_ROWS[GetProcAddress::INDEX].export),
            )
        };
        let mut proc = [0usize; CUDA_HOOK_COUNT];
        for (i, row) in CUDA_ROWS.iter().enumerate() {
            let addr = proc_address(get_v2, get_v1, row);
            if addr == 0 {
                continue;
            }
            // An address another row already owns is that row's ABI
            // (e.g. an old driver answering cuCtxCreate@12050 with v3).
            let owned_elsewhere = exported
                .iter()
                .enumerate()
                .any(|(j, &a)| j != i && a == addr)
                || proc[..i].contains(&addr);
            if !owned_elsewhere {
                proc[i] = addr;
            }
        }
        let real = std::array::from_fn(|i| match exported[i] {
            0 => proc[i],
            e => e,
        });
        // SAFETY: each type is the named function's signature in cuda.h
        // (see the type aliases above).
        let driver = unsafe {
            CudaDriver {
                real,
                exported,
                proc,
                ctx_get_device: lib.function(c"cuCtxGetDevice"),
                device_get_uuid: lib
                    .function(c"cuDeviceGetUuid_v2")
                    .or_else(|| lib.function(c"cuDeviceGetUuid")),
                allocation_properties: lib.function(c"cuMemGetAllocationPropertiesFromHandle"),
                device_get_count: lib.function(c"cuDeviceGetCount"),
                mipmap_requirements: lib.function(c"cuMipmappedArrayGetMemoryRequirements"),
                ctx_get_limit: lib.function(c"cuCtxGetLimit"),
                func_get_attribute: lib.function(c"cuFuncGetAttribute"),
                kernel_get_attribute: lib.function(c"cuKernelGetAttribute"),
                device_get_attribute: lib.function(c"cuDeviceGetAttribute"),
                mempool_get_attribute: lib.function(c"cuMemPoolGetAttribute"),
                graph_mem_attribute: lib.function(c"cuDeviceGetGraphMemAttribute"),
                graph_get_nodes: lib.function(c"cuGraphGetNodes"),
                graph_node_get_type: lib.function(c"cuGraphNodeGetType"),
            }
        };
        Some(driver)
    }

    /// The real function behind row `H`, typed as the row says, if the
    /// driver has one.
    #[inline(always)]
    pub fn real<H: CudaHook>(&self) -> Option<H::Fn> {
        // SAFETY: `real[H::INDEX]` is 0 or the address the driver exports
        // under the row's exact name, or answers `cuGetProcAddress` with for
        // the row's name, version and flags (an address another row owns is
        // left out, `load`): either way the entry point of that ABI, whose C
        // signature the row's type states. libcuda is never unloaded.
        unsafe { function_at::<H::Fn>(self.real[H::INDEX]) }
    }

    /// The row whose driver address `address` is, if it is one we
    /// intercept.
    pub fn row_at(&self, address: usize) -> Option<usize> {
        if address == 0 {
            return None;
        }
        (0..CUDA_HOOK_COUNT).find(|&i| self.exported[i] == address || self.proc[i] == address)
    }
}
