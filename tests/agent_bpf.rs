//! The BPF socket reader on the real kernel: real TCP connections over loopback, in this process and in child
//! processes, in this network namespace and in fresh ones, with SO_KEEPALIVE off, on, tuned per socket
//! (TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT) and with TCP_USER_TIMEOUT; each must be reported exactly, once, and be
//! left as it was. Cross-checked with `ss`. Needs root (as CI has).

use std::{
    collections::HashMap,
    fs::File,
    net::{SocketAddr, TcpListener, TcpStream},
    os::{
        fd::{AsFd, AsRawFd, OwnedFd, RawFd},
        unix::fs::MetadataExt,
    },
    process::{Child, Command, Stdio},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use keepalive_operator::{
    agent::kernel::bpf::{BpfError, OwnKeepalive, SocketReader, TCP_ESTABLISHED, TcpSocket, effective},
    api::LiveKeepalive,
};
use rustix::net::sockopt;

/// Tests here fork holders and count holders: one at a time, so no test's child briefly holds another's sockets.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn reader() -> SocketReader {
    SocketReader::load().unwrap_or_else(|e| panic!("loading the BPF socket reader: {e}"))
}

/// How a client socket is set up.
#[derive(Clone, Copy, Debug, Default)]
struct Setup {
    keepalive: bool,
    idle: Option<u32>,
    interval: Option<u32>,
    probes: Option<u8>,
    user_timeout_ms: u32,
}

/// One connection per case: SO_KEEPALIVE off; on; on and tuned; TCP_USER_TIMEOUT.
const CASES: [Setup; 4] = [
    Setup {
        keepalive: false,
        idle: None,
        interval: None,
        probes: None,
        user_timeout_ms: 0,
    },
    Setup {
        keepalive: true,
        idle: None,
        interval: None,
        probes: None,
        user_timeout_ms: 0,
    },
    Setup {
        keepalive: true,
        idle: Some(7200),
        interval: Some(60),
        probes: Some(4),
        user_timeout_ms: 0,
    },
    Setup {
        keepalive: false,
        idle: None,
        interval: None,
        probes: None,
        user_timeout_ms: 30_000,
    },
];

fn set_up(s: &TcpStream, setup: &Setup) {
    if setup.keepalive {
        sockopt::set_socket_keepalive(s, true).unwrap();
    }
    if let Some(idle) = setup.idle {
        sockopt::set_tcp_keepidle(s, Duration::from_secs(idle.into())).unwrap();
    }
    if let Some(interval) = setup.interval {
        sockopt::set_tcp_keepintvl(s, Duration::from_secs(interval.into())).unwrap();
    }
    if let Some(probes) = setup.probes {
        sockopt::set_tcp_keepcnt(s, probes.into()).unwrap();
    }
    if setup.user_timeout_ms != 0 {
        sockopt::set_tcp_user_timeout(s, setup.user_timeout_ms).unwrap();
    }
}

/// A connection over loopback: the client set up as `setup`, the server side as accepted.
struct Connection {
    setup: Setup,
    client: TcpStream,
    server: TcpStream,
}

/// One connection per case to a listener on `addr`, made in the calling thread's network namespace.
fn connect_all(addr: &str) -> std::io::Result<Vec<Connection>> {
    let listener = TcpListener::bind(addr)?;
    CASES
        .iter()
        .map(|setup| {
            let client = TcpStream::connect(listener.local_addr()?)?;
            set_up(&client, setup);
            let (server, _) = listener.accept()?;
            Ok(Connection {
                setup: *setup,
                client,
                server,
            })
        })
        .collect()
}

fn inode(fd: impl AsFd) -> u64 {
    rustix::fs::fstat(fd).unwrap().st_ino
}

fn thread_netns() -> u64 {
    std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
}

/// Runs `f` on a thread of its own in a fresh network namespace with loopback up; returns what `f` returned and
/// the namespace, held open.
fn in_fresh_netns<T: Send>(f: impl FnOnce() -> T + Send) -> (T, File) {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: a new network namespace for this thread only; it shares no descriptor table change (no
            // CLONE_FILES), so descriptors stay valid everywhere.
            unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }.unwrap();
            // A child started from this thread is in its namespace.
            let status = Command::new("ip").args(["link", "set", "lo", "up"]).status().unwrap();
            assert!(status.success());
            (f(), File::open("/proc/thread-self/ns/net").unwrap())
        })
        .join()
        .unwrap()
    })
}

/// Runs `f` on a thread of its own in the network namespace `ns`.
fn in_netns<T: Send>(ns: &File, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            rustix::thread::move_into_link_name_space(ns.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
                .unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

/// A child process (`sleep`) holding copies of descriptors under the same numbers; killed on drop.
struct Holder(Child);

impl Holder {
    fn new(fds: &[RawFd]) -> Holder {
        let fds = fds.to_vec();
        let mut cmd = Command::new("sleep");
        cmd.arg("600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: between fork and exec the child only clears close-on-exec on descriptors it inherited (fcntl(2) is
        // async-signal-safe; nothing is allocated).
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                for &fd in &fds {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let holder = Holder(cmd.spawn().unwrap());
        // Once `sleep` runs (its comm is "sleep"), it holds the descriptors.
        let comm = format!("/proc/{}/comm", holder.pid());
        for _ in 0..500 {
            if std::fs::read_to_string(&comm).is_ok_and(|c| c.trim() == "sleep") {
                return holder;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("sleep never started");
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn own_comm() -> String {
    std::fs::read_to_string("/proc/self/comm").unwrap().trim().to_string()
}

/// What `socket` should be reported as.
struct Expected {
    socket: TcpSocket,
}

impl Expected {
    /// One side of `c` (the client with its setup, or the server as accepted), held by `pid` under the same
    /// descriptor number as here.
    fn side(c: &Connection, client: bool, netns: u64, pid: u32, comm: &str) -> Expected {
        let s = if client { &c.client } else { &c.server };
        let setup = if client { c.setup } else { Setup::default() };
        Expected {
            socket: TcpSocket {
                inode: inode(s),
                netns,
                pid,
                fd: s.as_raw_fd() as u32,
                comm: comm.to_string(),
                holders: 1,
                local: s.local_addr().unwrap(),
                remote: s.peer_addr().unwrap(),
                state: TCP_ESTABLISHED,
                keepalive: setup.keepalive,
                own: OwnKeepalive {
                    idle_seconds: setup.idle,
                    interval_seconds: setup.interval,
                    probes: setup.probes,
                },
                user_timeout_ms: setup.user_timeout_ms,
            },
        }
    }

    fn both(connections: &[Connection], netns: u64, pid: u32, comm: &str) -> Vec<Expected> {
        connections
            .iter()
            .flat_map(|c| {
                [
                    Expected::side(c, true, netns, pid, comm),
                    Expected::side(c, false, netns, pid, comm),
                ]
            })
            .collect()
    }
}

/// What getsockopt(2) tells of a socket.
#[derive(Debug, PartialEq, Eq)]
struct Options {
    keepalive: bool,
    idle: Duration,
    interval: Duration,
    probes: u32,
    user_timeout: u32,
    nodelay: bool,
    error: Option<String>,
}

fn options(s: &TcpStream) -> Options {
    Options {
        keepalive: sockopt::socket_keepalive(s).unwrap(),
        idle: sockopt::tcp_keepidle(s).unwrap(),
        interval: sockopt::tcp_keepintvl(s).unwrap(),
        probes: sockopt::tcp_keepcnt(s).unwrap(),
        user_timeout: sockopt::tcp_user_timeout(s).unwrap(),
        nodelay: sockopt::tcp_nodelay(s).unwrap(),
        error: s.take_error().unwrap().map(|e| e.to_string()),
    }
}

fn by_inode(sockets: &[TcpSocket]) -> HashMap<u64, &TcpSocket> {
    let map: HashMap<u64, &TcpSocket> = sockets.iter().map(|s| (s.inode, s)).collect();
    assert_eq!(map.len(), sockets.len(), "each socket once");
    map
}

#[test]
fn reports_exactly_what_each_socket_holds_and_changes_nothing() {
    let _serial = serial();
    let mut reader = reader();
    assert!([100, 250, 300, 1000].contains(&reader.hz()), "HZ {}", reader.hz());
    let me = std::process::id();
    let comm = own_comm();

    // In this process's namespace, over IPv4 and (where the host has it) IPv6.
    let here = connect_all("127.0.0.1:0").unwrap();
    let here6 = connect_all("[::1]:0").unwrap_or_default();
    let host_netns = thread_netns();
    // In a fresh namespace of its own.
    let ((fresh, fresh_netns), _fresh_ns) = in_fresh_netns(|| (connect_all("127.0.0.1:0").unwrap(), thread_netns()));
    assert_ne!(fresh_netns, host_netns);
    // Held by a child process only, in another fresh namespace.
    let ((theirs, their_netns), _their_ns) = in_fresh_netns(|| (connect_all("127.0.0.1:0").unwrap(), thread_netns()));
    let fds: Vec<RawFd> = theirs
        .iter()
        .flat_map(|c| [c.client.as_raw_fd(), c.server.as_raw_fd()])
        .collect();
    let holder = Holder::new(&fds);

    let mut expected = Expected::both(&here, host_netns, me, &comm);
    expected.extend(Expected::both(&here6, host_netns, me, &comm));
    expected.extend(Expected::both(&fresh, fresh_netns, me, &comm));
    expected.extend(Expected::both(&theirs, their_netns, holder.pid(), "sleep"));
    drop(theirs); // the child's copies remain
    assert!(expected.len() >= 24);

    let ours: Vec<&TcpStream> = here
        .iter()
        .chain(&here6)
        .chain(&fresh)
        .flat_map(|c| [&c.client, &c.server])
        .collect();
    let before: Vec<Options> = ours.iter().map(|s| options(s)).collect();

    let pass = reader.read(usize::MAX).unwrap();
    assert!(!pass.truncated);
    assert!(pass.records >= pass.sockets.len());
    let found = by_inode(&pass.sockets);
    for e in &expected {
        let got = found
            .get(&e.socket.inode)
            .unwrap_or_else(|| panic!("socket {:?} not reported", e.socket));
        assert_eq!(**got, e.socket);
    }
    assert!(pass.sockets.iter().all(|s| s.state == TCP_ESTABLISHED));

    // visit() hands over the same sockets, in the same order.
    let mut visited = Vec::new();
    let summary = reader.visit(usize::MAX, |s| visited.push(s.clone())).unwrap();
    let ours_in = |list: &[TcpSocket]| -> Vec<TcpSocket> {
        let wanted: std::collections::HashSet<u64> = expected.iter().map(|e| e.socket.inode).collect();
        list.iter().filter(|s| wanted.contains(&s.inode)).cloned().collect()
    };
    assert_eq!(ours_in(&visited), ours_in(&pass.sockets));
    assert_eq!(summary.sockets, visited.len());
    assert!(!summary.truncated);

    // All states: the listeners are gone (dropped by connect_all), the probe socket of load() too; a listener of
    // ours shows up in state LISTEN (10).
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    reader.set_established_only(false);
    let all = reader.read(usize::MAX).unwrap();
    let listening = by_inode(&all.sockets)[&inode(&listener)];
    assert_eq!((listening.state, listening.local), (10, listener.local_addr().unwrap()));
    reader.set_established_only(true);
    assert!(!by_inode(&reader.read(usize::MAX).unwrap().sockets).contains_key(&inode(&listener)));

    let after: Vec<Options> = ours.iter().map(|s| options(s)).collect();
    assert_eq!(before, after, "reading changed a socket");
    // And each still carries data both ways.
    for c in here.iter().chain(&fresh) {
        use std::io::{Read, Write};
        (&c.client).write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        (&c.server).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
    }
    drop(holder);
}

#[test]
fn a_socket_shared_with_a_forked_process_is_reported_once_with_its_holders() {
    let _serial = serial();
    let mut reader = reader();
    let connections = connect_all("127.0.0.1:0").unwrap();
    let c = &connections[2];
    let fds = [c.client.as_raw_fd(), c.server.as_raw_fd()];
    let holder = Holder::new(&fds);
    // A third descriptor on the server side, in this process.
    let dup: OwnedFd = c.server.as_fd().try_clone_to_owned().unwrap();

    let pass = reader.read(usize::MAX).unwrap();
    let found = by_inode(&pass.sockets);
    let (me, child) = (std::process::id(), holder.pid());
    let first = me.min(child);
    let client = found[&inode(&c.client)];
    assert_eq!(client.holders, 2);
    assert_eq!(
        (client.pid, client.fd),
        (first, c.client.as_raw_fd() as u32),
        "the first holder, by pid"
    );
    assert_eq!(client.comm, if first == me { own_comm() } else { "sleep".into() });
    assert_eq!(client.own.idle_seconds, Some(7200));
    let server = found[&inode(&c.server)];
    assert_eq!(server.holders, 3);
    // Records count every holder.
    assert!(pass.records >= pass.sockets.len() + 3);
    let mut visited = HashMap::new();
    reader
        .visit(usize::MAX, |s| {
            visited.insert(s.inode, s.holders);
        })
        .unwrap();
    assert_eq!(visited[&client.inode], 2);
    assert_eq!(visited[&server.inode], 3);
    // visit_once: the shared sockets once each, on first sight, holders not counted.
    let mut once: HashMap<u64, u32> = HashMap::new();
    let summary = reader
        .visit_once(usize::MAX, |s| {
            *once.entry(s.inode).or_default() += 1;
            assert_eq!(s.holders, 0);
        })
        .unwrap();
    assert_eq!((once[&client.inode], once[&server.inode]), (1, 1));
    assert_eq!(summary.sockets, once.len());
    assert!(once.values().all(|n| *n == 1), "every socket once");

    drop(holder);
    drop(dup);
    let pass = reader.read(usize::MAX).unwrap();
    let found = by_inode(&pass.sockets);
    assert_eq!(found[&inode(&c.client)].holders, 1);
    assert_eq!(found[&inode(&c.server)].holders, 1);
}

#[test]
fn a_pass_stops_at_its_limit_and_says_so() {
    let _serial = serial();
    let mut reader = reader();
    let _connections = connect_all("127.0.0.1:0").unwrap();
    let whole = reader.read(usize::MAX).unwrap();
    assert!(!whole.truncated);
    assert!(whole.records >= 8);
    let cut = reader.read(3).unwrap();
    assert!(cut.truncated);
    assert_eq!(cut.records, 3);
    assert!(cut.sockets.len() <= 3);
    let mut seen = 0;
    let visited = reader.visit(3, |_| seen += 1).unwrap();
    assert!(visited.truncated);
    assert_eq!((visited.records, visited.sockets), (3, seen));
    let none = reader.read(0).unwrap();
    assert!(none.truncated && none.sockets.is_empty());
    // A limit the node stays under (sockets of other processes may come and go meanwhile).
    let under = reader.read(whole.records + 100_000).unwrap();
    assert!(!under.truncated);
}

#[test]
fn without_privileges_loading_is_denied() {
    let _serial = serial();
    if std::env::var_os("KA_BPF_DENIED_CHILD").is_some() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let effective = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim();
        assert_eq!(
            u64::from_str_radix(effective, 16).unwrap(),
            0,
            "capabilities left: {effective}"
        );
        let e = SocketReader::load().expect_err("a process without capabilities loaded BPF");
        eprintln!("unprivileged load: {e}");
        assert!(matches!(e, BpfError::Denied(_)), "{e}");
        assert_eq!(e.metric_label(), "denied");
        return;
    }
    // The same test in a process without any capability (still uid 0, so it can run the test binary wherever it
    // was built): the bounding set and the ambient set emptied before exec.
    let last_cap: libc::c_ulong = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "without_privileges_loading_is_denied", "--nocapture"])
        .env("KA_BPF_DENIED_CHILD", "1");
    // SAFETY: between fork and exec the child only calls prctl(2), which is async-signal-safe, with integer
    // arguments; nothing is allocated.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            let clear = libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong;
            if libc::prctl(
                libc::PR_CAP_AMBIENT,
                clear,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            for cap in 0..=last_cap {
                if libc::prctl(
                    libc::PR_CAPBSET_DROP,
                    cap,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "{text}");
}

/// Seconds of an `ss` timer: `119min`, `9min58sec`, `57sec`, `250ms`.
fn timer_seconds(t: &str) -> u64 {
    let mut seconds = 0;
    let mut rest = t;
    if let Some((m, r)) = rest.split_once("min") {
        seconds += m.parse::<u64>().unwrap() * 60;
        rest = r;
    }
    if let Some((s, _)) = rest.split_once("sec") {
        seconds += s.parse::<u64>().unwrap();
    }
    seconds
}

/// One socket as `ss -tnoep state established` shows it.
#[derive(Debug)]
struct SsLine {
    local: SocketAddr,
    remote: SocketAddr,
    inode: u64,
    users: Vec<(String, u32, u32)>,
    keepalive_timer: Option<u64>,
}

fn ss() -> Vec<SsLine> {
    let out = Command::new("ss")
        .args(["-tnoep", "state", "established"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = Vec::new();
    for line in text.lines().skip(1) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let addr = |w: &str| -> SocketAddr {
            // ss writes IPv6 as [addr]:port, IPv4 as addr:port; IPv4-mapped as [::ffff:a.b.c.d]:port.
            w.parse().unwrap_or_else(|_| panic!("address {w} in {line}"))
        };
        let (local, remote) = (addr(words[2]), addr(words[3]));
        let mut users = Vec::new();
        let mut inode = 0;
        let mut keepalive_timer = None;
        for w in &words[4..] {
            if let Some(list) = w.strip_prefix("users:(") {
                for user in list.split("),(") {
                    let user = user.trim_matches(|c| c == '(' || c == ')');
                    let parts: Vec<&str> = user.split(',').collect();
                    let name = parts[0].trim_matches('"').to_string();
                    let field = |p: &str| p.split_once('=').unwrap().1.parse::<u32>().unwrap();
                    users.push((name, field(parts[1]), field(parts[2])));
                }
            } else if let Some(n) = w.strip_prefix("ino:") {
                inode = n.parse().unwrap();
            } else if let Some(t) = w.strip_prefix("timer:(keepalive,") {
                keepalive_timer = Some(timer_seconds(t.split(',').next().unwrap()));
            }
        }
        lines.push(SsLine {
            local,
            remote,
            inode,
            users,
            keepalive_timer,
        });
    }
    lines
}

#[test]
fn agrees_with_ss() {
    let _serial = serial();
    let mut reader = reader();
    let here = connect_all("127.0.0.1:0").unwrap();
    // A namespace whose sysctl says 600 s: keepalive sockets without their own idle time wait 600 s there.
    let (fresh, fresh_ns) = in_fresh_netns(|| {
        std::fs::write("/proc/sys/net/ipv4/tcp_keepalive_time", "600").unwrap();
        connect_all("127.0.0.1:0").unwrap()
    });
    let fds: Vec<RawFd> = fresh.iter().take(2).map(|c| c.client.as_raw_fd()).collect();
    let _holder = Holder::new(&fds); // shares two sockets with us
    let namespace = |sysctl_time| LiveKeepalive {
        time: sysctl_time,
        interval: 75,
        probes: 9,
    };

    let pass = reader.read(usize::MAX).unwrap();
    let found = by_inode(&pass.sockets);
    let mut compared = 0;
    for (lines, connections, sysctl_time) in [(ss(), &here, 7200), (in_netns(&fresh_ns, ss), &fresh, 600)] {
        let ours: std::collections::HashSet<u64> = connections
            .iter()
            .flat_map(|c| [inode(&c.client), inode(&c.server)])
            .collect();
        for line in lines.iter().filter(|l| ours.contains(&l.inode)) {
            let s = found
                .get(&line.inode)
                .unwrap_or_else(|| panic!("ss shows {line:?}, the reader does not"));
            assert_eq!((s.local, s.remote), (line.local, line.remote), "{line:?}");
            assert_eq!(s.holders as usize, line.users.len(), "{line:?}");
            assert!(line.users.contains(&(s.comm.clone(), s.pid, s.fd)), "{s:?} vs {line:?}");
            assert_eq!(s.keepalive, line.keepalive_timer.is_some(), "{line:?}");
            if let Some(left) = line.keepalive_timer {
                // The timer counts down from the idle time the socket runs with.
                let idle = u64::from(effective(&s.own, &namespace(sysctl_time)).idle_seconds);
                assert!(
                    left <= idle && left + 180 >= idle,
                    "timer {left} s, idle {idle} s: {line:?}"
                );
            }
            compared += 1;
        }
    }
    assert_eq!(
        compared,
        2 * (here.len() + fresh.len()),
        "every socket of ours compared"
    );
}
