//! YAML documents to JSON values the way kubectl converts a manifest before sending it, so that `apply` sees
//! what the apiserver would see: aliases expanded, merge keys (`<<`) resolved, scalar keys turned into strings.
//!
//! Merge keys follow kubectl's YAML decoder: a mapping's entries are taken in document order, a `<<` entry
//! copies the entries of the mapping it names (or of each mapping of a sequence, the earlier ones winning) over
//! what is already there, and later entries override earlier ones — so a key written after `<<` wins over the
//! merged one, a key written before it does not. Merged mappings have their own merge keys resolved first.

use serde::de::{self, Deserialize, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Every document of a YAML stream as JSON, `null` for empty documents; Err is (1-based document, message).
pub fn documents(text: &str) -> Result<Vec<Value>, (usize, String)> {
    serde_norway::Deserializer::from_str(text)
        .enumerate()
        .map(|(i, de)| {
            Node::deserialize(de)
                .map_err(|e| e.to_string())
                .and_then(to_json)
                .map_err(|message| (i + 1, message))
        })
        .collect()
}

/// A parsed YAML node before merge keys are resolved: a mapping keeps every entry, in document order.
enum Node {
    Null,
    Bool(bool),
    Number(Number),
    String(String),
    Sequence(Vec<Node>),
    Mapping(Vec<(Node, Node)>),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a YAML value")
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        Number::from_f64(v)
            .map(Node::Number)
            .ok_or_else(|| E::custom(format!("{v} has no JSON representation")))
    }
    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::String(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Sequence(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(Node::Mapping(entries))
    }
    /// A value with a local tag (`!thing value`): not part of a Kubernetes manifest.
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Node, A::Error> {
        let (tag, _) = data.variant::<String>()?;
        Err(de::Error::custom(format!("the YAML tag !{tag} is not supported")))
    }
}

fn to_json(node: Node) -> Result<Value, String> {
    Ok(match node {
        Node::Null => Value::Null,
        Node::Bool(b) => Value::Bool(b),
        Node::Number(n) => Value::Number(n),
        Node::String(s) => Value::String(s),
        Node::Sequence(items) => Value::Array(items.into_iter().map(to_json).collect::<Result<_, _>>()?),
        Node::Mapping(entries) => {
            let mut map = Map::new();
            merge_into(&mut map, entries)?;
            Value::Object(map)
        }
    })
}

const MERGE_NEEDS_MAPPINGS: &str = "a merge key (<<) needs a mapping or a sequence of mappings";

/// Sets the entries on `map` in order, later ones overriding; `<<` entries set the merged mappings' entries.
fn merge_into(map: &mut Map<String, Value>, entries: Vec<(Node, Node)>) -> Result<(), String> {
    for (key, value) in entries {
        if matches!(&key, Node::String(k) if k == "<<") {
            match value {
                Node::Mapping(merged) => merge_into(map, merged)?,
                // Earlier mappings win: merge them last.
                Node::Sequence(items) => {
                    for item in items.into_iter().rev() {
                        let Node::Mapping(merged) = item else {
                            return Err(MERGE_NEEDS_MAPPINGS.into());
                        };
                        merge_into(map, merged)?;
                    }
                }
                _ => return Err(MERGE_NEEDS_MAPPINGS.into()),
            }
            continue;
        }
        let key = match key {
            Node::String(s) => s,
            Node::Bool(b) => b.to_string(),
            Node::Number(n) => n.to_string(),
            Node::Null | Node::Sequence(_) | Node::Mapping(_) => {
                return Err("a mapping key must be a string, number or boolean".into());
            }
        };
        map.insert(key, to_json(value)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn one(text: &str) -> Value {
        let mut docs = documents(text).unwrap();
        assert_eq!(docs.len(), 1);
        docs.remove(0)
    }

    #[test]
    fn merge_key_copies_the_anchored_mapping_and_later_keys_win() {
        let v = one("base: &b {a: 1, b: 2}\nuse: {<<: *b, b: 3}\n");
        assert_eq!(v["use"], json!({"a": 1, "b": 3}));
    }

    #[test]
    fn key_written_before_the_merge_key_is_overridden_as_kubectl_does() {
        let v = one("base: &b {a: 1, b: 2}\nuse: {b: 3, <<: *b}\n");
        assert_eq!(v["use"], json!({"a": 1, "b": 2}));
    }

    #[test]
    fn merge_of_a_sequence_lets_earlier_mappings_win() {
        let v = one("x: &x {a: 1, b: 1}\ny: &y {b: 2, c: 2}\nuse: {<<: [*x, *y], c: 3}\n");
        assert_eq!(v["use"], json!({"a": 1, "b": 1, "c": 3}));
    }

    #[test]
    fn chained_merges_resolve_transitively() {
        let v = one("a: &a {x: 1}\nb: &b {<<: *a, y: 2}\nc: {<<: *b, z: 3}\n");
        assert_eq!(v["c"], json!({"x": 1, "y": 2, "z": 3}));
        assert!(!v.to_string().contains("<<"), "{v}");
    }

    #[test]
    fn merge_key_deep_in_a_manifest_is_resolved() {
        let text = "x-env: &env {name: A, value: \"1\"}\nspec:\n  containers:\n  - name: c\n    env:\n    - <<: *env\n      value: \"2\"\n";
        assert_eq!(
            one(text)["spec"]["containers"][0]["env"][0],
            json!({"name": "A", "value": "2"})
        );
    }

    #[test]
    fn merge_of_a_scalar_is_an_error() {
        let err = documents("a: 1\n---\nb: {<<: 5}\n").unwrap_err();
        assert_eq!(err, (2, MERGE_NEEDS_MAPPINGS.to_string()));
        assert!(documents("b: {<<: [{a: 1}, 5]}\n").is_err());
    }

    #[test]
    fn scalar_keys_become_strings_and_complex_keys_are_refused() {
        assert_eq!(one("1: a\ntrue: b\n"), json!({"1": "a", "true": "b"}));
        assert!(documents("? [a]\n: b\n").is_err());
        assert!(documents("~: b\n").is_err());
    }

    #[test]
    fn empty_documents_are_null_and_tags_are_refused() {
        assert_eq!(
            documents("---\n---\na: 1\n").unwrap(),
            vec![Value::Null, json!({"a": 1})]
        );
        let (doc, message) = documents("a: !thing 1\n").unwrap_err();
        assert_eq!(doc, 1);
        assert!(message.contains("!thing"), "{message}");
    }
}
