//! The intercepted CUDA driver entry points for plain allocations, arrays,
//! contexts and the memory queries. Each one forwards to the real driver
//! function of its hook-table row (`state::real!`); the memory paths charge
//! the card the memory lands on before the driver is asked and give back
//! exactly that on free, and the reporting paths show the cap (the
//! `cuGetProcAddress` hooks are in `interpose`). With no cap configured
//! every hook is a plain forward; with an invalid one every hook refuses
//! (fail closed).
//!
//! Exported under the driver's names (`#[no_mangle]`, except in unit-test
//! builds, where they would interpose on the test binary itself).

use crate::accounting::{Accounting, MEASURING};
use crate::cards::{self, Card};
use crate::ffi::*;
use crate::hook_table::{CtxDestroy, MemFree, PrimaryCtxRelease};
use crate::log::{self, log, DEBUG, ERROR, INFO};
use crate::nvml_hooks::{usage_after_context, usage_before_context, UsageSample};
use crate::ptr_table::PtrTable;
use crate::state;
use crate::state::real;
use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::Ordering;

/// The container card (index into caps and counters, see `cards`) of the
/// calling thread's current context, if it is accounted.
#[inline]
pub(crate) fn current_device() -> Option<usize> {
    crate::sm_limiter::current_card().filter(|&d| Accounting::tracks(d))
}

/// The container card of a CUDA ordinal argument, if it is accounted.
pub(crate) fn tracked(device: CuDevice) -> Option<usize> {
    cards::container_index(device).filter(|&d| Accounting::tracks(d))
}

/// Refuses a card that is not the container's (see `cards`).
pub(crate) fn refused_foreign(device: CuDevice) -> bool {
    if cards::card_of(device) == Card::Foreign {
        log!(
            ERROR,
            "CUDA device {device} is not one of the container's cards: refused"
        );
        return true;
    }
    false
}

/// Runs `allocate` under a charge of `bytes` on `device()`: refused with
/// `CUDA_ERROR_OUT_OF_MEMORY` past the cap, given back if the driver fails,
/// remembered under the key `allocate` returns if it succeeds.
#[inline]
pub(crate) fn charged(
    table: fn(&Accounting) -> &PtrTable,
    device: impl FnOnce() -> Option<usize>,
    bytes: u64,
    allocate: impl FnOnce() -> (CuResult, u64),
) -> CuResult {
    let accounting = match state::accounting() {
        Err(rc) => return rc,
        Ok(None) => return allocate().0,
        Ok(Some(a)) => a,
    };
    let Some(device) = device() else {
        return allocate().0;
    };
    if accounting.charge(device, bytes).is_err() {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    let (rc, key) = allocate();
    if rc == CUDA_SUCCESS {
        accounting.remember(table(accounting), key, device, bytes);
    } else {
        accounting.uncharge(device, bytes);
    }
    rc
}

/// Runs `free` for `key`, giving back what the key was charged when the
/// driver succeeds. Keys we never charged are forwarded untouched.
#[inline]
pub(crate) fn released(
    table: fn(&Accounting) -> &PtrTable,
    key: u64,
    free: impl FnOnce() -> CuResult,
) -> CuResult {
    let accounting = match state::accounting() {
        Err(rc) => return rc,
        Ok(None) => return free(),
        Ok(Some(a)) => a,
    };
    // Out of the table before the driver frees: once freed, the address can
    // come back from another thread's allocation at once.
    let entry = table(accounting).remove_with_aux(key);
    let rc = free();
    if let Some((device, bytes, pool)) = entry {
        if rc != CUDA_SUCCESS {
            table(accounting).insert_with_aux(key, device, bytes, pool);
        } else if pool != 0 {
            // An allocation from a pool that may keep freed memory.
            crate::extra_hooks::freed_into_pool(accounting, pool, device, bytes);
        } else {
            accounting.uncharge(device, bytes);
        }
    }
    rc
}

/// Reads an out-pointer the driver has just filled (`T::default()` for
/// null).
///
/// # Safety
/// `p` is null or valid for reads of a `T`: the out-pointer a hook's caller
/// handed the driver (the driver API's contract for it).
#[inline]
pub(crate) unsafe fn read<T: Copy + Default>(p: *const T) -> T {
    if p.is_null() {
        T::default()
    } else {
        // SAFETY: non-null, and valid for reads by this function's contract.
        unsafe { *p }
    }
}

fn pointers(a: &Accounting) -> &PtrTable {
    &a.pointers
}
fn arrays(a: &Accounting) -> &PtrTable {
    &a.arrays
}

/// # Safety
/// None beyond the driver's: `cuInit` takes no pointers.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CuResult {
    let real = real!(Init);
    // Refuses a bad cap and attaches the shared region before the driver
    // starts, so a misconfiguration shows at the first CUDA call.
    // Once per process, so always timed; printed at DEBUG.
    let started = std::time::Instant::now();
    // Reads the SM caps and priority and sets the launch gate (no work
    // beyond that until the first governed launch).
    if let Err(rc) = crate::sm_limiter::configure() {
        return rc;
    }
    match state::accounting() {
        Err(rc) => return rc,
        // Capped: NVML (to measure the first context) starts now on a
        // helper thread, overlapping the driver's own initialisation.
        Ok(Some(_)) => state::start_nvml_warm_up(),
        Ok(None) => {}
    }
    let attached = started.elapsed();
    // SAFETY: forwarding the caller's arguments.
    let rc = unsafe { real(flags) };
    state::cuda_initialised(rc);
    log!(
        DEBUG,
        "timing: cuInit {} us, of which configuration, region attach and NVML helper start {} us",
        started.elapsed().as_micros(),
        attached.as_micros()
    );
    rc
}

/// # Safety
/// `cuMemAlloc_v2`'s contract: `dptr` is a valid out-pointer.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CuDevicePtr, bytes: usize) -> CuResult {
    let real = real!(MemAlloc);
    charged(pointers, current_device, bytes as u64, || {
        // SAFETY: forwarding the caller's arguments, then reading the
        // out-pointer the caller handed the driver.
        unsafe { (real(dptr, bytes), read(dptr)) }
    })
}

/// # Safety
/// `cuMemAllocManaged`'s contract: `dptr` is a valid out-pointer.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemAllocManaged(
    dptr: *mut CuDevicePtr,
    bytes: usize,
    flags: c_uint,
) -> CuResult {
    let real = real!(MemAllocManaged);
    charged(pointers, current_device, bytes as u64, || {
        // SAFETY: forwarding the caller's arguments, then reading the
        // out-pointer the caller handed the driver.
        unsafe { (real(dptr, bytes, flags), read(dptr)) }
    })
}

/// Pitch alignment assumed before the driver answers; the charge is
/// corrected to `pitch * height` afterwards.
const PITCH_ESTIMATE_ALIGN: usize = 512;

/// # Safety
/// `cuMemAllocPitch_v2`'s contract: `dptr` and `pitch` are valid
/// out-pointers.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemAllocPitch_v2(
    dptr: *mut CuDevicePtr,
    pitch: *mut usize,
    width: usize,
    height: usize,
    element_bytes: c_uint,
) -> CuResult {
    let real = real!(MemAllocPitch);
    let forward = || {
        // SAFETY: forwarding the caller's arguments.
        unsafe { real(dptr, pitch, width, height, element_bytes) }
    };
    let accounting = match state::accounting() {
        Err(rc) => return rc,
        Ok(None) => return forward(),
        Ok(Some(a)) => a,
    };
    let Some(device) = current_device() else {
        return forward();
    };
    let estimate =
        (width.div_ceil(PITCH_ESTIMATE_ALIGN) * PITCH_ESTIMATE_ALIGN).saturating_mul(height) as u64;
    if accounting.charge(device, estimate).is_err() {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    let rc = forward();
    if rc != CUDA_SUCCESS {
        accounting.uncharge(device, estimate);
        return rc;
    }
    // SAFETY: the caller's out-pointers, which the driver just filled.
    let (pitch, pointer) = unsafe { (read(pitch), read(dptr)) };
    let actual = (pitch as u64).saturating_mul(height as u64);
    if actual > estimate && accounting.charge(device, actual - estimate).is_err() {
        accounting.uncharge(device, estimate);
        if let Some(free) = state::cuda().and_then(|d| d.real::<MemFree>()) {
            // SAFETY: the driver's cuMemFree_v2 on the pointer it just returned.
            unsafe { free(pointer) };
        }
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    if actual < estimate {
        accounting.uncharge(device, estimate - actual);
    }
    accounting.remember(&accounting.pointers, pointer, device, actual);
    rc
}

/// # Safety
/// None beyond the driver's: `cuMemFree_v2` takes no host pointers.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemFree_v2(dptr: CuDevicePtr) -> CuResult {
    let real = real!(MemFree);
    released(pointers, dptr, || {
        // SAFETY: forwarding the caller's argument.
        unsafe { real(dptr) }
    })
}

/// # Safety
/// `cuMemAllocAsync`'s contract: `dptr` is a valid out-pointer.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemAllocAsync(
    dptr: *mut CuDevicePtr,
    bytes: usize,
    stream: Opaque,
) -> CuResult {
    let real = real!(MemAllocAsync);
    crate::extra_hooks::pool_allocation(None, bytes as u64, || {
        // SAFETY: forwarding the caller's arguments, then reading the
        // out-pointer the caller handed the driver.
        unsafe { (real(dptr, bytes, stream), read(dptr)) }
    })
}

/// # Safety
/// `cuMemAllocAsync_ptsz`'s contract: `dptr` is a valid out-pointer.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemAllocAsync_ptsz(
    dptr: *mut CuDevicePtr,
    bytes: usize,
    stream: Opaque,
) -> CuResult {
    let real = real!(MemAllocAsyncPtsz);
    crate::extra_hooks::pool_allocation(None, bytes as u64, || {
        // SAFETY: forwarding the caller's arguments, then reading the
        // out-pointer the caller handed the driver.
        unsafe { (real(dptr, bytes, stream), read(dptr)) }
    })
}

/// # Safety
/// `cuMemAllocFromPoolAsync`'s contract: `dptr` is a valid out-pointer.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync(
    dptr: *mut CuDevicePtr,
    bytes: usize,
    pool: Opaque,
    stream: Opaque,
) -> CuResult {
    let real = real!(MemAllocFromPoolAsync);
    // Charged to the card the pool lives on, whatever the current context.
    crate::extra_hooks::pool_allocation(Some(pool), bytes as u64, || {
        // SAFETY: forwarding the caller's arguments, then reading the
        // out-pointer the caller handed the driver.
        unsafe { (real(dptr, bytes, pool, stream), read(dptr)) }
    })
}

/// # Safety
/// `cuMemAllocFromPoolAsync_ptsz`'s contract: `dptr` is a valid out-pointer.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync_ptsz(
    dptr: *mut CuDevicePtr,
    bytes: usize,
    pool: Opaque,
    stream: Opaque,
) -> CuResult {
    let real = real!(MemAllocFromPoolAsyncPtsz);
    crate::extra_hooks::pool_allocation(Some(pool), bytes as u64, || {
        // SAFETY: forwarding the caller's arguments, then reading the
        // out-pointer the caller handed the driver.
        unsafe { (real(dptr, bytes, pool, stream), read(dptr)) }
    })
}

/// # Safety
/// None beyond the driver's: `cuMemFreeAsync` takes no host pointers.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemFreeAsync(dptr: CuDevicePtr, stream: Opaque) -> CuResult {
    let real = real!(MemFreeAsync);
    released(pointers, dptr, || {
        // SAFETY: forwarding the caller's arguments.
        unsafe { real(dptr, stream) }
    })
}

/// # Safety
/// None beyond the driver's: `cuMemFreeAsync_ptsz` takes no host pointers.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemFreeAsync_ptsz(dptr: CuDevicePtr, stream: Opaque) -> CuResult {
    let real = real!(MemFreeAsyncPtsz);
    released(pointers, dptr, || {
        // SAFETY: forwarding the caller's arguments.
        unsafe { real(dptr, stream) }
    })
}

pub(crate) fn array_bytes(
    width: usize,
    height: usize,
    depth: usize,
    format: c_uint,
    channels: c_uint,
) -> u64 {
    (width as u64)
        .saturating_mul(height.max(1) as u64)
        .saturating_mul(depth.max(1) as u64)
        .saturating_mul(array_format_bytes(format))
        .saturating_mul(channels.max(1) as u64)
}

/// An array made by `create` into `*array`, charged on the current card by
/// the size `bytes` reads off the caller's descriptor; without a descriptor
/// the call is forwarded uncharged.
///
/// # Safety
/// `desc` is null or points to a valid descriptor; `array` is null or the
/// caller's valid out-pointer that `create` fills.
unsafe fn charged_array<D>(
    array: *mut Opaque,
    desc: *const D,
    bytes: impl FnOnce(&D) -> u64,
    create: impl FnOnce() -> CuResult,
) -> CuResult {
    // SAFETY: `array` is null or valid for reads, by this function's contract.
    let forward = || (create(), unsafe { read(array as *const usize) } as u64);
    if desc.is_null() {
        return forward().0;
    }
    // SAFETY: non-null descriptor from the caller.
    let d = unsafe { &*desc };
    charged(arrays, current_device, bytes(d), forward)
}

/// # Safety
/// `cuArrayCreate_v2`'s contract: `array` is a valid out-pointer and `desc`
/// null or a valid descriptor.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuArrayCreate_v2(
    array: *mut Opaque,
    desc: *const ArrayDescriptor,
) -> CuResult {
    let real = real!(ArrayCreate);
    let create = || {
        // SAFETY: forwarding the caller's arguments.
        unsafe { real(array, desc) }
    };
    // SAFETY: the caller's descriptor and out-pointer, forwarded as given.
    unsafe {
        charged_array(
            array,
            desc,
            |d| array_bytes(d.width, d.height, 1, d.format, d.channels),
            create,
        )
    }
}

/// # Safety
/// `cuArray3DCreate_v2`'s contract: `array` is a valid out-pointer and `desc`
/// null or a valid descriptor.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuArray3DCreate_v2(
    array: *mut Opaque,
    desc: *const Array3dDescriptor,
) -> CuResult {
    let real = real!(Array3DCreate);
    let create = || {
        // SAFETY: forwarding the caller's arguments.
        unsafe { real(array, desc) }
    };
    // SAFETY: the caller's descriptor and out-pointer, forwarded as given.
    unsafe {
        charged_array(
            array,
            desc,
            |d| array_bytes(d.width, d.height, d.depth, d.format, d.channels),
            create,
        )
    }
}

/// # Safety
/// None beyond the driver's: the array handle is opaque.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuArrayDestroy(array: Opaque) -> CuResult {
    let real = real!(ArrayDestroy);
    released(arrays, array as u64, || {
        // SAFETY: forwarding the caller's argument.
        unsafe { real(array) }
    })
}

/// # Safety
/// `cuMemGetInfo_v2`'s contract: `free` and `total` are valid
/// out-pointers (null ones are left to the driver to refuse).
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CuResult {
    let real = real!(MemGetInfo);
    // SAFETY: forwarding the caller's arguments.
    let rc = unsafe { real(free, total) };
    if rc != CUDA_SUCCESS || free.is_null() || total.is_null() {
        return rc;
    }
    let Ok(Some(accounting)) = state::accounting() else {
        return rc;
    };
    if let Some(device) = current_device() {
        if let Some(limit) = accounting.limit(device) {
            // SAFETY: non-null out-pointers the driver just filled.
            unsafe {
                let shown_total = limit.min(*total as u64);
                let room = limit.saturating_sub(accounting.used(device));
                *total = shown_total as usize;
                *free = room.min(*free as u64).min(shown_total) as usize;
            }
        }
    }
    rc
}

/// # Safety
/// `cuDeviceTotalMem_v2`'s contract: `bytes` is a valid out-pointer.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, device: CuDevice) -> CuResult {
    let real = real!(DeviceTotalMem);
    // SAFETY: forwarding the caller's arguments.
    let rc = unsafe { real(bytes, device) };
    if rc != CUDA_SUCCESS || bytes.is_null() {
        return rc;
    }
    if let (Ok(Some(accounting)), Some(d)) = (state::accounting(), tracked(device)) {
        if let Some(limit) = accounting.limit(d) {
            // SAFETY: non-null out-pointer the driver just filled.
            unsafe { *bytes = limit.min(*bytes as u64) as usize };
        }
    }
    rc
}

/// What creating a context cost on its card, by NVML's reading of this
/// process's usage (or, where NVML cannot list us, the card's) before and
/// after `create`, charged to this process within the cap of container card
/// `card` (CUDA ordinal `ordinal`). A context that does not fit is undone
/// with `undo` and refused with `CUDA_ERROR_OUT_OF_MEMORY`: the container
/// must never hold more than its slice, contexts included. Returns the
/// result and the bytes charged.
fn measured_context(
    ordinal: CuDevice,
    card: usize,
    create: impl FnOnce() -> CuResult,
    undo: impl FnOnce(),
    accounting: &Accounting,
) -> (CuResult, u64) {
    let timing = log::enabled(DEBUG);
    let t0 = timing.then(std::time::Instant::now);
    // Where we know the pids NVML lists us under (our own in the initial
    // pid namespace; inside another, our own or the host pid the node
    // agent told us, whichever the driver reports) and this
    // process holds nothing on the card yet, its usage before the context
    // is known to be zero: no NVML reading (nor waiting for NVML's
    // start-up) before the context. Else (NVML lists host pids and we do
    // not know ours, so the card-wide difference is used) the reading is
    // taken first.
    let known_empty = crate::host_pid::listed_by_nvml() && accounting.own_usage(card) == 0;
    let before = if known_empty {
        Some(UsageSample::NOTHING_OF_OURS)
    } else {
        usage_before_context(ordinal)
    };
    let t1 = timing.then(std::time::Instant::now);
    let rc = create();
    if rc != CUDA_SUCCESS {
        return (rc, 0);
    }
    let t2 = timing.then(std::time::Instant::now);
    let after = before.and_then(|_| usage_after_context(ordinal));
    if let (Some(t0), Some(t1), Some(t2)) = (t0, t1, t2) {
        log!(
            DEBUG,
            "timing: card {card}: NVML before the context {} us ({}), context {} us, NVML after {} us (NVML start-up waited for included)",
            (t1 - t0).as_micros(),
            if known_empty { "none needed: own usage known to be 0" } else { "read" },
            (t2 - t1).as_micros(),
            t2.elapsed().as_micros()
        );
    }
    let overhead = match (before, after) {
        (Some(_), Some(a)) if known_empty && a.own.is_none() => {
            log!(
                crate::log::WARN,
                "card {card}: NVML does not list this process; its context is not charged"
            );
            0
        }
        (Some(b), Some(a)) => UsageSample::growth(b, a),
        _ => 0,
    };
    if overhead > 0 && accounting.charge(card, overhead).is_err() {
        log!(
            INFO,
            "card {card}: a context of {overhead} bytes does not fit the cap"
        );
        undo();
        return (CUDA_ERROR_OUT_OF_MEMORY, 0);
    }
    log!(INFO, "card {card}: context charged {overhead} bytes");
    (rc, overhead)
}

/// # Safety
/// `cuDevicePrimaryCtxRetain`'s contract: `ctx` is a valid out-pointer.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut Opaque, device: CuDevice) -> CuResult {
    let real = real!(PrimaryCtxRetain);
    let forward = || {
        // SAFETY: forwarding the caller's arguments.
        unsafe { real(ctx, device) }
    };
    let accounting = match state::accounting() {
        Err(rc) => return rc,
        Ok(None) => return forward(),
        Ok(Some(a)) => a,
    };
    if refused_foreign(device) {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    let Some(d) = tracked(device) else {
        return forward();
    };
    let primary = &accounting.primary[d];
    // The first retain creates the context: one thread measures it.
    let measure = primary.refs.load(Ordering::Acquire) == 0
        && primary
            .charged
            .compare_exchange(0, MEASURING, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
    if !measure {
        let rc = forward();
        if rc == CUDA_SUCCESS {
            primary.refs.fetch_add(1, Ordering::AcqRel);
        }
        return rc;
    }
    let undo = || {
        if let Some(release) = state::cuda().and_then(|c| c.real::<PrimaryCtxRelease>()) {
            // SAFETY: the driver's cuDevicePrimaryCtxRelease_v2, balancing
            // the retain that just succeeded.
            unsafe { release(device) };
        }
    };
    let (rc, overhead) = measured_context(device, d, forward, undo, accounting);
    if rc == CUDA_SUCCESS {
        primary.refs.fetch_add(1, Ordering::AcqRel);
    }
    primary.charged.store(overhead, Ordering::Release);
    rc
}

/// Gives back a primary context's charge once our retains are all released.
fn release_primary(device: CuDevice, reset: bool) {
    let (Ok(Some(accounting)), Some(d)) = (state::accounting(), tracked(device)) else {
        return;
    };
    let primary = &accounting.primary[d];
    let last = if reset {
        primary.refs.swap(0, Ordering::AcqRel) > 0
    } else {
        primary
            .refs
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1))
            == Ok(1)
    };
    if last {
        match primary.charged.swap(0, Ordering::AcqRel) {
            0 | MEASURING => {}
            bytes => accounting.uncharge(d, bytes),
        }
    }
}

/// # Safety
/// None beyond the driver's: `cuDevicePrimaryCtxRelease_v2` takes no pointers.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(device: CuDevice) -> CuResult {
    let real = real!(PrimaryCtxRelease);
    // SAFETY: forwarding the caller's arguments.
    let rc = unsafe { real(device) };
    if rc == CUDA_SUCCESS {
        release_primary(device, false);
    }
    rc
}

/// # Safety
/// None beyond the driver's: `cuDevicePrimaryCtxReset_v2` takes no pointers.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxReset_v2(device: CuDevice) -> CuResult {
    let real = real!(PrimaryCtxReset);
    // SAFETY: forwarding the caller's arguments.
    let rc = unsafe { real(device) };
    if rc == CUDA_SUCCESS {
        release_primary(device, true);
    }
    rc
}

/// Shared body of the `cuCtxCreate` versions.
///
/// # Safety
/// `ctx` is null or valid for reads once `create` has filled it (the
/// caller's out-pointer).
unsafe fn created_context(
    ctx: *mut Opaque,
    device: CuDevice,
    create: impl FnOnce() -> CuResult,
) -> CuResult {
    let accounting = match state::accounting() {
        Err(rc) => return rc,
        Ok(None) => return create(),
        Ok(Some(a)) => a,
    };
    if refused_foreign(device) {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    let Some(d) = tracked(device) else {
        return create();
    };
    let undo = || {
        if let Some(destroy) = state::cuda().and_then(|c| c.real::<CtxDestroy>()) {
            // SAFETY: the driver's cuCtxDestroy_v2 on the context it just
            // made, read from the out-pointer it filled.
            unsafe { destroy(read(ctx)) };
        }
    };
    let (rc, overhead) = measured_context(device, d, create, undo, accounting);
    if rc == CUDA_SUCCESS && overhead > 0 {
        // SAFETY: the out-pointer the driver just filled.
        let context = unsafe { read(ctx as *const usize) } as u64;
        accounting.remember(&accounting.contexts, context, d, overhead);
    }
    rc
}

/// # Safety
/// `cuCtxCreate_v2`'s contract: `ctx` is a valid out-pointer.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuCtxCreate_v2(
    ctx: *mut Opaque,
    flags: c_uint,
    device: CuDevice,
) -> CuResult {
    let real = real!(CtxCreate);
    let create = || {
        // SAFETY: forwarding the caller's arguments.
        unsafe { real(ctx, flags, device) }
    };
    // SAFETY: the caller's out-pointer, which the driver fills.
    unsafe { created_context(ctx, device, create) }
}

/// # Safety
/// `cuCtxCreate_v3`'s contract: `ctx` is a valid out-pointer and
/// `params` what the driver accepts.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuCtxCreate_v3(
    ctx: *mut Opaque,
    params: *mut c_void,
    count: c_int,
    flags: c_uint,
    device: CuDevice,
) -> CuResult {
    let real = real!(CtxCreateV3);
    let create = || {
        // SAFETY: forwarding the caller's arguments.
        unsafe { real(ctx, params, count, flags, device) }
    };
    // SAFETY: the caller's out-pointer, which the driver fills.
    unsafe { created_context(ctx, device, create) }
}

/// # Safety
/// `cuCtxCreate_v4`'s contract: `ctx` is a valid out-pointer and
/// `params` what the driver accepts.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuCtxCreate_v4(
    ctx: *mut Opaque,
    params: *mut c_void,
    flags: c_uint,
    device: CuDevice,
) -> CuResult {
    let real = real!(CtxCreateV4);
    let create = || {
        // SAFETY: forwarding the caller's arguments.
        unsafe { real(ctx, params, flags, device) }
    };
    // SAFETY: the caller's out-pointer, which the driver fills.
    unsafe { created_context(ctx, device, create) }
}

/// # Safety
/// None beyond the driver's: the context handle is opaque.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuCtxDestroy_v2(ctx: Opaque) -> CuResult {
    let real = real!(CtxDestroy);
    released(
        |a| &a.contexts,
        ctx as u64,
        || {
            // SAFETY: forwarding the caller's argument.
            unsafe { real(ctx) }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_sizes() {
        assert_eq!(array_bytes(1024, 0, 0, 0x20, 4), 16 * 1024);
        assert_eq!(array_bytes(64, 64, 64, 0x01, 1), 64 * 64 * 64);
        assert_eq!(array_bytes(usize::MAX, 2, 2, 0x20, 4), u64::MAX);
    }
}
