//! The environment a GPU container runs with: the names of the variables the
//! node agent sets and the interceptor reads, and the codec of the memory-cap
//! values (`CUDA_DEVICE_MEMORY_LIMIT[_<i>]`), HAMi-compatible; and the
//! compute settings: SM caps, the core utilisation policy and the priority.
//!
//! Values are a whole number with an optional binary suffix: `7500m` (MiB),
//! `10g` (GiB), `512k` (KiB), `1t` (TiB), or plain bytes (`1073741824`).
//! Suffixes are case-insensitive and may be written `m`, `mi`, `mib` or `mb`;
//! all of them mean powers of 1024, as in HAMi. The node agent writes
//! `<MiB>m` through [`format_memory_limit_mib`].

use thiserror::Error;

/// Cap for every visible card that has no per-card variable.
pub const MEMORY_LIMIT_ALL: &str = "CUDA_DEVICE_MEMORY_LIMIT";
/// Prefix of the per-card cap: `CUDA_DEVICE_MEMORY_LIMIT_0`, `_1`, … where the
/// number is the card's index among the cards visible in the container.
pub const MEMORY_LIMIT_PREFIX: &str = "CUDA_DEVICE_MEMORY_LIMIT_";
/// Share of the card's SMs, in percent (read by the SM limiter).
pub const SM_LIMIT: &str = "CUDA_DEVICE_SM_LIMIT";
/// Path of the memory-mapped accounting region shared by the processes of a
/// container (layout in [`crate::shared_region`]).
pub const SHARED_CACHE: &str = "CUDA_DEVICE_MEMORY_SHARED_CACHE";
/// Interceptor log level: 0 errors, 1 warnings (default), 2 info, 3 and 4 debug.
pub const LOG_LEVEL: &str = "LIBCUDA_LOG_LEVEL";
/// Cards visible in the container (UUIDs), read by the NVIDIA container runtime.
pub const VISIBLE_DEVICES: &str = "NVIDIA_VISIBLE_DEVICES";
/// `true` (set in the pod's own env, where the config allows it) opts a
/// container out of the interceptor.
pub const DISABLE_CONTROL: &str = "CUDA_DISABLE_CONTROL";

/// Name of the per-card cap variable for visible card `index`.
pub fn memory_limit_var(index: usize) -> String {
    format!("{MEMORY_LIMIT_PREFIX}{index}")
}

/// The value the node agent writes for a cap of `mib` MiB: `7500m`.
pub fn format_memory_limit_mib(mib: u64) -> String {
    format!("{mib}m")
}

/// Why a memory-cap value was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MemoryLimitError {
    /// Nothing but whitespace.
    #[error("the value is empty; write a size such as `7500m`, `10g` or a byte count")]
    Empty,
    /// No digits before the suffix, or characters that are not a size.
    #[error("`{0}` is not a size; write a whole number with an optional k/m/g/t suffix, e.g. `7500m` or `10g`")]
    NotANumber(String),
    /// A suffix other than k, m, g, t (optionally followed by `i`, `ib` or `b`).
    #[error(
        "`{0}` has an unknown unit suffix; use k, m, g or t (powers of 1024), or none for bytes"
    )]
    UnknownSuffix(String),
    /// Zero would forbid every allocation; an absent variable means no cap.
    #[error(
        "`{0}` is a cap of zero bytes; unset the variable for no cap, or give a positive size"
    )]
    Zero(String),
    /// More than `u64::MAX` bytes.
    #[error("`{0}` does not fit in 64 bits of bytes")]
    Overflow(String),
}

/// Parses a cap value into bytes. See the module doc for the accepted forms.
pub fn parse_memory_limit(value: &str) -> Result<u64, MemoryLimitError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(MemoryLimitError::Empty);
    }
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(MemoryLimitError::NotANumber(value.to_owned()));
    }
    let shift = suffix_shift(suffix).ok_or_else(|| {
        if suffix.chars().all(|c| c.is_ascii_alphabetic()) {
            MemoryLimitError::UnknownSuffix(value.to_owned())
        } else {
            MemoryLimitError::NotANumber(value.to_owned())
        }
    })?;
    let number: u64 = digits
        .parse()
        .map_err(|_| MemoryLimitError::Overflow(value.to_owned()))?;
    let bytes = number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| MemoryLimitError::Overflow(value.to_owned()))?;
    if bytes == 0 {
        return Err(MemoryLimitError::Zero(value.to_owned()));
    }
    Ok(bytes)
}

/// Power of two a unit suffix stands for, `None` when it is not a unit.
fn suffix_shift(suffix: &str) -> Option<u32> {
    let lower = suffix.to_ascii_lowercase();
    let (unit, rest) = match lower.char_indices().next() {
        None => return Some(0),
        Some((_, c)) => (c, &lower[c.len_utf8()..]),
    };
    if !matches!(rest, "" | "i" | "ib" | "b") {
        return None;
    }
    match unit {
        'b' if rest.is_empty() => Some(0),
        'k' => Some(10),
        'm' => Some(20),
        'g' => Some(30),
        't' => Some(40),
        _ => None,
    }
}

// ---- Host pid ------------------------------------------------------------

/// Path of the node agent's host-pid socket (mounted into every GPU
/// container): a process that connects reads its pid in the host's pid
/// namespace (4 bytes, little-endian), which is how NVML lists it.
pub const PID_SOCKET: &str = "TESSERA_PID_SOCKET";

// ---- Compute (SM) limits and priority --------------------------------------

/// Prefix of the per-card SM cap: `CUDA_DEVICE_SM_LIMIT_0`, `_1`, … (visible
/// card index), overriding [`SM_LIMIT`] for that card.
pub const SM_LIMIT_PREFIX: &str = "CUDA_DEVICE_SM_LIMIT_";
/// When the SM cap applies: `force`, `disable` or `default` (see [`CorePolicy`]).
pub const CORE_UTILIZATION_POLICY: &str = "GPU_CORE_UTILIZATION_POLICY";
/// The container's priority on its cards: `0` high, `1` low (`nvidia.com/priority`).
pub const TASK_PRIORITY: &str = "CUDA_TASK_PRIORITY";
/// Directory (mounted read-only from the host into every GPU container)
/// holding one tenant table per physical card, written by the node agent
/// (layout in [`crate::card_tenants`]).
pub const CARD_TENANTS_DIR: &str = "TESSERA_CARD_TENANTS_DIR";
/// The container's id in the tenant tables (the name of its host
/// directory, `<pod UID>_<container>`): the interceptor finds its own entry
/// by [`crate::card_tenants::tenant_key`] of it, to leave itself out.
pub const TENANT_ID: &str = "TESSERA_TENANT_ID";

/// Name of the per-card SM cap variable for visible card `index`.
pub fn sm_limit_var(index: usize) -> String {
    format!("{SM_LIMIT_PREFIX}{index}")
}

/// When a container's SM cap is enforced. Ordered from the loosest
/// (`Disable`) to the strictest (`Force`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum CorePolicy {
    /// Never: the cap is ignored (priority still applies).
    Disable,
    /// Only while another tenant is active on the card (HAMi's default):
    /// a container alone on its card runs at full speed.
    #[default]
    Default,
    /// Always, even alone on the card.
    Force,
}

impl CorePolicy {
    /// The value of [`CORE_UTILIZATION_POLICY`] that selects it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Default => "default",
            Self::Force => "force",
        }
    }
}

/// A container's priority on its cards (`nvidia.com/priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskPriority {
    /// `0`: low-priority tenants of the card yield while this one launches.
    High,
    /// `1`: yields to high-priority tenants of the card.
    Low,
}

/// Why an SM-limit, policy or priority value was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ComputeEnvError {
    /// Not a whole percentage from 0 to 100.
    #[error(
        "`{0}` is not an SM share; write a whole percentage from 0 to 100 (0 or 100 = no cap)"
    )]
    BadSmLimit(String),
    /// Not one of the three policies.
    #[error("`{0}` is not a core utilisation policy; write `default`, `force` or `disable`")]
    BadPolicy(String),
    /// Not 0 or 1.
    #[error("`{0}` is not a task priority; write 0 (high) or 1 (low)")]
    BadPriority(String),
}

/// Parses an SM cap: `Some(percent)` for 1–99, `None` for 0 or 100 (no cap,
/// as in HAMi: 0 means not requested, 100 the whole card).
pub fn parse_sm_limit(value: &str) -> Result<Option<u8>, ComputeEnvError> {
    match value.trim().parse::<u8>() {
        Ok(0 | 100) => Ok(None),
        Ok(p) if p < 100 => Ok(Some(p)),
        _ => Err(ComputeEnvError::BadSmLimit(value.to_owned())),
    }
}

/// Parses [`CORE_UTILIZATION_POLICY`] (case-insensitive; empty = default).
pub fn parse_core_policy(value: &str) -> Result<CorePolicy, ComputeEnvError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "default" => Ok(CorePolicy::Default),
        "force" => Ok(CorePolicy::Force),
        "disable" => Ok(CorePolicy::Disable),
        _ => Err(ComputeEnvError::BadPolicy(value.to_owned())),
    }
}

/// Parses [`TASK_PRIORITY`].
pub fn parse_task_priority(value: &str) -> Result<TaskPriority, ComputeEnvError> {
    match value.trim() {
        "0" => Ok(TaskPriority::High),
        "1" => Ok(TaskPriority::Low),
        _ => Err(ComputeEnvError::BadPriority(value.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_hami_forms() {
        assert_eq!(parse_memory_limit("7500m"), Ok(7500 << 20));
        assert_eq!(parse_memory_limit("10g"), Ok(10 << 30));
        assert_eq!(parse_memory_limit("10G"), Ok(10 << 30));
        assert_eq!(parse_memory_limit("10Gi"), Ok(10 << 30));
        assert_eq!(parse_memory_limit("512k"), Ok(512 << 10));
        assert_eq!(parse_memory_limit("1073741824"), Ok(1 << 30));
        assert_eq!(parse_memory_limit(" 2MiB "), Ok(2 << 20));
        assert_eq!(parse_memory_limit("1t"), Ok(1 << 40));
    }

    #[test]
    fn refuses_garbage_with_a_reason() {
        assert_eq!(parse_memory_limit(""), Err(MemoryLimitError::Empty));
        assert!(matches!(
            parse_memory_limit("lots"),
            Err(MemoryLimitError::NotANumber(_))
        ));
        assert!(matches!(
            parse_memory_limit("10x"),
            Err(MemoryLimitError::UnknownSuffix(_))
        ));
        assert!(matches!(
            parse_memory_limit("1.5g"),
            Err(MemoryLimitError::NotANumber(_))
        ));
        assert!(matches!(
            parse_memory_limit("-1g"),
            Err(MemoryLimitError::NotANumber(_))
        ));
        assert!(matches!(
            parse_memory_limit("0m"),
            Err(MemoryLimitError::Zero(_))
        ));
        assert!(matches!(
            parse_memory_limit("99999999999999999999"),
            Err(MemoryLimitError::Overflow(_))
        ));
        assert!(matches!(
            parse_memory_limit("20000000t"),
            Err(MemoryLimitError::Overflow(_))
        ));
    }

    #[test]
    fn compute_values() {
        assert_eq!(parse_sm_limit("30"), Ok(Some(30)));
        assert_eq!(parse_sm_limit(" 0 "), Ok(None));
        assert_eq!(parse_sm_limit("100"), Ok(None));
        assert!(parse_sm_limit("101").is_err());
        assert!(parse_sm_limit("-5").is_err());
        assert!(parse_sm_limit("30%").is_err());
        assert_eq!(parse_core_policy("FORCE"), Ok(CorePolicy::Force));
        assert_eq!(parse_core_policy(""), Ok(CorePolicy::Default));
        assert_eq!(parse_core_policy("disable"), Ok(CorePolicy::Disable));
        assert!(parse_core_policy("sometimes").is_err());
        assert_eq!(parse_task_priority("0"), Ok(TaskPriority::High));
        assert_eq!(parse_task_priority("1"), Ok(TaskPriority::Low));
        assert!(parse_task_priority("2").is_err());
        assert_eq!(sm_limit_var(2), "CUDA_DEVICE_SM_LIMIT_2");
    }

    #[test]
    fn variable_names() {
        assert_eq!(memory_limit_var(3), "CUDA_DEVICE_MEMORY_LIMIT_3");
    }

    proptest! {
        #[test]
        fn formatted_mib_round_trips(mib in 1u64..(1 << 40)) {
            prop_assert_eq!(parse_memory_limit(&format_memory_limit_mib(mib)), Ok(mib << 20));
        }
    }
}
