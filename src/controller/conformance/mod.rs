//! Conformance: for every policy, which pods it owns and whether they run with its values — kept up to date
//! incrementally as pods, namespaces and policies change. Pure state; the controller feeds it from watches
//! and writes what it reports.
//!
//! Pods are held lean ([`CachedPod`]): only what the decision and the report need. Terminated pods (phase
//! Succeeded or Failed) are not counted: they hold no connections.
//!
//! Live readings ([`NodeLive`], from the node agents' reports) take precedence over the pod spec: once a fresh
//! report of its node exists, a pod counts as conformant only if the kernel holds the policy's values in its
//! network namespace (else `LiveMismatch`, or `Unverified` without a reading), and a hostNetwork pod is judged
//! by the node's own values. A report is fresh for three heartbeats after this replica *received* it (the node's
//! clock is not trusted). Pods of sandboxed runtimes (a RuntimeClass whose handler is not runc-like) cannot be
//! read from the host: they are `Unverified`, whatever their node reports.
//!
//! A pod bound to a node whose kubelet is older than 1.29 is `KubeletTooOld` (that kubelet rejects the keepalive
//! sysctls), whatever the apiserver's version and whatever the node's agent reads: it never runs with the values
//! the operator injects there.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use k8s_openapi::{
    api::core::v1::Pod,
    jiff::{SignedDuration, Timestamp},
};

mod pod;
mod sockets;
mod status;

use self::pod::Interner;
pub use self::{
    pod::{CachedPod, PodKey, parse_uid},
    sockets::{Sockets, Strings},
    status::{Injection, same_report, status},
};
use crate::{
    api::{
        ConnectionCounts, KeepaliveNodeReportSpec, LiveKeepalive, MAX_HEARTBEAT_SECONDS, MAX_REFRESH_SECONDS,
        MAX_VIOLATION_MESSAGE_CHARS, MAX_VIOLATIONS, Violation,
    },
    policy::{
        self, ClusterFacts, Kubelet, PolicyEntry, PolicySet, Reason, Verdict,
        connection::{Classes, IdleBound},
    },
    runtime::watch::Index,
};

/// The reason of a pod that conforms by its spec but has no live reading yet: not counted conformant, but not a
/// violation either — the `Conformant` condition does not turn False for pods that merely wait for the agent's
/// next scan (every rollout would flap it).
pub const AWAITING: Reason = Reason::AwaitingLiveReading;

/// A node report not refreshed for this many heartbeats is stale: its agent is gone or cannot write.
pub const STALE_AFTER_HEARTBEATS: i32 = 3;

/// A running pod is judged missing from its node once this many reports of the node were received since the
/// controller first saw it running: the later one was scanned after the pod was running.
pub const MISSING_AFTER_REPORTS: u32 = 2;

/// The annotation of a static pod's mirror pod holding the config hash, which is the UID kubelet runs the static
/// pod under (and names its cgroup after).
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// RuntimeClass handlers whose pods run in the host's kernel, in network namespaces the agent reads: the
/// default of `--verified-runtime-handlers`.
pub const RUNC_LIKE_HANDLERS: &[&str] = &["runc", "crun", "youki"];

/// What a node agent read of one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodReading {
    /// Absent when the pod could not be read (see `error`).
    pub sysctls: Option<LiveKeepalive>,
    pub established: u32,
    pub keepalive: u32,
    /// The connections read socket by socket, where the agent does.
    pub sockets: Option<Sockets>,
    pub error: Option<Arc<str>>,
}

/// One node's report, as the controller keeps it: pod readings by pod UID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeLive {
    pub last_scan: Timestamp,
    /// Not heard from for this long (three heartbeats: a report or a renewal of its heartbeat Lease), the node's
    /// report is stale.
    pub stale_after: SignedDuration,
    /// The same, judged by reports alone (when this replica cannot read the agents' Leases): three refreshes
    /// where the agent renews a Lease, else three heartbeats.
    pub refresh_stale_after: SignedDuration,
    /// The node's own values, which hostNetwork pods run with.
    pub node_sysctls: Option<LiveKeepalive>,
    pub pods: HashMap<u128, PodReading>,
}

impl NodeLive {
    pub fn from_report(spec: &KeepaliveNodeReportSpec) -> Self {
        Self::from_report_with(spec, &mut Strings::default())
    }

    /// [`NodeLive::from_report`], the destinations' strings interned in `strings`.
    pub fn from_report_with(spec: &KeepaliveNodeReportSpec, strings: &mut Strings) -> Self {
        // The schema bounds both; a report from before the bounds is clamped to them.
        let heartbeat = spec.heartbeat_seconds.clamp(1, MAX_HEARTBEAT_SECONDS);
        let refresh = spec
            .refresh_seconds
            .map_or(heartbeat, |r| r.clamp(heartbeat, MAX_REFRESH_SECONDS));
        let stale = |seconds: i32| SignedDuration::from_secs(i64::from(seconds) * i64::from(STALE_AFTER_HEARTBEATS));
        NodeLive {
            last_scan: spec.last_scan.0,
            stale_after: stale(heartbeat),
            refresh_stale_after: stale(refresh),
            node_sysctls: spec.node_sysctls,
            pods: spec
                .pods
                .iter()
                .map(|p| {
                    let reading = PodReading {
                        sysctls: p.sysctls,
                        established: p.established.max(0) as u32,
                        keepalive: p.keepalive.max(0) as u32,
                        sockets: p.sockets.clone().map(|s| Sockets::new(s, strings)),
                        error: p.error.as_deref().map(Arc::from),
                    };
                    (parse_uid(&p.uid), reading)
                })
                .collect(),
        }
    }
}

/// A node report as this replica holds it: the report, when this replica last heard from its agent (the report
/// or a heartbeat since, by its own clock), whether it was fresh at the last look, and how many reports and
/// heartbeats of the node it has received (to tell a pod the agent cannot find from one it has not scanned yet:
/// an agent renews its heartbeat only after a scan that found nothing new to write).
#[derive(Clone, Debug)]
struct NodeState {
    live: Arc<NodeLive>,
    received: Timestamp,
    fresh: bool,
    reports: u32,
}

impl NodeState {
    fn fresh_at(&self, now: Timestamp, heartbeats_read: bool) -> bool {
        let after = if heartbeats_read {
            self.live.stale_after
        } else {
            self.live.refresh_stale_after
        };
        now.duration_since(self.received) <= after
    }
}

/// A pod's place in the tallies: the policy that owns it, when it does not conform why, whether its live values
/// were read and match, and its connections (when read).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Owned {
    policy: Arc<str>,
    reason: Option<Reason>,
    verified: bool,
    connections: Option<PodConnections>,
}

/// A pod's connections as read by its node's agent: counted, and classified where read socket by socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PodConnections {
    established: u32,
    keepalive: u32,
    classes: Option<Classes>,
}

/// The judgement of one pod against the policy that owns it.
struct Judgement<'p> {
    policy: &'p PolicyEntry,
    verdict: Verdict,
    verified: bool,
    connections: Option<PodConnections>,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Tally {
    matched: i32,
    conformant: i32,
    live_verified: i32,
    /// Pods with a live reading, and the sums of their connection counts.
    read: i32,
    established: i64,
    keepalive: i64,
    /// The connections classified per socket, by class.
    classes: ConnectionCounts,
    /// Pods by their worst dead-peer time (a multiset: pods come and go).
    dead_peer: BTreeMap<i64, u32>,
    by_reason: BTreeMap<Reason, i32>,
    /// Non-conformant pods, sorted: the first ones become the status' violations.
    violating: BTreeSet<PodKey>,
}

/// What the status of one policy reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub matched: i32,
    pub conformant: i32,
    pub live_verified: i32,
    /// `None` while no matched pod has a live reading.
    pub connections: Option<ConnectionCounts>,
    pub by_reason: BTreeMap<Reason, i32>,
    pub violations: Vec<Violation>,
}

/// The conformance of every pod to its policy.
#[derive(Default)]
pub struct Conformance {
    interner: Interner,
    cluster: ClusterFacts,
    policies: Arc<PolicySet>,
    namespaces: HashMap<String, BTreeMap<String, String>>,
    pods: HashMap<PodKey, (CachedPod, Option<Owned>)>,
    /// The pods of each node, to judge them again when the node's report changes.
    by_node: HashMap<Arc<str>, HashSet<PodKey>>,
    /// Node reports (trusted ones only: the status writer checks they belong to the current Node).
    nodes: HashMap<Arc<str>, NodeState>,
    /// Node → kubelet version, of the nodes whose kubelet rejects the keepalive sysctls (only those).
    old_kubelets: HashMap<Arc<str>, Arc<str>>,
    /// RuntimeClass name → handler, and the handlers whose pods the agent can read.
    runtime_classes: HashMap<String, String>,
    runc_like: HashSet<String>,
    tallies: HashMap<Arc<str>, Tally>,
    dirty: HashSet<Arc<str>>,
    /// This replica reads the agents' heartbeat Leases: a report is fresh while its agent renews its Lease.
    heartbeats_read: bool,
}

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

impl Conformance {
    pub fn new(cluster: ClusterFacts) -> Self {
        Conformance {
            cluster,
            runc_like: RUNC_LIKE_HANDLERS.iter().map(|h| h.to_string()).collect(),
            ..Default::default()
        }
    }

    /// The RuntimeClass handlers whose pods the agent can read (default [`RUNC_LIKE_HANDLERS`]).
    pub fn set_runc_like_handlers(&mut self, handlers: impl IntoIterator<Item = String>) {
        self.runc_like = handlers.into_iter().collect();
        self.recompute_all();
    }

    /// The cluster's RuntimeClasses (name → handler) changed: pods with a runtime class are judged again.
    pub fn set_runtime_classes(&mut self, classes: HashMap<String, String>) {
        if self.runtime_classes == classes {
            return;
        }
        self.runtime_classes = classes;
        let keys: Vec<PodKey> = self
            .pods
            .iter()
            .filter(|(_, (p, _))| p.runtime_class.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            if let Some((pod, _)) = self.pods.get(&key) {
                let pod = pod.clone();
                self.upsert_pod(pod);
            }
        }
    }

    /// What the controller keeps of a watched Pod: everything the report does not need is dropped here, at ingest.
    pub fn cached(&mut self, pod: Pod) -> Option<CachedPod> {
        let meta = pod.metadata;
        let spec = pod.spec.unwrap_or_default();
        let i = &mut self.interner;
        // A static pod runs under its config hash; its mirror pod, which the apiserver holds, has another UID.
        let mirror = meta.annotations.as_ref().and_then(|a| a.get(MIRROR_ANNOTATION));
        let uid = mirror.or(meta.uid.as_ref());
        Some(CachedPod {
            uid: uid.map(|u| parse_uid(u)).unwrap_or(0),
            namespace: i.str(meta.namespace.as_deref()?),
            name: Arc::from(meta.name?.as_str()),
            labels: i.labels(meta.labels.unwrap_or_default()),
            node: spec.node_name.as_deref().map(|n| i.str(n)),
            host_network: spec.host_network.unwrap_or(false),
            windows: spec.os.is_some_and(|os| os.name == "windows"),
            sysctls: i.sysctls(spec.security_context.and_then(|sc| sc.sysctls).unwrap_or_default()),
            applied_policy: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(policy::POLICY_ANNOTATION))
                .map(|p| i.str(p)),
            phase: pod.status.and_then(|s| s.phase).map(|p| i.str(&p)),
            runtime_class: spec.runtime_class_name.as_deref().map(|r| i.str(r)),
            running_since_report: None,
        })
    }

    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    pub fn pods(&self) -> impl Iterator<Item = &CachedPod> {
        self.pods.values().map(|(p, _)| p)
    }

    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }

    fn judge(&self, pod: &CachedPod) -> Option<Owned> {
        let j = self.evaluate(pod, false)?;
        let reason = match j.verdict {
            Verdict::Conformant => None,
            Verdict::Violation { reason, .. } => Some(reason),
        };
        Some(Owned {
            policy: self.policy_name(&j.policy.name),
            reason,
            verified: j.verified,
            connections: j.connections,
        })
    }

    /// The policy that owns the pod and the verdict: by the pod spec, then by the live reading of a fresh node
    /// report when there is one.
    /// Without `messages`, a violation's message may be left empty where building it costs (the tallies only
    /// count reasons).
    fn evaluate(&self, pod: &CachedPod, messages: bool) -> Option<Judgement<'_>> {
        if pod.terminated() {
            return None;
        }
        let labels = self.namespaces.get(&*pod.namespace).unwrap_or(&NO_LABELS);
        let kubelet = pod.node.as_deref().and_then(|node| {
            let version = self.old_kubelets.get(node)?;
            Some(Kubelet { node, version })
        });
        let facts = pod.facts().on(kubelet);
        let decision = policy::decide(&self.policies, labels, &facts, self.cluster);
        let (entry, verdict) = policy::assess(&decision, &facts)?;
        let mut judgement = Judgement {
            policy: entry,
            verdict,
            verified: false,
            connections: None,
        };
        if let Verdict::Violation {
            reason: Reason::KubeletTooOld,
            ..
        } = judgement.verdict
        {
            // The kubelet rejects a pod carrying the sysctls: whatever the agent reads, the policy's values do not
            // reach pods on this node.
            return Some(judgement);
        }
        let Some((node_name, state)) = pod
            .node
            .as_ref()
            .and_then(|n| self.nodes.get(n).filter(|s| s.fresh).map(|s| (n, s)))
        else {
            // No agent reports for this node: the pod spec is all there is.
            return Some(judgement);
        };
        let node = &state.live;
        let wanted = &entry.spec.keepalive;
        if pod.host_network {
            // hostNetwork pods share the node's namespace: nothing was injected, the node's values are what count.
            match node.node_sysctls {
                Some(live) if policy::live_differences(wanted, &live).is_empty() => {
                    judgement.verdict = Verdict::Conformant;
                    judgement.verified = true;
                }
                Some(live) => {
                    if let Verdict::Violation { message, .. } = &mut judgement.verdict {
                        message.push_str(&format!(
                            "; node {node_name} runs with {}",
                            policy::live_differences(wanted, &live).join(", ")
                        ));
                    }
                }
                None => {}
            }
            return Some(judgement);
        }
        if let Some(class) = &pod.runtime_class {
            let handler = self.runtime_classes.get(&**class);
            if !handler.is_some_and(|h| self.runc_like.contains(h)) {
                // The agent reads the host side of the sandbox, not the namespace the workload uses.
                if matches!(judgement.verdict, Verdict::Conformant) {
                    judgement.verdict = Verdict::Violation {
                        reason: Reason::Unverified,
                        message: match handler {
                            Some(h) => format!(
                                "sandboxed runtime: RuntimeClass {class} (handler {h}) runs the pod in a sandbox whose \
                                 network namespace the agent cannot read"
                            ),
                            None => format!("sandboxed runtime: RuntimeClass {class} is unknown to the operator"),
                        },
                    };
                }
                return Some(judgement);
            }
        }
        let reading = node.pods.get(&pod.uid);
        let bound = IdleBound::from_policy(&entry.spec);
        judgement.connections = reading.filter(|r| r.sysctls.is_some()).map(|r| PodConnections {
            established: r.established,
            keepalive: r.keepalive,
            classes: r.sockets.as_ref().map(|s| Classes::of(s.groups(), bound)),
        });
        match (reading.and_then(|r| r.sysctls), &judgement.verdict) {
            // The kernel holds the policy's values: conformant, whatever the spec says.
            (Some(live), _) if policy::live_differences(wanted, &live).is_empty() => {
                judgement.verified = true;
                // The values are right; whether the connections will survive is the sockets' business.
                let unprotected = judgement
                    .connections
                    .and_then(|c| c.classes)
                    .is_some_and(|c| c.unprotected() > 0);
                judgement.verdict = match reading.and_then(|r| r.sockets.as_ref()) {
                    Some(sockets) if unprotected => Verdict::Violation {
                        reason: Reason::ConnectionsUnprotected,
                        // The destinations are named from the whole summary, built only for a message.
                        message: match messages
                            .then(|| policy::connection::unprotected_message(&sockets.summary(), bound))
                            .flatten()
                        {
                            Some(message) => format!("{message} (read by the agent on node {node_name})"),
                            None => String::new(),
                        },
                    },
                    _ => Verdict::Conformant,
                };
            }
            (Some(live), Verdict::Conformant) => {
                judgement.verdict = Verdict::Violation {
                    reason: Reason::LiveMismatch,
                    message: format!(
                        "the pod spec has the policy's values but its network namespace holds {} (read by the \
                         agent on node {node_name})",
                        policy::live_differences(wanted, &live).join(", ")
                    ),
                };
            }
            (None, Verdict::Conformant) => {
                let missing = reading.is_none()
                    && pod
                        .running_since_report
                        .is_some_and(|since| state.reports >= since.saturating_add(MISSING_AFTER_REPORTS));
                judgement.verdict = match reading.and_then(|r| r.error.as_deref()) {
                    Some(error) => Verdict::Violation {
                        reason: Reason::Unverified,
                        message: format!("the agent on node {node_name} could not read the pod: {error}"),
                    },
                    None if missing => Verdict::Violation {
                        reason: Reason::Unverified,
                        message: format!(
                            "the agent on node {node_name} found no process of the pod, which is running (reports \
                             and heartbeats received since: {})",
                            state.reports - pod.running_since_report.unwrap_or(0)
                        ),
                    },
                    None => Verdict::Violation {
                        reason: AWAITING,
                        message: format!(
                            "not read yet by the agent on node {node_name} (the pod is new, or its sandbox is not \
                             running yet)"
                        ),
                    },
                };
            }
            // A pod that does not conform by its spec keeps that (more telling) reason.
            _ => {}
        }
        Some(judgement)
    }

    /// The shared name of a policy of the current set (one allocation per policy, not per pod).
    fn policy_name(&self, name: &str) -> Arc<str> {
        self.tallies
            .get_key_value(name)
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| Arc::from(name))
    }

    fn count(&mut self, key: &PodKey, owned: &Owned, sign: i32) {
        let tally = self.tallies.entry(owned.policy.clone()).or_default();
        tally.matched += sign;
        if owned.verified {
            tally.live_verified += sign;
        }
        if let Some(c) = owned.connections {
            tally.read += sign;
            tally.established += i64::from(sign) * i64::from(c.established);
            tally.keepalive += i64::from(sign) * i64::from(c.keepalive);
            if let Some(classes) = c.classes {
                classes.add_to(&mut tally.classes, i64::from(sign));
                if let Some(worst) = classes.worst_dead_peer_seconds {
                    let n = tally.dead_peer.entry(worst).or_default();
                    *n = n.saturating_add_signed(sign);
                    if *n == 0 {
                        tally.dead_peer.remove(&worst);
                    }
                }
            }
        }
        match owned.reason {
            None => tally.conformant += sign,
            Some(reason) => {
                let n = tally.by_reason.entry(reason).or_default();
                *n += sign;
                if *n == 0 {
                    tally.by_reason.remove(&reason);
                }
                if sign > 0 {
                    tally.violating.insert(key.clone());
                } else {
                    tally.violating.remove(key);
                }
            }
        }
        self.dirty.insert(owned.policy.clone());
    }

    /// A pod was created or changed: only its own (old and new) policies are recomputed.
    pub fn upsert_pod(&mut self, mut pod: CachedPod) {
        let key = pod.key();
        pod.running_since_report = self.running_since_report(&pod);
        let owned = self.judge(&pod);
        if let Some((old_pod, old)) = self.pods.remove(&key) {
            if old_pod.node != pod.node {
                self.unindex(&key, old_pod.node.as_ref());
                self.index(&key, pod.node.as_ref());
            }
            if let Some(old) = old {
                self.count(&key, &old, -1);
            }
        } else {
            self.index(&key, pod.node.as_ref());
        }
        if let Some(new) = &owned {
            self.count(&key, new, 1);
        }
        self.pods.insert(key, (pod, owned));
    }

    pub fn remove_pod(&mut self, key: &PodKey) {
        if let Some((pod, old)) = self.pods.remove(key) {
            self.unindex(key, pod.node.as_ref());
            if let Some(old) = old {
                self.count(key, &old, -1);
            }
        }
    }

    fn index(&mut self, key: &PodKey, node: Option<&Arc<str>>) {
        if let Some(node) = node {
            self.by_node.entry(node.clone()).or_default().insert(key.clone());
        }
    }

    fn unindex(&mut self, key: &PodKey, node: Option<&Arc<str>>) {
        if let Some(node) = node
            && let Some(keys) = self.by_node.get_mut(node)
        {
            keys.remove(key);
            if keys.is_empty() {
                self.by_node.remove(node);
            }
        }
    }

    /// For a pod as it arrives: the report count of its node when it was first seen running on that node (kept
    /// from the pod as held, else now); `None` while it is not running.
    fn running_since_report(&self, pod: &CachedPod) -> Option<u32> {
        if pod.phase.as_deref() != Some("Running") {
            return None;
        }
        let node = pod.node.as_deref()?;
        match self.pods.get(&pod.key()) {
            Some((old, _)) if old.node == pod.node && old.running_since_report.is_some() => old.running_since_report,
            _ => Some(self.nodes.get(node).map_or(0, |s| s.reports)),
        }
    }

    /// Replaces all pods (a watch relist).
    pub fn replace_pods(&mut self, pods: impl IntoIterator<Item = CachedPod>) {
        let mut pods: Vec<CachedPod> = pods.into_iter().collect();
        for pod in &mut pods {
            pod.running_since_report = self.running_since_report(pod);
        }
        self.pods = pods.into_iter().map(|p| (p.key(), (p, None))).collect();
        self.by_node.clear();
        for (key, (pod, _)) in &self.pods {
            if let Some(node) = &pod.node {
                self.by_node.entry(node.clone()).or_default().insert(key.clone());
            }
        }
        self.recompute_all();
    }

    /// A node report was received at `now` (this replica's clock): the pods of that node are judged again. The
    /// same report again (a relist, a repeated event) changes nothing.
    pub fn set_node_report(&mut self, node: &str, live: impl Into<Arc<NodeLive>>, now: Timestamp) {
        let live = live.into();
        if self.nodes.get(node).is_some_and(|old| old.live == live) {
            return;
        }
        let node: Arc<str> = self.interner.str(node);
        let reports = self.nodes.get(&node).map_or(0, |s| s.reports).saturating_add(1);
        let state = NodeState {
            live,
            received: now,
            fresh: true,
            reports,
        };
        self.nodes.insert(node.clone(), state);
        self.recompute_node(&node);
    }

    /// The agent of `node` renewed its heartbeat Lease, seen at `now` (this replica's clock): its report, if
    /// held, is confirmed by a scan newer than the report. The node's pods are judged again only if that changes
    /// something (the report was stale, or a running pod is still missing from it).
    pub fn node_heartbeat(&mut self, node: &str, now: Timestamp) {
        let Some(state) = self.nodes.get_mut(node) else {
            return;
        };
        state.received = now;
        state.reports = state.reports.saturating_add(1);
        let was_fresh = std::mem::replace(&mut state.fresh, true);
        let live = state.live.clone();
        let awaited = self.by_node.get(node).into_iter().flatten().any(|key| {
            self.pods
                .get(key)
                .is_some_and(|(pod, _)| pod.running_since_report.is_some() && !live.pods.contains_key(&pod.uid))
        });
        if !was_fresh || awaited {
            self.recompute_node(node);
        }
    }

    /// Whether this replica reads the agents' heartbeat Leases (else a report is judged stale after three of its
    /// refreshes, not three heartbeats).
    pub fn set_heartbeats_read(&mut self, read: bool) {
        self.heartbeats_read = read;
    }

    pub fn remove_node_report(&mut self, node: &str) {
        if let Some((name, _)) = self.nodes.remove_entry(node) {
            self.recompute_node(&name);
        }
    }

    /// Replaces all node reports (a watch relist): the pods of every node that had or has a report are judged
    /// again, once.
    pub fn replace_node_reports<L: Into<Arc<NodeLive>>>(
        &mut self,
        reports: impl IntoIterator<Item = (String, L)>,
        now: Timestamp,
    ) {
        let mut touched: HashSet<Arc<str>> = self.nodes.keys().cloned().collect();
        let mut old = std::mem::take(&mut self.nodes);
        self.nodes = reports
            .into_iter()
            .map(|(name, live)| {
                let live = live.into();
                let state = match old.remove(name.as_str()) {
                    // Unchanged: still the report received then.
                    Some(state) if state.live == live => state,
                    previous => NodeState {
                        live,
                        received: now,
                        fresh: true,
                        reports: previous.map_or(0, |s| s.reports).saturating_add(1),
                    },
                };
                (self.interner.str(&name), state)
            })
            .collect();
        touched.extend(self.nodes.keys().cloned());
        for name in touched {
            self.recompute_node(&name);
        }
    }

    /// Reports that went stale since the last look (or fresh again): their nodes' pods are judged again.
    pub fn expire_node_reports(&mut self, now: Timestamp) {
        let heartbeats_read = self.heartbeats_read;
        let flipped: Vec<Arc<str>> = self
            .nodes
            .iter_mut()
            .filter_map(|(name, state)| {
                let now_fresh = state.fresh_at(now, heartbeats_read);
                (now_fresh != state.fresh).then(|| {
                    state.fresh = now_fresh;
                    name.clone()
                })
            })
            .collect();
        for name in flipped {
            self.recompute_node(&name);
        }
    }

    /// A node's kubelet version, `None` when unknown or the node is gone. Only the kubelets that reject the
    /// keepalive sysctls are held; when that (or the version) changes, the node's pods are judged again.
    pub fn set_kubelet(&mut self, node: &str, version: Option<&str>) {
        let old = version.filter(|v| policy::kubelet_rejects_keepalive_sysctls(v));
        if self.old_kubelets.get(node).map(|v| &**v) == old {
            return;
        }
        let node = self.interner.str(node);
        match old {
            Some(version) => {
                let version = self.interner.str(version);
                self.old_kubelets.insert(node.clone(), version);
            }
            None => {
                self.old_kubelets.remove(&node);
            }
        }
        self.recompute_node(&node);
    }

    /// Replaces every node's kubelet version (a Node watch relist): the pods of nodes whose entry changed are
    /// judged again, once.
    pub fn replace_kubelets<'a>(&mut self, kubelets: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let mut before = std::mem::take(&mut self.old_kubelets);
        let mut touched = Vec::new();
        for (node, version) in kubelets {
            if !policy::kubelet_rejects_keepalive_sysctls(version) {
                continue;
            }
            let node = self.interner.str(node);
            let version = match before.remove(&node) {
                Some(held) if &*held == version => held,
                _ => {
                    touched.push(node.clone());
                    self.interner.str(version)
                }
            };
            self.old_kubelets.insert(node, version);
        }
        // Nodes gone, or whose kubelet no longer rejects the sysctls.
        touched.extend(before.into_keys());
        for node in touched {
            self.recompute_node(&node);
        }
    }

    fn recompute_node(&mut self, node: &str) {
        let keys: Vec<PodKey> = self.by_node.get(node).into_iter().flatten().cloned().collect();
        for key in keys {
            if let Some((pod, _)) = self.pods.get(&key) {
                let pod = pod.clone();
                self.upsert_pod(pod);
            }
        }
    }

    /// New policies: every pod is judged again.
    pub fn set_policies(&mut self, policies: Arc<PolicySet>) {
        self.policies = policies;
        self.recompute_all();
    }

    /// A namespace's labels changed (or it appeared): its pods are judged again.
    pub fn set_namespace(&mut self, name: &str, labels: BTreeMap<String, String>) {
        if self.namespaces.get(name) == Some(&labels) {
            return;
        }
        self.namespaces.insert(name.to_string(), labels);
        self.recompute_namespace(name);
    }

    /// A namespace is gone: its pods (if any are left) are judged with no namespace labels.
    pub fn remove_namespace(&mut self, name: &str) {
        if self.namespaces.remove(name).is_some() {
            self.recompute_namespace(name);
        }
    }

    pub fn replace_namespaces(&mut self, namespaces: impl IntoIterator<Item = (String, BTreeMap<String, String>)>) {
        self.namespaces = namespaces.into_iter().collect();
        self.recompute_all();
    }

    fn recompute_namespace(&mut self, name: &str) {
        let keys: Vec<PodKey> = self.pods.keys().filter(|(ns, _)| &**ns == name).cloned().collect();
        for key in keys {
            if let Some((pod, _)) = self.pods.get(&key) {
                let pod = pod.clone();
                self.upsert_pod(pod);
            }
        }
    }

    /// Judges every pod again from scratch.
    pub fn recompute_all(&mut self) {
        self.tallies = self
            .policies
            .entries()
            .iter()
            .map(|e| (Arc::from(e.name.as_str()), Tally::default()))
            .collect();
        let keys: Vec<PodKey> = self.pods.keys().cloned().collect();
        for key in keys {
            let owned = self.judge(&self.pods[&key].0);
            if let Some(o) = &owned {
                self.count(&key, o, 1);
            }
            self.pods.get_mut(&key).expect("a key of the map").1 = owned;
        }
        // Every policy's summary is new, also those that match no pod.
        self.dirty = self.tallies.keys().cloned().collect();
        self.interner.sweep();
    }

    /// Policies whose summary may have changed since the last call.
    pub fn take_dirty(&mut self) -> Vec<Arc<str>> {
        self.dirty.drain().collect()
    }

    /// What the status of `policy` reports; `None` if the policy is not in the current set.
    pub fn summary(&self, policy: &str) -> Option<Summary> {
        self.policies.get(policy)?;
        let tally = self.tallies.get(policy).cloned().unwrap_or_default();
        let violations = tally
            .violating
            .iter()
            .take(MAX_VIOLATIONS)
            .filter_map(|key| {
                let (pod, _) = self.pods.get(key)?;
                match self.evaluate(pod, true)?.verdict {
                    Verdict::Violation { reason, message } => Some(Violation {
                        namespace: pod.namespace.to_string(),
                        name: pod.name.to_string(),
                        reason: reason.to_string(),
                        message: truncated(message, MAX_VIOLATION_MESSAGE_CHARS),
                    }),
                    _ => None,
                }
            })
            .collect();
        Some(Summary {
            matched: tally.matched,
            conformant: tally.conformant,
            live_verified: tally.live_verified,
            connections: (tally.read > 0).then_some(ConnectionCounts {
                established: tally.established,
                keepalive: tally.keepalive,
                worst_dead_peer_seconds: tally.dead_peer.last_key_value().map(|(s, _)| *s),
                ..tally.classes
            }),
            by_reason: tally.by_reason.clone(),
            violations,
        })
    }
}

/// `text` cut to at most `max` characters (with an ellipsis when cut).
pub fn truncated(mut text: String, max: usize) -> String {
    if let Some((at, _)) = text.char_indices().nth(max) {
        let keep = text[..at]
            .char_indices()
            .nth(max.saturating_sub(1))
            .map_or(0, |(i, _)| i);
        text.truncate(keep);
        text.push('…');
    }
    text
}

/// Fed by the pod watch through [`crate::runtime::watch::Relist`].
impl Index<Pod> for Conformance {
    type Entry = CachedPod;

    fn entry(&mut self, pod: Pod) -> Option<CachedPod> {
        self.cached(pod)
    }
    fn apply(&mut self, pod: CachedPod) {
        self.upsert_pod(pod);
    }
    fn delete(&mut self, pod: Pod) {
        if let (Some(ns), Some(name)) = (pod.metadata.namespace, pod.metadata.name) {
            self.remove_pod(&(Arc::from(ns.as_str()), Arc::from(name.as_str())));
        }
    }
    fn reset(&mut self, pods: Vec<CachedPod>) {
        self.replace_pods(pods);
    }
}

#[cfg(test)]
mod tests;
