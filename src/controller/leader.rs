//! Leader election through a `coordination.k8s.io/v1` Lease: only the leader writes policy status; every
//! replica serves the webhook.
//!
//! Timing: the lease lasts 10 s and the leader renews it every 2 s; the others try every 2 s, so after a leader
//! dies another replica takes over within 12 s. A leader that stops cleanly releases the lease at once.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::sync::watch;

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
}

const LEASE_SECONDS: i32 = 10;
const RETRY: Duration = Duration::from_secs(2);

/// Runs the election forever, publishing whether this replica leads. Stops leading (and releases the lease)
/// when `shutdown` fires.
pub async fn run(
    client: Client,
    namespace: String,
    args: LeaderArgs,
    leading: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    if !args.leader_elect {
        let _ = leading.send(true);
        return;
    }
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let mut last_renewed: Option<Timestamp> = None;
    loop {
        match try_acquire(&api, &args.lease_name, &identity).await {
            Ok(true) => {
                if !*leading.borrow() {
                    tracing::info!(%identity, lease = %args.lease_name, "became leader");
                }
                last_renewed = Some(Timestamp::now());
                let _ = leading.send(true);
            }
            Ok(false) => {
                if *leading.borrow() {
                    tracing::warn!(%identity, "lost the lease");
                }
                let _ = leading.send(false);
            }
            Err(e) => {
                tracing::warn!(error = %e, "leader election: lease request failed");
                // Step down once the lease we hold may have expired for the others.
                let expired = last_renewed
                    .is_none_or(|t| Timestamp::now().duration_since(t).as_secs() >= i64::from(LEASE_SECONDS) - 2);
                if expired && *leading.borrow() {
                    tracing::warn!("stepping down: could not renew the lease");
                    let _ = leading.send(false);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = shutdown.changed() => {
                if *leading.borrow() {
                    let _ = leading.send(false);
                    release(&api, &args.lease_name, &identity).await;
                }
                return;
            }
        }
    }
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

/// Takes or renews the lease; false when another holder's lease is still valid or another replica won the race.
async fn try_acquire(api: &Api<Lease>, name: &str, identity: &str) -> kube::Result<bool> {
    let now = Timestamp::now();
    let Some(mut lease) = api.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(identity.into()),
                lease_duration_seconds: Some(LEASE_SECONDS),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
    let expired = spec
        .renew_time
        .as_ref()
        .is_none_or(|t| now.duration_since(t.0).as_secs() >= duration);
    if holder != identity && !holder.is_empty() && !expired {
        return Ok(false);
    }
    if holder != identity {
        spec.holder_identity = Some(identity.into());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.lease_duration_seconds = Some(LEASE_SECONDS);
    spec.renew_time = Some(MicroTime(now));
    // The resourceVersion makes this a compare-and-swap: two replicas cannot both win.
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

async fn release(api: &Api<Lease>, name: &str, identity: &str) {
    if let Ok(Some(mut lease)) = api.get_opt(name).await
        && let Some(spec) = lease.spec.as_mut()
        && spec.holder_identity.as_deref() == Some(identity)
    {
        spec.holder_identity = None;
        spec.renew_time = None;
        if api.replace(name, &PostParams::default(), &lease).await.is_ok() {
            tracing::info!("lease released");
        }
    }
}
