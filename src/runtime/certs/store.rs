//! The certificate rustls serves, swapped without a restart, and whether it is usable right now.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use arc_swap::ArcSwapOption;
use axum::{
    Router,
    extract::Request,
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use time::OffsetDateTime;
use tokio_rustls::rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// Hands rustls the current certificate on every handshake.
#[derive(Debug, Default)]
pub struct CertStore {
    current: ArcSwapOption<Served>,
}

#[derive(Debug)]
struct Served {
    key: Arc<CertifiedKey>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().map(|s| s.key.clone())
    }
}

impl CertStore {
    /// Replaces the certificate from PEM text. Refuses (keeping the current one) a chain that does not parse or
    /// whose first certificate is not the private key's.
    pub fn set_pem(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<()> {
        let certs = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .context("parsing the certificate PEM")?;
        let Some(leaf) = certs.first() else {
            bail!("no certificate in the PEM");
        };
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf).context("parsing the certificate")?;
        let (not_before, not_after) = (
            parsed.validity().not_before.to_datetime(),
            parsed.validity().not_after.to_datetime(),
        );
        let key = PrivateKeyDer::from_pem_slice(key_pem).context("parsing the private key PEM")?;
        let key = tokio_rustls::rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| anyhow!("unsupported private key: {e}"))?;
        let key = CertifiedKey::new(certs, key);
        key.keys_match()
            .map_err(|e| anyhow!("the private key does not belong to the certificate: {e}"))?;
        self.current.store(Some(Arc::new(Served {
            key: Arc::new(key),
            not_before,
            not_after,
        })));
        Ok(())
    }

    /// A certificate is loaded and valid at this moment (its key was checked when it was loaded).
    pub fn usable(&self) -> bool {
        let now = OffsetDateTime::now_utc();
        self.current
            .load()
            .as_ref()
            .is_some_and(|s| s.not_before <= now && now < s.not_after)
    }

    /// The DER of the certificate served now.
    pub fn served_der(&self) -> Option<Vec<u8>> {
        let current = self.current.load();
        Some(current.as_ref()?.key.end_entity_cert().ok()?.to_vec())
    }
}

/// Answers `/readyz` with 503 while the served certificate is not usable; otherwise the router decides.
pub fn gate_readiness(router: Router, store: Arc<CertStore>) -> Router {
    router.layer(middleware::from_fn(move |request: Request, next: Next| {
        let store = store.clone();
        async move {
            if request.uri().path() == "/readyz" && !store.usable() {
                return (StatusCode::SERVICE_UNAVAILABLE, "serving certificate not usable").into_response();
            }
            let response: Response = next.run(request).await;
            response
        }
    }))
}
