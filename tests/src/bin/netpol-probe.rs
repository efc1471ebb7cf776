//! Tiny connectivity probe used by the end-to-end harness.
//!
//! `netpol-probe serve --ports 80,81 [--name NAME]`
//!   binds TCP and UDP on `[::]` (dual-stack, IPV6_V6ONLY off) for every port, prints `READY`
//!   on stdout once all sockets are bound, then serves forever: TCP accepts, writes one byte and
//!   closes; UDP echoes every datagram. With `--name`, the server says who answered, where and
//!   whom it saw: TCP writes `NAME at LOCAL from PEER` (LOCAL the server's `addr:port` of the
//!   connection, PEER the client's as the server sees it; IPv4-mapped addresses shown as IPv4)
//!   instead of one byte, and UDP echoes the datagram followed by ` NAME at :PORT from PEER`.
//!
//! `netpol-probe flood --count N [--sport P] [--size B] [--burst K] udp/ADDR/PORT`
//!   sends N UDP datagrams of B payload bytes (default 16) from source port P (default: any) to the
//!   target, in bursts of K (default 64) with a short pause between bursts so that no queue on the
//!   way overflows; prints `{"sent": N, "millis": T}` (datagrams the kernel accepted).
//!
//! `netpol-probe ticker --every-ms 10 --for-ms 3000 udp/ADDR/PORT`
//!   a pod that talks from its first instant: sends one UDP datagram every interval for the
//!   duration, whatever happens (send errors are counted, not fatal); prints
//!   `{"sent": N, "failed": F, "start_ns": T}` (T: `CLOCK_MONOTONIC` when it started).
//!
//! `netpol-probe count --port P --for-ms N`
//!   binds UDP port P (dual-stack), prints `READY`, counts datagrams for N ms, then prints
//!   `{"received": N, "first_ns": T|null, "from": [ADDR...]}` (T: `CLOCK_MONOTONIC` of the first).
//!
//! `netpol-probe raw --dev IFACE HEXFRAME...`
//!   sends each hex-encoded Ethernet frame once on IFACE (an `AF_PACKET` socket): what a pod with
//!   `CAP_NET_RAW` can do; the hostile-pod tests use it.
//!
//! `netpol-probe probe [--timeout-ms 1000] TARGET...`
//!   TARGET is `tcp/ADDR/PORT` or `udp/ADDR/PORT` (ADDR may be IPv6 without brackets). With no
//!   TARGET, a JSON array of `{"addr": "...", "port": 80, "proto": "tcp"}` is read from stdin.
//!   All targets are probed concurrently; a JSON array of results (same order) is printed:
//!   `{"addr", "port", "proto", "ok", "detail", "millis", "reply"}`. `ok` means a TCP connection
//!   that delivered at least one byte, or a UDP echo of the probe's nonce; `reply` is what a
//!   `--name` server said (the TCP stream up to its close or the timeout, or what followed the
//!   nonce in the UDP echo), trimmed: empty for a server without `--name`.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Target {
    addr: IpAddr,
    port: u16,
    proto: String,
}

#[derive(Debug, Serialize)]
struct ProbeResult {
    addr: IpAddr,
    port: u16,
    proto: String,
    ok: bool,
    detail: String,
    millis: u128,
    reply: String,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("probe") => probe(&args[1..]),
        Some("flood") => flood(&args[1..]),
        Some("raw") => raw(&args[1..]),
        Some("ticker") => ticker(&args[1..]),
        Some("count") => count(&args[1..]),
        _ => Err(anyhow::anyhow!(
            "usage: netpol-probe serve --ports 80,81 | probe [--timeout-ms N] proto/addr/port..."
        )),
    };
    if let Err(e) = res {
        eprintln!("netpol-probe: {e:#}");
        std::process::exit(2);
    }
}

fn dual_stack_socket(ty: Type, proto: Protocol, port: u16) -> Result<Socket> {
    let s = Socket::new(Domain::IPV6, ty, Some(proto))?;
    s.set_only_v6(false)?;
    s.set_reuse_address(true)?;
    let addr = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    s.bind(&addr.into())
        .with_context(|| format!("bind {addr} ({proto:?})"))?;
    Ok(s)
}

fn serve(args: &[String]) -> Result<()> {
    let mut ports: Vec<u16> = vec![80, 81];
    let mut name: Option<String> = None;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--name" => {
                name = Some(args.get(i + 1).context("--name needs a value")?.clone());
                i += 2;
            }
            "--ports" => {
                let v = args.get(i + 1).context("--ports needs a value")?;
                ports = v
                    .split(',')
                    .map(|p| p.trim().parse::<u16>())
                    .collect::<Result<_, _>>()
                    .context("bad --ports")?;
                i += 2;
            }
            other => bail!("unknown serve argument {other}"),
        }
    }
    let mut handles = Vec::new();
    for &port in &ports {
        let tcp = dual_stack_socket(Type::STREAM, Protocol::TCP, port)?;
        tcp.listen(128)?;
        let tcp: TcpListener = tcp.into();
        let udp: UdpSocket = dual_stack_socket(Type::DGRAM, Protocol::UDP, port)?.into();
        let (n1, n2) = (name.clone(), name.clone());
        handles.push(std::thread::spawn(move || serve_tcp(tcp, n1)));
        handles.push(std::thread::spawn(move || serve_udp(udp, n2)));
    }
    println!("READY");
    std::io::stdout().flush()?;
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// The peer as the server sees it, IPv4-mapped IPv6 shown as IPv4.
fn peer_text(peer: SocketAddr) -> String {
    match peer {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()).to_string(),
            None => peer.to_string(),
        },
        SocketAddr::V4(_) => peer.to_string(),
    }
}

fn serve_tcp(l: TcpListener, name: Option<String>) {
    for mut c in l.incoming().flatten() {
        let _ = c.set_write_timeout(Some(Duration::from_secs(1)));
        match (&name, c.local_addr(), c.peer_addr()) {
            (Some(n), Ok(local), Ok(peer)) => {
                let msg = format!("{n} at {} from {}", peer_text(local), peer_text(peer));
                let _ = c.write_all(msg.as_bytes());
            }
            _ => {
                let _ = c.write_all(b"x");
            }
        }
    }
}

/// How the probe's UDP nonces start.
const PROBE_NONCE_PREFIX: &[u8] = b"netpol-probe";

fn serve_udp(s: UdpSocket, name: Option<String>) {
    let port = s.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut buf = [0u8; 2048];
    loop {
        if let Ok((n, peer)) = s.recv_from(&mut buf) {
            let mut reply = buf[..n].to_vec();
            // Only the probe's own datagrams are told who answered: other senders (flow-accounting
            // tests) get a plain echo, so a reply is exactly as long as its request.
            if let Some(name) = name
                .as_ref()
                .filter(|_| reply.starts_with(PROBE_NONCE_PREFIX))
            {
                reply.extend_from_slice(
                    format!(" {name} at :{port} from {}", peer_text(peer)).as_bytes(),
                );
            }
            let _ = s.send_to(&reply, peer);
        }
    }
}

fn flood(args: &[String]) -> Result<()> {
    let (mut count, mut sport, mut size, mut burst) = (1u64, 0u16, 16usize, 64u64);
    let mut target = None;
    let mut i = 0;
    while i < args.len() {
        let value = || args.get(i + 1).context("missing value");
        match args[i].as_str() {
            "--count" => count = value()?.parse()?,
            "--sport" => sport = value()?.parse()?,
            "--size" => size = value()?.parse()?,
            "--burst" => burst = value()?.parse()?,
            t => {
                target = Some(parse_target(t)?);
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    let target = target.context("flood needs a udp/ADDR/PORT target")?;
    if target.proto != "udp" {
        bail!("flood only sends UDP");
    }
    let bind: SocketAddr = if target.addr.is_ipv4() {
        SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), sport)
    } else {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), sport)
    };
    let s = UdpSocket::bind(bind).with_context(|| format!("bind {bind}"))?;
    s.connect(SocketAddr::new(target.addr, target.port))?;
    let payload = vec![0x5au8; size];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < count {
        match s.send(&payload) {
            Ok(_) => sent += 1,
            // A full socket buffer (or a refused port reported back): retry after a pause.
            Err(_) => std::thread::sleep(Duration::from_micros(200)),
        }
        if sent.is_multiple_of(burst) {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    println!(
        "{}",
        serde_json::json!({ "sent": sent, "millis": start.elapsed().as_millis() as u64 })
    );
    Ok(())
}

/// `CLOCK_MONOTONIC` in nanoseconds: comparable between processes of one machine.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `--name value` pairs of a subcommand, and its one positional argument.
fn flags(args: &[String]) -> Result<(std::collections::BTreeMap<&str, u64>, Option<&str>)> {
    let mut named = std::collections::BTreeMap::new();
    let mut positional = None;
    let mut i = 0;
    while i < args.len() {
        if let Some(name) = args[i].strip_prefix("--") {
            let value = args.get(i + 1).context("missing value")?;
            named.insert(name, value.parse().with_context(|| format!("--{name}"))?);
            i += 2;
        } else {
            positional = Some(args[i].as_str());
            i += 1;
        }
    }
    Ok((named, positional))
}

fn ticker(args: &[String]) -> Result<()> {
    let (named, target) = flags(args)?;
    let target = parse_target(target.context("ticker needs a udp/ADDR/PORT target")?)?;
    let every = Duration::from_millis(named.get("every-ms").copied().unwrap_or(10));
    let total = Duration::from_millis(named.get("for-ms").copied().unwrap_or(3000));
    let start_ns = monotonic_ns();
    let start = Instant::now();
    let bind: SocketAddr = if target.addr.is_ipv4() {
        SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0)
    } else {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)
    };
    let s = UdpSocket::bind(bind).with_context(|| format!("bind {bind}"))?;
    let to = SocketAddr::new(target.addr, target.port);
    let (mut sent, mut failed, mut seq) = (0u64, 0u64, 0u64);
    while start.elapsed() < total {
        seq += 1;
        match s.send_to(format!("tick {seq}").as_bytes(), to) {
            Ok(_) => sent += 1,
            Err(_) => failed += 1,
        }
        std::thread::sleep(every);
    }
    println!(
        "{}",
        serde_json::json!({ "sent": sent, "failed": failed, "start_ns": start_ns })
    );
    Ok(())
}

fn count(args: &[String]) -> Result<()> {
    let (named, _) = flags(args)?;
    let port = named.get("port").copied().context("count needs --port")? as u16;
    let total = Duration::from_millis(named.get("for-ms").copied().unwrap_or(3000));
    let s: UdpSocket = dual_stack_socket(Type::DGRAM, Protocol::UDP, port)?.into();
    s.set_read_timeout(Some(Duration::from_millis(20)))?;
    println!("READY");
    std::io::stdout().flush()?;
    let start = Instant::now();
    let (mut received, mut first_ns) = (0u64, None);
    let mut from = std::collections::BTreeSet::new();
    let mut buf = [0u8; 2048];
    while start.elapsed() < total {
        if let Ok((_, peer)) = s.recv_from(&mut buf) {
            first_ns.get_or_insert_with(monotonic_ns);
            received += 1;
            from.insert(peer.ip().to_canonical().to_string());
        }
    }
    println!(
        "{}",
        serde_json::json!({ "received": received, "first_ns": first_ns, "from": from })
    );
    Ok(())
}

fn parse_target(s: &str) -> Result<Target> {
    let (proto, rest) = s
        .split_once('/')
        .context("target must be proto/addr/port")?;
    let (addr, port) = rest
        .rsplit_once('/')
        .context("target must be proto/addr/port")?;
    let proto = proto.to_ascii_lowercase();
    if proto != "tcp" && proto != "udp" {
        bail!("unknown protocol {proto}");
    }
    Ok(Target {
        addr: addr
            .parse()
            .with_context(|| format!("bad address {addr}"))?,
        port: port.parse().with_context(|| format!("bad port {port}"))?,
        proto,
    })
}

fn probe(args: &[String]) -> Result<()> {
    let mut timeout = Duration::from_millis(1000);
    let mut targets = Vec::new();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--timeout-ms" => {
                let v = args.get(i + 1).context("--timeout-ms needs a value")?;
                timeout = Duration::from_millis(v.parse()?);
                i += 2;
            }
            t => {
                targets.push(parse_target(t)?);
                i += 1;
            }
        }
    }
    if targets.is_empty() {
        let mut input = String::new();
        std::io::stdin().read_to_string(&mut input)?;
        targets = serde_json::from_str(&input).context("parsing targets JSON from stdin")?;
    }
    let handles: Vec<_> = targets
        .into_iter()
        .map(|t| std::thread::spawn(move || probe_one(t, timeout)))
        .collect();
    // Each UDP socket stays open until every probe is done: a port freed by a quick answer could
    // be bound again by a later probe, and the two would share one conntrack entry (one DNAT
    // choice for two "connections").
    let (results, _sockets): (Vec<ProbeResult>, Vec<Option<UdpSocket>>) = handles
        .into_iter()
        .map(|h| h.join().expect("probe thread panicked"))
        .unzip();
    println!("{}", serde_json::to_string(&results)?);
    Ok(())
}

fn probe_one(t: Target, timeout: Duration) -> (ProbeResult, Option<UdpSocket>) {
    let start = Instant::now();
    let mut socket = None;
    let outcome = if t.proto == "tcp" {
        probe_tcp(&t, timeout)
    } else {
        udp_socket(&t).and_then(|s| probe_udp(socket.insert(s), timeout))
    };
    let (ok, detail, reply) = match outcome {
        Ok(reply) => (true, String::new(), reply.trim().to_string()),
        Err(e) => (false, format!("{e:#}"), String::new()),
    };
    let result = ProbeResult {
        addr: t.addr,
        port: t.port,
        proto: t.proto,
        ok,
        detail,
        millis: start.elapsed().as_millis(),
        reply,
    };
    (result, socket)
}

/// Ok with what the server sent after its first byte.
fn probe_tcp(t: &Target, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::new(t.addr, t.port);
    let mut s = TcpStream::connect_timeout(&addr, timeout).context("connect")?;
    let left = deadline.saturating_duration_since(Instant::now());
    s.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
    let mut b = [0u8; 1];
    let n = s.read(&mut b).context("read")?;
    if n == 0 {
        bail!("connection closed without data");
    }
    // The rest, up to the server's close (or the deadline): best effort, the byte above decided.
    let mut rest = vec![b[0]];
    let mut chunk = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => rest.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&rest).into_owned();
    // A server without --name sends one byte, which says nothing.
    Ok(if text == "x" { String::new() } else { text })
}

/// A UDP socket on an ephemeral port, connected to `t`.
fn udp_socket(t: &Target) -> Result<UdpSocket> {
    let bind: SocketAddr = match t.addr {
        IpAddr::V4(_) => "0.0.0.0:0".parse()?,
        IpAddr::V6(_) => "[::]:0".parse()?,
    };
    let s = UdpSocket::bind(bind)?;
    s.connect(SocketAddr::new(t.addr, t.port))?;
    Ok(s)
}

/// Ok with what followed the nonce in the echo.
fn probe_udp(s: &UdpSocket, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let nonce = format!(
        "{} {} {:?}",
        std::str::from_utf8(PROBE_NONCE_PREFIX).unwrap_or_default(),
        std::process::id(),
        std::time::SystemTime::now()
    );
    let tries = 3u32;
    let slice = timeout / tries;
    let mut buf = [0u8; 2048];
    let mut last_err = anyhow::anyhow!("no reply");
    for _ in 0..tries {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if let Err(e) = s.send(nonce.as_bytes()) {
            last_err = anyhow::Error::new(e).context("send");
        }
        let wait_until = (now + slice).min(deadline);
        loop {
            let left = wait_until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s.set_read_timeout(Some(left))?;
            match s.recv(&mut buf) {
                Ok(n) if buf[..n].starts_with(nonce.as_bytes()) => {
                    return Ok(String::from_utf8_lossy(&buf[nonce.len()..n]).into_owned());
                }
                Ok(_) => continue,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    last_err = anyhow::anyhow!("timeout waiting for echo");
                    break;
                }
                Err(e) => {
                    last_err = anyhow::Error::new(e).context("recv");
                    // ICMP errors (e.g. port unreachable) are reported once; wait out the slice.
                    std::thread::sleep(wait_until.saturating_duration_since(Instant::now()));
                    break;
                }
            }
        }
    }
    Err(last_err)
}

/// Sends each hex-encoded Ethernet frame once on `--dev` through an `AF_PACKET` socket, as a pod
/// with `CAP_NET_RAW` can (the hostile-pod tests craft ARP and neighbour advertisements this way).
fn raw(args: &[String]) -> Result<()> {
    let (dev, frames) = match args {
        [flag, dev, frames @ ..] if flag == "--dev" && !frames.is_empty() => (dev, frames),
        _ => bail!("usage: netpol-probe raw --dev IFACE HEXFRAME..."),
    };
    let name = std::ffi::CString::new(dev.as_str()).context("interface name")?;
    // SAFETY: a valid NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {dev}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh, valid socket we own.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    for hex in frames {
        let frame = hex::decode(hex).context("bad hex frame")?;
        // SAFETY: `frame` and `sll` are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent != frame.len() as isize {
            bail!("sendto on {dev}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}
