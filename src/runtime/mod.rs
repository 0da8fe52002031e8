//! What every long-running process shares: HTTP(S) serving, the webhook's certificates, metrics, logging, the
//! shutdown signal, listen addresses and the watch→state adapter.

pub mod certs;
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
