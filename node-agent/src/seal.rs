//! Which allocations the agent believes: only those sealed by Tessera's
//! scheduler (see `tessera_api::allocation_seal`). The key lives in the
//! Secret `tessera-allocation-key`, which the scheduler creates on its first
//! start; the agent reads it when first needed, so it can start before the
//! scheduler, and reads it again (at most every [`REFRESH_AFTER`]) when a
//! pod's seal fails, in case the Secret was replaced.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use tessera_api::allocation_seal::{AllocationTrust, SealKey, KEY_SECRET_FIELD, KEY_SECRET_NAME};

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
}

impl std::fmt::Debug for SealKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealKeys")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl SealKeys {
    /// Keys from `source`, read through `client` when it is the Secret.
    pub fn new(source: SealSource, client: kube::Client) -> Self {
        Self {
            source,
            client,
            cached: Mutex::new(None),
        }
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
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(KEY_SECRET_FIELD))
            .map(|b| b.0.as_slice())
            .unwrap_or_default();
        let key = SealKey::from_bytes(bytes).map_err(|e| SealKeyUnavailable::Unusable {
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
