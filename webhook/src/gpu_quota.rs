//! The admission half of namespace GPU quotas: a GPU pod whose own request
//! is more than its namespace's quota allows, with nothing else running, can
//! never be scheduled, so it is denied at CREATE with the quota, the
//! resource and the figures. Only what is known before a card is chosen
//! counts here ([`known_demand`]: `gpumem` × cards, `gpucores` × cards; a
//! percentage of memory counts 0). Current usage is left to the scheduler,
//! which counts every placement, assumed ones included, one decision at a
//! time: checking it here would race with pods admitted but not yet placed
//! and refuse the replicas a ReplicaSet creates together instead of letting
//! the quota's worth of them run. Pure: the caller supplies the quota.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use tessera_api::config::Config;
use tessera_api::gpu_quota::{known_demand, NamespaceQuota, QuotaAmounts};
use tessera_api::request::PodGpuRequest;

use crate::decision::{admit, AdmissionDecision, AllowReason, Denial};

/// [`admit`], then, for a GPU pod it admits, the quota of the pod's
/// namespace (`None`: no GPU quota, or quotas not watched).
pub fn admit_with_quota(
    pod: &Pod,
    namespace_labels: Option<&BTreeMap<String, String>>,
    config: &Config,
    quota: Option<&NamespaceQuota>,
) -> AdmissionDecision {
    let decision = admit(pod, namespace_labels, config);
    let gpu_pod = matches!(
        decision,
        AdmissionDecision::Allowed {
            reason: AllowReason::Mutated | AllowReason::AlreadyComplete,
            ..
        }
    );
    if !gpu_pod {
        return decision;
    }
    match quota.and_then(|quota| quota_denial(pod, config, quota)) {
        Some(denial) => AdmissionDecision::Denied(denial),
        None => decision,
    }
}

/// The denial for a pod whose known request alone is over `quota`.
pub fn quota_denial(pod: &Pod, config: &Config, quota: &NamespaceQuota) -> Option<Denial> {
    let request = PodGpuRequest::from_pod(pod, &config.resources).ok()?;
    let demand = known_demand(&request, &config.defaults);
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    quota
        .check(
            namespace,
            QuotaAmounts::default(),
            demand,
            &config.resources,
        )
        .err()
        .map(Denial::from)
}
