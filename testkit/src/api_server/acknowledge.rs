//! The node side of the allocation handshake, in its simplest form, for
//! tests and benchmarks of the scheduler alone: every pod bound to a node
//! with `hami.io/bind-phase: allocating` is, after an optional admission
//! latency, marked `success` with container statuses written, as kubelet and
//! Tessera's node agent together would leave it. The scheduler keeps at most
//! one unacknowledged bind per node and shape, so without this (or the real
//! agent with a kubelet stand-in) binds to one node stop after the first.
//! Writes go straight to the store (no HTTP, not in the request log).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::store::{str_at, ObjectKey};
use super::{ApiServer, Shared};

const BIND_PHASE: &str = "hami.io/bind-phase";

/// Acknowledges allocations until dropped.
#[derive(Debug)]
pub struct AllocationAcknowledger {
    task: JoinHandle<()>,
}

impl Drop for AllocationAcknowledger {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn waiting(pod: &Value) -> bool {
    !str_at(pod, "/spec/nodeName").is_empty()
        && pod
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(BIND_PHASE))
            .and_then(Value::as_str)
            == Some("allocating")
}

/// Marks one pod admitted, if it still waits. Returns whether it did.
fn acknowledge(shared: &Shared, namespace: &str, name: &str) -> bool {
    let mut store = shared.lock_store();
    let key = ObjectKey::new("v1", "pods", namespace, name);
    let Some(current) = store.get(&key).map(|p| Value::clone(p)) else {
        return false;
    };
    if !waiting(&current) {
        return false;
    }
    let mut next = current;
    next["metadata"]["annotations"][BIND_PHASE] = json!("success");
    let statuses: Vec<Value> = next
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map(|containers| {
            containers
                .iter()
                .map(|c| {
                    json!({"name": c["name"], "image": c["image"], "imageID": "",
                    "ready": false, "restartCount": 0,
                    "state": {"waiting": {"reason": "ContainerCreating"}}})
                })
                .collect()
        })
        .unwrap_or_default();
    if !next["status"].is_object() {
        next["status"] = json!({});
    }
    next["status"]["phase"] = json!("Pending");
    next["status"]["containerStatuses"] = Value::Array(statuses);
    store.upsert("v1", "pods", next).is_ok()
}

impl ApiServer {
    /// Starts acknowledging allocations, each `latency` after it is seen
    /// (pods of one node one after another, as kubelet admits them; nodes
    /// in parallel). Stops when the returned guard is dropped.
    pub fn acknowledge_allocations(&self, latency: Duration) -> AllocationAcknowledger {
        let shared = Arc::clone(&self.shared);
        let task = tokio::spawn(async move {
            let mut changes = shared.lock_store().subscribe();
            // Everything waiting now, then only what each write changed.
            let mut seen_rv = 0;
            loop {
                let pending: Vec<(String, String)> = {
                    let store = shared.lock_store();
                    let changed = store.history_after(seen_rv);
                    let pending = changed
                        .iter()
                        .filter(|e| e.key.api_version == "v1" && e.key.resource == "pods")
                        .filter(|e| waiting(&e.object))
                        .map(|e| (e.key.namespace.clone(), e.key.name.clone()))
                        .collect();
                    seen_rv = changed.last().map_or(seen_rv, |e| e.rv);
                    pending
                };
                for (namespace, name) in pending {
                    if !latency.is_zero() {
                        tokio::time::sleep(latency).await;
                    }
                    acknowledge(&shared, &namespace, &name);
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        });
        AllocationAcknowledger { task }
    }
}
