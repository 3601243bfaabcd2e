//! Which entry of a pod's allocation annotation belongs to which container:
//! one rule, written by the scheduler and read by the node agent and the
//! scheduler's restart recovery ([`PodAllocation`]).
//!
//! The annotation (`hami.io/vgpu-devices-allocated`) has one entry per
//! container in kubelet's `Allocate` order. When any init container asks for
//! a GPU, every init container comes first (those without a GPU as empty
//! entries), then every app container; otherwise only the app containers
//! are listed. The two layouts differ in length whenever the pod has init
//! containers, so a reader tells them apart by the count alone: entries
//! equal to init + app containers (with at least one init container) means
//! init containers first, anything else means app containers only.

use k8s_openapi::api::core::v1::{Container, Pod};

use crate::allocation::{encode_pod_devices, ContainerDevice, PodDevices};

/// A pod's allocation split into its init and app containers' devices.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodAllocation {
    /// Devices per init container, one entry per init container; empty when
    /// no init container has a GPU (the annotation then lists none).
    init: PodDevices,
    /// Devices per app container.
    app: PodDevices,
}

impl PodAllocation {
    /// The scheduler's decision: devices per init container (all of them,
    /// or none) and per app container. Init entries that are all empty are
    /// not listed.
    pub fn new(init: PodDevices, app: PodDevices) -> Self {
        let init = if init.iter().all(Vec::is_empty) {
            Vec::new()
        } else {
            init
        };
        Self { init, app }
    }

    /// Reads the annotation's `entries` of `pod` by the count rule.
    pub fn read(pod: &Pod, mut entries: PodDevices) -> Self {
        let app = entries.split_off(init_entries(pod, entries.len()));
        Self { init: entries, app }
    }

    /// The entries in annotation order (init containers first when listed).
    pub fn annotated(&self) -> PodDevices {
        self.init.iter().chain(&self.app).cloned().collect()
    }

    /// The annotation value.
    pub fn encode(&self) -> String {
        encode_pod_devices(&self.annotated())
    }

    /// Devices per init container (empty when none is listed).
    pub fn init(&self) -> &[Vec<ContainerDevice>] {
        &self.init
    }

    /// Devices per app container.
    pub fn app(&self) -> &[Vec<ContainerDevice>] {
        &self.app
    }
}

/// The container that entry `entry` of a pod's allocation annotation with
/// `entries` entries belongs to; `None` when the entry names no container.
pub fn entry_container(pod: &Pod, entries: usize, entry: usize) -> Option<&Container> {
    let spec = pod.spec.as_ref()?;
    let init = spec.init_containers.as_deref().unwrap_or_default();
    let leading_init = init_entries(pod, entries);
    if entry < leading_init {
        init.get(entry)
    } else {
        spec.containers.get(entry - leading_init)
    }
}

/// How many leading entries of an annotation with `entries` entries belong
/// to init containers: all of the pod's init containers, or none.
pub fn init_entries(pod: &Pod, entries: usize) -> usize {
    let Some(spec) = pod.spec.as_ref() else {
        return 0;
    };
    let init = spec.init_containers.as_ref().map_or(0, Vec::len);
    if init > 0 && entries == init + spec.containers.len() {
        init
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn device(n: u64) -> ContainerDevice {
        ContainerDevice {
            uuid: format!("GPU-{n}"),
            vendor: "NVIDIA".into(),
            memory_mib: n,
            cores: 0,
        }
    }

    fn pod(init: usize, app: usize) -> Pod {
        let named = |prefix: &str, n: usize| -> Vec<serde_json::Value> {
            (0..n)
                .map(|i| json!({"name": format!("{prefix}{i}")}))
                .collect()
        };
        serde_json::from_value(json!({"spec": {"initContainers": named("init", init),
            "containers": named("app", app)}}))
        .expect("pod")
    }

    proptest! {
        /// What the scheduler writes, the readers split the same way, and
        /// every entry names the container it was written for.
        #[test]
        fn the_writer_and_the_readers_agree(
            init in proptest::collection::vec(proptest::option::of(1u64..9), 0..4),
            app in proptest::collection::vec(proptest::option::of(1u64..9), 1..5),
        ) {
            let to_devices = |v: &Vec<Option<u64>>| -> PodDevices {
                v.iter().map(|d| d.map(device).into_iter().collect()).collect()
            };
            let p = pod(init.len(), app.len());
            let written = PodAllocation::new(to_devices(&init), to_devices(&app));
            let annotated = written.annotated();
            let read = PodAllocation::read(&p, annotated.clone());
            prop_assert_eq!(&read, &written);
            let listed_init = written.init().len();
            for (entry, _) in annotated.iter().enumerate() {
                let name = entry_container(&p, annotated.len(), entry).map(|c| c.name.clone());
                let expected = if entry < listed_init {
                    format!("init{entry}")
                } else {
                    format!("app{}", entry - listed_init)
                };
                prop_assert_eq!(name, Some(expected));
            }
        }
    }
}
