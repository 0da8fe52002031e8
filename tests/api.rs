//! The KeepalivePolicy API against a real kube-apiserver + etcd: the CRD installs, valid policies are stored,
//! every invalid one is rejected by the apiserver with the field named, and kubectl prints the columns.

use std::{path::Path, sync::OnceLock};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use keepalive_operator::api::{self, KeepalivePolicy, KeepalivePolicySpec, Mode};
use kube::{
    Api, Resource, ResourceExt,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use xtask::ControlPlane;

/// The shared control plane with the committed CRD installed.
fn control_plane() -> &'static ControlPlane {
    static READY: OnceLock<()> = OnceLock::new();
    let cp = xtask::shared();
    READY.get_or_init(|| cp.install_crds().expect("installing the committed CRDs"));
    cp
}

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn dynamic_api(client: kube::Client) -> Api<DynamicObject> {
    Api::all_with(client, &ApiResource::erase::<KeepalivePolicy>(&()))
}

fn policy_json(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "keepalive.dev/v1alpha1",
        "kind": "KeepalivePolicy",
        "metadata": { "name": name },
        "spec": spec,
    }))
    .unwrap()
}

#[test]
fn committed_crds_match_the_generated_ones() {
    for (arg, expected, name) in [
        ("policies", api::crd_yaml(), "keepalivepolicies.keepalive.dev.yaml"),
        (
            "node-reports",
            api::node_report_crd_yaml(),
            "keepalivenodereports.keepalive.dev.yaml",
        ),
    ] {
        let generated = std::process::Command::new(env!("CARGO_BIN_EXE_keepalive-operator"))
            .args(["crd", arg])
            .output()
            .unwrap();
        assert!(generated.status.success());
        let generated = String::from_utf8(generated.stdout).unwrap();
        assert_eq!(generated, expected);
        for dir in ["crds", "charts/keepalive-operator/crds"] {
            let committed = std::fs::read_to_string(repo(&format!("{dir}/{name}"))).unwrap_or_default();
            assert!(
                committed == generated,
                "{dir}/{name} differs from `keepalive-operator crd {arg}`; regenerate it:\n  \
                 cargo run -- crd {arg} > crds/{name} && cp crds/{name} charts/keepalive-operator/crds/"
            );
        }
    }
    // Without an argument, `crd` prints the policy CRD.
    let default = std::process::Command::new(env!("CARGO_BIN_EXE_keepalive-operator"))
        .arg("crd")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(default.stdout).unwrap(), api::crd_yaml());
}

#[tokio::test]
async fn crd_installs_and_becomes_established() {
    let cp = control_plane();
    let crds: Api<CustomResourceDefinition> = Api::all(cp.client().await.unwrap());
    for name in ["keepalivepolicies.keepalive.dev", "keepalivenodereports.keepalive.dev"] {
        let conditions = crds
            .get(name)
            .await
            .unwrap()
            .status
            .unwrap()
            .conditions
            .unwrap_or_default();
        for wanted in ["Established", "NamesAccepted"] {
            assert!(
                conditions.iter().any(|c| c.type_ == wanted && c.status == "True"),
                "{name}: {wanted} not True: {conditions:?}"
            );
        }
    }
    let crd = crds.get("keepalivepolicies.keepalive.dev").await.unwrap();
    assert_eq!(crd.spec.scope, "Cluster");
    assert_eq!(crd.spec.names.short_names, Some(vec!["kap".to_string()]));
    // The short name resolves through discovery, as users type it.
    let out = cp
        .kubectl_output(&["api-resources", "--api-group=keepalive.dev", "--no-headers"])
        .unwrap();
    let rows: Vec<Vec<&str>> = out.lines().map(|l| l.split_whitespace().collect()).collect();
    assert!(
        rows.iter().any(|r| r.starts_with(&["keepalivepolicies", "kap"])),
        "{out}"
    );
    assert!(
        rows.iter().any(|r| r.starts_with(&["keepalivenodereports", "kanr"])),
        "{out}"
    );
}

#[tokio::test]
async fn every_example_is_stored_and_read_back() {
    let cp = control_plane();
    let policies: Api<KeepalivePolicy> = Api::all(cp.client().await.unwrap());
    let mut seen = 0;
    for entry in std::fs::read_dir(repo("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let expected: KeepalivePolicy =
            serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            text.starts_with('#'),
            "{}: every example starts with a comment saying what it is for",
            path.display()
        );
        cp.kubectl_output(&["apply", "-f", path.to_str().unwrap()]).unwrap();
        let stored = policies.get(&expected.name_unchecked()).await.unwrap();
        assert_eq!(stored.spec, expected.spec, "{}", path.display());
        seen += 1;
    }
    assert!(seen >= 5, "examples/ should hold at least five policies, found {seen}");
}

#[tokio::test]
async fn the_apiserver_applies_defaults() {
    let cp = control_plane();
    let api = dynamic_api(cp.client().await.unwrap());
    let created = api
        .create(
            &PostParams::default(),
            &policy_json(
                "defaults",
                json!({"keepalive": {"time": 60, "interval": 10, "probes": 5}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(created.data["spec"]["mode"], "Enforce");
    assert_eq!(created.data["spec"]["priority"], 0);
    let typed: KeepalivePolicy = Api::all(cp.client().await.unwrap()).get("defaults").await.unwrap();
    assert_eq!(typed.spec.mode, Mode::Enforce);
    assert_eq!(typed.spec.keepalive.dead_peer_seconds(), 110);
}

#[tokio::test]
async fn invalid_policies_are_rejected_naming_the_field() {
    let cp = control_plane();
    let api = dynamic_api(cp.client().await.unwrap());
    let ok = json!({"time": 300, "interval": 30, "probes": 3});
    let cases: Vec<(&str, Value, &[&str])> = vec![
        (
            "time-zero",
            json!({"keepalive": {"time": 0, "interval": 30, "probes": 3}}),
            &["spec.keepalive.time", "greater than or equal to 1"],
        ),
        (
            "probes-128",
            json!({"keepalive": {"time": 300, "interval": 30, "probes": 128}}),
            &["spec.keepalive.probes", "less than or equal to 127"],
        ),
        (
            "interval-40000",
            json!({"keepalive": {"time": 300, "interval": 40000, "probes": 3}}),
            &["spec.keepalive.interval", "less than or equal to 32767"],
        ),
        (
            "time-too-big",
            json!({"keepalive": {"time": 32768, "interval": 30, "probes": 3}}),
            &["spec.keepalive.time", "less than or equal to 32767"],
        ),
        (
            "probes-missing",
            json!({"keepalive": {"time": 300, "interval": 30}}),
            &["spec.keepalive.probes", "Required value"],
        ),
        (
            "keepalive-missing",
            json!({"mode": "Enforce"}),
            &["spec.keepalive", "Required value"],
        ),
        (
            "idle-equal-time",
            json!({"idleTimeoutSeconds": 300, "keepalive": ok}),
            &[
                "spec.idleTimeoutSeconds",
                "spec.keepalive.time must be less than spec.idleTimeoutSeconds",
            ],
        ),
        (
            "idle-below-time",
            json!({"idleTimeoutSeconds": 240, "keepalive": ok}),
            &[
                "spec.idleTimeoutSeconds",
                "spec.keepalive.time must be less than spec.idleTimeoutSeconds",
            ],
        ),
        (
            "idle-zero",
            json!({"idleTimeoutSeconds": 0, "keepalive": {"time": 1, "interval": 1, "probes": 1}}),
            &["spec.idleTimeoutSeconds"],
        ),
        (
            "unknown-mode",
            json!({"mode": "Strict", "keepalive": ok}),
            &["spec.mode", "Unsupported value: \"Strict\""],
        ),
        (
            "bad-operator",
            json!({"keepalive": ok, "podSelector": {"matchExpressions": [{"key": "app", "operator": "Contains", "values": ["x"]}]}}),
            &[
                "spec.podSelector.matchExpressions[0].operator",
                "Unsupported value: \"Contains\"",
            ],
        ),
        (
            "in-without-values",
            json!({"keepalive": ok, "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In"}]}}),
            &[
                "spec.namespaceSelector.matchExpressions[0].values",
                "must be non-empty when operator is In",
            ],
        ),
        (
            "exists-with-values",
            json!({"keepalive": ok, "podSelector": {"matchExpressions": [{"key": "team", "operator": "Exists", "values": ["a"]}]}}),
            &[
                "spec.podSelector.matchExpressions[0].values",
                "must be empty when operator is Exists",
            ],
        ),
        (
            "bad-label-key",
            json!({"keepalive": ok, "podSelector": {"matchExpressions": [{"key": "-bad key", "operator": "Exists"}]}}),
            &["spec.podSelector.matchExpressions[0].key"],
        ),
        (
            "time-not-a-number",
            json!({"keepalive": {"time": "300s", "interval": 30, "probes": 3}}),
            &["spec.keepalive.time"],
        ),
    ];
    let mut failures = Vec::new();
    for (name, spec, wanted) in &cases {
        let name = format!("invalid-{name}");
        match api
            .create(&PostParams::default(), &policy_json(&name, spec.clone()))
            .await
        {
            Ok(_) => failures.push(format!("{name}: accepted, but should be rejected")),
            Err(kube::Error::Api(status)) => {
                let (code, message) = (status.code, &status.message);
                if code != 422 {
                    failures.push(format!("{name}: HTTP {code} instead of 422: {message}"));
                }
                for w in *wanted {
                    if !message.contains(w) {
                        failures.push(format!("{name}: message lacks {w:?}: {message}"));
                    }
                }
            }
            Err(e) => failures.push(format!("{name}: unexpected error {e}")),
        }
        // Nothing of a rejected policy is stored.
        assert!(api.get_opt(&name).await.unwrap().is_none(), "{name} was stored");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn kubectl_get_prints_the_columns() {
    let cp = control_plane();
    let client = cp.client().await.unwrap();
    let policies: Api<KeepalivePolicy> = Api::all(client);
    let spec: KeepalivePolicySpec = serde_json::from_value(json!({
        "keepalive": {"time": 45, "interval": 9, "probes": 4},
        "mode": "Fill",
        "idleTimeoutSeconds": 350,
    }))
    .unwrap();
    let policy = KeepalivePolicy::new("printer-columns", spec);
    policies.create(&PostParams::default(), &policy).await.unwrap();
    // Status is a subresource: the controller writes it with server-side apply.
    let status = json!({
        "apiVersion": "keepalive.dev/v1alpha1",
        "kind": "KeepalivePolicy",
        "status": {"observedGeneration": 1, "matchedPods": 7, "conformantPods": 5, "liveVerifiedPods": 4,
            "connections": {"established": 12, "keepalive": 9, "classified": 12, "protected": 6, "protectedByApp": 2,
                "armedTooLate": 1, "unarmed": 3},
            "connectionCoverage": "9/12", "protectedConnections": "8/12"},
    });
    policies
        .patch_status(
            "printer-columns",
            &PatchParams::apply("keepalive-operator-test").force(),
            &Patch::Apply(&status),
        )
        .await
        .unwrap();

    for resource in ["keepalivepolicies", "kap", "keepalivepolicy.keepalive.dev"] {
        let out = cp.kubectl_output(&["get", resource, "printer-columns"]).unwrap();
        let lines: Vec<Vec<&str>> = out.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(
            lines[0],
            [
                "NAME",
                "TIME",
                "INTERVAL",
                "PROBES",
                "MODE",
                "MATCHED",
                "CONFORMANT",
                "LIVE",
                "COVERAGE",
                "PROTECTED",
                "AGE"
            ],
            "kubectl get {resource}:\n{out}"
        );
        assert_eq!(
            lines[1][..10],
            ["printer-columns", "45", "9", "4", "Fill", "7", "5", "4", "9/12", "8/12"],
            "kubectl get {resource}:\n{out}"
        );
        assert!(
            lines[1][10].ends_with('s') || lines[1][10].ends_with('m'),
            "AGE column: {out}"
        );
    }
    // The status subresource is all the status patch touched: the spec is unchanged.
    let stored = policies.get("printer-columns").await.unwrap();
    assert_eq!(stored.spec, policy.spec);
    assert_eq!(stored.meta().generation, Some(1));
}
