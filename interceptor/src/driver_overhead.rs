//! Driver memory no call asks for: a function's code and data, loaded onto
//! its card at the function's first launch (CUDA 12.2+ loads lazily by
//! default), and what the first launch in a context sets up. Measured on an
//! H200 (`hack/gpu-validate/h200-overhead-results.log`): the first launch
//! of a process took 138 MiB that way and a further kernel about 2 MiB,
//! none of it through a call the interceptor charges. A process filling its
//! cap after launching kernels therefore held that much more than its cap,
//! more than the node agent's enforcement margin (64 MiB), which killed it.
//!
//! So after the first launch of each function (the first time the
//! local-memory table sees it), this process's usage per NVML is compared
//! with everything it has charged on the card, and the difference is its
//! driver overhead charge there (raised or lowered to match). Growth found
//! that way cannot be refused beforehand: past the cap it is charged anyway,
//! with a warning, so the next allocations are refused and the node agent
//! sees a true account. An allocation about to be refused reconciles first
//! (`Accounting::charge`), so overhead the driver has given back since (an
//! unloaded module) does not keep refusing it. Where NVML does not list this
//! process (inside a pid namespace before its host pid is known) nothing is
//! reconciled.

use crate::cuda_hooks::tracked;
use crate::ffi::CuDevice;
use crate::log::{log, WARN};
use crate::state;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tessera_api::shared_region::MAX_DEVICES;

/// Per container card: the overhead charged.
static CHARGED: [AtomicU64; MAX_DEVICES] = [const { AtomicU64::new(0) }; MAX_DEVICES];
/// One reconciliation at a time, so two threads do not charge twice.
static RECONCILING: Mutex<()> = Mutex::new(());

/// After the first launch of a function on the current context's card.
pub fn after_first_launch() {
    if let Some(ordinal) = crate::extra_hooks::current_ordinal() {
        reconcile(ordinal);
    }
}

/// Before refusing an allocation on container card `card`: reconciles it;
/// returns whether the overhead charge went down (worth trying again).
#[cold]
pub fn before_refusing(card: usize) -> bool {
    (0..MAX_DEVICES as CuDevice)
        .find(|&ordinal| tracked(ordinal) == Some(card))
        .is_some_and(reconcile)
}

/// In a forked child: the parent's overhead is not the child's.
pub fn after_fork_in_child() {
    for charged in &CHARGED {
        charged.store(0, Ordering::Relaxed);
    }
}

/// Sets card `ordinal`'s overhead charge to what NVML shows this process
/// holding there beyond its other charges. Returns whether it went down.
fn reconcile(ordinal: CuDevice) -> bool {
    let (Ok(Some(accounting)), Some(card)) = (state::accounting(), tracked(ordinal)) else {
        return false;
    };
    let Some(held) = crate::nvml_hooks::own_usage_of(ordinal) else {
        return false;
    };
    let _one = RECONCILING.lock().unwrap_or_else(|e| e.into_inner());
    let before = CHARGED[card].load(Ordering::Acquire);
    let others = accounting.own_usage(card).saturating_sub(before);
    let overhead = held.saturating_sub(others);
    CHARGED[card].store(overhead, Ordering::Release);
    if overhead > before {
        let growth = overhead - before;
        if !accounting.charge_held(card, growth) {
            log!(
                WARN,
                "card {card}: the driver took {growth} bytes for loading kernels, past the cap; further allocations are refused"
            );
        }
        false
    } else if overhead < before {
        accounting.uncharge(card, before - overhead);
        true
    } else {
        false
    }
}
