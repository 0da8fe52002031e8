//! The node agent as a real process against the real apiserver: pod objects bound to a test node, each backed
//! by a real network namespace placed in a kubelet-style cgroup for the pod's UID; the node report shows exactly
//! the values and connection counts of each, an unreadable pod as unverified, and forgets pods that are gone.

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::Pod;
use keepalive_operator::api::{KeepaliveNodeReport, LiveKeepalive};
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

    let log = cp.work_dir().join("agent.log");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_keepalive-operator"));
    // A process in the host's network namespace stands in for the node's init.
    let host_process = HostProcess(
        std::process::Command::new("sleep")
            .arg("600")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let node_pid = format!("--node-netns-pid={}", host_process.0.id());
    cmd.args([
        "agent",
        "--node-name=node-under-test",
        "--scan-interval-seconds=1",
        &node_pid,
    ])
    .env("KUBECONFIG", cp.kubeconfig());
    let agent = xtask::cluster::spawn_logged(cmd, &log).unwrap();

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
    xtask::cluster::kill(agent);
    drop(host_process);
}

/// Killed on drop, also when the test fails.
struct HostProcess(std::process::Child);

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
