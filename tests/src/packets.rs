//! Crafting Ethernet frames for `BPF_PROG_TEST_RUN`: IPv4 (with options and fragments), IPv6 (with
//! extension headers and fragments), TCP, UDP, SCTP, ICMP/ICMPv6, ARP, and truncation.
//!
//! Only what the classifier reads is made realistic: L4 checksums are left zero.

use std::net::IpAddr;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_ARP: u16 = 0x0806;

/// The transport part of a packet.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Sctp {
        sport: u16,
        dport: u16,
    },
    /// ICMP (IPv4) or ICMPv6 (IPv6): `kind` and `code`, the 4 bytes after the checksum, then a body.
    Icmp {
        kind: u8,
        code: u8,
        rest: [u8; 4],
        body: Vec<u8>,
    },
    /// Any protocol with a raw payload.
    Raw {
        protocol: u8,
        payload: Vec<u8>,
    },
}

impl L4 {
    /// ICMP/ICMPv6 echo request or reply with `id`.
    pub fn echo(v6: bool, request: bool, id: u16) -> Self {
        let kind = match (v6, request) {
            (false, true) => 8,
            (false, false) => 0,
            (true, true) => 128,
            (true, false) => 129,
        };
        let id = id.to_be_bytes();
        L4::Icmp {
            kind,
            code: 0,
            rest: [id[0], id[1], 0, 1],
            body: vec![0xab; 8],
        }
    }

    /// An ICMP error (e.g. destination unreachable 3/3, or ICMPv6 1/4) quoting `quoted` (an IP packet
    /// without its Ethernet header).
    pub fn icmp_error(kind: u8, code: u8, quoted: Vec<u8>) -> Self {
        L4::Icmp {
            kind,
            code,
            rest: [0; 4],
            body: quoted,
        }
    }

    fn protocol(&self, v6: bool) -> u8 {
        match self {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::Sctp { .. } => 132,
            L4::Icmp { .. } if v6 => 58,
            L4::Icmp { .. } => 1,
            L4::Raw { protocol, .. } => *protocol,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match self {
            L4::Tcp { sport, dport } => {
                let mut b = vec![0u8; 20];
                b[0..2].copy_from_slice(&sport.to_be_bytes());
                b[2..4].copy_from_slice(&dport.to_be_bytes());
                b[12] = 5 << 4; // data offset
                b[13] = 0x02; // SYN
                b[14..16].copy_from_slice(&64240u16.to_be_bytes());
                b
            }
            L4::Udp { sport, dport } => {
                let mut b = vec![0u8; 8];
                b[0..2].copy_from_slice(&sport.to_be_bytes());
                b[2..4].copy_from_slice(&dport.to_be_bytes());
                b[4..6].copy_from_slice(&8u16.to_be_bytes());
                b
            }
            L4::Sctp { sport, dport } => {
                let mut b = vec![0u8; 12];
                b[0..2].copy_from_slice(&sport.to_be_bytes());
                b[2..4].copy_from_slice(&dport.to_be_bytes());
                b[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes()); // verification tag
                b
            }
            L4::Icmp {
                kind,
                code,
                rest,
                body,
            } => {
                let mut b = vec![*kind, *code, 0, 0];
                b.extend_from_slice(rest);
                b.extend_from_slice(body);
                b
            }
            L4::Raw { payload, .. } => payload.clone(),
        }
    }
}

/// An IPv6 extension header to put between the fixed header and the transport header.
#[derive(Clone, Debug)]
pub enum Ext {
    HopByHop,
    DestOpts,
    Routing,
    /// Fragment header; `offset` in 8-byte units.
    Fragment {
        offset: u16,
        more: bool,
    },
}

impl Ext {
    fn number(&self) -> u8 {
        match self {
            Ext::HopByHop => 0,
            Ext::Routing => 43,
            Ext::Fragment { .. } => 44,
            Ext::DestOpts => 60,
        }
    }

    fn bytes(&self, next: u8, id: u32) -> Vec<u8> {
        match self {
            // 16 bytes (hdr ext len 1): a PadN option filling the rest, to exercise the length field.
            Ext::HopByHop | Ext::DestOpts => {
                let mut b = vec![next, 1, 1, 12];
                b.resize(16, 0);
                b
            }
            // Type 0 routing header, no segments left, one address.
            Ext::Routing => {
                let mut b = vec![next, 2, 0, 0];
                b.resize(24, 0);
                b
            }
            Ext::Fragment { offset, more } => {
                let v = (offset << 3) | u16::from(*more);
                let v = v.to_be_bytes();
                let mut b = vec![next, 0, v[0], v[1]];
                b.extend_from_slice(&id.to_be_bytes());
                b
            }
        }
    }
}

/// A frame under construction.
#[derive(Clone, Debug)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    /// IPv4 options (padded to a multiple of 4 bytes with zeros).
    pub ipv4_options: Vec<u8>,
    /// IPv4 fragment offset (8-byte units) and more-fragments flag.
    pub ipv4_frag: (u16, bool),
    /// IPv6 extension headers, in order.
    pub ipv6_ext: Vec<Ext>,
    /// Cut the frame to this many bytes after building it (lengths in headers stay as built).
    pub truncate: Option<usize>,
    /// Overrides the first byte of the IP header (version/IHL), for malformed headers.
    pub version_ihl: Option<u8>,
    /// IPv4 TTL or IPv6 hop limit (64 unless set).
    pub hop_limit: u8,
    /// Ethernet source MAC ([`POD_MAC`] unless set).
    pub src_mac: [u8; 6],
    /// IPv4 identification (low 16 bits) and IPv6 fragment identification.
    pub ip_id: u32,
}

impl Packet {
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        assert_eq!(src.is_ipv4(), dst.is_ipv4(), "mixed address families");
        Packet {
            src,
            dst,
            l4,
            ipv4_options: Vec::new(),
            ipv4_frag: (0, false),
            ipv6_ext: Vec::new(),
            truncate: None,
            version_ihl: None,
            hop_limit: 64,
            src_mac: POD_MAC,
            ip_id: 0x4242,
        }
    }

    pub fn ip_id(mut self, id: u32) -> Self {
        self.ip_id = id;
        self
    }

    pub fn hop_limit(mut self, hop_limit: u8) -> Self {
        self.hop_limit = hop_limit;
        self
    }

    pub fn src_mac(mut self, mac: [u8; 6]) -> Self {
        self.src_mac = mac;
        self
    }

    pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Self {
        Self::new(src, dst, L4::Tcp { sport, dport })
    }

    pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Self {
        Self::new(src, dst, L4::Udp { sport, dport })
    }

    pub fn sctp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Self {
        Self::new(src, dst, L4::Sctp { sport, dport })
    }

    /// ICMP (IPv4) or ICMPv6 (IPv6) of `kind` and code 0: the 4 bytes after the checksum, then `body`.
    pub fn icmp(src: IpAddr, dst: IpAddr, kind: u8, rest: [u8; 4], body: Vec<u8>) -> Self {
        let l4 = L4::Icmp {
            kind,
            code: 0,
            rest,
            body,
        };
        Self::new(src, dst, l4)
    }

    pub fn ipv4_options(mut self, options: &[u8]) -> Self {
        self.ipv4_options = options.to_vec();
        self
    }

    pub fn ipv4_fragment(mut self, offset: u16, more: bool) -> Self {
        self.ipv4_frag = (offset, more);
        self
    }

    pub fn ext(mut self, ext: Ext) -> Self {
        self.ipv6_ext.push(ext);
        self
    }

    pub fn truncate(mut self, len: usize) -> Self {
        self.truncate = Some(len);
        self
    }

    pub fn version_ihl(mut self, byte: u8) -> Self {
        self.version_ihl = Some(byte);
        self
    }

    /// The IP packet (no Ethernet header), untruncated.
    pub fn ip_bytes(&self) -> Vec<u8> {
        let payload = self.l4.bytes();
        let mut ip = match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let mut opts = self.ipv4_options.clone();
                while !opts.len().is_multiple_of(4) {
                    opts.push(0);
                }
                let hlen = 20 + opts.len();
                assert!(hlen <= 60, "IPv4 options too long");
                let mut h = vec![0u8; 20];
                h[0] = 0x40 | (hlen / 4) as u8;
                h[2..4].copy_from_slice(&((hlen + payload.len()) as u16).to_be_bytes());
                h[4..6].copy_from_slice(&(self.ip_id as u16).to_be_bytes());
                let (off, more) = self.ipv4_frag;
                let frag = (off & 0x1fff) | if more { 0x2000 } else { 0 };
                h[6..8].copy_from_slice(&frag.to_be_bytes());
                h[8] = self.hop_limit;
                h[9] = self.l4.protocol(false);
                h[12..16].copy_from_slice(&src.octets());
                h[16..20].copy_from_slice(&dst.octets());
                h.extend_from_slice(&opts);
                let sum = checksum(&h);
                h[10..12].copy_from_slice(&sum.to_be_bytes());
                h.extend_from_slice(&payload);
                h
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let proto = self.l4.protocol(true);
                let mut exts = Vec::new();
                for (i, ext) in self.ipv6_ext.iter().enumerate() {
                    let next = self.ipv6_ext.get(i + 1).map_or(proto, Ext::number);
                    exts.extend_from_slice(&ext.bytes(next, self.ip_id));
                }
                let first = self.ipv6_ext.first().map_or(proto, Ext::number);
                let mut h = vec![0u8; 40];
                h[0] = 0x60;
                h[4..6].copy_from_slice(&((exts.len() + payload.len()) as u16).to_be_bytes());
                h[6] = first;
                h[7] = self.hop_limit;
                h[8..24].copy_from_slice(&src.octets());
                h[24..40].copy_from_slice(&dst.octets());
                h.extend_from_slice(&exts);
                h.extend_from_slice(&payload);
                h
            }
            _ => unreachable!(),
        };
        if let Some(b) = self.version_ihl {
            ip[0] = b;
        }
        ip
    }

    /// The Ethernet frame.
    pub fn build(&self) -> Vec<u8> {
        let ethertype = if self.src.is_ipv4() {
            ETH_P_IP
        } else {
            ETH_P_IPV6
        };
        let mut frame = ethernet_from(self.src_mac, ethertype);
        frame.extend_from_slice(&self.ip_bytes());
        if let Some(len) = self.truncate {
            frame.truncate(len);
        }
        frame
    }
}

/// The MAC of the crafted frames' sender (the local pod in the classifier tests).
pub const POD_MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0x2a, 0x00, 0x05];
/// The gateway's MAC, the crafted frames' destination.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0x2a, 0x00, 0x01];

/// Ethernet header from [`POD_MAC`] to the gateway MAC.
pub fn ethernet(ethertype: u16) -> Vec<u8> {
    ethernet_from(POD_MAC, ethertype)
}

/// Ethernet header from `src` to the gateway MAC.
pub fn ethernet_from(src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = GATEWAY_MAC.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An ARP request "who has `target`, tell `sender`", from [`POD_MAC`].
pub fn arp_request(sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    arp(POD_MAC, POD_MAC, sender, target)
}

/// An ARP request in a frame from `frame_src`, whose sender hardware address is `sender_mac`.
pub fn arp(frame_src: [u8; 6], sender_mac: [u8; 6], sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut f = ethernet_from(frame_src, ETH_P_ARP);
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&sender);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f
}

/// A neighbour solicitation (135) or advertisement (136) about `target`, with hop limit 255 and
/// the given link-layer address option (type 1 source, 2 target) when `lladdr` is set.
pub fn neighbour(
    src: IpAddr,
    dst: IpAddr,
    kind: u8,
    target: std::net::Ipv6Addr,
    lladdr: Option<[u8; 6]>,
) -> Packet {
    let mut body = target.octets().to_vec();
    if let Some(mac) = lladdr {
        body.push(if kind == 135 { 1 } else { 2 });
        body.push(1);
        body.extend_from_slice(&mac);
    }
    let flags = if kind == 136 { 0x60 } else { 0 }; // solicited, override
    Packet::icmp(src, dst, kind, [flags, 0, 0, 0], body).hop_limit(255)
}

/// The Internet checksum.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
