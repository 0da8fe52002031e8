//! The injection objects in the API: the MutatingAdmissionPolicy, its binding and the fallback webhook
//! configuration, written by server-side apply and deleted by name, each call bounded in time.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::{admissionregistration::v1::MutatingWebhookConfiguration, rbac::v1::ClusterRole};
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams},
};
use serde_json::Value;

use super::{BACKSTOP, Fallback, InjectionArgs};
use crate::{
    api::OPERATOR_MANAGER,
    controller::leader::Leadership,
    policy::admission_policy::{self, AdmissionPolicy},
};

/// The field manager of everything written here (apart from the caBundle, which the certificate manager owns).
pub const INJECTION_MANAGER: &str = "keepalive-operator-injection";
/// One API call may take this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Resource {
    pub kind: &'static str,
    pub plural: &'static str,
}

pub const POLICIES: Resource = Resource {
    kind: "MutatingAdmissionPolicy",
    plural: "mutatingadmissionpolicies",
};
pub const BINDINGS: Resource = Resource {
    kind: "MutatingAdmissionPolicyBinding",
    plural: "mutatingadmissionpolicybindings",
};

fn api(client: &Client, resource: &Resource) -> Api<DynamicObject> {
    let ar = ApiResource {
        group: "admissionregistration.k8s.io".into(),
        version: "v1".into(),
        api_version: "admissionregistration.k8s.io/v1".into(),
        kind: resource.kind.into(),
        plural: resource.plural.into(),
    };
    Api::all_with(client.clone(), &ar)
}

/// What was last written, so that unchanged objects are not written again before the backstop.
#[derive(Default, PartialEq)]
struct Written {
    policy: Option<Value>,
    fallback: Option<bool>,
}

pub struct Objects {
    policies: Api<DynamicObject>,
    bindings: Api<DynamicObject>,
    webhooks: Api<MutatingWebhookConfiguration>,
    roles: Api<ClusterRole>,
    name: String,
    fallback: Option<Fallback>,
    written: Written,
    written_at: Option<Instant>,
}

impl Objects {
    pub fn new(client: Client, args: &InjectionArgs) -> Self {
        Objects {
            policies: api(&client, &POLICIES),
            bindings: api(&client, &BINDINGS),
            webhooks: Api::all(client.clone()),
            roles: Api::all(client),
            name: args.admission_policy_name.clone(),
            fallback: args.fallback_webhook_configuration.clone(),
            written: Written::default(),
            written_at: None,
        }
    }

    /// A new term writes everything once.
    pub fn forget(&mut self) {
        self.written = Written::default();
        self.written_at = None;
    }

    pub async fn cluster_role_uid(&self, name: &str) -> Result<String> {
        let role = bounded(self.roles.get(name)).await?;
        role.metadata.uid.context("the ClusterRole has no uid")
    }

    /// Makes the objects what the mode wants: the compiled policy and binding (`None`: none, there is no
    /// policy), and the fallback webhook configuration while `fallback_needed`. When the fallback appears it is
    /// registered before the admission policy shrinks; when it goes, the grown admission policy is written first.
    /// `Ok(false)`: nothing to write (written lately as it is).
    pub async fn write(
        &mut self,
        leading: &Leadership,
        compiled: Option<&AdmissionPolicy>,
        fallback_needed: bool,
        owner: &Option<Value>,
    ) -> Result<bool> {
        let fallback_needed = fallback_needed && self.fallback.is_some();
        let wanted = Written {
            policy: compiled.map(|c| c.policy.clone()),
            fallback: Some(fallback_needed),
        };
        if self.written == wanted && self.written_at.is_some_and(|t| t.elapsed() < BACKSTOP / 2) {
            return Ok(false);
        }
        self.written_at = None;
        if fallback_needed {
            self.apply_fallback(leading, owner).await?;
        }
        match compiled {
            Some(compiled) => {
                apply(leading, &self.policies, &self.name, &compiled.policy).await?;
                apply(leading, &self.bindings, &self.name, &compiled.binding).await?;
            }
            None => {
                delete(leading, &self.bindings, &self.name).await?;
                delete(leading, &self.policies, &self.name).await?;
            }
        }
        if !fallback_needed && let Some(fallback) = &self.fallback {
            delete(leading, &self.webhooks, &fallback.name).await?;
        }
        self.written = wanted;
        self.written_at = Some(Instant::now());
        Ok(true)
    }

    /// Webhook mode: deletes the binding, the policy and the fallback configuration if they exist. Objects the
    /// API does not serve or the operator may not delete count as gone.
    pub async fn remove_all(&mut self, leading: &Leadership) -> Result<()> {
        let gone = |r: Result<()>| match r {
            Err(e)
                if e.downcast_ref::<kube::Error>()
                    .is_some_and(|e| matches!(e, kube::Error::Api(s) if s.code == 403 || s.code == 405)) =>
            {
                Ok(())
            }
            other => other,
        };
        gone(delete(leading, &self.bindings, &self.name).await)?;
        gone(delete(leading, &self.policies, &self.name).await)?;
        if let Some(fallback) = &self.fallback {
            gone(delete(leading, &self.webhooks, &fallback.name).await)?;
        }
        Ok(())
    }

    async fn apply_fallback(&self, leading: &Leadership, owner: &Option<Value>) -> Result<()> {
        let Some(fallback) = &self.fallback else { return Ok(()) };
        let mut object = fallback.object.clone();
        // Whoever rendered it (a chart), the operator manages this object.
        object["metadata"]["labels"][admission_policy::MANAGED_BY_LABEL] = OPERATOR_MANAGER.into();
        if let Some(owner) = owner {
            object["metadata"]["ownerReferences"] = Value::from(vec![owner.clone()]);
        }
        apply(leading, &self.webhooks, &fallback.name, &object).await
    }
}

async fn bounded<T>(call: impl Future<Output = kube::Result<T>>) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => Ok(result?),
        Err(_) => anyhow::bail!("no answer within {CALL_TIMEOUT:?}"),
    }
}

async fn apply<K>(leading: &Leadership, api: &Api<K>, name: &str, object: &Value) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    anyhow::ensure!(leading.is_leading_now(), "no longer leading");
    let params = PatchParams::apply(INJECTION_MANAGER).force();
    let kind = object["kind"].as_str().unwrap_or("object");
    bounded(api.patch(name, &params, &Patch::Apply(object)))
        .await
        .with_context(|| format!("applying {kind} {name}"))?;
    Ok(())
}

async fn delete<K>(leading: &Leadership, api: &Api<K>, name: &str) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    anyhow::ensure!(leading.is_leading_now(), "no longer leading");
    match bounded(api.delete(name, &DeleteParams::default())).await {
        Ok(_) => {
            tracing::info!(name, "deleted an injection object that is no longer needed");
            Ok(())
        }
        Err(e)
            if e.downcast_ref::<kube::Error>()
                .is_some_and(|e| matches!(e, kube::Error::Api(s) if s.code == 404)) =>
        {
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("deleting {name}")),
    }
}
