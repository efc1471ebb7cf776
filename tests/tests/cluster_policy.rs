//! ClusterNetworkPolicy conformance: every case of upstream's suite (network-policy-api's
//! `conformance/`, encoded in `tests/data/cnp-conformance`) replayed on the simulated cluster with
//! real agents, once over IPv4 and once over IPv6.
//!
//! For each subtest the policies are written to the manifest directory; the run waits until both
//! agents' maps agree with the compiler's answer (`explain` compared with the live maps) for every
//! check of the subtest, then probes each TCP and UDP check with real traffic from the client pod
//! and asserts upstream's expectation, and asserts `explain` gives it too. SCTP checks are judged
//! through the maps only (the compiler's answer, which the live maps were just shown to agree
//! with): this kernel has no SCTP sockets; `tests/tests/classifier.rs` sends SCTP packets through
//! the programs. Tests of the experimental `nodes` peer (and the host-network pods only they
//! probe) are left out: the agent refuses that peer (its rules fail closed, tested in the
//! compiler's tests).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use netpol_agent::datapath::PinLayout;
use netpol_agent::datapath::pinned_read::read_live;
use netpol_agent::model::{PodKey, Protocol};
use netpol_agent::observe::explain::{Party, Query, Verdict, explain};
use netpol_agent::sources::manifests::ManifestSource;
use netpol_tests::cluster::{Cluster, Family, Proto, default_agent_bin};
use netpol_tests::cnp_cases::{self, Check, Subtest, Suite, TOPOLOGY};

const PROBE_BIN: &str = env!("CARGO_BIN_EXE_netpol-probe");

/// Generous: the agents pick up the files, compile and program both buffers on a loaded machine.
const CONVERGE: Duration = Duration::from_secs(30);

/// Tags of tests this runner leaves out, with why.
const LEFT_OUT: &[(&str, &str)] = &[
    (
        "nodes-peer",
        "experimental `nodes` peer: refused by the agent",
    ),
    (
        "host-network-pods",
        "probes host-network pods, only for `nodes` peers",
    ),
];

#[test]
fn conformance_ipv4() {
    run(Family::V4);
}

#[test]
fn conformance_ipv6() {
    run(Family::V6);
}

fn run(family: Family) {
    let test = format!("conformance_{family:?}");
    if !netpol_tests::privileged_or_skip(&test, "needs root (network namespaces, bpffs)") {
        return;
    }
    let suites = cnp_cases::load_all(&cnp_cases::data_dir()).expect("loading the cases");
    let mut c = conformance_cluster().unwrap_or_else(|e| panic!("cluster setup: {e:#}"));
    c.start_agents(&default_agent_bin())
        .unwrap_or_else(|e| panic!("starting agents: {e:#}"));
    let mut run = Runner {
        c,
        family,
        labels: BTreeMap::new(),
    };
    let (mut failures, mut subtests, mut checks) = (Vec::new(), 0, 0);
    for suite in &suites {
        if let Some(why) = left_out(suite) {
            eprintln!("left out {}: {why}", suite.test);
            continue;
        }
        for sub in &suite.subtests {
            subtests += 1;
            checks += sub.expect.len();
            if let Err(e) = run.subtest(sub) {
                failures.push(format!("{} / {}: {e:#}", suite.test, sub.name));
            }
        }
    }
    eprintln!(
        "{family:?}: {subtests} subtests, {checks} checks, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {subtests} subtests failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    // The data was read: upstream has 92 subtests, 83 of them outside the node-peer tests.
    assert!(subtests >= 80, "only {subtests} subtests ran");
}

/// Why `suite` is left out, if it is.
fn left_out(suite: &Suite) -> Option<String> {
    if suite.experimental {
        return Some(format!("experimental ({})", suite.needs.join(", ")));
    }
    LEFT_OUT
        .iter()
        .find(|(tag, _)| suite.needs.iter().any(|n| n == tag))
        .map(|(_, why)| why.to_string())
}

/// The default cluster plus upstream's houses: two pods each, one per node, serving TCP and UDP on
/// 80, 8080, 53 and 5353 with TCP 80 named `web` and UDP 53 `dns`.
fn conformance_cluster() -> Result<Cluster> {
    let mut c = Cluster::new(PROBE_BIN)?;
    c.probe_timeout = Duration::from_millis(700);
    c.port_names.insert((80, "TCP".into()), "web".into());
    c.port_names.insert((53, "UDP".into()), "dns".into());
    for house in TOPOLOGY.iter().filter(|h| !h.host_network) {
        let ns = cnp_cases::namespace(house.house);
        c.add_namespace(&ns, house.namespace_labels)?;
        for (node, pod) in house.pods.iter().enumerate() {
            c.add_pod_with(&ns, pod, node, house.pod_labels, &[80, 8080, 53, 5353])?;
        }
    }
    Ok(c)
}

struct Runner {
    c: Cluster,
    family: Family,
    /// Namespace labels a check changed from the topology's, by house.
    labels: BTreeMap<String, BTreeMap<String, String>>,
}

impl Runner {
    fn subtest(&mut self, sub: &Subtest) -> Result<()> {
        let c = &self.c;
        let family = self.family;
        let objects = cnp_cases::substitute(&sub.objects, family == Family::V6, |pod| {
            let (house, name) = cnp_cases::split_pod(pod).ok()?;
            let id = format!("{}/{name}", cnp_cases::namespace(house));
            c.pods.iter().find(|p| p.id() == id).map(|p| p.ip(family))
        })?;
        self.c.apply_policies(&objects)?;
        let mut rest = sub.expect.as_slice();
        while let Some(first) = rest.first() {
            let n = rest
                .iter()
                .take_while(|k| k.namespace_labels == first.namespace_labels)
                .count();
            let (group, later) = rest.split_at(n);
            self.set_labels(&first.namespace_labels)?;
            self.converge(group)?;
            self.verify(group)?;
            rest = later;
        }
        self.set_labels(&BTreeMap::new())
    }

    /// Gives the houses in `wanted` those labels and the others the topology's.
    fn set_labels(&mut self, wanted: &BTreeMap<String, BTreeMap<String, String>>) -> Result<()> {
        for house in TOPOLOGY.iter().filter(|h| !h.host_network) {
            let topology: BTreeMap<String, String> = house
                .namespace_labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let want = wanted.get(house.house).unwrap_or(&topology);
            let now = self.labels.get(house.house).unwrap_or(&topology);
            if want == now {
                continue;
            }
            let pairs: Vec<(&str, &str)> = want.iter().map(|(k, v)| (&**k, &**v)).collect();
            self.c
                .set_namespace_labels(&cnp_cases::namespace(house.house), &pairs)?;
            self.labels.insert(house.house.to_owned(), want.clone());
        }
        Ok(())
    }

    fn query(&self, check: &Check) -> Result<Query> {
        let (from_house, from) = check.client()?;
        let (to_house, to) = check.server()?;
        let server = format!("{}/{to}", cnp_cases::namespace(to_house));
        let protocol = Protocol::parse(&check.protocol)
            .ok_or_else(|| anyhow!("protocol {:?}", check.protocol))?;
        Ok(Query {
            from: Party::Pod(PodKey::new(cnp_cases::namespace(from_house), from)),
            // The server's address picks the family (and still names the pod).
            to: Party::Address(self.c.pod(&server).ip(self.family)),
            protocol,
            port: check.port,
            default_mode: Default::default(),
        })
    }

    /// Waits until both agents' maps agree with the compiler on every check of `group`.
    fn converge(&mut self, group: &[Check]) -> Result<()> {
        let deadline = Instant::now() + CONVERGE;
        loop {
            self.c.check_agents()?;
            // Until an agent answers (start-up), that is a disagreement too.
            let disagreements = self
                .disagreements(group)
                .unwrap_or_else(|e| vec![format!("{e:#}")]);
            if disagreements.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the maps did not come to agree with the compiler in {CONVERGE:?}:\n{}",
                    disagreements.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn disagreements(&self, group: &[Check]) -> Result<Vec<String>> {
        let state = ManifestSource::new().load(&self.c.manifest_dir)?;
        let bin = default_agent_bin();
        let mut live = Vec::new();
        for (i, node) in self.c.nodes.iter().enumerate() {
            let status = self.c.agent_status(i, &bin)?;
            let (generation, maps) = read_live(&PinLayout::new(&node.pin_dir).maps_dir())?;
            let local: BTreeMap<String, u32> = status
                .endpoints
                .iter()
                .map(|ep| (ep.pod.clone(), ep.ifindex))
                .collect();
            live.push((status.node, generation, maps, local));
        }
        let mut out = Vec::new();
        for check in group {
            let mut e = explain(&state, &self.query(check)?)?;
            for (node, generation, maps, local) in &live {
                e.compare_live(node, *generation, maps, local);
                out.extend(e.live.take().into_iter().flat_map(|l| l.disagreements));
            }
        }
        Ok(out)
    }

    /// The probes (TCP, UDP) and the compiler's verdict (every protocol) give each check's
    /// expectation.
    fn verify(&self, group: &[Check]) -> Result<()> {
        let state = ManifestSource::new().load(&self.c.manifest_dir)?;
        let mut wrong = Vec::new();
        for check in group {
            let verdict = explain(&state, &self.query(check)?)?.verdict;
            if (verdict == Verdict::Allowed) != check.connected {
                wrong.push(format!("{}: explain says {verdict:?}", describe(check)));
            }
        }
        wrong.extend(self.probe_until_expected(group)?);
        if wrong.is_empty() {
            Ok(())
        } else {
            bail!("{}", wrong.join("\n"))
        }
    }

    /// Probes the TCP and UDP checks (each client's at once) until all give their expectation, or
    /// a few seconds pass: the maps already agree, so this only absorbs a slow probe server.
    fn probe_until_expected(&self, group: &[Check]) -> Result<Vec<String>> {
        let probed: Vec<&Check> = group.iter().filter(|k| k.protocol != "SCTP").collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let results = self.probe(&probed)?;
            let wrong: Vec<String> = probed
                .iter()
                .zip(results)
                .filter(|(k, got)| k.connected != *got)
                .map(|(k, got)| format!("{}: probe connected={got}", describe(k)))
                .collect();
            if wrong.is_empty() || Instant::now() > deadline {
                return Ok(wrong);
            }
        }
    }

    fn probe(&self, checks: &[&Check]) -> Result<Vec<bool>> {
        let mut by_client: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, k) in checks.iter().enumerate() {
            let (house, pod) = k.client()?;
            by_client
                .entry(format!("{}/{pod}", cnp_cases::namespace(house)))
                .or_default()
                .push(i);
        }
        let mut results = vec![false; checks.len()];
        let runs: Vec<(Vec<usize>, Result<Vec<bool>>)> = std::thread::scope(|s| {
            let handles: Vec<_> = by_client
                .into_iter()
                .map(|(client, idx)| {
                    let targets: Result<Vec<String>> =
                        idx.iter().map(|&i| self.target(checks[i])).collect();
                    s.spawn(move || {
                        let netns = &self.c.pod(&client).netns;
                        let out = targets
                            .and_then(|t| self.c.probe_from(netns, &t))
                            .map(|reports| reports.into_iter().map(|r| r.ok).collect());
                        (idx, out)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (idx, out) in runs {
            for (i, ok) in idx.into_iter().zip(out?) {
                results[i] = ok;
            }
        }
        Ok(results)
    }

    /// The probe's target of a check: `tcp/ADDR/PORT` or `udp/ADDR/PORT`.
    fn target(&self, k: &Check) -> Result<String> {
        let (house, pod) = k.server()?;
        let server = format!("{}/{pod}", cnp_cases::namespace(house));
        let proto = match k.protocol.as_str() {
            "TCP" => Proto::Tcp,
            "UDP" => Proto::Udp,
            other => bail!("cannot probe {other}"),
        };
        let addr = self.c.pod(&server).ip(self.family);
        Ok(format!("{}/{addr}/{}", proto.as_str(), k.port))
    }
}

fn describe(k: &Check) -> String {
    let want = if k.connected { "connect" } else { "be denied" };
    format!(
        "{} -> {} {}/{} should {want}",
        k.from, k.to, k.protocol, k.port
    )
}
