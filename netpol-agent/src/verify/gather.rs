//! Evidence for `verify`: every side effect of the read-only checks lives here (bpf syscalls, TCX
//! queries, pinned objects, the control socket, ruleset dumps). The types are plain data, so the
//! verdicts in [`super::checks`] are pure. Parsing helpers are pure too, and tested here.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use aya::{
    maps::{HashMap, Map, MapData, MapInfo},
    programs::{
        SchedClassifier,
        links::{FdLink, LinkType, PinnedLink},
        loaded_programs,
    },
};
use netpol_common::{EndpointInfo, map_names};
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{
    datapath::{Hook, PinLayout, pins},
    discovery::Discovery,
    observe::control::{self, Status},
    sources::manifests::ManifestSource,
};

// ------------------------------------------------------------------------------------------ kernel

/// What the kernel offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KernelEvidence {
    /// `uname -r`.
    pub release: String,
    /// `BPF_PROG_GET_NEXT_ID` over every loaded program: how many there are, or why it failed.
    pub bpf_syscall: Result<usize, String>,
    /// Contents of `/proc/sys/net/core/bpf_jit_enable`.
    pub jit_enable: Result<String, String>,
    /// A loaded program that is JIT-compiled (id, name): proof of the JIT where the sysctl is hidden.
    pub jitted_program: Option<(u32, String)>,
    /// Size of `/sys/kernel/btf/vmlinux`.
    pub btf_vmlinux: Result<u64, String>,
    pub pin_dir: String,
    /// Whether the pin directory is on a bpffs (`Err`: missing or unreadable).
    pub pin_dir_bpffs: Result<bool, String>,
}

/// Reads the kernel evidence.
pub fn kernel(layout: &PinLayout) -> KernelEvidence {
    let mut jitted_program = None;
    let bpf_syscall = loaded_programs()
        .try_fold(0usize, |n, p| {
            p.map(|p| {
                if p.size_jitted() > 0 && jitted_program.is_none() {
                    let name = p.name_as_str().unwrap_or_default().to_owned();
                    jitted_program = Some((p.id(), name));
                }
                n + 1
            })
        })
        .map_err(|e| format!("{e} ({})", source_chain(&e)));
    let pin_dir = layout.root();
    let pin_dir_bpffs = if pin_dir.exists() {
        pins::is_bpffs(pin_dir).map_err(|e| format!("{e}: {}", source_chain(&e)))
    } else {
        Err("does not exist".to_owned())
    };
    KernelEvidence {
        release: uname_release(),
        bpf_syscall,
        jit_enable: read_jit_enable(),
        jitted_program,
        btf_vmlinux: std::fs::metadata("/sys/kernel/btf/vmlinux")
            .map(|m| m.len())
            .map_err(|e| e.to_string()),
        pin_dir: pin_dir.display().to_string(),
        pin_dir_bpffs,
    }
}

const JIT_SYSCTL: &str = "/proc/sys/net/core/bpf_jit_enable";

/// `net.core.bpf_jit_enable` exists only in the initial network namespace: when verify runs in
/// another one (`ip netns exec`), it is read from a thread that joined pid 1's.
fn read_jit_enable() -> Result<String, String> {
    let read = || {
        std::fs::read_to_string(JIT_SYSCTL)
            .map(|s| s.trim().to_owned())
            .map_err(|e| format!("{JIT_SYSCTL}: {e}"))
    };
    match read() {
        Ok(v) => Ok(v),
        Err(here) => std::thread::spawn(move || {
            let init = std::fs::File::open("/proc/1/ns/net")
                .map_err(|e| format!("{here}; /proc/1/ns/net: {e}"))?;
            // SAFETY: setns on a valid namespace fd; affects only this short-lived thread.
            if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&init), libc::CLONE_NEWNET) }
                != 0
            {
                return Err(format!(
                    "{here}; joining pid 1's network namespace: {}",
                    io::Error::last_os_error()
                ));
            }
            read().map_err(|e| format!("{e} (also in pid 1's network namespace)"))
        })
        .join()
        .unwrap_or_else(|_| Err("reading bpf_jit_enable panicked".to_owned())),
    }
}

fn uname_release() -> String {
    // SAFETY: uname fills a caller-provided struct.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid out-pointer.
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    // SAFETY: uname NUL-terminates `release`.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// `major.minor.patch` of a kernel release string such as `6.18.0-1-amd64` (missing parts are 0).
pub fn parse_release(release: &str) -> Option<(u32, u32, u32)> {
    let mut parts = release.split(['.', '-', '+', '_']).map(|p| {
        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    if out.is_empty() {
        e.to_string()
    } else {
        out.join(": ")
    }
}

// ------------------------------------------------------------------------------------------- agent

/// What the agent says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentEvidence {
    pub socket: String,
    /// The answer to `status`, or why there is none.
    pub status: Result<Status, String>,
    /// The agent's pid, from `SO_PEERCRED` on its control socket.
    pub pid: Option<i32>,
    /// The ids of the BPF programs the agent process holds (`prog_id` in `/proc/<pid>/fdinfo`): its
    /// current programs. Empty when they could not be read (another pid namespace, say).
    pub held_programs: BTreeSet<u32>,
}

/// How long `verify` waits for the agent's status.
const STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Asks the agent for its status and finds its current programs.
pub async fn agent(state_dir: &Path) -> AgentEvidence {
    let socket = control::socket_path(state_dir);
    // A wedged agent (stopped, or stuck in a syscall) must not hang `verify`.
    let status =
        match tokio::time::timeout(STATUS_TIMEOUT, control::request_status(state_dir)).await {
            Ok(answer) => answer.map_err(|e| format!("{e:#}")),
            Err(_) => Err(format!(
                "the agent at {} did not answer within {STATUS_TIMEOUT:?}",
                socket.display()
            )),
        };
    let mut pid = None;
    if let Ok(mut stream) = tokio::net::UnixStream::connect(&socket).await {
        pid = stream.peer_cred().ok().and_then(|c| c.pid());
        // Ask properly, so the agent does not log a bad request.
        let _ = stream.write_all(b"status\n").await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(STATUS_TIMEOUT, stream.read_to_end(&mut sink)).await;
    }
    let held_programs = pid.map(held_program_ids).unwrap_or_default();
    AgentEvidence {
        socket: socket.display().to_string(),
        status,
        pid,
        held_programs,
    }
}

fn held_program_ids(pid: i32) -> BTreeSet<u32> {
    let dir = PathBuf::from(format!("/proc/{pid}/fdinfo"));
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return BTreeSet::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|info| fdinfo_prog_id(&info))
        .collect()
}

/// The `prog_id` of a BPF program fd's fdinfo (None for any other kind of fd).
pub fn fdinfo_prog_id(fdinfo: &str) -> Option<u32> {
    if !fdinfo.lines().any(|l| l.starts_with("prog_type:")) {
        return None;
    }
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("prog_id:"))
        .and_then(|v| v.trim().parse().ok())
}

// -------------------------------------------------------------------------------------- local pods

/// The pods the cluster state puts on the agent's node, read independently of the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalPods {
    /// `namespace/name` and addresses of every local pod that policies apply to.
    Listed {
        source: String,
        pods: Vec<(String, Vec<IpAddr>)>,
    },
    /// The source cannot be read by `verify` (or no agent answered).
    Unavailable(String),
}

/// Reads the agent's source (a manifest directory) for the pods of its node.
pub fn local_pods(status: Option<&Status>) -> LocalPods {
    let Some(status) = status else {
        return LocalPods::Unavailable("no agent status".to_owned());
    };
    let Some(dir) = status.source.strip_prefix("manifests:") else {
        return LocalPods::Unavailable(format!(
            "source {:?} is not one verify can read on its own",
            status.source
        ));
    };
    match ManifestSource::new().load(Path::new(dir)) {
        Ok(state) => LocalPods::Listed {
            source: status.source.clone(),
            pods: state
                .pods
                .values()
                .filter(|p| p.node_name.as_deref() == Some(&status.node) && p.is_policy_peer())
                .map(|p| (p.key.to_string(), p.ips.clone()))
                .collect(),
        },
        Err(e) => LocalPods::Unavailable(format!("reading {dir}: {e}")),
    }
}

// ---------------------------------------------------------------------------------------- datapath

/// A loaded BPF program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProgEvidence {
    pub id: u32,
    pub name: String,
    pub map_ids: Vec<u32>,
}

/// A pinned link, read back through its pin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LinkEvidence {
    pub path: String,
    pub link_id: u32,
    pub prog_id: u32,
    pub tcx: bool,
}

/// One hook of one veth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookEvidence {
    pub hook: Hook,
    /// Program ids attached on this hook, in TCX order (the kernel's answer to `BPF_PROG_QUERY`).
    pub tcx: Result<Vec<u32>, String>,
    /// The agent's pinned link for this hook.
    pub link: Result<LinkEvidence, String>,
}

/// A local endpoint and what is attached on its veth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointEvidence {
    /// `namespace/name`, or empty when only known from a pin.
    pub pod: String,
    pub ifname: String,
    pub ifindex: u32,
    /// What the agent says (`attached` in its status); None without status.
    pub agent_says_attached: Option<bool>,
    pub hooks: Vec<HookEvidence>,
}

/// A veth with its peer in another namespace that is not one of the agent's endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VethEvidence {
    pub ifname: String,
    pub ifindex: u32,
    pub peer_addrs: Vec<IpAddr>,
    /// The bridge it is a port of (`cni0` for a Flannel pod veth).
    pub bridge: Option<String>,
    /// Programs attached on either hook.
    pub attached: Vec<u32>,
}

/// The datapath as the kernel shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatapathEvidence {
    /// Every loaded program, by id.
    pub programs: BTreeMap<u32, ProgEvidence>,
    /// Pinned maps under `<pin-dir>/maps`, by name: their ids.
    pub pinned_maps: BTreeMap<String, Result<u32, String>>,
    /// Where the endpoints came from: the agent's status, or the pinned links without it.
    pub endpoints_from: &'static str,
    pub endpoints: Vec<EndpointEvidence>,
    pub other_veths: Vec<VethEvidence>,
    /// `NP_ENDPOINTS_V1`: ifindex -> flags.
    pub endpoint_map: Result<BTreeMap<u32, u32>, String>,
    /// `NP_CONFIG_V1[CONFIG_GENERATION]`.
    pub generation: Result<u32, String>,
    /// Discovery failure, if any.
    pub discovery_error: Option<String>,
}

/// Reads programs, pins, TCX attachments and veths.
pub fn datapath(layout: &PinLayout, status: Option<&Status>) -> DatapathEvidence {
    let mut ev = DatapathEvidence {
        programs: programs(),
        pinned_maps: BTreeMap::new(),
        endpoints_from: "",
        endpoints: Vec::new(),
        other_veths: Vec::new(),
        endpoint_map: Err(String::new()),
        generation: Err(String::new()),
        discovery_error: None,
    };
    (ev.generation, ev.endpoint_map) = read_live_endpoints(layout);
    let buffered = [
        map_names::ENDPOINTS,
        map_names::IPCACHE,
        map_names::CIDRS,
        map_names::POLICY,
    ];
    let names = buffered.into_iter().flatten().chain([
        map_names::CONNTRACK,
        map_names::CONFIG,
        map_names::COUNTERS,
    ]);
    for name in names {
        let id = MapInfo::from_pin(layout.maps_dir().join(name))
            .map(|i| i.id())
            .map_err(|e| format!("{e}: {}", source_chain(&e)));
        ev.pinned_maps.insert(name.to_owned(), id);
    }

    let view = Discovery::new()
        .map_err(|e| e.to_string())
        .and_then(|mut d| d.scan().map_err(|e| format!("{e}: {}", source_chain(&e))));
    let veths = match view {
        Ok(v) => v.veths,
        Err(e) => {
            ev.discovery_error = Some(e);
            Vec::new()
        }
    };
    let endpoints: Vec<(String, String, u32, Option<bool>)> = match status {
        Some(s) => {
            ev.endpoints_from = "agent status";
            s.endpoints
                .iter()
                .map(|e| (e.pod.clone(), e.ifname.clone(), e.ifindex, Some(e.attached)))
                .collect()
        }
        None => {
            ev.endpoints_from = "pinned links (no agent status)";
            let ifindexes: BTreeSet<u32> = std::fs::read_dir(layout.links_dir())
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .filter_map(|e| PinLayout::parse_link_name(e.file_name().to_str()?))
                .map(|(i, _)| i)
                .collect();
            ifindexes
                .into_iter()
                .map(|i| {
                    let name = veths
                        .iter()
                        .find(|v| v.ifindex == i)
                        .map(|v| v.name.clone())
                        .unwrap_or_default();
                    (String::new(), name, i, None)
                })
                .collect()
        }
    };
    for (pod, ifname, ifindex, says) in endpoints {
        let hooks = Hook::ALL
            .into_iter()
            .map(|hook| HookEvidence {
                hook,
                tcx: tcx_query(&ifname, hook),
                link: read_link(layout, ifindex, hook),
            })
            .collect();
        ev.endpoints.push(EndpointEvidence {
            pod,
            ifname,
            ifindex,
            agent_says_attached: says,
            hooks,
        });
    }
    for v in veths {
        if ev.endpoints.iter().any(|e| e.ifindex == v.ifindex) {
            continue;
        }
        let attached = Hook::ALL
            .into_iter()
            .flat_map(|h| tcx_query(&v.name, h).unwrap_or_default())
            .collect();
        ev.other_veths.push(VethEvidence {
            bridge: bridge_of(&v.name),
            ifname: v.name,
            ifindex: v.ifindex,
            peer_addrs: v.peer_addrs,
            attached,
        });
    }
    ev
}

fn programs() -> BTreeMap<u32, ProgEvidence> {
    loaded_programs()
        .filter_map(Result::ok)
        .map(|p| {
            let ev = ProgEvidence {
                id: p.id(),
                name: p.name_as_str().unwrap_or_default().to_owned(),
                map_ids: p.map_ids().ok().flatten().unwrap_or_default(),
            };
            (ev.id, ev)
        })
        .collect()
}

/// Program ids attached to `ifname` at `hook`, in order.
pub fn tcx_query(ifname: &str, hook: Hook) -> Result<Vec<u32>, String> {
    if ifname.is_empty() {
        return Err("no interface name".to_owned());
    }
    SchedClassifier::query_tcx(ifname, hook.tc_attach_type())
        .map(|(_, progs)| progs.iter().map(|p| p.id()).collect())
        .map_err(|e| format!("{e}: {}", source_chain(&e)))
}

fn read_link(layout: &PinLayout, ifindex: u32, hook: Hook) -> Result<LinkEvidence, String> {
    let path = layout.link(ifindex, hook);
    let pinned = PinnedLink::from_pin(&path).map_err(|e| match &e {
        aya::programs::links::LinkError::SyscallError(s)
            if s.io_error.kind() == io::ErrorKind::NotFound =>
        {
            format!("no pinned link at {}", path.display())
        }
        _ => format!("{}: {e}: {}", path.display(), source_chain(&e)),
    })?;
    let info = FdLink::from(pinned)
        .info()
        .map_err(|e| format!("link info of {}: {e}", path.display()))?;
    Ok(LinkEvidence {
        path: path.display().to_string(),
        link_id: info.id(),
        prog_id: info.program_id(),
        tcx: matches!(info.link_type(), Ok(LinkType::Tcx)),
    })
}

/// The generation and the endpoint flags of the buffer it names, read again when the agent switched
/// buffers in between.
fn read_live_endpoints(
    layout: &PinLayout,
) -> (Result<u32, String>, Result<BTreeMap<u32, u32>, String>) {
    let mut last = (Err(String::new()), Err(String::new()));
    for _ in 0..3 {
        let generation = read_generation(layout);
        let map = read_endpoint_map(layout, &generation);
        let again = read_generation(layout);
        let settled = generation == again;
        last = (generation, map);
        if settled {
            break;
        }
    }
    last
}

/// The flags of every endpoint in the buffer packets read at `generation`.
fn read_endpoint_map(
    layout: &PinLayout,
    generation: &Result<u32, String>,
) -> Result<BTreeMap<u32, u32>, String> {
    let generation = generation.clone()?;
    let name = map_names::ENDPOINTS[netpol_common::buffer::of(generation)];
    let path = layout.maps_dir().join(name);
    let data = MapData::from_pin(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let map = Map::from_map_data(data).map_err(|e| e.to_string())?;
    let map: HashMap<MapData, u32, EndpointInfo> =
        HashMap::try_from(map).map_err(|e| e.to_string())?;
    Ok(map
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| (k, v.flags))
        .collect())
}

fn read_generation(layout: &PinLayout) -> Result<u32, String> {
    let path = layout.maps_dir().join(map_names::CONFIG);
    let data = MapData::from_pin(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let map = Map::from_map_data(data).map_err(|e| e.to_string())?;
    let array: aya::maps::Array<MapData, u32> =
        aya::maps::Array::try_from(map).map_err(|e| e.to_string())?;
    array
        .get(&netpol_common::CONFIG_GENERATION, 0)
        .map_err(|e| e.to_string())
}

/// The bridge `ifname` is a port of, from `/sys/class/net/<ifname>/master`.
fn bridge_of(ifname: &str) -> Option<String> {
    let target = std::fs::read_link(format!("/sys/class/net/{ifname}/master")).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

// ---------------------------------------------------------------------------------- other engines

/// The output of one ruleset dump (`iptables-save`, `nft list ruleset`, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RulesetDump {
    /// The command, as run.
    pub tool: String,
    pub output: Result<String, String>,
}

/// Dumps the rulesets other policy engines write to: iptables (nft and, when its tables exist,
/// legacy backends), ip6tables, and nftables itself.
pub fn engines() -> Vec<RulesetDump> {
    let mut cmds: Vec<Vec<&str>> = vec![
        vec!["iptables-save"],
        vec!["ip6tables-save"],
        vec!["nft", "list", "ruleset"],
    ];
    // Only look at the legacy backend when it has tables: listing it would load its modules.
    if has_lines("/proc/net/ip_tables_names") {
        cmds.push(vec!["iptables-legacy-save"]);
    }
    if has_lines("/proc/net/ip6_tables_names") {
        cmds.push(vec!["ip6tables-legacy-save"]);
    }
    cmds.into_iter()
        .map(|argv| {
            let output = Command::new(argv[0])
                .args(&argv[1..])
                .stdin(Stdio::null())
                .stderr(Stdio::piped())
                .output();
            let output = match output {
                Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
                Ok(o) => Err(format!(
                    "exit {}: {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err("not installed".to_owned()),
                Err(e) => Err(e.to_string()),
            };
            RulesetDump {
                tool: argv.join(" "),
                output,
            }
        })
        .collect()
}

fn has_lines(path: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|s| s.lines().any(|l| !l.trim().is_empty()))
}

/// A chain found in a dump.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Chain {
    /// `filter`, `inet cilium`, ...
    pub table: String,
    pub name: String,
    /// Rules in the chain.
    pub rules: usize,
}

/// The chains of an `iptables-save` dump (`*table`, `:CHAIN policy [p:b]`, `-A CHAIN ...`).
pub fn parse_iptables_save(dump: &str) -> Vec<Chain> {
    let mut chains: Vec<Chain> = Vec::new();
    let mut table = String::new();
    for line in dump.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_owned();
        } else if let Some(decl) = line.strip_prefix(':') {
            if let Some(name) = decl.split_whitespace().next() {
                chains.push(Chain {
                    table: table.clone(),
                    name: name.to_owned(),
                    rules: 0,
                });
            }
        } else if let Some(rule) = line.strip_prefix("-A ")
            && let Some(name) = rule.split_whitespace().next()
            && let Some(c) = chains
                .iter_mut()
                .find(|c| c.table == table && c.name == name)
        {
            c.rules += 1;
        }
    }
    chains
}

/// The chains of an `nft list ruleset` dump (`table FAMILY NAME {`, `chain NAME {`, rules inside).
pub fn parse_nft_ruleset(dump: &str) -> Vec<Chain> {
    let mut chains: Vec<Chain> = Vec::new();
    let mut table = String::new();
    let mut in_chain = false;
    for line in dump.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("table ") {
            table = rest.trim_end_matches('{').trim().to_owned();
            in_chain = false;
        } else if let Some(rest) = l.strip_prefix("chain ") {
            chains.push(Chain {
                table: table.clone(),
                name: rest.trim_end_matches('{').trim().to_owned(),
                rules: 0,
            });
            in_chain = true;
        } else if l == "}" {
            in_chain = false;
        } else if in_chain
            && !l.is_empty()
            && !l.starts_with("type ")
            && !l.starts_with("policy ")
            && !l.starts_with("comment ")
            && let Some(c) = chains.last_mut()
        {
            c.rules += 1;
        }
    }
    chains
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases() {
        assert_eq!(parse_release("6.18.0-1-amd64"), Some((6, 18, 0)));
        assert_eq!(parse_release("6.6"), Some((6, 6, 0)));
        assert_eq!(parse_release("5.15.0-105-generic"), Some((5, 15, 0)));
        assert_eq!(parse_release("6.1.94+"), Some((6, 1, 94)));
        assert_eq!(parse_release(""), None);
    }

    #[test]
    fn fdinfo() {
        let prog = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nprog_type:\t3\nprog_jited:\t1\nprog_tag:\tabc\nmemlock:\t4096\nprog_id:\t812\nrun_time_ns:\t0\n";
        assert_eq!(fdinfo_prog_id(prog), Some(812));
        let map = "pos:\t0\nmap_type:\t1\nkey_size:\t4\nmap_id:\t33\n";
        assert_eq!(fdinfo_prog_id(map), None);
        let link = "link_type:\ttcx\nlink_id:\t9\nprog_tag:\tabc\nprog_id:\t812\n";
        assert_eq!(fdinfo_prog_id(link), None, "a link fd is not a program fd");
    }

    #[test]
    fn iptables_save() {
        let dump = "# Generated by iptables-save\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:KUBE-ROUTER-INPUT - [0:0]\n:KUBE-NWPLCY-ABC - [0:0]\n-A INPUT -j KUBE-ROUTER-INPUT\n-A KUBE-ROUTER-INPUT -j KUBE-NWPLCY-ABC\n-A KUBE-ROUTER-INPUT -j RETURN\nCOMMIT\n*nat\n:cali-nat-outgoing - [0:0]\nCOMMIT\n";
        let chains = parse_iptables_save(dump);
        let kr = chains
            .iter()
            .find(|c| c.name == "KUBE-ROUTER-INPUT")
            .unwrap();
        assert_eq!((kr.table.as_str(), kr.rules), ("filter", 2));
        assert!(
            chains
                .iter()
                .any(|c| c.name == "cali-nat-outgoing" && c.table == "nat")
        );
        assert_eq!(chains.len(), 5);
    }

    #[test]
    fn nft_ruleset() {
        let dump = "table ip filter {\n\tchain KUBE-ROUTER-INPUT {\n\t\tcounter packets 0 bytes 0 jump KUBE-NWPLCY-X\n\t}\n\n\tchain INPUT {\n\t\ttype filter hook input priority filter; policy accept;\n\t\tjump KUBE-ROUTER-INPUT\n\t}\n}\ntable inet cilium {\n\tchain CILIUM_POST_mangle {\n\t}\n}\n";
        let chains = parse_nft_ruleset(dump);
        assert_eq!(
            chains,
            vec![
                Chain {
                    table: "ip filter".into(),
                    name: "KUBE-ROUTER-INPUT".into(),
                    rules: 1
                },
                Chain {
                    table: "ip filter".into(),
                    name: "INPUT".into(),
                    rules: 1
                },
                Chain {
                    table: "inet cilium".into(),
                    name: "CILIUM_POST_mangle".into(),
                    rules: 0
                },
            ]
        );
    }
}
