//! Capacity never opens traffic: a compilation fitted into small maps allows a subset of what the
//! unfitted one allows, holds no more than each map's size, and says what it left out.

use fastrand::Rng;

use super::updates::{cluster, decisions, peers, scenario};
use super::*;

fn tiny() -> Capacities {
    Capacities {
        endpoints: 2,
        ipcache: 4,
        cidrs: 1,
        policy: 3,
        services: 1,
        frontends: 1,
    }
}

#[test]
fn a_fitted_compilation_only_ever_denies_more() {
    let mut rng = Rng::with_seed(0xcafe);
    let mut shortfalls = 0;
    for n in 0..200 {
        let s = scenario(&mut rng);
        let mut c = cluster(&s);
        let full = c.compile();
        let caps = tiny();
        c.capacities = Capacities {
            endpoints: rng.u32(1..=caps.endpoints + 2),
            ipcache: rng.u32(1..=caps.ipcache + 6),
            cidrs: rng.u32(1..=caps.cidrs + 3),
            policy: rng.u32(1..=caps.policy + 10),
            ..caps
        };
        let fitted = c.compile();
        let within = [
            (fitted.endpoints.len(), c.capacities.endpoints),
            (fitted.ipcache.len(), c.capacities.ipcache),
            (fitted.cidrs.len(), c.capacities.cidrs),
            (fitted.policy.len(), c.capacities.policy),
        ];
        for (len, cap) in within {
            assert!(
                len <= cap as usize,
                "case {n}: {len} entries in a map of {cap}"
            );
        }
        let peers = peers(&[&s]);
        let (all, some) = (decisions(&full, &peers), decisions(&fitted, &peers));
        let opened: Vec<usize> = (0..all.len()).filter(|&i| some[i] && !all[i]).collect();
        assert!(
            opened.is_empty(),
            "case {n}: probes {opened:?} opened by fitting\n{s:?}"
        );
        shortfalls += fitted.shortfalls.len();
        if fitted.contents() != full.contents() {
            assert!(!fitted.shortfalls.is_empty(), "case {n}: left out silently");
        }
    }
    assert!(shortfalls > 50, "the capacities hardly bit: {shortfalls}");
}

#[test]
fn cidrs_hold_only_the_prefixes_this_nodes_rules_need() {
    let (mut c, web) = web_and_client();
    c.namespace("other", &[]);
    // A policy that selects no pod of this node: none of its prefixes is needed here.
    c.policy(
        "other",
        "elsewhere",
        "podSelector: {}\npolicyTypes: [Egress]\negress:\n- to:\n  - ipBlock: {cidr: 172.16.0.0/12}",
    );
    c.policy(
        "default",
        "web",
        "podSelector: {}\npolicyTypes: [Egress]\negress:\n- to:\n  - ipBlock: {cidr: 10.0.0.0/8, except: [10.9.0.0/16]}",
    );
    // Another namespace's prefix inside the web pod's block is kept: it shadows the block there.
    c.policy(
        "other",
        "inside",
        "podSelector: {}\npolicyTypes: [Egress]\negress:\n- to:\n  - ipBlock: {cidr: 10.8.0.0/16}",
    );
    let out = c.compile();
    let lens: Vec<(String, u32)> = out
        .cidrs
        .keys()
        .map(|(net, len)| (format!("{net:?}"), *len))
        .collect();
    assert_eq!(out.cidrs.len(), 3, "{lens:?}");
    assert!(!tcp_out(&out, web, "172.16.0.1", 80));
    assert!(tcp_out(&out, web, "10.8.0.1", 80));
    assert!(!tcp_out(&out, web, "10.9.0.1", 80));
}

#[test]
fn a_full_cidrs_map_keeps_the_excepts_and_denies_the_block() {
    let (mut c, web) = web_and_client();
    c.policy(
        "default",
        "web",
        "podSelector: {}\npolicyTypes: [Egress]\negress:\n- to:\n  - ipBlock: {cidr: 10.0.0.0/8, except: [10.9.0.0/16, 10.7.0.0/16]}",
    );
    c.capacities.cidrs = 2;
    let out = c.compile();
    assert_eq!(out.cidrs.len(), 2);
    assert!(
        out.cidrs.keys().all(|(_, len)| *len == 96 + 16),
        "the excepts are kept"
    );
    assert!(!tcp_out(&out, web, "10.9.0.1", 80));
    assert!(
        !tcp_out(&out, web, "10.3.0.1", 80),
        "the block is left out: denied"
    );
    let s = &out.shortfalls;
    assert!(
        s.len() == 1 && s[0].map == netpol_common::map_labels::CIDRS,
        "{s:?}"
    );
}

#[test]
fn frontends_past_capacity_become_ranges_judged_as_frontends() {
    let (mut c, web) = web_and_client();
    c.policy(
        "default",
        "web",
        "podSelector: {}\npolicyTypes: [Egress]\negress:\n- to:\n  - ipBlock: {cidr: 10.43.0.0/16}",
    );
    for (i, vip) in ["10.43.0.10", "10.43.0.11", "10.43.1.5"].iter().enumerate() {
        c.service(&format!(
            "metadata: {{name: s{i}, namespace: default}}\nspec: {{clusterIP: {vip}, selector: {{app: none}}, ports: [{{port: 80}}]}}"
        ));
    }
    let unfitted = c.compile();
    assert_eq!(unfitted.frontends.len(), 3);
    assert!(
        tcp_out(&unfitted, web, "10.43.0.99", 80),
        "the ipBlock allows a non-frontend"
    );
    c.capacities.frontends = 2;
    let out = c.compile();
    assert_eq!(out.frontends.len(), 2, "{:?}", out.frontends);
    assert!(out.frontends.keys().all(|(_, len)| *len == 96 + 24));
    assert!(
        !tcp_out(&out, web, "10.43.0.99", 80),
        "inside a range: judged as a frontend"
    );
    assert!(!tcp_out(&out, web, "10.43.0.10", 80));
    assert!(
        out.shortfalls
            .iter()
            .any(|s| s.map == netpol_common::map_labels::FRONTENDS)
    );
}

#[test]
fn a_full_policy_map_leaves_out_whole_policies_at_a_pod() {
    let (mut c, web) = web_and_client();
    c.policy(
        "default",
        "many",
        "podSelector: {}\ningress:\n- ports: [{port: 1}, {port: 2}, {port: 3}, {port: 4}]",
    );
    c.policy(
        "default",
        "one",
        "podSelector: {}\ningress:\n- ports: [{port: 80}]",
    );
    c.capacities.policy = 2;
    let out = c.compile();
    assert!(out.policy.len() <= 2);
    assert!(
        tcp_in(&out, web, "10.0.1.2", 80),
        "the small policy stays whole"
    );
    for port in 1..=4 {
        assert!(
            !tcp_in(&out, web, "10.0.1.2", port),
            "none of the big one is left"
        );
    }
}
