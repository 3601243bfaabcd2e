//! Virtual memory management (`cuMemCreate` and friends): physical memory is
//! charged from `cuMemCreate` until the driver frees it, which is when its
//! handle has been released *and* its last mapping is gone (a mapping keeps
//! the memory alive after `cuMemRelease`, as NVIDIA's vectorAddMMAP sample
//! relies on). So each charged handle carries a reference count in the
//! handle table: one for the handle itself (`cuMemCreate`,
//! `cuMemImportFromShareableHandle`), one more per `cuMemRetainAllocationHandle`
//! and per `cuMemMap`; `cuMemRelease` and `cuMemUnmap` take them away, and
//! the last one gives the charge back. Mappings are remembered by their
//! start address (with their size and handle), so `cuMemUnmap`, which names
//! only an address range, finds the handles it lets go of. The charge goes
//! to the card the memory lives on (`prop.location.id`), whatever the
//! current context; host-located memory (NCCL's proxy buffers) is not device
//! memory and is not charged.
//!
//! Imported handles (`cuMemImportFromShareableHandle`: memory another
//! process, or this one, exported) are charged to the importer, on the card
//! the memory lives on, from their first mapping (the import itself does not
//! say how large the allocation is; the mapping does, as `cuMemMap` maps
//! whole allocations) until the importer's last reference is gone: the
//! importer keeps the memory alive even after the exporter let go of it. An
//! allocation shared between two processes of one container is therefore
//! charged twice while both hold it (over- rather than under-charged).
//!
//! Bookkeeping that lets go of a handle happens before the driver is asked,
//! and is restored if the driver refuses: once the driver frees an
//! allocation, another thread's `cuMemCreate` can get the same handle value
//! back at once. Cost: a few atomic operations in the lock-free tables per
//! call, no locks or system calls.

use crate::cuda_hooks::{current_device, read, refused_foreign, tracked};
use crate::ffi::*;
use crate::hook_table::MemUnmap;
use crate::log::{log, WARN};
use crate::ptr_table::{Dropped, PtrTable};
use crate::state;
use crate::state::real;
use std::ffi::{c_uint, c_void};

/// Mappings one `cuMemUnmap` lets go of before the driver is asked (any
/// further ones are let go of after it succeeds).
const UNMAP_BATCH: usize = 32;

/// The container card a `CUmemAllocationProp` location is, `None` for
/// memory that is not on a card of ours (host, host NUMA node, or an
/// untracked card). `Err` for a card that is not the container's.
fn card_of_location(location_type: c_uint, location_id: i32) -> Result<Option<usize>, CuResult> {
    if location_type != MEM_LOCATION_DEVICE {
        return Ok(None);
    }
    if state::accounting().is_ok_and(|a| a.is_some()) && refused_foreign(location_id) {
        return Err(CUDA_ERROR_INVALID_DEVICE);
    }
    Ok(tracked(location_id))
}

/// # Safety
/// `cuMemCreate`'s contract: `handle` is a valid out-pointer and
/// `prop` null or a valid `CUmemAllocationProp`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemCreate(
    handle: *mut u64,
    bytes: usize,
    prop: *const MemAllocationPropHead,
    flags: u64,
) -> CuResult {
    let real = real!(MemCreate);
    let forward = || {
        // SAFETY: forwarding the caller's arguments, then reading the
        // out-pointer the caller handed the driver.
        unsafe { (real(handle, bytes, prop, flags), read(handle)) }
    };
    if prop.is_null() {
        return forward().0;
    }
    // SAFETY: non-null CUmemAllocationProp from the caller.
    let (location_type, location_id) = unsafe { ((*prop).location_type, (*prop).location_id) };
    let device = match card_of_location(location_type, location_id) {
        Err(rc) => return rc,
        Ok(None) => return forward().0,
        Ok(Some(device)) => device,
    };
    let accounting = match state::accounting() {
        Err(rc) => return rc,
        Ok(None) => return forward().0,
        Ok(Some(a)) => a,
    };
    if accounting.charge(device, bytes as u64).is_err() {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    let (rc, key) = forward();
    if rc != CUDA_SUCCESS {
        accounting.uncharge(device, bytes as u64);
    } else if !accounting
        .handles
        .insert_with_aux(key, device, bytes as u64, 1)
    {
        log!(
            WARN,
            "handle table full: {bytes} bytes of handle {key:#x} stay charged until exit"
        );
    }
    rc
}

/// Undoes a [`PtrTable::drop_ref`] the driver then refused.
fn restore_ref(table: &PtrTable, key: u64, dropped: Dropped) {
    match dropped {
        Dropped::Unknown => {}
        Dropped::Kept => {
            table.add_ref(key);
        }
        Dropped::Last(device, bytes) => {
            table.insert_with_aux(key, device, bytes, 1);
        }
    }
}

/// # Safety
/// None beyond the driver's: the handle is a value.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemRelease(handle: u64) -> CuResult {
    let real = real!(MemRelease);
    let forward = || {
        // SAFETY: forwarding the caller's argument.
        unsafe { real(handle) }
    };
    let accounting = match state::accounting() {
        Err(rc) => return rc,
        Ok(None) => return forward(),
        Ok(Some(a)) => a,
    };
    let dropped = accounting.handles.drop_ref(handle);
    let rc = forward();
    if rc != CUDA_SUCCESS {
        restore_ref(&accounting.handles, handle, dropped);
    } else if let Dropped::Last(device, bytes) = dropped {
        accounting.uncharge(device, bytes);
    }
    rc
}

/// # Safety
/// None beyond the driver's: `cuMemMap` takes no host pointers.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemMap(
    ptr: CuDevicePtr,
    size: usize,
    offset: usize,
    handle: u64,
    flags: u64,
) -> CuResult {
    let real = real!(MemMap);
    // SAFETY: forwarding the caller's arguments.
    let rc = unsafe { real(ptr, size, offset, handle, flags) };
    if rc != CUDA_SUCCESS {
        return rc;
    }
    let Ok(Some(accounting)) = state::accounting() else {
        return rc;
    };
    let Some((device, bytes)) = accounting.handles.get(handle) else {
        return rc; // not charged by us (host memory, untracked card)
    };
    if bytes == 0 {
        // An imported handle's first mapping: now its size is known.
        if accounting.charge(device, size as u64).is_err() {
            if let Some(unmap) = state::cuda().and_then(|d| d.real::<MemUnmap>()) {
                // SAFETY: the driver's cuMemUnmap of the mapping it just made.
                unsafe { unmap(ptr, size) };
            }
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
        if !accounting.handles.set_bytes_from_zero(handle, size as u64) {
            // Another thread's mapping of it charged it first.
            accounting.uncharge(device, size as u64);
        }
    }
    accounting.handles.add_ref(handle);
    if !accounting
        .mappings
        .insert_with_aux(ptr, device, size as u64, handle)
    {
        log!(
            WARN,
            "mapping table full: the memory of handle {handle:#x} stays charged until exit"
        );
    }
    rc
}

/// # Safety
/// None beyond the driver's: `cuMemUnmap` takes no host pointers.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemUnmap(ptr: CuDevicePtr, size: usize) -> CuResult {
    let real = real!(MemUnmap);
    let forward = || {
        // SAFETY: forwarding the caller's arguments.
        unsafe { real(ptr, size) }
    };
    let accounting = match state::accounting() {
        Err(rc) => return rc,
        Ok(None) => return forward(),
        Ok(Some(a)) => a,
    };
    let end = ptr.saturating_add(size as u64);
    // The mappings that start in the range, one after the other.
    let mut batch = [(0u64, 0u64, 0u64, Dropped::Unknown); UNMAP_BATCH];
    let mut taken = 0;
    let mut cursor = ptr;
    while cursor < end && taken < UNMAP_BATCH {
        let Some((_, length, handle)) = accounting.mappings.remove_with_aux(cursor) else {
            break;
        };
        let dropped = accounting.handles.drop_ref(handle);
        batch[taken] = (cursor, length, handle, dropped);
        taken += 1;
        cursor = cursor.saturating_add(length.max(1));
    }
    let rc = forward();
    if rc != CUDA_SUCCESS {
        // Put everything back, in reverse order.
        for &(start, length, handle, dropped) in batch[..taken].iter().rev() {
            restore_ref(&accounting.handles, handle, dropped);
            let device = accounting.handles.get(handle).map_or(0, |(d, _)| d);
            accounting
                .mappings
                .insert_with_aux(start, device, length, handle);
        }
        return rc;
    }
    for &(_, _, _, dropped) in &batch[..taken] {
        if let Dropped::Last(device, bytes) = dropped {
            accounting.uncharge(device, bytes);
        }
    }
    // More mappings than one batch: the driver has already let them go.
    if taken == UNMAP_BATCH {
        while cursor < end {
            let Some((_, length, handle)) = accounting.mappings.remove_with_aux(cursor) else {
                break;
            };
            if let Dropped::Last(device, bytes) = accounting.handles.drop_ref(handle) {
                accounting.uncharge(device, bytes);
            }
            cursor = cursor.saturating_add(length.max(1));
        }
    }
    rc
}

/// # Safety
/// `cuMemRetainAllocationHandle`'s contract: `handle` is a valid
/// out-pointer.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemRetainAllocationHandle(
    handle: *mut u64,
    address: *mut c_void,
) -> CuResult {
    let real = real!(MemRetainAllocationHandle);
    // SAFETY: forwarding the caller's arguments.
    let rc = unsafe { real(handle, address) };
    if rc == CUDA_SUCCESS {
        if let Ok(Some(accounting)) = state::accounting() {
            // The same handle value the memory was mapped with: one more
            // reference, released by one more cuMemRelease.
            // SAFETY: the caller's out-pointer, which the driver just filled.
            accounting.handles.add_ref(unsafe { read(handle) });
        }
    }
    rc
}

/// The card an allocation handle's memory lives on, by the driver's
/// `cuMemGetAllocationPropertiesFromHandle` (the current card when the
/// driver cannot say); `None` when it is not on a card of ours.
fn card_of_handle(handle: u64) -> Option<usize> {
    let properties = state::cuda().and_then(|d| d.allocation_properties);
    let Some(properties) = properties else {
        return current_device();
    };
    let mut prop = MemAllocationProp::default();
    // SAFETY: the driver's cuMemGetAllocationPropertiesFromHandle with a
    // zeroed CUmemAllocationProp-sized (and larger) out-buffer.
    let rc = unsafe { properties(&mut prop, handle) };
    if rc != CUDA_SUCCESS {
        return current_device();
    }
    card_of_location(prop.head.location_type, prop.head.location_id)
        .ok()
        .flatten()
}

/// # Safety
/// `cuMemImportFromShareableHandle`'s contract: `handle` is a valid
/// out-pointer and `os_handle` what the handle type calls for.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemImportFromShareableHandle(
    handle: *mut u64,
    os_handle: *mut c_void,
    handle_type: c_uint,
) -> CuResult {
    let real = real!(MemImportFromShareableHandle);
    // SAFETY: forwarding the caller's arguments.
    let rc = unsafe { real(handle, os_handle, handle_type) };
    if rc != CUDA_SUCCESS {
        return rc;
    }
    let Ok(Some(accounting)) = state::accounting() else {
        return rc;
    };
    // SAFETY: the caller's out-pointer, which the driver just filled.
    let key = unsafe { read(handle) };
    // Our own export imported back may come back as the same handle.
    if accounting.handles.add_ref(key) {
        return rc;
    }
    if let Some(device) = card_of_handle(key) {
        // Charged at its first mapping, when its size is known.
        if !accounting.handles.insert_with_aux(key, device, 0, 1) {
            log!(
                WARN,
                "handle table full: imported handle {key:#x} is not charged"
            );
        }
    }
    rc
}
