//! Discovery against real veths in network namespaces made by the test (root only).

mod common;

use std::{fs::File, os::fd::AsRawFd as _, process::Command};

use netpol_agent::discovery::Discovery;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes the namespaces when the test ends, also on failure.
struct Netns(Vec<String>);
impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn finds_pod_veths_and_peer_addresses_only() {
    if !common::privileged("the discovery test") {
        return;
    }
    let tag = std::process::id() % 100_000;
    let node = format!("npdisc{tag}-node");
    let pod = format!("npdisc{tag}-pod");
    let other = format!("npdisc{tag}-oth");
    let _guard = Netns(vec![node.clone(), pod.clone(), other.clone()]);
    for ns in [&node, &pod, &other] {
        ip(&["netns", "add", ns]);
    }
    // A pod veth: peer in the pod namespace with IPv4 and IPv6 addresses.
    ip(&[
        "-n",
        &node,
        "link",
        "add",
        "veth0a1b2c3d",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &pod,
    ]);
    ip(&["-n", &pod, "addr", "add", "10.42.0.5/24", "dev", "eth0"]);
    ip(&[
        "-n",
        &pod,
        "addr",
        "add",
        "fd00:10:42::5/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    ip(&[
        "-n",
        &pod,
        "link",
        "set",
        "eth0",
        "address",
        "0a:58:0a:2a:00:05",
    ]);
    ip(&["-n", &pod, "link", "set", "eth0", "up"]);
    // Carrier on both ends, as CNI leaves it: the pod's link-local address is configured then.
    ip(&["-n", &node, "link", "set", "veth0a1b2c3d", "up"]);
    // A veth with both ends in the node namespace: not a pod veth.
    ip(&[
        "-n",
        &node,
        "link",
        "add",
        "vethlocal0",
        "type",
        "veth",
        "peer",
        "name",
        "vethlocal1",
    ]);
    // A pod veth whose peer has no address yet.
    ip(&[
        "-n",
        &node,
        "link",
        "add",
        "veth99999999",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &other,
    ]);
    ip(&["-n", &node, "link", "add", "cni0", "type", "bridge"]);
    ip(&["-n", &node, "addr", "add", "10.42.0.1/24", "dev", "cni0"]);

    // Both VXLAN devices are exits (pod traffic may leave by any device but a bridge's ports).
    ip(&[
        "-n",
        &node,
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "dstport",
        "8472",
    ]);
    ip(&[
        "-n", &node, "link", "add", "vxlan7", "type", "vxlan", "id", "7", "dstport", "4789",
    ]);

    let netns = File::open(format!("/var/run/netns/{node}")).expect("open node netns");
    let view = std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with a valid namespace fd.
        let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns");
        Discovery::new().expect("discovery").scan().expect("scan")
    })
    .join()
    .expect("discovery thread");

    let names: Vec<&str> = view.veths.iter().map(|v| v.name.as_str()).collect();
    assert!(names.contains(&"veth0a1b2c3d"), "{names:?}");
    assert!(names.contains(&"veth99999999"), "{names:?}");
    assert!(
        !names.iter().any(|n| n.starts_with("vethlocal")),
        "same-namespace veths are not pod veths: {names:?}"
    );
    let pod_veth = view
        .veths
        .iter()
        .find(|v| v.name == "veth0a1b2c3d")
        .expect("pod veth");
    let addrs: Vec<String> = pod_veth.peer_addrs.iter().map(|a| a.to_string()).collect();
    assert_eq!(
        addrs,
        vec!["10.42.0.5".to_owned(), "fd00:10:42::5".to_owned()]
    );
    // The pod's link identity, which the datapath holds its frames, ARP and ND to.
    assert_eq!(
        pod_veth.peer_link.mac,
        Some([0x0a, 0x58, 0x0a, 0x2a, 0x00, 0x05])
    );
    assert_eq!(
        pod_veth.peer_link.link_local,
        Some("fe80::858:aff:fe2a:5".parse().unwrap()),
        "the EUI-64 link-local address of the pod's MAC"
    );
    let links = view.endpoint_links();
    assert_eq!(
        links[&pod_veth.ifindex].mac,
        [0x0a, 0x58, 0x0a, 0x2a, 0x00, 0x05]
    );
    let empty = view
        .veths
        .iter()
        .find(|v| v.name == "veth99999999")
        .expect("empty veth");
    assert!(empty.peer_addrs.is_empty());
    assert!(
        view.host_addrs.iter().any(|a| a.to_string() == "10.42.0.1"),
        "{:?}",
        view.host_addrs
    );
    assert!(
        !view.host_addrs.iter().any(|a| a.to_string() == "10.42.0.5"),
        "pod address is not a host address"
    );
    let mut exits: Vec<&str> = view.tunnels.iter().map(|t| t.name.as_str()).collect();
    exits.sort();
    assert_eq!(
        exits,
        vec!["flannel.1", "vethlocal0", "vethlocal1", "vxlan7"],
        "exit devices: every link but the loopback, bridges, their ports and veths into other namespaces (listed as veths)"
    );
}
