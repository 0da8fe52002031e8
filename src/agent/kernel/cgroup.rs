//! Which host process belongs to which pod: the pod UID in /proc/<pid>/cgroup, as kubelet lays cgroups out.

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::Path,
};

/// The pod UID in a kubelet cgroup path, normalized to the usual dashed form.
///
/// Layouts (cgroup v1 per controller, v2 unified, same paths):
/// - cgroupfs driver: `/kubepods/pod<uid>/<ctr>`, `/kubepods/burstable/pod<uid>/<ctr>`,
///   `/kubepods/besteffort/pod<uid>/<ctr>`
/// - systemd driver: `/kubepods.slice/kubepods-pod<uid_>.slice/...`,
///   `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope`
///   (dashes of the UID written as underscores)
///
/// The pod segment is looked for anywhere in the path: under kubelet's `--cgroup-root`, and in paths relative to
/// the reader's own cgroup namespace (`0::/../../besteffort/pod<uid>/<ctr>`, as an agent in a container of its own
/// cgroup namespace sees them on cgroup v2).
pub fn pod_uid_from_cgroup_path(path: &str) -> Option<String> {
    path.split('/').find_map(|segment| {
        let raw = if let Some(rest) = segment.strip_suffix(".slice") {
            rest.rsplit_once("-pod").map(|(_, uid)| uid)?
        } else {
            segment.strip_prefix("pod")?
        };
        let uid = raw.replace('_', "-");
        (uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')).then(|| uid.to_ascii_lowercase())
    })
}

/// The pod UID of a process, from the text of its /proc/<pid>/cgroup.
pub fn pod_uid_from_proc_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|line| pod_uid_from_cgroup_path(line.splitn(3, ':').nth(2)?))
}

/// For every wanted pod UID, the host processes of that pod, lowest pid first, found by scanning `proc_root`.
/// Processes that vanish or cannot be read are skipped.
pub fn find_pod_processes(proc_root: &Path, wanted: &HashSet<String>) -> HashMap<String, Vec<u32>> {
    let mut found: HashMap<String, Vec<u32>> = HashMap::new();
    let Ok(entries) = fs::read_dir(proc_root) else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(text) = fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        if let Some(uid) = pod_uid_from_proc_cgroup(&text).filter(|u| wanted.contains(u)) {
            found.entry(uid).or_default().push(pid);
        }
    }
    for pids in found.values_mut() {
        pids.sort_unstable();
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f3c2f7e-1a2b-4c5d-8e9f-0123456789ab";

    #[test]
    fn cgroupfs_layouts() {
        for path in [
            format!("/kubepods/pod{UID}/abc123"),
            format!("/kubepods/burstable/pod{UID}/abc123"),
            format!("/kubepods/besteffort/pod{UID}/abc123"),
        ] {
            assert_eq!(pod_uid_from_cgroup_path(&path).as_deref(), Some(UID), "{path}");
        }
    }

    #[test]
    fn systemd_layouts() {
        let u = UID.replace('-', "_");
        for path in [
            format!("/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-abc.scope"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-abc.scope"
            ),
            format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/crio-abc.scope"),
        ] {
            assert_eq!(pod_uid_from_cgroup_path(&path).as_deref(), Some(UID), "{path}");
        }
    }

    #[test]
    fn proc_cgroup_v1_and_v2() {
        let v1 = format!(
            "12:pids:/kubepods/burstable/pod{UID}/c1\n11:cpu,cpuacct:/kubepods/burstable/pod{UID}/c1\n1:name=systemd:/\n"
        );
        assert_eq!(pod_uid_from_proc_cgroup(&v1).as_deref(), Some(UID));
        let v2 = format!(
            "0::/kubepods.slice/kubepods-pod{}.slice/cri-containerd-x.scope\n",
            UID.replace('-', "_")
        );
        assert_eq!(pod_uid_from_proc_cgroup(&v2).as_deref(), Some(UID));
        assert_eq!(
            pod_uid_from_proc_cgroup("0::/user.slice/session-1.scope\n4:pids:/\n"),
            None
        );
        assert_eq!(pod_uid_from_cgroup_path("/kubepods/burstable/podnot-a-uid/c"), None);
        // Seen from inside a cgroup namespace (the agent's container on cgroup v2), and under a cgroup root.
        assert_eq!(
            pod_uid_from_proc_cgroup(&format!("0::/../../besteffort/pod{UID}/c1\n")).as_deref(),
            Some(UID)
        );
        assert_eq!(
            pod_uid_from_cgroup_path(&format!(
                "/../kubepods-burstable-pod{}.slice/cri-containerd-x.scope",
                UID.replace('-', "_")
            ))
            .as_deref(),
            Some(UID)
        );
        assert_eq!(
            pod_uid_from_cgroup_path(&format!("/custom-root/kubepods/pod{UID}/c")).as_deref(),
            Some(UID)
        );
    }
}
