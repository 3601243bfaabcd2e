//! The pure placement core: a cluster snapshot in, a placement out
//! (filter → score → allocate). No Kubernetes client, no I/O, deterministic:
//! the same state and pod always give the same placement.

pub mod cards;
pub mod gpu_fit;
pub mod node_predicates;
pub mod requirements;
pub mod resources;
pub mod schedule;
pub mod state;

pub use requirements::{pod_key, PodRequirements};
pub use schedule::{Placement, ScheduleError, Unschedulable};
pub use state::{ClusterState, NodeState, PodCharge};
#[cfg(test)]
mod tests;
