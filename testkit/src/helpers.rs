//! Small generic helpers for tests: polling a condition with a deadline,
//! and reading a pod annotation.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;

/// Polls `check` every 20 ms until it returns `Some`; panics naming `what`
/// once `within` has passed.
pub async fn eventually_within<T>(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An annotation of a pod, if set.
pub fn annotation(pod: &Pod, key: &str) -> Option<String> {
    pod.metadata.annotations.as_ref()?.get(key).cloned()
}
