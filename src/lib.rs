//! keepalive-operator: keeps idle TCP connections alive through load balancers and NATs by giving pods the
//! `net.ipv4.tcp_keepalive_*` sysctls their network path needs.
//!
//! The crate is a pure core (`api`, and the policy decision shared by every caller) with thin I/O shells;
//! `main.rs` only parses arguments and dispatches.

pub mod api;
pub mod cli;
pub mod policy;
