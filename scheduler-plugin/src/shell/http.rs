//! The scheduler's HTTP surface: `/metrics` (OpenMetrics text),
//! `/healthz`, and `/readyz` (ready once the initial node and pod lists are
//! in).

use super::metrics::set_gauge;
use super::{lock, Scheduler};

impl Scheduler {
    /// The metrics text for `/metrics`.
    pub fn metrics_text(&self) -> String {
        let (ready, parked) = self.shared.queue.depth();
        set_gauge(&self.shared.metrics.queue_depth, ready + parked);
        let allocated: Vec<(String, String, String)> =
            lock(&self.shared.allocated).values().cloned().collect();
        let state = lock(&self.shared.state);
        self.shared.metrics.render(&state, &allocated)
    }

    /// `/metrics`, `/healthz` and `/readyz`.
    pub fn router(&self) -> axum::Router {
        use axum::http::StatusCode;
        use axum::routing::get;
        let metrics = self.clone();
        let ready = self.clone();
        axum::Router::new()
            .route(
                "/metrics",
                get(move || {
                    let scheduler = metrics.clone();
                    async move {
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            scheduler.metrics_text(),
                        )
                    }
                }),
            )
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/readyz",
                get(move || {
                    let scheduler = ready.clone();
                    async move {
                        if scheduler.is_synced() {
                            (StatusCode::OK, "ok")
                        } else {
                            (
                                StatusCode::SERVICE_UNAVAILABLE,
                                "waiting for the initial node and pod lists",
                            )
                        }
                    }
                }),
            )
    }
}
