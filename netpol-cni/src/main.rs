//! `netpol-cni`: the chained CNI plugin. The container runtime runs it after Flannel's plugins
//! with `CNI_*` in the environment and the network configuration on stdin; it asks netpol-agent
//! over `<stateDir>/agent.sock` to program (`ADD`) or forget (`DEL`) the pod, prints the result
//! or a CNI error object on stdout, and exits 0 or 1. The CNI logic is in
//! [`netpol_cni::plugin`]; this file is the I/O.

use std::{
    io::{self, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use netpol_cni::plugin::{self, AgentClient, AgentError, CniEnv, CniError, code};

/// The most the plugin reads from the agent: an answer is a few hundred bytes.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

fn main() -> ExitCode {
    let env = CniEnv::from_vars(|key| std::env::var(key).ok());
    let mut stdin = Vec::new();
    let outcome = match io::stdin().read_to_end(&mut stdin) {
        Ok(_) => plugin::run(&env, &stdin, &mut UnixAgent),
        Err(e) => plugin::error_outcome(CniError::new(
            code::IO_FAILURE,
            format!("reading the network configuration from stdin: {e}"),
            "the container runtime writes it to the plugin's stdin",
        )),
    };
    // Nothing else can be reported if stdout or stderr is gone: the exit status still tells.
    let _ = io::stdout().write_all(outcome.stdout.as_bytes());
    let _ = io::stderr().write_all(outcome.stderr.as_bytes());
    ExitCode::from(outcome.exit_code)
}

/// The agent's control socket, over a Unix stream socket.
struct UnixAgent;

impl AgentClient for UnixAgent {
    fn exchange(
        &mut self,
        socket: &Path,
        line: &str,
        timeout: Duration,
    ) -> Result<Vec<u8>, AgentError> {
        let deadline = Instant::now() + timeout;
        let mut stream = connect(socket)?;
        let failed = |e| failure(socket, e, timeout);
        stream.set_write_timeout(Some(timeout)).map_err(failed)?;
        stream.write_all(line.as_bytes()).map_err(failed)?;
        read_to_eof(&mut stream, deadline, socket, timeout)
    }

    fn probe(&mut self, socket: &Path) -> Result<(), AgentError> {
        connect(socket).map(drop)
    }
}

/// Connects to `socket`, telling a missing socket and one nobody listens on from other errors.
fn connect(socket: &Path) -> Result<UnixStream, AgentError> {
    let path = socket.to_owned();
    UnixStream::connect(socket).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => AgentError::Missing { path },
        io::ErrorKind::ConnectionRefused => AgentError::Refused { path },
        _ => AgentError::Io { path, source },
    })
}

/// The agent's answer: everything until it closes the connection, by `deadline`.
fn read_to_eof(
    stream: &mut UnixStream,
    deadline: Instant,
    socket: &Path,
    timeout: Duration,
) -> Result<Vec<u8>, AgentError> {
    let mut answer = Vec::new();
    let mut chunk = [0_u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(failure(socket, io::ErrorKind::TimedOut.into(), timeout));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| failure(socket, e, timeout))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(answer),
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(failure(socket, e, timeout)),
        }
        if answer.len() > MAX_ANSWER_BYTES {
            let e = io::Error::other(format!("answer longer than {MAX_ANSWER_BYTES} bytes"));
            return Err(failure(socket, e, timeout));
        }
    }
}

/// An I/O error after connecting; a socket timeout is [`AgentError::Timeout`].
fn failure(socket: &Path, source: io::Error, timeout: Duration) -> AgentError {
    let path = socket.to_owned();
    match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => AgentError::Timeout {
            path,
            ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        },
        _ => AgentError::Io { path, source },
    }
}
