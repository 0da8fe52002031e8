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
    response::{IntoResponse, Response as HttpResponse},
    routing::{get, post},
};
use base64::Engine;
use k8s_openapi::api::core::v1::{PodOS, Sysctl};
use serde::{Deserialize, Serialize, de::IgnoredAny};

use crate::{
    cache::Caches,
    metrics::{Metrics, PolicyLabels},
    policy::{self, ClusterFacts, Outcome, PodFacts, PolicySet, Shape, Skip},
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

async fn readyz(State(w): State<Arc<Webhook>>) -> HttpResponse {
    if w.caches.ready() {
        "ok".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced").into_response()
    }
}

async fn metrics(State(w): State<Arc<Webhook>>) -> HttpResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        w.metrics.encode(),
    )
        .into_response()
}

async fn mutate(State(w): State<Arc<Webhook>>, body: Bytes) -> HttpResponse {
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

/// The parts of an AdmissionReview request the webhook reads. Everything else in the body is skipped while
/// parsing: no full Pod object is ever built.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub uid: String,
    pub kind: Kind,
    #[serde(default)]
    pub sub_resource: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    pub operation: String,
    #[serde(default)]
    pub dry_run: Option<bool>,
    #[serde(default, deserialize_with = "object_or_null")]
    pub object: Option<LeanPod>,
}

#[derive(Debug, Deserialize)]
pub struct Kind {
    #[serde(default)]
    pub group: String,
    pub kind: String,
}

/// A pod as far as the decision and the patch need it.
#[derive(Debug, Default, Deserialize)]
pub struct LeanPod {
    #[serde(default, deserialize_with = "object_or_null")]
    pub metadata: Option<LeanMeta>,
    #[serde(default, deserialize_with = "object_or_null")]
    pub spec: Option<LeanSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeanMeta {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub generate_name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub annotations: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeanSpec {
    #[serde(default)]
    pub host_network: Option<bool>,
    #[serde(default)]
    pub os: Option<PodOS>,
    #[serde(default, deserialize_with = "object_or_null")]
    pub security_context: Option<LeanSecurityContext>,
}

#[derive(Debug, Default, Deserialize)]
pub struct LeanSecurityContext {
    #[serde(default)]
    pub sysctls: Option<Vec<Sysctl>>,
}

/// Deserializes a JSON object (or null) into `T`. Plain derived structs would also accept a JSON array, which no
/// patch could then be applied to.
fn object_or_null<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    struct ObjectVisitor<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectVisitor<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object or null")
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }
    d.deserialize_any(ObjectVisitor(std::marker::PhantomData))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Review {
    api_version: String,
    kind: String,
    request: Option<Request>,
}

impl LeanPod {
    fn facts(&self) -> PodFacts<'_> {
        let spec = self.spec.as_ref();
        PodFacts::from_parts(
            self.metadata.as_ref().and_then(|m| m.labels.as_ref()),
            spec.and_then(|s| s.host_network),
            spec.and_then(|s| s.os.as_ref()).map(|os| os.name.as_str()),
            spec.and_then(|s| s.security_context.as_ref())
                .and_then(|sc| sc.sysctls.as_deref()),
        )
    }

    fn shape(&self) -> Shape {
        let spec = self.spec.as_ref();
        Shape {
            has_metadata: self.metadata.is_some(),
            has_spec: spec.is_some(),
            has_security_context: spec.is_some_and(|s| s.security_context.is_some()),
            has_annotations: self.metadata.as_ref().is_some_and(|m| m.annotations.is_some()),
        }
    }
}

/// The AdmissionReview response.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    pub uid: String,
    pub allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<&'static str>,
    /// Base64 of the JSON Patch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub audit_annotations: BTreeMap<String, String>,
}

impl Response {
    fn allow(request: &Request) -> Self {
        Response {
            uid: request.uid.clone(),
            allowed: true,
            patch_type: None,
            patch: None,
            warnings: Vec::new(),
            audit_annotations: BTreeMap::new(),
        }
    }

    fn warn(mut self, warning: String) -> Self {
        self.warnings.push(warning);
        self
    }

    /// The JSON Patch, decoded (for tests).
    pub fn json_patch(&self) -> Option<json_patch::Patch> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(self.patch.as_ref()?)
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The whole AdmissionReview body of this response.
    pub fn into_review(self) -> serde_json::Value {
        serde_json::json!({ "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": self })
    }
}

/// Parses an AdmissionReview body; any error is the client's (HTTP 400).
pub fn parse(body: &[u8]) -> Result<Request, String> {
    let review: Review = serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
    if review.api_version != "admission.k8s.io/v1" || review.kind != "AdmissionReview" {
        return Err(format!(
            "expected apiVersion admission.k8s.io/v1, kind AdmissionReview; got {} {}",
            review.api_version, review.kind
        ));
    }
    review
        .request
        .ok_or_else(|| "the AdmissionReview has no request".to_string())
}

impl Webhook {
    /// Answers one review: the metric outcome and the response. Never fails: whatever goes wrong, the pod is
    /// allowed unchanged.
    pub async fn review(&self, req: &Request) -> (&'static str, Response) {
        let is_pod = req.kind.group.is_empty() && req.kind.kind == "Pod" && req.sub_resource.is_none();
        let Some(pod) = req.object.as_ref().filter(|_| is_pod && req.operation == "CREATE") else {
            return ("unchanged", Response::allow(req));
        };
        if !self.caches.ready() {
            return undecided(req, "caches not synced yet");
        }
        let namespace = req
            .namespace
            .as_deref()
            .or(pod.metadata.as_ref().and_then(|m| m.namespace.as_deref()))
            .unwrap_or("default");
        let Some(namespace_labels) = self.caches.namespace_labels_within(namespace, NAMESPACE_PATIENCE).await else {
            return undecided(req, &format!("namespace {namespace} not in the cache"));
        };
        let policies = self.caches.policies();
        let (outcome, response) = answer(req, pod, &policies, &namespace_labels, self.cluster);
        if let Some(policy) = response.audit_annotations.get("policy") {
            self.metrics
                .webhook_mutations
                .get_or_create(&PolicyLabels { policy: policy.clone() })
                .inc();
        }
        (outcome, response)
    }
}

fn undecided(req: &Request, why: &str) -> (&'static str, Response) {
    tracing::warn!(reason = why, "admitting a pod without a decision");
    (
        "undecided",
        Response::allow(req).warn(format!("keepalive-operator: keepalive sysctls not injected: {why}")),
    )
}

/// The answer to a pod CREATE, given the policies and the namespace's labels: the metric outcome and the
/// response. Pure; never fails.
pub fn answer(
    req: &Request,
    pod: &LeanPod,
    policies: &PolicySet,
    namespace_labels: &BTreeMap<String, String>,
    cluster: ClusterFacts,
) -> (&'static str, Response) {
    let allow = Response::allow(req);
    let decision = policy::decide(policies, namespace_labels, &pod.facts(), cluster);
    if tracing::enabled!(tracing::Level::DEBUG) {
        let meta = pod.metadata.as_ref();
        let name = meta
            .and_then(|m| m.name.as_deref().or(m.generate_name.as_deref()))
            .unwrap_or("");
        tracing::debug!(
            namespace = req.namespace.as_deref(),
            pod = name,
            dry_run = req.dry_run,
            "{decision}"
        );
    }
    match (&decision.outcome, decision.mutation()) {
        (_, Some((policy_name, sysctls))) => {
            let ops = policy::patch_operations("", pod.shape(), policy_name, sysctls);
            let json = serde_json::to_vec(&ops).expect("a JSON patch serializes");
            let mut patched = allow;
            patched.patch_type = Some("JSONPatch");
            patched.patch = Some(base64::engine::general_purpose::STANDARD.encode(json));
            // Recorded in the audit log as <webhook name>/policy.
            patched.audit_annotations.insert("policy".into(), policy_name.into());
            ("mutated", patched)
        }
        (Outcome::Skipped(Skip::NoPolicy | Skip::NamespaceIgnored | Skip::PodIgnored), _) => ("unchanged", allow),
        (Outcome::Skipped(skip), _) => {
            let policy = decision.policy.map(|p| p.name.as_str()).unwrap_or_default();
            (
                "skipped",
                allow.warn(format!("keepalive-operator: policy {policy} not applied: {skip}")),
            )
        }
        _ => ("unchanged", allow),
    }
}

/// The null responder the benchmark compares against: the same stack, no work.
pub fn null_router() -> Router {
    Router::new().route(
        "/mutate",
        post(|_body: Bytes| async {
            axum::Json(
                serde_json::json!({ "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "response": { "uid": "", "allowed": true } }),
            )
        }),
    )
}
