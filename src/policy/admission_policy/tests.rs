//! The compiler's pure parts: literals, the regular expressions that stand for `decide`'s parsing, the objects'
//! shape, precedence order, and the limits. The semantics are proven against a real apiserver by
//! `tests/admission_policy.rs`.

use std::collections::BTreeMap;

use regex::Regex;
use serde_json::json;

use super::*;
use crate::policy::{PolicySet, pod_security_block, same_value, tests::policy};

fn expressions(compiled: &AdmissionPolicy) -> Vec<(String, String)> {
    let spec = &compiled.policy["spec"];
    let mut out: Vec<(String, String)> = spec["variables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["expression"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.push((
        "mutation".into(),
        spec["mutations"][0]["jsonPatch"]["expression"]
            .as_str()
            .unwrap()
            .to_string(),
    ));
    out
}

fn chunk_names(compiled: &AdmissionPolicy) -> Vec<String> {
    expressions(compiled)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with('c') && n[1..].bytes().all(|b| b.is_ascii_digit()))
        .collect()
}

#[test]
fn cel_string_literals_escape_quotes_backslashes_and_control_characters() {
    assert_eq!(cel_str("keepalive.dev/lb"), r#""keepalive.dev/lb""#);
    assert_eq!(cel_str(r#"a"b\c"#), r#""a\"b\\c""#);
    assert_eq!(cel_str("a\nb\r\t\u{7f}"), r#""a\x0ab\x0d\x09\x7f""#);
    assert_eq!(cel_str("café ✓"), "\"café ✓\"");
}

#[test]
fn pod_security_pattern_is_decides_parsing() {
    let re = Regex::new(POD_SECURITY_PINNED_BEFORE_SAFE).unwrap();
    let mut versions: Vec<String> = [
        "latest", "", "v", "v1", "v1.", "v.28", "1.28", "v1.28.0", "v1.28 ", "V1.28",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for major in ["0", "1", "01", "001", "+1", "2", "10", "11", "4294967297"] {
        for minor in 0..40 {
            for form in [
                format!("{minor}"),
                format!("0{minor}"),
                format!("+{minor}"),
                format!("{minor}x"),
            ] {
                versions.push(format!("v{major}.{form}"));
            }
        }
        versions.push(format!("v{major}.99999999999"));
        versions.push(format!("v{major}.-1"));
    }
    for level in ["baseline", "restricted", "privileged", ""] {
        for version in &versions {
            let labels = BTreeMap::from([
                (PSA_ENFORCE.to_string(), level.to_string()),
                (PSA_ENFORCE_VERSION.to_string(), version.clone()),
            ]);
            let blocked = pod_security_block(&labels).is_some();
            let compiled = ["baseline", "restricted"].contains(&level) && re.is_match(version);
            assert_eq!(compiled, blocked, "level {level:?} version {version:?}");
        }
    }
}

#[test]
fn own_value_pattern_and_int_are_decides_comparison() {
    let re = Regex::new(OWN_VALUE_IS_NUMBER).unwrap();
    // CEL: trimmed.matches(re) && string(int(trimmed)) == wanted; int() is Go's ParseInt(s, 10, 64).
    let compiled = |value: &str, wanted: i32| {
        let t = value.trim();
        re.is_match(t) && t.trim_start_matches('+').parse::<i64>().unwrap().to_string() == wanted.to_string()
    };
    let values = [
        "300",
        " 300",
        "300\n",
        "\u{a0}300\u{2003}",
        "+300",
        "0300",
        "000000000000000000000300",
        "-300",
        "300.0",
        "3e2",
        "",
        " ",
        "0",
        "00",
        "+",
        "++300",
        "30 0",
        "9223372036854775807",
        "99999999999999999999",
        "1",
        "32767",
        "032767",
        "127",
        "x300",
    ];
    for wanted in [1, 3, 30, 127, 300, 32767] {
        for value in values {
            assert_eq!(
                compiled(value, wanted),
                same_value(value, wanted),
                "{value:?} vs {wanted}"
            );
        }
    }
}

#[test]
fn objects_are_named_labelled_and_deterministic() {
    let set = PolicySet::new([
        policy("b", json!({"priority": 1})),
        policy("a", json!({"podSelector": {"matchLabels": {"app": "web"}}})),
    ]);
    let one = compile(&set, &CompileOptions::default()).unwrap();
    let two = compile(&set, &CompileOptions::default()).unwrap();
    assert_eq!(one, two);
    assert_eq!(one.compiled, 2);
    for object in [&one.policy, &one.binding] {
        assert_eq!(object["apiVersion"], "admissionregistration.k8s.io/v1");
        assert_eq!(object["metadata"]["name"], NAME);
        assert_eq!(object["metadata"]["labels"][MANAGED_BY_LABEL], OPERATOR_MANAGER);
    }
    assert_eq!(one.policy["kind"], "MutatingAdmissionPolicy");
    assert_eq!(one.binding["kind"], "MutatingAdmissionPolicyBinding");
    assert_eq!(one.binding["spec"]["policyName"], NAME);
    assert!(one.binding["spec"].get("matchResources").is_none());
    let spec = &one.policy["spec"];
    assert_eq!(spec["failurePolicy"], "Ignore");
    assert_eq!(spec["reinvocationPolicy"], "IfNeeded");
    assert_eq!(
        spec["matchConstraints"]["resourceRules"][0]["operations"],
        json!(["CREATE"])
    );
    assert_eq!(
        spec["matchConstraints"]["resourceRules"][0]["resources"],
        json!(["pods"])
    );
    assert_eq!(spec["mutations"][0]["patchType"], "JSONPatch");
}

#[test]
fn opt_out_label_is_excluded_by_both_selectors() {
    let compiled = compile(&PolicySet::default(), &CompileOptions::default()).unwrap();
    let constraints = &compiled.policy["spec"]["matchConstraints"];
    let not_ignored = json!({"matchExpressions": [{"key": IGNORE_LABEL, "operator": "NotIn", "values": ["true"]}]});
    assert_eq!(constraints["namespaceSelector"], not_ignored);
    assert_eq!(constraints["objectSelector"], not_ignored);
}

#[test]
fn options_name_failure_policy_and_excluded_namespaces() {
    let options = CompileOptions {
        name: "kp".into(),
        failure_policy: FailurePolicy::Fail,
        excluded_namespaces: vec!["kube-system".into(), "keepalive".into()],
        ..Default::default()
    };
    let compiled = compile(&PolicySet::default(), &options).unwrap();
    assert_eq!(compiled.policy["metadata"]["name"], "kp");
    assert_eq!(compiled.policy["spec"]["failurePolicy"], "Fail");
    assert_eq!(compiled.binding["spec"]["policyName"], "kp");
    assert_eq!(
        compiled.binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0],
        json!({"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", "keepalive"]})
    );
}

#[test]
fn binding_selectors_keep_the_exclusions_first_and_owners_reach_both_objects() {
    let owner =
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "name": "op", "uid": "u-1"});
    let options = CompileOptions {
        excluded_namespaces: vec!["keepalive-system".into()],
        namespace_selector: Some(json!({
            "matchLabels": {"team": "a"},
            "matchExpressions": [{"key": "tier", "operator": "Exists"}],
        })),
        object_selector: Some(json!({"matchLabels": {"app": "x"}})),
        owner_references: vec![owner.clone()],
        ..Default::default()
    };
    let compiled = compile(&PolicySet::default(), &options).unwrap();
    let resources = &compiled.binding["spec"]["matchResources"];
    assert_eq!(
        resources["namespaceSelector"],
        json!({
            "matchLabels": {"team": "a"},
            "matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["keepalive-system"]},
                {"key": "tier", "operator": "Exists"},
            ],
        })
    );
    assert_eq!(resources["objectSelector"], json!({"matchLabels": {"app": "x"}}));
    for object in [&compiled.policy, &compiled.binding] {
        assert_eq!(object["metadata"]["ownerReferences"], json!([owner]));
    }
    // Empty selectors add nothing.
    let plain = CompileOptions {
        namespace_selector: Some(json!({})),
        object_selector: Some(json!({})),
        ..Default::default()
    };
    let compiled = compile(&PolicySet::default(), &plain).unwrap();
    assert!(
        compiled.binding["spec"].get("matchResources").is_none(),
        "{}",
        compiled.binding
    );
    assert!(compiled.policy["metadata"].get("ownerReferences").is_none());
}

#[test]
fn a_smaller_object_limit_cuts_the_set_earlier_and_says_which_limit() {
    let set = PolicySet::new((0..20).map(|i| {
        policy(
            &format!("p{i:02}"),
            json!({"namespaceSelector": {"matchLabels": {"team": format!("t{i}")}}}),
        )
    }));
    let full = compile(&set, &CompileOptions::default()).unwrap();
    let empty = compile(&PolicySet::default(), &CompileOptions::default()).unwrap();
    let limit = (object_bytes(&empty.policy) + object_bytes(&full.policy)) / 2;
    let err = compile(
        &set,
        &CompileOptions {
            max_object_bytes: limit,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.partial.compiled > 0 && err.partial.compiled < 20, "{err}");
    assert!(object_bytes(&err.partial.policy) <= limit);
    assert!(matches!(err.not_compiled[0].1, Limit::ObjectTooLarge { limit: l, .. } if l == limit));
    assert!(err.to_string().contains(&format!("(limit {limit})")), "{err}");
}

#[test]
fn empty_set_compiles_to_a_policy_without_chunks() {
    let compiled = compile(&PolicySet::default(), &CompileOptions::default()).unwrap();
    assert_eq!(compiled.compiled, 0);
    assert!(chunk_names(&compiled).is_empty());
    let hit = expressions(&compiled).into_iter().find(|(n, _)| n == "hit").unwrap().1;
    assert_eq!(hit, CHAIN_TAIL);
}

#[test]
fn branches_follow_precedence_order() {
    let set = PolicySet::new([
        policy("zeta", json!({"priority": 5})),
        policy("beta", json!({})),
        policy("alpha", json!({})),
        policy("omega", json!({"priority": -1})),
    ]);
    let compiled = compile(&set, &CompileOptions::default()).unwrap();
    let chunk = expressions(&compiled).into_iter().find(|(n, _)| n == "c0").unwrap().1;
    let at = |name: &str| chunk.find(&format!("[\"{name}\"")).unwrap();
    assert!(at("zeta") < at("alpha") && at("alpha") < at("beta") && at("beta") < at("omega"));
}

#[test]
fn selectors_become_label_map_tests() {
    let entry = policy(
        "p",
        json!({
            "namespaceSelector": {"matchLabels": {"cloud": "aws"}},
            "podSelector": {"matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["web", "api"]},
                {"key": "canary", "operator": "NotIn", "values": ["true"]},
                {"key": "lb", "operator": "Exists"},
                {"key": "legacy", "operator": "DoesNotExist"},
            ]},
            "mode": "Fill",
            "keepalive": {"time": 120, "interval": 10, "probes": 5},
        }),
    );
    assert_eq!(
        branch(&entry),
        r#"("cloud" in variables.ns && variables.ns["cloud"] == "aws") && ("tier" in variables.pod && variables.pod["tier"] in ["web", "api"]) && !("canary" in variables.pod && variables.pod["canary"] in ["true"]) && ("lb" in variables.pod) && !("legacy" in variables.pod) ? ["p", "Fill", "120", "10", "5"]"#
    );
    assert!(branch(&policy("all", json!({"mode": "Audit"}))).starts_with(r#"true ? ["all", "Audit", "#));
}

#[test]
fn long_sets_are_split_into_chunks_within_the_parser_limits() {
    let set = PolicySet::new((0..250).map(|i| policy(&format!("p{i:03}"), json!({"priority": -i}))));
    let compiled = compile(&set, &CompileOptions::default()).unwrap();
    assert_eq!(compiled.compiled, 250);
    assert_eq!(chunk_names(&compiled), ["c0", "c1", "c2"]);
    for (_, expression) in expressions(&compiled) {
        assert!(expression.chars().count() <= MAX_EXPRESSION_CODE_POINTS);
        assert!(expression.matches(" ? ").count() <= MAX_CHAIN + 5);
    }
}

#[test]
fn a_policy_too_long_for_one_expression_is_named_with_every_later_one() {
    let values: Vec<String> = (0..256).map(|i| format!("{i:0>60}")).collect();
    let huge = json!({"priority": 1, "podSelector": {"matchExpressions": (0..10).map(|i| json!({
        "key": format!("k{i}"), "operator": "In", "values": values,
    })).collect::<Vec<_>>()}});
    let set = PolicySet::new([
        policy("first", json!({"priority": 2})),
        policy("huge", huge),
        policy("last", json!({})),
    ]);
    let err = compile(&set, &CompileOptions::default()).unwrap_err();
    assert_eq!(err.partial.compiled, 1);
    assert_eq!(err.not_compiled.len(), 2);
    assert_eq!(err.not_compiled[0].0, "huge");
    assert!(
        matches!(err.not_compiled[0].1, Limit::ExpressionTooLong { code_points } if code_points > MAX_EXPRESSION_CODE_POINTS)
    );
    assert_eq!(err.not_compiled[1], ("last".to_string(), Limit::FollowsUncompiled));
    let message = err.to_string();
    assert!(
        message.contains("huge: its selectors need a CEL expression of"),
        "{message}"
    );
    assert!(message.contains("(not compiled: huge, last)"), "{message}");
    assert!(expressions(&err.partial).iter().any(|(_, e)| e.contains("\"first\"")));
    assert!(!expressions(&err.partial).iter().any(|(_, e)| e.contains("\"huge\"")));
}

#[test]
fn a_set_too_large_for_one_object_is_cut_where_it_stops_fitting() {
    let values: Vec<String> = (0..40).map(|i| format!("{i:0>60}")).collect();
    let set = PolicySet::new((0..400).map(|i| {
        policy(
            &format!("p{i:03}"),
            json!({"podSelector": {"matchExpressions": [{"key": "k", "operator": "In", "values": values}]}}),
        )
    }));
    let err = compile(&set, &CompileOptions::default()).unwrap_err();
    let fitting = err.partial.compiled;
    assert!(fitting > 100 && fitting < 400, "{fitting}");
    assert!(matches!(err.not_compiled[0].1, Limit::ObjectTooLarge { bytes, .. } if bytes > MAX_OBJECT_BYTES));
    assert_eq!(err.not_compiled[0].0, format!("p{fitting:03}"));
    assert_eq!(err.not_compiled.len(), 400 - fitting);
    let message = err.to_string();
    assert!(
        message.starts_with(&format!(
            "{} of 400 KeepalivePolicies cannot be compiled",
            400 - fitting
        )),
        "{message}"
    );
    assert!(
        message.ends_with(&format!("and {} more)", 400 - fitting - 10)),
        "{message}"
    );
    let bytes = serde_json::to_vec(&err.partial.policy).unwrap().len();
    assert!(
        bytes <= MAX_OBJECT_BYTES && bytes > MAX_OBJECT_BYTES - 10_000,
        "{bytes}"
    );
    for (_, expression) in expressions(&err.partial) {
        assert!(expression.chars().count() <= MAX_EXPRESSION_CODE_POINTS);
    }
}

#[test]
fn patch_values_are_plain_maps_never_object_constructors() {
    // A list of `Object.…{}` values panics the request handler of a 1.36.3 apiserver.
    let set = PolicySet::new([policy("p", json!({}))]);
    let compiled = compile(&set, &CompileOptions::default()).unwrap();
    let constructor = Regex::new(r"(^|[^A-Za-z])Object\.").unwrap();
    for (name, expression) in expressions(&compiled) {
        assert!(!constructor.is_match(&expression), "{name}: {expression}");
    }
}
