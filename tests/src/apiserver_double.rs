//! A test double of the Kubernetes API server: just enough of its list/watch protocol, over plain
//! HTTP/1.1, for the agent's API source (kube-runtime watchers) to run against.
//!
//! What it speaks, as the API server does:
//! - `GET /api/v1/namespaces`, `/api/v1/pods`, `/apis/networking.k8s.io/v1/networkpolicies`,
//!   `/api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices` (cluster-wide; anything else is
//!   a 404 `Status`), and `/api/v1/nodes` (cluster-scoped, for `verify --cluster`; not in
//!   [`Resource::ALL`], which is what the agent watches).
//! - Lists of one namespace, `<group-version>/namespaces/<ns>/<plural>` (such as
//!   `/api/v1/namespaces/netpol-system/pods`), and lists filtered by an equality-based
//!   `labelSelector` (`k=v`, `k!=v`, `k`, `!k`); watches are of whole collections only.
//! - Lists: `{"kind":"PodList","metadata":{"resourceVersion":"N","continue":..},"items":[..]}`,
//!   paged by `limit`/`continue`; items carry no kind/apiVersion, as in the real API.
//! - Watches (`?watch=1&resourceVersion=N`): a chunked stream of JSON lines
//!   `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":..}` with every change after N, then
//!   new ones as they happen; `BOOKMARK`s with the current version when `allowWatchBookmarks`;
//!   the stream ends after `timeoutSeconds`. `resourceVersion` 0 or empty starts with synthetic
//!   `ADDED` events for the current objects.
//! - A watch from a version older than the last compaction gets HTTP 200 and one `ERROR` event with a
//!   410 `Status` (`Expired`), which forces the client to list again.
//!
//! Faults to inject: [`ApiServerDouble::compact`] (+ [`ApiServerDouble::expire_watches`]: 410 on
//! open watches), [`ApiServerDouble::cut_watches`] (abrupt disconnect mid-stream),
//! [`ApiServerDouble::set_forbidden`] (403 `Status` on list and watch, as RBAC answers),
//! [`ApiServerDouble::set_unreachable`] (every connection reset at once).
//!
//! It can listen inside other network namespaces ([`ApiServerDouble::start_in_netns`]): the simulated
//! nodes (`ip netns exec`) cannot reach the host's 127.0.0.1, so a listener is bound on each node's
//! own loopback, all serving the same objects.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Bound;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

/// The resources the double serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Namespaces,
    Pods,
    NetworkPolicies,
    Services,
    EndpointSlices,
    /// Cluster-scoped, from a CRD: a 404 until [`ApiServerDouble::set_installed`] installs it.
    ClusterNetworkPolicies,
    /// Cluster-scoped; served for `verify --cluster`, not watched by the agent.
    Nodes,
}

impl Resource {
    /// What the agent watches (and its ClusterRole must allow).
    pub const ALL: [Resource; 6] = [
        Resource::Namespaces,
        Resource::Pods,
        Resource::NetworkPolicies,
        Resource::Services,
        Resource::EndpointSlices,
        Resource::ClusterNetworkPolicies,
    ];

    /// Served too, but not watched by the agent: read by `verify --cluster`.
    pub const NOT_WATCHED: [Resource; 1] = [Resource::Nodes];

    /// Every resource the double serves.
    pub fn served() -> impl Iterator<Item = Resource> {
        Resource::ALL.into_iter().chain(Resource::NOT_WATCHED)
    }

    /// The collection path.
    pub fn path(self) -> &'static str {
        match self {
            Resource::Namespaces => "/api/v1/namespaces",
            Resource::Pods => "/api/v1/pods",
            Resource::NetworkPolicies => "/apis/networking.k8s.io/v1/networkpolicies",
            Resource::Services => "/api/v1/services",
            Resource::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            Resource::ClusterNetworkPolicies => {
                "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies"
            }
            Resource::Nodes => "/api/v1/nodes",
        }
    }

    /// The plural name, as in URLs and RBAC.
    pub fn plural(self) -> &'static str {
        match self {
            Resource::Namespaces => "namespaces",
            Resource::Pods => "pods",
            Resource::NetworkPolicies => "networkpolicies",
            Resource::Services => "services",
            Resource::EndpointSlices => "endpointslices",
            Resource::ClusterNetworkPolicies => "clusternetworkpolicies",
            Resource::Nodes => "nodes",
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Resource::Namespaces => "Namespace",
            Resource::Pods => "Pod",
            Resource::NetworkPolicies => "NetworkPolicy",
            Resource::Services => "Service",
            Resource::EndpointSlices => "EndpointSlice",
            Resource::ClusterNetworkPolicies => "ClusterNetworkPolicy",
            Resource::Nodes => "Node",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Resource::NetworkPolicies => "networking.k8s.io/v1",
            Resource::EndpointSlices => "discovery.k8s.io/v1",
            Resource::ClusterNetworkPolicies => "policy.networking.k8s.io/v1alpha2",
            _ => "v1",
        }
    }

    /// The API group ("" for the core group), as in RBAC rules.
    pub fn group(self) -> &'static str {
        self.api_version()
            .rsplit_once('/')
            .map_or("", |(group, _)| group)
    }

    fn namespaced(self) -> bool {
        !matches!(
            self,
            Resource::Namespaces | Resource::Nodes | Resource::ClusterNetworkPolicies
        )
    }

    /// The resource of a manifest's `kind`.
    pub fn of_kind(kind: &str) -> Option<Resource> {
        Resource::served().find(|r| r.kind() == kind)
    }

    fn from_path(path: &str) -> Option<Resource> {
        Resource::served().find(|r| r.path() == path)
    }

    /// The resource of a collection path and, for `<group-version>/namespaces/<ns>/<plural>`, the
    /// namespace.
    fn route(path: &str) -> Option<(Resource, Option<String>)> {
        if let Some(r) = Resource::from_path(path) {
            return Some((r, None));
        }
        let (base, rest) = path.split_once("/namespaces/")?;
        let (ns, plural) = rest.split_once('/')?;
        Resource::served()
            .find(|r| r.namespaced() && r.path() == format!("{base}/{plural}"))
            .map(|r| (r, Some(ns.to_owned())))
    }
}

/// Object key: namespace ("" for cluster-scoped) and name.
type Key = (String, String);

#[derive(Default)]
struct Collection {
    objects: BTreeMap<Key, Value>,
    /// (resourceVersion, event type, object) in order.
    events: Vec<(u64, &'static str, Value)>,
    /// Watches from a version older than this get 410.
    compacted: u64,
    forbidden: bool,
    /// A CRD's resource is served only once installed.
    installed: bool,
}

#[derive(Default)]
struct State {
    version: u64,
    collections: BTreeMap<Resource, Collection>,
    /// Bumped to end open watches abruptly.
    cut: u64,
    /// Bumped to send 410 to open watches.
    expire: u64,
    unreachable: bool,
    /// Requests seen: `GET <path>?<query>`.
    requests: Vec<String>,
    open_watches: usize,
    /// Plain-text answers of the pod proxy (`/api/v1/namespaces/NS/pods/NAME:PORT/proxy/PATH`), by
    /// path, as a kubelet-proxied container would give them.
    proxied: BTreeMap<String, String>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    bookmark_interval: Duration,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running double. Dropping it stops every listener and stream.
pub struct ApiServerDouble {
    shared: Arc<Shared>,
    addrs: Vec<SocketAddr>,
    threads: Vec<JoinHandle<()>>,
}

impl ApiServerDouble {
    /// Listens on 127.0.0.1 (an ephemeral port) in this process's network namespace.
    pub fn start() -> Result<ApiServerDouble> {
        Self::start_with(&[None], Duration::from_secs(1))
    }

    /// Listens on 127.0.0.1 inside each named network namespace (`/run/netns/<name>`), one listener
    /// per namespace, all serving the same objects. [`ApiServerDouble::addr`] `i` is netns `i`'s.
    pub fn start_in_netns(netns: &[&str]) -> Result<ApiServerDouble> {
        let names: Vec<Option<&str>> = netns.iter().map(|n| Some(*n)).collect();
        Self::start_with(&names, Duration::from_secs(1))
    }

    fn start_with(netns: &[Option<&str>], bookmark_interval: Duration) -> Result<ApiServerDouble> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                version: 1,
                ..State::default()
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            bookmark_interval,
        });
        let mut double = ApiServerDouble {
            shared,
            addrs: Vec::new(),
            threads: Vec::new(),
        };
        for ns in netns {
            let (tx, rx) = std::sync::mpsc::channel();
            let shared = double.shared.clone();
            let name = ns.map(str::to_owned);
            let ns = name.clone();
            let thread = std::thread::spawn(move || {
                let listener = (|| -> Result<TcpListener> {
                    if let Some(ns) = &ns {
                        enter_netns(ns)?;
                    }
                    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
                    l.set_nonblocking(true)?;
                    Ok(l)
                })();
                match listener {
                    Ok(l) => {
                        let _ = tx.send(l.local_addr().map_err(anyhow::Error::from));
                        accept_loop(l, shared);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
            double.threads.push(thread);
            let addr = rx
                .recv()
                .context("listener thread died")?
                .with_context(|| format!("starting the API server double in {name:?}"))?;
            double.addrs.push(addr);
        }
        Ok(double)
    }

    /// The address of listener `i`.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.addrs[i]
    }

    /// `http://<addr i>`.
    pub fn url(&self, i: usize) -> String {
        format!("http://{}", self.addrs[i])
    }

    /// Writes a kubeconfig for listener `i` to `path` (a bearer token the double ignores).
    pub fn write_kubeconfig(&self, i: usize, path: &Path) -> Result<PathBuf> {
        let kc = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {}\n\
             users:\n- name: agent\n  user:\n    token: not-checked\n\
             contexts:\n- name: double\n  context:\n    cluster: double\n    user: agent\n\
             current-context: double\n",
            self.url(i)
        );
        fs::write(path, kc).with_context(|| format!("writing {}", path.display()))?;
        Ok(path.to_owned())
    }

    /// The current resourceVersion of the whole store.
    pub fn version(&self) -> u64 {
        self.shared.lock().version
    }

    fn mutate(&self, f: impl FnOnce(&mut State) -> Result<()>) -> Result<()> {
        let mut s = self.shared.lock();
        f(&mut s)?;
        drop(s);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Creates or replaces an object (`kind` decides the resource). Sets namespace (`default` when
    /// missing on namespaced kinds), uid, creationTimestamp (when missing) and resourceVersion.
    pub fn apply(&self, object: Value) -> Result<()> {
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        let resource =
            Resource::of_kind(&kind).with_context(|| format!("the double serves no {kind:?}"))?;
        self.mutate(|s| {
            s.version += 1;
            let version = s.version;
            let mut object = object;
            let meta = object
                .get_mut("metadata")
                .and_then(Value::as_object_mut)
                .context("object without metadata")?;
            let name = meta
                .get("name")
                .and_then(Value::as_str)
                .context("object without metadata.name")?
                .to_owned();
            let namespace = if resource.namespaced() {
                let ns = meta
                    .get("namespace")
                    .and_then(Value::as_str)
                    .unwrap_or("default")
                    .to_owned();
                meta.insert("namespace".into(), json!(ns));
                ns
            } else {
                String::new()
            };
            meta.insert("resourceVersion".into(), json!(version.to_string()));
            meta.entry("uid")
                .or_insert_with(|| json!(format!("00000000-0000-4000-8000-{version:012}")));
            meta.entry("creationTimestamp")
                .or_insert_with(|| json!(timestamp()));
            if resource == Resource::Namespaces {
                let labels = meta
                    .entry("labels")
                    .or_insert_with(|| json!({}))
                    .as_object_mut()
                    .context("labels")?;
                labels.insert("kubernetes.io/metadata.name".into(), json!(name));
            }
            let c = s.collections.entry(resource).or_default();
            let key = (namespace, name);
            let kind = if c.objects.contains_key(&key) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            c.objects.insert(key, object.clone());
            c.events.push((version, kind, object));
            Ok(())
        })
    }

    /// Applies every document of a (multi-document) YAML string.
    pub fn apply_yaml(&self, yaml: &str) -> Result<usize> {
        let mut n = 0;
        for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
            let v: Value = serde::Deserialize::deserialize(doc).context("parsing YAML")?;
            if v.is_null() {
                continue;
            }
            self.apply(v)?;
            n += 1;
        }
        Ok(n)
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) -> Result<bool> {
        let mut found = false;
        self.mutate(|s| {
            let key = (
                if resource.namespaced() {
                    namespace.to_owned()
                } else {
                    String::new()
                },
                name.to_owned(),
            );
            s.version += 1;
            let version = s.version;
            let c = s.collections.entry(resource).or_default();
            if let Some(mut object) = c.objects.remove(&key) {
                object["metadata"]["resourceVersion"] = json!(version.to_string());
                c.events.push((version, "DELETED", object));
                found = true;
            }
            Ok(())
        })?;
        Ok(found)
    }

    /// The stored object, if any.
    pub fn get(&self, resource: Resource, namespace: &str, name: &str) -> Option<Value> {
        let ns = if resource.namespaced() { namespace } else { "" };
        self.shared
            .lock()
            .collections
            .get(&resource)
            .and_then(|c| c.objects.get(&(ns.to_owned(), name.to_owned())).cloned())
    }

    /// Forgets the event history: a watch from any earlier version gets `410 Gone`.
    pub fn compact(&self) {
        let _ = self.mutate(|s| {
            let v = s.version;
            for c in s.collections.values_mut() {
                c.compacted = v;
                c.events.clear();
            }
            Ok(())
        });
    }

    /// Sends an `ERROR` event with `410 Gone` on every open watch and ends it (after [`compact`],
    /// as the API server does when a watcher has fallen out of its window).
    ///
    /// [`compact`]: ApiServerDouble::compact
    pub fn expire_watches(&self) {
        self.compact();
        let _ = self.mutate(|s| {
            s.expire += 1;
            Ok(())
        });
    }

    /// Drops every open watch connection abruptly: half a chunk, then the TCP connection closes.
    pub fn cut_watches(&self) {
        let _ = self.mutate(|s| {
            s.cut += 1;
            Ok(())
        });
    }

    /// Installs (or removes) the CRD of `resource`: until then its paths are a 404, as for a CRD
    /// that is not installed. Only CRD resources ([`Resource::ClusterNetworkPolicies`]) need it.
    pub fn set_installed(&self, resource: Resource, installed: bool) {
        let _ = self.mutate(|s| {
            s.collections.entry(resource).or_default().installed = installed;
            if !installed {
                s.cut += 1;
            }
            Ok(())
        });
    }

    /// RBAC: lists and watches of `resource` answer `403 Forbidden` (open watches are cut).
    pub fn set_forbidden(&self, resource: Resource, forbidden: bool) {
        let _ = self.mutate(|s| {
            s.collections.entry(resource).or_default().forbidden = forbidden;
            if forbidden {
                s.cut += 1;
            }
            Ok(())
        });
    }

    /// Answers GET `path` (a pod proxy path) with `text`, as the proxied container would.
    pub fn set_proxied(&self, path: &str, text: &str) {
        let _ = self.mutate(|s| {
            s.proxied.insert(path.to_owned(), text.to_owned());
            Ok(())
        });
    }

    /// Unreachable: every connection is reset as soon as it is accepted, open watches too.
    pub fn set_unreachable(&self, unreachable: bool) {
        let _ = self.mutate(|s| {
            s.unreachable = unreachable;
            if unreachable {
                s.cut += 1;
            }
            Ok(())
        });
    }

    /// Requests seen so far (`GET <path>?<query>`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// How many list (not watch) requests of `resource` were served or refused.
    pub fn list_count(&self, resource: Resource) -> usize {
        let bare = format!("GET {}", resource.path());
        self.requests()
            .iter()
            .filter(|r| match r.split_once('?') {
                Some((head, query)) => head == bare && !is_watch_query(query),
                None => **r == bare,
            })
            .count()
    }

    /// Number of watch streams open now.
    pub fn open_watches(&self) -> usize {
        self.shared.lock().open_watches
    }

    /// Waits until `f` holds for the double's state (for test synchronisation).
    pub fn wait_for(&self, what: &str, timeout: Duration, f: impl Fn(&Self) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !f(self) {
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for ApiServerDouble {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn enter_netns(name: &str) -> Result<()> {
    let path = Path::new("/run/netns").join(name);
    let f = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: setns on a valid netns fd; it changes only this thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

/// Runs `f` on a thread inside network namespace `netns` (`/run/netns/<name>`).
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let name = netns.to_owned();
    std::thread::spawn(move || {
        enter_netns(&name)?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in {netns:?} panicked"))?
}

/// `GET path` on `addr` from inside `netns`: (status code, body). HTTP/1.0, so the server closes.
pub fn http_get_in_netns(netns: &str, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let path = path.to_owned();
    in_netns(netns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut out = String::new();
        std::io::Read::read_to_string(&mut s, &mut out)?;
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no status line")?;
        let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        Ok((code, body.to_owned()))
    })
}

fn timestamp() -> String {
    // RFC 3339 in UTC, seconds precision, as the API server writes it.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86400;
    let rem = secs % 86400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let shared = shared.clone();
                conns.push(std::thread::spawn(move || {
                    let _ = handle(stream, &shared);
                }));
                conns.retain(|c| !c.is_finished());
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    for c in conns {
        let _ = c.join();
    }
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn is_watch_query(query: &str) -> bool {
    matches!(query_param(query, "watch"), Some("1" | "true"))
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        _ => "Error",
    }
}

fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = serde_json::to_vec(body)?;
    write!(
        stream,
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason_phrase(code),
        body.len()
    )?;
    stream.write_all(&body)?;
    stream.flush()
}

fn respond_text(stream: &mut TcpStream, body: &str) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

/// Resets the connection (RST, not FIN): SO_LINGER with a zero timeout, then close.
fn reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an owned socket with a properly sized linger struct.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

fn handle(mut stream: TcpStream, shared: &Shared) -> Result<()> {
    if shared.lock().unreachable {
        reset(stream);
        return Ok(());
    }
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    // Headers: none matter (no request bodies on GET).
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query.trim_start_matches('&').to_owned();
    shared.lock().requests.push(if query.is_empty() {
        format!("{method} {path}")
    } else {
        format!("{method} {path}?{query}")
    });
    if method != "GET" {
        return Ok(respond(
            &mut stream,
            405,
            &status(405, "MethodNotAllowed", "the double only serves GET"),
        )?);
    }
    let proxied = shared.lock().proxied.get(path).cloned();
    if let Some(text) = proxied {
        return Ok(respond_text(&mut stream, &text)?);
    }
    let from_crd = |r: &(Resource, Option<String>)| r.0 == Resource::ClusterNetworkPolicies;
    let installed = |r: &(Resource, Option<String>)| {
        !from_crd(r)
            || shared
                .lock()
                .collections
                .get(&r.0)
                .is_some_and(|c| c.installed)
    };
    let Some((resource, namespace)) = Resource::route(path).filter(installed) else {
        return Ok(respond(
            &mut stream,
            404,
            &status(
                404,
                "NotFound",
                &format!("the server could not find {path}"),
            ),
        )?);
    };
    let watch = is_watch_query(&query);
    if shared
        .lock()
        .collections
        .get(&resource)
        .is_some_and(|c| c.forbidden)
    {
        let verb = if watch { "watch" } else { "list" };
        return Ok(respond(
            &mut stream,
            403,
            &status(
                403,
                "Forbidden",
                &format!(
                    "{} is forbidden: User \"system:serviceaccount:netpol-system:netpol-agent\" cannot {verb} resource \"{}\" in API group \"{}\" at the cluster scope",
                    resource.plural(),
                    resource.plural(),
                    resource.group()
                ),
            ),
        )?);
    }
    let selector = match query_param(&query, "labelSelector").map(parse_label_selector) {
        None => None,
        Some(Ok(sel)) => Some(sel),
        Some(Err(e)) => {
            return Ok(respond(&mut stream, 400, &status(400, "BadRequest", &e))?);
        }
    };
    if watch && (namespace.is_some() || selector.is_some()) {
        return Ok(respond(
            &mut stream,
            400,
            &status(
                400,
                "BadRequest",
                "the double watches whole collections only (no namespace, no labelSelector)",
            ),
        )?);
    }
    if watch {
        serve_watch(stream, shared, resource, &query)
    } else {
        let filter = ListFilter {
            namespace,
            selector: selector.unwrap_or_default(),
        };
        serve_list(&mut stream, shared, resource, &query, &filter)
    }
}

/// One requirement of an equality-based label selector.
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    DoesNotExist(String),
}

/// What a list keeps: objects of one namespace (a namespaced path), matching a `labelSelector`.
struct ListFilter {
    namespace: Option<String>,
    selector: Vec<LabelRequirement>,
}

impl ListFilter {
    fn keeps(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        if let Some(ns) = &self.namespace
            && meta["namespace"].as_str() != Some(ns.as_str())
        {
            return false;
        }
        let label = |k: &str| meta["labels"][k].as_str();
        self.selector.iter().all(|r| match r {
            LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::DoesNotExist(k) => label(k).is_none(),
        })
    }
}

/// Parses an equality-based `labelSelector` (URL-encoded): `k=v`, `k==v`, `k!=v`, `k`, `!k`,
/// comma-separated. Set-based requirements (`in`, `notin`) are refused.
fn parse_label_selector(raw: &str) -> std::result::Result<Vec<LabelRequirement>, String> {
    let decoded = percent_decode(raw);
    let mut out = Vec::new();
    for part in decoded.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let req = if let Some((k, v)) = part.split_once("!=") {
            LabelRequirement::NotEquals(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            LabelRequirement::Equals(k.trim().into(), v.trim().into())
        } else if let Some(k) = part.strip_prefix('!') {
            LabelRequirement::DoesNotExist(k.trim().into())
        } else if part.contains(' ') || part.contains('(') {
            return Err(format!(
                "the double takes equality-based label selectors only: {part:?}"
            ));
        } else {
            LabelRequirement::Exists(part.into())
        };
        out.push(req);
    }
    Ok(out)
}

/// `%XX` escapes and `+` (a space in form encoding) decoded.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve_list(
    stream: &mut TcpStream,
    shared: &Shared,
    resource: Resource,
    query: &str,
    filter: &ListFilter,
) -> Result<()> {
    let limit = query_param(query, "limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    // The continue token is the last key served ("namespace/name"); the next page starts after it.
    let after = query_param(query, "continue")
        .map(percent_decode)
        .and_then(|c| {
            c.split_once('/')
                .map(|(ns, n)| (ns.to_owned(), n.to_owned()))
        });
    let s = shared.lock();
    let version = s.version;
    // Only the page's objects are cloned (with one more to tell whether a page follows): cloning
    // the whole collection for every page made a paginated list quadratic in the cluster's size.
    let start = after.map_or(Bound::Unbounded, Bound::Excluded);
    let mut page: Vec<(Key, Value)> = s
        .collections
        .get(&resource)
        .map(|c| {
            c.objects
                .range((start, Bound::Unbounded))
                .filter(|(_, o)| filter.keeps(o))
                .take(limit.map_or(usize::MAX, |l| l + 1))
                .map(|(k, o)| (k.clone(), o.clone()))
                .collect()
        })
        .unwrap_or_default();
    drop(s);
    let more = limit.is_some_and(|l| page.len() > l);
    if let Some(l) = limit {
        page.truncate(l);
    }
    let last = page.last().map(|((ns, n), _)| format!("{ns}/{n}"));
    let mut page: Vec<Value> = page.into_iter().map(|(_, o)| o).collect();
    for o in &mut page {
        // List items carry no type fields in the real API.
        if let Some(m) = o.as_object_mut() {
            m.remove("kind");
            m.remove("apiVersion");
        }
    }
    let mut metadata = json!({"resourceVersion": version.to_string()});
    if more && let Some(last) = last {
        metadata["continue"] = json!(last);
    }
    let body = json!({
        "kind": format!("{}List", resource.kind()),
        "apiVersion": resource.api_version(),
        "metadata": metadata,
        "items": page,
    });
    respond(stream, 200, &body)?;
    Ok(())
}

fn write_chunk(stream: &mut TcpStream, event: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(event)?;
    line.push(b'\n');
    write!(stream, "{:x}\r\n", line.len())?;
    stream.write_all(&line)?;
    stream.write_all(b"\r\n")?;
    stream.flush()
}

fn typed(resource: Resource, mut object: Value) -> Value {
    if let Some(m) = object.as_object_mut() {
        m.insert("kind".into(), json!(resource.kind()));
        m.insert("apiVersion".into(), json!(resource.api_version()));
    }
    object
}

struct WatchGuard<'a>(&'a Shared);

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().open_watches -= 1;
    }
}

fn serve_watch(
    mut stream: TcpStream,
    shared: &Shared,
    resource: Resource,
    query: &str,
) -> Result<()> {
    let bookmarks = matches!(
        query_param(query, "allowWatchBookmarks"),
        Some("true" | "1")
    );
    let timeout = query_param(query, "timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let from = query_param(query, "resourceVersion").unwrap_or("");
    stream.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )?;
    let started = Instant::now();
    let mut s = shared.lock();
    s.open_watches += 1;
    let _guard = WatchGuard(shared);
    let (cut, expire) = (s.cut, s.expire);
    let c = s.collections.entry(resource).or_default();
    let mut pending: Vec<Value> = Vec::new();
    let mut seen = match from {
        "" | "0" => {
            pending.extend(
                c.objects
                    .values()
                    .map(|o| json!({"type": "ADDED", "object": typed(resource, o.clone())})),
            );
            s.version
        }
        v => {
            let Ok(v) = v.parse::<u64>() else {
                drop(s);
                write_chunk(
                    &mut stream,
                    &json!({"type": "ERROR", "object": status(400, "BadRequest", "bad resourceVersion")}),
                )?;
                stream.write_all(b"0\r\n\r\n")?;
                return Ok(());
            };
            if v < c.compacted {
                drop(s);
                write_chunk(
                    &mut stream,
                    &json!({"type": "ERROR", "object": status(410, "Expired",
                        &format!("too old resource version: {v} ({})", v + 1))}),
                )?;
                stream.write_all(b"0\r\n\r\n")?;
                return Ok(());
            }
            v
        }
    };
    let mut last_bookmark = Instant::now();
    loop {
        let c = s.collections.entry(resource).or_default();
        let from = seen;
        for (v, kind, object) in c.events.iter().filter(|(v, _, _)| *v > from) {
            pending.push(json!({"type": kind, "object": typed(resource, object.clone())}));
            seen = *v;
        }
        let version = s.version;
        let stop = shared.stop.load(Ordering::SeqCst);
        let (cut_now, expire_now) = (s.cut != cut, s.expire != expire);
        drop(s);
        if cut_now || stop {
            // Abrupt: the start of a chunk that never completes, then the connection goes.
            let _ = stream.write_all(b"40\r\n{\"type\":\"MODIF");
            let _ = stream.flush();
            let _ = stream.shutdown(Shutdown::Both);
            return Ok(());
        }
        for e in pending.drain(..) {
            write_chunk(&mut stream, &e)?;
        }
        if expire_now {
            write_chunk(
                &mut stream,
                &json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")}),
            )?;
            stream.write_all(b"0\r\n\r\n")?;
            return Ok(());
        }
        if started.elapsed() >= timeout {
            stream.write_all(b"0\r\n\r\n")?;
            return Ok(());
        }
        if bookmarks && last_bookmark.elapsed() >= shared.bookmark_interval {
            write_chunk(
                &mut stream,
                &json!({"type": "BOOKMARK", "object": {"kind": resource.kind(),
                    "apiVersion": resource.api_version(),
                    "metadata": {"resourceVersion": version.to_string()}}}),
            )?;
            last_bookmark = Instant::now();
        }
        s = shared.lock();
        let (guard, _) = shared
            .changed
            .wait_timeout(s, Duration::from_millis(100))
            .unwrap_or_else(|e| e.into_inner());
        s = guard;
    }
}

/// Objects of the simulated cluster (`objects.yaml` of its manifest dir) loaded into `double`.
pub fn load_manifest_file(double: &ApiServerDouble, path: &Path) -> Result<usize> {
    let yaml = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    double.apply_yaml(&yaml)
}

/// A generated cluster for memory and scale measurements: `namespaces` namespaces, `pods` pods
/// (spread over `nodes` nodes named `node-<i>`, each with labels `app`, `tier`, `pod-template-hash`,
/// two named ports, an IPv4 and an IPv6 address), and `policies` NetworkPolicies of the usual
/// shapes (pod selector + namespace selector peers, named and numeric ports, an ipBlock).
pub fn generated_cluster(
    namespaces: usize,
    pods: usize,
    policies: usize,
    nodes: usize,
) -> Vec<Value> {
    let mut out = Vec::with_capacity(namespaces + pods + policies);
    for n in 0..namespaces {
        out.push(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("ns-{n}"), "labels": {"team": format!("team-{}", n % 10), "env": if n % 2 == 0 { "prod" } else { "dev" }}}}));
    }
    for p in 0..pods {
        let ns = p % namespaces.max(1);
        let app = p % 50;
        let node = p % nodes.max(1);
        let v4 = format!("10.{}.{}.{}", 42 + (p >> 16), (p >> 8) & 0xff, p & 0xff);
        let v6 = format!("fd00:10:42::{:x}", p);
        // Enough of a real pod (what the API server returns) that decoding costs what it would.
        out.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("app-{app}-{p:06x}"), "namespace": format!("ns-{ns}"),
                "labels": {"app": format!("app-{app}"), "tier": if app % 3 == 0 { "frontend" } else { "backend" }, "pod-template-hash": format!("{:010x}", p * 7919)},
                "annotations": {"kubectl.kubernetes.io/restartedAt": "2024-01-01T00:00:00Z"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("app-{app}-rs"), "uid": "00000000-0000-4000-8000-000000000001", "controller": true}],
                "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}, "f:tier": {}}}, "f:spec": {"f:containers": {}}}}]},
            "spec": {"nodeName": format!("node-{node}"), "serviceAccountName": "default",
                "containers": [{"name": "main", "image": format!("registry.example/app-{app}:1.0"),
                    "args": ["--port=8080", "--metrics=9090"],
                    "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                              {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]}]},
            "status": {"phase": "Running", "hostIP": format!("192.0.2.{}", node % 250 + 1),
                "podIP": v4, "podIPs": [{"ip": v4}, {"ip": v6}],
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2024-01-01T00:00:00Z"}],
                "containerStatuses": [{"name": "main", "ready": true, "restartCount": 0, "image": format!("registry.example/app-{app}:1.0"),
                    "imageID": "sha256:0000000000000000000000000000000000000000000000000000000000000000",
                    "containerID": "containerd://0000000000000000000000000000000000000000000000000000000000000000",
                    "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}}}]}}));
    }
    for i in 0..policies {
        let ns = i % namespaces.max(1);
        let app = i % 50;
        let policy = match i % 4 {
            0 => json!({"podSelector": {"matchLabels": {"app": format!("app-{app}")}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("app-{}", (app + 1) % 50)}}}],
                             "ports": [{"port": "http", "protocol": "TCP"}]}]}),
            1 => json!({"podSelector": {"matchLabels": {"tier": "backend"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("team-{}", i % 10)}},
                                       "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["frontend"]}]}}],
                             "ports": [{"port": 8080, "protocol": "TCP"}, {"port": 9000, "endPort": 9010, "protocol": "TCP"}]}]}),
            2 => {
                json!({"podSelector": {"matchLabels": {"app": format!("app-{app}")}}, "policyTypes": ["Egress"],
                "egress": [{"to": [{"ipBlock": {"cidr": format!("172.{}.0.0/16", 16 + i % 16), "except": [format!("172.{}.1.0/24", 16 + i % 16)]}}]},
                           {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "dns"}}}], "ports": [{"port": 53, "protocol": "UDP"}]}]})
            }
            _ => {
                json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}}]}]})
            }
        };
        out.push(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("policy-{i}"), "namespace": format!("ns-{ns}")}, "spec": policy}));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19723), (2024, 1, 1));
        let t = timestamp();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.ends_with('Z'));
    }
}
