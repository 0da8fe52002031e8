//! Per-connection truth: whether each connection of a pod will send its first keepalive probe before the load
//! balancer's idle timeout, from the effective settings the node agent read socket by socket.
//!
//! The sysctls are only defaults: a socket without SO_KEEPALIVE never probes, and a socket's own TCP_KEEPIDLE
//! (Go's runtime sets 15 s on every socket, Envoy and the JVM their own) overrides the namespace's value. So a
//! connection is judged by what the socket will do, against the policy's `idleTimeoutSeconds` — or, without one,
//! against the policy's own `keepalive.time` (the first probe must leave no later than the policy asks).

use std::fmt::Write as _;

use crate::api::{ConnectionCounts, Destination, KeepalivePolicySpec, KeepaliveSource, SocketGroup, SocketSummary};

/// How many destinations a violation message names.
const NAMED_DESTINATIONS: usize = 3;

/// The idle time a connection's first probe must beat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleBound {
    pub seconds: i32,
    /// The bound is the load balancer's idle timeout (the probe must leave strictly before it); otherwise it is the
    /// policy's keepalive time (the probe may leave at it).
    pub idle_timeout: bool,
}

impl IdleBound {
    pub fn from_policy(spec: &KeepalivePolicySpec) -> Self {
        match spec.idle_timeout_seconds {
            Some(seconds) => IdleBound {
                seconds,
                idle_timeout: true,
            },
            None => IdleBound {
                seconds: spec.keepalive.time,
                idle_timeout: false,
            },
        }
    }

    /// A first probe after `idle` seconds is in time.
    pub fn in_time(&self, idle: i32) -> bool {
        if self.idle_timeout {
            idle < self.seconds
        } else {
            idle <= self.seconds
        }
    }

    fn describe(&self) -> String {
        if self.idle_timeout {
            format!("the {} s idle timeout", self.seconds)
        } else {
            format!(
                "the policy's keepalive time of {} s (no idleTimeoutSeconds set)",
                self.seconds
            )
        }
    }
}

/// What becomes of an idle connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protection {
    /// Armed, and the namespace's sysctl makes the first probe leave in time.
    Protected,
    /// Armed, and the socket's own TCP_KEEPIDLE makes the first probe leave in time.
    ProtectedByApp,
    /// Armed, but the first probe leaves at or after the bound.
    ArmedTooLate,
    /// No SO_KEEPALIVE: never probes.
    Unarmed,
}

impl Protection {
    pub const ALL: [Protection; 4] = [
        Protection::Protected,
        Protection::ProtectedByApp,
        Protection::ArmedTooLate,
        Protection::Unarmed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Protection::Protected => "protected",
            Protection::ProtectedByApp => "protectedByApp",
            Protection::ArmedTooLate => "armedTooLate",
            Protection::Unarmed => "unarmed",
        }
    }

    pub fn survives(self) -> bool {
        matches!(self, Protection::Protected | Protection::ProtectedByApp)
    }
}

crate::label_value!(Protection);

impl std::fmt::Display for Protection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The class of connections with `keepalive` armed (or not) and first probe after `idle` seconds from `source`.
pub fn classify(keepalive: bool, idle: i32, source: KeepaliveSource, bound: IdleBound) -> Protection {
    match (keepalive, bound.in_time(idle), source) {
        (false, ..) => Protection::Unarmed,
        (true, false, _) => Protection::ArmedTooLate,
        (true, true, KeepaliveSource::Socket) => Protection::ProtectedByApp,
        (true, true, KeepaliveSource::Sysctl) => Protection::Protected,
    }
}

/// Seconds from the last packet until an idle dead peer is noticed on an armed connection: idle + interval ×
/// probes. (A socket's TCP_USER_TIMEOUT bounds busy connections, with unacknowledged data, instead.)
pub fn dead_peer_seconds(group: &SocketGroup) -> Option<i64> {
    group
        .keepalive
        .then(|| i64::from(group.idle_seconds) + i64::from(group.interval_seconds) * i64::from(group.probes))
}

/// A pod's connections by class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Classes {
    pub protected: u32,
    pub protected_by_app: u32,
    pub armed_too_late: u32,
    pub unarmed: u32,
    /// Connections with TCP_USER_TIMEOUT.
    pub user_timeout: u32,
    /// The worst dead-peer time of the armed connections.
    pub worst_dead_peer_seconds: Option<i64>,
}

impl Classes {
    pub fn of(summary: &SocketSummary, bound: IdleBound) -> Self {
        let mut classes = Classes::default();
        for group in &summary.groups {
            let n = group.connections.max(0) as u32;
            let slot = match classify(group.keepalive, group.idle_seconds, group.idle_from, bound) {
                Protection::Protected => &mut classes.protected,
                Protection::ProtectedByApp => &mut classes.protected_by_app,
                Protection::ArmedTooLate => &mut classes.armed_too_late,
                Protection::Unarmed => &mut classes.unarmed,
            };
            *slot = slot.saturating_add(n);
            if group.user_timeout_ms > 0 {
                classes.user_timeout = classes.user_timeout.saturating_add(n);
            }
            classes.worst_dead_peer_seconds = classes.worst_dead_peer_seconds.max(dead_peer_seconds(group));
        }
        classes
    }

    pub fn total(&self) -> u32 {
        self.protected + self.protected_by_app + self.armed_too_late + self.unarmed
    }

    pub fn unprotected(&self) -> u32 {
        self.armed_too_late + self.unarmed
    }

    pub fn get(&self, class: Protection) -> u32 {
        match class {
            Protection::Protected => self.protected,
            Protection::ProtectedByApp => self.protected_by_app,
            Protection::ArmedTooLate => self.armed_too_late,
            Protection::Unarmed => self.unarmed,
        }
    }

    /// Adds `sign` × these classes to a policy's connection counts.
    pub fn add_to(&self, counts: &mut ConnectionCounts, sign: i64) {
        counts.protected += sign * i64::from(self.protected);
        counts.protected_by_app += sign * i64::from(self.protected_by_app);
        counts.armed_too_late += sign * i64::from(self.armed_too_late);
        counts.unarmed += sign * i64::from(self.unarmed);
        counts.user_timeout += sign * i64::from(self.user_timeout);
        counts.classified += sign * i64::from(self.total());
    }
}

/// Why a pod's connections will not all survive the bound, naming the worst destinations ("12 connections to
/// 10.0.3.4:5432 from java have no SO_KEEPALIVE"); `None` when they all will.
pub fn unprotected_message(summary: &SocketSummary, bound: IdleBound) -> Option<String> {
    let classes = Classes::of(summary, bound);
    if classes.unprotected() == 0 {
        return None;
    }
    let mut message = format!(
        "{} of {} connections will not send a keepalive probe before {}",
        classes.unprotected(),
        classes.total(),
        bound.describe()
    );
    let weak: Vec<&Destination> = summary
        .weakest
        .iter()
        .filter(|d| !d.keepalive || !bound.in_time(d.idle_seconds))
        .take(NAMED_DESTINATIONS)
        .collect();
    for (i, d) in weak.iter().enumerate() {
        message.push_str(if i == 0 { ": " } else { "; " });
        let plural = if d.connections == 1 {
            "connection"
        } else {
            "connections"
        };
        let _ = write!(
            message,
            "{} {plural} to {} from {} ",
            d.connections, d.remote, d.process
        );
        if d.keepalive {
            let verb = if d.connections == 1 { "probes" } else { "probe" };
            let _ = write!(message, "{verb} first after {} s", d.idle_seconds);
        } else if d.connections == 1 {
            message.push_str("has no SO_KEEPALIVE");
        } else {
            message.push_str("have no SO_KEEPALIVE");
        }
    }
    Some(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{KeepaliveSettings, Mode};

    fn spec(idle_timeout: Option<i32>) -> KeepalivePolicySpec {
        KeepalivePolicySpec {
            namespace_selector: None,
            pod_selector: None,
            keepalive: KeepaliveSettings {
                time: 60,
                interval: 10,
                probes: 3,
            },
            idle_timeout_seconds: idle_timeout,
            mode: Mode::Enforce,
            priority: 0,
        }
    }

    fn group(connections: i32, keepalive: bool, idle: i32, from: KeepaliveSource) -> SocketGroup {
        SocketGroup {
            connections,
            keepalive,
            idle_from: from,
            idle_seconds: if keepalive { idle } else { 0 },
            interval_seconds: if keepalive { 15 } else { 0 },
            probes: if keepalive { 9 } else { 0 },
            user_timeout_ms: 0,
            merged: false,
        }
    }

    #[test]
    fn the_idle_timeout_is_exclusive_the_policy_time_inclusive() {
        let lb = IdleBound::from_policy(&spec(Some(350)));
        assert!(lb.in_time(349) && !lb.in_time(350));
        let own = IdleBound::from_policy(&spec(None));
        assert_eq!(own.seconds, 60);
        assert!(own.in_time(60) && !own.in_time(61));
    }

    #[test]
    fn each_connection_falls_in_one_class() {
        let bound = IdleBound::from_policy(&spec(Some(350)));
        use KeepaliveSource::*;
        assert_eq!(
            classify(true, 15, Socket, bound),
            Protection::ProtectedByApp,
            "Go's default"
        );
        assert_eq!(classify(true, 7200, Socket, bound), Protection::ArmedTooLate);
        assert_eq!(classify(true, 60, Sysctl, bound), Protection::Protected);
        assert_eq!(classify(true, 7200, Sysctl, bound), Protection::ArmedTooLate);
        assert_eq!(classify(false, 0, Sysctl, bound), Protection::Unarmed);
        assert!(Protection::ProtectedByApp.survives() && !Protection::ArmedTooLate.survives());
    }

    #[test]
    fn classes_count_connections_and_the_worst_dead_peer_time() {
        use KeepaliveSource::*;
        let mut summary = SocketSummary {
            groups: vec![
                group(40, true, 15, Socket),
                group(12, false, 0, Sysctl),
                group(3, true, 7200, Socket),
                group(5, true, 60, Sysctl),
            ],
            weakest: vec![],
        };
        summary.groups[1].user_timeout_ms = 30_000;
        let classes = Classes::of(&summary, IdleBound::from_policy(&spec(Some(350))));
        assert_eq!(
            (
                classes.protected,
                classes.protected_by_app,
                classes.armed_too_late,
                classes.unarmed
            ),
            (5, 40, 3, 12)
        );
        assert_eq!(
            (classes.total(), classes.unprotected(), classes.user_timeout),
            (60, 15, 12)
        );
        assert_eq!(classes.worst_dead_peer_seconds, Some(7200 + 15 * 9));
        let mut counts = ConnectionCounts::default();
        classes.add_to(&mut counts, 1);
        classes.add_to(&mut counts, 1);
        classes.add_to(&mut counts, -1);
        assert_eq!(
            (counts.classified, counts.unarmed, counts.protected_by_app),
            (60, 12, 40)
        );
    }

    #[test]
    fn the_message_names_the_worst_destinations() {
        use KeepaliveSource::*;
        let destination = |remote: &str, process: &str, keepalive, idle, connections| Destination {
            remote: remote.into(),
            process: process.into(),
            keepalive,
            idle_seconds: idle,
            connections,
        };
        let summary = SocketSummary {
            groups: vec![
                group(12, false, 0, Sysctl),
                group(3, true, 7200, Socket),
                group(9, true, 15, Socket),
            ],
            weakest: vec![
                destination("10.0.3.4:5432", "java", false, 0, 12),
                destination("[fd00::9]:443", "app", true, 7200, 3),
                destination("10.0.0.1:80", "app", true, 15, 9),
            ],
        };
        let message = unprotected_message(&summary, IdleBound::from_policy(&spec(Some(350)))).unwrap();
        assert_eq!(
            message,
            "15 of 24 connections will not send a keepalive probe before the 350 s idle timeout: 12 connections \
             to 10.0.3.4:5432 from java have no SO_KEEPALIVE; 3 connections to [fd00::9]:443 from app probe first \
             after 7200 s"
        );
        let safe = SocketSummary {
            groups: vec![group(9, true, 15, Socket)],
            weakest: vec![destination("10.0.0.1:80", "app", true, 15, 9)],
        };
        assert_eq!(
            unprotected_message(&safe, IdleBound::from_policy(&spec(Some(350)))),
            None
        );
        assert!(
            unprotected_message(&summary, IdleBound::from_policy(&spec(None)))
                .unwrap()
                .contains("the policy's keepalive time of 60 s")
        );
    }
}
