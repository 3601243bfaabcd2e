//! The webhook served over real TLS on 127.0.0.1, called by a client that
//! trusts only the CA the webhook's certificate was issued from: mounted
//! certificate files (and their reload), and the self-provisioned CA against
//! the Kubernetes API stand-in (Secret, first writer wins, `caBundle`).

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::Parser as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use tessera_testkit::ApiServer;
use tessera_webhook::app::{serve, Options};
use tessera_webhook::provision::CertAuthority;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

const WAIT: Duration = Duration::from_secs(15);
/// The name the webhook's Service gives it, which self-provisioned
/// certificates are issued for.
const SERVICE_DNS: &str = "tessera-webhook.tessera-system.svc";
const REVIEW_VERSION: &str = "admission.k8s.io/v1";

/// A client that trusts `ca_pem` only.
fn connector(ca_pem: &str) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots
            .add(cert.expect("CA PEM parses"))
            .expect("CA is a usable root");
    }
    let config =
        rustls::ClientConfig::builder_with_provider(tessera_webhook::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// One HTTP/1.1 connection over verified TLS.
struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Connection {
    async fn open(
        addr: SocketAddr,
        ca_pem: &str,
        server_name: &str,
    ) -> Result<Self, std::io::Error> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from(server_name.to_owned()).expect("a DNS name");
        let tls = connector(ca_pem).connect(name, tcp).await?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(std::io::Error::other)?;
        tokio::spawn(connection);
        Ok(Self { sender })
    }

    async fn request(&mut self, method: &str, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "tessera-webhook.tessera-system.svc")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        self.sender
            .ready()
            .await
            .expect("connection usable for the next request");
        let response = self.sender.send_request(request).await.expect("response");
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .to_vec();
        (status, body)
    }

    /// POSTs an AdmissionReview to `/mutate`: the status and the decoded answer.
    async fn admit(&mut self, review: Vec<u8>, uid: &str) -> (u16, common::Answer) {
        let (status, body) = self.request("POST", "/mutate", review).await;
        (status, common::decode_answer(&body, REVIEW_VERSION, uid))
    }

    /// Sends the review `make(uid)` (a fresh uid each time) every 50 ms
    /// until the webhook allows it; `what` says what failed when it never
    /// does.
    async fn admit_until_allowed(&mut self, make: impl Fn(&str) -> Vec<u8>, what: &str) {
        let deadline = Instant::now() + WAIT;
        for attempt in 0.. {
            let uid = format!("retry-{attempt}");
            let (_, answer) = self.admit(make(&uid), &uid).await;
            if answer.allowed {
                return;
            }
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asks `/readyz` every 100 ms until it answers 200; `what` says what
    /// failed when it never does.
    async fn wait_ready(&mut self, what: &str) {
        let deadline = Instant::now() + WAIT;
        while self.request("GET", "/readyz", vec![]).await.0 != 200 {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Opens a verified connection once the server presents a certificate
/// from `ca_pem` for `server_name`, retrying every `every`; `what` says
/// what failed when it never does.
async fn open_once_served(
    addr: SocketAddr,
    ca_pem: &str,
    server_name: &str,
    every: Duration,
    what: &str,
) -> Connection {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(connection) = Connection::open(addr, ca_pem, server_name).await {
            return connection;
        }
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(every).await;
    }
}

/// Starts the webhook with a mounted certificate, `extra` options and the
/// API stand-in's client, and opens a verified connection to it.
async fn serve_against(api: &ApiServer, extra: &[&str]) -> (Connection, JoinHandle<()>) {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertAuthority::generate().unwrap();
    write_pair(dir.path(), &ca, &["localhost"]);
    let options = mounted_cert_options(dir.path(), extra);
    let (addr, task) = start(options, Some(api.client())).await;
    let connection = open_once_served(
        addr,
        ca.cert_pem(),
        "localhost",
        Duration::from_millis(50),
        "the webhook never started serving",
    )
    .await;
    (connection, task)
}

async fn start(options: Options, client: Option<kube::Client>) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        serve(options, listener, client, std::future::pending())
            .await
            .expect("webhook runs");
    });
    (addr, task)
}

fn write_pair(dir: &Path, ca: &CertAuthority, names: &[&str]) {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let issued = ca.issue_serving_cert(&names).unwrap();
    // Write to temporaries and rename, as a Secret volume update does.
    std::fs::write(dir.join("tls.crt.new"), issued.chain_pem).unwrap();
    std::fs::write(dir.join("tls.key.new"), issued.key_pem).unwrap();
    std::fs::rename(dir.join("tls.key.new"), dir.join("tls.key")).unwrap();
    std::fs::rename(dir.join("tls.crt.new"), dir.join("tls.crt")).unwrap();
}

/// Options serving the mounted pair `tls.crt`/`tls.key` in `dir`, plus `extra`.
fn mounted_cert_options(dir: &Path, extra: &[&str]) -> Options {
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    let args = [
        "tessera-webhook",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    Options::parse_from(args.iter().chain(extra))
}

fn gpu_review(uid: &str) -> Vec<u8> {
    let pod = common::api_server_pod(
        json!([{"name": "trainer", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]),
        json!({}),
        json!({}),
    );
    serde_json::to_vec(&common::review(REVIEW_VERSION, uid, &pod)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_mounted_certificate_and_reloads_it() {
    let dir = tempfile::tempdir().unwrap();
    let first_ca = CertAuthority::generate().unwrap();
    write_pair(dir.path(), &first_ca, &["localhost"]);
    let options = mounted_cert_options(
        dir.path(),
        &["--cert-reload-seconds", "1", "--body-limit-bytes", "65536"],
    );
    let (addr, task) = start(options, None).await;

    let mut connection = Connection::open(addr, first_ca.cert_pem(), "localhost")
        .await
        .expect("verified TLS");
    // Several reviews on one keep-alive connection.
    for uid in ["a", "b", "c"] {
        let (status, answer) = connection.admit(gpu_review(uid), uid).await;
        assert_eq!(status, 200);
        assert!(answer.allowed);
        assert!(answer.patch.is_some());
    }
    assert_eq!(connection.request("GET", "/healthz", vec![]).await.0, 200);
    assert_eq!(connection.request("GET", "/readyz", vec![]).await.0, 200);

    // Malformed bodies: 400 with a reason; the server keeps serving.
    let (status, body) = connection
        .request("POST", "/mutate", b"{\"kind\":".to_vec())
        .await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("not an AdmissionReview"));
    let (status, body) = connection
        .request(
            "POST",
            "/mutate",
            serde_json::to_vec(&json!({"kind": "AdmissionReview", "apiVersion": REVIEW_VERSION}))
                .unwrap(),
        )
        .await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("no `request`"));
    // Too large: refused before parsing.
    let mut connection = Connection::open(addr, first_ca.cert_pem(), "localhost")
        .await
        .unwrap();
    let (status, _) = connection
        .request("POST", "/mutate", vec![b' '; 100_000])
        .await;
    assert_eq!(status, 413);

    let mut connection = Connection::open(addr, first_ca.cert_pem(), "localhost")
        .await
        .unwrap();
    let (status, body) = connection.request("GET", "/metrics", vec![]).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.contains("tessera_webhook_admissions_total{outcome=\"mutated\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("tessera_webhook_admissions_total{outcome=\"malformed\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("tessera_webhook_admission_duration_seconds_count 5"),
        "{text}"
    );

    // A client that trusts another CA is refused.
    let stranger = CertAuthority::generate().unwrap();
    assert!(Connection::open(addr, stranger.cert_pem(), "localhost")
        .await
        .is_err());
    // And the name must match.
    assert!(
        Connection::open(addr, first_ca.cert_pem(), "elsewhere.example")
            .await
            .is_err()
    );

    // Rotate: a certificate from a new CA replaces the files.
    let second_ca = CertAuthority::generate().unwrap();
    write_pair(dir.path(), &second_ca, &["localhost"]);
    open_once_served(
        addr,
        second_ca.cert_pem(),
        "localhost",
        Duration::from_millis(200),
        "the rotated certificate was never served",
    )
    .await;
    assert!(
        Connection::open(addr, first_ca.cert_pem(), "localhost")
            .await
            .is_err(),
        "old certificate no longer served"
    );
    // A half-written pair (garbage) keeps the current certificate.
    std::fs::write(dir.path().join("tls.crt"), "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut connection = Connection::open(addr, second_ca.cert_pem(), "localhost")
        .await
        .expect("still serving");
    assert_eq!(connection.request("GET", "/healthz", vec![]).await.0, 200);
    task.abort();
}

fn webhook_configuration() -> MutatingWebhookConfiguration {
    serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "tessera-webhook"},
        "webhooks": [{
            "name": "pods.tessera.io",
            "admissionReviewVersions": ["v1", "v1beta1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "clientConfig": {"service": {"name": "tessera-webhook", "namespace": "tessera-system", "path": "/mutate", "port": 443}},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "objectSelector": {"matchExpressions": [{"key": "hami.io/webhook", "operator": "NotIn", "values": ["ignore"]}]}
        }, {
            "name": "pods-legacy.tessera.io",
            "admissionReviewVersions": ["v1beta1"],
            "sideEffects": "None",
            "clientConfig": {"service": {"name": "tessera-webhook", "namespace": "tessera-system", "path": "/mutate"}, "caBundle": "b2xkCg=="}
        }]
    }))
    .unwrap()
}

fn self_provision_options(sync_seconds: &str) -> Options {
    Options::parse_from([
        "tessera-webhook",
        "--self-provision",
        "--namespace",
        "tessera-system",
        "--service-name",
        "tessera-webhook",
        "--ca-secret",
        "tessera-webhook-ca",
        "--webhook-config-name",
        "tessera-webhook",
        "--ca-sync-seconds",
        sync_seconds,
    ])
}

/// Waits until every webhook in the configuration carries `ca_pem` as its caBundle.
async fn wait_for_ca_bundles(api: &ApiServer, what: &str, ca_pem: &str) {
    let expected = Some(ca_pem.to_owned());
    wait_for(what, || {
        ca_bundles(api).iter().all(|b| *b == expected).then_some(())
    })
    .await;
}

/// Waits for the self-provisioned CA Secret: its data.
async fn wait_for_ca_secret(api: &ApiServer) -> std::collections::BTreeMap<String, ByteString> {
    let secret: Secret = wait_for("the CA Secret", || {
        api.get(Some("tessera-system"), "tessera-webhook-ca")
    })
    .await;
    secret.data.expect("Secret has data")
}

async fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ca_bundles(api: &ApiServer) -> Vec<Option<String>> {
    let config: MutatingWebhookConfiguration = api
        .get(None, "tessera-webhook")
        .expect("configuration exists");
    config
        .webhooks
        .unwrap_or_default()
        .into_iter()
        .map(|w| {
            w.client_config
                .ca_bundle
                .map(|b| String::from_utf8(b.0).unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_provisioned_ca_is_shared_published_and_trusted() {
    let api = ApiServer::start().await.unwrap();
    api.insert(&webhook_configuration());

    // Two replicas start together: both must end up with the same CA.
    let (first, first_task) = start(self_provision_options("1"), Some(api.client())).await;
    let (second, second_task) = start(self_provision_options("1"), Some(api.client())).await;

    let data = wait_for_ca_secret(&api).await;
    let ca_pem = String::from_utf8(data["ca.crt"].0.clone()).unwrap();
    assert!(data.contains_key("ca.key"));

    // Every webhook in the configuration trusts exactly that CA.
    wait_for_ca_bundles(&api, "caBundle patched", &ca_pem).await;

    // Clients that know only the published caBundle verify both replicas
    // under the Service's DNS name.
    let published = ca_bundles(&api)[0].clone().unwrap();
    for addr in [first, second] {
        let mut connection = Connection::open(addr, &published, SERVICE_DNS)
            .await
            .expect("replica serves a certificate from the published CA");
        let (status, answer) = connection.admit(gpu_review("sp"), "sp").await;
        assert_eq!(status, 200);
        assert!(answer.allowed);
        connection.wait_ready("replica never became ready").await;
    }

    // Someone re-applies the manifests with an empty caBundle: restored.
    let mut config = webhook_configuration();
    for webhook in config.webhooks.iter_mut().flatten() {
        webhook.client_config.ca_bundle = None;
    }
    api.insert(&config);
    wait_for_ca_bundles(&api, "caBundle restored", &ca_pem).await;

    // A restarted replica reuses the stored CA instead of writing a new one.
    first_task.abort();
    let creates_before = api.write_count("POST", "secrets");
    let (third, third_task) = start(self_provision_options("1"), Some(api.client())).await;
    let mut connection = Connection::open(third, &ca_pem, SERVICE_DNS)
        .await
        .expect("the restarted replica signs with the same CA");
    assert_eq!(connection.request("GET", "/healthz", vec![]).await.0, 200);
    assert_eq!(
        api.write_count("POST", "secrets"),
        creates_before,
        "no second CA written"
    );
    let stored: Value = api
        .get_value(
            "v1",
            "secrets",
            Some("tessera-system"),
            "tessera-webhook-ca",
        )
        .unwrap();
    let stored_ca = base64::engine::general_purpose::STANDARD
        .decode(stored["data"]["ca.crt"].as_str().unwrap())
        .unwrap();
    assert_eq!(stored_ca, ca_pem.as_bytes());
    second_task.abort();
    third_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_loses_the_create_race_uses_the_winners_ca() {
    let api = ApiServer::start().await.unwrap();
    let winner = CertAuthority::generate().unwrap();
    api.insert_value(
        "v1",
        "secrets",
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "tessera-webhook-ca", "namespace": "tessera-system"},
            "data": {
                "ca.crt": base64::engine::general_purpose::STANDARD.encode(winner.cert_pem()),
                "ca.key": base64::engine::general_purpose::STANDARD.encode(winner.key_pem()),
            }
        }),
    );
    // Our first read happens before the winner's create lands (404); our
    // create then meets the winner's Secret (409 AlreadyExists).
    api.fail_next("GET", "secrets", 404, 1);
    let ca = tessera_webhook::provision::load_or_create_ca(
        api.client(),
        "tessera-system",
        "tessera-webhook-ca",
    )
    .await
    .expect("falls back to the stored CA");
    assert_eq!(ca.cert_pem(), winner.cert_pem());
    assert_eq!(
        api.write_count("POST", "secrets"),
        1,
        "it did try to create"
    );
    let issued = ca.issue_serving_cert(&[SERVICE_DNS.to_owned()]).unwrap();
    assert!(issued.chain_pem.ends_with(winner.cert_pem()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_webhook_configuration_keeps_the_replica_unready() {
    let api = ApiServer::start().await.unwrap();
    let (addr, task) = start(self_provision_options("1"), Some(api.client())).await;
    let data = wait_for_ca_secret(&api).await;
    let ca_pem = String::from_utf8(data["ca.crt"].0.clone()).unwrap();
    let mut connection = Connection::open(addr, &ca_pem, SERVICE_DNS).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(connection.request("GET", "/readyz", vec![]).await.0, 503);
    assert_eq!(connection.request("GET", "/healthz", vec![]).await.0, 200);
    // Once the configuration is installed, the next sync patches it.
    api.insert(&webhook_configuration());
    wait_for_ca_bundles(&api, "caBundle patched", &ca_pem).await;
    connection.wait_ready("never became ready").await;
    task.abort();
}

fn review_in(namespace: &str, uid: &str) -> Vec<u8> {
    let pod = common::api_server_pod(
        json!([{"name": "trainer", "resources": {"limits": {"nvidia.com/gpumem-percentage": "250"}}}]),
        json!({"namespace": namespace}),
        json!({}),
    );
    let mut review = common::review(REVIEW_VERSION, uid, &pod);
    review["request"]["namespace"] = json!(namespace);
    serde_json::to_vec(&review).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_namespaces_that_opted_out_are_left_alone() {
    let api = ApiServer::start().await.unwrap();
    let namespace = |name: &str, ignore: bool| -> k8s_openapi::api::core::v1::Namespace {
        let labels = if ignore {
            json!({"hami.io/webhook": "ignore"})
        } else {
            json!({"team": "ml"})
        };
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})).unwrap()
    };
    api.insert(&namespace("quiet", true));
    api.insert(&namespace("ml-team", false));
    let (mut connection, task) = serve_against(&api, &["--watch-namespaces"]).await;
    let (_, answer) = connection.admit(review_in("quiet", "q1"), "q1").await;
    assert!(answer.allowed && answer.patch.is_none(), "{}", answer.body);
    let (_, answer) = connection.admit(review_in("ml-team", "m1"), "m1").await;
    assert!(!answer.allowed);

    // A namespace that opts out later is honoured once the watch sees it.
    api.insert(&namespace("ml-team", true));
    connection
        .admit_until_allowed(
            |uid| review_in("ml-team", uid),
            "the relabelled namespace was never honoured",
        )
        .await;
    task.abort();
}

/// A review of a pod in `namespace` asking for two cards of 5000 MiB.
fn review_of_two_cards(namespace: &str, uid: &str) -> Vec<u8> {
    let pod = common::api_server_pod(
        json!([{"name": "trainer", "resources": {"limits": {"nvidia.com/gpu": "2", "nvidia.com/gpumem": "5000"}}}]),
        json!({"namespace": namespace}),
        json!({}),
    );
    let mut review = common::review(REVIEW_VERSION, uid, &pod);
    review["request"]["namespace"] = json!(namespace);
    serde_json::to_vec(&review).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_quotas_deny_a_pod_over_its_namespace_quota_and_follow_changes() {
    let api = ApiServer::start().await.unwrap();
    let quota = |limit: &str| -> k8s_openapi::api::core::v1::ResourceQuota {
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "ResourceQuota",
            "metadata": {"name": "team-gpus", "namespace": "ml-team"},
            "spec": {"hard": {"limits.nvidia.com/gpumem": limit}}}))
        .unwrap()
    };
    api.insert(&quota("8192"));
    let (mut connection, task) = serve_against(&api, &["--gpu-quotas"]).await;
    let (_, answer) = connection
        .admit(review_of_two_cards("ml-team", "q1"), "q1")
        .await;
    assert!(!answer.allowed, "{}", answer.body);
    let message = answer.message.unwrap_or_default();
    assert!(
        message.contains("ResourceQuota `team-gpus`") && message.contains("10000 MiB"),
        "{message}"
    );
    let (_, answer) = connection
        .admit(review_of_two_cards("research", "r1"), "r1")
        .await;
    assert!(answer.allowed, "no quota in research: {}", answer.body);

    // A raised quota is honoured once the watch sees it.
    api.insert(&quota("16384"));
    connection
        .admit_until_allowed(
            |uid| review_of_two_cards("ml-team", uid),
            "the raised quota was never honoured",
        )
        .await;
    task.abort();
}
