//! The hook table: every driver and NVML entry point the interceptor
//! intercepts, one typed row each. A row is a marker type ([`CudaHook`] or
//! [`NvmlHook`]) carrying the C function type of the entry point, its place
//! in the table, and (in [`CUDA_ROWS`] / [`NVML_ROWS`]) the names and the
//! `cuGetProcAddress` version and flags it is known by.
//!
//! The row's function type is the single statement of the entry point's
//! ABI: the real function is handed out as that type (the driver's
//! `real::<Row>()`, which hooks reach through `state::real!`), and
//! `interpose` checks at compile time that our hook has that very type.
//! This module depends on `ffi` and `loader` only and names no hook: the
//! hook modules use it, and only `interpose` (which hands our hooks out by
//! address) names both.
//!
//! Hooks are chosen by address, never by name prefix: for every row the
//! driver keeps the address the library exports under the row's exact name
//! and the address the driver's own `cuGetProcAddress` returns for the
//! row's name, version and flags (`_ptsz` variants are their own rows).

use crate::ffi::*;
use crate::loader::CFunction;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

/// The names and proc-address query of one intercepted driver entry point.
#[derive(Debug)]
pub struct HookEntry {
    /// The exported symbol (its ABI is the row's).
    pub export: &'static CStr,
    /// The name `cuGetProcAddress` knows it by.
    pub proc_name: &'static CStr,
    /// The CUDA version that yields this ABI from `cuGetProcAddress`.
    pub proc_version: c_int,
    /// `cuGetProcAddress` flags that yield this variant.
    pub proc_flags: u64,
}

/// A row of the CUDA driver part of the table.
pub trait CudaHook {
    /// The entry point's C function type (the real one's and our hook's).
    type Fn: CFunction;
    /// Its index in [`CUDA_ROWS`].
    const INDEX: usize;
}

/// A row of the NVML part of the table (NVML has no proc-address query).
pub trait NvmlHook {
    /// The entry point's C function type (the real one's and our hook's).
    type Fn: CFunction;
    /// Its index in [`NVML_ROWS`].
    const INDEX: usize;
}

macro_rules! cuda_rows {
    ($($row:ident: $fn_ty:ty => $export:literal, $proc:literal, $version:literal, $flags:expr;)*) => {
        /// Row indices, in table order.
        #[allow(clippy::enum_variant_names)]
        enum CudaRow { $($row),* }

        $(
            #[doc = concat!("Row `", stringify!($row), "`: ", stringify!($export), ".")]
            #[derive(Debug)]
            pub enum $row {}
            impl CudaHook for $row {
                type Fn = $fn_ty;
                const INDEX: usize = CudaRow::$row as usize;
            }
        )*

        /// The CUDA rows' names and proc-address queries, by index.
        pub const CUDA_ROWS: &[HookEntry] = &[
            $(HookEntry { export: $export, proc_name: $proc, proc_version: $version, proc_flags: $flags }),*
        ];
    };
}

macro_rules! nvml_rows {
    ($($row:ident: $fn_ty:ty => $export:literal;)*) => {
        /// Row indices, in table order.
        enum NvmlRow { $($row),* }

        $(
            #[doc = concat!("Row `", stringify!($row), "`: ", stringify!($export), ".")]
            #[derive(Debug)]
            pub enum $row {}
            impl NvmlHook for $row {
                type Fn = $fn_ty;
                const INDEX: usize = NvmlRow::$row as usize;
            }
        )*

        /// The NVML rows' exported names, by index.
        pub const NVML_ROWS: &[&CStr] = &[$($export),*];
    };
}

type AllocFn = unsafe extern "C" fn(*mut CuDevicePtr, usize) -> CuResult;
type AllocPitchFn =
    unsafe extern "C" fn(*mut CuDevicePtr, *mut usize, usize, usize, c_uint) -> CuResult;
type AllocManagedFn = unsafe extern "C" fn(*mut CuDevicePtr, usize, c_uint) -> CuResult;
type FreeFn = unsafe extern "C" fn(CuDevicePtr) -> CuResult;
type AllocAsyncFn = unsafe extern "C" fn(*mut CuDevicePtr, usize, Opaque) -> CuResult;
type AllocPoolFn = unsafe extern "C" fn(*mut CuDevicePtr, usize, Opaque, Opaque) -> CuResult;
type FreeAsyncFn = unsafe extern "C" fn(CuDevicePtr, Opaque) -> CuResult;
type ArrayCreateFn = unsafe extern "C" fn(*mut Opaque, *const ArrayDescriptor) -> CuResult;
type Array3dCreateFn = unsafe extern "C" fn(*mut Opaque, *const Array3dDescriptor) -> CuResult;
type HandleFn = unsafe extern "C" fn(Opaque) -> CuResult;
type MemGetInfoFn = unsafe extern "C" fn(*mut usize, *mut usize) -> CuResult;
type TotalMemFn = unsafe extern "C" fn(*mut usize, CuDevice) -> CuResult;
type DeviceOutFn = unsafe extern "C" fn(*mut Opaque, CuDevice) -> CuResult;
type DeviceFn = unsafe extern "C" fn(CuDevice) -> CuResult;
type CtxCreateV2Fn = unsafe extern "C" fn(*mut Opaque, c_uint, CuDevice) -> CuResult;
type CtxCreateV3Fn =
    unsafe extern "C" fn(*mut Opaque, *mut c_void, c_int, c_uint, CuDevice) -> CuResult;
type CtxCreateV4Fn = unsafe extern "C" fn(*mut Opaque, *mut c_void, c_uint, CuDevice) -> CuResult;
type InitFn = unsafe extern "C" fn(c_uint) -> CuResult;
/// `cuGetProcAddress` (before CUDA 12).
type GetProcFn = unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64) -> CuResult;
/// `cuGetProcAddress_v2` (CUDA 12).
type GetProcV2Fn =
    unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int) -> CuResult;
type MemCreateFn =
    unsafe extern "C" fn(*mut u64, usize, *const MemAllocationPropHead, u64) -> CuResult;
type MemReleaseFn = unsafe extern "C" fn(u64) -> CuResult;
type MemMapFn = unsafe extern "C" fn(CuDevicePtr, usize, usize, u64, u64) -> CuResult;
type MemUnmapFn = unsafe extern "C" fn(CuDevicePtr, usize) -> CuResult;
type RetainHandleFn = unsafe extern "C" fn(*mut u64, *mut c_void) -> CuResult;
type ImportFn = unsafe extern "C" fn(*mut u64, *mut c_void, c_uint) -> CuResult;
type MipmapCreateFn =
    unsafe extern "C" fn(*mut Opaque, *const Array3dDescriptor, c_uint) -> CuResult;
type SetLimitFn = unsafe extern "C" fn(c_uint, usize) -> CuResult;
type PoolCreateFn = unsafe extern "C" fn(*mut Opaque, *const MemAllocationPropHead) -> CuResult;
type SetDevicePoolFn = unsafe extern "C" fn(CuDevice, Opaque) -> CuResult;
type PoolAttributeFn = unsafe extern "C" fn(Opaque, c_int, *mut c_void) -> CuResult;
type PoolTrimFn = unsafe extern "C" fn(Opaque, usize) -> CuResult;
type AddAllocNodeFn =
    unsafe extern "C" fn(*mut Opaque, Opaque, *const Opaque, usize, *mut c_void) -> CuResult;
type EndCaptureFn = unsafe extern "C" fn(Opaque, *mut Opaque) -> CuResult;
type LaunchFn = unsafe extern "C" fn(
    Opaque,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    Opaque,
    *mut *mut c_void,
    *mut *mut c_void,
) -> CuResult;
type CooperativeFn = unsafe extern "C" fn(
    Opaque,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    Opaque,
    *mut *mut c_void,
) -> CuResult;
type LaunchExFn = unsafe extern "C" fn(
    *const LaunchConfig,
    Opaque,
    *mut *mut c_void,
    *mut *mut c_void,
) -> CuResult;
type GraphLaunchFn = unsafe extern "C" fn(Opaque, Opaque) -> CuResult;
type NvmlMemoryInfoFn = unsafe extern "C" fn(NvmlDevice, *mut NvmlMemory) -> NvmlReturn;
type NvmlMemoryInfoV2Fn = unsafe extern "C" fn(NvmlDevice, *mut NvmlMemoryV2) -> NvmlReturn;

// Order matters where one name has several ABIs (cuCtxCreate): when two
// rows resolve to the same address, the first one keeps it.
cuda_rows! {
    Init: InitFn => c"cuInit", c"cuInit", 2000, 0;
    GetProcAddress: GetProcFn => c"cuGetProcAddress", c"cuGetProcAddress", 11030, 0;
    GetProcAddressV2: GetProcV2Fn => c"cuGetProcAddress_v2", c"cuGetProcAddress", 12000, 0;
    MemAlloc: AllocFn => c"cuMemAlloc_v2", c"cuMemAlloc", 3020, 0;
    MemAllocPitch: AllocPitchFn => c"cuMemAllocPitch_v2", c"cuMemAllocPitch", 3020, 0;
    MemAllocManaged: AllocManagedFn => c"cuMemAllocManaged", c"cuMemAllocManaged", 6000, 0;
    MemFree: FreeFn => c"cuMemFree_v2", c"cuMemFree", 3020, 0;
    MemAllocAsync: AllocAsyncFn => c"cuMemAllocAsync", c"cuMemAllocAsync", 11020, 0;
    MemAllocAsyncPtsz: AllocAsyncFn => c"cuMemAllocAsync_ptsz", c"cuMemAllocAsync", 11020, PROC_PER_THREAD;
    MemAllocFromPoolAsync: AllocPoolFn => c"cuMemAllocFromPoolAsync", c"cuMemAllocFromPoolAsync", 11020, 0;
    MemAllocFromPoolAsyncPtsz: AllocPoolFn => c"cuMemAllocFromPoolAsync_ptsz", c"cuMemAllocFromPoolAsync", 11020, PROC_PER_THREAD;
    MemFreeAsync: FreeAsyncFn => c"cuMemFreeAsync", c"cuMemFreeAsync", 11020, 0;
    MemFreeAsyncPtsz: FreeAsyncFn => c"cuMemFreeAsync_ptsz", c"cuMemFreeAsync", 11020, PROC_PER_THREAD;
    MemCreate: MemCreateFn => c"cuMemCreate", c"cuMemCreate", 10020, 0;
    MemRelease: MemReleaseFn => c"cuMemRelease", c"cuMemRelease", 10020, 0;
    MemMap: MemMapFn => c"cuMemMap", c"cuMemMap", 10020, 0;
    MemUnmap: MemUnmapFn => c"cuMemUnmap", c"cuMemUnmap", 10020, 0;
    MemRetainAllocationHandle: RetainHandleFn => c"cuMemRetainAllocationHandle", c"cuMemRetainAllocationHandle", 11000, 0;
    MemImportFromShareableHandle: ImportFn => c"cuMemImportFromShareableHandle", c"cuMemImportFromShareableHandle", 10020, 0;
    MipmappedArrayCreate: MipmapCreateFn => c"cuMipmappedArrayCreate", c"cuMipmappedArrayCreate", 5000, 0;
    MipmappedArrayDestroy: HandleFn => c"cuMipmappedArrayDestroy", c"cuMipmappedArrayDestroy", 5000, 0;
    CtxSetLimit: SetLimitFn => c"cuCtxSetLimit", c"cuCtxSetLimit", 3010, 0;
    MemPoolCreate: PoolCreateFn => c"cuMemPoolCreate", c"cuMemPoolCreate", 11020, 0;
    MemPoolDestroy: HandleFn => c"cuMemPoolDestroy", c"cuMemPoolDestroy", 11020, 0;
    DeviceGetDefaultMemPool: DeviceOutFn => c"cuDeviceGetDefaultMemPool", c"cuDeviceGetDefaultMemPool", 11020, 0;
    DeviceGetMemPool: DeviceOutFn => c"cuDeviceGetMemPool", c"cuDeviceGetMemPool", 11020, 0;
    DeviceSetMemPool: SetDevicePoolFn => c"cuDeviceSetMemPool", c"cuDeviceSetMemPool", 11020, 0;
    MemPoolSetAttribute: PoolAttributeFn => c"cuMemPoolSetAttribute", c"cuMemPoolSetAttribute", 11020, 0;
    MemPoolTrimTo: PoolTrimFn => c"cuMemPoolTrimTo", c"cuMemPoolTrimTo", 11020, 0;
    GraphAddMemAllocNode: AddAllocNodeFn => c"cuGraphAddMemAllocNode", c"cuGraphAddMemAllocNode", 11040, 0;
    DeviceGraphMemTrim: DeviceFn => c"cuDeviceGraphMemTrim", c"cuDeviceGraphMemTrim", 11040, 0;
    GraphExecDestroy: HandleFn => c"cuGraphExecDestroy", c"cuGraphExecDestroy", 10000, 0;
    GraphDestroy: HandleFn => c"cuGraphDestroy", c"cuGraphDestroy", 10000, 0;
    StreamEndCapture: EndCaptureFn => c"cuStreamEndCapture", c"cuStreamEndCapture", 10000, 0;
    StreamEndCapturePtsz: EndCaptureFn => c"cuStreamEndCapture_ptsz", c"cuStreamEndCapture", 10000, PROC_PER_THREAD;
    ArrayCreate: ArrayCreateFn => c"cuArrayCreate_v2", c"cuArrayCreate", 3020, 0;
    Array3DCreate: Array3dCreateFn => c"cuArray3DCreate_v2", c"cuArray3DCreate", 3020, 0;
    ArrayDestroy: HandleFn => c"cuArrayDestroy", c"cuArrayDestroy", 2000, 0;
    MemGetInfo: MemGetInfoFn => c"cuMemGetInfo_v2", c"cuMemGetInfo", 3020, 0;
    DeviceTotalMem: TotalMemFn => c"cuDeviceTotalMem_v2", c"cuDeviceTotalMem", 3020, 0;
    PrimaryCtxRetain: DeviceOutFn => c"cuDevicePrimaryCtxRetain", c"cuDevicePrimaryCtxRetain", 7000, 0;
    PrimaryCtxRelease: DeviceFn => c"cuDevicePrimaryCtxRelease_v2", c"cuDevicePrimaryCtxRelease", 11000, 0;
    PrimaryCtxReset: DeviceFn => c"cuDevicePrimaryCtxReset_v2", c"cuDevicePrimaryCtxReset", 11000, 0;
    CtxCreate: CtxCreateV2Fn => c"cuCtxCreate_v2", c"cuCtxCreate", 3020, 0;
    CtxCreateV3: CtxCreateV3Fn => c"cuCtxCreate_v3", c"cuCtxCreate", 11040, 0;
    CtxCreateV4: CtxCreateV4Fn => c"cuCtxCreate_v4", c"cuCtxCreate", 12050, 0;
    CtxDestroy: HandleFn => c"cuCtxDestroy_v2", c"cuCtxDestroy", 4000, 0;
    LaunchKernel: LaunchFn => c"cuLaunchKernel", c"cuLaunchKernel", 4000, 0;
    LaunchKernelPtsz: LaunchFn => c"cuLaunchKernel_ptsz", c"cuLaunchKernel", 4000, PROC_PER_THREAD;
    LaunchKernelEx: LaunchExFn => c"cuLaunchKernelEx", c"cuLaunchKernelEx", 11060, 0;
    LaunchKernelExPtsz: LaunchExFn => c"cuLaunchKernelEx_ptsz", c"cuLaunchKernelEx", 11060, PROC_PER_THREAD;
    LaunchCooperativeKernel: CooperativeFn => c"cuLaunchCooperativeKernel", c"cuLaunchCooperativeKernel", 9000, 0;
    LaunchCooperativeKernelPtsz: CooperativeFn => c"cuLaunchCooperativeKernel_ptsz", c"cuLaunchCooperativeKernel", 9000, PROC_PER_THREAD;
    GraphLaunch: GraphLaunchFn => c"cuGraphLaunch", c"cuGraphLaunch", 10000, 0;
    GraphLaunchPtsz: GraphLaunchFn => c"cuGraphLaunch_ptsz", c"cuGraphLaunch", 10000, PROC_PER_THREAD;
}

nvml_rows! {
    NvmlMemoryInfo: NvmlMemoryInfoFn => c"nvmlDeviceGetMemoryInfo";
    NvmlMemoryInfoV2: NvmlMemoryInfoV2Fn => c"nvmlDeviceGetMemoryInfo_v2";
}

/// Number of CUDA rows.
pub const CUDA_HOOK_COUNT: usize = CUDA_ROWS.len();
/// Number of NVML rows.
pub const NVML_HOOK_COUNT: usize = NVML_ROWS.len();

/// Whether `name` is exactly one of the names we intercept (a cheap filter
/// before any library is loaded; the decision itself is by address).
pub fn is_intercepted_name(name: &CStr) -> bool {
    CUDA_ROWS
        .iter()
        .any(|e| e.export == name || e.proc_name == name)
        || NVML_ROWS.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_where_their_markers_say() {
        assert_eq!(CUDA_ROWS[MemAlloc::INDEX].export, c"cuMemAlloc_v2");
        assert_eq!(CUDA_ROWS[CtxDestroy::INDEX].export, c"cuCtxDestroy_v2");
        assert_eq!(
            CUDA_ROWS[GraphLaunchPtsz::INDEX].export,
            c"cuGraphLaunch_ptsz"
        );
        assert_eq!(
            NVML_ROWS[NvmlMemoryInfoV2::INDEX],
            c"nvmlDeviceGetMemoryInfo_v2"
        );
        assert!(is_intercepted_name(c"cuMemAllocAsync_ptsz"));
        assert!(is_intercepted_name(c"cuMemAlloc"));
        assert!(!is_intercepted_name(c"cuMemAllocHost_v2"));
        assert!(!is_intercepted_name(c"cuMemAll"));
        assert!(is_intercepted_name(c"nvmlDeviceGetMemoryInfo_v2"));
    }

    #[test]
    fn every_export_is_a_distinct_row() {
        for (i, a) in CUDA_ROWS.iter().enumerate() {
            for b in &CUDA_ROWS[i + 1..] {
                assert_ne!(a.export, b.export);
            }
        }
    }
}
