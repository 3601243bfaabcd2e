//! Which pod an `Allocate` call belongs to. Kubelet's request names only
//! device IDs, so the pod is found among the pods bound to this node whose
//! allocation is not yet applied (`hami.io/bind-phase: allocating`): the
//! next unapplied containers of a candidate must ask for exactly the
//! request's per-container device counts. Kubelet admits pods one at a time
//! in creation order and allocates every container of a pod before the
//! next pod, so a partly applied pod comes first, then the oldest. When the
//! two oldest candidates were created in the same second and would get
//! different cards, nothing tells them apart: the call fails rather than
//! give a pod another pod's cards. Pure functions over pod objects; the API
//! calls live in [`super::Allocator`].

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tessera_api::allocation::{decode_pod_devices, ContainerDevice, PodDevices};
use tessera_api::error::AllocationError;
use tessera_api::names::allocation as keys;

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
    /// Why its annotation does not decode.
    pub error: AllocationError,
}

/// The pods of a listing sorted into those waiting and those unreadable.
#[derive(Debug, Default)]
pub struct PendingPods<'a> {
    /// Pods waiting for devices.
    pub pending: Vec<PendingPod<'a>>,
    /// Pods whose allocation annotation does not decode.
    pub corrupt: Vec<CorruptPod<'a>>,
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
    #[error("cannot tell which pod this Allocate is for: pods {first} and {second} were created in the same second, ask for the same device counts {shape:?} and were given different cards; refusing rather than give one pod the other's cards. Delete and recreate one of them")]
    Ambiguous {
        /// One candidate, `namespace/name`.
        first: String,
        /// The other candidate.
        second: String,
        /// Device counts per container in the request.
        shape: Vec<usize>,
    },
}

/// `namespace/name` of a pod.
pub fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// Whether the pod still runs or may run (not finished, not being deleted).
fn is_live(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && !matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

/// Sorts the pods bound to `node` into waiting and unreadable ones. Pods
/// placed elsewhere, finished, or not in the `allocating` phase are left out.
pub fn pending_pods<'a>(pods: &'a [Pod], node: &str) -> PendingPods<'a> {
    let mut out = PendingPods::default();
    for pod in pods {
        let bound_here = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
            && annotation(pod, keys::VGPU_NODE) == Some(node);
        if !bound_here
            || !is_live(pod)
            || annotation(pod, keys::BIND_PHASE) != Some(keys::PHASE_ALLOCATING)
        {
            continue;
        }
        let to_allocate =
            match decode_pod_devices(annotation(pod, keys::DEVICES_TO_ALLOCATE).unwrap_or("")) {
                Ok(devices) => devices,
                Err(error) => {
                    out.corrupt.push(CorruptPod { pod, error });
                    continue;
                }
            };
        // What was allocated in full; containers holding devices there but
        // not in `to_allocate` are already applied.
        let allocated = decode_pod_devices(annotation(pod, keys::DEVICES_ALLOCATED).unwrap_or(""))
            .unwrap_or_default();
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

fn created(pod: &Pod) -> Option<&Time> {
    pod.metadata.creation_timestamp.as_ref()
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
    candidates.sort_by(|(a, _), (b, _)| {
        created(a.pod)
            .map(|t| t.0)
            .cmp(&created(b.pod).map(|t| t.0))
            .then_with(|| pod_key(a.pod).cmp(&pod_key(b.pod)))
    });
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
        if created(other.pod).map(|t| t.0) != created(first.pod).map(|t| t.0) {
            break;
        }
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
    fn oldest_matching_pod_wins_and_shape_must_match() {
        let pods = vec![
            fresh("new", "2024-01-01T00:00:05Z", vec![vec![dev("A", 1)]]),
            fresh("old", "2024-01-01T00:00:01Z", vec![vec![dev("B", 1)]]),
            fresh(
                "two",
                "2024-01-01T00:00:00Z",
                vec![vec![dev("A", 1), dev("B", 1)]],
            ),
        ];
        let pending = pending_pods(&pods, NODE);
        let claim = choose(&pending.pending, NODE, &[1]).expect("matches");
        assert_eq!(pod_key(claim.pod), "ns/old");
        assert!(claim.completes_pod());
        let claim = choose(&pending.pending, NODE, &[2]).expect("matches");
        assert_eq!(pod_key(claim.pod), "ns/two");
        let err = choose(&pending.pending, NODE, &[3]).expect_err("nothing asks for 3");
        assert!(err.to_string().contains("ns/two [2]"), "{err}");
    }

    #[test]
    fn partly_applied_pod_comes_first_and_skips_applied_containers() {
        let devices = vec![vec![dev("A", 1)], vec![], vec![dev("B", 2)]];
        let remaining = vec![vec![], vec![], vec![dev("B", 2)]];
        let pods = vec![
            fresh("older", "2024-01-01T00:00:00Z", vec![vec![dev("C", 1)]]),
            pod("busy", "2024-01-01T00:00:09Z", &devices, &remaining),
        ];
        let pending = pending_pods(&pods, NODE);
        let claim = choose(&pending.pending, NODE, &[1]).expect("matches");
        assert_eq!(pod_key(claim.pod), "ns/busy");
        assert_eq!(claim.containers, vec![(2, vec![dev("B", 2)])]);
        assert!(claim.completes_pod());
    }

    #[test]
    fn multi_container_request_takes_the_next_containers_in_order() {
        let devices = vec![vec![dev("A", 1)], vec![], vec![dev("B", 2), dev("C", 2)]];
        let pods = vec![fresh("p", "2024-01-01T00:00:00Z", devices)];
        let pending = pending_pods(&pods, NODE);
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
    fn same_second_different_cards_is_refused_same_cards_is_fine() {
        let t = "2024-01-01T00:00:00Z";
        let pods = vec![
            fresh("a", t, vec![vec![dev("A", 1)]]),
            fresh("b", t, vec![vec![dev("B", 1)]]),
        ];
        let pending = pending_pods(&pods, NODE);
        let err = choose(&pending.pending, NODE, &[1]).expect_err("ambiguous");
        assert!(matches!(err, MatchError::Ambiguous { .. }), "{err}");
        let pods = vec![
            fresh("a", t, vec![vec![dev("A", 1)]]),
            fresh("b", t, vec![vec![dev("A", 1)]]),
        ];
        let pending = pending_pods(&pods, NODE);
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
        let pending = pending_pods(&pods, NODE);
        assert!(pending.pending.is_empty());
        assert_eq!(pending.corrupt.len(), 1);
        assert_eq!(pod_key(pending.corrupt[0].pod), "ns/corrupt");
    }
}
