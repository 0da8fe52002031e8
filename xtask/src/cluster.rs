//! A real local control plane: etcd + kube-apiserver on loopback, for tests and the demo.
//!
//! The recipe is envtest's: random free ports, secure serving with a throwaway CA, an admin client
//! certificate (`system:masters`), RBAC authorization, service-account signing keys, and the ServiceAccount
//! admission plugin off because no controller-manager runs. Child processes die with the process that started
//! them (PR_SET_PDEATHSIG from a spawner thread that lives as long as the process), are killed when a
//! [`ControlPlane`] is dropped, and the shared instance is stopped by an `atexit` hook.

use std::{
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, OnceLock, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::tools;

/// A running etcd + kube-apiserver. Dropping it stops both and removes their data.
pub struct ControlPlane {
    dir: tempfile::TempDir,
    bin: PathBuf,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    etcd_port: u16,
    etcd_peer_port: u16,
    apiserver_port: u16,
    kubeconfig: PathBuf,
}

/// The shared control plane of this process, started on first use. Tests that share it keep their objects apart
/// by name (their own namespaces, policy names with the test's prefix).
pub fn shared() -> &'static ControlPlane {
    static SHARED: OnceLock<ControlPlane> = OnceLock::new();
    SHARED.get_or_init(|| {
        let cp = ControlPlane::start().unwrap_or_else(|e| panic!("starting the local control plane: {e:#}"));
        register_exit_cleanup(cp.dir.path());
        cp
    })
}

impl ControlPlane {
    /// Builds the binaries if needed (see `hack/tools.sh`) and starts etcd and kube-apiserver.
    ///
    /// Ports are picked free and bound by etcd and the apiserver a moment later, so another process (another
    /// test starting its own control plane) can take one in between: a start that fails is tried again, twice,
    /// with new ports.
    pub fn start() -> Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::start_once() {
                Ok(cp) => return Ok(cp),
                Err(e) if attempt < 3 => {
                    eprintln!("[cluster] starting the control plane failed (attempt {attempt}), again: {e:#}");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn start_once() -> Result<Self> {
        let bin = tools::bin_dir()?;
        let dir = tempfile::Builder::new().prefix("keepalive-cp-").tempdir()?;
        write_pki(dir.path())?;
        let mut cp = ControlPlane {
            kubeconfig: dir.path().join("kubeconfig"),
            dir,
            bin,
            etcd: None,
            apiserver: None,
            etcd_port: free_port()?,
            etcd_peer_port: free_port()?,
            apiserver_port: free_port()?,
        };
        cp.write_kubeconfig()?;
        cp.start_etcd()?;
        cp.start_apiserver()?;
        Ok(cp)
    }

    /// Path of an admin kubeconfig for this control plane.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>` of the apiserver.
    pub fn server(&self) -> String {
        format!("https://127.0.0.1:{}", self.apiserver_port)
    }

    /// PEM of the CA that signed the apiserver's serving certificate and the admin client certificate.
    pub fn ca_pem(&self) -> Result<String> {
        Ok(fs::read_to_string(self.dir.path().join("ca.crt"))?)
    }

    /// Directory of the binaries (kubectl, helm, ...) this control plane was started from.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// A scratch directory that lives as long as the control plane.
    pub fn work_dir(&self) -> &Path {
        self.dir.path()
    }

    /// An admin client.
    pub async fn client(&self) -> Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// The real kubectl with this control plane's kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("kubectl"));
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST");
        cmd
    }

    /// The real helm with this control plane's kubeconfig, and cache and config directories of its own.
    pub fn helm(&self) -> Command {
        let home = self.work_dir().join("helm");
        let mut cmd = Command::new(self.bin.join("helm"));
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .env_remove("KUBERNETES_SERVICE_HOST");
        cmd
    }

    /// A kubeconfig for a ServiceAccount: a one-hour token from the TokenRequest API (`kubectl create token`),
    /// written next to the admin kubeconfig. Processes run with it have exactly the SA's permissions.
    pub fn service_account_kubeconfig(&self, namespace: &str, service_account: &str) -> Result<PathBuf> {
        let token = self.kubectl_output(&["create", "token", service_account, "-n", namespace, "--duration=1h"])?;
        self.token_kubeconfig(service_account, token.trim())
    }

    /// A one-hour token of `service_account` as kubelet gives it to a pod on `node`: the Node object (created if
    /// missing; no kubelet stands behind it) and the pod `pod` running as the ServiceAccount, bound to the node
    /// as the scheduler would bind it (created if missing), then a TokenRequest bound to the pod (`boundObjectRef`
    /// kind Pod, name and UID). The apiserver puts the node's name into the token and into the user info extra
    /// `authentication.kubernetes.io/node-name` of every request made with it, which the chart's policy for the
    /// node agent requires.
    pub fn pod_bound_token(&self, namespace: &str, service_account: &str, pod: &str, node: &str) -> Result<String> {
        let node_object = format!(r#"{{"apiVersion": "v1", "kind": "Node", "metadata": {{"name": "{node}"}}}}"#);
        self.apply_json(&format!("node-{node}"), &node_object)?;
        let pod_object = format!(
            r#"{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "{pod}", "namespace": "{namespace}"}},
                "spec": {{"serviceAccountName": "{service_account}", "nodeName": "{node}",
                          "automountServiceAccountToken": false,
                          "containers": [{{"name": "agent", "image": "registry.invalid/agent:1"}}]}}}}"#
        );
        let stored: serde_json::Value =
            serde_json::from_str(&self.apply_json(&format!("pod-{namespace}-{pod}"), &pod_object)?)?;
        let uid = stored["metadata"]["uid"].as_str().context("the pod's uid")?;
        let token = self.kubectl_output(&[
            "create",
            "token",
            service_account,
            "-n",
            namespace,
            "--bound-object-kind=Pod",
            &format!("--bound-object-name={pod}"),
            &format!("--bound-object-uid={uid}"),
            "--duration=1h",
        ])?;
        Ok(token.trim().to_string())
    }

    /// `kubectl apply --server-side` of one object given as JSON text (written to `<name>.json` in the work
    /// directory); the object as stored, as JSON text.
    pub fn apply_json(&self, name: &str, object: &str) -> Result<String> {
        let file = self.work_dir().join(format!("{name}.json"));
        fs::write(&file, object)?;
        self.kubectl_output(&["apply", "--server-side", "-o", "json", "-f", file.to_str().unwrap()])
    }

    /// Writes a kubeconfig for this control plane that authenticates with `token`.
    pub fn token_kubeconfig(&self, name: &str, token: &str) -> Result<PathBuf> {
        let ca = base64::engine::general_purpose::STANDARD.encode(self.ca_pem()?);
        let path = self.work_dir().join(format!("kubeconfig-{name}"));
        fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    \
                 certificate-authority-data: {ca}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n\
                 - name: local\n  context:\n    cluster: local\n    user: {name}\ncurrent-context: local\n",
                server = self.server(),
            ),
        )?;
        Ok(path)
    }

    /// The container args of an installed workload (`deployment`, `daemonset`), with `overrides` (flag, value)
    /// replacing the workload's value of a flag or appended when it does not set it: to run what the chart runs,
    /// as a process on this host.
    pub fn container_args(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        overrides: &[(&str, String)],
    ) -> Result<Vec<String>> {
        let args = self.kubectl_output(&[
            "get",
            kind,
            name,
            "-n",
            namespace,
            "-o",
            "jsonpath={.spec.template.spec.containers[0].args}",
        ])?;
        let mut args: Vec<String> = serde_json::from_str(&args)?;
        for (flag, value) in overrides {
            let arg = format!("{flag}={value}");
            match args.iter_mut().find(|a| a.starts_with(&format!("{flag}="))) {
                Some(a) => *a = arg,
                None => args.push(arg),
            }
        }
        Ok(args)
    }

    /// Runs kubectl and returns its stdout; fails with its stderr when it exits non-zero.
    pub fn kubectl_output(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl().args(args).output()?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Applies the committed CRDs (`crds/` of the repository) and waits until they are Established.
    pub fn install_crds(&self) -> Result<()> {
        let crds = tools::repo_root().join("crds");
        self.kubectl_output(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            crds.to_str().unwrap(),
        ])?;
        self.kubectl_output(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "-f",
            crds.to_str().unwrap(),
        ])?;
        Ok(())
    }

    /// Stops kube-apiserver (etcd keeps the data), e.g. to prove a client reconnects.
    pub fn stop_apiserver(&mut self) {
        if let Some(child) = self.apiserver.take() {
            kill(child);
        }
    }

    /// Starts kube-apiserver on the same port and waits until it is ready.
    pub fn start_apiserver(&mut self) -> Result<()> {
        let d = self.dir.path();
        let p = |f: &str| d.join(f).to_string_lossy().into_owned();
        let mut cmd = Command::new(self.bin.join("kube-apiserver"));
        cmd.args([
            format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            // No `kubernetes` Service endpoints: nothing runs in a pod here, and 1.37 refuses to publish a loopback
            // address through the endpoint reconciler.
            "--endpoint-reconciler-type=none".into(),
            format!("--secure-port={}", self.apiserver_port),
            format!("--cert-dir={}", p("apiserver-certs")),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--authorization-mode=RBAC".into(),
            "--disable-admission-plugins=ServiceAccount".into(),
            "--allow-privileged=true".into(),
            "--enable-priority-and-fairness=false".into(),
            // Without priority and fairness these caps apply; the defaults (200 mutating) turn 200 concurrent pod
            // creators (bench-admission) into 429s. A test control plane has no other tenants to protect.
            "--max-mutating-requests-inflight=1000".into(),
            "--max-requests-inflight=2000".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ]);
        let child = spawn_logged(cmd, &d.join("kube-apiserver.log"))?;
        self.apiserver = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let out = self
                .kubectl()
                .args(["get", "--raw", "/readyz"])
                .stderr(Stdio::null())
                .output()?;
            if out.status.success() && out.stdout.starts_with(b"ok") {
                return Ok(());
            }
            if let Some(status) = self.apiserver.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!(
                    "kube-apiserver exited with {status}:\n{}",
                    log_tail(&d.join("kube-apiserver.log"))
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready after 90 s:\n{}",
                    log_tail(&d.join("kube-apiserver.log"))
                );
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    fn start_etcd(&mut self) -> Result<()> {
        let d = self.dir.path();
        let client = format!("http://127.0.0.1:{}", self.etcd_port);
        let peer = format!("http://127.0.0.1:{}", self.etcd_peer_port);
        let mut cmd = Command::new(self.bin.join("etcd"));
        cmd.args([
            "--name=default".to_string(),
            format!("--data-dir={}", d.join("etcd").display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=default={peer}"),
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ]);
        self.etcd = Some(spawn_logged(cmd, &d.join("etcd.log"))?);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !etcd_healthy(self.etcd_port) {
            if let Some(status) = self.etcd.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("etcd exited with {status}:\n{}", log_tail(&d.join("etcd.log")));
            }
            if Instant::now() > deadline {
                bail!("etcd not healthy after 30 s:\n{}", log_tail(&d.join("etcd.log")));
            }
            thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn write_kubeconfig(&self) -> Result<()> {
        let d = self.dir.path();
        let b64 =
            |f: &str| -> Result<String> { Ok(base64::engine::general_purpose::STANDARD.encode(fs::read(d.join(f))?)) };
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    \
             certificate-authority-data: {ca}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {crt}\n    \
             client-key-data: {key}\ncontexts:\n- name: local\n  context:\n    cluster: local\n    user: admin\n\
             current-context: local\n",
            server = self.server(),
            ca = b64("ca.crt")?,
            crt = b64("admin.crt")?,
            key = b64("admin.key")?,
        );
        write_private(&self.kubeconfig, config.as_bytes())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop_apiserver();
        if let Some(child) = self.etcd.take() {
            kill(child);
        }
    }
}

/// Throwaway PKI: a CA, the apiserver's serving certificate, an admin client certificate, service-account keys.
fn write_pki(dir: &Path) -> Result<()> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = name("keepalive-operator test CA", None);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca = Issuer::new(ca_params, ca_key);
    fs::write(dir.join("ca.crt"), ca_cert.pem())?;

    let serving_key = KeyPair::generate()?;
    let mut serving = CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".into(),
        "::1".into(),
        "kubernetes".into(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
        "kubernetes.default.svc.cluster.local".into(),
    ])?;
    serving.distinguished_name = name("kube-apiserver", None);
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    fs::write(dir.join("apiserver.crt"), serving.signed_by(&serving_key, &ca)?.pem())?;
    write_private(&dir.join("apiserver.key"), serving_key.serialize_pem().as_bytes())?;

    let admin_key = KeyPair::generate()?;
    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin.distinguished_name = name("admin", Some("system:masters"));
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    fs::write(dir.join("admin.crt"), admin.signed_by(&admin_key, &ca)?.pem())?;
    write_private(&dir.join("admin.key"), admin_key.serialize_pem().as_bytes())?;

    let sa_key = KeyPair::generate()?;
    fs::write(dir.join("sa.pub"), sa_key.public_key_pem())?;
    write_private(&dir.join("sa.key"), sa_key.serialize_pem().as_bytes())?;
    Ok(())
}

fn name(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(o) = organization {
        dn.push(DnType::OrganizationName, o);
    }
    dn
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    Ok(())
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn etcd_healthy(port: u16) -> bool {
    http_get(port, "/health").is_some_and(|(_, body)| body.contains("\"health\":\"true\""))
}

/// A plain HTTP/1.0 GET on 127.0.0.1: the status code and the body, or None when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

// --- process lifecycle -----------------------------------------------------------------------------------------

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Pids of children still running, killed by the exit hook.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Spawns `cmd` so that it dies with this process, with stdout and stderr appended to `log`.
pub fn spawn_logged(mut cmd: Command, log: &Path) -> Result<Child> {
    let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
    cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
    let program = cmd.get_program().to_string_lossy().into_owned();
    let child = spawn_tied(cmd).with_context(|| format!("starting {program}"))?;
    LIVE.lock().unwrap().push(child.id());
    Ok(child)
}

/// PR_SET_PDEATHSIG fires when the *thread* that forked exits, so every child is forked by one thread that lives
/// as long as the process.
fn spawn_tied(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("child-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    use std::os::unix::process::CommandExt;
                    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
                    unsafe {
                        cmd.pre_exec(|| {
                            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                            Ok(())
                        });
                    }
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawning the child-spawner thread");
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap()
        .send((cmd, tx))
        .map_err(|_| std::io::Error::other("spawner thread gone"))?;
    rx.recv().map_err(|_| std::io::Error::other("spawner thread gone"))?
}

/// Stops a child: SIGTERM, then SIGKILL after a grace period; always reaped.
pub fn kill(mut child: Child) {
    let pid = child.id();
    // SAFETY: plain kill(2) on our own child's pid, which is not reaped yet.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    LIVE.lock().unwrap().retain(|p| *p != pid);
}

/// Directories removed at exit (the shared control plane's, which is never dropped).
static EXIT_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Kills a child at once (SIGKILL, no grace period, as when its node dies) and reaps it.
pub fn kill_now(mut child: Child) {
    let pid = child.id();
    let _ = child.kill();
    let _ = child.wait();
    LIVE.lock().unwrap().retain(|p| *p != pid);
}

fn register_exit_cleanup(dir: &Path) {
    extern "C" fn cleanup() {
        if let Ok(pids) = LIVE.lock() {
            for pid in pids.iter() {
                // SAFETY: kill(2) and waitpid(2) on pids of children this process started and has not reaped.
                unsafe {
                    libc::kill(*pid as i32, libc::SIGKILL);
                    libc::waitpid(*pid as i32, std::ptr::null_mut(), 0);
                }
            }
        }
        if let Ok(dirs) = EXIT_DIRS.lock() {
            for d in dirs.iter() {
                let _ = fs::remove_dir_all(d);
            }
        }
    }
    EXIT_DIRS.lock().unwrap().push(dir.to_path_buf());
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // SAFETY: registering a plain extern "C" function without captured state.
        unsafe { libc::atexit(cleanup) };
    });
}
