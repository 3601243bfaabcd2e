//! The charged paths beyond plain allocations and VMM: mipmapped arrays,
//! the context limits that take card memory (`cuCtxSetLimit`), and the card
//! a memory pool lives on (so pool allocations are charged there, not to
//! the current context's card).
//!
//! - Mipmapped arrays are charged, before the driver is asked, the texel
//!   bytes of all their levels; once made, the charge is corrected to what
//!   the driver reports it reserved (`cuMipmappedArrayGetMemoryRequirements`,
//!   CUDA 11.6+), like the pitch of `cuMemAllocPitch`, and a correction that
//!   does not fit the cap destroys the array and refuses it.
//! - `cuCtxSetLimit` of the malloc heap (`CU_LIMIT_MALLOC_HEAP_SIZE`) or the
//!   printf FIFO (`CU_LIMIT_PRINTF_FIFO_SIZE`): the driver reserves that
//!   much card memory, so growth past the context's current value is charged
//!   on the current card before the driver is asked (refused past the cap)
//!   and shrinking gives back what growth was charged. The default sizes are
//!   part of the context's measured cost. The stack (`CU_LIMIT_STACK_SIZE`)
//!   is charged per resident thread by [`crate::lmem`]. Not charged: the
//!   device runtime's limits; nor is a limit's charge given back when its
//!   context is destroyed (over-, never under-charged until exit).
//! - Pools: `cuMemPoolCreate` (its `location`), `cuDeviceGetDefaultMemPool`
//!   and `cuDeviceGetMemPool` say which card a pool is on; allocations from
//!   it (`cuMemAllocFromPoolAsync`) are charged to that card. A pool we
//!   never saw is taken to be on the current card. `cuMemAllocAsync` is
//!   charged to the current context's card (the stream's device is not
//!   looked up).
//!
//! - Memory a pool keeps after frees. A pool whose release threshold
//!   (`CU_MEMPOOL_ATTR_RELEASE_THRESHOLD`, set by `cuMemPoolSetAttribute`;
//!   PyTorch's cudaMallocAsync backend sets it to the maximum) is above 0
//!   keeps freed memory reserved, up to the threshold, instead of handing it
//!   back at the next synchronisation. So a free into such a pool keeps its
//!   bytes charged as the pool's *retained* charge, up to the threshold; an
//!   allocation from the pool first takes from that retained charge (the
//!   pool serves it from what it keeps) and is charged only the rest; a
//!   lower threshold gives back retained bytes above it; `cuMemPoolTrimTo`
//!   gives back what the driver says the pool no longer reserves
//!   (`RESERVED_MEM_CURRENT − USED_MEM_CURRENT`); `cuMemPoolDestroy` gives
//!   back the rest. The pool of `cuMemAllocAsync` is the card's current
//!   pool (`cuDeviceGetMemPool`, once per card; `cuDeviceSetMemPool`
//!   changes it). Until some pool's threshold is raised, pool allocations
//!   cost what any allocation costs (one relaxed load more).
//!
//! Graph memory nodes are charged in `graph_mem`.

use crate::accounting::Accounting;
use crate::cuda_hooks::{charged, current_device, read, tracked};
use crate::ffi::*;
use crate::hook_table::{DeviceGetMemPool, MipmappedArrayDestroy};
use crate::log::{log, WARN};
use crate::state;
use crate::state::real;
use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::{AtomicBool, Ordering};

/// `CUmemPool_attribute` values read or watched here.
const POOL_RELEASE_THRESHOLD: c_int = 4;
const POOL_RESERVED_MEM_CURRENT: c_int = 5;
const POOL_USED_MEM_CURRENT: c_int = 7;

/// Set once any pool's release threshold is raised above 0: from then on
/// pool allocations and frees keep the pools' retained charges.
static RETAINING: AtomicBool = AtomicBool::new(false);

/// Texel bytes of every level of a mipmapped array (a zero height or depth
/// is a 1D or 2D array, as in the descriptor).
pub fn mipmap_texel_bytes(d: &Array3dDescriptor, levels: c_uint) -> u64 {
    (0..levels.clamp(1, 64))
        .map(|level| {
            let dim = |v: usize| if v == 0 { 0 } else { (v >> level).max(1) };
            crate::cuda_hooks::array_bytes(
                dim(d.width).max(1),
                dim(d.height),
                dim(d.depth),
                d.format,
                d.channels,
            )
        })
        .fold(0u64, u64::saturating_add)
}

/// The CUDA ordinal of the calling thread's current context.
pub(crate) fn current_ordinal() -> Option<CuDevice> {
    let get_device = state::cuda()?.ctx_get_device?;
    let mut device: CuDevice = -1;
    // SAFETY: the driver's cuCtxGetDevice with a valid out-pointer.
    let rc = unsafe { get_device(&mut device) };
    (rc == CUDA_SUCCESS).then_some(device)
}

/// # Safety
/// `cuMipmappedArrayCreate`'s contract: `handle` is a valid
/// out-pointer and `desc` null or a valid descriptor.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMipmappedArrayCreate(
    handle: *mut Opaque,
    desc: *const Array3dDescriptor,
    levels: c_uint,
) -> CuResult {
    let real = real!(MipmappedArrayCreate);
    let forward = || {
        // SAFETY: forwarding the caller's arguments.
        unsafe { real(handle, desc, levels) }
    };
    let accounting = match state::accounting() {
        Err(rc) => return rc,
        Ok(None) => return forward(),
        Ok(Some(a)) => a,
    };
    let Some(device) = current_device().filter(|_| !desc.is_null()) else {
        return forward();
    };
    // SAFETY: non-null descriptor from the caller.
    let estimate = mipmap_texel_bytes(unsafe { &*desc }, levels);
    if accounting.charge(device, estimate).is_err() {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    let rc = forward();
    if rc != CUDA_SUCCESS {
        accounting.uncharge(device, estimate);
        return rc;
    }
    // SAFETY: the caller's out-pointer, which the driver just filled.
    let array = unsafe { read(handle as *const usize) } as u64;
    let actual = reserved_for(array).unwrap_or(estimate);
    if actual > estimate && accounting.charge(device, actual - estimate).is_err() {
        accounting.uncharge(device, estimate);
        if let Some(destroy) = state::cuda().and_then(|d| d.real::<MipmappedArrayDestroy>()) {
            // SAFETY: the driver's cuMipmappedArrayDestroy of the array it just made.
            unsafe { destroy(array as Opaque) };
        }
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    if actual < estimate {
        accounting.uncharge(device, estimate - actual);
    }
    accounting.remember(&accounting.arrays, array, device, actual);
    rc
}

/// What the driver reserved for a mipmapped array on the current card.
fn reserved_for(array: u64) -> Option<u64> {
    let requirements = state::cuda()?.mipmap_requirements?;
    let ordinal = current_ordinal()?;
    let mut req = ArrayMemoryRequirements::default();
    // SAFETY: the driver's cuMipmappedArrayGetMemoryRequirements with a
    // valid out-pointer, on an array it just made.
    let rc = unsafe { requirements(&mut req, array as Opaque, ordinal) };
    (rc == CUDA_SUCCESS && req.size > 0).then_some(req.size as u64)
}

/// # Safety
/// None beyond the driver's: the array handle is opaque.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMipmappedArrayDestroy(handle: Opaque) -> CuResult {
    let real = real!(MipmappedArrayDestroy);
    crate::cuda_hooks::released(
        |a| &a.arrays,
        handle as u64,
        || {
            // SAFETY: forwarding the caller's argument.
            unsafe { real(handle) }
        },
    )
}

/// `CU_LIMIT_PRINTF_FIFO_SIZE` and `CU_LIMIT_MALLOC_HEAP_SIZE`: index into
/// [`Accounting::limit_charges`].
fn charged_limit(limit: c_uint) -> Option<usize> {
    match limit {
        1 => Some(0),
        2 => Some(1),
        _ => None,
    }
}

/// # Safety
/// None beyond the driver's: `cuCtxSetLimit` takes no pointers.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuCtxSetLimit(limit: c_uint, value: usize) -> CuResult {
    let real = real!(CtxSetLimit);
    let forward = || {
        // SAFETY: forwarding the caller's arguments.
        unsafe { real(limit, value) }
    };
    let accounting = match state::accounting() {
        Err(rc) => return rc,
        Ok(None) => return forward(),
        Ok(Some(a)) => a,
    };
    if limit == crate::lmem::STACK_LIMIT {
        return crate::lmem::set_stack(accounting, value as u64, forward);
    }
    let (Some(kind), Some(device)) = (charged_limit(limit), current_device()) else {
        return forward();
    };
    let Some(get_limit) = state::cuda().and_then(|d| d.ctx_get_limit) else {
        return forward();
    };
    let mut current = 0usize;
    // SAFETY: the driver's cuCtxGetLimit with a valid out-pointer.
    if unsafe { get_limit(&mut current, limit) } != CUDA_SUCCESS {
        return forward();
    }
    let (old, new) = (current as u64, value as u64);
    let charges = &accounting.limit_charges[device][kind];
    if new > old {
        if accounting.charge(device, new - old).is_err() {
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
        let rc = forward();
        if rc == CUDA_SUCCESS {
            charges.fetch_add(new - old, std::sync::atomic::Ordering::AcqRel);
        } else {
            accounting.uncharge(device, new - old);
        }
        return rc;
    }
    let rc = forward();
    if rc == CUDA_SUCCESS && new < old {
        let back = charges
            .fetch_update(
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
                |c| Some(c.saturating_sub(old - new)),
            )
            .unwrap_or(0)
            .min(old - new);
        accounting.uncharge(device, back);
    }
    rc
}

/// Remembers that `pool` lives on container card `device`.
fn remember_pool(pool: Opaque, device: Option<usize>) {
    if let (Ok(Some(accounting)), Some(device)) = (state::accounting(), device) {
        let key = pool as u64;
        if accounting.pools.get(key).is_none() {
            accounting.pools.insert(key, device, 0);
        }
    }
}

/// # Safety
/// `cuMemPoolCreate`'s contract: `pool` is a valid out-pointer and
/// `props` null or a valid `CUmemPoolProps`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemPoolCreate(
    pool: *mut Opaque,
    props: *const MemAllocationPropHead,
) -> CuResult {
    let real = real!(MemPoolCreate);
    // SAFETY: forwarding the caller's arguments.
    let rc = unsafe { real(pool, props) };
    if rc == CUDA_SUCCESS && !props.is_null() {
        // SAFETY: non-null CUmemPoolProps, whose head is laid out as
        // CUmemAllocationProp's (allocation type, handle types, location).
        let (kind, id) = unsafe { ((*props).location_type, (*props).location_id) };
        let device = (kind == MEM_LOCATION_DEVICE).then(|| tracked(id)).flatten();
        // SAFETY: the caller's out-pointer, which the driver just filled.
        remember_pool(unsafe { read(pool as *const usize) } as Opaque, device);
    }
    rc
}

/// # Safety
/// None beyond the driver's: the pool handle is opaque.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemPoolDestroy(pool: Opaque) -> CuResult {
    let real = real!(MemPoolDestroy);
    // SAFETY: forwarding the caller's argument.
    let rc = unsafe { real(pool) };
    if rc == CUDA_SUCCESS {
        if let Ok(Some(accounting)) = state::accounting() {
            if let Some((device, retained)) = accounting.pools.remove(pool as u64) {
                accounting.uncharge(device, retained);
            }
            for current in &accounting.current_pools {
                let _ =
                    current.compare_exchange(pool as u64, 0, Ordering::AcqRel, Ordering::Relaxed);
            }
        }
    }
    rc
}

/// Shared body of `cuDeviceGetDefaultMemPool` and `cuDeviceGetMemPool`.
///
/// # Safety
/// `pool` is null or valid for reads once `get` succeeded (the caller's
/// out-pointer).
unsafe fn device_pool(
    pool: *mut Opaque,
    device: CuDevice,
    get: impl FnOnce() -> CuResult,
) -> CuResult {
    let rc = get();
    if rc == CUDA_SUCCESS {
        // SAFETY: readable by this function's contract.
        let pool = unsafe { read(pool as *const usize) } as Opaque;
        remember_pool(pool, tracked(device));
    }
    rc
}

/// # Safety
/// `cuDeviceGetDefaultMemPool`'s contract: `pool` is a valid out-pointer.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuDeviceGetDefaultMemPool(
    pool: *mut Opaque,
    device: CuDevice,
) -> CuResult {
    let real = real!(DeviceGetDefaultMemPool);
    let get = || {
        // SAFETY: forwarding the caller's arguments.
        unsafe { real(pool, device) }
    };
    // SAFETY: the caller's out-pointer, which the driver fills.
    unsafe { device_pool(pool, device, get) }
}

/// # Safety
/// `cuDeviceGetMemPool`'s contract: `pool` is a valid out-pointer.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuDeviceGetMemPool(pool: *mut Opaque, device: CuDevice) -> CuResult {
    let real = real!(DeviceGetMemPool);
    let get = || {
        // SAFETY: forwarding the caller's arguments.
        unsafe { real(pool, device) }
    };
    // SAFETY: the caller's out-pointer, which the driver fills.
    unsafe { device_pool(pool, device, get) }
}

/// # Safety
/// None beyond the driver's: the pool handle is opaque.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuDeviceSetMemPool(device: CuDevice, pool: Opaque) -> CuResult {
    let real = real!(DeviceSetMemPool);
    // SAFETY: forwarding the caller's arguments.
    let rc = unsafe { real(device, pool) };
    if let (CUDA_SUCCESS, Ok(Some(accounting)), Some(card)) =
        (rc, state::accounting(), tracked(device))
    {
        accounting.current_pools[card].store(pool as u64, Ordering::Release);
    }
    rc
}

/// Gives back a pool's retained charge above `ceiling`.
fn trim_retained(accounting: &Accounting, pool: u64, ceiling: u64) {
    let Some((device, _)) = accounting.pools.get(pool) else {
        return;
    };
    if let Some((before, after)) = accounting.pools.update_bytes(pool, |r| r.min(ceiling)) {
        accounting.uncharge(device, before - after);
    }
}

/// # Safety
/// `cuMemPoolSetAttribute`'s contract: `value` points to the
/// attribute's type.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemPoolSetAttribute(
    pool: Opaque,
    attribute: c_int,
    value: *mut c_void,
) -> CuResult {
    let real = real!(MemPoolSetAttribute);
    // SAFETY: forwarding the caller's arguments.
    let rc = unsafe { real(pool, attribute, value) };
    if rc != CUDA_SUCCESS || attribute != POOL_RELEASE_THRESHOLD || value.is_null() {
        return rc;
    }
    let Ok(Some(accounting)) = state::accounting() else {
        return rc;
    };
    // SAFETY: the threshold is a cuuint64_t the driver just read.
    let threshold = unsafe { *(value as *const u64) };
    remember_pool(pool, current_device());
    let key = pool as u64;
    accounting.pools.set_aux(key, threshold);
    if threshold > 0 {
        RETAINING.store(true, Ordering::Release);
    }
    trim_retained(accounting, key, threshold);
    rc
}

/// One of a pool's attributes, read from the driver.
fn pool_attribute(pool: Opaque, attribute: c_int) -> Option<u64> {
    let get = state::cuda()?.mempool_get_attribute?;
    let mut value = 0u64;
    // SAFETY: the driver's cuMemPoolGetAttribute with a cuuint64_t out-value
    // (every attribute read here is one).
    let rc = unsafe { get(pool, attribute, (&mut value as *mut u64).cast()) };
    (rc == CUDA_SUCCESS).then_some(value)
}

/// # Safety
/// None beyond the driver's: the pool handle is opaque.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemPoolTrimTo(pool: Opaque, keep: usize) -> CuResult {
    let real = real!(MemPoolTrimTo);
    // SAFETY: forwarding the caller's arguments.
    let rc = unsafe { real(pool, keep) };
    if rc != CUDA_SUCCESS {
        return rc;
    }
    let Ok(Some(accounting)) = state::accounting() else {
        return rc;
    };
    // What the pool still reserves beyond its live allocations, by the
    // driver's own figures.
    if let (Some(reserved), Some(used)) = (
        pool_attribute(pool, POOL_RESERVED_MEM_CURRENT),
        pool_attribute(pool, POOL_USED_MEM_CURRENT),
    ) {
        trim_retained(accounting, pool as u64, reserved.saturating_sub(used));
    }
    rc
}

/// An allocation from `pool` (`None`: the current card's current pool, as
/// `cuMemAllocAsync` does), charged to the pool's card.
#[inline]
pub fn pool_allocation(
    pool: Option<Opaque>,
    bytes: u64,
    allocate: impl FnOnce() -> (CuResult, u64),
) -> CuResult {
    if !RETAINING.load(Ordering::Relaxed) {
        return match pool {
            Some(pool) => charged(|a| &a.pointers, || pool_device(pool), bytes, allocate),
            None => charged(|a| &a.pointers, current_device, bytes, allocate),
        };
    }
    retaining_pool_allocation(pool, bytes, allocate)
}

/// The current pool of container card `device` (`cuDeviceGetMemPool`,
/// looked up once).
fn current_pool(accounting: &Accounting, device: usize) -> Option<u64> {
    let cached = accounting.current_pools[device].load(Ordering::Acquire);
    if cached != 0 {
        return Some(cached);
    }
    let ordinal = current_ordinal()?;
    let get = state::cuda()?.real::<DeviceGetMemPool>()?;
    let mut pool: Opaque = std::ptr::null_mut();
    // SAFETY: the driver's cuDeviceGetMemPool with a valid out-pointer.
    let rc = unsafe { get(&mut pool, ordinal) };
    if rc != CUDA_SUCCESS || pool.is_null() {
        return None;
    }
    remember_pool(pool, Some(device));
    accounting.current_pools[device].store(pool as u64, Ordering::Release);
    Some(pool as u64)
}

/// [`pool_allocation`] once some pool retains memory: takes what it can
/// from the pool's retained charge, charges the rest, and remembers the
/// pool with the allocation so its free goes back to the pool's charge.
fn retaining_pool_allocation(
    pool: Option<Opaque>,
    bytes: u64,
    allocate: impl FnOnce() -> (CuResult, u64),
) -> CuResult {
    let accounting = match state::accounting() {
        Err(rc) => return rc,
        Ok(None) => return allocate().0,
        Ok(Some(a)) => a,
    };
    let key = match pool {
        Some(pool) => Some(pool as u64),
        None => current_device().and_then(|d| current_pool(accounting, d)),
    };
    let Some((key, (device, _))) = key.and_then(|k| Some((k, accounting.pools.get(k)?))) else {
        return match pool {
            Some(pool) => charged(|a| &a.pointers, || pool_device(pool), bytes, allocate),
            None => charged(|a| &a.pointers, current_device, bytes, allocate),
        };
    };
    let taken = accounting
        .pools
        .update_bytes(key, |r| r - r.min(bytes))
        .map_or(0, |(before, after)| before - after);
    let give_back_taken = || {
        accounting
            .pools
            .update_bytes(key, |r| r.saturating_add(taken));
    };
    if accounting.charge(device, bytes - taken).is_err() {
        give_back_taken();
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    let (rc, pointer) = allocate();
    if rc != CUDA_SUCCESS {
        accounting.uncharge(device, bytes - taken);
        give_back_taken();
        return rc;
    }
    if !accounting
        .pointers
        .insert_with_aux(pointer, device, bytes, key)
    {
        log!(
            WARN,
            "allocation table full: {bytes} bytes at {pointer:#x} stay charged until exit"
        );
    }
    rc
}

/// A pool allocation of `bytes` on `device` was freed: a pool that retains
/// memory keeps it charged (up to its threshold) as its retained charge;
/// the rest is given back.
pub fn freed_into_pool(accounting: &Accounting, pool: u64, device: usize, bytes: u64) {
    let threshold = accounting
        .pools
        .get_with_aux(pool)
        .map_or(0, |(_, _, threshold)| threshold);
    let kept = if threshold == 0 {
        0
    } else {
        accounting
            .pools
            .update_bytes(pool, |r| r.saturating_add(bytes).min(threshold.max(r)))
            .map_or(0, |(before, after)| after - before)
    };
    accounting.uncharge(device, bytes - kept);
}

/// The container card `pool` lives on, or the current card for a pool we
/// never saw (`cuMemAllocFromPoolAsync`).
pub fn pool_device(pool: Opaque) -> Option<usize> {
    match state::accounting() {
        Ok(Some(accounting)) => accounting
            .pools
            .get(pool as u64)
            .map(|(device, _)| device)
            .or_else(current_device),
        _ => current_device(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mipmap_levels_halve_to_one() {
        let d = Array3dDescriptor {
            width: 1024,
            height: 1024,
            depth: 0,
            format: 0x20,
            channels: 4,
            flags: 0,
        };
        let level0 = 1024 * 1024 * 16;
        assert_eq!(mipmap_texel_bytes(&d, 1), level0);
        assert_eq!(mipmap_texel_bytes(&d, 3), level0 + level0 / 4 + level0 / 16);
        // 1D: a zero height stays zero (one row), the width halves to 1.
        let d1 = Array3dDescriptor {
            height: 0,
            width: 4,
            ..d
        };
        assert_eq!(mipmap_texel_bytes(&d1, 4), (4 + 2 + 1 + 1) * 16);
    }
}
