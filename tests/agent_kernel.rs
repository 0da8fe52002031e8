//! The agent's kernel readings on the real kernel: real network namespaces with their own keepalive sysctls,
//! processes placed in cgroups laid out as kubelet lays them out for a pod UID, and real TCP connections on
//! loopback inside those namespaces, with and without SO_KEEPALIVE. Needs root (as CI has).

use std::{
    collections::HashSet,
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use keepalive_operator::agent::{self, Connections, LiveSysctls, ReadError};

fn run(cmd: &[&str]) {
    let status = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{cmd:?} failed");
}

/// The root of a cgroup hierarchy where a process can be placed: v1 `pids`, else the v2 unified hierarchy.
fn cgroup_root() -> PathBuf {
    let v1 = Path::new("/sys/fs/cgroup/pids");
    if v1.is_dir() {
        v1.to_path_buf()
    } else {
        PathBuf::from("/sys/fs/cgroup")
    }
}

enum Layout {
    CgroupfsBurstable,
    SystemdBestEffort,
    CgroupfsGuaranteed,
}

/// A stand-in for a pod sandbox: a network namespace, a process in it, placed in a kubelet-style cgroup.
struct Sandbox {
    netns: String,
    uid: String,
    child: Option<Child>,
    cgroups: Vec<PathBuf>,
}

impl Sandbox {
    fn new(tag: &str, uid: &str, layout: Layout, sysctls: Option<(i32, i32, i32)>) -> Sandbox {
        let netns = format!("ka-{}-{tag}", std::process::id());
        run(&["ip", "netns", "add", &netns]);
        run(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
        if let Some((t, i, p)) = sysctls {
            for (name, v) in [
                ("tcp_keepalive_time", t),
                ("tcp_keepalive_intvl", i),
                ("tcp_keepalive_probes", p),
            ] {
                run(&[
                    "ip",
                    "netns",
                    "exec",
                    &netns,
                    "sysctl",
                    "-q",
                    "-w",
                    &format!("net.ipv4.{name}={v}"),
                ]);
            }
        }
        let child = Command::new("ip")
            .args(["netns", "exec", &netns, "sleep", "600"])
            .spawn()
            .unwrap();
        let pid = child.id();
        // `ip netns exec` enters the namespace, then becomes `sleep`.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            != "sleep"
        {
            assert!(Instant::now() < deadline, "sleep did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        let u = uid.replace('-', "_");
        let relative: Vec<String> = match layout {
            Layout::CgroupfsBurstable => vec![
                "kubepods".into(),
                "burstable".into(),
                format!("pod{uid}"),
                format!("ctr{tag}"),
            ],
            Layout::CgroupfsGuaranteed => vec!["kubepods".into(), format!("pod{uid}"), format!("ctr{tag}")],
            Layout::SystemdBestEffort => vec![
                "kubepods.slice".into(),
                "kubepods-besteffort.slice".into(),
                format!("kubepods-besteffort-pod{u}.slice"),
                format!("cri-containerd-{tag}.scope"),
            ],
        };
        let mut cgroups = Vec::new();
        let mut dir = cgroup_root();
        for part in relative {
            dir = dir.join(part);
            if !dir.exists() {
                std::fs::create_dir(&dir).unwrap();
                cgroups.push(dir.clone());
            }
        }
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        Sandbox {
            netns,
            uid: uid.to_string(),
            child: Some(child),
            cgroups,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Opens `keepalive` + `plain` connections on loopback inside the namespace; only the `keepalive` clients
    /// turn SO_KEEPALIVE on. Returns both ends of every connection (they stay open while held).
    fn connect(&self, keepalive: usize, plain: usize) -> Vec<TcpStream> {
        let ns = std::fs::File::open(format!("/var/run/netns/{}", self.netns)).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns(2) on a valid descriptor, on a thread that only makes these sockets and ends.
                assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let mut streams = Vec::new();
                for i in 0..keepalive + plain {
                    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
                    if i < keepalive {
                        let on: libc::c_int = 1;
                        // SAFETY: setsockopt(2) with a valid socket and an int option value.
                        let rc = unsafe {
                            libc::setsockopt(
                                client.as_raw_fd(),
                                libc::SOL_SOCKET,
                                libc::SO_KEEPALIVE,
                                &on as *const _ as *const libc::c_void,
                                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                            )
                        };
                        assert_eq!(rc, 0);
                    }
                    let (server, _) = listener.accept().unwrap();
                    streams.push(client);
                    streams.push(server);
                }
                streams
            })
            .join()
            .unwrap()
        })
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in self.cgroups.iter().rev() {
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).status();
    }
}

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
    let _a_conns = a.connect(3, 2);
    let _b_conns = b.connect(0, 1);

    let own_netns = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let wanted: HashSet<String> = [&a, &b, &c].iter().map(|s| s.uid.clone()).collect();
    let found = agent::find_pod_processes(Path::new("/proc"), &wanted);
    assert_eq!(found.len(), 3, "{found:?}");
    for s in [&a, &b, &c] {
        assert_eq!(found[&s.uid], s.pid(), "pod {} found through its cgroup", s.uid);
    }

    let proc = Path::new("/proc");
    assert_eq!(
        agent::read_sysctls(proc, a.pid()).unwrap(),
        LiveSysctls {
            time: 30,
            interval: 5,
            probes: 3
        }
    );
    assert_eq!(
        agent::read_sysctls(proc, b.pid()).unwrap(),
        LiveSysctls {
            time: 7200,
            interval: 75,
            probes: 9
        }
    );
    assert_eq!(
        agent::read_sysctls(proc, c.pid()).unwrap(),
        LiveSysctls {
            time: 600,
            interval: 60,
            probes: 5
        }
    );
    // Both ends of each connection are in the namespace; only the clients that set SO_KEEPALIVE arm the timer.
    assert_eq!(
        agent::read_connections(proc, a.pid()).unwrap(),
        Connections {
            established: 10,
            keepalive: 3
        }
    );
    assert_eq!(
        agent::read_connections(proc, b.pid()).unwrap(),
        Connections {
            established: 2,
            keepalive: 0
        }
    );
    assert_eq!(
        agent::read_connections(proc, c.pid()).unwrap(),
        Connections {
            established: 0,
            keepalive: 0
        }
    );
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
    let mut child = s.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(matches!(
        agent::read_sysctls(Path::new("/proc"), pid),
        Err(ReadError::Vanished { .. })
    ));
    assert!(matches!(
        agent::read_connections(Path::new("/proc"), pid),
        Err(ReadError::Vanished { .. })
    ));
    let found = agent::find_pod_processes(Path::new("/proc"), &[s.uid.clone()].into());
    assert!(found.is_empty());
}
