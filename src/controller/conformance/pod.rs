//! What the controller keeps of a pod, with shared values interned.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use k8s_openapi::api::core::v1::Sysctl;

use crate::policy::PodFacts;

/// (namespace, name) of a pod.
pub type PodKey = (Arc<str>, Arc<str>);

/// What the controller keeps of a pod. Strings, label sets and sysctl lists that many pods share (pods of one
/// ReplicaSet have identical labels) are interned: each distinct value is held once.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CachedPod {
    /// The UID its node's agent reports it by, as a number (16 bytes instead of a 36-character string): the
    /// pod UID, or for a static pod's mirror pod the config hash its cgroup is named after.
    pub uid: u128,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub labels: Arc<BTreeMap<String, String>>,
    pub node: Option<Arc<str>>,
    pub host_network: bool,
    pub windows: bool,
    pub sysctls: Arc<[Sysctl]>,
    /// The `keepalive.dev/policy` annotation: which policy the webhook applied.
    pub applied_policy: Option<Arc<str>>,
    pub phase: Option<Arc<str>>,
    /// `spec.runtimeClassName`.
    pub runtime_class: Option<Arc<str>>,
    /// How many reports of its node the controller had received when it first saw the pod running (phase
    /// Running); `None` while it is not. A pod still missing from a report received two reports later has no
    /// process the agent could find.
    pub running_since_report: Option<u32>,
}

impl CachedPod {
    pub fn key(&self) -> PodKey {
        (self.namespace.clone(), self.name.clone())
    }

    pub fn facts(&self) -> PodFacts<'_> {
        PodFacts {
            labels: &self.labels,
            host_network: self.host_network,
            windows: self.windows,
            sysctls: &self.sysctls,
            kubelet: None,
        }
    }

    pub(super) fn terminated(&self) -> bool {
        matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }
}

/// Holds each distinct shared value once.
#[derive(Default)]
pub(super) struct Interner {
    strings: HashSet<Arc<str>>,
    labels: HashSet<Arc<BTreeMap<String, String>>>,
    sysctls: HashMap<Vec<(String, String)>, Arc<[Sysctl]>>,
}

impl Interner {
    pub(super) fn str(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.strings.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.strings.insert(a.clone());
        a
    }

    pub(super) fn labels(&mut self, labels: BTreeMap<String, String>) -> Arc<BTreeMap<String, String>> {
        if let Some(a) = self.labels.get(&labels) {
            return a.clone();
        }
        let a = Arc::new(labels);
        self.labels.insert(a.clone());
        a
    }

    pub(super) fn sysctls(&mut self, sysctls: Vec<Sysctl>) -> Arc<[Sysctl]> {
        let key: Vec<(String, String)> = sysctls.iter().map(|s| (s.name.clone(), s.value.clone())).collect();
        self.sysctls.entry(key).or_insert_with(|| Arc::from(sysctls)).clone()
    }

    /// Forgets values no pod uses any more.
    pub(super) fn sweep(&mut self) {
        self.strings.retain(|a| Arc::strong_count(a) > 1);
        self.labels.retain(|a| Arc::strong_count(a) > 1);
        self.sysctls.retain(|_, a| Arc::strong_count(a) > 1);
    }
}

/// A pod UID (a dashed UUID) or a static pod's config hash (32 hex digits) as a number; 0 if it is neither.
pub fn parse_uid(uid: &str) -> u128 {
    let hex: String = uid.chars().filter(|c| *c != '-').collect();
    u128::from_str_radix(&hex, 16).unwrap_or(0)
}
