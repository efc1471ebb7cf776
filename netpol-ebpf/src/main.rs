//! TC classifiers enforcing Kubernetes NetworkPolicy on a pod's host-side veth.
//!
//! - `pod_egress` on TC ingress of the host veth: packets the pod sends ([`Direction::Egress`]);
//! - `pod_ingress` on TC egress of the host veth: packets delivered to the pod ([`Direction::Ingress`]).
//!
//! Both call [`classify`]; any error drops the packet (fail closed) as `DroppedMalformed`. Every
//! verdict is counted (COUNTERS), recorded in the packet's flow (FLOWS) and, for drops, in DROPS
//! and the EVENTS ring buffer (rate-limited).
#![no_std]
#![no_main]
// Map keys are passed by reference on purpose: by value, each call site would copy the 44-byte
// `CtKey` onto the 512-byte BPF stack.
#![allow(clippy::needless_borrows_for_generic_args)]

mod link;
mod maps;
mod parse;

use aya_ebpf::{
    bindings::{BPF_ANY, TC_ACT_SHOT, TC_ACT_UNSPEC},
    cty::c_void,
    helpers::{bpf_ktime_get_ns, bpf_loop},
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use netpol_common::{
    CONFIG_CT_QUOTA, CONFIG_EVENT_RATE, CtKey, CtTimeouts, CtValue, DEFAULT_CT_QUOTA,
    DEFAULT_EVENT_RATE, Direction, DropEvent, DropKey, DropValue, EndpointInfo, FlowKey, FlowValue,
    FragKey, FragValue, IpKey, POLICY_PREFIX_ANY_PROTOCOL, POLICY_PREFIX_FULL, PolicyKey,
    PolicyMatch, PolicyValue, Reason, RuleHits, RuleKey, SvcKey, SvcValue, TokenBucket, ct_flags,
    endpoint_flags, identity, lost, proto, rule_code, service, tier, verdict, verdict_slot,
};

use crate::{
    maps::{
        Buffer, CONFIG, CONNTRACK, COUNTERS, CT_COUNT, DROPS, EVENT_BUDGET, EVENTS, FLOWS, FRAGS,
        LOST, RULE_HITS, VERDICTS, get_or_create,
    },
    parse::{Malformed, Packet, Parsed, same},
};

// A decision travels as one u64 (a BPF function returns one register):
// bits 0-7 the `Reason` code, 8-14 the `PolicyMatch` code, bit 15 `NEW` (the first packet of a flow
// now tracked: a connection), bit 16 `FLOW` (the packet's 5-tuple was parsed: record a flow), bit 17
// `DECIDED` (policy was evaluated, not a conntrack hit), bits 18-31 the `rule_code` of the rule that
// allowed it, bits 32-63 the id of the policy that allowed it (together: the rule's `RuleKey`).
const NEW: u64 = 1 << 15;
const FLOW: u64 = 1 << 16;
const DECIDED: u64 = 1 << 17;
const RULE_SHIFT: u64 = 18;
const RULE_MASK: u64 = 0x3fff;
const NS_PER_SEC: u64 = 1_000_000_000;
/// What an allowed packet returns: `TCX_NEXT` (`TC_ACT_UNSPEC`), so that TCX programs after ours and
/// legacy clsact filters (K3s's `bandwidth` plugin) still see it; `TC_ACT_OK` would end the chain.
const PASS: i32 = TC_ACT_UNSPEC;

#[inline(always)]
const fn reason_only(reason: Reason) -> u64 {
    reason as u64
}

#[classifier]
pub fn pod_egress(ctx: TcContext) -> i32 {
    classify(&ctx, Direction::Egress)
}

#[classifier]
pub fn pod_ingress(ctx: TcContext) -> i32 {
    classify(&ctx, Direction::Ingress)
}

/// On Flannel's VXLAN devices: a pod's packet to a Service frontend whose egress verdict was deferred
/// ([`service::DEFER_MARK`]) is decided here, after kube-proxy's DNAT chose a backend on another node.
/// Everything else passes untouched.
#[classifier]
pub fn tunnel_egress(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer handed to a classifier is a valid `__sk_buff`.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & service::DEFER_MARK == 0 {
        return PASS;
    }
    ctx.set_mark(mark & !service::DEFER_MARK);
    let mut pkt = Packet::new(Buffer::current());
    let decision = match parse::parse(&ctx, &mut pkt) {
        Ok(Parsed::Ip) => deferred_egress(&pkt, 0),
        // Only our programs set the mark, and only on IP packets (marks are scrubbed when a
        // packet leaves a pod's namespace, so a pod cannot set it).
        Ok(_) => return PASS,
        Err(Malformed) => reason_only(Reason::DroppedMalformed),
    };
    let code = (decision & 0xff) as u32;
    count(&COUNTERS, code);
    count_deferred(decision, ctx.len());
    if verdict::of(code as u8) != verdict::ALLOWED {
        let client = client_of(&pkt, 0);
        record(
            &pkt,
            client,
            Direction::Egress as u8,
            decision | FLOW,
            ctx.len(),
        );
    }
    if is_drop(decision) { TC_ACT_SHOT } else { PASS }
}

/// The local pod that sent a packet whose egress was deferred: the owner of its source address, or,
/// when kube-proxy masqueraded a hairpin connection to the node's address, the pod at `hairpin`.
#[inline(always)]
fn client_of(pkt: &Packet, hairpin: u32) -> u32 {
    match pkt.buffer.address(&pkt.src) {
        // SAFETY: map values are valid for the duration of the program.
        Some(info) => unsafe {
            if (*info).identity == identity::HOST {
                hairpin
            } else {
                (*info).endpoint
            }
        },
        None => 0,
    }
}

/// The egress decision of the pod that sent `pkt` towards its (post-DNAT) destination. A sender
/// that is not a local pod (a masqueraded client, say) cannot be decided for: dropped, since only
/// some backends were allowed.
#[inline(never)]
fn deferred_egress(pkt: &Packet, hairpin: u32) -> u64 {
    let client = client_of(pkt, hairpin);
    if client == 0 {
        return reason_only(Reason::DroppedServiceUnresolved);
    }
    let Some(ep) = pkt.buffer.endpoint(client) else {
        return reason_only(Reason::DroppedUnknownEndpoint);
    };
    // SAFETY: map values are valid for the duration of the program.
    let flags = unsafe { (*ep).flags };
    policy(pkt, client, flags, Direction::Egress, Ask::Packet)
}

/// How [`policy`] reads a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ask {
    /// As itself: its peer, its destination port, its direction.
    Packet,
    /// As a reply: the flow it answers has the same peer, goes the other way, and goes to the port
    /// this packet comes from.
    Answered,
}

/// The peer of the local endpoint in a packet going `dir`.
#[inline(always)]
fn peer_of(pkt: &Packet, dir: Direction) -> &[u8; 16] {
    match dir {
        Direction::Ingress => &pkt.src,
        Direction::Egress => &pkt.dst,
    }
}

#[inline(always)]
fn classify(ctx: &TcContext, dir: Direction) -> i32 {
    // SAFETY: the context pointer handed to a classifier is a valid `__sk_buff`.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let len = ctx.len();
    let mut pkt = Packet::new(Buffer::current());
    // Any error drops the packet (fail closed) as malformed.
    let decision =
        try_classify(ctx, &mut pkt, ifindex, dir).unwrap_or(reason_only(Reason::DroppedMalformed));
    record(&pkt, ifindex, dir as u8, decision, len);
    let code = (decision & 0xff) as u32;
    if let Some(slot) = COUNTERS.get_ptr_mut(code) {
        // SAFETY: a per-CPU slot: nothing else writes it while this program runs on this CPU.
        unsafe { *slot += 1 };
    }
    if code >= Reason::DroppedIngressDenied as u32 {
        TC_ACT_SHOT
    } else {
        PASS
    }
}

#[inline(always)]
fn try_classify(
    ctx: &TcContext,
    pkt: &mut Packet,
    ifindex: u32,
    dir: Direction,
) -> Result<u64, Malformed> {
    let Some(ep) = pkt.buffer.endpoint(ifindex) else {
        return Ok(reason_only(Reason::DroppedUnknownEndpoint));
    };
    // SAFETY: map values are valid for the duration of the program.
    let ep = unsafe { &*ep };
    let egress = dir == Direction::Egress;
    if egress && !link::source_mac_is_own(ctx, ep)? {
        return Ok(reason_only(Reason::DroppedSpoofedLink));
    }
    let reason = match parse::parse(ctx, pkt)? {
        Parsed::Ip => {
            let decision = classify_ip(ctx, pkt, ifindex, ep.flags, dir);
            if pkt.first_frag && pkt.more_frags && !is_drop(decision) {
                remember_fragments(pkt, ifindex, dir);
            }
            return Ok(decision | FLOW);
        }
        Parsed::Arp if egress => link::arp_from_pod(ctx, pkt, ifindex, ep)?,
        Parsed::Arp => Reason::AllowedNotPoliced,
        Parsed::Neighbour => link::neighbour(ctx, pkt, ifindex, ep, egress)?,
        // Policies speak of IP only: a pod with ClusterNetworkPolicy rules for this direction, or
        // isolated in it, gets nothing else (audit mode lets it pass only without tier rules).
        Parsed::OtherEtherType if endpoint_flags::any_tier(ep.flags, dir) => {
            Reason::DroppedEtherType
        }
        Parsed::OtherEtherType if isolated(ep, dir) && audit(ep, dir) => audited(dir),
        Parsed::OtherEtherType if isolated(ep, dir) => Reason::DroppedEtherType,
        Parsed::OtherEtherType => Reason::AllowedNotPoliced,
    };
    Ok(reason_only(reason))
}

#[inline(always)]
fn isolated(ep: &EndpointInfo, dir: Direction) -> bool {
    ep.flags & endpoint_flags::isolated(dir) != 0
}

/// Whether `ep`'s isolation in `dir` is in audit mode (its denials pass as would-be drops).
#[inline(always)]
fn audit(ep: &EndpointInfo, dir: Direction) -> bool {
    ep.flags & endpoint_flags::audit(dir) != 0
}

/// A CONFIG slot (0 when unset).
#[inline(always)]
fn config(slot: u32) -> u32 {
    CONFIG.get(slot).copied().unwrap_or(0)
}

/// A CONFIG slot whose 0 means `default`.
#[inline(always)]
fn config_or(slot: u32, default: u32) -> u32 {
    match config(slot) {
        0 => default,
        v => v,
    }
}

/// Multicast or limited broadcast: delivered to whoever listens, not to one pod's address.
#[inline(always)]
fn is_group_address(addr: &[u8; 16]) -> bool {
    let mut zeros = 0;
    for i in 0..10 {
        zeros |= addr[i];
    }
    let v4_mapped = zeros == 0 && addr[10] == 0xff && addr[11] == 0xff;
    if v4_mapped {
        addr[12] & 0xf0 == 0xe0 || (addr[12] & addr[13] & addr[14] & addr[15]) == 0xff
    } else {
        link::is_multicast(addr)
    }
}

/// An ICMP error whose quoted packet `quoted` fits the outer packet: the error goes back to the
/// quoted packet's sender, and when the pod sends one, it comes from the quoted packet's receiver.
/// (Errors from routers on the way have other sources, so ingress does not check the source.)
#[inline(always)]
fn quote_fits(pkt: &Packet, quoted: &CtKey, dir: Direction) -> bool {
    same(&quoted.src, &pkt.dst) && (dir == Direction::Ingress || same(&quoted.dst, &pkt.src))
}

/// Records the packet's verdict: the flow record (one update of FLOWS), and for a drop the DROPS
/// counter and a rate-limited event; for a policy decision the VERDICTS counter.
#[inline(never)]
fn record(pkt: &Packet, ifindex: u32, dir: u8, decision: u64, len: u32) {
    let reason = (decision & 0xff) as u8;
    let verdict = verdict::of(reason);
    let matched = ((decision >> 8) & 0x7f) as u8;
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    count_rule(decision, len, now);
    if decision & DECIDED != 0 {
        count(&VERDICTS, verdict_slot(dir, verdict, matched));
    }
    let mut key = FlowKey {
        endpoint: ifindex,
        direction: dir,
        ..FlowKey::default()
    };
    if decision & FLOW != 0 {
        key.src.addr = pkt.src;
        key.dst.addr = pkt.dst;
        key.src_port = pkt.sport;
        key.dst_port = pkt.dport;
        key.protocol = pkt.proto;
        record_flow(&key, decision, now, len);
    }
    // A would-be drop of audit mode is counted as a drop is, under its own reason; it is reported
    // by an event when decided (not for each packet of an audited flow, which would use up the
    // pod's event budget that its real drops need).
    if verdict != verdict::ALLOWED {
        let counted = count_drop(&key, reason, len);
        let report = verdict == verdict::DROPPED || decision & DECIDED != 0;
        if report
            && !send_event(&key, reason, len, now)
            && let Some(v) = counted
        {
            // SAFETY: this CPU's copy of the value.
            unsafe { (*v).unreported += 1 };
        }
    }
}

/// Counts a packet of a Service connection whose egress was decided after DNAT to the rule that
/// allows the backend kube-proxy picked (per packet: such a flow is decided again each time).
#[inline(always)]
fn count_deferred(decision: u64, len: u32) {
    // SAFETY: a helper without preconditions.
    count_rule(decision, len, unsafe { bpf_ktime_get_ns() });
}

/// The rule a decision names (its policy and [`rule_code`]); its code is NONE when no rule allowed.
#[inline(always)]
fn rule_of(decision: u64) -> RuleKey {
    RuleKey {
        policy: (decision >> 32) as u32,
        rule: ((decision >> RULE_SHIFT) & RULE_MASK) as u32,
    }
}

/// The decision bits that name `rule`.
#[inline(always)]
fn rule_bits(rule: RuleKey) -> u64 {
    (((rule.rule as u64) & RULE_MASK) << RULE_SHIFT) | ((rule.policy as u64) << 32)
}

/// Adds the packet to the hit counters of the rule that allowed its flow, if one did: a packet,
/// its bytes, the time, and a connection for the first packet of a tracked flow. A full map only
/// costs the counts (the agent reports its use).
#[inline(always)]
fn count_rule(decision: u64, len: u32, now: u64) {
    let key = rule_of(decision);
    if key.rule == rule_code::NONE || is_drop(decision) {
        return;
    }
    let Some(ptr) = get_or_create!(RULE_HITS, &key, &RuleHits::default()) else {
        return;
    };
    // SAFETY: this CPU's copy of the value: nothing else writes it while this program runs here.
    unsafe {
        let v = &mut *ptr;
        v.packets += 1;
        v.bytes += len as u64;
        v.last_hit_ns = now;
        if decision & NEW != 0 {
            v.connections += 1;
        }
    }
}

#[inline(always)]
fn count(map: &aya_ebpf::maps::PerCpuArray<u64>, slot: u32) {
    if let Some(n) = map.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot: nothing else writes it while this program runs on this CPU.
        unsafe { *n += 1 };
    }
}

#[inline(always)]
fn record_flow(key: &FlowKey, decision: u64, now: u64, len: u32) {
    let Some(ptr) = get_or_create!(FLOWS, key, &FlowValue::default()) else {
        count(&LOST, lost::FLOWS_FULL);
        return;
    };
    let reason = (decision & 0xff) as u8;
    // SAFETY: this CPU's copy of the value: nothing else writes it while this program runs here.
    unsafe {
        let v = &mut *ptr;
        if v.packets == 0 {
            v.first_seen_ns = now;
        }
        v.packets += 1;
        v.bytes += len as u64;
        v.last_seen_ns = now;
        // A conntrack hit keeps the decision this CPU took for the flow.
        if decision & DECIDED != 0 || v.decided_ns == 0 {
            v.reason = reason;
            v.verdict = verdict::of(reason);
            v.matched = ((decision >> 8) & 0x7f) as u8;
            v.policy = (decision >> 32) as u32;
        }
        if decision & DECIDED != 0 {
            v.decided_ns = now;
        }
    }
}

/// Counts a drop in DROPS; returns this CPU's counter, or `None` when the map is full.
#[inline(always)]
fn count_drop(key: &FlowKey, reason: u8, len: u32) -> Option<*mut DropValue> {
    let dkey = DropKey {
        endpoint: key.endpoint,
        direction: key.direction,
        reason,
        protocol: proto::class(key.protocol),
        _pad: 0,
    };
    let ptr = get_or_create!(DROPS, &dkey, &DropValue::default());
    match ptr {
        // SAFETY: this CPU's copy of the value.
        Some(v) => unsafe {
            (*v).packets += 1;
            (*v).bytes += len as u64;
        },
        None => count(&LOST, lost::DROPS_FULL),
    }
    ptr
}

/// Takes a token from the bucket of `endpoint` on this CPU: at most `rate` events per second,
/// endpoint and CPU, with a burst of one second's worth. A bucket starts full.
#[inline(always)]
fn take_token(endpoint: u32, now: u64) -> bool {
    // A new bucket is empty and never refilled: its first refill fills it (elapsed is capped at a
    // second).
    let Some(bucket) = get_or_create!(EVENT_BUDGET, &endpoint, &TokenBucket::default()) else {
        return false;
    };
    let rate = config_or(CONFIG_EVENT_RATE, DEFAULT_EVENT_RATE) as u64;
    // SAFETY: this CPU's bucket.
    unsafe {
        let b = &mut *bucket;
        let mut elapsed = now.wrapping_sub(b.last_ns);
        if elapsed > NS_PER_SEC {
            elapsed = NS_PER_SEC;
        }
        b.last_ns = now;
        let cap = rate * NS_PER_SEC;
        let tokens = b.tokens + elapsed * rate;
        b.tokens = if tokens > cap { cap } else { tokens };
        if b.tokens >= NS_PER_SEC {
            b.tokens -= NS_PER_SEC;
            true
        } else {
            false
        }
    }
}

/// Sends a drop event; false when it could not (rate-limited or the ring is full), which is counted.
#[inline(always)]
fn send_event(key: &FlowKey, reason: u8, len: u32, now: u64) -> bool {
    if !take_token(key.endpoint, now) {
        count(&LOST, lost::RATE_LIMITED);
        return false;
    }
    match EVENTS.reserve::<DropEvent>(0) {
        Some(mut entry) => {
            entry.write(DropEvent {
                timestamp_ns: now,
                key: *key,
                len,
                reason,
                _pad: [0; 7],
            });
            entry.submit(0);
            true
        }
        None => {
            count(&LOST, lost::RING_FULL);
            false
        }
    }
}

/// The decision for an IP packet ([`decide_ip`]), a malformed one dropped. Out of line: its
/// conntrack key and entries get a stack frame of their own, off the programs' entry frame (BPF's
/// 512-byte stack is shared by a call chain). Returns a plain `u64`: a `Result` would travel
/// through a sixth, hidden argument, and BPF functions take at most five.
#[inline(never)]
fn classify_ip(ctx: &TcContext, pkt: &Packet, ifindex: u32, ep_flags: u32, dir: Direction) -> u64 {
    decide_ip(ctx, pkt, ifindex, ep_flags, dir).unwrap_or(reason_only(Reason::DroppedMalformed))
}

#[inline(always)]
fn decide_ip(
    ctx: &TcContext,
    pkt: &Packet,
    ifindex: u32,
    ep_flags: u32,
    dir: Direction,
) -> Result<u64, Malformed> {
    if dir == Direction::Egress {
        if link::is_router_message(pkt) {
            return Ok(reason_only(Reason::DroppedSpoofedLink));
        }
        // Anti-spoofing: a pod may only send from its own addresses.
        if !link::owned_by(pkt.buffer, &pkt.src, ifindex) {
            return Ok(reason_only(Reason::DroppedSpoofedSource));
        }
    } else {
        // A unicast packet is only for the pod that has its destination address.
        if !is_group_address(&pkt.dst) && !link::owned_by(pkt.buffer, &pkt.dst, ifindex) {
            return Ok(reason_only(Reason::DroppedNotForPod));
        }
        // A Service connection whose egress verdict waited for kube-proxy's DNAT, now delivered to
        // a local backend: the client's egress policy decides first.
        // SAFETY: the context pointer handed to a classifier is a valid `__sk_buff`.
        let mark = unsafe { (*ctx.skb.skb).mark };
        if mark & service::DEFER_MARK != 0 {
            ctx.set_mark(mark & !service::DEFER_MARK);
            let decision = deferred_egress(pkt, ifindex);
            if is_drop(decision) {
                return Ok(decision);
            }
            count_deferred(decision, ctx.len());
            // The client's would-be drop is recorded under the client, as at the tunnel; this
            // packet's own verdict is the backend's ingress decision below.
            if verdict::of(decision as u8) == verdict::AUDIT {
                let client = client_of(pkt, ifindex);
                record(
                    pkt,
                    client,
                    Direction::Egress as u8,
                    decision | FLOW,
                    ctx.len(),
                );
            }
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
    let generation = pkt.buffer.generation;
    if pkt.icmp_error && icmp_error_of_known_flow(ctx, pkt, &mut key, dir, generation)? {
        return Ok(reason_only(Reason::AllowedReply));
    }

    // A later fragment (no ports) of a datagram whose first fragment was allowed goes with it.
    if !pkt.first_frag && fragment_of_allowed(pkt, ifindex, dir, generation) {
        return Ok(reason_only(Reason::AllowedFragment));
    }

    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if pkt.first_frag {
        if let Some(decision) = tracked(ctx, pkt, &mut key, ep_flags, dir, generation, now) {
            return Ok(decision);
        }
    }

    let decision = through_service(ctx, pkt, ifindex, dir, decide(pkt, ifindex, ep_flags, dir));
    if !is_drop(decision) && pkt.first_frag && starts_flow(pkt, ep_flags) && take_ct_slot(ifindex) {
        let closing = if pkt.tcp_flags & parse::tcp::FIN != 0 {
            ct_flags::CLOSING
        } else {
            0
        };
        let value = CtValue {
            generation,
            flags: ct_flags_of(decision) | closing,
            last_seen_ns: now,
            rule: rule_of(decision),
        };
        // A full table only costs the reply its fast path; the LRU evicts the oldest flow anyway.
        if CONNTRACK.insert(&key, &value, BPF_ANY as u64).is_err() {
            release_ct_slot(ifindex);
        } else {
            return Ok(decision | NEW);
        }
    }
    Ok(decision)
}

/// The FRAGS key of the datagram `pkt` belongs to, at `ifindex` going `dir`.
#[inline(always)]
fn frag_key(pkt: &Packet, ifindex: u32, dir: Direction) -> FragKey {
    FragKey {
        src: pkt.src,
        dst: pkt.dst,
        id: pkt.frag_id,
        endpoint: ifindex,
        protocol: pkt.proto,
        direction: dir as u8,
        _pad: [0; 2],
    }
}

/// Remembers that the first fragment of `pkt`'s datagram was allowed, under the current policy
/// generation. A full table forgets its oldest datagram: its later fragments are then decided by
/// policy alone (as untracked fragments always are).
#[inline(never)]
fn remember_fragments(pkt: &Packet, ifindex: u32, dir: Direction) {
    let value = FragValue {
        generation: pkt.buffer.generation,
        _pad: 0,
    };
    let _ = FRAGS.insert(&frag_key(pkt, ifindex, dir), &value, BPF_ANY as u64);
}

/// Whether `pkt`, a later fragment, belongs to a datagram whose first fragment was allowed here
/// under the current policy generation.
#[inline(never)]
fn fragment_of_allowed(pkt: &Packet, ifindex: u32, dir: Direction, generation: u32) -> bool {
    FRAGS
        .get_ptr(&frag_key(pkt, ifindex, dir))
        // SAFETY: map values are valid for the duration of the program.
        .is_some_and(|v| unsafe { (*v).generation } == generation)
}

/// An ICMP error about a flow this endpoint knows, consistent with it ([`quote_fits`]), from a
/// sender that may speak for it ([`error_sender_fits`]), and allowed under the current policy
/// `generation`, is a reply. Leaves `key` as the outer packet's flow whatever the answer.
#[inline(always)]
fn icmp_error_of_known_flow(
    ctx: &TcContext,
    pkt: &Packet,
    key: &mut CtKey,
    dir: Direction,
    generation: u32,
) -> Result<bool, Malformed> {
    if parse::embedded_flow(ctx, pkt, key)?
        && quote_fits(pkt, key, dir)
        && error_sender_fits(pkt, key)
    {
        // The embedded packet went the other way: it is a packet of the flow as first seen...
        key.direction = dir.opposite() as u8;
        if current_entry(key, generation) {
            return Ok(true);
        }
        // ... or a reply of a flow first seen in this direction.
        reverse(key);
        key.direction = dir as u8;
        if current_entry(key, generation) {
            return Ok(true);
        }
    }
    // Not about a known flow (or `embedded_flow` gave up half-way): back to the outer packet.
    key.src = pkt.src;
    key.dst = pkt.dst;
    key.src_port = pkt.sport;
    key.dst_port = pkt.dport;
    key.protocol = pkt.proto;
    key.direction = dir as u8;
    Ok(false)
}

/// A tracked flow allowed under the current policy generation (a stale one is not re-checked here:
/// its error is then policed like any packet).
#[inline(always)]
fn current_entry(key: &CtKey, generation: u32) -> bool {
    CONNTRACK
        .get_ptr(key)
        // SAFETY: map values are valid for the duration of the program.
        .is_some_and(|e| unsafe { (*e).generation } == generation)
}

/// Who may send an error about a flow: the quoted packet's destination, or a router on the way
/// (the node, an address outside the cluster), never another pod: one pod cannot forge errors
/// about another's flows to reach it.
#[inline(always)]
fn error_sender_fits(pkt: &Packet, quoted: &CtKey) -> bool {
    if same(&pkt.src, &quoted.dst) {
        return true;
    }
    let id = pkt
        .buffer
        .address(&pkt.src)
        // SAFETY: map values are valid for the duration of the program.
        .map_or(identity::NONE, |info| unsafe { (*info).identity });
    !identity::is_pod(id)
}

/// The decision for a packet of a tracked flow, forward or reply; `None` when the flow is not
/// tracked (or its entry outlived its timeout, see [`CtTimeouts`]). A flow allowed under an older
/// policy generation is checked again, in the direction it was allowed in, whichever way this packet
/// goes: a revoked allow ends the flow both ways.
#[inline(always)]
fn tracked(
    ctx: &TcContext,
    pkt: &Packet,
    key: &mut CtKey,
    ep_flags: u32,
    dir: Direction,
    generation: u32,
    now: u64,
) -> Option<u64> {
    let ifindex = key.endpoint;
    if let Some(entry) = live_entry(key, now) {
        follow_state(entry, pkt, false, now);
        // SAFETY: map values stay valid for the duration of the program; racing writers only touch
        // these plain integers.
        unsafe {
            if (*entry).flags & ct_flags::SERVICE_DEFERRED != 0 {
                defer(ctx);
            }
            if (*entry).generation == generation {
                return Some(established((*entry).flags, dir) | rule_bits((*entry).rule));
            }
        }
        let decision = through_service(ctx, pkt, ifindex, dir, decide(pkt, ifindex, ep_flags, dir));
        return Some(revalidated(key, entry, decision, generation));
    }
    reverse(key);
    key.direction = dir.opposite() as u8;
    if let Some(entry) = live_entry(key, now) {
        follow_state(entry, pkt, true, now);
        // SAFETY: as above.
        let (generation_seen, rule) = unsafe { ((*entry).generation, (*entry).rule) };
        if generation_seen == generation {
            return Some(reason_only(Reason::AllowedReply) | rule_bits(rule));
        }
        let decision = reply_recheck(pkt, ifindex, ep_flags, dir);
        let decision = revalidated(key, entry, decision, generation);
        return Some(if is_drop(decision) {
            decision
        } else {
            reason_only(Reason::AllowedReply) | rule_bits(rule_of(decision))
        });
    }
    reverse(key);
    key.direction = dir as u8;
    None
}

/// The conntrack entry of `key` when it has not outlived its timeout; an expired one is removed.
#[inline(always)]
fn live_entry(key: &CtKey, now: u64) -> Option<*mut CtValue> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: map values stay valid for the duration of the program.
    let (flags, last_seen) = unsafe { ((*entry).flags, (*entry).last_seen_ns) };
    let (slot, default) = CtTimeouts::slot(key.protocol, flags);
    let timeout = config_or(slot, default);
    if now.saturating_sub(last_seen) > timeout as u64 * NS_PER_SEC {
        if CONNTRACK.remove(key).is_ok() {
            release_ct_slot(key.endpoint);
        }
        return None;
    }
    Some(entry)
}

/// Counts one more conntrack entry for `endpoint` if it is under its quota ([`CONFIG_CT_QUOTA`]);
/// false (the flow stays untracked) when it is at it, or when it cannot be counted. Over quota, only
/// that pod's new flows lose their conntrack entries: nobody else's are evicted for them.
#[inline(never)]
fn take_ct_slot(endpoint: u32) -> bool {
    let quota = config_or(CONFIG_CT_QUOTA, DEFAULT_CT_QUOTA) as u64;
    let Some(count) = get_or_create!(CT_COUNT, &endpoint, &0) else {
        return false;
    };
    // BPF has no atomic read-modify-write that the Rust target offers here: concurrent new flows of
    // one endpoint on several CPUs may lose an increment, so the count is approximate between the
    // agent's exact recounts (every 30 s); the quota is a bounded share, not an exact limit.
    // SAFETY: a map value, valid for the duration of the program.
    unsafe {
        let n = core::ptr::read_volatile(count);
        if n >= quota {
            return false;
        }
        core::ptr::write_volatile(count, n + 1);
    }
    true
}

/// Uncounts a conntrack entry of `endpoint` (never below zero; approximate as in
/// [`take_ct_slot`]).
#[inline(never)]
fn release_ct_slot(endpoint: u32) {
    if let Some(count) = CT_COUNT.get_ptr_mut(&endpoint) {
        // SAFETY: a map value, valid for the duration of the program.
        unsafe {
            let n = core::ptr::read_volatile(count);
            if n > 0 {
                core::ptr::write_volatile(count, n - 1);
            }
        }
    }
}

/// Follows a packet of the flow: the last-seen time, a reply making it established, a TCP FIN or
/// RST making it closing (short-lived).
#[inline(always)]
fn follow_state(entry: *mut CtValue, pkt: &Packet, reply: bool, now: u64) {
    let mut set = 0;
    if reply {
        set |= ct_flags::ESTABLISHED;
    }
    if pkt.tcp_flags & (parse::tcp::FIN | parse::tcp::RST) != 0 {
        set |= ct_flags::CLOSING;
    }
    // SAFETY: map values stay valid for the duration of the program.
    unsafe {
        (*entry).last_seen_ns = now;
        if (*entry).flags & set != set {
            (*entry).flags |= set;
        }
    }
}

/// Applies a re-check of a tracked flow: a denied flow is forgotten, an allowed one moves to the
/// current generation (keeping its TCP state).
#[inline(always)]
fn revalidated(key: &CtKey, entry: *mut CtValue, decision: u64, generation: u32) -> u64 {
    if is_drop(decision) {
        if CONNTRACK.remove(key).is_ok() {
            release_ct_slot(key.endpoint);
        }
    } else {
        // SAFETY: map values stay valid for the duration of the program.
        unsafe {
            (*entry).generation = generation;
            let kept = (*entry).flags & !(ct_flags::SERVICE_DEFERRED | ct_flags::AUDITED);
            (*entry).flags = kept | ct_flags_of(decision);
            (*entry).rule = rule_of(decision);
        }
    }
    decision
}

/// Whether an allowed first packet starts a tracked flow. Not at an endpoint no policy of any
/// tier decides for in either direction (every packet passes there anyway: tracking would only let its flows crowd the shared
/// table), and not for a TCP RST (it ends what it belongs to; a lone one must not open anything).
#[inline(always)]
fn starts_flow(pkt: &Packet, ep_flags: u32) -> bool {
    ep_flags & endpoint_flags::POLICED != 0
        && !(pkt.proto == proto::TCP && pkt.tcp_flags & parse::tcp::RST != 0)
}

/// The policy decision for the flow that a reply packet `pkt` answers: the same peer, in the other
/// direction, to the port the reply comes from. Through a Service frontend, a deferred verdict
/// counts as allowed here: the flow's forward packets are decided after DNAT.
#[inline(never)]
fn reply_recheck(pkt: &Packet, ifindex: u32, ep_flags: u32, dir: Direction) -> u64 {
    let decision = policy(pkt, ifindex, ep_flags, dir, Ask::Answered);
    if dir.opposite() != Direction::Egress || !is_denied_egress(decision) {
        return decision;
    }
    match service_verdict(pkt.buffer, ifindex, peer_of(pkt, dir), pkt.sport, pkt.proto) {
        Some(v) => service_decision(Reason::AllowedService, v),
        None => decision,
    }
}

/// What policy says about `pkt` in `dir` (conntrack aside).
#[inline(always)]
fn decide(pkt: &Packet, ifindex: u32, ep_flags: u32, dir: Direction) -> u64 {
    policy(pkt, ifindex, ep_flags, dir, Ask::Packet)
}

/// Sets [`service::DEFER_MARK`] on the packet.
#[inline(always)]
fn defer(ctx: &TcContext) {
    // SAFETY: the context pointer handed to a classifier is a valid `__sk_buff`.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(mark | service::DEFER_MARK);
}

#[inline(always)]
fn ct_flags_of(decision: u64) -> u32 {
    let reason = decision & 0xff;
    if reason == Reason::AllowedServiceDeferred as u64 {
        ct_flags::SERVICE_DEFERRED
    } else if verdict::of(reason as u8) == verdict::AUDIT {
        ct_flags::AUDITED
    } else {
        0
    }
}

/// The verdict of a packet of a tracked flow in the direction it was allowed in: a flow that passed
/// only under audit mode stays a would-be drop, packet by packet.
#[inline(always)]
fn established(flags: u32, dir: Direction) -> u64 {
    if flags & ct_flags::AUDITED == 0 {
        reason_only(Reason::AllowedEstablished)
    } else {
        reason_only(audited(dir))
    }
}

/// The audit-mode reason of a denial in `dir`.
#[inline(always)]
fn audited(dir: Direction) -> Reason {
    match dir {
        Direction::Ingress => Reason::AuditedIngressDenied,
        Direction::Egress => Reason::AuditedEgressDenied,
    }
}

/// A denied egress packet to a Service frontend gets the frontend's precomputed verdict: allowed
/// when every backend is, deferred (marked, decided after DNAT) when some are.
#[inline(always)]
fn through_service(
    ctx: &TcContext,
    pkt: &Packet,
    ifindex: u32,
    dir: Direction,
    decision: u64,
) -> u64 {
    if dir != Direction::Egress || !is_denied_egress(decision) {
        return decision;
    }
    match service_verdict(pkt.buffer, ifindex, &pkt.dst, pkt.dport, pkt.proto) {
        Some(v) if v.verdict == service::VERDICT_ALLOW => {
            service_decision(Reason::AllowedService, v)
        }
        Some(v) => {
            defer(ctx);
            service_decision(Reason::AllowedServiceDeferred, v)
        }
        None => decision,
    }
}

/// An egress denial, enforced or audited: a Service frontend's verdict may still allow it.
#[inline(always)]
fn is_denied_egress(decision: u64) -> bool {
    let reason = decision & 0xff;
    reason == Reason::DroppedEgressDenied as u64 || reason == Reason::AuditedEgressDenied as u64
}

/// The SERVICES verdict (allow or defer) of `endpoint` towards the frontend `vip`:`port`, with
/// its rule.
#[inline(always)]
fn service_verdict(
    buffer: Buffer,
    endpoint: u32,
    vip: &[u8; 16],
    port: u16,
    protocol: u8,
) -> Option<SvcValue> {
    let key = SvcKey {
        endpoint,
        vip: IpKey { addr: *vip },
        port_be: port.to_be_bytes(),
        protocol,
        _pad: 0,
    };
    let v = buffer.service(&key)?;
    // SAFETY: map values are valid for the duration of the program.
    let v = unsafe { *v };
    match v.verdict {
        service::VERDICT_ALLOW | service::VERDICT_DEFER => Some(v),
        _ => None,
    }
}

/// The decision through a Service frontend with verdict `v`: allowed outright, it counts to the
/// verdict's rule; deferred, to the rule that allows the backend, after DNAT (not here too).
#[inline(always)]
fn service_decision(reason: Reason, v: SvcValue) -> u64 {
    let rule = RuleKey {
        policy: v.policy,
        rule: if reason == Reason::AllowedService {
            v.rule as u32
        } else {
            rule_code::NONE
        },
    };
    reason_only(reason) | ((PolicyMatch::L3L4 as u64) << 8) | DECIDED | rule_bits(rule)
}

#[inline(always)]
fn is_drop(decision: u64) -> bool {
    (decision & 0xff) >= Reason::DroppedIngressDenied as u64
}

/// Turns a flow key into the key of its replies (direction left to the caller).
#[inline(always)]
fn reverse(key: &mut CtKey) {
    core::mem::swap(&mut key.src, &mut key.dst);
    core::mem::swap(&mut key.src_port, &mut key.dst_port);
}

/// What policy says about `pkt`, going `dir` at the local endpoint `ifindex` and read as `ask` says
/// (conntrack aside), as a decision (see [`FLOW`]) with `DECIDED` set: the Admin tier of
/// ClusterNetworkPolicy first, then NetworkPolicy where it isolates the pod, then the Baseline tier.
#[inline(never)]
fn policy(pkt: &Packet, ifindex: u32, ep_flags: u32, dir: Direction, ask: Ask) -> u64 {
    let peer = peer_of(pkt, dir);
    let (dir, port) = match ask {
        Ask::Packet => (dir, pkt.dport),
        Ask::Answered => (dir.opposite(), pkt.sport),
    };
    let isolated = ep_flags & endpoint_flags::isolated(dir) != 0;
    let peer_identity = pkt
        .buffer
        .address(peer)
        // SAFETY: map values are valid for the duration of the program.
        .map_or(identity::NONE, |info| unsafe { (*info).identity });
    if dir == Direction::Ingress && peer_identity == identity::HOST {
        return reason_only(Reason::AllowedHost) | DECIDED;
    }
    if !isolated && !endpoint_flags::any_tier(ep_flags, dir) {
        return reason_only(Reason::AllowedNotIsolated) | DECIDED;
    }
    // A Service's virtual address is judged on its backends (SERVICES, by the caller), never by a
    // rule that happens to match the address itself.
    if dir == Direction::Egress && pkt.buffer.is_frontend(peer) {
        // Where a tier has rules, only a SERVICES verdict passes: an audit-mode NetworkPolicy's
        // would-be drop must not carry the packet past the tiers, to a backend they deny.
        if endpoint_flags::any_tier(ep_flags, dir) {
            return reason_only(Reason::DroppedEgressDenied) | DECIDED;
        }
        return refused(ep_flags, dir);
    }
    let mut key = Key::new(
        POLICY_PREFIX_FULL,
        PolicyKey {
            endpoint: ifindex,
            identity: identity::ANY,
            direction: dir as u8,
            protocol: pkt.proto,
            port_be: port.to_be_bytes(),
        },
    );
    let ids = peer_identities(pkt.buffer, peer, peer_identity);
    if ep_flags & endpoint_flags::tiered(dir, tier::ADMIN) != 0 {
        let decided = tier_decision(pkt.buffer, &key, &ids, tier::ADMIN);
        if decided != UNDECIDED {
            return decided;
        }
    }
    if isolated {
        for id in ids {
            if id == identity::NONE {
                continue;
            }
            key.data.identity = id;
            if let Some(v) = pkt.buffer.policy(&key) {
                return allowed(pkt.buffer, &mut key, v);
            }
        }
        return refused(ep_flags, dir);
    }
    if ep_flags & endpoint_flags::tiered(dir, tier::BASELINE) != 0 {
        let decided = tier_decision(pkt.buffer, &key, &ids, tier::BASELINE);
        if decided != UNDECIDED {
            return decided;
        }
    }
    reason_only(Reason::AllowedNotIsolated) | DECIDED
}

/// What [`tier_decision`] returns when its tier decides nothing (a decision always has `DECIDED`).
const UNDECIDED: u64 = 0;

/// The identities POLICY knows the peer `addr` by, most specific first ([`identity::NONE`] for
/// none): its IPCACHE identity; [`identity::ALL_PODS`] when that is a pod's (the node, a pending
/// endpoint and addresses outside the cluster never match a rule for every pod); its longest CIDR
/// prefix; and [`identity::ANY`].
#[inline(always)]
fn peer_identities(buffer: Buffer, addr: &[u8; 16], peer_identity: u32) -> [u32; 4] {
    let all_pods = if identity::is_pod(peer_identity) {
        identity::ALL_PODS
    } else {
        identity::NONE
    };
    let cidr = buffer.cidr(addr).unwrap_or(identity::NONE);
    [peer_identity, all_pods, cidr, identity::ANY]
}

/// The decision of ClusterNetworkPolicy `tier` for the key's endpoint, direction, protocol and
/// port: its first matching rule over the peer's identities `ids` (the entry of least rank), or
/// [`UNDECIDED`] when none matches or it is a Pass (the next tier decides).
#[inline(never)]
fn tier_decision(buffer: Buffer, key: &Key<PolicyKey>, ids: &[u32; 4], tier: u8) -> u64 {
    let dir = if key.data.direction == Direction::Ingress as u8 {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    let mut scan = TierScan {
        key: Key::new(
            POLICY_PREFIX_FULL,
            PolicyKey {
                direction: tier::key_direction(dir, tier),
                ..key.data
            },
        ),
        ids: *ids,
        buffer,
        first: NO_TIER_ENTRY,
    };
    // The scan runs in `bpf_loop`: its callback is verified once, not once per identity and per
    // path into this function (an unrolled scan took the verifier past its million instructions).
    // SAFETY: the callback has the signature `bpf_loop` calls and reads `scan` as the `TierScan` it
    // is; `scan` outlives the call.
    unsafe {
        bpf_loop(
            SCANNED_IDENTITIES,
            scan_identity as *mut c_void,
            (&mut scan as *mut TierScan).cast(),
            0,
        );
    }
    let first = scan.first;
    if first == NO_TIER_ENTRY {
        return UNDECIDED;
    }
    let packed = (first >> 32) as u32;
    let reason = match tier::action(packed) {
        tier::ACCEPT => Reason::AllowedClusterPolicy,
        tier::DENY => Reason::DroppedClusterPolicy,
        _ => return UNDECIDED,
    };
    let rule = RuleKey {
        policy: first as u32,
        rule: tier::code(packed),
    };
    reason_only(reason) | ((PolicyMatch::L3L4 as u64) << 8) | DECIDED | rule_bits(rule)
}

/// What [`tier_entry`] returns for no entry: after every packed one.
const NO_TIER_ENTRY: u64 = u64::MAX;

/// How many identities a peer is looked up by ([`peer_identities`]).
const SCANNED_IDENTITIES: u32 = 4;

/// The state of a tier's scan of the peer's identities.
#[repr(C)]
struct TierScan {
    key: Key<PolicyKey>,
    ids: [u32; 4],
    buffer: Buffer,
    /// The least [`tier_entry`] so far.
    first: u64,
}

/// One step of the scan: the entry of identity `index` ([`identity::NONE`] has none), kept when it
/// comes first. Returns 0 (go on), as `bpf_loop` expects.
extern "C" fn scan_identity(index: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `TierScan` that `tier_decision` handed to `bpf_loop`.
    let scan = unsafe { &mut *ctx.cast::<TierScan>() };
    let Some(id) = scan.ids.get(index as usize).copied() else {
        return 1;
    };
    if id == identity::NONE {
        return 0;
    }
    scan.key.data.identity = id;
    let entry = tier_entry(scan.buffer, &scan.key);
    // The packed rule is the high half: the smaller comes first (`tier::precedes`).
    if entry < scan.first {
        scan.first = entry;
    }
    0
}

/// The POLICY entry of `key` as one number, its packed rule in the high half and its policy in the
/// low one, or [`NO_TIER_ENTRY`]. Out of line: the lookup's branches end here, so the caller's
/// loop does not multiply them.
#[inline(never)]
fn tier_entry(buffer: Buffer, key: &Key<PolicyKey>) -> u64 {
    match buffer.policy(key) {
        Some(v) => (u64::from(v.rule) << 32) | u64::from(v.policy),
        None => NO_TIER_ENTRY,
    }
}

/// A packet no rule allows in `dir`: passed as a would-be drop when the isolation of that direction
/// is in audit mode, else dropped as denied (`pending` at an endpoint whose pod is not known).
#[inline(always)]
fn refused(ep_flags: u32, dir: Direction) -> u64 {
    if ep_flags & endpoint_flags::audit(dir) != 0 {
        return reason_only(audited(dir)) | DECIDED;
    }
    if ep_flags & endpoint_flags::PENDING != 0 {
        return reason_only(Reason::DroppedPending) | DECIDED;
    }
    let denied = match dir {
        Direction::Ingress => Reason::DroppedIngressDenied,
        Direction::Egress => Reason::DroppedEgressDenied,
    };
    reason_only(denied) | DECIDED
}

/// The decision for a packet that the POLICY entry of `key` (whose value names `rule`) allows.
/// What kind of rule it was (for metrics) costs one more lookup, on new flows only: whether a rule
/// without ports also matches.
#[inline(always)]
fn allowed(buffer: Buffer, key: &mut Key<PolicyKey>, rule: PolicyValue) -> u64 {
    let any_identity = key.data.identity == identity::ANY;
    key.prefix_len = POLICY_PREFIX_ANY_PROTOCOL;
    let matched = match (buffer.policy(key).is_some(), any_identity) {
        (true, true) => PolicyMatch::All,
        (true, false) => PolicyMatch::L3,
        (false, _) => PolicyMatch::L3L4,
    };
    reason_only(Reason::AllowedPolicy) | ((matched as u64) << 8) | DECIDED | rule_bits(rule)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
