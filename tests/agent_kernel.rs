//! The agent's kernel readings on the real kernel: real network namespaces with their own keepalive sysctls,
//! processes placed in cgroups laid out as kubelet lays them out for a pod UID, and real TCP connections on
//! loopback inside those namespaces, with and without SO_KEEPALIVE. Needs root (as CI has).

use std::{collections::HashSet, path::Path};

use keepalive_operator::{
    agent::kernel::{self, Connections, ReadError},
    api::LiveKeepalive,
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
    let held = |s: &Sandbox| kernel::count_held_connections(proc, &found[&s.uid]).unwrap();
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

/// The scanner enters a pod's namespace once and reads it through the handle it keeps: a value changed later
/// inside the namespace is seen without entering again; a pod whose process is gone is reported, its handle
/// dropped.
#[test]
fn the_scanner_keeps_one_handle_per_pod_and_sees_changes() {
    use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
    use keepalive_operator::agent::{Counting, NodePod, Scanner};

    let mut s = Sandbox::new(
        "scanner",
        "5ca77e55-1234-4234-8234-123456789012",
        Layout::SystemdBestEffort,
        Some((30, 5, 3)),
    );
    let conns = s.connect(1, 0);
    let pods = [NodePod {
        uid: s.uid.clone(),
        namespace: "ns".into(),
        name: "p".into(),
        host_network: false,
        running: true,
        started: true,
    }];
    let mut scanner = Scanner::new("/proc".into(), std::process::id());
    let now = Time(Timestamp::now());
    let (node, first) = scanner.scan(&pods, &[], &now);
    assert!(node.is_some(), "the node's own values");
    assert_eq!(
        first[0].sysctls.map(|v| (v.time, v.interval, v.probes)),
        Some((30, 5, 3))
    );
    assert_eq!((first[0].established, first[0].keepalive), (2, 1));
    assert_eq!(scanner.open_handles(), 1);
    // Counting from the pod's socket descriptors gives the same numbers.
    let mut fds = Scanner::with_counting("/proc".into(), std::process::id(), Counting::SocketFds, 1);
    let (_, by_fds) = fds.scan(&pods, &[], &now);
    assert_eq!((by_fds[0].established, by_fds[0].keepalive), (2, 1));

    s.set_sysctl("tcp_keepalive_time", 45);
    let later = Time(Timestamp::now());
    let (_, second) = scanner.scan(&pods, &first, &later);
    assert_eq!(second[0].sysctls.map(|v| v.time), Some(45));
    assert_eq!(second[0].read_at, later, "a changed reading gets a new readAt");
    let (_, third) = scanner.scan(&pods, &second, &Time(Timestamp::now()));
    assert_eq!(third[0].read_at, later, "an unchanged reading keeps its readAt");

    drop(conns);
    s.kill_process();
    let (_, gone) = scanner.scan(&pods, &third, &Time(Timestamp::now()));
    assert_eq!(gone[0].sysctls, None);
    assert!(
        gone[0].error.as_deref().unwrap().contains("no process"),
        "{:?}",
        gone[0]
    );
    assert_eq!(scanner.open_handles(), 0);
}
