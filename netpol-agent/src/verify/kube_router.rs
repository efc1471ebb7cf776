//! Start-up check for kube-router's NetworkPolicy rules, which K3s installs unless every server runs
//! with `--disable-network-policy`, and which stay behind after it is disabled.
//!
//! With both engines on a node a connection must pass both, so it is allowed only where both allow
//! it; after a switch, kube-router's leftover chains keep enforcing the policies of the day they were
//! left. The agent warns once, at start-up, when it finds them.
//!
//! The check reads the chain names from the kernel ([`super::netfilter`]: nftables over netlink,
//! which holds iptables-nft's chains, and legacy iptables through getsockopt), so it works in the
//! agent's image, which has no iptables; where netlink is refused it falls back to
//! `iptables-save`/`ip6tables-save` output.

use std::{collections::BTreeSet, process::Command};

/// Chain name prefixes of kube-router's network policy controller.
pub const CHAIN_PREFIXES: [&str; 3] = ["KUBE-ROUTER-", "KUBE-NWPLCY-", "KUBE-POD-FW-"];

/// Save commands tried, in order; the back-end specific ones first, so both back ends are read
/// where both exist.
const SAVE_COMMANDS: [&[&str]; 6] = [
    &["iptables-legacy-save"],
    &["iptables-nft-save"],
    &["ip6tables-legacy-save"],
    &["ip6tables-nft-save"],
    &["iptables-save"],
    &["ip6tables-save"],
];

/// kube-router chain names in iptables-save output.
pub fn parse(save_output: &str) -> BTreeSet<String> {
    save_output
        .lines()
        .flat_map(|l| {
            l.split(|c: char| c.is_whitespace() || c == ':')
                .filter(|w| CHAIN_PREFIXES.iter().any(|p| w.starts_with(p)))
        })
        .map(str::to_owned)
        .collect()
}

/// What the check found in this network namespace.
#[derive(Debug, Default)]
pub struct Findings {
    /// kube-router chains, by name.
    pub chains: BTreeSet<String>,
    /// Which commands could be run.
    pub read_with: Vec<String>,
}

/// Reads the node's chains from the kernel (or, where it refuses, with the save commands) and
/// collects kube-router's.
pub fn scan() -> Findings {
    let ours = |names: Vec<String>| {
        names
            .into_iter()
            .filter(|n| CHAIN_PREFIXES.iter().any(|p| n.starts_with(p)))
            .collect::<Vec<_>>()
    };
    match super::netfilter::nft_chains() {
        Ok(nft) => {
            let mut chains: BTreeSet<String> = ours(nft).into_iter().collect();
            chains.extend(ours(super::netfilter::legacy_chains()));
            Findings {
                chains,
                read_with: vec![
                    "nftables (netlink)".into(),
                    "iptables legacy (getsockopt)".into(),
                ],
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "nftables netlink refused; reading iptables-save");
            scan_save_commands()
        }
    }
}

/// Runs the save commands that exist and collects kube-router's chains.
fn scan_save_commands() -> Findings {
    let mut findings = Findings::default();
    for cmd in SAVE_COMMANDS {
        // iptables-save exists where the back-end specific ones do not (older distributions).
        let generic = cmd[0] == "iptables-save" || cmd[0] == "ip6tables-save";
        if generic && !findings.read_with.is_empty() {
            continue;
        }
        let Ok(out) = Command::new(cmd[0]).args(&cmd[1..]).output() else {
            continue;
        };
        if !out.status.success() {
            continue;
        }
        findings.read_with.push(cmd[0].to_owned());
        findings
            .chains
            .extend(parse(&String::from_utf8_lossy(&out.stdout)));
    }
    findings
}

/// Runs [`scan`] and warns once, clearly, when kube-router's rules are on this node.
pub fn warn_if_present() -> usize {
    let f = scan();
    if f.read_with.is_empty() {
        tracing::info!(
            "no iptables-save found: cannot check this node for kube-router's NetworkPolicy rules"
        );
        return 0;
    }
    if f.chains.is_empty() {
        tracing::debug!(read_with = ?f.read_with, "no kube-router NetworkPolicy chains on this node");
        return 0;
    }
    let shown: Vec<&str> = f.chains.iter().take(5).map(String::as_str).collect();
    tracing::warn!(
        chains = f.chains.len(),
        examples = %shown.join(","),
        "kube-router's NetworkPolicy rules are on this node (K3s's built-in network policy controller, or its \
         leftovers): with both, traffic is allowed only where BOTH allow it. Run every K3s server with \
         --disable-network-policy and remove the KUBE-ROUTER-*/KUBE-NWPLCY-*/KUBE-POD-FW-* chains (README, \
         section K3s)"
    );
    f.chains.len()
}

/// How often the agent looks for kube-router's chains again: K3s's controller can come back with a
/// server restart that lacks `--disable-network-policy`.
pub const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Keeps `chains` at the number of kube-router NetworkPolicy chains on this node, looking every
/// [`WATCH_INTERVAL`] (off the async threads: it runs `iptables-save`); logs when it changes.
pub async fn watch(chains: std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering;
    let mut last = None;
    loop {
        let found = tokio::task::spawn_blocking(|| scan().chains.len())
            .await
            .unwrap_or(0);
        if last != Some(found) {
            if found > 0 {
                warn_if_present();
            } else if last.is_some() {
                tracing::info!("kube-router's NetworkPolicy chains are gone from this node");
            }
            last = Some(found);
        }
        chains.store(found, Ordering::Relaxed);
        tokio::time::sleep(WATCH_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_kube_router_chains_only() {
        let save = "\
# Generated by iptables-nft-save v1.8.9
*filter
:INPUT ACCEPT [0:0]
:KUBE-ROUTER-INPUT - [0:0]
:KUBE-NWPLCY-DEFAULT - [0:0]
:KUBE-POD-FW-ABCDEF0123456789 - [0:0]
:KUBE-SERVICES - [0:0]
-A INPUT -m comment --comment \"kube-router netpol\" -j KUBE-ROUTER-INPUT
-A KUBE-ROUTER-FORWARD -d 10.42.0.5/32 -j KUBE-POD-FW-ABCDEF0123456789
COMMIT
";
        let chains = parse(save);
        assert_eq!(
            chains.into_iter().collect::<Vec<_>>(),
            [
                "KUBE-NWPLCY-DEFAULT",
                "KUBE-POD-FW-ABCDEF0123456789",
                "KUBE-ROUTER-FORWARD",
                "KUBE-ROUTER-INPUT"
            ]
        );
        assert!(parse("*filter\n:KUBE-SERVICES - [0:0]\nCOMMIT\n").is_empty());
    }
}
