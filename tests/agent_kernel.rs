//! The agent's kernel readings on the real kernel: real network namespaces with their own keepalive sysctls,
//! processes placed in cgroups laid out as kubelet lays them out for a pod UID, and real TCP connections on
//! loopback inside those namespaces, with and without SO_KEEPALIVE. Needs root (as CI has).

use std::{collections::HashSet, path::Path};

use keepalive_operator::agent::{self, Connections, LiveSysctls, ReadError};
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
    s.kill_process();
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
