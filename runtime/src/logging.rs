//! One logging switch for every server: `--log-format json|text`
//! (`TESSERA_LOG_FORMAT`), JSON by default because the servers run in a
//! cluster; the level comes from `RUST_LOG` (default `info`).

use clap::{Args, ValueEnum};
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (for log collectors).
    Json,
    /// Human-readable lines (for a terminal).
    Text,
}

/// The logging options every server takes (`#[command(flatten)]`).
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log format: json (clusters) or text (terminals).
    #[arg(long, env = "TESSERA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(args: &LogArgs) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match args.log_format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Options {
        #[command(flatten)]
        log: LogArgs,
    }

    #[test]
    fn json_by_default_text_on_request_and_typos_named() {
        let parse = |args: &[&str]| Options::try_parse_from(args);
        assert_eq!(
            parse(&["x"]).expect("defaults").log.log_format,
            LogFormat::Json
        );
        assert_eq!(
            parse(&["x", "--log-format=text"])
                .expect("text")
                .log
                .log_format,
            LogFormat::Text
        );
        let error = parse(&["x", "--log-format=yaml"]).expect_err("unknown format");
        assert!(error.to_string().contains("json"), "{error}");
    }
}
