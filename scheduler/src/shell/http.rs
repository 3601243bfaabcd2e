//! The scheduler's HTTP surface: `/metrics` (OpenMetrics text),
//! `/healthz`, and `/readyz` (ready once the initial node and pod lists are
//! in).

use std::sync::Arc;

use tessera_runtime::probes;

use super::metrics::set_gauge;
use super::{lock, Scheduler};

impl Scheduler {
    /// The metrics text for `/metrics`.
    pub fn metrics_text(&self) -> String {
        let (ready, parked) = self.shared.queue.depth();
        set_gauge(&self.shared.metrics.queue_depth, ready + parked);
        let allocated: Vec<super::metrics::BoundPod> =
            lock(&self.shared.allocated).values().cloned().collect();
        let state = lock(&self.shared.state);
        self.shared.metrics.render(&state, &allocated)
    }

    /// `/metrics`, `/healthz` and `/readyz` (the runtime's probe router).
    pub fn router(&self) -> axum::Router {
        let metrics = self.clone();
        let ready = self.clone();
        probes::router(
            Arc::new(move || {
                if ready.is_synced() {
                    Ok(())
                } else {
                    Err("waiting for the initial node, pod, namespace, storage and PodDisruptionBudget lists".to_owned())
                }
            }),
            Some(Arc::new(move || metrics.metrics_text())),
        )
    }
}
