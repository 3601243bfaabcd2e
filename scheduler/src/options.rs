//! Command-line options of `tessera-scheduler` (clap), in the library so
//! manifests can be tested against the real parser.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// Tessera's scheduler for GPU pods (pods with `schedulerName: <config schedulerName>`).
#[derive(Debug, Parser)]
#[command(name = "tessera-scheduler", version)]
pub struct Args {
    /// Tessera config file (YAML); defaults apply when absent.
    #[arg(long, env = "TESSERA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:9395")]
    pub metrics_address: SocketAddr,
    /// Run leader election on a Lease so only one replica binds.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Namespace of the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "tessera-system")]
    pub lease_namespace: String,
    /// Name of the Lease.
    #[arg(long, default_value = "tessera-scheduler")]
    pub lease_name: String,
    /// This replica's identity (defaults to the pod name).
    #[arg(long, env = "POD_NAME", default_value = "tessera-scheduler")]
    pub identity: String,
    /// Seconds a lease stays valid without renewal.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// Binds in flight at once.
    #[arg(long, default_value_t = 64)]
    pub bind_concurrency: usize,
    /// Publish a `Scheduled` Event per placed pod.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub scheduled_events: bool,
    /// Seconds a bound GPU pod may wait for its node to admit it (bind
    /// phase `allocating`) before it is marked failed and the node's next
    /// GPU pod of its shape is bound.
    #[arg(long, default_value_t = 120)]
    pub allocation_timeout_seconds: u64,
    /// Seconds the claims of a pod with `WaitForFirstConsumer` volumes may
    /// take to bind once its node is selected before the decision is rolled
    /// back and retried (kube-scheduler's `bindTimeoutSeconds`).
    #[arg(long, default_value_t = 600)]
    pub volume_binding_timeout_seconds: u64,
    /// Namespace of the Secret `tessera-allocation-key` (the seal key).
    #[arg(long, env = "POD_NAMESPACE", default_value = "tessera-system")]
    pub key_namespace: String,
    /// Logging.
    #[command(flatten)]
    pub log: tessera_runtime::logging::LogArgs,
}
