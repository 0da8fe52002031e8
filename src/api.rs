//! The `KeepalivePolicy` API (`keepalive.dev/v1alpha1`, cluster-scoped).
//!
//! Every range and rule here is part of the generated CRD schema (OpenAPI bounds, enums and CEL
//! `x-kubernetes-validations`), so the apiserver rejects an invalid policy before it is stored and names the
//! offending field. The operator's own code may assume a stored policy is valid.

// `printcolumn(type_ = ...)` repeats by design; clippy reads it as a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
#[allow(unused_imports)]
use kube::core::{Reason, Rule};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every resource of this operator.
pub const GROUP: &str = "keepalive.dev";
/// The keepalive sysctls, as pods name them in `spec.securityContext.sysctls`.
pub const SYSCTL_TIME: &str = "net.ipv4.tcp_keepalive_time";
pub const SYSCTL_INTERVAL: &str = "net.ipv4.tcp_keepalive_intvl";
pub const SYSCTL_PROBES: &str = "net.ipv4.tcp_keepalive_probes";
/// Field manager of the operator's server-side applies (policy status, certificates, caBundle).
pub const OPERATOR_MANAGER: &str = "keepalive-operator";
/// Field manager of the node agents' report writes.
pub const AGENT_MANAGER: &str = "keepalive-agent";

/// Kernel bound of `net.ipv4.tcp_keepalive_time` and `tcp_keepalive_intvl` (MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL).
pub const MAX_KEEPALIVE_SECONDS: i32 = 32767;
/// Kernel bound of `net.ipv4.tcp_keepalive_probes` (MAX_TCP_KEEPCNT).
pub const MAX_KEEPALIVE_PROBES: i32 = 127;
/// How many violations a policy status lists at most.
pub const MAX_VIOLATIONS: usize = 20;
/// Most pod entries one node report holds (kubelet's `maxPods` is 110 by default; the largest managed node
/// types allow a few hundred). Keeps a report far below etcd's object size limit.
pub const MAX_REPORT_PODS: usize = 2000;
/// Longest `error` of one pod entry of a node report, in characters.
pub const MAX_READ_ERROR_CHARS: usize = 256;
/// Longest heartbeat (and scan interval) a node report may claim, in seconds.
pub const MAX_HEARTBEAT_SECONDS: i32 = 3600;
/// Longest time a node report may go without a rewrite when its agent renews its heartbeat Lease, in seconds.
pub const MAX_REFRESH_SECONDS: i32 = 86_400;
/// The label of every agent's heartbeat Lease (named after its node, in the agent's namespace): the controller
/// watches only Leases with it, and an agent may write only its own node's Lease with it.
pub const HEARTBEAT_LABEL: &str = "keepalive.dev/node-heartbeat";
/// Longest message of one violation in a policy status, in characters.
pub const MAX_VIOLATION_MESSAGE_CHARS: usize = 1024;

/// Which pods get which TCP keepalive sysctls, and how strictly.
///
/// A pod is matched when its namespace matches `namespaceSelector` and the pod matches `podSelector`. Where
/// several policies match one pod, the one with the highest `priority` wins; on equal priority the policy whose
/// name sorts first wins.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "keepalive.dev",
    version = "v1alpha1",
    kind = "KeepalivePolicy",
    plural = "keepalivepolicies",
    shortname = "kap",
    status = "KeepalivePolicyStatus",
    derive = "PartialEq",
    doc = "A KeepalivePolicy says which pods get which TCP keepalive sysctls (net.ipv4.tcp_keepalive_time, _intvl, _probes), and in which mode.",
    printcolumn(
        name = "Time",
        type_ = "integer",
        json_path = ".spec.keepalive.time",
        description = "net.ipv4.tcp_keepalive_time: idle seconds before the first probe"
    ),
    printcolumn(
        name = "Interval",
        type_ = "integer",
        json_path = ".spec.keepalive.interval",
        description = "net.ipv4.tcp_keepalive_intvl: seconds between probes"
    ),
    printcolumn(
        name = "Probes",
        type_ = "integer",
        json_path = ".spec.keepalive.probes",
        description = "net.ipv4.tcp_keepalive_probes: unanswered probes before the connection is dropped"
    ),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(
        name = "Matched",
        type_ = "integer",
        json_path = ".status.matchedPods",
        description = "pods this policy applies to"
    ),
    printcolumn(
        name = "Conformant",
        type_ = "integer",
        json_path = ".status.conformantPods",
        description = "matched pods that run with this policy's keepalive values"
    ),
    printcolumn(
        name = "Live",
        type_ = "integer",
        json_path = ".status.liveVerifiedPods",
        description = "matched pods whose values the node agent read from the kernel and found equal to the policy's"
    ),
    printcolumn(
        name = "Coverage",
        type_ = "string",
        json_path = ".status.connectionCoverage",
        description = "established connections of the matched pods with keepalive armed / all established"
    ),
    printcolumn(
        name = "Protected",
        type_ = "string",
        json_path = ".status.protectedConnections",
        description = "connections whose first keepalive probe leaves before the idle timeout / connections read per socket"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new(
    "!has(self.idleTimeoutSeconds) || self.keepalive.time < self.idleTimeoutSeconds"
).message(
    "spec.keepalive.time must be less than spec.idleTimeoutSeconds: the first keepalive probe has to leave before the load balancer drops the idle connection"
).field_path(".idleTimeoutSeconds").reason(Reason::FieldValueInvalid))]
#[serde(rename_all = "camelCase")]
pub struct KeepalivePolicySpec {
    /// Namespaces whose pods this policy applies to. Absent: every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Pods this policy applies to, within the selected namespaces. Absent: every pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// The keepalive sysctls the matched pods get.
    pub keepalive: KeepaliveSettings,
    /// Idle timeout, in seconds, of the load balancer or NAT in front of these pods (AWS NLB 350, Azure LB 240,
    /// GCP firewall 600). When set, `keepalive.time` must be below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub idle_timeout_seconds: Option<i32>,
    /// Enforce: the policy's values win over values the pod sets. Fill: only sysctls the pod does not set.
    /// Audit: never mutate, only report.
    #[serde(default)]
    pub mode: Mode,
    /// Where several policies match a pod the highest priority wins; on a tie, the first name in
    /// alphabetical order.
    #[serde(default)]
    pub priority: i32,
}

/// The three TCP keepalive sysctls, per network namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeepaliveSettings {
    /// `net.ipv4.tcp_keepalive_time`: seconds a connection is idle before the first probe (kernel default 7200).
    #[schemars(range(min = 1, max = 32767))]
    pub time: i32,
    /// `net.ipv4.tcp_keepalive_intvl`: seconds between unanswered probes (kernel default 75).
    #[schemars(range(min = 1, max = 32767))]
    pub interval: i32,
    /// `net.ipv4.tcp_keepalive_probes`: unanswered probes before the connection is dropped (kernel default 9).
    #[schemars(range(min = 1, max = 127))]
    pub probes: i32,
}

impl KeepaliveSettings {
    /// Seconds from the last packet until a dead peer is detected: time + interval × probes.
    pub fn dead_peer_seconds(&self) -> i64 {
        i64::from(self.time) + i64::from(self.interval) * i64::from(self.probes)
    }
}

/// How a policy treats the pods it matches.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The policy's values replace the pod's own values of the keepalive sysctls.
    #[default]
    Enforce,
    /// Only keepalive sysctls the pod does not set are added.
    Fill,
    /// Nothing is changed; the status reports what Enforce would change.
    Audit,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "Enforce",
            Mode::Fill => "Fill",
            Mode::Audit => "Audit",
        })
    }
}

/// A label selector with the semantics of Kubernetes' `metav1.LabelSelector`: all `matchLabels` and all
/// `matchExpressions` must hold; an empty selector matches everything.
///
/// Unlike `metav1.LabelSelector`, the operator is an enum in the schema, so the apiserver rejects an unknown
/// operator.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels that must be present with exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub match_labels: BTreeMap<String, String>,
    /// Requirements that must all hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One requirement of a label selector.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new(
    "(self.operator == 'In' || self.operator == 'NotIn') == (has(self.values) && size(self.values) > 0)"
).message(
    "values must be non-empty when operator is In or NotIn, and must be empty when operator is Exists or DoesNotExist"
).field_path(".values").reason(Reason::FieldValueInvalid))]
pub struct LabelSelectorRequirement {
    /// The label key.
    #[schemars(
        length(min = 1, max = 317),
        regex(
            pattern = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
        )
    )]
    pub key: String,
    /// In, NotIn, Exists or DoesNotExist.
    pub operator: SelectorOperator,
    /// Label values, for In and NotIn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 256),
        inner(length(max = 63), regex(pattern = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"))
    )]
    pub values: Vec<String>,
}

/// Operator of a label selector requirement.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// What the operator observed about a policy's pods. Written by the controller only.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeepalivePolicyStatus {
    /// The policy generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods this policy applies to (it matches them and wins over other matching policies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched_pods: Option<i32>,
    /// Matched pods that run with this policy's keepalive values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conformant_pods: Option<i32>,
    /// Matched pods whose live values the node agent read from the pod's network namespace and found equal to
    /// the policy's (conformant by what the kernel holds, not only by the pod spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_verified_pods: Option<i32>,
    /// Established TCP connections of the matched pods read by the node agents, and how many have keepalive armed.
    /// Sysctls only act on sockets with SO_KEEPALIVE: the rest can still be dropped when idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<ConnectionCounts>,
    /// `connections` as "with keepalive/established", for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_coverage: Option<String>,
    /// Connections that will probe before the idle timeout (by the sysctls or by the application's own socket
    /// settings) / connections the agents read per socket, for the printer column. Absent while no agent reads
    /// sockets one by one (see the node reports' `connectionReading`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protected_connections: Option<String>,
    /// Non-conformant matched pods, by reason (NotMutated, PodOverride, HostNetwork, LiveMismatch, Unverified, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub violation_counts: BTreeMap<String, i32>,
    /// `Ready` (policy accepted, caches synced) and `Conformant` (every matched pod conforms).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The first matched pods that do not conform, sorted by namespace and name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub violations: Vec<Violation>,
    /// When the pods were last evaluated against this policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_evaluated: Option<Time>,
}

/// Established connections and those with the keepalive timer armed; where the agents read sockets one by one,
/// each connection classified against the policy's `idleTimeoutSeconds` (without one: its `keepalive.time`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionCounts {
    pub established: i64,
    pub keepalive: i64,
    /// Connections read per socket (the classes below add up to it).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub classified: i64,
    /// Armed, and the first probe leaves before the idle timeout by the namespace's sysctl.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub protected: i64,
    /// Armed, and the socket's own TCP_KEEPIDLE makes the first probe leave before the idle timeout, whatever
    /// the sysctls (Go's runtime, Envoy, gRPC and the JVM set their own).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub protected_by_app: i64,
    /// Armed, but the first probe leaves at or after the idle timeout: the load balancer drops it first.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub armed_too_late: i64,
    /// No SO_KEEPALIVE: no sysctl makes these probe.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unarmed: i64,
    /// Connections with TCP_USER_TIMEOUT, which bounds how long unacknowledged data waits for a dead peer.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub user_timeout: i64,
    /// Worst case, over the armed connections, of seconds from the last packet until an idle dead peer is
    /// noticed (idle + interval × probes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst_dead_peer_seconds: Option<i64>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// One pod that does not conform to its policy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Violation {
    pub namespace: String,
    pub name: String,
    /// A CamelCase reason such as NotMutated, PodOverride, HostNetwork, Unsupported, ClusterTooOld,
    /// KubeletTooOld, LiveMismatch or Unverified.
    pub reason: String,
    #[schemars(length(max = 1024))]
    pub message: String,
}

/// The generated CRD as YAML, exactly as committed under `crds/` and the chart's `crds/`.
pub fn crd_yaml() -> String {
    generated_yaml(KeepalivePolicy::crd(), "crd")
}

/// A CRD as YAML with a header saying how to regenerate it with `keepalive-operator <command>`.
fn generated_yaml(
    crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    command: &str,
) -> String {
    let body = serde_norway::to_string(&crd).expect("a CRD always serializes to YAML");
    format!(
        "# Generated by `keepalive-operator {command}`; do not edit. Regenerate with:\n\
         #   cargo run -- {command} > crds/{name}.yaml && cp crds/{name}.yaml charts/keepalive-operator/crds/\n{body}",
        name = crd.metadata.name.as_deref().unwrap_or_default()
    )
}

/// What the node agent read on one node: the live keepalive values in each pod's network namespace and how many
/// of its connections have keepalive armed. One object per node, named after it; written by that node's agent.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "keepalive.dev",
    version = "v1alpha1",
    kind = "KeepaliveNodeReport",
    plural = "keepalivenodereports",
    shortname = "kanr",
    derive = "PartialEq",
    doc = "The live TCP keepalive values in the network namespace of every pod of one node, read by the node agent.",
    printcolumn(
        name = "Verified",
        type_ = "integer",
        json_path = ".spec.verifiedPods",
        description = "pods whose live values were read"
    ),
    printcolumn(
        name = "Unverified",
        type_ = "integer",
        json_path = ".spec.unverifiedPods",
        description = "running pods that could not be read"
    ),
    printcolumn(name = "Last Scan", type_ = "date", json_path = ".spec.lastScan"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct KeepaliveNodeReportSpec {
    /// When the agent last scanned the node, by the node's clock (informational: the controller judges a
    /// report's freshness by when it received it, not by this).
    pub last_scan: Time,
    /// How often the agent says it is alive: by renewing its heartbeat Lease (see `refreshSeconds`) or, without
    /// one, by rewriting this report. A node not heard from for three heartbeats is stale: the controller then
    /// judges the node's pods by their spec alone.
    #[serde(default = "default_heartbeat")]
    #[schemars(range(min = 1, max = 3600))]
    pub heartbeat_seconds: i32,
    /// Set when the agent renews a heartbeat Lease (named after the node, in its namespace, labelled
    /// `keepalive.dev/node-heartbeat`) every `heartbeatSeconds` and rewrites this report only when a reading
    /// changed, or at least this often (to refresh connection counts). Absent: the report itself is rewritten
    /// every heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub refresh_seconds: Option<i32>,
    /// Seconds between two scans of the node: a running pod not in a report received two scans after the
    /// controller saw it running has no process the agent could find.
    #[serde(default = "default_scan_interval")]
    #[schemars(range(min = 1, max = 3600))]
    pub scan_interval_seconds: i32,
    /// The node's own values, which hostNetwork pods run with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_sysctls: Option<LiveKeepalive>,
    /// How the agent read the connections: socket by socket, or only counted (and why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_reading: Option<ConnectionReading>,
    #[serde(default)]
    #[schemars(range(min = 0, max = 2000))]
    pub verified_pods: i32,
    #[serde(default)]
    #[schemars(range(min = 0, max = 2000))]
    pub unverified_pods: i32,
    /// One entry per pod found on the node (by the pod UID of its cgroup), hostNetwork pods excepted. The agent
    /// reads no Pod objects: the controller joins these UIDs to pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 2000),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["uid"])
    )]
    pub pods: Vec<PodLiveReport>,
}

fn default_heartbeat() -> i32 {
    60
}

fn default_scan_interval() -> i32 {
    10
}

/// Keepalive sysctls as the kernel holds them in one network namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveKeepalive {
    #[schemars(range(min = 0))]
    pub time: i32,
    #[schemars(range(min = 0))]
    pub interval: i32,
    #[schemars(range(min = 0))]
    pub probes: i32,
}

/// The live reading of one pod.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodLiveReport {
    /// The pod UID as kubelet names the pod's cgroup: the Pod's `metadata.uid`, or for a static pod the config
    /// hash its mirror pod carries in the `kubernetes.io/config.mirror` annotation.
    #[schemars(length(min = 32, max = 36), regex(pattern = r"^[0-9a-f-]+$"))]
    pub uid: String,
    /// The values in the pod's network namespace; absent when it could not be read (see `error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sysctls: Option<LiveKeepalive>,
    /// Established TCP connections (IPv4 and IPv6) in the pod's network namespace.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub established: i32,
    /// Of those, connections with the keepalive timer armed (SO_KEEPALIVE on).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub keepalive: i32,
    /// The connections read socket by socket (absent where the agent only counts them): their effective
    /// keepalive settings and the weakest destinations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sockets: Option<SocketSummary>,
    /// When these values were first read (they are rewritten only when they change).
    pub read_at: Time,
    /// Why the pod could not be read (no process, namespace owned by a user namespace of the pod, unreadable
    /// file), or why its connections were not counted (over the per-pod budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub error: Option<String>,
}

/// How a node's agent read connections.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionReading {
    pub method: ConnectionMethod,
    /// Why the agent fell back to counting, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub message: Option<String>,
}

/// How a node's agent read connections.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionMethod {
    /// Every established TCP socket read by a BPF iterator: SO_KEEPALIVE, the socket's own keepalive values,
    /// TCP_USER_TIMEOUT, addresses and process.
    PerSocket,
    /// Only counted (established, SO_KEEPALIVE armed), by sock_diag or the pods' socket descriptors.
    Counts,
}

/// Most distinct keepalive settings one pod entry lists (the rest are merged, pessimistically, into the last).
pub const MAX_SOCKET_GROUPS: usize = 8;
/// Most destinations one pod entry lists.
pub const MAX_WEAK_DESTINATIONS: usize = 5;

/// A pod's established connections, read socket by socket, grouped by their effective keepalive settings.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SocketSummary {
    /// Connections with the same effective settings, most connections first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub groups: Vec<SocketGroup>,
    /// The weakest destinations: connections without SO_KEEPALIVE first, then those that probe last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5))]
    pub weakest: Vec<Destination>,
}

/// Connections of a pod with the same effective keepalive settings.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct SocketGroup {
    #[schemars(range(min = 1))]
    pub connections: i32,
    /// SO_KEEPALIVE is on. Without it the values below are not used (and are 0).
    pub keepalive: bool,
    /// Where the idle time comes from: the socket's own TCP_KEEPIDLE, or the namespace's sysctl.
    pub idle_from: KeepaliveSource,
    /// Effective seconds idle before the first probe.
    #[schemars(range(min = 0))]
    pub idle_seconds: i32,
    /// Effective seconds between probes.
    #[schemars(range(min = 0))]
    pub interval_seconds: i32,
    /// Effective unanswered probes before the connection is dropped.
    #[schemars(range(min = 0))]
    pub probes: i32,
    /// TCP_USER_TIMEOUT in milliseconds (0: not set).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub user_timeout_ms: i64,
    /// Smaller groups merged into this one, with the longest idle, interval and count among them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub merged: bool,
}

/// Whose value a socket's keepalive idle time is.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeepaliveSource {
    /// The socket's own TCP_KEEPIDLE (set by the application or its runtime).
    Socket,
    /// The network namespace's `net.ipv4.tcp_keepalive_time`.
    Sysctl,
}

/// Connections of a pod to one remote address from one process, with the same keepalive.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    /// Remote address and port, as `10.0.3.4:5432` or `[fd00::1]:443`.
    #[schemars(length(max = 64))]
    pub remote: String,
    /// The command name of a process holding the connections.
    #[schemars(length(max = 16))]
    pub process: String,
    pub keepalive: bool,
    /// Effective seconds idle before the first probe (0 without SO_KEEPALIVE).
    #[schemars(range(min = 0))]
    pub idle_seconds: i32,
    #[schemars(range(min = 1))]
    pub connections: i32,
}

/// The generated node report CRD as YAML, as committed under `crds/` and the chart's `crds/`.
pub fn node_report_crd_yaml() -> String {
    generated_yaml(KeepaliveNodeReport::crd(), "crd node-reports")
}
