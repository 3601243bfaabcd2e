//! The intercepted kernel-launch entry points: `cuLaunchKernel`,
//! `cuLaunchKernelEx`, `cuLaunchCooperativeKernel`, `cuGraphLaunch` and
//! their per-thread-default-stream (`_ptsz`) variants. Each passes the SM
//! limiter's gate ([`sm_limiter::admit`]) with the launch's cost, then
//! forwards its exact arguments. With no SM cap and no priority the gate is
//! one relaxed atomic load and the cost is never computed.
//!
//! Not governed: `cuLaunchCooperativeKernelMultiDevice` (deprecated since
//! CUDA 11.3) and `cuLaunchHostFunc` (host work).

use crate::driver::Hook;
use crate::ffi::*;
use crate::sm_limiter::{self, graph_cost, launch_cost};
use crate::state;
use std::ffi::{c_uint, c_void};

type LaunchFn = unsafe extern "C" fn(
    Opaque,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    Opaque,
    *mut *mut c_void,
    *mut *mut c_void,
) -> CuResult;
type CooperativeFn = unsafe extern "C" fn(
    Opaque,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    Opaque,
    *mut *mut c_void,
) -> CuResult;
type LaunchExFn = unsafe extern "C" fn(
    *const LaunchConfig,
    Opaque,
    *mut *mut c_void,
    *mut *mut c_void,
) -> CuResult;
type GraphLaunchFn = unsafe extern "C" fn(Opaque, Opaque) -> CuResult;

/// The real function for `$hook` as `$ty`, or `CUDA_ERROR_NOT_FOUND`.
macro_rules! real {
    ($hook:expr, $ty:ty) => {
        match state::cuda().and_then(|d| d.real($hook)) {
            // SAFETY: the driver's implementation of this entry point, whose
            // C signature is `$ty`.
            Some(f) => unsafe { std::mem::transmute::<usize, $ty>(f) },
            None => return CUDA_ERROR_NOT_FOUND,
        }
    };
}

/// The gate, then `launch`.
#[inline(always)]
fn governed(cost: impl FnOnce() -> u64, launch: impl FnOnce() -> CuResult) -> CuResult {
    match sm_limiter::admit(cost) {
        Ok(()) => launch(),
        Err(rc) => rc,
    }
}

/// A hook for a launch taking the grid and block shape as arguments:
/// `f`, grid, block, shared bytes, stream, kernel parameters, then `$tail`
/// (`extra` for `cuLaunchKernel`, nothing for the cooperative launch).
macro_rules! grid_launch_hook {
    ($name:ident, $hook:expr, $real:ty $(, $tail:ident: $tail_ty:ty)*) => {
        #[cfg_attr(not(test), no_mangle)]
        pub unsafe extern "C" fn $name(
            f: Opaque,
            gx: c_uint,
            gy: c_uint,
            gz: c_uint,
            bx: c_uint,
            by: c_uint,
            bz: c_uint,
            shared: c_uint,
            stream: Opaque,
            params: *mut *mut c_void,
            $($tail: $tail_ty,)*
        ) -> CuResult {
            let real = real!($hook, $real);
            governed(
                || launch_cost([gx, gy, gz], [bx, by, bz]),
                // SAFETY: forwarding the caller's arguments.
                || unsafe { real(f, gx, gy, gz, bx, by, bz, shared, stream, params $(, $tail)*) },
            )
        }
    };
}

macro_rules! launch_ex_hook {
    ($name:ident, $hook:expr) => {
        #[cfg_attr(not(test), no_mangle)]
        pub unsafe extern "C" fn $name(
            config: *const LaunchConfig,
            f: Opaque,
            params: *mut *mut c_void,
            extra: *mut *mut c_void,
        ) -> CuResult {
            let real = real!($hook, LaunchExFn);
            governed(
                || {
                    if config.is_null() {
                        return 1;
                    }
                    // SAFETY: non-null CUlaunchConfig from the caller.
                    let c = unsafe { &*config };
                    launch_cost(
                        [c.grid_dim_x, c.grid_dim_y, c.grid_dim_z],
                        [c.block_dim_x, c.block_dim_y, c.block_dim_z],
                    )
                },
                // SAFETY: forwarding the caller's arguments.
                || unsafe { real(config, f, params, extra) },
            )
        }
    };
}

macro_rules! graph_hook {
    ($name:ident, $hook:expr) => {
        #[cfg_attr(not(test), no_mangle)]
        pub unsafe extern "C" fn $name(exec: Opaque, stream: Opaque) -> CuResult {
            let real = real!($hook, GraphLaunchFn);
            // SAFETY: forwarding the caller's arguments.
            let rc = governed(graph_cost, || unsafe { real(exec, stream) });
            // Graph memory nodes reserve memory at launch (one relaxed load
            // when the process has none).
            crate::graph_mem::after_launch();
            rc
        }
    };
}

grid_launch_hook!(cuLaunchKernel, Hook::LaunchKernel, LaunchFn, extra: *mut *mut c_void);
grid_launch_hook!(
    cuLaunchKernel_ptsz,
    Hook::LaunchKernelPtsz,
    LaunchFn,
    extra: *mut *mut c_void
);
grid_launch_hook!(
    cuLaunchCooperativeKernel,
    Hook::LaunchCooperativeKernel,
    CooperativeFn
);
grid_launch_hook!(
    cuLaunchCooperativeKernel_ptsz,
    Hook::LaunchCooperativeKernelPtsz,
    CooperativeFn
);
launch_ex_hook!(cuLaunchKernelEx, Hook::LaunchKernelEx);
launch_ex_hook!(cuLaunchKernelEx_ptsz, Hook::LaunchKernelExPtsz);
graph_hook!(cuGraphLaunch, Hook::GraphLaunch);
graph_hook!(cuGraphLaunch_ptsz, Hook::GraphLaunchPtsz);
