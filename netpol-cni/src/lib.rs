//! netpol-cni: a chained CNI plugin that has netpol-agent program a new pod's endpoint before the
//! pod starts, and the wire protocol it speaks with the agent's control socket.
//!
//! [`protocol`] is shared with the agent; [`plugin`] is the CNI logic without I/O (the binary,
//! `src/main.rs`, does the socket and stdio work). See `docs/cni.md`.

pub mod plugin;
pub mod protocol;
