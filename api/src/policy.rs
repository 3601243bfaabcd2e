//! Scheduling policies: how nodes are chosen (`hami.io/node-scheduler-policy`)
//! and how cards are chosen on a node (`hami.io/gpu-scheduler-policy`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How the scheduler picks among nodes that fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum NodePolicy {
    /// Prefer the node whose GPUs are already most used (fill nodes first).
    #[default]
    Binpack,
    /// Prefer the node whose GPUs are least used.
    Spread,
}

/// How the scheduler picks cards on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum GpuPolicy {
    /// Prefer cards already shared (co-locate pods on one card).
    Binpack,
    /// Prefer the least-used cards (keep pods apart).
    #[default]
    Spread,
    /// Prefer cards close to each other (same NUMA node) for multi-card
    /// containers, then binpack.
    TopologyAware,
}

/// A policy name that is not one of the known ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not a scheduling policy; write one of: {expected}")]
pub struct UnknownPolicy {
    /// The value as written.
    pub value: String,
    /// The accepted names.
    pub expected: &'static str,
}

impl FromStr for NodePolicy {
    type Err = UnknownPolicy;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim().to_ascii_lowercase().as_str() {
            "binpack" => Ok(Self::Binpack),
            "spread" => Ok(Self::Spread),
            _ => Err(UnknownPolicy {
                value: value.to_owned(),
                expected: "binpack, spread",
            }),
        }
    }
}

impl FromStr for GpuPolicy {
    type Err = UnknownPolicy;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim().to_ascii_lowercase().as_str() {
            "binpack" => Ok(Self::Binpack),
            "spread" => Ok(Self::Spread),
            "topology-aware" => Ok(Self::TopologyAware),
            _ => Err(UnknownPolicy {
                value: value.to_owned(),
                expected: "binpack, spread, topology-aware",
            }),
        }
    }
}

impl fmt::Display for NodePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Binpack => "binpack",
            Self::Spread => "spread",
        })
    }
}

impl fmt::Display for GpuPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Binpack => "binpack",
            Self::Spread => "spread",
            Self::TopologyAware => "topology-aware",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_case_insensitively_and_rejects_unknown() {
        assert_eq!("Binpack".parse::<GpuPolicy>(), Ok(GpuPolicy::Binpack));
        assert_eq!(
            "topology-aware".parse::<GpuPolicy>(),
            Ok(GpuPolicy::TopologyAware)
        );
        assert_eq!(" spread".parse::<NodePolicy>(), Ok(NodePolicy::Spread));
        let err = "fast".parse::<NodePolicy>().expect_err("unknown");
        assert!(err.to_string().contains("binpack, spread"));
    }
}
