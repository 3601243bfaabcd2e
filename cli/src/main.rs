//! `tessera`: parses the command line and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};
use tessera_cli::render;
use tessera_cli::simulate::{simulate_files, SimulationFiles};

#[derive(Debug, Parser)]
#[command(
    name = "tessera",
    version,
    about = "Tessera GPU sharing: simulate placements, inspect a cluster"
)]
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
    /// Show per node and per card the GPU memory and cores allocated in a
    /// live cluster, and which containers hold them.
    ///
    /// Reads the cluster through the kubeconfig (KUBECONFIG, ~/.kube/config
    /// or the in-cluster service account); needs list on nodes and pods.
    Inspect {
        /// Output format (`json` is stable: fields are only ever added).
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
        /// Kubeconfig file to use instead of the default lookup.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Kubeconfig context to use instead of the current one.
        #[arg(long)]
        context: Option<String>,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Simulate {
            cluster,
            workloads,
            output,
            config,
        } => {
            let report = simulate_files(SimulationFiles {
                cluster: cluster.as_deref(),
                workloads: &workloads,
                config: config.as_deref(),
            })?;
            match output {
                Output::Table => print!("{}", render::render_table(&report)),
                Output::Json => println!("{}", render::render_json(&report)),
            }
            Ok(())
        }
        Command::Inspect {
            output,
            kubeconfig,
            context,
        } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let report = runtime.block_on(async {
                let client =
                    tessera_cli::kubeconfig::connect(kubeconfig.as_deref(), context.as_deref())
                        .await?;
                anyhow::Ok(tessera_cli::inspect::inspect(client).await?)
            })?;
            match output {
                Output::Table => print!("{}", render::render_inspect_table(&report)),
                Output::Json => println!("{}", render::render_inspect_json(&report)),
            }
            Ok(())
        }
    }
}

/// `kubectl tessera …` when installed as `kubectl-tessera`, else `tessera …`
/// (only the name shown in help and usage changes).
fn invoked_name() -> &'static str {
    let program = std::env::args_os().next().unwrap_or_default();
    let file = std::path::Path::new(&program)
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    if file.starts_with("kubectl-") {
        "kubectl tessera"
    } else {
        "tessera"
    }
}

fn main() -> ExitCode {
    let matches = Cli::command().bin_name(invoked_name()).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
