//! Per-node bind gates: what makes `Allocate` on the node exact.
//!
//! Kubelet's `Allocate` names device IDs, never the pod, so the node agent
//! must find the pod from the pods bound to its node that still wait for
//! devices. The scheduler makes that unambiguous: on each node it keeps at
//! most one bind **in flight** (bound, not yet acknowledged by the node
//! agent) per *shape*, the device count of the pod's first GPU container.
//! Kubelet admits one pod at a time and calls `Allocate` for every GPU
//! container of that pod, in order, before the next pod; so the first call
//! of a pod names a count no other waiting pod on the node starts with, and
//! every later call belongs to the pod already partly applied. The node
//! agent relies on exactly this (see its `allocate::matching`).
//!
//! A decided pod whose shape is in flight on its node waits here, assumed
//! (so later decisions already see its cards taken), and is bound, in
//! decision order, when the in-flight pod is acknowledged: its bind phase
//! leaves `allocating`, it ends, it is deleted, or its bind fails. An
//! in-flight pod that no kubelet admits within the timeout is failed by the
//! shell, and the pods waiting behind it are decided again. Pure bookkeeping
//! with no I/O; the shell ([`super::bind`]) does the API calls.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use tessera_api::allocation::ContainerDevice;

/// The shape that must be unique among a node's in-flight binds: the device
/// count of the first container that has devices, in allocation order (GPU
/// init containers first, as kubelet allocates them). 0 for a pod with no
/// devices, which never waits.
pub fn bind_shape(devices: &[Vec<ContainerDevice>]) -> usize {
    devices.iter().map(Vec::len).find(|n| *n > 0).unwrap_or(0)
}

#[derive(Debug)]
struct InFlight {
    pod: String,
    since: Instant,
}

#[derive(Debug)]
struct Waiting<J> {
    pod: String,
    shape: usize,
    job: J,
}

#[derive(Debug)]
struct NodeGate<J> {
    in_flight: HashMap<usize, InFlight>,
    waiting: VecDeque<Waiting<J>>,
}

impl<J> Default for NodeGate<J> {
    fn default() -> Self {
        Self {
            in_flight: HashMap::new(),
            waiting: VecDeque::new(),
        }
    }
}

/// The gates of every node. `J` is the bind job the shell runs.
#[derive(Debug)]
pub struct BindGates<J> {
    nodes: HashMap<String, NodeGate<J>>,
    /// Pod key → (node, shape) of its in-flight entry.
    in_flight: HashMap<String, (String, usize)>,
    /// Pod key → node of its waiting entry, so a pod that is neither in
    /// flight nor waiting (every update of a running pod) costs a lookup.
    waiting: HashMap<String, String>,
}

impl<J> Default for BindGates<J> {
    fn default() -> Self {
        Self {
            nodes: HashMap::new(),
            in_flight: HashMap::new(),
            waiting: HashMap::new(),
        }
    }
}

/// An in-flight bind that no kubelet acknowledged in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// The pod.
    pub pod: String,
    /// Its node.
    pub node: String,
    /// How long it has been in flight.
    pub waited: Duration,
}

impl<J> BindGates<J> {
    /// Offers a decided pod's bind. Returns the job when it may run now (its
    /// shape is free on the node and nothing of that shape waits before
    /// it); otherwise keeps it until [`Self::acknowledge`] releases it.
    pub fn offer(
        &mut self,
        node: &str,
        shape: usize,
        pod: &str,
        job: J,
        now: Instant,
    ) -> Option<J> {
        if shape == 0 {
            return Some(job);
        }
        let gate = self.nodes.entry(node.to_owned()).or_default();
        let queued_before = gate.waiting.iter().any(|w| w.shape == shape);
        if gate.in_flight.contains_key(&shape) || queued_before {
            gate.waiting.push_back(Waiting {
                pod: pod.to_owned(),
                shape,
                job,
            });
            self.waiting.insert(pod.to_owned(), node.to_owned());
            return None;
        }
        gate.in_flight.insert(
            shape,
            InFlight {
                pod: pod.to_owned(),
                since: now,
            },
        );
        self.in_flight
            .insert(pod.to_owned(), (node.to_owned(), shape));
        Some(job)
    }

    /// Records a pod found bound and still `allocating` (after a restart, or
    /// bound by a previous leader) as in flight on its node, since `since`.
    pub fn observe_in_flight(&mut self, node: &str, shape: usize, pod: &str, since: Instant) {
        if shape == 0 || self.in_flight.contains_key(pod) {
            return;
        }
        let gate = self.nodes.entry(node.to_owned()).or_default();
        if gate.in_flight.contains_key(&shape) {
            return;
        }
        gate.in_flight.insert(
            shape,
            InFlight {
                pod: pod.to_owned(),
                since,
            },
        );
        self.in_flight
            .insert(pod.to_owned(), (node.to_owned(), shape));
    }

    /// Whether the pod is in flight.
    pub fn is_in_flight(&self, pod: &str) -> bool {
        self.in_flight.contains_key(pod)
    }

    /// The pod no longer holds its gate (acknowledged, ended, deleted, bind
    /// failed) or no longer waits (deleted before its turn). Returns the
    /// jobs that may run now, in decision order, each marked in flight.
    pub fn acknowledge(&mut self, pod: &str, now: Instant) -> Vec<J> {
        let mut released = Vec::new();
        if let Some((node, shape)) = self.in_flight.remove(pod) {
            if let Some(gate) = self.nodes.get_mut(&node) {
                gate.in_flight.remove(&shape);
            }
            self.release_next(&node, shape, now, &mut released);
        } else if let Some(node) = self.waiting.remove(pod) {
            // Still waiting: drop it from its queue.
            if let Some(gate) = self.nodes.get_mut(&node) {
                gate.waiting.retain(|w| w.pod != pod);
            }
        }
        released
    }

    fn release_next(&mut self, node: &str, shape: usize, now: Instant, out: &mut Vec<J>) {
        let Some(gate) = self.nodes.get_mut(node) else {
            return;
        };
        if gate.in_flight.contains_key(&shape) {
            return;
        }
        if let Some(position) = gate.waiting.iter().position(|w| w.shape == shape) {
            let next = gate.waiting.remove(position).expect("position is in range");
            self.waiting.remove(&next.pod);
            gate.in_flight.insert(
                shape,
                InFlight {
                    pod: next.pod.clone(),
                    since: now,
                },
            );
            self.in_flight.insert(next.pod, (node.to_owned(), shape));
            out.push(next.job);
        } else if gate.in_flight.is_empty() && gate.waiting.is_empty() {
            self.nodes.remove(node);
        }
    }

    /// In-flight binds older than `timeout`.
    pub fn expired(&self, now: Instant, timeout: Duration) -> Vec<Expired> {
        let mut out: Vec<Expired> = self
            .nodes
            .iter()
            .flat_map(|(node, gate)| {
                gate.in_flight.values().filter_map(move |f| {
                    let waited = now.saturating_duration_since(f.since);
                    (waited >= timeout).then(|| Expired {
                        pod: f.pod.clone(),
                        node: node.clone(),
                        waited,
                    })
                })
            })
            .collect();
        out.sort_by(|a, b| a.pod.cmp(&b.pod));
        out
    }

    /// Takes back every job waiting for `node` (the node's in-flight bind
    /// expired: the pods behind it are decided again).
    pub fn drain_waiting(&mut self, node: &str) -> Vec<(String, J)> {
        let Some(gate) = self.nodes.get_mut(node) else {
            return Vec::new();
        };
        let drained: Vec<(String, J)> = gate.waiting.drain(..).map(|w| (w.pod, w.job)).collect();
        for (pod, _) in &drained {
            self.waiting.remove(pod);
        }
        drained
    }

    /// Binds waiting behind an in-flight one, over all nodes.
    pub fn waiting_count(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(uuid: &str) -> ContainerDevice {
        ContainerDevice {
            uuid: uuid.into(),
            vendor: "NVIDIA".into(),
            memory_mib: 1,
            cores: 0,
        }
    }

    #[test]
    fn shape_is_the_first_container_with_devices() {
        assert_eq!(bind_shape(&[]), 0);
        assert_eq!(
            bind_shape(&[vec![], vec![device("a"), device("b")], vec![device("c")]]),
            2
        );
    }

    #[test]
    fn one_bind_per_shape_and_node_runs_the_rest_wait_in_order() {
        let now = Instant::now();
        let mut gates = BindGates::default();
        assert_eq!(gates.offer("n1", 1, "a", "bind-a", now), Some("bind-a"));
        assert_eq!(gates.offer("n1", 1, "b", "bind-b", now), None);
        assert_eq!(gates.offer("n1", 1, "c", "bind-c", now), None);
        // Another shape on the node, and the same shape on another node, run.
        assert_eq!(gates.offer("n1", 2, "d", "bind-d", now), Some("bind-d"));
        assert_eq!(gates.offer("n2", 1, "e", "bind-e", now), Some("bind-e"));
        assert_eq!(gates.waiting_count(), 2);
        // Deleted while waiting: it leaves the queue, nothing is released.
        assert!(gates.acknowledge("b", now).is_empty());
        assert_eq!(gates.acknowledge("a", now), vec!["bind-c"]);
        assert!(gates.is_in_flight("c"));
        assert!(gates.acknowledge("c", now).is_empty());
        assert_eq!(gates.waiting_count(), 0);
        // A pod that never waited and is not in flight: nothing happens.
        assert!(gates.acknowledge("zzz", now).is_empty());
    }

    #[test]
    fn a_later_pod_of_a_shape_does_not_overtake_one_waiting() {
        let now = Instant::now();
        let mut gates = BindGates::default();
        assert!(gates.offer("n", 1, "a", 1, now).is_some());
        assert!(gates.offer("n", 1, "b", 2, now).is_none());
        // `a` is acknowledged and `b` released in the same step: a pod offered
        // afterwards waits behind `b`.
        assert_eq!(gates.acknowledge("a", now), vec![2]);
        assert!(gates.offer("n", 1, "c", 3, now).is_none());
    }

    #[test]
    fn restart_recovery_and_expiry() {
        let start = Instant::now();
        let mut gates: BindGates<u32> = BindGates::default();
        gates.observe_in_flight("n", 1, "old", start);
        gates.observe_in_flight("n", 1, "other", start); // shape already held: ignored
        assert!(gates.is_in_flight("old"));
        assert!(!gates.is_in_flight("other"));
        assert!(gates.offer("n", 1, "new", 7, start).is_none());
        let later = start + Duration::from_secs(90);
        assert!(gates.expired(later, Duration::from_secs(120)).is_empty());
        let expired = gates.expired(later, Duration::from_secs(60));
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].pod, "old");
        assert_eq!(gates.drain_waiting("n"), vec![("new".to_owned(), 7)]);
        assert!(gates.acknowledge("old", later).is_empty());
    }
}
