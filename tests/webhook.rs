//! The admission webhook end to end: the real apiserver calls the real operator process over TLS for real pod
//! creates. Each test keeps to its own namespaces (labelled `test=<name>`) and its policies select only those.

mod common;

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

use common::*;
use k8s_openapi::api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Pod};
use keepalive_operator::api::KeepalivePolicy;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

/// One operator (certificates from files) and one webhook registration for the namespaces labelled
/// `scope=webhook`, shared by the tests of this file.
fn shared_operator() -> &'static Operator {
    static OPERATOR: OnceLock<Operator> = OnceLock::new();
    OPERATOR.get_or_init(|| {
        let cp = control_plane();
        let (ca, cert, key) = write_serving_cert(cp.work_dir());
        let op = Operator::start(
            cp,
            "shared",
            &[
                &format!("--tls-cert-file={}", cert.display()),
                &format!("--tls-key-file={}", key.display()),
            ],
        );
        // Called from inside a test's runtime: register from a thread with a runtime of its own.
        let url = op.url();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let client = cp.client().await.unwrap();
                register_webhook(&client, "keepalive-shared", &url, Some(&ca), "webhook").await;
            })
        })
        .join()
        .unwrap();
        op
    })
}

#[tokio::test]
async fn enforce_fill_and_audit_through_the_apiserver() {
    let op = shared_operator();
    let client = control_plane().client().await.unwrap();
    namespace(&client, "modes", &[("scope", "webhook"), ("test", "modes")]).await;
    let ns_sel = json!({"matchLabels": {"test": "modes"}});
    for (name, mode, time) in [
        ("modes-enforce", "Enforce", 100),
        ("modes-fill", "Fill", 200),
        ("modes-audit", "Audit", 300),
    ] {
        create_policy(
            &client,
            name,
            json!({"mode": mode, "namespaceSelector": ns_sel, "podSelector": {"matchLabels": {"mode": mode}},
                   "keepalive": {"time": time, "interval": 10, "probes": 5}}),
        )
        .await;
    }
    // The policies reach the webhook's cache through its watch.
    eventually(
        Duration::from_secs(10),
        "the audit policy in the webhook's cache",
        || async {
            let pod = create_dry_run(&client, "modes", json!({"metadata": {"labels": {"mode": "Fill"}}})).await;
            (!sysctls(&pod).is_empty()).then_some(())
        },
    )
    .await;

    let pod = create_pod(
        &client,
        "modes",
        "plain",
        json!({"metadata": {"labels": {"mode": "Enforce"}}}),
    )
    .await
    .unwrap();
    assert_eq!(sysctls(&pod), keepalive(100, 10, 5));
    assert_eq!(policy_annotation(&pod).as_deref(), Some("modes-enforce"));

    let own = json!({"securityContext": {"runAsUser": 1000, "sysctls": [
        {"name": "kernel.shm_rmid_forced", "value": "1"},
        {"name": "net.ipv4.tcp_keepalive_time", "value": "7200"}]}});
    let pod = create_pod(
        &client,
        "modes",
        "enforce-own",
        json!({"metadata": {"labels": {"mode": "Enforce"}}, "spec": own}),
    )
    .await
    .unwrap();
    assert_eq!(
        sysctls(&pod),
        vec![
            ("kernel.shm_rmid_forced".into(), "1".into()),
            ("net.ipv4.tcp_keepalive_time".into(), "100".into()),
            ("net.ipv4.tcp_keepalive_intvl".into(), "10".into()),
            ("net.ipv4.tcp_keepalive_probes".into(), "5".into()),
        ],
        "Enforce replaces the pod's keepalive value and keeps its other sysctls"
    );
    assert_eq!(pod.spec.unwrap().security_context.unwrap().run_as_user, Some(1000));

    let pod = create_pod(
        &client,
        "modes",
        "fill-own",
        json!({"metadata": {"labels": {"mode": "Fill"}}, "spec": own}),
    )
    .await
    .unwrap();
    assert_eq!(
        sysctls(&pod),
        vec![
            ("kernel.shm_rmid_forced".into(), "1".into()),
            ("net.ipv4.tcp_keepalive_time".into(), "7200".into()),
            ("net.ipv4.tcp_keepalive_intvl".into(), "10".into()),
            ("net.ipv4.tcp_keepalive_probes".into(), "5".into()),
        ],
        "Fill keeps the pod's own value and adds the missing ones"
    );
    assert_eq!(policy_annotation(&pod).as_deref(), Some("modes-fill"));

    let pod = create_pod(
        &client,
        "modes",
        "audit",
        json!({"metadata": {"labels": {"mode": "Audit"}}}),
    )
    .await
    .unwrap();
    assert!(sysctls(&pod).is_empty(), "Audit never mutates");
    assert_eq!(policy_annotation(&pod), None);

    // A pod that already has exactly the policy's values gets no patch, so no annotation either.
    let exact = json!({"metadata": {"labels": {"mode": "Enforce"}},
        "spec": {"securityContext": {"sysctls": [
            {"name": "net.ipv4.tcp_keepalive_time", "value": "100"},
            {"name": "net.ipv4.tcp_keepalive_intvl", "value": "10"},
            {"name": "net.ipv4.tcp_keepalive_probes", "value": "5"}]}}});
    let pod = create_pod(&client, "modes", "exact", exact).await.unwrap();
    assert_eq!(sysctls(&pod), keepalive(100, 10, 5));
    assert_eq!(policy_annotation(&pod), None);

    let metrics = op.metrics();
    assert!(
        metrics.contains("keepalive_webhook_requests_total{outcome=\"mutated\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("keepalive_webhook_mutations_total{policy=\"modes-enforce\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("keepalive_webhook_request_duration_seconds_bucket"),
        "{metrics}"
    );
}

#[tokio::test]
async fn pods_that_must_not_get_the_sysctls_are_created_unchanged() {
    shared_operator();
    let client = control_plane().client().await.unwrap();
    namespace(&client, "skips", &[("scope", "webhook"), ("test", "skips")]).await;
    namespace(
        &client,
        "skips-ignored",
        &[
            ("scope", "webhook"),
            ("test", "skips"),
            ("keepalive.dev/ignore", "true"),
        ],
    )
    .await;
    namespace(
        &client,
        "skips-psa",
        &[
            ("scope", "webhook"),
            ("test", "skips"),
            ("pod-security.kubernetes.io/enforce", "baseline"),
            ("pod-security.kubernetes.io/enforce-version", "v1.28"),
        ],
    )
    .await;
    create_policy(
        &client,
        "skips",
        json!({"namespaceSelector": {"matchLabels": {"test": "skips"}}, "keepalive": {"time": 60, "interval": 5, "probes": 3}}),
    )
    .await;
    eventually(Duration::from_secs(10), "the policy in the webhook's cache", || async {
        let pod = create_dry_run(&client, "skips", json!({})).await;
        (!sysctls(&pod).is_empty()).then_some(())
    })
    .await;

    let cases = [
        ("skips", "host-network", json!({"spec": {"hostNetwork": true}})),
        ("skips", "windows", json!({"spec": {"os": {"name": "windows"}}})),
        (
            "skips",
            "ignored-pod",
            json!({"metadata": {"labels": {"keepalive.dev/ignore": "true"}}}),
        ),
        ("skips-ignored", "in-ignored-namespace", json!({})),
        ("skips-psa", "in-pinned-pod-security", json!({})),
    ];
    for (ns, name, extra) in cases {
        let pod = create_pod(&client, ns, name, extra)
            .await
            .unwrap_or_else(|e| panic!("{ns}/{name} rejected: {e}"));
        assert!(sysctls(&pod).is_empty(), "{ns}/{name} got {:?}", sysctls(&pod));
        assert_eq!(policy_annotation(&pod), None, "{ns}/{name}");
    }
    // What the skips avoid: the apiserver rejects these pods once they carry the sysctls.
    let with_sysctl = |extra: serde_json::Value| {
        let mut v = json!({"metadata": {"labels": {"keepalive.dev/ignore": "true"}},
            "spec": {"securityContext": {"sysctls": [{"name": "net.ipv4.tcp_keepalive_time", "value": "60"}]}}});
        v["spec"]
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };
    let err = create_pod(
        &client,
        "skips",
        "hostnet-with-sysctls",
        with_sysctl(json!({"hostNetwork": true})),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("sysctls"), "{err}");
    let err = create_pod(&client, "skips-psa", "psa-with-sysctls", with_sysctl(json!({})))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("forbidden sysctls"), "{err}");
}

#[tokio::test]
async fn policy_changes_take_effect_on_the_next_pod() {
    shared_operator();
    let client = control_plane().client().await.unwrap();
    namespace(&client, "changes", &[("scope", "webhook"), ("test", "changes")]).await;
    let pod = create_pod(&client, "changes", "before", json!({})).await.unwrap();
    assert!(sysctls(&pod).is_empty(), "no policy yet");

    let created = Instant::now();
    create_policy(
        &client,
        "changes",
        json!({"namespaceSelector": {"matchLabels": {"test": "changes"}}, "keepalive": {"time": 30, "interval": 5, "probes": 2}}),
    )
    .await;
    eventually(Duration::from_secs(10), "the new policy to apply", || async {
        let pod = create_dry_run(&client, "changes", json!({})).await;
        (sysctls(&pod) == keepalive(30, 5, 2)).then_some(())
    })
    .await;
    eprintln!("new policy effective after {:?}", created.elapsed());
    let pod = create_pod(&client, "changes", "after", json!({})).await.unwrap();
    assert_eq!(sysctls(&pod), keepalive(30, 5, 2));

    let policies: Api<KeepalivePolicy> = Api::all(client.clone());
    let patch = json!({"spec": {"keepalive": {"time": 40}}});
    policies
        .patch("changes", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the changed policy to apply", || async {
        let pod = create_dry_run(&client, "changes", json!({})).await;
        (sysctls(&pod) == keepalive(40, 5, 2)).then_some(())
    })
    .await;

    policies.delete("changes", &DeleteParams::default()).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the deleted policy to stop applying",
        || async {
            let pod = create_dry_run(&client, "changes", json!({})).await;
            sysctls(&pod).is_empty().then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn pods_are_created_while_the_webhook_is_down() {
    let cp = control_plane();
    let client = cp.client().await.unwrap();
    let (ca, cert, key) = write_serving_cert(&cp.work_dir().join("down").tap_mkdir());
    let mut op = Operator::start(
        cp,
        "down",
        &[
            &format!("--tls-cert-file={}", cert.display()),
            &format!("--tls-key-file={}", key.display()),
        ],
    );
    register_webhook(&client, "keepalive-down", &op.url(), Some(&ca), "down").await;
    namespace(&client, "down", &[("scope", "down"), ("test", "down")]).await;
    create_policy(
        &client,
        "down",
        json!({"namespaceSelector": {"matchLabels": {"test": "down"}}, "keepalive": {"time": 20, "interval": 5, "probes": 3}}),
    )
    .await;
    eventually(Duration::from_secs(10), "the policy to apply", || async {
        let pod = create_dry_run(&client, "down", json!({})).await;
        (!sysctls(&pod).is_empty()).then_some(())
    })
    .await;

    op.stop();
    let pod = create_pod(&client, "down", "while-down", json!({}))
        .await
        .expect("failurePolicy Ignore admits the pod");
    assert!(sysctls(&pod).is_empty());
}

#[tokio::test]
async fn self_managed_certificates_keep_the_ca_bundle_in_sync() {
    let cp = control_plane();
    let client = cp.client().await.unwrap();
    namespace(&client, "keepalive-system", &[]).await;
    namespace(
        &client,
        "selfmanaged",
        &[("scope", "selfmanaged"), ("test", "selfmanaged")],
    )
    .await;
    let args = [
        "--namespace=keepalive-system",
        "--tls-secret=webhook-tls",
        "--tls-extra-sans=127.0.0.1",
        "--webhook-configuration=keepalive-selfmanaged",
    ];
    let op = Operator::start(cp, "selfmanaged", &args);
    // Registered without a caBundle, as a chart would before the operator runs.
    register_webhook(&client, "keepalive-selfmanaged", &op.url(), None, "selfmanaged").await;
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let bundle = eventually(Duration::from_secs(30), "the operator to set the caBundle", || async {
        let c = configs.get("keepalive-selfmanaged").await.ok()?;
        c.webhooks?.first()?.client_config.ca_bundle.clone()
    })
    .await;
    let secret = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), "keepalive-system")
        .get("webhook-tls")
        .await
        .unwrap();
    let data = secret.data.unwrap();
    assert_eq!(data["ca.crt"], bundle, "the caBundle is the CA in the shared Secret");
    for key in ["tls.crt", "tls.key", "ca.key"] {
        assert!(data.contains_key(key), "{key} missing from the Secret");
    }

    create_policy(
        &client,
        "selfmanaged",
        json!({"namespaceSelector": {"matchLabels": {"test": "selfmanaged"}}, "keepalive": {"time": 25, "interval": 5, "probes": 3}}),
    )
    .await;
    eventually(
        Duration::from_secs(15),
        "a pod mutated through the self-managed certificate",
        || async {
            let pod = create_dry_run(&client, "selfmanaged", json!({})).await;
            (sysctls(&pod) == keepalive(25, 5, 3)).then_some(())
        },
    )
    .await;

    // A second replica shares the Secret instead of issuing its own CA.
    let second = Operator::start(cp, "selfmanaged-2", &args);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let again = configs.get("keepalive-selfmanaged").await.unwrap();
    assert_eq!(
        again.webhooks.unwrap()[0].client_config.ca_bundle.as_ref(),
        Some(&bundle)
    );
    drop(second);
}

#[tokio::test]
async fn certificate_files_are_reloaded_without_a_restart() {
    let cp = control_plane();
    let client = cp.client().await.unwrap();
    let dir = cp.work_dir().join("reload").tap_mkdir();
    let (_, cert, key) = write_serving_cert(&dir);
    let _op = Operator::start(
        cp,
        "reload",
        &[
            &format!("--tls-cert-file={}", cert.display()),
            &format!("--tls-key-file={}", key.display()),
        ],
    );
    namespace(&client, "reload", &[("scope", "reload"), ("test", "reload")]).await;
    create_policy(
        &client,
        "reload",
        json!({"namespaceSelector": {"matchLabels": {"test": "reload"}}, "keepalive": {"time": 35, "interval": 5, "probes": 3}}),
    )
    .await;
    // Rotate to a new CA: the apiserver trusts only the new one, so pods get mutated only once the operator
    // serves the new certificate.
    let (new_ca, _, _) = write_serving_cert(&dir);
    let url = format!("https://127.0.0.1:{}/mutate", _op.port);
    register_webhook(&client, "keepalive-reload", &url, Some(&new_ca), "reload").await;
    eventually(
        Duration::from_secs(20),
        "the reloaded certificate to be served",
        || async {
            let pod = create_dry_run(&client, "reload", json!({})).await;
            (sysctls(&pod) == keepalive(35, 5, 3)).then_some(())
        },
    )
    .await;
    assert!(_op.logs().contains("serving certificate reloaded"), "{}", _op.logs());
}

/// Creates a pod with dryRun=All: admission runs (the webhook handles dryRun without side effects), nothing is
/// stored.
async fn create_dry_run(client: &kube::Client, ns: &str, extra: serde_json::Value) -> Pod {
    let mut pod =
        json!({"metadata": {"generateName": "dry-"}, "spec": {"containers": [{"name": "app", "image": "x"}]}});
    for (k, v) in extra.as_object().unwrap() {
        pod[k].as_object_mut().unwrap().extend(v.as_object().unwrap().clone());
    }
    let pod: Pod = serde_json::from_value(pod).unwrap();
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &pod,
        )
        .await
        .unwrap()
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for std::path::PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

#[tokio::test]
async fn offline_apply_makes_the_same_mutation_as_the_webhook() {
    shared_operator();
    let client = control_plane().client().await.unwrap();
    namespace(&client, "agree", &[("scope", "webhook"), ("test", "agree")]).await;
    let spec = json!({"mode": "Fill", "namespaceSelector": {"matchLabels": {"test": "agree"}},
        "keepalive": {"time": 70, "interval": 7, "probes": 4}});
    create_policy(&client, "agree", spec.clone()).await;
    let pod_extra = json!({"metadata": {"labels": {"app": "db"}, "annotations": {"team": "x"}},
        "spec": {"securityContext": {"sysctls": [{"name": "net.ipv4.tcp_keepalive_probes", "value": "9"},
                                                  {"name": "kernel.shm_rmid_forced", "value": "1"}]}}});
    let via_webhook = eventually(Duration::from_secs(10), "the policy to apply", || async {
        let pod = create_dry_run(&client, "agree", pod_extra.clone()).await;
        policy_annotation(&pod).is_some().then_some(pod)
    })
    .await;

    let policy = json!({"apiVersion": "keepalive.dev/v1alpha1", "kind": "KeepalivePolicy",
        "metadata": {"name": "agree"}, "spec": spec});
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "namespace": "agree"}, "spec": {"containers": [{"name": "app", "image": "x"}]}});
    for (k, v) in pod_extra.as_object().unwrap() {
        pod[k].as_object_mut().unwrap().extend(v.as_object().unwrap().clone());
    }
    let ns = json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "agree", "labels": {"scope": "webhook", "test": "agree"}}});
    let dir = control_plane().work_dir();
    std::fs::write(dir.join("agree-policy.yaml"), serde_norway::to_string(&policy).unwrap()).unwrap();
    let resources = format!(
        "{}---\n{}",
        serde_norway::to_string(&ns).unwrap(),
        serde_norway::to_string(&pod).unwrap()
    );
    std::fs::write(dir.join("agree-resources.yaml"), resources).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keepalive-operator"))
        .args(["apply", "-p"])
        .arg(dir.join("agree-policy.yaml"))
        .arg("-r")
        .arg(dir.join("agree-resources.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let offline: Vec<Pod> = serde_norway::Deserializer::from_slice(&out.stdout)
        .filter_map(|d| serde::Deserialize::deserialize(d).ok())
        .filter(|p: &Pod| p.spec.is_some())
        .collect();
    assert_eq!(offline.len(), 1);
    assert_eq!(sysctls(&offline[0]), sysctls(&via_webhook));
    assert_eq!(offline[0].metadata.annotations, via_webhook.metadata.annotations);
}
