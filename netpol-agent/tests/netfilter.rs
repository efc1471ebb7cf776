//! The kube-router check reads chain names from the kernel, both back ends and both families, in a
//! network namespace made by the test (root only), and finds exactly kube-router's chains there.

mod common;

use std::{fs::File, os::fd::AsRawFd as _, process::Command};

use netpol_agent::verify::{kube_router, netfilter};

/// Runs `cmd args` inside namespace `ns`, failing the test when it fails.
fn run_in(ns: &str, cmd: &str, args: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, cmd])
        .args(args)
        .output()
        .expect("run ip netns exec");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes the namespace when the test ends, also on failure.
struct Netns(String);
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn kube_router_chains_are_read_from_the_kernel_in_both_back_ends_and_families() {
    if !common::privileged("the netfilter test") {
        return;
    }
    let ns = format!("npnf{}", std::process::id() % 100_000);
    let _guard = Netns(ns.clone());
    let out = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap();
    assert!(out.success());
    run_in(&ns, "iptables-nft", &["-N", "KUBE-ROUTER-FORWARD"]);
    run_in(&ns, "iptables-nft", &["-N", "unrelated-nft"]);
    run_in(
        &ns,
        "ip6tables-nft",
        &["-t", "nat", "-N", "KUBE-NWPLCY-ABC"],
    );
    run_in(&ns, "iptables-legacy", &["-N", "KUBE-POD-FW-XYZ"]);
    run_in(
        &ns,
        "ip6tables-legacy",
        &["-t", "mangle", "-N", "KUBE-ROUTER-INPUT"],
    );
    run_in(
        &ns,
        "iptables-legacy",
        &["-t", "nat", "-N", "unrelated-legacy"],
    );

    let netns = File::open(format!("/var/run/netns/{ns}")).unwrap();
    let found = std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd; affects only this thread.
        let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns");
        let nft = netfilter::nft_chains().expect("nftables over netlink");
        (nft, netfilter::legacy_chains(), kube_router::scan())
    })
    .join()
    .unwrap();
    let (nft, legacy, scan) = found;
    for name in ["KUBE-ROUTER-FORWARD", "unrelated-nft", "KUBE-NWPLCY-ABC"] {
        assert!(nft.iter().any(|n| n == name), "{name} not in {nft:?}");
    }
    let mut legacy = legacy;
    legacy.sort();
    assert_eq!(
        legacy,
        ["KUBE-POD-FW-XYZ", "KUBE-ROUTER-INPUT", "unrelated-legacy"]
    );
    let chains: Vec<&str> = scan.chains.iter().map(String::as_str).collect();
    assert_eq!(
        chains,
        [
            "KUBE-NWPLCY-ABC",
            "KUBE-POD-FW-XYZ",
            "KUBE-ROUTER-FORWARD",
            "KUBE-ROUTER-INPUT"
        ]
    );
    assert_eq!(scan.read_with[0], "nftables (netlink)");
}
