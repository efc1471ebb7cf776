//! The agent's local control socket (`<state-dir>/agent.sock`) and the status it reports.
//!
//! Protocol: the client writes one request line (`status`), the agent answers with one JSON document
//! and closes the connection. `flows <filter>` and `follow <filter>` are answered by
//! [`crate::observe::answer_flows`]; `cni-add <json>` and `cni-del <json>` (from the `netpol-cni`
//! plugin, [`netpol_cni::protocol`]) are handed to the sync loop, and answered when it has.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use netpol_cni::protocol::{self as cni, Answer, EndpointClaim, Forget};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

/// A request of the CNI plugin, for the sync loop, with where to send the answer.
#[derive(Debug)]
pub struct CniRequest {
    pub kind: CniKind,
    pub reply: oneshot::Sender<Answer>,
}

/// What the plugin asks.
#[derive(Debug)]
pub enum CniKind {
    Add(EndpointClaim),
    Del(Forget),
}

/// Longest a `cni-del` may wait for the sync loop: teardown must never block.
const CNI_DEL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// File name of the socket inside `--state-dir`.
pub const SOCKET_NAME: &str = "agent.sock";

/// Path of the control socket for `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// One local endpoint as `status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    /// `namespace/name`.
    pub pod: String,
    pub ifname: String,
    pub ifindex: u32,
    pub ips: Vec<String>,
    pub isolated_ingress: bool,
    pub isolated_egress: bool,
    /// Both programs attached by this agent (or adopted from a previous one).
    pub attached: bool,
    /// Why the veth has programs but no pod (`unknown-pod`, `ambiguous`, `no-cluster-state`); then
    /// `pod` is empty and only the node may talk to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
    /// Since when (unix seconds) it has been pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_since_unix: Option<u64>,
}

/// Use of one map.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapStatus {
    pub name: String,
    pub entries: usize,
    pub capacity: u32,
    /// Entries the compilation wanted that the map could not hold, left out as denied.
    #[serde(default)]
    pub left_out: usize,
}

/// What `netpol-agent status` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub pin_dir: String,
    pub source: String,
    /// True once the first sync has programmed the datapath.
    pub ready: bool,
    /// Unix time (seconds) of the last successful sync of the datapath.
    pub last_sync_unix: Option<u64>,
    /// Policy generation in the datapath.
    pub generation: u32,
    pub policies: usize,
    /// ClusterNetworkPolicies in the cluster state.
    #[serde(default)]
    pub cluster_policies: usize,
    pub pods: usize,
    pub namespaces: usize,
    pub endpoints: Vec<EndpointStatus>,
    pub maps: Vec<MapStatus>,
    /// Packets per verdict reason since the maps were created.
    pub counters: Vec<(String, u64)>,
    /// Current problems: bad input (file, object, field), map writes that failed, attach failures.
    pub errors: Vec<String>,
    /// kube-router NetworkPolicy chains on the node (another engine enforcing too).
    #[serde(default)]
    pub kube_router_chains: usize,
}

/// The status shared between the sync loop (writer) and the control socket (reader).
pub type SharedStatus = Arc<Mutex<Status>>;

/// Serves `status` requests on `path` until the task is dropped.
pub async fn serve(
    listener: UnixListener,
    status: SharedStatus,
    observer: Option<Arc<crate::observe::Observer>>,
    cni: Option<mpsc::Sender<CniRequest>>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let status = status.clone();
        let observer = observer.clone();
        let cni = cni.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, status, observer, cni).await {
                tracing::debug!(error = %e, "control request failed");
            }
        });
    }
}

async fn answer(
    stream: UnixStream,
    status: SharedStatus,
    observer: Option<Arc<crate::observe::Observer>>,
    cni: Option<mpsc::Sender<CniRequest>>,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    read.read_line(&mut line).await?;
    let (verb, arg) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
    if let ("flows" | "follow", Some(observer)) = (verb, &observer) {
        let node = status.lock().map(|s| s.node.clone()).unwrap_or_default();
        let follow = verb == "follow";
        let observer = observer.clone();
        return crate::observe::answer_flows(follow, arg, observer, node, read, write).await;
    }
    if verb == cni::ADD_VERB || verb == cni::DEL_VERB {
        let answer = answer_cni(verb, arg, cni).await;
        write.write_all(&serde_json::to_vec(&answer)?).await?;
        write.shutdown().await?;
        return Ok(());
    }
    let body = match line.trim() {
        "status" => {
            let snapshot = status.lock().map(|s| s.clone()).unwrap_or_default();
            serde_json::to_vec(&snapshot)?
        }
        "policies" => match &observer {
            Some(observer) => serde_json::to_vec(&crate::observe::policies::answer(observer))?,
            None => serde_json::to_vec(&serde_json::json!({ "error": "no observer" }))?,
        },
        other => serde_json::to_vec(
            &serde_json::json!({ "error": format!("unknown request {other:?}") }),
        )?,
    };
    write.write_all(&body).await?;
    write.shutdown().await?;
    Ok(())
}

/// Hands a CNI request to the sync loop and waits for its answer, at most as long as the plugin
/// said it would wait (ADD) or [`CNI_DEL_TIMEOUT`] (DEL).
async fn answer_cni(verb: &str, json: &str, cni: Option<mpsc::Sender<CniRequest>>) -> Answer {
    let failed = |reason: String| Answer::Failed { reason };
    let Some(cni) = cni else {
        return failed("this agent takes no CNI requests".into());
    };
    let parsed = if verb == cni::ADD_VERB {
        serde_json::from_str(json).map(|c: EndpointClaim| {
            let wait = std::time::Duration::from_millis(c.timeout_ms);
            (CniKind::Add(c), wait)
        })
    } else {
        serde_json::from_str(json).map(|f| (CniKind::Del(f), CNI_DEL_TIMEOUT))
    };
    let (kind, wait) = match parsed {
        Ok(p) => p,
        Err(e) => return failed(format!("{verb}: bad request: {e}")),
    };
    let (reply, answer) = oneshot::channel();
    if cni.send(CniRequest { kind, reply }).await.is_err() {
        return failed("the agent is stopping".into());
    }
    match tokio::time::timeout(wait, answer).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => failed("the agent dropped the request".into()),
        Err(_) => failed(format!("{verb}: not done within {wait:?}")),
    }
}

/// Asks the agent behind `state_dir` for its status.
pub async fn request_status(state_dir: &Path) -> anyhow::Result<Status> {
    let path = socket_path(state_dir);
    let mut stream = UnixStream::connect(&path).await.with_context(|| {
        format!(
            "connecting to the agent at {} (is `netpol-agent run` running with this --state-dir?)",
            path.display()
        )
    })?;
    stream
        .write_all(b"status\n")
        .await
        .context("sending the status request")?;
    let mut body = Vec::new();
    stream
        .read_to_end(&mut body)
        .await
        .context("reading the status answer")?;
    serde_json::from_slice(&body).context("decoding the status answer")
}

/// True when an agent answers on the socket of `state_dir`.
pub async fn agent_is_running(state_dir: &Path) -> bool {
    UnixStream::connect(socket_path(state_dir)).await.is_ok()
}
