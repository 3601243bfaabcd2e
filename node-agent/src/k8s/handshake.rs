//! Keeps this node's `hami.io/node-handshake` annotation renewed, so the
//! scheduler knows the agent is alive: every `handshakePeriodSeconds` (30 by
//! default, as HAMi's device plugin did) the agent writes
//! `Reported <UTC time>`. The scheduler judges liveness by when it saw the
//! value change, never by the time in it, so clocks that disagree between
//! nodes and scheduler do not matter; the time is there for people reading
//! the node. Only the Node object carries it, which tenants cannot write.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tessera_api::names::{HANDSHAKE_REPORTED_PREFIX, NODE_HANDSHAKE_ANNOTATION};

/// The handshake value for `now`: `Reported 2026-12-01 07:30:00.123 UTC`
/// (milliseconds, so two renewals within one second still differ).
pub fn handshake_value(now: DateTime<Utc>) -> String {
    format!(
        "{HANDSHAKE_REPORTED_PREFIX}{}",
        now.format("%Y-%m-%d %H:%M:%S%.3f UTC")
    )
}

/// Renews the handshake annotation of one node.
#[derive(Debug, Clone)]
pub struct HandshakeWriter {
    api: Api<Node>,
    node: String,
}

impl HandshakeWriter {
    /// A writer for `node`.
    pub fn new(client: kube::Client, node: &str) -> Self {
        Self {
            api: Api::all(client),
            node: node.to_owned(),
        }
    }

    /// Writes `Reported <now>` on the node.
    pub async fn renew(&self) -> Result<String, kube::Error> {
        let value = handshake_value(Utc::now());
        let patch = json!({"metadata": {"annotations": {NODE_HANDSHAKE_ANNOTATION: &value}}});
        self.api
            .patch(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(value)
    }

    /// Renews now and every `period` until the task is dropped; after a
    /// failed write it tries again within a few seconds, so one lost
    /// request does not cost a whole period.
    pub async fn run(self, period: Duration) {
        let retry = period.min(Duration::from_secs(5));
        let mut failing = false;
        loop {
            let wait = match self.renew().await {
                Ok(value) => {
                    if failing {
                        tracing::info!(node = %self.node, %value, "node handshake renewed again");
                    }
                    failing = false;
                    period
                }
                Err(error) => {
                    tracing::warn!(node = %self.node, %error, "could not renew the node handshake (hami.io/node-handshake); the scheduler stops placing GPU pods here if this persists. Check that the node exists and the agent's RBAC allows patch on nodes");
                    failing = true;
                    retry
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn values_say_reported_and_differ_within_a_second() {
        let t = Utc
            .with_ymd_and_hms(2026, 12, 1, 7, 30, 0)
            .single()
            .expect("time");
        let first = handshake_value(t);
        assert_eq!(first, "Reported 2026-12-01 07:30:00.000 UTC");
        let later = handshake_value(t + chrono::Duration::milliseconds(250));
        assert_ne!(first, later);
        assert!(later.starts_with(HANDSHAKE_REPORTED_PREFIX));
    }
}
