//! `keepalive-operator apply`, the real binary: output, report lines, exit codes, stdin.

use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

use serde_json::Value;

fn apply(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keepalive-operator"))
        .arg("apply")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or("").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn docs(yaml: &[u8]) -> Vec<Value> {
    serde_yaml::Deserializer::from_slice(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

const RESOURCES: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: checkout, namespace: payments}
spec:
  selector: {matchLabels: {app: checkout}}
  template:
    metadata: {labels: {app: checkout}}
    spec:
      containers: [{name: app, image: checkout:1}]
      securityContext:
        sysctls: [{name: net.ipv4.tcp_keepalive_time, value: "45"}]
---
apiVersion: v1
kind: Namespace
metadata: {name: payments, labels: {team: payments}}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: report, namespace: payments}
spec:
  schedule: "0 * * * *"
  jobTemplate:
    spec:
      template:
        metadata: {labels: {workload-type: batch}}
        spec: {restartPolicy: Never, containers: [{name: r, image: r:1}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: edge
  labels: {keepalive.dev/lb: aws-nlb}
spec: {containers: [{name: e, image: e:1}]}
---
apiVersion: v1
kind: Service
metadata: {name: checkout, namespace: payments}
spec: {ports: [{port: 80}]}
"#;

#[test]
fn applies_examples_to_pods_and_pod_templates_in_input_order() {
    let out = apply(
        &[
            "-p",
            "examples/aws-nlb.yaml",
            "--policy",
            "examples/namespace-scoped.yaml",
            "-r",
            "-",
        ],
        Some(RESOURCES),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let docs = docs(&out.stdout);
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["Deployment", "Namespace", "CronJob", "Pod", "Service"]);

    // Fill (payments-database-clients): the template's own time stays, the rest is added.
    let template = &docs[0]["spec"]["template"];
    assert_eq!(
        template["metadata"]["annotations"]["keepalive.dev/policy"],
        "payments-database-clients"
    );
    let sysctls: Vec<(&str, &str)> = template["spec"]["securityContext"]["sysctls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["value"].as_str().unwrap()))
        .collect();
    assert_eq!(
        sysctls,
        [
            ("net.ipv4.tcp_keepalive_time", "45"),
            ("net.ipv4.tcp_keepalive_intvl", "10"),
            ("net.ipv4.tcp_keepalive_probes", "6")
        ]
    );
    // Batch pods are excluded by the policy's NotIn requirement.
    assert!(
        docs[2]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            .get("securityContext")
            .is_none()
    );
    // A Pod without namespace is in `default`; aws-nlb selects it by pod label.
    assert_eq!(docs[3]["spec"]["securityContext"]["sysctls"][0]["value"], "300");
    assert_eq!(docs[4], serde_yaml::from_str::<Value>("apiVersion: v1\nkind: Service\nmetadata: {name: checkout, namespace: payments}\nspec: {ports: [{port: 80}]}").unwrap());

    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(
        lines[0].starts_with("Deployment payments/checkout: policy payments-database-clients: set"),
        "{stderr}"
    );
    assert_eq!(
        lines[1],
        "CronJob payments/report: unchanged: no policy selects the pod"
    );
    assert!(
        lines[2].starts_with("Pod default/edge: policy aws-nlb: set net.ipv4.tcp_keepalive_time=300"),
        "{stderr}"
    );
}

#[test]
fn invalid_policy_prints_nothing_and_exits_1() {
    let bad = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/aws-nlb.yaml"))
        .unwrap()
        .replace("time: 300", "time: 400");
    let out = apply(&["-p", "-", "-r", "examples/gcp.yaml"], Some(&bad));
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("-: document 1: KeepalivePolicy \"aws-nlb\" is invalid"),
        "{stderr}"
    );
    assert!(
        stderr.contains("spec.keepalive.time must be less than spec.idleTimeoutSeconds"),
        "{stderr}"
    );
}

#[test]
fn unreadable_or_unparsable_input_names_the_file() {
    let out = apply(&["-p", "examples/aws-nlb.yaml", "-r", "does/not/exist.yaml"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does/not/exist.yaml"));
    let out = apply(
        &["-p", "examples/aws-nlb.yaml", "-r", "-"],
        Some("kind: Pod\n---\n{unclosed: [\n"),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("-: document 2:"));
}

#[test]
fn old_cluster_gets_nothing_unless_kubelets_allow_it() {
    let pod =
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {keepalive.dev/lb: aws-nlb}}\nspec: {containers: []}\n";
    let out = apply(
        &["-p", "examples/aws-nlb.yaml", "-r", "-", "--kubernetes-version", "1.28"],
        Some(pod),
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipped (ClusterTooOld)"));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("sysctls"));
    let out = apply(
        &[
            "-p",
            "examples/aws-nlb.yaml",
            "-r",
            "-",
            "--kubernetes-version",
            "1.28",
            "--kubelet-allows-keepalive-sysctls",
        ],
        Some(pod),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("net.ipv4.tcp_keepalive_time"));
}
