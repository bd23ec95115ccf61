//! The serving certificate: read from PEM files, checked, and reloaded when they change.
//!
//! The API server only calls the webhook over HTTPS, trusting the CA in the webhook
//! configuration's `caBundle`. The certificate chain and key come from files (a Secret
//! mounted in the pod: `tls.crt`, `tls.key`). cert-manager or an operator renews that
//! Secret in place and the kubelet swaps the files, so [`CertStore::reload_if_changed`]
//! re-reads them (from [`watch`], on an interval): new contents that parse and match are
//! served from the next handshake on; contents that do not are logged and the previous
//! certificate stays in use. rustls with the `ring` provider, TLS 1.2 and 1.3.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

/// A serving certificate that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} is not a PEM certificate chain")]
    BadCertificate {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} is not a PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    BadKey {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the key {key} does not fit the certificate {cert}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// The certificate and key the server presents, swapped in place when the files change.
#[derive(Debug)]
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// The file contents `current` was made from.
    loaded: Mutex<(Vec<u8>, Vec<u8>)>,
}

impl CertStore {
    /// Reads and checks the certificate chain and key (at start: a failure stops the
    /// webhook).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.to_owned(),
                source,
            })
        };
        let (cert_pem, key_pem) = (read(cert_path)?, read(key_path)?);
        let key = certified_key(&provider, cert_path, &cert_pem, key_path, &key_pem)?;
        Ok(Arc::new(Self {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            provider,
            current: RwLock::new(Arc::new(key)),
            loaded: Mutex::new((cert_pem, key_pem)),
        }))
    }

    /// A server configuration that presents this store's current certificate (HTTP/1.1).
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// Re-reads the files; when they changed and are usable, serves them from now on.
    /// Returns whether the certificate was replaced.
    pub async fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let read = |path: PathBuf| async move {
            tokio::fs::read(&path)
                .await
                .map_err(|source| TlsError::Read { path, source })
        };
        let cert_pem = read(self.cert_path.clone()).await?;
        let key_pem = read(self.key_path.clone()).await?;
        {
            let loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
            if loaded.0 == cert_pem && loaded.1 == key_pem {
                return Ok(false);
            }
        }
        let key = certified_key(
            &self.provider,
            &self.cert_path,
            &cert_pem,
            &self.key_path,
            &key_pem,
        )?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) = (cert_pem, key_pem);
        Ok(true)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// Reloads the store every `interval` for as long as the task runs.
pub async fn watch(store: Arc<CertStore>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        match store.reload_if_changed().await {
            Ok(true) => {
                tracing::info!(cert = %store.cert_path.display(), "serving certificate reloaded")
            }
            Ok(false) => {}
            Err(err) => tracing::warn!(
                "serving certificate not reloaded, the previous one stays in use: {}",
                crate::error_chain(&err)
            ),
        }
    }
}

fn certified_key(
    provider: &CryptoProvider,
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::BadCertificate {
            path: cert_path.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| TlsError::BadKey {
        path: key_path.to_owned(),
        source,
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|source| TlsError::Mismatch {
        cert: cert_path.to_owned(),
        key: key_path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let (cert_path, key_path) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert_path, cert.cert.pem()).unwrap();
        std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    #[test]
    fn unusable_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path(), "a");
        let (_, other_key) = write_pair(dir.path(), "b");
        let missing = dir.path().join("missing.crt");

        let err = CertStore::load(&missing, &key).unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }), "{err}");
        let err = CertStore::load(&key, &key).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{} holds no PEM certificate", key.display())
        );
        let err = CertStore::load(&cert, &cert).unwrap_err();
        assert!(matches!(err, TlsError::BadKey { .. }), "{err}");
        let err = CertStore::load(&cert, &other_key).unwrap_err();
        assert!(matches!(err, TlsError::Mismatch { .. }), "{err}");
        assert!(CertStore::load(&cert, &key).is_ok());
    }

    #[tokio::test]
    async fn reload_swaps_only_a_usable_pair() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path(), "a");
        let store = CertStore::load(&cert, &key).unwrap();
        let first = store.current.read().unwrap().cert[0].clone();
        assert!(!store.reload_if_changed().await.unwrap());

        // A half-written rotation (new certificate, old key) keeps the old pair.
        let (new_cert, new_key) = write_pair(dir.path(), "b");
        std::fs::copy(&new_cert, &cert).unwrap();
        assert!(matches!(
            store.reload_if_changed().await,
            Err(TlsError::Mismatch { .. })
        ));
        assert_eq!(store.current.read().unwrap().cert[0], first);

        std::fs::copy(&new_key, &key).unwrap();
        assert!(store.reload_if_changed().await.unwrap());
        assert_ne!(store.current.read().unwrap().cert[0], first);
    }
}
