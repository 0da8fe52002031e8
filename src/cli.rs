//! Command-line interface: one binary, one subcommand per role.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
    Controller(Box<crate::controller::Args>),
    /// Run the node agent: read the live keepalive values of this node's pods into its KeepaliveNodeReport.
    Agent(crate::report::AgentArgs),
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
    /// A file of KeepalivePolicy documents ("-" reads stdin). Repeatable.
    #[arg(short = 'p', long = "policy", required = true)]
    pub policies: Vec<PathBuf>,
    /// A file of resources: Pods, pod-template owners (Deployments, ...), Namespaces, anything else passes
    /// through unchanged ("-" reads stdin). Repeatable.
    #[arg(short = 'r', long = "resource", required = true)]
    pub resources: Vec<PathBuf>,
    /// Kubernetes version (MAJOR.MINOR) of the target cluster. Default: 1.29 or newer. On older clusters
    /// nothing is injected unless --kubelet-allows-keepalive-sysctls is given.
    #[arg(long, value_name = "MAJOR.MINOR")]
    pub kubernetes_version: Option<String>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// What the operator may assume about the cluster's kubelets.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// The kubelets allow the keepalive sysctls even though the cluster is older than 1.29 (they run with
    /// --allowed-unsafe-sysctls listing them). Without it, nothing is injected on such clusters.
    #[arg(long, env = "KEEPALIVE_KUBELET_ALLOWS_KEEPALIVE_SYSCTLS")]
    pub kubelet_allows_keepalive_sysctls: bool,
}

/// A listen address that can be turned off: an empty value means "do not listen".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalListen(pub Option<std::net::SocketAddr>);

/// Parses `host:port`, or an empty string for none.
pub fn optional_listen(value: &str) -> Result<OptionalListen, String> {
    if value.trim().is_empty() {
        return Ok(OptionalListen(None));
    }
    value
        .parse()
        .map(|addr| OptionalListen(Some(addr)))
        .map_err(|e| format!("{e}: expected host:port, or empty to disable"))
}
