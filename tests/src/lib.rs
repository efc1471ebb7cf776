//! Simulated Flannel cluster for end-to-end tests.
pub mod cluster;
pub mod packets;
