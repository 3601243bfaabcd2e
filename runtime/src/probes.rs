//! `/healthz` (liveness: the process serves HTTP), `/readyz` (readiness:
//! 200 `ok`, or 503 with the component's reason) and `/metrics`
//! (OpenMetrics text), the same on every server.

use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::routing::get;

/// Content type of the metrics exposition.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Readiness: `Ok` when ready, else why not (shown on `/readyz`).
pub type ReadinessCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;
/// The metrics exposition.
pub type MetricsText = Arc<dyn Fn() -> String + Send + Sync>;

/// `/healthz` and `/readyz`, and `/metrics` when `metrics` is given.
pub fn router(ready: ReadinessCheck, metrics: Option<MetricsText>) -> axum::Router {
    let mut router = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = Arc::clone(&ready);
                async move {
                    match ready() {
                        Ok(()) => (StatusCode::OK, "ok".to_owned()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                    }
                }
            }),
        );
    if let Some(metrics) = metrics {
        router = router.route(
            "/metrics",
            get(move || {
                let metrics = Arc::clone(&metrics);
                async move {
                    (
                        [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
                        metrics(),
                    )
                }
            }),
        );
    }
    router
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tower::ServiceExt;

    async fn get(router: &axum::Router, path: &str) -> (StatusCode, String) {
        let response = router
            .clone()
            .oneshot(
                axum::http::Request::get(path)
                    .body(axum::body::Body::empty())
                    .expect("request"),
            )
            .await
            .expect("response");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn health_readiness_and_metrics() {
        let ready = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&ready);
        let router = router(
            Arc::new(move || {
                if flag.load(Ordering::Relaxed) {
                    Ok(())
                } else {
                    Err("waiting for the initial lists".to_owned())
                }
            }),
            Some(Arc::new(|| "# EOF\n".to_owned())),
        );
        assert_eq!(
            get(&router, "/healthz").await,
            (StatusCode::OK, "ok".into())
        );
        assert_eq!(
            get(&router, "/readyz").await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "waiting for the initial lists".into()
            )
        );
        ready.store(true, Ordering::Relaxed);
        assert_eq!(get(&router, "/readyz").await.0, StatusCode::OK);
        assert_eq!(get(&router, "/metrics").await.1, "# EOF\n");
    }
}
