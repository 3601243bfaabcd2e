//! Which pod an `Allocate` call belongs to. Kubelet's request names only
//! device IDs, so the pod is found among the pods bound to this node whose
//! allocation is not yet applied (`hami.io/bind-phase: allocating`), whose
//! allocation is sealed by Tessera's scheduler, and that kubelet has not
//! admitted yet (no container statuses): the next unapplied containers of
//! a candidate must ask for exactly the request's per-container device
//! counts.
//!
//! Why exactly one pod matches: the scheduler keeps at most one
//! unacknowledged bind per node and *shape* (the device count of the pod's
//! first GPU container; see the scheduler's `shell::node_gate`), and
//! kubelet admits one pod at a time, calling `Allocate` for each of its GPU
//! containers in order before the next pod. So the first call of a pod
//! names a count that no other waiting pod starts with, and every later
//! call of it belongs to the pod already partly applied, which therefore
//! comes first. Creation times play no part (they have one-second
//! resolution, and binds reach kubelet in any order). Two candidates left
//! after that break the scheduler's promise (a second scheduler, a bind
//! past its timeout): the call fails rather than guess, unless both would
//! get the same cards. Pure functions over pod objects; the API calls live
//! in [`super::Allocator`].

use k8s_openapi::api::core::v1::Pod;
use tessera_api::allocation::{decode_pod_devices, ContainerDevice, PodDevices};
use tessera_api::allocation_seal::{AllocationTrust, SealError};
use tessera_api::names::allocation as keys;
use tessera_api::pod::{annotation, is_live, BindPhase};

/// A pod on this node still waiting for (part of) its devices.
#[derive(Debug, Clone)]
pub struct PendingPod<'a> {
    /// The pod object as listed.
    pub pod: &'a Pod,
    /// `hami.io/vgpu-devices-to-allocate`: what is left to hand out.
    pub to_allocate: PodDevices,
    /// Whether some containers already got their devices.
    pub partly_applied: bool,
}

/// A pod whose allocation annotation cannot be read: it can never be applied.
#[derive(Debug, Clone)]
pub struct CorruptPod<'a> {
    /// The pod.
    pub pod: &'a Pod,
    /// Why its annotations cannot be used.
    pub error: String,
}

/// A pod claiming an allocation that Tessera's scheduler did not write (or
/// that was changed since): never honoured.
#[derive(Debug, Clone)]
pub struct UntrustedPod<'a> {
    /// The pod.
    pub pod: &'a Pod,
    /// Why its seal does not hold.
    pub error: SealError,
}

/// The pods of a listing sorted into those waiting, those unreadable and
/// those not believed.
#[derive(Debug, Default)]
pub struct PendingPods<'a> {
    /// Pods waiting for devices.
    pub pending: Vec<PendingPod<'a>>,
    /// Pods whose allocation annotation does not decode.
    pub corrupt: Vec<CorruptPod<'a>>,
    /// Pods whose allocation is not sealed by Tessera's scheduler.
    pub untrusted: Vec<UntrustedPod<'a>>,
}

/// The decision for one `Allocate` call.
#[derive(Debug, Clone)]
pub struct Claim<'a> {
    /// The pod the request belongs to.
    pub pod: &'a Pod,
    /// For each container request, its entry in the allocation annotation
    /// (see `tessera_api::request::annotated_container`) and its devices.
    pub containers: Vec<(usize, Vec<ContainerDevice>)>,
    /// `hami.io/vgpu-devices-to-allocate` once these containers are applied.
    pub remaining: PodDevices,
}

impl Claim<'_> {
    /// Whether every container of the pod has its devices after this claim.
    pub fn completes_pod(&self) -> bool {
        self.remaining.iter().all(Vec::is_empty)
    }
}

/// Why no pod could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatchError {
    /// No waiting pod asks for this shape.
    #[error("no pod bound to node `{node}` is waiting for devices in the shape kubelet asked for (device counts per container {shape:?}); waiting pods: {waiting}. Check that the pod was placed by the Tessera scheduler (it writes hami.io/vgpu-devices-to-allocate and hami.io/bind-phase=allocating) and that its nvidia.com/gpu limits were not changed after scheduling")]
    NoCandidate {
        /// This node.
        node: String,
        /// Device counts per container in the request.
        shape: Vec<usize>,
        /// Summary of the waiting pods and their shapes.
        waiting: String,
    },
    /// Two candidates cannot be told apart and would get different cards.
    #[error("cannot tell which pod this Allocate is for: pods {first} and {second} both wait for devices in the shape {shape:?} on this node and were given different cards, which Tessera's scheduler never does (is a second scheduler binding GPU pods here, or did a bind outlive the scheduler's allocation timeout?); refusing rather than give one pod the other's cards. Delete one of them")]
    Ambiguous {
        /// One candidate, `namespace/name`.
        first: String,
        /// The other candidate.
        second: String,
        /// Device counts per container in the request.
        shape: Vec<usize>,
    },
}

pub use tessera_api::pod::pod_key;

/// Whether kubelet has admitted the pod already: it writes container
/// statuses only after admission, and admission is where `Allocate` runs,
/// so such a pod can never be the one asking. (This is what keeps a pod
/// that sets its own bind phase back to `allocating` from taking a later
/// pod's call; container statuses are written through `pods/status`, which
/// tenants cannot.)
fn admitted(pod: &Pod) -> bool {
    pod.status.as_ref().is_some_and(|s| {
        s.container_statuses.as_ref().is_some_and(|c| !c.is_empty())
            || s.init_container_statuses
                .as_ref()
                .is_some_and(|c| !c.is_empty())
    })
}

/// Whether every entry still to allocate is the sealed entry itself (or
/// empty, once applied): anything else was edited by someone else.
fn consistent(allocated: &PodDevices, to_allocate: &PodDevices) -> bool {
    to_allocate.len() == allocated.len()
        && to_allocate
            .iter()
            .zip(allocated)
            .all(|(left, sealed)| left.is_empty() || left == sealed)
}

/// Sorts the pods bound to `node` into waiting, unreadable and untrusted
/// ones. Pods placed elsewhere, finished, already admitted by kubelet, or
/// not in the `allocating` phase are left out.
pub fn pending_pods<'a>(pods: &'a [Pod], node: &str, trust: &AllocationTrust) -> PendingPods<'a> {
    let mut out = PendingPods::default();
    for pod in pods {
        let bound_here = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
            && annotation(pod, keys::VGPU_NODE) == Some(node);
        if !bound_here
            || !is_live(pod)
            || admitted(pod)
            || BindPhase::of(pod) != Some(BindPhase::Allocating)
        {
            continue;
        }
        // What was allocated in full, as sealed by the scheduler.
        let allocated = match trust.allocation(pod) {
            Ok(Some(allocation)) => allocation.devices,
            Ok(None) => Vec::new(),
            Err(SealError::Corrupt(reason)) => {
                out.corrupt.push(CorruptPod { pod, error: reason });
                continue;
            }
            Err(error) => {
                out.untrusted.push(UntrustedPod { pod, error });
                continue;
            }
        };
        let to_allocate =
            match decode_pod_devices(annotation(pod, keys::DEVICES_TO_ALLOCATE).unwrap_or("")) {
                Ok(devices) => devices,
                Err(error) => {
                    out.corrupt.push(CorruptPod {
                        pod,
                        error: error.to_string(),
                    });
                    continue;
                }
            };
        if !consistent(&allocated, &to_allocate) {
            out.corrupt.push(CorruptPod {
                pod,
                error: format!(
                    "{} does not match the sealed {}: it was edited after scheduling",
                    keys::DEVICES_TO_ALLOCATE,
                    keys::DEVICES_ALLOCATED
                ),
            });
            continue;
        }
        // Containers holding devices in the allocation but not in
        // `to_allocate` are already applied.
        let partly_applied = allocated.iter().enumerate().any(|(i, devices)| {
            !devices.is_empty() && to_allocate.get(i).is_none_or(Vec::is_empty)
        });
        if to_allocate.iter().all(Vec::is_empty) {
            continue;
        }
        out.pending.push(PendingPod {
            pod,
            to_allocate,
            partly_applied,
        });
    }
    out
}

impl<'a> PendingPod<'a> {
    /// The next `n` containers still waiting, with their devices.
    fn next_containers(&self, n: usize) -> Vec<(usize, &[ContainerDevice])> {
        self.to_allocate
            .iter()
            .enumerate()
            .filter(|(_, devices)| !devices.is_empty())
            .take(n)
            .map(|(i, devices)| (i, devices.as_slice()))
            .collect()
    }

    /// The claim this pod would make for a request of `shape`, if it fits.
    fn claim_for(&self, shape: &[usize]) -> Option<Claim<'a>> {
        let next = self.next_containers(shape.len());
        if next.len() != shape.len()
            || next
                .iter()
                .zip(shape)
                .any(|((_, devices), want)| devices.len() != *want)
        {
            return None;
        }
        let mut remaining = self.to_allocate.clone();
        let containers = next
            .into_iter()
            .map(|(i, devices)| {
                remaining[i].clear();
                (i, devices.to_vec())
            })
            .collect();
        Some(Claim {
            pod: self.pod,
            containers,
            remaining,
        })
    }

    fn shape_summary(&self) -> String {
        let counts: Vec<usize> = self
            .to_allocate
            .iter()
            .filter(|d| !d.is_empty())
            .map(Vec::len)
            .collect();
        format!("{} {counts:?}", pod_key(self.pod))
    }
}

/// Chooses the pod for a request whose containers ask for `shape` devices.
pub fn choose<'a>(
    pending: &[PendingPod<'a>],
    node: &str,
    shape: &[usize],
) -> Result<Claim<'a>, MatchError> {
    let mut candidates: Vec<(&PendingPod<'a>, Claim<'a>)> = pending
        .iter()
        .filter_map(|p| p.claim_for(shape).map(|claim| (p, claim)))
        .collect();
    // A partly applied pod is the one kubelet is working through.
    if candidates.iter().any(|(p, _)| p.partly_applied) {
        candidates.retain(|(p, _)| p.partly_applied);
    }
    // Deterministic order for the message and the equivalent-cards case.
    candidates.sort_by_key(|(p, _)| pod_key(p.pod));
    let mut candidates = candidates.into_iter();
    let Some((first, claim)) = candidates.next() else {
        return Err(MatchError::NoCandidate {
            node: node.to_owned(),
            shape: shape.to_vec(),
            waiting: if pending.is_empty() {
                "none".into()
            } else {
                pending
                    .iter()
                    .map(PendingPod::shape_summary)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        });
    };
    for (other, other_claim) in candidates {
        let same_cards = claim
            .containers
            .iter()
            .map(|(_, d)| d)
            .eq(other_claim.containers.iter().map(|(_, d)| d));
        if !same_cards {
            return Err(MatchError::Ambiguous {
                first: pod_key(first.pod),
                second: pod_key(other.pod),
                shape: shape.to_vec(),
            });
        }
    }
    Ok(claim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tessera_api::allocation::{encode_pod_devices, NVIDIA_VENDOR};
    use tessera_api::allocation_seal::SealKey;

    const NODE: &str = "gpu-1";

    fn dev(uuid: &str, mib: u64) -> ContainerDevice {
        ContainerDevice {
            uuid: uuid.into(),
            vendor: NVIDIA_VENDOR.into(),
            memory_mib: mib,
            cores: 10,
        }
    }

    fn pod(name: &str, created: &str, devices: &PodDevices, to_allocate: &PodDevices) -> Pod {
        let containers: Vec<_> = (0..devices.len())
            .map(|i| json!({"name": format!("c{i}"), "image": "x"}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {
                "name": name, "namespace": "ns", "creationTimestamp": created,
                "annotations": {
                    keys::VGPU_NODE: NODE,
                    keys::BIND_PHASE: keys::PHASE_ALLOCATING,
                    keys::DEVICES_ALLOCATED: encode_pod_devices(devices),
                    keys::DEVICES_TO_ALLOCATE: encode_pod_devices(to_allocate),
                }
            },
            "spec": {"nodeName": NODE, "containers": containers}
        }))
        .expect("pod")
    }

    fn fresh(name: &str, created: &str, devices: PodDevices) -> Pod {
        pod(name, created, &devices, &devices)
    }

    #[test]
    fn the_pod_of_the_requested_shape_wins_whatever_its_age() {
        // The scheduler keeps one unacknowledged pod per shape on a node:
        // the shape alone says which pod asks, creation times play no part.
        let pods = vec![
            fresh("one", "2024-01-01T00:00:05Z", vec![vec![dev("A", 1)]]),
            fresh(
                "two",
                "2024-01-01T00:00:05Z",
                vec![vec![dev("A", 1), dev("B", 1)]],
            ),
        ];
        let pending = pending_pods(&pods, NODE, &AllocationTrust::Annotations);
        let claim = choose(&pending.pending, NODE, &[1]).expect("matches");
        assert_eq!(pod_key(claim.pod), "ns/one");
        assert!(claim.completes_pod());
        let claim = choose(&pending.pending, NODE, &[2]).expect("matches");
        assert_eq!(pod_key(claim.pod), "ns/two");
        let err = choose(&pending.pending, NODE, &[3]).expect_err("nothing asks for 3");
        assert!(err.to_string().contains("ns/two [2]"), "{err}");
    }

    #[test]
    fn admitted_pods_unsealed_and_edited_allocations_are_never_candidates() {
        let key = SealKey::from_bytes(&[9; 32]).expect("key");
        let sealed = |name: &str, uid: &str, devices: PodDevices| {
            let mut p = fresh(name, "2024-01-01T00:00:00Z", devices.clone());
            p.metadata.uid = Some(uid.into());
            let seal = key.seal(uid, NODE, &encode_pod_devices(&devices));
            p.metadata
                .annotations
                .as_mut()
                .expect("annotations")
                .insert(keys::SEAL.into(), seal);
            p
        };
        let good = sealed("good", "u1", vec![vec![dev("A", 1)]]);
        // Already admitted by kubelet, phase set back to allocating by its owner.
        let mut replay = sealed("replay", "u2", vec![vec![dev("B", 1)]]);
        replay.status = Some(
            serde_json::from_value(json!({"containerStatuses": [{"name": "c0", "image": "x",
                "imageID": "", "ready": true, "restartCount": 0}]}))
            .expect("status"),
        );
        // Hand-written, no seal.
        let mut forged = fresh("forged", "2024-01-01T00:00:00Z", vec![vec![dev("C", 1)]]);
        forged.metadata.uid = Some("u3".into());
        // Sealed, but to-allocate edited to another card.
        let mut edited = sealed("edited", "u4", vec![vec![dev("D", 1)]]);
        edited
            .metadata
            .annotations
            .as_mut()
            .expect("annotations")
            .insert(
                keys::DEVICES_TO_ALLOCATE.into(),
                encode_pod_devices(&[vec![dev("A", 1)]]),
            );
        let pods = vec![good, replay, forged, edited];
        let pending = pending_pods(&pods, NODE, &AllocationTrust::Sealed(key));
        let names: Vec<String> = pending.pending.iter().map(|p| pod_key(p.pod)).collect();
        assert_eq!(names, vec!["ns/good"]);
        assert_eq!(pending.untrusted.len(), 1);
        assert_eq!(pod_key(pending.untrusted[0].pod), "ns/forged");
        assert_eq!(pending.untrusted[0].error, SealError::Missing);
        assert_eq!(pending.corrupt.len(), 1);
        assert_eq!(pod_key(pending.corrupt[0].pod), "ns/edited");
        let claim = choose(&pending.pending, NODE, &[1]).expect("only the sealed pod");
        assert_eq!(pod_key(claim.pod), "ns/good");
    }

    #[test]
    fn partly_applied_pod_comes_first_and_skips_applied_containers() {
        let devices = vec![vec![dev("A", 1)], vec![], vec![dev("B", 2)]];
        let remaining = vec![vec![], vec![], vec![dev("B", 2)]];
        let pods = vec![
            fresh("older", "2024-01-01T00:00:00Z", vec![vec![dev("C", 1)]]),
            pod("busy", "2024-01-01T00:00:09Z", &devices, &remaining),
        ];
        let pending = pending_pods(&pods, NODE, &AllocationTrust::Annotations);
        let claim = choose(&pending.pending, NODE, &[1]).expect("matches");
        assert_eq!(pod_key(claim.pod), "ns/busy");
        assert_eq!(claim.containers, vec![(2, vec![dev("B", 2)])]);
        assert!(claim.completes_pod());
    }

    #[test]
    fn multi_container_request_takes_the_next_containers_in_order() {
        let devices = vec![vec![dev("A", 1)], vec![], vec![dev("B", 2), dev("C", 2)]];
        let pods = vec![fresh("p", "2024-01-01T00:00:00Z", devices)];
        let pending = pending_pods(&pods, NODE, &AllocationTrust::Annotations);
        assert!(choose(&pending.pending, NODE, &[2, 1]).is_err());
        let claim = choose(&pending.pending, NODE, &[1, 2]).expect("matches");
        assert_eq!(
            claim.containers.iter().map(|c| c.0).collect::<Vec<_>>(),
            vec![0, 2]
        );
        let first_only = choose(&pending.pending, NODE, &[1]).expect("matches");
        assert!(!first_only.completes_pod());
        assert_eq!(first_only.remaining[2].len(), 2);
    }

    #[test]
    fn two_pods_of_one_shape_on_different_cards_is_refused_same_cards_is_fine() {
        let t = "2024-01-01T00:00:00Z";
        let pods = vec![
            fresh("a", t, vec![vec![dev("A", 1)]]),
            fresh("b", t, vec![vec![dev("B", 1)]]),
        ];
        let pending = pending_pods(&pods, NODE, &AllocationTrust::Annotations);
        let err = choose(&pending.pending, NODE, &[1]).expect_err("ambiguous");
        assert!(matches!(err, MatchError::Ambiguous { .. }), "{err}");
        let pods = vec![
            fresh("a", t, vec![vec![dev("A", 1)]]),
            fresh("b", t, vec![vec![dev("A", 1)]]),
        ];
        let pending = pending_pods(&pods, NODE, &AllocationTrust::Annotations);
        assert_eq!(
            pod_key(
                choose(&pending.pending, NODE, &[1])
                    .expect("equivalent")
                    .pod
            ),
            "ns/a"
        );
    }

    #[test]
    fn other_nodes_finished_and_applied_pods_are_ignored_corrupt_ones_reported() {
        let mut elsewhere = fresh("elsewhere", "2024-01-01T00:00:00Z", vec![vec![dev("A", 1)]]);
        elsewhere.spec.as_mut().expect("spec").node_name = Some("other".into());
        let mut done = fresh("done", "2024-01-01T00:00:00Z", vec![vec![dev("A", 1)]]);
        done.metadata
            .annotations
            .as_mut()
            .expect("annotations")
            .insert(keys::BIND_PHASE.into(), keys::PHASE_SUCCESS.into());
        let mut finished = fresh("finished", "2024-01-01T00:00:00Z", vec![vec![dev("A", 1)]]);
        finished.status = Some(serde_json::from_value(json!({"phase": "Failed"})).expect("status"));
        let mut corrupt = fresh("corrupt", "2024-01-01T00:00:00Z", vec![vec![dev("A", 1)]]);
        corrupt
            .metadata
            .annotations
            .as_mut()
            .expect("annotations")
            .insert(keys::DEVICES_TO_ALLOCATE.into(), "GPU-A,NVIDIA,lots".into());
        let pods = vec![elsewhere, done, finished, corrupt];
        let pending = pending_pods(&pods, NODE, &AllocationTrust::Annotations);
        assert!(pending.pending.is_empty());
        assert_eq!(pending.corrupt.len(), 1);
        assert_eq!(pod_key(pending.corrupt[0].pod), "ns/corrupt");
    }
}
