//! The node agent as a real process against the real apiserver: pods found by their kubelet-style cgroups alone
//! (the agent reads no Pod objects), each a real network namespace; the node report shows exactly the values and
//! connection counts of each by UID, and forgets pods whose processes are gone.

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::Pod;
use keepalive_operator::api::{
    ConnectionMethod, KeepaliveNodeReport, KeepalivePolicy, KeepalivePolicyStatus, KeepaliveSource, LiveKeepalive,
};
use kube::{Api, api::DeleteParams};
use serde_json::json;
use xtask::sandbox::{Layout, Sandbox};

#[tokio::test]
async fn the_node_report_shows_live_values_and_connections() {
    let cp = control_plane();
    let client = cp.client().await.unwrap();
    // The agent reads no Pod objects: it finds pods by the UID of their cgroups. Other pods of this host (other
    // tests' sandboxes) are in the report too; this test looks at its own by UID.
    let uid = |n: u32| format!("{:08x}-a9e7-4000-8000-{n:012x}", std::process::id());
    let tuned = Sandbox::new("tuned", &uid(1), Layout::CgroupfsBurstable, Some((20, 5, 3)));
    let default = Sandbox::new("default", &uid(2), Layout::SystemdBestEffort, None);
    let mut leaving = Sandbox::new("leaving", &uid(3), Layout::CgroupfsGuaranteed, Some((50, 5, 5)));
    let _tuned_conns = tuned.connect(2, 1);
    let _default_conns = default.connect(0, 2);

    // A controller of another test of this binary deletes reports of nodes that do not exist.
    node_object(cp, "node-under-test");
    let agent = Agent::start(cp, "node-under-test");

    let reports: Api<KeepaliveNodeReport> = Api::all(client.clone());
    let ours = [uid(1), uid(2), uid(3)];
    let report = eventually(
        Duration::from_secs(30),
        "the node report with the three pods read",
        || async {
            let r = reports.get_opt("node-under-test").await.ok()??;
            let read = r
                .spec
                .pods
                .iter()
                .filter(|p| ours.contains(&p.uid) && p.sysctls.is_some())
                .count();
            (read == 3).then_some(r)
        },
    )
    .await;
    let by_uid = |u: &str| report.spec.pods.iter().find(|p| p.uid == u).unwrap().clone();
    let t = by_uid(&tuned.uid);
    assert_eq!(
        t.sysctls,
        Some(LiveKeepalive {
            time: 20,
            interval: 5,
            probes: 3
        })
    );
    assert_eq!((t.established, t.keepalive, t.error), (6, 2, None));
    // Read socket by socket: the two armed clients follow the namespace's sysctls; the plain client and the three
    // server ends have no SO_KEEPALIVE.
    let reading = report.spec.connection_reading.clone().unwrap();
    assert_eq!((reading.method, reading.message), (ConnectionMethod::PerSocket, None));
    let groups: Vec<(i32, bool, KeepaliveSource, i32, i32, i32)> = t
        .sockets
        .as_ref()
        .unwrap()
        .groups
        .iter()
        .map(|g| {
            (
                g.connections,
                g.keepalive,
                g.idle_from,
                g.idle_seconds,
                g.interval_seconds,
                g.probes,
            )
        })
        .collect();
    assert_eq!(
        groups,
        [
            (4, false, KeepaliveSource::Sysctl, 0, 0, 0),
            (2, true, KeepaliveSource::Sysctl, 20, 5, 3)
        ]
    );
    let d = by_uid(&default.uid);
    assert_eq!(
        d.sysctls,
        Some(LiveKeepalive {
            time: 7200,
            interval: 75,
            probes: 9
        })
    );
    assert_eq!((d.established, d.keepalive), (4, 0));
    assert_eq!(by_uid(&leaving.uid).sysctls.map(|v| v.time), Some(50));
    assert_eq!(report.spec.scan_interval_seconds, 1);
    assert!(
        report.spec.pods.windows(2).all(|w| w[0].uid < w[1].uid),
        "sorted by UID"
    );
    let host = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_keepalive_time").unwrap();
    assert_eq!(
        report.spec.node_sysctls.map(|v| v.time.to_string()),
        Some(host.trim().to_string())
    );
    // Probes and metrics of the agent.
    assert_eq!(
        xtask::cluster::http_get(agent.admin_port, "/readyz").map(|(c, _)| c),
        Some(200)
    );
    let (_, metrics) = xtask::cluster::http_get(agent.admin_port, "/metrics").unwrap();
    let verified: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keepalive_agent_pods{state=\"verified\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(verified >= 3.0, "{metrics}");
    for name in [
        "keepalive_agent_scan_duration_seconds_count",
        "keepalive_agent_report_writes_total{outcome=\"written\"}",
        "keepalive_agent_pods_over_budget{budget=\"sockets\"} 0",
        "keepalive_agent_scans_over_deadline_total",
        "keepalive_agent_per_socket 1",
    ] {
        assert!(metrics.contains(name), "{name} in\n{metrics}");
    }

    // A pod whose processes are gone disappears from the report.
    leaving.kill_process();
    eventually(
        Duration::from_secs(30),
        "the pod without processes to leave the report",
        || async {
            let r = reports.get_opt("node-under-test").await.ok()??;
            r.spec.pods.iter().all(|p| p.uid != uid(3)).then_some(())
        },
    )
    .await;
    drop(agent);
}

/// The whole chain: the webhook injects the policy's values into pods bound to a node, the agent reads what the
/// kernel holds in each pod's namespace, and the controller joins both in the policy status — conformant and
/// live-verified where the kernel agrees, `LiveMismatch` where it does not, with the connection coverage.
#[tokio::test]
async fn policy_status_joins_the_live_readings() {
    let cp = control_plane();
    let client = cp.client().await.unwrap();
    if Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .get_opt("keepalive-system")
        .await
        .unwrap()
        .is_none()
    {
        namespace(&client, "keepalive-system", &[]).await;
    }
    let dir = cp.work_dir().join("live-chain");
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = write_serving_cert(&dir);
    let op = Operator::start(
        cp,
        "live-chain",
        &[
            "--lease-name=live-chain",
            "--namespace=keepalive-system",
            &format!("--tls-cert-file={}", cert.display()),
            &format!("--tls-key-file={}", key.display()),
        ],
    );
    register_webhook(&client, "keepalive-live-chain", &op.url(), Some(&ca), "live-chain").await;
    for ns in ["live-agrees", "live-differs"] {
        namespace(&client, ns, &[("scope", "live-chain"), ("test", "live-chain")]).await;
    }
    create_policy(
        &client,
        "live-chain",
        json!({"namespaceSelector": {"matchLabels": {"test": "live-chain"}},
               "keepalive": {"time": 20, "interval": 5, "probes": 3}}),
    )
    .await;
    // Pods are created once the webhook knows the policy, bound to the test node.
    let bound = json!({"spec": {"nodeName": "live-chain-node"}});
    let agrees = eventually(Duration::from_secs(15), "a mutated pod", || async {
        let pod = create_pod(&client, "live-agrees", "app", bound.clone()).await.ok()?;
        if sysctls(&pod) == keepalive(20, 5, 3) {
            return Some(pod);
        }
        Api::<Pod>::namespaced(client.clone(), "live-agrees")
            .delete("app", &DeleteParams::default().grace_period(0))
            .await
            .ok()?;
        None
    })
    .await;
    let differs = create_pod(&client, "live-differs", "app", bound.clone()).await.unwrap();
    for ns in ["live-agrees", "live-differs"] {
        mark_running(&Api::namespaced(client.clone(), ns), "app").await;
    }
    assert_eq!(sysctls(&differs), keepalive(20, 5, 3), "both pods are mutated");

    // Before any agent runs on the node, the spec is all there is: both conform.
    let policies: Api<KeepalivePolicy> = Api::all(client.clone());
    let status = |what: &'static str, check: fn(&KeepalivePolicyStatus) -> bool| {
        let policies = policies.clone();
        async move {
            eventually(Duration::from_secs(30), what, || async {
                policies.get("live-chain").await.ok()?.status.filter(check)
            })
            .await
        }
    };
    status("both pods conformant by spec", |s| s.conformant_pods == Some(2)).await;

    // The kernel: one namespace holds the injected values, the other (say, the runtime dropped them) the
    // defaults. Each holds connections with and without SO_KEEPALIVE.
    let uid = |p: &Pod| p.metadata.uid.clone().unwrap();
    let good = Sandbox::new("live-ok", &uid(&agrees), Layout::CgroupfsBurstable, Some((20, 5, 3)));
    let bad = Sandbox::new("live-bad", &uid(&differs), Layout::SystemdBestEffort, None);
    let good_conns = good.connect(2, 1);
    let _bad_conns = bad.connect(1, 1);
    // The controller trusts a report only for an existing Node (and stamps it with that Node's UID).
    node_object(cp, "live-chain-node");
    let agent = Agent::start(cp, "live-chain-node");

    // The agrees pod holds the values, but four of its sockets (the plain client, the three server ends) have no
    // SO_KEEPALIVE: its connections are not all protected.
    let s = status("one pod live-verified, one LiveMismatch", |s| {
        s.live_verified_pods == Some(1)
            && s.violation_counts.get("LiveMismatch") == Some(&1)
            && s.violation_counts.get("ConnectionsUnprotected") == Some(&1)
    })
    .await;
    assert_eq!((s.matched_pods, s.conformant_pods), (Some(2), Some(0)));
    assert_eq!(s.violations.len(), 2);
    let v = &s.violations[1];
    assert_eq!(
        (v.namespace.as_str(), v.name.as_str(), v.reason.as_str()),
        ("live-differs", "app", "LiveMismatch")
    );
    let unprotected = &s.violations[0];
    assert_eq!(
        (unprotected.namespace.as_str(), unprotected.reason.as_str()),
        ("live-agrees", "ConnectionsUnprotected")
    );
    assert!(
        unprotected.message.starts_with(
            "4 of 6 connections will not send a keepalive probe before the policy's keepalive time of 20 s"
        ) && unprotected.message.contains("from sleep has no SO_KEEPALIVE"),
        "{}",
        unprotected.message
    );
    assert!(
        v.message.contains("net.ipv4.tcp_keepalive_time=7200 (policy: 20)") && v.message.contains("live-chain-node"),
        "{}",
        v.message
    );
    // Loopback: both ends of each connection are in the pod's namespace; only the client side arms keepalive.
    assert_eq!(
        s.connections,
        Some(keepalive_operator::api::ConnectionCounts {
            established: 10,
            keepalive: 3,
            classified: 10,
            protected: 2,
            protected_by_app: 0,
            armed_too_late: 1,
            unarmed: 7,
            user_timeout: 0,
            // The differing pod's armed client: 7200 + 75 × 9.
            worst_dead_peer_seconds: Some(7875),
        })
    );
    let report = Api::<KeepaliveNodeReport>::all(client.clone())
        .get("live-chain-node")
        .await
        .unwrap();
    let live = |pod: &Pod| {
        let uid = uid(pod);
        report.spec.pods.iter().find(|p| p.uid == uid).unwrap().sysctls
    };
    assert_eq!(live(&agrees).map(|v| v.time), Some(20));
    assert_eq!(live(&differs).map(|v| v.time), Some(7200));

    // The real kubectl shows it.
    let out = cp.kubectl_output(&["get", "kap", "live-chain"]).unwrap();
    let row: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[5..10], ["2", "0", "1", "3/10", "2/10"], "{out}");

    // The pod whose processes vanished has no entry in the report any more: not conformant on spec alone, not
    // live-verified (the controller names the reason for a pod without a reading).
    drop(good_conns);
    drop(good);
    let s = status("the vanished pod neither conformant nor verified", |s| {
        s.conformant_pods == Some(0) && s.live_verified_pods == Some(0)
    })
    .await;
    assert!(
        s.violations
            .iter()
            .any(|v| (v.namespace.as_str(), v.name.as_str()) == ("live-agrees", "app")),
        "{:?}",
        s.violations
    );
    drop(agent);
    drop(bad);
}

/// Sets the pod's phase to Running through the status subresource, as kubelet does once its sandbox is up.
async fn mark_running(pods: &Api<Pod>, name: &str) {
    pods.patch_status(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"status": {"phase": "Running"}})),
    )
    .await
    .unwrap();
}
