//! Which node reports the controller trusts. A `KeepaliveNodeReport` speaks for the Node of its name, and for one
//! incarnation of it: the controller stamps each report with an ownerReference to the Node's UID (so the garbage
//! collector removes it with its Node even while the operator is down), trusts a report only while that UID is the
//! current Node's, and deletes reports whose Node is gone or was re-created under the same name.
//!
//! Pure state and decisions; the status writer performs the stamps and deletions (leader only).

use std::{collections::HashMap, sync::Arc};

use k8s_openapi::{api::coordination::v1::Lease, apimachinery::pkg::apis::meta::v1::OwnerReference, jiff::Timestamp};

use super::conformance::{Conformance, NodeLive, Strings};
use crate::{api::KeepaliveNodeReport, runtime::watch::Index};

/// What to do about one report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// It belongs to the current Node of its name: its readings count.
    Trusted,
    /// Not known yet (the Node watch has not listed all nodes): its readings wait.
    Pending,
    /// Not stamped yet: stamp it with the Node's UID; its readings count once it is.
    Stamp { node_uid: String },
    /// Its Node is gone, or was re-created: delete it (the agent of a new Node writes a new one).
    Delete { report_uid: String },
}

/// One report as held here.
#[derive(Clone, Debug, PartialEq)]
pub struct HeldReport {
    pub uid: String,
    /// The UID of the Node its ownerReference names, if it has one.
    pub owner: Option<String>,
    /// Shared with [`Conformance`], which judges the node's pods by it.
    pub live: Arc<NodeLive>,
}

impl HeldReport {
    /// The UID of the report's ownerReference to the Node `node` (kind Node of the core group), if any.
    pub fn node_owner(node: &str, owners: Option<&[OwnerReference]>) -> Option<String> {
        owners?
            .iter()
            .find(|o| o.kind == "Node" && o.api_version == "v1" && o.name == node)
            .map(|o| o.uid.clone())
    }
}

/// The Nodes (name → UID) and node reports the controller knows.
#[derive(Default)]
pub struct NodeReports {
    nodes: HashMap<String, String>,
    nodes_synced: bool,
    /// The Nodes cannot be read (no permission): every report is trusted, as before reports were bound to nodes.
    nodes_unreadable: bool,
    reports: HashMap<String, HeldReport>,
    /// The destinations' addresses and process names of every report's socket summaries.
    strings: Strings,
}

impl NodeReports {
    pub fn trust(&self, name: &str) -> Option<Trust> {
        let report = self.reports.get(name)?;
        if self.nodes_unreadable {
            return Some(Trust::Trusted);
        }
        Some(match (self.nodes.get(name), &report.owner) {
            (Some(node), Some(owner)) if owner == node => Trust::Trusted,
            (Some(_), Some(_)) => Trust::Delete {
                report_uid: report.uid.clone(),
            },
            (Some(node), None) => Trust::Stamp { node_uid: node.clone() },
            (None, _) if self.nodes_synced => Trust::Delete {
                report_uid: report.uid.clone(),
            },
            (None, _) => Trust::Pending,
        })
    }

    /// Feeds `state` the report `name` (received at `now`) if it is trusted, withdraws it otherwise; returns its
    /// trust, for the leader's stamps and deletions.
    pub fn feed(&self, name: &str, state: &mut Conformance, now: Timestamp) -> Option<Trust> {
        let trust = self.trust(name);
        match (&trust, self.live(name)) {
            (Some(Trust::Trusted), Some(live)) => state.set_node_report(name, live.clone(), now),
            _ => state.remove_node_report(name),
        }
        trust
    }

    /// The UID of the report `name`.
    pub fn uid(&self, name: &str) -> Option<String> {
        self.reports.get(name).map(|r| r.uid.clone())
    }

    pub fn live(&self, name: &str) -> Option<&Arc<NodeLive>> {
        self.reports.get(name).map(|r| &r.live)
    }

    /// The reports waiting to be stamped or deleted.
    pub fn unsettled(&self) -> Vec<String> {
        self.reports
            .keys()
            .filter(|name| matches!(self.trust(name), Some(Trust::Stamp { .. } | Trust::Delete { .. })))
            .cloned()
            .collect()
    }

    /// Every report's name.
    pub fn names(&self) -> Vec<String> {
        self.reports.keys().cloned().collect()
    }

    pub fn set_report(&mut self, name: String, report: HeldReport) {
        self.reports.insert(name, report);
    }

    pub fn remove_report(&mut self, name: &str) {
        self.reports.remove(name);
    }

    /// A relist of the reports; returns the names of every report before and after.
    pub fn replace_reports(&mut self, reports: Vec<(String, HeldReport)>) -> Vec<String> {
        let mut names = self.names();
        self.reports = reports.into_iter().collect();
        names.extend(self.names());
        names.sort();
        names.dedup();
        names
    }

    pub fn set_node(&mut self, name: String, uid: String) {
        self.nodes.insert(name, uid);
    }

    pub fn remove_node(&mut self, name: &str) {
        self.nodes.remove(name);
    }

    /// A relist of the Nodes; returns the names of every Node before and after.
    pub fn replace_nodes(&mut self, nodes: Vec<(String, String)>) -> Vec<String> {
        let mut names: Vec<String> = self.nodes.keys().cloned().collect();
        self.nodes = nodes.into_iter().collect();
        self.nodes_synced = true;
        names.extend(self.nodes.keys().cloned());
        names.sort();
        names.dedup();
        names
    }

    pub fn nodes_synced(&self) -> bool {
        self.nodes_synced || self.nodes_unreadable
    }

    /// The Nodes cannot be listed (the operator's role predates node-bound reports): trust reports by name.
    pub fn set_nodes_unreadable(&mut self) {
        self.nodes_unreadable = true;
    }
}

/// The node report watch into [`NodeReports`], noting which reports changed.
pub struct Reports<'a> {
    pub reports: &'a mut NodeReports,
    pub touched: &'a mut Vec<String>,
}

impl Index<KeepaliveNodeReport> for Reports<'_> {
    type Entry = (String, HeldReport);

    fn entry(&mut self, report: KeepaliveNodeReport) -> Option<Self::Entry> {
        let name = report.metadata.name?;
        let held = HeldReport {
            uid: report.metadata.uid?,
            owner: HeldReport::node_owner(&name, report.metadata.owner_references.as_deref()),
            live: Arc::new(NodeLive::from_report_with(&report.spec, &mut self.reports.strings)),
        };
        Some((name, held))
    }
    fn apply(&mut self, (name, held): Self::Entry) {
        self.touched.push(name.clone());
        self.reports.set_report(name, held);
    }
    fn delete(&mut self, report: KeepaliveNodeReport) {
        if let Some(name) = report.metadata.name {
            self.reports.remove_report(&name);
            self.touched.push(name);
        }
    }
    fn reset(&mut self, reports: Vec<Self::Entry>) {
        self.touched.extend(self.reports.replace_reports(reports));
    }
}

/// The agents' heartbeat Leases as last seen: node name → renewTime. A Lease counts as a heartbeat when its
/// renewTime is one not seen before (a relist of unchanged Leases is none).
#[derive(Default)]
pub struct Heartbeats {
    renewed: HashMap<String, String>,
}

impl Heartbeats {
    pub fn len(&self) -> usize {
        self.renewed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.renewed.is_empty()
    }
}

/// The heartbeat Lease watch into [`Heartbeats`], noting which nodes' agents were heard from.
pub struct Beats<'a> {
    pub heartbeats: &'a mut Heartbeats,
    pub heard: &'a mut Vec<String>,
}

impl Index<Lease> for Beats<'_> {
    type Entry = (String, String);

    fn entry(&mut self, lease: Lease) -> Option<Self::Entry> {
        let renewed = lease.spec?.renew_time?;
        // RFC 3339 with microseconds: compared as seen, never parsed into a time (the node's clock is not trusted).
        let renewed = serde_json::to_string(&renewed).ok()?;
        Some((lease.metadata.name?, renewed))
    }
    fn apply(&mut self, (name, renewed): Self::Entry) {
        if self.heartbeats.renewed.get(&name) != Some(&renewed) {
            self.heard.push(name.clone());
            self.heartbeats.renewed.insert(name, renewed);
        }
    }
    fn delete(&mut self, lease: Lease) {
        if let Some(name) = lease.metadata.name {
            self.heartbeats.renewed.remove(&name);
        }
    }
    fn reset(&mut self, leases: Vec<Self::Entry>) {
        let mut before = std::mem::take(&mut self.heartbeats.renewed);
        for (name, renewed) in leases {
            if before.remove(&name).as_ref() != Some(&renewed) {
                self.heard.push(name.clone());
            }
            self.heartbeats.renewed.insert(name, renewed);
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::{SignedDuration, Timestamp};

    use super::*;

    fn report(uid: &str, owner: Option<&str>) -> HeldReport {
        HeldReport {
            uid: uid.into(),
            owner: owner.map(String::from),
            live: Arc::new(NodeLive {
                last_scan: Timestamp::UNIX_EPOCH,
                stale_after: SignedDuration::from_secs(180),
                refresh_stale_after: SignedDuration::from_secs(180),
                node_sysctls: None,
                pods: Default::default(),
            }),
        }
    }

    #[test]
    fn reports_are_trusted_for_one_incarnation_of_their_node() {
        let mut r = NodeReports::default();
        r.set_report("a".into(), report("r1", None));
        assert_eq!(r.trust("a"), Some(Trust::Pending), "nodes not listed yet");
        r.replace_nodes(vec![("a".into(), "n1".into())]);
        assert_eq!(r.trust("a"), Some(Trust::Stamp { node_uid: "n1".into() }));
        r.set_report("a".into(), report("r1", Some("n1")));
        assert_eq!(r.trust("a"), Some(Trust::Trusted));
        // The node is re-created under the same name: the old report is not its own.
        r.set_node("a".into(), "n2".into());
        assert_eq!(
            r.trust("a"),
            Some(Trust::Delete {
                report_uid: "r1".into()
            })
        );
        // A report of a node that does not exist.
        r.set_report("ghost".into(), report("r2", Some("n9")));
        assert_eq!(
            r.trust("ghost"),
            Some(Trust::Delete {
                report_uid: "r2".into()
            })
        );
        r.remove_node("a");
        assert_eq!(
            r.trust("a"),
            Some(Trust::Delete {
                report_uid: "r1".into()
            })
        );
        assert_eq!(r.trust("none"), None);
        r.set_nodes_unreadable();
        assert_eq!(
            r.trust("ghost"),
            Some(Trust::Trusted),
            "without node reads: by name, as before"
        );
    }

    #[test]
    fn only_a_node_owner_of_the_same_name_counts() {
        let owner = |kind: &str, name: &str| OwnerReference {
            api_version: "v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: format!("{kind}-{name}"),
            ..Default::default()
        };
        let owners = [owner("Pod", "a"), owner("Node", "b"), owner("Node", "a")];
        assert_eq!(HeldReport::node_owner("a", Some(&owners)), Some("Node-a".into()));
        assert_eq!(HeldReport::node_owner("c", Some(&owners)), None);
        assert_eq!(HeldReport::node_owner("a", None), None);
    }

    #[test]
    fn a_lease_is_a_heartbeat_when_its_renewal_is_new() {
        use crate::runtime::watch::Relist;
        use kube::runtime::watcher::Event;
        let lease = |name: &str, second: i64| -> Lease {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "agents"},
                "spec": {"renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                    Timestamp::from_second(second).unwrap())},
            }))
            .unwrap()
        };
        let mut heartbeats = Heartbeats::default();
        let mut relist = Relist::default();
        let mut feed = |heartbeats: &mut Heartbeats, event| {
            let mut heard = Vec::new();
            relist.handle(
                &mut Beats {
                    heartbeats,
                    heard: &mut heard,
                },
                event,
            );
            heard
        };
        assert!(feed(&mut heartbeats, Event::Init).is_empty());
        assert!(feed(&mut heartbeats, Event::InitApply(lease("n1", 100))).is_empty());
        assert_eq!(feed(&mut heartbeats, Event::InitDone), ["n1"], "first seen");
        assert_eq!(feed(&mut heartbeats, Event::Apply(lease("n1", 160))), ["n1"]);
        assert!(
            feed(&mut heartbeats, Event::Apply(lease("n1", 160))).is_empty(),
            "the same renewal"
        );
        // A relist of the same renewal is no heartbeat; a new node's is.
        feed(&mut heartbeats, Event::Init);
        feed(&mut heartbeats, Event::InitApply(lease("n1", 160)));
        feed(&mut heartbeats, Event::InitApply(lease("n2", 170)));
        assert_eq!(feed(&mut heartbeats, Event::InitDone), ["n2"]);
        let unrenewed: Lease =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "n3"}, "spec": {}})).unwrap();
        assert!(
            feed(&mut heartbeats, Event::Apply(unrenewed)).is_empty(),
            "never renewed"
        );
        feed(&mut heartbeats, Event::Delete(lease("n2", 170)));
        assert_eq!(heartbeats.len(), 1);
    }
}
