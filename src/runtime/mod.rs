//! What every long-running process shares: HTTP(S) serving, the webhook's certificates, metrics, logging, the
//! shutdown signal, listen addresses and the watch→state adapter.

pub mod certs;
pub mod limits;
pub mod listen;
pub mod metrics;
pub mod server;
pub mod telemetry;
pub mod watch;

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Lifts the soft limit on open files to the hard limit: the agent holds descriptors per pod, the webhook one per
/// connection (up to `--max-connections`).
pub fn raise_open_file_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_some() && limit.current < limit.maximum.or(Some(u64::MAX)) {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
        }
    }
}
