//! A fake `libcuda.so.1` for the interceptor's CI tests: it simulates cards
//! with memory (no real memory behind the addresses) and the allocation paths
//! the interceptor charges, so real processes can run with the interceptor
//! preloaded on a machine without a GPU.
//!
//! The simulated machine is set by environment variables:
//! `FAKE_CUDA_DEVICES` (cards, default 2), `FAKE_CUDA_TOTAL_MIB` (memory per
//! card, default 16384; a comma list gives each card its own size) and
//! `FAKE_CUDA_CONTEXT_MIB` (what a context costs on its card, default 64)
//! and `FAKE_CUDA_LOAD_MIB` (what loading a function's code costs on its
//! card at the function's first launch in a context, as CUDA 12's lazy
//! loading does; default 0; see [`code`]).
//! Card `p` of the machine has the UUID `GPU-5a5a5a5a-5a5a-5a5a-5a5a-5a5a5a5a5a<p>`
//! (see [`physical_uuid`]). `CUDA_VISIBLE_DEVICES` (physical indices or
//! UUIDs, comma-separated) narrows and renumbers the cards as the real
//! driver does; the fake NVML ignores it, as real NVML does. Peer access
//! (`cuDeviceCanAccessPeer`, `cuCtxEnablePeerAccess`) is possible between
//! any two distinct cards.
//!
//! `cuGetProcAddress` answers with *internal* function addresses, distinct
//! from the exported symbols (as a real driver may), honours the requested
//! version (`cuMemAlloc` below 3.2 is the legacy 32-bit entry point) and the
//! per-thread-default-stream flag (`_ptsz` variants, counted by
//! `fake_cuda_ptsz_calls`). Virtual memory management is modelled as the
//! driver behaves (see [`vmm`]): physical memory lives until its handles are
//! released and its mappings are gone. [`extras`] models mipmapped arrays
//! (each level padded to 2 MiB, which `cuMipmappedArrayGetMemoryRequirements`
//! reports), `cuCtxSetLimit` (the malloc heap and printf FIFO take card
//! memory) and memory pools (`cuMemPoolCreate`, default pools) that live on
//! a card of their own and keep freed memory reserved up to their release
//! threshold (`cuMemAllocAsync` allocates from the current card's default
//! pool). `fake_cuda_device_used` lets the fake NVML and the
//! tests see the card's real usage.
#![allow(clippy::missing_safety_doc)] // C ABI entry points; contracts are the CUDA driver API's.
#![allow(non_snake_case)]

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

type CUresult = c_int;
const SUCCESS: CUresult = 0;
const INVALID_VALUE: CUresult = 1;
const OUT_OF_MEMORY: CUresult = 2;
const NOT_INITIALIZED: CUresult = 3;
const INVALID_DEVICE: CUresult = 101;
const INVALID_CONTEXT: CUresult = 201;
const NOT_FOUND: CUresult = 500;

const PER_THREAD_FLAG: u64 = 2;
const MIB: u64 = 1 << 20;

struct Card {
    /// Index on the machine (what NVML numbers it).
    physical: usize,
    total: u64,
    used: u64,
    primary_refs: u32,
}

struct Driver {
    cards: Vec<Card>,
    context_bytes: u64,
    /// Device pointers, generic handles and arrays: id -> (card, bytes).
    allocations: HashMap<u64, (usize, u64)>,
    next_id: u64,
    /// Context handle -> card.
    contexts: HashMap<u64, usize>,
    /// (context, peer context) pairs with peer access enabled.
    peers: std::collections::HashSet<(u64, u64)>,
    /// Virtual memory management (see [`vmm`]).
    vmm: vmm::Vmm,
    /// Memory pools (`cuMemPoolCreate`, default pools).
    pools: HashMap<u64, extras::Pool>,
    /// Allocation id -> the pool it came from.
    pool_of: HashMap<u64, u64>,
    /// Per context: printf FIFO and malloc heap sizes (`cuCtxSetLimit`).
    limits: HashMap<u64, [u64; 2]>,
    /// Graphs and their memory (see [`graphs`]).
    graphs: graphs::Graphs,
    /// Function code loaded at first launches (see [`code`]).
    code: code::Code,
}

static DRIVER: Mutex<Option<Driver>> = Mutex::new(None);
static PTSZ_CALLS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static CURRENT: Cell<u64> = const { Cell::new(0) };
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Memory of physical card `p`: `FAKE_CUDA_TOTAL_MIB` is one size for all
/// cards or a comma list, one size per card (the last repeats).
fn physical_total(p: usize) -> u64 {
    let text = std::env::var("FAKE_CUDA_TOTAL_MIB").unwrap_or_default();
    let sizes: Vec<u64> = text
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    sizes.get(p).or(sizes.last()).copied().unwrap_or(16384) * MIB
}

/// UUID bytes of physical card `p` (the fake NVML derives the same).
pub fn physical_uuid(p: usize) -> [u8; 16] {
    let mut bytes = [0x5au8; 16];
    bytes[15] = p as u8;
    bytes
}

fn uuid_text(bytes: &[u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The physical cards CUDA shows, in ordinal order: all of them, or those
/// `CUDA_VISIBLE_DEVICES` names (indices or UUIDs; enumeration stops at the
/// first entry that names no card, as with the real driver).
fn visible_physical_cards() -> Vec<usize> {
    let count = env_u64("FAKE_CUDA_DEVICES", 2) as usize;
    let Ok(list) = std::env::var("CUDA_VISIBLE_DEVICES") else {
        return (0..count).collect();
    };
    let mut cards = Vec::new();
    for entry in list.split(',').map(str::trim) {
        let found = entry
            .parse::<usize>()
            .ok()
            .filter(|&p| p < count)
            .or_else(|| {
                (0..count).find(|&p| uuid_text(&physical_uuid(p)).eq_ignore_ascii_case(entry))
            });
        match found {
            Some(p) if !cards.contains(&p) => cards.push(p),
            _ => break,
        }
    }
    cards
}

fn primary_handle(device: usize) -> u64 {
    0x1000 + device as u64
}

fn with_driver<R>(f: impl FnOnce(&mut Driver) -> Result<R, CUresult>) -> Result<R, CUresult> {
    let mut guard = DRIVER.lock().unwrap_or_else(|e| e.into_inner());
    match guard.as_mut() {
        Some(driver) => f(driver),
        None => Err(NOT_INITIALIZED),
    }
}

fn status(result: Result<(), CUresult>) -> CUresult {
    result.err().unwrap_or(SUCCESS)
}

impl Driver {
    fn current_card(&self) -> Result<usize, CUresult> {
        let ctx = CURRENT.with(Cell::get);
        self.contexts.get(&ctx).copied().ok_or(INVALID_CONTEXT)
    }

    fn card(&mut self, device: c_int) -> Result<&mut Card, CUresult> {
        usize::try_from(device)
            .ok()
            .and_then(|d| self.cards.get_mut(d))
            .ok_or(INVALID_DEVICE)
    }

    fn allocate(&mut self, card: usize, bytes: u64) -> Result<u64, CUresult> {
        if bytes == 0 {
            return Err(INVALID_VALUE);
        }
        let c = self.cards.get_mut(card).ok_or(INVALID_DEVICE)?;
        if c.used + bytes > c.total {
            return Err(OUT_OF_MEMORY);
        }
        c.used += bytes;
        // Addresses 2 MiB apart at least, like the real driver's granularity.
        let id = self.next_id;
        self.next_id += bytes.div_ceil(2 * MIB).max(1) * 2 * MIB;
        self.allocations.insert(id, (card, bytes));
        Ok(id)
    }

    fn free(&mut self, id: u64) -> Result<(), CUresult> {
        let (card, bytes) = self.allocations.remove(&id).ok_or(INVALID_VALUE)?;
        match self.pool_of.remove(&id) {
            Some(pool) => self.free_into_pool(pool, bytes),
            None => self.cards[card].used -= bytes,
        }
        Ok(())
    }

    fn charge_context(&mut self, card: usize) -> Result<(), CUresult> {
        let bytes = self.context_bytes;
        let c = &mut self.cards[card];
        if c.used + bytes > c.total {
            return Err(OUT_OF_MEMORY);
        }
        c.used += bytes;
        Ok(())
    }
}

/// Bytes in use on physical card `device` (allocations and contexts), for
/// the fake NVML, which numbers cards physically.
#[no_mangle]
pub extern "C" fn fake_cuda_device_used(device: c_uint) -> u64 {
    with_driver(|d| {
        Ok(d.cards
            .iter()
            .find(|c| c.physical == device as usize)
            .map_or(0, |c| c.used))
    })
    .unwrap_or(0)
}

/// Size of physical card `device` (also before `cuInit`), for the fake NVML.
#[no_mangle]
pub extern "C" fn fake_cuda_device_total(device: c_uint) -> u64 {
    if (device as u64) < env_u64("FAKE_CUDA_DEVICES", 2) {
        physical_total(device as usize)
    } else {
        0
    }
}

/// Calls that came in through a per-thread-default-stream (`_ptsz`) entry point.
#[no_mangle]
pub extern "C" fn fake_cuda_ptsz_calls() -> u64 {
    PTSZ_CALLS.load(Ordering::Relaxed)
}

#[no_mangle]
pub extern "C" fn cuInit(_flags: c_uint) -> CUresult {
    let mut guard = DRIVER.lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        *guard = Some(Driver {
            cards: visible_physical_cards()
                .into_iter()
                .map(|physical| Card {
                    physical,
                    total: physical_total(physical),
                    used: 0,
                    primary_refs: 0,
                })
                .collect(),
            context_bytes: env_u64("FAKE_CUDA_CONTEXT_MIB", 64) * MIB,
            allocations: HashMap::new(),
            next_id: 0x7f00_0000_0000,
            contexts: HashMap::new(),
            peers: std::collections::HashSet::new(),
            vmm: vmm::Vmm::default(),
            pools: HashMap::new(),
            pool_of: HashMap::new(),
            limits: HashMap::new(),
            graphs: graphs::Graphs::default(),
            code: code::Code::new(env_u64("FAKE_CUDA_LOAD_MIB", 0) * MIB),
        });
    }
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    if version.is_null() {
        return INVALID_VALUE;
    }
    unsafe { *version = 12080 };
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    status(with_driver(|d| {
        unsafe { *count = d.cards.len() as c_int };
        Ok(())
    }))
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(device: *mut c_int, ordinal: c_int) -> CUresult {
    status(with_driver(|d| {
        d.card(ordinal)?;
        unsafe { *device = ordinal };
        Ok(())
    }))
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut u8, device: c_int) -> CUresult {
    status(with_driver(|d| {
        let bytes = physical_uuid(d.card(device)?.physical);
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), uuid, 16) };
        Ok(())
    }))
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut u8, device: c_int) -> CUresult {
    unsafe { cuDeviceGetUuid(uuid, device) }
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, device: c_int) -> CUresult {
    status(with_driver(|d| {
        let total = d.card(device)?.total;
        unsafe { *bytes = total as usize };
        Ok(())
    }))
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut u64, device: c_int) -> CUresult {
    status(with_driver(|d| {
        let card = d.card(device)?;
        if card.primary_refs == 0 {
            d.charge_context(device as usize)?;
        }
        d.card(device)?.primary_refs += 1;
        let handle = primary_handle(device as usize);
        d.contexts.insert(handle, device as usize);
        unsafe { *ctx = handle };
        Ok(())
    }))
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(device: c_int) -> CUresult {
    status(with_driver(|d| {
        let bytes = d.context_bytes;
        let card = d.card(device)?;
        if card.primary_refs == 0 {
            return Err(INVALID_CONTEXT);
        }
        card.primary_refs -= 1;
        if card.primary_refs == 0 {
            card.used -= bytes;
            d.contexts.remove(&primary_handle(device as usize));
        }
        Ok(())
    }))
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxReset_v2(device: c_int) -> CUresult {
    status(with_driver(|d| {
        let bytes = d.context_bytes;
        let card = d.card(device)?;
        if card.primary_refs > 0 {
            card.primary_refs = 0;
            card.used -= bytes;
            d.contexts.remove(&primary_handle(device as usize));
        }
        Ok(())
    }))
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v2(ctx: *mut u64, _flags: c_uint, device: c_int) -> CUresult {
    status(with_driver(|d| {
        d.card(device)?;
        d.charge_context(device as usize)?;
        let handle = 0x2000 + d.next_id;
        d.next_id += 2 * MIB;
        d.contexts.insert(handle, device as usize);
        CURRENT.with(|c| c.set(handle));
        unsafe { *ctx = handle };
        Ok(())
    }))
}

#[no_mangle]
pub extern "C" fn cuCtxDestroy_v2(ctx: u64) -> CUresult {
    status(with_driver(|d| {
        if ctx < 0x2000 {
            return Err(INVALID_CONTEXT);
        }
        let card = d.contexts.remove(&ctx).ok_or(INVALID_CONTEXT)?;
        d.cards[card].used -= d.context_bytes;
        CURRENT.with(|c| {
            if c.get() == ctx {
                c.set(0)
            }
        });
        Ok(())
    }))
}

#[no_mangle]
pub extern "C" fn cuCtxSetCurrent(ctx: u64) -> CUresult {
    status(with_driver(|d| {
        if ctx != 0 && !d.contexts.contains_key(&ctx) {
            return Err(INVALID_CONTEXT);
        }
        CURRENT.with(|c| c.set(ctx));
        Ok(())
    }))
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(ctx: *mut u64) -> CUresult {
    unsafe { *ctx = CURRENT.with(Cell::get) };
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(device: *mut c_int) -> CUresult {
    status(with_driver(|d| {
        let card = d.current_card()?;
        unsafe { *device = card as c_int };
        Ok(())
    }))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    status(with_driver(|d| {
        let card = &d.cards[d.current_card()?];
        unsafe {
            *free = (card.total - card.used) as usize;
            *total = card.total as usize;
        }
        Ok(())
    }))
}

fn alloc_on_current(out: *mut u64, bytes: u64) -> CUresult {
    if out.is_null() {
        return INVALID_VALUE;
    }
    status(with_driver(|d| {
        let card = d.current_card()?;
        let ptr = d.allocate(card, bytes)?;
        unsafe { *out = ptr };
        Ok(())
    }))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut u64, bytes: usize) -> CUresult {
    alloc_on_current(dptr, bytes as u64)
}

/// The legacy 32-bit entry point (`cuMemAlloc` before CUDA 3.2): refused.
#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc(_dptr: *mut u32, _bytes: c_uint) -> CUresult {
    INVALID_VALUE
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocPitch_v2(
    dptr: *mut u64,
    pitch: *mut usize,
    width: usize,
    height: usize,
    _elem: c_uint,
) -> CUresult {
    let row = width.div_ceil(512) * 512;
    let rc = alloc_on_current(dptr, (row * height) as u64);
    if rc == SUCCESS {
        unsafe { *pitch = row };
    }
    rc
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocManaged(
    dptr: *mut u64,
    bytes: usize,
    _flags: c_uint,
) -> CUresult {
    alloc_on_current(dptr, bytes as u64)
}

#[no_mangle]
pub extern "C" fn cuMemFree_v2(dptr: u64) -> CUresult {
    status(with_driver(|d| d.free(dptr)))
}

/// From the current card's default pool (the fake has no `cuDeviceSetMemPool`).
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync(
    dptr: *mut u64,
    bytes: usize,
    _stream: *mut c_void,
) -> CUresult {
    alloc_from_pool(dptr, bytes as u64, std::ptr::null_mut())
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync_ptsz(
    dptr: *mut u64,
    bytes: usize,
    _stream: *mut c_void,
) -> CUresult {
    PTSZ_CALLS.fetch_add(1, Ordering::Relaxed);
    alloc_from_pool(dptr, bytes as u64, std::ptr::null_mut())
}

/// From `pool` (a pool made by `cuMemPoolCreate` or a card's default pool),
/// or the current card's default pool when `pool` is null.
fn alloc_from_pool(out: *mut u64, bytes: u64, pool: *mut c_void) -> CUresult {
    if out.is_null() {
        return INVALID_VALUE;
    }
    let pool = if pool.is_null() {
        match with_driver(|d| d.current_card()) {
            Ok(card) => extras::default_pool(card) as *mut c_void,
            Err(rc) => return rc,
        }
    } else {
        pool
    };
    status(with_driver(|d| {
        let ptr = d.allocate_in_pool(pool as u64, bytes)?;
        unsafe { *out = ptr };
        Ok(())
    }))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync(
    dptr: *mut u64,
    bytes: usize,
    pool: *mut c_void,
    _stream: *mut c_void,
) -> CUresult {
    alloc_from_pool(dptr, bytes as u64, pool)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync_ptsz(
    dptr: *mut u64,
    bytes: usize,
    pool: *mut c_void,
    _stream: *mut c_void,
) -> CUresult {
    PTSZ_CALLS.fetch_add(1, Ordering::Relaxed);
    alloc_from_pool(dptr, bytes as u64, pool)
}

#[no_mangle]
pub extern "C" fn cuMemFreeAsync(dptr: u64, _stream: *mut c_void) -> CUresult {
    cuMemFree_v2(dptr)
}

#[no_mangle]
pub extern "C" fn cuMemFreeAsync_ptsz(dptr: u64, _stream: *mut c_void) -> CUresult {
    PTSZ_CALLS.fetch_add(1, Ordering::Relaxed);
    cuMemFree_v2(dptr)
}

fn format_bytes(format: c_uint) -> u64 {
    match format {
        0x01 | 0x08 => 1,
        0x02 | 0x09 | 0x10 => 2,
        _ => 4,
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuArrayCreate_v2(array: *mut u64, desc: *const usize) -> CUresult {
    // CUDA_ARRAY_DESCRIPTOR: Width, Height (size_t), Format, NumChannels (uint).
    let (w, h) = unsafe { (*desc, *desc.add(1)) };
    let tail = unsafe { desc.add(2) as *const c_uint };
    let (format, channels) = unsafe { (*tail, *tail.add(1)) };
    let bytes = w as u64 * h.max(1) as u64 * format_bytes(format) * channels as u64;
    alloc_on_current(array, bytes)
}

#[no_mangle]
pub unsafe extern "C" fn cuArray3DCreate_v2(array: *mut u64, desc: *const usize) -> CUresult {
    let (w, h, depth) = unsafe { (*desc, *desc.add(1), *desc.add(2)) };
    let tail = unsafe { desc.add(3) as *const c_uint };
    let (format, channels) = unsafe { (*tail, *tail.add(1)) };
    let bytes =
        w as u64 * h.max(1) as u64 * depth.max(1) as u64 * format_bytes(format) * channels as u64;
    alloc_on_current(array, bytes)
}

#[no_mangle]
pub extern "C" fn cuArrayDestroy(array: u64) -> CUresult {
    cuMemFree_v2(array)
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceCanAccessPeer(
    can: *mut c_int,
    device: c_int,
    peer: c_int,
) -> CUresult {
    if can.is_null() {
        return INVALID_VALUE;
    }
    status(with_driver(|d| {
        d.card(device)?;
        d.card(peer)?;
        unsafe { *can = c_int::from(device != peer) };
        Ok(())
    }))
}

/// `CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED`.
const PEER_ACCESS_ALREADY_ENABLED: CUresult = 704;
/// `CUDA_ERROR_PEER_ACCESS_UNSUPPORTED`.
const PEER_ACCESS_UNSUPPORTED: CUresult = 217;

#[no_mangle]
pub extern "C" fn cuCtxEnablePeerAccess(peer: u64, _flags: c_uint) -> CUresult {
    status(with_driver(|d| {
        let current = CURRENT.with(Cell::get);
        let own = d.current_card()?;
        let other = *d.contexts.get(&peer).ok_or(INVALID_CONTEXT)?;
        if own == other {
            return Err(PEER_ACCESS_UNSUPPORTED);
        }
        if !d.peers.insert((current, peer)) {
            return Err(PEER_ACCESS_ALREADY_ENABLED);
        }
        Ok(())
    }))
}

/// Internal entry points handed out by `cuGetProcAddress`: same behaviour as
/// the exports, different addresses.
mod internal {
    use super::*;

    pub extern "C" fn init(flags: c_uint) -> CUresult {
        cuInit(flags)
    }
    pub unsafe extern "C" fn mem_alloc(dptr: *mut u64, bytes: usize) -> CUresult {
        unsafe { cuMemAlloc_v2(dptr, bytes) }
    }
    pub extern "C" fn mem_free(dptr: u64) -> CUresult {
        cuMemFree_v2(dptr)
    }
    pub unsafe extern "C" fn mem_get_info(free: *mut usize, total: *mut usize) -> CUresult {
        unsafe { cuMemGetInfo_v2(free, total) }
    }
    pub unsafe extern "C" fn total_mem(bytes: *mut usize, device: c_int) -> CUresult {
        unsafe { cuDeviceTotalMem_v2(bytes, device) }
    }
    pub unsafe extern "C" fn alloc_async(dptr: *mut u64, bytes: usize, s: *mut c_void) -> CUresult {
        unsafe { cuMemAllocAsync(dptr, bytes, s) }
    }
    pub unsafe extern "C" fn alloc_async_ptsz(
        dptr: *mut u64,
        bytes: usize,
        s: *mut c_void,
    ) -> CUresult {
        unsafe { cuMemAllocAsync_ptsz(dptr, bytes, s) }
    }
    pub extern "C" fn free_async(dptr: u64, s: *mut c_void) -> CUresult {
        cuMemFreeAsync(dptr, s)
    }
    pub extern "C" fn free_async_ptsz(dptr: u64, s: *mut c_void) -> CUresult {
        cuMemFreeAsync_ptsz(dptr, s)
    }
    pub unsafe extern "C" fn retain(ctx: *mut u64, device: c_int) -> CUresult {
        unsafe { cuDevicePrimaryCtxRetain(ctx, device) }
    }
}

fn proc_address(name: &[u8], version: c_int, flags: u64) -> Option<*mut c_void> {
    let per_thread = flags & PER_THREAD_FLAG != 0;
    let f: *mut c_void = match name {
        b"cuInit" => internal::init as *mut c_void,
        b"cuGetProcAddress" if version >= 12000 => cuGetProcAddress_v2 as *mut c_void,
        b"cuGetProcAddress" => cuGetProcAddress as *mut c_void,
        b"cuMemAlloc" if version < 3020 => cuMemAlloc as *mut c_void,
        b"cuMemAlloc" => internal::mem_alloc as *mut c_void,
        b"cuMemFree" if version >= 3020 => internal::mem_free as *mut c_void,
        b"cuMemGetInfo" if version >= 3020 => internal::mem_get_info as *mut c_void,
        b"cuDeviceTotalMem" if version >= 3020 => internal::total_mem as *mut c_void,
        b"cuMemAllocAsync" if per_thread => internal::alloc_async_ptsz as *mut c_void,
        b"cuMemAllocAsync" => internal::alloc_async as *mut c_void,
        b"cuMemFreeAsync" if per_thread => internal::free_async_ptsz as *mut c_void,
        b"cuMemFreeAsync" => internal::free_async as *mut c_void,
        b"cuMemAllocFromPoolAsync" if per_thread => cuMemAllocFromPoolAsync_ptsz as *mut c_void,
        b"cuMemAllocFromPoolAsync" => cuMemAllocFromPoolAsync as *mut c_void,
        b"cuDevicePrimaryCtxRetain" => internal::retain as *mut c_void,
        b"cuDevicePrimaryCtxRelease" => cuDevicePrimaryCtxRelease_v2 as *mut c_void,
        b"cuDevicePrimaryCtxReset" => cuDevicePrimaryCtxReset_v2 as *mut c_void,
        b"cuMemAllocPitch" => cuMemAllocPitch_v2 as *mut c_void,
        b"cuMemAllocManaged" => cuMemAllocManaged as *mut c_void,
        b"cuMemCreate" => vmm::cuMemCreate as *mut c_void,
        b"cuMemRelease" => vmm::cuMemRelease as *mut c_void,
        b"cuMemMap" => vmm::cuMemMap as *mut c_void,
        b"cuMemUnmap" => vmm::cuMemUnmap as *mut c_void,
        b"cuMemSetAccess" => vmm::cuMemSetAccess as *mut c_void,
        b"cuMemAddressReserve" => vmm::cuMemAddressReserve as *mut c_void,
        b"cuMemAddressFree" => vmm::cuMemAddressFree as *mut c_void,
        b"cuMemRetainAllocationHandle" => vmm::cuMemRetainAllocationHandle as *mut c_void,
        b"cuMemExportToShareableHandle" => vmm::cuMemExportToShareableHandle as *mut c_void,
        b"cuMemImportFromShareableHandle" => vmm::cuMemImportFromShareableHandle as *mut c_void,
        b"cuMipmappedArrayCreate" => extras::cuMipmappedArrayCreate as *mut c_void,
        b"cuMipmappedArrayDestroy" => extras::cuMipmappedArrayDestroy as *mut c_void,
        b"cuMipmappedArrayGetMemoryRequirements" => {
            extras::cuMipmappedArrayGetMemoryRequirements as *mut c_void
        }
        b"cuCtxSetLimit" => extras::cuCtxSetLimit as *mut c_void,
        b"cuCtxGetLimit" => extras::cuCtxGetLimit as *mut c_void,
        b"cuFuncGetAttribute" => lmem::cuFuncGetAttribute as *mut c_void,
        b"cuKernelGetAttribute" => lmem::cuKernelGetAttribute as *mut c_void,
        b"cuDeviceGetAttribute" => lmem::cuDeviceGetAttribute as *mut c_void,
        b"cuMemPoolCreate" => extras::cuMemPoolCreate as *mut c_void,
        b"cuMemPoolDestroy" => extras::cuMemPoolDestroy as *mut c_void,
        b"cuMemPoolSetAttribute" => extras::cuMemPoolSetAttribute as *mut c_void,
        b"cuGraphCreate" => graphs::cuGraphCreate as *mut c_void,
        b"cuGraphAddMemAllocNode" => graphs::cuGraphAddMemAllocNode as *mut c_void,
        b"cuGraphInstantiateWithFlags" => graphs::cuGraphInstantiateWithFlags as *mut c_void,
        b"cuGraphExecDestroy" => graphs::cuGraphExecDestroy as *mut c_void,
        b"cuGraphDestroy" => graphs::cuGraphDestroy as *mut c_void,
        b"cuDeviceGraphMemTrim" => graphs::cuDeviceGraphMemTrim as *mut c_void,
        b"cuDeviceGetGraphMemAttribute" => graphs::cuDeviceGetGraphMemAttribute as *mut c_void,
        b"cuMemPoolGetAttribute" => extras::cuMemPoolGetAttribute as *mut c_void,
        b"cuMemPoolTrimTo" => extras::cuMemPoolTrimTo as *mut c_void,
        b"cuDeviceGetDefaultMemPool" => extras::cuDeviceGetDefaultMemPool as *mut c_void,
        b"cuDeviceGetMemPool" => extras::cuDeviceGetMemPool as *mut c_void,
        b"cuMemGetAllocationPropertiesFromHandle" => {
            vmm::cuMemGetAllocationPropertiesFromHandle as *mut c_void
        }
        b"cuArrayCreate" => cuArrayCreate_v2 as *mut c_void,
        b"cuArray3DCreate" => cuArray3DCreate_v2 as *mut c_void,
        b"cuArrayDestroy" => cuArrayDestroy as *mut c_void,
        b"cuCtxCreate" => cuCtxCreate_v2 as *mut c_void,
        b"cuCtxDestroy" => cuCtxDestroy_v2 as *mut c_void,
        b"cuCtxSetCurrent" => cuCtxSetCurrent as *mut c_void,
        b"cuCtxGetCurrent" => cuCtxGetCurrent as *mut c_void,
        b"cuCtxGetDevice" => cuCtxGetDevice as *mut c_void,
        b"cuDeviceGet" => cuDeviceGet as *mut c_void,
        b"cuDeviceGetCount" => cuDeviceGetCount as *mut c_void,
        b"cuDeviceGetUuid" => cuDeviceGetUuid_v2 as *mut c_void,
        b"cuDriverGetVersion" => cuDriverGetVersion as *mut c_void,
        b"cuLaunchKernel" if per_thread => launch::cuLaunchKernel_ptsz as *mut c_void,
        b"cuLaunchKernel" => launch::cuLaunchKernel as *mut c_void,
        b"cuLaunchCooperativeKernel" if per_thread => {
            launch::cuLaunchCooperativeKernel_ptsz as *mut c_void
        }
        b"cuLaunchCooperativeKernel" => launch::cuLaunchCooperativeKernel as *mut c_void,
        b"cuLaunchKernelEx" if per_thread => launch::cuLaunchKernelEx_ptsz as *mut c_void,
        b"cuLaunchKernelEx" => launch::cuLaunchKernelEx as *mut c_void,
        b"cuGraphLaunch" if per_thread => launch::cuGraphLaunch_ptsz as *mut c_void,
        b"cuGraphLaunch" => launch::cuGraphLaunch as *mut c_void,
        b"cuDeviceCanAccessPeer" => cuDeviceCanAccessPeer as *mut c_void,
        b"cuCtxEnablePeerAccess" => cuCtxEnablePeerAccess as *mut c_void,
        _ => return None,
    };
    Some(f)
}

#[no_mangle]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
    found: *mut c_int,
) -> CUresult {
    if symbol.is_null() || pfn.is_null() {
        return INVALID_VALUE;
    }
    let name = unsafe { CStr::from_ptr(symbol) }.to_bytes();
    let result = proc_address(name, version, flags);
    unsafe {
        *pfn = result.unwrap_or(std::ptr::null_mut());
        if !found.is_null() {
            *found = if result.is_some() { 0 } else { 1 };
        }
    }
    if result.is_some() {
        SUCCESS
    } else {
        NOT_FOUND
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
) -> CUresult {
    unsafe { cuGetProcAddress_v2(symbol, pfn, version, flags, std::ptr::null_mut()) }
}

/// Kernel launches: nothing runs; each launch needs a current context and
/// is counted, with its threads (`fake_cuda_launches`,
/// `fake_cuda_launched_threads`). A graph launch counts as one launch of
/// zero threads.
pub mod launch {
    use super::*;

    static LAUNCHES: AtomicU64 = AtomicU64::new(0);
    static THREADS: AtomicU64 = AtomicU64::new(0);

    /// Launches that reached the fake driver.
    #[no_mangle]
    pub extern "C" fn fake_cuda_launches() -> u64 {
        LAUNCHES.load(Ordering::Relaxed)
    }

    /// Threads (blocks × threads per block) of all launches.
    #[no_mangle]
    pub extern "C" fn fake_cuda_launched_threads() -> u64 {
        THREADS.load(Ordering::Relaxed)
    }

    fn launched(f: *mut c_void, grid: [c_uint; 3], block: [c_uint; 3]) -> CUresult {
        status(with_driver(|d| {
            d.current_card()?;
            lmem::reserve_for_launch(d, f)?;
            code::load_at_first_launch(d, f)?;
            let n = |v: [c_uint; 3]| v.iter().map(|&x| u64::from(x)).product::<u64>();
            LAUNCHES.fetch_add(1, Ordering::Relaxed);
            THREADS.fetch_add(n(grid) * n(block), Ordering::Relaxed);
            Ok(())
        }))
    }

    /// A launch taking the grid and block shape as arguments: `f`, grid,
    /// block, shared bytes, stream, kernel parameters, then `$tail`.
    /// `ptsz` variants count their calls first; they never go through the
    /// exported plain name, which the preloaded hook would interpose.
    macro_rules! grid_launch {
        ($name:ident, ptsz = $ptsz:expr $(, $tail:ident: $tail_ty:ty)*) => {
            #[no_mangle]
            pub extern "C" fn $name(
                f: *mut c_void,
                gx: c_uint,
                gy: c_uint,
                gz: c_uint,
                bx: c_uint,
                by: c_uint,
                bz: c_uint,
                _shared: c_uint,
                _stream: *mut c_void,
                _params: *mut *mut c_void,
                $($tail: $tail_ty,)*
            ) -> CUresult {
                if $ptsz {
                    PTSZ_CALLS.fetch_add(1, Ordering::Relaxed);
                }
                launched(f, [gx, gy, gz], [bx, by, bz])
            }
        };
    }

    grid_launch!(cuLaunchKernel, ptsz = false, _extra: *mut *mut c_void);
    grid_launch!(cuLaunchKernel_ptsz, ptsz = true, _extra: *mut *mut c_void);
    grid_launch!(cuLaunchCooperativeKernel, ptsz = false);
    grid_launch!(cuLaunchCooperativeKernel_ptsz, ptsz = true);

    /// The head of `CUlaunchConfig`.
    #[repr(C)]
    #[derive(Debug)]
    pub struct LaunchConfig {
        grid: [c_uint; 3],
        block: [c_uint; 3],
        shared: c_uint,
        stream: *mut c_void,
        attrs: *mut c_void,
        num_attrs: c_uint,
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuLaunchKernelEx(
        config: *const LaunchConfig,
        f: *mut c_void,
        _params: *mut *mut c_void,
        _extra: *mut *mut c_void,
    ) -> CUresult {
        if config.is_null() {
            return INVALID_VALUE;
        }
        let c = unsafe { &*config };
        launched(f, c.grid, c.block)
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuLaunchKernelEx_ptsz(
        config: *const LaunchConfig,
        f: *mut c_void,
        params: *mut *mut c_void,
        extra: *mut *mut c_void,
    ) -> CUresult {
        let _ = (f, params, extra);
        if config.is_null() {
            return INVALID_VALUE;
        }
        PTSZ_CALLS.fetch_add(1, Ordering::Relaxed);
        let c = unsafe { &*config };
        launched(f, c.grid, c.block)
    }

    /// A graph launch also reserves the graph's allocation nodes' memory
    /// (see [`graphs`]).
    #[no_mangle]
    pub extern "C" fn cuGraphLaunch(exec: *mut c_void, _stream: *mut c_void) -> CUresult {
        match graphs::reserve_for_launch(exec as u64) {
            SUCCESS => launched(std::ptr::null_mut(), [0, 1, 1], [1, 1, 1]),
            rc => rc,
        }
    }

    #[no_mangle]
    pub extern "C" fn cuGraphLaunch_ptsz(exec: *mut c_void, stream: *mut c_void) -> CUresult {
        let _ = stream;
        PTSZ_CALLS.fetch_add(1, Ordering::Relaxed);
        match graphs::reserve_for_launch(exec as u64) {
            SUCCESS => launched(std::ptr::null_mut(), [0, 1, 1], [1, 1, 1]),
            rc => rc,
        }
    }
}

/// Virtual memory management as the driver behaves: a physical allocation
/// (`cuMemCreate`) lives while any handle to it is unreleased or any
/// mapping of it remains; `cuMemRetainAllocationHandle` hands out the same
/// handle value again with one more reference; an export's "file
/// descriptor" is the allocation's id, and importing it makes a new handle
/// to the same allocation. Host-located allocations use no card memory.
pub mod vmm {
    use super::*;

    /// One physical allocation.
    #[derive(Debug)]
    struct Physical {
        card: Option<usize>,
        bytes: u64,
        /// Handle references plus mappings.
        holders: u32,
    }

    /// One handle: its allocation and how many releases it takes.
    #[derive(Debug)]
    struct Handle {
        physical: u64,
        refs: u32,
    }

    /// The VMM state of the fake driver.
    #[derive(Debug, Default)]
    pub struct Vmm {
        physical: HashMap<u64, Physical>,
        handles: HashMap<u64, Handle>,
        /// Mapping start -> (handle, physical, size).
        mappings: std::collections::BTreeMap<u64, (u64, u64, u64)>,
    }

    const LOCATION_DEVICE: c_uint = 1;

    /// `CUmemAllocationProp` up to the location, which is all the fake reads.
    #[repr(C)]
    struct PropHead {
        kind: c_uint,
        handle_types: c_uint,
        location_type: c_uint,
        location_id: c_int,
    }

    impl Driver {
        fn vmm_drop_holder(&mut self, physical: u64) {
            let Some(p) = self.vmm.physical.get_mut(&physical) else {
                return;
            };
            p.holders -= 1;
            if p.holders == 0 {
                let p = self.vmm.physical.remove(&physical).expect("present");
                if let Some(card) = p.card {
                    self.cards[card].used -= p.bytes;
                }
            }
        }

        fn vmm_new_handle(&mut self, physical: u64) -> u64 {
            let id = self.next_id;
            self.next_id += 2 * MIB;
            self.vmm.handles.insert(id, Handle { physical, refs: 1 });
            self.vmm
                .physical
                .get_mut(&physical)
                .expect("present")
                .holders += 1;
            id
        }
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuMemCreate(
        handle: *mut u64,
        bytes: usize,
        prop: *const c_void,
        _flags: u64,
    ) -> CUresult {
        if prop.is_null()
            || handle.is_null()
            || bytes == 0
            || !(bytes as u64).is_multiple_of(2 * MIB)
        {
            return INVALID_VALUE;
        }
        let prop = unsafe { &*(prop as *const PropHead) };
        status(with_driver(|d| {
            let card = if prop.location_type == LOCATION_DEVICE {
                let c = d.card(prop.location_id)?;
                if c.used + bytes as u64 > c.total {
                    return Err(OUT_OF_MEMORY);
                }
                c.used += bytes as u64;
                Some(prop.location_id as usize)
            } else {
                None
            };
            let physical = d.next_id;
            d.next_id += 2 * MIB;
            d.vmm.physical.insert(
                physical,
                Physical {
                    card,
                    bytes: bytes as u64,
                    holders: 0,
                },
            );
            let id = d.vmm_new_handle(physical);
            unsafe { *handle = id };
            Ok(())
        }))
    }

    #[no_mangle]
    pub extern "C" fn cuMemRelease(handle: u64) -> CUresult {
        status(with_driver(|d| {
            let h = d.vmm.handles.get_mut(&handle).ok_or(INVALID_VALUE)?;
            h.refs -= 1;
            let physical = h.physical;
            if h.refs == 0 {
                d.vmm.handles.remove(&handle);
            }
            d.vmm_drop_holder(physical);
            Ok(())
        }))
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuMemAddressReserve(
        ptr: *mut u64,
        size: usize,
        _alignment: usize,
        _addr: u64,
        _flags: u64,
    ) -> CUresult {
        status(with_driver(|d| {
            let va = d.next_id;
            d.next_id += (size as u64).div_ceil(2 * MIB).max(1) * 2 * MIB;
            unsafe { *ptr = va };
            Ok(())
        }))
    }

    #[no_mangle]
    pub extern "C" fn cuMemAddressFree(_ptr: u64, _size: usize) -> CUresult {
        SUCCESS
    }

    #[no_mangle]
    pub extern "C" fn cuMemMap(
        ptr: u64,
        size: usize,
        offset: usize,
        handle: u64,
        _flags: u64,
    ) -> CUresult {
        status(with_driver(|d| {
            let physical = d.vmm.handles.get(&handle).ok_or(INVALID_VALUE)?.physical;
            let p = d.vmm.physical.get_mut(&physical).ok_or(INVALID_VALUE)?;
            if offset != 0 || size as u64 != p.bytes {
                return Err(INVALID_VALUE);
            }
            let end = ptr + size as u64;
            if d.vmm
                .mappings
                .range(..end)
                .next_back()
                .is_some_and(|(&start, &(_, _, len))| start + len > ptr)
            {
                return Err(INVALID_VALUE); // overlaps a mapping
            }
            p.holders += 1;
            d.vmm.mappings.insert(ptr, (handle, physical, size as u64));
            Ok(())
        }))
    }

    /// Unmaps every mapping in `[ptr, ptr + size)`; the range must start at
    /// a mapping and hold whole mappings only.
    #[no_mangle]
    pub extern "C" fn cuMemUnmap(ptr: u64, size: usize) -> CUresult {
        status(with_driver(|d| {
            let end = ptr + size as u64;
            let inside: Vec<(u64, u64, u64)> = d
                .vmm
                .mappings
                .range(ptr..end)
                .map(|(&start, &(_, physical, len))| (start, physical, len))
                .collect();
            if inside.first().is_none_or(|m| m.0 != ptr)
                || inside.iter().any(|&(start, _, len)| start + len > end)
            {
                return Err(INVALID_VALUE);
            }
            for (start, physical, _) in inside {
                d.vmm.mappings.remove(&start);
                d.vmm_drop_holder(physical);
            }
            Ok(())
        }))
    }

    #[no_mangle]
    pub extern "C" fn cuMemSetAccess(
        _ptr: u64,
        _size: usize,
        _desc: *const c_void,
        _count: usize,
    ) -> CUresult {
        SUCCESS
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuMemRetainAllocationHandle(
        handle: *mut u64,
        addr: *mut c_void,
    ) -> CUresult {
        let addr = addr as u64;
        status(with_driver(|d| {
            let (&start, &(h, physical, len)) = d
                .vmm
                .mappings
                .range(..=addr)
                .next_back()
                .ok_or(INVALID_VALUE)?;
            if addr >= start + len {
                return Err(INVALID_VALUE);
            }
            d.vmm
                .handles
                .entry(h)
                .and_modify(|e| e.refs += 1)
                .or_insert(Handle { physical, refs: 1 });
            d.vmm.physical.get_mut(&physical).expect("mapped").holders += 1;
            unsafe { *handle = h };
            Ok(())
        }))
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuMemExportToShareableHandle(
        shareable: *mut c_void,
        handle: u64,
        _kind: c_uint,
        _flags: u64,
    ) -> CUresult {
        status(with_driver(|d| {
            let physical = d.vmm.handles.get(&handle).ok_or(INVALID_VALUE)?.physical;
            unsafe { *(shareable as *mut u64) = physical };
            Ok(())
        }))
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuMemImportFromShareableHandle(
        handle: *mut u64,
        os_handle: *mut c_void,
        _kind: c_uint,
    ) -> CUresult {
        status(with_driver(|d| {
            let physical = os_handle as u64;
            if !d.vmm.physical.contains_key(&physical) {
                return Err(INVALID_VALUE);
            }
            let id = d.vmm_new_handle(physical);
            unsafe { *handle = id };
            Ok(())
        }))
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuMemGetAllocationPropertiesFromHandle(
        prop: *mut c_void,
        handle: u64,
    ) -> CUresult {
        status(with_driver(|d| {
            let physical = d.vmm.handles.get(&handle).ok_or(INVALID_VALUE)?.physical;
            let card = d.vmm.physical[&physical].card;
            let out = unsafe { &mut *(prop as *mut PropHead) };
            out.kind = 1;
            out.handle_types = 0;
            out.location_type = if card.is_some() { LOCATION_DEVICE } else { 2 };
            out.location_id = card.map_or(0, |c| c as c_int);
            Ok(())
        }))
    }
}

/// Mipmapped arrays, context limits and memory pools.
pub mod extras {
    use super::*;

    const LEVEL_PAD: u64 = 2 * MIB;

    /// `CUDA_ARRAY3D_DESCRIPTOR`.
    #[repr(C)]
    struct Desc3d {
        width: usize,
        height: usize,
        depth: usize,
        format: c_uint,
        channels: c_uint,
        flags: c_uint,
    }

    /// What the fake reserves for a mipmapped array: each level's texels,
    /// padded to 2 MiB.
    fn mipmap_bytes(d: &Desc3d, levels: c_uint) -> u64 {
        (0..levels.max(1))
            .map(|l| {
                let dim = |v: usize| if v == 0 { 1 } else { (v >> l).max(1) as u64 };
                let texels = dim(d.width) * dim(d.height) * dim(d.depth);
                (texels * format_bytes(d.format) * u64::from(d.channels.max(1))).div_ceil(LEVEL_PAD)
                    * LEVEL_PAD
            })
            .sum()
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuMipmappedArrayCreate(
        handle: *mut u64,
        desc: *const c_void,
        levels: c_uint,
    ) -> CUresult {
        if desc.is_null() {
            return INVALID_VALUE;
        }
        let d = unsafe { &*(desc as *const Desc3d) };
        alloc_on_current(handle, mipmap_bytes(d, levels))
    }

    #[no_mangle]
    pub extern "C" fn cuMipmappedArrayDestroy(handle: u64) -> CUresult {
        cuMemFree_v2(handle)
    }

    /// `CUDA_ARRAY_MEMORY_REQUIREMENTS`.
    #[repr(C)]
    #[derive(Debug)]
    pub struct Requirements {
        size: usize,
        alignment: usize,
        reserved: [c_uint; 4],
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuMipmappedArrayGetMemoryRequirements(
        req: *mut Requirements,
        handle: u64,
        _device: c_int,
    ) -> CUresult {
        status(with_driver(|d| {
            let (_, bytes) = *d.allocations.get(&handle).ok_or(INVALID_VALUE)?;
            unsafe {
                (*req).size = bytes as usize;
                (*req).alignment = LEVEL_PAD as usize;
            }
            Ok(())
        }))
    }

    /// `CU_LIMIT_PRINTF_FIFO_SIZE`, `CU_LIMIT_MALLOC_HEAP_SIZE` and their
    /// defaults (1 MiB, 8 MiB), part of what a context costs.
    const LIMITS: [(c_uint, u64); 2] = [(1, MIB), (2, 8 * MIB)];

    #[no_mangle]
    pub unsafe extern "C" fn cuCtxGetLimit(value: *mut usize, limit: c_uint) -> CUresult {
        if limit == lmem::STACK_LIMIT {
            return unsafe { lmem::get_stack(value) };
        }
        status(with_driver(|d| {
            let ctx = CURRENT.with(Cell::get);
            d.current_card()?;
            let i = LIMITS
                .iter()
                .position(|l| l.0 == limit)
                .ok_or(INVALID_VALUE)?;
            let sizes = d
                .limits
                .get(&ctx)
                .copied()
                .unwrap_or([LIMITS[0].1, LIMITS[1].1]);
            unsafe { *value = sizes[i] as usize };
            Ok(())
        }))
    }

    #[no_mangle]
    pub extern "C" fn cuCtxSetLimit(limit: c_uint, value: usize) -> CUresult {
        if limit == lmem::STACK_LIMIT {
            return lmem::set_stack(value as u64);
        }
        status(with_driver(|d| {
            let ctx = CURRENT.with(Cell::get);
            let card = d.current_card()?;
            let Some(i) = LIMITS.iter().position(|l| l.0 == limit) else {
                return Ok(()); // the device runtime's limits: no card memory modelled
            };
            let sizes = d.limits.entry(ctx).or_insert([LIMITS[0].1, LIMITS[1].1]);
            let (old, new) = (sizes[i], value as u64);
            let c = &mut d.cards[card];
            if new > old && c.used + (new - old) > c.total {
                return Err(OUT_OF_MEMORY);
            }
            c.used = c.used + new - old;
            sizes[i] = new;
            Ok(())
        }))
    }

    /// `CUmemPoolProps` up to the location.
    #[repr(C)]
    struct PoolPropsHead {
        alloc_type: c_uint,
        handle_types: c_uint,
        location_type: c_uint,
        location_id: c_int,
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuMemPoolCreate(pool: *mut u64, props: *const c_void) -> CUresult {
        if pool.is_null() || props.is_null() {
            return INVALID_VALUE;
        }
        let props = unsafe { &*(props as *const PoolPropsHead) };
        status(with_driver(|d| {
            d.card(props.location_id)?;
            let id = 0x4000_0000 + d.next_id;
            d.next_id += 2 * MIB;
            d.pools.insert(id, Pool::on(props.location_id as usize));
            unsafe { *pool = id };
            Ok(())
        }))
    }

    #[no_mangle]
    pub extern "C" fn cuMemPoolDestroy(pool: u64) -> CUresult {
        status(with_driver(|d| {
            let p = d.pools.remove(&pool).ok_or(INVALID_VALUE)?;
            d.cards[p.card].used -= p.idle;
            Ok(())
        }))
    }

    /// `CU_MEMPOOL_ATTR_RELEASE_THRESHOLD`, `_RESERVED_MEM_CURRENT`,
    /// `_USED_MEM_CURRENT`.
    const RELEASE_THRESHOLD: c_int = 4;
    const RESERVED_MEM_CURRENT: c_int = 5;
    const USED_MEM_CURRENT: c_int = 7;

    #[no_mangle]
    pub unsafe extern "C" fn cuMemPoolSetAttribute(
        pool: u64,
        attr: c_int,
        value: *mut c_void,
    ) -> CUresult {
        status(with_driver(|d| {
            d.pools.get(&pool).ok_or(INVALID_VALUE)?;
            if attr == RELEASE_THRESHOLD {
                d.pools.get_mut(&pool).expect("present").threshold =
                    unsafe { *(value as *const u64) };
                d.release_above_threshold(pool);
            }
            Ok(())
        }))
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuMemPoolGetAttribute(
        pool: u64,
        attr: c_int,
        value: *mut c_void,
    ) -> CUresult {
        status(with_driver(|d| {
            let p = d.pools.get(&pool).ok_or(INVALID_VALUE)?;
            let v = match attr {
                RELEASE_THRESHOLD => p.threshold,
                RESERVED_MEM_CURRENT => p.used + p.idle,
                USED_MEM_CURRENT => p.used,
                _ => return Err(INVALID_VALUE),
            };
            unsafe { *(value as *mut u64) = v };
            Ok(())
        }))
    }

    /// Releases idle memory until the pool reserves at most `keep` bytes
    /// (never its allocations).
    #[no_mangle]
    pub extern "C" fn cuMemPoolTrimTo(pool: u64, keep: usize) -> CUresult {
        status(with_driver(|d| {
            let p = d.pools.get_mut(&pool).ok_or(INVALID_VALUE)?;
            let release = (p.used + p.idle).saturating_sub(keep as u64).min(p.idle);
            p.idle -= release;
            let card = p.card;
            d.cards[card].used -= release;
            Ok(())
        }))
    }

    /// One memory pool: its card, release threshold, the bytes it holds for
    /// live allocations and the bytes it keeps reserved but idle.
    #[derive(Debug)]
    pub struct Pool {
        card: usize,
        threshold: u64,
        used: u64,
        idle: u64,
    }

    impl Pool {
        /// An empty pool on `card` with threshold 0.
        pub fn on(card: usize) -> Pool {
            Pool {
                card,
                threshold: 0,
                used: 0,
                idle: 0,
            }
        }
    }

    /// The default pool's handle of card `card`.
    pub fn default_pool(card: usize) -> u64 {
        0x3000 + card as u64
    }

    impl Driver {
        /// An allocation from `pool`: from its idle memory when there is
        /// enough, else newly reserved on its card.
        pub(crate) fn allocate_in_pool(&mut self, pool: u64, bytes: u64) -> Result<u64, CUresult> {
            if (0x3000..0x3000 + 64).contains(&pool) {
                let card = (pool - 0x3000) as usize;
                self.cards.get(card).ok_or(INVALID_VALUE)?;
                self.pools.entry(pool).or_insert_with(|| Pool::on(card));
            }
            if bytes == 0 {
                return Err(INVALID_VALUE);
            }
            let p = self.pools.get_mut(&pool).ok_or(INVALID_VALUE)?;
            let card = p.card;
            let id = if p.idle >= bytes {
                p.idle -= bytes;
                let id = self.next_id;
                self.next_id += bytes.div_ceil(2 * MIB).max(1) * 2 * MIB;
                self.allocations.insert(id, (card, bytes));
                id
            } else {
                self.allocate(card, bytes)?
            };
            self.pools.get_mut(&pool).expect("present").used += bytes;
            self.pool_of.insert(id, pool);
            Ok(id)
        }

        /// A pool allocation freed: its memory stays reserved (idle) up to
        /// the pool's release threshold (released at once, where the real
        /// driver releases at the next synchronisation).
        pub(crate) fn free_into_pool(&mut self, pool: u64, bytes: u64) {
            let Some(p) = self.pools.get_mut(&pool) else {
                return;
            };
            p.used -= bytes;
            p.idle += bytes;
            self.release_above_threshold(pool);
        }

        fn release_above_threshold(&mut self, pool: u64) {
            let p = self.pools.get_mut(&pool).expect("present");
            let release = p.idle.saturating_sub(p.threshold);
            p.idle -= release;
            let card = p.card;
            self.cards[card].used -= release;
        }
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuDeviceGetDefaultMemPool(pool: *mut u64, device: c_int) -> CUresult {
        status(with_driver(|d| {
            d.card(device)?;
            let id = default_pool(device as usize);
            d.pools
                .entry(id)
                .or_insert_with(|| Pool::on(device as usize));
            unsafe { *pool = id };
            Ok(())
        }))
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuDeviceGetMemPool(pool: *mut u64, device: c_int) -> CUresult {
        unsafe { cuDeviceGetDefaultMemPool(pool, device) }
    }
}

/// Graphs with memory allocation nodes: each node's bytes live on the card
/// of its pool properties; launching an instantiated graph grows the card's
/// graph memory reservation to what the graph needs (the sum of its
/// allocation nodes); `cuDeviceGraphMemTrim` releases the card's
/// reservation (the fake's graphs have always finished and freed).
pub mod graphs {
    use super::*;

    /// Graph state of the fake driver.
    #[derive(Debug, Default)]
    pub struct Graphs {
        /// Graph -> (card, bytes) of each allocation node.
        nodes: HashMap<u64, Vec<(usize, u64)>>,
        /// Executable graph -> its graph.
        execs: HashMap<u64, u64>,
        /// Per card index: bytes reserved for graph allocations.
        reserved: HashMap<usize, u64>,
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuGraphCreate(graph: *mut u64, _flags: c_uint) -> CUresult {
        status(with_driver(|d| {
            let id = 0x5000_0000 + d.next_id;
            d.next_id += 2 * MIB;
            d.graphs.nodes.insert(id, Vec::new());
            unsafe { *graph = id };
            Ok(())
        }))
    }

    /// `CUDA_MEM_ALLOC_NODE_PARAMS`: `CUmemPoolProps` (88 bytes, location
    /// at offset 8), access descriptors (pointer, count), `bytesize`, `dptr`.
    const PARAMS_LOCATION_ID: usize = 12;
    const PARAMS_BYTESIZE: usize = 104;
    const PARAMS_DPTR: usize = 112;

    #[no_mangle]
    pub unsafe extern "C" fn cuGraphAddMemAllocNode(
        node: *mut u64,
        graph: u64,
        _deps: *const u64,
        _count: usize,
        params: *mut u8,
    ) -> CUresult {
        if params.is_null() || node.is_null() {
            return INVALID_VALUE;
        }
        let (card, bytes) = unsafe {
            (
                *(params.add(PARAMS_LOCATION_ID) as *const c_int),
                *(params.add(PARAMS_BYTESIZE) as *const u64),
            )
        };
        status(with_driver(|d| {
            d.card(card)?;
            let va = d.next_id;
            d.next_id += bytes.div_ceil(2 * MIB).max(1) * 2 * MIB;
            d.graphs
                .nodes
                .get_mut(&graph)
                .ok_or(INVALID_VALUE)?
                .push((card as usize, bytes));
            unsafe {
                *(params.add(PARAMS_DPTR) as *mut u64) = va;
                *node = va + 1;
            }
            Ok(())
        }))
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuGraphInstantiateWithFlags(
        exec: *mut u64,
        graph: u64,
        _flags: u64,
    ) -> CUresult {
        status(with_driver(|d| {
            d.graphs.nodes.get(&graph).ok_or(INVALID_VALUE)?;
            let id = 0x6000_0000 + d.next_id;
            d.next_id += 2 * MIB;
            d.graphs.execs.insert(id, graph);
            unsafe { *exec = id };
            Ok(())
        }))
    }

    #[no_mangle]
    pub extern "C" fn cuGraphExecDestroy(exec: u64) -> CUresult {
        status(with_driver(|d| {
            d.graphs
                .execs
                .remove(&exec)
                .map(|_| ())
                .ok_or(INVALID_VALUE)
        }))
    }

    #[no_mangle]
    pub extern "C" fn cuGraphDestroy(graph: u64) -> CUresult {
        status(with_driver(|d| {
            d.graphs
                .nodes
                .remove(&graph)
                .map(|_| ())
                .ok_or(INVALID_VALUE)
        }))
    }

    /// Grows each card's graph reservation to what `exec` needs there.
    pub fn reserve_for_launch(exec: u64) -> CUresult {
        status(with_driver(|d| {
            let Some(graph) = d.graphs.execs.get(&exec).copied() else {
                return Ok(()); // a graph the fake does not know: no memory
            };
            let mut need: HashMap<usize, u64> = HashMap::new();
            for &(card, bytes) in d.graphs.nodes.get(&graph).into_iter().flatten() {
                *need.entry(card).or_default() += bytes;
            }
            for (card, bytes) in need {
                let reserved = d.graphs.reserved.entry(card).or_default();
                if bytes > *reserved {
                    let c = &mut d.cards[card];
                    if c.used + (bytes - *reserved) > c.total {
                        return Err(OUT_OF_MEMORY);
                    }
                    c.used += bytes - *reserved;
                    *reserved = bytes;
                }
            }
            Ok(())
        }))
    }

    #[no_mangle]
    pub extern "C" fn cuDeviceGraphMemTrim(device: c_int) -> CUresult {
        status(with_driver(|d| {
            d.card(device)?;
            let released = d.graphs.reserved.remove(&(device as usize)).unwrap_or(0);
            d.cards[device as usize].used -= released;
            Ok(())
        }))
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuDeviceGetGraphMemAttribute(
        device: c_int,
        attr: c_int,
        value: *mut u64,
    ) -> CUresult {
        status(with_driver(|d| {
            d.card(device)?;
            if attr != 2 {
                return Err(INVALID_VALUE); // only RESERVED_MEM_CURRENT
            }
            let reserved = d
                .graphs
                .reserved
                .get(&(device as usize))
                .copied()
                .unwrap_or(0);
            unsafe { *value = reserved };
            Ok(())
        }))
    }
}

/// Lazy loading (CUDA 12.2+'s default): a function's code is loaded onto
/// its context's card at the function's first launch there, taking
/// `FAKE_CUDA_LOAD_MIB` of it with no allocation call (refused with
/// out-of-memory when the card cannot hold it), until
/// `fake_cuda_unload_kernel` unloads it (as `cuModuleUnload` would).
pub mod code {
    use super::*;

    /// Loaded code: (context, function) -> its card.
    #[derive(Debug)]
    pub struct Code {
        bytes: u64,
        loaded: HashMap<(u64, u64), usize>,
    }

    impl Code {
        /// Each function's code takes `bytes`.
        pub fn new(bytes: u64) -> Self {
            Self {
                bytes,
                loaded: HashMap::new(),
            }
        }
    }

    /// Before a launch of `f`: its code is loaded if this is its first
    /// launch in the current context.
    pub(crate) fn load_at_first_launch(d: &mut Driver, f: *mut c_void) -> Result<(), CUresult> {
        let ctx = CURRENT.with(Cell::get);
        let card = d.current_card()?;
        let bytes = d.code.bytes;
        if bytes == 0 || d.code.loaded.contains_key(&(ctx, f as u64)) {
            return Ok(());
        }
        let c = &mut d.cards[card];
        if c.used + bytes > c.total {
            return Err(OUT_OF_MEMORY);
        }
        c.used += bytes;
        d.code.loaded.insert((ctx, f as u64), card);
        Ok(())
    }

    /// Unloads `f`'s code from the current context's card; returns whether
    /// it was loaded.
    #[no_mangle]
    pub extern "C" fn fake_cuda_unload_kernel(f: *mut c_void) -> c_int {
        let ctx = CURRENT.with(Cell::get);
        with_driver(|d| {
            let bytes = d.code.bytes;
            Ok(match d.code.loaded.remove(&(ctx, f as u64)) {
                Some(card) => {
                    d.cards[card].used -= bytes;
                    1
                }
                None => 0,
            })
        })
        .unwrap_or(0)
    }
}

/// Local memory, as the driver reserves it: a context's per-thread stack
/// (`CU_LIMIT_STACK_SIZE`, 1 KiB at first) is reserved for every thread the
/// card can hold at once ([`THREADS_PER_CARD`]: 4 multiprocessors of 1024
/// threads), and a launch of a kernel that needs more local memory per
/// thread than the stack grows it first (refused with out-of-memory when
/// the card cannot hold the growth). Kernels with local memory are made by
/// `fake_cuda_kernel`; any other function handle needs none.
/// `cuFuncGetAttribute` answers `CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES` for
/// them, except for library kernels (`fake_cuda_library_kernel`, which only
/// `cuKernelGetAttribute` describes, as the real driver does for a
/// `CUkernel`) and kernels made with `fake_cuda_kernel_opaque`, which
/// neither describes.
pub mod lmem {
    use super::*;

    /// `CU_LIMIT_STACK_SIZE`.
    pub const STACK_LIMIT: c_uint = 0;
    /// The stack a context starts with.
    pub const DEFAULT_STACK: u64 = 1024;
    /// `CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT` of every fake card.
    pub const MULTIPROCESSORS: c_int = 4;
    /// `CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR` of every fake card.
    pub const THREADS_PER_MULTIPROCESSOR: c_int = 1024;
    /// Threads a card holds at once.
    pub const THREADS_PER_CARD: u64 = (MULTIPROCESSORS * THREADS_PER_MULTIPROCESSOR) as u64;
    const LOCAL_SIZE_BYTES: c_int = 3;
    const INVALID_HANDLE: CUresult = 400;

    /// Which attribute call describes a kernel.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Kind {
        Function,
        Library,
        Opaque,
    }

    struct State {
        /// Kernel handle -> (local bytes per thread, kind).
        kernels: HashMap<u64, (u64, Kind)>,
        /// Context -> its stack per thread.
        stacks: HashMap<u64, u64>,
        next: u64,
    }

    static STATE: Mutex<Option<State>> = Mutex::new(None);

    fn with_state<T>(f: impl FnOnce(&mut State) -> T) -> T {
        let mut guard = STATE.lock().unwrap_or_else(|e| e.into_inner());
        let state = guard.get_or_insert_with(|| State {
            kernels: HashMap::new(),
            stacks: HashMap::new(),
            next: 0x7e00_0000,
        });
        f(state)
    }

    fn kernel(local_bytes: u64, kind: Kind) -> *mut c_void {
        with_state(|s| {
            s.next += 0x40;
            s.kernels.insert(s.next, (local_bytes, kind));
            s.next as *mut c_void
        })
    }

    /// A kernel handle that needs `local_bytes` of local memory per thread.
    #[no_mangle]
    pub extern "C" fn fake_cuda_kernel(local_bytes: u64) -> *mut c_void {
        kernel(local_bytes, Kind::Function)
    }

    /// A library kernel (`CUkernel`) that needs `local_bytes` per thread.
    #[no_mangle]
    pub extern "C" fn fake_cuda_library_kernel(local_bytes: u64) -> *mut c_void {
        kernel(local_bytes, Kind::Library)
    }

    /// The same, but `cuFuncGetAttribute` refuses to describe it.
    #[no_mangle]
    pub extern "C" fn fake_cuda_kernel_opaque(local_bytes: u64) -> *mut c_void {
        kernel(local_bytes, Kind::Opaque)
    }

    /// Grows the current context's stack to `per_thread`, reserving the
    /// growth for every thread of its card.
    fn grow_to(d: &mut Driver, per_thread: u64) -> Result<(), CUresult> {
        let ctx = CURRENT.with(Cell::get);
        let card = d.current_card()?;
        with_state(|s| {
            let stack = s.stacks.entry(ctx).or_insert(DEFAULT_STACK);
            let c = &mut d.cards[card];
            let (old, new) = (*stack * THREADS_PER_CARD, per_thread * THREADS_PER_CARD);
            if new > old && c.used + (new - old) > c.total {
                return Err(OUT_OF_MEMORY);
            }
            c.used = c.used + new - old;
            *stack = per_thread;
            Ok(())
        })
    }

    /// Before a launch of `f`: the stack grows to the kernel's local memory.
    pub(crate) fn reserve_for_launch(d: &mut Driver, f: *mut c_void) -> Result<(), CUresult> {
        let ctx = CURRENT.with(Cell::get);
        let need = with_state(|s| {
            let need = s.kernels.get(&(f as u64)).map_or(0, |k| k.0);
            let stack = s.stacks.get(&ctx).copied().unwrap_or(DEFAULT_STACK);
            (need > stack).then_some(need)
        });
        match need {
            Some(need) => grow_to(d, need),
            None => Ok(()),
        }
    }

    pub(crate) unsafe fn get_stack(value: *mut usize) -> CUresult {
        status(with_driver(|d| {
            d.current_card()?;
            let ctx = CURRENT.with(Cell::get);
            let stack = with_state(|s| s.stacks.get(&ctx).copied().unwrap_or(DEFAULT_STACK));
            unsafe { *value = stack as usize };
            Ok(())
        }))
    }

    pub(crate) fn set_stack(per_thread: u64) -> CUresult {
        status(with_driver(|d| grow_to(d, per_thread)))
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuFuncGetAttribute(
        value: *mut c_int,
        attribute: c_int,
        f: *mut c_void,
    ) -> CUresult {
        if value.is_null() {
            return INVALID_VALUE;
        }
        let kernel = with_state(|s| s.kernels.get(&(f as u64)).copied());
        match kernel {
            Some((_, Kind::Library | Kind::Opaque)) => INVALID_HANDLE,
            Some((local, Kind::Function)) => {
                let answer = if attribute == LOCAL_SIZE_BYTES {
                    local
                } else {
                    0
                };
                unsafe { *value = answer as c_int };
                SUCCESS
            }
            None => {
                unsafe { *value = 0 };
                SUCCESS
            }
        }
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuKernelGetAttribute(
        value: *mut c_int,
        attribute: c_int,
        kernel: *mut c_void,
        _device: c_int,
    ) -> CUresult {
        if value.is_null() {
            return INVALID_VALUE;
        }
        match with_state(|s| s.kernels.get(&(kernel as u64)).copied()) {
            Some((local, Kind::Library)) => {
                let answer = if attribute == LOCAL_SIZE_BYTES {
                    local
                } else {
                    0
                };
                unsafe { *value = answer as c_int };
                SUCCESS
            }
            _ => INVALID_HANDLE,
        }
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuDeviceGetAttribute(
        value: *mut c_int,
        attribute: c_int,
        _device: c_int,
    ) -> CUresult {
        if value.is_null() {
            return INVALID_VALUE;
        }
        let answer = match attribute {
            16 => MULTIPROCESSORS,
            39 => THREADS_PER_MULTIPROCESSOR,
            _ => 0,
        };
        unsafe { *value = answer };
        SUCCESS
    }
}
