//! Handing our hooks out: which hook function stands for each row of the
//! hook table, and the swap of a driver address for our hook that the
//! `dlsym` override and the `cuGetProcAddress` hooks (here) make.
//!
//! This is the one module that names the hook functions (the hook modules
//! name only rows of `hook_table`, so nothing imports back into a cycle).
//! Each hook is checked at compile time to have its row's function type,
//! and the rows are listed in table order (a missing, extra or misplaced
//! row does not compile).

use crate::cuda_hooks as cu;
use crate::extra_hooks as ex;
use crate::ffi::*;
use crate::graph_mem as gm;
use crate::hook_table::{self as rows, CudaHook, NvmlHook, CUDA_HOOK_COUNT, NVML_HOOK_COUNT};
use crate::launch_hooks as lh;
use crate::nvml_hooks as nv;
use crate::state;
use crate::state::real;
use crate::vmm;
use std::ffi::{c_char, c_int, c_void};

/// Whether `rows` is `0, 1, 2, …` (the table's order, every row once).
const fn in_table_order(rows: &[usize]) -> bool {
    let mut i = 0;
    while i < rows.len() {
        if rows[i] != i {
            return false;
        }
        i += 1;
    }
    true
}

macro_rules! our_hooks {
    ($table:ident, $count:ident, $fn_name:ident, $($row:ident => $hook:path,)*) => {
        const _: () = assert!(
            [$(<rows::$row as $table>::INDEX),*].len() == $count
                && in_table_order(&[$(<rows::$row as $table>::INDEX),*]),
            "every row of the hook table, in table order"
        );

        /// Our hook for row `index` (by address).
        fn $fn_name(index: usize) -> Option<usize> {
            const HOOKS: [fn() -> usize; $count] = [$(|| {
                // The hook has exactly the row's function type.
                let hook: <rows::$row as $table>::Fn = $hook;
                hook as usize
            }),*];
            HOOKS.get(index).map(|hook| hook())
        }
    };
}

our_hooks! {
    CudaHook, CUDA_HOOK_COUNT, our_cuda_hook,
    Init => cu::cuInit,
    GetProcAddress => cuGetProcAddress,
    GetProcAddressV2 => cuGetProcAddress_v2,
    MemAlloc => cu::cuMemAlloc_v2,
    MemAllocPitch => cu::cuMemAllocPitch_v2,
    MemAllocManaged => cu::cuMemAllocManaged,
    MemFree => cu::cuMemFree_v2,
    MemAllocAsync => cu::cuMemAllocAsync,
    MemAllocAsyncPtsz => cu::cuMemAllocAsync_ptsz,
    MemAllocFromPoolAsync => cu::cuMemAllocFromPoolAsync,
    MemAllocFromPoolAsyncPtsz => cu::cuMemAllocFromPoolAsync_ptsz,
    MemFreeAsync => cu::cuMemFreeAsync,
    MemFreeAsyncPtsz => cu::cuMemFreeAsync_ptsz,
    MemCreate => vmm::cuMemCreate,
    MemRelease => vmm::cuMemRelease,
    MemMap => vmm::cuMemMap,
    MemUnmap => vmm::cuMemUnmap,
    MemRetainAllocationHandle => vmm::cuMemRetainAllocationHandle,
    MemImportFromShareableHandle => vmm::cuMemImportFromShareableHandle,
    MipmappedArrayCreate => ex::cuMipmappedArrayCreate,
    MipmappedArrayDestroy => ex::cuMipmappedArrayDestroy,
    CtxSetLimit => ex::cuCtxSetLimit,
    MemPoolCreate => ex::cuMemPoolCreate,
    MemPoolDestroy => ex::cuMemPoolDestroy,
    DeviceGetDefaultMemPool => ex::cuDeviceGetDefaultMemPool,
    DeviceGetMemPool => ex::cuDeviceGetMemPool,
    DeviceSetMemPool => ex::cuDeviceSetMemPool,
    MemPoolSetAttribute => ex::cuMemPoolSetAttribute,
    MemPoolTrimTo => ex::cuMemPoolTrimTo,
    GraphAddMemAllocNode => gm::cuGraphAddMemAllocNode,
    DeviceGraphMemTrim => gm::cuDeviceGraphMemTrim,
    GraphExecDestroy => gm::cuGraphExecDestroy,
    GraphDestroy => gm::cuGraphDestroy,
    StreamEndCapture => gm::cuStreamEndCapture,
    StreamEndCapturePtsz => gm::cuStreamEndCapture_ptsz,
    ArrayCreate => cu::cuArrayCreate_v2,
    Array3DCreate => cu::cuArray3DCreate_v2,
    ArrayDestroy => cu::cuArrayDestroy,
    MemGetInfo => cu::cuMemGetInfo_v2,
    DeviceTotalMem => cu::cuDeviceTotalMem_v2,
    PrimaryCtxRetain => cu::cuDevicePrimaryCtxRetain,
    PrimaryCtxRelease => cu::cuDevicePrimaryCtxRelease_v2,
    PrimaryCtxReset => cu::cuDevicePrimaryCtxReset_v2,
    CtxCreate => cu::cuCtxCreate_v2,
    CtxCreateV3 => cu::cuCtxCreate_v3,
    CtxCreateV4 => cu::cuCtxCreate_v4,
    CtxDestroy => cu::cuCtxDestroy_v2,
    LaunchKernel => lh::cuLaunchKernel,
    LaunchKernelPtsz => lh::cuLaunchKernel_ptsz,
    LaunchKernelEx => lh::cuLaunchKernelEx,
    LaunchKernelExPtsz => lh::cuLaunchKernelEx_ptsz,
    LaunchCooperativeKernel => lh::cuLaunchCooperativeKernel,
    LaunchCooperativeKernelPtsz => lh::cuLaunchCooperativeKernel_ptsz,
    GraphLaunch => lh::cuGraphLaunch,
    GraphLaunchPtsz => lh::cuGraphLaunch_ptsz,
}

our_hooks! {
    NvmlHook, NVML_HOOK_COUNT, our_nvml_hook,
    NvmlMemoryInfo => nv::nvmlDeviceGetMemoryInfo,
    NvmlMemoryInfoV2 => nv::nvmlDeviceGetMemoryInfo_v2,
}

/// Our hook for a real driver address, if it is one we intercept.
pub fn cuda_hook_for_address(address: usize) -> Option<usize> {
    state::cuda()?.row_at(address).and_then(our_cuda_hook)
}

/// Our hook for a real NVML address, if it is one we intercept.
pub fn nvml_hook_for_address(address: usize) -> Option<usize> {
    state::nvml()?.row_at(address).and_then(our_nvml_hook)
}

/// Replaces a pointer the driver handed out with our hook, if it is one of
/// the addresses we intercept.
///
/// # Safety
/// `pfn` is null or valid for reads and writes of a pointer.
unsafe fn substitute_hook(pfn: *mut *mut c_void) {
    if pfn.is_null() {
        return;
    }
    // SAFETY: non-null, valid by this function's contract.
    let address = unsafe { *pfn } as usize;
    if let Some(hook) = cuda_hook_for_address(address) {
        // SAFETY: as above.
        unsafe { *pfn = hook as *mut c_void };
    }
}

/// # Safety
/// `cuGetProcAddress`'s contract: `symbol` is a NUL-terminated name and
/// `pfn` a valid out-pointer (or null, which the driver refuses).
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    flags: u64,
) -> CuResult {
    let real = real!(GetProcAddress);
    // SAFETY: forwarding the caller's exact arguments (version and flags).
    let rc = unsafe { real(symbol, pfn, cuda_version, flags) };
    if rc == CUDA_SUCCESS {
        // SAFETY: the driver accepted `pfn` as an out-pointer and filled it.
        unsafe { substitute_hook(pfn) };
    }
    rc
}

/// # Safety
/// `cuGetProcAddress_v2`'s contract: `symbol` is a NUL-terminated name,
/// `pfn` a valid out-pointer and `status` null or a valid out-pointer.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    flags: u64,
    status: *mut c_int,
) -> CuResult {
    let real = real!(GetProcAddressV2);
    // SAFETY: forwarding the caller's exact arguments (version and flags).
    let rc = unsafe { real(symbol, pfn, cuda_version, flags, status) };
    if rc == CUDA_SUCCESS {
        // SAFETY: the driver accepted `pfn` as an out-pointer and filled it.
        unsafe { substitute_hook(pfn) };
    }
    rc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_has_a_distinct_hook() {
        let hooks: Vec<usize> = (0..CUDA_HOOK_COUNT)
            .map(|i| our_cuda_hook(i).expect("a hook per row"))
            .collect();
        for (i, a) in hooks.iter().enumerate() {
            assert_ne!(*a, 0);
            assert!(!hooks[i + 1..].contains(a), "row {i} shares its hook");
        }
        assert_eq!(our_cuda_hook(CUDA_HOOK_COUNT), None);
        assert_ne!(our_nvml_hook(0), our_nvml_hook(1));
        assert_eq!(our_nvml_hook(NVML_HOOK_COUNT), None);
    }
}
