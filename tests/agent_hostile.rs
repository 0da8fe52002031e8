//! The agent against hostile pods on the real kernel, beside 100 ordinary ones: a pod with 200 000 sockets
//! (100 000 established loopback pairs in its namespace) and a pod with 20 000 processes. The scan stays within
//! its deadline, both are reported with the budget they exceed, every other pod is read exactly, and the real
//! agent process stays under the chart's memory limit. Also: only the agent's kernel-reader threads hold
//! capabilities. Needs root (as CI has).

use std::{
    collections::HashMap,
    io::Write,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use keepalive_operator::agent::{Budgets, Counting, Scanner};
use xtask::sandbox::{HeldConnections, Layout, Sandbox};

const NORMAL_PODS: usize = 100;
const SOCKET_PAIRS: usize = 100_000;
const PROCESSES: usize = 20_000;
/// The chart's agent memory limit (charts/keepalive-operator/values.yaml agent.resources.limits.memory).
const MEMORY_LIMIT_KIB: u64 = 128 * 1024;

/// `count` processes of one pod: a perl parent forks sleepers into its cgroup and network namespace (as a pod's
/// processes share its namespace); on drop it kills and reaps them.
struct Swarm {
    parent: Child,
    cgroup: PathBuf,
}

impl Swarm {
    fn start(pod: &Sandbox, count: usize) -> Swarm {
        let script = format!(
            "$| = 1; my @kids; $SIG{{TERM}} = sub {{ kill 'KILL', @kids; waitpid($_, 0) for @kids; exit 0 }}; \
             my $go = <STDIN>; \
             for (1..{count}) {{ my $p = fork; die 'fork' unless defined $p; \
             if (!$p) {{ $SIG{{TERM}} = 'DEFAULT'; sleep 600; exit 0 }} push @kids, $p }} \
             print \"forked\\n\"; sleep 600 while 1;"
        );
        let netns = pod.netns_path().file_name().unwrap().to_str().unwrap().to_string();
        let parent = Command::new("ip")
            .args(["netns", "exec", &netns, "perl", "-e", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        pod.adopt(parent.id());
        let mut swarm = Swarm {
            cgroup: pod.cgroup_dir().to_path_buf(),
            parent,
        };
        writeln!(swarm.parent.stdin.as_mut().unwrap(), "go").unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(swarm.parent.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "forked", "perl forked {count} sleepers");
        swarm
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe { libc::kill(self.parent.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.parent.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.parent.kill();
        let _ = self.parent.wait();
        // Until the cgroup is empty, so the sandbox can remove it.
        while Instant::now() < deadline
            && !std::fs::read_to_string(self.cgroup.join("cgroup.procs"))
                .unwrap_or_default()
                .trim()
                .is_empty()
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `pairs` established loopback connections inside the namespace of `pod`, held by processes of the pod in
/// batches (a process may hold fewer descriptors than the sockets needed).
fn hold_connections(pod: &Sandbox, pairs: usize) -> Vec<HeldConnections> {
    pod.in_netns(|| std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535").unwrap());
    const BATCH: usize = 8_000;
    (0..pairs.div_ceil(BATCH))
        .map(|i| pod.connect(0, BATCH.min(pairs - i * BATCH)))
        .collect()
}

fn status_field(pid: u32, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        .unwrap()
}

/// The real `keepalive-operator agent`, against an apiserver that does not answer (it scans all the same);
/// killed on drop.
struct AgentProcess {
    child: Child,
    admin_port: u16,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl AgentProcess {
    fn start(tag: &str, extra: &[&str]) -> AgentProcess {
        let dir = TempDir(std::env::temp_dir().join(format!("ka-agent-{tag}-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let kubeconfig = dir.0.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:9'}}]\n\
             users: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\n\
             current-context: x\n",
        )
        .unwrap();
        let admin_port = xtask::cluster::free_port().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_keepalive-operator"))
            .args(["agent", "--node-name=hostile-node"])
            .arg(format!("--admin-listen=127.0.0.1:{admin_port}"))
            .arg(format!("--node-netns-pid={}", std::process::id()))
            .args(extra)
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        AgentProcess {
            child,
            admin_port,
            _dir: dir,
        }
    }

    /// The value of metric line `name` (with its labels), once the agent serves it.
    fn metric(&self, name: &str) -> Option<f64> {
        let (_, text) = xtask::cluster::http_get(self.admin_port, "/metrics")?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// Waits until the agent has completed `scans` scans.
    fn wait_for_scans(&self, scans: f64, within: Duration) {
        let deadline = Instant::now() + within;
        while self
            .metric("keepalive_agent_scan_duration_seconds_count")
            .is_none_or(|n| n < scans)
        {
            assert!(Instant::now() < deadline, "the agent did not scan {scans} times");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn hostile_pods_are_bounded_and_the_others_read_exactly() {
    let setup = Instant::now();
    let mut normal = Vec::new();
    let mut held = Vec::new();
    for i in 0..NORMAL_PODS {
        let uid = format!("{:08x}-0000-4000-8000-{:012x}", 0x4057_0000u32 + i as u32, i);
        let layout = if i % 2 == 0 {
            Layout::CgroupfsBurstable
        } else {
            Layout::SystemdBestEffort
        };
        let values = (100 + i as i32, 10 + (i % 7) as i32, 3 + (i % 5) as i32);
        let s = Sandbox::new(&format!("h{i}"), &uid, layout, Some(values));
        held.push(s.connect(i % 3, 1));
        normal.push((s, values, (2 * (i % 3 + 1)) as i32, (i % 3) as i32));
    }
    let sockets_pod = Sandbox::new(
        "many-sockets",
        "50c4e750-0000-4000-8000-000000000001",
        Layout::CgroupfsBurstable,
        Some((61, 6, 6)),
    );
    let _streams = hold_connections(&sockets_pod, SOCKET_PAIRS);
    let processes_pod = Sandbox::new(
        "many-procs",
        "940c3550-0000-4000-8000-000000000002",
        Layout::SystemdBestEffort,
        Some((62, 6, 6)),
    );
    let _swarm = Swarm::start(&processes_pod, PROCESSES);
    println!("setup: {:.1} s", setup.elapsed().as_secs_f64());

    let deadline = Duration::from_secs(4);
    let budgets = Budgets {
        max_sockets: 50_000,
        max_processes: 1_000,
        deadline,
        ..Budgets::default()
    };
    let mut scanner =
        Scanner::with_counting("/proc".into(), std::process::id(), Counting::SockDiag, 1).with_budgets(budgets);
    let mut previous = Vec::new();
    let mut done = false;
    // The first scan counts every pod (all new) until the deadline; those left are counted first next scan.
    for _ in 0..8 {
        let started = Instant::now();
        let scan = scanner.scan(&previous, &Time(Timestamp::now()));
        let took = started.elapsed();
        println!("scan: {:.0} ms, {:?}", took.as_secs_f64() * 1e3, scan.stats);
        // The counting stops at the deadline; the walk and the sysctl reads add a little.
        assert!(took < deadline + Duration::from_secs(2), "scan took {took:?}");
        let by_uid: HashMap<&str, _> = scan.pods.iter().map(|p| (p.uid.as_str(), p)).collect();
        let many_sockets = by_uid[sockets_pod.uid.as_str()];
        assert_eq!(
            many_sockets.sysctls.map(|v| v.time),
            Some(61),
            "its values are always read"
        );
        let many_processes = by_uid[processes_pod.uid.as_str()];
        assert_eq!(
            many_processes.sysctls.map(|v| v.time),
            Some(62),
            "read through its sandbox"
        );
        assert_eq!(
            many_processes.error.as_deref(),
            Some("processes not examined: more than 1000 processes (--max-processes-per-pod)")
        );
        assert!(scan.stats.over_processes >= 1);
        for (s, (t, i, p), _, _) in &normal {
            let e = by_uid[s.uid.as_str()];
            assert_eq!(e.sysctls.map(|v| (v.time, v.interval, v.probes)), Some((*t, *i, *p)));
            assert_eq!(e.error, None, "{e:?}");
        }
        let all_counted = normal.iter().all(|(s, _, established, keepalive)| {
            let e = by_uid[s.uid.as_str()];
            (e.established, e.keepalive) == (*established, *keepalive)
        });
        let over = many_sockets.error.as_deref()
            == Some("connections not counted: more than 50000 sockets (--max-sockets-per-pod)");
        assert!(over || many_sockets.error.is_none(), "{many_sockets:?}");
        assert_eq!(many_sockets.established, 0, "never a partial count");
        previous = scan.pods;
        if all_counted && over {
            assert!(scan.stats.over_sockets >= 1);
            done = true;
            break;
        }
    }
    assert!(
        done,
        "every ordinary pod counted exactly, the one with too many sockets reported so"
    );

    // Per socket: one pass over the node's sockets counts every pod exactly, the big one too; its connections are
    // not classified (its summary would grow with them), and it says so.
    let mut per_socket =
        Scanner::with_counting("/proc".into(), std::process::id(), Counting::PerSocket, 1).with_budgets(budgets);
    let started = Instant::now();
    let scan = per_socket.scan(&[], &Time(Timestamp::now()));
    let took = started.elapsed();
    println!("per-socket scan: {:.0} ms, {:?}", took.as_secs_f64() * 1e3, scan.stats);
    assert!(took < deadline, "per-socket scan took {took:?}");
    let by_uid: HashMap<&str, _> = scan.pods.iter().map(|p| (p.uid.as_str(), p)).collect();
    let many_sockets = by_uid[sockets_pod.uid.as_str()];
    assert_eq!(
        (many_sockets.error.as_deref(), many_sockets.sockets.as_ref()),
        (
            Some("connections counted, not classified: more than 50000 sockets (--max-sockets-per-pod)"),
            None
        )
    );
    assert_eq!(many_sockets.established as usize, 2 * SOCKET_PAIRS, "counted exactly");
    for (s, _, established, keepalive) in &normal {
        let e = by_uid[s.uid.as_str()];
        assert_eq!((e.established, e.keepalive), (*established, *keepalive));
        let classified: i32 = e.sockets.as_ref().unwrap().groups.iter().map(|g| g.connections).sum();
        assert_eq!(classified, *established, "{e:?}");
    }

    // The real agent process on the same node: bounded memory.
    let agent = AgentProcess::start("hostile", &["--scan-interval-seconds=5", "--scan-deadline-seconds=4"]);
    agent.wait_for_scans(3.0, Duration::from_secs(90));
    let hwm: u64 = status_field(agent.child.id(), "VmHWM:")
        .trim_end_matches(" kB")
        .parse()
        .unwrap();
    println!(
        "real agent with the hostile pods: peak RSS {:.1} MiB (limit {} MiB)",
        hwm as f64 / 1024.0,
        MEMORY_LIMIT_KIB / 1024
    );
    assert!(hwm < MEMORY_LIMIT_KIB, "agent peak RSS {hwm} KiB");
    // The gauges describe the last scan: one cut short by its deadline (a loaded machine) may not reach the
    // hostile pods, which then come first in the next. Within a few scans both are reported.
    let over = |budget: &str| agent.metric(&format!("keepalive_agent_pods_over_budget{{budget=\"{budget}\"}}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while (over("sockets") < Some(1.0) || over("processes") < Some(1.0)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        over("sockets") >= Some(1.0),
        "the pod with too many sockets is reported over budget"
    );
    assert!(
        over("processes") >= Some(1.0),
        "the pod with too many processes is reported over budget"
    );
    drop(agent);
    drop(held);
}

/// Capability sets of every thread of `pid`: (name, CapEff, CapPrm).
fn thread_capabilities(pid: u32) -> Vec<(String, u64, u64)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap()
        };
        let hex = |v: String| u64::from_str_radix(&v, 16).unwrap();
        threads.push((field("Name:"), hex(field("CapEff:")), hex(field("CapPrm:"))));
    }
    threads
}

#[test]
fn only_the_kernel_reader_threads_hold_capabilities() {
    const SYS_PTRACE: u64 = 1 << 19;
    const SYS_ADMIN: u64 = 1 << 21;
    const DAC_READ_SEARCH: u64 = 1 << 2;
    let pod = Sandbox::new(
        "caps",
        "ca950000-0000-4000-8000-000000000003",
        Layout::CgroupfsBurstable,
        Some((23, 3, 3)),
    );
    let _conns = pod.connect(1, 1);
    // per-socket: SYS_ADMIN stands for CAP_BPF + CAP_PERFMON, which loading the socket iterator needs.
    for (counting, expected) in [
        ("per-socket", SYS_ADMIN | SYS_PTRACE),
        ("sock-diag", SYS_ADMIN | SYS_PTRACE),
        ("socket-fds", SYS_ADMIN | SYS_PTRACE | DAC_READ_SEARCH),
    ] {
        let agent = AgentProcess::start(
            counting,
            &["--scan-interval-seconds=1", &format!("--count-connections={counting}")],
        );
        agent.wait_for_scans(2.0, Duration::from_secs(30));
        let threads = thread_capabilities(agent.child.id());
        assert!(threads.len() > 2, "{threads:?}");
        assert!(threads.iter().any(|(name, ..)| name == "ka-kernel"), "{threads:?}");
        for (name, effective, permitted) in &threads {
            if name.starts_with("ka-kernel") {
                assert_eq!((*effective, *permitted), (expected, expected), "{name} ({counting})");
            } else {
                assert_eq!((*effective, *permitted), (0, 0), "{name} ({counting}): {threads:?}");
            }
        }
        // The scans ran on those threads (no apiserver answers here: nothing is written).
        assert_eq!(
            agent.metric("keepalive_agent_pods_over_budget{budget=\"sockets\"}"),
            Some(0.0)
        );
        let per_socket = if counting == "per-socket" { 1.0 } else { 0.0 };
        assert_eq!(
            agent.metric("keepalive_agent_per_socket"),
            Some(per_socket),
            "{counting}"
        );
    }
}
