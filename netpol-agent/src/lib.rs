//! netpol-agent: enforces Kubernetes NetworkPolicy on a Flannel node with TC eBPF programs.
//!
//! Data flow, one folder per stage, each importing only the stages before it:
//! [`sources`] (a manifest directory, the Kubernetes API, the saved state) -> cluster state
//! ([`model`]) -> pure policy compiler ([`compiler`]), fed by the node's veths ([`discovery`]) ->
//! datapath ([`datapath`]: maps and attachments) -> counters -> observers ([`observe`]: flows,
//! metrics, health, `status`). [`verify`] proves enforcement is on; [`agent`] runs the loop;
//! [`kubectl`] is the `kubectl netpol` plugin that finds the agent to ask.

pub mod agent;
pub mod compiler;
pub mod datapath;
pub mod discovery;
pub mod kubectl;
pub mod model;
pub mod observe;
#[cfg(test)]
mod scratch;
pub mod sources;
pub mod verify;
