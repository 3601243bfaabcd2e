//! The node agent's card tenant-table aggregation on its own, for running
//! the interceptor outside Kubernetes (`hack/gpu-validate-sm.sh` on a GPU
//! machine): it makes the tables of the given cards in `--cards-dir` (0644,
//! as the agent does) and every `--period-ms` reads the regions of the
//! tenants listed in `--tenants` and writes the tables, exactly as the
//! agent's thread does ([`TenantAggregator`]), until it is killed.
//!
//! The tenants file is re-read on every pass, one tenant a line:
//! `<region path> <priority: 0, 1 or -> <card UUID>[,<card UUID>...]`.
//! As under the agent, a tenant's id is the name of its region's directory
//! (give each tenant its own directory, and pass that name to the tenant as
//! `TESSERA_TENANT_ID`), and its priority comes from this file, not from
//! anything the tenant writes.
//!
//! ```text
//! cargo build --release -p tessera-node-agent --example aggregate_tables
//! aggregate_tables --cards-dir /tmp/cards --card GPU-... --tenants /tmp/tenants.txt
//! ```

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use clap::Parser;
use tessera_node_agent::host_files::HostLayout;
use tessera_node_agent::metrics::ContainerRecord;
use tessera_node_agent::region_file::RegionWarnings;
use tessera_node_agent::tenant_tables::{monotonic_ns, TableFiles, TenantAggregator};

/// Writes the per-card tenant tables from the tenants' regions, like the node agent.
#[derive(Debug, Parser)]
struct Options {
    /// Directory of the tables (created 0755).
    #[arg(long)]
    cards_dir: PathBuf,
    /// A card to keep a table for (repeat for each card).
    #[arg(long = "card", required = true)]
    cards: Vec<String>,
    /// The tenants file (see the example's documentation).
    #[arg(long)]
    tenants: PathBuf,
    /// Milliseconds between passes.
    #[arg(long, default_value_t = 100)]
    period_ms: u64,
}

/// The tenants file as the agent's container index.
fn read_tenants(path: &std::path::Path) -> Vec<ContainerRecord> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let region = PathBuf::from(words.next()?);
            let priority = match words.next()? {
                "-" => None,
                p => Some(p.parse().ok()?),
            };
            let cards: Vec<String> = words.next()?.split(',').map(str::to_owned).collect();
            let name = region
                .parent()
                .and_then(|d| d.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Some(ContainerRecord {
                namespace: "hack".into(),
                pod: name.clone(),
                container: name,
                region,
                card_memory_mib: vec![0; cards.len()],
                cards,
                priority,
            })
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let options = Options::parse();
    std::fs::create_dir_all(&options.cards_dir)?;
    std::fs::set_permissions(
        &options.cards_dir,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
    )?;
    let files = TableFiles::open(&options.cards_dir, &options.cards)?;
    let index = Arc::new(RwLock::new(Vec::new()));
    // No container directories to watch: the index is the tenants file.
    let layout = HostLayout::new(options.cards_dir.join("unused"));
    let mut aggregator = TenantAggregator::new(
        files,
        Arc::clone(&index),
        layout,
        RegionWarnings::new(),
        None,
    );
    eprintln!(
        "aggregating {} into {} every {} ms",
        options.tenants.display(),
        options.cards_dir.display(),
        options.period_ms
    );
    loop {
        *index
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = read_tenants(&options.tenants);
        aggregator.run_once(monotonic_ns());
        std::thread::sleep(Duration::from_millis(options.period_ms.max(10)));
    }
}
