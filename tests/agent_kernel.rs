//! The agent's kernel readings on the real kernel: real network namespaces with their own keepalive sysctls,
//! processes placed in cgroups laid out as kubelet lays them out for a pod UID, and real TCP connections on
//! loopback inside those namespaces, with and without SO_KEEPALIVE. Needs root (as CI has).

use std::{
    collections::HashSet,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use keepalive_operator::{
    agent::{
        Counting, Scan, Scanner,
        kernel::{self, Connections, ProcessRef, ReadError},
    },
    api::{LiveKeepalive, PodLiveReport},
};
use xtask::sandbox::{Layout, Sandbox};

#[test]
fn reads_exactly_the_values_and_connections_of_each_pod() {
    let a = Sandbox::new(
        "a",
        "11111111-2222-4333-8444-555555555555",
        Layout::CgroupfsBurstable,
        Some((30, 5, 3)),
    );
    let b = Sandbox::new(
        "b",
        "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee",
        Layout::SystemdBestEffort,
        None,
    );
    let c = Sandbox::new(
        "c",
        "99999999-8888-4777-8666-555544443333",
        Layout::CgroupfsGuaranteed,
        Some((600, 60, 5)),
    );
    let a_conns = a.connect(3, 2);
    let b_conns = b.connect(0, 1);

    let own_netns = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let wanted: HashSet<String> = [&a, &b, &c].iter().map(|s| s.uid.clone()).collect();
    let found = kernel::find_pod_processes(Path::new("/proc"), &wanted);
    assert_eq!(found.len(), 3, "{found:?}");
    assert_eq!(
        found[&a.uid],
        [a.pid(), a_conns.pid()],
        "every process of the pod, by its cgroup"
    );
    assert_eq!(found[&b.uid], [b.pid(), b_conns.pid()]);
    assert_eq!(found[&c.uid], [c.pid()]);

    let proc = Path::new("/proc");
    assert_eq!(
        kernel::read_sysctls(proc, a.pid()).unwrap(),
        LiveKeepalive {
            time: 30,
            interval: 5,
            probes: 3
        }
    );
    assert_eq!(
        kernel::read_sysctls(proc, b.pid()).unwrap(),
        LiveKeepalive {
            time: 7200,
            interval: 75,
            probes: 9
        }
    );
    assert_eq!(
        kernel::read_sysctls(proc, c.pid()).unwrap(),
        LiveKeepalive {
            time: 600,
            interval: 60,
            probes: 5
        }
    );
    // Both ends of each connection are in the namespace; only the clients that set SO_KEEPALIVE arm the timer.
    assert_eq!(
        kernel::read_connections(proc, a.pid()).unwrap(),
        Connections {
            established: 10,
            keepalive: 3
        }
    );
    assert_eq!(
        kernel::read_connections(proc, b.pid()).unwrap(),
        Connections {
            established: 2,
            keepalive: 0
        }
    );
    assert_eq!(
        kernel::read_connections(proc, c.pid()).unwrap(),
        Connections {
            established: 0,
            keepalive: 0
        }
    );
    // Counted again from the pods' processes' socket descriptors: the same numbers.
    assert!(kernel::pidfd_getfd_supported(), "this kernel has pidfd_getfd");
    let held = |s: &Sandbox| match kernel::count_held_connections(proc, &found[&s.uid], u32::MAX, |_| true) {
        Ok(kernel::Dump::Counted(c)) => c,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        held(&a),
        Connections {
            established: 10,
            keepalive: 3
        }
    );
    assert_eq!(
        held(&b),
        Connections {
            established: 2,
            keepalive: 0
        }
    );
    assert_eq!(held(&c), Connections::default());
    // A budget: the walk is abandoned past it.
    assert!(matches!(
        kernel::count_held_connections(proc, &found[&a.uid], 5, |_| true),
        Ok(kernel::Dump::OverBudget)
    ));
    // The reads switched no namespace of this thread.
    assert_eq!(std::fs::read_link("/proc/thread-self/ns/net").unwrap(), own_netns);
}

#[test]
fn a_vanished_process_is_reported_not_fatal() {
    let mut s = Sandbox::new(
        "gone",
        "12345678-1234-4234-8234-123456789012",
        Layout::CgroupfsBurstable,
        Some((40, 4, 4)),
    );
    let pid = s.pid();
    s.kill_process();
    assert!(matches!(
        kernel::read_sysctls(Path::new("/proc"), pid),
        Err(ReadError::Vanished { .. })
    ));
    assert!(matches!(
        kernel::read_connections(Path::new("/proc"), pid),
        Err(ReadError::Vanished { .. })
    ));
    let found = kernel::find_pod_processes(Path::new("/proc"), &[s.uid.clone()].into());
    assert!(found.is_empty());
}

/// The entry of `uid` in a scan, if any.
fn entry(scan: &Scan, uid: &str) -> Option<PodLiveReport> {
    scan.pods.iter().find(|p| p.uid == uid).cloned()
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// The scanner finds the pod by its cgroup alone, enters its namespace once and reads it through the handle it
/// keeps: a value changed later inside the namespace is seen without entering again; a pod whose processes are
/// gone leaves the report, its handle dropped. A pod in the node's own network namespace (hostNetwork) is left
/// out.
#[test]
fn the_scanner_keeps_one_handle_per_pod_and_sees_changes() {
    let mut s = Sandbox::new(
        "scanner",
        "5ca77e55-1234-4234-8234-123456789012",
        Layout::SystemdBestEffort,
        Some((30, 5, 3)),
    );
    let conns = s.connect(1, 0);
    let host_network = HostNetworkPod::start("0a1b2c3d4e5f60718293a4b5c6d7e8f9", &s);
    let mut scanner = Scanner::new("/proc".into(), std::process::id());
    let first = scanner.scan(&[], &now());
    assert!(first.node.is_some(), "the node's own values");
    let pod = entry(&first, &s.uid).expect("the pod, found by its cgroup");
    assert_eq!(pod.sysctls.map(|v| (v.time, v.interval, v.probes)), Some((30, 5, 3)));
    assert_eq!((pod.established, pod.keepalive), (2, 1));
    assert_eq!(pod.error, None);
    assert!(scanner.has_handle(&s.uid));
    assert_eq!(entry(&first, host_network.uid), None, "hostNetwork pods are left out");
    // Counting from the pod's socket descriptors gives the same numbers.
    let mut fds = Scanner::with_counting("/proc".into(), std::process::id(), Counting::SocketFds, 1);
    let by_fds = entry(&fds.scan(&[], &now()), &s.uid).unwrap();
    assert_eq!((by_fds.established, by_fds.keepalive), (2, 1));

    s.set_sysctl("tcp_keepalive_time", 45);
    let later = now();
    let second = scanner.scan(&first.pods, &later);
    let pod = entry(&second, &s.uid).unwrap();
    assert_eq!(pod.sysctls.map(|v| v.time), Some(45));
    assert_eq!(pod.read_at, later, "a changed reading gets a new readAt");
    let third = scanner.scan(&second.pods, &now());
    assert_eq!(
        entry(&third, &s.uid).unwrap().read_at,
        later,
        "an unchanged reading keeps its readAt"
    );

    drop(conns);
    s.kill_process();
    let gone = scanner.scan(&third.pods, &now());
    assert_eq!(entry(&gone, &s.uid), None, "a pod without processes leaves the report");
    assert!(!scanner.has_handle(&s.uid));
}

/// A process of a static pod (its cgroup named by the 32-hex config hash) in the host's network namespace.
struct HostNetworkPod {
    uid: &'static str,
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl HostNetworkPod {
    fn start(uid: &'static str, beside: &Sandbox) -> HostNetworkPod {
        let dir = beside
            .cgroup_dir()
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join(format!("pod{uid}"));
        std::fs::create_dir_all(&dir).unwrap();
        let child = sleeper();
        std::fs::write(dir.join("cgroup.procs"), child.id().to_string()).unwrap();
        HostNetworkPod { uid, child, dir }
    }
}

impl Drop for HostNetworkPod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn sleeper() -> std::process::Child {
    Command::new("sleep")
        .arg("600")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A child killed and reaped on drop.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A sleeper in the network namespace of `s` (`ip netns exec` becomes `sleep`, same pid).
fn sleeper_in(s: &Sandbox) -> Reaped {
    let name = s.netns_path().file_name().unwrap().to_str().unwrap().to_string();
    let child = Command::new("ip")
        .args(["netns", "exec", &name, "sleep", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_comm(child.id(), "sleep");
    Reaped(child)
}

fn wait_for_comm(pid: u32, comm: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        != comm
    {
        assert!(Instant::now() < deadline, "{comm} did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A pid reused by a process of another pod and namespace: reads through the reference to the old process fail
/// (Vanished), never yielding the new process's namespace; the scan never shows the old pod with the other
/// namespace's values.
#[test]
fn a_reused_pid_never_yields_another_namespace() {
    let old = Sandbox::new(
        "reuse-old",
        "0ddc0ffe-1234-4234-8234-123456789012",
        Layout::CgroupfsBurstable,
        Some((31, 5, 3)),
    );
    let other = Sandbox::new(
        "reuse-new",
        "0ddc0ffe-5678-4234-8234-123456789012",
        Layout::CgroupfsGuaranteed,
        Some((99, 9, 9)),
    );
    let proc = Path::new("/proc");
    let mut scanner = Scanner::new("/proc".into(), std::process::id());
    let mut reused = None;
    for _ in 0..30 {
        // A victim, the old pod's process read by the scanner, then killed and reaped.
        let victim = sleeper_in(&old);
        let pid = victim.0.id();
        old.adopt(pid);
        let process = ProcessRef::open(proc, pid).unwrap();
        let old_inode = process.ns_inode("net").unwrap();
        drop(victim);
        // The next pid handed out is the victim's: a process of the other pod, in the other namespace.
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let newcomer = sleeper_in(&other);
        if newcomer.0.id() != pid {
            continue;
        }
        other.adopt(pid);
        assert!(
            matches!(process.netns(), Err(ReadError::Vanished { .. })),
            "the old reference reads nothing"
        );
        assert!(matches!(process.ns_inode("net"), Err(ReadError::Vanished { .. })));
        assert!(matches!(process.start_time(), Err(ReadError::Vanished { .. })));
        // Through the path, the pid now shows the other namespace.
        assert_ne!(kernel::netns_inode(proc, pid).unwrap(), old_inode);
        reused = Some(newcomer);
        break;
    }
    let _newcomer = reused.expect("the pid was reused within 30 tries");
    let scan = scanner.scan(&[], &now());
    let old_entry = entry(&scan, &old.uid).unwrap();
    assert_eq!(
        old_entry.sysctls.map(|v| v.time),
        Some(31),
        "the old pod, by its own sandbox"
    );
    let other_entry = entry(&scan, &other.uid).unwrap();
    assert_eq!(other_entry.sysctls.map(|v| v.time), Some(99));
    assert!(
        scan.pods
            .iter()
            .all(|p| p.uid != old.uid || p.sysctls.map(|v| v.time) != Some(99))
    );
}

/// A process in a user namespace of its own (and a network namespace that user namespace owns): if it is the
/// pod's oldest process the pod is reported, not read; if the sandbox is older, the sandbox's values are read.
#[test]
fn a_network_namespace_of_a_pod_user_namespace_is_reported_not_read() {
    let userns_process = || {
        let child = Command::new("unshare")
            .args([
                "-Urn",
                "sh",
                "-c",
                "echo 77 > /proc/sys/net/ipv4/tcp_keepalive_time; exec sleep 600",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_comm(child.id(), "sleep");
        Reaped(child)
    };
    let mut alone = Sandbox::new(
        "userns-alone",
        "05e7a5e5-1234-4234-8234-123456789012",
        Layout::CgroupfsBurstable,
        None,
    );
    let older = Sandbox::new(
        "userns-older",
        "05e7a5e5-5678-4234-8234-123456789012",
        Layout::SystemdBestEffort,
        Some((42, 4, 4)),
    );
    // The first pod's only process is the one in the user namespace.
    let lone = userns_process();
    alone.adopt(lone.0.id());
    alone.kill_process();
    // The second pod's sandbox started first.
    let younger = userns_process();
    older.adopt(younger.0.id());

    let mut scanner = Scanner::new("/proc".into(), std::process::id());
    let scan = scanner.scan(&[], &now());
    let a = entry(&scan, &alone.uid).unwrap();
    assert_eq!(a.sysctls, None);
    assert_eq!(
        a.error.as_deref(),
        Some("network namespace owned by a user namespace of the pod: not read")
    );
    assert!(!scanner.has_handle(&alone.uid));
    let o = entry(&scan, &older.uid).unwrap();
    assert_eq!(o.sysctls.map(|v| v.time), Some(42), "{o:?}");
}

/// A process inside the pod's namespace finds the agent's sock_diag sockets (/proc/net/netlink, protocol 4) and
/// floods them with forged replies (established sockets with keepalive, then NLMSG_DONE, for every likely
/// sequence number) while the agent counts: the kernel refuses them (the agent's socket is connected to it), and
/// the counts stay the true ones.
#[test]
fn forged_netlink_replies_are_ignored() {
    let s = Sandbox::new(
        "forged",
        "f0f0f0f0-1234-4234-8234-123456789012",
        Layout::CgroupfsBurstable,
        Some((33, 3, 3)),
    );
    let _conns = s.connect(2, 1);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let sent = std::sync::atomic::AtomicU64::new(0);
    let refused = std::sync::atomic::AtomicU64::new(0);
    let mut scanner = Scanner::with_counting("/proc".into(), std::process::id(), Counting::SockDiag, 1);
    std::thread::scope(|scope| {
        scope.spawn(|| s.in_netns(|| forge(&stop, &sent, &refused)));
        for _ in 0..40 {
            let scan = scanner.scan(&[], &now());
            let pod = entry(&scan, &s.uid).unwrap();
            assert_eq!((pod.established, pod.keepalive, pod.error.as_deref()), (6, 2, None));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let (sent, refused) = (sent.into_inner(), refused.into_inner());
    println!("forged datagrams: {sent} delivered, {refused} refused by the kernel");
    assert!(refused > 0, "the forger found the agent's sockets");
    assert_eq!(sent, 0, "none delivered");
}

/// Sends forged sock_diag replies to every other NETLINK_SOCK_DIAG socket of this thread's network namespace.
fn forge(
    stop: &std::sync::atomic::AtomicBool,
    sent: &std::sync::atomic::AtomicU64,
    refused: &std::sync::atomic::AtomicU64,
) {
    use rustix::net::{AddressFamily, SendFlags, SocketFlags, SocketType, netlink};
    let socket = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        Some(netlink::SOCK_DIAG),
    )
    .unwrap();
    rustix::net::bind(&socket, &netlink::SocketAddrNetlink::new(0, 0)).unwrap();
    let own = rustix::net::getsockname(&socket)
        .ok()
        .and_then(|a| netlink::SocketAddrNetlink::try_from(a).ok())
        .map(|a| a.pid());
    let message = |kind: u16, seq: u32, payload: &[u8]| {
        let len = 16 + payload.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&2u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(len.next_multiple_of(4), 0);
        m
    };
    let mut diag = vec![0u8; 72];
    diag[0] = 2;
    diag[1] = 1; // ESTABLISHED
    diag[2] = 2; // keepalive timer
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let table = std::fs::read_to_string("/proc/thread-self/net/netlink").unwrap_or_default();
        let ports: Vec<u32> = table
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(1) == Some(&"4")).then(|| f.get(2)?.parse().ok())?
            })
            .filter(|p| Some(*p) != own && *p != 0)
            .collect();
        for seq in 1..400u32 {
            let mut datagram = Vec::new();
            for _ in 0..20 {
                datagram.extend(message(20, seq, &diag));
            }
            datagram.extend(message(3, seq, &0i32.to_ne_bytes()));
            for &port in &ports {
                match rustix::net::sendto(
                    &socket,
                    &datagram,
                    SendFlags::DONTWAIT,
                    &netlink::SocketAddrNetlink::new(port, 0),
                ) {
                    Ok(_) => sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    Err(rustix::io::Errno::CONNREFUSED) => refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    Err(_) => 0,
                };
            }
        }
    }
}

#[test]
fn per_socket_scans_read_each_connections_effective_keepalive() {
    use keepalive_operator::{
        api::{ConnectionMethod, KeepaliveSource, SocketGroup},
        policy::connection::{Classes, IdleBound},
    };
    use xtask::sandbox::set_int_option;

    let s = Sandbox::new(
        "classes",
        "c1a55e55-1234-4234-8234-123456789012",
        Layout::CgroupfsBurstable,
        Some((20, 5, 3)),
    );
    let other = Sandbox::new(
        "others",
        "07e55e55-1234-4234-8234-123456789012",
        Layout::SystemdBestEffort,
        None,
    );
    // Client ends: 0 as Go's runtime sets them (15 s, 15 s, 9), 1 with its own idle of 7200 s, 2 SO_KEEPALIVE only
    // (the namespace's sysctls), 3 none, 4 SO_KEEPALIVE and TCP_USER_TIMEOUT 30 s. Server ends: defaults (none).
    let conns = s.connect_configured(5, |i, client| {
        let tcp = libc::IPPROTO_TCP;
        if i != 3 {
            set_int_option(client, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
        }
        match i {
            0 => {
                set_int_option(client, tcp, libc::TCP_KEEPIDLE, 15);
                set_int_option(client, tcp, libc::TCP_KEEPINTVL, 15);
                set_int_option(client, tcp, libc::TCP_KEEPCNT, 9);
            }
            1 => set_int_option(client, tcp, libc::TCP_KEEPIDLE, 7200),
            4 => set_int_option(client, tcp, libc::TCP_USER_TIMEOUT, 30_000),
            _ => {}
        }
    });
    let others = other.connect(2, 0);

    let mut scanner = Scanner::with_counting("/proc".into(), std::process::id(), Counting::PerSocket, 1);
    let scan = scanner.scan(&[], &now());
    let reading = scan.connection_reading.clone().unwrap();
    assert_eq!((reading.method, reading.message), (ConnectionMethod::PerSocket, None));
    let pod = entry(&scan, &s.uid).unwrap();
    assert_eq!((pod.established, pod.keepalive, pod.error.as_deref()), (10, 4, None));
    let group = |connections, keepalive, idle_from, idle, interval, probes, user_timeout_ms| SocketGroup {
        connections,
        keepalive,
        idle_from,
        idle_seconds: idle,
        interval_seconds: interval,
        probes,
        user_timeout_ms,
        merged: false,
    };
    use KeepaliveSource::{Socket, Sysctl};
    let mut groups = pod.sockets.clone().unwrap().groups;
    groups.sort();
    let mut want = vec![
        group(6, false, Sysctl, 0, 0, 0, 0),
        group(1, true, Socket, 15, 15, 9, 0),
        group(1, true, Socket, 7200, 5, 3, 0),
        group(1, true, Sysctl, 20, 5, 3, 0),
        group(1, true, Sysctl, 20, 5, 3, 30_000),
    ];
    want.sort();
    assert_eq!(groups, want, "each socket's own value, else the namespace's, per field");
    let weakest = &pod.sockets.as_ref().unwrap().weakest;
    assert!(!weakest[0].keepalive && weakest[0].process == "sleep", "{weakest:?}");
    assert!(weakest[0].remote.starts_with("127.0.0.1:"), "{weakest:?}");

    let behind_lb = IdleBound {
        seconds: 350,
        idle_timeout: true,
    };
    let classes = Classes::of(pod.sockets.as_ref().unwrap(), behind_lb);
    assert_eq!(
        (
            classes.protected,
            classes.protected_by_app,
            classes.armed_too_late,
            classes.unarmed,
            classes.user_timeout
        ),
        (2, 1, 1, 6, 1)
    );
    // The other pod's connections are its own; the counted scanner agrees on the numbers.
    let theirs = entry(&scan, &other.uid).unwrap();
    assert_eq!((theirs.established, theirs.keepalive), (4, 2));
    let mut counted = Scanner::with_counting("/proc".into(), std::process::id(), Counting::SockDiag, 1);
    let by_dump = entry(&counted.scan(&[], &now()), &s.uid).unwrap();
    assert_eq!((by_dump.established, by_dump.keepalive, by_dump.sockets), (10, 4, None));
    drop((conns, others));
}
