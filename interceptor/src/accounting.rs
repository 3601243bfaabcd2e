//! The container's memory account as this process sees it: per-card caps,
//! charging and releasing against the shared region, and what each live
//! allocation was charged (so frees give back exactly that). Also the
//! per-process bookkeeping of context overhead.
//!
//! Hot-path cost: a charge is one compare-and-swap on the card's counter,
//! one fetch-add on this process's slot and one table insert; a release is
//! the mirror image. No locks, system calls or environment reads.

use crate::config::Config;
use crate::log::{log, INFO};
use crate::ptr_table::PtrTable;
use crate::region::{AttachError, Region};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use tessera_api::shared_region::MAX_DEVICES;

/// Bytes the primary context of a card was charged, or [`MEASURING`].
#[derive(Debug, Default)]
pub struct PrimaryContext {
    /// Our count of retains not yet released.
    pub refs: AtomicU32,
    /// Bytes charged for it.
    pub charged: AtomicU64,
}

/// Marks a primary context whose overhead is being measured.
pub const MEASURING: u64 = u64::MAX;

/// See the module documentation.
#[derive(Debug)]
pub struct Accounting {
    region: Region,
    limits: [u64; MAX_DEVICES],
    /// Device pointers from every `cuMemAlloc*` path (freed by `cuMemFree*`).
    pub pointers: PtrTable,
    /// `cuMemCreate` and imported handles, with their reference counts
    /// (see `vmm`).
    pub handles: PtrTable,
    /// `cuMemMap` mappings by start address: size and handle.
    pub mappings: PtrTable,
    /// CUDA arrays.
    pub arrays: PtrTable,
    /// Contexts from `cuCtxCreate*`, charged their measured overhead.
    pub contexts: PtrTable,
    /// Primary contexts per card.
    pub primary: [PrimaryContext; MAX_DEVICES],
    /// Memory pools: the card each lives on (see `extra_hooks`).
    pub pools: PtrTable,
    /// Per card: the pool `cuMemAllocAsync` allocates from (0 = not looked
    /// up yet; `cuDeviceSetMemPool` changes it).
    pub current_pools: [AtomicU64; MAX_DEVICES],
    /// Per card: bytes charged for growing the printf FIFO and the malloc
    /// heap past their sizes (`cuCtxSetLimit`).
    pub limit_charges: [[AtomicU64; 2]; MAX_DEVICES],
}

/// An allocation refused at the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfMemory;

impl Accounting {
    /// Attaches the region named by the configuration and publishes the caps
    /// there for the node agent.
    pub fn attach(config: &Config) -> Result<Accounting, AttachError> {
        let region = Region::attach(config.shared_region.as_deref())?;
        let mut limits = [u64::MAX; MAX_DEVICES];
        for (i, limit) in config.limits.iter().enumerate() {
            if let Some(limit) = *limit {
                limits[i] = limit;
                region.map().devices[i]
                    .limit_bytes
                    .store(limit, Ordering::Relaxed);
            }
        }
        Ok(Accounting {
            region,
            limits,
            pointers: PtrTable::new(20),
            handles: PtrTable::new(16),
            mappings: PtrTable::new(16),
            arrays: PtrTable::new(14),
            contexts: PtrTable::new(10),
            primary: Default::default(),
            pools: PtrTable::new(10),
            current_pools: Default::default(),
            limit_charges: Default::default(),
        })
    }

    /// The cap on card `device`, if it has one.
    #[inline]
    pub fn limit(&self, device: usize) -> Option<u64> {
        self.limits.get(device).copied().filter(|&l| l != u64::MAX)
    }

    /// Whether card `device` is accounted at all (within the region's range).
    #[inline]
    pub fn tracks(device: usize) -> bool {
        device < MAX_DEVICES
    }

    /// Bytes this process has charged on card `device` (0 before its first
    /// charge anywhere).
    pub fn own_usage(&self, device: usize) -> u64 {
        self.region.claimed_slot().map_or(0, |slot| {
            self.region.map().processes[slot].used_bytes[device].load(Ordering::Relaxed)
        })
    }

    /// Bytes the container has charged on card `device`.
    pub fn used(&self, device: usize) -> u64 {
        self.region.map().device_used(device)
    }

    /// Reserves `bytes` on `device` before the driver is asked. Refused at
    /// the cap, after one attempt to recover the usage of dead processes.
    #[inline]
    pub fn charge(&self, device: usize, bytes: u64) -> Result<(), OutOfMemory> {
        let Ok(slot) = self.region.slot() else {
            return Err(OutOfMemory);
        };
        let limit = self.limits[device];
        match self.region.map().charge(slot, device, bytes, limit) {
            Ok(()) => Ok(()),
            Err(_) => self.charge_after_reclaim(slot, device, bytes, limit),
        }
    }

    #[cold]
    fn charge_after_reclaim(
        &self,
        slot: usize,
        device: usize,
        bytes: u64,
        limit: u64,
    ) -> Result<(), OutOfMemory> {
        if self.region.reclaim_dead() > 0
            && self.region.map().charge(slot, device, bytes, limit).is_ok()
        {
            return Ok(());
        }
        // Driver overhead given back since it was last measured.
        if crate::driver_overhead::before_refusing(device)
            && self.region.map().charge(slot, device, bytes, limit).is_ok()
        {
            return Ok(());
        }
        log!(
            INFO,
            "card {device}: refused {bytes} bytes, {} of {limit} in use",
            self.used(device)
        );
        Err(OutOfMemory)
    }

    /// Charges `bytes` the driver already holds (it reserved them without
    /// asking): within the cap when they fit (after recovering the usage of
    /// dead processes), past it otherwise, so the account stays true.
    /// Nothing is refused, so the driver's overhead is not reconciled here.
    /// Returns whether they fit.
    pub fn charge_held(&self, device: usize, bytes: u64) -> bool {
        let Ok(slot) = self.region.slot() else {
            return false;
        };
        let (map, limit) = (self.region.map(), self.limits[device]);
        let fits = map.charge(slot, device, bytes, limit).is_ok()
            || self.region.reclaim_dead() > 0 && map.charge(slot, device, bytes, limit).is_ok();
        if !fits {
            let _ = map.charge(slot, device, bytes, u64::MAX);
        }
        fits
    }

    /// Gives back a charge.
    #[inline]
    pub fn uncharge(&self, device: usize, bytes: u64) {
        if let Ok(slot) = self.region.slot() {
            self.region.map().uncharge(slot, device, bytes);
        }
    }

    /// Records what `key` was charged; if it cannot be recorded the charge
    /// is kept (we could not give it back exactly later) and we say so.
    #[inline]
    pub fn remember(&self, table: &PtrTable, key: u64, device: usize, bytes: u64) {
        if !table.insert(key, device, bytes) {
            log!(
                crate::log::WARN,
                "allocation table full: {bytes} bytes at {key:#x} stay charged until exit"
            );
        }
    }

    /// Hands back the usage of dead processes of the container.
    pub fn reclaim_dead(&self) -> u64 {
        self.region.reclaim_dead()
    }

    /// At exit: give back this process's charges now rather than when the
    /// next process notices it has gone.
    pub fn release_all(&self) {
        if let Some(slot) = self.region.claimed_slot() {
            self.region.map().processes[slot].reclaim(&self.region.map().devices);
        }
    }

    /// In a forked child: nothing the parent charged or allocated is ours.
    pub fn after_fork_in_child(&self) {
        self.region.after_fork_in_child();
        crate::graph_mem::after_fork_in_child();
        crate::lmem::after_fork_in_child();
        crate::driver_overhead::after_fork_in_child();
        for table in [
            &self.pointers,
            &self.handles,
            &self.mappings,
            &self.arrays,
            &self.contexts,
            &self.pools,
        ] {
            table.reset();
        }
        for primary in &self.primary {
            primary.refs.store(0, Ordering::Relaxed);
            primary.charged.store(0, Ordering::Relaxed);
        }
        for pool in &self.current_pools {
            pool.store(0, Ordering::Relaxed);
        }
        for charge in self.limit_charges.iter().flatten() {
            charge.store(0, Ordering::Relaxed);
        }
    }
}
