//! `keepalive-operator agent`: on every node, reads the live keepalive values of the node's pods and publishes
//! them in the node's `KeepaliveNodeReport`.
//!
//! API writes per node are bounded: at most one per scan interval (default 10 s), and only when a reading
//! changed; otherwise one heartbeat per `--heartbeat-seconds` (default 60 s) so the controller knows the agent
//! is alive. Entries of pods that left the node disappear with the next write.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};

use crate::{
    agent,
    api::{KeepaliveNodeReportSpec, LiveKeepalive, PodLiveReport},
    metrics::{AgentMetrics, OutcomeLabels, PodReadLabels},
};

/// Field manager of the agent's writes.
pub const AGENT_MANAGER: &str = "keepalive-agent";

#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// The node this agent runs on (from the downward API: spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The host's /proc (the agent runs with hostPID).
    #[arg(long, env = "KEEPALIVE_PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,
    /// Seconds between scans; also the shortest time between two writes of the report.
    #[arg(long, env = "KEEPALIVE_SCAN_INTERVAL_SECONDS", value_parser = clap::value_parser!(u64).range(1..=86400), default_value_t = 10)]
    pub scan_interval_seconds: u64,
    /// A host process in the node's own network namespace, whose values hostNetwork pods run with (with hostPID,
    /// 1 is the host's init).
    #[arg(long, env = "KEEPALIVE_NODE_NETNS_PID", default_value_t = 1)]
    pub node_netns_pid: u32,
    /// The report is rewritten at least this often, as a heartbeat, even when nothing changed; changed connection
    /// counts alone wait for it. At least the scan interval.
    #[arg(long, env = "KEEPALIVE_HEARTBEAT_SECONDS", value_parser = clap::value_parser!(u64).range(1..=86400), default_value_t = 60)]
    pub heartbeat_seconds: u64,
    /// How connections are counted: sock-diag (read-only, like `ss`) or socket-fds (faster; see the README).
    #[arg(long, env = "KEEPALIVE_COUNT_CONNECTIONS", value_enum, default_value_t = Counting::SockDiag)]
    pub count_connections: Counting,
    /// With sock-diag, each pod's connections are recounted at least every this many scans (the dumps of a scan
    /// are spread so): 3 with 10 s scans keeps counts at most 30 s old.
    #[arg(long, env = "KEEPALIVE_COUNT_EVERY_SCANS", value_parser = clap::value_parser!(u32).range(1..=100), default_value_t = 3)]
    pub count_every_scans: u32,
    /// Plain-HTTP address for probes and metrics (/livez, /readyz, /metrics); empty to disable.
    #[arg(long, env = "KEEPALIVE_ADMIN_LISTEN", default_value = "0.0.0.0:9090", value_parser = crate::cli::optional_listen)]
    pub admin_listen: crate::cli::OptionalListen,
}

/// A pod of this node, as the scan needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub host_network: bool,
    /// Not terminated (phase neither Succeeded nor Failed).
    pub running: bool,
    /// Phase Running: its sandbox is up, so a missing process is an error worth reporting. A Pending pod without
    /// a process yet is left out of the report until it starts.
    pub started: bool,
}

impl NodePod {
    fn from_pod(pod: &Pod) -> Option<NodePod> {
        let spec = pod.spec.as_ref();
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        Some(NodePod {
            uid: pod.metadata.uid.clone()?,
            namespace: pod.metadata.namespace.clone()?,
            name: pod.metadata.name.clone()?,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            running: !matches!(phase, Some("Succeeded" | "Failed")),
            started: phase == Some("Running"),
        })
    }
}

/// How the agent counts a pod's established connections and those with keepalive armed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Counting {
    /// A sock_diag dump of the pod's network namespace, as `ss` does: read-only. Each dump walks the kernel's
    /// connection table, which all namespaces share, so dumps are spread over scans (`--count-every-scans`).
    SockDiag,
    /// The pod processes' own socket descriptors, borrowed with pidfd_getfd(2): no table walk, every pod every
    /// scan. Receiving a socket re-tags it with the agent's cgroup v1 net_cls classid and net_prio index: do not
    /// use on nodes that shape or prioritise pod traffic with those controllers.
    SocketFds,
}

/// The agent's scan state: an open [`agent::NetnsHandle`] on each pod's network namespace, kept across scans, so
/// a pod's namespace is entered once in its life (and again only if its namespace is replaced), and the last
/// connection counts of each pod.
///
/// Each scan: one walk of /proc finds the processes of every pod; every pod's sysctls are read through its
/// handle; connections are counted for new pods and, with sock_diag, for the 1/`count_every` of the others
/// counted longest ago (all pods with socket fds).
pub struct Scanner {
    proc_root: PathBuf,
    node_pid: u32,
    /// Per pod UID: the process the handle was opened through, and the handle.
    pods: HashMap<String, (u32, agent::NetnsHandle)>,
    node: Option<agent::NetnsHandle>,
    counting: Counting,
    count_every: u32,
    scans: u64,
    /// Per pod UID: the last counts, and the scan that counted them.
    counts: HashMap<String, (agent::Connections, u64)>,
}

impl Scanner {
    /// A scanner that counts connections with sock_diag dumps, each pod at least every third scan.
    pub fn new(proc_root: PathBuf, node_pid: u32) -> Self {
        Self::with_counting(proc_root, node_pid, Counting::SockDiag, 3)
    }

    pub fn with_counting(proc_root: PathBuf, node_pid: u32, mut counting: Counting, count_every: u32) -> Self {
        if counting == Counting::SocketFds && !agent::pidfd_getfd_supported() {
            tracing::warn!("this kernel has no pidfd_getfd (before 5.6): counting connections with sock_diag");
            counting = Counting::SockDiag;
        }
        Scanner {
            proc_root,
            node_pid,
            pods: HashMap::new(),
            node: None,
            counting,
            count_every: count_every.max(1),
            scans: 0,
            counts: HashMap::new(),
        }
    }

    /// Namespaces held open (one per pod read).
    pub fn open_handles(&self) -> usize {
        self.pods.len()
    }

    /// One scan of the node: the readings of every running pod (hostNetwork pods are judged by the node's
    /// values), keeping `readAt` of readings that did not change.
    pub fn scan(
        &mut self,
        pods: &[NodePod],
        previous: &[PodLiveReport],
        now: &Time,
    ) -> (Option<LiveKeepalive>, Vec<PodLiveReport>) {
        let live = |v: agent::LiveSysctls| LiveKeepalive {
            time: v.time,
            interval: v.interval,
            probes: v.probes,
        };
        self.scans += 1;
        let node = self.node_values().map(live);
        let scanned: Vec<&NodePod> = pods.iter().filter(|p| p.running && !p.host_network).collect();
        let (processes, errors) = self.refresh_handles(&scanned);
        self.counts.retain(|uid, _| self.pods.contains_key(uid));
        let to_count = self.due_for_counting(&scanned);
        let previous: HashMap<&str, &PodLiveReport> = previous.iter().map(|r| (r.uid.as_str(), r)).collect();
        let read_one = |pod: &NodePod| {
            let mut report = PodLiveReport {
                uid: pod.uid.clone(),
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                sysctls: None,
                established: 0,
                keepalive: 0,
                read_at: now.clone(),
                error: None,
            };
            let mut counted = None;
            match (self.pods.get(&pod.uid), errors.get(&pod.uid)) {
                (Some((_, handle)), _) => match handle.sysctls() {
                    Ok(sysctls) => {
                        report.sysctls = Some(live(sysctls));
                        let connections = if to_count.contains(pod.uid.as_str()) {
                            match self.count(handle, processes.get(&pod.uid)) {
                                Ok(c) => {
                                    counted = Some(c);
                                    Some(c)
                                }
                                // The values were read: the pod stays verified, the counts are said to be missing.
                                Err(e) => {
                                    report.error = Some(format!("connections not counted: {e}"));
                                    None
                                }
                            }
                        } else {
                            self.counts.get(&pod.uid).map(|(c, _)| *c)
                        };
                        if let Some(c) = connections {
                            report.established = c.established as i32;
                            report.keepalive = c.keepalive as i32;
                        }
                    }
                    Err(e) => report.error = Some(e.to_string()),
                },
                (None, Some(error)) => report.error = Some(error.clone()),
                (None, None) if !pod.started => return None,
                (None, None) => report.error = Some("no process of the pod found on the host".to_string()),
            }
            if let Some(old) = previous.get(pod.uid.as_str()) {
                let unchanged = PodLiveReport {
                    read_at: old.read_at.clone(),
                    ..report.clone()
                };
                if &&unchanged == old {
                    report.read_at = old.read_at.clone();
                }
            }
            Some((report, counted))
        };
        // The readings wait on the kernel, not on each other: spread them over the cores.
        let results = parallel(&scanned, |p| read_one(p));
        let scan = self.scans;
        let mut reports = Vec::with_capacity(results.len());
        for (report, counted) in results.into_iter().flatten() {
            if let Some(c) = counted {
                self.counts.insert(report.uid.clone(), (c, scan));
            }
            reports.push(report);
        }
        reports.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        (node, reports)
    }

    /// The pods whose connections this scan counts: never counted yet, or the longest ago (a share of
    /// 1/`count_every` of them with sock_diag; all of them with socket fds).
    fn due_for_counting<'a>(&self, pods: &[&'a NodePod]) -> std::collections::HashSet<&'a str> {
        let readable: Vec<&NodePod> = pods
            .iter()
            .copied()
            .filter(|p| self.pods.contains_key(&p.uid))
            .collect();
        if self.counting == Counting::SocketFds {
            return readable.iter().map(|p| p.uid.as_str()).collect();
        }
        let (new, mut counted): (Vec<&NodePod>, Vec<&NodePod>) =
            readable.into_iter().partition(|p| !self.counts.contains_key(&p.uid));
        counted.sort_by_key(|p| self.counts[&p.uid].1);
        let share = counted.len().div_ceil(self.count_every as usize);
        new.iter()
            .chain(counted.iter().take(share))
            .map(|p| p.uid.as_str())
            .collect()
    }

    fn count(
        &self,
        handle: &agent::NetnsHandle,
        pids: Option<&Vec<u32>>,
    ) -> Result<agent::Connections, agent::ReadError> {
        match (self.counting, pids) {
            // Denied for one process (an LSM, a Yama policy): the namespace dump still counts it.
            (Counting::SocketFds, Some(pids)) => {
                agent::count_held_connections(&self.proc_root, pids).or_else(|_| handle.connections())
            }
            _ => handle.connections(),
        }
    }

    fn node_values(&mut self) -> Option<agent::LiveSysctls> {
        let current = agent::netns_inode(&self.proc_root, self.node_pid).ok()?;
        if self.node.as_ref().is_none_or(|h| h.inode != current) {
            self.node = agent::NetnsHandle::open(&self.proc_root, self.node_pid).ok();
        }
        self.node.as_ref()?.sysctls().ok()
    }

    /// Finds the processes of `pods` (one /proc walk), keeps the handles of pods whose first process still lives
    /// in the same namespace, forgets the others, and opens handles for pods without one. Returns the processes
    /// of each pod, and why a pod's namespace could not be opened.
    #[allow(clippy::type_complexity)]
    fn refresh_handles(&mut self, pods: &[&NodePod]) -> (HashMap<String, Vec<u32>>, HashMap<String, String>) {
        let wanted: std::collections::HashSet<String> = pods.iter().map(|p| p.uid.clone()).collect();
        let proc_root = &self.proc_root;
        let processes = agent::find_pod_processes(proc_root, &wanted);
        self.pods.retain(|uid, (_, handle)| {
            processes
                .get(uid)
                .and_then(|pids| pids.first())
                .is_some_and(|pid| agent::netns_inode(proc_root, *pid).is_ok_and(|i| i == handle.inode))
        });
        let missing: Vec<(String, u32)> = processes
            .iter()
            .filter(|(uid, _)| !self.pods.contains_key(*uid))
            .filter_map(|(uid, pids)| Some((uid.clone(), *pids.first()?)))
            .collect();
        let mut errors = HashMap::new();
        let opened = parallel(&missing, |(uid, pid)| {
            (uid.clone(), *pid, agent::NetnsHandle::open(proc_root, *pid))
        });
        for (uid, pid, handle) in opened {
            match handle {
                Ok(handle) => {
                    self.pods.insert(uid, (pid, handle));
                }
                Err(e) => {
                    errors.insert(uid, e.to_string());
                }
            }
        }
        (processes, errors)
    }
}

/// `f` over `items` on up to four threads (the work waits on the kernel), results in order.
fn parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4);
    if items.len() < 8 || workers == 1 {
        return items.iter().map(&f).collect();
    }
    let chunk = items.len().div_ceil(workers);
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| s.spawn(|| part.iter().map(&f).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a scan worker panicked"))
            .collect()
    })
}

/// Runs the agent until SIGTERM or Ctrl-C.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let pods_api: Api<Pod> = Api::all(client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", args.node_name));
    let mut events = std::pin::pin!(watcher(pods_api, config).default_backoff());
    let reports: Api<crate::api::KeepaliveNodeReport> = Api::all(client);
    let mut pods: HashMap<String, NodePod> = HashMap::new();
    let mut relist: HashMap<String, NodePod> = HashMap::new();
    let mut synced = false;
    let mut written: Option<(KeepaliveNodeReportSpec, std::time::Instant)> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(args.scan_interval_seconds.max(1)));
    let mut scanner = Some(Scanner::with_counting(
        args.proc_root.clone(),
        args.node_netns_pid,
        args.count_connections,
        args.count_every_scans,
    ));
    raise_open_file_limit();
    let metrics = Arc::new(AgentMetrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    // Seconds (since the agent started) at the end of the last completed scan; 0 before the first.
    let started_at = std::time::Instant::now();
    let last_scan = Arc::new(AtomicU64::new(0));
    if args.heartbeat_seconds < args.scan_interval_seconds {
        anyhow::bail!(
            "--heartbeat-seconds ({}) must be at least --scan-interval-seconds ({}): the report is written at most once a scan",
            args.heartbeat_seconds,
            args.scan_interval_seconds
        );
    }
    if let Some(addr) = args.admin_listen.0 {
        let listener = crate::server::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "probes and metrics serving");
        let health = Health {
            ready: ready.clone(),
            last_scan: last_scan.clone(),
            started_at,
            // A scan loop stuck (say, on a hung kernel read) for this long fails the liveness probe.
            stuck_after: 3 * args.scan_interval_seconds + 30,
        };
        let router = admin_router(metrics.clone(), health);
        tokio::spawn(crate::server::serve_plain(
            listener,
            router,
            crate::controller::shutdown_signal(),
        ));
    }
    let shutdown = crate::controller::shutdown_signal();
    let mut shutdown = std::pin::pin!(shutdown);
    tracing::info!(node = %args.node_name, "agent running");
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(watcher::Event::Init)) => relist.clear(),
                Some(Ok(watcher::Event::InitApply(pod))) => {
                    if let Some(p) = NodePod::from_pod(&pod) {
                        relist.insert(p.uid.clone(), p);
                    }
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    pods = std::mem::take(&mut relist);
                    synced = true;
                }
                Some(Ok(watcher::Event::Apply(pod))) => {
                    if let Some(p) = NodePod::from_pod(&pod) {
                        pods.insert(p.uid.clone(), p);
                    }
                }
                Some(Ok(watcher::Event::Delete(pod))) => {
                    if let Some(uid) = pod.metadata.uid {
                        pods.remove(&uid);
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, "pod watch failed; retrying"),
                None => return Ok(()),
            },
            _ = tick.tick() => {
                if !synced {
                    continue;
                }
                let snapshot: Vec<NodePod> = pods.values().cloned().collect();
                let previous = written.as_ref().map(|(s, _)| s.pods.clone()).unwrap_or_default();
                let now = Time(Timestamp::now());
                let stamp = now.clone();
                let mut taken = scanner.take().expect("the scanner is back after every scan");
                let started = std::time::Instant::now();
                let Ok((back, (node, pod_reports))) = tokio::task::spawn_blocking(move || {
                    let result = taken.scan(&snapshot, &previous, &stamp);
                    (taken, result)
                })
                .await
                else {
                    // The scan panicked: start over with a fresh scanner.
                    scanner = Some(Scanner::with_counting(
                        args.proc_root.clone(),
                        args.node_netns_pid,
                        args.count_connections,
                        args.count_every_scans,
                    ));
                    continue;
                };
                scanner = Some(back);
                metrics.scan_duration.observe(started.elapsed().as_secs_f64());
                last_scan.store(started_at.elapsed().as_secs().max(1), Ordering::Relaxed);
                let spec = KeepaliveNodeReportSpec {
                    last_scan: now,
                    heartbeat_seconds: i32::try_from(args.heartbeat_seconds).unwrap_or(i32::MAX),
                    node_sysctls: node,
                    verified_pods: pod_reports.iter().filter(|r| r.sysctls.is_some()).count() as i32,
                    unverified_pods: pod_reports.iter().filter(|r| r.sysctls.is_none()).count() as i32,
                    pods: pod_reports,
                };
                let heartbeat_due = written
                    .as_ref()
                    .is_none_or(|(_, at)| at.elapsed() >= Duration::from_secs(args.heartbeat_seconds));
                // Connection counts move all the time on a busy node: alone, they wait for the heartbeat.
                let changed = written.as_ref().is_none_or(|(old, _)| without_counts(old) != without_counts(&spec));
                if !changed && !heartbeat_due {
                    continue;
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
                        metrics.pods.get_or_create(&PodReadLabels { state: "verified" }).set(i64::from(verified));
                        metrics.pods.get_or_create(&PodReadLabels { state: "unverified" }).set(i64::from(unverified));
                        metrics.report_writes.get_or_create(&OutcomeLabels { outcome: "written" }).inc();
                        written = Some((spec, std::time::Instant::now()));
                        ready.store(true, Ordering::Relaxed);
                    }
                    Err(e) => {
                        metrics.report_writes.get_or_create(&OutcomeLabels { outcome: "failed" }).inc();
                        tracing::warn!(error = %e, "writing the node report failed; retrying next scan");
                    }
                }
            }
            _ = &mut shutdown => return Ok(()),
        }
    }
}

/// The agent holds four descriptors per pod (three sysctl files and a sock_diag socket): lift the soft limit on
/// open files to the hard limit, as a node with 250 pods needs more than the usual 1024.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!(error = %std::io::Error::last_os_error(), "cannot raise the open-file limit");
            }
        }
    }
}

/// What the agent's probes look at.
#[derive(Clone)]
struct Health {
    ready: Arc<AtomicBool>,
    last_scan: Arc<AtomicU64>,
    started_at: std::time::Instant,
    stuck_after: u64,
}

/// /livez (scans keep completing), /readyz (its first report is written: it can see pods and write), /metrics.
fn admin_router(metrics: Arc<AgentMetrics>, health: Health) -> axum::Router {
    use axum::{http::StatusCode, routing::get};
    let ready = health.ready.clone();
    axum::Router::new()
        .route(
            "/livez",
            get(move || {
                let last = health.last_scan.load(Ordering::Relaxed);
                let since = health.started_at.elapsed().as_secs().saturating_sub(last);
                async move {
                    if last == 0 || since <= health.stuck_after {
                        (StatusCode::OK, "ok".to_string())
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("no scan completed for {since} s"),
                        )
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "no node report written yet")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = metrics.encode();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        )
}

/// A report without what changes on every scan (the scan time, the connection counts and their readAt), to tell a
/// change worth a write.
fn without_counts(spec: &KeepaliveNodeReportSpec) -> KeepaliveNodeReportSpec {
    KeepaliveNodeReportSpec {
        last_scan: Time(Timestamp::UNIX_EPOCH),
        pods: spec
            .pods
            .iter()
            .map(|p| PodLiveReport {
                established: 0,
                keepalive: 0,
                read_at: Time(Timestamp::UNIX_EPOCH),
                ..p.clone()
            })
            .collect(),
        ..spec.clone()
    }
}
