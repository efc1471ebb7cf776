//! netpol-agent: enforces Kubernetes NetworkPolicy on a Flannel node with TC eBPF programs.
//!
//! Data flow, one module per stage:
//! sources ([`manifests`], [`kube_source`]) -> cluster state ([`model`]) -> pure policy compiler ([`compiler`], with
//! [`selector`] and [`identity`]) -> datapath ([`datapath`]: maps and attachments, on the veths that
//! [`discovery`] finds) -> counters -> observers ([`control`]: `status`).

pub mod agent;
pub mod compiler;
pub mod control;
pub mod datapath;
pub mod discovery;
pub mod endpoints;
pub mod flows;
pub mod health;
pub mod identity;
pub mod kube_router;
pub mod kube_source;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod observe;
pub mod persisted;
#[cfg(test)]
mod scratch;
pub mod selector;
pub mod service;
pub mod source;
pub mod verify;
