//! What is wrong with a self-managed PKI, read from the certificates themselves, and what to do about it. Pure:
//! PEM texts and a clock in, findings and a step out.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use base64::Engine;
use k8s_openapi::ByteString;
use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use time::OffsetDateTime;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName};

use super::Settings;

/// The Secret's keys.
pub(super) const CA_CRT: &str = "ca.crt";
pub(super) const CA_KEY: &str = "ca.key";
pub(super) const TLS_CRT: &str = "tls.crt";
pub(super) const TLS_KEY: &str = "tls.key";
pub(super) const NEXT_CA_CRT: &str = "next-ca.crt";
pub(super) const NEXT_CA_KEY: &str = "next-ca.key";
pub(super) const PREVIOUS_CA_CRT: &str = "previous-ca.crt";

/// PEM texts of the self-managed PKI, as kept in the Secret (a missing key reads as empty text).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pki {
    pub ca: String,
    pub ca_key: String,
    pub cert: String,
    pub key: String,
    /// Phase 1 of a CA rotation: the CA that takes over, already trusted in the caBundle.
    pub next_ca: Option<(String, String)>,
    /// Phase 2 of a CA rotation: the CA that signed the certificates served before, still trusted.
    pub previous_ca: Option<String>,
}

impl Pki {
    pub fn from_data(data: &BTreeMap<String, ByteString>) -> Pki {
        let text = |k: &str| data.get(k).map(|b| String::from_utf8_lossy(&b.0).into_owned());
        Pki {
            ca: text(CA_CRT).unwrap_or_default(),
            ca_key: text(CA_KEY).unwrap_or_default(),
            cert: text(TLS_CRT).unwrap_or_default(),
            key: text(TLS_KEY).unwrap_or_default(),
            next_ca: text(NEXT_CA_CRT).map(|c| (c, text(NEXT_CA_KEY).unwrap_or_default())),
            previous_ca: text(PREVIOUS_CA_CRT),
        }
    }

    pub fn to_data(&self) -> BTreeMap<String, ByteString> {
        let mut data = vec![
            (CA_CRT, &self.ca),
            (CA_KEY, &self.ca_key),
            (TLS_CRT, &self.cert),
            (TLS_KEY, &self.key),
        ];
        if let Some((crt, key)) = &self.next_ca {
            data.extend([(NEXT_CA_CRT, crt), (NEXT_CA_KEY, key)]);
        }
        if let Some(crt) = &self.previous_ca {
            data.push((PREVIOUS_CA_CRT, crt));
        }
        data.into_iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.clone().into_bytes())))
            .collect()
    }

    /// The CAs a client must trust: previous, current and next CA, each only if it can verify anything (parses,
    /// is a CA, has not expired). Canonical PEM, so equal bundles are equal bytes.
    pub fn ca_bundle(&self, findings: &Findings) -> String {
        let previous = self
            .previous_ca
            .as_deref()
            .filter(|_| findings.previous.is_some_and(Health::verifies));
        let current = Some(self.ca.as_str()).filter(|_| findings.ca.verifies());
        let next = self
            .next_ca
            .as_ref()
            .map(|(c, _)| c.as_str())
            .filter(|_| findings.next.is_some_and(Health::verifies));
        [previous, current, next]
            .into_iter()
            .flatten()
            .filter_map(first_der)
            .map(|der| to_pem(&der))
            .collect()
    }
}

/// What can be wrong with one certificate (or its key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    Missing,
    Unparseable,
    KeyUnusable,
    KeyMismatch,
    NotACa,
    NotYetValid,
    Expired,
    ExpiresSoon,
    WrongNames,
    NotForServing,
    NotSignedByCa,
}

impl Problem {
    pub const fn as_str(self) -> &'static str {
        match self {
            Problem::Missing => "missing",
            Problem::Unparseable => "not a PEM X.509 certificate",
            Problem::KeyUnusable => "private key unusable",
            Problem::KeyMismatch => "private key does not match the certificate",
            Problem::NotACa => "not a CA",
            Problem::NotYetValid => "not valid yet",
            Problem::Expired => "expired",
            Problem::ExpiresSoon => "expires soon",
            Problem::WrongNames => "wrong DNS names",
            Problem::NotForServing => "not for server authentication",
            Problem::NotSignedByCa => "not signed by ca.crt",
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state of one certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Good,
    /// Usable now, but due for renewal.
    Renew(Problem),
    /// Not usable.
    Broken(Problem),
}

impl Health {
    /// Usable now (good or due for renewal).
    pub fn verifies(self) -> bool {
        !matches!(self, Health::Broken(_))
    }

    fn problem(self) -> Option<Problem> {
        match self {
            Health::Good => None,
            Health::Renew(p) | Health::Broken(p) => Some(p),
        }
    }
}

/// What [`inspect`] found in a PKI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Findings {
    /// `ca.crt` as a trust anchor.
    pub ca: Health,
    /// `ca.key` parses and belongs to `ca.crt`: the CA can sign.
    pub ca_can_sign: bool,
    /// `tls.crt` with `tls.key`, checked against `ca.crt` and the wanted names.
    pub serving: Health,
    /// `next-ca.crt` with its key, when present.
    pub next: Option<Health>,
    /// `previous-ca.crt`, when present.
    pub previous: Option<Health>,
    /// The next moment the findings change by the clock alone (a renewal window opens, a certificate expires).
    pub due: Option<OffsetDateTime>,
}

impl Findings {
    /// A short description for logs, e.g. `ca ok, serving: expired`.
    pub fn summary(&self) -> String {
        let part = |name: &str, h: Option<Health>| h.and_then(Health::problem).map(|p| format!("{name}: {p}"));
        let parts: Vec<String> = [
            part("ca", Some(self.ca)),
            (!self.ca_can_sign && self.ca.verifies()).then(|| "ca.key: cannot sign".to_string()),
            part("serving", Some(self.serving)),
            part("next ca", self.next),
            part("previous ca", self.previous),
        ]
        .into_iter()
        .flatten()
        .collect();
        if parts.is_empty() {
            "all good".into()
        } else {
            parts.join(", ")
        }
    }
}

/// Checks every certificate of `pki` at `now` against `settings`. Nothing is taken from annotations.
pub fn inspect(pki: &Pki, settings: &Settings, now: OffsetDateTime) -> Findings {
    let lt = &settings.lifetimes;
    let mut due = Vec::new();
    let ca_der = first_der(&pki.ca);
    let ca = ca_der.as_deref().map(parse);
    let (ca_health, ca_not_after) = match &ca {
        None => (Health::Broken(missing_or_unparseable(&pki.ca)), None),
        Some(Err(p)) => (Health::Broken(*p), None),
        Some(Ok(c)) => (check_ca(c, lt.tls_ca_renew_before.0, now, &mut due), Some(not_after(c))),
    };
    let ca_can_sign = matches!(&ca, Some(Ok(c)) if key_matches(&pki.ca_key, c) == Ok(()));

    let serving = match first_der(&pki.cert).as_deref().map(parse) {
        None => Health::Broken(missing_or_unparseable(&pki.cert)),
        Some(Err(p)) => Health::Broken(p),
        Some(Ok(cert)) => match key_matches(&pki.key, &cert) {
            Err(p) => Health::Broken(p),
            Ok(()) => check_serving(
                &cert,
                ca.as_ref().and_then(|c| c.as_ref().ok()),
                ca_not_after,
                settings,
                now,
                &mut due,
            ),
        },
    };

    let next = pki
        .next_ca
        .as_ref()
        .map(|(crt, key)| match first_der(crt).as_deref().map(parse) {
            None => Health::Broken(missing_or_unparseable(crt)),
            Some(Err(p)) => Health::Broken(p),
            Some(Ok(c)) => match (
                check_ca(&c, lt.tls_ca_renew_before.0, now, &mut due),
                key_matches(key, &c),
            ) {
                (Health::Good, Err(p)) => Health::Broken(p),
                (health, _) => health,
            },
        });
    let previous = pki
        .previous_ca
        .as_ref()
        .map(|crt| match first_der(crt).as_deref().map(parse) {
            None => Health::Broken(missing_or_unparseable(crt)),
            Some(Err(p)) => Health::Broken(p),
            // Only whether it still verifies matters: it is on its way out.
            Some(Ok(c)) => match check_ca(&c, time::Duration::ZERO, now, &mut due) {
                Health::Broken(p) => Health::Broken(p),
                _ => Health::Good,
            },
        });
    Findings {
        ca: ca_health,
        ca_can_sign,
        serving,
        next,
        previous,
        due: due.into_iter().filter(|t| *t > now).min(),
    }
}

/// What to do next, from the findings and whether the current rotation phase has lasted the overlap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to change.
    Keep,
    /// A new serving certificate from the current CA (the caBundle does not change).
    IssueServing,
    /// Phase 1: a next CA, added to the caBundle; the serving certificate stays.
    AnnounceNextCa,
    /// Phase 2: the next CA becomes the CA and signs a new serving certificate; the old CA stays trusted.
    SwitchToNextCa,
    /// Phase 3: the previous CA is no longer trusted.
    DropPrevious,
    /// A next CA that is not needed (any more) is dropped before anything was signed with it.
    DropNext,
    /// A new CA and serving certificate at once, because the current CA cannot sign what is needed now; the old
    /// CA stays trusted as the previous one when it still verifies.
    ReplaceCa,
}

impl Step {
    pub const fn as_str(self) -> &'static str {
        match self {
            Step::Keep => "keep",
            Step::IssueServing => "issue serving certificate",
            Step::AnnounceNextCa => "announce next CA",
            Step::SwitchToNextCa => "switch to next CA",
            Step::DropPrevious => "drop previous CA",
            Step::DropNext => "drop next CA",
            Step::ReplaceCa => "replace CA",
        }
    }
}

/// The next step for `findings`; `overlap_done` tells whether the current phase (1 or 2) has lasted the
/// overlap, as observed by this replica.
pub fn decide(f: &Findings, overlap_done: bool) -> Step {
    let next_good = f.next == Some(Health::Good);
    let now_or_new = if next_good {
        Step::SwitchToNextCa
    } else {
        Step::ReplaceCa
    };
    if !f.ca.verifies() {
        return now_or_new;
    }
    match f.serving {
        Health::Broken(_) | Health::Renew(_) if f.ca_can_sign => return Step::IssueServing,
        Health::Broken(_) => return now_or_new,
        _ => {}
    }
    // The served certificate is fine; the CA may need a rotation (with overlaps).
    let ca_due = matches!(f.ca, Health::Renew(_)) || !f.ca_can_sign || matches!(f.serving, Health::Renew(_));
    if ca_due {
        return match (next_good, overlap_done) {
            (true, true) => Step::SwitchToNextCa,
            (true, false) => Step::Keep,
            (false, _) => Step::AnnounceNextCa,
        };
    }
    if f.next.is_some() {
        return Step::DropNext;
    }
    match f.previous {
        Some(previous) if overlap_done || !previous.verifies() => Step::DropPrevious,
        _ => Step::Keep,
    }
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, Problem> {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => Ok(cert),
        Err(_) => Err(Problem::Unparseable),
    }
}

fn not_after(c: &X509Certificate<'_>) -> OffsetDateTime {
    c.validity().not_after.to_datetime()
}

/// Validity at `now` (and its due times), or the problem.
fn check_time(
    c: &X509Certificate<'_>,
    renew_before: time::Duration,
    now: OffsetDateTime,
    due: &mut Vec<OffsetDateTime>,
) -> Health {
    let (from, until) = (c.validity().not_before.to_datetime(), not_after(c));
    due.extend([from, until - renew_before, until]);
    if now < from {
        Health::Broken(Problem::NotYetValid)
    } else if now >= until {
        Health::Broken(Problem::Expired)
    } else if until - now <= renew_before {
        Health::Renew(Problem::ExpiresSoon)
    } else {
        Health::Good
    }
}

fn check_ca(
    c: &X509Certificate<'_>,
    renew_before: time::Duration,
    now: OffsetDateTime,
    due: &mut Vec<OffsetDateTime>,
) -> Health {
    let is_ca = matches!(c.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    let may_sign = match c.key_usage() {
        Ok(Some(ku)) => ku.value.key_cert_sign(),
        Ok(None) => true,
        Err(_) => false,
    };
    if !is_ca || !may_sign {
        return Health::Broken(Problem::NotACa);
    }
    check_time(c, renew_before, now, due)
}

fn check_serving(
    cert: &X509Certificate<'_>,
    ca: Option<&X509Certificate<'_>>,
    ca_not_after: Option<OffsetDateTime>,
    settings: &Settings,
    now: OffsetDateTime,
    due: &mut Vec<OffsetDateTime>,
) -> Health {
    let signed = ca.is_some_and(|ca| {
        cert.issuer().as_raw() == ca.subject().as_raw() && cert.verify_signature(Some(ca.public_key())).is_ok()
    });
    if !signed {
        return Health::Broken(Problem::NotSignedByCa);
    }
    if let Ok(Some(eku)) = cert.extended_key_usage()
        && !(eku.value.server_auth || eku.value.any)
    {
        return Health::Broken(Problem::NotForServing);
    }
    if names(cert) != wanted_names(&settings.dns_names) {
        return Health::Broken(Problem::WrongNames);
    }
    match check_time(cert, settings.lifetimes.tls_renew_before.0, now, due) {
        // A certificate that already lives as long as its CA gains nothing from renewal: the CA's rotation
        // replaces it.
        Health::Renew(_) if ca_not_after.is_some_and(|ca| ca <= not_after(cert)) => Health::Good,
        health => health,
    }
}

/// The DNS names and IP addresses of a certificate, normalised.
fn names(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                GeneralName::IPAddress(ip) => match ip.len() {
                    4 => Some(IpAddr::from(<[u8; 4]>::try_from(*ip).ok()?).to_string()),
                    16 => Some(IpAddr::from(<[u8; 16]>::try_from(*ip).ok()?).to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    names.sort();
    names.dedup();
    names
}

fn wanted_names(dns_names: &[String]) -> Vec<String> {
    let mut names: Vec<String> = dns_names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => n.to_ascii_lowercase(),
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The private key parses and its public key is the certificate's SubjectPublicKeyInfo.
fn key_matches(key_pem: &str, cert: &X509Certificate<'_>) -> Result<(), Problem> {
    let key = KeyPair::from_pem(key_pem).map_err(|_| Problem::KeyUnusable)?;
    if key.subject_public_key_info() == cert.public_key().raw {
        Ok(())
    } else {
        Err(Problem::KeyMismatch)
    }
}

fn missing_or_unparseable(pem: &str) -> Problem {
    if pem.trim().is_empty() {
        Problem::Missing
    } else {
        Problem::Unparseable
    }
}

/// The DER of the first certificate in a PEM text.
pub(super) fn first_der(pem: &str) -> Option<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()
        .map(|c| c.to_vec())
}

fn to_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// The notAfter of the first certificate in a PEM text.
pub(super) fn not_after_of(pem: &str) -> Option<OffsetDateTime> {
    let der = first_der(pem)?;
    parse(&der).ok().map(|c| not_after(&c))
}
