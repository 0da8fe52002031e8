//! The decision table, one behaviour per test.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Sysctl};
use serde_json::json;

use super::*;

/// A policy entry from a spec; the keepalive values default to 300/30/3. Shared with the compiler's tests.
pub(crate) fn policy(name: &str, spec: serde_json::Value) -> PolicyEntry {
    let mut spec = spec;
    if spec.get("keepalive").is_none() {
        spec["keepalive"] = json!({"time": 300, "interval": 30, "probes": 3});
    }
    PolicyEntry {
        name: name.into(),
        generation: Some(1),
        spec: serde_json::from_value(spec).unwrap(),
    }
}

fn set(policies: Vec<PolicyEntry>) -> PolicySet {
    PolicySet::new(policies)
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn pod(value: serde_json::Value) -> Pod {
    serde_json::from_value(value).unwrap()
}

fn run<'p>(policies: &'p PolicySet, ns: &[(&str, &str)], p: &Pod) -> Decision<'p> {
    decide(
        policies,
        &labels(ns),
        &PodFacts::new(&p.metadata, p.spec.as_ref()),
        ClusterFacts::default(),
    )
}

fn sysctl(name: &str, value: &str) -> Sysctl {
    Sysctl {
        name: name.into(),
        value: value.into(),
    }
}

fn keepalive(time: &str, intvl: &str, probes: &str) -> Vec<Sysctl> {
    vec![
        sysctl(SYSCTL_TIME, time),
        sysctl(SYSCTL_INTERVAL, intvl),
        sysctl(SYSCTL_PROBES, probes),
    ]
}

fn plain_pod() -> Pod {
    pod(json!({"metadata": {"name": "p", "labels": {"app": "web"}}, "spec": {"containers": []}}))
}

fn pod_with_sysctls(sysctls: &[Sysctl]) -> Pod {
    pod(json!({"metadata": {"name": "p", "labels": {"app": "web"}},
               "spec": {"containers": [], "securityContext": {"sysctls": sysctls}}}))
}

#[test]
fn enforce_adds_all_three_sysctls_to_a_pod_without_any() {
    let ps = set(vec![policy("a", json!({}))]);
    let d = run(&ps, &[], &plain_pod());
    assert_eq!(d.policy.unwrap().name, "a");
    assert_eq!(d.outcome, Outcome::Mutate(keepalive("300", "30", "3")));
}

#[test]
fn no_policy_means_no_change() {
    let ps = set(vec![policy(
        "a",
        json!({"podSelector": {"matchLabels": {"app": "db"}}}),
    )]);
    let d = run(&ps, &[], &plain_pod());
    assert_eq!(d.policy, None);
    assert_eq!(d.outcome, Outcome::Skipped(Skip::NoPolicy));
    assert_eq!(
        run(&set(vec![]), &[], &plain_pod()).outcome,
        Outcome::Skipped(Skip::NoPolicy)
    );
}

#[test]
fn other_sysctls_of_the_pod_are_kept_in_place() {
    let ps = set(vec![policy("a", json!({}))]);
    let own = vec![
        sysctl("net.ipv4.ip_local_port_range", "1024 65000"),
        sysctl("kernel.shm_rmid_forced", "1"),
    ];
    let d = run(&ps, &[], &pod_with_sysctls(&own));
    let mut expected = own.clone();
    expected.extend(keepalive("300", "30", "3"));
    assert_eq!(d.outcome, Outcome::Mutate(expected));
}

#[test]
fn enforce_replaces_the_pods_own_keepalive_values() {
    let ps = set(vec![policy("a", json!({"mode": "Enforce"}))]);
    let own = vec![
        sysctl("kernel.shm_rmid_forced", "1"),
        sysctl(SYSCTL_TIME, "7200"),
        sysctl(SYSCTL_PROBES, "9"),
    ];
    let d = run(&ps, &[], &pod_with_sysctls(&own));
    assert_eq!(
        d.outcome,
        Outcome::Mutate(vec![
            sysctl("kernel.shm_rmid_forced", "1"),
            sysctl(SYSCTL_TIME, "300"),
            sysctl(SYSCTL_PROBES, "3"),
            sysctl(SYSCTL_INTERVAL, "30"),
        ])
    );
}

#[test]
fn fill_mode_keeps_pod_values_and_adds_the_missing_ones() {
    let ps = set(vec![policy("a", json!({"mode": "Fill"}))]);
    let d = run(&ps, &[], &pod_with_sysctls(&[sysctl(SYSCTL_TIME, "60")]));
    assert_eq!(
        d.outcome,
        Outcome::Mutate(vec![
            sysctl(SYSCTL_TIME, "60"),
            sysctl(SYSCTL_INTERVAL, "30"),
            sysctl(SYSCTL_PROBES, "3")
        ])
    );
}

#[test]
fn fill_mode_with_all_three_set_by_the_pod_changes_nothing() {
    let ps = set(vec![policy("a", json!({"mode": "Fill"}))]);
    let d = run(&ps, &[], &pod_with_sysctls(&keepalive("60", "5", "2")));
    assert_eq!(d.outcome, Outcome::AlreadySet);
    assert_eq!(d.policy.unwrap().name, "a");
}

#[test]
fn audit_mode_never_mutates_but_says_what_enforce_would_set() {
    let ps = set(vec![policy("a", json!({"mode": "Audit"}))]);
    let d = run(&ps, &[], &plain_pod());
    assert_eq!(d.outcome, Outcome::Audit(keepalive("300", "30", "3")));
    assert_eq!(d.mutation(), None);
}

#[test]
fn pod_with_exactly_the_policy_values_gets_no_patch() {
    let ps = set(vec![policy("a", json!({}))]);
    let d = run(&ps, &[], &pod_with_sysctls(&keepalive("300", "30", "3")));
    assert_eq!(d.outcome, Outcome::AlreadySet);
    // Numerically equal values count as equal.
    let d = run(&ps, &[], &pod_with_sysctls(&keepalive("0300", "30", " 3")));
    assert_eq!(d.outcome, Outcome::AlreadySet);
}

#[test]
fn higher_priority_wins() {
    let ps = set(vec![
        policy("a", json!({"priority": 1})),
        policy("z", json!({"priority": 5})),
    ]);
    assert_eq!(run(&ps, &[], &plain_pod()).policy.unwrap().name, "z");
}

#[test]
fn equal_priority_the_alphabetically_first_name_wins() {
    let ps = set(vec![
        policy("beta", json!({})),
        policy("alpha", json!({})),
        policy("gamma", json!({})),
    ]);
    assert_eq!(run(&ps, &[], &plain_pod()).policy.unwrap().name, "alpha");
    // Independent of input order.
    let ps = set(vec![
        policy("gamma", json!({})),
        policy("alpha", json!({})),
        policy("beta", json!({})),
    ]);
    assert_eq!(run(&ps, &[], &plain_pod()).policy.unwrap().name, "alpha");
}

#[test]
fn a_higher_priority_policy_that_does_not_select_the_pod_is_passed_over() {
    let ps = set(vec![
        policy(
            "specific",
            json!({"priority": 10, "podSelector": {"matchLabels": {"app": "db"}}}),
        ),
        policy("broad", json!({})),
    ]);
    assert_eq!(run(&ps, &[], &plain_pod()).policy.unwrap().name, "broad");
}

#[test]
fn negative_priority_loses_to_default() {
    let ps = set(vec![policy("a-low", json!({"priority": -100})), policy("b", json!({}))]);
    assert_eq!(run(&ps, &[], &plain_pod()).policy.unwrap().name, "b");
}

#[test]
fn namespace_selector_match_labels() {
    let ps = set(vec![policy(
        "a",
        json!({"namespaceSelector": {"matchLabels": {"team": "payments"}}}),
    )]);
    assert_eq!(
        run(&ps, &[("team", "payments")], &plain_pod()).policy.unwrap().name,
        "a"
    );
    assert_eq!(run(&ps, &[("team", "search")], &plain_pod()).policy, None);
    assert_eq!(run(&ps, &[], &plain_pod()).policy, None);
}

#[test]
fn match_expressions_in_notin_exists_doesnotexist() {
    let sel = |op: &str, values: serde_json::Value| {
        let mut r = json!({"key": "tier", "operator": op});
        if !values.is_null() {
            r["values"] = values;
        }
        set(vec![policy("a", json!({"podSelector": {"matchExpressions": [r]}}))])
    };
    let with_tier = |t: &str| pod(json!({"metadata": {"labels": {"tier": t}}, "spec": {"containers": []}}));
    let without = plain_pod();

    let ps = sel("In", json!(["gold", "silver"]));
    assert!(run(&ps, &[], &with_tier("gold")).policy.is_some());
    assert!(run(&ps, &[], &with_tier("bronze")).policy.is_none());
    assert!(run(&ps, &[], &without).policy.is_none());

    let ps = sel("NotIn", json!(["gold"]));
    assert!(run(&ps, &[], &with_tier("gold")).policy.is_none());
    assert!(run(&ps, &[], &with_tier("bronze")).policy.is_some());
    assert!(
        run(&ps, &[], &without).policy.is_some(),
        "NotIn matches objects without the label"
    );

    let ps = sel("Exists", serde_json::Value::Null);
    assert!(run(&ps, &[], &with_tier("x")).policy.is_some());
    assert!(run(&ps, &[], &without).policy.is_none());

    let ps = sel("DoesNotExist", serde_json::Value::Null);
    assert!(run(&ps, &[], &with_tier("x")).policy.is_none());
    assert!(run(&ps, &[], &without).policy.is_some());
}

#[test]
fn all_requirements_and_labels_must_hold() {
    let ps = set(vec![policy(
        "a",
        json!({"podSelector": {"matchLabels": {"app": "web"},
               "matchExpressions": [{"key": "tier", "operator": "In", "values": ["gold"]}]}}),
    )]);
    let both = pod(json!({"metadata": {"labels": {"app": "web", "tier": "gold"}}, "spec": {"containers": []}}));
    assert!(run(&ps, &[], &both).policy.is_some());
    assert!(run(&ps, &[], &plain_pod()).policy.is_none());
}

#[test]
fn empty_selector_matches_everything() {
    let ps = set(vec![policy("a", json!({"podSelector": {}, "namespaceSelector": {}}))]);
    assert!(run(&ps, &[("x", "y")], &plain_pod()).policy.is_some());
}

#[test]
fn ignored_namespace_is_skipped() {
    let ps = set(vec![policy("a", json!({}))]);
    let d = run(&ps, &[(IGNORE_LABEL, "true")], &plain_pod());
    assert_eq!(d.outcome, Outcome::Skipped(Skip::NamespaceIgnored));
    assert_eq!(d.policy, None);
    // Only "true" opts out.
    assert!(matches!(
        run(&ps, &[(IGNORE_LABEL, "false")], &plain_pod()).outcome,
        Outcome::Mutate(_)
    ));
}

#[test]
fn ignored_pod_is_skipped() {
    let ps = set(vec![policy("a", json!({}))]);
    let p = pod(json!({"metadata": {"labels": {IGNORE_LABEL: "true"}}, "spec": {"containers": []}}));
    assert_eq!(run(&ps, &[], &p).outcome, Outcome::Skipped(Skip::PodIgnored));
}

#[test]
fn hostnetwork_pod_is_skipped() {
    let ps = set(vec![policy("a", json!({}))]);
    let p = pod(json!({"metadata": {}, "spec": {"containers": [], "hostNetwork": true}}));
    let d = run(&ps, &[], &p);
    assert_eq!(d.outcome, Outcome::Skipped(Skip::HostNetwork));
    assert_eq!(
        d.policy.unwrap().name,
        "a",
        "the policy still owns the pod, for reporting"
    );
}

#[test]
fn windows_pod_is_skipped() {
    let ps = set(vec![policy("a", json!({}))]);
    let p = pod(json!({"metadata": {}, "spec": {"containers": [], "os": {"name": "windows"}}}));
    assert_eq!(run(&ps, &[], &p).outcome, Outcome::Skipped(Skip::Unsupported));
    let p = pod(json!({"metadata": {}, "spec": {"containers": [], "os": {"name": "linux"}}}));
    assert!(matches!(run(&ps, &[], &p).outcome, Outcome::Mutate(_)));
}

#[test]
fn cluster_older_than_1_29_injects_nothing_unless_told_kubelets_allow_it() {
    let ps = set(vec![policy("a", json!({}))]);
    let p = plain_pod();
    let facts = PodFacts::new(&p.metadata, p.spec.as_ref());
    let old = ClusterFacts::from_version("1", "28", false);
    assert_eq!(
        decide(&ps, &BTreeMap::new(), &facts, old).outcome,
        Outcome::Skipped(Skip::ClusterTooOld)
    );
    let told = ClusterFacts::from_version("1", "28", true);
    assert!(matches!(
        decide(&ps, &BTreeMap::new(), &facts, told).outcome,
        Outcome::Mutate(_)
    ));
    assert!(ClusterFacts::from_version("1", "29+", false).keepalive_sysctls_safe);
    assert!(ClusterFacts::from_version("1", "35", false).keepalive_sysctls_safe);
    assert!(!ClusterFacts::from_version("1", "27+", false).keepalive_sysctls_safe);
    assert!(!ClusterFacts::from_version("", "", false).keepalive_sysctls_safe);
}

#[test]
fn kubelet_versions_parse_to_their_minor_and_odd_ones_to_none() {
    let table: &[(&str, Option<u32>)] = &[
        ("v1.28.9", Some(28)),
        ("v1.29.0", Some(29)),
        ("v1.37.1", Some(37)),
        ("v1.28.9-eks-4f4795d", Some(28)),
        ("v1.30.2+k3s1", Some(30)),
        ("v1.27.16-gke.1287000", Some(27)),
        ("v1.29.0-alpha.1", Some(29)),
        ("v1.28", Some(28)),
        ("1.28.3", Some(28)),
        (" v1.26.0 ", Some(26)),
        ("v1.28-rc.0", Some(28)),
        ("", None),
        ("v", None),
        ("v1", None),
        ("v1.", None),
        ("v1..3", None),
        ("v1.x.3", None),
        ("v1.28abc", None),
        ("v1.-28", None),
        ("v2.0.0", None),
        ("v0.28.0", None),
        ("V1.28.0", None),
        ("vv1.28.0", None),
        ("v1.99999999999.0", None),
        ("kubelet v1.28.0", None),
        ("v١.٢٨.0", None),
    ];
    for (version, minor) in table {
        assert_eq!(kubelet_minor(version), *minor, "{version:?}");
    }
    assert!(kubelet_rejects_keepalive_sysctls("v1.28.15-eks-1a2b"));
    assert!(kubelet_rejects_keepalive_sysctls("v1.0.0"));
    assert!(!kubelet_rejects_keepalive_sysctls("v1.29.0"));
    assert!(!kubelet_rejects_keepalive_sysctls("v1.37.0"));
    assert!(
        !kubelet_rejects_keepalive_sysctls("garbage"),
        "an unknown kubelet is not judged too old"
    );
    assert!(!kubelet_rejects_keepalive_sysctls(""));
}

#[test]
fn pod_on_a_kubelet_older_than_1_29_is_skipped_unless_told_kubelets_allow_it() {
    let ps = set(vec![policy("a", json!({}))]);
    let p = plain_pod();
    let facts = PodFacts::new(&p.metadata, p.spec.as_ref());
    let on = |version| {
        facts.on(Some(Kubelet {
            node: "node-7",
            version,
        }))
    };
    let new = ClusterFacts::from_version("1", "35", false);
    let too_old = Outcome::Skipped(Skip::KubeletTooOld {
        node: "node-7".into(),
        version: "v1.28.9-eks-abc".into(),
    });
    let d = decide(&ps, &BTreeMap::new(), &on("v1.28.9-eks-abc"), new);
    assert_eq!(d.outcome, too_old);
    assert_eq!(
        d.policy.unwrap().name,
        "a",
        "the policy still owns the pod, for reporting"
    );
    let message = Skip::KubeletTooOld {
        node: "node-7".into(),
        version: "v1.28.9-eks-abc".into(),
    }
    .to_string();
    for part in [
        "node-7",
        "v1.28.9-eks-abc",
        "SysctlForbidden",
        "--allowed-unsafe-sysctls",
    ] {
        assert!(message.contains(part), "{part} in {message}");
    }
    // A newer or unknown kubelet, or no node: judged as before.
    for facts in [on("v1.29.0"), on("v1.37.2"), on(""), on("weird"), facts] {
        assert!(matches!(
            decide(&ps, &BTreeMap::new(), &facts, new).outcome,
            Outcome::Mutate(_)
        ));
    }
    // Told the kubelets allow the sysctls: not judged by version.
    let told = ClusterFacts::from_version("1", "35", true);
    assert!(matches!(
        decide(&ps, &BTreeMap::new(), &on("v1.28.9"), told).outcome,
        Outcome::Mutate(_)
    ));
    // On an old apiserver the pod's own kubelet is the more telling reason.
    let old = ClusterFacts::from_version("1", "28", false);
    assert_eq!(
        decide(&ps, &BTreeMap::new(), &on("v1.28.9-eks-abc"), old).outcome,
        too_old
    );
    // What makes the pod rejected before it reaches a kubelet, or gets it no sysctls, comes first.
    let hn = pod(json!({"metadata": {}, "spec": {"containers": [], "hostNetwork": true}}));
    let hn_facts = PodFacts::new(&hn.metadata, hn.spec.as_ref()).on(Some(Kubelet {
        node: "node-7",
        version: "v1.28.9",
    }));
    assert_eq!(
        decide(&ps, &BTreeMap::new(), &hn_facts, new).outcome,
        Outcome::Skipped(Skip::HostNetwork)
    );
    let pinned = labels(&[
        ("pod-security.kubernetes.io/enforce", "baseline"),
        ("pod-security.kubernetes.io/enforce-version", "v1.28"),
    ]);
    assert!(matches!(
        decide(&ps, &pinned, &on("v1.28.9"), new).outcome,
        Outcome::Skipped(Skip::PodSecurityBlocks { .. })
    ));
    // Opted out or not selected: no verdict at all.
    let ignored = labels(&[(IGNORE_LABEL, "true")]);
    assert_eq!(
        decide(&ps, &ignored, &on("v1.28.9"), new).outcome,
        Outcome::Skipped(Skip::NamespaceIgnored)
    );
    let none = set(vec![]);
    assert_eq!(
        decide(&none, &BTreeMap::new(), &on("v1.28.9"), new).outcome,
        Outcome::Skipped(Skip::NoPolicy)
    );
}

#[test]
fn pod_security_pinned_before_1_29_is_skipped() {
    let ps = set(vec![policy("a", json!({}))]);
    let ns = [
        ("pod-security.kubernetes.io/enforce", "baseline"),
        ("pod-security.kubernetes.io/enforce-version", "v1.28"),
    ];
    assert_eq!(
        run(&ps, &ns, &plain_pod()).outcome,
        Outcome::Skipped(Skip::PodSecurityBlocks {
            level: "baseline".into(),
            version: "v1.28".into()
        })
    );
    let fine = [
        ("pod-security.kubernetes.io/enforce", "baseline"),
        ("pod-security.kubernetes.io/enforce-version", "v1.29"),
    ];
    assert!(matches!(run(&ps, &fine, &plain_pod()).outcome, Outcome::Mutate(_)));
    let latest = [
        ("pod-security.kubernetes.io/enforce", "restricted"),
        ("pod-security.kubernetes.io/enforce-version", "latest"),
    ];
    assert!(matches!(run(&ps, &latest, &plain_pod()).outcome, Outcome::Mutate(_)));
    let privileged = [
        ("pod-security.kubernetes.io/enforce", "privileged"),
        ("pod-security.kubernetes.io/enforce-version", "v1.20"),
    ];
    assert!(matches!(
        run(&ps, &privileged, &plain_pod()).outcome,
        Outcome::Mutate(_)
    ));
}

#[test]
fn index_finds_policies_selected_by_namespace_or_pod_labels() {
    let mut policies: Vec<PolicyEntry> = (0..500)
        .map(|i| {
            policy(
                &format!("p{i:04}"),
                json!({"podSelector": {"matchLabels": {"app": format!("app-{i}")}}}),
            )
        })
        .collect();
    policies.push(policy(
        "ns",
        json!({"priority": -1, "namespaceSelector": {"matchLabels": {"team": "t7"}}}),
    ));
    policies.push(policy(
        "in",
        json!({"priority": -2, "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]}}),
    ));
    let ps = set(policies);
    let p = |labels: serde_json::Value| pod(json!({"metadata": {"labels": labels}, "spec": {"containers": []}}));
    assert_eq!(
        run(&ps, &[], &p(json!({"app": "app-123"}))).policy.unwrap().name,
        "p0123"
    );
    assert_eq!(
        run(&ps, &[("team", "t7")], &p(json!({"app": "other"})))
            .policy
            .unwrap()
            .name,
        "ns"
    );
    assert_eq!(
        run(&ps, &[("team", "t7")], &p(json!({"app": "app-9"})))
            .policy
            .unwrap()
            .name,
        "p0009"
    );
    assert_eq!(run(&ps, &[], &p(json!({"tier": "b"}))).policy.unwrap().name, "in");
    assert_eq!(run(&ps, &[], &p(json!({"tier": "c"}))).policy, None);
}

#[test]
fn index_agrees_with_a_linear_scan() {
    // Every pod × namespace combination: the indexed winner equals the first selecting policy in order.
    let policies = vec![
        policy(
            "a",
            json!({"priority": 3, "podSelector": {"matchLabels": {"app": "web", "tier": "gold"}}}),
        ),
        policy(
            "b",
            json!({"priority": 3, "namespaceSelector": {"matchLabels": {"team": "x"}}}),
        ),
        policy(
            "c",
            json!({"priority": 2, "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "db"]}]}}),
        ),
        policy(
            "d",
            json!({"priority": 1, "podSelector": {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["gold"]}]}}),
        ),
        policy("e", json!({"priority": 0})),
    ];
    let ps = set(policies.clone());
    let label_sets = [
        labels(&[]),
        labels(&[("app", "web")]),
        labels(&[("app", "web"), ("tier", "gold")]),
        labels(&[("app", "db"), ("tier", "gold")]),
        labels(&[("tier", "silver")]),
    ];
    let ns_sets = [labels(&[]), labels(&[("team", "x")]), labels(&[("team", "y")])];
    for pod_labels in &label_sets {
        for ns in &ns_sets {
            let linear = ps
                .entries()
                .iter()
                .find(|e| e.selects(ns, pod_labels))
                .map(|e| e.name.clone());
            assert_eq!(
                ps.winner(ns, pod_labels).map(|e| e.name.clone()),
                linear,
                "{pod_labels:?} in {ns:?}"
            );
        }
    }
}

#[test]
fn patch_creates_security_context_and_annotations_when_absent() {
    let p = plain_pod();
    let ops = patch_operations(
        "",
        Shape::of(&p.metadata, p.spec.as_ref()),
        "a",
        &keepalive("1", "2", "3"),
    );
    let mut doc = serde_json::to_value(&p).unwrap();
    json_patch::patch(&mut doc, &ops).unwrap();
    assert_eq!(
        doc["spec"]["securityContext"]["sysctls"][0],
        json!({"name": SYSCTL_TIME, "value": "1"})
    );
    assert_eq!(doc["metadata"]["annotations"][POLICY_ANNOTATION], "a");
}

#[test]
fn patch_replaces_the_whole_sysctls_list_and_keeps_other_annotations() {
    let mut p = pod_with_sysctls(&[sysctl("kernel.shm_rmid_forced", "1")]);
    p.metadata.annotations = Some([("team".to_string(), "x".to_string())].into());
    p.spec.as_mut().unwrap().security_context.as_mut().unwrap().run_as_user = Some(1000);
    let want = vec![sysctl("kernel.shm_rmid_forced", "1"), sysctl(SYSCTL_TIME, "5")];
    let ops = patch_operations("", Shape::of(&p.metadata, p.spec.as_ref()), "pol", &want);
    let mut doc = serde_json::to_value(&p).unwrap();
    json_patch::patch(&mut doc, &ops).unwrap();
    assert_eq!(
        doc["spec"]["securityContext"]["sysctls"],
        serde_json::to_value(&want).unwrap()
    );
    assert_eq!(doc["spec"]["securityContext"]["runAsUser"], 1000);
    assert_eq!(
        doc["metadata"]["annotations"],
        json!({"team": "x", POLICY_ANNOTATION: "pol"})
    );
}

#[test]
fn decision_lines_say_what_happened() {
    let ps = set(vec![policy("a", json!({}))]);
    assert_eq!(
        run(&ps, &[], &plain_pod()).to_string(),
        format!("policy a: set {SYSCTL_TIME}=300 {SYSCTL_INTERVAL}=30 {SYSCTL_PROBES}=3")
    );
    let p = pod(json!({"metadata": {}, "spec": {"containers": [], "hostNetwork": true}}));
    assert!(
        run(&ps, &[], &p)
            .to_string()
            .starts_with("policy a: skipped (HostNetwork)")
    );
}
