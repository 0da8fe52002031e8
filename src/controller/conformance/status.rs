//! A policy's status and conditions, built from its conformance summary.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::{AWAITING, Summary};
use crate::{
    api::KeepalivePolicyStatus,
    policy::{self, ClusterFacts, Reason},
};

/// How a policy's pods get their values at creation: its `Injected` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Injection {
    /// By the operator's webhook.
    Webhook,
    /// By the apiserver, through the MutatingAdmissionPolicy `name`.
    AdmissionPolicy { name: String },
    /// Not in the MutatingAdmissionPolicy `name` (`why`): by the fallback `webhook`, or not at all without one.
    Fallback {
        name: String,
        why: String,
        webhook: Option<String>,
    },
    /// Writing the MutatingAdmissionPolicy failed.
    Failing { error: String },
}

impl Injection {
    /// Status, reason and message of the `Injected` condition.
    pub fn condition(&self) -> (bool, &'static str, String) {
        match self {
            Injection::Webhook => (
                true,
                "Webhook",
                "pods are mutated at creation by the operator's webhook (pods created while no replica answers are \
                 reported NotMutated)"
                    .into(),
            ),
            Injection::AdmissionPolicy { name } => (
                true,
                "AdmissionPolicy",
                format!(
                    "pods are mutated at creation by the apiserver through the MutatingAdmissionPolicy {name}, \
                     with no webhook on the path"
                ),
            ),
            Injection::Fallback {
                name,
                why,
                webhook: Some(webhook),
            } => (
                true,
                "WebhookFallback",
                format!(
                    "not compiled into the MutatingAdmissionPolicy {name} ({why}): the pods it wins are mutated by \
                     the fallback webhook {webhook} (reported NotMutated when no replica answers)"
                ),
            ),
            Injection::Fallback {
                name,
                why,
                webhook: None,
            } => (
                false,
                "NotInjected",
                format!(
                    "not compiled into the MutatingAdmissionPolicy {name} ({why}) and no fallback webhook is \
                     configured: the pods it wins are not mutated"
                ),
            ),
            Injection::Failing { error } => (
                false,
                "AdmissionPolicyNotApplied",
                format!("writing the MutatingAdmissionPolicy failed (retrying): {error}"),
            ),
        }
    }
}

/// The status of a policy from its summary. Conditions keep their `lastTransitionTime` while their status does
/// not change; `now` stamps `lastEvaluated` and new transitions.
pub fn status(
    summary: &Summary,
    generation: Option<i64>,
    cluster: ClusterFacts,
    injection: &Injection,
    previous: Option<&KeepalivePolicyStatus>,
    now: &Time,
) -> KeepalivePolicyStatus {
    let blocked = summary.by_reason.get(&Reason::PodSecurityBlocks).copied().unwrap_or(0);
    let (ready, ready_reason, ready_message) = if !cluster.keepalive_sysctls_safe {
        (
            false,
            Reason::ClusterTooOld.as_str(),
            format!(
                "the cluster is older than 1.{}: kubelets reject the keepalive sysctls, so nothing is injected",
                policy::FIRST_SAFE_MINOR
            ),
        )
    } else if blocked > 0 {
        (
            false,
            Reason::PodSecurityBlocks.as_str(),
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
    let awaiting = summary.by_reason.get(&AWAITING).copied().unwrap_or(0);
    let all = summary.matched == summary.conformant + awaiting;
    let conformant_message = if summary.matched == 0 {
        "no pods match this policy".to_string()
    } else if all && awaiting > 0 {
        format!(
            "no matched pod violates the policy; {awaiting} of {} await their first live reading",
            summary.matched
        )
    } else if all {
        format!("all {} matched pods conform", summary.matched)
    } else {
        let reasons: Vec<String> = summary.by_reason.iter().map(|(r, n)| format!("{n} {r}")).collect();
        format!(
            "{} of {} matched pods do not conform: {}",
            summary.matched - summary.conformant - awaiting,
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
        {
            let (ok, reason, message) = injection.condition();
            condition("Injected", ok, reason, message, generation, previous, now)
        },
    ];
    KeepalivePolicyStatus {
        observed_generation: generation,
        matched_pods: Some(summary.matched),
        conformant_pods: Some(summary.conformant),
        live_verified_pods: Some(summary.live_verified),
        connections: summary.connections,
        connection_coverage: summary
            .connections
            .map(|c| format!("{}/{}", c.keepalive, c.established)),
        protected_connections: summary
            .connections
            .filter(|c| c.classified > 0)
            .map(|c| format!("{}/{}", c.protected + c.protected_by_app, c.classified)),
        violation_counts: summary.by_reason.iter().map(|(r, n)| (r.to_string(), *n)).collect(),
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
