//! One AdmissionReview in, one out (`admission.k8s.io/v1`, kube's admission types).
//!
//! A body that is not a v1 AdmissionReview with a request is [`NotAReview`] (the server
//! answers HTTP 400 with its message). Everything else is answered with a review carrying
//! the request's uid (HTTP 200): allowed with a JSONPatch for a peer pod, allowed unchanged
//! for anything the webhook does not mutate, and refused (`allowed: false`, a status code
//! and the reason) for a pod it cannot mutate.

use k8s_openapi::api::core::v1::Pod;
use kube_core::admission::{
    AdmissionRequest, AdmissionResponse, AdmissionReview, Operation, META_API_VERSION_V1, META_KIND,
};
use kube_core::{DynamicObject, Status};

use crate::config::Config;
use crate::mutate::{plan, MutateError, Plan};
use crate::sizing::PodSize;

/// A body that is not an AdmissionReview this webhook can answer.
#[derive(Debug, thiserror::Error)]
pub enum NotAReview {
    #[error("the body is not an {META_API_VERSION_V1} {META_KIND}: {0}")]
    Json(#[source] serde_json::Error),
    #[error("expected apiVersion {META_API_VERSION_V1:?} and kind {META_KIND:?}, got apiVersion {api_version:?} and kind {kind:?}")]
    WrongType { api_version: String, kind: String },
    #[error("the {META_KIND} has no request")]
    NoRequest,
}

/// Why a review is refused (answered with `allowed: false`).
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("expected a v1 Pod, got {0}")]
    NotAPod(String),
    #[error("the request has no object")]
    NoObject,
    #[error("the object is not a valid v1 Pod: {0}")]
    InvalidPod(#[source] kube_core::dynamic::ParseDynamicObjectError),
    #[error("{0}")]
    Mutate(#[from] MutateError),
    #[error("the patch could not be encoded: {0}")]
    EncodePatch(#[source] kube_core::admission::SerializePatchError),
}

impl Refusal {
    /// The HTTP status code the refusal carries.
    fn code(&self) -> u16 {
        match self {
            Self::EncodePatch(_) => 500,
            _ => 400,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::EncodePatch(_) => "InternalError",
            _ => "BadRequest",
        }
    }

    /// The message with its causes, for the user who created the pod.
    fn message(&self) -> String {
        crate::error_chain(self)
    }
}

/// Answers one admission review body.
pub fn review(config: &Config, body: &[u8]) -> Result<AdmissionReview<DynamicObject>, NotAReview> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(NotAReview::Json)?;
    if review.types.api_version != META_API_VERSION_V1 || review.types.kind != META_KIND {
        return Err(NotAReview::WrongType {
            api_version: review.types.api_version,
            kind: review.types.kind,
        });
    }
    let request: AdmissionRequest<DynamicObject> =
        review.try_into().map_err(|_| NotAReview::NoRequest)?;
    let mut response = AdmissionResponse::from(&request);
    let who = describe(&request);
    match decide(config, request) {
        Ok(Decision::Pass(why)) => {
            tracing::info!(uid = %response.uid, pod = %who, "admitted unchanged: {why}")
        }
        Ok(Decision::Patch { patch, size }) => match response.clone().with_patch(patch) {
            Ok(patched) => {
                tracing::info!(uid = %response.uid, pod = %who, vcpus = size.vcpus,
                        memory_mib = size.memory_mib, gpus = size.gpus, "mutated");
                response = patched;
                response.warnings = Some(vec![format!(
                        "peer pod: its resources moved to the pod VM's size; on the node it is BestEffort and requests 1 {}",
                        kata_peerpods_k8s::POD_VM_RESOURCE
                    )]);
            }
            Err(err) => response = refuse(response, &who, &Refusal::EncodePatch(err)),
        },
        Err(refusal) => response = refuse(response, &who, &refusal),
    }
    Ok(response.into_review())
}

/// The review as JSON for the API server.
///
/// `response.patch` is a Go `[]byte`, which Kubernetes documents as base64 in JSON;
/// kube-core serializes its `Vec<u8>` as an array of numbers (kube-rs issue 1781), which
/// Go's decoder happens to take too. The documented form is sent.
pub fn to_json(review: &AdmissionReview<DynamicObject>) -> Result<Vec<u8>, serde_json::Error> {
    use base64::Engine as _;
    let mut value = serde_json::to_value(review)?;
    if let Some(response) = value.get_mut("response") {
        if let Some(patch) = review.response.as_ref().and_then(|r| r.patch.as_ref()) {
            response["patch"] =
                serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(patch));
        }
    }
    serde_json::to_vec(&value)
}

/// What to answer, short of a refusal.
enum Decision {
    Pass(String),
    Patch {
        patch: json_patch::Patch,
        size: PodSize,
    },
}

fn decide(config: &Config, request: AdmissionRequest<DynamicObject>) -> Result<Decision, Refusal> {
    if let Some(sub) = &request.sub_resource {
        return Ok(Decision::Pass(format!("subresource {sub}")));
    }
    if request.operation != Operation::Create {
        return Ok(Decision::Pass(format!("operation {:?}", request.operation)));
    }
    let kind = &request.kind;
    if !(kind.group.is_empty() && kind.version == "v1" && kind.kind == "Pod") {
        let group = if kind.group.is_empty() {
            "core"
        } else {
            &kind.group
        };
        return Err(Refusal::NotAPod(format!(
            "{group}/{} {}",
            kind.version, kind.kind
        )));
    }
    let object = request.object.ok_or(Refusal::NoObject)?;
    // The request names the namespace; a pod created with generateName or through a
    // controller may not carry it in its metadata yet.
    let namespace = request
        .namespace
        .or_else(|| object.metadata.namespace.clone())
        .unwrap_or_default();
    let pod: Pod = object.try_parse().map_err(Refusal::InvalidPod)?;
    match plan(config, &namespace, &pod)? {
        Plan::Unchanged(why) => Ok(Decision::Pass(why.to_string())),
        Plan::Patch { patch, size } => Ok(Decision::Patch { patch, size }),
    }
}

fn refuse(mut response: AdmissionResponse, who: &str, refusal: &Refusal) -> AdmissionResponse {
    let message = refusal.message();
    tracing::warn!(uid = %response.uid, pod = %who, "refused: {message}");
    response.allowed = false;
    response.patch = None;
    response.result = Status::failure(&message, refusal.reason()).with_code(refusal.code());
    response
}

/// `namespace/name` of the object for logs (`generateName*` before it has a name).
fn describe(request: &AdmissionRequest<DynamicObject>) -> String {
    let namespace = request.namespace.as_deref().unwrap_or("");
    let name = match request.object.as_ref().map(|o| &o.metadata) {
        Some(meta) if meta.name.is_some() => meta.name.clone().unwrap_or_default(),
        Some(meta) if meta.generate_name.is_some() => {
            format!("{}*", meta.generate_name.as_deref().unwrap_or_default())
        }
        _ => request.name.clone(),
    };
    format!("{namespace}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn body(request: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": request,
        }))
        .unwrap()
    }

    fn request(operation: &str, kind: Value, object: Value) -> Value {
        json!({
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": kind,
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "default",
            "operation": operation,
            "userInfo": {"username": "admin"},
            "object": object,
            "oldObject": null,
            "dryRun": false,
        })
    }

    fn pod_kind() -> Value {
        json!({"group": "", "version": "v1", "kind": "Pod"})
    }

    fn answer(body: &[u8]) -> Value {
        let review = review(&Config::default(), body).unwrap();
        serde_json::from_slice(&to_json(&review).unwrap()).unwrap()
    }

    #[test]
    fn a_peer_pod_gets_a_json_patch() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"runtimeClassName": "kata-remote", "containers": [{"name": "a"}]}});
        let out = answer(&body(request("CREATE", pod_kind(), pod)));
        assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(out["kind"], "AdmissionReview");
        assert_eq!(
            out["response"]["uid"],
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        assert_eq!(out["response"]["allowed"], true);
        assert_eq!(out["response"]["patchType"], "JSONPatch");
        use base64::Engine as _;
        let patch = base64::engine::general_purpose::STANDARD
            .decode(out["response"]["patch"].as_str().unwrap())
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
        assert_eq!(patch.0.len(), 1, "{patch:?}");
    }

    #[test]
    fn updates_and_other_pods_pass_unchanged() {
        let pod = json!({"metadata": {"name": "p"},
            "spec": {"runtimeClassName": "kata-remote", "containers": [{"name": "a"}]}});
        let out = answer(&body(request("UPDATE", pod_kind(), pod)));
        assert_eq!(out["response"]["allowed"], true);
        assert!(out["response"].get("patch").is_none());
    }

    #[test]
    fn refusals_are_reviews_with_a_code_and_the_uid() {
        let deployment = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
        let out = answer(&body(request(
            "CREATE",
            deployment,
            json!({"metadata": {"name": "d"}}),
        )));
        let response = &out["response"];
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], false);
        assert_eq!(response["status"]["code"], 400);
        assert_eq!(
            response["status"]["message"],
            "expected a v1 Pod, got apps/v1 Deployment"
        );

        let bad = json!({"metadata": {"name": "p"},
            "spec": {"runtimeClassName": "kata-remote", "containers": [
                {"name": "a", "resources": {"requests": {"cpu": "lots"}}}]}});
        let out = answer(&body(request("CREATE", pod_kind(), bad)));
        assert_eq!(out["response"]["allowed"], false);
        let message = out["response"]["status"]["message"].as_str().unwrap();
        assert!(
            message.contains("container \"a\": requests.cpu: \"lots\" is not a quantity"),
            "{message}"
        );

        let not_a_pod = json!({"metadata": {"name": "p"}, "spec": {"containers": "nope"}});
        let out = answer(&body(request("CREATE", pod_kind(), not_a_pod)));
        assert_eq!(out["response"]["allowed"], false);
        let message = out["response"]["status"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("the object is not a valid v1 Pod"),
            "{message}"
        );
    }

    #[test]
    fn bodies_that_are_not_reviews_are_named() {
        let config = Config::default();
        let err = review(&config, b"{not json").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the body is not an admission.k8s.io/v1 AdmissionReview: "),
            "{err}"
        );
        let v1beta1 = serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1beta1",
            "kind": "AdmissionReview", "request": request("CREATE", pod_kind(), json!({}))}))
        .unwrap();
        assert!(matches!(
            review(&config, &v1beta1).unwrap_err(),
            NotAReview::WrongType { .. }
        ));
        let no_request = br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}"#;
        assert!(matches!(
            review(&config, no_request).unwrap_err(),
            NotAReview::NoRequest
        ));
    }
}
