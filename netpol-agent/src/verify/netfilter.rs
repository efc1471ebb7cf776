//! The names of the node's packet-filter chains, read from the kernel: nftables over netlink (the
//! rules of iptables-nft are nftables chains) and legacy iptables through its getsockopt interface,
//! both address families. The agent's image has no iptables-save to ask. Written by hand: the crates
//! that speak these interfaces wrap libnftnl or libiptc (C libraries a static binary from scratch
//! cannot carry), and chain names are a small part of each protocol.

use std::{io, mem::size_of, os::fd::AsRawFd as _};

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

/// `NFNL_SUBSYS_NFTABLES` (linux/netfilter/nfnetlink.h) in the high byte of a message type.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NFT_MSG_NEWCHAIN` / `NFT_MSG_GETCHAIN` (linux/netfilter/nf_tables.h).
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
/// `NFTA_CHAIN_NAME`.
const NFTA_CHAIN_NAME: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `struct nlmsghdr` and `struct nfgenmsg`.
const NLMSG_HDR: usize = 16;
const NFGENMSG: usize = 4;

/// Every nftables chain of this network namespace, all tables and families.
pub fn nft_chains() -> io::Result<Vec<String>> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut req = Vec::with_capacity(NLMSG_HDR + NFGENMSG);
    req.extend(((NLMSG_HDR + NFGENMSG) as u32).to_ne_bytes());
    req.extend(((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETCHAIN).to_ne_bytes());
    req.extend((NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend(1u32.to_ne_bytes());
    req.extend(0u32.to_ne_bytes());
    // nfgenmsg: NFPROTO_UNSPEC (every family), NFNETLINK_V0, res_id 0.
    req.extend([0u8, 0, 0, 0]);
    socket.send(&req, 0)?;
    let mut names = Vec::new();
    loop {
        let (data, _) = socket.recv_from_full()?;
        if read_chain_messages(&data, &mut names)? {
            return Ok(names);
        }
    }
}

/// Adds the chain names of the netlink messages in `data` to `names`; true at the end of the dump.
fn read_chain_messages(data: &[u8], names: &mut Vec<String>) -> io::Result<bool> {
    let mut off = 0;
    while off + NLMSG_HDR <= data.len() {
        let len = u32_at(data, off) as usize;
        let kind = u16::from_ne_bytes([data[off + 4], data[off + 5]]);
        if len < NLMSG_HDR || off + len > data.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a truncated netlink message",
            ));
        }
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code =
                    i32::from_ne_bytes(data[off + 16..off + 20].try_into().unwrap_or_default());
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
            }
            k if k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN => {
                let attrs = &data[off + NLMSG_HDR + NFGENMSG..off + len];
                names.extend(attribute(attrs, NFTA_CHAIN_NAME).map(c_string));
            }
            _ => {}
        }
        off += align4(len);
    }
    Ok(false)
}

/// The payload of the first netlink attribute of type `wanted` in `attrs`.
fn attribute(attrs: &[u8], wanted: u16) -> Option<&[u8]> {
    let mut off = 0;
    while off + 4 <= attrs.len() {
        let len = u16::from_ne_bytes([attrs[off], attrs[off + 1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[off + 2], attrs[off + 3]]) & 0x3fff;
        if len < 4 || off + len > attrs.len() {
            return None;
        }
        if kind == wanted {
            return Some(&attrs[off + 4..off + len]);
        }
        off += align4(len);
    }
    None
}

/// Legacy iptables: the user-defined chains of the `filter`, `nat`, `mangle` and `raw` tables of
/// both families (tables the kernel does not have are skipped: nothing uses them).
pub fn legacy_chains() -> Vec<String> {
    let mut names = Vec::new();
    for family in [Family::V4, Family::V6] {
        for table in ["filter", "nat", "mangle", "raw"] {
            names.extend(legacy_table(family, table).unwrap_or_default());
        }
    }
    names
}

#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// (socket domain, sockopt level, size of `struct ipt_ip`/`struct ip6t_ip6`).
    fn params(self) -> (libc::c_int, libc::c_int, usize) {
        match self {
            Family::V4 => (libc::AF_INET, libc::IPPROTO_IP, 84),
            Family::V6 => (libc::AF_INET6, libc::IPPROTO_IPV6, 136),
        }
    }
}

/// `IPT_SO_GET_INFO` / `IP6T_SO_GET_INFO`, `..._GET_ENTRIES` (same numbers for both families).
const SO_GET_INFO: libc::c_int = 64;
const SO_GET_ENTRIES: libc::c_int = 65;
/// `struct ipt_getinfo`: name[32], valid_hooks, hook_entry[5], underflow[5], num_entries, size.
const GETINFO_LEN: usize = 32 + 4 + 20 + 20 + 4 + 4;
/// `struct ipt_get_entries` up to its entry table (which is 8-byte aligned).
const GET_ENTRIES_HDR: usize = 40;
/// `struct xt_entry_target` up to its data: target_size (2), name[29], revision (1).
const TARGET_HDR: usize = 32;

/// The user-defined chains of one legacy table: the entries whose target is `ERROR` with the chain
/// name as its data (how the kernel's blob marks a chain's head).
fn legacy_table(family: Family, table: &str) -> io::Result<Vec<String>> {
    let (domain, level, ip_len) = family.params();
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(domain, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor this function owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut info = [0u8; GETINFO_LEN];
    info[..table.len()].copy_from_slice(table.as_bytes());
    getsockopt(fd.as_raw_fd(), level, SO_GET_INFO, &mut info)?;
    let size = u32_at(&info, GETINFO_LEN - 4) as usize;
    let mut entries = vec![0u8; GET_ENTRIES_HDR + size];
    entries[..table.len()].copy_from_slice(table.as_bytes());
    entries[32..36].copy_from_slice(&(size as u32).to_ne_bytes());
    getsockopt(fd.as_raw_fd(), level, SO_GET_ENTRIES, &mut entries)?;
    Ok(error_targets(&entries[GET_ENTRIES_HDR..], ip_len))
}

fn getsockopt(
    fd: libc::c_int,
    level: libc::c_int,
    name: libc::c_int,
    buf: &mut [u8],
) -> io::Result<()> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is valid for `len` bytes; the kernel writes at most that much.
    let rc = unsafe { libc::getsockopt(fd, level, name, buf.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The chain names of the `ERROR` targets in a table's entry blob (`ip_len`: the size of the
/// entry's address match, after which come nfcache, target_offset and next_offset).
fn error_targets(blob: &[u8], ip_len: usize) -> Vec<String> {
    let mut names = Vec::new();
    let mut off = 0;
    while off + ip_len + 8 <= blob.len() {
        let target = u16::from_ne_bytes([blob[off + ip_len + 4], blob[off + ip_len + 5]]) as usize;
        let next = u16::from_ne_bytes([blob[off + ip_len + 6], blob[off + ip_len + 7]]) as usize;
        let t = off + target;
        if next == 0 || t + TARGET_HDR > blob.len() {
            break;
        }
        if c_string(&blob[t + 2..t + 31]) == "ERROR" {
            let data_end = (off + next).min(blob.len());
            let name = c_string(&blob[t + TARGET_HDR..data_end.max(t + TARGET_HDR)]);
            if name != "ERROR" {
                names.push(name);
            }
        }
        off += next;
    }
    names
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().unwrap_or_default())
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A NUL-terminated (or full-length) byte string.
fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

const _: () = assert!(size_of::<u32>() == 4);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_come_from_newchain_messages_until_done() {
        let mut msg = Vec::new();
        let name = b"KUBE-ROUTER-INPUT\0";
        let attr_len = 4 + name.len();
        let len = NLMSG_HDR + NFGENMSG + align4(attr_len);
        msg.extend((len as u32).to_ne_bytes());
        msg.extend(((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN).to_ne_bytes());
        msg.extend([0u8; 10]);
        msg.extend([2u8, 0, 0, 0]);
        msg.extend((attr_len as u16).to_ne_bytes());
        msg.extend(NFTA_CHAIN_NAME.to_ne_bytes());
        msg.extend(name);
        msg.resize(len, 0);
        let mut names = Vec::new();
        assert!(!read_chain_messages(&msg, &mut names).unwrap());
        assert_eq!(names, ["KUBE-ROUTER-INPUT"]);
        let mut done = vec![0u8; 20];
        done[..4].copy_from_slice(&20u32.to_ne_bytes());
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        assert!(read_chain_messages(&done, &mut names).unwrap());
        assert!(read_chain_messages(&msg[..10], &mut names).is_ok_and(|d| !d));
    }
}
