//! The object store: every object as JSON keyed by (apiVersion, resource,
//! namespace, name), the global resourceVersion counter, the full write
//! history that watches replay from, and the write rules the real API server
//! applies (create defaults, optimistic concurrency, status subresource,
//! binding). Also the `Status` error type every handler returns.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokio::sync::watch;

/// Where one object lives. Cluster-scoped objects have an empty namespace.
/// Field order matters: the derived ordering lets lists be range scans.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ObjectKey {
    pub api_version: String,
    pub resource: String,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(api_version: &str, resource: &str, namespace: &str, name: &str) -> Self {
        Self {
            api_version: api_version.to_owned(),
            resource: resource.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

/// The kind of change a history entry records, as watch events name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One committed write. `previous` is the object before a modification or
/// deletion, so filtered watches can tell objects entering and leaving the
/// selection apart.
#[derive(Debug)]
pub(crate) struct HistoryEntry {
    pub rv: u64,
    pub key: ObjectKey,
    pub event: EventType,
    pub object: Arc<Value>,
    pub previous: Option<Arc<Value>>,
}

/// How an update treats the stored object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpdateMode {
    /// Write to the main resource: `.status` is kept from the store for
    /// resources that have a status subresource.
    Main,
    /// Write to `/status`: only `.status` changes.
    Status,
    /// Test hook: replace everything but identity, no precondition.
    Raw,
}

/// A failure, rendered as a Kubernetes `Status` object.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }
    pub fn not_found(resource: &str, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{resource} \"{name}\" not found"))
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }
    pub fn conflict(resource: &str, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {resource} \"{name}\": {why}"),
        )
    }
    /// The reason the real server gives for a bare status code (fault injection).
    pub fn for_code(code: u16, message: impl Into<String>) -> Self {
        let reason = match code {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            405 => "MethodNotAllowed",
            409 => "Conflict",
            410 => "Expired",
            422 => "Invalid",
            429 => "TooManyRequests",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "InternalError",
        };
        Self::new(code, reason, message)
    }
    pub fn to_status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

const STALE: &str =
    "the object has been modified; please apply your changes to the latest version and try again";

/// The Kind for a resource plural; unknown plurals get a best guess.
pub(crate) fn kind_of(resource: &str) -> String {
    let known = match resource {
        "pods" => "Pod",
        "nodes" => "Node",
        "events" => "Event",
        "leases" => "Lease",
        "secrets" => "Secret",
        "configmaps" => "ConfigMap",
        "namespaces" => "Namespace",
        "services" => "Service",
        "serviceaccounts" => "ServiceAccount",
        "endpoints" => "Endpoints",
        "bindings" => "Binding",
        "deployments" => "Deployment",
        "daemonsets" => "DaemonSet",
        "replicasets" => "ReplicaSet",
        "statefulsets" => "StatefulSet",
        "replicationcontrollers" => "ReplicationController",
        "persistentvolumes" => "PersistentVolume",
        "persistentvolumeclaims" => "PersistentVolumeClaim",
        "storageclasses" => "StorageClass",
        "csinodes" => "CSINode",
        "priorityclasses" => "PriorityClass",
        "poddisruptionbudgets" => "PodDisruptionBudget",
        "resourcequotas" => "ResourceQuota",
        "mutatingwebhookconfigurations" => "MutatingWebhookConfiguration",
        "validatingwebhookconfigurations" => "ValidatingWebhookConfiguration",
        _ => "",
    };
    if !known.is_empty() {
        return known.to_owned();
    }
    let singular = resource.strip_suffix('s').unwrap_or(resource);
    let mut chars = singular.chars();
    chars
        .next()
        .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
        .unwrap_or_default()
}

/// Resources whose `.status` is written only through `/status`.
pub(crate) fn has_status_subresource(resource: &str) -> bool {
    matches!(
        resource,
        "pods"
            | "nodes"
            | "namespaces"
            | "deployments"
            | "daemonsets"
            | "replicasets"
            | "persistentvolumes"
            | "persistentvolumeclaims"
            | "poddisruptionbudgets"
            | "resourcequotas"
    )
}

/// Resources without a namespace (used by the test hooks to default one).
pub(crate) fn is_cluster_scoped(resource: &str) -> bool {
    matches!(
        resource,
        "nodes"
            | "namespaces"
            | "mutatingwebhookconfigurations"
            | "validatingwebhookconfigurations"
            | "persistentvolumes"
            | "clusterroles"
            | "clusterrolebindings"
            | "priorityclasses"
            | "runtimeclasses"
            | "storageclasses"
            | "csinodes"
    )
}

pub(crate) fn str_at<'a>(object: &'a Value, pointer: &str) -> &'a str {
    object
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// `object.metadata` as a map, created when missing.
fn metadata_mut(object: &mut Value) -> Result<&mut Map<String, Value>, ApiError> {
    let map = object
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("the request body must be a JSON object"))?;
    map.entry("metadata")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("metadata must be a JSON object"))
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// All objects, the counter and the history.
#[derive(Debug)]
pub(crate) struct Store {
    rv: u64,
    objects: BTreeMap<ObjectKey, Arc<Value>>,
    history: Vec<HistoryEntry>,
    notify: watch::Sender<u64>,
    uid_seed: u64,
}

impl Store {
    pub fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self {
            rv: 0,
            objects: BTreeMap::new(),
            history: Vec::new(),
            notify: watch::channel(0).0,
            uid_seed: seed,
        }
    }

    /// A receiver that changes whenever a write commits.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn get(&self, key: &ObjectKey) -> Option<&Arc<Value>> {
        self.objects.get(key)
    }

    /// Objects of one resource, in one namespace or (None) all of them.
    pub fn list<'a>(
        &'a self,
        api_version: &'a str,
        resource: &'a str,
        namespace: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Arc<Value>> + 'a {
        let start = ObjectKey::new(api_version, resource, namespace.unwrap_or(""), "");
        self.objects
            .range(start..)
            .take_while(move |(k, _)| {
                k.api_version == api_version
                    && k.resource == resource
                    && namespace.is_none_or(|ns| k.namespace == ns)
            })
            .map(|(_, v)| v)
    }

    /// Every write after `rv`, oldest first.
    pub fn history_after(&self, rv: u64) -> &[HistoryEntry] {
        let start = self.history.partition_point(|e| e.rv <= rv);
        &self.history[start..]
    }

    fn commit(
        &mut self,
        event: EventType,
        key: ObjectKey,
        mut object: Value,
        previous: Option<Arc<Value>>,
    ) -> Value {
        self.rv += 1;
        if let Ok(meta) = metadata_mut(&mut object) {
            meta.insert("resourceVersion".into(), Value::String(self.rv.to_string()));
        }
        let object = Arc::new(object);
        if event == EventType::Deleted {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key.clone(), Arc::clone(&object));
        }
        self.history.push(HistoryEntry {
            rv: self.rv,
            key,
            event,
            object: Arc::clone(&object),
            previous,
        });
        self.notify.send_replace(self.rv);
        Value::clone(&object)
    }

    fn new_uid(&mut self) -> String {
        // splitmix64 over a seeded counter: unique within the store, uuid-shaped.
        let mut next = || {
            self.uid_seed = self.uid_seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.uid_seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let (a, b) = (next(), next());
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            b >> 52,
            b & 0xffff_ffff_ffff
        )
    }

    /// POST: a new object. `namespace` is empty for cluster-scoped resources.
    pub fn create(
        &mut self,
        api_version: &str,
        resource: &str,
        namespace: &str,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        let kind = kind_of(resource);
        let body_kind = str_at(&object, "/kind");
        if !body_kind.is_empty() && body_kind != kind {
            return Err(ApiError::bad_request(format!(
                "the body is a {body_kind}, but {resource} holds {kind}"
            )));
        }
        let body_namespace = str_at(&object, "/metadata/namespace");
        if !namespace.is_empty() && !body_namespace.is_empty() && body_namespace != namespace {
            return Err(ApiError::bad_request(format!(
                "the namespace of the object ({body_namespace}) does not match the namespace on the request ({namespace})"
            )));
        }
        let mut name = str_at(&object, "/metadata/name").to_owned();
        if name.is_empty() {
            let prefix = str_at(&object, "/metadata/generateName").to_owned();
            if prefix.is_empty() {
                return Err(ApiError::invalid(format!(
                    "{kind} is invalid: metadata.name: Required value: name or generateName is required"
                )));
            }
            loop {
                let suffix: String = self
                    .new_uid()
                    .chars()
                    .filter(char::is_ascii_alphanumeric)
                    .take(5)
                    .collect();
                name = format!("{prefix}{suffix}");
                if !self.objects.contains_key(&ObjectKey::new(
                    api_version,
                    resource,
                    namespace,
                    &name,
                )) {
                    break;
                }
            }
        }
        let key = ObjectKey::new(api_version, resource, namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{resource} \"{name}\" already exists"),
            ));
        }
        let uid = self.new_uid();
        let meta = metadata_mut(&mut object)?;
        meta.insert("name".into(), Value::String(name));
        if namespace.is_empty() {
            meta.remove("namespace");
        } else {
            meta.insert("namespace".into(), Value::String(namespace.to_owned()));
        }
        meta.insert("uid".into(), Value::String(uid));
        meta.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
        meta.remove("deletionTimestamp");
        set_type_meta(&mut object, api_version, &kind);
        if resource == "pods" && api_version == "v1" {
            default_pod(&mut object);
        }
        Ok(self.commit(EventType::Added, key, object, None))
    }

    /// PUT (and the second half of PATCH): replace an existing object.
    pub fn update(
        &mut self,
        key: &ObjectKey,
        mut object: Value,
        mode: UpdateMode,
    ) -> Result<Value, ApiError> {
        let current = self
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&key.resource, &key.name))?;
        metadata_mut(&mut object)?;
        let body_name = str_at(&object, "/metadata/name");
        if !body_name.is_empty() && body_name != key.name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({})",
                key.name
            )));
        }
        let body_namespace = str_at(&object, "/metadata/namespace");
        if !body_namespace.is_empty() && body_namespace != key.namespace {
            return Err(ApiError::bad_request(format!(
                "the namespace of the object ({body_namespace}) does not match the namespace on the URL ({})",
                key.namespace
            )));
        }
        let current_rv = str_at(&current, "/metadata/resourceVersion");
        let wanted_rv = str_at(&object, "/metadata/resourceVersion");
        if mode != UpdateMode::Raw && !wanted_rv.is_empty() && wanted_rv != current_rv {
            return Err(ApiError::conflict(&key.resource, &key.name, STALE));
        }
        let mut next = match mode {
            UpdateMode::Status => {
                let mut next = Value::clone(&current);
                set_or_remove(&mut next, "status", object.get("status").cloned());
                next
            }
            UpdateMode::Main if has_status_subresource(&key.resource) => {
                set_or_remove(&mut object, "status", current.get("status").cloned());
                object
            }
            UpdateMode::Main | UpdateMode::Raw => object,
        };
        if mode == UpdateMode::Main && key.resource == "pods" && key.api_version == "v1" {
            super::pod_update::check(&key.name, current.get("spec"), next.get("spec"))?;
        }
        // Identity and server-owned fields come from the stored object.
        let current_meta = current.get("metadata").cloned().unwrap_or_default();
        let meta = metadata_mut(&mut next)?;
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "resourceVersion",
        ] {
            match current_meta.get(field) {
                Some(v) => meta.insert(field.into(), v.clone()),
                None => meta.remove(field),
            };
        }
        set_type_meta(&mut next, &key.api_version, &kind_of(&key.resource));
        if next == *current {
            // The real server skips writes that change nothing: no new rv, no event.
            return Ok(Value::clone(&current));
        }
        Ok(self.commit(EventType::Modified, key.clone(), next, Some(current)))
    }

    /// Test hook: create or replace without preconditions or status rules.
    pub fn upsert(
        &mut self,
        api_version: &str,
        resource: &str,
        object: Value,
    ) -> Result<Value, ApiError> {
        let mut namespace = str_at(&object, "/metadata/namespace").to_owned();
        if namespace.is_empty() && !is_cluster_scoped(resource) {
            namespace = "default".to_owned();
        }
        let key = ObjectKey::new(
            api_version,
            resource,
            &namespace,
            str_at(&object, "/metadata/name"),
        );
        if self.objects.contains_key(&key) {
            self.update(&key, object, UpdateMode::Raw)
        } else {
            self.create(api_version, resource, &namespace, object)
        }
    }

    /// DELETE: removes at once (no graceful deletion, no finalizers).
    /// `options` is the DeleteOptions body; its preconditions are honoured.
    pub fn delete(&mut self, key: &ObjectKey, options: &Value) -> Result<Value, ApiError> {
        let current = self
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&key.resource, &key.name))?;
        for field in ["uid", "resourceVersion"] {
            let wanted = str_at(options, &format!("/preconditions/{field}"));
            let actual = str_at(&current, &format!("/metadata/{field}"));
            if !wanted.is_empty() && wanted != actual {
                return Err(ApiError::conflict(
                    &key.resource,
                    &key.name,
                    &format!("Precondition failed: {field} in precondition: {wanted}, {field} in object meta: {actual}"),
                ));
            }
        }
        let object = Value::clone(&current);
        Ok(self.commit(EventType::Deleted, key.clone(), object, Some(current)))
    }

    /// `pods/eviction` (policy/v1 Eviction): deletes the pod unless a
    /// PodDisruptionBudget selecting it allows no disruption (429), with
    /// Kubernetes' rules: more than one matching budget is an error (500),
    /// a pod that is not running is deleted without consulting budgets, and
    /// an allowed eviction takes one from the budget's
    /// `status.disruptionsAllowed`. The eviction's `deleteOptions`
    /// preconditions are honoured.
    pub fn evict(&mut self, namespace: &str, pod: &str, eviction: &Value) -> Result<(), ApiError> {
        let key = ObjectKey::new("v1", "pods", namespace, pod);
        let current = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found("pods", pod))?;
        let running = str_at(&current, "/status/phase") == "Running";
        let labels = current
            .pointer("/metadata/labels")
            .cloned()
            .unwrap_or(json!({}));
        let budgets: Vec<Value> = self
            .list("policy/v1", "poddisruptionbudgets", Some(namespace))
            .filter(|b| label_selector_matches(b.pointer("/spec/selector"), &labels))
            .map(|b| Value::clone(b))
            .collect();
        if running {
            if budgets.len() > 1 {
                return Err(ApiError::new(
                    500,
                    "InternalError",
                    "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
                ));
            }
            if let Some(budget) = budgets.first() {
                let allowed = budget
                    .pointer("/status/disruptionsAllowed")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                if allowed < 1 {
                    return Err(ApiError::new(
                        429,
                        "TooManyRequests",
                        format!(
                            "Cannot evict pod as it would violate the pod's disruption budget. The disruption budget {} needs more healthy pods to allow it.",
                            str_at(budget, "/metadata/name")
                        ),
                    ));
                }
                let budget_key = ObjectKey::new(
                    "policy/v1",
                    "poddisruptionbudgets",
                    namespace,
                    str_at(budget, "/metadata/name"),
                );
                let mut next = budget.clone();
                next["status"]["disruptionsAllowed"] = json!(allowed - 1);
                self.commit(
                    EventType::Modified,
                    budget_key,
                    next,
                    Some(Arc::new(budget.clone())),
                );
            }
        }
        let options = eviction.get("deleteOptions").cloned().unwrap_or(json!({}));
        self.delete(&key, &options)?;
        Ok(())
    }

    /// `pods/binding`: assign a pending pod to a node, copying the binding's
    /// annotations onto the pod and marking it scheduled.
    pub fn bind(&mut self, namespace: &str, pod: &str, binding: &Value) -> Result<(), ApiError> {
        let node = str_at(binding, "/target/name");
        if node.is_empty() {
            return Err(ApiError::invalid(
                "Binding is invalid: target.name: Required value",
            ));
        }
        let target_kind = str_at(binding, "/target/kind");
        if !target_kind.is_empty() && target_kind != "Node" {
            return Err(ApiError::invalid(format!(
                "Binding is invalid: target.kind: Unsupported value: \"{target_kind}\""
            )));
        }
        let key = ObjectKey::new("v1", "pods", namespace, pod);
        let current = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found("pods", pod))?;
        let why = |s: String| ApiError::conflict("pods/binding", pod, &s);
        let assigned = str_at(&current, "/spec/nodeName");
        if !assigned.is_empty() {
            return Err(why(format!(
                "pod {pod} is already assigned to node \"{assigned}\""
            )));
        }
        if !str_at(&current, "/metadata/deletionTimestamp").is_empty() {
            return Err(why(format!(
                "pod {pod} is being deleted, cannot be assigned to a host"
            )));
        }
        let wanted_uid = str_at(binding, "/metadata/uid");
        if !wanted_uid.is_empty() && wanted_uid != str_at(&current, "/metadata/uid") {
            return Err(why(format!(
                "Precondition failed: UID in precondition: {wanted_uid}"
            )));
        }
        let mut next = Value::clone(&current);
        if !next["spec"].is_object() {
            next["spec"] = json!({});
        }
        next["spec"]["nodeName"] = Value::String(node.to_owned());
        if let Some(annotations) = binding
            .pointer("/metadata/annotations")
            .and_then(Value::as_object)
        {
            let meta = metadata_mut(&mut next)?;
            let target = meta.entry("annotations").or_insert_with(|| json!({}));
            if !target.is_object() {
                *target = json!({});
            }
            for (k, v) in annotations {
                target[k] = v.clone();
            }
        }
        set_pod_scheduled(&mut next);
        self.commit(EventType::Modified, key, next, Some(current));
        Ok(())
    }
}

/// Whether a metav1.LabelSelector (as JSON) matches `labels`: a missing
/// selector matches nothing, an empty one everything.
fn label_selector_matches(selector: Option<&Value>, labels: &Value) -> bool {
    let Some(selector) = selector.filter(|s| s.is_object()) else {
        return false;
    };
    let label = |key: &str| labels.get(key).and_then(Value::as_str);
    let match_labels = selector
        .get("matchLabels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .all(|(k, v)| label(k) == v.as_str());
    let expressions = selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .all(|e| {
            let key = str_at(e, "/key");
            let values: Vec<&str> = e
                .get("values")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            match str_at(e, "/operator") {
                "In" => label(key).is_some_and(|v| values.contains(&v)),
                "NotIn" => label(key).is_none_or(|v| !values.contains(&v)),
                "Exists" => label(key).is_some(),
                "DoesNotExist" => label(key).is_none(),
                _ => false,
            }
        });
    match_labels && expressions
}

fn set_type_meta(object: &mut Value, api_version: &str, kind: &str) {
    if let Some(map) = object.as_object_mut() {
        map.insert("apiVersion".into(), Value::String(api_version.to_owned()));
        map.insert("kind".into(), Value::String(kind.to_owned()));
    }
}

fn set_or_remove(object: &mut Value, field: &str, value: Option<Value>) {
    if let Some(map) = object.as_object_mut() {
        match value {
            Some(v) if !v.is_null() => map.insert(field.to_owned(), v),
            _ => map.remove(field),
        };
    }
}

/// Pod defaults the real server applies on create that selectors look at.
fn default_pod(pod: &mut Value) {
    let Some(map) = pod.as_object_mut() else {
        return;
    };
    if let Some(spec) = map.get_mut("spec").and_then(Value::as_object_mut) {
        spec.entry("schedulerName")
            .or_insert_with(|| json!("default-scheduler"));
    }
    let status = map.entry("status").or_insert_with(|| json!({}));
    if let Some(status) = status.as_object_mut() {
        status.entry("phase").or_insert_with(|| json!("Pending"));
    }
}

fn set_pod_scheduled(pod: &mut Value) {
    let condition = json!({
        "type": "PodScheduled",
        "status": "True",
        "lastProbeTime": null,
        "lastTransitionTime": now_rfc3339(),
    });
    if !pod["status"].is_object() {
        pod["status"] = json!({});
    }
    let conditions = &mut pod["status"]["conditions"];
    if !conditions.is_array() {
        *conditions = json!([]);
    }
    if let Some(list) = conditions.as_array_mut() {
        list.retain(|c| c["type"] != "PodScheduled");
        list.push(condition);
    }
}
