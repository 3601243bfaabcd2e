//! The AdmissionReview wire format (`admission.k8s.io/v1`, and `v1beta1`
//! which has the same shape): reading a request body into the Pod to judge,
//! and writing the response the API server expects. Bodies that are not a
//! usable review are a [`ReviewError`], answered with HTTP 400 by the server.

use base64::Engine as _;
use json_patch::Patch;
use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use thiserror::Error;

use crate::decision::{AdmissionDecision, Denial};

/// The API group and kind every review carries.
pub const REVIEW_KIND: &str = "AdmissionReview";
/// The versions of `admission.k8s.io` we answer.
pub const SUPPORTED_VERSIONS: [&str; 2] = ["admission.k8s.io/v1", "admission.k8s.io/v1beta1"];

/// A body that is not an AdmissionReview we can answer.
#[derive(Debug, Error)]
pub enum ReviewError {
    /// Not JSON, or JSON of the wrong shape.
    #[error("the body is not an AdmissionReview ({0}); send a JSON admission.k8s.io/v1 AdmissionReview with a request")]
    NotAReview(#[source] serde_json::Error),
    /// A review of an apiVersion or kind we do not speak.
    #[error("the body has apiVersion `{api_version}` and kind `{kind}`; send kind AdmissionReview with apiVersion admission.k8s.io/v1 or admission.k8s.io/v1beta1")]
    WrongKind {
        /// As sent.
        api_version: String,
        /// As sent.
        kind: String,
    },
    /// The review has no `request`.
    #[error("the AdmissionReview has no `request`; the API server always sends one, so check what is calling this endpoint")]
    MissingRequest,
    /// A CREATE of a pod with no `object`.
    #[error(
        "the AdmissionReview request {uid} has no `object`; a pod CREATE always carries the pod"
    )]
    MissingObject {
        /// Request uid.
        uid: String,
    },
    /// The object is not a Pod we can read.
    #[error("the object in AdmissionReview request {uid} is not a valid Pod ({source}); check the webhook's rules send only pods")]
    NotAPod {
        /// Request uid.
        uid: String,
        /// The decode error.
        #[source]
        source: serde_json::Error,
    },
}

/// The parts of an incoming review we read. The object stays raw until we
/// know the request is a pod CREATE.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IncomingReview<'a> {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(borrow, default)]
    request: Option<IncomingRequest<'a>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IncomingRequest<'a> {
    uid: String,
    #[serde(default)]
    kind: Option<GroupVersionKind>,
    #[serde(default)]
    operation: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    sub_resource: Option<String>,
    #[serde(borrow, default)]
    object: Option<&'a RawValue>,
}

#[derive(Debug, Deserialize)]
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    #[serde(default)]
    kind: String,
}

/// A review read from a body: what to judge and how to address the answer.
#[derive(Debug)]
pub struct ParsedReview {
    /// `admission.k8s.io/v1` or `v1beta1`, echoed in the response.
    pub api_version: String,
    /// The request uid, echoed in the response.
    pub uid: String,
    /// The request's namespace: for logs, and the pod's namespace when
    /// the object leaves it out.
    pub namespace: Option<String>,
    /// The pod's name (often empty at CREATE with `generateName`), for logs.
    pub name: Option<String>,
    /// The pod to judge; `None` for requests that are not a pod CREATE,
    /// which are allowed untouched.
    pub pod: Option<Box<Pod>>,
}

/// Reads a request body.
pub fn parse_review(body: &[u8]) -> Result<ParsedReview, ReviewError> {
    let review: IncomingReview<'_> =
        serde_json::from_slice(body).map_err(ReviewError::NotAReview)?;
    if review.kind != REVIEW_KIND || !SUPPORTED_VERSIONS.contains(&review.api_version.as_str()) {
        return Err(ReviewError::WrongKind {
            api_version: review.api_version,
            kind: review.kind,
        });
    }
    let request = review.request.ok_or(ReviewError::MissingRequest)?;
    let is_pod = request
        .kind
        .as_ref()
        .is_none_or(|k| k.group.is_empty() && k.kind == "Pod");
    let is_create = request.operation.as_deref().is_none_or(|op| op == "CREATE");
    let is_main_resource = request.sub_resource.as_deref().is_none_or(str::is_empty);
    let pod = if is_pod && is_create && is_main_resource {
        let raw = request.object.ok_or_else(|| ReviewError::MissingObject {
            uid: request.uid.clone(),
        })?;
        let pod: Pod = serde_json::from_str(raw.get()).map_err(|source| ReviewError::NotAPod {
            uid: request.uid.clone(),
            source,
        })?;
        Some(Box::new(pod))
    } else {
        None
    };
    Ok(ParsedReview {
        api_version: review.api_version,
        uid: request.uid,
        namespace: request.namespace,
        name: request.name,
        pod,
    })
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct OutgoingReview<'a> {
    api_version: &'a str,
    kind: &'static str,
    response: OutgoingResponse<'a>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct OutgoingResponse<'a> {
    uid: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<OutgoingStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
}

#[derive(Debug, Serialize)]
struct OutgoingStatus {
    code: u16,
    reason: &'static str,
    message: String,
}

/// The response body for `decision`, addressed to the request `uid` in
/// the review version `api_version` it came in.
pub fn response_body(api_version: &str, uid: &str, decision: &AdmissionDecision) -> Vec<u8> {
    let response = match decision {
        AdmissionDecision::Allowed { patch, .. } => OutgoingResponse {
            uid,
            allowed: true,
            status: None,
            patch_type: patch.as_ref().map(|_| "JSONPatch"),
            patch: patch.as_ref().map(encode_patch),
        },
        AdmissionDecision::Denied(denial) => OutgoingResponse {
            uid,
            allowed: false,
            status: Some(denial_status(denial)),
            patch_type: None,
            patch: None,
        },
    };
    let review = OutgoingReview {
        api_version,
        kind: REVIEW_KIND,
        response,
    };
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(&review).unwrap_or_default()
}

fn denial_status(denial: &Denial) -> OutgoingStatus {
    OutgoingStatus {
        code: denial.code(),
        reason: denial.status_reason(),
        message: denial.to_string(),
    }
}

fn encode_patch(patch: &Patch) -> String {
    let json = serde_json::to_vec(patch).unwrap_or_default();
    base64::engine::general_purpose::STANDARD.encode(json)
}
