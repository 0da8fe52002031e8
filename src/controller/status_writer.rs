//! The status writer, the conformance controller's I/O shell: feeds [`Conformance`] from the pod and node report
//! watches and the shared caches, and (on the leader only) writes each changed policy status by server-side
//! apply — only when the report changed, at most once per [`MIN_WRITE_INTERVAL`] per policy — with an Event on
//! every condition transition. It also binds node reports to their Nodes ([`NodeReports`]): stamps each with
//! an ownerReference to its Node and deletes reports whose Node is gone or was re-created. From the same Node
//! watch it tells [`Conformance`] which nodes run a kubelet that rejects the keepalive sysctls.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{Node, Pod},
        node::v1::RuntimeClass,
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::{
        WatchStreamExt,
        events::{Event, EventType, Recorder, Reporter},
        watcher,
    },
};
use tokio::sync::watch;

use super::{
    caches::{Caches, NamespaceChanges},
    conformance::{self, Conformance},
    injection,
    leader::Leadership,
    metrics::{Cache, ControllerMetrics, PodState, WriteOutcome},
    node_reports::{Beats, Heartbeats, NodeReports, Reports, Trust},
};
use crate::{
    api::{HEARTBEAT_LABEL, KeepaliveNodeReport, KeepalivePolicy, KeepalivePolicyStatus, OPERATOR_MANAGER},
    policy::{ClusterFacts, Reason, connection::Protection},
    runtime::watch::{Index, Relist},
};

/// A policy's status is written at most this often, however fast its pods churn.
pub const MIN_WRITE_INTERVAL: Duration = Duration::from_secs(3);
const TICK: Duration = Duration::from_millis(500);
/// One status write gets this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// A stamp or deletion of one node report is not repeated sooner than this.
const REPORT_ACTION_INTERVAL: Duration = Duration::from_secs(10);

pub struct StatusWriter {
    client: Client,
    caches: Arc<Caches>,
    cluster: ClusterFacts,
    metrics: ControllerMetrics,
    recorder: Recorder,
    state: Conformance,
    /// Node reports cannot be read (no CRD, no permission): pods are judged by their spec.
    reports_unreadable: bool,
    /// Policies waiting for a write, and when each was last written.
    pending: std::collections::HashSet<Arc<str>>,
    last_write: HashMap<Arc<str>, Instant>,
    /// What this replica last wrote or saw, per policy: to skip unchanged writes and detect transitions.
    last_status: HashMap<String, KeepalivePolicyStatus>,
    runc_like: Vec<String>,
    /// Nodes and node reports, and which reports to trust.
    reports: NodeReports,
    /// Node reports stamped or deleted lately, and when.
    report_actions: HashMap<String, Instant>,
    /// How each policy's pods are mutated (the `Injected` condition), from the injection task.
    injection: injection::Reports,
    /// The agents' namespace, where they renew their heartbeat Leases; `None`: reports alone are heard.
    agent_namespace: Option<String>,
}

impl StatusWriter {
    pub fn new(
        client: Client,
        caches: Arc<Caches>,
        cluster: ClusterFacts,
        runc_like: Vec<String>,
        metrics: ControllerMetrics,
        injection: injection::Reports,
        agent_namespace: Option<String>,
    ) -> Self {
        let instance = std::env::var("POD_NAME").ok();
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: OPERATOR_MANAGER.into(),
                instance,
            },
        );
        StatusWriter {
            client,
            caches,
            cluster,
            metrics,
            recorder,
            state: Self::fresh_state(cluster, &runc_like),
            reports_unreadable: false,
            pending: Default::default(),
            last_write: Default::default(),
            last_status: Default::default(),
            runc_like,
            reports: NodeReports::default(),
            report_actions: Default::default(),
            injection,
            agent_namespace,
        }
    }

    fn fresh_state(cluster: ClusterFacts, runc_like: &[String]) -> Conformance {
        let mut state = Conformance::new(cluster);
        state.set_runc_like_handlers(runc_like.iter().cloned());
        state
    }

    /// Runs until `shutdown` fires. Only while this replica leads does it watch pods and node reports (a
    /// follower's memory does not grow with the cluster's pods); policies and namespaces come from the shared
    /// caches. Losing the lead drops everything the leader held.
    pub async fn run(mut self, mut leading: Leadership, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                led = leading.acquired() => if !led { return },
                _ = shutdown.changed() => return,
            }
            let go_on = self.lead(&mut leading, &mut shutdown).await;
            self.state = Self::fresh_state(self.cluster, &self.runc_like);
            self.reports = NodeReports::default();
            self.report_actions.clear();
            self.reports_unreadable = false;
            self.pending.clear();
            self.last_write.clear();
            self.last_status.clear();
            self.metrics.cache_objects(Cache::Pods, 0);
            if !go_on {
                return;
            }
            tracing::info!("no longer leading: pod and node report watches stopped");
        }
    }

    /// One term as leader: returns `true` when the lead is lost, `false` on shutdown or when a watch ends.
    async fn lead(&mut self, leading: &mut Leadership, shutdown: &mut watch::Receiver<bool>) -> bool {
        let pods = watcher(Api::<Pod>::all(self.client.clone()), watcher::Config::default()).default_backoff();
        let mut pods = std::pin::pin!(pods);
        let mut pod_relist = Relist::default();
        let reports = watcher(
            Api::<KeepaliveNodeReport>::all(self.client.clone()),
            watcher::Config::default(),
        )
        .default_backoff();
        let mut reports = std::pin::pin!(reports);
        let mut report_relist = Relist::default();
        // Whole Nodes (their kubelet version is in the status), each reduced at once to a `NodeEntry`.
        let nodes = watcher(Api::<Node>::all(self.client.clone()), watcher::Config::default()).default_backoff();
        let mut nodes = std::pin::pin!(nodes);
        let mut node_relist = Relist::default();
        let classes = watcher(
            Api::<RuntimeClass>::all(self.client.clone()),
            watcher::Config::default(),
        )
        .default_backoff();
        let mut classes = std::pin::pin!(classes);
        let mut class_relist = Relist::default();
        let mut runtime_classes = RuntimeClasses::default();
        // The agents' heartbeat Leases (a few hundred bytes each), where the operator knows their namespace.
        let leases = match &self.agent_namespace {
            Some(namespace) => watcher(
                Api::<Lease>::namespaced(self.client.clone(), namespace),
                watcher::Config::default().labels(&format!("{HEARTBEAT_LABEL}=true")),
            )
            .default_backoff()
            .boxed(),
            None => futures::stream::pending().boxed(),
        };
        let mut leases = std::pin::pin!(leases);
        let mut lease_relist = Relist::default();
        let mut heartbeats = Heartbeats::default();
        self.state.set_heartbeats_read(self.agent_namespace.is_some());
        let mut touched = Vec::new();
        let mut tick = tokio::time::interval(TICK);
        let mut changes = self.caches.subscribe();
        let mut policies = crate::webhook::Lookup::policies(&*self.caches);
        self.state.set_policies(policies.clone());
        self.state.replace_namespaces(self.caches.all_namespaces());
        loop {
            tokio::select! {
                event = pods.next() => match event {
                    Some(Ok(event)) => {
                        pod_relist.handle(&mut self.state, event);
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "pod watch failed; retrying"),
                    None => return false,
                },
                event = reports.next() => match event {
                    Some(Ok(event)) => {
                        let mut index = Reports { reports: &mut self.reports, touched: &mut touched };
                        report_relist.handle(&mut index, event);
                        self.sync_reports(&mut touched, leading).await;
                    }
                    Some(Err(e)) => {
                        // Without the node report CRD (no agents installed) or the right to read it, pods are judged
                        // by their spec alone rather than not at all.
                        if !report_relist.synced() && !self.reports_unreadable && is_absent_or_forbidden(&e) {
                            tracing::warn!(error = %e, "cannot read KeepaliveNodeReports: judging pods by spec only");
                            self.reports_unreadable = true;
                        } else {
                            tracing::warn!(error = %e, "node report watch failed; retrying");
                        }
                    }
                    None => return false,
                },
                event = leases.next() => match event {
                    Some(Ok(event)) => {
                        let mut heard = Vec::new();
                        lease_relist.handle(&mut Beats { heartbeats: &mut heartbeats, heard: &mut heard }, event);
                        let now = Timestamp::now();
                        for node in heard {
                            // Only the agent of a node may write its Lease (the chart's admission policy), and only
                            // a trusted report is held: a heartbeat of any other is nothing.
                            if self.reports.trust(&node) == Some(Trust::Trusted) {
                                self.state.node_heartbeat(&node, now);
                            }
                        }
                    }
                    Some(Err(e)) => {
                        if !lease_relist.synced() && is_absent_or_forbidden(&e) {
                            tracing::warn!(error = %e, "cannot read the agents' heartbeat Leases: node reports are \
                                judged stale after three of their refreshes rather than three heartbeats");
                            self.state.set_heartbeats_read(false);
                        } else {
                            tracing::warn!(error = %e, "heartbeat Lease watch failed; retrying");
                        }
                    }
                    None => return false,
                },
                event = nodes.next() => match event {
                    Some(Ok(event)) => {
                        let mut index = Nodes {
                            reports: &mut self.reports,
                            conformance: &mut self.state,
                            touched: &mut touched,
                        };
                        node_relist.handle(&mut index, event);
                        self.sync_reports(&mut touched, leading).await;
                    }
                    Some(Err(e)) => {
                        if !node_relist.synced() && !self.reports.nodes_synced() && is_absent_or_forbidden(&e) {
                            tracing::warn!(error = %e, "cannot list Nodes: node reports are trusted by name, \
                                reports of deleted nodes are not removed, and pods are judged by the apiserver's \
                                version rather than their node's kubelet version");
                            self.reports.set_nodes_unreadable();
                            touched.extend(self.reports.names());
                            self.sync_reports(&mut touched, leading).await;
                        } else {
                            tracing::warn!(error = %e, "node watch failed; retrying");
                        }
                    }
                    None => return false,
                },
                event = classes.next() => match event {
                    Some(Ok(event)) => {
                        class_relist.handle(&mut runtime_classes, event);
                        self.state.set_runtime_classes(runtime_classes.0.clone());
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "RuntimeClass watch failed; retrying"),
                    None => return false,
                },
                _ = changes.changed() => {
                    let current = crate::webhook::Lookup::policies(&*self.caches);
                    tracing::debug!(policies = current.len(), "caches changed");
                    if !Arc::ptr_eq(&current, &policies) {
                        policies = current.clone();
                        self.state.set_policies(current);
                    }
                    match self.caches.take_namespace_changes() {
                        NamespaceChanges::All(all) => self.state.replace_namespaces(all),
                        NamespaceChanges::Some(changes) => {
                            for (labels, name) in changes {
                                match labels {
                                    Some(labels) => self.state.set_namespace(&name, labels),
                                    None => self.state.remove_namespace(&name),
                                }
                            }
                        }
                    }
                }
                Ok(()) = self.injection.changed() => {
                    // Every policy's `Injected` condition may have changed.
                    self.pending.extend(self.state.policies().entries().iter().map(|e| Arc::from(e.name.as_str())));
                }
                _ = leading.lost() => return true,
                _ = tick.tick() => {
                    // Stamps and deletions that failed or were held back are tried again.
                    self.report_actions.retain(|_, at| at.elapsed() < REPORT_ACTION_INTERVAL);
                    touched.extend(self.reports.unsettled());
                    self.sync_reports(&mut touched, leading).await;
                    self.metrics.cache_objects(Cache::Pods, self.state.pod_count());
                    self.state.expire_node_reports(Timestamp::now());
                    let leader = leading.is_leading_now();
                    let reports_synced = report_relist.synced() || self.reports_unreadable;
                    // Nodes listed (or unreadable): a pod on an old kubelet is not first reported as something else.
                    let nodes_synced = self.reports.nodes_synced();
                    let caches_ready = crate::webhook::Lookup::ready(&*self.caches);
                    // The injection task has said how pods are mutated (its first write done or failed).
                    let injection_known = self.injection.borrow().mode.is_some();
                    if leader && pod_relist.synced() && reports_synced && nodes_synced && caches_ready && injection_known {
                        self.write_statuses(leading).await;
                    }
                }
                _ = shutdown.changed() => return false,
            }
        }
    }

    /// Feeds the conformance state the reports named in `touched` that are trusted, withdraws the others, and
    /// (leader only) stamps unstamped reports with their Node's UID and deletes reports of gone or re-created
    /// Nodes.
    async fn sync_reports(&mut self, touched: &mut Vec<String>, leading: &Leadership) {
        let now = Timestamp::now();
        for name in std::mem::take(touched) {
            let trust = self.reports.feed(&name, &mut self.state, now);
            let action = match trust {
                Some(Trust::Stamp { node_uid }) => ReportAction::Stamp(node_uid),
                Some(Trust::Delete { report_uid }) => ReportAction::Delete(report_uid),
                _ => continue,
            };
            // The same action on the same report is not repeated at once (the tick retries it later).
            let key = format!("{name}/{action:?}");
            let recently = self
                .report_actions
                .get(&key)
                .is_some_and(|at| at.elapsed() < REPORT_ACTION_INTERVAL);
            if recently || !leading.is_leading_now() {
                continue;
            }
            self.report_actions.insert(key, Instant::now());
            let api: Api<KeepaliveNodeReport> = Api::all(self.client.clone());
            let done = match &action {
                ReportAction::Stamp(node_uid) => {
                    // A JSON patch testing the report's UID: never creates a report, never stamps a newer one.
                    let report_uid = self.reports.uid(&name).unwrap_or_default();
                    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
                        {"op": "test", "path": "/metadata/uid", "value": report_uid},
                        {"op": "add", "path": "/metadata/ownerReferences", "value": [{
                            "apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid,
                        }]},
                    ]))
                    .expect("a well-formed JSON patch");
                    let (params, patch) = (PatchParams::default(), Patch::<()>::Json(patch));
                    let call = api.patch(&name, &params, &patch);
                    tokio::time::timeout(WRITE_TIMEOUT, call).await.map(|r| r.map(|_| ()))
                }
                ReportAction::Delete(report_uid) => {
                    let params = DeleteParams {
                        preconditions: Some(Preconditions {
                            uid: Some(report_uid.clone()),
                            resource_version: None,
                        }),
                        ..Default::default()
                    };
                    let call = api.delete(&name, &params);
                    tokio::time::timeout(WRITE_TIMEOUT, call).await.map(|r| r.map(|_| ()))
                }
            };
            match done {
                Ok(Ok(())) => tracing::info!(report = %name, action = ?action, "node report bound to its node"),
                // Gone or changed meanwhile: the watch brings what happened.
                Ok(Err(kube::Error::Api(s))) if matches!(s.code, 404 | 409 | 422) => {}
                Ok(Err(e)) => tracing::warn!(report = %name, error = %e, "binding a node report failed; will retry"),
                Err(_) => tracing::warn!(report = %name, "binding a node report timed out; will retry"),
            }
        }
    }

    async fn write_statuses(&mut self, leading: &Leadership) {
        self.pending.extend(self.state.take_dirty());
        // A policy never written by this replica (new, or a new leader) is written once even without changes.
        for entry in self.state.policies().entries() {
            if !self.last_status.contains_key(&entry.name) {
                self.pending.insert(Arc::from(entry.name.as_str()));
            }
        }
        let now = Instant::now();
        let due: Vec<Arc<str>> = self
            .pending
            .iter()
            .filter(|p| {
                self.last_write
                    .get(*p)
                    .is_none_or(|t| now.duration_since(*t) >= MIN_WRITE_INTERVAL)
            })
            .cloned()
            .collect();
        if due.is_empty() {
            return;
        }
        tracing::debug!(policies = due.len(), "writing status");
        let start = Instant::now();
        let api: Api<KeepalivePolicy> = Api::all(self.client.clone());
        let stamp = Time(Timestamp::now());
        for name in due {
            self.pending.remove(&name);
            let (Some(summary), Some(object)) = (self.state.summary(&name), self.caches.policy(&name)) else {
                // Deleted meanwhile: nothing to write.
                self.last_status.remove(&*name);
                continue;
            };
            self.record_metrics(&name, &summary);
            let previous = self.last_status.get(&*name).cloned().or_else(|| object.status.clone());
            let injection = self.injection.borrow().injection(&name);
            let status = conformance::status(
                &summary,
                object.meta().generation,
                self.cluster,
                &injection,
                previous.as_ref(),
                &stamp,
            );
            if previous.as_ref().is_some_and(|p| conformance::same_report(p, &status)) {
                self.last_status.insert(name.to_string(), status);
                self.metrics.status_write(WriteOutcome::Unchanged);
                continue;
            }
            let patch = serde_json::json!({
                "apiVersion": "keepalive.dev/v1alpha1",
                "kind": "KeepalivePolicy",
                "status": status,
            });
            if !leading.is_leading_now() {
                // Leadership ended during this pass: the next leader writes the rest.
                self.pending.insert(name);
                break;
            }
            // Bounded: the client has no read timeout, and a write hanging on a dead connection would stall the
            // writer for good.
            let (params, patch) = (PatchParams::apply(OPERATOR_MANAGER).force(), Patch::Apply(&patch));
            let write = api.patch_status(&name, &params, &patch);
            let written = match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                Ok(result) => result,
                Err(_) => Err(kube::Error::Service(
                    format!("no answer within {WRITE_TIMEOUT:?}").into(),
                )),
            };
            match written {
                Ok(_) => {
                    self.metrics.status_write(WriteOutcome::Written);
                    self.last_write.insert(name.clone(), Instant::now());
                    self.publish_transitions(&object, previous.as_ref(), &status).await;
                    self.last_status.insert(name.to_string(), status);
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    self.last_status.remove(&*name);
                }
                Err(e) => {
                    tracing::warn!(policy = %name, error = %e, "writing status failed; will retry");
                    self.metrics.status_write(WriteOutcome::Failed);
                    self.pending.insert(name);
                }
            }
        }
        self.metrics.reconcile_duration.observe(start.elapsed().as_secs_f64());
    }

    fn record_metrics(&self, policy: &str, summary: &conformance::Summary) {
        let set = |state: PodState, n: i32| self.metrics.policy_pods(policy, state, n);
        set(PodState::Matched, summary.matched);
        set(PodState::Conformant, summary.conformant);
        set(PodState::LiveVerified, summary.live_verified);
        let counts = summary.connections.unwrap_or_default();
        for class in Protection::ALL {
            let n = match class {
                Protection::Protected => counts.protected,
                Protection::ProtectedByApp => counts.protected_by_app,
                Protection::ArmedTooLate => counts.armed_too_late,
                Protection::Unarmed => counts.unarmed,
            };
            self.metrics.policy_connections(policy, class, n);
        }
        for (reason, n) in &summary.by_reason {
            set(PodState::Reason(*reason), *n);
        }
        // A reason that is gone reads 0, not its last count (alerts on it must clear).
        let previous = self.last_status.get(policy).map(|s| &s.violation_counts);
        for reason in previous
            .into_iter()
            .flat_map(|p| p.keys())
            .filter_map(|r| Reason::from_wire(r))
        {
            if !summary.by_reason.contains_key(&reason) {
                set(PodState::Reason(reason), 0);
            }
        }
    }

    /// One Event per condition whose status changed.
    async fn publish_transitions(
        &self,
        policy: &KeepalivePolicy,
        previous: Option<&KeepalivePolicyStatus>,
        status: &KeepalivePolicyStatus,
    ) {
        for condition in &status.conditions {
            let before = previous.and_then(|p| p.conditions.iter().find(|c| c.type_ == condition.type_));
            if before.is_some_and(|b| b.status == condition.status) {
                continue;
            }
            let event = Event {
                type_: if condition.status == "True" {
                    EventType::Normal
                } else {
                    EventType::Warning
                },
                reason: condition.reason.clone(),
                note: Some(format!(
                    "{} is {}: {}",
                    condition.type_, condition.status, condition.message
                )),
                action: "Evaluate".into(),
                secondary: None,
            };
            if let Err(e) = self.recorder.publish(&event, &policy.object_ref(&())).await {
                tracing::warn!(error = %e, "publishing an event failed");
            }
        }
    }
}

#[derive(Debug)]
enum ReportAction {
    Stamp(String),
    Delete(String),
}

/// What is kept of a Node: its name, its UID, and its kubelet's version only when that kubelet rejects the
/// keepalive sysctls (cut to [`MAX_KUBELET_VERSION_CHARS`]: the Node's status is the node's to write).
#[derive(Debug)]
struct NodeEntry {
    name: String,
    uid: String,
    old_kubelet: Option<String>,
}

/// A kubelet version longer than this is cut (real ones are like "v1.28.15-eks-1a2b3c4").
const MAX_KUBELET_VERSION_CHARS: usize = 64;

/// The Node watch into [`NodeReports`] (names and UIDs) and [`Conformance`] (old kubelets), noting whose reports
/// to look at again.
struct Nodes<'a> {
    reports: &'a mut NodeReports,
    conformance: &'a mut Conformance,
    touched: &'a mut Vec<String>,
}

impl Index<Node> for Nodes<'_> {
    type Entry = NodeEntry;

    fn entry(&mut self, node: Node) -> Option<Self::Entry> {
        let version = node.status.and_then(|s| s.node_info).map(|i| i.kubelet_version);
        Some(NodeEntry {
            name: node.metadata.name?,
            uid: node.metadata.uid?,
            old_kubelet: version
                .filter(|v| crate::policy::kubelet_rejects_keepalive_sysctls(v))
                .map(|v| conformance::truncated(v, MAX_KUBELET_VERSION_CHARS)),
        })
    }
    fn apply(&mut self, node: Self::Entry) {
        self.conformance.set_kubelet(&node.name, node.old_kubelet.as_deref());
        self.touched.push(node.name.clone());
        self.reports.set_node(node.name, node.uid);
    }
    fn delete(&mut self, node: Node) {
        if let Some(name) = node.metadata.name {
            self.conformance.set_kubelet(&name, None);
            self.reports.remove_node(&name);
            self.touched.push(name);
        }
    }
    fn reset(&mut self, nodes: Vec<Self::Entry>) {
        self.conformance.replace_kubelets(
            nodes
                .iter()
                .filter_map(|n| Some((n.name.as_str(), n.old_kubelet.as_deref()?))),
        );
        self.reports
            .replace_nodes(nodes.into_iter().map(|n| (n.name, n.uid)).collect());
        // Every report, also those of nodes that were never listed.
        self.touched.extend(self.reports.names());
    }
}

/// RuntimeClass name → handler.
#[derive(Default)]
struct RuntimeClasses(HashMap<String, String>);

impl Index<RuntimeClass> for RuntimeClasses {
    type Entry = (String, String);

    fn entry(&mut self, class: RuntimeClass) -> Option<Self::Entry> {
        Some((class.metadata.name?, class.handler))
    }
    fn apply(&mut self, (name, handler): Self::Entry) {
        self.0.insert(name, handler);
    }
    fn delete(&mut self, class: RuntimeClass) {
        if let Some(name) = class.metadata.name {
            self.0.remove(&name);
        }
    }
    fn reset(&mut self, classes: Vec<Self::Entry>) {
        self.0 = classes.into_iter().collect();
    }
}

fn is_absent_or_forbidden(e: &watcher::Error) -> bool {
    matches!(
        e,
        watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            if s.code == 404 || s.code == 403
    )
}
