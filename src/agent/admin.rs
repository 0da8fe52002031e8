//! The agent's plain-HTTP admin port: probes and metrics.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use crate::runtime::metrics::Registry;

/// What the agent's probes look at.
#[derive(Clone)]
pub struct Health {
    pub ready: Arc<AtomicBool>,
    pub last_scan: Arc<AtomicU64>,
    pub started_at: std::time::Instant,
    pub stuck_after: u64,
}

/// /livez (scans keep completing), /readyz (its first report is written: it can see pods and write), /metrics.
pub fn router(registry: Arc<Registry>, health: Health) -> axum::Router {
    use axum::{http::StatusCode, routing::get};
    let ready = health.ready.clone();
    axum::Router::new()
        .route(
            "/livez",
            get(move || {
                let last = health.last_scan.load(Ordering::Relaxed);
                let since = health.started_at.elapsed().as_secs().saturating_sub(last);
                async move {
                    if last == 0 || since <= health.stuck_after {
                        (StatusCode::OK, "ok".to_string())
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("no scan completed for {since} s"),
                        )
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "no node report written yet")
                    }
                }
            }),
        )
        .merge(crate::runtime::metrics::router(registry))
}
