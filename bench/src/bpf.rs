//! Raw bpf syscalls the benchmark needs beside aya: loading the floor program (an empty classifier
//! that returns `TC_ACT_OK` at once, built from two instructions) and `BPF_PROG_TEST_RUN` on any
//! program fd, with the kernel's own per-run duration.

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

/// `union bpf_attr` is at most this big for the commands used here; unused bytes must be zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
    fn get_u32(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().unwrap())
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, writable bpf_attr-sized buffer for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Loads `mov r0, 0; exit` as a SCHED_CLS program: the cheapest classifier there is.
pub fn load_floor() -> io::Result<OwnedFd> {
    let insns: [u64; 2] = [
        0xb7, // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 0
        0x95, // BPF_JMP | BPF_EXIT
    ];
    let license = c"GPL";
    let mut attr = Attr::new();
    attr.u32(0, BPF_PROG_TYPE_SCHED_CLS);
    attr.u32(4, insns.len() as u32);
    attr.u64(8, insns.as_ptr() as u64);
    attr.u64(16, license.as_ptr() as u64);
    let name = b"bench_floor";
    attr.0[48..48 + name.len()].copy_from_slice(name);
    let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// One `BPF_PROG_TEST_RUN`: the program's return value and the kernel-measured average duration per
/// run in ns (the kernel times the repeat loop, without the syscall around it).
pub fn test_run(prog_fd: RawFd, data: &[u8], repeat: u32) -> io::Result<(u32, u32)> {
    let mut attr = Attr::new();
    attr.u32(0, prog_fd as u32);
    attr.u32(8, data.len() as u32);
    attr.u64(16, data.as_ptr() as u64);
    attr.u32(32, repeat);
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok((attr.get_u32(4), attr.get_u32(36)))
}

/// A scratch directory (for a bpffs); unmounted (lazily) and removed on drop.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> io::Result<Self> {
        let dir = Path::new("/run/netpol-bench").join(format!("{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch { dir })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Whatever was mounted below (the datapath mounts a bpffs at its pin root) goes first.
        for sub in ["pins", ""] {
            let p = self.dir.join(sub);
            if let Ok(c) = CString::new(p.as_os_str().as_bytes()) {
                // SAFETY: a valid NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Peak resident set size of this process (`VmHWM`), in KiB.
pub fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
