//! A simulated two-node K3s/Flannel cluster built from network namespaces.
//!
//! Layout (per [`Cluster`], all names carry a unique prefix such as `np1234t0`):
//!
//! * Node network namespaces `<prefix>-n0`, `<prefix>-n1` (also the Kubernetes node names),
//!   joined by an underlay veth pair `eth0`<->`eth0` with `192.0.2.10/24` / `192.0.2.11/24` and
//!   `2001:db8::10/64` / `2001:db8::11/64`.
//! * On node N: bridge `cni0` with `10.42.N.1/24` and `fd00:10:42:N::1/64`; `flannel.1`
//!   (VXLAN VNI 1, port 8472, local = IPv4 underlay, nolearning, MAC `0e:00:00:00:0N:04`) with
//!   `10.42.N.0/32`; `flannel-v6.1` (VXLAN VNI 1, port 8472, local = IPv6 underlay, MAC
//!   `0e:00:00:00:0N:06`) with `fd00:10:42:N::/128`. For the other node M: routes
//!   `10.42.M.0/24 via 10.42.M.0 dev flannel.1 onlink` and
//!   `fd00:10:42:M::/64 via fd00:10:42:M:: dev flannel-v6.1 onlink`, permanent neighbours for
//!   the gateways with M's VXLAN MACs, and bridge FDB entries sending those MACs to M's
//!   underlay addresses — exactly what flanneld programs.
//! * IPv4/IPv6 forwarding on, `net.bridge.bridge-nf-call-ip{,6}tables=1` in each node.
//! * Pods: namespaces x, y, z with pods a, b, c each (Kubernetes labels `pod=<name>`, namespace
//!   labels `ns=<name>` and `kubernetes.io/metadata.name=<name>`). Pod number i (x/a=0, x/b=1,
//!   ..., z/c=8) lives on node i%2 with `10.42.N.(10+i)` and `fd00:10:42:N::(10+i)` (the
//!   decimal digits reused as hex, so `10.42.0.10` <-> `fd00:10:42::10`). Each pod has its own
//!   netns `<prefix>-<ns>-<pod>` with `eth0`, whose host peer `veth<8 hex>` sits in the node
//!   netns, is a `cni0` port with hairpin on. Every pod runs `netpol-probe serve --name <ns>/<pod>`
//!   on TCP and UDP 80 and 81 (other ports with [`Cluster::add_pod_with`]), dual-stack; its
//!   answers say which pod answered, on which port, and whom it saw as the client.
//! * Services (opt-in, [`Cluster::enable_kube_proxy`], see [`crate::kube_proxy`]): kube-proxy's
//!   iptables rules in every node, `services.yaml` in the manifest dir, CoreDNS and a host
//!   outside the cluster.
//! * Service mode (opt-in, [`Cluster::serve_pods_through_services`]), as upstream's e2e suite
//!   probes: every pod gets its own ClusterIP Service `<ns>/s-<ns>-<pod>` with ClusterIP
//!   [`pod_service_ip`] (`10.43.100.(10+i)`), selector `pod=<name>`, TCP and UDP ports 80 and
//!   81 to the same target ports, and IPv4 matrices ([`Cluster::probe_matrix`],
//!   [`Cluster::wait_for_matrix`]) target each pod's ClusterIP instead of its pod IP. IPv6
//!   matrices and [`Cluster::probe_from_node`] still use pod IPs (Services are IPv4 only here).
//! * Manifests (multi-document YAML) in a temp dir: `objects.yaml` (Namespaces and Pods with
//!   `spec.nodeName`, container ports `serve-80-tcp`.., `status.podIP(s)`, phase Running) and
//!   `policies.yaml` (whatever the test applies). Files are replaced atomically (write a
//!   dot-file, then rename).
//! * Agents: one per node, `ip netns exec <node> <agent> run --node-name <node> --manifests
//!   <dir> --pin-dir /run/netpol-test/<node>/bpf --state-dir /run/netpol-test/<node>/state`,
//!   with a fresh bpffs mounted at the pin dir beforehand.
//!
//! Dropping the cluster (also while unwinding from a panic) kills the servers and agents, runs
//! `<agent> cleanup`, deletes every namespace, unmounts the bpffs and removes the directories.
//! Leftovers of test processes that died without unwinding are reaped by the next
//! [`Cluster::new`] (each cluster records its owner pid in `/run/netpol-test/<prefix>/owner`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;

/// Root of all per-cluster runtime directories (bpffs mounts, agent state, owner files).
pub const RUN_ROOT: &str = "/run/netpol-test";
/// Namespaces of the model, upstream style.
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
/// Pods in every namespace.
pub const POD_NAMES: [&str; 3] = ["a", "b", "c"];
/// Ports every pod serves, on TCP and UDP.
pub const PORTS: [u16; 2] = [80, 81];
/// Number of simulated nodes.
pub const NODES: usize = 2;

/// Transport protocol of a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// Address family of a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

/// One simulated node.
#[derive(Debug)]
pub struct Node {
    pub index: usize,
    /// Kubernetes node name and network namespace name.
    pub name: String,
    pub underlay_v4: Ipv4Addr,
    pub underlay_v6: Ipv6Addr,
    pub flannel_mac: String,
    pub flannel6_mac: String,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    agent: Option<Child>,
    bpffs_mounted: bool,
    agent_log: PathBuf,
}

impl Node {
    /// `cni0`'s IPv4 address (`10.42.N.1`).
    pub fn gateway_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 42, self.index as u8, 1)
    }
    /// `cni0`'s IPv6 address (`fd00:10:42:N::1`).
    pub fn gateway_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x10, 0x42, self.index as u16, 0, 0, 0, 1)
    }
}

/// One simulated pod.
#[derive(Debug, Clone)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub node: usize,
    /// Network namespace name of the pod.
    pub netns: String,
    /// Host-side veth name (in the node's netns).
    pub host_veth: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub labels: BTreeMap<String, String>,
    pub uid: String,
}

impl Pod {
    /// `"<namespace>/<name>"`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
    pub fn ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(self.ipv4),
            Family::V6 => IpAddr::V6(self.ipv6),
        }
    }
}

/// A namespace object.
#[derive(Debug, Clone)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);
/// Prefixes of clusters alive in this process.
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Is the current process root?
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The agent binary tests should use: `$NETPOL_AGENT_BIN`, else `<workspace>/target/debug/netpol-agent`
/// (honouring `$CARGO_TARGET_DIR`).
pub fn default_agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NETPOL_AGENT_BIN") {
        return PathBuf::from(p);
    }
    target_dir().join("debug").join("netpol-agent")
}

/// The CNI plugin binary: `$NETPOL_CNI_BIN`, else `<workspace>/target/debug/netpol-cni`.
pub fn default_cni_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NETPOL_CNI_BIN") {
        return PathBuf::from(p);
    }
    target_dir().join("debug").join("netpol-cni")
}

/// The probe binary: `$NETPOL_PROBE_BIN`, else `<workspace>/target/debug/netpol-probe`. Tests of
/// this package should rather pass `env!("CARGO_BIN_EXE_netpol-probe")`.
pub fn default_probe_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NETPOL_PROBE_BIN") {
        return PathBuf::from(p);
    }
    target_dir().join("debug").join("netpol-probe")
}

fn target_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
}

/// Runs a command, failing with its stderr if it exits non-zero.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The results of a `netpol-probe probe` run for `n` targets.
pub(crate) fn parse_probe<T: serde::de::DeserializeOwned>(
    out: std::process::Output,
    n: usize,
) -> Result<Vec<T>> {
    if !out.status.success() {
        bail!(
            "probe failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rs: Vec<T> = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "parsing probe output {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    if rs.len() != n {
        bail!("probe returned {} results for {n} targets", rs.len());
    }
    Ok(rs)
}

/// Runs `cmd` with `input` on its stdin; fails with its stderr and the input when it fails.
pub(crate) fn run_stdin(cmd: &mut Command, input: &str) -> Result<()> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}\ninput was:\n{input}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `prog args... -batch -` feeding `batch` on stdin.
fn run_batch(prog: &str, args: &[&str], batch: &str) -> Result<()> {
    run_stdin(Command::new(prog).args(args).args(["-batch", "-"]), batch)
}

fn fnv(s: &str) -> u32 {
    let mut h: u32 = 0x811c9dc5;
    for b in s.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    h
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("string serializes")
}

fn write_atomic(path: &Path, contents: &str) -> Result<()> {
    let name = path.file_name().context("file name")?.to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: sending a signal to a child we own.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// SIGTERM (or SIGKILL), then wait up to `grace` before SIGKILL.
fn terminate(child: &mut Child, sig: i32, grace: Duration) -> Option<std::process::ExitStatus> {
    if let Ok(Some(st)) = child.try_wait() {
        return Some(st);
    }
    signal(child, sig);
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => break,
        }
    }
    let _ = child.kill();
    child.wait().ok()
}

fn is_mountpoint(dir: &Path) -> bool {
    let Ok(mounts) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let d = dir.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m == d))
}

fn unmount(dir: &Path) -> Result<()> {
    if !is_mountpoint(dir) {
        return Ok(());
    }
    if run(Command::new("umount").arg(dir)).is_err() {
        run(Command::new("umount").arg("-l").arg(dir))?;
    }
    Ok(())
}

/// Removes leftovers of clusters whose owning process is gone (killed without unwinding).
fn reap_stale() {
    let Ok(entries) = fs::read_dir(RUN_ROOT) else {
        return;
    };
    for e in entries.flatten() {
        let owner = e.path().join("owner");
        let Ok(pid) = fs::read_to_string(&owner) else {
            continue;
        };
        let Ok(pid) = pid.trim().parse::<i32>() else {
            continue;
        };
        if pid_alive(pid) {
            continue;
        }
        let prefix = e.file_name().to_string_lossy().into_owned();
        eprintln!("netpol-tests: reaping stale cluster {prefix} (owner pid {pid} is gone)");
        if let Ok(list) = fs::read_dir("/run/netns") {
            for ns in list.flatten() {
                let n = ns.file_name().to_string_lossy().into_owned();
                if n.starts_with(&format!("{prefix}-")) {
                    let _ = run(Command::new("ip").args(["netns", "del", &n]));
                }
            }
        }
        for i in 0..NODES {
            let nd = Path::new(RUN_ROOT).join(format!("{prefix}-n{i}"));
            let _ = unmount(&nd.join("bpf"));
            if !is_mountpoint(&nd.join("bpf")) {
                let _ = fs::remove_dir_all(&nd);
            }
        }
        let _ = fs::remove_dir_all(e.path());
    }
}

/// The simulated cluster. See the module docs for the layout.
pub struct Cluster {
    pub prefix: String,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    /// Pods scheduled here whose IPs the API does not report yet ([`Cluster::schedule_pod`]):
    /// `objects.yaml` shows them with phase Pending and no addresses.
    pub starting: Vec<Pod>,
    pub namespaces: Vec<Namespace>,
    pub tmp_dir: PathBuf,
    pub manifest_dir: PathBuf,
    pub(crate) probe_bin: PathBuf,
    agent_bin: Option<PathBuf>,
    /// A command the agents run under (`setpriv --bounding-set ...`, say), empty by default.
    pub agent_wrapper: Vec<std::ffi::OsString>,
    /// Every network namespace made for this cluster (deleted on drop).
    pub(crate) netns: Vec<String>,
    servers: Vec<(String, Child)>,
    claim_dir: PathBuf,
    /// Ports served by pods that do not serve [`PORTS`] (pod id -> ports), see
    /// [`Cluster::add_pod_with`].
    pub(crate) serve_ports: BTreeMap<String, Vec<u16>>,
    /// The kube-proxy simulation, once [`Cluster::enable_kube_proxy`] ran.
    pub(crate) kube_proxy: Option<crate::kube_proxy::KubeProxy>,
    /// Pod id -> ClusterIP of its own Service, set by [`Cluster::serve_pods_through_services`]:
    /// IPv4 matrices probe these instead of the pod IPs.
    pub(crate) pod_services: BTreeMap<String, Ipv4Addr>,
    /// Probe timeout per target.
    pub probe_timeout: Duration,
    /// How pod traffic crosses between the nodes.
    pub backend: Backend,
    /// Container port names by (port, `TCP`/`UDP`) where not `serve-<port>-<proto>` (upstream's
    /// ClusterNetworkPolicy suite names TCP 80 `web` and UDP 53 `dns`).
    pub port_names: BTreeMap<(u16, String), String>,
}

/// The Flannel backends the simulated cluster can run (K3s's `--flannel-backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// VXLAN devices `flannel.1` and `flannel-v6.1` (K3s's default).
    Vxlan,
    /// Plain routes to the other nodes' pod networks through the underlay (`eth0`), no tunnel.
    HostGw,
}

impl Cluster {
    /// Builds the cluster and starts a probe server in every pod. `probe_bin` is the
    /// `netpol-probe` binary (tests: `env!("CARGO_BIN_EXE_netpol-probe")`).
    pub fn new(probe_bin: impl Into<PathBuf>) -> Result<Cluster> {
        Self::with_backend(probe_bin, Backend::Vxlan)
    }

    /// [`Cluster::new`] with the Flannel backend `backend`.
    pub fn with_backend(probe_bin: impl Into<PathBuf>, backend: Backend) -> Result<Cluster> {
        let probe_bin = probe_bin.into();
        if !probe_bin.exists() {
            bail!("probe binary {} does not exist", probe_bin.display());
        }
        fs::create_dir_all(RUN_ROOT)?;
        reap_stale();
        // Claim a unique prefix atomically (create_dir fails if another process has it).
        let pid = std::process::id();
        let (prefix, claim_dir) = loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let prefix = format!("np{}t{}", pid % 10000, n);
            let dir = Path::new(RUN_ROOT).join(&prefix);
            if netns_exists(&format!("{prefix}-n0")) {
                continue;
            }
            match fs::create_dir(&dir) {
                Ok(()) => break (prefix, dir),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).context("creating cluster claim dir"),
            }
        };
        fs::write(claim_dir.join("owner"), pid.to_string())?;
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(prefix.clone());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tmp_dir = std::env::temp_dir().join(format!("netpol-{prefix}-{nanos:x}"));
        let manifest_dir = tmp_dir.join("manifests");
        let mut cluster = Cluster {
            prefix: prefix.clone(),
            nodes: Vec::new(),
            pods: Vec::new(),
            starting: Vec::new(),
            namespaces: Vec::new(),
            tmp_dir: tmp_dir.clone(),
            manifest_dir: manifest_dir.clone(),
            probe_bin,
            agent_bin: None,
            agent_wrapper: Vec::new(),
            netns: Vec::new(),
            servers: Vec::new(),
            claim_dir,
            serve_ports: BTreeMap::new(),
            kube_proxy: None,
            pod_services: BTreeMap::new(),
            probe_timeout: Duration::from_millis(1000),
            backend,
            port_names: BTreeMap::new(),
        };
        // From here on, Drop cleans up whatever was made.
        fs::create_dir_all(&manifest_dir)?;
        fs::create_dir_all(tmp_dir.join("logs"))?;
        cluster.build()?;
        Ok(cluster)
    }

    /// Flannel's VXLAN devices of node `n` and its routes to the other nodes through them.
    fn vxlan_routes(&self, b: &mut String, n: &Node) -> Result<()> {
        let i = n.index;
        writeln!(
            b,
            "link add flannel.1 mtu 1450 address {} type vxlan id 1 local {} dev eth0 dstport 8472 nolearning",
            n.flannel_mac, n.underlay_v4
        )?;
        writeln!(b, "addr add 10.42.{i}.0/32 dev flannel.1")?;
        writeln!(b, "link set flannel.1 up")?;
        writeln!(
            b,
            "link add flannel-v6.1 mtu 1430 address {} type vxlan id 1 local {} dev eth0 dstport 8472 nolearning",
            n.flannel6_mac, n.underlay_v6
        )?;
        writeln!(b, "addr add fd00:10:42:{i:x}::/128 dev flannel-v6.1 nodad")?;
        writeln!(b, "link set flannel-v6.1 up")?;
        for m in self.nodes.iter().filter(|m| m.index != i) {
            let j = m.index;
            writeln!(
                b,
                "route add 10.42.{j}.0/24 via 10.42.{j}.0 dev flannel.1 onlink"
            )?;
            writeln!(
                b,
                "neigh replace 10.42.{j}.0 lladdr {} dev flannel.1 nud permanent",
                m.flannel_mac
            )?;
            writeln!(
                b,
                "route add fd00:10:42:{j:x}::/64 via fd00:10:42:{j:x}:: dev flannel-v6.1 onlink"
            )?;
            writeln!(
                b,
                "neigh replace fd00:10:42:{j:x}:: lladdr {} dev flannel-v6.1 nud permanent",
                m.flannel6_mac
            )?;
        }

        Ok(())
    }

    /// `host-gw`: node `n`'s routes to the other nodes' pod networks through the underlay.
    fn host_gw_routes(&self, b: &mut String, n: &Node) -> Result<()> {
        for m in self.nodes.iter().filter(|m| m.index != n.index) {
            let j = m.index;
            writeln!(b, "route add 10.42.{j}.0/24 via {} dev eth0", m.underlay_v4)?;
            writeln!(
                b,
                "route add fd00:10:42:{j:x}::/64 via {} dev eth0",
                m.underlay_v6
            )?;
        }
        Ok(())
    }

    fn build(&mut self) -> Result<()> {
        let prefix = self.prefix.clone();
        for i in 0..NODES {
            let name = format!("{prefix}-n{i}");
            let nd = Path::new(RUN_ROOT).join(&name);
            self.nodes.push(Node {
                index: i,
                name,
                underlay_v4: Ipv4Addr::new(192, 0, 2, 10 + i as u8),
                underlay_v6: Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10 + i as u16),
                flannel_mac: format!("0e:00:00:00:{i:02x}:04"),
                flannel6_mac: format!("0e:00:00:00:{i:02x}:06"),
                pin_dir: nd.join("bpf"),
                state_dir: nd.join("state"),
                agent: None,
                bpffs_mounted: false,
                agent_log: self.tmp_dir.join("logs").join(format!("agent-n{i}.log")),
            });
        }
        for ns in NAMESPACES {
            self.namespaces.push(Namespace {
                name: ns.to_string(),
                labels: BTreeMap::from([
                    ("ns".to_string(), ns.to_string()),
                    ("kubernetes.io/metadata.name".to_string(), ns.to_string()),
                ]),
            });
        }
        let mut i = 0usize;
        for ns in NAMESPACES {
            for p in POD_NAMES {
                let node = i % NODES;
                let host = 10 + i as u8;
                let seg6 = u16::from_str_radix(&host.to_string(), 16).expect("decimal digits");
                let veth = format!("veth{:08x}", fnv(&format!("{prefix}/{ns}/{p}")));
                self.pods.push(Pod {
                    namespace: ns.to_string(),
                    name: p.to_string(),
                    node,
                    netns: format!("{prefix}-{ns}-{p}"),
                    host_veth: veth,
                    ipv4: Ipv4Addr::new(10, 42, node as u8, host),
                    ipv6: Ipv6Addr::new(0xfd00, 0x10, 0x42, node as u16, 0, 0, 0, seg6),
                    labels: BTreeMap::from([("pod".to_string(), p.to_string())]),
                    uid: format!(
                        "{:08x}-0000-4000-8000-{:012x}",
                        fnv(&format!("{prefix}/{ns}/{p}/uid")),
                        i
                    ),
                });
                i += 1;
            }
        }

        // Network namespaces.
        let mut batch = String::new();
        for n in &self.nodes {
            writeln!(batch, "netns add {}", n.name)?;
        }
        for p in &self.pods {
            writeln!(batch, "netns add {}", p.netns)?;
        }
        // Record before running so a partial failure is still cleaned up.
        self.netns = self.nodes.iter().map(|n| n.name.clone()).collect();
        self.netns.extend(self.pods.iter().map(|p| p.netns.clone()));
        run_batch("ip", &[], &batch)?;

        // Node sysctls.
        for n in &self.nodes {
            run(Command::new("ip")
                .args(["netns", "exec", &n.name, "sysctl", "-q", "-w"])
                .args([
                    "net.ipv4.ip_forward=1",
                    "net.ipv6.conf.all.forwarding=1",
                    "net.ipv6.conf.default.accept_dad=0",
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.bridge.bridge-nf-call-iptables=1",
                    "net.bridge.bridge-nf-call-ip6tables=1",
                ]))
            .context("node sysctls (is br_netfilter available?)")?;
        }

        // Underlay.
        run(Command::new("ip").args([
            "-n",
            &self.nodes[0].name,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &self.nodes[1].name,
        ]))?;

        for n in &self.nodes {
            let i = n.index;
            let mut b = String::new();
            writeln!(b, "link set lo up")?;
            writeln!(b, "addr add {}/24 dev eth0", n.underlay_v4)?;
            writeln!(b, "addr add {}/64 dev eth0 nodad", n.underlay_v6)?;
            writeln!(b, "link set eth0 up")?;
            writeln!(b, "link add cni0 type bridge")?;
            writeln!(b, "addr add {}/24 dev cni0", n.gateway_v4())?;
            writeln!(b, "addr add {}/64 dev cni0 nodad", n.gateway_v6())?;
            writeln!(b, "link set cni0 up")?;
            match self.backend {
                Backend::Vxlan => self.vxlan_routes(&mut b, n)?,
                Backend::HostGw => self.host_gw_routes(&mut b, n)?,
            }
            for p in self.pods.iter().filter(|p| p.node == i) {
                writeln!(
                    b,
                    "link add {} mtu 1450 type veth peer name eth0 mtu 1450 netns {}",
                    p.host_veth, p.netns
                )?;
                writeln!(b, "link set {} master cni0", p.host_veth)?;
                writeln!(b, "link set {} type bridge_slave hairpin on", p.host_veth)?;
                writeln!(b, "link set {} up", p.host_veth)?;
            }
            run_batch("ip", &["-n", &n.name], &b)
                .with_context(|| format!("configuring node {}", n.name))?;

            if self.backend != Backend::Vxlan {
                continue;
            }
            let mut fdb = String::new();
            for m in self.nodes.iter().filter(|m| m.index != i) {
                writeln!(
                    fdb,
                    "fdb append {} dev flannel.1 dst {}",
                    m.flannel_mac, m.underlay_v4
                )?;
                writeln!(
                    fdb,
                    "fdb append {} dev flannel-v6.1 dst {}",
                    m.flannel6_mac, m.underlay_v6
                )?;
            }
            run_batch("bridge", &["-n", &n.name], &fdb)
                .with_context(|| format!("fdb on node {}", n.name))?;
        }

        for p in &self.pods {
            let n = &self.nodes[p.node];
            let mut b = String::new();
            writeln!(b, "link set lo up")?;
            writeln!(b, "addr add {}/24 dev eth0", p.ipv4)?;
            writeln!(b, "addr add {}/64 dev eth0 nodad", p.ipv6)?;
            writeln!(b, "link set eth0 up")?;
            writeln!(b, "route add default via {}", n.gateway_v4())?;
            writeln!(b, "route add default via {}", n.gateway_v6())?;
            run_batch("ip", &["-n", &p.netns], &b)
                .with_context(|| format!("configuring pod {}", p.id()))?;
        }

        self.write_objects()?;
        self.apply_policies("")?;
        self.start_servers()?;
        Ok(())
    }

    fn start_servers(&mut self) -> Result<()> {
        let mut logs = Vec::new();
        for i in 0..self.pods.len() {
            let (child, log) = self.spawn_server(&self.pods[i])?;
            self.servers.push((self.pods[i].id(), child));
            logs.push(log);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut pending: Vec<usize> = (0..logs.len()).collect();
        while !pending.is_empty() {
            pending.retain(|&i| {
                !fs::read_to_string(&logs[i]).is_ok_and(|s| s.lines().any(|l| l == "READY"))
            });
            for &i in &pending {
                if let Ok(Some(st)) = self.servers[i].1.try_wait() {
                    bail!(
                        "probe server in {} exited ({st}): {}",
                        self.servers[i].0,
                        fs::read_to_string(&logs[i]).unwrap_or_default()
                    );
                }
            }
            if pending.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                bail!("probe servers not ready in time: {pending:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Starts `netpol-probe serve --ports <the pod's ports> --name <ns/pod>` in the pod's netns,
    /// logging to `logs/server-<ns>-<pod>.log`.
    fn spawn_server(&self, p: &Pod) -> Result<(Child, PathBuf)> {
        let log = self
            .tmp_dir
            .join("logs")
            .join(format!("server-{}-{}.log", p.namespace, p.name));
        let f = fs::File::create(&log)?;
        let ports: Vec<String> = self.pod_ports(&p.id()).iter().map(u16::to_string).collect();
        let child = Command::new("ip")
            .args(["netns", "exec", &p.netns])
            .arg(&self.probe_bin)
            .args(["serve", "--ports", &ports.join(","), "--name", &p.id()])
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .context("spawning probe server")?;
        Ok((child, log))
    }

    /// The ports pod `id` serves on TCP and UDP ([`PORTS`] unless added with other ports); its
    /// container ports are named `serve-<port>-tcp` / `serve-<port>-udp`.
    pub fn pod_ports(&self, id: &str) -> Vec<u16> {
        self.serve_ports
            .get(id)
            .cloned()
            .unwrap_or_else(|| PORTS.to_vec())
    }

    /// Pod ids (`"x/a"`, ...) in matrix order.
    pub fn pod_ids(&self) -> Vec<String> {
        self.pods.iter().map(Pod::id).collect()
    }

    /// Looks up a pod by `"ns/name"`.
    pub fn pod(&self, id: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.id() == id)
            .unwrap_or_else(|| panic!("no pod {id}"))
    }

    /// A fresh expectation over all pods, every pair set to `default`.
    pub fn reachability(&self, default: bool) -> Reachability {
        Reachability::new(&self.pod_ids(), default)
    }

    // ---------------------------------------------------------------- manifests

    fn objects_yaml(&self) -> String {
        let mut y = String::new();
        for ns in &self.namespaces {
            y.push_str("---\napiVersion: v1\nkind: Namespace\nmetadata:\n");
            let _ = writeln!(y, "  name: {}", yaml_str(&ns.name));
            let _ = writeln!(
                y,
                "  uid: {}",
                yaml_str(&format!(
                    "{:08x}-0000-4000-8000-00000000ffff",
                    fnv(&format!("{}/{}", self.prefix, ns.name))
                ))
            );
            push_labels(&mut y, &ns.labels);
        }
        for (p, running) in self
            .pods
            .iter()
            .map(|p| (p, true))
            .chain(self.starting.iter().map(|p| (p, false)))
        {
            let node = &self.nodes[p.node];
            y.push_str("---\napiVersion: v1\nkind: Pod\nmetadata:\n");
            let _ = writeln!(y, "  name: {}", yaml_str(&p.name));
            let _ = writeln!(y, "  namespace: {}", yaml_str(&p.namespace));
            let _ = writeln!(y, "  uid: {}", yaml_str(&p.uid));
            push_labels(&mut y, &p.labels);
            y.push_str("spec:\n");
            let _ = writeln!(y, "  nodeName: {}", yaml_str(&node.name));
            y.push_str("  containers:\n");
            for port in self.pod_ports(&p.id()) {
                for proto in ["TCP", "UDP"] {
                    let lp = proto.to_ascii_lowercase();
                    let _ = writeln!(y, "  - name: cont-{port}-{lp}");
                    y.push_str("    image: netpol-probe\n    ports:\n");
                    let name = self
                        .port_names
                        .get(&(port, proto.to_owned()))
                        .cloned()
                        .unwrap_or_else(|| format!("serve-{port}-{lp}"));
                    let _ = writeln!(y, "    - name: {name}");
                    let _ = writeln!(y, "      containerPort: {port}");
                    let _ = writeln!(y, "      protocol: {proto}");
                }
            }
            if !running {
                // Scheduled, sandbox being made: the kubelet has not reported addresses yet.
                y.push_str("status:\n  phase: Pending\n");
                continue;
            }
            y.push_str("status:\n  phase: Running\n");
            let _ = writeln!(y, "  hostIP: {}", yaml_str(&node.underlay_v4.to_string()));
            let _ = writeln!(y, "  podIP: {}", yaml_str(&p.ipv4.to_string()));
            y.push_str("  podIPs:\n");
            let _ = writeln!(y, "  - ip: {}", yaml_str(&p.ipv4.to_string()));
            let _ = writeln!(y, "  - ip: {}", yaml_str(&p.ipv6.to_string()));
        }
        y
    }

    fn write_objects(&self) -> Result<()> {
        write_atomic(
            &self.manifest_dir.join("objects.yaml"),
            &self.objects_yaml(),
        )?;
        // Pods changed: kube-proxy follows their endpoints.
        self.sync_kube_proxy()
    }

    /// Replaces `policies.yaml` in the manifest dir with `yaml` (may be multi-document or empty).
    pub fn apply_policies(&self, yaml: &str) -> Result<()> {
        write_atomic(&self.manifest_dir.join("policies.yaml"), yaml)
    }

    /// Replaces the labels of pod `id` (`"ns/name"`) and rewrites `objects.yaml`.
    pub fn set_pod_labels(&mut self, id: &str, labels: &[(&str, &str)]) -> Result<()> {
        let p = self
            .pods
            .iter_mut()
            .find(|p| p.id() == id)
            .ok_or_else(|| anyhow!("no pod {id}"))?;
        p.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.write_objects()
    }

    /// Adds namespace `name` (labels plus `kubernetes.io/metadata.name`, as the API server sets it)
    /// and rewrites `objects.yaml`.
    pub fn add_namespace(&mut self, name: &str, labels: &[(&str, &str)]) -> Result<()> {
        if self.namespaces.iter().any(|n| n.name == name) {
            bail!("namespace {name} exists");
        }
        let mut l: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        l.insert("kubernetes.io/metadata.name".to_string(), name.to_string());
        self.namespaces.push(Namespace {
            name: name.to_string(),
            labels: l,
        });
        self.write_objects()
    }

    /// Replaces the labels of namespace `name` (`kubernetes.io/metadata.name` is always kept,
    /// as the API server does) and rewrites `objects.yaml`.
    pub fn set_namespace_labels(&mut self, name: &str, labels: &[(&str, &str)]) -> Result<()> {
        let ns = self
            .namespaces
            .iter_mut()
            .find(|n| n.name == name)
            .ok_or_else(|| anyhow!("no namespace {name}"))?;
        ns.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ns.labels
            .insert("kubernetes.io/metadata.name".to_string(), name.to_string());
        self.write_objects()
    }

    // ---------------------------------------------------------------- pod lifecycle

    /// Removes pod `id` the way a dying sandbox does: kills its probe server and deletes its netns,
    /// so its host veth disappears. `objects.yaml` is not rewritten (the Pod object outlives its
    /// sandbox, as in Kubernetes); the pod leaves [`Cluster::pods`] and so the matrices.
    pub fn remove_pod(&mut self, id: &str) -> Result<Pod> {
        let i = self
            .pods
            .iter()
            .position(|p| p.id() == id)
            .ok_or_else(|| anyhow!("no pod {id}"))?;
        if let Some(s) = self.servers.iter().position(|(sid, _)| sid == id) {
            let (_, mut child) = self.servers.remove(s);
            terminate(&mut child, libc::SIGKILL, Duration::from_secs(2));
        }
        let pod = self.pods.remove(i);
        run(Command::new("ip").args(["netns", "del", &pod.netns]))?;
        // Its endpoints go (the Pod object stays, as the sandbox died).
        self.sync_kube_proxy()?;
        Ok(pod)
    }

    /// Adds pod `namespace/name` on node `node` after the cluster (and maybe agents) started: a
    /// new netns and veth wired like the others, the next free addresses (`10.42.N.(10+k)`), a
    /// running probe server, then its Pod object in `objects.yaml`.
    pub fn add_pod(&mut self, namespace: &str, name: &str, node: usize) -> Result<Pod> {
        self.add_pod_with(namespace, name, node, &[("pod", name)], &PORTS)
    }

    /// [`Cluster::add_pod`] with the pod's labels and the ports its server listens on (TCP and UDP,
    /// container ports `serve-<port>-<proto>`). The namespace must exist
    /// ([`Cluster::add_namespace`] for a new one).
    pub fn add_pod_with(
        &mut self,
        namespace: &str,
        name: &str,
        node: usize,
        labels: &[(&str, &str)],
        ports: &[u16],
    ) -> Result<Pod> {
        let pod = self.allocate_pod(namespace, name, node, labels)?;
        let id = pod.id();
        if ports != PORTS {
            self.serve_ports.insert(id.clone(), ports.to_vec());
        }
        self.wire(&pod)?;
        let (child, log) = self.spawn_server(&pod)?;
        self.servers.push((id.clone(), child));
        let deadline = Instant::now() + Duration::from_secs(15);
        while !fs::read_to_string(&log).is_ok_and(|s| s.lines().any(|l| l == "READY")) {
            if Instant::now() > deadline {
                bail!("probe server of {id} not ready in time");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.pods.push(pod.clone());
        self.write_objects()?;
        Ok(pod)
    }

    /// A pod as the API shows it once it is scheduled on `node`: its object (phase Pending, no
    /// addresses) is written, nothing is wired yet. [`Cluster::wire`] makes its sandbox's network as
    /// the CNI bridge plugin does, [`Cluster::report_pod_ip`] publishes its addresses as the kubelet
    /// does. No probe server runs in it.
    pub fn schedule_pod(
        &mut self,
        namespace: &str,
        name: &str,
        node: usize,
        labels: &[(&str, &str)],
    ) -> Result<Pod> {
        let pod = self.allocate_pod(namespace, name, node, labels)?;
        self.starting.push(pod.clone());
        self.write_objects()?;
        Ok(pod)
    }

    /// Publishes the addresses of a pod of [`Cluster::starting`] (it becomes Running in
    /// `objects.yaml`).
    pub fn report_pod_ip(&mut self, id: &str) -> Result<()> {
        let i = self
            .starting
            .iter()
            .position(|p| p.id() == id)
            .ok_or_else(|| anyhow!("no starting pod {id}"))?;
        let pod = self.starting.remove(i);
        self.pods.push(pod);
        self.write_objects()
    }

    /// Names and addresses for a new pod (`10.42.N.(10+k)`, the next free ones).
    fn allocate_pod(
        &self,
        namespace: &str,
        name: &str,
        node: usize,
        labels: &[(&str, &str)],
    ) -> Result<Pod> {
        let id = format!("{namespace}/{name}");
        if !self.namespaces.iter().any(|n| n.name == namespace) {
            bail!("no namespace {namespace}");
        }
        if self.pods.iter().chain(&self.starting).any(|p| p.id() == id) {
            bail!("pod {id} exists");
        }
        let host = self
            .pods
            .iter()
            .chain(&self.starting)
            .map(|p| p.ipv4.octets()[3])
            .max()
            .unwrap_or(9)
            + 1;
        let seg6 = u16::from_str_radix(&host.to_string(), 16).context("pod number")?;
        let prefix = &self.prefix;
        Ok(Pod {
            namespace: namespace.to_string(),
            name: name.to_string(),
            node,
            netns: format!("{prefix}-{namespace}-{name}"),
            host_veth: format!("veth{:08x}", fnv(&format!("{prefix}/{id}"))),
            ipv4: Ipv4Addr::new(10, 42, node as u8, host),
            ipv6: Ipv6Addr::new(0xfd00, 0x10, 0x42, node as u16, 0, 0, 0, seg6),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            uid: format!(
                "{:08x}-0000-4000-8000-{:012x}",
                fnv(&format!("{prefix}/{id}/uid")),
                host
            ),
        })
    }

    /// The pod's netns and veth, wired as the CNI bridge plugin does: [`Cluster::wire_link`], then
    /// [`Cluster::configure_pod`].
    pub fn wire(&mut self, pod: &Pod) -> Result<()> {
        self.wire_link(pod)?;
        self.configure_pod(pod)
    }

    /// The first half of the bridge plugin's work: the pod's netns, and a veth made with its peer
    /// there, joined to `cni0` and up. The pod side is still down and has no address.
    pub fn wire_link(&mut self, pod: &Pod) -> Result<()> {
        let n = &self.nodes[pod.node];
        self.netns.push(pod.netns.clone());
        run(Command::new("ip").args(["netns", "add", &pod.netns]))?;
        let mut b = String::new();
        writeln!(
            b,
            "link add {} mtu 1450 type veth peer name eth0 mtu 1450 netns {}",
            pod.host_veth, pod.netns
        )?;
        writeln!(b, "link set {} master cni0", pod.host_veth)?;
        writeln!(b, "link set {} type bridge_slave hairpin on", pod.host_veth)?;
        writeln!(b, "link set {} up", pod.host_veth)?;
        run_batch("ip", &["-n", &n.name], &b)
    }

    /// The second half: the pod side gets its addresses, comes up and gets its routes.
    pub fn configure_pod(&self, pod: &Pod) -> Result<()> {
        let n = &self.nodes[pod.node];
        let mut b = String::new();
        writeln!(b, "link set lo up")?;
        writeln!(b, "addr add {}/24 dev eth0", pod.ipv4)?;
        writeln!(b, "addr add {}/64 dev eth0 nodad", pod.ipv6)?;
        writeln!(b, "link set eth0 up")?;
        writeln!(b, "route add default via {}", n.gateway_v4())?;
        writeln!(b, "route add default via {}", n.gateway_v6())?;
        run_batch("ip", &["-n", &pod.netns], &b)
    }

    // ---------------------------------------------------------------- agents

    /// Starts one agent per node (see module docs).
    pub fn start_agents(&mut self, agent_bin: &Path) -> Result<()> {
        for i in 0..self.nodes.len() {
            self.start_agent(i, agent_bin)?;
        }
        Ok(())
    }

    /// Starts (or restarts) the agent of node `index`, reading the manifest dir.
    pub fn start_agent(&mut self, index: usize, agent_bin: &Path) -> Result<()> {
        let source = [
            std::ffi::OsString::from("--manifests"),
            self.manifest_dir.clone().into(),
        ];
        self.start_agent_with_source(index, agent_bin, &source)
    }

    /// Starts (or restarts) the agent of node `index` with `source` as its source arguments
    /// (`--manifests DIR`, or `--kubeconfig FILE` for the API server double).
    pub fn start_agent_with_source(
        &mut self,
        index: usize,
        agent_bin: &Path,
        source: &[std::ffi::OsString],
    ) -> Result<()> {
        if !agent_bin.is_file() {
            bail!(
                "agent binary {} not found: build it (`cargo build -p netpol-agent`) or set NETPOL_AGENT_BIN",
                agent_bin.display()
            );
        }
        let agent_bin = fs::canonicalize(agent_bin)?;
        self.agent_bin = Some(agent_bin.clone());
        let node = &mut self.nodes[index];
        if let Some(mut old) = node.agent.take() {
            terminate(&mut old, libc::SIGTERM, Duration::from_secs(10));
        }
        fs::create_dir_all(&node.pin_dir)?;
        fs::create_dir_all(&node.state_dir)?;
        if !node.bpffs_mounted {
            run(Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&node.pin_dir))
            .context("mounting bpffs")?;
            node.bpffs_mounted = true;
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.agent_log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &node.name])
            .args(&self.agent_wrapper)
            .arg(&agent_bin)
            .args(["run", "--node-name", &node.name])
            .args(source)
            .arg("--pin-dir")
            .arg(&node.pin_dir)
            .arg("--state-dir")
            .arg(&node.state_dir)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning agent")?;
        node.agent = Some(child);
        Ok(())
    }

    /// Stops the agent of node `index` with SIGTERM and waits for it (SIGKILL after 10 s).
    pub fn stop_agent(&mut self, index: usize) -> Option<std::process::ExitStatus> {
        let mut child = self.nodes[index].agent.take()?;
        terminate(&mut child, libc::SIGTERM, Duration::from_secs(10))
    }

    /// Fails if an agent that was started has exited.
    pub fn check_agents(&mut self) -> Result<()> {
        for n in &mut self.nodes {
            if let Some(c) = n.agent.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                bail!(
                    "agent on {} exited unexpectedly ({st}); log:\n{}",
                    n.name,
                    tail(&n.agent_log, 80)
                );
            }
        }
        Ok(())
    }

    /// The pid of node `index`'s agent (`ip netns exec` execs it, so the child is the agent).
    pub fn agent_pid(&self, index: usize) -> Option<u32> {
        self.nodes[index].agent.as_ref().map(Child::id)
    }

    /// `netpol-agent status -o json` of node `index`, asked with `agent_bin`.
    pub fn agent_status(
        &self,
        index: usize,
        agent_bin: &Path,
    ) -> Result<netpol_agent::observe::control::Status> {
        let n = &self.nodes[index];
        let out = Command::new("ip")
            .args(["netns", "exec", &n.name])
            .arg(agent_bin)
            .args(["status", "-o", "json", "--state-dir"])
            .arg(&n.state_dir)
            .arg("--pin-dir")
            .arg(&n.pin_dir)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "status of node {index}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Waits until the agent of pod `id`'s node reports the pod isolated for ingress (enforced or
    /// audited); fails after `timeout` or when an agent dies.
    pub fn wait_isolated_ingress(&mut self, id: &str, timeout: Duration) -> Result<()> {
        let node = self.pod(id).node;
        let bin = self
            .agent_bin
            .clone()
            .ok_or_else(|| anyhow!("no agent started"))?;
        let deadline = Instant::now() + timeout;
        loop {
            self.check_agents()?;
            let isolated = self.agent_status(node, &bin).is_ok_and(|s| {
                s.endpoints
                    .iter()
                    .any(|e| e.pod == id && e.isolated_ingress)
            });
            if isolated {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{id} not isolated within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent log of node `index` (whole file).
    pub fn agent_log(&self, index: usize) -> String {
        fs::read_to_string(&self.nodes[index].agent_log).unwrap_or_default()
    }

    // ---------------------------------------------------------------- probing

    pub(crate) fn probe_cmd(&self, netns: &str, targets: &[String]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", netns])
            .arg(&self.probe_bin)
            .arg("probe")
            .arg("--timeout-ms")
            .arg(self.probe_timeout.as_millis().to_string())
            .args(targets)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn collect_probe(child: Child, n: usize) -> Result<Vec<bool>> {
        #[derive(Deserialize)]
        struct R {
            ok: bool,
        }
        let rs: Vec<R> = parse_probe(child.wait_with_output()?, n)?;
        Ok(rs.into_iter().map(|r| r.ok).collect())
    }

    /// Service mode (see the module docs): enables kube-proxy and gives every pod of the cluster
    /// its own ClusterIP Service (`<ns>/s-<ns>-<pod>`, ClusterIP [`pod_service_ip`], selector
    /// `pod=<name>`, TCP and UDP ports [`PORTS`] with equal target ports); from then on IPv4
    /// matrices probe every pod through its ClusterIP, as upstream's e2e suite does. Pods added
    /// later are probed by pod IP. Call before [`Cluster::start_agents`] so the agents see the
    /// Services from the start (later works too, they follow `services.yaml`).
    pub fn serve_pods_through_services(&mut self) -> Result<()> {
        self.enable_kube_proxy()?;
        let pods = self.pods.clone();
        for (i, p) in pods.iter().enumerate() {
            let ip = pod_service_ip(i);
            let mut svc = crate::kube_proxy::Service::new(
                &p.namespace,
                &format!("s-{}-{}", p.namespace, p.name),
                ip,
            )
            .select("pod", &p.name);
            for port in PORTS {
                for proto in [Proto::Tcp, Proto::Udp] {
                    svc = svc.port(
                        &format!("serve-{port}-{}", proto.as_str()),
                        proto,
                        port,
                        port,
                    );
                }
            }
            self.add_service(svc)?;
            self.pod_services.insert(p.id(), ip);
        }
        Ok(())
    }

    /// Whether `family` matrices go through the pods' Services
    /// ([`Cluster::serve_pods_through_services`]).
    pub fn through_services(&self, family: Family) -> bool {
        family == Family::V4 && !self.pod_services.is_empty()
    }

    /// The address a matrix probes pod `p` at: its own ClusterIP in Service mode (IPv4), else
    /// its pod IP.
    pub fn matrix_target(&self, p: &Pod, family: Family) -> IpAddr {
        match self.pod_services.get(&p.id()) {
            Some(ip) if family == Family::V4 => IpAddr::V4(*ip),
            _ => p.ip(family),
        }
    }

    /// Probes every pod from every pod (one probe process per source pod, all in parallel), at
    /// [`Cluster::matrix_target`].
    pub fn probe_matrix(&self, port: u16, proto: Proto, family: Family) -> Result<Matrix> {
        let targets: Vec<String> = self
            .pods
            .iter()
            .map(|p| {
                format!(
                    "{}/{}/{}",
                    proto.as_str(),
                    self.matrix_target(p, family),
                    port
                )
            })
            .collect();
        let mut children = Vec::new();
        for p in &self.pods {
            children.push(
                self.probe_cmd(&p.netns, &targets)
                    .spawn()
                    .context("spawning probe")?,
            );
        }
        let mut cells = Vec::new();
        for (p, c) in self.pods.iter().zip(children) {
            cells.push(
                Self::collect_probe(c, targets.len())
                    .with_context(|| format!("probing from {}", p.id()))?,
            );
        }
        Ok(Matrix {
            pods: self.pod_ids(),
            cells,
        })
    }

    /// Probes pod `to` from node `node`'s own network namespace (host traffic).
    pub fn probe_from_node(
        &self,
        node: usize,
        to: &str,
        port: u16,
        proto: Proto,
        family: Family,
    ) -> Result<bool> {
        let t = format!("{}/{}/{}", proto.as_str(), self.pod(to).ip(family), port);
        let c = self
            .probe_cmd(&self.nodes[node].name, &[t])
            .spawn()
            .context("spawning probe")?;
        Ok(Self::collect_probe(c, 1)?[0])
    }

    /// Re-probes until the observed matrix equals `expected` (loopback pairs are always expected
    /// to connect, as upstream's `AllowLoopback`) or `timeout` passes; then fails with a diff.
    ///
    /// In Service mode ([`Cluster::through_services`]) loopback cells are left out of the
    /// comparison, as upstream's suite does for every run (`ignoreLoopback`, kubernetes#95879):
    /// a pod probing itself through its ClusterIP is a hairpin, leaves the pod, is DNATed back to
    /// it and masqueraded by kube-proxy to the node's `cni0` address, so it is an ordinary
    /// connection to a Service, decided by the pod's own egress policy (denied under egress
    /// isolation unless a rule allows the pod itself) while its ingress sees the node (always
    /// allowed). Neither "always connects" nor "follows the matrix's expectation for the pair"
    /// holds for it, and services.rs checks hairpin separately.
    pub fn wait_for_matrix(
        &mut self,
        expected: &Reachability,
        port: u16,
        proto: Proto,
        family: Family,
        timeout: Duration,
    ) -> Result<Matrix> {
        let mut expected = expected.clone();
        expected.allow_loopback();
        let ignore_loopback = self.through_services(family);
        let start = Instant::now();
        let deadline = start + timeout;
        let mut attempts = 0;
        loop {
            self.check_agents()?;
            let t0 = Instant::now();
            let observed = self.probe_matrix(port, proto, family)?;
            attempts += 1;
            let mut want = expected.clone();
            if ignore_loopback {
                for (i, row) in want.cells.iter_mut().enumerate() {
                    row[i] = observed.cells[i][i];
                }
            }
            if observed.cells == want.cells {
                return Ok(observed);
            }
            let took = t0.elapsed();
            if Instant::now() + took > deadline {
                bail!(
                    "reachability for {} port {port} {family:?}{} did not converge after {attempts} probes in {:.1?}\n{}",
                    proto.as_str().to_uppercase(),
                    if ignore_loopback {
                        " through the pods' ClusterIPs (loopback cells ignored)"
                    } else {
                        ""
                    },
                    start.elapsed(),
                    diff_table(&want, &observed)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// [`Cluster::wait_for_matrix`] for several (port, protocol, family) cases in order, with
    /// one shared deadline.
    pub fn wait_for_all(
        &mut self,
        expected: &Reachability,
        cases: &[(u16, Proto, Family)],
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for &(port, proto, family) in cases {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(3));
            self.wait_for_matrix(expected, port, proto, family, left)?;
        }
        Ok(())
    }

    fn print_logs(&self) {
        let Ok(entries) = fs::read_dir(self.tmp_dir.join("logs")) else {
            return;
        };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            // Server logs only say READY unless something went wrong.
            let t = tail(&p, 200);
            if name.starts_with("server-") && t.trim() == "READY" {
                continue;
            }
            eprintln!("===== {} ({}) =====\n{t}", name, self.prefix);
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

fn push_labels(y: &mut String, labels: &BTreeMap<String, String>) {
    if labels.is_empty() {
        y.push_str("  labels: {}\n");
        return;
    }
    y.push_str("  labels:\n");
    for (k, v) in labels {
        let _ = writeln!(y, "    {}: {}", yaml_str(k), yaml_str(v));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for (_, s) in &mut self.servers {
            terminate(s, libc::SIGKILL, Duration::from_secs(2));
        }
        for i in 0..self.nodes.len() {
            self.stop_agent(i);
        }
        if panicking || std::env::var_os("NETPOL_PRINT_LOGS").is_some() {
            self.print_logs();
        }
        if let Some(bin) = &self.agent_bin {
            for n in &self.nodes {
                if !n.bpffs_mounted || !netns_exists(&n.name) {
                    continue;
                }
                let child = Command::new("ip")
                    .args(["netns", "exec", &n.name])
                    .arg(bin)
                    .arg("cleanup")
                    .arg("--pin-dir")
                    .arg(&n.pin_dir)
                    .arg("--state-dir")
                    .arg(&n.state_dir)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn();
                if let Ok(mut c) = child {
                    let deadline = Instant::now() + Duration::from_secs(20);
                    loop {
                        match c.try_wait() {
                            Ok(Some(st)) => {
                                if !st.success() {
                                    let mut e = String::new();
                                    if let Some(mut s) = c.stderr.take() {
                                        let _ = std::io::Read::read_to_string(&mut s, &mut e);
                                    }
                                    eprintln!(
                                        "netpol-tests: agent cleanup on {} failed ({st}): {e}",
                                        n.name
                                    );
                                }
                                break;
                            }
                            Ok(None) if Instant::now() < deadline => {
                                std::thread::sleep(Duration::from_millis(20))
                            }
                            _ => {
                                eprintln!("netpol-tests: agent cleanup on {} hung", n.name);
                                let _ = c.kill();
                                let _ = c.wait();
                                break;
                            }
                        }
                    }
                }
            }
        }
        let existing: Vec<&String> = self.netns.iter().filter(|n| netns_exists(n)).collect();
        if !existing.is_empty() {
            let batch: String = existing
                .iter()
                .map(|n| format!("netns del {n}\n"))
                .collect();
            if let Err(e) = run_batch("ip", &["-force"], &batch) {
                eprintln!("netpol-tests: deleting namespaces: {e:#}");
            }
        }
        for n in &self.nodes {
            let nd = n.pin_dir.parent().map(Path::to_path_buf);
            if let Err(e) = unmount(&n.pin_dir) {
                eprintln!("netpol-tests: unmounting {}: {e:#}", n.pin_dir.display());
                continue;
            }
            if let Some(nd) = nd
                && nd.exists()
            {
                let _ = fs::remove_dir_all(&nd);
            }
        }
        if std::env::var_os("NETPOL_KEEP_TMP").is_none() {
            let _ = fs::remove_dir_all(&self.tmp_dir);
        }
        let _ = fs::remove_dir_all(&self.claim_dir);
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| p != &self.prefix);
    }
}

/// ClusterIP of pod number `i`'s own Service in Service mode
/// ([`Cluster::serve_pods_through_services`]): `10.43.100.(10+i)`.
pub fn pod_service_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        43,
        100,
        u8::try_from(10 + i).expect("at most 245 pods in Service mode"),
    )
}

/// Observed connectivity: `cells[from][to]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matrix {
    pub pods: Vec<String>,
    pub cells: Vec<Vec<bool>>,
}

impl Matrix {
    pub fn get(&self, from: &str, to: &str) -> bool {
        let f = index_of(&self.pods, from);
        let t = index_of(&self.pods, to);
        self.cells[f][t]
    }
    /// True if every pair connects.
    pub fn all(&self) -> bool {
        self.cells.iter().all(|r| r.iter().all(|&c| c))
    }
}

impl std::fmt::Display for Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&truth_table(&self.pods, &self.cells))
    }
}

fn index_of(pods: &[String], id: &str) -> usize {
    pods.iter()
        .position(|p| p == id)
        .unwrap_or_else(|| panic!("no pod {id}"))
}

/// Matches `"ns/pod"` against a pattern: `"*"`, `"x/*"`, `"*/a"` or an exact id.
fn matches(pattern: &str, id: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let (pn, pp) = pattern
        .split_once('/')
        .unwrap_or_else(|| panic!("bad pod pattern {pattern}"));
    let (n, p) = id.split_once('/').expect("pod id");
    (pn == "*" || pn == n) && (pp == "*" || pp == p)
}

/// Expected connectivity, built upstream style.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reachability {
    pub pods: Vec<String>,
    pub cells: Vec<Vec<bool>>,
}

impl Reachability {
    pub fn new(pods: &[String], default: bool) -> Reachability {
        Reachability {
            pods: pods.to_vec(),
            cells: vec![vec![default; pods.len()]; pods.len()],
        }
    }

    /// Sets every pair matching the patterns (`"x/a"`, `"x/*"`, `"*/a"`, `"*"`).
    pub fn expect_peer(&mut self, from: &str, to: &str, connected: bool) -> &mut Self {
        let mut hit = false;
        for (i, f) in self.pods.iter().enumerate() {
            for (j, t) in self.pods.iter().enumerate() {
                if matches(from, f) && matches(to, t) {
                    self.cells[i][j] = connected;
                    hit = true;
                }
            }
        }
        assert!(hit, "expect_peer({from}, {to}) matched no pod pair");
        self
    }

    /// Every connection into pods matching `to`.
    pub fn expect_all_ingress(&mut self, to: &str, connected: bool) -> &mut Self {
        self.expect_peer("*", to, connected)
    }

    /// Every connection out of pods matching `from`.
    pub fn expect_all_egress(&mut self, from: &str, connected: bool) -> &mut Self {
        self.expect_peer(from, "*", connected)
    }

    /// Sets each pair for which `f(from, to)` returns `Some(connected)`.
    pub fn expect_where(&mut self, f: impl Fn(&str, &str) -> Option<bool>) -> &mut Self {
        for (i, from) in self.pods.iter().enumerate() {
            for (j, to) in self.pods.iter().enumerate() {
                if let Some(c) = f(from, to) {
                    self.cells[i][j] = c;
                }
            }
        }
        self
    }

    /// Pod-to-itself always connects (loopback follows no policy).
    pub fn allow_loopback(&mut self) -> &mut Self {
        for i in 0..self.pods.len() {
            self.cells[i][i] = true;
        }
        self
    }

    pub fn get(&self, from: &str, to: &str) -> bool {
        self.cells[index_of(&self.pods, from)][index_of(&self.pods, to)]
    }
}

impl std::fmt::Display for Reachability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&truth_table(&self.pods, &self.cells))
    }
}

/// Rows are sources, columns destinations; `.` connects, `X` does not.
fn truth_table(pods: &[String], cells: &[Vec<bool>]) -> String {
    let mut s = String::from("from\\to");
    for p in pods {
        let _ = write!(s, "\t{p}");
    }
    s.push('\n');
    for (i, p) in pods.iter().enumerate() {
        s.push_str(p);
        for c in &cells[i] {
            s.push('\t');
            s.push(if *c { '.' } else { 'X' });
        }
        s.push('\n');
    }
    s
}

/// Upstream-style printout: expected, observed and a comparison (`.` agrees, `X` differs),
/// followed by the list of wrong pairs.
pub fn diff_table(expected: &Reachability, observed: &Matrix) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "expected:\n{}\nobserved:\n{}",
        truth_table(&expected.pods, &expected.cells),
        truth_table(&observed.pods, &observed.cells)
    );
    let cmp: Vec<Vec<bool>> = expected
        .cells
        .iter()
        .zip(&observed.cells)
        .map(|(e, o)| e.iter().zip(o).map(|(a, b)| a == b).collect())
        .collect();
    let wrong = cmp.iter().flatten().filter(|c| !**c).count();
    let _ = writeln!(
        s,
        "comparison ({wrong} wrong of {}):\n{}",
        expected.pods.len() * expected.pods.len(),
        truth_table(&expected.pods, &cmp)
    );
    for (i, f) in expected.pods.iter().enumerate() {
        for (j, t) in expected.pods.iter().enumerate() {
            if !cmp[i][j] {
                let _ = writeln!(
                    s,
                    "  {f} -> {t}: expected {}, observed {}",
                    if expected.cells[i][j] {
                        "connect"
                    } else {
                        "blocked"
                    },
                    if observed.cells[i][j] {
                        "connect"
                    } else {
                        "blocked"
                    }
                );
            }
        }
    }
    s
}
