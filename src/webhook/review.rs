//! The lean view of an AdmissionReview: the request fields the webhook reads (no full Pod object is ever built)
//! and the response it writes.

use std::collections::BTreeMap;

use base64::Engine;
use k8s_openapi::api::core::v1::{PodOS, Sysctl};
use serde::{Deserialize, Serialize, de::IgnoredAny};

use crate::policy::{PodFacts, Shape};

/// The parts of an AdmissionReview request the webhook reads. Everything else in the body is skipped while
/// parsing: no full Pod object is ever built.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub uid: String,
    pub kind: Kind,
    #[serde(default)]
    pub sub_resource: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    pub operation: String,
    #[serde(default)]
    pub dry_run: Option<bool>,
    #[serde(default, deserialize_with = "object_or_null")]
    pub object: Option<ReviewedPod>,
}

#[derive(Debug, Deserialize)]
pub struct Kind {
    #[serde(default)]
    pub group: String,
    pub kind: String,
}

/// The pod of a review, as far as the decision and the patch need it: every other field is skipped unparsed.
#[derive(Debug, Default, Deserialize)]
pub struct ReviewedPod {
    #[serde(default, deserialize_with = "object_or_null")]
    pub metadata: Option<ReviewedMeta>,
    #[serde(default, deserialize_with = "object_or_null")]
    pub spec: Option<ReviewedSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReviewedMeta {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub generate_name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// Only whether it is there: the patch adds to it. Anything but an object (or null) is refused, so a patch
    /// never addresses a member of a list or a string.
    #[serde(default, deserialize_with = "object_or_null")]
    pub annotations: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReviewedSpec {
    #[serde(default)]
    pub host_network: Option<bool>,
    #[serde(default)]
    pub os: Option<PodOS>,
    #[serde(default, deserialize_with = "object_or_null")]
    pub security_context: Option<ReviewedSecurityContext>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ReviewedSecurityContext {
    #[serde(default)]
    pub sysctls: Option<Vec<Sysctl>>,
}

/// Deserializes a JSON object (or null) into `T`. Plain derived structs would also accept a JSON array, which no
/// patch could then be applied to.
fn object_or_null<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    struct ObjectVisitor<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectVisitor<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object or null")
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }
    d.deserialize_any(ObjectVisitor(std::marker::PhantomData))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Review {
    api_version: String,
    kind: String,
    request: Option<Request>,
}

impl ReviewedPod {
    pub fn facts(&self) -> PodFacts<'_> {
        let spec = self.spec.as_ref();
        PodFacts::from_parts(
            self.metadata.as_ref().and_then(|m| m.labels.as_ref()),
            spec.and_then(|s| s.host_network),
            spec.and_then(|s| s.os.as_ref()).map(|os| os.name.as_str()),
            spec.and_then(|s| s.security_context.as_ref())
                .and_then(|sc| sc.sysctls.as_deref()),
        )
    }

    pub fn shape(&self) -> Shape {
        let spec = self.spec.as_ref();
        Shape {
            has_metadata: self.metadata.is_some(),
            has_spec: spec.is_some(),
            has_security_context: spec.is_some_and(|s| s.security_context.is_some()),
            has_annotations: self.metadata.as_ref().is_some_and(|m| m.annotations.is_some()),
        }
    }
}

/// The AdmissionReview response.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    pub uid: String,
    pub allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<&'static str>,
    /// Base64 of the JSON Patch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub audit_annotations: BTreeMap<String, String>,
}

impl Response {
    pub fn allow(request: &Request) -> Self {
        Response {
            uid: request.uid.clone(),
            allowed: true,
            patch_type: None,
            patch: None,
            warnings: Vec::new(),
            audit_annotations: BTreeMap::new(),
        }
    }

    pub fn warn(mut self, warning: String) -> Self {
        self.warnings.push(warning);
        self
    }

    /// The JSON Patch, decoded.
    pub fn json_patch(&self) -> Option<json_patch::Patch> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(self.patch.as_ref()?)
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The whole AdmissionReview body of this response.
    pub fn into_review(self) -> serde_json::Value {
        serde_json::json!({ "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": self })
    }
}

/// Parses an AdmissionReview body; any error is the client's (HTTP 400).
pub fn parse(body: &[u8]) -> Result<Request, String> {
    let review: Review = serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
    if review.api_version != "admission.k8s.io/v1" || review.kind != "AdmissionReview" {
        return Err(format!(
            "expected apiVersion admission.k8s.io/v1, kind AdmissionReview; got {} {}",
            review.api_version, review.kind
        ));
    }
    review
        .request
        .ok_or_else(|| "the AdmissionReview has no request".to_string())
}
