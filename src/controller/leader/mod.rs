//! Leader election through a `coordination.k8s.io/v1` Lease: only the leader writes policy status; every
//! replica serves the webhook.
//!
//! Guarantees (the rules are pure functions in [`rules`], with their own tests):
//! - **A leader stops before anyone else may start.** Every acquire/renew attempt is bounded by
//!   [`ATTEMPT_TIMEOUT`](rules::ATTEMPT_TIMEOUT) (2 s). A leader leads until [`RENEW_DEADLINE`](rules::RENEW_DEADLINE)
//!   (7 s) after the start of its last successful renewal, and publishes `false` then, renewed or not (a black-holed
//!   connection cannot keep it leading). The status writer checks [`Leadership::is_leading_now`] before each write.
//! - **Expiry on the follower's own monotonic clock**, as client-go judges it: a follower remembers the last
//!   lease record it read (holder, renewTime, resourceVersion) and the local instant it saw it change, and takes
//!   over only once the record has been unchanged for the lease's duration (10 s) on its own clock. It never
//!   compares its wall clock with the remote `renewTime`, so a replica whose clock runs ahead steals nothing.
//! - **Compare-and-swap writes**: acquire, renew and release replace the Lease at the resourceVersion just read,
//!   so two candidates cannot both win.
//! - **Release on clean shutdown**: the leader stops leading, then clears the holder, so another replica takes
//!   over at its next attempt (within 2 s) instead of after 10 s.
//!
//! Timing: leader renews every 2 s; a leader that dies is replaced within about 12 s (10 s lease + up to 2 s
//! until the follower's read that saw the last renewal).
//!
//! Why not the `kube-lease-manager` crate (0.13, built on kube 5): it judges expiry as `renewTime +
//! leaseDurationSeconds` against the local wall clock (`SystemTime::now()`), so a follower whose clock runs ahead
//! takes a healthy lease; and its lease requests carry no deadline, so a leader on a black-holed connection keeps
//! its lock. Both are the failures this module exists to prevent.
//!
//! `--leader-clock-skew-seconds` (hidden; env `KEEPALIVE_CLOCK_SKEW_SECONDS`) is a testing knob: it shifts the
//! wall-clock timestamps this replica writes into the Lease, to run a replica whose clock is off.

mod rules;

use std::time::Instant;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use prometheus_client::metrics::gauge::Gauge;
use tokio::{sync::watch, time::timeout};

use self::rules::{ATTEMPT_TIMEOUT, LEASE_DURATION, Lead, Observer, RETRY_PERIOD, Record};

#[derive(Debug, Clone, clap::Args)]
pub struct LeaderArgs {
    /// Elect a leader among replicas; only the leader writes status. Turn off for a single replica.
    #[arg(long, env = "KEEPALIVE_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Name of the Lease (in --namespace).
    #[arg(long, env = "KEEPALIVE_LEASE_NAME", default_value = "keepalive-operator")]
    pub lease_name: String,
    /// This replica's identity in the Lease. Default: POD_NAME, else hostname and process id.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Testing knob: shifts the wall-clock times this replica writes into the Lease by this many seconds, as if
    /// its clock were off. The election never relies on them.
    #[arg(
        long,
        env = "KEEPALIVE_CLOCK_SKEW_SECONDS",
        default_value_t = 0,
        hide = true,
        allow_negative_numbers = true
    )]
    pub leader_clock_skew_seconds: i64,
}

/// Whether this replica may act as the leader right now: true until the deadline the elector published passes,
/// even if the elector itself is stuck.
#[derive(Clone, Debug)]
pub struct Leadership(watch::Receiver<Lead>);

impl Leadership {
    pub fn is_leading_now(&self) -> bool {
        self.0.borrow().is_leading_at(Instant::now())
    }

    /// Waits until this replica leads; `false` when the election ended without it leading.
    pub async fn acquired(&mut self) -> bool {
        self.0.wait_for(|lead| lead.is_leading_at(Instant::now())).await.is_ok()
    }

    /// Completes when this replica stops leading: the elector says so, or the lead's deadline passes without a
    /// renewal. Never, once it leads for good.
    pub async fn lost(&mut self) {
        loop {
            let lead = *self.0.borrow_and_update();
            match lead {
                Lead::No => return,
                Lead::Until(until) => {
                    let deadline = tokio::time::Instant::from_std(until);
                    tokio::select! {
                        changed = self.0.changed() => if changed.is_err() {
                            tokio::time::sleep_until(deadline).await;
                            return;
                        },
                        _ = tokio::time::sleep_until(deadline) => {
                            if !self.is_leading_now() {
                                return;
                            }
                        }
                    }
                }
                Lead::Always => {
                    if self.0.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }
}

/// The elector's end and the readers' end of the leadership state; nobody leads at first.
pub fn channel() -> (watch::Sender<Lead>, Leadership) {
    let (tx, rx) = watch::channel(Lead::No);
    (tx, Leadership(rx))
}

/// Runs the election until `shutdown` fires, publishing whether this replica leads to `lead` and the
/// `keepalive_leader` gauge. On shutdown it stops leading, then releases the lease.
pub async fn run(
    client: Client,
    namespace: String,
    args: LeaderArgs,
    lead: watch::Sender<Lead>,
    gauge: Gauge,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut publisher = Publisher { lead, gauge };
    if !args.leader_elect {
        publisher.publish(Lead::Always);
        return;
    }
    let mut elector = Elector {
        api: Api::namespaced(client, &namespace),
        name: args.lease_name.clone(),
        identity: args.identity.clone().unwrap_or_else(default_identity),
        skew: SignedDuration::from_secs(args.leader_clock_skew_seconds),
        observer: Observer::default(),
    };
    loop {
        let started = Instant::now();
        let attempt = timeout(ATTEMPT_TIMEOUT, elector.attempt());
        let Some(outcome) = publisher.meanwhile(attempt, &mut shutdown).await else {
            break;
        };
        let mut next = started + RETRY_PERIOD;
        match outcome {
            Ok(Ok(true)) => {
                if publisher.current() == Lead::No {
                    tracing::info!(identity = %elector.identity, lease = %elector.name, "became leader");
                }
                publisher.publish(Lead::renewed(started));
            }
            Ok(Ok(false)) => {
                if publisher.current() != Lead::No {
                    tracing::warn!(holder = ?elector.observer.holder(), "lost the lease to another replica");
                }
                publisher.publish(Lead::No);
                // Try again as soon as the holder's lease runs out, if that comes before the next retry.
                if let Some(expiry) = elector.observer.expires_at() {
                    next = next.min(expiry.max(Instant::now()));
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "leader election: lease request failed"),
            Err(_) => tracing::warn!(timeout = ?ATTEMPT_TIMEOUT, "leader election: lease request timed out"),
        }
        let pause = tokio::time::sleep_until(next.into());
        if publisher.meanwhile(pause, &mut shutdown).await.is_none() {
            break;
        }
    }
    if publisher.current() != Lead::No {
        publisher.publish(Lead::No);
    }
    match timeout(ATTEMPT_TIMEOUT, elector.release()).await {
        Ok(Ok(true)) => tracing::info!("lease released"),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "releasing the lease failed"),
        Err(_) => tracing::warn!("releasing the lease timed out"),
    }
}

/// Publishes the leadership state, and steps down when its deadline passes.
struct Publisher {
    lead: watch::Sender<Lead>,
    gauge: Gauge,
}

impl Publisher {
    fn current(&self) -> Lead {
        *self.lead.borrow()
    }

    fn publish(&mut self, lead: Lead) {
        // Readers compare with the deadline themselves; the gauge follows the state.
        self.lead.send_replace(lead);
        self.gauge.set(i64::from(lead != Lead::No));
    }

    /// Awaits `work`, stepping down when the renew deadline passes meanwhile; None when `shutdown` fires first.
    async fn meanwhile<T>(&mut self, work: impl Future<Output = T>, shutdown: &mut watch::Receiver<bool>) -> Option<T> {
        let mut work = std::pin::pin!(work);
        loop {
            let deadline = self.current().deadline();
            tokio::select! {
                out = &mut work => return Some(out),
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now).into()), if deadline.is_some() => {
                    tracing::warn!("stepping down: the lease was not renewed in time");
                    self.publish(Lead::No);
                }
                _ = shutdown.changed() => return None,
            }
        }
    }
}

struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    /// Added to the wall clock for the times written into the Lease (a testing knob).
    skew: SignedDuration,
    observer: Observer,
}

impl Elector {
    fn wall_clock(&self) -> MicroTime {
        let now = Timestamp::now();
        MicroTime(now.checked_add(self.skew).unwrap_or(now))
    }

    /// Takes or renews the lease; false while another holder's lease is valid, or when another write came first.
    async fn attempt(&mut self) -> kube::Result<bool> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return self.create().await;
        };
        let now = Instant::now();
        self.observer.observe(Record::of(&lease), now);
        if !self.observer.may_acquire(&self.identity, now) {
            return Ok(false);
        }
        let wall = self.wall_clock();
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(wall.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(LEASE_DURATION.as_secs() as i32);
        spec.renew_time = Some(wall);
        // The resourceVersion read above makes this a compare-and-swap.
        self.replace(&lease).await
    }

    async fn create(&mut self) -> kube::Result<bool> {
        let wall = self.wall_clock();
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
                acquire_time: Some(wall.clone()),
                renew_time: Some(wall),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(stored) => {
                self.observer.observe(Record::of(&stored), Instant::now());
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Writes `lease` at the resourceVersion it carries; false when another write came first.
    async fn replace(&mut self, lease: &Lease) -> kube::Result<bool> {
        match self.api.replace(&self.name, &PostParams::default(), lease).await {
            Ok(stored) => {
                self.observer.observe(Record::of(&stored), Instant::now());
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Clears the holder if it is this replica; true when released.
    async fn release(&mut self) -> kube::Result<bool> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(false);
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(false);
        };
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        self.replace(&lease).await
    }
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}
