//! Card health: starts from discovery, turns a card unhealthy on a fatal
//! health event (an XID that means a dead card, an uncorrectable ECC error)
//! and healthy again once it has had no fatal event for a quiet period and
//! answers the backend's probe. Published through a `watch` channel that
//! `ListAndWatch`, the inventory publisher and `Allocate` read.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::gpu::{GpuBackend, GpuInfo, HealthEvent};

/// Health of one card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardHealth {
    /// Whether the card may be given to containers.
    pub healthy: bool,
    /// Why it is unhealthy (empty when healthy).
    pub reason: String,
    /// When the last fatal event arrived.
    pub last_fatal: Option<Instant>,
}

/// Health of every card, by UUID.
pub type HealthSnapshot = BTreeMap<String, CardHealth>;

/// Keeps [`HealthSnapshot`] current.
#[derive(Debug)]
pub struct HealthMonitor {
    sender: watch::Sender<HealthSnapshot>,
    quiet_period: Duration,
}

impl HealthMonitor {
    /// Starts from the health discovery reported. A card comes back after
    /// `quiet_period` without fatal events.
    pub fn new(cards: &[GpuInfo], quiet_period: Duration) -> Self {
        let snapshot = cards
            .iter()
            .map(|card| {
                let health = CardHealth {
                    healthy: card.healthy,
                    reason: if card.healthy {
                        String::new()
                    } else {
                        "unhealthy at discovery".into()
                    },
                    last_fatal: None,
                };
                (card.uuid.clone(), health)
            })
            .collect();
        let (sender, _) = watch::channel(snapshot);
        Self {
            sender,
            quiet_period,
        }
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<HealthSnapshot> {
        self.sender.subscribe()
    }

    /// Records one event; a fatal one takes the card out of service.
    pub fn apply(&self, event: &HealthEvent, now: Instant) {
        if !event.kind.is_fatal() {
            tracing::info!(uuid = %event.uuid, event = %event.kind, "GPU reported a non-fatal error; it stays in service");
            return;
        }
        self.sender.send_if_modified(|snapshot| {
            let Some(card) = snapshot.get_mut(&event.uuid) else {
                return false;
            };
            let was_healthy = card.healthy;
            card.healthy = false;
            card.reason = event.kind.to_string();
            card.last_fatal = Some(now);
            if was_healthy {
                tracing::error!(uuid = %event.uuid, event = %event.kind, "GPU is unhealthy; it is withdrawn from kubelet and the inventory");
            }
            was_healthy
        });
    }

    /// Brings back cards that have been quiet long enough and answer the probe.
    pub fn check_recovery(&self, backend: &dyn GpuBackend, now: Instant) {
        let quiet_period = self.quiet_period;
        self.sender.send_if_modified(|snapshot| {
            let mut changed = false;
            for (uuid, card) in snapshot.iter_mut() {
                let quiet = card
                    .last_fatal
                    .is_none_or(|at| now.saturating_duration_since(at) >= quiet_period);
                if !card.healthy && quiet && backend.is_responsive(uuid) {
                    tracing::info!(%uuid, after = %card.reason, "GPU recovered; it is back in service");
                    card.healthy = true;
                    card.reason.clear();
                    changed = true;
                }
            }
            changed
        });
    }

    /// Follows the backend's health events and checks for recovery every
    /// `recovery_interval`, until the backend stops reporting.
    pub async fn run(self, backend: Arc<dyn GpuBackend>, recovery_interval: Duration) {
        let mut events = match backend.watch_health() {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(error = %e, "GPU health events are not available");
                return;
            }
        };
        let mut ticker = tokio::time::interval(recovery_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => self.apply(&event, Instant::now()),
                    None => return,
                },
                _ = ticker.tick() => self.check_recovery(backend.as_ref(), Instant::now()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::fake::FakeGpus;
    use crate::gpu::HealthEventKind;

    fn setup() -> (FakeGpus, HealthMonitor, String) {
        let gpus = FakeGpus::parse("2x A 100", "n").expect("parses");
        let cards = gpus.discover().expect("lists");
        let monitor = HealthMonitor::new(&cards, Duration::from_secs(60));
        (gpus, monitor, cards[0].uuid.clone())
    }

    #[test]
    fn fatal_xid_marks_unhealthy_and_application_xid_does_not() {
        let (_, monitor, uuid) = setup();
        let receiver = monitor.subscribe();
        let now = Instant::now();
        monitor.apply(
            &HealthEvent {
                uuid: uuid.clone(),
                kind: HealthEventKind::Xid(13),
            },
            now,
        );
        assert!(
            receiver.borrow()[&uuid].healthy,
            "XID 13 is an application error"
        );
        monitor.apply(
            &HealthEvent {
                uuid: uuid.clone(),
                kind: HealthEventKind::Xid(79),
            },
            now,
        );
        assert!(!receiver.borrow()[&uuid].healthy);
        assert_eq!(receiver.borrow()[&uuid].reason, "XID 79");
    }

    #[test]
    fn recovers_only_after_quiet_period_and_probe() {
        let (gpus, monitor, uuid) = setup();
        let receiver = monitor.subscribe();
        let start = Instant::now();
        monitor.apply(
            &HealthEvent {
                uuid: uuid.clone(),
                kind: HealthEventKind::UncorrectableEcc,
            },
            start,
        );
        monitor.check_recovery(&gpus, start + Duration::from_secs(30));
        assert!(
            !receiver.borrow()[&uuid].healthy,
            "still inside the quiet period"
        );
        gpus.control().set_responsive(&uuid, false);
        monitor.check_recovery(&gpus, start + Duration::from_secs(61));
        assert!(
            !receiver.borrow()[&uuid].healthy,
            "does not answer the probe"
        );
        gpus.control().set_responsive(&uuid, true);
        monitor.check_recovery(&gpus, start + Duration::from_secs(61));
        assert!(receiver.borrow()[&uuid].healthy);
    }
}
