//! `cargo xtask <task>`: the project's two top-level commands and a few helpers.
//!
//!   cargo xtask demo      local control plane + CRDs + example policies, then `kubectl get kap`
//!   cargo xtask test      every check and test CI runs (this is what `.ci/run` calls)
//!   cargo xtask cluster   start the local control plane and keep it running until Ctrl-C
//!   cargo xtask tools     build the Go binaries (etcd, kube-apiserver, kubectl, helm) into the cache

use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use xtask::{ControlPlane, tools};

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

fn test(extra: &[String]) -> Result<()> {
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

fn demo(hold: bool) -> Result<()> {
    let cp = start_control_plane()?;
    let examples = tools::repo_root().join("examples");
    step("Applying the example policies (examples/)");
    print!("{}", cp.kubectl_output(&["apply", "-f", examples.to_str().unwrap()])?);
    step("kubectl get kap");
    print!("{}", cp.kubectl_output(&["get", "kap"])?);
    step("kubectl get kap aws-nlb -o yaml (the stored policy, defaults applied)");
    print!("{}", cp.kubectl_output(&["get", "kap", "aws-nlb", "-o", "yaml"])?);
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
    if hold || unsafe { libc::isatty(0) } == 1 {
        hold_until_interrupted(&cp)
    } else {
        eprintln!("\nDone; the control plane stops now (pass --hold to keep it running).");
        Ok(())
    }
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
