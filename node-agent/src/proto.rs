//! The kubelet device-plugin v1beta1 messages and services, generated at
//! build time from `proto/api.proto`.

#![allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic
)]

tonic::include_proto!("v1beta1");

/// The API version this agent registers with.
pub const API_VERSION: &str = "v1beta1";
/// `Device.health` of a usable device.
pub const HEALTHY: &str = "Healthy";
/// `Device.health` of a device that must not be allocated.
pub const UNHEALTHY: &str = "Unhealthy";
