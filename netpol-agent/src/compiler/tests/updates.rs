//! Updates are atomic: over generated before/after cluster states, the writes of a compiled update
//! are replayed one at a time into the model of the two buffers, and after every write the policy
//! decision of every probe (endpoint, peer, direction, protocol, port), through the lookup model,
//! must be the old one or the new one: no intermediate state allows what both deny. The same
//! replay applied in place to the buffer packets read (as before the buffers) must be caught, so
//! the check can fail.

use fastrand::Rng;
use netpol_common::buffer;

use super::*;
use crate::datapath::{Buffers, Contents, Plan, Update, Write};

const APPS: [&str; 3] = ["web", "db", "cache"];
/// Peers that are no pod: inside and outside the generated ipBlocks.
const EXTERNAL: [&str; 3] = ["10.0.2.5", "192.0.2.1", "192.168.1.10"];
const PORTS: [(u8, u16); 3] = [(TCP, 80), (TCP, 443), (UDP, 53)];

#[derive(Clone, Debug)]
pub(super) struct PodSpec {
    ns: &'static str,
    name: String,
    local: bool,
    app: &'static str,
    ip: String,
}

#[derive(Clone, Debug)]
pub(super) struct Scenario {
    pods: Vec<PodSpec>,
    policies: Vec<(&'static str, String, String)>,
}

fn peer(rng: &mut Rng) -> String {
    match rng.u8(0..5) {
        0 => format!(
            "- podSelector: {{matchLabels: {{app: {}}}}}",
            pick(rng, &APPS)
        ),
        1 => "- namespaceSelector: {matchLabels: {team: a}}".to_owned(),
        2 => "- namespaceSelector: {}".to_owned(),
        3 => "- ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.0/24]}".to_owned(),
        _ => format!("- ipBlock: {{cidr: 10.0.{}.0/24}}", rng.u8(0..3)),
    }
}

pub(super) fn pick<T: Copy>(rng: &mut Rng, from: &[T]) -> T {
    from[rng.usize(0..from.len())]
}

fn rule(rng: &mut Rng, peers_key: &str) -> String {
    let mut out = String::from("  - ");
    let mut first = true;
    if rng.bool() {
        out.push_str(&format!("{peers_key}:\n"));
        for _ in 0..rng.usize(1..3) {
            out.push_str(&format!("    {}\n", peer(rng)));
        }
        first = false;
    }
    if rng.bool() {
        let (protocol, port) = match pick(rng, &PORTS) {
            (UDP, p) => ("UDP", p),
            (_, p) => ("TCP", p),
        };
        let indent = if first { "" } else { "    " };
        out.push_str(&format!(
            "{indent}ports: [{{protocol: {protocol}, port: {port}}}]\n"
        ));
        first = false;
    }
    if first {
        out.push_str("{}\n");
    }
    out
}

pub(super) fn policy_spec(rng: &mut Rng) -> String {
    let selector = if rng.bool() {
        "{}".to_owned()
    } else {
        format!("{{matchLabels: {{app: {}}}}}", pick(rng, &APPS))
    };
    let mut spec = format!("podSelector: {selector}\npolicyTypes: [");
    let (ingress, egress) = match rng.u8(0..3) {
        0 => (true, false),
        1 => (false, true),
        _ => (true, true),
    };
    let types: Vec<&str> = [(ingress, "Ingress"), (egress, "Egress")]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, t)| *t)
        .collect();
    spec.push_str(&types.join(", "));
    spec.push_str("]\n");
    for (on, key, peers) in [(ingress, "ingress", "from"), (egress, "egress", "to")] {
        let n = rng.usize(0..3);
        if on && n > 0 {
            spec.push_str(&format!("{key}:\n"));
            for _ in 0..n {
                spec.push_str(&rule(rng, peers));
            }
        }
    }
    spec
}

pub(super) fn scenario(rng: &mut Rng) -> Scenario {
    let pods = (0..6)
        .map(|i| PodSpec {
            ns: if i % 2 == 0 { "a" } else { "b" },
            name: format!("p{i}"),
            local: i < 3,
            app: pick(rng, &APPS),
            ip: format!("10.0.{}.{}", i % 2, 10 + i),
        })
        .collect();
    let policies = (0..rng.usize(1..4))
        .map(|i| (pick(rng, &["a", "b"]), format!("np{i}"), policy_spec(rng)))
        .collect();
    Scenario { pods, policies }
}

/// One to three changes at once, as a coalesced burst of events brings them.
fn change(rng: &mut Rng, before: &Scenario) -> Scenario {
    let mut s = before.clone();
    for _ in 0..rng.usize(1..4) {
        match rng.u8(0..5) {
            0 => {
                let i = rng.usize(0..s.pods.len());
                s.pods[i].app = pick(rng, &APPS);
            }
            1 => {
                // An address moves to another pod (and so to another identity).
                let (i, j) = (rng.usize(0..s.pods.len()), rng.usize(0..s.pods.len()));
                let ip = s.pods[i].ip.clone();
                s.pods[i].ip = std::mem::replace(&mut s.pods[j].ip, ip);
            }
            2 if !s.policies.is_empty() => {
                let i = rng.usize(0..s.policies.len());
                s.policies[i].2 = policy_spec(rng);
            }
            3 if !s.policies.is_empty() => {
                s.policies.remove(rng.usize(0..s.policies.len()));
            }
            _ => {
                let name = format!("np{}", 10 + rng.u8(0..50));
                s.policies
                    .push((pick(rng, &["a", "b"]), name, policy_spec(rng)));
            }
        }
    }
    s
}

fn compiled(s: &Scenario) -> Contents {
    let out = cluster(s).compile();
    assert!(out.errors.is_empty(), "{:?}\n{s:?}", out.errors);
    out.contents()
}

/// The simulated cluster of a scenario.
pub(super) fn cluster(s: &Scenario) -> Cluster {
    let mut c = Cluster::new();
    c.namespace("a", &[("team", "a")]);
    c.namespace("b", &[("team", "b")]);
    for p in &s.pods {
        let labels = [("app", p.app)];
        if p.local {
            c.local(p.ns, &p.name, &labels, &[p.ip.as_str()]);
        } else {
            c.remote(p.ns, &p.name, &labels, &[p.ip.as_str()]);
        }
    }
    for (ns, name, spec) in &s.policies {
        c.policy(ns, name, spec);
    }
    c
}

/// Every probe's decision: local endpoints 10 to 12 against every pod and external address.
pub(super) fn decisions(t: &Contents, peers: &[IpAddr]) -> Vec<bool> {
    let mut out = Vec::new();
    for ep in 10..13 {
        for peer in peers {
            for dir in [Ingress, Egress] {
                for (protocol, port) in PORTS {
                    out.push(t.allows(ep, *peer, dir, protocol, port));
                }
            }
        }
    }
    out
}

pub(super) fn peers(scenarios: &[&Scenario]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = scenarios
        .iter()
        .flat_map(|s| s.pods.iter().map(|p| ip(&p.ip)))
        .chain(EXTERNAL.iter().map(|a| ip(a)))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Replays `writes`, each into the buffer `target(write)` says; after every write that touched the
/// buffer packets read, checks each decision against the old and the new. Returns the first probe
/// an intermediate state allowed that both deny, as (write index, probe index).
fn replay(
    mut buffers: Buffers,
    writes: &[Write<'_>],
    target: usize,
    old: &[bool],
    new: &[bool],
    peers: &[IpAddr],
) -> Option<(usize, usize)> {
    for (i, write) in writes.iter().enumerate() {
        let reads_before = buffer::of(buffers.generation);
        buffers.apply(target, *write);
        let touched = matches!(write, Write::Switch(_)) || target == reads_before;
        if !touched {
            continue;
        }
        let now = decisions(buffers.active(), peers);
        let opened = (0..now.len()).find(|&p| now[p] && !old[p] && !new[p]);
        if let Some(p) = opened {
            return Some((i, p));
        }
    }
    None
}

struct Case {
    buffers: Buffers,
    desired: Contents,
    old: Vec<bool>,
    new: Vec<bool>,
    peers: Vec<IpAddr>,
}

impl Case {
    /// Replays the update's writes through the buffers; returns the buffers at the end, how many
    /// writes there were, and the first probe an intermediate state opened.
    fn replay_buffered(&self) -> (Buffers, usize, Option<(usize, usize)>) {
        let update = Update::new(&self.buffers, &self.desired);
        let writes = update.writes();
        let (b, old, new) = (update.buffer, &self.old, &self.new);
        let opened = replay(self.buffers.clone(), &writes, b, old, new, &self.peers);
        let mut end = self.buffers.clone();
        for w in &writes {
            end.apply(b, *w);
        }
        (end, writes.len(), opened)
    }

    /// An update from `buffers` to `desired`, with every probe's old and new decision.
    fn new(buffers: Buffers, desired: Contents, peers: Vec<IpAddr>) -> Case {
        Case {
            old: decisions(buffers.active(), &peers),
            new: decisions(&desired, &peers),
            buffers,
            desired,
            peers,
        }
    }
}

/// A generated case: the buffers as two updates left them (packets read `before`, the other
/// buffer holds the state before that), and the state after the change.
fn case(rng: &mut Rng) -> Case {
    let older = scenario(rng);
    let before = change(rng, &older);
    let after = change(rng, &before);
    let peers = peers(&[&older, &before, &after]);
    let generation = rng.u32(..);
    let mut contents: [Contents; 2] = Default::default();
    contents[buffer::of(generation)] = compiled(&before);
    contents[1 - buffer::of(generation)] = compiled(&older);
    let buffers = Buffers {
        generation,
        contents,
    };
    Case::new(buffers, compiled(&after), peers)
}

#[test]
fn no_intermediate_state_of_an_update_allows_what_both_states_deny() {
    let mut rng = Rng::with_seed(0x5eed_0001);
    let mut writes_checked = 0;
    for n in 0..150 {
        let c = case(&mut rng);
        let (end, writes, opened) = c.replay_buffered();
        writes_checked += writes;
        assert_eq!(
            opened, None,
            "case {n}: an intermediate state opened a probe"
        );
        // And the update arrives: packets read exactly the desired contents.
        assert_eq!(end.active(), &c.desired, "case {n}");
    }
    assert!(
        writes_checked > 1_000,
        "too few writes to mean anything: {writes_checked}"
    );
}

/// A relabel and a policy edit in one update: before, the policy allows `db` and the peer is
/// `web`; after, it allows `web` and the peer is `db`. Both deny the peer; a state with the new
/// allow and the old identity lets it in.
fn swap_case() -> Case {
    let pod = |name: &str, local, app, ip: &str| PodSpec {
        ns: "a",
        name: name.to_owned(),
        local,
        app,
        ip: ip.to_owned(),
    };
    let allow = |app: &str| {
        format!(
            "podSelector: {{matchLabels: {{app: cache}}}}\ningress:\n  - from:\n    - podSelector: {{matchLabels: {{app: {app}}}}}\n"
        )
    };
    let before = Scenario {
        pods: vec![
            pod("server", true, "cache", "10.0.0.10"),
            pod("x", false, "web", "10.0.1.11"),
            // Both label sets stay in use, so both identities exist before and after.
            pod("w", false, "web", "10.0.1.12"),
            pod("d", false, "db", "10.0.1.13"),
        ],
        policies: vec![("a", "np".to_owned(), allow("db"))],
    };
    let mut after = before.clone();
    after.pods[1].app = "db";
    after.policies[0].2 = allow("web");
    let peers = peers(&[&before, &after]);
    let buffers = Buffers {
        generation: 0,
        contents: [compiled(&before), Contents::default()],
    };
    Case::new(buffers, compiled(&after), peers)
}

/// The writes of `c`'s update applied to the buffer packets read, one at a time.
fn opened_in_place(c: &Case) -> bool {
    let active = buffer::of(c.buffers.generation);
    let plan = Plan::new(c.buffers.active(), &c.desired);
    replay(
        c.buffers.clone(),
        &plan.writes(),
        active,
        &c.old,
        &c.new,
        &c.peers,
    )
    .is_some()
}

#[test]
fn a_relabel_and_a_policy_edit_at_once_are_safe_only_with_the_buffers() {
    let c = swap_case();
    assert!(
        opened_in_place(&c),
        "in place, the swap opens the peer on the way"
    );
    let (_, _, opened) = c.replay_buffered();
    assert_eq!(opened, None);
}

#[test]
fn the_same_writes_in_place_would_open_traffic_that_both_states_deny() {
    let mut rng = Rng::with_seed(0x5eed_0001);
    let mut caught = 0;
    for _ in 0..150 {
        if opened_in_place(&case(&mut rng)) {
            caught += 1;
        }
    }
    eprintln!("in place, {caught} of 150 updates opened a probe on the way");
    assert!(
        caught > 0,
        "the replay never catches an unsafe order: it checks nothing"
    );
}
