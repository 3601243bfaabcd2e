//! The intercepted CUDA driver entry points. Each one forwards to the real
//! driver; the memory paths charge the card the memory lands on before the
//! driver is asked and give back exactly that on free, the reporting paths
//! show the cap, and `cuGetProcAddress` hands out our hooks for the
//! addresses we intercept. With no cap configured every hook is a plain
//! forward; with an invalid one every hook refuses (fail closed).
//!
//! Exported under the driver's names (`#[no_mangle]`, except in unit-test
//! builds, where they would interpose on the test binary itself).

use crate::accounting::{Accounting, MEASURING};
use crate::cards::{self, Card};
use crate::driver::Hook;
use crate::ffi::*;
use crate::log::{self, log, DEBUG, ERROR, INFO};
use crate::nvml_hooks::{usage_after_context, usage_before_context, UsageSample};
use crate::ptr_table::PtrTable;
use crate::state;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::atomic::Ordering;

/// The real function for `$hook`, typed as `$ty`; returns
/// `CUDA_ERROR_NOT_FOUND` from the hook when the driver lacks it.
macro_rules! real {
    ($hook:expr, $ty:ty) => {
        match state::cuda().and_then(|d| d.real($hook)) {
            // SAFETY: the address is the driver's implementation of this
            // entry point, whose C signature is `$ty`.
            Some(f) => unsafe { std::mem::transmute::<usize, $ty>(f) },
            None => return CUDA_ERROR_NOT_FOUND,
        }
    };
}
pub(crate) use real;

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
type ArrayDestroyFn = unsafe extern "C" fn(Opaque) -> CuResult;
type MemGetInfoFn = unsafe extern "C" fn(*mut usize, *mut usize) -> CuResult;
type TotalMemFn = unsafe extern "C" fn(*mut usize, CuDevice) -> CuResult;
type RetainFn = unsafe extern "C" fn(*mut Opaque, CuDevice) -> CuResult;
type DeviceFn = unsafe extern "C" fn(CuDevice) -> CuResult;
type CtxCreateV2Fn = unsafe extern "C" fn(*mut Opaque, c_uint, CuDevice) -> CuResult;
type CtxCreateV3Fn =
    unsafe extern "C" fn(*mut Opaque, *mut c_void, c_int, c_uint, CuDevice) -> CuResult;
type CtxCreateV4Fn = unsafe extern "C" fn(*mut Opaque, *mut c_void, c_uint, CuDevice) -> CuResult;
type CtxDestroyFn = unsafe extern "C" fn(Opaque) -> CuResult;
type InitFn = unsafe extern "C" fn(c_uint) -> CuResult;
type GetProcFn = unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64) -> CuResult;
type GetProcV2Fn =
    unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int) -> CuResult;

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

/// Reads an out-pointer the driver has just filled.
#[inline]
pub(crate) fn read<T: Copy + Default>(p: *const T) -> T {
    if p.is_null() {
        T::default()
    } else {
        // SAFETY: non-null out-pointer the caller gave the driver.
        unsafe { *p }
    }
}

fn pointers(a: &Accounting) -> &PtrTable {
    &a.pointers
}
fn arrays(a: &Accounting) -> &PtrTable {
    &a.arrays
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CuResult {
    let real = real!(Hook::Init, InitFn);
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

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CuDevicePtr, bytes: usize) -> CuResult {
    let real = real!(Hook::MemAlloc, AllocFn);
    // SAFETY (all closures below): forwarding the caller's arguments.
    charged(pointers, current_device, bytes as u64, || {
        (unsafe { real(dptr, bytes) }, read(dptr))
    })
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemAllocManaged(
    dptr: *mut CuDevicePtr,
    bytes: usize,
    flags: c_uint,
) -> CuResult {
    let real = real!(Hook::MemAllocManaged, AllocManagedFn);
    charged(pointers, current_device, bytes as u64, || {
        (unsafe { real(dptr, bytes, flags) }, read(dptr))
    })
}

/// Pitch alignment assumed before the driver answers; the charge is
/// corrected to `pitch * height` afterwards.
const PITCH_ESTIMATE_ALIGN: usize = 512;

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemAllocPitch_v2(
    dptr: *mut CuDevicePtr,
    pitch: *mut usize,
    width: usize,
    height: usize,
    element_bytes: c_uint,
) -> CuResult {
    let real = real!(Hook::MemAllocPitch, AllocPitchFn);
    let forward = || unsafe { real(dptr, pitch, width, height, element_bytes) };
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
    let actual = (read(pitch) as u64).saturating_mul(height as u64);
    if actual > estimate && accounting.charge(device, actual - estimate).is_err() {
        accounting.uncharge(device, estimate);
        if let Some(free) = state::cuda().and_then(|d| d.real(Hook::MemFree)) {
            // SAFETY: the driver's cuMemFree_v2 on the pointer it just returned.
            unsafe { std::mem::transmute::<usize, FreeFn>(free)(read(dptr)) };
        }
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    if actual < estimate {
        accounting.uncharge(device, estimate - actual);
    }
    accounting.remember(&accounting.pointers, read(dptr), device, actual);
    rc
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemFree_v2(dptr: CuDevicePtr) -> CuResult {
    let real = real!(Hook::MemFree, FreeFn);
    released(pointers, dptr, || unsafe { real(dptr) })
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemAllocAsync(
    dptr: *mut CuDevicePtr,
    bytes: usize,
    stream: Opaque,
) -> CuResult {
    let real = real!(Hook::MemAllocAsync, AllocAsyncFn);
    crate::extra_hooks::pool_allocation(None, bytes as u64, || {
        (unsafe { real(dptr, bytes, stream) }, read(dptr))
    })
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemAllocAsync_ptsz(
    dptr: *mut CuDevicePtr,
    bytes: usize,
    stream: Opaque,
) -> CuResult {
    let real = real!(Hook::MemAllocAsyncPtsz, AllocAsyncFn);
    crate::extra_hooks::pool_allocation(None, bytes as u64, || {
        (unsafe { real(dptr, bytes, stream) }, read(dptr))
    })
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync(
    dptr: *mut CuDevicePtr,
    bytes: usize,
    pool: Opaque,
    stream: Opaque,
) -> CuResult {
    let real = real!(Hook::MemAllocFromPoolAsync, AllocPoolFn);
    // Charged to the card the pool lives on, whatever the current context.
    crate::extra_hooks::pool_allocation(Some(pool), bytes as u64, || {
        (unsafe { real(dptr, bytes, pool, stream) }, read(dptr))
    })
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync_ptsz(
    dptr: *mut CuDevicePtr,
    bytes: usize,
    pool: Opaque,
    stream: Opaque,
) -> CuResult {
    let real = real!(Hook::MemAllocFromPoolAsyncPtsz, AllocPoolFn);
    crate::extra_hooks::pool_allocation(Some(pool), bytes as u64, || {
        (unsafe { real(dptr, bytes, pool, stream) }, read(dptr))
    })
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemFreeAsync(dptr: CuDevicePtr, stream: Opaque) -> CuResult {
    let real = real!(Hook::MemFreeAsync, FreeAsyncFn);
    released(pointers, dptr, || unsafe { real(dptr, stream) })
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemFreeAsync_ptsz(dptr: CuDevicePtr, stream: Opaque) -> CuResult {
    let real = real!(Hook::MemFreeAsyncPtsz, FreeAsyncFn);
    released(pointers, dptr, || unsafe { real(dptr, stream) })
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
/// `desc` is null or points to a valid descriptor; `array` is the caller's
/// out-pointer that `create` fills.
unsafe fn charged_array<D>(
    array: *mut Opaque,
    desc: *const D,
    bytes: impl FnOnce(&D) -> u64,
    create: impl FnOnce() -> CuResult,
) -> CuResult {
    let forward = || (create(), read(array as *const usize) as u64);
    if desc.is_null() {
        return forward().0;
    }
    // SAFETY: non-null descriptor from the caller.
    let d = unsafe { &*desc };
    charged(arrays, current_device, bytes(d), forward)
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuArrayCreate_v2(
    array: *mut Opaque,
    desc: *const ArrayDescriptor,
) -> CuResult {
    let real = real!(Hook::ArrayCreate, ArrayCreateFn);
    // SAFETY: the caller's descriptor and out-pointer, forwarded as given.
    unsafe {
        charged_array(
            array,
            desc,
            |d| array_bytes(d.width, d.height, 1, d.format, d.channels),
            || real(array, desc),
        )
    }
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuArray3DCreate_v2(
    array: *mut Opaque,
    desc: *const Array3dDescriptor,
) -> CuResult {
    let real = real!(Hook::Array3DCreate, Array3dCreateFn);
    // SAFETY: the caller's descriptor and out-pointer, forwarded as given.
    unsafe {
        charged_array(
            array,
            desc,
            |d| array_bytes(d.width, d.height, d.depth, d.format, d.channels),
            || real(array, desc),
        )
    }
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuArrayDestroy(array: Opaque) -> CuResult {
    let real = real!(Hook::ArrayDestroy, ArrayDestroyFn);
    released(arrays, array as u64, || unsafe { real(array) })
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CuResult {
    let real = real!(Hook::MemGetInfo, MemGetInfoFn);
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

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, device: CuDevice) -> CuResult {
    let real = real!(Hook::DeviceTotalMem, TotalMemFn);
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

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut Opaque, device: CuDevice) -> CuResult {
    let real = real!(Hook::PrimaryCtxRetain, RetainFn);
    let forward = || unsafe { real(ctx, device) };
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
        if let Some(release) = state::cuda().and_then(|c| c.real(Hook::PrimaryCtxRelease)) {
            // SAFETY: the driver's cuDevicePrimaryCtxRelease_v2, balancing
            // the retain that just succeeded.
            unsafe { std::mem::transmute::<usize, DeviceFn>(release)(device) };
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

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(device: CuDevice) -> CuResult {
    let real = real!(Hook::PrimaryCtxRelease, DeviceFn);
    // SAFETY: forwarding the caller's arguments.
    let rc = unsafe { real(device) };
    if rc == CUDA_SUCCESS {
        release_primary(device, false);
    }
    rc
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxReset_v2(device: CuDevice) -> CuResult {
    let real = real!(Hook::PrimaryCtxReset, DeviceFn);
    // SAFETY: forwarding the caller's arguments.
    let rc = unsafe { real(device) };
    if rc == CUDA_SUCCESS {
        release_primary(device, true);
    }
    rc
}

/// Shared body of the `cuCtxCreate` versions.
fn created_context(
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
        if let Some(destroy) = state::cuda().and_then(|c| c.real(Hook::CtxDestroy)) {
            // SAFETY: the driver's cuCtxDestroy_v2 on the context it just made.
            unsafe { std::mem::transmute::<usize, CtxDestroyFn>(destroy)(read(ctx)) };
        }
    };
    let (rc, overhead) = measured_context(device, d, create, undo, accounting);
    if rc == CUDA_SUCCESS && overhead > 0 {
        accounting.remember(
            &accounting.contexts,
            read(ctx as *const usize) as u64,
            d,
            overhead,
        );
    }
    rc
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuCtxCreate_v2(
    ctx: *mut Opaque,
    flags: c_uint,
    device: CuDevice,
) -> CuResult {
    let real = real!(Hook::CtxCreate, CtxCreateV2Fn);
    created_context(ctx, device, || unsafe { real(ctx, flags, device) })
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuCtxCreate_v3(
    ctx: *mut Opaque,
    params: *mut c_void,
    count: c_int,
    flags: c_uint,
    device: CuDevice,
) -> CuResult {
    let real = real!(Hook::CtxCreateV3, CtxCreateV3Fn);
    created_context(ctx, device, || unsafe {
        real(ctx, params, count, flags, device)
    })
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuCtxCreate_v4(
    ctx: *mut Opaque,
    params: *mut c_void,
    flags: c_uint,
    device: CuDevice,
) -> CuResult {
    let real = real!(Hook::CtxCreateV4, CtxCreateV4Fn);
    created_context(ctx, device, || unsafe { real(ctx, params, flags, device) })
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuCtxDestroy_v2(ctx: Opaque) -> CuResult {
    let real = real!(Hook::CtxDestroy, CtxDestroyFn);
    released(|a| &a.contexts, ctx as u64, || unsafe { real(ctx) })
}

/// Replaces a pointer the driver handed out with our hook, if it is one of
/// the addresses we intercept.
fn substitute_hook(pfn: *mut *mut c_void) {
    if pfn.is_null() {
        return;
    }
    // SAFETY: non-null out-pointer the driver just filled.
    let address = unsafe { *pfn } as usize;
    if let Some(hook) = state::cuda().and_then(|d| d.hook_for_address(address)) {
        // SAFETY: as above.
        unsafe { *pfn = hook as *mut c_void };
    }
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    flags: u64,
) -> CuResult {
    let real = real!(Hook::GetProcAddress, GetProcFn);
    // SAFETY: forwarding the caller's exact arguments (version and flags).
    let rc = unsafe { real(symbol, pfn, cuda_version, flags) };
    if rc == CUDA_SUCCESS {
        substitute_hook(pfn);
    }
    rc
}

#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    flags: u64,
    status: *mut c_int,
) -> CuResult {
    let real = real!(Hook::GetProcAddressV2, GetProcV2Fn);
    // SAFETY: forwarding the caller's exact arguments (version and flags).
    let rc = unsafe { real(symbol, pfn, cuda_version, flags, status) };
    if rc == CUDA_SUCCESS {
        substitute_hook(pfn);
    }
    rc
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
