//! The serving certificate: loading a PEM cert/key pair into rustls (ring
//! provider), a swappable [`CertStore`] that every new TLS handshake reads,
//! and the file watcher that reloads a mounted pair when it changes (a
//! Kubernetes Secret volume updates its files in place by symlink swap, so
//! the watcher compares contents rather than relying on inotify).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use thiserror::Error;

/// A certificate or key that cannot be used.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} file {path}: {source}; check that the Secret is mounted there and readable")]
    Read {
        /// `certificate` or `private key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The certificate PEM holds no certificate.
    #[error("the certificate PEM holds no CERTIFICATE block; give a PEM certificate chain, the serving certificate first")]
    NoCertificate,
    /// The key PEM holds no private key.
    #[error("the private key PEM holds no private key; give a PKCS#8, PKCS#1 or SEC1 PEM key")]
    NoPrivateKey,
    /// The PEM is malformed.
    #[error("the {what} PEM is malformed ({source}); regenerate the pair")]
    Pem {
        /// `certificate` or `private key`.
        what: &'static str,
        /// The parse error.
        #[source]
        source: std::io::Error,
    },
    /// rustls refused the key or the configuration.
    #[error("the TLS key or configuration is not usable ({0}); use an ECDSA P-256/P-384, Ed25519 or RSA key")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider every TLS config here uses (ring: builds with the
/// Rust toolchain and a C compiler only).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses a PEM certificate chain and private key into a rustls key.
pub fn certified_key_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Pem {
            what: "certificate",
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|source| TlsError::Pem {
            what: "private key",
            source,
        })?
        .ok_or(TlsError::NoPrivateKey)?;
    let signing_key = crypto_provider().key_provider.load_private_key(key)?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match()?;
    Ok(certified)
}

/// The certificate new handshakes get; replaced atomically on reload.
#[derive(Debug)]
pub struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    /// A store serving `key`.
    pub fn new(key: CertifiedKey) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(Arc::new(key)),
        })
    }

    /// Serves `key` from the next handshake on.
    pub fn replace(&self, key: CertifiedKey) {
        let key = Arc::new(key);
        match self.current.write() {
            Ok(mut guard) => *guard = key,
            Err(poisoned) => *poisoned.into_inner() = key,
        }
    }

    /// The certificate currently served.
    pub fn current(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A rustls server config that serves from `store` and offers HTTP/2 and
/// HTTP/1.1 (the API server's webhook client uses either).
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A mounted certificate/key pair.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// PEM certificate chain (`tls.crt`).
    pub cert: PathBuf,
    /// PEM private key (`tls.key`).
    pub key: PathBuf,
}

impl CertFiles {
    fn read(&self) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
        let read = |what: &'static str, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                what,
                path: path.to_owned(),
                source,
            })
        };
        Ok((
            read("certificate", &self.cert)?,
            read("private key", &self.key)?,
        ))
    }

    /// Reads and parses the pair.
    pub fn load(&self) -> Result<CertifiedKey, TlsError> {
        let (cert, key) = self.read()?;
        certified_key_from_pem(&cert, &key)
    }

    /// Re-reads the pair every `interval` and swaps it into `store` when
    /// the contents changed and parse. A pair that fails to parse (for
    /// example while only one of the two files has been rewritten) is
    /// logged and the previous certificate stays in service. Runs until
    /// the task is dropped.
    pub async fn watch(self, store: Arc<CertStore>, interval: Duration) {
        let mut last = self.read().ok();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let contents = match self.read() {
                Ok(contents) => contents,
                Err(error) => {
                    tracing::warn!(%error, "serving certificate files unreadable; keeping the current certificate");
                    continue;
                }
            };
            if last.as_ref() == Some(&contents) {
                continue;
            }
            match certified_key_from_pem(&contents.0, &contents.1) {
                Ok(key) => {
                    store.replace(key);
                    tracing::info!(cert = %self.cert.display(), "serving certificate reloaded");
                    last = Some(contents);
                }
                Err(error) => {
                    tracing::warn!(%error, "changed serving certificate does not load; keeping the current certificate until it does");
                }
            }
        }
    }
}
