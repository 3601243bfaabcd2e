//! `tessera-scheduler`: parses flags, sets up logging, and runs the
//! scheduler shell with its metrics server.

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tessera_api::config::Config;
use tessera_scheduler::options::Args;
use tessera_scheduler::shell::leader::LeaseSettings;
use tessera_scheduler::shell::{seal_key, Scheduler, ShellOptions};

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
    let seal_key = seal_key::load_or_create(client.clone(), &args.key_namespace)
        .await
        .context("cannot load the allocation seal key")?;
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
        seal_key: Some(seal_key),
        allocation_timeout: Duration::from_secs(args.allocation_timeout_seconds),
        volume_binding_timeout: Duration::from_secs(args.volume_binding_timeout_seconds),
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
