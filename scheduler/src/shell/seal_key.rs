//! The allocation seal's key, kept in the Secret `tessera-allocation-key` in
//! Tessera's namespace: the scheduler reads it, or generates it on first
//! start (two replicas racing both end up with whichever was created first).
//! Only Tessera's ServiceAccounts may read the Secret (see
//! `manifests/rbac-*.yaml`), so nobody else can seal an allocation.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use tessera_api::allocation_seal::{SealKey, SealKeyError, KEY_SECRET_FIELD, KEY_SECRET_NAME};

/// Why the key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SealKeyLoadError {
    /// The API server refused or failed.
    #[error("cannot read or create the Secret {namespace}/{KEY_SECRET_NAME} holding the allocation key ({source}); the scheduler's ServiceAccount needs get and create on that Secret (manifests/rbac-scheduler.yaml)")]
    Api {
        /// Tessera's namespace.
        namespace: String,
        /// The API error.
        source: kube::Error,
    },
    /// The Secret exists but holds no usable key.
    #[error(
        "the Secret {namespace}/{KEY_SECRET_NAME} holds no usable `{KEY_SECRET_FIELD}`: {source}"
    )]
    Unusable {
        /// Tessera's namespace.
        namespace: String,
        /// What is wrong with the key.
        source: SealKeyError,
    },
}

fn key_of(secret: &Secret, namespace: &str) -> Result<SealKey, SealKeyLoadError> {
    SealKey::from_secret(secret).map_err(|source| SealKeyLoadError::Unusable {
        namespace: namespace.to_owned(),
        source,
    })
}

/// Reads the key from `namespace`, creating the Secret with a fresh key if
/// it does not exist yet.
pub async fn load_or_create(
    client: kube::Client,
    namespace: &str,
) -> Result<SealKey, SealKeyLoadError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let api_error = |source| SealKeyLoadError::Api {
        namespace: namespace.to_owned(),
        source,
    };
    if let Some(secret) = api.get_opt(KEY_SECRET_NAME).await.map_err(api_error)? {
        return key_of(&secret, namespace);
    }
    let fresh = SealKey::generate().map_err(|source| SealKeyLoadError::Unusable {
        namespace: namespace.to_owned(),
        source,
    })?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(KEY_SECRET_NAME.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_owned(),
                "tessera".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            KEY_SECRET_FIELD.to_owned(),
            ByteString(fresh.as_bytes().to_vec()),
        )])),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        // The created Secret carries the key's issue time (adoption).
        Ok(created) => {
            tracing::info!(%namespace, "generated the allocation seal key");
            key_of(&created, namespace)
        }
        // Another replica created it first: use theirs.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let secret = api.get(KEY_SECRET_NAME).await.map_err(api_error)?;
            key_of(&secret, namespace)
        }
        Err(source) => Err(api_error(source)),
    }
}
