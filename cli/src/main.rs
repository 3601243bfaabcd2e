//! `tessera`: parses the command line and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tessera_api::config::Config;
use tessera_cli::simulate::simulate;
use tessera_cli::workloads::Objects;
use tessera_cli::{render, BUNDLED_CLUSTER, BUNDLED_WORKLOADS};

#[derive(Debug, Parser)]
#[command(name = "tessera", version, about = "Tessera GPU sharing: simulate placements, inspect a cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the real webhook defaulting and scheduler over cluster YAML, no cluster needed.
    ///
    /// With no arguments it runs the bundled example (4 × T4 and 4 × A10G nodes,
    /// three inference deployments).
    Simulate {
        /// YAML with Node objects (carrying hami.io/node-nvidia-register) and,
        /// optionally, already-bound pods. Default: the bundled example cluster.
        #[arg(long)]
        cluster: Option<PathBuf>,
        /// Workload YAML files (Pods, Deployments, StatefulSets, Jobs, …).
        /// Default: the bundled example workloads when --cluster is not given.
        workloads: Vec<PathBuf>,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
        /// Tessera config file (the same YAML the components read).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn read(path: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Simulate { cluster, workloads, output, config } => {
            let config = match &config {
                Some(path) => Config::from_yaml(&read(path)?).with_context(|| format!("in {}", path.display()))?,
                None => Config::default(),
            };
            let mut objects = Objects::default();
            match &cluster {
                Some(path) => objects.read(&path.display().to_string(), &read(path)?)?,
                None => objects.read("bundled example cluster", BUNDLED_CLUSTER)?,
            }
            if workloads.is_empty() && cluster.is_none() {
                objects.read("bundled example workloads", BUNDLED_WORKLOADS)?;
            }
            for path in &workloads {
                objects.read(&path.display().to_string(), &read(path)?)?;
            }
            let admission = |pod: &_, config: &Config| tessera_webhook::decision::mutate_pod(pod, config).map_err(|e| e.to_string());
            let report = simulate(&objects, &config, &admission);
            match output {
                Output::Table => print!("{}", render::render_table(&report)),
                Output::Json => println!("{}", render::render_json(&report)),
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
