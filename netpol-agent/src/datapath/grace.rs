//! Waiting for an RCU grace period: until every BPF program that was running has finished.
//!
//! A TC program runs inside an RCU read-side section and reads the policy generation once, when its
//! packet arrives. A grace period after the writes into a buffer (and before the switch) makes every
//! packet that sees the new generation also see those writes, on weakly ordered CPUs too; one after
//! the switch makes sure no packet still reads the old buffer when the next update rewrites it.
//!
//! The kernel waits for one, whatever its configuration (one CPU, `nohz_full`, PREEMPT_RT), when
//! userspace updates a map-in-map (`maybe_wait_bpf_programs` calls `synchronize_rcu`): so a grace
//! period here is an update of a private one-slot `ARRAY_OF_MAPS`. aya has no userspace map-in-map
//! API, hence the two raw `bpf(2)` commands.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::Arc,
    thread::JoinHandle,
};

/// Whether a grace period must separate a buffer's writes from the switch to it. Not on x86, whose
/// loads are not reordered with older loads: a packet that reads the new generation then reads the
/// buffer as written before the switch. Weakly ordered CPUs (arm64) may read it first.
pub const BEFORE_SWITCH: bool = !cfg!(any(target_arch = "x86_64", target_arch = "x86"));

/// A grace period being waited for on a thread of its own, so that the switch it follows is not
/// delayed by it; the next update finishes it before writing.
#[derive(Debug)]
pub struct Pending(JoinHandle<io::Result<()>>);

impl Pending {
    /// Waits until it is over.
    pub fn finish(self) -> io::Result<()> {
        self.0
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the grace-period thread panicked")))
    }
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// A one-slot `ARRAY_OF_MAPS` and the map it holds; updating the slot waits for a grace period.
#[derive(Debug)]
pub struct Grace {
    outer: OwnedFd,
    inner: OwnedFd,
}

/// `union bpf_attr` as `BPF_MAP_CREATE` reads it (the fields up to `inner_map_fd`), zero-padded.
#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    _rest: [u64; 14],
}

/// `union bpf_attr` as `BPF_MAP_UPDATE_ELEM` reads it, zero-padded.
#[repr(C)]
#[derive(Default)]
struct MapUpdate {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
    _rest: [u64; 12],
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` prefix of the size passed; the kernel only
    // reads it for these commands.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn create(attr: &MapCreate) -> io::Result<OwnedFd> {
    let fd = bpf(BPF_MAP_CREATE, attr)?;
    // SAFETY: a new file descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl Grace {
    /// Creates the two maps.
    pub fn new() -> io::Result<Self> {
        let inner = create(&MapCreate {
            map_type: BPF_MAP_TYPE_ARRAY,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            ..MapCreate::default()
        })?;
        let outer = create(&MapCreate {
            map_type: BPF_MAP_TYPE_ARRAY_OF_MAPS,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            inner_map_fd: inner.as_raw_fd() as u32,
            ..MapCreate::default()
        })?;
        Ok(Grace { outer, inner })
    }

    /// Waits for a grace period on another thread.
    pub fn start(self: &Arc<Self>) -> Pending {
        let g = Arc::clone(self);
        Pending(std::thread::spawn(move || g.wait()))
    }

    /// Returns once every BPF program that started before the call has finished.
    pub fn wait(&self) -> io::Result<()> {
        let key = 0u32;
        let value = self.inner.as_raw_fd() as u32;
        bpf(
            BPF_MAP_UPDATE_ELEM,
            &MapUpdate {
                map_fd: self.outer.as_raw_fd() as u32,
                key: &key as *const u32 as u64,
                value: &value as *const u32 as u64,
                ..MapUpdate::default()
            },
        )
        .map(drop)
    }
}
