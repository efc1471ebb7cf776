//! Link identity: what a pod may claim at layer 2 and in link-scoped IPv6 control messages. A pod
//! with `CAP_NET_RAW` can write any frame; these checks keep it from impersonating another pod or
//! the node (Ethernet source, ARP, neighbour discovery), from acting as a router (RA, Redirect), and
//! from using link-scoped messages as a channel past policy. They apply whether or not the pod is
//! isolated: they protect the others.

use aya_ebpf::programs::TcContext;
use netpol_common::{EndpointInfo, IpKey, Reason, proto};

use crate::{
    maps::Buffer,
    parse::{self, ETH_HLEN, Malformed, Packet, icmp6, same},
};

/// ARP over Ethernet for IPv4: hardware type 1, protocol 0x0800, lengths 6 and 4.
const ARP_ETH_IPV4: [u8; 6] = [0, 1, 0x08, 0x00, 6, 4];
/// Most options in a neighbour discovery message from a pod (a link-layer address, a nonce).
const MAX_ND_OPTIONS: u32 = 2;
/// ND option types carrying a link-layer address (RFC 4861 4.6.1).
const ND_OPT_SOURCE_LL: u8 = 1;
const ND_OPT_TARGET_LL: u8 = 2;
/// The nonce of enhanced duplicate address detection (RFC 7527).
const ND_OPT_NONCE: u8 = 14;
const ICMP6_ROUTER_ADVERT: u8 = 134;
const ICMP6_REDIRECT: u8 = 137;

/// Whether the frame's Ethernet source is the pod's own MAC.
#[inline(always)]
pub fn source_mac_is_own(ctx: &TcContext, ep: &EndpointInfo) -> Result<bool, Malformed> {
    let src: [u8; 6] = parse::load(ctx, 6)?;
    Ok(same(&src, &ep.mac))
}

/// True when `addr` (IPv4-mapped or IPv6) is one of the addresses of the endpoint `ifindex`.
#[inline(always)]
pub fn owned_by(buffer: Buffer, addr: &[u8; 16], ifindex: u32) -> bool {
    buffer
        .address(addr)
        // SAFETY: map values are valid for the duration of the program.
        .is_some_and(|info| unsafe { (*info).endpoint } == ifindex)
}

/// An ARP frame sent by the pod: its sender must be the pod's MAC and one of its addresses (or
/// 0.0.0.0, an RFC 5227 probe, which nobody learns from).
#[inline(never)]
pub fn arp_from_pod(
    ctx: &TcContext,
    pkt: &Packet,
    ifindex: u32,
    ep: &EndpointInfo,
) -> Result<Reason, Malformed> {
    let h: [u8; 20] = parse::load(ctx, ETH_HLEN)?;
    let kind = [h[0], h[1], h[2], h[3], h[4], h[5]];
    let sender_mac = [h[8], h[9], h[10], h[11], h[12], h[13]];
    if !same(&kind, &ARP_ETH_IPV4) || !same(&sender_mac, &ep.mac) {
        return Ok(Reason::DroppedSpoofedLink);
    }
    let sender = [h[14], h[15], h[16], h[17]];
    if same(&sender, &[0; 4]) || owned_by(pkt.buffer, &IpKey::from_v4(sender).addr, ifindex) {
        Ok(Reason::AllowedNotPoliced)
    } else {
        Ok(Reason::DroppedSpoofedLink)
    }
}

/// True for the routers' messages that a pod must never send.
#[inline(always)]
pub fn is_router_message(pkt: &Packet) -> bool {
    pkt.proto == proto::ICMPV6
        && (pkt.icmp_type == ICMP6_ROUTER_ADVERT || pkt.icmp_type == ICMP6_REDIRECT)
}

/// An IPv6 multicast address.
#[inline(always)]
pub fn is_multicast(addr: &[u8; 16]) -> bool {
    addr[0] == 0xff
}

#[inline(always)]
fn is_link_scope_multicast(addr: &[u8; 16]) -> bool {
    addr[0] == 0xff && addr[1] & 0x0f == 2
}

#[inline(always)]
fn is_link_local(addr: &[u8; 16]) -> bool {
    addr[0] == 0xfe && addr[1] & 0xc0 == 0x80
}

/// A neighbour discovery or MLD message ([`parse::Parsed::Neighbour`]) seen at a pod's veth: passes
/// unpoliced when it has exactly the shape the protocol gives it on one link, and is dropped
/// otherwise. Exact shapes leave no room for data: ND and MLD cannot carry anything past policy.
#[inline(never)]
pub fn neighbour(
    ctx: &TcContext,
    pkt: &Packet,
    ifindex: u32,
    ep: &EndpointInfo,
    egress: bool,
) -> Result<Reason, Malformed> {
    let ok = if egress {
        from_pod(ctx, pkt, ifindex, ep)?
    } else {
        to_pod(ctx, pkt, ifindex, ep)?
    };
    Ok(if ok {
        Reason::AllowedNotPoliced
    } else {
        Reason::DroppedSpoofedLink
    })
}

/// What a pod may send: solicitations and advertisements about itself and its neighbours, MLD
/// reports of its groups. Not MLD queries (a pod is not a querier). Each check returns as soon as it
/// fails: few live conditions keep the verifier's state count small.
#[inline(always)]
fn from_pod(
    ctx: &TcContext,
    pkt: &Packet,
    ifindex: u32,
    ep: &EndpointInfo,
) -> Result<bool, Malformed> {
    let unspecified = same(&pkt.src, &[0; 16]);
    if !unspecified && !own_link_local(&pkt.src, ep) && !owned_by(pkt.buffer, &pkt.src, ifindex) {
        return Ok(false);
    }
    match pkt.icmp_type {
        icmp6::ROUTER_SOLICIT => {
            if pkt.hop_limit != 255 || !same(&pkt.dst, &ALL_ROUTERS) {
                return Ok(false);
            }
            options_own(ctx, pkt, pkt.l4_off + 8, ep, false)
        }
        icmp6::NEIGHBOUR_SOLICIT | icmp6::NEIGHBOUR_ADVERT => {
            nd_from_pod(ctx, pkt, ifindex, ep, unspecified)
        }
        icmp6::MLD_REPORT | icmp6::MLD_DONE => {
            Ok(mld_from_pod(pkt, ep) && pkt.l3_end - pkt.l4_off == 24)
        }
        icmp6::MLD2_REPORT => {
            if !mld_from_pod(pkt, ep) || !same(&pkt.dst, &ALL_MLDV2_ROUTERS) {
                return Ok(false);
            }
            mld2_records_empty(ctx, pkt)
        }
        _ => Ok(false),
    }
}

/// A solicitation or advertisement from the pod (its source already checked).
#[inline(never)]
fn nd_from_pod(
    ctx: &TcContext,
    pkt: &Packet,
    ifindex: u32,
    ep: &EndpointInfo,
    unspecified: bool,
) -> Result<bool, Malformed> {
    if pkt.hop_limit != 255 || pkt.l4_off + 24 > pkt.l3_end {
        return Ok(false);
    }
    let mut target = [0u8; 16];
    parse::load_into(ctx, pkt.l4_off + 8, &mut target)?;
    let about_self = own_link_local(&target, ep) || owned_by(pkt.buffer, &target, ifindex);
    if pkt.icmp_type == icmp6::NEIGHBOUR_ADVERT {
        if !about_self || unspecified || !advert_destination(pkt.buffer, &pkt.dst) {
            return Ok(false);
        }
    } else if (unspecified && !about_self) || !solicit_fits(pkt.buffer, &pkt.dst, &target) {
        return Ok(false);
    }
    options_own(ctx, pkt, pkt.l4_off + 24, ep, unspecified)
}

/// What a pod receives: the link's multicast chatter, which the bridge floods to every port
/// (solicitations to solicited-node groups, advertisements to all nodes, MLD, router solicitations:
/// each held to its exact shape at its sender's veth, and dropping the node's and neighbours'
/// chatter at every pod would only fill the drop counters), and unicast ND addressed to the pod
/// itself (a solicitation only about its own address). Unicast ND to any other address is not
/// delivered: it would be a channel between pods.
#[inline(always)]
fn to_pod(
    ctx: &TcContext,
    pkt: &Packet,
    ifindex: u32,
    ep: &EndpointInfo,
) -> Result<bool, Malformed> {
    let flooded = is_link_scope_multicast(&pkt.dst);
    let to_me = own_link_local(&pkt.dst, ep) || owned_by(pkt.buffer, &pkt.dst, ifindex);
    match pkt.icmp_type {
        icmp6::NEIGHBOUR_SOLICIT => {
            if pkt.hop_limit != 255 || !(flooded || to_me) {
                return Ok(false);
            }
            if flooded {
                return Ok(true);
            }
            if pkt.l4_off + 24 > pkt.l3_end {
                return Ok(false);
            }
            let mut target = [0u8; 16];
            parse::load_into(ctx, pkt.l4_off + 8, &mut target)?;
            Ok(own_link_local(&target, ep) || owned_by(pkt.buffer, &target, ifindex))
        }
        icmp6::NEIGHBOUR_ADVERT => Ok(pkt.hop_limit == 255 && (flooded || to_me)),
        icmp6::ROUTER_SOLICIT => Ok(pkt.hop_limit == 255 && same(&pkt.dst, &ALL_ROUTERS)),
        // MLD queries, reports and dones.
        _ => Ok(pkt.hop_limit == 1 && is_multicast(&pkt.dst)),
    }
}

/// `ff02::2`, all routers: where router solicitations go.
const ALL_ROUTERS: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
/// `ff02::16`, all MLDv2-capable routers: where MLDv2 reports go.
const ALL_MLDV2_ROUTERS: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x16];
/// Most MLDv2 records in a report from a pod.
const MAX_MLD2_RECORDS: u32 = 8;

/// MLD from a pod: hop limit 1 (never forwarded), to a multicast group, from its link-local address
/// or `::` (RFC 3810 5.2.13).
#[inline(always)]
fn mld_from_pod(pkt: &Packet, ep: &EndpointInfo) -> bool {
    pkt.hop_limit == 1
        && is_multicast(&pkt.dst)
        && (same(&pkt.src, &[0; 16]) || own_link_local(&pkt.src, ep))
}

/// An MLDv2 report of at most [`MAX_MLD2_RECORDS`] records without sources or auxiliary data
/// (joins and leaves of whole groups, what a pod's stack sends), and nothing after them.
#[inline(never)]
fn mld2_records_empty(ctx: &TcContext, pkt: &Packet) -> Result<bool, Malformed> {
    let head: [u8; 8] = parse::load(ctx, pkt.l4_off)?;
    let records = ((head[6] as u32) << 8) | head[7] as u32;
    if records == 0 || records > MAX_MLD2_RECORDS || pkt.l4_off + 8 + records * 20 != pkt.l3_end {
        return Ok(false);
    }
    let mut off = pkt.l4_off + 8;
    for i in 0..MAX_MLD2_RECORDS {
        if i >= records {
            break;
        }
        // Record type, aux data length, number of sources.
        let r: [u8; 4] = parse::load(ctx, off)?;
        if r[1] != 0 || r[2] != 0 || r[3] != 0 {
            return Ok(false);
        }
        off += 20;
    }
    Ok(true)
}

/// An advertisement goes to all nodes, to a link-local address, or to an on-link neighbour.
#[inline(always)]
fn advert_destination(buffer: Buffer, dst: &[u8; 16]) -> bool {
    is_link_scope_multicast(dst) || is_link_local(dst) || on_link(buffer, dst)
}

/// A solicitation asks about `target`, which must be a link-local or on-link address, sent to
/// `target`'s solicited-node group (`ff02::1:ffXX:XXXX`, RFC 4291 2.7.1) or to `target` itself
/// (a reachability probe).
#[inline(always)]
fn solicit_fits(buffer: Buffer, dst: &[u8; 16], target: &[u8; 16]) -> bool {
    if !(is_link_local(target) || on_link(buffer, target)) {
        return false;
    }
    let mut group = [0u8; 16];
    group[0] = 0xff;
    group[1] = 2;
    group[11] = 1;
    group[12] = 0xff;
    group[13] = target[13];
    group[14] = target[14];
    group[15] = target[15];
    same(dst, &group) || same(dst, target)
}

#[inline(always)]
fn own_link_local(addr: &[u8; 16], ep: &EndpointInfo) -> bool {
    !same(&ep.link_local, &[0; 16]) && same(addr, &ep.link_local)
}

/// A unicast destination on this link: a pod or an address of the node (the gateway). Anything else
/// would be forwarded by the node: an ND-typed packet must not leave the link.
#[inline(always)]
fn on_link(buffer: Buffer, addr: &[u8; 16]) -> bool {
    buffer.address(addr).is_some_and(|info| {
        // SAFETY: map values are valid for the duration of the program.
        let info = unsafe { &*info };
        info.endpoint != 0 || info.identity == netpol_common::identity::HOST
    })
}

/// The options from `off` to the end of the message are at most [`MAX_ND_OPTIONS`] of 8 bytes: a
/// source or target link-layer address that is the pod's MAC, or (with `nonce`, duplicate address
/// detection) one nonce. Anything else, including any byte after them, fails.
#[inline(never)]
fn options_own(
    ctx: &TcContext,
    pkt: &Packet,
    mut off: u32,
    ep: &EndpointInfo,
    nonce: bool,
) -> Result<bool, Malformed> {
    for _ in 0..MAX_ND_OPTIONS {
        if off == pkt.l3_end {
            return Ok(true);
        }
        if off + 8 > pkt.l3_end {
            return Ok(false);
        }
        let opt: [u8; 8] = parse::load(ctx, off)?;
        let lladdr = [opt[2], opt[3], opt[4], opt[5], opt[6], opt[7]];
        let ok = opt[1] == 1
            && match opt[0] {
                ND_OPT_SOURCE_LL | ND_OPT_TARGET_LL => same(&lladdr, &ep.mac),
                ND_OPT_NONCE => nonce,
                _ => false,
            };
        if !ok {
            return Ok(false);
        }
        off += 8;
    }
    Ok(off == pkt.l3_end)
}
