//! Certificates from files (e.g. a mounted cert-manager Secret), re-read when they change.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};

use super::CertStore;

/// Loads the pair once; a pair that does not parse or whose key does not match fails the start.
pub(super) async fn load(store: &CertStore, cert: &Path, key: &Path) -> Result<()> {
    let c = tokio::fs::read(cert)
        .await
        .with_context(|| format!("reading {}", cert.display()))?;
    let k = tokio::fs::read(key)
        .await
        .with_context(|| format!("reading {}", key.display()))?;
    store
        .set_pem(&c, &k)
        .with_context(|| format!("loading {} and {}", cert.display(), key.display()))
}

/// Re-reads the files every two seconds; a change (e.g. cert-manager renewing the Secret behind a mounted
/// volume) takes effect on the next handshake. A broken pair is logged and the previous certificate kept.
pub(super) async fn watch(store: Arc<CertStore>, cert: PathBuf, key: PathBuf) {
    let mut last = (tokio::fs::read(&cert).await.ok(), tokio::fs::read(&key).await.ok());
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = (tokio::fs::read(&cert).await.ok(), tokio::fs::read(&key).await.ok());
        if now == last {
            continue;
        }
        if let (Some(c), Some(k)) = &now {
            match store.set_pem(c, k) {
                Ok(()) => tracing::info!(cert = %cert.display(), "serving certificate reloaded"),
                Err(e) => tracing::warn!(error = %e, "new certificate files are not usable; keeping the old ones"),
            }
        }
        last = now;
    }
}
