//! The node agent's view of the kernel: which host process belongs to which pod (from /proc/<pid>/cgroup, as
//! kubelet lays cgroups out), the keepalive sysctls inside that pod's network namespace, and how many of its
//! established TCP connections have the keepalive timer armed.
//!
//! Reading a namespaced sysctl means being in the namespace: each read runs on a short-lived thread of its own
//! that enters the pod's network namespace (setns) and ends; no thread that does other work ever switches.

use std::{
    collections::{HashMap, HashSet},
    fs,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use crate::policy::{SYSCTL_INTERVAL, SYSCTL_PROBES, SYSCTL_TIME};

/// The pod UID in a kubelet cgroup path, normalized to the usual dashed form.
///
/// Layouts (cgroup v1 per controller, v2 unified, same paths):
/// - cgroupfs driver: `/kubepods/pod<uid>/<ctr>`, `/kubepods/burstable/pod<uid>/<ctr>`,
///   `/kubepods/besteffort/pod<uid>/<ctr>`
/// - systemd driver: `/kubepods.slice/kubepods-pod<uid_>.slice/...`,
///   `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope`
///   (dashes of the UID written as underscores)
pub fn pod_uid_from_cgroup_path(path: &str) -> Option<String> {
    let mut segments = path.split('/').skip_while(|s| !s.starts_with("kubepods"));
    segments.find_map(|segment| {
        let raw = if let Some(rest) = segment.strip_suffix(".slice") {
            rest.rsplit_once("-pod").map(|(_, uid)| uid)?
        } else {
            segment.strip_prefix("pod")?
        };
        let uid = raw.replace('_', "-");
        (uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')).then(|| uid.to_ascii_lowercase())
    })
}

/// The pod UID of a process, from the text of its /proc/<pid>/cgroup.
pub fn pod_uid_from_proc_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|line| pod_uid_from_cgroup_path(line.splitn(3, ':').nth(2)?))
}

/// For every wanted pod UID, one host process of that pod (the lowest pid), found by scanning `proc_root`.
/// Processes that vanish or cannot be read are skipped.
pub fn find_pod_processes(proc_root: &Path, wanted: &HashSet<String>) -> HashMap<String, u32> {
    let mut found: HashMap<String, u32> = HashMap::new();
    let Ok(entries) = fs::read_dir(proc_root) else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(text) = fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        if let Some(uid) = pod_uid_from_proc_cgroup(&text).filter(|u| wanted.contains(u)) {
            let slot = found.entry(uid).or_insert(pid);
            *slot = (*slot).min(pid);
        }
    }
    found
}

/// The keepalive sysctls as the kernel holds them in one network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveSysctls {
    pub time: i32,
    pub interval: i32,
    pub probes: i32,
}

/// Established TCP connections of a network namespace (IPv4 and IPv6), and how many have the keepalive timer
/// armed (SO_KEEPALIVE on; sysctls do nothing for the others).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Connections {
    pub established: u32,
    pub keepalive: u32,
}

/// Why a pod could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("process {pid} vanished")]
    Vanished { pid: u32 },
    #[error("cannot enter the network namespace of process {pid}: {source}")]
    Enter { pid: u32, source: std::io::Error },
    #[error("cannot read {what}: {source}")]
    Read { what: String, source: std::io::Error },
}

/// Reads the keepalive sysctls in the network namespace of `pid` (under `proc_root`), on a thread of its own.
pub fn read_sysctls(proc_root: &Path, pid: u32) -> Result<LiveSysctls, ReadError> {
    let ns_path = proc_root.join(pid.to_string()).join("ns/net");
    let ns = fs::File::open(&ns_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ReadError::Vanished { pid },
        _ => ReadError::Enter { pid, source: e },
    })?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns(2) on a valid descriptor changes only this thread's network namespace; the thread
                // ends right after the reads.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(ReadError::Enter {
                        pid,
                        source: std::io::Error::last_os_error(),
                    });
                }
                let read = |name: &str| -> Result<i32, ReadError> {
                    let path = PathBuf::from("/proc/sys").join(name.replace('.', "/"));
                    let text = fs::read_to_string(&path).map_err(|source| ReadError::Read {
                        what: path.display().to_string(),
                        source,
                    })?;
                    text.trim().parse().map_err(|_| ReadError::Read {
                        what: path.display().to_string(),
                        source: std::io::Error::new(std::io::ErrorKind::InvalidData, text.trim().to_string()),
                    })
                };
                Ok(LiveSysctls {
                    time: read(SYSCTL_TIME)?,
                    interval: read(SYSCTL_INTERVAL)?,
                    probes: read(SYSCTL_PROBES)?,
                })
            })
            .join()
            .unwrap_or(Err(ReadError::Vanished { pid }))
    })
}

/// Counts the established connections and armed keepalive timers in the text of /proc/<pid>/net/tcp or tcp6.
pub fn count_connections(text: &str) -> Connections {
    let mut c = Connections::default();
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(state), Some(timer)) = (fields.get(3), fields.get(5)) else {
            continue;
        };
        if *state != "01" {
            continue;
        }
        c.established += 1;
        // "tr:when": timer kind 2 is the keepalive timer.
        if timer.split(':').next() == Some("02") {
            c.keepalive += 1;
        }
    }
    c
}

/// Connections of the network namespace of `pid`.
pub fn read_connections(proc_root: &Path, pid: u32) -> Result<Connections, ReadError> {
    let mut total = Connections::default();
    for file in ["tcp", "tcp6"] {
        let path = proc_root.join(pid.to_string()).join("net").join(file);
        match fs::read_to_string(&path) {
            Ok(text) => {
                let c = count_connections(&text);
                total.established += c.established;
                total.keepalive += c.keepalive;
            }
            // IPv6 may be disabled.
            Err(e) if file == "tcp6" && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ReadError::Vanished { pid }),
            Err(source) => {
                return Err(ReadError::Read {
                    what: path.display().to_string(),
                    source,
                });
            }
        }
    }
    Ok(total)
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
    }

    #[test]
    fn counts_established_and_keepalive_timers() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 02:000A2B3C 00000000     0        0 2 1 0 20 4 30 10 -1\n\
   2: 0100007F:C350 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1\n\
   3: 0100007F:C351 0100007F:1F90 06 00000000:00000000 03:00001000 00000000     0        0 0 3 0\n";
        assert_eq!(
            count_connections(text),
            Connections {
                established: 2,
                keepalive: 1
            }
        );
    }
}
