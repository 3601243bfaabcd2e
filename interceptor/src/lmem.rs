//! Local memory: the per-thread stack a context holds on its card. The
//! driver reserves the stack (`CU_LIMIT_STACK_SIZE`) for every thread the
//! card can hold at once (multiprocessors × threads per multiprocessor,
//! 270,336 on an H200), and grows it when a kernel that needs more local
//! memory per thread is launched, keeping the growth until the context
//! ends. A kernel with 64 KiB of local memory per thread therefore takes
//! about 16.5 GiB of an H200 at its first launch, none of it through an
//! allocation call: measured on an H200, a process capped at 10 GiB held
//! 26.5 GiB this way before this module charged it.
//!
//! So, for each launch with a memory cap:
//! - the kernel's local memory per thread
//!   (`CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES`, from `cuFuncGetAttribute` or,
//!   for the runtime's library kernels, `cuKernelGetAttribute`; read once
//!   per handle and remembered) is compared with the stack already charged
//!   on the card: a kernel within the initial 1 KiB costs one table lookup;
//! - a kernel that needs more is charged the growth × the card's resident
//!   threads *before* it is launched, and refused with out-of-memory when
//!   that does not fit the cap (what the driver answers when the card
//!   cannot hold the stack);
//! - after such a launch, and after launches of kernels the driver does not
//!   describe and of graphs (whose kernels it sizes at launch), the charge is
//!   set to what the driver then reports for the context's stack; growth
//!   found that way cannot be refused and is charged past the cap with a
//!   warning (the next allocations are refused, the node agent sees it).
//!
//! `cuCtxSetLimit(CU_LIMIT_STACK_SIZE)` is charged (or given back) the same
//! way, before the driver is asked. The context's initial stack is part of
//! its measured cost. One stack per card is assumed: a second context on
//! the same card, which has its own stack, is not charged for it. The charge
//! is not given back when the context is destroyed (over-, never
//! under-charged until exit), as with the other context limits.

use crate::accounting::Accounting;
use crate::cuda_hooks::tracked;
use crate::ffi::*;
use crate::log::{log, WARN};
use crate::ptr_table::PtrTable;
use crate::state;
use std::ffi::c_int;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tessera_api::shared_region::MAX_DEVICES;

/// `CU_LIMIT_STACK_SIZE`.
pub const STACK_LIMIT: std::ffi::c_uint = 0;
/// `CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES`.
const LOCAL_SIZE_BYTES: c_int = 3;
/// `CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`.
const MULTIPROCESSOR_COUNT: c_int = 16;
/// `CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR`.
const THREADS_PER_MULTIPROCESSOR: c_int = 39;
/// Remembered for a function the driver would not describe: far above any
/// real local size, and small enough for the table to hold.
const UNKNOWN: u64 = (1 << 56) - 1;

/// Per container card: the stack per thread charged for (0: not read yet).
static STACK: [AtomicU64; MAX_DEVICES] = [const { AtomicU64::new(0) }; MAX_DEVICES];
/// Per container card: threads it holds at once (0: not read yet).
static THREADS: [AtomicU64; MAX_DEVICES] = [const { AtomicU64::new(0) }; MAX_DEVICES];
/// Function handle -> its local memory per thread ([`UNKNOWN`]).
static LOCAL_SIZES: PtrTable = PtrTable::new(16);
/// A stack every context of the process holds at least: the driver's
/// initial 1 KiB, lowered if `cuCtxSetLimit` ever sets less. A kernel
/// needing no more than this grows nothing, and is let through without
/// asking which card is current (most kernels: the usual path is one table
/// lookup and one load).
static FLOOR: AtomicU64 = AtomicU64::new(DRIVER_INITIAL_STACK);
/// Whether the warning about an undescribed kernel was given.
static WARNED_UNKNOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// The stack per thread a new context starts with.
const DRIVER_INITIAL_STACK: u64 = 1024;
/// Serialises the growth path (rare) so two threads do not charge twice.
static GROWING: Mutex<()> = Mutex::new(());

/// What a launch must do afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[must_use]
pub struct AfterLaunch {
    /// Set this card's charge to the stack the driver reports.
    stack_of: Option<usize>,
    /// The function's first launch in this process: the driver loads its
    /// code then ([`crate::driver_overhead`]).
    first_of_function: bool,
}

/// Before launching `f`: charges the stack growth it needs, or refuses it.
#[inline]
pub fn before_launch(f: Opaque) -> Result<AfterLaunch, CuResult> {
    let accounting = match state::accounting() {
        Ok(Some(a)) => a,
        _ => return Ok(AfterLaunch::default()),
    };
    let (need, first_of_function) = local_size(f);
    let nothing = AfterLaunch {
        stack_of: None,
        first_of_function,
    };
    if need <= FLOOR.load(Ordering::Relaxed) {
        return Ok(nothing);
    }
    let Some(card) = current_card() else {
        return Ok(nothing);
    };
    let charged = stack_charged(card);
    let reconcile = AfterLaunch {
        stack_of: Some(card),
        first_of_function,
    };
    if need == UNKNOWN {
        return Ok(reconcile);
    }
    if need <= charged {
        return Ok(nothing);
    }
    let _growing = GROWING.lock().unwrap_or_else(|e| e.into_inner());
    let charged = STACK[card].load(Ordering::Acquire);
    if need > charged {
        let growth = (need - charged) * threads(card);
        if accounting.charge(card, growth).is_err() {
            return Err(CUDA_ERROR_OUT_OF_MEMORY);
        }
        STACK[card].store(need, Ordering::Release);
    }
    Ok(reconcile)
}

/// After a launch, what [`before_launch`] asked to look at: the stack the
/// driver reports, then (first launch of a function) the driver's overhead.
#[inline]
pub fn after_launch(after: AfterLaunch) {
    if let Some(card) = after.stack_of {
        reconcile(card);
    }
    if after.first_of_function {
        crate::driver_overhead::after_first_launch();
    }
}

/// After a graph launch: its kernels' stacks are sized at launch.
#[inline]
pub fn after_graph_launch() {
    if let Ok(Some(_)) = state::accounting() {
        if let Some(card) = current_card() {
            reconcile(card);
        }
    }
}

/// `cuCtxSetLimit(CU_LIMIT_STACK_SIZE, per_thread)`: the growth charged
/// before `forward` (refused past the cap), a shrink given back after.
pub fn set_stack(
    accounting: &Accounting,
    per_thread: u64,
    forward: impl FnOnce() -> CuResult,
) -> CuResult {
    FLOOR.fetch_min(per_thread, Ordering::Relaxed);
    let Some(card) = current_card() else {
        return forward();
    };
    stack_charged(card);
    let _growing = GROWING.lock().unwrap_or_else(|e| e.into_inner());
    let charged = STACK[card].load(Ordering::Acquire);
    let threads = threads(card);
    if per_thread > charged {
        let growth = (per_thread - charged) * threads;
        if accounting.charge(card, growth).is_err() {
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
        let rc = forward();
        if rc == CUDA_SUCCESS {
            STACK[card].store(per_thread, Ordering::Release);
        } else {
            accounting.uncharge(card, growth);
        }
        return rc;
    }
    let rc = forward();
    if rc == CUDA_SUCCESS && per_thread < charged {
        accounting.uncharge(card, (charged - per_thread) * threads);
        STACK[card].store(per_thread, Ordering::Release);
    }
    rc
}

/// In a forked child: the parent's stacks are not the child's.
pub fn after_fork_in_child() {
    for stack in &STACK {
        stack.store(0, Ordering::Relaxed);
    }
}

/// The container card of the current context, if it is capped.
fn current_card() -> Option<usize> {
    tracked(crate::extra_hooks::current_ordinal()?)
}

/// The stack charged on `card`; read from the driver the first time (the
/// context's initial stack, part of its measured cost).
fn stack_charged(card: usize) -> u64 {
    let charged = STACK[card].load(Ordering::Acquire);
    if charged != 0 {
        return charged;
    }
    let stack = driver_stack().unwrap_or(0).max(1);
    match STACK[card].compare_exchange(0, stack, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => stack,
        Err(already) => already,
    }
}

/// Sets `card`'s charge to the stack the driver reports for the current
/// context.
fn reconcile(card: usize) {
    let (Ok(Some(accounting)), Some(real)) = (state::accounting(), driver_stack()) else {
        return;
    };
    if stack_charged(card) == real {
        return;
    }
    let _growing = GROWING.lock().unwrap_or_else(|e| e.into_inner());
    let charged = STACK[card].load(Ordering::Acquire);
    if real > charged {
        let growth = (real - charged) * threads(card);
        if !accounting.charge_held(card, growth) {
            log!(
                WARN,
                "card {card}: a launch grew the stack to {real} bytes per thread, {growth} bytes past the cap; further allocations are refused"
            );
        }
    } else if real < charged {
        accounting.uncharge(card, (charged - real) * threads(card));
    }
    STACK[card].store(real, Ordering::Release);
}

/// The current context's stack per thread.
fn driver_stack() -> Option<u64> {
    let get = state::cuda()?.ctx_get_limit?;
    let mut value = 0usize;
    // SAFETY: the driver's cuCtxGetLimit with a valid out-pointer.
    (unsafe { get(&mut value, STACK_LIMIT) } == CUDA_SUCCESS).then_some(value as u64)
}

/// `f`'s local memory per thread, remembered after the first ask, and
/// whether this was the first ask (`f` newly remembered).
#[inline]
fn local_size(f: Opaque) -> (u64, bool) {
    if f.is_null() {
        return (0, false);
    }
    let key = f as u64;
    if let Some((_, bytes)) = LOCAL_SIZES.get(key) {
        return (bytes, false);
    }
    let driver = state::cuda();
    let as_function = || {
        let get = driver?.func_get_attribute?;
        let mut value: c_int = 0;
        // SAFETY: the driver's cuFuncGetAttribute with a valid out-pointer
        // and the caller's function handle.
        (unsafe { get(&mut value, LOCAL_SIZE_BYTES, f) } == CUDA_SUCCESS)
            .then_some(u64::try_from(value).unwrap_or(0))
    };
    // The runtime (CUDA 12+) launches library kernels (`CUkernel`), which
    // only cuKernelGetAttribute describes.
    let as_library_kernel = || {
        let get = driver?.kernel_get_attribute?;
        let ordinal = crate::extra_hooks::current_ordinal()?;
        let mut value: c_int = 0;
        // SAFETY: the driver's cuKernelGetAttribute with a valid
        // out-pointer, the caller's handle and the current device.
        (unsafe { get(&mut value, LOCAL_SIZE_BYTES, f, ordinal) } == CUDA_SUCCESS)
            .then_some(u64::try_from(value).unwrap_or(0))
    };
    let bytes = as_function().or_else(as_library_kernel).unwrap_or(UNKNOWN);
    if bytes == UNKNOWN && !WARNED_UNKNOWN.swap(true, Ordering::Relaxed) {
        log!(
            WARN,
            "the driver does not say how much local memory a kernel needs; its launches are charged afterwards from the stack the driver reports"
        );
    }
    // A full table only means asking again next time (and not taking
    // every later launch of `f` for its first).
    let remembered = LOCAL_SIZES.insert(key, 0, bytes);
    (bytes, remembered)
}

/// Threads card `card` holds at once (the current context's card).
fn threads(card: usize) -> u64 {
    let known = THREADS[card].load(Ordering::Relaxed);
    if known != 0 {
        return known;
    }
    let attribute = |which: c_int| -> Option<u64> {
        let get = state::cuda()?.device_get_attribute?;
        let ordinal = crate::extra_hooks::current_ordinal()?;
        let mut value: c_int = 0;
        // SAFETY: the driver's cuDeviceGetAttribute with a valid out-pointer.
        (unsafe { get(&mut value, which, ordinal) } == CUDA_SUCCESS)
            .then(|| u64::try_from(value).ok())
            .flatten()
    };
    // Unknown: the largest card made so far (H100/H200: 132 × 2048).
    let threads = match (
        attribute(MULTIPROCESSOR_COUNT),
        attribute(THREADS_PER_MULTIPROCESSOR),
    ) {
        (Some(sms), Some(per_sm)) if sms * per_sm > 0 => sms * per_sm,
        _ => 132 * 2048,
    };
    THREADS[card].store(threads, Ordering::Relaxed);
    threads
}
