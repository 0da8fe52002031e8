//! The records the BPF iterator writes (`struct record` in sockets.bpf.c): one per (process, descriptor) holding
//! a TCP socket, 96 bytes in the machine's byte order. [`parse`] is a pure function over those bytes; anything that
//! is not a whole, well-formed record is an error, never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{OwnKeepalive, TcpSocket};

/// The size of one record.
pub const RECORD_LEN: usize = 96;
/// The first field of every record: the layout's version ("SPK1").
pub const MAGIC: u32 = 0x314b_5053;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// One record, decoded, still close to the wire (compact: [`super::SocketReader::visit`] keeps one per socket
/// during a pass).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub inode: u64,
    pub netns: u32,
    pub pid: u32,
    pub fd: u32,
    /// Jiffies; 0 = the namespace's sysctl applies.
    pub keepalive_time: u32,
    /// Jiffies; 0 = the namespace's sysctl applies.
    pub keepalive_intvl: u32,
    pub user_timeout_ms: u32,
    /// IPv4: the first 4 bytes.
    pub local_ip: [u8; 16],
    pub remote_ip: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub ipv6: bool,
    pub state: u8,
    pub keepalive: bool,
    /// 0 = the namespace's sysctl applies.
    pub probes: u8,
    pub comm: [u8; 16],
}

/// Why bytes are not a record.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("a record of {0} bytes (records are {RECORD_LEN})")]
    Short(usize),
    #[error("a record with magic {0:#010x} (expected {MAGIC:#010x}: another layout)")]
    Magic(u32),
    #[error("a record of address family {0} (expected 2 or 10)")]
    Family(u16),
}

fn array<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut a = [0; N];
    a.copy_from_slice(&bytes[at..at + N]);
    a
}

/// Decodes one record: `bytes` must be exactly [`RECORD_LEN`] long.
pub fn parse(bytes: &[u8]) -> Result<Record, RecordError> {
    if bytes.len() != RECORD_LEN {
        return Err(RecordError::Short(bytes.len()));
    }
    let u16_at = |at| u16::from_ne_bytes(array(bytes, at));
    let u32_at = |at| u32::from_ne_bytes(array(bytes, at));
    let magic = u32_at(0);
    if magic != MAGIC {
        return Err(RecordError::Magic(magic));
    }
    let ipv6 = match u16_at(36) {
        AF_INET => false,
        AF_INET6 => true,
        other => return Err(RecordError::Family(other)),
    };
    Ok(Record {
        pid: u32_at(4),
        inode: u64::from_ne_bytes(array(bytes, 8)),
        netns: u32_at(16),
        fd: u32_at(20),
        keepalive_time: u32_at(24),
        keepalive_intvl: u32_at(28),
        user_timeout_ms: u32_at(32),
        local_port: u16_at(38),
        // skc_dport, as the kernel keeps it: network order.
        remote_port: u16::from_be_bytes(array(bytes, 40)),
        ipv6,
        state: bytes[42],
        keepalive: bytes[43] != 0,
        probes: bytes[44],
        local_ip: array(bytes, 48),
        remote_ip: array(bytes, 64),
        comm: array(bytes, 80),
    })
}

fn address(ipv6: bool, ip: &[u8; 16], port: u16) -> SocketAddr {
    let ip: IpAddr = if ipv6 {
        Ipv6Addr::from(*ip).into()
    } else {
        Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).into()
    };
    SocketAddr::new(ip, port)
}

impl Record {
    pub fn local(&self) -> SocketAddr {
        address(self.ipv6, &self.local_ip, self.local_port)
    }

    pub fn remote(&self) -> SocketAddr {
        address(self.ipv6, &self.remote_ip, self.remote_port)
    }

    /// The socket's own keepalive settings, in seconds with `hz` jiffies a second.
    pub fn own(&self, hz: u32) -> OwnKeepalive {
        let seconds = |jiffies: u32| (jiffies != 0).then(|| jiffies / hz.max(1));
        OwnKeepalive {
            idle_seconds: seconds(self.keepalive_time),
            interval_seconds: seconds(self.keepalive_intvl),
            probes: (self.probes != 0).then_some(self.probes),
        }
    }

    /// Writes this record into `socket` (reusing its `comm` allocation).
    pub fn fill(&self, hz: u32, holders: u32, socket: &mut TcpSocket) {
        let name = self.comm.split(|&b| b == 0).next().unwrap_or_default();
        socket.comm.clear();
        socket.comm.push_str(&String::from_utf8_lossy(name));
        socket.inode = self.inode;
        socket.netns = u64::from(self.netns);
        socket.pid = self.pid;
        socket.fd = self.fd;
        socket.holders = holders;
        socket.local = self.local();
        socket.remote = self.remote();
        socket.state = self.state;
        socket.keepalive = self.keepalive;
        socket.own = self.own(hz);
        socket.user_timeout_ms = self.user_timeout_ms;
    }

    /// This record as a socket held `holders` times.
    pub fn socket(&self, hz: u32, holders: u32) -> TcpSocket {
        let mut socket = TcpSocket::empty();
        self.fill(hz, holders, &mut socket);
        socket
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// The bytes the BPF program writes for `r` (the same layout, built independently of [`parse`]).
    pub fn encode(r: &Record) -> Vec<u8> {
        let mut b = vec![0u8; RECORD_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_ne_bytes());
        b[4..8].copy_from_slice(&r.pid.to_ne_bytes());
        b[8..16].copy_from_slice(&r.inode.to_ne_bytes());
        b[16..20].copy_from_slice(&r.netns.to_ne_bytes());
        b[20..24].copy_from_slice(&r.fd.to_ne_bytes());
        b[24..28].copy_from_slice(&r.keepalive_time.to_ne_bytes());
        b[28..32].copy_from_slice(&r.keepalive_intvl.to_ne_bytes());
        b[32..36].copy_from_slice(&r.user_timeout_ms.to_ne_bytes());
        let family = if r.ipv6 { AF_INET6 } else { AF_INET };
        b[36..38].copy_from_slice(&family.to_ne_bytes());
        b[38..40].copy_from_slice(&r.local_port.to_ne_bytes());
        b[40..42].copy_from_slice(&r.remote_port.to_be_bytes());
        b[42] = r.state;
        b[43] = u8::from(r.keepalive);
        b[44] = r.probes;
        b[48..64].copy_from_slice(&r.local_ip);
        b[64..80].copy_from_slice(&r.remote_ip);
        b[80..96].copy_from_slice(&r.comm);
        b
    }

    /// A record of a connection between `local` and `remote` (both IPv4 or both IPv6).
    pub fn between(local: &str, remote: &str) -> Record {
        let (local, remote): (SocketAddr, SocketAddr) = (local.parse().unwrap(), remote.parse().unwrap());
        let bytes = |a: SocketAddr| match a.ip() {
            IpAddr::V4(ip) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&ip.octets());
                b
            }
            IpAddr::V6(ip) => ip.octets(),
        };
        Record {
            local_ip: bytes(local),
            remote_ip: bytes(remote),
            local_port: local.port(),
            remote_port: remote.port(),
            ipv6: local.is_ipv6(),
            ..sample()
        }
    }

    pub fn sample() -> Record {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let mut local_ip = [0u8; 16];
        local_ip[..4].copy_from_slice(&[10, 1, 2, 3]);
        let mut remote_ip = [0u8; 16];
        remote_ip[..4].copy_from_slice(&[10, 9, 8, 7]);
        Record {
            pid: 4242,
            inode: 123_456_789_012,
            netns: 4_026_531_840,
            fd: 7,
            keepalive_time: 7200 * 250,
            keepalive_intvl: 0,
            user_timeout_ms: 30_000,
            local_ip,
            remote_ip,
            local_port: 43210,
            remote_port: 5432,
            ipv6: false,
            state: 1,
            keepalive: true,
            probes: 0,
            comm,
        }
    }

    #[test]
    fn ipv4_record_round_trips() {
        let r = sample();
        assert_eq!(parse(&encode(&r)), Ok(r));
        let s = r.socket(250, 1);
        assert_eq!(s.local, "10.1.2.3:43210".parse::<SocketAddr>().unwrap());
        assert_eq!(s.remote, "10.9.8.7:5432".parse::<SocketAddr>().unwrap());
        assert_eq!(s.netns, 4_026_531_840);
    }

    #[test]
    fn ipv6_record_round_trips() {
        let r = between("[fd00::1]:443", "[::ffff:127.0.0.1]:1");
        assert_eq!(parse(&encode(&r)), Ok(r));
        let s = r.socket(250, 1);
        assert_eq!(s.local, "[fd00::1]:443".parse::<SocketAddr>().unwrap());
        assert_eq!(s.remote, "[::ffff:127.0.0.1]:1".parse::<SocketAddr>().unwrap());
    }

    #[test]
    fn remote_port_is_read_in_network_order() {
        let mut b = encode(&sample());
        b[40..42].copy_from_slice(&[0x15, 0x38]); // 5432
        assert_eq!(parse(&b).unwrap().remote().port(), 5432);
    }

    #[test]
    fn short_long_and_empty_records_are_errors() {
        let b = encode(&sample());
        assert_eq!(parse(&b[..95]), Err(RecordError::Short(95)));
        assert_eq!(parse(&[]), Err(RecordError::Short(0)));
        let mut long = b.clone();
        long.push(0);
        assert_eq!(parse(&long), Err(RecordError::Short(97)));
    }

    #[test]
    fn garbled_records_are_errors_never_panics() {
        let mut b = encode(&sample());
        b[0] ^= 0xff;
        assert!(matches!(parse(&b), Err(RecordError::Magic(_))));
        let mut b = encode(&sample());
        b[36..38].copy_from_slice(&1u16.to_ne_bytes()); // AF_UNIX
        assert_eq!(parse(&b), Err(RecordError::Family(1)));
        // Every byte pattern of the right length parses or fails cleanly.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            let mut b = encode(&sample());
            for byte in &mut b[4..] {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *byte = seed as u8;
            }
            if let Ok(r) = parse(&b) {
                let s = r.socket(250, 1);
                assert!(s.comm.chars().count() <= 16);
            }
        }
    }

    #[test]
    fn own_values_are_seconds_and_zero_means_the_sysctl() {
        let r = Record {
            keepalive_time: 7200 * 250,
            keepalive_intvl: 75 * 250,
            probes: 9,
            ..sample()
        };
        assert_eq!(
            r.own(250),
            OwnKeepalive {
                idle_seconds: Some(7200),
                interval_seconds: Some(75),
                probes: Some(9)
            }
        );
        let unset = Record {
            keepalive_time: 0,
            keepalive_intvl: 0,
            probes: 0,
            ..sample()
        };
        assert_eq!(unset.own(1000), OwnKeepalive::default());
    }

    #[test]
    fn comm_stops_at_the_first_nul_and_survives_invalid_utf8() {
        let mut r = sample();
        assert_eq!(r.socket(100, 1).comm, "curl");
        r.comm = [b'x'; 16];
        assert_eq!(r.socket(100, 1).comm, "x".repeat(16));
        r.comm = [0xff; 16];
        assert!(!r.socket(100, 1).comm.is_empty());
        r.comm = [0; 16];
        assert_eq!(r.socket(100, 1).comm, "");
    }
}
