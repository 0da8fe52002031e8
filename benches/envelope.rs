//! The 5 000-node envelope, in-process, through the controller's own code paths: 150 000 pods on 5 000 nodes
//! (30 a node), 50 policies, and 5 000 node reports whose pods carry per-socket summaries built by the agent's
//! own summarizer (`agent::connections::summarize`) from synthetic sockets: a third of the pods with 3–5
//! keepalive groups and 5 or more destinations (IPv4 and IPv6 remotes, process names), the others with 1–2
//! groups and 1–3 destinations. Reports reach the controller as watch events (JSON, with the metadata the
//! apiserver adds: ownerReferences, managedFields) and go through `WatchEvent` parsing, the `Reports` index,
//! `NodeReports::feed` and `Conformance`, as in the status writer.
//!
//! Measured, each beside a baseline of the same run: RSS of the pod cache, and of the node reports on top of
//! it (baseline: the same reports held as whole objects, as a reflector would); a full recompute (baseline:
//! the same without node reports); one report absorbed (baseline: parsing its watch event alone); CPU per
//! wall second of steady-state churn, 60 s at one heartbeat per node per minute (83.3 heartbeat Lease events/s)
//! and one report refresh per node per 10 minutes (8.3 report events/s), with the status writer's 500 ms tick
//! (expiry, summaries, statuses serialized); one heartbeat absorbed (baseline: one report absorbed); and, from
//! the measured sizes of the objects as serialized, the apiserver write rate and the bytes/s of the controller's
//! report and Lease watches (baseline: every heartbeat a report rewrite, as before the heartbeat Lease). With a
//! control plane available (`xtask::ControlPlane`, cached binaries), one report and one Lease are also written
//! through a real apiserver by server-side apply, as the agent writes them, and the report stamped as the
//! controller stamps it, to check the sizes against what the apiserver stores.
//!
//! Run: cargo bench --bench envelope [-- --no-apiserver]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{coordination::v1::Lease, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry, ObjectMeta, OwnerReference, Time},
    jiff::Timestamp,
};
use keepalive_operator::{
    agent::{
        connections::{Observed, summarize},
        heartbeat::lease_body,
        kernel::bpf::OwnKeepalive,
    },
    api::{
        AGENT_MANAGER, ConnectionMethod, ConnectionReading, KeepaliveNodeReport, KeepaliveNodeReportSpec,
        LiveKeepalive, PodLiveReport,
    },
    controller::{
        conformance::{self, CachedPod, Conformance, Injection},
        node_reports::{Beats, Heartbeats, NodeReports, Reports},
    },
    policy::{ClusterFacts, PolicyEntry, PolicySet},
    runtime::watch::Relist,
};
use kube::{api::WatchEvent, runtime::watcher};
use serde_json::{Value, json};

const NODES: usize = 5_000;
const PODS_PER_NODE: usize = 30;
const PODS: usize = NODES * PODS_PER_NODE;
const NAMESPACES: usize = 2_000;
const POLICIES: usize = 50;
/// The agent's default heartbeat: its Lease is renewed once a minute when nothing but counts changed.
const HEARTBEAT_SECONDS: u64 = 60;
/// The agent's default refresh: its report is rewritten at least every 10 minutes.
const REFRESH_SECONDS: u64 = 600;
/// The status writer's tick and its per-policy write interval.
const TICK: Duration = Duration::from_millis(500);
const CHURN: Duration = Duration::from_secs(60);

const MUTATED: LiveKeepalive = LiveKeepalive {
    time: 300,
    interval: 30,
    probes: 3,
};
const LINUX_DEFAULTS: LiveKeepalive = LiveKeepalive {
    time: 7200,
    interval: 75,
    probes: 9,
};

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// CPU time of the calling thread (the bench runs the controller's work on one thread).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID is always available on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn policies() -> PolicySet {
    PolicySet::new((0..POLICIES).map(|i| {
        let mut spec = if i.is_multiple_of(2) {
            json!({"namespaceSelector": {"matchLabels": {"team": format!("team-{}", i / 2)}}})
        } else {
            json!({"podSelector": {"matchLabels": {"app": format!("app-{i}")}}, "priority": 1})
        };
        spec["keepalive"] = json!({"time": 300, "interval": 30, "probes": 3});
        // Half the policies judge connections against a load balancer's idle timeout (AWS NLB).
        if i % 4 < 2 {
            spec["idleTimeoutSeconds"] = json!(350);
        }
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

fn node_name(n: usize) -> String {
    format!("node-{n:04}")
}

/// Pod `i` runs on node `i % NODES`: node `n` holds pods `n`, `n + NODES`, … (30 of them).
fn node_of(i: usize) -> usize {
    i % NODES
}

fn pod_uid(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012}")
}

/// Two pods in three carry the policy's sysctls; the third was created before the webhook (runs with Linux's).
fn mutated(i: usize) -> bool {
    !i.is_multiple_of(3)
}

/// A realistic Pod as the watch delivers it: ReplicaSet owner, two containers, managedFields, status.
fn synthetic_pod(i: usize) -> Pod {
    let ns = format!("ns-{:04}", (i / 3) % NAMESPACES);
    let app = format!("app-{}", i % 120);
    let mut spec = json!({
        "nodeName": node_name(node_of(i)),
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
    if mutated(i) {
        spec["securityContext"] = json!({"sysctls": [
            {"name": "net.ipv4.tcp_keepalive_time", "value": "300"},
            {"name": "net.ipv4.tcp_keepalive_intvl", "value": "30"},
            {"name": "net.ipv4.tcp_keepalive_probes", "value": "3"}]});
    }
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("{app}-7d9f8c6b5-{i:06}"), "namespace": ns, "uid": pod_uid(i),
            "resourceVersion": format!("{}", 100000 + i), "creationTimestamp": "2026-11-01T10:00:00Z",
            "generateName": format!("{app}-7d9f8c6b5-"),
            "labels": {"app": app, "pod-template-hash": "7d9f8c6b5", "app.kubernetes.io/part-of": "shop"},
            "annotations": if mutated(i) { json!({"keepalive.dev/policy": "policy-00"}) } else { json!({}) },
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

/// Command names of the processes holding connections (at most 15 bytes, as the kernel's `comm`).
const PROCESSES: &[&str] = &[
    "java",
    "envoy",
    "node",
    "python3",
    "gunicorn",
    "nginx",
    "dotnet",
    "ruby",
    "php-fpm",
    "celery",
    "kafka-consumer",
    "otelcol-contrib",
    "pgbouncer",
    "redis-cli",
    "grpc-gateway",
];

/// Destination `d` of a cluster of 20 000: service VIPs and pod IPs, a third of them IPv6, on common ports.
fn remote(d: usize) -> SocketAddr {
    const PORTS: [u16; 8] = [5432, 6379, 443, 9092, 8080, 3306, 27017, 9000];
    let d = d % 20_000;
    let port = PORTS[d % PORTS.len()];
    let ip = if d.is_multiple_of(3) {
        IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0x10,
            0x96,
            0,
            0,
            0,
            (d / 256) as u16,
            (d % 256) as u16,
        ))
    } else if d % 3 == 1 {
        IpAddr::V4(Ipv4Addr::new(10, 96, (d / 256 % 256) as u8, (d % 256) as u8))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 244, (d / 256 % 256) as u8, (d % 256) as u8))
    };
    SocketAddr::new(ip, port)
}

/// The keepalive of connections of setting `s`: SO_KEEPALIVE and the socket's own values, TCP_USER_TIMEOUT.
fn setting(s: usize) -> (bool, OwnKeepalive, u32) {
    let own = |idle: u32, interval: u32, probes: u8| OwnKeepalive {
        idle_seconds: Some(idle),
        interval_seconds: Some(interval),
        probes: Some(probes),
    };
    match s % 5 {
        0 => (false, OwnKeepalive::default(), 0),
        1 => (true, OwnKeepalive::default(), 0),
        // Go's runtime: 15 s on every socket.
        2 => (true, own(15, 15, 9), 0),
        // A JVM pool with its own, too long, idle time.
        3 => (true, own(600, 60, 5), 0),
        _ => (true, OwnKeepalive::default(), 30_000),
    }
}

/// The established connections of pod `i` at heartbeat `t` (counts move from one heartbeat to the next).
fn sockets(i: usize, t: usize) -> Vec<Observed<'static>> {
    let rich = (i / 3).is_multiple_of(3);
    let (destinations, settings) = if rich {
        (5 + i % 3, 3 + (i / 9) % 3)
    } else {
        (1 + i % 3, 1 + (i / 9) % 2)
    };
    let mut out = Vec::new();
    for j in 0..destinations {
        let (keepalive, own, user_timeout_ms) = setting(j % settings + (i / 27) % 2);
        let connections = 1 + (i * 7 + j * 13 + t) % 12;
        let observed = Observed {
            keepalive,
            own,
            user_timeout_ms,
            remote: remote(i / 5 * 3 + j * 977),
            process: PROCESSES[(i / 120 + j) % PROCESSES.len()],
        };
        out.extend(std::iter::repeat_n(observed, connections));
    }
    out
}

fn at(t: usize) -> Time {
    Time(Timestamp::from_second(1_796_000_000 + (t as u64 * HEARTBEAT_SECONDS) as i64).unwrap())
}

/// Node `n`'s report at heartbeat `t`, as its agent builds it.
fn report_spec(n: usize, t: usize) -> KeepaliveNodeReportSpec {
    let pods: Vec<PodLiveReport> = (0..PODS_PER_NODE)
        .map(|k| {
            let i = n + k * NODES;
            let sysctls = if mutated(i) { MUTATED } else { LINUX_DEFAULTS };
            let summary = summarize(sockets(i, t), &sysctls);
            let established = summary.groups.iter().map(|g| g.connections).sum::<i32>();
            let keepalive = summary
                .groups
                .iter()
                .filter(|g| g.keepalive)
                .map(|g| g.connections)
                .sum::<i32>();
            PodLiveReport {
                uid: pod_uid(i),
                sysctls: Some(sysctls),
                established,
                keepalive,
                sockets: Some(summary),
                // Values first read when the node started; unchanged since (the agent keeps readAt).
                read_at: at(0),
                error: None,
            }
        })
        .collect();
    KeepaliveNodeReportSpec {
        last_scan: at(t),
        heartbeat_seconds: HEARTBEAT_SECONDS as i32,
        refresh_seconds: Some(REFRESH_SECONDS as i32),
        scan_interval_seconds: 10,
        node_sysctls: Some(LINUX_DEFAULTS),
        connection_reading: Some(ConnectionReading {
            method: ConnectionMethod::PerSocket,
            message: None,
        }),
        verified_pods: pods.len() as i32,
        unverified_pods: 0,
        pods,
    }
}

/// What the agent sends: the server-side apply body of `src/agent/mod.rs`.
fn apply_body(n: usize, spec: &KeepaliveNodeReportSpec) -> Value {
    json!({
        "apiVersion": "keepalive.dev/v1alpha1",
        "kind": "KeepaliveNodeReport",
        "metadata": { "name": node_name(n) },
        "spec": spec,
    })
}

/// The managed fields server-side apply records for the agent's body: one entry per applied field, the pods
/// list keyed by uid, `groups` and `weakest` atomic lists.
fn agent_fields(spec: &KeepaliveNodeReportSpec) -> Value {
    let keepalive = json!({".": {}, "f:interval": {}, "f:probes": {}, "f:time": {}});
    let mut pods = serde_json::Map::new();
    for p in &spec.pods {
        let mut f = json!({".": {}, "f:established": {}, "f:keepalive": {}, "f:readAt": {}, "f:uid": {}});
        if p.sysctls.is_some() {
            f["f:sysctls"] = keepalive.clone();
        }
        if let Some(s) = &p.sockets {
            let mut sf = json!({".": {}});
            if !s.groups.is_empty() {
                sf["f:groups"] = json!({});
            }
            if !s.weakest.is_empty() {
                sf["f:weakest"] = json!({});
            }
            f["f:sockets"] = sf;
        }
        if p.error.is_some() {
            f["f:error"] = json!({});
        }
        pods.insert(format!("k:{{\"uid\":\"{}\"}}", p.uid), f);
    }
    pods.insert(".".into(), json!({}));
    json!({"f:spec": {
        "f:connectionReading": {".": {}, "f:method": {}},
        "f:heartbeatSeconds": {}, "f:lastScan": {}, "f:nodeSysctls": keepalive,
        "f:pods": pods, "f:scanIntervalSeconds": {}, "f:unverifiedPods": {}, "f:verifiedPods": {},
    }})
}

/// Node `n`'s report as the apiserver stores it and the controller's watch receives it: stamped with its
/// Node by the controller, with the managed fields of both writers.
fn stored_report(n: usize, t: usize, spec: KeepaliveNodeReportSpec) -> KeepaliveNodeReport {
    let time = at(t);
    let entry = |manager: &str, operation: &str, fields: Value| ManagedFieldsEntry {
        api_version: Some("keepalive.dev/v1alpha1".into()),
        fields_type: Some("FieldsV1".into()),
        fields_v1: Some(FieldsV1(fields)),
        manager: Some(manager.into()),
        operation: Some(operation.into()),
        time: Some(time.clone()),
        subresource: None,
    };
    let node_uid = format!("10000000-0000-4000-8000-{n:012}");
    let owner_fields =
        json!({"f:metadata": {"f:ownerReferences": {".": {}, format!("k:{{\"uid\":\"{node_uid}\"}}"): {}}}});
    KeepaliveNodeReport {
        metadata: ObjectMeta {
            name: Some(node_name(n)),
            uid: Some(format!("20000000-0000-4000-8000-{n:012}")),
            resource_version: Some(format!("{}", 5_000_000 + t * NODES + n)),
            generation: Some(1 + t as i64),
            creation_timestamp: Some(at(0)),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: node_name(n),
                uid: node_uid,
                ..Default::default()
            }]),
            managed_fields: Some(vec![
                entry(AGENT_MANAGER, "Apply", agent_fields(&spec)),
                entry("keepalive-operator", "Update", owner_fields),
            ]),
            ..Default::default()
        },
        spec,
    }
}

/// The bytes of one watch event of node `n`'s report at heartbeat `t`, as the apiserver sends it.
fn watch_event(n: usize, t: usize) -> Vec<u8> {
    let report = stored_report(n, t, report_spec(n, t));
    let mut bytes = serde_json::to_vec(&json!({"type": "MODIFIED", "object": report})).unwrap();
    bytes.push(b'\n');
    bytes
}

/// Node `n`'s heartbeat Lease as the apiserver stores it and the controller's Lease watch receives it: the agent's
/// apply body with the metadata the apiserver adds (one managedFields entry, the agent's).
fn stored_lease(n: usize, t: usize) -> Value {
    let owner = (
        format!("keepalive-agent-{n:05x}"),
        format!("20000000-0000-4000-8000-{n:012}"),
    );
    let mut lease = lease_body(&node_name(n), Some(&owner), 3 * HEARTBEAT_SECONDS as i32, at(t).0);
    let metadata = lease["metadata"].as_object_mut().unwrap();
    metadata.insert("namespace".into(), json!("keepalive-agent"));
    metadata.insert("uid".into(), json!(format!("30000000-0000-4000-8000-{n:012}")));
    metadata.insert("resourceVersion".into(), json!(format!("{}", 1_000_000 + n * 1000 + t)));
    metadata.insert("creationTimestamp".into(), json!(at(0)));
    metadata.insert(
        "managedFields".into(),
        json!([{"manager": AGENT_MANAGER, "operation": "Apply", "apiVersion": "coordination.k8s.io/v1",
            "time": at(t), "fieldsType": "FieldsV1", "fieldsV1": {
                "f:metadata": {"f:labels": {"f:keepalive.dev/node-heartbeat": {}},
                    "f:ownerReferences": {"k:{\"uid\":\"20000000-0000-4000-8000-000000000000\"}": {}}},
                "f:spec": {"f:holderIdentity": {}, "f:leaseDurationSeconds": {}, "f:renewTime": {}}}}]),
    );
    lease
}

/// The bytes of one watch event of node `n`'s Lease renewed at heartbeat `t`.
fn lease_event(n: usize, t: usize) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(&json!({"type": "MODIFIED", "object": stored_lease(n, t)})).unwrap();
    bytes.push(b'\n');
    bytes
}

/// The controller's report-side state, fed as the status writer feeds it.
struct Controller {
    conformance: Conformance,
    reports: NodeReports,
    relist: Relist<(String, keepalive_operator::controller::node_reports::HeldReport)>,
    touched: Vec<String>,
    heartbeats: Heartbeats,
    lease_relist: Relist<(String, String)>,
}

impl Controller {
    fn handle(&mut self, event: watcher::Event<KeepaliveNodeReport>) {
        let mut index = Reports {
            reports: &mut self.reports,
            touched: &mut self.touched,
        };
        self.relist.handle(&mut index, event);
        let now = Timestamp::now();
        for name in std::mem::take(&mut self.touched) {
            self.reports.feed(&name, &mut self.conformance, now);
        }
    }

    /// One watch event from its bytes: parsed as kube's watcher parses it, then absorbed.
    fn absorb(&mut self, bytes: &[u8]) {
        match serde_json::from_slice::<WatchEvent<KeepaliveNodeReport>>(bytes).unwrap() {
            WatchEvent::Modified(report) | WatchEvent::Added(report) => {
                self.handle(watcher::Event::Apply(report));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// One heartbeat Lease watch event from its bytes, absorbed as the status writer absorbs it.
    fn beat(&mut self, bytes: &[u8]) {
        let lease = match serde_json::from_slice::<WatchEvent<Lease>>(bytes).unwrap() {
            WatchEvent::Modified(lease) | WatchEvent::Added(lease) => lease,
            other => panic!("unexpected {other:?}"),
        };
        let mut heard = Vec::new();
        let mut index = Beats {
            heartbeats: &mut self.heartbeats,
            heard: &mut heard,
        };
        self.lease_relist.handle(&mut index, watcher::Event::Apply(lease));
        let now = Timestamp::now();
        for node in heard {
            if self.reports.trust(&node) == Some(keepalive_operator::controller::node_reports::Trust::Trusted) {
                self.conformance.node_heartbeat(&node, now);
            }
        }
    }
}

/// What the status writer does on a tick: expire reports, and for each changed policy whose last write is
/// `MIN_WRITE_INTERVAL` old, build its status and the patch body. Returns how many statuses it would write.
struct Writer {
    pending: std::collections::HashSet<Arc<str>>,
    last_write: std::collections::HashMap<Arc<str>, Instant>,
    bytes: usize,
}

impl Writer {
    fn tick(&mut self, c: &mut Conformance) -> usize {
        c.expire_node_reports(Timestamp::now());
        self.pending.extend(c.take_dirty());
        let now = Instant::now();
        let min = keepalive_operator::controller::MIN_WRITE_INTERVAL;
        let due: Vec<Arc<str>> = self
            .pending
            .iter()
            .filter(|p| self.last_write.get(*p).is_none_or(|t| now.duration_since(*t) >= min))
            .cloned()
            .collect();
        let stamp = Time(Timestamp::now());
        for name in &due {
            self.pending.remove(name);
            let summary = c.summary(name).unwrap();
            let status = conformance::status(
                &summary,
                Some(1),
                ClusterFacts::default(),
                &Injection::Webhook,
                None,
                &stamp,
            );
            let patch = json!({"apiVersion": "keepalive.dev/v1alpha1", "kind": "KeepalivePolicy", "status": status});
            self.bytes += serde_json::to_vec(&patch).unwrap().len();
            self.last_write.insert(name.clone(), now);
        }
        due.len()
    }
}

fn main() {
    let with_apiserver = !std::env::args().any(|a| a == "--no-apiserver");
    println!(
        "envelope: {PODS} pods on {NODES} nodes ({PODS_PER_NODE} a node), {NAMESPACES} namespaces, {POLICIES} policies, \
         {NODES} node reports, one heartbeat per node per {HEARTBEAT_SECONDS} s, one report refresh per {REFRESH_SECONDS} s"
    );

    // 1. The pod cache, as the pod watch's initial list fills it.
    let base = rss_kib();
    let mut c = Conformance::new(ClusterFacts::default());
    c.set_heartbeats_read(true);
    c.replace_namespaces((0..NAMESPACES).map(|n| (format!("ns-{n:04}"), namespace_labels(n))));
    c.set_policies(Arc::new(policies()));
    let started = Instant::now();
    let lean: Vec<CachedPod> = (0..PODS).filter_map(|i| c.cached(synthetic_pod(i))).collect();
    c.replace_pods(lean);
    let pod_ingest = started.elapsed();
    let pods_kib = rss_kib() - base;
    let started = Instant::now();
    c.recompute_all();
    let recompute_spec_only = started.elapsed();
    c.take_dirty();

    // 2. The Nodes and the node reports, as their watches' initial lists deliver them.
    let mut ctl = Controller {
        conformance: c,
        reports: NodeReports::default(),
        relist: Relist::default(),
        touched: Vec::new(),
        heartbeats: Heartbeats::default(),
        lease_relist: Relist::default(),
    };
    ctl.reports.replace_nodes(
        (0..NODES)
            .map(|n| (node_name(n), format!("10000000-0000-4000-8000-{n:012}")))
            .collect(),
    );
    let before_reports = rss_kib();
    let started = Instant::now();
    ctl.handle(watcher::Event::Init);
    for n in 0..NODES {
        // Each object arrives as JSON and is parsed on its own (a list page is parsed as a whole, then dropped).
        let bytes = serde_json::to_vec(&stored_report(n, 0, report_spec(n, 0))).unwrap();
        let report: KeepaliveNodeReport = serde_json::from_slice(&bytes).unwrap();
        ctl.handle(watcher::Event::InitApply(report));
    }
    ctl.handle(watcher::Event::InitDone);
    let report_ingest = started.elapsed();
    let reports_kib = rss_kib() - before_reports;
    ctl.conformance.take_dirty();
    let started = Instant::now();
    ctl.conformance.recompute_all();
    let recompute_live = started.elapsed();
    ctl.conformance.take_dirty();
    let mut totals = (0, 0, 0, 0i64);
    for e in ctl.conformance.policies().entries() {
        let s = ctl.conformance.summary(&e.name).unwrap();
        totals.0 += s.matched;
        totals.1 += s.conformant;
        totals.2 += s.live_verified;
        totals.3 += s.connections.map_or(0, |c| c.classified);
        assert!(
            !s.by_reason.contains_key(&conformance::AWAITING),
            "every pod found in its node's report"
        );
    }

    // 3. One report absorbed: each node's next heartbeat, from the bytes of its watch event.
    let mut parse = Vec::with_capacity(NODES);
    let mut absorb = Vec::with_capacity(NODES);
    for n in 0..NODES {
        let bytes = watch_event(n, 1);
        let t = Instant::now();
        let event: WatchEvent<KeepaliveNodeReport> = serde_json::from_slice(&bytes).unwrap();
        parse.push(t.elapsed());
        std::hint::black_box(event);
        let t = Instant::now();
        ctl.absorb(&bytes);
        absorb.push(t.elapsed());
        let dirty = ctl.conformance.take_dirty();
        assert!(!dirty.is_empty(), "a changed report dirties its pods' policies");
    }
    parse.sort();
    absorb.sort();
    // 3b. One heartbeat absorbed: each node's Lease renewal, from the bytes of its watch event (the first relists
    // the Leases, as the Lease watch's initial list would).
    let mut beat = Vec::with_capacity(NODES);
    ctl.lease_relist.handle(
        &mut Beats {
            heartbeats: &mut ctl.heartbeats,
            heard: &mut Vec::new(),
        },
        watcher::Event::Init,
    );
    ctl.lease_relist.handle(
        &mut Beats {
            heartbeats: &mut ctl.heartbeats,
            heard: &mut Vec::new(),
        },
        watcher::Event::InitDone,
    );
    for n in 0..NODES {
        let bytes = lease_event(n, 1);
        let t = Instant::now();
        ctl.beat(&bytes);
        beat.push(t.elapsed());
    }
    beat.sort();
    assert_eq!(ctl.heartbeats.len(), NODES, "every node's Lease held");

    // 4. Steady state: 60 s of heartbeats at 83.3 reports/s with the status writer's tick, CPU per wall second.
    let mut writer = Writer {
        pending: Default::default(),
        last_write: Default::default(),
        bytes: 0,
    };
    // Per heartbeat interval every node is heard from once: HEARTBEAT / REFRESH of them by a report refresh, the
    // others by a Lease renewal.
    let interval = Duration::from_secs(HEARTBEAT_SECONDS).div_f64(NODES as f64);
    let refresh_every = (REFRESH_SECONDS / HEARTBEAT_SECONDS) as usize;
    let (mut cpu_absorb, mut cpu_parse, mut cpu_tick) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut cpu_beats = Duration::ZERO;
    let (mut absorbed, mut writes, mut event_bytes) = (0usize, 0usize, 0usize);
    let (mut beats, mut lease_bytes) = (0usize, 0usize);
    let started = Instant::now();
    let mut next_tick = started + TICK;
    while started.elapsed() < CHURN {
        let due = started + interval.mul_f64((absorbed + beats) as f64);
        if Instant::now() >= next_tick {
            let cpu = thread_cpu();
            writes += writer.tick(&mut ctl.conformance);
            cpu_tick += thread_cpu() - cpu;
            next_tick += TICK;
            continue;
        }
        if Instant::now() < due {
            std::thread::sleep((due.min(next_tick)).saturating_duration_since(Instant::now()));
            continue;
        }
        let heard = absorbed + beats;
        if heard % refresh_every != 0 {
            let bytes = lease_event(heard % NODES, 2);
            lease_bytes += bytes.len();
            let cpu = thread_cpu();
            ctl.beat(&bytes);
            cpu_beats += thread_cpu() - cpu;
            beats += 1;
            continue;
        }
        // The apiserver's part: the event's bytes (not the controller's CPU).
        let bytes = watch_event(heard % NODES, 2);
        event_bytes += bytes.len();
        let cpu = thread_cpu();
        std::hint::black_box(serde_json::from_slice::<WatchEvent<KeepaliveNodeReport>>(&bytes).unwrap());
        let mid = thread_cpu();
        ctl.absorb(&bytes);
        cpu_parse += mid - cpu;
        cpu_absorb += thread_cpu() - mid;
        absorbed += 1;
    }
    let churn_wall = started.elapsed();
    let per_s = |d: Duration| format!("{:.1} ms/s", d.as_secs_f64() * 1e3 / churn_wall.as_secs_f64());

    // 5. Sizes, as serialized.
    let pod_bytes: usize = (0..1000)
        .map(|i| serde_json::to_vec(&synthetic_pod(i * 149)).unwrap().len())
        .sum::<usize>()
        / 1000;
    let sample: Vec<usize> = (0..NODES).step_by(50).collect();
    let avg = |f: &dyn Fn(usize) -> usize| sample.iter().map(|n| f(*n)).sum::<usize>() / sample.len();
    let body_bytes = avg(&|n| serde_json::to_vec(&apply_body(n, &report_spec(n, 1))).unwrap().len());
    let stored_bytes = avg(&|n| {
        serde_json::to_vec(&stored_report(n, 1, report_spec(n, 1)))
            .unwrap()
            .len()
    });
    let spec_bytes = avg(&|n| serde_json::to_vec(&report_spec(n, 1)).unwrap().len());
    let sockets_bytes = avg(&|n| {
        report_spec(n, 1)
            .pods
            .iter()
            .map(|p| serde_json::to_vec(&p.sockets).unwrap().len())
            .sum()
    });
    let managed_bytes = avg(&|n| {
        serde_json::to_vec(&stored_report(n, 1, report_spec(n, 1)).metadata.managed_fields)
            .unwrap()
            .len()
    });
    let event_avg = event_bytes / absorbed.max(1);
    let lease_event_avg = lease_bytes / beats.max(1);
    let lease_stored = avg(&|n| serde_json::to_vec(&stored_lease(n, 1)).unwrap().len());
    let lease_body_bytes = serde_json::to_vec(&lease_body(
        &node_name(0),
        Some(&(
            "keepalive-agent-00000".into(),
            "20000000-0000-4000-8000-000000000000".into(),
        )),
        180,
        at(1).0,
    ))
    .unwrap()
    .len();
    let apiserver = with_apiserver.then(|| apiserver_sizes(&report_spec(0, 1)));

    // 6. Baseline for memory: the same reports held as whole objects (a reflector's store).
    let before_objects = rss_kib();
    let objects: Vec<KeepaliveNodeReport> = (0..NODES)
        .map(|n| serde_json::from_slice(&serde_json::to_vec(&stored_report(n, 0, report_spec(n, 0))).unwrap()).unwrap())
        .collect();
    let objects_kib = rss_kib() - before_objects;
    assert_eq!(objects.len(), NODES);
    drop(objects);

    println!(
        "judged: {} matched, {} conformant, {} live-verified, {} connections classified",
        totals.0, totals.1, totals.2, totals.3
    );
    println!("-- memory (RSS deltas, /proc/self/status)");
    xtask::bench::row("pod cache + tallies (150 000 pods)", mib(pods_kib));
    xtask::bench::row("node reports incl. socket summaries, on top", mib(reports_kib));
    xtask::bench::row("controller total", mib(pods_kib + reports_kib));
    xtask::bench::row(
        "  per pod: report entry incl. sockets",
        format!("{} B", reports_kib * 1024 / PODS as u64),
    );
    xtask::bench::row("baseline: the reports as whole objects", mib(objects_kib));
    println!("-- time");
    xtask::bench::millis("ingest of the pods (parse + lean + judge)", pod_ingest);
    xtask::bench::millis("ingest of the 5 000 reports (relist)", report_ingest);
    xtask::bench::millis("full recompute, with live readings", recompute_live);
    xtask::bench::millis("baseline: full recompute, spec only", recompute_spec_only);
    xtask::bench::row(
        "one report absorbed (event bytes → state), p50",
        micros(percentile(&absorb, 0.5)),
    );
    xtask::bench::row("one report absorbed, p99", micros(percentile(&absorb, 0.99)));
    xtask::bench::row("one report absorbed, max", micros(*absorb.last().unwrap()));
    xtask::bench::row(
        "baseline: parsing its watch event alone, p50",
        micros(percentile(&parse, 0.5)),
    );
    xtask::bench::row("baseline: parsing alone, p99", micros(percentile(&parse, 0.99)));
    xtask::bench::row(
        "one heartbeat absorbed (Lease event → state), p50",
        micros(percentile(&beat, 0.5)),
    );
    xtask::bench::row("one heartbeat absorbed, p99", micros(percentile(&beat, 0.99)));
    println!(
        "-- steady churn: {beats} heartbeats + {absorbed} reports in {:.1} s ({:.1}/s + {:.1}/s), status tick every {} ms",
        churn_wall.as_secs_f64(),
        beats as f64 / churn_wall.as_secs_f64(),
        absorbed as f64 / churn_wall.as_secs_f64(),
        TICK.as_millis()
    );
    xtask::bench::row("CPU, heartbeats absorbed (parse + state)", per_s(cpu_beats));
    xtask::bench::row("CPU, reports absorbed (parse + state)", per_s(cpu_absorb));
    xtask::bench::row("CPU, status ticks (expiry, summaries, bodies)", per_s(cpu_tick));
    xtask::bench::row("CPU, total per wall second", per_s(cpu_beats + cpu_absorb + cpu_tick));
    xtask::bench::row("baseline: CPU of parsing the events alone", per_s(cpu_parse));
    xtask::bench::row(
        "status writes due (≤ 1 per policy per 3 s)",
        format!("{:.1}/s", writes as f64 / churn_wall.as_secs_f64()),
    );
    xtask::bench::row(
        "  their bodies",
        format!("{:.1} KiB/s", writer.bytes as f64 / 1024.0 / churn_wall.as_secs_f64()),
    );
    println!("-- sizes (serde_json, averaged over 100 reports / 1 000 pods) and rates at {NODES} nodes");
    let heartbeats_per_s = NODES as f64 / HEARTBEAT_SECONDS as f64;
    let refreshes_per_s = NODES as f64 / REFRESH_SECONDS as f64;
    let leases_per_s = heartbeats_per_s - refreshes_per_s;
    xtask::bench::row("pod object", format!("{pod_bytes} B"));
    xtask::bench::row("report spec (30 pods)", format!("{spec_bytes} B"));
    xtask::bench::row("  of which socket summaries", format!("{sockets_bytes} B"));
    xtask::bench::row("agent's apply body (one write)", format!("{body_bytes} B"));
    xtask::bench::row(
        "report as stored (+ ownerRef, managedFields)",
        format!("{stored_bytes} B"),
    );
    xtask::bench::row("  of which managedFields", format!("{managed_bytes} B"));
    xtask::bench::row("watch event (as parsed above)", format!("{event_avg} B"));
    xtask::bench::row("heartbeat Lease: agent's apply body", format!("{lease_body_bytes} B"));
    xtask::bench::row("heartbeat Lease as stored", format!("{lease_stored} B"));
    xtask::bench::row("  its watch event", format!("{lease_event_avg} B"));
    if let Some(Ok((body, stored, managed, lease))) = &apiserver {
        let model = stored_report(0, 1, report_spec(0, 1));
        xtask::bench::row("real apiserver: node-0000's apply body", format!("{body} B"));
        xtask::bench::row("real apiserver: node-0000 as stored (GET)", format!("{stored} B"));
        xtask::bench::row(
            "  in-process model of the same",
            format!("{} B", serde_json::to_vec(&model).unwrap().len()),
        );
        xtask::bench::row("real apiserver: its managedFields", format!("{managed} B"));
        let model_managed = serde_json::to_vec(&model.metadata.managed_fields).unwrap().len();
        xtask::bench::row("  in-process model of the same", format!("{model_managed} B"));
        xtask::bench::row(
            "real apiserver: node-0000's Lease as stored (GET)",
            format!("{lease} B"),
        );
    } else if let Some(Err(e)) = &apiserver {
        println!("(no apiserver check: {e})");
    }
    let stored_per_5_min = |reports: f64, leases: f64| {
        format!(
            "{:.0} MiB",
            300.0 * (reports * stored_bytes as f64 + leases * lease_stored as f64) / 1048576.0
        )
    };
    xtask::bench::row(
        "agent writes (steady: nothing changed)",
        format!("{leases_per_s:.1} Lease + {refreshes_per_s:.1} report req/s"),
    );
    xtask::bench::row(
        "  write bodies into the apiserver",
        format!(
            "{:.3} MiB/s",
            (leases_per_s * lease_body_bytes as f64 + refreshes_per_s * body_bytes as f64) / 1048576.0
        ),
    );
    let watch_now = leases_per_s * lease_event_avg as f64 + refreshes_per_s * event_avg as f64;
    let watch_before = heartbeats_per_s * event_avg as f64;
    xtask::bench::row(
        "controller's report + Lease watches",
        format!("{:.3} MiB/s", watch_now / 1048576.0),
    );
    xtask::bench::row(
        "  stored per 5 min of history (compaction)",
        stored_per_5_min(refreshes_per_s, leases_per_s),
    );
    xtask::bench::row(
        "baseline: every heartbeat a report rewrite",
        format!("{heartbeats_per_s:.1} report req/s"),
    );
    xtask::bench::row(
        "  write bodies into the apiserver",
        format!("{:.2} MiB/s", heartbeats_per_s * body_bytes as f64 / 1048576.0),
    );
    xtask::bench::row(
        "  controller's report watch",
        format!("{:.2} MiB/s", watch_before / 1048576.0),
    );
    xtask::bench::row(
        "  stored per 5 min of history (compaction)",
        stored_per_5_min(heartbeats_per_s, 0.0),
    );
    xtask::bench::row(
        "watch bytes/s: heartbeat Lease vs baseline",
        format!("{:.3}×", watch_now / watch_before),
    );
    xtask::bench::row(
        "initial list: reports / pods",
        format!(
            "{:.0} / {:.0} MiB",
            (NODES * stored_bytes) as f64 / 1048576.0,
            (PODS * pod_bytes) as f64 / 1048576.0
        ),
    );
    let mib_total = (pods_kib + reports_kib) as f64 / 1024.0;
    let p99 = percentile(&absorb, 0.99);
    println!(
        "targets: controller RSS ≤ 200 MiB: {} ({mib_total:.1}); full recompute ≤ 1 s: {} ({:.0} ms); one report \
         absorbed ≤ 1 ms: {} (p99 {:.2} ms)",
        if mib_total <= 200.0 { "met" } else { "MISSED" },
        if recompute_live <= Duration::from_secs(1) {
            "met"
        } else {
            "MISSED"
        },
        recompute_live.as_secs_f64() * 1e3,
        if p99 <= Duration::from_millis(1) {
            "met"
        } else {
            "MISSED"
        },
        p99.as_secs_f64() * 1e3,
    );
}

/// One report written through a real apiserver as the agent writes it (server-side apply, its field manager),
/// then stamped with its Node as the controller stamps it (JSON patch): the apply body's size and the object's
/// size as the apiserver stores and serves it.
fn apiserver_sizes(spec: &KeepaliveNodeReportSpec) -> Result<(usize, usize, usize, usize), String> {
    use kube::{
        Api,
        api::{Patch, PatchParams},
    };
    let cp = xtask::ControlPlane::start().map_err(|e| format!("control plane: {e:#}"))?;
    cp.install_crds().map_err(|e| format!("CRDs: {e:#}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = cp.client().await.map_err(|e| format!("client: {e:#}"))?;
        let api: Api<KeepaliveNodeReport> = Api::all(client.clone());
        let body = apply_body(0, spec);
        let written = api
            .patch(
                &node_name(0),
                &PatchParams::apply(AGENT_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map_err(|e| format!("apply: {e}"))?;
        let patch: json_patch::Patch = serde_json::from_value(json!([
            {"op": "test", "path": "/metadata/uid", "value": written.metadata.uid},
            {"op": "add", "path": "/metadata/ownerReferences", "value": [{
                "apiVersion": "v1", "kind": "Node", "name": node_name(0), "uid": "10000000-0000-4000-8000-000000000000",
            }]},
        ]))
        .unwrap();
        api.patch(&node_name(0), &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
            .map_err(|e| format!("stamp: {e}"))?;
        // The agent's next heartbeat, over the stamped object.
        api.patch(
            &node_name(0),
            &PatchParams::apply(AGENT_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|e| format!("apply: {e}"))?;
        let request = hyper::Request::get(format!(
            "/apis/keepalive.dev/v1alpha1/keepalivenodereports/{}",
            node_name(0)
        ))
        .body(Vec::new())
        .unwrap();
        let text = client.request_text(request).await.map_err(|e| format!("get: {e}"))?;
        let stored: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        let managed = serde_json::to_vec(&stored["metadata"]["managedFields"]).unwrap().len();
        // The heartbeat Lease, applied twice as the agent renews it.
        let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
        let owner = (
            "keepalive-agent-00000".to_string(),
            "20000000-0000-4000-8000-000000000000".to_string(),
        );
        for t in 1..=2 {
            let lease = lease_body(&node_name(0), Some(&owner), 180, at(t).0);
            leases
                .patch(
                    &node_name(0),
                    &PatchParams::apply(AGENT_MANAGER).force(),
                    &Patch::Apply(&lease),
                )
                .await
                .map_err(|e| format!("lease: {e}"))?;
        }
        let request = hyper::Request::get(format!(
            "/apis/coordination.k8s.io/v1/namespaces/default/leases/{}",
            node_name(0)
        ))
        .body(Vec::new())
        .unwrap();
        let lease = client
            .request_text(request)
            .await
            .map_err(|e| format!("get lease: {e}"))?;
        Ok((
            serde_json::to_vec(&body).unwrap().len(),
            text.trim_end().len(),
            managed,
            lease.trim_end().len(),
        ))
    })
}
