//! `helm install` on the real apiserver, upgrade and uninstall; RBAC proven sufficient by running the operator
//! and the agent with the chart's ServiceAccounts' tokens, and minimal by `kubectl auth can-i`.
//!
//! `injection.mode` is left at auto, so helm resolves it from the apiserver's APIs: admissionPolicy where it
//! serves MutatingAdmissionPolicy v1 (1.36+, the newest version of the matrix), webhook on older ones (1.30, where
//! `cargo xtask test` runs this suite again). On the former the test also switches to webhook mode, where the
//! operator deletes what admissionPolicy mode created.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use xtask::cluster;

use super::*;

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

/// Asks the apiserver to admit a pod with `spec` into namespace `ns` (dry run); Err is its refusal.
fn admit_pod(ns: &str, name: &str, spec: &Value) -> Result<(), String> {
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns}, "spec": spec});
    let file = cp().work_dir().join(format!("pod-{ns}-{name}.json"));
    std::fs::write(&file, pod.to_string()).unwrap();
    cp().kubectl_output(&["create", "--dry-run=server", "-f", file.to_str().unwrap()])
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Whether the apiserver serves admissionregistration.k8s.io/v1 MutatingAdmissionPolicy: helm then resolves
/// `injection.mode: auto` to admissionPolicy.
fn serves_admission_policy() -> bool {
    let discovery = cp()
        .kubectl_output(&["get", "--raw", "/apis/admissionregistration.k8s.io/v1"])
        .unwrap();
    let discovery: Value = serde_json::from_str(&discovery).unwrap();
    discovery["resources"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "mutatingadmissionpolicies")
}

/// `object` as the apiserver would store it (`kubectl create --dry-run=server`): validated and defaulted.
fn dry_run_create(object: &Value) -> Value {
    let file = cp().work_dir().join("dry-run.json");
    std::fs::write(&file, object.to_string()).unwrap();
    let out = cp()
        .kubectl_output(&["create", "--dry-run=server", "-o", "json", "-f", file.to_str().unwrap()])
        .unwrap_or_else(|e| panic!("the apiserver refuses {object}: {e}"));
    serde_json::from_str(&out).unwrap()
}

/// `object` is owned by the operator's ClusterRole `owner` (as stored), so deleting it garbage-collects `object`.
fn assert_owned_by(object: &Value, owner: &Value) {
    let refs = object["metadata"]["ownerReferences"]
        .as_array()
        .unwrap_or_else(|| panic!("no ownerReferences: {object}"));
    assert!(
        refs.iter().any(|r| r["apiVersion"] == "rbac.authorization.k8s.io/v1"
            && r["kind"] == "ClusterRole"
            && r["name"] == FULLNAME
            && r["uid"] == owner["metadata"]["uid"]),
        "{refs:?}"
    );
}

/// A KeepalivePolicy that cannot be compiled into the MutatingAdmissionPolicy: its pod selector needs a CEL
/// expression longer than the apiserver allows (10 × 256 values of 60 characters). It selects no pod here.
fn policy_too_long_for_the_admission_policy() -> Value {
    let values: Vec<String> = (0..256).map(|i| format!("{i:0>60}")).collect();
    let expressions: Vec<Value> = (0..10)
        .map(|i| json!({"key": format!("k{i}"), "operator": "In", "values": values}))
        .collect();
    json!({
        "namespaceSelector": {"matchLabels": {"test": "chart-huge"}},
        "podSelector": {"matchExpressions": expressions},
        "keepalive": {"time": 61, "interval": 11, "probes": 4},
    })
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
    // As the README says: Helm cannot manage the release namespace, so it is created labelled "restricted" first.
    pod_security_namespace(NS, "restricted");
    let started = Instant::now();
    let out = helm_ok(&["install", RELEASE, chart, "--namespace", NS, "--set", "image.tag=test"]);
    eprintln!("helm install: {:?}", started.elapsed());
    assert!(out.contains("STATUS: deployed"), "{out}");
    assert!(out.contains("kubectl get kap"), "NOTES tell what to do next:\n{out}");
    assert!(
        out.contains(&format!(
            "kubectl label namespace {NS} --overwrite pod-security.kubernetes.io/enforce=restricted"
        )),
        "NOTES tell to label the release namespace restricted:\n{out}"
    );
    assert!(out.contains(&format!("runs in namespace {AGENT_NS}")), "{out}");
    // injection.mode auto, resolved by helm from the apiserver's APIs.
    let map_mode = serves_admission_policy();
    let mode = if map_mode { "admissionPolicy" } else { "webhook" };
    eprintln!("injection mode: {mode}");
    assert!(
        out.contains(&format!("Injection mode: {mode} (injection.mode=auto)")),
        "{out}"
    );
    if map_mode {
        assert!(
            out.contains(&format!("kubectl get mutatingadmissionpolicies {POLICIES}")),
            "{out}"
        );
        assert!(out.contains("The webhook is registered only as a fallback"), "{out}");
    }
    // The agent's namespace, created by the chart: Pod Security "privileged" (the release namespace stays
    // "restricted").
    let agent_ns = get("namespace", AGENT_NS, None).expect("the agent's namespace");
    for mode in ["enforce", "audit", "warn"] {
        assert_eq!(
            agent_ns["metadata"]["labels"][format!("pod-security.kubernetes.io/{mode}")],
            "privileged"
        );
    }
    assert_eq!(
        get("namespace", NS, None).unwrap()["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
    // Node-bound writes: the policy and its binding (proven in tests/node_trust.rs).
    let vap = get(
        "validatingadmissionpolicy",
        &format!("{FULLNAME}-agent-node-bound"),
        None,
    )
    .expect("the policy");
    assert_eq!(vap["spec"]["failurePolicy"], "Fail");
    assert_eq!(
        vap["spec"]["matchConditions"][0]["expression"],
        format!("request.userInfo.username == \"system:serviceaccount:{AGENT_NS}:{FULLNAME}-agent\"")
    );
    let binding = get(
        "validatingadmissionpolicybinding",
        &format!("{FULLNAME}-agent-node-bound"),
        None,
    )
    .expect("the policy's binding");
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
    // The CRDs came from the chart's crds/.
    for crd in ["keepalivepolicies.keepalive.dev", "keepalivenodereports.keepalive.dev"] {
        assert!(get("crd", crd, None).is_some(), "{crd}");
    }

    // The webhook: defaults that never break a cluster. In webhook mode the chart's configuration; in
    // admissionPolicy mode there is none, and the fallback the operator registers when needed is checked as the
    // apiserver would store it (a server-side dry run: it is valid).
    let installed_args = cp.container_args("deployment", NS, FULLNAME, &[]).unwrap();
    assert_eq!(flag(&installed_args, "--injection-mode"), Some(mode));
    assert_eq!(flag(&installed_args, "--admission-policy-name"), Some(POLICIES));
    let mwc = if map_mode {
        assert!(get("mutatingwebhookconfiguration", FULLNAME, None).is_none());
        assert_eq!(flag(&installed_args, "--webhook-configuration"), Some(FALLBACK));
        assert_eq!(flag(&installed_args, "--owner-cluster-role"), Some(FULLNAME));
        assert_eq!(
            flag(&installed_args, "--admission-policy-failure-policy"),
            Some("Ignore")
        );
        let fallback = json_flag(&installed_args, "--fallback-webhook-configuration");
        assert_eq!(fallback["metadata"]["name"], FALLBACK);
        assert!(get("mutatingwebhookconfiguration", FALLBACK, None).is_none());
        dry_run_create(&fallback)
    } else {
        assert_eq!(flag(&installed_args, "--webhook-configuration"), Some(FULLNAME));
        for absent in ADMISSION_POLICY_FLAGS {
            assert_eq!(flag(&installed_args, absent), None, "{installed_args:?}");
        }
        get("mutatingwebhookconfiguration", FULLNAME, None).unwrap()
    };
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
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", NS, AGENT_NS]},
            {"key": "keepalive.dev/ignore", "operator": "NotIn", "values": ["true"]},
        ]})
    );
    assert_eq!(
        w["objectSelector"],
        json!({"matchExpressions": [{"key": "keepalive.dev/ignore", "operator": "NotIn", "values": ["true"]}]})
    );
    if map_mode {
        // The admission policy's binding sees what the webhook sees.
        assert_eq!(
            json_flag(&installed_args, "--admission-policy-namespace-selector"),
            w["namespaceSelector"]
        );
        assert_eq!(
            json_flag(&installed_args, "--admission-policy-object-selector"),
            w["objectSelector"]
        );
    }
    // The name of the webhook configuration whose caBundle the operator keeps.
    let webhook_name = if map_mode { FALLBACK } else { FULLNAME };

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

    // The NetworkPolicy, as the apiserver validated and stored it: the webhook port open, the admin port to the
    // release namespace and `monitoring`.
    let np = get("networkpolicy", FULLNAME, Some(NS)).expect("the NetworkPolicy");
    assert_eq!(
        np["spec"]["podSelector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(np["spec"]["policyTypes"], json!(["Ingress"]));
    assert_eq!(
        np["spec"]["ingress"],
        json!([
            {"ports": [{"port": 8443, "protocol": "TCP"}]},
            {"ports": [{"port": 9090, "protocol": "TCP"}], "from": [
                {"podSelector": {}},
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
            ]},
        ])
    );
    // Critical priority classes, which the apiserver's Priority admission resolves for the pods below.
    assert_eq!(pod_spec["priorityClassName"], "system-cluster-critical");

    // The agent DaemonSet.
    assert!(get("daemonset", &format!("{FULLNAME}-agent"), Some(NS)).is_none());
    let ds = get("daemonset", &format!("{FULLNAME}-agent"), Some(AGENT_NS)).expect("the agent in its namespace");
    assert!(get("serviceaccount", &format!("{FULLNAME}-agent"), Some(AGENT_NS)).is_some());
    // Its admin port: only from the release namespace and `monitoring`.
    let agent_np =
        get("networkpolicy", &format!("{FULLNAME}-agent"), Some(AGENT_NS)).expect("the agent's NetworkPolicy");
    assert_eq!(
        agent_np["spec"]["podSelector"]["matchLabels"],
        ds["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(
        agent_np["spec"]["ingress"],
        json!([{"ports": [{"port": 9090, "protocol": "TCP"}], "from": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NS}}},
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
        ]}])
    );
    let agent_spec = ds["spec"]["template"]["spec"].clone();
    assert_eq!(agent_spec["priorityClassName"], "system-node-critical");
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
    let admitted = admit_pod("keepalive-chart-restricted", "operator", &pod_spec);
    admitted.expect("the operator pod is 'restricted' (and its priority class exists)");
    admit_pod(NS, "operator", &pod_spec).expect("the operator pod in the release namespace, 'restricted'");
    let refused = admit_pod(NS, "agent", &agent_spec).expect_err("the agent in the restricted release namespace");
    assert!(refused.contains("violates PodSecurity"), "{refused}");
    admit_pod(AGENT_NS, "agent", &agent_spec).expect("the agent pod in its own namespace");
    let refused = admit_pod("keepalive-chart-baseline", "agent", &agent_spec).expect_err("agent under baseline");
    assert!(refused.contains("violates PodSecurity"), "{refused}");
    admit_pod("keepalive-chart-privileged", "agent", &agent_spec).expect("the agent pod under 'privileged'");

    // RBAC objects: exactly these rules (the mode's, see `operator_rules`; the policy and binding because the
    // apiserver serves them exactly when auto resolved to admissionPolicy).
    let operator_cluster_rules = rules(&get("clusterrole", FULLNAME, None).unwrap());
    assert_eq!(operator_cluster_rules, operator_rules(map_mode, map_mode, true));
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
        (&["patch", "keepalivenodereports.keepalive.dev"], true),
        (&["delete", "keepalivenodereports.keepalive.dev"], true),
        (&["create", "keepalivenodereports.keepalive.dev"], false),
        (&["list", "nodes"], true),
        (&["watch", "nodes"], true),
        (&["patch", "nodes"], false),
        (&["list", "runtimeclasses.node.k8s.io"], true),
        (&["create", "runtimeclasses.node.k8s.io"], false),
    ];
    let fallback = format!("mutatingwebhookconfigurations/{FALLBACK}");
    let own = format!("mutatingwebhookconfigurations/{FULLNAME}");
    let map = format!("mutatingadmissionpolicies.admissionregistration.k8s.io/{POLICIES}");
    let binding = format!("mutatingadmissionpolicybindings.admissionregistration.k8s.io/{POLICIES}");
    let owner = format!("clusterroles.rbac.authorization.k8s.io/{FULLNAME}");
    let mode_checks: Vec<([&str; 2], bool)> = vec![
        // Its webhook configuration: the chart's (webhook mode) or the fallback (admissionPolicy mode).
        (["patch", &own], !map_mode),
        (["watch", &own], !map_mode),
        (["delete", &own], false),
        (["create", &fallback], map_mode),
        (["patch", &fallback], map_mode),
        (["watch", &fallback], map_mode),
        (["delete", &fallback], map_mode),
        // The admission policy and binding of its name, where served; no other.
        (["create", &map], map_mode),
        (["patch", &map], map_mode),
        (["delete", &map], map_mode),
        (["patch", &binding], map_mode),
        (["delete", &binding], map_mode),
        (["get", &map], false),
        (
            ["list", "mutatingadmissionpolicies.admissionregistration.k8s.io"],
            false,
        ),
        (
            ["patch", "mutatingadmissionpolicies.admissionregistration.k8s.io/other"],
            false,
        ),
        (
            ["create", "mutatingadmissionpolicies.admissionregistration.k8s.io"],
            false,
        ),
        // Its ClusterRole, read to own what it creates; nothing else of RBAC.
        (["get", &owner], map_mode),
        (["patch", &owner], false),
        (["get", "clusterroles.rbac.authorization.k8s.io/admin"], false),
        (["list", "clusterroles.rbac.authorization.k8s.io"], false),
    ];
    for (args, allowed) in operator_checks
        .iter()
        .map(|(a, allowed)| (a.to_vec(), *allowed))
        .chain(mode_checks.iter().map(|(a, allowed)| (a.to_vec(), *allowed)))
    {
        assert_eq!(
            can_i(cp, NS, op, &args),
            allowed,
            "operator ({mode} mode): can-i {args:?}"
        );
    }
    let agent = format!("{FULLNAME}-agent");
    let agent_checks: &[(&[&str], bool)] = &[
        // No pod reads at all: the agent reports pods by the UIDs of their cgroups.
        (&["get", "pods", "--all-namespaces"], false),
        (&["list", "pods", "--all-namespaces"], false),
        (&["watch", "pods", "--all-namespaces"], false),
        (&["list", "pods", "-n", AGENT_NS], false),
        (&["create", "keepalivenodereports.keepalive.dev"], true),
        (&["patch", "keepalivenodereports.keepalive.dev"], true),
        (&["create", "pods", "-n", "default"], false),
        (&["patch", "pods", "-n", "default"], false),
        (&["delete", "pods", "-n", "default"], false),
        (&["get", "secrets", "-n", NS], false),
        (&["get", "secrets", "-n", AGENT_NS], false),
        (&["list", "nodes"], false),
        (&["delete", "keepalivenodereports.keepalive.dev"], false),
        (&["list", "keepalivepolicies.keepalive.dev"], false),
        (
            &["patch", "keepalivepolicies.keepalive.dev", "--subresource=status"],
            false,
        ),
    ];
    for (args, allowed) in agent_checks {
        assert_eq!(can_i(cp, AGENT_NS, &agent, args), *allowed, "agent: can-i {args:?}");
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
    // The caBundle of a webhook configuration ("" when it does not exist).
    let ca_bundle_of = |name: &str| {
        get("mutatingwebhookconfiguration", name, None)
            .and_then(|c| c["webhooks"][0]["clientConfig"]["caBundle"].as_str().map(String::from))
            .unwrap_or_default()
    };
    let ca_bundle = || ca_bundle_of(webhook_name);
    if !map_mode {
        eventually(Duration::from_secs(30), "the caBundle set by the operator", || async {
            (ca_bundle() == ca).then_some(())
        })
        .await;
    }
    // In admissionPolicy mode, no fallback while no policy needs it (checked below, with one that does).
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
        // The webhook only from this host, egress only to the apiserver: accepted by the apiserver as well.
        "--set=networkPolicy.webhookFrom[0].ipBlock.cidr=127.0.0.1/32",
        "--set=networkPolicy.egress[0].to[0].ipBlock.cidr=127.0.0.1/32",
        "--set=networkPolicy.egress[0].ports[0].port=6443",
    ]);
    assert!(out.contains("REVISION: 2"), "{out}");
    assert_eq!(get("deployment", FULLNAME, Some(NS)).unwrap()["spec"]["replicas"], 3);
    let np = get("networkpolicy", FULLNAME, Some(NS)).unwrap();
    assert_eq!(np["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(
        np["spec"]["ingress"][0]["from"],
        json!([{"ipBlock": {"cidr": "127.0.0.1/32"}}])
    );
    assert_eq!(
        np["spec"]["egress"],
        json!([{"to": [{"ipBlock": {"cidr": "127.0.0.1/32"}}], "ports": [{"port": 6443, "protocol": "TCP"}]}])
    );
    let args = operator_args(port, admin_port);
    let w = if map_mode {
        assert!(get("mutatingwebhookconfiguration", FULLNAME, None).is_none());
        json_flag(&args, "--fallback-webhook-configuration")["webhooks"][0].clone()
    } else {
        get("mutatingwebhookconfiguration", FULLNAME, None).unwrap()["webhooks"][0].clone()
    };
    assert_eq!(w["clientConfig"]["url"], format!("https://127.0.0.1:{port}/mutate"));
    assert!(w["clientConfig"]["service"].is_null(), "{w}");
    if !map_mode {
        assert_eq!(ca_bundle(), ca, "helm upgrade keeps the caBundle the operator set");
    }

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
    if !map_mode {
        assert_eq!(ca_bundle(), ca);
    }

    // Through the chart's webhook configuration (webhook mode) or the operator's admission policy, a pod gets its
    // sysctls; the leader writes the policy's status.
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
        "a pod mutated through the chart's webhook or the admission policy",
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

    if map_mode {
        // The leader compiled the policies into the admission policy and its binding: the chart's names and
        // selectors, owned by the operator's ClusterRole (helm uninstall deletes it, the garbage collector them).
        let owner = get("clusterrole", FULLNAME, None).unwrap();
        let policy = eventually(Duration::from_secs(30), "the MutatingAdmissionPolicy", || async {
            get("mutatingadmissionpolicy", POLICIES, None)
        })
        .await;
        assert_eq!(policy["spec"]["failurePolicy"], "Ignore");
        let binding = eventually(Duration::from_secs(30), "its binding", || async {
            get("mutatingadmissionpolicybinding", POLICIES, None)
        })
        .await;
        assert_eq!(binding["spec"]["policyName"], POLICIES);
        assert_eq!(
            binding["spec"]["matchResources"]["namespaceSelector"],
            json_flag(&args, "--admission-policy-namespace-selector")
        );
        assert_eq!(
            binding["spec"]["matchResources"]["objectSelector"],
            json_flag(&args, "--admission-policy-object-selector")
        );
        assert_owned_by(&policy, &owner);
        assert_owned_by(&binding, &owner);
        assert!(
            get("mutatingwebhookconfiguration", FALLBACK, None).is_none(),
            "no fallback webhook while every policy fits the admission policy"
        );
        // A policy that does not fit: the operator registers the fallback, sets its caBundle, and deletes it when
        // the policy is gone.
        create_policy(&client, "chart-huge", policy_too_long_for_the_admission_policy()).await;
        let stored = eventually(
            Duration::from_secs(30),
            "the fallback webhook configuration with its caBundle",
            || async {
                let mwc = get("mutatingwebhookconfiguration", FALLBACK, None)?;
                (mwc["webhooks"][0]["clientConfig"]["caBundle"] == ca.as_str()).then_some(mwc)
            },
        )
        .await;
        let given = json_flag(&args, "--fallback-webhook-configuration");
        // The chart's labels, but managed by the operator, not by Helm.
        let mut labels = given["metadata"]["labels"].clone();
        labels["app.kubernetes.io/managed-by"] = json!("keepalive-operator");
        assert_eq!(stored["metadata"]["labels"], labels);
        for field in [
            "name",
            "namespaceSelector",
            "objectSelector",
            "rules",
            "failurePolicy",
            "timeoutSeconds",
        ] {
            assert_eq!(stored["webhooks"][0][field], given["webhooks"][0][field], "{field}");
        }
        assert_eq!(
            stored["webhooks"][0]["clientConfig"]["url"],
            format!("https://127.0.0.1:{port}/mutate")
        );
        assert_owned_by(&stored, &owner);
        cp.kubectl_output(&["delete", "keepalivepolicy", "chart-huge"]).unwrap();
        eventually(
            Duration::from_secs(30),
            "the fallback webhook configuration deleted",
            || async {
                get("mutatingwebhookconfiguration", FALLBACK, None)
                    .is_none()
                    .then_some(())
            },
        )
        .await;
        assert_never_forbidden(&operator);
    }

    // --- sufficient: the agent with its ServiceAccount's token and the DaemonSet's args ----------------------
    // The token kubelet gives an agent pod on `chart-node` (bound to the pod, naming its node), which the chart's
    // ValidatingAdmissionPolicy requires.
    let token = pod_bound_token(cp, AGENT_NS, &agent, "agent-on-chart-node", "chart-node");
    let agent_kubeconfig = cp.token_kubeconfig("chart-agent", &token).unwrap();
    let agent_admin = cluster::free_port().unwrap();
    let agent_args = cp
        .container_args(
            "daemonset",
            AGENT_NS,
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
    // Written by the agent (its field manager), with nothing but the rights above and its pod's token.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let report = reports.get_opt("chart-node").await.unwrap();
        let managers = report.and_then(|r| r.metadata.managed_fields).unwrap_or_default();
        if managers.iter().any(|m| m.manager.as_deref() == Some("keepalive-agent")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no report of chart-node written by the agent after 30 s:\n{}",
            agent_process.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Its probes: ready once the report is written.
    assert_eq!(cluster::http_get(agent_admin, "/readyz").map(|(c, _)| c), Some(200));
    assert_never_forbidden(&agent_process);
    drop(agent_process);
    assert_never_forbidden(&operator);

    if map_mode {
        // --- back to webhook mode: the chart's webhook configuration returns; the operator deletes the admission
        // policy, its binding and a fallback left from admissionPolicy mode.
        create_policy(&client, "chart-huge", policy_too_long_for_the_admission_policy()).await;
        eventually(
            Duration::from_secs(30),
            "the fallback webhook configuration",
            || async { get("mutatingwebhookconfiguration", FALLBACK, None) },
        )
        .await;
        operator.stop();
        let out = helm_ok(&[
            "upgrade",
            RELEASE,
            chart,
            "--namespace",
            NS,
            "--reuse-values",
            "--set=injection.mode=webhook",
        ]);
        assert!(
            out.contains("Injection mode: webhook (injection.mode=webhook)"),
            "{out}"
        );
        assert!(get("mutatingwebhookconfiguration", FULLNAME, None).is_some());
        assert_eq!(
            rules(&get("clusterrole", FULLNAME, None).unwrap()),
            operator_rules(false, true, true)
        );
        let args = operator_args(port, admin_port);
        assert_eq!(flag(&args, "--injection-mode"), Some("webhook"));
        assert_eq!(flag(&args, "--webhook-configuration"), Some(FULLNAME));
        // The fallback named, for the operator to delete.
        assert_eq!(
            json_flag(&args, "--fallback-webhook-configuration")["metadata"]["name"],
            FALLBACK
        );
        assert_eq!(flag(&args, "--owner-cluster-role"), None);
        let mut operator = HostProcess::spawn(cp, "chart-operator-3", &args, &kubeconfig);
        operator.wait_ready(admin_port);
        eventually(
            Duration::from_secs(30),
            "admissionPolicy mode's objects deleted",
            || async {
                (get("mutatingadmissionpolicy", POLICIES, None).is_none()
                    && get("mutatingadmissionpolicybinding", POLICIES, None).is_none()
                    && get("mutatingwebhookconfiguration", FALLBACK, None).is_none())
                .then_some(())
            },
        )
        .await;
        eventually(Duration::from_secs(30), "the caBundle set by the operator", || async {
            (ca_bundle_of(FULLNAME) == ca).then_some(())
        })
        .await;
        cp.kubectl_output(&["delete", "keepalivepolicy", "chart-huge"]).unwrap();
        assert_never_forbidden(&operator);
        operator.stop();
    }
    operator.stop();

    // --- uninstall: everything of the release goes; CRDs, policies and reports stay ------------------------
    let out = helm_ok(&["uninstall", RELEASE, "--namespace", NS]);
    assert!(out.contains("uninstalled"), "{out}");
    for (kind, name, ns) in [
        ("deployment", FULLNAME, Some(NS)),
        ("daemonset", "ka-keepalive-operator-agent", Some(AGENT_NS)),
        ("serviceaccount", "ka-keepalive-operator-agent", Some(AGENT_NS)),
        ("networkpolicy", "ka-keepalive-operator-agent", Some(AGENT_NS)),
        (
            "validatingadmissionpolicy",
            "ka-keepalive-operator-agent-node-bound",
            None,
        ),
        (
            "validatingadmissionpolicybinding",
            "ka-keepalive-operator-agent-node-bound",
            None,
        ),
        ("service", FULLNAME, Some(NS)),
        ("networkpolicy", FULLNAME, Some(NS)),
        ("serviceaccount", FULLNAME, Some(NS)),
        ("role", FULLNAME, Some(NS)),
        ("mutatingwebhookconfiguration", FULLNAME, None),
        ("mutatingwebhookconfiguration", FALLBACK, None),
        ("mutatingadmissionpolicy", POLICIES, None),
        ("mutatingadmissionpolicybinding", POLICIES, None),
        ("clusterrole", FULLNAME, None),
        ("clusterrole", "ka-keepalive-operator-agent", None),
        ("clusterrolebinding", FULLNAME, None),
    ] {
        assert!(
            get(kind, name, ns).is_none(),
            "{kind} {name} still there after uninstall"
        );
    }
    // The agent's namespace is the release's: deleted (no namespace controller runs here to finish it).
    let agent_ns = get("namespace", AGENT_NS, None);
    assert!(
        agent_ns
            .as_ref()
            .is_none_or(|ns| ns["status"]["phase"] == "Terminating"),
        "{agent_ns:?}"
    );
    for crd in ["keepalivepolicies.keepalive.dev", "keepalivenodereports.keepalive.dev"] {
        assert!(get("crd", crd, None).is_some(), "{crd} deleted by helm uninstall");
    }
    assert!(get("keepalivepolicy", "chart-policy", None).is_some());
    assert!(get("keepalivenodereport", "chart-node", None).is_some());
}
