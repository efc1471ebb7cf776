//! Sources of cluster state. Each source runs as a task and publishes full snapshots of one
//! [`ClusterState`] model on a watch channel; the sync loop does not know which source it has.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use notify::Watcher as _;
use tokio::sync::{mpsc, watch};

use crate::{manifests::ManifestSource, model::ClusterState};

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
            let client = crate::kube_source::client(kubeconfig.as_ref()).await?;
            Ok(crate::kube_source::spawn(client))
        }
    }
}

/// Coalescing delay after a file event: editors and `kubectl`-style writers touch a file several
/// times in a row.
const DEBOUNCE: Duration = Duration::from_millis(50);

fn spawn_manifests(dir: PathBuf) -> anyhow::Result<watch::Receiver<Snapshot>> {
    let mut source = ManifestSource::new();
    let state = source
        .load(&dir)
        .with_context(|| format!("reading the manifest directory {}", dir.display()))?;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |_event| {
        let _ = events_tx.send(Instant::now());
    })
    .context("creating the manifest directory watcher")?;
    watcher
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
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
            let next = match source.load(&dir) {
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
