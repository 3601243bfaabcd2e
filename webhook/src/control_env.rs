//! The container environment variables that belong to Tessera: the node
//! agent sets them from the pod's allocation (caps, card list, accounting
//! file, priority) and the interceptor trusts them, so a pod that set them
//! itself would override the agent (kubelet appends the pod's `env` after
//! the device plugin's, and the last value wins). The webhook denies GPU
//! pods that name them ([`crate::decision`]); this module says which names
//! are Tessera's, what each one controls and what to write instead.
//!
//! `envFrom` is the other way in: the keys of a ConfigMap or Secret become
//! variables, and those keys are not known at admission. An `envFrom` entry
//! is therefore only safe with a `prefix` that no Tessera name can start
//! with ([`env_from_prefix_is_safe`]).
//!
//! Not Tessera's, and so the pod's own choice: `GPU_CORE_UTILIZATION_POLICY`
//! (when the SM cap applies), `LIBCUDA_LOG_LEVEL`, `CUDA_VISIBLE_DEVICES`
//! (a subset of the pod's own cards), and `LD_PRELOAD` (it adds libraries
//! but cannot remove the interceptor named in `/etc/ld.so.preload`).

use std::fmt;

use tessera_api::container_env::{
    MEMORY_LIMIT_ALL, MEMORY_LIMIT_PREFIX, SHARED_CACHE, SM_LIMIT, SM_LIMIT_PREFIX, TASK_PRIORITY,
    VISIBLE_DEVICES,
};
use tessera_api::names::{env, ResourceNames};

/// Every variable whose name starts with this is Tessera's own setting
/// (`TESSERA_VISIBLE_UUIDS`, `TESSERA_CARD_TENANTS_DIR`, `TESSERA_PID_SOCKET`, …).
pub const TESSERA_VARIABLE_PREFIX: &str = "TESSERA_";

/// What a Tessera-owned variable controls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlVariable {
    /// `CUDA_DEVICE_MEMORY_LIMIT`, `CUDA_DEVICE_MEMORY_LIMIT_<i>`.
    MemoryLimit,
    /// `CUDA_DEVICE_SM_LIMIT`, `CUDA_DEVICE_SM_LIMIT_<i>`.
    SmLimit,
    /// `CUDA_DEVICE_MEMORY_SHARED_CACHE`.
    SharedCache,
    /// `CUDA_TASK_PRIORITY`.
    TaskPriority,
    /// `NVIDIA_VISIBLE_DEVICES`.
    VisibleDevices,
    /// `TESSERA_*`.
    TesseraSetting,
    /// `CUDA_DISABLE_CONTROL`, outside the namespaces allowed to opt out.
    DisableControl,
}

impl ControlVariable {
    /// The Tessera variable `name` is, if any. `may_opt_out` says whether
    /// the pod's namespace may set `CUDA_DISABLE_CONTROL`.
    pub fn of(name: &str, may_opt_out: bool) -> Option<Self> {
        if name == MEMORY_LIMIT_ALL || name.starts_with(MEMORY_LIMIT_PREFIX) {
            Some(Self::MemoryLimit)
        } else if name == SM_LIMIT || name.starts_with(SM_LIMIT_PREFIX) {
            Some(Self::SmLimit)
        } else if name == SHARED_CACHE {
            Some(Self::SharedCache)
        } else if name == TASK_PRIORITY {
            Some(Self::TaskPriority)
        } else if name == VISIBLE_DEVICES {
            Some(Self::VisibleDevices)
        } else if name.starts_with(TESSERA_VARIABLE_PREFIX) {
            Some(Self::TesseraSetting)
        } else if name == env::DISABLE_CONTROL && !may_opt_out {
            Some(Self::DisableControl)
        } else {
            None
        }
    }

    /// What the pod should do instead, in the cluster's resource names.
    pub fn instead(self, names: &ResourceNames) -> String {
        match self {
            Self::MemoryLimit => format!(
                "ask for memory with the `{}` (MiB per card) or `{}` resource instead",
                names.memory, names.memory_percentage
            ),
            Self::SmLimit => format!(
                "ask for a compute share with the `{}` resource instead",
                names.cores
            ),
            Self::SharedCache => {
                "remove it; the node agent gives every container its own accounting file".to_owned()
            }
            Self::TaskPriority => format!(
                "ask for a priority with the `{}` resource (0 high, 1 low) instead",
                names.priority
            ),
            Self::VisibleDevices => format!(
                "ask for cards with the `{}` resource (and choose them with the `nvidia.com/use-gpuuuid` annotation) instead",
                names.gpu
            ),
            Self::TesseraSetting => "remove it; `TESSERA_*` variables are Tessera's own settings".to_owned(),
            Self::DisableControl => "remove it, or ask the cluster admin to list this namespace under `controlOptOutNamespaces` in the Tessera config".to_owned(),
        }
    }
}

impl fmt::Display for ControlVariable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::MemoryLimit => "it is the container's memory cap, which the node agent sets from the pod's allocation",
            Self::SmLimit => "it is the container's compute cap, which the node agent sets from the pod's allocation",
            Self::SharedCache => "it names the container's accounting file, which the node agent chooses",
            Self::TaskPriority => "it is the container's priority on its cards, which the node agent sets from the pod's priority resource",
            Self::VisibleDevices => "it chooses the cards the container sees, which the node agent sets from the pod's allocation (setting it would give the container cards it was not allocated)",
            Self::TesseraSetting => "it is one of Tessera's own settings, which the node agent sets",
            Self::DisableControl => "it turns off the interceptor that enforces the container's caps, and this namespace is not allowed to opt out",
        })
    }
}

/// Whether an `envFrom` entry with this `prefix` (empty when none) can
/// never produce a Tessera variable, whatever keys its ConfigMap or Secret
/// holds (keys are not empty). `may_opt_out` as in [`ControlVariable::of`].
pub fn env_from_prefix_is_safe(prefix: &str, may_opt_out: bool) -> bool {
    let mut exact = vec![
        MEMORY_LIMIT_ALL,
        SM_LIMIT,
        SHARED_CACHE,
        TASK_PRIORITY,
        VISIBLE_DEVICES,
    ];
    if !may_opt_out {
        exact.push(env::DISABLE_CONTROL);
    }
    let families = [
        MEMORY_LIMIT_PREFIX,
        SM_LIMIT_PREFIX,
        TESSERA_VARIABLE_PREFIX,
    ];
    // `prefix + key` equals a name when the name extends the prefix.
    let reaches_a_name = exact
        .iter()
        .any(|name| name.len() > prefix.len() && name.starts_with(prefix));
    // `prefix + key` falls in a family when either starts with the other.
    let reaches_a_family = families
        .iter()
        .any(|family| family.starts_with(prefix) || prefix.starts_with(family));
    !reaches_a_name && !reaches_a_family
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variable_the_agent_sets_is_tessera_s() {
        for (name, kind) in [
            ("CUDA_DEVICE_MEMORY_LIMIT", ControlVariable::MemoryLimit),
            ("CUDA_DEVICE_MEMORY_LIMIT_0", ControlVariable::MemoryLimit),
            ("CUDA_DEVICE_MEMORY_LIMIT_15", ControlVariable::MemoryLimit),
            ("CUDA_DEVICE_SM_LIMIT", ControlVariable::SmLimit),
            ("CUDA_DEVICE_SM_LIMIT_3", ControlVariable::SmLimit),
            (
                "CUDA_DEVICE_MEMORY_SHARED_CACHE",
                ControlVariable::SharedCache,
            ),
            ("CUDA_TASK_PRIORITY", ControlVariable::TaskPriority),
            ("NVIDIA_VISIBLE_DEVICES", ControlVariable::VisibleDevices),
            ("TESSERA_VISIBLE_UUIDS", ControlVariable::TesseraSetting),
            ("TESSERA_CARD_TENANTS_DIR", ControlVariable::TesseraSetting),
            ("TESSERA_PID_SOCKET", ControlVariable::TesseraSetting),
            ("CUDA_DISABLE_CONTROL", ControlVariable::DisableControl),
        ] {
            assert_eq!(ControlVariable::of(name, false), Some(kind), "{name}");
        }
        assert_eq!(ControlVariable::of("CUDA_DISABLE_CONTROL", true), None);
        assert_eq!(
            ControlVariable::of("TESSERA_PID_SOCKET", true),
            Some(ControlVariable::TesseraSetting)
        );
    }

    #[test]
    fn the_pod_s_own_settings_are_not() {
        for name in [
            "GPU_CORE_UTILIZATION_POLICY",
            "LIBCUDA_LOG_LEVEL",
            "CUDA_VISIBLE_DEVICES",
            "LD_PRELOAD",
            "NVIDIA_DRIVER_CAPABILITIES",
            "CUDA_DEVICE_MEMORY",
            "cuda_device_memory_limit_0",
            "MY_TESSERA_SETTING",
        ] {
            assert_eq!(ControlVariable::of(name, false), None, "{name}");
        }
    }

    #[test]
    fn env_from_prefixes() {
        for unsafe_prefix in [
            "",
            "C",
            "CUDA_",
            "CUDA_DEVICE_",
            "CUDA_DEVICE_MEMORY_LIMIT",
            "CUDA_DEVICE_MEMORY_LIMIT_",
            "CUDA_DEVICE_MEMORY_LIMIT_0",
            "CUDA_DEVICE_SM_LIMIT_X",
            "NVIDIA_",
            "NVIDIA_VISIBLE_DEVICE",
            "T",
            "TESSERA",
            "TESSERA_",
            "TESSERA_X_",
            "CUDA_DISABLE_",
        ] {
            assert!(
                !env_from_prefix_is_safe(unsafe_prefix, false),
                "`{unsafe_prefix}` can reach a Tessera variable"
            );
        }
        for safe_prefix in [
            "APP_",
            "HF_",
            "VLLM_",
            "CUDA_VISIBLE_",
            "NVIDIA_DRIVER_",
            // `NVIDIA_VISIBLE_DEVICES` + a non-empty key is another name.
            "NVIDIA_VISIBLE_DEVICES",
            "CUDA_TASK_PRIORITY",
        ] {
            assert!(
                env_from_prefix_is_safe(safe_prefix, false),
                "`{safe_prefix}` cannot reach a Tessera variable"
            );
        }
        assert!(!env_from_prefix_is_safe("CUDA_DISABLE_", false));
        assert!(env_from_prefix_is_safe("CUDA_DISABLE_", true));
    }

    #[test]
    fn advice_names_the_configured_resources() {
        let names = ResourceNames {
            memory: "example.com/vmem".into(),
            ..ResourceNames::default()
        };
        assert!(ControlVariable::MemoryLimit
            .instead(&names)
            .contains("`example.com/vmem`"));
        assert!(ControlVariable::TaskPriority
            .instead(&names)
            .contains("`nvidia.com/priority`"));
    }
}
