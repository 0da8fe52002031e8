//! Shared fixtures of the integration tests: the control plane with the CRDs, the operator as a real process,
//! webhook registrations, namespaces and pods.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::OnceLock,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    core::v1::{Namespace, Pod},
};
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};
use serde_json::json;
use xtask::{ControlPlane, cluster};

/// The shared control plane with the committed CRDs installed.
pub fn control_plane() -> &'static ControlPlane {
    static READY: OnceLock<()> = OnceLock::new();
    let cp = xtask::shared();
    READY.get_or_init(|| cp.install_crds().expect("installing the committed CRDs"));
    cp
}

/// A CA and a serving certificate for 127.0.0.1, as PEM files in `dir`: (ca.crt, tls.crt, tls.key).
pub fn write_serving_cert(dir: &Path) -> (String, PathBuf, PathBuf) {
    let pki = keepalive_operator::runtime::certs::issue(&["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert, &pki.cert).unwrap();
    std::fs::write(&key, &pki.key).unwrap();
    (pki.ca, cert, key)
}

/// `keepalive-operator` (any subcommand) as a real process on this host, logging to a file. Killed on drop.
pub struct HostProcess {
    child: Option<Child>,
    pub log: PathBuf,
}

impl HostProcess {
    /// Starts `keepalive-operator <args>` with `kubeconfig` (its identity), as a process outside any pod.
    pub fn spawn(cp: &ControlPlane, name: &str, args: &[String], kubeconfig: &Path) -> HostProcess {
        let log = cp.work_dir().join(format!("{name}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keepalive-operator"));
        cmd.args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", format!("{name}-on-host"))
            .env("RUST_LOG", "info,keepalive_operator=debug,kube=info")
            .env_remove("POD_NAMESPACE")
            .env_remove("KUBERNETES_SERVICE_HOST");
        HostProcess {
            child: Some(cluster::spawn_logged(cmd, &log).unwrap()),
            log,
        }
    }

    /// Waits until `/readyz` on `admin_port` answers ok; panics with the log if the process exits or after 60 s.
    pub fn wait_ready(&mut self, admin_port: u16) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((200, body)) = cluster::http_get(admin_port, "/readyz")
                && body.starts_with("ok")
            {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("keepalive-operator exited with {status}:\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "keepalive-operator not ready after 60 s:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no clean shutdown, no lease release.
    pub fn kill_hard(&mut self) {
        if let Some(child) = self.child.take() {
            cluster::kill_now(child);
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            cluster::kill(child);
        }
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `keepalive-operator controller` as a real process against the control plane, with admin credentials.
pub struct Operator {
    process: HostProcess,
    pub port: u16,
    pub admin_port: u16,
}

impl Operator {
    /// Starts the operator with `args` (besides the listen addresses) and waits until /readyz answers ok.
    pub fn start(cp: &ControlPlane, name: &str, args: &[&str]) -> Operator {
        Operator::start_with_kubeconfig(cp, name, args, cp.kubeconfig())
    }

    /// [`Operator::start`] with another kubeconfig (another identity, or another way to the apiserver).
    pub fn start_with_kubeconfig(cp: &ControlPlane, name: &str, args: &[&str], kubeconfig: &Path) -> Operator {
        Operator::start_at(cp, name, args, kubeconfig, cluster::free_port().unwrap())
    }

    /// [`Operator::start_with_kubeconfig`] with the webhook on a port chosen by the caller (a webhook
    /// configuration the operator registers itself must name it before it starts).
    pub fn start_at(cp: &ControlPlane, name: &str, args: &[&str], kubeconfig: &Path, port: u16) -> Operator {
        let admin_port = cluster::free_port().unwrap();
        let args: Vec<String> = [
            "controller".to_string(),
            format!("--listen=127.0.0.1:{port}"),
            format!("--admin-listen=127.0.0.1:{admin_port}"),
        ]
        .into_iter()
        .chain(args.iter().map(|a| a.to_string()))
        .collect();
        // The webhook unless a test asks otherwise: an operator in admissionPolicy mode (auto on 1.36+) would
        // install a MutatingAdmissionPolicy that mutates the pods of every test sharing the apiserver.
        let mut args = args;
        if !args.iter().any(|a| a.starts_with("--injection-mode")) {
            args.push("--injection-mode=webhook".into());
        }
        let mut process = HostProcess::spawn(cp, &format!("operator-{name}"), &args, kubeconfig);
        process.wait_ready(admin_port);
        Operator {
            process,
            port,
            admin_port,
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/mutate", self.port)
    }

    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// `/metrics` of the admin port.
    pub fn metrics(&self) -> String {
        cluster::http_get(self.admin_port, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// SIGKILL: no clean shutdown, no lease release.
    pub fn kill_hard(&mut self) {
        self.process.kill_hard();
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn running(&mut self) -> bool {
        self.process.running()
    }

    pub fn stop(&mut self) {
        self.process.stop();
    }
}

/// Registers a mutating webhook for pod CREATE at `url`, limited to namespaces labelled `scope=<value>`, with
/// the defaults the chart uses (failurePolicy Ignore, short timeout, reinvocation IfNeeded).
pub async fn register_webhook(client: &Client, name: &str, url: &str, ca_pem: Option<&str>, scope: &str) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let mut client_config = json!({ "url": url });
    if let Some(ca) = ca_pem {
        client_config["caBundle"] = json!(k8s_openapi::ByteString(ca.as_bytes().to_vec()));
    }
    let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": name },
        "webhooks": [{
            "name": "pods.keepalive.dev",
            "clientConfig": client_config,
            "rules": [{ "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"] }],
            "failurePolicy": "Ignore",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 5,
            "reinvocationPolicy": "IfNeeded",
            "namespaceSelector": { "matchLabels": { "scope": scope } },
            "objectSelector": { "matchExpressions": [{ "key": "keepalive.dev/ignore", "operator": "NotIn", "values": ["true"] }] },
        }],
    }))
    .unwrap();
    let _ = api.delete(name, &DeleteParams::default()).await;
    api.create(&PostParams::default(), &config).await.unwrap();
}

/// Creates a namespace unless it exists (tests running at once may both create it).
pub async fn ensure_namespace(client: &Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating namespace {name}: {e}"),
    }
}

/// Creates a namespace with labels.
pub async fn namespace(client: &Client, name: &str, labels: &[(&str, &str)]) {
    let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

/// Creates a pod from a JSON spec fragment merged into a minimal pod; returns what the apiserver stored.
pub async fn create_pod(client: &Client, ns: &str, name: &str, extra: serde_json::Value) -> kube::Result<Pod> {
    let mut pod = json!({
        "metadata": { "name": name },
        "spec": { "containers": [{ "name": "app", "image": "registry.invalid/app:1" }] },
    });
    merge(&mut pod, extra);
    let pod: Pod = serde_json::from_value(pod).unwrap();
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
}

fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

/// The pod's sysctls as (name, value) pairs.
pub fn sysctls(pod: &Pod) -> Vec<(String, String)> {
    pod.spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref())
        .and_then(|sc| sc.sysctls.as_ref())
        .map(|l| l.iter().map(|s| (s.name.clone(), s.value.clone())).collect())
        .unwrap_or_default()
}

pub fn policy_annotation(pod: &Pod) -> Option<String> {
    pod.metadata.annotations.as_ref()?.get("keepalive.dev/policy").cloned()
}

pub fn keepalive(time: i32, intvl: i32, probes: i32) -> Vec<(String, String)> {
    vec![
        ("net.ipv4.tcp_keepalive_time".into(), time.to_string()),
        ("net.ipv4.tcp_keepalive_intvl".into(), intvl.to_string()),
        ("net.ipv4.tcp_keepalive_probes".into(), probes.to_string()),
    ]
}

/// Creates a KeepalivePolicy from a spec.
pub async fn create_policy(client: &Client, name: &str, spec: serde_json::Value) {
    let policy: keepalive_operator::api::KeepalivePolicy = serde_json::from_value(json!({
        "apiVersion": "keepalive.dev/v1alpha1", "kind": "KeepalivePolicy", "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap();
    Api::<keepalive_operator::api::KeepalivePolicy>::all(client.clone())
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
}

/// Polls `check` every 100 ms until it returns Some, or panics with `what` after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The resident memory of a process, in MiB (VmRSS).
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Whether `a` (not `b`) leads, once exactly one of the two says so on its metrics.
pub async fn a_leads(a: &Operator, b: &Operator) -> bool {
    let is_leader = |op: &Operator| op.metrics().lines().any(|l| l == "keepalive_leader 1");
    eventually(Duration::from_secs(20), "exactly one leader", || async {
        match (is_leader(a), is_leader(b)) {
            (true, false) => Some(true),
            (false, true) => Some(false),
            _ => None,
        }
    })
    .await
}

/// A namespace `name` labelled `test=<name>` and a policy `name` selecting it with keepalive `time/intvl/probes`.
pub async fn namespace_with_policy(client: &Client, name: &str, (time, intvl, probes): (i32, i32, i32)) {
    namespace(client, name, &[("test", name)]).await;
    create_policy(
        client,
        name,
        json!({"namespaceSelector": {"matchLabels": {"test": name}},
               "keepalive": {"time": time, "interval": intvl, "probes": probes}}),
    )
    .await;
}

/// `kubectl apply --server-side` of one object given as JSON; the object as the apiserver stored it.
pub fn kubectl_apply(cp: &ControlPlane, object: &serde_json::Value) -> serde_json::Value {
    let name = format!(
        "apply-{}-{}-{}",
        object["kind"].as_str().unwrap_or("object"),
        object["metadata"]["namespace"].as_str().unwrap_or("cluster"),
        object["metadata"]["name"].as_str().unwrap_or("unnamed"),
    );
    let out = cp
        .apply_json(&name, &object.to_string())
        .unwrap_or_else(|e| panic!("applying {object}: {e:#}"));
    serde_json::from_str(&out).unwrap()
}

/// A Node object (no kubelet behind it: it only exists); its UID.
pub fn node_object(cp: &ControlPlane, name: &str) -> String {
    let node = kubectl_apply(
        cp,
        &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}),
    );
    node["metadata"]["uid"].as_str().unwrap().to_string()
}

/// A token of the ServiceAccount bound to a pod on `node` (see [`ControlPlane::pod_bound_token`]).
pub fn pod_bound_token(cp: &ControlPlane, namespace: &str, service_account: &str, pod: &str, node: &str) -> String {
    cp.pod_bound_token(namespace, service_account, pod, node)
        .unwrap_or_else(|e| panic!("a token bound to pod {namespace}/{pod} on {node}: {e:#}"))
}

/// Who the apiserver says the bearer of `kubeconfig` is (SelfSubjectReview, `kubectl auth whoami`): its user info.
pub fn whoami(cp: &ControlPlane, kubeconfig: &Path) -> serde_json::Value {
    let out = cp
        .kubectl()
        .env("KUBECONFIG", kubeconfig)
        .args(["auth", "whoami", "-o", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl auth whoami: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let review: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    review["status"]["userInfo"].clone()
}

/// A client of the control plane authenticating with the kubeconfig at `path`.
pub async fn client_from_kubeconfig(path: &Path) -> Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// `kubectl auth can-i <args> --as=system:serviceaccount:<namespace>:<service_account>`.
pub fn can_i(cp: &ControlPlane, namespace: &str, service_account: &str, args: &[&str]) -> bool {
    let out = cp
        .kubectl()
        .args(["auth", "can-i"])
        .args(args)
        .arg(format!("--as=system:serviceaccount:{namespace}:{service_account}"))
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

/// Waits until the policy's status satisfies `check`; returns it.
pub async fn status_where(
    client: &Client,
    policy: &str,
    what: &str,
    check: impl Fn(&keepalive_operator::api::KeepalivePolicyStatus) -> bool,
) -> keepalive_operator::api::KeepalivePolicyStatus {
    let api: Api<keepalive_operator::api::KeepalivePolicy> = Api::all(client.clone());
    eventually(Duration::from_secs(30), what, || async {
        let p = api.get_opt(policy).await.ok()??;
        p.status.filter(|s| check(s))
    })
    .await
}

pub fn counts(s: &keepalive_operator::api::KeepalivePolicyStatus) -> (i32, i32) {
    (s.matched_pods.unwrap_or(-1), s.conformant_pods.unwrap_or(-1))
}

/// `keepalive-operator agent` for `node` as a real process, scanning every second. Killed on drop.
pub struct Agent {
    _process: HostProcess,
    pub admin_port: u16,
    // A process in the host's network namespace stands in for the node's init.
    host_process: std::process::Child,
}

impl Agent {
    pub fn start(cp: &xtask::ControlPlane, node: &str) -> Agent {
        Self::start_with(cp, node, &[])
    }

    /// The same with more arguments.
    pub fn start_with(cp: &xtask::ControlPlane, node: &str, extra: &[&str]) -> Agent {
        let host_process = std::process::Command::new("sleep")
            .arg("600")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let admin_port = xtask::cluster::free_port().unwrap();
        let mut args = vec![
            "agent".to_string(),
            "--scan-interval-seconds=1".to_string(),
            format!("--node-name={node}"),
            format!("--admin-listen=127.0.0.1:{admin_port}"),
            format!("--node-netns-pid={}", host_process.id()),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        Agent {
            _process: HostProcess::spawn(cp, &format!("agent-{node}"), &args, cp.kubeconfig()),
            admin_port,
            host_process,
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.host_process.kill();
        let _ = self.host_process.wait();
    }
}
