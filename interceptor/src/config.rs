//! The container environment, read once: memory caps per visible card, the
//! container's card UUIDs (which physical card each `_<i>` cap is for), the
//! shared region's path and the log level. A cap that is set but cannot be
//! parsed is an error (the interceptor then refuses CUDA initialisation);
//! no cap at all means pass-through. A cap of zero (`0`, `0m`, ...) means
//! "no cap" on that card, as in HAMi-core, with a warning.

use std::path::PathBuf;
use tessera_api::container_env::{
    parse_memory_limit, MemoryLimitError, LOG_LEVEL, MEMORY_LIMIT_ALL, MEMORY_LIMIT_PREFIX,
    PID_SOCKET, SHARED_CACHE, VISIBLE_DEVICES,
};
use tessera_api::shared_region::MAX_DEVICES;
use tessera_api::visible_cards::{parse_visible_uuids, VISIBLE_UUIDS};
use thiserror::Error;

/// Set to `1`: measure every context by the card-wide NVML reading before
/// and after it, even where NVML lists this process by its own pid (for
/// drivers whose process lists cannot be trusted, and for tests).
pub const MEASURE_CONTEXT_CARD_WIDE: &str = "TESSERA_MEASURE_CONTEXT_CARD_WIDE";

/// Set to `1`: act as inside a pid namespace (NVML does not list this
/// process by its own pid; ask the agent's socket) wherever the process
/// runs; for tests, which cannot make a pid namespace.
pub const ASSUME_PID_NAMESPACE: &str = "TESSERA_ASSUME_PID_NAMESPACE";

/// What the interceptor enforces in this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Cap in bytes per visible card index; `None` = not capped.
    pub limits: [Option<u64>; MAX_DEVICES],
    /// The container's cards in cap order (`TESSERA_VISIBLE_UUIDS`, else
    /// `NVIDIA_VISIBLE_DEVICES` when it is a UUID list); `None` = CUDA
    /// ordinal `i` is taken to be card `i`.
    pub visible_uuids: Option<Vec<String>>,
    /// The list came from the node agent's own variable: a card missing
    /// from it is not the container's and is refused.
    pub visible_uuids_from_agent: bool,
    /// Region shared by the container's processes; `None` = a private one.
    pub shared_region: Option<PathBuf>,
    /// `LIBCUDA_LOG_LEVEL`.
    pub log_level: u8,
    /// [`MEASURE_CONTEXT_CARD_WIDE`] is `1`.
    pub measure_context_card_wide: bool,
    /// The node agent's host-pid socket (`TESSERA_PID_SOCKET`).
    pub pid_socket: Option<PathBuf>,
    /// [`ASSUME_PID_NAMESPACE`] is `1`.
    pub assume_pid_namespace: bool,
    /// Settings taken in HAMi-core's sense rather than refused (a zero
    /// cap), to print once as warnings.
    pub warnings: Vec<String>,
}

/// A configuration the interceptor refuses to run with.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// A cap value is not a size.
    #[error("{var}={value:?}: {source}")]
    BadLimit {
        /// Variable name.
        var: String,
        /// Its value.
        value: String,
        /// Why it was refused.
        source: MemoryLimitError,
    },
    /// `CUDA_DEVICE_MEMORY_LIMIT_<x>` where `<x>` is not a card index we support.
    #[error("{var} does not name a card: the suffix must be an index from 0 to {}", MAX_DEVICES - 1)]
    BadIndex {
        /// Variable name.
        var: String,
    },
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        let vars = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned())));
        Self::from_vars(vars)
    }

    /// Builds the configuration from `(name, value)` pairs.
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut all = None;
        // Outer `Some`: the card's own variable is set; inner `None`: it
        // says "no cap" (zero), which overrides the all-cards value.
        let mut per_card: [Option<Option<u64>>; MAX_DEVICES] = [None; MAX_DEVICES];
        let mut warnings = Vec::new();
        let mut shared_region = None;
        let mut log_level = crate::log::WARN;
        let (mut tessera_uuids, mut runtime_uuids) = (None, None);
        let mut measure_context_card_wide = false;
        let mut pid_socket = None;
        let mut assume_pid_namespace = false;
        for (name, value) in vars {
            if name == MEMORY_LIMIT_ALL {
                all = parse(&name, &value, &mut warnings)?;
            } else if let Some(suffix) = name.strip_prefix(MEMORY_LIMIT_PREFIX) {
                let index = suffix
                    .parse::<usize>()
                    .ok()
                    .filter(|&i| i < MAX_DEVICES && !suffix.starts_with('+'))
                    .ok_or_else(|| ConfigError::BadIndex { var: name.clone() })?;
                per_card[index] = Some(parse(&name, &value, &mut warnings)?);
            } else if name == SHARED_CACHE && !value.is_empty() {
                shared_region = Some(PathBuf::from(value));
            } else if name == VISIBLE_UUIDS {
                tessera_uuids = parse_visible_uuids(&value);
            } else if name == VISIBLE_DEVICES {
                runtime_uuids = parse_visible_uuids(&value);
            } else if name == MEASURE_CONTEXT_CARD_WIDE {
                measure_context_card_wide = value.trim() == "1";
            } else if name == PID_SOCKET && !value.is_empty() {
                pid_socket = Some(PathBuf::from(value));
            } else if name == ASSUME_PID_NAMESPACE {
                assume_pid_namespace = value.trim() == "1";
            } else if name == LOG_LEVEL {
                // A bad log level is not worth refusing CUDA over.
                log_level = value.trim().parse().unwrap_or(crate::log::WARN);
            }
        }
        let mut limits = [None; MAX_DEVICES];
        for (limit, card) in limits.iter_mut().zip(per_card) {
            *limit = card.unwrap_or(all);
        }
        Ok(Config {
            warnings,
            limits,
            visible_uuids_from_agent: tessera_uuids.is_some(),
            visible_uuids: tessera_uuids.or(runtime_uuids),
            shared_region,
            log_level,
            measure_context_card_wide,
            pid_socket,
            assume_pid_namespace,
        })
    }

    /// No card is capped: every hook forwards untouched.
    pub fn is_pass_through(&self) -> bool {
        self.limits.iter().all(Option::is_none)
    }
}

/// A cap in bytes, `None` for a cap of zero (HAMi-core's "no limit").
fn parse(var: &str, value: &str, warnings: &mut Vec<String>) -> Result<Option<u64>, ConfigError> {
    match parse_memory_limit(value) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(MemoryLimitError::Zero(_)) => {
            warnings.push(format!(
                "{var}={value:?} is a cap of zero, which HAMi-core takes as no cap: this card is not capped"
            ));
            Ok(None)
        }
        Err(source) => Err(ConfigError::BadLimit {
            var: var.to_owned(),
            value: value.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn no_cap_is_pass_through() {
        let c = config(&[("PATH", "/bin")]).unwrap();
        assert!(c.is_pass_through());
        assert_eq!(c.log_level, crate::log::WARN);
    }

    #[test]
    fn per_card_overrides_all() {
        let c = config(&[
            ("CUDA_DEVICE_MEMORY_LIMIT", "10g"),
            ("CUDA_DEVICE_MEMORY_LIMIT_1", "7500m"),
            ("CUDA_DEVICE_MEMORY_SHARED_CACHE", "/tmp/x.cache"),
            ("LIBCUDA_LOG_LEVEL", "4"),
        ])
        .unwrap();
        assert_eq!(c.limits[0], Some(10 << 30));
        assert_eq!(c.limits[1], Some(7500 << 20));
        assert_eq!(c.limits[15], Some(10 << 30));
        assert_eq!(c.shared_region, Some(PathBuf::from("/tmp/x.cache")));
        assert_eq!(c.log_level, 4);
    }

    #[test]
    fn card_uuids_prefer_tesseras_list() {
        let c = config(&[("NVIDIA_VISIBLE_DEVICES", "GPU-b,GPU-a")]).unwrap();
        assert_eq!(c.visible_uuids, Some(vec!["GPU-b".into(), "GPU-a".into()]));
        assert!(!c.visible_uuids_from_agent);
        let c = config(&[
            ("NVIDIA_VISIBLE_DEVICES", "all"),
            ("TESSERA_VISIBLE_UUIDS", "GPU-x"),
        ])
        .unwrap();
        assert_eq!(c.visible_uuids, Some(vec!["GPU-x".into()]));
        assert!(c.visible_uuids_from_agent);
        let c = config(&[("NVIDIA_VISIBLE_DEVICES", "all")]).unwrap();
        assert_eq!(c.visible_uuids, None);
    }

    #[test]
    fn only_one_card_capped() {
        let c = config(&[("CUDA_DEVICE_MEMORY_LIMIT_0", "1024")]).unwrap();
        assert_eq!(c.limits[0], Some(1024));
        assert_eq!(c.limits[1], None);
        assert!(!c.is_pass_through());
    }

    #[test]
    fn bad_values_fail_closed() {
        let e = config(&[("CUDA_DEVICE_MEMORY_LIMIT_0", "ten gigs")]).unwrap_err();
        assert!(matches!(e, ConfigError::BadLimit { .. }), "{e}");
        assert!(e.to_string().contains("CUDA_DEVICE_MEMORY_LIMIT_0"));
        let e = config(&[("CUDA_DEVICE_MEMORY_LIMIT_x", "1g")]).unwrap_err();
        assert!(matches!(e, ConfigError::BadIndex { .. }));
        let e = config(&[("CUDA_DEVICE_MEMORY_LIMIT_16", "1g")]).unwrap_err();
        assert!(matches!(e, ConfigError::BadIndex { .. }));
        let e = config(&[("CUDA_DEVICE_MEMORY_LIMIT", "")]).unwrap_err();
        assert!(matches!(e, ConfigError::BadLimit { .. }));
    }

    #[test]
    fn a_zero_cap_is_no_cap_as_in_hami_core() {
        let c = config(&[("CUDA_DEVICE_MEMORY_LIMIT", "0m")]).unwrap();
        assert!(c.is_pass_through());
        assert_eq!(c.warnings.len(), 1);
        assert!(
            c.warnings[0].contains("CUDA_DEVICE_MEMORY_LIMIT"),
            "{:?}",
            c.warnings
        );
        // A card's own zero overrides the all-cards cap for that card only.
        let c = config(&[
            ("CUDA_DEVICE_MEMORY_LIMIT", "4g"),
            ("CUDA_DEVICE_MEMORY_LIMIT_1", "0"),
        ])
        .unwrap();
        assert_eq!(c.limits[0], Some(4 << 30));
        assert_eq!(c.limits[1], None);
        assert_eq!(c.limits[2], Some(4 << 30));
    }
}
