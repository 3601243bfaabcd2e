//! Namespace GPU quotas at admission, through the same entry point the
//! HTTPS handler uses ([`answer_review_with_quotas`]): a GPU pod whose own
//! request is over its namespace's quota is denied with the quota, the
//! resource and the figures; what only placement can count (percentages)
//! and pods that are not ours are let through.

use crate::common;

use common::{api_server_pod, decode_answer, review, Answer};
use serde_json::{json, Value};
use tessera_api::config::Config;
use tessera_api::gpu_quota::{object_limits, NamespaceQuota};
use tessera_webhook::metrics::Outcome;
use tessera_webhook::server::answer_review_with_quotas;

const V1: &str = "admission.k8s.io/v1";
const UID: &str = "0d6b2f44-3c1e-4f7a-9b8e-5a4c3d2e1f00";

/// The quota of `ml-team` (the namespace of [`api_server_pod`]).
fn ml_team_quota(hard: Value) -> NamespaceQuota {
    let object = serde_json::from_value(json!({
        "metadata": {"name": "team-gpus", "namespace": "ml-team"},
        "spec": {"hard": hard}}))
    .expect("quota");
    let (limits, errors) = object_limits(&object, &Config::default().resources);
    assert!(errors.is_empty(), "{errors:?}");
    let mut quota = NamespaceQuota::default();
    quota.set_object("team-gpus", limits);
    quota
}

fn ask(pod: &Value, quota: &NamespaceQuota) -> (Answer, Outcome) {
    let body = serde_json::to_vec(&review(V1, UID, pod)).expect("review");
    let (response, outcome) = answer_review_with_quotas(
        &body,
        &Config::default(),
        |_| None,
        |namespace| (namespace == "ml-team").then(|| quota.clone()),
    )
    .expect("a well-formed review");
    (decode_answer(&response, V1, UID), outcome)
}

fn gpu_pod(limits: Value) -> Value {
    api_server_pod(
        json!([{"name": "trainer", "resources": {"limits": limits}}]),
        json!({}),
        json!({}),
    )
}

#[test]
fn a_pod_over_the_quota_by_itself_is_denied_with_the_figures() {
    let quota = ml_team_quota(json!({"limits.nvidia.com/gpumem": "8192"}));
    let (answer, outcome) = ask(
        &gpu_pod(json!({"nvidia.com/gpu": "2", "nvidia.com/gpumem": "5000"})),
        &quota,
    );
    assert!(!answer.allowed, "{}", answer.body);
    assert_eq!(outcome, Outcome::Denied);
    assert_eq!(answer.code, Some(403));
    let message = answer.message.expect("a message");
    for part in [
        "ResourceQuotaNotFit",
        "namespace `ml-team` ResourceQuota `team-gpus` limits nvidia.com/gpumem to 8192 MiB",
        "this pod alone asks for 10000 MiB",
        "can never fit",
        "limits.nvidia.com/gpumem",
    ] {
        assert!(message.contains(part), "{part:?} missing from {message}");
    }
}

#[test]
fn a_pod_within_the_quota_is_admitted_and_defaulted() {
    let quota = ml_team_quota(json!({"limits.nvidia.com/gpumem": "8192"}));
    let (answer, outcome) = ask(
        &gpu_pod(json!({"nvidia.com/gpu": "2", "nvidia.com/gpumem": "4096"})),
        &quota,
    );
    assert!(answer.allowed, "{}", answer.body);
    assert_eq!(outcome, Outcome::Mutated);
}

#[test]
fn cores_count_per_card_and_a_whole_card_is_100() {
    let quota = ml_team_quota(json!({"limits.nvidia.com/gpucores": "200"}));
    let (answer, _) = ask(&gpu_pod(json!({"nvidia.com/gpu": "3"})), &quota);
    assert!(!answer.allowed, "{}", answer.body);
    let message = answer.message.expect("a message");
    assert!(
        message.contains("nvidia.com/gpucores to 200 % of a card")
            && message.contains("asks for 300 % of a card"),
        "{message}"
    );
    let (answer, _) = ask(&gpu_pod(json!({"nvidia.com/gpu": "2"})), &quota);
    assert!(answer.allowed, "{}", answer.body);
}

#[test]
fn percentages_are_left_to_the_scheduler() {
    // 90 % of a card is MiB only once a card is chosen: admission counts 0.
    let quota = ml_team_quota(json!({"limits.nvidia.com/gpumem": "1000"}));
    let (answer, _) = ask(
        &gpu_pod(json!({"nvidia.com/gpumem-percentage": "90"})),
        &quota,
    );
    assert!(answer.allowed, "{}", answer.body);
}

#[test]
fn an_explicit_zero_denies_gpu_memory_but_not_other_pods() {
    let quota = ml_team_quota(json!({"limits.nvidia.com/gpumem": "0"}));
    let (answer, _) = ask(&gpu_pod(json!({"nvidia.com/gpumem": "1"})), &quota);
    assert!(!answer.allowed, "{}", answer.body);
    let cpu_only = api_server_pod(
        json!([{"name": "web", "resources": {"limits": {"cpu": "1"}}}]),
        json!({}),
        json!({}),
    );
    let (answer, outcome) = ask(&cpu_only, &quota);
    assert!(answer.allowed && answer.patch.is_none(), "{}", answer.body);
    assert_eq!(outcome, Outcome::Allowed);
    // An opted-out pod is not ours to judge.
    let opted_out = api_server_pod(
        json!([{"name": "trainer", "resources": {"limits": {"nvidia.com/gpumem": "1"}}}]),
        json!({"labels": {"hami.io/webhook": "ignore"}}),
        json!({}),
    );
    let (answer, _) = ask(&opted_out, &quota);
    assert!(answer.allowed, "{}", answer.body);
}

#[test]
fn other_namespaces_are_not_limited() {
    let quota = ml_team_quota(json!({"limits.nvidia.com/gpumem": "0"}));
    let pod = api_server_pod(
        json!([{"name": "trainer", "resources": {"limits": {"nvidia.com/gpumem": "4000"}}}]),
        json!({"namespace": "research"}),
        json!({}),
    );
    let (answer, _) = ask(&pod, &quota);
    assert!(answer.allowed, "{}", answer.body);
}
