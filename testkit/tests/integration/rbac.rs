//! The RBAC manifests against what the code really does. Each component
//! runs its main API flows against its own API stand-in; the stand-in's
//! request log, turned into RBAC terms (API group, `resource[/subresource]`,
//! verb, namespace, name), is checked against the rules of
//! `manifests/rbac-<component>.yaml`: every call must be allowed, and every
//! granted (group, resource, verb) must have been used (least privilege),
//! except the few entries of [`UNEXERCISED`], each with its reason.
//!
//! - scheduler: leader election on, a pod scheduled and bound with a
//!   `Scheduled` Event, a pod that fits nowhere (`PodScheduled=False` and
//!   `FailedScheduling`, retried), a `WaitForFirstConsumer` claim given an
//!   available PV and one handed to its node for provisioning, a pod of
//!   higher priority preempting (eviction, `nominatedNodeName`), a pod
//!   HAMi placed before the install adopted (its seal patched);
//! - webhook: the self-provisioned CA (Secret, caBundle of the
//!   MutatingWebhookConfiguration), the `--gpu-quotas` ResourceQuota
//!   watch, and, separately, the optional
//!   `--watch-namespaces` cache, whose calls must be exactly the extra
//!   grant the manifest and the webhook's README document;
//! - node agent: inventory publish, kubelet's `Allocate`, the
//!   `bind-phase` update, and a failed allocation's Event.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use serde_json::{json, Value};
use tessera_api::allocation::{encode_pod_devices, ContainerDevice, NVIDIA_VENDOR};
use tessera_api::config::Config;
use tessera_api::inventory::encode_inventory;
use tessera_api::names::{allocation as keys, NODE_REGISTER_ANNOTATION};
use tessera_scheduler::shell::leader::LeaseSettings;
use tessera_scheduler::shell::{Scheduler, ShellOptions};
use tessera_testkit::{ApiServer, RequestRecord};

/// Granted (component, group, resource, verb) that the flows here do not
/// exercise, and why that is acceptable.
const UNEXERCISED: &[(&str, &str, &str, &str, &str)] = &[(
    "node-agent",
    "events.k8s.io",
    "events",
    "patch",
    "kube-rs's event Recorder patches an Event only when the same event repeats on the same pod; \
     the agent fails a pod once (bind-phase failed), so a repeat needs a second failing Allocate \
     for it, which this flow does not make",
)];

/// One API call in RBAC terms.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Call {
    group: String,
    resource: String,
    verb: &'static str,
    namespace: Option<String>,
    name: Option<String>,
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}.{} (namespace {:?}, name {:?})",
            self.verb, self.resource, self.group, self.namespace, self.name
        )
    }
}

fn to_call(record: &RequestRecord) -> Call {
    let group = match record.api_version.split_once('/') {
        Some((group, _)) => group.to_owned(),
        None => String::new(),
    };
    let verb = match (record.method.as_str(), record.watch, record.name.is_some()) {
        ("GET", true, _) => "watch",
        ("GET", false, true) => "get",
        ("GET", false, false) => "list",
        ("POST", ..) => "create",
        ("PUT", ..) => "update",
        ("PATCH", ..) => "patch",
        ("DELETE", _, true) => "delete",
        ("DELETE", _, false) => "deletecollection",
        (other, ..) => panic!("unexpected method {other} in the request log"),
    };
    Call {
        group,
        resource: record.target(),
        verb,
        namespace: record.namespace.clone(),
        name: record.name.clone(),
    }
}

/// One rule of a Role (`namespace` set) or ClusterRole.
#[derive(Debug)]
struct Grant {
    role: String,
    namespace: Option<String>,
    rule: PolicyRule,
}

fn contains(list: &[String], value: &str) -> bool {
    list.iter().any(|v| v == "*" || v == value)
}

impl Grant {
    fn allows(&self, call: &Call) -> bool {
        let rule = &self.rule;
        let names = rule.resource_names.as_deref().unwrap_or_default();
        let namespace_ok = match &self.namespace {
            Some(ns) => call.namespace.as_deref() == Some(ns.as_str()),
            None => true,
        };
        // A rule limited by name allows only calls that name one of them
        // (create, list and watch name nothing).
        let name_ok = names.is_empty()
            || call
                .name
                .as_deref()
                .is_some_and(|n| names.iter().any(|r| r == n));
        namespace_ok
            && name_ok
            && contains(rule.api_groups.as_deref().unwrap_or_default(), &call.group)
            && contains(
                rule.resources.as_deref().unwrap_or_default(),
                &call.resource,
            )
            && contains(&rule.verbs, call.verb)
    }

    /// Every (group, resource, verb) the rule grants.
    fn triples(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for group in self.rule.api_groups.iter().flatten() {
            for resource in self.rule.resources.iter().flatten() {
                for verb in &self.rule.verbs {
                    out.push((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
        out
    }
}

/// The Role and ClusterRole rules of `manifests/rbac-<component>.yaml`.
fn grants(component: &str) -> Vec<Grant> {
    let path = format!(
        "{}/../manifests/rbac-{component}.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {path}: {e}; the RBAC manifests live there"));
    let mut grants = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value: Value = serde::Deserialize::deserialize(document).expect("YAML document");
        let (role, namespace, rules) = match value["kind"].as_str() {
            Some("ClusterRole") => {
                let role: ClusterRole = serde_json::from_value(value).expect("ClusterRole");
                (role.metadata.name.unwrap_or_default(), None, role.rules)
            }
            Some("Role") => {
                let role: Role = serde_json::from_value(value).expect("Role");
                let namespace = role.metadata.namespace.clone();
                assert!(namespace.is_some(), "a Role in {path} names no namespace");
                (
                    role.metadata.name.unwrap_or_default(),
                    namespace,
                    role.rules,
                )
            }
            _ => continue,
        };
        for rule in rules.unwrap_or_default() {
            grants.push(Grant {
                role: role.clone(),
                namespace: namespace.clone(),
                rule,
            });
        }
    }
    assert!(!grants.is_empty(), "{path} grants nothing");
    grants
}

/// The calls `grants` do not allow, and the granted triples no call used
/// (less those in [`UNEXERCISED`] for `component`).
fn violations(
    component: &str,
    grants: &[Grant],
    records: &[RequestRecord],
) -> (Vec<String>, Vec<String>) {
    let calls: BTreeSet<Call> = records.iter().map(to_call).collect();
    let denied = calls
        .iter()
        .filter(|call| !grants.iter().any(|g| g.allows(call)))
        .map(ToString::to_string)
        .collect();
    let mut unused = Vec::new();
    for grant in grants {
        for (group, resource, verb) in grant.triples() {
            let used = calls.iter().any(|call| {
                call.group == group
                    && call.resource == resource
                    && call.verb == verb
                    && grant.allows(call)
            });
            let excused = UNEXERCISED.iter().any(|(c, g, r, v, _)| {
                *c == component && *g == group && *r == resource && *v == verb
            });
            if !used && !excused {
                unused.push(format!("{verb} {resource}.{group} (role {})", grant.role));
            }
        }
    }
    (denied, unused)
}

/// Every call allowed; every granted triple used or listed in [`UNEXERCISED`].
fn check(component: &str, records: &[RequestRecord]) {
    assert!(!records.is_empty(), "{component} made no API call");
    let (denied, unused) = violations(component, &grants(component), records);
    assert!(
        denied.is_empty(),
        "manifests/rbac-{component}.yaml does not allow calls {component} makes:\n  {}",
        denied.join("\n  ")
    );
    assert!(
        unused.is_empty(),
        "manifests/rbac-{component}.yaml grants what {component} never used (least privilege):\n  {}",
        unused.join("\n  ")
    );
    // The allow-list stays honest: an excused grant that is now used must leave it.
    let calls: Vec<Call> = records.iter().map(to_call).collect();
    for (c, group, resource, verb, _) in UNEXERCISED.iter().filter(|e| e.0 == component) {
        assert!(
            !calls.iter().any(|call| call.group == *group
                && call.resource == *resource
                && call.verb == *verb),
            "{c}: {verb} {resource}.{group} is exercised now; remove it from UNEXERCISED"
        );
    }
}

fn record(
    method: &str,
    api_version: &str,
    resource: &str,
    sub: Option<&str>,
    ns: Option<&str>,
    name: Option<&str>,
    watch: bool,
) -> RequestRecord {
    RequestRecord {
        method: method.into(),
        api_version: api_version.into(),
        resource: resource.into(),
        subresource: sub.map(Into::into),
        namespace: ns.map(Into::into),
        name: name.map(Into::into),
        status: 200,
        watch,
    }
}

#[test]
fn the_checker_finds_missing_and_unused_grants() {
    let rule = |groups: &[&str], resources: &[&str], verbs: &[&str], names: &[&str]| PolicyRule {
        api_groups: Some(groups.iter().map(|s| (*s).to_owned()).collect()),
        resources: Some(resources.iter().map(|s| (*s).to_owned()).collect()),
        verbs: verbs.iter().map(|s| (*s).to_owned()).collect(),
        resource_names: (!names.is_empty())
            .then(|| names.iter().map(|s| (*s).to_owned()).collect()),
        non_resource_urls: None,
    };
    let grants = [
        Grant {
            role: "cluster".into(),
            namespace: None,
            rule: rule(&[""], &["pods"], &["list", "watch", "delete"], &[]),
        },
        Grant {
            role: "cluster".into(),
            namespace: None,
            rule: rule(&[""], &["pods/binding"], &["create"], &[]),
        },
        Grant {
            role: "ns".into(),
            namespace: Some("tessera-system".into()),
            rule: rule(&["coordination.k8s.io"], &["leases"], &["get"], &["mine"]),
        },
    ];
    let lease_get = |namespace: &str, name: &str| {
        record(
            "GET",
            "coordination.k8s.io/v1",
            "leases",
            None,
            Some(namespace),
            Some(name),
            false,
        )
    };
    let records = [
        record("GET", "v1", "pods", None, None, None, false),
        record("GET", "v1", "pods", None, None, None, true),
        record(
            "POST",
            "v1",
            "pods",
            Some("binding"),
            Some("team"),
            Some("p"),
            false,
        ),
        lease_get("tessera-system", "mine"),
        // Not granted: another lease by name, a lease in another namespace, a pod patch.
        lease_get("tessera-system", "theirs"),
        lease_get("default", "mine"),
        record("PATCH", "v1", "pods", None, Some("team"), Some("p"), false),
    ];
    let (denied, unused) = violations("test", &grants, &records);
    assert_eq!(denied.len(), 3, "{denied:?}");
    assert!(
        denied.iter().any(|d| d.contains("theirs"))
            && denied.iter().any(|d| d.contains("\"default\""))
            && denied.iter().any(|d| d.starts_with("patch pods")),
        "{denied:?}"
    );
    assert_eq!(unused, ["delete pods. (role cluster)"]);
}

fn cards(count: u32) -> String {
    encode_inventory(&tessera_testkit::fixtures::t4_cards("GPU-rbac", count))
}

fn pending_pod(name: &str, memory_mib: u64) -> Pod {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "team"},
        "spec": {"schedulerName": "tessera-scheduler",
                 "containers": [{"name": "main", "image": "x", "resources": {"limits": {
                     "nvidia.com/gpu": "1", "nvidia.com/gpumem": memory_mib.to_string()}}}]}}))
    .expect("pod")
}

fn writes_of(api: &ApiServer, method: &str, target: &str) -> usize {
    api.write_count(method, target)
}

fn insert_value(api: &ApiServer, api_version: &str, resource: &str, object: Value) {
    api.insert_value(api_version, resource, object);
}

/// Waits until the stand-in has seen `at_least` writes `method target`.
async fn await_writes(api: &ApiServer, what: &str, method: &str, target: &str, at_least: usize) {
    eventually(what, || {
        (writes_of(api, method, target) >= at_least).then_some(())
    })
    .await;
}

/// A webhook replica in `tessera-system` with `--self-provision` and
/// `extra_args`, serving on a free local port against `api`.
async fn spawn_self_provisioning_webhook(
    api: &ApiServer,
    extra_args: &[&str],
) -> tokio::task::JoinHandle<()> {
    let args = [
        "tessera-webhook",
        "--self-provision",
        "--namespace",
        "tessera-system",
    ]
    .iter()
    .chain(extra_args);
    let options = <tessera_webhook::app::Options as clap::Parser>::parse_from(args);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let client = api.client();
    tokio::spawn(async move {
        let _ =
            tessera_webhook::app::serve(options, listener, Some(client), std::future::pending())
                .await;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_calls_match_its_rbac() {
    let api = ApiServer::start().await.expect("API stand-in");
    let mut node = ready_node("gpu-1");
    node.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(NODE_REGISTER_ANNOTATION.into(), cards(1));
    api.insert(&node);
    api.insert(&pending_pod("fits", 4000));
    api.insert(&pending_pod("too-big", 20000));
    // Volume binding: one claim gets an available local PV (PV patched),
    // one is provisioned on the chosen node (claim patched).
    insert_value(
        &api,
        "storage.k8s.io/v1",
        "storageclasses",
        json!({"metadata": {"name": "local"},
        "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "WaitForFirstConsumer"}),
    );
    insert_value(
        &api,
        "storage.k8s.io/v1",
        "storageclasses",
        json!({"metadata": {"name": "gp3"},
        "provisioner": "ebs.csi.aws.com", "volumeBindingMode": "WaitForFirstConsumer"}),
    );
    insert_value(
        &api,
        "v1",
        "persistentvolumes",
        json!({"metadata": {"name": "disk-1"},
        "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "local",
            "local": {"path": "/mnt/disk"}, "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchFields": [
                {"key": "metadata.name", "operator": "In", "values": ["gpu-1"]}]}]}}},
        "status": {"phase": "Available"}}),
    );
    for (claim, class) in [("data", "local"), ("cache", "gp3")] {
        insert_value(
            &api,
            "v1",
            "persistentvolumeclaims",
            json!({"metadata": {"name": claim, "namespace": "team"},
            "spec": {"storageClassName": class, "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}),
        );
        let pod: Pod = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("with-{claim}"), "namespace": "team"},
            "spec": {"schedulerName": "tessera-scheduler", "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": claim}}],
                "containers": [{"name": "main", "image": "x"}]}}))
        .expect("pod");
        api.insert(&pod);
    }
    // A pod HAMi placed before the install (higher priority than every
    // pod here, so never a victim): adopted, its seal patched in.
    api.insert_value(
        "v1",
        "pods",
        json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "hami-placed", "namespace": "team", "annotations": {
            keys::VGPU_NODE: "gpu-1", keys::DEVICES_ALLOCATED: "GPU-rbac-0,NVIDIA,100,0:;",
            keys::BIND_PHASE: "success"}},
        "spec": {"schedulerName": "hami-scheduler", "nodeName": "gpu-1", "priority": 2000,
            "containers": [{"name": "main", "image": "x"}]},
        "status": {"phase": "Running"}}),
    );
    // Timestamps have one-second resolution: the key comes a second later.
    tokio::time::sleep(Duration::from_millis(1050)).await;
    let options = ShellOptions {
        lease: Some(LeaseSettings {
            namespace: "tessera-system".into(),
            name: "tessera-scheduler".into(),
            identity: "scheduler-0".into(),
            lease_duration: Duration::from_secs(2),
            retry_period: Duration::from_millis(100),
        }),
        scheduled_events: true,
        // As the binary does: read the seal key, creating it on first start.
        seal_key: Some(
            tessera_scheduler::shell::seal_key::load_or_create(api.client(), "tessera-system")
                .await
                .expect("seal key"),
        ),
        ..ShellOptions::default()
    };
    let scheduler = Scheduler::new(api.client(), Config::default(), options);
    let task = tokio::spawn(scheduler.run());
    eventually("the pod that fits bound", || {
        api.get::<Pod>(Some("team"), "fits")
            .and_then(|p| p.spec?.node_name)
    })
    .await;
    // Preemption: a pod of higher priority needs the card `fits` holds.
    let mut urgent = pending_pod("urgent", 14000);
    if let Some(spec) = urgent.spec.as_mut() {
        spec.priority = Some(1000);
    }
    api.insert(&urgent);
    for (what, method, target, at_least) in [
        ("one bind", "POST", "pods/binding", 1),
        (
            "PodScheduled=False on the pod that fits nowhere",
            "PATCH",
            "pods/status",
            1,
        ),
        ("Scheduled and FailedScheduling events", "POST", "events", 2),
        ("the lease renewed", "PUT", "leases", 1),
        ("a PV bound to its claim", "PATCH", "persistentvolumes", 1),
        (
            "a claim handed to its node",
            "PATCH",
            "persistentvolumeclaims",
            1,
        ),
        ("a lower-priority pod evicted", "POST", "pods/eviction", 1),
        (
            "a pre-install pod adopted (seal patched)",
            "PATCH",
            "pods",
            1,
        ),
    ] {
        await_writes(&api, what, method, target, at_least).await;
    }
    // A node change retries the parked pod: the same FailedScheduling
    // again, which the event recorder sends as a patch of the series.
    node.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("changed".into(), "yes".into());
    api.insert(&node);
    await_writes(
        &api,
        "a repeated FailedScheduling event (series patch)",
        "PATCH",
        "events",
        1,
    )
    .await;
    task.abort();
    check("scheduler", &api.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_calls_match_its_rbac() {
    // Self-provisioned CA: Secret, then the configuration's caBundle.
    let api = ApiServer::start().await.expect("API stand-in");
    api.insert::<MutatingWebhookConfiguration>(
        &serde_json::from_value(json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "tessera-webhook"},
            "webhooks": [{
                "name": "pods.tessera.io",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "clientConfig": {"service": {"name": "tessera-webhook", "namespace": "tessera-system", "path": "/mutate"}}
            }]
        }))
        .expect("configuration"),
    );
    let task =
        spawn_self_provisioning_webhook(&api, &["--ca-sync-seconds", "1", "--gpu-quotas"]).await;
    eventually("the ResourceQuota watch (--gpu-quotas)", || {
        api.requests()
            .iter()
            .any(|r| r.resource == "resourcequotas" && r.watch)
            .then_some(())
    })
    .await;
    eventually("the caBundle patched and re-checked", || {
        let config: MutatingWebhookConfiguration = api.get(None, "tessera-webhook")?;
        let patched = config.webhooks?[0].client_config.ca_bundle.is_some();
        (patched && writes_of(&api, "PATCH", "mutatingwebhookconfigurations") >= 1).then_some(())
    })
    .await;
    // A second replica finds the stored CA.
    let second = spawn_self_provisioning_webhook(&api, &[]).await;
    eventually("the second replica reads the CA Secret", || {
        let reads = api
            .requests()
            .iter()
            .filter(|r| r.resource == "secrets" && r.method == "GET" && r.status == 200)
            .count();
        (reads >= 1).then_some(())
    })
    .await;
    task.abort();
    second.abort();
    check("webhook", &api.requests());

    // The optional namespace cache: exactly list and watch on namespaces,
    // the extra grant that manifests/rbac-webhook.yaml and
    // webhook/README.md name for --watch-namespaces.
    let api = ApiServer::start().await.expect("API stand-in");
    let _webhook = Webhook::start(Some(api.client()), &["--watch-namespaces"]).await;
    eventually("the namespace watch", || {
        api.requests()
            .iter()
            .any(|r| r.resource == "namespaces" && r.watch)
            .then_some(())
    })
    .await;
    let calls: BTreeSet<(String, String, &str)> = api
        .requests()
        .iter()
        .map(to_call)
        .map(|c| (c.group, c.resource, c.verb))
        .collect();
    let expected: BTreeSet<(String, String, &str)> = [
        (String::new(), "namespaces".to_owned(), "list"),
        (String::new(), "namespaces".to_owned(), "watch"),
    ]
    .into();
    assert_eq!(calls, expected);
    let manifest = std::fs::read_to_string(format!(
        "{}/../manifests/rbac-webhook.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("manifest");
    assert!(
        manifest.contains("--watch-namespaces") && manifest.contains("list/watch on namespaces"),
        "manifests/rbac-webhook.yaml must document the extra grant --watch-namespaces needs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_agent_calls_match_its_rbac() {
    let api = ApiServer::start().await.expect("API stand-in");
    api.insert(&ready_node("gpu-1"));
    let temp = tempfile::tempdir().expect("tempdir");
    let kubelet = KubeletStandIn::start(&temp.path().join("kubelet"));
    // The seal key as the scheduler leaves it; the agent reads it from the Secret.
    let key = tessera_api::allocation_seal::SealKey::generate().expect("key");
    api.insert_value(
        "v1",
        "secrets",
        json!({"metadata": {"name": "tessera-allocation-key", "namespace": "tessera-system"},
            "data": {"key": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, key.as_bytes())}}),
    );
    let gpus = tessera_node_agent::gpu::fake::FakeGpus::parse("2x Tesla T4 15360", "gpu-1")
        .expect("fake GPU spec");
    let agent = RunningAgent::spawn(
        &gpus,
        tessera_node_agent::agent::AgentSetup {
            seal: tessera_node_agent::seal::SealSource::Secret {
                namespace: "tessera-system".into(),
            },
            ..tessera_node_agent::testing::fake_agent_setup(
                "gpu-1",
                &gpus,
                api.client(),
                &temp.path().join("host"),
                kubelet.socket(),
            )
        },
    );
    eventually("the inventory published", || {
        let node: Node = api.get(None, "gpu-1")?;
        node.metadata
            .annotations?
            .contains_key(NODE_REGISTER_ANNOTATION)
            .then_some(())
    })
    .await;
    let mut plugin = kubelet.connect_plugin(WAIT).await;

    // A pod as the scheduler binds it, then kubelet's Allocate.
    let bound = |name: &str, uuid: &str| -> Pod {
        let devices = encode_pod_devices(&[vec![ContainerDevice {
            uuid: uuid.to_owned(),
            vendor: NVIDIA_VENDOR.to_owned(),
            memory_mib: 4000,
            cores: 0,
        }]]);
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "team", "annotations": {
                keys::VGPU_NODE: "gpu-1", keys::DEVICES_ALLOCATED: devices,
                keys::DEVICES_TO_ALLOCATE: devices, keys::BIND_PHASE: keys::PHASE_ALLOCATING}},
            "spec": {"nodeName": "gpu-1", "containers": [{"name": "main", "image": "x",
                "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}))
        .expect("pod")
    };
    // Sealed as the scheduler seals it (the UID is the API server's).
    let sealed = |pod: Pod| -> Pod {
        let mut pod = api.insert(&pod);
        let annotations = pod.metadata.annotations.as_mut().expect("annotations");
        let seal = key.seal(
            pod.metadata.uid.as_deref().expect("uid"),
            "gpu-1",
            &annotations[keys::DEVICES_ALLOCATED],
        );
        annotations.insert(keys::SEAL.into(), seal);
        api.insert(&pod)
    };
    sealed(bound("good", &agent.cards[0].uuid));
    let (_, answer) = plugin.allocate_container(1).await;
    answer.expect("Allocate for the good pod");
    eventually("bind-phase success", || {
        let pod: Pod = api.get(Some("team"), "good")?;
        (annotation(&pod, keys::BIND_PHASE).as_deref() == Some(keys::PHASE_SUCCESS)).then_some(())
    })
    .await;

    // A pod whose card is not on this node: Allocate fails with an Event.
    sealed(bound("foreign", "GPU-elsewhere"));
    let (_, answer) = plugin.allocate_container(1).await;
    assert!(answer.is_err(), "a card not on this node cannot be given");
    await_writes(&api, "the failure Event", "POST", "events", 1).await;
    agent.stop().await;
    check("node-agent", &api.requests());
}
