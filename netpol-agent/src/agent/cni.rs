//! Requests of the chained CNI plugin (`netpol-cni`): a new sandbox's claim of its pod's
//! addresses, answered once the endpoint is programmed, and the sandbox's removal.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use netpol_cni::protocol::Answer;
use tokio::sync::oneshot;

use crate::discovery::endpoints::{Claim, Matching};
use crate::model::PodKey;
use crate::observe::control::{CniKind, CniRequest};

/// How long a claim is kept once no veth carries its addresses (a sandbox torn down without DEL).
const CLAIM_ORPHAN_AFTER: Duration = Duration::from_secs(60);

struct Entry {
    claim: Claim,
    /// Last time a veth carried the claimed addresses (or when the claim came).
    seen: Instant,
}

struct Waiter {
    container_id: String,
    pod: PodKey,
    deadline: Instant,
    reply: oneshot::Sender<Answer>,
}

/// Claims by sandbox (container id), and the ADD requests waiting for their endpoint.
#[derive(Default)]
pub struct Claims {
    by_container: BTreeMap<String, Entry>,
    waiters: Vec<Waiter>,
}

impl Claims {
    /// Takes a request. Returns whether the claims changed (the endpoints must be matched again).
    pub fn take(&mut self, request: CniRequest, now: Instant) -> bool {
        match request.kind {
            CniKind::Add(claim) => {
                let id = claim.container_id.clone();
                let pod = PodKey::new(claim.namespace, claim.name);
                tracing::info!(pod = %pod, container = %claim.container_id, ips = ?claim.ips, "CNI ADD: programming the endpoint");
                let deadline = now + Duration::from_millis(claim.timeout_ms);
                self.waiters.push(Waiter {
                    container_id: id.clone(),
                    pod: pod.clone(),
                    deadline,
                    reply: request.reply,
                });
                // A retried sandbox claims again: only its newest claim counts.
                self.by_container.retain(|_, e| e.claim.pod != pod);
                let claim = Claim {
                    pod,
                    ips: claim.ips,
                };
                self.by_container.insert(id, Entry { claim, seen: now });
                true
            }
            CniKind::Del(forget) => {
                let removed = self.by_container.remove(&forget.container_id).is_some();
                self.waiters
                    .retain(|w| w.container_id != forget.container_id);
                let _ = request.reply.send(Answer::Forgotten);
                removed
            }
        }
    }

    /// The claims, for matching.
    pub fn list(&self) -> Vec<Claim> {
        self.by_container
            .values()
            .map(|e| e.claim.clone())
            .collect()
    }

    /// Answers the waiters whose pod now has an attached endpoint (`attached` gives its veth name).
    pub fn answer(&mut self, matching: &Matching, attached: &BTreeMap<u32, String>) {
        let endpoint = |w: &Waiter| {
            matching
                .endpoints
                .get(&w.pod)
                .and_then(|i| attached.get_key_value(i))
                .map(|(i, name)| (*i, name.clone()))
        };
        let done: Vec<Waiter> = self
            .waiters
            .extract_if(.., |w| endpoint(w).is_some())
            .collect();
        for w in done {
            let Some((ifindex, ifname)) = endpoint(&w) else {
                continue;
            };
            tracing::info!(pod = %w.pod, ifname, "CNI ADD answered: endpoint programmed");
            // The plugin may have given up meanwhile: nothing to tell then.
            let _ = w.reply.send(Answer::Programmed { ifname, ifindex });
        }
    }

    /// Fails the waiters past their deadline, saying why (`why` explains a pod's state), and forgets
    /// claims that no veth has carried for [`CLAIM_ORPHAN_AFTER`].
    pub fn expire(&mut self, now: Instant, matching: &Matching, why: impl Fn(&PodKey) -> String) {
        let late: Vec<Waiter> = self.waiters.extract_if(.., |w| w.deadline <= now).collect();
        for w in late {
            let reason = why(&w.pod);
            tracing::warn!(pod = %w.pod, reason, "CNI ADD failed: endpoint not programmed in time");
            let _ = w.reply.send(Answer::Failed { reason });
        }
        for entry in self.by_container.values_mut() {
            if matching.endpoints.contains_key(&entry.claim.pod) {
                entry.seen = now;
            }
        }
        let waiting: Vec<&str> = self
            .waiters
            .iter()
            .map(|w| w.container_id.as_str())
            .collect();
        self.by_container.retain(|id, e| {
            waiting.contains(&id.as_str()) || now.duration_since(e.seen) < CLAIM_ORPHAN_AFTER
        });
    }
}
