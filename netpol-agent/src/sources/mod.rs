//! Sources of cluster state. Each source runs as a task and publishes full snapshots of one
//! [`ClusterState`] model on a watch channel; the sync loop does not know which source it has.

pub mod kube;
pub mod manifests;
pub mod persisted;

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use notify::Watcher as _;
use tokio::sync::{mpsc, watch};

use crate::{model::ClusterState, sources::manifests::ManifestSource};

/// Where the cluster state comes from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of manifests (`--manifests`).
    Manifests(PathBuf),
    /// The Kubernetes API, with this kubeconfig or kube's inference (in-cluster, `KUBECONFIG`,
    /// `~/.kube/config`) when `None`.
    Kubernetes { kubeconfig: Option<PathBuf> },
}

impl SourceConfig {
    /// How `status` names the source.
    pub fn describe(&self) -> String {
        match self {
            SourceConfig::Manifests(dir) => format!("manifests:{}", dir.display()),
            SourceConfig::Kubernetes { kubeconfig: None } => "kubernetes".to_owned(),
            SourceConfig::Kubernetes {
                kubeconfig: Some(path),
            } => format!("kubernetes:{}", path.display()),
        }
    }
}

/// The latest word of a source.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The cluster state, once the source has read all of it at least once. Until then the agent
    /// changes nothing in the datapath (a restarted agent keeps enforcing what is pinned).
    pub state: Option<Arc<ClusterState>>,
    /// A problem with the source itself (directory gone, API unreachable); the last state stays.
    pub problem: Option<String>,
    /// When the source saw the change that produced this snapshot.
    pub seen_at: Instant,
}

/// Starts the source. Fails at once when the source cannot be read at all (a missing directory, no
/// usable kubeconfig), before the agent touches the datapath. An API server that does not answer is
/// not such a failure: the source retries and says so in [`Snapshot::problem`].
pub async fn spawn(config: &SourceConfig) -> anyhow::Result<watch::Receiver<Snapshot>> {
    match config {
        SourceConfig::Manifests(dir) => spawn_manifests(dir.clone()),
        SourceConfig::Kubernetes { kubeconfig } => {
            let client = crate::sources::kube::client(kubeconfig.as_ref()).await?;
            Ok(crate::sources::kube::spawn(client))
        }
    }
}

/// Whether a directory event can change what the manifests say: files created, written, renamed
/// or removed (a ConfigMap update swaps a symlink), not files read.
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Coalescing delay after a file event: editors and `kubectl`-style writers touch a file several
/// times in a row.
const DEBOUNCE: Duration = Duration::from_millis(50);

fn spawn_manifests(dir: PathBuf) -> anyhow::Result<watch::Receiver<Snapshot>> {
    spawn_counted(dir, Arc::default())
}

/// How much work the manifest source did: directory loads and file reads.
#[derive(Debug, Default)]
struct Counts {
    loads: AtomicU64,
    files_read: AtomicU64,
}

impl Counts {
    fn note(&self, source: &ManifestSource) {
        self.loads.fetch_add(1, Ordering::Relaxed);
        self.files_read
            .store(source.files_read(), Ordering::Relaxed);
    }
}

/// [`spawn_manifests`], keeping `counts` of its work.
fn spawn_counted(dir: PathBuf, counts: Arc<Counts>) -> anyhow::Result<watch::Receiver<Snapshot>> {
    let mut source = ManifestSource::new();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // The agent's own reads are events too (inotify reports opens and closes): only changes
        // count, or every load would trigger the next.
        if event.as_ref().map_or(true, |e| is_change(&e.kind)) {
            let _ = events_tx.send(Instant::now());
        }
    })
    .context("creating the manifest directory watcher")?;
    watcher
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    // Read only once the watch is on: a change written between a first read and the watch would
    // otherwise go unseen until the next one (a change before the read costs one extra load).
    let state = source
        .load(&dir)
        .with_context(|| format!("reading the manifest directory {}", dir.display()))?;
    counts.note(&source);
    let (tx, rx) = watch::channel(Snapshot {
        state: Some(Arc::new(state)),
        problem: None,
        seen_at: Instant::now(),
    });
    tokio::spawn(async move {
        let _watcher = watcher;
        while let Some(first) = events.recv().await {
            tokio::time::sleep(DEBOUNCE).await;
            while events.try_recv().is_ok() {}
            let loaded = source.load(&dir);
            counts.note(&source);
            let next = match loaded {
                Ok(state) => {
                    let same = tx.borrow().state.as_deref() == Some(&state)
                        && tx.borrow().problem.is_none();
                    if same {
                        continue;
                    }
                    Snapshot {
                        state: Some(Arc::new(state)),
                        problem: None,
                        seen_at: first,
                    }
                }
                Err(e) => Snapshot {
                    state: tx.borrow().state.clone(),
                    problem: Some(format!("manifest directory: {e}")),
                    seen_at: first,
                },
            };
            if tx.send(next).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: NAME}\n";

    /// Waits (at most 5 s) until `f` holds.
    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "waited 5 s for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The source's own reads of the directory are not changes (inotify reports them), and a file
    /// whose stamp did not change is not read again: a rewrite with the same bytes costs one read,
    /// then nothing; a real change is read once and published.
    #[tokio::test]
    async fn the_manifest_source_reads_what_changed_once_and_never_loops_on_its_reads() {
        let dir = crate::scratch::TempDir::new("source");
        let write = |file: &str, name: &str| {
            std::fs::write(dir.0.join(file), NS.replace("NAME", name)).unwrap();
        };
        write("a.yaml", "alpha");
        write("b.yaml", "beta");
        let counts = Arc::new(Counts::default());
        let mut rx = spawn_counted(dir.0.clone(), counts.clone()).unwrap();
        let count = || counts.files_read.load(Ordering::Relaxed);
        assert_eq!(count(), 2);

        write("a.yaml", "alpha");
        until("a.yaml read again", || count() == 3).await;
        // Quiet from then on: its own reads do not wake it.
        let loads = counts.loads.load(Ordering::Relaxed);
        let quiet_until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < quiet_until {
            assert_eq!(count(), 3, "the source keeps re-reading");
            let now = counts.loads.load(Ordering::Relaxed);
            assert!(
                now <= loads + 2,
                "the source keeps loading: {loads} -> {now}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !rx.has_changed().unwrap(),
            "same contents: nothing published"
        );

        write("b.yaml", "gamma");
        until("b.yaml read", || count() == 4).await;
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("a snapshot within 5 s")
            .unwrap();
        let state = rx.borrow().state.clone().unwrap();
        assert!(state.namespaces.contains_key("gamma") && !state.namespaces.contains_key("beta"));
        assert_eq!(count(), 4, "only the changed file was read");
    }
}
