//! What every Tessera server (`tessera-webhook`, `tessera-scheduler`,
//! `tessera-node-agent`) does the same way, so their `main.rs` files stay
//! thin and alike: one logging switch ([`logging`]), the config file loaded
//! with the same error text ([`config`]), `/healthz`, `/readyz` and
//! `/metrics` ([`probes`]), and graceful shutdown on SIGTERM or Ctrl-C
//! ([`shutdown`]).

pub mod config;
pub mod logging;
pub mod probes;
pub mod shutdown;
