//! The node agent's view of the kernel: which host process belongs to which pod (from /proc/<pid>/cgroup, as
//! kubelet lays cgroups out), the keepalive sysctls inside that pod's network namespace, and how many of its
//! established TCP connections have the keepalive timer armed (sock_diag, inside the namespace).
//!
//! Reading a namespaced sysctl means being in the namespace: a short-lived thread of its own enters the pod's
//! network namespace (setns), opens the three sysctl files and a sock_diag socket, and ends; no thread that does
//! other work ever switches. Both stay bound to the namespace they were opened in, so a [`NetnsHandle`] kept
//! across scans reads the pod again without entering it (entering costs about a millisecond: the kernel rebuilds
//! its /proc/sys entries for every namespace switch).

mod cgroup;
mod pidfd;
mod sock_diag;

use std::{
    fs,
    os::{
        fd::{AsFd, OwnedFd},
        unix::fs::{FileExt, MetadataExt},
    },
    path::{Path, PathBuf},
};

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

pub use self::{
    cgroup::{find_pod_processes, pod_uid_from_cgroup_path, pod_uid_from_proc_cgroup},
    pidfd::{count_held_connections, pidfd_getfd_supported},
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
                // setns(2) changes only this thread's network namespace; the thread ends right after `f`.
                move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network))
                    .map_err(|e| ReadError::Enter { pid, source: e.into() })?;
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

    /// Established TCP connections (IPv4 and IPv6) and those with keepalive armed, by one sock_diag dump.
    pub fn connections(&self) -> Result<Connections, ReadError> {
        sock_diag::established_tcp(&self.diag).map_err(|source| ReadError::Read {
            what: "sock_diag".into(),
            source,
        })
    }
}

/// Reads the keepalive sysctls in the network namespace of `pid`.
pub fn read_sysctls(proc_root: &Path, pid: u32) -> Result<LiveKeepalive, ReadError> {
    NetnsHandle::open(proc_root, pid)?.sysctls()
}

/// Established TCP connections of the network namespace of `pid`, counted through a sock_diag netlink dump
/// inside the namespace (reading /proc/<pid>/net/tcp would format the kernel's whole established-connection
/// table for every namespace, milliseconds each).
pub fn read_connections(proc_root: &Path, pid: u32) -> Result<Connections, ReadError> {
    NetnsHandle::open(proc_root, pid)?.connections()
}
