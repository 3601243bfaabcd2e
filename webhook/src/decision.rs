//! The admission decision, a pure function of the Pod, its namespace's
//! labels (when known) and the config: allow it untouched, allow it with a
//! JSON Patch that sets our scheduler and fills in HAMi's defaults, or deny
//! it with a message a person can act on. No I/O; the server
//! ([`crate::server`]) and the `tessera simulate` CLI call the same code.
//!
//! Validation and defaulting are the shared request model's
//! ([`PodGpuRequest::from_pod`], [`ContainerGpuRequest::resolve`]), so the
//! webhook and the scheduler can never disagree on what a pod asks for.
//!
//! What a GPU pod may not write itself: the scheduler's allocation
//! annotations (`hami.io/vgpu-*`, `hami.io/bind-*`, any `tessera.io/*`),
//! and the environment the node agent owns ([`crate::control_env`]), in
//! `env` or through an `envFrom` without a safe prefix. The webhook writes
//! only the environment HAMi's chart values ask for
//! ([`crate::env_defaults`]); the node agent sets the caps and
//! `CUDA_TASK_PRIORITY` at Allocate.

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation};
use k8s_openapi::api::core::v1::{Container, EnvFromSource, EnvVar, Pod};
use serde_json::Value;
use tessera_api::config::Config;
use tessera_api::container_env::VISIBLE_DEVICES;
use tessera_api::error::RequestError;
use tessera_api::names::{self, ResourceNames};
use tessera_api::request::{ContainerGpuRequest, MemoryRequest, PodGpuRequest};
use thiserror::Error;

use crate::control_env::{env_from_prefix_is_safe, ControlVariable};
use crate::env_defaults::{
    add_env_operations, check_core_policy, gpu_container_env, gpu_less_container_env,
    LooserCorePolicy, OverwriteEnv, NO_VISIBLE_DEVICES,
};

/// Every pod annotation under this prefix is written by Tessera itself
/// (the scheduler or the node agent), never by the pod's author.
pub const TESSERA_ANNOTATION_PREFIX: &str = "tessera.io/";

/// The `spec.schedulerName` the API server fills in when a pod names none.
pub const DEFAULT_SCHEDULER: &str = "default-scheduler";

/// What the webhook answers for one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum AdmissionDecision {
    /// Admit the pod, changed by `patch` when there is one.
    Allowed {
        /// Why the pod is admitted as it is (or changed).
        reason: AllowReason,
        /// The changes to make; `None` when the pod is admitted untouched.
        patch: Option<Patch>,
    },
    /// Refuse the pod.
    Denied(Denial),
}

impl AdmissionDecision {
    fn untouched(reason: AllowReason) -> Self {
        Self::Allowed {
            reason,
            patch: None,
        }
    }

    /// Whether the pod is admitted.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Self::Allowed { .. })
    }

    /// The patch, when the pod is admitted with changes.
    pub fn patch(&self) -> Option<&Patch> {
        match self {
            Self::Allowed { patch, .. } => patch.as_ref(),
            Self::Denied(_) => None,
        }
    }
}

/// Why a pod was admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowReason {
    /// No container asks for a GPU resource: not ours.
    NoGpuRequest,
    /// The pod or its namespace carries `hami.io/webhook: ignore`.
    OptedOut,
    /// The pod names another scheduler; that scheduler owns it.
    OtherScheduler,
    /// A GPU pod, patched (scheduler name and/or defaults).
    Mutated,
    /// A GPU pod that already says everything we would have written.
    AlreadyComplete,
}

impl AllowReason {
    /// A short label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoGpuRequest => "no_gpu_request",
            Self::OptedOut => "opted_out",
            Self::OtherScheduler => "other_scheduler",
            Self::Mutated => "mutated",
            Self::AlreadyComplete => "already_complete",
        }
    }
}

/// Why a pod was refused. Every message names what is wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Denial {
    /// A GPU resource value or policy annotation is invalid.
    #[error("invalid GPU request: {0}")]
    InvalidRequest(#[from] RequestError),
    /// `gpumem` is larger than any card in the cluster.
    #[error("container `{container}`: {resource} = `{value}` asks for {mib} MiB per card, but the largest card in this cluster has {max_mib} MiB; write a value from 1 to {max_mib}, or use {percentage_resource}")]
    MemoryAboveLargestCard {
        /// Container name.
        container: String,
        /// The memory resource name.
        resource: String,
        /// The value as written.
        value: String,
        /// The value in MiB.
        mib: u64,
        /// The configured largest card.
        max_mib: u64,
        /// The percentage resource name, the alternative to suggest.
        percentage_resource: String,
    },
    /// A privileged container asks for GPU resources.
    #[error("container `{container}` is privileged and asks for GPU resources; a privileged container sees every GPU on the node and escapes the memory and compute caps, so remove `securityContext.privileged` or the GPU resources")]
    PrivilegedGpuContainer {
        /// Container name.
        container: String,
    },
    /// The pod carries annotations only the scheduler may write.
    #[error("the pod sets the scheduler-owned annotation(s) {}; these record a GPU allocation and only the scheduler may write them, so remove them from the pod", keys.join(", "))]
    ForgedAllocation {
        /// The offending keys: the scheduler's `hami.io/*` keys in the order
        /// of its list, then any `tessera.io/*` keys in key order.
        keys: Vec<String>,
    },
    /// A container sets, in its `env`, a variable the node agent owns.
    #[error("container `{container}` sets `{variable}` in its env, but {kind}, so a pod may not set it: {instead}")]
    ControlVariableSet {
        /// Container name.
        container: String,
        /// The variable as written.
        variable: String,
        /// What the variable controls.
        kind: ControlVariable,
        /// What to do instead, in the cluster's resource names.
        instead: String,
    },
    /// A GPU container takes variables from a ConfigMap or Secret whose keys
    /// could name a variable the node agent owns.
    #[error("container `{container}` takes its env from {origin} {}; the keys of a ConfigMap or Secret are not known at admission, and one of them could override a variable the node agent sets (CUDA_DEVICE_MEMORY_LIMIT*, CUDA_DEVICE_SM_LIMIT*, CUDA_DEVICE_MEMORY_SHARED_CACHE, CUDA_TASK_PRIORITY, NVIDIA_VISIBLE_DEVICES, CUDA_DISABLE_CONTROL, TESSERA_*), so give that envFrom entry a `prefix` such as `APP_`, or list the keys you need under `env` with `valueFrom`", prefix.as_deref().map_or_else(|| "with no prefix".to_owned(), |p| format!("with the prefix `{p}`, which could produce one of Tessera's variables")))]
    EnvFromWithoutSafePrefix {
        /// Container name.
        container: String,
        /// Where the variables come from: ``ConfigMap `name` `` or ``Secret `name` ``.
        origin: String,
        /// The prefix as written, `None` when there is none.
        prefix: Option<String>,
    },
    /// A GPU container sets a core policy looser than the cluster's.
    #[error(transparent)]
    LooserCorePolicy(#[from] LooserCorePolicy),
    /// The pod's own GPU request is more than its namespace's quota allows
    /// (see [`crate::gpu_quota`]).
    #[error("{0}")]
    QuotaExceeded(#[from] tessera_api::gpu_quota::QuotaExceeded),
    /// The pod is already bound to a node, bypassing GPU scheduling.
    #[error("the pod sets spec.nodeName = `{node}` and asks for GPU resources; a pod placed by hand bypasses GPU placement and gets no card slice, so remove spec.nodeName (use a nodeSelector or node affinity to choose nodes)")]
    NodeNameSet {
        /// The node named.
        node: String,
    },
}

impl Denial {
    /// The HTTP status code the denial carries in the AdmissionResponse:
    /// 422 for values that are out of range, 403 for requests that are
    /// refused whatever their values.
    pub fn code(&self) -> u16 {
        match self {
            Self::InvalidRequest(_) | Self::MemoryAboveLargestCard { .. } => 422,
            Self::PrivilegedGpuContainer { .. }
            | Self::ForgedAllocation { .. }
            | Self::ControlVariableSet { .. }
            | Self::EnvFromWithoutSafePrefix { .. }
            | Self::LooserCorePolicy(_)
            | Self::NodeNameSet { .. }
            | Self::QuotaExceeded(_) => 403,
        }
    }

    /// The Kubernetes `Status.reason` matching [`Denial::code`].
    pub fn status_reason(&self) -> &'static str {
        match self.code() {
            422 => "Invalid",
            _ => "Forbidden",
        }
    }
}

/// Decides what to do with a Pod at CREATE.
///
/// `namespace_labels` are the labels of the pod's namespace when the caller
/// knows them (the AdmissionReview does not carry them; in a cluster the
/// webhook configuration's `namespaceSelector` keeps opted-out namespaces
/// away from the webhook).
pub fn admit(
    pod: &Pod,
    namespace_labels: Option<&BTreeMap<String, String>>,
    config: &Config,
) -> AdmissionDecision {
    let names = &config.resources;
    if opted_out(pod.metadata.labels.as_ref()) || opted_out(namespace_labels) {
        return AdmissionDecision::untouched(AllowReason::OptedOut);
    }
    if !mentions_gpu_resource(pod, names) {
        return gpu_less_pod(pod, config);
    }
    let spec = pod.spec.as_ref();
    let scheduler = spec.and_then(|s| s.scheduler_name.as_deref());
    let scheduler_is_ours = scheduler == Some(config.scheduler_name.as_str());
    if let Some(other) = scheduler {
        if !other.is_empty() && other != DEFAULT_SCHEDULER && !scheduler_is_ours {
            return AdmissionDecision::untouched(AllowReason::OtherScheduler);
        }
    }
    let request = match PodGpuRequest::from_pod(pod, names) {
        Ok(request) => request,
        Err(error) => return AdmissionDecision::Denied(error.into()),
    };
    if !request.asks_for_gpu() {
        return gpu_less_pod(pod, config);
    }
    if let Some(denial) = forged_allocation(pod) {
        return AdmissionDecision::Denied(denial);
    }
    if let Some(denial) = control_variable_denial(pod, &request, config) {
        return AdmissionDecision::Denied(denial);
    }
    if let Some(node) = spec
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
    {
        return AdmissionDecision::Denied(Denial::NodeNameSet {
            node: node.to_owned(),
        });
    }

    let mut operations = Vec::new();
    let overwrite = OverwriteEnv::for_pod(pod, config);
    let containers = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
    let init_containers = spec
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or_default();
    for (field, list, requests) in [
        ("initContainers", init_containers, &request.init_containers),
        ("containers", containers, &request.containers),
    ] {
        for (index, (container, gpu)) in list.iter().zip(requests).enumerate() {
            if let Err(denial) =
                container_operations(field, index, container, gpu, config, &mut operations)
            {
                return AdmissionDecision::Denied(denial);
            }
            let vars = if gpu.resolve(&config.defaults).is_some() {
                let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
                if let Err(looser) = check_core_policy(container, config, namespace) {
                    return AdmissionDecision::Denied(looser.into());
                }
                gpu_container_env(container, config)
            } else {
                gpu_less_container_env(container, &overwrite)
            };
            add_env_operations(field, index, container, vars, &mut operations);
        }
    }
    if let Some(operation) = runtime_class_operation(pod, config) {
        operations.push(operation);
    }
    if !scheduler_is_ours {
        let path = PointerBuf::from_tokens(["spec", "schedulerName"]);
        let value = Value::String(config.scheduler_name.clone());
        operations.push(match scheduler {
            Some(_) => PatchOperation::Replace(ReplaceOperation { path, value }),
            None => PatchOperation::Add(AddOperation { path, value }),
        });
    }
    if operations.is_empty() {
        AdmissionDecision::untouched(AllowReason::AlreadyComplete)
    } else {
        AdmissionDecision::Allowed {
            reason: AllowReason::Mutated,
            patch: Some(Patch(operations)),
        }
    }
}

/// A pod that asks for no GPU: untouched, unless `overwriteEnv` hides the
/// cards from its containers.
fn gpu_less_pod(pod: &Pod, config: &Config) -> AdmissionDecision {
    let mut operations = Vec::new();
    let overwrite = OverwriteEnv::for_pod(pod, config);
    if let Some(spec) = pod.spec.as_ref() {
        let init = spec.init_containers.as_deref().unwrap_or_default();
        for (field, list) in [("initContainers", init), ("containers", &spec.containers)] {
            for (index, container) in list.iter().enumerate() {
                let vars = gpu_less_container_env(container, &overwrite);
                add_env_operations(field, index, container, vars, &mut operations);
            }
        }
    }
    AdmissionDecision::Allowed {
        reason: AllowReason::NoGpuRequest,
        patch: (!operations.is_empty()).then_some(Patch(operations)),
    }
}

/// Runs [`admit`] and applies its patch: the Pod as the API server would
/// store it. `tessera simulate` uses this to default pods exactly as the
/// webhook does.
pub fn mutate_pod(pod: &Pod, config: &Config) -> Result<Pod, MutateError> {
    match admit(pod, None, config) {
        AdmissionDecision::Denied(denial) => Err(MutateError::Denied(denial)),
        AdmissionDecision::Allowed { patch: None, .. } => Ok(pod.clone()),
        AdmissionDecision::Allowed {
            patch: Some(patch), ..
        } => {
            let mut document = serde_json::to_value(pod).map_err(MutateError::Serialize)?;
            json_patch::patch(&mut document, &patch).map_err(|e| MutateError::Patch {
                reason: e.to_string(),
            })?;
            serde_json::from_value(document).map_err(MutateError::Serialize)
        }
    }
}

/// Why [`mutate_pod`] produced no Pod.
#[derive(Debug, Error)]
pub enum MutateError {
    /// The webhook would refuse the pod.
    #[error("the webhook denies this pod: {0}")]
    Denied(Denial),
    /// The pod could not be turned into JSON and back (a bug; please report it).
    #[error("the pod could not be converted to or from JSON ({0}); this is a bug in Tessera, please report it with the pod")]
    Serialize(#[source] serde_json::Error),
    /// The patch did not apply (a bug; please report it).
    #[error("the webhook's patch does not apply to the pod ({reason}); this is a bug in Tessera, please report it with the pod")]
    Patch {
        /// The json-patch error.
        reason: String,
    },
}

/// Whether any container or init container names one of our resources in
/// its limits or requests, whatever the value.
pub fn mentions_gpu_resource(pod: &Pod, names: &ResourceNames) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter_map(|c| c.resources.as_ref())
        .flat_map(|r| r.limits.iter().chain(r.requests.iter()))
        .flat_map(|map| map.keys())
        .any(|key| names.is_gpu_resource(key))
}

fn opted_out(labels: Option<&BTreeMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get(names::WEBHOOK_IGNORE_LABEL))
        .is_some_and(|v| v == names::WEBHOOK_IGNORE_VALUE)
}

fn forged_allocation(pod: &Pod) -> Option<Denial> {
    let annotations = pod.metadata.annotations.as_ref()?;
    let keys: Vec<String> = names::allocation::SCHEDULER_OWNED
        .iter()
        .filter(|key| annotations.contains_key(**key))
        .map(|key| (*key).to_owned())
        .chain(
            annotations
                .keys()
                .filter(|key| key.starts_with(TESSERA_ANNOTATION_PREFIX))
                .cloned(),
        )
        .collect();
    (!keys.is_empty()).then_some(Denial::ForgedAllocation { keys })
}

/// The first variable the node agent owns that a container of this GPU pod
/// sets: by name in `env` (every container and init container), or
/// possibly through an `envFrom` without a safe prefix (containers that
/// ask for a GPU; the others get no card to cap).
fn control_variable_denial(pod: &Pod, request: &PodGpuRequest, config: &Config) -> Option<Denial> {
    let spec = pod.spec.as_ref()?;
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let may_opt_out = config.may_opt_out_of_control(namespace);
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .zip(&request.init_containers)
        .chain(spec.containers.iter().zip(&request.containers));
    for (container, gpu) in containers {
        for var in container.env.iter().flatten() {
            if !gpu.asks_for_gpu() && hides_every_card(var) {
                continue;
            }
            if let Some(kind) = ControlVariable::of(&var.name, may_opt_out) {
                return Some(Denial::ControlVariableSet {
                    container: container.name.clone(),
                    variable: var.name.clone(),
                    kind,
                    instead: kind.instead(&config.resources),
                });
            }
        }
        if !gpu.asks_for_gpu() {
            continue;
        }
        for source in container.env_from.iter().flatten() {
            let prefix = source.prefix.as_deref().filter(|p| !p.is_empty());
            if !env_from_prefix_is_safe(prefix.unwrap_or_default(), may_opt_out) {
                return Some(Denial::EnvFromWithoutSafePrefix {
                    container: container.name.clone(),
                    origin: env_from_origin(source),
                    prefix: prefix.map(str::to_owned),
                });
            }
        }
    }
    None
}

/// `NVIDIA_VISIBLE_DEVICES` set to a value under which the NVIDIA runtime
/// injects no card (what `overwriteEnv` writes): harmless in a container
/// that asks for no GPU.
fn hides_every_card(var: &EnvVar) -> bool {
    var.name == VISIBLE_DEVICES
        && var
            .value
            .as_deref()
            .is_some_and(|v| v == NO_VISIBLE_DEVICES || v == "void")
}

/// ``ConfigMap `name` `` or ``Secret `name` `` for an `envFrom` entry.
fn env_from_origin(source: &EnvFromSource) -> String {
    if let Some(map) = &source.config_map_ref {
        format!("ConfigMap `{}`", map.name)
    } else if let Some(secret) = &source.secret_ref {
        format!("Secret `{}`", secret.name)
    } else {
        "an envFrom entry".to_owned()
    }
}

/// Checks one container and appends the operations that fill in its
/// defaults.
fn container_operations(
    field: &str,
    index: usize,
    container: &Container,
    gpu: &ContainerGpuRequest,
    config: &Config,
    operations: &mut Vec<PatchOperation>,
) -> Result<(), Denial> {
    let names = &config.resources;
    let base = ["spec".to_owned(), field.to_owned(), index.to_string()];
    let Some(resolved) = gpu.resolve(&config.defaults) else {
        return Ok(());
    };
    let privileged = container
        .security_context
        .as_ref()
        .and_then(|s| s.privileged)
        .unwrap_or(false);
    if privileged {
        return Err(Denial::PrivilegedGpuContainer {
            container: container.name.clone(),
        });
    }
    if let (MemoryRequest::MiB(mib), Some(max_mib)) = (gpu.memory, config.max_card_memory_mib) {
        if mib > max_mib {
            return Err(Denial::MemoryAboveLargestCard {
                container: container.name.clone(),
                resource: names.memory.clone(),
                value: written_value(container, &names.memory).unwrap_or_default(),
                mib,
                max_mib,
                percentage_resource: names.memory_percentage.clone(),
            });
        }
    }

    let mut defaults: Vec<(&str, String)> = Vec::new();
    if gpu.count.is_none() {
        defaults.push((&names.gpu, resolved.count.to_string()));
    }
    if gpu.memory == MemoryRequest::Unspecified {
        match resolved.memory {
            MemoryRequest::MiB(mib) => defaults.push((&names.memory, mib.to_string())),
            MemoryRequest::Percent(percent) => {
                defaults.push((&names.memory_percentage, percent.to_string()))
            }
            MemoryRequest::Unspecified => {}
        }
    }
    if gpu.cores.is_none() && resolved.cores > 0 {
        defaults.push((&names.cores, resolved.cores.to_string()));
    }
    if defaults.is_empty() {
        return Ok(());
    }

    let resources = container.resources.as_ref();
    let has_limits = resources.and_then(|r| r.limits.as_ref()).is_some();
    let mut path = PointerBuf::from_tokens(&base);
    path.push_back("resources");
    if resources.is_none() {
        let limits: serde_json::Map<String, Value> = defaults
            .into_iter()
            .map(|(k, v)| (k.to_owned(), Value::String(v)))
            .collect();
        operations.push(add(path, serde_json::json!({ "limits": limits })));
    } else if !has_limits {
        let limits: serde_json::Map<String, Value> = defaults
            .into_iter()
            .map(|(k, v)| (k.to_owned(), Value::String(v)))
            .collect();
        path.push_back("limits");
        operations.push(add(path, Value::Object(limits)));
    } else {
        path.push_back("limits");
        for (key, value) in defaults {
            let mut key_path = path.clone();
            key_path.push_back(key);
            operations.push(add(key_path, Value::String(value)));
        }
    }
    Ok(())
}

/// Sets `spec.runtimeClassName` to the config's `runtimeClassName` on a GPU
/// pod that names none (HAMi's chart value of the same name); a pod's own
/// choice is kept.
fn runtime_class_operation(pod: &Pod, config: &Config) -> Option<PatchOperation> {
    let class = config.runtime_class_name.as_ref()?;
    let named = pod
        .spec
        .as_ref()
        .and_then(|s| s.runtime_class_name.as_deref())
        .is_some_and(|c| !c.is_empty());
    (!named).then(|| {
        add(
            PointerBuf::from_tokens(["spec", "runtimeClassName"]),
            Value::String(class.clone()),
        )
    })
}

fn add(path: PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path, value })
}

/// The value of `resource` as the container wrote it (limits first).
fn written_value(container: &Container, resource: &str) -> Option<String> {
    let resources = container.resources.as_ref()?;
    resources
        .limits
        .as_ref()
        .and_then(|l| l.get(resource))
        .or_else(|| resources.requests.as_ref().and_then(|r| r.get(resource)))
        .map(|q| q.0.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).expect("valid pod")
    }

    fn gpu_pod(extra_spec: serde_json::Value) -> Pod {
        let mut value = json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "main", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
        ]}});
        json_patch::merge(&mut value, &json!({ "spec": extra_spec }));
        pod(value)
    }

    fn reason(decision: &AdmissionDecision) -> Option<AllowReason> {
        match decision {
            AdmissionDecision::Allowed { reason, .. } => Some(*reason),
            AdmissionDecision::Denied(_) => None,
        }
    }

    #[test]
    fn each_path_reports_its_reason() {
        let config = Config::default();
        let cpu_only = pod(
            json!({"spec": {"containers": [{"name": "c", "resources": {"limits": {"cpu": "1"}}}]}}),
        );
        assert_eq!(
            reason(&admit(&cpu_only, None, &config)),
            Some(AllowReason::NoGpuRequest)
        );
        assert_eq!(
            reason(&admit(&gpu_pod(json!({})), None, &config)),
            Some(AllowReason::Mutated)
        );
        assert_eq!(
            reason(&admit(
                &gpu_pod(json!({"schedulerName": "volcano"})),
                None,
                &config
            )),
            Some(AllowReason::OtherScheduler)
        );
        let complete = pod(
            json!({"spec": {"schedulerName": "tessera-scheduler", "containers": [
                {"name": "main", "resources": {"limits": {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "100"}}}
            ]}}),
        );
        assert_eq!(
            admit(&complete, None, &config),
            AdmissionDecision::Allowed {
                reason: AllowReason::AlreadyComplete,
                patch: None
            }
        );
        let bound = admit(&gpu_pod(json!({"nodeName": "n1"})), None, &config);
        assert_eq!(
            bound,
            AdmissionDecision::Denied(Denial::NodeNameSet { node: "n1".into() })
        );
    }

    #[test]
    fn the_patch_for_a_pod_without_scheduler_name_adds_it() {
        let decision = admit(&gpu_pod(json!({})), None, &Config::default());
        let patch = serde_json::to_value(decision.patch().expect("patch")).unwrap();
        assert_eq!(
            patch,
            json!([
                {"op": "add", "path": "/spec/containers/0/resources/limits/nvidia.com~1gpumem-percentage", "value": "100"},
                {"op": "add", "path": "/spec/containers/0/resources/limits/nvidia.com~1gpucores", "value": "100"},
                {"op": "add", "path": "/spec/schedulerName", "value": "tessera-scheduler"}
            ])
        );
    }

    #[test]
    fn denial_codes_and_reasons() {
        let forged = Denial::ForgedAllocation {
            keys: vec!["hami.io/vgpu-node".into()],
        };
        assert_eq!((forged.code(), forged.status_reason()), (403, "Forbidden"));
        let too_big = Denial::MemoryAboveLargestCard {
            container: "c".into(),
            resource: "nvidia.com/gpumem".into(),
            value: "100000".into(),
            mib: 100_000,
            max_mib: 81_920,
            percentage_resource: "nvidia.com/gpumem-percentage".into(),
        };
        assert_eq!((too_big.code(), too_big.status_reason()), (422, "Invalid"));
        assert!(too_big.to_string().contains("from 1 to 81920"));
    }

    #[test]
    fn a_configured_runtime_class_is_set_on_gpu_pods_that_name_none() {
        let config = Config::from_yaml("runtimeClassName: nvidia\n").expect("config");
        let mutated = mutate_pod(&gpu_pod(json!({})), &config).expect("admitted");
        let spec = mutated.spec.expect("spec");
        assert_eq!(spec.runtime_class_name.as_deref(), Some("nvidia"));
        assert_eq!(spec.scheduler_name.as_deref(), Some("tessera-scheduler"));

        let own = mutate_pod(
            &gpu_pod(json!({"runtimeClassName": "kata-nvidia"})),
            &config,
        )
        .expect("admitted");
        assert_eq!(
            own.spec.expect("spec").runtime_class_name.as_deref(),
            Some("kata-nvidia"),
            "the pod's own runtime class is kept"
        );

        let cpu_only = pod(
            json!({"spec": {"containers": [{"name": "c", "resources": {"limits": {"cpu": "1"}}}]}}),
        );
        assert_eq!(
            admit(&cpu_only, None, &config),
            AdmissionDecision::untouched(AllowReason::NoGpuRequest),
            "pods without a GPU are not given the runtime class"
        );
    }

    #[test]
    fn no_runtime_class_is_written_unless_configured() {
        let decision = admit(&gpu_pod(json!({})), None, &Config::default());
        let patch = serde_json::to_value(decision.patch().expect("patch")).unwrap();
        assert!(!patch.to_string().contains("runtimeClassName"), "{patch}");
        let config = Config::from_yaml("runtimeClassName: nvidia\n").expect("config");
        let complete = pod(
            json!({"spec": {"schedulerName": "tessera-scheduler", "containers": [
                {"name": "main", "resources": {"limits": {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "100"}}}
            ]}}),
        );
        let patch = serde_json::to_value(
            admit(&complete, None, &config)
                .patch()
                .expect("the runtime class is still missing"),
        )
        .unwrap();
        assert_eq!(
            patch,
            json!([{"op": "add", "path": "/spec/runtimeClassName", "value": "nvidia"}])
        );
    }
}
