//! The webhook's HTTP handler driven in-process through its real router: malformed input gets a 400 with a
//! JSON error, a review that cannot be decided is allowed unchanged with a warning, and no input panics
//! (property-based fuzzing of the AdmissionReview handler).

use std::sync::Arc;

use axum::{
    body::{Body, to_bytes},
    http::{Request, StatusCode},
};
use keepalive_operator::{
    controller::{Caches, ControllerMetrics},
    policy::{ClusterFacts, PolicyEntry, PolicySet},
    runtime::metrics::{Registry, encode_text},
    webhook::{self, ReviewOutcome, Webhook},
};
use proptest::prelude::*;
use serde_json::{Value, json};
use tower::ServiceExt;

/// A webhook whose caches can never sync: its apiserver address has nothing listening. With the registry its
/// metrics are in.
fn unsynced_webhook() -> (Arc<Webhook<Caches>>, Arc<Registry>) {
    let config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let mut registry = Registry::with_prefix("keepalive");
    let caches = Caches::start(client, ControllerMetrics::register(&mut registry));
    let webhook = Webhook::new(caches, ClusterFacts::default(), &mut registry);
    (Arc::new(webhook), Arc::new(registry))
}

async fn post(webhook: Arc<Webhook<Caches>>, body: impl Into<Body>) -> (StatusCode, Value) {
    let request = Request::post("/mutate")
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap();
    let response = webhook::router(webhook).oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn pod_review(object: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "default",
            "operation": "CREATE",
            "userInfo": {"username": "admin"},
            "object": object,
            "dryRun": false
        }
    })
}

#[tokio::test]
async fn malformed_bodies_get_400_with_a_json_error() {
    let (w, registry) = unsynced_webhook();
    for body in [
        "".to_string(),
        "{".to_string(),
        "[]".to_string(),
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).to_string(),
        json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": pod_review(json!({}))["request"]}).to_string(),
        pod_review(json!({"spec": 5})).to_string(),
    ] {
        let (status, error) = post(w.clone(), body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(error["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}: {error}");
    }
    assert!(encode_text(&registry).contains("keepalive_webhook_requests_total{outcome=\"invalid\"} 6"));
}

#[tokio::test]
async fn undecidable_review_is_allowed_unchanged_with_a_warning() {
    let (w, registry) = unsynced_webhook();
    let (status, review) = post(
        w.clone(),
        pod_review(json!({"metadata": {"name": "p"}, "spec": {"containers": []}})).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let response = &review["response"];
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none(), "{response}");
    assert!(
        response["warnings"][0].as_str().unwrap().contains("caches not synced"),
        "{response}"
    );
    assert!(encode_text(&registry).contains("keepalive_webhook_requests_total{outcome=\"undecided\"} 1"));
    // /readyz says so too; /livez does not care.
    let ready = webhook::router(w.clone())
        .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let live = webhook::router(w)
        .oneshot(Request::get("/livez").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(live.status(), StatusCode::OK);
}

fn policies() -> PolicySet {
    let entry = |name: &str, spec: Value| PolicyEntry {
        name: name.into(),
        generation: Some(1),
        spec: serde_json::from_value(spec).unwrap(),
    };
    PolicySet::new([
        entry("all", json!({"keepalive": {"time": 300, "interval": 30, "probes": 3}})),
        entry(
            "fill",
            json!({"priority": 5, "mode": "Fill", "podSelector": {"matchLabels": {"m": "f"}},
            "keepalive": {"time": 1, "interval": 1, "probes": 1}}),
        ),
    ])
}

/// Arbitrary JSON, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
        "[a-zA-Z0-9._/ -]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("metadata".to_string()),
                    Just("spec".to_string()),
                    Just("labels".to_string()),
                    Just("securityContext".to_string()),
                    Just("sysctls".to_string()),
                    Just("name".to_string()),
                    Just("value".to_string()),
                    Just("hostNetwork".to_string()),
                    "[a-z]{1,8}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Decodes and answers a body the way the handler does (minus the caches), checking the invariants.
fn handle(body: &[u8]) {
    let Ok(request) = webhook::parse(body) else { return };
    let Some(pod) = request.object.as_ref() else { return };
    let (outcome, response) = webhook::answer(&request, pod, &policies(), &Default::default(), ClusterFacts::default());
    assert!(response.allowed, "the webhook never denies");
    assert_eq!(response.uid, request.uid);
    if outcome == ReviewOutcome::Mutated {
        let patch = response.json_patch().expect("a mutation carries a JSON patch");
        let mut review: Value = serde_json::from_slice(body).unwrap();
        let object = review.pointer_mut("/request/object").unwrap();
        json_patch::patch(object, &patch).expect("the patch applies to the object the apiserver sent");
        let sysctls = object
            .pointer("/spec/securityContext/sysctls")
            .and_then(Value::as_array)
            .unwrap();
        assert!(sysctls.iter().any(|s| s["name"] == "net.ipv4.tcp_keepalive_time"));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        handle(&body);
    }

    #[test]
    fn arbitrary_json_never_panics(value in any_json()) {
        handle(value.to_string().as_bytes());
    }

    #[test]
    fn arbitrary_pod_objects_never_panic(object in any_json()) {
        handle(pod_review(object).to_string().as_bytes());
    }

    #[test]
    fn arbitrary_pod_shapes_never_panic(
        labels in prop::collection::btree_map("[a-z]{1,3}", "[a-z]{0,3}", 0..4),
        sysctls in prop::collection::vec(("net.ipv4.tcp_keepalive_(time|intvl|probes)|kernel.x", "[0-9 a-z]{0,6}"), 0..5),
        host_network in any::<bool>(),
        security_context in any::<bool>(),
        annotations in any::<bool>(),
    ) {
        let mut pod = json!({"metadata": {"name": "p", "labels": labels}, "spec": {"containers": [], "hostNetwork": host_network}});
        if security_context {
            let list: Vec<Value> = sysctls.iter().map(|(n, v)| json!({"name": n, "value": v})).collect();
            pod["spec"]["securityContext"] = json!({"sysctls": list});
        }
        if annotations {
            pod["metadata"]["annotations"] = json!({"a": "b"});
        }
        handle(pod_review(pod).to_string().as_bytes());
    }
}
