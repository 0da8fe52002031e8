//! Watch-driven in-memory caches: the policies (as a ready-to-query [`PolicySet`]) and namespace labels.
//! Requests read them without any API call.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    core::PartialObjectMeta,
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};

use crate::{
    api::KeepalivePolicy,
    metrics::{CacheLabels, Metrics},
    policy::PolicySet,
};

/// What changed among the namespaces.
pub enum NamespaceChanges {
    /// Every namespace with its labels (after a relist).
    All(Vec<(String, BTreeMap<String, String>)>),
    /// These namespaces changed: their labels now, `None` when deleted.
    Some(Vec<(Option<BTreeMap<String, String>>, String)>),
}

/// The caches shared by the webhook and the controller.
pub struct Caches {
    policies: ArcSwap<PolicySet>,
    policies_synced: AtomicBool,
    policy_objects: Option<Store<KeepalivePolicy>>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    namespaces_synced: AtomicBool,
    /// Namespaces whose labels may have changed since the last [`Caches::take_namespace_changes`]; `None` inside
    /// means "all of them" (a relist).
    namespace_changes: std::sync::Mutex<Option<std::collections::HashSet<String>>>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Caches {
    /// Starts the watches; the caches fill in the background. `ready()` turns true once both are synced.
    pub fn start(client: Client, metrics: Arc<Metrics>) -> Arc<Self> {
        let (ns_store, ns_writer) = reflector::store();
        let (policy_store, policy_writer) = reflector::store::<KeepalivePolicy>();
        let caches = Arc::new(Caches {
            policies: ArcSwap::from_pointee(PolicySet::default()),
            policies_synced: AtomicBool::new(false),
            policy_objects: Some(policy_store.clone()),
            namespaces: ns_store,
            namespaces_synced: AtomicBool::new(false),
            namespace_changes: std::sync::Mutex::new(None),
            changed: tokio::sync::watch::Sender::new(0),
        });

        let policy_events = reflector::reflector(
            policy_writer,
            watcher(Api::<KeepalivePolicy>::all(client.clone()), watcher::Config::default()),
        )
        .default_backoff();
        let c = caches.clone();
        let m = metrics.clone();
        tokio::spawn(async move {
            let mut events = std::pin::pin!(policy_events);
            loop {
                match events.try_next().await {
                    Ok(Some(watcher::Event::InitDone)) => c.policies_synced.store(true, Ordering::Release),
                    Ok(Some(watcher::Event::Init | watcher::Event::InitApply(_))) => continue,
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "policy watch failed; retrying");
                        continue;
                    }
                }
                if c.policies_synced.load(Ordering::Acquire) {
                    let state = policy_store.state();
                    m.cache_objects
                        .get_or_create(&CacheLabels { cache: "policies" })
                        .set(state.len() as i64);
                    c.policies
                        .store(Arc::new(PolicySet::from_policies(state.iter().map(|p| p.as_ref()))));
                    c.changed.send_modify(|n| *n += 1);
                    tracing::debug!(policies = state.len(), "policy set rebuilt");
                }
            }
        });

        let ns_events = reflector::reflector(
            ns_writer,
            watcher(
                Api::<PartialObjectMeta<Namespace>>::all(client),
                watcher::Config::default(),
            ),
        )
        .default_backoff();
        let c = caches.clone();
        tokio::spawn(async move {
            let mut events = std::pin::pin!(ns_events);
            while let Some(event) = events.next().await {
                match &event {
                    Ok(watcher::Event::InitDone) => {
                        c.namespaces_synced.store(true, Ordering::Release);
                        *c.namespace_changes.lock().unwrap() = None;
                        c.changed.send_modify(|n| *n += 1);
                    }
                    Ok(watcher::Event::Apply(ns) | watcher::Event::Delete(ns)) => {
                        if let (Some(name), Some(changes)) =
                            (ns.metadata.name.as_ref(), c.namespace_changes.lock().unwrap().as_mut())
                        {
                            changes.insert(name.clone());
                        }
                        c.changed.send_modify(|n| *n += 1);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "namespace watch failed; retrying"),
                }
                metrics
                    .cache_objects
                    .get_or_create(&CacheLabels { cache: "namespaces" })
                    .set(c.namespaces.len() as i64);
            }
        });
        caches
    }

    /// Caches with fixed contents, already synced: for offline use and benchmarks.
    pub fn fixed(
        policies: PolicySet,
        namespaces: impl IntoIterator<Item = (String, BTreeMap<String, String>)>,
    ) -> Self {
        let (store, mut writer) = reflector::store::<PartialObjectMeta<Namespace>>();
        for (name, labels) in namespaces {
            let mut ns = PartialObjectMeta::<Namespace>::default();
            ns.metadata.name = Some(name);
            ns.metadata.labels = Some(labels);
            writer.apply_watcher_event(&watcher::Event::Apply(ns));
        }
        Caches {
            policies: ArcSwap::from_pointee(policies),
            policies_synced: AtomicBool::new(true),
            policy_objects: None,
            namespaces: store,
            namespaces_synced: AtomicBool::new(true),
            namespace_changes: std::sync::Mutex::new(None),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }

    /// A receiver that sees every change of policies or namespaces (a counter; `changed()` is cancel-safe).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The stored policy object, with its status.
    pub fn policy(&self, name: &str) -> Option<Arc<KeepalivePolicy>> {
        self.policy_objects.as_ref()?.get(&ObjectRef::new(name))
    }

    /// Namespaces whose labels may have changed since the last call: `Changes::All` after a relist.
    pub fn take_namespace_changes(&self) -> NamespaceChanges {
        let mut guard = self.namespace_changes.lock().unwrap();
        match guard.replace(Default::default()) {
            None => NamespaceChanges::All(
                self.namespaces
                    .state()
                    .iter()
                    .filter_map(|ns| {
                        Some((
                            ns.metadata.name.clone()?,
                            ns.metadata.labels.clone().unwrap_or_default(),
                        ))
                    })
                    .collect(),
            ),
            Some(names) => NamespaceChanges::Some(names.into_iter().map(|n| (self.namespace_labels(&n), n)).collect()),
        }
    }

    /// Both caches have completed their initial list.
    pub fn ready(&self) -> bool {
        self.policies_synced.load(Ordering::Acquire) && self.namespaces_synced.load(Ordering::Acquire)
    }

    /// The current policies, ready to query.
    pub fn policies(&self) -> Arc<PolicySet> {
        self.policies.load_full()
    }

    /// Labels of a namespace, if it is in the cache.
    pub fn namespace_labels(&self, name: &str) -> Option<BTreeMap<String, String>> {
        self.namespaces
            .get(&ObjectRef::new(name))
            .map(|ns| ns.metadata.labels.clone().unwrap_or_default())
    }

    /// Labels of a namespace; when it is not cached yet (created a moment ago, its watch event still on the
    /// way), waits for it up to `patience`.
    pub async fn namespace_labels_within(&self, name: &str, patience: Duration) -> Option<BTreeMap<String, String>> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            if let Some(labels) = self.namespace_labels(name) {
                return Some(labels);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
