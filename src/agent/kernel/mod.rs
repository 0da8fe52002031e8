//! The node agent's view of the kernel: which host process belongs to which pod (from /proc/<pid>/cgroup, as
//! kubelet lays cgroups out), the keepalive sysctls inside that pod's network namespace, and how many of its
//! established TCP connections have the keepalive timer armed (sock_diag, inside the namespace).
//!
//! A process is opened once, as a directory descriptor on /proc/<pid> ([`ProcessRef`]), and everything about it
//! (its cgroup, its start time, its namespaces) is read through that descriptor: once the process has ended, reads
//! through it fail, so a pid reused by another process can never point the agent at that process's namespace.
//!
//! Reading a namespaced sysctl means being in the namespace: a short-lived thread of its own enters the pod's
//! network namespace (setns), opens the three sysctl files and a sock_diag socket, and ends; no thread that does
//! other work ever switches. Both stay bound to the namespace they were opened in, so a [`NetnsHandle`] kept
//! across scans reads the pod again without entering it (entering costs about a millisecond: the kernel rebuilds
//! its /proc/sys entries for every namespace switch).

pub mod bpf;
mod cgroup;
mod pidfd;
mod sock_diag;

use std::{
    fs,
    io::Read,
    os::{
        fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::fs::FileExt,
    },
    path::{Path, PathBuf},
    sync::Mutex,
};

use rustix::{
    fs::{AtFlags, Mode, OFlags},
    io::Errno,
    thread::{LinkNameSpaceType, move_into_link_name_space},
};

pub use self::{
    cgroup::{PodProcesses, find_pod_processes, find_pods, pod_uid_from_cgroup_path, pod_uid_from_proc_cgroup},
    pidfd::{count_held_connections, pidfd_getfd_supported},
    sock_diag::{Dump, from_kernel},
};
use crate::api::{LiveKeepalive, SYSCTL_INTERVAL, SYSCTL_PROBES, SYSCTL_TIME};

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
    #[error("cannot enter the pod's network namespace: {source}")]
    Enter { source: std::io::Error },
    #[error("cannot read {what}: {source}")]
    Read { what: String, source: std::io::Error },
    #[error("network namespace owned by a user namespace of the pod: not read")]
    UserNamespace,
}

/// A process, held as a directory descriptor on its /proc entry. Reads through it fail once the process has
/// ended (and been reaped), even if its pid is reused meanwhile.
#[derive(Debug)]
pub struct ProcessRef {
    pub pid: u32,
    dir: OwnedFd,
}

fn vanished_or(pid: u32, what: &str, e: Errno) -> ReadError {
    if matches!(e, Errno::NOENT | Errno::SRCH) {
        ReadError::Vanished { pid }
    } else {
        ReadError::Read {
            what: format!("{what} of process {pid}"),
            source: e.into(),
        }
    }
}

impl ProcessRef {
    /// Opens /proc/<pid> under `proc_root`.
    pub fn open(proc_root: &Path, pid: u32) -> Result<ProcessRef, ReadError> {
        let dir = rustix::fs::open(
            proc_root.join(pid.to_string()),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| vanished_or(pid, "the /proc entry", e))?;
        Ok(ProcessRef { pid, dir })
    }

    /// Opens <pid> in an already opened /proc directory.
    pub fn open_in(proc_dir: BorrowedFd<'_>, pid: u32) -> Result<ProcessRef, ReadError> {
        let dir = rustix::fs::openat(
            proc_dir,
            pid.to_string(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| vanished_or(pid, "the /proc entry", e))?;
        Ok(ProcessRef { pid, dir })
    }

    /// Opens `name` (relative to the process's /proc entry) read-only.
    pub fn open_file(&self, name: &str) -> Result<OwnedFd, ReadError> {
        rustix::fs::openat(&self.dir, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| vanished_or(self.pid, name, e))
    }

    /// The text of `name` (`cgroup`, `stat`, ...).
    pub fn read(&self, name: &str) -> Result<String, ReadError> {
        let mut text = String::new();
        fs::File::from(self.open_file(name)?)
            .read_to_string(&mut text)
            .map_err(|e| match Errno::from_io_error(&e) {
                Some(errno) => vanished_or(self.pid, name, errno),
                None => ReadError::Read {
                    what: format!("{name} of process {}", self.pid),
                    source: e,
                },
            })?;
        Ok(text)
    }

    /// The process's start time (clock ticks after boot, field 22 of `stat`).
    pub fn start_time(&self) -> Result<u64, ReadError> {
        let stat = self.read("stat")?;
        parse_start_time(&stat).ok_or_else(|| ReadError::Read {
            what: format!("stat of process {}", self.pid),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "no start time"),
        })
    }

    /// The process's network namespace, opened.
    pub fn netns(&self) -> Result<OwnedFd, ReadError> {
        self.open_file("ns/net")
    }

    /// The nsfs inode of the process's namespace `ns/<kind>` (what `readlink /proc/<pid>/ns/<kind>` shows).
    pub fn ns_inode(&self, kind: &str) -> Result<u64, ReadError> {
        rustix::fs::statat(&self.dir, format!("ns/{kind}"), AtFlags::empty())
            .map(|s| s.st_ino)
            .map_err(|e| vanished_or(self.pid, kind, e))
    }
}

/// The start time of a process (field 22) from the text of its /proc/<pid>/stat. The command name (field 2) may
/// hold spaces and parentheses: fields are counted after its last `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts with field 3 (the state).
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// The nsfs inode of an opened namespace.
pub fn inode_of(ns: BorrowedFd<'_>) -> Result<u64, ReadError> {
    rustix::fs::fstat(ns).map(|s| s.st_ino).map_err(|e| ReadError::Read {
        what: "namespace inode".into(),
        source: e.into(),
    })
}

/// The inode of the user namespace that owns the namespace `ns` (ioctl NS_GET_USERNS).
pub fn owner_userns_inode(ns: BorrowedFd<'_>) -> Result<u64, ReadError> {
    use std::os::fd::AsRawFd;
    // _IO(0xb7, 0x1)
    const NS_GET_USERNS: libc::c_ulong = (0xb7 << 8) | 0x1;
    // SAFETY: NS_GET_USERNS takes no argument and returns a new descriptor (or -1); `ns` is a live descriptor
    // borrowed for the call, and the returned descriptor is owned by nobody else, so OwnedFd takes it over.
    let owner = unsafe {
        let fd = libc::ioctl(ns.as_raw_fd(), NS_GET_USERNS as _);
        if fd < 0 {
            return Err(ReadError::Read {
                what: "the owner of a network namespace".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        OwnedFd::from_raw_fd(fd)
    };
    inode_of(owner.as_fd())
}

/// Runs `f` on a thread of its own inside the network namespace `ns`.
fn in_netns<T: Send>(ns: BorrowedFd<'_>, f: impl FnOnce() -> Result<T, ReadError> + Send) -> Result<T, ReadError> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("ka-kernel-ns".into())
            .spawn_scoped(scope, || {
                // setns(2) changes only this thread's network namespace; the thread ends right after `f`.
                move_into_link_name_space(ns, Some(LinkNameSpaceType::Network))
                    .map_err(|e| ReadError::Enter { source: e.into() })?;
                f()
            })
            .map_err(|source| ReadError::Read {
                what: "a thread to enter the namespace".into(),
                source,
            })?
            .join()
            .unwrap_or_else(|_| {
                Err(ReadError::Read {
                    what: "the namespace".into(),
                    source: std::io::Error::other("the namespace thread panicked"),
                })
            })
    })
}

/// The network namespace of `pid`, as its nsfs inode number (what `readlink /proc/<pid>/ns/net` shows).
pub fn netns_inode(proc_root: &Path, pid: u32) -> Result<u64, ReadError> {
    ProcessRef::open(proc_root, pid)?.ns_inode("net")
}

/// One network namespace, held open: the namespace itself, its three keepalive sysctl files and a sock_diag
/// socket, all bound to the namespace they were opened in. Reads need no namespace switch; once the namespace is
/// gone they fail.
#[derive(Debug)]
pub struct NetnsHandle {
    /// The namespace's nsfs inode number, to notice a pod whose namespace was replaced.
    pub inode: u64,
    ns: OwnedFd,
    files: [fs::File; 3],
    /// Closed when a dump is abandoned part way (an unfinished dump blocks the socket's next requests); opened
    /// again, in the namespace, by the next count.
    diag: Mutex<Option<OwnedFd>>,
}

impl NetnsHandle {
    /// Opens the handle on the network namespace `ns` (opened through the process's /proc entry), entering it
    /// once, on a thread of its own.
    pub fn open(ns: OwnedFd) -> Result<NetnsHandle, ReadError> {
        let inode = inode_of(ns.as_fd())?;
        let (files, diag) = in_netns(ns.as_fd(), || {
            let open = |name: &str| {
                let path = PathBuf::from("/proc/sys").join(name.replace('.', "/"));
                fs::File::open(&path).map_err(|source| ReadError::Read {
                    what: path.display().to_string(),
                    source,
                })
            };
            let files = [open(SYSCTL_TIME)?, open(SYSCTL_INTERVAL)?, open(SYSCTL_PROBES)?];
            Ok((files, diag_socket()?))
        })?;
        Ok(NetnsHandle {
            inode,
            ns,
            files,
            diag: Mutex::new(Some(diag)),
        })
    }

    /// The keepalive sysctls as the kernel holds them now.
    pub fn sysctls(&self) -> Result<LiveKeepalive, ReadError> {
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
        Ok(LiveKeepalive {
            time: read(0, SYSCTL_TIME)?,
            interval: read(1, SYSCTL_INTERVAL)?,
            probes: read(2, SYSCTL_PROBES)?,
        })
    }

    /// Established TCP connections (IPv4 and IPv6) and those with keepalive armed, by one sock_diag dump,
    /// abandoned once it has seen `max_sockets` sockets.
    pub fn connections_within(&self, max_sockets: u32) -> Result<Dump, ReadError> {
        let mut diag = self.diag.lock().unwrap_or_else(|e| e.into_inner());
        if diag.is_none() {
            *diag = Some(in_netns(self.ns.as_fd(), diag_socket)?);
        }
        let socket = diag.as_ref().expect("opened above");
        let result = sock_diag::established_tcp(socket, max_sockets);
        if !matches!(result, Ok(Dump::Counted(_))) {
            // An unfinished dump (abandoned, or failed half way) would block the socket's next requests.
            *diag = None;
        }
        result.map_err(|source| ReadError::Read {
            what: "sock_diag".into(),
            source,
        })
    }

    /// Established TCP connections, by one complete sock_diag dump.
    pub fn connections(&self) -> Result<Connections, ReadError> {
        match self.connections_within(u32::MAX)? {
            Dump::Counted(c) => Ok(c),
            Dump::OverBudget => unreachable!("no budget"),
        }
    }
}

fn diag_socket() -> Result<OwnedFd, ReadError> {
    sock_diag::socket().map_err(|source| ReadError::Read {
        what: "sock_diag socket".into(),
        source,
    })
}

/// Reads the keepalive sysctls in the network namespace of `pid`.
pub fn read_sysctls(proc_root: &Path, pid: u32) -> Result<LiveKeepalive, ReadError> {
    NetnsHandle::open(ProcessRef::open(proc_root, pid)?.netns()?)?.sysctls()
}

/// Established TCP connections of the network namespace of `pid`, counted through a sock_diag netlink dump
/// inside the namespace (reading /proc/<pid>/net/tcp would format the kernel's whole established-connection
/// table for every namespace, milliseconds each).
pub fn read_connections(proc_root: &Path, pid: u32) -> Result<Connections, ReadError> {
    NetnsHandle::open(ProcessRef::open(proc_root, pid)?.netns()?)?.connections()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_spaces_and_parentheses_in_the_name() {
        let stat = "1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("1 (init) S 1"), None);
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn own_process_through_its_directory() {
        let me = ProcessRef::open(Path::new("/proc"), std::process::id()).unwrap();
        assert!(me.start_time().unwrap() > 0);
        assert_eq!(
            me.ns_inode("net").unwrap(),
            inode_of(me.netns().unwrap().as_fd()).unwrap()
        );
    }
}
