//! The agent's Kubernetes side, through kube-rs: the pods bound to this
//! node and their allocation annotations ([`pods`]), this node's inventory
//! annotation ([`node`]), its liveness handshake ([`handshake`]) and
//! Events ([`events`]).

pub mod events;
pub mod handshake;
pub mod node;
pub mod pods;
