//! Three groups (`cargo bench --bench agent [scan|sockets|per-socket]`; all without an argument):
//!
//! `scan` — one scan of a node with 110 pods (the kubelet default maximum), each a real network namespace with a
//! process in a kubelet-style cgroup and open TCP connections, through the agent's scanner (`report::Scanner`).
//! Baselines in the same run: the bare reads of 330 sysctl files of the host namespace (the floor: no /proc scan,
//! no namespace switch), and the old way of reading (entering every namespace on every scan). Then the real agent
//! process against a real apiserver, finding the same 110 pods by their cgroups: its RSS once it reports all of
//! them, and its API writes over a quiet minute (writes only on change, plus one heartbeat a minute). Targets: a
//! scan ≤ 50 ms wall; agent RSS ≤ 30 MiB.
//!
//! `sockets` — the per-connection reader (a BPF iterator, `kernel::bpf::SocketReader`) over 110 pods' network
//! namespaces × 100 established sockets (11 000), then × 910 (100 100), each pod's sockets held by processes of
//! its own. Baselines in the same run: today's count-only sock_diag dump of every namespace, and reading the same
//! values socket by socket with pidfd_getfd + getsockopt. Targets: 11 000 sockets ≤ 25 ms, 100 000 ≤ 150 ms
//! (medians); the reader's RSS, in a process of its own.
//!
//! `per-socket` — the agent's whole per-connection scan (`Counting::PerSocket`: the BPF pass, each socket joined to
//! its pod and summarised) of 110 pods × 100 established sockets (11 000), through the scanner as the agent runs
//! it; baselines in the same run: the count-only scans (sock_diag, every pod, and the default third of the pods),
//! then the real agent process reading per socket: its RSS once it reports the 110 pods with their sockets.
//! Targets: full per-connection scan ≤ 25 ms median, agent RSS ≤ 40 MiB.
//!
//! Needs root. Run: cargo bench --bench agent

use std::{path::Path, time::Instant};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use keepalive_operator::agent::{Counting, Scanner};
use xtask::sandbox::{Layout, Sandbox};

const PODS: usize = 110;

fn main() {
    if sockets::reader_child() {
        return;
    }
    // cargo bench passes `--bench`; other words name groups.
    let groups: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let wanted = |group: &str| groups.is_empty() || groups.iter().any(|g| g == group);
    if wanted("scan") {
        scan();
    }
    if wanted("sockets") {
        sockets::run();
    }
    if wanted("per-socket") {
        per_socket();
    }
}

/// The agent's per-connection scan of 110 pods × 100 sockets, beside the count-only scans, then the real agent.
fn per_socket() {
    let setup = Instant::now();
    let mut sandboxes = Vec::new();
    let mut connections = Vec::new();
    for i in 0..PODS {
        let uid = format!("{:08x}-0000-4000-8000-{:012x}", 0x9e50_0000u32 + i as u32, i);
        let s = Sandbox::new(&format!("p{i}"), &uid, Layout::CgroupfsBurstable, Some((30, 5, 3)));
        // 50 loopback connections: 100 established sockets in the pod's namespace, 25 clients armed.
        connections.push(s.connect(25, 25));
        sandboxes.push(s);
    }
    let ours: std::collections::HashSet<String> = sandboxes.iter().map(|s| s.uid.clone()).collect();
    println!(
        "per-socket scan: {PODS} pods × 100 established sockets = {} (setup {:.1} s)",
        PODS * 100,
        setup.elapsed().as_secs_f64()
    );
    let proc = Path::new("/proc");
    let run = |counting: Counting, every: u32| {
        let mut scanner = Scanner::with_counting(proc.to_path_buf(), std::process::id(), counting, every);
        let mut previous = Vec::new();
        let mut times = Vec::new();
        for _ in 0..21 {
            let t = Instant::now();
            let scan = scanner.scan(&previous, &Time(Timestamp::now()));
            times.push(t.elapsed());
            let mut reports = scan.pods;
            reports.retain(|r| ours.contains(&r.uid));
            assert_eq!(reports.len(), PODS, "every pod read");
            if counting == Counting::PerSocket {
                assert!(
                    reports.iter().all(|r| r.established == 100
                        && r.keepalive == 25
                        && r.sockets.as_ref().is_some_and(|s| s.groups.len() == 2)),
                    "every socket of every pod classified"
                );
            }
            previous = reports;
        }
        times.remove(0);
        times.sort();
        times
    };
    let per_socket = run(Counting::PerSocket, 1);
    let counted_all = run(Counting::SockDiag, 1);
    let counted_third = run(Counting::SockDiag, 3);
    let ratio = |a: std::time::Duration, b: std::time::Duration| a.as_secs_f64() / b.as_secs_f64();
    xtask::bench::millis(
        "per-socket scan, median of 20 (BPF pass + summaries, every pod)",
        per_socket[10],
    );
    xtask::bench::millis("  slowest of 20", per_socket[19]);
    xtask::bench::millis(
        "baseline: count-only scan, sock_diag every pod, median",
        counted_all[10],
    );
    xtask::bench::millis(
        "baseline: count-only scan, sock_diag 1/3 of pods (default), median",
        counted_third[10],
    );
    xtask::bench::row(
        "  per-socket / count-only (every pod)",
        format!("{:.2}", ratio(per_socket[10], counted_all[10])),
    );
    xtask::bench::row(
        "  per-socket / count-only (1/3 of pods)",
        format!("{:.2}", ratio(per_socket[10], counted_third[10])),
    );
    println!(
        "target: full per-connection scan ≤ 25 ms median: {}",
        if per_socket[10].as_millis() <= 25 {
            "met"
        } else {
            "MISSED"
        }
    );
    real_agent(&sandboxes);
    drop(connections);
}

fn scan() {
    let setup = Instant::now();
    let mut sandboxes = Vec::new();
    let mut connections = Vec::new();
    for i in 0..PODS {
        let uid = format!("{:08x}-0000-4000-8000-{:012x}", 0xbe9c_0000u32 + i as u32, i);
        let layout = if i % 2 == 0 {
            Layout::CgroupfsBurstable
        } else {
            Layout::SystemdBestEffort
        };
        let s = Sandbox::new(&format!("b{i}"), &uid, layout, (i % 3 == 0).then_some((30, 5, 3)));
        connections.push(s.connect(2, 2));
        sandboxes.push(s);
    }
    // The scan finds every pod of the host: other pods (a real kubelet's, another run's) are left out of the
    // figures' checks.
    let ours: std::collections::HashSet<String> = sandboxes.iter().map(|s| s.uid.clone()).collect();
    println!(
        "agent scan: {PODS} pods, each a real netns with 4 connections (setup {:.1} s)",
        setup.elapsed().as_secs_f64()
    );

    let proc = Path::new("/proc");
    let node_pid = std::process::id();
    // The first scan enters every namespace and counts every pod; later ones read through the handles it kept.
    let run = |counting: Counting| {
        let mut scanner = Scanner::with_counting(proc.to_path_buf(), node_pid, counting, 3);
        let mut previous = Vec::new();
        let mut times = Vec::new();
        for _ in 0..21 {
            let now = Time(Timestamp::now());
            let t = Instant::now();
            let mut reports = scanner.scan(&previous, &now).pods;
            reports.retain(|r| ours.contains(&r.uid));
            times.push(t.elapsed());
            assert_eq!(
                reports.iter().filter(|r| r.sysctls.is_some()).count(),
                PODS,
                "every pod read"
            );
            assert!(reports.iter().all(|r| r.established == 8 && r.keepalive == 2));
            previous = reports;
        }
        let first = times.remove(0);
        times.sort();
        (first, times)
    };
    let (first, times) = run(Counting::SockDiag);
    let (fds_first, fds_times) = run(Counting::SocketFds);
    // Where the time goes: the /proc walk, and one pod read (namespace entry, sysctls, connection dump).
    let t = Instant::now();
    let processes = keepalive_operator::agent::kernel::find_pod_processes(proc, &ours);
    let walk = t.elapsed();
    let t = Instant::now();
    for pids in processes.values() {
        keepalive_operator::agent::kernel::read_sysctls(proc, pids[0]).unwrap();
    }
    let sysctls_only = t.elapsed();
    let t = Instant::now();
    for pids in processes.values() {
        keepalive_operator::agent::kernel::read_connections(proc, pids[0]).unwrap();
    }
    let connections_only = t.elapsed();
    let t = Instant::now();
    for pids in processes.values() {
        keepalive_operator::agent::kernel::count_held_connections(proc, pids, u32::MAX, |_| true).unwrap();
    }
    let held_only = t.elapsed();
    let baseline = {
        let t = Instant::now();
        for _ in 0..PODS * 3 {
            std::hint::black_box(std::fs::read_to_string("/proc/sys/net/ipv4/tcp_keepalive_time").unwrap());
        }
        t.elapsed()
    };
    let rss = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().to_string()))
        .unwrap();
    xtask::bench::millis("first scan (enters and counts all 110 namespaces)", first);
    xtask::bench::millis("scan, median of 20 (sock_diag, 1/3 of pods)", times[10]);
    xtask::bench::millis("scan, slowest of 20", times[19]);
    xtask::bench::millis("socket fds: first scan", fds_first);
    xtask::bench::millis("socket fds: scan, median of 20 (every pod)", fds_times[10]);
    xtask::bench::millis("socket fds: slowest of 20", fds_times[19]);
    xtask::bench::millis("baseline: 330 sysctl reads, host netns", baseline);
    xtask::bench::millis("  of which: /proc walk for the pods' processes", walk);
    xtask::bench::millis("  old way: 110 × enter netns + read sysctls", sysctls_only);
    xtask::bench::millis("  old way: 110 × enter netns + sock_diag dump", connections_only);
    xtask::bench::millis("  110 × count from the pods' socket fds", held_only);
    xtask::bench::row("this process's RSS after the scans", rss);
    println!(
        "target: scan ≤ 50 ms: {}",
        if times[19].as_millis() <= 50 { "met" } else { "MISSED" }
    );
    real_agent(&sandboxes);
    drop(connections);
}

/// The real agent against a real apiserver: RSS with 110 pods reported, and its writes while nothing changes.
fn real_agent(sandboxes: &[Sandbox]) {
    use futures::StreamExt;
    use keepalive_operator::api::KeepaliveNodeReport;
    use kube::{
        Api,
        runtime::{WatchStreamExt, watcher},
    };
    use std::time::Duration;

    let cp = xtask::ControlPlane::start().unwrap();
    cp.install_crds().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = cp.client().await.unwrap();
        // The agent reads no Pod objects: it finds the pods by their cgroups.
        let ours: std::collections::HashSet<&str> = sandboxes.iter().map(|s| s.uid.as_str()).collect();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_keepalive-operator"));
        cmd.args(["agent", "--node-name=bench-node", "--scan-interval-seconds=1"])
            .arg(format!(
                "--admin-listen=127.0.0.1:{}",
                xtask::cluster::free_port().unwrap()
            ))
            .arg(format!("--node-netns-pid={}", std::process::id()))
            .env("KUBECONFIG", cp.kubeconfig())
            .env("RUST_LOG", "warn");
        let agent = xtask::cluster::spawn_logged(cmd, &cp.work_dir().join("agent.log")).unwrap();
        let pid = agent.id();
        let reports: Api<KeepaliveNodeReport> = Api::all(client.clone());
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(Some(r)) = reports.get_opt("bench-node").await
                && r.spec
                    .pods
                    .iter()
                    .filter(|p| ours.contains(p.uid.as_str()) && p.sysctls.is_some())
                    .count()
                    == sandboxes.len()
            {
                break;
            }
            assert!(Instant::now() < deadline, "the agent never reported all pods");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Writes while nothing changes, over a quiet minute with a scan every second.
        let quiet = Duration::from_secs(65);
        let watch = watcher(
            reports.clone(),
            watcher::Config::default().fields("metadata.name=bench-node"),
        )
        .applied_objects()
        .take_until(tokio::time::sleep(quiet));
        let writes = watch
            .filter(|r| futures::future::ready(r.is_ok()))
            .count()
            .await
            .saturating_sub(1);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
                .unwrap()
        };
        let rss_kib: u64 = field("VmRSS:").trim_end_matches(" kB").parse().unwrap();
        let own_kib: u64 = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .map(|v| v.trim().trim_end_matches(" kB").parse().unwrap())
            })
            .unwrap();
        xtask::bench::row(
            "real agent, 110 pods reported: RSS",
            format!("{:.1} MiB", rss_kib as f64 / 1024.0),
        );
        xtask::bench::row(
            "  its peak RSS (VmHWM)",
            format!(
                "{:.1} MiB",
                field("VmHWM:").trim_end_matches(" kB").parse::<f64>().unwrap() / 1024.0
            ),
        );
        xtask::bench::row(
            "  baseline: this bench process's RSS",
            format!("{:.1} MiB", own_kib as f64 / 1024.0),
        );
        xtask::bench::row("  report writes in a quiet 65 s (1 s scans)", writes);
        println!(
            "target: agent RSS ≤ 30 MiB: {}",
            if rss_kib <= 30 * 1024 { "met" } else { "MISSED" }
        );
        xtask::cluster::kill(agent);
    });
}

/// The `sockets` group: the BPF per-connection reader against its same-run baselines.
mod sockets {
    use std::{
        collections::HashSet,
        fs::File,
        net::{TcpListener, TcpStream},
        os::fd::{AsFd, AsRawFd, RawFd},
        path::Path,
        process::{Child, Command, Stdio},
        time::{Duration, Instant},
    };

    use keepalive_operator::agent::kernel::{NetnsHandle, ProcessRef, bpf::SocketReader};
    use rustix::{
        net::{AddressFamily, ipproto, sockopt},
        process::{Pid, PidfdFlags, PidfdGetfdFlags},
    };

    const PODS: usize = 110;
    /// Sockets per pod (each loopback connection is two: client and server).
    const SMALL: usize = 100;
    const LARGE: usize = 910;
    /// Set in the environment of the bench's own child that measures the reader's RSS.
    const CHILD: &str = "KA_BENCH_SOCKET_READER";

    /// A pod: its network namespace, and processes holding its sockets.
    struct Pod {
        netns: File,
        holders: Vec<Child>,
    }

    impl Drop for Pod {
        fn drop(&mut self) {
            for child in &mut self.holders {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    impl Pod {
        fn new() -> Pod {
            let netns = std::thread::scope(|s| {
                s.spawn(|| {
                    // SAFETY: a new network namespace for this thread only (no CLONE_FILES: descriptors stay
                    // valid in every thread).
                    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }.unwrap();
                    let up = Command::new("ip").args(["link", "set", "lo", "up"]).status().unwrap();
                    assert!(up.success());
                    File::open("/proc/thread-self/ns/net").unwrap()
                })
                .join()
                .unwrap()
            });
            Pod {
                netns,
                holders: Vec::new(),
            }
        }

        /// `sockets` more established sockets (`sockets / 2` loopback connections, every other client with
        /// SO_KEEPALIVE, every fourth with its own TCP_KEEPIDLE), held by a new process of the pod (in its
        /// namespace).
        fn add(&mut self, sockets: usize) {
            let child = std::thread::scope(|s| {
                s.spawn(|| {
                    rustix::thread::move_into_link_name_space(
                        self.netns.as_fd(),
                        Some(rustix::thread::LinkNameSpaceType::Network),
                    )
                    .unwrap();
                    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                    let mut streams = Vec::with_capacity(sockets);
                    for i in 0..sockets / 2 {
                        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
                        if i % 2 == 0 {
                            sockopt::set_socket_keepalive(&client, true).unwrap();
                        }
                        if i % 4 == 0 {
                            sockopt::set_tcp_keepidle(&client, Duration::from_secs(300)).unwrap();
                        }
                        streams.push(client);
                        streams.push(listener.accept().unwrap().0);
                    }
                    // Started from this thread, the holder is in the pod's namespace.
                    let child = hold(streams.iter().map(|s| s.as_raw_fd()).collect());
                    drop(streams);
                    child
                })
                .join()
                .unwrap()
            });
            self.holders.push(child);
        }

        fn pids(&self) -> Vec<u32> {
            self.holders.iter().map(Child::id).collect()
        }
    }

    /// A process (`sleep`) holding copies of `fds` under the same numbers; once it runs, ours can be closed.
    fn hold(fds: Vec<RawFd>) -> Child {
        let mut cmd = Command::new("sleep");
        cmd.arg("3600")
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
        let child = cmd.spawn().unwrap();
        // After exec it is `sleep`, holding its copies.
        let comm = format!("/proc/{}/comm", child.id());
        while std::fs::read_to_string(&comm).map_or(true, |c| c.trim() != "sleep") {
            std::thread::sleep(Duration::from_millis(1));
        }
        child
    }

    fn median(mut times: Vec<Duration>) -> Duration {
        times.sort();
        times[times.len() / 2]
    }

    fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
        let mut times = Vec::with_capacity(runs);
        let mut last = None;
        for _ in 0..runs {
            let t = Instant::now();
            last = Some(std::hint::black_box(f()));
            times.push(t.elapsed());
        }
        (median(times), last.expect("at least one run"))
    }

    /// The values the reader gives, read socket by socket from the holders' descriptors: pidfd_getfd, then
    /// getsockopt and getsockname/getpeername. Returns the established TCP sockets read (each once).
    fn pidfd_getsockopt(pids: &[u32]) -> usize {
        let mut seen = HashSet::new();
        let mut established = 0;
        for &pid in pids {
            let pidfd = rustix::process::pidfd_open(Pid::from_raw(pid as i32).unwrap(), PidfdFlags::empty()).unwrap();
            for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
                let entry = entry.unwrap();
                let Ok(target) = std::fs::read_link(entry.path()) else {
                    continue;
                };
                let Some(inode) = target
                    .to_str()
                    .and_then(|t| t.strip_prefix("socket:["))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse::<u64>().ok())
                else {
                    continue;
                };
                if !seen.insert(inode) {
                    continue;
                }
                let number: i32 = entry.file_name().to_str().unwrap().parse().unwrap();
                let fd = rustix::process::pidfd_getfd(&pidfd, number, PidfdGetfdFlags::empty()).unwrap();
                let domain = sockopt::socket_domain(&fd).unwrap();
                if !matches!(domain, AddressFamily::INET | AddressFamily::INET6)
                    || sockopt::socket_protocol(&fd).unwrap() != Some(ipproto::TCP)
                {
                    continue;
                }
                let Ok(remote) = rustix::net::getpeername(&fd) else {
                    continue;
                };
                std::hint::black_box((
                    remote,
                    rustix::net::getsockname(&fd).unwrap(),
                    sockopt::socket_keepalive(&fd).unwrap(),
                    sockopt::tcp_keepidle(&fd).unwrap(),
                    sockopt::tcp_keepintvl(&fd).unwrap(),
                    sockopt::tcp_keepcnt(&fd).unwrap(),
                    sockopt::tcp_user_timeout(&fd).unwrap(),
                ));
                established += 1;
            }
        }
        established
    }

    /// VmRSS and VmHWM of this process, in KiB.
    fn own_rss() -> (u64, u64) {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let kib = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
                .unwrap()
        };
        (kib("VmRSS:"), kib("VmHWM:"))
    }

    /// The bench's own child: loads the reader, reads the node three times (`read` or `visit`), and prints its RSS
    /// once loaded, then with the last pass's result held, and its peak.
    pub fn reader_child() -> bool {
        let Some(mode) = std::env::var_os(CHILD) else {
            return false;
        };
        let mut reader = SocketReader::load().unwrap();
        let (loaded, _) = own_rss();
        let mut held = None;
        let mut sockets = 0;
        for _ in 0..3 {
            if mode == "visit" {
                sockets = reader
                    .visit(usize::MAX, |s| {
                        std::hint::black_box(s);
                    })
                    .unwrap()
                    .sockets;
            } else {
                drop(held.take()); // one pass held at a time
                let pass = reader.read(usize::MAX).unwrap();
                sockets = pass.sockets.len();
                held = Some(pass);
            }
        }
        let (rss, peak) = own_rss();
        println!("{loaded} {rss} {peak} {sockets}");
        drop(held);
        true
    }

    /// (RSS once loaded, RSS after reading the node, peak) in MiB of a process of its own that loads the reader and
    /// reads the node.
    fn reader_rss(mode: &str) -> (f64, f64, f64) {
        let out = Command::new(std::env::current_exe().unwrap())
            .env(CHILD, mode)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let f: Vec<f64> = text
            .split_whitespace()
            .map(|w| w.parse::<f64>().unwrap() / 1024.0)
            .collect();
        (f[0], f[1], f[2])
    }

    fn measure(pods: &[Pod], per_pod: usize, reader: &mut SocketReader, handles: &[NetnsHandle]) {
        let total = pods.len() * per_pod;
        let ours: HashSet<u64> = handles.iter().map(|h| h.inode).collect();
        let runs = if total > 20_000 { 11 } else { 21 };
        let (bpf, pass) = time(runs, || reader.read(usize::MAX).unwrap());
        let mine = pass.sockets.iter().filter(|s| ours.contains(&s.netns)).count();
        assert_eq!(mine, total, "every socket of the pods read");
        let keepalive = pass
            .sockets
            .iter()
            .filter(|s| ours.contains(&s.netns) && s.keepalive)
            .count();
        let (visit, _) = time(runs, || {
            reader
                .visit(usize::MAX, |s| {
                    std::hint::black_box(s);
                })
                .unwrap()
        });
        let (diag, counted) = time(runs.min(11), || {
            handles
                .iter()
                .map(|h| h.connections().unwrap())
                .fold((0, 0), |(e, k), c| (e + c.established, k + c.keepalive))
        });
        assert_eq!(counted, (total as u32, keepalive as u32), "sock_diag counts the same");
        let pids: Vec<u32> = pods.iter().flat_map(Pod::pids).collect();
        let (pidfd, read) = time(if total > 20_000 { 3 } else { 5 }, || pidfd_getsockopt(&pids));
        assert_eq!(read, total);
        let (loaded, rss, hwm) = reader_rss("read");
        let (_, visit_rss, visit_hwm) = reader_rss("visit");

        println!(
            "{} pods × {per_pod} sockets = {total} (node total read: {} sockets, {} records)",
            pods.len(),
            pass.sockets.len(),
            pass.records
        );
        xtask::bench::millis(&format!("BPF read, median of {runs}: every socket's values"), bpf);
        xtask::bench::millis("BPF visit (no Vec of sockets), median", visit);
        xtask::bench::millis("baseline: sock_diag count-only, 110 dumps, median", diag);
        xtask::bench::millis("baseline: pidfd_getfd + getsockopt per socket", pidfd);
        xtask::bench::row(
            "  ratios: count-only / BPF, pidfd / BPF",
            format!(
                "{:.1}× / {:.1}×",
                diag.as_secs_f64() / bpf.as_secs_f64(),
                pidfd.as_secs_f64() / bpf.as_secs_f64()
            ),
        );
        xtask::bench::row("reader process RSS once loaded", format!("{loaded:.1} MiB"));
        xtask::bench::row(
            "  after read(), its pass held / peak",
            format!("{rss:.1} / {hwm:.1} MiB"),
        );
        xtask::bench::row(
            "  after visit() / peak (separate process)",
            format!("{visit_rss:.1} / {visit_hwm:.1} MiB"),
        );
        let target = if total > 20_000 { 150 } else { 25 };
        println!(
            "target: {total} sockets ≤ {target} ms: {}",
            if bpf.as_millis() <= target { "met" } else { "MISSED" }
        );
    }

    pub fn run() {
        // Each pod's holders keep at most 910 sockets, so no process needs more than its default limit; the soft
        // limit is raised to the hard one all the same (raising the hard one needs CAP_SYS_RESOURCE).
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        )
        .unwrap();
        let setup = Instant::now();
        let mut pods: Vec<Pod> = (0..PODS).map(|_| Pod::new()).collect();
        for pod in &mut pods {
            pod.add(SMALL);
        }
        let proc = Path::new("/proc");
        let handles: Vec<NetnsHandle> = pods
            .iter()
            .map(|p| NetnsHandle::open(ProcessRef::open(proc, p.pids()[0]).unwrap().netns().unwrap()).unwrap())
            .collect();
        println!(
            "\nsockets: the per-connection reader (BPF iterator); setup {:.1} s",
            setup.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let mut reader = SocketReader::load().unwrap();
        xtask::bench::millis("reader load (once; includes learning HZ)", t.elapsed());
        xtask::bench::row("kernel HZ learnt", reader.hz());
        measure(&pods, SMALL, &mut reader, &handles);

        let setup = Instant::now();
        for pod in &mut pods {
            pod.add(LARGE - SMALL);
        }
        println!(
            "(grown to {LARGE} sockets a pod in {:.1} s)",
            setup.elapsed().as_secs_f64()
        );
        measure(&pods, LARGE, &mut reader, &handles);
    }
}
