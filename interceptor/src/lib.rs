//! `libtessera-cuda.so`, preloaded into GPU containers (`LD_PRELOAD` or
//! `/etc/ld.so.preload`): the process sees a GPU of exactly its slice and
//! cannot take more.
//!
//! How the pieces fit:
//! - [`config`] reads the caps (`CUDA_DEVICE_MEMORY_LIMIT[_<i>]`), the shared
//!   region path and the log level once, on the first intercepted call.
//! - `loader` and `driver` find the real `libcuda.so.1` / `libnvidia-ml.so.1`
//!   (lazily) and keep the hook table, by address.
//! - `cuda_hooks` and `nvml_hooks` are the exported entry points; `dlsym`
//!   overrides glibc's lookup and `cuGetProcAddress` is hooked, so programs
//!   reach the hooks however they find the driver.
//! - `cards` maps CUDA ordinals to the container's cards (by UUID), which
//!   is how caps and counters are numbered.
//! - `accounting` charges the container's account in the shared region
//!   (`region`, layout in `tessera_api::shared_region`) and remembers each
//!   allocation's charge in a lock-free table (`ptr_table`).
//! - `state` holds the lazily created process-wide state and the fork handler.
//!
//! Nothing runs at load time. The hooks are `unsafe extern "C"` functions
//! whose contracts are those of the CUDA driver API and NVML.
#![allow(clippy::missing_safety_doc)] // C ABI hooks: contracts are the driver API's.
#![allow(non_snake_case)]
// exported under the driver's names.
// Unit-test builds export nothing (the hooks would interpose on the test
// binary), which leaves the export-only paths unused there.
#![cfg_attr(test, allow(dead_code))]

mod accounting;
mod cards;
pub mod config;
mod cuda_hooks;
mod dlsym;
mod driver;
mod ffi;
mod loader;
mod log;
mod nvml_hooks;
mod ptr_table;
mod region;
mod state;
