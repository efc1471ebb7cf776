//! Header parsing. Every read goes through `bpf_skb_load_bytes` (`TcContext::load`), which fails on
//! reads beyond the packet, and every header is additionally checked against the end of the L3
//! payload so that Ethernet padding never passes for transport headers.

use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::TcContext};
use netpol_common::{CtKey, proto};

use crate::maps::Buffer;

pub const ETH_HLEN: u32 = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

const IPV6_HLEN: u32 = 40;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// Most extension headers walked before the packet is declared malformed.
const MAX_EXT_HEADERS: u32 = 6;

/// A parse failure: the packet is dropped as malformed.
pub struct Malformed;

/// The parsed outer packet.
#[derive(Clone, Copy)]
pub struct Packet {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host byte order (ICMP echo id where applicable, see `CtKey`).
    pub sport: u16,
    pub dport: u16,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: u32,
    /// End of the L3 payload (offset from the start of the frame).
    pub l3_end: u32,
    pub proto: u8,
    pub is_v6: bool,
    /// False for non-first fragments: no L4 header, ports are 0.
    pub first_frag: bool,
    /// A fragment with more to follow (IPv4 MF, IPv6 M flag).
    pub more_frags: bool,
    /// IPv4 identification or IPv6 fragment identification (0 when not fragmented).
    pub frag_id: u32,
    /// An ICMP/ICMPv6 error: the embedded packet starts at `l4_off + 8`.
    pub icmp_error: bool,
    /// IPv4 TTL or IPv6 hop limit (neighbour discovery must carry 255, MLD 1).
    pub hop_limit: u8,
    /// ICMP/ICMPv6 type, 0 for other protocols.
    pub icmp_type: u8,
    /// TCP flags (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10), 0 for other protocols.
    pub tcp_flags: u8,
    /// The decision maps the packet is judged by, chosen before anything is read from them.
    pub buffer: Buffer,
}

impl Packet {
    /// A packet yet to be parsed, to be judged by `buffer`.
    pub const fn new(buffer: Buffer) -> Self {
        Packet {
            src: [0; 16],
            dst: [0; 16],
            sport: 0,
            dport: 0,
            l4_off: 0,
            l3_end: 0,
            proto: 0,
            is_v6: false,
            first_frag: true,
            more_frags: false,
            frag_id: 0,
            icmp_error: false,
            hop_limit: 0,
            icmp_type: 0,
            tcp_flags: 0,
            buffer,
        }
    }
}

pub enum Parsed {
    /// An IPv4/IPv6 packet to police, described by the `Packet`.
    Ip,
    /// ARP: the sender must be the pod itself.
    Arp,
    /// IPv6 neighbour discovery (RS, NS, NA) or MLD (`Packet::icmp_type` says which): link-scoped
    /// control traffic, checked for its link identity instead of policed.
    Neighbour,
    /// An EtherType other than IPv4, IPv6 and ARP.
    OtherEtherType,
}

/// ICMPv6 types of the link-scoped control messages ([`Parsed::Neighbour`]).
pub mod icmp6 {
    pub const MLD_QUERY: u8 = 130;
    pub const MLD_REPORT: u8 = 131;
    pub const MLD_DONE: u8 = 132;
    pub const ROUTER_SOLICIT: u8 = 133;
    pub const NEIGHBOUR_SOLICIT: u8 = 135;
    pub const NEIGHBOUR_ADVERT: u8 = 136;
    pub const MLD2_REPORT: u8 = 143;
}

#[inline(always)]
pub fn load<T>(ctx: &TcContext, off: u32) -> Result<T, Malformed> {
    ctx.load::<T>(off as usize).map_err(|_| Malformed)
}

/// Reads `size_of::<T>()` bytes at `off` straight into `dst` (no stack temporary).
#[inline(always)]
pub fn load_into<T>(ctx: &TcContext, off: u32, dst: &mut T) -> Result<(), Malformed> {
    // SAFETY: `dst` is valid for `size_of::<T>()` bytes of writes; callers only use plain byte
    // arrays, for which every bit pattern is valid.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            off,
            (dst as *mut T).cast(),
            core::mem::size_of::<T>() as u32,
        )
    };
    if ret == 0 { Ok(()) } else { Err(Malformed) }
}

/// TCP flags the conntrack follows.
pub mod tcp {
    pub const FIN: u8 = 0x01;
    pub const RST: u8 = 0x04;
}

/// Equality of two byte arrays, as a few 64-bit words: BPF has no `bcmp` to call (array `==` may
/// compile to one), and a byte-by-byte comparison becomes a branch per byte, whose combinations
/// the verifier would walk one by one.
#[inline(always)]
pub fn same<const N: usize>(a: &[u8; N], b: &[u8; N]) -> bool {
    let mut diff = 0u64;
    let mut at = 0;
    while at < N {
        diff |= word(a, at) ^ word(b, at);
        at += 8;
    }
    diff == 0
}

/// Up to 8 bytes of `bytes` from `at`, as one little-endian word.
#[inline(always)]
fn word<const N: usize>(bytes: &[u8; N], at: usize) -> u64 {
    let mut w = 0u64;
    let mut i = 0;
    while i < 8 && at + i < N {
        w |= (bytes[at + i] as u64) << (8 * i);
        i += 1;
    }
    w
}

#[inline(always)]
fn be16(b0: u8, b1: u8) -> u16 {
    ((b0 as u16) << 8) | b1 as u16
}

#[inline(always)]
fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// Parses the Ethernet, IP and transport headers into `pkt`.
#[inline(never)]
pub fn parse(ctx: &TcContext, pkt: &mut Packet) -> Result<Parsed, Malformed> {
    let eth_proto = u16::from_be(load::<u16>(ctx, 12)?);
    match eth_proto {
        ETH_P_IP => parse_ipv4(ctx, pkt)?,
        ETH_P_IPV6 => parse_ipv6(ctx, pkt)?,
        // VLAN-tagged frames would carry IP past the policy unseen: pods have no business sending them.
        ETH_P_8021Q | ETH_P_8021AD => return Err(Malformed),
        ETH_P_ARP => return Ok(Parsed::Arp),
        _ => return Ok(Parsed::OtherEtherType),
    }
    if !pkt.first_frag {
        return Ok(Parsed::Ip);
    }
    parse_l4(ctx, pkt)
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, pkt: &mut Packet) -> Result<(), Malformed> {
    let h: [u8; 20] = load(ctx, ETH_HLEN)?;
    if h[0] >> 4 != 4 {
        return Err(Malformed);
    }
    let hlen = ((h[0] & 0x0f) as u32) * 4;
    if hlen < 20 {
        return Err(Malformed);
    }
    let len = ctx.len();
    let tot_len = be16(h[2], h[3]) as u32;
    // BIG TCP GSO packets carry a total length of 0.
    let l3_end = if tot_len == 0 {
        len
    } else {
        ETH_HLEN + tot_len
    };
    if l3_end > len || ETH_HLEN + hlen > l3_end {
        return Err(Malformed);
    }
    pkt.l3_end = l3_end;
    pkt.l4_off = ETH_HLEN + hlen;
    pkt.first_frag = be16(h[6], h[7]) & 0x1fff == 0;
    pkt.more_frags = h[6] & 0x20 != 0;
    pkt.frag_id = be16(h[4], h[5]) as u32;
    pkt.proto = h[9];
    pkt.hop_limit = h[8];
    pkt.src = v4_mapped([h[12], h[13], h[14], h[15]]);
    pkt.dst = v4_mapped([h[16], h[17], h[18], h[19]]);
    pkt.is_v6 = false;
    Ok(())
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, pkt: &mut Packet) -> Result<(), Malformed> {
    let h: [u8; 8] = load(ctx, ETH_HLEN)?;
    if h[0] >> 4 != 6 {
        return Err(Malformed);
    }
    let len = ctx.len();
    let payload_len = be16(h[4], h[5]) as u32;
    // Jumbograms / BIG TCP carry a payload length of 0.
    let l3_end = if payload_len == 0 {
        len
    } else {
        ETH_HLEN + IPV6_HLEN + payload_len
    };
    if l3_end > len || ETH_HLEN + IPV6_HLEN > l3_end {
        return Err(Malformed);
    }
    load_into(ctx, ETH_HLEN + 8, &mut pkt.src)?;
    load_into(ctx, ETH_HLEN + 24, &mut pkt.dst)?;
    pkt.is_v6 = true;
    pkt.l3_end = l3_end;
    pkt.hop_limit = h[7];

    let mut nexthdr = h[6];
    let mut off = ETH_HLEN + IPV6_HLEN;
    let mut first_frag = true;
    let mut done = false;
    for _ in 0..MAX_EXT_HEADERS {
        let ext_len = match nexthdr {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                if off + 8 > l3_end {
                    return Err(Malformed);
                }
                let e: [u8; 2] = load(ctx, off)?;
                nexthdr = e[0];
                (e[1] as u32 + 1) * 8
            }
            NEXTHDR_FRAGMENT => {
                if off + 8 > l3_end {
                    return Err(Malformed);
                }
                let e: [u8; 8] = load(ctx, off)?;
                nexthdr = e[0];
                if be16(e[2], e[3]) >> 3 != 0 {
                    first_frag = false;
                }
                pkt.more_frags = e[3] & 1 != 0;
                pkt.frag_id = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
                8
            }
            NEXTHDR_AUTH => {
                if off + 8 > l3_end {
                    return Err(Malformed);
                }
                let e: [u8; 2] = load(ctx, off)?;
                nexthdr = e[0];
                (e[1] as u32 + 2) * 4
            }
            _ => {
                done = true;
                break;
            }
        };
        off += ext_len;
        if off > l3_end {
            return Err(Malformed);
        }
        if !first_frag {
            // Headers after the fragment header belong to the fragmentable part: not here.
            done = true;
            break;
        }
    }
    if !done {
        // More extension headers than we walk: fail closed.
        return Err(Malformed);
    }
    pkt.proto = nexthdr;
    pkt.l4_off = off;
    pkt.first_frag = first_frag;
    Ok(())
}

#[inline(always)]
fn parse_l4(ctx: &TcContext, pkt: &mut Packet) -> Result<Parsed, Malformed> {
    let off = pkt.l4_off;
    let need = match pkt.proto {
        proto::TCP => 20,
        proto::UDP => 8,
        proto::SCTP => 12,
        proto::ICMP if !pkt.is_v6 => 8,
        proto::ICMPV6 if pkt.is_v6 => 8,
        _ => return Ok(Parsed::Ip),
    };
    if off + need > pkt.l3_end {
        return Err(Malformed);
    }
    let h: [u8; 8] = load(ctx, off)?;
    match pkt.proto {
        proto::ICMP | proto::ICMPV6 => pkt.icmp_type = h[0],
        _ => {}
    }
    match pkt.proto {
        proto::ICMP => {
            let id = be16(h[4], h[5]);
            match h[0] {
                8 => pkt.sport = id,
                0 => pkt.dport = id,
                3 | 11 | 12 => pkt.icmp_error = true,
                _ => {}
            }
        }
        proto::ICMPV6 => {
            let id = be16(h[4], h[5]);
            match h[0] {
                128 => pkt.sport = id,
                129 => pkt.dport = id,
                1..=4 => pkt.icmp_error = true,
                // MLD query, report and done (130-132), router solicitation (133).
                icmp6::MLD_QUERY..=icmp6::ROUTER_SOLICIT
                | icmp6::NEIGHBOUR_SOLICIT
                | icmp6::NEIGHBOUR_ADVERT
                | icmp6::MLD2_REPORT => return Ok(Parsed::Neighbour),
                // Router Advertisements and Redirects (134, 137) are policed like any packet (and
                // dropped at a pod's egress, see `link::neighbour`).
                _ => {}
            }
        }
        _ => {
            pkt.sport = be16(h[0], h[1]);
            pkt.dport = be16(h[2], h[3]);
            if pkt.proto == proto::TCP {
                pkt.tcp_flags = load::<u8>(ctx, off + 13)?;
            }
        }
    }
    Ok(Parsed::Ip)
}

/// Fills `key`'s addresses, ports and protocol from the packet embedded in the ICMP error `pkt`.
/// Returns false when the embedded packet cannot be used (truncated, a non-first fragment, ...).
#[inline(never)]
pub fn embedded_flow(ctx: &TcContext, pkt: &Packet, key: &mut CtKey) -> Result<bool, Malformed> {
    let off = pkt.l4_off + 8;
    let end = pkt.l3_end;
    let l4;
    if pkt.is_v6 {
        if off + IPV6_HLEN > end {
            return Ok(false);
        }
        let h: [u8; 8] = load(ctx, off)?;
        if h[0] >> 4 != 6 {
            return Ok(false);
        }
        key.protocol = h[6];
        load_into(ctx, off + 8, &mut key.src)?;
        load_into(ctx, off + 24, &mut key.dst)?;
        l4 = off + IPV6_HLEN;
    } else {
        if off + 20 > end {
            return Ok(false);
        }
        let h: [u8; 20] = load(ctx, off)?;
        let hlen = ((h[0] & 0x0f) as u32) * 4;
        if h[0] >> 4 != 4 || hlen < 20 || be16(h[6], h[7]) & 0x1fff != 0 {
            return Ok(false);
        }
        key.protocol = h[9];
        key.src = v4_mapped([h[12], h[13], h[14], h[15]]);
        key.dst = v4_mapped([h[16], h[17], h[18], h[19]]);
        l4 = off + hlen;
    }
    key.src_port = 0;
    key.dst_port = 0;
    match key.protocol {
        proto::TCP | proto::UDP | proto::SCTP => {
            if l4 + 4 > end {
                return Ok(false);
            }
            let p: [u8; 4] = load(ctx, l4)?;
            key.src_port = be16(p[0], p[1]);
            key.dst_port = be16(p[2], p[3]);
        }
        proto::ICMP | proto::ICMPV6 => {
            if l4 + 8 > end {
                return Ok(false);
            }
            let p: [u8; 8] = load(ctx, l4)?;
            let id = be16(p[4], p[5]);
            match (key.protocol, p[0]) {
                (proto::ICMP, 8) | (proto::ICMPV6, 128) => key.src_port = id,
                (proto::ICMP, 0) | (proto::ICMPV6, 129) => key.dst_port = id,
                _ => {}
            }
        }
        _ => {}
    }
    Ok(true)
}
