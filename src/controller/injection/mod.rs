//! How pods get their values at creation: through the webhook, or (Kubernetes ≥ 1.36) through a
//! MutatingAdmissionPolicy the leader compiles from the policy set ([`crate::policy::admission_policy`]).
//!
//! In `admissionPolicy` mode the leader keeps one MutatingAdmissionPolicy and its binding in step with the policy
//! set by server-side apply (written only when the compiled objects change, and again every [`BACKSTOP`]), and
//! deletes them when there is no policy. Policies that do not fit the admission policy are left to a *fallback*
//! MutatingWebhookConfiguration (`--fallback-webhook-configuration`), registered only while some policy needs it;
//! each policy's `Injected` condition and the log say which way its pods are mutated. In `webhook` mode the leader
//! deletes what an earlier `admissionPolicy` mode left.
//!
//! The objects stay when the operator stops or loses the lead: the apiserver keeps mutating pods without it.

mod objects;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::Client;
use serde_json::Value;
use tokio::sync::watch;

use self::objects::Objects;
use super::{
    Caches,
    leader::Leadership,
    metrics::{ControllerMetrics, Way, WriteOutcome},
};
use crate::{
    controller::conformance::Injection,
    policy::{
        PolicySet,
        admission_policy::{self, AdmissionPolicy, CompileOptions, FailurePolicy},
    },
    webhook::Lookup,
};

/// Every object is applied again this often, even without a change (someone may have edited or deleted it).
const BACKSTOP: Duration = Duration::from_secs(300);
/// After a failed API call.
const RETRY: Duration = Duration::from_secs(5);

/// `--injection-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The operator's mutating webhook (any supported Kubernetes).
    #[value(name = "webhook")]
    Webhook,
    /// A MutatingAdmissionPolicy compiled from the policies (`admissionregistration.k8s.io/v1`, Kubernetes ≥ 1.36).
    #[value(name = "admissionPolicy")]
    AdmissionPolicy,
    /// `admissionPolicy` where the apiserver serves MutatingAdmissionPolicy v1, else `webhook`.
    #[value(name = "auto")]
    Auto,
}

#[derive(Clone, Debug, clap::Args)]
pub struct InjectionArgs {
    /// How pods get their values at creation: `webhook`, `admissionPolicy` (a MutatingAdmissionPolicy compiled
    /// from the policies, Kubernetes ≥ 1.36) or `auto` (admissionPolicy where the apiserver serves it).
    #[arg(long, env = "KEEPALIVE_INJECTION_MODE", value_enum, default_value_t = Mode::Auto)]
    pub injection_mode: Mode,
    /// Name of the MutatingAdmissionPolicy and of its binding.
    #[arg(long, env = "KEEPALIVE_ADMISSION_POLICY_NAME", default_value = admission_policy::NAME)]
    pub admission_policy_name: String,
    /// What the apiserver does when evaluating the admission policy fails: `Ignore` (the pod is created
    /// unchanged and reported later) or `Fail`.
    #[arg(long, env = "KEEPALIVE_ADMISSION_POLICY_FAILURE_POLICY", default_value = "Ignore", value_parser = failure_policy)]
    pub admission_policy_failure_policy: FailurePolicy,
    /// JSON LabelSelector on namespaces for the binding (the webhook's namespaceSelector, exclusions included).
    #[arg(long, env = "KEEPALIVE_ADMISSION_POLICY_NAMESPACE_SELECTOR", value_parser = json_object)]
    pub admission_policy_namespace_selector: Option<Value>,
    /// JSON LabelSelector on pods for the binding (the webhook's objectSelector).
    #[arg(long, env = "KEEPALIVE_ADMISSION_POLICY_OBJECT_SELECTOR", value_parser = json_object)]
    pub admission_policy_object_selector: Option<Value>,
    /// Largest MutatingAdmissionPolicy to write, in bytes (at most 1000000); policies beyond it fall back to the
    /// webhook.
    #[arg(long, env = "KEEPALIVE_ADMISSION_POLICY_MAX_BYTES", default_value_t = admission_policy::MAX_OBJECT_BYTES,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1_024..=admission_policy::MAX_OBJECT_BYTES as u64))]
    pub admission_policy_max_bytes: usize,
    /// JSON of the MutatingWebhookConfiguration registered while some policies do not fit the admission policy
    /// (admissionPolicy mode); without it such policies are not injected (and say so).
    #[arg(long, env = "KEEPALIVE_FALLBACK_WEBHOOK_CONFIGURATION", value_parser = fallback_configuration)]
    pub fallback_webhook_configuration: Option<Fallback>,
    /// ClusterRole set as the owner of every object the operator creates for injection, so that deleting it
    /// (uninstalling the operator) deletes them.
    #[arg(long, env = "KEEPALIVE_OWNER_CLUSTER_ROLE")]
    pub owner_cluster_role: Option<String>,
}

/// The fallback webhook configuration, checked at start.
#[derive(Clone, Debug)]
pub struct Fallback {
    pub name: String,
    pub object: Value,
}

fn failure_policy(s: &str) -> Result<FailurePolicy, String> {
    match s {
        "Ignore" => Ok(FailurePolicy::Ignore),
        "Fail" => Ok(FailurePolicy::Fail),
        other => Err(format!("`{other}`: expected Ignore or Fail")),
    }
}

fn json_object(s: &str) -> Result<Value, String> {
    let value: Value = serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))?;
    let _: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector =
        serde_json::from_value(value.clone()).map_err(|e| format!("not a LabelSelector: {e}"))?;
    Ok(value)
}

fn fallback_configuration(s: &str) -> Result<Fallback, String> {
    let mut object: Value = serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))?;
    let parsed: MutatingWebhookConfiguration =
        serde_json::from_value(object.clone()).map_err(|e| format!("not a MutatingWebhookConfiguration: {e}"))?;
    let name = parsed
        .metadata
        .name
        .filter(|n| !n.is_empty())
        .ok_or("metadata.name is missing")?;
    if parsed.webhooks.unwrap_or_default().is_empty() {
        return Err("it has no webhooks".into());
    }
    object["apiVersion"] = "admissionregistration.k8s.io/v1".into();
    object["kind"] = "MutatingWebhookConfiguration".into();
    Ok(Fallback { name, object })
}

/// The injection mode in effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved {
    Webhook,
    AdmissionPolicy,
}

/// Resolves `auto` by discovery; refuses `admissionPolicy` where the API is not served.
pub async fn resolve(client: &Client, mode: Mode) -> Result<Resolved> {
    if mode == Mode::Webhook {
        return Ok(Resolved::Webhook);
    }
    let served = admission_policy_served(client).await?;
    match (mode, served) {
        (_, true) => Ok(Resolved::AdmissionPolicy),
        (Mode::AdmissionPolicy, false) => bail!(
            "--injection-mode=admissionPolicy: the apiserver does not serve admissionregistration.k8s.io/v1 \
             mutatingadmissionpolicies (Kubernetes 1.36 or newer); use webhook or auto"
        ),
        _ => Ok(Resolved::Webhook),
    }
}

/// Whether the apiserver serves MutatingAdmissionPolicy v1 (GA in Kubernetes 1.36).
pub async fn admission_policy_served(client: &Client) -> Result<bool> {
    match client.list_api_group_resources("admissionregistration.k8s.io/v1").await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == objects::POLICIES.plural)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e).context("discovering admissionregistration.k8s.io/v1"),
    }
}

/// What the leader last did about injection, for the policies' `Injected` conditions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// `None` until the leader has compiled and applied once (statuses wait for it).
    pub mode: Option<Resolved>,
    pub policy_name: String,
    /// Policies left out of the admission policy, and why.
    pub not_compiled: BTreeMap<String, String>,
    /// The fallback webhook configuration, when one is configured.
    pub fallback: Option<String>,
    /// The last write of the objects failed.
    pub error: Option<String>,
}

impl Report {
    /// The way a policy's pods are mutated.
    pub fn injection(&self, policy: &str) -> Injection {
        match self.mode {
            None | Some(Resolved::Webhook) => Injection::Webhook,
            Some(Resolved::AdmissionPolicy) => match (self.not_compiled.get(policy), &self.error) {
                (_, Some(error)) => Injection::Failing { error: error.clone() },
                (None, None) => Injection::AdmissionPolicy {
                    name: self.policy_name.clone(),
                },
                (Some(why), None) => Injection::Fallback {
                    name: self.policy_name.clone(),
                    why: why.clone(),
                    webhook: self.fallback.clone(),
                },
            },
        }
    }
}

/// The readers' end of the report.
pub type Reports = watch::Receiver<Arc<Report>>;

pub fn channel() -> (watch::Sender<Arc<Report>>, Reports) {
    watch::channel(Arc::new(Report::default()))
}

/// One replica's injection work: [`Injector::run`] keeps the objects as the mode wants them while it leads.
pub struct Injector {
    caches: Arc<Caches>,
    args: InjectionArgs,
    mode: Resolved,
    objects: Objects,
    report: watch::Sender<Arc<Report>>,
    metrics: ControllerMetrics,
    /// The last set compiled (this term), and what it gave.
    compiled: Option<(Arc<PolicySet>, Arc<CompileOutput>)>,
}

type CompileOutput = (AdmissionPolicy, BTreeMap<String, String>, Option<String>);

impl Injector {
    pub fn new(
        client: Client,
        caches: Arc<Caches>,
        args: InjectionArgs,
        mode: Resolved,
        report: watch::Sender<Arc<Report>>,
        metrics: ControllerMetrics,
    ) -> Self {
        let objects = Objects::new(client, &args);
        Injector {
            caches,
            args,
            mode,
            objects,
            report,
            metrics,
            compiled: None,
        }
    }

    /// Runs until `shutdown` fires.
    pub async fn run(mut self, mut leading: Leadership, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                led = leading.acquired() => if !led { return },
                _ = shutdown.changed() => return,
            }
            let this_term = leading.clone();
            tokio::select! {
                _ = leading.lost() => {
                    tracing::info!("no longer leading: the injection objects are left to the next leader");
                }
                _ = self.lead(&this_term) => return,
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Never returns; dropped when the lead ends.
    async fn lead(&mut self, leading: &Leadership) {
        self.objects.forget();
        self.compiled = None;
        let owner = self.owner().await;
        let mut changes = self.caches.subscribe();
        let mut last_not_compiled: Option<BTreeMap<String, String>> = None;
        loop {
            let wake = match self.mode {
                Resolved::Webhook => {
                    self.publish(Report {
                        mode: Some(Resolved::Webhook),
                        ..Report::default()
                    });
                    match self.objects.remove_all(leading).await {
                        Ok(()) => None,
                        Err(e) => {
                            tracing::warn!(
                                error = format!("{e:#}"),
                                "removing admission-policy objects left from admissionPolicy mode failed; retrying"
                            );
                            Some(RETRY)
                        }
                    }
                }
                Resolved::AdmissionPolicy if !self.caches.ready() => Some(Duration::from_millis(200)),
                Resolved::AdmissionPolicy => {
                    let (wake, compiled) = self.sync(leading, &owner).await;
                    if last_not_compiled.as_ref() != Some(&compiled.not_compiled) {
                        log_not_compiled(&compiled, self.args.fallback_webhook_configuration.as_ref());
                        last_not_compiled = Some(compiled.not_compiled);
                    }
                    Some(wake)
                }
            };
            match wake {
                Some(after) => tokio::select! {
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep(after) => {}
                },
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// Compiles and writes; returns when to look again and the policies left out.
    async fn sync(&mut self, leading: &Leadership, owner: &Option<Value>) -> (Duration, Compiled) {
        let set = self.caches.policies();
        // Namespace changes wake this too; the policy set (and so the compiled objects) is often the same.
        let cached = self.compiled.as_ref().filter(|(last, _)| Arc::ptr_eq(last, &set));
        let output = match cached {
            Some((_, output)) => output.clone(),
            None => {
                let output = Arc::new(self.compile(&set, owner));
                self.compiled = Some((set.clone(), output.clone()));
                output
            }
        };
        let (compiled, not_compiled, detail) = (&output.0, output.1.clone(), output.2.clone());
        let fallback = self.args.fallback_webhook_configuration.as_ref();
        let written = self
            .objects
            .write(
                leading,
                (!set.is_empty()).then_some(compiled),
                !not_compiled.is_empty(),
                owner,
            )
            .await;
        self.metrics.admission_policy_write(match &written {
            Ok(true) => WriteOutcome::Written,
            Ok(false) => WriteOutcome::Unchanged,
            Err(_) => WriteOutcome::Failed,
        });
        let compiled_count = if set.is_empty() { 0 } else { compiled.compiled };
        let bytes = serde_json::to_vec(&compiled.policy).map_or(0, |v| v.len());
        self.metrics
            .admission_policy_bytes
            .set(if set.is_empty() { 0 } else { bytes as i64 });
        self.metrics.injection_policies(Way::AdmissionPolicy, compiled_count);
        let (fallen, lost) = match fallback {
            Some(_) => (not_compiled.len(), 0),
            None => (0, not_compiled.len()),
        };
        self.metrics.injection_policies(Way::FallbackWebhook, fallen);
        self.metrics.injection_policies(Way::NotInjected, lost);
        let (wake, error) = match written {
            Ok(_) => (BACKSTOP, None),
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "writing the MutatingAdmissionPolicy failed; retrying"
                );
                (RETRY, Some(format!("{e:#}")))
            }
        };
        self.publish(Report {
            mode: Some(Resolved::AdmissionPolicy),
            policy_name: self.args.admission_policy_name.clone(),
            not_compiled: not_compiled.clone(),
            fallback: fallback.map(|f| f.name.clone()),
            error,
        });
        (wake, Compiled { not_compiled, detail })
    }

    /// The objects for `set`, the policies left out (and why), and the compiler's message about them.
    fn compile(&self, set: &PolicySet, owner: &Option<Value>) -> CompileOutput {
        let options = CompileOptions {
            name: self.args.admission_policy_name.clone(),
            failure_policy: self.args.admission_policy_failure_policy,
            excluded_namespaces: Vec::new(),
            namespace_selector: self.args.admission_policy_namespace_selector.clone(),
            object_selector: self.args.admission_policy_object_selector.clone(),
            owner_references: owner.iter().cloned().collect(),
            max_object_bytes: self.args.admission_policy_max_bytes,
        };
        match admission_policy::compile(set, &options) {
            Ok(compiled) => (compiled, BTreeMap::new(), None),
            Err(e) => {
                let left_out = e
                    .not_compiled
                    .iter()
                    .map(|(n, why)| (n.clone(), why.to_string()))
                    .collect();
                let detail = e.to_string();
                (*e.partial, left_out, Some(detail))
            }
        }
    }

    fn publish(&self, report: Report) {
        self.report.send_if_modified(|current| {
            let changed = **current != report;
            if changed {
                *current = Arc::new(report);
            }
            changed
        });
    }

    /// The ownerReference of `--owner-cluster-role`, read once per term.
    async fn owner(&self) -> Option<Value> {
        let name = self.args.owner_cluster_role.as_deref()?;
        for attempt in 1..=3 {
            match self.objects.cluster_role_uid(name).await {
                Ok(uid) => {
                    return Some(serde_json::json!({
                        "apiVersion": "rbac.authorization.k8s.io/v1",
                        "kind": "ClusterRole",
                        "name": name,
                        "uid": uid,
                    }));
                }
                Err(e) if attempt == 3 => {
                    tracing::warn!(
                        cluster_role = name,
                        error = format!("{e:#}"),
                        "cannot read the owner ClusterRole: the injection objects get no owner (they stay when the operator is uninstalled)"
                    );
                }
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
        None
    }
}

/// What one compilation left out.
struct Compiled {
    not_compiled: BTreeMap<String, String>,
    /// The compiler's error: the policies left out in precedence order, and why.
    detail: Option<String>,
}

fn log_not_compiled(compiled: &Compiled, fallback: Option<&Fallback>) {
    let Some(detail) = &compiled.detail else {
        tracing::info!("every KeepalivePolicy is compiled into the MutatingAdmissionPolicy");
        return;
    };
    match fallback {
        Some(f) => tracing::warn!(
            policies = compiled.not_compiled.len(),
            webhook = %f.name,
            "{detail}: they are injected by the fallback webhook"
        ),
        None => tracing::error!(
            policies = compiled.not_compiled.len(),
            "{detail}, and no fallback webhook is configured (--fallback-webhook-configuration): their pods are \
             not mutated"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(not_compiled: &[(&str, &str)], fallback: Option<&str>, error: Option<&str>) -> Report {
        Report {
            mode: Some(Resolved::AdmissionPolicy),
            policy_name: "kp".into(),
            not_compiled: not_compiled
                .iter()
                .map(|(n, w)| (n.to_string(), w.to_string()))
                .collect(),
            fallback: fallback.map(String::from),
            error: error.map(String::from),
        }
    }

    #[test]
    fn each_policy_is_told_which_way_its_pods_go() {
        let r = report(&[("late", "too large")], Some("kp-fallback"), None);
        let (ok, reason, message) = r.injection("early").condition();
        assert!(ok);
        assert_eq!(reason, "AdmissionPolicy");
        assert!(message.contains("kp"), "{message}");
        let (ok, reason, message) = r.injection("late").condition();
        assert!(ok);
        assert_eq!(reason, "WebhookFallback");
        assert!(
            message.contains("too large") && message.contains("kp-fallback"),
            "{message}"
        );

        let without = report(&[("late", "too large")], None, None);
        let (ok, reason, _) = without.injection("late").condition();
        assert!(!ok, "no fallback: not injected");
        assert_eq!(reason, "NotInjected");

        let failing = report(&[], Some("kp-fallback"), Some("403 forbidden"));
        let (ok, reason, message) = failing.injection("early").condition();
        assert!(!ok);
        assert_eq!(reason, "AdmissionPolicyNotApplied");
        assert!(message.contains("403"), "{message}");

        for r in [
            Report::default(),
            Report {
                mode: Some(Resolved::Webhook),
                ..Report::default()
            },
        ] {
            assert_eq!(r.injection("any").condition().1, "Webhook");
        }
    }

    #[test]
    fn flags_are_checked_at_start() {
        assert!(failure_policy("Fail").is_ok() && failure_policy("fail").is_err());
        assert!(json_object(r#"{"matchLabels": {"a": "b"}}"#).is_ok());
        assert!(
            json_object(r#"{"matchLabels": "b"}"#)
                .unwrap_err()
                .contains("LabelSelector")
        );
        assert!(json_object("{").unwrap_err().contains("not JSON"));
        let ok = fallback_configuration(
            r#"{"metadata": {"name": "f"}, "webhooks": [{"name": "w.x", "clientConfig": {"url": "https://a/m"},
               "sideEffects": "None", "admissionReviewVersions": ["v1"]}]}"#,
        )
        .unwrap();
        assert_eq!(ok.name, "f");
        assert_eq!(ok.object["kind"], "MutatingWebhookConfiguration");
        assert!(
            fallback_configuration(r#"{"metadata": {"name": "f"}, "webhooks": []}"#)
                .unwrap_err()
                .contains("no webhooks")
        );
        assert!(
            fallback_configuration(r#"{"metadata": {}, "webhooks": []}"#)
                .unwrap_err()
                .contains("metadata.name")
        );
    }
}
