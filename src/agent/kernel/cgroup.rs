//! Which host process belongs to which pod: the pod UID in /proc/<pid>/cgroup, as kubelet lays cgroups out.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    os::fd::AsFd,
    path::Path,
};

use rustix::fs::{Mode, OFlags};

use super::ProcessRef;

/// The pod UID in a kubelet cgroup path: a dashed UUID, normalized to lowercase, or the 32 lowercase hex digits
/// kubelet gives a static pod (its config hash, which the mirror pod shows as `kubernetes.io/config.mirror`), as
/// is.
///
/// Layouts (cgroup v1 per controller, v2 unified, same paths):
/// - cgroupfs driver: `/kubepods/pod<uid>/<ctr>`, `/kubepods/burstable/pod<uid>/<ctr>`,
///   `/kubepods/besteffort/pod<uid>/<ctr>`
/// - systemd driver: `/kubepods.slice/kubepods-pod<uid_>.slice/...`,
///   `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope`
///   (dashes of the UID written as underscores)
///
/// The pod segment is looked for anywhere in the path: under kubelet's `--cgroup-root`, and in paths relative to
/// the reader's own cgroup namespace (`0::/../../besteffort/pod<uid>/<ctr>`, as an agent in a container of its own
/// cgroup namespace sees them on cgroup v2).
pub fn pod_uid_from_cgroup_path(path: &str) -> Option<String> {
    path.split('/').find_map(|segment| {
        let raw = if let Some(rest) = segment.strip_suffix(".slice") {
            rest.rsplit_once("-pod").map(|(_, uid)| uid)?
        } else {
            segment.strip_prefix("pod")?
        };
        let uid = raw.replace('_', "-");
        let dashed = uid.len() == 36
            && uid.bytes().enumerate().all(|(i, b)| {
                if matches!(i, 8 | 13 | 18 | 23) {
                    b == b'-'
                } else {
                    b.is_ascii_hexdigit()
                }
            });
        let hash = uid.len() == 32 && uid.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        (dashed || hash).then(|| uid.to_ascii_lowercase())
    })
}

/// The pod UID of a process, from the text of its /proc/<pid>/cgroup.
pub fn pod_uid_from_proc_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|line| pod_uid_from_cgroup_path(line.splitn(3, ':').nth(2)?))
}

/// The processes of one pod found by a walk of /proc: its oldest process examined (the sandbox: the pause
/// container starts first, and no process of the pod can be older), the pids examined, and how many there were.
/// `T` is what is kept of the sandbox (an open [`ProcessRef`] in the agent).
#[derive(Debug)]
pub struct PodProcesses<T> {
    /// The oldest process examined, by (start time, pid).
    pub sandbox: Option<((u64, u32), T)>,
    /// The pids examined (at most the budget), lowest first once the walk is over.
    pub pids: Vec<u32>,
    /// Every process of the pod, examined or not.
    pub total: usize,
}

impl<T> Default for PodProcesses<T> {
    fn default() -> Self {
        PodProcesses {
            sandbox: None,
            pids: Vec::new(),
            total: 0,
        }
    }
}

impl<T> PodProcesses<T> {
    /// Counts one more process of the pod; whether it is to be examined (at most `max` are).
    pub fn admit(&mut self, pid: u32, max: usize) -> bool {
        self.total += 1;
        let examined = self.pids.len() < max;
        if examined {
            self.pids.push(pid);
        }
        examined
    }

    /// Offers an examined process started at `start`: it becomes the sandbox if it is older (ties: lower pid).
    pub fn offer(&mut self, start: u64, pid: u32, process: T) {
        if self.sandbox.as_ref().is_none_or(|(key, _)| (start, pid) < *key) {
            self.sandbox = Some(((start, pid), process));
        }
    }

    /// More processes than were examined.
    pub fn over_budget(&self) -> bool {
        self.total > self.pids.len()
    }
}

/// Every pod with a process on the host, by UID: one walk of `proc_root`, reading each process's cgroup through
/// its /proc directory; of each pod, at most `max_processes` processes are examined further (their start time),
/// the oldest of them is kept open. Processes that vanish or cannot be read are skipped.
pub fn find_pods(proc_root: &Path, max_processes: usize) -> BTreeMap<String, PodProcesses<ProcessRef>> {
    let mut found: BTreeMap<String, PodProcesses<ProcessRef>> = BTreeMap::new();
    let Ok(root) = rustix::fs::open(
        proc_root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return found;
    };
    let Ok(entries) = fs::read_dir(proc_root) else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(process) = ProcessRef::open_in(root.as_fd(), pid) else {
            continue;
        };
        let Some(uid) = process.read("cgroup").ok().and_then(|t| pod_uid_from_proc_cgroup(&t)) else {
            continue;
        };
        let pod = found.entry(uid).or_default();
        if !pod.admit(pid, max_processes) {
            continue;
        }
        match process.start_time() {
            Ok(start) => pod.offer(start, pid, process),
            Err(_) => {
                pod.pids.pop();
                pod.total -= 1;
            }
        }
    }
    found.retain(|_, pod| pod.sandbox.is_some());
    for pod in found.values_mut() {
        pod.pids.sort_unstable();
    }
    found
}

/// For every wanted pod UID, the host processes of that pod, lowest pid first.
pub fn find_pod_processes(proc_root: &Path, wanted: &HashSet<String>) -> HashMap<String, Vec<u32>> {
    find_pods(proc_root, usize::MAX)
        .into_iter()
        .filter(|(uid, _)| wanted.contains(uid))
        .map(|(uid, pod)| (uid, pod.pids))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f3c2f7e-1a2b-4c5d-8e9f-0123456789ab";

    #[test]
    fn cgroupfs_layouts() {
        for path in [
            format!("/kubepods/pod{UID}/abc123"),
            format!("/kubepods/burstable/pod{UID}/abc123"),
            format!("/kubepods/besteffort/pod{UID}/abc123"),
        ] {
            assert_eq!(pod_uid_from_cgroup_path(&path).as_deref(), Some(UID), "{path}");
        }
    }

    #[test]
    fn systemd_layouts() {
        let u = UID.replace('-', "_");
        for path in [
            format!("/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-abc.scope"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-abc.scope"
            ),
            format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/crio-abc.scope"),
        ] {
            assert_eq!(pod_uid_from_cgroup_path(&path).as_deref(), Some(UID), "{path}");
        }
    }

    #[test]
    fn proc_cgroup_v1_and_v2() {
        let v1 = format!(
            "12:pids:/kubepods/burstable/pod{UID}/c1\n11:cpu,cpuacct:/kubepods/burstable/pod{UID}/c1\n1:name=systemd:/\n"
        );
        assert_eq!(pod_uid_from_proc_cgroup(&v1).as_deref(), Some(UID));
        let v2 = format!(
            "0::/kubepods.slice/kubepods-pod{}.slice/cri-containerd-x.scope\n",
            UID.replace('-', "_")
        );
        assert_eq!(pod_uid_from_proc_cgroup(&v2).as_deref(), Some(UID));
        assert_eq!(
            pod_uid_from_proc_cgroup("0::/user.slice/session-1.scope\n4:pids:/\n"),
            None
        );
        assert_eq!(pod_uid_from_cgroup_path("/kubepods/burstable/podnot-a-uid/c"), None);
        assert_eq!(
            pod_uid_from_cgroup_path("/kubepods/pod0f3c2f7e1-a2b-4c5d-8e9f-0123456789ab/c"),
            None,
            "dashes in the wrong places"
        );
        // Seen from inside a cgroup namespace (the agent's container on cgroup v2), and under a cgroup root.
        assert_eq!(
            pod_uid_from_proc_cgroup(&format!("0::/../../besteffort/pod{UID}/c1\n")).as_deref(),
            Some(UID)
        );
        assert_eq!(
            pod_uid_from_cgroup_path(&format!(
                "/../kubepods-burstable-pod{}.slice/cri-containerd-x.scope",
                UID.replace('-', "_")
            ))
            .as_deref(),
            Some(UID)
        );
        assert_eq!(
            pod_uid_from_cgroup_path(&format!("/custom-root/kubepods/pod{UID}/c")).as_deref(),
            Some(UID)
        );
    }

    const STATIC: &str = "6a3c1b0f9e8d7c6b5a4f3e2d1c0b9a88";

    #[test]
    fn static_pods_hash_uids_are_taken_as_they_are() {
        for path in [
            format!("/kubepods/pod{STATIC}/abc"),
            format!("/kubepods/burstable/pod{STATIC}/abc"),
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC}.slice/crio-abc.scope"),
        ] {
            assert_eq!(pod_uid_from_cgroup_path(&path).as_deref(), Some(STATIC), "{path}");
        }
        let upper = STATIC.to_ascii_uppercase();
        assert_eq!(pod_uid_from_cgroup_path(&format!("/kubepods/pod{upper}/c")), None);
        assert_eq!(
            pod_uid_from_cgroup_path(&format!("/kubepods/pod{}/c", &STATIC[1..])),
            None
        );
        assert_eq!(
            pod_uid_from_cgroup_path(&format!("/kubepods/pod{}/c", UID.to_ascii_uppercase())).as_deref(),
            Some(UID),
            "dashed UIDs are normalized"
        );
    }

    #[test]
    fn the_sandbox_is_the_oldest_process_ties_by_lowest_pid() {
        let mut pod = PodProcesses::<&str>::default();
        for (pid, start, name) in [
            (300, 50, "app"),
            (120, 10, "pause"),
            (90, 10, "tie-lower-pid"),
            (80, 70, "late"),
        ] {
            assert!(pod.admit(pid, 10));
            pod.offer(start, pid, name);
        }
        assert_eq!(pod.sandbox, Some(((10, 90), "tie-lower-pid")));
        assert!(!pod.over_budget());
    }

    #[test]
    fn processes_beyond_the_budget_are_counted_not_examined() {
        let mut pod = PodProcesses::<()>::default();
        let examined: Vec<bool> = (1..=5).map(|pid| pod.admit(pid, 3)).collect();
        assert_eq!(examined, [true, true, true, false, false]);
        assert_eq!((pod.pids.len(), pod.total), (3, 5));
        assert!(pod.over_budget());
    }
}
