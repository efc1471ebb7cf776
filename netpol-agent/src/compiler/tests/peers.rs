//! Peer resolution through the label index (and its choice of path) against the plain scan, over
//! generated namespaces, identities and selectors.

use super::*;

/// A state of `namespaces` (with a `team` label each) and the numbered identity keys of `pods`.
fn generated(rng: &mut fastrand::Rng) -> (ClusterState, Identities) {
    let mut state = ClusterState::default();
    for n in 0..6 {
        let name = format!("ns{n}");
        let mut ns = Namespace::implicit(&name);
        ns.labels.insert("team".into(), format!("t{}", n % 3));
        state.namespaces.insert(name, ns);
    }
    let mut keys = Vec::new();
    for i in 0..rng.usize(5..80) {
        let mut labels = crate::model::Labels::new();
        // Skewed values, so that some labels are rare and the index path is taken.
        for key in ["app", "tier"] {
            if rng.u8(..4) > 0 {
                let v = if rng.u8(..8) == 0 { "rare" } else { "common" };
                labels.insert(key.into(), format!("{v}{}", rng.u8(..2)));
            }
        }
        keys.push(Arc::new(PodIdentityKey {
            namespace: format!("ns{}", i % 7),
            labels: Arc::new(labels),
            ports: Vec::new(),
        }));
    }
    let identities = Identities {
        pods: Arc::new(crate::model::identity::number_pods(keys)),
        cidrs: BTreeMap::new(),
    };
    (state, identities)
}

fn selector(rng: &mut fastrand::Rng, keys: &[&str], values: &[&str]) -> Selector {
    let ops = ["In", "NotIn", "Exists", "DoesNotExist"];
    let expressions: Vec<serde_json::Value> = (0..rng.usize(0..3))
        .map(|_| {
            let op = ops[rng.usize(..4)];
            let vals: Vec<&str> = match op {
                "In" | "NotIn" => (0..rng.usize(1..3))
                    .map(|_| values[rng.usize(..values.len())])
                    .collect(),
                _ => vec![],
            };
            serde_json::json!({"key": keys[rng.usize(..keys.len())], "operator": op, "values": vals})
        })
        .collect();
    let json = serde_json::json!({"matchExpressions": expressions});
    Selector::parse(&serde_json::from_value(json).unwrap(), "s").unwrap()
}

fn ids(found: Vec<(u32, Target<'_>)>) -> Vec<u32> {
    found.into_iter().map(|(id, _)| id).collect()
}

#[test]
fn the_label_index_resolves_peers_as_the_scan_does() {
    let mut rng = fastrand::Rng::with_seed(14);
    let mut through_index = 0;
    for _ in 0..400 {
        let (state, identities) = generated(&mut rng);
        let index = LabelIndex::new(&identities.pods);
        let peers = PeerIndex::new(&state, &identities, Some(&index));
        let namespaces = selector(&mut rng, &["team"], &["t0", "t1", "t2"]);
        let values = ["rare0", "rare1", "common0", "common1"];
        let pods = selector(&mut rng, &["app", "tier"], &values);
        let admitted: usize = (peers.namespaces.values())
            .filter(|n| namespaces.matches(&n.labels))
            .map(|n| n.pods.len())
            .sum();
        through_index += usize::from((index.candidates(&pods)).is_some_and(|c| c.len() < admitted));
        let scanned = ids(peers.scan_pods(&namespaces, &pods));
        assert_eq!(
            ids(peers.pods_matching(&namespaces, &pods)),
            scanned,
            "{namespaces:?} {pods:?}"
        );
        // Asked again, the memo answers the same.
        assert_eq!(ids(peers.pods_matching(&namespaces, &pods)), scanned);
    }
    assert!(
        through_index > 50,
        "the index path was taken {through_index} times"
    );
}
