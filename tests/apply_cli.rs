//! `keepalive-operator apply`, the real binary: output, report lines, exit codes, stdin, what it refuses to read,
//! and YAML merge keys resolved exactly as the real kubectl resolves them.

use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

use serde_json::Value;

fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keepalive-operator"));
    cmd.arg("apply")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("KEEPALIVE_APPLY_MAX_INPUT_BYTES")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn apply(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = command(args).stdin(Stdio::piped()).spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or("").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn docs(yaml: &[u8]) -> Vec<Value> {
    serde_norway::Deserializer::from_slice(yaml)
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
    assert_eq!(docs[4], serde_norway::from_str::<Value>("apiVersion: v1\nkind: Service\nmetadata: {name: checkout, namespace: payments}\nspec: {ports: [{port: 80}]}").unwrap());

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

/// A failed run: exit code 1, nothing on stdout; its stderr.
fn failure(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty(), "{stderr}");
    stderr
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("apply-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn fifo_directory_and_device_are_refused_naming_the_path() {
    let dir = temp_dir("special");
    let fifo = dir.join("resources.fifo");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    let fifo = fifo.to_str().unwrap();
    // No writer ever opens the FIFO: the command must not wait for one.
    let started = std::time::Instant::now();
    let stderr = failure(&apply(&["-p", "examples/aws-nlb.yaml", "-r", fifo], None));
    assert!(
        stderr.contains(&format!("{fifo}: not a regular file but a FIFO")),
        "{stderr}"
    );
    eprintln!("FIFO refused in {:?}", started.elapsed());

    let stderr = failure(&apply(&["-p", "examples/aws-nlb.yaml", "-r", "examples"], None));
    assert!(
        stderr.contains("examples: not a regular file but a directory"),
        "{stderr}"
    );
    let stderr = failure(&apply(&["-p", "/dev/zero", "-r", "examples/gcp.yaml"], None));
    assert!(
        stderr.contains("/dev/zero: not a regular file but a character device"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn endless_stdin_fails_at_the_size_cap() {
    // stdin is /dev/zero: the default cap (16 MiB) is read, one byte more, and the command stops.
    let out = command(&["-p", "examples/aws-nlb.yaml", "-r", "-"])
        .stdin(std::fs::File::open("/dev/zero").unwrap())
        .output()
        .unwrap();
    let stderr = failure(&out);
    assert!(
        stderr.contains("-: larger than 16777216 bytes (raise the limit with --max-input-bytes)"),
        "{stderr}"
    );
    // With a lower cap; also as a policy input.
    let out = command(&["-p", "-", "-r", "examples/gcp.yaml", "--max-input-bytes", "4096"])
        .stdin(std::fs::File::open("/dev/zero").unwrap())
        .output()
        .unwrap();
    assert!(
        failure(&out).contains("-: larger than 4096 bytes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn file_over_the_cap_is_refused_and_one_at_the_cap_is_read() {
    let dir = temp_dir("cap");
    // Larger than the policy file, which the same limit applies to.
    let pod = format!(
        "# {}\napiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec: {{containers: []}}\n",
        "padding ".repeat(1000)
    );
    let file = dir.join("pod.yaml");
    std::fs::write(&file, &pod).unwrap();
    let file = file.to_str().unwrap();
    let cap = pod.len().to_string();
    let out = apply(
        &["-p", "examples/gcp.yaml", "-r", file, "--max-input-bytes", &cap],
        None,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let smaller = (pod.len() - 1).to_string();
    let stderr = failure(&apply(
        &["-p", "examples/gcp.yaml", "-r", file, "--max-input-bytes", &smaller],
        None,
    ));
    assert!(
        stderr.contains(&format!("{file}: larger than {smaller} bytes")),
        "{stderr}"
    );
    // The environment variable sets the same limit.
    let out = command(&["-p", "examples/gcp.yaml", "-r", file])
        .env("KEEPALIVE_APPLY_MAX_INPUT_BYTES", &smaller)
        .output()
        .unwrap();
    assert!(failure(&out).contains("larger than"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Resources written with anchors and merge keys: the template's labels (which select the pod for aws-nlb)
/// come only through `<<`, keys after `<<` override, keys before it are overridden (as kubectl does), and a
/// sequence of merged mappings lets the earlier win.
const MERGED: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: edge
  namespace: default
  labels: &labels
    app: edge
    keepalive.dev/lb: aws-nlb
spec:
  selector:
    matchLabels: {app: edge}
  template:
    metadata:
      labels:
        <<: *labels
        tier: front
    spec:
      containers:
        - &container
          name: app
          image: edge:1
          env: [{name: MODE, value: fast}]
        - <<: *container
          name: sidecar
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  labels: {app: edge}
data:
  mode: slow
  <<: [{mode: fast, level: "1"}, {level: "2", zone: a}]
  zone: b
"#;

/// The resources as the real kubectl reads them: `kubectl label --local -o json` converts offline; the label it
/// adds is removed again.
fn kubectl_view(file: &std::path::Path) -> Vec<Value> {
    let kubectl = xtask::tools::bin_dir().unwrap().join("kubectl");
    let out = Command::new(kubectl)
        .args(["label", "--local", "-o", "json", "--kubeconfig=/dev/null", "-f"])
        .arg(file)
        .arg("offline-check=1")
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<Value>()
        .map(|doc| {
            let mut doc = doc.unwrap();
            doc["metadata"]["labels"]
                .as_object_mut()
                .unwrap()
                .remove("offline-check");
            doc
        })
        .collect()
}

#[test]
fn merge_keys_resolve_as_kubectl_resolves_them() {
    let dir = temp_dir("merge");
    let file = dir.join("merged.yaml");
    std::fs::write(&file, MERGED).unwrap();
    let kubectl = kubectl_view(&file);

    let out = apply(&["-p", "examples/aws-nlb.yaml", "-r", file.to_str().unwrap()], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.starts_with("Deployment default/edge: policy aws-nlb: set"),
        "the merged labels select the pod:\n{stderr}"
    );
    let mut offline = docs(&out.stdout);
    assert_eq!(offline.len(), 2);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("<<"));

    // Beyond the mutation, every value is the one kubectl sends.
    let template = offline[0]["spec"]["template"].as_object_mut().unwrap();
    let annotations = template["metadata"].as_object_mut().unwrap().remove("annotations");
    assert_eq!(annotations.unwrap()["keepalive.dev/policy"], "aws-nlb");
    let security = template["spec"].as_object_mut().unwrap().remove("securityContext");
    assert_eq!(security.unwrap()["sysctls"][0]["value"], "300");
    assert_eq!(offline, kubectl);
    assert_eq!(
        offline[0]["spec"]["template"]["metadata"]["labels"],
        serde_json::json!({"app": "edge", "keepalive.dev/lb": "aws-nlb", "tier": "front"})
    );
    assert_eq!(
        offline[0]["spec"]["template"]["spec"]["containers"][1]["image"],
        "edge:1"
    );
    assert_eq!(
        offline[1]["data"],
        serde_json::json!({"mode": "fast", "level": "1", "zone": "b"})
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
