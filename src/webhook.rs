//! The mutating admission webhook: `POST /mutate` for AdmissionReview `admission.k8s.io/v1`, Pod CREATE.
//!
//! It never blocks pod creation: a malformed body is answered 400 with a JSON error; a valid review that cannot
//! be decided (caches not synced, a namespace not seen yet, an internal error) is allowed without a patch, with a
//! warning and a metric. The decision itself is [`policy::decide`].

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use k8s_openapi::api::core::v1::Pod;
use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
};

use crate::{
    cache::Caches,
    metrics::{Metrics, PolicyLabels},
    policy::{self, ClusterFacts, Outcome, PodFacts, PolicySet, Skip},
};

/// How long a review waits for a namespace that is not in the cache yet.
const NAMESPACE_PATIENCE: Duration = Duration::from_millis(500);

/// Everything a review needs, shared by all requests.
pub struct Webhook {
    pub caches: Arc<Caches>,
    pub cluster: ClusterFacts,
    pub metrics: Arc<Metrics>,
}

/// The HTTP routes: `/mutate`, `/livez`, `/readyz`, `/metrics`.
pub fn router(webhook: Arc<Webhook>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(webhook)
}

async fn readyz(State(w): State<Arc<Webhook>>) -> Response {
    if w.caches.ready() {
        "ok".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced").into_response()
    }
}

async fn metrics(State(w): State<Arc<Webhook>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        w.metrics.encode(),
    )
        .into_response()
}

async fn mutate(State(w): State<Arc<Webhook>>, body: Bytes) -> Response {
    let start = std::time::Instant::now();
    let response = match parse(&body) {
        Err(message) => {
            w.metrics.request("invalid");
            let error = serde_json::json!({ "error": message });
            (StatusCode::BAD_REQUEST, axum::Json(error)).into_response()
        }
        Ok(request) => {
            let (outcome, response) = w.review(&request).await;
            w.metrics.request(outcome);
            axum::Json(response.into_review()).into_response()
        }
    };
    w.metrics.webhook_duration.observe(start.elapsed().as_secs_f64());
    response
}

/// Parses an AdmissionReview body; any error is the client's (HTTP 400).
pub fn parse(body: &[u8]) -> Result<AdmissionRequest<Pod>, String> {
    let review: AdmissionReview<Pod> =
        serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview of a Pod: {e}"))?;
    if review.types.api_version != "admission.k8s.io/v1" || review.types.kind != "AdmissionReview" {
        return Err(format!(
            "expected apiVersion admission.k8s.io/v1, kind AdmissionReview; got {} {}",
            review.types.api_version, review.types.kind
        ));
    }
    review
        .try_into()
        .map_err(|_| "the AdmissionReview has no request".to_string())
}

impl Webhook {
    /// Answers one review: the metric outcome and the response. Never fails: whatever goes wrong, the pod is
    /// allowed unchanged.
    pub async fn review(&self, req: &AdmissionRequest<Pod>) -> (&'static str, AdmissionResponse) {
        let allow = AdmissionResponse::from(req);
        let is_pod = req.kind.group.is_empty() && req.kind.kind == "Pod" && req.sub_resource.is_none();
        let Some(pod) = req
            .object
            .as_ref()
            .filter(|_| is_pod && req.operation == Operation::Create)
        else {
            return ("unchanged", allow);
        };
        if !self.caches.ready() {
            return self.undecided(allow, "caches not synced yet");
        }
        let namespace = req
            .namespace
            .as_deref()
            .or(pod.metadata.namespace.as_deref())
            .unwrap_or("default");
        let Some(namespace_labels) = self.caches.namespace_labels_within(namespace, NAMESPACE_PATIENCE).await else {
            return self.undecided(allow, &format!("namespace {namespace} not in the cache"));
        };
        let policies = self.caches.policies();
        let (outcome, response) = answer(req, pod, &policies, &namespace_labels, self.cluster);
        if outcome == "mutated" {
            let policy = response.audit_annotations.get("policy").cloned().unwrap_or_default();
            self.metrics
                .webhook_mutations
                .get_or_create(&PolicyLabels { policy })
                .inc();
        }
        (outcome, response)
    }

    fn undecided(&self, allow: AdmissionResponse, why: &str) -> (&'static str, AdmissionResponse) {
        tracing::warn!(reason = why, "admitting a pod without a decision");
        (
            "undecided",
            with_warning(
                allow,
                format!("keepalive-operator: keepalive sysctls not injected: {why}"),
            ),
        )
    }
}

/// The answer to a pod CREATE, given the policies and the namespace's labels: the metric outcome and the
/// response. Pure; never fails (a patch that cannot be serialized leaves the pod unchanged, with a warning).
pub fn answer(
    req: &AdmissionRequest<Pod>,
    pod: &Pod,
    policies: &PolicySet,
    namespace_labels: &BTreeMap<String, String>,
    cluster: ClusterFacts,
) -> (&'static str, AdmissionResponse) {
    let allow = AdmissionResponse::from(req);
    let decision = policy::decide(
        policies,
        namespace_labels,
        &PodFacts::new(&pod.metadata, pod.spec.as_ref()),
        cluster,
    );
    let pod_name = pod
        .metadata
        .name
        .as_deref()
        .or(pod.metadata.generate_name.as_deref())
        .unwrap_or("");
    tracing::debug!(
        namespace = req.namespace.as_deref(),
        pod = pod_name,
        dry_run = req.dry_run,
        "{decision}"
    );
    match (&decision.outcome, decision.mutation()) {
        (_, Some((policy_name, sysctls))) => {
            let ops = policy::patch_operations("", &pod.metadata, pod.spec.as_ref(), policy_name, sysctls);
            match allow.clone().with_patch(json_patch::Patch(ops)) {
                Ok(mut patched) => {
                    // Recorded in the audit log as keepalive.dev/policy (the webhook's name is prefixed).
                    patched.audit_annotations.insert("policy".into(), policy_name.into());
                    ("mutated", patched)
                }
                Err(e) => (
                    "undecided",
                    with_warning(allow, format!("keepalive-operator: serializing the patch: {e}")),
                ),
            }
        }
        (Outcome::Skipped(Skip::NoPolicy | Skip::NamespaceIgnored | Skip::PodIgnored), _) => ("unchanged", allow),
        (Outcome::Skipped(skip), _) => {
            let policy = decision.policy.map(|p| p.name.as_str()).unwrap_or_default();
            (
                "skipped",
                with_warning(
                    allow,
                    format!("keepalive-operator: policy {policy} not applied: {skip}"),
                ),
            )
        }
        _ => ("unchanged", allow),
    }
}

fn with_warning(mut response: AdmissionResponse, warning: String) -> AdmissionResponse {
    response.warnings.get_or_insert_with(Vec::new).push(warning);
    response
}

/// The answer of the null responder the benchmark compares against: the same stack, no work.
pub fn null_router() -> Router {
    Router::new().route(
        "/mutate",
        post(|_body: Bytes| async {
            let review = AdmissionReview::<DynamicObject> {
                types: kube::core::TypeMeta {
                    api_version: "admission.k8s.io/v1".into(),
                    kind: "AdmissionReview".into(),
                },
                request: None,
                response: None,
            };
            axum::Json(review)
        }),
    )
}
