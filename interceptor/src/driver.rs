//! The hook table: which driver and NVML entry points are intercepted, the
//! real addresses behind each, and the address-to-hook lookup used by the
//! `dlsym` override and `cuGetProcAddress`.
//!
//! Hooks are chosen by address, never by name prefix: for every hooked entry
//! point the table holds the address the library exports under the entry's
//! exact name and the address the driver's own `cuGetProcAddress` returns for
//! the entry's name, version and flags (`_ptsz` variants are their own
//! entries). A pointer handed to the application is replaced only when it is
//! one of those addresses; anything else (older ABIs such as the 32-bit
//! `cuMemAlloc`, functions we don't hook) passes through untouched.

use crate::cuda_hooks as cu;
use crate::extra_hooks as ex;
use crate::ffi::PROC_PER_THREAD;
use crate::graph_mem as gm;
use crate::launch_hooks as lh;
use crate::loader::Library;
use crate::nvml_hooks as nv;
use crate::vmm;
use std::ffi::{c_char, c_int, c_void, CStr};

/// One intercepted driver entry point.
#[derive(Debug)]
pub struct HookEntry {
    /// The exported symbol (its ABI is the hook's).
    pub export: &'static CStr,
    /// The name `cuGetProcAddress` knows it by.
    pub proc_name: &'static CStr,
    /// The CUDA version that yields this ABI from `cuGetProcAddress`.
    pub proc_version: c_int,
    /// `cuGetProcAddress` flags that yield this variant.
    pub proc_flags: u64,
}

macro_rules! hook_table {
    ($($variant:ident => $export:literal, $proc:literal, $version:literal, $flags:expr, $hook:path;)*) => {
        /// Index of each intercepted driver entry point.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(usize)]
        pub enum Hook { $($variant),* }

        /// Entries, in [`Hook`] order.
        pub const ENTRIES: &[HookEntry] = &[
            $(HookEntry { export: $export, proc_name: $proc, proc_version: $version, proc_flags: $flags }),*
        ];

        /// Address of our hook for entry `index`.
        fn hook_address(index: usize) -> usize {
            const HOOKS: &[fn() -> usize] = &[$(|| $hook as *const () as usize),*];
            HOOKS[index]()
        }
    };
}

// Order matters where one name has several ABIs (cuCtxCreate): when two
// entries resolve to the same address, the first one keeps it.
hook_table! {
    Init => c"cuInit", c"cuInit", 2000, 0, cu::cuInit;
    GetProcAddress => c"cuGetProcAddress", c"cuGetProcAddress", 11030, 0, cu::cuGetProcAddress;
    GetProcAddressV2 => c"cuGetProcAddress_v2", c"cuGetProcAddress", 12000, 0, cu::cuGetProcAddress_v2;
    MemAlloc => c"cuMemAlloc_v2", c"cuMemAlloc", 3020, 0, cu::cuMemAlloc_v2;
    MemAllocPitch => c"cuMemAllocPitch_v2", c"cuMemAllocPitch", 3020, 0, cu::cuMemAllocPitch_v2;
    MemAllocManaged => c"cuMemAllocManaged", c"cuMemAllocManaged", 6000, 0, cu::cuMemAllocManaged;
    MemFree => c"cuMemFree_v2", c"cuMemFree", 3020, 0, cu::cuMemFree_v2;
    MemAllocAsync => c"cuMemAllocAsync", c"cuMemAllocAsync", 11020, 0, cu::cuMemAllocAsync;
    MemAllocAsyncPtsz => c"cuMemAllocAsync_ptsz", c"cuMemAllocAsync", 11020, PROC_PER_THREAD, cu::cuMemAllocAsync_ptsz;
    MemAllocFromPoolAsync => c"cuMemAllocFromPoolAsync", c"cuMemAllocFromPoolAsync", 11020, 0, cu::cuMemAllocFromPoolAsync;
    MemAllocFromPoolAsyncPtsz => c"cuMemAllocFromPoolAsync_ptsz", c"cuMemAllocFromPoolAsync", 11020, PROC_PER_THREAD, cu::cuMemAllocFromPoolAsync_ptsz;
    MemFreeAsync => c"cuMemFreeAsync", c"cuMemFreeAsync", 11020, 0, cu::cuMemFreeAsync;
    MemFreeAsyncPtsz => c"cuMemFreeAsync_ptsz", c"cuMemFreeAsync", 11020, PROC_PER_THREAD, cu::cuMemFreeAsync_ptsz;
    MemCreate => c"cuMemCreate", c"cuMemCreate", 10020, 0, vmm::cuMemCreate;
    MemRelease => c"cuMemRelease", c"cuMemRelease", 10020, 0, vmm::cuMemRelease;
    MemMap => c"cuMemMap", c"cuMemMap", 10020, 0, vmm::cuMemMap;
    MemUnmap => c"cuMemUnmap", c"cuMemUnmap", 10020, 0, vmm::cuMemUnmap;
    MemRetainAllocationHandle => c"cuMemRetainAllocationHandle", c"cuMemRetainAllocationHandle", 11000, 0, vmm::cuMemRetainAllocationHandle;
    MemImportFromShareableHandle => c"cuMemImportFromShareableHandle", c"cuMemImportFromShareableHandle", 10020, 0, vmm::cuMemImportFromShareableHandle;
    MipmappedArrayCreate => c"cuMipmappedArrayCreate", c"cuMipmappedArrayCreate", 5000, 0, ex::cuMipmappedArrayCreate;
    MipmappedArrayDestroy => c"cuMipmappedArrayDestroy", c"cuMipmappedArrayDestroy", 5000, 0, ex::cuMipmappedArrayDestroy;
    CtxSetLimit => c"cuCtxSetLimit", c"cuCtxSetLimit", 3010, 0, ex::cuCtxSetLimit;
    MemPoolCreate => c"cuMemPoolCreate", c"cuMemPoolCreate", 11020, 0, ex::cuMemPoolCreate;
    MemPoolDestroy => c"cuMemPoolDestroy", c"cuMemPoolDestroy", 11020, 0, ex::cuMemPoolDestroy;
    DeviceGetDefaultMemPool => c"cuDeviceGetDefaultMemPool", c"cuDeviceGetDefaultMemPool", 11020, 0, ex::cuDeviceGetDefaultMemPool;
    DeviceGetMemPool => c"cuDeviceGetMemPool", c"cuDeviceGetMemPool", 11020, 0, ex::cuDeviceGetMemPool;
    DeviceSetMemPool => c"cuDeviceSetMemPool", c"cuDeviceSetMemPool", 11020, 0, ex::cuDeviceSetMemPool;
    MemPoolSetAttribute => c"cuMemPoolSetAttribute", c"cuMemPoolSetAttribute", 11020, 0, ex::cuMemPoolSetAttribute;
    MemPoolTrimTo => c"cuMemPoolTrimTo", c"cuMemPoolTrimTo", 11020, 0, ex::cuMemPoolTrimTo;
    GraphAddMemAllocNode => c"cuGraphAddMemAllocNode", c"cuGraphAddMemAllocNode", 11040, 0, gm::cuGraphAddMemAllocNode;
    DeviceGraphMemTrim => c"cuDeviceGraphMemTrim", c"cuDeviceGraphMemTrim", 11040, 0, gm::cuDeviceGraphMemTrim;
    GraphExecDestroy => c"cuGraphExecDestroy", c"cuGraphExecDestroy", 10000, 0, gm::cuGraphExecDestroy;
    GraphDestroy => c"cuGraphDestroy", c"cuGraphDestroy", 10000, 0, gm::cuGraphDestroy;
    StreamEndCapture => c"cuStreamEndCapture", c"cuStreamEndCapture", 10000, 0, gm::cuStreamEndCapture;
    StreamEndCapturePtsz => c"cuStreamEndCapture_ptsz", c"cuStreamEndCapture", 10000, PROC_PER_THREAD, gm::cuStreamEndCapture_ptsz;
    ArrayCreate => c"cuArrayCreate_v2", c"cuArrayCreate", 3020, 0, cu::cuArrayCreate_v2;
    Array3DCreate => c"cuArray3DCreate_v2", c"cuArray3DCreate", 3020, 0, cu::cuArray3DCreate_v2;
    ArrayDestroy => c"cuArrayDestroy", c"cuArrayDestroy", 2000, 0, cu::cuArrayDestroy;
    MemGetInfo => c"cuMemGetInfo_v2", c"cuMemGetInfo", 3020, 0, cu::cuMemGetInfo_v2;
    DeviceTotalMem => c"cuDeviceTotalMem_v2", c"cuDeviceTotalMem", 3020, 0, cu::cuDeviceTotalMem_v2;
    PrimaryCtxRetain => c"cuDevicePrimaryCtxRetain", c"cuDevicePrimaryCtxRetain", 7000, 0, cu::cuDevicePrimaryCtxRetain;
    PrimaryCtxRelease => c"cuDevicePrimaryCtxRelease_v2", c"cuDevicePrimaryCtxRelease", 11000, 0, cu::cuDevicePrimaryCtxRelease_v2;
    PrimaryCtxReset => c"cuDevicePrimaryCtxReset_v2", c"cuDevicePrimaryCtxReset", 11000, 0, cu::cuDevicePrimaryCtxReset_v2;
    CtxCreate => c"cuCtxCreate_v2", c"cuCtxCreate", 3020, 0, cu::cuCtxCreate_v2;
    CtxCreateV3 => c"cuCtxCreate_v3", c"cuCtxCreate", 11040, 0, cu::cuCtxCreate_v3;
    CtxCreateV4 => c"cuCtxCreate_v4", c"cuCtxCreate", 12050, 0, cu::cuCtxCreate_v4;
    CtxDestroy => c"cuCtxDestroy_v2", c"cuCtxDestroy", 4000, 0, cu::cuCtxDestroy_v2;
    LaunchKernel => c"cuLaunchKernel", c"cuLaunchKernel", 4000, 0, lh::cuLaunchKernel;
    LaunchKernelPtsz => c"cuLaunchKernel_ptsz", c"cuLaunchKernel", 4000, PROC_PER_THREAD, lh::cuLaunchKernel_ptsz;
    LaunchKernelEx => c"cuLaunchKernelEx", c"cuLaunchKernelEx", 11060, 0, lh::cuLaunchKernelEx;
    LaunchKernelExPtsz => c"cuLaunchKernelEx_ptsz", c"cuLaunchKernelEx", 11060, PROC_PER_THREAD, lh::cuLaunchKernelEx_ptsz;
    LaunchCooperativeKernel => c"cuLaunchCooperativeKernel", c"cuLaunchCooperativeKernel", 9000, 0, lh::cuLaunchCooperativeKernel;
    LaunchCooperativeKernelPtsz => c"cuLaunchCooperativeKernel_ptsz", c"cuLaunchCooperativeKernel", 9000, PROC_PER_THREAD, lh::cuLaunchCooperativeKernel_ptsz;
    GraphLaunch => c"cuGraphLaunch", c"cuGraphLaunch", 10000, 0, lh::cuGraphLaunch;
    GraphLaunchPtsz => c"cuGraphLaunch_ptsz", c"cuGraphLaunch", 10000, PROC_PER_THREAD, lh::cuGraphLaunch_ptsz;
}

/// Intercepted NVML entry points (NVML has no proc-address mechanism).
pub const NVML_EXPORTS: &[&CStr] = &[c"nvmlDeviceGetMemoryInfo", c"nvmlDeviceGetMemoryInfo_v2"];

fn nvml_hook_address(index: usize) -> usize {
    match index {
        0 => nv::nvmlDeviceGetMemoryInfo as *const () as usize,
        _ => nv::nvmlDeviceGetMemoryInfo_v2 as *const () as usize,
    }
}

/// Whether `name` is exactly one of the names we intercept (a cheap filter
/// before any library is loaded; the decision itself is by address).
pub fn is_intercepted_name(name: &CStr) -> bool {
    ENTRIES
        .iter()
        .any(|e| e.export == name || e.proc_name == name)
        || NVML_EXPORTS.contains(&name)
}

type GetProcV2 =
    unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int) -> c_int;
type GetProcV1 = unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64) -> c_int;

/// The real driver behind the hooks.
#[derive(Debug)]
pub struct CudaDriver {
    /// What each hook calls: the export, or the proc address when the
    /// library exports no such symbol.
    real: Vec<usize>,
    exported: Vec<usize>,
    proc: Vec<usize>,
    /// `cuCtxGetDevice`, for charging the current context's card.
    pub ctx_get_device: usize,
    /// `cuDeviceGetUuid_v2` or `cuDeviceGetUuid`, to find a card in NVML.
    pub device_get_uuid: usize,
    /// `cuMemGetAllocationPropertiesFromHandle`, for the card of an
    /// imported allocation.
    pub allocation_properties: usize,
    /// `cuDeviceGetCount`, for looking up NVML handles in advance.
    pub device_get_count: usize,
    /// `cuMipmappedArrayGetMemoryRequirements`, for what an array reserved.
    pub mipmap_requirements: usize,
    /// `cuCtxGetLimit`, for what a limit was before `cuCtxSetLimit`.
    pub ctx_get_limit: usize,
    /// `cuMemPoolGetAttribute`, for what a trimmed pool still reserves.
    pub mempool_get_attribute: usize,
    /// `cuDeviceGetGraphMemAttribute`, for what graphs reserve on a card.
    pub graph_mem_attribute: usize,
    /// `cuGraphGetNodes` and `cuGraphNodeGetType`, to find allocation
    /// nodes in a captured graph.
    pub graph_get_nodes: usize,
    /// See `graph_get_nodes`.
    pub graph_node_get_type: usize,
}

impl CudaDriver {
    /// Loads `libcuda.so.1` and resolves every entry.
    pub fn load() -> Option<CudaDriver> {
        let lib = Library::open(c"libcuda.so.1")?;
        let exported: Vec<usize> = ENTRIES.iter().map(|e| lib.symbol(e.export)).collect();
        let get_v2 = lib.symbol(c"cuGetProcAddress_v2");
        let get_v1 = lib.symbol(c"cuGetProcAddress");
        let mut proc = vec![0usize; ENTRIES.len()];
        for (i, entry) in ENTRIES.iter().enumerate() {
            let mut pfn: *mut c_void = std::ptr::null_mut();
            // SAFETY: the driver's cuGetProcAddress with its documented
            // arguments; pfn is a valid out-pointer.
            let rc = unsafe {
                if get_v2 != 0 {
                    let f = std::mem::transmute::<usize, GetProcV2>(get_v2);
                    let mut found = 0;
                    f(
                        entry.proc_name.as_ptr(),
                        &mut pfn,
                        entry.proc_version,
                        entry.proc_flags,
                        &mut found,
                    )
                } else if get_v1 != 0 {
                    let f = std::mem::transmute::<usize, GetProcV1>(get_v1);
                    f(
                        entry.proc_name.as_ptr(),
                        &mut pfn,
                        entry.proc_version,
                        entry.proc_flags,
                    )
                } else {
                    -1
                }
            };
            let addr = pfn as usize;
            if rc != 0 || addr == 0 {
                continue;
            }
            // An address another entry already owns is that entry's ABI
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
        let real = exported
            .iter()
            .zip(&proc)
            .map(|(&e, &p)| if e != 0 { e } else { p })
            .collect();
        let device_get_uuid = match lib.symbol(c"cuDeviceGetUuid_v2") {
            0 => lib.symbol(c"cuDeviceGetUuid"),
            f => f,
        };
        Some(CudaDriver {
            real,
            exported,
            proc,
            ctx_get_device: lib.symbol(c"cuCtxGetDevice"),
            device_get_uuid,
            allocation_properties: lib.symbol(c"cuMemGetAllocationPropertiesFromHandle"),
            device_get_count: lib.symbol(c"cuDeviceGetCount"),
            mipmap_requirements: lib.symbol(c"cuMipmappedArrayGetMemoryRequirements"),
            ctx_get_limit: lib.symbol(c"cuCtxGetLimit"),
            mempool_get_attribute: lib.symbol(c"cuMemPoolGetAttribute"),
            graph_mem_attribute: lib.symbol(c"cuDeviceGetGraphMemAttribute"),
            graph_get_nodes: lib.symbol(c"cuGraphGetNodes"),
            graph_node_get_type: lib.symbol(c"cuGraphNodeGetType"),
        })
    }

    /// The real function behind `hook`, if the driver has one.
    #[inline]
    pub fn real(&self, hook: Hook) -> Option<usize> {
        match self.real[hook as usize] {
            0 => None,
            f => Some(f),
        }
    }

    /// Our hook for a driver address, if it is one we intercept.
    pub fn hook_for_address(&self, address: usize) -> Option<usize> {
        if address == 0 {
            return None;
        }
        (0..ENTRIES.len())
            .find(|&i| self.exported[i] == address || self.proc[i] == address)
            .map(hook_address)
    }
}

/// The real NVML behind its hooks.
#[derive(Debug)]
pub struct NvmlLibrary {
    /// Real `nvmlDeviceGetMemoryInfo`, `_v2`.
    pub memory_info: [usize; 2],
    /// `nvmlInit_v2`.
    pub init: usize,
    /// `nvmlDeviceGetIndex`.
    pub device_index: usize,
    /// `nvmlDeviceGetHandleByUUID`.
    pub handle_by_uuid: usize,
    /// `nvmlDeviceGetUUID`, to find an NVML card in the container's list.
    pub device_uuid: usize,
    /// `nvmlDeviceGetComputeRunningProcesses_v3` (or `_v2`, same layout).
    pub running_processes: usize,
}

impl NvmlLibrary {
    /// Loads `libnvidia-ml.so.1`.
    pub fn load() -> Option<NvmlLibrary> {
        let lib = Library::open(c"libnvidia-ml.so.1")?;
        Some(NvmlLibrary {
            memory_info: [lib.symbol(NVML_EXPORTS[0]), lib.symbol(NVML_EXPORTS[1])],
            init: lib.symbol(c"nvmlInit_v2"),
            device_index: lib.symbol(c"nvmlDeviceGetIndex"),
            handle_by_uuid: lib.symbol(c"nvmlDeviceGetHandleByUUID"),
            device_uuid: lib.symbol(c"nvmlDeviceGetUUID"),
            running_processes: match lib.symbol(c"nvmlDeviceGetComputeRunningProcesses_v3") {
                0 => lib.symbol(c"nvmlDeviceGetComputeRunningProcesses_v2"),
                f => f,
            },
        })
    }

    /// Our hook for an NVML address, if it is one we intercept.
    pub fn hook_for_address(&self, address: usize) -> Option<usize> {
        (address != 0)
            .then(|| self.memory_info.iter().position(|&a| a == address))
            .flatten()
            .map(nvml_hook_address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        assert_eq!(ENTRIES[Hook::MemAlloc as usize].export, c"cuMemAlloc_v2");
        assert_eq!(
            ENTRIES[Hook::CtxDestroy as usize].export,
            c"cuCtxDestroy_v2"
        );
        assert!(is_intercepted_name(c"cuMemAllocAsync_ptsz"));
        assert!(is_intercepted_name(c"cuMemAlloc"));
        assert!(!is_intercepted_name(c"cuMemAllocHost_v2"));
        assert!(!is_intercepted_name(c"cuMemAll"));
        assert!(is_intercepted_name(c"nvmlDeviceGetMemoryInfo_v2"));
        for i in 0..ENTRIES.len() {
            assert_ne!(hook_address(i), 0);
        }
    }
}
