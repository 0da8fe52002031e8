//! The policy set compiled into one MutatingAdmissionPolicy and its binding (`admissionregistration.k8s.io/v1`,
//! Kubernetes ≥ 1.36): the apiserver then makes [`decide`](super::decide)'s change to a pod itself, in CEL, with no
//! webhook on the pod-creation path.
//!
//! Pure: the objects are built as JSON from the [`PolicySet`]; applying them is the caller's business.
//!
//! # How the decision is expressed
//!
//! One policy object carries the whole set in precedence order, so precedence never depends on the order in
//! which the apiserver evaluates several policies, and a recompiled set replaces the old one atomically.
//!
//! - **Opt-outs**: `matchConstraints` selects only pods whose namespace and whose own labels lack
//!   `keepalive.dev/ignore=true` (`NotIn [true]`, as `decide` compares the value).
//! - **Namespace labels** are read at admission time from `namespaceObject`, pod labels from `object`.
//! - **The winner**: the policies are split into chunks, one CEL variable each (`c0`, `c1`, ...). A chunk is a chain
//!   of conditionals `sel₀ ? [name₀, mode₀, time₀, intvl₀, probes₀] : sel₁ ? [...] : []` in precedence order, so
//!   the first policy whose selectors hold wins. `hit` takes the first non-empty chunk; variables are evaluated
//!   lazily, so the chunks after the winner's are never evaluated. Each selector requirement becomes a membership
//!   test on the label map (`"k" in L && L["k"] in ["a", "b"]`, negated for NotIn and DoesNotExist).
//! - **Skips** (`skip`): `spec.hostNetwork`, `spec.os.name == "windows"`, and a namespace whose
//!   `pod-security.kubernetes.io/enforce` is baseline or restricted with an `enforce-version` before v1.29
//!   (a regular expression equal to `decide`'s parsing, see [`POD_SECURITY_PINNED_BEFORE_SAFE`]).
//! - **Modes**: Audit never mutates; Fill adds the missing keepalive sysctls (`missing`); Enforce also replaces
//!   the pod's own values that differ (`stale`). A value is the policy's when its trimmed text is a decimal
//!   number equal to it, as [`decide`](super::decide) parses it ([`OWN_VALUE_IS_NUMBER`]).
//! - **The patch**: a JSON Patch writes `spec.securityContext.sysctls` whole (other sysctls kept in place, the
//!   missing keepalive ones appended in [`KEEPALIVE_SYSCTLS`] order) and the `keepalive.dev/policy` annotation.
//!   A pod that already has its values gets no patch, so reinvocation changes nothing. Patch values are plain CEL
//!   maps and lists, never `Object.…{}` constructors: a list of constructed objects as a JSON Patch value panics
//!   the request handler of a 1.36.3 apiserver (cel-go 0.26 converts each element to a `structpb.Struct` where a
//!   `structpb.Value` is expected), and the pod's own sysctls rebuilt as maps marshal on 1.36 and 1.37 alike.
//!
//! # Limits
//!
//! A CEL expression may hold [`MAX_EXPRESSION_CODE_POINTS`] code points and nest [`MAX_CHAIN`] conditionals; the
//! object must fit in etcd ([`MAX_OBJECT_BYTES`]). These bound the runtime cost as well: a chunk's evaluation visits
//! each of its characters at most a few times, far below the apiserver's per-expression limit (1 000 000) and
//! its per-evaluation budget (10 000 000). A policy set beyond them is compiled up to the first policy that does
//! not fit; that policy and every later one are named in the [`CompileError`] (a pod whose winner is among them
//! is left to the webhook, whose decision is the same and idempotent).

use std::fmt::{self, Write as _};

use serde_json::{Value, json};

use super::{
    IGNORE_LABEL, KEEPALIVE_SYSCTLS, POLICY_ANNOTATION, PSA_ENFORCE, PSA_ENFORCE_VERSION, PolicyEntry, PolicySet,
};
use crate::api::{LabelSelector, Mode, OPERATOR_MANAGER, SelectorOperator};

/// Name of the MutatingAdmissionPolicy and of its binding.
pub const NAME: &str = "keepalive-operator-policies";
/// The label every compiled object carries: `app.kubernetes.io/managed-by: keepalive-operator`.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// The apiserver's limit on one CEL expression (cel-go's parser default, which Kubernetes keeps).
pub const MAX_EXPRESSION_CODE_POINTS: usize = 100_000;
/// The compiler keeps each expression this far below [`MAX_EXPRESSION_CODE_POINTS`].
const EXPRESSION_BUDGET: usize = MAX_EXPRESSION_CODE_POINTS - 4_000;
/// Conditionals chained in one expression: cel-go's parser refuses nesting deeper than 250.
pub const MAX_CHAIN: usize = 100;
/// Largest serialized policy object the compiler emits (etcd's default request limit is 1.5 MiB).
pub const MAX_OBJECT_BYTES: usize = 1_000_000;

/// `enforce-version` values `decide` treats as before v1.29: `v<major>.<minor>` with both parts decimal (an
/// optional `+`, leading zeros), major 1 and minor 0–28.
pub const POD_SECURITY_PINNED_BEFORE_SAFE: &str = r"^v[+]?0*1\.[+]?0*(1?[0-9]|2[0-8])$";
/// A trimmed sysctl value that is a decimal number small enough for CEL's `int()` (no error, no overflow): any
/// other text is never equal to a policy's value (1..32767).
pub const OWN_VALUE_IS_NUMBER: &str = r"^[+]?0*[1-9][0-9]{0,17}$";

/// How the compiled objects are deployed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileOptions {
    /// Name of the policy object and of its binding.
    pub name: String,
    /// What the apiserver does when evaluating the policy fails: `Ignore` (the pod is created unchanged, as with
    /// the webhook's `failurePolicy: Ignore`) or `Fail`.
    pub failure_policy: FailurePolicy,
    /// Namespaces the binding never matches (by `kubernetes.io/metadata.name`), as the webhook's exclusions.
    pub excluded_namespaces: Vec<String>,
    /// A further `LabelSelector` on namespaces for the binding (the webhook's `namespaceSelector`); the
    /// exclusions are added to its `matchExpressions`.
    pub namespace_selector: Option<Value>,
    /// A `LabelSelector` on pods for the binding (the webhook's `objectSelector`).
    pub object_selector: Option<Value>,
    /// `ownerReferences` of both objects (e.g. the operator's ClusterRole, so that uninstalling the operator
    /// removes them).
    pub owner_references: Vec<Value>,
    /// Largest serialized policy object to emit; at most [`MAX_OBJECT_BYTES`] (an apiserver whose etcd takes
    /// smaller requests needs less).
    pub max_object_bytes: usize,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            name: NAME.to_string(),
            failure_policy: FailurePolicy::Ignore,
            excluded_namespaces: Vec::new(),
            namespace_selector: None,
            object_selector: None,
            owner_references: Vec::new(),
            max_object_bytes: MAX_OBJECT_BYTES,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailurePolicy {
    Ignore,
    Fail,
}

impl FailurePolicy {
    fn as_str(self) -> &'static str {
        match self {
            FailurePolicy::Ignore => "Ignore",
            FailurePolicy::Fail => "Fail",
        }
    }
}

/// The compiled objects.
#[derive(Clone, Debug, PartialEq)]
pub struct AdmissionPolicy {
    /// The `MutatingAdmissionPolicy`.
    pub policy: Value,
    /// The `MutatingAdmissionPolicyBinding`.
    pub binding: Value,
    /// How many policies (the first ones in precedence order) the objects carry.
    pub compiled: usize,
}

/// Why a policy is not in the compiled objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Limit {
    /// Its selectors alone make a CEL expression longer than the apiserver allows.
    ExpressionTooLong { code_points: usize },
    /// With it, the policy object would exceed [`MAX_OBJECT_BYTES`].
    ObjectTooLarge { bytes: usize, limit: usize },
    /// A policy before it in precedence order is not compiled, so this one cannot be either.
    FollowsUncompiled,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::ExpressionTooLong { code_points } => write!(
                f,
                "its selectors need a CEL expression of {code_points} code points (limit {MAX_EXPRESSION_CODE_POINTS})"
            ),
            Limit::ObjectTooLarge { bytes, limit } => write!(
                f,
                "with it the MutatingAdmissionPolicy would have {bytes} bytes (limit {limit})"
            ),
            Limit::FollowsUncompiled => write!(f, "a policy of higher precedence is not compiled"),
        }
    }
}

/// Policies that cannot be expressed in the admission policy, in precedence order, with the objects compiled
/// from the policies before them.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub struct CompileError {
    /// The objects for the policies that fit (a prefix of the set in precedence order).
    pub partial: Box<AdmissionPolicy>,
    /// Each policy left out, and why.
    pub not_compiled: Vec<(String, Limit)>,
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of {} KeepalivePolicies cannot be compiled into a MutatingAdmissionPolicy",
            self.not_compiled.len(),
            self.partial.compiled + self.not_compiled.len()
        )?;
        for (name, why) in &self.not_compiled {
            if *why != Limit::FollowsUncompiled {
                write!(f, ": {name}: {why}")?;
            }
        }
        let names: Vec<&str> = self.not_compiled.iter().take(10).map(|(n, _)| n.as_str()).collect();
        write!(f, " (not compiled: {}", names.join(", "))?;
        match self.not_compiled.len().saturating_sub(names.len()) {
            0 => write!(f, ")"),
            more => write!(f, " and {more} more)"),
        }
    }
}

/// Compiles the policy set into a MutatingAdmissionPolicy and its binding. An empty set compiles into a policy
/// that never changes a pod.
pub fn compile(set: &PolicySet, options: &CompileOptions) -> Result<AdmissionPolicy, CompileError> {
    let entries = set.entries();
    // Chunks of branches; the object's size is tracked as an upper bound: the policy without chunks, plus each
    // branch's JSON text and a fixed overhead per chunk (its variable, its part of `hit`, the chain's tail).
    let mut chunks: Vec<Vec<String>> = Vec::new();
    let mut chunk_code_points = 0;
    let mut bytes = object_bytes(&build(&[], options));
    let mut stop: Option<Limit> = None;
    for entry in entries {
        let branch = branch(entry);
        let code_points = branch.chars().count() + BRANCH_SEPARATOR.len();
        if code_points + CHAIN_TAIL.len() > EXPRESSION_BUDGET {
            stop = Some(Limit::ExpressionTooLong { code_points });
            break;
        }
        let branch_bytes = json_len(&branch) + BRANCH_SEPARATOR.len();
        let new_chunk = chunks
            .last()
            .is_none_or(|c| c.len() == MAX_CHAIN || chunk_code_points + code_points > EXPRESSION_BUDGET);
        let added = branch_bytes + if new_chunk { CHUNK_OVERHEAD_BYTES } else { 0 };
        let limit = options.max_object_bytes.min(MAX_OBJECT_BYTES);
        if (new_chunk && chunks.len() == MAX_CHAIN) || bytes + added > limit {
            stop = Some(Limit::ObjectTooLarge {
                bytes: bytes + added,
                limit,
            });
            break;
        }
        if new_chunk {
            chunks.push(Vec::new());
            chunk_code_points = CHAIN_TAIL.len();
        }
        chunks.last_mut().expect("a chunk").push(branch);
        chunk_code_points += code_points;
        bytes += added;
    }
    let compiled = chunks.iter().map(Vec::len).sum();
    let chunks: Vec<String> = chunks.iter().map(|c| chain(c)).collect();
    let compiled_policy = AdmissionPolicy {
        policy: build(&chunks, options),
        binding: binding(options),
        compiled,
    };
    match stop {
        None => Ok(compiled_policy),
        Some(first) => {
            let mut not_compiled = vec![(entries[compiled].name.clone(), first)];
            not_compiled.extend(
                entries[compiled + 1..]
                    .iter()
                    .map(|e| (e.name.clone(), Limit::FollowsUncompiled)),
            );
            Err(CompileError {
                partial: Box::new(compiled_policy),
                not_compiled,
            })
        }
    }
}

const BRANCH_SEPARATOR: &str = " : ";
const CHAIN_TAIL: &str = "[\"\"].filter(x, false)";
/// More than a chunk adds besides its branches: `{"name":"c99","expression":""},`, the chain's tail, and
/// `size(variables.c99) > 0 ? variables.c99 : ` in `hit`.
const CHUNK_OVERHEAD_BYTES: usize = 128;

fn json_len(s: &str) -> usize {
    serde_json::to_string(s).map(|j| j.len()).unwrap_or(usize::MAX)
}

fn object_bytes(policy: &Value) -> usize {
    serde_json::to_vec(policy).map(|v| v.len()).unwrap_or(usize::MAX)
}

fn metadata(options: &CompileOptions) -> Value {
    let mut metadata = json!({
        "name": options.name,
        "labels": { MANAGED_BY_LABEL: OPERATOR_MANAGER },
    });
    if !options.owner_references.is_empty() {
        metadata["ownerReferences"] = Value::from(options.owner_references.clone());
    }
    metadata
}

fn binding(options: &CompileOptions) -> Value {
    let mut spec = json!({ "policyName": options.name });
    let mut namespaces = options.namespace_selector.clone().unwrap_or_else(|| json!({}));
    if !options.excluded_namespaces.is_empty() {
        let exclusion = json!({
            "key": "kubernetes.io/metadata.name",
            "operator": "NotIn",
            "values": options.excluded_namespaces,
        });
        match namespaces.get_mut("matchExpressions").and_then(Value::as_array_mut) {
            Some(expressions) => expressions.insert(0, exclusion),
            None => namespaces["matchExpressions"] = json!([exclusion]),
        }
    }
    let has_terms = |s: &Value| s.as_object().is_some_and(|o| !o.is_empty());
    if has_terms(&namespaces) {
        spec["matchResources"]["namespaceSelector"] = namespaces;
    }
    if let Some(objects) = options.object_selector.as_ref().filter(|s| has_terms(s)) {
        spec["matchResources"]["objectSelector"] = objects.clone();
    }
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingAdmissionPolicyBinding",
        "metadata": metadata(options),
        "spec": spec,
    })
}

/// The policy object, with one variable per chunk.
fn build(chunks: &[String], options: &CompileOptions) -> Value {
    let not_ignored = json!({ "matchExpressions": [{ "key": IGNORE_LABEL, "operator": "NotIn", "values": ["true"] }] });
    let mut variables = vec![
        variable("ns", "namespaceObject.metadata.?labels.orValue({})"),
        variable("pod", "object.metadata.?labels.orValue({})"),
    ];
    variables.extend(
        chunks
            .iter()
            .enumerate()
            .map(|(i, chunk)| variable(&format!("c{i}"), chunk)),
    );
    variables.extend([
        variable("hit", &hit(chunks.len())),
        variable("skip", &skip()),
        variable("own", "object.spec.?securityContext.?sysctls.orValue([])"),
        variable(
            "want",
            &format!(
                "{{{}: variables.hit[2], {}: variables.hit[3], {}: variables.hit[4]}}",
                cel_str(KEEPALIVE_SYSCTLS[0]),
                cel_str(KEEPALIVE_SYSCTLS[1]),
                cel_str(KEEPALIVE_SYSCTLS[2])
            ),
        ),
        variable(
            "missing",
            &format!(
                "[{}].filter(n, !variables.own.exists(s, s.name == n))",
                KEEPALIVE_SYSCTLS.map(cel_str).join(", ")
            ),
        ),
        variable(
            "stale",
            &format!(
                "variables.hit[1] != {enforce} ? [] : variables.own.filter(s, s.name in variables.want && \
                 !(s.value.trim().matches({re}) && string(int(s.value.trim())) == variables.want[s.name]))\
                 .map(s, s.name)",
                enforce = cel_str(&Mode::Enforce.to_string()),
                re = cel_str(OWN_VALUE_IS_NUMBER),
            ),
        ),
        variable(
            "mutate",
            &format!(
                "size(variables.hit) == 5 && variables.hit[1] != {audit} && !variables.skip && \
                 (size(variables.missing) > 0 || size(variables.stale) > 0)",
                audit = cel_str(&Mode::Audit.to_string()),
            ),
        ),
        variable(
            "sysctls",
            "variables.own.map(s, {\"name\": s.name, \"value\": s.name in variables.stale ? variables.want[s.name] : s.value}) + \
             variables.missing.map(n, {\"name\": n, \"value\": variables.want[n]})",
        ),
    ]);
    let patch = format!(
        "!variables.mutate ? [] : [\
         has(object.spec.securityContext) \
         ? JSONPatch{{op: \"add\", path: \"/spec/securityContext/sysctls\", value: variables.sysctls}} \
         : JSONPatch{{op: \"add\", path: \"/spec/securityContext\", value: {{\"sysctls\": variables.sysctls}}}}, \
         has(object.metadata.annotations) \
         ? JSONPatch{{op: \"add\", path: \"/metadata/annotations/\" + jsonpatch.escapeKey({annotation}), value: variables.hit[0]}} \
         : JSONPatch{{op: \"add\", path: \"/metadata/annotations\", value: {{{annotation}: variables.hit[0]}}}}]",
        annotation = cel_str(POLICY_ANNOTATION),
    );
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingAdmissionPolicy",
        "metadata": metadata(options),
        "spec": {
            "failurePolicy": options.failure_policy.as_str(),
            "reinvocationPolicy": "IfNeeded",
            "matchConstraints": {
                "resourceRules": [{
                    "apiGroups": [""],
                    "apiVersions": ["v1"],
                    "operations": ["CREATE"],
                    "resources": ["pods"],
                }],
                "namespaceSelector": not_ignored,
                "objectSelector": not_ignored,
            },
            "variables": variables,
            "mutations": [{ "patchType": "JSONPatch", "jsonPatch": { "expression": patch } }],
        },
    })
}

fn variable(name: &str, expression: &str) -> Value {
    json!({ "name": name, "expression": expression })
}

/// The first non-empty chunk.
fn hit(chunks: usize) -> String {
    let mut out = String::new();
    for i in 0..chunks {
        write!(out, "size(variables.c{i}) > 0 ? variables.c{i} : ").unwrap();
    }
    out.push_str(CHAIN_TAIL);
    out
}

fn skip() -> String {
    let ns = |key: &str| format!("variables.ns[{}]", cel_str(key));
    format!(
        "object.spec.?hostNetwork.orValue(false) || object.spec.?os.?name.orValue(\"\") == \"windows\" || \
         ({enforce_key} in variables.ns && {enforce} in [\"baseline\", \"restricted\"] && \
         {version_key} in variables.ns && {version}.matches({re}))",
        enforce_key = cel_str(PSA_ENFORCE),
        enforce = ns(PSA_ENFORCE),
        version_key = cel_str(PSA_ENFORCE_VERSION),
        version = ns(PSA_ENFORCE_VERSION),
        re = cel_str(POD_SECURITY_PINNED_BEFORE_SAFE),
    )
}

/// A chunk: the first policy of these branches whose selectors hold, as `[name, mode, time, intvl, probes]`.
fn chain(branches: &[String]) -> String {
    let mut out = String::new();
    for b in branches {
        out.push_str(b);
        out.push_str(BRANCH_SEPARATOR);
    }
    out.push_str(CHAIN_TAIL);
    out
}

/// `selectors ? [name, mode, time, intvl, probes]` of one policy.
fn branch(entry: &PolicyEntry) -> String {
    let spec = &entry.spec;
    let mut terms = selector_terms(spec.namespace_selector.as_ref(), "variables.ns");
    terms.extend(selector_terms(spec.pod_selector.as_ref(), "variables.pod"));
    let condition = if terms.is_empty() {
        "true".to_string()
    } else {
        terms.join(" && ")
    };
    let k = spec.keepalive;
    format!(
        "{condition} ? [{}, {}, \"{}\", \"{}\", \"{}\"]",
        cel_str(&entry.name),
        cel_str(&spec.mode.to_string()),
        k.time,
        k.interval,
        k.probes
    )
}

/// One CEL condition per matchLabels pair and requirement, on the label map `labels`.
fn selector_terms(selector: Option<&LabelSelector>, labels: &str) -> Vec<String> {
    let Some(selector) = selector else { return Vec::new() };
    let present = |key: &str| format!("{} in {labels}", cel_str(key));
    let value = |key: &str| format!("{labels}[{}]", cel_str(key));
    let mut terms: Vec<String> = selector
        .match_labels
        .iter()
        .map(|(k, v)| format!("({} && {} == {})", present(k), value(k), cel_str(v)))
        .collect();
    terms.extend(selector.match_expressions.iter().map(|r| {
        let values = r.values.iter().map(|v| cel_str(v)).collect::<Vec<_>>().join(", ");
        let in_values = format!("({} && {} in [{values}])", present(&r.key), value(&r.key));
        match r.operator {
            SelectorOperator::In => in_values,
            SelectorOperator::NotIn => format!("!{in_values}"),
            SelectorOperator::Exists => format!("({})", present(&r.key)),
            SelectorOperator::DoesNotExist => format!("!({})", present(&r.key)),
        }
    }));
    terms
}

/// A CEL string literal: double-quoted, with backslash, quote and control characters escaped.
pub fn cel_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => write!(out, "\\x{:02x}", c as u32).unwrap(),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests;
