//! Tessera's standalone scheduler for GPU pods.
//!
//! [`core`] is the pure decision (cluster state in, placement out) shared
//! with `tessera simulate`; [`shell`] connects it to Kubernetes: reflectors
//! feed the state, a queue of pending pods drives decisions, binds carry
//! the allocation annotations, and Events, leader election and metrics
//! make it operable.

pub mod core;
pub mod options;
pub mod shell;
