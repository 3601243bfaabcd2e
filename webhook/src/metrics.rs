//! The webhook's Prometheus metrics: admissions by outcome and the
//! admission latency, rendered in the text exposition format for
//! `GET /metrics`.

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// How one `POST /mutate` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Admitted with a patch.
    Mutated,
    /// Admitted untouched.
    Allowed,
    /// Refused.
    Denied,
    /// The body was not a usable review (HTTP 400).
    Malformed,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Mutated => "mutated",
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::Malformed => "malformed",
        }
    }
}

type OutcomeLabels = [(&'static str, &'static str); 1];

/// The registry and the metrics in it.
#[derive(Debug)]
pub struct WebhookMetrics {
    registry: Registry,
    admissions: Family<OutcomeLabels, Counter>,
    latency: Histogram,
}

impl Default for WebhookMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WebhookMetrics {
    /// Creates the metrics, registered under the `tessera_webhook` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tessera_webhook");
        let admissions = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "admissions",
            "Admission reviews answered, by outcome (mutated, allowed, denied, malformed)",
            admissions.clone(),
        );
        // 50 µs to ~200 ms.
        let latency = Histogram::new([
            0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        ]);
        registry.register(
            "admission_duration_seconds",
            "Time from a review's body being read to its answer being ready",
            latency.clone(),
        );
        Self {
            registry,
            admissions,
            latency,
        }
    }

    /// Records one answered review.
    pub fn observe(&self, outcome: Outcome, elapsed: Duration) {
        self.admissions
            .get_or_create(&[("outcome", outcome.label())])
            .inc();
        self.latency.observe(elapsed.as_secs_f64());
    }

    /// The count for one outcome (for tests and logs).
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.admissions
            .get_or_create(&[("outcome", outcome.label())])
            .get()
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}
