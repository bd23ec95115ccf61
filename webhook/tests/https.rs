//! End to end: the real `kata-peerpods-webhook` binary on a loopback port with a
//! certificate made here, spoken to over HTTPS by a client that trusts only this test's CA.
//! AdmissionReviews carry pods shaped as the API server sends them (defaulted fields,
//! managed fields, generateName); the returned JSON patch is applied to the pod with the
//! json-patch crate and the result compared with the pod expected, built here by hand.
//!
//! These tests live in the webhook crate rather than in `tests/` because they involve no
//! VM, containerd or guest image, and the crate's integration tests get the binary built
//! for them (`CARGO_BIN_EXE_kata-peerpods-webhook`). Each ends by stopping the webhook
//! with SIGTERM and checking that it exited 0 and was reaped and its port is closed.

mod support;

use anyhow::Result;
use base64::Engine as _;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use support::{wait_until, Pki, Webhook};

const VCPUS: &str = "io.katacontainers.config.hypervisor.default_vcpus";
const MEMORY: &str = "io.katacontainers.config.hypervisor.default_memory";
const GPUS: &str = "io.katacontainers.config.hypervisor.default_gpus";

/// A container as the API server has it after defaulting.
fn container(name: &str, resources: Value) -> Value {
    let mut c = json!({
        "name": name,
        "image": "quay.io/example/app:1.0",
        "command": ["/bin/app", "--serve"],
        "ports": [{"containerPort": 8080, "protocol": "TCP"}],
        "volumeMounts": [{"name": "kube-api-access-x7k2p", "readOnly": true,
                          "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
    });
    if !resources.is_null() {
        c["resources"] = resources;
    }
    c
}

/// A pod as it reaches a mutating webhook on CREATE.
fn pod(runtime_class: Option<&str>, init: Vec<Value>, containers: Vec<Value>) -> Value {
    let mut pod = json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "generateName": "shop-7d9c5b8f6-",
            "namespace": "shop",
            "labels": {"app": "shop", "pod-template-hash": "7d9c5b8f6"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-08-01T10:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "shop-7d9c5b8f6",
                                 "uid": "3f1c2a4e-9b7d-4c1e-8f2a-6d5e4c3b2a10", "controller": true,
                                 "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update",
                               "apiVersion": "v1", "time": "2026-08-01T10:00:01Z",
                               "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {}}}}],
        },
        "spec": {
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}], "defaultMode": 420}}],
            "containers": containers,
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "serviceAccount": "default",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                             "effect": "NoExecute", "tolerationSeconds": 300}],
            "priority": 0,
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority",
        },
        "status": {},
    });
    if let Some(class) = runtime_class {
        pod["spec"]["runtimeClassName"] = json!(class);
        pod["spec"]["overhead"] = json!({"cpu": "250m", "memory": "120Mi"});
    }
    if !init.is_empty() {
        pod["spec"]["initContainers"] = Value::Array(init);
    }
    pod
}

fn review(uid: &str, namespace: &str, operation: &str, object: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "uid": "8c1d2e3f-0a1b-4c5d-9e8f-7a6b5c4d3e2f",
                         "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        }
    }))
    .unwrap()
}

/// Posts a review, checks the HTTP 200 and the echoed uid, returns `response`.
async fn admit(webhook: &Webhook, uid: &str, body: Vec<u8>) -> Result<Value> {
    let (status, body) = webhook
        .request(Method::POST, "/mutate-v1-pod?timeout=10s", body)
        .await?;
    let text = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(status, StatusCode::OK, "{text}");
    let answer: Value = serde_json::from_slice(&body)?;
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1", "{text}");
    assert_eq!(answer["kind"], "AdmissionReview", "{text}");
    assert_eq!(answer["response"]["uid"], uid, "{text}");
    Ok(answer["response"].clone())
}

/// The pod after the response's patch (which must be a base64 JSONPatch).
fn patched(original: &Value, response: &Value) -> Value {
    assert_eq!(response["allowed"], true, "{response}");
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(
            response["patch"]
                .as_str()
                .expect("patch is a base64 string"),
        )
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&raw).unwrap();
    let mut pod = original.clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    pod
}

fn assert_unchanged(response: &Value) {
    assert_eq!(response["allowed"], true, "{response}");
    assert!(response.get("patch").is_none(), "{response}");
    assert!(response.get("patchType").is_none(), "{response}");
}

/// What the webhook should make of `original`: every resources block gone, the pod VM
/// request on the first container, the given sizing annotations.
fn expected(original: &Value, annotations: &[(&str, &str)]) -> Value {
    let mut pod = original.clone();
    for list in ["initContainers", "containers"] {
        if let Some(Value::Array(containers)) = pod["spec"].get_mut(list) {
            for c in containers {
                c.as_object_mut().unwrap().remove("resources");
            }
        }
    }
    pod["spec"]["containers"][0]["resources"] = json!({
        "requests": {"kata.peerpods.io/vm": "1"}, "limits": {"kata.peerpods.io/vm": "1"}});
    for (key, value) in annotations {
        pod["metadata"]["annotations"][*key] = json!(value);
    }
    pod
}

/// Stops the webhook and checks it went cleanly: exit 0, reaped, port closed.
async fn stop(webhook: Webhook) -> Result<()> {
    let addr = webhook.addr;
    let status = webhook.terminate()?;
    assert!(status.success(), "webhook exit: {status}");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "{addr} still accepts connections"
    );
    Ok(())
}

#[tokio::test]
async fn multi_container_pod_with_init_and_sidecar_is_sized_and_stripped() -> Result<()> {
    let webhook = Webhook::start(&[])?;
    let original = pod(
        Some("kata-remote"),
        vec![
            container(
                "migrate",
                json!({"requests": {"cpu": "2", "memory": "64Mi"}}),
            ),
            {
                let mut sidecar = container(
                    "proxy",
                    json!({
                    "requests": {"cpu": "250m", "memory": "128Mi"},
                    "limits": {"cpu": "500m", "memory": "128Mi"}}),
                );
                sidecar["restartPolicy"] = json!("Always");
                sidecar
            },
        ],
        vec![
            container(
                "app",
                json!({"requests": {"cpu": "500m", "memory": "500M"}}),
            ),
            container(
                "worker",
                json!({
                "requests": {"cpu": "1", "memory": "1Gi"},
                "limits": {"cpu": "1.5", "memory": "1Gi"}}),
            ),
            container("metrics", Value::Null),
        ],
    );
    let response = admit(
        &webhook,
        "4b0f4f2a-0001",
        review("4b0f4f2a-0001", "shop", "CREATE", &original),
    )
    .await?;
    // Running together: app 500m/500M + worker 1.5/1Gi (limits) + proxy 500m/128Mi
    // (limits) = 2.5 CPUs -> 3, 476.84 + 1024 + 128 MiB -> 1629. Init steps: migrate
    // 2/64Mi (no sidecar before it), proxy 500m/128Mi: below the running sum.
    assert_eq!(
        patched(&original, &response),
        expected(&original, &[(VCPUS, "3"), (MEMORY, "1629")])
    );
    let warnings = response["warnings"].to_string();
    assert!(warnings.contains("BestEffort"), "{warnings}");
    stop(webhook).await
}

#[tokio::test]
async fn requests_only_limits_only_and_gpus() -> Result<()> {
    let webhook = Webhook::start(&[])?;

    let requests_only = pod(
        Some("kata-remote"),
        vec![],
        vec![container(
            "app",
            json!({"requests": {"cpu": "1.5", "memory": "129e6"}}),
        )],
    );
    let response = admit(
        &webhook,
        "r-1",
        review("r-1", "shop", "CREATE", &requests_only),
    )
    .await?;
    // 1.5 CPUs -> 2; 129e6 bytes = 123.02 MiB -> 124
    assert_eq!(
        patched(&requests_only, &response),
        expected(&requests_only, &[(VCPUS, "2"), (MEMORY, "124")])
    );

    // A largest init container decides the size when it beats the app containers.
    let limits_only = pod(
        Some("kata-remote"),
        vec![container(
            "warm-cache",
            json!({"limits": {"cpu": "2", "memory": "1500Mi"}}),
        )],
        vec![
            container("a", json!({"limits": {"cpu": "500m", "memory": "1Gi"}})),
            container("b", json!({"limits": {"cpu": "500m", "memory": "256Mi"}})),
        ],
    );
    let response = admit(
        &webhook,
        "r-2",
        review("r-2", "shop", "CREATE", &limits_only),
    )
    .await?;
    assert_eq!(
        patched(&limits_only, &response),
        expected(&limits_only, &[(VCPUS, "2"), (MEMORY, "1500")])
    );

    let gpus = pod(
        Some("kata-remote"),
        vec![],
        vec![
            container(
                "trainer",
                json!({
                "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "2"},
                "limits": {"nvidia.com/gpu": "2"}}),
            ),
            container(
                "exporter",
                json!({"requests": {"cpu": "100m", "memory": "64Mi"}}),
            ),
        ],
    );
    let response = admit(&webhook, "r-3", review("r-3", "shop", "CREATE", &gpus)).await?;
    assert_eq!(
        patched(&gpus, &response),
        expected(&gpus, &[(VCPUS, "5"), (MEMORY, "16448"), (GPUS, "2")])
    );

    // No requests at all: stripped and counted, no sizing annotations (the adaptor's
    // default size applies).
    let bare = pod(
        Some("kata-remote"),
        vec![],
        vec![container("app", Value::Null)],
    );
    let response = admit(&webhook, "r-4", review("r-4", "shop", "CREATE", &bare)).await?;
    assert_eq!(patched(&bare, &response), expected(&bare, &[]));
    stop(webhook).await
}

#[tokio::test]
async fn other_pods_pass_unchanged() -> Result<()> {
    let webhook = Webhook::start(&[("POD_NAMESPACE", "peerpods-webhook")])?;
    let resources = json!({"requests": {"cpu": "1", "memory": "1Gi"}});

    let kata = pod(
        Some("kata"),
        vec![],
        vec![container("app", resources.clone())],
    );
    assert_unchanged(&admit(&webhook, "u-1", review("u-1", "shop", "CREATE", &kata)).await?);

    let runc = pod(None, vec![], vec![container("app", resources.clone())]);
    assert_unchanged(&admit(&webhook, "u-2", review("u-2", "shop", "CREATE", &runc)).await?);

    let remote = pod(
        Some("kata-remote"),
        vec![],
        vec![container("app", resources.clone())],
    );
    for (uid, namespace) in [
        ("u-3", "kube-system"),
        ("u-4", "kube-node-lease"),
        ("u-5", "peerpods-webhook"),
    ] {
        assert_unchanged(&admit(&webhook, uid, review(uid, namespace, "CREATE", &remote)).await?);
    }
    assert_unchanged(&admit(&webhook, "u-6", review("u-6", "shop", "UPDATE", &remote)).await?);

    // Already mutated (a reinvocation): returned unchanged.
    let response = admit(&webhook, "u-7", review("u-7", "shop", "CREATE", &remote)).await?;
    let once = patched(&remote, &response);
    assert_unchanged(&admit(&webhook, "u-8", review("u-8", "shop", "CREATE", &once)).await?);
    stop(webhook).await
}

#[tokio::test]
async fn target_class_and_skipped_namespaces_are_configurable() -> Result<()> {
    let webhook = Webhook::start(&[
        ("TARGET_RUNTIMECLASS", "kata-remote-gpu"),
        ("SKIP_NAMESPACES", "batch"),
    ])?;
    let resources = json!({"requests": {"cpu": "1", "memory": "1Gi"}});
    let gpu_class = pod(
        Some("kata-remote-gpu"),
        vec![],
        vec![container("app", resources.clone())],
    );
    let response = admit(
        &webhook,
        "c-1",
        review("c-1", "kube-system", "CREATE", &gpu_class),
    )
    .await?;
    assert_eq!(
        patched(&gpu_class, &response),
        expected(&gpu_class, &[(VCPUS, "1"), (MEMORY, "1024")])
    );
    assert_unchanged(
        &admit(
            &webhook,
            "c-2",
            review("c-2", "batch", "CREATE", &gpu_class),
        )
        .await?,
    );
    let remote = pod(
        Some("kata-remote"),
        vec![],
        vec![container("app", resources)],
    );
    assert_unchanged(&admit(&webhook, "c-3", review("c-3", "shop", "CREATE", &remote)).await?);
    stop(webhook).await
}

#[tokio::test]
async fn bad_input_gets_clear_answers() -> Result<()> {
    let webhook = Webhook::start(&[])?;

    // Not an AdmissionReview at all: HTTP 400 with the reason.
    for (body, says) in [
        (b"{\"apiVersion\": \"admission.k8s.io/v1\", \"kind\": \"AdmissionRe".to_vec(),
         "the body is not an admission.k8s.io/v1 AdmissionReview: EOF while parsing"),
        (serde_json::to_vec(&pod(Some("kata-remote"), vec![], vec![]))?,
         "expected apiVersion \"admission.k8s.io/v1\" and kind \"AdmissionReview\", got apiVersion \"v1\" and kind \"Pod\""),
        (br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}"#.to_vec(),
         "the AdmissionReview has no request"),
        (br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": 7}}"#.to_vec(),
         "the body is not an admission.k8s.io/v1 AdmissionReview: invalid type: integer `7`"),
    ] {
        let (status, answer) = webhook.request(Method::POST, "/mutate-v1-pod", body).await?;
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert!(answer.contains(says), "{answer:?} should say {says:?}");
    }

    // A review whose pod cannot be mutated: HTTP 200, allowed false, a code, the uid.
    let bad = pod(
        Some("kata-remote"),
        vec![],
        vec![container(
            "app",
            json!({
        "requests": {"cpu": "2"}, "limits": {"cpu": "1"}}),
        )],
    );
    let response = admit(&webhook, "b-1", review("b-1", "shop", "CREATE", &bad)).await?;
    assert_eq!(response["allowed"], false);
    assert_eq!(response["status"]["code"], 400);
    assert_eq!(
        response["status"]["message"],
        "the pod's resources cannot size a pod VM: container \"app\": requests.cpu 2 is more than limits.cpu 1"
    );
    let unreadable = pod(
        Some("kata-remote"),
        vec![],
        vec![container(
            "app",
            json!({
        "limits": {"memory": "1GB"}}),
        )],
    );
    let response = admit(
        &webhook,
        "b-2",
        review("b-2", "shop", "CREATE", &unreadable),
    )
    .await?;
    assert_eq!(response["allowed"], false);
    assert_eq!(response["status"]["code"], 400);
    let message = response["status"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("container \"app\": limits.memory: \"1GB\" is not a quantity"),
        "{message}"
    );

    // Routes.
    let (status, body) = webhook.request(Method::GET, "/healthz", vec![]).await?;
    assert_eq!(
        (status, body.as_slice()),
        (StatusCode::OK, b"ok\n".as_slice())
    );
    let (status, body) = webhook.request(Method::POST, "/mutate", vec![]).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(String::from_utf8_lossy(&body).contains("no such path: /mutate"));
    let (status, _) = webhook
        .request(Method::GET, "/mutate-v1-pod", vec![])
        .await?;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

    // A client that does not trust the webhook's CA does not get through.
    let stranger = Pki::new("stranger");
    let err = webhook
        .request_with_ca(&stranger.ca_pem, Method::GET, "/healthz", vec![])
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("TLS handshake"), "{err:#}");
    stop(webhook).await
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() -> Result<()> {
    let webhook = Webhook::start(&[("WEBHOOK_TLS_RELOAD_SECONDS", "1")])?;
    let renewed = Pki::new("renewed");
    renewed.write_serving(&webhook.cert_dir);
    wait_until("the renewed certificate is served", || async {
        webhook
            .request_with_ca(&renewed.ca_pem, Method::GET, "/healthz", vec![])
            .await
            .is_ok()
    })
    .await?;
    assert!(
        webhook.log().contains("serving certificate reloaded"),
        "{}",
        webhook.log()
    );
    // The old CA no longer verifies it.
    assert!(webhook
        .request(Method::GET, "/healthz", vec![])
        .await
        .is_err());
    stop(webhook).await
}

#[tokio::test]
async fn bad_configuration_stops_the_start_with_the_value_named() -> Result<()> {
    let err = Webhook::start(&[("SKIP_NAMESPACES", "kube-system,Not_A_Namespace")])
        .err()
        .expect("refused");
    let text = format!("{err:#}");
    assert!(text.contains("namespace \"Not_A_Namespace\""), "{text}");
    Ok(())
}
