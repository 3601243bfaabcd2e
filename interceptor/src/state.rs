//! Process-wide state, created on first use (nothing runs at load time):
//! the configuration, the real driver and NVML, and the accounting. Each is
//! a `OnceLock`, so after the first call reaching one costs an atomic load.
//! Also the fork handler and the re-entrancy guard for initialisation.

use crate::accounting::Accounting;
use crate::config::{Config, ConfigError};
use crate::driver::{CudaDriver, NvmlLibrary};
use crate::ffi::{CuResult, CUDA_ERROR_NOT_INITIALIZED};
use crate::log::{self, log, ERROR};
use std::cell::Cell;
use std::sync::OnceLock;

static CONFIG: OnceLock<Result<Config, ConfigError>> = OnceLock::new();
static CUDA: OnceLock<Option<CudaDriver>> = OnceLock::new();
static NVML: OnceLock<Option<NvmlLibrary>> = OnceLock::new();
static ACCOUNTING: OnceLock<Option<Accounting>> = OnceLock::new();

thread_local! {
    /// Set while this thread initialises one of the above, so a call that
    /// comes back into us from inside `dlopen` passes through instead of
    /// waiting on itself.
    static INITIALISING: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is inside our initialisation.
pub fn initialising() -> bool {
    INITIALISING.with(Cell::get)
}

fn guarded<T>(init: impl FnOnce() -> T) -> T {
    INITIALISING.with(|flag| flag.set(true));
    let value = init();
    INITIALISING.with(|flag| flag.set(false));
    value
}

/// The configuration, or `Err` (already reported once on stderr) when a cap
/// is set but unparsable: the caller then refuses to work (fail closed).
#[inline]
pub fn config() -> Result<&'static Config, CuResult> {
    CONFIG
        .get_or_init(|| {
            let config = Config::from_env();
            match &config {
                Ok(c) => log::set_level(c.log_level),
                Err(e) => eprintln!(
                    "[tessera-cuda pid={}] ERROR: invalid GPU memory cap, CUDA initialisation refused: {e}",
                    std::process::id()
                ),
            }
            config
        })
        .as_ref()
        .map_err(|_| CUDA_ERROR_NOT_INITIALIZED)
}

/// The real driver (`None` if `libcuda.so.1` cannot be loaded).
#[inline]
pub fn cuda() -> Option<&'static CudaDriver> {
    CUDA.get_or_init(|| guarded(CudaDriver::load)).as_ref()
}

/// Real NVML (`None` if `libnvidia-ml.so.1` cannot be loaded).
pub fn nvml() -> Option<&'static NvmlLibrary> {
    NVML.get_or_init(|| guarded(NvmlLibrary::load)).as_ref()
}

/// The accounting: `Ok(None)` when nothing is capped (pass-through), `Err`
/// when the configuration or the shared region is unusable (fail closed).
#[inline]
pub fn accounting() -> Result<Option<&'static Accounting>, CuResult> {
    let config = config()?;
    if config.is_pass_through() {
        return Ok(None);
    }
    ACCOUNTING
        .get_or_init(|| {
            guarded(|| match Accounting::attach(config) {
                Ok(accounting) => {
                    register_process_handlers();
                    Some(accounting)
                }
                Err(e) => {
                    log!(
                        ERROR,
                        "cannot use the shared accounting region, CUDA refused: {e}"
                    );
                    None
                }
            })
        })
        .as_ref()
        .map(Some)
        .ok_or(CUDA_ERROR_NOT_INITIALIZED)
}

fn register_process_handlers() {
    extern "C" fn in_child() {
        if let Some(Some(accounting)) = ACCOUNTING.get() {
            accounting.after_fork_in_child();
        }
    }
    extern "C" fn at_exit() {
        if let Some(Some(accounting)) = ACCOUNTING.get() {
            accounting.release_all();
        }
    }
    // SAFETY: registering handlers that only touch our own state. This
    // library is never unloaded (preloaded), so the handlers stay valid.
    unsafe {
        libc::pthread_atfork(None, None, Some(in_child));
        libc::atexit(at_exit);
    }
}
