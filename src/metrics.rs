//! Prometheus metrics: one registry, exposed on `/metrics`.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodStateLabels {
    pub policy: String,
    /// matched, conformant, or a non-conformance reason.
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub cache: &'static str,
}

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    /// Admission reviews by outcome: mutated, unchanged, skipped, undecided, invalid.
    pub webhook_requests: Family<OutcomeLabels, Counter>,
    /// Pods mutated, by policy.
    pub webhook_mutations: Family<PolicyLabels, Counter>,
    /// Time to answer one admission review.
    pub webhook_duration: Histogram,
    /// Objects held by each watch-driven cache.
    pub cache_objects: Family<CacheLabels, Gauge>,
    /// Pods per policy and state (matched, conformant, live_verified, or a reason).
    pub policy_pods: Family<PodStateLabels, Gauge>,
    /// Time of one status pass of the controller.
    pub reconcile_duration: Histogram,
    /// Status writes, by result (written, unchanged, failed).
    pub status_writes: Family<OutcomeLabels, Counter>,
    /// 1 while this replica leads (writes status).
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("keepalive");
        let webhook_requests = Family::<OutcomeLabels, Counter>::default();
        let webhook_mutations = Family::<PolicyLabels, Counter>::default();
        // 50 µs .. ~0.4 s
        let webhook_duration = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            5e-5, 2.5, 11,
        ));
        let cache_objects = Family::<CacheLabels, Gauge>::default();
        registry.register(
            "webhook_requests",
            "Admission reviews answered, by outcome",
            webhook_requests.clone(),
        );
        registry.register(
            "webhook_mutations",
            "Pods mutated, by policy",
            webhook_mutations.clone(),
        );
        registry.register(
            "webhook_request_duration_seconds",
            "Time to answer one admission review",
            webhook_duration.clone(),
        );
        registry.register(
            "cache_objects",
            "Objects held by each watch-driven cache",
            cache_objects.clone(),
        );
        let policy_pods = Family::<PodStateLabels, Gauge>::default();
        registry.register("policy_pods", "Pods per policy and state", policy_pods.clone());
        let reconcile_duration = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            1e-4, 3.0, 10,
        ));
        registry.register(
            "reconcile_duration_seconds",
            "Time of one status pass",
            reconcile_duration.clone(),
        );
        let status_writes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "status_writes",
            "Policy status writes, by result",
            status_writes.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "Whether this replica leads and writes status (1) or not (0)",
            leader.clone(),
        );
        Metrics {
            registry,
            webhook_requests,
            webhook_mutations,
            webhook_duration,
            cache_objects,
            policy_pods,
            reconcile_duration,
            status_writes,
            leader,
        }
    }
}

impl Metrics {
    pub fn request(&self, outcome: &'static str) {
        self.webhook_requests.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// The registry, for parts that register their own metrics.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodReadLabels {
    pub state: &'static str,
}

/// The node agent's metrics.
pub struct AgentMetrics {
    registry: Registry,
    /// Time of one scan of the node.
    pub scan_duration: Histogram,
    /// Pods of the last scan, verified (read) or unverified.
    pub pods: Family<PodReadLabels, Gauge>,
    /// Writes of the node report, by outcome (written, failed).
    pub report_writes: Family<OutcomeLabels, Counter>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("keepalive_agent");
        // 1 ms .. ~2.6 s
        let scan_duration = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            1e-3, 2.2, 11,
        ));
        registry.register(
            "scan_duration_seconds",
            "Time of one scan of the node's pods",
            scan_duration.clone(),
        );
        let pods = Family::<PodReadLabels, Gauge>::default();
        registry.register("pods", "Pods of the last scan, by state", pods.clone());
        let report_writes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "report_writes",
            "Writes of the node report, by result",
            report_writes.clone(),
        );
        AgentMetrics {
            registry,
            scan_duration,
            pods,
            report_writes,
        }
    }
}

impl AgentMetrics {
    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
