//! The scheduler crate's integration tests, linked into one test binary so a
//! build links (and stores) one executable instead of one per file.

mod common;

mod bind_gate;
mod gpu_quota;
mod hami_metrics;
mod node_liveness;
mod pod_topology;
mod preemption;
mod shell;
mod volume_binding;
