//! Host-side enforcement of memory caps: the guarantee that holds when the
//! interceptor is bypassed (a static binary, a program that never loads
//! the preload, a forged accounting region). Every period the agent asks
//! the driver (NVML, through [`crate::gpu::GpuBackend::processes`]) which
//! processes hold memory on each card, finds each process's pod and
//! container from its cgroup ([`cgroup`]), looks up the container's cap in
//! its pod's trusted allocation ([`attribution`]), sums per container and
//! card and decides ([`decide`]); containers over their cap by more than
//! the margin have processes killed ([`kill`]) or are only reported,
//! with a Warning Event on the pod and `tessera_enforcement_actions_total`
//! ([`enforcer`], which also runs the loop and the pod reflector).
//!
//! What is judged:
//! - a container with an allocation: its cap on each card it was given,
//!   and 0 on every other card;
//! - a process in a pod's cgroup that no allocated container accounts for
//!   (a pod that set `NVIDIA_VISIBLE_DEVICES` itself, an allocation that is
//!   not trusted): cap 0, killed in kill mode like an over-cap container;
//! - a host process (no pod cgroup): reported (log and metric, no Event:
//!   there is no pod to post it on), never killed;
//! - pods in `enforcement.exemptNamespaces`: not judged.
//!
//! Settings come from the config file's `enforcement` section
//! ([`tessera_api::config::Enforcement`]) and `--proc-root`.

pub mod attribution;
pub mod cgroup;
pub mod decide;
pub mod enforcer;
pub mod kill;

pub use attribution::{AnnotatedAllocations, TrustedAllocations};
pub use enforcer::{EnforcementCounters, EnforcementSettings, Enforcer};
