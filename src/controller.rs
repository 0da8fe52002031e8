//! `keepalive-operator controller`: the long-running process. Today it serves the admission webhook from
//! watch-driven caches; the conformance controller joins it here.

use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use kube::Client;

use crate::{
    cache::Caches,
    certs::{self, TlsArgs},
    cli::ClusterArgs,
    metrics::Metrics,
    policy::ClusterFacts,
    server,
    webhook::{self, Webhook},
};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// HTTPS address of the webhook (POST /mutate, plus /livez, /readyz, /metrics).
    #[arg(long, env = "KEEPALIVE_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Plain-HTTP address for probes and metrics (/livez, /readyz, /metrics); empty to disable.
    #[arg(long, env = "KEEPALIVE_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Runs until SIGTERM or Ctrl-C.
pub async fn run(args: Args) -> Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let version = client
        .apiserver_version()
        .await
        .context("reading the apiserver version")?;
    let cluster = ClusterFacts::from_version(
        &version.major,
        &version.minor,
        args.cluster.kubelet_allows_keepalive_sysctls,
    );
    if !cluster.keepalive_sysctls_safe {
        tracing::warn!(
            version = %version.git_version,
            "cluster older than 1.29: keepalive sysctls are not safe for its kubelets; nothing will be injected \
             (pass --kubelet-allows-keepalive-sysctls if they run with --allowed-unsafe-sysctls)"
        );
    }
    let metrics = Arc::new(Metrics::default());
    let caches = Caches::start(client.clone(), metrics.clone());
    let certs = certs::start(&args.tls, client.clone()).await?;
    let webhook = Arc::new(Webhook {
        caches,
        cluster,
        metrics,
    });
    let router = webhook::router(webhook.clone());

    let listener = server::bind(args.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, version = %version.git_version, "webhook serving");
    let https = server::serve_tls(listener, server::tls_config(certs), router.clone(), shutdown_signal());
    match args.admin_listen {
        Some(addr) => {
            let admin = server::bind(addr).await?;
            tokio::join!(https, server::serve_plain(admin, router, shutdown_signal()));
        }
        None => https.await,
    }
    tracing::info!("stopped");
    Ok(())
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
