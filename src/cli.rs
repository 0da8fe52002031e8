//! Command-line interface: one binary, one subcommand per role.

use clap::{Parser, Subcommand};

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
    /// Print the KeepalivePolicy CustomResourceDefinition as YAML.
    Crd,
}
