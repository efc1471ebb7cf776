//! The pin-path scheme under `--pin-dir`, and the bpffs it lives on. One place owns it.
//!
//! ```text
//! <pin-dir>/maps/<MAP_NAME>            pinned maps (names from netpol_common::map_names)
//! <pin-dir>/links/<ifindex>-<hook>     pinned TCX links: two per pod veth, one per Flannel VXLAN device
//! ```

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use thiserror::Error;

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Errors of the pin directory.
#[derive(Debug, Error)]
pub enum PinError {
    #[error("creating pin directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mounting a bpffs at {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("statfs of {path}")]
    Statfs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A TC hook the agent attaches to: the two of a pod's host-side veth, named for the pod's
/// direction, and the egress of a Flannel VXLAN device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// TC ingress of the host veth: what the pod sends.
    PodEgress,
    /// TC egress of the host veth: what the pod receives.
    PodIngress,
    /// TC egress of `flannel.1` / `flannel-v6.1`: pod traffic to other nodes, after kube-proxy's
    /// DNAT, where egress through a Service to a remote backend is decided.
    Tunnel,
}

impl Hook {
    /// The hooks of a pod veth.
    pub const ALL: [Hook; 2] = [Hook::PodEgress, Hook::PodIngress];

    /// The name used in pin paths and in `status`.
    pub const fn name(self) -> &'static str {
        match self {
            Hook::PodEgress => "egress",
            Hook::PodIngress => "ingress",
            Hook::Tunnel => "tunnel",
        }
    }

    /// The eBPF program attached at this hook.
    pub const fn program(self) -> &'static str {
        match self {
            Hook::PodEgress => netpol_common::program_names::POD_EGRESS,
            Hook::PodIngress => netpol_common::program_names::POD_INGRESS,
            Hook::Tunnel => netpol_common::program_names::TUNNEL_EGRESS,
        }
    }

    /// The TC attach point on the device.
    pub fn tc_attach_type(self) -> aya::programs::TcAttachType {
        match self {
            Hook::PodEgress => aya::programs::TcAttachType::Ingress,
            Hook::PodIngress | Hook::Tunnel => aya::programs::TcAttachType::Egress,
        }
    }
}

/// The layout of one agent's pin directory.
#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    /// The layout rooted at `--pin-dir`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        PinLayout { root: root.into() }
    }

    /// `--pin-dir` itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of the pinned maps.
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    /// Directory of the pinned links.
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// Pin path of the link of `hook` on the veth with `ifindex`.
    pub fn link(&self, ifindex: u32, hook: Hook) -> PathBuf {
        self.links_dir().join(format!("{ifindex}-{}", hook.name()))
    }

    /// Parses a link pin file name back into its ifindex and hook.
    pub fn parse_link_name(name: &str) -> Option<(u32, Hook)> {
        let (ifindex, hook) = name.split_once('-')?;
        let hook = [Hook::PodEgress, Hook::PodIngress, Hook::Tunnel]
            .into_iter()
            .find(|h| h.name() == hook)?;
        Some((ifindex.parse().ok()?, hook))
    }

    /// Creates the directories, mounting a bpffs at the root first when the root is not on one
    /// (as Cilium does: a new machine has nothing at /sys/fs/bpf, and `ip netns exec` hides it).
    pub fn prepare(&self) -> Result<(), PinError> {
        create_dir(&self.root)?;
        if !is_bpffs(&self.root)? {
            mount_bpffs(&self.root)?;
        }
        create_dir(&self.maps_dir())?;
        create_dir(&self.links_dir())
    }
}

fn create_dir(path: &Path) -> Result<(), PinError> {
    std::fs::create_dir_all(path).map_err(|source| PinError::CreateDir {
        path: path.to_owned(),
        source,
    })
}

fn c_path(path: &Path) -> CString {
    // Paths come from the command line, which cannot carry NUL bytes.
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

/// True when `path` is on a bpffs.
pub fn is_bpffs(path: &Path) -> Result<bool, PinError> {
    let c = c_path(path);
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(PinError::Statfs {
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

fn mount_bpffs(path: &Path) -> Result<(), PinError> {
    let target = c_path(path);
    let fstype = c"bpf";
    // SAFETY: every pointer is a valid NUL-terminated string; data may be null.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(PinError::Mount {
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    tracing::info!(path = %path.display(), "mounted a bpffs for the pin directory");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_round_trip() {
        let layout = PinLayout::new("/run/x");
        for hook in [Hook::PodEgress, Hook::PodIngress, Hook::Tunnel] {
            let path = layout.link(42, hook);
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            assert_eq!(PinLayout::parse_link_name(name), Some((42, hook)));
        }
        assert_eq!(PinLayout::parse_link_name("42-sideways"), None);
        assert_eq!(PinLayout::parse_link_name("x-egress"), None);
    }
}
