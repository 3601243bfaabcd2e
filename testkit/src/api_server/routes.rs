//! The HTTP surface: parses Kubernetes REST paths (`/api/v1/...`,
//! `/apis/{group}/{version}/...`, namespaced, cluster-scoped and
//! all-namespace forms), applies injected faults, dispatches to the store,
//! and records every request in the log.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

use super::patch::{self, PatchKind};
use super::selectors::Selector;
use super::store::{has_status_subresource, kind_of, str_at, ApiError, ObjectKey, UpdateMode};
use super::watch::{self, WatchSpec, WatchStart};
use super::{RequestRecord, Shared};

/// What a request path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub api_version: String,
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
}

impl Target {
    fn key(&self, name: &str) -> ObjectKey {
        ObjectKey::new(
            &self.api_version,
            &self.resource,
            self.namespace.as_deref().unwrap_or(""),
            name,
        )
    }
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/version", axum::routing::get(version))
        .fallback(dispatch)
        .with_state(shared)
}

async fn version() -> Response {
    json_response(
        StatusCode::OK,
        &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-tessera-testkit", "platform": "linux/amd64"}),
    )
}

/// Parses a REST path; `None` when it is not one.
pub(crate) fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let owned = |s: &&str| s.to_string();
    let (namespace, rest) = match rest {
        // The Namespace object itself and its subresources.
        ["namespaces"] | ["namespaces", _] | ["namespaces", _, "status" | "finalize"]
            if api_version == "v1" =>
        {
            (None, rest)
        }
        ["namespaces", ns, rest @ ..] => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    match rest {
        [resource, tail @ ..] if tail.len() <= 2 => Some(Target {
            api_version,
            resource: resource.to_string(),
            namespace,
            name: tail.first().map(owned),
            subresource: tail.get(1).map(owned),
        }),
        _ => None,
    }
}

async fn dispatch(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(target) = parse_path(uri.path()) else {
        return error_response(&ApiError::new(
            404,
            "NotFound",
            format!(
                "the server could not find the requested resource ({})",
                uri.path()
            ),
        ));
    };
    let query = match Query::<HashMap<String, String>>::try_from_uri(&uri) {
        Ok(Query(q)) => q,
        Err(e) => return error_response(&ApiError::bad_request(format!("bad query string: {e}"))),
    };
    let is_watch = method == Method::GET
        && target.name.is_none()
        && matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let response = match shared.take_fault(method.as_str(), &target) {
        Some(code) => error_response(&ApiError::for_code(
            code,
            format!(
                "injected failure: {method} {} (tessera-testkit fail_next)",
                uri.path()
            ),
        )),
        None if is_watch => match watch_spec(&target, &query) {
            Ok(spec) => streaming_response(watch::open(Arc::clone(&shared), spec)),
            Err(e) => error_response(&e),
        },
        None => match handle(&shared, &method, &target, &query, &headers, &body) {
            Ok((code, value)) => json_response(code, &value),
            Err(e) => error_response(&e),
        },
    };
    shared.record(RequestRecord {
        method: method.to_string(),
        api_version: target.api_version,
        resource: target.resource,
        subresource: target.subresource,
        namespace: target.namespace,
        name: target.name,
        status: response.status().as_u16(),
        watch: is_watch,
    });
    response
}

fn watch_spec(target: &Target, query: &HashMap<String, String>) -> Result<WatchSpec, ApiError> {
    let selector = selector(target, query)?;
    let rv = query
        .get("resourceVersion")
        .map(String::as_str)
        .unwrap_or("");
    let initial_events = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    let start = match rv {
        _ if initial_events => WatchStart::Now,
        "" | "0" => WatchStart::Now,
        n => WatchStart::After(n.parse().map_err(|_| {
            ApiError::bad_request(format!(
                "invalid resourceVersion {n:?}: expected an integer"
            ))
        })?),
    };
    let timeout = match query.get("timeoutSeconds") {
        Some(t) => Some(Duration::from_secs(t.parse().map_err(|_| {
            ApiError::bad_request(format!("invalid timeoutSeconds {t:?}"))
        })?)),
        None => None,
    };
    Ok(WatchSpec {
        api_version: target.api_version.clone(),
        resource: target.resource.clone(),
        namespace: target.namespace.clone(),
        selector,
        start,
        timeout,
        initial_events_bookmark: initial_events,
    })
}

fn selector(target: &Target, query: &HashMap<String, String>) -> Result<Selector, ApiError> {
    Selector::parse(
        &target.resource,
        query.get("labelSelector").map(String::as_str),
        query.get("fieldSelector").map(String::as_str),
    )
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ))
    }
}

fn success_status(code: u16) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": code})
}

/// Everything but watches. Holds the store lock for the whole write so each
/// request is atomic.
fn handle(
    shared: &Shared,
    method: &Method,
    target: &Target,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(StatusCode, Value), ApiError> {
    let resource = target.resource.as_str();
    let subresource = target.subresource.as_deref();
    let mode = match subresource {
        None => UpdateMode::Main,
        Some("status") if has_status_subresource(resource) => UpdateMode::Status,
        Some("binding" | "eviction")
            if resource == "pods" && target.api_version == "v1" && method == Method::POST =>
        {
            UpdateMode::Main
        }
        Some(other) => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({resource}/{other})"),
            ))
        }
    };
    let namespace = target.namespace.as_deref().unwrap_or("");
    let mut store = shared.lock_store();
    match (method.clone(), target.name.as_deref(), subresource) {
        (Method::GET, None, _) => {
            let selector = selector(target, query)?;
            let items: Vec<Value> = store
                .list(&target.api_version, resource, target.namespace.as_deref())
                .filter(|o| selector.matches(o))
                .map(|o| Value::clone(o))
                .collect();
            let list = json!({
                "apiVersion": target.api_version,
                "kind": format!("{}List", kind_of(resource)),
                "metadata": {"resourceVersion": store.resource_version().to_string()},
                "items": items,
            });
            Ok((StatusCode::OK, list))
        }
        (Method::GET, Some(name), _) => store
            .get(&target.key(name))
            .map(|o| (StatusCode::OK, Value::clone(o)))
            .ok_or_else(|| ApiError::not_found(resource, name)),
        (Method::POST, Some(name), Some("eviction")) => {
            store.evict(namespace, name, &parse_body(body)?)?;
            Ok((StatusCode::CREATED, success_status(201)))
        }
        (Method::POST, Some(name), Some("binding")) => {
            store.bind(namespace, name, &parse_body(body)?)?;
            Ok((StatusCode::CREATED, success_status(201)))
        }
        (Method::POST, None, None) if resource == "bindings" && target.api_version == "v1" => {
            let binding = parse_body(body)?;
            store.bind(namespace, str_at(&binding, "/metadata/name"), &binding)?;
            Ok((StatusCode::CREATED, success_status(201)))
        }
        (Method::POST, None, None) => {
            let created = store.create(&target.api_version, resource, namespace, parse_body(body)?)?;
            Ok((StatusCode::CREATED, created))
        }
        (Method::PUT, Some(name), _) => {
            let updated = store.update(&target.key(name), parse_body(body)?, mode)?;
            Ok((StatusCode::OK, updated))
        }
        (Method::PATCH, Some(name), _) => {
            let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
            let kind = PatchKind::from_content_type(content_type)?;
            let key = target.key(name);
            match store.get(&key).cloned() {
                Some(current) => {
                    let patched = patch::apply(kind, &current, body)?;
                    Ok((StatusCode::OK, store.update(&key, patched, mode)?))
                }
                None if kind == PatchKind::Apply && mode == UpdateMode::Main => {
                    let mut object = patch::apply(kind, &json!({"metadata": {}}), body)?;
                    object["metadata"]["name"] = Value::String(name.to_owned());
                    let created = store.create(&target.api_version, resource, namespace, object)?;
                    Ok((StatusCode::CREATED, created))
                }
                None => Err(ApiError::not_found(resource, name)),
            }
        }
        (Method::DELETE, Some(name), None) => {
            let options = if body.is_empty() { json!({}) } else { parse_body(body)? };
            Ok((StatusCode::OK, store.delete(&target.key(name), &options)?))
        }
        (Method::DELETE, None, None) => {
            let selector = selector(target, query)?;
            let doomed: Vec<ObjectKey> = store
                .list(&target.api_version, resource, target.namespace.as_deref())
                .filter(|o| selector.matches(o))
                .map(|o| {
                    ObjectKey::new(
                        &target.api_version,
                        resource,
                        str_at(o, "/metadata/namespace"),
                        str_at(o, "/metadata/name"),
                    )
                })
                .collect();
            let items = doomed
                .iter()
                .map(|key| store.delete(key, &json!({})))
                .collect::<Result<Vec<_>, _>>()?;
            let list = json!({
                "apiVersion": target.api_version,
                "kind": format!("{}List", kind_of(resource)),
                "metadata": {"resourceVersion": store.resource_version().to_string()},
                "items": items,
            });
            Ok((StatusCode::OK, list))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method} {resource})"),
        )),
    }
}

fn json_response(code: StatusCode, value: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn error_response(error: &ApiError) -> Response {
    let code = StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &error.to_status())
}

fn streaming_response(body: Body) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(
        path: &str,
    ) -> (
        String,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
    ) {
        let t = parse_path(path).unwrap();
        (
            t.api_version,
            t.resource,
            t.namespace,
            t.name,
            t.subresource,
        )
    }

    #[test]
    fn parses_paths() {
        let s = |x: &str| Some(x.to_owned());
        assert_eq!(
            target("/api/v1/pods"),
            ("v1".into(), "pods".into(), None, None, None)
        );
        assert_eq!(
            target("/api/v1/namespaces/ns/pods/p/binding"),
            ("v1".into(), "pods".into(), s("ns"), s("p"), s("binding"))
        );
        assert_eq!(
            target("/api/v1/namespaces/ns"),
            ("v1".into(), "namespaces".into(), None, s("ns"), None)
        );
        assert_eq!(
            target("/api/v1/namespaces/ns/status"),
            ("v1".into(), "namespaces".into(), None, s("ns"), s("status"))
        );
        assert_eq!(
            target("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/l"),
            (
                "coordination.k8s.io/v1".into(),
                "leases".into(),
                s("kube-system"),
                s("l"),
                None
            )
        );
        assert_eq!(
            target("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/w"),
            (
                "admissionregistration.k8s.io/v1".into(),
                "mutatingwebhookconfigurations".into(),
                None,
                s("w"),
                None
            )
        );
        assert!(parse_path("/healthz").is_none());
        assert!(parse_path("/api/v1/namespaces/ns/pods/p/status/extra").is_none());
    }
}
