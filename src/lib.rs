//! keepalive-operator: keeps idle TCP connections alive through load balancers and NATs by giving pods the
//! `net.ipv4.tcp_keepalive_*` sysctls their network path needs.
//!
//! A pure core — [`api`] (the CRD types), [`policy`] (the one decision, shared by every caller) and
//! [`validate`] — with thin I/O shells: [`webhook`], [`apply`], [`controller`]. `main.rs` only parses
//! arguments and dispatches.

pub mod agent;
pub mod api;
pub mod apply;
pub mod cache;
pub mod certs;
pub mod cli;
pub mod conformance;
pub mod controller;
pub mod leader;
pub mod metrics;
pub mod policy;
pub mod reconcile;
pub mod report;
pub mod server;
pub mod telemetry;
pub mod validate;
pub mod webhook;
