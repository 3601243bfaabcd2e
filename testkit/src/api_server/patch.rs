//! PATCH bodies: picks the patch flavour from the Content-Type and applies it
//! to a stored object. Strategic merge and server-side apply are treated as
//! JSON merge patches (lists are replaced, not merged by key).

use serde_json::Value;

use super::store::ApiError;

/// The patch flavours kube-rs sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PatchKind {
    /// RFC 7386 merge patch (also used for strategic merge patch).
    Merge,
    /// RFC 6902 JSON patch.
    Json,
    /// Server-side apply; creates the object when it is missing.
    Apply,
}

impl PatchKind {
    pub fn from_content_type(content_type: Option<&str>) -> Result<Self, ApiError> {
        let media = content_type
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim();
        match media {
            "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                Ok(Self::Merge)
            }
            "application/json-patch+json" => Ok(Self::Json),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Ok(Self::Apply),
            other => Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"),
            )),
        }
    }
}

/// Applies `body` to a copy of `current`. The result keeps whatever
/// `metadata.resourceVersion` the patch left there, so the caller can treat
/// it as a precondition.
pub(crate) fn apply(kind: PatchKind, current: &Value, body: &[u8]) -> Result<Value, ApiError> {
    let mut patched = current.clone();
    match kind {
        PatchKind::Merge | PatchKind::Apply => {
            let patch: Value = serde_json::from_slice(body).map_err(|e| {
                ApiError::bad_request(format!("the patch body is not valid JSON: {e}"))
            })?;
            if !patch.is_object() {
                return Err(ApiError::bad_request("a merge patch must be a JSON object"));
            }
            json_patch::merge(&mut patched, &patch);
        }
        PatchKind::Json => {
            let patch: json_patch::Patch = serde_json::from_slice(body).map_err(|e| {
                ApiError::bad_request(format!("the body is not a valid JSON patch: {e}"))
            })?;
            json_patch::patch(&mut patched, &patch.0).map_err(|e| {
                ApiError::invalid(format!(
                    "the server rejected our request due to an error in our request: {e}"
                ))
            })?;
            if !patched.is_object() {
                return Err(ApiError::invalid(
                    "the JSON patch replaced the whole object",
                ));
            }
        }
    }
    Ok(patched)
}
