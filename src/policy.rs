//! The decision shared by the webhook, the offline `apply` command and the conformance controller: which policy
//! applies to a pod, and what change to its sysctls follows — or why nothing changes.
//!
//! Everything here is pure: no I/O, no clock, no cluster access. The callers own their caches and pass in the
//! [`PolicySet`], the namespace's labels, the pod and the [`ClusterFacts`].

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
};

use json_patch::{AddOperation, PatchOperation};
use jsonptr::PointerBuf;
use k8s_openapi::{
    api::core::v1::{PodSpec, Sysctl},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde_json::Value;

use crate::api::{KeepalivePolicy, KeepalivePolicySpec, KeepaliveSettings, LabelSelector, Mode, SelectorOperator};

pub const SYSCTL_TIME: &str = "net.ipv4.tcp_keepalive_time";
pub const SYSCTL_INTERVAL: &str = "net.ipv4.tcp_keepalive_intvl";
pub const SYSCTL_PROBES: &str = "net.ipv4.tcp_keepalive_probes";
/// The three sysctls a policy owns, in the order they are appended to a pod's list.
pub const KEEPALIVE_SYSCTLS: [&str; 3] = [SYSCTL_TIME, SYSCTL_INTERVAL, SYSCTL_PROBES];

/// `keepalive.dev/ignore=true` on a namespace or a pod opts it out.
pub const IGNORE_LABEL: &str = "keepalive.dev/ignore";
/// Set on every pod the webhook mutated: the name of the policy its values came from.
pub const POLICY_ANNOTATION: &str = "keepalive.dev/policy";

const PSA_ENFORCE: &str = "pod-security.kubernetes.io/enforce";
const PSA_ENFORCE_VERSION: &str = "pod-security.kubernetes.io/enforce-version";

/// The first Kubernetes minor (1.x) where kubelet treats the keepalive sysctls as safe and Pod Security
/// baseline allows them.
pub const FIRST_SAFE_MINOR: u32 = 29;

impl KeepaliveSettings {
    /// The policy's value of one keepalive sysctl.
    pub fn value_of(&self, sysctl: &str) -> Option<i32> {
        match sysctl {
            SYSCTL_TIME => Some(self.time),
            SYSCTL_INTERVAL => Some(self.interval),
            SYSCTL_PROBES => Some(self.probes),
            _ => None,
        }
    }
}

impl LabelSelector {
    /// Kubernetes semantics: every matchLabels pair and every requirement must hold; empty matches everything.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator {
                    SelectorOperator::In => value.is_some_and(|v| r.values.contains(v)),
                    SelectorOperator::NotIn => value.is_none_or(|v| !r.values.contains(v)),
                    SelectorOperator::Exists => value.is_some(),
                    SelectorOperator::DoesNotExist => value.is_none(),
                }
            })
    }
}

fn selector_matches(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    selector.is_none_or(|s| s.matches(labels))
}

/// One policy as the decision sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyEntry {
    pub name: String,
    pub generation: Option<i64>,
    pub spec: KeepalivePolicySpec,
}

impl PolicyEntry {
    pub fn from_policy(policy: &KeepalivePolicy) -> Self {
        PolicyEntry {
            name: policy.metadata.name.clone().unwrap_or_default(),
            generation: policy.metadata.generation,
            spec: policy.spec.clone(),
        }
    }

    /// Whether this policy's selectors select the pod (regardless of other policies).
    pub fn selects(&self, namespace_labels: &BTreeMap<String, String>, pod_labels: &BTreeMap<String, String>) -> bool {
        selector_matches(self.spec.namespace_selector.as_ref(), namespace_labels)
            && selector_matches(self.spec.pod_selector.as_ref(), pod_labels)
    }
}

/// Position of a policy in precedence order.
type Rank = u32;
/// label key → label value → ranks of the policies that require that pair.
type LabelIndex = HashMap<String, HashMap<String, Vec<Rank>>>;

/// All policies, in precedence order (highest priority first, then name), indexed by a label each one requires,
/// so finding a pod's policy looks at few candidates even among thousands of policies.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    entries: Vec<PolicyEntry>,
    by_pod_label: LabelIndex,
    by_namespace_label: LabelIndex,
    /// Policies without a required label pair: always candidates. Sorted.
    unindexed: Vec<Rank>,
}

impl PolicySet {
    pub fn new(policies: impl IntoIterator<Item = PolicyEntry>) -> Self {
        let mut entries: Vec<PolicyEntry> = policies.into_iter().collect();
        entries.sort_by(|a, b| b.spec.priority.cmp(&a.spec.priority).then_with(|| a.name.cmp(&b.name)));
        let mut set = PolicySet {
            entries,
            ..Default::default()
        };
        for (rank, entry) in set.entries.iter().enumerate() {
            let rank = rank as Rank;
            // Index each policy under the pairs of one selector: a pod lacking all of them cannot match.
            let (pod_pairs, ns_pairs) = (
                required_pairs(entry.spec.pod_selector.as_ref()),
                required_pairs(entry.spec.namespace_selector.as_ref()),
            );
            let (index, pairs) = if !pod_pairs.is_empty() {
                (&mut set.by_pod_label, pod_pairs)
            } else if !ns_pairs.is_empty() {
                (&mut set.by_namespace_label, ns_pairs)
            } else {
                set.unindexed.push(rank);
                continue;
            };
            for (k, v) in pairs {
                index
                    .entry(k.to_string())
                    .or_default()
                    .entry(v.to_string())
                    .or_default()
                    .push(rank);
            }
        }
        set
    }

    pub fn from_policies<'a>(policies: impl IntoIterator<Item = &'a KeepalivePolicy>) -> Self {
        Self::new(policies.into_iter().map(PolicyEntry::from_policy))
    }

    /// Policies in precedence order.
    pub fn entries(&self) -> &[PolicyEntry] {
        &self.entries
    }

    pub fn get(&self, name: &str) -> Option<&PolicyEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The policy that owns a pod with these labels: the first in precedence order whose selectors match.
    pub fn winner(
        &self,
        namespace_labels: &BTreeMap<String, String>,
        pod_labels: &BTreeMap<String, String>,
    ) -> Option<&PolicyEntry> {
        let mut candidates: Vec<Rank> = Vec::new();
        collect(&self.by_pod_label, pod_labels, &mut candidates);
        collect(&self.by_namespace_label, namespace_labels, &mut candidates);
        candidates.sort_unstable();
        candidates.dedup();
        // Merge the indexed candidates with the always-candidates, in rank order; the first match wins.
        let (mut i, mut j) = (0, 0);
        loop {
            let rank = match (candidates.get(i), self.unindexed.get(j)) {
                (Some(&a), Some(&b)) if a <= b => {
                    i += 1;
                    if a == b {
                        j += 1;
                    }
                    a
                }
                (_, Some(&b)) => {
                    j += 1;
                    b
                }
                (Some(&a), None) => {
                    i += 1;
                    a
                }
                (None, None) => return None,
            };
            let entry = &self.entries[rank as usize];
            if entry.selects(namespace_labels, pod_labels) {
                return Some(entry);
            }
        }
    }
}

/// Label pairs a selector requires, one of which a matching object must carry: all matchLabels pairs (any one
/// is necessary), else the values of the first `In` requirement.
fn required_pairs(selector: Option<&LabelSelector>) -> Vec<(&str, &str)> {
    let Some(s) = selector else { return Vec::new() };
    if let Some((k, v)) = s.match_labels.iter().next() {
        return vec![(k.as_str(), v.as_str())];
    }
    s.match_expressions
        .iter()
        .find(|r| r.operator == SelectorOperator::In)
        .map(|r| r.values.iter().map(|v| (r.key.as_str(), v.as_str())).collect())
        .unwrap_or_default()
}

fn collect(index: &LabelIndex, labels: &BTreeMap<String, String>, out: &mut Vec<Rank>) {
    if index.is_empty() {
        return;
    }
    for (k, v) in labels {
        if let Some(ranks) = index.get(k).and_then(|by_value| by_value.get(v)) {
            out.extend_from_slice(ranks);
        }
    }
}

/// What the decision needs to know about the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterFacts {
    /// Kubelets accept the keepalive sysctls: the cluster is 1.29 or newer, or the operator was told so.
    pub keepalive_sysctls_safe: bool,
}

impl ClusterFacts {
    /// From the apiserver's version (e.g. "1", "29+"), unless `assume_safe` overrides an older one.
    pub fn from_version(major: &str, minor: &str, assume_safe: bool) -> Self {
        let number = |s: &str| s.trim_end_matches(|c: char| !c.is_ascii_digit()).parse::<u32>().ok();
        let safe = match (number(major), number(minor)) {
            (Some(ma), Some(mi)) => ma > 1 || (ma == 1 && mi >= FIRST_SAFE_MINOR),
            _ => false,
        };
        ClusterFacts {
            keepalive_sysctls_safe: safe || assume_safe,
        }
    }
}

impl Default for ClusterFacts {
    fn default() -> Self {
        ClusterFacts {
            keepalive_sysctls_safe: true,
        }
    }
}

/// The parts of a pod (or pod template) the decision reads.
#[derive(Clone, Copy, Debug)]
pub struct PodFacts<'a> {
    pub labels: &'a BTreeMap<String, String>,
    pub host_network: bool,
    pub windows: bool,
    pub sysctls: &'a [Sysctl],
}

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

impl<'a> PodFacts<'a> {
    pub fn new(meta: &'a ObjectMeta, spec: Option<&'a PodSpec>) -> Self {
        Self::from_parts(
            meta.labels.as_ref(),
            spec.and_then(|s| s.host_network),
            spec.and_then(|s| s.os.as_ref()).map(|os| os.name.as_str()),
            spec.and_then(|s| s.security_context.as_ref())
                .and_then(|sc| sc.sysctls.as_deref()),
        )
    }

    /// From the fields as a pod (or any lean view of one) holds them: absent means the Kubernetes default.
    pub fn from_parts(
        labels: Option<&'a BTreeMap<String, String>>,
        host_network: Option<bool>,
        os_name: Option<&str>,
        sysctls: Option<&'a [Sysctl]>,
    ) -> Self {
        PodFacts {
            labels: labels.unwrap_or(&NO_LABELS),
            host_network: host_network.unwrap_or(false),
            windows: os_name == Some("windows"),
            sysctls: sysctls.unwrap_or(&[]),
        }
    }
}

/// Why a pod gets no keepalive sysctls injected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// No policy selects the pod.
    NoPolicy,
    /// The namespace is labelled keepalive.dev/ignore=true.
    NamespaceIgnored,
    /// The pod is labelled keepalive.dev/ignore=true.
    PodIgnored,
    /// hostNetwork pods share the node's network namespace: the apiserver forbids net.* sysctls there.
    HostNetwork,
    /// Windows pods cannot have sysctls.
    Unsupported,
    /// The cluster is older than 1.29: kubelet would reject the pod with SysctlForbidden.
    ClusterTooOld,
    /// The namespace enforces a Pod Security level at a version older than v1.29, which rejects these sysctls.
    PodSecurityBlocks { level: String, version: String },
}

impl Skip {
    /// CamelCase reason, as used in statuses, metrics and log lines.
    pub fn reason(&self) -> &'static str {
        match self {
            Skip::NoPolicy => "NoPolicy",
            Skip::NamespaceIgnored => "NamespaceIgnored",
            Skip::PodIgnored => "PodIgnored",
            Skip::HostNetwork => "HostNetwork",
            Skip::Unsupported => "Unsupported",
            Skip::ClusterTooOld => "ClusterTooOld",
            Skip::PodSecurityBlocks { .. } => "PodSecurityBlocks",
        }
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::NoPolicy => write!(f, "no policy selects the pod"),
            Skip::NamespaceIgnored => write!(f, "namespace is labelled {IGNORE_LABEL}=true"),
            Skip::PodIgnored => write!(f, "pod is labelled {IGNORE_LABEL}=true"),
            Skip::HostNetwork => {
                write!(
                    f,
                    "hostNetwork pod: the apiserver forbids net.* sysctls in the node's network namespace"
                )
            }
            Skip::Unsupported => write!(f, "windows pod: sysctls are not supported"),
            Skip::ClusterTooOld => write!(
                f,
                "cluster older than 1.{FIRST_SAFE_MINOR}: kubelet would reject the keepalive sysctls (SysctlForbidden); \
                 start the operator with --kubelet-allows-keepalive-sysctls if the kubelets allow them"
            ),
            Skip::PodSecurityBlocks { level, version } => write!(
                f,
                "namespace enforces Pod Security {level} at {version}, which allows the keepalive sysctls only from \
                 v1.{FIRST_SAFE_MINOR}"
            ),
        }
    }
}

/// The outcome of [`decide`].
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Nothing to inject, and why.
    Skipped(Skip),
    /// The pod already carries what the policy's mode asks for.
    AlreadySet,
    /// Set the pod's sysctls to this whole list (Enforce or Fill).
    Mutate(Vec<Sysctl>),
    /// Audit mode: nothing changes; Enforce would set this list.
    Audit(Vec<Sysctl>),
}

/// Which policy owns a pod, and what follows for its sysctls.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision<'p> {
    /// The winning policy; `None` when no policy selects the pod or the pod is opted out.
    pub policy: Option<&'p PolicyEntry>,
    pub outcome: Outcome,
}

impl Decision<'_> {
    /// The change to make to the pod, if any: the policy's name and the pod's new sysctls list.
    pub fn mutation(&self) -> Option<(&str, &[Sysctl])> {
        match (&self.outcome, self.policy) {
            (Outcome::Mutate(sysctls), Some(p)) => Some((p.name.as_str(), sysctls)),
            _ => None,
        }
    }
}

impl fmt::Display for Decision<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let policy = self.policy.map(|p| p.name.as_str()).unwrap_or("-");
        match &self.outcome {
            Outcome::Skipped(Skip::NoPolicy) => write!(f, "unchanged: no policy selects the pod"),
            Outcome::Skipped(skip @ (Skip::NamespaceIgnored | Skip::PodIgnored)) => {
                write!(f, "skipped: {skip}")
            }
            Outcome::Skipped(skip) => {
                write!(f, "policy {policy}: skipped ({}): {skip}", skip.reason())
            }
            Outcome::AlreadySet => write!(f, "policy {policy}: unchanged, the pod already has its values"),
            Outcome::Mutate(s) => write!(f, "policy {policy}: set {}", describe(s)),
            Outcome::Audit(s) => write!(f, "policy {policy} (Audit): would set {}", describe(s)),
        }
    }
}

fn describe(sysctls: &[Sysctl]) -> String {
    sysctls
        .iter()
        .filter(|s| KEEPALIVE_SYSCTLS.contains(&s.name.as_str()))
        .map(|s| format!("{}={}", s.name, s.value))
        .collect::<Vec<_>>()
        .join(" ")
}

/// How the live values of a network namespace differ from a policy's, as `name=live (policy: wanted)`; empty
/// when they are equal.
pub fn live_differences(wanted: &KeepaliveSettings, live: &crate::api::LiveKeepalive) -> Vec<String> {
    [
        (SYSCTL_TIME, live.time, wanted.time),
        (SYSCTL_INTERVAL, live.interval, wanted.interval),
        (SYSCTL_PROBES, live.probes, wanted.probes),
    ]
    .into_iter()
    .filter(|(_, live, wanted)| live != wanted)
    .map(|(name, live, wanted)| format!("{name}={live} (policy: {wanted})"))
    .collect()
}

fn same_value(value: &str, wanted: i32) -> bool {
    value.trim().parse::<i64>().ok() == Some(i64::from(wanted))
}

/// The one decision: which policy applies to the pod, and the resulting change or why nothing changes.
///
/// Order: opt-outs (namespace, pod label), then the winning policy (selectors, priority, name), then what would
/// make the pod rejected (hostNetwork, windows, Pod Security version, cluster version), then the mode.
pub fn decide<'p>(
    policies: &'p PolicySet,
    namespace_labels: &BTreeMap<String, String>,
    pod: &PodFacts<'_>,
    cluster: ClusterFacts,
) -> Decision<'p> {
    let skipped = |policy, skip| Decision {
        policy,
        outcome: Outcome::Skipped(skip),
    };
    if namespace_labels.get(IGNORE_LABEL).is_some_and(|v| v == "true") {
        return skipped(None, Skip::NamespaceIgnored);
    }
    if pod.labels.get(IGNORE_LABEL).is_some_and(|v| v == "true") {
        return skipped(None, Skip::PodIgnored);
    }
    let Some(winner) = policies.winner(namespace_labels, pod.labels) else {
        return skipped(None, Skip::NoPolicy);
    };
    let policy = Some(winner);
    if pod.host_network {
        return skipped(policy, Skip::HostNetwork);
    }
    if pod.windows {
        return skipped(policy, Skip::Unsupported);
    }
    if let Some(block) = pod_security_block(namespace_labels) {
        return skipped(policy, block);
    }
    if !cluster.keepalive_sysctls_safe {
        return skipped(policy, Skip::ClusterTooOld);
    }
    let spec = &winner.spec;
    let fill = spec.mode == Mode::Fill;
    let mut sysctls = pod.sysctls.to_vec();
    let mut changed = false;
    for name in KEEPALIVE_SYSCTLS {
        let wanted = spec.keepalive.value_of(name).expect("a keepalive sysctl");
        match sysctls.iter_mut().find(|s| s.name == name) {
            Some(own) if fill || same_value(&own.value, wanted) => {}
            Some(own) => {
                own.value = wanted.to_string();
                changed = true;
            }
            None => {
                sysctls.push(Sysctl {
                    name: name.to_string(),
                    value: wanted.to_string(),
                });
                changed = true;
            }
        }
    }
    let outcome = match (changed, spec.mode) {
        (false, _) => Outcome::AlreadySet,
        (true, Mode::Audit) => Outcome::Audit(sysctls),
        (true, _) => Outcome::Mutate(sysctls),
    };
    Decision { policy, outcome }
}

/// Whether a pod runs with its policy's keepalive values, as far as its declared sysctls tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Conformant,
    /// Not conformant: a CamelCase reason (NotMutated, PodOverride, HostNetwork, Unsupported, ClusterTooOld,
    /// PodSecurityBlocks) and a message for the status.
    Violation {
        reason: &'static str,
        message: String,
    },
}

/// The conformance verdict that follows from a decision: which policy owns the pod and whether the pod conforms.
/// `None` when no policy owns the pod (no match, or opted out). The controller judges with this, so the webhook,
/// `apply` and the status can never disagree about which policy owns a pod.
pub fn assess<'p>(decision: &Decision<'p>, pod: &PodFacts<'_>) -> Option<(&'p PolicyEntry, Verdict)> {
    let policy = decision.policy?;
    let verdict = match &decision.outcome {
        Outcome::Skipped(skip) => Verdict::Violation {
            reason: skip.reason(),
            message: skip.to_string(),
        },
        Outcome::AlreadySet => {
            let differing: Vec<String> = KEEPALIVE_SYSCTLS
                .iter()
                .filter_map(|name| {
                    let wanted = policy.spec.keepalive.value_of(name)?;
                    let own = pod.sysctls.iter().find(|s| s.name == *name)?;
                    (!same_value(&own.value, wanted)).then(|| format!("{name}={} (policy: {wanted})", own.value))
                })
                .collect();
            if differing.is_empty() {
                Verdict::Conformant
            } else {
                Verdict::Violation {
                    reason: "PodOverride",
                    message: format!("Fill mode keeps the pod's own values: {}", differing.join(", ")),
                }
            }
        }
        Outcome::Mutate(wanted) => Verdict::Violation {
            reason: "NotMutated",
            message: format!(
                "the pod lacks {} (created before the policy, or while the webhook was down or bypassed); recreate it",
                describe(wanted)
            ),
        },
        Outcome::Audit(wanted) => Verdict::Violation {
            reason: "NotMutated",
            message: format!("Audit: Enforce would set {}", describe(wanted)),
        },
    };
    Some((policy, verdict))
}

/// A namespace whose Pod Security `enforce` level (baseline or restricted) is pinned to a version before v1.29
/// rejects pods with the keepalive sysctls.
fn pod_security_block(namespace_labels: &BTreeMap<String, String>) -> Option<Skip> {
    let level = namespace_labels.get(PSA_ENFORCE)?;
    if level != "baseline" && level != "restricted" {
        return None;
    }
    let version = namespace_labels.get(PSA_ENFORCE_VERSION)?;
    let (major, minor) = version.strip_prefix('v')?.split_once('.')?;
    let (major, minor) = (major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?);
    (major == 1 && minor < FIRST_SAFE_MINOR).then(|| Skip::PodSecurityBlocks {
        level: level.clone(),
        version: version.clone(),
    })
}

/// Which parts of a pod (or pod template) exist: what a patch must create and what it may extend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub has_metadata: bool,
    pub has_spec: bool,
    pub has_security_context: bool,
    pub has_annotations: bool,
}

impl Shape {
    pub fn of(meta: &ObjectMeta, spec: Option<&PodSpec>) -> Self {
        Shape {
            has_metadata: true,
            has_spec: spec.is_some(),
            has_security_context: spec.is_some_and(|s| s.security_context.is_some()),
            has_annotations: meta.annotations.is_some(),
        }
    }
}

/// JSON Patch operations that set a pod's (or pod template's) sysctls to `sysctls` and annotate it with the
/// policy. `prefix` is the JSON pointer of the pod template within the patched object: "" for a Pod,
/// "/spec/template" for a Deployment.
pub fn patch_operations(prefix: &str, shape: Shape, policy: &str, sysctls: &[Sysctl]) -> Vec<PatchOperation> {
    let add = |path: String, value: Value| {
        PatchOperation::Add(AddOperation {
            path: PointerBuf::parse(path).expect("a valid JSON pointer"),
            value,
        })
    };
    let sysctls_json = serde_json::to_value(sysctls).expect("sysctls serialize");
    let mut ops = Vec::with_capacity(2);
    let security_context = serde_json::json!({ "sysctls": sysctls_json });
    if shape.has_security_context {
        // `add` replaces an existing member: the list is atomic, so it is written whole.
        ops.push(add(format!("{prefix}/spec/securityContext/sysctls"), sysctls_json));
    } else if shape.has_spec {
        ops.push(add(format!("{prefix}/spec/securityContext"), security_context));
    } else {
        ops.push(add(
            format!("{prefix}/spec"),
            serde_json::json!({ "securityContext": security_context }),
        ));
    }
    if !shape.has_metadata {
        ops.push(add(
            format!("{prefix}/metadata"),
            serde_json::json!({ "annotations": { POLICY_ANNOTATION: policy } }),
        ));
    } else if shape.has_annotations {
        ops.push(add(
            format!("{prefix}/metadata/annotations/keepalive.dev~1policy"),
            Value::from(policy),
        ));
    } else {
        ops.push(add(
            format!("{prefix}/metadata/annotations"),
            serde_json::json!({ POLICY_ANNOTATION: policy }),
        ));
    }
    ops
}

#[cfg(test)]
mod tests;
