//! `tessera-webhook`: parses options, sets up logging and runs the webhook
//! until SIGTERM or Ctrl-C (see the library docs for what it serves and
//! what it expects).

use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = tessera_webhook::app::Options::parse();
    tessera_runtime::logging::init(&options.log);
    tessera_webhook::app::run(options, None, tessera_runtime::shutdown::signal()).await?;
    Ok(())
}
