//! A lock-free map from allocation key (device pointer, generic handle,
//! array or context) to `(card, bytes)`: what each allocation was charged,
//! so its free gives back exactly that. Each entry also carries one spare
//! word (`aux`): the reference count of a `cuMemCreate` handle, or the
//! handle behind a virtual-memory mapping (see `vmm`). Open addressing with linear probing
//! over a fixed-size anonymous mapping (created on first insert; untouched
//! pages cost nothing). Insert and remove are a few atomic operations; a
//! lookup of an unknown key stops after the longest probe ever used.
//!
//! Keys are unique while live (the driver never hands out one address twice
//! before it is freed), which is what makes slot reuse safe without locks.

use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

const EMPTY: u64 = 0;
const TOMBSTONE: u64 = 1;
const BUSY: u64 = 2;
/// Stored keys are `key + KEY_OFFSET`, so 0..=2 stay free for the markers.
const KEY_OFFSET: u64 = 3;
const DEVICE_BITS: u32 = 8;

#[repr(C)]
struct Entry {
    key: AtomicU64,
    /// `bytes << 8 | card`.
    value: AtomicU64,
    /// Caller-defined (reference count or handle).
    aux: AtomicU64,
}

/// See the module documentation.
#[derive(Debug)]
pub struct PtrTable {
    entries: AtomicPtr<Entry>,
    capacity_log2: u32,
    max_probe: AtomicUsize,
}

impl PtrTable {
    /// A table of `2^capacity_log2` entries (24 bytes each, mapped lazily).
    pub const fn new(capacity_log2: u32) -> PtrTable {
        PtrTable {
            entries: AtomicPtr::new(ptr::null_mut()),
            capacity_log2,
            max_probe: AtomicUsize::new(0),
        }
    }

    fn capacity(&self) -> usize {
        1 << self.capacity_log2
    }

    fn bytes(&self) -> usize {
        self.capacity() * std::mem::size_of::<Entry>()
    }

    fn home(&self, stored: u64) -> usize {
        (stored.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - self.capacity_log2)) as usize
    }

    fn entries(&self) -> Option<&[Entry]> {
        let p = self.entries.load(Ordering::Acquire);
        // SAFETY: a non-null pointer is a live mapping of `capacity()`
        // zero-initialised entries, never unmapped while the process may use
        // it (only in a single-threaded child after fork).
        (!p.is_null()).then(|| unsafe { std::slice::from_raw_parts(p, self.capacity()) })
    }

    #[cold]
    fn create(&self) -> Option<&[Entry]> {
        // SAFETY: anonymous private mapping; checked for failure below.
        let fresh = unsafe {
            libc::mmap(
                ptr::null_mut(),
                self.bytes(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if fresh == libc::MAP_FAILED {
            return None;
        }
        if self
            .entries
            .compare_exchange(
                ptr::null_mut(),
                fresh as *mut Entry,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            // Another thread created it first.
            // SAFETY: `fresh` is our own mapping, never published.
            unsafe { libc::munmap(fresh, self.bytes()) };
        }
        self.entries()
    }

    /// Records `key -> (device, bytes)`. False when the key cannot be stored
    /// (table full or out of memory); the caller then cannot give the bytes
    /// back at free time and should say so.
    pub fn insert(&self, key: u64, device: usize, bytes: u64) -> bool {
        self.insert_with_aux(key, device, bytes, 0)
    }

    /// [`insert`](Self::insert) with the entry's spare word set to `aux`.
    pub fn insert_with_aux(&self, key: u64, device: usize, bytes: u64, aux: u64) -> bool {
        let Some(stored) = key.checked_add(KEY_OFFSET) else {
            return false;
        };
        if bytes >> (64 - DEVICE_BITS) != 0 || device >= 1 << DEVICE_BITS {
            return false;
        }
        let Some(entries) = self.entries().or_else(|| self.create()) else {
            return false;
        };
        let mask = self.capacity() - 1;
        let home = self.home(stored);
        for probe in 0..self.capacity() {
            let entry = &entries[(home + probe) & mask];
            let current = entry.key.load(Ordering::Relaxed);
            if (current == EMPTY || current == TOMBSTONE)
                && entry
                    .key
                    .compare_exchange(current, BUSY, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                entry
                    .value
                    .store(bytes << DEVICE_BITS | device as u64, Ordering::Relaxed);
                entry.aux.store(aux, Ordering::Relaxed);
                entry.key.store(stored, Ordering::Release);
                self.max_probe.fetch_max(probe, Ordering::Relaxed);
                return true;
            }
        }
        false
    }

    /// Removes `key`, returning what it was charged; `None` for keys never
    /// inserted (or already removed by a racing free).
    pub fn remove(&self, key: u64) -> Option<(usize, u64)> {
        self.remove_with_aux(key)
            .map(|(device, bytes, _)| (device, bytes))
    }

    /// [`remove`](Self::remove), also returning the spare word.
    pub fn remove_with_aux(&self, key: u64) -> Option<(usize, u64, u64)> {
        let entry = self.find(key)?;
        let stored = key + KEY_OFFSET;
        let value = entry.value.load(Ordering::Relaxed);
        let aux = entry.aux.load(Ordering::Relaxed);
        entry
            .key
            .compare_exchange(stored, TOMBSTONE, Ordering::AcqRel, Ordering::Relaxed)
            .ok()
            .map(|_| ((value & 0xff) as usize, value >> DEVICE_BITS, aux))
    }

    /// The live entry of `key`, if any.
    fn find(&self, key: u64) -> Option<&Entry> {
        let stored = key.checked_add(KEY_OFFSET)?;
        let entries = self.entries()?;
        let mask = self.capacity() - 1;
        let home = self.home(stored);
        let limit = self.max_probe.load(Ordering::Relaxed);
        for probe in 0..=limit {
            let entry = &entries[(home + probe) & mask];
            let current = entry.key.load(Ordering::Acquire);
            if current == EMPTY {
                return None;
            }
            if current == stored {
                return Some(entry);
            }
        }
        None
    }

    /// `(card, bytes)` of `key` without removing it.
    pub fn get(&self, key: u64) -> Option<(usize, u64)> {
        let value = self.find(key)?.value.load(Ordering::Relaxed);
        Some(((value & 0xff) as usize, value >> DEVICE_BITS))
    }

    /// Sets the bytes of `key` (on its card) from 0 to `bytes`; false when
    /// the key is absent or already has bytes (another thread set them).
    pub fn set_bytes_from_zero(&self, key: u64, bytes: u64) -> bool {
        if bytes >> (64 - DEVICE_BITS) != 0 {
            return false;
        }
        let Some(entry) = self.find(key) else {
            return false;
        };
        let value = entry.value.load(Ordering::Relaxed);
        value >> DEVICE_BITS == 0
            && entry
                .value
                .compare_exchange(
                    value,
                    bytes << DEVICE_BITS | (value & 0xff),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// `(card, bytes, spare word)` of `key` without removing it.
    pub fn get_with_aux(&self, key: u64) -> Option<(usize, u64, u64)> {
        let entry = self.find(key)?;
        let value = entry.value.load(Ordering::Relaxed);
        Some((
            (value & 0xff) as usize,
            value >> DEVICE_BITS,
            entry.aux.load(Ordering::Acquire),
        ))
    }

    /// Sets the spare word of `key`; false when the key is absent.
    pub fn set_aux(&self, key: u64, aux: u64) -> bool {
        self.find(key)
            .map(|entry| entry.aux.store(aux, Ordering::Release))
            .is_some()
    }

    /// Replaces the bytes of `key` by `update(bytes)` atomically; returns
    /// `(before, after)`, `None` when the key is absent (or `after` does not
    /// fit).
    pub fn update_bytes(&self, key: u64, update: impl Fn(u64) -> u64) -> Option<(u64, u64)> {
        let entry = self.find(key)?;
        let mut after = 0;
        let before = entry
            .value
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |value| {
                after = update(value >> DEVICE_BITS);
                (after >> (64 - DEVICE_BITS) == 0).then_some(after << DEVICE_BITS | (value & 0xff))
            })
            .ok()?;
        Some((before >> DEVICE_BITS, after))
    }

    /// Adds one to the spare word of `key`; false when the key is absent.
    pub fn add_ref(&self, key: u64) -> bool {
        match self.find(key) {
            Some(entry) => {
                entry.aux.fetch_add(1, Ordering::AcqRel);
                true
            }
            None => false,
        }
    }

    /// Takes one from the spare word of `key`. When that was the last
    /// reference the entry is removed and its charge returned as
    /// `Dropped::Last`; the caller gives the charge back.
    pub fn drop_ref(&self, key: u64) -> Dropped {
        let Some(entry) = self.find(key) else {
            return Dropped::Unknown;
        };
        let before = entry
            .aux
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1));
        match before {
            Ok(1) | Err(0) => match self.remove_with_aux(key) {
                Some((device, bytes, _)) => Dropped::Last(device, bytes),
                None => Dropped::Unknown,
            },
            _ => Dropped::Kept,
        }
    }

    /// Forgets everything (in a child after fork: the parent's allocations
    /// are not the child's). Only while no other thread uses the table.
    pub fn reset(&self) {
        let old = self.entries.swap(ptr::null_mut(), Ordering::AcqRel);
        self.max_probe.store(0, Ordering::Relaxed);
        if !old.is_null() {
            // SAFETY: our mapping of `bytes()`; no other thread exists to
            // hold a reference into it (see the contract above).
            unsafe { libc::munmap(old as *mut libc::c_void, self.bytes()) };
        }
    }
}

impl Drop for PtrTable {
    fn drop(&mut self) {
        self.reset();
    }
}

/// What [`PtrTable::drop_ref`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The key is not in the table (never charged, or already gone).
    Unknown,
    /// References remain; nothing to give back yet.
    Kept,
    /// That was the last reference: the entry is gone, `(card, bytes)` to
    /// give back.
    Last(usize, u64),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Arc;

    #[test]
    fn insert_remove_round_trip() {
        let t = PtrTable::new(6);
        assert_eq!(t.remove(0x1000), None);
        assert!(t.insert(0x1000, 1, 4096));
        assert!(t.insert(0, 0, 7));
        assert_eq!(t.remove(0x1000), Some((1, 4096)));
        assert_eq!(t.remove(0x1000), None);
        assert_eq!(t.remove(0), Some((0, 7)));
        assert!(!t.insert(u64::MAX, 0, 1));
    }

    #[test]
    fn fills_up_and_reuses_tombstones() {
        let t = PtrTable::new(4);
        for k in 0..16u64 {
            assert!(t.insert(k << 21, 0, k + 1));
        }
        assert!(!t.insert(99 << 21, 0, 1), "table is full");
        for k in 0..16u64 {
            assert_eq!(t.remove(k << 21), Some((0, k + 1)));
        }
        for k in 100..116u64 {
            assert!(t.insert(k << 21, 2, k));
        }
        for k in 100..116u64 {
            assert_eq!(t.remove(k << 21), Some((2, k)));
        }
    }

    #[test]
    fn matches_a_hash_map_under_churn() {
        let t = PtrTable::new(10);
        let mut model = HashMap::new();
        let mut x = 12345u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = (x % 700) << 12;
            if let std::collections::hash_map::Entry::Vacant(e) = model.entry(key) {
                assert!(t.insert(key, (x % 3) as usize, x % 1000));
                e.insert(((x % 3) as usize, x % 1000));
            } else {
                assert_eq!(t.remove(key), model.remove(&key));
            }
        }
    }

    #[test]
    fn concurrent_threads_keep_their_entries() {
        let t = Arc::new(PtrTable::new(14));
        let handles: Vec<_> = (0..4u64)
            .map(|tid| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    for round in 0..50u64 {
                        for i in 0..500u64 {
                            let key = (tid << 40) | (i << 12);
                            assert!(t.insert(key, tid as usize, i + round));
                        }
                        for i in 0..500u64 {
                            let key = (tid << 40) | (i << 12);
                            assert_eq!(t.remove(key), Some((tid as usize, i + round)));
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn references_keep_an_entry_until_the_last_is_dropped() {
        let t = PtrTable::new(6);
        assert_eq!(t.drop_ref(0x4000), Dropped::Unknown);
        assert!(t.insert_with_aux(0x4000, 3, 1 << 30, 1));
        assert!(t.add_ref(0x4000));
        assert!(t.add_ref(0x4000));
        assert_eq!(t.drop_ref(0x4000), Dropped::Kept);
        assert_eq!(t.drop_ref(0x4000), Dropped::Kept);
        assert_eq!(t.get(0x4000), Some((3, 1 << 30)));
        assert_eq!(t.drop_ref(0x4000), Dropped::Last(3, 1 << 30));
        assert_eq!(t.get(0x4000), None);
        assert!(!t.add_ref(0x4000));
        assert!(t.insert_with_aux(0x8000, 1, 0, 7));
        assert!(t.set_bytes_from_zero(0x8000, 4096));
        assert!(!t.set_bytes_from_zero(0x8000, 1));
        assert_eq!(t.get_with_aux(0x8000), Some((1, 4096, 7)));
        assert!(t.set_aux(0x8000, 9));
        assert_eq!(t.update_bytes(0x8000, |b| b / 2), Some((4096, 2048)));
        assert_eq!(t.update_bytes(0x9000, |b| b), None);
        assert_eq!(t.remove_with_aux(0x8000), Some((1, 2048, 9)));
    }

    #[test]
    fn reset_forgets() {
        let t = PtrTable::new(4);
        assert!(t.insert(5, 0, 5));
        t.reset();
        assert_eq!(t.remove(5), None);
        assert!(t.insert(5, 0, 6));
        assert_eq!(t.remove(5), Some((0, 6)));
    }
}
