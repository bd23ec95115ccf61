//! Certificates for the adaptor <-> agent connections: a node-level CA (created once,
//! kept as `<state_dir>/ca.pem` and `ca.key`, mode 0600), and per pod a server
//! certificate for the VM (its DNS name is the instance name; it travels in the user data
//! with its key) and a client certificate the adaptor presents (kept in the pod's state).
//! The VM accepts only clients whose certificate the CA issued; the adaptor accepts only a
//! server whose certificate the CA issued for that instance's name. ECDSA P-256, TLS 1.3.
//!
//! Validity runs from 2000 to 2100: the VM's clock is not trusted to be right at boot, and
//! what protects the connection is the CA key, which never leaves the node.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

/// The CA's common name.
const CA_NAME: &str = "kata-rs peer pods adaptor CA";

/// A certificate operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Rcgen(&'static str, #[source] rcgen::Error),
    #[error("{0} is not valid PEM")]
    Pem(&'static str, #[source] rustls::pki_types::pem::Error),
    #[error("TLS client configuration")]
    Config(#[source] rustls::Error),
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
}

/// A certificate and its key, PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The node's CA.
#[derive(Debug)]
pub struct Ca {
    cert_pem: String,
    key: KeyPair,
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = date_time_ymd(2000, 1, 1);
    p.not_after = date_time_ymd(2100, 1, 1);
    p
}

fn write_private(path: &Path, text: &str) -> Result<(), TlsError> {
    use std::io::Write;
    let io = |what, source| TlsError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("create", e))?;
    f.write_all(text.as_bytes()).map_err(|e| io("write", e))?;
    f.sync_all().map_err(|e| io("sync", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("rename into", e))
}

impl Ca {
    /// Loads the CA from `dir` or creates it there. Blocking.
    pub fn load_or_create(dir: &Path) -> Result<Self, TlsError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        if cert_path.exists() && key_path.exists() {
            let read = |p: &Path| {
                std::fs::read_to_string(p).map_err(|source| TlsError::Io {
                    what: "read",
                    path: p.to_owned(),
                    source,
                })
            };
            let key = KeyPair::from_pem(&read(&key_path)?)
                .map_err(|e| TlsError::Rcgen("parse the CA key", e))?;
            return Ok(Self {
                cert_pem: read(&cert_path)?,
                key,
            });
        }
        let key = KeyPair::generate().map_err(|e| TlsError::Rcgen("generate the CA key", e))?;
        let cert = ca_params()
            .self_signed(&key)
            .map_err(|e| TlsError::Rcgen("self-sign the CA", e))?;
        write_private(&key_path, &key.serialize_pem())?;
        write_private(&cert_path, &cert.pem())?;
        tracing::info!(path = %cert_path.display(), "created the peer pods CA");
        Ok(Self {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// The CA certificate (PEM), for the VMs.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn issue(&self, name: &str, server: bool) -> Result<Pair, TlsError> {
        let mut p = CertificateParams::new(vec![name.to_owned()])
            .map_err(|e| TlsError::Rcgen("certificate name", e))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        p.not_before = date_time_ymd(2000, 1, 1);
        p.not_after = date_time_ymd(2100, 1, 1);
        let key = KeyPair::generate().map_err(|e| TlsError::Rcgen("generate a key", e))?;
        let issuer = Issuer::new(ca_params(), &self.key);
        let cert = p
            .signed_by(&key, &issuer)
            .map_err(|e| TlsError::Rcgen("sign a certificate", e))?;
        Ok(Pair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate for the VM named `instance`.
    pub fn issue_server(&self, instance: &str) -> Result<Pair, TlsError> {
        self.issue(instance, true)
    }

    /// The adaptor's client certificate for one pod.
    pub fn issue_client(&self, sandbox_id: &str) -> Result<Pair, TlsError> {
        let name = format!(
            "peerpod-adaptor-{}",
            &sandbox_id[..sandbox_id.len().min(16)]
        );
        self.issue(&name, false)
    }
}

/// The adaptor's TLS client configuration towards one pod VM.
pub fn client_config(ca_pem: &str, client: &Pair) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(c.map_err(|e| TlsError::Pem("the CA certificate", e))?)
            .map_err(TlsError::Config)?;
    }
    let chain = CertificateDer::pem_slice_iter(client.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem("the client certificate", e))?;
    let key = PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes())
        .map_err(|e| TlsError::Pem("the client key", e))?;
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(TlsError::Config)?;
    Ok(Arc::new(config))
}

/// The name the VM's certificate carries.
pub fn server_name(instance: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(instance.to_owned()).map_err(|_| TlsError::ServerName(instance.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_survives_a_reload_and_signs_both_ends() {
        let t = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(t.path()).unwrap();
        let again = Ca::load_or_create(t.path()).unwrap();
        assert_eq!(ca.cert_pem(), again.cert_pem());
        let server = again.issue_server("podvm-ns-web-01234567").unwrap();
        let client = again.issue_client("0123456789abcdef0123").unwrap();
        assert!(server.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        client_config(ca.cert_pem(), &client).unwrap();
        server_name("podvm-ns-web-01234567").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(t.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
