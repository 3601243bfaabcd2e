//! The agent's probe endpoints, served on the `/metrics` listener:
//! `/healthz` answers 200 `ok` while the process serves HTTP (liveness);
//! `/readyz` answers 200 once the device plugin is registered with kubelet
//! and the GPU inventory was published on the Node at least once, and 503
//! with the reason before that or while re-registering after a kubelet
//! restart (readiness). [`Readiness`] is the shared state the plugin
//! registration and the inventory publisher update.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What the agent has achieved so far, shared with the `/readyz` handler.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    registered: Arc<AtomicBool>,
    published: Arc<AtomicBool>,
}

impl Readiness {
    /// Nothing achieved yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records whether the device plugin is registered with kubelet now.
    pub fn set_registered(&self, registered: bool) {
        self.registered.store(registered, Ordering::Relaxed);
    }

    /// Records that the inventory annotation was published (or found current).
    pub fn mark_published(&self) {
        self.published.store(true, Ordering::Relaxed);
    }

    /// `Ok` when ready, else why not.
    pub fn check(&self) -> Result<(), &'static str> {
        if !self.registered.load(Ordering::Relaxed) {
            return Err("the device plugin is not registered with kubelet yet; check the agent's log for registration errors and that /var/lib/kubelet/device-plugins is mounted");
        }
        if !self.published.load(Ordering::Relaxed) {
            return Err("the GPU inventory was not published on the Node yet; check the agent's log and that its RBAC allows get and patch on nodes");
        }
        Ok(())
    }
}

/// `/healthz` and `/readyz` over `readiness` (the runtime's probe router).
pub fn router(readiness: Readiness) -> axum::Router {
    tessera_runtime::probes::router(
        Arc::new(move || {
            readiness
                .check()
                .map_err(|reason| format!("not ready: {reason}"))
        }),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use axum::http::StatusCode;
    use tower::ServiceExt;

    async fn get_path(router: &axum::Router, path: &str) -> (StatusCode, String) {
        let response = router
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("response");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 64 * 1024)
            .await
            .expect("body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn healthz_is_always_ok_and_readyz_waits_for_registration_and_inventory() {
        let readiness = Readiness::new();
        let router = router(readiness.clone());
        assert_eq!(
            get_path(&router, "/healthz").await,
            (StatusCode::OK, "ok".to_owned())
        );

        let (status, body) = get_path(&router, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("not registered with kubelet"), "{body}");

        readiness.set_registered(true);
        let (status, body) = get_path(&router, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("inventory was not published"), "{body}");

        readiness.mark_published();
        assert_eq!(
            get_path(&router, "/readyz").await,
            (StatusCode::OK, "ok".to_owned())
        );

        // A kubelet restart: not ready until registered again.
        readiness.set_registered(false);
        assert_eq!(
            get_path(&router, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(get_path(&router, "/healthz").await.0, StatusCode::OK);
    }
}
