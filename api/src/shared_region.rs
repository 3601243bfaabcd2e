//! The memory-accounting region shared by every process of one container and
//! read by the node agent (metrics, and the per-card tenant tables it
//! aggregates from every container's publish block): a versioned `#[repr(C)]` layout that
//! lives in the file named by `CUDA_DEVICE_MEMORY_SHARED_CACHE`, mapped
//! `MAP_SHARED` by each process. This module owns the layout and the atomic
//! arithmetic on it; opening, mapping and locking the file belong to the
//! interceptor (and to the node agent's reader), since this crate does no I/O.
//!
//! Layout (version 3), all integers little-endian native atomics:
//!
//! | part | what it holds |
//! |---|---|
//! | [`RegionHeader`] | magic, version, sizes, so a reader can refuse a file it does not understand |
//! | `[`[`DeviceAccount`]`; MAX_DEVICES]` | per visible card: the cap and the bytes charged by all live processes |
//! | `[`[`ProcessSlot`]`; MAX_PROCESSES]` | per process: its pid and the bytes it charged on each card |
//! | [`CoreControl`] | (v2) the SM limiter's updater: who runs it, its heartbeat |
//! | `[`[`CoreAccount`]`; MAX_DEVICES]` | (v2) per card: the SM cap's token bucket and the measured utilisation |
//! | `[`[`LaunchPublish`]`; MAX_DEVICES]` | (v3) per card: what the container tells the node agent about its launches (rate, last launch, heartbeat) |
//!
//! The SM limiter (v2) keeps one token bucket per card for the whole
//! container, not per process: every governed launch of every process spends
//! from [`CoreAccount::tokens`], and one elected process (holder of the OFD
//! lock on [`SM_UPDATER_LOCK_OFFSET`]) refills it at the rate its controller
//! chose. Files of other versions are refused (restart the container).
//!
//! The publish block (v3) is how a container takes part in the node-wide
//! tenant table of its cards (`crate::card_tenants`) without writing
//! anything another container reads: its SM updater writes its own figures
//! here, the node agent reads every container's region defensively (only
//! [`AGENT_READ_RANGES`], at most [`REGION_SIZE`] bytes) and writes the
//! tables, which containers see read-only. Nothing in this file is trusted
//! beyond the container's own entry: priority comes from the allocation.
//!
//! Admission is [`DeviceAccount::try_reserve`], a compare-and-swap on the
//! card's counter, made before the driver is asked, so two processes can never
//! both pass a check that only one of them fits. Each process also adds what
//! it charged to its own slot, so when it dies its share can be given back.
//!
//! Liveness uses kernel-released locks, not pid polling: a process owns slot
//! `i` exactly while it holds an open-file-description (`F_OFD_SETLK`) write
//! lock on byte [`slot_lock_offset`]`(i)` of the file. The kernel drops that
//! lock when the process dies, even by `kill -9`; whoever next takes the lock
//! and finds usage in the slot hands it back with [`ProcessSlot::reclaim`].
//! Lock offsets lie far past the end of the file (locks may cover bytes that
//! do not exist), so they never collide with data.

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use thiserror::Error;

/// `"TESSERA\x01"` read as a little-endian `u64`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"TESSERA\x01");
/// Layout version; bumped on any change to the structures below.
pub const VERSION: u32 = 3;
/// Visible cards one container can account for.
pub const MAX_DEVICES: usize = 16;
/// Processes of one container that can hold a slot at the same time.
pub const MAX_PROCESSES: usize = 1024;
/// File offset of the first slot lock byte (1 TiB, far past the data).
pub const SLOT_LOCK_BASE: u64 = 1 << 40;
/// File offset of the byte locked while the region is being initialised.
pub const INIT_LOCK_OFFSET: u64 = SLOT_LOCK_BASE - 1;
/// File offset of the byte the SM limiter's updater holds locked while it
/// runs (one updater per container; the kernel drops the lock if it dies).
pub const SM_UPDATER_LOCK_OFFSET: u64 = SLOT_LOCK_BASE - 2;

/// File offset of the lock byte that marks slot `slot` as owned.
pub const fn slot_lock_offset(slot: usize) -> u64 {
    SLOT_LOCK_BASE + slot as u64
}

/// [`ProcessSlot::state`]: nobody has used the slot since it was last cleared.
pub const SLOT_FREE: u32 = 0;
/// [`ProcessSlot::state`]: a process claimed it (it may since have died).
pub const SLOT_ACTIVE: u32 = 1;

/// Identifies the file and its layout.
#[repr(C)]
#[derive(Debug)]
pub struct RegionHeader {
    /// [`MAGIC`] once the region is initialised, 0 before.
    pub magic: AtomicU64,
    /// [`VERSION`].
    pub version: AtomicU32,
    /// [`MAX_DEVICES`].
    pub device_count: AtomicU32,
    /// [`MAX_PROCESSES`].
    pub max_processes: AtomicU32,
    /// Reserved, zero.
    pub flags: AtomicU32,
    /// `size_of::<SharedRegion>()`.
    pub region_size: AtomicU64,
    /// Reserved for later versions, zero.
    pub reserved: [AtomicU64; 4],
}

/// One visible card's account. Cache-line aligned so cards don't share lines.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct DeviceAccount {
    /// The container's cap on this card in bytes as the last attaching
    /// process read it from its environment; 0 = no cap. For readers: the
    /// interceptor admits against its own parsed cap.
    pub limit_bytes: AtomicU64,
    /// Bytes charged by all live processes (allocations and contexts).
    pub used_bytes: AtomicU64,
    /// Highest `used_bytes` seen.
    pub peak_bytes: AtomicU64,
    /// Reserved, zero.
    pub reserved: [AtomicU64; 5],
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error(
    "reserving {requested} bytes would exceed the cap of {limit} bytes ({used} already in use)"
)]
pub struct OverLimit {
    /// Bytes asked for.
    pub requested: u64,
    /// Bytes in use when the reservation was refused.
    pub used: u64,
    /// The cap.
    pub limit: u64,
}

impl DeviceAccount {
    /// Charges `bytes` if the total stays within `limit`; atomic, so
    /// concurrent reservations can never overshoot the cap together.
    pub fn try_reserve(&self, bytes: u64, limit: u64) -> Result<(), OverLimit> {
        let mut used = self.used_bytes.load(Ordering::Relaxed);
        loop {
            let next = match used.checked_add(bytes) {
                Some(next) if next <= limit => next,
                _ => {
                    return Err(OverLimit {
                        requested: bytes,
                        used,
                        limit,
                    })
                }
            };
            match self.used_bytes.compare_exchange_weak(
                used,
                next,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    if next > self.peak_bytes.load(Ordering::Relaxed) {
                        self.peak_bytes.fetch_max(next, Ordering::Relaxed);
                    }
                    return Ok(());
                }
                Err(actual) => used = actual,
            }
        }
    }

    /// Gives back `bytes`, saturating at zero (a bug elsewhere must not wrap
    /// the counter into "everything is used").
    pub fn release(&self, bytes: u64) {
        let _ = self
            .used_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(bytes))
            });
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used_bytes.load(Ordering::Acquire)
    }
}

/// One process's share of the accounts.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct ProcessSlot {
    /// [`SLOT_FREE`] or [`SLOT_ACTIVE`].
    pub state: AtomicU32,
    /// The owner's pid as it saw itself (its pid namespace); informational.
    pub pid: AtomicU32,
    /// Reserved, zero.
    pub reserved: [AtomicU32; 2],
    /// Bytes this process charged on each card.
    pub used_bytes: [AtomicU64; MAX_DEVICES],
}

impl ProcessSlot {
    /// Returns every byte the slot charged to the cards and clears it. Only
    /// for the holder of the slot's lock: either its owner at exit, or a
    /// process that took the lock because the owner died.
    pub fn reclaim(&self, devices: &[DeviceAccount; MAX_DEVICES]) -> u64 {
        let mut total = 0;
        for (device, used) in devices.iter().zip(&self.used_bytes) {
            let bytes = used.swap(0, Ordering::AcqRel);
            if bytes != 0 {
                device.release(bytes);
                total += bytes;
            }
        }
        self.pid.store(0, Ordering::Relaxed);
        self.state.store(SLOT_FREE, Ordering::Release);
        total
    }

    /// Bytes this slot charged on all cards.
    pub fn total_used(&self) -> u64 {
        self.used_bytes
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }
}

/// The SM limiter's updater, one per container (layout version 2).
#[repr(C, align(64))]
#[derive(Debug)]
pub struct CoreControl {
    /// Pid (as the updater sees itself) of the process running the updater; 0 = none yet.
    pub updater_pid: AtomicU32,
    /// Reserved, zero.
    pub flags: AtomicU32,
    /// `CLOCK_MONOTONIC` nanoseconds of the updater's last tick; a process
    /// that finds it stale tries to take the updater lock over.
    pub updater_beat_ns: AtomicU64,
    /// Reserved, zero.
    pub reserved: [AtomicU64; 6],
}

/// [`CoreAccount::mode`]: launches pass without spending (no cap, or the
/// policy says not to limit now).
pub const CORE_FREE: u32 = 0;
/// [`CoreAccount::mode`]: launches spend tokens and wait while there are none.
pub const CORE_LIMITED: u32 = 1;

/// One card's SM account for the whole container (layout version 2).
#[repr(C, align(64))]
#[derive(Debug)]
pub struct CoreAccount {
    /// Launch budget in cost units (blocks × threads); may go below zero
    /// (a launch larger than what is left is let through and paid back).
    pub tokens: AtomicI64,
    /// Cost units launched in total by every process (monotonic).
    pub spent: AtomicU64,
    /// Governed launches in total (monotonic).
    pub launches: AtomicU64,
    /// Refill rate the controller chose, cost units per second (for readers).
    pub refill_per_sec: AtomicU64,
    /// [`CORE_FREE`] or [`CORE_LIMITED`].
    pub mode: AtomicU32,
    /// Non-zero while a high-priority tenant of the card is active and this
    /// (low-priority) container must hold its launches.
    pub yield_to_priority: AtomicU32,
    /// The cap in percent as the updater applies it; 0 = none.
    pub limit_percent: AtomicU32,
    /// The container's measured share of the card's compute, per mille
    /// (from NVML), refreshed by the updater; read by the node agent.
    pub utilization_permille: AtomicU32,
    /// `CLOCK_MONOTONIC` nanoseconds when the utilisation was measured.
    pub measured_at_ns: AtomicU64,
    /// Reserved, zero.
    pub reserved: AtomicU64,
}

impl CoreAccount {
    /// One launch of `cost` units: `true` if it may go now (and it is
    /// charged), `false` if the bucket is empty and the caller must wait.
    /// In [`CORE_FREE`] mode only the counters move.
    #[inline]
    pub fn try_spend(&self, cost: u64) -> bool {
        if self.mode.load(Ordering::Relaxed) == CORE_LIMITED
            && self.tokens.load(Ordering::Relaxed) <= 0
        {
            return false;
        }
        let signed = i64::try_from(cost).unwrap_or(i64::MAX);
        self.tokens.fetch_sub(signed, Ordering::Relaxed);
        self.spent.fetch_add(cost, Ordering::Relaxed);
        self.launches.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Adds `amount` units, never past `burst` (a bucket left idle must not
    /// save up an unbounded burst), paying off debt first.
    pub fn refill(&self, amount: u64, burst: u64) {
        let amount = i64::try_from(amount).unwrap_or(i64::MAX);
        let burst = i64::try_from(burst).unwrap_or(i64::MAX);
        let _ = self
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_add(amount).min(burst))
            });
    }
}

/// What the container publishes about its launches on one card (layout
/// version 3), written by its SM updater every control period and read by
/// the node agent, which copies it into the card's tenant table. Times are
/// `CLOCK_MONOTONIC` nanoseconds (the same clock on the host).
#[repr(C, align(64))]
#[derive(Debug)]
pub struct LaunchPublish {
    /// Cost units (blocks × threads) the container launched per second on
    /// the card, smoothed over a fraction of a second; at least 1 once
    /// published.
    pub launch_rate: AtomicU64,
    /// When the container last launched on the card; 0 = never.
    pub last_launch_ns: AtomicU64,
    /// When the updater last published (liveness); 0 = never.
    pub beat_ns: AtomicU64,
    /// Reserved, zero.
    pub reserved: [AtomicU64; 5],
}

/// One card's published figures, as plain values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LaunchFigures {
    /// [`LaunchPublish::launch_rate`].
    pub launch_rate: u64,
    /// [`LaunchPublish::last_launch_ns`].
    pub last_launch_ns: u64,
    /// [`LaunchPublish::beat_ns`].
    pub beat_ns: u64,
}

impl LaunchPublish {
    /// Publishes one control period's figures (the beat last).
    pub fn publish(&self, figures: LaunchFigures) {
        self.launch_rate
            .store(figures.launch_rate, Ordering::Relaxed);
        self.last_launch_ns
            .store(figures.last_launch_ns, Ordering::Relaxed);
        self.beat_ns.store(figures.beat_ns, Ordering::Release);
    }

    /// The figures as they are now.
    pub fn figures(&self) -> LaunchFigures {
        LaunchFigures {
            beat_ns: self.beat_ns.load(Ordering::Acquire),
            launch_rate: self.launch_rate.load(Ordering::Relaxed),
            last_launch_ns: self.last_launch_ns.load(Ordering::Relaxed),
        }
    }
}

/// The whole region as it lies in the file.
#[repr(C)]
#[derive(Debug)]
pub struct SharedRegion {
    /// Identification.
    pub header: RegionHeader,
    /// Per-card accounts, indexed by the card's index in the container.
    pub devices: [DeviceAccount; MAX_DEVICES],
    /// Per-process slots.
    pub processes: [ProcessSlot; MAX_PROCESSES],
    /// The SM limiter's updater (v2).
    pub core_control: CoreControl,
    /// Per-card SM accounts, indexed like `devices` (v2).
    pub cores: [CoreAccount; MAX_DEVICES],
    /// Per-card launch figures for the node agent, indexed like `devices` (v3).
    pub publish: [LaunchPublish; MAX_DEVICES],
}

/// Size of the file in bytes.
pub const REGION_SIZE: usize = std::mem::size_of::<SharedRegion>();

/// The header and the per-card memory accounts: what the node agent's
/// metrics need.
pub const ACCOUNTS_RANGE: std::ops::Range<usize> = 0..std::mem::offset_of!(SharedRegion, processes);
/// The SM updater's control block, the per-card SM accounts and the publish
/// block: what the node agent's tenant-table aggregation needs.
pub const CONTROL_RANGE: std::ops::Range<usize> =
    std::mem::offset_of!(SharedRegion, core_control)..REGION_SIZE;
/// Every byte range of the file the node agent reads (the process slots,
/// 96% of the file, are never read by it).
pub const AGENT_READ_RANGES: [std::ops::Range<usize>; 2] = [ACCOUNTS_RANGE, CONTROL_RANGE];

/// Why a mapped file is not a region this version can use.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RegionError {
    /// Shorter than [`REGION_SIZE`].
    #[error("the shared region is {len} bytes, a version-{VERSION} region needs {REGION_SIZE}; remove the file so it is recreated")]
    TooSmall {
        /// Length found.
        len: usize,
    },
    /// Not aligned for the atomics.
    #[error("the shared region mapping is not 64-byte aligned")]
    Misaligned,
    /// Something else wrote this file.
    #[error("the shared region has magic {found:#018x}, not Tessera's {MAGIC:#018x}; the path belongs to something else or to another vGPU library")]
    BadMagic {
        /// Magic found.
        found: u64,
    },
    /// Written by another layout version.
    #[error("the shared region has layout version {found}, this build understands {VERSION}; restart the container with matching node agent and interceptor")]
    BadVersion {
        /// Version found.
        found: u32,
    },
    /// Version matches but sizes don't (corruption).
    #[error("the shared region header says {found_devices} cards / {found_processes} slots / {found_size} bytes, expected {MAX_DEVICES} / {MAX_PROCESSES} / {REGION_SIZE}")]
    BadGeometry {
        /// Device count in the header.
        found_devices: u32,
        /// Slot count in the header.
        found_processes: u32,
        /// Size in the header.
        found_size: u64,
    },
}

impl SharedRegion {
    /// Views a mapped region.
    ///
    /// # Safety
    /// `ptr` must point to `len` bytes mapped for reading and writing for
    /// `'a`, which nothing accesses except through atomics.
    pub unsafe fn from_raw<'a>(
        ptr: *const u8,
        len: usize,
    ) -> Result<&'a SharedRegion, RegionError> {
        if len < REGION_SIZE {
            return Err(RegionError::TooSmall { len });
        }
        if (ptr as usize) & (std::mem::align_of::<SharedRegion>() - 1) != 0 {
            return Err(RegionError::Misaligned);
        }
        // SAFETY: size and alignment checked above; the caller promises the
        // memory is live and only accessed atomically. Every field is an
        // atomic integer, for which any bit pattern is valid.
        Ok(unsafe { &*(ptr as *const SharedRegion) })
    }

    /// Writes the header of a zero-filled region; the magic goes last, so a
    /// reader that sees it sees the rest. Call under the init lock.
    pub fn initialise(&self) {
        let h = &self.header;
        h.version.store(VERSION, Ordering::Relaxed);
        h.device_count.store(MAX_DEVICES as u32, Ordering::Relaxed);
        h.max_processes
            .store(MAX_PROCESSES as u32, Ordering::Relaxed);
        h.region_size.store(REGION_SIZE as u64, Ordering::Relaxed);
        h.magic.store(MAGIC, Ordering::Release);
    }

    /// Whether [`initialise`](Self::initialise) has run (magic is non-zero).
    pub fn is_initialised(&self) -> bool {
        self.header.magic.load(Ordering::Acquire) != 0
    }

    /// Checks that an initialised region has this build's layout.
    pub fn validate(&self) -> Result<(), RegionError> {
        let h = &self.header;
        let found = h.magic.load(Ordering::Acquire);
        if found != MAGIC {
            return Err(RegionError::BadMagic { found });
        }
        let version = h.version.load(Ordering::Relaxed);
        if version != VERSION {
            return Err(RegionError::BadVersion { found: version });
        }
        let (d, p, s) = (
            h.device_count.load(Ordering::Relaxed),
            h.max_processes.load(Ordering::Relaxed),
            h.region_size.load(Ordering::Relaxed),
        );
        if d as usize != MAX_DEVICES || p as usize != MAX_PROCESSES || s != REGION_SIZE as u64 {
            return Err(RegionError::BadGeometry {
                found_devices: d,
                found_processes: p,
                found_size: s,
            });
        }
        Ok(())
    }

    /// Bytes charged on card `device` by all live processes (0 past the end).
    pub fn device_used(&self, device: usize) -> u64 {
        self.devices.get(device).map_or(0, DeviceAccount::used)
    }

    /// Charges `bytes` to card `device` for the process in `slot`, within
    /// `limit`. The card's counter is raised first (that is the admission),
    /// then the slot's share.
    pub fn charge(
        &self,
        slot: usize,
        device: usize,
        bytes: u64,
        limit: u64,
    ) -> Result<(), OverLimit> {
        self.devices[device].try_reserve(bytes, limit)?;
        self.processes[slot].used_bytes[device].fetch_add(bytes, Ordering::AcqRel);
        Ok(())
    }

    /// Gives back what [`charge`](Self::charge) took. The card gets back at
    /// most what the slot still holds: once a slot was reclaimed (its owner's
    /// exit handler, or another process after its death) a late free must not
    /// take the same bytes off the card a second time, which would hand other
    /// processes' charges out as free room.
    pub fn uncharge(&self, slot: usize, device: usize, bytes: u64) {
        let held = self.processes[slot].used_bytes[device]
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(bytes))
            })
            .unwrap_or_else(|used| used);
        self.devices[device].release(bytes.min(held));
    }

    /// `(slot index, pid, bytes per card)` for every slot in use, for metrics.
    /// A slot of a process that died shows until someone reclaims it.
    pub fn active_processes(&self) -> Vec<(usize, u32, [u64; MAX_DEVICES])> {
        self.processes
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.state.load(Ordering::Acquire) == SLOT_ACTIVE)
            .map(|(i, slot)| {
                let mut used = [0; MAX_DEVICES];
                for (out, b) in used.iter_mut().zip(&slot.used_bytes) {
                    *out = b.load(Ordering::Relaxed);
                }
                (i, slot.pid.load(Ordering::Relaxed), used)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    /// A zeroed, 64-byte-aligned region on the heap.
    fn zeroed_region() -> Box<SharedRegion> {
        let layout = std::alloc::Layout::new::<SharedRegion>();
        // SAFETY: every field is an atomic integer, for which zero is valid;
        // the layout is non-zero-sized.
        unsafe {
            let ptr = std::alloc::alloc_zeroed(layout) as *mut SharedRegion;
            assert!(!ptr.is_null());
            Box::from_raw(ptr)
        }
    }

    #[test]
    fn layout_is_stable() {
        assert_eq!(std::mem::size_of::<RegionHeader>(), 64);
        assert_eq!(std::mem::size_of::<DeviceAccount>(), 64);
        assert_eq!(std::mem::size_of::<ProcessSlot>(), 192);
        assert_eq!(std::mem::size_of::<CoreControl>(), 64);
        assert_eq!(std::mem::size_of::<CoreAccount>(), 64);
        assert_eq!(std::mem::size_of::<LaunchPublish>(), 64);
        assert_eq!(
            REGION_SIZE,
            64 + 16 * 64 + 1024 * 192 + 64 + 16 * 64 + 16 * 64
        );
        assert_eq!(std::mem::offset_of!(SharedRegion, devices), 64);
        // Versions 2 and 3 append; the earlier parts keep their offsets.
        assert_eq!(
            std::mem::offset_of!(SharedRegion, core_control),
            64 + 16 * 64 + 1024 * 192
        );
        assert_eq!(
            std::mem::offset_of!(SharedRegion, publish),
            64 + 16 * 64 + 1024 * 192 + 64 + 16 * 64
        );
        // What the agent reads: the head and the tail, never the slots.
        assert_eq!(ACCOUNTS_RANGE, 0..64 + 16 * 64);
        assert_eq!(CONTROL_RANGE.end, REGION_SIZE);
        assert_eq!(CONTROL_RANGE.len(), 64 + 16 * 64 + 16 * 64);
    }

    #[test]
    fn token_bucket_spends_waits_and_refills_within_the_burst() {
        let region = zeroed_region();
        let core = &region.cores[0];
        // Free mode: always passes, counts.
        assert!(core.try_spend(500));
        assert_eq!(core.spent.load(Ordering::Relaxed), 500);
        core.tokens.store(0, Ordering::Relaxed);
        core.mode.store(CORE_LIMITED, Ordering::Relaxed);
        assert!(!core.try_spend(1), "empty bucket waits");
        core.refill(100, 1000);
        assert!(core.try_spend(250), "a launch larger than the rest passes");
        assert_eq!(core.tokens.load(Ordering::Relaxed), -150);
        assert!(!core.try_spend(1), "and is paid back before the next");
        core.refill(10_000, 1000);
        assert_eq!(core.tokens.load(Ordering::Relaxed), 1000, "capped at burst");
        core.tokens.store(5000, Ordering::Relaxed);
        core.refill(10, 1000);
        assert_eq!(
            core.tokens.load(Ordering::Relaxed),
            1000,
            "a lowered burst trims savings"
        );
        assert_eq!(core.launches.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn validate_after_initialise() {
        let region = zeroed_region();
        assert!(!region.is_initialised());
        assert_eq!(region.validate(), Err(RegionError::BadMagic { found: 0 }));
        region.initialise();
        assert_eq!(region.validate(), Ok(()));
        region.header.version.store(7, Ordering::Relaxed);
        assert_eq!(region.validate(), Err(RegionError::BadVersion { found: 7 }));
        // A version-2 file (before the publish block) is refused by name.
        region.header.version.store(2, Ordering::Relaxed);
        let refused = region.validate().unwrap_err();
        assert_eq!(refused, RegionError::BadVersion { found: 2 });
        assert!(
            refused.to_string().contains("layout version 2")
                && refused.to_string().contains("understands 3"),
            "{refused}"
        );
    }

    #[test]
    fn reservation_stops_exactly_at_the_cap() {
        let region = zeroed_region();
        region.initialise();
        assert!(region.charge(0, 0, 600, 1000).is_ok());
        assert!(region.charge(0, 0, 400, 1000).is_ok());
        assert_eq!(
            region.charge(1, 0, 1, 1000),
            Err(OverLimit {
                requested: 1,
                used: 1000,
                limit: 1000
            })
        );
        region.uncharge(0, 0, 400);
        assert_eq!(region.device_used(0), 600);
        assert_eq!(region.devices[0].peak_bytes.load(Ordering::Relaxed), 1000);
    }

    #[test]
    fn reclaim_gives_back_a_dead_slot() {
        let region = zeroed_region();
        region.initialise();
        region.processes[3]
            .state
            .store(SLOT_ACTIVE, Ordering::Relaxed);
        region.charge(3, 0, 100, u64::MAX).unwrap();
        region.charge(3, 2, 50, u64::MAX).unwrap();
        region.charge(4, 0, 7, u64::MAX).unwrap();
        assert_eq!(region.active_processes().len(), 1);
        assert_eq!(region.processes[3].reclaim(&region.devices), 150);
        assert_eq!(region.device_used(0), 7);
        assert_eq!(region.device_used(2), 0);
        assert!(region.active_processes().is_empty());
    }

    #[test]
    fn a_free_after_the_slot_was_reclaimed_gives_nothing_back_twice() {
        let region = zeroed_region();
        region.initialise();
        region.charge(0, 0, 300, u64::MAX).unwrap();
        region.charge(1, 0, 600, u64::MAX).unwrap();
        // The owner of slot 0 exits: its exit handler hands its usage back...
        assert_eq!(region.processes[0].reclaim(&region.devices), 300);
        // ...and a free that runs after it (a later exit handler) must not
        // take slot 1's bytes off the card.
        region.uncharge(0, 0, 300);
        assert_eq!(region.device_used(0), 600);
        region.charge(0, 0, 100, u64::MAX).unwrap();
        region.uncharge(0, 0, 250);
        assert_eq!(region.device_used(0), 600, "only what the slot held");
    }

    #[test]
    fn concurrent_reservations_never_overshoot() {
        let region: Arc<SharedRegion> = Arc::from(zeroed_region());
        region.initialise();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let region = Arc::clone(&region);
                std::thread::spawn(move || {
                    let mut got = 0u64;
                    for _ in 0..10_000 {
                        if region.charge(t, 1, 3, 10_000).is_ok() {
                            got += 3;
                        }
                    }
                    got
                })
            })
            .collect();
        let granted: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(granted, region.device_used(1));
        assert!(granted <= 10_000 && granted > 10_000 - 3);
    }

    proptest! {
        #[test]
        fn charges_and_uncharges_balance(ops in proptest::collection::vec((0usize..4, 1u64..5000, any::<bool>()), 1..200)) {
            let region = zeroed_region();
            region.initialise();
            let limit = 20_000;
            let mut held: Vec<(usize, u64)> = Vec::new();
            for (slot, bytes, free_one) in ops {
                if free_one && !held.is_empty() {
                    let (s, b) = held.remove(0);
                    region.uncharge(s, 0, b);
                } else if region.charge(slot, 0, bytes, limit).is_ok() {
                    held.push((slot, bytes));
                }
                let expect: u64 = held.iter().map(|(_, b)| b).sum();
                prop_assert_eq!(region.device_used(0), expect);
                prop_assert!(expect <= limit);
                let per_slot: u64 = region.processes.iter().map(ProcessSlot::total_used).sum();
                prop_assert_eq!(per_slot, expect);
            }
        }
    }
}
