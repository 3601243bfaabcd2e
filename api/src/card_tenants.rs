//! The node-wide tenant table of one physical card: a small file per card
//! (named by the card's UUID) in a host directory the node agent mounts into
//! every GPU container (`TESSERA_CARD_TENANTS_DIR`). Each container that
//! governs its launches on the card holds one entry, written by its SM
//! updater: its priority, when it last launched and how fast it launches
//! (cost units per second, see [`TenantEntry::launch_rate`]). Other
//! containers read the table to learn whether another tenant is active on
//! the card (the default core policy limits only then), whether a
//! high-priority tenant is launching (low-priority tenants then yield), and
//! the card's total launch rate (from which the SM limiter estimates the
//! card's capacity).
//!
//! Compatibility: `launch_rate` took the first word of what layout version
//! 1 reserved (zero), so the header still says version 1 and builds from
//! before it keep reading the table; their entries leave the rate at 0,
//! which readers take as "not published" ([`Neighbours::unpublished`]).
//!
//! Entries are owned like the accounting region's process slots: the owner
//! holds an OFD write lock on byte [`entry_lock_offset`]`(i)`, which the
//! kernel drops when it dies; a dead owner's entry simply goes stale, and
//! whoever next takes the lock reuses it. Times are `CLOCK_MONOTONIC`
//! nanoseconds, the same clock in every container of the node. This module
//! owns the layout and the arithmetic; the I/O is the interceptor's.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// `"TSRCARD\x01"` read as a little-endian `u64`.
pub const TABLE_MAGIC: u64 = u64::from_le_bytes(*b"TSRCARD\x01");
/// Layout version of the table.
pub const TABLE_VERSION: u32 = 1;
/// Containers that can govern launches on one card at the same time.
pub const MAX_TENANTS: usize = 64;
/// File offset of the first entry lock byte (far past the data).
pub const ENTRY_LOCK_BASE: u64 = 1 << 40;
/// File offset of the byte locked while the table is being initialised.
pub const TABLE_INIT_LOCK_OFFSET: u64 = ENTRY_LOCK_BASE - 1;

/// File offset of the lock byte that marks entry `entry` as owned.
pub const fn entry_lock_offset(entry: usize) -> u64 {
    ENTRY_LOCK_BASE + entry as u64
}

/// [`TenantEntry::priority`] of a high-priority tenant (`nvidia.com/priority: 0`).
pub const PRIORITY_HIGH: u32 = 0;
/// [`TenantEntry::priority`] of a low-priority or unprioritised tenant.
pub const PRIORITY_LOW: u32 = 1;

/// One container's presence on the card.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct TenantEntry {
    /// Non-zero while an owner has written it (it may since have died).
    pub in_use: AtomicU32,
    /// [`PRIORITY_HIGH`] or [`PRIORITY_LOW`].
    pub priority: AtomicU32,
    /// When the owner last saw its container launch on the card.
    pub last_launch_ns: AtomicU64,
    /// When the owner's updater last ran (liveness).
    pub beat_ns: AtomicU64,
    /// Cost units (blocks × threads) the owner's container launched per
    /// second on the card, smoothed over a fraction of a second; 0 = not
    /// published (an older build). Writers store at least 1.
    pub launch_rate: AtomicU64,
    /// Reserved, zero.
    pub reserved: [AtomicU64; 4],
}

/// The whole file.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct TenantTable {
    /// [`TABLE_MAGIC`] once initialised.
    pub magic: AtomicU64,
    /// [`TABLE_VERSION`].
    pub version: AtomicU32,
    /// [`MAX_TENANTS`].
    pub capacity: AtomicU32,
    /// Reserved, zero.
    pub reserved: [AtomicU64; 6],
    /// The entries.
    pub entries: [TenantEntry; MAX_TENANTS],
}

/// Size of the file in bytes.
pub const TABLE_SIZE: usize = std::mem::size_of::<TenantTable>();

/// What the other tenants of a card are doing, as one tenant sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Neighbours {
    /// Another tenant launched within the window.
    pub other_active: bool,
    /// Another high-priority tenant launched within the window.
    pub high_priority_active: bool,
    /// Sum of the active others' published launch rates (cost units/s).
    pub others_launch_rate: u64,
    /// Some active other publishes no launch rate (an older build), so
    /// [`Neighbours::others_launch_rate`] undercounts the card's load.
    pub unpublished: bool,
}

impl TenantTable {
    /// Writes the header of a zero-filled table (magic last). Call under the init lock.
    pub fn initialise(&self) {
        self.version.store(TABLE_VERSION, Ordering::Relaxed);
        self.capacity.store(MAX_TENANTS as u32, Ordering::Relaxed);
        self.magic.store(TABLE_MAGIC, Ordering::Release);
    }

    /// Whether the header is this build's.
    pub fn is_valid(&self) -> bool {
        self.magic.load(Ordering::Acquire) == TABLE_MAGIC
            && self.version.load(Ordering::Relaxed) == TABLE_VERSION
            && self.capacity.load(Ordering::Relaxed) as usize == MAX_TENANTS
    }

    /// The others' activity as entry `own` sees it at `now_ns`: a tenant
    /// counts as active while it launched within `window_ns` and its
    /// updater is alive (beat within `window_ns`); the launch rates of the
    /// active ones are summed.
    pub fn neighbours(&self, own: usize, now_ns: u64, window_ns: u64) -> Neighbours {
        let mut seen = Neighbours::default();
        for (i, entry) in self.entries.iter().enumerate() {
            if i == own || entry.in_use.load(Ordering::Acquire) == 0 {
                continue;
            }
            let fresh = |t: u64| t != 0 && now_ns.saturating_sub(t) <= window_ns;
            if fresh(entry.beat_ns.load(Ordering::Relaxed))
                && fresh(entry.last_launch_ns.load(Ordering::Relaxed))
            {
                seen.other_active = true;
                match entry.launch_rate.load(Ordering::Relaxed) {
                    0 => seen.unpublished = true,
                    rate => seen.others_launch_rate = seen.others_launch_rate.saturating_add(rate),
                }
                if entry.priority.load(Ordering::Relaxed) == PRIORITY_HIGH {
                    seen.high_priority_active = true;
                }
            }
        }
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zeroed() -> Box<TenantTable> {
        let layout = std::alloc::Layout::new::<TenantTable>();
        // SAFETY: all fields are atomics (zero is valid); non-zero size.
        unsafe {
            let ptr = std::alloc::alloc_zeroed(layout) as *mut TenantTable;
            assert!(!ptr.is_null());
            Box::from_raw(ptr)
        }
    }

    #[test]
    fn layout_is_stable() {
        assert_eq!(std::mem::size_of::<TenantEntry>(), 64);
        assert_eq!(TABLE_SIZE, 64 + MAX_TENANTS * 64);
    }

    #[test]
    fn neighbours_see_fresh_others_only() {
        let table = zeroed();
        assert!(!table.is_valid());
        table.initialise();
        assert!(table.is_valid());
        let ms = 1_000_000;
        let now = 10_000 * ms;
        let set = |i: usize, prio: u32, launch: u64, beat: u64| {
            let e = &table.entries[i];
            e.in_use.store(1, Ordering::Relaxed);
            e.launch_rate
                .store(1000 * (i as u64 + 1), Ordering::Relaxed);
            e.priority.store(prio, Ordering::Relaxed);
            e.last_launch_ns.store(launch, Ordering::Relaxed);
            e.beat_ns.store(beat, Ordering::Relaxed);
        };
        set(0, PRIORITY_LOW, now, now);
        assert_eq!(table.neighbours(0, now, 500 * ms), Neighbours::default());
        set(3, PRIORITY_LOW, now - 100 * ms, now - 50 * ms);
        assert_eq!(
            table.neighbours(0, now, 500 * ms),
            Neighbours {
                other_active: true,
                high_priority_active: false,
                others_launch_rate: 4000,
                unpublished: false,
            }
        );
        // A high-priority tenant that went idle 600 ms ago no longer counts.
        set(5, PRIORITY_HIGH, now - 600 * ms, now);
        assert!(!table.neighbours(0, now, 500 * ms).high_priority_active);
        set(5, PRIORITY_HIGH, now - 10 * ms, now);
        assert!(table.neighbours(0, now, 500 * ms).high_priority_active);
        // Seen from entry 5 itself, only the low-priority ones remain.
        assert!(!table.neighbours(5, now, 500 * ms).high_priority_active);
        // A dead owner (no beat) launching "recently" is not active.
        set(5, PRIORITY_HIGH, now, now - 2_000 * ms);
        assert!(!table.neighbours(0, now, 500 * ms).high_priority_active);
    }

    #[test]
    fn launch_rates_of_active_others_are_summed_and_gaps_flagged() {
        let table = zeroed();
        table.initialise();
        let ms = 1_000_000;
        let now = 10_000 * ms;
        let set = |i: usize, rate: u64, launch: u64| {
            let e = &table.entries[i];
            e.in_use.store(1, Ordering::Relaxed);
            e.launch_rate.store(rate, Ordering::Relaxed);
            e.last_launch_ns.store(launch, Ordering::Relaxed);
            e.beat_ns.store(now, Ordering::Relaxed);
        };
        set(0, 7, now);
        set(1, 300, now - 10 * ms);
        set(2, 500, now - 20 * ms);
        // Idle for 900 ms: its stale rate is not counted.
        set(3, 9_000, now - 900 * ms);
        let seen = table.neighbours(0, now, 500 * ms);
        assert_eq!(seen.others_launch_rate, 800);
        assert!(!seen.unpublished);
        assert_eq!(table.neighbours(1, now, 500 * ms).others_launch_rate, 507);
        // An active tenant of an older build (rate left at 0).
        set(4, 0, now);
        let seen = table.neighbours(0, now, 500 * ms);
        assert!(seen.unpublished);
        assert_eq!(seen.others_launch_rate, 800);
    }
}
