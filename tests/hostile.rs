//! The webhook server under hostile clients, as any pod could be one: the real operator process (real apiserver
//! behind its caches) while ≥ 200 connections each hold a nearly complete 2 MB body, ≥ 1 000 TLS connections
//! sit idle, a slowloris client trickles a request header and an HTTP/2 client opens every stream it may with
//! large bodies. Meanwhile the operator's memory stays bounded, real reviews are answered, and the slowloris
//! connection is closed.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::body::Bytes;
use common::*;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};
use tokio_rustls::{TlsConnector, client::TlsStream, rustls};

const HOLDERS: usize = 200;
const IDLE: usize = 1000;
const BODY: usize = 2_000_000;
const SENT: usize = 1_900_000;

fn connector(ca_pem: &str, alpn: &[u8]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// A TLS connection to the operator from `source` (a loopback address of its own, like another client host).
async fn connect(tls: &TlsConnector, port: u16, source: [u8; 4]) -> std::io::Result<TlsStream<TcpStream>> {
    let socket = TcpSocket::new_v4()?;
    socket.bind((std::net::Ipv4Addr::from(source), 0).into())?;
    let tcp = socket.connect(([127, 0, 0, 1], port).into()).await?;
    tls.connect(ServerName::try_from("127.0.0.1").unwrap(), tcp).await
}

fn review(namespace: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "2f1b1a4e-0000-4000-8000-000000000001",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace, "operation": "CREATE", "userInfo": {"username": "admin"},
            "object": {"metadata": {"name": "real", "namespace": namespace},
                       "spec": {"containers": [{"name": "app", "image": "app:1"}]}}
        }
    }))
    .unwrap()
}

/// Keeps `n` connections each holding `SENT` bytes of a `BODY`-byte request, reconnecting when the server cuts
/// one off (it does, at the request deadline).
fn hold_bodies(tls: TlsConnector, port: u16, n: usize, holding: Arc<AtomicUsize>) {
    for _ in 0..n {
        let (tls, holding) = (tls.clone(), holding.clone());
        tokio::spawn(async move {
            let head = format!(
                "POST /mutate HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {BODY}\r\n\r\n"
            );
            let chunk = vec![b' '; 64 << 10];
            loop {
                let Ok(mut conn) = connect(&tls, port, [127, 0, 0, 3]).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                if conn.write_all(head.as_bytes()).await.is_err() {
                    continue;
                }
                holding.fetch_add(1, Ordering::Relaxed);
                let mut sent = 0;
                while sent < SENT {
                    let n = chunk.len().min(SENT - sent);
                    if conn.write_all(&chunk[..n]).await.is_err() {
                        break;
                    }
                    sent += n;
                }
                // Stall: wait for the server to give up on us.
                let mut buf = [0u8; 1024];
                while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
                holding.fetch_sub(1, Ordering::Relaxed);
            }
        });
    }
}

/// Keeps `n` TLS connections open that never send a request.
fn hold_idle(tls: TlsConnector, port: u16, n: usize, open: Arc<AtomicUsize>) {
    for _ in 0..n {
        let (tls, open) = (tls.clone(), open.clone());
        tokio::spawn(async move {
            loop {
                let Ok(mut conn) = connect(&tls, port, [127, 0, 0, 4]).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                open.fetch_add(1, Ordering::Relaxed);
                let mut buf = [0u8; 64];
                while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
                open.fetch_sub(1, Ordering::Relaxed);
            }
        });
    }
}

/// An HTTP/2 connection that opens as many streams as it can, each a 2 MB POST that stalls after 1.9 MB.
async fn h2_streams(tls: TlsConnector, port: u16, opened: Arc<AtomicUsize>) {
    let Ok(conn) = connect(&tls, port, [127, 0, 0, 5]).await else {
        return;
    };
    let Ok((sender, connection)) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(conn)).await
    else {
        return;
    };
    tokio::spawn(connection);
    for _ in 0..200 {
        let mut sender = sender.clone();
        let opened = opened.clone();
        tokio::spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
            let body = StreamBody::new(tokio_stream_from(rx));
            let request = hyper::Request::post("https://127.0.0.1/mutate")
                .header("content-type", "application/json")
                .header("content-length", BODY.to_string())
                .body(body)
                .unwrap();
            if sender.ready().await.is_err() {
                return;
            }
            opened.fetch_add(1, Ordering::Relaxed);
            let feed = tokio::spawn(async move {
                let chunk = Bytes::from(vec![b' '; 64 << 10]);
                let mut sent = 0;
                while sent < SENT {
                    if tx.send(Ok(Frame::data(chunk.clone()))).await.is_err() {
                        return;
                    }
                    sent += chunk.len();
                }
                // Keep the stream open without finishing the body.
                std::future::pending::<()>().await;
                drop(tx);
            });
            let _ = sender.send_request(request).await;
            feed.abort();
        });
    }
}

/// A stream of a channel's items.
fn tokio_stream_from<T>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// One review over a kept keep-alive connection (as the apiserver keeps its connections): status, response.
async fn send_review(sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>, body: &[u8]) -> (u16, Value) {
    let request = hyper::Request::post("/mutate")
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_cannot_exhaust_the_webhook() {
    // This test holds over a thousand descriptors.
    keepalive_operator::runtime::raise_open_file_limit();
    let cp = control_plane();
    let dir = cp.work_dir().join("hostile");
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = write_serving_cert(&dir);
    let op = Operator::start(
        cp,
        "hostile",
        &[
            &format!("--tls-cert-file={}", cert.display()),
            &format!("--tls-key-file={}", key.display()),
        ],
    );
    let pid = op.pid().unwrap();
    let client = cp.client().await.unwrap();
    namespace_with_policy(&client, "hostile", (120, 10, 3)).await;
    let tls = connector(&ca, b"http/1.1");
    let body = review("hostile");

    // The apiserver's connection, opened before the attack and kept alive; the policy has reached the cache.
    let conn = connect(&tls, op.port, [127, 0, 0, 2]).await.unwrap();
    let (mut apiserver, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn)).await.unwrap();
    tokio::spawn(connection);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, review) = send_review(&mut apiserver, &body).await;
        if status == 200 && review["response"]["patch"].is_string() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the policy never reached the webhook's cache: {review}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = rss_mib(pid);

    // The slowloris client: a request line and one header byte a second, never the blank line.
    let (slow_tls, port) = (tls.clone(), op.port);
    let slowloris = tokio::spawn(async move {
        let mut conn = connect(&slow_tls, port, [127, 0, 0, 6]).await.unwrap();
        conn.write_all(b"POST /mutate HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: ")
            .await
            .unwrap();
        let start = Instant::now();
        loop {
            if conn.write_all(b"a").await.is_err() || conn.flush().await.is_err() {
                return start.elapsed();
            }
            let mut buf = [0u8; 256];
            match tokio::time::timeout(Duration::from_secs(1), conn.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
                Ok(Ok(_)) => return start.elapsed(), // an error response, then the close
                Err(_) => {}
            }
            if start.elapsed() > Duration::from_secs(60) {
                return start.elapsed();
            }
        }
    });

    let (holding, idle, streams) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    hold_bodies(tls.clone(), op.port, HOLDERS, holding.clone());
    hold_idle(tls.clone(), op.port, IDLE, idle.clone());
    for _ in 0..2 {
        tokio::spawn(h2_streams(connector(&ca, b"h2"), op.port, streams.clone()));
    }
    // Let the attack build up: bodies sent, idle connections open, streams opened.
    let build_up = Instant::now();
    while (holding.load(Ordering::Relaxed) < HOLDERS || idle.load(Ordering::Relaxed) < IDLE)
        && build_up.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "attack after {:.1} s: {} bodies held, {} idle connections, {} HTTP/2 requests started (the server admits 32 streams a connection)",
        build_up.elapsed().as_secs_f64(),
        holding.load(Ordering::Relaxed),
        idle.load(Ordering::Relaxed),
        streams.load(Ordering::Relaxed)
    );
    assert!(holding.load(Ordering::Relaxed) >= HOLDERS, "the body holders connected");
    assert!(idle.load(Ordering::Relaxed) >= IDLE, "the idle connections are open");

    // Under the attack: reviews over the apiserver's connection, and the operator's memory, for 10 s.
    let mut latencies = Vec::new();
    let mut peak = 0.0f64;
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        let start = Instant::now();
        let (status, response) = send_review(&mut apiserver, &body).await;
        latencies.push(start.elapsed());
        assert_eq!(status, 200, "{response}");
        assert!(response["response"]["patch"].is_string(), "mutated: {response}");
        peak = peak.max(rss_mib(pid));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = latencies[latencies.len() / 2];
    println!(
        "operator RSS {before:.1} MiB before, {peak:.1} MiB peak under attack; {} reviews: median {:.1} ms, max {:.1} ms",
        latencies.len(),
        ms(median),
        ms(*latencies.last().unwrap())
    );
    assert!(peak <= 128.0, "operator RSS {peak:.1} MiB under attack (limit 128 MiB)");
    assert!(
        median <= Duration::from_millis(100),
        "reviews took {:.1} ms (median) under attack",
        ms(median)
    );
    let slow = slowloris.await.unwrap();
    println!("slowloris connection closed after {:.1} s", slow.as_secs_f64());
    assert!(
        slow <= Duration::from_secs(30),
        "slowloris held for {:.0} s",
        slow.as_secs_f64()
    );
    assert!(op.logs().lines().all(|l| !l.contains("panicked")), "{}", op.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_before_closing() {
    let cp = control_plane();
    let dir = cp.work_dir().join("drain");
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = write_serving_cert(&dir);
    let mut op = Operator::start(
        cp,
        "drain",
        &[
            &format!("--tls-cert-file={}", cert.display()),
            &format!("--tls-key-file={}", key.display()),
            "--drain-seconds=4",
        ],
    );
    let tls = connector(&ca, b"http/1.1");
    let body = review("drain");
    let conn = connect(&tls, op.port, [127, 0, 0, 2]).await.unwrap();
    let (mut apiserver, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn)).await.unwrap();
    let connection = tokio::spawn(connection);
    assert_eq!(send_review(&mut apiserver, &body).await.0, 200);

    let pid = rustix::process::Pid::from_raw(op.pid().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let term = Instant::now();
    // Not ready at once, so no new connections are routed here ...
    let admin = op.admin_port;
    eventually(Duration::from_secs(2), "/readyz to fail", || async move {
        let (status, body) = xtask::cluster::http_get(admin, "/readyz")?;
        (status == 503 && body.contains("draining")).then_some(())
    })
    .await;
    // ... while the kept connection and new ones are still answered during the drain.
    let mut answered = 0;
    while term.elapsed() < Duration::from_secs(3) {
        let (status, response) = send_review(&mut apiserver, &body).await;
        assert_eq!(status, 200, "{response}");
        let mut fresh = match connect(&tls, op.port, [127, 0, 0, 2]).await {
            Ok(conn) => conn,
            Err(e) => panic!("a new connection during the drain: {e}\n{}", op.logs()),
        };
        fresh
            .write_all(b"GET /livez HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        fresh.read_to_string(&mut reply).await.unwrap_or_default();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        answered += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(answered >= 2, "reviews answered during the drain: {answered}");
    // Then the connection is closed gracefully and the process exits.
    tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the kept connection closed after the drain")
        .unwrap()
        .unwrap();
    eventually(Duration::from_secs(10), "the process to exit", || {
        let running = op.running();
        async move { (!running).then_some(()) }
    })
    .await;
    let closed = term.elapsed();
    println!("SIGTERM: drained and exited after {:.1} s", closed.as_secs_f64());
    assert!(closed >= Duration::from_secs(4), "exited before the drain period ended");
}

/// A CA and a client certificate it signed (ClientAuth), as PEM: (ca, cert, key).
fn client_pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["kube-apiserver".to_string()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    (
        ca_pem,
        params.signed_by(&key, &issuer).unwrap().pem(),
        key.serialize_pem(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_clients_with_the_configured_ca_get_an_answer() {
    let cp = control_plane();
    let dir = cp.work_dir().join("client-ca");
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = write_serving_cert(&dir);
    let (client_ca, client_cert, client_key) = client_pki();
    let client_ca_file = dir.join("client-ca.crt");
    std::fs::write(&client_ca_file, &client_ca).unwrap();
    let op = Operator::start(
        cp,
        "client-ca",
        &[
            &format!("--tls-cert-file={}", cert.display()),
            &format!("--tls-key-file={}", key.display()),
            &format!("--tls-client-ca-file={}", client_ca_file.display()),
        ],
    );
    let body = review("client-ca");
    let ask = |tls: TlsConnector| {
        let body = body.clone();
        async move {
            let conn = connect(&tls, op.port, [127, 0, 0, 2]).await?;
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(connection);
            let request = hyper::Request::post("/mutate")
                .header("host", "127.0.0.1")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let response = sender.send_request(request).await.map_err(std::io::Error::other)?;
            Ok::<u16, std::io::Error>(response.status().as_u16())
        }
    };
    // Without a client certificate: no answer (TLS 1.3 reports the refusal on the first read).
    assert!(
        ask(connector(&ca, b"http/1.1")).await.is_err(),
        "answered a client without a certificate"
    );
    // With a certificate of another CA: refused too.
    let (_, other_cert, other_key) = client_pki();
    assert!(
        ask(client_connector(&ca, &other_cert, &other_key)).await.is_err(),
        "answered a foreign client"
    );
    // With the apiserver's certificate: answered.
    assert_eq!(
        ask(client_connector(&ca, &client_cert, &client_key)).await.unwrap(),
        200
    );
}

fn client_connector(ca_pem: &str, cert_pem: &str, key_pem: &str) -> TlsConnector {
    use rustls_pki_types::PrivateKeyDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    TlsConnector::from(Arc::new(config))
}
