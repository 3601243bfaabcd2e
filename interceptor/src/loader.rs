//! Reaching the real libraries: glibc's own `dlsym` (ours is overridden, so
//! even this library's lookups would come back to us), lazy `dlopen` of
//! `libcuda.so.1` / `libnvidia-ml.so.1` (the only libraries ever loaded),
//! and the one conversion of a looked-up address into a typed C function
//! pointer ([`function_at`]), which every call into those libraries goes
//! through.

use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A C function pointer type, `unsafe extern "C" fn(..) -> R`: the only
/// types [`function_at`] converts an address into.
///
/// # Safety
/// Implemented (below, for every arity the driver API and NVML need) only
/// for `unsafe extern "C" fn` pointer types, which are one address wide and
/// never null.
pub unsafe trait CFunction: Copy {}

macro_rules! c_function_arities {
    ($(($($arg:ident),*)),* $(,)?) => {$(
        // SAFETY: an `unsafe extern "C" fn` pointer type, as the trait requires.
        unsafe impl<R, $($arg),*> CFunction for unsafe extern "C" fn($($arg),*) -> R {}
    )*};
}

c_function_arities!(
    (),
    (A),
    (A, B),
    (A, B, C),
    (A, B, C, D),
    (A, B, C, D, E),
    (A, B, C, D, E, F),
    (A, B, C, D, E, F, G),
    (A, B, C, D, E, F, G, H),
    (A, B, C, D, E, F, G, H, I),
    (A, B, C, D, E, F, G, H, I, J),
    (A, B, C, D, E, F, G, H, I, J, K),
);

/// The function at `address` as the C function type `F`; `None` for 0 (a
/// symbol the library does not have).
///
/// This is the interceptor's one address-to-function conversion: the hook
/// table's `real::<Hook>()`, the driver's and NVML's helper functions and
/// glibc's `dlsym` all come through here.
///
/// # Safety
/// A non-zero `address` is the entry point of a function whose C signature
/// is exactly `F` (the same parameter and return types, the C calling
/// convention), and stays loaded for as long as the result is used (the
/// libraries here are never closed).
#[inline(always)]
pub unsafe fn function_at<F: CFunction>(address: usize) -> Option<F> {
    const { assert!(std::mem::size_of::<F>() == std::mem::size_of::<usize>()) };
    if address == 0 {
        return None;
    }
    // SAFETY: `F` is a function pointer type of the same size as `usize`
    // (asserted above, guaranteed by `CFunction`), the address is non-zero,
    // and the caller vouches that a function of type `F` lives there.
    Some(unsafe { std::mem::transmute_copy::<usize, F>(&address) })
}

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
///
/// # Safety
/// `dlsym`'s own contract: `handle` is a handle from `dlopen` or one of the
/// pseudo-handles, and `name` is null or a NUL-terminated string.
pub unsafe fn real_dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    // SAFETY: real_dlsym_address is glibc's dlsym (or aborts), whose C
    // signature is DlsymFn.
    let dlsym = unsafe { function_at::<DlsymFn>(real_dlsym_address()) };
    let Some(dlsym) = dlsym else {
        return std::ptr::null_mut();
    };
    // SAFETY: forwarding the caller's arguments, valid by this function's
    // contract.
    unsafe { dlsym(handle, name) }
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
        // SAFETY: a handle dlopen returned (never closed) and a
        // NUL-terminated name.
        unsafe { real_dlsym(self.handle as *mut c_void, name.as_ptr()) as usize }
    }

    /// The function `name` in this library as the C function type `F`,
    /// `None` if the library lacks it.
    ///
    /// # Safety
    /// `F` is the C signature of `name` as the library's headers declare it.
    pub unsafe fn function<F: CFunction>(&self, name: &CStr) -> Option<F> {
        // SAFETY: the library is never closed, and the caller vouches that
        // `name` has the type `F`.
        unsafe { function_at::<F>(self.symbol(name)) }
    }
}
