//! Self-provisioned TLS: a CA of our own (rcgen), kept in a Secret so that
//! every replica signs with the same one (the first replica to create the
//! Secret wins; the others read it), a serving certificate per replica for
//! the Service's DNS names, and the `caBundle` of our
//! MutatingWebhookConfiguration kept equal to the CA, so no cert-manager or
//! certgen job is needed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation, TestOperation};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use serde_json::Value;
use thiserror::Error;

use crate::tls::{certified_key_from_pem, CertStore, TlsError};

/// Key of the CA certificate in the Secret.
pub const CA_CERT_KEY: &str = "ca.crt";
/// Key of the CA private key in the Secret.
pub const CA_KEY_KEY: &str = "ca.key";
/// The CA's common name. Serving certificates name it as their issuer, so
/// it must not change between versions.
pub const CA_COMMON_NAME: &str = "tessera-webhook-ca";

/// What went wrong while provisioning certificates.
#[derive(Debug, Error)]
pub enum ProvisionError {
    /// rcgen could not generate or sign.
    #[error(
        "could not generate a certificate ({0}); this is a bug or an unusable key in the CA Secret"
    )]
    Generate(#[from] rcgen::Error),
    /// The stored CA Secret is missing a key or holds garbage.
    #[error("CA Secret {namespace}/{name} is unusable: {reason}; delete it and restart the webhook replicas so that one of them writes a new CA")]
    BadSecret {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The issued certificate does not load into rustls.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The Kubernetes API refused or failed a call.
    #[error("Kubernetes API call to {action} failed: {source}; check the webhook's RBAC (get/create on the Secret, get/patch on the MutatingWebhookConfiguration) and that the objects exist")]
    Api {
        /// What we were doing.
        action: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The webhook configuration does not exist.
    #[error("MutatingWebhookConfiguration `{name}` does not exist; install the manifests (kubectl apply -k manifests/) or pass the right --webhook-config-name")]
    NoWebhookConfiguration {
        /// The name looked for.
        name: String,
    },
}

/// Our certificate authority: PEM certificate and key.
#[derive(Clone)]
pub struct CertAuthority {
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A serving certificate issued by the CA, as PEM.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// The serving certificate followed by the CA certificate.
    pub chain_pem: String,
    /// The serving key.
    pub key_pem: String,
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl CertAuthority {
    /// A new CA (ECDSA P-256), valid for ten years from yesterday.
    pub fn generate() -> Result<Self, ProvisionError> {
        let key = KeyPair::generate()?;
        let mut params = ca_params();
        set_validity(&mut params, 3650);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A CA read back from PEM (the stored Secret).
    pub fn from_pem(cert_pem: String, key_pem: String) -> Result<Self, ProvisionError> {
        KeyPair::from_pem(&key_pem)?;
        if !cert_pem.contains("BEGIN CERTIFICATE") {
            return Err(ProvisionError::Generate(
                rcgen::Error::CouldNotParseCertificate,
            ));
        }
        Ok(Self { cert_pem, key_pem })
    }

    /// The CA certificate, PEM: what goes into `caBundle`.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA key, PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a serving certificate for `dns_names`, valid for a year from
    /// yesterday, and checks that it loads into rustls.
    pub fn issue_serving_cert(&self, dns_names: &[String]) -> Result<IssuedCert, ProvisionError> {
        let ca_key = KeyPair::from_pem(&self.key_pem)?;
        let issuer = Issuer::new(ca_params(), ca_key);
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        let mut name = DistinguishedName::new();
        name.push(
            DnType::CommonName,
            dns_names.first().cloned().unwrap_or_default(),
        );
        params.distinguished_name = name;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, 365);
        let cert = params.signed_by(&key, &issuer)?;
        let issued = IssuedCert {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
        };
        certified_key_from_pem(issued.chain_pem.as_bytes(), issued.key_pem.as_bytes())?;
        Ok(issued)
    }
}

/// The names the API server may use to reach `service` in `namespace`.
pub fn service_dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// Reads the CA from Secret `namespace/name`, or generates one and creates
/// the Secret. When two replicas race, the create of the second fails with
/// 409 and it reads the winner's CA, so both sign with the same one.
pub async fn load_or_create_ca(
    client: Client,
    namespace: &str,
    name: &str,
) -> Result<CertAuthority, ProvisionError> {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    let api = |action: &str, source| ProvisionError::Api {
        action: format!("{action} Secret {namespace}/{name}"),
        source,
    };
    if let Some(secret) = secrets.get_opt(name).await.map_err(|e| api("get", e))? {
        return ca_from_secret(&secret, namespace, name);
    }
    let generated = CertAuthority::generate()?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "tessera-webhook".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([
            (
                CA_CERT_KEY.to_owned(),
                ByteString(generated.cert_pem.clone().into_bytes()),
            ),
            (
                CA_KEY_KEY.to_owned(),
                ByteString(generated.key_pem.clone().into_bytes()),
            ),
        ])),
        ..Secret::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(namespace, name, "created a new webhook CA");
            Ok(generated)
        }
        Err(kube::Error::Api(status)) if status.is_already_exists() => {
            tracing::info!(
                namespace,
                name,
                "another replica created the webhook CA first; using it"
            );
            let secret = secrets.get(name).await.map_err(|e| api("get", e))?;
            ca_from_secret(&secret, namespace, name)
        }
        Err(error) => Err(api("create", error)),
    }
}

fn ca_from_secret(
    secret: &Secret,
    namespace: &str,
    name: &str,
) -> Result<CertAuthority, ProvisionError> {
    let bad = |reason: String| ProvisionError::BadSecret {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        reason,
    };
    let field = |key: &str| -> Result<String, ProvisionError> {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .ok_or_else(|| bad(format!("it has no `{key}`")))?;
        String::from_utf8(bytes.0.clone()).map_err(|_| bad(format!("`{key}` is not PEM text")))
    };
    CertAuthority::from_pem(field(CA_CERT_KEY)?, field(CA_KEY_KEY)?)
        .map_err(|e| bad(format!("it does not hold a usable CA ({e})")))
}

/// Makes every webhook in MutatingWebhookConfiguration `name` trust
/// `ca_pem`. Returns whether anything had to change. The patch tests each
/// webhook's name, so a concurrent edit that reorders the list fails the
/// patch instead of writing the bundle to the wrong webhook.
pub async fn sync_ca_bundle(
    client: Client,
    name: &str,
    ca_pem: &str,
) -> Result<bool, ProvisionError> {
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client);
    let api = |action: &str, source| ProvisionError::Api {
        action: format!("{action} MutatingWebhookConfiguration {name}"),
        source,
    };
    let config = configs
        .get_opt(name)
        .await
        .map_err(|e| api("get", e))?
        .ok_or_else(|| ProvisionError::NoWebhookConfiguration {
            name: name.to_owned(),
        })?;
    let wanted = ca_pem.as_bytes();
    let encoded = base64::engine::general_purpose::STANDARD.encode(wanted);
    let mut operations = Vec::new();
    for (index, webhook) in config.webhooks.iter().flatten().enumerate() {
        if webhook.client_config.ca_bundle.as_ref().map(|b| &b.0[..]) == Some(wanted) {
            continue;
        }
        operations.push(PatchOperation::Test(TestOperation {
            path: PointerBuf::from_tokens([
                "webhooks".to_owned(),
                index.to_string(),
                "name".into(),
            ]),
            value: Value::String(webhook.name.clone()),
        }));
        operations.push(PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens([
                "webhooks".to_owned(),
                index.to_string(),
                "clientConfig".into(),
                "caBundle".into(),
            ]),
            value: Value::String(encoded.clone()),
        }));
    }
    if operations.is_empty() {
        return Ok(false);
    }
    configs
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Json::<()>(json_patch::Patch(operations)),
        )
        .await
        .map_err(|e| api("patch caBundle of", e))?;
    tracing::info!(name, "caBundle of the webhook configuration updated");
    Ok(true)
}

/// Where the self-provisioned certificate lives and whom it is for.
#[derive(Debug, Clone)]
pub struct SelfProvisioning {
    /// Namespace of the Service and the CA Secret.
    pub namespace: String,
    /// The webhook's Service name.
    pub service: String,
    /// The Secret holding the CA.
    pub ca_secret: String,
    /// The MutatingWebhookConfiguration to keep trusting the CA.
    pub webhook_configuration: String,
    /// More names for the serving certificate (e.g. `localhost`).
    pub extra_dns_names: Vec<String>,
    /// How often the `caBundle` is checked and restored.
    pub sync_interval: Duration,
}

impl SelfProvisioning {
    /// The serving certificate's DNS names.
    pub fn dns_names(&self) -> Vec<String> {
        let mut names = service_dns_names(&self.service, &self.namespace);
        names.extend(self.extra_dns_names.iter().cloned());
        names
    }

    /// Gets the shared CA and issues this replica's serving certificate.
    pub async fn provision(
        &self,
        client: Client,
    ) -> Result<(CertAuthority, IssuedCert), ProvisionError> {
        let ca = load_or_create_ca(client, &self.namespace, &self.ca_secret).await?;
        let issued = ca.issue_serving_cert(&self.dns_names())?;
        Ok((ca, issued))
    }

    /// Keeps the `caBundle` current and re-issues the serving certificate
    /// daily (it is valid for a year, so this leaves ample margin). Sets
    /// `ready` once the API server trusts the CA. Runs until dropped.
    pub async fn maintain(
        self,
        client: Client,
        ca: CertAuthority,
        store: Arc<CertStore>,
        ready: Arc<AtomicBool>,
    ) {
        const REISSUE_EVERY: Duration = Duration::from_secs(24 * 3600);
        let mut last_issue = tokio::time::Instant::now();
        loop {
            match sync_ca_bundle(client.clone(), &self.webhook_configuration, ca.cert_pem()).await {
                Ok(_) => ready.store(true, Ordering::Release),
                Err(error) => {
                    tracing::warn!(%error, "could not bring the webhook configuration's caBundle up to date; retrying");
                }
            }
            if last_issue.elapsed() >= REISSUE_EVERY {
                match ca.issue_serving_cert(&self.dns_names()).and_then(|issued| {
                    Ok(certified_key_from_pem(
                        issued.chain_pem.as_bytes(),
                        issued.key_pem.as_bytes(),
                    )?)
                }) {
                    Ok(key) => {
                        store.replace(key);
                        last_issue = tokio::time::Instant::now();
                        tracing::info!("serving certificate re-issued");
                    }
                    Err(error) => {
                        tracing::warn!(%error, "could not re-issue the serving certificate; the current one stays in service")
                    }
                }
            }
            tokio::time::sleep(self.sync_interval).await;
        }
    }
}

/// Sets `params` valid from yesterday (tolerating clock skew) until
/// `days` from today, UTC midnights.
fn set_validity(params: &mut CertificateParams, days: i64) {
    let today = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| (d.as_secs() / 86_400) as i64)
        .unwrap_or(0);
    let date = |offset: i64| {
        let (year, month, day) = civil_from_days(today + offset);
        rcgen::date_time_ymd(year, month, day)
    };
    params.not_before = date(-1);
    params.not_after = date(days);
}

/// Year, month, day of the proleptic Gregorian calendar for a count of
/// days since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (year_of_era + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
