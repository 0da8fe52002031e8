//! Incremental tallies agree with a full recompute, and the status says what the tallies say.

use std::sync::Arc;

use serde_json::json;

use k8s_openapi::{api::core::v1::Sysctl, apimachinery::pkg::apis::meta::v1::Time};

use super::*;
use crate::policy::PolicyEntry;

fn policies(specs: &[(&str, serde_json::Value)]) -> Arc<PolicySet> {
    Arc::new(PolicySet::new(specs.iter().map(|(name, spec)| {
        let mut spec = spec.clone();
        spec["keepalive"] = json!({"time": 60, "interval": 10, "probes": 3});
        PolicyEntry {
            name: name.to_string(),
            generation: Some(1),
            spec: serde_json::from_value(spec).unwrap(),
        }
    })))
}

fn pod(ns: &str, name: &str, labels: &[(&str, &str)], time: Option<&str>) -> CachedPod {
    let mut sysctls = Vec::new();
    if let Some(t) = time {
        for (n, v) in [
            ("net.ipv4.tcp_keepalive_time", t),
            ("net.ipv4.tcp_keepalive_intvl", "10"),
            ("net.ipv4.tcp_keepalive_probes", "3"),
        ] {
            sysctls.push(Sysctl {
                name: n.into(),
                value: v.into(),
            });
        }
    }
    CachedPod {
        namespace: ns.into(),
        name: name.into(),
        labels: Arc::new(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        sysctls: sysctls.into(),
        phase: Some("Running".into()),
        ..Default::default()
    }
}

fn assert_consistent(c: &mut Conformance) {
    let incremental: Vec<_> = c.policies().entries().iter().map(|e| c.summary(&e.name)).collect();
    c.recompute_all();
    let full: Vec<_> = c.policies().entries().iter().map(|e| c.summary(&e.name)).collect();
    assert_eq!(incremental, full);
}

#[test]
fn pods_are_counted_per_winning_policy_with_reasons() {
    let mut c = Conformance::new(ClusterFacts::default());
    c.set_policies(policies(&[
        (
            "web",
            json!({"priority": 1, "podSelector": {"matchLabels": {"app": "web"}}}),
        ),
        ("all", json!({})),
        (
            "fill",
            json!({"priority": 2, "mode": "Fill", "podSelector": {"matchLabels": {"app": "db"}}}),
        ),
    ]));
    c.upsert_pod(pod("a", "web-1", &[("app", "web")], Some("60")));
    c.upsert_pod(pod("a", "web-2", &[("app", "web")], None));
    c.upsert_pod(pod("a", "other", &[], Some("60")));
    c.upsert_pod(pod("b", "db", &[("app", "db")], Some("7200")));
    let mut hn = pod("b", "hostnet", &[], None);
    hn.host_network = true;
    c.upsert_pod(hn);
    let mut done = pod("b", "finished", &[], None);
    done.phase = Some("Succeeded".into());
    c.upsert_pod(done);

    let web = c.summary("web").unwrap();
    assert_eq!((web.matched, web.conformant), (2, 1));
    assert_eq!(web.by_reason, [(Reason::NotMutated, 1)].into());
    assert_eq!(web.violations[0].name, "web-2");
    assert!(
        web.violations[0].message.contains("recreate"),
        "{}",
        web.violations[0].message
    );
    let all = c.summary("all").unwrap();
    assert_eq!((all.matched, all.conformant), (2, 1), "terminated pods are not counted");
    assert_eq!(all.by_reason, [(Reason::HostNetwork, 1)].into());
    let fill = c.summary("fill").unwrap();
    assert_eq!(fill.by_reason, [(Reason::PodOverride, 1)].into());
    assert_consistent(&mut c);
}

#[test]
fn deleting_and_changing_pods_updates_only_their_policies() {
    let mut c = Conformance::new(ClusterFacts::default());
    c.set_policies(policies(&[
        ("x", json!({"podSelector": {"matchLabels": {"app": "x"}}})),
        ("y", json!({})),
    ]));
    c.take_dirty();
    c.upsert_pod(pod("a", "p", &[("app", "x")], None));
    assert_eq!(c.take_dirty(), vec![Arc::<str>::from("x")]);
    // Relabelled: moves from x to y.
    c.upsert_pod(pod("a", "p", &[("app", "z")], Some("60")));
    let mut dirty = c.take_dirty();
    dirty.sort();
    assert_eq!(dirty, vec![Arc::<str>::from("x"), Arc::<str>::from("y")]);
    assert_eq!(c.summary("x").unwrap().matched, 0);
    assert_eq!(c.summary("y").unwrap().conformant, 1);
    c.remove_pod(&(Arc::from("a"), Arc::from("p")));
    assert_eq!(c.summary("y").unwrap().matched, 0);
    assert_consistent(&mut c);
}

#[test]
fn namespace_labels_and_policy_changes_rejudge_pods() {
    let mut c = Conformance::new(ClusterFacts::default());
    c.set_policies(policies(&[(
        "team",
        json!({"namespaceSelector": {"matchLabels": {"team": "t"}}}),
    )]));
    c.upsert_pod(pod("a", "p", &[], Some("60")));
    assert_eq!(c.summary("team").unwrap().matched, 0);
    c.set_namespace("a", [("team".to_string(), "t".to_string())].into());
    assert_eq!(c.summary("team").unwrap().conformant, 1);
    // New values: the pod no longer conforms until recreated.
    let mut changed = (*policies(&[("team", json!({"namespaceSelector": {"matchLabels": {"team": "t"}}}))])).clone();
    let entries: Vec<PolicyEntry> = changed
        .entries()
        .iter()
        .cloned()
        .map(|mut e| {
            e.spec.keepalive.time = 30;
            e
        })
        .collect();
    changed = PolicySet::new(entries);
    c.set_policies(Arc::new(changed));
    assert_eq!(c.summary("team").unwrap().by_reason, [(Reason::NotMutated, 1)].into());
    c.remove_namespace("a");
    assert_eq!(
        c.summary("team").unwrap().matched,
        0,
        "a deleted namespace has no labels"
    );
    assert!(c.summary("gone").is_none());
    assert_consistent(&mut c);
}

#[test]
fn status_conditions_and_transition_times() {
    let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(1_000_000).unwrap());
    let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(2_000_000).unwrap());
    let summary = Summary {
        matched: 3,
        conformant: 1,
        by_reason: [(Reason::NotMutated, 2)].into(),
        violations: vec![],
        live_verified: 0,
        connections: None,
    };
    let s0 = status(
        &summary,
        Some(4),
        ClusterFacts::default(),
        &Injection::Webhook,
        None,
        &t0,
    );
    assert_eq!(s0.observed_generation, Some(4));
    let conformant = s0.conditions.iter().find(|c| c.type_ == "Conformant").unwrap();
    assert_eq!(
        (conformant.status.as_str(), conformant.reason.as_str()),
        ("False", "PodsDoNotConform")
    );
    assert_eq!(conformant.message, "2 of 3 matched pods do not conform: 2 NotMutated");
    let s1 = status(
        &summary,
        Some(4),
        ClusterFacts::default(),
        &Injection::Webhook,
        Some(&s0),
        &t1,
    );
    assert!(same_report(&s0, &s1), "only lastEvaluated differs");
    assert_eq!(s1.conditions[1].last_transition_time, t0, "no transition, time kept");
    let fixed = Summary {
        matched: 3,
        conformant: 3,
        by_reason: Default::default(),
        violations: vec![],
        live_verified: 2,
        connections: Some(ConnectionCounts {
            established: 10,
            keepalive: 4,
            ..ConnectionCounts::default()
        }),
    };
    let s2 = status(
        &fixed,
        Some(4),
        ClusterFacts::default(),
        &Injection::Webhook,
        Some(&s1),
        &t1,
    );
    assert_eq!(s2.conditions[1].status, "True");
    assert_eq!(s2.conditions[1].last_transition_time, t1);
    assert_eq!(s2.live_verified_pods, Some(2));
    assert_eq!(s2.connection_coverage.as_deref(), Some("4/10"));
    // Pods that only await their first live reading do not turn the condition False.
    let waiting = Summary {
        conformant: 2,
        by_reason: [(AWAITING, 1)].into(),
        ..fixed.clone()
    };
    let s3 = status(
        &waiting,
        Some(4),
        ClusterFacts::default(),
        &Injection::Webhook,
        Some(&s2),
        &t1,
    );
    assert_eq!(s3.conditions[1].status, "True");
    assert!(
        s3.conditions[1].message.contains("1 of 3 await"),
        "{}",
        s3.conditions[1].message
    );
    let old = status(
        &fixed,
        Some(4),
        ClusterFacts::from_version("1", "28", false),
        &Injection::Webhook,
        None,
        &t1,
    );
    assert_eq!(old.conditions[0].reason, "ClusterTooOld");
}

fn on_node(mut p: CachedPod, node: &str, uid: u128) -> CachedPod {
    p.node = Some(node.into());
    p.uid = uid;
    p
}

fn reading(time: i32, established: u32, keepalive: u32) -> PodReading {
    PodReading {
        sysctls: Some(LiveKeepalive {
            time,
            interval: 10,
            probes: 3,
        }),
        established,
        keepalive,
        sockets: None,
        error: None,
    }
}

fn node_live(at: i64, node_time: i32, pods: Vec<(u128, PodReading)>) -> NodeLive {
    NodeLive {
        last_scan: Timestamp::from_second(at).unwrap(),
        stale_after: SignedDuration::from_secs(180),
        refresh_stale_after: SignedDuration::from_secs(180),
        node_sysctls: Some(LiveKeepalive {
            time: node_time,
            interval: 10,
            probes: 3,
        }),
        pods: pods.into_iter().collect(),
    }
}

#[test]
fn live_readings_decide_once_a_fresh_report_exists() {
    let now = Timestamp::from_second(1_000_000).unwrap();
    let mut c = Conformance::new(ClusterFacts::default());
    c.set_policies(policies(&[("all", json!({}))]));
    c.upsert_pod(on_node(pod("a", "good", &[], Some("60")), "n1", 1));
    c.upsert_pod(on_node(pod("a", "drifted", &[], Some("60")), "n1", 2));
    c.upsert_pod(on_node(pod("a", "unread", &[], Some("60")), "n1", 3));
    c.upsert_pod(on_node(pod("a", "failed", &[], Some("60")), "n1", 4));
    c.upsert_pod(on_node(pod("a", "old", &[], None), "n1", 5));
    let mut hn = on_node(pod("a", "hostnet", &[], None), "n1", 6);
    hn.host_network = true;
    c.upsert_pod(hn);
    c.upsert_pod(on_node(pod("a", "elsewhere", &[], Some("60")), "n2", 7));
    // Without reports: by spec.
    let s = c.summary("all").unwrap();
    assert_eq!(
        (s.matched, s.conformant, s.live_verified, s.connections),
        (7, 5, 0, None)
    );

    let failed = PodReading {
        sysctls: None,
        established: 0,
        keepalive: 0,
        sockets: None,
        error: Some("no process of the pod found on the host".into()),
    };
    c.set_node_report(
        "n1",
        node_live(
            now.as_second() - 5,
            60,
            vec![
                (1, reading(60, 4, 3)),
                (2, reading(7200, 2, 0)),
                (4, failed),
                (5, reading(7200, 1, 1)),
            ],
        ),
        now,
    );
    let s = c.summary("all").unwrap();
    assert_eq!(s.matched, 7);
    // good + hostnet (node values equal the policy's) + elsewhere (no agent on n2: spec only).
    assert_eq!((s.conformant, s.live_verified), (3, 2));
    assert_eq!(
        s.by_reason,
        [
            (AWAITING, 1),
            (Reason::LiveMismatch, 1),
            (Reason::NotMutated, 1),
            (Reason::Unverified, 1)
        ]
        .into()
    );
    assert_eq!(
        s.connections,
        Some(ConnectionCounts {
            established: 7,
            keepalive: 4,
            ..ConnectionCounts::default()
        })
    );
    let message = |name: &str| s.violations.iter().find(|v| v.name == name).unwrap().message.clone();
    assert!(message("drifted").contains("net.ipv4.tcp_keepalive_time=7200 (policy: 60)"));
    assert!(message("failed").contains("no process"), "{}", message("failed"));
    assert!(message("unread").contains("not read yet"), "{}", message("unread"));
    assert_consistent(&mut c);

    // A relist with the same report judges the same.
    let before = c.summary("all");
    let same: Vec<(String, NodeLive)> = c
        .nodes
        .iter()
        .map(|(n, s)| (n.to_string(), NodeLive::clone(&s.live)))
        .collect();
    c.replace_node_reports(same, now);
    assert_eq!(c.summary("all"), before);

    // The node's values differ: the hostNetwork pod is flagged with them.
    c.set_node_report(
        "n1",
        node_live(now.as_second() - 5, 7200, vec![(1, reading(60, 4, 3))]),
        now,
    );
    let s = c.summary("all").unwrap();
    let hostnet = s.violations.iter().find(|v| v.name == "hostnet").unwrap();
    assert_eq!(hostnet.reason, "HostNetwork");
    assert!(
        hostnet
            .message
            .contains("node n1 runs with net.ipv4.tcp_keepalive_time=7200"),
        "{}",
        hostnet.message
    );

    // The report goes stale (no heartbeat for three minutes): back to the spec.
    c.expire_node_reports(Timestamp::from_second(now.as_second() + 200).unwrap());
    let s = c.summary("all").unwrap();
    assert_eq!((s.conformant, s.live_verified, s.connections), (5, 0, None));
    assert_consistent(&mut c);

    // A report for n2 appears: its pod, not read yet, awaits its reading; a deleted report forgets the node. The
    // node's clock is far behind (its scan time is a day old): freshness is judged by when it was received.
    let later = Timestamp::from_second(now.as_second() + 195).unwrap();
    c.set_node_report("n2", node_live(now.as_second() - 86_400, 60, vec![]), later);
    c.expire_node_reports(Timestamp::from_second(now.as_second() + 200).unwrap());
    assert_eq!(c.summary("all").unwrap().by_reason.get(&AWAITING), Some(&1));
    c.remove_node_report("n2");
    assert_eq!(c.summary("all").unwrap().by_reason.get(&AWAITING), None);
    c.remove_pod(&(Arc::from("a"), Arc::from("elsewhere")));
    assert!(!c.by_node.contains_key("n2"), "the node index forgets empty nodes");
    assert_consistent(&mut c);
}

#[test]
fn a_running_pod_missing_from_two_reports_is_unverified() {
    let t = |s: i64| Timestamp::from_second(1_000_000 + s).unwrap();
    let mut c = Conformance::new(ClusterFacts::default());
    c.set_policies(policies(&[("all", json!({}))]));
    c.set_node_report("n1", node_live(1, 60, vec![]), t(0));
    let mut pending = on_node(pod("a", "p", &[], Some("60")), "n1", 9);
    pending.phase = Some("Pending".into());
    c.upsert_pod(pending.clone());
    c.set_node_report("n1", node_live(2, 60, vec![]), t(10));
    c.set_node_report("n1", node_live(3, 60, vec![]), t(20));
    // Pending pods have no process yet, however many reports pass.
    assert_eq!(c.summary("all").unwrap().by_reason.get(&AWAITING), Some(&1));
    c.upsert_pod(on_node(pod("a", "p", &[], Some("60")), "n1", 9));
    c.set_node_report("n1", node_live(4, 60, vec![]), t(30));
    assert_eq!(
        c.summary("all").unwrap().by_reason.get(&AWAITING),
        Some(&1),
        "one report since it runs: it may have been scanned before"
    );
    // The same report again (a relist) is not a new one.
    c.replace_node_reports([("n1".to_string(), node_live(4, 60, vec![]))], t(35));
    assert_eq!(c.summary("all").unwrap().by_reason.get(&AWAITING), Some(&1));
    c.set_node_report("n1", node_live(5, 60, vec![]), t(40));
    let s = c.summary("all").unwrap();
    assert_eq!(s.by_reason.get(&Reason::Unverified), Some(&1));
    assert!(
        s.violations[0].message.contains("found no process"),
        "{}",
        s.violations[0].message
    );
    // Found at last.
    c.set_node_report("n1", node_live(6, 60, vec![(9, reading(60, 1, 1))]), t(50));
    assert_eq!(c.summary("all").unwrap().live_verified, 1);
    assert_consistent(&mut c);
}

#[test]
fn heartbeats_keep_a_report_fresh_and_count_as_reports_for_a_missing_pod() {
    let t = |s: i64| Timestamp::from_second(1_000_000 + s).unwrap();
    let mut c = Conformance::new(ClusterFacts::default());
    c.set_policies(policies(&[("all", json!({}))]));
    c.set_heartbeats_read(true);
    // An agent with a Lease: heartbeat 60 s, refresh 600 s.
    let mut live = node_live(1, 60, vec![(1, reading(60, 1, 1))]);
    live.stale_after = SignedDuration::from_secs(180);
    live.refresh_stale_after = SignedDuration::from_secs(1800);
    c.upsert_pod(on_node(pod("a", "read", &[], Some("60")), "n1", 1));
    c.set_node_report("n1", live.clone(), t(0));
    assert_eq!(c.summary("all").unwrap().live_verified, 1);
    // Heartbeats alone keep it fresh well past three heartbeats after the report.
    for i in 1..=5 {
        c.node_heartbeat("n1", t(60 * i));
        c.expire_node_reports(t(60 * i + 1));
    }
    assert_eq!(c.summary("all").unwrap().live_verified, 1, "fresh at 301 s");
    // Silence for three heartbeats: stale, judged by the spec.
    c.expire_node_reports(t(300 + 181));
    assert_eq!(c.summary("all").unwrap().live_verified, 0, "stale at 481 s");
    // The next heartbeat makes it fresh again.
    c.node_heartbeat("n1", t(500));
    assert_eq!(c.summary("all").unwrap().live_verified, 1, "heard from again");

    // A running pod missing from the report: the second heartbeat since it runs says the agent found no process.
    c.upsert_pod(on_node(pod("a", "missing", &[], Some("60")), "n1", 9));
    c.node_heartbeat("n1", t(560));
    assert_eq!(c.summary("all").unwrap().by_reason.get(&AWAITING), Some(&1));
    c.node_heartbeat("n1", t(620));
    let s = c.summary("all").unwrap();
    assert_eq!(s.by_reason.get(&Reason::Unverified), Some(&1));
    assert!(
        s.violations[0].message.contains("found no process"),
        "{}",
        s.violations[0].message
    );
    // A heartbeat of a node without a (trusted) report changes nothing.
    c.node_heartbeat("n2", t(620));
    assert!(!c.nodes.contains_key("n2"));

    // A replica that cannot read the Leases judges the same report by its refresh: fresh for three refreshes.
    c.set_heartbeats_read(false);
    c.expire_node_reports(t(620 + 1700));
    assert_eq!(
        c.summary("all").unwrap().live_verified,
        1,
        "within 1 800 s of the last heartbeat"
    );
    c.expire_node_reports(t(620 + 1801));
    assert_eq!(c.summary("all").unwrap().live_verified, 0);
    assert_consistent(&mut c);
}

#[test]
fn sandboxed_runtimes_are_unverified_and_static_pods_join_by_config_hash() {
    let now = Timestamp::from_second(1_000_000).unwrap();
    let mut c = Conformance::new(ClusterFacts::default());
    c.set_policies(policies(&[("all", json!({}))]));
    let hash = "6d7c0b8a0c6e4f1f9a2b3c4d5e6f7a8b";
    let mirror: Pod = serde_json::from_value(json!({
        "metadata": {"namespace": "a", "name": "static-n1", "uid": "0f3c2f7e-1a2b-4c5d-8e9f-0123456789ab",
            "annotations": {"kubernetes.io/config.mirror": hash, "kubernetes.io/config.hash": hash}},
        "spec": {"nodeName": "n1", "containers": [],
            "securityContext": {"sysctls": [{"name": "net.ipv4.tcp_keepalive_time", "value": "60"},
                {"name": "net.ipv4.tcp_keepalive_intvl", "value": "10"},
                {"name": "net.ipv4.tcp_keepalive_probes", "value": "3"}]}},
        "status": {"phase": "Running"}
    }))
    .unwrap();
    let cached = c.cached(mirror).unwrap();
    assert_eq!(
        cached.uid,
        parse_uid(hash),
        "joined by the config hash, not the mirror pod's UID"
    );
    c.upsert_pod(cached);
    let mut kata = on_node(pod("a", "kata", &[], Some("60")), "n1", 2);
    kata.runtime_class = Some("kata".into());
    c.upsert_pod(kata);
    let mut runc = on_node(pod("a", "runc", &[], Some("60")), "n1", 3);
    runc.runtime_class = Some("plain".into());
    c.upsert_pod(runc);
    c.set_runtime_classes(
        [
            ("kata".to_string(), "kata-qemu".to_string()),
            ("plain".to_string(), "runc".to_string()),
        ]
        .into(),
    );
    c.set_node_report(
        "n1",
        node_live(
            1,
            60,
            vec![
                (parse_uid(hash), reading(60, 1, 1)),
                (2, reading(60, 1, 1)),
                (3, reading(60, 1, 1)),
            ],
        ),
        now,
    );
    let s = c.summary("all").unwrap();
    assert_eq!((s.matched, s.live_verified), (3, 2), "the static pod and the runc pod");
    assert_eq!(s.by_reason.get(&Reason::Unverified), Some(&1));
    let kata = s.violations.iter().find(|v| v.name == "kata").unwrap();
    assert!(kata.message.starts_with("sandboxed runtime"), "{}", kata.message);
    assert!(kata.message.contains("kata-qemu"), "{}", kata.message);
    // kata's handler declared runc-like: read like any other.
    c.set_runc_like_handlers(["runc".to_string(), "kata-qemu".to_string()]);
    assert_eq!(c.summary("all").unwrap().live_verified, 3);
    assert_consistent(&mut c);
}

#[test]
fn long_messages_are_cut_on_character_boundaries() {
    assert_eq!(truncated("short".into(), 10), "short");
    let cut = truncated("é".repeat(2000), 1024);
    assert_eq!(cut.chars().count(), 1024);
    assert!(cut.ends_with('…'));
}

#[test]
fn pods_on_a_kubelet_older_than_1_29_are_kubelet_too_old_until_it_is_upgraded() {
    let now = Timestamp::from_second(1_000_000).unwrap();
    let mut c = Conformance::new(ClusterFacts::default());
    c.set_policies(policies(&[
        ("all", json!({})),
        (
            "quiet",
            json!({"podSelector": {"matchLabels": {"keepalive.dev/ignore": "true"}}}),
        ),
    ]));
    c.upsert_pod(on_node(pod("a", "conformant", &[], Some("60")), "old", 1));
    c.upsert_pod(on_node(pod("a", "unmutated", &[], None), "old", 2));
    c.upsert_pod(on_node(
        pod("a", "ignored", &[("keepalive.dev/ignore", "true")], None),
        "old",
        3,
    ));
    let mut hn = on_node(pod("a", "hostnet", &[], None), "old", 4);
    hn.host_network = true;
    c.upsert_pod(hn);
    c.upsert_pod(on_node(pod("a", "elsewhere", &[], Some("60")), "new", 5));
    c.upsert_pod(pod("a", "unbound", &[], Some("60")));
    let before = c.summary("all").unwrap();
    assert_eq!((before.matched, before.conformant), (5, 3));

    c.set_kubelet("new", Some("v1.37.0"));
    c.set_kubelet("old", Some("v1.28.9-eks-abc"));
    // The agent on the old node reads the policy's values: the kubelet still rejects pods carrying them.
    c.set_node_report(
        "old",
        node_live(now.as_second(), 7200, vec![(1, reading(60, 1, 1))]),
        now,
    );
    let s = c.summary("all").unwrap();
    assert_eq!(
        (s.matched, s.conformant, s.live_verified),
        (5, 2, 0),
        "elsewhere and unbound"
    );
    assert_eq!(
        s.by_reason,
        [(Reason::HostNetwork, 1), (Reason::KubeletTooOld, 2)].into()
    );
    let too_old: Vec<&Violation> = s.violations.iter().filter(|v| v.reason == "KubeletTooOld").collect();
    assert_eq!(
        too_old.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["conformant", "unmutated"]
    );
    for v in &too_old {
        assert!(
            v.message.contains("node old runs kubelet v1.28.9-eks-abc"),
            "{}",
            v.message
        );
    }
    assert_eq!(c.summary("quiet").unwrap().matched, 0, "opted-out pods are no one's");
    let st = status(
        &s,
        Some(1),
        ClusterFacts::default(),
        &Injection::Webhook,
        None,
        &Time(now),
    );
    assert_eq!(st.violation_counts.get("KubeletTooOld"), Some(&2));
    assert_eq!(st.conditions[1].status, "False");
    assert!(
        st.conditions[1].message.contains("2 KubeletTooOld"),
        "{}",
        st.conditions[1].message
    );
    assert_consistent(&mut c);

    // A patch release of the old kubelet: still too old, the message follows.
    c.set_kubelet("old", Some("v1.28.10"));
    let s = c.summary("all").unwrap();
    assert!(
        s.violations.iter().any(|v| v.message.contains("kubelet v1.28.10")),
        "{s:?}"
    );
    // Upgraded: judged by spec and the live reading again.
    c.set_kubelet("old", Some("v1.29.0"));
    let s = c.summary("all").unwrap();
    assert_eq!(s.by_reason.get(&Reason::KubeletTooOld), None);
    assert_eq!(s.live_verified, 1, "the live reading counts again");
    assert_eq!(s.by_reason.get(&Reason::LiveMismatch).copied().unwrap_or(0), 0);
    assert_consistent(&mut c);

    // A relist: the node is old again, then gone.
    c.replace_kubelets([("old", "v1.27.3"), ("new", "v1.37.0")]);
    assert_eq!(
        c.summary("all").unwrap().by_reason.get(&Reason::KubeletTooOld),
        Some(&2)
    );
    c.replace_kubelets([("new", "v1.37.0")]);
    assert_eq!(c.summary("all").unwrap().by_reason.get(&Reason::KubeletTooOld), None);
    c.set_kubelet("old", Some("v1.26.0"));
    c.set_kubelet("old", None);
    assert_eq!(c.summary("all").unwrap().by_reason.get(&Reason::KubeletTooOld), None);
    assert_consistent(&mut c);
}

#[test]
fn told_that_kubelets_allow_the_sysctls_no_pod_is_kubelet_too_old() {
    let mut c = Conformance::new(ClusterFacts::from_version("1", "35", true));
    c.set_policies(policies(&[("all", json!({}))]));
    c.set_kubelet("old", Some("v1.28.0"));
    c.upsert_pod(on_node(pod("a", "p", &[], Some("60")), "old", 1));
    let s = c.summary("all").unwrap();
    assert_eq!((s.matched, s.conformant), (1, 1));
}

#[test]
fn connections_are_judged_against_the_idle_timeout_and_the_worst_named() {
    use crate::api::{Destination, KeepaliveSource, SocketGroup, SocketSummary};
    let now = Timestamp::from_second(1_000_000).unwrap();
    let mut c = Conformance::new(ClusterFacts::default());
    c.set_policies(policies(&[("lb", json!({"idleTimeoutSeconds": 350}))]));
    let group = |connections, keepalive, idle, idle_from| SocketGroup {
        connections,
        keepalive,
        idle_from,
        idle_seconds: idle,
        interval_seconds: 15,
        probes: 9,
        user_timeout_ms: 0,
        merged: false,
    };
    let go_client = SocketSummary {
        groups: vec![group(5, true, 15, KeepaliveSource::Socket)],
        weakest: vec![],
    };
    let java = SocketSummary {
        groups: vec![
            group(12, false, 0, KeepaliveSource::Sysctl),
            group(2, true, 60, KeepaliveSource::Sysctl),
        ],
        weakest: vec![Destination {
            remote: "10.0.3.4:5432".into(),
            process: "java".into(),
            keepalive: false,
            idle_seconds: 0,
            connections: 12,
        }],
    };
    let with = |summary: &SocketSummary, established| PodReading {
        sockets: Some(Sockets::from(summary.clone())),
        ..reading(60, established, established)
    };
    c.upsert_pod(on_node(pod("a", "go", &[], Some("60")), "n1", 1));
    c.upsert_pod(on_node(pod("a", "java", &[], Some("60")), "n1", 2));
    c.upsert_pod(on_node(pod("a", "counted", &[], Some("60")), "n1", 3));
    c.set_node_report(
        "n1",
        node_live(
            now.as_second(),
            60,
            vec![(1, with(&go_client, 5)), (2, with(&java, 14)), (3, reading(60, 3, 1))],
        ),
        now,
    );
    let s = c.summary("lb").unwrap();
    // All three hold the policy's values; java's connections will not all survive the load balancer.
    assert_eq!((s.matched, s.conformant, s.live_verified), (3, 2, 3));
    assert_eq!(s.by_reason, [(Reason::ConnectionsUnprotected, 1)].into());
    let counts = s.connections.unwrap();
    assert_eq!(
        (
            counts.established,
            counts.classified,
            counts.protected,
            counts.protected_by_app,
            counts.unarmed
        ),
        (22, 19, 2, 5, 12)
    );
    assert_eq!(counts.worst_dead_peer_seconds, Some(60 + 15 * 9));
    assert_eq!(
        s.violations[0].message,
        "12 of 14 connections will not send a keepalive probe before the 350 s idle timeout: 12 connections to \
         10.0.3.4:5432 from java have no SO_KEEPALIVE (read by the agent on node n1)"
    );
    assert_consistent(&mut c);

    // The pod goes: its connections leave the tallies (the worst dead-peer time with them).
    c.remove_pod(&(Arc::from("a"), Arc::from("java")));
    c.remove_pod(&(Arc::from("a"), Arc::from("go")));
    let counts = c.summary("lb").unwrap().connections.unwrap();
    assert_eq!((counts.classified, counts.worst_dead_peer_seconds), (0, None));
    assert_consistent(&mut c);
}
