//! The Helm chart with the real helm against the real apiserver: lint, the values schema (with its rule that
//! `failurePolicy: Fail` needs 2 replicas), the NetworkPolicy and priority classes as configured, `helm install`
//! (in `chart/install.rs`) with every object as it should be (the apiserver's own Pod Security and Priority
//! admission judge the pod templates, its validation the NetworkPolicy),
//! `helm upgrade`, `helm uninstall` keeping the CRDs and policies. Its RBAC is proven sufficient by running the
//! operator and the agent on this host with tokens of the chart's ServiceAccounts instead of admin credentials,
//! and minimal by `kubectl auth can-i`.
//!
//! This file uses the process's control plane without pre-installed CRDs (`xtask::shared()`, not
//! `common::control_plane()`), so the CRDs come from the chart's `crds/`, as for a user.

mod common;
// The install test, apart: it is most of the file.
#[path = "chart/install.rs"]
mod install;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use common::*;
use serde_json::{Value, json};
use xtask::ControlPlane;

const NS: &str = "keepalive-chart";
const RELEASE: &str = "ka";
const FULLNAME: &str = "ka-keepalive-operator";
/// The agent's namespace by default: the release namespace + "-agent".
const AGENT_NS: &str = "keepalive-chart-agent";
/// The MutatingAdmissionPolicy and its binding the operator creates in admissionPolicy mode.
const POLICIES: &str = "ka-keepalive-operator-policies";
/// The fallback MutatingWebhookConfiguration the operator registers in admissionPolicy mode.
const FALLBACK: &str = "ka-keepalive-operator-fallback";
/// What `helm template --api-versions` says to emulate a cluster serving MutatingAdmissionPolicy v1 (1.36+).
const MAP_API: &str = "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy";

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/keepalive-operator")
}

fn cp() -> &'static ControlPlane {
    xtask::shared()
}

/// Runs helm; Ok(stdout) or Err(stdout + stderr).
fn run_helm(args: &[&str]) -> Result<String, String> {
    let out = cp().helm().args(args).output().expect("running helm");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

fn helm_ok(args: &[&str]) -> String {
    run_helm(args).unwrap_or_else(|e| panic!("helm {} failed:\n{e}", args.join(" ")))
}

/// `helm template` of the chart with `--set` values, as a list of objects. Without `--api-versions`, helm's
/// capabilities hold no kinds: the cluster it renders for does not serve MutatingAdmissionPolicy v1.
fn template(kube_version: &str, sets: &[&str]) -> Vec<Value> {
    render(kube_version, &[], sets)
}

/// `helm template` for a cluster that serves MutatingAdmissionPolicy v1 (Kubernetes 1.36+).
fn template_map(kube_version: &str, sets: &[&str]) -> Vec<Value> {
    render(kube_version, &[MAP_API], sets)
}

fn render(kube_version: &str, api_versions: &[&str], sets: &[&str]) -> Vec<Value> {
    let args = template_args(kube_version, api_versions, sets);
    let yaml = helm_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    serde_norway::Deserializer::from_str(&yaml)
        .filter_map(|doc| {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            (!v.is_null()).then_some(v)
        })
        .collect()
}

/// The arguments of `helm template` in the release namespace.
fn template_args(kube_version: &str, api_versions: &[&str], sets: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["template", RELEASE, chart_dir().to_str().unwrap(), "--namespace", NS]
        .map(String::from)
        .into();
    args.extend(["--kube-version".to_string(), kube_version.to_string()]);
    for a in api_versions {
        args.extend(["--api-versions".to_string(), a.to_string()]);
    }
    for s in sets {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    args
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

fn kinds(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

/// An object from the apiserver as JSON.
fn get(kind: &str, name: &str, ns: Option<&str>) -> Option<Value> {
    let mut args = vec!["get", kind, name, "-o", "json"];
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    cp().kubectl_output(&args)
        .ok()
        .map(|s| serde_json::from_str(&s).unwrap())
}

/// The rules of a Role or ClusterRole as comparable strings: "group resource[/name] verb".
fn rules(role: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        let strings = |k: &str| -> Vec<String> {
            rule[k]
                .as_array()
                .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
                .unwrap_or_default()
        };
        let names = strings("resourceNames");
        for group in strings("apiGroups") {
            for resource in strings("resources") {
                for verb in strings("verbs") {
                    let group = if group.is_empty() { "core" } else { group.as_str() };
                    if names.is_empty() {
                        out.insert(format!("{group} {resource} {verb}"));
                    }
                    for n in &names {
                        out.insert(format!("{group} {resource}/{n} {verb}"));
                    }
                }
            }
        }
    }
    out
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The container args of the rendered operator Deployment.
fn rendered_args(objects: &[Value]) -> Vec<String> {
    let deployment = find(objects, "Deployment", FULLNAME).expect("the operator Deployment");
    strings(&deployment["spec"]["template"]["spec"]["containers"][0]["args"])
        .into_iter()
        .map(String::from)
        .collect()
}

/// The value of `--flag=value` in `args`, which must give it at most once.
fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let prefix = format!("{flag}=");
    let values: Vec<&str> = args.iter().filter_map(|a| a.strip_prefix(&prefix)).collect();
    assert!(values.len() <= 1, "{flag} given {} times: {args:?}", values.len());
    values.first().copied()
}

/// The value of a flag that carries JSON, parsed.
fn json_flag(args: &[String], name: &str) -> Value {
    let text = flag(args, name).unwrap_or_else(|| panic!("{name} missing from {args:?}"));
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}: {text}"))
}

/// The flags of admissionPolicy mode; webhook mode passes none of them, but the fallback where the cluster serves
/// MutatingAdmissionPolicy v1 (the operator then deletes that fallback if admissionPolicy mode left it).
const ADMISSION_POLICY_FLAGS: [&str; 5] = [
    "--fallback-webhook-configuration",
    "--admission-policy-failure-policy",
    "--admission-policy-namespace-selector",
    "--admission-policy-object-selector",
    "--owner-cluster-role",
];

/// The operator's ClusterRole rules in every mode.
const OPERATOR_RULES: &[&str] = &[
    "keepalive.dev keepalivepolicies list",
    "keepalive.dev keepalivepolicies watch",
    "keepalive.dev keepalivenodereports list",
    "keepalive.dev keepalivenodereports watch",
    "keepalive.dev keepalivenodereports patch",
    "keepalive.dev keepalivenodereports delete",
    "keepalive.dev keepalivepolicies/status patch",
    "core nodes list",
    "core nodes watch",
    "node.k8s.io runtimeclasses list",
    "node.k8s.io runtimeclasses watch",
    "core pods list",
    "core pods watch",
    "core namespaces list",
    "core namespaces watch",
    "events.k8s.io events create",
    "events.k8s.io events patch",
];

/// The operator's ClusterRole rules: [`OPERATOR_RULES`] and those of the injection mode. In admissionPolicy mode:
/// the fallback webhook configuration (created, patched, deleted; its caBundle read and watched with self-managed
/// certificates) and its own ClusterRole (read, the owner). In webhook mode: its webhook configuration's caBundle
/// (self-managed certificates). Where the cluster serves MutatingAdmissionPolicy v1, in either mode: the policy and
/// its binding, and in webhook mode the fallback deleted (left from admissionPolicy mode).
fn operator_rules(admission_policy_mode: bool, map_served: bool, self_managed_certs: bool) -> BTreeSet<String> {
    let mut rules = set(OPERATOR_RULES);
    let mwc = "admissionregistration.k8s.io mutatingwebhookconfigurations";
    let ca_verbs: &[&str] = if self_managed_certs {
        &["get", "list", "watch"]
    } else {
        &[]
    };
    if admission_policy_mode {
        for verb in ca_verbs.iter().chain(&["create", "patch", "delete"]) {
            rules.insert(format!("{mwc}/{FALLBACK} {verb}"));
        }
        rules.insert(format!("rbac.authorization.k8s.io clusterroles/{FULLNAME} get"));
    } else {
        if self_managed_certs {
            for verb in ca_verbs.iter().chain(&["patch"]) {
                rules.insert(format!("{mwc}/{FULLNAME} {verb}"));
            }
        }
        if map_served {
            rules.insert(format!("{mwc}/{FALLBACK} delete"));
        }
    }
    if map_served {
        for resource in ["mutatingadmissionpolicies", "mutatingadmissionpolicybindings"] {
            for verb in ["create", "patch", "delete"] {
                rules.insert(format!("admissionregistration.k8s.io {resource}/{POLICIES} {verb}"));
            }
        }
    }
    rules
}

#[test]
fn helm_lint_is_clean() {
    let chart = chart_dir();
    for strict in [false, true] {
        let mut args = vec!["lint", chart.to_str().unwrap()];
        if strict {
            args.push("--strict");
        }
        let out = helm_ok(&args);
        assert!(out.contains("1 chart(s) linted, 0 chart(s) failed"), "{out}");
        assert!(!out.contains("[WARNING]") && !out.contains("[ERROR]"), "{out}");
    }
}

#[test]
fn a_typo_in_values_fails_with_the_schemas_message() {
    let chart = chart_dir();
    let dir = cp().work_dir().join("bad-values");
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            "webhook:\n  failurePolicy: Ignored\n",
            "at '/webhook/failurePolicy': value must be one of 'Ignore', 'Fail'",
        ),
        (
            "webhook:\n  timeoutSeconds: \"5\"\n",
            "at '/webhook/timeoutSeconds': got string, want integer",
        ),
        ("webhook:\n  timeoutSeconds: 60\n", "at '/webhook/timeoutSeconds'"),
        (
            "operator:\n  replica: 3\n",
            "at '/operator': additional properties 'replica' not allowed",
        ),
        (
            "agent:\n  enabled: \"no\"\n",
            "at '/agent/enabled': got string, want boolean",
        ),
        (
            "webhook:\n  objectSelector:\n    matchExpressions: [{key: a, operator: Equals}]\n",
            "value must be one of 'In', 'NotIn', 'Exists', 'DoesNotExist'",
        ),
        (
            "injection:\n  mode: foo\n",
            "at '/injection/mode': value must be one of 'auto', 'webhook', 'admissionPolicy'",
        ),
        (
            "injection:\n  admissionPolicy:\n    failurePolicy: fail\n",
            "at '/injection/admissionPolicy/failurePolicy': value must be one of 'Ignore', 'Fail'",
        ),
    ];
    for (i, (values, message)) in cases.iter().enumerate() {
        let file = dir.join(format!("bad-{i}.yaml"));
        std::fs::write(&file, values).unwrap();
        let err = run_helm(&[
            "template",
            RELEASE,
            chart.to_str().unwrap(),
            "--kube-version",
            "1.35.0",
            "-f",
            file.to_str().unwrap(),
        ])
        .expect_err(values);
        assert!(
            err.contains("values don't meet the specifications of the schema"),
            "{values}: {err}"
        );
        assert!(err.contains(message), "{values}: expected {message:?} in:\n{err}");
    }
    // helm install stops at the same message, before creating anything.
    let file = dir.join("bad-0.yaml");
    let err = run_helm(&[
        "install",
        "bad",
        chart.to_str().unwrap(),
        "--namespace",
        "keepalive-chart-bad",
        "--create-namespace",
        "-f",
        file.to_str().unwrap(),
    ])
    .expect_err("install with a bad values file");
    assert!(err.contains(cases[0].1), "{err}");
    assert!(get("namespace", "keepalive-chart-bad", None).is_none());
    assert!(get("mutatingwebhookconfiguration", "bad-keepalive-operator", None).is_none());
}

#[test]
fn options_render_as_documented() {
    // Defaults: everything but the optional parts.
    let objects = template("1.35.0", &[]);
    let all = kinds(&objects);
    for k in [
        "Deployment/ka-keepalive-operator",
        "Service/ka-keepalive-operator",
        "PodDisruptionBudget/ka-keepalive-operator",
        "MutatingWebhookConfiguration/ka-keepalive-operator",
        "DaemonSet/ka-keepalive-operator-agent",
        "ServiceAccount/ka-keepalive-operator",
        "ServiceAccount/ka-keepalive-operator-agent",
        "ClusterRole/ka-keepalive-operator",
        "ClusterRole/ka-keepalive-operator-agent",
        "ClusterRoleBinding/ka-keepalive-operator",
        "ClusterRoleBinding/ka-keepalive-operator-agent",
        "Role/ka-keepalive-operator",
        "RoleBinding/ka-keepalive-operator",
        "Namespace/keepalive-chart-agent",
        "NetworkPolicy/ka-keepalive-operator-agent",
        "ValidatingAdmissionPolicy/ka-keepalive-operator-agent-node-bound",
        "ValidatingAdmissionPolicyBinding/ka-keepalive-operator-agent-node-bound",
        "ValidatingAdmissionPolicy/ka-keepalive-operator-agent-heartbeat-bound",
        "ValidatingAdmissionPolicyBinding/ka-keepalive-operator-agent-heartbeat-bound",
        "Role/ka-keepalive-operator-agent-heartbeats",
        "RoleBinding/ka-keepalive-operator-agent-heartbeats",
        "Role/ka-keepalive-operator-heartbeat-reader",
        "RoleBinding/ka-keepalive-operator-heartbeat-reader",
    ] {
        assert!(all.contains(k), "{k} missing from {all:?}");
    }
    assert!(all.contains("NetworkPolicy/ka-keepalive-operator"), "{all:?}");
    assert_eq!(all.len(), 24, "{all:?}");
    // The agent and everything of it in its own namespace; the operator's in the release namespace.
    for o in &objects {
        let (kind, name) = (o["kind"].as_str().unwrap(), o["metadata"]["name"].as_str().unwrap());
        let expected = match (kind, o["metadata"]["labels"]["app.kubernetes.io/component"].as_str()) {
            ("Namespace", _) => None,
            ("DaemonSet" | "ServiceAccount" | "NetworkPolicy" | "Role" | "RoleBinding", Some("agent")) => {
                Some(AGENT_NS)
            }
            // The operator reads the agents' heartbeat Leases in their namespace.
            ("Role" | "RoleBinding", Some("operator")) if name.ends_with("-heartbeat-reader") => Some(AGENT_NS),
            (_, _) if o["metadata"].get("namespace").is_none() => None,
            _ => Some(NS),
        };
        assert_eq!(o["metadata"]["namespace"].as_str(), expected, "{kind}/{name}");
    }
    let binding = find(&objects, "ClusterRoleBinding", "ka-keepalive-operator-agent").unwrap();
    assert_eq!(binding["subjects"][0]["namespace"], AGENT_NS);
    // The heartbeat Leases: the agent creates and renews them, the operator lists and watches them; nothing else.
    let agent_leases = rules(find(&objects, "Role", "ka-keepalive-operator-agent-heartbeats").unwrap());
    assert_eq!(
        agent_leases.into_iter().collect::<Vec<_>>(),
        ["coordination.k8s.io leases create", "coordination.k8s.io leases patch"]
    );
    let reader = rules(find(&objects, "Role", "ka-keepalive-operator-heartbeat-reader").unwrap());
    assert_eq!(
        reader.into_iter().collect::<Vec<_>>(),
        ["coordination.k8s.io leases list", "coordination.k8s.io leases watch"]
    );
    let reader_binding = find(&objects, "RoleBinding", "ka-keepalive-operator-heartbeat-reader").unwrap();
    assert_eq!(
        (
            &reader_binding["subjects"][0]["name"],
            &reader_binding["subjects"][0]["namespace"]
        ),
        (&json!("ka-keepalive-operator"), &json!(NS))
    );
    let operator = find(&objects, "Deployment", "ka-keepalive-operator").unwrap();
    let env = &operator["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        env.as_array()
            .unwrap()
            .contains(&json!({"name": "KEEPALIVE_AGENT_NAMESPACE", "value": AGENT_NS})),
        "{env}"
    );
    let agent = find(&objects, "DaemonSet", "ka-keepalive-operator-agent").unwrap();
    let sc = &agent["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(sc["appArmorProfile"]["type"], "Unconfined");

    // Another agent namespace, or one the user provides.
    let objects = template("1.35.0", &["agent.namespace=node-agents"]);
    assert_eq!(
        find(&objects, "DaemonSet", "ka-keepalive-operator-agent").unwrap()["metadata"]["namespace"],
        "node-agents"
    );
    assert!(find(&objects, "Namespace", "node-agents").is_some());
    let policy = find(
        &objects,
        "ValidatingAdmissionPolicy",
        "ka-keepalive-operator-agent-node-bound",
    )
    .unwrap();
    assert_eq!(
        policy["spec"]["matchConditions"][0]["expression"],
        "request.userInfo.username == \"system:serviceaccount:node-agents:ka-keepalive-operator-agent\""
    );
    let objects = template(
        "1.35.0",
        &["agent.namespace=node-agents", "agent.createNamespace=false"],
    );
    assert!(objects.iter().all(|o| o["kind"] != "Namespace"));
    // The release namespace cannot be created by the chart.
    let chart = chart_dir();
    let err = run_helm(&[
        "template",
        RELEASE,
        chart.to_str().unwrap(),
        "--namespace",
        NS,
        "--kube-version",
        "1.35.0",
        "--set",
        &format!("agent.namespace={NS}"),
    ])
    .expect_err("the agent in the release namespace, created by the chart");
    assert!(err.contains("agent.namespace is the release namespace"), "{err}");
    let objects = template(
        "1.35.0",
        &[&format!("agent.namespace={NS}"), "agent.createNamespace=false"],
    );
    assert_eq!(
        find(&objects, "DaemonSet", "ka-keepalive-operator-agent").unwrap()["metadata"]["namespace"],
        NS
    );

    // 1.30 is the oldest Kubernetes the chart installs on (node names in tokens, ValidatingAdmissionPolicy v1):
    // helm refuses 1.29, naming the constraint; 1.30 gets the policy and the appArmorProfile field.
    let err = run_helm(&[
        "template",
        RELEASE,
        chart_dir().to_str().unwrap(),
        "--namespace",
        NS,
        "--kube-version",
        "1.29.0",
    ])
    .expect_err("the chart on Kubernetes 1.29");
    assert!(err.contains(">=1.30.0-0") && err.contains("1.29.0"), "{err}");
    let objects = template("1.30.0", &[]);
    assert!(
        find(
            &objects,
            "ValidatingAdmissionPolicy",
            "ka-keepalive-operator-agent-node-bound"
        )
        .is_some()
    );
    let agent = find(&objects, "DaemonSet", "ka-keepalive-operator-agent").unwrap();
    let template_ = &agent["spec"]["template"];
    assert_eq!(
        template_["spec"]["containers"][0]["securityContext"]["appArmorProfile"]["type"],
        "Unconfined"
    );
    assert!(template_["metadata"]["annotations"].is_null());

    // cert-manager: a Certificate (and a self-signed Issuer), the CA injected from it, the operator reading the
    // mounted Secret, and no access to Secrets or to the webhook configuration.
    let objects = template("1.35.0", &["certManager.enabled=true"]);
    let cert = find(&objects, "Certificate", "ka-keepalive-operator-webhook").expect("Certificate");
    assert_eq!(cert["spec"]["secretName"], "ka-keepalive-operator-webhook-tls");
    assert!(strings(&cert["spec"]["dnsNames"]).contains(&"ka-keepalive-operator.keepalive-chart.svc"));
    assert_eq!(cert["spec"]["issuerRef"]["name"], "ka-keepalive-operator-selfsigned");
    assert!(find(&objects, "Issuer", "ka-keepalive-operator-selfsigned").is_some());
    let webhook = find(&objects, "MutatingWebhookConfiguration", FULLNAME).unwrap();
    assert_eq!(
        webhook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "keepalive-chart/ka-keepalive-operator-webhook"
    );
    let deployment = find(&objects, "Deployment", FULLNAME).unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    let args = strings(&pod["containers"][0]["args"]);
    assert!(
        args.contains(&"--tls-cert-file=/etc/keepalive-operator/tls/tls.crt"),
        "{args:?}"
    );
    assert!(
        args.contains(&"--tls-key-file=/etc/keepalive-operator/tls/tls.key"),
        "{args:?}"
    );
    assert!(!args.iter().any(|a| a.starts_with("--tls-secret")), "{args:?}");
    assert_eq!(
        pod["volumes"][0]["secret"]["secretName"],
        "ka-keepalive-operator-webhook-tls"
    );
    assert_eq!(pod["containers"][0]["volumeMounts"][0]["readOnly"], true);
    let role = rules(find(&objects, "Role", FULLNAME).unwrap());
    assert!(role.iter().all(|r| !r.contains("secrets")), "{role:?}");
    let cluster_role = rules(find(&objects, "ClusterRole", FULLNAME).unwrap());
    assert!(
        cluster_role
            .iter()
            .all(|r| !r.contains("mutatingwebhookconfigurations")),
        "{cluster_role:?}"
    );
    // Nodes (UIDs for node reports, kubelet versions): watched, nothing more.
    let on_nodes: Vec<&str> = cluster_role
        .iter()
        .map(String::as_str)
        .filter(|r| {
            r.split(' ')
                .nth(1)
                .is_some_and(|r| r == "nodes" || r.starts_with("nodes/"))
        })
        .collect();
    assert_eq!(on_nodes, ["core nodes list", "core nodes watch"], "{cluster_role:?}");
    // An existing issuer instead.
    let objects = template(
        "1.35.0",
        &[
            "certManager.enabled=true",
            "certManager.issuerRef.name=corp-ca",
            "certManager.issuerRef.kind=ClusterIssuer",
        ],
    );
    assert!(find(&objects, "Issuer", "ka-keepalive-operator-selfsigned").is_none());
    let cert = find(&objects, "Certificate", "ka-keepalive-operator-webhook").unwrap();
    assert_eq!(
        cert["spec"]["issuerRef"],
        json!({"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"})
    );

    // ServiceMonitor on, agent off, single replica without leader election, webhook by URL.
    let objects = template(
        "1.35.0",
        &[
            "serviceMonitor.enabled=true",
            "serviceMonitor.labels.release=prom",
            "agent.enabled=false",
            "operator.replicas=1",
            "operator.leaderElection.enabled=false",
            "webhook.url=https://10.1.2.3:8443/mutate",
            "webhook.excludedNamespaces={kube-system,monitoring}",
        ],
    );
    let sm = find(&objects, "ServiceMonitor", FULLNAME).expect("ServiceMonitor");
    assert_eq!(sm["metadata"]["labels"]["release"], "prom");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    let all = kinds(&objects);
    assert!(all.iter().all(|k| !k.contains("agent")), "{all:?}");
    let deployment = find(&objects, "Deployment", FULLNAME).unwrap();
    assert_eq!(deployment["spec"]["replicas"], 1);
    let args = strings(&deployment["spec"]["template"]["spec"]["containers"][0]["args"]);
    assert!(args.contains(&"--leader-elect=false"), "{args:?}");
    let role = rules(find(&objects, "Role", FULLNAME).unwrap());
    assert!(role.iter().all(|r| !r.contains("leases")), "{role:?}");
    let webhook = &find(&objects, "MutatingWebhookConfiguration", FULLNAME).unwrap()["webhooks"][0];
    assert_eq!(webhook["clientConfig"], json!({"url": "https://10.1.2.3:8443/mutate"}));
    assert_eq!(
        webhook["namespaceSelector"]["matchExpressions"][0]["values"],
        json!(["kube-system", "monitoring", NS])
    );
    // With the agent, its namespace is excluded too.
    let objects = template("1.35.0", &[]);
    let webhook = &find(&objects, "MutatingWebhookConfiguration", FULLNAME).unwrap()["webhooks"][0];
    assert_eq!(
        webhook["namespaceSelector"]["matchExpressions"][0]["values"],
        json!(["kube-system", NS, AGENT_NS])
    );
}

#[test]
fn fail_policy_needs_two_replicas() {
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    let fail_one = ["--set", "webhook.failurePolicy=Fail", "--set", "operator.replicas=1"];
    let mut args = vec!["template", RELEASE, chart, "--kube-version", "1.35.0"];
    args.extend(fail_one);
    let err = run_helm(&args).expect_err("Fail with one replica");
    let mut lint = vec!["lint", chart];
    lint.extend(fail_one);
    let lint_err = run_helm(&lint).expect_err("helm lint, Fail with one replica");
    for err in [err, lint_err] {
        assert!(
            err.contains("values don't meet the specifications of the schema"),
            "{err}"
        );
        // Both sides of the rule are named: more replicas, or Ignore.
        assert!(err.contains("at '/operator/replicas': minimum: got 1, want 2"), "{err}");
        assert!(
            err.contains("at '/webhook/failurePolicy': value must be 'Ignore'"),
            "{err}"
        );
    }
    // Fail with the default 2 replicas, and one replica with Ignore, are fine.
    let objects = template("1.35.0", &["webhook.failurePolicy=Fail"]);
    let webhook = &find(&objects, "MutatingWebhookConfiguration", FULLNAME).unwrap()["webhooks"][0];
    assert_eq!(webhook["failurePolicy"], "Fail");
    let objects = template(
        "1.35.0",
        &["operator.replicas=1", "operator.leaderElection.enabled=false"],
    );
    assert_eq!(find(&objects, "Deployment", FULLNAME).unwrap()["spec"]["replicas"], 1);
}

#[test]
fn priority_classes_default_to_critical_and_can_be_changed() {
    let pod_spec = |objects: &[Value], kind: &str, name: &str| {
        find(objects, kind, name).unwrap()["spec"]["template"]["spec"].clone()
    };
    let agent = format!("{FULLNAME}-agent");
    let objects = template("1.35.0", &[]);
    assert_eq!(
        pod_spec(&objects, "Deployment", FULLNAME)["priorityClassName"],
        "system-cluster-critical"
    );
    assert_eq!(
        pod_spec(&objects, "DaemonSet", &agent)["priorityClassName"],
        "system-node-critical"
    );
    let objects = template(
        "1.35.0",
        &["operator.priorityClassName=", "agent.priorityClassName=node-agents"],
    );
    assert!(
        pod_spec(&objects, "Deployment", FULLNAME)
            .get("priorityClassName")
            .is_none()
    );
    assert_eq!(
        pod_spec(&objects, "DaemonSet", &agent)["priorityClassName"],
        "node-agents"
    );
}

/// The ingress rules of the rendered NetworkPolicy as (port, from), `None` for "from anywhere".
fn ingress(policy: &Value) -> Vec<(i64, Option<Value>)> {
    policy["spec"]["ingress"]
        .as_array()
        .unwrap()
        .iter()
        .map(|rule| {
            assert_eq!(rule["ports"].as_array().unwrap().len(), 1, "{rule}");
            (rule["ports"][0]["port"].as_i64().unwrap(), rule.get("from").cloned())
        })
        .collect()
}

#[test]
fn network_policy_opens_the_webhook_and_limits_the_admin_port() {
    // Default: webhook from anywhere, admin from the release namespace and the `monitoring` namespace; egress
    // not restricted.
    let objects = template("1.35.0", &[]);
    let policy = find(&objects, "NetworkPolicy", FULLNAME).expect("NetworkPolicy on by default");
    let deployment = find(&objects, "Deployment", FULLNAME).unwrap();
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
    assert!(policy["spec"].get("egress").is_none());
    assert_eq!(
        ingress(policy),
        [
            (8443, None),
            (
                9090,
                Some(json!([
                    {"podSelector": {}},
                    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
                ]))
            ),
        ]
    );

    // Configured: the webhook from the control plane's CIDR, other ports, admin from one labelled pod in the
    // `observability` namespace only, egress to the apiserver.
    let objects = template(
        "1.35.0",
        &[
            "operator.ports.webhook=10250",
            "operator.ports.admin=8080",
            "networkPolicy.webhookFrom[0].ipBlock.cidr=10.0.0.0/24",
            "networkPolicy.admin.fromReleaseNamespace=false",
            "networkPolicy.admin.namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=observability",
            "networkPolicy.admin.podSelector.matchLabels.app=prometheus",
            "networkPolicy.admin.extraFrom[0].ipBlock.cidr=192.168.0.0/16",
            "networkPolicy.egress[0].to[0].ipBlock.cidr=10.0.0.1/32",
            "networkPolicy.egress[0].ports[0].port=6443",
        ],
    );
    let policy = find(&objects, "NetworkPolicy", FULLNAME).unwrap();
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(
        ingress(policy),
        [
            (10250, Some(json!([{"ipBlock": {"cidr": "10.0.0.0/24"}}]))),
            (
                8080,
                Some(json!([
                    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}},
                     "podSelector": {"matchLabels": {"app": "prometheus"}}},
                    {"ipBlock": {"cidr": "192.168.0.0/16"}},
                ]))
            ),
        ]
    );
    assert_eq!(
        policy["spec"]["egress"],
        json!([{"to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}], "ports": [{"port": 6443}]}])
    );
    // The agent's admin port: the same peers, in its own namespace; the operator's egress rules are not its.
    let agent_policy = find(&objects, "NetworkPolicy", &format!("{FULLNAME}-agent")).unwrap();
    assert_eq!(agent_policy["metadata"]["namespace"], AGENT_NS);
    assert_eq!(agent_policy["spec"]["policyTypes"], json!(["Ingress"]));
    assert_eq!(
        ingress(agent_policy),
        [(
            9090,
            Some(json!([
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}},
                 "podSelector": {"matchLabels": {"app": "prometheus"}}},
                {"ipBlock": {"cidr": "192.168.0.0/16"}},
            ]))
        )]
    );

    // No admin peer at all: the admin rule is left out (an empty `from` would admit everyone).
    let objects = template(
        "1.35.0",
        &[
            "networkPolicy.admin.fromReleaseNamespace=false",
            "networkPolicy.admin.namespaceSelector=null",
        ],
    );
    assert_eq!(
        ingress(find(&objects, "NetworkPolicy", FULLNAME).unwrap()),
        [(8443, None)]
    );

    let agent_policy = find(&objects, "NetworkPolicy", &format!("{FULLNAME}-agent")).unwrap();
    assert_eq!(
        agent_policy["spec"]["ingress"],
        json!([]),
        "no peer: the agent's admin port closed"
    );

    let objects = template("1.35.0", &["networkPolicy.enabled=false"]);
    assert!(objects.iter().all(|o| o["kind"] != "NetworkPolicy"));
}

#[test]
fn drain_and_server_limits_reach_the_operator() {
    let objects = template(
        "1.35.0",
        &["operator.drainSeconds=7", "operator.limits.maxConnections=99"],
    );
    let deployment = find(&objects, "Deployment", FULLNAME).expect("the operator Deployment");
    let spec = &deployment["spec"]["template"]["spec"];
    assert_eq!(spec["terminationGracePeriodSeconds"], 30);
    let args = strings(&spec["containers"][0]["args"]);
    for arg in [
        "--drain-seconds=7",
        "--max-connections=99",
        "--request-timeout-seconds=4",
        "--header-read-timeout-seconds=20",
        "--max-body-bytes=4194304",
    ] {
        assert!(args.contains(&arg), "{arg} in {args:?}");
    }
    // The apiserver's client certificate checked against a CA from a ConfigMap.
    let objects = template("1.35.0", &["webhook.clientCAConfigMap=apiserver-ca"]);
    let spec = &find(&objects, "Deployment", FULLNAME).unwrap()["spec"]["template"]["spec"];
    assert!(
        strings(&spec["containers"][0]["args"])
            .contains(&"--tls-client-ca-file=/etc/keepalive-operator/client-ca/ca.crt")
    );
    assert_eq!(spec["volumes"][0]["configMap"]["name"], "apiserver-ca");
    // The webhook must answer before the apiserver gives up, and Kubernetes must wait for the drain.
    let chart = chart_dir();
    let render = |set: &str| {
        run_helm(&[
            "template",
            RELEASE,
            chart.to_str().unwrap(),
            "--kube-version",
            "1.35.0",
            "--set",
            set,
        ])
        .expect_err("refused")
    };
    assert!(render("operator.limits.requestTimeoutSeconds=5").contains("must be below webhook.timeoutSeconds"));
    assert!(render("operator.terminationGracePeriodSeconds=5").contains("at least operator.drainSeconds"));
}

#[test]
fn injection_mode_auto_follows_the_served_apis() {
    // A cluster that does not serve MutatingAdmissionPolicy v1 (what helm template assumes without --api-versions,
    // whatever --kube-version says): webhook mode, the chart's webhook configuration.
    let webhook_mode = template("1.37.0", &[]);
    let mwc = find(&webhook_mode, "MutatingWebhookConfiguration", FULLNAME).expect("the webhook configuration");
    assert!(mwc["webhooks"][0]["clientConfig"].get("caBundle").is_none(), "{mwc}");
    let args = rendered_args(&webhook_mode);
    assert_eq!(flag(&args, "--injection-mode"), Some("webhook"));
    assert_eq!(flag(&args, "--webhook-configuration"), Some(FULLNAME));
    // Named in webhook mode too: the operator deletes a policy of that name left by admissionPolicy mode.
    assert_eq!(flag(&args, "--admission-policy-name"), Some(POLICIES));
    for absent in ADMISSION_POLICY_FLAGS {
        assert_eq!(flag(&args, absent), None, "{args:?}");
    }

    // A cluster that serves it: admissionPolicy mode. No webhook configuration is rendered; the operator gets the
    // same one, named <fullname>-fallback, to register while some policies do not fit its admission policy.
    let map_mode = template_map("1.37.0", &[]);
    let mut expected = kinds(&webhook_mode);
    expected.remove(&format!("MutatingWebhookConfiguration/{FULLNAME}"));
    assert_eq!(
        kinds(&map_mode),
        expected,
        "the same objects but the webhook configuration"
    );
    let args = rendered_args(&map_mode);
    assert_eq!(flag(&args, "--injection-mode"), Some("admissionPolicy"));
    assert_eq!(flag(&args, "--webhook-configuration"), Some(FALLBACK));
    assert_eq!(flag(&args, "--admission-policy-name"), Some(POLICIES));
    assert_eq!(flag(&args, "--admission-policy-failure-policy"), Some("Ignore"));
    assert_eq!(flag(&args, "--owner-cluster-role"), Some(FULLNAME));
    let mut renamed = mwc.clone();
    renamed["metadata"]["name"] = json!(FALLBACK);
    assert_eq!(json_flag(&args, "--fallback-webhook-configuration"), renamed);
    // The binding sees what the webhook sees: its namespace selector (the release's and the agent's namespaces
    // excluded) and its object selector.
    let webhook = &mwc["webhooks"][0];
    let namespace_selector = json_flag(&args, "--admission-policy-namespace-selector");
    assert_eq!(namespace_selector, webhook["namespaceSelector"]);
    assert_eq!(
        namespace_selector["matchExpressions"][0],
        json!({"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", NS, AGENT_NS]})
    );
    assert_eq!(
        json_flag(&args, "--admission-policy-object-selector"),
        webhook["objectSelector"]
    );
    // Each flag one argument: the JSON values split nothing.
    assert!(
        args.iter().all(|a| a == "controller" || a.starts_with("--")),
        "{args:?}"
    );

    // Options reach the fallback as they reach the webhook configuration of webhook mode: cert-manager's CA
    // injection, the URL, annotations, exclusions; an empty object selector is not passed to the binding.
    let options = [
        "certManager.enabled=true",
        "webhook.url=https://10.1.2.3:8443/mutate",
        "webhook.annotations.team=net",
        "webhook.objectSelector=null",
        "webhook.failurePolicy=Fail",
        "webhook.excludedNamespaces={kube-system,monitoring}",
        "injection.admissionPolicy.failurePolicy=Fail",
    ];
    let webhook_mode = template_map("1.37.0", &[&options[..], &["injection.mode=webhook"]].concat());
    let mwc = find(&webhook_mode, "MutatingWebhookConfiguration", FULLNAME).unwrap();
    assert_eq!(
        mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "keepalive-chart/ka-keepalive-operator-webhook"
    );
    let args = rendered_args(&template_map("1.37.0", &options));
    let mut renamed = mwc.clone();
    renamed["metadata"]["name"] = json!(FALLBACK);
    assert_eq!(json_flag(&args, "--fallback-webhook-configuration"), renamed);
    assert_eq!(renamed["webhooks"][0]["failurePolicy"], "Fail");
    assert_eq!(renamed["metadata"]["annotations"]["team"], "net");
    assert_eq!(flag(&args, "--admission-policy-failure-policy"), Some("Fail"));
    assert_eq!(
        json_flag(&args, "--admission-policy-namespace-selector")["matchExpressions"][0]["values"],
        json!(["kube-system", "monitoring", NS, AGENT_NS])
    );
    assert_eq!(flag(&args, "--admission-policy-object-selector"), None, "{args:?}");
    assert_eq!(
        flag(&args, "--tls-cert-file"),
        Some("/etc/keepalive-operator/tls/tls.crt")
    );
}

#[test]
fn explicit_injection_modes() {
    // webhook where MutatingAdmissionPolicy is served: the chart's webhook configuration, as on older clusters,
    // and the fallback named so that the operator deletes it if admissionPolicy mode left it.
    let objects = template_map("1.37.0", &["injection.mode=webhook"]);
    let mwc = find(&objects, "MutatingWebhookConfiguration", FULLNAME).expect("the webhook configuration");
    let args = rendered_args(&objects);
    assert_eq!(flag(&args, "--injection-mode"), Some("webhook"));
    assert_eq!(flag(&args, "--webhook-configuration"), Some(FULLNAME));
    assert_eq!(flag(&args, "--admission-policy-name"), Some(POLICIES));
    let mut renamed = mwc.clone();
    renamed["metadata"]["name"] = json!(FALLBACK);
    assert_eq!(json_flag(&args, "--fallback-webhook-configuration"), renamed);
    for absent in &ADMISSION_POLICY_FLAGS[1..] {
        assert_eq!(flag(&args, absent), None, "{args:?}");
    }
    // admissionPolicy where it is served.
    let objects = template_map("1.36.0", &["injection.mode=admissionPolicy"]);
    assert!(objects.iter().all(|o| o["kind"] != "MutatingWebhookConfiguration"));
    assert_eq!(
        flag(&rendered_args(&objects), "--injection-mode"),
        Some("admissionPolicy")
    );
    // admissionPolicy where it is not: refused, naming the value and the API.
    for kube_version in ["1.30.0", "1.37.0"] {
        let args = template_args(kube_version, &[], &["injection.mode=admissionPolicy"]);
        let err = run_helm(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .expect_err("admissionPolicy mode without MutatingAdmissionPolicy v1");
        assert!(
            err.contains("injection.mode is admissionPolicy")
                && err.contains("does not serve admissionregistration.k8s.io/v1 MutatingAdmissionPolicy"),
            "{err}"
        );
    }
}

#[test]
fn operator_rbac_follows_the_injection_mode() {
    let cluster_role = |objects: &[Value]| rules(find(objects, "ClusterRole", FULLNAME).unwrap());
    let cert_manager = "certManager.enabled=true";
    // Webhook mode on a cluster without MutatingAdmissionPolicy v1.
    assert_eq!(
        cluster_role(&template("1.35.0", &[])),
        operator_rules(false, false, true)
    );
    assert_eq!(
        cluster_role(&template("1.35.0", &[cert_manager])),
        operator_rules(false, false, false)
    );
    // Webhook mode on a cluster with it: also the policy, binding and fallback, to delete those of an earlier
    // admissionPolicy mode.
    for sets in [
        &["injection.mode=webhook"][..],
        &["injection.mode=webhook", cert_manager],
    ] {
        let self_managed = sets.len() == 1;
        assert_eq!(
            cluster_role(&template_map("1.37.0", sets)),
            operator_rules(false, true, self_managed),
            "{sets:?}"
        );
    }
    // admissionPolicy mode.
    assert_eq!(
        cluster_role(&template_map("1.37.0", &[])),
        operator_rules(true, true, true)
    );
    assert_eq!(
        cluster_role(&template_map("1.37.0", &[cert_manager])),
        operator_rules(true, true, false)
    );
    // Spelled out: what each mode adds to the common rules, every rule naming its object.
    let added = |rules: BTreeSet<String>| -> BTreeSet<String> { &rules - &set(OPERATOR_RULES) };
    let mwc = "admissionregistration.k8s.io mutatingwebhookconfigurations";
    let map = "admissionregistration.k8s.io mutatingadmissionpolicies";
    let binding = "admissionregistration.k8s.io mutatingadmissionpolicybindings";
    assert_eq!(
        added(cluster_role(&template_map("1.37.0", &[]))),
        set(&[
            &format!("{mwc}/{FALLBACK} get"),
            &format!("{mwc}/{FALLBACK} list"),
            &format!("{mwc}/{FALLBACK} watch"),
            &format!("{mwc}/{FALLBACK} create"),
            &format!("{mwc}/{FALLBACK} patch"),
            &format!("{mwc}/{FALLBACK} delete"),
            &format!("rbac.authorization.k8s.io clusterroles/{FULLNAME} get"),
            &format!("{map}/{POLICIES} create"),
            &format!("{map}/{POLICIES} patch"),
            &format!("{map}/{POLICIES} delete"),
            &format!("{binding}/{POLICIES} create"),
            &format!("{binding}/{POLICIES} patch"),
            &format!("{binding}/{POLICIES} delete"),
        ])
    );
    assert_eq!(
        added(cluster_role(&template("1.35.0", &[]))),
        set(&[
            &format!("{mwc}/{FULLNAME} get"),
            &format!("{mwc}/{FULLNAME} list"),
            &format!("{mwc}/{FULLNAME} watch"),
            &format!("{mwc}/{FULLNAME} patch"),
        ])
    );
    assert_eq!(
        added(cluster_role(&template_map("1.37.0", &["injection.mode=webhook"]))),
        set(&[
            &format!("{mwc}/{FULLNAME} get"),
            &format!("{mwc}/{FULLNAME} list"),
            &format!("{mwc}/{FULLNAME} watch"),
            &format!("{mwc}/{FULLNAME} patch"),
            &format!("{mwc}/{FALLBACK} delete"),
            &format!("{map}/{POLICIES} create"),
            &format!("{map}/{POLICIES} patch"),
            &format!("{map}/{POLICIES} delete"),
            &format!("{binding}/{POLICIES} create"),
            &format!("{binding}/{POLICIES} patch"),
            &format!("{binding}/{POLICIES} delete"),
        ])
    );
    // The namespaced Role (Lease, Secret) is the same in every mode.
    let role = |objects: &[Value]| rules(find(objects, "Role", FULLNAME).unwrap());
    assert_eq!(role(&template_map("1.37.0", &[])), role(&template("1.35.0", &[])));
}
