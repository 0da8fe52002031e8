//! `cargo xtask <task>`: the project's two top-level commands and a few helpers.
//!
//!   cargo xtask demo      local control plane, the chart, the operator and agent, example policies, `kubectl get kap`
//!   cargo xtask test      every check and test CI runs (this is what `.ci/run` calls): fmt, clippy, cargo deny
//!                         (supply chain, offline: deny.rs), the tests on the newest Kubernetes of
//!                         hack/versions.env, the apiserver suites again on the oldest, e2e
//!   cargo xtask matrix [V...]  the apiserver suites on every listed Kubernetes version (or those named), and the
//!                         README's version table rewritten from the results
//!   cargo xtask e2e       the end-to-end proof on a real single-node cluster (hack/e2e.sh; also the last step of
//!                         `test` when run as root)
//!   cargo xtask deny      the supply-chain step of `test` alone (cargo deny check)
//!   cargo xtask cluster   start the local control plane and keep it running until Ctrl-C
//!   cargo xtask tools     build the Go binaries (etcd, kube-apiserver, kubectl, helm) into the cache
//!   cargo xtask peers [NAME...]  build Kyverno and Gatekeeper from their Go modules (cached) and smoke-test each on
//!                         a fresh control plane: webhook by URL, our mutation, 20 pods, RSS, clean stop (not in CI)
//!   cargo xtask bench-admission [--creators 100,200] [--pods N] [--rounds R] [--only NAME,...] [--http1]
//!                         [--out FILE] [--peers]
//!                         pod-create latency and cost of each way of injecting the sysctls, interleaved, through a
//!                         real apiserver (not part of CI; admission.rs)
//!   cargo xtask fuzz [N]  N generated AdmissionReviews (default 10 000 000) through the webhook's parse + answer,
//!                         release build (CI runs a short run of the same test)

use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use xtask::{ControlPlane, cluster, tools};

mod deny;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo(args.iter().any(|a| a == "--hold")),
        Some("test") => test(&args[1..]),
        Some("matrix") => matrix(&args[1..]),
        Some("cluster") => cluster(),
        Some("e2e") => e2e(),
        Some("deny") => deny::check(),
        Some("peers") => xtask::peers::smoke(&args[1..]),
        Some("bench-admission") => xtask::admission::Options::parse(&args[1..]).and_then(|o| xtask::admission::run(&o)),
        Some("fuzz") => fuzz(args.get(1).map(String::as_str).unwrap_or("10000000")),
        Some("tools") => tools::build(&args[1..].iter().map(String::as_str).collect::<Vec<_>>()).map(|d| {
            println!("{}", d.display());
        }),
        _ => {
            eprintln!(
                "usage: cargo xtask demo [--hold] | test [CARGO TEST ARGS...] | matrix [VERSION...] | e2e | deny | cluster | tools [NAME...] | peers [kyverno|gatekeeper...] | fuzz [CASES] | {}",
                xtask::admission::USAGE
            );
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

/// Debian packages the tests and the demo use, installed when missing: `ip netns`, `ss` and `sysctl` for the
/// node-side tests, buildah for the image (`hack/image.sh`; no container engine or OCI runtime needed), clang for
/// the agent's BPF program (build.rs; `CLANG` names another compiler).
fn ensure_debian_packages() -> Result<()> {
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let mut missing: Vec<&str> = [
        ("ip", "iproute2"),
        ("ss", "iproute2"),
        ("sysctl", "procps"),
        ("buildah", "buildah"),
        (clang.as_str(), "clang"),
    ]
    .iter()
    .filter(|(tool, _)| !which(tool))
    .map(|(_, package)| *package)
    .collect();
    missing.dedup();
    if !missing.is_empty() {
        step(&format!("Installing {} (apt-get)", missing.join(", ")));
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    ensure_debian_packages()?;
    let versions = tools::kube_versions()?;
    let (newest, oldest) = (&versions[0], &versions[versions.len() - 1]);
    step(&format!(
        "Building etcd, kube-apiserver {newest}, kubectl and helm from their Go modules (cached after the first run)"
    ));
    let bin = tools::build(&[])?;
    step("cargo fmt --check");
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    step("cargo clippy -D warnings");
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    deny::check()?;
    step(&format!(
        "cargo test (unit tests, and integration tests against a real kube-apiserver {newest} + etcd)"
    ));
    let mut args = vec!["--workspace".to_string()];
    args.extend(extra.iter().cloned());
    let (ok, mut counts) = cargo_test(&args, &bin)?;
    // The apiserver suites once more on the oldest version the README claims (the whole list: `cargo xtask matrix`).
    let mut old_ok = true;
    if ok && oldest != newest && extra.is_empty() {
        step(&format!(
            "Building kube-apiserver and kubectl {oldest}, the oldest Kubernetes of hack/versions.env"
        ));
        let old_bin = tools::build_version(Some(oldest), &[])?;
        step(&format!(
            "The apiserver suites on {oldest}: {}",
            APISERVER_SUITES.join(", ")
        ));
        let (passed, old) = cargo_test(&suite_args(), &old_bin)?;
        eprintln!("    {oldest}: {} passed, {} failed", old.passed, old.failed);
        old_ok = passed;
        counts.add(&old);
    }
    // The end-to-end proof on a real node (hack/e2e.sh): one more test, run when the tests passed and as root.
    let e2e = if !ok || !old_ok {
        None
    // SAFETY: geteuid(2) only reads this process's credentials.
    } else if unsafe { libc::geteuid() } != 0 {
        eprintln!("e2e: skipped (needs root: it runs a kubelet, containerd and CNI on this machine)");
        counts.ignored += 1;
        None
    } else {
        let ok = e2e().is_ok();
        if ok {
            counts.passed += 1;
        } else {
            counts.failed += 1;
        }
        Some(ok)
    };
    println!(
        "\ntests: {} passed, {} failed, {} skipped",
        counts.passed, counts.failed, counts.ignored
    );
    if !ok {
        bail!("cargo test failed on {newest}");
    }
    if !old_ok {
        bail!("the apiserver suites failed on {oldest}");
    }
    if e2e == Some(false) {
        bail!("the end-to-end test on a real node failed (hack/e2e.sh)");
    }
    Ok(())
}

/// The integration test binaries that run against the apiserver and differ by Kubernetes version: the API (CRD
/// schema and CEL), the webhook, the controller, the chart, the agent's reports, the node-bound writes, the
/// MutatingAdmissionPolicy compiler and the injection modes (MutatingAdmissionPolicy v1 from 1.36; before, the
/// injection suite proves `auto` picks the webhook and `admissionPolicy` is refused).
const APISERVER_SUITES: [&str; 9] = [
    "api",
    "webhook",
    "controller",
    "chart",
    "agent",
    "heartbeat",
    "node_trust",
    "admission_policy",
    "injection",
];

fn suite_args() -> Vec<String> {
    APISERVER_SUITES
        .iter()
        .flat_map(|t| ["--test".to_string(), t.to_string()])
        .collect()
}

/// Test results added up over `cargo test` runs.
#[derive(Default)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }

    /// Adds a libtest summary line ("test result: ok. 5 passed; 0 failed; 1 ignored; ...").
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(['.', ';']) {
            let mut words = part.split_whitespace();
            if let (Some(n), Some(what)) = (words.next().and_then(|n| n.parse::<u64>().ok()), words.next()) {
                match what {
                    "passed" => self.passed += n,
                    "failed" => self.failed += n,
                    "ignored" => self.ignored += n,
                    _ => {}
                }
            }
        }
    }
}

/// `cargo test ARGS` against the binaries in `bin`, its output echoed; whether it passed, and the counts.
fn cargo_test(args: &[String], bin: &std::path::Path) -> Result<(bool, Counts)> {
    let mut child = cargo()
        .arg("test")
        .args(args)
        .env("KEEPALIVE_BIN_DIR", bin)
        .current_dir(tools::repo_root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let mut counts = Counts::default();
    for line in std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap())) {
        let line = line?;
        println!("{line}");
        counts.add_line(&line);
    }
    Ok((child.wait()?.success(), counts))
}

/// One version's row of the README table.
struct MatrixRow {
    version: String,
    ok: bool,
    counts: Counts,
    seconds: u64,
    date: String,
}

const TABLE_BEGIN: &str = "<!-- kube-versions:begin (written by `cargo xtask matrix`) -->";
const TABLE_END: &str = "<!-- kube-versions:end -->";

/// `cargo xtask matrix [VERSION...]`: the apiserver suites on every Kubernetes version of `hack/versions.env` (or
/// the ones named), each against its own kube-apiserver and kubectl; the README's table gets one row per version
/// run (rows of versions not run are kept, rows of versions no longer listed are dropped).
fn matrix(only: &[String]) -> Result<()> {
    let versions = tools::kube_versions()?;
    if let Some(unknown) = only.iter().find(|v| !versions.contains(v)) {
        bail!(
            "{unknown} is not in KUBE_VERSIONS of hack/versions.env ({})",
            versions.join(" ")
        );
    }
    let chosen: Vec<&String> = versions
        .iter()
        .filter(|v| only.is_empty() || only.contains(v))
        .collect();
    step("Building the test binaries once (cargo test --no-run)");
    run(cargo().args(["test", "--no-run"]).args(suite_args()))?;
    let mut rows = Vec::new();
    for (i, version) in chosen.iter().enumerate() {
        step(&format!(
            "[{}/{}] Kubernetes {version}: building kube-apiserver and kubectl (cached after the first run)",
            i + 1,
            chosen.len()
        ));
        let start = std::time::Instant::now();
        let bin = tools::build_version(Some(version), &[])?;
        step(&format!(
            "[{}/{}] Kubernetes {version}: {}",
            i + 1,
            chosen.len(),
            APISERVER_SUITES.join(", ")
        ));
        let tests_start = std::time::Instant::now();
        let (ok, counts) = cargo_test(&suite_args(), &bin)?;
        let seconds = tests_start.elapsed().as_secs();
        eprintln!(
            "    {version}: {} ({} passed, {} failed) in {seconds} s (+ {} s building)",
            if ok { "passed" } else { "FAILED" },
            counts.passed,
            counts.failed,
            (tests_start - start).as_secs()
        );
        rows.push(MatrixRow {
            version: version.to_string(),
            ok,
            counts,
            seconds,
            date: today()?,
        });
    }
    let readme = tools::repo_root().join("README.md");
    let text = std::fs::read_to_string(&readme)?;
    let updated = write_table(&text, &versions, &rows)?;
    std::fs::write(&readme, updated)?;
    step("README.md: the Kubernetes versions table");
    for row in &rows {
        println!("{}", table_row(row));
    }
    let failed: Vec<&str> = rows.iter().filter(|r| !r.ok).map(|r| r.version.as_str()).collect();
    if !failed.is_empty() {
        bail!("the apiserver suites failed on {}", failed.join(", "));
    }
    Ok(())
}

fn today() -> Result<String> {
    let out = Command::new("date").args(["-u", "+%Y-%m-%d"]).output()?;
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

fn table_row(row: &MatrixRow) -> String {
    format!(
        "| {} | {} | {} | {} | {} s | {} |",
        row.version,
        if row.ok { "passed" } else { "**failed**" },
        row.counts.passed,
        row.counts.failed,
        row.seconds,
        row.date
    )
}

/// The README with the rows of `rows` put into the table between the markers, ordered as `versions`.
fn write_table(readme: &str, versions: &[String], rows: &[MatrixRow]) -> Result<String> {
    let (Some(begin), Some(end)) = (readme.find(TABLE_BEGIN), readme.find(TABLE_END)) else {
        bail!("README.md lacks the markers {TABLE_BEGIN} and {TABLE_END}");
    };
    let old = &readme[begin + TABLE_BEGIN.len()..end];
    let mut lines = vec![
        String::new(),
        "| Kubernetes | apiserver suites | tests passed | failed | time | date |".to_string(),
        "|---|---|---|---|---|---|".to_string(),
    ];
    for version in versions {
        let new = rows.iter().find(|r| &r.version == version).map(table_row);
        let kept = old
            .lines()
            .find(|l| l.starts_with(&format!("| {version} |")))
            .map(str::to_string);
        lines.extend(new.or(kept));
    }
    lines.push(String::new());
    Ok(format!(
        "{}{}{}",
        &readme[..begin + TABLE_BEGIN.len()],
        lines.join("\n"),
        &readme[end..]
    ))
}

/// The generated-review fuzz test (tests/fuzz_review.rs) with `cases` cases, in release mode.
fn fuzz(cases: &str) -> Result<()> {
    let n: u64 = cases
        .parse()
        .with_context(|| format!("not a number of cases: {cases}"))?;
    step(&format!(
        "Fuzzing the webhook's parse + answer with {n} generated reviews (release build)"
    ));
    run(cargo()
        .args(["test", "--release", "--test", "fuzz_review", "--", "--nocapture"])
        .env("KEEPALIVE_FUZZ_CASES", n.to_string()))
}

/// `hack/e2e.sh`: a real single-node cluster (kubelet, containerd, CNI), the chart, and keepalive probes on the
/// wire. The image is built with the dev profile unless KEEPALIVE_IMAGE_PROFILE says otherwise (quicker; the
/// tests' image check builds the same one).
fn e2e() -> Result<()> {
    step("End to end on a real node: hack/e2e.sh (node binaries and images are built and cached first)");
    let mut cmd = Command::new(tools::repo_root().join("hack/e2e.sh"));
    if std::env::var_os("KEEPALIVE_IMAGE_PROFILE").is_none() {
        cmd.env("KEEPALIVE_IMAGE_PROFILE", "dev");
    }
    run(&mut cmd)
}

fn start_control_plane(with_crds: bool) -> Result<ControlPlane> {
    step("Building etcd, kube-apiserver, kubectl and helm from their Go modules (cached after the first run)");
    tools::build(&[])?;
    step("Starting a local control plane: etcd + kube-apiserver on loopback");
    let cp = ControlPlane::start()?;
    eprintln!("    apiserver {} ready", cp.server());
    if with_crds {
        step("Installing the CRDs (crds/)");
        cp.install_crds()?;
    }
    Ok(cp)
}

/// Applies YAML with the real kubectl and prints what it says.
fn apply_yaml(cp: &ControlPlane, name: &str, yaml: &str) -> Result<()> {
    let file = cp.work_dir().join(format!("{name}.yaml"));
    std::fs::write(&file, yaml)?;
    print!("{}", cp.kubectl_output(&["apply", "-f", file.to_str().unwrap()])?);
    Ok(())
}

/// The release the demo installs, and the names the chart derives from it.
const RELEASE: &str = "keepalive";
const NAMESPACE: &str = "keepalive-system";
const FULLNAME: &str = "keepalive-keepalive-operator";
/// The agent's namespace, which the chart creates (Pod Security "privileged").
const AGENT_NAMESPACE: &str = "keepalive-system-agent";
const DEMO_NODE: &str = "demo-node";

fn demo(hold: bool) -> Result<()> {
    ensure_debian_packages()?;
    step("Building the operator (cargo build)");
    run(cargo().args(["build", "--quiet", "--bin", "keepalive-operator"]))?;
    let cp = start_control_plane(false)?;
    // Where `cargo build` put it: CARGO_TARGET_DIR when set, else the repository's target/.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tools::repo_root().join("target"));
    let binary = tools::repo_root().join(target_dir).join("debug/keepalive-operator");

    let (port, admin) = (cluster::free_port()?, cluster::free_port()?);
    step("helm install: the chart's CRDs, ServiceAccounts, RBAC and injection (injection.mode auto)");
    let chart = tools::repo_root().join("charts/keepalive-operator");
    // Helm cannot manage the release namespace: created first, enforcing Pod Security "restricted".
    restricted_namespace(&cp, NAMESPACE)?;
    let out = cp
        .helm()
        .args(["install", RELEASE, chart.to_str().unwrap(), "-n", NAMESPACE])
        .arg(format!("--set=webhook.url=https://127.0.0.1:{port}/mutate"))
        .arg("--set=webhook.extraSANs={127.0.0.1}")
        .output()?;
    if !out.status.success() {
        bail!("helm install failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let notes = String::from_utf8_lossy(&out.stdout);
    for line in notes.lines().take_while(|l| !l.starts_with("NOTES:")) {
        eprintln!("    {line}");
    }
    eprintln!(
        "    (no kubelet here: the chart's Deployment and DaemonSet create no pods; both run on this host instead)"
    );

    step("Running the operator on this host as the chart's ServiceAccount, with the Deployment's args");
    let kubeconfig = cp.service_account_kubeconfig(NAMESPACE, FULLNAME)?;
    let args = cp.container_args(
        "deployment",
        NAMESPACE,
        FULLNAME,
        &[
            ("--listen", format!("127.0.0.1:{port}")),
            ("--admin-listen", format!("127.0.0.1:{admin}")),
        ],
    )?;
    let mut cmd = Command::new(&binary);
    cmd.args(&args)
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAME", "operator-on-host")
        .env("RUST_LOG", "info");
    let log = cp.work_dir().join("operator.log");
    let operator = cluster::spawn_logged(cmd, &log)?;
    wait_for("the operator to be ready", || {
        cluster::http_get(admin, "/readyz").is_some_and(|(c, _)| c == 200)
    })?;
    eprintln!("    keepalive-operator {}", args.join(" "));
    eprintln!("    serving https://127.0.0.1:{port}/mutate; log: {}", log.display());
    // The chart's injection mode `auto`: the MutatingAdmissionPolicy where the apiserver serves it (1.36+), else the
    // webhook, registered by URL to this host.
    let admission_policy = format!("{FULLNAME}-policies");
    let args_line = args.join(" ");
    if args_line.contains("--injection-mode=admissionPolicy") {
        eprintln!(
            "    injection mode admissionPolicy: the apiserver will mutate pods itself (MutatingAdmissionPolicy \
             {admission_policy}, written once there are policies); no webhook on the pod-creation path"
        );
    } else {
        wait_for("the operator to set the webhook's caBundle", || {
            cp.kubectl_output(&[
                "get",
                "mutatingwebhookconfiguration",
                FULLNAME,
                "-o",
                "jsonpath={.webhooks[0].clientConfig.caBundle}",
            ])
            .is_ok_and(|b| !b.is_empty())
        })?;
        eprintln!("    injection mode webhook: the apiserver calls https://127.0.0.1:{port}/mutate");
    }

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
    if args_line.contains("--injection-mode=admissionPolicy") {
        wait_for("the operator to write its MutatingAdmissionPolicy and binding", || {
            cp.kubectl_output(&["get", "mutatingadmissionpolicybinding", &admission_policy])
                .is_ok()
        })?;
    }
    // The apiserver loads new admission policies (and the webhook its caches) within about a second.
    std::thread::sleep(std::time::Duration::from_secs(2));

    step("Sample pods: matching, matching with its own value (Fill), hostNetwork, opted out");
    let pod = |ns: &str, name: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}{extra}}}\nspec:\n  containers: [{{name: app, image: registry.example/app:1}}]\n"
        )
    };
    let pods = [
        pod("shop", "web", ""),
        pod("shop", "checkout", ""),
        pod("payments", "db-client", "").replace(
            "spec:\n",
            "spec:\n  securityContext: {sysctls: [{name: net.ipv4.tcp_keepalive_time, value: \"45\"}]}\n",
        ),
        pod("shop", "node-agent", "").replace("spec:\n", "spec:\n  hostNetwork: true\n"),
        pod("shop", "legacy", ", labels: {keepalive.dev/ignore: \"true\"}"),
    ];
    let pods: Vec<String> = pods
        .iter()
        .map(|p| p.replace("spec:\n", &format!("spec:\n  nodeName: {DEMO_NODE}\n")))
        .collect();
    apply_yaml(&cp, "pods", &pods.join("---\n"))?;

    // The node agent needs root (network namespaces, cgroups) and iproute2.
    // SAFETY: geteuid(2) only reads this process's credentials.
    let root = unsafe { libc::geteuid() } == 0;
    let _live = if root && which("ip") {
        Some(live_node(&cp, &binary)?)
    } else {
        eprintln!("    (not root, or no `ip`: skipping the node agent part)");
        None
    };

    step("kubectl get kap (the controller writes status every few seconds)");
    std::thread::sleep(std::time::Duration::from_secs(5));
    print!("{}", cp.kubectl_output(&["get", "kap"])?);
    if _live.is_some() {
        step("kubectl get kanr: what the node agent read from the kernel");
        print!("{}", cp.kubectl_output(&["get", "kanr"])?);
        println!(
            "{}",
            cp.kubectl_output(&[
                "get",
                "kanr",
                DEMO_NODE,
                "-o",
                "jsonpath={range .spec.pods[*]}pod {.uid}: time={.sysctls.time} intvl={.sysctls.interval} \
                 probes={.sysctls.probes} established={.established} keepalive={.keepalive} {.error}{\"\\n\"}{end}",
            ])?
        );
    }
    if args_line.contains("--injection-mode=admissionPolicy") {
        step("kubectl get mutatingadmissionpolicies: the policies compiled into one, kept by the operator's leader");
        print!(
            "{}",
            cp.kubectl_output(&["get", "mutatingadmissionpolicies,mutatingadmissionpolicybindings"])?
        );
        println!(
            "{}",
            cp.kubectl_output(&[
                "get",
                "kap",
                "-o",
                "jsonpath={range .items[*]}{.metadata.name}: {.status.conditions[?(@.type==\"Injected\")].reason}{\"\\n\"}{end}",
            ])?
        );
    }
    step("kubectl get pod web -n shop: the sysctls and annotation injected at admission");
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

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// What the demo runs for the node agent; stopped on drop.
struct LiveNode {
    agent: Option<std::process::Child>,
    // Dropped in this order: the processes holding connections leave the pods' cgroups before those go.
    _connections: Vec<xtask::sandbox::HeldConnections>,
    _sandboxes: Vec<xtask::sandbox::Sandbox>,
}

impl Drop for LiveNode {
    fn drop(&mut self) {
        if let Some(agent) = self.agent.take() {
            cluster::kill(agent);
        }
    }
}

/// Creates (or relabels) `name` enforcing Pod Security "restricted", as the README asks of the release namespace.
fn restricted_namespace(cp: &ControlPlane, name: &str) -> Result<()> {
    let labels: Vec<String> = ["enforce", "audit", "warn"]
        .iter()
        .map(|mode| format!(r#""pod-security.kubernetes.io/{mode}": "restricted""#))
        .collect();
    let object = format!(
        r#"{{"apiVersion": "v1", "kind": "Namespace", "metadata": {{"name": "{name}", "labels": {{{}}}}}}}"#,
        labels.join(", ")
    );
    cp.apply_json(&format!("namespace-{name}"), &object)?;
    Ok(())
}

/// Stands in for kubelet on `demo-node`: each pod bound to it gets a real network namespace in a kubelet-style
/// cgroup, with the sysctls kubelet would apply from its spec — except `checkout`, whose runtime "lost" them —
/// and a process holding connections (some without SO_KEEPALIVE). Then runs the node agent on this host as the
/// chart's agent ServiceAccount, with the DaemonSet's args.
fn live_node(cp: &ControlPlane, binary: &std::path::Path) -> Result<LiveNode> {
    use xtask::sandbox::{Layout, Sandbox};
    step("Node agent: real network namespaces for the pods bound to demo-node, the agent reading them");
    let mut sandboxes = Vec::new();
    let mut connections = Vec::new();
    for (ns, name) in [
        ("shop", "web"),
        ("shop", "checkout"),
        ("payments", "db-client"),
        ("shop", "legacy"),
    ] {
        let pod: serde_json::Value =
            serde_json::from_str(&cp.kubectl_output(&["get", "pod", name, "-n", ns, "-o", "json"])?)?;
        let uid = pod["metadata"]["uid"].as_str().context("pod uid")?;
        let value = |sysctl: &str| {
            pod["spec"]["securityContext"]["sysctls"]
                .as_array()
                .and_then(|l| l.iter().find(|s| s["name"] == sysctl))
                .and_then(|s| s["value"].as_str()?.parse::<i32>().ok())
        };
        let applied = match (
            value("net.ipv4.tcp_keepalive_time"),
            value("net.ipv4.tcp_keepalive_intvl"),
            value("net.ipv4.tcp_keepalive_probes"),
        ) {
            _ if name == "checkout" => None,
            (Some(t), i, p) => Some((t, i.unwrap_or(75), p.unwrap_or(9))),
            _ => None,
        };
        let sandbox = Sandbox::new(name, uid, Layout::CgroupfsBurstable, applied);
        connections.push(sandbox.connect(2, 1));
        eprintln!("    {ns}/{name}: netns with {applied:?}, 3 connections held (2 with SO_KEEPALIVE)");
        sandboxes.push(sandbox);
    }
    // The token kubelet would give the agent's pod on demo-node: the chart's policy lets it write only that
    // node's report.
    let agent_sa = format!("{FULLNAME}-agent");
    let token = cp.pod_bound_token(AGENT_NAMESPACE, &agent_sa, "agent-on-demo-node", DEMO_NODE)?;
    let kubeconfig = cp.token_kubeconfig("demo-agent", &token)?;
    let admin = cluster::free_port()?;
    let args = cp.container_args(
        "daemonset",
        AGENT_NAMESPACE,
        &format!("{FULLNAME}-agent"),
        &[
            ("--admin-listen", format!("127.0.0.1:{admin}")),
            ("--proc-root", "/proc".to_string()),
            ("--node-name", DEMO_NODE.to_string()),
            ("--scan-interval-seconds", "1".to_string()),
            // hostNetwork pods are judged by the node's values: this process lives in the host's namespace.
            ("--node-netns-pid", std::process::id().to_string()),
        ],
    )?;
    let mut cmd = Command::new(binary);
    cmd.args(&args).env("KUBECONFIG", &kubeconfig).env("RUST_LOG", "info");
    let log = cp.work_dir().join("agent.log");
    let agent = cluster::spawn_logged(cmd, &log)?;
    wait_for("the agent's first report", || {
        cluster::http_get(admin, "/readyz").is_some_and(|(c, _)| c == 200)
    })
    .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
    eprintln!("    keepalive-operator {}", args.join(" "));
    eprintln!("    log: {}", log.display());
    Ok(LiveNode {
        agent: Some(agent),
        _sandboxes: sandboxes,
        _connections: connections,
    })
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
    let cp = start_control_plane(true)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn row(version: &str, ok: bool, passed: u64) -> MatrixRow {
        MatrixRow {
            version: version.to_string(),
            ok,
            counts: Counts {
                passed,
                failed: u64::from(!ok),
                ignored: 0,
            },
            seconds: 7,
            date: "2026-12-04".to_string(),
        }
    }

    #[test]
    fn the_table_keeps_rows_not_run_replaces_rows_run_and_drops_unlisted_versions() {
        let readme = format!(
            "intro\n{TABLE_BEGIN}\n| Kubernetes | x |\n|---|---|\n| v1.36.3 | passed | 9 | 0 | 5 s | 2026-12-01 |\n\
             | v1.29.6 | passed | 9 | 0 | 5 s | 2026-12-01 |\n{TABLE_END}\noutro\n"
        );
        let versions = ["v1.37.2", "v1.36.3", "v1.30.14"].map(String::from);
        let out = write_table(
            &readme,
            &versions,
            &[row("v1.37.2", true, 12), row("v1.30.14", false, 11)],
        )
        .unwrap();
        let table: Vec<&str> = out.lines().filter(|l| l.starts_with("| v")).collect();
        assert_eq!(
            table,
            [
                "| v1.37.2 | passed | 12 | 0 | 7 s | 2026-12-04 |",
                "| v1.36.3 | passed | 9 | 0 | 5 s | 2026-12-01 |",
                "| v1.30.14 | **failed** | 11 | 1 | 7 s | 2026-12-04 |",
            ]
        );
        assert!(out.starts_with("intro\n") && out.ends_with(&format!("{TABLE_END}\noutro\n")));
        assert!(write_table("no markers", &versions, &[]).is_err());
    }

    #[test]
    fn libtest_summaries_add_up() {
        let mut counts = Counts::default();
        counts.add_line("test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.2s");
        counts.add_line("test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out");
        counts.add_line("running 5 tests");
        assert_eq!((counts.passed, counts.failed, counts.ignored), (8, 2, 1));
    }
}
