//! The scan of a node: which pods are on it (from cgroups), reading them through kept namespace handles, and the
//! bookkeeping between scans (which pods to recount, budgets, read times carried over) as pure functions.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{
    connections::{Observed, Summarizer},
    kernel::{self, Dump, PodProcesses, ProcessRef, ReadError, bpf},
};
use crate::api::{
    ConnectionMethod, ConnectionReading, LiveKeepalive, MAX_READ_ERROR_CHARS, MAX_REPORT_PODS, PodLiveReport,
    SocketSummary,
};

/// How the agent reads a pod's established connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Counting {
    /// Every TCP socket of the node, socket by socket, in one pass of a BPF iterator: SO_KEEPALIVE, the socket's
    /// own keepalive values, TCP_USER_TIMEOUT, the remote end and the process. Read-only. Needs BTF and Linux
    /// 5.11; where it cannot load, the agent counts with sock-diag and says why in the report.
    PerSocket,
    /// A sock_diag dump of the pod's network namespace, as `ss` does: read-only. Each dump walks the kernel's
    /// connection table, which all namespaces share, so dumps are spread over scans (`--count-every-scans`).
    SockDiag,
    /// The pod processes' own socket descriptors, borrowed with pidfd_getfd(2): no table walk, every pod every
    /// scan. Receiving a socket re-tags it with the agent's cgroup v1 net_cls classid and net_prio index: do not
    /// use on nodes that shape or prioritise pod traffic with those controllers.
    SocketFds,
}

/// What one scan may spend on one pod, and on all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budgets {
    /// A pod with more sockets is not counted (its sysctls still are); it is tried again rarely.
    pub max_sockets: u32,
    /// Processes of a pod beyond this many are not examined (no stat, no descriptor walk).
    pub max_processes: usize,
    /// Connection counting stops once the scan has taken this long; the pods not counted keep their previous
    /// counts and come first next scan.
    pub deadline: Duration,
    /// A per-socket pass reads at most this many sockets of the node; a node with more is only counted.
    pub max_node_sockets: usize,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            max_sockets: 50_000,
            max_processes: 1_000,
            deadline: Duration::from_secs(8),
            max_node_sockets: 500_000,
        }
    }
}

/// A pod over the socket budget is tried again only every this many of its due times.
pub const OVER_BUDGET_BACKOFF: u64 = 10;

/// What a scan found beside the readings, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Pods whose connections are not counted: more sockets than the budget.
    pub over_sockets: usize,
    /// Pods with more processes than the budget.
    pub over_processes: usize,
    /// Pods due for counting that the deadline left uncounted.
    pub uncounted: usize,
    /// Sockets the per-socket pass read (`None`: no pass this scan).
    pub sockets_read: Option<usize>,
}

/// One scan's result.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scan {
    /// The node's own values (hostNetwork pods run with them).
    pub node: Option<LiveKeepalive>,
    /// How connections were read.
    pub connection_reading: Option<ConnectionReading>,
    /// One entry per pod, sorted by UID.
    pub pods: Vec<PodLiveReport>,
    pub stats: ScanStats,
}

/// The connection counts kept of a pod between scans.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountState {
    /// The last complete count.
    pub connections: Option<kernel::Connections>,
    /// The scan that last tried (and finished or abandoned) a count.
    pub last: u64,
    /// The last try found more sockets than the budget.
    pub over_budget: bool,
}

/// The agent's scan state: an open [`kernel::NetnsHandle`] on each pod's network namespace, kept across scans, so
/// a pod's namespace is entered once in its life (and again only if its namespace is replaced), and the last
/// connection counts of each pod.
///
/// Each scan: one walk of /proc finds every pod (by the pod UID of each process's cgroup) and its sandbox (its
/// oldest process); every pod's sysctls are read through its handle; connections are counted for new pods and,
/// with sock_diag, for the 1/`count_every` of the others counted longest ago (all pods with socket fds), until
/// the deadline.
pub struct Scanner {
    proc_root: PathBuf,
    node_pid: u32,
    /// Per pod UID: the handle on its sandbox's network namespace.
    pods: HashMap<String, kernel::NetnsHandle>,
    node: Option<kernel::NetnsHandle>,
    counting: Counting,
    count_every: u32,
    budgets: Budgets,
    scans: u64,
    counts: HashMap<String, CountState>,
    /// The BPF socket reader, when connections are read per socket.
    sockets: Option<bpf::SocketReader>,
    /// How connections are read, and why not per socket when they are not.
    reading: ConnectionReading,
}

/// A pod's connections as met in a per-socket pass.
struct PodSockets {
    /// `None` once the pod had more sockets than the per-pod budget.
    summary: Option<Summarizer>,
    established: u32,
    keepalive: u32,
}

/// What became of one pod's count in a scan.
enum Counted {
    Done(kernel::Connections),
    OverBudget,
    Failed(String),
    /// The deadline passed first.
    NotReached,
}

impl Scanner {
    /// A scanner that counts connections with sock_diag dumps, each pod at least every third scan.
    pub fn new(proc_root: PathBuf, node_pid: u32) -> Self {
        Self::with_counting(proc_root, node_pid, Counting::SockDiag, 3)
    }

    pub fn with_counting(proc_root: PathBuf, node_pid: u32, mut counting: Counting, count_every: u32) -> Self {
        if counting == Counting::SocketFds && !kernel::pidfd_getfd_supported() {
            tracing::warn!("this kernel has no pidfd_getfd (before 5.6): counting connections with sock_diag");
            counting = Counting::SockDiag;
        }
        let mut reading = ConnectionReading {
            method: ConnectionMethod::Counts,
            message: None,
        };
        let mut sockets = None;
        if counting == Counting::PerSocket {
            match bpf::SocketReader::load() {
                Ok(reader) => {
                    tracing::info!(hz = reader.hz(), "reading connections per socket (BPF iterator)");
                    reading.method = ConnectionMethod::PerSocket;
                    sockets = Some(reader);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read connections per socket: counting them with sock_diag");
                    reading.message = Some(truncate_chars(
                        &format!("per-socket reading unavailable, connections only counted: {e}"),
                        MAX_READ_ERROR_CHARS,
                    ));
                    counting = Counting::SockDiag;
                }
            }
        }
        Scanner {
            proc_root,
            node_pid,
            pods: HashMap::new(),
            node: None,
            counting,
            count_every: count_every.max(1),
            budgets: Budgets::default(),
            scans: 0,
            counts: HashMap::new(),
            sockets,
            reading,
        }
    }

    /// How connections are read.
    pub fn connection_reading(&self) -> &ConnectionReading {
        &self.reading
    }

    pub fn with_budgets(mut self, budgets: Budgets) -> Self {
        self.budgets = budgets;
        self
    }

    /// Namespaces held open (one per pod read).
    pub fn open_handles(&self) -> usize {
        self.pods.len()
    }

    /// Whether the namespace of pod `uid` is held open.
    pub fn has_handle(&self, uid: &str) -> bool {
        self.pods.contains_key(uid)
    }

    /// One scan of the node: an entry for every pod with a process on it (hostNetwork pods, in the node's own
    /// network namespace, are left out: they run with the node's values), keeping `readAt` of readings that did
    /// not change.
    pub fn scan(&mut self, previous: &[PodLiveReport], now: &Time) -> Scan {
        let started = Instant::now();
        let deadline = started + self.budgets.deadline;
        self.scans += 1;
        let scan = self.scans;
        let node_process = ProcessRef::open(&self.proc_root, self.node_pid).ok();
        let node_inode = node_process.as_ref().and_then(|p| p.ns_inode("net").ok());
        let host_userns = node_process.as_ref().and_then(|p| p.ns_inode("user").ok()).or_else(|| {
            ProcessRef::open(std::path::Path::new("/proc"), std::process::id())
                .ok()?
                .ns_inode("user")
                .ok()
        });
        let node = self.node_values(node_process.as_ref(), node_inode);

        // The pods, each with the inode of its sandbox's network namespace; hostNetwork pods left out.
        let found = kernel::find_pods(&self.proc_root, self.budgets.max_processes);
        let mut pods: Vec<(String, PodProcesses<ProcessRef>, Result<u64, ReadError>)> = Vec::new();
        for (uid, pod) in found {
            let Some((_, sandbox)) = &pod.sandbox else { continue };
            let inode = sandbox.ns_inode("net");
            if inode.as_ref().ok().is_some_and(|i| Some(*i) == node_inode) {
                continue;
            }
            pods.push((uid, pod, inode));
            if pods.len() == MAX_REPORT_PODS {
                break;
            }
        }
        let present: HashSet<&str> = pods.iter().map(|(uid, ..)| uid.as_str()).collect();
        self.pods.retain(|uid, _| present.contains(uid.as_str()));
        self.counts.retain(|uid, _| present.contains(uid.as_str()));
        drop(present);

        // Handles: kept while the sandbox's namespace is the same; opened for the others.
        let mut errors: HashMap<String, Vec<String>> = HashMap::new();
        let mut to_open = Vec::new();
        for (uid, pod, inode) in &pods {
            match inode {
                Ok(inode) if self.pods.get(uid).is_some_and(|h| h.inode == *inode) => {}
                Ok(_) => {
                    self.pods.remove(uid);
                    to_open.push((uid, pod));
                }
                Err(e) => {
                    self.pods.remove(uid);
                    errors.entry(uid.clone()).or_default().push(e.to_string());
                }
            }
        }
        let opened = parallel(&to_open, |(uid, pod)| {
            let (_, sandbox) = pod.sandbox.as_ref().expect("pods have a sandbox");
            ((*uid).clone(), open_handle(sandbox, host_userns))
        });
        for (uid, handle) in opened {
            match handle {
                Ok(handle) => {
                    self.pods.insert(uid, handle);
                }
                Err(e) => errors.entry(uid).or_default().push(e.to_string()),
            }
        }

        // Sysctls: cheap, every pod every scan.
        let sysctls: Vec<Option<Result<LiveKeepalive, ReadError>>> =
            parallel(&pods, |(uid, ..)| self.pods.get(uid).map(|h| h.sysctls()));

        // Connections, per socket: one pass over the node's sockets for all pods whose values were read.
        let mut reading = self.reading.clone();
        let mut stats = ScanStats::default();
        let mut per_socket: Option<HashMap<&str, PodSockets>> = None;
        if let Some(reader) = self.sockets.as_mut() {
            let targets: Vec<(&str, u64, LiveKeepalive)> = pods
                .iter()
                .zip(&sysctls)
                .filter_map(|((uid, ..), values)| {
                    let live = values.as_ref()?.as_ref().ok()?;
                    Some((uid.as_str(), self.pods.get(uid)?.inode, *live))
                })
                .collect();
            match per_socket_pass(reader, &targets, &self.budgets) {
                Ok((found, read)) => {
                    stats.sockets_read = Some(read);
                    per_socket = Some(found);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "per-socket pass failed: counting connections this scan");
                    reading = ConnectionReading {
                        method: ConnectionMethod::Counts,
                        message: Some(truncate_chars(
                            &format!("per-socket pass failed, connections only counted this scan: {e}"),
                            MAX_READ_ERROR_CHARS,
                        )),
                    };
                }
            }
        }

        // Connections, counted: the pods due, oldest first, until the deadline.
        let readable = pods
            .iter()
            .filter(|(uid, ..)| per_socket.is_none() && self.pods.contains_key(uid))
            .map(|(uid, ..)| (uid.as_str(), self.counts.get(uid).copied()));
        let due = pods_due(readable, self.counting_every(), scan);
        let by_uid: HashMap<&str, &PodProcesses<ProcessRef>> =
            pods.iter().map(|(uid, pod, _)| (uid.as_str(), pod)).collect();
        let counted = parallel(&due, |uid| {
            if Instant::now() >= deadline {
                return Counted::NotReached;
            }
            self.count(uid, &self.pods[*uid], by_uid[uid])
        });
        let mut uncounted = 0;
        for (uid, result) in due.iter().zip(counted) {
            let state = self.counts.entry(uid.to_string()).or_default();
            match result {
                Counted::Done(c) => {
                    *state = CountState {
                        connections: Some(c),
                        last: scan,
                        over_budget: false,
                    }
                }
                Counted::OverBudget => {
                    *state = CountState {
                        connections: None,
                        last: scan,
                        over_budget: true,
                    }
                }
                Counted::Failed(e) => {
                    errors
                        .entry(uid.to_string())
                        .or_default()
                        .push(format!("connections not counted: {e}"));
                }
                Counted::NotReached => uncounted += 1,
            }
        }

        let previous: HashMap<&str, &PodLiveReport> = previous.iter().map(|r| (r.uid.as_str(), r)).collect();
        stats.uncounted = uncounted;
        let mut reports = Vec::with_capacity(pods.len());
        for ((uid, pod, _), sysctls) in pods.iter().zip(sysctls) {
            let mut problems = Vec::new();
            if pod.over_budget() {
                stats.over_processes += 1;
                problems.push(format!(
                    "processes not examined: more than {} processes (--max-processes-per-pod)",
                    self.budgets.max_processes
                ));
            }
            let mut report = PodLiveReport {
                uid: uid.clone(),
                sysctls: None,
                established: 0,
                keepalive: 0,
                sockets: None,
                read_at: now.clone(),
                error: None,
            };
            match sysctls {
                Some(Ok(values)) => report.sysctls = Some(values),
                Some(Err(e)) => problems.push(e.to_string()),
                None => {}
            }
            problems.extend(errors.remove(uid).unwrap_or_default());
            if let (Some(_), Some(found)) = (report.sysctls, per_socket.as_mut()) {
                // A pod the pass did not meet holds no established connection.
                let sockets = found.remove(uid.as_str());
                report.established = sockets
                    .as_ref()
                    .map_or(0, |s| i32::try_from(s.established).unwrap_or(i32::MAX));
                report.keepalive = sockets
                    .as_ref()
                    .map_or(0, |s| i32::try_from(s.keepalive).unwrap_or(i32::MAX));
                match sockets.map(|s| s.summary) {
                    None => report.sockets = Some(SocketSummary::default()),
                    Some(Some(summary)) => report.sockets = Some(summary.finish()),
                    Some(None) => {
                        stats.over_sockets += 1;
                        problems.push(format!(
                            "connections counted, not classified: more than {} sockets (--max-sockets-per-pod)",
                            self.budgets.max_sockets
                        ));
                    }
                }
            } else if report.sysctls.is_some() {
                let state = self.counts.get(uid).copied().unwrap_or_default();
                if state.over_budget {
                    stats.over_sockets += 1;
                    problems.push(format!(
                        "connections not counted: more than {} sockets (--max-sockets-per-pod)",
                        self.budgets.max_sockets
                    ));
                } else if let Some(c) = state.connections {
                    report.established = i32::try_from(c.established).unwrap_or(i32::MAX);
                    report.keepalive = i32::try_from(c.keepalive).unwrap_or(i32::MAX);
                }
            }
            if !problems.is_empty() {
                report.error = Some(truncate_chars(&problems.join("; "), MAX_READ_ERROR_CHARS));
            }
            if let Some(old) = previous.get(uid.as_str()) {
                keep_read_at(&mut report, old);
            }
            reports.push(report);
        }
        Scan {
            node,
            connection_reading: Some(reading),
            pods: reports,
            stats,
        }
    }

    fn counting_every(&self) -> u32 {
        if self.counting == Counting::SocketFds {
            1
        } else {
            self.count_every
        }
    }

    fn count(&self, uid: &str, handle: &kernel::NetnsHandle, pod: &PodProcesses<ProcessRef>) -> Counted {
        let max = self.budgets.max_sockets;
        let dump = match self.counting {
            Counting::SocketFds => {
                let belongs = |p: &ProcessRef| {
                    p.read("cgroup")
                        .ok()
                        .and_then(|t| kernel::pod_uid_from_proc_cgroup(&t))
                        .is_some_and(|u| u == uid)
                };
                // Denied for one process (an LSM, a Yama policy): the namespace dump still counts it.
                kernel::count_held_connections(&self.proc_root, &pod.pids, max, belongs)
                    .or_else(|_| handle.connections_within(max))
            }
            // PerSocket here: its pass failed this scan.
            Counting::SockDiag | Counting::PerSocket => handle.connections_within(max),
        };
        match dump {
            Ok(Dump::Counted(c)) => Counted::Done(c),
            Ok(Dump::OverBudget) => Counted::OverBudget,
            Err(e) => Counted::Failed(e.to_string()),
        }
    }

    fn node_values(&mut self, node: Option<&ProcessRef>, inode: Option<u64>) -> Option<LiveKeepalive> {
        if self.node.as_ref().map(|h| h.inode) != inode || self.node.is_none() {
            self.node = node
                .and_then(|p| p.netns().ok())
                .and_then(|ns| kernel::NetnsHandle::open(ns).ok());
        }
        self.node.as_ref()?.sysctls().ok()
    }
}

/// One pass of the BPF reader over the node's sockets, each established socket added to the pod whose network
/// namespace holds it (`targets`: pod UID, namespace inode, its sysctls); sockets of other namespaces (the
/// node's, hostNetwork pods', pods not read) are skipped. Returns the pods met and how many sockets were read.
fn per_socket_pass<'a>(
    reader: &mut bpf::SocketReader,
    targets: &[(&'a str, u64, LiveKeepalive)],
    budgets: &Budgets,
) -> Result<(HashMap<&'a str, PodSockets>, usize), String> {
    let by_netns: HashMap<u64, (&'a str, LiveKeepalive)> = targets
        .iter()
        .map(|(uid, inode, live)| (*inode, (*uid, *live)))
        .collect();
    let mut found: HashMap<&'a str, PodSockets> = HashMap::new();
    let max = budgets.max_sockets;
    let visited = reader
        .visit_once(budgets.max_node_sockets, |socket| {
            let Some((uid, live)) = by_netns.get(&socket.netns) else {
                return;
            };
            let pod = found.entry(uid).or_insert_with(|| PodSockets {
                summary: Some(Summarizer::new(*live)),
                established: 0,
                keepalive: 0,
            });
            pod.established = pod.established.saturating_add(1);
            pod.keepalive = pod.keepalive.saturating_add(u32::from(socket.keepalive));
            if pod.established > max {
                pod.summary = None;
            }
            if let Some(summary) = pod.summary.as_mut() {
                summary.add(&Observed {
                    keepalive: socket.keepalive,
                    own: socket.own,
                    user_timeout_ms: socket.user_timeout_ms,
                    remote: socket.remote,
                    process: &socket.comm,
                });
            }
        })
        .map_err(|e| e.to_string())?;
    if visited.truncated {
        return Err(format!(
            "more than {} sockets on the node (--max-sockets-per-scan)",
            budgets.max_node_sockets
        ));
    }
    Ok((found, visited.sockets))
}

/// Opens a handle on the network namespace of a pod's sandbox, unless a user namespace other than the host's owns
/// it (a pod with user namespaces: its values are the pod's own business, and entering is refused).
fn open_handle(sandbox: &ProcessRef, host_userns: Option<u64>) -> Result<kernel::NetnsHandle, ReadError> {
    let ns = sandbox.netns()?;
    let owner = kernel::owner_userns_inode(std::os::fd::AsFd::as_fd(&ns))?;
    if host_userns.is_some_and(|host| host != owner) {
        return Err(ReadError::UserNamespace);
    }
    kernel::NetnsHandle::open(ns)
}

/// `s` cut to at most `max` characters (on a character boundary), an ellipsis marking the cut.
pub fn truncate_chars(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// `f` over `items` on up to four threads (the work waits on the kernel), results in order. Items are taken in
/// order by whichever thread is free, so the first ones are done first.
fn parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(2, 4);
    if items.len() < 8 {
        return items.iter().map(&f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut results: Vec<(usize, R)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                std::thread::Builder::new()
                    .name("ka-kernel-w".into())
                    .spawn_scoped(s, || {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(item) = items.get(i) else { break };
                            done.push((i, f(item)));
                        }
                        done
                    })
                    .expect("a scan worker thread")
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a scan worker panicked"))
            .collect()
    });
    results.sort_unstable_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// The pods a scan counts, in order, from each readable pod's UID and count state: first those never counted,
/// then the 1/`every` of the others counted longest ago (all with `every` 1), last the pods over the socket budget
/// whose rare turn has come (every [`OVER_BUDGET_BACKOFF`] due times: they never hold the others back).
pub fn pods_due<'a>(
    readable: impl IntoIterator<Item = (&'a str, Option<CountState>)>,
    every: u32,
    scan: u64,
) -> Vec<&'a str> {
    let (over, normal): (Vec<_>, Vec<_>) = readable
        .into_iter()
        .partition(|(_, state)| state.is_some_and(|s| s.over_budget));
    let mut due = due_for_counting(normal.into_iter().map(|(uid, s)| (uid, s.map(|s| s.last))), every);
    let backoff = OVER_BUDGET_BACKOFF * u64::from(every.max(1));
    let mut retry: Vec<(&str, u64)> = over
        .into_iter()
        .filter_map(|(uid, s)| s.map(|s| (uid, s.last)))
        .filter(|(_, last)| scan >= last + backoff)
        .collect();
    retry.sort_by_key(|(_, last)| *last);
    due.extend(retry.into_iter().map(|(uid, _)| uid));
    due
}

/// The pods a scan counts connections of, in order, from each pod's UID and the scan that last counted it: every
/// pod never counted, then the 1/`every` of the others counted longest ago (all of them with `every` 1).
pub fn due_for_counting<'a>(readable: impl IntoIterator<Item = (&'a str, Option<u64>)>, every: u32) -> Vec<&'a str> {
    let (new, mut counted): (Vec<_>, Vec<_>) = readable.into_iter().partition(|(_, last)| last.is_none());
    counted.sort_by_key(|(_, last)| *last);
    let share = counted.len().div_ceil(every.max(1) as usize);
    new.into_iter()
        .chain(counted.into_iter().take(share))
        .map(|(uid, _)| uid)
        .collect()
}

/// A reading equal to the previous one but for its time keeps the previous `readAt`: the report only changes
/// when a value does.
pub fn keep_read_at(report: &mut PodLiveReport, previous: &PodLiveReport) {
    let unchanged = PodLiveReport {
        read_at: previous.read_at.clone(),
        ..report.clone()
    };
    if &unchanged == previous {
        report.read_at = previous.read_at.clone();
    }
}

#[cfg(test)]
pub(super) mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    #[test]
    fn new_pods_are_counted_at_once_the_others_in_shares_oldest_first() {
        let pods = [
            ("a", Some(5)),
            ("b", Some(3)),
            ("c", None),
            ("d", Some(4)),
            ("e", Some(1)),
        ];
        let due = due_for_counting(pods, 3);
        // c is new; of the 4 counted ones, ceil(4/3) = 2 are due: those counted longest ago (e at 1, b at 3).
        assert_eq!(due, ["c", "e", "b"], "new first, then the oldest");
        assert_eq!(due_for_counting(pods, 1).len(), 5, "every scan: all of them");
        assert!(due_for_counting([], 3).is_empty());
    }

    #[test]
    fn pods_over_the_socket_budget_are_retried_rarely_and_last() {
        let state = |last, over_budget| {
            Some(CountState {
                connections: None,
                last,
                over_budget,
            })
        };
        let pods = [("big", state(1, true)), ("a", state(5, false)), ("new", None)];
        assert_eq!(pods_due(pods, 1, 6), ["new", "a"], "big waits");
        assert_eq!(pods_due(pods, 1, 11), ["new", "a", "big"], "its turn, after the others");
        assert_eq!(pods_due(pods, 3, 11), ["new", "a"], "10 due times of every 3rd scan");
        assert_eq!(pods_due(pods, 3, 31), ["new", "a", "big"]);
    }

    #[test]
    fn errors_are_cut_to_the_report_bound_on_a_character_boundary() {
        assert_eq!(truncate_chars("short", 256), "short");
        let long = "é".repeat(300);
        let cut = truncate_chars(&long, 256);
        assert_eq!(cut.chars().count(), 256);
        assert!(cut.ends_with('…'));
        assert_eq!(
            truncate_chars(&"x".repeat(256), 256).len(),
            256,
            "exactly the bound: kept"
        );
    }

    #[test]
    fn every_pod_is_recounted_within_every_scans() {
        // Simulate 30 scans of 10 pods counted every 3rd scan: no pod waits more than 3 scans.
        let uids: Vec<String> = (0..10).map(|i| format!("p{i}")).collect();
        let mut last: HashMap<&str, u64> = HashMap::new();
        for scan in 1..=30u64 {
            let due = due_for_counting(uids.iter().map(|u| (u.as_str(), last.get(u.as_str()).copied())), 3);
            for uid in due {
                last.insert(uid, scan);
            }
            for uid in &uids {
                assert!(
                    scan - last[uid.as_str()] < 3,
                    "{uid} not counted for 3 scans at scan {scan}"
                );
            }
        }
    }

    /// A reading of one pod with keepalive `time`, `established` connections, read at `at` (seconds).
    pub fn reading(established: i32, at: i64, time: i32) -> PodLiveReport {
        PodLiveReport {
            uid: "u".into(),
            sysctls: Some(LiveKeepalive {
                time,
                interval: 10,
                probes: 3,
            }),
            established,
            keepalive: 0,
            sockets: None,
            read_at: Time(Timestamp::from_second(at).unwrap()),
            error: None,
        }
    }

    #[test]
    fn an_unchanged_reading_keeps_its_read_time() {
        let mut same = reading(2, 200, 60);
        keep_read_at(&mut same, &reading(2, 100, 60));
        assert_eq!(same.read_at, reading(0, 100, 60).read_at);
        let mut changed = reading(3, 200, 60);
        keep_read_at(&mut changed, &reading(2, 100, 60));
        assert_eq!(changed.read_at, reading(0, 200, 60).read_at);
    }
}
