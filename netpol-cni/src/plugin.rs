//! The CNI side of the plugin, without I/O: the command from the environment, the network
//! configuration from stdin, what to ask the agent and what to print.
//!
//! The plugin only chains (it needs `prevResult`). On `ADD` it asks the agent to program the new
//! pod's endpoint and passes `prevResult` on once the agent says it has; any failure is CNI error
//! 11 (try again later), so the sandbox is not created and the kubelet retries it rather than
//! starting the pod unpoliced. `DEL` tells the agent to forget the pod and always succeeds.
//! The socket I/O is behind [`AgentClient`], so tests use a fake agent.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::protocol::{self, Answer, EndpointClaim, Forget};

/// CNI specification versions this plugin accepts in `cniVersion`, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The agent's default `--state-dir`, used when the configuration has no `stateDir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/netpol-agent";
/// File name of the agent's control socket inside the state directory.
pub const SOCKET_NAME: &str = "agent.sock";
/// How long `ADD` waits for the agent when the configuration has no `timeoutMs`.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// The most `DEL` waits for the agent: teardown must never be held up.
pub const DEL_TIMEOUT_MS: u64 = 2_000;

/// Well-known CNI error codes this plugin returns.
pub mod code {
    /// The configuration's `cniVersion` is not supported (or does not allow the command).
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// A necessary environment variable (`CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_ARGS`, ...) is
    /// missing or invalid.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure (reading stdin).
    pub const IO_FAILURE: u32 = 5;
    /// The configuration on stdin is not JSON of the expected shape.
    pub const DECODE_FAILURE: u32 = 6;
    /// The network configuration is invalid (no `prevResult`, a bad address in it, ...).
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later: the agent did not program the endpoint.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// `STATUS`: the plugin cannot serve `ADD`s (the agent is not reachable).
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
}

/// The CNI environment variables the plugin reads; an empty string stands for an unset variable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS` (`K=V;K=V`).
    pub args: String,
}

impl CniEnv {
    /// Reads the variables through `var` (`|k| std::env::var(k).ok()` in the binary).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let get = |key: &str| var(key).unwrap_or_default();
        Self {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
        }
    }
}

/// The plugin's network configuration (stdin); unknown fields (`runtimeConfig`, `args`, ...) are
/// ignored.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// Specification version of the configuration (and of `prevResult`).
    #[serde(default)]
    pub cni_version: String,
    /// Network name.
    #[serde(default)]
    pub name: String,
    /// Plugin type (`netpol-cni`).
    #[serde(default, rename = "type")]
    pub plugin_type: String,
    /// The agent's `--state-dir` (default [`DEFAULT_STATE_DIR`]).
    pub state_dir: Option<PathBuf>,
    /// How long `ADD` waits for the agent, in milliseconds (default [`DEFAULT_TIMEOUT_MS`]).
    pub timeout_ms: Option<u64>,
    /// The result of the previous plugin in the chain.
    pub prev_result: Option<Value>,
}

impl NetConf {
    /// The agent's control socket.
    pub fn socket(&self) -> PathBuf {
        let dir = self.state_dir.as_deref();
        dir.unwrap_or(Path::new(DEFAULT_STATE_DIR))
            .join(SOCKET_NAME)
    }

    /// How long `ADD` waits for the agent.
    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS)
    }
}

/// Why the agent could not be asked, as the binary's socket client reports it.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Nothing at the socket path.
    #[error("there is no control socket at {} (is netpol-agent running with this state directory?)", path.display())]
    Missing {
        /// The socket path.
        path: PathBuf,
    },
    /// A socket file without a listener: the agent is not running.
    #[error("connection refused at {} (netpol-agent is not running)", path.display())]
    Refused {
        /// The socket path.
        path: PathBuf,
    },
    /// The agent did not answer (and close) in time.
    #[error("no answer from the agent at {} within {ms} ms", path.display())]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// The time allowed.
        ms: u64,
    },
    /// Any other socket error.
    #[error("talking to the agent at {}: {source}", path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The agent's control socket, as the plugin uses it.
pub trait AgentClient {
    /// Connects to `socket`, writes `line` and returns what the agent writes before it closes the
    /// connection, all within `timeout`.
    fn exchange(
        &mut self,
        socket: &Path,
        line: &str,
        timeout: Duration,
    ) -> Result<Vec<u8>, AgentError>;

    /// Succeeds when `socket` accepts a connection.
    fn probe(&mut self, socket: &Path) -> Result<(), AgentError>;
}

/// A CNI error object, printed on stdout with a non-zero exit status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{msg}; {details}")]
pub struct CniError {
    /// Filled in by [`run`] with the configuration's version.
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// Well-known error code (see [`code`]).
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer explanation.
    pub details: String,
}

impl CniError {
    /// An error with `code`; [`run`] sets its `cniVersion`.
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        let (msg, details) = (msg.into(), details.into());
        let cni_version = String::new();
        Self {
            cni_version,
            code,
            msg,
            details,
        }
    }
}

/// What the binary prints and how it exits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// For stdout: the result, the version information or the error object (or nothing).
    pub stdout: String,
    /// For stderr: a note for the runtime's log (a `DEL` the agent did not get), or nothing.
    pub stderr: String,
    /// Exit status: 0 on success, 1 on error.
    pub exit_code: u8,
}

/// The commands of the CNI specification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    fn parse(command: &str) -> Result<Self, CniError> {
        Ok(match command {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            "VERSION" => Self::Version,
            "" => return Err(invalid_env("CNI_COMMAND is not set")),
            other => return Err(invalid_env(format!("unknown CNI_COMMAND {other:?}"))),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Status => "STATUS",
            Self::Gc => "GC",
            Self::Version => "VERSION",
        }
    }

    /// The oldest specification version that has the command.
    fn since(self) -> &'static str {
        match self {
            Self::Check => "0.4.0",
            Self::Status | Self::Gc => "1.1.0",
            Self::Add | Self::Del | Self::Version => SUPPORTED_VERSIONS[0],
        }
    }
}

/// Runs one plugin invocation: `env` and `stdin` in, what to print and the exit status out.
pub fn run(env: &CniEnv, stdin: &[u8], agent: &mut impl AgentClient) -> Outcome {
    let mut stderr = String::new();
    match dispatch(env, stdin, agent, &mut stderr) {
        Ok(stdout) => Outcome {
            stdout,
            stderr,
            exit_code: 0,
        },
        Err(error) => Outcome {
            stdout: error_json(error, stdin),
            stderr,
            exit_code: 1,
        },
    }
}

/// The error object for a failure before or without a usable configuration (stdin unreadable).
pub fn error_outcome(error: CniError) -> Outcome {
    Outcome {
        stdout: error_json(error, b""),
        stderr: String::new(),
        exit_code: 1,
    }
}

fn dispatch(
    env: &CniEnv,
    stdin: &[u8],
    agent: &mut impl AgentClient,
    stderr: &mut String,
) -> Result<String, CniError> {
    let command = Command::parse(&env.command)?;
    if command == Command::Version {
        return Ok(version_info());
    }
    let conf = parse_conf(stdin, command)?;
    match command {
        Command::Add => add(&conf, env, agent),
        Command::Del => del(&conf, env, agent, stderr),
        Command::Check => check(&conf),
        Command::Status => status(&conf, agent),
        Command::Gc | Command::Version => Ok(String::new()),
    }
}

/// The `VERSION` answer.
fn version_info() -> String {
    let latest = SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1];
    let info = serde_json::json!({ "cniVersion": latest, "supportedVersions": SUPPORTED_VERSIONS });
    format!("{info}\n")
}

/// Decodes the configuration and checks that its version is supported and has `command`.
fn parse_conf(stdin: &[u8], command: Command) -> Result<NetConf, CniError> {
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        let msg = format!("the network configuration on stdin is not valid: {e}");
        CniError::new(
            code::DECODE_FAILURE,
            msg,
            "expected a CNI network configuration (JSON)",
        )
    })?;
    let supported = format!("this plugin supports {}", SUPPORTED_VERSIONS.join(", "));
    let Some(index) = version_index(&conf.cni_version) else {
        let msg = format!("incompatible CNI version {:?}", conf.cni_version);
        return Err(CniError::new(code::INCOMPATIBLE_VERSION, msg, supported));
    };
    if version_index(command.since()).is_some_and(|since| index < since) {
        let msg = format!(
            "CNI version {} does not have {} (it came with {})",
            conf.cni_version,
            command.name(),
            command.since()
        );
        return Err(CniError::new(code::INCOMPATIBLE_VERSION, msg, supported));
    }
    if conf.timeout_ms == Some(0) {
        let msg = "timeoutMs must be at least 1";
        return Err(CniError::new(
            code::INVALID_CONFIG,
            msg,
            "it is in milliseconds",
        ));
    }
    Ok(conf)
}

fn version_index(version: &str) -> Option<usize> {
    SUPPORTED_VERSIONS.iter().position(|v| *v == version)
}

/// `error` as printed: `cniVersion` is the configuration's when that is supported.
fn error_json(mut error: CniError, stdin: &[u8]) -> String {
    #[derive(Deserialize)]
    struct VersionOnly {
        #[serde(rename = "cniVersion")]
        cni_version: String,
    }
    let latest = SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1];
    error.cni_version = serde_json::from_slice::<VersionOnly>(stdin)
        .ok()
        .map(|v| v.cni_version)
        .filter(|v| version_index(v).is_some())
        .unwrap_or_else(|| latest.to_owned());
    // A struct of strings and a number always serializes.
    let json = serde_json::to_string(&error).unwrap_or_default();
    format!("{json}\n")
}

fn invalid_env(msg: impl Into<String>) -> CniError {
    let details = "the container runtime sets the CNI_* variables (CNI specification)";
    CniError::new(code::INVALID_ENV, msg, details)
}

/// `ADD`: ask the agent to program the endpoint; pass `prevResult` on once it has.
fn add(conf: &NetConf, env: &CniEnv, agent: &mut impl AgentClient) -> Result<String, CniError> {
    let prev = prev_result(conf)?;
    let claim = endpoint_claim(conf, env, prev)?;
    let socket = conf.socket();
    let line = protocol::request_line(protocol::ADD_VERB, &claim);
    let timeout = Duration::from_millis(claim.timeout_ms);
    let reply = agent.exchange(&socket, &line, timeout);
    let reply = reply.map_err(|e| not_programmed(&claim, &socket, &e.to_string()))?;
    let failure = match serde_json::from_slice::<Answer>(&reply) {
        Ok(Answer::Programmed { .. }) => return Ok(echo(prev, &conf.cni_version)),
        Ok(Answer::Failed { reason }) => {
            format!("the agent at {} answered: {reason}", socket.display())
        }
        Ok(Answer::Forgotten) => format!(
            "the agent at {} answered \"forgotten\" to {}",
            socket.display(),
            protocol::ADD_VERB
        ),
        Err(e) => format!(
            "the agent at {} gave no answer to {} ({e}; is it older than this plugin?): {:.200}",
            socket.display(),
            protocol::ADD_VERB,
            String::from_utf8_lossy(&reply)
        ),
    };
    Err(not_programmed(&claim, &socket, &failure))
}

/// The error for an endpoint the agent did not program.
fn not_programmed(claim: &EndpointClaim, socket: &Path, cause: &str) -> CniError {
    let msg = format!(
        "netpol-agent did not program pod {}/{}: {cause}",
        claim.namespace, claim.name
    );
    let details = format!(
        "the pod is not started unpoliced: creating its sandbox fails and the kubelet retries it \
         (container {}, netns {}, agent socket {})",
        claim.container_id,
        claim.netns,
        socket.display()
    );
    CniError::new(code::TRY_AGAIN_LATER, msg, details)
}

/// `prevResult`, which this plugin needs: it only runs chained after the plugin that created the
/// interfaces.
fn prev_result(conf: &NetConf) -> Result<&serde_json::Map<String, Value>, CniError> {
    match &conf.prev_result {
        Some(Value::Object(prev)) => Ok(prev),
        Some(_) => Err(CniError::new(
            code::INVALID_CONFIG,
            "prevResult is not a JSON object",
            "the runtime passes the previous plugin's result as prevResult",
        )),
        None => Err(CniError::new(
            code::INVALID_CONFIG,
            "the configuration has no prevResult: netpol-cni only runs chained after the plugin \
             that creates the pod's interfaces",
            "put netpol-cni last in the plugins of a conflist (deploy/cni/10-flannel-netpol.conflist)",
        )),
    }
}

/// `prev` with the configuration's `cniVersion`, as printed on success.
fn echo(prev: &serde_json::Map<String, Value>, cni_version: &str) -> String {
    let mut result = prev.clone();
    result.insert("cniVersion".into(), Value::String(cni_version.into()));
    format!("{}\n", Value::Object(result))
}

/// The claim `ADD` sends: the environment, the pod from `CNI_ARGS`, addresses and host
/// interfaces from `prev`.
fn endpoint_claim(
    conf: &NetConf,
    env: &CniEnv,
    prev: &serde_json::Map<String, Value>,
) -> Result<EndpointClaim, CniError> {
    let container_id = required(&env.container_id, "CNI_CONTAINERID")?;
    let netns = required(&env.netns, "CNI_NETNS")?;
    let args = cni_args(&env.args);
    Ok(EndpointClaim {
        container_id,
        namespace: pod_arg(&args, "K8S_POD_NAMESPACE")?,
        name: pod_arg(&args, "K8S_POD_NAME")?,
        ips: addresses(prev)?,
        netns,
        host_interfaces: host_interfaces(prev),
        timeout_ms: conf.timeout_ms(),
    })
}

fn required(value: &str, name: &str) -> Result<String, CniError> {
    if value.is_empty() {
        return Err(invalid_env(format!("{name} is not set")));
    }
    Ok(value.to_owned())
}

/// The `K=V` pairs of `CNI_ARGS`, trimmed; pairs without `=` are skipped. Keys the plugin does not
/// use (`IgnoreUnknown`, `K8S_POD_UID`, `K8S_POD_INFRA_CONTAINER_ID`, ...) are simply not looked up.
pub fn cni_args(args: &str) -> Vec<(&str, &str)> {
    let pairs = args.split(';').filter_map(|pair| pair.split_once('='));
    pairs.map(|(k, v)| (k.trim(), v.trim())).collect()
}

fn arg<'a>(args: &[(&str, &'a str)], key: &str) -> Option<&'a str> {
    let value = args.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| *v);
    value.filter(|v| !v.is_empty())
}

fn pod_arg(args: &[(&str, &str)], key: &str) -> Result<String, CniError> {
    arg(args, key).map(str::to_owned).ok_or_else(|| {
        CniError::new(
            code::INVALID_ENV,
            format!("CNI_ARGS has no {key}: netpol-cni needs the pod's namespace and name"),
            "the kubelet's runtime passes K8S_POD_NAMESPACE and K8S_POD_NAME in CNI_ARGS for \
             every pod sandbox",
        )
    })
}

/// `prev.ips[].address` without prefix lengths, sorted, without duplicates.
fn addresses(prev: &serde_json::Map<String, Value>) -> Result<Vec<IpAddr>, CniError> {
    let entries = prev.get("ips").and_then(Value::as_array).map(Vec::as_slice);
    let mut ips = Vec::new();
    for (i, entry) in entries.unwrap_or_default().iter().enumerate() {
        let address = entry.get("address").and_then(Value::as_str).unwrap_or("");
        let ip = address.split('/').next().and_then(|ip| ip.parse().ok());
        ips.push(ip.ok_or_else(|| {
            let msg = format!("prevResult.ips[{i}].address {address:?} is not an address");
            CniError::new(
                code::INVALID_CONFIG,
                msg,
                "expected CIDR notation, 10.42.0.12/24",
            )
        })?);
    }
    ips.sort_unstable();
    ips.dedup();
    Ok(ips)
}

/// The names of `prev.interfaces` without a `sandbox` (the host side).
fn host_interfaces(prev: &serde_json::Map<String, Value>) -> Vec<String> {
    let interfaces = prev.get("interfaces").and_then(Value::as_array);
    let host = interfaces.into_iter().flatten().filter(|i| {
        let sandbox = i.get("sandbox").and_then(Value::as_str);
        sandbox.is_none_or(str::is_empty)
    });
    let names = host.filter_map(|i| i.get("name").and_then(Value::as_str));
    names.map(str::to_owned).collect()
}

/// `DEL`: tell the agent to forget the pod; succeeds whatever the agent says or whether it is
/// there at all, within [`DEL_TIMEOUT_MS`].
fn del(
    conf: &NetConf,
    env: &CniEnv,
    agent: &mut impl AgentClient,
    stderr: &mut String,
) -> Result<String, CniError> {
    let container_id = required(&env.container_id, "CNI_CONTAINERID")?;
    let args = cni_args(&env.args);
    let forget = Forget {
        container_id,
        namespace: arg(&args, "K8S_POD_NAMESPACE").unwrap_or_default().into(),
        name: arg(&args, "K8S_POD_NAME").unwrap_or_default().into(),
    };
    let line = protocol::request_line(protocol::DEL_VERB, &forget);
    let timeout = Duration::from_millis(conf.timeout_ms().min(DEL_TIMEOUT_MS));
    let reply = agent.exchange(&conf.socket(), &line, timeout);
    let answer = reply.map(|r| serde_json::from_slice::<Answer>(&r));
    let pod = format!("{}/{}", forget.namespace, forget.name);
    let note = match answer {
        Ok(Ok(Answer::Forgotten)) => return Ok(String::new()),
        Ok(Ok(other)) => format!("the agent answered {other:?}"),
        Ok(Err(e)) => format!("the agent's answer was not understood ({e})"),
        Err(e) => e.to_string(),
    };
    *stderr = format!(
        "netpol-cni: DEL of pod {pod} (container {}) succeeds anyway: {note}\n",
        forget.container_id
    );
    Ok(String::new())
}

/// `CHECK`: the plugin keeps no state of its own; it needs `prevResult` like `ADD`.
fn check(conf: &NetConf) -> Result<String, CniError> {
    prev_result(conf).map(|_| String::new())
}

/// `STATUS`: ready when the agent's socket accepts a connection.
fn status(conf: &NetConf, agent: &mut impl AgentClient) -> Result<String, CniError> {
    agent
        .probe(&conf.socket())
        .map(|()| String::new())
        .map_err(|e| {
            CniError::new(
                code::PLUGIN_NOT_AVAILABLE,
                format!("netpol-agent is not available: {e}"),
                "new pods are not started on this node until the agent runs; running pods are \
             unaffected",
            )
        })
}

#[cfg(test)]
mod tests;
