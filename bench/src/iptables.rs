//! Part 2: the same flows against a linear iptables ruleset of the same size, in a scratch network
//! namespace, measured in the same run.
//!
//! The ruleset is what a linear iptables enforcer programs: N rules
//! `-s PEER -d POD -p tcp|udp --dport PORT -j ACCEPT` (alternating TCP and UDP, distinct peers and
//! ports), in a chain jumped to from OUTPUT. The flow of the bench matches rule N/2 (an average
//! position). Packets are sent with raw sockets (a bare TCP SYN or UDP header; the kernel adds the IP
//! header) from `10.99.0.1`/`fd99::1` to `.2`/`::2` out of one end of a veth pair (ARP off,
//! so the frame goes to the device's own MAC and the other end drops it as not for it): each `sendto`
//! runs the OUTPUT hook once. The cost per packet is the time per
//! `sendto` minus the same in the same namespace before any table existed (no netfilter hooks).
//!
//! - `new`: the packet walks the chain to the matching rule N/2 (no conntrack rule loaded).
//! - `denied`: a port no rule allows: it walks all N rules. (The final `-j DROP` is left out so that
//!   the packet still takes the same transmit path as the baseline; dropping is cheaper than one rule.)
//! - `established`: an enforcer accepts established traffic with a conntrack rule first; one-way test
//!   traffic never becomes ESTABLISHED, so that first rule is `--ctstate NEW,ESTABLISHED,RELATED`:
//!   the same cost (conntrack lookup + one rule) without needing replies.

use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug)]
pub struct Settings {
    pub sizes: Vec<usize>,
    pub packets: usize,
    pub rounds: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Case {
    pub rules: usize,
    pub packet: String,
    pub flow: String,
    /// Added cost per packet over no netfilter at all.
    pub ns: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Part {
    pub iptables_version: String,
    /// `sendto` cost per packet with no netfilter hooks, per packet kind.
    pub baseline_ns: Vec<(String, f64)>,
    pub cases: Vec<Case>,
    pub method: String,
}

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> anyhow::Result<Self> {
        let name = format!("npbench-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        sh(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns(name);
        for args in [
            "link set lo up",
            "link add d0 type veth peer name d1",
            "link set d0 arp off",
            "link set d1 up",
            "link set d0 up",
            "addr add 10.99.0.1/24 dev d0",
            "-6 addr add fd99::1/64 dev d0 nodad",
        ] {
            sh(Command::new("ip")
                .args(["-n", &ns.0])
                .args(args.split_whitespace()))?;
        }
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn restore(ns: &str, v6: bool, rules: &str) -> anyhow::Result<()> {
    let prog = if v6 {
        "ip6tables-restore"
    } else {
        "iptables-restore"
    };
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, prog])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {prog}"))?;
    child.stdin.take().unwrap().write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{prog} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

const SPORT: u16 = 40_000;
const BATCH: usize = 64;
const ROUND_TIME: std::time::Duration = std::time::Duration::from_millis(150);
const PORT: u16 = 8080;
const DENIED_PORT: u16 = 9;

/// The filter table: `n` rules; the bench flow's TCP and UDP rules at n/2; optionally a conntrack rule first.
fn ruleset(n: usize, v6: bool, conntrack: bool) -> String {
    let mut s = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:NPBENCH - [0:0]\n-A OUTPUT -j NPBENCH\n",
    );
    if conntrack {
        s.push_str("-A NPBENCH -m conntrack --ctstate NEW,ESTABLISHED,RELATED -j ACCEPT\n");
    }
    let (me, peer) = if v6 {
        ("fd99::1", "fd99::2")
    } else {
        ("10.99.0.1", "10.99.0.2")
    };
    for r in 0..n {
        let proto = if r % 2 == 0 { "tcp" } else { "udp" };
        if r == n / 2 || r == n / 2 + 1 {
            // The bench flow, TCP then UDP, in the middle of the chain.
            let proto = if r == n / 2 { "tcp" } else { "udp" };
            s += &format!(
                "-A NPBENCH -s {me} -d {peer} -p {proto} -m {proto} --dport {PORT} -j ACCEPT\n"
            );
            continue;
        }
        let (src, dst) = if v6 {
            (
                format!("fd00:64::{:x}:{:x}", r >> 16, r & 0xffff),
                format!("fd00:64::1:{:x}", r % 110),
            )
        } else {
            (
                format!("10.{}.{}.{}", 64 + (r >> 16), (r >> 8) & 255, r & 255),
                format!("10.65.0.{}", r % 110),
            )
        };
        s += &format!(
            "-A NPBENCH -s {src} -d {dst} -p {proto} -m {proto} --dport {} -j ACCEPT\n",
            10_000 + r % 20_000
        );
    }
    s.push_str("COMMIT\n");
    s
}

/// Raw sockets sending bare L4 headers, inside the scratch namespace (on a thread that entered it).
struct Sender {
    socks: Vec<(String, bool, i32, libc::sockaddr_storage, libc::socklen_t)>,
}

impl Sender {
    fn new() -> anyhow::Result<Self> {
        let mut socks = Vec::new();
        for (name, v6, proto) in [
            ("tcp4", false, libc::IPPROTO_TCP),
            ("udp4", false, libc::IPPROTO_UDP),
            ("tcp6", true, libc::IPPROTO_TCP),
            ("udp6", true, libc::IPPROTO_UDP),
        ] {
            let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
            // SAFETY: plain socket creation.
            let fd = unsafe { libc::socket(family, libc::SOCK_RAW, proto) };
            if fd < 0 {
                bail!("raw socket: {}", std::io::Error::last_os_error());
            }
            // SAFETY: zeroed sockaddr_storage is a valid value.
            let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let len = if v6 {
                let sa = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as u16,
                    sin6_port: 0,
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: "fd99::2".parse::<std::net::Ipv6Addr>()?.octets(),
                    },
                    sin6_scope_id: 0,
                };
                // SAFETY: sockaddr_storage is large enough for sockaddr_in6.
                unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sa) };
                std::mem::size_of::<libc::sockaddr_in6>()
            } else {
                let sa = libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: 0,
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes([10, 99, 0, 2]),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is large enough for sockaddr_in.
                unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sa) };
                std::mem::size_of::<libc::sockaddr_in>()
            };
            socks.push((
                name.to_owned(),
                proto == libc::IPPROTO_TCP,
                fd,
                ss,
                len as u32,
            ));
        }
        Ok(Sender { socks })
    }

    /// ns per `sendto` for packet kind `i` to `dport`: the minimum over `rounds` rounds of `packets`.
    fn measure(&self, i: usize, dport: u16, packets: usize, rounds: usize) -> anyhow::Result<f64> {
        let (_, tcp, fd, ss, len) = &self.socks[i];
        let mut hdr = if *tcp { vec![0u8; 20] } else { vec![0u8; 8] };
        hdr[0..2].copy_from_slice(&SPORT.to_be_bytes());
        hdr[2..4].copy_from_slice(&dport.to_be_bytes());
        if *tcp {
            hdr[12] = 5 << 4;
            hdr[13] = 0x02;
        } else {
            hdr[4..6].copy_from_slice(&8u16.to_be_bytes());
        }
        let mut best = f64::INFINITY;
        for _ in 0..rounds {
            // At least `packets` packets or `ROUND_TIME`, whichever comes first (10,000 rules make a
            // packet slow), but never fewer than one batch.
            let t = Instant::now();
            let mut sent = 0usize;
            while sent < packets && (sent == 0 || t.elapsed() < ROUND_TIME) {
                for _ in 0..BATCH {
                    // SAFETY: valid fd, buffer and address.
                    let rc = unsafe {
                        libc::sendto(
                            *fd,
                            hdr.as_ptr().cast(),
                            hdr.len(),
                            0,
                            ss as *const _ as *const libc::sockaddr,
                            *len,
                        )
                    };
                    if rc < 0 {
                        bail!("sendto: {}", std::io::Error::last_os_error());
                    }
                }
                sent += BATCH;
            }
            best = best.min(t.elapsed().as_secs_f64() * 1e9 / sent as f64);
        }
        Ok(best)
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        for (_, _, fd, _, _) in &self.socks {
            // SAFETY: closing fds this struct owns.
            unsafe { libc::close(*fd) };
        }
    }
}

fn enter(ns: &str) -> anyhow::Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: setns on a valid netns fd; affects this thread only.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {ns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn run(s: &Settings) -> anyhow::Result<Part> {
    if s.sizes.iter().any(|&n| n < 2) {
        bail!("iptables sizes must be at least 2");
    }
    let ns = Netns::new()?;
    let version = sh(Command::new("iptables").arg("--version"))?
        .trim()
        .to_owned();
    let name = ns.0.clone();
    let s = s.clone();
    // A thread of its own: setns changes the calling thread's namespace only.
    let part = std::thread::spawn(move || -> anyhow::Result<Part> {
        enter(&name)?;
        let sender = Sender::new()?;
        let mut baseline = Vec::new();
        for i in 0..4 {
            baseline.push(sender.measure(i, PORT, s.packets, s.rounds)?);
        }
        let mut cases = Vec::new();
        for &n in &s.sizes {
            eprintln!("bench: iptables with {n} rules");
            for (conntrack, flows) in [
                (false, &["new", "denied"][..]),
                (true, &["established"][..]),
            ] {
                restore(&name, false, &ruleset(n, false, conntrack))?;
                restore(&name, true, &ruleset(n, true, conntrack))?;
                for (i, base) in baseline.iter().enumerate() {
                    for flow in flows {
                        let port = if *flow == "denied" { DENIED_PORT } else { PORT };
                        let ns = sender.measure(i, port, s.packets, s.rounds)?;
                        cases.push(Case {
                            rules: n,
                            packet: sender.socks[i].0.clone(),
                            flow: (*flow).to_owned(),
                            ns: (ns - base).max(0.0),
                        });
                    }
                }
            }
        }
        Ok(Part {
            iptables_version: String::new(),
            baseline_ns: sender
                .socks
                .iter()
                .map(|s| s.0.clone())
                .zip(baseline)
                .collect(),
            cases,
            method: String::new(),
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("iptables bench thread panicked"))??;
    drop(ns);
    Ok(Part {
        iptables_version: version,
        method: format!(
            "scratch netns, N rules `-s PEER -d POD -p tcp|udp --dport P -j ACCEPT` in a chain jumped to \
             from OUTPUT, the bench flow matching rule N/2 (new), none (denied: walks all N, final DROP \
             left out), or a conntrack rule first (established); raw-socket sendto of a bare TCP SYN / \
             UDP header out of a veth whose peer drops it, min over {} rounds of {} packets (or 150 ms), minus the same with no \
             netfilter tables at all",
            s.rounds, s.packets
        ),
        ..part
    })
}
