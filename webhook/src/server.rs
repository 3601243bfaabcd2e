//! The HTTPS server around the decision: the axum routes (`POST /mutate`,
//! `GET /healthz`, `GET /readyz`, `GET /metrics`), the body size limit, and
//! the TLS accept loop (tokio-rustls, HTTP/1.1 with keep-alive and HTTP/2).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use tessera_api::config::Config;
use tessera_api::gpu_quota::NamespaceQuota;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::Service as _;

use crate::decision::AdmissionDecision;
use crate::gpu_quota::admit_with_quota;
use crate::metrics::{Outcome, WebhookMetrics};
use crate::namespaces::OptedOutNamespaces;
use crate::quota_cache::GpuQuotaCache;
use crate::review::{parse_review, response_body, ReviewError};

/// Default limit on a review body. The API server caps objects at 3 MiB;
/// a review carries the object once at CREATE, plus its envelope.
pub const DEFAULT_BODY_LIMIT: usize = 4 * 1024 * 1024;

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The config the decision uses.
    pub config: Arc<Config>,
    /// Counters and the latency histogram.
    pub metrics: Arc<WebhookMetrics>,
    /// Whether `/readyz` answers 200 (set once the API server trusts us).
    pub ready: Arc<AtomicBool>,
    /// Opted-out namespaces, when `--watch-namespaces` is on.
    pub namespaces: Option<OptedOutNamespaces>,
    /// Namespace GPU quotas, when `--gpu-quotas` is on.
    pub quotas: Option<GpuQuotaCache>,
}

impl AppState {
    /// State for `config`, ready or not.
    pub fn new(config: Config, ready: bool) -> Self {
        Self {
            config: Arc::new(config),
            metrics: Arc::new(WebhookMetrics::new()),
            ready: Arc::new(AtomicBool::new(ready)),
            namespaces: None,
            quotas: None,
        }
    }
}

/// The routes.
pub fn router(state: AppState, body_limit: usize) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// Answers one review body: the response body, or why it is malformed.
/// The outcome is for metrics.
pub fn answer_review(body: &[u8], config: &Config) -> Result<(Vec<u8>, Outcome), ReviewError> {
    answer_review_with(body, config, |_| None)
}

/// [`answer_review`], with the labels of the review's namespace looked up
/// by `namespace_labels` (`None`: unknown).
pub fn answer_review_with(
    body: &[u8],
    config: &Config,
    namespace_labels: impl Fn(&str) -> Option<BTreeMap<String, String>>,
) -> Result<(Vec<u8>, Outcome), ReviewError> {
    answer_review_with_quotas(body, config, namespace_labels, |_| None)
}

/// [`answer_review_with`], with the GPU quota of the pod's namespace looked
/// up by `namespace_quota` (`None`: no GPU quota there).
pub fn answer_review_with_quotas(
    body: &[u8],
    config: &Config,
    namespace_labels: impl Fn(&str) -> Option<BTreeMap<String, String>>,
    namespace_quota: impl Fn(&str) -> Option<NamespaceQuota>,
) -> Result<(Vec<u8>, Outcome), ReviewError> {
    let review = parse_review(body)?;
    let Some(pod) = review.pod.as_deref() else {
        let decision = AdmissionDecision::Allowed {
            reason: crate::decision::AllowReason::NoGpuRequest,
            patch: None,
        };
        return Ok((
            response_body(&review.api_version, &review.uid, &decision),
            Outcome::Allowed,
        ));
    };
    let labels = review.namespace.as_deref().and_then(namespace_labels);
    // The API server fills in the object's namespace before admission; a
    // review that leaves it out still names it in the request.
    let pod = match (&pod.metadata.namespace, &review.namespace) {
        (None, Some(namespace)) => {
            let mut owned = pod.clone();
            owned.metadata.namespace = Some(namespace.clone());
            std::borrow::Cow::Owned(owned)
        }
        _ => std::borrow::Cow::Borrowed(pod),
    };
    let pod = pod.as_ref();
    let quota = pod.metadata.namespace.as_deref().and_then(&namespace_quota);
    let decision = admit_with_quota(pod, labels.as_ref(), config, quota.as_ref());
    let outcome = match &decision {
        AdmissionDecision::Allowed { patch: Some(_), .. } => Outcome::Mutated,
        AdmissionDecision::Allowed { reason, .. } => {
            tracing::debug!(uid = %review.uid, namespace = ?review.namespace, reason = reason.as_str(), "pod admitted untouched");
            Outcome::Allowed
        }
        AdmissionDecision::Denied(denial) => {
            tracing::info!(uid = %review.uid, namespace = ?review.namespace, name = ?pod_name(&review.name, pod), %denial, "pod denied");
            Outcome::Denied
        }
    };
    Ok((
        response_body(&review.api_version, &review.uid, &decision),
        outcome,
    ))
}

fn pod_name(
    request_name: &Option<String>,
    pod: &k8s_openapi::api::core::v1::Pod,
) -> Option<String> {
    request_name
        .clone()
        .filter(|n| !n.is_empty())
        .or_else(|| pod.metadata.name.clone())
        .or_else(|| pod.metadata.generate_name.clone())
}

async fn mutate(State(state): State<AppState>, body: Bytes) -> Response {
    let started = Instant::now();
    let namespaces = state.namespaces.as_ref();
    let lookup = |namespace: &str| namespaces.and_then(|n| n.labels(namespace));
    let quotas = state.quotas.as_ref();
    let quota =
        |namespace: &str| quotas.and_then(|q| q.namespace(namespace, &state.config.resources));
    match answer_review_with_quotas(&body, &state.config, lookup, quota) {
        Ok((json, outcome)) => {
            state.metrics.observe(outcome, started.elapsed());
            ([(header::CONTENT_TYPE, "application/json")], json).into_response()
        }
        Err(error) => {
            state.metrics.observe(Outcome::Malformed, started.elapsed());
            tracing::warn!(%error, bytes = body.len(), "malformed admission review refused");
            (StatusCode::BAD_REQUEST, format!("{error}\n")).into_response()
        }
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        "ok".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the webhook configuration's caBundle is not yet up to date\n",
        )
            .into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// Serves `router` over TLS on `listener` until `shutdown` completes.
/// Each connection is served on its own task; a failed handshake or a
/// broken connection is logged and affects no other.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    router: Router,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Usually out of file descriptors; back off briefly.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => {
                tracing::info!("shutting down: no longer accepting connections");
                return;
            }
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                router.clone().call(request)
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(error) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
}
