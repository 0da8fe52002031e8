//! The compiled MutatingAdmissionPolicy against `policy::decide`, through a real kube-apiserver (≥ 1.36): generated
//! policy sets, namespaces and pods; each pod is created with dry-run in a namespace carrying the case's labels, and
//! the sysctls and annotation the apiserver returns are compared with what `decide` and the webhook's patch make of
//! the same pod. Zero differences; a difference is printed as YAML.
//!
//! The policies never exist as KeepalivePolicy objects here: the compiler's input is the [`PolicySet`], as in the
//! operator. The binding is scoped to this file's namespaces (a `matchResources.namespaceSelector` added by the test).

mod common;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use common::*;
use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use keepalive_operator::policy::{
    self, ClusterFacts, PodFacts, PolicyEntry, PolicySet, Shape,
    admission_policy::{self, AdmissionPolicy, CompileOptions, FailurePolicy},
    decide, patch_operations,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

/// The label that scopes a test's binding to its namespaces.
const SCOPE: &str = "admission-policy-test";

fn resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", kind))
}

/// Applies the compiled objects (server-side), the binding limited to namespaces labelled `SCOPE=<scope>`.
async fn apply(client: &Client, compiled: &AdmissionPolicy, scope: &str) {
    let params = PatchParams::apply("admission-policy-test").force();
    let mut binding = compiled.binding.clone();
    binding["spec"]["matchResources"] = json!({ "namespaceSelector": { "matchLabels": { SCOPE: scope } } });
    for (kind, object) in [
        ("MutatingAdmissionPolicy", &compiled.policy),
        ("MutatingAdmissionPolicyBinding", &binding),
    ] {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource(kind));
        let name = object["metadata"]["name"].as_str().unwrap();
        api.patch(name, &params, &Patch::Apply(object))
            .await
            .unwrap_or_else(|e| panic!("applying {kind} {name}: {e}"));
    }
}

/// The shared control plane's client and the compile options of one test (`keepalive-<scope>`, failurePolicy
/// Fail: an evaluation error shows as a rejected pod, never as a silently unchanged one); `None` where the
/// apiserver does not serve MutatingAdmissionPolicy v1.
async fn setup(scope: &str) -> Option<(Client, CompileOptions)> {
    let client = control_plane().client().await.unwrap();
    if !served(&client).await {
        return None;
    }
    let options = CompileOptions {
        name: format!("keepalive-{scope}"),
        failure_policy: FailurePolicy::Fail,
        ..Default::default()
    };
    Some((client, options))
}

/// Whether the apiserver serves MutatingAdmissionPolicy v1 (GA in 1.36). On older versions the tests here say so
/// and pass: there is nothing to compile for.
async fn served(client: &Client) -> bool {
    let resources = client
        .list_api_group_resources("admissionregistration.k8s.io/v1")
        .await
        .unwrap();
    let served = resources
        .resources
        .iter()
        .any(|r| r.name == "mutatingadmissionpolicies");
    if !served {
        eprintln!("skipped: this apiserver does not serve admissionregistration.k8s.io/v1 MutatingAdmissionPolicy");
    }
    served
}

async fn create_namespace(client: &Client, name: &str, labels: &BTreeMap<String, String>) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
}

/// What the apiserver made of a pod: its sysctls and `keepalive.dev/policy`, or the error.
type Outcome = Result<(Vec<(String, String)>, Option<String>), String>;

async fn dry_run(client: &Client, namespace: &str, pod: &Value) -> Outcome {
    let pod: Pod = serde_json::from_value(pod.clone()).unwrap();
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    match Api::<Pod>::namespaced(client.clone(), namespace)
        .create(&params, &pod)
        .await
    {
        Ok(created) => Ok((sysctls(&created), policy_annotation(&created))),
        Err(e) => Err(e.to_string()),
    }
}

/// What `decide` and the webhook's patch make of the pod, and `decide`'s outcome (for the tally).
fn expected(set: &PolicySet, namespace_labels: &BTreeMap<String, String>, pod: &Value) -> (Outcome, String) {
    let typed: Pod = serde_json::from_value(pod.clone()).unwrap();
    let facts = PodFacts::new(&typed.metadata, typed.spec.as_ref());
    let decision = decide(set, namespace_labels, &facts, ClusterFacts::default());
    let mut patched = pod.clone();
    let mutation = decision.mutation();
    if let Some((policy, sysctls)) = mutation {
        let ops = patch_operations("", Shape::of(&typed.metadata, typed.spec.as_ref()), policy, sysctls);
        json_patch::patch(&mut patched, &ops).unwrap();
    }
    let patched: Pod = serde_json::from_value(patched).unwrap();
    let kind = match (&decision.outcome, decision.policy.map(|p| p.spec.mode)) {
        (policy::Outcome::Skipped(skip), _) => skip.reason().to_string(),
        (policy::Outcome::AlreadySet, _) => "AlreadySet".to_string(),
        (policy::Outcome::Audit(_), _) => "Audit".to_string(),
        (policy::Outcome::Mutate(_), Some(mode)) => format!("Mutate({mode})"),
        (policy::Outcome::Mutate(_), None) => unreachable!("a mutation has a policy"),
    };
    (Ok((sysctls(&patched), policy_annotation(&patched))), kind)
}

/// What the webhook answers for the same pod (its real, pure `answer`, on an AdmissionReview of the pod), applied
/// to the pod.
fn webhook(set: &PolicySet, namespace: &str, namespace_labels: &BTreeMap<String, String>, pod: &Value) -> Outcome {
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": namespace,
            "operation": "CREATE",
            "object": pod,
        },
    });
    let request = keepalive_operator::webhook::parse(&serde_json::to_vec(&review).unwrap()).unwrap();
    let reviewed = request.object.as_ref().unwrap();
    let (_, response) =
        keepalive_operator::webhook::answer(&request, reviewed, set, namespace_labels, ClusterFacts::default());
    let mut patched = pod.clone();
    if let Some(patch) = response.json_patch() {
        json_patch::patch(&mut patched, &patch).unwrap();
    }
    let patched: Pod = serde_json::from_value(patched).unwrap();
    Ok((sysctls(&patched), policy_annotation(&patched)))
}

/// Waits until the apiserver runs the newest compiled set: the probe policy of that set (highest priority,
/// selecting only the probe pod) annotates the probe pod.
async fn wait_loaded(client: &Client, namespace: &str, probe: &str) -> Duration {
    let started = Instant::now();
    let pod = json!({
        "metadata": { "name": "probe", "labels": { "keepalive-probe": probe } },
        "spec": { "containers": [{ "name": "app", "image": "registry.invalid/app:1" }] },
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let outcome = dry_run(client, namespace, &pod).await;
        if matches!(&outcome, Ok((_, Some(p))) if p == probe) {
            return started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the admission policy of {probe} not loaded after 60 s: {outcome:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SplitMix64: the cases are the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
    fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }
}

const POD_LABELS: &[(&str, &[&str])] = &[
    ("app", &["web", "api", "db"]),
    ("tier", &["front", "back"]),
    ("lb", &["aws-nlb", "gcp"]),
    ("team", &["a", "b", "c"]),
];
const NS_LABELS: &[(&str, &[&str])] = &[
    ("env", &["prod", "dev", "stage"]),
    ("cloud", &["aws", "gcp"]),
    ("team", &["a", "b"]),
];
const IGNORE: &str = "keepalive.dev/ignore";
const PSA_ENFORCE: &str = "pod-security.kubernetes.io/enforce";
const PSA_VERSION: &str = "pod-security.kubernetes.io/enforce-version";
const KEEPALIVE: [&str; 3] = [
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];
/// Sysctls Pod Security baseline allows at every version, and their values.
const OTHER_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv4.tcp_syncookies", "1"),
    ("net.ipv4.ip_local_port_range", "32768 60999"),
    ("kernel.shm_rmid_forced", "0"),
];
/// Own values of keepalive sysctls: the policies' values, other numbers, numbers `decide` reads as equal after
/// trimming and parsing, and text that is no number.
const OWN_VALUES: &[&str] = &[
    "300",
    "30",
    "3",
    "60",
    "9",
    "75",
    "7200",
    " 300",
    "+0300",
    "030 ",
    "abc",
    "",
    "99999999999999999999",
    "-3",
];

fn labels(rng: &mut Rng, vocabulary: &[(&str, &[&str])], percent: usize) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    for (k, values) in vocabulary {
        if rng.percent(percent) {
            labels.insert(k.to_string(), rng.pick(values).to_string());
        }
    }
    labels
}

fn selector(rng: &mut Rng, vocabulary: &[(&str, &[&str])]) -> Option<Value> {
    if rng.percent(40) {
        return None;
    }
    let mut match_labels = serde_json::Map::new();
    for _ in 0..rng.below(3) {
        let (k, values) = rng.pick(vocabulary);
        match_labels.insert(k.to_string(), json!(rng.pick(values)));
    }
    let expressions: Vec<Value> = (0..rng.below(3))
        .map(|_| {
            let (k, values) = rng.pick(vocabulary);
            match *rng.pick(&["In", "NotIn", "Exists", "DoesNotExist"]) {
                op @ ("In" | "NotIn") => {
                    let mut vs: Vec<&str> = (0..1 + rng.below(2)).map(|_| *rng.pick(values)).collect();
                    if rng.percent(15) {
                        vs.push("elsewhere");
                    }
                    vs.sort();
                    vs.dedup();
                    json!({"key": k, "operator": op, "values": vs})
                }
                op => json!({"key": k, "operator": op}),
            }
        })
        .collect();
    Some(json!({"matchLabels": match_labels, "matchExpressions": expressions}))
}

fn policy_set(rng: &mut Rng, probe: &str) -> PolicySet {
    let mut names = vec!["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"];
    let count = 1 + rng.below(6);
    let mut entries = Vec::new();
    for _ in 0..count {
        let name = names.remove(rng.below(names.len()));
        let mut spec = json!({
            "keepalive": {
                "time": rng.pick(&[300, 60, 7200, 30]),
                "interval": rng.pick(&[30, 10, 75]),
                "probes": rng.pick(&[3, 9, 5]),
            },
            "mode": rng.pick(&["Enforce", "Enforce", "Fill", "Audit"]),
            "priority": rng.pick(&[0, 0, 0, 1, 2, -1]),
        });
        if let Some(s) = selector(rng, NS_LABELS) {
            spec["namespaceSelector"] = s;
        }
        if let Some(s) = selector(rng, POD_LABELS) {
            spec["podSelector"] = s;
        }
        entries.push(entry(name, spec));
    }
    entries.push(entry(
        probe,
        json!({
            "keepalive": {"time": 111, "interval": 11, "probes": 1},
            "priority": i32::MAX,
            "podSelector": {"matchLabels": {"keepalive-probe": probe}},
        }),
    ));
    PolicySet::new(entries)
}

fn entry(name: &str, spec: Value) -> PolicyEntry {
    PolicyEntry {
        name: name.to_string(),
        generation: Some(1),
        spec: serde_json::from_value(spec).unwrap(),
    }
}

fn namespace_labels(rng: &mut Rng, scope: &str) -> BTreeMap<String, String> {
    let mut labels = labels(rng, NS_LABELS, 50);
    if rng.percent(35) {
        labels.insert(
            PSA_ENFORCE.into(),
            rng.pick(&["baseline", "restricted", "privileged"]).to_string(),
        );
        if let Some(version) = rng.pick(&[
            Some("v1.22"),
            Some("v1.28"),
            Some("v1.29"),
            Some("v1.31"),
            Some("latest"),
            None,
        ]) {
            labels.insert(PSA_VERSION.into(), version.to_string());
        }
    }
    if rng.percent(8) {
        labels.insert(IGNORE.into(), rng.pick(&["true", "false"]).to_string());
    }
    labels.insert(SCOPE.into(), scope.into());
    labels
}

/// A pod the namespace's Pod Security level admits unless the admission policy wrongly adds sysctls.
fn pod(rng: &mut Rng, ns: &BTreeMap<String, String>) -> Value {
    let enforcing = ns
        .get(PSA_ENFORCE)
        .is_some_and(|l| l == "baseline" || l == "restricted");
    let pinned_before_keepalive = enforcing && ns.get(PSA_VERSION).is_some_and(|v| v == "v1.22" || v == "v1.28");
    let mut labels = labels(rng, POD_LABELS, 55);
    if rng.percent(6) {
        labels.insert(IGNORE.into(), rng.pick(&["true", "false"]).to_string());
    }
    let host_network = !enforcing && rng.percent(8);
    let windows = !enforcing && !host_network && rng.percent(6);
    let mut spec = json!({ "containers": [{ "name": "app", "image": "registry.invalid/app:1" }] });
    if windows {
        spec["os"] = json!({"name": "windows"});
    } else {
        spec["containers"][0]["securityContext"] =
            json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}});
        if enforcing || rng.percent(70) {
            spec["securityContext"] = json!({"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}});
        }
        if host_network {
            spec["hostNetwork"] = json!(true);
        }
        if rng.percent(55) {
            let mut names: Vec<&str> = OTHER_SYSCTLS.iter().map(|(n, _)| *n).collect();
            if !pinned_before_keepalive {
                names.extend(KEEPALIVE);
            }
            if host_network {
                names.retain(|n| !n.starts_with("net."));
            }
            let mut own = Vec::new();
            for _ in 0..1 + rng.below(4) {
                let name = *rng.pick(&names);
                if own.iter().any(|(n, _): &(&str, String)| *n == name) {
                    continue;
                }
                let value = match OTHER_SYSCTLS.iter().find(|(n, _)| *n == name) {
                    Some((_, v)) => v.to_string(),
                    None if rng.percent(60) => {
                        // A policy's value, often written as `decide` still reads it as equal.
                        let number = rng.pick(&["300", "60", "7200", "30", "10", "75", "3", "9", "5"]);
                        let prefix = rng.pick(&["", "", "", " ", "+", "0", "+00", "\t"]);
                        let suffix = rng.pick(&["", "", "", " ", "\n", "\u{a0}"]);
                        format!("{prefix}{number}{suffix}")
                    }
                    None => rng.pick(OWN_VALUES).to_string(),
                };
                own.push((name, value));
            }
            let own: Vec<Value> = own.iter().map(|(n, v)| json!({"name": n, "value": v})).collect();
            spec["securityContext"]["sysctls"] = json!(own);
        }
    }
    let mut metadata = json!({ "name": "case", "labels": labels });
    match rng.below(10) {
        0..=2 => metadata["annotations"] = json!({"note": "kept"}),
        3 => metadata["annotations"] = json!({"keepalive.dev/policy": "earlier"}),
        _ => {}
    }
    json!({ "metadata": metadata, "spec": spec })
}

/// A difference, as YAML: the policies, the namespace's labels, the pod, and both answers.
fn report(set: &PolicySet, ns: &BTreeMap<String, String>, pod: &Value, want: &Outcome, got: &Outcome) -> String {
    // The probe policy selects only the probe pod: left out.
    let policies: Vec<Value> = set
        .entries()
        .iter()
        .filter(|e| !e.name.starts_with("probe-"))
        .map(|e| json!({"name": e.name, "spec": e.spec}))
        .collect();
    let mut pod = pod.clone();
    if let Some(containers) = pod["spec"]["containers"].as_array_mut() {
        containers.clear();
    }
    let answer = |o: &Outcome| match o {
        Ok((sysctls, annotation)) => json!({
            "sysctls": sysctls.iter().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>(),
            "annotation": annotation,
        }),
        Err(e) => json!({ "error": e }),
    };
    serde_norway::to_string(&json!({
        "policies": policies,
        "namespaceLabels": ns,
        "pod (containers left out)": pod,
        "decide": answer(want),
        "admissionPolicy": answer(got),
    }))
    .unwrap()
}

#[tokio::test]
async fn compiled_policy_agrees_with_decide_on_generated_cases() {
    const SETS: usize = 42;
    const NAMESPACES_PER_SET: usize = 6;
    const PODS_PER_SET: usize = 50;
    let Some((client, options)) = setup("differential").await else {
        return;
    };
    let scope = "differential";
    let probe_ns = "ap-probe";
    create_namespace(
        &client,
        probe_ns,
        &BTreeMap::from([(SCOPE.to_string(), scope.to_string())]),
    )
    .await;
    let mut rng = Rng(0x6b65_6570_616c_6976);
    let started = Instant::now();
    let (mut cases, mut differences, mut webhook_differences) = (0, Vec::new(), Vec::new());
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let mut load_times = Vec::new();
    for s in 0..SETS {
        let probe = format!("probe-{s:02}");
        let set = policy_set(&mut rng, &probe);
        let compiled = admission_policy::compile(&set, &options).expect("a small set compiles");
        apply(&client, &compiled, scope).await;
        let mut namespaces = Vec::new();
        for n in 0..NAMESPACES_PER_SET {
            let name = format!("ap-s{s:02}-n{n}");
            let labels = namespace_labels(&mut rng, scope);
            create_namespace(&client, &name, &labels).await;
            namespaces.push((name, labels));
        }
        load_times.push(wait_loaded(&client, probe_ns, &probe).await);
        let pods: Vec<(usize, Value)> = (0..PODS_PER_SET)
            .map(|_| {
                let n = rng.below(NAMESPACES_PER_SET);
                (n, pod(&mut rng, &namespaces[n].1))
            })
            .collect();
        let results: Vec<(usize, Value, Outcome)> = stream::iter(pods)
            .map(|(n, pod)| {
                let client = client.clone();
                let ns = namespaces[n].0.clone();
                async move {
                    let got = dry_run(&client, &ns, &pod).await;
                    (n, pod, got)
                }
            })
            .buffered(8)
            .collect()
            .await;
        // Each mutated pod again, as the apiserver returned it: `decide` finds it already set, and the
        // admission policy leaves it as it is (what a reinvocation sees).
        let mut again = Vec::new();
        for (n, pod, got) in results {
            cases += 1;
            let (want, kind) = expected(&set, &namespaces[n].1, &pod);
            *tally.entry(kind.clone()).or_default() += 1;
            let hook = webhook(&set, &namespaces[n].0, &namespaces[n].1, &pod);
            if hook != want {
                webhook_differences.push(report(&set, &namespaces[n].1, &pod, &want, &hook));
            }
            if want != got {
                differences.push(report(&set, &namespaces[n].1, &pod, &want, &got));
            } else if let (true, Ok((sysctls, Some(annotation)))) = (kind.starts_with("Mutate"), &got) {
                let mut pod = pod.clone();
                let sysctls: Vec<Value> = sysctls.iter().map(|(n, v)| json!({"name": n, "value": v})).collect();
                pod["spec"]["securityContext"]["sysctls"] = json!(sysctls);
                pod["metadata"]["annotations"]["keepalive.dev/policy"] = json!(annotation);
                again.push((n, pod));
            }
        }
        for (n, pod) in again {
            let got = dry_run(&client, &namespaces[n].0, &pod).await;
            cases += 1;
            let (want, kind) = expected(&set, &namespaces[n].1, &pod);
            *tally.entry(format!("again: {kind}")).or_default() += 1;
            let hook = webhook(&set, &namespaces[n].0, &namespaces[n].1, &pod);
            if hook != want {
                webhook_differences.push(report(&set, &namespaces[n].1, &pod, &want, &hook));
            }
            if want != got {
                differences.push(report(&set, &namespaces[n].1, &pod, &want, &got));
            }
        }
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{cases} cases ({SETS} policy sets, {} namespaces; {tally:?}): {} differences with decide \
         ({} between decide and the webhook) in {:.1} s",
        SETS * NAMESPACES_PER_SET,
        differences.len(),
        webhook_differences.len(),
        elapsed.as_secs_f64()
    );
    load_times.sort();
    eprintln!(
        "a recompiled set took effect after {:?} (median), {:?} (max); the namespaces were created meanwhile",
        load_times[load_times.len() / 2],
        load_times[load_times.len() - 1]
    );
    for d in differences.iter().take(5) {
        eprintln!("---\n{d}");
    }
    assert!(
        webhook_differences.is_empty(),
        "the webhook differs from decide: {webhook_differences:#?}"
    );
    assert!(cases >= 2000);
    assert!(differences.is_empty(), "{} of {cases} cases differ", differences.len());
}

/// The largest set the compiler emits (an object of almost `MAX_OBJECT_BYTES`: the set is cut where it stops
/// fitting) is accepted by the apiserver and evaluates within its CEL cost limits, even for a pod that only the
/// last compiled policy selects and whose label every earlier policy compares with all its values.
#[tokio::test]
async fn largest_compilable_set_is_accepted_and_evaluates_within_cost_limits() {
    let Some((client, options)) = setup("capacity").await else {
        return;
    };
    let scope = "capacity";
    let entries = (0..3000).map(|i| {
        let values: Vec<String> = (0..20).map(|j| format!("v{i:04}-{j:02}")).collect();
        entry(
            &format!("capacity-{i:04}"),
            json!({
                "keepalive": {"time": 100 + i, "interval": 10, "probes": 3},
                "namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["never"]}]},
                "podSelector": {"matchExpressions": [{"key": "k", "operator": "In", "values": values}]},
            }),
        )
    });
    let set = PolicySet::new(entries);
    let err = admission_policy::compile(&set, &options).expect_err("3000 such policies exceed the object limit");
    assert!(matches!(
        err.not_compiled[0].1,
        admission_policy::Limit::ObjectTooLarge { .. }
    ));
    let compiled = *err.partial;
    let last = &set.entries()[compiled.compiled - 1];
    let bytes = serde_json::to_vec(&compiled.policy).unwrap().len();
    eprintln!(
        "{} of {} policies compiled, {bytes} bytes",
        compiled.compiled,
        set.len()
    );
    let ns = "ap-capacity";
    create_namespace(
        &client,
        ns,
        &BTreeMap::from([
            (SCOPE.to_string(), scope.to_string()),
            ("env".to_string(), "prod".to_string()),
        ]),
    )
    .await;
    let started = Instant::now();
    apply(&client, &compiled, scope).await;
    let value = format!("{}-00", last.name.replace("capacity-", "v"));
    let pod = json!({
        "metadata": { "name": "last", "labels": { "k": value } },
        "spec": { "containers": [{ "name": "app", "image": "registry.invalid/app:1" }] },
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let got = loop {
        let got = dry_run(&client, ns, &pod).await;
        if matches!(&got, Ok((_, Some(_)))) || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("loaded and evaluated after {:.1} s", started.elapsed().as_secs_f64());
    let t = last.spec.keepalive.time.to_string();
    assert_eq!(
        got,
        Ok((
            vec![
                (KEEPALIVE[0].to_string(), t),
                (KEEPALIVE[1].to_string(), "10".to_string()),
                (KEEPALIVE[2].to_string(), "3".to_string()),
            ],
            Some(last.name.clone())
        ))
    );
    // No policy selects it: every branch of every chunk is evaluated, and nothing changes.
    let none = json!({
        "metadata": { "name": "none", "labels": { "k": "v9999-99" } },
        "spec": { "containers": [{ "name": "app", "image": "registry.invalid/app:1" }] },
    });
    let timed = Instant::now();
    assert_eq!(dry_run(&client, ns, &none).await, Ok((Vec::new(), None)));
    eprintln!(
        "a pod no policy selects: {:.0} ms",
        timed.elapsed().as_secs_f64() * 1000.0
    );
}

/// Label keys and values are data in the CEL text: quotes, backslashes, control characters and non-ASCII text in a
/// selector (matchLabels keys and values are free text in the CRD) make a valid expression that still decides as
/// `decide` does.
#[tokio::test]
async fn unusual_label_text_is_quoted() {
    let Some((client, options)) = setup("quoting").await else {
        return;
    };
    let scope = "quoting";
    let odd = "we\"ird\\key\n\t\u{7f}é✓' ${x} \\u0041";
    let set = PolicySet::new([
        entry(
            "odd",
            json!({
                "keepalive": {"time": 200, "interval": 20, "probes": 2},
                "priority": 1,
                "namespaceSelector": {"matchLabels": {odd: odd}},
                "podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": [odd, "x\"y"]}]},
            }),
        ),
        entry(
            "plain",
            json!({
                "keepalive": {"time": 300, "interval": 30, "probes": 3},
                "podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": [odd, "x\"y"]}]},
            }),
        ),
    ]);
    let compiled = admission_policy::compile(&set, &options).unwrap();
    let ns = "ap-quoting";
    let labels = BTreeMap::from([(SCOPE.to_string(), scope.to_string())]);
    create_namespace(&client, ns, &labels).await;
    apply(&client, &compiled, scope).await;
    let pod = json!({
        "metadata": { "name": "p", "labels": { "app": "web" } },
        "spec": { "containers": [{ "name": "app", "image": "registry.invalid/app:1" }] },
    });
    let (want, _) = expected(&set, &labels, &pod);
    assert_eq!(want.as_ref().unwrap().1.as_deref(), Some("plain"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = dry_run(&client, ns, &pod).await;
        if got == want {
            break;
        }
        assert!(Instant::now() < deadline, "{got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Namespace labels are read at admission time (`namespaceObject`): relabelling a namespace changes which policy
/// its pods get, with no recompile and no new apply.
#[tokio::test]
async fn namespace_relabel_takes_effect_without_recompile() {
    let Some((client, options)) = setup("relabel").await else {
        return;
    };
    let scope = "relabel";
    let set = PolicySet::new([entry(
        "prod-only",
        json!({
            "keepalive": {"time": 250, "interval": 25, "probes": 5},
            "namespaceSelector": {"matchLabels": {"env": "prod"}},
        }),
    )]);
    let compiled = admission_policy::compile(&set, &options).unwrap();
    let ns = "ap-relabel";
    create_namespace(&client, ns, &BTreeMap::from([(SCOPE.to_string(), scope.to_string())])).await;
    apply(&client, &compiled, scope).await;
    let pod = json!({
        "metadata": { "name": "p" },
        "spec": { "containers": [{ "name": "app", "image": "registry.invalid/app:1" }] },
    });
    // Loaded: a pod of a namespace labelled env=prod at creation is mutated.
    let loaded_ns = "ap-relabel-prod";
    create_namespace(
        &client,
        loaded_ns,
        &BTreeMap::from([
            (SCOPE.to_string(), scope.to_string()),
            ("env".to_string(), "prod".to_string()),
        ]),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(dry_run(&client, loaded_ns, &pod).await, Ok((_, Some(_)))) {
        assert!(
            Instant::now() < deadline,
            "the admission policy was not loaded after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dry_run(&client, ns, &pod).await, Ok((Vec::new(), None)));
    let started = Instant::now();
    let patch = json!({"metadata": {"labels": {"env": "prod"}}});
    Api::<Namespace>::all(client.clone())
        .patch(ns, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let want = Ok((
        vec![
            (KEEPALIVE[0].to_string(), "250".to_string()),
            (KEEPALIVE[1].to_string(), "25".to_string()),
            (KEEPALIVE[2].to_string(), "5".to_string()),
        ],
        Some("prod-only".to_string()),
    ));
    loop {
        let got = dry_run(&client, ns, &pod).await;
        if got == want {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{got:?} 30 s after relabelling"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "the relabelled namespace's pods got the policy after {:?}",
        started.elapsed()
    );
}
