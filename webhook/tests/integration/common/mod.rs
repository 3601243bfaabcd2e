//! Shared helpers for the webhook's tests: AdmissionReview bodies shaped as
//! the API server sends them, and decoding of the responses.

#![allow(dead_code)]

use base64::Engine as _;
use serde_json::{json, Value};

/// A Pod as the API server hands it to mutating webhooks at CREATE: after
/// defaulting and the built-in admission plugins (service account volume,
/// default tolerations), with `containers` and extra `metadata`/`spec`
/// fields merged in.
pub fn api_server_pod(containers: Value, metadata: Value, spec_extra: Value) -> Value {
    let mut containers = containers;
    for container in containers.as_array_mut().expect("containers is an array") {
        let object = container.as_object_mut().expect("container is an object");
        object
            .entry("image")
            .or_insert(json!("nvcr.io/nvidia/pytorch:24.05-py3"));
        object
            .entry("imagePullPolicy")
            .or_insert(json!("IfNotPresent"));
        object
            .entry("terminationMessagePath")
            .or_insert(json!("/dev/termination-log"));
        object
            .entry("terminationMessagePolicy")
            .or_insert(json!("File"));
        object.entry("volumeMounts").or_insert(json!([{
            "name": "kube-api-access-x7k2p",
            "readOnly": true,
            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"
        }]));
    }
    let mut metadata_base = json!({
        "generateName": "trainer-",
        "namespace": "ml-team",
        "creationTimestamp": null,
        "labels": {"app": "trainer"},
        "managedFields": [{
            "manager": "kubectl-client-side-apply",
            "operation": "Update",
            "apiVersion": "v1",
            "time": "2025-01-10T12:00:00Z",
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}}}}
        }]
    });
    merge(&mut metadata_base, metadata);
    let mut spec = json!({
        "volumes": [{
            "name": "kube-api-access-x7k2p",
            "projected": {"sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
            ], "defaultMode": 420}
        }],
        "containers": containers,
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst",
        "serviceAccountName": "default",
        "serviceAccount": "default",
        "securityContext": {},
        "schedulerName": "default-scheduler",
        "tolerations": [
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
        ],
        "priority": 0,
        "enableServiceLinks": true,
        "preemptionPolicy": "PreemptLowerPriority"
    });
    merge(&mut spec, spec_extra);
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": metadata_base,
        "spec": spec,
        "status": {}
    })
}

/// Merges `patch` into `base` (objects recursively; `null` removes).
pub fn merge(base: &mut Value, patch: Value) {
    json_patch::merge(base, &patch);
}

/// A full AdmissionReview request for a pod CREATE.
pub fn review(api_version: &str, uid: &str, pod: &Value) -> Value {
    json!({
        "kind": "AdmissionReview",
        "apiVersion": api_version,
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "ml-team",
            "operation": "CREATE",
            "userInfo": {
                "username": "kubernetes-admin",
                "groups": ["kubeadm:cluster-admins", "system:authenticated"]
            },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1", "fieldManager": "kubectl-client-side-apply", "fieldValidation": "Strict"}
        }
    })
}

/// The parts of an AdmissionReview response a test checks.
#[derive(Debug)]
pub struct Answer {
    /// The whole response body.
    pub body: Value,
    /// `response.allowed`.
    pub allowed: bool,
    /// The decoded JSON Patch, when there is one.
    pub patch: Option<json_patch::Patch>,
    /// `response.status.message`.
    pub message: Option<String>,
    /// `response.status.code`.
    pub code: Option<u64>,
}

/// Decodes a response body and checks the envelope the API server requires.
pub fn decode_answer(body: &[u8], api_version: &str, uid: &str) -> Answer {
    let body: Value = serde_json::from_slice(body).expect("response is JSON");
    assert_eq!(body["kind"], "AdmissionReview", "{body}");
    assert_eq!(body["apiVersion"], api_version, "{body}");
    let response = &body["response"];
    assert_eq!(response["uid"], uid, "{body}");
    let allowed = response["allowed"].as_bool().expect("allowed is a bool");
    let patch = response.get("patch").map(|encoded| {
        assert_eq!(response["patchType"], "JSONPatch", "{body}");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().expect("patch is a string"))
            .expect("patch is base64");
        serde_json::from_slice(&bytes).expect("patch is a JSON Patch")
    });
    if patch.is_none() {
        assert!(response.get("patchType").is_none(), "{body}");
    }
    let message = response["status"]["message"].as_str().map(str::to_owned);
    let code = response["status"]["code"].as_u64();
    Answer {
        body,
        allowed,
        patch,
        message,
        code,
    }
}

/// Applies `patch` to a copy of `object`, as the API server does.
pub fn apply(object: &Value, patch: &json_patch::Patch) -> Value {
    let mut patched = object.clone();
    json_patch::patch(&mut patched, patch)
        .expect("the patch applies cleanly to the original object");
    patched
}
