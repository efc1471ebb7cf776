//! `verify --self-test`: the agent's own programs, proven on real packets, without touching any pod.
//!
//! On a thread of its own, the self-test enters a private mount namespace and two new network
//! namespaces: a "node" with the veth `npst0` (192.0.2.1/24, 2001:db8::1/64) and a "pod" with its
//! peer `eth0` (192.0.2.2/24, 2001:db8::2/64), all documentation ranges. A listener in the pod
//! namespace serves two TCP ports. The embedded programs ([`crate::datapath::EBPF_OBJECT`]) are loaded
//! through [`Datapath::open`] on a scratch pin directory (a bpffs mounted only inside the private mount
//! namespace), the compiler turns a deny-all ingress policy plus an allow rule for one port into map
//! contents, and both programs are attached to `npst0` as on a pod veth. Connections are made before
//! (both ports must connect, so the set-up works) and after (the allowed port must connect, the other
//! must time out, and the ingress-denied counter must move).
//!
//! Clean-up always runs, also after an error or a panic: pins removed (which detaches the links),
//! programs and maps released, the veth deleted, the bpffs unmounted, the scratch directory removed,
//! and the thread leaves the namespaces, which nothing else refers to, so the kernel frees them. Then
//! the self-test checks that its programs and links are gone from the kernel.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs::File,
    io::{self, BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    panic::AssertUnwindSafe,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::programs::{
    links::{FdLink, PinnedLink},
    loaded_links, loaded_programs,
};
use netpol_common::Reason;
use serde::Serialize;

use crate::{
    compiler::{self, CompileInput, EndpointLink},
    datapath::{self, Contents, Datapath, Hook, PinLayout, pins},
    discovery::Discovery,
    model::{ClusterState, Namespace, Object, Origin, Pod, PodKey, Policy},
    verify::links::{Links, ifindex},
};

/// Host-side veth in the scratch "node" namespace.
const HOST_VETH: &str = "npst0";
/// Pod-side veth in the scratch "pod" namespace.
const POD_VETH: &str = "eth0";
const HOST_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const POD_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const HOST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const POD_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
/// The port the allow rule opens.
pub const ALLOWED_PORT: u16 = 7001;
/// A port the pod serves but no rule allows.
pub const DENIED_PORT: u16 = 7002;
/// How long a dropped SYN is waited for.
const DROP_TIMEOUT: Duration = Duration::from_millis(1000);
const NAMESPACE: &str = "netpol-selftest";
const NODE: &str = "netpol-selftest-node";
const REPLY: &str = "netpol-selftest\n";

/// One connection attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Probe {
    /// `baseline` (no programs) or `policy` (deny-all + allow).
    pub phase: String,
    /// `tcp 192.0.2.2:7001`.
    pub target: String,
    pub expect_pass: bool,
    /// The connection reached the pod (connected, or refused by it).
    pub passed: bool,
    pub detail: String,
}

/// What the self-test did and saw.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SelfTestEvidence {
    pub allowed_port: u16,
    pub denied_port: u16,
    pub scratch_dir: String,
    /// Inode numbers of the scratch network namespaces.
    pub netns_inodes: Vec<u64>,
    pub steps: Vec<String>,
    pub probes: Vec<Probe>,
    /// Packets counted as ingress-denied during the policy phase.
    pub dropped_delta: Option<u64>,
    /// Ids of the programs attached to the scratch veth, and of their links.
    pub program_ids: Vec<u32>,
    pub link_ids: Vec<u32>,
    /// Why the test stopped early.
    pub error: Option<String>,
    pub cleanup_errors: Vec<String>,
}

/// Runs the self-test on its own thread and returns what happened. Never panics.
pub fn run() -> SelfTestEvidence {
    let scratch_dir = std::env::temp_dir().join(format!(
        "netpol-verify-selftest-{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    ));
    let dir = scratch_dir.clone();
    let thread = std::thread::Builder::new()
        .name("netpol-selftest".to_owned())
        .spawn(move || {
            let mut ev = SelfTestEvidence {
                allowed_port: ALLOWED_PORT,
                denied_port: DENIED_PORT,
                scratch_dir: dir.display().to_string(),
                ..Default::default()
            };
            let mut scratch = Scratch {
                dir,
                ..Default::default()
            };
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| scratch.test(&mut ev)));
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => ev.error = Some(format!("{e:#}")),
                Err(_) => ev.error = Some("the self-test panicked".to_owned()),
            }
            scratch.cleanup(&mut ev);
            ev
        });
    let mut ev = match thread.map(JoinHandle::join) {
        Ok(Ok(ev)) => ev,
        Ok(Err(_)) => SelfTestEvidence {
            error: Some("the self-test thread panicked during clean-up".to_owned()),
            ..Default::default()
        },
        Err(e) => SelfTestEvidence {
            error: Some(format!("starting the self-test thread: {e}")),
            ..Default::default()
        },
    };
    check_gone(&mut ev, &scratch_dir);
    ev
}

/// After the thread is gone: its programs, links and scratch directory must be too. Programs and
/// links are freed asynchronously (RCU), so wait a little.
fn check_gone(ev: &mut SelfTestEvidence, dir: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let progs: Vec<u32> = loaded_programs()
            .filter_map(Result::ok)
            .map(|p| p.id())
            .filter(|id| ev.program_ids.contains(id))
            .collect();
        let links: Vec<u32> = loaded_links()
            .filter_map(Result::ok)
            .map(|l| l.id())
            .filter(|id| ev.link_ids.contains(id))
            .collect();
        if progs.is_empty() && links.is_empty() {
            if !ev.program_ids.is_empty() {
                ev.steps.push(format!(
                    "programs {:?} and links {:?} are no longer in the kernel",
                    ev.program_ids, ev.link_ids
                ));
            }
            break;
        }
        if Instant::now() > deadline {
            ev.cleanup_errors.push(format!(
                "still loaded after clean-up: programs {progs:?}, links {links:?}"
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if dir.exists() {
        ev.cleanup_errors
            .push(format!("scratch directory {} still exists", dir.display()));
    }
}

/// Everything the self-test created, for clean-up.
#[derive(Default)]
struct Scratch {
    dir: PathBuf,
    dir_created: bool,
    orig_netns: Option<OwnedFd>,
    host_netns: Option<OwnedFd>,
    pod_netns: Option<OwnedFd>,
    veth_created: bool,
    datapath: Option<Datapath>,
    listener: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

fn errno(what: &str) -> anyhow::Error {
    anyhow::Error::new(io::Error::last_os_error()).context(what.to_owned())
}

fn open_netns() -> anyhow::Result<OwnedFd> {
    Ok(File::open("/proc/thread-self/ns/net")
        .context("opening /proc/thread-self/ns/net")?
        .into())
}

fn setns(fd: &OwnedFd) -> anyhow::Result<()> {
    // SAFETY: setns on a valid namespace fd; affects only this thread.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(errno("setns"));
    }
    Ok(())
}

impl Scratch {
    fn test(&mut self, ev: &mut SelfTestEvidence) -> anyhow::Result<()> {
        // A private mount namespace: the scratch bpffs is never visible to the node.
        // SAFETY: unshare and mount affect only this thread (CLONE_NEWNS implies CLONE_FS).
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(errno("unshare(CLONE_NEWNS)"));
            }
            if libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(errno("making / private"));
            }
        }
        self.orig_netns = Some(open_netns()?);
        for slot in [&mut self.host_netns, &mut self.pod_netns] {
            // SAFETY: moves only this thread into a new network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(errno("unshare(CLONE_NEWNET)"));
            }
            let fd = open_netns()?;
            ev.netns_inodes
                .push(File::open("/proc/thread-self/ns/net")?.metadata()?.ino());
            *slot = Some(fd);
        }
        let (Some(host), Some(pod)) = (&self.host_netns, &self.pod_netns) else {
            bail!("scratch namespaces missing");
        };
        ev.steps.push(format!(
            "scratch network namespaces: node (inode {}), pod (inode {})",
            ev.netns_inodes[0], ev.netns_inodes[1]
        ));

        // The veth pair, pod side configured from inside the pod namespace (a netlink socket
        // belongs to the namespace of the thread that opens it).
        setns(host)?;
        let mut links = Links::open()?;
        links.set_up("lo")?;
        links.add_veth(HOST_VETH, POD_VETH, pod.as_raw_fd())?;
        self.veth_created = true;
        links.add_address(HOST_VETH, HOST_V4.into(), 24)?;
        links.add_address(HOST_VETH, HOST_V6.into(), 64)?;
        links.set_up(HOST_VETH)?;
        setns(pod)?;
        let mut links = Links::open()?;
        links.set_up("lo")?;
        links.add_address(POD_VETH, POD_V4.into(), 24)?;
        links.add_address(POD_VETH, POD_V6.into(), 64)?;
        links.set_up(POD_VETH)?;
        setns(host)?;
        ev.steps.push(format!(
            "veth {HOST_VETH} ({HOST_V4}, {HOST_V6}) <-> pod {POD_VETH} ({POD_V4}, {POD_V6})"
        ));

        self.listener = Some(start_listener(pod.try_clone()?)?);
        ev.steps.push(format!(
            "listener in the pod namespace on tcp/{ALLOWED_PORT} and tcp/{DENIED_PORT}"
        ));

        // Baseline: without programs both ports connect (the set-up works; a drop later is policy).
        for target in targets() {
            ev.probes
                .push(probe("baseline", target, true, Duration::from_secs(5)));
        }
        if ev.probes.iter().any(|p| !p.passed) {
            bail!("the scratch network does not work without programs");
        }

        // The agent's programs, the compiler's map contents, attached as on a pod veth.
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        self.dir_created = true;
        let layout = PinLayout::new(&self.dir);
        let opened = Datapath::open(layout.clone(), &Default::default());
        let mut dp = opened.context("loading the embedded programs")?;
        let ifindex = ifindex(HOST_VETH)?;
        let contents = policy_contents(ifindex, pod_link(ifindex)?)?;
        let errors = dp.apply(&contents);
        if !errors.is_empty() {
            bail!("writing the maps: {errors:?}");
        }
        dp.attach(ifindex, HOST_VETH)
            .context("attaching the programs")?;
        self.datapath = Some(dp);
        for hook in Hook::ALL {
            let ids = super::gather::tcx_query(HOST_VETH, hook).map_err(anyhow::Error::msg)?;
            ev.program_ids.extend(ids);
            let link = FdLink::from(PinnedLink::from_pin(layout.link(ifindex, hook))?).info()?;
            ev.link_ids.push(link.id());
        }
        ev.steps.push(format!(
            "loaded the embedded programs with maps pinned under {} (private bpffs); attached to {HOST_VETH} as programs {:?} via TCX links {:?}",
            self.dir.display(),
            ev.program_ids,
            ev.link_ids
        ));
        ev.steps.push(format!(
            "policies: deny-all ingress, allow ingress tcp/{ALLOWED_PORT} ({} policy entries)",
            contents.policy.len()
        ));

        let counted = |dp: &Datapath| {
            dp.counters()
                .get(&Reason::DroppedIngressDenied)
                .copied()
                .unwrap_or(0)
        };
        let before = self.datapath.as_ref().map(counted).unwrap_or(0);
        for target in targets() {
            let allowed = target.1 == ALLOWED_PORT;
            ev.probes
                .push(probe("policy", target, allowed, Duration::from_secs(3)));
        }
        let after = self.datapath.as_ref().map(counted).unwrap_or(0);
        ev.dropped_delta = Some(after.saturating_sub(before));
        Ok(())
    }

    /// Undoes everything, in reverse, whatever state the test stopped in. Records what failed.
    fn cleanup(&mut self, ev: &mut SelfTestEvidence) {
        let mut note = |what: &str, r: anyhow::Result<()>| {
            if let Err(e) = r {
                ev.cleanup_errors.push(format!("{what}: {e:#}"));
            }
        };
        if let Some((stop, thread)) = self.listener.take() {
            stop.store(true, Ordering::Relaxed);
            note(
                "stopping the listener",
                thread
                    .join()
                    .map_err(|_| anyhow::anyhow!("listener panicked")),
            );
        }
        if let Some(host) = &self.host_netns {
            note("entering the scratch node namespace", setns(host));
        }
        if let Some(dp) = self.datapath.take() {
            let layout = dp.layout().clone();
            drop(dp);
            note(
                "removing the scratch pins",
                datapath::cleanup(&layout).map(|_| ()).map_err(Into::into),
            );
            // The kernel releases an unpinned link from a work queue: give it a moment.
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let left: Vec<u32> = Hook::ALL
                    .into_iter()
                    .flat_map(|h| super::gather::tcx_query(HOST_VETH, h).unwrap_or_default())
                    .collect();
                if left.is_empty() {
                    break;
                }
                if Instant::now() > deadline {
                    note(
                        "detaching",
                        Err(anyhow::anyhow!(
                            "programs {left:?} still attached to {HOST_VETH}"
                        )),
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        } else if self.dir_created {
            // Datapath::open may have failed after pinning some maps.
            let _ = datapath::cleanup(&PinLayout::new(&self.dir));
        }
        if self.veth_created {
            note(
                "deleting the veth",
                Links::open().and_then(|mut l| l.delete(HOST_VETH)),
            );
            self.veth_created = false;
        }
        if self.dir_created {
            if pins::is_bpffs(&self.dir).unwrap_or(false) {
                let c = CString::new(self.dir.as_os_str().as_bytes()).unwrap_or_default();
                // SAFETY: `c` is a valid path; the mount exists only in this thread's namespace.
                if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                    note("unmounting the scratch bpffs", Err(errno("umount2")));
                }
            }
            note(
                "removing the scratch directory",
                std::fs::remove_dir(&self.dir).map_err(Into::into),
            );
            self.dir_created = false;
        }
        if let Some(orig) = self.orig_netns.take() {
            note("leaving the scratch namespaces", setns(&orig));
        }
        // Dropping the last references frees the namespaces.
        self.host_netns = None;
        self.pod_netns = None;
        ev.steps
            .push("clean-up: listener stopped, pins removed, veth deleted, bpffs unmounted, scratch directory removed, namespaces released".to_owned());
    }
}

fn targets() -> [(IpAddr, u16); 4] {
    [
        (IpAddr::V4(POD_V4), ALLOWED_PORT),
        (IpAddr::V4(POD_V4), DENIED_PORT),
        (IpAddr::V6(POD_V6), ALLOWED_PORT),
        (IpAddr::V6(POD_V6), DENIED_PORT),
    ]
}

/// One TCP connection from the scratch node namespace: connect, send a line, read the reply. A
/// connection that is refused also reached the pod. `patience` bounds retries of the allowed case
/// (the link may need a moment to come up); a connection expected to be dropped is tried once.
fn probe(phase: &str, (ip, port): (IpAddr, u16), expect_pass: bool, patience: Duration) -> Probe {
    let addr = SocketAddr::new(ip, port);
    let deadline = Instant::now() + patience;
    let (passed, detail) = loop {
        let attempt = match TcpStream::connect_timeout(&addr, DROP_TIMEOUT) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(DROP_TIMEOUT));
                let mut reply = String::new();
                let r = s
                    .write_all(b"ping\n")
                    .and_then(|()| BufReader::new(&s).read_line(&mut reply));
                match r {
                    Ok(_) if reply == REPLY => (true, "connected and exchanged data".to_owned()),
                    Ok(_) => (true, format!("connected, unexpected reply {reply:?}")),
                    Err(e) => (true, format!("connected, but no reply: {e}")),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                (true, "refused by the pod (the SYN got through)".to_owned())
            }
            Err(e)
                if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock =>
            {
                (false, format!("no answer in {DROP_TIMEOUT:?}: dropped"))
            }
            Err(e) => (false, format!("connect failed: {e}")),
        };
        if attempt.0 || !expect_pass || Instant::now() >= deadline {
            break attempt;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Probe {
        phase: phase.to_owned(),
        target: format!("tcp {addr}"),
        expect_pass,
        passed,
        detail,
    }
}

/// A thread in the pod namespace serving both ports on every address: reads a line, answers
/// [`REPLY`]. Returns once it listens.
fn start_listener(pod_netns: OwnedFd) -> anyhow::Result<(Arc<AtomicBool>, JoinHandle<()>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name("netpol-selftest-listener".to_owned())
        .spawn(move || {
            let bind = || -> anyhow::Result<Vec<TcpListener>> {
                setns(&pod_netns)?;
                let mut ls = Vec::new();
                for port in [ALLOWED_PORT, DENIED_PORT] {
                    // [::] is dual-stack: it also accepts IPv4.
                    let l = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
                        .with_context(|| format!("listening on tcp/{port}"))?;
                    l.set_nonblocking(true)?;
                    ls.push(l);
                }
                Ok(ls)
            };
            let listeners = match bind() {
                Ok(ls) => {
                    let _ = ready_tx.send(Ok(()));
                    ls
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                    return;
                }
            };
            while !flag.load(Ordering::Relaxed) {
                let mut idle = true;
                for l in &listeners {
                    if let Ok((mut s, _)) = l.accept() {
                        idle = false;
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(DROP_TIMEOUT));
                        let mut line = String::new();
                        if BufReader::new(&s).read_line(&mut line).is_ok() {
                            let _ = s.write_all(REPLY.as_bytes());
                        }
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        })
        .context("starting the listener thread")?;
    match ready_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(())) => Ok((stop, thread)),
        Ok(Err(e)) => {
            let _ = thread.join();
            bail!("listener: {e}")
        }
        Err(_) => {
            stop.store(true, Ordering::Relaxed);
            bail!("listener did not start")
        }
    }
}

/// The scratch pod's link identity, read as the agent reads it (discovery, in the scratch node).
fn pod_link(ifindex: u32) -> anyhow::Result<EndpointLink> {
    let view = Discovery::new()?.scan()?;
    view.endpoint_links()
        .get(&ifindex)
        .copied()
        .context("discovery found no MAC on the scratch veth's peer")
}

/// The compiler's map contents for one pod behind `ifindex` with a deny-all ingress policy and an
/// allow rule for [`ALLOWED_PORT`]/TCP: the same path the agent's policies take.
fn policy_contents(ifindex: u32, link: EndpointLink) -> anyhow::Result<Contents> {
    let key = PodKey::new(NAMESPACE, "probe");
    let mut state = ClusterState::default();
    state
        .namespaces
        .insert(NAMESPACE.to_owned(), Namespace::implicit(NAMESPACE));
    state.insert(Object::Pod(Pod {
        key: key.clone(),
        labels: Arc::new(BTreeMap::from([("app".to_owned(), "probe".to_owned())])),
        node_name: Some(NODE.to_owned()),
        host_network: false,
        phase: Some("Running".to_owned()),
        ips: vec![IpAddr::V4(POD_V4), IpAddr::V6(POD_V6)],
        ports: Vec::new(),
    }));
    let origin = Origin::File {
        path: PathBuf::from("<self-test>"),
        document: None,
        item: None,
    };
    let policies = [
        (
            "deny-all",
            serde_json::json!({ "podSelector": {}, "policyTypes": ["Ingress"] }),
        ),
        (
            "allow-one-port",
            serde_json::json!({
                "podSelector": { "matchLabels": { "app": "probe" } },
                "policyTypes": ["Ingress"],
                "ingress": [{ "ports": [{ "protocol": "TCP", "port": ALLOWED_PORT }] }],
            }),
        ),
    ];
    for (name, spec) in policies {
        let key = PodKey::new(NAMESPACE, name);
        state.policies.insert(
            key.clone(),
            Arc::new(Policy {
                key,
                origin: origin.clone(),
                spec: serde_json::from_value(spec)?,
                mode: None,
            }),
        );
    }
    let endpoints = BTreeMap::from([(key, ifindex)]);
    let compiled = compiler::compile(&CompileInput {
        state: &state,
        node_name: NODE,
        endpoints: &endpoints,
        // The scratch node's own address is deliberately not a host address: host traffic is always
        // allowed, and the probes must be policed.
        host_addrs: &[],
        links: &BTreeMap::from([(ifindex, link)]),
        pending: &BTreeMap::new(),
        pending_rule: crate::compiler::PendingRule::Drop,
        exits_guarded: true,
        capacities: Default::default(),
        default_mode: Default::default(),
    });
    if !compiled.errors.is_empty() {
        bail!("compiling the self-test policies: {:?}", compiled.errors);
    }
    Ok(compiled.contents())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_test_policy_compiles_to_an_isolated_endpoint_with_one_port() {
        let c = policy_contents(7, EndpointLink::default()).unwrap();
        let ep = c.endpoints.get(&7).expect("endpoint");
        assert_eq!(
            ep.flags & netpol_common::endpoint_flags::ISOLATED_INGRESS,
            netpol_common::endpoint_flags::ISOLATED_INGRESS
        );
        assert!(!c.policy.is_empty());
        assert!(
            c.policy
                .keys()
                .all(|(k, _)| k.port_be == ALLOWED_PORT.to_be_bytes())
        );
    }
}
