//! The mutating admission webhook: `POST /mutate` for AdmissionReview `admission.k8s.io/v1`, Pod CREATE.
//!
//! It never blocks pod creation: a malformed body is answered 400 with a JSON error; a valid review that cannot
//! be decided (caches not synced, a namespace not seen yet) is allowed without a patch, with a warning and a
//! metric. The decision itself is [`policy::decide`].

mod review;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response as HttpResponse},
    routing::{get, post},
};
use base64::Engine;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
};

pub use self::review::{Kind, Request, Response, ReviewedPod, parse};
use crate::{
    policy::{self, ClusterFacts, Outcome, PolicySet, Skip},
    runtime::metrics::Registry,
};

/// How long a review waits for a namespace that is not in the cache yet.
const NAMESPACE_PATIENCE: Duration = Duration::from_millis(500);

/// What a review reads, without any API call: the caches the controller keeps.
pub trait Lookup: Send + Sync + 'static {
    /// The caches have completed their first list.
    fn ready(&self) -> bool;
    /// The current policies, ready to query.
    fn policies(&self) -> Arc<PolicySet>;
    /// A namespace's labels, if it is in the cache.
    fn namespace_labels(&self, name: &str) -> Option<BTreeMap<String, String>>;
}

/// How a review ended: the `outcome` label of `keepalive_webhook_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReviewOutcome {
    /// The pod gets a patch.
    Mutated,
    /// Nothing to do (no policy, opted out, already set, Audit, not a pod CREATE).
    Unchanged,
    /// A policy selects the pod but its values would get it rejected: allowed with a warning.
    Skipped,
    /// No decision possible (caches not synced, namespace unknown): allowed with a warning.
    Undecided,
    /// Not an AdmissionReview: HTTP 400.
    Invalid,
}

impl ReviewOutcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            ReviewOutcome::Mutated => "mutated",
            ReviewOutcome::Unchanged => "unchanged",
            ReviewOutcome::Skipped => "skipped",
            ReviewOutcome::Undecided => "undecided",
            ReviewOutcome::Invalid => "invalid",
        }
    }
}

crate::label_value!(ReviewOutcome);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: ReviewOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    policy: String,
}

/// The webhook's metrics.
#[derive(Clone)]
pub struct WebhookMetrics {
    requests: Family<OutcomeLabels, Counter>,
    mutations: Family<PolicyLabels, Counter>,
    duration: Histogram,
}

impl WebhookMetrics {
    /// Registers `webhook_requests`, `webhook_mutations` and `webhook_request_duration_seconds`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = WebhookMetrics {
            requests: Family::default(),
            mutations: Family::default(),
            // 50 µs .. ~0.4 s
            duration: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                5e-5, 2.5, 11,
            )),
        };
        registry.register(
            "webhook_requests",
            "Admission reviews answered, by outcome",
            metrics.requests.clone(),
        );
        registry.register(
            "webhook_mutations",
            "Pods mutated, by policy",
            metrics.mutations.clone(),
        );
        registry.register(
            "webhook_request_duration_seconds",
            "Time to answer one admission review",
            metrics.duration.clone(),
        );
        metrics
    }

    fn request(&self, outcome: ReviewOutcome) {
        self.requests.get_or_create(&OutcomeLabels { outcome }).inc();
    }
}

/// Everything a review needs, shared by all requests.
pub struct Webhook<L> {
    pub lookup: Arc<L>,
    pub cluster: ClusterFacts,
    pub metrics: WebhookMetrics,
    /// Set on shutdown: /readyz fails while reviews are still answered.
    draining: AtomicBool,
}

/// The HTTP routes: `/mutate`, `/livez`, `/readyz` (`/metrics` is the process's, merged by the caller).
pub fn router<L: Lookup>(webhook: Arc<Webhook<L>>) -> Router {
    Router::new()
        .route("/mutate", post(mutate::<L>))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz::<L>))
        .with_state(webhook)
}

async fn readyz<L: Lookup>(State(w): State<Arc<Webhook<L>>>) -> HttpResponse {
    if w.draining.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else if w.lookup.ready() {
        "ok".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced").into_response()
    }
}

async fn mutate<L: Lookup>(State(w): State<Arc<Webhook<L>>>, body: Bytes) -> HttpResponse {
    let start = std::time::Instant::now();
    let response = match parse(&body) {
        Err(message) => {
            w.metrics.request(ReviewOutcome::Invalid);
            let error = serde_json::json!({ "error": message });
            (StatusCode::BAD_REQUEST, axum::Json(error)).into_response()
        }
        Ok(request) => {
            let (outcome, response) = w.review(&request).await;
            w.metrics.request(outcome);
            axum::Json(response.into_review()).into_response()
        }
    };
    w.metrics.duration.observe(start.elapsed().as_secs_f64());
    response
}

impl<L: Lookup> Webhook<L> {
    pub fn new(lookup: Arc<L>, cluster: ClusterFacts, registry: &mut Registry) -> Self {
        Webhook {
            lookup,
            cluster,
            metrics: WebhookMetrics::register(registry),
            draining: AtomicBool::new(false),
        }
    }

    /// From now on /readyz fails; reviews are still answered.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Answers one review: the metric outcome and the response. Never fails: whatever goes wrong, the pod is
    /// allowed unchanged.
    pub async fn review(&self, req: &Request) -> (ReviewOutcome, Response) {
        let is_pod = req.kind.group.is_empty() && req.kind.kind == "Pod" && req.sub_resource.is_none();
        let Some(pod) = req.object.as_ref().filter(|_| is_pod && req.operation == "CREATE") else {
            return (ReviewOutcome::Unchanged, Response::allow(req));
        };
        if !self.lookup.ready() {
            return undecided(req, "caches not synced yet");
        }
        let namespace = req
            .namespace
            .as_deref()
            .or(pod.metadata.as_ref().and_then(|m| m.namespace.as_deref()))
            .unwrap_or("default");
        let Some(namespace_labels) = self.namespace_labels_within(namespace, NAMESPACE_PATIENCE).await else {
            return undecided(req, &format!("namespace {namespace} not in the cache"));
        };
        let policies = self.lookup.policies();
        let (outcome, response) = answer(req, pod, &policies, &namespace_labels, self.cluster);
        if let Some(policy) = response.audit_annotations.get("policy") {
            self.metrics
                .mutations
                .get_or_create(&PolicyLabels { policy: policy.clone() })
                .inc();
        }
        (outcome, response)
    }

    /// Labels of a namespace; when it is not cached yet (created a moment ago, its watch event still on the
    /// way), waits for it up to `patience`.
    async fn namespace_labels_within(&self, name: &str, patience: Duration) -> Option<BTreeMap<String, String>> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            if let Some(labels) = self.lookup.namespace_labels(name) {
                return Some(labels);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn undecided(req: &Request, why: &str) -> (ReviewOutcome, Response) {
    tracing::warn!(reason = why, "admitting a pod without a decision");
    (
        ReviewOutcome::Undecided,
        Response::allow(req).warn(format!("keepalive-operator: keepalive sysctls not injected: {why}")),
    )
}

/// The answer to a pod CREATE, given the policies and the namespace's labels: the metric outcome and the
/// response. Pure; never fails.
pub fn answer(
    req: &Request,
    pod: &ReviewedPod,
    policies: &PolicySet,
    namespace_labels: &BTreeMap<String, String>,
    cluster: ClusterFacts,
) -> (ReviewOutcome, Response) {
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
            (ReviewOutcome::Mutated, patched)
        }
        (Outcome::Skipped(Skip::NoPolicy | Skip::NamespaceIgnored | Skip::PodIgnored), _) => {
            (ReviewOutcome::Unchanged, allow)
        }
        (Outcome::Skipped(skip), _) => {
            let policy = decision.policy.map(|p| p.name.as_str()).unwrap_or_default();
            (
                ReviewOutcome::Skipped,
                allow.warn(format!("keepalive-operator: policy {policy} not applied: {skip}")),
            )
        }
        _ => (ReviewOutcome::Unchanged, allow),
    }
}
