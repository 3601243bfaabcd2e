//! The launch path's side of the SM limiter: the gate every launch hook
//! passes, and for governed containers the wait on the container's token
//! bucket and on higher-priority tenants.
//!
//! - **Gate.** [`admit`] first reads one static with a relaxed atomic load;
//!   with no SM cap and no priority configured that is all a launch costs.
//!   The gate is set when the compute configuration is read (at `cuInit`,
//!   or the first launch if that comes first), never at load time.
//! - **Bucket.** A governed launch spends `blocks × threads` from the card's
//!   [`CoreAccount`] in the shared region (one bucket for all processes of
//!   the container) and sleeps in short steps (≤ 2 ms) while the bucket is
//!   empty or while a high-priority tenant of the card is active.
//! - **Updater election.** The bucket is refilled by one thread per
//!   container ([`crate::sm_updater`]), in the process holding the OFD lock
//!   on the region's updater byte. Each process tries for it on its first
//!   governed launch and again whenever the updater's heartbeat is more
//!   than [`UPDATER_STALE_NS`] old (its process died: the kernel dropped
//!   the lock), so waiting launches can never wait on a dead updater.

use crate::ffi::{CuDevice, CuResult, CUDA_ERROR_NOT_INITIALIZED, CUDA_SUCCESS};
use crate::log::{log, ERROR, INFO};
use crate::region::{lock_byte, open_region_file, Region};
use crate::sm_config::{ComputeConfig, ComputeConfigError};
use crate::state;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::Duration;
use tessera_api::shared_region::{CoreAccount, SharedRegion, SM_UPDATER_LOCK_OFFSET};

const GATE_UNKNOWN: u8 = 0;
const GATE_OFF: u8 = 1;
const GATE_ON: u8 = 2;

/// See the module documentation.
static GATE: AtomicU8 = AtomicU8::new(GATE_UNKNOWN);
static COMPUTE: OnceLock<Result<ComputeConfig, ComputeConfigError>> = OnceLock::new();
static LIMITER: OnceLock<Option<Limiter>> = OnceLock::new();

/// An updater heartbeat older than this means the updater is gone.
pub const UPDATER_STALE_NS: u64 = 1_000_000_000;
/// How often a process that lost the election looks at the heartbeat again.
const ELECTION_RETRY_NS: u64 = 250_000_000;
/// Longest single sleep of a waiting launch.
const MAX_WAIT_STEP: Duration = Duration::from_millis(2);

/// `CLOCK_MONOTONIC` in nanoseconds (the same clock in every container).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Reads the compute configuration once and sets the gate. `Err` (reported
/// once) when a value is unparsable: CUDA is then refused.
pub fn configure() -> Result<&'static ComputeConfig, CuResult> {
    COMPUTE
        .get_or_init(|| {
            let config = ComputeConfig::from_env();
            match &config {
                Ok(c) => GATE.store(
                    if c.governs_launches() {
                        GATE_ON
                    } else {
                        GATE_OFF
                    },
                    Ordering::Relaxed,
                ),
                Err(e) => log!(
                    ERROR,
                    "invalid GPU compute setting, CUDA initialisation refused: {e}"
                ),
            }
            config
        })
        .as_ref()
        .map_err(|_| CUDA_ERROR_NOT_INITIALIZED)
}

/// Called by every launch hook before it forwards. `cost` is only evaluated
/// for governed containers. `Err` is returned to the application instead of
/// launching.
#[inline(always)]
pub fn admit(cost: impl FnOnce() -> u64) -> Result<(), CuResult> {
    if GATE.load(Ordering::Relaxed) == GATE_OFF {
        return Ok(());
    }
    admit_governed(cost())
}

#[inline(never)]
fn admit_governed(cost: u64) -> Result<(), CuResult> {
    let config = configure()?;
    if !config.governs_launches() {
        return Ok(());
    }
    let Some(limiter) = LIMITER.get_or_init(|| Limiter::attach(config)).as_ref() else {
        return Ok(());
    };
    let Some(card) = current_card() else {
        return Ok(());
    };
    limiter.wait_and_spend(card, cost);
    Ok(())
}

/// The container card of the calling thread's current context.
pub(crate) fn current_card() -> Option<usize> {
    let get_device = state::cuda()?.ctx_get_device?;
    let mut device: CuDevice = -1;
    // SAFETY: the driver's cuCtxGetDevice with a valid out-pointer.
    if unsafe { get_device(&mut device) } != CUDA_SUCCESS {
        return None;
    }
    crate::cards::container_index(device)
}

/// This process's view of the container's SM accounts.
#[derive(Debug)]
pub struct Limiter {
    region: Region,
    config: &'static ComputeConfig,
    /// Descriptor (own open file description) used for the updater lock; -1 = none.
    election_fd: AtomicI32,
    /// This process runs the updater thread.
    updating: AtomicBool,
    /// When this process last tried to become the updater.
    last_try_ns: AtomicU64,
}

impl Limiter {
    fn attach(config: &'static ComputeConfig) -> Option<Limiter> {
        let memory = state::config().ok()?;
        let region = match Region::attach(memory.shared_region.as_deref()) {
            Ok(region) => region,
            Err(e) => {
                log!(
                    ERROR,
                    "cannot use the shared region for SM limits, launches are not limited: {e}"
                );
                return None;
            }
        };
        // A slot publishes our pid, which is how the updater tells the
        // container's processes from others in NVML's figures.
        let _ = region.slot();
        register_fork_handler();
        Some(Limiter {
            region,
            config,
            election_fd: AtomicI32::new(-1),
            updating: AtomicBool::new(false),
            last_try_ns: AtomicU64::new(0),
        })
    }

    fn map(&self) -> &'static SharedRegion {
        self.region.map()
    }

    fn wait_and_spend(&'static self, card: usize, cost: u64) {
        let core: &CoreAccount = &self.map().cores[card];
        let mut step = Duration::from_micros(50);
        loop {
            self.keep_updater_alive();
            if core.yield_to_priority.load(Ordering::Relaxed) == 0 && core.try_spend(cost) {
                return;
            }
            std::thread::sleep(step);
            step = (step * 2).min(MAX_WAIT_STEP);
        }
    }

    /// Starts the updater here if nobody runs it (first launch, or its
    /// process died).
    #[inline]
    fn keep_updater_alive(&'static self) {
        if self.updating.load(Ordering::Relaxed) {
            return;
        }
        let now = monotonic_ns();
        let beat = self
            .map()
            .core_control
            .updater_beat_ns
            .load(Ordering::Relaxed);
        let last = self.last_try_ns.load(Ordering::Relaxed);
        let fresh_beat = beat != 0 && now.saturating_sub(beat) < UPDATER_STALE_NS;
        if (fresh_beat || now.saturating_sub(last) < ELECTION_RETRY_NS) && last != 0 {
            return;
        }
        if self
            .last_try_ns
            .compare_exchange(last, now.max(1), Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return; // another thread of ours is trying
        }
        if self.try_take_updater_lock() && !self.updating.swap(true, Ordering::AcqRel) {
            let map = self.map();
            map.core_control
                .updater_pid
                .store(std::process::id(), Ordering::Relaxed);
            map.core_control
                .updater_beat_ns
                .store(now, Ordering::Relaxed);
            log!(INFO, "running the container's SM updater");
            crate::sm_updater::spawn(map, self.config, &self.updating);
        }
    }

    fn try_take_updater_lock(&self) -> bool {
        let Some(path) = self.region.path() else {
            return true; // a private region: this process is the container
        };
        let mut fd = self.election_fd.load(Ordering::Acquire);
        if fd < 0 {
            let Ok(new) = open_region_file(path) else {
                return false;
            };
            fd = new;
            self.election_fd.store(fd, Ordering::Release);
        }
        lock_byte(fd, SM_UPDATER_LOCK_OFFSET, libc::F_WRLCK, false)
    }

    fn after_fork_in_child(&self) {
        // The parent's updater thread and lock stay the parent's.
        self.updating.store(false, Ordering::Relaxed);
        self.last_try_ns.store(0, Ordering::Relaxed);
        let fd = self.election_fd.swap(-1, Ordering::AcqRel);
        if fd >= 0 {
            // SAFETY: our inherited copy; the parent keeps its own, so
            // closing it does not release the parent's lock.
            unsafe { libc::close(fd) };
        }
        self.region.after_fork_in_child();
        let _ = self.region.slot();
    }
}

fn register_fork_handler() {
    extern "C" fn in_child() {
        if let Some(Some(limiter)) = LIMITER.get() {
            limiter.after_fork_in_child();
        }
    }
    // SAFETY: a handler touching only our own state; the library is never
    // unloaded.
    unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
}

/// Cost of a kernel launch: blocks × threads per block, saturating.
#[inline]
pub fn launch_cost(grid: [u32; 3], block: [u32; 3]) -> u64 {
    let blocks = u64::from(grid[0])
        .saturating_mul(u64::from(grid[1]))
        .saturating_mul(u64::from(grid[2]));
    let threads = u64::from(block[0])
        .saturating_mul(u64::from(block[1]))
        .saturating_mul(u64::from(block[2]));
    let cost = blocks.saturating_mul(threads).max(1);
    LARGEST_KERNEL.fetch_max(cost, Ordering::Relaxed);
    cost
}

static LARGEST_KERNEL: AtomicU64 = AtomicU64::new(0);

/// Cost of a graph launch. An executable graph's kernels cannot be listed
/// through the driver API, so a graph is charged as the largest single
/// kernel this process has launched (at least 1); the controller closes the
/// loop on measured utilisation either way.
#[inline]
pub fn graph_cost() -> u64 {
    LARGEST_KERNEL.load(Ordering::Relaxed).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_is_blocks_times_threads_and_saturates() {
        assert_eq!(launch_cost([132, 1, 1], [256, 1, 1]), 132 * 256);
        assert_eq!(launch_cost([4, 2, 3], [8, 4, 2]), 24 * 64);
        assert_eq!(launch_cost([0, 1, 1], [1, 1, 1]), 1);
        assert_eq!(
            launch_cost([u32::MAX, u32::MAX, u32::MAX], [1024, 1, 1]),
            u64::MAX
        );
        assert_eq!(graph_cost(), u64::MAX);
    }
}
