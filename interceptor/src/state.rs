//! Process-wide state, created on first use (nothing runs at load time):
//! the configuration, the real driver and NVML, and the accounting; and
//! [`real!`], how a hook reaches the real function of its row. Each is
//! a `OnceLock`, so after the first call reaching one costs an atomic load.
//! Also the fork handler and the re-entrancy guard for initialisation.
//!
//! NVML is the one thing initialised on a thread of ours (the warm-up helper
//! started at `cuInit`), so it sits in a [`ForkSafeOnce`]: a child forked
//! while the helper was at work does not wait forever for a thread it does
//! not have, and an exit while it is at work waits for it (NVML's
//! destructors must not run under it).

use crate::accounting::Accounting;
use crate::config::{Config, ConfigError};
use crate::driver::CudaDriver;
use crate::ffi::{CuResult, CUDA_ERROR_NOT_INITIALIZED};
use crate::log::{self, log, ERROR};
use crate::nvml::NvmlLibrary;
use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static CONFIG: OnceLock<Result<Config, ConfigError>> = OnceLock::new();
static CUDA: OnceLock<Option<CudaDriver>> = OnceLock::new();
static NVML: ForkSafeOnce<Option<NvmlLibrary>> = ForkSafeOnce::new();
static NVML_INITIALISED: ForkSafeOnce<Option<&'static NvmlLibrary>> = ForkSafeOnce::new();
static ACCOUNTING: OnceLock<Option<Accounting>> = OnceLock::new();
/// What the real `cuInit` answered: [`CUDA_INIT_PENDING`] until it returns.
static CUDA_INIT: std::sync::atomic::AtomicI32 =
    std::sync::atomic::AtomicI32::new(CUDA_INIT_PENDING);
const CUDA_INIT_PENDING: i32 = -1;

/// The real driver function of CUDA row `$row` (a `CudaHook` of
/// `hook_table`, by name), typed as the row says; returns
/// `CUDA_ERROR_NOT_FOUND` from the calling hook when the driver lacks it.
/// After the first call this is the driver's `OnceLock` read and one load
/// from its table: no lock, system call or environment read.
macro_rules! real {
    ($row:ident) => {
        match $crate::state::cuda().and_then(|driver| driver.real::<$crate::hook_table::$row>()) {
            Some(function) => function,
            None => return $crate::ffi::CUDA_ERROR_NOT_FOUND,
        }
    };
}
pub(crate) use real;

/// Called by the `cuInit` hook with the driver's answer.
pub fn cuda_initialised(rc: CuResult) {
    CUDA_INIT.store(rc, Ordering::Release);
}

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
    let outer = INITIALISING.with(|flag| flag.replace(true));
    let value = init();
    INITIALISING.with(|flag| flag.set(outer));
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
                Ok(c) => {
                    log::set_level(c.log_level);
                    for warning in &c.warnings {
                        log!(log::WARN, "{warning}");
                    }
                }
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

/// Real NVML (`None` if `libnvidia-ml.so.1` cannot be loaded, or when
/// asked from inside our own initialisation of it).
pub fn nvml() -> Option<&'static NvmlLibrary> {
    NVML.get_or_init(|| guarded(NvmlLibrary::load))?.as_ref()
}

/// NVML loaded and initialised (`nvmlInit_v2`) for measuring contexts:
/// `None` when it cannot be. Started early on a helper thread by
/// [`start_nvml_warm_up`]; a caller that comes while the helper is still at
/// it waits for it.
pub fn measuring_nvml() -> Option<&'static NvmlLibrary> {
    NVML_INITIALISED
        .get_or_init(|| {
            let started = log::enabled(log::DEBUG).then(std::time::Instant::now);
            let nvml = nvml()?;
            let ready = nvml.initialise();
            if let Some(t) = started {
                log!(
                    log::DEBUG,
                    "timing: NVML load and nvmlInit_v2 {} us (ok: {ready})",
                    t.elapsed().as_micros()
                );
            }
            let nvml = ready.then_some(nvml)?;
            // Card handles too, once the driver can name the cards (the
            // helper starts before the driver's own cuInit returns).
            let deadline = Instant::now() + Duration::from_secs(1);
            while CUDA_INIT.load(Ordering::Acquire) == CUDA_INIT_PENDING
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_micros(200));
            }
            if CUDA_INIT.load(Ordering::Acquire) == crate::ffi::CUDA_SUCCESS {
                let t = log::enabled(log::DEBUG).then(Instant::now);
                crate::nvml_hooks::prefetch_card_handles(nvml);
                if let Some(t) = t {
                    log!(
                        log::DEBUG,
                        "timing: NVML card handles looked up in advance in {} us",
                        t.elapsed().as_micros()
                    );
                }
            }
            Some(nvml)
        })
        .copied()
        .flatten()
}

/// Starts loading and initialising NVML on a helper thread, so that it
/// overlaps the driver's own initialisation instead of delaying the first
/// context; the thread first asks the node agent for our host pid
/// ([`crate::host_pid`]). Called from `cuInit` when a cap is set; at most one helper.
pub fn start_nvml_warm_up() {
    if NVML_INITIALISED.started() {
        return;
    }
    // If the thread cannot be made, the first context does the work itself.
    let _ = std::thread::Builder::new()
        .name("tessera-nvml".into())
        .spawn(|| {
            // Inside a pid namespace: the host pid NVML lists us under,
            // from the node agent (a few microseconds; before NVML, so the
            // first context finds it).
            crate::host_pid::learn_in_advance();
            measuring_nvml();
        });
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
        NVML.forget_unfinished();
        NVML_INITIALISED.forget_unfinished();
        if let Some(Some(accounting)) = ACCOUNTING.get() {
            accounting.after_fork_in_child();
        }
    }
    extern "C" fn at_exit() {
        if let Some(Some(accounting)) = ACCOUNTING.get() {
            accounting.release_all();
        }
        NVML_INITIALISED.wait_while_running(Duration::from_secs(2));
    }
    // SAFETY: registering handlers that only touch our own state. This
    // library is never unloaded (preloaded), so the handlers stay valid.
    unsafe {
        libc::pthread_atfork(None, None, Some(in_child));
        libc::atexit(at_exit);
    }
}

/// A once-cell that may be filled by a helper thread and survives `fork`:
/// a child whose parent was filling it at the fork starts over instead of
/// waiting for a thread that does not exist in it.
pub struct ForkSafeOnce<T> {
    state: AtomicU8,
    value: OnceLock<T>,
}

const IDLE: u8 = 0;
const RUNNING: u8 = 1;
const DONE: u8 = 2;

impl<T> ForkSafeOnce<T> {
    /// An empty cell.
    pub const fn new() -> Self {
        Self {
            state: AtomicU8::new(IDLE),
            value: OnceLock::new(),
        }
    }

    /// The value, filling it with `init` if nobody has; waits while another
    /// thread fills it. `None` only when this very thread is inside our
    /// initialisation (a re-entrant call must not wait on itself).
    pub fn get_or_init(&self, init: impl FnOnce() -> T) -> Option<&T> {
        let mut init = Some(init);
        loop {
            if let Some(value) = self.value.get() {
                return Some(value);
            }
            match self
                .state
                .compare_exchange(IDLE, RUNNING, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    let make = init.take().expect("initialiser runs once");
                    let _ = self.value.set(guarded(make));
                    self.state.store(DONE, Ordering::Release);
                }
                Err(_) if initialising() => return None,
                Err(_) => std::thread::sleep(Duration::from_micros(100)),
            }
        }
    }

    /// Whether someone has started (or finished) filling it.
    pub fn started(&self) -> bool {
        self.state.load(Ordering::Acquire) != IDLE
    }

    /// In a child after fork: a fill that was running in the parent will
    /// never finish here; let the child's own first caller do it.
    pub fn forget_unfinished(&self) {
        let _ = self
            .state
            .compare_exchange(RUNNING, IDLE, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Waits (at most `limit`) for a fill in progress to finish.
    pub fn wait_while_running(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.state.load(Ordering::Acquire) == RUNNING && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}
