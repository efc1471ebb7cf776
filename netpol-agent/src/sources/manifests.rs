//! The manifest-directory source: Namespaces, Pods and NetworkPolicies read from `*.yaml`, `*.yml`
//! and `*.json` files in one directory.
//!
//! A file may hold several YAML documents (or concatenated JSON values), and `List` objects with
//! `items`. Objects of other kinds are ignored. A file with any error keeps contributing the objects
//! of its last good load, so that a broken edit never drops a policy that was in force.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as networking;
use serde::Deserialize;
use serde_json::Value;

use crate::model::cluster_policy::{ClusterNetworkPolicyObject, ClusterPolicy};
use crate::model::{
    ClusterState, ConvertError, IgnoredObject, Namespace, Object, ObjectRef, Origin, Pod, Policy,
    SourceError,
};

/// The directory itself could not be used (errors in files are [`SourceError`]s in the state).
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest directory {}: {source}", dir.display())]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What one file yields.
#[derive(Clone, Debug, Default)]
struct FileContents {
    objects: Vec<(Origin, Object)>,
    ignored: Vec<IgnoredObject>,
    /// Stand-ins for policies that do not parse: a NetworkPolicy isolates its namespace both ways
    /// and allows nothing, since what it meant to isolate is unknown ([`isolating_stand_in`]); a
    /// ClusterNetworkPolicy denies everything ([`ClusterPolicy::stand_in`]).
    broken_policies: Vec<(Origin, Object)>,
}

/// What identifies one version of a file (through symlinks, as a mounted ConfigMap's files are):
/// the same stamp means the same bytes, so the file is not read again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(path).ok()?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }
}

/// A file as last read: its stamp, what it yielded and its errors.
#[derive(Clone, Debug)]
struct ReadFile {
    stamp: Stamp,
    contents: FileContents,
    errors: Vec<SourceError>,
}

/// Reads a manifest directory, remembering each file's last good contents between loads, and
/// reading again only the files whose stamp changed.
#[derive(Clone, Debug, Default)]
pub struct ManifestSource {
    last_good: BTreeMap<PathBuf, FileContents>,
    last_read: BTreeMap<PathBuf, ReadFile>,
    files_read: u64,
}

impl ManifestSource {
    /// A source that has loaded nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many times a file was read (not served from its unchanged stamp).
    pub fn files_read(&self) -> u64 {
        self.files_read
    }

    /// What `path` yields: its last read when its stamp did not change, else a new read.
    fn read(&mut self, path: &Path) -> (FileContents, Vec<SourceError>) {
        let stamp = Stamp::of(path);
        if let (Some(stamp), Some(last)) = (stamp, self.last_read.get(path))
            && last.stamp == stamp
        {
            return (last.contents.clone(), last.errors.clone());
        }
        self.files_read += 1;
        let (contents, errors) = read_file(path);
        match stamp {
            Some(stamp) => {
                let read = ReadFile {
                    stamp,
                    contents: contents.clone(),
                    errors: errors.clone(),
                };
                self.last_read.insert(path.to_owned(), read);
            }
            None => {
                self.last_read.remove(path);
            }
        }
        (contents, errors)
    }

    /// Reads every manifest file of `dir` (not recursively, in name order) into a cluster state.
    /// Problems with files and objects are reported in [`ClusterState::errors`]; only an unreadable
    /// directory is an `Err`.
    pub fn load(&mut self, dir: &Path) -> Result<ClusterState, ManifestError> {
        let files = manifest_files(dir).map_err(|source| ManifestError::ReadDir {
            dir: dir.to_owned(),
            source,
        })?;
        let mut state = ClusterState::default();
        let mut loaded = BTreeMap::new();
        for path in files {
            let (contents, errors) = self.read(&path);
            let broken = contents.broken_policies.clone();
            let mut contents = if errors.is_empty() {
                self.last_good.insert(path.clone(), contents.clone());
                contents
            } else {
                state.errors.extend(errors);
                let (kept, reason) = match self.last_good.get(&path) {
                    Some(good) => (
                        good.clone(),
                        format!(
                            "file has errors: keeping the {} objects of its last good load",
                            good.objects.len()
                        ),
                    ),
                    None => (
                        contents,
                        "file has errors and never loaded cleanly: using the objects that did parse"
                            .to_owned(),
                    ),
                };
                state.errors.push(file_error(&path, None, reason));
                kept
            };
            add_stand_ins(&mut contents, broken);
            loaded.insert(path, contents);
        }
        // Files that are gone no longer contribute, and are not remembered.
        self.last_good.retain(|path, _| loaded.contains_key(path));
        self.last_read.retain(|path, _| loaded.contains_key(path));

        let mut seen: BTreeMap<String, Origin> = BTreeMap::new();
        for contents in loaded.values() {
            state.ignored.extend(contents.ignored.iter().cloned());
            for (origin, object) in &contents.objects {
                let object_ref = object.object_ref();
                let id = object_ref.to_string();
                if state.insert(object.clone())
                    && let Some(earlier) = seen.get(&id)
                {
                    state.errors.push(SourceError {
                        origin: origin.clone(),
                        object: Some(object_ref),
                        field: None,
                        reason: format!("duplicate object: replaces the one from {earlier}"),
                    });
                }
                seen.insert(id, origin.clone());
            }
        }
        Ok(state)
    }
}

/// Converts Kubernetes objects as one manifest file's would be (for generated clusters: the bench's
/// mix): each becomes part of the state or, when it does not convert, an error in it.
pub fn state_from_objects(values: Vec<Value>) -> ClusterState {
    let mut contents = FileContents::default();
    let mut state = ClusterState::default();
    for value in values {
        read_object(value, Origin::Api, &mut contents, &mut state.errors);
    }
    for (_, object) in contents.objects {
        state.insert(object);
    }
    state
}

/// The manifest files of `dir`, sorted. Hidden entries are skipped, which also skips the `..data`
/// machinery of a mounted ConfigMap while following its visible symlinks.
fn manifest_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let is_manifest = [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| name.ends_with(ext));
        // `metadata` follows symlinks; a dangling one is left to `read_file` to report.
        let is_dir = std::fs::metadata(&path).is_ok_and(|m| m.is_dir());
        if is_manifest && !name.starts_with('.') && !is_dir {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn file_error(path: &Path, document: Option<usize>, reason: impl Into<String>) -> SourceError {
    SourceError {
        origin: Origin::File {
            path: path.to_owned(),
            document,
            item: None,
        },
        object: None,
        field: None,
        reason: reason.into(),
    }
}

/// Reads one file: what parsed, and every error.
fn read_file(path: &Path) -> (FileContents, Vec<SourceError>) {
    let mut contents = FileContents::default();
    let mut errors = Vec::new();
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            errors.push(file_error(path, None, format!("cannot read: {e}")));
            return (contents, errors);
        }
    };
    let is_json = path.extension().is_some_and(|e| e == "json");
    let (documents, syntax_error) = if is_json {
        json_documents(&text)
    } else {
        yaml_documents(&text)
    };
    if let Some((document, reason)) = syntax_error {
        errors.push(file_error(path, Some(document), reason));
    }
    for (i, doc) in documents.into_iter().enumerate() {
        let origin = Origin::File {
            path: path.to_owned(),
            document: Some(i + 1),
            item: None,
        };
        read_document(doc, origin, &mut contents, &mut errors);
    }
    (contents, errors)
}

/// The documents before the first syntax error, and that error with its document number.
fn yaml_documents(text: &str) -> (Vec<Value>, Option<(usize, String)>) {
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        match Value::deserialize(doc) {
            Ok(v) => docs.push(v),
            // The parser cannot resynchronise after an error.
            Err(e) => {
                return (docs, Some((i + 1, format!("not valid YAML: {e}"))));
            }
        }
    }
    (docs, None)
}

fn json_documents(text: &str) -> (Vec<Value>, Option<(usize, String)>) {
    let mut docs = Vec::new();
    for (i, doc) in serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .enumerate()
    {
        match doc {
            Ok(v) => docs.push(v),
            Err(e) => {
                return (docs, Some((i + 1, format!("not valid JSON: {e}"))));
            }
        }
    }
    (docs, None)
}

fn read_document(
    doc: Value,
    origin: Origin,
    contents: &mut FileContents,
    errors: &mut Vec<SourceError>,
) {
    if doc.is_null() {
        return; // An empty document, as after a trailing `---`.
    }
    let object = loose_ref(&doc);
    let is_list =
        object.kind.as_deref().is_some_and(|k| k.ends_with("List")) && doc.get("items").is_some();
    if !is_list {
        return read_object(doc, origin, contents, errors);
    }
    let Value::Object(mut map) = doc else {
        unreachable!("a document with items is an object")
    };
    let Some(Value::Array(items)) = map.remove("items") else {
        errors.push(SourceError {
            origin,
            object: Some(object),
            field: Some("items".into()),
            reason: "must be a list".into(),
        });
        return;
    };
    for (i, item) in items.into_iter().enumerate() {
        let Origin::File { path, document, .. } = &origin else {
            unreachable!("files only")
        };
        let origin = Origin::File {
            path: path.clone(),
            document: *document,
            item: Some(i),
        };
        read_object(item, origin, contents, errors);
    }
}

/// Kind, namespace and name as far as they can be read from an object that may not deserialize.
fn loose_ref(value: &Value) -> ObjectRef {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    let metadata = value.get("metadata");
    ObjectRef {
        kind: text(value.get("kind")),
        namespace: text(metadata.and_then(|m| m.get("namespace"))),
        name: text(metadata.and_then(|m| m.get("name"))),
    }
}

fn read_object(
    value: Value,
    origin: Origin,
    contents: &mut FileContents,
    errors: &mut Vec<SourceError>,
) {
    let object = loose_ref(&value);
    let error = |field: Option<String>, reason: String| SourceError {
        origin: origin.clone(),
        object: Some(object.clone()),
        field,
        reason,
    };
    if !value.is_object() {
        errors.push(error(None, "not an object".into()));
        return;
    }
    let converted = match object.kind.as_deref() {
        Some("Namespace") => typed::<core::Namespace>(value)
            .and_then(|ns| Ok(Object::Namespace(Namespace::from_k8s(&ns)?))),
        Some("Pod") => {
            typed::<core::Pod>(value).and_then(|pod| Ok(Object::Pod(Pod::from_k8s(&pod)?)))
        }
        Some("NetworkPolicy") => typed::<networking::NetworkPolicy>(value)
            .and_then(|p| Ok(Object::Policy(Policy::from_k8s(&p, origin.clone())?))),
        Some("Service") => typed::<core::Service>(value).and_then(|s| {
            Ok(Object::Service(crate::model::service::Service::from_k8s(
                &s,
            )?))
        }),
        Some("EndpointSlice") => typed::<k8s_openapi::api::discovery::v1::EndpointSlice>(value)
            .and_then(|s| {
                Ok(Object::EndpointSlice(
                    crate::model::service::EndpointSlice::from_k8s(&s)?,
                ))
            }),
        Some(crate::model::cluster_policy::KIND) => typed::<ClusterNetworkPolicyObject>(value)
            .and_then(|p| {
                Ok(Object::ClusterPolicy(ClusterPolicy::from_object(
                    &p,
                    origin.clone(),
                )?))
            }),
        Some(_) => {
            contents.ignored.push(IgnoredObject {
                origin: origin.clone(),
                object,
            });
            return;
        }
        None => {
            errors.push(error(
                Some("kind".into()),
                "missing: not a Kubernetes object".into(),
            ));
            return;
        }
    };
    match converted {
        Ok(obj) => contents.objects.push((origin.clone(), obj)),
        Err(e) => {
            let stand_in = match object.kind.as_deref() {
                Some("NetworkPolicy") => Some(Object::Policy(isolating_stand_in(&object, &origin))),
                Some(crate::model::cluster_policy::KIND) => {
                    let name = object.name.clone().filter(|n| !n.is_empty());
                    let name = name.unwrap_or_else(|| format!("unparsed-{origin}"));
                    Some(Object::ClusterPolicy(ClusterPolicy::stand_in(
                        &name,
                        origin.clone(),
                    )))
                }
                _ => None,
            };
            if let Some(stand_in) = stand_in {
                contents.broken_policies.push((origin.clone(), stand_in));
            }
            errors.push(error(Some(e.field).filter(|f| !f.is_empty()), e.reason));
        }
    }
}

/// What a NetworkPolicy that does not parse is enforced as: every pod of the namespace it names
/// (the default namespace when it names none, as `kubectl apply` would) isolated both ways, nothing
/// allowed. It could have selected any pod of that namespace, for either direction.
fn isolating_stand_in(object: &ObjectRef, origin: &Origin) -> Policy {
    let namespace = object
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| crate::model::DEFAULT_NAMESPACE.to_owned());
    let name = object
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("unparsed-{origin}"));
    Policy {
        key: crate::model::PodKey::new(namespace, name),
        origin: origin.clone(),
        spec: networking::NetworkPolicySpec {
            pod_selector: Some(Default::default()),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ..Default::default()
        },
        // Its annotations are unreadable: it takes its namespace's mode, or the node's.
        mode: None,
    }
}

/// Adds the stand-ins of `broken` policies that the file's objects in force (its last good load)
/// do not already hold under the same name: a policy that was in force stays as it was.
fn add_stand_ins(contents: &mut FileContents, broken: Vec<(Origin, Object)>) {
    for (origin, policy) in broken {
        let id = policy.object_ref();
        let known = contents.objects.iter().any(|(_, o)| o.object_ref() == id);
        if !known {
            contents.objects.push((origin, policy));
        }
    }
}

/// Deserializes a k8s-openapi type (which also checks `apiVersion` and `kind`), naming the field of
/// an error.
fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ConvertError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        ConvertError {
            field: if field == "." { String::new() } else { field },
            reason: e.into_inner().to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PodKey;
    use crate::scratch::TempDir;

    impl TempDir {
        fn write(&self, name: &str, text: &str) {
            std::fs::write(self.0.join(name), text).unwrap();
        }
    }

    const POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: app}
spec:
  podSelector: {}
";

    const POD: &str = "apiVersion: v1
kind: Pod
metadata: {name: web, namespace: app, labels: {app: web}}
spec:
  containers: [{name: c, image: x, ports: [{name: http, containerPort: 80}]}]
status: {podIP: 10.0.0.2}
";

    #[test]
    fn reads_documents_lists_and_json() {
        let dir = TempDir::new("manifests");
        dir.write("a.yaml", &format!("{POLICY}---\n{POD}---\n"));
        dir.write(
            "b.yml",
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: app, labels: {team: x}}}\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: s}}\n",
        );
        dir.write(
            "c.json",
            r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "j"}, "status": {"podIP": "10.0.0.3"}}"#,
        );
        dir.write("notes.txt", "not a manifest");
        dir.write(".hidden.yaml", "garbage: [");
        std::fs::create_dir(dir.0.join("sub.yaml")).unwrap();
        std::fs::write(
            dir.0.join("sub.yaml/x.yaml"),
            POLICY.replace("deny", "nested"),
        )
        .unwrap();

        let state = ManifestSource::new().load(&dir.0).unwrap();
        assert!(state.errors.is_empty(), "{:?}", state.errors);
        assert_eq!(
            state.policies.keys().collect::<Vec<_>>(),
            vec![&PodKey::new("app", "deny")]
        );
        assert_eq!(state.pods.len(), 2);
        assert_eq!(state.pods[&PodKey::new("default", "j")].ips.len(), 1);
        assert_eq!(state.pods[&PodKey::new("app", "web")].ports.len(), 1);
        assert_eq!(state.namespaces["app"].labels["team"], "x");
        assert_eq!(state.ignored.len(), 1);
        assert_eq!(state.ignored[0].object.kind.as_deref(), Some("ConfigMap"));
        let policy = &state.policies[&PodKey::new("app", "deny")];
        assert_eq!(
            policy.origin.to_string(),
            format!("{} document 1", dir.0.join("a.yaml").display())
        );
    }

    /// ClusterNetworkPolicies are read; one that does not parse is an error naming its field, and
    /// is enforced as the stand-in that denies everything.
    #[test]
    fn cluster_network_policies_are_read_and_a_broken_one_fails_closed() {
        let dir = TempDir::new("manifests");
        let cnp = |name: &str, priority: &str| {
            format!(
                "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec: {{tier: Admin, priority: {priority}, subject: {{namespaces: {{}}}}}}\n"
            )
        };
        dir.write("a.yaml", &cnp("good", "5"));
        dir.write("b.yaml", &cnp("broken", "high"));
        let state = ManifestSource::new().load(&dir.0).unwrap();
        assert_eq!(state.cluster_policies["good"].spec.priority, 5);
        let broken = &state.cluster_policies["broken"];
        assert_eq!(broken.spec.ingress[0].action, "Deny");
        assert_eq!(broken.spec.egress[0].action, "Deny");
        let error = state
            .errors
            .iter()
            .find(|e| e.object.as_ref().and_then(|o| o.name.as_deref()) == Some("broken"))
            .unwrap_or_else(|| panic!("{:?}", state.errors));
        assert_eq!(error.field.as_deref(), Some("spec.priority"), "{error}");
        assert!(
            error.to_string().contains("ClusterNetworkPolicy broken"),
            "{error}"
        );
    }

    #[test]
    fn missing_directory_is_an_error_naming_it() {
        let dir = std::env::temp_dir().join("netpol-manifests-does-not-exist");
        let err = ManifestSource::new().load(&dir).unwrap_err();
        assert!(
            err.to_string().contains("netpol-manifests-does-not-exist"),
            "{err}"
        );
    }

    #[test]
    fn broken_file_keeps_its_last_good_objects() {
        let dir = TempDir::new("manifests");
        let mut source = ManifestSource::new();
        dir.write("policy.yaml", POLICY);
        dir.write("pod.yaml", POD);
        assert!(source.load(&dir.0).unwrap().errors.is_empty());

        dir.write(
            "policy.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny\n",
        );
        let state = source.load(&dir.0).unwrap();
        assert!(
            state.policies.contains_key(&PodKey::new("app", "deny")),
            "kept"
        );
        assert!(state.pods.contains_key(&PodKey::new("app", "web")));
        assert_eq!(state.errors.len(), 2, "{:?}", state.errors);
        let message = state.errors[0].to_string();
        assert!(
            message.contains("policy.yaml") && message.contains("YAML"),
            "{message}"
        );
        assert!(state.errors[1].reason.contains("last good"));

        // Still broken: still kept (the last good load is not forgotten).
        let state = source.load(&dir.0).unwrap();
        assert!(state.policies.contains_key(&PodKey::new("app", "deny")));

        // A bad object breaks the file just the same.
        dir.write(
            "policy.yaml",
            &POLICY.replace(
                "podSelector: {}",
                "podSelector: {}\n  ingress: [{ports: [{endPort: x}]}]",
            ),
        );
        let state = source.load(&dir.0).unwrap();
        assert!(state.policies.contains_key(&PodKey::new("app", "deny")));
        assert!(
            state.policies[&PodKey::new("app", "deny")]
                .spec
                .ingress
                .is_none(),
            "old spec"
        );

        // Fixed: the new contents apply.
        dir.write("policy.yaml", &POLICY.replace("deny", "allow"));
        let state = source.load(&dir.0).unwrap();
        assert!(state.errors.is_empty());
        assert_eq!(
            state.policies.keys().collect::<Vec<_>>(),
            vec![&PodKey::new("app", "allow")]
        );

        // Deleted: gone.
        std::fs::remove_file(dir.0.join("policy.yaml")).unwrap();
        let state = source.load(&dir.0).unwrap();
        assert!(state.policies.is_empty());
    }

    #[test]
    fn broken_file_never_loaded_uses_what_parsed() {
        let dir = TempDir::new("manifests");
        dir.write("a.yaml", &format!("{POLICY}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec: {{hostNetwork: maybe}}\n"));
        let state = ManifestSource::new().load(&dir.0).unwrap();
        assert!(state.policies.contains_key(&PodKey::new("app", "deny")));
        assert!(state.pods.is_empty());
        assert_eq!(state.errors.len(), 2);
        let err = &state.errors[0];
        assert_eq!(err.field.as_deref(), Some("spec.hostNetwork"));
        assert_eq!(err.object.as_ref().unwrap().to_string(), "Pod p");
        assert!(matches!(
            err.origin,
            Origin::File {
                document: Some(2),
                ..
            }
        ));
    }

    /// The namespaces a state's policy `key` isolates, as the compiler reads the spec.
    fn stand_in(state: &ClusterState, ns: &str, name: &str) -> networking::NetworkPolicySpec {
        state.policies[&PodKey::new(ns, name)].spec.clone()
    }

    #[test]
    fn a_policy_that_does_not_parse_isolates_its_namespace_both_ways() {
        let dir = TempDir::new("manifests");
        let mut source = ManifestSource::new();
        for (i, broken) in [
            "policyTypes: Ingress",
            "podSelector: {matchLabels: {app: 7}}",
            "egress: [{ports: [{port: 80, endPort: eighty}]}]",
        ]
        .iter()
        .enumerate()
        {
            dir.write(
                &format!("p{i}.yaml"),
                &format!(
                    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{i}, namespace: ns{i}}}\nspec:\n  {broken}\n"
                ),
            );
        }
        let state = source.load(&dir.0).unwrap();
        for i in 0..3 {
            let spec = stand_in(&state, &format!("ns{i}"), &format!("p{i}"));
            assert_eq!(spec.pod_selector, Some(Default::default()), "every pod");
            assert_eq!(
                spec.policy_types,
                Some(vec!["Ingress".to_owned(), "Egress".to_owned()])
            );
            assert!(
                spec.ingress.is_none() && spec.egress.is_none(),
                "allows nothing"
            );
            assert!(
                state
                    .errors
                    .iter()
                    .any(|e| e.to_string().contains(&format!("NetworkPolicy ns{i}/p{i}"))),
                "{:?}",
                state.errors
            );
        }
    }

    #[test]
    fn a_broken_policy_added_to_a_good_file_isolates_and_the_good_ones_stay() {
        let dir = TempDir::new("manifests");
        let mut source = ManifestSource::new();
        dir.write("policy.yaml", POLICY);
        assert!(source.load(&dir.0).unwrap().errors.is_empty());
        let kept = source.load(&dir.0).unwrap().policies[&PodKey::new("app", "deny")].clone();
        dir.write(
            "policy.yaml",
            &format!(
                "{POLICY}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: new}}\nspec: {{policyTypes: Egress}}\n"
            ),
        );
        let state = source.load(&dir.0).unwrap();
        assert_eq!(
            state.policies[&PodKey::new("app", "deny")],
            kept,
            "last good kept"
        );
        let spec = stand_in(&state, "default", "new");
        assert_eq!(
            spec.policy_types,
            Some(vec!["Ingress".to_owned(), "Egress".to_owned()])
        );
        // Fixed: the policy as written.
        dir.write(
            "policy.yaml",
            &format!(
                "{POLICY}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: new}}\nspec: {{policyTypes: [Egress]}}\n"
            ),
        );
        let state = source.load(&dir.0).unwrap();
        assert_eq!(
            stand_in(&state, "default", "new").policy_types,
            Some(vec!["Egress".to_owned()])
        );
    }

    #[test]
    fn object_errors_name_file_kind_name_and_field() {
        let dir = TempDir::new("manifests");
        dir.write(
            "p.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: ns}\nspec:\n  podSelector: {}\n  ingress:\n  - ports: [{port: 80, endPort: eighty}]\n",
        );
        let state = ManifestSource::new().load(&dir.0).unwrap();
        let err = &state.errors[0];
        assert_eq!(
            err.field.as_deref(),
            Some("spec.ingress[0].ports[0].endPort")
        );
        let message = err.to_string();
        for part in ["p.yaml", "document 1", "NetworkPolicy ns/bad", "endPort"] {
            assert!(message.contains(part), "{part} not in {message}");
        }
    }

    #[test]
    fn wrong_api_version_and_missing_kind_are_errors() {
        let dir = TempDir::new("manifests");
        dir.write(
            "a.yaml",
            &POLICY.replace("networking.k8s.io/v1", "extensions/v1beta1"),
        );
        dir.write("b.yaml", "metadata: {name: x}\n");
        dir.write(
            "c.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {namespace: x}\n",
        );
        let state = ManifestSource::new().load(&dir.0).unwrap();
        // A NetworkPolicy of an API version this agent does not read still means to isolate.
        assert_eq!(state.policies.len(), 1);
        assert_eq!(
            stand_in(&state, "app", "deny").policy_types,
            Some(vec!["Ingress".to_owned(), "Egress".to_owned()])
        );
        let fields: Vec<_> = state
            .errors
            .iter()
            .filter_map(|e| e.field.as_deref())
            .collect();
        assert!(fields.contains(&"kind"), "{:?}", state.errors);
        assert!(fields.contains(&"metadata.name"), "{:?}", state.errors);
        assert!(
            state
                .errors
                .iter()
                .any(|e| e.to_string().contains("a.yaml"))
        );
    }

    #[test]
    fn duplicates_last_one_wins_with_an_error() {
        let dir = TempDir::new("manifests");
        dir.write("a.yaml", POLICY);
        dir.write(
            "b.yaml",
            &POLICY.replace("podSelector: {}", "podSelector: {matchLabels: {x: y}}"),
        );
        let state = ManifestSource::new().load(&dir.0).unwrap();
        let policy = &state.policies[&PodKey::new("app", "deny")];
        assert!(
            policy
                .spec
                .pod_selector
                .as_ref()
                .unwrap()
                .match_labels
                .is_some(),
            "b.yaml wins"
        );
        assert_eq!(state.errors.len(), 1);
        let message = state.errors[0].to_string();
        assert!(
            message.contains("b.yaml")
                && message.contains("a.yaml")
                && message.contains("duplicate"),
            "{message}"
        );
    }

    #[test]
    fn empty_documents_and_files_are_fine() {
        let dir = TempDir::new("manifests");
        dir.write("empty.yaml", "");
        dir.write("comments.yaml", "# nothing\n---\n---\n");
        let state = ManifestSource::new().load(&dir.0).unwrap();
        assert!(state.errors.is_empty(), "{:?}", state.errors);
    }
}
