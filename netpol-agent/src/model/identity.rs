//! Security identities: the numbers the datapath uses for peers.
//!
//! A pod identity stands for every pod with the same namespace, labels and named ports (everything a
//! policy can select a peer by or resolve a named port against); a CIDR identity stands for one
//! ipBlock prefix. Numbers are derived from the content alone, so an agent that restarts and computes
//! the same state gives the same numbers to the maps it updates in place.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use netpol_common::{IpKey, identity};

use crate::model::{Labels, NamedPort, Pod};

/// FNV-1a, 32 bits. Written out rather than taken from `std::hash` because the numbers must not
/// change between builds or Rust versions.
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for &b in bytes {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// What pods with one identity have in common.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodIdentityKey {
    pub namespace: String,
    pub labels: Arc<Labels>,
    /// Sorted, without duplicates (a vector: a set's node would take 11 slots for one or two).
    pub ports: Vec<NamedPort>,
}

impl PodIdentityKey {
    /// The identity key of a pod.
    pub fn of(pod: &Pod) -> Self {
        PodIdentityKey {
            namespace: pod.key.namespace.clone(),
            labels: pod.labels.clone(),
            ports: {
                let mut ports = pod.ports.clone();
                ports.sort();
                ports.dedup();
                ports
            },
        }
    }

    /// Length-prefixed fields, so that no two keys encode alike.
    fn encode(&self) -> Vec<u8> {
        let mut out = b"pod\0".to_vec();
        put_str(&mut out, &self.namespace);
        put_len(&mut out, self.labels.len());
        for (k, v) in self.labels.iter() {
            put_str(&mut out, k);
            put_str(&mut out, v);
        }
        put_len(&mut out, self.ports.len());
        for p in &self.ports {
            put_str(&mut out, &p.name);
            out.push(p.protocol.number());
            out.extend_from_slice(&p.port.to_be_bytes());
        }
        out
    }
}

/// An address prefix in [`IpKey`] form: IPv4 prefixes are IPv4-mapped with 96 added to the length.
/// Host bits are always zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    addr: IpKey,
    len: u32,
}

/// The first 96 bits of an IPv4-mapped address.
const V4_MAPPED: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

impl Prefix {
    /// The prefix of length `len` (0..=128, in [`IpKey`] bits) that contains `addr`.
    pub fn new(addr: IpKey, len: u32) -> Self {
        assert!(len <= 128, "prefix length {len} > 128");
        let mut masked = addr;
        for (i, byte) in masked.addr.iter_mut().enumerate() {
            let bits_before = 8 * i as u32;
            if len <= bits_before {
                *byte = 0;
            } else if len < bits_before + 8 {
                *byte &= 0xffu8 << (8 - (len - bits_before));
            }
        }
        Prefix { addr: masked, len }
    }

    /// The prefix of a parsed network (host bits dropped).
    pub fn from_network(net: ipnetwork::IpNetwork) -> Self {
        match net {
            ipnetwork::IpNetwork::V4(n) => Prefix::new(
                IpKey::from_v4(n.ip().octets()),
                netpol_common::V4_MAPPED_PREFIX + u32::from(n.prefix()),
            ),
            ipnetwork::IpNetwork::V6(n) => Prefix::new(
                IpKey {
                    addr: n.ip().octets(),
                },
                u32::from(n.prefix()),
            ),
        }
    }

    /// The host prefix of one address.
    pub fn host(addr: IpKey) -> Self {
        Prefix::new(addr, 128)
    }

    /// Whether the prefix is one address (`/32` of IPv4, `/128` of IPv6).
    pub fn is_host(&self) -> bool {
        self.prefix_len() == 128
    }

    /// The IPv4-mapped space `::ffff:0:0/96`, which is IPv4's `0.0.0.0/0`.
    pub fn all_v4() -> Self {
        let mut addr = [0u8; 16];
        addr[..12].copy_from_slice(&V4_MAPPED);
        Prefix::new(IpKey { addr }, netpol_common::V4_MAPPED_PREFIX)
    }

    /// The network address.
    pub fn addr(&self) -> IpKey {
        self.addr
    }

    /// The length in [`IpKey`] bits.
    pub fn prefix_len(&self) -> u32 {
        self.len
    }

    /// Whether this prefix lies in the IPv4-mapped space (is an IPv4 prefix).
    pub fn is_v4(&self) -> bool {
        Prefix::all_v4().contains(self)
    }

    /// Whether every address of `other` is in `self`.
    pub fn contains(&self, other: &Prefix) -> bool {
        other.len >= self.len && Prefix::new(other.addr, self.len).addr == self.addr
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = b"cidr".to_vec();
        out.extend_from_slice(&self.addr.addr);
        out.push(self.len as u8);
        out
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = self.addr.addr;
        if self.is_v4() {
            let v4 = std::net::Ipv4Addr::new(a[12], a[13], a[14], a[15]);
            write!(f, "{v4}/{}", self.len - netpol_common::V4_MAPPED_PREFIX)
        } else {
            write!(f, "{}/{}", std::net::Ipv6Addr::from(a), self.len)
        }
    }
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    out.extend_from_slice(&(len as u32).to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// The identities of one compilation. The pod part is shared with the compiler's pod stage, which
/// keeps it between compilations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identities {
    /// Keys shared with the compiler's pod stage, which holds one of each.
    pub pods: Arc<BTreeMap<Arc<PodIdentityKey>, u32>>,
    pub cidrs: BTreeMap<Prefix, u32>,
}

impl Identities {
    /// Numbers every key: its hash mapped into the kind's range, probing upwards (wrapping within the
    /// range) on collision. Keys are taken in sorted order, so the result depends on the set alone.
    pub fn allocate(
        pods: impl IntoIterator<Item = PodIdentityKey>,
        cidrs: impl IntoIterator<Item = Prefix>,
    ) -> Self {
        Identities {
            pods: Arc::new(number_pods(pods.into_iter().map(Arc::new))),
            cidrs: number_cidrs(cidrs.into_iter().collect()),
        }
    }
}

/// The numbers of a set of pod identity keys ([`Identities::allocate`]); duplicates count once.
pub fn number_pods(
    keys: impl IntoIterator<Item = Arc<PodIdentityKey>>,
) -> BTreeMap<Arc<PodIdentityKey>, u32> {
    let range = identity::FIRST_POD..=identity::FIRST_CIDR - 1;
    number(keys.into_iter().collect(), range, |k| k.encode())
}

/// The numbers of a set of prefixes ([`Identities::allocate`]).
pub fn number_cidrs(prefixes: BTreeSet<Prefix>) -> BTreeMap<Prefix, u32> {
    number(prefixes, identity::FIRST_CIDR..=u32::MAX, Prefix::encode)
}

fn number<K: Ord>(
    keys: BTreeSet<K>,
    range: std::ops::RangeInclusive<u32>,
    encode: impl Fn(&K) -> Vec<u8>,
) -> BTreeMap<K, u32> {
    let (start, end) = (*range.start(), *range.end());
    // `end - start + 1` overflows for a full u32 range; no range here starts at 0.
    let size = u64::from(end - start) + 1;
    assert!(keys.len() as u64 <= size, "more identities than numbers");
    let mut used = BTreeSet::new();
    let mut out = BTreeMap::new();
    for key in keys {
        let mut offset = u64::from(fnv1a32(&encode(&key))) % size;
        while !used.insert(offset) {
            offset = (offset + 1) % size;
        }
        out.insert(key, start + offset as u32);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn key(ns: &str, labels: &[(&str, &str)]) -> PodIdentityKey {
        PodIdentityKey {
            namespace: ns.into(),
            labels: Arc::new(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ports: Vec::new(),
        }
    }

    fn v4(s: &str) -> Prefix {
        Prefix::from_network(s.parse().unwrap())
    }

    #[test]
    fn fnv_reference_values() {
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn deterministic_and_order_independent() {
        let a = vec![key("a", &[("x", "1")]), key("b", &[]), key("a", &[])];
        let mut b = a.clone();
        b.reverse();
        let cidrs = vec![v4("10.0.0.0/8"), v4("10.1.0.0/16")];
        let ia = Identities::allocate(a, cidrs.clone());
        let ib = Identities::allocate(b, cidrs.into_iter().rev());
        assert_eq!(ia, ib);
        // Pinned so that an accidental change of the encoding, which would renumber a running
        // datapath, fails here.
        // (Values computed independently of this code.)
        assert_eq!(ia.pods[&key("b", &[])], 382_938_549);
        assert_eq!(ia.cidrs[&v4("10.0.0.0/8")], 3_746_459_805);
        for id in ia.pods.values() {
            assert!((identity::FIRST_POD..identity::FIRST_CIDR).contains(id));
        }
        for id in ia.cidrs.values() {
            assert!(*id >= identity::FIRST_CIDR);
        }
    }

    #[test]
    fn identity_distinguishes_namespace_labels_and_ports() {
        let base = key("a", &[("x", "1")]);
        let other_ns = key("b", &[("x", "1")]);
        let other_label = key("a", &[("x", "2")]);
        let mut with_port = base.clone();
        with_port.ports.push(NamedPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
        });
        let ids = Identities::allocate(
            [
                base.clone(),
                other_ns.clone(),
                other_label.clone(),
                with_port.clone(),
            ],
            [],
        );
        let numbers: BTreeSet<_> = ids.pods.values().collect();
        assert_eq!(numbers.len(), 4);
        // An encoding without length prefixes would confuse these two.
        assert_ne!(
            key("a", &[("bc", "")]).encode(),
            key("a", &[("b", "c")]).encode()
        );
    }

    #[test]
    fn collisions_probe_upwards() {
        let keys: BTreeSet<u8> = [1, 2, 3].into();
        let out = number(keys, 100..=200, |_| vec![0]);
        let base = 100 + fnv1a32(&[0]) % 101;
        assert!(base < 198);
        assert_eq!(
            out.values().copied().collect::<Vec<_>>(),
            vec![base, base + 1, base + 2]
        );
        // Wraps inside the range.
        let keys: BTreeSet<u8> = [1, 2].into();
        let out = number(keys, 10..=10 + 4, |_| vec![0]);
        let base = 10 + fnv1a32(&[0]) % 5;
        assert_eq!(out[&1], base);
        assert_eq!(out[&2], if base == 14 { 10 } else { base + 1 });
        let all = number([1u8].into(), identity::FIRST_CIDR..=u32::MAX, |_| vec![0]);
        assert!(all[&1] >= identity::FIRST_CIDR);
    }

    #[test]
    fn prefixes() {
        let p = v4("10.1.2.3/16");
        assert_eq!(p.prefix_len(), 112);
        assert_eq!(p.to_string(), "10.1.0.0/16");
        assert!(p.is_v4());
        assert!(v4("10.0.0.0/8").contains(&p));
        assert!(!p.contains(&v4("10.0.0.0/8")));
        assert!(!v4("11.0.0.0/8").contains(&p));
        assert!(p.contains(&p));
        let v6 = Prefix::from_network("fd00::1/64".parse().unwrap());
        assert_eq!(v6.to_string(), "fd00::/64");
        assert!(!v6.is_v4());
        let all6 = Prefix::from_network("::/0".parse().unwrap());
        assert!(all6.contains(&p), "IPv4-mapped space is inside ::/0");
        assert_eq!(v4("0.0.0.0/0"), Prefix::all_v4());
        assert_eq!(
            Prefix::new(IpKey { addr: [0xff; 16] }, 3).addr().addr[0],
            0xe0
        );
    }
}
