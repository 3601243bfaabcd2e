//! The GPU request model: what a Pod asks for, read from its containers'
//! resources (limits, falling back to requests) and its policy annotations,
//! validated with messages a person can act on. [`ContainerGpuRequest::resolve`]
//! applies the configured defaults the same way for the webhook and the
//! scheduler. [`annotated_container`] maps an entry of the allocation
//! annotation back to its container (init containers first when listed).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;

use crate::config::RequestDefaults;
use crate::error::RequestError;
use crate::names::{pod as keys, ResourceNames};
use crate::policy::{GpuPolicy, NodePolicy};
use crate::quantity::parse_quantity;
use crate::vgpu_mode::VgpuMode;

/// How much memory per card a container asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemoryRequest {
    /// Neither `gpumem` nor `gpumem-percentage` was given.
    Unspecified,
    /// A fixed amount in MiB.
    MiB(u64),
    /// A percentage (1–100) of each card's memory.
    Percent(u32),
}

impl MemoryRequest {
    /// The MiB this request takes on a card with `card_mib` of memory.
    pub fn on_card(&self, card_mib: u64) -> u64 {
        match *self {
            Self::Unspecified => card_mib,
            Self::MiB(mib) => mib,
            Self::Percent(percent) => card_mib * u64::from(percent) / 100,
        }
    }
}

/// One container's GPU request as written (before defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerGpuRequest {
    /// Container name.
    pub name: String,
    /// `nvidia.com/gpu`, if given.
    pub count: Option<u32>,
    /// `nvidia.com/gpumem` or `nvidia.com/gpumem-percentage`.
    pub memory: MemoryRequest,
    /// `nvidia.com/gpucores`, if given.
    pub cores: Option<u32>,
    /// `nvidia.com/priority`, if given.
    pub priority: Option<u32>,
}

/// One container's GPU request with defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResolvedGpuRequest {
    /// Distinct cards.
    pub count: u32,
    /// Memory per card (never [`MemoryRequest::Unspecified`]).
    pub memory: MemoryRequest,
    /// Percent of each card's compute; 100 = the card exclusively.
    pub cores: u32,
}

impl ContainerGpuRequest {
    /// Whether the container asks for any GPU resource.
    pub fn asks_for_gpu(&self) -> bool {
        self.count.is_some_and(|c| c > 0)
            || self.memory != MemoryRequest::Unspecified
            || self.cores.is_some()
    }

    /// Applies defaults as HAMi's webhook does: a container that gives only
    /// memory or cores gets the default card count; no memory means the
    /// default memory (0 = the whole card); a whole card by default with no
    /// cores given is exclusive (cores 100). `None` when it asks for no GPU.
    pub fn resolve(&self, defaults: &RequestDefaults) -> Option<ResolvedGpuRequest> {
        if !self.asks_for_gpu() {
            return None;
        }
        let count = self.count.unwrap_or(defaults.gpu_count);
        let (memory, whole_card_by_default) = match self.memory {
            MemoryRequest::Unspecified if defaults.memory_mib == 0 => {
                (MemoryRequest::Percent(100), true)
            }
            MemoryRequest::Unspecified => (MemoryRequest::MiB(defaults.memory_mib), false),
            given => (given, false),
        };
        let cores = match self.cores {
            Some(cores) => cores,
            None if whole_card_by_default => 100,
            None => defaults.cores,
        };
        Some(ResolvedGpuRequest {
            count,
            memory,
            cores,
        })
    }
}

/// The pod's placement preferences, from its annotations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodGpuPolicy {
    /// `nvidia.com/use-gputype`, lowercased.
    pub use_types: Vec<String>,
    /// `nvidia.com/nouse-gputype`, lowercased.
    pub avoid_types: Vec<String>,
    /// `nvidia.com/use-gpuuuid`.
    pub use_uuids: Vec<String>,
    /// `nvidia.com/nouse-gpuuuid`.
    pub avoid_uuids: Vec<String>,
    /// `nvidia.com/numa-bind`.
    pub numa_bind: bool,
    /// `hami.io/gpu-scheduler-policy`.
    pub gpu_policy: Option<GpuPolicy>,
    /// `hami.io/node-scheduler-policy`.
    pub node_policy: Option<NodePolicy>,
    /// `nvidia.com/vgpu-mode`: only cards in a mode it names.
    pub vgpu_mode: Option<VgpuMode>,
}

impl PodGpuPolicy {
    /// Whether a card of `device_type` (e.g. `NVIDIA-Tesla T4`) is allowed.
    pub fn allows_type(&self, device_type: &str) -> bool {
        let device_type = device_type.to_ascii_lowercase();
        (self.use_types.is_empty()
            || self
                .use_types
                .iter()
                .any(|t| device_type.contains(t.as_str())))
            && !self
                .avoid_types
                .iter()
                .any(|t| device_type.contains(t.as_str()))
    }

    /// Whether the card `uuid` is allowed.
    pub fn allows_uuid(&self, uuid: &str) -> bool {
        (self.use_uuids.is_empty() || self.use_uuids.iter().any(|u| u.eq_ignore_ascii_case(uuid)))
            && !self
                .avoid_uuids
                .iter()
                .any(|u| u.eq_ignore_ascii_case(uuid))
    }
}

/// Everything a pod asks of the GPU layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodGpuRequest {
    /// App containers, in pod order.
    pub containers: Vec<ContainerGpuRequest>,
    /// Init containers, in pod order.
    pub init_containers: Vec<ContainerGpuRequest>,
    /// Placement preferences.
    pub policy: PodGpuPolicy,
}

impl PodGpuRequest {
    /// Reads and validates a pod's GPU request.
    pub fn from_pod(pod: &Pod, names: &ResourceNames) -> Result<Self, RequestError> {
        let spec = pod.spec.as_ref();
        let read = |containers: Option<&Vec<Container>>| -> Result<Vec<ContainerGpuRequest>, RequestError> {
            containers
                .map(|list| list.iter().map(|c| container_request(c, names)).collect())
                .unwrap_or_else(|| Ok(Vec::new()))
        };
        let containers = read(spec.map(|s| &s.containers))?;
        let init_containers = read(spec.and_then(|s| s.init_containers.as_ref()))?;
        let policy = pod_policy(pod.metadata.annotations.as_ref())?;
        Ok(Self {
            containers,
            init_containers,
            policy,
        })
    }

    /// Whether any container or init container asks for a GPU.
    pub fn asks_for_gpu(&self) -> bool {
        self.containers
            .iter()
            .chain(&self.init_containers)
            .any(ContainerGpuRequest::asks_for_gpu)
    }
}

/// Reads one container's GPU request (limits first, then requests).
pub fn container_request(
    container: &Container,
    names: &ResourceNames,
) -> Result<ContainerGpuRequest, RequestError> {
    let resources = container.resources.as_ref();
    let limits = resources.and_then(|r| r.limits.as_ref());
    let requests = resources.and_then(|r| r.requests.as_ref());
    let lookup = |name: &str| -> Option<&str> {
        limits
            .and_then(|l| l.get(name))
            .or_else(|| requests.and_then(|r| r.get(name)))
            .map(|q: &K8sQuantity| q.0.as_str())
    };
    let bad = |resource: &str, value: &str, reason: String| RequestError::Resource {
        container: container.name.clone(),
        resource: resource.to_owned(),
        value: value.to_owned(),
        reason,
    };
    let whole =
        |resource: &str, range: (i64, i64), what: &str| -> Result<Option<u32>, RequestError> {
            let Some(value) = lookup(resource) else {
                return Ok(None);
            };
            let expected = format!("{what} from {} to {}", range.0, range.1);
            let parsed = parse_quantity(value).map_err(|e| {
                bad(
                    resource,
                    value,
                    format!("is not a number ({}); write {expected}", e.reason),
                )
            })?;
            let number = parsed.to_integer().ok_or_else(|| {
                bad(
                    resource,
                    value,
                    format!("is not a whole number; write {expected}"),
                )
            })?;
            if !(range.0..=range.1).contains(&number) {
                return Err(bad(
                    resource,
                    value,
                    format!("is out of range; write {expected}"),
                ));
            }
            Ok(u32::try_from(number).ok())
        };

    let count = whole(&names.gpu, (0, 128), "a whole number of cards")?;
    let cores = whole(
        &names.cores,
        (0, 100),
        "a whole percentage of the card's compute",
    )?;
    let priority = whole(&names.priority, (0, 1), "0 (high) or 1 (low), a priority")?;
    let percentage = whole(
        &names.memory_percentage,
        (1, 100),
        "a whole percentage of the card's memory",
    )?;
    let memory_mib = match lookup(&names.memory) {
        None => None,
        Some(value) => {
            let parsed = parse_quantity(value).map_err(|e| {
                bad(&names.memory, value, format!("is not a quantity ({}); write MiB as a whole number, e.g. 7500, or a size such as 8Gi", e.reason))
            })?;
            if parsed.is_negative() {
                return Err(bad(
                    &names.memory,
                    value,
                    "is negative; write MiB as a whole number, e.g. 7500".into(),
                ));
            }
            let mib = parsed.to_mebibytes().ok_or_else(|| {
                bad(
                    &names.memory,
                    value,
                    "is not a whole number of MiB; write e.g. 7500 or 8Gi".into(),
                )
            })?;
            (mib > 0).then_some(mib)
        }
    };
    let memory = match (memory_mib, percentage) {
        (Some(mib), _) => MemoryRequest::MiB(mib),
        (None, Some(percent)) => MemoryRequest::Percent(percent),
        (None, None) => MemoryRequest::Unspecified,
    };
    let request = ContainerGpuRequest {
        name: container.name.clone(),
        count,
        memory,
        cores,
        priority,
    };
    if count == Some(0) && (memory != MemoryRequest::Unspecified || cores.is_some_and(|c| c > 0)) {
        return Err(bad(
            &names.gpu,
            "0",
            format!("asks for no card but the container sets {} or {}; set {} to 1 or more, or remove them", names.memory, names.cores, names.gpu),
        ));
    }
    Ok(request)
}

/// The container of an allocation-annotation entry (see
/// [`crate::pod_allocation`], which owns the rule).
pub fn annotated_container(pod: &Pod, entries: usize, entry: usize) -> Option<&Container> {
    crate::pod_allocation::entry_container(pod, entries, entry)
}

/// How many leading entries belong to init containers (see
/// [`crate::pod_allocation`], which owns the rule).
pub fn annotated_init_entries(pod: &Pod, entries: usize) -> usize {
    crate::pod_allocation::init_entries(pod, entries)
}

fn comma_list(value: &str, lowercase: bool) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            if lowercase {
                s.to_ascii_lowercase()
            } else {
                s.to_owned()
            }
        })
        .collect()
}

fn pod_policy(
    annotations: Option<&BTreeMap<String, String>>,
) -> Result<PodGpuPolicy, RequestError> {
    let Some(annotations) = annotations else {
        return Ok(PodGpuPolicy::default());
    };
    let get = |key: &str| annotations.get(key).map(String::as_str);
    let numa_bind = match get(keys::NUMA_BIND).map(|v| v.trim().to_ascii_lowercase()) {
        None => false,
        Some(v) if v == "true" => true,
        Some(v) if v == "false" || v.is_empty() => false,
        Some(v) => {
            return Err(RequestError::Annotation {
                key: keys::NUMA_BIND,
                value: v,
                reason: "is not a boolean; write true or false",
            })
        }
    };
    let gpu_policy = get(keys::GPU_SCHEDULER_POLICY)
        .map(|v| {
            v.parse::<GpuPolicy>()
                .map_err(|source| RequestError::Policy {
                    key: keys::GPU_SCHEDULER_POLICY,
                    source,
                })
        })
        .transpose()?;
    let node_policy = get(keys::NODE_SCHEDULER_POLICY)
        .map(|v| {
            v.parse::<NodePolicy>()
                .map_err(|source| RequestError::Policy {
                    key: keys::NODE_SCHEDULER_POLICY,
                    source,
                })
        })
        .transpose()?;
    let vgpu_mode = get(keys::VGPU_MODE)
        .map(|v| {
            v.parse::<VgpuMode>()
                .map_err(|source| RequestError::VgpuMode {
                    key: keys::VGPU_MODE,
                    source,
                })
        })
        .transpose()?;
    Ok(PodGpuPolicy {
        use_types: get(keys::USE_GPU_TYPE)
            .map(|v| comma_list(v, true))
            .unwrap_or_default(),
        avoid_types: get(keys::NOUSE_GPU_TYPE)
            .map(|v| comma_list(v, true))
            .unwrap_or_default(),
        use_uuids: get(keys::USE_GPU_UUID)
            .map(|v| comma_list(v, false))
            .unwrap_or_default(),
        avoid_uuids: get(keys::NOUSE_GPU_UUID)
            .map(|v| comma_list(v, false))
            .unwrap_or_default(),
        numa_bind,
        gpu_policy,
        node_policy,
        vgpu_mode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).expect("valid pod")
    }

    fn one_container(limits: serde_json::Value) -> Pod {
        pod(
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "main", "resources": {"limits": limits}}]}}),
        )
    }

    fn request(limits: serde_json::Value) -> Result<ContainerGpuRequest, RequestError> {
        PodGpuRequest::from_pod(&one_container(limits), &ResourceNames::default())
            .map(|r| r.containers[0].clone())
    }

    #[test]
    fn reads_memory_in_mib_and_sizes() {
        let r = request(json!({"nvidia.com/gpumem": "7500"})).expect("ok");
        assert_eq!(r.memory, MemoryRequest::MiB(7500));
        assert_eq!(r.count, None);
        let r = request(json!({"nvidia.com/gpumem": "8Gi", "nvidia.com/gpu": "2"})).expect("ok");
        assert_eq!(r.memory, MemoryRequest::MiB(8192));
        assert_eq!(r.count, Some(2));
        let r = request(json!({"nvidia.com/gpumem-percentage": "45", "nvidia.com/gpucores": "30"}))
            .expect("ok");
        assert_eq!(r.memory, MemoryRequest::Percent(45));
        assert_eq!(r.cores, Some(30));
    }

    #[test]
    fn limits_fall_back_to_requests() {
        let p = pod(json!({"spec": {"containers": [{"name": "c", "resources": {
            "requests": {"nvidia.com/gpumem": "1000", "nvidia.com/gpucores": "20"},
            "limits": {"nvidia.com/gpumem": "2000"}}}]}}));
        let r = PodGpuRequest::from_pod(&p, &ResourceNames::default()).expect("ok");
        assert_eq!(r.containers[0].memory, MemoryRequest::MiB(2000));
        assert_eq!(r.containers[0].cores, Some(20));
    }

    #[test]
    fn out_of_range_values_name_container_value_and_range() {
        let cases = [
            (
                json!({"nvidia.com/gpumem-percentage": "150"}),
                "from 1 to 100",
            ),
            (
                json!({"nvidia.com/gpumem-percentage": "0"}),
                "from 1 to 100",
            ),
            (json!({"nvidia.com/gpucores": "101"}), "from 0 to 100"),
            (json!({"nvidia.com/gpu": "1.5"}), "not a whole number"),
            (json!({"nvidia.com/gpu": "-1"}), "out of range"),
            (json!({"nvidia.com/gpumem": "-7500"}), "negative"),
            (json!({"nvidia.com/gpumem": "1.5"}), "whole number of MiB"),
            (json!({"nvidia.com/gpumem": "lots"}), "not a quantity"),
            (json!({"nvidia.com/priority": "5"}), "0 (high) or 1 (low)"),
            (
                json!({"nvidia.com/gpu": "0", "nvidia.com/gpumem": "10"}),
                "asks for no card",
            ),
        ];
        for (limits, expected) in cases {
            let message = request(limits.clone())
                .expect_err(&limits.to_string())
                .to_string();
            assert!(message.contains("container `main`"), "{message}");
            assert!(message.contains(expected), "{limits}: {message}");
        }
    }

    #[test]
    fn resolve_applies_hami_defaults() {
        let defaults = RequestDefaults::default();
        let only_mem = request(json!({"nvidia.com/gpumem": "7500"}))
            .expect("ok")
            .resolve(&defaults)
            .expect("gpu");
        assert_eq!(
            only_mem,
            ResolvedGpuRequest {
                count: 1,
                memory: MemoryRequest::MiB(7500),
                cores: 0
            }
        );
        let plain = request(json!({"nvidia.com/gpu": "1"}))
            .expect("ok")
            .resolve(&defaults)
            .expect("gpu");
        assert_eq!(
            plain,
            ResolvedGpuRequest {
                count: 1,
                memory: MemoryRequest::Percent(100),
                cores: 100
            }
        );
        let with_default_mem = RequestDefaults {
            memory_mib: 4096,
            ..defaults.clone()
        };
        let plain = request(json!({"nvidia.com/gpu": "1"}))
            .expect("ok")
            .resolve(&with_default_mem)
            .expect("gpu");
        assert_eq!(plain.memory, MemoryRequest::MiB(4096));
        assert_eq!(plain.cores, 0);
        assert!(request(json!({"cpu": "1"}))
            .expect("ok")
            .resolve(&defaults)
            .is_none());
    }

    #[test]
    fn policy_annotations() {
        let p = pod(json!({"metadata": {"annotations": {
            "nvidia.com/use-gputype": "A10G, T4",
            "nvidia.com/nouse-gpuuuid": "GPU-bad",
            "nvidia.com/numa-bind": "true",
            "hami.io/gpu-scheduler-policy": "binpack",
            "hami.io/node-scheduler-policy": "spread"}}, "spec": {"containers": []}}));
        let r = PodGpuRequest::from_pod(&p, &ResourceNames::default()).expect("ok");
        assert!(r.policy.allows_type("NVIDIA-NVIDIA A10G"));
        assert!(r.policy.allows_type("NVIDIA-Tesla T4"));
        assert!(!r.policy.allows_type("NVIDIA-H100 80GB HBM3"));
        assert!(!r.policy.allows_uuid("GPU-BAD"));
        assert!(r.policy.allows_uuid("GPU-good"));
        assert!(r.policy.numa_bind);
        assert_eq!(r.policy.gpu_policy, Some(GpuPolicy::BINPACK));
        assert_eq!(r.policy.node_policy, Some(NodePolicy::Spread));
        assert!(!r.asks_for_gpu());

        let bad = pod(
            json!({"metadata": {"annotations": {"hami.io/gpu-scheduler-policy": "fastest"}}, "spec": {"containers": []}}),
        );
        let err = PodGpuRequest::from_pod(&bad, &ResourceNames::default()).expect_err("bad policy");
        assert!(err.to_string().contains("`fastest`"), "{err}");
        assert!(err.to_string().contains("binpack,numa"), "{err}");
    }

    #[test]
    fn hami_policy_chains_and_vgpu_mode() {
        let read = |annotations: serde_json::Value| {
            PodGpuRequest::from_pod(
                &pod(json!({"metadata": {"annotations": annotations}, "spec": {"containers": []}})),
                &ResourceNames::default(),
            )
        };
        let chained = read(json!({
            "hami.io/gpu-scheduler-policy": "binpack,numa",
            "nvidia.com/vgpu-mode": "hami-core"}))
        .expect("HAMi accepts both");
        let policy = chained.policy.gpu_policy.expect("set");
        assert_eq!(policy.to_string(), "binpack,numa");
        assert!(chained.policy.vgpu_mode.expect("set").allows("hami-core"));
        let mutex = read(json!({"hami.io/gpu-scheduler-policy": "mutex"})).expect("mutex");
        assert!(mutex.policy.gpu_policy.expect("set").mutex);

        let mig = read(json!({"nvidia.com/vgpu-mode": "mig"})).expect_err("no MIG");
        assert!(mig.to_string().contains("nvidia.com/vgpu-mode"), "{mig}");
        assert!(mig.to_string().contains("hami-core"), "{mig}");
        let node_list = read(json!({"hami.io/node-scheduler-policy": "binpack,spread"}))
            .expect_err("node policy is one name");
        assert!(node_list
            .to_string()
            .contains("hami.io/node-scheduler-policy"));
    }

    #[test]
    fn annotation_entries_name_init_containers_first_only_when_listed() {
        let p = pod(json!({"spec": {
            "initContainers": [{"name": "fetch"}, {"name": "warm"}],
            "containers": [{"name": "main"}, {"name": "side"}]}}));
        let name =
            |entries, entry| annotated_container(&p, entries, entry).map(|c| c.name.as_str());
        // Init containers listed: init, init, app, app.
        assert_eq!(name(4, 0), Some("fetch"));
        assert_eq!(name(4, 1), Some("warm"));
        assert_eq!(name(4, 2), Some("main"));
        assert_eq!(name(4, 3), Some("side"));
        assert_eq!(name(4, 4), None);
        // Only app containers listed.
        assert_eq!(name(2, 0), Some("main"));
        assert_eq!(name(2, 1), Some("side"));
        assert_eq!(name(2, 2), None);

        let no_init = pod(json!({"spec": {"containers": [{"name": "main"}]}}));
        assert_eq!(
            annotated_container(&no_init, 1, 0).map(|c| c.name.as_str()),
            Some("main")
        );
        assert!(annotated_container(&no_init, 1, 1).is_none());
        assert!(annotated_container(&pod(json!({})), 1, 0).is_none());
    }

    #[test]
    fn memory_on_card() {
        assert_eq!(MemoryRequest::Percent(45).on_card(23028), 10362);
        assert_eq!(MemoryRequest::MiB(7500).on_card(15360), 7500);
    }
}
