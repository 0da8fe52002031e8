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
        atomic::{AtomicBool, Ordering},
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
    /// The report is rewritten at least this often, as a heartbeat, even when nothing changed.
    /// Plain-HTTP address for probes and metrics (/livez, /readyz, /metrics); empty to disable.
    #[arg(long, env = "KEEPALIVE_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: Option<std::net::SocketAddr>,
    #[arg(long, env = "KEEPALIVE_HEARTBEAT_SECONDS", value_parser = clap::value_parser!(u64).range(1..=86400), default_value_t = 60)]
    pub heartbeat_seconds: u64,
}

/// A pod of this node, as the scan needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub host_network: bool,
    pub running: bool,
}

impl NodePod {
    fn from_pod(pod: &Pod) -> Option<NodePod> {
        let spec = pod.spec.as_ref();
        Some(NodePod {
            uid: pod.metadata.uid.clone()?,
            namespace: pod.metadata.namespace.clone()?,
            name: pod.metadata.name.clone()?,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            running: !matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ),
        })
    }
}

/// The agent's scan state: an open [`agent::NetnsHandle`] on each pod's network namespace, kept across scans, so
/// a pod's namespace is entered once in its life (and again only if its namespace is replaced).
///
/// Each scan: one walk of /proc finds the processes of every pod; a pod's sysctls are read through its handle;
/// its connections are counted from its processes' socket descriptors ([`agent::count_held_connections`]),
/// or, on kernels without pidfd_getfd, by a sock_diag dump of its namespace.
pub struct Scanner {
    proc_root: PathBuf,
    node_pid: u32,
    /// Per pod UID: the process the handle was opened through, and the handle.
    pods: HashMap<String, (u32, agent::NetnsHandle)>,
    node: Option<agent::NetnsHandle>,
    /// The kernel lacks pidfd_getfd: count with sock_diag dumps.
    dump_connections: bool,
}

impl Scanner {
    pub fn new(proc_root: PathBuf, node_pid: u32) -> Self {
        let dump_connections = !agent::pidfd_getfd_supported();
        if dump_connections {
            tracing::warn!("this kernel has no pidfd_getfd (before 5.6): counting connections with sock_diag dumps");
        }
        Scanner {
            proc_root,
            node_pid,
            pods: HashMap::new(),
            node: None,
            dump_connections,
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
        let node = self.node_values().map(live);
        let scanned: Vec<&NodePod> = pods.iter().filter(|p| p.running && !p.host_network).collect();
        let (processes, errors) = self.refresh_handles(&scanned);
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
            let reading = match (self.pods.get(&pod.uid), errors.get(&pod.uid)) {
                (Some((_, handle)), _) => handle
                    .sysctls()
                    .and_then(|s| {
                        let connections = match processes.get(&pod.uid) {
                            Some(pids) if !self.dump_connections => {
                                agent::count_held_connections(&self.proc_root, pids)?
                            }
                            _ => handle.connections()?,
                        };
                        Ok((s, connections))
                    })
                    .map_err(|e| e.to_string()),
                (None, Some(error)) => Err(error.clone()),
                (None, None) => Err("no process of the pod found on the host".to_string()),
            };
            match reading {
                Ok((sysctls, connections)) => {
                    report.sysctls = Some(live(sysctls));
                    report.established = connections.established as i32;
                    report.keepalive = connections.keepalive as i32;
                }
                Err(e) => report.error = Some(e),
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
            report
        };
        // The readings wait on the kernel, not on each other: spread them over the cores.
        let mut reports: Vec<PodLiveReport> = parallel(&scanned, |p| read_one(p));
        reports.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        (node, reports)
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
    let mut scanner = Some(Scanner::new(args.proc_root.clone(), args.node_netns_pid));
    raise_open_file_limit();
    let metrics = Arc::new(AgentMetrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(addr) = args.admin_listen {
        let listener = crate::server::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "probes and metrics serving");
        let router = admin_router(metrics.clone(), ready.clone());
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
                    scanner = Some(Scanner::new(args.proc_root.clone(), args.node_netns_pid));
                    continue;
                };
                scanner = Some(back);
                metrics.scan_duration.observe(started.elapsed().as_secs_f64());
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
                let changed = written.as_ref().is_none_or(|(old, _)| {
                    KeepaliveNodeReportSpec { last_scan: spec.last_scan.clone(), ..old.clone() } != spec
                });
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

/// /livez (the process answers), /readyz (its first report is written: it can see pods and write), /metrics.
fn admin_router(metrics: Arc<AgentMetrics>, ready: Arc<AtomicBool>) -> axum::Router {
    use axum::{http::StatusCode, routing::get};
    axum::Router::new()
        .route("/livez", get(|| async { "ok" }))
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
