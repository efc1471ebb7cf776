//! The self-test's links, configured over rtnetlink in the network namespace of the calling thread:
//! a veth pair with its peer in another namespace, addresses, links up. (The agent's image is built
//! from scratch: there is no `ip` to run.)

use std::{ffi::CString, io, net::IpAddr, os::fd::RawFd};

use anyhow::{Context as _, bail};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressHeaderFlags, AddressMessage},
    link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// An rtnetlink socket of the namespace of the thread that opened it.
pub struct Links {
    socket: Socket,
    seq: u32,
}

impl Links {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> anyhow::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE).context("opening an rtnetlink socket")?;
        socket.bind_auto().context("binding the rtnetlink socket")?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .context("connecting the rtnetlink socket")?;
        Ok(Links { socket, seq: 0 })
    }

    /// Creates the veth pair `name` <-> `peer`, `peer` in the network namespace `peer_netns`.
    pub fn add_veth(&mut self, name: &str, peer: &str, peer_netns: RawFd) -> anyhow::Result<()> {
        let mut other = LinkMessage::default();
        other.attributes.push(LinkAttribute::IfName(peer.into()));
        other.attributes.push(LinkAttribute::NetNsFd(peer_netns));
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.into()));
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(other))),
        ]));
        self.request(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)
            .with_context(|| format!("creating the veth pair {name} <-> {peer}"))
    }

    /// Sets link `name` up.
    pub fn set_up(&mut self, name: &str) -> anyhow::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = ifindex(name)?;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(m), 0)
            .with_context(|| format!("setting {name} up"))
    }

    /// Adds `addr/prefix` to link `name` (IPv6 without duplicate address detection, so that it is
    /// usable at once).
    pub fn add_address(&mut self, name: &str, addr: IpAddr, prefix: u8) -> anyhow::Result<()> {
        let mut m = AddressMessage::default();
        m.header.family = match addr {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        m.header.prefix_len = prefix;
        m.header.index = ifindex(name)?;
        if addr.is_ipv6() {
            m.header.flags = AddressHeaderFlags::Nodad;
        }
        m.attributes.push(AddressAttribute::Local(addr));
        m.attributes.push(AddressAttribute::Address(addr));
        self.request(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .with_context(|| format!("adding {addr}/{prefix} to {name}"))
    }

    /// Deletes link `name` (a veth takes its peer with it).
    pub fn delete(&mut self, name: &str) -> anyhow::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = ifindex(name)?;
        self.request(RouteNetlinkMessage::DelLink(m), 0)
            .with_context(|| format!("deleting {name}"))
    }

    /// Sends `message` and waits for the kernel's acknowledgement.
    fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> anyhow::Result<()> {
        let mut req = NetlinkMessage::from(message);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        self.seq = self.seq.wrapping_add(1);
        req.header.sequence_number = self.seq;
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        loop {
            let (data, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < data.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| anyhow::anyhow!("decoding an rtnetlink answer: {e}"))?;
                if msg.header.sequence_number == self.seq
                    && let NetlinkPayload::Error(e) = msg.payload
                {
                    return match e.code {
                        None => Ok(()),
                        Some(code) => Err(io::Error::from_raw_os_error(-code.get()).into()),
                    };
                }
                let len = msg.header.length as usize;
                if len == 0 {
                    bail!("an empty rtnetlink message");
                }
                offset += len;
            }
        }
    }
}

/// The index of link `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c = CString::new(name)?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(
            anyhow::Error::new(io::Error::last_os_error()).context(format!("no link {name}"))
        );
    }
    Ok(i)
}
