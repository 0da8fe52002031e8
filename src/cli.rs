//! Command-line interface: one binary, one subcommand per role; [`run`] dispatches to the role.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use clap::{Args, Parser, Subcommand};

use crate::{agent, api, apply, controller, policy::ClusterFacts, runtime::telemetry};

#[derive(Debug, Parser)]
#[command(
    name = "keepalive-operator",
    version,
    about = "Per-pod TCP keepalive sysctls for Kubernetes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a CustomResourceDefinition as YAML: KeepalivePolicy (default) or KeepaliveNodeReport.
    Crd {
        #[arg(value_enum, default_value_t = CrdKind::Policies)]
        kind: CrdKind,
    },
    /// Apply policies to manifests offline: print the resources with the mutation the webhook would make.
    Apply(ApplyArgs),
    /// Run the admission webhook (and, with it, the conformance controller).
    Controller(Box<controller::Args>),
    /// Run the node agent: read the live keepalive values of this node's pods into its KeepaliveNodeReport.
    Agent(agent::AgentArgs),
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum CrdKind {
    /// keepalivepolicies.keepalive.dev
    Policies,
    /// keepalivenodereports.keepalive.dev
    NodeReports,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// A file of KeepalivePolicy documents ("-" reads stdin). Repeatable. Only regular files are read.
    #[arg(short = 'p', long = "policy", required = true)]
    pub policies: Vec<PathBuf>,
    /// A file of resources: Pods, pod-template owners (Deployments, ...), Namespaces, anything else passes
    /// through unchanged ("-" reads stdin). Repeatable. Only regular files are read.
    #[arg(short = 'r', long = "resource", required = true)]
    pub resources: Vec<PathBuf>,
    /// The largest input read, in bytes, per file (and for stdin); a larger one is an error.
    #[arg(long, value_name = "BYTES", env = "KEEPALIVE_APPLY_MAX_INPUT_BYTES",
        default_value_t = apply::input::DEFAULT_MAX_BYTES)]
    pub max_input_bytes: u64,
    /// Kubernetes version (MAJOR.MINOR) of the target cluster. Default: 1.29 or newer. On older clusters
    /// nothing is injected unless --kubelet-allows-keepalive-sysctls is given.
    #[arg(long, value_name = "MAJOR.MINOR")]
    pub kubernetes_version: Option<String>,
    #[command(flatten)]
    pub cluster: controller::ClusterArgs,
}

/// Runs the subcommand.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crd { kind } => {
            let yaml = match kind {
                CrdKind::Policies => api::crd_yaml(),
                CrdKind::NodeReports => api::node_report_crd_yaml(),
            };
            std::io::stdout().write_all(yaml.as_bytes()).map_err(Into::into)
        }
        Command::Apply(args) => run_apply(args),
        Command::Agent(args) => {
            telemetry::init();
            agent::main(args)
        }
        Command::Controller(args) => {
            telemetry::init();
            tokio::runtime::Runtime::new()?.block_on(controller::run(*args))
        }
    }
}

fn read_inputs(paths: &[PathBuf], max_bytes: u64, stdin_used: &mut bool) -> anyhow::Result<Vec<apply::Input>> {
    paths
        .iter()
        .map(|path| {
            if path == Path::new("-") {
                anyhow::ensure!(!*stdin_used, "standard input (-) can be read only once");
                *stdin_used = true;
                Ok(apply::input::read_stdin(max_bytes)?)
            } else {
                Ok(apply::input::read_file(path, max_bytes)?)
            }
        })
        .collect()
}

fn run_apply(args: ApplyArgs) -> anyhow::Result<()> {
    let cluster = match args.kubernetes_version.as_deref() {
        None => ClusterFacts::default(),
        Some(v) => {
            let (major, minor) = v.trim_start_matches('v').split_once('.').unwrap_or((v, ""));
            ClusterFacts::from_version(major, minor, args.cluster.kubelet_allows_keepalive_sysctls)
        }
    };
    let mut stdin_used = false;
    let policies = read_inputs(&args.policies, args.max_input_bytes, &mut stdin_used)?;
    let resources = read_inputs(&args.resources, args.max_input_bytes, &mut stdin_used)?;
    let out = apply::run(&policies, &resources, cluster)?;
    for line in &out.report {
        eprintln!("{line}");
    }
    std::io::stdout().write_all(out.yaml.as_bytes())?;
    Ok(())
}
