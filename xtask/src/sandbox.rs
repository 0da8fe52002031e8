//! Stand-ins for pod sandboxes on the real kernel: a network namespace with its own keepalive sysctls, a process
//! in it placed in a cgroup laid out as kubelet lays it out for a pod UID, and TCP connections inside it.

use std::{
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

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

pub enum Layout {
    CgroupfsBurstable,
    SystemdBestEffort,
    CgroupfsGuaranteed,
}

/// A stand-in for a pod sandbox: a network namespace, a process in it, placed in a kubelet-style cgroup.
pub struct Sandbox {
    netns: String,
    pub uid: String,
    child: Option<Child>,
    cgroups: Vec<PathBuf>,
    /// The container-level cgroup directory the pod's processes are placed in.
    leaf: PathBuf,
}

/// A process of the pod (in its cgroup) holding connections open; they close when it is dropped.
pub struct HeldConnections(Child);

impl HeldConnections {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for HeldConnections {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Sandbox {
    pub fn new(tag: &str, uid: &str, layout: Layout, sysctls: Option<(i32, i32, i32)>) -> Sandbox {
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
        // No inherited stdout/stderr: a leftover process must never hold the test runner's output open.
        let child = Command::new("ip")
            .args(["netns", "exec", &netns, "sleep", "600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
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
        // Under a parent of its own, as with kubelet's --cgroup-root: a real kubelet on the same machine (the e2e
        // node) treats pod cgroups under its own root that it does not know as orphans and kills their processes.
        let mut dir = cgroup_root().join("keepalive-sandbox");
        std::fs::create_dir_all(&dir).unwrap();
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
            leaf: dir,
        }
    }

    /// Sets `net.ipv4.<name>` inside the namespace, as a privileged process of the pod could.
    pub fn set_sysctl(&self, name: &str, value: i32) {
        run(&[
            "ip",
            "netns",
            "exec",
            &self.netns,
            "sysctl",
            "-q",
            "-w",
            &format!("net.ipv4.{name}={value}"),
        ]);
    }

    /// The namespace's bind mount (to enter it with setns).
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.netns))
    }

    /// The pod's container-level cgroup directory.
    pub fn cgroup_dir(&self) -> &Path {
        &self.leaf
    }

    /// Places process `pid` in the pod's cgroup, as the runtime places a container's processes.
    pub fn adopt(&self, pid: u32) {
        std::fs::write(self.leaf.join("cgroup.procs"), pid.to_string()).unwrap();
    }

    /// Runs `f` on a thread of its own inside the namespace.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = std::fs::File::open(self.netns_path()).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns(2) on a valid descriptor, on a thread that only runs `f` and ends.
                assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// Ends the sandbox's process now (the namespace and cgroups stay until drop).
    pub fn kill_process(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Opens `keepalive` + `plain` connections on loopback inside the namespace; only the `keepalive` clients
    /// turn SO_KEEPALIVE on. Both ends of every connection are handed to a new process of the pod (placed in its
    /// cgroup), which holds them open until dropped — as an application container would.
    pub fn connect(&self, keepalive: usize, plain: usize) -> HeldConnections {
        self.connect_configured(keepalive + plain, |i, client| {
            if i < keepalive {
                set_int_option(client, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
            }
        })
    }

    /// Opens `n` connections on loopback inside the namespace, `configure(i, client)` setting the options of the
    /// client end of the i-th (the server ends keep the defaults), held by a new process of the pod as
    /// [`Sandbox::connect`] does.
    pub fn connect_configured(&self, n: usize, configure: impl Fn(usize, &TcpStream) + Sync) -> HeldConnections {
        let streams = self.open_connections(n, &configure);
        let fds: Vec<i32> = streams.iter().map(|s| s.as_raw_fd()).collect();
        let mut cmd = Command::new("sleep");
        cmd.arg("600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: between fork and exec the child only clears close-on-exec on descriptors it inherited
        // (fcntl(2) is async-signal-safe; nothing is allocated).
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
        let holder = HeldConnections(cmd.spawn().unwrap());
        std::fs::write(self.leaf.join("cgroup.procs"), holder.pid().to_string()).unwrap();
        // The holder has its own copies now: the test's are closed here.
        drop(streams);
        holder
    }

    fn open_connections(&self, n: usize, configure: &(impl Fn(usize, &TcpStream) + Sync)) -> Vec<TcpStream> {
        let ns = std::fs::File::open(format!("/var/run/netns/{}", self.netns)).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns(2) on a valid descriptor, on a thread that only makes these sockets and ends.
                assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let mut streams = Vec::new();
                for i in 0..n {
                    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
                    configure(i, &client);
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

/// setsockopt(2) of an int option; panics when the kernel refuses.
pub fn set_int_option(socket: &TcpStream, level: libc::c_int, option: libc::c_int, value: libc::c_int) {
    // SAFETY: setsockopt(2) with a valid socket and an int option value.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            &value as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt({level}, {option}, {value}): {}",
        std::io::Error::last_os_error()
    );
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
