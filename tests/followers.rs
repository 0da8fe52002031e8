//! Only the leader watches pods: a replica that does not lead holds policies and namespaces only, so its memory
//! does not grow with the cluster's pods (a tenant with large label sets cannot OOM every webhook replica).

mod common;

use std::time::Duration;

use common::*;
use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::PostParams};
use serde_json::json;

const PODS: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_does_not_hold_the_clusters_pods() {
    // Its own control plane: ten thousand pods would slow every other test's operator down.
    let cp = xtask::ControlPlane::start().unwrap();
    cp.install_crds().unwrap();
    let client = cp.client().await.unwrap();
    namespace(&client, "keepalive-system", &[]).await;
    namespace_with_policy(&client, "crowd", (60, 5, 3)).await;
    let args = ["--lease-name=crowd", "--namespace=keepalive-system"];
    let a = Operator::start(&cp, "crowd-a", &args);
    let b = Operator::start(&cp, "crowd-b", &args);
    let (leader, follower) = if a_leads(&a, &b).await { (&a, &b) } else { (&b, &a) };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (leader_before, follower_before) = (rss_mib(leader.pid().unwrap()), rss_mib(follower.pid().unwrap()));

    // Pods with a sizeable label set each, as a tenant could create them (no kubelet: they stay Pending).
    let pods: Api<Pod> = Api::namespaced(client.clone(), "crowd");
    stream::iter(0..PODS)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let labels: serde_json::Map<String, serde_json::Value> = (0..8)
                    .map(|l| (format!("label-{l}"), json!(format!("value-{l}-{i:06}"))))
                    .collect();
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": format!("p{i:05}"), "labels": labels},
                    "spec": {"containers": [{"name": "c", "image": "app:1"}]}
                }))
                .unwrap();
                pods.create(&PostParams::default(), &pod).await.unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    // The leader has counted them all (its status says so): the watch events have reached every replica that
    // watches pods.
    let api: Api<keepalive_operator::api::KeepalivePolicy> = Api::all(client.clone());
    eventually(Duration::from_secs(120), "the leader to count every pod", || async {
        let p = api.get_opt("crowd").await.ok()??;
        (p.status?.matched_pods? == PODS as i32).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (leader_after, follower_after) = (rss_mib(leader.pid().unwrap()), rss_mib(follower.pid().unwrap()));
    println!(
        "with 0 and {PODS} pods: leader RSS {leader_before:.1} -> {leader_after:.1} MiB, follower RSS \
         {follower_before:.1} -> {follower_after:.1} MiB"
    );
    assert!(
        leader_after > leader_before + 5.0,
        "the leader holds the pods (a check that the pods were there to be held)"
    );
    assert!(
        follower_after <= follower_before + 2.0,
        "a follower's memory grew from {follower_before:.1} to {follower_after:.1} MiB with {PODS} pods"
    );
    let pods_cached = |op: &Operator| {
        op.metrics()
            .lines()
            .find_map(|l| {
                l.strip_prefix("keepalive_cache_objects{cache=\"pods\"} ")?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    assert_eq!(pods_cached(leader), PODS as u64, "the leader's pod cache");
    assert_eq!(pods_cached(follower), 0, "the follower's pod cache");
}
