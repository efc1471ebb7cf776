//! The agent's local control socket (`<state-dir>/agent.sock`) and the status it reports.
//!
//! Protocol: the client writes one request line (`status`), the agent answers with one JSON document
//! and closes the connection. `flows <filter>` and `follow <filter>` are answered by
//! [`crate::observe::answer_flows`].

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};

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
}

/// Use of one map.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapStatus {
    pub name: String,
    pub entries: usize,
    pub capacity: u32,
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
    pub pods: usize,
    pub namespaces: usize,
    pub endpoints: Vec<EndpointStatus>,
    pub maps: Vec<MapStatus>,
    /// Packets per verdict reason since the maps were created.
    pub counters: Vec<(String, u64)>,
    /// Current problems: bad input (file, object, field), map writes that failed, attach failures.
    pub errors: Vec<String>,
}

/// The status shared between the sync loop (writer) and the control socket (reader).
pub type SharedStatus = Arc<Mutex<Status>>;

/// Serves `status` requests on `path` until the task is dropped.
pub async fn serve(
    listener: UnixListener,
    status: SharedStatus,
    observer: Option<Arc<crate::observe::Observer>>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let status = status.clone();
        let observer = observer.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, status, observer).await {
                tracing::debug!(error = %e, "control request failed");
            }
        });
    }
}

async fn answer(
    stream: UnixStream,
    status: SharedStatus,
    observer: Option<Arc<crate::observe::Observer>>,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let (verb, arg) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
    if let ("flows" | "follow", Some(observer)) = (verb, observer) {
        return crate::observe::answer_flows(verb == "follow", arg, observer, write).await;
    }
    let body = match line.trim() {
        "status" => {
            let snapshot = status.lock().map(|s| s.clone()).unwrap_or_default();
            serde_json::to_vec(&snapshot)?
        }
        other => serde_json::to_vec(
            &serde_json::json!({ "error": format!("unknown request {other:?}") }),
        )?,
    };
    write.write_all(&body).await?;
    write.shutdown().await?;
    Ok(())
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
