//! The policy set: every policy in precedence order, indexed by a label each one requires.

use std::collections::{BTreeMap, HashMap};

use super::selector::selector_matches;
use crate::api::{KeepalivePolicy, KeepalivePolicySpec, LabelSelector, SelectorOperator};

/// One policy as the decision sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyEntry {
    pub name: String,
    pub generation: Option<i64>,
    pub spec: KeepalivePolicySpec,
}

impl PolicyEntry {
    pub fn from_policy(policy: &KeepalivePolicy) -> Self {
        PolicyEntry {
            name: policy.metadata.name.clone().unwrap_or_default(),
            generation: policy.metadata.generation,
            spec: policy.spec.clone(),
        }
    }

    /// Whether this policy's selectors select the pod (regardless of other policies).
    pub fn selects(&self, namespace_labels: &BTreeMap<String, String>, pod_labels: &BTreeMap<String, String>) -> bool {
        selector_matches(self.spec.namespace_selector.as_ref(), namespace_labels)
            && selector_matches(self.spec.pod_selector.as_ref(), pod_labels)
    }
}

/// Position of a policy in precedence order.
type Rank = u32;
/// label key → label value → ranks of the policies that require that pair.
type LabelIndex = HashMap<String, HashMap<String, Vec<Rank>>>;

/// All policies, in precedence order (highest priority first, then name), indexed by a label each one requires,
/// so finding a pod's policy looks at few candidates even among thousands of policies.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    entries: Vec<PolicyEntry>,
    by_pod_label: LabelIndex,
    by_namespace_label: LabelIndex,
    /// Policies without a required label pair: always candidates. Sorted.
    unindexed: Vec<Rank>,
}

impl PolicySet {
    pub fn new(policies: impl IntoIterator<Item = PolicyEntry>) -> Self {
        let mut entries: Vec<PolicyEntry> = policies.into_iter().collect();
        entries.sort_by(|a, b| b.spec.priority.cmp(&a.spec.priority).then_with(|| a.name.cmp(&b.name)));
        let mut set = PolicySet {
            entries,
            ..Default::default()
        };
        for (rank, entry) in set.entries.iter().enumerate() {
            let rank = rank as Rank;
            // Index each policy under the pairs of one selector: a pod lacking all of them cannot match.
            let (pod_pairs, ns_pairs) = (
                required_pairs(entry.spec.pod_selector.as_ref()),
                required_pairs(entry.spec.namespace_selector.as_ref()),
            );
            let (index, pairs) = if !pod_pairs.is_empty() {
                (&mut set.by_pod_label, pod_pairs)
            } else if !ns_pairs.is_empty() {
                (&mut set.by_namespace_label, ns_pairs)
            } else {
                set.unindexed.push(rank);
                continue;
            };
            for (k, v) in pairs {
                index
                    .entry(k.to_string())
                    .or_default()
                    .entry(v.to_string())
                    .or_default()
                    .push(rank);
            }
        }
        set
    }

    pub fn from_policies<'a>(policies: impl IntoIterator<Item = &'a KeepalivePolicy>) -> Self {
        Self::new(policies.into_iter().map(PolicyEntry::from_policy))
    }

    /// Policies in precedence order.
    pub fn entries(&self) -> &[PolicyEntry] {
        &self.entries
    }

    pub fn get(&self, name: &str) -> Option<&PolicyEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The policy that owns a pod with these labels: the first in precedence order whose selectors match.
    pub fn winner(
        &self,
        namespace_labels: &BTreeMap<String, String>,
        pod_labels: &BTreeMap<String, String>,
    ) -> Option<&PolicyEntry> {
        let mut candidates: Vec<Rank> = Vec::new();
        collect(&self.by_pod_label, pod_labels, &mut candidates);
        collect(&self.by_namespace_label, namespace_labels, &mut candidates);
        candidates.sort_unstable();
        candidates.dedup();
        // Merge the indexed candidates with the always-candidates, in rank order; the first match wins.
        let (mut i, mut j) = (0, 0);
        loop {
            let rank = match (candidates.get(i), self.unindexed.get(j)) {
                (Some(&a), Some(&b)) if a <= b => {
                    i += 1;
                    if a == b {
                        j += 1;
                    }
                    a
                }
                (_, Some(&b)) => {
                    j += 1;
                    b
                }
                (Some(&a), None) => {
                    i += 1;
                    a
                }
                (None, None) => return None,
            };
            let entry = &self.entries[rank as usize];
            if entry.selects(namespace_labels, pod_labels) {
                return Some(entry);
            }
        }
    }
}

/// Label pairs a selector requires, one of which a matching object must carry: all matchLabels pairs (any one
/// is necessary), else the values of the first `In` requirement.
fn required_pairs(selector: Option<&LabelSelector>) -> Vec<(&str, &str)> {
    let Some(s) = selector else { return Vec::new() };
    if let Some((k, v)) = s.match_labels.iter().next() {
        return vec![(k.as_str(), v.as_str())];
    }
    s.match_expressions
        .iter()
        .find(|r| r.operator == SelectorOperator::In)
        .map(|r| r.values.iter().map(|v| (r.key.as_str(), v.as_str())).collect())
        .unwrap_or_default()
}

fn collect(index: &LabelIndex, labels: &BTreeMap<String, String>, out: &mut Vec<Rank>) {
    if index.is_empty() {
        return;
    }
    for (k, v) in labels {
        if let Some(ranks) = index.get(k).and_then(|by_value| by_value.get(v)) {
            out.extend_from_slice(ranks);
        }
    }
}
