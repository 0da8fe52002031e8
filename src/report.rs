//! `keepalive-operator agent`: on every node, reads the live keepalive values of the node's pods and publishes
//! them in the node's `KeepaliveNodeReport`.
//!
//! API writes per node are bounded: at most one per scan interval (default 10 s), and only when a reading
//! changed; otherwise one heartbeat per `--heartbeat-seconds` (default 60 s) so the controller knows the agent
//! is alive. Entries of pods that left the node disappear with the next write.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use futures::StreamExt;
use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};

use crate::{
    agent,
    api::{KeepaliveNodeReportSpec, LiveKeepalive, PodLiveReport},
};

/// Field manager of the agent's writes.
pub const AGENT_MANAGER: &str = "keepalive-agent";

#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// The node this agent runs on (from the downward API: spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The host's /proc (the agent runs with hostPID).
    #[arg(long, env = "KEEPALIVE_PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,
    /// Seconds between scans; also the shortest time between two writes of the report.
    #[arg(long, env = "KEEPALIVE_SCAN_INTERVAL_SECONDS", value_parser = clap::value_parser!(u64).range(1..=86400), default_value_t = 10)]
    pub scan_interval_seconds: u64,
    /// A host process in the node's own network namespace, whose values hostNetwork pods run with (with hostPID,
    /// 1 is the host's init).
    #[arg(long, env = "KEEPALIVE_NODE_NETNS_PID", default_value_t = 1)]
    pub node_netns_pid: u32,
    /// The report is rewritten at least this often, as a heartbeat, even when nothing changed.
    #[arg(long, env = "KEEPALIVE_HEARTBEAT_SECONDS", value_parser = clap::value_parser!(u64).range(1..=86400), default_value_t = 60)]
    pub heartbeat_seconds: u64,
}

/// A pod of this node, as the scan needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub host_network: bool,
    pub running: bool,
}

impl NodePod {
    fn from_pod(pod: &Pod) -> Option<NodePod> {
        let spec = pod.spec.as_ref();
        Some(NodePod {
            uid: pod.metadata.uid.clone()?,
            namespace: pod.metadata.namespace.clone()?,
            name: pod.metadata.name.clone()?,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            running: !matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ),
        })
    }
}

/// One scan of the node: the readings of every running pod (hostNetwork pods are judged by the node's values),
/// keeping `readAt` of readings that did not change.
pub fn scan(
    proc_root: &std::path::Path,
    node_pid: u32,
    pods: &[NodePod],
    previous: &[PodLiveReport],
    now: &Time,
) -> (Option<LiveKeepalive>, Vec<PodLiveReport>) {
    let live = |v: agent::LiveSysctls| LiveKeepalive {
        time: v.time,
        interval: v.interval,
        probes: v.probes,
    };
    let node = agent::read_sysctls(proc_root, node_pid).ok().map(live);
    let scanned: Vec<&NodePod> = pods.iter().filter(|p| p.running && !p.host_network).collect();
    let wanted = scanned.iter().map(|p| p.uid.clone()).collect();
    let processes = agent::find_pod_processes(proc_root, &wanted);
    let previous: HashMap<&str, &PodLiveReport> = previous.iter().map(|r| (r.uid.as_str(), r)).collect();
    let read_one = |pod: &NodePod| {
        let mut report = PodLiveReport {
            uid: pod.uid.clone(),
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            sysctls: None,
            established: 0,
            keepalive: 0,
            read_at: now.clone(),
            error: None,
        };
        let reading = match processes.get(&pod.uid) {
            None => Err("no process of the pod found on the host".to_string()),
            Some(&pid) => agent::read_pod(proc_root, pid).map_err(|e| e.to_string()),
        };
        match reading {
            Ok((sysctls, connections)) => {
                report.sysctls = Some(live(sysctls));
                report.established = connections.established as i32;
                report.keepalive = connections.keepalive as i32;
            }
            Err(e) => report.error = Some(e),
        }
        if let Some(old) = previous.get(pod.uid.as_str()) {
            let unchanged = PodLiveReport {
                read_at: old.read_at.clone(),
                ..report.clone()
            };
            if &&unchanged == old {
                report.read_at = old.read_at.clone();
            }
        }
        report
    };
    // The readings wait on the kernel, not on each other: spread them over the cores.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4);
    let chunk = scanned.len().div_ceil(workers).max(1);
    let mut reports: Vec<PodLiveReport> = std::thread::scope(|s| {
        let handles: Vec<_> = scanned
            .chunks(chunk)
            .map(|part| s.spawn(|| part.iter().map(|p| read_one(p)).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });
    reports.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    (node, reports)
}

/// Runs the agent until SIGTERM or Ctrl-C.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let pods_api: Api<Pod> = Api::all(client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", args.node_name));
    let mut events = std::pin::pin!(watcher(pods_api, config).default_backoff());
    let reports: Api<crate::api::KeepaliveNodeReport> = Api::all(client);
    let mut pods: HashMap<String, NodePod> = HashMap::new();
    let mut relist: HashMap<String, NodePod> = HashMap::new();
    let mut synced = false;
    let mut written: Option<(KeepaliveNodeReportSpec, std::time::Instant)> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(args.scan_interval_seconds.max(1)));
    let shutdown = crate::controller::shutdown_signal();
    let mut shutdown = std::pin::pin!(shutdown);
    tracing::info!(node = %args.node_name, "agent running");
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(watcher::Event::Init)) => relist.clear(),
                Some(Ok(watcher::Event::InitApply(pod))) => {
                    if let Some(p) = NodePod::from_pod(&pod) {
                        relist.insert(p.uid.clone(), p);
                    }
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    pods = std::mem::take(&mut relist);
                    synced = true;
                }
                Some(Ok(watcher::Event::Apply(pod))) => {
                    if let Some(p) = NodePod::from_pod(&pod) {
                        pods.insert(p.uid.clone(), p);
                    }
                }
                Some(Ok(watcher::Event::Delete(pod))) => {
                    if let Some(uid) = pod.metadata.uid {
                        pods.remove(&uid);
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, "pod watch failed; retrying"),
                None => return Ok(()),
            },
            _ = tick.tick() => {
                if !synced {
                    continue;
                }
                let snapshot: Vec<NodePod> = pods.values().cloned().collect();
                let previous = written.as_ref().map(|(s, _)| s.pods.clone()).unwrap_or_default();
                let (proc_root, node_pid) = (args.proc_root.clone(), args.node_netns_pid);
                let now = Time(Timestamp::now());
                let stamp = now.clone();
                let Ok((node, pod_reports)) =
                    tokio::task::spawn_blocking(move || scan(&proc_root, node_pid, &snapshot, &previous, &stamp)).await
                else {
                    continue;
                };
                let spec = KeepaliveNodeReportSpec {
                    last_scan: now,
                    heartbeat_seconds: i32::try_from(args.heartbeat_seconds).unwrap_or(i32::MAX),
                    node_sysctls: node,
                    verified_pods: pod_reports.iter().filter(|r| r.sysctls.is_some()).count() as i32,
                    unverified_pods: pod_reports.iter().filter(|r| r.sysctls.is_none()).count() as i32,
                    pods: pod_reports,
                };
                let heartbeat_due = written
                    .as_ref()
                    .is_none_or(|(_, at)| at.elapsed() >= Duration::from_secs(args.heartbeat_seconds));
                let changed = written.as_ref().is_none_or(|(old, _)| {
                    KeepaliveNodeReportSpec { last_scan: spec.last_scan.clone(), ..old.clone() } != spec
                });
                if !changed && !heartbeat_due {
                    continue;
                }
                let object = serde_json::json!({
                    "apiVersion": "keepalive.dev/v1alpha1",
                    "kind": "KeepaliveNodeReport",
                    "metadata": { "name": args.node_name },
                    "spec": spec,
                });
                match reports
                    .patch(&args.node_name, &PatchParams::apply(AGENT_MANAGER).force(), &Patch::Apply(&object))
                    .await
                {
                    Ok(_) => written = Some((spec, std::time::Instant::now())),
                    Err(e) => tracing::warn!(error = %e, "writing the node report failed; retrying next scan"),
                }
            }
            _ = &mut shutdown => return Ok(()),
        }
    }
}
