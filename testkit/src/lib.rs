//! Test infrastructure for Tessera.
//!
//! [`ApiServer`] is an in-process Kubernetes API server stand-in that speaks
//! real HTTP on `127.0.0.1`, so the real kube-rs client, reflectors and
//! watchers run against it in tests. It keeps the semantics Tessera depends
//! on: a global resourceVersion, watches replayable from any version, `409`
//! on stale writes and on binding an already-bound pod, the status
//! subresource, label and field selectors, and `Status` error bodies. Test
//! hooks read and write objects directly, count API writes, and inject
//! failures.
//!
//! Not modelled: authentication, admission, namespace existence checks,
//! graceful deletion and finalizers, strategic-merge list semantics (treated
//! as merge patch), server-side apply field ownership, pagination (lists
//! return everything in one page), history compaction (no `410 Gone`).
//!
//! [`helpers`] holds small generic test helpers: [`eventually_within`]
//! (polling with a deadline) and [`annotation`].
//!
//! [`fixtures`] builds the GPU nodes the tests share ([`fixtures::gpu_node`],
//! [`fixtures::t4_cards`]).
//!
//! [`openmetrics`] checks `/metrics` expositions: a strict OpenMetrics text
//! parser and HAMi's metric reference (`fixtures/hami-metrics.md`) with a
//! comparison against it.

pub mod api_server;
pub mod fixtures;
pub mod helpers;
pub mod openmetrics;

pub use api_server::{AllocationAcknowledger, ApiServer, RequestRecord};
pub use helpers::{annotation, eventually_within};
