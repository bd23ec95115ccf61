//! The deployment files under `hack/k8s/` against the code: the manifests parse as the
//! Kubernetes objects they claim to be, and what they tell the API server (path, port,
//! skipped namespaces, runtime class, certificate Secret) is what the webhook does. And
//! the openssl script's certificate, served by the real webhook, verifies for the Service
//! name the API server dials.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use hyper::{Method, StatusCode};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kata_peerpods_webhook::config::{Config, DEFAULT_RUNTIME_CLASS, DEFAULT_SKIP_NAMESPACES};
use kata_peerpods_webhook::server::{HEALTH_PATH, MUTATE_PATH};
use serde::Deserialize;
use serde_json::Value;
use support::{Pki, Webhook};

fn hack_k8s() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/k8s")
}

/// The YAML documents of a file, as JSON values.
fn documents(name: &str) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(hack_k8s().join(name)).with_context(|| name.to_owned())?;
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).with_context(|| format!("a document of {name}")))
        .collect()
}

/// The one document of `kind`, as its Kubernetes type.
fn one<T: serde::de::DeserializeOwned>(docs: &[Value], kind: &str) -> Result<T> {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    if found.len() != 1 {
        bail!("{} documents of kind {kind}, expected 1", found.len());
    }
    serde_json::from_value(found[0].clone()).with_context(|| format!("the {kind}"))
}

fn env_value<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)?
        .value
        .as_deref()
}

fn arg_value<'a>(container: &'a Container, flag: &str) -> Option<&'a str> {
    let prefix = format!("{flag}=");
    container
        .args
        .iter()
        .flatten()
        .find_map(|a| a.strip_prefix(&prefix))
}

#[test]
fn the_manifest_tells_the_api_server_what_the_webhook_does() -> Result<()> {
    let docs = documents("peerpods-webhook.yaml")?;
    let deployment: Deployment = one(&docs, "Deployment")?;
    let service: Service = one(&docs, "Service")?;
    let _: PodDisruptionBudget = one(&docs, "PodDisruptionBudget")?;
    let config: MutatingWebhookConfiguration = one(&docs, "MutatingWebhookConfiguration")?;
    let namespace = deployment.metadata.namespace.clone().unwrap();

    // The Deployment runs the webhook with the default settings, valid for it.
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    let container = &pod.containers[0];
    assert_eq!(
        env_value(container, "TARGET_RUNTIMECLASS"),
        Some(DEFAULT_RUNTIME_CLASS)
    );
    assert_eq!(
        env_value(container, "SKIP_NAMESPACES"),
        Some(DEFAULT_SKIP_NAMESPACES)
    );
    let own = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "POD_NAMESPACE")
        .unwrap();
    assert_eq!(
        own.value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "metadata.namespace"
    );
    let webhook_config = Config::new(
        DEFAULT_RUNTIME_CLASS,
        DEFAULT_SKIP_NAMESPACES,
        Some(&namespace),
    )?;

    // Port, probes and certificate files line up with the flags.
    let port = container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("https"))
        .unwrap();
    let listen: std::net::SocketAddr = arg_value(container, "--listen").unwrap().parse()?;
    assert_eq!(i32::from(listen.port()), port.container_port);
    for probe in [&container.readiness_probe, &container.liveness_probe] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(HEALTH_PATH));
        assert_eq!(get.scheme.as_deref(), Some("HTTPS"));
    }
    let mount = &container.volume_mounts.as_ref().unwrap()[0];
    for flag in ["--tls-cert", "--tls-key"] {
        let file = Path::new(arg_value(container, flag).unwrap());
        assert_eq!(file.parent(), Some(Path::new(&mount.mount_path)), "{flag}");
    }
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    let secret = volume.secret.as_ref().unwrap().secret_name.clone().unwrap();
    assert_eq!(secret, "kata-peerpods-webhook-tls");

    // The Service reaches that port.
    let service_port = &service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!(
        service_port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("https".into()))
    );

    // The webhook configuration: path, Service, policies, what it skips.
    let webhooks = config.webhooks.unwrap();
    assert_eq!(webhooks.len(), 1);
    let webhook = &webhooks[0];
    let client = webhook.client_config.service.as_ref().unwrap();
    assert_eq!(client.path.as_deref(), Some(MUTATE_PATH));
    assert_eq!(client.name, service.metadata.name.clone().unwrap());
    assert_eq!(client.namespace, namespace);
    assert_eq!(client.port, Some(service_port.port));
    assert_eq!(webhook.admission_review_versions, ["v1"]);
    assert_eq!(webhook.side_effects, "None");
    assert_eq!(webhook.reinvocation_policy.as_deref(), Some("IfNeeded"));
    assert_eq!(webhook.failure_policy.as_deref(), Some("Fail"));
    let rule = &webhook.rules.as_ref().unwrap()[0];
    assert_eq!(rule.operations.as_deref(), Some(&["CREATE".to_owned()][..]));
    assert_eq!(rule.resources.as_deref(), Some(&["pods".to_owned()][..]));
    let selector = &webhook
        .namespace_selector
        .as_ref()
        .unwrap()
        .match_expressions
        .as_ref()
        .unwrap()[0];
    assert_eq!(selector.key, "kubernetes.io/metadata.name");
    assert_eq!(selector.operator, "NotIn");
    let mut not_in = selector.values.clone().unwrap();
    not_in.sort();
    assert_eq!(
        not_in,
        webhook_config.skipped_namespaces().collect::<Vec<_>>()
    );
    let condition = &webhook.match_conditions.as_ref().unwrap()[0];
    assert!(
        condition.expression.contains(&format!(
            "object.spec.runtimeClassName == '{DEFAULT_RUNTIME_CLASS}'"
        )),
        "{}",
        condition.expression
    );
    Ok(())
}

#[test]
fn cert_manager_issues_the_certificate_the_manifest_mounts() -> Result<()> {
    let webhook_docs = documents("peerpods-webhook.yaml")?;
    let config: MutatingWebhookConfiguration = one(&webhook_docs, "MutatingWebhookConfiguration")?;
    let docs = documents("peerpods-webhook-certmanager.yaml")?;
    let certificate = docs.iter().find(|d| d["kind"] == "Certificate").unwrap();
    let namespace = certificate["metadata"]["namespace"].as_str().unwrap();
    let name = certificate["metadata"]["name"].as_str().unwrap();
    assert_eq!(
        certificate["spec"]["secretName"],
        "kata-peerpods-webhook-tls"
    );
    assert!(certificate["spec"]["dnsNames"]
        .as_array()
        .unwrap()
        .contains(&Value::from(
            "kata-peerpods-webhook.kata-peerpods-webhook.svc"
        )));
    let inject = &config.metadata.annotations.unwrap()["cert-manager.io/inject-ca-from"];
    assert_eq!(inject, &format!("{namespace}/{name}"));
    Ok(())
}

#[tokio::test]
async fn the_cert_script_certificate_is_served_for_the_service_name() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("certs");
    let status = Command::new(hack_k8s().join("peerpods-webhook-cert.sh"))
        .arg("--out")
        .arg(&out)
        .arg("--no-apply")
        .status()
        .context("running hack/k8s/peerpods-webhook-cert.sh")?;
    assert!(status.success(), "peerpods-webhook-cert.sh: {status}");
    let pki = Pki::from_dir(&out)?;
    let ca = pki.ca_pem.clone();
    let webhook = Webhook::start_with(&[], pki)?;

    let service_name = "kata-peerpods-webhook.kata-peerpods-webhook.svc";
    let (status, _) = webhook
        .request_as(service_name, &ca, Method::GET, "/healthz", vec![])
        .await?;
    assert_eq!(status, StatusCode::OK);
    // The name is checked: the same CA does not vouch for another one.
    assert!(webhook
        .request_as("localhost", &ca, Method::GET, "/healthz", vec![])
        .await
        .is_err());

    let addr = webhook.addr;
    assert!(webhook.terminate()?.success());
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    Ok(())
}
