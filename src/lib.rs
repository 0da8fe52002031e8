//! keepalive-operator: keeps idle TCP connections alive through load balancers and NATs by giving pods the
//! `net.ipv4.tcp_keepalive_*` sysctls their network path needs.
//!
//! A pure core — [`api`] (the CRD types), [`policy`] (the one decision, shared by every caller), [`validate`]
//! and [`apply`] — and one directory per process role: [`webhook`] and [`controller`] (the operator),
//! [`agent`] (the node agent), with what they share in [`runtime`]. [`cli`] dispatches; `main.rs` only parses.
//! Imports point down: `cli → {controller, agent, apply}`, `controller → {webhook, policy, runtime}`,
//! `agent → {runtime, api}`, everything → `api`.

pub mod agent;
pub mod api;
pub mod apply;
pub mod cli;
pub mod controller;
pub mod policy;
pub mod runtime;
pub mod validate;
pub mod webhook;
