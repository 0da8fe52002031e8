//! The node agent's metrics.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
};

use crate::runtime::metrics::Registry;

/// Whether the last scan read a pod: the `state` label of `keepalive_agent_pods`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum PodRead {
    Verified,
    Unverified,
}

/// The result of a report write: the `outcome` label of `keepalive_agent_report_writes_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum WriteOutcome {
    Written,
    Failed,
}

/// Which per-pod budget a pod is over: the `budget` label of `keepalive_agent_pods_over_budget`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Budget {
    Sockets,
    Processes,
}

impl Budget {
    pub const fn as_str(self) -> &'static str {
        match self {
            Budget::Sockets => "sockets",
            Budget::Processes => "processes",
        }
    }
}

impl PodRead {
    pub const fn as_str(self) -> &'static str {
        match self {
            PodRead::Verified => "verified",
            PodRead::Unverified => "unverified",
        }
    }
}

impl WriteOutcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            WriteOutcome::Written => "written",
            WriteOutcome::Failed => "failed",
        }
    }
}

crate::label_value!(PodRead, WriteOutcome, Budget);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BudgetLabels {
    budget: Budget,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodReadLabels {
    state: PodRead,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: WriteOutcome,
}

#[derive(Clone)]
pub struct AgentMetrics {
    /// Time of one scan of the node.
    pub scan_duration: Histogram,
    pods: Family<PodReadLabels, Gauge>,
    report_writes: Family<OutcomeLabels, Counter>,
    heartbeats: Family<OutcomeLabels, Counter>,
    over_budget: Family<BudgetLabels, Gauge>,
    /// Scans whose deadline left pods due for counting uncounted.
    pub scans_over_deadline: Counter,
    per_socket: Gauge,
    sockets_read: Gauge,
}

impl AgentMetrics {
    /// Registers `scan_duration_seconds`, `pods`, `report_writes`, `heartbeats`, `pods_over_budget` and `scans_over_deadline`
    /// (under the registry's `keepalive_agent` prefix).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = AgentMetrics {
            // 1 ms .. ~2.6 s
            scan_duration: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                1e-3, 2.2, 11,
            )),
            pods: Family::default(),
            report_writes: Family::default(),
            heartbeats: Family::default(),
            over_budget: Family::default(),
            scans_over_deadline: Counter::default(),
            per_socket: Gauge::default(),
            sockets_read: Gauge::default(),
        };
        registry.register(
            "per_socket",
            "Whether the last scan read connections socket by socket (1) or only counted them (0; the node \
             report's connectionReading says why)",
            metrics.per_socket.clone(),
        );
        registry.register(
            "sockets_read",
            "Established TCP sockets the last per-socket pass read on the node",
            metrics.sockets_read.clone(),
        );
        registry.register(
            "scan_duration_seconds",
            "Time of one scan of the node's pods",
            metrics.scan_duration.clone(),
        );
        registry.register("pods", "Pods of the last scan, by state", metrics.pods.clone());
        registry.register(
            "report_writes",
            "Writes of the node report, by result",
            metrics.report_writes.clone(),
        );
        registry.register(
            "heartbeats",
            "Renewals of the node's heartbeat Lease, by result (a report write is a heartbeat too)",
            metrics.heartbeats.clone(),
        );
        registry.register(
            "pods_over_budget",
            "Pods of the last scan over a per-pod budget (--max-sockets-per-pod, --max-processes-per-pod)",
            metrics.over_budget.clone(),
        );
        registry.register(
            "scans_over_deadline",
            "Scans that reached --scan-deadline-seconds before counting every pod due",
            metrics.scans_over_deadline.clone(),
        );
        metrics
    }

    /// The last scan's per-socket pass: sockets read, or `None` when there was none.
    pub fn per_socket(&self, sockets_read: Option<usize>) {
        self.per_socket.set(i64::from(sockets_read.is_some()));
        self.sockets_read
            .set(sockets_read.map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX)));
    }

    pub fn over_budget(&self, budget: Budget, n: usize) {
        self.over_budget
            .get_or_create(&BudgetLabels { budget })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn pods(&self, state: PodRead, n: i32) {
        self.pods.get_or_create(&PodReadLabels { state }).set(i64::from(n));
    }

    pub fn report_write(&self, outcome: WriteOutcome) {
        self.report_writes.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    pub fn heartbeat(&self, outcome: WriteOutcome) {
        self.heartbeats.get_or_create(&OutcomeLabels { outcome }).inc();
    }
}
