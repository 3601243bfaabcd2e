//! The queue of pending pods. A pod that did not fit is parked with
//! exponential backoff (1 s doubling to 10 s) and retried when the cluster
//! changes in a way that could make it fit (a node appears or changes, a pod
//! ends) and its backoff has passed; a safety flush retries every parked
//! pod once a minute. A parked pod whose own spec changes is retried at
//! once. Pods being decided or bound are "in flight" and not queued twice.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Notify;

const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const FLUSH_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Parked {
    signature: u64,
    attempts: u32,
    not_before: Instant,
    parked_at: Instant,
    woken: bool,
}

#[derive(Debug, Default)]
struct Inner {
    ready: VecDeque<String>,
    queued: HashSet<String>,
    parked: HashMap<String, Parked>,
    in_flight: HashSet<String>,
    attempts: HashMap<String, u32>,
}

impl Inner {
    fn push_ready(&mut self, key: String) {
        if !self.in_flight.contains(&key) && self.queued.insert(key.clone()) {
            self.ready.push_back(key);
        }
    }

    /// Moves woken parked pods whose backoff passed (or that waited past the
    /// flush interval) to ready; returns the earliest time another may be due.
    fn release_due(&mut self, now: Instant) -> Option<Instant> {
        let due: Vec<String> = self
            .parked
            .iter()
            .filter(|(_, p)| {
                (p.woken && p.not_before <= now)
                    || now.duration_since(p.parked_at) >= FLUSH_INTERVAL
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.parked.remove(&key);
            self.push_ready(key);
        }
        self.parked
            .values()
            .map(|p| {
                if p.woken {
                    p.not_before
                } else {
                    p.parked_at + FLUSH_INTERVAL
                }
            })
            .min()
    }
}

/// The scheduling queue, shared by the reflectors and the decision loop.
#[derive(Debug, Default)]
pub struct SchedulingQueue {
    inner: Mutex<Inner>,
    notify: Notify,
}

impl SchedulingQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A pending pod of ours was seen (added or updated). `signature`
    /// identifies its schedulable content (spec, labels, annotations).
    pub fn pod_seen(&self, key: &str, signature: u64) {
        let mut inner = self.lock();
        match inner.parked.get(key) {
            Some(parked) if parked.signature == signature => return,
            Some(_) => {
                inner.parked.remove(key);
            }
            None => {}
        }
        inner.push_ready(key.to_owned());
        drop(inner);
        self.notify.notify_one();
    }

    /// The pod was bound elsewhere, deleted or finished.
    pub fn pod_gone(&self, key: &str) {
        let mut inner = self.lock();
        inner.parked.remove(key);
        inner.attempts.remove(key);
        if inner.queued.remove(key) {
            inner.ready.retain(|k| k != key);
        }
    }

    /// Something changed that may let parked pods fit.
    pub fn cluster_changed(&self) {
        let mut inner = self.lock();
        let mut any = false;
        for parked in inner.parked.values_mut() {
            any |= !parked.woken;
            parked.woken = true;
        }
        drop(inner);
        if any {
            self.notify.notify_one();
        }
    }

    /// Waits for the next pod to decide and marks it in flight.
    pub async fn next(&self) -> String {
        loop {
            let notified = self.notify.notified();
            let wake_at = {
                let mut inner = self.lock();
                let wake_at = inner.release_due(Instant::now());
                if let Some(key) = inner.ready.pop_front() {
                    inner.queued.remove(&key);
                    inner.in_flight.insert(key.clone());
                    return key;
                }
                wake_at
            };
            match wake_at {
                Some(at) => {
                    let _ = tokio::time::timeout_at(at, notified).await;
                }
                None => notified.await,
            }
        }
    }

    /// The decision for `key` is over (bound, or given up): it may be queued again.
    pub fn finish(&self, key: &str) {
        let mut inner = self.lock();
        inner.in_flight.remove(key);
        inner.attempts.remove(key);
    }

    /// `key` did not fit (or its bind failed): park it with backoff. With
    /// `retry_on_change` false (an invalid request) only a change of the pod
    /// itself or the periodic flush brings it back.
    pub fn park(&self, key: &str, signature: u64, retry_on_change: bool) {
        let mut inner = self.lock();
        inner.in_flight.remove(key);
        let attempts = {
            let entry = inner.attempts.entry(key.to_owned()).or_default();
            *entry += 1;
            *entry
        };
        let backoff = INITIAL_BACKOFF
            .saturating_mul(1 << attempts.saturating_sub(1).min(8))
            .min(MAX_BACKOFF);
        let now = Instant::now();
        inner.parked.insert(
            key.to_owned(),
            Parked {
                signature,
                attempts,
                not_before: now + backoff,
                parked_at: now,
                woken: false,
            },
        );
        if !retry_on_change {
            if let Some(p) = inner.parked.get_mut(key) {
                p.not_before = now + FLUSH_INTERVAL;
            }
        }
    }

    /// Parks `key` and wakes it as if the cluster changed (a failed bind is
    /// retried after its backoff without waiting for an event).
    pub fn retry_later(&self, key: &str, signature: u64) {
        self.park(key, signature, true);
        if let Some(p) = self.lock().parked.get_mut(key) {
            p.woken = true;
        }
        self.notify.notify_one();
    }

    /// Pods waiting to be decided (ready + parked).
    pub fn depth(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.ready.len(), inner.parked.len())
    }

    /// Backoff attempts recorded for `key` (for tests and logs).
    pub fn attempts(&self, key: &str) -> u32 {
        let inner = self.lock();
        inner.parked.get(key).map_or(0, |p| p.attempts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn parked_pods_wait_for_a_change_and_their_backoff() {
        let queue = SchedulingQueue::default();
        queue.pod_seen("a", 1);
        assert_eq!(queue.next().await, "a");
        queue.pod_seen("a", 1);
        assert_eq!(queue.depth(), (0, 0), "in flight pods are not queued twice");
        queue.park("a", 1, true);
        assert_eq!(queue.depth(), (0, 1));
        queue.pod_seen("a", 1);
        assert_eq!(queue.depth(), (0, 1), "an unchanged pod stays parked");

        let start = tokio::time::Instant::now();
        queue.cluster_changed();
        assert_eq!(queue.next().await, "a");
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(1) && waited < Duration::from_secs(2),
            "{waited:?}"
        );

        queue.park("a", 1, true);
        assert_eq!(queue.attempts("a"), 2);
        queue.pod_seen("a", 2);
        assert_eq!(queue.next().await, "a", "a changed pod is retried at once");
    }

    #[tokio::test(start_paused = true)]
    async fn without_events_the_flush_retries_parked_pods() {
        let queue = SchedulingQueue::default();
        queue.pod_seen("a", 1);
        assert_eq!(queue.next().await, "a");
        queue.park("a", 1, false);
        let start = tokio::time::Instant::now();
        assert_eq!(queue.next().await, "a");
        assert!(start.elapsed() >= FLUSH_INTERVAL);
    }

    #[tokio::test(start_paused = true)]
    async fn gone_pods_leave_the_queue() {
        let queue = SchedulingQueue::default();
        queue.pod_seen("a", 1);
        queue.pod_seen("b", 1);
        queue.pod_gone("a");
        assert_eq!(queue.next().await, "b");
        assert_eq!(queue.depth(), (0, 0));
    }
}
