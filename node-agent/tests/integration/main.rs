//! The node-agent crate's integration tests, linked into one test binary so a
//! build links (and stores) one executable instead of one per file.

mod common;
mod device_plugin;
mod enforcement;
mod node_config;
mod tenant_tables;
