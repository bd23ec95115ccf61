//! The agent's TLS server configuration in network mode: TLS 1.3 only, the server
//! certificate and key from the user data, and client certificates required and verified
//! against the adaptor's CA from the user data.

use std::sync::Arc;

use kata_proto::peerpod::AgentTls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// TLS material in the user data that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM field does not parse.
    #[error("user data tls.{field} is not valid PEM")]
    Pem {
        field: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A PEM field holds no item of the expected kind.
    #[error("user data tls.{0} is empty")]
    Empty(&'static str),
    /// The CA certificate is not usable as a trust anchor.
    #[error("user data tls.ca_pem is not a usable CA certificate")]
    Ca(#[source] rustls::Error),
    /// The client verifier could not be built.
    #[error("client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// The server certificate and key do not form a configuration.
    #[error("server certificate and key")]
    Config(#[source] rustls::Error),
}

fn certs(field: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { field, source })?;
    if certs.is_empty() {
        return Err(TlsError::Empty(field));
    }
    Ok(certs)
}

/// Builds the server configuration from the user data's `tls` section.
pub fn server_config(tls: &AgentTls) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in certs("ca_pem", &tls.ca_pem)? {
        roots.add(ca).map_err(TlsError::Ca)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(TlsError::Verifier)?;
    let chain = certs("cert_pem", &tls.cert_pem)?;
    let key =
        PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes()).map_err(|source| TlsError::Pem {
            field: "key_pem",
            source,
        })?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(TlsError::Config)?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused_naming_the_field() {
        let mut tls = AgentTls::new();
        tls.ca_pem = "nothing".into();
        let e = server_config(&tls).unwrap_err();
        assert!(e.to_string().contains("tls.ca_pem"), "{e}");
    }
}
