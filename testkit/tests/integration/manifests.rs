//! The install manifests (`manifests/`), the example workloads
//! (`manifests/examples/`) and the optional monitoring add-on
//! (`manifests/monitoring/`) checked against the code they deploy:
//!
//! - every document parses into its typed k8s-openapi object, with no field
//!   the type does not know (a misspelt field would otherwise vanish
//!   silently), and unknown kinds fail;
//! - `kustomization.yaml` lists exactly the manifest files, and its one
//!   `images:` entry names every container image;
//! - references resolve: Service selectors and target ports, probe ports,
//!   ServiceAccounts, role bindings, the webhook configuration's Service;
//! - every container's `args` parse with that binary's own clap parser, and
//!   what they say (listen ports, config path, host directories, webhook
//!   names, Lease name) matches the container ports, volumes, RBAC resource
//!   names and the Dockerfile;
//! - the ConfigMap parses with `Config::from_yaml`, and the webhook's
//!   `matchConditions` cover the resources it names;
//! - the ValidatingAdmissionPolicies are bound, fail closed, cover the
//!   operations they must, exempt exactly Tessera's ServiceAccounts and
//!   namespace, and their CEL (run by the `cel` interpreter against sample
//!   admission requests) denies and allows what it should, with the names
//!   the code uses;
//! - every example pod passes the webhook decision (`mutate_pod`) and asks
//!   for a GPU;
//! - the Grafana dashboard only queries metrics the components expose.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, Pod, PodSpec, PodTemplateSpec, Probe, ResourceQuota, Service,
    ServiceAccount,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::Deserialize as _;
use serde::Serialize;
use serde_json::Value as Json;
use tessera_api::config::Config;
use tessera_api::request::PodGpuRequest;

const NAMESPACE: &str = "tessera-system";
const IMAGE_NAME: &str = "tessera";

// ---------------------------------------------------------------- loading

/// One parsed document, typed by its apiVersion and kind.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
enum Object {
    Namespace(Namespace),
    ConfigMap(ConfigMap),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    Role(Role),
    RoleBinding(RoleBinding),
    Deployment(Deployment),
    DaemonSet(DaemonSet),
    Service(Service),
    PodDisruptionBudget(PodDisruptionBudget),
    MutatingWebhookConfiguration(MutatingWebhookConfiguration),
    ValidatingAdmissionPolicy(ValidatingAdmissionPolicy),
    ValidatingAdmissionPolicyBinding(ValidatingAdmissionPolicyBinding),
    Pod(Pod),
    ResourceQuota(ResourceQuota),
}

/// A parsed document and where it came from.
#[derive(Debug, Clone)]
struct Doc {
    file: String,
    object: Object,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ has a parent")
        .to_path_buf()
}

fn manifests_dir() -> PathBuf {
    repo_root().join("manifests")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The `.yaml` files directly in `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
}

/// The documents of a multi-document YAML text, as JSON values (empty
/// documents skipped).
fn yaml_documents(text: &str, file: &str) -> Vec<Json> {
    serde_yaml::Deserializer::from_str(text)
        .enumerate()
        .filter_map(|(i, document)| {
            let value = serde_yaml::Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{file}: document {i} is not valid YAML: {e}"));
            (!value.is_null()).then(|| {
                serde_json::to_value(&value).unwrap_or_else(|e| {
                    panic!("{file}: document {i} is not representable as JSON: {e}")
                })
            })
        })
        .collect()
}

/// Paths present in `original` but missing from `typed` (the object
/// serialized back from its k8s-openapi type): fields the type does not
/// know, usually a typo. Scalars are not compared (YAML `1` becomes the
/// quantity `"1"`).
fn dropped_fields(original: &Json, typed: &Json, path: &str, out: &mut Vec<String>) {
    match (original, typed) {
        (Json::Object(original), Json::Object(typed)) => {
            for (key, value) in original {
                let child = format!("{path}.{key}");
                match typed.get(key) {
                    Some(typed_value) => dropped_fields(value, typed_value, &child, out),
                    // k8s-openapi leaves out empty optional objects and lists.
                    None if is_empty(value) => {}
                    None => out.push(child),
                }
            }
        }
        (Json::Array(original), Json::Array(typed)) => {
            if original.len() != typed.len() {
                out.push(format!("{path} (length)"));
            }
            for (i, (o, t)) in original.iter().zip(typed).enumerate() {
                dropped_fields(o, t, &format!("{path}[{i}]"), out);
            }
        }
        (Json::Object(_) | Json::Array(_), _) if !is_empty(original) => {
            out.push(format!("{path} (shape)"));
        }
        _ => {}
    }
}

fn is_empty(value: &Json) -> bool {
    match value {
        Json::Null => true,
        Json::Object(map) => map.is_empty(),
        Json::Array(list) => list.is_empty(),
        _ => false,
    }
}

fn typed<T: DeserializeOwned + Serialize>(value: &Json, file: &str) -> T {
    let object: T = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{file}: {} does not parse: {e}", describe(value)));
    let back = serde_json::to_value(&object).expect("typed objects serialize");
    let mut dropped = Vec::new();
    dropped_fields(value, &back, "", &mut dropped);
    assert!(
        dropped.is_empty(),
        "{file}: {} has fields its type does not know (misspelt?): {dropped:?}",
        describe(value)
    );
    object
}

fn describe(value: &Json) -> String {
    format!(
        "{} {}",
        value["kind"].as_str().unwrap_or("<no kind>"),
        value["metadata"]["name"].as_str().unwrap_or("<no name>")
    )
}

fn parse_object(value: &Json, file: &str) -> Object {
    let api_version = value["apiVersion"].as_str().unwrap_or("");
    let kind = value["kind"].as_str().unwrap_or("");
    match (api_version, kind) {
        ("v1", "Namespace") => Object::Namespace(typed(value, file)),
        ("v1", "ConfigMap") => Object::ConfigMap(typed(value, file)),
        ("v1", "ServiceAccount") => Object::ServiceAccount(typed(value, file)),
        ("v1", "Service") => Object::Service(typed(value, file)),
        ("v1", "Pod") => Object::Pod(typed(value, file)),
        ("v1", "ResourceQuota") => Object::ResourceQuota(typed(value, file)),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => Object::ClusterRole(typed(value, file)),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            Object::ClusterRoleBinding(typed(value, file))
        }
        ("rbac.authorization.k8s.io/v1", "Role") => Object::Role(typed(value, file)),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => Object::RoleBinding(typed(value, file)),
        ("apps/v1", "Deployment") => Object::Deployment(typed(value, file)),
        ("apps/v1", "DaemonSet") => Object::DaemonSet(typed(value, file)),
        ("policy/v1", "PodDisruptionBudget") => Object::PodDisruptionBudget(typed(value, file)),
        ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration") => {
            Object::MutatingWebhookConfiguration(typed(value, file))
        }
        ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy") => {
            Object::ValidatingAdmissionPolicy(typed(value, file))
        }
        ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding") => {
            Object::ValidatingAdmissionPolicyBinding(typed(value, file))
        }
        _ => panic!(
            "{file}: unexpected kind {kind:?} (apiVersion {api_version:?}); add it to parse_object if it is meant to be there"
        ),
    }
}

fn load_file(path: &Path) -> Vec<Doc> {
    let file = path
        .strip_prefix(repo_root())
        .unwrap_or(path)
        .display()
        .to_string();
    let documents = yaml_documents(&read(path), &file);
    assert!(!documents.is_empty(), "{file} holds no document");
    documents
        .iter()
        .map(|value| Doc {
            file: file.clone(),
            object: parse_object(value, &file),
        })
        .collect()
}

/// `manifests/kustomization.yaml` as JSON.
fn kustomization(dir: &Path) -> Json {
    let path = dir.join("kustomization.yaml");
    let mut documents = yaml_documents(&read(&path), &path.display().to_string());
    assert_eq!(documents.len(), 1, "kustomization.yaml is one document");
    documents.remove(0)
}

/// The installed objects, from the files the kustomization lists.
fn installed() -> Vec<Doc> {
    let dir = manifests_dir();
    let kustomization = kustomization(&dir);
    kustomization["resources"]
        .as_array()
        .expect("kustomization.yaml has resources")
        .iter()
        .flat_map(|r| load_file(&dir.join(r.as_str().expect("resource is a path"))))
        .collect()
}

fn examples() -> Vec<(PathBuf, Vec<Doc>)> {
    yaml_files(&manifests_dir().join("examples"))
        .into_iter()
        .map(|path| {
            let docs = load_file(&path);
            (path, docs)
        })
        .collect()
}

// ------------------------------------------------------------ accessors

fn meta(object: &Object) -> &ObjectMeta {
    match object {
        Object::Namespace(o) => &o.metadata,
        Object::ConfigMap(o) => &o.metadata,
        Object::ServiceAccount(o) => &o.metadata,
        Object::ClusterRole(o) => &o.metadata,
        Object::ClusterRoleBinding(o) => &o.metadata,
        Object::Role(o) => &o.metadata,
        Object::RoleBinding(o) => &o.metadata,
        Object::Deployment(o) => &o.metadata,
        Object::DaemonSet(o) => &o.metadata,
        Object::Service(o) => &o.metadata,
        Object::PodDisruptionBudget(o) => &o.metadata,
        Object::MutatingWebhookConfiguration(o) => &o.metadata,
        Object::ValidatingAdmissionPolicy(o) => &o.metadata,
        Object::ValidatingAdmissionPolicyBinding(o) => &o.metadata,
        Object::Pod(o) => &o.metadata,
        Object::ResourceQuota(o) => &o.metadata,
    }
}

fn name(object: &Object) -> &str {
    meta(object).name.as_deref().unwrap_or("")
}

/// The namespace an object lands in (`default` when it names none, as for
/// the examples applied into the current namespace).
fn namespace(object: &Object) -> &str {
    meta(object).namespace.as_deref().unwrap_or("default")
}

/// A workload's name, namespace, pod template labels and pod spec.
struct Workload<'a> {
    kind: &'static str,
    name: &'a str,
    namespace: &'a str,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    spec: &'a PodSpec,
    selector: Option<&'a LabelSelector>,
}

/// A Deployment's or DaemonSet's workload: its pod template and selector.
fn controller_workload<'a>(
    kind: &'static str,
    object: &'a Object,
    template: &'a PodTemplateSpec,
    selector: &'a LabelSelector,
) -> Workload<'a> {
    let spec = template
        .spec
        .as_ref()
        .unwrap_or_else(|| panic!("{} has no pod spec", name(object)));
    let metadata = template.metadata.as_ref();
    Workload {
        kind,
        name: name(object),
        namespace: namespace(object),
        labels: metadata.and_then(|m| m.labels.clone()).unwrap_or_default(),
        annotations: metadata
            .and_then(|m| m.annotations.clone())
            .unwrap_or_default(),
        spec,
        selector: Some(selector),
    }
}

fn workloads(docs: &[Doc]) -> Vec<Workload<'_>> {
    docs.iter()
        .filter_map(|doc| {
            let object = &doc.object;
            Some(match object {
                Object::Deployment(d) => {
                    let s = d.spec.as_ref().expect("Deployment has a spec");
                    controller_workload("Deployment", object, &s.template, &s.selector)
                }
                Object::DaemonSet(d) => {
                    let s = d.spec.as_ref().expect("DaemonSet has a spec");
                    controller_workload("DaemonSet", object, &s.template, &s.selector)
                }
                Object::Pod(p) => Workload {
                    kind: "Pod",
                    name: name(object),
                    namespace: namespace(object),
                    labels: p.metadata.labels.clone().unwrap_or_default(),
                    annotations: p.metadata.annotations.clone().unwrap_or_default(),
                    spec: p.spec.as_ref().expect("Pod has a spec"),
                    selector: None,
                },
                _ => return None,
            })
        })
        .collect()
}

fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether a label selector (matchLabels and matchExpressions) selects `labels`.
fn label_selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector
        .match_labels
        .as_ref()
        .is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            other => panic!("unknown selector operator {other}"),
        }
    });
    by_labels && by_expressions
}

fn port_matches(container: &Container, port: &IntOrString) -> bool {
    container.ports.iter().flatten().any(|p| match port {
        IntOrString::Int(n) => p.container_port == *n,
        IntOrString::String(s) => p.name.as_deref() == Some(s.as_str()),
    })
}

fn probe_port(probe: &Probe) -> Option<&IntOrString> {
    probe
        .http_get
        .as_ref()
        .map(|h| &h.port)
        .or(probe.tcp_socket.as_ref().map(|t| &t.port))
}

fn env_field_ref<'a>(container: &'a Container, var: &str) -> Option<&'a str> {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == var)
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str())
}

/// The binary a container runs (the basename of `command[0]`).
fn binary(container: &Container) -> &str {
    container
        .command
        .as_ref()
        .and_then(|c| c.first())
        .map(|c| c.rsplit('/').next().unwrap_or(c))
        .unwrap_or_else(|| panic!("container {} names no command", container.name))
}

fn argv(container: &Container) -> Vec<String> {
    std::iter::once(binary(container).to_owned())
        .chain(container.args.clone().unwrap_or_default())
        .collect()
}

fn find<'a, T>(docs: &'a [Doc], pick: impl Fn(&'a Object) -> Option<&'a T>, what: &str) -> &'a T {
    let found: Vec<&T> = docs.iter().filter_map(|d| pick(&d.object)).collect();
    assert_eq!(found.len(), 1, "expected exactly one {what}");
    found[0]
}

fn workload<'a>(docs: &'a [Doc], name: &str) -> Workload<'a> {
    workloads(docs)
        .into_iter()
        .find(|w| w.name == name)
        .unwrap_or_else(|| panic!("no workload {name} is installed"))
}

fn only_container<'a>(w: &Workload<'a>) -> &'a Container {
    assert_eq!(w.spec.containers.len(), 1, "{} runs one container", w.name);
    &w.spec.containers[0]
}

/// The workload `name` and its one container, which runs the binary `name`.
fn component<'a>(docs: &'a [Doc], name: &str) -> (Workload<'a>, &'a Container) {
    let w = workload(docs, name);
    let c = only_container(&w);
    assert_eq!(binary(c), name);
    (w, c)
}

/// The container's args parsed by its binary's own clap parser.
fn parse_args<P: clap::Parser>(container: &Container) -> P {
    P::try_parse_from(argv(container))
        .unwrap_or_else(|e| panic!("{} rejects its args: {e}", binary(container)))
}

/// Whether the container declares `port` among its container ports.
fn declares_port(container: &Container, port: u16) -> bool {
    container
        .ports
        .iter()
        .flatten()
        .any(|p| p.container_port == i32::from(port))
}

/// Liveness asks `/healthz` and readiness `/readyz`, both over httpGet.
fn assert_probe_paths(container: &Container) {
    for (probe, path) in [
        (&container.liveness_probe, "/healthz"),
        (&container.readiness_probe, "/readyz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("httpGet probe");
        assert_eq!(get.path.as_deref(), Some(path));
    }
}

/// The Deployment called `name`.
fn deployment<'a>(docs: &'a [Doc], name: &str) -> &'a Deployment {
    docs.iter()
        .find_map(|d| match &d.object {
            Object::Deployment(dep) if dep.metadata.name.as_deref() == Some(name) => Some(dep),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Deployment {name}"))
}

/// The one ConfigMap the components mount.
fn config_map(docs: &[Doc]) -> &ConfigMap {
    find(
        docs,
        |o| match o {
            Object::ConfigMap(c) => Some(c),
            _ => None,
        },
        "ConfigMap",
    )
}

/// The rules of a Role or ClusterRole; none for any other object.
fn policy_rules(object: &Object) -> Vec<&PolicyRule> {
    match object {
        Object::Role(r) => r.rules.iter().flatten().collect(),
        Object::ClusterRole(r) => r.rules.iter().flatten().collect(),
        _ => Vec::new(),
    }
}

/// The installed config, from the ConfigMap the components mount.
fn installed_config(docs: &[Doc]) -> Config {
    let map = config_map(docs);
    let text = map
        .data
        .as_ref()
        .and_then(|d| d.get("config.yaml"))
        .expect("the ConfigMap has a config.yaml key");
    Config::from_yaml(text).unwrap_or_else(|e| {
        panic!(
            "the ConfigMap's config.yaml does not parse: {e} ({:?})",
            std::error::Error::source(&e)
        )
    })
}

/// Checks that `--config` points at the ConfigMap's file through a volume.
fn assert_config_mounted(docs: &[Doc], w: &Workload<'_>, container: &Container, config: &Path) {
    let map_name = config_map(docs)
        .metadata
        .name
        .clone()
        .expect("ConfigMap has a name");
    let dir = config.parent().expect("config path has a directory");
    let key = config.file_name().expect("config path has a file name");
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| Path::new(&m.mount_path) == dir)
        .unwrap_or_else(|| panic!("{}: nothing is mounted at {}", w.name, dir.display()));
    let volume = w
        .spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("{}: volume {} is not declared", w.name, mount.name));
    let source = volume
        .config_map
        .as_ref()
        .unwrap_or_else(|| panic!("{}: {} is not a ConfigMap volume", w.name, mount.name));
    assert_eq!(
        source.name, map_name,
        "{}: config volume names another ConfigMap",
        w.name
    );
    assert_eq!(
        key, "config.yaml",
        "{}: --config names a key the ConfigMap lacks",
        w.name
    );
}

// -------------------------------------------------------------- the tests

#[test]
fn kustomization_lists_every_manifest_and_one_image() {
    let dir = manifests_dir();
    let kustomization = kustomization(&dir);
    let listed: Vec<&str> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("resource is a path"))
        .collect();
    let unique: BTreeSet<&str> = listed.iter().copied().collect();
    assert_eq!(unique.len(), listed.len(), "a resource is listed twice");
    for resource in &listed {
        assert!(
            dir.join(resource).is_file(),
            "kustomization lists {resource}, which does not exist"
        );
    }
    let on_disk: BTreeSet<String> = yaml_files(&dir)
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .filter(|n| n != "kustomization.yaml")
        .collect();
    let listed: BTreeSet<String> = listed.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(
        on_disk, listed,
        "manifests/*.yaml and the kustomization's resources differ"
    );

    let images = kustomization["images"]
        .as_array()
        .expect("an images: entry");
    assert_eq!(images.len(), 1, "one image for every component");
    assert_eq!(images[0]["name"], IMAGE_NAME);
    assert!(
        images[0]["newTag"].is_string(),
        "images[0].newTag sets the tag"
    );
    assert!(
        images[0]["newName"].is_string(),
        "images[0].newName sets the registry"
    );

    let docs = installed();
    for w in workloads(&docs) {
        for c in &w.spec.containers {
            let image = c.image.as_deref().unwrap_or("");
            let image_name = image.split(':').next().unwrap_or("");
            assert_eq!(
                image_name, IMAGE_NAME,
                "{}/{}: image {image} is not the one the kustomization's images: entry rewrites",
                w.name, c.name
            );
        }
    }
}

#[test]
fn every_manifest_parses_typed_and_lands_in_the_namespace() {
    let docs = installed();
    assert!(docs
        .iter()
        .any(|d| matches!(&d.object, Object::Namespace(n) if n.metadata.name.as_deref() == Some(NAMESPACE))));
    for doc in &docs {
        let cluster_scoped = matches!(
            doc.object,
            Object::Namespace(_)
                | Object::ClusterRole(_)
                | Object::ClusterRoleBinding(_)
                | Object::MutatingWebhookConfiguration(_)
                | Object::ValidatingAdmissionPolicy(_)
                | Object::ValidatingAdmissionPolicyBinding(_)
        );
        let ns = meta(&doc.object).namespace.as_deref();
        if cluster_scoped {
            assert_eq!(
                ns,
                None,
                "{}: cluster-scoped {} names a namespace",
                doc.file,
                name(&doc.object)
            );
        } else {
            assert_eq!(
                ns,
                Some(NAMESPACE),
                "{}: {} is not in {NAMESPACE}",
                doc.file,
                name(&doc.object)
            );
        }
    }
    // The namespace opts its own pods out of the webhook.
    let ns = find(
        &docs,
        |o| match o {
            Object::Namespace(n) => Some(n),
            _ => None,
        },
        "Namespace",
    );
    assert_eq!(
        ns.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("hami.io/webhook"))
            .map(String::as_str),
        Some("ignore")
    );
}

#[test]
fn rbac_lives_in_one_file_per_component() {
    for component in ["webhook", "scheduler", "node-agent"] {
        let file = manifests_dir().join(format!("rbac-{component}.yaml"));
        let docs = load_file(&file);
        let account = format!("tessera-{component}");
        assert!(
            docs.iter().any(|d| matches!(&d.object, Object::ServiceAccount(s) if s.metadata.name.as_deref() == Some(&account))),
            "{} defines ServiceAccount {account}",
            file.display()
        );
        for doc in &docs {
            assert!(
                matches!(
                    doc.object,
                    Object::ServiceAccount(_)
                        | Object::ClusterRole(_)
                        | Object::ClusterRoleBinding(_)
                        | Object::Role(_)
                        | Object::RoleBinding(_)
                ),
                "{} holds a non-RBAC object {}",
                doc.file,
                name(&doc.object)
            );
        }
    }
}

#[test]
fn bindings_reference_existing_roles_and_accounts() {
    let docs = installed();
    let accounts: BTreeSet<(String, String)> = docs
        .iter()
        .filter(|d| matches!(d.object, Object::ServiceAccount(_)))
        .map(|d| (namespace(&d.object).to_owned(), name(&d.object).to_owned()))
        .collect();
    let cluster_roles: BTreeSet<&str> = docs
        .iter()
        .filter(|d| matches!(d.object, Object::ClusterRole(_)))
        .map(|d| name(&d.object))
        .collect();
    let roles: BTreeSet<(&str, &str)> = docs
        .iter()
        .filter(|d| matches!(d.object, Object::Role(_)))
        .map(|d| (namespace(&d.object), name(&d.object)))
        .collect();
    let mut bindings = 0;
    for doc in &docs {
        let (role_ref, subjects, binding_ns) = match &doc.object {
            Object::ClusterRoleBinding(b) => (&b.role_ref, &b.subjects, None),
            Object::RoleBinding(b) => (&b.role_ref, &b.subjects, Some(namespace(&doc.object))),
            _ => continue,
        };
        bindings += 1;
        assert_eq!(role_ref.api_group, "rbac.authorization.k8s.io");
        match (role_ref.kind.as_str(), binding_ns) {
            ("ClusterRole", _) => assert!(
                cluster_roles.contains(role_ref.name.as_str()),
                "{}: binding {} references missing ClusterRole {}",
                doc.file,
                name(&doc.object),
                role_ref.name
            ),
            ("Role", Some(ns)) => assert!(
                roles.contains(&(ns, role_ref.name.as_str())),
                "{}: binding {} references missing Role {ns}/{}",
                doc.file,
                name(&doc.object),
                role_ref.name
            ),
            (kind, _) => panic!(
                "{}: binding {} references a {kind}",
                doc.file,
                name(&doc.object)
            ),
        }
        let subjects = subjects.as_ref().expect("binding has subjects");
        assert!(!subjects.is_empty());
        for s in subjects {
            assert_eq!(
                s.kind, "ServiceAccount",
                "{}: only service accounts are bound",
                doc.file
            );
            let key = (s.namespace.clone().unwrap_or_default(), s.name.clone());
            assert!(
                accounts.contains(&key),
                "{}: binding subject {key:?} does not exist",
                doc.file
            );
        }
    }
    assert!(bindings >= 3, "each component has its bindings");

    // Pods run as accounts that exist, and every account is bound.
    for w in workloads(&docs) {
        let account = w
            .spec
            .service_account_name
            .as_deref()
            .unwrap_or_else(|| panic!("{} names no serviceAccountName", w.name));
        assert!(
            accounts.contains(&(w.namespace.to_owned(), account.to_owned())),
            "{} runs as ServiceAccount {account}, which is not defined",
            w.name
        );
    }
}

#[test]
fn services_select_workloads_and_reach_container_ports() {
    let docs = installed();
    check_services(&docs);
}

fn check_services(docs: &[Doc]) {
    let workloads = workloads(docs);
    for doc in docs {
        let Object::Service(service) = &doc.object else {
            continue;
        };
        let spec = service.spec.as_ref().expect("Service has a spec");
        let selector = spec.selector.clone().unwrap_or_default();
        let targets: Vec<&Workload> = workloads
            .iter()
            .filter(|w| {
                w.namespace == namespace(&doc.object) && selector_matches(&selector, &w.labels)
            })
            .collect();
        assert!(
            !targets.is_empty(),
            "{}: Service {} selects {selector:?}, which no pod template in its namespace carries",
            doc.file,
            name(&doc.object)
        );
        for port in spec.ports.iter().flatten() {
            let target = port
                .target_port
                .clone()
                .unwrap_or(IntOrString::Int(port.port));
            for w in &targets {
                assert!(
                    w.spec.containers.iter().any(|c| port_matches(c, &target)),
                    "{}: Service {} port {:?} targets {target:?}, which {} does not declare",
                    doc.file,
                    name(&doc.object),
                    port.name,
                    w.name
                );
            }
        }
    }
    // Workload selectors select their own template, and probes name declared ports.
    for w in &workloads {
        if let Some(selector) = w.selector {
            assert!(
                label_selector_matches(selector, &w.labels),
                "{} {}: its selector does not match its pod template",
                w.kind,
                w.name
            );
        }
        for c in &w.spec.containers {
            for probe in [&c.liveness_probe, &c.readiness_probe, &c.startup_probe]
                .into_iter()
                .flatten()
            {
                let port = probe_port(probe).expect("probes are httpGet or tcpSocket");
                assert!(
                    port_matches(c, port),
                    "{}/{}: a probe uses port {port:?}, not declared",
                    w.name,
                    c.name
                );
            }
        }
    }
}

#[test]
fn pod_disruption_budgets_select_a_workload() {
    let docs = installed();
    let workloads = workloads(&docs);
    let mut budgets = 0;
    for doc in &docs {
        let Object::PodDisruptionBudget(pdb) = &doc.object else {
            continue;
        };
        budgets += 1;
        let selector = pdb
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .expect("PDB has a selector");
        assert!(
            workloads
                .iter()
                .any(|w| w.namespace == namespace(&doc.object)
                    && label_selector_matches(selector, &w.labels)),
            "{}: PDB {} selects no workload",
            doc.file,
            name(&doc.object)
        );
    }
    assert!(budgets >= 1, "the webhook has a PodDisruptionBudget");
}

#[test]
fn the_config_map_parses_as_the_components_config() {
    let docs = installed();
    let config = installed_config(&docs);
    assert_eq!(config.scheduler_name, "tessera-scheduler");
    assert_eq!(
        config.resources,
        tessera_api::names::ResourceNames::default()
    );
}

#[test]
fn containers_are_hardened_and_sized() {
    let docs = installed();
    for w in workloads(&docs) {
        for c in &w.spec.containers {
            let what = format!("{}/{}", w.name, c.name);
            let resources = c
                .resources
                .as_ref()
                .unwrap_or_else(|| panic!("{what}: no resources"));
            let requests = resources
                .requests
                .as_ref()
                .unwrap_or_else(|| panic!("{what}: no requests"));
            assert!(
                requests.contains_key("cpu") && requests.contains_key("memory"),
                "{what}: requests cpu and memory"
            );
            let limits = resources
                .limits
                .as_ref()
                .unwrap_or_else(|| panic!("{what}: no limits"));
            assert!(limits.contains_key("memory"), "{what}: limits memory");
            assert!(c.liveness_probe.is_some(), "{what}: liveness probe");
            assert!(c.readiness_probe.is_some(), "{what}: readiness probe");
            let security = c
                .security_context
                .as_ref()
                .unwrap_or_else(|| panic!("{what}: no securityContext"));
            assert_eq!(
                security.allow_privilege_escalation,
                Some(false),
                "{what}: allowPrivilegeEscalation"
            );
            assert_eq!(
                security.read_only_root_filesystem,
                Some(true),
                "{what}: readOnlyRootFilesystem"
            );
            assert_ne!(security.privileged, Some(true), "{what}: privileged");
            let capabilities = security.capabilities.as_ref().expect("capabilities");
            assert_eq!(
                capabilities.drop.as_deref(),
                Some(&["ALL".to_owned()][..]),
                "{what}: drops ALL"
            );
            let pod_security = w.spec.security_context.as_ref();
            assert_ne!(w.spec.host_network, Some(true), "{what}: hostNetwork");
            assert_ne!(w.spec.host_ipc, Some(true), "{what}: hostIPC");
            // Only the node agent shares the host's pid namespace: its
            // host-pid socket answers each GPU container process with its
            // pid as SO_PEERCRED reports it in the agent's namespace, which
            // must be the host's, since NVML lists processes by host pid.
            assert_eq!(
                w.spec.host_pid == Some(true),
                w.name == "tessera-node-agent",
                "{what}: hostPID only for the node agent"
            );
            let non_root = security
                .run_as_non_root
                .or(pod_security.and_then(|s| s.run_as_non_root));
            if w.name == "tessera-node-agent" {
                // Root, for kubelet's device-plugin directory; only the
                // capabilities the host files need, and KILL for enforcement.
                let added: BTreeSet<&str> = capabilities
                    .add
                    .iter()
                    .flatten()
                    .map(String::as_str)
                    .collect();
                assert_eq!(
                    added,
                    BTreeSet::from(["CHOWN", "DAC_OVERRIDE", "FOWNER", "KILL"]),
                    "{what}"
                );
            } else {
                assert_eq!(non_root, Some(true), "{what}: runAsNonRoot");
                assert!(capabilities.add.is_none(), "{what}: adds no capability");
            }
        }
    }
}

#[test]
fn webhook_args_parse_and_match_its_service_rbac_and_configuration() {
    let docs = installed();
    let (w, c) = component(&docs, "tessera-webhook");
    let options: tessera_webhook::app::Options = parse_args(c);
    assert!(
        options.self_provision,
        "the manifests rely on --self-provision"
    );
    assert!(
        !options.watch_namespaces,
        "--watch-namespaces needs namespace RBAC the manifests do not grant"
    );
    assert!(
        declares_port(c, options.listen.port()),
        "--listen port {} is not a container port",
        options.listen.port()
    );
    for probe in [&c.liveness_probe, &c.readiness_probe]
        .into_iter()
        .flatten()
    {
        let get = probe.http_get.as_ref().expect("httpGet probe");
        assert_eq!(
            get.scheme.as_deref(),
            Some("HTTPS"),
            "the webhook only speaks HTTPS"
        );
    }
    assert_eq!(
        env_field_ref(c, "POD_NAMESPACE"),
        Some("metadata.namespace"),
        "--namespace comes from POD_NAMESPACE"
    );
    assert_eq!(options.namespace, NAMESPACE, "default --namespace");
    assert_config_mounted(&docs, &w, c, options.config.as_deref().expect("--config"));
    let deployment = deployment(&docs, "tessera-webhook");
    assert_eq!(deployment.spec.as_ref().and_then(|s| s.replicas), Some(2));

    // The Service the certificate is issued for exists and reaches the port.
    let service = docs
        .iter()
        .find_map(|d| match &d.object {
            Object::Service(s)
                if s.metadata.name.as_deref() == Some(&options.service_name)
                    && s.metadata.namespace.as_deref() == Some(&options.namespace) =>
            {
                Some(s)
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Service {} for --service-name", options.service_name));

    // The webhook configuration it keeps the caBundle of.
    let configuration = find(
        &docs,
        |o| match o {
            Object::MutatingWebhookConfiguration(m) => Some(m),
            _ => None,
        },
        "MutatingWebhookConfiguration",
    );
    assert_eq!(
        configuration.metadata.name.as_deref(),
        Some(options.webhook_config_name.as_str())
    );
    let webhooks = configuration.webhooks.as_ref().expect("webhooks");
    assert!(!webhooks.is_empty());
    let config = installed_config(&docs);
    for hook in webhooks {
        assert_eq!(hook.failure_policy.as_deref(), Some("Fail"));
        assert_eq!(hook.side_effects, "None");
        assert!(hook.timeout_seconds.is_some_and(|t| (1..=30).contains(&t)));
        assert!(hook.admission_review_versions.contains(&"v1".to_owned()));
        assert!(
            hook.client_config.ca_bundle.is_none(),
            "the webhook fills in caBundle"
        );
        let target = hook
            .client_config
            .service
            .as_ref()
            .expect("a service reference");
        assert_eq!(target.name, options.service_name);
        assert_eq!(target.namespace, options.namespace);
        assert_eq!(target.path.as_deref(), Some("/mutate"));
        let port = target.port.unwrap_or(443);
        assert!(
            service
                .spec
                .as_ref()
                .and_then(|s| s.ports.as_ref())
                .is_some_and(|ports| ports.iter().any(|p| p.port == port)),
            "the webhook configuration calls port {port}, which the Service lacks"
        );
        let rules = hook.rules.as_ref().expect("rules");
        assert!(rules.iter().all(
            |r| r.operations.as_deref() == Some(&["CREATE".to_owned()][..])
                && r.resources.as_deref() == Some(&["pods".to_owned()][..])
        ));
        // Opted-out namespaces and pods never reach it.
        let ignored = BTreeMap::from([("hami.io/webhook".to_owned(), "ignore".to_owned())]);
        for selector in [&hook.namespace_selector, &hook.object_selector] {
            let selector = selector
                .as_ref()
                .expect("namespaceSelector and objectSelector");
            assert!(
                !label_selector_matches(selector, &ignored),
                "hami.io/webhook=ignore is excluded"
            );
            assert!(
                label_selector_matches(selector, &BTreeMap::new()),
                "unlabelled objects are included"
            );
        }
        // matchConditions let through every resource the config names.
        let conditions = hook.match_conditions.as_ref().expect("matchConditions");
        let expressions: String = conditions.iter().map(|c| c.expression.as_str()).collect();
        let resources = &config.resources;
        for resource in [
            &resources.gpu,
            &resources.memory,
            &resources.memory_percentage,
            &resources.cores,
            &resources.priority,
        ] {
            assert!(
                cel_names_resource(&expressions, resource),
                "matchConditions would keep pods naming {resource} away from the webhook"
            );
        }
        assert!(
            !cel_names_resource(&expressions, "cpu"),
            "matchConditions must not pass every pod"
        );
    }

    // RBAC names the same Secret and configuration.
    let rbac = load_file(&manifests_dir().join("rbac-webhook.yaml"));
    let rules: Vec<&PolicyRule> = rbac.iter().flat_map(|d| policy_rules(&d.object)).collect();
    let names_of = |resource: &str, verb: &str| -> Vec<String> {
        rules
            .iter()
            .filter(|r| {
                r.resources.iter().flatten().any(|x| x == resource)
                    && r.verbs.iter().any(|v| v == verb)
            })
            .flat_map(|r| {
                r.resource_names
                    .clone()
                    .unwrap_or_else(|| vec!["*".to_owned()])
            })
            .collect()
    };
    assert!(names_of("secrets", "get").contains(&options.ca_secret));
    assert!(!names_of("secrets", "create").is_empty());
    assert!(
        names_of("mutatingwebhookconfigurations", "patch").contains(&options.webhook_config_name)
    );
    assert!(names_of("mutatingwebhookconfigurations", "get").contains(&options.webhook_config_name));
}

/// Whether the CEL text lets a resource key through: it compares the key
/// to that name (`k == '…'`) or to a prefix of it (`k.startsWith('…')`).
fn cel_names_resource(expression: &str, resource: &str) -> bool {
    let literals = |marker: &str| -> Vec<String> {
        expression
            .match_indices(marker)
            .filter_map(|(i, _)| {
                let rest = &expression[i + marker.len()..];
                rest.split('\'').next().map(str::to_owned)
            })
            .collect()
    };
    literals("startsWith('")
        .iter()
        .any(|p| resource.starts_with(p.as_str()))
        || literals("== '").iter().any(|n| n == resource)
}

#[test]
fn scheduler_args_parse_and_match_its_lease_and_ports() {
    let docs = installed();
    let (w, c) = component(&docs, "tessera-scheduler");
    let args: tessera_scheduler::options::Args = parse_args(c);
    assert!(args.leader_elect, "two replicas need leader election");
    assert!(
        declares_port(c, args.metrics_address.port()),
        "--metrics-address port is not a container port"
    );
    assert_probe_paths(c);
    assert_eq!(
        env_field_ref(c, "POD_NAME"),
        Some("metadata.name"),
        "--identity from POD_NAME"
    );
    assert_eq!(
        env_field_ref(c, "POD_NAMESPACE"),
        Some("metadata.namespace"),
        "--lease-namespace from POD_NAMESPACE"
    );
    assert_config_mounted(&docs, &w, c, args.config.as_deref().expect("--config"));
    let deployment = deployment(&docs, "tessera-scheduler");
    assert_eq!(deployment.spec.as_ref().and_then(|s| s.replicas), Some(2));

    // The Lease RBAC is in the pod's namespace and names --lease-name.
    let rbac = load_file(&manifests_dir().join("rbac-scheduler.yaml"));
    let lease_rules: Vec<&PolicyRule> = rbac
        .iter()
        .filter(|d| matches!(d.object, Object::Role(_)) && namespace(&d.object) == w.namespace)
        .flat_map(|d| policy_rules(&d.object))
        .filter(|r| r.resources.iter().flatten().any(|x| x == "leases"))
        .collect();
    for verb in ["get", "update"] {
        assert!(
            lease_rules.iter().any(|r| r.verbs.iter().any(|v| v == verb)
                && r.resource_names
                    .as_ref()
                    .is_none_or(|n| n.contains(&args.lease_name))),
            "the scheduler cannot {verb} Lease {}",
            args.lease_name
        );
    }
    assert!(lease_rules
        .iter()
        .any(|r| r.verbs.iter().any(|v| v == "create")));
}

#[test]
fn node_agent_args_parse_and_match_its_host_mounts_and_image() {
    let docs = installed();
    let (w, c) = component(&docs, "tessera-node-agent");
    assert_eq!(w.kind, "DaemonSet");
    let options: tessera_node_agent::options::AgentOptions = parse_args(c);
    assert_eq!(
        env_field_ref(c, "NODE_NAME"),
        Some("spec.nodeName"),
        "--node-name from spec.nodeName"
    );
    assert_eq!(
        w.spec
            .node_selector
            .as_ref()
            .and_then(|s| s.get("gpu"))
            .map(String::as_str),
        Some("on"),
        "runs on nodes labelled gpu=on"
    );
    assert!(
        declares_port(c, options.metrics_addr.port()),
        "--metrics-addr port is not a container port"
    );
    assert_probe_paths(c);
    assert_config_mounted(&docs, &w, c, options.config.as_deref().expect("--config"));

    // A hostPath mounted at `path` inside whose host path is `host`.
    let host_mount = |path: &Path| -> String {
        let mount = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| path.starts_with(&m.mount_path))
            .unwrap_or_else(|| panic!("nothing is mounted over {}", path.display()));
        let volume = w
            .spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .expect("volume declared");
        assert_ne!(
            mount.read_only,
            Some(true),
            "{} must be writable",
            mount.mount_path
        );
        volume
            .host_path
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not a hostPath", mount.mount_path))
            .path
            .clone()
            + &path.to_string_lossy()[mount.mount_path.len()..]
    };
    // --host-dir must appear at the same path on the host and inside.
    assert_eq!(Path::new(&host_mount(&options.host_dir)), options.host_dir);
    // The kubelet socket's directory (where the agent's socket goes too).
    let socket_dir = options.kubelet_socket.parent().expect("socket directory");
    assert_eq!(Path::new(&host_mount(socket_dir)), socket_dir);

    // The image ships the interceptor where --interceptor-source expects it.
    let dockerfile = read(&repo_root().join("Dockerfile"));
    let source = options.interceptor_source.to_string_lossy().into_owned();
    assert!(
        dockerfile
            .lines()
            .any(|l| l.trim_start().starts_with("COPY") && l.trim_end().ends_with(&source)),
        "the Dockerfile does not COPY the interceptor to {source}"
    );
    assert!(
        dockerfile.contains("libtessera_cuda.so"),
        "the Dockerfile copies the cdylib tessera_cuda builds"
    );
    // The binaries each container runs are in the image.
    for w in workloads(&docs) {
        for c in &w.spec.containers {
            let command = c.command.as_ref().and_then(|c| c.first()).expect("command");
            let (dir, file) = command.rsplit_once('/').expect("an absolute command");
            assert!(
                dockerfile.contains(&format!("target/release/{file}"))
                    && dockerfile.contains(&format!(" {dir}/")),
                "the Dockerfile does not put {file} in {dir}"
            );
        }
    }
}

#[test]
fn examples_parse_reach_their_services_and_pass_the_webhook() {
    let config = installed_config(&installed());
    let examples = examples();
    assert!(examples.len() >= 8, "the examples are there");
    for (path, docs) in &examples {
        let file = path.display().to_string();
        check_services(docs);
        let pods = workloads(docs);
        assert!(!pods.is_empty(), "{file} holds no workload");
        for w in pods {
            let pod = Pod {
                metadata: ObjectMeta {
                    name: Some(w.name.to_owned()),
                    namespace: Some(w.namespace.to_owned()),
                    labels: Some(w.labels.clone()),
                    annotations: Some(w.annotations.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(w.spec.clone()),
                status: None,
            };
            let admitted = tessera_webhook::decision::mutate_pod(&pod, &config)
                .unwrap_or_else(|e| panic!("{file}: {} {}: {e}", w.kind, w.name));
            let spec = admitted.spec.as_ref().expect("spec");
            assert_eq!(
                spec.scheduler_name.as_deref(),
                Some(config.scheduler_name.as_str()),
                "{file}: {} is not sent to our scheduler",
                w.name
            );
            let request = PodGpuRequest::from_pod(&admitted, &config.resources)
                .unwrap_or_else(|e| panic!("{file}: {}: {e}", w.name));
            assert!(request.asks_for_gpu(), "{file}: {} asks for no GPU", w.name);
        }
    }
}

#[test]
fn the_vllm_examples_ask_for_their_slices() {
    let examples = examples();
    let docs_of = |file: &str| -> &Vec<Doc> {
        &examples
            .iter()
            .find(|(p, _)| p.file_name().is_some_and(|n| n == file))
            .unwrap_or_else(|| panic!("no example {file}"))
            .1
    };
    for (file, replicas, resource, amount) in [
        ("vllm-t4.yaml", 2, "nvidia.com/gpumem", "7500"),
        ("vllm-a10g.yaml", 1, "nvidia.com/gpumem-percentage", "45"),
    ] {
        let docs = docs_of(file);
        let deployment = docs
            .iter()
            .find_map(|d| match &d.object {
                Object::Deployment(dep) => Some(dep),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{file} has a Deployment"));
        let spec = deployment.spec.as_ref().expect("spec");
        assert_eq!(spec.replicas, Some(replicas), "{file}");
        let container = &spec.template.spec.as_ref().expect("pod spec").containers[0];
        assert!(
            container
                .image
                .as_deref()
                .is_some_and(|i| i.starts_with("vllm/vllm-openai")),
            "{file}"
        );
        let limits = container
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .expect("limits");
        assert_eq!(
            limits.get(resource).map(|q| q.0.as_str()),
            Some(amount),
            "{file}"
        );
        assert!(
            docs.iter().any(|d| matches!(d.object, Object::Service(_))),
            "{file} has a Service"
        );
    }
}

#[test]
fn the_quota_example_holds_three_of_its_five_replicas() {
    let examples = examples();
    let (_, docs) = examples
        .iter()
        .find(|(p, _)| p.file_name().is_some_and(|n| n == "gpu-quota.yaml"))
        .expect("manifests/examples/gpu-quota.yaml");
    let quota = docs
        .iter()
        .find_map(|d| match &d.object {
            Object::ResourceQuota(q) => Some(q.clone()),
            _ => None,
        })
        .expect("a ResourceQuota");
    let config = Config::default();
    let mut state = tessera_scheduler::core::ClusterState::new(config.clone());
    let node = tessera_testkit::fixtures::gpu_node(
        "gpu-1",
        &tessera_testkit::fixtures::t4_cards("GPU", 8),
        "100",
    );
    state.upsert_node(&node);
    let mut quota = quota;
    quota.metadata.namespace = Some("default".into());
    assert!(state.upsert_resource_quota(&quota).is_empty());
    let pods = workloads(docs);
    assert_eq!(pods.len(), 1, "one Deployment");
    let deployment = &pods[0];
    let mut placed = 0;
    for i in 0..5 {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(format!("{}-{i}", deployment.name)),
                namespace: Some("default".into()),
                ..ObjectMeta::default()
            },
            spec: Some(deployment.spec.clone()),
            status: None,
        };
        let pod = tessera_webhook::decision::mutate_pod(&pod, &config).expect("admitted");
        match state.schedule(&pod) {
            Ok(placement) => {
                state.assume(&placement.pod, placement.charge.clone());
                placed += 1;
            }
            Err(why) => assert!(why.to_string().contains("ResourceQuotaNotFit"), "{why}"),
        }
    }
    assert_eq!(placed, 3, "the example's comments promise three of five");
}

// ------------------------------------------------ admission policies

/// The ValidatingAdmissionPolicy called `name`.
fn admission_policy<'a>(docs: &'a [Doc], name: &str) -> &'a ValidatingAdmissionPolicy {
    docs.iter()
        .find_map(|d| match &d.object {
            Object::ValidatingAdmissionPolicy(p) if p.metadata.name.as_deref() == Some(name) => {
                Some(p)
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no ValidatingAdmissionPolicy {name} is installed"))
}

/// The bindings of the policy called `name`.
fn policy_bindings<'a>(docs: &'a [Doc], name: &str) -> Vec<&'a ValidatingAdmissionPolicyBinding> {
    docs.iter()
        .filter_map(|d| match &d.object {
            Object::ValidatingAdmissionPolicyBinding(b)
                if b.spec.as_ref().and_then(|s| s.policy_name.as_deref()) == Some(name) =>
            {
                Some(b)
            }
            _ => None,
        })
        .collect()
}

const NVIDIA_ENV_POLICY: &str = "tessera-nvidia-env";
const ANNOTATIONS_POLICY: &str = "tessera-allocation-annotations";
const OPT_OUT_POLICY: &str = "tessera-scheduler-requires-webhook";

/// The username a ServiceAccount authenticates as.
fn service_account_user(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

/// One admission request as a policy sees it.
struct PolicyRequest {
    operation: &'static str,
    /// `pods`, or `pods/<subresource>`.
    resource: &'static str,
    username: String,
    object: Json,
    old_object: Json,
}

impl PolicyRequest {
    fn by_user(operation: &'static str, resource: &'static str, object: Json) -> Self {
        Self {
            operation,
            resource,
            username: "jane@example.com".to_owned(),
            object,
            old_object: Json::Null,
        }
    }

    fn update(old_object: Json, object: Json) -> Self {
        Self {
            old_object,
            ..Self::by_user("UPDATE", "pods", object)
        }
    }

    fn by(mut self, username: String) -> Self {
        self.username = username;
        self
    }
}

/// What a policy answers.
#[derive(Debug, PartialEq)]
enum PolicyVerdict {
    /// The request is outside the policy's rules or its matchConditions.
    NotMatched,
    Allowed,
    /// Denied, with the evaluated message.
    Denied(String),
}

fn cel_value(value: &Json) -> cel::Value {
    cel::to_value(value).expect("JSON converts to a CEL value")
}

/// Runs a CEL expression of `policy` (named `what` in failures).
fn run_cel(expression: &str, context: &cel::Context<'_, '_>, what: &str) -> cel::Value {
    let program = cel::Program::compile(expression)
        .unwrap_or_else(|e| panic!("{what} does not parse as CEL: {e}\n{expression}"));
    program
        .execute(context)
        .unwrap_or_else(|e| panic!("{what} fails to evaluate: {e}\n{expression}"))
}

fn run_cel_bool(expression: &str, context: &cel::Context<'_, '_>, what: &str) -> bool {
    match run_cel(expression, context, what) {
        cel::Value::Bool(b) => b,
        other => panic!("{what} is not a bool: {other:?}"),
    }
}

/// Whether one of the policy's resource rules covers the request.
fn policy_matches(policy: &ValidatingAdmissionPolicy, request: &PolicyRequest) -> bool {
    let spec = policy.spec.as_ref().expect("policy spec");
    let rules = spec
        .match_constraints
        .as_ref()
        .and_then(|m| m.resource_rules.as_ref())
        .expect("policy resourceRules");
    rules.iter().any(|rule| {
        rule.api_groups.iter().flatten().any(|g| g.is_empty())
            && rule
                .operations
                .iter()
                .flatten()
                .any(|o| o == request.operation)
            && rule
                .resources
                .iter()
                .flatten()
                .any(|r| r == request.resource)
    })
}

/// Runs the policy as the API server does: resource rules, then
/// matchConditions, then the variables in order, then each validation
/// (with its messageExpression when it fails).
fn evaluate_policy(policy: &ValidatingAdmissionPolicy, request: &PolicyRequest) -> PolicyVerdict {
    if !policy_matches(policy, request) {
        return PolicyVerdict::NotMatched;
    }
    let spec = policy.spec.as_ref().expect("policy spec");
    let (resource, sub_resource) = request
        .resource
        .split_once('/')
        .unwrap_or((request.resource, ""));
    let mut context = cel::Context::default();
    context.add_variable_from_value("object", cel_value(&request.object));
    context.add_variable_from_value("oldObject", cel_value(&request.old_object));
    context.add_variable_from_value(
        "request",
        cel_value(&serde_json::json!({
            "operation": request.operation,
            "resource": {"group": "", "version": "v1", "resource": resource},
            "subResource": sub_resource,
            "userInfo": {"username": request.username},
        })),
    );
    for condition in spec.match_conditions.iter().flatten() {
        let what = format!("matchCondition {}", condition.name);
        if !run_cel_bool(&condition.expression, &context, &what) {
            return PolicyVerdict::NotMatched;
        }
    }
    let mut variables: std::collections::HashMap<String, cel::Value> =
        std::collections::HashMap::new();
    for variable in spec.variables.iter().flatten() {
        context.add_variable_from_value("variables", variables.clone());
        let value = run_cel(
            &variable.expression,
            &context,
            &format!("variable {}", variable.name),
        );
        variables.insert(variable.name.clone(), value);
    }
    context.add_variable_from_value("variables", variables);
    for validation in spec.validations.iter().flatten() {
        if !run_cel_bool(&validation.expression, &context, "validation") {
            let message = validation
                .message_expression
                .as_deref()
                .expect("every validation has a messageExpression");
            return match run_cel(message, &context, "messageExpression") {
                cel::Value::String(text) => PolicyVerdict::Denied(text.to_string()),
                other => panic!("messageExpression is not a string: {other:?}"),
            };
        }
    }
    PolicyVerdict::Allowed
}

/// A variable of the policy that needs no request (a constant list), as JSON.
fn policy_constant(policy: &ValidatingAdmissionPolicy, name: &str) -> Json {
    let spec = policy.spec.as_ref().expect("policy spec");
    let variable = spec
        .variables
        .iter()
        .flatten()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("policy has no variable {name}"));
    let value = run_cel(
        &variable.expression,
        &cel::Context::default(),
        &format!("variable {name}"),
    );
    value.json().expect("a constant converts to JSON")
}

/// A pod as the API server hands it to admission.
fn sample_pod(annotations: Json, spec: Json) -> Json {
    let mut pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "trainer-x7k2p", "namespace": "ml-team", "labels": {"app": "trainer"}},
        "spec": {"containers": [{"name": "trainer", "image": "pytorch"}]},
    });
    if !annotations.is_null() {
        pod["metadata"]["annotations"] = annotations;
    }
    json_merge(&mut pod["spec"], &spec);
    pod
}

/// Merges `patch`'s object fields into `target` (one level).
fn json_merge(target: &mut Json, patch: &Json) {
    if let (Some(target), Some(patch)) = (target.as_object_mut(), patch.as_object()) {
        for (key, value) in patch {
            target.insert(key.clone(), value.clone());
        }
    }
}

#[test]
fn admission_policies_are_bound_fail_closed_and_cover_their_operations() {
    let docs = installed();
    let policies: Vec<&ValidatingAdmissionPolicy> = docs
        .iter()
        .filter_map(|d| match &d.object {
            Object::ValidatingAdmissionPolicy(p) => Some(p),
            _ => None,
        })
        .collect();
    let names: BTreeSet<&str> = policies
        .iter()
        .filter_map(|p| p.metadata.name.as_deref())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([NVIDIA_ENV_POLICY, ANNOTATIONS_POLICY, OPT_OUT_POLICY]),
        "the kustomization installs the three policies"
    );
    for policy in &policies {
        let name = policy.metadata.name.as_deref().unwrap_or_default();
        let spec = policy.spec.as_ref().expect("spec");
        assert_eq!(
            spec.failure_policy.as_deref(),
            Some("Fail"),
            "{name}: failurePolicy"
        );
        assert!(
            !spec.validations.as_deref().unwrap_or_default().is_empty(),
            "{name}: validations"
        );
        for validation in spec.validations.iter().flatten() {
            assert!(
                validation.message_expression.is_some(),
                "{name}: every validation says what is wrong"
            );
            assert_eq!(validation.reason.as_deref(), Some("Forbidden"), "{name}");
        }
        let bindings = policy_bindings(&docs, name);
        assert_eq!(bindings.len(), 1, "{name}: exactly one binding");
        let binding = bindings[0].spec.as_ref().expect("binding spec");
        assert_eq!(
            binding.validation_actions.as_deref(),
            Some(&["Deny".to_owned()][..]),
            "{name}: the binding denies"
        );
    }
    // Every binding names an installed policy.
    for doc in &docs {
        if let Object::ValidatingAdmissionPolicyBinding(b) = &doc.object {
            let policy = b.spec.as_ref().and_then(|s| s.policy_name.as_deref());
            assert!(
                policy.is_some_and(|p| names.contains(p)),
                "{}: binding {} names policy {policy:?}, which is not installed",
                doc.file,
                name(&doc.object)
            );
        }
    }
    let covers = |policy: &str, operation: &'static str, resource: &'static str| {
        policy_matches(
            admission_policy(&docs, policy),
            &PolicyRequest::by_user(operation, resource, Json::Null),
        )
    };
    for (operation, resource) in [
        ("CREATE", "pods"),
        ("UPDATE", "pods"),
        ("UPDATE", "pods/status"),
        ("CREATE", "pods/binding"),
    ] {
        assert!(
            covers(ANNOTATIONS_POLICY, operation, resource),
            "{ANNOTATIONS_POLICY} covers {operation} {resource}"
        );
    }
    assert!(!covers(ANNOTATIONS_POLICY, "DELETE", "pods"));
    assert!(covers(NVIDIA_ENV_POLICY, "CREATE", "pods"));
    assert!(covers(
        NVIDIA_ENV_POLICY,
        "UPDATE",
        "pods/ephemeralcontainers"
    ));
    assert!(
        !covers(NVIDIA_ENV_POLICY, "UPDATE", "pods"),
        "pod env cannot change on UPDATE; checking it would block finalizer removal on old pods"
    );
    assert!(covers(OPT_OUT_POLICY, "CREATE", "pods"));
}

#[test]
fn admission_policies_name_what_the_code_names() {
    let docs = installed();
    let annotations = admission_policy(&docs, ANNOTATIONS_POLICY);
    let owned: Vec<String> =
        serde_json::from_value(policy_constant(annotations, "ownedKeys")).expect("a list of keys");
    assert_eq!(owned, tessera_api::names::allocation::SCHEDULER_OWNED);
    assert_eq!(
        policy_constant(annotations, "ownedPrefix"),
        tessera_webhook::decision::TESSERA_ANNOTATION_PREFIX
    );
    let nvidia = admission_policy(&docs, NVIDIA_ENV_POLICY);
    let forbidden: Vec<String> =
        serde_json::from_value(policy_constant(nvidia, "forbiddenEnv")).expect("a list of names");
    assert!(forbidden.contains(&tessera_api::container_env::VISIBLE_DEVICES.to_owned()));
    assert!(forbidden.contains(&"NVIDIA_DRIVER_CAPABILITIES".to_owned()));
    let roots: Vec<String> = serde_json::from_value(policy_constant(nvidia, "deviceListRoots"))
        .expect("a list of paths");
    assert!(
        roots.contains(&tessera_node_agent::allocate::response::DEVICE_LIST_MOUNT_ROOT.to_owned())
    );
}

#[test]
fn only_tessera_service_accounts_may_write_allocation_annotations() {
    let docs = installed();
    let policy = admission_policy(&docs, ANNOTATIONS_POLICY);
    // The accounts the scheduler and node agent run as, from their RBAC
    // files and workloads.
    let mut tessera_users = Vec::new();
    for component in ["scheduler", "node-agent"] {
        let rbac = load_file(&manifests_dir().join(format!("rbac-{component}.yaml")));
        let account = rbac
            .iter()
            .find_map(|d| match &d.object {
                Object::ServiceAccount(a) => Some(a),
                _ => None,
            })
            .expect("a ServiceAccount");
        let (account_ns, account_name) = (
            account.metadata.namespace.as_deref().expect("namespace"),
            account.metadata.name.as_deref().expect("name"),
        );
        let w = workload(&docs, &format!("tessera-{component}"));
        assert_eq!(w.spec.service_account_name.as_deref(), Some(account_name));
        tessera_users.push(service_account_user(account_ns, account_name));
    }

    let allocated = serde_json::json!({
        "hami.io/vgpu-node": "gpu-node-1",
        "hami.io/vgpu-devices-allocated": "GPU-0b1c,NVIDIA,7500,30:;",
        "hami.io/vgpu-devices-to-allocate": "GPU-0b1c,NVIDIA,7500,30:;",
        "hami.io/bind-phase": "allocating",
        "tessera.io/allocation-signature": "c2lnbmF0dXJl",
    });
    let pending = sample_pod(Json::Null, Json::Null);
    let bound = sample_pod(allocated.clone(), Json::Null);
    let with = |key: &str, value: Option<&str>| {
        let mut annotations = allocated.clone();
        match value {
            Some(v) => annotations[key] = Json::from(v),
            None => {
                annotations.as_object_mut().unwrap().remove(key);
            }
        }
        sample_pod(annotations, Json::Null)
    };
    let binding = serde_json::json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": "trainer-x7k2p", "namespace": "ml-team", "annotations": allocated},
        "target": {"kind": "Node", "name": "gpu-node-1"},
    });
    let denied = |request: PolicyRequest, key: &str| match evaluate_policy(policy, &request) {
        PolicyVerdict::Denied(message) => {
            assert!(message.contains(key), "{message}");
            assert!(message.contains(&request.username), "{message}");
            assert!(
                message.contains("only the Tessera scheduler and node agent"),
                "{message}"
            );
        }
        other => panic!("expected a denial naming {key}, got {other:?}"),
    };

    // CREATE carrying any owned annotation, each alone.
    for key in tessera_api::names::allocation::SCHEDULER_OWNED
        .into_iter()
        .chain(["tessera.io/allocation-signature", "tessera.io/anything"])
    {
        let pod = sample_pod(serde_json::json!({ key: "x", "team": "ml" }), Json::Null);
        denied(PolicyRequest::by_user("CREATE", "pods", pod), key);
    }
    // UPDATE that adds, changes or removes one. (The message names one
    // changed key; map order is unspecified, so each case changes one.)
    let only = |key: &str| sample_pod(serde_json::json!({ key: "x" }), Json::Null);
    denied(
        PolicyRequest::update(pending.clone(), only("hami.io/bind-phase")),
        "hami.io/bind-phase",
    );
    denied(
        PolicyRequest::update(bound.clone(), with("hami.io/vgpu-node", Some("gpu-node-2"))),
        "hami.io/vgpu-node",
    );
    denied(
        PolicyRequest::update(bound.clone(), with("hami.io/bind-phase", None)),
        "hami.io/bind-phase",
    );
    denied(
        PolicyRequest::update(
            bound.clone(),
            with("tessera.io/allocation-signature", Some("forged")),
        ),
        "tessera.io/allocation-signature",
    );
    let mut status_update =
        PolicyRequest::update(bound.clone(), with("hami.io/vgpu-devices-allocated", None));
    status_update.resource = "pods/status";
    denied(status_update, "hami.io/vgpu-devices-allocated");
    // A Binding carries annotations onto the pod.
    let mut forged_binding = binding.clone();
    forged_binding["metadata"]["annotations"] = serde_json::json!({"hami.io/vgpu-node": "n"});
    denied(
        PolicyRequest::by_user("CREATE", "pods/binding", forged_binding),
        "hami.io/vgpu-node",
    );

    // Allowed: pods without them, and updates that leave them as they are.
    let allowed = |request: PolicyRequest| {
        assert_eq!(evaluate_policy(policy, &request), PolicyVerdict::Allowed);
    };
    allowed(PolicyRequest::by_user(
        "CREATE",
        "pods",
        sample_pod(
            serde_json::json!({"hami.io/gpu-scheduler-policy": "binpack", "nvidia.com/use-gputype": "A10G"}),
            Json::Null,
        ),
    ));
    allowed(PolicyRequest::by_user("CREATE", "pods", pending.clone()));
    let mut relabelled = bound.clone();
    relabelled["metadata"]["labels"]["tier"] = Json::from("gold");
    relabelled["metadata"]["annotations"]["team"] = Json::from("ml");
    relabelled["metadata"]["finalizers"] = serde_json::json!(["example.com/keep"]);
    allowed(PolicyRequest::update(bound.clone(), relabelled));
    allowed(PolicyRequest::update(pending.clone(), pending.clone()));
    let mut plain_binding = binding.clone();
    plain_binding["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    allowed(PolicyRequest::by_user(
        "CREATE",
        "pods/binding",
        plain_binding,
    ));

    // Tessera's own accounts are outside the policy; the webhook's is not.
    for user in &tessera_users {
        for request in [
            PolicyRequest::by_user("CREATE", "pods/binding", binding.clone()),
            PolicyRequest::update(pending.clone(), bound.clone()),
            PolicyRequest::update(bound.clone(), with("hami.io/bind-phase", Some("success"))),
        ] {
            assert_eq!(
                evaluate_policy(policy, &request.by(user.clone())),
                PolicyVerdict::NotMatched,
                "{user}"
            );
        }
    }
    let webhook = service_account_user(NAMESPACE, "tessera-webhook");
    denied(
        PolicyRequest::update(pending, only("tessera.io/allocation-signature")).by(webhook),
        "tessera.io/allocation-signature",
    );
}

#[test]
fn nvidia_env_is_denied_outside_allowed_namespaces() {
    let docs = installed();
    let policy = admission_policy(&docs, NVIDIA_ENV_POLICY);
    let denied = |request: PolicyRequest, container: &str, what: &str| match evaluate_policy(
        policy, &request,
    ) {
        PolicyVerdict::Denied(message) => {
            assert!(
                message.contains(&format!("container {container} ")),
                "{message}"
            );
            assert!(message.contains(what), "{message}");
            assert!(
                message.contains("tessera.io/allow-nvidia-env=true"),
                "{message}"
            );
        }
        other => panic!("expected a denial of {container}, got {other:?}"),
    };
    let create =
        |spec: Json| PolicyRequest::by_user("CREATE", "pods", sample_pod(Json::Null, spec));
    for variable in ["NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES"] {
        let env = serde_json::json!([{"name": "HOME", "value": "/tmp"}, {"name": variable, "value": "all"}]);
        denied(
            create(serde_json::json!({"containers": [
                {"name": "web", "image": "nginx"},
                {"name": "miner", "image": "cuda", "env": env}
            ]})),
            "miner",
            "sets NVIDIA_VISIBLE_DEVICES or NVIDIA_DRIVER_CAPABILITIES",
        );
        denied(
            create(serde_json::json!({
                "containers": [{"name": "web", "image": "nginx"}],
                "initContainers": [{"name": "setup", "image": "cuda", "env": env}]
            })),
            "setup",
            "NVIDIA_VISIBLE_DEVICES",
        );
        // An ephemeral container added later, through its subresource.
        let running = sample_pod(Json::Null, Json::Null);
        let mut debugged = running.clone();
        debugged["spec"]["ephemeralContainers"] =
            serde_json::json!([{"name": "debugger", "image": "cuda", "env": env}]);
        let mut request = PolicyRequest::update(running, debugged);
        request.resource = "pods/ephemeralcontainers";
        denied(request, "debugger", "NVIDIA_VISIBLE_DEVICES");
    }
    for path in [
        "/var/run/nvidia-container-devices/all",
        "/var/run/nvidia-container-devices",
        "/run/nvidia-container-devices/GPU-0b1c",
    ] {
        denied(
            create(serde_json::json!({"containers": [
                {"name": "miner", "image": "cuda", "volumeMounts": [{"name": "null", "mountPath": path}]}
            ]})),
            "miner",
            "/var/run/nvidia-container-devices",
        );
    }
    // Ordinary pods, GPU pods and their own settings pass.
    let allowed = |request: PolicyRequest| {
        assert_eq!(evaluate_policy(policy, &request), PolicyVerdict::Allowed);
    };
    allowed(create(Json::Null));
    allowed(create(serde_json::json!({"containers": [{
        "name": "trainer", "image": "pytorch",
        "env": [{"name": "CUDA_VISIBLE_DEVICES", "value": "0"}, {"name": "NVIDIA_TF32_OVERRIDE", "value": "0"}],
        "volumeMounts": [{"name": "data", "mountPath": "/var/run/nvidia-container-devices-cache"}],
        "resources": {"limits": {"nvidia.com/gpumem": "7500"}}
    }]})));
    // What the webhook writes with overwriteEnv gives no card.
    for value in ["none", "void"] {
        allowed(create(serde_json::json!({"containers": [{
            "name": "web", "image": "cuda",
            "env": [{"name": "NVIDIA_VISIBLE_DEVICES", "value": value}]
        }]})));
    }
    denied(
        create(serde_json::json!({"containers": [{
            "name": "web", "image": "cuda",
            "env": [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "none"},
                    {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"}]
        }]})),
        "web",
        "NVIDIA_VISIBLE_DEVICES",
    );
    for (path, docs) in examples() {
        for w in workloads(&docs) {
            let pod = sample_pod(Json::Null, serde_json::to_value(w.spec).expect("spec"));
            assert_eq!(
                evaluate_policy(policy, &PolicyRequest::by_user("CREATE", "pods", pod)),
                PolicyVerdict::Allowed,
                "{}: {}",
                path.display(),
                w.name
            );
        }
    }

    // The node agent asks for every card; its namespace is exempt by label,
    // and the binding selects every other namespace.
    let agent = workload(&docs, "tessera-node-agent");
    let agent_pod = sample_pod(Json::Null, serde_json::to_value(agent.spec).expect("spec"));
    assert!(matches!(
        evaluate_policy(policy, &PolicyRequest::by_user("CREATE", "pods", agent_pod)),
        PolicyVerdict::Denied(_)
    ));
    let bindings = policy_bindings(&docs, NVIDIA_ENV_POLICY);
    let selector = bindings[0]
        .spec
        .as_ref()
        .and_then(|s| s.match_resources.as_ref())
        .and_then(|m| m.namespace_selector.as_ref())
        .expect("the binding selects namespaces");
    let namespace_labels = |ns: &Namespace| -> BTreeMap<String, String> {
        let mut labels = ns.metadata.labels.clone().unwrap_or_default();
        let name = ns.metadata.name.clone().unwrap_or_default();
        labels.insert("kubernetes.io/metadata.name".to_owned(), name);
        labels
    };
    let ours = find(
        &docs,
        |o| match o {
            Object::Namespace(n) => Some(n),
            _ => None,
        },
        "Namespace",
    );
    assert_eq!(ours.metadata.name.as_deref(), Some(agent.namespace));
    assert!(
        !label_selector_matches(selector, &namespace_labels(ours)),
        "{NAMESPACE} is exempt"
    );
    let other = |labels: &[(&str, &str)], name: &str| {
        let mut map: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        map.insert("kubernetes.io/metadata.name".to_owned(), name.to_owned());
        map
    };
    assert!(label_selector_matches(selector, &other(&[], "ml-team")));
    assert!(label_selector_matches(
        selector,
        &other(&[("hami.io/webhook", "ignore")], "batch")
    ));
    assert!(label_selector_matches(
        selector,
        &other(&[("tessera.io/allow-nvidia-env", "false")], "ml-team")
    ));
    assert!(!label_selector_matches(
        selector,
        &other(&[("tessera.io/allow-nvidia-env", "true")], "gpu-operator")
    ));
}

#[test]
fn pods_that_skip_the_webhook_cannot_name_our_scheduler() {
    let docs = installed();
    let policy = admission_policy(&docs, OPT_OUT_POLICY);
    let config = installed_config(&docs);
    assert_eq!(
        policy_constant(policy, "schedulerName"),
        Json::from(config.scheduler_name.clone()),
        "the policy names the configured scheduler"
    );
    let pod = |labels: Json, scheduler: Option<&str>| {
        let mut pod = sample_pod(Json::Null, Json::Null);
        if labels.is_null() {
            pod["metadata"].as_object_mut().unwrap().remove("labels");
        } else {
            pod["metadata"]["labels"] = labels;
        }
        if let Some(name) = scheduler {
            pod["spec"]["schedulerName"] = Json::from(name);
        }
        PolicyRequest::by_user("CREATE", "pods", pod)
    };
    let ignore = serde_json::json!({
        tessera_api::names::WEBHOOK_IGNORE_LABEL: tessera_api::names::WEBHOOK_IGNORE_VALUE,
        "app": "trainer",
    });
    match evaluate_policy(policy, &pod(ignore.clone(), Some(&config.scheduler_name))) {
        PolicyVerdict::Denied(message) => {
            assert!(message.contains("hami.io/webhook=ignore"), "{message}");
            assert!(message.contains(&config.scheduler_name), "{message}");
            assert!(message.contains("remove the label"), "{message}");
        }
        other => panic!("expected a denial, got {other:?}"),
    }
    for (labels, scheduler) in [
        (ignore.clone(), None),
        (ignore.clone(), Some("default-scheduler")),
        (ignore, Some("volcano")),
        (
            serde_json::json!({"app": "trainer"}),
            Some(config.scheduler_name.as_str()),
        ),
        (
            serde_json::json!({"hami.io/webhook": "enabled"}),
            Some(config.scheduler_name.as_str()),
        ),
        (Json::Null, Some(config.scheduler_name.as_str())),
    ] {
        assert_eq!(
            evaluate_policy(policy, &pod(labels.clone(), scheduler)),
            PolicyVerdict::Allowed,
            "{labels} {scheduler:?}"
        );
    }
}

// ------------------------------------------------------------ monitoring

/// Metric names the components expose: the `# TYPE` lines of their real
/// renderings, and every HAMi family from the components' tables.
fn exposed_metrics() -> BTreeSet<String> {
    let scheduler = tessera_scheduler::shell::metrics::SchedulerMetrics::new();
    scheduler.count_decision("placed");
    let scheduler = scheduler.render(
        &tessera_scheduler::core::ClusterState::new(Config::default()),
        &[],
    );
    // Counter families render once they have a sample.
    let webhook = tessera_webhook::metrics::WebhookMetrics::new();
    webhook.observe(
        tessera_webhook::metrics::Outcome::Mutated,
        std::time::Duration::from_micros(100),
    );
    let webhook = webhook.render();
    let gpus = tessera_node_agent::gpu::fake::FakeGpus::parse("1x Tesla T4 15360", "node")
        .expect("fake cards");
    let cards: Arc<[tessera_node_agent::gpu::GpuInfo]> =
        tessera_node_agent::gpu::GpuBackend::discover(&gpus)
            .expect("cards")
            .into();
    // One container whose region no process has initialised yet (an empty
    // file): its families render, with zero usage.
    let region = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("manifests-region-{}.cache", std::process::id()));
    std::fs::write(&region, b"").expect("write an empty region file");
    let container = tessera_node_agent::metrics::ContainerRecord {
        namespace: "ns".to_owned(),
        pod: "pod".to_owned(),
        container: "main".to_owned(),
        region: region.clone(),
        cards: vec![cards[0].uuid.clone()],
        card_memory_mib: vec![1024],
        priority: None,
    };
    let agent = tessera_node_agent::metrics::Metrics::new(
        "node",
        Arc::new(gpus),
        cards,
        Arc::new(RwLock::new(vec![container])),
    )
    .render();
    let _ = std::fs::remove_file(region);
    // HAMi's families are written only while they have series (none for an
    // empty cluster): their tables list them all.
    let hami = tessera_scheduler::shell::metrics::HAMI_SCHEDULER_FAMILIES
        .iter()
        .chain(tessera_node_agent::metrics::HAMI_MONITOR_FAMILIES)
        .map(|family| family.name.to_owned());
    [scheduler, webhook, agent]
        .iter()
        .flat_map(|text| text.lines())
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .chain(hami)
        .collect()
}

/// Whether a queried series name belongs to an exposed family (counters
/// get `_total`, histograms `_bucket`, `_sum`, `_count`).
fn is_exposed(series: &str, exposed: &BTreeSet<String>) -> bool {
    exposed.contains(series)
        || ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| {
                series
                    .strip_suffix(suffix)
                    .is_some_and(|base| exposed.contains(base))
            })
}

#[test]
fn monitoring_targets_our_services_and_queries_exposed_metrics() {
    let dir = manifests_dir().join("monitoring");
    let kustomization = kustomization(&dir);
    let installed = installed();
    let services: Vec<&Service> = installed
        .iter()
        .filter_map(|d| match &d.object {
            Object::Service(s) => Some(s),
            _ => None,
        })
        .collect();
    let mut monitors = 0;
    for resource in kustomization["resources"].as_array().expect("resources") {
        let path = dir.join(resource.as_str().expect("a path"));
        for monitor in yaml_documents(&read(&path), &path.display().to_string()) {
            assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
            assert_eq!(monitor["kind"], "ServiceMonitor", "{}", path.display());
            monitors += 1;
            let selector: LabelSelector =
                serde_json::from_value(monitor["spec"]["selector"].clone())
                    .expect("a label selector");
            let namespaces = monitor["spec"]["namespaceSelector"]["matchNames"].clone();
            assert_eq!(namespaces, serde_json::json!([NAMESPACE]));
            let matched: Vec<&&Service> = services
                .iter()
                .filter(|s| {
                    label_selector_matches(&selector, s.metadata.labels.as_ref().expect("labels"))
                })
                .collect();
            assert_eq!(
                matched.len(),
                1,
                "{}: selects exactly one Service",
                describe(&monitor)
            );
            let ports = matched[0]
                .spec
                .as_ref()
                .and_then(|s| s.ports.clone())
                .unwrap_or_default();
            for endpoint in monitor["spec"]["endpoints"].as_array().expect("endpoints") {
                let port = endpoint["port"].as_str().expect("endpoint port name");
                assert!(
                    ports.iter().any(|p| p.name.as_deref() == Some(port)),
                    "{}: the Service has no port {port}",
                    describe(&monitor)
                );
            }
        }
    }
    assert_eq!(monitors, 3, "one ServiceMonitor per component");

    // Every listed file exists, every file is listed.
    let generated: Vec<String> = kustomization["configMapGenerator"]
        .as_array()
        .expect("configMapGenerator for the dashboard")
        .iter()
        .flat_map(|g| g["files"].as_array().cloned().unwrap_or_default())
        .map(|f| {
            f.as_str()
                .expect("file")
                .rsplit('=')
                .next()
                .expect("file")
                .to_owned()
        })
        .collect();
    assert!(!generated.is_empty());
    let exposed = exposed_metrics();
    for required in [
        "hami_gpu_memory_allocated_bytes",
        "hami_gpu_memory_limit_bytes",
        "hami_vgpu_memory_used_bytes",
        "hami_vgpu_memory_limit_bytes",
        "tessera_scheduler_decision_duration_seconds",
        "tessera_scheduler_bind_duration_seconds",
        "tessera_scheduler_queue_depth",
        "tessera_scheduler_bind_failures",
        "tessera_webhook_admissions",
    ] {
        assert!(
            exposed.contains(required),
            "the components no longer expose {required}"
        );
    }
    let mut queried = BTreeSet::new();
    for file in &generated {
        let dashboard: Json = serde_json::from_str(&read(&dir.join(file)))
            .unwrap_or_else(|e| panic!("{file} is not JSON: {e}"));
        let mut expressions = Vec::new();
        collect_exprs(&dashboard, &mut expressions);
        assert!(!expressions.is_empty(), "{file} has queries");
        for expr in expressions {
            // HAMi's label names since v2.10 (`node`, `device_uuid`,
            // `namespace`, `pod`, ...): the legacy ones exist only on the
            // legacy families, which the dashboard does not query.
            for legacy in [
                "nodeid",
                "deviceuuid",
                "deviceidx",
                "devicetype",
                "podnamespace",
                "podname",
                "ctrname",
                "vdeviceid",
                "containeridx",
            ] {
                assert!(
                    !expr.contains(legacy),
                    "{file}: query {expr:?} uses HAMi's legacy label `{legacy}`"
                );
            }
            for series in metric_names(&expr) {
                assert!(
                    is_exposed(&series, &exposed),
                    "{file}: query {expr:?} uses {series}, which no component exposes"
                );
                queried.insert(series);
            }
        }
    }
    for family in [
        "hami_gpu_memory_allocated_bytes",
        "hami_vgpu_memory_used_bytes",
        "tessera_scheduler_decision_duration_seconds_bucket",
        "tessera_scheduler_bind_duration_seconds_bucket",
        "tessera_scheduler_queue_depth",
        "tessera_scheduler_bind_failures_total",
        "tessera_webhook_admissions_total",
    ] {
        assert!(
            queried.contains(family),
            "the dashboard does not show {family}"
        );
    }
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("path").to_owned())
        .chain(generated)
        .collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("monitoring/")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n != "kustomization.yaml")
        .collect();
    assert_eq!(
        on_disk, listed,
        "monitoring/ files and its kustomization differ"
    );
}

fn collect_exprs(value: &Json, out: &mut Vec<String>) {
    match value {
        Json::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Json::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Json::Array(list) => list.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// Our metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let at_word_start =
            i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if at_word_start && (expr[i..].starts_with("hami_") || expr[i..].starts_with("tessera_")) {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expr.len(), |n| i + n);
            names.push(expr[i..end].to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    names
}
