//! One scan of a node with 110 pods (the kubelet default maximum), each a real network namespace with a process
//! in a kubelet-style cgroup and open TCP connections, through the agent's scanner (`report::Scanner`). Baselines
//! in the same run: the bare reads of 330 sysctl files of the host namespace (the floor: no /proc scan, no
//! namespace switch), and the old way of reading (entering every namespace on every scan).
//!
//! Then the real agent process against a real apiserver, finding the same 110 pods by their cgroups: its RSS
//! once it reports all of them, and its API writes over a quiet minute (writes only on
//! change, plus one heartbeat a minute). Targets: a scan ≤ 50 ms wall; agent RSS ≤ 30 MiB.
//!
//! Needs root. Run: cargo bench --bench agent

use std::{path::Path, time::Instant};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use keepalive_operator::agent::{Counting, Scanner};
use xtask::sandbox::{Layout, Sandbox};

const PODS: usize = 110;

fn main() {
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
