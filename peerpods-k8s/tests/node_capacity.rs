//! The node capacity advertisement against a stand-in API server ([`stand_in`]: HTTPS on a
//! loopback port with a certificate from a CA made here, recording every request it gets).
//! The client is configured the in-cluster way (KUBERNETES_SERVICE_HOST/PORT, NODE_NAME, a
//! service account directory with `token` and `ca.crt`).

use std::path::Path;

use anyhow::Result;
use hyper::StatusCode;
use kata_peerpods_k8s::node_capacity::{Advertised, Error, NodeCapacity};
use serde_json::{json, Value};

#[path = "support/stand_in.rs"]
mod stand_in;

use stand_in::{pki, StandIn};

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
