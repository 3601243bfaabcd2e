//! Helpers the scheduler's integration tests share.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use tessera_api::config::Config;
use tessera_scheduler::shell::{Scheduler, ShellOptions};
use tessera_testkit::{eventually_within, ApiServer};

/// How long a test waits for the scheduler to get somewhere.
const WAIT: Duration = Duration::from_secs(30);

/// Waits until `check` holds; panics naming `what` after [`WAIT`].
pub async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    eventually_within(WAIT, what, || check().then_some(())).await
}

/// The pods the stand-in has bound to a node, by name.
pub fn bound_pods(server: &ApiServer) -> Vec<Pod> {
    let mut pods: Vec<Pod> = server
        .list::<Pod>()
        .into_iter()
        .filter(|p| p.spec.as_ref().is_some_and(|s| s.node_name.is_some()))
        .collect();
    pods.sort_by_key(|p| p.metadata.name.clone());
    pods
}

/// A scheduler over the stand-in, running until the handle is aborted.
pub fn start_scheduler(
    server: &ApiServer,
    config: Config,
    options: ShellOptions,
) -> (Scheduler, tokio::task::JoinHandle<()>) {
    let scheduler = Scheduler::new(server.client(), config, options);
    let running = scheduler.clone();
    let handle = tokio::spawn(async move {
        let _ = running.run().await;
    });
    (scheduler, handle)
}
