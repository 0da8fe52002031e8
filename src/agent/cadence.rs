//! When the agent writes its node report, and when it only says it is alive (pure).
//!
//! A node report of a busy node is tens of kilobytes (socket summaries, managedFields): rewritten every heartbeat
//! on 5 000 nodes it makes the controller's watch carry megabytes a second and etcd keep gigabytes of history
//! (BENCHMARKS.md, the 5 000-node envelope). So, where the agent has a heartbeat Lease:
//! - a changed reading (a pod came or went, its sysctls or read error, the node's values, how connections are
//!   read) is written at the next scan;
//! - a changed set of connection kinds of a pod (a socket group with other settings appeared or went) is written
//!   in place of the next heartbeat, so at most once a heartbeat;
//! - connection counts and destinations alone wait for the refresh (default 10 minutes);
//! - otherwise the heartbeat is a renewal of the small Lease.
//!
//! Without a Lease (no namespace given, or no right to write one) the report itself is the heartbeat, as before.

use std::{collections::BTreeSet, time::Duration};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

use crate::api::{KeepaliveNodeReportSpec, PodLiveReport, SocketGroup};

/// How often the agent must be heard from, and (with a Lease) how often its report is rewritten at least.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cadence {
    pub heartbeat: Duration,
    /// `Some` when the heartbeat is a Lease renewal.
    pub refresh: Option<Duration>,
}

/// What to do after a scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// Write the report (which is a heartbeat too).
    Report,
    /// Renew the heartbeat Lease.
    Lease,
    Nothing,
}

/// The report last written.
#[derive(Clone, Copy, Debug)]
pub struct Last<'a> {
    pub report: &'a KeepaliveNodeReportSpec,
    /// Since that write.
    pub written: Duration,
    /// Since the agent was last heard from (that write, or a Lease renewal since).
    pub heard: Duration,
}

/// What to do with `spec`, the report of the scan just done.
pub fn due(last: Option<Last>, spec: &KeepaliveNodeReportSpec, cadence: Cadence) -> Due {
    let Some(last) = last else {
        return Due::Report;
    };
    let refresh = cadence.refresh.unwrap_or(cadence.heartbeat);
    if last.written >= refresh || readings(last.report) != readings(spec) {
        return Due::Report;
    }
    if last.heard < cadence.heartbeat {
        return Due::Nothing;
    }
    if cadence.refresh.is_none() || connection_kinds(last.report) != connection_kinds(spec) {
        Due::Report
    } else {
        Due::Lease
    }
}

/// A report without what changes on every scan (the scan time, the connection counts, the socket summaries and
/// their readAt), to tell a change that is written at once.
fn readings(spec: &KeepaliveNodeReportSpec) -> KeepaliveNodeReportSpec {
    KeepaliveNodeReportSpec {
        last_scan: Time(Timestamp::UNIX_EPOCH),
        pods: spec
            .pods
            .iter()
            .map(|p| PodLiveReport {
                established: 0,
                keepalive: 0,
                sockets: None,
                read_at: Time(Timestamp::UNIX_EPOCH),
                ..p.clone()
            })
            .collect(),
        ..spec.clone()
    }
}

/// Per pod, the distinct keepalive settings its connections have (the socket groups without their counts):
/// what the controller classifies connections by.
fn connection_kinds(spec: &KeepaliveNodeReportSpec) -> Vec<(&str, BTreeSet<SocketGroup>)> {
    spec.pods
        .iter()
        .map(|p| {
            let kinds = p
                .sockets
                .iter()
                .flat_map(|s| &s.groups)
                .map(|g| SocketGroup {
                    connections: 0,
                    merged: false,
                    ..*g
                })
                .collect();
            (p.uid.as_str(), kinds)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{KeepaliveSource, SocketSummary};

    const HEARTBEAT: Duration = Duration::from_secs(60);
    const REFRESH: Duration = Duration::from_secs(600);
    const LEASE: Cadence = Cadence {
        heartbeat: HEARTBEAT,
        refresh: Some(REFRESH),
    };
    const NO_LEASE: Cadence = Cadence {
        heartbeat: HEARTBEAT,
        refresh: None,
    };

    fn group(connections: i32, idle: i32) -> SocketGroup {
        SocketGroup {
            connections,
            keepalive: true,
            idle_from: KeepaliveSource::Sysctl,
            idle_seconds: idle,
            interval_seconds: 5,
            probes: 3,
            user_timeout_ms: 0,
            merged: false,
        }
    }

    fn spec(at: i64, established: i32, time: i32, groups: Vec<SocketGroup>) -> KeepaliveNodeReportSpec {
        let mut spec = crate::agent::tests::spec(at, established, time);
        spec.refresh_seconds = Some(600);
        spec.pods[0].sockets = Some(SocketSummary {
            groups,
            weakest: Vec::new(),
        });
        spec
    }

    fn last(report: &KeepaliveNodeReportSpec, written: u64, heard: u64) -> Option<Last<'_>> {
        Some(Last {
            report,
            written: Duration::from_secs(written),
            heard: Duration::from_secs(heard),
        })
    }

    #[test]
    fn with_a_lease_the_heartbeat_is_a_renewal_and_counts_wait_for_the_refresh() {
        let old = spec(100, 2, 20, vec![group(2, 20)]);
        assert_eq!(due(None, &old, LEASE), Due::Report, "the first report");
        let counts_moved = spec(110, 7, 20, vec![group(7, 20)]);
        assert_eq!(due(last(&old, 10, 10), &counts_moved, LEASE), Due::Nothing);
        assert_eq!(
            due(last(&old, 60, 60), &counts_moved, LEASE),
            Due::Lease,
            "counts alone: a renewal"
        );
        assert_eq!(
            due(last(&old, 590, 50), &counts_moved, LEASE),
            Due::Nothing,
            "renewed 50 s ago"
        );
        assert_eq!(
            due(last(&old, 600, 0), &counts_moved, LEASE),
            Due::Report,
            "the refresh is due"
        );
    }

    #[test]
    fn a_changed_reading_is_written_at_once_a_new_kind_of_connection_at_the_heartbeat() {
        let old = spec(100, 2, 20, vec![group(2, 20)]);
        assert_eq!(
            due(last(&old, 10, 10), &spec(110, 2, 7200, vec![group(2, 20)]), LEASE),
            Due::Report,
            "a sysctl changed"
        );
        let new_kind = spec(110, 3, 20, vec![group(2, 20), group(1, 7200)]);
        assert_eq!(due(last(&old, 10, 10), &new_kind, LEASE), Due::Nothing);
        assert_eq!(
            due(last(&old, 100, 60), &new_kind, LEASE),
            Due::Report,
            "in place of the renewal"
        );
        let mut gone = old.clone();
        gone.pods.clear();
        assert_eq!(due(last(&old, 10, 10), &gone, LEASE), Due::Report, "a pod left");
    }

    #[test]
    fn without_a_lease_the_report_is_the_heartbeat() {
        let old = spec(100, 2, 20, vec![group(2, 20)]);
        let counts_moved = spec(110, 5, 20, vec![group(5, 20)]);
        assert_eq!(due(last(&old, 10, 10), &counts_moved, NO_LEASE), Due::Nothing);
        assert_eq!(due(last(&old, 60, 60), &counts_moved, NO_LEASE), Due::Report);
        assert_eq!(
            due(last(&old, 10, 10), &spec(110, 2, 300, vec![group(2, 20)]), NO_LEASE),
            Due::Report
        );
    }
}
