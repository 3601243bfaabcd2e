//! Plain (non-GPU) resource accounting: CPU, memory, pod count and other
//! extended resources, read from Node allocatable and Pod requests the way
//! kube-scheduler reads them. GPU resources are left to the GPU fit.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Node, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use tessera_api::names::ResourceNames;
use tessera_api::quantity::parse_quantity;

/// Amounts of the resources a node offers and pods consume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceAmounts {
    /// CPU in millicores.
    pub cpu_millis: i64,
    /// Memory in bytes.
    pub memory_bytes: i64,
    /// Pod count.
    pub pods: i64,
    /// Other resources (extended, ephemeral-storage, hugepages), whole units.
    pub other: BTreeMap<String, i64>,
    /// The GPU count resource (`nvidia.com/gpu`) as kubelet accounts it:
    /// device IDs for pods, the device plugin's registered devices for
    /// nodes (0 when absent). Checked by `node_liveness`, not here.
    pub gpu_devices: i64,
}

impl ResourceAmounts {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Self) {
        self.cpu_millis += other.cpu_millis;
        self.memory_bytes += other.memory_bytes;
        self.pods += other.pods;
        self.gpu_devices += other.gpu_devices;
        for (name, value) in &other.other {
            *self.other.entry(name.clone()).or_default() += value;
        }
    }

    /// Subtracts `other` from `self`.
    pub fn subtract(&mut self, other: &Self) {
        self.cpu_millis -= other.cpu_millis;
        self.memory_bytes -= other.memory_bytes;
        self.pods -= other.pods;
        self.gpu_devices -= other.gpu_devices;
        for (name, value) in &other.other {
            *self.other.entry(name.clone()).or_default() -= value;
        }
    }

    fn max_with(&mut self, other: &Self) {
        self.cpu_millis = self.cpu_millis.max(other.cpu_millis);
        self.memory_bytes = self.memory_bytes.max(other.memory_bytes);
        self.gpu_devices = self.gpu_devices.max(other.gpu_devices);
        for (name, value) in &other.other {
            let entry = self.other.entry(name.clone()).or_default();
            *entry = (*entry).max(*value);
        }
    }

    fn from_list(list: &BTreeMap<String, K8sQuantity>, names: &ResourceNames) -> Self {
        let mut amounts = Self::default();
        for (name, quantity) in list {
            let Ok(parsed) = parse_quantity(&quantity.0) else {
                continue;
            };
            match name.as_str() {
                "cpu" => amounts.cpu_millis = parsed.to_millis_ceil().unwrap_or(i64::MAX),
                "memory" => amounts.memory_bytes = parsed.to_integer_ceil().unwrap_or(i64::MAX),
                "pods" => amounts.pods = parsed.to_integer_ceil().unwrap_or(i64::MAX),
                gpu if gpu == names.gpu => {
                    amounts.gpu_devices = parsed.to_integer_ceil().unwrap_or(i64::MAX);
                }
                other if names.is_gpu_resource(other) => {}
                other => {
                    amounts.other.insert(
                        other.to_owned(),
                        parsed.to_integer_ceil().unwrap_or(i64::MAX),
                    );
                }
            }
        }
        amounts
    }

    /// What a node offers (`status.allocatable`).
    pub fn node_allocatable(node: &Node, names: &ResourceNames) -> Self {
        node.status
            .as_ref()
            .and_then(|s| s.allocatable.as_ref())
            .map(|list| Self::from_list(list, names))
            .unwrap_or_default()
    }

    /// What a pod consumes: the larger of the sum of its app containers and
    /// each init container, plus overhead, plus one pod slot.
    pub fn pod_requests(pod: &Pod, names: &ResourceNames) -> Self {
        let container_requests = |c: &Container| -> Self {
            let resources = c.resources.as_ref();
            // The API server defaults requests to limits where only limits are set.
            let mut merged = resources.and_then(|r| r.limits.clone()).unwrap_or_default();
            if let Some(requests) = resources.and_then(|r| r.requests.as_ref()) {
                merged.extend(requests.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            Self::from_list(&merged, names)
        };
        let mut total = Self::default();
        if let Some(spec) = pod.spec.as_ref() {
            for container in &spec.containers {
                total.add(&container_requests(container));
            }
            for init in spec.init_containers.iter().flatten() {
                total.max_with(&container_requests(init));
            }
            if let Some(overhead) = spec.overhead.as_ref() {
                total.add(&Self::from_list(overhead, names));
            }
        }
        total.pods = 1;
        total
    }

    /// Why `request` does not fit in `allocatable` given `used`, if it doesn't.
    pub fn shortfall(allocatable: &Self, used: &Self, request: &Self) -> Option<String> {
        if request.cpu_millis > 0 && used.cpu_millis + request.cpu_millis > allocatable.cpu_millis {
            return Some("insufficient cpu".to_owned());
        }
        if request.memory_bytes > 0
            && used.memory_bytes + request.memory_bytes > allocatable.memory_bytes
        {
            return Some("insufficient memory".to_owned());
        }
        if used.pods + request.pods > allocatable.pods {
            return Some("too many pods".to_owned());
        }
        for (name, wanted) in &request.other {
            if *wanted <= 0 {
                continue;
            }
            let offered = allocatable.other.get(name).copied().unwrap_or(0);
            let taken = used.other.get(name).copied().unwrap_or(0);
            if taken + wanted > offered {
                return Some(format!("insufficient {name}"));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pod_requests_take_init_peak_and_limits_fallback() {
        let pod: Pod = serde_json::from_value(json!({"spec": {
            "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "2", "memory": "1Gi"}}}],
            "containers": [
                {"name": "a", "resources": {"requests": {"cpu": "500m", "memory": "2Gi"}}},
                {"name": "b", "resources": {"limits": {"cpu": "250m", "example.com/fpga": "1", "nvidia.com/gpumem": "1000"}}}
            ]}}))
        .expect("pod");
        let r = ResourceAmounts::pod_requests(&pod, &ResourceNames::default());
        assert_eq!(r.cpu_millis, 2000);
        assert_eq!(r.memory_bytes, 2 << 30);
        assert_eq!(r.other.get("example.com/fpga"), Some(&1));
        assert!(!r.other.contains_key("nvidia.com/gpumem"));
        assert_eq!(r.gpu_devices, 0, "no container names nvidia.com/gpu");
        let gpus: Pod = serde_json::from_value(json!({"spec": {
        "initContainers": [{"name": "i", "resources": {"limits": {"nvidia.com/gpu": "2"}}}],
        "containers": [
            {"name": "a", "resources": {"limits": {"nvidia.com/gpu": "1"}}},
            {"name": "b", "resources": {"limits": {"nvidia.com/gpu": "1"}}},
            {"name": "c", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
        ]}}))
        .expect("pod");
        let r = ResourceAmounts::pod_requests(&gpus, &ResourceNames::default());
        assert_eq!(
            r.gpu_devices, 3,
            "the app containers' sum beats the init peak"
        );
        assert!(!r.other.contains_key("nvidia.com/gpu"));
        assert_eq!(r.pods, 1);
    }

    #[test]
    fn shortfall_names_the_resource() {
        let alloc = ResourceAmounts {
            cpu_millis: 1000,
            memory_bytes: 100,
            pods: 2,
            other: BTreeMap::from([("x".into(), 1)]),
            gpu_devices: 0,
        };
        let used = ResourceAmounts {
            cpu_millis: 900,
            pods: 1,
            ..Default::default()
        };
        let mut req = ResourceAmounts {
            cpu_millis: 200,
            pods: 1,
            ..Default::default()
        };
        assert_eq!(
            ResourceAmounts::shortfall(&alloc, &used, &req).as_deref(),
            Some("insufficient cpu")
        );
        req.cpu_millis = 100;
        assert_eq!(ResourceAmounts::shortfall(&alloc, &used, &req), None);
        req.other.insert("x".into(), 2);
        assert_eq!(
            ResourceAmounts::shortfall(&alloc, &used, &req).as_deref(),
            Some("insufficient x")
        );
        req.other.clear();
        let full = ResourceAmounts { pods: 2, ..used };
        assert_eq!(
            ResourceAmounts::shortfall(&alloc, &full, &req).as_deref(),
            Some("too many pods")
        );
    }
}
