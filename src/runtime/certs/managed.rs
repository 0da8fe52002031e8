//! Self-managed certificates, the I/O around [`inspect`] and [`decide`]: watches the Secret and the webhook
//! configuration (one named object each), writes the Secret with resourceVersion preconditions (so replicas never
//! overwrite each other's PKI), keeps the caBundle in sync, times the rotation overlaps and serves the result.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use futures::{FutureExt, StreamExt, stream};
use k8s_openapi::{
    ByteString,
    api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Secret},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use time::OffsetDateTime;

use super::{
    CertStore, Settings, TlsArgs,
    inspect::{Findings, Pki, Step, decide, first_der, inspect},
    issue::apply,
};
use crate::{api::OPERATOR_MANAGER, runtime::watch::logged};

/// Even without any change or due date, everything is checked this often.
const BACKSTOP: Duration = Duration::from_secs(600);
/// After a failed API call.
const RETRY: Duration = Duration::from_secs(2);
/// Steps (and conflicts) handled in one go before waiting for the next event.
const MAX_STEPS: usize = 8;

const ANNOTATION_NOT_AFTER: &str = "keepalive.dev/not-after";
const ANNOTATION_CA_NOT_AFTER: &str = "keepalive.dev/ca-not-after";
const ANNOTATION_DNS_NAMES: &str = "keepalive.dev/dns-names";

pub(super) struct Manager {
    store: Arc<CertStore>,
    secrets: Api<Secret>,
    configs: Api<MutatingWebhookConfiguration>,
    secret_name: String,
    namespace: String,
    config_name: String,
    settings: Settings,
    /// The rotation phase this replica has seen holding (caBundle in sync, new certificate served), and since when.
    phase: Option<(String, Instant)>,
}

/// How one pass ended.
enum Pass {
    /// Settled; look again at this instant (or on the next event).
    Settled(Instant),
    /// Something was written or changed under us: read again now.
    Again,
}

impl Manager {
    pub(super) fn new(store: Arc<CertStore>, client: Client, args: &TlsArgs) -> Manager {
        Manager {
            store,
            secrets: Api::namespaced(client.clone(), &args.namespace),
            configs: Api::all(client),
            secret_name: args.tls_secret.clone(),
            namespace: args.namespace.clone(),
            config_name: args.webhook_configuration.clone(),
            settings: Settings {
                dns_names: args.dns_names(),
                lifetimes: args.lifetimes,
            },
            phase: None,
        }
    }

    /// Runs forever: a pass on every change of the Secret or the configuration, at every due date and at least
    /// every [`BACKSTOP`]. Errors are logged and retried; nothing in the Secret can stop it.
    pub(super) async fn run(mut self) {
        let named = |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
        let secret_events = logged(
            watcher(self.secrets.clone(), named(&self.secret_name)).default_backoff(),
            "webhook TLS Secret",
        )
        .map(|_| ());
        let config_events = logged(
            watcher(self.configs.clone(), named(&self.config_name)).default_backoff(),
            "webhook configuration",
        )
        .map(|_| ());
        let mut events = std::pin::pin!(stream::select(secret_events, config_events));
        loop {
            let wake = self.reconcile().await;
            tokio::select! {
                _ = events.next() => {
                    // Coalesce a burst (a relist, our own writes) into one pass.
                    while let Some(Some(())) = events.next().now_or_never() {}
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    /// Passes until settled; returns when to look again.
    async fn reconcile(&mut self) -> Instant {
        for _ in 0..MAX_STEPS {
            match self.pass().await {
                Ok(Pass::Settled(wake)) => return wake,
                Ok(Pass::Again) => continue,
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "checking the webhook certificates failed; retrying"
                    );
                    return Instant::now() + RETRY;
                }
            }
        }
        Instant::now() + RETRY
    }

    /// Reads the configuration, then the Secret (in this order, so that a caBundle written from a stale Secret
    /// fails its resourceVersion precondition); takes one step; serves; syncs the caBundle.
    async fn pass(&mut self) -> Result<Pass> {
        let config = self
            .configs
            .get_opt(&self.config_name)
            .await
            .context("reading the webhook configuration")?;
        let secret = self
            .secrets
            .get_opt(&self.secret_name)
            .await
            .context("reading the webhook TLS Secret")?;
        let now = OffsetDateTime::now_utc();
        let pki = secret
            .as_ref()
            .and_then(|s| s.data.as_ref())
            .map(Pki::from_data)
            .unwrap_or_default();
        let findings = inspect(&pki, &self.settings, now);
        let step = decide(&findings, self.phase_done(&pki));
        if step != Step::Keep {
            let next = apply(step, &pki, Some(&findings), &self.settings, now)?;
            if self.write(secret, &next).await? {
                tracing::info!(
                    step = step.as_str(),
                    found = %findings.summary(),
                    secret = %self.secret_name,
                    "webhook certificates changed"
                );
            }
            return Ok(Pass::Again);
        }
        self.serve(&pki, &findings);
        let in_sync = match config {
            None => true,
            Some(config) => match self.sync_ca_bundle(config, &pki.ca_bundle(&findings)).await? {
                Some(in_sync) => in_sync,
                None => return Ok(Pass::Again),
            },
        };
        self.observe_phase(&pki, in_sync);
        Ok(Pass::Settled(self.wake(&findings, now)))
    }

    /// Loads the Secret's serving certificate unless it is already served or not usable.
    fn serve(&self, pki: &Pki, findings: &Findings) {
        if !findings.serving.verifies() || self.store.served_der() == first_der(&pki.cert) {
            return;
        }
        match self.store.set_pem(pki.cert.as_bytes(), pki.key.as_bytes()) {
            Ok(()) => tracing::info!(secret = %self.secret_name, "serving certificate loaded"),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "the serving certificate is not usable"),
        }
    }

    /// Creates or replaces the Secret; the replace carries the resourceVersion read. False on a conflict (another
    /// replica wrote first).
    async fn write(&self, existing: Option<Secret>, pki: &Pki) -> Result<bool> {
        let mut secret = existing.unwrap_or_else(|| Secret {
            metadata: ObjectMeta {
                name: Some(self.secret_name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some([("app.kubernetes.io/managed-by".to_string(), OPERATOR_MANAGER.to_string())].into()),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            ..Default::default()
        });
        secret.data = Some(pki.to_data());
        secret.string_data = None;
        secret.metadata.managed_fields = None;
        // Informational only: never read back.
        let annotations = secret.metadata.annotations.get_or_insert_default();
        let rfc3339 = |pem: &str| {
            super::inspect::not_after_of(pem)
                .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
                .unwrap_or_default()
        };
        annotations.insert(ANNOTATION_NOT_AFTER.into(), rfc3339(&pki.cert));
        annotations.insert(ANNOTATION_CA_NOT_AFTER.into(), rfc3339(&pki.ca));
        annotations.insert(ANNOTATION_DNS_NAMES.into(), self.settings.dns_names.join(","));
        let written = if secret.metadata.resource_version.is_some() {
            self.secrets
                .replace(&self.secret_name, &PostParams::default(), &secret)
                .await
        } else {
            self.secrets.create(&PostParams::default(), &secret).await
        };
        match written {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e).context("writing the webhook TLS Secret"),
        }
    }

    /// Sets `caBundle` of every webhook of the configuration by server-side apply (owning only that field), with
    /// the configuration's resourceVersion as precondition. Some(true) when in sync, None on a conflict.
    async fn sync_ca_bundle(&self, config: MutatingWebhookConfiguration, bundle: &str) -> Result<Option<bool>> {
        let wanted = ByteString(bundle.as_bytes().to_vec());
        let webhooks = config.webhooks.unwrap_or_default();
        if webhooks
            .iter()
            .all(|w| w.client_config.ca_bundle.as_ref() == Some(&wanted))
        {
            return Ok(Some(true));
        }
        if bundle.is_empty() {
            return Ok(Some(false));
        }
        let patch = serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": { "name": self.config_name, "resourceVersion": config.metadata.resource_version },
            "webhooks": webhooks.iter().map(|w| serde_json::json!({
                "name": w.name,
                "clientConfig": { "caBundle": wanted },
            })).collect::<Vec<_>>(),
        });
        let patched = self
            .configs
            .patch(
                &self.config_name,
                &PatchParams::apply(OPERATOR_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await;
        match patched {
            Ok(_) => {
                tracing::info!(configuration = %self.config_name, cas = bundle.matches("BEGIN").count(), "webhook caBundle updated");
                Ok(Some(true))
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(None),
            Err(e) => Err(e).context("updating the webhook caBundle"),
        }
    }

    /// The rotation phase in progress, if any: phase 1 (a next CA announced) or phase 2 (a previous CA kept).
    fn phase_of(pki: &Pki) -> Option<String> {
        match (&pki.next_ca, &pki.previous_ca) {
            (Some((next, _)), _) => Some(format!("announce {next}")),
            (None, Some(_)) => Some(format!("switch {}", pki.ca)),
            (None, None) => None,
        }
    }

    /// Whether the current phase has held, as seen by this replica, for the overlap.
    fn phase_done(&self, pki: &Pki) -> bool {
        let overlap = self.settings.lifetimes.tls_ca_overlap.std();
        matches!((&self.phase, Self::phase_of(pki)), (Some((seen, since)), Some(now)) if *seen == now && since.elapsed() >= overlap)
    }

    /// A phase holds once the caBundle is in sync and, in phase 2, this replica serves the new certificate; the
    /// overlap counts from the first pass that sees it holding.
    fn observe_phase(&mut self, pki: &Pki, in_sync: bool) {
        let served = self.store.served_der();
        let serving_current = served.is_some() && served == first_der(&pki.cert);
        let holding = Self::phase_of(pki).filter(|_| in_sync && serving_current);
        match (&self.phase, holding) {
            (Some((seen, _)), Some(now)) if *seen == now => {}
            (_, Some(now)) => self.phase = Some((now, Instant::now())),
            (_, None) => self.phase = None,
        }
    }

    /// When to look again without an event: a due date of the certificates, the end of an overlap, the backstop.
    fn wake(&self, findings: &Findings, now: OffsetDateTime) -> Instant {
        let mut wake = Instant::now() + BACKSTOP;
        if let Some(due) = findings.due {
            let until: Duration = (due - now).try_into().unwrap_or_default();
            wake = wake.min(Instant::now() + until + Duration::from_millis(100));
        }
        if let Some((_, since)) = &self.phase {
            wake = wake.min(*since + self.settings.lifetimes.tls_ca_overlap.std());
        }
        // Never a busy loop, whatever the dates say.
        wake.max(Instant::now() + Duration::from_millis(100))
    }
}
