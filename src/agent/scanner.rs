//! The scan of a node: which pods to read, reading them through kept namespace handles, and the bookkeeping
//! between scans (which pods to recount, read times carried over) as pure functions.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
};

use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::Time};

use super::kernel;
use crate::{
    api::{LiveKeepalive, PodLiveReport},
    runtime::watch::Index,
};

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
    pub fn from_pod(pod: &Pod) -> Option<NodePod> {
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

/// The agent's scan state: an open [`kernel::NetnsHandle`] on each pod's network namespace, kept across scans, so
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
    pods: HashMap<String, (u32, kernel::NetnsHandle)>,
    node: Option<kernel::NetnsHandle>,
    counting: Counting,
    count_every: u32,
    scans: u64,
    /// Per pod UID: the last counts, and the scan that counted them.
    counts: HashMap<String, (kernel::Connections, u64)>,
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
        self.scans += 1;
        let node = self.node_values();
        let scanned: Vec<&NodePod> = pods.iter().filter(|p| p.running && !p.host_network).collect();
        let (processes, errors) = self.refresh_handles(&scanned);
        self.counts.retain(|uid, _| self.pods.contains_key(uid));
        let to_count = self.pods_to_count(&scanned);
        let previous: HashMap<&str, &PodLiveReport> = previous.iter().map(|r| (r.uid.as_str(), r)).collect();
        let read_one = |pod: &NodePod| {
            let mut report = PodLiveReport {
                uid: pod.uid.clone(),
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
                        report.sysctls = Some(sysctls);
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
                keep_read_at(&mut report, old);
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
        reports.sort_by(|a, b| a.uid.cmp(&b.uid));
        (node, reports)
    }

    /// The pods whose connections this scan counts: never counted yet, or the longest ago (a share of
    /// 1/`count_every` of them with sock_diag; all of them with socket fds).
    fn pods_to_count<'a>(&self, pods: &[&'a NodePod]) -> HashSet<&'a str> {
        let readable = pods
            .iter()
            .filter(|p| self.pods.contains_key(&p.uid))
            .map(|p| (p.uid.as_str(), self.counts.get(&p.uid).map(|(_, scan)| *scan)));
        let every = if self.counting == Counting::SocketFds {
            1
        } else {
            self.count_every
        };
        due_for_counting(readable, every)
    }

    fn count(
        &self,
        handle: &kernel::NetnsHandle,
        pids: Option<&Vec<u32>>,
    ) -> Result<kernel::Connections, kernel::ReadError> {
        match (self.counting, pids) {
            // Denied for one process (an LSM, a Yama policy): the namespace dump still counts it.
            (Counting::SocketFds, Some(pids)) => {
                kernel::count_held_connections(&self.proc_root, pids).or_else(|_| handle.connections())
            }
            _ => handle.connections(),
        }
    }

    fn node_values(&mut self) -> Option<LiveKeepalive> {
        let current = kernel::netns_inode(&self.proc_root, self.node_pid).ok()?;
        if self.node.as_ref().is_none_or(|h| h.inode != current) {
            self.node = kernel::NetnsHandle::open(&self.proc_root, self.node_pid).ok();
        }
        self.node.as_ref()?.sysctls().ok()
    }

    /// Finds the processes of `pods` (one /proc walk), keeps the handles of pods whose first process still lives
    /// in the same namespace, forgets the others, and opens handles for pods without one. Returns the processes
    /// of each pod, and why a pod's namespace could not be opened.
    #[allow(clippy::type_complexity)]
    fn refresh_handles(&mut self, pods: &[&NodePod]) -> (HashMap<String, Vec<u32>>, HashMap<String, String>) {
        let wanted: HashSet<String> = pods.iter().map(|p| p.uid.clone()).collect();
        let proc_root = &self.proc_root;
        let processes = kernel::find_pod_processes(proc_root, &wanted);
        self.pods.retain(|uid, (_, handle)| {
            processes
                .get(uid)
                .and_then(|pids| pids.first())
                .is_some_and(|pid| kernel::netns_inode(proc_root, *pid).is_ok_and(|i| i == handle.inode))
        });
        let missing: Vec<(String, u32)> = processes
            .iter()
            .filter(|(uid, _)| !self.pods.contains_key(*uid))
            .filter_map(|(uid, pids)| Some((uid.clone(), *pids.first()?)))
            .collect();
        let mut errors = HashMap::new();
        let opened = parallel(&missing, |(uid, pid)| {
            (uid.clone(), *pid, kernel::NetnsHandle::open(proc_root, *pid))
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

/// The pods a scan counts connections of, from each readable pod's UID and the scan that last counted it:
/// every pod never counted, and the 1/`every` of the others counted longest ago (all of them with `every` 1).
pub fn due_for_counting<'a>(
    readable: impl IntoIterator<Item = (&'a str, Option<u64>)>,
    every: u32,
) -> HashSet<&'a str> {
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

/// The pods of this node by UID, fed by the agent's pod watch through [`crate::runtime::watch::Relist`].
#[derive(Default)]
pub struct NodePods(pub HashMap<String, NodePod>);

impl Index<Pod> for NodePods {
    type Entry = NodePod;

    fn entry(&mut self, pod: Pod) -> Option<NodePod> {
        NodePod::from_pod(&pod)
    }
    fn apply(&mut self, pod: NodePod) {
        self.0.insert(pod.uid.clone(), pod);
    }
    fn delete(&mut self, pod: Pod) {
        if let Some(uid) = pod.metadata.uid {
            self.0.remove(&uid);
        }
    }
    fn reset(&mut self, pods: Vec<NodePod>) {
        self.0 = pods.into_iter().map(|p| (p.uid.clone(), p)).collect();
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
        assert_eq!(due, HashSet::from(["c", "e", "b"]));
        assert_eq!(due_for_counting(pods, 1).len(), 5, "every scan: all of them");
        assert!(due_for_counting([], 3).is_empty());
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
