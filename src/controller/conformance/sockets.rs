//! A pod's per-socket summary as the controller keeps it. At 150 000 pods the summaries as the API types hold
//! them (two `Vec`s, two `String`s per destination) cost about 1 KB a pod; here the groups keep only what the
//! classification reads, and the destinations' addresses and process names, which a cluster's pods share (they
//! talk to the same services from the same runtimes), are interned.

use std::{collections::HashSet, sync::Arc};

use crate::api::{Destination, SocketSummary};

/// A pod's connections, read socket by socket: cheap to clone (shared), compared by content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sockets(Arc<Held>);

#[derive(Debug, PartialEq, Eq)]
struct Held {
    /// The groups as the agent reported them, without destinations: what [`crate::policy::connection::Classes`]
    /// reads.
    groups: SocketSummary,
    weakest: Box<[Weak]>,
}

/// One of the weakest destinations, with its strings interned.
#[derive(Debug, PartialEq, Eq)]
struct Weak {
    remote: Arc<str>,
    process: Arc<str>,
    keepalive: bool,
    idle_seconds: i32,
    connections: i32,
}

impl Sockets {
    /// Keeps `summary`, its strings interned in `strings`.
    pub fn new(summary: SocketSummary, strings: &mut Strings) -> Self {
        let SocketSummary { mut groups, weakest } = summary;
        groups.shrink_to_fit();
        let weakest = weakest
            .into_iter()
            .map(|d| Weak {
                remote: strings.get(&d.remote),
                process: strings.get(&d.process),
                keepalive: d.keepalive,
                idle_seconds: d.idle_seconds,
                connections: d.connections,
            })
            .collect();
        Sockets(Arc::new(Held {
            groups: SocketSummary {
                groups,
                weakest: Vec::new(),
            },
            weakest,
        }))
    }

    /// The groups only (no destinations): enough to classify the connections.
    pub fn groups(&self) -> &SocketSummary {
        &self.0.groups
    }

    /// The summary as the agent reported it, destinations included (for a status message).
    pub fn summary(&self) -> SocketSummary {
        SocketSummary {
            groups: self.0.groups.groups.clone(),
            weakest: self
                .0
                .weakest
                .iter()
                .map(|w| Destination {
                    remote: w.remote.to_string(),
                    process: w.process.to_string(),
                    keepalive: w.keepalive,
                    idle_seconds: w.idle_seconds,
                    connections: w.connections,
                })
                .collect(),
        }
    }
}

impl From<SocketSummary> for Sockets {
    fn from(summary: SocketSummary) -> Self {
        Sockets::new(summary, &mut Strings::default())
    }
}

/// Destination addresses and process names, each held once. Strings no summary uses any more are dropped as the
/// set grows (amortized: when it has doubled since the last sweep).
#[derive(Debug, Default)]
pub struct Strings {
    set: HashSet<Arc<str>>,
    swept: usize,
}

impl Strings {
    pub fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.set.get(s) {
            return a.clone();
        }
        if self.set.len() >= 2 * self.swept + 1024 {
            self.set.retain(|a| Arc::strong_count(a) > 1);
            self.swept = self.set.len();
        }
        let a: Arc<str> = Arc::from(s);
        self.set.insert(a.clone());
        a
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{KeepaliveSource, SocketGroup};

    fn summary(remote: &str) -> SocketSummary {
        SocketSummary {
            groups: vec![SocketGroup {
                connections: 3,
                keepalive: false,
                idle_from: KeepaliveSource::Sysctl,
                idle_seconds: 0,
                interval_seconds: 0,
                probes: 0,
                user_timeout_ms: 0,
                merged: false,
            }],
            weakest: vec![Destination {
                remote: remote.into(),
                process: "java".into(),
                keepalive: false,
                idle_seconds: 0,
                connections: 3,
            }],
        }
    }

    #[test]
    fn a_summary_is_kept_whole_with_its_strings_shared() {
        let mut strings = Strings::default();
        let a = Sockets::new(summary("10.0.3.4:5432"), &mut strings);
        let b = Sockets::new(summary("10.0.3.4:5432"), &mut strings);
        assert_eq!(a.summary(), summary("10.0.3.4:5432"), "nothing lost");
        assert!(a.groups().weakest.is_empty());
        assert_eq!(a, b);
        assert_eq!(strings.len(), 2, "one address, one process name");
        assert_ne!(a, Sockets::from(summary("[fd00::1]:443")));
    }

    #[test]
    fn unused_strings_are_dropped_as_the_set_grows() {
        let mut strings = Strings::default();
        let kept = Sockets::new(summary("10.0.0.1:1"), &mut strings);
        for i in 0..10_000 {
            drop(Sockets::new(
                summary(&format!("10.1.{}.{}:80", i / 250, i % 250)),
                &mut strings,
            ));
        }
        assert!(strings.len() < 3_000, "{} strings held", strings.len());
        assert_eq!(kept.summary().weakest[0].remote, "10.0.0.1:1");
    }
}
