//! A new pod that talks from its first instant, and the CNI plugin run as the container runtime
//! runs it: shared by the first-packet tests and the first-packet benchmark.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Output, Stdio};

use anyhow::{Context as _, bail};

use crate::cluster::{Cluster, Pod};

/// The UDP port the counting receiver listens on in the target pod.
pub const COUNT_PORT: u16 = 9099;

/// A `netpol-probe` process whose JSON result (its last stdout line) is read when it ends; killed
/// when dropped.
pub struct Running {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Running {
    /// `netpol-probe ARGS` in `netns`.
    pub fn spawn(probe_bin: &Path, netns: &str, args: &[&str]) -> anyhow::Result<Running> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(probe_bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning netpol-probe")?;
        let out = BufReader::new(child.stdout.take().context("piped stdout")?);
        Ok(Running { child, out })
    }

    /// `netpol-probe count` on [`COUNT_PORT`] in `netns` for `for_ms`, once it listens.
    pub fn counter(probe_bin: &Path, netns: &str, for_ms: u64) -> anyhow::Result<Running> {
        Running::counter_on(probe_bin, netns, COUNT_PORT, for_ms)
    }

    /// `netpol-probe count` on UDP `port` in `netns` for `for_ms`, once it listens.
    pub fn counter_on(
        probe_bin: &Path,
        netns: &str,
        port: u16,
        for_ms: u64,
    ) -> anyhow::Result<Running> {
        let (port, ms) = (port.to_string(), for_ms.to_string());
        let mut r = Running::spawn(
            probe_bin,
            netns,
            &["count", "--port", &port, "--for-ms", &ms],
        )?;
        let mut line = String::new();
        r.out.read_line(&mut line)?;
        if line.trim() != "READY" {
            bail!("the counter said {line:?} instead of READY");
        }
        Ok(r)
    }

    /// `netpol-probe ticker` from `pod` to the counter in `target`, every `every_ms` for `for_ms`.
    pub fn ticker(
        probe_bin: &Path,
        pod: &Pod,
        target: &Pod,
        every_ms: u64,
        for_ms: u64,
    ) -> anyhow::Result<Running> {
        Running::ticker_to(probe_bin, pod, target, COUNT_PORT, every_ms, for_ms)
    }

    /// `netpol-probe ticker` from `pod` to UDP `port` of `target`, every `every_ms` for `for_ms`.
    pub fn ticker_to(
        probe_bin: &Path,
        pod: &Pod,
        target: &Pod,
        port: u16,
        every_ms: u64,
        for_ms: u64,
    ) -> anyhow::Result<Running> {
        let to = format!("udp/{}/{port}", target.ipv4);
        let (every, ms) = (every_ms.to_string(), for_ms.to_string());
        Running::spawn(
            probe_bin,
            &pod.netns,
            &["ticker", "--every-ms", &every, "--for-ms", &ms, &to],
        )
    }

    /// Waits for the end and reads the result.
    pub fn result(mut self) -> anyhow::Result<serde_json::Value> {
        let mut out = String::new();
        self.out.read_to_string(&mut out)?;
        let _ = self.child.wait();
        let last = out.lines().last().unwrap_or_default();
        serde_json::from_str(last).with_context(|| format!("probe result {last:?}"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the kubelet hands the CNI plugins after Flannel's bridge plugin: the prevResult of `pod`,
/// with `netpol-cni`'s own settings (the node's state directory).
pub fn cni_config(c: &Cluster, pod: &Pod) -> String {
    let n = &c.nodes[pod.node];
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "cbr0",
        "type": "netpol-cni",
        "stateDir": n.state_dir,
        "timeoutMs": 10000,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "0e:00:00:00:00:01"},
                {"name": pod.host_veth, "mac": "0e:00:00:00:00:02"},
                {"name": "eth0", "mac": "0e:00:00:00:00:03", "sandbox": format!("/var/run/netns/{}", pod.netns)},
            ],
            "ips": [
                {"address": format!("{}/24", pod.ipv4), "gateway": n.gateway_v4().to_string(), "interface": 2},
                {"address": format!("{}/64", pod.ipv6), "gateway": n.gateway_v6().to_string(), "interface": 2},
            ],
        },
    })
    .to_string()
}

/// Runs `netpol-cni` (`command`: ADD, DEL, ...) for `pod` as the container runtime does: `CNI_*`
/// in the environment, the configuration on stdin.
pub fn run_cni(cni_bin: &Path, c: &Cluster, pod: &Pod, command: &str) -> anyhow::Result<Output> {
    let mut child = Command::new(cni_bin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.uid)
        .env("CNI_NETNS", format!("/var/run/netns/{}", pod.netns))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
                pod.namespace, pod.name, pod.uid
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", cni_bin.display()))?;
    child
        .stdin
        .take()
        .context("piped stdin")?
        .write_all(cni_config(c, pod).as_bytes())?;
    Ok(child.wait_with_output()?)
}
