use std::io::Write;

use clap::Parser;
use keepalive_operator::{api, cli};

fn main() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Crd => std::io::stdout().write_all(api::crd_yaml().as_bytes())?,
    }
    Ok(())
}
