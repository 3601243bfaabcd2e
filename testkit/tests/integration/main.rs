//! The testkit crate's integration tests, linked into one test binary so a
//! build links (and stores) one executable instead of one per file.

mod api_server;
mod common;
mod e2e;
mod exact_allocation;
mod liveness;
mod manifests;
mod rbac;
