//! The built `netpol-cni` binary against fake agents on a Unix socket in a temporary directory.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

/// A fresh directory under the system's temporary directory, removed when dropped (also when the
/// test fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("netpol-cni-{tag}-{}-{nanos}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(name);
        std::fs::create_dir(&dir).expect("creating the temporary directory");
        Self(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("agent.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What Flannel's bridge (then portmap and bandwidth) passes on in K3s.
fn prev_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cni0", "mac": "6a:1f:0c:33:90:01"},
            {"name": "veth3c9e4b1a", "mac": "9e:55:21:0b:7c:4d"},
            {"name": "eth0", "mac": "3a:d2:6f:19:8e:02", "sandbox": "/var/run/netns/cni-8d2f6a4e-1b3c-4d5e-9f60-7a8b9c0d1e2f"}
        ],
        "ips": [{"address": "10.42.0.12/24", "gateway": "10.42.0.1", "interface": 2}],
        "routes": [{"dst": "10.42.0.0/16", "gw": "10.42.0.1"}, {"dst": "0.0.0.0/0", "gw": "10.42.0.1"}],
        "dns": {}
    })
}

fn config(state_dir: &Path, timeout_ms: u64) -> Vec<u8> {
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "cbr0",
        "type": "netpol-cni",
        "stateDir": state_dir,
        "timeoutMs": timeout_ms,
        "prevResult": prev_result(),
    });
    serde_json::to_vec(&conf).unwrap()
}

/// Starts the plugin as the runtime does and writes `stdin`.
fn start(command: &str, stdin: &[u8]) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_netpol-cni"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "8d2f6a4e1b3c")
        .env("CNI_NETNS", "/var/run/netns/cni-8d2f6a4e-1b3c-4d5e-9f60-7a8b9c0d1e2f")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=8d2f6a4e1b3c;K8S_POD_UID=5f0e")
        .env("CNI_PATH", "/var/lib/rancher/k3s/data/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting netpol-cni");
    let mut pipe = child.stdin.take().expect("stdin");
    pipe.write_all(stdin).expect("writing the configuration");
    child
}

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Waits for `child` until `limit` (then kills it and fails).
fn finish(mut child: Child, started: Instant, limit: Duration) -> Finished {
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for netpol-cni") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("netpol-cni did not finish within {limit:?}");
        }
        thread::yield_now();
    };
    let took = started.elapsed();
    let (mut stdout, mut stderr) = (String::new(), String::new());
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("stdout");
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("stderr");
    Finished {
        status,
        stdout,
        stderr,
        took,
    }
}

fn run(command: &str, stdin: &[u8]) -> Finished {
    let started = Instant::now();
    finish(start(command, stdin), started, Duration::from_secs(20))
}

/// The CNI error object a failed run printed.
fn error_of(run: &Finished) -> Value {
    assert_eq!(
        run.status.code(),
        Some(1),
        "stdout {} stderr {}",
        run.stdout,
        run.stderr
    );
    serde_json::from_str(&run.stdout).expect("a CNI error object on stdout")
}

/// A fake agent that reads one request line, sends `answer` and closes; the line is returned by
/// the thread.
fn agent_answering(listener: UnixListener, answer: &'static str) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accepting the plugin");
        let mut line = String::new();
        BufReader::new(&stream)
            .read_line(&mut line)
            .expect("reading the request");
        (&stream).write_all(answer.as_bytes()).expect("answering");
        line
    })
}

/// A fake agent that reads one request line and never answers; it closes the connection when
/// the returned sender is dropped, and its thread returns the line.
fn agent_never_answering(listener: UnixListener) -> (mpsc::Sender<()>, thread::JoinHandle<String>) {
    let (done, wait_for_done) = mpsc::channel::<()>();
    let agent = thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accepting the plugin");
        let mut line = String::new();
        BufReader::new(&stream)
            .read_line(&mut line)
            .expect("reading the request");
        let _ = wait_for_done.recv();
        drop(stream);
        line
    });
    (done, agent)
}

#[test]
fn add_prints_prev_result_once_the_agent_programmed_the_pod() {
    let dir = TempDir::new("programmed");
    let listener = UnixListener::bind(dir.socket()).expect("binding the fake agent");
    let agent = agent_answering(
        listener,
        r#"{"result":"programmed","ifname":"veth3c9e4b1a","ifindex":9}"#,
    );
    let run = run("ADD", &config(&dir.0, 10_000));
    assert_eq!(
        run.status.code(),
        Some(0),
        "stdout {} stderr {}",
        run.stdout,
        run.stderr
    );
    let printed: Value = serde_json::from_str(&run.stdout).expect("a result on stdout");
    assert_eq!(printed, prev_result());
    let line = agent.join().expect("the fake agent");
    let json = line.strip_prefix("cni-add ").expect("an ADD request line");
    let claim: Value = serde_json::from_str(json).expect("JSON claim");
    assert_eq!(claim["namespace"], "shop");
    assert_eq!(claim["name"], "web-0");
    assert_eq!(claim["container_id"], "8d2f6a4e1b3c");
    assert_eq!(claim["ips"], json!(["10.42.0.12"]));
    assert_eq!(claim["host_interfaces"], json!(["cni0", "veth3c9e4b1a"]));
    assert_eq!(claim["timeout_ms"], 10_000);
}

#[test]
fn add_gives_up_on_an_agent_that_never_answers() {
    let dir = TempDir::new("silent");
    let listener = UnixListener::bind(dir.socket()).expect("binding the fake agent");
    let (done, agent) = agent_never_answering(listener);
    let started = Instant::now();
    let child = start("ADD", &config(&dir.0, 300));
    let run = finish(child, started, Duration::from_secs(10));
    drop(done);
    let error = error_of(&run);
    assert_eq!(error["code"], 11, "{error}");
    assert_eq!(error["cniVersion"], "1.0.0", "{error}");
    let msg = error["msg"].as_str().unwrap_or("");
    assert!(msg.contains("pod shop/web-0"), "{msg}");
    assert!(
        msg.contains(&format!("{} within 300 ms", dir.socket().display())),
        "{msg}"
    );
    let details = error["details"].as_str().unwrap_or("");
    assert!(details.contains("not started unpoliced"), "{details}");
    assert!(
        run.took >= Duration::from_millis(250),
        "gave up after {:?}",
        run.took
    );
    assert!(run.took < Duration::from_secs(5), "took {:?}", run.took);
    assert!(
        agent
            .join()
            .expect("the fake agent")
            .starts_with("cni-add {")
    );
}

#[test]
fn add_fails_naming_a_missing_socket() {
    let dir = TempDir::new("missing");
    let error = error_of(&run("ADD", &config(&dir.0, 10_000)));
    assert_eq!(error["code"], 11, "{error}");
    let msg = error["msg"].as_str().unwrap_or("");
    let socket = dir.socket().display().to_string();
    assert!(
        msg.contains(&format!("no control socket at {socket}")),
        "{msg}"
    );
    assert!(msg.contains("pod shop/web-0"), "{msg}");
}

#[test]
fn add_fails_when_nobody_listens_on_the_socket() {
    let dir = TempDir::new("refused");
    // The file of an agent that is gone: binding creates it, dropping the listener keeps it.
    drop(UnixListener::bind(dir.socket()).expect("binding"));
    let error = error_of(&run("ADD", &config(&dir.0, 10_000)));
    assert_eq!(error["code"], 11, "{error}");
    let msg = error["msg"].as_str().unwrap_or("");
    let socket = dir.socket().display().to_string();
    assert!(
        msg.contains(&format!("connection refused at {socket}")),
        "{msg}"
    );
}

#[test]
fn add_fails_when_the_agent_fails() {
    let dir = TempDir::new("failed");
    let listener = UnixListener::bind(dir.socket()).expect("binding the fake agent");
    let agent = agent_answering(
        listener,
        r#"{"result":"failed","reason":"no veth for pod shop/web-0"}"#,
    );
    let error = error_of(&run("ADD", &config(&dir.0, 10_000)));
    assert_eq!(error["code"], 11, "{error}");
    assert!(
        error["msg"]
            .as_str()
            .unwrap_or("")
            .contains("no veth for pod shop/web-0"),
        "{error}"
    );
    agent.join().expect("the fake agent");
}

#[test]
fn del_succeeds_without_an_agent() {
    let dir = TempDir::new("del");
    let run = run("DEL", &config(&dir.0, 10_000));
    assert_eq!(
        run.status.code(),
        Some(0),
        "stdout {} stderr {}",
        run.stdout,
        run.stderr
    );
    assert_eq!(run.stdout, "");
    assert!(
        run.stderr.contains(&dir.socket().display().to_string()),
        "{}",
        run.stderr
    );
}

#[test]
fn del_tells_the_agent_to_forget_the_pod() {
    let dir = TempDir::new("forget");
    let listener = UnixListener::bind(dir.socket()).expect("binding the fake agent");
    let agent = agent_answering(listener, r#"{"result":"forgotten"}"#);
    let run = run("DEL", &config(&dir.0, 10_000));
    assert_eq!(
        (run.status.code(), run.stdout.as_str(), run.stderr.as_str()),
        (Some(0), "", "")
    );
    let line = agent.join().expect("the fake agent");
    let forget: Value =
        serde_json::from_str(line.strip_prefix("cni-del ").expect("DEL line")).unwrap();
    assert_eq!(
        forget,
        json!({"container_id": "8d2f6a4e1b3c", "namespace": "shop", "name": "web-0"})
    );
}

#[test]
fn version_lists_the_supported_versions() {
    let run = run("VERSION", br#"{"cniVersion":"1.0.0"}"#);
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    let info: Value = serde_json::from_str(&run.stdout).expect("version information");
    assert_eq!(
        info["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
}
