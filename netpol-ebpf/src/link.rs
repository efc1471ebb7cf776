//! Link identity: what a pod may claim at layer 2 and in link-scoped IPv6 control messages. A pod
//! with `CAP_NET_RAW` can write any frame; these checks keep it from impersonating another pod or
//! the node (Ethernet source, ARP, neighbour discovery), from acting as a router (RA, Redirect), and
//! from using link-scoped messages as a channel past policy. They apply whether or not the pod is
//! isolated: they protect the others.

use aya_ebpf::programs::TcContext;
use netpol_common::{EndpointInfo, IpKey, Reason, proto};

use crate::{
    maps::IPCACHE,
    parse::{self, ETH_HLEN, Malformed, Packet, icmp6, same},
};

/// ARP over Ethernet for IPv4: hardware type 1, protocol 0x0800, lengths 6 and 4.
const ARP_ETH_IPV4: [u8; 6] = [0, 1, 0x08, 0x00, 6, 4];
/// Most neighbour discovery options walked for link-layer address options.
const MAX_ND_OPTIONS: u32 = 4;
/// ND option types carrying a link-layer address (RFC 4861 4.6.1).
const ND_OPT_SOURCE_LL: u8 = 1;
const ND_OPT_TARGET_LL: u8 = 2;
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
pub fn owned_by(addr: &[u8; 16], ifindex: u32) -> bool {
    IPCACHE
        .get_ptr(IpKey { addr: *addr })
        // SAFETY: map values are valid for the duration of the program.
        .is_some_and(|info| unsafe { (*info).endpoint } == ifindex)
}

/// An ARP frame sent by the pod: its sender must be the pod's MAC and one of its addresses (or
/// 0.0.0.0, an RFC 5227 probe, which nobody learns from).
#[inline(never)]
pub fn arp_from_pod(ctx: &TcContext, ifindex: u32, ep: &EndpointInfo) -> Result<Reason, Malformed> {
    let h: [u8; 20] = parse::load(ctx, ETH_HLEN)?;
    let kind = [h[0], h[1], h[2], h[3], h[4], h[5]];
    let sender_mac = [h[8], h[9], h[10], h[11], h[12], h[13]];
    if !same(&kind, &ARP_ETH_IPV4) || !same(&sender_mac, &ep.mac) {
        return Ok(Reason::DroppedSpoofedLink);
    }
    let sender = [h[14], h[15], h[16], h[17]];
    if same(&sender, &[0; 4]) || owned_by(&IpKey::from_v4(sender).addr, ifindex) {
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

#[inline(always)]
fn is_multicast(addr: &[u8; 16]) -> bool {
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
/// unpoliced when it is what the protocol allows on one link, and is dropped otherwise.
#[inline(never)]
pub fn neighbour(
    ctx: &TcContext,
    pkt: &Packet,
    ifindex: u32,
    ep: &EndpointInfo,
    egress: bool,
) -> Result<Reason, Malformed> {
    let ok = match pkt.icmp_type {
        icmp6::NEIGHBOUR_SOLICIT | icmp6::NEIGHBOUR_ADVERT | icmp6::ROUTER_SOLICIT => {
            nd_ok(ctx, pkt, ifindex, ep, egress)?
        }
        // MLD: hop limit 1 (never forwarded) to a multicast group; from a pod, from its link-local
        // address or `::` (RFC 3810 5.2.13).
        _ => {
            pkt.hop_limit == 1
                && is_multicast(&pkt.dst)
                && (!egress || same(&pkt.src, &[0; 16]) || own_link_local(&pkt.src, ep))
        }
    };
    Ok(if ok {
        Reason::AllowedNotPoliced
    } else {
        Reason::DroppedSpoofedLink
    })
}

#[inline(always)]
fn own_link_local(addr: &[u8; 16], ep: &EndpointInfo) -> bool {
    !same(&ep.link_local, &[0; 16]) && same(addr, &ep.link_local)
}

/// Router and neighbour solicitations and advertisements: hop limit 255 (RFC 4861: never
/// forwarded), to a link-scoped or on-link destination. From the pod: sent from `::` (duplicate
/// address detection), its link-local or one of its addresses; an advertisement or a DAD
/// solicitation only about its own address; link-layer address options only with its own MAC.
#[inline(always)]
fn nd_ok(
    ctx: &TcContext,
    pkt: &Packet,
    ifindex: u32,
    ep: &EndpointInfo,
    egress: bool,
) -> Result<bool, Malformed> {
    if pkt.hop_limit != 255 {
        return Ok(false);
    }
    if !egress {
        // Delivered to the pod: only link-scoped, or to the pod's own addresses.
        return Ok(is_link_scope_multicast(&pkt.dst)
            || is_link_local(&pkt.dst)
            || owned_by(&pkt.dst, ifindex));
    }
    let unspecified = same(&pkt.src, &[0; 16]);
    if !(unspecified || own_link_local(&pkt.src, ep) || owned_by(&pkt.src, ifindex)) {
        return Ok(false);
    }
    if !(is_link_scope_multicast(&pkt.dst) || is_link_local(&pkt.dst) || on_link(&pkt.dst)) {
        return Ok(false);
    }
    let options = if pkt.icmp_type == icmp6::ROUTER_SOLICIT {
        pkt.l4_off + 8
    } else {
        if pkt.l4_off + 24 > pkt.l3_end {
            return Ok(false);
        }
        let mut target = [0u8; 16];
        parse::load_into(ctx, pkt.l4_off + 8, &mut target)?;
        let about_self = own_link_local(&target, ep) || owned_by(&target, ifindex);
        if (pkt.icmp_type == icmp6::NEIGHBOUR_ADVERT || unspecified) && !about_self {
            return Ok(false);
        }
        pkt.l4_off + 24
    };
    link_layer_options_own(ctx, pkt, options, ep)
}

/// A unicast destination on this link: a pod or an address of the node (the gateway). Anything else
/// would be forwarded by the node: an ND-typed packet must not leave the link.
#[inline(always)]
fn on_link(addr: &[u8; 16]) -> bool {
    IPCACHE.get_ptr(IpKey { addr: *addr }).is_some_and(|info| {
        // SAFETY: map values are valid for the duration of the program.
        let info = unsafe { &*info };
        info.endpoint != 0 || info.identity == netpol_common::identity::HOST
    })
}

/// Every source or target link-layer address option from `off` to the end of the message carries
/// the pod's MAC. Options past [`MAX_ND_OPTIONS`] fail the check.
#[inline(always)]
fn link_layer_options_own(
    ctx: &TcContext,
    pkt: &Packet,
    mut off: u32,
    ep: &EndpointInfo,
) -> Result<bool, Malformed> {
    for _ in 0..MAX_ND_OPTIONS {
        if off >= pkt.l3_end {
            return Ok(true);
        }
        if off + 8 > pkt.l3_end {
            return Ok(false);
        }
        let opt: [u8; 8] = parse::load(ctx, off)?;
        if opt[1] == 0 {
            // A zero-length option is invalid (and would loop).
            return Ok(false);
        }
        let lladdr = [opt[2], opt[3], opt[4], opt[5], opt[6], opt[7]];
        if (opt[0] == ND_OPT_SOURCE_LL || opt[0] == ND_OPT_TARGET_LL) && !same(&lladdr, &ep.mac) {
            return Ok(false);
        }
        off += opt[1] as u32 * 8;
    }
    Ok(off >= pkt.l3_end)
}
