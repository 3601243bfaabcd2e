//! The `tessera` command-line tool. `simulate` reads cluster and workload
//! YAML ([`workloads`]), runs admission and the scheduler core
//! ([`simulate`]) and prints the result ([`render`]). `inspect` reads a
//! live cluster ([`kubeconfig`], [`inspect`]) and prints its per-card
//! allocation ([`render`]).

pub mod inspect;
pub mod kubeconfig;
pub mod render;
pub mod simulate;
pub mod workloads;

/// The bundled example cluster: 4 × T4 and 4 × A10G.
pub const BUNDLED_CLUSTER: &str = include_str!("../bundled/cluster.yaml");
/// The bundled example workloads: two A10G deployments at 45%, one T4
/// deployment of two replicas at 7500 MiB.
pub const BUNDLED_WORKLOADS: &str = include_str!("../bundled/workloads.yaml");
