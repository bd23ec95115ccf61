//! The node's pod VM capacity, advertised through the Kubernetes API.
//!
//! The adaptor on each node tells the scheduler how many pod VMs the node takes by setting
//! the node's `status.capacity["kata.peerpods.io/vm"]` to its limit: one JSON patch
//! (`add /status/capacity/kata.peerpods.io~1vm`) to `/api/v1/nodes/<node>/status`, as the
//! upstream adaptor does. It runs only inside a cluster, found as client-go finds it: the
//! `KUBERNETES_SERVICE_HOST`/`KUBERNETES_SERVICE_PORT` environment and the pod's service
//! account (`token`, `ca.crt`); the node is named by `NODE_NAME` (the downward API's
//! `spec.nodeName`). Outside a cluster [`NodeCapacity::from_env`] gives `None` and nothing
//! is sent. The service account needs `patch` on `nodes/status`.
//!
//! The token is read again for every request: kubelet rotates projected tokens in place.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, RemoveOperation};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::POD_VM_RESOURCE;

/// Where a pod finds its service account's token and the cluster's CA.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// How long one request to the API server may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The most of an API server answer kept for an error message.
const MAX_ANSWER: usize = 64 * 1024;

/// A failed capacity advertisement.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("in a cluster (KUBERNETES_SERVICE_HOST is set) but NODE_NAME is not: set it from the downward API's spec.nodeName")]
    MissingNodeName,
    #[error(
        "NODE_NAME {0:?} is not a node name (lowercase letters, digits, '-' and '.', at most 253)"
    )]
    InvalidNodeName(String),
    #[error("KUBERNETES_SERVICE_PORT {0:?} is not a port number")]
    InvalidPort(String),
    #[error("KUBERNETES_SERVICE_HOST {0:?} is not a host name or IP address")]
    InvalidHost(String),
    #[error("reading the cluster CA {path}")]
    ReadCa {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the cluster CA {path} holds no usable PEM certificate")]
    InvalidCa { path: PathBuf },
    #[error("reading the service account token {path}")]
    ReadToken {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the service account token {0} is empty")]
    EmptyToken(PathBuf),
    #[error("connecting to the API server {authority}")]
    Connect {
        authority: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with the API server {authority}")]
    Tls {
        authority: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with the API server {authority}")]
    Http {
        authority: String,
        #[source]
        source: hyper::Error,
    },
    #[error("reading the API server's answer")]
    ReadAnswer(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the API server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the API server refused the patch of node {node}'s status: {status}: {message}")]
    Refused {
        node: String,
        status: StatusCode,
        message: String,
    },
}

/// An API server as seen from a pod: where it is, how to trust it, how to authenticate.
#[derive(Clone)]
pub struct ApiServer {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    token_path: PathBuf,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("authority", &self.authority())
            .field("token_path", &self.token_path)
            .finish_non_exhaustive()
    }
}

impl ApiServer {
    /// The API server of the cluster this process runs in, from `env` (a lookup such as
    /// `std::env::var`) and the service account directory `sa_dir`; `None` when
    /// `KUBERNETES_SERVICE_HOST` or `KUBERNETES_SERVICE_PORT` is unset or empty.
    pub fn from_env(
        env: impl Fn(&str) -> Option<String>,
        sa_dir: &Path,
    ) -> Result<Option<Self>, Error> {
        if !in_cluster(&env) {
            return Ok(None);
        }
        let host = env("KUBERNETES_SERVICE_HOST").unwrap_or_default();
        let port = env("KUBERNETES_SERVICE_PORT").unwrap_or_default();
        let port = port
            .parse::<u16>()
            .map_err(|_| Error::InvalidPort(port.clone()))?;
        let server_name =
            ServerName::try_from(host.clone()).map_err(|_| Error::InvalidHost(host.clone()))?;
        let ca_path = sa_dir.join("ca.crt");
        let pem = std::fs::read(&ca_path).map_err(|source| Error::ReadCa {
            path: ca_path.clone(),
            source,
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
            // A bundle may carry certificates rustls cannot use; the others still count.
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err(Error::InvalidCa { path: ca_path });
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Some(Self {
            host,
            port,
            server_name,
            tls: Arc::new(tls),
            token_path: sa_dir.join("token"),
        }))
    }

    /// `host:port`, with brackets around an IPv6 address.
    pub fn authority(&self) -> String {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => format!("[{}]:{}", self.host, self.port),
            _ => format!("{}:{}", self.host, self.port),
        }
    }

    /// Applies a JSON patch to the status of `node`.
    pub async fn patch_node_status(&self, node: &str, patch: &Patch) -> Result<(), Error> {
        let body = serde_json::to_vec(patch).expect("a JSON patch serializes");
        let path = format!("/api/v1/nodes/{node}/status");
        match tokio::time::timeout(REQUEST_TIMEOUT, self.send(node, &path, body)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout(REQUEST_TIMEOUT)),
        }
    }

    async fn send(&self, node: &str, path: &str, body: Vec<u8>) -> Result<(), Error> {
        let token = tokio::fs::read_to_string(&self.token_path)
            .await
            .map_err(|source| Error::ReadToken {
                path: self.token_path.clone(),
                source,
            })?;
        let token = token.trim();
        if token.is_empty() {
            return Err(Error::EmptyToken(self.token_path.clone()));
        }
        let authority = self.authority();
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| Error::Connect {
                authority: authority.clone(),
                source,
            })?;
        let tls = TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|source| Error::Tls {
                authority: authority.clone(),
                source,
            })?;
        let http = |source| Error::Http {
            authority: authority.clone(),
            source,
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(http)?;
        // The connection's driver lives exactly as long as this request.
        let driver = tokio::spawn(connection);
        let request = Request::builder()
            .method(Method::PATCH)
            .uri(path)
            .header(HOST, &authority)
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .header(CONTENT_TYPE, "application/json-patch+json")
            .header(ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("a request from valid parts");
        let result = async {
            let response = sender.send_request(request).await.map_err(http)?;
            let status = response.status();
            let answer = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(Error::ReadAnswer)?
                .to_bytes();
            if status.is_success() {
                Ok(())
            } else {
                Err(Error::Refused {
                    node: node.to_owned(),
                    status,
                    message: status_message(&answer),
                })
            }
        }
        .await;
        driver.abort();
        result
    }
}

/// The `message` of a Kubernetes `Status` answer, else the answer itself, shortened.
fn status_message(answer: &[u8]) -> String {
    if let Ok(serde_json::Value::Object(status)) = serde_json::from_slice(answer) {
        if let Some(serde_json::Value::String(message)) = status.get("message") {
            return message.clone();
        }
    }
    let text = String::from_utf8_lossy(answer);
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None if text.is_empty() => "(no answer body)".to_owned(),
        None => text.to_owned(),
    }
}

/// What [`NodeCapacity::advertise`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advertised {
    /// The node's capacity is now the limit.
    Limit(u64),
    /// A negative limit means no limit: nothing was sent, as upstream does (pods that
    /// request `kata.peerpods.io/vm` then stay Pending on this node).
    Unlimited,
}

/// The pod VM capacity of one node.
#[derive(Debug, Clone)]
pub struct NodeCapacity {
    api: ApiServer,
    node: String,
}

impl NodeCapacity {
    /// For the node this process runs on, from the process environment and the standard
    /// service account directory; `None` outside a cluster.
    pub fn in_cluster() -> Result<Option<Self>, Error> {
        Self::from_env(
            |key| std::env::var(key).ok(),
            Path::new(SERVICE_ACCOUNT_DIR),
        )
    }

    /// Like [`Self::in_cluster`] with the environment lookup and service account
    /// directory given.
    pub fn from_env(
        env: impl Fn(&str) -> Option<String>,
        sa_dir: &Path,
    ) -> Result<Option<Self>, Error> {
        if !in_cluster(&env) {
            return Ok(None);
        }
        let node = env("NODE_NAME")
            .filter(|v| !v.is_empty())
            .ok_or(Error::MissingNodeName)?;
        if !is_node_name(&node) {
            return Err(Error::InvalidNodeName(node));
        }
        let api = ApiServer::from_env(&env, sa_dir)?.expect("in a cluster");
        Ok(Some(Self { api, node }))
    }

    /// For `node` through `api`.
    pub fn new(api: ApiServer, node: String) -> Result<Self, Error> {
        if !is_node_name(&node) {
            return Err(Error::InvalidNodeName(node));
        }
        Ok(Self { api, node })
    }

    /// The node this advertises for.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Sets the node's `kata.peerpods.io/vm` capacity to `limit`; a negative limit sends
    /// nothing ([`Advertised::Unlimited`]).
    pub async fn advertise(&self, limit: i64) -> Result<Advertised, Error> {
        let Ok(limit) = u64::try_from(limit) else {
            tracing::info!(node = %self.node, "pod VM limit is negative (unlimited): not advertising {POD_VM_RESOURCE}");
            return Ok(Advertised::Unlimited);
        };
        let patch = Patch(vec![PatchOperation::Add(AddOperation {
            path: capacity_pointer(),
            value: serde_json::Value::String(limit.to_string()),
        })]);
        self.api.patch_node_status(&self.node, &patch).await?;
        tracing::info!(node = %self.node, limit, "advertised {POD_VM_RESOURCE} capacity");
        Ok(Advertised::Limit(limit))
    }

    /// Removes the node's `kata.peerpods.io/vm` capacity (the adaptor leaving the node).
    pub async fn withdraw(&self) -> Result<(), Error> {
        let patch = Patch(vec![PatchOperation::Remove(RemoveOperation {
            path: capacity_pointer(),
        })]);
        self.api.patch_node_status(&self.node, &patch).await?;
        tracing::info!(node = %self.node, "withdrew {POD_VM_RESOURCE} capacity");
        Ok(())
    }
}

/// Whether `env` names an API server, as client-go's in-cluster configuration decides.
fn in_cluster(env: impl Fn(&str) -> Option<String>) -> bool {
    ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"]
        .iter()
        .all(|key| env(key).is_some_and(|v| !v.is_empty()))
}

/// `/status/capacity/kata.peerpods.io~1vm`.
fn capacity_pointer() -> PointerBuf {
    PointerBuf::from_tokens(["status", "capacity", POD_VM_RESOURCE])
}

/// A DNS subdomain (RFC 1123), as Kubernetes requires of node names.
fn is_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_patch_path_escapes_the_slash() {
        assert_eq!(
            capacity_pointer().as_str(),
            "/status/capacity/kata.peerpods.io~1vm"
        );
    }

    #[test]
    fn node_names_are_dns_subdomains() {
        for good in ["node-a", "worker-1.example.com", "a"] {
            assert!(is_node_name(good), "{good}");
        }
        for bad in ["", "Node", "a/../b", "-a", "a-", "a..b", &"a".repeat(254)] {
            assert!(!is_node_name(bad), "{bad}");
        }
    }

    #[test]
    fn outside_a_cluster_there_is_nothing_to_do() {
        let none = |_: &str| None;
        assert!(NodeCapacity::from_env(none, Path::new("/nonexistent"))
            .unwrap()
            .is_none());
        let node_only = |key: &str| (key == "NODE_NAME").then(|| "n".to_owned());
        assert!(NodeCapacity::from_env(node_only, Path::new("/nonexistent"))
            .unwrap()
            .is_none());
    }

    #[test]
    fn in_a_cluster_bad_settings_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let env = |port: &'static str, node: Option<&'static str>| {
            move |key: &str| match key {
                "KUBERNETES_SERVICE_HOST" => Some("10.0.0.1".to_owned()),
                "KUBERNETES_SERVICE_PORT" => Some(port.to_owned()),
                "NODE_NAME" => node.map(str::to_owned),
                _ => None,
            }
        };
        let err = NodeCapacity::from_env(env("443", None), dir.path()).unwrap_err();
        assert!(matches!(err, Error::MissingNodeName), "{err}");
        let err = NodeCapacity::from_env(env("443", Some("../x")), dir.path()).unwrap_err();
        assert!(matches!(err, Error::InvalidNodeName(_)), "{err}");
        let err = NodeCapacity::from_env(env("443", Some("n")), dir.path()).unwrap_err();
        assert!(matches!(err, Error::ReadCa { .. }), "{err}");
        std::fs::write(dir.path().join("ca.crt"), "not a certificate").unwrap();
        let err = NodeCapacity::from_env(env("443", Some("n")), dir.path()).unwrap_err();
        assert!(matches!(err, Error::InvalidCa { .. }), "{err}");
        let err = NodeCapacity::from_env(env("https", Some("n")), dir.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "KUBERNETES_SERVICE_PORT \"https\" is not a port number"
        );
    }

    #[test]
    fn refusals_carry_the_status_message() {
        let status = br#"{"kind":"Status","message":"nodes \"n\" not found","code":404}"#;
        assert_eq!(status_message(status), "nodes \"n\" not found");
        assert_eq!(status_message(b"oops\n"), "oops");
        assert_eq!(status_message(b""), "(no answer body)");
    }
}
