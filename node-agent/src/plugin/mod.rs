//! The kubelet device-plugin side of the agent: the gRPC service
//! ([`service`]), unix-socket plumbing ([`socket`]), the `:authority` repair
//! that lets tonic accept every value real kubelets send ([`authority`]),
//! and registration with kubelet, renewed whenever kubelet restarts
//! ([`registration`]).

pub mod authority;
pub mod registration;
pub mod service;
pub mod socket;
