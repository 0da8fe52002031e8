//! Issuing: new CAs and serving certificates, and the PKI that follows a [`Step`].

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use super::{
    Lifetimes, Settings,
    inspect::{Findings, Pki, Step, first_der},
};

/// Certificates start this long before they are issued, for clocks that lag behind.
const BACKDATE: time::Duration = time::Duration::minutes(5);

/// A fresh CA and a serving certificate for `dns_names` (IP addresses allowed), with the default lifetimes.
pub fn issue(dns_names: &[String]) -> Result<Pki> {
    let settings = Settings {
        dns_names: dns_names.to_vec(),
        lifetimes: Lifetimes::default(),
    };
    apply(
        Step::ReplaceCa,
        &Pki::default(),
        None,
        &settings,
        OffsetDateTime::now_utc(),
    )
}

/// The PKI after `step`. `findings` are those of `pki` (they tell whether the old CA still verifies and so stays
/// trusted as the previous one); without them, nothing of `pki` is kept as previous.
pub fn apply(
    step: Step,
    pki: &Pki,
    findings: Option<&Findings>,
    settings: &Settings,
    now: OffsetDateTime,
) -> Result<Pki> {
    let ca_verifies = findings.is_some_and(|f| f.ca.verifies());
    let mut next = pki.clone();
    match step {
        Step::Keep => {}
        Step::IssueServing => {
            (next.cert, next.key) = serving(&pki.ca, &pki.ca_key, settings, now)?;
        }
        Step::AnnounceNextCa => next.next_ca = Some(new_ca(&settings.lifetimes, now)?),
        Step::SwitchToNextCa => {
            let Some((ca, ca_key)) = pki.next_ca.clone() else {
                bail!("no next CA to switch to");
            };
            (next.cert, next.key) = serving(&ca, &ca_key, settings, now)?;
            next.previous_ca = ca_verifies.then(|| pki.ca.clone());
            (next.ca, next.ca_key, next.next_ca) = (ca, ca_key, None);
        }
        Step::DropPrevious => next.previous_ca = None,
        Step::DropNext => next.next_ca = None,
        Step::ReplaceCa => {
            let (ca, ca_key) = new_ca(&settings.lifetimes, now)?;
            (next.cert, next.key) = serving(&ca, &ca_key, settings, now)?;
            next.previous_ca = ca_verifies.then(|| pki.ca.clone());
            (next.ca, next.ca_key, next.next_ca) = (ca, ca_key, None);
        }
    }
    Ok(next)
}

fn ca_params(now: OffsetDateTime, lifetimes: &Lifetimes) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    let issued = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    // Each CA gets its own name, so that two of them in a caBundle are told apart in logs.
    dn.push(DnType::CommonName, format!("keepalive-operator webhook CA {issued}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - BACKDATE;
    params.not_after = now + lifetimes.tls_ca_validity.0;
    Ok(params)
}

/// A new self-signed CA: (certificate PEM, key PEM).
fn new_ca(lifetimes: &Lifetimes, now: OffsetDateTime) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let cert = ca_params(now, lifetimes)?.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A serving certificate for the wanted names signed by the CA, living no longer than the CA:
/// (certificate PEM, key PEM).
fn serving(ca_pem: &str, ca_key_pem: &str, settings: &Settings, now: OffsetDateTime) -> Result<(String, String)> {
    let ca_der = first_der(ca_pem).context("the CA certificate does not parse")?;
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).context("the CA certificate does not parse")?;
    let ca_not_after = ca.validity().not_after.to_datetime();
    let ca_key = KeyPair::from_pem(ca_key_pem).context("the CA key does not parse")?;
    let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(ca_der.as_slice()), ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(settings.dns_names.clone())?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        settings
            .dns_names
            .first()
            .map(String::as_str)
            .unwrap_or("keepalive-operator"),
    );
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now - BACKDATE;
    params.not_after = (now + settings.lifetimes.tls_serving_validity.0).min(ca_not_after);
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}
