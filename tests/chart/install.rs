//! `helm install` on the real apiserver, upgrade and uninstall; RBAC proven sufficient by running the operator
//! and the agent with the chart's ServiceAccounts' tokens, and minimal by `kubectl auth can-i`.

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
    let ds = get("daemonset", &format!("{FULLNAME}-agent"), Some(NS)).unwrap();
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
        // The agent reads no Pod objects (it finds pods by their cgroups): the report written is what shows the
        // chart's RBAC lets it write its node's report.
        reports.get_opt("chart-node").await.ok()?.map(|_| ())
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
        ("networkpolicy", FULLNAME, Some(NS)),
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
