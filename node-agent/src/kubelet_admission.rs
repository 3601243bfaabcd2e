//! Test infrastructure, not part of the agent (feature `test-support`):
//! kubelet's pod admission, as harsh as the real one where it matters to
//! `Allocate`.
//!
//! [`AdmittingKubelet`] watches the pods bound to its node through the API
//! server and admits them the way kubelet does: pods reach it in watch
//! order (bind order, which concurrent binds make arbitrary); each batch
//! that arrives together is sorted by `creationTimestamp`, which has
//! one-second resolution, and kubelet's sort is not stable, so pods created
//! in the same second come in an arbitrary order (modelled by a hash of the
//! name); pods are admitted one at a time, and for each GPU container (init
//! containers first) kubelet calls `GetPreferredAllocation` and then
//! `Allocate` with no pod identity. A refused `Allocate` fails the pod as
//! kubelet does (`phase: Failed`, reason `UnexpectedAdmissionError`); an
//! admitted pod gets container statuses and `phase: Running`. It records,
//! like kubelet's device checkpoint, the device IDs of every container and
//! the environment the plugin returned, and frees device IDs when a pod is
//! deleted or ends.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use serde_json::json;
use tokio::task::JoinHandle;

use crate::testing::PluginConnection;

/// One container kubelet admitted, as its device checkpoint records it.
#[derive(Debug, Clone)]
pub struct AdmittedContainer {
    /// `namespace/name` of the pod.
    pub pod: String,
    /// The pod's UID.
    pub uid: String,
    /// The container's name.
    pub container: String,
    /// The device IDs kubelet recorded for it.
    pub device_ids: Vec<String>,
    /// The environment the plugin's `Allocate` returned.
    pub envs: BTreeMap<String, String>,
}

/// What the kubelet stand-in did.
#[derive(Debug, Clone, Default)]
pub struct AdmissionLog {
    /// Every GPU container admitted, in admission order.
    pub admitted: Vec<AdmittedContainer>,
    /// Pods failed with `UnexpectedAdmissionError`: `namespace/name` and why.
    pub rejected: Vec<(String, String)>,
}

/// Kubelet's pod admission for one node, until dropped.
#[derive(Debug)]
pub struct AdmittingKubelet {
    log: Arc<Mutex<AdmissionLog>>,
    task: JoinHandle<()>,
}

impl Drop for AdmittingKubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

fn gpu_count(container: &Container, resource: &str) -> usize {
    container
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get(resource))
        .and_then(|q| q.0.parse().ok())
        .unwrap_or(0)
}

fn ended(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
        || matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

/// Kubelet's unstable sort of one batch: by creation second, and within a
/// second in an order unrelated to arrival or name.
fn kubelet_order(batch: &mut [Pod]) {
    batch.sort_by_key(|p| {
        let mut hasher = DefaultHasher::new();
        p.metadata.name.hash(&mut hasher);
        (
            p.metadata.creation_timestamp.as_ref().map(|t| t.0),
            hasher.finish(),
        )
    });
}

struct Admission {
    api: Api<Pod>,
    plugin: PluginConnection,
    resource: String,
    log: Arc<Mutex<AdmissionLog>>,
    /// Pod UID → device IDs held.
    held: HashMap<String, Vec<String>>,
}

impl Admission {
    fn record(&self) -> std::sync::MutexGuard<'_, AdmissionLog> {
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn admit(&mut self, pod: &Pod) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let Some(spec) = pod.spec.as_ref() else {
            return;
        };
        let containers = spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers);
        let mut admitted = Vec::new();
        let mut refusal = None;
        for container in containers {
            let count = gpu_count(container, &self.resource);
            if count == 0 {
                continue;
            }
            let (ids, answer) = self.plugin.allocate_container(count).await;
            match answer {
                Ok(response) => admitted.push(AdmittedContainer {
                    pod: key(pod),
                    uid: uid.clone(),
                    container: container.name.clone(),
                    device_ids: ids,
                    envs: response.envs.into_iter().collect(),
                }),
                Err(status) => {
                    refusal = Some(status.message().to_owned());
                    break;
                }
            }
        }
        let ids: Vec<String> = admitted.iter().flat_map(|c| c.device_ids.clone()).collect();
        let name = pod.metadata.name.as_deref().unwrap_or("");
        let status = if let Some(message) = refusal {
            self.plugin.release(&ids);
            self.record().rejected.push((key(pod), message.clone()));
            json!({"status": {"phase": "Failed", "reason": "UnexpectedAdmissionError",
                "message": format!("Allocate failed due to {message}, which is unexpected")}})
        } else {
            self.held.insert(uid, ids);
            self.record().admitted.extend(admitted);
            let statuses: Vec<_> = spec
                .containers
                .iter()
                .map(|c| json!({"name": c.name, "image": c.image, "imageID": "", "ready": true,
                    "restartCount": 0, "started": true, "containerID": format!("containerd://{}-{}", name, c.name),
                    "state": {"running": {}}}))
                .collect();
            json!({"status": {"phase": "Running", "containerStatuses": statuses}})
        };
        let api = Api::<Pod>::namespaced(
            self.api.clone().into_client(),
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        );
        if let Err(error) = api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
        {
            tracing::warn!(%error, pod = name, "kubelet stand-in could not write the pod status");
        }
    }

    fn forget(&mut self, pod: &Pod) {
        if let Some(ids) = pod
            .metadata
            .uid
            .as_ref()
            .and_then(|uid| self.held.remove(uid))
        {
            self.plugin.release(&ids);
        }
    }
}

impl AdmittingKubelet {
    /// Admits the pods bound to `node`, calling the plugin through
    /// `plugin`; `resource` is the GPU count resource (`nvidia.com/gpu`).
    /// Pods arriving within `batch_window` of each other form one batch.
    pub fn start(
        client: kube::Client,
        node: &str,
        plugin: PluginConnection,
        resource: &str,
        batch_window: Duration,
    ) -> Self {
        let log = Arc::new(Mutex::new(AdmissionLog::default()));
        let api: Api<Pod> = Api::all(client);
        let mut admission = Admission {
            api: api.clone(),
            plugin,
            resource: resource.to_owned(),
            log: Arc::clone(&log),
            held: HashMap::new(),
        };
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let task = tokio::spawn(async move {
            let mut seen: HashSet<String> = HashSet::new();
            let mut events = std::pin::pin!(watcher(api, config).default_backoff());
            let mut batch: Vec<Pod> = Vec::new();
            loop {
                let next = if batch.is_empty() {
                    events.next().await
                } else {
                    match tokio::time::timeout(batch_window, events.next()).await {
                        Ok(event) => event,
                        Err(_) => {
                            kubelet_order(&mut batch);
                            for pod in batch.drain(..) {
                                admission.admit(&pod).await;
                            }
                            continue;
                        }
                    }
                };
                let Some(event) = next else { return };
                match event {
                    Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                        let uid = pod.metadata.uid.clone().unwrap_or_default();
                        if ended(&pod) {
                            admission.forget(&pod);
                        } else if seen.insert(uid) {
                            batch.push(pod);
                        }
                    }
                    Ok(watcher::Event::Delete(pod)) => admission.forget(&pod),
                    Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
                    Err(error) => tracing::warn!(%error, "kubelet stand-in watch error"),
                }
            }
        });
        Self { log, task }
    }

    /// A copy of what it did so far.
    pub fn log(&self) -> AdmissionLog {
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// A whole GPU node for cross-component tests and benchmarks: the node
/// agent on fake cards (believing allocations as `seal` says), kubelet's
/// device-plugin side over a unix socket, and [`AdmittingKubelet`] admitting
/// the pods bound to the node. Stops when dropped (the agent's task is
/// aborted with the runtime).
#[derive(Debug)]
pub struct AdmittingNode {
    /// The agent on its fake cards.
    pub agent: crate::testing::RunningAgent,
    /// Kubelet's pod admission on this node.
    pub kubelet: AdmittingKubelet,
    _socket: crate::testing::KubeletStandIn,
}

impl AdmittingNode {
    /// Starts everything for `node` with `fake_gpus` (e.g. `8x NVIDIA A10G
    /// 23028`), host files and sockets under `dir`, and waits until kubelet
    /// is connected to the plugin. Pods arriving at kubelet within
    /// `batch_window` form one admission batch.
    pub async fn start(
        client: kube::Client,
        node: &str,
        fake_gpus: &str,
        dir: &std::path::Path,
        seal: crate::seal::SealSource,
        batch_window: Duration,
    ) -> Self {
        let socket = crate::testing::KubeletStandIn::start(&dir.join("kubelet"));
        let gpus = crate::gpu::fake::FakeGpus::parse(fake_gpus, node).expect("fake GPU spec");
        let setup = crate::agent::AgentSetup {
            seal,
            ..crate::testing::fake_agent_setup(
                node,
                &gpus,
                client.clone(),
                &dir.join("host"),
                socket.socket(),
            )
        };
        let agent = crate::testing::RunningAgent::spawn(&gpus, setup);
        let plugin = socket.connect_plugin(Duration::from_secs(20)).await;
        let kubelet = AdmittingKubelet::start(
            client,
            node,
            plugin,
            tessera_api::names::GPU_COUNT_RESOURCE,
            batch_window,
        );
        Self {
            agent,
            kubelet,
            _socket: socket,
        }
    }
}
