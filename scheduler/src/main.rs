//! `tessera-scheduler`: parses flags, sets up logging, and runs the
//! scheduler shell with its metrics server.

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tessera_runtime::config::load_config;
use tessera_runtime::{logging, shutdown};
use tessera_scheduler::options::Args;
use tessera_scheduler::shell::leader::LeaseSettings;
use tessera_scheduler::shell::{seal_key, Scheduler, ShellOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    logging::init(&args.log);
    let config = load_config(args.config.as_deref())?;
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
    // On SIGTERM stop deciding at once: binds in flight either landed or
    // are redone by the next leader from the pods' annotations.
    tokio::select! {
        result = scheduler.run() => result.context("scheduler stopped")?,
        () = shutdown::signal() => {}
    }
    Ok(())
}
