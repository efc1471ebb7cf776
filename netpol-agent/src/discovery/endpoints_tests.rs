use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::*;
use crate::discovery::{PeerLink, PodVeth};
use crate::model::{Object, Pod};

const NODE: &str = "n0";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn pod(name: &str, node: &str, ips: &[&str]) -> Pod {
    Pod {
        key: PodKey::new("x", name),
        labels: Arc::new(BTreeMap::from([("pod".to_owned(), name.to_owned())])),
        node_name: Some(node.to_owned()),
        host_network: false,
        phase: Some("Running".into()),
        ips: ips.iter().map(|s| ip(s)).collect(),
        ports: Vec::new(),
    }
}

fn veth(ifindex: u32, addrs: &[&str], bridged: bool) -> PodVeth {
    PodVeth {
        ifindex,
        name: format!("veth{ifindex}"),
        peer_netnsid: 1,
        peer_ifindex: 2,
        peer_addrs: addrs.iter().map(|s| ip(s)).collect(),
        peer_link: PeerLink::default(),
        bridged,
        bridge_networks: if bridged {
            vec![
                "10.42.0.1/24".parse().unwrap(),
                "fd00::1/64".parse().unwrap(),
            ]
        } else {
            Vec::new()
        },
        master: bridged.then_some(3),
    }
}

fn state(pods: Vec<Pod>) -> ClusterState {
    let mut s = ClusterState::default();
    for p in pods {
        s.insert(Object::Pod(p));
    }
    s
}

fn view(veths: Vec<PodVeth>) -> NodeView {
    NodeView {
        veths,
        ..NodeView::default()
    }
}

fn matching(state: Option<&ClusterState>, view: &NodeView, claims: &[Claim]) -> Matching {
    with_history(state, view, claims, &BTreeMap::new(), false)
}

fn with_history(
    state: Option<&ClusterState>,
    view: &NodeView,
    claims: &[Claim],
    previous: &BTreeMap<u32, PodKey>,
    only_previous: bool,
) -> Matching {
    match_endpoints(&MatchInput {
        state,
        node_name: NODE,
        view,
        claims,
        policed: &BTreeSet::new(),
        previous,
        only_previous,
    })
}

#[test]
fn a_veth_carrying_a_local_pods_addresses_is_its_endpoint() {
    let s = state(vec![pod("a", NODE, &["10.42.0.10", "fd00::10"])]);
    let v = view(vec![veth(7, &["10.42.0.10", "fd00::10"], true)]);
    let m = matching(Some(&s), &v, &[]);
    assert_eq!(m.endpoints, BTreeMap::from([(PodKey::new("x", "a"), 7)]));
    assert!(m.pending.is_empty());
}

#[test]
fn every_bridged_veth_without_a_pod_is_pending_and_unbridged_ones_are_left_alone() {
    let s = state(vec![pod("a", NODE, &["10.42.0.10"])]);
    let v = view(vec![
        veth(7, &["10.42.0.99"], true),
        veth(8, &[], true),
        veth(9, &["192.0.2.1"], false),
    ]);
    let m = matching(Some(&s), &v, &[]);
    assert!(m.endpoints.is_empty());
    assert_eq!(m.pending.keys().copied().collect::<Vec<_>>(), vec![7, 8]);
    assert_eq!(m.pending[&7].reason, PendingReason::UnknownPod);
    assert_eq!(m.pending[&7].addrs, vec![ip("10.42.0.99")]);
}

#[test]
fn a_veth_attached_before_stays_policed_when_its_pod_goes() {
    let s = state(vec![]);
    let v = view(vec![veth(9, &["10.42.0.10"], false)]);
    let m = match_endpoints(&MatchInput {
        state: Some(&s),
        node_name: NODE,
        view: &v,
        claims: &[],
        policed: &BTreeSet::from([9]),
        previous: &BTreeMap::new(),
        only_previous: false,
    });
    assert_eq!(m.pending[&9].reason, PendingReason::UnknownPod);
    assert!(m.pending[&9].addrs.is_empty(), "not in a bridge's network");
}

#[test]
fn without_cluster_state_every_bridged_veth_is_pending() {
    let v = view(vec![veth(7, &["10.42.0.10"], true), veth(9, &[], false)]);
    let m = matching(None, &v, &[]);
    assert!(m.endpoints.is_empty());
    assert_eq!(m.pending.len(), 1);
    assert_eq!(m.pending[&7].reason, PendingReason::NoClusterState);
}

#[test]
fn two_veths_claiming_one_pods_address_both_fail_closed() {
    let s = state(vec![pod("a", NODE, &["10.42.0.10"])]);
    let v = view(vec![
        veth(7, &["10.42.0.10"], true),
        veth(8, &["10.42.0.10"], true),
    ]);
    let m = matching(Some(&s), &v, &[]);
    assert!(m.endpoints.is_empty(), "the first claimant must not win");
    for i in [7, 8] {
        assert_eq!(m.pending[&i].reason, PendingReason::Ambiguous);
        assert!(m.pending[&i].addrs.is_empty(), "nobody owns the address");
    }
}

#[test]
fn a_veth_with_two_pods_addresses_fails_closed() {
    let s = state(vec![
        pod("a", NODE, &["10.42.0.10"]),
        pod("b", NODE, &["10.42.0.11"]),
    ]);
    let v = view(vec![
        veth(7, &["10.42.0.10", "10.42.0.11"], true),
        veth(8, &["10.42.0.11"], true),
    ]);
    let m = matching(Some(&s), &v, &[]);
    assert!(m.endpoints.is_empty(), "{m:?}");
    assert_eq!(m.pending[&7].reason, PendingReason::Ambiguous);
    assert_eq!(m.pending[&8].reason, PendingReason::Ambiguous);
}

#[test]
fn an_unknown_address_two_veths_share_belongs_to_neither() {
    let s = state(vec![]);
    let v = view(vec![
        veth(7, &["10.42.0.50", "10.42.0.51"], true),
        veth(8, &["10.42.0.50"], true),
    ]);
    let m = matching(Some(&s), &v, &[]);
    assert_eq!(m.pending[&7].addrs, vec![ip("10.42.0.51")]);
    assert!(m.pending[&8].addrs.is_empty());
    assert_eq!(m.pending[&8].reason, PendingReason::Ambiguous);
}

#[test]
fn pods_of_other_nodes_host_network_and_finished_pods_own_no_veth() {
    let mut host = pod("h", NODE, &["10.42.0.12"]);
    host.host_network = true;
    let mut done = pod("d", NODE, &["10.42.0.13"]);
    done.phase = Some("Succeeded".into());
    let s = state(vec![pod("r", "n1", &["10.42.0.11"]), host, done]);
    let v = view(vec![
        veth(7, &["10.42.0.11"], true),
        veth(8, &["10.42.0.12"], true),
        veth(9, &["10.42.0.13"], true),
    ]);
    let m = matching(Some(&s), &v, &[]);
    assert!(m.endpoints.is_empty());
    assert_eq!(m.pending.len(), 3);
}

#[test]
fn a_claim_stands_in_for_the_api_until_the_api_reports_addresses() {
    let s = state(vec![pod("a", NODE, &[])]);
    let v = view(vec![veth(7, &["10.42.0.10"], true)]);
    let claim = Claim {
        pod: PodKey::new("x", "a"),
        ips: vec![ip("10.42.0.10")],
    };
    let m = matching(Some(&s), &v, std::slice::from_ref(&claim));
    assert_eq!(m.endpoints, BTreeMap::from([(PodKey::new("x", "a"), 7)]));
    assert_eq!(m.claimed[&claim.pod], claim.ips);
    let effective = with_claimed(&s, &m.claimed);
    assert_eq!(effective.pods[&claim.pod].ips, claim.ips);

    // Once the API has addresses, they win over the claim.
    let s = state(vec![pod("a", NODE, &["10.42.0.20"])]);
    let m = matching(Some(&s), &v, &[claim]);
    assert!(m.endpoints.is_empty());
    assert!(m.claimed.is_empty());
    assert_eq!(m.pending[&7].reason, PendingReason::UnknownPod);
}

#[test]
fn a_claim_for_a_pod_of_another_node_or_unknown_pod_is_ignored() {
    let s = state(vec![pod("a", "n1", &[])]);
    let v = view(vec![veth(7, &["10.42.0.10"], true)]);
    let claims = [
        Claim {
            pod: PodKey::new("x", "a"),
            ips: vec![ip("10.42.0.10")],
        },
        Claim {
            pod: PodKey::new("x", "ghost"),
            ips: vec![ip("10.42.0.10")],
        },
    ];
    let m = matching(Some(&s), &v, &claims);
    assert!(m.endpoints.is_empty());
    assert!(m.claimed.is_empty());
}

#[test]
fn two_pods_naming_one_address_own_no_veth() {
    // A reused address still listed for a pod on its way out, say.
    let s = state(vec![
        pod("old", NODE, &["10.42.0.10"]),
        pod("new", NODE, &["10.42.0.10"]),
    ]);
    let v = view(vec![veth(7, &["10.42.0.10"], true)]);
    let m = matching(Some(&s), &v, &[]);
    assert!(m.endpoints.is_empty(), "{m:?}");
    assert_eq!(m.pending[&7].reason, PendingReason::Ambiguous);
    assert!(m.pending[&7].addrs.is_empty());
}

#[test]
fn a_claim_never_takes_an_address_the_api_gives_another_pod() {
    let s = state(vec![
        pod("old", NODE, &["10.42.0.10"]),
        pod("new", NODE, &[]),
    ]);
    let v = view(vec![veth(7, &["10.42.0.10"], true)]);
    let claim = Claim {
        pod: PodKey::new("x", "new"),
        ips: vec![ip("10.42.0.10")],
    };
    let m = matching(Some(&s), &v, &[claim]);
    assert!(m.endpoints.is_empty(), "{m:?}");
    assert!(m.claimed.is_empty());
    assert_eq!(m.pending[&7].reason, PendingReason::Ambiguous);
}

#[test]
fn the_veth_that_had_the_pod_keeps_it_against_a_newcomer_with_its_address() {
    let s = state(vec![pod("a", NODE, &["10.42.0.10"])]);
    let v = view(vec![
        veth(7, &["10.42.0.10"], true),
        veth(8, &["10.42.0.10", "10.42.0.50"], true),
    ]);
    let previous = BTreeMap::from([(7, PodKey::new("x", "a"))]);
    let m = with_history(Some(&s), &v, &[], &previous, false);
    assert_eq!(m.endpoints, BTreeMap::from([(PodKey::new("x", "a"), 7)]));
    assert_eq!(m.pending[&8].reason, PendingReason::Ambiguous);
    assert_eq!(m.pending[&8].addrs, vec![ip("10.42.0.50")]);
}

#[test]
fn a_veth_whose_pod_is_gone_is_pending_as_such() {
    let s = state(vec![]);
    let v = view(vec![veth(7, &["10.42.0.10"], true)]);
    let previous = BTreeMap::from([(7, PodKey::new("x", "a"))]);
    let m = with_history(Some(&s), &v, &[], &previous, false);
    assert_eq!(m.pending[&7].reason, PendingReason::PodGone);
}

#[test]
fn on_a_saved_state_only_the_saved_bindings_match() {
    let s = state(vec![
        pod("a", NODE, &["10.42.0.10"]),
        pod("b", NODE, &["10.42.0.11"]),
    ]);
    // b's address now sits on another veth than the one b had: maybe a new pod reusing it.
    let v = view(vec![
        veth(7, &["10.42.0.10"], true),
        veth(9, &["10.42.0.11"], true),
    ]);
    let previous = BTreeMap::from([(7, PodKey::new("x", "a")), (8, PodKey::new("x", "b"))]);
    let m = with_history(Some(&s), &v, &[], &previous, true);
    assert_eq!(m.endpoints, BTreeMap::from([(PodKey::new("x", "a"), 7)]));
    assert_eq!(m.pending[&9].reason, PendingReason::Unconfirmed);
}

#[test]
fn pending_addresses_must_lie_in_the_bridges_networks() {
    let s = state(vec![]);
    // Another node's pod, an outside host, a ClusterIP: not this bridge's.
    let v = view(vec![veth(
        7,
        &[
            "10.42.0.60",
            "10.42.1.5",
            "1.1.1.1",
            "10.43.0.10",
            "fd00::60",
        ],
        true,
    )]);
    let m = matching(Some(&s), &v, &[]);
    assert_eq!(m.pending[&7].addrs, vec![ip("10.42.0.60"), ip("fd00::60")]);
}
