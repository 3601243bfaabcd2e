//! Typed errors of the shared vocabulary. Each message says what was wrong
//! and what to write instead, because most of them reach a person: in an
//! admission denial, a scheduling Event or a node-agent log line.

use thiserror::Error;

/// A string that is not a Kubernetes quantity.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("`{input}` is not a valid quantity: {reason}")]
pub struct QuantityError {
    /// The text as written.
    pub input: String,
    /// Why it was refused.
    pub reason: &'static str,
}

/// A `hami.io/node-nvidia-register` annotation that does not decode.
#[derive(Debug, Error)]
pub enum InventoryError {
    /// The JSON form did not parse.
    #[error("GPU inventory annotation is not valid JSON ({source}); the node agent rewrites it, so check that a Tessera or HAMi node agent of a compatible version runs on the node")]
    Json {
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A device entry has a missing or bad field.
    #[error("GPU inventory device #{position}: field `{field}` {reason} (got `{value}`); expected `UUID,count,devmem,devcore,type,numa,health[,index,mode]:` or the JSON form")]
    Field {
        /// Zero-based position of the device in the annotation.
        position: usize,
        /// Field name.
        field: &'static str,
        /// The value as written.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two devices share one UUID.
    #[error("GPU inventory lists device `{id}` twice; each card must appear once")]
    DuplicateId {
        /// The repeated UUID.
        id: String,
    },
}

/// A `hami.io/vgpu-devices-*` annotation that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("GPU allocation annotation, container #{container}, device #{device}: {reason} (got `{value}`); expected `UUID,NVIDIA,memMiB,cores:` per device and `;` after each container")]
pub struct AllocationError {
    /// Zero-based container position.
    pub container: usize,
    /// Zero-based device position inside the container.
    pub device: usize,
    /// The offending text.
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// A pod whose GPU request cannot be understood or is out of range.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    /// A container resource value is invalid.
    #[error("container `{container}`: {resource} = `{value}` {reason}")]
    Resource {
        /// Container name.
        container: String,
        /// Resource name, e.g. `nvidia.com/gpumem-percentage`.
        resource: String,
        /// The value as written.
        value: String,
        /// What is wrong and the valid range.
        reason: String,
    },
    /// A pod annotation is invalid.
    #[error("annotation {key} = `{value}` {reason}")]
    Annotation {
        /// Annotation key.
        key: &'static str,
        /// The value as written.
        value: String,
        /// What is wrong and what to write instead.
        reason: &'static str,
    },
    /// A scheduling policy annotation names something HAMi does not accept.
    #[error("annotation {key}: {source}")]
    Policy {
        /// Annotation key.
        key: &'static str,
        /// What is wrong and what to write instead.
        source: crate::policy::PolicyError,
    },
    /// `nvidia.com/vgpu-mode` asks for a mode Tessera does not provide.
    #[error("annotation {key} {source}")]
    VgpuMode {
        /// Annotation key.
        key: &'static str,
        /// What is wrong and what to do.
        source: crate::vgpu_mode::VgpuModeError,
    },
}

/// A config file that cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The YAML did not parse or has unknown fields.
    #[error("config file is not valid: {source}")]
    Yaml {
        /// The YAML error, with line and column.
        #[source]
        source: serde_yaml::Error,
    },
    /// A value is out of range.
    #[error("config field `{field}` {reason}")]
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// What is wrong and the valid range.
        reason: String,
    },
}
