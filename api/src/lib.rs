//! Tessera's shared vocabulary. Every other crate speaks through this one:
//! resource names and annotation keys ([`names`]), the node-inventory and
//! pod-allocation codecs ([`inventory`], [`allocation`], HAMi-compatible),
//! the seal that proves an allocation came from Tessera's scheduler
//! ([`allocation_seal`], feature `k8s`),
//! Kubernetes quantity parsing ([`quantity`]), scheduling policies
//! ([`policy`]), pod facts and the bind-phase state machine ([`pod`],
//! feature `k8s`), which allocation entry is whose container
//! ([`pod_allocation`], feature `k8s`), the pod request model ([`request`], feature `k8s`), namespace GPU quotas
//! ([`gpu_quota`], feature `k8s`), the
//! config file ([`config`]), the agent–interceptor environment contract
//! ([`container_contract`]), the typed errors ([`error`]), and the layouts
//! shared through files: the container accounting region ([`shared_region`])
//! and the per-card tenant table ([`card_tenants`]); the cards' pairwise
//! link scores ([`pair_scores`], HAMi's `hami.io/node-nvidia-score`) and the
//! `nvidia.com/vgpu-mode` request ([`vgpu_mode`]). Nothing here does I/O.

pub mod allocation;
#[cfg(feature = "k8s")]
pub mod allocation_seal;
pub mod card_tenants;
pub mod config;
pub mod container_contract;
pub mod container_env;
pub mod error;
pub mod exposition;
#[cfg(feature = "k8s")]
pub mod gpu_quota;
pub mod inventory;
pub mod names;
pub mod pair_scores;
#[cfg(feature = "k8s")]
pub mod pod;
#[cfg(feature = "k8s")]
pub mod pod_allocation;
pub mod policy;
pub mod quantity;
#[cfg(feature = "k8s")]
pub mod request;
pub mod shared_region;
pub mod vgpu_mode;
pub mod visible_cards;
