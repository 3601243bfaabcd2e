//! Command-line options of the agent (each with an environment fallback
//! for the DaemonSet), and the settings derived from them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Tessera's node agent: GPU inventory, kubelet device plugin, container
/// setup, health and usage metrics.
#[derive(Debug, Clone, Parser)]
#[command(name = "tessera-node-agent", version)]
pub struct AgentOptions {
    /// Name of this node (the DaemonSet passes spec.nodeName).
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,
    /// Tessera config file (YAML); defaults apply when absent.
    #[arg(long, env = "TESSERA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Tessera's namespace, where the Secret `tessera-allocation-key` (the
    /// key that proves an allocation is the scheduler's) lives.
    #[arg(long, env = "POD_NAMESPACE", default_value = "tessera-system")]
    pub namespace: String,
    /// Serve fake cards instead of reading NVML, e.g. "4x NVIDIA A10G 23028"
    /// (NVLinks between cards: "8x NVIDIA A100 40960; nvlink 0-2:4 1-3:4").
    #[arg(long, env = "TESSERA_FAKE_GPUS")]
    pub fake_gpus: Option<String>,
    /// Print the discovered cards and the inventory, then exit.
    #[arg(long)]
    pub discover_once: bool,
    /// Kubelet's device-plugin registration socket.
    #[arg(
        long,
        env = "KUBELET_SOCKET",
        default_value = "/var/lib/kubelet/device-plugins/kubelet.sock"
    )]
    pub kubelet_socket: PathBuf,
    /// File name of the agent's socket, created next to kubelet's.
    #[arg(long, default_value = "tessera-nvidia.sock")]
    pub plugin_socket_name: String,
    /// Host directory for the interceptor and the containers' accounting
    /// regions (a hostPath mounted at the same path).
    #[arg(long, env = "TESSERA_HOST_DIR", default_value = "/usr/local/tessera")]
    pub host_dir: PathBuf,
    /// The interceptor library inside the agent's image, installed onto the host at start.
    #[arg(
        long,
        env = "TESSERA_INTERCEPTOR",
        default_value = "/opt/tessera/lib/libtessera-cuda.so"
    )]
    pub interceptor_source: PathBuf,
    /// Address of the /metrics endpoint.
    #[arg(long, env = "TESSERA_METRICS_ADDR", default_value = "0.0.0.0:9394")]
    pub metrics_addr: SocketAddr,
    /// Seconds between inventory checks (the annotation is rewritten only when it differs).
    #[arg(long, default_value_t = 30)]
    pub publish_interval_secs: u64,
    /// Milliseconds between checks of kubelet's and the agent's sockets.
    #[arg(long, default_value_t = 1000)]
    pub socket_poll_ms: u64,
    /// Seconds a card must stay free of fatal errors before it is healthy again.
    #[arg(long, default_value_t = 300)]
    pub health_quiet_secs: u64,
    /// Seconds between pod sweeps (metrics index, stale directory cleanup).
    #[arg(long, default_value_t = 60)]
    pub sweep_interval_secs: u64,
    /// Where processes' `<pid>/cgroup` files are read for enforcement (the
    /// agent runs with hostPID, so this is the host's `/proc`).
    #[arg(long, env = "TESSERA_PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,
    /// Milliseconds between two passes of the card tenant-table aggregation
    /// (reading every GPU container's launch figures, writing the tables).
    #[arg(long, env = "TESSERA_TENANT_TABLE_PERIOD_MS", default_value_t = 100)]
    pub tenant_table_period_ms: u64,
    /// Logging.
    #[command(flatten)]
    pub log: tessera_runtime::logging::LogArgs,
}

impl AgentOptions {
    /// Inventory check period.
    pub fn publish_interval(&self) -> Duration {
        Duration::from_secs(self.publish_interval_secs.max(1))
    }

    /// Socket check period.
    pub fn socket_poll(&self) -> Duration {
        Duration::from_millis(self.socket_poll_ms.max(10))
    }

    /// Health quiet period.
    pub fn health_quiet(&self) -> Duration {
        Duration::from_secs(self.health_quiet_secs)
    }

    /// Pod sweep period.
    pub fn sweep_interval(&self) -> Duration {
        Duration::from_secs(self.sweep_interval_secs.max(1))
    }

    /// Tenant-table aggregation period (at least 10 ms).
    pub fn tenant_table_period(&self) -> Duration {
        Duration::from_millis(self.tenant_table_period_ms.max(10))
    }
}
