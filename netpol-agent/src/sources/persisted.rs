//! The agent's last cluster state, kept on the node's disk so that a rebooted node can enforce
//! policy before the Kubernetes API answers.
//!
//! What is kept is the cluster view ([`ClusterState`]), not the compiled maps. Compiled map contents
//! are keyed by veth ifindex (a local pod's endpoint) and by identity numbers, and neither is
//! stable: veths are recreated with new ifindexes after a reboot, and identities are only the
//! numbering of one compilation. The compiler is pure and deterministic, so recompiling the saved
//! view against the veths found after boot gives the same policy the node enforced before it.
//!
//! Only what the compiler needs is saved: namespaces, all pods (those of other nodes are policy
//! peers), policies, services, endpoint slices and source errors. Objects of ignored kinds
//! ([`ClusterState::ignored`]) are only shown by `status` and are dropped.

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::model::service::{EndpointSlice, Service};
use crate::model::{
    ClusterState, IgnoredObject, Namespace, Pod, PodKey, Policy, SourceError, pairs,
};

/// File name inside the state directory.
pub const FILE_NAME: &str = "cluster-state.json";

/// Name of the file a save writes before renaming it over [`FILE_NAME`].
const TEMP_NAME: &str = ".cluster-state.json.tmp";

/// Version of the file's format; a file of another version is not read.
pub const FORMAT_VERSION: u32 = 1;

/// The contents of the file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    /// [`FORMAT_VERSION`] of the agent that wrote it.
    pub version: u32,
    /// The node whose agent wrote it.
    pub node: String,
    /// When it was written, in seconds since the Unix epoch.
    pub saved_unix: u64,
    /// The kernel's boot id when it was written (`/proc/sys/kernel/random/boot_id`): after a
    /// reboot every sandbox is new, so the saved addresses of this node's pods say nothing about
    /// which veth is whose.
    #[serde(default)]
    pub boot_id: Option<String>,
    /// Which veth each local pod had: on the same boot, a pod of the saved state is matched again
    /// only with the veth it had (its address may have gone to a new pod meanwhile).
    #[serde(default)]
    pub bindings: Vec<Binding>,
    /// The cluster state, with `ignored` empty.
    pub state: ClusterState,
}

/// A local pod's veth when the state was saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub pod: PodKey,
    pub ifindex: u32,
    pub ifname: String,
}

/// Where the kernel tells its boot id (a new random UUID at every boot).
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// This boot's id, if the kernel tells it.
pub fn current_boot_id() -> Option<String> {
    fs::read_to_string(BOOT_ID_PATH)
        .ok()
        .map(|s| s.trim().to_owned())
}

impl Persisted {
    /// The saved state as this boot may use it, and whether it was saved before a reboot. After a
    /// reboot (or when either boot id is unknown) the addresses of `node`'s pods are forgotten:
    /// new sandboxes may have been given old addresses of other pods, so those pods' veths stay
    /// pending until the source or the CNI plugin names them. Policies and other nodes' pods stay.
    pub fn for_boot(self, boot_id: Option<&str>) -> (ClusterState, Vec<Binding>, bool) {
        let same_boot = matches!((self.boot_id.as_deref(), boot_id), (Some(a), Some(b)) if a == b);
        let mut state = self.state;
        if same_boot {
            return (state, self.bindings, false);
        }
        for pod in state.pods.values_mut() {
            if pod.node_name.as_deref() == Some(self.node.as_str()) {
                Arc::make_mut(pod).ips.clear();
            }
        }
        (state, Vec::new(), true)
    }
}

/// Why the state could not be saved or loaded. Every variant names the file (or directory).
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// Reading, writing, renaming or syncing failed.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The state could not be written as JSON (no type in it fails today; nothing was written).
    #[error("{}: cannot encode the cluster state: {source}", path.display())]
    Encode {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// The file is not this format's JSON: corrupt, truncated, or not written by the agent.
    #[error("{}: not a saved cluster state (corrupt or truncated): {source}", path.display())]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// The file is of another [`FORMAT_VERSION`].
    #[error("{}: format version {found}, this agent reads version {expected}", path.display())]
    Version {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    /// The file is another node's (a disk moved between machines, or a renamed node).
    #[error("{}: saved by node {found:?}, this is node {expected:?}", path.display())]
    OtherNode {
        path: PathBuf,
        found: String,
        expected: String,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> PersistError + '_ {
    move |source| PersistError::Io {
        path: path.to_owned(),
        source,
    }
}

/// [`Persisted`] as it is written: borrows the state instead of cloning it to empty `ignored`.
#[derive(Serialize)]
struct Saving<'a> {
    version: u32,
    node: &'a str,
    saved_unix: u64,
    boot_id: Option<String>,
    bindings: &'a [Binding],
    state: StateView<'a>,
}

/// [`ClusterState`] without `ignored`, serialized with the same field names and shapes so that it
/// reads back as a `ClusterState`.
#[derive(Serialize)]
struct StateView<'a> {
    namespaces: &'a BTreeMap<String, Namespace>,
    #[serde(serialize_with = "pairs::serialize")]
    pods: &'a BTreeMap<PodKey, Arc<Pod>>,
    #[serde(serialize_with = "pairs::serialize")]
    policies: &'a BTreeMap<PodKey, Arc<Policy>>,
    #[serde(serialize_with = "pairs::serialize")]
    services: &'a BTreeMap<PodKey, Service>,
    #[serde(serialize_with = "pairs::serialize")]
    endpoint_slices: &'a BTreeMap<PodKey, EndpointSlice>,
    cluster_policies: &'a BTreeMap<String, crate::model::cluster_policy::ClusterPolicy>,
    errors: &'a [SourceError],
    ignored: &'a [IgnoredObject],
}

impl<'a> StateView<'a> {
    fn of(state: &'a ClusterState) -> Self {
        // Exhaustive, so that a field added to ClusterState is not silently left out of the file.
        let ClusterState {
            namespaces,
            pods,
            policies,
            services,
            endpoint_slices,
            cluster_policies,
            errors,
            ignored: _,
        } = state;
        StateView {
            namespaces,
            pods,
            policies,
            services,
            endpoint_slices,
            cluster_policies,
            errors,
            ignored: &[],
        }
    }
}

/// Writes `state` as `node`'s to `dir`/[`FILE_NAME`], creating `dir` (mode 0700) if needed.
///
/// Writes atomically: a temp file in the same directory (`.cluster-state.json.tmp`), fsync the file,
/// rename over, fsync the directory. Mode 0600. A temp file left by an interrupted save is
/// replaced. The file holds the state or the previous one, never a mix, whenever the node stops.
pub fn save(
    dir: &Path,
    node: &str,
    state: &ClusterState,
    bindings: &[Binding],
) -> Result<(), PersistError> {
    let path = dir.join(FILE_NAME);
    let saved_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let saving = Saving {
        version: FORMAT_VERSION,
        node,
        saved_unix,
        boot_id: current_boot_id(),
        bindings,
        state: StateView::of(state),
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_at(dir))?;
    let temp = dir.join(TEMP_NAME);
    let written =
        write_synced(&temp, &saving).and_then(|()| fs::rename(&temp, &path).map_err(io_at(&path)));
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

/// Writes `saving` as JSON to a new file at `temp` (mode 0600) and flushes it to disk. Encoded
/// straight into the file: a 50,000-pod state is tens of megabytes that need not be in memory.
fn write_synced(temp: &Path, saving: &Saving<'_>) -> Result<(), PersistError> {
    // A leftover is removed rather than opened, so that its mode (or a symlink there) does not carry
    // over: `create_new` neither follows links nor reuses a file.
    match fs::remove_file(temp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_at(temp)(e)),
        _ => {}
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(temp)
        .map_err(io_at(temp))?;
    let mut out = io::BufWriter::new(&file);
    serde_json::to_writer(&mut out, saving).map_err(|source| match source.io_error_kind() {
        Some(_) => io_at(temp)(source.into()),
        None => PersistError::Encode {
            path: temp.to_owned(),
            source,
        },
    })?;
    out.flush().map_err(io_at(temp))?;
    drop(out);
    file.sync_all().map_err(io_at(temp))
}

/// Reads `dir`/[`FILE_NAME`]. `None` when there is no file; an error (naming the path) when it
/// cannot be used: unreadable, corrupt/truncated, another format version, another node's.
pub fn load(dir: &Path, node: &str) -> Result<Option<Persisted>, PersistError> {
    let path = dir.join(FILE_NAME);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_at(&path)(e)),
    };
    let decode = |source| PersistError::Decode {
        path: path.clone(),
        source,
    };
    // The version first: a file of another version may not have this version's shape.
    #[derive(Deserialize)]
    struct Header {
        version: u32,
    }
    let header: Header = serde_json::from_slice(&bytes).map_err(decode)?;
    if header.version != FORMAT_VERSION {
        return Err(PersistError::Version {
            path,
            found: header.version,
            expected: FORMAT_VERSION,
        });
    }
    let persisted: Persisted = serde_json::from_slice(&bytes).map_err(decode)?;
    if persisted.node != node {
        return Err(PersistError::OtherNode {
            path,
            found: persisted.node,
            expected: node.to_owned(),
        });
    }
    Ok(Some(persisted))
}

#[cfg(test)]
mod boot_tests {
    use super::*;
    use crate::model::{Object, Pod};

    fn saved(boot_id: Option<&str>) -> Persisted {
        let mut state = ClusterState::default();
        for (name, node) in [("local", "n0"), ("remote", "n1")] {
            state.insert(Object::Pod(Pod {
                key: PodKey::new("x", name),
                labels: Default::default(),
                node_name: Some(node.into()),
                host_network: false,
                phase: Some("Running".into()),
                ips: vec!["10.42.0.10".parse().unwrap()],
                ports: Vec::new(),
            }));
        }
        Persisted {
            version: FORMAT_VERSION,
            node: "n0".into(),
            saved_unix: 1,
            boot_id: boot_id.map(Into::into),
            bindings: vec![Binding {
                pod: PodKey::new("x", "local"),
                ifindex: 7,
                ifname: "veth7".into(),
            }],
            state,
        }
    }

    #[test]
    fn the_same_boot_keeps_every_address() {
        let (state, bindings, rebooted) = saved(Some("b1")).for_boot(Some("b1"));
        assert!(!rebooted);
        assert_eq!(bindings.len(), 1);
        assert!(state.pods.values().all(|p| !p.ips.is_empty()));
    }

    #[test]
    fn after_a_reboot_this_nodes_pods_lose_their_addresses_and_others_keep_them() {
        for (saved_boot, now) in [
            (Some("b1"), Some("b2")),
            (None, Some("b2")),
            (Some("b1"), None),
        ] {
            let (state, bindings, rebooted) = saved(saved_boot).for_boot(now);
            assert!(rebooted);
            assert!(bindings.is_empty());
            assert!(state.pods[&PodKey::new("x", "local")].ips.is_empty());
            assert!(!state.pods[&PodKey::new("x", "remote")].ips.is_empty());
        }
    }

    #[test]
    fn this_machine_has_a_boot_id() {
        assert!(current_boot_id().is_some_and(|id| id.len() == 36));
    }
}

#[cfg(test)]
mod tests {
    use crate::scratch::TempDir;
    use std::os::unix::fs::PermissionsExt;

    use k8s_openapi::api::core::v1 as core;
    use k8s_openapi::api::discovery::v1 as discovery;
    use k8s_openapi::api::networking::v1 as networking;
    use serde::de::DeserializeOwned;
    use serde_json::json;

    use super::*;
    use crate::model::{Object, ObjectRef, Origin};

    impl TempDir {
        fn file(&self) -> PathBuf {
            self.0.join(FILE_NAME)
        }

        fn names(&self) -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        }
    }

    const NODE: &str = "node-a";

    fn k8s<T: DeserializeOwned>(yaml: &str) -> T {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    /// A state as the API source builds it, from objects as the API returns them, with a bit of
    /// everything: dual stack, other nodes' pods, finished and host-network pods, named ports, every
    /// kind of peer, an `egress: []` (which differs from no `egress`), a policy without a spec,
    /// services with named target ports, a headless one, a slice with a not-ready endpoint, errors.
    fn realistic() -> ClusterState {
        let mut state = ClusterState::default();
        for ns in [
            "{metadata: {name: default}}",
            "{metadata: {name: shop, labels: {team: web, env: prod}}}",
        ] {
            let ns = Namespace::from_k8s(&k8s::<core::Namespace>(ns)).unwrap();
            state.insert(Object::Namespace(ns));
        }
        for (name, node, extra) in [
            (
                "web-1",
                NODE,
                "status: {phase: Running, podIPs: [{ip: 10.42.0.5}, {ip: 'fd00:42::5'}]}",
            ),
            (
                "web-2",
                "node-b",
                "status: {phase: Running, podIP: 10.42.1.7}",
            ),
            ("job", NODE, "status: {phase: Succeeded, podIP: 10.42.0.9}"),
            ("pending", NODE, "status: {phase: Pending}"),
        ] {
            let pod = Pod::from_k8s(&k8s::<core::Pod>(&format!(
                "metadata: {{name: {name}, namespace: shop, labels: {{app: web, tier: front}}}}
spec:
  nodeName: {node}
  containers:
  - name: c
    ports: [{{name: http, containerPort: 8080}}, {{name: dns, containerPort: 53, protocol: UDP}}]
{extra}"
            )))
            .unwrap();
            state.insert(Object::Pod(pod));
        }
        let host = Pod::from_k8s(&k8s::<core::Pod>(
            "metadata: {name: node-exporter, namespace: kube-system}
spec: {nodeName: node-a, hostNetwork: true, containers: [{name: c}]}
status: {phase: Running, podIP: 192.168.1.10}",
        ))
        .unwrap();
        state.insert(Object::Pod(host));

        let policies = [
            (
                "metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: web}}
      podSelector: {matchExpressions: [{key: tier, operator: In, values: [front]}]}
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
    ports: [{port: http}, {port: 9000, endPort: 9100, protocol: TCP}]
  egress:
  - to: [{podSelector: {}}]
    ports: [{port: dns, protocol: UDP}]",
                Origin::Api,
            ),
            (
                "metadata: {name: deny-egress, namespace: shop}
spec: {podSelector: {}, egress: []}",
                Origin::File {
                    path: "/etc/netpol/deny.yaml".into(),
                    document: Some(2),
                    item: Some(0),
                },
            ),
            ("metadata: {name: no-spec}", Origin::Api),
        ];
        for (yaml, origin) in policies {
            let policy = Policy::from_k8s(&k8s::<networking::NetworkPolicy>(yaml), origin).unwrap();
            state.insert(Object::Policy(policy));
        }

        for yaml in [
            "metadata: {name: web, namespace: shop}
spec:
  clusterIPs: [10.43.0.10, 'fd00:43::10']
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}, {name: alt, port: 81, targetPort: 8081, protocol: TCP}]",
            "metadata: {name: headless, namespace: shop}
spec: {clusterIP: None, ports: [{port: 5432}]}",
        ] {
            let svc = Service::from_k8s(&k8s::<core::Service>(yaml)).unwrap();
            state.insert(Object::Service(svc));
        }
        let slice = EndpointSlice::from_k8s(&k8s::<discovery::EndpointSlice>(
            "metadata: {name: web-abc, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- {addresses: [10.42.0.5], conditions: {ready: true}}
- {addresses: [10.42.1.7], conditions: {ready: false}}
ports: [{name: http, port: 8080, protocol: TCP}]",
        ))
        .unwrap();
        state.insert(Object::EndpointSlice(slice));

        state.errors.push(SourceError {
            origin: Origin::Api,
            object: Some(ObjectRef {
                kind: Some("NetworkPolicy".into()),
                namespace: Some("shop".into()),
                name: Some("broken".into()),
            }),
            field: Some("spec.ingress[0].ports[0].protocol".into()),
            reason: "unknown protocol \"FOO\"".into(),
        });
        state.errors.push(SourceError {
            origin: Origin::File {
                path: "/etc/netpol/bad.yaml".into(),
                document: None,
                item: None,
            },
            object: None,
            field: None,
            reason: "not YAML".into(),
        });
        state.ignored.push(IgnoredObject {
            origin: Origin::Api,
            object: ObjectRef {
                kind: Some("ConfigMap".into()),
                ..ObjectRef::default()
            },
        });
        state
    }

    #[test]
    fn round_trip() {
        let dir = TempDir::new("persisted");
        let state = realistic();
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        save(&dir.0, NODE, &state, &[]).unwrap();
        let loaded = load(&dir.0, NODE).unwrap().unwrap();
        assert_eq!(loaded.version, FORMAT_VERSION);
        assert_eq!(loaded.node, NODE);
        assert!(loaded.saved_unix >= before, "{}", loaded.saved_unix);
        let expected = ClusterState {
            ignored: Vec::new(),
            ..state
        };
        assert_eq!(loaded.state, expected);
        // Equal already covers these, but they are what the compiler distinguishes.
        let deny = &loaded.state.policies[&PodKey::new("shop", "deny-egress")];
        assert_eq!(deny.spec.egress, Some(Vec::new()));
        assert_eq!(deny.spec.ingress, None);
        assert_eq!(loaded.state.pods.len(), 5);
    }

    #[test]
    fn a_file_name_that_is_not_utf8_is_saved_lossily() {
        use std::os::unix::ffi::OsStrExt;

        let dir = TempDir::new("persisted");
        let mut state = realistic();
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(b"/etc/netpol/\xff.yaml"));
        let policy = Arc::make_mut(
            state
                .policies
                .get_mut(&PodKey::new("shop", "deny-egress"))
                .unwrap(),
        );
        policy.origin = Origin::File {
            path,
            document: None,
            item: None,
        };
        save(&dir.0, NODE, &state, &[]).unwrap();
        let loaded = load(&dir.0, NODE).unwrap().unwrap();
        let origin = &loaded.state.policies[&PodKey::new("shop", "deny-egress")].origin;
        assert_eq!(origin.to_string(), "/etc/netpol/\u{fffd}.yaml");
    }

    #[test]
    fn missing_file_is_none() {
        let dir = TempDir::new("persisted");
        assert!(load(&dir.0, NODE).unwrap().is_none());
        assert!(load(&dir.0.join("not-there"), NODE).unwrap().is_none());
    }

    #[test]
    fn save_creates_the_directory() {
        let dir = TempDir::new("persisted");
        let sub = dir.0.join("a/b");
        save(&sub, NODE, &realistic(), &[]).unwrap();
        assert!(load(&sub, NODE).unwrap().is_some());
        let mode = fs::metadata(&sub).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }

    #[test]
    fn truncated_file_is_a_decode_error_naming_the_path() {
        let dir = TempDir::new("persisted");
        save(&dir.0, NODE, &realistic(), &[]).unwrap();
        let bytes = fs::read(dir.file()).unwrap();
        fs::write(dir.file(), &bytes[..bytes.len() / 2]).unwrap();
        let err = load(&dir.0, NODE).unwrap_err();
        assert!(
            matches!(&err, PersistError::Decode { path, .. } if *path == dir.file()),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&dir.file().display().to_string()),
            "{err}"
        );

        fs::write(dir.file(), b"").unwrap();
        let err = load(&dir.0, NODE).unwrap_err();
        assert!(matches!(err, PersistError::Decode { .. }), "{err:?}");
    }

    #[test]
    fn another_version_is_refused_whatever_its_shape() {
        let dir = TempDir::new("persisted");
        save(&dir.0, NODE, &realistic(), &[]).unwrap();
        let mut v: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.file()).unwrap()).unwrap();
        v["version"] = json!(2);
        fs::write(dir.file(), serde_json::to_vec(&v).unwrap()).unwrap();
        let err = load(&dir.0, NODE).unwrap_err();
        assert!(
            matches!(&err, PersistError::Version { path, found: 2, expected: 1 } if *path == dir.file()),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&dir.file().display().to_string()),
            "{err}"
        );

        fs::write(dir.file(), br#"{"version": 2, "state": "another shape"}"#).unwrap();
        let err = load(&dir.0, NODE).unwrap_err();
        assert!(
            matches!(err, PersistError::Version { found: 2, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn another_nodes_file_is_refused() {
        let dir = TempDir::new("persisted");
        save(&dir.0, "node-b", &realistic(), &[]).unwrap();
        let err = load(&dir.0, NODE).unwrap_err();
        match &err {
            PersistError::OtherNode {
                path,
                found,
                expected,
            } => {
                assert_eq!(*path, dir.file());
                assert_eq!(found, "node-b");
                assert_eq!(expected, NODE);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            err.to_string().contains(&dir.file().display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn unreadable_file_is_an_io_error() {
        let dir = TempDir::new("persisted");
        fs::create_dir(dir.file()).unwrap();
        let err = load(&dir.0, NODE).unwrap_err();
        assert!(
            matches!(&err, PersistError::Io { path, .. } if *path == dir.file()),
            "{err:?}"
        );
    }

    #[test]
    fn save_replaces_the_file_and_leaves_no_temp_file() {
        let dir = TempDir::new("persisted");
        save(&dir.0, NODE, &ClusterState::default(), &[]).unwrap();
        let state = realistic();
        save(&dir.0, NODE, &state, &[]).unwrap();
        assert_eq!(dir.names(), [FILE_NAME]);
        let mode = fs::metadata(dir.file()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        assert_eq!(load(&dir.0, NODE).unwrap().unwrap().state.pods, state.pods);
    }

    #[test]
    fn save_after_one_interrupted_before_rename() {
        let dir = TempDir::new("persisted");
        save(&dir.0, NODE, &ClusterState::default(), &[]).unwrap();
        // What a save that died before its rename leaves: a partial temp file, here readable by all.
        let temp = dir.0.join(TEMP_NAME);
        fs::write(&temp, b"{\"version\": 1, \"node\": \"node-a\", \"sta").unwrap();
        fs::set_permissions(&temp, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            load(&dir.0, NODE).unwrap().is_some(),
            "the old file is intact"
        );

        let state = realistic();
        save(&dir.0, NODE, &state, &[]).unwrap();
        assert_eq!(dir.names(), [FILE_NAME]);
        let mode = fs::metadata(dir.file()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        let loaded = load(&dir.0, NODE).unwrap().unwrap();
        assert_eq!(loaded.state.policies, state.policies);
        assert_eq!(loaded.state.pods, state.pods);
    }
}
