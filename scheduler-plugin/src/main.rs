//! `tessera-scheduler`: parses flags, sets up logging, and runs the
//! scheduler shell with its metrics server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tessera_api::config::Config;
use tessera_scheduler::shell::leader::LeaseSettings;
use tessera_scheduler::shell::{Scheduler, ShellOptions};

/// Tessera's scheduler for GPU pods (pods with `schedulerName: <config schedulerName>`).
#[derive(Debug, Parser)]
#[command(name = "tessera-scheduler", version)]
struct Args {
    /// Tessera config file (YAML); defaults apply when absent.
    #[arg(long, env = "TESSERA_CONFIG")]
    config: Option<PathBuf>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:9395")]
    metrics_address: SocketAddr,
    /// Run leader election on a Lease so only one replica binds.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "tessera-system")]
    lease_namespace: String,
    /// Name of the Lease.
    #[arg(long, default_value = "tessera-scheduler")]
    lease_name: String,
    /// This replica's identity (defaults to the pod name).
    #[arg(long, env = "POD_NAME", default_value = "tessera-scheduler")]
    identity: String,
    /// Seconds a lease stays valid without renewal.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Binds in flight at once.
    #[arg(long, default_value_t = 64)]
    bind_concurrency: usize,
    /// Publish a `Scheduled` Event per placed pod.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    scheduled_events: bool,
    /// Log as JSON (for clusters) instead of text.
    #[arg(long, default_value_t = false)]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config {}", path.display()))?;
            Config::from_yaml(&text).with_context(|| format!("in config {}", path.display()))?
        }
        None => Config::default(),
    };
    let client = kube::Client::try_default()
        .await
        .context("cannot reach the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let options = ShellOptions {
        identity: args.identity.clone(),
        lease: args.leader_elect.then(|| LeaseSettings {
            namespace: args.lease_namespace.clone(),
            name: args.lease_name.clone(),
            identity: args.identity.clone(),
            lease_duration: Duration::from_secs(args.lease_duration_seconds),
            retry_period: Duration::from_secs((args.lease_duration_seconds / 3).max(1)),
        }),
        bind_concurrency: args.bind_concurrency,
        scheduled_events: args.scheduled_events,
    };
    let scheduler = Scheduler::new(client, config, options);
    let listener = tokio::net::TcpListener::bind(args.metrics_address)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_address))?;
    let router = scheduler.router();
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(%error, "metrics server stopped");
        }
    });
    tracing::info!(scheduler_name = %args.identity, "tessera-scheduler starting");
    scheduler.run().await.context("scheduler stopped")?;
    Ok(())
}
