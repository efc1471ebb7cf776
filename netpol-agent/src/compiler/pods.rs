//! The pod-wide part of a compilation: the identity of every peer pod of the cluster and the
//! IPCACHE entries of their addresses. It is the only part whose size is the cluster's, so it is
//! kept between compilations and updated for the pods (and endpoints) that changed: a policy edit
//! costs one comparison per pod, a relabel a renumbering of the distinct identity keys, and neither
//! rebuilds the 100,000 entries of a 50,000-pod dual-stack cluster.
//!
//! A fresh stage updated once gives exactly what a from-scratch computation gives (the incremental
//! compiler's property test checks it against [`crate::compiler::compile`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use netpol_common::{IpInfo, IpKey};

use super::ip_key;
use crate::model::identity::{PodIdentityKey, number_pods};
use crate::model::{ClusterState, Pod, PodKey};

/// What the stage remembers of one peer pod: the pod as learned (shared with the state it came
/// from) and its identity key.
#[derive(Clone, Debug)]
struct Member {
    key: Arc<PodIdentityKey>,
    pod: Arc<Pod>,
}

impl Member {
    /// Whether `pod` still has this identity key and these addresses.
    fn matches(&self, pod: &Pod) -> bool {
        self.pod.ips == pod.ips
            && self.key.labels == pod.labels
            && pod.ports.iter().all(|p| self.key.ports.contains(p))
            && self.key.ports.iter().all(|p| pod.ports.contains(p))
    }
}

/// A difference between the members and the state's peer pods.
enum Change<'s> {
    Gone(PodKey),
    New(&'s Arc<Pod>),
    /// Equal to its member but another object: the member takes it, so that the next pass finds
    /// the same object (and the old one is freed).
    Equal(&'s Arc<Pod>),
}

/// Peer pods' identities and the IPCACHE entries of their addresses, kept up to date.
#[derive(Clone, Debug, Default)]
pub struct PodStage {
    members: BTreeMap<PodKey, Member>,
    /// Every identity key in use, with how many members have it.
    keys: BTreeMap<Arc<PodIdentityKey>, usize>,
    numbers: Arc<BTreeMap<Arc<PodIdentityKey>, u32>>,
    /// The members claiming each address, in name order.
    claims: BTreeMap<IpKey, Vec<PodKey>>,
    /// The endpoints of the last update.
    endpoints: BTreeMap<PodKey, u32>,
    ipcache: BTreeMap<IpKey, IpInfo>,
}

impl PodStage {
    /// The pod identities, by key.
    pub fn numbers(&self) -> &Arc<BTreeMap<Arc<PodIdentityKey>, u32>> {
        &self.numbers
    }

    /// IPCACHE entries of every peer pod address. Two pods claiming one address: the local one
    /// (with an endpoint) keeps it, for the anti-spoofing check; else the last by name.
    pub fn ipcache(&self) -> &BTreeMap<IpKey, IpInfo> {
        &self.ipcache
    }

    /// Brings the stage to `state` and `endpoints`: one read-only pass over the pods and the
    /// members side by side (both in name order) finds what changed; only that is worked on.
    pub fn update(&mut self, state: &ClusterState, endpoints: &BTreeMap<PodKey, u32>) {
        let mut touched = BTreeSet::new();
        let keys_before = self.keys.len();
        let mut keys_changed = false;
        for change in self.changes(state) {
            match change {
                Change::Gone(key) => {
                    let member = self.members.remove(&key).expect("a member goes once");
                    keys_changed |= self.forget(&key, member, &mut touched);
                }
                Change::Equal(pod) => {
                    if let Some(member) = self.members.get_mut(&pod.key) {
                        member.pod = pod.clone();
                    }
                }
                Change::New(pod) => {
                    let (member, new_key) = self.learn(pod, &mut touched);
                    keys_changed |= new_key;
                    self.members.insert(pod.key.clone(), member);
                }
            }
        }
        self.endpoints_changed(endpoints, &mut touched);
        let renumbered = (keys_changed || self.keys.len() != keys_before) && self.renumber();
        if renumbered {
            touched = self.claims.keys().copied().collect();
        }
        for addr in touched {
            self.refresh(addr);
        }
    }

    /// The members that are gone or changed (a changed pod is gone, then new) and the new pods.
    fn changes<'s>(&self, state: &'s ClusterState) -> Vec<Change<'s>> {
        let mut out = Vec::new();
        let mut old = self.members.iter().peekable();
        for pod in state.pods.values().filter(|p| p.is_policy_peer()) {
            while let Some((key, _)) = old.next_if(|(k, _)| **k < pod.key) {
                out.push(Change::Gone(key.clone()));
            }
            match old.next_if(|(k, _)| **k == pod.key) {
                // The same object: the source shares unchanged pods between states.
                Some((_, member)) if Arc::ptr_eq(&member.pod, pod) => continue,
                Some((_, member)) if member.matches(pod) => {
                    out.push(Change::Equal(pod));
                    continue;
                }
                Some((key, _)) => out.push(Change::Gone(key.clone())),
                None => {}
            }
            out.push(Change::New(pod));
        }
        out.extend(old.map(|(key, _)| Change::Gone(key.clone())));
        out
    }

    /// Drops the claims and key use of `key`'s old member; true when that was its identity key's
    /// last use.
    fn forget(&mut self, key: &PodKey, member: Member, touched: &mut BTreeSet<IpKey>) -> bool {
        for ip in &member.pod.ips {
            let addr = ip_key(*ip);
            touched.insert(addr);
            if let Some(claimants) = self.claims.get_mut(&addr) {
                if let Ok(i) = claimants.binary_search(key) {
                    claimants.remove(i);
                }
                if claimants.is_empty() {
                    self.claims.remove(&addr);
                }
            }
        }
        let count = self
            .keys
            .get_mut(&member.key)
            .expect("a member's key is counted");
        *count -= 1;
        if *count == 0 {
            self.keys.remove(&member.key);
            return true;
        }
        false
    }

    /// `pod` as a member, its claims and key use counted; true when its identity key is new.
    fn learn(&mut self, pod: &Arc<Pod>, touched: &mut BTreeSet<IpKey>) -> (Member, bool) {
        let wanted = PodIdentityKey::of(pod);
        let (key, new) = match self.keys.get_key_value(&wanted) {
            Some((k, _)) => (k.clone(), false),
            None => (Arc::new(wanted), true),
        };
        *self.keys.entry(key.clone()).or_default() += 1;
        for ip in &pod.ips {
            let addr = ip_key(*ip);
            touched.insert(addr);
            // Nearly always one claimant: a one-slot vector, not a set's 11-slot node.
            let claimants = self
                .claims
                .entry(addr)
                .or_insert_with(|| Vec::with_capacity(1));
            if let Err(i) = claimants.binary_search(&pod.key) {
                claimants.insert(i, pod.key.clone());
            }
        }
        let pod = pod.clone();
        (Member { key, pod }, new)
    }

    /// Notes the addresses of pods whose endpoint changed.
    fn endpoints_changed(
        &mut self,
        endpoints: &BTreeMap<PodKey, u32>,
        touched: &mut BTreeSet<IpKey>,
    ) {
        if *endpoints == self.endpoints {
            return;
        }
        let changed: BTreeSet<&PodKey> = endpoints
            .iter()
            .filter(|(k, v)| self.endpoints.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .chain(
                self.endpoints
                    .keys()
                    .filter(|k| !endpoints.contains_key(*k)),
            )
            .collect();
        for key in changed {
            if let Some(member) = self.members.get(key) {
                touched.extend(member.pod.ips.iter().map(|ip| ip_key(*ip)));
            }
        }
        self.endpoints = endpoints.clone();
    }

    /// Numbers the keys in use again; true when a key that had a number got another (a hash
    /// collision moved it), so every entry must be refreshed.
    fn renumber(&mut self) -> bool {
        let numbers = number_pods(self.keys.keys().cloned());
        let moved = numbers
            .iter()
            .any(|(k, n)| self.numbers.get(k).is_some_and(|old| old != n));
        self.numbers = Arc::new(numbers);
        moved
    }

    /// Recomputes the entry of `addr` from its claimants, as one pass over the pods in name order
    /// would: the first claimant, replaced by each later one while it has no endpoint.
    fn refresh(&mut self, addr: IpKey) {
        let mut value: Option<IpInfo> = None;
        for key in self.claims.get(&addr).into_iter().flatten() {
            let member = &self.members[key];
            let info = IpInfo {
                identity: self.numbers[&*member.key],
                endpoint: self.endpoints.get(key).copied().unwrap_or(0),
            };
            if value.is_none_or(|v| v.endpoint == 0) {
                value = Some(info);
            }
        }
        match value {
            Some(v) => self.ipcache.insert(addr, v),
            None => self.ipcache.remove(&addr),
        };
    }
}
