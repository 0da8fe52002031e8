//! The node agent as a real process against the real apiserver: pod objects bound to a test node, each backed
//! by a real network namespace placed in a kubelet-style cgroup for the pod's UID; the node report shows exactly
//! the values and connection counts of each, an unreadable pod as unverified, and forgets pods that are gone.

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::Pod;
use keepalive_operator::api::{KeepaliveNodeReport, KeepalivePolicy, KeepalivePolicyStatus, LiveKeepalive};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use serde_json::json;
use xtask::sandbox::{Layout, Sandbox};

#[tokio::test]
async fn the_node_report_shows_live_values_and_connections() {
    let cp = control_plane();
    let client = cp.client().await.unwrap();
    namespace(&client, "agent-test", &[]).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "agent-test");
    let mut uids = Vec::new();
    for name in ["tuned", "default", "no-process"] {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": name},
            "spec": {"nodeName": "node-under-test", "containers": [{"name": "c", "image": "x"}]}}))
        .unwrap();
        uids.push(
            pods.create(&PostParams::default(), &pod)
                .await
                .unwrap()
                .metadata
                .uid
                .unwrap(),
        );
    }
    // kubelet would have started them: phase Running (a Pending pod without a process yet is not reported).
    for name in ["tuned", "default", "no-process"] {
        mark_running(&pods, name).await;
    }
    // A pod of another node is not this agent's business.
    let other: Pod = serde_json::from_value(
        json!({"metadata": {"name": "elsewhere"}, "spec": {"nodeName": "other-node", "containers": [{"name": "c", "image": "x"}]}}),
    )
    .unwrap();
    pods.create(&PostParams::default(), &other).await.unwrap();

    let tuned = Sandbox::new("tuned", &uids[0], Layout::CgroupfsBurstable, Some((20, 5, 3)));
    let default = Sandbox::new("default", &uids[1], Layout::SystemdBestEffort, None);
    let _tuned_conns = tuned.connect(2, 1);
    let _default_conns = default.connect(0, 2);

    let agent = Agent::start(cp, "node-under-test");

    let reports: Api<KeepaliveNodeReport> = Api::all(client.clone());
    let report = eventually(
        Duration::from_secs(30),
        "the node report with all three pods",
        || async {
            let r = reports.get_opt("node-under-test").await.ok()??;
            (r.spec.pods.len() == 3 && r.spec.verified_pods == 2).then_some(r)
        },
    )
    .await;
    let by_name = |n: &str| report.spec.pods.iter().find(|p| p.name == n).unwrap().clone();
    let t = by_name("tuned");
    assert_eq!(t.uid, uids[0]);
    assert_eq!(
        t.sysctls,
        Some(LiveKeepalive {
            time: 20,
            interval: 5,
            probes: 3
        })
    );
    assert_eq!((t.established, t.keepalive), (6, 2));
    let d = by_name("default");
    assert_eq!(
        d.sysctls,
        Some(LiveKeepalive {
            time: 7200,
            interval: 75,
            probes: 9
        })
    );
    assert_eq!((d.established, d.keepalive), (4, 0));
    let n = by_name("no-process");
    assert_eq!(n.sysctls, None);
    assert!(n.error.as_deref().unwrap().contains("no process"), "{n:?}");
    assert_eq!(report.spec.unverified_pods, 1);
    let host = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_keepalive_time").unwrap();
    assert_eq!(
        report.spec.node_sysctls.map(|v| v.time.to_string()),
        Some(host.trim().to_string())
    );
    assert!(report.spec.pods.iter().all(|p| p.name != "elsewhere"));
    // Probes and metrics of the agent.
    assert_eq!(
        xtask::cluster::http_get(agent.admin_port, "/readyz").map(|(c, _)| c),
        Some(200)
    );
    let (_, metrics) = xtask::cluster::http_get(agent.admin_port, "/metrics").unwrap();
    for line in [
        "keepalive_agent_pods{state=\"verified\"} 2",
        "keepalive_agent_pods{state=\"unverified\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    assert!(
        metrics.contains("keepalive_agent_scan_duration_seconds_count"),
        "{metrics}"
    );
    assert!(
        metrics.contains("keepalive_agent_report_writes_total{outcome=\"written\"}"),
        "{metrics}"
    );

    // A pod that is gone disappears from the report.
    // No kubelet confirms a graceful deletion here: delete at once.
    pods.delete("no-process", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the deleted pod to leave the report",
        || async {
            let r = reports.get_opt("node-under-test").await.ok()??;
            (r.spec.pods.len() == 2).then_some(())
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
    let agent = Agent::start(cp, "live-chain-node");

    let s = status("one pod live-verified, one LiveMismatch", |s| {
        s.live_verified_pods == Some(1) && s.violation_counts.get("LiveMismatch") == Some(&1)
    })
    .await;
    assert_eq!((s.matched_pods, s.conformant_pods), (Some(2), Some(1)));
    assert_eq!(s.violations.len(), 1);
    let v = &s.violations[0];
    assert_eq!(
        (v.namespace.as_str(), v.name.as_str(), v.reason.as_str()),
        ("live-differs", "app", "LiveMismatch")
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
            keepalive: 3
        })
    );
    let report = Api::<KeepaliveNodeReport>::all(client.clone())
        .get("live-chain-node")
        .await
        .unwrap();
    let live = |name: &str| report.spec.pods.iter().find(|p| p.uid == name).unwrap().sysctls;
    assert_eq!(live("live-agrees").map(|v| v.time), Some(20));
    assert_eq!(live("live-differs").map(|v| v.time), Some(7200));

    // The real kubectl shows it.
    let out = cp.kubectl_output(&["get", "kap", "live-chain"]).unwrap();
    let row: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[5..9], ["2", "1", "1", "3/10"], "{out}");

    // The pod whose processes vanished: unverified, not conformant on spec alone.
    drop(good_conns);
    drop(good);
    let s = status("the vanished pod unverified", |s| {
        s.violation_counts.get("Unverified") == Some(&1)
    })
    .await;
    assert_eq!((s.conformant_pods, s.live_verified_pods), (Some(0), Some(0)));
    let v = s.violations.iter().find(|v| v.reason == "Unverified").unwrap();
    assert!(v.message.contains("no process"), "{}", v.message);
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

/// `keepalive-operator agent` for `node` as a real process, scanning every second. Killed on drop.
struct Agent {
    _process: HostProcess,
    admin_port: u16,
    // A process in the host's network namespace stands in for the node's init.
    host_process: std::process::Child,
}

impl Agent {
    fn start(cp: &xtask::ControlPlane, node: &str) -> Agent {
        let host_process = std::process::Command::new("sleep")
            .arg("600")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let admin_port = xtask::cluster::free_port().unwrap();
        let args = [
            "agent".to_string(),
            "--scan-interval-seconds=1".to_string(),
            format!("--node-name={node}"),
            format!("--admin-listen=127.0.0.1:{admin_port}"),
            format!("--node-netns-pid={}", host_process.id()),
        ];
        Agent {
            _process: HostProcess::spawn(cp, &format!("agent-{node}"), &args, cp.kubeconfig()),
            admin_port,
            host_process,
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.host_process.kill();
        let _ = self.host_process.wait();
    }
}
