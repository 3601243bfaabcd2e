//! The webhook crate's integration tests, linked into one test binary so a
//! build links (and stores) one executable instead of one per file.

mod admission_rules;
mod common;
mod gpu_quota;
mod tls_server;
