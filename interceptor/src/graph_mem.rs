//! Graph memory (memory nodes: `cuGraphAddMemAllocNode`, or
//! `cuMemAllocAsync` captured into a graph). The driver backs these from a
//! per-card graph memory pool that it grows when a graph with allocation
//! nodes is launched and keeps until `cuDeviceGraphMemTrim` (or until the
//! graphs using it are gone), so what a card holds for graphs is the
//! driver's `CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT` for it, and that is
//! what is charged: the card's graph charge is set to that figure after
//! every call that can change it (a graph launch, `cuDeviceGraphMemTrim`,
//! `cuGraphExecDestroy`, `cuGraphDestroy`). The reservation is made by the
//! launch itself, so it cannot be refused beforehand: a launch that takes
//! the container past its cap is charged anyway (the container's usage
//! stays truthful, its next allocations are refused and the node agent's
//! enforcement sees it) and a warning says so.
//!
//! Nothing of this runs until the process has made a graph with memory
//! nodes (an allocation node added, or a captured graph that holds one):
//! until then a graph launch costs one relaxed load more. Allocations made
//! by `cuMemAllocAsync` while a stream is being captured are charged at
//! capture time and given back at the captured free, as before; the
//! graph's own reservation is charged from its launch.

use crate::cuda_hooks::{read, tracked};
use crate::ffi::*;
use crate::log::{log, WARN};
use crate::state;
use crate::state::real;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tessera_api::shared_region::MAX_DEVICES;

/// `CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT`.
const RESERVED_MEM_CURRENT: c_int = 2;
/// `CU_GRAPH_NODE_TYPE_MEM_ALLOC`.
const NODE_MEM_ALLOC: c_int = 10;

/// Set once the process has a graph with memory nodes.
static IN_USE: AtomicBool = AtomicBool::new(false);
/// Bytes charged per container card for the driver's graph memory.
static CHARGED: [AtomicU64; MAX_DEVICES] = [const { AtomicU64::new(0) }; MAX_DEVICES];

/// After a graph launch: one relaxed load unless graphs hold memory here.
#[inline]
pub fn after_launch() {
    if IN_USE.load(Ordering::Relaxed) {
        if let Some(ordinal) = crate::extra_hooks::current_ordinal() {
            reconcile(ordinal);
        }
    }
}

/// In a forked child: the parent's graph charges are not the child's.
pub fn after_fork_in_child() {
    for charged in &CHARGED {
        charged.store(0, Ordering::Relaxed);
    }
}

/// Sets card `ordinal`'s graph charge to what the driver reserves for
/// graph allocations there.
fn reconcile(ordinal: CuDevice) {
    let (Ok(Some(accounting)), Some(card)) = (state::accounting(), tracked(ordinal)) else {
        return;
    };
    let Some(get) = state::cuda().and_then(|d| d.graph_mem_attribute) else {
        return;
    };
    let mut reserved = 0u64;
    // SAFETY: the driver's cuDeviceGetGraphMemAttribute with a cuuint64_t
    // out-value, which this attribute is.
    let rc = unsafe {
        get(
            ordinal,
            RESERVED_MEM_CURRENT,
            (&mut reserved as *mut u64).cast(),
        )
    };
    if rc != CUDA_SUCCESS {
        return;
    }
    let before = CHARGED[card].swap(reserved, Ordering::AcqRel);
    if reserved > before {
        let growth = reserved - before;
        if !accounting.charge_held(card, growth) {
            log!(
                WARN,
                "card {card}: a graph launch reserved {growth} bytes past the cap for graph allocations; further allocations are refused until it is trimmed"
            );
        }
    } else if reserved < before {
        accounting.uncharge(card, before - reserved);
    }
}

/// Reconciles every card this process has charged graph memory on.
fn reconcile_charged_cards() {
    for ordinal in 0..MAX_DEVICES as CuDevice {
        if tracked(ordinal).is_some_and(|card| CHARGED[card].load(Ordering::Relaxed) > 0) {
            reconcile(ordinal);
        }
    }
}

/// # Safety
/// `cuGraphAddMemAllocNode`'s contract: `node` is a valid out-pointer,
/// `dependencies` holds `count` nodes and `params` is valid.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuGraphAddMemAllocNode(
    node: *mut Opaque,
    graph: Opaque,
    dependencies: *const Opaque,
    count: usize,
    params: *mut c_void,
) -> CuResult {
    let real = real!(GraphAddMemAllocNode);
    // SAFETY: forwarding the caller's arguments.
    let rc = unsafe { real(node, graph, dependencies, count, params) };
    if rc == CUDA_SUCCESS {
        IN_USE.store(true, Ordering::Release);
    }
    rc
}

/// Whether `graph` holds an allocation node (a captured `cuMemAllocAsync`).
fn has_alloc_node(graph: Opaque) -> bool {
    let Some(d) = state::cuda() else {
        return false;
    };
    let (Some(get_nodes), Some(node_type)) = (d.graph_get_nodes, d.graph_node_get_type) else {
        return false;
    };
    if graph.is_null() {
        return false;
    }
    let mut count = 0usize;
    // SAFETY: the driver's cuGraphGetNodes asked for the count only.
    if unsafe { get_nodes(graph, std::ptr::null_mut(), &mut count) } != CUDA_SUCCESS {
        return false;
    }
    let mut nodes = vec![std::ptr::null_mut(); count];
    // SAFETY: cuGraphGetNodes into a buffer of `count` nodes.
    if unsafe { get_nodes(graph, nodes.as_mut_ptr(), &mut count) } != CUDA_SUCCESS {
        return false;
    }
    nodes.iter().take(count).any(|&node| {
        let mut kind: c_int = -1;
        // SAFETY: the driver's cuGraphNodeGetType with a valid out-pointer.
        let rc = unsafe { node_type(node, &mut kind) };
        rc == CUDA_SUCCESS && kind == NODE_MEM_ALLOC
    })
}

/// Shared body of the `cuStreamEndCapture` variants.
///
/// # Safety
/// `graph` is null or valid for reads (the caller's out-pointer, filled by
/// the driver when `rc` is success).
unsafe fn ended_capture(graph: *mut Opaque, rc: CuResult) -> CuResult {
    if rc == CUDA_SUCCESS
        && !IN_USE.load(Ordering::Relaxed)
        && state::accounting().is_ok_and(|a| a.is_some())
        // SAFETY: readable by this function's contract.
        && has_alloc_node(unsafe { read(graph as *const usize) } as Opaque)
    {
        IN_USE.store(true, Ordering::Release);
    }
    rc
}

/// # Safety
/// `cuStreamEndCapture`'s contract: `graph` is a valid out-pointer.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuStreamEndCapture(stream: Opaque, graph: *mut Opaque) -> CuResult {
    let real = real!(StreamEndCapture);
    // SAFETY: forwarding the caller's arguments; `graph` is the caller's
    // out-pointer, which the driver fills.
    unsafe { ended_capture(graph, real(stream, graph)) }
}

/// # Safety
/// `cuStreamEndCapture_ptsz`'s contract: `graph` is a valid out-pointer.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuStreamEndCapture_ptsz(stream: Opaque, graph: *mut Opaque) -> CuResult {
    let real = real!(StreamEndCapturePtsz);
    // SAFETY: forwarding the caller's arguments; `graph` is the caller's
    // out-pointer, which the driver fills.
    unsafe { ended_capture(graph, real(stream, graph)) }
}

/// # Safety
/// None beyond the driver's: `cuDeviceGraphMemTrim` takes no pointers.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuDeviceGraphMemTrim(device: CuDevice) -> CuResult {
    let real = real!(DeviceGraphMemTrim);
    // SAFETY: forwarding the caller's argument.
    let rc = unsafe { real(device) };
    if rc == CUDA_SUCCESS && IN_USE.load(Ordering::Relaxed) {
        reconcile(device);
    }
    rc
}

/// # Safety
/// None beyond the driver's: the graph handle is opaque.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuGraphExecDestroy(exec: Opaque) -> CuResult {
    let real = real!(GraphExecDestroy);
    // SAFETY: forwarding the caller's argument.
    let rc = unsafe { real(exec) };
    if rc == CUDA_SUCCESS && IN_USE.load(Ordering::Relaxed) {
        reconcile_charged_cards();
    }
    rc
}

/// # Safety
/// None beyond the driver's: the graph handle is opaque.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuGraphDestroy(graph: Opaque) -> CuResult {
    let real = real!(GraphDestroy);
    // SAFETY: forwarding the caller's argument.
    let rc = unsafe { real(graph) };
    if rc == CUDA_SUCCESS && IN_USE.load(Ordering::Relaxed) {
        reconcile_charged_cards();
    }
    rc
}
