//! The timing rules of the election as pure functions of a monotonic clock: when a follower may take the lease,
//! and until when a leader may act on it. No wall-clock time is compared here: the Lease's `renewTime` only
//! tells a follower that the lease *changed*, never how old it is.

use std::time::{Duration, Instant};

use k8s_openapi::{api::coordination::v1::Lease, jiff::Timestamp};

/// How long a lease lasts without renewal; written into the Lease (`leaseDurationSeconds`).
pub const LEASE_DURATION: Duration = Duration::from_secs(10);
/// A leader that has not renewed within this time stops leading, counted from the *start* of its last successful
/// renewal (the apiserver stored it later, so the followers' wait started later still). The margin to
/// [`LEASE_DURATION`] covers different clock rates of the replicas and a status write already under way.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(7);
/// The pause between two attempts, of the leader (renew) and of the followers (acquire).
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);
/// The bound on one attempt (a read and a write of the Lease), and on the release at shutdown.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

const _: () = assert!(ATTEMPT_TIMEOUT.as_millis() < RENEW_DEADLINE.as_millis());
// At least 20 % of the lease is left between the leader's deadline and the earliest takeover.
const _: () = assert!(RENEW_DEADLINE.as_millis() * 5 <= LEASE_DURATION.as_millis() * 4);

/// One version of the lease record as a follower sees it. Any change (a renewal, a new holder, a release) restarts
/// the follower's wait.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub holder: Option<String>,
    pub renew_time: Option<Timestamp>,
    pub resource_version: Option<String>,
    /// How long the holder claims the lease after each change (`leaseDurationSeconds`, at least 1 s).
    pub duration: Duration,
}

impl Record {
    pub fn of(lease: &Lease) -> Record {
        let spec = lease.spec.as_ref();
        Record {
            holder: spec.and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty()),
            renew_time: spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
            resource_version: lease.metadata.resource_version.clone(),
            duration: spec
                .and_then(|s| s.lease_duration_seconds)
                .map_or(LEASE_DURATION, |s| Duration::from_secs(s.max(1).unsigned_abs().into())),
        }
    }
}

/// What a replica last read of the lease, and when (on its own monotonic clock) it last saw it change.
#[derive(Debug, Default)]
pub struct Observer {
    last: Option<(Record, Instant)>,
}

impl Observer {
    /// Records a read of the lease at `now`. The wait restarts only when the record differs from the last one.
    pub fn observe(&mut self, record: Record, now: Instant) {
        if self.last.as_ref().is_none_or(|(last, _)| *last != record) {
            self.last = Some((record, now));
        }
    }

    /// Whether `me` may write itself into the lease at `now`: it is free, already ours, or unchanged for its whole
    /// duration on this replica's clock. False before the first read.
    pub fn may_acquire(&self, me: &str, now: Instant) -> bool {
        self.last.as_ref().is_some_and(|(record, seen)| match &record.holder {
            None => true,
            Some(holder) if holder == me => true,
            Some(_) => now.saturating_duration_since(*seen) >= record.duration,
        })
    }

    /// When another holder's lease runs out on this replica's clock, unless it changes before.
    pub fn expires_at(&self) -> Option<Instant> {
        self.last
            .as_ref()
            .filter(|(record, _)| record.holder.is_some())
            .map(|(record, seen)| *seen + record.duration)
    }

    /// The holder last seen.
    pub fn holder(&self) -> Option<&str> {
        self.last.as_ref().and_then(|(r, _)| r.holder.as_deref())
    }
}

/// Whether this replica leads, as the elector publishes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lead {
    No,
    /// Leads until this instant unless a renewal extends it.
    Until(Instant),
    /// No election (`--leader-elect=false`): leads for good.
    Always,
}

impl Lead {
    /// After an acquisition or renewal whose request started at `started`.
    pub fn renewed(started: Instant) -> Lead {
        Lead::Until(started + RENEW_DEADLINE)
    }

    pub fn is_leading_at(self, now: Instant) -> bool {
        match self {
            Lead::No => false,
            Lead::Until(deadline) => now < deadline,
            Lead::Always => true,
        }
    }

    /// The instant a leader must step down unless it renews first.
    pub fn deadline(self) -> Option<Instant> {
        match self {
            Lead::Until(deadline) => Some(deadline),
            Lead::No | Lead::Always => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn record(holder: Option<&str>, version: &str, renew: &str) -> Record {
        Record {
            holder: holder.map(Into::into),
            renew_time: Some(renew.parse().unwrap()),
            resource_version: Some(version.into()),
            duration: LEASE_DURATION,
        }
    }

    #[test]
    fn a_follower_waits_a_whole_lease_duration_after_the_first_read() {
        let t0 = Instant::now();
        let mut o = Observer::default();
        assert!(!o.may_acquire("b", t0), "nothing read yet");
        // The renewTime is an hour old by any clock: it does not matter, only the local wait does.
        o.observe(record(Some("a"), "1", "2020-01-01T00:00:00Z"), t0);
        assert!(!o.may_acquire("b", t0 + 9 * S));
        assert!(o.may_acquire("b", t0 + 10 * S));
        assert_eq!(o.expires_at(), Some(t0 + 10 * S));
    }

    #[test]
    fn a_renewal_restarts_the_wait() {
        let t0 = Instant::now();
        let mut o = Observer::default();
        o.observe(record(Some("a"), "1", "2030-01-01T00:00:00Z"), t0);
        o.observe(record(Some("a"), "2", "2030-01-01T00:00:02Z"), t0 + 8 * S);
        assert!(!o.may_acquire("b", t0 + 10 * S));
        assert!(!o.may_acquire("b", t0 + 17 * S));
        assert!(o.may_acquire("b", t0 + 18 * S));
    }

    #[test]
    fn an_unchanged_record_does_not_restart_the_wait() {
        let t0 = Instant::now();
        let mut o = Observer::default();
        let r = record(Some("a"), "1", "2030-01-01T00:00:00Z");
        o.observe(r.clone(), t0);
        o.observe(r.clone(), t0 + 4 * S);
        o.observe(r, t0 + 8 * S);
        assert!(o.may_acquire("b", t0 + 10 * S));
    }

    #[test]
    fn a_renew_time_in_the_future_does_not_extend_the_wait() {
        // A leader whose clock is far ahead writes a renewTime in the future: followers still wait one duration.
        let t0 = Instant::now();
        let mut o = Observer::default();
        o.observe(record(Some("a"), "1", "2099-01-01T00:00:00Z"), t0);
        assert!(o.may_acquire("b", t0 + 10 * S));
    }

    #[test]
    fn a_released_lease_may_be_taken_at_once() {
        let t0 = Instant::now();
        let mut o = Observer::default();
        o.observe(record(Some("a"), "1", "2030-01-01T00:00:00Z"), t0);
        o.observe(record(None, "2", "2030-01-01T00:00:00Z"), t0 + S);
        assert!(o.may_acquire("b", t0 + S));
        assert_eq!(o.expires_at(), None);
    }

    #[test]
    fn the_holder_may_always_renew() {
        let t0 = Instant::now();
        let mut o = Observer::default();
        o.observe(record(Some("a"), "1", "2030-01-01T00:00:00Z"), t0);
        assert!(o.may_acquire("a", t0));
        assert_eq!(o.holder(), Some("a"));
    }

    #[test]
    fn the_holders_own_duration_counts() {
        let t0 = Instant::now();
        let mut o = Observer::default();
        let mut r = record(Some("a"), "1", "2030-01-01T00:00:00Z");
        r.duration = 30 * S;
        o.observe(r, t0);
        assert!(!o.may_acquire("b", t0 + 29 * S));
        assert!(o.may_acquire("b", t0 + 30 * S));
    }

    #[test]
    fn record_of_a_lease_reads_holder_version_and_duration() {
        let lease: Lease = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "l", "resourceVersion": "42"},
            "spec": {"holderIdentity": "", "leaseDurationSeconds": 0, "renewTime": "2030-01-01T00:00:00.000000Z"},
        }))
        .unwrap();
        let r = Record::of(&lease);
        assert_eq!(r.holder, None, "an empty holder is free");
        assert_eq!(r.resource_version.as_deref(), Some("42"));
        assert_eq!(r.duration, S);
        assert_eq!(Record::of(&Lease::default()).duration, LEASE_DURATION);
    }

    #[test]
    fn a_leader_steps_down_a_renew_deadline_after_its_last_successful_attempt_started() {
        let started = Instant::now();
        let lead = Lead::renewed(started);
        assert!(lead.is_leading_at(started + 6 * S));
        assert!(!lead.is_leading_at(started + RENEW_DEADLINE));
        assert_eq!(lead.deadline(), Some(started + RENEW_DEADLINE));
        assert!(!Lead::No.is_leading_at(started));
        assert!(Lead::Always.is_leading_at(started + 1000 * S));
    }

    #[test]
    fn the_leader_stops_before_any_follower_may_start() {
        // The follower cannot have seen the renewal before the leader's request started.
        let started = Instant::now();
        let mut o = Observer::default();
        o.observe(record(Some("a"), "7", "2030-01-01T00:00:00Z"), started);
        let lead = Lead::renewed(started);
        let takeover = o.expires_at().unwrap();
        assert!(lead.deadline().unwrap() + 2 * S <= takeover);
        assert!(!o.may_acquire("b", lead.deadline().unwrap()));
    }
}
