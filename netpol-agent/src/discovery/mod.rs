//! Finds the local pods' host-side veths from the kernel itself, over rtnetlink.
//!
//! A pod veth is a `veth` whose peer lives in another network namespace. Its peer's addresses are read
//! with an `RTM_GETADDR` dump targeted at the peer's namespace (`IFA_TARGET_NETNSID`, Linux 4.20+),
//! so the agent never has to enter pod namespaces or know where containerd mounted them. The
//! agent matches those addresses with the pods the cluster state puts on this node; a veth that
//! matches no local pod is pending: it gets the programs at once and only the node may talk to it.
//!
//! [`events`] wakes the agent on every link and address change, so a new veth is seen within
//! milliseconds; the periodic scan stays as a safety net for lost notifications.

pub mod endpoints;
pub mod events;

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::{IpAddr, Ipv6Addr},
};

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use thiserror::Error;

use crate::compiler::EndpointLink;

/// Errors of discovery.
#[derive(Debug, Error)]
pub enum DiscoveryError {
    #[error("rtnetlink socket")]
    Socket(#[source] io::Error),
    #[error("rtnetlink {what} dump")]
    Dump {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("decoding an rtnetlink {what} message: {message}")]
    Decode { what: &'static str, message: String },
}

/// A veth in the agent's namespace whose peer is in another namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodVeth {
    pub ifindex: u32,
    pub name: String,
    /// The peer's namespace, as an nsid of the agent's namespace.
    pub peer_netnsid: i32,
    pub peer_ifindex: u32,
    /// Addresses on the peer (the pod's `eth0`), link-local ones excluded.
    pub peer_addrs: Vec<IpAddr>,
    /// What the peer really is at layer 2: the datapath holds the pod to it.
    pub peer_link: PeerLink,
    /// A port of a bridge (`cni0`): the CNI bridge plugin makes every pod veth one, so such a veth
    /// is policed from the moment it is seen, before its pod is known.
    pub bridged: bool,
    /// The networks of the bridge's own addresses (`10.42.0.0/24` for `cni0` at `10.42.0.1/24`):
    /// the only addresses a pod behind it may have.
    pub bridge_networks: Vec<ipnetwork::IpNetwork>,
    /// The bridge's ifindex.
    pub master: Option<u32>,
}

/// The link identity of a veth's peer (the pod's interface).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerLink {
    /// Its MAC address, when the kernel reported one.
    pub mac: Option<[u8; 6]>,
    /// Its IPv6 link-local address, if it has one.
    pub link_local: Option<Ipv6Addr>,
}

/// What discovery learns about a veth's peer, cached while the veth lives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Peer {
    addrs: Vec<IpAddr>,
    link: PeerLink,
}

impl Peer {
    /// Whether CNI is done with the peer, so it can be cached: it has its addresses, its MAC, and,
    /// with IPv6, its link-local address (configured once the link has carrier).
    fn is_complete(&self) -> bool {
        let v6 = self.addrs.iter().any(IpAddr::is_ipv6);
        !self.addrs.is_empty() && self.link.mac.is_some() && (!v6 || self.link.link_local.is_some())
    }
}

/// A device pod traffic can leave the node by: Flannel's VXLAN (`flannel.1`, `flannel-v6.1`) or
/// WireGuard (`flannel-wg`) device, or an uplink (`eth0`, which carries it directly with Flannel's
/// `host-gw` backend). `tunnel_egress` there decides Service connections whose verdict waited for
/// kube-proxy's DNAT to pick a backend on another node, whichever backend Flannel runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tunnel {
    pub ifindex: u32,
    pub name: String,
}

/// What the node looks like now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    pub veths: Vec<PodVeth>,
    /// The devices pod traffic can leave by, besides veths ([`NodeView::exits`] adds those).
    pub tunnels: Vec<Tunnel>,
    /// The node's own addresses (every interface of the agent's namespace): traffic from them to a
    /// local pod is the node's (kubelet probes) and always allowed.
    pub host_addrs: Vec<IpAddr>,
}

impl NodeView {
    /// Every exit device: the tunnels and uplinks, and veths whose peer is in another namespace but
    /// that are neither bridge ports nor endpoints (the simulated nodes' underlay, say). `endpoint`
    /// tells which veths carry the pods' own programs.
    pub fn exits(&self, endpoint: impl Fn(u32) -> bool) -> Vec<Tunnel> {
        let veths = self
            .veths
            .iter()
            .filter(|v| !v.bridged && !endpoint(v.ifindex))
            .map(|v| Tunnel {
                ifindex: v.ifindex,
                name: v.name.clone(),
            });
        self.tunnels.iter().cloned().chain(veths).collect()
    }

    /// The link identity of every pod veth's peer, by host-side ifindex (the endpoint id). A peer
    /// whose MAC the kernel did not report is left out: its endpoint then fails closed.
    pub fn endpoint_links(&self) -> BTreeMap<u32, EndpointLink> {
        self.veths
            .iter()
            .filter_map(|v| {
                let link = EndpointLink {
                    mac: v.peer_link.mac?,
                    link_local: v.peer_link.link_local,
                };
                Some((v.ifindex, link))
            })
            .collect()
    }
}

/// An rtnetlink client with a cache of peer addresses.
pub struct Discovery {
    socket: Socket,
    seq: u32,
    /// Peers by (ifindex, nsid, peer ifindex): a pod's addresses and MAC do not change while its
    /// veth lives, so only new veths cost a dump. Peers without addresses are not cached (CNI may
    /// not have configured them yet).
    peer_cache: HashMap<(u32, i32, u32), Peer>,
}

impl Discovery {
    /// Opens an rtnetlink socket in the current network namespace, with strict checking on (needed
    /// for the kernel to honour `IFA_TARGET_NETNSID` and the ifindex filter of address dumps).
    pub fn new() -> Result<Self, DiscoveryError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(DiscoveryError::Socket)?;
        socket.bind_auto().map_err(DiscoveryError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(DiscoveryError::Socket)?;
        socket
            .set_netlink_get_strict_chk(true)
            .map_err(DiscoveryError::Socket)?;
        Ok(Discovery {
            socket,
            seq: 0,
            peer_cache: HashMap::new(),
        })
    }

    /// Reads the pod veths and the node's addresses.
    pub fn scan(&mut self) -> Result<NodeView, DiscoveryError> {
        let links = self.dump("link", RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
        let mut veths = Vec::new();
        let mut tunnels = Vec::new();
        for msg in links {
            let RouteNetlinkMessage::NewLink(link) = msg else {
                continue;
            };
            if let Some(v) = pod_veth_of(&link) {
                veths.push(v);
            } else if let Some(t) = tunnel_of(&link) {
                tunnels.push(t);
            }
        }
        let mut live = HashMap::new();
        for v in &mut veths {
            let key = (v.ifindex, v.peer_netnsid, v.peer_ifindex);
            let peer = match self.peer_cache.get(&key) {
                Some(p) => p.clone(),
                None => self.peer(v.peer_netnsid, v.peer_ifindex)?,
            };
            if peer.is_complete() {
                live.insert(key, peer.clone());
            }
            v.peer_addrs = peer.addrs;
            v.peer_link = peer.link;
        }
        self.peer_cache = live;
        let host = self.address_records(None, None)?;
        for v in &mut veths {
            v.bridge_networks = host
                .iter()
                .filter(|r| Some(r.ifindex) == v.master && !is_link_local(&r.network.ip()))
                .map(|r| r.network)
                .collect();
        }
        let host_addrs = without_link_local(host.iter().map(|r| r.network.ip()).collect());
        Ok(NodeView {
            veths,
            tunnels,
            host_addrs,
        })
    }

    /// The addresses and link identity of interface `ifindex` in the namespace `netnsid`.
    fn peer(&mut self, netnsid: i32, ifindex: u32) -> Result<Peer, DiscoveryError> {
        let all = self.addresses(Some(netnsid), Some(ifindex))?;
        let link_local = all.iter().find_map(|a| match a {
            IpAddr::V6(v6) if is_link_local(a) => Some(*v6),
            _ => None,
        });
        Ok(Peer {
            addrs: without_link_local(all),
            link: PeerLink {
                mac: self.mac(netnsid, ifindex)?,
                link_local,
            },
        })
    }

    /// The MAC address of interface `ifindex` in the namespace `netnsid`: a link dump targeted at
    /// that namespace (`IFLA_TARGET_NETNSID`), which holds a pod's `lo` and `eth0`.
    fn mac(&mut self, netnsid: i32, ifindex: u32) -> Result<Option<[u8; 6]>, DiscoveryError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfNetnsId(netnsid));
        let links = self.dump("peer link", RouteNetlinkMessage::GetLink(msg))?;
        Ok(links.iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) if l.header.index == ifindex => {
                l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Address(mac) => mac.as_slice().try_into().ok(),
                    _ => None,
                })
            }
            _ => None,
        }))
    }

    /// Addresses in the namespace `netnsid` (or our own), of one interface (or all).
    fn addresses(
        &mut self,
        netnsid: Option<i32>,
        ifindex: Option<u32>,
    ) -> Result<Vec<IpAddr>, DiscoveryError> {
        let mut addrs: Vec<IpAddr> = self
            .address_records(netnsid, ifindex)?
            .into_iter()
            .map(|r| r.network.ip())
            .collect();
        addrs.sort();
        addrs.dedup();
        Ok(addrs)
    }

    /// The addresses (with their prefix and interface) in the namespace `netnsid` (or our own),
    /// of one interface (or all).
    fn address_records(
        &mut self,
        netnsid: Option<i32>,
        ifindex: Option<u32>,
    ) -> Result<Vec<AddressRecord>, DiscoveryError> {
        let mut msg = AddressMessage::default();
        if let Some(index) = ifindex {
            msg.header.index = index;
        }
        if let Some(id) = netnsid {
            msg.attributes.push(AddressAttribute::TargetNetNsId(id));
        }
        let replies = self.dump("address", RouteNetlinkMessage::GetAddress(msg))?;
        let mut records = Vec::new();
        for reply in replies {
            let RouteNetlinkMessage::NewAddress(a) = reply else {
                continue;
            };
            if ifindex.is_some_and(|i| a.header.index != i) {
                continue;
            }
            for attr in &a.attributes {
                if let AddressAttribute::Address(ip) = attr
                    && let Ok(network) = ipnetwork::IpNetwork::new(*ip, a.header.prefix_len)
                {
                    records.push(AddressRecord {
                        ifindex: a.header.index,
                        network,
                    });
                }
            }
        }
        Ok(records)
    }

    fn dump(
        &mut self,
        what: &'static str,
        message: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, DiscoveryError> {
        let mut req = NetlinkMessage::from(message);
        req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        self.seq = self.seq.wrapping_add(1);
        req.header.sequence_number = self.seq;
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        let io_err = |source| DiscoveryError::Dump { what, source };
        self.socket.send(&buf, 0).map_err(io_err)?;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full().map_err(io_err)?;
            let mut offset = 0;
            while offset < data.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| DiscoveryError::Decode {
                        what,
                        message: e.to_string(),
                    })?;
                let len = msg.header.length as usize;
                if msg.header.sequence_number == self.seq {
                    match msg.payload {
                        NetlinkPayload::Done(_) => return Ok(out),
                        NetlinkPayload::Error(e) => {
                            if let Some(code) = e.code {
                                return Err(io_err(io::Error::from_raw_os_error(-code.get())));
                            }
                        }
                        NetlinkPayload::InnerMessage(m) => out.push(m),
                        _ => {}
                    }
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }
}

/// One address of an interface.
struct AddressRecord {
    ifindex: u32,
    /// The address with its prefix length.
    network: ipnetwork::IpNetwork,
}

/// Link-local addresses are not pod or node identities.
fn without_link_local(mut addrs: Vec<IpAddr>) -> Vec<IpAddr> {
    addrs.retain(|a| !is_link_local(a));
    addrs
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// The attributes of a link message that discovery looks at.
struct LinkAttrs<'a> {
    name: Option<&'a str>,
    kind: Option<&'a InfoKind>,
    /// The peer's namespace (veths) as an nsid of ours.
    netnsid: Option<i32>,
    /// `IFLA_LINK`: the peer's ifindex for a veth.
    peer: Option<u32>,
    /// `IFLA_MASTER`: the bridge the link is a port of.
    master: Option<u32>,
}

impl<'a> LinkAttrs<'a> {
    fn of(link: &'a LinkMessage) -> Self {
        let mut a = LinkAttrs {
            name: None,
            kind: None,
            netnsid: None,
            peer: None,
            master: None,
        };
        for attr in &link.attributes {
            match attr {
                LinkAttribute::IfName(n) => a.name = Some(n),
                LinkAttribute::LinkInfo(infos) => {
                    a.kind = infos.iter().find_map(|i| match i {
                        LinkInfo::Kind(k) => Some(k),
                        _ => None,
                    });
                }
                LinkAttribute::LinkNetNsId(id) => a.netnsid = Some(*id),
                LinkAttribute::Link(index) => a.peer = Some(*index),
                LinkAttribute::Controller(index) => a.master = Some(*index),
                _ => {}
            }
        }
        a
    }
}

/// The exit device a link message describes, if it is one: not the loopback, not a bridge, not a
/// bridge's port (pod veths, whose programs are the pods' own).
fn tunnel_of(link: &LinkMessage) -> Option<Tunnel> {
    let a = LinkAttrs::of(link);
    let loopback = link
        .header
        .flags
        .contains(netlink_packet_route::link::LinkFlags::Loopback);
    let bridge = matches!(a.kind, Some(InfoKind::Bridge));
    if loopback || bridge || a.master.is_some() {
        return None;
    }
    Some(Tunnel {
        ifindex: link.header.index,
        name: a.name?.to_owned(),
    })
}

/// The veth description of a link message, when it is a veth with its peer in another namespace.
fn pod_veth_of(link: &LinkMessage) -> Option<PodVeth> {
    let a = LinkAttrs::of(link);
    if !matches!(a.kind, Some(InfoKind::Veth)) {
        return None;
    }
    Some(PodVeth {
        ifindex: link.header.index,
        name: a.name?.to_owned(),
        peer_netnsid: a.netnsid?,
        peer_ifindex: a.peer?,
        peer_addrs: Vec::new(),
        peer_link: PeerLink::default(),
        bridged: a.master.is_some(),
        master: a.master,
        bridge_networks: Vec::new(),
    })
}
