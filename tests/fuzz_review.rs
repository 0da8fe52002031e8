//! Generated-review fuzzing of the webhook's parse + answer: structured AdmissionReviews with pods of every
//! shape (labels, sysctls with good and bad values, hostNetwork and os of every JSON type, missing and null
//! parts), each also mutated at the byte level (truncated, bytes flipped, spliced), against a policy set of every
//! mode and selector kind. Invariants: no panic, every parsed review is allowed with its uid echoed, and every
//! patch applies to the object the apiserver sent and leaves the three keepalive sysctls in it.
//!
//! CI runs a short run; `cargo xtask fuzz` runs ten million cases in release mode. KEEPALIVE_FUZZ_CASES and
//! KEEPALIVE_FUZZ_SEED choose the count and the seed.

use std::{collections::BTreeMap, time::Instant};

use keepalive_operator::{
    policy::{ClusterFacts, PolicyEntry, PolicySet},
    webhook::{self, ReviewOutcome},
};
use serde_json::{Value, json};

/// xorshift64*: fast, deterministic from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

const KEYS: [&str; 5] = ["app", "tier", "team", "keepalive.dev/ignore", "x"];
const VALUES: [&str; 6] = ["web", "db", "gold", "true", "", "ünïcode"];
const SYSCTLS: [&str; 5] = [
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
];

fn policies() -> PolicySet {
    let entry = |name: &str, spec: Value| PolicyEntry {
        name: name.into(),
        generation: Some(1),
        spec: serde_json::from_value(spec).unwrap(),
    };
    let ka = json!({"time": 300, "interval": 30, "probes": 3});
    PolicySet::new([
        entry("all", json!({"keepalive": ka})),
        entry(
            "fill-web",
            json!({"priority": 5, "mode": "Fill", "podSelector": {"matchLabels": {"app": "web"}}, "keepalive": {"time": 60, "interval": 5, "probes": 2}}),
        ),
        entry(
            "audit-db",
            json!({"priority": 5, "mode": "Audit", "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["db"]}]}, "keepalive": ka}),
        ),
        entry(
            "gold",
            json!({"priority": 3, "namespaceSelector": {"matchLabels": {"tier": "gold"}}, "keepalive": {"time": 100, "interval": 10, "probes": 9}}),
        ),
        entry(
            "not-x",
            json!({"priority": 2, "podSelector": {"matchExpressions": [{"key": "x", "operator": "DoesNotExist"}, {"key": "team", "operator": "NotIn", "values": ["db"]}]}, "keepalive": ka}),
        ),
        entry(
            "exists",
            json!({"priority": 1, "podSelector": {"matchExpressions": [{"key": "team", "operator": "Exists"}]}, "keepalive": ka}),
        ),
    ])
}

/// A JSON value of any type, sometimes the expected one.
fn any_value(rng: &mut Rng, expected: Value) -> Value {
    match rng.below(25) {
        0 => Value::Null,
        1 => json!(rng.below(1 << 20)),
        2 => json!("x"),
        3 => json!([expected.clone()]),
        4 => json!({}),
        _ => expected,
    }
}

fn labels(rng: &mut Rng) -> Value {
    let n = rng.below(4);
    let map: serde_json::Map<String, Value> = (0..n)
        .map(|_| (rng.pick(&KEYS).to_string(), json!(rng.pick(&VALUES))))
        .collect();
    Value::Object(map)
}

fn sysctl_value(rng: &mut Rng) -> Value {
    let values = [
        json!("300"),
        json!("60"),
        json!(" 30 "),
        json!("-1"),
        json!("99999999999999999999"),
        json!("abc"),
        json!(""),
        json!(7),
        Value::Null,
    ];
    rng.pick(&values).clone()
}

fn pod(rng: &mut Rng) -> Value {
    let mut metadata = serde_json::Map::new();
    if rng.chance(80) {
        metadata.insert("name".into(), json!("p"));
    }
    if rng.chance(70) {
        let l = labels(rng);
        metadata.insert("labels".into(), any_value(rng, l));
    }
    if rng.chance(50) {
        metadata.insert("annotations".into(), any_value(rng, json!({"a": "b"})));
    }
    let mut spec = serde_json::Map::new();
    spec.insert("containers".into(), json!([{"name": "c", "image": "i"}]));
    if rng.chance(30) {
        let host_network = json!(rng.chance(50));
        spec.insert("hostNetwork".into(), any_value(rng, host_network));
    }
    if rng.chance(20) {
        let os = json!({"name": if rng.chance(50) { "windows" } else { "linux" }});
        spec.insert("os".into(), any_value(rng, os));
    }
    if rng.chance(60) {
        let list: Vec<Value> = (0..rng.below(5))
            .map(|_| {
                let name = *rng.pick(&SYSCTLS);
                let mut s = json!({"name": name, "value": sysctl_value(rng)});
                if rng.chance(5) {
                    s = any_value(rng, s);
                }
                s
            })
            .collect();
        let sc = json!({"sysctls": list, "runAsNonRoot": true});
        spec.insert("securityContext".into(), any_value(rng, sc));
    }
    let mut object = serde_json::Map::new();
    if rng.chance(95) {
        object.insert("metadata".into(), any_value(rng, Value::Object(metadata)));
    }
    if rng.chance(95) {
        object.insert("spec".into(), any_value(rng, Value::Object(spec)));
    }
    any_value(rng, Value::Object(object))
}

fn review(rng: &mut Rng) -> Value {
    let kind = if rng.chance(90) { "Pod" } else { "Deployment" };
    let operation = if rng.chance(90) { "CREATE" } else { "UPDATE" };
    let mut request = json!({
        "uid": format!("uid-{}", rng.below(1000)),
        "kind": {"group": "", "version": "v1", "kind": kind},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "ns", "operation": operation, "userInfo": {"username": "u"},
        "object": pod(rng),
    });
    if rng.chance(5) {
        request["subResource"] = json!("status");
    }
    if rng.chance(3) {
        request = any_value(rng, request);
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request})
}

/// Byte-level damage to a serialized review.
fn mutate_bytes(rng: &mut Rng, bytes: &mut Vec<u8>) {
    match rng.below(4) {
        0 => bytes.truncate(rng.below(bytes.len() as u64 + 1) as usize),
        1 => {
            for _ in 0..=rng.below(4) {
                let i = rng.below(bytes.len().max(1) as u64) as usize;
                if let Some(b) = bytes.get_mut(i) {
                    *b = rng.next() as u8;
                }
            }
        }
        2 => {
            let i = rng.below(bytes.len() as u64 + 1) as usize;
            let insert = *rng.pick(&[&b"{"[..], b"}", b"\"", b"null", b",", b"\\u0000", b"[1e999]"]);
            bytes.splice(i..i, insert.iter().copied());
        }
        _ => {
            let (a, b) = (
                rng.below(bytes.len() as u64 + 1) as usize,
                rng.below(bytes.len() as u64 + 1) as usize,
            );
            let (a, b) = (a.min(b), a.max(b));
            bytes.drain(a..b);
        }
    }
}

/// One case through parse + answer, checking the invariants.
fn case(body: &[u8], policies: &PolicySet, namespace_labels: &BTreeMap<String, String>) -> ReviewOutcome {
    let Ok(request) = webhook::parse(body) else {
        return ReviewOutcome::Invalid;
    };
    let Some(pod) = request.object.as_ref() else {
        return ReviewOutcome::Unchanged;
    };
    let (outcome, response) = webhook::answer(&request, pod, policies, namespace_labels, ClusterFacts::default());
    assert!(response.allowed, "the webhook never denies");
    assert_eq!(response.uid, request.uid);
    if outcome == ReviewOutcome::Mutated {
        let patch = response.json_patch().expect("a mutation carries a JSON patch");
        // The parser skips the fields it does not read without checking their UTF-8; read it back leniently.
        let mut review: Value = serde_json::from_str(&String::from_utf8_lossy(body)).unwrap();
        let object = review.pointer_mut("/request/object").unwrap();
        json_patch::patch(object, &patch).expect("the patch applies to the object the apiserver sent");
        let names: Vec<&str> = object
            .pointer("/spec/securityContext/sysctls")
            .and_then(Value::as_array)
            .unwrap()
            .iter()
            .filter_map(|s| s["name"].as_str())
            .collect();
        for name in &SYSCTLS[..3] {
            assert!(names.contains(name), "{name} after the patch: {names:?}");
        }
    }
    outcome
}

#[test]
fn generated_reviews_never_panic_and_always_allow() {
    let cases: u64 = std::env::var("KEEPALIVE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000);
    let seed: u64 = std::env::var("KEEPALIVE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x6b65_6570_616c_6976);
    let policies = policies();
    let namespaces = [
        BTreeMap::new(),
        BTreeMap::from([("tier".to_string(), "gold".to_string())]),
        BTreeMap::from([("keepalive.dev/ignore".to_string(), "true".to_string())]),
        BTreeMap::from([
            ("pod-security.kubernetes.io/enforce".to_string(), "baseline".to_string()),
            (
                "pod-security.kubernetes.io/enforce-version".to_string(),
                "v1.28".to_string(),
            ),
        ]),
    ];
    let mut rng = Rng(seed | 1);
    let mut outcomes: BTreeMap<&str, u64> = BTreeMap::new();
    let mut panics = 0u64;
    let start = Instant::now();
    for i in 0..cases {
        let mut body = serde_json::to_vec(&review(&mut rng)).unwrap();
        if i % 4 == 3 {
            mutate_bytes(&mut rng, &mut body);
        }
        let ns = rng.pick(&namespaces);
        match std::panic::catch_unwind(|| case(&body, &policies, ns)) {
            Ok(outcome) => *outcomes.entry(outcome.as_str()).or_default() += 1,
            Err(_) => {
                panics += 1;
                eprintln!("case {i} (seed {seed}) panicked on: {}", String::from_utf8_lossy(&body));
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "fuzz: {cases} generated reviews (seed {seed}) in {seconds:.1} s ({:.0} cases/s), {panics} panics; outcomes {outcomes:?}",
        cases as f64 / seconds
    );
    assert_eq!(panics, 0);
    // The generator reaches every path: not only parse errors.
    for outcome in ["mutated", "unchanged", "skipped", "invalid"] {
        assert!(
            outcomes.get(outcome).copied().unwrap_or(0) > 0,
            "no {outcome} case in {outcomes:?}"
        );
    }
}
