//! Tessera's node agent, run as a DaemonSet on GPU nodes.
//!
//! It discovers the node's GPUs ([`gpu`], NVML or fake), follows their
//! health ([`health`]), publishes the inventory on the Node
//! ([`inventory`], [`k8s::node`]), serves the kubelet device-plugin API
//! ([`plugin`], generated messages in [`proto`]) and answers `Allocate` by
//! finding the pod the request belongs to and turning its allocation into
//! container env and mounts ([`allocate`]). It installs the interceptor on
//! the host and keeps per-container directories ([`host_files`]), reads
//! usage from the containers' accounting regions ([`usage`], read
//! defensively by [`region_file`]) for `/metrics` ([`metrics`]), writes the
//! per-card tenant tables from them ([`tenant_tables`]), serves `/healthz` and `/readyz` next to it
//! ([`probes`]), tells container processes their host pid
//! ([`pid_socket`]), sweeps stale state ([`sweep`]), and enforces memory
//! caps from the driver's per-process figures ([`enforce`]).
//! [`agent::run`] wires it all; `main.rs` only parses options.
//!
//! With the `test-support` feature (turned on only by dev-dependencies),
//! `testing` holds test infrastructure: a kubelet stand-in and an agent
//! spawned on fake cards.

pub mod agent;
pub mod allocate;
pub mod enforce;
pub mod gpu;
pub mod health;
pub mod host_files;
pub mod inventory;
pub mod k8s;
#[cfg(feature = "test-support")]
pub mod kubelet_admission;
pub mod metrics;
pub mod options;
pub mod pid_socket;
pub mod plugin;
pub mod probes;
pub mod proto;
pub mod region_file;
pub mod seal;
pub mod sweep;
pub mod tenant_tables;
#[cfg(feature = "test-support")]
pub mod testing;
pub mod usage;
