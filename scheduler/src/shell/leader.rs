//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas can
//! run and only one binds. The holder renews every `retry_period`; another
//! replica takes the lease once it has not been renewed for
//! `lease_duration`. Every write carries the resourceVersion it read, so
//! two candidates racing for an expired lease cannot both win (409).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::sync::watch;

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Lease name.
    pub name: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// How long a lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How often the holder renews and candidates retry.
    pub retry_period: Duration,
}

/// Errors talking to the Lease API.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The API call failed.
    #[error("lease {namespace}/{name}: {source}; check the scheduler's RBAC for leases (get, create, update)")]
    Api {
        /// Lease namespace.
        namespace: String,
        /// Lease name.
        name: String,
        /// The kube error.
        #[source]
        source: kube::Error,
    },
}

/// Tries once to acquire or renew the lease. Ok(true) when this replica holds it.
pub async fn try_acquire(client: &Client, settings: &LeaseSettings) -> Result<bool, LeaseError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &settings.namespace);
    let api_error = |source| LeaseError::Api {
        namespace: settings.namespace.clone(),
        name: settings.name.clone(),
        source,
    };
    let now = Timestamp::now();
    let duration_seconds = i32::try_from(settings.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let existing = api.get_opt(&settings.name).await.map_err(api_error)?;
    let Some(mut lease) = existing else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(settings.name.clone()),
                namespace: Some(settings.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(settings.identity.clone()),
                lease_duration_seconds: Some(duration_seconds),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(api_error(e)),
        };
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let held_by_us = spec.holder_identity.as_deref() == Some(settings.identity.as_str());
    let expired = spec.renew_time.as_ref().is_none_or(|renewed| {
        let valid_for = spec
            .lease_duration_seconds
            .map_or(settings.lease_duration, |s| {
                Duration::from_secs(u64::try_from(s).unwrap_or(0))
            });
        renewed.0.as_millisecond() + i64::try_from(valid_for.as_millis()).unwrap_or(i64::MAX)
            < now.as_millisecond()
    });
    if !held_by_us && !expired {
        return Ok(false);
    }
    if !held_by_us {
        spec.holder_identity = Some(settings.identity.clone());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(duration_seconds);
    match api
        .replace(&settings.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(api_error(e)),
    }
}

/// Runs the election forever, publishing leadership on `leading`. A holder
/// that cannot renew within the lease duration steps down.
pub async fn run_election(client: Client, settings: LeaseSettings, leading: watch::Sender<bool>) {
    let mut last_renewal: Option<tokio::time::Instant> = None;
    loop {
        match try_acquire(&client, &settings).await {
            Ok(true) => {
                if !*leading.borrow() {
                    tracing::info!(identity = %settings.identity, "acquired the scheduler lease; scheduling");
                }
                last_renewal = Some(tokio::time::Instant::now());
                leading.send_replace(true);
            }
            Ok(false) => {
                if *leading.borrow() {
                    tracing::warn!("lost the scheduler lease to another replica; pausing");
                }
                leading.send_replace(false);
            }
            Err(error) => {
                tracing::warn!(%error, "could not renew the scheduler lease");
                if last_renewal.is_some_and(|t| t.elapsed() > settings.lease_duration) {
                    leading.send_replace(false);
                }
            }
        }
        tokio::time::sleep(settings.retry_period).await;
    }
}

/// Mirrors the election's verdict into `leading` for code that only needs
/// to read it (who posts Events), until the election ends.
pub async fn mirror(mut verdict: watch::Receiver<bool>, leading: &AtomicBool) {
    loop {
        leading.store(*verdict.borrow_and_update(), Ordering::Relaxed);
        if verdict.changed().await.is_err() {
            return;
        }
    }
}
