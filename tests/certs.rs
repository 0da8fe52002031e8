//! Self-managed certificates on the real apiserver: a bad Secret (garbage, a foreign key, lying annotations, an
//! expired certificate or CA) is healed by re-issuing, and the real operator process then answers AdmissionReviews
//! over TLS verified against the caBundle of its MutatingWebhookConfiguration, without ever exiting; a CA rotation
//! with two replicas under load fails no admission.
//!
//! The tests run one at a time (they time healing, and the rotation test loads the machine).

mod common;

use std::{
    collections::BTreeSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    core::v1::{Pod, Secret},
};
use keepalive_operator::runtime::certs::{Lifetimes, Pki, Settings, Step, apply};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde_json::json;
use time::OffsetDateTime;
use tokio_rustls::{
    TlsConnector,
    rustls::{
        self, RootCertStore,
        pki_types::{CertificateDer, ServerName, pem::PemObject},
    },
};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SECRET: &str = "webhook-tls";
const NAMES: [&str; 5] = [
    "keepalive-operator",
    "keepalive-operator.NS",
    "keepalive-operator.NS.svc",
    "keepalive-operator.NS.svc.cluster.local",
    "127.0.0.1",
];
/// How long the operator may take to heal a bad Secret.
const HEALING: Duration = Duration::from_secs(10);

/// Operators sharing one Secret (in their own namespace) and one webhook configuration pointing at the first.
struct Setup {
    client: Client,
    ns: String,
    config: String,
    ops: Vec<Operator>,
}

impl Setup {
    async fn start(name: &str, replicas: usize, extra: &[&str]) -> Setup {
        let cp = control_plane();
        let client = cp.client().await.unwrap();
        let ns = format!("certs-{name}");
        namespace(&client, &ns, &[]).await;
        namespace(&client, &format!("{ns}-pods"), &[("scope", &ns)]).await;
        let config = format!("keepalive-certs-{name}");
        let args: Vec<String> = [
            format!("--namespace={ns}"),
            format!("--tls-secret={SECRET}"),
            "--tls-extra-sans=127.0.0.1".into(),
            format!("--webhook-configuration={config}"),
        ]
        .into_iter()
        .chain(extra.iter().map(|a| a.to_string()))
        .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let ops: Vec<Operator> = (0..replicas)
            .map(|i| Operator::start(cp, &format!("certs-{name}-{i}"), &args))
            .collect();
        // Registered without a caBundle, as a chart would before the operator runs.
        register_webhook(&client, &config, &ops[0].url(), None, &ns).await;
        Setup {
            client,
            ns,
            config,
            ops,
        }
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn pki(&self) -> Option<Pki> {
        let secret = self.secrets().get_opt(SECRET).await.ok()??;
        Some(Pki::from_data(secret.data.as_ref()?))
    }

    async fn bundle(&self) -> Option<String> {
        let config = Api::<MutatingWebhookConfiguration>::all(self.client.clone())
            .get(&self.config)
            .await
            .ok()?;
        let bundle = config.webhooks?.first()?.client_config.ca_bundle.clone()?;
        String::from_utf8(bundle.0).ok()
    }

    /// The Secret's serving certificate is what replica 0 serves, verified against the caBundle, for a review it
    /// answers; the certificate is none of `not`.
    async fn serving_from_secret(&self, not: &[&str]) -> Option<Pki> {
        let pki = self.pki().await?;
        if not.contains(&pki.cert.as_str()) {
            return None;
        }
        let served = review(self.ops[0].port, &self.bundle().await?).await.ok()?;
        (Some(served) == first_der(&pki.cert)).then_some(pki)
    }

    /// Waits until the operator serves what its Secret holds, trusted by the caBundle.
    async fn settled(&self) -> Pki {
        eventually(
            Duration::from_secs(30),
            "the operator to serve its Secret's certificate",
            || self.serving_from_secret(&[]),
        )
        .await
    }

    /// Writes `bad` into the Secret (with `annotations`), then waits for the operator to heal it; returns the
    /// healed PKI.
    async fn heal(&mut self, good: &Pki, bad: &Pki, annotations: &[(&str, &str)]) -> Pki {
        let secrets = self.secrets();
        for attempt in 0.. {
            let mut secret = secrets.get(SECRET).await.unwrap();
            secret.data = Some(bad.to_data());
            let a = secret.metadata.annotations.get_or_insert_default();
            a.extend(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            match secrets.replace(SECRET, &PostParams::default(), &secret).await {
                Ok(_) => break,
                Err(e) => assert!(attempt < 5, "writing the bad Secret: {e}"),
            }
        }
        let written = Instant::now();
        let replaced = [good.cert.as_str(), bad.cert.as_str()];
        let healed = eventually(HEALING, "the operator to heal the Secret and serve it", || {
            self.serving_from_secret(&replaced)
        })
        .await;
        eprintln!("healed after {:?}", written.elapsed());
        for op in &mut self.ops {
            assert!(op.running(), "the operator exited:\n{}", op.logs());
        }
        healed
    }
}

/// One AdmissionReview over a new TLS connection to `127.0.0.1:port`, trusting only the CAs of `bundle`; the
/// answer must be an allowed response to this review. Returns the served certificate (DER).
async fn review(port: u16, bundle: &str) -> Result<Vec<u8>, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots
            .add(cert.map_err(|e| format!("caBundle: {e}"))?)
            .map_err(|e| format!("caBundle: {e}"))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let served = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        tokio::spawn(conn);
        let uid = format!("review-{}", OffsetDateTime::now_utc().unix_timestamp_nanos());
        let body = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "default", "operation": "CREATE", "userInfo": {"username": "test"},
                "object": {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app", "image": "x"}]}},
            },
        });
        let request = hyper::Request::post("/mutate")
            .header("host", "127.0.0.1")
            .header("content-type", "application/json")
            .body(Full::new(hyper::body::Bytes::from(body.to_string())))
            .unwrap();
        let response = sender.send_request(request).await.map_err(|e| format!("HTTP: {e}"))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("HTTP: {e}"))?
            .to_bytes();
        let answer: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| format!("answer: {e}"))?;
        let response = &answer["response"];
        if status != 200 || response["uid"] != json!(uid) || response["allowed"] != json!(true) {
            return Err(format!("unexpected answer {status}: {answer}"));
        }
        Ok(served)
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "no answer within 5 s".to_string())?
}

fn first_der(pem: &str) -> Option<Vec<u8>> {
    Some(CertificateDer::pem_slice_iter(pem.as_bytes()).next()?.ok()?.to_vec())
}

fn names(ns: &str) -> Vec<String> {
    NAMES.iter().map(|n| n.replace("NS", ns)).collect()
}

fn ca_count(bundle: &str) -> usize {
    bundle.matches("BEGIN CERTIFICATE").count()
}

/// A serving certificate for `names`, valid `from`..`until`, signed by the CA of `pki`.
fn serving_cert(pki: &Pki, names: &[String], from: OffsetDateTime, until: OffsetDateTime) -> (String, String) {
    let issuer = Issuer::from_ca_cert_pem(&pki.ca, KeyPair::from_pem(&pki.ca_key).unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(names.to_vec()).unwrap();
    (params.not_before, params.not_after) = (from, until);
    (params.signed_by(&key, &issuer).unwrap().pem(), key.serialize_pem())
}

fn days(d: i64) -> time::Duration {
    time::Duration::days(d)
}

#[tokio::test]
async fn garbage_serving_certificate_is_reissued_from_the_same_ca() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut s = Setup::start("garbage", 1, &[]).await;
    let good = s.settled().await;
    let bad = Pki {
        cert: "-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n".into(),
        ..good.clone()
    };
    let healed = s.heal(&good, &bad, &[]).await;
    assert_eq!(
        healed.ca, good.ca,
        "the CA is good: only the serving certificate is re-issued"
    );
    assert!(
        s.ops[0].logs().contains("not a PEM X.509 certificate"),
        "{}",
        s.ops[0].logs()
    );
}

#[tokio::test]
async fn mismatched_key_is_reissued() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut s = Setup::start("mismatch", 1, &[]).await;
    let good = s.settled().await;
    let bad = Pki {
        key: KeyPair::generate().unwrap().serialize_pem(),
        ..good.clone()
    };
    let healed = s.heal(&good, &bad, &[]).await;
    assert_eq!(healed.ca, good.ca);
    assert!(
        s.ops[0].logs().contains("private key does not match"),
        "{}",
        s.ops[0].logs()
    );
}

#[tokio::test]
async fn lying_annotations_are_not_trusted() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut s = Setup::start("lying", 1, &[]).await;
    let good = s.settled().await;
    let now = OffsetDateTime::now_utc();
    let lies = [
        ("keepalive.dev/not-after", "2099-01-01T00:00:00Z"),
        ("keepalive.dev/dns-names", &names(&s.ns).join(",")),
    ];
    // The annotation says 2099; the certificate expires in two days.
    let (cert, key) = serving_cert(&good, &names(&s.ns), now - days(1), now + days(2));
    let soon = Pki {
        cert,
        key,
        ..good.clone()
    };
    let healed = s.heal(&good, &soon, &lies).await;
    let not_after = not_after(&healed.cert);
    assert!(not_after > now + days(300), "renewed for a year, got {not_after}");

    // The annotation lists the right names; the certificate has others.
    let (cert, key) = serving_cert(&healed, &["wrong.example".to_string()], now - days(1), now + days(300));
    let wrong = Pki {
        cert,
        key,
        ..healed.clone()
    };
    s.heal(&healed, &wrong, &lies).await;
}

#[tokio::test]
async fn expired_serving_certificate_is_reissued() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut s = Setup::start("expired", 1, &[]).await;
    let good = s.settled().await;
    let now = OffsetDateTime::now_utc();
    let (cert, key) = serving_cert(&good, &names(&s.ns), now - days(30), now - days(1));
    let healed = s
        .heal(
            &good,
            &Pki {
                cert,
                key,
                ..good.clone()
            },
            &[],
        )
        .await;
    assert_eq!(healed.ca, good.ca);
}

#[tokio::test]
async fn expired_ca_is_replaced() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut s = Setup::start("expired-ca", 1, &[]).await;
    let good = s.settled().await;
    let now = OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    (params.not_before, params.not_after) = (now - days(400), now - days(1));
    let expired = Pki {
        ca: params.self_signed(&ca_key).unwrap().pem(),
        ca_key: ca_key.serialize_pem(),
        ..Pki::default()
    };
    // Its serving certificate is still valid: only the CA is at fault.
    let (cert, key) = serving_cert(&expired, &names(&s.ns), now - days(30), now + days(300));
    let bad = Pki { cert, key, ..expired };
    let healed = s.heal(&good, &bad, &[]).await;
    assert_ne!(healed.ca, bad.ca);
    assert_eq!(healed.previous_ca, None, "an expired CA is not worth trusting");
    let bundle = s.bundle().await.unwrap();
    assert_eq!(ca_count(&bundle), 1, "{bundle}");
}

fn not_after(pem: &str) -> OffsetDateTime {
    let der = first_der(pem).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    cert.validity().not_after.to_datetime()
}

fn issuer_name(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.issuer().to_string()
}

/// Counts of one load loop.
#[derive(Default)]
struct Tally {
    answered: usize,
    failures: Vec<String>,
    issuers: BTreeSet<String>,
}

impl Tally {
    /// An answer (with the issuer of the certificate that served it) or a failure of loop `i`.
    fn count(&mut self, result: Result<String, String>, i: usize) {
        match result {
            Ok(issuer) => {
                self.answered += 1;
                self.issuers.insert(issuer);
            }
            Err(e) => self.failures.push(format!("loop {i}: {e}")),
        }
    }
}

#[tokio::test]
async fn ca_rotation_with_two_replicas_fails_no_admission() {
    let _one = ONE_AT_A_TIME.lock().await;
    // A CA lives 60 s and is rotated 40 s before its end, each phase lasting 5 s: a rotation every ~20 s.
    let lifetimes = [
        "--tls-ca-validity=60s",
        "--tls-ca-renew-before=40s",
        "--tls-ca-overlap=5s",
        "--tls-serving-validity=60s",
        "--tls-renew-before=10s",
    ];
    let s = Arc::new(Setup::start("rotation", 2, &lifetimes).await);
    s.settled().await;
    // The apiserver calls replica 0 and refuses pods when it cannot: every failed call is a failed admission.
    Api::<MutatingWebhookConfiguration>::all(s.client.clone())
        .patch(
            &s.config,
            &PatchParams::default(),
            &Patch::Strategic(json!({"webhooks": [{"name": "pods.keepalive.dev", "failurePolicy": "Fail"}]})),
        )
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let tallies: Vec<Arc<Mutex<Tally>>> = (0..3).map(|_| Arc::default()).collect();
    let mut loops = Vec::new();
    for (i, port) in s.ops.iter().map(|op| op.port).enumerate() {
        let (s, stop, tally) = (s.clone(), stop.clone(), tallies[i].clone());
        loops.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let result = match s.bundle().await {
                    Some(bundle) => review(port, &bundle).await,
                    None => Err("no caBundle".to_string()),
                };
                tally
                    .lock()
                    .unwrap()
                    .count(result.map(|served| issuer_name(&served)), i);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    let (pods_s, pods_stop, pods_tally) = (s.clone(), stop.clone(), tallies[2].clone());
    loops.push(tokio::spawn(async move {
        let pods: Api<Pod> = Api::namespaced(pods_s.client.clone(), &format!("{}-pods", pods_s.ns));
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"generateName": "load-"},
            "spec": {"containers": [{"name": "app", "image": "x"}]},
        }))
        .unwrap();
        let dry_run = PostParams {
            dry_run: true,
            ..Default::default()
        };
        while !pods_stop.load(Ordering::Relaxed) {
            let result = pods.create(&dry_run, &pod).await;
            let result = result.map(|_| "apiserver".to_string()).map_err(|e| e.to_string());
            pods_tally.lock().unwrap().count(result, 2);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }));

    // Two complete rotations: three CAs in turn, and the last one alone in the caBundle again.
    let mut cas = BTreeSet::new();
    let mut phases = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        if let Some(pki) = s.pki().await {
            cas.insert(pki.ca.clone());
            phases.insert(match (&pki.next_ca, &pki.previous_ca) {
                (Some(_), _) => "announced",
                (None, Some(_)) => "switched",
                (None, None) => "settled",
            });
            if cas.len() >= 3 && pki.next_ca.is_none() && pki.previous_ca.is_none() {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no two rotations in 150 s: {} CAs",
            cas.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }

    assert_eq!(phases.len(), 3, "every phase seen: {phases:?}");
    assert_eq!(ca_count(&s.bundle().await.unwrap()), 1, "the old CA dropped at the end");
    for (i, tally) in tallies.iter().enumerate() {
        let tally = tally.lock().unwrap();
        eprintln!(
            "loop {i}: {} answered, {} failed, served by CAs {:?}",
            tally.answered,
            tally.failures.len(),
            tally.issuers
        );
        assert!(tally.failures.is_empty(), "failed admissions: {:#?}", tally.failures);
        assert!(tally.answered >= 50, "loop {i} answered only {}", tally.answered);
        if i < 2 {
            assert!(tally.issuers.len() >= 3, "replica {i} served from {:?}", tally.issuers);
        }
    }
    // The apiserver's calls reached replica 0 too: its reviews are at least those of its loop and the apiserver's.
    let reviews: f64 = s.ops[0]
        .metrics()
        .lines()
        .filter(|l| l.starts_with("keepalive_webhook_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let expected = tallies[0].lock().unwrap().answered + tallies[2].lock().unwrap().answered;
    assert!(
        reviews >= expected as f64,
        "replica 0 answered {reviews} reviews, expected {expected}"
    );
    let s = Arc::into_inner(s).expect("the loops are done");
    for mut op in s.ops {
        assert!(op.running(), "a replica exited:\n{}", op.logs());
    }
}

#[tokio::test]
async fn readyz_is_not_ok_while_the_served_certificate_is_expired() {
    let _one = ONE_AT_A_TIME.lock().await;
    let cp = control_plane();
    let dir = cp.work_dir().join("certs-readyz");
    std::fs::create_dir_all(&dir).unwrap();
    let settings = Settings {
        dns_names: vec!["127.0.0.1".into()],
        lifetimes: Lifetimes::default(),
    };
    let issued_long_ago = OffsetDateTime::now_utc() - days(400);
    let expired = apply(Step::ReplaceCa, &Pki::default(), None, &settings, issued_long_ago).unwrap();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert, &expired.cert).unwrap();
    std::fs::write(&key, &expired.key).unwrap();
    let admin_port = xtask::cluster::free_port().unwrap();
    let args: Vec<String> = vec![
        "controller".into(),
        format!("--listen=127.0.0.1:{}", xtask::cluster::free_port().unwrap()),
        format!("--admin-listen=127.0.0.1:{admin_port}"),
        format!("--tls-cert-file={}", cert.display()),
        format!("--tls-key-file={}", key.display()),
        "--leader-elect=false".into(),
        "--injection-mode=webhook".into(),
    ];
    let mut op = HostProcess::spawn(cp, "certs-readyz", &args, cp.kubeconfig());
    let readyz = || xtask::cluster::http_get(admin_port, "/readyz");
    let refused = eventually(Duration::from_secs(30), "/readyz to answer", || async { readyz() }).await;
    assert_eq!(
        refused,
        (503, "serving certificate not usable".to_string()),
        "{}",
        op.logs()
    );
    // A valid pair in the files: reloaded, and ready.
    let fresh = keepalive_operator::runtime::certs::issue(&["127.0.0.1".to_string()]).unwrap();
    std::fs::write(&key, &fresh.key).unwrap();
    std::fs::write(&cert, &fresh.cert).unwrap();
    op.wait_ready(admin_port);
    assert!(op.running());
}
