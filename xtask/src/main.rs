//! `cargo xtask <task>`: the project's two top-level commands and a few helpers.
//!
//!   cargo xtask demo      local control plane + CRDs + example policies, then `kubectl get kap`
//!   cargo xtask test      every check and test CI runs (this is what `.ci/run` calls)
//!   cargo xtask cluster   start the local control plane and keep it running until Ctrl-C
//!   cargo xtask tools     build the Go binaries (etcd, kube-apiserver, kubectl, helm) into the cache

use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use xtask::{ControlPlane, cluster, tools};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo(args.iter().any(|a| a == "--hold")),
        Some("test") => test(&args[1..]),
        Some("cluster") => cluster(),
        Some("tools") => tools::build(&args[1..].iter().map(String::as_str).collect::<Vec<_>>()).map(|d| {
            println!("{}", d.display());
        }),
        _ => {
            eprintln!("usage: cargo xtask demo [--hold] | test [CARGO TEST ARGS...] | cluster | tools [NAME...]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn step(what: &str) {
    eprintln!("\n==> {what}");
}

/// Runs a command in the repository root and fails when it fails.
fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .current_dir(tools::repo_root())
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Debian packages the node-side tests use (`ip netns`, `sysctl`), installed when missing.
fn ensure_debian_packages() -> Result<()> {
    let missing = ["ip", "sysctl"].iter().any(|tool| {
        !Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .status()
            .is_ok_and(|s| s.success())
    });
    if missing {
        step("Installing iproute2 and procps (apt-get)");
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "iproute2", "procps"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    ensure_debian_packages()?;
    step("Building etcd, kube-apiserver, kubectl and helm from their Go modules (cached after the first run)");
    let bin = tools::build(&[])?;
    step("cargo fmt --check");
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    step("cargo clippy -D warnings");
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    step("cargo test (unit tests, and integration tests against a real kube-apiserver + etcd)");
    let mut child = cargo()
        .args(["test", "--workspace"])
        .args(extra)
        .env("KEEPALIVE_BIN_DIR", &bin)
        .current_dir(tools::repo_root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    // Echo the output and add up the per-binary results into one closing line.
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap())) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(['.', ';']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next().and_then(|n| n.parse::<u64>().ok()), words.next()) {
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    println!("\ntests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    Ok(())
}

fn start_control_plane() -> Result<ControlPlane> {
    step("Building etcd, kube-apiserver, kubectl and helm from their Go modules (cached after the first run)");
    tools::build(&[])?;
    step("Starting a local control plane: etcd + kube-apiserver on loopback");
    let cp = ControlPlane::start()?;
    eprintln!("    apiserver {} ready", cp.server());
    step("Installing the KeepalivePolicy CRD (crds/)");
    cp.install_crds()?;
    Ok(cp)
}

/// Applies YAML with the real kubectl and prints what it says.
fn apply_yaml(cp: &ControlPlane, name: &str, yaml: &str) -> Result<()> {
    let file = cp.work_dir().join(format!("{name}.yaml"));
    std::fs::write(&file, yaml)?;
    print!("{}", cp.kubectl_output(&["apply", "-f", file.to_str().unwrap()])?);
    Ok(())
}

fn demo(hold: bool) -> Result<()> {
    step("Building the operator (cargo build)");
    run(cargo().args(["build", "--quiet", "--bin", "keepalive-operator"]))?;
    let cp = start_control_plane()?;

    step("Running the operator on this host: webhook + conformance controller, self-managed certificates");
    cp.kubectl_output(&["create", "namespace", "keepalive-system"])?;
    let (port, admin) = (cluster::free_port()?, cluster::free_port()?);
    let mut cmd = Command::new(tools::repo_root().join("target/debug/keepalive-operator"));
    cmd.args([
        "controller",
        &format!("--listen=127.0.0.1:{port}"),
        &format!("--admin-listen=127.0.0.1:{admin}"),
    ])
    .args([
        "--namespace=keepalive-system",
        "--tls-extra-sans=127.0.0.1",
        "--webhook-configuration=keepalive-operator",
    ])
    .env("KUBECONFIG", cp.kubeconfig());
    let log = cp.work_dir().join("operator.log");
    let operator = cluster::spawn_logged(cmd, &log)?;
    wait_for("the operator to be ready", || {
        cluster::http_get(admin, "/readyz").is_some_and(|(c, _)| c == 200)
    })?;
    eprintln!("    serving https://127.0.0.1:{port}/mutate; log: {}", log.display());
    // Registered by URL to the host process, without a caBundle: the operator fills it in.
    apply_yaml(
        &cp,
        "webhook",
        &format!(
            r#"apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {{name: keepalive-operator}}
webhooks:
- name: pods.keepalive.dev
  clientConfig: {{url: "https://127.0.0.1:{port}/mutate"}}
  rules: [{{operations: [CREATE], apiGroups: [""], apiVersions: [v1], resources: [pods]}}]
  failurePolicy: Ignore
  sideEffects: None
  timeoutSeconds: 5
  reinvocationPolicy: IfNeeded
  admissionReviewVersions: [v1]
  namespaceSelector:
    matchExpressions:
    - {{key: kubernetes.io/metadata.name, operator: NotIn, values: [kube-system, keepalive-system]}}
    - {{key: keepalive.dev/ignore, operator: NotIn, values: ["true"]}}
  objectSelector:
    matchExpressions: [{{key: keepalive.dev/ignore, operator: NotIn, values: ["true"]}}]
"#
        ),
    )?;
    wait_for("the operator to set the webhook's caBundle", || {
        cp.kubectl_output(&[
            "get",
            "mutatingwebhookconfiguration",
            "keepalive-operator",
            "-o",
            "jsonpath={.webhooks[0].clientConfig.caBundle}",
        ])
        .is_ok_and(|b| !b.is_empty())
    })?;

    step("Namespaces, and a pod created before any policy exists");
    apply_yaml(
        &cp,
        "namespaces",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {cloud: gcp}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: payments, labels: {team: payments, cloud: gcp}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: pre-existing, namespace: shop}\n\
         spec: {containers: [{name: app, image: registry.example/app:1}]}\n",
    )?;

    let examples = tools::repo_root().join("examples");
    step("Applying the example policies (examples/)");
    print!("{}", cp.kubectl_output(&["apply", "-f", examples.to_str().unwrap()])?);
    std::thread::sleep(std::time::Duration::from_secs(1));

    step("Sample pods: matching, matching with its own value (Fill), hostNetwork, opted out");
    let pod = |ns: &str, name: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}{extra}}}\nspec:\n  containers: [{{name: app, image: registry.example/app:1}}]\n"
        )
    };
    let pods = [
        pod("shop", "web", ""),
        pod("payments", "db-client", "").replace(
            "spec:\n",
            "spec:\n  securityContext: {sysctls: [{name: net.ipv4.tcp_keepalive_time, value: \"45\"}]}\n",
        ),
        pod("shop", "node-agent", "").replace("spec:\n", "spec:\n  hostNetwork: true\n"),
        pod("shop", "legacy", ", labels: {keepalive.dev/ignore: \"true\"}"),
    ];
    apply_yaml(&cp, "pods", &pods.join("---\n"))?;

    step("kubectl get kap (the controller writes status every few seconds)");
    std::thread::sleep(std::time::Duration::from_secs(5));
    print!("{}", cp.kubectl_output(&["get", "kap"])?);
    step("kubectl get pod web -n shop: the sysctls and annotation the webhook injected");
    println!(
        "{}",
        cp.kubectl_output(&[
            "get", "pod", "web", "-n", "shop", "-o",
            "jsonpath=sysctls: {.spec.securityContext.sysctls}{\"\\n\"}policy: {.metadata.annotations.keepalive\\.dev/policy}",
        ])?
    );
    step("kubectl get kap gcp-vpc: why pods do not conform");
    println!(
        "{}",
        cp.kubectl_output(&[
            "get",
            "kap",
            "gcp-vpc",
            "-o",
            "jsonpath={range .status.violations[*]}{.namespace}/{.name}: {.reason}: {.message}{\"\\n\"}{end}",
        ])?
    );
    step("An invalid policy is rejected by the apiserver, naming the field");
    let bad = cp.work_dir().join("invalid.yaml");
    std::fs::write(
        &bad,
        "apiVersion: keepalive.dev/v1alpha1\nkind: KeepalivePolicy\nmetadata:\n  name: too-late\nspec:\n  \
         idleTimeoutSeconds: 350\n  keepalive: {time: 7200, interval: 75, probes: 9}\n",
    )?;
    let out = cp.kubectl().args(["apply", "-f", bad.to_str().unwrap()]).output()?;
    print!("{}", String::from_utf8_lossy(&out.stderr));
    // SAFETY: isatty(3) only inspects the descriptor.
    let result = if hold || unsafe { libc::isatty(0) } == 1 {
        hold_until_interrupted(&cp)
    } else {
        eprintln!("\nDone; the operator and the control plane stop now (pass --hold to keep them running).");
        Ok(())
    };
    cluster::kill(operator);
    result
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !ready() {
        if std::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Ok(())
}

fn cluster() -> Result<()> {
    let cp = start_control_plane()?;
    hold_until_interrupted(&cp)
}

fn hold_until_interrupted(cp: &ControlPlane) -> Result<()> {
    eprintln!(
        "\nThe control plane keeps running until Ctrl-C. In another shell:\n  export KUBECONFIG={}\n  {}/kubectl get kap",
        cp.kubeconfig().display(),
        cp.bin_dir().display()
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(tokio::signal::ctrl_c())?;
    eprintln!("stopping");
    Ok(())
}
