//! Every admission rule, exercised with AdmissionReview JSON shaped as the
//! API server sends it, through the same entry point the HTTPS handler uses
//! ([`answer_review`]). Each patch is applied to the original object and the
//! result checked.

use crate::common;

use std::collections::BTreeMap;

use common::{api_server_pod, apply, decode_answer, review, Answer};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};
use tessera_api::config::Config;
use tessera_api::request::PodGpuRequest;
use tessera_webhook::metrics::Outcome;
use tessera_webhook::server::answer_review;
use tessera_webhook::{admit, mutate_pod, AdmissionDecision, AllowReason, Denial};

const V1: &str = "admission.k8s.io/v1";

fn container(name: &str, limits: Value) -> Value {
    json!({"name": name, "resources": {"limits": limits, "requests": {"cpu": "500m", "memory": "1Gi"}}})
}

fn gpu_pod(limits: Value) -> Value {
    api_server_pod(json!([container("trainer", limits)]), json!({}), json!({}))
}

fn ask_with(config: &Config, pod: &Value) -> (Answer, Outcome) {
    let body =
        serde_json::to_vec(&review(V1, "7f0e5c8a-1d2b-4c3d-9e8f-a1b2c3d4e5f6", pod)).unwrap();
    let (response, outcome) = answer_review(&body, config).expect("a well-formed review");
    (
        decode_answer(&response, V1, "7f0e5c8a-1d2b-4c3d-9e8f-a1b2c3d4e5f6"),
        outcome,
    )
}

fn ask(pod: &Value) -> Answer {
    ask_with(&Config::default(), pod).0
}

/// The pod after the webhook's patch, which must exist and apply.
fn mutated(pod: &Value) -> Value {
    let answer = ask(pod);
    assert!(answer.allowed, "{}", answer.body);
    apply(pod, answer.patch.as_ref().expect("a patch"))
}

fn denial(config: &Config, pod: &Value) -> (String, u64) {
    let (answer, outcome) = ask_with(config, pod);
    assert!(!answer.allowed, "expected a denial: {}", answer.body);
    assert!(answer.patch.is_none());
    assert_eq!(outcome, Outcome::Denied);
    (
        answer.message.expect("a message"),
        answer.code.expect("a code"),
    )
}

fn limits(pod: &Value, index: usize) -> &Value {
    &pod["spec"]["containers"][index]["resources"]["limits"]
}

#[test]
fn plain_gpu_gets_whole_card_memory_exclusive_cores_and_our_scheduler() {
    let pod = gpu_pod(json!({"nvidia.com/gpu": "1", "cpu": "2"}));
    let (answer, outcome) = ask_with(&Config::default(), &pod);
    assert_eq!(outcome, Outcome::Mutated);
    let after = apply(&pod, answer.patch.as_ref().expect("patch"));
    assert_eq!(
        limits(&after, 0),
        &json!({"nvidia.com/gpu": "1", "cpu": "2", "nvidia.com/gpumem-percentage": "100", "nvidia.com/gpucores": "100"})
    );
    assert_eq!(after["spec"]["schedulerName"], "tessera-scheduler");
    // Only what must change: everything else is byte-for-byte the original.
    let mut expected = pod.clone();
    expected["spec"]["schedulerName"] = json!("tessera-scheduler");
    expected["spec"]["containers"][0]["resources"]["limits"] = limits(&after, 0).clone();
    assert_eq!(after, expected);
    assert_eq!(answer.patch.unwrap().0.len(), 3, "one operation per change");
}

#[test]
fn memory_only_gets_one_card_and_no_cores() {
    let after = mutated(&gpu_pod(json!({"nvidia.com/gpumem": "7500"})));
    assert_eq!(
        limits(&after, 0),
        &json!({"nvidia.com/gpumem": "7500", "nvidia.com/gpu": "1"})
    );
    let after = mutated(&gpu_pod(
        json!({"nvidia.com/gpumem-percentage": "45", "nvidia.com/gpucores": "30"}),
    ));
    assert_eq!(
        limits(&after, 0),
        &json!({"nvidia.com/gpumem-percentage": "45", "nvidia.com/gpucores": "30", "nvidia.com/gpu": "1"})
    );
}

#[test]
fn cores_only_gets_a_card_and_the_whole_card_memory() {
    let after = mutated(&gpu_pod(json!({"nvidia.com/gpucores": "30"})));
    assert_eq!(
        limits(&after, 0),
        &json!({"nvidia.com/gpucores": "30", "nvidia.com/gpu": "1", "nvidia.com/gpumem-percentage": "100"})
    );
}

#[test]
fn configured_defaults_apply() {
    let config = Config::from_yaml("defaults:\n  gpuCount: 2\n  memoryMib: 4096\n  cores: 20\n")
        .expect("config");
    let pod = gpu_pod(json!({"nvidia.com/gpucores": "50"}));
    let (answer, _) = ask_with(&config, &pod);
    let after = apply(&pod, answer.patch.as_ref().unwrap());
    assert_eq!(
        limits(&after, 0),
        &json!({"nvidia.com/gpucores": "50", "nvidia.com/gpu": "2", "nvidia.com/gpumem": "4096"})
    );
    // A plain card with a default memory is a slice, not exclusive: it
    // gets the default cores.
    let pod = gpu_pod(json!({"nvidia.com/gpu": "1"}));
    let (answer, _) = ask_with(&config, &pod);
    let after = apply(&pod, answer.patch.as_ref().unwrap());
    assert_eq!(
        limits(&after, 0),
        &json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "4096", "nvidia.com/gpucores": "20"})
    );
}

#[test]
fn renamed_resources_and_scheduler_are_honoured() {
    let config = Config::from_yaml(
        "schedulerName: gpu-sched\nresources:\n  gpu: example.com/vgpu\n  memory: example.com/vmem\n",
    )
    .expect("config");
    let pod = gpu_pod(json!({"example.com/vmem": "1000"}));
    let (answer, _) = ask_with(&config, &pod);
    let after = apply(&pod, answer.patch.as_ref().unwrap());
    assert_eq!(
        limits(&after, 0),
        &json!({"example.com/vmem": "1000", "example.com/vgpu": "1"})
    );
    assert_eq!(after["spec"]["schedulerName"], "gpu-sched");
    // nvidia.com names are not ours under this config.
    let (answer, outcome) = ask_with(&config, &gpu_pod(json!({"nvidia.com/gpu": "1"})));
    assert!(answer.allowed && answer.patch.is_none());
    assert_eq!(outcome, Outcome::Allowed);
}

#[test]
fn init_containers_are_defaulted_too() {
    let pod = api_server_pod(
        json!([container("app", json!({"cpu": "1"}))]),
        json!({}),
        json!({"initContainers": [container("warmup", json!({"nvidia.com/gpumem": "2000"}))]}),
    );
    let after = mutated(&pod);
    assert_eq!(
        after["spec"]["initContainers"][0]["resources"]["limits"],
        json!({"nvidia.com/gpumem": "2000", "nvidia.com/gpu": "1"})
    );
    assert_eq!(
        limits(&after, 0),
        &json!({"cpu": "1"}),
        "the CPU container is untouched"
    );
    assert_eq!(after["spec"]["schedulerName"], "tessera-scheduler");
}

#[test]
fn gpu_values_only_in_requests_get_limits_added() {
    let pod = api_server_pod(
        json!([{"name": "c", "resources": {"requests": {"nvidia.com/gpumem": "1000"}}}]),
        json!({}),
        json!({}),
    );
    let after = mutated(&pod);
    assert_eq!(limits(&after, 0), &json!({"nvidia.com/gpu": "1"}));
    assert_eq!(
        after["spec"]["containers"][0]["resources"]["requests"],
        json!({"nvidia.com/gpumem": "1000"})
    );
}

#[test]
fn priority_is_left_to_the_node_agent() {
    // The webhook writes no env: the node agent sets CUDA_TASK_PRIORITY
    // from the priority resource at Allocate.
    let after = mutated(&gpu_pod(
        json!({"nvidia.com/gpumem": "1000", "nvidia.com/priority": "1"}),
    ));
    assert!(
        after["spec"]["containers"][0].get("env").is_none(),
        "{after}"
    );
    let mut pod = gpu_pod(json!({"nvidia.com/gpumem": "1000", "nvidia.com/priority": "0"}));
    pod["spec"]["containers"][0]["env"] = json!([{"name": "NCCL_DEBUG", "value": "INFO"}]);
    let after = mutated(&pod);
    assert_eq!(
        after["spec"]["containers"][0]["env"],
        json!([{"name": "NCCL_DEBUG", "value": "INFO"}])
    );
}

/// Every variable the node agent owns, with what the denial must suggest.
const CONTROL_VARIABLES: [(&str, &str); 12] = [
    ("CUDA_DEVICE_MEMORY_LIMIT", "`nvidia.com/gpumem`"),
    ("CUDA_DEVICE_MEMORY_LIMIT_0", "`nvidia.com/gpumem`"),
    (
        "CUDA_DEVICE_MEMORY_LIMIT_7",
        "`nvidia.com/gpumem-percentage`",
    ),
    ("CUDA_DEVICE_SM_LIMIT", "`nvidia.com/gpucores`"),
    ("CUDA_DEVICE_SM_LIMIT_1", "`nvidia.com/gpucores`"),
    ("CUDA_DEVICE_MEMORY_SHARED_CACHE", "own accounting file"),
    ("CUDA_TASK_PRIORITY", "`nvidia.com/priority`"),
    ("NVIDIA_VISIBLE_DEVICES", "`nvidia.com/gpu`"),
    ("TESSERA_VISIBLE_UUIDS", "Tessera's own settings"),
    ("TESSERA_CARD_TENANTS_DIR", "Tessera's own settings"),
    ("TESSERA_PID_SOCKET", "Tessera's own settings"),
    ("CUDA_DISABLE_CONTROL", "controlOptOutNamespaces"),
];

#[test]
fn variables_the_node_agent_owns_are_denied_naming_container_and_variable() {
    for (variable, instead) in CONTROL_VARIABLES {
        for value in [
            json!({"value": "0"}),
            json!({"valueFrom": {"configMapKeyRef": {"name": "m", "key": "k"}}}),
        ] {
            let mut entry = json!({"name": variable});
            json_patch::merge(&mut entry, &value);
            // In the GPU container, in a CPU sidecar of a GPU pod, in an init container.
            let mut in_gpu = gpu_pod(json!({"nvidia.com/gpumem": "4000"}));
            in_gpu["spec"]["containers"][0]["env"] =
                json!([{"name": "NCCL_DEBUG", "value": "INFO"}, entry]);
            let in_sidecar = api_server_pod(
                json!([
                    container("trainer", json!({"nvidia.com/gpumem": "4000"})),
                    {"name": "logger", "env": [entry]}
                ]),
                json!({}),
                json!({}),
            );
            let in_init = api_server_pod(
                json!([container("trainer", json!({"nvidia.com/gpumem": "4000"}))]),
                json!({}),
                json!({"initContainers": [{"name": "fetch", "env": [entry]}]}),
            );
            for (pod, name) in [
                (in_gpu, "trainer"),
                (in_sidecar, "logger"),
                (in_init, "fetch"),
            ] {
                let (message, code) = denial(&Config::default(), &pod);
                assert_eq!(code, 403, "{message}");
                assert!(
                    message.contains(&format!("container `{name}`")),
                    "{message}"
                );
                assert!(message.contains(&format!("sets `{variable}`")), "{message}");
                assert!(message.contains(instead), "{variable}: {message}");
            }
        }
    }
    // The pod's own settings pass.
    let mut pod = gpu_pod(json!({"nvidia.com/gpumem": "4000"}));
    pod["spec"]["containers"][0]["env"] = json!([
        {"name": "GPU_CORE_UTILIZATION_POLICY", "value": "force"},
        {"name": "LIBCUDA_LOG_LEVEL", "value": "3"},
        {"name": "CUDA_VISIBLE_DEVICES", "value": "0"},
        {"name": "LD_PRELOAD", "value": "/opt/libfoo.so"},
    ]);
    assert!(ask(&pod).allowed);
    // A pod that asks for no GPU is not the webhook's to judge (the
    // ValidatingAdmissionPolicy covers NVIDIA_VISIBLE_DEVICES there).
    let cpu = api_server_pod(
        json!([{"name": "web", "env": [{"name": "CUDA_DEVICE_MEMORY_LIMIT_0", "value": "1g"}]}]),
        json!({}),
        json!({}),
    );
    assert!(ask(&cpu).allowed);
}

#[test]
fn only_listed_namespaces_may_opt_out_of_the_interceptor() {
    let opt_out = |namespace: Option<&str>| {
        let mut pod = gpu_pod(json!({"nvidia.com/gpumem": "4000"}));
        pod["spec"]["containers"][0]["env"] =
            json!([{"name": "CUDA_DISABLE_CONTROL", "value": "true"}]);
        match namespace {
            Some(ns) => pod["metadata"]["namespace"] = json!(ns),
            None => {
                pod["metadata"].as_object_mut().unwrap().remove("namespace");
            }
        }
        pod
    };
    let config = Config::from_yaml("controlOptOutNamespaces: [gpu-bench]\n").expect("config");
    assert!(ask_with(&config, &opt_out(Some("gpu-bench"))).0.allowed);
    let (message, _) = denial(&config, &opt_out(Some("ml-team")));
    assert!(message.contains("controlOptOutNamespaces"), "{message}");
    let (message, _) = denial(&Config::default(), &opt_out(Some("gpu-bench")));
    assert!(message.contains("not allowed to opt out"), "{message}");
    // The review's namespace counts when the object leaves it out
    // (the test review is in ml-team).
    let in_ml_team = Config::from_yaml("controlOptOutNamespaces: [ml-team]\n").expect("config");
    assert!(ask_with(&in_ml_team, &opt_out(None)).0.allowed);
    assert!(!ask_with(&config, &opt_out(None)).0.allowed);
    // Opting out never frees the other variables.
    let mut pod = opt_out(Some("gpu-bench"));
    pod["spec"]["containers"][0]["env"] = json!([
        {"name": "CUDA_DISABLE_CONTROL", "value": "true"},
        {"name": "CUDA_DEVICE_MEMORY_LIMIT_0", "value": "80g"}
    ]);
    let (message, _) = denial(&config, &pod);
    assert!(
        message.contains("`CUDA_DEVICE_MEMORY_LIMIT_0`"),
        "{message}"
    );
}

#[test]
fn env_from_in_a_gpu_container_needs_a_safe_prefix() {
    let with_env_from = |entry: Value| {
        let mut pod = gpu_pod(json!({"nvidia.com/gpumem": "4000"}));
        pod["spec"]["containers"][0]["envFrom"] = json!([entry]);
        pod
    };
    let (message, code) = denial(
        &Config::default(),
        &with_env_from(json!({"configMapRef": {"name": "settings"}})),
    );
    assert_eq!(code, 403);
    assert!(message.contains("container `trainer`"), "{message}");
    assert!(
        message.contains("ConfigMap `settings` with no prefix"),
        "{message}"
    );
    assert!(
        message.contains("give that envFrom entry a `prefix`"),
        "{message}"
    );
    let (message, _) = denial(
        &Config::default(),
        &with_env_from(json!({"secretRef": {"name": "tokens"}, "prefix": "CUDA_"})),
    );
    assert!(
        message.contains("Secret `tokens` with the prefix `CUDA_`"),
        "{message}"
    );
    for prefix in ["TESSERA_", "NVIDIA_", ""] {
        let pod = with_env_from(json!({"secretRef": {"name": "tokens"}, "prefix": prefix}));
        assert!(!ask(&pod).allowed, "prefix `{prefix}`");
    }
    for prefix in ["APP_", "HF_", "NVIDIA_DRIVER_"] {
        let pod = with_env_from(json!({"configMapRef": {"name": "settings"}, "prefix": prefix}));
        assert!(ask(&pod).allowed, "prefix `{prefix}`");
    }
    // A container without a GPU gets no card to cap: its envFrom is its own.
    let pod = api_server_pod(
        json!([
            container("trainer", json!({"nvidia.com/gpumem": "4000"})),
            {"name": "proxy", "envFrom": [{"configMapRef": {"name": "proxy"}}]}
        ]),
        json!({}),
        json!({}),
    );
    assert!(ask(&pod).allowed);
    // A GPU init container is held to the same rule.
    let pod = api_server_pod(
        json!([container("trainer", json!({"cpu": "1"}))]),
        json!({}),
        json!({"initContainers": [{"name": "warmup", "envFrom": [{"configMapRef": {"name": "w"}}],
            "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}),
    );
    let (message, _) = denial(&Config::default(), &pod);
    assert!(message.contains("container `warmup`"), "{message}");
}

#[test]
fn another_scheduler_is_left_alone() {
    let mut pod = gpu_pod(json!({"nvidia.com/gpu": "1"}));
    pod["spec"]["schedulerName"] = json!("volcano");
    let (answer, outcome) = ask_with(&Config::default(), &pod);
    assert!(answer.allowed);
    assert!(answer.patch.is_none());
    assert_eq!(outcome, Outcome::Allowed);
}

#[test]
fn a_complete_pod_for_our_scheduler_needs_no_patch() {
    let mut pod = gpu_pod(json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "3000"}));
    pod["spec"]["schedulerName"] = json!("tessera-scheduler");
    let answer = ask(&pod);
    assert!(answer.allowed);
    assert!(answer.patch.is_none(), "{}", answer.body);
    // And without a schedulerName at all (not defaulted), it is added.
    pod["spec"].as_object_mut().unwrap().remove("schedulerName");
    let after = mutated(&pod);
    assert_eq!(after["spec"]["schedulerName"], "tessera-scheduler");
}

#[test]
fn a_pod_with_node_name_is_denied() {
    let pod = api_server_pod(
        json!([container("trainer", json!({"nvidia.com/gpu": "1"}))]),
        json!({}),
        json!({"nodeName": "gpu-node-3"}),
    );
    let (message, code) = denial(&Config::default(), &pod);
    assert_eq!(code, 403);
    assert!(
        message.contains("spec.nodeName = `gpu-node-3`"),
        "{message}"
    );
    assert!(message.contains("remove spec.nodeName"), "{message}");
}

#[test]
fn out_of_range_values_are_denied_naming_container_value_and_range() {
    let cases = [
        (
            json!({"nvidia.com/gpumem-percentage": "0"}),
            "`0`",
            "from 1 to 100",
        ),
        (
            json!({"nvidia.com/gpumem-percentage": "101"}),
            "`101`",
            "from 1 to 100",
        ),
        (
            json!({"nvidia.com/gpucores": "150"}),
            "`150`",
            "from 0 to 100",
        ),
        (json!({"nvidia.com/gpu": "-1"}), "`-1`", "out of range"),
        (
            json!({"nvidia.com/gpu": "1.5"}),
            "`1.5`",
            "not a whole number",
        ),
        (json!({"nvidia.com/gpumem": "-4000"}), "`-4000`", "negative"),
        (
            json!({"nvidia.com/gpumem": "0.5"}),
            "`0.5`",
            "whole number of MiB",
        ),
        (json!({"nvidia.com/gpucores": "abc"}), "`abc`", ""),
        (
            json!({"nvidia.com/priority": "7", "nvidia.com/gpu": "1"}),
            "`7`",
            "0 (high) or 1 (low)",
        ),
    ];
    for (limits, value, range) in cases {
        let (message, code) = denial(&Config::default(), &gpu_pod(limits.clone()));
        assert_eq!(code, 422, "{limits}");
        assert!(
            message.contains("container `trainer`"),
            "{limits}: {message}"
        );
        assert!(message.contains(value), "{limits}: {message}");
        assert!(message.contains(range), "{limits}: {message}");
    }
}

#[test]
fn memory_above_the_largest_card_is_denied_when_known() {
    let pod = gpu_pod(json!({"nvidia.com/gpumem": "90Gi"}));
    assert!(ask(&pod).allowed, "no limit configured: allowed");
    let config = Config::from_yaml("maxCardMemoryMib: 81920\n").expect("config");
    let (message, code) = denial(&config, &pod);
    assert_eq!(code, 422);
    assert!(message.contains("container `trainer`"), "{message}");
    assert!(message.contains("`90Gi`"), "{message}");
    assert!(message.contains("92160 MiB"), "{message}");
    assert!(message.contains("from 1 to 81920"), "{message}");
    let (answer, _) = ask_with(&config, &gpu_pod(json!({"nvidia.com/gpumem": "81920"})));
    assert!(answer.allowed, "exactly the largest card fits");
}

#[test]
fn privileged_gpu_containers_are_denied() {
    let mut pod = gpu_pod(json!({"nvidia.com/gpumem": "4000"}));
    pod["spec"]["containers"][0]["securityContext"] = json!({"privileged": true});
    let (message, code) = denial(&Config::default(), &pod);
    assert_eq!(code, 403);
    assert!(
        message.contains("container `trainer` is privileged"),
        "{message}"
    );
    // A privileged sidecar with no GPU next to a GPU container is fine.
    let mut pod = api_server_pod(
        json!([
            container("trainer", json!({"nvidia.com/gpumem": "4000"})),
            {"name": "net-tools", "securityContext": {"privileged": true}}
        ]),
        json!({}),
        json!({}),
    );
    assert!(ask(&pod).allowed);
    pod["spec"]["containers"][0]["securityContext"] = json!({"privileged": false});
    assert!(ask(&pod).allowed);
}

#[test]
fn forged_allocation_annotations_are_denied() {
    for key in tessera_api::names::allocation::SCHEDULER_OWNED {
        let pod = api_server_pod(
            json!([container("trainer", json!({"nvidia.com/gpu": "1"}))]),
            json!({"annotations": {key: "GPU-0b1c,NVIDIA,81920,100:;"}}),
            json!({}),
        );
        let (message, code) = denial(&Config::default(), &pod);
        assert_eq!(code, 403);
        assert!(message.contains(key), "{message}");
        assert!(
            message.contains("only the scheduler may write"),
            "{message}"
        );
    }
    // Any tessera.io/* annotation is Tessera's too.
    for key in ["tessera.io/allocation-signature", "tessera.io/anything"] {
        let pod = api_server_pod(
            json!([container("trainer", json!({"nvidia.com/gpu": "1"}))]),
            json!({"annotations": {key: "x", "team": "ml"}}),
            json!({}),
        );
        let (message, code) = denial(&Config::default(), &pod);
        assert_eq!(code, 403);
        assert!(message.contains(key), "{message}");
        assert!(!message.contains("team"), "{message}");
    }
    // User-facing annotations are fine.
    let pod = api_server_pod(
        json!([container("trainer", json!({"nvidia.com/gpu": "1"}))]),
        json!({"annotations": {"nvidia.com/use-gputype": "A100", "hami.io/gpu-scheduler-policy": "binpack"}}),
        json!({}),
    );
    assert!(ask(&pod).allowed);
}

fn annotated_gpu_pod(annotations: Value) -> Value {
    api_server_pod(
        json!([container("trainer", json!({"nvidia.com/gpu": "2"}))]),
        json!({"annotations": annotations}),
        json!({}),
    )
}

#[test]
fn every_policy_hami_accepts_is_admitted() {
    for gpu_policy in [
        "binpack",
        "spread",
        "numa",
        "mutex",
        "topology-aware",
        "binpack,numa",
        "numa, spread",
        "mutex,topology-aware",
        "Spread,Mutex",
    ] {
        let answer = ask(&annotated_gpu_pod(
            json!({"hami.io/gpu-scheduler-policy": gpu_policy}),
        ));
        assert!(answer.allowed, "{gpu_policy}: {}", answer.body);
    }
    for node_policy in ["binpack", "spread", " spread "] {
        let answer = ask(&annotated_gpu_pod(
            json!({"hami.io/node-scheduler-policy": node_policy}),
        ));
        assert!(answer.allowed, "{node_policy}: {}", answer.body);
    }
}

#[test]
fn policies_hami_rejects_are_denied_naming_what_to_write() {
    for (key, value, needle) in [
        ("hami.io/gpu-scheduler-policy", "fastest", "`fastest`"),
        ("hami.io/gpu-scheduler-policy", "binpack,,numa", "empty"),
        ("hami.io/gpu-scheduler-policy", "", "empty"),
        ("hami.io/node-scheduler-policy", "numa", "`numa`"),
        (
            "hami.io/node-scheduler-policy",
            "binpack,spread",
            "one name",
        ),
    ] {
        let (message, code) = denial(&Config::default(), &annotated_gpu_pod(json!({key: value})));
        assert_eq!(code, 422, "{key}={value}");
        assert!(message.contains(key), "{key}={value}: {message}");
        assert!(message.contains(needle), "{key}={value}: {message}");
        assert!(message.contains("binpack"), "{key}={value}: {message}");
    }
}

#[test]
fn vgpu_mode_hami_core_is_admitted_and_mig_or_mps_denied_with_what_to_do() {
    let answer = ask(&annotated_gpu_pod(
        json!({"nvidia.com/vgpu-mode": "hami-core"}),
    ));
    assert!(answer.allowed, "{}", answer.body);
    for mode in ["mig", "mps", "mig,mps"] {
        let (message, code) = denial(
            &Config::default(),
            &annotated_gpu_pod(json!({"nvidia.com/vgpu-mode": mode})),
        );
        assert_eq!(code, 422, "{mode}");
        assert!(
            message.contains("nvidia.com/vgpu-mode"),
            "{mode}: {message}"
        );
        assert!(message.contains("does not provide"), "{mode}: {message}");
        assert!(message.contains("hami-core"), "{mode}: {message}");
        assert!(
            message.contains("Remove the annotation"),
            "{mode}: {message}"
        );
    }
    let (message, _) = denial(
        &Config::default(),
        &annotated_gpu_pod(json!({"nvidia.com/vgpu-mode": "vgpu"})),
    );
    assert!(message.contains("not a device mode"), "{message}");
}

#[test]
fn pods_without_gpu_requests_are_untouched() {
    let pod = api_server_pod(
        json!([container("web", json!({"cpu": "1"}))]),
        json!({}),
        json!({}),
    );
    let (answer, outcome) = ask_with(&Config::default(), &pod);
    assert!(answer.allowed && answer.patch.is_none());
    assert_eq!(outcome, Outcome::Allowed);
    // Not ours even with a node name, forged-looking annotation or a bad
    // policy annotation: nothing asks for a GPU.
    let pod = api_server_pod(
        json!([container("web", json!({"cpu": "1"}))]),
        json!({"annotations": {"hami.io/bind-phase": "success", "hami.io/gpu-scheduler-policy": "fastest"}}),
        json!({"nodeName": "n1"}),
    );
    let answer = ask(&pod);
    assert!(answer.allowed && answer.patch.is_none());
    // `nvidia.com/gpu: 0` asks for nothing.
    let answer = ask(&gpu_pod(json!({"nvidia.com/gpu": "0"})));
    assert!(answer.allowed && answer.patch.is_none());
}

#[test]
fn opted_out_pods_and_namespaces_are_untouched() {
    let pod = api_server_pod(
        json!([container(
            "trainer",
            json!({"nvidia.com/gpumem-percentage": "500"})
        )]),
        json!({"labels": {"hami.io/webhook": "ignore"}}),
        json!({}),
    );
    let answer = ask(&pod);
    assert!(answer.allowed && answer.patch.is_none(), "{}", answer.body);

    let pod: Pod = serde_json::from_value(gpu_pod(json!({"nvidia.com/gpu": "1"}))).unwrap();
    let ignore = BTreeMap::from([("hami.io/webhook".to_owned(), "ignore".to_owned())]);
    let other = BTreeMap::from([("hami.io/webhook".to_owned(), "enabled".to_owned())]);
    assert_eq!(
        admit(&pod, Some(&ignore), &Config::default()),
        AdmissionDecision::Allowed {
            reason: AllowReason::OptedOut,
            patch: None
        }
    );
    assert!(admit(&pod, Some(&other), &Config::default())
        .patch()
        .is_some());
}

#[test]
fn v1beta1_reviews_get_a_v1beta1_answer() {
    let pod = gpu_pod(json!({"nvidia.com/gpu": "1"}));
    let body = serde_json::to_vec(&review("admission.k8s.io/v1beta1", "b1", &pod)).unwrap();
    let (response, _) = answer_review(&body, &Config::default()).expect("answered");
    let answer = decode_answer(&response, "admission.k8s.io/v1beta1", "b1");
    assert!(answer.allowed);
    assert!(answer.patch.is_some());
}

#[test]
fn non_create_and_non_pod_requests_are_allowed_untouched() {
    let pod = gpu_pod(json!({"nvidia.com/gpumem-percentage": "0"}));
    let mut update = review(V1, "u1", &pod);
    update["request"]["operation"] = json!("UPDATE");
    update["request"]["oldObject"] = pod.clone();
    let (response, _) =
        answer_review(&serde_json::to_vec(&update).unwrap(), &Config::default()).unwrap();
    let answer = decode_answer(&response, V1, "u1");
    assert!(answer.allowed && answer.patch.is_none());

    let mut binding = review(
        V1,
        "u2",
        &json!({"kind": "Binding", "apiVersion": "v1", "metadata": {"name": "x"}, "target": {"kind": "Node", "name": "n"}}),
    );
    binding["request"]["subResource"] = json!("binding");
    let (response, _) =
        answer_review(&serde_json::to_vec(&binding).unwrap(), &Config::default()).unwrap();
    assert!(decode_answer(&response, V1, "u2").allowed);
}

#[test]
fn malformed_bodies_are_errors_with_a_reason() {
    let config = Config::default();
    let pod = gpu_pod(json!({"nvidia.com/gpu": "1"}));
    let mut wrong_kind = review(V1, "w", &pod);
    wrong_kind["kind"] = json!("TokenReview");
    let mut wrong_version = review(V1, "w", &pod);
    wrong_version["apiVersion"] = json!("admission.k8s.io/v2");
    let mut bad_pod = review(V1, "w", &pod);
    bad_pod["request"]["object"]["spec"]["containers"] = json!("not a list");
    let mut no_object = review(V1, "w", &pod);
    no_object["request"]
        .as_object_mut()
        .unwrap()
        .remove("object");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not json at all".to_vec(), "not an AdmissionReview"),
        (b"".to_vec(), "not an AdmissionReview"),
        (b"[1,2,3]".to_vec(), "not an AdmissionReview"),
        (
            serde_json::to_vec(&wrong_kind).unwrap(),
            "kind `TokenReview`",
        ),
        (
            serde_json::to_vec(&wrong_version).unwrap(),
            "admission.k8s.io/v2",
        ),
        (
            serde_json::to_vec(&json!({"kind": "AdmissionReview", "apiVersion": V1})).unwrap(),
            "no `request`",
        ),
        (serde_json::to_vec(&bad_pod).unwrap(), "not a valid Pod"),
        (serde_json::to_vec(&no_object).unwrap(), "no `object`"),
        (
            serde_json::to_vec(
                &json!({"kind": "AdmissionReview", "apiVersion": V1, "request": {"uid": 5}}),
            )
            .unwrap(),
            "not an AdmissionReview",
        ),
    ];
    for (body, expected) in cases {
        let error = answer_review(&body, &config)
            .expect_err(expected)
            .to_string();
        assert!(error.contains(expected), "{expected}: {error}");
    }
}

#[test]
fn mutate_pod_returns_the_defaulted_pod() {
    let pod: Pod = serde_json::from_value(gpu_pod(json!({"nvidia.com/gpu": "2"}))).unwrap();
    let config = Config::default();
    let after = mutate_pod(&pod, &config).expect("allowed");
    let spec = after.spec.as_ref().unwrap();
    assert_eq!(spec.scheduler_name.as_deref(), Some("tessera-scheduler"));
    let limits = spec.containers[0]
        .resources
        .as_ref()
        .unwrap()
        .limits
        .as_ref()
        .unwrap();
    assert_eq!(limits["nvidia.com/gpumem-percentage"].0, "100");
    assert_eq!(limits["nvidia.com/gpucores"].0, "100");

    let mut bad: Pod = pod.clone();
    bad.spec.as_mut().unwrap().node_name = Some("n".into());
    match mutate_pod(&bad, &config) {
        Err(tessera_webhook::MutateError::Denied(Denial::NodeNameSet { node })) => {
            assert_eq!(node, "n")
        }
        other => panic!("expected a node-name denial, got {other:?}"),
    }
}

/// Every combination of what a container may write: the patch applies to
/// the raw object, the result asks for exactly what the request model
/// resolves for the original (so webhook and scheduler agree), and
/// admitting the result again changes nothing.
#[test]
fn patches_apply_agree_with_resolve_and_are_idempotent() {
    let counts = [None, Some("1"), Some("2")];
    let memories = [
        None,
        Some(("nvidia.com/gpumem", "7500")),
        Some(("nvidia.com/gpumem-percentage", "45")),
    ];
    let cores = [None, Some("30"), Some("100")];
    let priorities = [None, Some("0"), Some("1")];
    let envs = [
        None,
        Some(json!([{"name": "A", "value": "b"}])),
        Some(json!([{"name": "GPU_CORE_UTILIZATION_POLICY", "value": "force"}])),
    ];
    let configs = [
        Config::default(),
        Config::from_yaml("defaults:\n  memoryMib: 2048\n  cores: 10\n").unwrap(),
        Config::from_yaml(
            "overwriteEnv: true\ndefaults: {gpuCorePolicy: force, libCudaLogLevel: 2}\n",
        )
        .unwrap(),
    ];
    let mut checked = 0;
    for config in &configs {
        for count in counts {
            for memory in memories {
                for core in cores {
                    for priority in priorities {
                        for env in &envs {
                            for as_init in [false, true] {
                                let mut limits = serde_json::Map::new();
                                limits.insert("cpu".into(), json!("1"));
                                if let Some(c) = count {
                                    limits.insert("nvidia.com/gpu".into(), json!(c));
                                }
                                if let Some((k, v)) = memory {
                                    limits.insert(k.into(), json!(v));
                                }
                                if let Some(c) = core {
                                    limits.insert("nvidia.com/gpucores".into(), json!(c));
                                }
                                if let Some(p) = priority {
                                    limits.insert("nvidia.com/priority".into(), json!(p));
                                }
                                let mut gpu = container("gpu", Value::Object(limits));
                                if let Some(env) = env {
                                    gpu["env"] = env.clone();
                                }
                                let pod = if as_init {
                                    api_server_pod(
                                        json!([container("app", json!({"cpu": "1"}))]),
                                        json!({}),
                                        json!({"initContainers": [gpu]}),
                                    )
                                } else {
                                    api_server_pod(json!([gpu]), json!({}), json!({}))
                                };
                                let original: Pod = serde_json::from_value(pod.clone()).unwrap();
                                let (answer, _) = ask_with(config, &pod);
                                assert!(answer.allowed, "{pod}");
                                let after = match &answer.patch {
                                    Some(patch) => apply(&pod, patch),
                                    None => pod.clone(),
                                };
                                let after_pod: Pod = serde_json::from_value(after.clone()).unwrap();
                                let before =
                                    PodGpuRequest::from_pod(&original, &config.resources).unwrap();
                                let now =
                                    PodGpuRequest::from_pod(&after_pod, &config.resources).unwrap();
                                let resolve = |r: &PodGpuRequest| -> Vec<_> {
                                    r.containers
                                        .iter()
                                        .chain(&r.init_containers)
                                        .map(|c| c.resolve(&config.defaults))
                                        .collect()
                                };
                                assert_eq!(resolve(&before), resolve(&now), "{pod}");
                                if before.asks_for_gpu() {
                                    for c in now
                                        .containers
                                        .iter()
                                        .chain(&now.init_containers)
                                        .filter(|c| c.asks_for_gpu())
                                    {
                                        assert!(c.count.is_some(), "count written: {after}");
                                        assert_ne!(
                                            c.memory,
                                            tessera_api::request::MemoryRequest::Unspecified,
                                            "{after}"
                                        );
                                    }
                                }
                                // The webhook writes no env unless the config
                                // asks for some, and then only appends.
                                let field = if as_init {
                                    "initContainers"
                                } else {
                                    "containers"
                                };
                                let env_before = pod["spec"][field][0].get("env");
                                let env_after = after["spec"][field][0].get("env");
                                if config.overwrite_env
                                    || config.defaults.lib_cuda_log_level.is_some()
                                {
                                    let own = env_before
                                        .and_then(Value::as_array)
                                        .cloned()
                                        .unwrap_or_default();
                                    let now =
                                        env_after.and_then(Value::as_array).expect("env written");
                                    assert!(now.len() > own.len(), "{after}");
                                    assert_eq!(now[..own.len()], own[..], "{after}");
                                } else {
                                    assert_eq!(env_after, env_before, "{after}");
                                }
                                let (again, _) = ask_with(config, &after);
                                assert!(
                                    again.allowed && again.patch.is_none(),
                                    "not idempotent: {after} -> {}",
                                    again.body
                                );
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    assert_eq!(checked, 3 * 3 * 3 * 3 * 3 * 3 * 2);
}

/// No input makes the decision panic: every prefix of a real review, and
/// the review with each byte replaced by a few troublesome ones, either
/// answers or is a malformed-body error.
#[test]
fn truncated_and_corrupted_bodies_never_panic() {
    let pod = api_server_pod(
        json!([container(
            "trainer",
            json!({"nvidia.com/gpumem": "7500", "nvidia.com/priority": "1"})
        )]),
        json!({"annotations": {"nvidia.com/use-gputype": "A100"}}),
        json!({"initContainers": [container("init", json!({"nvidia.com/gpu": "1"}))]}),
    );
    let body = serde_json::to_vec(&review(V1, "t", &pod)).unwrap();
    let config = Config::default();
    let mut answered = 0;
    for end in 0..body.len() {
        if answer_review(&body[..end], &config).is_ok() {
            answered += 1;
        }
    }
    assert_eq!(answered, 0, "no strict prefix of a JSON object is a review");
    for position in 0..body.len() {
        for replacement in [b'"', b'}', b'9', b'-', 0xff] {
            let mut corrupted = body.clone();
            corrupted[position] = replacement;
            let _ = answer_review(&corrupted, &config);
        }
    }
}

/// HAMi's `gpuCorePolicy`, `libCudaLogLevel` and `overwriteEnv`: the GPU
/// container gets the policy and log level, its sidecar (no GPU) gets
/// `NVIDIA_VISIBLE_DEVICES=none`, and a container that tries to loosen the
/// cluster's policy is refused.
#[test]
fn chart_env_values_are_written_and_a_looser_core_policy_is_refused() {
    let config = Config::from_yaml(
        "overwriteEnv: true\ndefaults: {gpuCorePolicy: force, libCudaLogLevel: 2}\n",
    )
    .unwrap();
    let pod = api_server_pod(
        json!([
            container("trainer", json!({"nvidia.com/gpu": "1"})),
            {"name": "proxy", "image": "envoy", "env": [{"name": "A", "value": "b"}]}
        ]),
        json!({}),
        json!({}),
    );
    let (answer, _) = ask_with(&config, &pod);
    assert!(answer.allowed, "{}", answer.body);
    let patched = apply(&pod, answer.patch.as_ref().expect("a patch"));
    assert_eq!(
        patched["spec"]["containers"][0]["env"],
        json!([
            {"name": "GPU_CORE_UTILIZATION_POLICY", "value": "force"},
            {"name": "LIBCUDA_LOG_LEVEL", "value": "2"}
        ])
    );
    assert_eq!(
        patched["spec"]["containers"][1]["env"],
        json!([{"name": "A", "value": "b"}, {"name": "NVIDIA_VISIBLE_DEVICES", "value": "none"}])
    );

    let cpu_only = api_server_pod(
        json!([{"name": "web", "image": "cuda"}]),
        json!({}),
        json!({}),
    );
    let (answer, _) = ask_with(&config, &cpu_only);
    let patched = apply(&cpu_only, answer.patch.as_ref().expect("a patch"));
    assert_eq!(
        patched["spec"]["containers"][0]["env"],
        json!([{"name": "NVIDIA_VISIBLE_DEVICES", "value": "none"}])
    );
    assert!(ask(&cpu_only).patch.is_none(), "off by default");

    let loosening = api_server_pod(
        json!([{"name": "trainer", "resources": {"limits": {"nvidia.com/gpu": "1"}},
                "env": [{"name": "GPU_CORE_UTILIZATION_POLICY", "value": "disable"}]}]),
        json!({}),
        json!({}),
    );
    let (message, code) = denial(&config, &loosening);
    assert_eq!(code, 403);
    assert!(
        message.contains("GPU_CORE_UTILIZATION_POLICY=disable"),
        "{message}"
    );
    assert!(message.contains("`force`"), "{message}");
    let (message, _) = denial(&Config::default(), &loosening);
    assert!(message.contains("policy is `default`"), "{message}");
}
