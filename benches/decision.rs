//! The decision function alone: time per pod against 100 and 1 000 policies, next to a linear scan over the
//! same policies (the baseline, measured in the same run). Targets: ≤ 10 µs per pod at 100 policies,
//! ≤ 50 µs at 1 000.
//!
//! Run: cargo bench --bench decision

use std::{collections::BTreeMap, hint::black_box, time::Instant};

use k8s_openapi::api::core::v1::Pod;
use keepalive_operator::policy::{ClusterFacts, PodFacts, PolicyEntry, PolicySet, decide};
use serde_json::json;

/// A realistic mix: most policies select by a pod label (app), some by a namespace label (team), some by
/// matchExpressions only, a few match everything at low priority.
fn policies(n: usize) -> Vec<PolicyEntry> {
    (0..n)
        .map(|i| {
            let spec = match i % 10 {
                0..=5 => json!({"podSelector": {"matchLabels": {"app": format!("app-{i}")}}}),
                6 | 7 => json!({"namespaceSelector": {"matchLabels": {"team": format!("team-{i}")}},
                                "podSelector": {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["batch"]}]}}),
                8 => json!({"podSelector": {"matchExpressions": [{"key": "component", "operator": "In", "values": [format!("c-{i}"), "x"]}]}}),
                _ => json!({"priority": -((i % 7) as i32), "podSelector": {"matchExpressions": [{"key": "env", "operator": "Exists"}]}}),
            };
            let mut spec = spec;
            spec["keepalive"] = json!({"time": 300, "interval": 30, "probes": 3});
            spec["priority"] = spec.get("priority").cloned().unwrap_or(json!(i % 3));
            PolicyEntry { name: format!("policy-{i:05}"), generation: Some(1), spec: serde_json::from_value(spec).unwrap() }
        })
        .collect()
}

fn pods(n_policies: usize) -> Vec<(BTreeMap<String, String>, Pod)> {
    (0..256)
        .map(|i| {
            let ns: BTreeMap<String, String> =
                [("team".to_string(), format!("team-{}", (i * 7) % n_policies)), ("kubernetes.io/metadata.name".into(), format!("ns-{i}"))].into();
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": format!("pod-{i}"), "labels": {
                    "app": format!("app-{}", (i * 13) % (n_policies * 2)), "tier": if i.is_multiple_of(4) { "batch" } else { "web" },
                    "pod-template-hash": "5d8f7c9b6", "app.kubernetes.io/part-of": "shop"}},
                "spec": {"containers": [{"name": "c", "image": "x"}],
                         "securityContext": {"sysctls": [{"name": "net.ipv4.ip_local_port_range", "value": "1024 65000"}]}}
            }))
            .unwrap();
            (ns, pod)
        })
        .collect()
}

/// ns per call of `f`, over enough iterations to take ~1 s.
fn measure(mut f: impl FnMut(usize)) -> f64 {
    let mut iterations = 1usize;
    loop {
        let start = Instant::now();
        for i in 0..iterations {
            f(i);
        }
        let elapsed = start.elapsed();
        if elapsed.as_millis() > 700 {
            return elapsed.as_nanos() as f64 / iterations as f64;
        }
        iterations *= 2;
    }
}

fn main() {
    println!("decision function: time per pod (256 different pods, cycled)");
    println!(
        "{:>9} {:>14} {:>14} {:>9} {:>22}",
        "policies", "decide (µs)", "linear (µs)", "speedup", "target"
    );
    for (n, target) in [(100usize, 10.0), (1000, 50.0), (10_000, f64::NAN)] {
        let set = PolicySet::new(policies(n));
        let pods = pods(n);
        let facts: Vec<_> = pods
            .iter()
            .map(|(ns, p)| (ns, PodFacts::new(&p.metadata, p.spec.as_ref())))
            .collect();
        let cluster = ClusterFacts::default();
        let indexed = measure(|i| {
            let (ns, pod) = &facts[i % facts.len()];
            black_box(decide(&set, ns, pod, cluster));
        });
        // Baseline: the same decision without the index, scanning every policy in precedence order.
        let linear = measure(|i| {
            let (ns, pod) = &facts[i % facts.len()];
            black_box(set.entries().iter().find(|e| e.selects(ns, pod.labels)));
        });
        // Both find the same winners.
        for (ns, pod) in &facts {
            let a = set.winner(ns, pod.labels).map(|e| &e.name);
            let b = set
                .entries()
                .iter()
                .find(|e| e.selects(ns, pod.labels))
                .map(|e| &e.name);
            assert_eq!(a, b);
        }
        let verdict = if target.is_nan() {
            "-".to_string()
        } else if indexed / 1000.0 <= target {
            format!("≤ {target} µs: met")
        } else {
            format!("≤ {target} µs: MISSED")
        };
        println!(
            "{n:>9} {:>14.3} {:>14.3} {:>8.1}x {verdict:>22}",
            indexed / 1000.0,
            linear / 1000.0,
            linear / indexed
        );
    }
}
