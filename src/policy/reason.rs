//! The typed vocabulary of why a pod is not (yet) conformant. The wire strings — status `reason`s,
//! `violationCounts` keys, metric label values — are the variants' names, and stay stable.

use std::fmt;

/// Why a pod gets no keepalive values, or does not run with its policy's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No policy selects the pod.
    NoPolicy,
    /// The namespace is labelled keepalive.dev/ignore=true.
    NamespaceIgnored,
    /// The pod is labelled keepalive.dev/ignore=true.
    PodIgnored,
    /// A hostNetwork pod: net.* sysctls are forbidden in the node's network namespace.
    HostNetwork,
    /// A Windows pod: no sysctls.
    Unsupported,
    /// The cluster is older than 1.29.
    ClusterTooOld,
    /// The pod's node runs a kubelet older than 1.29, which rejects the keepalive sysctls.
    KubeletTooOld,
    /// The namespace pins a Pod Security level to a version that rejects the keepalive sysctls.
    PodSecurityBlocks,
    /// Fill mode kept the pod's own, different values.
    PodOverride,
    /// The pod lacks the policy's values (created before the policy, or past the webhook).
    NotMutated,
    /// The kernel holds other values than the policy's.
    LiveMismatch,
    /// The node's agent could not read the pod.
    Unverified,
    /// Conformant by spec, waiting for the first live reading.
    AwaitingLiveReading,
    /// The kernel holds the policy's values, but some of the pod's connections will not send a keepalive probe
    /// before the idle timeout (no SO_KEEPALIVE, or the socket's own idle time is too long).
    ConnectionsUnprotected,
}

impl Reason {
    pub const ALL: [Reason; 14] = [
        Reason::NoPolicy,
        Reason::NamespaceIgnored,
        Reason::PodIgnored,
        Reason::HostNetwork,
        Reason::Unsupported,
        Reason::ClusterTooOld,
        Reason::KubeletTooOld,
        Reason::PodSecurityBlocks,
        Reason::PodOverride,
        Reason::NotMutated,
        Reason::LiveMismatch,
        Reason::Unverified,
        Reason::AwaitingLiveReading,
        Reason::ConnectionsUnprotected,
    ];

    /// The reason a wire string names (as read back from a status).
    pub fn from_wire(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The wire string.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::NoPolicy => "NoPolicy",
            Reason::NamespaceIgnored => "NamespaceIgnored",
            Reason::PodIgnored => "PodIgnored",
            Reason::HostNetwork => "HostNetwork",
            Reason::Unsupported => "Unsupported",
            Reason::ClusterTooOld => "ClusterTooOld",
            Reason::KubeletTooOld => "KubeletTooOld",
            Reason::PodSecurityBlocks => "PodSecurityBlocks",
            Reason::PodOverride => "PodOverride",
            Reason::NotMutated => "NotMutated",
            Reason::LiveMismatch => "LiveMismatch",
            Reason::Unverified => "Unverified",
            Reason::AwaitingLiveReading => "AwaitingLiveReading",
            Reason::ConnectionsUnprotected => "ConnectionsUnprotected",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

crate::label_value!(Reason);

/// Ordered by the wire string, so maps keyed by reason list them as the status always has.
impl Ord for Reason {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialOrd for Reason {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_strings_round_trip_and_order_as_strings() {
        for r in Reason::ALL {
            assert_eq!(Reason::from_wire(r.as_str()), Some(r));
            assert_eq!(r.to_string(), format!("{r:?}"), "the wire string is the variant's name");
        }
        assert_eq!(Reason::from_wire("Bogus"), None);
        let mut sorted = Reason::ALL;
        sorted.sort();
        let strings: Vec<&str> = sorted.iter().map(|r| r.as_str()).collect();
        let mut expected = strings.clone();
        expected.sort();
        assert_eq!(strings, expected);
    }
}
