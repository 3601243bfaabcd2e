//! The compute side of the container environment, read once: SM caps per
//! visible card (`CUDA_DEVICE_SM_LIMIT[_<i>]`), the core utilisation policy
//! (`GPU_CORE_UTILIZATION_POLICY`), the priority (`CUDA_TASK_PRIORITY`) and
//! the node-wide tenant-table directory (`TESSERA_CARD_TENANTS_DIR`) with
//! the container's id in it (`TESSERA_TENANT_ID`). Kept
//! apart from the memory configuration so the launch path owns it. A value
//! that is set but unparsable is an error: CUDA initialisation is refused
//! (fail closed, as for memory caps), except an unknown policy, which
//! HAMi-core takes as `default`: so do we, with a warning.

use std::path::PathBuf;
use tessera_api::container_env::{
    parse_core_policy, parse_sm_limit, parse_task_priority, ComputeEnvError, CorePolicy,
    TaskPriority, CARD_TENANTS_DIR, CORE_UTILIZATION_POLICY, SM_LIMIT, SM_LIMIT_PREFIX,
    TASK_PRIORITY, TENANT_ID,
};
use tessera_api::shared_region::MAX_DEVICES;
use thiserror::Error;

/// What the launch path enforces in this process.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ComputeConfig {
    /// SM cap in percent per visible card index; `None` = no cap.
    pub sm_limits: [Option<u8>; MAX_DEVICES],
    /// When the caps apply.
    pub policy: CorePolicy,
    /// `None` when the container asked for no priority.
    pub priority: Option<TaskPriority>,
    /// Where the per-card tenant tables live; `None` = not mounted.
    pub tenants_dir: Option<PathBuf>,
    /// Settings taken in HAMi-core's sense rather than refused, to print.
    pub warnings: Vec<String>,
    /// The container's id in those tables (its own entry is left out of
    /// what it learns about the others); `None` = not given.
    pub tenant_id: Option<String>,
}

/// A compute setting the interceptor refuses to run with.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ComputeConfigError {
    /// A value that does not parse.
    #[error("{var}={value:?}: {source}")]
    BadValue {
        /// Variable name.
        var: String,
        /// Its value.
        value: String,
        /// Why.
        source: ComputeEnvError,
    },
    /// `CUDA_DEVICE_SM_LIMIT_<x>` where `<x>` is not a card index we support.
    #[error("{var} does not name a card: the suffix must be an index from 0 to {}", MAX_DEVICES - 1)]
    BadIndex {
        /// Variable name.
        var: String,
    },
}

impl ComputeConfig {
    /// Reads the process environment.
    pub fn from_env() -> Result<ComputeConfig, ComputeConfigError> {
        let vars = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned())));
        let config = Self::from_vars(vars)?;
        for warning in &config.warnings {
            crate::log::log!(crate::log::WARN, "{warning}");
        }
        Ok(config)
    }

    /// Builds the configuration from `(name, value)` pairs.
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<ComputeConfig, ComputeConfigError> {
        let bad = |var: &str, value: &str| {
            let (var, value) = (var.to_owned(), value.to_owned());
            move |source| ComputeConfigError::BadValue { var, value, source }
        };
        let mut all = None;
        let mut per_card: [Option<Option<u8>>; MAX_DEVICES] = [None; MAX_DEVICES];
        let mut config = ComputeConfig::default();
        for (name, value) in vars {
            if name == SM_LIMIT {
                all = parse_sm_limit(&value).map_err(bad(&name, &value))?;
            } else if let Some(suffix) = name.strip_prefix(SM_LIMIT_PREFIX) {
                let index = suffix
                    .parse::<usize>()
                    .ok()
                    .filter(|&i| i < MAX_DEVICES && !suffix.starts_with('+'))
                    .ok_or_else(|| ComputeConfigError::BadIndex { var: name.clone() })?;
                per_card[index] = Some(parse_sm_limit(&value).map_err(bad(&name, &value))?);
            } else if name == CORE_UTILIZATION_POLICY {
                config.policy = parse_core_policy(&value).unwrap_or_else(|e| {
                    config.warnings.push(format!(
                        "{name}: {e}; taken as `default`, as HAMi-core does"
                    ));
                    CorePolicy::Default
                });
            } else if name == TASK_PRIORITY && !value.trim().is_empty() {
                config.priority = Some(parse_task_priority(&value).map_err(bad(&name, &value))?);
            } else if name == CARD_TENANTS_DIR && !value.is_empty() {
                config.tenants_dir = Some(PathBuf::from(value));
            } else if name == TENANT_ID && !value.trim().is_empty() {
                config.tenant_id = Some(value.trim().to_owned());
            }
        }
        for (limit, card) in config.sm_limits.iter_mut().zip(per_card) {
            *limit = card.unwrap_or(all);
        }
        Ok(config)
    }

    /// The cap that applies on card `device` under the policy (`None` with
    /// `disable` or no cap).
    pub fn effective_limit(&self, device: usize) -> Option<u8> {
        if self.policy == CorePolicy::Disable {
            return None;
        }
        self.sm_limits.get(device).copied().flatten()
    }

    /// Whether launches need governing at all: some card is capped, or the
    /// container has a priority (high ones announce themselves, low ones
    /// yield). Otherwise the launch path is one relaxed atomic load.
    pub fn governs_launches(&self) -> bool {
        self.priority.is_some() || (0..MAX_DEVICES).any(|d| self.effective_limit(d).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<ComputeConfig, ComputeConfigError> {
        ComputeConfig::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn nothing_set_governs_nothing() {
        let c = config(&[("CUDA_DEVICE_MEMORY_LIMIT", "1g")]).unwrap();
        assert!(!c.governs_launches());
        assert_eq!(c.policy, CorePolicy::Default);
        // 0 and 100 are "no cap", as in HAMi.
        assert!(!config(&[("CUDA_DEVICE_SM_LIMIT", "100")])
            .unwrap()
            .governs_launches());
        assert!(!config(&[("CUDA_DEVICE_SM_LIMIT", "0")])
            .unwrap()
            .governs_launches());
    }

    #[test]
    fn per_card_overrides_all_and_disable_wins() {
        let c = config(&[
            ("CUDA_DEVICE_SM_LIMIT", "30"),
            ("CUDA_DEVICE_SM_LIMIT_1", "100"),
            ("CUDA_DEVICE_SM_LIMIT_2", "70"),
            ("GPU_CORE_UTILIZATION_POLICY", "force"),
            ("TESSERA_CARD_TENANTS_DIR", "/t"),
            ("TESSERA_TENANT_ID", "uid-1_main"),
        ])
        .unwrap();
        assert_eq!(c.effective_limit(0), Some(30));
        assert_eq!(c.effective_limit(1), None);
        assert_eq!(c.effective_limit(2), Some(70));
        assert_eq!(c.effective_limit(15), Some(30));
        assert_eq!(c.policy, CorePolicy::Force);
        assert_eq!(c.tenants_dir, Some(PathBuf::from("/t")));
        assert_eq!(c.tenant_id.as_deref(), Some("uid-1_main"));
        assert!(c.governs_launches());
        let c = config(&[
            ("CUDA_DEVICE_SM_LIMIT", "30"),
            ("GPU_CORE_UTILIZATION_POLICY", "disable"),
        ])
        .unwrap();
        assert_eq!(c.effective_limit(0), None);
        assert!(!c.governs_launches());
    }

    #[test]
    fn priority_alone_governs() {
        let c = config(&[("CUDA_TASK_PRIORITY", "1")]).unwrap();
        assert_eq!(c.priority, Some(TaskPriority::Low));
        assert!(c.governs_launches());
    }

    #[test]
    fn bad_values_fail_closed_naming_the_variable() {
        let e = config(&[("CUDA_DEVICE_SM_LIMIT", "lots")]).unwrap_err();
        assert!(e.to_string().contains("CUDA_DEVICE_SM_LIMIT"), "{e}");
        assert!(matches!(
            config(&[("CUDA_DEVICE_SM_LIMIT_x", "3")]),
            Err(ComputeConfigError::BadIndex { .. })
        ));
        // HAMi-core takes an unknown policy as the default one: so do we.
        let c = config(&[("GPU_CORE_UTILIZATION_POLICY", "often")]).unwrap();
        assert_eq!(c.policy, CorePolicy::Default);
        assert!(c.warnings[0].contains("GPU_CORE_UTILIZATION_POLICY"));
        assert!(config(&[("CUDA_TASK_PRIORITY", "5")]).is_err());
    }
}
