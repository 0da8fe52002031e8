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
    /// The pod UID as a number (a UUID: 16 bytes instead of a 36-character string), to join node reports.
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

pub fn parse_uid(uid: &str) -> u128 {
    let hex: String = uid.chars().filter(|c| *c != '-').collect();
    u128::from_str_radix(&hex, 16).unwrap_or(0)
}
