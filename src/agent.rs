//! The node agent's view of the kernel: which host process belongs to which pod (from /proc/<pid>/cgroup, as
//! kubelet lays cgroups out), the keepalive sysctls inside that pod's network namespace, and how many of its
//! established TCP connections have the keepalive timer armed (sock_diag, inside the namespace).
//!
//! Reading a namespaced sysctl means being in the namespace: a short-lived thread of its own enters the pod's
//! network namespace (setns), opens the three sysctl files and a sock_diag socket, and ends; no thread that does
//! other work ever switches. Both stay bound to the namespace they were opened in, so a [`NetnsHandle`] kept
//! across scans reads the pod again without entering it (entering costs about a millisecond: the kernel rebuilds
//! its /proc/sys entries for every namespace switch).

use std::{
    collections::{HashMap, HashSet},
    fs,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::{FileExt, MetadataExt},
    },
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
        (uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')).then(|| uid.to_ascii_lowercase())
    })
}

/// The pod UID of a process, from the text of its /proc/<pid>/cgroup.
pub fn pod_uid_from_proc_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|line| pod_uid_from_cgroup_path(line.splitn(3, ':').nth(2)?))
}

/// For every wanted pod UID, the host processes of that pod, lowest pid first, found by scanning `proc_root`.
/// Processes that vanish or cannot be read are skipped.
pub fn find_pod_processes(proc_root: &Path, wanted: &HashSet<String>) -> HashMap<String, Vec<u32>> {
    let mut found: HashMap<String, Vec<u32>> = HashMap::new();
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
            found.entry(uid).or_default().push(pid);
        }
    }
    for pids in found.values_mut() {
        pids.sort_unstable();
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

/// Established TCP connections held by the processes `pids` (the processes of one pod), from their socket
/// descriptors: each socket is borrowed with pidfd_getfd(2) and asked its protocol, its state (TCP_INFO) and
/// SO_KEEPALIVE. A socket held by several descriptors or processes counts once; processes that end meanwhile
/// are skipped. This costs a few microseconds per socket, where a sock_diag dump walks the kernel's whole
/// connection table, shared by all namespaces (about 0.4 ms per namespace with 262 144 buckets).
///
/// Fails with `Unsupported` on kernels without pidfd_getfd (before 5.6): count with
/// [`NetnsHandle::connections`] then.
pub fn count_held_connections(proc_root: &Path, pids: &[u32]) -> Result<Connections, ReadError> {
    let mut seen = HashSet::new();
    let mut counts = Connections::default();
    for &pid in pids {
        let fds = match fs::read_dir(proc_root.join(pid.to_string()).join("fd")) {
            Ok(fds) => fds,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // ended meanwhile
            Err(source) => {
                return Err(ReadError::Read {
                    what: format!("descriptors of process {pid}"),
                    source,
                });
            }
        };
        let Some(pidfd) = held::pidfd_open(pid)? else {
            continue;
        };
        for entry in fds.flatten() {
            let Ok(target) = fs::read_link(entry.path()) else {
                continue;
            };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            if !seen.insert(inode) {
                continue;
            }
            match held::tcp_state(&pidfd, fd) {
                Ok(Some((established, keepalive))) => {
                    counts.established += u32::from(established);
                    counts.keepalive += u32::from(established && keepalive);
                }
                Ok(None) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                    return Err(ReadError::Read {
                        what: "sockets (pidfd_getfd)".into(),
                        source: std::io::Error::new(std::io::ErrorKind::Unsupported, e),
                    });
                }
                // The descriptor was closed or the process ended meanwhile.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBADF | libc::ESRCH)) => {}
                Err(source) => {
                    return Err(ReadError::Read {
                        what: format!("socket descriptor {fd} of process {pid}"),
                        source,
                    });
                }
            }
        }
    }
    Ok(counts)
}

/// Whether this kernel has pidfd_open and pidfd_getfd (Linux 5.6 and later).
pub fn pidfd_getfd_supported() -> bool {
    let Ok(Some(pidfd)) = held::pidfd_open(std::process::id()) else {
        return false;
    };
    // SAFETY: duplicating one of our own descriptors (the pidfd itself); the copy is closed at once.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), pidfd.as_raw_fd(), 0) };
    if fd < 0 {
        return false;
    }
    // SAFETY: closing the copy we were just given.
    unsafe { libc::close(fd as i32) };
    true
}

mod held {
    //! Borrowing another process's socket descriptor (pidfd_open + pidfd_getfd) and asking it about TCP.
    use std::{
        io,
        mem::size_of,
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
    };

    use super::ReadError;

    /// A pidfd for `pid`; `None` if the process has ended.
    pub fn pidfd_open(pid: u32) -> Result<Option<OwnedFd>, ReadError> {
        // SAFETY: pidfd_open(2) with no flags returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ESRCH) => Ok(None),
                Some(libc::ENOSYS) => Err(ReadError::Read {
                    what: "sockets (pidfd_open)".into(),
                    source: io::Error::new(io::ErrorKind::Unsupported, e),
                }),
                _ => Err(ReadError::Read {
                    what: format!("pidfd of process {pid}"),
                    source: e,
                }),
            };
        }
        // SAFETY: a descriptor just returned by the kernel, owned by nobody else.
        Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    fn int_option(fd: &OwnedFd, level: i32, name: i32) -> io::Result<i32> {
        let mut value: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt(2) into an int we own, with its length.
        let rc = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, &mut value as *mut _ as *mut _, &mut len) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(value)
    }

    /// For a TCP socket (IPv4 or IPv6): (established, SO_KEEPALIVE on); `None` for any other socket.
    pub fn tcp_state(pidfd: &OwnedFd, target_fd: i32) -> io::Result<Option<(bool, bool)>> {
        // SAFETY: pidfd_getfd(2) duplicates the target's descriptor into this process, or returns -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just returned by the kernel, owned by nobody else; closed on drop.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let domain = int_option(&fd, libc::SOL_SOCKET, libc::SO_DOMAIN)?;
        if !matches!(domain, libc::AF_INET | libc::AF_INET6)
            || int_option(&fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)? != libc::IPPROTO_TCP
        {
            return Ok(None);
        }
        // struct tcp_info begins with tcpi_state; a short read of its first bytes is allowed.
        let mut info = [0u8; 8];
        let mut len = info.len() as libc::socklen_t;
        // SAFETY: getsockopt(2) into a buffer we own, with its length.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                info.as_mut_ptr() as *mut _,
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        const TCP_ESTABLISHED: u8 = 1;
        let established = info[0] == TCP_ESTABLISHED;
        let keepalive = int_option(&fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE)? != 0;
        Ok(Some((established, keepalive)))
    }
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

/// Runs `f` on a thread of its own inside the network namespace of `pid` (under `proc_root`).
fn in_netns<T: Send>(
    proc_root: &Path,
    pid: u32,
    f: impl FnOnce() -> Result<T, ReadError> + Send,
) -> Result<T, ReadError> {
    let ns_path = proc_root.join(pid.to_string()).join("ns/net");
    let ns = fs::File::open(&ns_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ReadError::Vanished { pid },
        _ => ReadError::Enter { pid, source: e },
    })?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns(2) on a valid descriptor changes only this thread's network namespace; the thread
                // ends right after `f`.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(ReadError::Enter {
                        pid,
                        source: std::io::Error::last_os_error(),
                    });
                }
                f()
            })
            .join()
            .unwrap_or(Err(ReadError::Vanished { pid }))
    })
}

/// The network namespace of `pid`, as its nsfs inode number (what `readlink /proc/<pid>/ns/net` shows).
pub fn netns_inode(proc_root: &Path, pid: u32) -> Result<u64, ReadError> {
    fs::metadata(proc_root.join(pid.to_string()).join("ns/net"))
        .map(|m| m.ino())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ReadError::Vanished { pid },
            _ => ReadError::Enter { pid, source: e },
        })
}

/// One network namespace, held open: its three keepalive sysctl files and a sock_diag socket, all bound to the
/// namespace they were opened in. Reads need no namespace switch; once the namespace is gone they fail.
#[derive(Debug)]
pub struct NetnsHandle {
    /// The namespace's nsfs inode number, to notice a pod whose namespace was replaced.
    pub inode: u64,
    files: [fs::File; 3],
    diag: OwnedFd,
}

impl NetnsHandle {
    /// Opens the handle by entering the network namespace of `pid` once, on a thread of its own.
    pub fn open(proc_root: &Path, pid: u32) -> Result<NetnsHandle, ReadError> {
        let inode = netns_inode(proc_root, pid)?;
        in_netns(proc_root, pid, || {
            let open = |name: &str| {
                let path = PathBuf::from("/proc/sys").join(name.replace('.', "/"));
                fs::File::open(&path).map_err(|source| ReadError::Read {
                    what: path.display().to_string(),
                    source,
                })
            };
            let files = [open(SYSCTL_TIME)?, open(SYSCTL_INTERVAL)?, open(SYSCTL_PROBES)?];
            let diag = sock_diag::socket().map_err(|source| ReadError::Read {
                what: "sock_diag socket".into(),
                source,
            })?;
            Ok(NetnsHandle { inode, files, diag })
        })
    }

    /// The keepalive sysctls as the kernel holds them now.
    pub fn sysctls(&self) -> Result<LiveSysctls, ReadError> {
        let read = |i: usize, name: &str| -> Result<i32, ReadError> {
            let mut buf = [0u8; 32];
            let n = self.files[i].read_at(&mut buf, 0).map_err(|source| ReadError::Read {
                what: name.to_string(),
                source,
            })?;
            let text = String::from_utf8_lossy(&buf[..n]);
            text.trim().parse().map_err(|_| ReadError::Read {
                what: name.to_string(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, text.trim().to_string()),
            })
        };
        Ok(LiveSysctls {
            time: read(0, SYSCTL_TIME)?,
            interval: read(1, SYSCTL_INTERVAL)?,
            probes: read(2, SYSCTL_PROBES)?,
        })
    }

    /// Established TCP connections (IPv4 and IPv6) and those with keepalive armed, by one sock_diag dump.
    pub fn connections(&self) -> Result<Connections, ReadError> {
        sock_diag::established_tcp(&self.diag).map_err(|source| ReadError::Read {
            what: "sock_diag".into(),
            source,
        })
    }
}

/// Reads the keepalive sysctls in the network namespace of `pid`.
pub fn read_sysctls(proc_root: &Path, pid: u32) -> Result<LiveSysctls, ReadError> {
    NetnsHandle::open(proc_root, pid)?.sysctls()
}

/// Established TCP connections of the network namespace of `pid`, counted through a sock_diag netlink dump
/// inside the namespace (reading /proc/<pid>/net/tcp would format the kernel's whole established-connection
/// table for every namespace, milliseconds each).
pub fn read_connections(proc_root: &Path, pid: u32) -> Result<Connections, ReadError> {
    NetnsHandle::open(proc_root, pid)?.connections()
}

mod sock_diag {
    //! A minimal NETLINK_SOCK_DIAG client: dump the TCP sockets of the socket's network namespace in state
    //! ESTABLISHED and read each one's timer (2 = keepalive). The request is the original inet_diag one
    //! (TCPDIAG_GETSOCK), which dumps IPv4 and IPv6 in a single walk of the kernel's connection table — the walk
    //! is most of the cost, and the table is shared by all namespaces.
    use std::{
        io,
        mem::size_of,
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
        sync::atomic::{AtomicU32, Ordering},
    };

    use super::Connections;

    const TCPDIAG_GETSOCK: u16 = 18;
    const TCP_ESTABLISHED: u8 = 1;
    const TIMER_KEEPALIVE: u8 = 2;

    #[repr(C)]
    #[derive(Default)]
    struct SockId {
        sport: u16,
        dport: u16,
        src: [u32; 4],
        dst: [u32; 4],
        interface: u32,
        cookie: [u32; 2],
    }

    /// `struct nlmsghdr` + `struct inet_diag_req`.
    #[repr(C)]
    struct Request {
        nlh: libc::nlmsghdr,
        family: u8,
        src_len: u8,
        dst_len: u8,
        ext: u8,
        id: SockId,
        states: u32,
        dbs: u32,
    }

    /// Offsets in `struct inet_diag_msg`.
    const MSG_STATE: usize = 1;
    const MSG_TIMER: usize = 2;

    /// A sock_diag socket in the calling thread's network namespace.
    pub fn socket() -> io::Result<OwnedFd> {
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just returned by socket(2), owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    pub fn established_tcp(fd: &OwnedFd) -> io::Result<Connections> {
        static SEQ: AtomicU32 = AtomicU32::new(1);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let request = Request {
            nlh: libc::nlmsghdr {
                nlmsg_len: size_of::<Request>() as u32,
                nlmsg_type: TCPDIAG_GETSOCK,
                nlmsg_flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
                nlmsg_seq: seq,
                nlmsg_pid: 0,
            },
            family: libc::AF_UNSPEC as u8,
            src_len: 0,
            dst_len: 0,
            ext: 0,
            id: SockId::default(),
            states: 1 << TCP_ESTABLISHED,
            dbs: 0,
        };
        // SAFETY: sending the bytes of a plain-old-data struct we own.
        let sent = unsafe {
            libc::send(
                fd.as_raw_fd(),
                &request as *const Request as *const libc::c_void,
                size_of::<Request>(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut counts = Connections::default();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            // SAFETY: receiving into a buffer we own, bounded by its length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut data = &buf[..n as usize];
            while data.len() >= size_of::<libc::nlmsghdr>() {
                let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes(data[4..6].try_into().unwrap());
                let reply_seq = u32::from_ne_bytes(data[8..12].try_into().unwrap());
                if len < size_of::<libc::nlmsghdr>() || len > data.len() {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
                }
                let aligned = (len + 3) & !3;
                if reply_seq != seq {
                    // Left over from an earlier dump that failed halfway: skip it.
                    data = &data[aligned.min(data.len())..];
                    continue;
                }
                match kind as i32 {
                    libc::NLMSG_ERROR | libc::NLMSG_DONE if len < 20 => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "short netlink error message",
                        ));
                    }
                    libc::NLMSG_DONE => {
                        // A dump that failed part way ends with a negative errno.
                        let errno = i32::from_ne_bytes(data[16..20].try_into().unwrap());
                        if errno < 0 {
                            return Err(io::Error::from_raw_os_error(-errno));
                        }
                        return Ok(counts);
                    }
                    libc::NLMSG_ERROR => {
                        let errno = i32::from_ne_bytes(data[16..20].try_into().unwrap());
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                    _ => {
                        let msg = &data[size_of::<libc::nlmsghdr>()..len];
                        if msg.len() > MSG_TIMER && msg[MSG_STATE] == TCP_ESTABLISHED {
                            counts.established += 1;
                            if msg[MSG_TIMER] == TIMER_KEEPALIVE {
                                counts.keepalive += 1;
                            }
                        }
                    }
                }
                data = &data[aligned.min(data.len())..];
            }
        }
    }
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
}
