//! Waiting until no packet still reads the buffer the datapath just switched away from.
//!
//! A TC program runs inside an RCU read-side section and reads the generation once, when its packet
//! arrives; so once an RCU grace period has passed after the switch, every packet still being judged
//! reads the new buffer and the old one may be rewritten. `membarrier(MEMBARRIER_CMD_GLOBAL)` is the
//! kernel's way to wait for a grace period from userspace (it calls `synchronize_rcu`); libc exposes
//! only the syscall number and rustix is not otherwise needed, hence the raw call.

use std::{sync::atomic::AtomicBool, time::Duration};

/// `MEMBARRIER_CMD_GLOBAL` (linux/membarrier.h).
const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;

/// When `membarrier` cannot be used (`nohz_full` kernels refuse it, a seccomp profile may forbid
/// it): a wait far longer than a TC program runs (microseconds), so readers are gone all the same.
const FALLBACK: Duration = Duration::from_millis(50);

static WARNED: AtomicBool = AtomicBool::new(false);

/// Returns once every BPF program that started before the call has finished.
pub fn wait_for_readers() {
    // SAFETY: membarrier takes plain integers and touches no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            MEMBARRIER_CMD_GLOBAL,
            0 as libc::c_uint,
            0 as libc::c_int,
        )
    };
    if rc == 0 {
        return;
    }
    let error = std::io::Error::last_os_error();
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(%error, fallback_ms = FALLBACK.as_millis() as u64,
            "membarrier(MEMBARRIER_CMD_GLOBAL) failed: waiting a fixed time after each buffer switch instead");
    }
    std::thread::sleep(FALLBACK);
}

#[cfg(test)]
mod tests {
    #[test]
    fn membarrier_works_here() {
        // SAFETY: as above.
        let rc = unsafe { libc::syscall(libc::SYS_membarrier, super::MEMBARRIER_CMD_GLOBAL, 0, 0) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }
}
