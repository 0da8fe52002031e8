//! Offline validation of a KeepalivePolicy with the rules the apiserver enforces: the generated CRD's OpenAPI
//! schema (types, required fields, bounds, enums, patterns, sizes, unknown fields) and its CEL rules.
//!
//! The rules are read from the CRD itself, so this can never drift from what the apiserver checks.

use std::sync::OnceLock;

use kube::CustomResourceExt;
use serde_json::Value;

use crate::api::KeepalivePolicy;

/// One invalid field, worded like the apiserver's field errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

fn schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let crd = KeepalivePolicy::crd();
        let schema = crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref());
        serde_json::to_value(schema.expect("the derived CRD has a schema")).expect("a schema serializes")
    })
}

/// Validates a policy document (as parsed from YAML or JSON) and returns it typed, or every field error.
pub fn validate_policy(doc: &Value) -> Result<KeepalivePolicy, Vec<FieldError>> {
    let mut errors = Vec::new();
    let err = |path: &str, message: String| FieldError {
        path: path.to_string(),
        message,
    };
    match (
        doc.get("apiVersion").and_then(Value::as_str),
        doc.get("kind").and_then(Value::as_str),
    ) {
        (Some("keepalive.dev/v1alpha1"), Some("KeepalivePolicy")) => {}
        (api_version, kind) => {
            return Err(vec![err(
                "kind",
                format!(
                    "expected apiVersion keepalive.dev/v1alpha1, kind KeepalivePolicy; found {} {}",
                    api_version.unwrap_or("(none)"),
                    kind.unwrap_or("(none)")
                ),
            )]);
        }
    }
    match doc.pointer("/metadata/name").and_then(Value::as_str) {
        None | Some("") => errors.push(err("metadata.name", "Required value: name is required".into())),
        Some(name) if !is_dns_subdomain(name) => errors.push(err(
            "metadata.name",
            format!(
                "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric \
                 characters, '-' or '.', and must start and end with an alphanumeric character"
            ),
        )),
        Some(_) => {}
    }
    let root = schema();
    for key in ["spec", "status"] {
        if let (Some(value), Some(sub)) = (doc.get(key), root.pointer(&format!("/properties/{key}"))) {
            check(sub, value, key, &mut errors);
        }
    }
    if doc.get("spec").is_none() {
        errors.push(err("spec", "Required value".into()));
    }
    if errors.is_empty() {
        // CEL rules, evaluated on the defaulted object as the apiserver does.
        if let Err(failures) = kube::core::cel::Validator::new().validate(root, doc, None) {
            errors.extend(failures.iter().map(|f| FieldError {
                path: f.field_path.clone(),
                message: f.message.clone(),
            }));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let defaulted = kube::core::cel::apply_defaults(root, doc);
    serde_json::from_value(defaulted).map_err(|e| vec![err("", e.to_string())])
}

fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Checks `value` against the structural schema `schema`, appending apiserver-style errors.
fn check(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let mut push = |message: String| {
        errors.push(FieldError {
            path: path.to_string(),
            message,
        })
    };
    if value.is_null() {
        if !schema.get("nullable").and_then(Value::as_bool).unwrap_or(false) {
            push("Invalid value: \"null\": must not be null".into());
        }
        return;
    }
    let want = schema.get("type").and_then(Value::as_str).unwrap_or("");
    let have = type_name(value);
    if !want.is_empty() && want != have && !(want == "number" && have == "integer") {
        push(format!(
            "Invalid value: {}: {path} in body must be of type {want}: {have:?}",
            short(value)
        ));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(|v| v.to_string()).collect();
        push(format!(
            "Unsupported value: {}: supported values: {}",
            short(value),
            list.join(", ")
        ));
    }
    let num = |k: &str| schema.get(k).and_then(Value::as_f64);
    if let Some(n) = value.as_f64() {
        if let Some(min) = num("minimum")
            && n < min
        {
            push(format!(
                "Invalid value: {value}: {path} in body should be greater than or equal to {min}"
            ));
        }
        if let Some(max) = num("maximum")
            && n > max
        {
            push(format!(
                "Invalid value: {value}: {path} in body should be less than or equal to {max}"
            ));
        }
    }
    if let Some(s) = value.as_str() {
        let chars = s.chars().count() as f64;
        if let Some(min) = num("minLength")
            && chars < min
        {
            push(format!(
                "Invalid value: {}: {path} in body should be at least {min} chars long",
                short(value)
            ));
        }
        if let Some(max) = num("maxLength")
            && chars > max
        {
            push(format!("Too long: may not be more than {max} bytes"));
        }
        if let Some(pattern) = schema.get("pattern").and_then(Value::as_str)
            && !regex::Regex::new(pattern).is_ok_and(|re| re.is_match(s))
        {
            push(format!(
                "Invalid value: {}: {path} in body should match '{pattern}'",
                short(value)
            ));
        }
    }
    match value {
        Value::Array(items) => {
            if let Some(max) = num("maxItems")
                && items.len() as f64 > max
            {
                push(format!("Too many: {}: must have at most {max} items", items.len()));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check(item_schema, item, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Value::Object(map) => {
            if let Some(max) = num("maxProperties")
                && map.len() as f64 > max
            {
                push(format!("Too many: {}: must have at most {max} items", map.len()));
            }
            for key in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
                if let Some(k) = key.as_str()
                    && !map.contains_key(k)
                {
                    errors.push(FieldError {
                        path: format!("{path}.{k}"),
                        message: "Required value".into(),
                    });
                }
            }
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            for (k, v) in map {
                let sub_path = format!("{path}.{k}");
                match (properties.and_then(|p| p.get(k)), additional) {
                    (Some(sub), _) => check(sub, v, &sub_path, errors),
                    (None, Some(sub)) if sub.is_object() => check(sub, v, &sub_path, errors),
                    (None, _) => {
                        errors.push(FieldError {
                            path: sub_path,
                            message: "unknown field".into(),
                        });
                    }
                }
            }
        }
        _ => {}
    }
}

fn short(value: &Value) -> String {
    let s = value.to_string();
    if s.len() > 64 { format!("{}...", &s[..60]) } else { s }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn doc(spec: Value) -> Value {
        json!({"apiVersion": "keepalive.dev/v1alpha1", "kind": "KeepalivePolicy", "metadata": {"name": "p"}, "spec": spec})
    }

    fn errors(spec: Value) -> Vec<String> {
        validate_policy(&doc(spec))
            .unwrap_err()
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn valid_policy_gets_defaults() {
        let p = validate_policy(&doc(json!({"keepalive": {"time": 1, "interval": 2, "probes": 3}}))).unwrap();
        assert_eq!(p.spec.mode, crate::api::Mode::Enforce);
        assert_eq!(p.spec.priority, 0);
    }

    #[test]
    fn bounds_are_checked_with_the_field_named() {
        let e = errors(json!({"keepalive": {"time": 0, "interval": 40000, "probes": 128}}));
        assert!(
            e.iter().any(|e| e.starts_with("spec.keepalive.time: Invalid value: 0")),
            "{e:?}"
        );
        assert!(e.iter().any(|e| e.starts_with("spec.keepalive.interval:")), "{e:?}");
        assert!(e.iter().any(|e| e.starts_with("spec.keepalive.probes:")), "{e:?}");
    }

    #[test]
    fn cel_rule_is_checked() {
        let e = errors(json!({"idleTimeoutSeconds": 300, "keepalive": {"time": 300, "interval": 2, "probes": 3}}));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].contains("spec.keepalive.time must be less than spec.idleTimeoutSeconds"),
            "{e:?}"
        );
        assert!(e[0].contains("idleTimeoutSeconds"), "{e:?}");
    }

    #[test]
    fn enums_required_fields_unknown_fields_and_selector_rules() {
        let e = errors(json!({"mode": "Strict", "keepalive": {"time": 1, "interval": 1}, "bogus": 1}));
        assert!(
            e.iter()
                .any(|e| e.starts_with("spec.mode: Unsupported value: \"Strict\"")),
            "{e:?}"
        );
        assert!(
            e.contains(&"spec.keepalive.probes: Required value".to_string()),
            "{e:?}"
        );
        assert!(e.contains(&"spec.bogus: unknown field".to_string()), "{e:?}");
        let e = errors(json!({"keepalive": {"time": 1, "interval": 1, "probes": 1},
            "podSelector": {"matchExpressions": [{"key": "a", "operator": "Contains"}]}}));
        assert!(
            e.iter()
                .any(|e| e.starts_with("spec.podSelector.matchExpressions[0].operator: Unsupported value"))
        );
        let e = errors(json!({"keepalive": {"time": 1, "interval": 1, "probes": 1},
            "podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}));
        assert!(
            e.iter().any(|e| e.contains("must be non-empty when operator is In")),
            "{e:?}"
        );
    }

    #[test]
    fn wrong_kind_and_bad_name() {
        let mut d = doc(json!({"keepalive": {"time": 1, "interval": 1, "probes": 1}}));
        d["metadata"]["name"] = json!("Bad_Name");
        let e = validate_policy(&d).unwrap_err();
        assert_eq!(e[0].path, "metadata.name");
        d["kind"] = json!("Pod");
        assert_eq!(validate_policy(&d).unwrap_err()[0].path, "kind");
    }
}
