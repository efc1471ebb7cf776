//! The datapath: the embedded eBPF object, its pinned maps, and the TC attachments on pod veths.

/// The compiled `netpol-ebpf` object (both classifier programs and every map), built by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netpol"));
