//! Which allocations the agent believes: only those sealed by Tessera's
//! scheduler (see `tessera_api::allocation_seal`). The key lives in the
//! Secret `tessera-allocation-key`, which the scheduler creates on its first
//! start; the agent reads it when first needed, so it can start before the
//! scheduler, and reads it again (at most every [`REFRESH_AFTER`]) when a
//! pod's seal fails, in case the Secret was replaced. Host-side enforcement
//! believes the same allocations (the [`TrustedAllocations`] impl below).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use tessera_api::allocation::PodDevices;
use tessera_api::allocation_seal::{AllocationTrust, SealKey, KEY_SECRET_FIELD, KEY_SECRET_NAME};

use crate::enforce::TrustedAllocations;

/// Least time between two reads of the Secret.
pub const REFRESH_AFTER: Duration = Duration::from_secs(10);

/// Where the key comes from.
#[derive(Debug, Clone)]
pub enum SealSource {
    /// The Secret `tessera-allocation-key` in this namespace (every cluster).
    Secret {
        /// Tessera's namespace.
        namespace: String,
    },
    /// A key given directly (tests).
    Key(SealKey),
    /// Believe every allocation annotation (tests of the allocation path
    /// without seals).
    TrustAnnotations,
}

/// Why the agent cannot tell which allocations to believe.
#[derive(Debug, thiserror::Error)]
pub enum SealKeyUnavailable {
    /// The Secret does not exist yet.
    #[error("the Secret {namespace}/{KEY_SECRET_NAME} holding the allocation key does not exist yet: tessera-scheduler creates it when it starts, is it running? kubelet will retry")]
    Missing {
        /// Tessera's namespace.
        namespace: String,
    },
    /// The Secret could not be read.
    #[error("cannot read the Secret {namespace}/{KEY_SECRET_NAME} ({source}); the node agent's ServiceAccount needs get on it (manifests/rbac-node-agent.yaml)")]
    Api {
        /// Tessera's namespace.
        namespace: String,
        /// The API error.
        source: kube::Error,
    },
    /// The Secret holds no usable key.
    #[error(
        "the Secret {namespace}/{KEY_SECRET_NAME} holds no usable `{KEY_SECRET_FIELD}`: {reason}"
    )]
    Unusable {
        /// Tessera's namespace.
        namespace: String,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Debug)]
struct Cached {
    key: SealKey,
    read_at: Instant,
}

/// The believed-allocation rule, with the key cached.
pub struct SealKeys {
    source: SealSource,
    client: kube::Client,
    cached: Mutex<Option<Cached>>,
    /// Tessera's scheduler name: pods sent to it are never adopted.
    scheduler_name: String,
}

impl std::fmt::Debug for SealKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealKeys")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl SealKeys {
    /// The rule in force without reading anything: the cached key, or,
    /// before the Secret was first read, the annotations as written (so
    /// enforcement does not take every allocated container for an
    /// unallocated one while the agent starts; [`Self::trust`] is called at
    /// start and on every `Allocate`, so the window is short).
    pub fn cached_trust(&self) -> AllocationTrust {
        match &self.source {
            SealSource::TrustAnnotations => AllocationTrust::Annotations,
            SealSource::Key(key) => AllocationTrust::Sealed(key.clone()),
            SealSource::Secret { .. } => self
                .cached
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_ref()
                .map_or(AllocationTrust::Annotations, |c| {
                    AllocationTrust::Sealed(c.key.clone())
                }),
        }
    }

    /// Keys from `source`, read through `client` when it is the Secret.
    pub fn new(source: SealSource, client: kube::Client) -> Self {
        Self {
            source,
            client,
            cached: Mutex::new(None),
            scheduler_name: tessera_api::names::DEFAULT_SCHEDULER_NAME.to_owned(),
        }
    }

    /// The same rule for a cluster whose Tessera scheduler is
    /// `scheduler_name` (the config's `schedulerName`).
    pub fn with_scheduler_name(mut self, scheduler_name: &str) -> Self {
        self.scheduler_name = scheduler_name.to_owned();
        self
    }

    /// The rule in force, reading the Secret if the key is not known yet,
    /// or again when `stale` and the last read is older than [`REFRESH_AFTER`].
    pub async fn trust(&self, stale: bool) -> Result<AllocationTrust, SealKeyUnavailable> {
        let namespace = match &self.source {
            SealSource::TrustAnnotations => return Ok(AllocationTrust::Annotations),
            SealSource::Key(key) => return Ok(AllocationTrust::Sealed(key.clone())),
            SealSource::Secret { namespace } => namespace,
        };
        {
            let cached = self
                .cached
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(c) = cached.as_ref() {
                if !stale || c.read_at.elapsed() < REFRESH_AFTER {
                    return Ok(AllocationTrust::Sealed(c.key.clone()));
                }
            }
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let secret = api
            .get_opt(KEY_SECRET_NAME)
            .await
            .map_err(|source| SealKeyUnavailable::Api {
                namespace: namespace.clone(),
                source,
            })?
            .ok_or_else(|| SealKeyUnavailable::Missing {
                namespace: namespace.clone(),
            })?;
        let key = SealKey::from_secret(&secret).map_err(|e| SealKeyUnavailable::Unusable {
            namespace: namespace.clone(),
            reason: e.to_string(),
        })?;
        *self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Cached {
            key: key.clone(),
            read_at: Instant::now(),
        });
        Ok(AllocationTrust::Sealed(key))
    }
}

/// Enforcement believes the allocations the scheduler charges: sealed ones,
/// and pre-install placements Tessera adopts (sealed by the scheduler at
/// first sight; see `tessera_api::allocation_seal`). A pod whose allocation
/// is neither has none, so all of its GPU memory is over cap.
impl TrustedAllocations for SealKeys {
    fn verified_allocation(&self, pod: &Pod) -> Option<PodDevices> {
        match self
            .cached_trust()
            .allocation_adopting(pod, &self.scheduler_name)
        {
            Ok(allocation) => allocation.map(|a| a.devices),
            Err(error) => {
                tracing::debug!(pod = ?pod.metadata.name, %error, "allocation not believed; the pod counts as unallocated");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tessera_api::names::allocation as keys;

    fn pod(uid: &str, seal: Option<String>) -> Pod {
        let mut annotations =
            json!({keys::VGPU_NODE: "n", keys::DEVICES_ALLOCATED: "GPU-a,NVIDIA,1000,0:;"});
        if let Some(seal) = seal {
            annotations[keys::SEAL] = json!(seal);
        }
        serde_json::from_value(
            json!({"metadata": {"name": "p", "uid": uid, "annotations": annotations}}),
        )
        .expect("pod")
    }

    #[tokio::test]
    async fn enforcement_believes_only_sealed_allocations() {
        let key = SealKey::from_bytes(&[4; 32]).expect("key");
        let client = kube::Client::try_from(kube::Config::new(
            "http://127.0.0.1:1".parse().expect("url"),
        ))
        .expect("client");
        let keys = SealKeys::new(SealSource::Key(key.clone()), client.clone());
        let sealed = pod("u1", Some(key.seal("u1", "n", "GPU-a,NVIDIA,1000,0:;")));
        assert_eq!(
            keys.verified_allocation(&sealed)
                .map(|d| d[0][0].memory_mib),
            Some(1000)
        );
        // Forged: no seal, or a seal copied from another pod.
        assert_eq!(keys.verified_allocation(&pod("u2", None)), None);
        let copied = pod("u3", Some(key.seal("u1", "n", "GPU-a,NVIDIA,1000,0:;")));
        assert_eq!(keys.verified_allocation(&copied), None);
        // Before the Secret is first read, the annotations stand in.
        let unread = SealKeys::new(
            SealSource::Secret {
                namespace: "tessera-system".into(),
            },
            client,
        );
        assert!(unread.verified_allocation(&pod("u2", None)).is_some());
    }

    #[tokio::test]
    async fn enforcement_believes_placements_made_before_the_key_by_another_scheduler() {
        let issued = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-12-01T10:00:00Z".parse().expect("time"),
        );
        let key = SealKey::from_bytes(&[4; 32])
            .expect("key")
            .issued_at(Some(issued));
        let client = kube::Client::try_from(kube::Config::new(
            "http://127.0.0.1:1".parse().expect("url"),
        ))
        .expect("client");
        let keys = SealKeys::new(SealSource::Key(key), client).with_scheduler_name("gpu-scheduler");
        let placed = |created: &str, scheduler: &str| {
            let mut placed = pod("u1", None);
            placed.metadata.creation_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    created.parse().expect("time"),
                ));
            placed.spec = Some(
                serde_json::from_value(json!({"schedulerName": scheduler, "nodeName": "n",
                    "containers": [{"name": "c"}]}))
                .expect("spec"),
            );
            placed
        };
        let before = placed("2026-12-01T09:00:00Z", "hami-scheduler");
        assert_eq!(
            keys.verified_allocation(&before)
                .map(|d| d[0][0].memory_mib),
            Some(1000)
        );
        // Created since the key, or sent to Tessera's own scheduler (the
        // configured name): unallocated.
        assert_eq!(
            keys.verified_allocation(&placed("2026-12-01T10:00:01Z", "hami-scheduler")),
            None
        );
        assert_eq!(
            keys.verified_allocation(&placed("2026-12-01T09:00:00Z", "gpu-scheduler")),
            None
        );
    }
}
