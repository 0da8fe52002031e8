//! `keepalive-operator controller`: the long-running process. Every replica serves the admission webhook from
//! the shared watch-driven caches; the elected leader also writes the conformance reports into policy status.

mod caches;
pub mod conformance;
pub mod injection;
mod leader;
mod metrics;
pub mod node_reports;
mod status_writer;

use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use kube::Client;

pub use self::{caches::Caches, leader::LeaderArgs, metrics::ControllerMetrics, status_writer::MIN_WRITE_INTERVAL};
use crate::{
    policy::ClusterFacts,
    runtime::{
        certs::{self, TlsArgs},
        limits::{LimitArgs, RequestLimits},
        listen::{OptionalListen, optional_listen},
        metrics::Registry,
        server, shutdown_signal,
    },
    webhook::{self, Webhook},
};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// HTTPS address of the webhook (POST /mutate, plus /livez, /readyz, /metrics).
    #[arg(long, env = "KEEPALIVE_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Plain-HTTP address for probes and metrics (/livez, /readyz, /metrics); empty to disable.
    #[arg(long, env = "KEEPALIVE_ADMIN_LISTEN", default_value = "0.0.0.0:9090", value_parser = optional_listen)]
    pub admin_listen: OptionalListen,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub leader: LeaderArgs,
    #[command(flatten)]
    pub injection: injection::InjectionArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// PEM CA file: when set, the webhook accepts only clients with a certificate this CA signed (configure the
    /// apiserver's admission kubeconfig to present one). Read at start.
    #[arg(long, env = "KEEPALIVE_TLS_CLIENT_CA_FILE")]
    pub tls_client_ca_file: Option<std::path::PathBuf>,
    /// The node agents' namespace, where each renews a heartbeat Lease named after its node: a node report is
    /// fresh while its agent renews the Lease (the report itself is rewritten only when a reading changed). Empty:
    /// reports alone are heard.
    #[arg(long, env = "KEEPALIVE_AGENT_NAMESPACE", default_value = "")]
    pub agent_namespace: String,
    /// On SIGTERM, /readyz fails and the webhook keeps answering this many seconds (while the apiserver's
    /// connections move to other replicas) before it closes its connections gracefully and exits.
    #[arg(long, env = "KEEPALIVE_DRAIN_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=300))]
    pub drain_seconds: u64,
}

/// What the operator may assume about the cluster's kubelets.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// The kubelets allow the keepalive sysctls even though the cluster is older than 1.29 (they run with
    /// --allowed-unsafe-sysctls listing them). Without it, nothing is injected on such clusters.
    #[arg(long, env = "KEEPALIVE_KUBELET_ALLOWS_KEEPALIVE_SYSCTLS")]
    pub kubelet_allows_keepalive_sysctls: bool,
    /// RuntimeClass handlers whose pods run in the host's kernel (the agent reads their network namespaces).
    /// Pods of any other RuntimeClass (Kata, gVisor, …) are reported Unverified: "sandboxed runtime".
    #[arg(long, env = "KEEPALIVE_VERIFIED_RUNTIME_HANDLERS", value_delimiter = ',', default_values_t = conformance::RUNC_LIKE_HANDLERS.iter().map(|h| h.to_string()))]
    pub verified_runtime_handlers: Vec<String>,
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
    let mode = injection::resolve(&client, args.injection.injection_mode).await?;
    tracing::info!(
        mode = ?mode,
        requested = ?args.injection.injection_mode,
        "injection mode"
    );
    crate::runtime::raise_open_file_limit();
    let mut registry = Registry::with_prefix("keepalive");
    let metrics = ControllerMetrics::register(&mut registry);
    let caches = Caches::start(client.clone(), metrics.clone());
    let certs = certs::start(&args.tls, client.clone()).await?;
    let webhook = Arc::new(Webhook::new(caches.clone(), cluster, &mut registry));
    let router = webhook::router(webhook.clone()).merge(crate::runtime::metrics::router(Arc::new(registry)));
    let router = RequestLimits::new(&args.limits).apply(certs::gate_readiness(router, certs.clone()));

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (leading_tx, leading) = leader::channel();
    let election = tokio::spawn(leader::run(
        client.clone(),
        args.tls.namespace.clone(),
        args.leader.clone(),
        leading_tx,
        metrics.leader.clone(),
        stopped.clone(),
    ));
    let (reports_tx, reports) = injection::channel();
    let injector = injection::Injector::new(
        client.clone(),
        caches.clone(),
        args.injection.clone(),
        mode,
        reports_tx,
        metrics.clone(),
    );
    let injecting = tokio::spawn(injector.run(leading.clone(), stopped.clone()));
    let writer = status_writer::StatusWriter::new(
        client.clone(),
        caches,
        cluster,
        args.cluster.verified_runtime_handlers.clone(),
        metrics,
        reports,
        Some(args.agent_namespace.clone()).filter(|n| !n.is_empty()),
    );
    let writing = tokio::spawn(writer.run(leading, stopped));

    let listener = server::bind(args.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, version = %version.git_version, "webhook serving");
    // SIGTERM: not ready at once (no new connections are routed here), answer for the drain period, then close.
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let drain = std::time::Duration::from_secs(args.drain_seconds);
    tokio::spawn(async move {
        shutdown_signal().await;
        webhook.start_draining();
        tracing::info!(
            seconds = drain.as_secs(),
            "draining: /readyz fails, reviews are still answered"
        );
        tokio::time::sleep(drain).await;
        let _ = closing_tx.send(true);
    });
    let closed = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|closing| *closing).await;
    };
    let client_ca = match &args.tls_client_ca_file {
        Some(path) => Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?),
        None => None,
    };
    let tls = server::tls_config(certs, client_ca.as_deref())?;
    let https = server::serve_tls(listener, tls, router.clone(), &args.limits, closed(closing.clone()));
    match args.admin_listen.0 {
        Some(addr) => {
            let admin = server::bind(addr).await?;
            tokio::join!(https, server::serve_plain(admin, router, &args.limits, closed(closing)));
        }
        None => https.await,
    }
    let _ = stop.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let _ = election.await;
        let _ = writing.await;
        let _ = injecting.await;
    })
    .await;
    tracing::info!("stopped");
    Ok(())
}
