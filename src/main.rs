use std::{io::Write, path::Path, process::ExitCode};

use clap::Parser;
use keepalive_operator::{api, apply, cli, controller, policy::ClusterFacts, telemetry};

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::Command::Crd { kind } => {
            let yaml = match kind {
                cli::CrdKind::Policies => api::crd_yaml(),
                cli::CrdKind::NodeReports => api::node_report_crd_yaml(),
            };
            std::io::stdout().write_all(yaml.as_bytes()).map_err(Into::into)
        }
        cli::Command::Apply(args) => run_apply(args),
        cli::Command::Agent(args) => {
            telemetry::init();
            tokio::runtime::Runtime::new()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(keepalive_operator::report::run(args)))
        }
        cli::Command::Controller(args) => {
            telemetry::init();
            tokio::runtime::Runtime::new()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(controller::run(*args)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn read_inputs(paths: &[std::path::PathBuf]) -> anyhow::Result<Vec<apply::Input>> {
    let mut stdin_used = false;
    paths
        .iter()
        .map(|path| {
            let text = if path == Path::new("-") {
                anyhow::ensure!(!stdin_used, "standard input (-) can be read only once");
                stdin_used = true;
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            };
            Ok(apply::Input {
                name: path.display().to_string(),
                text,
            })
        })
        .collect()
}

fn run_apply(args: cli::ApplyArgs) -> anyhow::Result<()> {
    let cluster = match args.kubernetes_version.as_deref() {
        None => ClusterFacts::default(),
        Some(v) => {
            let (major, minor) = v.trim_start_matches('v').split_once('.').unwrap_or((v, ""));
            ClusterFacts::from_version(major, minor, args.cluster.kubelet_allows_keepalive_sysctls)
        }
    };
    let out = apply::run(&read_inputs(&args.policies)?, &read_inputs(&args.resources)?, cluster)?;
    for line in &out.report {
        eprintln!("{line}");
    }
    std::io::stdout().write_all(out.yaml.as_bytes())?;
    Ok(())
}
