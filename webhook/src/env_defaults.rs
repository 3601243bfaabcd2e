//! The variables the webhook writes into containers, from HAMi's chart
//! values: `GPU_CORE_UTILIZATION_POLICY` (`defaults.gpuCorePolicy`) and
//! `LIBCUDA_LOG_LEVEL` (`defaults.libCudaLogLevel`) in GPU containers that
//! do not set them, and `NVIDIA_VISIBLE_DEVICES=none` in containers that
//! ask for no GPU (`overwriteEnv`). Also the one rule about a pod's own
//! core policy: it may be stricter than the cluster's, never looser, since
//! a looser one lifts the container's compute cap while it shares a card.
//!
//! Pure: the operations are appended to the caller's JSON Patch.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation};
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{json, Value};
use tessera_api::config::Config;
use tessera_api::container_env::{
    parse_core_policy, CorePolicy, CORE_UTILIZATION_POLICY, LOG_LEVEL, VISIBLE_DEVICES,
};
use tessera_api::names;
use thiserror::Error;

/// What `NVIDIA_VISIBLE_DEVICES` is set to in containers without a GPU:
/// the NVIDIA runtime then injects no card.
pub const NO_VISIBLE_DEVICES: &str = "none";

/// A container's own `GPU_CORE_UTILIZATION_POLICY` is looser than the
/// cluster's.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("container `{container}` sets {CORE_UTILIZATION_POLICY}={written}, which would lift its compute cap while it shares a card, but this cluster's policy is `{cluster}`; remove the variable or write `{cluster}` or a stricter value (`force`), or ask a cluster admin to list the namespace in controlOptOutNamespaces")]
pub struct LooserCorePolicy {
    /// Container name.
    pub container: String,
    /// The value as written (`valueFrom` when it is not a literal).
    pub written: String,
    /// The cluster's policy.
    pub cluster: &'static str,
}

/// Checks a GPU container's own core policy against the cluster's. A value
/// HAMi-core does not know counts as `default` (what the interceptor then
/// applies); one taken from `valueFrom` is unknown at admission and counts
/// as the loosest. Namespaces in `controlOptOutNamespaces` may loosen it.
pub fn check_core_policy(
    container: &Container,
    config: &Config,
    namespace: &str,
) -> Result<(), LooserCorePolicy> {
    let Some(var) = container
        .env
        .iter()
        .flatten()
        .find(|v| v.name == CORE_UTILIZATION_POLICY)
    else {
        return Ok(());
    };
    let (written, policy) = match &var.value {
        Some(value) => (
            value.clone(),
            parse_core_policy(value).unwrap_or(CorePolicy::Default),
        ),
        None if var.value_from.is_some() => ("valueFrom".to_owned(), CorePolicy::Disable),
        None => (String::new(), CorePolicy::Default),
    };
    let cluster = config.defaults.gpu_core_policy;
    if policy >= cluster || config.may_opt_out_of_control(namespace) {
        return Ok(());
    }
    Err(LooserCorePolicy {
        container: container.name.clone(),
        written,
        cluster: cluster.as_str(),
    })
}

/// The variables a GPU container gets from the config, left out where the
/// container sets them itself.
pub fn gpu_container_env(container: &Container, config: &Config) -> Vec<(&'static str, String)> {
    let policy = config.defaults.gpu_core_policy;
    let wanted = [
        (
            CORE_UTILIZATION_POLICY,
            (policy != CorePolicy::Default).then(|| policy.as_str().to_owned()),
        ),
        (
            LOG_LEVEL,
            config.defaults.lib_cuda_log_level.map(|l| l.to_string()),
        ),
    ];
    wanted
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
        .filter(|(name, _)| !sets(container, name))
        .collect()
}

/// Whether the webhook writes `NVIDIA_VISIBLE_DEVICES=none` into a
/// pod's containers without a GPU: HAMi's `hami.io/overwrite-env` (pod) and
/// `hami.io/overwrite-env-containers` (JSON map, per container) over the
/// config's `overwriteEnv`. Values read as Go's `ParseBool`; a malformed
/// one counts as absent, as in HAMi. Turning it *off* against the config
/// would hand a CUDA image's baked-in `NVIDIA_VISIBLE_DEVICES=all` every
/// card, so `false` is honoured only in `controlOptOutNamespaces`.
#[derive(Debug, Clone, Default)]
pub struct OverwriteEnv {
    cluster: bool,
    may_turn_off: bool,
    pod: Option<bool>,
    containers: BTreeMap<String, bool>,
}

impl OverwriteEnv {
    /// Reads the pod's annotations against the config.
    pub fn for_pod(pod: &Pod, config: &Config) -> Self {
        let annotations = pod.metadata.annotations.as_ref();
        let get = |key: &str| annotations.and_then(|a| a.get(key));
        let containers = get(names::pod::OVERWRITE_ENV_CONTAINERS)
            .and_then(|raw| serde_json::from_str::<BTreeMap<String, String>>(raw).ok())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(name, value)| Some((name, parse_bool(&value)?)))
            .collect();
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        Self {
            cluster: config.overwrite_env,
            may_turn_off: config.may_opt_out_of_control(namespace),
            pod: get(names::pod::OVERWRITE_ENV).and_then(|v| parse_bool(v)),
            containers,
        }
    }

    /// Whether `container` gets `NVIDIA_VISIBLE_DEVICES=none`.
    pub fn applies_to(&self, container: &str) -> bool {
        let asked = self.containers.get(container).copied().or(self.pod);
        match asked {
            Some(true) => true,
            Some(false) if self.may_turn_off => false,
            _ => self.cluster,
        }
    }
}

/// Go's `strconv.ParseBool`.
fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// The variables a container that asks for no GPU gets.
pub fn gpu_less_container_env(
    container: &Container,
    overwrite: &OverwriteEnv,
) -> Vec<(&'static str, String)> {
    if overwrite.applies_to(&container.name) && !sets(container, VISIBLE_DEVICES) {
        vec![(VISIBLE_DEVICES, NO_VISIBLE_DEVICES.to_owned())]
    } else {
        Vec::new()
    }
}

/// Appends the operations that add `vars` to the container at
/// `/spec/<field>/<index>`.
pub fn add_env_operations(
    field: &str,
    index: usize,
    container: &Container,
    vars: Vec<(&'static str, String)>,
    operations: &mut Vec<PatchOperation>,
) {
    if vars.is_empty() {
        return;
    }
    let mut path = PointerBuf::from_tokens(["spec", field, &index.to_string(), "env"]);
    let entries = vars
        .into_iter()
        .map(|(name, value)| json!({"name": name, "value": value}));
    if container.env.is_none() {
        operations.push(PatchOperation::Add(AddOperation {
            path,
            value: Value::Array(entries.collect()),
        }));
    } else {
        path.push_back("-");
        for value in entries {
            operations.push(PatchOperation::Add(AddOperation {
                path: path.clone(),
                value,
            }));
        }
    }
}

fn sets(container: &Container, name: &str) -> bool {
    container.env.iter().flatten().any(|v| v.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(env: Value) -> Container {
        serde_json::from_value(json!({"name": "main", "env": env})).expect("container")
    }

    fn config(yaml: &str) -> Config {
        Config::from_yaml(yaml).expect("config")
    }

    #[test]
    fn a_stricter_or_equal_policy_passes_and_a_looser_one_is_refused() {
        let force = config("defaults: {gpuCorePolicy: force}\n");
        let default = Config::default();
        let with = |v: &str| container(json!([{"name": CORE_UTILIZATION_POLICY, "value": v}]));
        assert!(check_core_policy(&with("force"), &force, "ml").is_ok());
        let err = check_core_policy(&with("default"), &force, "ml").expect_err("looser");
        assert_eq!(err.cluster, "force");
        assert!(err
            .to_string()
            .contains("GPU_CORE_UTILIZATION_POLICY=default"));
        assert!(check_core_policy(&with("often"), &force, "ml").is_err());
        assert!(check_core_policy(&with("force"), &default, "ml").is_ok());
        assert!(check_core_policy(&with("default"), &default, "ml").is_ok());
        assert!(check_core_policy(&with("disable"), &default, "ml").is_err());
        let opted_out = config("controlOptOutNamespaces: [bench]\n");
        assert!(check_core_policy(&with("disable"), &opted_out, "bench").is_ok());
        let from = container(json!([{"name": CORE_UTILIZATION_POLICY,
            "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}]));
        let err = check_core_policy(&from, &default, "ml").expect_err("unknown value");
        assert_eq!(err.written, "valueFrom");
        assert!(check_core_policy(&container(json!([])), &force, "ml").is_ok());
    }

    #[test]
    fn configured_values_fill_in_only_what_the_container_leaves_out() {
        let cfg = config("defaults: {gpuCorePolicy: force, libCudaLogLevel: 3}\n");
        let empty = container(json!([]));
        assert_eq!(
            gpu_container_env(&empty, &cfg),
            vec![
                (CORE_UTILIZATION_POLICY, "force".to_owned()),
                (LOG_LEVEL, "3".to_owned())
            ]
        );
        let own = container(json!([{"name": LOG_LEVEL, "value": "0"}]));
        assert_eq!(
            gpu_container_env(&own, &cfg),
            vec![(CORE_UTILIZATION_POLICY, "force".to_owned())]
        );
        assert!(gpu_container_env(&empty, &Config::default()).is_empty());
    }

    fn overwrite(cfg: &Config, namespace: &str, annotations: Value) -> OverwriteEnv {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"namespace": namespace, "annotations": annotations}
        }))
        .expect("pod");
        OverwriteEnv::for_pod(&pod, cfg)
    }

    #[test]
    fn overwrite_env_hides_cards_from_containers_without_a_gpu() {
        let on = config("overwriteEnv: true\n");
        let off = Config::default();
        let empty = container(json!([]));
        assert_eq!(
            gpu_less_container_env(&empty, &overwrite(&on, "ml", json!({}))),
            vec![(VISIBLE_DEVICES, "none".to_owned())]
        );
        assert!(gpu_less_container_env(&empty, &overwrite(&off, "ml", json!({}))).is_empty());
        let own = container(json!([{"name": VISIBLE_DEVICES, "value": "void"}]));
        assert!(gpu_less_container_env(&own, &overwrite(&on, "ml", json!({}))).is_empty());
    }

    #[test]
    fn overwrite_env_annotations_turn_it_on_and_off_only_where_allowed() {
        let on = config("overwriteEnv: true\ncontrolOptOutNamespaces: [bench]\n");
        let off = Config::default();
        let pod_on = json!({"hami.io/overwrite-env": "True"});
        assert!(overwrite(&off, "ml", pod_on.clone()).applies_to("main"));
        let mixed = json!({"hami.io/overwrite-env": "1",
            "hami.io/overwrite-env-containers": r#"{"sidecar": "false", "x": "maybe"}"#});
        let bench = overwrite(&on, "bench", mixed.clone());
        assert!(bench.applies_to("main"));
        assert!(!bench.applies_to("sidecar"), "container level wins");
        assert!(
            bench.applies_to("x"),
            "an invalid value falls back to the pod level"
        );
        assert!(
            overwrite(&on, "ml", mixed).applies_to("sidecar"),
            "off is honoured only in opted-out namespaces"
        );
        let broken = json!({"hami.io/overwrite-env-containers": "{not json"});
        assert!(overwrite(&on, "ml", broken.clone()).applies_to("main"));
        assert!(!overwrite(&off, "ml", broken).applies_to("main"));
        assert!(!overwrite(&off, "ml", json!({"hami.io/overwrite-env": "yes"})).applies_to("main"));
    }

    #[test]
    fn env_is_created_or_appended_to() {
        let mut ops = Vec::new();
        let bare: Container = serde_json::from_value(json!({"name": "a"})).expect("container");
        let vars = || vec![(LOG_LEVEL, "2".to_owned())];
        add_env_operations("containers", 1, &bare, vars(), &mut ops);
        add_env_operations("initContainers", 0, &container(json!([])), vars(), &mut ops);
        let rendered = serde_json::to_value(&ops).expect("json");
        assert_eq!(
            rendered,
            json!([
                {"op": "add", "path": "/spec/containers/1/env",
                 "value": [{"name": LOG_LEVEL, "value": "2"}]},
                {"op": "add", "path": "/spec/initContainers/0/env/-",
                 "value": {"name": LOG_LEVEL, "value": "2"}}
            ])
        );
    }
}
