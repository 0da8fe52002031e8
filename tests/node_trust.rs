//! Each node agent vouches only for its own node, on the real apiserver with the chart installed by the real helm:
//! with the token kubelet would give an agent pod on node-a (a TokenRequest bound to a pod with `spec.nodeName`,
//! which the apiserver turns into the user info extra `authentication.kubernetes.io/node-name`), node-a's report
//! can be written and node-b's cannot (the chart's ValidatingAdmissionPolicy), out-of-bounds reports are refused by
//! the CRD schema, a token bound to no pod is refused, other users are not affected; and `kubectl auth can-i`
//! proves the agent reads no pods and the operator has the rights its controller needs.

mod common;

use std::{path::Path, time::Duration};

use common::*;
use k8s_openapi::{api::coordination::v1::Lease, jiff::Timestamp};
use keepalive_operator::{
    agent::heartbeat::lease_body,
    api::{HEARTBEAT_LABEL, KeepaliveNodeReport},
};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::{Value, json};
use xtask::ControlPlane;

const NS: &str = "keepalive-trust";
const AGENT_NS: &str = "keepalive-trust-agent";
const RELEASE: &str = "trust";
const FULLNAME: &str = "trust-keepalive-operator";
const AGENT_SA: &str = "trust-keepalive-operator-agent";
const POLICY: &str = "trust-keepalive-operator-agent-node-bound";
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

fn helm(cp: &ControlPlane, args: &[&str]) -> String {
    let out = cp.helm().args(args).output().expect("running helm");
    assert!(
        out.status.success(),
        "helm {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A node report as the agent writes it, with `spec` merged over a minimal valid one.
fn report(name: &str, spec: Value) -> Value {
    let mut base = json!({"lastScan": "2026-11-23T00:00:00Z", "heartbeatSeconds": 60, "scanIntervalSeconds": 10,
                          "verifiedPods": 0, "unverifiedPods": 0});
    for (k, v) in spec.as_object().unwrap() {
        base[k] = v.clone();
    }
    json!({"apiVersion": "keepalive.dev/v1alpha1", "kind": "KeepaliveNodeReport", "metadata": {"name": name},
           "spec": base})
}

/// Server-side apply as the agent does it (field manager `keepalive-agent`).
async fn apply(api: &Api<KeepaliveNodeReport>, object: &Value) -> kube::Result<KeepaliveNodeReport> {
    let name = object["metadata"]["name"].as_str().unwrap();
    api.patch(
        name,
        &PatchParams::apply("keepalive-agent").force(),
        &Patch::Apply(object),
    )
    .await
}

/// The apiserver's refusal: (HTTP code, message); panics if the request was accepted.
fn refusal<T: std::fmt::Debug>(result: kube::Result<T>, what: &str) -> (u16, String) {
    match result {
        Err(kube::Error::Api(s)) => (s.code, s.message),
        other => panic!("{what}: expected a refusal by the apiserver, got {other:?}"),
    }
}

fn assert_policy_refused<T: std::fmt::Debug>(result: kube::Result<T>, what: &str, message: &str) {
    let (code, text) = refusal(result, what);
    assert_eq!(code, 403, "{what}: {text}");
    assert!(
        text.contains(&format!("ValidatingAdmissionPolicy '{POLICY}'")) && text.contains(message),
        "{what}: expected the policy's message {message:?}, got: {text}"
    );
}

fn assert_schema_refused<T: std::fmt::Debug>(result: kube::Result<T>, what: &str, field: &str, message: &str) {
    let (code, text) = refusal(result, what);
    assert_eq!(code, 422, "{what}: {text}");
    assert!(
        text.contains(field) && text.contains(message),
        "{what}: expected {field} / {message:?} in: {text}"
    );
}

fn token_client_config(cp: &ControlPlane, name: &str, token: &str) -> std::path::PathBuf {
    cp.token_kubeconfig(name, token).unwrap()
}

#[tokio::test]
async fn an_agent_writes_only_the_report_of_its_own_node() {
    let cp = control_plane();
    let admin = cp.client().await.unwrap();
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/keepalive-operator");

    // As the README says: the release namespace enforces "restricted" before the install; the chart creates the
    // agent's namespace ("privileged"). The CRDs are already installed (the committed ones, which the chart
    // ships too).
    kubectl_apply(
        cp,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "labels": {
            "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}}}),
    );
    helm(
        cp,
        &[
            "install",
            RELEASE,
            chart.to_str().unwrap(),
            "--namespace",
            NS,
            "--skip-crds",
            "--set",
            "image.tag=test",
            "--wait=false",
        ],
    );
    let agent_ns = cp
        .kubectl_output(&["get", "namespace", AGENT_NS, "-o", "json"])
        .unwrap();
    let agent_ns: Value = serde_json::from_str(&agent_ns).unwrap();
    assert_eq!(
        agent_ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );

    // --- the token: bound to a pod on node-a, and the apiserver says so ------------------------------------
    node_object(cp, "node-b");
    let token = pod_bound_token(cp, AGENT_NS, AGENT_SA, "agent-on-node-a", "node-a");
    let kubeconfig = token_client_config(cp, "agent-on-node-a", &token);
    let user = whoami(cp, &kubeconfig);
    assert_eq!(user["username"], format!("system:serviceaccount:{AGENT_NS}:{AGENT_SA}"));
    // Without this the test below would prove nothing: the node name is in the request's user info.
    assert_eq!(user["extra"][NODE_NAME_EXTRA], json!(["node-a"]), "{user}");
    assert_eq!(
        user["extra"]["authentication.kubernetes.io/pod-name"],
        json!(["agent-on-node-a"])
    );

    let agent = client_from_kubeconfig(&kubeconfig).await;
    let as_agent: Api<KeepaliveNodeReport> = Api::all(agent.clone());
    let as_admin: Api<KeepaliveNodeReport> = Api::all(admin.clone());

    // Another node's report: refused by the policy, with both names (once the apiserver has loaded the policy
    // and its binding, and RBAC the agent's role, all a moment after the install).
    let refused = eventually(Duration::from_secs(30), "the policy in force", || async {
        match apply(&as_agent, &report("node-b", json!({}))).await {
            Ok(_) => {
                as_admin.delete("node-b", &DeleteParams::default()).await.unwrap();
                None
            }
            Err(kube::Error::Api(s)) if s.message.contains("cannot patch resource") => None,
            other => Some(other),
        }
    })
    .await;
    assert_policy_refused(
        refused,
        "agent of node-a writing node-b's report",
        "the keepalive agent of node node-a may write only the KeepaliveNodeReport node-a, not node-b",
    );
    assert!(as_admin.get_opt("node-b").await.unwrap().is_none());

    // Its own: created, then updated.
    let written = apply(&as_agent, &report("node-a", json!({"verifiedPods": 1}))).await;
    assert_eq!(written.expect("node-a's own report").spec.verified_pods, 1);
    let written = apply(&as_agent, &report("node-a", json!({"verifiedPods": 2}))).await;
    assert_eq!(written.expect("node-a's own report, updated").spec.verified_pods, 2);

    // Its own, out of bounds: refused by the CRD schema, and the stored report is unchanged.
    assert_schema_refused(
        apply(&as_agent, &report("node-a", json!({"heartbeatSeconds": 2147483647}))).await,
        "a heartbeat that never goes stale",
        "spec.heartbeatSeconds",
        "should be less than or equal to 3600",
    );
    assert_schema_refused(
        apply(&as_agent, &report("node-a", json!({"refreshSeconds": 2147483647}))).await,
        "a refresh that never goes stale",
        "spec.refreshSeconds",
        "should be less than or equal to 86400",
    );
    let error = "e".repeat(10_000);
    let pod = json!({"uid": "0123456789abcdef0123456789abcdef", "readAt": "2026-11-23T00:00:00Z", "error": error});
    assert_schema_refused(
        apply(&as_agent, &report("node-a", json!({"pods": [pod]}))).await,
        "an error of 10 000 characters",
        "spec.pods[0].error",
        "Too long",
    );
    let pods: Vec<Value> = (0..3000)
        .map(|i| json!({"uid": format!("{i:032x}"), "readAt": "2026-11-23T00:00:00Z"}))
        .collect();
    assert_schema_refused(
        apply(&as_agent, &report("node-a", json!({"pods": pods}))).await,
        "3000 pod entries",
        "spec.pods",
        "Too many",
    );
    assert_eq!(as_admin.get("node-a").await.unwrap().spec.verified_pods, 2);

    // ownerReferences are the controller's: the agent can neither set nor change them.
    let mut owned = report("node-a", json!({}));
    owned["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "Node", "name": "node-b",
        "uid": "00000000-0000-0000-0000-000000000000"}]);
    assert_policy_refused(
        apply(&as_agent, &owned).await,
        "the agent setting an ownerReference",
        "may not set or change ownerReferences",
    );

    // Other users are not matched: an admin writes node-b's report (the controller's patches are not the agent's).
    apply(&as_admin, &report("node-b", json!({})))
        .await
        .expect("admin writes node-b's report");

    // Deleting: the agent has no delete right at all (RBAC) ...
    let (code, text) = refusal(
        as_agent.delete("node-b", &DeleteParams::default()).await,
        "agent deleting node-b's report",
    );
    assert_eq!(code, 403, "{text}");
    assert!(text.contains("cannot delete resource"), "{text}");
    // ... and were it granted one, the policy would still let it delete only its own node's report.
    kubectl_apply(
        cp,
        &json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": {"name": "trust-test-delete-reports"},
                "rules": [{"apiGroups": ["keepalive.dev"], "resources": ["keepalivenodereports"], "verbs": ["delete"]}]}),
    );
    kubectl_apply(
        cp,
        &json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": "trust-test-delete-reports"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "trust-test-delete-reports"},
                "subjects": [{"kind": "ServiceAccount", "name": AGENT_SA, "namespace": AGENT_NS}]}),
    );
    let deleted_b = eventually(
        Duration::from_secs(10),
        "RBAC granting the test's delete right",
        || async {
            match as_agent.delete("node-b", &DeleteParams::default()).await {
                Err(kube::Error::Api(s)) if s.message.contains("cannot delete resource") => None,
                other => Some(other),
            }
        },
    )
    .await;
    assert_policy_refused(
        deleted_b,
        "agent of node-a deleting node-b's report",
        "may write only the KeepaliveNodeReport node-a, not node-b",
    );
    assert!(as_admin.get_opt("node-b").await.unwrap().is_some());
    as_agent
        .delete("node-a", &DeleteParams::default())
        .await
        .expect("the agent deletes its own node's report");
    cp.kubectl_output(&["delete", "clusterrolebinding,clusterrole", "trust-test-delete-reports"])
        .unwrap();

    // A token of the agent's ServiceAccount bound to no pod names no node: refused, even for a report it names.
    let unbound = cp
        .kubectl_output(&["create", "token", AGENT_SA, "-n", AGENT_NS, "--duration=1h"])
        .unwrap();
    let unbound_kubeconfig = token_client_config(cp, "agent-unbound", unbound.trim());
    assert!(whoami(cp, &unbound_kubeconfig)["extra"].get(NODE_NAME_EXTRA).is_none());
    let unbound = Api::<KeepaliveNodeReport>::all(client_from_kubeconfig(&unbound_kubeconfig).await);
    assert_policy_refused(
        apply(&unbound, &report("node-a", json!({}))).await,
        "a token bound to no pod",
        "the keepalive agent's token names no node",
    );

    // --- kubectl auth can-i: the agent reads no pods; the operator has what its controller needs --------------
    let agent_checks: &[(&[&str], bool)] = &[
        (&["get", "pods", "--all-namespaces"], false),
        (&["list", "pods", "--all-namespaces"], false),
        (&["watch", "pods", "--all-namespaces"], false),
        (&["get", "pods", "-n", AGENT_NS], false),
        (&["list", "pods", "-n", AGENT_NS], false),
        (&["watch", "pods", "-n", "default"], false),
        (&["list", "nodes"], false),
        (&["get", "secrets", "-n", AGENT_NS], false),
        (&["create", "keepalivenodereports.keepalive.dev"], true),
        (&["patch", "keepalivenodereports.keepalive.dev"], true),
        (&["patch", "keepalivenodereports.keepalive.dev/node-a"], true),
        (&["get", "keepalivenodereports.keepalive.dev"], false),
        (&["list", "keepalivenodereports.keepalive.dev"], false),
        (&["delete", "keepalivenodereports.keepalive.dev"], false),
        (&["list", "keepalivepolicies.keepalive.dev"], false),
    ];
    for (args, allowed) in agent_checks {
        assert_eq!(can_i(cp, AGENT_NS, AGENT_SA, args), *allowed, "agent: can-i {args:?}");
    }
    let operator_checks: &[(&[&str], bool)] = &[
        (&["list", "nodes"], true),
        (&["watch", "nodes"], true),
        (&["get", "nodes"], false),
        (&["patch", "nodes"], false),
        (&["list", "runtimeclasses.node.k8s.io"], true),
        (&["watch", "runtimeclasses.node.k8s.io"], true),
        (&["list", "keepalivenodereports.keepalive.dev"], true),
        (&["watch", "keepalivenodereports.keepalive.dev"], true),
        (&["patch", "keepalivenodereports.keepalive.dev"], true),
        (&["delete", "keepalivenodereports.keepalive.dev"], true),
        (&["create", "keepalivenodereports.keepalive.dev"], false),
        (&["update", "keepalivenodereports.keepalive.dev"], false),
    ];
    for (args, allowed) in operator_checks {
        assert_eq!(can_i(cp, NS, FULLNAME, args), *allowed, "operator: can-i {args:?}");
    }

    // The operator's patches of reports (ownerReferences) are not the agent's: the policy does not match them.
    apply(&as_admin, &report("node-a", json!({}))).await.unwrap();
    let operator_kubeconfig = cp.service_account_kubeconfig(NS, FULLNAME).unwrap();
    let as_operator = Api::<KeepaliveNodeReport>::all(client_from_kubeconfig(&operator_kubeconfig).await);
    let node_a_uid = node_object(cp, "node-a");
    as_operator
        .patch(
            "node-a",
            &PatchParams::apply("keepalive-controller"),
            &Patch::Apply(
                json!({"apiVersion": "keepalive.dev/v1alpha1", "kind": "KeepaliveNodeReport",
                "metadata": {"name": "node-a", "ownerReferences": [{"apiVersion": "v1", "kind": "Node",
                    "name": "node-a", "uid": node_a_uid}]}}),
            ),
        )
        .await
        .expect("the operator sets the report's ownerReference");
    // The agent's next write keeps it, and is accepted.
    apply(&as_agent, &report("node-a", json!({"verifiedPods": 3})))
        .await
        .expect("the agent rewrites its report under the controller's ownerReference");
    let stored = as_admin.get("node-a").await.unwrap();
    assert_eq!(stored.metadata.owner_references.unwrap()[0].uid, node_a_uid);

    // --- the heartbeat Lease: its own node's only, labelled, owned by nothing but its own pod -------------------
    const LEASE_POLICY: &str = "trust-keepalive-operator-agent-heartbeat-bound";
    let as_agent_leases: Api<Lease> = Api::namespaced(agent.clone(), AGENT_NS);
    let admin_leases: Api<Lease> = Api::namespaced(admin.clone(), AGENT_NS);
    let own_pod = (
        "agent-on-node-a".to_string(),
        "40000000-0000-4000-8000-000000000000".to_string(),
    );
    let lease = |node: &str, owner: Option<&(String, String)>| lease_body(node, owner, 180, Timestamp::now());
    let apply_lease = |body: Value| {
        let api = as_agent_leases.clone();
        async move {
            let name = body["metadata"]["name"].as_str().unwrap().to_string();
            api.patch(
                &name,
                &PatchParams::apply("keepalive-agent").force(),
                &Patch::Apply(&body),
            )
            .await
        }
    };
    let lease_refused = |result: kube::Result<Lease>, what: &str, message: &str| {
        let (code, text) = refusal(result, what);
        assert_eq!(code, 403, "{what}: {text}");
        assert!(
            text.contains(&format!("ValidatingAdmissionPolicy '{LEASE_POLICY}'")) && text.contains(message),
            "{what}: {text}"
        );
    };
    // A Lease of the namespace created without the label (as another component's would be): not taken over.
    admin_leases
        .create(
            &Default::default(),
            &serde_json::from_value(json!({"metadata": {"name": "node-a"}, "spec": {}})).unwrap(),
        )
        .await
        .unwrap();
    let taken = eventually(Duration::from_secs(30), "the Lease policy in force", || async {
        match apply_lease(lease("node-a", Some(&own_pod))).await {
            Err(kube::Error::Api(s)) if s.message.contains("cannot patch resource") => None,
            other => Some(other),
        }
    })
    .await;
    lease_refused(
        taken,
        "taking over an unlabelled Lease",
        "may not take over a Lease created without it",
    );
    admin_leases.delete("node-a", &DeleteParams::default()).await.unwrap();
    // Its own, owned by its own pod: created, then renewed.
    let created = apply_lease(lease("node-a", Some(&own_pod)))
        .await
        .expect("node-a's own Lease");
    assert_eq!(created.metadata.labels.unwrap()[HEARTBEAT_LABEL], "true");
    apply_lease(lease("node-a", Some(&own_pod)))
        .await
        .expect("node-a's Lease renewed");
    lease_refused(
        apply_lease(lease("node-b", None)).await,
        "agent of node-a writing node-b's Lease",
        "the keepalive agent of node node-a may write only the heartbeat Lease node-a, not node-b",
    );
    let mut unlabelled = lease("node-a", None);
    unlabelled["metadata"].as_object_mut().unwrap().remove("labels");
    lease_refused(
        apply_lease(unlabelled).await,
        "its own Lease without the label",
        "may write only Leases labelled keepalive.dev/node-heartbeat=true",
    );
    let other_pod = (
        "agent-on-node-b".to_string(),
        "50000000-0000-4000-8000-000000000000".to_string(),
    );
    lease_refused(
        apply_lease(lease("node-a", Some(&other_pod))).await,
        "its Lease owned by another pod",
        "may be owned by the agent's own pod only",
    );
    // Outside its namespace RBAC refuses it (the operator's leader-election Lease lives in the release namespace).
    let (code, text) = refusal(
        Api::<Lease>::namespaced(agent.clone(), NS)
            .patch(
                "node-a",
                &PatchParams::apply("keepalive-agent").force(),
                &Patch::Apply(lease("node-a", None)),
            )
            .await,
        "a Lease in the release namespace",
    );
    assert_eq!(code, 403, "{text}");
    assert!(text.contains("cannot patch resource"), "{text}");
    let lease_checks: &[(&str, &[&str], bool)] = &[
        ("agent", &["create", "leases", "-n", AGENT_NS], true),
        ("agent", &["patch", "leases", "-n", AGENT_NS], true),
        ("agent", &["get", "leases", "-n", AGENT_NS], false),
        ("agent", &["list", "leases", "-n", AGENT_NS], false),
        ("agent", &["delete", "leases", "-n", AGENT_NS], false),
        ("agent", &["patch", "leases", "-n", NS], false),
        ("operator", &["list", "leases", "-n", AGENT_NS], true),
        ("operator", &["watch", "leases", "-n", AGENT_NS], true),
        ("operator", &["patch", "leases", "-n", AGENT_NS], false),
        ("operator", &["create", "leases", "-n", AGENT_NS], false),
    ];
    for (who, args, allowed) in lease_checks {
        let (namespace, account) = if *who == "agent" {
            (AGENT_NS, AGENT_SA)
        } else {
            (NS, FULLNAME)
        };
        assert_eq!(can_i(cp, namespace, account, args), *allowed, "{who}: can-i {args:?}");
    }
}
