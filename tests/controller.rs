//! The conformance controller against the real apiserver: policy status tells the truth about the pods, with the
//! webhook running beside it; two replicas fail over; deleted namespaces and policies and a restarted apiserver
//! do not stop it. Each test keeps to its own namespaces and policies, and elects its operators through its own
//! Lease.

mod common;

use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::{Event, Namespace, Pod};
use keepalive_operator::api::{KeepalivePolicy, KeepalivePolicyStatus};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use serde_json::json;

fn condition<'a>(
    s: &'a KeepalivePolicyStatus,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    s.conditions.iter().find(|c| c.type_ == type_).unwrap()
}

fn operator(cp: &xtask::ControlPlane, name: &str, extra: &[&str]) -> Operator {
    let mut args = vec![
        format!("--lease-name={name}"),
        "--namespace=keepalive-system".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Operator::start(cp, name, &args)
}

#[tokio::test]
async fn status_tells_the_truth_about_the_pods() {
    let cp = control_plane();
    let client = cp.client().await.unwrap();
    ensure_namespace(&client, "keepalive-system").await;
    let dir = cp.work_dir().join("truth");
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = write_serving_cert(&dir);
    let op = operator(
        cp,
        "truth",
        &[
            &format!("--tls-cert-file={}", cert.display()),
            &format!("--tls-key-file={}", key.display()),
        ],
    );
    register_webhook(&client, "keepalive-truth", &op.url(), Some(&ca), "truth").await;
    namespace(&client, "truth", &[("scope", "truth"), ("test", "truth")]).await;
    for name in ["old-1", "old-2"] {
        create_pod(&client, "truth", name, json!({})).await.unwrap();
    }
    create_policy(
        &client,
        "truth",
        json!({"namespaceSelector": {"matchLabels": {"test": "truth"}}, "keepalive": {"time": 50, "interval": 5, "probes": 3}}),
    )
    .await;

    // Pods created before the policy: matched, not conformant, NotMutated.
    let s = status_where(&client, "truth", "2 matched pods, none conformant", |s| {
        counts(s) == (2, 0)
    })
    .await;
    assert_eq!(s.observed_generation, Some(1));
    assert_eq!(s.violation_counts, [("NotMutated".to_string(), 2)].into());
    assert_eq!(
        s.violations.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["old-1", "old-2"]
    );
    assert!(s.violations[0].message.contains("recreate"), "{:?}", s.violations[0]);
    assert_eq!(condition(&s, "Conformant").status, "False");
    assert_eq!(condition(&s, "Ready").status, "True");
    assert_eq!(condition(&s, "Injected").reason, "Webhook");

    // Pods created after it are mutated by the webhook and conform.
    eventually(Duration::from_secs(10), "the webhook to know the policy", || async {
        let pod = create_pod(&client, "truth", "new-1", json!({})).await.ok()?;
        if sysctls(&pod).is_empty() {
            Api::<Pod>::namespaced(client.clone(), "truth")
                .delete("new-1", &DeleteParams::default())
                .await
                .ok()?;
            return None;
        }
        Some(())
    })
    .await;
    for name in ["new-2", "new-3"] {
        assert!(!sysctls(&create_pod(&client, "truth", name, json!({})).await.unwrap()).is_empty());
    }
    status_where(&client, "truth", "5 matched, 3 conformant", |s| counts(s) == (5, 3)).await;

    // Deleting a pod lowers matchedPods.
    Api::<Pod>::namespaced(client.clone(), "truth")
        .delete("old-1", &DeleteParams::default())
        .await
        .unwrap();
    let s = status_where(&client, "truth", "4 matched, 3 conformant", |s| counts(s) == (4, 3)).await;
    assert_eq!(s.violations.len(), 1);

    // The real kubectl shows it.
    let out = cp.kubectl_output(&["get", "kap", "truth"]).unwrap();
    let row: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[5..7], ["4", "3"], "{out}");

    // New values: every existing pod is non-conformant until recreated.
    let policies: Api<KeepalivePolicy> = Api::all(client.clone());
    policies
        .patch(
            "truth",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"keepalive": {"time": 55}}})),
        )
        .await
        .unwrap();
    let s = status_where(&client, "truth", "generation 2 observed, 0 conformant", |s| {
        s.observed_generation == Some(2) && counts(s) == (4, 0)
    })
    .await;
    assert_eq!(s.violation_counts, [("NotMutated".to_string(), 4)].into());

    // Events on condition transitions, on the policy.
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let found = eventually(Duration::from_secs(10), "an event on the policy", || async {
        let list = events
            .list(&ListParams::default().fields("involvedObject.name=truth"))
            .await
            .ok()?;
        (!list.items.is_empty()).then_some(list.items)
    })
    .await;
    assert!(
        found.iter().any(|e| e.reason.as_deref() == Some("PodsDoNotConform")),
        "{found:?}"
    );
    assert!(
        op.metrics()
            .contains("keepalive_policy_pods{policy=\"truth\",state=\"matched\"} 4"),
        "{}",
        op.metrics()
    );
}

#[tokio::test]
async fn overlapping_policies_split_pods_by_priority() {
    let cp = control_plane();
    let client = cp.client().await.unwrap();
    ensure_namespace(&client, "keepalive-system").await;
    let _op = operator(cp, "priority", &[]);
    namespace(&client, "prio", &[("test", "prio")]).await;
    let ns = json!({"matchLabels": {"test": "prio"}});
    create_policy(
        &client,
        "prio-low",
        json!({"namespaceSelector": ns, "keepalive": {"time": 60, "interval": 5, "probes": 3}}),
    )
    .await;
    create_policy(
        &client,
        "prio-high",
        json!({"priority": 10, "namespaceSelector": ns, "podSelector": {"matchLabels": {"tier": "gold"}},
               "keepalive": {"time": 30, "interval": 5, "probes": 3}}),
    )
    .await;
    for i in 0..5 {
        let tier = if i < 2 { "gold" } else { "silver" };
        create_pod(
            &client,
            "prio",
            &format!("p{i}"),
            json!({"metadata": {"labels": {"tier": tier}}}),
        )
        .await
        .unwrap();
    }
    status_where(&client, "prio-high", "2 gold pods", |s| counts(s).0 == 2).await;
    status_where(&client, "prio-low", "3 other pods", |s| counts(s).0 == 3).await;
}

#[tokio::test]
async fn the_other_replica_takes_over_when_the_leader_dies() {
    let cp = control_plane();
    let client = cp.client().await.unwrap();
    ensure_namespace(&client, "keepalive-system").await;
    // Two identities: with one (the same POD_NAME) both replicas would renew the same holder's lease.
    let mut a = operator(cp, "failover", &["--identity=failover-a"]);
    let mut b = operator(cp, "failover", &["--identity=failover-b"]);
    namespace_with_policy(&client, "failover", (60, 5, 3)).await;
    create_pod(&client, "failover", "p0", json!({})).await.unwrap();
    status_where(&client, "failover", "1 matched pod", |s| counts(s).0 == 1).await;

    let is_leader = |op: &Operator| op.metrics().lines().any(|l| l == "keepalive_leader 1");
    let (leader, other) = if a_leads(&a, &b).await {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    // SIGKILL: no clean release of the lease, as when a node dies.
    leader.kill_hard();
    let killed = Instant::now();
    create_pod(&client, "failover", "p1", json!({})).await.unwrap();
    // Operators of other tests of this binary (their own leases) may write this policy's status too: the
    // takeover itself is what is waited for.
    eventually(Duration::from_secs(30), "the other replica to lead", || async {
        is_leader(other).then_some(())
    })
    .await;
    status_where(&client, "failover", "the new leader to count the new pod", |s| {
        counts(s).0 == 2
    })
    .await;
    let failover = killed.elapsed();
    eprintln!("failover: the other replica leads and the status counts the new pod {failover:?} after the kill");
    assert!(failover < Duration::from_secs(20), "failover took {failover:?}");
}

#[tokio::test]
async fn deleted_namespaces_deleted_policies_and_a_restarted_apiserver_do_not_stop_it() {
    // Its own control plane: the test restarts the apiserver.
    let mut cp = xtask::ControlPlane::start().unwrap();
    cp.install_crds().unwrap();
    let client = cp.client().await.unwrap();
    namespace(&client, "keepalive-system", &[]).await;
    let mut op = operator(&cp, "resilience", &[]);
    namespace(&client, "doomed", &[("test", "doomed")]).await;
    create_policy(
        &client,
        "doomed",
        json!({"namespaceSelector": {"matchLabels": {"test": "doomed"}}, "keepalive": {"time": 60, "interval": 5, "probes": 3}}),
    )
    .await;
    create_pod(&client, "doomed", "p0", json!({})).await.unwrap();
    status_where(&client, "doomed", "1 matched pod", |s| counts(s).0 == 1).await;

    // The namespace disappears under its pod (no controller-manager runs to delete the pod first).
    Api::<Namespace>::all(client.clone())
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    let finalize =
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "doomed"}, "spec": {"finalizers": []}});
    let file = cp.work_dir().join("finalize.json");
    std::fs::write(&file, finalize.to_string()).unwrap();
    cp.kubectl_output(&[
        "replace",
        "--raw",
        "/api/v1/namespaces/doomed/finalize",
        "-f",
        file.to_str().unwrap(),
    ])
    .unwrap();
    status_where(
        &client,
        "doomed",
        "the orphaned pod to lose its namespace's labels",
        |s| counts(s).0 == 0,
    )
    .await;

    // A policy deleted right after it was created, while the controller works on it.
    for i in 0..5 {
        let name = format!("short-lived-{i}");
        create_policy(
            &client,
            &name,
            json!({"keepalive": {"time": 60, "interval": 5, "probes": 3}}),
        )
        .await;
        Api::<KeepalivePolicy>::all(client.clone())
            .delete(&name, &DeleteParams::default())
            .await
            .unwrap();
    }

    // The apiserver goes away and comes back.
    cp.stop_apiserver();
    tokio::time::sleep(Duration::from_secs(3)).await;
    cp.start_apiserver().unwrap();
    let client = cp.client().await.unwrap();
    namespace(&client, "after", &[("test", "doomed")]).await;
    create_pod(&client, "after", "p1", json!({})).await.unwrap();
    status_where(&client, "doomed", "the pod created after the restart", |s| {
        counts(s).0 == 1
    })
    .await;
    assert!(op.running(), "the operator kept running:\n{}", op.logs());
    op.stop();
}

/// Node reports belong to one incarnation of their Node: stamped with its UID, deleted when it is gone or
/// re-created; judged fresh by when the controller received them (a node clock a day behind changes nothing);
/// joined to pods by UID, static pods by their mirror pod's config hash; sandboxed runtimes unverified; a running
/// pod the agent cannot find is reported.
#[tokio::test]
async fn node_reports_follow_their_nodes_and_join_pods_by_uid() {
    use k8s_openapi::api::{core::v1::Node, node::v1::RuntimeClass};
    use keepalive_operator::api::KeepaliveNodeReport;

    let cp = control_plane();
    let client = cp.client().await.unwrap();
    ensure_namespace(&client, "keepalive-system").await;
    let dir = cp.work_dir().join("node-bound");
    std::fs::create_dir_all(&dir).unwrap();
    let (_ca, cert, key) = write_serving_cert(&dir);
    let _op = operator(
        cp,
        "node-bound",
        &[
            &format!("--tls-cert-file={}", cert.display()),
            &format!("--tls-key-file={}", key.display()),
        ],
    );
    let nodes: Api<Node> = Api::all(client.clone());
    let create_node = |name: &'static str| {
        let nodes = nodes.clone();
        async move {
            let node: Node = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
            nodes
                .create(&Default::default(), &node)
                .await
                .unwrap()
                .metadata
                .uid
                .unwrap()
        }
    };
    let first_uid = create_node("nb-a").await;
    let classes: Api<RuntimeClass> = Api::all(client.clone());
    let kata: RuntimeClass =
        serde_json::from_value(json!({"metadata": {"name": "nb-kata"}, "handler": "kata-qemu"})).unwrap();
    classes.create(&Default::default(), &kata).await.unwrap();

    namespace(&client, "node-bound", &[("test", "node-bound")]).await;
    create_policy(
        &client,
        "node-bound",
        json!({"namespaceSelector": {"matchLabels": {"test": "node-bound"}}, "mode": "Audit",
               "keepalive": {"time": 30, "interval": 5, "probes": 3}}),
    )
    .await;
    let hash = "0123456789abcdef0123456789abcdef";
    let spec = |extra: serde_json::Value| {
        let mut base = json!({"spec": {"nodeName": "nb-a", "securityContext": {"sysctls": [
            {"name": "net.ipv4.tcp_keepalive_time", "value": "30"},
            {"name": "net.ipv4.tcp_keepalive_intvl", "value": "5"},
            {"name": "net.ipv4.tcp_keepalive_probes", "value": "3"}]}}});
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                match (b.get_mut(k), v) {
                    (Some(serde_json::Value::Object(b)), serde_json::Value::Object(v)) => b.extend(v.clone()),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        base
    };
    let plain = create_pod(&client, "node-bound", "plain", spec(json!({})))
        .await
        .unwrap();
    create_pod(
        &client,
        "node-bound",
        "static-nb-a",
        spec(json!({"metadata": {"annotations": {"kubernetes.io/config.mirror": hash, "kubernetes.io/config.hash": hash}}})),
    )
    .await
    .unwrap();
    let sandboxed = create_pod(
        &client,
        "node-bound",
        "sandboxed",
        spec(json!({"spec": {"runtimeClassName": "nb-kata"}})),
    )
    .await
    .unwrap();
    create_pod(&client, "node-bound", "missing", spec(json!({})))
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "node-bound");
    for name in ["plain", "static-nb-a", "sandboxed", "missing"] {
        pods.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running"}})),
        )
        .await
        .unwrap();
    }
    let s = status_where(&client, "node-bound", "four pods conformant by spec", |s| {
        counts(s) == (4, 4)
    })
    .await;
    assert_eq!(s.live_verified_pods, Some(0));

    // The agent of nb-a reports, its clock a day behind: every pod it found by UID has the policy's values.
    let reports: Api<KeepaliveNodeReport> = Api::all(client.clone());
    let reading = |uid: &str| {
        json!({"uid": uid, "sysctls": {"time": 30, "interval": 5, "probes": 3},
        "established": 1, "keepalive": 1, "readAt": "2026-01-01T00:00:00Z"})
    };
    let write = |node: &'static str, scan: u32| {
        let reports = reports.clone();
        let entries = json!([
            reading(&plain.metadata.uid.clone().unwrap()),
            reading(hash),
            reading(&sandboxed.metadata.uid.clone().unwrap())
        ]);
        async move {
            let last_scan = format!("2020-01-01T00:00:{scan:02}Z");
            let object = json!({"apiVersion": "keepalive.dev/v1alpha1", "kind": "KeepaliveNodeReport",
                "metadata": {"name": node},
                "spec": {"lastScan": last_scan, "heartbeatSeconds": 60, "scanIntervalSeconds": 10,
                         "verifiedPods": 3, "pods": entries}});
            reports
                .patch(
                    node,
                    &PatchParams::apply("keepalive-agent").force(),
                    &Patch::Apply(&object),
                )
                .await
                .unwrap();
        }
    };
    write("nb-a", 1).await;
    let stamped = eventually(Duration::from_secs(30), "the report stamped with its node", || async {
        let r = reports.get_opt("nb-a").await.ok()??;
        r.metadata
            .owner_references
            .filter(|o| o.iter().any(|o| o.kind == "Node" && o.uid == first_uid))
    })
    .await;
    assert_eq!(stamped.len(), 1);
    let s = status_where(
        &client,
        "node-bound",
        "the plain and the static pod live-verified",
        |s| s.live_verified_pods == Some(2),
    )
    .await;
    let unverified = s
        .violations
        .iter()
        .find(|v| v.name == "sandboxed")
        .expect("the sandboxed pod");
    assert_eq!(unverified.reason, "Unverified");
    assert!(
        unverified.message.starts_with("sandboxed runtime"),
        "{}",
        unverified.message
    );
    assert!(
        s.violations.iter().all(|v| v.name != "static-nb-a"),
        "{:?}",
        s.violations
    );
    // Two more reports without the running pod "missing": the agent found no process of it.
    write("nb-a", 2).await;
    write("nb-a", 3).await;
    let s = status_where(&client, "node-bound", "the pod without a process unverified", |s| {
        s.violations
            .iter()
            .any(|v| v.name == "missing" && v.reason == "Unverified")
    })
    .await;
    let missing = s.violations.iter().find(|v| v.name == "missing").unwrap();
    assert!(missing.message.contains("found no process"), "{}", missing.message);

    // A report of a node that does not exist is deleted.
    write("nb-ghost", 1).await;
    eventually(Duration::from_secs(30), "the ghost node's report deleted", || async {
        reports.get_opt("nb-ghost").await.ok()?.is_none().then_some(())
    })
    .await;

    // The node is re-created under the same name: the old incarnation's report goes, pods fall back to spec.
    nodes.delete("nb-a", &DeleteParams::default()).await.unwrap();
    let second_uid = create_node("nb-a").await;
    assert_ne!(first_uid, second_uid);
    eventually(
        Duration::from_secs(30),
        "the old incarnation's report deleted",
        || async { reports.get_opt("nb-a").await.ok()?.is_none().then_some(()) },
    )
    .await;
    status_where(&client, "node-bound", "pods judged by spec again", |s| {
        s.live_verified_pods == Some(0)
    })
    .await;
    // The new node's agent reports: stamped with the new UID and trusted.
    write("nb-a", 4).await;
    eventually(
        Duration::from_secs(30),
        "the new report stamped with the new node",
        || async {
            let r = reports.get_opt("nb-a").await.ok()??;
            r.metadata
                .owner_references
                .filter(|o| o.iter().any(|o| o.uid == second_uid))
        },
    )
    .await;
    status_where(&client, "node-bound", "live-verified again", |s| {
        s.live_verified_pods == Some(2)
    })
    .await;
    nodes.delete("nb-a", &DeleteParams::default()).await.unwrap();
    eventually(Duration::from_secs(30), "the deleted node's report deleted", || async {
        reports.get_opt("nb-a").await.ok()?.is_none().then_some(())
    })
    .await;
    classes.delete("nb-kata", &DeleteParams::default()).await.unwrap();
}

/// Version skew: an apiserver of 1.29 or newer may run older kubelets, which reject the keepalive sysctls. A pod
/// bound to such a node is `KubeletTooOld`, its message naming the node and its kubelet version, while a pod on a
/// newer kubelet is judged as always; once the old node's kubelet is upgraded, its pod is judged again.
#[tokio::test]
async fn pods_on_a_kubelet_older_than_1_29_are_kubelet_too_old_until_it_is_upgraded() {
    use k8s_openapi::api::core::v1::Node;

    let cp = control_plane();
    let client = cp.client().await.unwrap();
    ensure_namespace(&client, "keepalive-system").await;
    let op = operator(cp, "skew", &[]);
    let nodes: Api<Node> = Api::all(client.clone());
    // As the kubelet would, through the status subresource (as admin here: no kubelet runs).
    let set_kubelet = |name: &'static str, version: &'static str| {
        let nodes = nodes.clone();
        async move {
            let patch = json!({"status": {"nodeInfo": {"kubeletVersion": version}}});
            let node = nodes
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
            let info = node.status.and_then(|s| s.node_info).expect("nodeInfo");
            assert_eq!(info.kubelet_version, version);
        }
    };
    for (name, version) in [("skew-old", "v1.28.9-eks-4f4795d"), ("skew-new", "v1.37.1")] {
        node_object(cp, name);
        set_kubelet(name, version).await;
    }
    namespace_with_policy(&client, "skew", (45, 5, 3)).await;
    let bound = |node: &str| {
        json!({"spec": {"nodeName": node, "securityContext": {"sysctls": [
            {"name": "net.ipv4.tcp_keepalive_time", "value": "45"},
            {"name": "net.ipv4.tcp_keepalive_intvl", "value": "5"},
            {"name": "net.ipv4.tcp_keepalive_probes", "value": "3"}]}}})
    };
    create_pod(&client, "skew", "on-old", bound("skew-old")).await.unwrap();
    create_pod(&client, "skew", "on-new", bound("skew-new")).await.unwrap();

    let s = status_where(&client, "skew", "the pod on the old kubelet KubeletTooOld", |s| {
        counts(s) == (2, 1) && s.violation_counts.get("KubeletTooOld") == Some(&1)
    })
    .await;
    assert_eq!(s.violation_counts.len(), 1, "{:?}", s.violation_counts);
    assert_eq!(s.violations.len(), 1, "{:?}", s.violations);
    let v = &s.violations[0];
    assert_eq!((v.name.as_str(), v.reason.as_str()), ("on-old", "KubeletTooOld"));
    for part in [
        "node skew-old runs kubelet v1.28.9-eks-4f4795d",
        "SysctlForbidden",
        "--allowed-unsafe-sysctls",
        "--kubelet-allows-keepalive-sysctls",
    ] {
        assert!(v.message.contains(part), "{part} in {}", v.message);
    }
    assert_eq!(condition(&s, "Conformant").status, "False");
    assert!(
        condition(&s, "Conformant").message.contains("1 KubeletTooOld"),
        "{:?}",
        condition(&s, "Conformant")
    );
    assert_eq!(condition(&s, "Ready").status, "True", "the apiserver is new enough");
    let metric = |n: u32| format!("keepalive_policy_pods{{policy=\"skew\",state=\"KubeletTooOld\"}} {n}");
    eventually(Duration::from_secs(10), "the KubeletTooOld metric", || async {
        op.metrics().lines().any(|l| l == metric(1)).then_some(())
    })
    .await;

    // A patch release of the old kubelet is still too old: the message names the new version.
    set_kubelet("skew-old", "v1.28.15").await;
    status_where(&client, "skew", "the new patch version named", |s| {
        s.violations
            .iter()
            .any(|v| v.name == "on-old" && v.message.contains("kubelet v1.28.15"))
    })
    .await;

    // Upgraded: the pod is judged by its spec again, and conforms.
    set_kubelet("skew-old", "v1.29.0").await;
    let s = status_where(&client, "skew", "no pod KubeletTooOld after the upgrade", |s| {
        counts(s) == (2, 2)
    })
    .await;
    assert!(s.violation_counts.is_empty(), "{:?}", s.violation_counts);
    assert!(s.violations.is_empty(), "{:?}", s.violations);
    eventually(
        Duration::from_secs(10),
        "the KubeletTooOld metric back to 0",
        || async { op.metrics().lines().any(|l| l == metric(0)).then_some(()) },
    )
    .await;
    for name in ["skew-old", "skew-new"] {
        nodes.delete(name, &DeleteParams::default()).await.unwrap();
    }
}

/// An operator whose role predates reading Nodes judges pods by the apiserver's version, as before (a pod on an
/// old kubelet is not `KubeletTooOld`), still writes status, and logs why. Its own control plane: on the shared
/// one, this operator's statuses would contradict those of the other tests' operators.
#[tokio::test]
async fn without_the_right_to_read_nodes_pods_are_judged_by_the_apiserver_version() {
    use k8s_openapi::api::core::v1::Node;

    let cp = xtask::ControlPlane::start().unwrap();
    cp.install_crds().unwrap();
    let client = cp.client().await.unwrap();
    namespace(&client, "keepalive-system", &[]).await;
    // Everything the operator uses, but nothing on nodes.
    kubectl_apply(
        &cp,
        &json!({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": "old-role", "namespace": "keepalive-system"}}),
    );
    kubectl_apply(
        &cp,
        &json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": {"name": "old-role"},
                "rules": [{"apiGroups": ["", "keepalive.dev", "node.k8s.io", "events.k8s.io", "coordination.k8s.io"],
                           "resources": ["pods", "namespaces", "keepalivepolicies", "keepalivepolicies/status",
                                         "keepalivenodereports", "runtimeclasses", "events", "leases"],
                           "verbs": ["*"]}]}),
    );
    kubectl_apply(
        &cp,
        &json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": "old-role"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "old-role"},
                "subjects": [{"kind": "ServiceAccount", "name": "old-role", "namespace": "keepalive-system"}]}),
    );
    assert!(!can_i(&cp, "keepalive-system", "old-role", &["list", "nodes"]));
    assert!(can_i(
        &cp,
        "keepalive-system",
        "old-role",
        &["list", "pods", "--all-namespaces"]
    ));

    node_object(&cp, "old-role-node");
    let patch = json!({"status": {"nodeInfo": {"kubeletVersion": "v1.28.9"}}});
    Api::<Node>::all(client.clone())
        .patch_status("old-role-node", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    namespace_with_policy(&client, "old-role", (45, 5, 3)).await;
    let bound = json!({"spec": {"nodeName": "old-role-node", "securityContext": {"sysctls": [
        {"name": "net.ipv4.tcp_keepalive_time", "value": "45"},
        {"name": "net.ipv4.tcp_keepalive_intvl", "value": "5"},
        {"name": "net.ipv4.tcp_keepalive_probes", "value": "3"}]}}});
    create_pod(&client, "old-role", "on-old", bound).await.unwrap();

    let dir = cp.work_dir().join("old-role");
    std::fs::create_dir_all(&dir).unwrap();
    let (_ca, cert, key) = write_serving_cert(&dir);
    let kubeconfig = cp.service_account_kubeconfig("keepalive-system", "old-role").unwrap();
    let args = [
        "--lease-name=old-role".to_string(),
        "--namespace=keepalive-system".to_string(),
        format!("--tls-cert-file={}", cert.display()),
        format!("--tls-key-file={}", key.display()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut op = Operator::start_with_kubeconfig(&cp, "old-role", &args, &kubeconfig);
    let s = status_where(&client, "old-role", "the pod judged by its spec", |s| {
        counts(s) == (1, 1)
    })
    .await;
    assert!(s.violation_counts.is_empty(), "{:?}", s.violation_counts);
    assert!(
        op.logs().contains("cannot list Nodes"),
        "the operator says why:\n{}",
        op.logs()
    );
    op.stop();
}
