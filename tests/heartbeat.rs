//! The heartbeat Lease against the real apiserver: the real agent renews a small Lease named after its node and
//! rewrites its node report only when a reading changed; the controller keeps a report fresh while its agent
//! renews the Lease and judges the node's pods by their spec once the renewals stop. Its own binary: no other
//! test's operator judges these policies, no other test's sandbox changes what the agent reads.

mod common;

use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Pod};
use keepalive_operator::api::{HEARTBEAT_LABEL, KeepaliveNodeReport, KeepalivePolicy};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::json;

/// The heartbeat Lease: an agent rewrites its report only when a reading changed and otherwise renews a small
/// Lease named after its node. The controller (told the agents' namespace) keeps the report fresh while the Lease
/// is renewed — long past three heartbeats after the report — and judges the node's pods by their spec once the
/// renewals stop for three heartbeats; a renewed Lease of a node whose report it does not trust changes nothing.
#[tokio::test]
async fn a_node_report_stays_fresh_while_its_agent_renews_its_lease() {
    let cp = control_plane();
    let client = cp.client().await.unwrap();
    ensure_namespace(&client, "keepalive-system").await;
    ensure_namespace(&client, "hb-agents").await;
    let dir = cp.work_dir().join("heartbeat");
    std::fs::create_dir_all(&dir).unwrap();
    let (_ca, cert, key) = write_serving_cert(&dir);
    let _op = Operator::start(
        cp,
        "heartbeat",
        &[
            "--lease-name=heartbeat",
            "--namespace=keepalive-system",
            &format!("--tls-cert-file={}", cert.display()),
            &format!("--tls-key-file={}", key.display()),
            "--agent-namespace=hb-agents",
        ],
    );
    node_object(cp, "hb-a");
    namespace(&client, "heartbeat", &[("test", "heartbeat")]).await;
    create_policy(
        &client,
        "heartbeat",
        json!({"namespaceSelector": {"matchLabels": {"test": "heartbeat"}}, "mode": "Audit",
               "keepalive": {"time": 30, "interval": 5, "probes": 3}}),
    )
    .await;
    let pod = create_pod(
        &client,
        "heartbeat",
        "p",
        json!({"spec": {"nodeName": "hb-a", "securityContext": {"sysctls": [
            {"name": "net.ipv4.tcp_keepalive_time", "value": "30"},
            {"name": "net.ipv4.tcp_keepalive_intvl", "value": "5"},
            {"name": "net.ipv4.tcp_keepalive_probes", "value": "3"}]}}}),
    )
    .await
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "heartbeat");
    pods.patch_status(
        "p",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running"}})),
    )
    .await
    .unwrap();

    // One report, written once: heartbeat 1 s, refresh an hour.
    let reports: Api<KeepaliveNodeReport> = Api::all(client.clone());
    let report = json!({"apiVersion": "keepalive.dev/v1alpha1", "kind": "KeepaliveNodeReport",
        "metadata": {"name": "hb-a"},
        "spec": {"lastScan": "2026-01-01T00:00:00Z", "heartbeatSeconds": 1, "refreshSeconds": 3600,
                 "scanIntervalSeconds": 1, "verifiedPods": 1, "pods": [
                     {"uid": pod.metadata.uid.clone().unwrap(), "sysctls": {"time": 30, "interval": 5, "probes": 3},
                      "established": 1, "keepalive": 1, "readAt": "2026-01-01T00:00:00Z"}]}});
    reports
        .patch(
            "hb-a",
            &PatchParams::apply("keepalive-agent").force(),
            &Patch::Apply(&report),
        )
        .await
        .unwrap();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "hb-agents");
    let renew = |node: &'static str| {
        let leases = leases.clone();
        async move {
            let lease =
                keepalive_operator::agent::heartbeat::lease_body(node, None, 3, k8s_openapi::jiff::Timestamp::now());
            leases
                .patch(
                    node,
                    &PatchParams::apply("keepalive-agent").force(),
                    &Patch::Apply(&lease),
                )
                .await
                .unwrap();
        }
    };
    renew("hb-a").await;
    status_where(&client, "heartbeat", "the pod live-verified", |s| {
        s.live_verified_pods == Some(1)
    })
    .await;
    let written = reports.get("hb-a").await.unwrap().metadata.resource_version;

    // Eight seconds of renewals every half second, the report untouched: it stays fresh all along.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        renew("hb-a").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = Api::<KeepalivePolicy>::all(client.clone())
            .get("heartbeat")
            .await
            .unwrap()
            .status
            .unwrap();
        assert_eq!(
            s.live_verified_pods,
            Some(1),
            "still fresh {:?} after the report",
            started.elapsed()
        );
    }
    assert_eq!(reports.get("hb-a").await.unwrap().metadata.resource_version, written);
    let lease = leases.get("hb-a").await.unwrap();
    assert_eq!(lease.metadata.labels.unwrap()[HEARTBEAT_LABEL], "true");

    // The renewals stop: after three heartbeats the pod is judged by its spec (conformant, not live-verified).
    let stopped = Instant::now();
    let s = status_where(&client, "heartbeat", "the report stale without renewals", |s| {
        s.live_verified_pods == Some(0)
    })
    .await;
    assert!(stopped.elapsed() >= Duration::from_secs(2), "{:?}", stopped.elapsed());
    assert_eq!(counts(&s), (1, 1));
    // The agent is back, renewing: fresh again.
    let policies: Api<KeepalivePolicy> = Api::all(client.clone());
    eventually(Duration::from_secs(30), "fresh again once renewals resume", || async {
        renew("hb-a").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = policies.get("heartbeat").await.ok()?.status?;
        (s.live_verified_pods == Some(1)).then_some(())
    })
    .await;

    // A node without a report: its Lease is nothing.
    renew("hb-ghost").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = Api::<KeepalivePolicy>::all(client.clone())
        .get("heartbeat")
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(counts(&s), (1, 1));
    reports.delete("hb-a", &DeleteParams::default()).await.unwrap();
}

/// The real agent with a heartbeat Lease (heartbeat 2 s, refresh an hour): it writes its report once, then only
/// renews its Lease while nothing but connection counts changes, and writes the report again at the next
/// scan once a pod leaves.
#[tokio::test]
async fn the_agent_renews_its_lease_and_writes_its_report_only_on_a_change() {
    use xtask::sandbox::{Layout, Sandbox};

    let cp = control_plane();
    let client = cp.client().await.unwrap();
    ensure_namespace(&client, "hb-agent-leases").await;
    let uid = |n: u32| format!("{:08x}-b1e7-4000-8000-{n:012x}", std::process::id());
    let staying = Sandbox::new("staying", &uid(1), Layout::CgroupfsBurstable, Some((20, 5, 3)));
    let mut leaving = Sandbox::new("leaving", &uid(2), Layout::SystemdBestEffort, None);
    let _connections = staying.connect(2, 1);
    // The operator of the other test deletes reports of nodes that do not exist.
    node_object(cp, "hb-node");
    let agent = Agent::start_with(
        cp,
        "hb-node",
        &[
            "--heartbeat-seconds=2",
            "--refresh-seconds=3600",
            "--lease-namespace=hb-agent-leases",
        ],
    );
    let reports: Api<KeepaliveNodeReport> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "hb-agent-leases");
    let renewed = || async {
        let lease = leases.get_opt("hb-node").await.ok()??;
        serde_json::to_string(&lease.spec?.renew_time?).ok()
    };
    // The first report with both pods read, then a first renewal: the scans since found nothing to write.
    let report = eventually(Duration::from_secs(30), "the report with both pods read", || async {
        let r = reports.get_opt("hb-node").await.ok()??;
        let read = r
            .spec
            .pods
            .iter()
            .filter(|p| (p.uid == uid(1) || p.uid == uid(2)) && p.sysctls.is_some());
        (read.count() == 2).then_some(r)
    })
    .await;
    assert_eq!(
        (report.spec.heartbeat_seconds, report.spec.refresh_seconds),
        (2, Some(3600))
    );
    let first = eventually(Duration::from_secs(30), "the heartbeat Lease", renewed).await;
    let lease = leases.get("hb-node").await.unwrap();
    assert_eq!(lease.metadata.labels.as_ref().unwrap()[HEARTBEAT_LABEL], "true");
    let spec = lease.spec.unwrap();
    assert_eq!(
        (spec.holder_identity.as_deref(), spec.lease_duration_seconds),
        (Some("hb-node"), Some(6))
    );

    // Nine seconds with nothing new but one more connection of a kind the pod has already: the Lease renewed
    // every 2 s, the report not rewritten (counts alone wait for the refresh).
    let written = reports.get("hb-node").await.unwrap().metadata.resource_version;
    let _more = staying.connect(1, 0);
    let mut seen = vec![first];
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(9) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = renewed().await.unwrap();
        if seen.last() != Some(&now) {
            seen.push(now);
        }
    }
    assert!((4..=6).contains(&seen.len()), "renewals seen in 9 s: {seen:?}");
    assert_eq!(
        reports.get("hb-node").await.unwrap().metadata.resource_version,
        written,
        "the report untouched while only the Lease is renewed"
    );
    let (_, metrics) = xtask::cluster::http_get(agent.admin_port, "/metrics").unwrap();
    let renewals: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keepalive_agent_heartbeats_total{outcome=\"written\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(renewals >= 4.0, "{metrics}");

    // A pod leaves: the report is rewritten at the next scans, long before the refresh.
    leaving.kill_process();
    let started = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the report without the pod that left",
        || async {
            let r = reports.get_opt("hb-node").await.ok()??;
            r.spec.pods.iter().all(|p| p.uid != uid(2)).then_some(())
        },
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    drop(agent);
    reports.delete("hb-node", &DeleteParams::default()).await.unwrap();
}
