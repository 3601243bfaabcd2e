//! The intercepted kernel-launch entry points: `cuLaunchKernel`,
//! `cuLaunchKernelEx`, `cuLaunchCooperativeKernel`, `cuGraphLaunch` and
//! their per-thread-default-stream (`_ptsz`) variants. Each passes the SM
//! limiter's gate ([`sm_limiter::admit`]) with the launch's cost, then
//! forwards its exact arguments. With no SM cap and no priority the gate is
//! one relaxed atomic load and the cost is never computed. Under a memory
//! cap each launch also passes [`lmem`] (the local memory the driver
//! reserves for the kernel).
//!
//! Not governed: `cuLaunchCooperativeKernelMultiDevice` (deprecated since
//! CUDA 11.3) and `cuLaunchHostFunc` (host work).

use crate::ffi::*;
use crate::lmem;
use crate::sm_limiter::{self, graph_cost, launch_cost};
use crate::state::real;
use std::ffi::{c_uint, c_void};

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
    ($name:ident, $hook:ident $(, $tail:ident: $tail_ty:ty)*) => {
        /// # Safety
        /// The driver API's contract for this launch: `f` a loaded kernel,
        /// `params` (and `extra`) as the kernel's parameters require.
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
            let real = real!($hook);
            let after = match lmem::before_launch(f) {
                Ok(after) => after,
                Err(rc) => return rc,
            };
            let rc = governed(
                || launch_cost([gx, gy, gz], [bx, by, bz]),
                || {
                    // SAFETY: forwarding the caller's arguments.
                    unsafe { real(f, gx, gy, gz, bx, by, bz, shared, stream, params $(, $tail)*) }
                },
            );
            lmem::after_launch(after);
            rc
        }
    };
}

macro_rules! launch_ex_hook {
    ($name:ident, $hook:ident) => {
        /// # Safety
        /// `cuLaunchKernelEx`'s contract: `config` null or a valid
        /// `CUlaunchConfig`, `f` a loaded kernel, `params` and `extra` as
        /// the kernel's parameters require.
        #[cfg_attr(not(test), no_mangle)]
        pub unsafe extern "C" fn $name(
            config: *const LaunchConfig,
            f: Opaque,
            params: *mut *mut c_void,
            extra: *mut *mut c_void,
        ) -> CuResult {
            let real = real!($hook);
            let after = match lmem::before_launch(f) {
                Ok(after) => after,
                Err(rc) => return rc,
            };
            let rc = governed(
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
                || {
                    // SAFETY: forwarding the caller's arguments.
                    unsafe { real(config, f, params, extra) }
                },
            );
            lmem::after_launch(after);
            rc
        }
    };
}

macro_rules! graph_hook {
    ($name:ident, $hook:ident) => {
        /// # Safety
        /// None beyond the driver's: the graph and stream are opaque.
        #[cfg_attr(not(test), no_mangle)]
        pub unsafe extern "C" fn $name(exec: Opaque, stream: Opaque) -> CuResult {
            let real = real!($hook);
            let rc = governed(graph_cost, || {
                // SAFETY: forwarding the caller's arguments.
                unsafe { real(exec, stream) }
            });
            // Graph memory nodes reserve memory at launch (one relaxed load
            // when the process has none).
            crate::graph_mem::after_launch();
            // Its kernels' stacks are sized at launch.
            lmem::after_graph_launch();
            rc
        }
    };
}

grid_launch_hook!(cuLaunchKernel, LaunchKernel, extra: *mut *mut c_void);
grid_launch_hook!(cuLaunchKernel_ptsz, LaunchKernelPtsz, extra: *mut *mut c_void);
grid_launch_hook!(cuLaunchCooperativeKernel, LaunchCooperativeKernel);
grid_launch_hook!(cuLaunchCooperativeKernel_ptsz, LaunchCooperativeKernelPtsz);
launch_ex_hook!(cuLaunchKernelEx, LaunchKernelEx);
launch_ex_hook!(cuLaunchKernelEx_ptsz, LaunchKernelExPtsz);
graph_hook!(cuGraphLaunch, GraphLaunch);
graph_hook!(cuGraphLaunch_ptsz, GraphLaunchPtsz);
