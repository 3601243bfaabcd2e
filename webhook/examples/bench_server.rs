//! Benchmark harness for `hack/bench-webhook.sh`: serves the real webhook
//! (the same `serve` the binary runs) over TLS on 127.0.0.1 with a fresh
//! CA and certificate, and writes a realistic AdmissionReview body for the
//! load generator. Files in `--dir`: `ca.crt`, `tls.crt`, `tls.key`,
//! `review.json`, and `ready` once the server listens.

#[path = "../tests/integration/common/mod.rs"]
mod common;

use std::path::PathBuf;

use clap::Parser;
use serde_json::json;
use tessera_webhook::app::{serve, Options};
use tessera_webhook::provision::CertAuthority;

/// Bench server options.
#[derive(Debug, Parser)]
struct Args {
    /// Port on 127.0.0.1.
    #[arg(long, default_value_t = 18443)]
    port: u16,
    /// Directory for the certificate, the review body and the ready marker.
    #[arg(long)]
    dir: PathBuf,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ca = CertAuthority::generate()?;
    let issued = ca.issue_serving_cert(&["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    std::fs::write(args.dir.join("ca.crt"), ca.cert_pem())?;
    std::fs::write(args.dir.join("tls.crt"), &issued.chain_pem)?;
    std::fs::write(args.dir.join("tls.key"), &issued.key_pem)?;
    // A training pod as the API server sends it: a GPU container with a
    // memory slice and cores, a CPU sidecar, an init container, annotations.
    let pod = common::api_server_pod(
        json!([
            {"name": "trainer", "command": ["python", "train.py", "--epochs", "10"],
             "env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "MASTER_PORT", "value": "29500"}],
             "ports": [{"containerPort": 29500, "protocol": "TCP"}],
             "resources": {"limits": {"nvidia.com/gpumem": "7500", "nvidia.com/gpucores": "30", "cpu": "4", "memory": "16Gi"},
                           "requests": {"cpu": "2", "memory": "8Gi"}}},
            {"name": "log-shipper", "image": "fluent/fluent-bit:3.0",
             "resources": {"limits": {"cpu": "200m", "memory": "128Mi"}}}
        ]),
        json!({"annotations": {"nvidia.com/use-gputype": "A100,H100", "hami.io/gpu-scheduler-policy": "binpack"}}),
        json!({"initContainers": [{"name": "fetch-data", "image": "busybox:1.36", "command": ["sh", "-c", "cp -r /src /data"]}],
               "nodeSelector": {"gpu": "true"}}),
    );
    let review = common::review(
        "admission.k8s.io/v1",
        "0d9f4c1e-8a7b-4c2d-b1e0-5f6a7b8c9d0e",
        &pod,
    );
    std::fs::write(args.dir.join("review.json"), serde_json::to_vec(&review)?)?;

    let options = Options::parse_from([
        "tessera-webhook".into(),
        "--tls-cert".into(),
        args.dir.join("tls.crt").into_os_string(),
        "--tls-key".into(),
        args.dir.join("tls.key").into_os_string(),
    ]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
        std::fs::write(args.dir.join("ready"), b"")?;
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        serve(options, listener, None, shutdown).await?;
        Ok(())
    })
}
