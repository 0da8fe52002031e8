//! Every TCP socket of the node, one by one, read-only, through a BPF iterator (`iter/task_file`, sockets.bpf.c):
//! the kernel walks each process's descriptors once and writes one fixed-size record per descriptor holding an IPv4
//! or IPv6 TCP socket — its addresses, state, SO_KEEPALIVE, its own keepalive times (TCP_KEEPIDLE, TCP_KEEPINTVL,
//! TCP_KEEPCNT), TCP_USER_TIMEOUT, its network namespace and the process holding it. Nothing is written to any
//! socket or process: the program only reads kernel memory.
//!
//! One pass reads the whole node (every socket of every namespace: its cost grows with the node's sockets, about
//! 0.5 µs a socket once loaded — 5 ms for 11 000, 95 ms for 100 000, BENCHMARKS.md), where a sock_diag dump walks
//! the kernel's whole connection table for a single namespace (1.7 ms each, one per pod); and it tells which socket
//! runs with which values, where sock_diag and the sysctls only tell how many sockets have keepalive armed.
//!
//! Needs a kernel with BTF (`/sys/kernel/btf/vmlinux`, CONFIG_DEBUG_INFO_BTF), BPF iterators and
//! bpf_sock_from_file (Linux 5.11 and later), and CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN). Where any is missing
//! [`SocketReader::load`] says which ([`BpfError`]); the agent then counts connections as before.
//!
//! Process ids are those of the PID namespace the reader was loaded in (the agent runs in the host's).

mod effective;
mod record;

use std::{
    collections::{HashMap, HashSet, hash_map::Entry},
    fs::File,
    io::{self, Read},
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use aya::{Btf, Ebpf, EbpfLoader, Endianness, programs::Iter};
use rustix::net::{AddressFamily, SocketType, ipproto, sockopt};

pub use self::effective::{Effective, effective};
use self::record::{RECORD_LEN, Record};

/// The compiled iterator (build.rs), aligned for the ELF parser.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockets.bpf.o"));
/// The program's name in sockets.bpf.c.
const PROGRAM: &str = "tcp_sockets";
/// Where the running kernel exposes its BTF.
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";
/// `tcp_state`'s ESTABLISHED.
pub const TCP_ESTABLISHED: u8 = 1;
/// Bytes asked of the iterator per read(2) (the kernel hands out at most its seq_file buffer, 32 KiB, per read).
const CHUNK: usize = 64 * 1024;
/// The kernel answers EAGAIN after a million descriptors without a socket; reading again goes on from there.
const MAX_EAGAIN: u32 = 10_000;

/// One TCP socket, as the kernel holds it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    /// The socket's inode (`socket:[N]` in `/proc/<pid>/fd`).
    pub inode: u64,
    /// The inode of the socket's network namespace (`readlink /proc/<pid>/ns/net`): which pod it belongs to.
    pub netns: u64,
    /// The first process holding it (the lowest pid; threads share their process's descriptors).
    pub pid: u32,
    /// Its descriptor in that process.
    pub fd: u32,
    /// That process's command name (up to 16 characters, as in `/proc/<pid>/comm`).
    pub comm: String,
    /// How many descriptors hold the socket, in all processes (a socket shared with a forked child: 2).
    pub holders: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// TCP state (`tcp_states.h`: 1 ESTABLISHED, 10 LISTEN, ...).
    pub state: u8,
    /// SO_KEEPALIVE: the keepalive timer is armed.
    pub keepalive: bool,
    /// The socket's own keepalive values; `None` where the namespace's sysctl applies.
    pub own: OwnKeepalive,
    /// TCP_USER_TIMEOUT in milliseconds (0: none).
    pub user_timeout_ms: u32,
}

impl TcpSocket {
    fn empty() -> TcpSocket {
        let nowhere = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0);
        TcpSocket {
            inode: 0,
            netns: 0,
            pid: 0,
            fd: 0,
            comm: String::new(),
            holders: 0,
            local: nowhere,
            remote: nowhere,
            state: 0,
            keepalive: false,
            own: OwnKeepalive::default(),
            user_timeout_ms: 0,
        }
    }
}

/// A socket's own keepalive settings (setsockopt TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT); `None` where it has
/// not set one, and its namespace's sysctl applies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnKeepalive {
    pub idle_seconds: Option<u32>,
    pub interval_seconds: Option<u32>,
    pub probes: Option<u8>,
}

/// One pass over the node's sockets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SocketPass {
    /// Each socket once (by inode), in the order the kernel walked them (by pid, then descriptor).
    pub sockets: Vec<TcpSocket>,
    /// The pass stopped at its limit: more records followed.
    pub truncated: bool,
    /// Records read: one per (process, descriptor) holding a TCP socket, in any state.
    pub records: usize,
}

/// What [`SocketReader::visit`] went through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Visited {
    /// Sockets handed to the callback.
    pub sockets: usize,
    pub truncated: bool,
    pub records: usize,
}

/// Why the reader cannot load or read.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "the kernel publishes no BTF type information ({KERNEL_BTF} is missing; it needs CONFIG_DEBUG_INFO_BTF), \
         which reading sockets with BPF needs"
    )]
    NoBtf,
    #[error("not allowed to load the BPF socket reader (it needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN): {0}")]
    Denied(String),
    #[error("this kernel cannot run the BPF socket reader (it needs Linux 5.11 or later with BPF iterators): {0}")]
    Unsupported(String),
    #[error("reading sockets through the BPF iterator failed: {0}")]
    Read(String),
    #[error("cannot learn the kernel's tick rate (HZ) to convert keepalive times: {0}")]
    Hz(String),
}

impl BpfError {
    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            BpfError::NoBtf => "no_btf",
            BpfError::Denied(_) => "denied",
            BpfError::Unsupported(_) => "unsupported",
            BpfError::Read(_) => "read",
            BpfError::Hz(_) => "hz",
        }
    }
}

/// `what: error: its source: ...`, the end kept where a verifier log makes it long.
fn describe(what: &str, error: &dyn std::error::Error) -> String {
    const MAX: usize = 2_000;
    let mut text = format!("{what}: {error}");
    let mut source = error.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    // aya appends the verifier's log, empty when the kernel refused before verifying.
    let trimmed = text.trim_end().trim_end_matches("Verifier output:").trim_end();
    text.truncate(trimmed.trim_end_matches('.').len());
    if text.len() > MAX {
        let mut cut = text.len() - MAX;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text = format!("…{}", &text[cut..]);
    }
    text
}

/// The first OS error in `error`'s chain.
fn os_error(error: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && let Some(code) = io.raw_os_error()
        {
            return Some(code);
        }
        next = e.source();
    }
    None
}

/// A failure to load: refused for lack of privilege, or not supported by this kernel.
fn load_error(what: &str, error: &(dyn std::error::Error + 'static)) -> BpfError {
    match os_error(error) {
        Some(libc::EPERM | libc::EACCES) => BpfError::Denied(describe(what, error)),
        _ => BpfError::Unsupported(describe(what, error)),
    }
}

/// The loaded iterator program, and what a pass reuses.
pub struct SocketReader {
    ebpf: Ebpf,
    hz: u32,
    established_only: bool,
    /// The bytes of one read(2), and the partial record left over from the one before.
    buf: Vec<u8>,
    /// [`SocketReader::visit`]'s sockets (with their holder counts) and their index by inode, kept between passes.
    scratch: Vec<(Record, u32)>,
    index: HashMap<u64, usize>,
    /// [`SocketReader::visit_once`]'s inodes seen in the pass.
    seen: HashSet<u64>,
}

impl std::fmt::Debug for SocketReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketReader")
            .field("hz", &self.hz)
            .field("established_only", &self.established_only)
            .finish_non_exhaustive()
    }
}

impl SocketReader {
    /// Loads the iterator against the running kernel's BTF, and learns the kernel's HZ.
    pub fn load() -> Result<SocketReader, BpfError> {
        let path = Path::new(KERNEL_BTF);
        if !path.exists() {
            return Err(BpfError::NoBtf);
        }
        // aya's loader parses the kernel's BTF itself (some 20 MiB once parsed); it is parsed again for attaching
        // only once the loader's copy is gone, so that the two are never held at once.
        let ebpf = EbpfLoader::new()
            .load(OBJECT)
            .map_err(|e| load_error("loading the socket iterator", &e))?;
        Self::attach(ebpf, parse_btf(path)?)
    }

    /// Loads the iterator with the kernel's BTF read from `path` (the running kernel's must still have BTF: the
    /// iterator attaches to it), and learns the kernel's HZ.
    pub fn load_with_btf(path: impl AsRef<Path>) -> Result<SocketReader, BpfError> {
        let btf = parse_btf(path.as_ref())?;
        let ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .load(OBJECT)
            .map_err(|e| load_error("loading the socket iterator", &e))?;
        Self::attach(ebpf, btf)
    }

    /// Loads the program into the kernel as a task_file iterator, and learns HZ.
    fn attach(mut ebpf: Ebpf, btf: Btf) -> Result<SocketReader, BpfError> {
        let program: &mut Iter = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| BpfError::Unsupported(format!("no program {PROGRAM} in the object")))?
            .try_into()
            .map_err(|e| load_error("the socket iterator", &e))?;
        program
            .load("task_file", &btf)
            .map_err(|e| load_error("loading the socket iterator", &e))?;
        drop(btf);
        give_back_freed_memory();
        let mut reader = SocketReader {
            ebpf,
            hz: 0,
            established_only: true,
            buf: Vec::new(),
            scratch: Vec::new(),
            index: HashMap::new(),
            seen: HashSet::new(),
        };
        reader.hz = reader.learn_hz()?;
        Ok(reader)
    }

    /// The kernel's HZ (jiffies per second), learnt at load.
    pub fn hz(&self) -> u32 {
        self.hz
    }

    /// Whether passes report only ESTABLISHED sockets (the default) or sockets in every state (listeners,
    /// connections being set up or closed). Records are counted either way.
    pub fn set_established_only(&mut self, established_only: bool) {
        self.established_only = established_only;
    }

    /// Every TCP socket of the node, each once, reading at most `limit` records (one per process and descriptor
    /// holding a TCP socket); `truncated` when more followed.
    pub fn read(&mut self, limit: usize) -> Result<SocketPass, BpfError> {
        let file = self.open()?;
        let (hz, established_only) = (self.hz, self.established_only);
        let mut sockets: Vec<TcpSocket> = Vec::new();
        let mut index: HashMap<u64, usize> = HashMap::new();
        let (records, truncated) = drain(file, &mut self.buf, limit, |r| {
            if established_only && r.state != TCP_ESTABLISHED {
                return;
            }
            match index.entry(r.inode) {
                Entry::Occupied(e) => sockets[*e.get()].holders += 1,
                Entry::Vacant(e) => {
                    e.insert(sockets.len());
                    sockets.push(r.socket(hz, 1));
                }
            }
        })?;
        Ok(SocketPass {
            sockets,
            truncated,
            records,
        })
    }

    /// As [`SocketReader::read`], handing each socket to `f` instead of collecting them (one socket value is
    /// reused; the records are kept in buffers reused by the next pass).
    pub fn visit(&mut self, limit: usize, mut f: impl FnMut(&TcpSocket)) -> Result<Visited, BpfError> {
        let file = self.open()?;
        let established_only = self.established_only;
        self.scratch.clear();
        self.index.clear();
        let (scratch, index) = (&mut self.scratch, &mut self.index);
        let (records, truncated) = drain(file, &mut self.buf, limit, |r| {
            if established_only && r.state != TCP_ESTABLISHED {
                return;
            }
            match index.entry(r.inode) {
                Entry::Occupied(e) => scratch[*e.get()].1 += 1,
                Entry::Vacant(e) => {
                    e.insert(scratch.len());
                    scratch.push((*r, 1));
                }
            }
        })?;
        let mut socket = TcpSocket::empty();
        for (record, holders) in &self.scratch {
            record.fill(self.hz, *holders, &mut socket);
            f(&socket);
        }
        Ok(Visited {
            sockets: self.scratch.len(),
            truncated,
            records,
        })
    }

    /// Each socket once, handed to `f` when the pass first meets it, without counting its holders (`holders` is 0):
    /// what a pass keeps is one inode per socket, not one record, so a node with many sockets costs little memory.
    pub fn visit_once(&mut self, limit: usize, mut f: impl FnMut(&TcpSocket)) -> Result<Visited, BpfError> {
        let file = self.open()?;
        let (hz, established_only) = (self.hz, self.established_only);
        self.seen.clear();
        let seen = &mut self.seen;
        let mut socket = TcpSocket::empty();
        let mut sockets = 0;
        let (records, truncated) = drain(file, &mut self.buf, limit, |r| {
            if (!established_only || r.state == TCP_ESTABLISHED) && seen.insert(r.inode) {
                r.fill(hz, 0, &mut socket);
                f(&socket);
                sockets += 1;
            }
        })?;
        // A pass over a crowd of sockets does not pin its memory for the passes after it.
        if self.seen.capacity() > 4 * self.seen.len().max(4096) {
            self.seen = HashSet::new();
        }
        Ok(Visited {
            sockets,
            truncated,
            records,
        })
    }

    /// A new pass of the iterator: its output, as a file.
    fn open(&mut self) -> Result<File, BpfError> {
        let read_error = |e: &(dyn std::error::Error + 'static)| match os_error(e) {
            Some(libc::EPERM | libc::EACCES) => BpfError::Denied(describe("starting a pass", e)),
            _ => BpfError::Read(describe("starting a pass", e)),
        };
        let program: &mut Iter = self
            .ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| BpfError::Read(format!("the program {PROGRAM} is gone")))?
            .try_into()
            .map_err(|e| read_error(&e))?;
        let link = program.attach().map_err(|e| read_error(&e))?;
        let link = program.take_link(link).map_err(|e| read_error(&e))?;
        link.into_file().map_err(|e| read_error(&e))
    }

    /// HZ, from a socket of our own: TCP_KEEPIDLE of 1000 s is kept as 1000 × HZ jiffies.
    fn learn_hz(&mut self) -> Result<u32, BpfError> {
        const IDLE: u32 = 1000;
        let hz_error = |what: &str, e: rustix::io::Errno| BpfError::Hz(format!("{what}: {}", io::Error::from(e)));
        let probe = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, Some(ipproto::TCP))
            .or_else(|_| rustix::net::socket(AddressFamily::INET6, SocketType::STREAM, Some(ipproto::TCP)))
            .map_err(|e| hz_error("a TCP socket", e))?;
        sockopt::set_tcp_keepidle(&probe, Duration::from_secs(IDLE.into()))
            .map_err(|e| hz_error("setting TCP_KEEPIDLE", e))?;
        let inode = rustix::fs::fstat(&probe).map_err(|e| hz_error("fstat", e))?.st_ino;
        let file = self.open()?;
        let mut jiffies = None;
        drain(file, &mut self.buf, usize::MAX, |r| {
            if r.inode == inode {
                jiffies = Some(r.keepalive_time);
            }
        })?;
        drop(probe);
        match jiffies {
            Some(j) if j % IDLE == 0 && (1..=10_000).contains(&(j / IDLE)) => Ok(j / IDLE),
            Some(j) => Err(BpfError::Hz(format!(
                "TCP_KEEPIDLE of {IDLE} s read back as {j} jiffies"
            ))),
            None => Err(BpfError::Hz(
                "the reader's own socket was missing from the iterator's output".into(),
            )),
        }
    }
}

fn parse_btf(path: &Path) -> Result<Btf, BpfError> {
    match Btf::parse_file(path, Endianness::default()) {
        Ok(btf) => Ok(btf),
        Err(aya::BtfError::FileError { error, .. }) if error.kind() == io::ErrorKind::NotFound => Err(BpfError::NoBtf),
        Err(e) => Err(load_error(&format!("reading BTF from {}", path.display()), &e)),
    }
}

/// Parsing the kernel's BTF leaves many megabytes of small freed blocks in the heap; glibc keeps them unless asked.
fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim(3) only releases free memory of the allocator's own arenas; nothing we hold is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Reads a pass to its end, or to `limit` records, handing each record to `each`: (records read, truncated).
fn drain(
    mut file: File,
    buf: &mut Vec<u8>,
    limit: usize,
    mut each: impl FnMut(&Record),
) -> Result<(usize, bool), BpfError> {
    buf.resize(CHUNK, 0);
    let mut filled = 0;
    let mut records = 0;
    let mut eagain = 0;
    loop {
        let n = match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && eagain < MAX_EAGAIN => {
                eagain += 1;
                continue;
            }
            Err(e) => return Err(BpfError::Read(describe("reading the iterator", &e))),
        };
        filled += n;
        let whole = filled - filled % RECORD_LEN;
        for bytes in buf[..whole].chunks_exact(RECORD_LEN) {
            if records == limit {
                return Ok((records, true));
            }
            let record = record::parse(bytes).map_err(|e| BpfError::Read(format!("the iterator wrote {e}")))?;
            records += 1;
            each(&record);
        }
        buf.copy_within(whole..filled, 0);
        filled -= whole;
    }
    if filled != 0 {
        return Err(BpfError::Read(format!(
            "the iterator's output ended inside a record ({filled} of {RECORD_LEN} bytes)"
        )));
    }
    Ok((records, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reader_can_move_to_another_thread() {
        fn send<T: Send>() {}
        send::<SocketReader>();
    }

    #[test]
    fn every_error_has_its_own_metric_label() {
        let labels: std::collections::HashSet<_> = [
            BpfError::NoBtf,
            BpfError::Denied(String::new()),
            BpfError::Unsupported(String::new()),
            BpfError::Read(String::new()),
            BpfError::Hz(String::new()),
        ]
        .iter()
        .map(BpfError::metric_label)
        .collect();
        assert_eq!(labels.len(), 5);
    }

    #[test]
    fn long_errors_keep_their_end() {
        let e = io::Error::other(format!("{}the verifier's last word", "x".repeat(5_000)));
        let text = describe("loading", &e);
        assert!(text.chars().count() <= 2_001);
        assert!(text.ends_with("the verifier's last word"));
    }

    #[test]
    fn permission_errors_are_denied_others_unsupported() {
        let denied = io::Error::from_raw_os_error(libc::EPERM);
        assert_eq!(load_error("x", &denied).metric_label(), "denied");
        let invalid = io::Error::from_raw_os_error(libc::EINVAL);
        assert_eq!(load_error("x", &invalid).metric_label(), "unsupported");
    }

    #[test]
    fn a_missing_btf_file_is_no_btf() {
        let e = SocketReader::load_with_btf("/nonexistent/vmlinux").unwrap_err();
        assert!(matches!(e, BpfError::NoBtf), "{e}");
    }

    fn drained(bytes: &[u8], limit: usize) -> Result<(Vec<Record>, usize, bool), BpfError> {
        let dir = std::env::temp_dir().join(format!("ka-bpf-drain-{}-{}", std::process::id(), bytes.len()));
        std::fs::write(&dir, bytes).unwrap();
        let file = File::open(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        let mut seen = Vec::new();
        let mut buf = Vec::new();
        let (records, truncated) = drain(file, &mut buf, limit, |r| seen.push(*r))?;
        Ok((seen, records, truncated))
    }

    #[test]
    fn a_pass_stops_at_its_limit_and_says_so() {
        let one = record::tests::encode(&record::tests::sample());
        let three = one.repeat(3);
        let (seen, records, truncated) = drained(&three, 2).unwrap();
        assert_eq!((seen.len(), records, truncated), (2, 2, true));
        let (seen, records, truncated) = drained(&three, 3).unwrap();
        assert_eq!((seen.len(), records, truncated), (3, 3, false));
        assert!(!drained(&[], 0).unwrap().2, "nothing to read, nothing left out");
    }

    #[test]
    fn records_spanning_reads_are_put_together() {
        // More than one read's worth, not a multiple of the chunk: records straddle the reads' ends.
        let one = record::tests::encode(&record::tests::sample());
        let many = one.repeat(CHUNK / RECORD_LEN * 3 + 7);
        let (seen, records, truncated) = drained(&many, usize::MAX).unwrap();
        assert_eq!((records, truncated), (CHUNK / RECORD_LEN * 3 + 7, false));
        assert!(seen.iter().all(|r| *r == record::tests::sample()));
    }

    #[test]
    fn output_ending_inside_a_record_or_garbled_is_an_error() {
        let one = record::tests::encode(&record::tests::sample());
        let mut cut = one.repeat(2);
        cut.truncate(RECORD_LEN + 40);
        assert!(matches!(drained(&cut, usize::MAX), Err(BpfError::Read(_))));
        let mut garbled = one.repeat(2);
        garbled[RECORD_LEN] ^= 1;
        assert!(matches!(drained(&garbled, usize::MAX), Err(BpfError::Read(_))));
    }
}
