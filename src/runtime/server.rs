//! HTTPS (TLS 1.2+, HTTP/1.1 and HTTP/2) and plain-HTTP serving of an axum router, within [`LimitArgs`]:
//! bounded connections, header-read and TLS-handshake timeouts, bounded HTTP/2 streams and windows with
//! keep-alive pings, back-off on accept errors, and a graceful end (GOAWAY, in-flight requests finished).

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use axum::Router;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{
        conn::auto,
        graceful::{GracefulShutdown, Watcher},
    },
    service::TowerToHyperService,
};
use rustls_pki_types::pem::PemObject;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{self, server::ResolvesServerCert},
};

use super::limits::LimitArgs;

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A rustls server configuration whose certificate comes from `resolver` on every handshake, so a new
/// certificate takes effect without a restart. With `client_ca` (PEM), every client must present a certificate
/// that CA signed (the apiserver's admission client certificate); others fail the handshake.
pub fn tls_config(
    resolver: Arc<dyn ResolvesServerCert>,
    client_ca: Option<&[u8]>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("TLS 1.2 and 1.3 are supported by ring");
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
                roots
                    .add(cert.context("parsing the client CA PEM")?)
                    .context("adding the client CA")?;
            }
            anyhow::ensure!(!roots.is_empty(), "no certificate in the client CA PEM");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("building the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A listener's connection handling: the HTTP builder with the limits, the open-connection bound and the
/// graceful-shutdown tracker.
struct Connections {
    builder: Arc<auto::Builder<TokioExecutor>>,
    slots: Arc<Semaphore>,
    graceful: GracefulShutdown,
    request_timeout: Duration,
}

impl Connections {
    fn new(limits: &LimitArgs) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout())
            .max_buf_size(64 << 10);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(64 << 10)
            .initial_stream_window_size(256 << 10)
            .initial_connection_window_size(512 << 10)
            .max_pending_accept_reset_streams(Some(50))
            .keep_alive_interval(Some(Duration::from_secs(20)))
            .keep_alive_timeout(Duration::from_secs(20));
        Connections {
            builder: Arc::new(builder),
            slots: Arc::new(Semaphore::new(limits.max_connections as usize)),
            graceful: GracefulShutdown::new(),
            request_timeout: limits.request_timeout(),
        }
    }

    /// Accepts until `shutdown` completes, handing each connection (with its slot and its handle) to `serve`.
    async fn accept_loop<F, Fut>(&self, listener: &TcpListener, shutdown: impl Future<Output = ()>, serve: F)
    where
        F: Fn(TcpStream, SocketAddr, Connection) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff = Duration::from_millis(5);
        loop {
            let slot = tokio::select! {
                slot = self.slots.clone().acquire_owned() => slot.expect("the connection slots are never closed"),
                _ = &mut shutdown => return,
            };
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of descriptors, say: wait before trying again rather than spin.
                        tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                },
                _ = &mut shutdown => return,
            };
            backoff = Duration::from_millis(5);
            let _ = tcp.set_nodelay(true);
            let connection = Connection {
                builder: self.builder.clone(),
                watcher: self.graceful.watcher(),
                _slot: slot,
            };
            tokio::spawn(serve(tcp, peer, connection));
        }
    }

    /// After the accept loop: GOAWAY / close to every connection, then wait for requests in flight (at most
    /// one request timeout).
    async fn finish(self) {
        let open = self.graceful.count();
        if tokio::time::timeout(self.request_timeout + Duration::from_secs(1), self.graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(open, "connections still open after the drain");
        }
    }
}

/// One accepted connection: its slot among the open connections, and what serves it.
struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Connection {
    /// Serves the connection's HTTP; it ends gracefully when the server shuts down.
    async fn serve<I>(self, io: I, router: Router)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let conn = self
            .builder
            .serve_connection_with_upgrades(io, TowerToHyperService::new(router));
        if let Err(e) = self.watcher.watch(conn.into_owned()).await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }
}

/// Serves `router` over TLS on `listener` until `shutdown` completes, then ends every connection gracefully.
pub async fn serve_tls(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    router: Router,
    limits: &LimitArgs,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(config);
    let connections = Connections::new(limits);
    connections
        .accept_loop(&listener, shutdown, |tcp, peer, connection| {
            let (acceptor, router) = (acceptor.clone(), router.clone());
            async move {
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => connection.serve(TokioIo::new(tls), router).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            }
        })
        .await;
    drop(listener);
    connections.finish().await;
}

/// Serves `router` over plain HTTP (the admin port: probes and metrics) until `shutdown` completes.
pub async fn serve_plain(
    listener: TcpListener,
    router: Router,
    limits: &LimitArgs,
    shutdown: impl Future<Output = ()>,
) {
    let connections = Connections::new(limits);
    connections
        .accept_loop(&listener, shutdown, |tcp, _, connection| {
            connection.serve(TokioIo::new(tcp), router.clone())
        })
        .await;
    drop(listener);
    connections.finish().await;
}

/// Binds a listener, with the address in the error.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))
}
