//! Helpers shared by the cross-component tests: polling with a deadline,
//! GPU Node objects, a kubelet stand-in speaking the device-plugin API over
//! real unix sockets (registration, ListAndWatch, GetPreferredAllocation,
//! Allocate, as kubelet drives them), node agents on fake cards, the
//! webhook served over TLS with a client that posts AdmissionReviews as the
//! API server does, and a plain HTTP GET for `/metrics`.
//!
//! The kubelet stand-in and the running agent are the node agent's own
//! test infrastructure (`tessera_node_agent::testing`, feature
//! `test-support`), shared with `node-agent/tests`; polling and annotations
//! come from `tessera-testkit`.

#![allow(dead_code, unused_imports)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use clap::Parser as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{json, Value};
use tessera_node_agent::agent::AgentSetup;
use tessera_node_agent::gpu::fake::FakeGpus;
use tessera_node_agent::testing::fake_agent_setup;
pub use tessera_node_agent::testing::{KubeletStandIn, RunningAgent};
pub use tessera_testkit::annotation;
use tessera_testkit::eventually_within;
use tessera_webhook::provision::CertAuthority;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The longest any single wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// Polls `check` every 20 ms until it returns `Some`, failing after [`WAIT`].
pub async fn eventually<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    eventually_within(WAIT, what, check).await
}

/// A Ready node with room for pods, without GPU inventory (the agent adds
/// it), and the `nvidia.com/gpu` kubelet reports once the agent's device
/// plugin registered.
pub fn ready_node(name: &str) -> Node {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}],
                   "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110", "nvidia.com/gpu": "100"}}}))
    .expect("node object")
}

/// Starts a node agent for `node` with `fake_gpus` (e.g. `4x Tesla T4 15360`),
/// host files under `host_dir`, registering at `kubelet_socket`.
pub fn start_agent(
    client: kube::Client,
    node: &str,
    fake_gpus: &str,
    host_dir: &Path,
    kubelet_socket: PathBuf,
    metrics_addr: Option<SocketAddr>,
) -> RunningAgent {
    let gpus = FakeGpus::parse(fake_gpus, node).expect("fake GPU spec");
    let defaults = fake_agent_setup(node, &gpus, client, host_dir, kubelet_socket);
    let setup = AgentSetup {
        metrics_addr,
        ..defaults
    };
    RunningAgent::spawn(&gpus, setup)
}

/// A free port on 127.0.0.1 for a component that takes an address rather
/// than a listener (the node agent's `/metrics`). The port is released
/// before it is returned; another process taking it in between is unlikely.
pub fn free_local_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address")
}

/// `GET http://addr/path` over plain HTTP/1.1; `None` while nothing listens.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .ok()?;
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = sender.send_request(request).await.ok()?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The webhook served over TLS on 127.0.0.1 with a certificate from its
/// own test CA, and an HTTP/1.1 connection that trusts only that CA.
pub struct Webhook {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    task: JoinHandle<()>,
    _certs: tempfile::TempDir,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Webhook")
    }
}

impl Webhook {
    /// Serves the webhook with mounted certificate files; `client` is
    /// handed to it (for `--watch-namespaces` or self-provisioning when
    /// `extra_args` ask for them).
    pub async fn start(client: Option<kube::Client>, extra_args: &[&str]) -> Self {
        let certs = tempfile::tempdir().expect("tempdir");
        let ca = CertAuthority::generate().expect("test CA");
        let issued = ca
            .issue_serving_cert(&["tessera-webhook.tessera-system.svc".to_owned()])
            .expect("serving certificate");
        let (cert, key) = (certs.path().join("tls.crt"), certs.path().join("tls.key"));
        std::fs::write(&cert, issued.chain_pem).expect("write tls.crt");
        std::fs::write(&key, issued.key_pem).expect("write tls.key");
        let mut args = vec![
            "tessera-webhook".to_owned(),
            "--tls-cert".to_owned(),
            cert.display().to_string(),
            "--tls-key".to_owned(),
            key.display().to_string(),
        ];
        args.extend(extra_args.iter().map(|a| (*a).to_owned()));
        let options = tessera_webhook::app::Options::parse_from(args);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let task = tokio::spawn(async move {
            tessera_webhook::app::serve(options, listener, client, std::future::pending())
                .await
                .expect("webhook serves");
        });
        let sender = Self::connect(addr, ca.cert_pem()).await;
        Self {
            sender,
            task,
            _certs: certs,
        }
    }

    async fn connect(
        addr: SocketAddr,
        ca_pem: &str,
    ) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            roots.add(cert.expect("CA PEM")).expect("CA as a root");
        }
        let config =
            rustls::ClientConfig::builder_with_provider(tessera_webhook::tls::crypto_provider())
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = rustls::pki_types::ServerName::try_from("tessera-webhook.tessera-system.svc")
            .expect("DNS name");
        let deadline = tokio::time::Instant::now() + WAIT;
        let tls = loop {
            if let Ok(tcp) = TcpStream::connect(addr).await {
                if let Ok(tls) = connector.connect(name.clone(), tcp).await {
                    break tls;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the webhook never served TLS"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .expect("HTTP/1.1 over TLS");
        tokio::spawn(connection);
        sender
    }

    /// Posts a pod CREATE AdmissionReview as the API server does and
    /// returns the pod the API server would store: the webhook's JSON Patch
    /// applied to the object it sent. Panics on a denial.
    pub async fn admit(&mut self, pod: &Pod, uid: &str) -> Pod {
        let object = serde_json::to_value(pod).expect("pod JSON");
        let review = json!({
            "kind": "AdmissionReview",
            "apiVersion": "admission.k8s.io/v1",
            "request": {
                "uid": uid,
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "name": pod.metadata.name,
                "namespace": pod.metadata.namespace,
                "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": object,
                "oldObject": null,
                "dryRun": false
            }
        });
        let request = hyper::Request::post("/mutate")
            .header("host", "tessera-webhook.tessera-system.svc")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                serde_json::to_vec(&review).expect("JSON"),
            )))
            .expect("request");
        self.sender.ready().await.expect("connection usable");
        let response = self
            .sender
            .send_request(request)
            .await
            .expect("webhook answers");
        assert_eq!(response.status(), 200);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let answer: Value = serde_json::from_slice(&body).expect("AdmissionReview JSON");
        let response = &answer["response"];
        assert_eq!(response["uid"], uid, "{answer}");
        assert_eq!(response["allowed"], true, "denied: {answer}");
        let mut stored = object;
        if let Some(encoded) = response.get("patch").and_then(Value::as_str) {
            assert_eq!(response["patchType"], "JSONPatch", "{answer}");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .expect("patch is base64");
            let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("JSON Patch");
            json_patch::patch(&mut stored, &patch).expect("the patch applies to the sent object");
        }
        serde_json::from_value(stored).expect("the patched object is a Pod")
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}
