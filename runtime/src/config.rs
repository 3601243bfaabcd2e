//! Loading the one config file every component reads (`--config`,
//! `TESSERA_CONFIG`), with the same error text everywhere.

use std::path::{Path, PathBuf};

use tessera_api::config::Config;
use tessera_api::error::ConfigError;
use thiserror::Error;

/// Why the config file could not be used.
#[derive(Debug, Error)]
pub enum ConfigLoadError {
    /// The file could not be read.
    #[error("cannot read the config file {path}: {source}; check --config / TESSERA_CONFIG (the ConfigMap tessera-config in a cluster)")]
    Read {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid config.
    #[error("the config file {path} is not usable: {source}; correct it, or leave out --config for the defaults")]
    Invalid {
        /// The path given.
        path: PathBuf,
        /// What is wrong, with the field.
        #[source]
        source: ConfigError,
    },
}

/// The config at `path`, or the defaults when no path is given.
pub fn load_config(path: Option<&Path>) -> Result<Config, ConfigLoadError> {
    let Some(path) = path else {
        return Ok(Config::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigLoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    Config::from_yaml(&text).map_err(|source| ConfigLoadError::Invalid {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_file_missing_file_and_typo() {
        assert_eq!(load_config(None).expect("defaults"), Config::default());
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.yaml");
        let error = load_config(Some(&missing))
            .expect_err("missing")
            .to_string();
        assert!(
            error.contains("cannot read") && error.contains("nope.yaml"),
            "{error}"
        );
        let typo = dir.path().join("typo.yaml");
        std::fs::write(&typo, "schedulerNmae: x\n").expect("write");
        let error = load_config(Some(&typo)).expect_err("typo").to_string();
        assert!(error.contains("schedulerNmae"), "{error}");
    }
}
