//! TC classifiers enforcing Kubernetes NetworkPolicy on a pod's host-side veth.
//!
//! - `pod_egress` on TC ingress of the host veth: packets the pod sends ([`Direction::Egress`]);
//! - `pod_ingress` on TC egress of the host veth: packets delivered to the pod ([`Direction::Ingress`]).
//!
//! Both call [`try_classify`]; any error drops the packet (fail closed) as `DroppedMalformed`.
#![no_std]
#![no_main]
// Map keys are passed by reference on purpose: by value, each call site would copy the 44-byte
// `CtKey` onto the 512-byte BPF stack.
#![allow(clippy::needless_borrows_for_generic_args)]

mod maps;
mod parse;

use aya_ebpf::{
    bindings::{BPF_ANY, TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use netpol_common::{
    CONFIG_GENERATION, CtKey, CtValue, Direction, IpKey, POLICY_PREFIX_FULL, PolicyKey, Reason,
    endpoint_flags, identity,
};

use crate::{
    maps::{CIDRS, CONFIG, CONNTRACK, COUNTERS, ENDPOINTS, IPCACHE, POLICY},
    parse::{Malformed, Packet, Parsed},
};

#[classifier]
pub fn pod_egress(ctx: TcContext) -> i32 {
    match try_classify(&ctx, Direction::Egress) {
        Ok(action) => action,
        Err(Malformed) => verdict(Reason::DroppedMalformed),
    }
}

#[classifier]
pub fn pod_ingress(ctx: TcContext) -> i32 {
    match try_classify(&ctx, Direction::Ingress) {
        Ok(action) => action,
        Err(Malformed) => verdict(Reason::DroppedMalformed),
    }
}

/// Counts `reason` and turns it into a TC action.
#[inline(always)]
fn verdict(reason: Reason) -> i32 {
    if let Some(slot) = COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU slot: nothing else writes it while this program runs on this CPU.
        unsafe { *slot += 1 };
    }
    if reason.is_drop() {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

#[inline(always)]
fn try_classify(ctx: &TcContext, dir: Direction) -> Result<i32, Malformed> {
    // SAFETY: the context pointer handed to a classifier is a valid `__sk_buff`.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(ep) = ENDPOINTS.get_ptr(ifindex) else {
        return Ok(verdict(Reason::DroppedUnknownEndpoint));
    };
    // SAFETY: map values are valid for the duration of the program.
    let ep_flags = unsafe { (*ep).flags };

    let mut pkt = Packet::zeroed();
    if let Parsed::NotPoliced = parse::parse(ctx, &mut pkt)? {
        return Ok(verdict(Reason::AllowedNotPoliced));
    }
    let reason = classify_ip(ctx, &pkt, ifindex, ep_flags, dir)?;
    Ok(verdict(reason))
}

#[inline(always)]
fn classify_ip(
    ctx: &TcContext,
    pkt: &Packet,
    ifindex: u32,
    ep_flags: u32,
    dir: Direction,
) -> Result<Reason, Malformed> {
    // Anti-spoofing: a pod may only send from its own addresses. (Plain integers with a sentinel
    // rather than `Option<u32>`: LLVM leaves the payload of `None` undefined, and the verifier
    // rejects the read of the uninitialised register that results.)
    if dir == Direction::Egress {
        let owner = IPCACHE
            .get_ptr(IpKey { addr: pkt.src })
            // SAFETY: map values are valid for the duration of the program.
            .map_or(0, |info| unsafe { (*info).endpoint });
        if owner != ifindex {
            return Ok(Reason::DroppedSpoofedSource);
        }
    }

    let mut key = CtKey {
        src: pkt.src,
        dst: pkt.dst,
        src_port: pkt.sport,
        dst_port: pkt.dport,
        endpoint: ifindex,
        protocol: pkt.proto,
        direction: dir as u8,
        _pad: [0; 2],
    };

    // An ICMP error about a flow this endpoint knows is a reply.
    if pkt.icmp_error {
        if parse::embedded_flow(ctx, pkt, &mut key)? {
            // The embedded packet went the other way: it is a packet of the flow as first seen...
            key.direction = dir.opposite() as u8;
            if CONNTRACK.get_ptr(&key).is_some() {
                return Ok(Reason::AllowedReply);
            }
            // ... or a reply of a flow first seen in this direction.
            reverse(&mut key);
            key.direction = dir as u8;
            if CONNTRACK.get_ptr(&key).is_some() {
                return Ok(Reason::AllowedReply);
            }
        }
        // Not about a known flow (or `embedded_flow` gave up half-way): back to the outer packet.
        key.src = pkt.src;
        key.dst = pkt.dst;
        key.src_port = pkt.sport;
        key.dst_port = pkt.dport;
        key.protocol = pkt.proto;
        key.direction = dir as u8;
    }

    let generation = CONFIG.get(CONFIG_GENERATION).copied().unwrap_or(0);
    if pkt.first_frag {
        if let Some(entry) = CONNTRACK.get_ptr_mut(&key) {
            // SAFETY: map values stay valid for the duration of the program; racing writers only
            // touch these plain integers.
            unsafe {
                if (*entry).generation == generation {
                    (*entry).last_seen_ns = bpf_ktime_get_ns();
                    return Ok(Reason::AllowedEstablished);
                }
            }
            // Policy changed since the flow was allowed: check it again.
            let reason = policy(pkt, ifindex, ep_flags, dir);
            if reason.is_drop() {
                let _ = CONNTRACK.remove(&key);
            } else {
                // SAFETY: as above.
                unsafe {
                    (*entry).generation = generation;
                    (*entry).last_seen_ns = bpf_ktime_get_ns();
                }
            }
            return Ok(reason);
        }
        reverse(&mut key);
        key.direction = dir.opposite() as u8;
        if let Some(entry) = CONNTRACK.get_ptr_mut(&key) {
            // SAFETY: as above.
            unsafe { (*entry).last_seen_ns = bpf_ktime_get_ns() };
            return Ok(Reason::AllowedReply);
        }
        reverse(&mut key);
        key.direction = dir as u8;
    }

    let reason = policy(pkt, ifindex, ep_flags, dir);
    if !reason.is_drop() && pkt.first_frag {
        let value = CtValue {
            generation,
            _pad: 0,
            // SAFETY: a helper without preconditions.
            last_seen_ns: unsafe { bpf_ktime_get_ns() },
        };
        // A full table only costs the reply its fast path; the LRU evicts the oldest flow anyway.
        let _ = CONNTRACK.insert(&key, &value, BPF_ANY as u64);
    }
    Ok(reason)
}

/// Turns a flow key into the key of its replies (direction left to the caller).
#[inline(always)]
fn reverse(key: &mut CtKey) {
    core::mem::swap(&mut key.src, &mut key.dst);
    core::mem::swap(&mut key.src_port, &mut key.dst_port);
}

/// What policy says about `pkt` (conntrack aside).
#[inline(never)]
fn policy(pkt: &Packet, ifindex: u32, ep_flags: u32, dir: Direction) -> Reason {
    let (isolated, peer, denied) = match dir {
        Direction::Ingress => (
            ep_flags & endpoint_flags::ISOLATED_INGRESS != 0,
            pkt.src,
            Reason::DroppedIngressDenied,
        ),
        Direction::Egress => (
            ep_flags & endpoint_flags::ISOLATED_EGRESS != 0,
            pkt.dst,
            Reason::DroppedEgressDenied,
        ),
    };
    let peer_identity = IPCACHE
        .get_ptr(IpKey { addr: peer })
        // SAFETY: map values are valid for the duration of the program.
        .map_or(identity::NONE, |info| unsafe { (*info).identity });
    if dir == Direction::Ingress && peer_identity == identity::HOST {
        return Reason::AllowedHost;
    }
    if !isolated {
        return Reason::AllowedNotIsolated;
    }

    let mut key = Key::new(
        POLICY_PREFIX_FULL,
        PolicyKey {
            endpoint: ifindex,
            identity: identity::ANY,
            direction: dir as u8,
            protocol: pkt.proto,
            port_be: pkt.dport.to_be_bytes(),
        },
    );
    if peer_identity != identity::NONE {
        key.data.identity = peer_identity;
        if POLICY.get(&key).is_some() {
            return Reason::AllowedPolicy;
        }
    }
    if let Some(id) = CIDRS.get(Key::new(128, IpKey { addr: peer })) {
        key.data.identity = *id;
        if POLICY.get(&key).is_some() {
            return Reason::AllowedPolicy;
        }
    }
    key.data.identity = identity::ANY;
    if POLICY.get(&key).is_some() {
        return Reason::AllowedPolicy;
    }
    denied
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
