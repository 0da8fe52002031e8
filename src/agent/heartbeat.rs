//! The agent's heartbeat Lease: a `coordination.k8s.io/v1` Lease named after the node, in the agent's namespace,
//! labelled `keepalive.dev/node-heartbeat`, owned by the agent's pod (so it goes with the pod). Renewing it costs
//! the apiserver, etcd and the controller's watch a few hundred bytes where a rewrite of the node report costs
//! tens of kilobytes. The chart's ValidatingAdmissionPolicy lets an agent write only its own node's Lease.

use k8s_openapi::{api::coordination::v1::Lease, apimachinery::pkg::apis::meta::v1::MicroTime, jiff::Timestamp};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

use crate::api::{AGENT_MANAGER, HEARTBEAT_LABEL};

/// Where and as whom the agent renews its Lease.
pub struct Heartbeat {
    api: Api<Lease>,
    node: String,
    /// The agent's pod (name, UID), the Lease's owner.
    owner: Option<(String, String)>,
    /// How long a holder's silence makes the Lease expired: three heartbeats, as the controller judges it.
    duration_seconds: i32,
}

impl Heartbeat {
    pub fn new(
        client: Client,
        namespace: &str,
        node: &str,
        owner: Option<(String, String)>,
        heartbeat_seconds: u64,
    ) -> Self {
        Heartbeat {
            api: Api::namespaced(client, namespace),
            node: node.to_string(),
            owner,
            duration_seconds: i32::try_from(heartbeat_seconds.saturating_mul(3)).unwrap_or(i32::MAX),
        }
    }

    /// Creates or renews the Lease (server-side apply).
    pub async fn renew(&self) -> kube::Result<()> {
        let lease = lease_body(&self.node, self.owner.as_ref(), self.duration_seconds, Timestamp::now());
        self.api
            .patch(
                &self.node,
                &PatchParams::apply(AGENT_MANAGER).force(),
                &Patch::Apply(&lease),
            )
            .await
            .map(|_| ())
    }
}

/// The Lease of `node`'s agent as it applies it (server-side apply), renewed at `now`; owned by the agent's pod
/// (name, UID) when known.
pub fn lease_body(
    node: &str,
    owner: Option<&(String, String)>,
    duration_seconds: i32,
    now: Timestamp,
) -> serde_json::Value {
    let mut metadata = serde_json::json!({
        "name": node,
        "labels": { HEARTBEAT_LABEL: "true" },
    });
    if let Some((name, uid)) = owner {
        metadata["ownerReferences"] = serde_json::json!([{
            "apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid,
        }]);
    }
    serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": metadata,
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": duration_seconds,
            "renewTime": MicroTime(now),
        },
    })
}
