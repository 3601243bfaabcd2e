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
use k8s_openapi::api::core::v1::Container;
use serde_json::{json, Value};
use tessera_api::config::Config;
use tessera_api::container_env::{
    parse_core_policy, CorePolicy, CORE_UTILIZATION_POLICY, LOG_LEVEL, VISIBLE_DEVICES,
};
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

/// The variables a container that asks for no GPU gets from the config.
pub fn gpu_less_container_env(
    container: &Container,
    config: &Config,
) -> Vec<(&'static str, String)> {
    if config.overwrite_env && !sets(container, VISIBLE_DEVICES) {
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

    #[test]
    fn overwrite_env_hides_cards_from_containers_without_a_gpu() {
        let cfg = config("overwriteEnv: true\n");
        let empty = container(json!([]));
        assert_eq!(
            gpu_less_container_env(&empty, &cfg),
            vec![(VISIBLE_DEVICES, "none".to_owned())]
        );
        assert!(gpu_less_container_env(&empty, &Config::default()).is_empty());
        let own = container(json!([{"name": VISIBLE_DEVICES, "value": "void"}]));
        assert!(gpu_less_container_env(&own, &cfg).is_empty());
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
