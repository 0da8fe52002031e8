//! The JSON Patch that sets a pod's (or pod template's) sysctls and names the policy.

use json_patch::{AddOperation, PatchOperation};
use jsonptr::PointerBuf;
use k8s_openapi::{
    api::core::v1::{PodSpec, Sysctl},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde_json::Value;

use super::POLICY_ANNOTATION;

/// Which parts of a pod (or pod template) exist: what a patch must create and what it may extend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub has_metadata: bool,
    pub has_spec: bool,
    pub has_security_context: bool,
    pub has_annotations: bool,
}

impl Shape {
    pub fn of(meta: &ObjectMeta, spec: Option<&PodSpec>) -> Self {
        Shape {
            has_metadata: true,
            has_spec: spec.is_some(),
            has_security_context: spec.is_some_and(|s| s.security_context.is_some()),
            has_annotations: meta.annotations.is_some(),
        }
    }
}

/// JSON Patch operations that set a pod's (or pod template's) sysctls to `sysctls` and annotate it with the
/// policy. `prefix` is the JSON pointer of the pod template within the patched object: "" for a Pod,
/// "/spec/template" for a Deployment.
pub fn patch_operations(prefix: &str, shape: Shape, policy: &str, sysctls: &[Sysctl]) -> Vec<PatchOperation> {
    let add = |path: String, value: Value| {
        PatchOperation::Add(AddOperation {
            path: PointerBuf::parse(path).expect("a valid JSON pointer"),
            value,
        })
    };
    let sysctls_json = serde_json::to_value(sysctls).expect("sysctls serialize");
    let mut ops = Vec::with_capacity(2);
    let security_context = serde_json::json!({ "sysctls": sysctls_json });
    if shape.has_security_context {
        // `add` replaces an existing member: the list is atomic, so it is written whole.
        ops.push(add(format!("{prefix}/spec/securityContext/sysctls"), sysctls_json));
    } else if shape.has_spec {
        ops.push(add(format!("{prefix}/spec/securityContext"), security_context));
    } else {
        ops.push(add(
            format!("{prefix}/spec"),
            serde_json::json!({ "securityContext": security_context }),
        ));
    }
    if !shape.has_metadata {
        ops.push(add(
            format!("{prefix}/metadata"),
            serde_json::json!({ "annotations": { POLICY_ANNOTATION: policy } }),
        ));
    } else if shape.has_annotations {
        ops.push(add(
            format!("{prefix}/metadata/annotations/keepalive.dev~1policy"),
            Value::from(policy),
        ));
    } else {
        ops.push(add(
            format!("{prefix}/metadata/annotations"),
            serde_json::json!({ POLICY_ANNOTATION: policy }),
        ));
    }
    ops
}
