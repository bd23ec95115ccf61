//! The node capacity advertisement against a stand-in API server: HTTPS on a loopback port
//! with a certificate from a CA made here, recording every request it gets. The client is
//! configured the in-cluster way (KUBERNETES_SERVICE_HOST/PORT, NODE_NAME, a service
//! account directory with `token` and `ca.crt`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kata_peerpods_k8s::node_capacity::{Advertised, Error, NodeCapacity};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One request as the stand-in saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: Value,
}

/// A CA and a serving certificate for 127.0.0.1.
struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// The stand-in API server: answers every request with `status` and `answer`.
struct StandIn {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl StandIn {
    async fn start(pki: &Pki, status: StatusCode, answer: Value) -> Result<Self> {
        let chain = CertificateDer::pem_slice_iter(pki.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes())?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let Ok(stream) = acceptor.accept(tcp).await else {
                    continue;
                };
                let record = record.clone();
                let answer = answer.clone();
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let record = record.clone();
                    let answer = answer.clone();
                    async move {
                        let method = request.method().to_string();
                        let path = request.uri().to_string();
                        let headers = request
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                            .collect();
                        let body = request.into_body().collect().await?.to_bytes();
                        let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        record.lock().unwrap().push(Seen {
                            method,
                            path,
                            headers,
                            body,
                        });
                        let response = Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(answer.to_string())))
                            .unwrap();
                        Ok::<_, hyper::Error>(response)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Ok(Self { addr, seen, task })
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The in-cluster view of `stand_in` for node `node`, with `ca_pem` as the cluster CA.
fn in_cluster(stand_in: &StandIn, sa_dir: &Path, ca_pem: &str, node: &str) -> Result<NodeCapacity> {
    std::fs::write(sa_dir.join("ca.crt"), ca_pem)?;
    std::fs::write(sa_dir.join("token"), "token-one\n")?;
    let port = stand_in.addr.port().to_string();
    let node = node.to_owned();
    let env = move |key: &str| match key {
        "KUBERNETES_SERVICE_HOST" => Some("127.0.0.1".to_owned()),
        "KUBERNETES_SERVICE_PORT" => Some(port.clone()),
        "NODE_NAME" => Some(node.clone()),
        _ => None,
    };
    Ok(NodeCapacity::from_env(env, sa_dir)?.expect("in a cluster"))
}

fn node_answer() -> Value {
    json!({"kind": "Node", "apiVersion": "v1", "metadata": {"name": "node-a"},
           "status": {"capacity": {"cpu": "8", "kata.peerpods.io/vm": "2"}}})
}

#[tokio::test]
async fn advertise_patches_the_node_status_capacity() -> Result<()> {
    let pki = pki();
    let stand_in = StandIn::start(&pki, StatusCode::OK, node_answer()).await?;
    let sa = tempfile::tempdir()?;
    let capacity = in_cluster(&stand_in, sa.path(), &pki.ca_pem, "node-a")?;

    assert_eq!(capacity.advertise(2).await?, Advertised::Limit(2));
    let seen = stand_in.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let request = &seen[0];
    assert_eq!(request.method, "PATCH");
    assert_eq!(request.path, "/api/v1/nodes/node-a/status");
    assert_eq!(
        request.headers["content-type"],
        "application/json-patch+json"
    );
    assert_eq!(request.headers["authorization"], "Bearer token-one");
    assert_eq!(
        request.body,
        json!([{"op": "add", "path": "/status/capacity/kata.peerpods.io~1vm", "value": "2"}])
    );

    // A rotated token is used from the next request on; withdraw removes the capacity.
    std::fs::write(sa.path().join("token"), "token-two")?;
    capacity.withdraw().await?;
    let seen = stand_in.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].headers["authorization"], "Bearer token-two");
    assert_eq!(
        seen[1].body,
        json!([{"op": "remove", "path": "/status/capacity/kata.peerpods.io~1vm"}])
    );

    // Negative: unlimited, nothing sent.
    assert_eq!(capacity.advertise(-1).await?, Advertised::Unlimited);
    assert_eq!(stand_in.seen().len(), 2);
    Ok(())
}

#[tokio::test]
async fn a_refusal_names_the_node_and_the_api_servers_reason() -> Result<()> {
    let pki = pki();
    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "message": "nodes \"node-b\" not found", "reason": "NotFound", "code": 404});
    let stand_in = StandIn::start(&pki, StatusCode::NOT_FOUND, status).await?;
    let sa = tempfile::tempdir()?;
    let capacity = in_cluster(&stand_in, sa.path(), &pki.ca_pem, "node-b")?;
    let err = capacity.advertise(10).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "the API server refused the patch of node node-b's status: 404 Not Found: nodes \"node-b\" not found"
    );
    assert_eq!(stand_in.seen().len(), 1);
    Ok(())
}

#[tokio::test]
async fn an_api_server_outside_the_cluster_ca_is_not_trusted() -> Result<()> {
    let (pki, other) = (pki(), pki());
    let stand_in = StandIn::start(&pki, StatusCode::OK, node_answer()).await?;
    let sa = tempfile::tempdir()?;
    let capacity = in_cluster(&stand_in, sa.path(), &other.ca_pem, "node-a")?;
    let err = capacity.advertise(10).await.unwrap_err();
    assert!(matches!(err, Error::Tls { .. }), "{err}");
    assert!(
        stand_in.seen().is_empty(),
        "a request went out without a trusted server"
    );
    Ok(())
}
