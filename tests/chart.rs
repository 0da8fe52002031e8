//! The Helm chart with the real helm against the real apiserver: lint, the values schema, `helm install` with
//! every object as it should be (the apiserver's own Pod Security admission judges the pod templates),
//! `helm upgrade`, `helm uninstall` keeping the CRDs and policies. Its RBAC is proven sufficient by running the
//! operator and the agent on this host with tokens of the chart's ServiceAccounts instead of admin credentials,
//! and minimal by `kubectl auth can-i`.
//!
//! This file uses the process's control plane without pre-installed CRDs (`xtask::shared()`, not
//! `common::control_plane()`), so the CRDs come from the chart's `crds/`, as for a user.

mod common;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::*;
use serde_json::{Value, json};
use xtask::{ControlPlane, cluster};

const NS: &str = "keepalive-chart";
const RELEASE: &str = "ka";
const FULLNAME: &str = "ka-keepalive-operator";

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

/// `helm template` of the chart with `--set` values, as a list of objects.
fn template(kube_version: &str, sets: &[&str]) -> Vec<Value> {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        RELEASE,
        chart.to_str().unwrap(),
        "--namespace",
        NS,
        "--kube-version",
        kube_version,
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    let yaml = helm_ok(&args);
    serde_yaml::Deserializer::from_str(&yaml)
        .filter_map(|doc| {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            (!v.is_null()).then_some(v)
        })
        .collect()
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
    ] {
        assert!(all.contains(k), "{k} missing from {all:?}");
    }
    assert_eq!(all.len(), 13, "{all:?}");
    let agent = find(&objects, "DaemonSet", "ka-keepalive-operator-agent").unwrap();
    let sc = &agent["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(sc["appArmorProfile"]["type"], "Unconfined");

    // Kubernetes 1.29 has no appArmorProfile field: the annotation instead.
    let objects = template("1.29.0", &[]);
    let agent = find(&objects, "DaemonSet", "ka-keepalive-operator-agent").unwrap();
    let template_ = &agent["spec"]["template"];
    assert!(template_["spec"]["containers"][0]["securityContext"]["appArmorProfile"].is_null());
    assert_eq!(
        template_["metadata"]["annotations"]["container.apparmor.security.beta.kubernetes.io/agent"],
        "unconfined"
    );

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

    // ServiceMonitor on, agent off, single replica without leader election, webhook by URL, Fail policy.
    let objects = template(
        "1.35.0",
        &[
            "serviceMonitor.enabled=true",
            "serviceMonitor.labels.release=prom",
            "agent.enabled=false",
            "operator.replicas=1",
            "operator.leaderElection.enabled=false",
            "webhook.url=https://10.1.2.3:8443/mutate",
            "webhook.failurePolicy=Fail",
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
    assert_eq!(webhook["failurePolicy"], "Fail");
    assert_eq!(
        webhook["namespaceSelector"]["matchExpressions"][0]["values"],
        json!(["kube-system", "monitoring", NS])
    );
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

/// No request of the process was refused by RBAC.
fn assert_never_forbidden(process: &HostProcess) {
    let logs = process.logs();
    assert!(
        !logs.contains("is forbidden: User") && !logs.contains("code: 403"),
        "a request was forbidden:\n{logs}"
    );
}

/// The container args of the chart's operator Deployment, with the listen addresses moved to loopback ports.
fn operator_args(port: u16, admin_port: u16) -> Vec<String> {
    cp().container_args(
        "deployment",
        NS,
        FULLNAME,
        &[
            ("--listen", format!("127.0.0.1:{port}")),
            ("--admin-listen", format!("127.0.0.1:{admin_port}")),
        ],
    )
    .unwrap()
}

fn can_i(sa: &str, args: &[&str]) -> bool {
    let subject = format!("--as=system:serviceaccount:{NS}:{sa}");
    let out = cp()
        .kubectl()
        .args(["auth", "can-i"])
        .args(args)
        .arg(&subject)
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        answer == "yes" || answer == "no",
        "kubectl auth can-i {args:?}: {answer} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    answer == "yes"
}

/// Asks the apiserver to admit a pod with `spec` into namespace `ns` (dry run); Err is its refusal.
fn admit_pod(ns: &str, name: &str, spec: &Value) -> Result<(), String> {
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns}, "spec": spec});
    let file = cp().work_dir().join(format!("pod-{ns}-{name}.json"));
    std::fs::write(&file, pod.to_string()).unwrap();
    cp().kubectl_output(&["create", "--dry-run=server", "-f", file.to_str().unwrap()])
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn pod_security_namespace(name: &str, level: &str) {
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name,
        "labels": {"pod-security.kubernetes.io/enforce": level, "pod-security.kubernetes.io/enforce-version": "latest"}}});
    let file = cp().work_dir().join(format!("ns-{name}.json"));
    std::fs::write(&file, ns.to_string()).unwrap();
    cp().kubectl_output(&["apply", "-f", file.to_str().unwrap()]).unwrap();
}

#[tokio::test]
async fn install_upgrade_uninstall_with_least_privilege() {
    let cp = cp();
    let client = cp.client().await.unwrap();
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();

    // --- install --------------------------------------------------------------------------------------------
    let started = Instant::now();
    let out = helm_ok(&[
        "install",
        RELEASE,
        chart,
        "--namespace",
        NS,
        "--create-namespace",
        "--set",
        "image.tag=test",
    ]);
    eprintln!("helm install: {:?}", started.elapsed());
    assert!(out.contains("STATUS: deployed"), "{out}");
    assert!(out.contains("kubectl get kap"), "NOTES tell what to do next:\n{out}");
    // The CRDs came from the chart's crds/.
    for crd in ["keepalivepolicies.keepalive.dev", "keepalivenodereports.keepalive.dev"] {
        assert!(get("crd", crd, None).is_some(), "{crd}");
    }

    // The webhook: defaults that never break a cluster.
    let mwc = get("mutatingwebhookconfiguration", FULLNAME, None).unwrap();
    let webhooks = mwc["webhooks"].as_array().unwrap();
    assert_eq!(webhooks.len(), 1);
    let w = &webhooks[0];
    assert_eq!(w["name"], "pods.keepalive.dev");
    assert_eq!(w["failurePolicy"], "Ignore");
    assert_eq!(w["timeoutSeconds"], 5);
    assert_eq!(w["sideEffects"], "None");
    assert_eq!(w["reinvocationPolicy"], "IfNeeded");
    assert_eq!(w["admissionReviewVersions"], json!(["v1"]));
    assert_eq!(
        w["rules"],
        json!([{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}])
    );
    assert_eq!(
        w["clientConfig"]["service"],
        json!({"name": FULLNAME, "namespace": NS, "path": "/mutate", "port": 443})
    );
    assert_eq!(
        w["namespaceSelector"],
        json!({"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", NS]},
            {"key": "keepalive.dev/ignore", "operator": "NotIn", "values": ["true"]},
        ]})
    );
    assert_eq!(
        w["objectSelector"],
        json!({"matchExpressions": [{"key": "keepalive.dev/ignore", "operator": "NotIn", "values": ["true"]}]})
    );

    // The operator Deployment.
    let deployment = get("deployment", FULLNAME, Some(NS)).unwrap();
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod_spec = deployment["spec"]["template"]["spec"].clone();
    assert_eq!(pod_spec["serviceAccountName"], FULLNAME);
    let c = &pod_spec["containers"][0];
    assert_eq!(c["image"], "keepalive-operator:test");
    let args = strings(&c["args"]);
    assert_eq!(args[0], "controller");
    for a in [
        "--leader-elect=true",
        "--namespace=keepalive-chart",
        "--lease-name=ka-keepalive-operator",
        "--service-name=ka-keepalive-operator",
        "--webhook-configuration=ka-keepalive-operator",
        "--tls-secret=ka-keepalive-operator-webhook-tls",
        "--admin-listen=0.0.0.0:9090",
        "--listen=0.0.0.0:8443",
    ] {
        assert!(args.contains(&a), "{a} not in {args:?}");
    }
    assert_eq!(
        c["livenessProbe"]["httpGet"],
        json!({"path": "/livez", "port": "admin", "scheme": "HTTP"})
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "admin", "scheme": "HTTP"})
    );
    assert_eq!(c["resources"]["requests"], json!({"cpu": "50m", "memory": "64Mi"}));
    assert_eq!(c["resources"]["limits"], json!({"memory": "256Mi"}));
    let env: Vec<&str> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(env.contains(&"POD_NAMESPACE") && env.contains(&"POD_NAME"), "{env:?}");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(pod_spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod_spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    let spread = &pod_spec["topologySpreadConstraints"][0];
    assert_eq!(spread["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(spread["maxSkew"], 1);
    let pdb = get("poddisruptionbudget", FULLNAME, Some(NS)).unwrap();
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    let service = get("service", FULLNAME, Some(NS)).unwrap();
    let ports: Vec<(i64, &str)> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["port"].as_i64().unwrap(), p["targetPort"].as_str().unwrap()))
        .collect();
    assert_eq!(ports, [(443, "webhook"), (9090, "admin")]);
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );

    // The agent DaemonSet.
    let ds = get("daemonset", &format!("{FULLNAME}-agent"), Some(NS)).unwrap();
    let agent_spec = ds["spec"]["template"]["spec"].clone();
    assert_eq!(agent_spec["hostPID"], true);
    assert_eq!(agent_spec["serviceAccountName"], format!("{FULLNAME}-agent"));
    assert_eq!(agent_spec["tolerations"], json!([{"operator": "Exists"}]));
    let a = &agent_spec["containers"][0];
    assert_eq!(strings(&a["args"])[0], "agent");
    let sc = &a["securityContext"];
    assert_eq!(
        sc["capabilities"],
        json!({"drop": ["ALL"], "add": ["SYS_ADMIN", "SYS_PTRACE"]})
    );
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(
        a["volumeMounts"],
        json!([{"name": "host-proc", "mountPath": "/host/proc", "readOnly": true}])
    );
    assert_eq!(agent_spec["volumes"][0]["hostPath"]["path"], "/proc");
    let node_name = a["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .unwrap();
    assert_eq!(node_name["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");

    // The apiserver's Pod Security admission judges the pod templates: the operator's pass "restricted"; the
    // agent's need "privileged" (hostPID, hostPath, capabilities), and are refused below it.
    pod_security_namespace("keepalive-chart-restricted", "restricted");
    pod_security_namespace("keepalive-chart-baseline", "baseline");
    pod_security_namespace("keepalive-chart-privileged", "privileged");
    admit_pod("keepalive-chart-restricted", "operator", &pod_spec).expect("the operator pod is 'restricted'");
    let refused = admit_pod("keepalive-chart-baseline", "agent", &agent_spec).expect_err("agent under baseline");
    assert!(refused.contains("violates PodSecurity"), "{refused}");
    admit_pod("keepalive-chart-privileged", "agent", &agent_spec).expect("the agent pod under 'privileged'");

    // RBAC objects: exactly these rules.
    let operator_cluster_rules = rules(&get("clusterrole", FULLNAME, None).unwrap());
    assert_eq!(
        operator_cluster_rules,
        set(&[
            "keepalive.dev keepalivepolicies list",
            "keepalive.dev keepalivepolicies watch",
            "keepalive.dev keepalivenodereports list",
            "keepalive.dev keepalivenodereports watch",
            "keepalive.dev keepalivepolicies/status patch",
            "core pods list",
            "core pods watch",
            "core namespaces list",
            "core namespaces watch",
            "events.k8s.io events create",
            "events.k8s.io events patch",
            "admissionregistration.k8s.io mutatingwebhookconfigurations/ka-keepalive-operator get",
            "admissionregistration.k8s.io mutatingwebhookconfigurations/ka-keepalive-operator list",
            "admissionregistration.k8s.io mutatingwebhookconfigurations/ka-keepalive-operator watch",
            "admissionregistration.k8s.io mutatingwebhookconfigurations/ka-keepalive-operator patch",
        ])
    );
    assert_eq!(
        rules(&get("role", FULLNAME, Some(NS)).unwrap()),
        set(&[
            "coordination.k8s.io leases create",
            "coordination.k8s.io leases/ka-keepalive-operator get",
            "coordination.k8s.io leases/ka-keepalive-operator update",
            "core secrets create",
            "core secrets/ka-keepalive-operator-webhook-tls get",
            "core secrets/ka-keepalive-operator-webhook-tls list",
            "core secrets/ka-keepalive-operator-webhook-tls watch",
            "core secrets/ka-keepalive-operator-webhook-tls update",
        ])
    );
    assert_eq!(
        rules(&get("clusterrole", &format!("{FULLNAME}-agent"), None).unwrap()),
        set(&[
            "core pods list",
            "core pods watch",
            "keepalive.dev keepalivenodereports create",
            "keepalive.dev keepalivenodereports patch",
        ])
    );

    // --- minimal: what the ServiceAccounts may and may not do ----------------------------------------------
    let op = FULLNAME;
    let operator_checks: &[(&[&str], bool)] = &[
        (&["list", "keepalivepolicies.keepalive.dev"], true),
        (&["watch", "keepalivepolicies.keepalive.dev"], true),
        (
            &["patch", "keepalivepolicies.keepalive.dev", "--subresource=status"],
            true,
        ),
        (&["list", "keepalivenodereports.keepalive.dev"], true),
        (&["watch", "pods", "--all-namespaces"], true),
        (&["list", "namespaces"], true),
        (&["create", "events.events.k8s.io", "-n", "default"], true),
        (&["get", "leases/ka-keepalive-operator", "-n", NS], true),
        (&["update", "leases/ka-keepalive-operator", "-n", NS], true),
        (&["create", "leases", "-n", NS], true),
        (&["get", "secrets/ka-keepalive-operator-webhook-tls", "-n", NS], true),
        (&["create", "secrets", "-n", NS], true),
        (&["patch", "mutatingwebhookconfigurations/ka-keepalive-operator"], true),
        // Never: write pods, read other secrets, touch other webhooks or leases, change policies' specs.
        (&["create", "pods", "-n", "default"], false),
        (&["patch", "pods", "-n", "default"], false),
        (&["delete", "pods", "-n", NS], false),
        (&["get", "pods", "-n", "default"], false),
        (&["get", "secrets", "-n", "kube-system"], false),
        (&["get", "secrets/other", "-n", NS], false),
        (&["list", "secrets", "-n", NS], false),
        (
            &["delete", "secrets/ka-keepalive-operator-webhook-tls", "-n", NS],
            false,
        ),
        (&["create", "secrets", "-n", "default"], false),
        (&["patch", "mutatingwebhookconfigurations/other"], false),
        (&["create", "mutatingwebhookconfigurations"], false),
        (&["update", "leases/other", "-n", NS], false),
        (&["create", "leases", "-n", "default"], false),
        (&["update", "keepalivepolicies.keepalive.dev"], false),
        (&["delete", "keepalivepolicies.keepalive.dev"], false),
        (&["patch", "keepalivenodereports.keepalive.dev"], false),
    ];
    for (args, allowed) in operator_checks {
        assert_eq!(can_i(op, args), *allowed, "operator: can-i {args:?}");
    }
    let agent = format!("{FULLNAME}-agent");
    let agent_checks: &[(&[&str], bool)] = &[
        (&["list", "pods", "--all-namespaces"], true),
        (&["watch", "pods", "--all-namespaces"], true),
        (&["create", "keepalivenodereports.keepalive.dev"], true),
        (&["patch", "keepalivenodereports.keepalive.dev"], true),
        (&["create", "pods", "-n", "default"], false),
        (&["patch", "pods", "-n", "default"], false),
        (&["delete", "pods", "-n", "default"], false),
        (&["get", "secrets", "-n", NS], false),
        (&["delete", "keepalivenodereports.keepalive.dev"], false),
        (&["list", "keepalivepolicies.keepalive.dev"], false),
        (
            &["patch", "keepalivepolicies.keepalive.dev", "--subresource=status"],
            false,
        ),
    ];
    for (args, allowed) in agent_checks {
        assert_eq!(can_i(&agent, args), *allowed, "agent: can-i {args:?}");
    }

    // --- sufficient: the operator with its ServiceAccount's token and the Deployment's args -----------------
    let kubeconfig = cp.service_account_kubeconfig(NS, FULLNAME).unwrap();
    let (port, admin_port) = (cluster::free_port().unwrap(), cluster::free_port().unwrap());
    let mut operator = HostProcess::spawn(cp, "chart-operator", &operator_args(port, admin_port), &kubeconfig);
    operator.wait_ready(admin_port);
    // Self-managed certificates: it created its Secret and set the webhook's caBundle.
    let secret = eventually(Duration::from_secs(30), "the operator's Secret", || async {
        get("secret", "ka-keepalive-operator-webhook-tls", Some(NS))
    })
    .await;
    let ca = secret["data"]["ca.crt"].as_str().unwrap().to_string();
    assert!(secret["data"]["tls.crt"].as_str().is_some_and(|c| !c.is_empty()));
    let ca_bundle = || {
        get("mutatingwebhookconfiguration", FULLNAME, None).unwrap()["webhooks"][0]["clientConfig"]["caBundle"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    eventually(Duration::from_secs(30), "the caBundle set by the operator", || async {
        (ca_bundle() == ca).then_some(())
    })
    .await;
    // It elected itself through the chart's Lease.
    eventually(Duration::from_secs(30), "the operator holding the Lease", || async {
        let lease = get("lease", FULLNAME, Some(NS))?;
        (lease["spec"]["holderIdentity"] == "chart-operator-on-host").then_some(())
    })
    .await;
    assert_never_forbidden(&operator);
    operator.stop();

    // --- upgrade: the webhook now calls this host's operator by URL ------------------------------------------
    let url = format!("--set=webhook.url=https://127.0.0.1:{port}/mutate");
    let out = helm_ok(&[
        "upgrade",
        RELEASE,
        chart,
        "--namespace",
        NS,
        "--reuse-values",
        &url,
        "--set=webhook.extraSANs={127.0.0.1}",
        "--set=operator.replicas=3",
    ]);
    assert!(out.contains("REVISION: 2"), "{out}");
    assert_eq!(get("deployment", FULLNAME, Some(NS)).unwrap()["spec"]["replicas"], 3);
    let w = get("mutatingwebhookconfiguration", FULLNAME, None).unwrap()["webhooks"][0].clone();
    assert_eq!(w["clientConfig"]["url"], format!("https://127.0.0.1:{port}/mutate"));
    assert!(w["clientConfig"]["service"].is_null(), "{w}");
    assert_eq!(ca_bundle(), ca, "helm upgrade keeps the caBundle the operator set");

    let args = operator_args(port, admin_port);
    assert!(args.contains(&"--tls-extra-sans=127.0.0.1".to_string()), "{args:?}");
    let mut operator = HostProcess::spawn(cp, "chart-operator-2", &args, &kubeconfig);
    operator.wait_ready(admin_port);
    // New names: the certificate was reissued in the same Secret (update), by the same CA.
    eventually(
        Duration::from_secs(30),
        "the certificate reissued for 127.0.0.1",
        || async {
            let s = get("secret", "ka-keepalive-operator-webhook-tls", Some(NS))?;
            s["metadata"]["annotations"]["keepalive.dev/dns-names"]
                .as_str()?
                .contains("127.0.0.1")
                .then_some(())
        },
    )
    .await;
    assert_eq!(ca_bundle(), ca);

    // Through the chart's webhook configuration, a pod gets its sysctls; the leader writes the policy's status.
    namespace(&client, "keepalive-chart-apps", &[("test", "chart")]).await;
    create_policy(
        &client,
        "chart-policy",
        json!({"namespaceSelector": {"matchLabels": {"test": "chart"}}, "keepalive": {"time": 60, "interval": 10, "probes": 3}}),
    )
    .await;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(client.clone(), "keepalive-chart-apps");
    eventually(
        Duration::from_secs(20),
        "a pod mutated through the chart's webhook",
        || async {
            let pod = create_pod(&client, "keepalive-chart-apps", "app", json!({}))
                .await
                .ok()?;
            if sysctls(&pod) == keepalive(60, 10, 3) {
                return Some(());
            }
            pods.delete("app", &Default::default()).await.ok()?;
            None
        },
    )
    .await;
    let policies: kube::Api<keepalive_operator::api::KeepalivePolicy> = kube::Api::all(client.clone());
    eventually(
        Duration::from_secs(30),
        "the policy's status: 1 matched, 1 conformant",
        || async {
            let s = policies.get("chart-policy").await.ok()?.status?;
            (s.matched_pods == Some(1) && s.conformant_pods == Some(1)).then_some(())
        },
    )
    .await;
    assert_never_forbidden(&operator);

    // --- sufficient: the agent with its ServiceAccount's token and the DaemonSet's args ----------------------
    let agent_kubeconfig = cp.service_account_kubeconfig(NS, &agent).unwrap();
    create_pod(
        &client,
        "keepalive-chart-apps",
        "on-node",
        json!({"spec": {"nodeName": "chart-node"}}),
    )
    .await
    .unwrap();
    // As kubelet would once the pod started (the agent reports running pods; this one has no process here).
    kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), "keepalive-chart-apps")
        .patch_status(
            "on-node",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"status": {"phase": "Running"}})),
        )
        .await
        .unwrap();
    let agent_admin = cluster::free_port().unwrap();
    let agent_args = cp
        .container_args(
            "daemonset",
            NS,
            &agent,
            &[
                // This host's /proc is the host's.
                ("--proc-root", "/proc".to_string()),
                ("--scan-interval-seconds", "1".to_string()),
                ("--admin-listen", format!("127.0.0.1:{agent_admin}")),
                ("--node-name", "chart-node".to_string()),
            ],
        )
        .unwrap();
    let agent_process = HostProcess::spawn(cp, "chart-agent", &agent_args, &agent_kubeconfig);
    let reports: kube::Api<keepalive_operator::api::KeepaliveNodeReport> = kube::Api::all(client.clone());
    eventually(Duration::from_secs(30), "the agent's node report", || async {
        let r = reports.get_opt("chart-node").await.ok()??;
        r.spec.pods.iter().any(|p| p.name == "on-node").then_some(())
    })
    .await;
    // Its probes: ready once the report is written.
    assert_eq!(cluster::http_get(agent_admin, "/readyz").map(|(c, _)| c), Some(200));
    assert_never_forbidden(&agent_process);
    drop(agent_process);
    assert_never_forbidden(&operator);
    operator.stop();

    // --- uninstall: everything of the release goes; CRDs, policies and reports stay ------------------------
    let out = helm_ok(&["uninstall", RELEASE, "--namespace", NS]);
    assert!(out.contains("uninstalled"), "{out}");
    for (kind, name, ns) in [
        ("deployment", FULLNAME, Some(NS)),
        ("daemonset", "ka-keepalive-operator-agent", Some(NS)),
        ("service", FULLNAME, Some(NS)),
        ("serviceaccount", FULLNAME, Some(NS)),
        ("role", FULLNAME, Some(NS)),
        ("mutatingwebhookconfiguration", FULLNAME, None),
        ("clusterrole", FULLNAME, None),
        ("clusterrole", "ka-keepalive-operator-agent", None),
        ("clusterrolebinding", FULLNAME, None),
    ] {
        assert!(
            get(kind, name, ns).is_none(),
            "{kind} {name} still there after uninstall"
        );
    }
    for crd in ["keepalivepolicies.keepalive.dev", "keepalivenodereports.keepalive.dev"] {
        assert!(get("crd", crd, None).is_some(), "{crd} deleted by helm uninstall");
    }
    assert!(get("keepalivepolicy", "chart-policy", None).is_some());
    assert!(get("keepalivenodereport", "chart-node", None).is_some());
}
