//! Which keepalive values a socket runs with: its own (TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT), else its network
//! namespace's sysctls — per field, as the kernel decides (`keepalive_time_when`, `keepalive_intvl_when`,
//! `keepalive_probes` in include/net/tcp.h).

use super::OwnKeepalive;
use crate::api::LiveKeepalive;

/// The keepalive values a socket runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Effective {
    pub idle_seconds: u32,
    pub interval_seconds: u32,
    pub probes: u8,
    /// The idle time is the socket's own (TCP_KEEPIDLE), not the namespace's `tcp_keepalive_time`: a policy that
    /// changes the sysctl does not reach this socket.
    pub idle_from_socket: bool,
}

/// Per field: the socket's own value, else the namespace's sysctl.
pub fn effective(own: &OwnKeepalive, namespace: &LiveKeepalive) -> Effective {
    let seconds = |v: i32| u32::try_from(v).unwrap_or(0);
    Effective {
        idle_seconds: own.idle_seconds.unwrap_or_else(|| seconds(namespace.time)),
        interval_seconds: own.interval_seconds.unwrap_or_else(|| seconds(namespace.interval)),
        probes: own
            .probes
            .unwrap_or_else(|| u8::try_from(namespace.probes.clamp(0, 255)).unwrap_or(u8::MAX)),
        idle_from_socket: own.idle_seconds.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINUX_DEFAULTS: LiveKeepalive = LiveKeepalive {
        time: 7200,
        interval: 75,
        probes: 9,
    };

    #[test]
    fn a_socket_without_its_own_values_runs_with_the_namespace() {
        assert_eq!(
            effective(&OwnKeepalive::default(), &LINUX_DEFAULTS),
            Effective {
                idle_seconds: 7200,
                interval_seconds: 75,
                probes: 9,
                idle_from_socket: false
            }
        );
    }

    #[test]
    fn a_socket_with_all_its_own_values_ignores_the_namespace() {
        let own = OwnKeepalive {
            idle_seconds: Some(60),
            interval_seconds: Some(10),
            probes: Some(3),
        };
        assert_eq!(
            effective(&own, &LINUX_DEFAULTS),
            Effective {
                idle_seconds: 60,
                interval_seconds: 10,
                probes: 3,
                idle_from_socket: true
            }
        );
    }

    #[test]
    fn each_field_falls_back_on_its_own() {
        let namespace = LiveKeepalive {
            time: 300,
            interval: 30,
            probes: 5,
        };
        let only_interval = OwnKeepalive {
            interval_seconds: Some(20),
            ..OwnKeepalive::default()
        };
        assert_eq!(
            effective(&only_interval, &namespace),
            Effective {
                idle_seconds: 300,
                interval_seconds: 20,
                probes: 5,
                idle_from_socket: false
            }
        );
        let only_idle = OwnKeepalive {
            idle_seconds: Some(7200),
            ..OwnKeepalive::default()
        };
        let e = effective(&only_idle, &namespace);
        assert_eq!((e.idle_seconds, e.interval_seconds, e.probes), (7200, 30, 5));
        assert!(
            e.idle_from_socket,
            "the socket's own idle time overrides the pod's sysctl"
        );
        let only_probes = OwnKeepalive {
            probes: Some(1),
            ..OwnKeepalive::default()
        };
        assert_eq!(effective(&only_probes, &namespace).probes, 1);
    }

    #[test]
    fn out_of_range_namespace_values_are_clamped_not_wrapped() {
        let odd = LiveKeepalive {
            time: -1,
            interval: i32::MAX,
            probes: 300,
        };
        let e = effective(&OwnKeepalive::default(), &odd);
        assert_eq!(
            (e.idle_seconds, e.interval_seconds, e.probes),
            (0, i32::MAX as u32, 255)
        );
    }
}
