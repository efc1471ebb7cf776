//! `/healthz` and `/readyz` over HTTP (`--health-addr`), for the kubelet's probes.
//!
//! - `/healthz`: 200 while the sync loop ticks (it ticks every 250 ms; a loop stuck for
//!   [`STALL_AFTER`] answers 503, so the kubelet restarts the agent; enforcement stays pinned).
//! - `/readyz`: 200 once the first full sync of the cluster state has been compiled and programmed
//!   into the datapath (`status.ready`), 503 before.
//!
//! Both bodies are one line of text, followed by the current problems (source, input, map writes),
//! one per line, which is also what `netpol-agent status` lists.
//!
//! The default address is `127.0.0.1:9101`: loopback, because the bodies name namespaces and pods and
//! the agent runs with `hostNetwork` (the kubelet, in the same network namespace, probes it with
//! `host: 127.0.0.1`); port 9101 because it is free on K3s nodes (K3s uses 6443, 6444, 10248-10259,
//! 2379-2380, 8472/udp, 51820-51821; node-exporter, often a hostNetwork DaemonSet too, has 9100).

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::observe::control::SharedStatus;

/// Default of `--health-addr` (see the module docs for why).
pub const DEFAULT_HEALTH_ADDR: &str = "127.0.0.1:9101";

/// Problems listed in a probe's answer at most: a kubelet probe needs the first ones, not a
/// megabyte (`status` has them all).
pub const MAX_PROBLEMS: usize = 20;

/// `/healthz` fails when the sync loop has not ticked for this long.
pub const STALL_AFTER: Duration = Duration::from_secs(30);

/// The sync loop's heartbeat: the [`now_ms`] of its last tick.
#[derive(Clone, Debug, Default)]
pub struct Heartbeat(Arc<AtomicU64>);

impl Heartbeat {
    /// Records a tick now.
    pub fn beat(&self) {
        self.0.store(now_ms(), Ordering::Relaxed);
    }

    /// Time since the last tick (`None` before the first).
    pub fn age(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            t => Some(Duration::from_millis(now_ms().saturating_sub(t))),
        }
    }
}

/// Milliseconds on the monotonic clock, from an hour before the process first asked (so that 0
/// means "never" and a test can step back). Not the wall clock: one stepped back would make a
/// stalled loop look fresh.
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 3_600_000
}

/// Binds `addr` (so a bad address fails start-up) and serves it on a thread of its own with its own
/// runtime: the probes then answer while the shared runtime's workers are busy (the API source
/// decoding and publishing a 50,000-pod cluster), within the kubelet's timeout.
pub fn spawn(addr: SocketAddr, status: SharedStatus, heartbeat: Heartbeat) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding the health address {addr} (--health-addr)"))?;
    listener
        .set_nonblocking(true)
        .context("making the health listener non-blocking")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the health server's runtime")?;
    std::thread::Builder::new()
        .name("health".into())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => serve(listener, status, heartbeat).await,
                    Err(e) => tracing::error!(error = %e, "health server: not serving"),
                }
            })
        })
        .context("starting the health server's thread")?;
    Ok(())
}

async fn serve(listener: TcpListener, status: SharedStatus, heartbeat: Heartbeat) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let status = status.clone();
        let heartbeat = heartbeat.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (code, body) = answer(req.uri().path(), &status, &heartbeat);
                async move {
                    Response::builder()
                        .status(code)
                        .header("content-type", "text/plain; charset=utf-8")
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            // A probe that hangs must not keep a task forever.
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

/// Status code and body for `path`.
pub fn answer(path: &str, status: &SharedStatus, heartbeat: &Heartbeat) -> (StatusCode, String) {
    let (ready, errors, more) = status
        .lock()
        .map(|s| {
            let shown = s.errors.iter().take(MAX_PROBLEMS).cloned().collect();
            (s.ready, shown, s.errors.len().saturating_sub(MAX_PROBLEMS))
        })
        .unwrap_or((false, vec!["status lock poisoned".to_owned()], 0));
    let (code, mut body) = match path {
        "/healthz" | "/livez" => match heartbeat.age() {
            Some(age) if age <= STALL_AFTER => (StatusCode::OK, "ok".to_owned()),
            Some(age) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("sync loop stalled: no tick for {}s", age.as_secs()),
            ),
            None => (
                StatusCode::SERVICE_UNAVAILABLE,
                "sync loop not started".to_owned(),
            ),
        },
        "/readyz" if ready => (StatusCode::OK, "ready".to_owned()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the datapath does not enforce the cluster state in full yet (the first full sync, or a problem below)".to_owned(),
        ),
        _ => {
            return (
                StatusCode::NOT_FOUND,
                "not found: /healthz, /readyz\n".to_owned(),
            );
        }
    };
    body.push('\n');
    for e in errors {
        body.push_str("problem: ");
        body.push_str(&e);
        body.push('\n');
    }
    if more > 0 {
        body.push_str(&format!(
            "and {more} more problems (`netpol-agent status` lists them all)\n"
        ));
    }
    (code, body)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::observe::control::Status;

    #[test]
    fn answers() {
        let status: SharedStatus = Arc::new(Mutex::new(Status::default()));
        let hb = Heartbeat::default();
        assert_eq!(
            answer("/healthz", &status, &hb).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        hb.beat();
        assert_eq!(answer("/healthz", &status, &hb).0, StatusCode::OK);
        let (code, body) = answer("/readyz", &status, &hb);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.starts_with("not ready"));
        {
            let mut s = status.lock().unwrap();
            s.ready = true;
            s.errors = vec!["Kubernetes API: pods: forbidden".into()];
        }
        let (code, body) = answer("/readyz", &status, &hb);
        assert_eq!(code, StatusCode::OK);
        assert!(body.contains("problem: Kubernetes API: pods: forbidden"));
        assert_eq!(answer("/x", &status, &hb).0, StatusCode::NOT_FOUND);
        // Thousands of problems: a probe gets the first ones and a count.
        status.lock().unwrap().errors = (0..5000).map(|i| format!("write {i} failed")).collect();
        let (_, body) = answer("/readyz", &status, &hb);
        assert_eq!(body.matches("problem: ").count(), MAX_PROBLEMS);
        assert!(body.contains("and 4980 more problems"), "{body}");
        assert!(body.len() < 2_000);
        hb.0.store(now_ms() - 31_000, Ordering::Relaxed);
        assert_eq!(
            answer("/healthz", &status, &hb).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
