//! The kernel-reader thread: the only threads of the agent that hold capabilities.
//!
//! Capabilities are per thread. Before the async runtime starts, the agent spawns `ka-kernel`, which keeps only
//! what reading pods needs (CAP_SYS_ADMIN to enter network namespaces, CAP_SYS_PTRACE to open other processes'
//! namespaces and descriptors, CAP_DAC_READ_SEARCH to list their descriptors when counting socket fds); then the
//! spawning thread drops every capability, so the runtime's threads (HTTP, API client, blocking pool), all
//! started after, run with empty effective and permitted sets. The short-lived threads `ka-kernel` starts (to
//! enter a namespace, to read in parallel) inherit its set.

use std::{io, panic::AssertUnwindSafe, sync::mpsc};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use rustix::thread::{CapabilitySet, CapabilitySets, capabilities, set_capabilities};

use super::scanner::{Counting, Scan, Scanner};
use crate::api::PodLiveReport;

/// What the kernel-reader thread keeps (of what the process has).
pub fn needed_capabilities(counting: Counting) -> CapabilitySet {
    let mut caps = CapabilitySet::SYS_ADMIN | CapabilitySet::SYS_PTRACE;
    if counting == Counting::SocketFds {
        caps |= CapabilitySet::DAC_READ_SEARCH;
    }
    caps
}

/// Limits the calling thread's effective and permitted sets to `keep` (of what it has); the inheritable set is
/// emptied. Threads it starts afterwards inherit the result.
pub fn restrict_capabilities(keep: CapabilitySet) -> io::Result<()> {
    let current = capabilities(None)?;
    let kept = current.permitted & keep;
    set_capabilities(
        None,
        CapabilitySets {
            effective: kept,
            permitted: kept,
            inheritable: CapabilitySet::empty(),
        },
    )?;
    Ok(())
}

struct Request {
    previous: Vec<PodLiveReport>,
    now: Time,
    reply: tokio::sync::oneshot::Sender<Scan>,
}

/// The handle on the kernel-reader thread: scans are sent to it and answered back.
pub struct Reader {
    requests: mpsc::Sender<Request>,
}

impl Reader {
    /// Starts `ka-kernel` with the capabilities `keep` (of those of the calling thread), scanning with scanners
    /// made by `make` (a new one after a scan panicked).
    pub fn start(make: impl Fn() -> Scanner + Send + 'static, keep: CapabilitySet) -> io::Result<Reader> {
        let (requests, incoming) = mpsc::channel::<Request>();
        let (started, ready) = mpsc::channel();
        std::thread::Builder::new().name("ka-kernel".into()).spawn(move || {
            if let Err(e) = restrict_capabilities(keep) {
                let _ = started.send(Err(e));
                return;
            }
            let _ = started.send(Ok(()));
            let mut scanner = make();
            for request in incoming {
                let scanned =
                    std::panic::catch_unwind(AssertUnwindSafe(|| scanner.scan(&request.previous, &request.now)));
                match scanned {
                    Ok(scan) => {
                        let _ = request.reply.send(scan);
                    }
                    // The caller sees the reply dropped; the next scan starts over with a fresh scanner.
                    Err(_) => scanner = make(),
                }
            }
        })?;
        ready
            .recv()
            .map_err(|_| io::Error::other("the kernel-reader thread ended"))??;
        Ok(Reader { requests })
    }

    /// One scan on the kernel-reader thread; `None` if it panicked.
    pub async fn scan(&self, previous: Vec<PodLiveReport>, now: Time) -> Option<Scan> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.requests.send(Request { previous, now, reply }).ok()?;
        answer.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reader_needs_descriptor_listing_only_for_socket_fds() {
        assert!(!needed_capabilities(Counting::SockDiag).contains(CapabilitySet::DAC_READ_SEARCH));
        assert!(needed_capabilities(Counting::SocketFds).contains(CapabilitySet::DAC_READ_SEARCH));
        assert!(needed_capabilities(Counting::SockDiag).contains(CapabilitySet::SYS_ADMIN | CapabilitySet::SYS_PTRACE));
    }
}
