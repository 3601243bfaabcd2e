//! The node-wide tenant table of one physical card, and the aggregation
//! that fills it. One small file per card (named by the card's UUID) in a
//! host directory the node agent owns (`TESSERA_CARD_TENANTS_DIR`), mounted
//! **read-only** into every GPU container. Each container that governs its
//! launches on the card has one entry: its priority, when it last launched,
//! its updater's heartbeat and how fast it launches (cost units per second).
//! Containers read the table to learn whether another tenant is active on
//! the card (the default core policy limits only then), whether a
//! high-priority tenant is launching (low-priority tenants then yield), and
//! the card's total launch rate (from which the SM limiter estimates the
//! card's capacity).
//!
//! Who writes what:
//! - A container writes nothing here. Its SM updater publishes its own
//!   figures in its own accounting region
//!   ([`crate::shared_region::LaunchPublish`]).
//! - The node agent reads every allocated container's region, builds each
//!   card's entries with [`aggregate`] (pure: regions in, tables out) and
//!   stores them with [`TenantTable::publish`]. The **priority** of an
//!   entry comes from the container's allocation (`nvidia.com/priority` in
//!   its pod), never from anything the container wrote; the times are
//!   clamped to the agent's clock, so a container cannot make its entry
//!   look fresh in the future.
//! - A container finds its own entry by [`tenant_key`] of the id the agent
//!   passes it (`TESSERA_TENANT_ID`, the name of its host directory) and
//!   leaves it out of [`TenantTable::neighbours`].
//!
//! The agent updates the file in place (it is never truncated or replaced
//! while valid), so readers map it once, read-only, and see every update.
//! Each entry is a seqlock: [`TenantEntry::seq`] is odd while the agent
//! writes it, and readers retry until they see the same even value before
//! and after, so an entry is never seen half-written (a reader can only
//! load: it cannot stall the writer). If the agent ever has to replace the
//! file (a new layout, or a file it did not make), readers notice the new
//! inode and re-open it (see the interceptor's `card_table`).
//!
//! Times are `CLOCK_MONOTONIC` nanoseconds, the same clock in every
//! container of the node and on the host. This module owns the layout and
//! the arithmetic; the I/O is the agent's (writer) and the interceptor's
//! (reader).

use std::collections::BTreeMap;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use crate::shared_region::{LaunchFigures, SharedRegion, MAX_DEVICES};

/// `"TSRCARD\x01"` read as a little-endian `u64`.
pub const TABLE_MAGIC: u64 = u64::from_le_bytes(*b"TSRCARD\x01");
/// Layout version of the table: 2 is the agent-written table with tenant
/// keys and per-entry sequence counters (1 was written by the containers).
pub const TABLE_VERSION: u32 = 2;
/// Containers that can govern launches on one card at the same time.
pub const MAX_TENANTS: usize = 64;

/// [`TenantEntry::priority`] of a high-priority tenant (`nvidia.com/priority: 0`).
pub const PRIORITY_HIGH: u32 = 0;
/// [`TenantEntry::priority`] of a low-priority or unprioritised tenant.
pub const PRIORITY_LOW: u32 = 1;

/// The table priority of a container whose pod asks for `requested`
/// (`nvidia.com/priority`): `0` is high, anything else or nothing is low.
pub fn priority_of_request(requested: Option<u32>) -> u32 {
    match requested {
        Some(0) => PRIORITY_HIGH,
        _ => PRIORITY_LOW,
    }
}

/// The key of a tenant in the tables: 64-bit FNV-1a of its id (the name of
/// its host directory, `<pod UID>_<container>`), never 0 (0 marks a free
/// entry). Both the agent and the container compute it from the same id.
pub fn tenant_key(id: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash.max(1)
}

/// One container's presence on the card, as it lies in the file.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct TenantEntry {
    /// Seqlock counter: odd while the agent writes the entry.
    pub seq: AtomicU32,
    /// [`PRIORITY_HIGH`] or [`PRIORITY_LOW`], from the allocation.
    pub priority: AtomicU32,
    /// [`tenant_key`] of the owner; 0 = free entry.
    pub tenant_key: AtomicU64,
    /// When the owner's container last launched on the card.
    pub last_launch_ns: AtomicU64,
    /// When the owner's updater last published (liveness).
    pub beat_ns: AtomicU64,
    /// Cost units (blocks × threads) the owner's container launched per
    /// second on the card, smoothed over a fraction of a second; 0 = not
    /// published yet.
    pub launch_rate: AtomicU64,
    /// Reserved, zero.
    pub reserved: [AtomicU64; 3],
}

/// An entry's values, as plain data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TenantRecord {
    /// [`tenant_key`] of the owner (non-zero).
    pub key: u64,
    /// [`PRIORITY_HIGH`] or [`PRIORITY_LOW`].
    pub priority: u32,
    /// When the owner's container last launched on the card.
    pub last_launch_ns: u64,
    /// When the owner's updater last published.
    pub beat_ns: u64,
    /// The owner's launch rate, cost units per second.
    pub launch_rate: u64,
}

/// How often a reader retries an entry the writer keeps changing before it
/// gives up on it for this look (the writer touches an entry for a few
/// nanoseconds every agent period, so this is never reached in practice).
const READ_ATTEMPTS: usize = 64;

impl TenantEntry {
    /// A consistent copy of the entry; `None` when it is free (or, after
    /// many attempts, still being rewritten).
    pub fn read(&self) -> Option<TenantRecord> {
        for _ in 0..READ_ATTEMPTS {
            let before = self.seq.load(Ordering::Acquire);
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let record = TenantRecord {
                key: self.tenant_key.load(Ordering::Relaxed),
                priority: self.priority.load(Ordering::Relaxed),
                last_launch_ns: self.last_launch_ns.load(Ordering::Relaxed),
                beat_ns: self.beat_ns.load(Ordering::Relaxed),
                launch_rate: self.launch_rate.load(Ordering::Relaxed),
            };
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == before {
                return (record.key != 0).then_some(record);
            }
        }
        None
    }

    /// Writes the entry (`None` frees it). Only for the table's one writer.
    pub fn write(&self, record: Option<&TenantRecord>) {
        let empty = TenantRecord::default();
        let record = record.unwrap_or(&empty);
        let seq = self.seq.load(Ordering::Relaxed);
        // An odd value left by a writer that died mid-write is closed here.
        let start = seq | 1;
        self.seq.store(start, Ordering::Relaxed);
        fence(Ordering::Release);
        self.tenant_key.store(record.key, Ordering::Relaxed);
        self.priority.store(record.priority, Ordering::Relaxed);
        self.last_launch_ns
            .store(record.last_launch_ns, Ordering::Relaxed);
        self.beat_ns.store(record.beat_ns, Ordering::Relaxed);
        self.launch_rate
            .store(record.launch_rate, Ordering::Relaxed);
        self.seq.store(start.wrapping_add(1), Ordering::Release);
    }
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
    /// Some active other has published no launch rate yet, so
    /// [`Neighbours::others_launch_rate`] undercounts the card's load.
    pub unpublished: bool,
}

impl TenantTable {
    /// Writes the header of a zero-filled table (magic last). For the writer.
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

    /// The entries in use, each read consistently.
    pub fn records(&self) -> Vec<TenantRecord> {
        self.entries.iter().filter_map(TenantEntry::read).collect()
    }

    /// The others' activity as the tenant keyed `own` sees it at `now_ns`:
    /// a tenant counts as active while it launched within `window_ns` and
    /// its updater is alive (beat within `window_ns`); the launch rates of
    /// the active ones are summed.
    pub fn neighbours(&self, own: u64, now_ns: u64, window_ns: u64) -> Neighbours {
        let mut seen = Neighbours::default();
        let fresh = |t: u64| t != 0 && now_ns.saturating_sub(t) <= window_ns;
        for entry in self.records() {
            if entry.key == own || !fresh(entry.beat_ns) || !fresh(entry.last_launch_ns) {
                continue;
            }
            seen.other_active = true;
            match entry.launch_rate {
                0 => seen.unpublished = true,
                rate => seen.others_launch_rate = seen.others_launch_rate.saturating_add(rate),
            }
            if entry.priority == PRIORITY_HIGH {
                seen.high_priority_active = true;
            }
        }
        seen
    }

    /// Makes the table hold exactly `records` (at most [`MAX_TENANTS`];
    /// later ones are dropped). A tenant keeps its entry from one call to
    /// the next; tenants that are gone are freed; only entries whose values
    /// change are written. Only for the table's one writer (the node agent).
    pub fn publish(&self, records: &[TenantRecord]) {
        let records = &records[..records.len().min(MAX_TENANTS)];
        let current: Vec<Option<TenantRecord>> =
            self.entries.iter().map(TenantEntry::read).collect();
        let mut placed = vec![false; records.len()];
        // Update or free the entries in use.
        for (entry, now) in self.entries.iter().zip(&current) {
            let Some(now) = now else { continue };
            match records.iter().position(|r| r.key == now.key) {
                Some(i) if !placed[i] => {
                    placed[i] = true;
                    if records[i] != *now {
                        entry.write(Some(&records[i]));
                    }
                }
                _ => entry.write(None),
            }
        }
        // New tenants take free entries.
        let mut free = self
            .entries
            .iter()
            .zip(&current)
            .filter(|(_, now)| now.is_none())
            .map(|(entry, _)| entry);
        for (record, _) in records.iter().zip(&placed).filter(|(_, done)| !**done) {
            match free.next() {
                Some(entry) => entry.write(Some(record)),
                None => break,
            }
        }
    }
}

/// One allocated container, as the aggregation sees it: who it is by the
/// allocation (key, priority, cards) and what it published in its region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantSource {
    /// [`tenant_key`] of the container's id.
    pub key: u64,
    /// Its priority from the allocation ([`priority_of_request`]).
    pub priority: u32,
    /// UUIDs of its cards, indexed like its region's per-card blocks.
    pub cards: Vec<String>,
    /// What its region's publish block said for each of `cards`.
    pub published: Vec<LaunchFigures>,
}

impl TenantSource {
    /// The source for container `id` with the allocation's `priority` and
    /// `cards`, reading only the publish block of `region` (a validated
    /// region; nothing else in it is used).
    pub fn from_region(id: &str, priority: u32, cards: &[String], region: &SharedRegion) -> Self {
        let cards = &cards[..cards.len().min(MAX_DEVICES)];
        TenantSource {
            key: tenant_key(id),
            priority,
            cards: cards.to_vec(),
            published: region.publish[..cards.len()]
                .iter()
                .map(|p| p.figures())
                .collect(),
        }
    }
}

/// Builds every card's entries from the containers' published figures at
/// the agent's time `now_ns`: one entry per (container, card) whose updater
/// has published, with the priority of the allocation and the times
/// clamped to `now_ns`. Cards come out keyed by UUID; a card with no
/// publishing tenant is absent (its table is to be emptied). At most
/// [`MAX_TENANTS`] entries per card, the most recently beating first.
pub fn aggregate<'a>(
    sources: impl IntoIterator<Item = &'a TenantSource>,
    now_ns: u64,
) -> BTreeMap<String, Vec<TenantRecord>> {
    let mut tables: BTreeMap<String, Vec<TenantRecord>> = BTreeMap::new();
    for source in sources {
        for (uuid, figures) in source.cards.iter().zip(&source.published) {
            if figures.beat_ns == 0 {
                continue; // this container never governed a launch here
            }
            let entries = tables.entry(uuid.clone()).or_default();
            // A container listed twice on one card (a corrupt allocation)
            // keeps its first entry.
            if entries.iter().any(|e| e.key == source.key) {
                continue;
            }
            entries.push(TenantRecord {
                key: source.key,
                priority: source.priority,
                last_launch_ns: figures.last_launch_ns.min(now_ns),
                beat_ns: figures.beat_ns.min(now_ns),
                launch_rate: figures.launch_rate,
            });
        }
    }
    for entries in tables.values_mut() {
        if entries.len() > MAX_TENANTS {
            entries.sort_by(|a, b| b.beat_ns.cmp(&a.beat_ns).then(a.key.cmp(&b.key)));
            entries.truncate(MAX_TENANTS);
        }
    }
    tables
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared_region::REGION_SIZE;

    fn zeroed<T>() -> Box<T> {
        let layout = std::alloc::Layout::new::<T>();
        // SAFETY: only used for the all-atomic layouts of this crate (zero
        // is valid); non-zero size.
        unsafe {
            let ptr = std::alloc::alloc_zeroed(layout) as *mut T;
            assert!(!ptr.is_null());
            Box::from_raw(ptr)
        }
    }

    fn table() -> Box<TenantTable> {
        let table = zeroed::<TenantTable>();
        table.initialise();
        table
    }

    const MS: u64 = 1_000_000;

    fn record(key: u64, priority: u32, launch: u64, beat: u64, rate: u64) -> TenantRecord {
        TenantRecord {
            key,
            priority,
            last_launch_ns: launch,
            beat_ns: beat,
            launch_rate: rate,
        }
    }

    #[test]
    fn layout_is_stable() {
        assert_eq!(std::mem::size_of::<TenantEntry>(), 64);
        assert_eq!(TABLE_SIZE, 64 + MAX_TENANTS * 64);
    }

    #[test]
    fn keys_are_stable_and_never_zero() {
        assert_eq!(tenant_key(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(tenant_key("uid-1_main"), tenant_key("uid-1_main"));
        assert_ne!(tenant_key("uid-1_main"), tenant_key("uid-1_side"));
        assert_eq!(priority_of_request(Some(0)), PRIORITY_HIGH);
        assert_eq!(priority_of_request(Some(1)), PRIORITY_LOW);
        assert_eq!(priority_of_request(None), PRIORITY_LOW);
    }

    #[test]
    fn neighbours_see_fresh_others_only() {
        let table = zeroed::<TenantTable>();
        assert!(!table.is_valid());
        table.initialise();
        assert!(table.is_valid());
        let now = 10_000 * MS;
        let (own, low, high) = (11, 22, 33);
        table.publish(&[record(own, PRIORITY_LOW, now, now, 1000)]);
        assert_eq!(table.neighbours(own, now, 500 * MS), Neighbours::default());
        let low_entry = record(low, PRIORITY_LOW, now - 100 * MS, now - 50 * MS, 4000);
        table.publish(&[record(own, PRIORITY_LOW, now, now, 1000), low_entry]);
        assert_eq!(
            table.neighbours(own, now, 500 * MS),
            Neighbours {
                other_active: true,
                high_priority_active: false,
                others_launch_rate: 4000,
                unpublished: false,
            }
        );
        // A high-priority tenant that went idle 600 ms ago no longer counts.
        let with_high = |launch: u64, beat: u64| {
            table.publish(&[
                record(own, PRIORITY_LOW, now, now, 1000),
                low_entry,
                record(high, PRIORITY_HIGH, launch, beat, 9),
            ])
        };
        with_high(now - 600 * MS, now);
        assert!(!table.neighbours(own, now, 500 * MS).high_priority_active);
        with_high(now - 10 * MS, now);
        assert!(table.neighbours(own, now, 500 * MS).high_priority_active);
        // Seen from the high-priority tenant itself, only the low ones remain.
        assert!(!table.neighbours(high, now, 500 * MS).high_priority_active);
        // A dead owner (no beat) launching "recently" is not active.
        with_high(now, now - 2_000 * MS);
        assert!(!table.neighbours(own, now, 500 * MS).high_priority_active);
    }

    #[test]
    fn launch_rates_of_active_others_are_summed_and_gaps_flagged() {
        let table = table();
        let now = 10_000 * MS;
        let mut records = vec![
            record(1, PRIORITY_LOW, now, now, 7),
            record(2, PRIORITY_LOW, now - 10 * MS, now, 300),
            record(3, PRIORITY_LOW, now - 20 * MS, now, 500),
            // Idle for 900 ms: its stale rate is not counted.
            record(4, PRIORITY_LOW, now - 900 * MS, now, 9_000),
        ];
        table.publish(&records);
        let seen = table.neighbours(1, now, 500 * MS);
        assert_eq!(seen.others_launch_rate, 800);
        assert!(!seen.unpublished);
        assert_eq!(table.neighbours(2, now, 500 * MS).others_launch_rate, 507);
        // An active tenant that has not published a rate yet.
        records.push(record(5, PRIORITY_LOW, now, now, 0));
        table.publish(&records);
        let seen = table.neighbours(1, now, 500 * MS);
        assert!(seen.unpublished);
        assert_eq!(seen.others_launch_rate, 800);
    }

    #[test]
    fn publish_keeps_entries_in_place_frees_the_gone_and_fills_gaps() {
        let table = table();
        let a = record(1, PRIORITY_LOW, 5, 5, 10);
        let b = record(2, PRIORITY_HIGH, 6, 6, 20);
        let c = record(3, PRIORITY_LOW, 7, 7, 30);
        table.publish(&[a, b]);
        let slot_of = |key: u64| {
            table
                .entries
                .iter()
                .position(|e| e.read().is_some_and(|r| r.key == key))
        };
        let (slot_a, slot_b) = (slot_of(1), slot_of(2));
        assert!(slot_a.is_some() && slot_b.is_some());
        let b2 = TenantRecord { beat_ns: 60, ..b };
        table.publish(&[b2, c]);
        assert_eq!(slot_of(1), None, "a is gone");
        assert_eq!(slot_of(2), slot_b, "b kept its entry");
        assert_eq!(table.entries[slot_b.unwrap()].read(), Some(b2));
        let mut all = table.records();
        all.sort_by_key(|r| r.key);
        assert_eq!(all, vec![b2, c]);
        table.publish(&[]);
        assert!(table.records().is_empty());
        // Every sequence counter is even again: no entry left mid-write.
        assert!(table
            .entries
            .iter()
            .all(|e| e.seq.load(Ordering::Relaxed) % 2 == 0));
        // More tenants than entries: the first MAX_TENANTS are kept.
        let many: Vec<_> = (1..=MAX_TENANTS as u64 + 5)
            .map(|k| record(k, PRIORITY_LOW, 1, 1, 1))
            .collect();
        table.publish(&many);
        assert_eq!(table.records().len(), MAX_TENANTS);
    }

    #[test]
    fn an_entry_being_written_is_not_read() {
        let table = table();
        table.publish(&[record(9, PRIORITY_HIGH, 1, 1, 1)]);
        let entry = &table.entries[0];
        let seq = entry.seq.load(Ordering::Relaxed);
        entry.seq.store(seq + 1, Ordering::Relaxed);
        assert_eq!(entry.read(), None, "odd sequence: mid-write");
        // The next write closes a write that never finished.
        entry.write(Some(&record(9, PRIORITY_LOW, 2, 2, 2)));
        assert_eq!(entry.read(), Some(record(9, PRIORITY_LOW, 2, 2, 2)));
    }

    #[test]
    fn concurrent_reads_never_see_a_torn_entry() {
        let table: std::sync::Arc<TenantTable> = std::sync::Arc::from(table());
        let writer = {
            let table = std::sync::Arc::clone(&table);
            std::thread::spawn(move || {
                for i in 1..20_000u64 {
                    // Every field of one write carries the same number.
                    table.entries[0].write(Some(&record(i, (i % 2) as u32, i, i, i)));
                }
            })
        };
        let mut seen = 0;
        while !writer.is_finished() {
            if let Some(r) = table.entries[0].read() {
                assert_eq!(
                    (
                        r.last_launch_ns,
                        r.beat_ns,
                        r.launch_rate,
                        u64::from(r.priority)
                    ),
                    (r.key, r.key, r.key, r.key % 2),
                    "torn"
                );
                seen += 1;
            }
        }
        writer.join().unwrap();
        println!("{seen} consistent reads during the writes");
        assert_eq!(
            table.entries[0].read(),
            Some(record(19_999, 1, 19_999, 19_999, 19_999))
        );
    }

    fn region_publishing(cards: &[(usize, LaunchFigures)]) -> Box<SharedRegion> {
        let region = zeroed::<SharedRegion>();
        assert_eq!(std::mem::size_of_val(&*region), REGION_SIZE);
        region.initialise();
        for (card, figures) in cards {
            region.publish[*card].publish(*figures);
        }
        region
    }

    #[test]
    fn aggregate_takes_priority_from_the_allocation_and_clamps_times() {
        let now = 50_000 * MS;
        let fig = |launch, beat, rate| LaunchFigures {
            launch_rate: rate,
            last_launch_ns: launch,
            beat_ns: beat,
        };
        // A low-priority container that scribbled "high" (0) and far-future
        // times everywhere it can write.
        let liar = region_publishing(&[(0, fig(u64::MAX, u64::MAX, 123))]);
        for word in liar.publish[0].reserved.iter() {
            word.store(u64::from(PRIORITY_HIGH), Ordering::Relaxed);
        }
        liar.cores[0].yield_to_priority.store(0, Ordering::Relaxed);
        let honest = region_publishing(&[
            (0, fig(now - MS, now - MS, 400)),
            (1, fig(now - 2 * MS, now - 2 * MS, 500)),
        ]);
        let idle = region_publishing(&[]);
        let uuids = |list: &[&str]| list.iter().map(|u| (*u).to_owned()).collect::<Vec<_>>();
        let sources = [
            TenantSource::from_region("liar", PRIORITY_LOW, &uuids(&["GPU-a"]), &liar),
            TenantSource::from_region("hi", PRIORITY_HIGH, &uuids(&["GPU-a", "GPU-b"]), &honest),
            TenantSource::from_region("idle", PRIORITY_HIGH, &uuids(&["GPU-b"]), &idle),
        ];
        let tables = aggregate(&sources, now);
        assert_eq!(
            tables.keys().collect::<Vec<_>>(),
            ["GPU-a", "GPU-b"],
            "cards by UUID"
        );
        assert_eq!(
            tables["GPU-a"],
            vec![
                record(tenant_key("liar"), PRIORITY_LOW, now, now, 123),
                record(tenant_key("hi"), PRIORITY_HIGH, now - MS, now - MS, 400),
            ]
        );
        assert_eq!(
            tables["GPU-b"],
            vec![record(
                tenant_key("hi"),
                PRIORITY_HIGH,
                now - 2 * MS,
                now - 2 * MS,
                500
            )],
            "a container that never published has no entry"
        );
        // Seen through a table, the liar is an active low-priority tenant:
        // it makes nobody yield.
        let table = table();
        table.publish(&tables["GPU-a"]);
        let seen_by_hi = table.neighbours(tenant_key("hi"), now, 500 * MS);
        assert!(seen_by_hi.other_active && !seen_by_hi.high_priority_active);
        // A minute later the liar's clamped times are stale like anyone's.
        let later = now + 60_000 * MS;
        assert!(
            !table
                .neighbours(tenant_key("hi"), later, 500 * MS)
                .other_active
        );
    }

    #[test]
    fn a_container_publishes_only_for_its_own_cards() {
        // Figures in the publish block past the container's card list are
        // ignored: a container cannot appear on a card it was not given.
        let region = region_publishing(&[
            (
                0,
                LaunchFigures {
                    launch_rate: 1,
                    last_launch_ns: 1,
                    beat_ns: 1,
                },
            ),
            (
                5,
                LaunchFigures {
                    launch_rate: 9,
                    last_launch_ns: 9,
                    beat_ns: 9,
                },
            ),
        ]);
        let source = TenantSource::from_region("c", PRIORITY_LOW, &["GPU-x".to_owned()], &region);
        let tables = aggregate([&source], 100);
        assert_eq!(tables.len(), 1);
        assert_eq!(tables["GPU-x"].len(), 1);
    }
}
