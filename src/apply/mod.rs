//! `keepalive-operator apply`: the webhook's mutation, offline, for manifests in CI pipelines.
//!
//! Reads policies and resources, runs the same [`decide`](crate::policy::decide) the webhook runs on every Pod
//! and every pod template (Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs, CronJobs,
//! ReplicationControllers, PodTemplates), and returns the resources as YAML documents in input order plus one
//! report line per pod. Nothing is printed unless every input is valid.
//!
//! Inputs are read by [`input`] (regular files or stdin, size-capped) and converted from YAML as kubectl converts
//! them ([`yaml`]: aliases, merge keys), so the offline result is what the webhook would see.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use serde_json::Value;

use crate::policy::{self, ClusterFacts, PodFacts, PolicySet};

pub mod input;
mod yaml;

/// A named input: a file path (or "-") and its text.
#[derive(Debug)]
pub struct Input {
    pub name: String,
    pub text: String,
}

/// The result of a successful run.
#[derive(Debug)]
pub struct Output {
    /// The resources as a YAML stream, mutated where a policy applies.
    pub yaml: String,
    /// One line per pod or pod template: which policy applied, or why it was skipped.
    pub report: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{file}: document {doc}: {message}")]
    Parse { file: String, doc: usize, message: String },
    #[error("{file}: document {doc}: KeepalivePolicy {name:?} is invalid:\n{}", .errors.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    InvalidPolicy {
        file: String,
        doc: usize,
        name: String,
        errors: Vec<crate::validate::FieldError>,
    },
    #[error("{file}: document {doc} ({what}): {message}")]
    InvalidResource {
        file: String,
        doc: usize,
        what: String,
        message: String,
    },
}

/// Where the pod template sits in a resource of this kind.
fn template_pointer(api_version: &str, kind: &str) -> Option<&'static str> {
    let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
    match (group, kind) {
        ("", "Pod") => Some(""),
        ("", "PodTemplate") => Some("/template"),
        ("", "ReplicationController")
        | ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("batch", "Job") => Some("/spec/template"),
        ("batch", "CronJob") => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

fn documents(input: &Input) -> Result<Vec<Value>, Error> {
    let docs = yaml::documents(&input.text).map_err(|(doc, message)| Error::Parse {
        file: input.name.clone(),
        doc,
        message,
    })?;
    Ok(docs.into_iter().filter(|doc| !doc.is_null()).collect())
}

/// Runs the offline mutation.
pub fn run(policies: &[Input], resources: &[Input], cluster: ClusterFacts) -> Result<Output, Error> {
    let mut entries = Vec::new();
    for input in policies {
        for (i, doc) in documents(input)?.iter().enumerate() {
            let policy = crate::validate::validate_policy(doc).map_err(|errors| Error::InvalidPolicy {
                file: input.name.clone(),
                doc: i + 1,
                name: doc
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                errors,
            })?;
            entries.push(policy::PolicyEntry::from_policy(&policy));
        }
    }
    let set = PolicySet::new(entries);

    let mut docs = Vec::new();
    for input in resources {
        for (i, doc) in documents(input)?.into_iter().enumerate() {
            docs.push((input.name.as_str(), i + 1, doc));
        }
    }
    // Namespaces among the resources supply labels, wherever they stand in the input.
    let mut namespace_labels: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (_, _, doc) in &docs {
        if doc.get("apiVersion").and_then(Value::as_str) == Some("v1")
            && doc.get("kind").and_then(Value::as_str) == Some("Namespace")
            && let Some(name) = doc.pointer("/metadata/name").and_then(Value::as_str)
        {
            let labels = doc.pointer("/metadata/labels").cloned().unwrap_or(Value::Null);
            namespace_labels.insert(name.to_string(), serde_json::from_value(labels).unwrap_or_default());
        }
    }

    let no_labels = BTreeMap::new();
    let mut yaml = String::new();
    let mut report = Vec::new();
    for (file, n, mut doc) in docs {
        let api_version = doc.get("apiVersion").and_then(Value::as_str).unwrap_or("").to_string();
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("").to_string();
        if let Some(pointer) = template_pointer(&api_version, &kind) {
            let namespace = doc
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_string();
            let name = doc
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let invalid = |message: String| Error::InvalidResource {
                file: file.to_string(),
                doc: n,
                what: format!("{kind} {namespace}/{name}"),
                message,
            };
            let template = doc
                .pointer_mut(pointer)
                .ok_or_else(|| invalid(format!("no pod template at {pointer}")))?;
            if let Some(obj) = template.as_object_mut() {
                obj.entry("metadata")
                    .or_insert_with(|| Value::Object(Default::default()));
            }
            let typed: PodTemplateSpec =
                serde_json::from_value(template.clone()).map_err(|e| invalid(format!("pod template: {e}")))?;
            let meta = typed.metadata.unwrap_or_default();
            let facts = PodFacts::new(&meta, typed.spec.as_ref());
            let decision = policy::decide(
                &set,
                namespace_labels.get(&namespace).unwrap_or(&no_labels),
                &facts,
                cluster,
            );
            report.push(format!("{kind} {namespace}/{name}: {decision}"));
            if let Some((policy_name, sysctls)) = decision.mutation() {
                let ops = policy::patch_operations(
                    pointer,
                    policy::Shape::of(&meta, typed.spec.as_ref()),
                    policy_name,
                    sysctls,
                );
                json_patch::patch(&mut doc, &ops).map_err(|e| invalid(format!("applying the patch: {e}")))?;
            }
        }
        yaml.push_str("---\n");
        yaml.push_str(&serde_norway::to_string(&doc).expect("a JSON value serializes to YAML"));
    }
    Ok(Output { yaml, report })
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "apiVersion: keepalive.dev/v1alpha1\nkind: KeepalivePolicy\nmetadata: {name: nlb}\n\
        spec:\n  namespaceSelector: {matchLabels: {lb: nlb}}\n  keepalive: {time: 300, interval: 30, probes: 3}\n";

    fn input(name: &str, text: &str) -> Input {
        Input {
            name: name.into(),
            text: text.into(),
        }
    }

    #[test]
    fn deployment_template_is_mutated_with_namespace_labels_from_the_input() {
        let resources = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: api, namespace: shop}\n\
            spec:\n  selector: {matchLabels: {app: api}}\n  template:\n    metadata: {labels: {app: api}}\n    \
            spec: {containers: [{name: c, image: x}]}\n---\napiVersion: v1\nkind: Namespace\n\
            metadata: {name: shop, labels: {lb: nlb}}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n";
        let out = run(
            &[input("p.yaml", POLICY)],
            &[input("r.yaml", resources)],
            ClusterFacts::default(),
        )
        .unwrap();
        let docs: Vec<Value> = serde_norway::Deserializer::from_str(&out.yaml)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0]["kind"], "Deployment", "input order is kept");
        assert_eq!(
            docs[0]["spec"]["template"]["metadata"]["annotations"]["keepalive.dev/policy"],
            "nlb"
        );
        assert_eq!(
            docs[0]["spec"]["template"]["spec"]["securityContext"]["sysctls"][0]["value"],
            "300"
        );
        assert_eq!(
            out.report,
            vec![
                "Deployment shop/api: policy nlb: set net.ipv4.tcp_keepalive_time=300 \
            net.ipv4.tcp_keepalive_intvl=30 net.ipv4.tcp_keepalive_probes=3"
            ]
        );
    }

    #[test]
    fn pod_without_namespace_is_in_default_which_has_no_labels() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n";
        let out = run(
            &[input("p.yaml", POLICY)],
            &[input("r.yaml", pod)],
            ClusterFacts::default(),
        )
        .unwrap();
        assert_eq!(out.report, vec!["Pod default/p: unchanged: no policy selects the pod"]);
        assert!(!out.yaml.contains("sysctls"));
    }

    #[test]
    fn invalid_policy_names_file_and_field() {
        let bad = POLICY.replace("probes: 3", "probes: 300");
        let err = run(&[input("bad.yaml", &bad)], &[], ClusterFacts::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("bad.yaml: document 1: KeepalivePolicy \"nlb\" is invalid"),
            "{err}"
        );
        assert!(err.contains("spec.keepalive.probes: Invalid value: 300"), "{err}");
    }

    #[test]
    fn unparsable_resources_name_the_file_and_document() {
        let err = run(&[], &[input("r.yaml", "a: 1\n---\n: : [\n")], ClusterFacts::default()).unwrap_err();
        assert!(err.to_string().starts_with("r.yaml: document 2:"), "{err}");
    }
}
