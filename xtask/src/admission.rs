//! `cargo xtask bench-admission`: what the admission chain adds to each pod create, through one real apiserver,
//! for each way of injecting the keepalive sysctls, measured interleaved in one run (issue 17, item 2).
//!
//! One kube-apiserver (the newest of `hack/versions.env`) and no kubelet: pods stay Pending, as with KWOK. Each
//! configuration gets a namespace of its own, labelled `bench.keepalive.dev/config=<name>`, and only its mutator
//! matches that label. Every configuration runs from the start to the end of the benchmark, so each window of
//! measurement sees the same background (watches, leases, status writes) whichever configuration it measures.
//!
//! Per level of concurrency, per round, per configuration (rounds rotate the order): N creators (tokio tasks) share
//! one kube `Client` and create a fixed number of Deployment-like pods (two containers, labels, resources, probes).
//! Measured: each create's latency as the client sees it, pods/s, and — through `/proc` — the CPU seconds
//! (utime + stime) of the apiserver, etcd and the configuration's own processes, and the peak RSS of those
//! processes (VmHWM after resetting it through `clear_refs`, and VmRSS sampled every 50 ms). Every created pod is
//! checked: the three sysctls with the configuration's values, or none for the baseline; a configuration that
//! mutates nothing, or only some pods, fails the run. Pods are deleted (deletecollection) after each window, so
//! every window starts from an empty namespace and the operators' pod caches hold only that window's pods.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    core::v1::{Namespace, Pod},
};
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams},
    client::ConfigExt,
};
use serde_json::{Value, json};

use crate::{ControlPlane, cluster, tools};

/// The namespace label that scopes each configuration's mutator to its own namespace.
pub const LABEL: &str = "bench.keepalive.dev/config";
/// The keepalive values every mutating configuration injects: time, interval, probes.
pub const VALUES: (i32, i32, i32) = (20, 5, 3);
const SYSCTLS: [&str; 3] = [
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];
/// The operators' namespace (their certificate Secrets and Leases).
const SYSTEM_NAMESPACE: &str = "keepalive-system";
/// The configurations built in, in the order of the report.
const BUILT_IN: [&str; 4] = ["baseline", "webhook", "admission-policy", "hand-map"];
/// Bound on one pod create (retries of 429 included).
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on waiting for a configuration to mutate a dry-run pod, and for a namespace to empty.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Quiet time after each window's pods are deleted, before the next window.
const SETTLE: Duration = Duration::from_secs(2);

pub const USAGE: &str = "bench-admission [--creators 100,200] [--pods N] [--rounds R] [--only NAME,...] [--http1] \
                         [--out FILE] [--peers]";

/// Command-line options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Levels of concurrency: each is a whole benchmark of `rounds` rounds.
    pub creators: Vec<usize>,
    /// Pods per configuration per round.
    pub pods: usize,
    pub rounds: usize,
    /// Configurations to run (`baseline` is always run: every delta is against it).
    pub only: Option<Vec<String>>,
    /// kube's own HTTP/1.1 client stack (a pool: one connection per concurrent creator) instead of one HTTP/2
    /// connection.
    pub http1: bool,
    /// The markdown report; default `<target dir>/bench-admission.md`.
    pub out: Option<PathBuf>,
    /// Kyverno and Gatekeeper too (xtask/src/peers.rs).
    pub peers: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            creators: vec![100, 200],
            pods: 1000,
            rounds: 3,
            only: None,
            http1: false,
            out: None,
            peers: false,
        }
    }
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options::default();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f, Some(v.to_string())),
                None => (arg.as_str(), None),
            };
            let mut value = || -> Result<String> {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .with_context(|| format!("{flag} needs a value"))
            };
            match flag {
                "--creators" => {
                    o.creators = value()?
                        .split(',')
                        .map(|n| {
                            n.trim()
                                .parse()
                                .with_context(|| format!("--creators: not a number: {n}"))
                        })
                        .collect::<Result<_>>()?
                }
                "--pods" => o.pods = value()?.parse().context("--pods: not a number")?,
                "--rounds" => o.rounds = value()?.parse().context("--rounds: not a number")?,
                "--only" => o.only = Some(value()?.split(',').map(|s| s.trim().to_string()).collect()),
                "--out" => o.out = Some(PathBuf::from(value()?)),
                "--http1" => o.http1 = true,
                "--peers" => o.peers = true,
                other => bail!("unknown argument {other}; usage: cargo xtask {USAGE}"),
            }
        }
        if o.creators.is_empty() || o.creators.contains(&0) || o.pods == 0 || o.rounds == 0 {
            bail!("--creators, --pods and --rounds must be positive");
        }
        Ok(o)
    }
}

// --- configurations ------------------------------------------------------------------------------------------

/// What runs for one configuration besides the apiserver: processes whose RSS and CPU are its cost.
/// The baseline and the MutatingAdmissionPolicies have none (their cost is the apiserver's CPU).
pub trait Admission {
    /// The processes to measure, while they run.
    fn pids(&self) -> Vec<u32>;
    /// Their log, shown when a check fails.
    fn log(&self) -> Option<PathBuf>;
    /// Stops them.
    fn stop(self: Box<Self>) -> Result<()>;
}

/// A configuration whose work is all inside the apiserver (none, or a MutatingAdmissionPolicy).
struct InApiserver;

impl Admission for InApiserver {
    fn pids(&self) -> Vec<u32> {
        Vec::new()
    }
    fn log(&self) -> Option<PathBuf> {
        None
    }
    fn stop(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// `keepalive-operator controller` (release build) on this host; killed on drop.
struct OperatorProcess {
    child: Option<Child>,
    log: PathBuf,
}

impl Admission for OperatorProcess {
    fn pids(&self) -> Vec<u32> {
        self.child.iter().map(Child::id).collect()
    }
    fn log(&self) -> Option<PathBuf> {
        Some(self.log.clone())
    }
    fn stop(mut self: Box<Self>) -> Result<()> {
        if let Some(child) = self.child.take() {
            cluster::kill(child);
        }
        Ok(())
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            cluster::kill(child);
        }
    }
}

/// One configuration, running.
struct Configuration {
    name: String,
    namespace: String,
    /// The values its pods must carry; `None`: no keepalive sysctl at all (the baseline).
    expect: Option<(i32, i32, i32)>,
    admission: Box<dyn Admission>,
}

/// The configurations of this run, in the order of the report.
fn configuration_names(options: &Options) -> Result<Vec<String>> {
    let mut all: Vec<String> = BUILT_IN.iter().map(|s| s.to_string()).collect();
    if options.peers {
        all.extend(peer_names()?);
    }
    let Some(only) = &options.only else {
        return Ok(all);
    };
    if let Some(unknown) = only.iter().find(|n| !all.contains(n)) {
        bail!(
            "--only: unknown configuration {unknown} (this run has {}{})",
            all.join(", "),
            if options.peers {
                ""
            } else {
                "; kyverno and gatekeeper need --peers"
            }
        );
    }
    Ok(all
        .into_iter()
        .filter(|n| n == "baseline" || only.contains(n))
        .collect())
}

/// The peers' configuration names (Kyverno, Gatekeeper): `kyverno` and `gatekeeper` are what the report's ratios
/// and targets look for.
fn peer_names() -> Result<Vec<String>> {
    Ok(crate::peers::Peer::ALL.iter().map(|p| p.name().to_string()).collect())
}

/// Starts a peer configuration (built first, cached after the first run), or `None` when `name` is no peer.
fn start_peer(cp: &ControlPlane, name: &str) -> Result<Option<Box<dyn Admission>>> {
    let Some(peer) = crate::peers::Peer::ALL.iter().copied().find(|p| p.name() == name) else {
        return Ok(None);
    };
    progress(&format!(
        "{name}: building {} {} (cached after the first run)",
        peer.name(),
        peer.version()
    ));
    peer.build()?;
    progress(&format!(
        "{name}: starting; webhook scoped to namespaces labelled {LABEL}={name}"
    ));
    Ok(Some(Box::new(peer.start(cp, (LABEL, name), VALUES)?)))
}

impl Admission for crate::peers::RunningPeer {
    fn pids(&self) -> Vec<u32> {
        crate::peers::RunningPeer::pids(self)
    }
    fn log(&self) -> Option<PathBuf> {
        Some(crate::peers::RunningPeer::log(self))
    }
    fn stop(self: Box<Self>) -> Result<()> {
        crate::peers::RunningPeer::stop(*self)
    }
}

/// What every configuration's start needs.
struct Setup<'a> {
    cp: &'a ControlPlane,
    rt: &'a tokio::runtime::Runtime,
    client: Client,
    operator: PathBuf,
}

/// Starts configuration `name` in its namespace and waits until a dry-run pod there gets exactly what the
/// configuration promises. Runs outside the async runtime (a peer's start may block or run its own).
fn start_configuration(setup: &Setup, name: &str) -> Result<Configuration> {
    let namespace = format!("bench-{name}");
    let client = setup.client.clone();
    setup.rt.block_on(create_namespace(&client, &namespace, name))?;
    let (admission, expect): (Box<dyn Admission>, _) = match name {
        "baseline" => (Box::new(InApiserver), None),
        "webhook" => (start_webhook(setup, name)?, Some(VALUES)),
        "admission-policy" => (start_admission_policy(setup, name)?, Some(VALUES)),
        "hand-map" => {
            setup.rt.block_on(hand_map(&client, name))?;
            (Box::new(InApiserver), Some(VALUES))
        }
        other => match start_peer(setup.cp, other)? {
            Some(peer) => (peer, Some(VALUES)),
            None => bail!("unknown configuration {other}"),
        },
    };
    let configuration = Configuration {
        name: name.to_string(),
        namespace,
        expect,
        admission,
    };
    let ready = setup.rt.block_on(wait_admitted(&client, &configuration));
    if let Err(e) = ready {
        let log = configuration.admission.log();
        let tail = log.as_deref().map(log_tail).unwrap_or_default();
        return Err(e.context(format!("{name} is not ready{tail}")));
    }
    progress(&format!(
        "{name}: ready (a dry-run pod in {} gets what it should)",
        configuration.namespace
    ));
    Ok(configuration)
}

async fn create_namespace(client: &Client, name: &str, config: &str) -> Result<()> {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name, "labels": {LABEL: config}}}))?;
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating namespace {name}")),
    }
}

/// A KeepalivePolicy `bench-<config>` with [`VALUES`] for the namespace of `config`.
async fn keepalive_policy(client: &Client, config: &str) -> Result<()> {
    let gvk = GroupVersionKind::gvk("keepalive.dev", "v1alpha1", "KeepalivePolicy");
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::from_gvk(&gvk));
    let (time, interval, probes) = VALUES;
    let policy: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "keepalive.dev/v1alpha1", "kind": "KeepalivePolicy",
        "metadata": {"name": format!("bench-{config}")},
        "spec": {"namespaceSelector": {"matchLabels": {LABEL: config}},
                 "keepalive": {"time": time, "interval": interval, "probes": probes}},
    }))?;
    api.create(&PostParams::default(), &policy)
        .await
        .with_context(|| format!("creating the KeepalivePolicy bench-{config}"))?;
    Ok(())
}

/// The operator's webhook: registered by URL for the configuration's namespace (no caBundle: the operator's
/// self-managed CA fills it in), then the operator in `--injection-mode=webhook`.
fn start_webhook(setup: &Setup, config: &str) -> Result<Box<dyn Admission>> {
    let port = cluster::free_port()?;
    let name = format!("bench-{config}");
    setup.rt.block_on(async {
        keepalive_policy(&setup.client, config).await?;
        let webhook: MutatingWebhookConfiguration = serde_json::from_value(json!({
            "metadata": {"name": name},
            "webhooks": [{
                "name": "pods.keepalive.dev",
                "clientConfig": {"url": format!("https://127.0.0.1:{port}/mutate")},
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
                "failurePolicy": "Ignore",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 5,
                "reinvocationPolicy": "IfNeeded",
                "namespaceSelector": {"matchLabels": {LABEL: config}},
                "objectSelector": {"matchExpressions": [{"key": "keepalive.dev/ignore", "operator": "NotIn", "values": ["true"]}]},
            }],
        }))?;
        Api::<MutatingWebhookConfiguration>::all(setup.client.clone())
            .create(&PostParams::default(), &webhook)
            .await
            .context("registering the webhook")?;
        anyhow::Ok(())
    })?;
    let operator = spawn_operator(
        setup,
        config,
        port,
        &[
            "--injection-mode=webhook".into(),
            format!("--webhook-configuration={name}"),
            // Its own (unused) names, so that it never removes the other operator's admission policy.
            format!("--admission-policy-name={name}-unused"),
        ],
    )?;
    progress(&format!(
        "{config}: waiting for the operator to fill in the webhook's caBundle"
    ));
    let api: Api<MutatingWebhookConfiguration> = Api::all(setup.client.clone());
    setup
        .rt
        .block_on(poll(READY_TIMEOUT, "the webhook's caBundle", || async {
            let config = api.get_opt(&name).await.ok()??;
            let bundle = config.webhooks?.first()?.client_config.ca_bundle.clone()?;
            (!bundle.0.is_empty()).then_some(())
        }))?;
    Ok(operator)
}

/// The operator in `--injection-mode=admissionPolicy`: it compiles the KeepalivePolicies into one
/// MutatingAdmissionPolicy whose binding selects the configuration's namespace. It is off the request path, and
/// measured all the same (its watches and writes are what this mode costs besides the apiserver's CEL).
fn start_admission_policy(setup: &Setup, config: &str) -> Result<Box<dyn Admission>> {
    setup.rt.block_on(keepalive_policy(&setup.client, config))?;
    let name = format!("bench-{config}");
    spawn_operator(
        setup,
        config,
        cluster::free_port()?,
        &[
            "--injection-mode=admissionPolicy".into(),
            format!("--admission-policy-name={name}"),
            format!(
                "--admission-policy-namespace-selector={}",
                json!({"matchLabels": {LABEL: config}})
            ),
            format!("--webhook-configuration={name}-unused"),
        ],
    )
}

/// `keepalive-operator controller` with admin credentials and self-managed certificates for 127.0.0.1, its own
/// lease and Secret; waits until `/readyz` answers.
fn spawn_operator(setup: &Setup, config: &str, port: u16, extra: &[String]) -> Result<Box<dyn Admission>> {
    let admin = cluster::free_port()?;
    let name = format!("bench-{config}");
    let mut args = vec![
        "controller".to_string(),
        format!("--listen=127.0.0.1:{port}"),
        format!("--admin-listen=127.0.0.1:{admin}"),
        format!("--namespace={SYSTEM_NAMESPACE}"),
        format!("--lease-name={name}"),
        format!("--tls-secret={name}-tls"),
        "--tls-extra-sans=127.0.0.1".into(),
        "--drain-seconds=0".into(),
    ];
    args.extend(extra.iter().cloned());
    let log = setup.cp.work_dir().join(format!("operator-{config}.log"));
    let mut cmd = Command::new(&setup.operator);
    cmd.args(&args)
        .env("KUBECONFIG", setup.cp.kubeconfig())
        .env("POD_NAME", format!("{name}-on-host"))
        .env("RUST_LOG", "info")
        .env_remove("POD_NAMESPACE")
        .env_remove("KUBERNETES_SERVICE_HOST");
    progress(&format!("{config}: keepalive-operator {}", args.join(" ")));
    let mut process = OperatorProcess {
        child: Some(cluster::spawn_logged(cmd, &log)?),
        log,
    };
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if cluster::http_get(admin, "/readyz").is_some_and(|(code, body)| code == 200 && body.starts_with("ok")) {
            return Ok(Box::new(process));
        }
        if let Some(status) = process.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            bail!(
                "keepalive-operator ({config}) exited with {status}{}",
                log_tail(&process.log)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "keepalive-operator ({config}) not ready after {READY_TIMEOUT:?}{}",
                log_tail(&process.log)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A MutatingAdmissionPolicy as a user would write it for one fixed set of values: JSONPatch (ApplyConfiguration
/// may not set `sysctls`, an atomic list), the pod's other sysctls kept, the three replaced, and the same
/// annotation the operator writes; bound to the configuration's namespace.
async fn hand_map(client: &Client, config: &str) -> Result<()> {
    let name = format!("bench-{config}");
    let (time, interval, probes) = VALUES;
    let keys = SYSCTLS.map(|s| format!("\"{s}\"")).join(", ");
    let wanted = [time, interval, probes]
        .iter()
        .zip(SYSCTLS)
        .map(|(v, s)| format!("{{\"name\": \"{s}\", \"value\": \"{v}\"}}"))
        .collect::<Vec<_>>()
        .join(", ");
    let policy = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Ignore",
            "reinvocationPolicy": "IfNeeded",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"],
            }]},
            "variables": [{
                "name": "sysctls",
                "expression": format!(
                    "object.spec.?securityContext.?sysctls.orValue([]).filter(s, !(s.name in [{keys}]))\
                     .map(s, {{\"name\": s.name, \"value\": s.value}}) + [{wanted}]"
                ),
            }],
            "mutations": [{"patchType": "JSONPatch", "jsonPatch": {"expression": format!(
                "[has(object.spec.securityContext) \
                  ? JSONPatch{{op: \"add\", path: \"/spec/securityContext/sysctls\", value: variables.sysctls}} \
                  : JSONPatch{{op: \"add\", path: \"/spec/securityContext\", value: {{\"sysctls\": variables.sysctls}}}}, \
                  has(object.metadata.annotations) \
                  ? JSONPatch{{op: \"add\", path: \"/metadata/annotations/\" + jsonpatch.escapeKey(\"keepalive.dev/policy\"), value: \"{name}\"}} \
                  : JSONPatch{{op: \"add\", path: \"/metadata/annotations\", value: {{\"keepalive.dev/policy\": \"{name}\"}}}}]"
            )}}],
        },
    });
    let binding = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "matchResources": {"namespaceSelector": {"matchLabels": {LABEL: config}}}},
    });
    for (kind, object) in [
        ("MutatingAdmissionPolicy", policy),
        ("MutatingAdmissionPolicyBinding", binding),
    ] {
        let gvk = GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", kind);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::from_gvk(&gvk));
        api.create(&PostParams::default(), &serde_json::from_value(object)?)
            .await
            .with_context(|| format!("creating the {kind} {name}"))?;
    }
    Ok(())
}

/// Waits until a dry-run pod in the configuration's namespace gets exactly what it promises.
async fn wait_admitted(client: &Client, config: &Configuration) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &config.namespace);
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let pod = pod_template(&format!("{}-ready", config.name))?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let last = match api.create(&params, &pod).await {
            Ok(created) => match check(&created, config.expect) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            bail!(
                "{}: after {READY_TIMEOUT:?} a dry-run pod in {} still gets: {last}",
                config.name,
                config.namespace
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether a created pod carries what its configuration promises: the three sysctls with `expect`'s values, or
/// no keepalive sysctl at all. The error says what it has instead.
fn check(pod: &Pod, expect: Option<(i32, i32, i32)>) -> std::result::Result<(), String> {
    let sysctls: BTreeMap<&str, &str> = pod
        .spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref())
        .and_then(|sc| sc.sysctls.as_ref())
        .map(|l| l.iter().map(|s| (s.name.as_str(), s.value.as_str())).collect())
        .unwrap_or_default();
    let keepalive: Vec<(&str, &str)> = SYSCTLS
        .iter()
        .filter_map(|k| sysctls.get(k).map(|v| (*k, *v)))
        .collect();
    let ok = match expect {
        None => keepalive.is_empty(),
        Some((t, i, p)) => {
            let want = [t, i, p].map(|v| v.to_string());
            keepalive.len() == 3 && keepalive.iter().zip(&want).all(|((_, v), w)| v == w)
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "pod {} has keepalive sysctls {keepalive:?}, expected {}",
            pod.metadata.name.as_deref().unwrap_or("?"),
            match expect {
                None => "none".to_string(),
                Some(v) => format!("{v:?}"),
            }
        ))
    }
}

/// A realistic Deployment pod: a ReplicaSet owner, labels, two containers with resources, ports, env and probes,
/// a pod securityContext, tolerations, a projected token volume.
fn pod_template(name: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": {"app": "checkout", "pod-template-hash": "5d8f7c9b6", "app.kubernetes.io/name": "checkout",
                       "app.kubernetes.io/part-of": "shop", "tier": "backend"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-01T10:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "checkout-5d8f7c9b6",
                "uid": "4b0c7f5e-8d3a-4c1e-9f6a-2b7d8e9f0a1b", "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {
            "containers": [
                {"name": "app", "image": "registry.example/checkout:1.4.2",
                 "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                 "env": [{"name": "DB_HOST", "value": "db.shop.svc"}, {"name": "LOG_LEVEL", "value": "info"}],
                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                 "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 5},
                 "livenessProbe": {"httpGet": {"path": "/live", "port": 8080}, "periodSeconds": 10},
                 "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
                 "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]},
                {"name": "envoy", "image": "registry.example/envoy:1.31.0",
                 "args": ["--config-path", "/etc/envoy/envoy.yaml"],
                 "ports": [{"name": "admin", "containerPort": 9901, "protocol": "TCP"}],
                 "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
                 "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}},
            ],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "securityContext": {"runAsNonRoot": true, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
            "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}],
        },
    }))?)
}

// --- measuring -------------------------------------------------------------------------------------------------

/// One configuration's window in one round.
#[derive(Debug, Clone)]
struct Sample {
    config: String,
    round: usize,
    /// Create latencies, milliseconds, sorted.
    latencies: Vec<f64>,
    seconds: f64,
    /// 429 answers (retried; their time is in the latency).
    throttled: u64,
    /// CPU seconds of the configuration's own processes (`None`: it has none).
    own_cpu: Option<f64>,
    /// Their peak RSS in the window, MiB.
    own_rss: Option<f64>,
    apiserver_cpu: f64,
    etcd_cpu: f64,
}

impl Sample {
    fn pods(&self) -> usize {
        self.latencies.len()
    }
    /// Nearest-rank percentile.
    fn percentile(&self, q: f64) -> f64 {
        let n = self.latencies.len();
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        self.latencies[rank - 1]
    }
    fn rate(&self) -> f64 {
        self.pods() as f64 / self.seconds
    }
    fn per_1000(&self, cpu: f64) -> f64 {
        cpu * 1000.0 / self.pods() as f64
    }
}

/// CPU seconds (utime + stime, all threads) of a process, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields are counted after its closing parenthesis.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf(3) only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// A field of `/proc/<pid>/status` in kB (VmRSS, VmHWM), as MiB.
fn status_mib(pid: u32, field: &str) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
}

/// Resets the process's peak RSS (VmHWM) to its current RSS (`clear_refs` 5, Linux ≥ 4.0).
fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// The pids of this control plane's kube-apiserver and etcd: our children whose command line names its directory.
fn control_plane_pids(cp: &ControlPlane) -> Result<(u32, u32)> {
    let me = std::process::id();
    let dir = cp.work_dir().to_string_lossy().into_owned();
    let (mut apiserver, mut etcd) = (None, None);
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid != Some(me) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(&dir) {
            continue;
        }
        match std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
        {
            "kube-apiserver" => apiserver = Some(pid),
            "etcd" => etcd = Some(pid),
            _ => {}
        }
    }
    Ok((
        apiserver.context("no kube-apiserver process of this control plane among our children")?,
        etcd.context("no etcd process of this control plane among our children")?,
    ))
}

/// The shared client of the creators: kube's client over one HTTP/2 connection (as client-go talks to the
/// apiserver), or kube's default HTTP/1.1 stack (a pool of keep-alive connections, one per concurrent request).
/// Either way without kube's retry layer, which would hide 429s inside the latency.
async fn load_client(cp: &ControlPlane, http1: bool) -> Result<Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(cp.kubeconfig())?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default()).await?;
    config.default_retry = false;
    config.read_timeout = Some(CREATE_TIMEOUT);
    if http1 {
        return Ok(Client::try_from(config)?);
    }
    let tls = config.rustls_client_config()?;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http2()
        .wrap_connector(http);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build::<_, kube::client::Body>(https);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .service(client);
    Ok(Client::new(service, config.default_namespace))
}

/// Creates `pods` pods in the configuration's namespace with `creators` concurrent tasks; measures and checks.
async fn window(
    client: &Client,
    config: &Configuration,
    pids: &ControlPids,
    creators: usize,
    pods: usize,
    round: usize,
) -> Result<Sample> {
    let own = config.admission.pids();
    let reset: Vec<bool> = own.iter().map(|p| reset_peak(*p)).collect();
    let cpu = |pids: &[u32]| -> f64 { pids.iter().filter_map(|p| cpu_seconds(*p)).sum() };
    let (own_before, api_before, etcd_before) = (cpu(&own), cpu(&[pids.apiserver]), cpu(&[pids.etcd]));
    // Peak RSS: VmRSS of each own process sampled every 50 ms (their sum at each sample).
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (own, sampling) = (own.clone(), sampling.clone());
        tokio::spawn(async move {
            let mut peak = 0.0f64;
            while sampling.load(Ordering::Relaxed) {
                peak = peak.max(own.iter().filter_map(|p| status_mib(*p, "VmRSS")).sum());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        })
    };
    let template = Arc::new(pod_template("template")?);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..creators {
        let api: Api<Pod> = Api::namespaced(client.clone(), &config.namespace);
        let (template, next, expect) = (template.clone(), next.clone(), config.expect);
        let prefix = format!("{}-r{round}-c{creators}", config.name);
        tasks.spawn(async move { creator(api, template, next, pods, &prefix, expect).await });
    }
    let mut latencies = Vec::with_capacity(pods);
    let mut throttled = 0;
    let mut wrong: Vec<String> = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let done = joined.context("a creator task panicked")??;
        latencies.extend(done.latencies);
        throttled += done.throttled;
        wrong.extend(done.wrong);
    }
    let seconds = started.elapsed().as_secs_f64();
    sampling.store(false, Ordering::Relaxed);
    let sampled = sampler.await?;
    let own_cpu = cpu(&own) - own_before;
    let (apiserver_cpu, etcd_cpu) = (cpu(&[pids.apiserver]) - api_before, cpu(&[pids.etcd]) - etcd_before);
    let hwm: f64 = own
        .iter()
        .zip(&reset)
        .filter(|(_, reset)| **reset)
        .filter_map(|(p, _)| status_mib(*p, "VmHWM"))
        .sum();
    if !wrong.is_empty() {
        wrong.sort();
        let log = config.admission.log().as_deref().map(log_tail).unwrap_or_default();
        bail!(
            "{}: {} of {pods} pods created in round {round} do not carry what they should (the run fails: a \
             configuration that mutates nothing, or only some pods, is not fast, it is broken); first: {}{log}",
            config.name,
            wrong.len(),
            wrong[0]
        );
    }
    // What was stored, not only what the create answered.
    verify_stored(client, config, pods).await?;
    latencies.sort_by(f64::total_cmp);
    Ok(Sample {
        config: config.name.clone(),
        round,
        latencies,
        seconds,
        throttled,
        own_cpu: (!own.is_empty()).then_some(own_cpu),
        own_rss: (!own.is_empty()).then_some(sampled.max(hwm)),
        apiserver_cpu,
        etcd_cpu,
    })
}

struct ControlPids {
    apiserver: u32,
    etcd: u32,
}

struct Created {
    latencies: Vec<f64>,
    throttled: u64,
    wrong: Vec<String>,
}

/// One creator: takes the next pod number until `pods` are taken; a 429 is retried after a short pause (the
/// latency runs from the first attempt), anything else fails the run.
async fn creator(
    api: Api<Pod>,
    template: Arc<Pod>,
    next: Arc<AtomicUsize>,
    pods: usize,
    prefix: &str,
    expect: Option<(i32, i32, i32)>,
) -> Result<Created> {
    let mut out = Created {
        latencies: Vec::new(),
        throttled: 0,
        wrong: Vec::new(),
    };
    let params = PostParams::default();
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= pods {
            return Ok(out);
        }
        let mut pod = (*template).clone();
        pod.metadata.name = Some(format!("{prefix}-{i}"));
        let start = Instant::now();
        let created = loop {
            let left = CREATE_TIMEOUT.saturating_sub(start.elapsed());
            match tokio::time::timeout(left, api.create(&params, &pod)).await {
                Ok(Ok(created)) => break created,
                Ok(Err(kube::Error::Api(s))) if s.code == 429 => {
                    out.throttled += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(Err(e)) => return Err(e).with_context(|| format!("creating pod {prefix}-{i}")),
                Err(_) => bail!("creating pod {prefix}-{i}: no answer within {CREATE_TIMEOUT:?}"),
            }
        };
        out.latencies.push(start.elapsed().as_secs_f64() * 1e3);
        if let Err(e) = check(&created, expect) {
            out.wrong.push(e);
        }
    }
}

/// Lists the namespace's pods: exactly `pods` of them, each carrying what it should.
async fn verify_stored(client: &Client, config: &Configuration, pods: usize) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &config.namespace);
    let mut params = ListParams::default().limit(500);
    let (mut count, mut wrong) = (0, Vec::new());
    loop {
        let list = api.list(&params).await.context("listing the window's pods")?;
        for pod in &list.items {
            count += 1;
            if let Err(e) = check(pod, config.expect) {
                wrong.push(e);
            }
        }
        match list.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    if count != pods || !wrong.is_empty() {
        bail!(
            "{}: {count} pods stored (expected {pods}), {} without what they should carry{}",
            config.name,
            wrong.len(),
            wrong.first().map(|w| format!("; first: {w}")).unwrap_or_default()
        );
    }
    Ok(())
}

/// Deletes the namespace's pods (deletecollection) and waits until none is left.
async fn delete_pods(client: &Client, namespace: &str) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    api.delete_collection(&params, &ListParams::default())
        .await
        .with_context(|| format!("deleting the pods of {namespace}"))?;
    poll(
        READY_TIMEOUT,
        &format!("the pods of {namespace} to be deleted"),
        || async {
            let left = api.list(&ListParams::default().limit(1)).await.ok()?;
            left.items.is_empty().then_some(())
        },
    )
    .await
}

/// Polls `check` every 200 ms until it returns Some, failing after `limit`.
async fn poll<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// --- the run -----------------------------------------------------------------------------------------------------

fn progress(line: &str) {
    eprintln!("[bench-admission {}] {line}", clock());
}

/// UTC time of day, for progress lines.
fn clock() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{:02}:{:02}:{:02}", secs / 3600 % 24, secs / 60 % 60, secs % 60)
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "\n--- last lines of {}:\n{}",
        path.display(),
        lines[lines.len().saturating_sub(20)..].join("\n")
    )
}

/// The cargo target directory: `CARGO_TARGET_DIR` (relative to the repository) or the repository's `target/`.
fn target_dir() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    tools::repo_root().join(dir)
}

/// `cargo build --release --bin keepalive-operator`; the binary.
fn build_operator() -> Result<PathBuf> {
    progress("building the operator: cargo build --release --bin keepalive-operator");
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--release", "--bin", "keepalive-operator"])
        .current_dir(tools::repo_root())
        .stdin(Stdio::null())
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release --bin keepalive-operator failed ({status})");
    }
    Ok(target_dir().join("release/keepalive-operator"))
}

/// `cargo xtask bench-admission`.
pub fn run(options: &Options) -> Result<()> {
    let names = configuration_names(options)?;
    let operator = build_operator()?;
    progress("building etcd, kube-apiserver and kubectl of the newest Kubernetes (cached after the first run)");
    tools::bin_dir()?;
    progress("starting the control plane (etcd + kube-apiserver, no kubelet: pods stay Pending)");
    let cp = ControlPlane::start()?;
    cp.install_crds()?;
    let version = cp.kubectl_output(&["version", "-o", "json"])?;
    let version: Value = serde_json::from_str(&version)?;
    let version = version["serverVersion"]["gitVersion"]
        .as_str()
        .unwrap_or("?")
        .to_string();
    let (apiserver, etcd) = control_plane_pids(&cp)?;
    progress(&format!(
        "kube-apiserver {version} (pid {apiserver}), etcd (pid {etcd}) at {}",
        cp.server()
    ));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let admin = rt.block_on(cp.client())?;
    rt.block_on(create_namespace(&admin, SYSTEM_NAMESPACE, "system"))?;
    let setup = Setup {
        cp: &cp,
        rt: &rt,
        client: admin,
        operator,
    };
    // Every configuration runs for the whole benchmark; dropped (killed) on any error.
    let mut configurations = Vec::new();
    for name in &names {
        progress(&format!("{name}: starting"));
        configurations.push(start_configuration(&setup, name)?);
    }
    let pids = ControlPids { apiserver, etcd };
    let measured = rt.block_on(async {
        tokio::select! {
            result = measure(&cp, &configurations, &pids, options) => result,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    // Stopped last started first; a failed stop is reported after the figures, which stay valid.
    let mut stop_errors = Vec::new();
    for configuration in configurations.into_iter().rev() {
        let name = configuration.name.clone();
        if let Err(e) = configuration.admission.stop() {
            stop_errors.push(format!("stopping {name}: {e:#}"));
        }
    }
    let samples = match measured {
        Ok(samples) => samples,
        Err(e) if stop_errors.is_empty() => return Err(e),
        Err(e) => return Err(e.context(stop_errors.join("; "))),
    };
    let header = format!(
        "kube-apiserver {version}, {} pods per configuration and round, {} rounds, creators {}, one shared client \
         over {}; {} cores",
        options.pods,
        options.rounds,
        options
            .creators
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(" and "),
        if options.http1 {
            "HTTP/1.1 (a pool: one connection per concurrent creator)"
        } else {
            "one HTTP/2 connection"
        },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let report = report(&header, &names, options, &samples);
    print!("{}", report.text);
    let out = options
        .out
        .clone()
        .unwrap_or_else(|| target_dir().join("bench-admission.md"));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, &report.markdown).with_context(|| format!("writing {}", out.display()))?;
    progress(&format!("markdown tables written to {}", out.display()));
    if !stop_errors.is_empty() {
        bail!("{}", stop_errors.join("; "));
    }
    Ok(())
}

/// Every level, round and configuration, interleaved. Samples by creators level.
async fn measure(
    cp: &ControlPlane,
    configurations: &[Configuration],
    pids: &ControlPids,
    options: &Options,
) -> Result<BTreeMap<usize, Vec<Sample>>> {
    let client = load_client(cp, options.http1).await?;
    let admin = cp.client().await?;
    let mut all = BTreeMap::new();
    for &creators in &options.creators {
        // Warm-up, not recorded: connections, the apiserver's caches and compiled CEL, the operators' caches.
        let warm = (options.pods / 5).clamp(50.min(options.pods), 500);
        progress(&format!("creators {creators}: warm-up, {warm} pods per configuration"));
        for config in configurations {
            window(&client, config, pids, creators, warm, 0).await?;
            delete_pods(&admin, &config.namespace).await?;
        }
        tokio::time::sleep(SETTLE).await;
        let mut samples = Vec::new();
        for round in 1..=options.rounds {
            let mut order: Vec<&Configuration> = configurations.iter().collect();
            let turn = (round - 1) % order.len();
            order.rotate_left(turn);
            for config in order {
                let sample = window(&client, config, pids, creators, options.pods, round).await?;
                progress(&format!(
                    "creators {creators}, round {round}/{}: {:<16} p50 {:>6.1} ms  p99 {:>6.1} ms  {:>6.0} pods/s{}",
                    options.rounds,
                    config.name,
                    sample.percentile(0.50),
                    sample.percentile(0.99),
                    sample.rate(),
                    if sample.throttled > 0 {
                        format!("  ({} answers 429)", sample.throttled)
                    } else {
                        String::new()
                    }
                ));
                samples.push(sample);
                delete_pods(&admin, &config.namespace).await?;
                tokio::time::sleep(SETTLE).await;
            }
        }
        all.insert(creators, samples);
    }
    Ok(all)
}

// --- the report --------------------------------------------------------------------------------------------------

struct Report {
    text: String,
    markdown: String,
}

/// Median of `values` (mean of the middle two for an even count).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn spread(values: &[f64]) -> (f64, f64) {
    values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(*v), hi.max(*v))
    })
}

/// One configuration's figures over the rounds of one level.
struct Summary {
    p50: Vec<f64>,
    p95: Vec<f64>,
    p99: Vec<f64>,
    d50: Vec<f64>,
    d99: Vec<f64>,
    rate: Vec<f64>,
    own_cpu: Vec<f64>,
    own_rss: Vec<f64>,
    apiserver_cpu: Vec<f64>,
    total_cpu: Vec<f64>,
}

fn summarize(samples: &[Sample], config: &str) -> Summary {
    let mine: Vec<&Sample> = samples.iter().filter(|s| s.config == config).collect();
    let baseline = |round: usize| samples.iter().find(|s| s.config == "baseline" && s.round == round);
    let delta = |s: &Sample, q: f64| baseline(s.round).map_or(f64::NAN, |b| s.percentile(q) - b.percentile(q));
    Summary {
        p50: mine.iter().map(|s| s.percentile(0.50)).collect(),
        p95: mine.iter().map(|s| s.percentile(0.95)).collect(),
        p99: mine.iter().map(|s| s.percentile(0.99)).collect(),
        d50: mine.iter().map(|s| delta(s, 0.50)).collect(),
        d99: mine.iter().map(|s| delta(s, 0.99)).collect(),
        rate: mine.iter().map(|s| s.rate()).collect(),
        own_cpu: mine.iter().filter_map(|s| Some(s.per_1000(s.own_cpu?))).collect(),
        own_rss: mine.iter().filter_map(|s| s.own_rss).collect(),
        apiserver_cpu: mine.iter().map(|s| s.per_1000(s.apiserver_cpu)).collect(),
        total_cpu: mine
            .iter()
            .map(|s| s.per_1000(s.apiserver_cpu + s.own_cpu.unwrap_or(0.0)))
            .collect(),
    }
}

/// `median [min–max]`, or `–` when there is nothing.
fn cell(values: &[f64], decimals: usize) -> String {
    if values.is_empty() || values.iter().any(|v| v.is_nan()) {
        return "–".into();
    }
    let (lo, hi) = spread(values);
    if values.len() == 1 {
        return format!("{:.*}", decimals, values[0]);
    }
    format!(
        "{:.*} [{:.*}–{:.*}]",
        decimals,
        median(values),
        decimals,
        lo,
        decimals,
        hi
    )
}

fn opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or("–".into(), |v| format!("{v:.decimals$}"))
}

/// A markdown table; the text report prints the same rows aligned.
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }
    fn markdown(&self) -> String {
        let mut out = format!("| {} |\n|", self.header.join(" | "));
        for i in 0..self.header.len() {
            out.push_str(if i == 0 { "---|" } else { "---:|" });
        }
        out.push('\n');
        for row in &self.rows {
            writeln!(out, "| {} |", row.join(" | ")).unwrap();
        }
        out
    }
    fn text(&self) -> String {
        let widths: Vec<usize> = (0..self.header.len())
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([self.header[i].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| {
            let mut out = String::new();
            for (i, c) in cells.iter().enumerate() {
                let pad = widths[i] - c.chars().count();
                if i == 0 {
                    write!(out, "{c}{}", " ".repeat(pad)).unwrap();
                } else {
                    write!(out, "  {}{c}", " ".repeat(pad)).unwrap();
                }
            }
            out.push('\n');
            out
        };
        let mut out = line(&self.header);
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }
}

fn report(header: &str, names: &[String], options: &Options, all: &BTreeMap<usize, Vec<Sample>>) -> Report {
    let mut text = format!("\n{header}\n");
    let mut markdown = format!("{header}.\n");
    for (creators, samples) in all {
        let mut rounds = Table::new(&[
            "round",
            "configuration",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "Δp50 ms",
            "Δp99 ms",
            "pods/s",
            "429s",
            "own CPU s/1k",
            "own peak RSS MiB",
            "apiserver CPU s/1k",
            "etcd CPU s/1k",
        ]);
        for s in samples {
            let base = samples.iter().find(|b| b.config == "baseline" && b.round == s.round);
            let delta = |q: f64| base.map_or("–".into(), |b| format!("{:+.1}", s.percentile(q) - b.percentile(q)));
            rounds.rows.push(vec![
                s.round.to_string(),
                s.config.clone(),
                format!("{:.1}", s.percentile(0.50)),
                format!("{:.1}", s.percentile(0.95)),
                format!("{:.1}", s.percentile(0.99)),
                delta(0.50),
                delta(0.99),
                format!("{:.0}", s.rate()),
                s.throttled.to_string(),
                opt(s.own_cpu.map(|c| s.per_1000(c)), 2),
                opt(s.own_rss, 1),
                format!("{:.2}", s.per_1000(s.apiserver_cpu)),
                format!("{:.2}", s.per_1000(s.etcd_cpu)),
            ]);
        }
        let mut summary = Table::new(&[
            "configuration",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "Δp50 ms",
            "Δp99 ms",
            "pods/s",
            "own CPU s/1k pods",
            "own peak RSS MiB",
            "apiserver CPU s/1k pods",
            "apiserver + own CPU s/1k",
        ]);
        let summaries: BTreeMap<&str, Summary> = names.iter().map(|n| (n.as_str(), summarize(samples, n))).collect();
        for name in names {
            let s = &summaries[name.as_str()];
            let base = name == "baseline";
            summary.rows.push(vec![
                name.clone(),
                cell(&s.p50, 1),
                cell(&s.p95, 1),
                cell(&s.p99, 1),
                if base { "–".into() } else { cell(&s.d50, 1) },
                if base { "–".into() } else { cell(&s.d99, 1) },
                cell(&s.rate, 0),
                cell(&s.own_cpu, 2),
                cell(&s.own_rss, 1),
                cell(&s.apiserver_cpu, 2),
                cell(&s.total_cpu, 2),
            ]);
        }
        let verdicts = targets(&summaries);
        let title = format!(
            "{creators} creators, {} pods per configuration per round, {} rounds",
            options.pods, options.rounds
        );
        writeln!(
            text,
            "\n== {title}: every round (Δ: against the baseline of the same round)"
        )
        .unwrap();
        text.push_str(&rounds.text());
        writeln!(text, "\n== {title}: median [min–max] over the rounds").unwrap();
        text.push_str(&summary.text());
        writeln!(text).unwrap();
        for v in &verdicts {
            writeln!(text, "{v}").unwrap();
        }
        writeln!(markdown, "\n### {title}\n\nMedian [min–max] over the rounds; Δ against the baseline of the same round; \"own\": the configuration's own processes (none for the baseline and the MutatingAdmissionPolicies, whose cost is the apiserver's CPU).\n").unwrap();
        markdown.push_str(&summary.markdown());
        markdown.push('\n');
        for v in &verdicts {
            writeln!(markdown, "- {v}").unwrap();
        }
        writeln!(markdown, "\n<details><summary>every round</summary>\n").unwrap();
        markdown.push_str(&rounds.markdown());
        writeln!(markdown, "\n</details>").unwrap();
    }
    Report { text, markdown }
}

/// Ratios against hand-map and Kyverno, and the targets, met or missed (medians over the rounds).
fn targets(s: &BTreeMap<&str, Summary>) -> Vec<String> {
    let mut out = Vec::new();
    let m = |v: &[f64]| (!v.is_empty()).then(|| median(v));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        (Some(_), Some(b)) => format!("n/a (reference {b:+.1})"),
        _ => "–".into(),
    };
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let (webhook, ap, hand, kyverno) = (
        s.get("webhook"),
        s.get("admission-policy"),
        s.get("hand-map"),
        s.get("kyverno"),
    );
    for (name, reference) in [("hand-map", hand), ("kyverno", kyverno)] {
        let Some(r) = reference else { continue };
        for (who, c) in [("webhook", webhook), ("admission-policy", ap)] {
            let Some(c) = c else { continue };
            out.push(format!(
                "{who} vs {name}: Δp50 {}, Δp99 {}, own CPU/1k pods {}, own peak RSS {}, apiserver+own CPU/1k {}",
                ratio(m(&c.d50), m(&r.d50)),
                ratio(m(&c.d99), m(&r.d99)),
                ratio(m(&c.own_cpu), m(&r.own_cpu)),
                ratio(m(&c.own_rss), m(&r.own_rss)),
                ratio(m(&c.total_cpu), m(&r.total_cpu)),
            ));
        }
    }
    // Latency added: a smaller (or negative) delta than the bound meets the target.
    let within = |c: &[f64], r: &[f64], factor: f64| -> Option<(bool, f64, f64)> {
        let (c, r) = (m(c)?, m(r)?);
        Some((c <= factor * r.max(0.0), c, r))
    };
    let mut target = |label: &str, result: Option<(bool, f64, f64)>, unit: &str, bound: &str| {
        if let Some((ok, c, r)) = result {
            out.push(format!(
                "target {label}: {c:.1}{unit} vs {bound} of {r:.1}{unit} — {}",
                verdict(ok)
            ));
        }
    };
    if let (Some(w), Some(h)) = (webhook, hand) {
        target(
            "webhook Δp50 ≤ 1.2× hand-map's",
            within(&w.d50, &h.d50, 1.2),
            " ms",
            "1.2×",
        );
        target(
            "webhook Δp99 ≤ 1.2× hand-map's",
            within(&w.d99, &h.d99, 1.2),
            " ms",
            "1.2×",
        );
    }
    if let (Some(w), Some(k)) = (webhook, kyverno) {
        target(
            "webhook Δp50 ≤ 1/3 of Kyverno's",
            within(&w.d50, &k.d50, 1.0 / 3.0),
            " ms",
            "1/3",
        );
        target(
            "webhook Δp99 ≤ 1/3 of Kyverno's",
            within(&w.d99, &k.d99, 1.0 / 3.0),
            " ms",
            "1/3",
        );
        target(
            "webhook CPU/1k pods ≤ 1/3 of Kyverno's",
            within(&w.own_cpu, &k.own_cpu, 1.0 / 3.0),
            " s",
            "1/3",
        );
        target(
            "webhook peak RSS ≤ 1/3 of Kyverno's",
            within(&w.own_rss, &k.own_rss, 1.0 / 3.0),
            " MiB",
            "1/3",
        );
    }
    if let (Some(a), Some(h)) = (ap, hand) {
        target(
            "admission-policy Δp50 within 10 % of hand-map's",
            within(&a.d50, &h.d50, 1.1),
            " ms",
            "1.1×",
        );
        target(
            "admission-policy Δp99 within 10 % of hand-map's",
            within(&a.d99, &h.d99, 1.1),
            " ms",
            "1.1×",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(config: &str, round: usize, latencies: Vec<f64>) -> Sample {
        Sample {
            config: config.into(),
            round,
            latencies,
            seconds: 2.0,
            throttled: 0,
            own_cpu: None,
            own_rss: None,
            apiserver_cpu: 1.0,
            etcd_cpu: 0.5,
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let s = sample("baseline", 1, (1..=100).map(f64::from).collect());
        assert_eq!(
            (s.percentile(0.5), s.percentile(0.95), s.percentile(0.99)),
            (50.0, 95.0, 99.0)
        );
        assert_eq!(sample("x", 1, vec![7.0]).percentile(0.99), 7.0);
        assert_eq!(s.rate(), 50.0);
        assert_eq!(s.per_1000(1.0), 10.0);
    }

    #[test]
    fn a_pod_carries_the_three_values_or_none() {
        let pod = |sysctls: Value| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": [],
                "securityContext": {"sysctls": sysctls}}}))
            .unwrap()
        };
        let full = pod(json!([
            {"name": "kernel.shm_rmid_forced", "value": "1"},
            {"name": "net.ipv4.tcp_keepalive_time", "value": "20"},
            {"name": "net.ipv4.tcp_keepalive_intvl", "value": "5"},
            {"name": "net.ipv4.tcp_keepalive_probes", "value": "3"},
        ]));
        assert!(check(&full, Some((20, 5, 3))).is_ok());
        assert!(check(&full, Some((20, 5, 4))).is_err());
        assert!(check(&full, None).is_err());
        let partial = pod(json!([{"name": "net.ipv4.tcp_keepalive_time", "value": "20"}]));
        assert!(check(&partial, Some((20, 5, 3))).is_err());
        let other = pod(json!([{"name": "kernel.shm_rmid_forced", "value": "1"}]));
        assert!(check(&other, None).is_ok());
        assert!(check(&pod_template("t").unwrap(), None).is_ok());
    }

    #[test]
    fn options_parse_lists_and_reject_unknown_flags() {
        let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let o = Options::parse(&args("--creators 16,32 --pods=200 --rounds 1 --only webhook,hand-map")).unwrap();
        assert_eq!((o.creators, o.pods, o.rounds), (vec![16, 32], 200, 1));
        assert_eq!(o.only.unwrap(), ["webhook", "hand-map"]);
        assert!(Options::parse(&args("--pods 0")).is_err());
        assert!(Options::parse(&args("--fast")).is_err());
        let only = Options::parse(&args("--only webhook")).unwrap();
        assert_eq!(configuration_names(&only).unwrap(), ["baseline", "webhook"]);
        assert!(configuration_names(&Options::parse(&args("--only kyverno")).unwrap()).is_err());
    }

    #[test]
    fn targets_compare_medians_of_the_deltas() {
        let mut samples = Vec::new();
        for round in 1..=3 {
            samples.push(sample("baseline", round, vec![10.0; 10]));
            samples.push(sample("hand-map", round, vec![15.0; 10]));
            samples.push(sample("webhook", round, vec![16.0; 10]));
            samples.push(sample("admission-policy", round, vec![15.2; 10]));
        }
        let names = ["baseline", "hand-map", "webhook", "admission-policy"];
        let s: BTreeMap<&str, Summary> = names.iter().map(|n| (*n, summarize(&samples, n))).collect();
        let lines = targets(&s);
        let find = |p: &str| lines.iter().find(|l| l.starts_with(p)).unwrap().clone();
        assert!(find("target webhook Δp50").ends_with("met"), "{lines:?}");
        assert!(find("target admission-policy Δp99").ends_with("met"), "{lines:?}");
        assert!(find("webhook vs hand-map").contains("Δp50 1.20×"), "{lines:?}");
        assert!(
            !lines.iter().any(|l| l.contains("Kyverno")),
            "no Kyverno, no target against it"
        );
    }
}
