//! Load on the real webhook server over TLS keep-alive connections, side by side with a null HTTPS responder
//! built on the same stack (the ceiling), in the same run. Targets: ≥ 20 000 AdmissionReviews/s, ≥ 50 % of the
//! null responder's throughput, p99 ≤ 2 ms.
//!
//! Everything runs on loopback in this process: one tokio runtime with two workers serves and loads.
//! Run: cargo bench --bench webhook   (KEEPALIVE_BENCH_SECONDS, KEEPALIVE_BENCH_CONNECTIONS to change the load)

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use axum::{Router, body::Bytes, routing::post};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use keepalive_operator::{
    policy::{ClusterFacts, PolicyEntry, PolicySet},
    runtime::{
        certs,
        limits::{LimitArgs, RequestLimits},
        metrics::{Registry, encode_text},
        server,
    },
    webhook::{self, Lookup, Webhook},
};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::json;
use tokio_rustls::{TlsConnector, rustls};

/// The webhook's lookup with fixed contents, held as the controller's caches hold them (behind a lock).
struct Fixed {
    policies: Arc<PolicySet>,
    namespaces: RwLock<HashMap<String, BTreeMap<String, String>>>,
}

impl Lookup for Fixed {
    fn ready(&self) -> bool {
        true
    }
    fn policies(&self) -> Arc<PolicySet> {
        self.policies.clone()
    }
    fn namespace_labels(&self, name: &str) -> Option<BTreeMap<String, String>> {
        self.namespaces.read().unwrap().get(name).cloned()
    }
}

/// The null responder: the same stack, no work.
fn null_router() -> Router {
    Router::new().route(
        "/mutate",
        post(|_body: Bytes| async {
            axum::Json(json!({ "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "response": { "uid": "", "allowed": true } }))
        }),
    )
}

fn policies(n: usize) -> PolicySet {
    PolicySet::new((0..n).map(|i| {
        PolicyEntry {
            name: format!("policy-{i:04}"),
            generation: Some(1),
            spec: serde_json::from_value(json!({
                "podSelector": {"matchLabels": {"app": format!("app-{i}")}},
                "keepalive": {"time": 300, "interval": 30, "probes": 3}
            }))
            .unwrap(),
        }
    }))
}

/// A typical Deployment pod, matched by policy-0042: the answer carries a patch.
fn review_body() -> Bytes {
    let pod = json!({
        "metadata": {"generateName": "checkout-5d8f7c9b6-", "namespace": "shop",
            "labels": {"app": "app-42", "pod-template-hash": "5d8f7c9b6", "app.kubernetes.io/part-of": "shop"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-01T10:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "checkout-5d8f7c9b6",
                "uid": "4b0c7f5e-8d3a-4c1e-9f6a-2b7d8e9f0a1b", "controller": true, "blockOwnerDeletion": true}]},
        "spec": {
            "containers": [{"name": "app", "image": "registry.example/checkout:1.4.2",
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                "env": [{"name": "DB_HOST", "value": "db.shop.svc"}, {"name": "LOG_LEVEL", "value": "info"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 5},
                "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]}],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default", "securityContext": {"runAsNonRoot": true},
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
            "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}]
        }
    });
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "a1b2c3", "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": pod, "oldObject": null, "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    });
    Bytes::from(serde_json::to_vec(&review).unwrap())
}

struct Result {
    requests: usize,
    seconds: f64,
    latencies_us: Vec<u32>,
}

impl Result {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
    fn percentile(&self, p: f64) -> f64 {
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_us[i] as f64 / 1000.0
    }
}

async fn start(router: Router, config: Arc<rustls::ServerConfig>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Both servers run behind the production request limits, as the operator serves.
    let limits = LimitArgs::default();
    let router = RequestLimits::new(&limits).apply(router);
    tokio::spawn(async move { server::serve_tls(listener, config, router, &limits, std::future::pending()).await });
    port
}

/// `connections` keep-alive TLS connections, each sending one request after another, for `duration`.
async fn load(port: u16, ca_pem: &str, body: Bytes, connections: usize, duration: Duration) -> Result {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(config));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (connector, body) = (connector.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let tls = connector
                .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
                .await
                .unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
            tokio::spawn(conn);
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let request = hyper::Request::post("/mutate")
                    .header("host", "127.0.0.1")
                    .header("content-type", "application/json")
                    .body(Full::new(body.clone()))
                    .unwrap();
                let t = Instant::now();
                let response = sender.send_request(request).await.unwrap();
                assert_eq!(response.status(), 200);
                let bytes = response.into_body().collect().await.unwrap().to_bytes();
                assert!(bytes.len() > 40);
                latencies.push(t.elapsed().as_micros() as u32);
            }
            latencies
        }));
    }
    let mut latencies_us = Vec::new();
    for t in tasks {
        latencies_us.extend(t.await.unwrap());
    }
    let seconds = start.elapsed().as_secs_f64();
    latencies_us.sort_unstable();
    Result {
        requests: latencies_us.len(),
        seconds,
        latencies_us,
    }
}

fn main() {
    let seconds: u64 = std::env::var("KEEPALIVE_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let connections: usize = std::env::var("KEEPALIVE_BENCH_CONNECTIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let pki = certs::issue(&["127.0.0.1".to_string()]).unwrap();
        let store = Arc::new(certs::CertStore::default());
        store.set_pem(pki.cert.as_bytes(), pki.key.as_bytes()).unwrap();
        let config = server::tls_config(store, None).unwrap();
        let namespaces = [("shop".to_string(), BTreeMap::from([("team".to_string(), "shop".to_string())]))];
        let mut registry = Registry::with_prefix("keepalive");
        let lookup = Fixed {
            policies: Arc::new(policies(100)),
            namespaces: RwLock::new(namespaces.into_iter().collect()),
        };
        let hook = Arc::new(Webhook::new(Arc::new(lookup), ClusterFacts::default(), &mut registry));
        let webhook_port = start(webhook::router(hook), config.clone()).await;
        let null_port = start(null_router(), config).await;
        let body = review_body();

        // The real handler answers with a patch: check once before measuring.
        let check = load(webhook_port, &pki.ca, body.clone(), 1, Duration::from_millis(50)).await;
        assert!(check.requests > 0);
        assert!(encode_text(&registry).contains("outcome=\"mutated\""), "the benchmark request must be mutated");

        let mut rows = Vec::new();
        for (name, port) in [("null responder", null_port), ("webhook", webhook_port), ("null responder", null_port), ("webhook", webhook_port)] {
            load(port, &pki.ca, body.clone(), connections, Duration::from_millis(500)).await; // warm-up
            let r = load(port, &pki.ca, body.clone(), connections, Duration::from_secs(seconds)).await;
            rows.push((name, r));
        }
        println!(
            "webhook load: {connections} TLS keep-alive connections, HTTP/1.1, {} B AdmissionReview (mutated), {seconds} s per run, 2 cores shared by server and load",
            body.len()
        );
        println!("{:<16} {:>10} {:>10} {:>10} {:>10}", "server", "req/s", "p50 (ms)", "p99 (ms)", "max (ms)");
        for (name, r) in &rows {
            println!(
                "{name:<16} {:>10.0} {:>10.3} {:>10.3} {:>10.3}",
                r.rps(),
                r.percentile(0.5),
                r.percentile(0.99),
                r.percentile(1.0)
            );
        }
        let best = |n: &str| rows.iter().filter(|(name, _)| *name == n).map(|(_, r)| r.rps()).fold(0.0, f64::max);
        let (hook, null) = (best("webhook"), best("null responder"));
        let p99 = rows.iter().filter(|(n, _)| *n == "webhook").map(|(_, r)| r.percentile(0.99)).fold(f64::MAX, f64::min);
        println!("webhook / null responder throughput: {:.0} %", 100.0 * hook / null);
        println!(
            "targets: ≥ 20000 req/s: {}; ≥ 50 % of null: {}; p99 ≤ 2 ms: {}",
            if hook >= 20000.0 { "met" } else { "MISSED" },
            if hook >= 0.5 * null { "met" } else { "MISSED" },
            if p99 <= 2.0 { "met" } else { "MISSED" },
        );
    });
}
