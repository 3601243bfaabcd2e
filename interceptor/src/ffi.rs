//! The slice of the CUDA driver API and NVML ABI the interceptor touches:
//! scalar types, result codes, flags and the few structures it reads or
//! rewrites. Written from the public headers' documented layouts.

use std::ffi::{c_int, c_uint, c_void};

/// `CUresult`.
pub type CuResult = c_int;
/// `CUdevice` (an ordinal).
pub type CuDevice = c_int;
/// `CUdeviceptr`.
pub type CuDevicePtr = u64;
/// `CUcontext`, `CUstream`, `CUmemoryPool`, `CUarray`: opaque pointers.
pub type Opaque = *mut c_void;
/// `nvmlReturn_t`.
pub type NvmlReturn = c_int;
/// `nvmlDevice_t`.
pub type NvmlDevice = *mut c_void;

pub const CUDA_SUCCESS: CuResult = 0;
pub const CUDA_ERROR_OUT_OF_MEMORY: CuResult = 2;
pub const CUDA_ERROR_NOT_INITIALIZED: CuResult = 3;
pub const CUDA_ERROR_INVALID_DEVICE: CuResult = 101;
pub const CUDA_ERROR_NOT_FOUND: CuResult = 500;

pub const NVML_SUCCESS: NvmlReturn = 0;
pub const NVML_ERROR_FUNCTION_NOT_FOUND: NvmlReturn = 13;

/// `CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM`.
pub const PROC_PER_THREAD: u64 = 2;

/// `CU_MEM_LOCATION_TYPE_DEVICE`.
pub const MEM_LOCATION_DEVICE: c_uint = 1;

/// The head of `CUmemAllocationProp`: type, requested handle types, location.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct MemAllocationPropHead {
    pub kind: c_uint,
    pub handle_types: c_uint,
    pub location_type: c_uint,
    pub location_id: c_int,
}

/// A whole `CUmemAllocationProp` (32 bytes in CUDA 12) with room to spare,
/// for the driver to fill.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct MemAllocationProp {
    pub head: MemAllocationPropHead,
    pub rest: [u64; 8],
}

/// `CUDA_ARRAY_DESCRIPTOR` (v2).
#[repr(C)]
pub struct ArrayDescriptor {
    pub width: usize,
    pub height: usize,
    pub format: c_uint,
    pub channels: c_uint,
}

/// `CUDA_ARRAY_MEMORY_REQUIREMENTS`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct ArrayMemoryRequirements {
    pub size: usize,
    pub alignment: usize,
    pub reserved: [c_uint; 4],
}

/// `CUDA_ARRAY3D_DESCRIPTOR` (v2).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Array3dDescriptor {
    pub width: usize,
    pub height: usize,
    pub depth: usize,
    pub format: c_uint,
    pub channels: c_uint,
    pub flags: c_uint,
}

/// Bytes per channel element of a `CUarray_format` (4 for formats not listed,
/// which over- rather than under-charges).
pub fn array_format_bytes(format: c_uint) -> u64 {
    match format {
        0x01 | 0x08 => 1,        // UNSIGNED_INT8, SIGNED_INT8
        0x02 | 0x09 | 0x10 => 2, // UNSIGNED_INT16, SIGNED_INT16, HALF
        _ => 4,
    }
}

/// `nvmlMemory_t`.
#[repr(C)]
pub struct NvmlMemory {
    pub total: u64,
    pub free: u64,
    pub used: u64,
}

/// `nvmlMemory_v2_t`.
#[repr(C)]
pub struct NvmlMemoryV2 {
    pub version: c_uint,
    pub total: u64,
    pub reserved: u64,
    pub free: u64,
    pub used: u64,
}

/// `CUlaunchConfig` (the head `cuLaunchKernelEx` reads; attributes follow).
#[repr(C)]
pub struct LaunchConfig {
    pub grid_dim_x: c_uint,
    pub grid_dim_y: c_uint,
    pub grid_dim_z: c_uint,
    pub block_dim_x: c_uint,
    pub block_dim_y: c_uint,
    pub block_dim_z: c_uint,
    pub shared_mem_bytes: c_uint,
    pub stream: Opaque,
    pub attrs: *mut c_void,
    pub num_attrs: c_uint,
}

/// `nvmlProcessInfo_t` (the v2/v3 layout).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct NvmlProcessInfo {
    pub pid: c_uint,
    pub used_gpu_memory: u64,
    pub gpu_instance_id: c_uint,
    pub compute_instance_id: c_uint,
}

/// `nvmlProcessUtilizationSample_t`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct NvmlProcessUtilizationSample {
    pub pid: c_uint,
    pub time_stamp: u64,
    pub sm_util: c_uint,
    pub mem_util: c_uint,
    pub enc_util: c_uint,
    pub dec_util: c_uint,
}

/// `nvmlUtilization_t`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct NvmlUtilization {
    pub gpu: c_uint,
    pub memory: c_uint,
}
