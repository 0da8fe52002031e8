//! A pod's connections, read socket by socket, summarised for its node report entry: grouped by effective
//! keepalive settings (bounded to [`MAX_SOCKET_GROUPS`]) and the weakest destinations (bounded to
//! [`MAX_WEAK_DESTINATIONS`]). Pure: the agent reads no policies, so nothing is judged here — the controller
//! classifies the groups against each pod's policy.

use std::{
    cmp::Reverse,
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use super::kernel::bpf::{OwnKeepalive, effective};
use crate::api::{
    Destination, KeepaliveSource, LiveKeepalive, MAX_SOCKET_GROUPS, MAX_WEAK_DESTINATIONS, SocketGroup, SocketSummary,
};

/// One established connection as the kernel holds it: SO_KEEPALIVE, the socket's own keepalive values (`None`:
/// the namespace's sysctl applies), TCP_USER_TIMEOUT, the remote end and a process holding it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observed<'a> {
    pub keepalive: bool,
    pub own: OwnKeepalive,
    pub user_timeout_ms: u32,
    pub remote: SocketAddr,
    pub process: &'a str,
}

/// The effective keepalive of one connection (source of the idle time, idle, interval, probes); all 0 without
/// SO_KEEPALIVE, where they do nothing.
fn group_values(socket: &Observed<'_>, namespace: &LiveKeepalive) -> (KeepaliveSource, i32, i32, i32) {
    if !socket.keepalive {
        return (KeepaliveSource::Sysctl, 0, 0, 0);
    }
    let e = effective(&socket.own, namespace);
    let int = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    let source = if e.idle_from_socket {
        KeepaliveSource::Socket
    } else {
        KeepaliveSource::Sysctl
    };
    (
        source,
        int(e.idle_seconds),
        int(e.interval_seconds),
        i32::from(e.probes),
    )
}

/// `10.0.3.4:5432`, `[fd00::1]:443`; IPv4-mapped IPv6 addresses as IPv4.
fn remote(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()).to_string(),
            None => addr.to_string(),
        },
        IpAddr::V4(_) => addr.to_string(),
    }
}

/// A command name as the kernel holds it (`comm`, at most 15 bytes and a NUL), kept without allocating.
type Comm = [u8; 16];

fn comm(process: &str) -> Comm {
    let mut out = [0; 16];
    // Cut on a character boundary: the name is shown again as text.
    let mut end = process.len().min(16);
    while !process.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&process.as_bytes()[..end]);
    out
}

fn comm_str(comm: &Comm) -> String {
    let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// A pod's connections, added one by one as a pass over the node's sockets meets them.
#[derive(Debug)]
pub struct Summarizer {
    namespace: LiveKeepalive,
    groups: HashMap<SocketGroup, i32>,
    destinations: HashMap<(SocketAddr, Comm, bool, i32), i32>,
    pub established: u32,
    pub keepalive: u32,
}

impl Summarizer {
    /// For a pod whose network namespace holds the sysctls `namespace`.
    pub fn new(namespace: LiveKeepalive) -> Self {
        Summarizer {
            namespace,
            groups: HashMap::new(),
            destinations: HashMap::new(),
            established: 0,
            keepalive: 0,
        }
    }

    pub fn add(&mut self, socket: &Observed<'_>) {
        let (idle_from, idle_seconds, interval_seconds, probes) = group_values(socket, &self.namespace);
        let key = SocketGroup {
            connections: 0,
            keepalive: socket.keepalive,
            idle_from,
            idle_seconds,
            interval_seconds,
            probes,
            user_timeout_ms: i64::from(socket.user_timeout_ms),
            merged: false,
        };
        *self.groups.entry(key).or_default() += 1;
        *self
            .destinations
            .entry((socket.remote, comm(socket.process), socket.keepalive, idle_seconds))
            .or_default() += 1;
        self.established += 1;
        self.keepalive += u32::from(socket.keepalive);
    }

    pub fn finish(self) -> SocketSummary {
        SocketSummary {
            groups: bounded_groups(self.groups),
            weakest: weakest(self.destinations),
        }
    }
}

/// The summary of a pod's connections with the namespace's sysctls `namespace`.
pub fn summarize<'a>(sockets: impl IntoIterator<Item = Observed<'a>>, namespace: &LiveKeepalive) -> SocketSummary {
    let mut summary = Summarizer::new(*namespace);
    for socket in sockets {
        summary.add(&socket);
    }
    summary.finish()
}

/// Groups with their counts, most connections first; beyond the bound the smallest are merged into the last,
/// pessimistically (the longest idle, interval and count; armed and from the socket only if all of them were),
/// so a merged group never looks safer than its members.
fn bounded_groups(groups: HashMap<SocketGroup, i32>) -> Vec<SocketGroup> {
    let mut groups: Vec<SocketGroup> = groups
        .into_iter()
        .map(|(g, n)| SocketGroup { connections: n, ..g })
        .collect();
    groups.sort_by_key(|g| (Reverse(g.connections), *g));
    if groups.len() > MAX_SOCKET_GROUPS {
        let rest = groups.split_off(MAX_SOCKET_GROUPS - 1);
        let merged = rest
            .into_iter()
            .reduce(|a, b| SocketGroup {
                connections: a.connections.saturating_add(b.connections),
                keepalive: a.keepalive && b.keepalive,
                idle_from: if a.idle_from == b.idle_from {
                    a.idle_from
                } else {
                    KeepaliveSource::Sysctl
                },
                idle_seconds: a.idle_seconds.max(b.idle_seconds),
                interval_seconds: a.interval_seconds.max(b.interval_seconds),
                probes: a.probes.max(b.probes),
                user_timeout_ms: a.user_timeout_ms.min(b.user_timeout_ms),
                merged: true,
            })
            .map(|g| SocketGroup { merged: true, ..g });
        groups.extend(merged);
    }
    groups
}

/// The weakest destinations: no SO_KEEPALIVE first, then the longest idle, then the most connections.
fn weakest(destinations: HashMap<(SocketAddr, Comm, bool, i32), i32>) -> Vec<Destination> {
    let mut all: Vec<_> = destinations.into_iter().collect();
    all.sort_by(|((ra, pa, ka, ia), na), ((rb, pb, kb, ib), nb)| {
        (ka, Reverse(ia), Reverse(na), ra, pa).cmp(&(kb, Reverse(ib), Reverse(nb), rb, pb))
    });
    all.into_iter()
        .take(MAX_WEAK_DESTINATIONS)
        .map(|((addr, process, keepalive, idle), n)| Destination {
            remote: remote(addr),
            process: comm_str(&process),
            keepalive,
            idle_seconds: idle,
            connections: n,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: LiveKeepalive = LiveKeepalive {
        time: 60,
        interval: 10,
        probes: 3,
    };

    fn socket(keepalive: bool, idle: Option<u32>, remote: &str, process: &'static str) -> Observed<'static> {
        Observed {
            keepalive,
            own: OwnKeepalive {
                idle_seconds: idle,
                interval_seconds: idle.map(|_| 15),
                probes: idle.map(|_| 9),
            },
            user_timeout_ms: 0,
            remote: remote.parse().unwrap(),
            process,
        }
    }

    #[test]
    fn connections_are_grouped_by_effective_settings() {
        let mut sockets = vec![socket(true, Some(15), "10.0.0.1:80", "go"); 4];
        sockets.push(socket(true, None, "10.0.0.2:5432", "psql"));
        sockets.push(socket(false, Some(30), "10.0.0.3:443", "curl"));
        sockets.push(socket(false, None, "10.0.0.3:443", "curl"));
        let summary = summarize(sockets, &NS);
        let g = &summary.groups;
        assert_eq!(g.len(), 3);
        assert_eq!(
            (
                g[0].connections,
                g[0].idle_from,
                g[0].idle_seconds,
                g[0].interval_seconds,
                g[0].probes
            ),
            (4, KeepaliveSource::Socket, 15, 15, 9)
        );
        // Without SO_KEEPALIVE the socket's own values do nothing: both curl sockets are one group.
        assert_eq!((g[1].connections, g[1].keepalive, g[1].idle_seconds), (2, false, 0));
        assert_eq!(
            (g[2].idle_from, g[2].idle_seconds, g[2].interval_seconds, g[2].probes),
            (KeepaliveSource::Sysctl, 60, 10, 3),
            "the namespace's sysctls"
        );
        let w = &summary.weakest;
        assert_eq!(
            (w[0].remote.as_str(), w[0].process.as_str(), w[0].connections),
            ("10.0.0.3:443", "curl", 2)
        );
        assert_eq!(w[1].remote, "10.0.0.2:5432", "then the longest idle");
        assert_eq!(w[2].idle_seconds, 15);
    }

    #[test]
    fn groups_and_destinations_are_bounded_and_merging_is_pessimistic() {
        let sockets: Vec<Observed> = (0..40u32)
            .map(|i| Observed {
                own: OwnKeepalive {
                    idle_seconds: Some(10 + i),
                    ..OwnKeepalive::default()
                },
                remote: SocketAddr::new("10.1.0.1".parse().unwrap(), 1000 + i as u16),
                ..socket(true, None, "10.0.0.1:1", "app")
            })
            .chain((0..3).map(|_| socket(true, Some(5), "10.0.0.9:9", "app")))
            .collect();
        let summary = summarize(sockets, &NS);
        assert_eq!(summary.groups.len(), MAX_SOCKET_GROUPS);
        assert_eq!(summary.groups[0].connections, 3, "the biggest group first");
        let last = summary.groups.last().unwrap();
        assert!(last.merged);
        assert_eq!(last.idle_seconds, 49, "the longest idle of the merged groups");
        assert_eq!(
            summary.groups.iter().map(|g| g.connections).sum::<i32>(),
            43,
            "no connection lost"
        );
        assert_eq!(summary.weakest.len(), MAX_WEAK_DESTINATIONS);
        assert_eq!(summary.weakest[0].idle_seconds, 49);
    }

    #[test]
    fn mapped_addresses_read_as_ipv4_and_long_names_are_cut() {
        let mut s = socket(false, None, "[::ffff:10.0.0.7]:8080", "a-very-long-process-name");
        let summary = summarize([s], &NS);
        assert_eq!(summary.weakest[0].remote, "10.0.0.7:8080");
        assert_eq!(
            summary.weakest[0].process, "a-very-long-proc",
            "16 bytes, as the kernel's comm"
        );
        s.process = "ééééééééé";
        assert_eq!(
            summarize([s], &NS).weakest[0].process,
            "éééééééé",
            "cut on a character boundary"
        );
        s.remote = "[fd00::1]:443".parse().unwrap();
        assert_eq!(summarize([s], &NS).weakest[0].remote, "[fd00::1]:443");
        assert_eq!(summarize([], &NS), SocketSummary::default());
    }
}
