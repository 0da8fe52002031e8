//! The peers a user could pick instead of this operator, built and run on this host for side-by-side admission
//! benchmarks: Kyverno's admission controller and Gatekeeper's manager, each compiled from its upstream Go module
//! and run as a process against a local control plane, with its webhook registered by URL and a policy doing
//! exactly this operator's mutation (the three keepalive sysctls into pods of labelled namespaces).
//!
//! Each peer is built through a wrapper module generated in the cache (`<cache>/peers/<name>-<version>/go.mod`:
//! it requires the peer at its version and repeats the `replace` directives of the peer's own go.mod), with the
//! machine's Go toolchain at the lowest priority, and the binary is kept there, keyed by version. The peers' CRDs
//! are applied from their module source in the Go module cache. Nothing of theirs enters this repository.
//!
//! `cargo xtask peers [NAME...]` builds them and runs a smoke test of each on a fresh control plane.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::{Value, json};

use crate::{
    ControlPlane,
    cluster::{free_port, kill, spawn_logged},
    tools,
};

/// The keepalive sysctls, in the order of the `values` tuples: time, intvl, probes.
pub const SYSCTLS: [&str; 3] = [
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];

/// How long [`Peer::start`] waits for a peer to mutate a dry-run pod before it gives up.
pub const START_TIMEOUT: Duration = Duration::from_secs(240);

/// The name Gatekeeper is told its pod has (a Pod object of that name is created for it).
const GATEKEEPER_POD: &str = "gatekeeper-controller-manager-local";

/// Name prefix of every object the peers' policies and webhook configurations create.
const PREFIX: &str = "keepalive-peer";

/// The namespace in which [`Peer::start`] sends its dry-run probes (created with the label if missing, and kept:
/// no namespace controller runs on the local control plane, so a deleted namespace would stay Terminating).
pub const PROBE_NAMESPACE: &str = "keepalive-peer-probe";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Kyverno,
    Gatekeeper,
}

impl Peer {
    pub const ALL: [Peer; 2] = [Peer::Kyverno, Peer::Gatekeeper];

    pub fn name(self) -> &'static str {
        match self {
            Peer::Kyverno => "kyverno",
            Peer::Gatekeeper => "gatekeeper",
        }
    }

    pub fn version(self) -> &'static str {
        match self {
            Peer::Kyverno => "v1.19.1",
            Peer::Gatekeeper => "v3.23.1",
        }
    }

    /// The peer by its [`name`](Self::name).
    pub fn from_name(name: &str) -> Option<Peer> {
        Peer::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The Go module the peer is built from.
    pub fn module(self) -> &'static str {
        match self {
            Peer::Kyverno => "github.com/kyverno/kyverno",
            Peer::Gatekeeper => "github.com/open-policy-agent/gatekeeper/v3",
        }
    }

    /// The main package of the admission process: Kyverno's admission controller, Gatekeeper's manager (the
    /// module's root package).
    fn package(self) -> &'static str {
        match self {
            Peer::Kyverno => "github.com/kyverno/kyverno/cmd/kyverno",
            Peer::Gatekeeper => "github.com/open-policy-agent/gatekeeper/v3",
        }
    }

    fn binary(self) -> &'static str {
        match self {
            Peer::Kyverno => "kyverno",
            Peer::Gatekeeper => "manager",
        }
    }

    /// The linker flags of the peer's own release build (Makefile), stripped.
    fn ldflags(self) -> String {
        let version_var = match self {
            Peer::Kyverno => "github.com/kyverno/kyverno/pkg/version.BuildVersion",
            Peer::Gatekeeper => "github.com/open-policy-agent/gatekeeper/v3/pkg/version.Version",
        };
        format!("-s -w -X {version_var}={}", self.version())
    }

    /// `<cache>/peers/<name>-<version>`: the wrapper module and the binary.
    pub fn build_dir(self) -> PathBuf {
        tools::cache_dir()
            .join("peers")
            .join(format!("{}-{}", self.name(), self.version()))
    }

    /// The peer's module source in the Go module cache (downloaded if missing).
    pub fn source_dir(self) -> Result<PathBuf> {
        Ok(self.download()?.1)
    }

    /// `go mod download` of the peer's module: its go.mod and its source directory.
    fn download(self) -> Result<(PathBuf, PathBuf)> {
        let out = go()
            .args(["mod", "download", "-json"])
            .arg(format!("{}@{}", self.module(), self.version()))
            .current_dir(std::env::temp_dir())
            .stderr(Stdio::inherit())
            .output()
            .context("running go mod download")?;
        let info: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("go mod download {}@{}: no JSON answer", self.module(), self.version()))?;
        if let Some(e) = info["Error"].as_str() {
            bail!("go mod download {}@{}: {e}", self.module(), self.version());
        }
        if !out.status.success() {
            bail!(
                "go mod download {}@{} failed ({})",
                self.module(),
                self.version(),
                out.status
            );
        }
        let path = |key: &str| {
            info[key]
                .as_str()
                .map(PathBuf::from)
                .with_context(|| format!("go mod download: no {key}"))
        };
        Ok((path("GoMod")?, path("Dir")?))
    }

    /// Builds the peer's admission binary if it is not cached yet and returns its path. Progress goes to stderr.
    pub fn build(self) -> Result<PathBuf> {
        let dir = self.build_dir();
        let bin = dir.join(self.binary());
        if bin.is_file() {
            return Ok(bin);
        }
        let start = Instant::now();
        say(
            self,
            &format!("building {} {} (first time only)", self.module(), self.version()),
        );
        fs::create_dir_all(&dir)?;
        let (go_mod, _) = self.download()?;
        let upstream = fs::read_to_string(&go_mod).with_context(|| format!("reading {}", go_mod.display()))?;
        let wrapper = wrapper_go_mod(self, &upstream)?;
        let wrapper_path = dir.join("go.mod");
        if fs::read_to_string(&wrapper_path).ok().as_deref() != Some(wrapper.as_str()) {
            fs::write(&wrapper_path, &wrapper)?;
            let _ = fs::remove_file(dir.join("go.sum"));
        }
        if !dir.join("go.sum").is_file() {
            say(
                self,
                "resolving the wrapper module's dependencies (go mod tidy; downloads modules)",
            );
            let status = nice(go().args(["mod", "tidy"]))
                .current_dir(&dir)
                .status()
                .context("running go mod tidy")?;
            if !status.success() {
                let _ = fs::remove_file(dir.join("go.sum"));
                bail!("go mod tidy in {} failed ({status})", dir.display());
            }
        }
        let total = go()
            .args(["list", "-deps", self.package()])
            .current_dir(&dir)
            .stderr(Stdio::inherit())
            .output()
            .context("running go list")?;
        if !total.status.success() {
            bail!("go list -deps {} failed ({})", self.package(), total.status);
        }
        let total = total.stdout.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count();
        say(
            self,
            &format!(
                "compiling {} ({total} packages, cached ones skipped; at nice 19)",
                self.package()
            ),
        );
        let tmp = dir.join(format!("{}.tmp", self.binary()));
        let mut child = nice(go().args(["build", "-v", "-trimpath", "-ldflags", &self.ldflags(), "-o"]))
            .arg(&tmp)
            .arg(self.package())
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running go build")?;
        let mut compiled = 0;
        let mut errors = Vec::new();
        for line in BufReader::new(child.stderr.take().expect("piped")).lines() {
            let line = line?;
            // `go build -v` names each package it compiles; anything else is a diagnostic.
            if line.contains(' ') || line.contains(':') {
                eprintln!("{line}");
                errors.push(line);
                continue;
            }
            compiled += 1;
            if compiled % 100 == 0 {
                say(
                    self,
                    &format!(
                        "  compiled {compiled} of at most {total} packages ({} s)",
                        start.elapsed().as_secs()
                    ),
                );
            }
        }
        let status = child.wait()?;
        if !status.success() || !tmp.is_file() {
            bail!(
                "go build {} failed ({status}){}",
                self.package(),
                errors.last().map(|e| format!(": {e}")).unwrap_or_default()
            );
        }
        fs::rename(&tmp, &bin)?;
        say(
            self,
            &format!("built {} in {} s", bin.display(), start.elapsed().as_secs()),
        );
        Ok(bin)
    }

    /// Installs the peer's CRDs, starts it on this host against `cp` with its mutating webhook registered by URL
    /// (`https://127.0.0.1:<port>/...`, failurePolicy Fail, only pods created in namespaces labelled `label`), installs
    /// a policy setting the three keepalive sysctls to `values` (time, intvl, probes) and keeping a pod's other
    /// sysctls, and waits until a server-side dry-run pod create in [`PROBE_NAMESPACE`] (labelled `label`) comes back
    /// with them, at most [`START_TIMEOUT`]. On failure the process is stopped and its objects removed, and the error
    /// carries the tail of its log.
    pub fn start(self, cp: &ControlPlane, label: (&str, &str), values: (i32, i32, i32)) -> Result<RunningPeer> {
        let bin = self.build()?;
        let source = self.source_dir()?;
        let kubectl = Kubectl::of(cp);
        let log = cp.work_dir().join(format!("{}.log", self.name()));
        let mut running = RunningPeer {
            peer: self,
            child: None,
            log,
            kubectl,
            objects: Vec::new(),
            webhook_selector: None,
        };
        let started = Instant::now();
        let result = match self {
            Peer::Kyverno => running.start_kyverno(&bin, &source, cp, label, values),
            Peer::Gatekeeper => running.start_gatekeeper(&bin, &source, cp, label, values),
        }
        .and_then(|()| running.wait_mutating(label, values, started));
        match result {
            Ok(()) => Ok(running),
            Err(e) => {
                let tail = log_tail(&running.log, 40);
                let log = running.log.clone();
                if let Err(cleanup) = running.cleanup() {
                    eprintln!("[peers] {}: cleaning up after a failed start: {cleanup:#}", self.name());
                }
                Err(e.context(format!(
                    "starting {} {} (log {}):\n{tail}",
                    self.name(),
                    self.version(),
                    log.display()
                )))
            }
        }
    }
}

/// A peer running on this host against a control plane.
pub struct RunningPeer {
    peer: Peer,
    child: Option<Child>,
    log: PathBuf,
    kubectl: Kubectl,
    /// Objects created for this run, as (resource, name, namespace): deleted by [`RunningPeer::stop`].
    objects: Vec<(String, String, Option<String>)>,
    /// A label selector of webhook configurations the peer registers itself (Kyverno): deleted after it stopped.
    webhook_selector: Option<String>,
}

impl RunningPeer {
    pub fn peer(&self) -> Peer {
        self.peer
    }

    /// The admission process(es), for RSS and CPU measurements from /proc.
    pub fn pids(&self) -> Vec<u32> {
        self.child.iter().map(Child::id).collect()
    }

    /// Where the peer's stdout and stderr go (in the control plane's work directory).
    pub fn log(&self) -> PathBuf {
        self.log.clone()
    }

    /// Removes its webhook configurations and policy objects, stops the process and checks that no webhook
    /// configuration of it is left.
    pub fn stop(mut self) -> Result<()> {
        self.cleanup()?;
        let left = self.kubectl.webhook_configurations()?;
        let ours: Vec<&String> = left.iter().filter(|n| self.is_ours(n)).collect();
        if !ours.is_empty() {
            bail!("{}: webhook configurations left after stop: {ours:?}", self.peer.name());
        }
        Ok(())
    }

    fn is_ours(&self, webhook_configuration: &str) -> bool {
        let name = webhook_configuration.rsplit('/').next().unwrap_or_default();
        name.starts_with(PREFIX) || (self.peer == Peer::Kyverno && name.starts_with("kyverno-"))
    }

    /// Deletes the policy objects and our own webhook configurations, stops the process (so that it recreates
    /// nothing), then deletes the webhook configurations it registered itself.
    fn cleanup(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        for (resource, name, namespace) in self.objects.iter().rev() {
            let mut args = vec![
                "delete",
                resource,
                name,
                "--ignore-not-found",
                "--wait=true",
                "--timeout=60s",
            ];
            if let Some(namespace) = namespace {
                args.extend(["-n", namespace]);
            }
            if let Err(e) = self.kubectl.run(&args) {
                errors.push(format!("{e:#}"));
            }
        }
        if let Some(child) = self.child.take() {
            kill(child);
        }
        if let Some(selector) = &self.webhook_selector
            && let Err(e) = self.kubectl.run(&[
                "delete",
                "mutatingwebhookconfigurations,validatingwebhookconfigurations",
                "-l",
                selector,
                "--ignore-not-found",
            ])
        {
            errors.push(format!("{e:#}"));
        }
        if !errors.is_empty() {
            bail!("{}: removing its objects: {}", self.peer.name(), errors.join("; "));
        }
        Ok(())
    }

    fn spawn(&mut self, cmd: Command) -> Result<()> {
        let child = spawn_logged(cmd, &self.log)?;
        self.child = Some(child);
        Ok(())
    }

    fn apply(&mut self, resource: &str, object: Value) -> Result<()> {
        let name = object["metadata"]["name"]
            .as_str()
            .context("object without a name")?
            .to_string();
        self.kubectl.apply(&format!("{}-{name}", self.peer.name()), &object)?;
        let namespace = object["metadata"]["namespace"].as_str().map(str::to_string);
        self.objects.push((resource.to_string(), name, namespace));
        Ok(())
    }

    /// Waits until a dry-run pod create in the probe namespace is mutated; bails when the process exits or after
    /// [`START_TIMEOUT`].
    fn wait_mutating(&mut self, label: (&str, &str), values: (i32, i32, i32), started: Instant) -> Result<()> {
        self.kubectl.apply(
            "probe-namespace",
            &json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": { "name": PROBE_NAMESPACE, "labels": { label.0: label.1 } },
            }),
        )?;
        let pod = probe_pod(PROBE_NAMESPACE, &format!("{}-probe", self.peer.name()));
        let file = self.kubectl.write(&format!("{}-probe-pod", self.peer.name()), &pod)?;
        let mut last;
        let mut said = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("{} exited with {status}", self.peer.name());
            }
            let out = self
                .kubectl
                .cmd()
                .args([
                    "create",
                    "--dry-run=server",
                    "--request-timeout=20s",
                    "-o",
                    "json",
                    "-f",
                ])
                .arg(&file)
                .output()?;
            if out.status.success() {
                let created: Value = serde_json::from_slice(&out.stdout)?;
                if carries_sysctls(&created, values) {
                    say(
                        self.peer,
                        &format!(
                            "mutating pods after {:.1} s (pid {})",
                            started.elapsed().as_secs_f64(),
                            self.pids().first().copied().unwrap_or_default()
                        ),
                    );
                    return Ok(());
                }
                last = format!(
                    "a dry-run pod came back without the sysctls: {}",
                    created["spec"]["securityContext"]
                );
            } else {
                last = String::from_utf8_lossy(&out.stderr).trim().to_string();
            }
            if started.elapsed() > START_TIMEOUT {
                bail!(
                    "no dry-run pod mutated after {} s; last: {last}",
                    START_TIMEOUT.as_secs()
                );
            }
            if said.elapsed() > Duration::from_secs(15) {
                say(
                    self.peer,
                    &format!("waiting for the webhook ({} s): {last}", started.elapsed().as_secs()),
                );
                said = Instant::now();
            }
            thread::sleep(Duration::from_millis(500));
        }
    }

    // --- Kyverno -------------------------------------------------------------------------------------------------

    /// Kyverno's admission controller out of cluster: `--serverIP` makes it register its webhooks by URL and put
    /// that IP into the serving certificate it generates itself (CA and pair in Secrets of its namespace); it
    /// registers and updates its webhook configurations itself, one webhook per policy set, with the policy's
    /// namespaceSelector merged with the one of its ConfigMap.
    fn start_kyverno(
        &mut self,
        bin: &Path,
        source: &Path,
        cp: &ControlPlane,
        label: (&str, &str),
        values: (i32, i32, i32),
    ) -> Result<()> {
        const NS: &str = "kyverno";
        self.kubectl.apply_crds(&source.join("config/crds"), true)?;
        self.kubectl.apply(
            "kyverno-namespace",
            &json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": NS } }),
        )?;
        // The release's ConfigMaps (config/install-latest-testing.yaml), less the filters of kinds the benchmark
        // never sends.
        let webhooks = json!({
            "namespaceSelector": { "matchExpressions": [
                { "key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system"] },
                { "key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [NS] },
            ]},
        });
        self.kubectl.apply(
            "kyverno-config",
            &json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": { "name": "kyverno", "namespace": NS },
                "data": {
                    "enableDefaultRegistryMutation": "true",
                    "defaultRegistry": "docker.io",
                    "generateSuccessEvents": "false",
                    "excludeGroups": "system:nodes",
                    "resourceFilters": "[*/*,kyverno,*] [Event,*,*] [*/*,kube-system,*] [*/*,kube-public,*] \
                        [*/*,kube-node-lease,*] [Node,*,*] [Node/?*,*,*] [APIService,*,*] [APIService/?*,*,*] \
                        [TokenReview,*,*] [SubjectAccessReview,*,*] [SelfSubjectAccessReview,*,*] [Binding,*,*] \
                        [Pod/binding,*,*] [ReplicaSet,*,*] [ReplicaSet/?*,*,*] [EphemeralReport,*,*] \
                        [ClusterEphemeralReport,*,*]",
                    "updateRequestThreshold": "1000",
                    "webhooks": webhooks.to_string(),
                    "webhookAnnotations": "{\"admissions.enforcer/disabled\":\"true\"}",
                },
            }),
        )?;
        self.kubectl.apply(
            "kyverno-metrics-config",
            &json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": { "name": "kyverno-metrics", "namespace": NS },
                "data": {
                    "namespaces": "{\"exclude\":[],\"include\":[]}",
                    "bucketBoundaries": "0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 20, 25, 30",
                },
            }),
        )?;
        self.apply("mutatingpolicies.policies.kyverno.io", kyverno_policy(label, values))?;

        let port = free_port()?;
        let metrics_port = free_port()?;
        let runtime_metrics_port = free_port()?;
        let mut cmd = Command::new(bin);
        cmd.args(kyverno_args(cp.kubeconfig(), port, metrics_port, runtime_metrics_port))
            .env("KYVERNO_NAMESPACE", NS)
            .env("KYVERNO_SERVICEACCOUNT_NAME", "kyverno-admission-controller")
            .env("KYVERNO_DEPLOYMENT", "kyverno-admission-controller")
            .env("KYVERNO_POD_NAME", "kyverno-admission-controller-local")
            .env("KYVERNO_SVC", "kyverno-svc")
            .env("INIT_CONFIG", "kyverno")
            .env("METRICS_CONFIG", "kyverno-metrics")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBECONFIG");
        self.webhook_selector = Some("webhook.kyverno.io/managed-by=kyverno".into());
        self.spawn(cmd)
    }

    // --- Gatekeeper ----------------------------------------------------------------------------------------------

    /// Gatekeeper's manager with only the mutation webhook operation (no validation webhook, no audit, no status
    /// writers), certificate rotation off and a serving certificate of our own; we register its
    /// MutatingWebhookConfiguration by URL ourselves, with three Assign mutators.
    fn start_gatekeeper(
        &mut self,
        bin: &Path,
        source: &Path,
        cp: &ControlPlane,
        label: (&str, &str),
        values: (i32, i32, i32),
    ) -> Result<()> {
        const NS: &str = "gatekeeper-system";
        // The release manifest's CRDs (manifest_staging/deploy/gatekeeper.yaml is the kustomized bundle).
        let manifest = source.join("manifest_staging/deploy/gatekeeper.yaml");
        let manifest = fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
        let crds = crd_documents(&manifest);
        if crds.is_empty() {
            bail!("no CustomResourceDefinition in Gatekeeper's release manifest");
        }
        let crd_file = cp.work_dir().join("gatekeeper-crds.yaml");
        fs::write(&crd_file, crds.join("\n---\n"))?;
        self.kubectl.apply_crds(&crd_file, false)?;
        self.kubectl.apply(
            "gatekeeper-namespace",
            &json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": NS } }),
        )?;
        // Gatekeeper reads its own Pod (POD_NAME) to own the MutatorPodStatus objects it writes per mutator: a Pod
        // object stands in for it (no kubelet runs it; it stays Pending). The alternative, `--debug-use-fake-pod`,
        // is a debug flag.
        self.apply(
            "pods",
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": GATEKEEPER_POD, "namespace": NS },
                "spec": {
                    "automountServiceAccountToken": false,
                    "containers": [{ "name": "manager", "image": "registry.invalid/gatekeeper:local" }],
                },
            }),
        )?;
        for (sysctl, value) in SYSCTLS.iter().zip([values.0, values.1, values.2]) {
            self.apply(
                "assign.mutations.gatekeeper.sh",
                gatekeeper_assign(sysctl, value, label),
            )?;
        }

        let cert_dir = cp.work_dir().join("gatekeeper-certs");
        let ca = write_serving_cert(&cert_dir)?;
        let port = free_port()?;
        let health_port = free_port()?;
        let mut cmd = Command::new(bin);
        cmd.args(gatekeeper_args(&cert_dir, port, health_port))
            .env("KUBECONFIG", cp.kubeconfig())
            .env("POD_NAMESPACE", NS)
            .env("POD_NAME", GATEKEEPER_POD)
            .env("CONTAINER_NAME", "manager")
            .env_remove("KUBERNETES_SERVICE_HOST");
        self.spawn(cmd)?;
        self.apply(
            "mutatingwebhookconfigurations",
            gatekeeper_webhook(&format!("https://127.0.0.1:{port}/v1/mutate"), &ca, label),
        )
    }
}

impl Drop for RunningPeer {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            kill(child);
        }
    }
}

// --- the peers' configuration ------------------------------------------------------------------------------------

/// The admission controller's flags: the release manifest's (config/install-latest-testing.yaml), with ports and
/// addresses of this host, webhooks by URL (`--serverIP`), and admission reports off (no reports controller runs
/// here to consume them; this operator writes none on admission either).
fn kyverno_args(kubeconfig: &Path, port: u16, metrics_port: u16, runtime_metrics_port: u16) -> Vec<String> {
    let mut args = vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--serverIP=127.0.0.1:{port}"),
        "--webhookServerHost=127.0.0.1".into(),
        format!("--webhookServerPort={port}"),
        format!("--servicePort={port}"),
        "--metricsHost=127.0.0.1".into(),
        format!("--metricsPort={metrics_port}"),
        format!("--controllerRuntimeMetricsAddress=127.0.0.1:{runtime_metrics_port}"),
        "--admissionReports=false".into(),
    ];
    args.extend(
        [
            "--caSecretName=kyverno-svc.kyverno.svc.kyverno-tls-ca",
            "--tlsSecretName=kyverno-svc.kyverno.svc.kyverno-tls-pair",
            "--tlsKeyAlgorithm=RSA",
            "--backgroundServiceAccountName=system:serviceaccount:kyverno:kyverno-background-controller",
            "--reportsServiceAccountName=system:serviceaccount:kyverno:kyverno-reports-controller",
            "--resyncPeriod=15m",
            "--crdWatcher=false",
            "--disableMetrics=false",
            "--otelConfig=prometheus",
            "--maxAdmissionReports=1000",
            "--autoUpdateWebhooks=true",
            "--excludeBootstrapResources=false",
            "--enableConfigMapCaching=true",
            "--enableDeferredLoading=true",
            "--dumpPayload=false",
            "--forceFailurePolicyIgnore=false",
            "--generateValidatingAdmissionPolicy=false",
            "--generateMutatingAdmissionPolicy=false",
            "--dumpPatches=false",
            "--maxAPICallResponseLength=2000000",
            "--apiCallTimeout=30s",
            "--maxGlobalContextEntries=0",
            "--loggingFormat=text",
            "--v=2",
            "--omitEvents=PolicyApplied,PolicySkipped",
            "--enablePolicyException=false",
            "--protectManagedResources=false",
            "--allowInsecureRegistry=false",
            "--enableReporting=validate,mutate,mutateExisting,imageVerify,generate",
        ]
        .map(String::from),
    );
    args
}

/// A CEL MutatingPolicy (the kind Kyverno's published load test used), evaluated by Kyverno's webhook: a JSON
/// patch that replaces the keepalive sysctls of a pod and keeps its others.
fn kyverno_policy(label: (&str, &str), values: (i32, i32, i32)) -> Value {
    let names = SYSCTLS.map(|s| format!("{s:?}")).join(", ");
    let want = SYSCTLS
        .iter()
        .zip([values.0, values.1, values.2])
        .map(|(s, v)| format!("{{\"name\": {s:?}, \"value\": \"{v}\"}}"))
        .collect::<Vec<_>>()
        .join(", ");
    let expression = format!(
        "has(object.spec.securityContext) \
         ? [JSONPatch{{op: \"add\", path: \"/spec/securityContext/sysctls\", value: \
            (has(object.spec.securityContext.sysctls) \
             ? object.spec.securityContext.sysctls.filter(s, !(s.name in [{names}])).map(s, {{\"name\": s.name, \"value\": s.value}}) \
             : []) + [{want}]}}] \
         : [JSONPatch{{op: \"add\", path: \"/spec/securityContext\", value: {{\"sysctls\": [{want}]}}}}]"
    );
    json!({
        "apiVersion": "policies.kyverno.io/v1beta1",
        "kind": "MutatingPolicy",
        "metadata": { "name": format!("{PREFIX}-sysctls") },
        "spec": {
            "failurePolicy": "Fail",
            "evaluation": { "admission": { "enabled": true }, "background": { "enabled": false } },
            "autogen": { "podControllers": { "controllers": [] } },
            "matchConstraints": {
                "resourceRules": [{
                    "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"],
                }],
                "namespaceSelector": { "matchLabels": { label.0: label.1 } },
            },
            "mutations": [{ "patchType": "JSONPatch", "jsonPatch": { "expression": expression } }],
        },
    })
}

/// The webhook Deployment's flags of the release manifest, with only the `mutation-webhook` operation (the
/// release's webhook pods also run `webhook`, the validating webhook the benchmark does not need; audit, status
/// and generate run in the audit pod), our certificate, and ports of this host.
fn gatekeeper_args(cert_dir: &Path, port: u16, health_port: u16) -> Vec<String> {
    vec![
        format!("--port={port}"),
        "--host=127.0.0.1".into(),
        format!("--cert-dir={}", cert_dir.display()),
        "--disable-cert-rotation".into(),
        format!("--health-addr=127.0.0.1:{health_port}"),
        "--metrics-addr=0".into(),
        "--logtostderr".into(),
        "--exempt-namespace=gatekeeper-system".into(),
        "--operation=mutation-webhook".into(),
        "--disable-opa-builtin={http.send}".into(),
    ]
}

/// One Assign per sysctl: a list element keyed by name, replaced whole (or appended), the others kept.
fn gatekeeper_assign(sysctl: &str, value: i32, label: (&str, &str)) -> Value {
    let short = sysctl.rsplit('.').next().unwrap_or(sysctl).replace('_', "-");
    json!({
        "apiVersion": "mutations.gatekeeper.sh/v1",
        "kind": "Assign",
        "metadata": { "name": format!("{PREFIX}-{short}") },
        "spec": {
            "applyTo": [{ "groups": [""], "kinds": ["Pod"], "versions": ["v1"] }],
            "match": {
                "scope": "Namespaced",
                "kinds": [{ "apiGroups": [""], "kinds": ["Pod"] }],
                "namespaceSelector": { "matchLabels": { label.0: label.1 } },
            },
            "location": format!("spec.securityContext.sysctls[name: \"{sysctl}\"]"),
            "parameters": { "assign": { "value": { "name": sysctl, "value": value.to_string() } } },
        },
    })
}

/// Gatekeeper's release MutatingWebhookConfiguration narrowed to pod creates in labelled namespaces, failurePolicy
/// Fail (the release's is Ignore) and a 10 s timeout (the release's 1 s would fail creates on a loaded 2-core host;
/// Kyverno's default is 10 s).
fn gatekeeper_webhook(url: &str, ca_pem: &str, label: (&str, &str)) -> Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": format!("{PREFIX}-gatekeeper"), "labels": { "gatekeeper.sh/system": "yes" } },
        "webhooks": [{
            "name": "mutation.gatekeeper.sh",
            "admissionReviewVersions": ["v1", "v1beta1"],
            "clientConfig": {
                "url": url,
                "caBundle": base64::engine::general_purpose::STANDARD.encode(ca_pem),
            },
            "failurePolicy": "Fail",
            "matchPolicy": "Exact",
            "namespaceSelector": { "matchLabels": { label.0: label.1 } },
            "rules": [{ "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"] }],
            "sideEffects": "None",
            "timeoutSeconds": 10,
            "reinvocationPolicy": "Never",
        }],
    })
}

// --- helpers -----------------------------------------------------------------------------------------------------

/// The wrapper module that builds `peer` from its module: the upstream go.mod's `go` line and `replace` directives.
fn wrapper_go_mod(peer: Peer, upstream: &str) -> Result<String> {
    let go_line = upstream
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("go "))
        .context("the peer's go.mod has no go line")?;
    let replaces = replace_directives(upstream);
    if let Some(local) = replaces.iter().find(|r| {
        let target = r.split("=>").nth(1).unwrap_or_default().trim();
        target.starts_with('.') || target.starts_with('/')
    }) {
        bail!("the peer's go.mod replaces a module with a local directory, which a wrapper cannot repeat: {local}");
    }
    let mut text = format!(
        "// Generated by `cargo xtask peers`: builds {} from its module.\nmodule keepalive-operator/peers/{}\n\n\
         {go_line}\n\ntool {}\n\nrequire {} {}\n",
        peer.package(),
        peer.name(),
        peer.package(),
        peer.module(),
        peer.version()
    );
    for r in &replaces {
        text.push_str(&format!("\nreplace {r}\n"));
    }
    Ok(text)
}

/// The `replace` directives of a go.mod, one per entry (`old [version] => new [version]`), comments dropped.
fn replace_directives(go_mod: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    for line in go_mod.lines() {
        let line = line.split("//").next().unwrap_or_default().trim();
        if in_block {
            if line == ")" {
                in_block = false;
            } else if !line.is_empty() {
                out.push(line.to_string());
            }
        } else if line == "replace (" || line == "replace(" {
            in_block = true;
        } else if let Some(r) = line.strip_prefix("replace ") {
            out.push(r.trim().to_string());
        }
    }
    out
}

/// The documents of a multi-document YAML text whose top-level kind is CustomResourceDefinition.
fn crd_documents(yaml: &str) -> Vec<&str> {
    yaml.split("\n---")
        .filter(|doc| doc.lines().any(|l| l.trim_end() == "kind: CustomResourceDefinition"))
        .map(|doc| doc.trim_start_matches('\n'))
        .collect()
}

/// Whether a pod as returned by the apiserver carries the three keepalive sysctls with `values`.
pub fn carries_sysctls(pod: &Value, values: (i32, i32, i32)) -> bool {
    let sysctls = pod["spec"]["securityContext"]["sysctls"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    SYSCTLS.iter().zip([values.0, values.1, values.2]).all(|(name, value)| {
        sysctls
            .iter()
            .any(|s| s["name"] == *name && s["value"].as_str() == Some(value.to_string().as_str()))
    })
}

/// The peer's process' resident set (VmRSS) and its peak (VmHWM), in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// A pod like the benchmark's: one container, no node, an unrelated sysctl of its own that must be kept.
fn probe_pod(namespace: &str, name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace },
        "spec": {
            "securityContext": { "sysctls": [{ "name": "kernel.shm_rmid_forced", "value": "1" }] },
            "containers": [{ "name": "app", "image": "registry.invalid/app:1" }],
        },
    })
}

/// Writes a throwaway CA and a serving certificate for 127.0.0.1 (`tls.crt`, `tls.key`) into `dir`; returns the CA.
fn write_serving_cert(dir: &Path) -> Result<String> {
    fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "keepalive-operator peers CA");
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_pem = ca_params.self_signed(&ca_key)?.pem();
    let ca = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "127.0.0.1");
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    fs::write(dir.join("tls.crt"), params.signed_by(&key, &ca)?.pem())?;
    fs::write(dir.join("tls.key"), key.serialize_pem())?;
    fs::write(dir.join("ca.crt"), &ca_pem)?;
    Ok(ca_pem)
}

/// kubectl of a control plane, kept by path so a [`RunningPeer`] can clean up without the control plane at hand.
struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
    work: PathBuf,
}

impl Kubectl {
    fn of(cp: &ControlPlane) -> Self {
        Kubectl {
            bin: cp.bin_dir().join("kubectl"),
            kubeconfig: cp.kubeconfig().to_path_buf(),
            work: cp.work_dir().join("peers"),
        }
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST");
        cmd
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.cmd().args(args).output().context("running kubectl")?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    fn write(&self, name: &str, object: &Value) -> Result<PathBuf> {
        fs::create_dir_all(&self.work)?;
        let file = self.work.join(format!("{name}.json"));
        fs::write(&file, serde_json::to_string_pretty(object)?)?;
        Ok(file)
    }

    fn apply(&self, name: &str, object: &Value) -> Result<()> {
        let file = self.write(name, object)?;
        self.run(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            file.to_str().context("path")?,
        ])?;
        Ok(())
    }

    /// Applies CRDs (a file, or a directory, recursively) and waits until they are Established.
    fn apply_crds(&self, path: &Path, recursive: bool) -> Result<()> {
        let path = path.to_str().context("path")?;
        let mut apply = vec!["apply", "--server-side", "--force-conflicts", "-f", path];
        let mut wait = vec!["wait", "--for=condition=Established", "--timeout=120s", "-f", path];
        if recursive {
            apply.push("-R");
            wait.push("-R");
        }
        self.run(&apply)?;
        self.run(&wait)?;
        Ok(())
    }

    /// Names (`kind/name`) of every mutating and validating webhook configuration.
    fn webhook_configurations(&self) -> Result<Vec<String>> {
        Ok(self
            .run(&[
                "get",
                "mutatingwebhookconfigurations,validatingwebhookconfigurations",
                "-o",
                "name",
            ])?
            .lines()
            .map(str::to_string)
            .collect())
    }
}

/// The Go toolchain: `go` of PATH, else the machine's /usr/local/go; cgo off, no VCS stamping (as hack/tools.sh).
fn go() -> Command {
    let local = Path::new("/usr/local/go/bin/go");
    let in_path = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("go").is_file()));
    let mut cmd = Command::new(if in_path || !local.is_file() {
        Path::new("go")
    } else {
        local
    });
    cmd.env("CGO_ENABLED", "0");
    if std::env::var_os("GOFLAGS").is_none() {
        cmd.env("GOFLAGS", "-buildvcs=false");
    }
    cmd
}

/// The same command at the lowest CPU priority (`nice -n 19`).
fn nice(cmd: &mut Command) -> Command {
    let mut niced = Command::new("nice");
    niced.args(["-n", "19"]).arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => niced.env(k, v),
            None => niced.env_remove(k),
        };
    }
    niced
}

fn w_str(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

fn say(peer: Peer, what: &str) {
    eprintln!("[peers] {}: {what}", peer.name());
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// --- `cargo xtask peers` ---------------------------------------------------------------------------------------

/// Builds the named peers (all when none is named), then for each, on a fresh control plane: starts it, creates 20
/// pods in a labelled namespace and checks each carries the sysctls (and keeps its own), prints the peer's RSS,
/// stops it and checks its webhook configurations are gone and pods are created unmutated again. A peer that
/// cannot be built or run is reported with the reason; the others still run.
pub fn smoke(names: &[String]) -> Result<()> {
    let peers: Vec<Peer> = if names.is_empty() {
        Peer::ALL.to_vec()
    } else {
        names
            .iter()
            .map(|n| Peer::from_name(n).with_context(|| format!("unknown peer '{n}' (kyverno, gatekeeper)")))
            .collect::<Result<_>>()?
    };
    let mut failed = Vec::new();
    let mut built = Vec::new();
    for peer in &peers {
        eprintln!("\n==> Building {} {}", peer.name(), peer.version());
        let start = Instant::now();
        match peer.build() {
            Ok(bin) => {
                println!(
                    "{} {}: {} (ready in {:.0} s)",
                    peer.name(),
                    peer.version(),
                    bin.display(),
                    start.elapsed().as_secs_f64()
                );
                built.push(*peer);
            }
            Err(e) => {
                println!("{} {}: cannot be built here: {e:#}", peer.name(), peer.version());
                failed.push(format!("{}: build: {e:#}", peer.name()));
            }
        }
    }
    for peer in built {
        eprintln!(
            "\n==> Running {} {} on a fresh control plane",
            peer.name(),
            peer.version()
        );
        match smoke_one(peer) {
            Ok(()) => println!("{}: ok", peer.name()),
            Err(e) => {
                println!("{}: cannot be run here: {e:#}", peer.name());
                failed.push(format!("{}: run: {e:#}", peer.name()));
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} peers failed:\n{}",
            failed.len(),
            peers.len(),
            failed.join("\n")
        );
    }
    Ok(())
}

fn smoke_one(peer: Peer) -> Result<()> {
    const LABEL: (&str, &str) = ("keepalive.dev/bench", "peer");
    const VALUES: (i32, i32, i32) = (60, 10, 5);
    const NS: &str = "keepalive-peer-smoke";
    const PODS: usize = 20;
    let cp = ControlPlane::start()?;
    let kubectl = Kubectl::of(&cp);
    kubectl.apply(
        "smoke-namespace",
        &json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": { "name": NS, "labels": { LABEL.0: LABEL.1 } },
        }),
    )?;
    let start = Instant::now();
    let running = peer.start(&cp, LABEL, VALUES)?;
    let startup = start.elapsed();
    let pid = running.pids()[0];
    let before = rss_kib(pid);

    // Half the pods bring a sysctl of their own, a quarter a stale keepalive value: both must come out right.
    let items: Vec<Value> = (0..PODS)
        .map(|i| {
            let mut pod = probe_pod(NS, &format!("pod-{i}"));
            match i % 4 {
                0 | 1 => {}
                2 => pod["spec"]["securityContext"] = json!({}),
                _ => {
                    pod["spec"]["securityContext"]["sysctls"]
                        .as_array_mut()
                        .expect("sysctls")
                        .push(json!({ "name": SYSCTLS[0], "value": "7200" }));
                }
            }
            pod
        })
        .collect();
    let list = kubectl.write(
        "smoke-pods",
        &json!({ "apiVersion": "v1", "kind": "List", "items": items }),
    )?;
    let created_at = Instant::now();
    let created = kubectl
        .run(&["create", "-o", "json", "-f", list.to_str().context("path")?])
        .and_then(|out| {
            // One JSON document per created object.
            serde_json::Deserializer::from_str(&out)
                .into_iter::<Value>()
                .collect::<Result<Vec<Value>, _>>()
                .context("reading kubectl's answer")
        });
    let elapsed = created_at.elapsed();
    let pods = match created {
        Ok(pods) => pods,
        Err(e) => {
            let log = running.log();
            let _ = running.stop();
            return Err(e.context(format!("creating {PODS} pods (log {})", log.display())));
        }
    };
    let bad: Vec<String> = pods
        .iter()
        .filter(|p| {
            let own_kept = p["metadata"]["name"]
                .as_str()
                .and_then(|n| n.strip_prefix("pod-"))
                .and_then(|i| i.parse::<usize>().ok())
                .is_none_or(|i| {
                    i % 4 == 2
                        || p["spec"]["securityContext"]["sysctls"]
                            .as_array()
                            .is_some_and(|s| s.iter().any(|s| s["name"] == "kernel.shm_rmid_forced"))
                });
            !carries_sysctls(p, VALUES) || !own_kept
        })
        .map(|p| format!("{}: {}", p["metadata"]["name"], p["spec"]["securityContext"]))
        .collect();
    let after = rss_kib(pid);
    let log = running.log();
    // What the apiserver calls for pods, as registered (by us or by the peer), and what the peer logged as errors.
    for webhook in kubectl
        .run(&["get", "mutatingwebhookconfigurations", "-o", "json"])
        .ok()
        .and_then(|out| serde_json::from_str::<Value>(&out).ok())
        .and_then(|list| list["items"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .flat_map(|c| c["webhooks"].as_array().cloned().unwrap_or_default())
        .filter(|w| w["rules"].to_string().contains("\"pods\""))
    {
        println!(
            "  webhook {}: {} failurePolicy {} timeout {} s, namespaceSelector {}, rules {}",
            w_str(&webhook["name"]),
            w_str(&webhook["clientConfig"]["url"]),
            w_str(&webhook["failurePolicy"]),
            webhook["timeoutSeconds"],
            webhook["namespaceSelector"],
            webhook["rules"],
        );
    }
    let log_text = fs::read_to_string(&log).unwrap_or_default();
    let errors: Vec<String> = log_text
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("\"level\":\"error\"") || l.starts_with('E'))
        .map(|l| l.chars().take(300).collect())
        .collect();
    println!(
        "  its log: {} lines, {} of them errors{}",
        log_text.lines().count(),
        errors.len(),
        if errors.is_empty() { "" } else { ", first:" }
    );
    for line in errors.iter().take(5) {
        println!("    {line}");
    }
    running.stop()?;
    if pods.len() != PODS || !bad.is_empty() {
        bail!(
            "{} of {PODS} pods created, {} not as expected (log {}):\n{}",
            pods.len(),
            bad.len(),
            log.display(),
            bad.join("\n")
        );
    }
    let left = kubectl.webhook_configurations()?;
    if !left.is_empty() {
        bail!("webhook configurations left after stop: {left:?}");
    }
    let after_stop = kubectl.run(&[
        "create",
        "--dry-run=server",
        "-o",
        "json",
        "-f",
        kubectl
            .write("smoke-after", &probe_pod(NS, "after-stop"))?
            .to_str()
            .context("path")?,
    ])?;
    if carries_sysctls(&serde_json::from_str(&after_stop)?, VALUES) {
        bail!("a pod created after stop was still mutated");
    }
    let mib = |kib: Option<(u64, u64)>, peak: bool| {
        kib.map(|(rss, hwm)| format!("{:.1} MiB", (if peak { hwm } else { rss }) as f64 / 1024.0))
            .unwrap_or_else(|| "?".into())
    };
    println!(
        "{} {}: started and mutating in {:.1} s; {PODS} pods created in {:.2} s, all with {}={}, {}={}, {}={} and \
         their own sysctls kept; RSS {} before the pods, {} after (peak {}); stopped, no webhook configuration left",
        peer.name(),
        peer.version(),
        startup.as_secs_f64(),
        elapsed.as_secs_f64(),
        SYSCTLS[0],
        VALUES.0,
        SYSCTLS[1],
        VALUES.1,
        SYSCTLS[2],
        VALUES.2,
        mib(before, false),
        mib(after, false),
        mib(after, true),
    );
    // A benchmark interleaves configurations: the same peer again on the same control plane.
    let again = Instant::now();
    let running = peer.start(&cp, LABEL, VALUES)?;
    let restart = again.elapsed();
    running.stop()?;
    let left = kubectl.webhook_configurations()?;
    if !left.is_empty() {
        bail!("webhook configurations left after the second stop: {left:?}");
    }
    println!(
        "{}: started again on the same control plane and mutating in {:.1} s; stopped again, nothing left",
        peer.name(),
        restart.as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_directives_are_read_from_lines_and_blocks() {
        let go_mod = "module x\n\ngo 1.26.6\n\nrequire a v1\n\nreplace k8s.io/pod-security-admission => \
                      github.com/kyverno/pod-security-admission v0.0.0-1 // pinned\n\nreplace (\n\tb => c v2\n\t// note\n\
                      \td v1 => e v3\n)\n";
        assert_eq!(
            replace_directives(go_mod),
            [
                "k8s.io/pod-security-admission => github.com/kyverno/pod-security-admission v0.0.0-1",
                "b => c v2",
                "d v1 => e v3"
            ]
        );
    }

    #[test]
    fn wrapper_repeats_the_go_line_and_replaces_and_refuses_local_ones() {
        let upstream = "module github.com/kyverno/kyverno\n\ngo 1.26.6\n\nreplace a => b v1\n";
        let wrapper = wrapper_go_mod(Peer::Kyverno, upstream).unwrap();
        assert!(wrapper.contains("\ngo 1.26.6\n"));
        assert!(wrapper.contains("\ntool github.com/kyverno/kyverno/cmd/kyverno\n"));
        assert!(wrapper.contains("\nrequire github.com/kyverno/kyverno v1.19.1\n"));
        assert!(wrapper.contains("\nreplace a => b v1\n"));
        assert!(wrapper_go_mod(Peer::Kyverno, "go 1.26\nreplace a => ./a\n").is_err());
    }

    #[test]
    fn only_crd_documents_are_kept() {
        let yaml = "apiVersion: v1\nkind: Namespace\n---\napiVersion: apiextensions.k8s.io/v1\nkind: \
                    CustomResourceDefinition\nmetadata:\n  name: a\n---\nkind: Deployment\nspec:\n  kind: \
                    CustomResourceDefinition\n";
        let docs = crd_documents(yaml);
        assert_eq!(docs.len(), 1);
        assert!(docs[0].contains("name: a"));
    }

    #[test]
    fn a_pod_carries_the_sysctls_only_with_all_three_values() {
        let pod = |v: &str| {
            json!({ "spec": { "securityContext": { "sysctls": [
                { "name": "net.ipv4.tcp_keepalive_time", "value": v },
                { "name": "net.ipv4.tcp_keepalive_intvl", "value": "10" },
                { "name": "net.ipv4.tcp_keepalive_probes", "value": "5" },
            ]}}})
        };
        assert!(carries_sysctls(&pod("60"), (60, 10, 5)));
        assert!(!carries_sysctls(&pod("7200"), (60, 10, 5)));
        assert!(!carries_sysctls(&json!({ "spec": {} }), (60, 10, 5)));
    }
}
