//! The pure placement core: a cluster snapshot in, a placement out
//! (filter → score → allocate). No Kubernetes client, no I/O, deterministic:
//! the same state and pod always give the same placement.

pub mod attach_limits;
pub mod cards;
pub mod default_spread;
pub mod gpu_fit;
pub mod inter_pod_affinity;
pub mod labels;
pub mod node_liveness;
pub mod node_predicates;
pub mod pod_info;
pub mod preemption;
pub mod quota;
pub mod requirements;
pub mod resources;
pub mod schedule;
pub mod state;
pub mod topology_spread;
pub mod volumes;

pub use requirements::{pod_key, PodRequirements};
pub use schedule::{Placement, ScheduleError, Unschedulable};
pub use state::{ClusterState, NodeState, PodCharge};
#[cfg(test)]
mod pod_topology_tests;
#[cfg(test)]
mod policy_tests;
#[cfg(test)]
mod preemption_tests;
#[cfg(test)]
mod quota_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod volume_tests;
