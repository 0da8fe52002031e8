//! Watch-driven in-memory caches of the policies (as a ready-to-query [`PolicySet`]) and the namespaces'
//! labels. Webhook requests read them without any API call; the status writer takes what changed.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use arc_swap::ArcSwap;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    core::PartialObjectMeta,
    runtime::{WatchStreamExt, watcher},
};

use super::metrics::{Cache, ControllerMetrics};
use crate::{
    api::KeepalivePolicy,
    policy::PolicySet,
    runtime::watch::{Change, Index, Relist, logged},
    webhook::Lookup,
};

/// What changed among the namespaces.
pub enum NamespaceChanges {
    /// Every namespace with its labels (after a relist).
    All(Vec<(String, BTreeMap<String, String>)>),
    /// These namespaces changed: their labels now, `None` when deleted.
    Some(Vec<(Option<BTreeMap<String, String>>, String)>),
}

type PolicyEntry = (String, Arc<KeepalivePolicy>);
type NamespaceEntry = (String, BTreeMap<String, String>);

/// The policy objects by name, as the watch delivers them, and whether a spec changed since the set was last
/// built (a status write alone changes nothing a decision reads).
#[derive(Default)]
struct Policies {
    objects: BTreeMap<String, Arc<KeepalivePolicy>>,
    specs_changed: bool,
}

impl Index<KeepalivePolicy> for Policies {
    type Entry = PolicyEntry;

    fn entry(&mut self, policy: KeepalivePolicy) -> Option<Self::Entry> {
        Some((policy.metadata.name.clone()?, Arc::new(policy)))
    }
    fn apply(&mut self, (name, policy): Self::Entry) {
        let same_spec = self
            .objects
            .get(&name)
            .is_some_and(|old| old.metadata.generation == policy.metadata.generation && old.spec == policy.spec);
        self.specs_changed |= !same_spec;
        self.objects.insert(name, policy);
    }
    fn delete(&mut self, policy: KeepalivePolicy) {
        if let Some(name) = &policy.metadata.name {
            self.specs_changed |= self.objects.remove(name).is_some();
        }
    }
    fn reset(&mut self, entries: Vec<Self::Entry>) {
        self.objects = entries.into_iter().collect();
        self.specs_changed = true;
    }
}

/// Namespace labels by name, and which namespaces changed since the status writer last asked.
#[derive(Default)]
struct Namespaces {
    labels: HashMap<String, BTreeMap<String, String>>,
    /// `None`: everything may have changed (a relist).
    changes: Option<HashSet<String>>,
}

impl Namespaces {
    fn all(&self) -> Vec<NamespaceEntry> {
        self.labels.iter().map(|(n, l)| (n.clone(), l.clone())).collect()
    }
}

impl Index<PartialObjectMeta<Namespace>> for Namespaces {
    type Entry = NamespaceEntry;

    fn entry(&mut self, ns: PartialObjectMeta<Namespace>) -> Option<Self::Entry> {
        Some((ns.metadata.name?, ns.metadata.labels.unwrap_or_default()))
    }
    fn apply(&mut self, (name, labels): Self::Entry) {
        if let Some(changes) = self.changes.as_mut() {
            changes.insert(name.clone());
        }
        self.labels.insert(name, labels);
    }
    fn delete(&mut self, ns: PartialObjectMeta<Namespace>) {
        if let Some(name) = ns.metadata.name {
            self.labels.remove(&name);
            if let Some(changes) = self.changes.as_mut() {
                changes.insert(name);
            }
        }
    }
    fn reset(&mut self, entries: Vec<Self::Entry>) {
        self.labels = entries.into_iter().collect();
        self.changes = None;
    }
}

/// The caches shared by the webhook and the controller.
pub struct Caches {
    policy_set: ArcSwap<PolicySet>,
    policies: Mutex<(Policies, Relist<PolicyEntry>)>,
    namespaces: RwLock<(Namespaces, Relist<NamespaceEntry>)>,
    /// Both watches completed a first list (kept apart from the locks: every review asks).
    policies_synced: AtomicBool,
    namespaces_synced: AtomicBool,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Caches {
    /// Starts the watches; the caches fill in the background. `ready()` turns true once both are synced.
    pub fn start(client: Client, metrics: ControllerMetrics) -> Arc<Self> {
        let caches = Arc::new(Caches {
            policy_set: ArcSwap::from_pointee(PolicySet::default()),
            policies: Mutex::default(),
            namespaces: RwLock::default(),
            policies_synced: AtomicBool::new(false),
            namespaces_synced: AtomicBool::new(false),
            changed: tokio::sync::watch::Sender::new(0),
        });

        let policy_events = logged(
            watcher(Api::<KeepalivePolicy>::all(client.clone()), watcher::Config::default()).default_backoff(),
            "policy",
        );
        let c = caches.clone();
        let m = metrics.clone();
        tokio::spawn(async move {
            let mut events = std::pin::pin!(policy_events);
            while let Some(event) = events.next().await {
                let set = {
                    let mut guard = c.policies.lock().unwrap();
                    let (index, relist) = &mut *guard;
                    if relist.handle(index, event) == Change::None || !relist.synced() || !index.specs_changed {
                        continue;
                    }
                    index.specs_changed = false;
                    c.policies_synced.store(true, Ordering::Release);
                    PolicySet::from_policies(index.objects.values().map(|p| p.as_ref()))
                };
                m.cache_objects(Cache::Policies, set.len());
                tracing::debug!(policies = set.len(), "policy set rebuilt");
                c.policy_set.store(Arc::new(set));
                c.changed.send_modify(|n| *n += 1);
            }
        });

        let ns_events = logged(
            watcher(
                Api::<PartialObjectMeta<Namespace>>::all(client),
                watcher::Config::default(),
            )
            .default_backoff(),
            "namespace",
        );
        let c = caches.clone();
        tokio::spawn(async move {
            let mut events = std::pin::pin!(ns_events);
            while let Some(event) = events.next().await {
                let (change, count) = {
                    let mut guard = c.namespaces.write().unwrap();
                    let (index, relist) = &mut *guard;
                    (relist.handle(index, event), index.labels.len())
                };
                if change == Change::Reset {
                    c.namespaces_synced.store(true, Ordering::Release);
                }
                if change != Change::None {
                    c.changed.send_modify(|n| *n += 1);
                }
                metrics.cache_objects(Cache::Namespaces, count);
            }
        });
        caches
    }

    /// A receiver that sees every change of policies or namespaces (a counter; `changed()` is cancel-safe).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The stored policy object, with its status.
    pub fn policy(&self, name: &str) -> Option<Arc<KeepalivePolicy>> {
        self.policies.lock().unwrap().0.objects.get(name).cloned()
    }

    /// Every namespace with its labels; changes are tracked from here on.
    pub fn all_namespaces(&self) -> Vec<(String, BTreeMap<String, String>)> {
        let mut guard = self.namespaces.write().unwrap();
        guard.0.changes = Some(HashSet::new());
        guard.0.all()
    }

    /// Namespaces whose labels may have changed since the last call: `All` after a relist.
    pub fn take_namespace_changes(&self) -> NamespaceChanges {
        let mut guard = self.namespaces.write().unwrap();
        let index = &mut guard.0;
        match index.changes.replace(HashSet::new()) {
            None => NamespaceChanges::All(index.all()),
            Some(names) => {
                NamespaceChanges::Some(names.into_iter().map(|n| (index.labels.get(&n).cloned(), n)).collect())
            }
        }
    }
}

impl Lookup for Caches {
    fn ready(&self) -> bool {
        self.policies_synced.load(Ordering::Acquire) && self.namespaces_synced.load(Ordering::Acquire)
    }

    fn policies(&self) -> Arc<PolicySet> {
        self.policy_set.load_full()
    }

    fn namespace_labels(&self, name: &str) -> Option<BTreeMap<String, String>> {
        self.namespaces.read().unwrap().0.labels.get(name).cloned()
    }
}
