//! From a process's cgroup owner to whom it belongs and what it may hold:
//! the node's pods (from the agent's pod reflector) are indexed by UID
//! (static pods also by the hash kubelet uses as their UID, which their
//! mirror pod carries in `kubernetes.io/config.mirror`), each container's
//! runtime ID (from `status.containerStatuses`, init and ephemeral ones
//! included) names the container, and the pod's trusted allocation
//! ([`TrustedAllocations`]) gives each container its cap per card.
//!
//! Which allocations to trust is an input: [`AnnotatedAllocations`]
//! decodes `hami.io/vgpu-devices-allocated` as written; a signature check
//! plugs in as another [`TrustedAllocations`]. A pod whose allocation is
//! not trusted has none: every process of it on a card is unallocated.
//!
//! Timing: kubelet writes a container's ID into the pod status only after
//! the container started, and the reflector may not have a brand-new pod
//! yet, so a process in an unknown container or pod is judged only after
//! it stayed unknown for [`UNKNOWN_GRACE`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use tessera_api::allocation::{decode_pod_devices, PodDevices};
use tessera_api::names::allocation as keys;
use tessera_api::request::annotated_container;

use super::cgroup::{status_container_id, ProcessOwner};
use super::decide::{Attribution, Subject};

/// How long a process may stay in a pod or container the agent cannot
/// name before it is treated as unallocated.
pub const UNKNOWN_GRACE: Duration = Duration::from_secs(10);

/// The annotation kubelet puts on a static pod's mirror, holding the UID
/// the static pod's cgroup is named after.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

const MIB: u64 = 1 << 20;

/// Which pods' allocations the agent trusts.
pub trait TrustedAllocations: Send + Sync + std::fmt::Debug {
    /// The pod's allocation (devices per container entry, as in
    /// `hami.io/vgpu-devices-allocated`) when it is trusted, `None` when
    /// the pod has none or it cannot be trusted.
    fn verified_allocation(&self, pod: &Pod) -> Option<PodDevices>;
}

/// Trusts `hami.io/vgpu-devices-allocated` as written (no signature).
#[derive(Debug, Clone, Copy, Default)]
pub struct AnnotatedAllocations;

impl TrustedAllocations for AnnotatedAllocations {
    fn verified_allocation(&self, pod: &Pod) -> Option<PodDevices> {
        let value = pod
            .metadata
            .annotations
            .as_ref()?
            .get(keys::DEVICES_ALLOCATED)?;
        match decode_pod_devices(value) {
            Ok(devices) => Some(devices),
            Err(e) => {
                tracing::debug!(pod = ?pod.metadata.name, error = %e, "allocation annotation does not decode; the pod counts as unallocated");
                None
            }
        }
    }
}

/// One pod as enforcement needs it.
#[derive(Debug, Clone)]
pub struct PodEntry {
    /// The pod object (Events are posted on it).
    pub pod: Arc<Pod>,
    /// Its UID as the API server has it.
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Whether its namespace is exempt from enforcement.
    pub exempt: bool,
    /// Container name by runtime container ID.
    pub container_names: HashMap<String, String>,
    /// Cap in bytes per card UUID, by container name (allocated containers only).
    pub caps: HashMap<String, HashMap<String, u64>>,
}

impl PodEntry {
    fn subject(&self, container: &str) -> Subject {
        Subject {
            pod_uid: self.uid.clone(),
            namespace: self.namespace.clone(),
            pod: self.name.clone(),
            container: container.to_owned(),
        }
    }
}

/// The node's pods, indexed for attribution.
#[derive(Debug, Clone, Default)]
pub struct NodeContainers {
    by_uid: HashMap<String, Arc<PodEntry>>,
}

impl NodeContainers {
    /// Indexes `pods`, with the allocations `trusted` vouches for.
    pub fn new(
        pods: &[Arc<Pod>],
        trusted: &dyn TrustedAllocations,
        exempt_namespaces: &[String],
    ) -> Self {
        let mut by_uid = HashMap::new();
        for pod in pods {
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            let namespace = pod.metadata.namespace.clone().unwrap_or_default();
            let entry = Arc::new(PodEntry {
                pod: Arc::clone(pod),
                uid: uid.clone(),
                exempt: exempt_namespaces.contains(&namespace),
                namespace,
                name: pod.metadata.name.clone().unwrap_or_default(),
                container_names: container_names(pod),
                caps: caps(pod, trusted),
            });
            if let Some(mirror) = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(MIRROR_ANNOTATION))
            {
                by_uid.insert(mirror.clone(), Arc::clone(&entry));
            }
            by_uid.insert(uid, entry);
        }
        Self { by_uid }
    }

    /// The pod of a cgroup UID.
    pub fn pod(&self, uid: &str) -> Option<&Arc<PodEntry>> {
        self.by_uid.get(uid)
    }

    /// Whom `owner` is on `card_uuid`, given how long the process has been
    /// unknown (`unknown_for`, `None` when this is the first sighting).
    pub fn attribute(
        &self,
        owner: &ProcessOwner,
        card_uuid: &str,
        unknown_for: Option<Duration>,
    ) -> Attribution {
        let settled = unknown_for.is_some_and(|d| d >= UNKNOWN_GRACE);
        let (pod_uid, container_id) = match owner {
            ProcessOwner::Host => return Attribution::Host,
            ProcessOwner::Container {
                pod_uid,
                container_id,
            } => (pod_uid, Some(container_id)),
            ProcessOwner::Pod { pod_uid } => (pod_uid, None),
        };
        let Some(pod) = self.by_uid.get(pod_uid) else {
            return if settled {
                Attribution::Unallocated {
                    subject: Subject {
                        pod_uid: pod_uid.clone(),
                        ..Subject::host()
                    },
                }
            } else {
                Attribution::Skip
            };
        };
        if pod.exempt {
            return Attribution::Skip;
        }
        let name = container_id.and_then(|id| pod.container_names.get(id));
        match name {
            Some(name) => match pod.caps.get(name) {
                Some(caps) => Attribution::Allocated {
                    subject: pod.subject(name),
                    cap_bytes: caps.get(card_uuid).copied(),
                },
                None => Attribution::Unallocated {
                    subject: pod.subject(name),
                },
            },
            // The pod cgroup itself, or a container not in the status yet.
            None if container_id.is_none() || settled => Attribution::Unallocated {
                subject: pod.subject(""),
            },
            None => Attribution::Skip,
        }
    }

    /// Whether `owner` can be attributed now, without waiting (the agent
    /// knows its pod and, for a container, the container's name).
    pub fn knows(&self, owner: &ProcessOwner) -> bool {
        match owner {
            ProcessOwner::Host => true,
            ProcessOwner::Pod { pod_uid } => self.by_uid.contains_key(pod_uid),
            ProcessOwner::Container {
                pod_uid,
                container_id,
            } => self
                .by_uid
                .get(pod_uid)
                .is_some_and(|pod| pod.container_names.contains_key(container_id)),
        }
    }
}

/// Container name by runtime container ID, from every status list.
fn container_names(pod: &Pod) -> HashMap<String, String> {
    let Some(status) = pod.status.as_ref() else {
        return HashMap::new();
    };
    [
        status.container_statuses.as_deref(),
        status.init_container_statuses.as_deref(),
        status.ephemeral_container_statuses.as_deref(),
    ]
    .into_iter()
    .flatten()
    .flatten()
    .filter_map(|s| {
        let id = status_container_id(s.container_id.as_deref()?);
        (!id.is_empty()).then(|| (id.to_ascii_lowercase(), s.name.clone()))
    })
    .collect()
}

/// Cap in bytes per card, by container name, from the trusted allocation.
fn caps(pod: &Pod, trusted: &dyn TrustedAllocations) -> HashMap<String, HashMap<String, u64>> {
    let Some(allocation) = trusted.verified_allocation(pod) else {
        return HashMap::new();
    };
    let entries = allocation.len();
    let mut caps: HashMap<String, HashMap<String, u64>> = HashMap::new();
    for (entry, devices) in allocation.into_iter().enumerate() {
        if devices.is_empty() {
            continue;
        }
        let Some(container) = annotated_container(pod, entries, entry) else {
            continue;
        };
        let per_card = caps.entry(container.name.clone()).or_default();
        for device in devices {
            *per_card.entry(device.uuid).or_default() += device.memory_mib.saturating_mul(MIB);
        }
    }
    caps
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const UID: &str = "0b7c2d52-7f3e-4a8b-9c1d-2e3f4a5b6c7d";
    const ID_MAIN: &str = "aaaaaaaaaaaa1111";
    const ID_SIDE: &str = "bbbbbbbbbbbb2222";
    const ID_INIT: &str = "cccccccccccc3333";

    fn pod(namespace: &str, annotations: serde_json::Value) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": "p", "namespace": namespace, "uid": UID, "annotations": annotations},
                "spec": {
                    "initContainers": [{"name": "setup", "image": "x"}],
                    "containers": [{"name": "main", "image": "x"}, {"name": "side", "image": "x"}]
                },
                "status": {
                    "initContainerStatuses": [{"name": "setup", "containerID": format!("containerd://{ID_INIT}"), "image": "x", "imageID": "", "ready": false, "restartCount": 0}],
                    "containerStatuses": [
                        {"name": "main", "containerID": format!("containerd://{ID_MAIN}"), "image": "x", "imageID": "", "ready": true, "restartCount": 0},
                        {"name": "side", "containerID": format!("cri-o://{ID_SIDE}"), "image": "x", "imageID": "", "ready": true, "restartCount": 0}
                    ]
                }
            }))
            .expect("pod"),
        )
    }

    fn in_container(id: &str) -> ProcessOwner {
        ProcessOwner::Container {
            pod_uid: UID.into(),
            container_id: id.into(),
        }
    }

    fn allocated_pod() -> Arc<Pod> {
        // App containers only: main gets 1000 MiB of GPU-A, side nothing.
        pod(
            "ns",
            json!({keys::DEVICES_ALLOCATED: "GPU-A,NVIDIA,1000,30:;;"}),
        )
    }

    #[test]
    fn allocated_containers_get_their_cap_on_their_cards_only() {
        let index = NodeContainers::new(&[allocated_pod()], &AnnotatedAllocations, &[]);
        let main = index.attribute(&in_container(ID_MAIN), "GPU-A", None);
        let Attribution::Allocated { subject, cap_bytes } = main else {
            panic!("{main:?}")
        };
        assert_eq!(
            (
                subject.namespace.as_str(),
                subject.pod.as_str(),
                subject.container.as_str()
            ),
            ("ns", "p", "main")
        );
        assert_eq!(cap_bytes, Some(1000 * MIB));
        assert!(matches!(
            index.attribute(&in_container(ID_MAIN), "GPU-B", None),
            Attribution::Allocated {
                cap_bytes: None,
                ..
            }
        ));
        // side has an empty entry: no allocation at all.
        let side = index.attribute(&in_container(ID_SIDE), "GPU-A", None);
        assert!(
            matches!(&side, Attribution::Unallocated { subject } if subject.container == "side"),
            "{side:?}"
        );
    }

    #[test]
    fn init_container_entries_map_to_init_containers() {
        let pod = pod(
            "ns",
            json!({keys::DEVICES_ALLOCATED: "GPU-A,NVIDIA,500,0:;GPU-A,NVIDIA,1000,30:;;"}),
        );
        let index = NodeContainers::new(&[pod], &AnnotatedAllocations, &[]);
        assert!(matches!(
            index.attribute(&in_container(ID_INIT), "GPU-A", None),
            Attribution::Allocated { cap_bytes: Some(c), .. } if c == 500 * MIB
        ));
    }

    #[test]
    fn untrusted_allocations_leave_every_container_unallocated() {
        #[derive(Debug)]
        struct TrustNothing;
        impl TrustedAllocations for TrustNothing {
            fn verified_allocation(&self, _: &Pod) -> Option<PodDevices> {
                None
            }
        }
        let index = NodeContainers::new(&[allocated_pod()], &TrustNothing, &[]);
        assert!(matches!(
            index.attribute(&in_container(ID_MAIN), "GPU-A", None),
            Attribution::Unallocated { .. }
        ));
        let garbled = pod("ns", json!({keys::DEVICES_ALLOCATED: "not,an,allocation"}));
        let index = NodeContainers::new(&[garbled], &AnnotatedAllocations, &[]);
        assert!(matches!(
            index.attribute(&in_container(ID_MAIN), "GPU-A", None),
            Attribution::Unallocated { .. }
        ));
    }

    #[test]
    fn unknown_pods_and_containers_wait_out_the_grace_period() {
        let index = NodeContainers::new(&[allocated_pod()], &AnnotatedAllocations, &[]);
        let new_container = in_container("dddddddddddd4444");
        assert!(!index.knows(&new_container));
        assert_eq!(
            index.attribute(&new_container, "GPU-A", None),
            Attribution::Skip
        );
        assert_eq!(
            index.attribute(&new_container, "GPU-A", Some(Duration::from_secs(1))),
            Attribution::Skip
        );
        assert!(matches!(
            index.attribute(&new_container, "GPU-A", Some(UNKNOWN_GRACE)),
            Attribution::Unallocated { subject } if subject.pod == "p" && subject.container.is_empty()
        ));
        let stranger = ProcessOwner::Container {
            pod_uid: "11111111-2222-3333-4444-555555555555".into(),
            container_id: ID_MAIN.into(),
        };
        assert_eq!(index.attribute(&stranger, "GPU-A", None), Attribution::Skip);
        assert!(matches!(
            index.attribute(&stranger, "GPU-A", Some(UNKNOWN_GRACE)),
            Attribution::Unallocated { subject } if subject.pod_uid.starts_with("1111") && subject.pod.is_empty()
        ));
        assert_eq!(
            index.attribute(&ProcessOwner::Host, "GPU-A", None),
            Attribution::Host
        );
        assert!(matches!(
            index.attribute(
                &ProcessOwner::Pod {
                    pod_uid: UID.into()
                },
                "GPU-A",
                None
            ),
            Attribution::Unallocated { .. }
        ));
    }

    #[test]
    fn exempt_namespaces_and_mirror_uids() {
        let index = NodeContainers::new(&[allocated_pod()], &AnnotatedAllocations, &["ns".into()]);
        assert_eq!(
            index.attribute(&in_container(ID_MAIN), "GPU-A", None),
            Attribution::Skip
        );
        let hash = "6bd2ea4e03c0b8d5e9e3a1f1d3e4c5b6";
        let mirror = pod("kube-system", json!({MIRROR_ANNOTATION: hash}));
        let index = NodeContainers::new(&[mirror], &AnnotatedAllocations, &[]);
        let owner = ProcessOwner::Container {
            pod_uid: hash.into(),
            container_id: ID_MAIN.into(),
        };
        assert!(index.knows(&owner));
        assert!(matches!(
            index.attribute(&owner, "GPU-A", None),
            Attribution::Unallocated { subject } if subject.container == "main"
        ));
    }
}
