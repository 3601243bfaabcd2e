//! Logging to stderr at `LIBCUDA_LOG_LEVEL` (HAMi's scale: 0 errors only,
//! 1 warnings, the default, 2 info, 3 and above debug). The level is read once
//! with the configuration; a message below it costs one relaxed atomic load.
//! Nothing logs on the success path of a hooked call.

use std::sync::atomic::{AtomicU8, Ordering};

/// Errors only.
pub const ERROR: u8 = 0;
/// Warnings and errors.
pub const WARN: u8 = 1;
/// Informational messages (attach, context charges).
pub const INFO: u8 = 2;
/// Debug messages, including the `timing:` lines of the cold paths (region
/// attach, NVML start-up, context measurement).
pub const DEBUG: u8 = 3;

static LEVEL: AtomicU8 = AtomicU8::new(WARN);

/// Sets the level (from the configuration).
pub fn set_level(level: u8) {
    LEVEL.store(level, Ordering::Relaxed);
}

/// Whether messages at `level` are printed.
pub fn enabled(level: u8) -> bool {
    level <= LEVEL.load(Ordering::Relaxed)
}

/// Prints one line: `[tessera-cuda pid=N LEVEL] message`.
pub fn emit(level: u8, args: std::fmt::Arguments<'_>) {
    let name = match level {
        ERROR => "ERROR",
        WARN => "WARN",
        INFO => "INFO",
        _ => "DEBUG", // 3 and above
    };
    eprintln!("[tessera-cuda pid={} {name}] {args}", std::process::id());
}

/// Logs at a level if enabled: `log!(log::WARN, "...", args)`.
macro_rules! log {
    ($level:expr, $($arg:tt)*) => {
        if $crate::log::enabled($level) {
            $crate::log::emit($level, format_args!($($arg)*));
        }
    };
}
pub(crate) use log;
