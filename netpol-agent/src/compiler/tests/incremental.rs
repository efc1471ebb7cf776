//! The incremental compiler gives what the full one gives: over generated sequences of changes
//! (pods added, removed, relabelled, readdressed, given ports, finished or moved to the host
//! network, attached or not; addresses claimed twice; policies added, edited and removed; namespace
//! labels and modes changed), one [`Compiler`] kept across the sequence must, after every change, produce
//! exactly [`compile`]'s output for the same input. Seeded: a failure names its seed and step.

use fastrand::Rng;

use super::updates::{pick, policy_spec};
use super::*;

const NAMESPACES: [&str; 3] = ["a", "b", "c"];
const APPS: [&str; 3] = ["web", "db", "cache"];

/// One change of the cluster.
fn change(rng: &mut Rng, c: &mut Cluster) -> String {
    let ns = pick(rng, &NAMESPACES);
    let name = format!("p{}", rng.u8(0..8));
    let key = PodKey::new(ns, name.clone());
    match rng.u8(0..10) {
        0 | 1 => {
            // Addresses from a small pool, so that two pods sometimes claim one.
            let ip = format!("10.0.{}.{}", rng.u8(0..2), 10 + rng.u8(0..6));
            let labels = [("app", pick(rng, &APPS))];
            if rng.bool() {
                c.local(ns, &name, &labels, &[&ip]);
            } else {
                c.remote(ns, &name, &labels, &[&ip, "fd00::1"]);
            }
            format!("add {key} at {ip}")
        }
        2 => {
            c.state.pods.remove(&key);
            c.endpoints.remove(&key);
            format!("remove {key}")
        }
        3 => {
            let app = pick(rng, &APPS);
            if let Some(p) = c.state.pods.get_mut(&key).map(Arc::make_mut) {
                Arc::make_mut(&mut p.labels).insert("app".into(), app.into());
            }
            format!("relabel {key} app={app}")
        }
        4 => {
            let port = pick(rng, &[80, 8080]);
            if c.state.pods.contains_key(&key) {
                c.ports(ns, &name, &[("http", Protocol::Tcp, port)]);
            }
            format!("{key} http={port}")
        }
        5 => {
            if let Some(p) = c.state.pods.get_mut(&key).map(Arc::make_mut) {
                match rng.u8(0..5) {
                    0 => p.phase = Some("Succeeded".into()),
                    1 => p.host_network = !p.host_network,
                    2 => p.ips.clear(),
                    3 => p.ips.extend(p.ips.first().copied()),
                    _ => p.ips.reverse(),
                }
            }
            format!("{key} finished, host network, no address, an address twice or reordered")
        }
        6 => {
            // Attached, detached or moved to another veth; also for a pod the state lacks.
            match c.endpoints.get(&key) {
                Some(_) if rng.bool() => c.endpoints.insert(key.clone(), 100 + rng.u32(0..50)),
                Some(_) => c.endpoints.remove(&key),
                None => c.endpoints.insert(key.clone(), 100 + rng.u32(0..50)),
            };
            format!("endpoint of {key} attached, moved or detached")
        }
        7 => {
            let team = pick(rng, &["a", "b"]);
            c.namespace(ns, &[("team", team)]);
            let mode = pick(rng, &["audit", "enforce", "bogus"]);
            if rng.bool() {
                c.namespace_mode(ns, mode);
            }
            format!("namespace {ns} team={team}, maybe mode {mode}")
        }
        8 => {
            let name = format!("np{}", rng.u8(0..3));
            c.state.policies.remove(&PodKey::new(ns, name.clone()));
            format!("remove policy {ns}/{name}")
        }
        _ => {
            let name = format!("np{}", rng.u8(0..3));
            let spec = policy_spec(rng);
            c.policy(ns, &name, &spec);
            format!("policy {ns}/{name}: {spec}")
        }
    }
}

static NO_LINKS: BTreeMap<u32, EndpointLink> = BTreeMap::new();

fn input(c: &Cluster) -> CompileInput<'_> {
    CompileInput {
        state: &c.state,
        node_name: NODE,
        endpoints: &c.endpoints,
        host_addrs: &c.host_addrs,
        links: &NO_LINKS,
        pending: &c.pending,
        pending_rule: c.pending_rule,
        exits_guarded: c.exits_guarded,
        capacities: c.capacities,
        default_mode: c.default_mode,
    }
}

#[test]
fn incremental_equals_full_over_generated_changes() {
    for seed in 0..300 {
        let mut rng = Rng::with_seed(seed);
        let mut c = Cluster::new();
        let mut compiler = Compiler::default();
        let mut steps = Vec::new();
        for step in 0..25 {
            steps.push(change(&mut rng, &mut c));
            let incremental = compiler.compile(&input(&c));
            let full = compile(&input(&c));
            assert!(
                incremental == full,
                "seed {seed}, step {step}: incremental != full after:\n{}\n\
                 ipcache incremental {:?}\nipcache full {:?}",
                steps.join("\n"),
                incremental.ipcache,
                full.ipcache,
            );
        }
    }
}

/// The comparison can fail: a stage not told of a relabel gives other contents than the full
/// compilation.
#[test]
fn a_stale_stage_is_caught() {
    let mut c = Cluster::new();
    c.local("a", "web", &[("app", "web")], &["10.0.0.2"]);
    c.remote("a", "db", &[("app", "db")], &["10.0.1.2"]);
    let mut compiler = Compiler::default();
    compiler.compile(&input(&c));
    let db = PodKey::new("a", "db");
    Arc::make_mut(&mut Arc::make_mut(c.state.pods.get_mut(&db).unwrap()).labels)
        .insert("app".into(), "cache".into());
    let stale = compile_with(
        &input(&c),
        &mut |p| Arc::new(parse_policy(p)),
        PodIdentities {
            numbers: compiler.pods.numbers(),
            labels: Some(&LabelIndex::new(compiler.pods.numbers())),
        },
        compiler.pods.ipcache().clone(),
    );
    assert!(stale != compile(&input(&c)), "a relabel renumbers the pod");
    assert!(compiler.compile(&input(&c)) == compile(&input(&c)));
}

/// Two values of `app` whose identity keys (a pod of namespace `a`, no ports) have the same home
/// number: a birthday search over the numbering of single keys (a hostile namespace owner can do
/// the same to move another key's number).
fn colliding_apps() -> (String, String) {
    let key = |app: &str| crate::model::identity::PodIdentityKey {
        namespace: "a".into(),
        labels: Arc::new(labels(&[("app", app)])),
        ports: Default::default(),
    };
    let mut homes = std::collections::HashMap::new();
    for i in 0.. {
        let app = format!("x{i}");
        let k = key(&app);
        let home = crate::model::identity::number_pods([Arc::new(k.clone())])[&k];
        if let Some(other) = homes.insert(home, app.clone()) {
            return (other, app);
        }
    }
    unreachable!("the search ends")
}

/// When two identity keys collide, the one numbered second moves when the first goes (or comes):
/// the kept compiler renumbers and refreshes every address, as the full one computes it.
#[test]
fn a_hash_collision_renumbers_like_the_full_compile() {
    let (first, second) = colliding_apps();
    let mut c = Cluster::new();
    c.local("a", "web", &[("app", "web")], &["10.0.0.2"]);
    c.policy(
        "a",
        "np",
        &format!("podSelector: {{}}\ningress:\n- from: [{{podSelector: {{matchLabels: {{app: {second}}}}}}}]"),
    );
    let mut compiler = Compiler::default();
    let mut check = |c: &Cluster, step: &str| {
        assert!(compiler.compile(&input(c)) == compile(&input(c)), "{step}");
    };
    check(&c, "start");
    c.remote("a", "p2", &[("app", &second)], &["10.0.1.2"]);
    check(&c, "second alone");
    c.remote("a", "p1", &[("app", &first)], &["10.0.1.1"]);
    check(&c, "both: one of them probes past the other");
    let p2 = |c: &Compiled| c.ipcache[&ip_key(ip("10.0.1.2"))].identity;
    let with_both = p2(&compile(&input(&c)));
    c.state.pods.remove(&PodKey::new("a", "p1"));
    check(&c, "first gone");
    let alone = p2(&compile(&input(&c)));
    assert_eq!(
        with_both != alone,
        first < second,
        "the key numbered second moves home when the other goes"
    );
    c.remote("a", "p1", &[("app", &first)], &["10.0.1.1"]);
    c.state.pods.remove(&PodKey::new("a", "p2"));
    check(&c, "swapped");
}
