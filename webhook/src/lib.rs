//! Tessera's mutating admission webhook.
//!
//! - [`decision`]: the pure decision, `Pod -> Allowed(patch) | Denied(reason)`
//!   ([`admit`]), and [`mutate_pod`], the defaulted Pod for the simulator.
//! - [`control_env`]: the container variables the node agent owns, which a
//!   GPU pod may not set.
//! - [`gpu_quota`]: denying a pod whose own request is over its namespace's
//!   GPU quota ([`admit_with_quota`]); [`quota_cache`] watches the quotas.
//! - [`review`]: the `admission.k8s.io/v1` (and `v1beta1`) AdmissionReview
//!   wire format.
//! - [`server`]: axum routes and the TLS accept loop.
//! - [`tls`]: loading and hot-reloading the serving certificate.
//! - [`provision`]: the self-provisioned CA, its Secret and the `caBundle`.
//! - [`metrics`]: admissions by outcome and latency.
//! - [`namespaces`]: the optional cache of opted-out namespaces.
//! - [`app`]: command-line options and the process's `run`.
//!
//! Everything but [`decision`], [`gpu_quota`] and [`control_env`] needs the default feature
//! `server`; `tessera simulate` links the pure decision alone.
//!
//! # What the webhook configuration must provide
//!
//! The MutatingWebhookConfiguration (in `manifests/`) is expected to:
//! - send only Pod CREATE (`rules: operations [CREATE], resources [pods]`,
//!   `admissionReviewVersions: [v1, v1beta1]`, `sideEffects: None`) to
//!   `POST /mutate` on the Service named by `--service-name`;
//! - exclude namespaces and pods labelled `hami.io/webhook: ignore` with
//!   `namespaceSelector` / `objectSelector` (`NotIn [ignore]`): the review
//!   does not carry namespace labels, so the server sees only the pod's;
//! - on API servers with `matchConditions` (1.30+, beta 1.28), add a CEL
//!   condition that any container or init container names one of the GPU
//!   resources, so that `failurePolicy: Fail` costs non-GPU pods nothing
//!   (the server also allows those untouched, for older API servers);
//! - with `--self-provision`: name the configuration `--webhook-config-name`
//!   and grant the service account get/patch on it and get/create on the
//!   Secret `--ca-secret` in `--namespace`; every webhook in the
//!   configuration gets the CA as its `caBundle`. Probes use `scheme: HTTPS`.

#[cfg(feature = "server")]
pub mod app;
pub mod control_env;
pub mod decision;
pub mod env_defaults;
pub mod gpu_quota;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod namespaces;
#[cfg(feature = "server")]
pub mod provision;
#[cfg(feature = "server")]
pub mod quota_cache;
#[cfg(feature = "server")]
pub mod review;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod tls;

pub use decision::{admit, mutate_pod, AdmissionDecision, AllowReason, Denial, MutateError};
pub use gpu_quota::admit_with_quota;
