//! Watch streams: newline-delimited JSON watch events for one resource,
//! replayed from the store's history after the requested resourceVersion
//! (or synthetic ADDED events for a watch from "now"), then live until the
//! timeout or server shutdown. Selector transitions are reported as the real
//! server does: an object modified into the selection arrives as ADDED, one
//! modified out of it as DELETED.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use super::selectors::Selector;
use super::store::{kind_of, EventType, HistoryEntry};
use super::Shared;

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WatchStart {
    /// resourceVersion absent or "0": current objects as ADDED, then live.
    Now,
    /// Every change after this resourceVersion.
    After(u64),
}

/// What one watch request asked for.
#[derive(Debug)]
pub(crate) struct WatchSpec {
    pub api_version: String,
    pub resource: String,
    pub namespace: Option<String>,
    pub selector: Selector,
    pub start: WatchStart,
    pub timeout: Option<Duration>,
    /// `sendInitialEvents=true`: close the initial ADDED burst with a bookmark.
    pub initial_events_bookmark: bool,
}

struct Cursor {
    shared: Arc<Shared>,
    spec: WatchSpec,
    last_rv: u64,
    pending: VecDeque<String>,
    changes: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
    deadline: Option<Instant>,
}

/// The streaming response body of one watch.
pub(crate) fn open(shared: Arc<Shared>, spec: WatchSpec) -> Body {
    let (changes, initial, last_rv) = {
        let store = shared.lock_store();
        let mut changes = store.subscribe();
        changes.borrow_and_update();
        match spec.start {
            WatchStart::Now => {
                let current: Vec<Arc<Value>> = store
                    .list(&spec.api_version, &spec.resource, spec.namespace.as_deref())
                    .filter(|o| spec.selector.matches(o))
                    .cloned()
                    .collect();
                (changes, current, store.resource_version())
            }
            WatchStart::After(rv) => (changes, Vec::new(), rv),
        }
    };
    let mut pending: VecDeque<String> = initial.iter().map(|o| event_line("ADDED", o)).collect();
    if spec.initial_events_bookmark {
        let bookmark = json!({
            "apiVersion": spec.api_version,
            "kind": kind_of(&spec.resource),
            "metadata": {
                "resourceVersion": last_rv.to_string(),
                "annotations": {"k8s.io/initial-events-end": "true"},
            },
        });
        pending.push_back(event_line("BOOKMARK", &bookmark));
    }
    let cursor = Cursor {
        shutdown: shared.shutdown.subscribe(),
        deadline: spec.timeout.map(|t| Instant::now() + t),
        shared,
        spec,
        last_rv,
        pending,
        changes,
    };
    let lines = futures::stream::unfold(cursor, |mut cursor| async move {
        let line = cursor.next_line().await?;
        Some((Ok::<_, Infallible>(line), cursor))
    });
    Body::from_stream(lines)
}

impl Cursor {
    async fn next_line(&mut self) -> Option<String> {
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Some(line);
            }
            if *self.shutdown.borrow() {
                return None;
            }
            // Mark seen before reading history: a write after the read wakes us.
            self.changes.borrow_and_update();
            self.collect_new_events();
            if !self.pending.is_empty() {
                continue;
            }
            let deadline = self.deadline;
            tokio::select! {
                changed = self.changes.changed() => if changed.is_err() { return None },
                changed = self.shutdown.changed() => if changed.is_err() { return None },
                () = sleep_until(deadline) => return None,
            }
        }
    }

    fn collect_new_events(&mut self) {
        let mut events = Vec::new();
        {
            let store = self.shared.lock_store();
            for entry in store.history_after(self.last_rv) {
                self.last_rv = entry.rv;
                if let Some(event) = self.classify(entry) {
                    events.push(event);
                }
            }
        }
        self.pending
            .extend(events.iter().map(|(kind, object)| event_line(kind, object)));
    }

    /// The event this watcher sees for one write, if any.
    fn classify(&self, entry: &HistoryEntry) -> Option<(&'static str, Arc<Value>)> {
        let key = &entry.key;
        let spec = &self.spec;
        if key.api_version != spec.api_version
            || key.resource != spec.resource
            || spec
                .namespace
                .as_ref()
                .is_some_and(|ns| *ns != key.namespace)
        {
            return None;
        }
        let now = spec.selector.matches(&entry.object);
        let before = entry
            .previous
            .as_ref()
            .is_some_and(|p| spec.selector.matches(p));
        let kind = match entry.event {
            EventType::Added if now => "ADDED",
            EventType::Deleted if now => "DELETED",
            EventType::Modified if before && now => "MODIFIED",
            EventType::Modified if now => "ADDED",
            EventType::Modified if before => "DELETED",
            _ => return None,
        };
        Some((kind, Arc::clone(&entry.object)))
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn event_line(kind: &str, object: &Value) -> String {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    line
}
