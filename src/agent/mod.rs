//! `keepalive-operator agent`: on every node, reads the live keepalive values of the node's pods and publishes
//! them in the node's `KeepaliveNodeReport`.
//!
//! API writes per node are bounded: at most one per scan interval (default 10 s), and only when a reading
//! changed; otherwise one heartbeat per `--heartbeat-seconds` (default 60 s) so the controller knows the agent
//! is alive: a renewal of the node's small heartbeat Lease, or where there is none a rewrite of the report
//! ([`cadence`] says which). Entries of pods that left the node disappear with the next write.

mod admin;
pub mod cadence;
pub mod connections;
pub mod heartbeat;
pub mod kernel;
mod metrics;
pub mod reader;
mod scanner;

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

pub use self::{
    kernel::{Connections, ReadError},
    scanner::{Budgets, Counting, Scan, ScanStats, Scanner},
};
use self::{
    metrics::{AgentMetrics, Budget, PodRead, WriteOutcome},
    reader::Reader,
};
use crate::{
    api::{AGENT_MANAGER, KeepaliveNodeReport, KeepaliveNodeReportSpec},
    runtime::{
        limits::LimitArgs,
        listen::{OptionalListen, optional_listen},
        metrics::Registry,
        server, shutdown_signal,
    },
};

#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// The node this agent runs on (from the downward API: spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The host's /proc (the agent runs with hostPID).
    #[arg(long, env = "KEEPALIVE_PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,
    /// Seconds between scans; also the shortest time between two writes of the report.
    #[arg(long, env = "KEEPALIVE_SCAN_INTERVAL_SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600), default_value_t = 10)]
    pub scan_interval_seconds: u64,
    /// A host process in the node's own network namespace (with hostPID, 1 is the host's init): pods whose
    /// sandbox shares it (hostNetwork pods) are left out of the report, the node's values are reported once; its
    /// user namespace is the host's.
    #[arg(long, env = "KEEPALIVE_NODE_NETNS_PID", default_value_t = 1)]
    pub node_netns_pid: u32,
    /// The agent says it is alive this often, even when nothing changed: it renews its heartbeat Lease or,
    /// without one, rewrites the report. At least the scan interval.
    #[arg(long, env = "KEEPALIVE_HEARTBEAT_SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600), default_value_t = 60)]
    pub heartbeat_seconds: u64,
    /// The agent's namespace (downward API: metadata.namespace), where it renews its heartbeat Lease (named after
    /// the node). Empty: no Lease; the report is rewritten every heartbeat.
    #[arg(long, env = "POD_NAMESPACE", default_value = "")]
    pub lease_namespace: String,
    /// The agent's pod name and UID (downward API), the owner of its Lease.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    #[arg(long, env = "POD_UID")]
    pub pod_uid: Option<String>,
    /// With a heartbeat Lease: the report is rewritten at least this often, to refresh connection counts (changed
    /// readings are written at the next scan, new kinds of connections at the next heartbeat). At least the
    /// heartbeat.
    #[arg(long, env = "KEEPALIVE_REFRESH_SECONDS", value_parser = clap::value_parser!(u64).range(1..=86400), default_value_t = 600)]
    pub refresh_seconds: u64,
    /// How connections are read: per-socket (every socket's effective keepalive, by a BPF iterator; read-only),
    /// sock-diag (only counted, read-only, like `ss`) or socket-fds (only counted; see the README). Where
    /// per-socket cannot load (no BTF, BPF denied), the agent counts with sock-diag and says why in its report.
    #[arg(long, env = "KEEPALIVE_COUNT_CONNECTIONS", value_enum, default_value_t = Counting::PerSocket)]
    pub count_connections: Counting,
    /// With sock-diag, each pod's connections are recounted at least every this many scans (the dumps of a scan
    /// are spread so): 3 with 10 s scans keeps counts at most 30 s old.
    #[arg(long, env = "KEEPALIVE_COUNT_EVERY_SCANS", value_parser = clap::value_parser!(u32).range(1..=100), default_value_t = 3)]
    pub count_every_scans: u32,
    /// A pod with more sockets than this is not counted (a dump or descriptor walk that reaches it is abandoned);
    /// its sysctls still are, and it is tried again only every 10th time it is due.
    #[arg(long, env = "KEEPALIVE_MAX_SOCKETS_PER_POD", value_parser = clap::value_parser!(u32).range(1..), default_value_t = 50_000)]
    pub max_sockets_per_pod: u32,
    /// A per-socket pass reads at most this many sockets of the node (a node with more is only counted that scan,
    /// and its report says so).
    #[arg(long, env = "KEEPALIVE_MAX_SOCKETS_PER_SCAN", value_parser = clap::value_parser!(u32).range(1..), default_value_t = 500_000)]
    pub max_sockets_per_scan: u32,
    /// Processes of one pod beyond this many are not examined (no stat, no descriptor walk); the pod's entry says
    /// so, its sysctls are still read through its oldest process examined.
    #[arg(long, env = "KEEPALIVE_MAX_PROCESSES_PER_POD", value_parser = clap::value_parser!(u32).range(1..), default_value_t = 1_000)]
    pub max_processes_per_pod: u32,
    /// Connection counting stops once a scan has taken this long (sysctls are always read); the pods not counted
    /// keep their previous counts and come first next scan. Default: 0.8 × the scan interval.
    #[arg(long, env = "KEEPALIVE_SCAN_DEADLINE_SECONDS", value_parser = deadline_seconds)]
    pub scan_deadline_seconds: Option<f64>,
    /// Plain-HTTP address for probes and metrics (/livez, /readyz, /metrics); empty to disable.
    #[arg(long, env = "KEEPALIVE_ADMIN_LISTEN", default_value = "0.0.0.0:9090", value_parser = optional_listen)]
    pub admin_listen: OptionalListen,
}

fn deadline_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() && v > 0.0 && v <= 3600.0 {
        Ok(v)
    } else {
        Err("must be more than 0 and at most 3600".into())
    }
}

impl AgentArgs {
    pub fn budgets(&self) -> Budgets {
        let deadline = self
            .scan_deadline_seconds
            .unwrap_or(0.8 * self.scan_interval_seconds as f64);
        Budgets {
            max_sockets: self.max_sockets_per_pod,
            max_processes: self.max_processes_per_pod as usize,
            deadline: Duration::from_secs_f64(deadline),
            max_node_sockets: self.max_sockets_per_scan as usize,
        }
    }

    fn scanner(&self) -> Scanner {
        Scanner::with_counting(
            self.proc_root.clone(),
            self.node_netns_pid,
            self.count_connections,
            self.count_every_scans,
        )
        .with_budgets(self.budgets())
    }
}

/// The agent process: starts the kernel-reader thread (the only one to keep capabilities), drops every
/// capability of this thread, then runs [`run`] on a runtime whose threads hold none.
pub fn main(args: AgentArgs) -> anyhow::Result<()> {
    // Four descriptors per pod (three sysctl files and a sock_diag socket) and the namespace: a node with 250
    // pods needs more than the usual 1024.
    crate::runtime::raise_open_file_limit();
    if let Err(e) = rustix::thread::set_no_new_privs(true) {
        tracing::warn!(error = %e, "cannot set no_new_privs");
    }
    let scanner_args = args.clone();
    let reader = Reader::start(
        move || scanner_args.scanner(),
        reader::needed_capabilities(args.count_connections),
    )?;
    reader::restrict_capabilities(rustix::thread::CapabilitySet::empty())?;
    tokio::runtime::Runtime::new()?.block_on(run(args, reader))
}

/// Runs the agent until SIGTERM or Ctrl-C, scanning through `reader`.
pub async fn run(args: AgentArgs, reader: Reader) -> anyhow::Result<()> {
    if args.heartbeat_seconds < args.scan_interval_seconds {
        anyhow::bail!(
            "--heartbeat-seconds ({}) must be at least --scan-interval-seconds ({}): the report is written at most once a scan",
            args.heartbeat_seconds,
            args.scan_interval_seconds
        );
    }
    if args.refresh_seconds < args.heartbeat_seconds {
        anyhow::bail!(
            "--refresh-seconds ({}) must be at least --heartbeat-seconds ({})",
            args.refresh_seconds,
            args.heartbeat_seconds
        );
    }
    let client = Client::try_default().await?;
    let reports: Api<KeepaliveNodeReport> = Api::all(client.clone());
    let mut lease = (!args.lease_namespace.is_empty()).then(|| {
        let owner = args.pod_name.clone().zip(args.pod_uid.clone());
        heartbeat::Heartbeat::new(
            client,
            &args.lease_namespace,
            &args.node_name,
            owner,
            args.heartbeat_seconds,
        )
    });
    // The report last written, when, and when the agent was last heard from (that write or a Lease renewal).
    let mut written: Option<(KeepaliveNodeReportSpec, std::time::Instant)> = None;
    let mut heard = std::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(args.scan_interval_seconds.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut registry = Registry::with_prefix("keepalive_agent");
    let metrics = AgentMetrics::register(&mut registry);
    let ready = Arc::new(AtomicBool::new(false));
    // Seconds (since the agent started) at the end of the last completed scan; 0 before the first.
    let started_at = std::time::Instant::now();
    let last_scan = Arc::new(AtomicU64::new(0));
    if let Some(addr) = args.admin_listen.0 {
        let listener = server::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "probes and metrics serving");
        let health = admin::Health {
            ready: ready.clone(),
            last_scan: last_scan.clone(),
            started_at,
            // A scan loop stuck (say, on a hung kernel read) for this long fails the liveness probe.
            stuck_after: 3 * args.scan_interval_seconds + 30,
        };
        let router = admin::router(Arc::new(registry), health);
        tokio::spawn(
            async move { server::serve_plain(listener, router, &LimitArgs::default(), shutdown_signal()).await },
        );
    }
    let shutdown = shutdown_signal();
    let mut shutdown = std::pin::pin!(shutdown);
    tracing::info!(node = %args.node_name, "agent running");
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let previous = written.as_ref().map(|(s, _)| s.pods.clone()).unwrap_or_default();
                let now = Time(Timestamp::now());
                let started = std::time::Instant::now();
                // A scan that panicked is dropped; the reader starts over with a fresh scanner.
                let Some(scan) = reader.scan(previous, now.clone()).await else {
                    continue;
                };
                metrics.scan_duration.observe(started.elapsed().as_secs_f64());
                metrics.over_budget(Budget::Sockets, scan.stats.over_sockets);
                metrics.over_budget(Budget::Processes, scan.stats.over_processes);
                metrics.per_socket(scan.stats.sockets_read);
                if scan.stats.uncounted > 0 {
                    metrics.scans_over_deadline.inc();
                    tracing::info!(uncounted = scan.stats.uncounted, "scan deadline reached: the others are counted first next scan");
                }
                last_scan.store(started_at.elapsed().as_secs().max(1), Ordering::Relaxed);
                let pod_reports = scan.pods;
                let mut spec = KeepaliveNodeReportSpec {
                    last_scan: now,
                    heartbeat_seconds: i32::try_from(args.heartbeat_seconds).unwrap_or(i32::MAX),
                    refresh_seconds: lease.as_ref().map(|_| i32::try_from(args.refresh_seconds).unwrap_or(i32::MAX)),
                    scan_interval_seconds: i32::try_from(args.scan_interval_seconds).unwrap_or(i32::MAX),
                    node_sysctls: scan.node,
                    connection_reading: scan.connection_reading.clone(),
                    verified_pods: pod_reports.iter().filter(|r| r.sysctls.is_some()).count() as i32,
                    unverified_pods: pod_reports.iter().filter(|r| r.sysctls.is_none()).count() as i32,
                    pods: pod_reports,
                };
                if let Some(cut) = fit_report(&mut spec, MAX_REPORT_BYTES) {
                    tracing::warn!(cut, "the node report is over {MAX_REPORT_BYTES} bytes: socket details left out");
                }
                let last = written.as_ref().map(|(report, at)| cadence::Last {
                    report,
                    written: at.elapsed(),
                    heard: heard.elapsed(),
                });
                let cadence = cadence::Cadence {
                    heartbeat: Duration::from_secs(args.heartbeat_seconds),
                    refresh: lease.as_ref().map(|_| Duration::from_secs(args.refresh_seconds)),
                };
                match cadence::due(last, &spec, cadence) {
                    cadence::Due::Report => {}
                    cadence::Due::Nothing => continue,
                    cadence::Due::Lease => {
                        let renewal = match &lease {
                            Some(l) => l.renew().await,
                            None => continue,
                        };
                        match renewal {
                            Ok(()) => {
                                heard = std::time::Instant::now();
                                metrics.heartbeat(WriteOutcome::Written);
                            }
                            Err(kube::Error::Api(e)) if e.code == 403 || e.code == 404 => {
                                // No right to write Leases (a role from before them): the report is the heartbeat
                                // again; the next scan rewrites it without refreshSeconds.
                                tracing::warn!(error = %e, "cannot write the heartbeat Lease: the node report is rewritten every heartbeat instead");
                                metrics.heartbeat(WriteOutcome::Failed);
                                lease = None;
                            }
                            Err(e) => {
                                metrics.heartbeat(WriteOutcome::Failed);
                                tracing::warn!(error = %e, "renewing the heartbeat Lease failed; retrying next scan");
                            }
                        }
                        continue;
                    }
                }
                let object = serde_json::json!({
                    "apiVersion": "keepalive.dev/v1alpha1",
                    "kind": "KeepaliveNodeReport",
                    "metadata": { "name": args.node_name },
                    "spec": spec,
                });
                match reports
                    .patch(&args.node_name, &PatchParams::apply(AGENT_MANAGER).force(), &Patch::Apply(&object))
                    .await
                {
                    Ok(_) => {
                        let verified = spec.verified_pods;
                        let unverified = spec.unverified_pods;
                        metrics.pods(PodRead::Verified, verified);
                        metrics.pods(PodRead::Unverified, unverified);
                        metrics.report_write(WriteOutcome::Written);
                        written = Some((spec, std::time::Instant::now()));
                        heard = std::time::Instant::now();
                        ready.store(true, Ordering::Relaxed);
                    }
                    Err(e) => {
                        metrics.report_write(WriteOutcome::Failed);
                        tracing::warn!(error = %e, "writing the node report failed; retrying next scan");
                    }
                }
            }
            _ = &mut shutdown => return Ok(()),
        }
    }
}

/// Most bytes of a node report's spec (etcd refuses requests over 1.5 MiB by default): with many pods, their
/// socket details are left out first.
pub const MAX_REPORT_BYTES: usize = 1024 * 1024;

/// Keeps the report under `max_bytes` of JSON: drops the pods' weakest destinations, then their socket groups,
/// saying so in `connectionReading`. Returns what was cut, if anything.
pub fn fit_report(spec: &mut KeepaliveNodeReportSpec, max_bytes: usize) -> Option<&'static str> {
    let size = |spec: &KeepaliveNodeReportSpec| serde_json::to_vec(spec).map_or(usize::MAX, |v| v.len());
    if size(spec) <= max_bytes {
        return None;
    }
    let mut cut = "weakest destinations";
    for pod in spec.pods.iter_mut().filter_map(|p| p.sockets.as_mut()) {
        pod.weakest.clear();
    }
    if size(spec) > max_bytes {
        cut = "socket summaries";
        for pod in &mut spec.pods {
            pod.sockets = None;
        }
    }
    let reading = spec.connection_reading.get_or_insert(crate::api::ConnectionReading {
        method: crate::api::ConnectionMethod::PerSocket,
        message: None,
    });
    reading.message = Some(format!(
        "{cut} left out of this report: it would be over {max_bytes} bytes with them"
    ));
    Some(cut)
}

#[cfg(test)]
pub(crate) mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    pub(crate) fn spec(at: i64, established: i32, time: i32) -> KeepaliveNodeReportSpec {
        KeepaliveNodeReportSpec {
            last_scan: Time(Timestamp::from_second(at).unwrap()),
            heartbeat_seconds: 60,
            refresh_seconds: None,
            scan_interval_seconds: 10,
            node_sysctls: None,
            connection_reading: None,
            verified_pods: 1,
            unverified_pods: 0,
            pods: vec![super::scanner::tests::reading(established, at, time)],
        }
    }

    #[test]
    fn an_oversized_report_sheds_socket_details_first() {
        use crate::api::{Destination, SocketSummary};
        let mut big = spec(100, 2, 60);
        let destination = Destination {
            remote: "[fd00::1234:5678:9abc:def0]:65535".into(),
            process: "a-long-comm-name".into(),
            keepalive: false,
            idle_seconds: 0,
            connections: 1,
        };
        big.pods[0].sockets = Some(SocketSummary {
            groups: vec![],
            weakest: vec![destination; 5],
        });
        let whole = serde_json::to_vec(&big).unwrap().len();
        assert_eq!(fit_report(&mut big.clone(), whole), None, "at the bound: kept");
        let mut cut = big.clone();
        assert_eq!(fit_report(&mut cut, whole - 1), Some("weakest destinations"));
        assert!(cut.pods[0].sockets.as_ref().unwrap().weakest.is_empty());
        assert!(
            cut.connection_reading
                .unwrap()
                .message
                .unwrap()
                .contains("weakest destinations left out")
        );
        let mut cut = big.clone();
        assert_eq!(fit_report(&mut cut, 10), Some("socket summaries"));
        assert_eq!(cut.pods[0].sockets, None);
        assert_eq!(cut.pods[0].sysctls, big.pods[0].sysctls, "the readings stay");
    }
}
