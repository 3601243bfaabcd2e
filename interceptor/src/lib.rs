//! `libtessera-cuda.so`, preloaded into GPU containers (`LD_PRELOAD` or
//! `/etc/ld.so.preload`): the process sees a GPU of exactly its slice and
//! cannot take more.
//!
//! How the pieces fit:
//! - [`config`] reads the caps (`CUDA_DEVICE_MEMORY_LIMIT[_<i>]`), the shared
//!   region path and the log level once, on the first intercepted call.
//! - `hook_table` lists every intercepted entry point, one typed row each
//!   (its C function type, names, `cuGetProcAddress` version and flags).
//!   `loader` reaches the real `libcuda.so.1` / `libnvidia-ml.so.1` (lazily)
//!   and holds the one address-to-function conversion (`function_at`);
//!   `driver` resolves every row in the driver and hands a hook its real
//!   function typed as its row says (`state::real!`); `nvml` is the one
//!   binding of NVML.
//! - `cuda_hooks`, `vmm`, `extra_hooks`, `graph_mem`, `launch_hooks` and
//!   `nvml_hooks` are the exported entry points; `interpose` names our hook
//!   for each row (checked against the row's type) and swaps it in where
//!   the application looks a function up: `dlsym` overrides glibc's lookup
//!   and `cuGetProcAddress` is hooked there, so programs reach the hooks
//!   however they find the driver. ABI structures are in `ffi`.
//! - `cards` maps CUDA ordinals to the container's cards (by UUID), which
//!   is how caps and counters are numbered.
//! - `accounting` charges the container's account in the shared region
//!   (`region`, layout in `tessera_api::shared_region`) and remembers each
//!   allocation's charge in a lock-free table (`ptr_table`); `vmm` keeps
//!   `cuMemCreate` memory charged until its handle is released and its last
//!   mapping is gone; `extra_hooks` charges mipmapped arrays and context
//!   limits and finds the card of a memory pool; `graph_mem` charges what the
//!   driver reserves for graph memory nodes; `lmem` the local memory
//!   (stacks) kernels need; `driver_overhead` what the driver loads at
//!   kernels' first launches, reconciled with NVML's reading.
//! - `state` holds the lazily created process-wide state and the fork handler.
//! - `launch_hooks` are the kernel-launch entry points; they pass the SM
//!   limiter's gate (`sm_limiter`: one relaxed load when nothing is
//!   governed), which spends from the container's per-card token bucket in
//!   the shared region. One elected process per container runs the updater
//!   thread (`sm_updater`) that refills the buckets at the rate the pure
//!   [`sm_controller`] computes from NVML's utilisation figures, publishes
//!   the container's launch figures in its own region, and reads the
//!   card's node-wide tenant table that the node agent builds from them
//!   (`card_table`, read-only) for the default policy and priorities. [`sm_config`]
//!   reads the compute settings.
//!
//! Nothing runs at load time. The hooks are `unsafe extern "C"` functions
//! whose contracts are those of the CUDA driver API and NVML.
// Every unsafe block says why it is sound; every unsafe fn documents its
// contract (`# Safety`; a hook's is the driver API's or NVML's).
#![warn(clippy::undocumented_unsafe_blocks)]
#![allow(non_snake_case)]
// exported under the driver's names.
// Unit-test builds export nothing (the hooks would interpose on the test
// binary), which leaves the export-only paths unused there.
#![cfg_attr(test, allow(dead_code))]

mod accounting;
mod card_table;
mod cards;
pub mod config;
mod cuda_hooks;
mod dlsym;
mod driver;
mod driver_overhead;
#[cfg(test)]
mod env_contract_tests;
mod extra_hooks;
mod ffi;
mod graph_mem;
mod hook_table;
mod host_pid;
mod interpose;
mod launch_hooks;
mod lmem;
mod loader;
mod log;
mod nvml;
mod nvml_hooks;
mod ptr_table;
mod region;
pub mod sm_config;
pub mod sm_controller;
mod sm_limiter;
mod sm_updater;
mod state;
mod vmm;

/// Clippy's `missing_safety_doc` checks only functions the crate exports
/// from its Rust API, and the hooks live in private modules: this test
/// holds every `unsafe fn` of the crate to it instead.
#[cfg(test)]
mod unsafe_contracts {
    /// `(file, line)` of every `unsafe fn` whose doc comment has no
    /// `# Safety` section.
    fn undocumented(file: &str, source: &str) -> Vec<String> {
        let lines: Vec<&str> = source.lines().collect();
        let mut missing = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let code = line.trim_start();
            let code = code
                .strip_prefix("pub(crate) ")
                .or_else(|| code.strip_prefix("pub "))
                .unwrap_or(code);
            let declares = code.starts_with("unsafe fn ")
                || code.starts_with("unsafe extern \"C\" fn ")
                || code.starts_with("const unsafe fn ");
            if !declares {
                continue;
            }
            let documented = lines[..i]
                .iter()
                .rev()
                .map(|l| l.trim_start())
                .take_while(|l| l.starts_with("///") || l.starts_with("#[") || l.starts_with("//"))
                .any(|l| l == "/// # Safety");
            if !documented {
                missing.push(format!("{file}:{}", i + 1));
            }
        }
        missing
    }

    #[test]
    fn every_unsafe_fn_documents_its_safety() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
        let mut missing = Vec::new();
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).expect("the crate's src/ is readable") {
            let path = entry.expect("a directory entry").path();
            if path.extension().is_some_and(|e| e == "rs") {
                let source = std::fs::read_to_string(&path).expect("a readable source file");
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                missing.extend(undocumented(&name, &source));
                checked += 1;
            }
        }
        assert!(checked > 20, "only {checked} source files found in {dir}");
        assert!(
            missing.is_empty(),
            "unsafe fns without `# Safety`: {missing:?}"
        );
    }

    #[test]
    fn an_undocumented_unsafe_fn_is_found() {
        let source = "/// Does a thing.\npub unsafe fn thing() {}\n\
                      /// # Safety\n/// None.\n#[inline]\npub unsafe extern \"C\" fn other() {}\n\
                      type F = unsafe extern \"C\" fn();\n";
        assert_eq!(undocumented("x.rs", source), vec!["x.rs:2"]);
    }
}
