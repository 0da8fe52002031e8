//! The conformance controller's cache and evaluation at scale, in-process, through the same code path as the
//! pod watch (`CachedPod::from_pod` → `Conformance`): 100 000 synthetic pods across 1 000 namespaces and 50
//! policies. Baseline in the same run: a kube-rs reflector store holding the same pods as full objects.
//! Targets: RSS ≤ 150 MiB and ≤ 1/5 of the reflector's; a full recompute ≤ 300 ms; one pod change recomputes
//! only its policy.
//!
//! With `-- --apiserver N`, also measures against a real apiserver: N real pods created, then the time from the
//! last pod created until the policy status counts them all.
//!
//! Run: cargo bench --bench controller [-- --apiserver 10000]

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use keepalive_operator::{
    controller::conformance::{CachedPod, Conformance},
    policy::{ClusterFacts, PolicyEntry, PolicySet},
};
use kube::runtime::{reflector, watcher};
use serde_json::json;

const PODS: usize = 100_000;
const NAMESPACES: usize = 1_000;
const POLICIES: usize = 50;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn policies() -> PolicySet {
    PolicySet::new((0..POLICIES).map(|i| {
        let spec = if i.is_multiple_of(2) {
            json!({"namespaceSelector": {"matchLabels": {"team": format!("team-{}", i / 2)}}})
        } else {
            json!({"podSelector": {"matchLabels": {"app": format!("app-{i}")}}, "priority": 1})
        };
        let mut spec = spec;
        spec["keepalive"] = json!({"time": 300, "interval": 30, "probes": 3});
        PolicyEntry {
            name: format!("policy-{i:02}"),
            generation: Some(1),
            spec: serde_json::from_value(spec).unwrap(),
        }
    }))
}

fn namespace_labels(n: usize) -> BTreeMap<String, String> {
    [
        ("team".to_string(), format!("team-{}", n % 40)),
        ("kubernetes.io/metadata.name".into(), format!("ns-{n:04}")),
    ]
    .into()
}

/// A realistic Pod as the watch delivers it: ReplicaSet owner, two containers, managedFields, status.
fn synthetic_pod(i: usize) -> Pod {
    let ns = format!("ns-{:04}", i % NAMESPACES);
    let app = format!("app-{}", i % 120);
    let mutated = !i.is_multiple_of(3);
    let mut spec = json!({
        "nodeName": format!("node-{}", i % 200),
        "serviceAccountName": "default",
        "containers": [
            {"name": "app", "image": format!("registry.example/{app}:1.4.2"), "ports": [{"containerPort": 8080, "protocol": "TCP"}],
             "env": [{"name": "DB_HOST", "value": "db.shop.svc"}, {"name": "LOG_LEVEL", "value": "info"}],
             "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
             "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 5},
             "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]},
            {"name": "proxy", "image": "registry.example/proxy:2.1", "args": ["--port=15001", "--admin=15000"],
             "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}}}
        ],
        "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}],
        "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
    });
    if mutated {
        spec["securityContext"] = json!({"sysctls": [
            {"name": "net.ipv4.tcp_keepalive_time", "value": "300"},
            {"name": "net.ipv4.tcp_keepalive_intvl", "value": "30"},
            {"name": "net.ipv4.tcp_keepalive_probes", "value": "3"}]});
    }
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("{app}-7d9f8c6b5-{i:06}"), "namespace": ns, "uid": format!("00000000-0000-4000-8000-{i:012}"),
            "resourceVersion": format!("{}", 100000 + i), "creationTimestamp": "2026-11-01T10:00:00Z",
            "generateName": format!("{app}-7d9f8c6b5-"),
            "labels": {"app": app, "pod-template-hash": "7d9f8c6b5", "app.kubernetes.io/part-of": "shop"},
            "annotations": if mutated { json!({"keepalive.dev/policy": "policy-00"}) } else { json!({}) },
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-7d9f8c6b5"),
                "uid": "4b0c7f5e-8d3a-4c1e-9f6a-2b7d8e9f0a1b", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                "time": "2026-11-01T10:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}, "f:pod-template-hash": {}},
                    "f:ownerReferences": {".": {}, "k:{\"uid\":\"4b0c7f5e\"}": {}}},
                    "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {".": {}, "f:image": {}, "f:name": {}, "f:ports": {}}}}}},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": "2026-11-01T10:00:05Z",
                "fieldsType": "FieldsV1", "subresource": "status",
                "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:hostIP": {}, "f:phase": {}, "f:podIP": {}}}}]
        },
        "spec": spec,
        "status": {
            "phase": "Running", "hostIP": "10.0.0.1", "podIP": format!("10.1.{}.{}", (i / 250) % 250, i % 250),
            "startTime": "2026-11-01T10:00:01Z", "qosClass": "Burstable",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-01T10:00:05Z"},
                           {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-11-01T10:00:05Z"},
                           {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-11-01T10:00:00Z"}],
            "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "registry.example/app:1.4.2",
                "imageID": "registry.example/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "containerID": "containerd://0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "started": true, "state": {"running": {"startedAt": "2026-11-01T10:00:04Z"}}}]
        }
    }))
    .unwrap()
}

fn main() {
    let apiserver_pods: Option<usize> = std::env::args()
        .skip_while(|a| a != "--apiserver")
        .nth(1)
        .map(|n| n.parse().expect("--apiserver N"));

    let base = rss_kib();
    let generated = Instant::now();
    let mut c = Conformance::new(ClusterFacts::default());
    c.replace_namespaces((0..NAMESPACES).map(|n| (format!("ns-{n:04}"), namespace_labels(n))));
    c.set_policies(Arc::new(policies()));
    // Same path as the watch's initial list: each Pod is made lean at ingest, then the whole list replaces the
    // cache.
    let lean: Vec<CachedPod> = (0..PODS).filter_map(|i| c.cached(synthetic_pod(i))).collect();
    c.replace_pods(lean);
    let ingest = generated.elapsed();
    let lean_kib = rss_kib() - base;

    let start = Instant::now();
    c.recompute_all();
    let full = start.elapsed();
    let mut totals = (0, 0);
    for e in c.policies().entries() {
        let s = c.summary(&e.name).unwrap();
        totals.0 += s.matched;
        totals.1 += s.conformant;
    }
    c.take_dirty();

    // One pod changes: only its policy is recomputed.
    let changed = c.cached(synthetic_pod(121)).unwrap();
    let mut times = Vec::new();
    for k in 0..1000u32 {
        let mut p = changed.clone();
        if k.is_multiple_of(2) {
            p.sysctls = Arc::from(Vec::new());
        }
        let t = Instant::now();
        c.upsert_pod(p);
        let dirty = c.take_dirty();
        let summary = c.summary(&dirty[0]).unwrap();
        times.push(t.elapsed());
        assert_eq!(dirty.len(), 1, "one pod change dirties one policy");
        std::hint::black_box(summary);
    }
    times.sort();
    let one = times[times.len() / 2];

    // Baseline: a kube-rs reflector holding the same pods as full objects.
    let before = rss_kib();
    let (store, mut writer) = reflector::store::<Pod>();
    writer.apply_watcher_event(&watcher::Event::Init);
    for i in 0..PODS {
        writer.apply_watcher_event(&watcher::Event::InitApply(synthetic_pod(i)));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    let reflector_kib = rss_kib() - before;
    assert_eq!(store.len(), PODS);

    println!(
        "controller cache: {PODS} pods, {NAMESPACES} namespaces, {POLICIES} policies ({} matched, {} conformant)",
        totals.0, totals.1
    );
    xtask::bench::row(
        "lean cache + tallies, RSS",
        format!("{:.1} MiB", lean_kib as f64 / 1024.0),
    );
    xtask::bench::row(
        "kube-rs reflector of full Pods, RSS (baseline)",
        format!("{:.1} MiB", reflector_kib as f64 / 1024.0),
    );
    xtask::bench::row(
        "ratio lean / reflector",
        format!("1/{:.1}", reflector_kib as f64 / lean_kib as f64),
    );
    xtask::bench::millis("ingest (parse + lean + evaluate)", ingest);
    xtask::bench::millis("full recompute of all statuses", full);
    xtask::bench::row(
        "one pod change -> its policy's summary (p50)",
        format!("{:.1} µs", one.as_secs_f64() * 1e6),
    );
    println!(
        "targets: RSS ≤ 150 MiB: {}; ≤ 1/5 of the reflector: {}; full recompute ≤ 300 ms: {}",
        if lean_kib <= 150 * 1024 { "met" } else { "MISSED" },
        if lean_kib * 5 <= reflector_kib { "met" } else { "MISSED" },
        if full <= Duration::from_millis(300) {
            "met"
        } else {
            "MISSED"
        },
    );
    drop(store);

    if let Some(n) = apiserver_pods {
        against_apiserver(n);
    }
}

/// N real pods through a real apiserver: time from the last pod created until the status counts them all.
fn against_apiserver(n: usize) {
    use kube::{Api, api::PostParams};
    let cp = xtask::ControlPlane::start().unwrap();
    cp.install_crds().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = cp.client().await.unwrap();
        let ns: k8s_openapi::api::core::v1::Namespace =
            serde_json::from_value(json!({"metadata": {"name": "load", "labels": {"load": "yes"}}})).unwrap();
        Api::all(client.clone()).create(&PostParams::default(), &ns).await.unwrap();
        let sys: k8s_openapi::api::core::v1::Namespace =
            serde_json::from_value(json!({"metadata": {"name": "keepalive-system"}})).unwrap();
        Api::all(client.clone()).create(&PostParams::default(), &sys).await.unwrap();
        let policy: keepalive_operator::api::KeepalivePolicy = serde_json::from_value(json!({
            "apiVersion": "keepalive.dev/v1alpha1", "kind": "KeepalivePolicy", "metadata": {"name": "load"},
            "spec": {"namespaceSelector": {"matchLabels": {"load": "yes"}}, "keepalive": {"time": 60, "interval": 5, "probes": 3}}
        }))
        .unwrap();
        Api::all(client.clone()).create(&PostParams::default(), &policy).await.unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_keepalive-operator"));
        let (port, admin) = (xtask::cluster::free_port().unwrap(), xtask::cluster::free_port().unwrap());
        cmd.args(["controller", &format!("--listen=127.0.0.1:{port}"), &format!("--admin-listen=127.0.0.1:{admin}")])
            .args(["--namespace=keepalive-system", "--tls-extra-sans=127.0.0.1", "--injection-mode=webhook"])
            .env("KUBECONFIG", cp.kubeconfig());
        let op = xtask::cluster::spawn_logged(cmd, &cp.work_dir().join("operator.log")).unwrap();

        let pods: Api<Pod> = Api::namespaced(client.clone(), "load");
        let started = Instant::now();
        let body: Pod = serde_json::from_value(json!({"metadata": {"generateName": "p-"},
            "spec": {"containers": [{"name": "c", "image": "x"}]}}))
        .unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        let per_task = n.div_ceil(16);
        for t in 0..16 {
            let (pods, body) = (pods.clone(), body.clone());
            let count = per_task.min(n.saturating_sub(t * per_task));
            tasks.spawn(async move {
                for _ in 0..count {
                    pods.create(&PostParams::default(), &body).await.unwrap();
                }
            });
        }
        tasks.join_all().await;
        let created = Instant::now();
        let policies: Api<keepalive_operator::api::KeepalivePolicy> = Api::all(client.clone());
        loop {
            let p = policies.get("load").await.unwrap();
            if p.status.and_then(|s| s.matched_pods) == Some(n as i32) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(created.elapsed() < Duration::from_secs(300), "status never counted {n} pods");
        }
        println!(
            "real apiserver: {n} pods created in {:.1} s; status counted all of them {:.2} s after the last was created",
            (created - started).as_secs_f64(),
            created.elapsed().as_secs_f64()
        );
        xtask::cluster::kill(op);
    });
}
