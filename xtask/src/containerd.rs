//! A private containerd for `cargo xtask image`: Debian's containerd with its own root, state,
//! socket and configuration under a fresh temporary directory, so that the archives are imported by
//! a real containerd without touching any other one on the machine. Stopped, and its directory
//! removed, when the value is dropped, also after a failure.
//!
//! [`check_import`] imports each archive with `ctr images import` into the namespace `k8s.io`
//! (K3s's), checks that `ctr images ls` lists the reference with the digest the build computed,
//! and runs the image of this machine's architecture with runc.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use crate::image::{Image, Meta};
use crate::repro::Scratch;
use crate::setup;

/// How long containerd may take to answer on its socket, and to exit once told to.
const DEADLINE: Duration = Duration::from_secs(30);

/// How often a wait looks at its condition again.
const POLL: Duration = Duration::from_millis(50);

/// Plugins the check does not need: the CRI server (it would look for CNI), `opt` (it writes to
/// `/opt/containerd`), and snapshotters for file systems that are not here.
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
];

/// A running private containerd.
pub struct Containerd {
    child: Child,
    /// `/run/containerd` and `/run/containerd/s` as they were before: containerd 1.6 puts its
    /// shims' sockets there whatever its state directory, and they are removed again only if
    /// they were not there and are empty.
    run_dirs_before: [bool; 2],
    // Last: dropped (removed) after `Drop::drop` has stopped containerd and unmounted.
    dir: Scratch,
}

/// Where containerd 1.6 puts shim sockets, parent first.
const SHIM_SOCKET_DIRS: [&str; 2] = ["/run/containerd", "/run/containerd/s"];

impl Containerd {
    /// Starts containerd in a new directory under the system's temporary directory and waits (up
    /// to 30 s) until it answers on its socket.
    pub fn start() -> anyhow::Result<Self> {
        let dir = Scratch::new("netpol-xtask-containerd")?;
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_toml(dir.path()))
            .with_context(|| format!("writing {}", config.display()))?;
        let log = std::fs::File::create(dir.path().join("containerd.log"))
            .context("creating containerd's log")?;
        let run_dirs_before = SHIM_SOCKET_DIRS.map(|d| Path::new(d).exists());
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd (Debian package containerd)")?;
        let mut containerd = Self {
            child,
            run_dirs_before,
            dir,
        };
        containerd.wait_ready()?;
        Ok(containerd)
    }

    /// Its socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// The directory everything of this containerd is under.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `ctr` talking to this containerd, in K3s's namespace `k8s.io`.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.socket())
            .args(["--namespace", "k8s.io"]);
        cmd
    }

    /// The end of containerd's log, for error messages.
    pub fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits until `ctr version` gets an answer from the server; fails early if containerd exits.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "containerd exited with {status} before answering; its log:\n{}",
                    self.log_tail()
                );
            }
            if self.socket().exists() && answers(&self.socket()) {
                return Ok(());
            }
            ensure!(
                start.elapsed() < DEADLINE,
                "containerd did not answer on {} within {DEADLINE:?}; its log:\n{}",
                self.socket().display(),
                self.log_tail()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Kills the shims started for this containerd, stops containerd (SIGTERM, then SIGKILL after
    /// the deadline), unmounts what is still mounted under its directory and removes it.
    fn stop(&mut self) -> anyhow::Result<()> {
        let ids = self.delete_containers();
        for pid in processes_naming(&self.socket()) {
            // SAFETY: kill has no memory preconditions; the pid is a shim started for our socket.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        self.remove_shim_sockets(&ids);
        // SAFETY: as above; the pid is our child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while self.child.try_wait()?.is_none() {
            if start.elapsed() > DEADLINE {
                self.child.kill()?;
                self.child.wait()?;
                break;
            }
            std::thread::sleep(POLL);
        }
        for mount in mounts_under(self.dir.path())? {
            check_quiet(Command::new("umount").args(["--lazy"]).arg(&mount))?;
        }
        for (dir, existed) in SHIM_SOCKET_DIRS.iter().zip(self.run_dirs_before).rev() {
            if !existed {
                // Fails, and is left, when not empty: then something else uses it.
                let _ = std::fs::remove_dir(dir);
            }
        }
        Ok(())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!(
                "xtask: cleaning up the private containerd in {}: {e:#}",
                self.dir.path().display()
            );
        }
    }
}

impl Containerd {
    /// Best effort: deletes every container this containerd still has, with its task (killing
    /// its processes, which would outlive a killed shim; the shim then exits and removes its
    /// socket). Returns the containers' ids.
    fn delete_containers(&self) -> Vec<String> {
        let Ok(out) = run_within(self.ctr().args(["containers", "ls", "--quiet"])) else {
            return Vec::new();
        };
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        for id in &ids {
            let _ = run_within(self.ctr().args(["tasks", "delete", "--force", id]));
            let _ = run_within(self.ctr().args(["containers", "delete", id]));
        }
        ids
    }

    /// Removes the shim sockets of containers `ids` that a killed shim left in
    /// `/run/containerd/s` (named, in containerd 1.6, by the sha256 of
    /// `<containerd's address>/<namespace>/<id>`).
    fn remove_shim_sockets(&self, ids: &[String]) {
        for id in ids {
            let key = self.socket().join("k8s.io").join(id);
            if let Ok(sum) = sha256_of(key.as_os_str().as_encoded_bytes()) {
                let _ = std::fs::remove_file(Path::new(SHIM_SOCKET_DIRS[1]).join(sum));
            }
        }
    }
}

/// The sha256 (hex) of `bytes`, with `sha256sum` (xtask links no hashing crate).
fn sha256_of(bytes: &[u8]) -> anyhow::Result<String> {
    use std::io::Write as _;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting sha256sum")?;
    child.stdin.take().context("stdin")?.write_all(bytes)?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "sha256sum failed");
    let printed = String::from_utf8_lossy(&out.stdout);
    Ok(printed
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// Imports every image's archive into a private containerd with `ctr images import` (as K3s's
/// images directory would: namespace `k8s.io`, the archive's own reference), checks the listed
/// reference, digest and platform, and runs the image of this machine's architecture. Needs root
/// (containerd does): otherwise says so and checks nothing.
pub fn check_import(images: &[Image], meta: &Meta) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("xtask: not root: the archives are not imported into containerd (it needs root)");
        return Ok(());
    }
    let started = Instant::now();
    let containerd = Containerd::start()?;
    for image in images {
        import(&containerd, image, meta)
            .with_context(|| format!("containerd importing {}", image.archive.display()))?;
        if image.arch.is_host() {
            run_image(&containerd, meta).context("containerd running the image")?;
        }
        // Both archives name the same reference: the next import must not find this one.
        let out = run_within(containerd.ctr().args(["images", "rm", &meta.reference()]))?;
        ensure!(out.status.success(), "ctr images rm: {}", stderr(&out));
    }
    eprintln!(
        "xtask: containerd {} imported every archive in {:.1?}",
        setup::debian_version("containerd").unwrap_or_default(),
        started.elapsed()
    );
    Ok(())
}

/// `ctr images import --platform linux/<arch>` (which also unpacks the layer, checking it against
/// the config's diff id), then the reference must be listed with `image`'s digest.
fn import(containerd: &Containerd, image: &Image, meta: &Meta) -> anyhow::Result<()> {
    let platform = format!("linux/{}", image.arch.oci);
    let out = run_within(
        containerd
            .ctr()
            .args(["images", "import", "--platform", &platform])
            .arg(&image.archive),
    )?;
    ensure!(
        out.status.success(),
        "ctr images import failed: {}; containerd's log:\n{}",
        stderr(&out),
        containerd.log_tail()
    );
    let out = run_within(containerd.ctr().args(["images", "ls"]))?;
    ensure!(
        out.status.success(),
        "ctr images ls failed: {}",
        stderr(&out)
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    let row = listed(&listing, &meta.reference()).with_context(|| {
        format!(
            "ctr images ls does not list {}:\n{listing}",
            meta.reference()
        )
    })?;
    ensure!(
        row.digest == image.digest && row.platforms == platform,
        "ctr images ls lists {} as {} for {}, the build made {} for {platform}",
        meta.reference(),
        row.digest,
        row.platforms,
        image.digest
    );
    Ok(())
}

/// One row of `ctr images ls`.
#[derive(Debug, PartialEq)]
struct Listed {
    digest: String,
    platforms: String,
}

/// The row of `reference` in the output of `ctr images ls` (columns REF TYPE DIGEST SIZE
/// PLATFORMS LABELS, the size in two words).
fn listed(listing: &str, reference: &str) -> Option<Listed> {
    listing.lines().skip(1).find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        (words.len() >= 6 && words[0] == reference).then(|| Listed {
            digest: words[2].to_owned(),
            platforms: words[5].to_owned(),
        })
    })
}

/// Runs the imported image with runc twice: `netpol-agent --version` prints the version, and the
/// image's own entrypoint and command (`netpol-agent run`) start the agent's `run`, which stops
/// at once on its missing `--node-name` (exit status 2, clap's usage error).
fn run_image(containerd: &Containerd, meta: &Meta) -> anyhow::Result<()> {
    let id = |what: &str| format!("netpol-xtask-{what}-{}", std::process::id());
    let out = run_within(
        ctr_run(containerd, meta, &id("version"))
            .args(["/usr/local/bin/netpol-agent", "--version"]),
    )?;
    let printed = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && printed.trim() == format!("netpol-agent {}", meta.version),
        "`ctr run ... netpol-agent --version` exited with {} and printed {printed:?}; stderr: {}",
        out.status,
        stderr(&out)
    );
    let out = run_within(&mut ctr_run(containerd, meta, &id("entrypoint")))?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2) && err.contains("Usage: netpol-agent run"),
        "the image's entrypoint and command did not start `netpol-agent run`: exit {}, stderr {err:?}",
        out.status
    );
    Ok(())
}

/// `ctr run --rm` of the image as container `id`, with runc's state and the I/O FIFOs under the
/// private directory (their defaults are under `/run/containerd`).
fn ctr_run(containerd: &Containerd, meta: &Meta, id: &str) -> Command {
    let mut cmd = containerd.ctr();
    cmd.args(["run", "--rm"])
        .arg("--fifo-dir")
        .arg(containerd.dir().join("fifo"))
        .arg("--runc-root")
        .arg(containerd.dir().join("runc"))
        .arg(meta.reference())
        .arg(id);
    cmd
}

/// Runs `cmd` to its end, killing it after the deadline.
fn run_within(cmd: &mut Command) -> anyhow::Result<std::process::Output> {
    use std::io::Read;
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {desc}"))?;
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().context("stdout")?));
    let err = drain(Box::new(child.stderr.take().context("stderr")?));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{desc} did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(POLL);
    };
    Ok(std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_owned()
}

/// The whole configuration: everything containerd writes stays under `dir`.
fn config_toml(dir: &Path) -> String {
    let disabled: Vec<String> = DISABLED_PLUGINS.iter().map(|p| format!("{p:?}")).collect();
    let d = dir.display();
    format!(
        "version = 2\n\
         root = \"{d}/root\"\n\
         state = \"{d}/state\"\n\
         disabled_plugins = [{}]\n\
         [grpc]\n  address = \"{d}/containerd.sock\"\n\
         [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n",
        disabled.join(", ")
    )
}

/// `ctr version` reaches the server.
fn answers(socket: &Path) -> bool {
    Command::new("ctr")
        .arg("--address")
        .arg(socket)
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The processes whose command line names `socket` (the shims this containerd started).
fn processes_naming(socket: &Path) -> Vec<i32> {
    let needle = socket.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
        })
        .collect()
}

/// Mount points under `dir`, deepest first.
fn mounts_under(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let mut mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    Ok(mounts)
}

fn check_quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let desc = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {desc}"))?;
    ensure!(
        out.status.success(),
        "{desc} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_image_is_found_with_its_digest_and_platform() {
        let listing = "REF                          TYPE                                       DIGEST                                                                  SIZE    PLATFORMS   LABELS \n\
            localhost/netpol-agent:0.1.0 application/vnd.oci.image.manifest.v1+json sha256:c16d 7.8 MiB linux/amd64 -      \n";
        assert_eq!(
            listed(listing, "localhost/netpol-agent:0.1.0"),
            Some(Listed {
                digest: "sha256:c16d".into(),
                platforms: "linux/amd64".into()
            })
        );
        assert_eq!(listed(listing, "localhost/netpol-agent:0.1"), None);
    }

    /// Everything of `containerd` is gone: no process names its socket, nothing is mounted under
    /// its directory, the directory is removed.
    fn assert_gone(dir: &Path, socket: &Path) {
        assert_eq!(
            processes_naming(socket),
            Vec::<i32>::new(),
            "processes left"
        );
        assert_eq!(
            mounts_under(dir).unwrap(),
            Vec::<PathBuf>::new(),
            "mounts left"
        );
        assert!(!dir.exists(), "{} is left", dir.display());
    }

    #[test]
    #[ignore = "needs root and Debian's containerd (`cargo xtask image` installs it)"]
    fn a_failed_import_still_stops_containerd_and_removes_its_directory() {
        let containerd = Containerd::start().unwrap();
        let (dir, socket) = (containerd.dir().to_owned(), containerd.socket());
        let junk = dir.join("junk.oci.tar");
        std::fs::write(&junk, b"not an archive").unwrap();
        let out = run_within(containerd.ctr().args(["images", "import"]).arg(&junk)).unwrap();
        assert!(!out.status.success(), "imported junk");
        drop(containerd);
        assert_gone(&dir, &socket);
    }

    #[test]
    #[ignore = "needs root, Debian's containerd and runc, and the amd64 archive of `cargo xtask image`"]
    fn a_task_left_behind_is_killed_and_unmounted_on_drop() {
        let root = crate::workspace_root();
        let version = crate::image::agent_version(&root).unwrap();
        let archive = crate::target_dir()
            .join("image")
            .join(format!("netpol-agent-{version}-amd64.oci.tar"));
        assert!(
            archive.is_file(),
            "{}: run cargo xtask image",
            archive.display()
        );
        let containerd = Containerd::start().unwrap();
        let (dir, socket) = (containerd.dir().to_owned(), containerd.socket());
        let out = run_within(containerd.ctr().args(["images", "import"]).arg(&archive)).unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        // Detached: once the process exits, the task stays, with its shim and its mounted rootfs.
        let mut run = containerd.ctr();
        run.args(["run", "--detach"])
            .arg("--fifo-dir")
            .arg(dir.join("fifo"))
            .arg("--runc-root")
            .arg(dir.join("runc"))
            .arg(format!("{}:{version}", crate::image::IMAGE_REPOSITORY))
            .args(["left-behind", "/usr/local/bin/netpol-agent", "--version"]);
        let out = run_within(&mut run).unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(!processes_naming(&socket).is_empty(), "no shim to clean up");
        let run_dirs_before = containerd.run_dirs_before;
        assert!(!mounts_under(&dir).unwrap().is_empty(), "no rootfs mounted");
        drop(containerd);
        assert_gone(&dir, &socket);
        for (d, before) in SHIM_SOCKET_DIRS.iter().zip(run_dirs_before) {
            assert_eq!(Path::new(d).exists(), before, "{d}");
        }
    }

    #[test]
    fn config_keeps_every_path_under_the_directory() {
        let config = config_toml(Path::new("/tmp/x"));
        for line in config.lines().filter(|l| l.contains('/')) {
            assert!(line.contains("\"/tmp/x/"), "{line}");
        }
        assert!(config.contains("\"io.containerd.grpc.v1.cri\""), "{config}");
    }
}
