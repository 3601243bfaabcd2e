//! The webhook process: its command-line options, and [`run`], which loads
//! the config, sets up the serving certificate (mounted files with reload,
//! or self-provisioned through the API) and serves until shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tessera_api::config::Config;
use tessera_runtime::config::ConfigLoadError;
use thiserror::Error;
use tokio::net::TcpListener;

use crate::namespaces::OptedOutNamespaces;
use crate::provision::{ProvisionError, SelfProvisioning};
use crate::quota_cache::GpuQuotaCache;
use crate::server::{router, serve_tls, AppState, DEFAULT_BODY_LIMIT};
use crate::tls::{certified_key_from_pem, server_config, CertFiles, CertStore, TlsError};

/// Command-line options of `tessera-webhook` (each also read from the
/// environment).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "tessera-webhook",
    version,
    about = "Tessera's mutating admission webhook for GPU pods"
)]
pub struct Options {
    /// Address to serve HTTPS on.
    #[arg(long, env = "TESSERA_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Tessera config file (YAML); defaults apply when left out.
    #[arg(long, env = "TESSERA_CONFIG")]
    pub config: Option<PathBuf>,
    /// PEM certificate chain to serve (with --tls-key); reloaded on change.
    #[arg(long, env = "TESSERA_WEBHOOK_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "TESSERA_WEBHOOK_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How often mounted certificate files are checked for changes, seconds.
    #[arg(
        long,
        env = "TESSERA_WEBHOOK_CERT_RELOAD_SECONDS",
        default_value_t = 10
    )]
    pub cert_reload_seconds: u64,
    /// Issue our own CA and serving certificate, keep the CA in a Secret and
    /// the webhook configuration's caBundle current (instead of --tls-cert).
    #[arg(long, env = "TESSERA_WEBHOOK_SELF_PROVISION", conflicts_with_all = ["tls_cert", "tls_key"])]
    pub self_provision: bool,
    /// Namespace of the webhook's Service and CA Secret.
    #[arg(long, env = "POD_NAMESPACE", default_value = "tessera-system")]
    pub namespace: String,
    /// The webhook's Service name (the certificate's DNS names derive from it).
    #[arg(
        long,
        env = "TESSERA_WEBHOOK_SERVICE",
        default_value = "tessera-webhook"
    )]
    pub service_name: String,
    /// Secret that holds the self-provisioned CA.
    #[arg(
        long,
        env = "TESSERA_WEBHOOK_CA_SECRET",
        default_value = "tessera-webhook-ca"
    )]
    pub ca_secret: String,
    /// MutatingWebhookConfiguration whose caBundle is kept current.
    #[arg(
        long,
        env = "TESSERA_WEBHOOK_CONFIGURATION",
        default_value = "tessera-webhook"
    )]
    pub webhook_config_name: String,
    /// Extra DNS names for the self-provisioned certificate.
    #[arg(
        long = "extra-dns-name",
        env = "TESSERA_WEBHOOK_EXTRA_DNS_NAMES",
        value_delimiter = ','
    )]
    pub extra_dns_names: Vec<String>,
    /// How often the caBundle is checked and restored, seconds.
    #[arg(long, env = "TESSERA_WEBHOOK_CA_SYNC_SECONDS", default_value_t = 60)]
    pub ca_sync_seconds: u64,
    /// Also honour `hami.io/webhook: ignore` on namespaces by watching them
    /// (needs list/watch on namespaces; the webhook configuration's
    /// namespaceSelector is the primary mechanism).
    #[arg(long, env = "TESSERA_WEBHOOK_WATCH_NAMESPACES")]
    pub watch_namespaces: bool,
    /// Deny at admission a GPU pod whose own request is over its
    /// namespace's GPU quota (`limits.nvidia.com/gpumem`,
    /// `limits.nvidia.com/gpucores`) by watching ResourceQuotas (needs
    /// list/watch on resourcequotas). The scheduler enforces the quota
    /// with or without it.
    #[arg(long, env = "TESSERA_WEBHOOK_GPU_QUOTAS")]
    pub gpu_quotas: bool,
    /// Largest accepted review body, bytes; larger bodies get 413.
    #[arg(long, env = "TESSERA_WEBHOOK_BODY_LIMIT", default_value_t = DEFAULT_BODY_LIMIT)]
    pub body_limit_bytes: usize,
    /// Logging.
    #[command(flatten)]
    pub log: tessera_runtime::logging::LogArgs,
}

/// Why the webhook could not start.
#[derive(Debug, Error)]
pub enum RunError {
    /// The config file could not be read or is invalid.
    #[error(transparent)]
    Config(#[from] ConfigLoadError),
    /// Neither a certificate nor self-provisioning was asked for.
    #[error("no serving certificate: pass --tls-cert and --tls-key (a mounted Secret), or --self-provision")]
    NoCertificate,
    /// The certificate could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Self-provisioning failed.
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    /// No Kubernetes client could be built.
    #[error("cannot reach the Kubernetes API for --self-provision ({0}); run in-cluster with a service account, or set KUBECONFIG")]
    Kube(#[source] kube::Error),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}; choose another --listen address")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Loads the config file, or the defaults when none is given.
pub fn load_config(path: Option<&PathBuf>) -> Result<Config, RunError> {
    Ok(tessera_runtime::config::load_config(
        path.map(PathBuf::as_path),
    )?)
}

/// Binds `--listen` and runs the webhook until `shutdown` completes. With
/// `--self-provision`, `--watch-namespaces` or `--gpu-quotas`, `client` is used for the API (built from the
/// environment when `None`).
pub async fn run(
    options: Options,
    client: Option<kube::Client>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    let listener = TcpListener::bind(options.listen)
        .await
        .map_err(|source| RunError::Bind {
            addr: options.listen,
            source,
        })?;
    serve(options, listener, client, shutdown).await
}

/// Like [`run`], on a listener the caller bound (tests bind port 0).
pub async fn serve(
    options: Options,
    listener: TcpListener,
    client: Option<kube::Client>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    let config = load_config(options.config.as_ref())?;
    let mut background = Vec::new();
    let client = match client {
        Some(client) => Some(client),
        None if options.self_provision || options.watch_namespaces || options.gpu_quotas => {
            Some(kube::Client::try_default().await.map_err(RunError::Kube)?)
        }
        None => None,
    };
    let (store, mut state) = if let (true, Some(client)) = (options.self_provision, client.clone())
    {
        let provisioning = SelfProvisioning {
            namespace: options.namespace.clone(),
            service: options.service_name.clone(),
            ca_secret: options.ca_secret.clone(),
            webhook_configuration: options.webhook_config_name.clone(),
            extra_dns_names: options.extra_dns_names.clone(),
            sync_interval: Duration::from_secs(options.ca_sync_seconds.max(1)),
        };
        let (ca, issued) = provisioning.provision(client.clone()).await?;
        let store = CertStore::new(certified_key_from_pem(
            issued.chain_pem.as_bytes(),
            issued.key_pem.as_bytes(),
        )?);
        let state = AppState::new(config.clone(), false);
        background.push(tokio::spawn(provisioning.maintain(
            client,
            ca,
            store.clone(),
            state.ready.clone(),
        )));
        (store, state)
    } else {
        let (Some(cert), Some(key)) = (options.tls_cert.clone(), options.tls_key.clone()) else {
            return Err(RunError::NoCertificate);
        };
        let files = CertFiles { cert, key };
        let store = CertStore::new(files.load()?);
        background.push(tokio::spawn(files.watch(
            store.clone(),
            Duration::from_secs(options.cert_reload_seconds.max(1)),
        )));
        (store, AppState::new(config, true))
    };
    if let (true, Some(client)) = (options.watch_namespaces, client.clone()) {
        let (namespaces, driver) = OptedOutNamespaces::watch(client);
        background.push(tokio::spawn(driver));
        tracing::info!("waiting for the list of opted-out namespaces");
        namespaces.wait_until_ready().await;
        state.namespaces = Some(namespaces);
    }
    if let (true, Some(client)) = (options.gpu_quotas, client) {
        let (quotas, driver) = GpuQuotaCache::watch(client);
        background.push(tokio::spawn(driver));
        tracing::info!("waiting for the list of resource quotas");
        quotas.wait_until_ready().await;
        state.quotas = Some(quotas);
    }
    tracing::info!(addr = ?listener.local_addr().ok(), self_provision = options.self_provision, "serving admission reviews");
    let tls = server_config(store)?;
    serve_tls(
        listener,
        tls,
        router(state, options.body_limit_bytes),
        shutdown,
    )
    .await;
    for task in background {
        task.abort();
    }
    Ok(())
}
