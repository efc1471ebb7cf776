//! Wakes the agent on rtnetlink link and address notifications.
//!
//! The socket joins the link and address groups with `NETLINK_LISTEN_ALL_NSID`, so it also hears
//! address changes inside pod namespaces (every namespace that holds a veth peer has an nsid here).
//! The messages themselves are not decoded: any notification means "scan again", and the scan
//! reads the kernel's state whole. Lost notifications (a full receive buffer) also wake the agent.

use std::{io, sync::Arc, thread};

use netlink_sys::{Socket, protocols::NETLINK_ROUTE};
use tokio::sync::Notify;

/// The multicast groups that tell of new, changed or removed veths and addresses.
const GROUPS: [u32; 3] = [
    libc::RTNLGRP_LINK,
    libc::RTNLGRP_IPV4_IFADDR,
    libc::RTNLGRP_IPV6_IFADDR,
];

/// Receive buffer for bursts (a node starting many pods at once).
const RECV_BUFFER: usize = 4 << 20;

/// Subscribes to link and address notifications in the current network namespace and its peers'
/// and returns what the listener thread notifies on each burst. The thread lives as long as the
/// process: the agent never stops listening while it runs.
pub fn subscribe() -> io::Result<Arc<Notify>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    // Needs CAP_NET_BROADCAST. Without it only the node's own namespace is heard: new veths are
    // still seen at once, their peers' addresses within the periodic scan.
    if let Err(e) = socket.set_listen_all_namespaces(true) {
        tracing::warn!(error = %e, "no rtnetlink notifications from pod namespaces (CAP_NET_BROADCAST missing?): pod addresses are read by the periodic scan");
    }
    socket.set_rx_buf_sz(RECV_BUFFER)?;
    for group in GROUPS {
        socket.add_membership(group)?;
    }
    let notify = Arc::new(Notify::new());
    let wake = notify.clone();
    thread::Builder::new()
        .name("netlink-events".into())
        .spawn(move || listen(&socket, &wake))?;
    Ok(notify)
}

fn listen(socket: &Socket, wake: &Notify) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match socket.recv(&mut &mut buf[..], 0) {
            Ok(_) => wake.notify_one(),
            // ENOBUFS: notifications were lost; a scan reads everything again anyway.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => wake.notify_one(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::error!(error = %e, "rtnetlink notifications stopped; the periodic scan goes on");
                return;
            }
        }
    }
}
