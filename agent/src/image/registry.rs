//! Registry access for in-guest pulls, with the `oci-client` crate: which registries are
//! plain HTTP (only those configured as insecure), credentials from the node-level auth
//! file the adaptor delivers (docker's `config.json` format), extra CA certificates, and
//! what an `oci-client` error means for the caller.

use base64::Engine;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::Reference;

use kata_proto::peerpod::Registries;

/// Registry settings, from the user data (empty for a local guest).
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// `host` or `host:port` served over plain HTTP.
    pub insecure: Vec<String>,
    /// Credentials by registry (`host[:port]`): user and password.
    pub auths: Vec<(String, String, String)>,
    /// Extra CA certificates (PEM).
    pub ca_pem: String,
}

/// An auth file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    #[error("registry auth file is not JSON with an \"auths\" object")]
    Json(#[source] serde_json::Error),
    #[error("registry auth file: entry {0:?} has neither \"auth\" nor \"username\"/\"password\"")]
    Entry(String),
    #[error("registry auth file: entry {0:?}: \"auth\" is not base64 of user:password")]
    Auth(String),
}

impl RegistryConfig {
    /// Reads the user data's registry section.
    pub fn from_user_data(r: &Registries) -> Result<Self, AuthFileError> {
        Ok(Self {
            insecure: r.insecure.clone(),
            auths: if r.auth_json.is_empty() {
                Vec::new()
            } else {
                parse_auth_file(&r.auth_json)?
            },
            ca_pem: r.ca_pem.clone(),
        })
    }

    /// The `oci-client` configuration: HTTPS except for the insecure registries, trusting
    /// Mozilla's roots (built in: the guest has no system certificates) and the extra CAs.
    pub fn client_config(&self) -> ClientConfig {
        let mut roots: Vec<Certificate> = webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .map(|c| Certificate {
                encoding: CertificateEncoding::Der,
                data: c.as_ref().to_vec(),
            })
            .collect();
        if !self.ca_pem.trim().is_empty() {
            roots.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data: self.ca_pem.as_bytes().to_vec(),
            });
        }
        ClientConfig {
            protocol: if self.insecure.is_empty() {
                ClientProtocol::Https
            } else {
                ClientProtocol::HttpsExcept(self.insecure.clone())
            },
            tls_certs_only: roots,
            connect_timeout: Some(std::time::Duration::from_secs(30)),
            read_timeout: Some(std::time::Duration::from_secs(120)),
            ..Default::default()
        }
    }

    /// The credentials for the registry of `reference` (anonymous when none).
    pub fn auth_for(&self, reference: &Reference) -> RegistryAuth {
        let registry = reference.resolve_registry();
        let plain = reference.registry();
        self.auths
            .iter()
            .find(|(host, _, _)| host == registry || host == plain)
            .map(|(_, u, p)| RegistryAuth::Basic(u.clone(), p.clone()))
            .unwrap_or(RegistryAuth::Anonymous)
    }
}

/// Where rustls' platform verifier looks for the system's roots on Linux.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Writes Mozilla's roots and `extra_pem` as a PEM bundle at `path`, unless a bundle is
/// already there. The guest has no system certificates, and `oci-client` builds a default
/// reqwest client (which needs them) next to the configured one.
pub fn write_system_roots(path: &std::path::Path, extra_pem: &str) -> std::io::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let mut pem = String::new();
    for cert in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    pem.push_str(extra_pem);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, pem)
}

/// Parses a docker-style auth file: `{"auths": {"<registry>": {"auth": "<base64 user:pw>"}}}`
/// (or `"username"`/`"password"`). Keys may carry a scheme and path
/// (`https://index.docker.io/v1/`); they are reduced to `host[:port]`, and docker.io's
/// legacy key maps to `index.docker.io` and `docker.io`.
pub fn parse_auth_file(json: &[u8]) -> Result<Vec<(String, String, String)>, AuthFileError> {
    #[derive(serde::Deserialize)]
    struct File {
        auths: std::collections::BTreeMap<String, Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(default)]
        auth: String,
        #[serde(default)]
        username: String,
        #[serde(default)]
        password: String,
    }
    let file: File = serde_json::from_slice(json).map_err(AuthFileError::Json)?;
    let mut out = Vec::new();
    for (key, e) in file.auths {
        let (user, password) = if !e.auth.is_empty() {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(e.auth.trim())
                .map_err(|_| AuthFileError::Auth(key.clone()))?;
            let text = String::from_utf8(raw).map_err(|_| AuthFileError::Auth(key.clone()))?;
            let (u, p) = text
                .split_once(':')
                .ok_or_else(|| AuthFileError::Auth(key.clone()))?;
            (u.to_owned(), p.to_owned())
        } else if !e.username.is_empty() {
            (e.username, e.password)
        } else {
            return Err(AuthFileError::Entry(key));
        };
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        if host == "index.docker.io" || host == "docker.io" {
            out.push(("index.docker.io".into(), user.clone(), password.clone()));
            out.push(("docker.io".into(), user, password));
        } else {
            out.push((host, user, password));
        }
    }
    Ok(out)
}

/// What a registry failure means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// No such repository, tag, manifest or blob.
    NotFound,
    /// The registry refused the credentials (or asked for some).
    Unauthorized,
    /// The registry could not be reached or timed out.
    Unavailable,
    /// Content did not match its digest.
    DigestMismatch,
    /// Anything else.
    Other,
}

/// Classifies an `oci-client` error.
pub fn classify(e: &OciDistributionError) -> FailureKind {
    use OciDistributionError as E;
    match e {
        E::ImageManifestNotFoundError(_) => FailureKind::NotFound,
        E::ServerError { code: 404, .. } => FailureKind::NotFound,
        E::ServerError {
            code: 401 | 403, ..
        } => FailureKind::Unauthorized,
        E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => FailureKind::Unauthorized,
        E::RegistryError { envelope, .. } => {
            let codes: Vec<_> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::ManifestBlobUnknown
                )
            }) {
                FailureKind::NotFound
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                FailureKind::Unauthorized
            } else {
                FailureKind::Other
            }
        }
        E::DigestError(oci_client::errors::DigestError::VerificationError { .. }) => {
            FailureKind::DigestMismatch
        }
        E::RequestError(r) if r.is_connect() || r.is_timeout() => FailureKind::Unavailable,
        E::RequestError(r) if r.status().map(|s| s.as_u16()) == Some(404) => FailureKind::NotFound,
        E::IoError(_) => FailureKind::Unavailable,
        _ => FailureKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_file_formats() {
        let json = br#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "dXNlcjpwYXNz"},
            "10.0.0.1:5000": {"username": "u2", "password": "p:2"}
        }}"#;
        let auths = parse_auth_file(json).unwrap();
        assert!(auths.contains(&("docker.io".into(), "user".into(), "pass".into())));
        assert!(auths.contains(&("10.0.0.1:5000".into(), "u2".into(), "p:2".into())));
        let cfg = RegistryConfig {
            auths,
            ..Default::default()
        };
        let r: Reference = "10.0.0.1:5000/busybox:kata".parse().unwrap();
        assert!(matches!(cfg.auth_for(&r), RegistryAuth::Basic(u, _) if u == "u2"));
        let r: Reference = "busybox".parse().unwrap();
        assert!(matches!(cfg.auth_for(&r), RegistryAuth::Basic(u, _) if u == "user"));
        let r: Reference = "quay.io/x/y".parse().unwrap();
        assert!(matches!(cfg.auth_for(&r), RegistryAuth::Anonymous));

        assert!(matches!(
            parse_auth_file(br#"{"auths": {"r": {"auth": "!!"}}}"#),
            Err(AuthFileError::Auth(k)) if k == "r"
        ));
        assert!(matches!(
            parse_auth_file(br#"{"auths": {"r": {}}}"#),
            Err(AuthFileError::Entry(_))
        ));
        assert!(matches!(
            parse_auth_file(b"[]"),
            Err(AuthFileError::Json(_))
        ));
    }

    #[test]
    fn the_roots_bundle_is_pem() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("etc/ssl/certs/ca-certificates.crt");
        write_system_roots(&path, "").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let parsed: Vec<_> = rustls::pki_types::pem::PemObject::pem_slice_iter(text.as_bytes())
            .collect::<Result<Vec<rustls::pki_types::CertificateDer<'_>>, _>>()
            .unwrap();
        assert_eq!(parsed.len(), webpki_root_certs::TLS_SERVER_ROOT_CERTS.len());
        // An existing bundle is kept.
        std::fs::write(&path, "mine").unwrap();
        write_system_roots(&path, "").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "mine");
    }

    /// Our configuration trusts the built-in roots only and builds a client.
    #[test]
    fn our_configuration_builds_a_client() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cfg = RegistryConfig::default().client_config();
        assert!(cfg.tls_certs_only.len() > 100);
        let _client = oci_client::Client::new(cfg);
    }

    #[test]
    fn insecure_registries_use_plain_http() {
        let cfg = RegistryConfig {
            insecure: vec!["10.0.0.1:5000".into()],
            ..Default::default()
        };
        assert!(matches!(
            cfg.client_config().protocol,
            ClientProtocol::HttpsExcept(ref l) if l == &["10.0.0.1:5000"]
        ));
        assert!(matches!(
            RegistryConfig::default().client_config().protocol,
            ClientProtocol::Https
        ));
    }
}
