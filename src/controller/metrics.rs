//! The controller's metrics: its caches, the policy pod counts and the status writer.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
};

use crate::{
    policy::{Reason, connection::Protection},
    runtime::metrics::Registry,
};

/// A watch-driven cache: the `cache` label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Cache {
    Policies,
    Namespaces,
    Pods,
}

impl Cache {
    pub const fn as_str(self) -> &'static str {
        match self {
            Cache::Policies => "policies",
            Cache::Namespaces => "namespaces",
            Cache::Pods => "pods",
        }
    }
}

/// A state of a policy's pods: the `state` label of `keepalive_policy_pods`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum PodState {
    Matched,
    Conformant,
    LiveVerified,
    /// Not conformant for this reason.
    Reason(Reason),
}

impl PodState {
    pub const fn as_str(self) -> &'static str {
        match self {
            PodState::Matched => "matched",
            PodState::Conformant => "conformant",
            PodState::LiveVerified => "live_verified",
            PodState::Reason(reason) => reason.as_str(),
        }
    }
}

/// The result of one status write: the `outcome` label of `keepalive_status_writes_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum WriteOutcome {
    Written,
    Unchanged,
    Failed,
}

impl WriteOutcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            WriteOutcome::Written => "written",
            WriteOutcome::Unchanged => "unchanged",
            WriteOutcome::Failed => "failed",
        }
    }
}

/// How a policy's pods are mutated: the `way` label of `keepalive_injection_policies`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Way {
    AdmissionPolicy,
    FallbackWebhook,
    NotInjected,
}

impl Way {
    pub const fn as_str(self) -> &'static str {
        match self {
            Way::AdmissionPolicy => "admission_policy",
            Way::FallbackWebhook => "fallback_webhook",
            Way::NotInjected => "not_injected",
        }
    }
}

crate::label_value!(Cache, PodState, WriteOutcome, Way);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WayLabels {
    way: Way,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    cache: Cache,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodStateLabels {
    policy: String,
    state: PodState,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    policy: String,
    class: Protection,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: WriteOutcome,
}

/// Every metric of the controller but the webhook's.
#[derive(Clone)]
pub struct ControllerMetrics {
    cache_objects: Family<CacheLabels, Gauge>,
    policy_pods: Family<PodStateLabels, Gauge>,
    policy_connections: Family<ConnectionLabels, Gauge>,
    pub reconcile_duration: Histogram,
    status_writes: Family<OutcomeLabels, Counter>,
    pub leader: Gauge,
    injection_policies: Family<WayLabels, Gauge>,
    pub admission_policy_bytes: Gauge,
    admission_policy_writes: Family<OutcomeLabels, Counter>,
}

impl ControllerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = ControllerMetrics {
            cache_objects: Family::default(),
            policy_pods: Family::default(),
            policy_connections: Family::default(),
            reconcile_duration: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                1e-4, 3.0, 10,
            )),
            status_writes: Family::default(),
            leader: Gauge::default(),
            injection_policies: Family::default(),
            admission_policy_bytes: Gauge::default(),
            admission_policy_writes: Family::default(),
        };
        registry.register(
            "injection_policies",
            "Policies by the way their pods are mutated in admissionPolicy mode (leader only)",
            metrics.injection_policies.clone(),
        );
        registry.register(
            "admission_policy_bytes",
            "Size of the compiled MutatingAdmissionPolicy (leader, admissionPolicy mode; limit 1000000)",
            metrics.admission_policy_bytes.clone(),
        );
        registry.register(
            "admission_policy_writes",
            "Passes that wrote the MutatingAdmissionPolicy, binding and fallback webhook, by result",
            metrics.admission_policy_writes.clone(),
        );
        registry.register(
            "cache_objects",
            "Objects held by each watch-driven cache",
            metrics.cache_objects.clone(),
        );
        registry.register("policy_pods", "Pods per policy and state", metrics.policy_pods.clone());
        registry.register(
            "policy_connections",
            "Established connections of a policy's pods read socket by socket, by class against the policy's idle \
             timeout (protected, protectedByApp, armedTooLate, unarmed)",
            metrics.policy_connections.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time of one status pass",
            metrics.reconcile_duration.clone(),
        );
        registry.register(
            "status_writes",
            "Policy status writes, by result",
            metrics.status_writes.clone(),
        );
        registry.register(
            "leader",
            "Whether this replica leads and writes status (1) or not (0)",
            metrics.leader.clone(),
        );
        metrics
    }

    pub fn cache_objects(&self, cache: Cache, n: usize) {
        self.cache_objects.get_or_create(&CacheLabels { cache }).set(n as i64);
    }

    pub fn policy_pods(&self, policy: &str, state: PodState, n: i32) {
        self.policy_pods
            .get_or_create(&PodStateLabels {
                policy: policy.into(),
                state,
            })
            .set(i64::from(n));
    }

    pub fn policy_connections(&self, policy: &str, class: Protection, n: i64) {
        self.policy_connections
            .get_or_create(&ConnectionLabels {
                policy: policy.into(),
                class,
            })
            .set(n);
    }

    pub fn injection_policies(&self, way: Way, n: usize) {
        self.injection_policies.get_or_create(&WayLabels { way }).set(n as i64);
    }

    pub fn admission_policy_write(&self, outcome: WriteOutcome) {
        self.admission_policy_writes
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn status_write(&self, outcome: WriteOutcome) {
        self.status_writes.get_or_create(&OutcomeLabels { outcome }).inc();
    }
}
