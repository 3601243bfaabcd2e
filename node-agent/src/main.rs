//! `tessera-node-agent`: parses options, sets up logging, runs the agent
//! until SIGTERM or Ctrl-C.

use anyhow::Context;
use clap::Parser;
use tessera_node_agent::agent::{self, AgentSetup};
use tessera_node_agent::options::AgentOptions;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = AgentOptions::parse();
    tessera_runtime::logging::init(&options.log);

    let config = agent::load_config(options.config.as_deref())?;
    let backend = match agent::backend_from_options(&options) {
        Ok(backend) => backend,
        Err(e) => {
            eprintln!("tessera-node-agent: {e}");
            std::process::exit(2);
        }
    };
    if options.discover_once {
        print!(
            "{}",
            agent::discovery_report(backend.as_ref(), &config, &options.node_name)?
        );
        return Ok(());
    }

    let client = kube::Client::try_default()
        .await
        .context("could not configure the Kubernetes client; run in-cluster or set KUBECONFIG")?;
    let setup = AgentSetup::from_options(&options, config, backend, client)?;
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tessera_runtime::shutdown::signal().await;
        let _ = stop.send(true);
    });
    agent::run(setup, shutdown).await?;
    Ok(())
}
