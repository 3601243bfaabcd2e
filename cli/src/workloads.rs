//! Reading cluster and workload YAML for the simulator: multi-document
//! files of standard Kubernetes objects. Nodes, Namespaces, Pods,
//! PersistentVolumes, PersistentVolumeClaims, StorageClasses, CSINodes,
//! PriorityClasses and PodDisruptionBudgets are kept;
//! pod-template workloads (Deployment, ReplicaSet, StatefulSet, Job,
//! CronJob, ReplicationController, DaemonSet) are expanded into the pods
//! their controllers would create, and their selectors (and Services'
//! selectors) kept for the cluster-default topology spread; `List`
//! objects are flattened; anything else (ConfigMaps…) is noted and
//! skipped.

use k8s_openapi::api::core::v1::{
    Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod, ResourceQuota,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::scheduling::v1::PriorityClass;
use k8s_openapi::api::storage::v1::{CSINode, StorageClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde::Deserialize;
use serde_json::{json, Value};
use tessera_scheduler::core::default_spread::WorkloadKind;

/// A YAML input that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// A document is not valid YAML.
    #[error("{source_name}: document {document} is not valid YAML: {message}")]
    Yaml {
        /// File name (or `bundled example`).
        source_name: String,
        /// One-based document number.
        document: usize,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A document is YAML but not the object its `kind` says.
    #[error("{source_name}: document {document} ({kind} `{name}`) does not parse: {message}")]
    Object {
        /// File name.
        source_name: String,
        /// One-based document number.
        document: usize,
        /// `kind` of the object.
        kind: String,
        /// `metadata.name` of the object.
        name: String,
        /// What is wrong.
        message: String,
    },
}

/// The objects read from all inputs.
#[derive(Debug, Default)]
pub struct Objects {
    /// Nodes, in input order.
    pub nodes: Vec<Node>,
    /// Namespaces (their labels feed affinity terms' `namespaceSelector`).
    pub namespaces: Vec<Namespace>,
    /// PersistentVolumes.
    pub volumes: Vec<PersistentVolume>,
    /// PersistentVolumeClaims.
    pub claims: Vec<PersistentVolumeClaim>,
    /// StorageClasses.
    pub storage_classes: Vec<StorageClass>,
    /// CSINodes (per-node attachable-volume limits).
    pub csi_nodes: Vec<CSINode>,
    /// PriorityClasses.
    pub priority_classes: Vec<PriorityClass>,
    /// PodDisruptionBudgets.
    pub disruption_budgets: Vec<PodDisruptionBudget>,
    /// ResourceQuotas (their GPU limits are enforced like the scheduler does).
    pub resource_quotas: Vec<ResourceQuota>,
    /// Pods (given or expanded from workloads), in input order.
    pub pods: Vec<Pod>,
    /// Selectors of Services and pod-template workloads (kind, namespace,
    /// name), for the cluster-default topology spread.
    pub workload_selectors: Vec<(WorkloadKind, String, String, LabelSelector)>,
    /// `Kind/name` of objects that were skipped.
    pub skipped: Vec<String>,
}

/// Pod-template workloads whose templates need the node list (DaemonSets).
#[derive(Debug)]
struct PendingDaemonSet {
    name: String,
    namespace: String,
    template: Value,
}

impl Objects {
    /// Reads one multi-document YAML text.
    pub fn read(&mut self, source_name: &str, text: &str) -> Result<(), WorkloadError> {
        let mut daemonsets = Vec::new();
        for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value =
                serde_yaml::Value::deserialize(document).map_err(|e| WorkloadError::Yaml {
                    source_name: source_name.to_owned(),
                    document: i + 1,
                    message: e.to_string(),
                })?;
            if value.is_null() {
                continue;
            }
            let value: Value = serde_json::to_value(value).map_err(|e| WorkloadError::Yaml {
                source_name: source_name.to_owned(),
                document: i + 1,
                message: e.to_string(),
            })?;
            self.add_object(source_name, i + 1, value, &mut daemonsets)?;
        }
        for daemonset in daemonsets {
            self.expand_daemonset(daemonset);
        }
        Ok(())
    }

    fn add_object(
        &mut self,
        source_name: &str,
        document: usize,
        value: Value,
        daemonsets: &mut Vec<PendingDaemonSet>,
    ) -> Result<(), WorkloadError> {
        let kind = value["kind"].as_str().unwrap_or("").to_owned();
        let name = value["metadata"]["name"].as_str().unwrap_or("").to_owned();
        let namespace = value["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let object_error = |message: String| WorkloadError::Object {
            source_name: source_name.to_owned(),
            document,
            kind: kind.clone(),
            name: name.clone(),
            message,
        };
        match kind.as_str() {
            "Node" => self.nodes.push(
                serde_json::from_value(value.clone()).map_err(|e| object_error(e.to_string()))?,
            ),
            "Namespace" => self.namespaces.push(
                serde_json::from_value(value.clone()).map_err(|e| object_error(e.to_string()))?,
            ),
            "PersistentVolume" => self.volumes.push(
                serde_json::from_value(value.clone()).map_err(|e| object_error(e.to_string()))?,
            ),
            "PersistentVolumeClaim" => {
                let mut claim: PersistentVolumeClaim = serde_json::from_value(value.clone())
                    .map_err(|e| object_error(e.to_string()))?;
                claim.metadata.namespace.get_or_insert(namespace);
                self.claims.push(claim);
            }
            "PriorityClass" => self.priority_classes.push(
                serde_json::from_value(value.clone()).map_err(|e| object_error(e.to_string()))?,
            ),
            "PodDisruptionBudget" => {
                let mut budget: PodDisruptionBudget = serde_json::from_value(value.clone())
                    .map_err(|e| object_error(e.to_string()))?;
                budget.metadata.namespace.get_or_insert(namespace);
                self.disruption_budgets.push(budget);
            }
            "ResourceQuota" => {
                let mut quota: ResourceQuota = serde_json::from_value(value.clone())
                    .map_err(|e| object_error(e.to_string()))?;
                quota.metadata.namespace.get_or_insert(namespace);
                self.resource_quotas.push(quota);
            }
            "StorageClass" => self.storage_classes.push(
                serde_json::from_value(value.clone()).map_err(|e| object_error(e.to_string()))?,
            ),
            "CSINode" => self.csi_nodes.push(
                serde_json::from_value(value.clone()).map_err(|e| object_error(e.to_string()))?,
            ),
            "Pod" => {
                let mut pod: Pod = serde_json::from_value(value.clone())
                    .map_err(|e| object_error(e.to_string()))?;
                pod.metadata.namespace.get_or_insert(namespace);
                self.pods.push(pod);
            }
            "Deployment" | "ReplicaSet" | "StatefulSet" | "ReplicationController" => {
                // Its selector (a Deployment's ReplicaSet has the Deployment's)
                // gives the pods the cluster-default spread, as in a cluster.
                let selector = &value["spec"]["selector"];
                let selector = if kind == "ReplicationController" {
                    json!({"matchLabels": selector})
                } else {
                    selector.clone()
                };
                let kind_of = match kind.as_str() {
                    "StatefulSet" => WorkloadKind::StatefulSet,
                    "ReplicationController" => WorkloadKind::ReplicationController,
                    _ => WorkloadKind::ReplicaSet,
                };
                if let Ok(selector) = serde_json::from_value(selector) {
                    self.workload_selectors.push((
                        kind_of,
                        namespace.clone(),
                        name.clone(),
                        selector,
                    ));
                }
                let replicas = value["spec"]["replicas"].as_u64().unwrap_or(1);
                let template = &value["spec"]["template"];
                for i in 0..replicas {
                    self.pods.push(
                        pod_from_template(template, &format!("{name}-{i}"), &namespace)
                            .map_err(object_error)?,
                    );
                }
            }
            "Job" => {
                let parallelism = value["spec"]["parallelism"].as_u64().unwrap_or(1);
                for i in 0..parallelism {
                    self.pods.push(
                        pod_from_template(
                            &value["spec"]["template"],
                            &format!("{name}-{i}"),
                            &namespace,
                        )
                        .map_err(object_error)?,
                    );
                }
            }
            "CronJob" => {
                let job = &value["spec"]["jobTemplate"]["spec"];
                let parallelism = job["parallelism"].as_u64().unwrap_or(1);
                for i in 0..parallelism {
                    self.pods.push(
                        pod_from_template(&job["template"], &format!("{name}-{i}"), &namespace)
                            .map_err(object_error)?,
                    );
                }
            }
            "DaemonSet" => daemonsets.push(PendingDaemonSet {
                name,
                namespace,
                template: value["spec"]["template"].clone(),
            }),
            list if list == "List" || list.ends_with("List") => {
                if let Some(items) = value["items"].as_array() {
                    for item in items.clone() {
                        self.add_object(source_name, document, item, daemonsets)?;
                    }
                }
            }
            "Service" => {
                // Only its selector is used (the cluster-default spread).
                if let Some(labels) = value["spec"]["selector"].as_object() {
                    if let Ok(selector) = serde_json::from_value(json!({"matchLabels": labels})) {
                        self.workload_selectors.push((
                            WorkloadKind::Service,
                            namespace.clone(),
                            name.clone(),
                            selector,
                        ));
                    }
                }
            }
            _ => self.skipped.push(format!("{kind}/{name}")),
        }
        Ok(())
    }

    /// One pod per node, pinned to it the way the DaemonSet controller does.
    fn expand_daemonset(&mut self, daemonset: PendingDaemonSet) {
        let node_names: Vec<String> = self
            .nodes
            .iter()
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        for node in node_names {
            let mut template = daemonset.template.clone();
            template["spec"]["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}]}}});
            if let Ok(pod) = pod_from_template(
                &template,
                &format!("{}-{node}", daemonset.name),
                &daemonset.namespace,
            ) {
                self.pods.push(pod);
            }
        }
    }
}

fn pod_from_template(template: &Value, name: &str, namespace: &str) -> Result<Pod, String> {
    if template.is_null() {
        return Err("it has no pod template (spec.template)".to_owned());
    }
    let mut metadata = template["metadata"].clone();
    if !metadata.is_object() {
        metadata = json!({});
    }
    metadata["name"] = json!(name);
    metadata["namespace"] = json!(namespace);
    let pod =
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]});
    serde_json::from_value(pod).map_err(|e| format!("its pod template does not parse: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_workloads_and_skips_others() {
        let yaml = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: prod}
spec:
  replicas: 3
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: prod}
spec: {selector: {app: web}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec: {jobTemplate: {spec: {parallelism: 2, template: {spec: {containers: [{name: c}]}}}}}
---
apiVersion: v1
kind: List
items:
  - {apiVersion: v1, kind: Node, metadata: {name: n1}}
  - {apiVersion: v1, kind: Node, metadata: {name: n2}}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec: {template: {spec: {containers: [{name: c}]}}}
"#;
        let mut objects = Objects::default();
        objects.read("test.yaml", yaml).expect("reads");
        let names: Vec<String> = objects
            .pods
            .iter()
            .map(|p| {
                format!(
                    "{}/{}",
                    p.metadata.namespace.as_deref().unwrap_or(""),
                    p.metadata.name.as_deref().unwrap_or("")
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                "prod/web-0",
                "prod/web-1",
                "prod/web-2",
                "default/nightly-0",
                "default/nightly-1",
                "default/agent-n1",
                "default/agent-n2"
            ]
        );
        assert_eq!(objects.nodes.len(), 2);
        // Services are read for their selectors (cluster-default spread).
        assert_eq!(objects.skipped, ["ConfigMap/settings"]);
        assert_eq!(objects.workload_selectors.len(), 1);
        assert_eq!(objects.workload_selectors[0].0, WorkloadKind::Service);
    }

    #[test]
    fn errors_name_the_file_and_document() {
        let mut objects = Objects::default();
        let err = objects
            .read("bad.yaml", "kind: Pod\n---\nkind: [unclosed\n")
            .expect_err("bad yaml");
        assert!(err.to_string().starts_with("bad.yaml: document 2"), "{err}");
        let err = objects
            .read(
                "bad.yaml",
                "kind: Node\nmetadata: {name: 5, labels: nope}\n",
            )
            .expect_err("bad node");
        assert!(err.to_string().contains("Node"), "{err}");
    }
}
