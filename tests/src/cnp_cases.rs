//! The upstream ClusterNetworkPolicy conformance suite (kubernetes-sigs/network-policy-api,
//! `policy.networking.k8s.io/v1alpha2`) as data: `tests/data/cnp-conformance/*.yaml`, one file per
//! upstream Go test file, one YAML document per upstream `ConformanceTest` ([`Suite`]).
//!
//! A runner builds the [`TOPOLOGY`], then for every [`Suite`] and every [`Subtest`] in order replaces
//! all policy objects with [`Subtest::objects`] (after [`substitute`]) and probes every [`Check`] in
//! order. See `tests/data/cnp-conformance/README.md` for the format and the semantics.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;

/// The namespace of a house is this prefix followed by the house (`network-policy-conformance-gryffindor`).
pub const NAMESPACE_PREFIX: &str = "network-policy-conformance-";

/// The namespace upstream uses for a house (the namespace's `conformance-house` label).
pub fn namespace(house: &str) -> String {
    format!("{NAMESPACE_PREFIX}{house}")
}

/// `tests/data/cnp-conformance` of this crate.
pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/cnp-conformance")
}

/// One upstream `ConformanceTest`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    /// The Go `ConformanceTest.ShortName`.
    pub test: String,
    /// The upstream manifest the test applies (`base/...yaml`), for reference.
    #[serde(default)]
    pub manifest: String,
    /// The policies use experimental-only API fields (`nodes` peers).
    pub experimental: bool,
    /// Free-text capability tags (`sctp`, `named-ports`, `nodes-peer`, ...), see the README.
    pub needs: Vec<String>,
    /// The `t.Run` subtests, in upstream order.
    pub subtests: Vec<Subtest>,
    /// The data file this suite was read from (file name only); set by [`load_all`].
    #[serde(skip)]
    pub file: String,
}

/// One upstream `t.Run`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subtest {
    /// The `t.Run` name, verbatim.
    pub name: String,
    /// Every policy object (YAML documents separated by `---`) in force while the checks run, with
    /// placeholders to run through [`substitute`].
    pub objects: String,
    /// Every connectivity check of the subtest, in upstream order.
    pub expect: Vec<Check>,
}

/// One upstream `PokeServer`: `from` connects to `to`'s address at `protocol`/`port`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    /// Client pod, `<house>/<pod>`.
    pub from: String,
    /// Server pod, `<house>/<pod>`; the client connects to its address in the family under test.
    pub to: String,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    pub port: u16,
    /// True: the connection must succeed (for UDP: the reply must arrive). False: it must time
    /// out (upstream counts a refusal, e.g. TCP RST or ICMP unreachable, as a failure).
    pub connected: bool,
    /// Namespaces whose labels differ from the [`TOPOLOGY`] while this check runs: house -> the
    /// complete label set of that namespace. Namespaces not listed carry their base labels.
    #[serde(default)]
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
}

impl Check {
    /// `(house, pod)` of the client.
    pub fn client(&self) -> Result<(&str, &str)> {
        split_pod(&self.from)
    }

    /// `(house, pod)` of the server.
    pub fn server(&self) -> Result<(&str, &str)> {
        split_pod(&self.to)
    }
}

/// Splits `<house>/<pod>`.
pub fn split_pod(pod_ref: &str) -> Result<(&str, &str)> {
    match pod_ref.split_once('/') {
        Some((house, pod)) if !house.is_empty() && !pod.is_empty() && !pod.contains('/') => {
            Ok((house, pod))
        }
        _ => bail!("bad pod reference {pod_ref:?}: want <house>/<pod>"),
    }
}

/// Reads every `*.yaml` of `dir`, sorted by file name; each YAML document is one [`Suite`].
pub fn load_all(dir: &Path) -> Result<Vec<Suite>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        if path.extension().is_some_and(|e| e == "yaml") {
            files.push(path);
        }
    }
    files.sort();
    let mut suites = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let before = suites.len();
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let mut suite = Suite::deserialize(doc)
                .with_context(|| format!("{}: document {}", path.display(), i + 1))?;
            suite.file.clone_from(&file);
            suites.push(suite);
        }
        if suites.len() == before {
            bail!("{}: no test in the file", path.display());
        }
    }
    Ok(suites)
}

/// Replaces the placeholders in `objects` for the IP family under test:
///
/// - `${ip:<house>/<pod>}`: the pod's address (from `ip_of`, which gets `<house>/<pod>`);
/// - `${maxlen}`: `32` or `128`;
/// - `${net:<house>/<pod>/<len4>/<len6>}`: the pod's address masked to `len4` (IPv4) or `len6`
///   (IPv6), as a CIDR;
/// - `${all}`: `0.0.0.0/0` or `::/0`.
///
/// An unknown placeholder, a pod missing from [`TOPOLOGY`] or unknown to `ip_of`, or an address of
/// the other family is an error naming it.
pub fn substitute(
    objects: &str,
    family_is_v6: bool,
    ip_of: impl Fn(&str) -> Option<IpAddr>,
) -> Result<String> {
    let mut out = String::with_capacity(objects.len());
    let mut rest = objects;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| anyhow!("unterminated placeholder at {:?}", &rest[start..]))?;
        let placeholder = &after[..end];
        out.push_str(&expand(placeholder, family_is_v6, &ip_of)?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn expand(placeholder: &str, v6: bool, ip_of: &impl Fn(&str) -> Option<IpAddr>) -> Result<String> {
    let address = |pod_ref: &str| -> Result<IpAddr> {
        let (house, pod) =
            split_pod(pod_ref).with_context(|| format!("placeholder ${{{placeholder}}}"))?;
        if find_pod(house, pod).is_none() {
            bail!("placeholder ${{{placeholder}}}: pod {pod_ref} is not in the topology");
        }
        let ip = ip_of(pod_ref).ok_or_else(|| {
            anyhow!("placeholder ${{{placeholder}}}: no address for pod {pod_ref}")
        })?;
        if ip.is_ipv6() != v6 {
            bail!(
                "placeholder ${{{placeholder}}}: pod {pod_ref} has {ip}, not an IPv{} address",
                if v6 { 6 } else { 4 }
            );
        }
        Ok(ip)
    };
    if placeholder == "maxlen" {
        return Ok(if v6 { "128" } else { "32" }.to_owned());
    }
    if placeholder == "all" {
        return Ok(if v6 { "::/0" } else { "0.0.0.0/0" }.to_owned());
    }
    if let Some(pod_ref) = placeholder.strip_prefix("ip:") {
        return Ok(address(pod_ref)?.to_string());
    }
    if let Some(spec) = placeholder.strip_prefix("net:") {
        // <house>/<pod>/<len4>/<len6>
        let parts: Vec<&str> = spec.split('/').collect();
        let [house, pod, len4, len6] = parts[..] else {
            bail!("placeholder ${{{placeholder}}}: want ${{net:<house>/<pod>/<len4>/<len6>}}");
        };
        let len: u8 = if v6 { len6 } else { len4 }.parse().map_err(|_| {
            anyhow!("placeholder ${{{placeholder}}}: prefix length is not a number")
        })?;
        let ip = address(&format!("{house}/{pod}"))?;
        return mask(ip, len)
            .map(|net| format!("{net}/{len}"))
            .with_context(|| format!("placeholder ${{{placeholder}}}"));
    }
    bail!("unknown placeholder ${{{placeholder}}}")
}

fn mask(ip: IpAddr, len: u8) -> Result<IpAddr> {
    Ok(match ip {
        IpAddr::V4(a) => {
            if len > 32 {
                bail!("prefix length {len} > 32");
            }
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            if len > 128 {
                bail!("prefix length {len} > 128");
            }
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    })
}

/// A port a pod listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServedPort {
    pub protocol: &'static str,
    pub port: u16,
    /// The `containerPort` name, for named-port rules.
    pub name: Option<&'static str>,
}

/// One namespace of the upstream base manifests (`conformance/base/manifests.yaml`) and the two pods
/// of its StatefulSet.
#[derive(Debug, Clone, Copy)]
pub struct House {
    /// The `conformance-house` label; the namespace is [`namespace`] of it.
    pub house: &'static str,
    /// Base labels of the namespace (the API server adds `kubernetes.io/metadata.name`).
    pub namespace_labels: &'static [(&'static str, &'static str)],
    pub statefulset: &'static str,
    pub pods: [&'static str; 2],
    /// Labels of both pods.
    pub pod_labels: &'static [(&'static str, &'static str)],
    /// `hostNetwork: true`: the pod's address is its node's address; the two replicas run on
    /// different nodes (their host ports collide).
    pub host_network: bool,
    pub ports: &'static [ServedPort],
}

const fn port(protocol: &'static str, port: u16, name: Option<&'static str>) -> ServedPort {
    ServedPort {
        protocol,
        port,
        name,
    }
}

/// Ports of every regular pod: agnhost servers, named `web` (TCP 80) and `dns` (UDP 53).
pub const POD_PORTS: &[ServedPort] = &[
    port("TCP", 80, Some("web")),
    port("TCP", 8080, None),
    port("UDP", 5353, None),
    port("UDP", 53, Some("dns")),
    port("SCTP", 9003, None),
    port("SCTP", 9005, None),
];

/// Upstream's default `HostNetworkPorts` (`--host-network-port-range-start` 34345, 8 ports).
pub const HOST_NETWORK_PORTS: [u16; 8] = [34345, 34346, 34347, 34348, 34349, 34350, 34351, 34352];

/// Ports of the host-networked centaur pods (upstream template rendered with [`HOST_NETWORK_PORTS`]).
/// The UDP servers listen on the node address only; 34348 and 34350 are the HTTP ports of those
/// UDP servers (agnhost netexec), unnamed.
pub const CENTAUR_PORTS: &[ServedPort] = &[
    port("TCP", 34345, Some("web-34345")),
    port("TCP", 34346, Some("web-34346")),
    port("UDP", 34347, Some("dns-34347")),
    port("TCP", 34348, None),
    port("UDP", 34349, Some("dns-34349")),
    port("TCP", 34350, None),
    port("SCTP", 34351, None),
    port("SCTP", 34352, None),
];

/// The upstream topology. Nodes carry `kubernetes.io/os: linux` (selected by `nodes` peers).
pub const TOPOLOGY: &[House] = &[
    House {
        house: "gryffindor",
        namespace_labels: &[
            ("conformance-house", "gryffindor"),
            (
                "kubernetes.io/metadata.name",
                "network-policy-conformance-gryffindor",
            ),
        ],
        statefulset: "harry-potter",
        pods: ["harry-potter-0", "harry-potter-1"],
        pod_labels: &[("conformance-house", "gryffindor")],
        host_network: false,
        ports: POD_PORTS,
    },
    House {
        house: "slytherin",
        namespace_labels: &[
            ("conformance-house", "slytherin"),
            (
                "kubernetes.io/metadata.name",
                "network-policy-conformance-slytherin",
            ),
        ],
        statefulset: "draco-malfoy",
        pods: ["draco-malfoy-0", "draco-malfoy-1"],
        pod_labels: &[("conformance-house", "slytherin")],
        host_network: false,
        ports: POD_PORTS,
    },
    House {
        house: "hufflepuff",
        namespace_labels: &[
            ("conformance-house", "hufflepuff"),
            (
                "kubernetes.io/metadata.name",
                "network-policy-conformance-hufflepuff",
            ),
        ],
        statefulset: "cedric-diggory",
        pods: ["cedric-diggory-0", "cedric-diggory-1"],
        pod_labels: &[("conformance-house", "hufflepuff")],
        host_network: false,
        ports: POD_PORTS,
    },
    House {
        house: "ravenclaw",
        namespace_labels: &[
            ("conformance-house", "ravenclaw"),
            (
                "kubernetes.io/metadata.name",
                "network-policy-conformance-ravenclaw",
            ),
        ],
        statefulset: "luna-lovegood",
        pods: ["luna-lovegood-0", "luna-lovegood-1"],
        pod_labels: &[("conformance-house", "ravenclaw")],
        host_network: false,
        ports: POD_PORTS,
    },
    House {
        house: "forbidden-forrest",
        namespace_labels: &[
            ("conformance-house", "forbidden-forrest"),
            (
                "kubernetes.io/metadata.name",
                "network-policy-conformance-forbidden-forrest",
            ),
        ],
        statefulset: "centaur",
        pods: ["centaur-0", "centaur-1"],
        pod_labels: &[("conformance-house", "forbidden-forrest")],
        host_network: true,
        ports: CENTAUR_PORTS,
    },
];

/// The house of `pod` if the topology has it.
pub fn find_pod(house: &str, pod: &str) -> Option<&'static House> {
    TOPOLOGY
        .iter()
        .find(|h| h.house == house && h.pods.contains(&pod))
}

/// True when `house/pod` listens on `protocol`/`port`.
pub fn serves(house: &str, pod: &str, protocol: &str, port: u16) -> bool {
    find_pod(house, pod).is_some_and(|h| {
        h.ports
            .iter()
            .any(|p| p.protocol == protocol && p.port == port)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn suites() -> Vec<Suite> {
        load_all(&data_dir()).unwrap()
    }

    /// A fake address per pod: 10.244.<house>.<replica+10>, fd00::<house>:<replica+10>; the
    /// host-networked pods get 172.18.0.x / fc00::x (node addresses).
    fn fake_ip(pod_ref: &str, v6: bool) -> Option<IpAddr> {
        let (house, pod) = split_pod(pod_ref).ok()?;
        let h = TOPOLOGY.iter().position(|h| h.house == house)?;
        let r = TOPOLOGY[h].pods.iter().position(|p| *p == pod)?;
        let (h, r) = (h as u8, r as u8);
        Some(match (v6, TOPOLOGY[h as usize].host_network) {
            (false, false) => Ipv4Addr::new(10, 244, h, 10 + r).into(),
            (false, true) => Ipv4Addr::new(172, 18, 0, 2 + r).into(),
            (true, false) => {
                Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, u16::from(h), u16::from(10 + r)).into()
            }
            (true, true) => Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, u16::from(2 + r)).into(),
        })
    }

    #[test]
    fn all_files_load_with_the_upstream_counts() {
        let suites = suites();
        let files: BTreeSet<&str> = suites.iter().map(|s| s.file.as_str()).collect();
        // 22 Go test files (plus main.go) define 24 ConformanceTests with 92 t.Run subtests.
        assert_eq!(files.len(), 22, "{files:?}");
        assert_eq!(suites.len(), 24);
        assert_eq!(suites.iter().map(|s| s.subtests.len()).sum::<usize>(), 92);
        let checks: usize = suites
            .iter()
            .flat_map(|s| &s.subtests)
            .map(|t| t.expect.len())
            .sum();
        assert_eq!(checks, 301);
        let names: BTreeSet<&str> = suites.iter().map(|s| s.test.as_str()).collect();
        assert_eq!(names.len(), suites.len(), "test names are unique");
        for s in &suites {
            assert!(s.test.starts_with("CNP"), "{}: {}", s.file, s.test);
            assert!(!s.subtests.is_empty(), "{}: {}", s.file, s.test);
            assert!(
                !s.experimental || !s.needs.is_empty(),
                "{}: {}",
                s.file,
                s.test
            );
            for t in &s.subtests {
                assert!(!t.expect.is_empty(), "{}: {}: {}", s.file, s.test, t.name);
            }
        }
    }

    #[test]
    fn every_objects_parses_as_kubernetes_objects_in_both_families() {
        for s in suites() {
            for t in &s.subtests {
                for v6 in [false, true] {
                    let text = substitute(&t.objects, v6, |p| fake_ip(p, v6))
                        .unwrap_or_else(|e| panic!("{}: {}: {e:#}", s.test, t.name));
                    assert!(!text.contains("${"), "{}: {}", s.test, t.name);
                    let mut count = 0;
                    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
                        let v = serde_yaml_ng::Value::deserialize(doc)
                            .unwrap_or_else(|e| panic!("{}: {}: {e}", s.test, t.name));
                        let field = |k: &str| v.get(k).and_then(|x| x.as_str());
                        let name = v
                            .get("metadata")
                            .and_then(|m| m.get("name"))
                            .and_then(|x| x.as_str());
                        assert!(
                            field("apiVersion").is_some() && field("kind").is_some(),
                            "{}: {}: {v:?}",
                            s.test,
                            t.name
                        );
                        assert!(
                            name.is_some_and(|n| !n.is_empty()),
                            "{}: {}",
                            s.test,
                            t.name
                        );
                        count += 1;
                    }
                    assert!(count > 0, "{}: {}: no objects", s.test, t.name);
                }
            }
        }
    }

    #[test]
    fn every_check_names_a_topology_pod_and_a_port_it_serves() {
        for s in suites() {
            for t in &s.subtests {
                for c in &t.expect {
                    let ctx = format!("{}: {}: {c:?}", s.test, t.name);
                    let (ch, cp) = c.client().unwrap();
                    let (sh, sp) = c.server().unwrap();
                    assert!(find_pod(ch, cp).is_some(), "unknown client: {ctx}");
                    assert!(find_pod(sh, sp).is_some(), "unknown server: {ctx}");
                    assert!(
                        ["TCP", "UDP", "SCTP"].contains(&c.protocol.as_str()),
                        "protocol: {ctx}"
                    );
                    assert!(
                        serves(sh, sp, &c.protocol, c.port),
                        "port not served: {ctx}"
                    );
                    for (house, labels) in &c.namespace_labels {
                        assert!(TOPOLOGY.iter().any(|h| h.house == house), "{ctx}");
                        assert_eq!(
                            labels.get("kubernetes.io/metadata.name"),
                            Some(&namespace(house)),
                            "{ctx}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn substitution_for_both_families() {
        let text = "- \"${ip:ravenclaw/luna-lovegood-0}/${maxlen}\"\n\
                    - ${net:hufflepuff/cedric-diggory-1/24/64}\n- ${all}\nplain $ text\n";
        let v4 = substitute(text, false, |p| fake_ip(p, false)).unwrap();
        assert_eq!(
            v4,
            "- \"10.244.3.10/32\"\n- 10.244.2.0/24\n- 0.0.0.0/0\nplain $ text\n"
        );
        let v6 = substitute(text, true, |p| fake_ip(p, true)).unwrap();
        assert_eq!(
            v6,
            "- \"fd00::3:a/128\"\n- fd00::/64\n- ::/0\nplain $ text\n"
        );
        let net = substitute("${net:gryffindor/harry-potter-1/32/128}", false, |p| {
            fake_ip(p, false)
        })
        .unwrap();
        assert_eq!(net, "10.244.0.11/32");
        let net = substitute("${net:gryffindor/harry-potter-1/0/0}", true, |p| {
            fake_ip(p, true)
        })
        .unwrap();
        assert_eq!(net, "::/0");
        assert_eq!(
            substitute("no placeholders", true, |_| None).unwrap(),
            "no placeholders"
        );
    }

    #[test]
    fn substitution_rejects_what_it_does_not_know() {
        let err = |text: &str, v6: bool| {
            format!(
                "{:#}",
                substitute(text, v6, |p| fake_ip(p, v6)).unwrap_err()
            )
        };
        assert!(err("a ${bogus} b", false).contains("bogus"));
        assert!(err("${ip:gryffindor/nobody-0}", false).contains("gryffindor/nobody-0"));
        assert!(err("${ip:mordor/frodo-0}", true).contains("mordor/frodo-0"));
        assert!(err("${ip:no-slash}", false).contains("no-slash"));
        assert!(err("${net:gryffindor/harry-potter-0/33/64}", false).contains("33"));
        assert!(err("${net:gryffindor/harry-potter-0/24}", false).contains("net:"));
        assert!(err("unterminated ${ip:gryffindor/harry-potter-0", false).contains("unterminated"));
        // ip_of does not know the pod, or gives the other family
        let e = substitute("${ip:slytherin/draco-malfoy-1}", false, |_| None).unwrap_err();
        assert!(format!("{e:#}").contains("slytherin/draco-malfoy-1"));
        let e = substitute("${ip:slytherin/draco-malfoy-1}", true, |p| {
            fake_ip(p, false)
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("IPv6"));
    }

    #[test]
    fn load_all_names_the_broken_file() {
        let dir = std::env::temp_dir().join(format!("cnp-cases-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("good.yaml"),
            "test: T\nexperimental: false\nneeds: []\nsubtests: []\n",
        )
        .unwrap();
        std::fs::write(dir.join("zz-broken.yaml"), "test: T\nexperimental: maybe\n").unwrap();
        let e = format!("{:#}", load_all(&dir).unwrap_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(e.contains("zz-broken.yaml"), "{e}");
    }
}
