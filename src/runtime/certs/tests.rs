//! What is wrong with a PKI, and what follows: [`inspect`], [`decide`] and [`apply`] on real certificates.

use rcgen::{CertificateParams, KeyPair};
use time::{Duration, OffsetDateTime};

use super::*;

fn settings() -> Settings {
    Settings {
        dns_names: vec!["svc".into(), "svc.ns.svc".into(), "127.0.0.1".into()],
        lifetimes: Lifetimes::default(),
    }
}

fn fresh(now: OffsetDateTime) -> Pki {
    apply(Step::ReplaceCa, &Pki::default(), None, &settings(), now).unwrap()
}

/// Takes steps until `decide` keeps, every phase taken as overlapped; returns the steps and the final PKI.
fn settle(mut pki: Pki, now: OffsetDateTime) -> (Vec<Step>, Pki) {
    let mut steps = Vec::new();
    for _ in 0..10 {
        let findings = inspect(&pki, &settings(), now);
        let step = decide(&findings, true);
        if step == Step::Keep {
            return (steps, pki);
        }
        steps.push(step);
        pki = apply(step, &pki, Some(&findings), &settings(), now).unwrap();
    }
    panic!("no settling: {steps:?}");
}

fn ca_count(pki: &Pki, now: OffsetDateTime) -> usize {
    pki.ca_bundle(&inspect(pki, &settings(), now))
        .matches("BEGIN CERTIFICATE")
        .count()
}

#[test]
fn a_fresh_pki_is_all_good_and_kept() {
    let now = OffsetDateTime::now_utc();
    let pki = fresh(now);
    let findings = inspect(&pki, &settings(), now);
    assert_eq!((findings.ca, findings.serving), (Health::Good, Health::Good));
    assert!(findings.ca_can_sign);
    assert_eq!(decide(&findings, true), Step::Keep);
    assert_eq!(findings.summary(), "all good");
    assert_eq!(ca_count(&pki, now), 1);
    let renew = findings.due.unwrap() - now;
    assert!(renew > Duration::days(330) && renew <= Duration::days(335), "{renew}");
}

#[test]
fn a_broken_serving_pair_is_reissued_from_the_same_ca() {
    let now = OffsetDateTime::now_utc();
    let good = fresh(now);
    let other = fresh(now);
    let cases = [
        (
            "garbage cert",
            Pki {
                cert: "garbage".into(),
                ..good.clone()
            },
            Problem::Unparseable,
        ),
        (
            "missing cert",
            Pki {
                cert: String::new(),
                ..good.clone()
            },
            Problem::Missing,
        ),
        (
            "other key",
            Pki {
                key: other.key.clone(),
                ..good.clone()
            },
            Problem::KeyMismatch,
        ),
        (
            "garbage key",
            Pki {
                key: "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into(),
                ..good.clone()
            },
            Problem::KeyUnusable,
        ),
        (
            "other CA's cert",
            Pki {
                cert: other.cert.clone(),
                key: other.key.clone(),
                ..good.clone()
            },
            Problem::NotSignedByCa,
        ),
    ];
    for (what, pki, problem) in cases {
        let findings = inspect(&pki, &settings(), now);
        assert_eq!(findings.serving, Health::Broken(problem), "{what}");
        let (steps, healed) = settle(pki, now);
        assert_eq!(steps, [Step::IssueServing], "{what}");
        assert_eq!(healed.ca, good.ca, "{what}: the CA is kept");
        assert_eq!(inspect(&healed, &settings(), now).serving, Health::Good, "{what}");
    }
}

#[test]
fn names_and_dates_come_from_the_certificate() {
    let now = OffsetDateTime::now_utc();
    let pki = fresh(now);
    let mut other_names = settings();
    other_names.dns_names.push("extra.example".into());
    assert_eq!(
        inspect(&pki, &other_names, now).serving,
        Health::Broken(Problem::WrongNames)
    );
    let mut fewer = settings();
    fewer.dns_names.pop();
    assert_eq!(inspect(&pki, &fewer, now).serving, Health::Broken(Problem::WrongNames));
    // The same names in another order and case are the same names.
    let mut shuffled = settings();
    shuffled.dns_names = vec!["127.0.0.1".into(), "SVC.ns.svc".into(), "svc".into()];
    assert_eq!(inspect(&pki, &shuffled, now).serving, Health::Good);

    let renew = inspect(&pki, &settings(), now + Duration::days(340));
    assert_eq!(renew.serving, Health::Renew(Problem::ExpiresSoon));
    assert_eq!(decide(&renew, false), Step::IssueServing);
    let expired = inspect(&pki, &settings(), now + Duration::days(366));
    assert_eq!(expired.serving, Health::Broken(Problem::Expired));
    let early = inspect(&pki, &settings(), now - Duration::hours(1));
    assert_eq!(early.serving, Health::Broken(Problem::NotYetValid));
}

#[test]
fn an_unusable_ca_is_replaced_at_once() {
    let now = OffsetDateTime::now_utc();
    let pki = fresh(now);
    let later = now + Duration::days(3651);
    let findings = inspect(&pki, &settings(), later);
    assert_eq!(findings.ca, Health::Broken(Problem::Expired));
    let (steps, healed) = settle(pki.clone(), later);
    assert_eq!(steps, [Step::ReplaceCa]);
    assert_eq!(healed.previous_ca, None, "an expired CA is not kept in the bundle");
    assert_eq!(ca_count(&healed, later), 1);

    let garbage = Pki {
        ca: "garbage".into(),
        ..pki.clone()
    };
    assert_eq!(settle(garbage, now).0, [Step::ReplaceCa]);

    let key = KeyPair::generate().unwrap();
    let not_a_ca = CertificateParams::new(vec!["ca".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let leaf_as_ca = Pki {
        ca: not_a_ca.pem(),
        ca_key: key.serialize_pem(),
        ..pki
    };
    assert_eq!(
        inspect(&leaf_as_ca, &settings(), now).ca,
        Health::Broken(Problem::NotACa)
    );
    assert_eq!(settle(leaf_as_ca, now).0, [Step::ReplaceCa]);
}

#[test]
fn a_ca_near_its_end_rotates_in_three_phases() {
    let now = OffsetDateTime::now_utc();
    let pki = fresh(now);
    let later = now + Duration::days(3400);
    // The serving certificate expired long ago: re-issued first from the CA, which is still valid.
    let pki = settle_one(pki, later, Step::IssueServing);
    let findings = inspect(&pki, &settings(), later);
    assert_eq!(findings.ca, Health::Renew(Problem::ExpiresSoon));
    assert_eq!(decide(&findings, false), Step::AnnounceNextCa);

    let phase1 = apply(Step::AnnounceNextCa, &pki, Some(&findings), &settings(), later).unwrap();
    let f1 = inspect(&phase1, &settings(), later);
    assert_eq!(phase1.cert, pki.cert, "phase 1 keeps serving the old certificate");
    assert_eq!(ca_count(&phase1, later), 2);
    assert_eq!(decide(&f1, false), Step::Keep, "phase 1 waits for the overlap");
    assert_eq!(decide(&f1, true), Step::SwitchToNextCa);

    let phase2 = apply(Step::SwitchToNextCa, &phase1, Some(&f1), &settings(), later).unwrap();
    let f2 = inspect(&phase2, &settings(), later);
    assert_eq!(phase2.ca, phase1.next_ca.as_ref().unwrap().0);
    assert_eq!(phase2.previous_ca.as_deref(), Some(pki.ca.as_str()));
    assert_eq!((f2.ca, f2.serving), (Health::Good, Health::Good));
    assert_eq!(
        phase2.ca_bundle(&f2),
        phase1.ca_bundle(&f1),
        "phases 1 and 2 trust the same CAs"
    );
    assert_eq!(decide(&f2, false), Step::Keep, "phase 2 waits for the overlap");
    assert_eq!(decide(&f2, true), Step::DropPrevious);

    let phase3 = apply(Step::DropPrevious, &phase2, Some(&f2), &settings(), later).unwrap();
    assert_eq!(ca_count(&phase3, later), 1);
    assert_eq!(decide(&inspect(&phase3, &settings(), later), true), Step::Keep);
}

fn settle_one(pki: Pki, now: OffsetDateTime, expected: Step) -> Pki {
    let findings = inspect(&pki, &settings(), now);
    assert_eq!(decide(&findings, false), expected, "{}", findings.summary());
    apply(expected, &pki, Some(&findings), &settings(), now).unwrap()
}

#[test]
fn a_ca_that_cannot_sign_is_rotated_with_overlap_while_the_serving_pair_is_good() {
    let now = OffsetDateTime::now_utc();
    let pki = Pki {
        ca_key: fresh(now).ca_key,
        ..fresh(now)
    };
    let findings = inspect(&pki, &settings(), now);
    assert!(!findings.ca_can_sign);
    assert_eq!(decide(&findings, true), Step::AnnounceNextCa);
    // With the serving pair broken too, there is nothing to wait for: a new CA now, the old one still trusted.
    let broken = Pki {
        cert: "garbage".into(),
        ..pki
    };
    let findings = inspect(&broken, &settings(), now);
    assert_eq!(decide(&findings, false), Step::ReplaceCa);
    let healed = apply(Step::ReplaceCa, &broken, Some(&findings), &settings(), now).unwrap();
    assert_eq!(healed.previous_ca.as_deref(), Some(broken.ca.as_str()));
    assert_eq!(ca_count(&healed, now), 2);
}

#[test]
fn leftovers_of_a_rotation_are_cleaned_up() {
    let now = OffsetDateTime::now_utc();
    let pki = fresh(now);
    let other = fresh(now);
    let unneeded_next = Pki {
        next_ca: Some((other.ca.clone(), other.ca_key.clone())),
        ..pki.clone()
    };
    assert_eq!(settle(unneeded_next, now).0, [Step::DropNext]);
    let expired_previous = Pki {
        previous_ca: Some(other.ca.clone()),
        ..pki.clone()
    };
    let later = now + Duration::days(3651);
    let f = inspect(&expired_previous, &settings(), later);
    assert_eq!(f.previous, Some(Health::Broken(Problem::Expired)));
    let garbage_previous = Pki {
        previous_ca: Some("garbage".into()),
        ..pki.clone()
    };
    assert_eq!(
        decide(&inspect(&garbage_previous, &settings(), now), false),
        Step::DropPrevious
    );
    assert_eq!(
        ca_count(&garbage_previous, now),
        1,
        "garbage never reaches the caBundle"
    );
    let mismatched_next = Pki {
        next_ca: Some((other.ca, pki.ca_key.clone())),
        ..pki
    };
    let f = inspect(&mismatched_next, &settings(), now);
    assert_eq!(f.next, Some(Health::Broken(Problem::KeyMismatch)));
}

#[test]
fn a_serving_certificate_capped_by_its_ca_is_not_renewed_in_a_loop() {
    let now = OffsetDateTime::now_utc();
    let mut s = settings();
    s.lifetimes = Lifetimes {
        tls_serving_validity: Span::seconds(3600),
        tls_renew_before: Span::seconds(3000),
        tls_ca_validity: Span::seconds(1800),
        tls_ca_renew_before: Span::seconds(600),
        tls_ca_overlap: Span::seconds(60),
    };
    let pki = apply(Step::ReplaceCa, &Pki::default(), None, &s, now).unwrap();
    let f = inspect(&pki, &s, now);
    assert_eq!((f.ca, f.serving), (Health::Good, Health::Good));
    assert_eq!(decide(&f, true), Step::Keep);
    assert_eq!(
        not_after(&pki.cert),
        not_after(&pki.ca),
        "the serving certificate ends with its CA"
    );
    assert_eq!(
        decide(&inspect(&pki, &s, now + Duration::seconds(1300)), false),
        Step::AnnounceNextCa
    );
}

fn not_after(pem: &str) -> OffsetDateTime {
    super::inspect::not_after_of(pem).unwrap()
}

#[test]
fn the_secret_round_trips_and_annotations_play_no_part() {
    let now = OffsetDateTime::now_utc();
    let other = fresh(now);
    let pki = Pki {
        next_ca: Some((other.ca, other.ca_key)),
        previous_ca: Some("x".into()),
        ..fresh(now)
    };
    assert_eq!(Pki::from_data(&pki.to_data()), pki);
    let mut data = fresh(now).to_data();
    data.remove("tls.key");
    assert_eq!(
        inspect(&Pki::from_data(&data), &settings(), now).serving,
        Health::Broken(Problem::KeyUnusable)
    );
}

#[test]
fn spans_parse_with_a_unit() {
    for (text, seconds) in [("90s", 90), ("15m", 900), ("12h", 43200), ("365d", 31536000)] {
        let span: Span = text.parse().unwrap();
        assert_eq!(span, Span::seconds(seconds), "{text}");
        assert_eq!(span.to_string(), text);
    }
    for bad in ["", "5", "d", "0s", "-1d", "3w", "1.5h"] {
        assert!(bad.parse::<Span>().is_err(), "{bad:?} parsed");
    }
    assert!(Lifetimes::default().check().is_ok());
}

#[test]
fn the_store_refuses_a_foreign_key_and_is_unusable_outside_the_validity() {
    let now = OffsetDateTime::now_utc();
    let (good, other) = (fresh(now), fresh(now));
    let store = CertStore::default();
    assert!(!store.usable(), "nothing loaded");
    let refused = store.set_pem(good.cert.as_bytes(), other.key.as_bytes()).unwrap_err();
    assert!(format!("{refused:#}").contains("does not belong"), "{refused:#}");
    assert!(store.set_pem(b"garbage", good.key.as_bytes()).is_err());
    assert!(!store.usable());
    store.set_pem(good.cert.as_bytes(), good.key.as_bytes()).unwrap();
    assert!(store.usable());
    let old = fresh(now - Duration::days(400));
    store.set_pem(old.cert.as_bytes(), old.key.as_bytes()).unwrap();
    assert!(!store.usable(), "an expired certificate is served but not usable");
}
