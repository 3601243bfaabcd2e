//! Reaching the real libraries: glibc's own `dlsym` (ours is overridden, so
//! even this library's lookups would come back to us) and lazy `dlopen` of
//! `libcuda.so.1` / `libnvidia-ml.so.1`, the only libraries ever loaded.

use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicUsize, Ordering};

type DlsymFn = unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void;

static REAL_DLSYM: AtomicUsize = AtomicUsize::new(0);

/// Address of glibc's `dlsym`, found with `dlvsym` (which we don't override).
/// Aborts if there is none: nothing can work without it.
pub extern "C" fn real_dlsym_address() -> usize {
    let known = REAL_DLSYM.load(Ordering::Relaxed);
    if known != 0 {
        return known;
    }
    // glibc 2.34+ versions dlsym GLIBC_2.34; older ones by the architecture's
    // base version.
    for version in [c"GLIBC_2.34", c"GLIBC_2.2.5", c"GLIBC_2.17", c"GLIBC_2.0"] {
        // SAFETY: NUL-terminated names; RTLD_NEXT skips this library.
        let f = unsafe { libc::dlvsym(libc::RTLD_NEXT, c"dlsym".as_ptr(), version.as_ptr()) };
        if !f.is_null() {
            REAL_DLSYM.store(f as usize, Ordering::Relaxed);
            return f as usize;
        }
    }
    eprintln!("[tessera-cuda] FATAL: glibc's dlsym not found; cannot run");
    std::process::abort();
}

/// glibc's `dlsym(handle, name)`.
pub fn real_dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    // SAFETY: the address is glibc's dlsym, whose signature this is.
    let f: DlsymFn = unsafe { std::mem::transmute::<usize, DlsymFn>(real_dlsym_address()) };
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe { f(handle, name) }
}

/// A `dlopen`ed library, never closed.
#[derive(Debug)]
pub struct Library {
    handle: usize,
}

impl Library {
    /// Loads `name` (a no-op when the process already has it).
    pub fn open(name: &CStr) -> Option<Library> {
        // SAFETY: NUL-terminated name.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        (!handle.is_null()).then_some(Library {
            handle: handle as usize,
        })
    }

    /// The address of `name` in this library, 0 if absent.
    pub fn symbol(&self, name: &CStr) -> usize {
        real_dlsym(self.handle as *mut c_void, name.as_ptr()) as usize
    }
}
