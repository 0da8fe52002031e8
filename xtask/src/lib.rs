//! Project tasks and the real local control plane the tests and the demo run against.

pub mod admission;
pub mod bench;
pub mod cluster;
pub mod peers;
pub mod sandbox;
pub mod tools;

pub use cluster::{ControlPlane, shared};
