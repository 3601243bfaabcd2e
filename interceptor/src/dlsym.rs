//! The `dlsym` override, for programs that `dlopen` the driver and look its
//! functions up themselves (static cudart, PyTorch, Triton, nvidia-smi's
//! NVML). A lookup whose result is the address of an entry point we
//! intercept returns our hook instead; every other lookup is glibc's answer.
//!
//! `dlsym(RTLD_NEXT, …)` is resolved relative to its caller, which glibc finds
//! from the return address. On x86-64 the override is a naked function that
//! jumps (does not call) into glibc for `RTLD_NEXT`, so glibc sees the
//! original caller and such lookups keep their meaning. On other
//! architectures `RTLD_NEXT` lookups are resolved relative to this library.

use crate::hook_table::is_intercepted_name;
use crate::interpose::{cuda_hook_for_address, nvml_hook_for_address};
use crate::loader::real_dlsym;
use crate::state;
use std::ffi::{c_char, c_void, CStr};

/// Looks `symbol` up with glibc and swaps in our hook when the result is
/// an intercepted entry point.
///
/// # Safety
/// `dlsym`'s contract: `handle` is a handle from `dlopen` or a
/// pseudo-handle, `symbol` null or a NUL-terminated name.
unsafe extern "C" fn dlsym_resolve(handle: *mut c_void, symbol: *const c_char) -> *mut c_void {
    // SAFETY: the caller's arguments, valid by dlsym's contract.
    let found = unsafe { real_dlsym(handle, symbol) };
    if found.is_null() || symbol.is_null() || state::initialising() {
        return found;
    }
    // SAFETY: non-null, and NUL-terminated by dlsym's contract.
    let name = unsafe { CStr::from_ptr(symbol) };
    if !is_intercepted_name(name) {
        return found;
    }
    let address = found as usize;
    let hook = if name.to_bytes().starts_with(b"nvml") {
        nvml_hook_for_address(address)
    } else {
        cuda_hook_for_address(address)
    };
    hook.map_or(found, |h| h as *mut c_void)
}

/// glibc's `dlsym`, overridden.
///
/// # Safety
/// `dlsym`'s contract: `handle` is a handle from `dlopen` or a
/// pseudo-handle, `symbol` null or a NUL-terminated name.
#[cfg(all(target_arch = "x86_64", not(test)))]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void {
    // handle == RTLD_NEXT ((void *)-1): fetch glibc's dlsym (keeping the
    // arguments and a 16-byte aligned stack) and jump to it with the
    // caller's return address still on the stack. Otherwise tail-jump to
    // dlsym_resolve.
    core::arch::naked_asm!(
        "cmp rdi, -1",
        "je 2f",
        "jmp {resolve}",
        "2:",
        "push rdi",
        "push rsi",
        "sub rsp, 8",
        "call {real}",
        "add rsp, 8",
        "pop rsi",
        "pop rdi",
        "jmp rax",
        resolve = sym dlsym_resolve,
        real = sym crate::loader::real_dlsym_address,
    )
}

/// glibc's `dlsym`, overridden.
///
/// # Safety
/// `dlsym`'s contract: `handle` is a handle from `dlopen` or a
/// pseudo-handle, `symbol` null or a NUL-terminated name.
#[cfg(all(not(target_arch = "x86_64"), not(test)))]
#[no_mangle]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void {
    // SAFETY: the caller's arguments, under the same contract.
    unsafe { dlsym_resolve(handle, symbol) }
}
