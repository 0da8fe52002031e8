//! The status writer, the conformance controller's I/O shell: feeds [`Conformance`] from the pod and node report
//! watches and the shared caches, and (on the leader only) writes each changed policy status by server-side
//! apply — only when the report changed, at most once per [`MIN_WRITE_INTERVAL`] per policy — with an Event on
//! every condition transition.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
    runtime::{
        WatchStreamExt,
        events::{Event, EventType, Recorder, Reporter},
        watcher,
    },
};
use tokio::sync::watch;

use super::{
    caches::{Caches, NamespaceChanges},
    conformance::{self, Conformance, NodeLive},
    leader::Leadership,
    metrics::{Cache, ControllerMetrics, PodState, WriteOutcome},
};
use crate::{
    api::{KeepaliveNodeReport, KeepalivePolicy, KeepalivePolicyStatus, OPERATOR_MANAGER},
    policy::{ClusterFacts, Reason},
    runtime::watch::{Index, Relist},
};

/// A policy's status is written at most this often, however fast its pods churn.
pub const MIN_WRITE_INTERVAL: Duration = Duration::from_secs(3);
const TICK: Duration = Duration::from_millis(500);
/// One status write gets this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

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
}

impl StatusWriter {
    pub fn new(client: Client, caches: Arc<Caches>, cluster: ClusterFacts, metrics: ControllerMetrics) -> Self {
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
            state: Conformance::new(cluster),
            reports_unreadable: false,
            pending: Default::default(),
            last_write: Default::default(),
            last_status: Default::default(),
        }
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
            self.state = Conformance::new(self.cluster);
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
                        let mut reports = Reports { state: &mut self.state, now: Timestamp::now() };
                        report_relist.handle(&mut reports, event);
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
                _ = leading.lost() => return true,
                _ = tick.tick() => {
                    self.metrics.cache_objects(Cache::Pods, self.state.pod_count());
                    self.state.expire_node_reports(Timestamp::now());
                    let leader = leading.is_leading_now();
                    let reports_synced = report_relist.synced() || self.reports_unreadable;
                    if leader && pod_relist.synced() && reports_synced && crate::webhook::Lookup::ready(&*self.caches) {
                        self.write_statuses(leading).await;
                    }
                }
                _ = shutdown.changed() => return false,
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
            let status = conformance::status(
                &summary,
                object.meta().generation,
                self.cluster,
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

/// The node reports as the conformance state keeps them, stamped with when this replica received them.
struct Reports<'a> {
    state: &'a mut Conformance,
    now: Timestamp,
}

impl Index<KeepaliveNodeReport> for Reports<'_> {
    type Entry = (String, NodeLive);

    fn entry(&mut self, report: KeepaliveNodeReport) -> Option<Self::Entry> {
        Some((report.metadata.name?, NodeLive::from_report(&report.spec)))
    }
    fn apply(&mut self, (name, live): Self::Entry) {
        self.state.set_node_report(&name, live, self.now);
    }
    fn delete(&mut self, report: KeepaliveNodeReport) {
        if let Some(name) = &report.metadata.name {
            self.state.remove_node_report(name);
        }
    }
    fn reset(&mut self, reports: Vec<Self::Entry>) {
        self.state.replace_node_reports(reports, self.now);
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
