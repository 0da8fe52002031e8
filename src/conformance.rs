//! Conformance: for every policy, which pods it owns and whether they run with its values — kept up to date
//! incrementally as pods, namespaces and policies change. Pure state; the controller feeds it from watches
//! and writes what it reports.
//!
//! Pods are held lean ([`LeanPod`]): only what the decision and the report need. Terminated pods (phase
//! Succeeded or Failed) are not counted: they hold no connections.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use k8s_openapi::{
    api::core::v1::{Pod, Sysctl},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};

use crate::{
    api::{KeepalivePolicyStatus, MAX_VIOLATIONS, Violation},
    policy::{self, ClusterFacts, PodFacts, PolicySet, Verdict},
};

/// (namespace, name) of a pod.
pub type PodKey = (Arc<str>, Arc<str>);

/// What the controller keeps of a pod. Strings, label sets and sysctl lists that many pods share (pods of one
/// ReplicaSet have identical labels) are interned: each distinct value is held once.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LeanPod {
    /// The pod UID as a number (a UUID): see [`LeanPod::uid_string`].
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

impl LeanPod {
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

    /// The UID in its usual form (8-4-4-4-12 hex digits).
    pub fn uid_string(&self) -> String {
        let h = format!("{:032x}", self.uid);
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }

    fn terminated(&self) -> bool {
        matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }
}

/// Holds each distinct shared value once.
#[derive(Default)]
struct Interner {
    strings: HashSet<Arc<str>>,
    labels: HashSet<Arc<BTreeMap<String, String>>>,
    sysctls: HashMap<Vec<(String, String)>, Arc<[Sysctl]>>,
}

impl Interner {
    fn str(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.strings.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.strings.insert(a.clone());
        a
    }

    fn labels(&mut self, labels: BTreeMap<String, String>) -> Arc<BTreeMap<String, String>> {
        if let Some(a) = self.labels.get(&labels) {
            return a.clone();
        }
        let a = Arc::new(labels);
        self.labels.insert(a.clone());
        a
    }

    fn sysctls(&mut self, sysctls: Vec<Sysctl>) -> Arc<[Sysctl]> {
        let key: Vec<(String, String)> = sysctls.iter().map(|s| (s.name.clone(), s.value.clone())).collect();
        self.sysctls.entry(key).or_insert_with(|| Arc::from(sysctls)).clone()
    }

    /// Forgets values no pod uses any more.
    fn sweep(&mut self) {
        self.strings.retain(|a| Arc::strong_count(a) > 1);
        self.labels.retain(|a| Arc::strong_count(a) > 1);
        self.sysctls.retain(|_, a| Arc::strong_count(a) > 1);
    }
}

fn parse_uid(uid: &str) -> u128 {
    let hex: String = uid.chars().filter(|c| *c != '-').collect();
    u128::from_str_radix(&hex, 16).unwrap_or(0)
}

/// A pod's place in the tallies: the policy that owns it and, when it does not conform, why.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Owned {
    policy: Arc<str>,
    reason: Option<&'static str>,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Tally {
    matched: i32,
    conformant: i32,
    by_reason: BTreeMap<&'static str, i32>,
    /// Non-conformant pods, sorted: the first ones become the status' violations.
    violating: BTreeSet<PodKey>,
}

/// What the status of one policy reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub matched: i32,
    pub conformant: i32,
    pub by_reason: BTreeMap<String, i32>,
    pub violations: Vec<Violation>,
}

/// The conformance of every pod to its policy.
#[derive(Default)]
pub struct Conformance {
    interner: Interner,
    cluster: ClusterFacts,
    policies: Arc<PolicySet>,
    namespaces: HashMap<String, BTreeMap<String, String>>,
    pods: HashMap<PodKey, (LeanPod, Option<Owned>)>,
    tallies: HashMap<Arc<str>, Tally>,
    dirty: HashSet<Arc<str>>,
}

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

impl Conformance {
    pub fn new(cluster: ClusterFacts) -> Self {
        Conformance {
            cluster,
            ..Default::default()
        }
    }

    /// Makes a watched Pod lean: everything the report does not need is dropped here, at ingest.
    pub fn lean(&mut self, pod: Pod) -> Option<LeanPod> {
        let meta = pod.metadata;
        let spec = pod.spec.unwrap_or_default();
        let i = &mut self.interner;
        Some(LeanPod {
            uid: meta.uid.as_deref().map(parse_uid).unwrap_or(0),
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
        })
    }

    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    pub fn pods(&self) -> impl Iterator<Item = &LeanPod> {
        self.pods.values().map(|(p, _)| p)
    }

    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }

    fn judge(&self, pod: &LeanPod) -> Option<Owned> {
        if pod.terminated() {
            return None;
        }
        let labels = self.namespaces.get(&*pod.namespace).unwrap_or(&NO_LABELS);
        let facts = pod.facts();
        let decision = policy::decide(&self.policies, labels, &facts, self.cluster);
        let (entry, verdict) = policy::assess(&decision, &facts)?;
        let reason = match verdict {
            Verdict::Conformant => None,
            Verdict::Violation { reason, .. } => Some(reason),
        };
        Some(Owned {
            policy: self.policy_name(&entry.name),
            reason,
        })
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
        match owned.reason {
            None => tally.conformant += sign,
            Some(reason) => {
                let n = tally.by_reason.entry(reason).or_default();
                *n += sign;
                if *n == 0 {
                    tally.by_reason.remove(reason);
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
    pub fn upsert_pod(&mut self, pod: LeanPod) {
        let key = pod.key();
        let owned = self.judge(&pod);
        if let Some((_, Some(old))) = self.pods.remove(&key) {
            self.count(&key, &old, -1);
        }
        if let Some(new) = &owned {
            self.count(&key, new, 1);
        }
        self.pods.insert(key, (pod, owned));
    }

    pub fn remove_pod(&mut self, key: &PodKey) {
        if let Some((_, Some(old))) = self.pods.remove(key) {
            self.count(key, &old, -1);
        }
    }

    /// Replaces all pods (a watch relist).
    pub fn replace_pods(&mut self, pods: impl IntoIterator<Item = LeanPod>) {
        self.pods = pods.into_iter().map(|p| (p.key(), (p, None))).collect();
        self.recompute_all();
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
                let labels = self.namespaces.get(&*pod.namespace).unwrap_or(&NO_LABELS);
                let facts = pod.facts();
                let decision = policy::decide(&self.policies, labels, &facts, self.cluster);
                match policy::assess(&decision, &facts)? {
                    (_, Verdict::Violation { reason, message }) => Some(Violation {
                        namespace: pod.namespace.to_string(),
                        name: pod.name.to_string(),
                        reason: reason.to_string(),
                        message,
                    }),
                    _ => None,
                }
            })
            .collect();
        Some(Summary {
            matched: tally.matched,
            conformant: tally.conformant,
            by_reason: tally.by_reason.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            violations,
        })
    }
}

/// The status of a policy from its summary. Conditions keep their `lastTransitionTime` while their status does
/// not change; `now` stamps `lastEvaluated` and new transitions.
pub fn status(
    summary: &Summary,
    generation: Option<i64>,
    cluster: ClusterFacts,
    previous: Option<&KeepalivePolicyStatus>,
    now: &Time,
) -> KeepalivePolicyStatus {
    let blocked = summary.by_reason.get("PodSecurityBlocks").copied().unwrap_or(0);
    let (ready, ready_reason, ready_message) = if !cluster.keepalive_sysctls_safe {
        (
            false,
            "ClusterTooOld",
            format!(
                "the cluster is older than 1.{}: kubelets reject the keepalive sysctls, so nothing is injected",
                policy::FIRST_SAFE_MINOR
            ),
        )
    } else if blocked > 0 {
        (
            false,
            "PodSecurityBlocks",
            format!(
                "{blocked} matched pods are in namespaces whose Pod Security enforce-version is below v1.{}, which \
                 rejects the keepalive sysctls",
                policy::FIRST_SAFE_MINOR
            ),
        )
    } else {
        (
            true,
            "Accepted",
            "the policy is accepted and the operator's caches are synced".to_string(),
        )
    };
    let all = summary.matched == summary.conformant;
    let conformant_message = if summary.matched == 0 {
        "no pods match this policy".to_string()
    } else if all {
        format!("all {} matched pods conform", summary.matched)
    } else {
        let reasons: Vec<String> = summary.by_reason.iter().map(|(r, n)| format!("{n} {r}")).collect();
        format!(
            "{} of {} matched pods do not conform: {}",
            summary.matched - summary.conformant,
            summary.matched,
            reasons.join(", ")
        )
    };
    let conditions = vec![
        condition("Ready", ready, ready_reason, ready_message, generation, previous, now),
        condition(
            "Conformant",
            all,
            if all { "AllPodsConform" } else { "PodsDoNotConform" },
            conformant_message,
            generation,
            previous,
            now,
        ),
    ];
    KeepalivePolicyStatus {
        observed_generation: generation,
        matched_pods: Some(summary.matched),
        conformant_pods: Some(summary.conformant),
        violation_counts: summary.by_reason.clone(),
        conditions,
        violations: summary.violations.clone(),
        last_evaluated: Some(now.clone()),
    }
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    previous: Option<&KeepalivePolicyStatus>,
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// Two statuses say the same (ignoring `lastEvaluated`): no write is needed.
pub fn same_report(a: &KeepalivePolicyStatus, b: &KeepalivePolicyStatus) -> bool {
    let strip = |s: &KeepalivePolicyStatus| KeepalivePolicyStatus {
        last_evaluated: None,
        ..s.clone()
    };
    strip(a) == strip(b)
}

#[cfg(test)]
mod tests;
