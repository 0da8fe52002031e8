//! Leader election that cannot split, against the real apiserver with real operator processes: a leader whose
//! connection to the apiserver turns into a black hole stops leading before another replica starts, and a
//! replica whose clock runs 15 s ahead does not take a lease that is being renewed. Every test elects through a
//! Lease of its own and watches each replica's `keepalive_leader` gauge every 100 ms.

mod common;

use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::coordination::v1::Lease;
use keepalive_operator::api::KeepalivePolicy;
use kube::{Api, Client};
use serde_json::json;

use self::proxy::BlackHoleProxy;

/// The TCP proxy the test controls: forwards to the apiserver until told to black-hole.
mod proxy {
    use std::sync::Arc;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{
            TcpListener, TcpStream,
            tcp::{OwnedReadHalf, OwnedWriteHalf},
        },
        sync::watch,
    };

    pub struct BlackHoleProxy {
        pub port: u16,
        hole: Arc<watch::Sender<bool>>,
    }

    impl BlackHoleProxy {
        /// Listens on a free port of 127.0.0.1 and forwards every connection to `upstream` on 127.0.0.1, on a
        /// thread of its own (whatever the test's runtime does meanwhile).
        pub fn start(upstream: u16) -> BlackHoleProxy {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let port = listener.local_addr().unwrap().port();
            let hole = Arc::new(watch::channel(false).0);
            let rx = hole.subscribe();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).unwrap();
                    while let Ok((down, _)) = listener.accept().await {
                        let hole = rx.clone();
                        tokio::spawn(async move {
                            let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                                return;
                            };
                            let (down_read, down_write) = down.into_split();
                            let (up_read, up_write) = up.into_split();
                            tokio::join!(pump(down_read, up_write, hole.clone()), pump(up_read, down_write, hole));
                        });
                    }
                });
            });
            BlackHoleProxy { port, hole }
        }

        /// From now on no byte passes in either direction, on open and new connections alike; every socket stays
        /// open (no reset, no close), as when packets are dropped on the way.
        pub fn black_hole(&self) {
            self.hole.send_replace(true);
        }
    }

    async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut hole: watch::Receiver<bool>) {
        let mut buf = vec![0; 64 * 1024];
        loop {
            // In the black hole nothing is read (or written): the sockets stay open with the bytes unread.
            if hole.wait_for(|h| !*h).await.is_err() {
                return;
            }
            let n = tokio::select! {
                n = from.read(&mut buf) => match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
                _ = hole.wait_for(|h| *h) => continue,
            };
            // Bytes read just before the switch are held, not delivered.
            if hole.wait_for(|h| !*h).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
}

/// A replica electing through `lease`, reaching the apiserver through `kubeconfig` (default: directly).
fn replica(
    cp: &xtask::ControlPlane,
    name: &str,
    lease: &str,
    extra: &[&str],
    kubeconfig: Option<&std::path::Path>,
) -> Operator {
    let mut args = vec![
        format!("--lease-name={lease}"),
        "--namespace=keepalive-system".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Operator::start_with_kubeconfig(cp, name, &args, kubeconfig.unwrap_or(cp.kubeconfig()))
}

/// The replica's `keepalive_leader` gauge; None when its admin port does not answer.
fn leads(op: &Operator) -> Option<bool> {
    op.metrics().lines().find_map(|l| match l {
        "keepalive_leader 1" => Some(true),
        "keepalive_leader 0" => Some(false),
        _ => None,
    })
}

/// The identity the operator named `name` uses in the Lease (its POD_NAME, set by the fixture).
fn identity(name: &str) -> String {
    format!("operator-{name}-on-host")
}

async fn holder(client: &Client, lease: &str) -> Option<String> {
    let lease = Api::<Lease>::namespaced(client.clone(), "keepalive-system")
        .get_opt(lease)
        .await
        .ok()??;
    lease.spec?.holder_identity
}

/// Samples both gauges every 100 ms until `stop` says so or `limit` passes; panics if both replicas ever lead at
/// once. Returns the time of the first sample for which `stop` held.
async fn watch_leaders(
    a: &Operator,
    b: &Operator,
    limit: Duration,
    what: &str,
    stop: impl Fn(Option<bool>, Option<bool>) -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        let (la, lb) = (leads(a), leads(b));
        assert!(
            !(la == Some(true) && lb == Some(true)),
            "two leaders at once, {:?} into {what}:\n--- A ---\n{}\n--- B ---\n{}",
            start.elapsed(),
            a.logs(),
            b.logs()
        );
        if stop(la, lb) {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

async fn wait_for_policy_count(client: &Client, policy: &str, matched: i32, what: &str) {
    let api: Api<KeepalivePolicy> = Api::all(client.clone());
    eventually(Duration::from_secs(30), what, || async {
        let p = api.get_opt(policy).await.ok()??;
        (p.status?.matched_pods == Some(matched)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_black_holed_leader_steps_down_before_another_replica_takes_over() {
    let cp = control_plane();
    let client = cp.client().await.unwrap();
    ensure_namespace(&client, "keepalive-system").await;
    let apiserver: u16 = cp.server().rsplit(':').next().unwrap().parse().unwrap();
    let proxy = BlackHoleProxy::start(apiserver);
    let kubeconfig = cp.work_dir().join("kubeconfig-blackhole-a");
    let admin = std::fs::read_to_string(cp.kubeconfig()).unwrap();
    std::fs::write(
        &kubeconfig,
        admin.replace(&cp.server(), &format!("https://127.0.0.1:{}", proxy.port)),
    )
    .unwrap();

    // A starts first, through the proxy, and leads; B starts after it.
    let a = replica(cp, "blackhole-a", "blackhole", &[], Some(&kubeconfig));
    eventually(Duration::from_secs(20), "A to lead", || async {
        (leads(&a) == Some(true)).then_some(())
    })
    .await;
    let b = replica(cp, "blackhole-b", "blackhole", &[], None);
    namespace_with_policy(&client, "blackhole", (60, 5, 3)).await;
    create_pod(&client, "blackhole", "p0", json!({})).await.unwrap();
    wait_for_policy_count(&client, "blackhole", 1, "A to write the status").await;
    let steady = watch_leaders(&a, &b, Duration::from_secs(5), "the steady state", |_, _| false).await;
    assert_eq!(steady, None);
    assert_eq!((leads(&a), leads(&b)), (Some(true), Some(false)));
    assert_eq!(holder(&client, "blackhole").await, Some(identity("blackhole-a")));

    // A's connection turns into a black hole: A must stop, then B start, never both at once.
    proxy.black_hole();
    let a_stopped = watch_leaders(&a, &b, Duration::from_secs(15), "A stepping down", |la, _| {
        la == Some(false)
    })
    .await
    .unwrap_or_else(|| panic!("A still leads 15 s into the black hole:\n{}", a.logs()));
    let b_leads = watch_leaders(&a, &b, Duration::from_secs(15), "B taking over", |_, lb| {
        lb == Some(true)
    })
    .await
    .unwrap_or_else(|| panic!("B did not take over within 15 s:\n{}", b.logs()));
    eprintln!("black hole: A stopped leading after {a_stopped:?}, B led {b_leads:?} later");
    assert!(
        a_stopped + b_leads < Duration::from_secs(15),
        "{a_stopped:?} + {b_leads:?}"
    );
    assert!(a.logs().contains("stepping down"), "{}", a.logs());
    assert_eq!(holder(&client, "blackhole").await, Some(identity("blackhole-b")));

    // B writes the status now; A, still black-holed, never leads again.
    create_pod(&client, "blackhole", "p1", json!({})).await.unwrap();
    wait_for_policy_count(&client, "blackhole", 2, "B to count the new pod").await;
    let after = watch_leaders(&a, &b, Duration::from_secs(5), "B leading", |la, lb| {
        la != Some(false) || lb != Some(true)
    })
    .await;
    assert_eq!(after, None, "A {:?}, B {:?}", leads(&a), leads(&b));
}

#[tokio::test]
async fn a_replica_whose_clock_runs_ahead_does_not_steal_a_renewed_lease() {
    let cp = control_plane();
    let client = cp.client().await.unwrap();
    ensure_namespace(&client, "keepalive-system").await;
    let mut a = replica(cp, "skew-a", "skew", &[], None);
    eventually(Duration::from_secs(20), "A to lead", || async {
        (leads(&a) == Some(true)).then_some(())
    })
    .await;
    // B's clock runs 15 s ahead: by its wall clock, A's renewTime is always older than the 10 s lease.
    let b = replica(cp, "skew-b", "skew", &["--leader-clock-skew-seconds=15"], None);
    let leases: Api<Lease> = Api::namespaced(client.clone(), "keepalive-system");
    let transitions = leases.get("skew").await.unwrap().spec.unwrap().lease_transitions;

    // More than two lease durations: A keeps leading, B never does.
    let changed = watch_leaders(&a, &b, Duration::from_secs(25), "A renewing", |la, lb| {
        la != Some(true) || lb != Some(false)
    })
    .await;
    assert_eq!(changed, None, "A {:?}, B {:?}:\n{}", leads(&a), leads(&b), b.logs());
    let spec = leases.get("skew").await.unwrap().spec.unwrap();
    assert_eq!(spec.holder_identity, Some(identity("skew-a")));
    assert_eq!(spec.lease_transitions, transitions);

    // A dies without releasing the lease: B takes over once the lease ran out on its own clock.
    a.kill_hard();
    let took = watch_leaders(&a, &b, Duration::from_secs(15), "B taking over", |_, lb| {
        lb == Some(true)
    })
    .await
    .unwrap_or_else(|| panic!("B did not take over within 15 s of A's death:\n{}", b.logs()));
    eprintln!("clock skew: B led {took:?} after A was killed");
    let spec = leases.get("skew").await.unwrap().spec.unwrap();
    assert_eq!(spec.holder_identity, Some(identity("skew-b")));
    // The knob is real: B wrote its renewTime by a clock 15 s ahead.
    let ahead = spec
        .renew_time
        .unwrap()
        .0
        .duration_since(k8s_openapi::jiff::Timestamp::now());
    assert!(ahead.as_secs() >= 10, "B's renewTime is {ahead:?} ahead");
}
