//! One scan of a node with 110 pods (the kubelet default maximum), each a real network namespace with a process
//! in a kubelet-style cgroup and open TCP connections, through the agent's scan (`report::scan`). Baseline in the
//! same run: the bare reads of the same 110 sysctl files of the host namespace (the floor: no /proc scan, no
//! namespace switch). Targets: a scan ≤ 50 ms wall; the agent's RSS ≤ 30 MiB (measured on the real agent process
//! against the real apiserver in tests; here the RSS of this process after the scans is printed for reference).
//!
//! Needs root. Run: cargo bench --bench agent

use std::{path::Path, time::Instant};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use keepalive_operator::report::{NodePod, scan};
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
    let pods: Vec<NodePod> = sandboxes
        .iter()
        .enumerate()
        .map(|(i, s)| NodePod {
            uid: s.uid.clone(),
            namespace: "bench".into(),
            name: format!("pod-{i}"),
            host_network: false,
            running: true,
        })
        .collect();
    println!(
        "agent scan: {PODS} pods, each a real netns with 4 connections (setup {:.1} s)",
        setup.elapsed().as_secs_f64()
    );

    let proc = Path::new("/proc");
    let node_pid = std::process::id();
    let mut previous = Vec::new();
    let mut times = Vec::new();
    for _ in 0..20 {
        let now = Time(Timestamp::now());
        let t = Instant::now();
        let (_, reports) = scan(proc, node_pid, &pods, &previous, &now);
        times.push(t.elapsed());
        assert_eq!(
            reports.iter().filter(|r| r.sysctls.is_some()).count(),
            PODS,
            "every pod read"
        );
        assert!(reports.iter().all(|r| r.established == 8 && r.keepalive == 2));
        previous = reports;
    }
    times.sort();
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
    println!(
        "{:<48} {:>10}",
        "scan, median of 20",
        format!("{:.1} ms", times[10].as_secs_f64() * 1e3)
    );
    println!(
        "{:<48} {:>10}",
        "scan, slowest of 20",
        format!("{:.1} ms", times[19].as_secs_f64() * 1e3)
    );
    println!(
        "{:<48} {:>10}",
        "baseline: 330 sysctl reads, host netns",
        format!("{:.2} ms", baseline.as_secs_f64() * 1e3)
    );
    println!("{:<48} {:>10}", "this process's RSS after the scans", rss);
    println!(
        "target: scan ≤ 50 ms: {}",
        if times[19].as_millis() <= 50 { "met" } else { "MISSED" }
    );
    drop(connections);
}
