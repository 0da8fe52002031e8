//! A minimal NETLINK_SOCK_DIAG client: dump the TCP sockets of the socket's network namespace in state
//! ESTABLISHED and read each one's timer (2 = keepalive). The request is the original inet_diag one
//! (TCPDIAG_GETSOCK), which dumps IPv4 and IPv6 in a single walk of the kernel's connection table — the walk
//! is most of the cost, and the table is shared by all namespaces.
//!
//! The reply parser ([`parse_replies`]) is a pure function over the received bytes.

use std::{
    io,
    os::fd::OwnedFd,
    sync::atomic::{AtomicU32, Ordering},
};

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketAddrAny, SocketFlags, SocketType, netlink};

use super::Connections;

const TCPDIAG_GETSOCK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
const TCP_ESTABLISHED: u8 = 1;
const TIMER_KEEPALIVE: u8 = 2;
/// Offsets in `struct inet_diag_msg`.
const MSG_STATE: usize = 1;
const MSG_TIMER: usize = 2;
/// `struct nlmsghdr` (16 bytes) + `struct inet_diag_req` (60 bytes).
const REQUEST_LEN: usize = 76;

/// A sock_diag socket in the calling thread's network namespace, connected to the kernel: the kernel then refuses
/// (ECONNREFUSED) datagrams other sockets of the namespace send it, so a process of the pod can neither forge
/// replies nor flood the socket and starve a dump.
pub fn socket() -> io::Result<OwnedFd> {
    let fd = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        Some(netlink::SOCK_DIAG),
    )?;
    rustix::net::connect(&fd, &netlink::SocketAddrNetlink::new(0, 0))?;
    Ok(fd)
}

/// The bytes of a dump request for established TCP sockets (IPv4 and IPv6) with sequence number `seq`.
pub fn request(seq: u32) -> [u8; REQUEST_LEN] {
    let mut r = [0u8; REQUEST_LEN];
    r[0..4].copy_from_slice(&(REQUEST_LEN as u32).to_ne_bytes());
    r[4..6].copy_from_slice(&TCPDIAG_GETSOCK.to_ne_bytes());
    r[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    r[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0; then inet_diag_req: family AF_UNSPEC (0), src_len, dst_len, ext, the socket id (48 bytes of
    // zeros), the state mask and dbs (0).
    let states: u32 = 1 << TCP_ESTABLISHED;
    r[NLMSG_HDRLEN + 52..NLMSG_HDRLEN + 56].copy_from_slice(&states.to_ne_bytes());
    r
}

/// Where a dump stands after one received datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// More datagrams follow.
    More,
    /// NLMSG_DONE: the counts are complete.
    Done,
}

/// Counts the established sockets (and those with the keepalive timer) in one datagram of a dump reply with
/// sequence number `seq`. Messages of other sequence numbers (left over from an earlier dump that failed
/// halfway) are skipped; a truncated message or an error from the kernel is an error.
pub fn parse_replies(mut data: &[u8], seq: u32, counts: &mut Connections) -> io::Result<Progress> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let u32_at = |d: &[u8], at: usize| u32::from_ne_bytes([d[at], d[at + 1], d[at + 2], d[at + 3]]);
    while data.len() >= NLMSG_HDRLEN {
        let len = u32_at(data, 0) as usize;
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        let reply_seq = u32_at(data, 8);
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(invalid("truncated netlink message"));
        }
        let next = ((len + 3) & !3).min(data.len());
        if reply_seq != seq {
            data = &data[next..];
            continue;
        }
        match kind {
            NLMSG_ERROR | NLMSG_DONE if len < NLMSG_HDRLEN + 4 => {
                return Err(invalid("short netlink error message"));
            }
            // A dump that failed part way ends with a negative errno.
            NLMSG_DONE => {
                let errno = u32_at(data, NLMSG_HDRLEN) as i32;
                return if errno < 0 {
                    Err(io::Error::from_raw_os_error(-errno))
                } else {
                    Ok(Progress::Done)
                };
            }
            NLMSG_ERROR => {
                let errno = u32_at(data, NLMSG_HDRLEN) as i32;
                return Err(io::Error::from_raw_os_error(-errno));
            }
            _ => {
                let msg = &data[NLMSG_HDRLEN..len];
                if msg.len() > MSG_TIMER && msg[MSG_STATE] == TCP_ESTABLISHED {
                    counts.established += 1;
                    if msg[MSG_TIMER] == TIMER_KEEPALIVE {
                        counts.keepalive += 1;
                    }
                }
            }
        }
        data = &data[next..];
    }
    Ok(Progress::More)
}

/// The result of a dump with a budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dump {
    Counted(Connections),
    /// More sockets than the budget: abandoned part way (the socket must not be used for another request).
    OverBudget,
}

/// Whether a datagram came from the kernel (netlink port id 0). Any process of the namespace (with CAP_NET_ADMIN)
/// can send to the agent's sock_diag socket if it learns its port id (/proc/net/netlink lists them): besides the
/// socket being connected to the kernel, such datagrams are dropped here.
pub fn from_kernel(source: Option<&SocketAddrAny>) -> bool {
    source
        .and_then(|a| netlink::SocketAddrNetlink::try_from(a.clone()).ok())
        .is_some_and(|a| a.pid() == 0)
}

/// Established TCP connections of the socket's namespace, and those with keepalive armed, by one dump; abandoned
/// once more than `max_sockets` established sockets were seen.
pub fn established_tcp(fd: &OwnedFd, max_sockets: u32) -> io::Result<Dump> {
    static SEQ: AtomicU32 = AtomicU32::new(1);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    rustix::net::send(fd, &request(seq), SendFlags::empty())?;
    let mut counts = Connections::default();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let (_, received, source) = rustix::net::recvfrom(fd, &mut buf[..], RecvFlags::empty())?;
        if !from_kernel(source.as_ref()) {
            continue;
        }
        let progress = parse_replies(&buf[..received.min(buf.len())], seq, &mut counts)?;
        if counts.established > max_sockets {
            return Ok(Dump::OverBudget);
        }
        if progress == Progress::Done {
            return Ok(Dump::Counted(counts));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A netlink message of `kind` with sequence `seq` and `payload`, padded to 4 bytes.
    fn message(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + payload.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&2u16.to_ne_bytes()); // NLM_F_MULTI
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(len.next_multiple_of(4), 0);
        m
    }

    /// A `struct inet_diag_msg` (72 bytes, as the kernel sends it) for a socket in `state` with `timer`.
    fn diag_msg(state: u8, timer: u8) -> Vec<u8> {
        let mut m = vec![0u8; 72];
        m[0] = 2; // AF_INET
        m[MSG_STATE] = state;
        m[MSG_TIMER] = timer;
        m
    }

    fn done(seq: u32, errno: i32) -> Vec<u8> {
        message(NLMSG_DONE, seq, &errno.to_ne_bytes())
    }

    #[test]
    fn request_layout_matches_the_kernel_structs() {
        let r = request(7);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().unwrap()), 76, "nlmsg_len");
        assert_eq!(u16::from_ne_bytes(r[4..6].try_into().unwrap()), 18, "TCPDIAG_GETSOCK");
        assert_eq!(
            u16::from_ne_bytes(r[6..8].try_into().unwrap()),
            0x301,
            "NLM_F_REQUEST|NLM_F_DUMP"
        );
        assert_eq!(u32::from_ne_bytes(r[8..12].try_into().unwrap()), 7, "sequence");
        assert_eq!(r[16], 0, "AF_UNSPEC: IPv4 and IPv6 in one dump");
        assert_eq!(
            u32::from_ne_bytes(r[68..72].try_into().unwrap()),
            1 << 1,
            "ESTABLISHED only"
        );
        assert_eq!(&r[72..76], &[0; 4], "dbs");
    }

    #[test]
    fn counts_established_and_keepalive_then_done() {
        let mut counts = Connections::default();
        let mut datagram = message(20, 5, &diag_msg(TCP_ESTABLISHED, TIMER_KEEPALIVE));
        datagram.extend(message(20, 5, &diag_msg(TCP_ESTABLISHED, 0)));
        datagram.extend(message(20, 5, &diag_msg(TCP_ESTABLISHED, 1))); // retransmit timer
        datagram.extend(message(20, 5, &diag_msg(8, TIMER_KEEPALIVE))); // CLOSE_WAIT: not counted
        assert_eq!(parse_replies(&datagram, 5, &mut counts).unwrap(), Progress::More);
        assert_eq!(parse_replies(&done(5, 0), 5, &mut counts).unwrap(), Progress::Done);
        assert_eq!(
            counts,
            Connections {
                established: 3,
                keepalive: 1
            }
        );
    }

    #[test]
    fn messages_of_an_earlier_dump_are_skipped() {
        let mut counts = Connections::default();
        let mut datagram = message(20, 4, &diag_msg(TCP_ESTABLISHED, TIMER_KEEPALIVE));
        datagram.extend(done(4, 0));
        datagram.extend(message(20, 5, &diag_msg(TCP_ESTABLISHED, 0)));
        datagram.extend(done(5, 0));
        assert_eq!(parse_replies(&datagram, 5, &mut counts).unwrap(), Progress::Done);
        assert_eq!(counts.established, 1);
        assert_eq!(counts.keepalive, 0);
    }

    #[test]
    fn kernel_errors_are_errors() {
        let mut counts = Connections::default();
        let e = parse_replies(&message(NLMSG_ERROR, 1, &(-13i32).to_ne_bytes()), 1, &mut counts).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(13));
        let e = parse_replies(&done(1, -4), 1, &mut counts).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(4), "a dump interrupted part way");
    }

    #[test]
    fn truncated_and_short_messages_are_rejected_without_panicking() {
        let mut counts = Connections::default();
        let whole = message(20, 1, &diag_msg(TCP_ESTABLISHED, 0));
        for cut in 1..whole.len() {
            let _ = parse_replies(&whole[..cut], 1, &mut counts);
        }
        assert!(
            parse_replies(&whole[..40], 1, &mut counts).is_err(),
            "length beyond the datagram"
        );
        let mut short_done = message(NLMSG_DONE, 1, &[]);
        short_done.truncate(NLMSG_HDRLEN);
        assert!(parse_replies(&short_done, 1, &mut counts).is_err());
        let mut zero_len = whole.clone();
        zero_len[0..4].copy_from_slice(&0u32.to_ne_bytes());
        assert!(
            parse_replies(&zero_len, 1, &mut counts).is_err(),
            "a zero length would loop forever"
        );
    }

    #[test]
    fn only_datagrams_of_the_kernel_are_read() {
        let kernel: SocketAddrAny = netlink::SocketAddrNetlink::new(0, 0).into();
        let process: SocketAddrAny = netlink::SocketAddrNetlink::new(4242, 0).into();
        let inet: SocketAddrAny = std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into();
        assert!(from_kernel(Some(&kernel)));
        assert!(!from_kernel(Some(&process)), "a process of the namespace");
        assert!(!from_kernel(Some(&inet)));
        assert!(!from_kernel(None));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A deterministic sweep of pseudo-random datagrams.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let len = (x % 200) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = parse_replies(&bytes, (x % 3) as u32, &mut Connections::default());
        }
    }
}
