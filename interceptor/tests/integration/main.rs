//! The interceptor crate's integration tests, linked into one test binary so a
//! build links (and stores) one executable instead of one per file.

mod common;
mod launch;
mod multi_card;
mod preload;
