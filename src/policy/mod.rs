//! The decision shared by the webhook, the offline `apply` command and the conformance controller: which policy
//! applies to a pod, and what change to its sysctls follows — or why nothing changes.
//!
//! Everything here is pure: no I/O, no clock, no cluster access. The callers own their caches and pass in the
//! [`PolicySet`], the namespace's labels, the pod and the [`ClusterFacts`].

pub mod admission_policy;
pub mod connection;
mod index;
mod patch;
mod reason;
mod selector;

use std::{collections::BTreeMap, fmt};

use k8s_openapi::{
    api::core::v1::{PodSpec, Sysctl},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

pub use self::{
    index::{PolicyEntry, PolicySet},
    patch::{Shape, patch_operations},
    reason::Reason,
};
use crate::api::{KeepaliveSettings, LiveKeepalive, Mode};

pub use crate::api::{SYSCTL_INTERVAL, SYSCTL_PROBES, SYSCTL_TIME};
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

/// What the decision needs to know about the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterFacts {
    /// Kubelets accept the keepalive sysctls: the cluster is 1.29 or newer, or the operator was told so.
    pub keepalive_sysctls_safe: bool,
    /// The operator was told the kubelets allow the keepalive sysctls (`--kubelet-allows-keepalive-sysctls`):
    /// no node's kubelet version is judged.
    pub kubelets_allow_keepalive_sysctls: bool,
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
            kubelets_allow_keepalive_sysctls: assume_safe,
        }
    }
}

impl Default for ClusterFacts {
    fn default() -> Self {
        ClusterFacts {
            keepalive_sysctls_safe: true,
            kubelets_allow_keepalive_sysctls: false,
        }
    }
}

/// The minor of a 1.x kubelet version as a Node reports it in `status.nodeInfo.kubeletVersion` ("v1.28.9",
/// "v1.28.9-eks-4f4795d", "v1.30.2+k3s1", "v1.28"); `None` for anything else (empty, another major, garbage):
/// an unknown kubelet is not judged.
pub fn kubelet_minor(version: &str) -> Option<u32> {
    let rest = version.trim().strip_prefix('v').unwrap_or(version.trim());
    let (major, rest) = rest.split_once('.')?;
    let end = rest.find(['.', '-', '+']).unwrap_or(rest.len());
    let minor = &rest[..end];
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(major) || !digits(minor) || major.parse::<u32>().ok()? != 1 {
        return None;
    }
    minor.parse().ok()
}

/// A kubelet of this version rejects pods with the keepalive sysctls (`SysctlForbidden`) unless it runs with
/// `--allowed-unsafe-sysctls` listing them: it is a known 1.x older than 1.29.
pub fn kubelet_rejects_keepalive_sysctls(version: &str) -> bool {
    kubelet_minor(version).is_some_and(|minor| minor < FIRST_SAFE_MINOR)
}

/// The node a pod is bound to and its kubelet's version, when the caller knows them (the conformance controller
/// watches Nodes; the webhook and `apply` do not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kubelet<'a> {
    pub node: &'a str,
    pub version: &'a str,
}

/// The parts of a pod (or pod template) the decision reads.
#[derive(Clone, Copy, Debug)]
pub struct PodFacts<'a> {
    pub labels: &'a BTreeMap<String, String>,
    pub host_network: bool,
    pub windows: bool,
    pub sysctls: &'a [Sysctl],
    /// The kubelet of the pod's node, if known.
    pub kubelet: Option<Kubelet<'a>>,
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
            kubelet: None,
        }
    }

    /// The same pod, bound to a node whose kubelet version is known.
    pub fn on(self, kubelet: Option<Kubelet<'a>>) -> Self {
        PodFacts { kubelet, ..self }
    }
}

/// Why a pod gets no keepalive sysctls injected (each variant is the [`Reason`] of the same name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    NoPolicy,
    NamespaceIgnored,
    PodIgnored,
    HostNetwork,
    Unsupported,
    ClusterTooOld,
    /// The pod's node runs a kubelet older than 1.29: with the node's name and the kubelet's version.
    KubeletTooOld {
        node: String,
        version: String,
    },
    /// With the namespace's enforced level and the version it is pinned to.
    PodSecurityBlocks {
        level: String,
        version: String,
    },
}

impl Skip {
    /// The reason, as used in statuses, metrics and log lines.
    pub fn reason(&self) -> Reason {
        match self {
            Skip::NoPolicy => Reason::NoPolicy,
            Skip::NamespaceIgnored => Reason::NamespaceIgnored,
            Skip::PodIgnored => Reason::PodIgnored,
            Skip::HostNetwork => Reason::HostNetwork,
            Skip::Unsupported => Reason::Unsupported,
            Skip::ClusterTooOld => Reason::ClusterTooOld,
            Skip::KubeletTooOld { .. } => Reason::KubeletTooOld,
            Skip::PodSecurityBlocks { .. } => Reason::PodSecurityBlocks,
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
            Skip::KubeletTooOld { node, version } => write!(
                f,
                "node {node} runs kubelet {version}, older than 1.{FIRST_SAFE_MINOR}: it rejects pods with the \
                 keepalive sysctls (SysctlForbidden), so the pod never runs with the policy's values there; upgrade \
                 the node to 1.{FIRST_SAFE_MINOR} or newer, or allow them with the kubelet's \
                 --allowed-unsafe-sysctls and start the operator with --kubelet-allows-keepalive-sysctls"
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
pub fn live_differences(wanted: &KeepaliveSettings, live: &LiveKeepalive) -> Vec<String> {
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
/// make the pod rejected (hostNetwork, windows, Pod Security version, the kubelet of its node, cluster version),
/// then the mode. A pod bound to a node whose kubelet rejects the keepalive sysctls is judged by that kubelet,
/// not by the apiserver's version.
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
    if let Some(kubelet) = pod.kubelet
        && !cluster.kubelets_allow_keepalive_sysctls
        && kubelet_rejects_keepalive_sysctls(kubelet.version)
    {
        let (node, version) = (kubelet.node.to_string(), kubelet.version.to_string());
        return skipped(policy, Skip::KubeletTooOld { node, version });
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
    /// Not conformant: the reason (NotMutated, PodOverride, HostNetwork, Unsupported, ClusterTooOld,
    /// KubeletTooOld, PodSecurityBlocks) and a message for the status.
    Violation {
        reason: Reason,
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
                    reason: Reason::PodOverride,
                    message: format!("Fill mode keeps the pod's own values: {}", differing.join(", ")),
                }
            }
        }
        Outcome::Mutate(wanted) => Verdict::Violation {
            reason: Reason::NotMutated,
            message: format!(
                "the pod lacks {} (created before the policy, or while the webhook was down or bypassed); recreate it",
                describe(wanted)
            ),
        },
        Outcome::Audit(wanted) => Verdict::Violation {
            reason: Reason::NotMutated,
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

#[cfg(test)]
mod tests;
