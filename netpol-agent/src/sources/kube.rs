//! The Kubernetes API source: Namespaces, Pods, NetworkPolicies, Services, EndpointSlices and
//! ClusterNetworkPolicies (`policy.networking.k8s.io/v1alpha2`, when the CRD is installed)
//! (`discovery.k8s.io/v1`) of the whole cluster, watched with kube-runtime watchers and published as
//! [`ClusterState`] snapshots, like the manifest directory. Services and EndpointSlices give the
//! compiler the ClusterIP frontends and their backends, so that egress through a Service (kube-dns
//! at `10.43.0.10`, say) is decided against the backends (see `docs/services.md`).
//!
//! Memory: every watch event is converted at once into the model ([`Namespace`], [`Pod`],
//! [`Policy`], [`service::Service`], [`service::EndpointSlice`]), which keeps only what the compiler
//! uses (labels, addresses, node name, named ports, phase, the policy spec, cluster IPs and ports,
//! ready endpoint addresses); the API objects themselves (managed fields, container specs,
//! conditions, endpoint topology) are dropped as soon as they are converted. No reflector store of
//! full objects is kept.
//!
//! Start-up: nothing is published (`state: None`) until each of the six watches has listed once
//! (ClusterNetworkPolicies count as listed, empty, when their CRD is not installed).
//! A relist (after `410 Gone` or any failed watch) is buffered and replaces the kind's objects only
//! when complete, so objects deleted while the watch was down disappear, and the last good state
//! stays in force while the relist is under way or failing.
//!
//! Faults (API server unreachable, connection reset, RBAC forbidden) are retried with kube-runtime's
//! default backoff (0.8 s doubling to 30 s, with jitter). A failing kind is named in
//! [`Snapshot::problem`] until it recovers: the next event of that kind or a successful probe (a
//! one-item list, retried with the same kind of backoff) clears it.
//!
//! Pod addresses: a pod address can be reused by a new pod while the old pod object still exists
//! (terminating, or its deletion not yet seen). Two pods never hold one address at once in the
//! published state: the newer claim (later `creationTimestamp`, then later seen) keeps it, and the
//! other pod loses that address, so a reused address never carries the old pod's labels.

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::{Stream, StreamExt as _, stream::FuturesUnordered};
use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery, networking::v1 as networking},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use kube::{
    Api, Client, Config,
    api::{ListParams, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::watch;

use crate::{
    model::cluster_policy::{self, ClusterNetworkPolicyObject, ClusterPolicy},
    model::service,
    model::{
        ClusterState, ConvertError, Namespace, ObjectRef, Origin, Pod, PodKey, Policy, SourceError,
    },
    sources::Snapshot,
};

/// Changes are coalesced this long before a snapshot is published: a rollout changes many pods at
/// once, and every snapshot costs a copy of the state and a recompile.
const COALESCE: Duration = Duration::from_millis(50);
/// A probe of a failing kind gives up after this long.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// First and last delay between probes of a failing kind (doubling in between).
const PROBE_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// The client for `kubeconfig`, or kube's inference (in-cluster service account, then `KUBECONFIG`,
/// then `~/.kube/config`) when it is `None`.
pub async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        None => Config::infer().await.context(
            "no Kubernetes API configuration: not in a pod with a service account, no KUBECONFIG, no ~/.kube/config (or pass --kubeconfig, or --manifests)",
        )?,
    };
    Client::try_from(config).context("creating the Kubernetes API client")
}

/// Starts watching the cluster through `client`; snapshots arrive on the returned channel.
pub fn spawn(client: Client) -> watch::Receiver<Snapshot> {
    let (tx, rx) = watch::channel(Snapshot {
        state: None,
        problem: None,
        seen_at: Instant::now(),
    });
    tokio::spawn(run(client, tx));
    rx
}

/// The kinds the source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Namespaces,
    Pods,
    NetworkPolicies,
    Services,
    EndpointSlices,
    ClusterNetworkPolicies,
}

/// How many kinds the source watches.
const KINDS: usize = 6;

impl Kind {
    const ALL: [Kind; KINDS] = [
        Kind::Namespaces,
        Kind::Pods,
        Kind::NetworkPolicies,
        Kind::Services,
        Kind::EndpointSlices,
        Kind::ClusterNetworkPolicies,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Namespaces => "namespaces",
            Kind::Pods => "pods",
            Kind::NetworkPolicies => "networkpolicies",
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices",
            Kind::ClusterNetworkPolicies => "clusternetworkpolicies",
        })
    }
}

/// One item of the merged watch streams.
enum Update {
    Namespace(watcher::Result<watcher::Event<core::Namespace>>),
    Pod(Box<watcher::Result<watcher::Event<core::Pod>>>),
    Policy(watcher::Result<watcher::Event<networking::NetworkPolicy>>),
    Service(Box<watcher::Result<watcher::Event<core::Service>>>),
    EndpointSlice(Box<watcher::Result<watcher::Event<discovery::EndpointSlice>>>),
    ClusterPolicy(Box<watcher::Result<watcher::Event<ClusterNetworkPolicyObject>>>),
}

/// ClusterNetworkPolicy as a kube resource (no crate publishes its Rust types).
impl kube::Resource for ClusterNetworkPolicyObject {
    type DynamicType = ();
    type Scope = kube::core::ClusterResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        cluster_policy::KIND.into()
    }

    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "policy.networking.k8s.io".into()
    }

    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1alpha2".into()
    }

    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "clusternetworkpolicies".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

type Updates = Pin<Box<dyn Stream<Item = Update> + Send>>;

fn watch_all(client: &Client) -> Updates {
    let config = watcher::Config::default();
    let namespaces = watcher(Api::<core::Namespace>::all(client.clone()), config.clone())
        .default_backoff()
        .map(Update::Namespace);
    let pods = watcher(Api::<core::Pod>::all(client.clone()), config.clone())
        .default_backoff()
        .map(|u| Update::Pod(Box::new(u)));
    let policies = watcher(
        Api::<networking::NetworkPolicy>::all(client.clone()),
        config.clone(),
    )
    .default_backoff()
    .map(Update::Policy);
    let services = watcher(Api::<core::Service>::all(client.clone()), config.clone())
        .default_backoff()
        .map(|u| Update::Service(Box::new(u)));
    let slices = watcher(
        Api::<discovery::EndpointSlice>::all(client.clone()),
        config.clone(),
    )
    .default_backoff()
    .map(|u| Update::EndpointSlice(Box::new(u)));
    let cluster_policies = watcher(
        Api::<ClusterNetworkPolicyObject>::all(client.clone()),
        config,
    )
    .default_backoff()
    .map(|u| Update::ClusterPolicy(Box::new(u)));
    Box::pin(futures::stream::select_all([
        namespaces.boxed(),
        pods.boxed(),
        policies.boxed(),
        services.boxed(),
        slices.boxed(),
        cluster_policies.boxed(),
    ]))
}

/// A one-item list of `kind`: does the API answer us for it now?
async fn probe(client: Client, kind: Kind) -> (Kind, Result<(), String>) {
    let call = async {
        match kind {
            Kind::Namespaces => list_and_watch(Api::<core::Namespace>::all(client)).await,
            Kind::Pods => list_and_watch(Api::<core::Pod>::all(client)).await,
            Kind::NetworkPolicies => {
                list_and_watch(Api::<networking::NetworkPolicy>::all(client)).await
            }
            Kind::Services => list_and_watch(Api::<core::Service>::all(client)).await,
            Kind::EndpointSlices => {
                list_and_watch(Api::<discovery::EndpointSlice>::all(client)).await
            }
            Kind::ClusterNetworkPolicies => {
                list_and_watch(Api::<ClusterNetworkPolicyObject>::all(client)).await
            }
        }
    };
    let result = match tokio::time::timeout(PROBE_TIMEOUT, call).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(describe_client_error(&e)),
        Err(_) => Err("no answer from the API server".to_owned()),
    };
    (kind, result)
}

/// The two verbs the watcher needs: a one-item list, then a watch from its resourceVersion that is
/// dropped as soon as the API server accepts it.
async fn list_and_watch<K>(api: Api<K>) -> kube::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + fmt::Debug,
{
    let list = api.list_metadata(&ListParams::default().limit(1)).await?;
    let version = list.metadata.resource_version.unwrap_or_default();
    api.watch_metadata(&WatchParams::default().timeout(1), &version)
        .await
        .map(drop)
}

type Probe = Pin<Box<dyn Future<Output = (Kind, Result<(), String>)> + Send>>;

async fn run(client: Client, tx: watch::Sender<Snapshot>) {
    let mut updates = watch_all(&client);
    let mut store = Store::default();
    let mut health: [KindHealth; KINDS] = Default::default();
    let mut probes: FuturesUnordered<Probe> = FuturesUnordered::new();
    let mut publish_at: Option<tokio::time::Instant> = None;
    let mut first_seen: Option<Instant> = None;
    let mut published_problem: Option<String> = None;
    loop {
        let next_probe = health
            .iter()
            .filter(|h| !h.probing)
            .filter_map(|h| h.probe_at)
            .min();
        tokio::select! {
            update = updates.next() => {
                let Some(update) = update else { break };
                let now = Instant::now();
                let (kind, outcome) = store.apply(update);
                let h = &mut health[kind.index()];
                match outcome {
                    Outcome::Progress { changed } => {
                        h.recovered();
                        if changed {
                            first_seen.get_or_insert(now);
                            publish_at.get_or_insert_with(|| tokio::time::Instant::now() + COALESCE);
                        }
                    }
                    Outcome::Restarted => {}
                    Outcome::Transient(what) => tracing::info!(%kind, "{what}"),
                    Outcome::Failed(problem) => h.failed(problem),
                }
            }
            Some((kind, result)) = probes.next(), if !probes.is_empty() => {
                let h = &mut health[kind.index()];
                h.probing = false;
                match result {
                    Ok(()) => h.recovered(),
                    Err(problem) => h.failed(problem),
                }
            }
            _ = sleep_until_opt(next_probe) => {
                let now = tokio::time::Instant::now();
                for kind in Kind::ALL {
                    let h = &mut health[kind.index()];
                    if !h.probing && h.probe_at.is_some_and(|t| t <= now) {
                        h.probing = true;
                        probes.push(Box::pin(probe(client.clone(), kind)));
                    }
                }
            }
            _ = sleep_until_opt(publish_at) => {
                publish_at = None;
            }
        }
        let problem = combined_problem(&health);
        let due = publish_at.is_none() && first_seen.is_some();
        let synced = store.synced();
        if (due && synced) || problem != published_problem {
            let (state, seen_at) = if due && synced {
                (
                    Some(Arc::new(store.cluster_state())),
                    first_seen.take().unwrap_or_else(Instant::now),
                )
            } else {
                (tx.borrow().state.clone(), Instant::now())
            };
            published_problem = problem.clone();
            let snapshot = Snapshot {
                state,
                problem,
                seen_at,
            };
            if tx.send(snapshot).is_err() {
                break;
            }
        }
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether one kind's watch is working, and when to probe it if not.
#[derive(Default)]
struct KindHealth {
    problem: Option<String>,
    probe_at: Option<tokio::time::Instant>,
    probe_delay: Duration,
    probing: bool,
}

impl KindHealth {
    fn failed(&mut self, problem: String) {
        self.probe_delay = if self.problem.is_none() {
            PROBE_BACKOFF.0
        } else {
            (self.probe_delay * 2).clamp(PROBE_BACKOFF.0, PROBE_BACKOFF.1)
        };
        self.probe_at = Some(tokio::time::Instant::now() + self.probe_delay);
        self.problem = Some(problem);
    }

    fn recovered(&mut self) {
        self.problem = None;
        self.probe_at = None;
    }
}

fn combined_problem(health: &[KindHealth; KINDS]) -> Option<String> {
    let parts: Vec<String> = Kind::ALL
        .iter()
        .filter_map(|k| {
            health[k.index()]
                .problem
                .as_ref()
                .map(|p| format!("{k}: {p}"))
        })
        .collect();
    (!parts.is_empty()).then(|| {
        format!(
            "Kubernetes API: {} (retrying; the last good state stays enforced)",
            parts.join("; ")
        )
    })
}

/// What one watch item meant.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// The watch works; `changed` when the kind's objects changed.
    Progress { changed: bool },
    /// A (re)list started: nothing is known yet.
    Restarted,
    /// A recoverable hiccup worth a log line but not a problem (watch expired, stream cut).
    Transient(String),
    /// The API cannot be used for this kind at the moment.
    Failed(String),
}

/// Describes an API error for people: what failed and what to do.
fn describe_client_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(r) if r.code == 403 => format!(
            "forbidden (403): {} (the agent's ClusterRole needs get, list and watch on it)",
            r.message
        ),
        kube::Error::Api(r) if r.code == 401 => {
            format!("unauthorized (401): {} (check the credentials)", r.message)
        }
        kube::Error::Api(r) => {
            format!("API server answered {} {}: {}", r.code, r.reason, r.message)
        }
        other => format!("cannot reach the API server: {}", error_chain(other)),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        source = cause.source();
    }
    s
}

fn classify(kind: Kind, e: &watcher::Error) -> Outcome {
    match e {
        watcher::Error::WatchError(r) if r.code == 410 => {
            Outcome::Transient(format!("watch of {kind} expired (410 Gone): relisting"))
        }
        watcher::Error::WatchError(r) if r.code == 403 => {
            Outcome::Failed(describe_client_error(&kube::Error::Api(r.clone())))
        }
        watcher::Error::WatchError(r) => Outcome::Transient(format!(
            "watch of {kind} reported {} {}: {}",
            r.code, r.reason, r.message
        )),
        // A watch request the API server refused: its Status arrives as the stream's first item.
        watcher::Error::WatchFailed(e @ kube::Error::Api(r)) if matches!(r.code, 401 | 403) => {
            Outcome::Failed(describe_client_error(e))
        }
        watcher::Error::WatchFailed(e) => Outcome::Transient(format!(
            "watch of {kind} interrupted ({}): resuming",
            error_chain(e)
        )),
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) => {
            Outcome::Failed(describe_client_error(e))
        }
        watcher::Error::NoResourceVersion => {
            Outcome::Failed("the API server sent an object without resourceVersion".to_owned())
        }
    }
}

/// A pod with what is needed to settle address conflicts.
#[derive(Clone, Debug)]
struct PodEntry {
    pod: Arc<Pod>,
    created: Option<Time>,
    /// Order in which the source saw the pod claim its current addresses.
    claimed: u64,
}

/// A converted object, or why it could not be.
type Entry<V> = Result<V, Box<SourceError>>;

/// The objects of one kind: converted objects (or why one could not be), plus the buffer of a
/// relist in progress.
struct Objects<V> {
    live: BTreeMap<PodKey, Entry<V>>,
    relist: Option<BTreeMap<PodKey, Entry<V>>>,
    synced: bool,
}

impl<V> Default for Objects<V> {
    fn default() -> Self {
        Objects {
            live: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }
}

/// The source's view of the cluster.
#[derive(Default)]
struct Store {
    namespaces: Objects<Namespace>,
    pods: Objects<PodEntry>,
    policies: Objects<Arc<Policy>>,
    services: Objects<service::Service>,
    endpoint_slices: Objects<service::EndpointSlice>,
    cluster_policies: Objects<ClusterPolicy>,
    claims: u64,
}

fn key_of(meta: &ObjectMeta, namespaced: bool) -> PodKey {
    PodKey::new(
        if namespaced {
            meta.namespace.clone().unwrap_or_default()
        } else {
            String::new()
        },
        meta.name.clone().unwrap_or_default(),
    )
}

fn source_error(kind: &str, key: &PodKey, e: ConvertError) -> Box<SourceError> {
    Box::new(SourceError {
        origin: Origin::Api,
        object: Some(ObjectRef {
            kind: Some(kind.to_owned()),
            namespace: (!key.namespace.is_empty()).then(|| key.namespace.clone()),
            name: Some(key.name.clone()),
        }),
        field: Some(e.field),
        reason: e.reason,
    })
}

/// Applies one watcher event to `objects`; `convert` turns an API object into the model, given the
/// previous entry of the same key. Returns whether the live objects changed.
fn apply_event<K, V>(
    objects: &mut Objects<V>,
    event: watcher::Event<K>,
    key: impl Fn(&K) -> PodKey,
    mut convert: impl FnMut(&K, Option<&Entry<V>>) -> Entry<V>,
    same: impl Fn(&Entry<V>, &Entry<V>) -> bool,
) -> Outcome {
    match event {
        watcher::Event::Init => {
            objects.relist = Some(BTreeMap::new());
            Outcome::Restarted
        }
        watcher::Event::InitApply(obj) => {
            let k = key(&obj);
            let previous = objects.live.get(&k);
            let v = convert(&obj, previous);
            objects.relist.get_or_insert_default().insert(k, v);
            Outcome::Progress { changed: false }
        }
        watcher::Event::InitDone => {
            let fresh = objects.relist.take().unwrap_or_default();
            let changed = !objects.synced
                || fresh.len() != objects.live.len()
                || fresh
                    .iter()
                    .zip(&objects.live)
                    .any(|((ka, a), (kb, b))| ka != kb || !same(a, b));
            objects.live = fresh;
            objects.synced = true;
            Outcome::Progress { changed }
        }
        watcher::Event::Apply(obj) => {
            let k = key(&obj);
            let v = convert(&obj, objects.live.get(&k));
            let changed = objects.live.get(&k).is_none_or(|old| !same(old, &v));
            objects.live.insert(k, v);
            Outcome::Progress { changed }
        }
        watcher::Event::Delete(obj) => {
            let changed = objects.live.remove(&key(&obj)).is_some();
            Outcome::Progress { changed }
        }
    }
}

fn same_value<V: PartialEq>(a: &Entry<V>, b: &Entry<V>) -> bool {
    a == b
}

fn same_pod(a: &Entry<PodEntry>, b: &Entry<PodEntry>) -> bool {
    match (a, b) {
        (Ok(a), Ok(b)) => a.pod == b.pod && a.created == b.created,
        (Err(a), Err(b)) => a == b,
        _ => false,
    }
}

impl Store {
    fn synced(&self) -> bool {
        self.namespaces.synced
            && self.pods.synced
            && self.policies.synced
            && self.services.synced
            && self.endpoint_slices.synced
            && self.cluster_policies.synced
    }

    fn apply(&mut self, update: Update) -> (Kind, Outcome) {
        match update {
            Update::Namespace(Err(e)) => (Kind::Namespaces, classify(Kind::Namespaces, &e)),
            Update::Pod(update) => match *update {
                Err(e) => (Kind::Pods, classify(Kind::Pods, &e)),
                Ok(event) => self.apply_pod(event),
            },
            Update::Policy(Err(e)) => (Kind::NetworkPolicies, classify(Kind::NetworkPolicies, &e)),
            Update::Namespace(Ok(event)) => {
                let outcome = apply_event(
                    &mut self.namespaces,
                    event,
                    |ns: &core::Namespace| key_of(&ns.metadata, false),
                    |ns, _| {
                        Namespace::from_k8s(ns)
                            .map_err(|e| source_error("Namespace", &key_of(&ns.metadata, false), e))
                    },
                    same_value,
                );
                (Kind::Namespaces, outcome)
            }
            Update::Policy(Ok(event)) => {
                let outcome = apply_event(
                    &mut self.policies,
                    event,
                    |p: &networking::NetworkPolicy| key_of(&p.metadata, true),
                    |p, _| {
                        Policy::from_k8s(p, Origin::Api).map(Arc::new).map_err(|e| {
                            source_error("NetworkPolicy", &key_of(&p.metadata, true), e)
                        })
                    },
                    same_value,
                );
                (Kind::NetworkPolicies, outcome)
            }
            Update::Service(update) => match *update {
                Err(e) => (Kind::Services, classify(Kind::Services, &e)),
                Ok(event) => {
                    let outcome = apply_event(
                        &mut self.services,
                        event,
                        |s: &core::Service| key_of(&s.metadata, true),
                        |s, _| {
                            service::Service::from_k8s(s)
                                .map_err(|e| source_error("Service", &key_of(&s.metadata, true), e))
                        },
                        same_value,
                    );
                    (Kind::Services, outcome)
                }
            },
            Update::ClusterPolicy(update) => match *update {
                Err(e) => (
                    Kind::ClusterNetworkPolicies,
                    self.cluster_policies_failed(&e),
                ),
                Ok(event) => {
                    let outcome = apply_event(
                        &mut self.cluster_policies,
                        event,
                        |p: &ClusterNetworkPolicyObject| key_of(&p.metadata, false),
                        |p, _| {
                            ClusterPolicy::from_object(p, Origin::Api).map_err(|e| {
                                source_error(cluster_policy::KIND, &key_of(&p.metadata, false), e)
                            })
                        },
                        same_value,
                    );
                    (Kind::ClusterNetworkPolicies, outcome)
                }
            },
            Update::EndpointSlice(update) => match *update {
                Err(e) => (Kind::EndpointSlices, classify(Kind::EndpointSlices, &e)),
                Ok(event) => {
                    let outcome = apply_event(
                        &mut self.endpoint_slices,
                        event,
                        |s: &discovery::EndpointSlice| key_of(&s.metadata, true),
                        |s, _| {
                            service::EndpointSlice::from_k8s(s).map_err(|e| {
                                source_error("EndpointSlice", &key_of(&s.metadata, true), e)
                            })
                        },
                        same_value,
                    );
                    (Kind::EndpointSlices, outcome)
                }
            },
        }
    }

    /// A failed list or watch of ClusterNetworkPolicies. `404 Not Found` before any was seen means
    /// the CRD is not installed: there are none (the watcher keeps retrying, so installing it later
    /// works); after some were, it is a failure that keeps them;
    /// anything else is a failure like any kind's (its last good objects stay, and before a
    /// first list nothing is published: an admin guardrail the agent cannot read must not be
    /// taken as absent).
    fn cluster_policies_failed(&mut self, e: &watcher::Error) -> Outcome {
        let not_installed = matches!(
            e,
            watcher::Error::InitialListFailed(kube::Error::Api(r)) if r.code == 404
        );
        if !not_installed {
            return classify(Kind::ClusterNetworkPolicies, e);
        }
        let objects = &mut self.cluster_policies;
        // Some were listed: a 404 now is a CRD removed or no longer serving v1alpha2, or a custom
        // resource answering 404 while the API server restarts. Their guardrails stay.
        if objects.synced && !objects.live.is_empty() {
            return Outcome::Failed(format!(
                "the list answered 404 Not Found (the CRD removed, or v1alpha2 no longer served?): the last {} ClusterNetworkPolicies stay enforced",
                objects.live.len()
            ));
        }
        let changed = !objects.synced || !objects.live.is_empty();
        if changed {
            tracing::info!(
                "the ClusterNetworkPolicy CRD (policy.networking.k8s.io/v1alpha2) is not installed: no ClusterNetworkPolicies"
            );
        }
        objects.live.clear();
        objects.relist = None;
        objects.synced = true;
        Outcome::Progress { changed }
    }

    fn apply_pod(&mut self, event: watcher::Event<core::Pod>) -> (Kind, Outcome) {
        let claims = &mut self.claims;
        let outcome = apply_event(
            &mut self.pods,
            event,
            |p: &core::Pod| key_of(&p.metadata, true),
            |p, previous| {
                let pod = Pod::from_k8s(p)
                    .map_err(|e| source_error("Pod", &key_of(&p.metadata, true), e))?;
                // A pod keeps its place in the claim order while its addresses stay.
                let claimed = match previous {
                    Some(Ok(old)) if old.pod.ips == pod.ips => old.claimed,
                    _ => {
                        *claims += 1;
                        *claims
                    }
                };
                Ok(PodEntry {
                    pod: Arc::new(pod),
                    created: p.metadata.creation_timestamp.clone(),
                    claimed,
                })
            },
            same_pod,
        );
        (Kind::Pods, outcome)
    }

    /// The cluster state of the live objects, with every pod address held by one pod at most.
    fn cluster_state(&self) -> ClusterState {
        let mut state = ClusterState::default();
        for entry in self.namespaces.live.values() {
            match entry {
                Ok(ns) => {
                    state.namespaces.insert(ns.name.clone(), ns.clone());
                }
                Err(e) => state.errors.push((**e).clone()),
            }
        }
        for entry in self.policies.live.values() {
            match entry {
                Ok(p) => {
                    state.policies.insert(p.key.clone(), p.clone());
                }
                Err(e) => state.errors.push((**e).clone()),
            }
        }
        for entry in self.services.live.values() {
            match entry {
                Ok(s) => {
                    state.services.insert(s.key.clone(), s.clone());
                }
                Err(e) => state.errors.push((**e).clone()),
            }
        }
        for entry in self.endpoint_slices.live.values() {
            match entry {
                Ok(s) => {
                    state.endpoint_slices.insert(s.key.clone(), s.clone());
                }
                Err(e) => state.errors.push((**e).clone()),
            }
        }
        for (key, entry) in &self.cluster_policies.live {
            // One that cannot be read is enforced as its stand-in: it denies everything.
            let p = entry
                .clone()
                .unwrap_or_else(|_| ClusterPolicy::stand_in(&key.name, Origin::Api));
            if let Err(e) = entry {
                state.errors.push((**e).clone());
            }
            state.cluster_policies.insert(p.name.clone(), p);
        }
        // Address -> the pod holding it: the newest claim among pods that can be peers.
        let mut holder: BTreeMap<IpAddr, &PodEntry> = BTreeMap::new();
        for entry in self.pods.live.values() {
            let Ok(entry) = entry else { continue };
            if !entry.pod.is_policy_peer() {
                continue;
            }
            for ip in &entry.pod.ips {
                holder
                    .entry(*ip)
                    .and_modify(|h| {
                        if (&entry.created, entry.claimed) > (&h.created, h.claimed) {
                            *h = entry;
                        }
                    })
                    .or_insert(entry);
            }
        }
        let mut pods = Vec::with_capacity(self.pods.live.len());
        for entry in self.pods.live.values() {
            match entry {
                Ok(entry) => {
                    let mut pod = entry.pod.clone();
                    let holds = |ip: &IpAddr| holder.get(ip).is_some_and(|h| h.pod.key == pod.key);
                    if pod.is_policy_peer() && !pod.ips.iter().all(holds) {
                        // Copied only when an address went to a newer pod.
                        let kept = pod.ips.iter().copied().filter(holds).collect();
                        Arc::make_mut(&mut pod).ips = kept;
                        tracing::debug!(pod = %pod.key, "address reused by a newer pod: dropped from the older one");
                    }
                    pods.push((pod.key.clone(), pod));
                }
                Err(e) => state.errors.push((**e).clone()),
            }
        }
        // In key order already: built in bulk, with full nodes (one insert at a time leaves them
        // half empty).
        state.pods = pods.into_iter().collect();
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str, created: &str, app: &str) -> core::Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "labels": {"app": app},
                         "creationTimestamp": created, "resourceVersion": "1"},
            "spec": {"nodeName": "n", "containers": []},
            "status": {"phase": "Running", "podIP": ip},
        }))
        .unwrap()
    }

    fn holder_labels(state: &ClusterState, ip: &str) -> Vec<String> {
        let ip: IpAddr = ip.parse().unwrap();
        state
            .peer_pods()
            .filter(|p| p.ips.contains(&ip))
            .map(|p| p.labels["app"].clone())
            .collect()
    }

    fn pod_update(event: watcher::Event<core::Pod>) -> Update {
        Update::Pod(Box::new(Ok(event)))
    }

    fn synced_store() -> Store {
        let mut s = Store::default();
        for u in [
            Update::Namespace(Ok(watcher::Event::Init)),
            Update::Namespace(Ok(watcher::Event::InitDone)),
            pod_update(watcher::Event::Init),
            pod_update(watcher::Event::InitDone),
            Update::Policy(Ok(watcher::Event::Init)),
            Update::Policy(Ok(watcher::Event::InitDone)),
            Update::Service(Box::new(Ok(watcher::Event::Init))),
            Update::Service(Box::new(Ok(watcher::Event::InitDone))),
            Update::EndpointSlice(Box::new(Ok(watcher::Event::Init))),
            Update::EndpointSlice(Box::new(Ok(watcher::Event::InitDone))),
        ] {
            s.apply(u);
            assert!(!s.synced(), "synced before every kind listed once");
        }
        // No CRD: the kind lists as empty.
        s.apply(Update::ClusterPolicy(Box::new(Err(not_found()))));
        assert!(s.synced());
        s
    }

    fn not_found() -> watcher::Error {
        watcher::Error::InitialListFailed(kube::Error::Api(
            kube::core::Status::failure(
                "the server could not find the requested resource",
                "NotFound",
            )
            .with_code(404)
            .boxed(),
        ))
    }

    /// A 404 once ClusterNetworkPolicies were listed keeps them (and is a problem); before, it
    /// means none.
    #[test]
    fn a_404_after_cluster_policies_were_listed_keeps_them() {
        let mut s = synced_store();
        assert!(s.cluster_state().cluster_policies.is_empty());
        let cnp: ClusterNetworkPolicyObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2",
            "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "guard"},
            "spec": {"tier": "Admin", "priority": 1, "subject": {"namespaces": {}}},
        }))
        .unwrap();
        for e in [
            watcher::Event::Init,
            watcher::Event::InitApply(cnp),
            watcher::Event::InitDone,
        ] {
            s.apply(Update::ClusterPolicy(Box::new(Ok(e))));
        }
        assert_eq!(s.cluster_state().cluster_policies.len(), 1);
        let (kind, outcome) = s.apply(Update::ClusterPolicy(Box::new(Err(not_found()))));
        assert_eq!(kind, Kind::ClusterNetworkPolicies);
        assert!(matches!(outcome, Outcome::Failed(m) if m.contains("stay enforced")));
        assert_eq!(s.cluster_state().cluster_policies.len(), 1);
    }

    #[test]
    fn reused_address_goes_to_the_newer_pod_whatever_the_event_order() {
        let old = pod("old", "10.0.0.5", "2024-01-01T00:00:00Z", "old");
        let new = pod("zzz-new", "10.0.0.5", "2024-01-01T00:05:00Z", "new");
        // The new pod's add arrives before the old pod's delete.
        let mut s = synced_store();
        s.apply(pod_update(watcher::Event::Apply(old.clone())));
        assert_eq!(holder_labels(&s.cluster_state(), "10.0.0.5"), ["old"]);
        s.apply(pod_update(watcher::Event::Apply(new.clone())));
        assert_eq!(holder_labels(&s.cluster_state(), "10.0.0.5"), ["new"]);
        s.apply(pod_update(watcher::Event::Delete(old.clone())));
        assert_eq!(holder_labels(&s.cluster_state(), "10.0.0.5"), ["new"]);

        // A relist that returns both (the old one terminating) in name order: still the newer.
        let mut s = synced_store();
        for u in [
            watcher::Event::Init,
            watcher::Event::InitApply(new.clone()),
            watcher::Event::InitApply(old.clone()),
            watcher::Event::InitDone,
        ] {
            s.apply(pod_update(u));
        }
        assert_eq!(holder_labels(&s.cluster_state(), "10.0.0.5"), ["new"]);

        // Same creation second: the later claim wins.
        let a = pod("a", "10.0.0.6", "2024-01-01T00:00:00Z", "first");
        let b = pod("b", "10.0.0.6", "2024-01-01T00:00:00Z", "second");
        let mut s = synced_store();
        s.apply(pod_update(watcher::Event::Apply(b)));
        s.apply(pod_update(watcher::Event::Apply(a)));
        assert_eq!(holder_labels(&s.cluster_state(), "10.0.0.6"), ["first"]);
    }

    #[test]
    fn relist_replaces_and_drops_objects_deleted_meanwhile() {
        let mut s = synced_store();
        let a = pod("a", "10.0.0.1", "2024-01-01T00:00:00Z", "a");
        let b = pod("b", "10.0.0.2", "2024-01-01T00:00:00Z", "b");
        s.apply(pod_update(watcher::Event::Apply(a.clone())));
        s.apply(pod_update(watcher::Event::Apply(b.clone())));
        assert_eq!(s.cluster_state().pods.len(), 2);
        // While a relist is under way the live objects stay.
        assert_eq!(
            s.apply(pod_update(watcher::Event::Init)).1,
            Outcome::Restarted
        );
        s.apply(pod_update(watcher::Event::InitApply(b.clone())));
        assert_eq!(s.cluster_state().pods.len(), 2);
        let (_, done) = s.apply(pod_update(watcher::Event::InitDone));
        assert_eq!(done, Outcome::Progress { changed: true });
        let state = s.cluster_state();
        assert_eq!(
            state
                .pods
                .keys()
                .map(|k| k.name.as_str())
                .collect::<Vec<_>>(),
            ["b"]
        );
        // An identical relist changes nothing.
        s.apply(pod_update(watcher::Event::Init));
        s.apply(pod_update(watcher::Event::InitApply(b)));
        let (_, done) = s.apply(pod_update(watcher::Event::InitDone));
        assert_eq!(done, Outcome::Progress { changed: false });
    }

    #[test]
    fn status_only_updates_are_not_changes() {
        let mut s = synced_store();
        let a = pod("a", "10.0.0.1", "2024-01-01T00:00:00Z", "a");
        s.apply(pod_update(watcher::Event::Apply(a.clone())));
        let mut b = a.clone();
        b.metadata.resource_version = Some("2".into());
        b.status.as_mut().unwrap().conditions = Some(vec![]);
        let (_, o) = s.apply(pod_update(watcher::Event::Apply(b)));
        assert_eq!(o, Outcome::Progress { changed: false });
    }

    #[test]
    fn services_and_slices_reach_the_state_slim_and_bad_ones_are_errors() {
        let svc: core::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "resourceVersion": "1"},
            "spec": {"clusterIP": "10.43.0.10", "clusterIPs": ["10.43.0.10"],
                     "selector": {"k8s-app": "kube-dns"},
                     "ports": [{"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 53}]},
        }))
        .unwrap();
        let slice: discovery::EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kube-dns-abc", "namespace": "kube-system", "resourceVersion": "1",
                         "labels": {"kubernetes.io/service-name": "kube-dns"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.42.0.19"], "conditions": {"ready": true}},
                          {"addresses": ["10.42.1.20"], "conditions": {"ready": false}}],
            "ports": [{"name": "dns", "protocol": "UDP", "port": 53}],
        }))
        .unwrap();
        let mut s = synced_store();
        let (kind, o) = s.apply(Update::Service(Box::new(Ok(watcher::Event::Apply(
            svc.clone(),
        )))));
        assert_eq!(
            (kind, o),
            (Kind::Services, Outcome::Progress { changed: true })
        );
        let (kind, o) = s.apply(Update::EndpointSlice(Box::new(Ok(watcher::Event::Apply(
            slice.clone(),
        )))));
        assert_eq!(
            (kind, o),
            (Kind::EndpointSlices, Outcome::Progress { changed: true })
        );
        let state = s.cluster_state();
        let key = PodKey::new("kube-system", "kube-dns");
        assert_eq!(
            state.services[&key].cluster_ips,
            ["10.43.0.10".parse::<IpAddr>().unwrap()]
        );
        let sl = &state.endpoint_slices[&PodKey::new("kube-system", "kube-dns-abc")];
        assert_eq!(sl.service, "kube-dns");
        assert_eq!(
            sl.addresses,
            ["10.42.0.19".parse::<IpAddr>().unwrap()],
            "not-ready endpoints dropped"
        );
        let fronts = service::frontends(&state);
        assert_eq!(fronts.len(), 1);
        assert_eq!(
            fronts[0].backends,
            [("10.42.0.19".parse::<IpAddr>().unwrap(), 53)]
        );

        // A Service that cannot be converted is an error naming it, not a frontend.
        let mut bad = svc.clone();
        bad.spec.as_mut().unwrap().cluster_ips = Some(vec!["not-an-ip".into()]);
        s.apply(Update::Service(Box::new(Ok(watcher::Event::Apply(bad)))));
        let state = s.cluster_state();
        assert!(state.services.is_empty());
        assert_eq!(state.errors.len(), 1);
        let e = &state.errors[0];
        assert_eq!(e.object.as_ref().unwrap().kind.as_deref(), Some("Service"));
        assert_eq!(e.field.as_deref(), Some("spec.clusterIPs[0]"));

        // Deletes of both kinds flow through.
        s.apply(Update::Service(Box::new(Ok(watcher::Event::Delete(svc)))));
        s.apply(Update::EndpointSlice(Box::new(Ok(watcher::Event::Delete(
            slice,
        )))));
        let state = s.cluster_state();
        assert!(state.services.is_empty() && state.endpoint_slices.is_empty());
        assert!(state.errors.is_empty());
    }

    #[test]
    fn errors_are_classified() {
        let forbidden = kube::core::Status::failure("pods is forbidden", "Forbidden")
            .with_code(403)
            .boxed();
        let gone = kube::core::Status::failure("pods is forbidden", "Expired")
            .with_code(410)
            .boxed();
        assert!(matches!(
            classify(
                Kind::Pods,
                &watcher::Error::InitialListFailed(kube::Error::Api(forbidden.clone()))
            ),
            Outcome::Failed(m) if m.contains("forbidden (403)") && m.contains("get, list and watch")
        ));
        assert!(matches!(
            classify(Kind::Pods, &watcher::Error::WatchError(gone)),
            Outcome::Transient(m) if m.contains("410")
        ));
    }
}
