//! The Unix-socket backend of the vsock device: Firecracker's "hybrid vsock".
//!
//! - Host to guest: a host client connects to `uds_path` and writes `CONNECT <port>\n`; we send
//!   the guest a REQUEST for that port from a freshly allocated host port, and once the guest
//!   answers, write `OK <host port>\n` to the client and shuttle bytes.
//! - Guest to host: the guest connects to CID 2, port P; we connect to the Unix socket
//!   `<uds_path>_P` and answer RESPONSE, or RST when nothing listens there.
//!
//! The muxer routes packets to connections by (host port, guest port), owns an epoll set of its
//! listener and sockets (the device's worker polls that epoll fd as one source), and keeps the
//! queue of connections that have something for the guest. Its memory is bounded: one rx-queue
//! entry per connection, a bounded queue of RSTs for unknown connections, and a bounded number of
//! connections, each bounded by its credit.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::csm::{Connection, CONN_TIMEOUT};
use super::packet::{TxPacket, VsockHeader, HOST_CID, OP_REQUEST, OP_RST, TYPE_STREAM};
use super::VsockError;

/// Connections (both directions together) beyond which new ones are refused.
const MAX_CONNECTIONS: usize = 1024;

/// RSTs for packets that belong to no connection. When this many wait for rx buffers, the device
/// stops taking tx packets, so a guest cannot make us queue without bound.
const MAX_RST_BACKLOG: usize = 256;

/// Host ports we allocate for host-initiated connections start here, far above the ports a guest
/// connects to on the host (as Firecracker does).
const LOCAL_PORT_BASE: u32 = 1 << 30;

/// Where this muxer starts handing out host ports: a random point in the upper range. A guest
/// restored from a snapshot may still hold sockets (reset, not yet closed by their owner) for the
/// ports the snapshotted VM's host side used; starting each process at the same port would make new
/// connections collide with them and be refused.
fn first_local_port() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    // std's RandomState is seeded from the OS's randomness.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    LOCAL_PORT_BASE + (random % u64::from(LOCAL_PORT_BASE / 2)) as u32
}

/// The longest `CONNECT <port>` line we accept.
const MAX_HANDSHAKE_LINE: usize = 32;

/// A connection's identity: our (host) port and the guest's port.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct ConnKey {
    local_port: u32,
    peer_port: u32,
}

struct MuxConn {
    conn: Connection<UnixStream>,
    /// The epoll events its socket is registered for; `None` once deregistered.
    registered: Option<EventSet>,
    in_rxq: bool,
}

/// A host client that has not finished its `CONNECT <port>\n` line yet.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, MuxConn>,
    fd_keys: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    /// Connections with something for the guest, each at most once, served round-robin.
    rxq: VecDeque<ConnKey>,
    rst_backlog: VecDeque<VsockHeader>,
    next_local_port: u32,
}

impl Muxer {
    /// Listens on `uds_path`. A live socket there (one that accepts a connection) belongs to
    /// someone else and is an error; a stale one left by a dead process is replaced.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Muxer, VsockError> {
        prepare_socket_path(&uds_path)?;
        let listener = UnixListener::bind(&uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.clone(),
            source,
        })?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        let fd = listener.as_raw_fd();
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, fd as u64),
        )?;
        Ok(Muxer {
            guest_cid,
            uds_path,
            listener,
            epoll,
            conns: HashMap::new(),
            fd_keys: HashMap::new(),
            handshakes: HashMap::new(),
            rxq: VecDeque::new(),
            rst_backlog: VecDeque::new(),
            next_local_port: first_local_port(),
        })
    }

    #[cfg(test)]
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether a packet for the guest may be waiting (`recv_pkt` can still come back empty).
    pub fn has_pending_rx(&self) -> bool {
        !self.rst_backlog.is_empty() || !self.rxq.is_empty()
    }

    /// Too many packets wait for rx buffers: stop taking tx packets until the guest drains some.
    pub fn rx_backlog_full(&self) -> bool {
        self.rst_backlog.len() >= MAX_RST_BACKLOG
    }

    /// Drops every connection (their host sockets close). Host clients still in their handshake
    /// are kept: they have no guest side yet.
    pub fn reset_connections(&mut self) {
        // Closing a socket removes it from the epoll set.
        self.conns.clear();
        self.fd_keys.clear();
        self.rxq.clear();
        self.rst_backlog.clear();
    }

    /// The next connection deadline (a handshake or a connection timing out), if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns
            .values()
            .filter_map(|c| c.conn.expiry())
            .chain(self.handshakes.values().map(|h| h.deadline))
            .min()
    }

    /// Handles whatever is ready in the muxer's epoll set, and expired deadlines.
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("vsock: muxer epoll_wait failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                self.handle_event(ev.data() as RawFd, ev.event_set());
            }
            if n < events.len() {
                break;
            }
        }
        self.sweep(Instant::now());
    }

    fn handle_event(&mut self, fd: RawFd, events: EventSet) {
        if fd == self.listener.as_raw_fd() {
            self.accept_clients();
        } else if self.handshakes.contains_key(&fd) {
            self.continue_handshake(fd);
        } else if let Some(&key) = self.fd_keys.get(&fd) {
            if let Some(mc) = self.conns.get_mut(&key) {
                mc.conn.notify(events);
            }
            self.refresh(key);
        }
    }

    /// Resets connections and drops handshakes whose deadline passed.
    pub fn sweep(&mut self, now: Instant) {
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.conn.expiry().is_some_and(|t| t <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            if let Some(mc) = self.conns.get_mut(&key) {
                mc.conn.on_expired(now);
            }
            self.refresh(key);
        }
        self.handshakes.retain(|_, h| {
            let alive = h.deadline > now;
            if !alive {
                tracing::debug!("vsock: host client sent no CONNECT line in time");
            }
            alive
        });
    }

    fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => self.add_handshake(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // E.g. out of file descriptors: the client stays in the backlog for later.
                    tracing::warn!("vsock: accept on {} failed: {e}", self.uds_path.display());
                    return;
                }
            }
        }
    }

    fn add_handshake(&mut self, stream: UnixStream) {
        if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
            tracing::warn!("vsock: too many connections, refusing a host client");
            return;
        }
        if let Err(e) = stream.set_nonblocking(true) {
            tracing::warn!("vsock: cannot make a host client non-blocking: {e}");
            return;
        }
        let fd = stream.as_raw_fd();
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, fd as u64),
        ) {
            tracing::warn!("vsock: cannot poll a host client: {e}");
            return;
        }
        self.handshakes.insert(
            fd,
            Handshake {
                stream,
                line: Vec::new(),
                deadline: Instant::now() + CONN_TIMEOUT,
            },
        );
    }

    /// Reads the client's `CONNECT <port>\n` one byte at a time: whatever follows the line is
    /// connection data, and must stay in the socket until the guest side exists.
    fn continue_handshake(&mut self, fd: RawFd) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match hs.stream.read(&mut byte) {
                Ok(0) => break Err("closed before the CONNECT line"),
                Ok(_) if byte[0] == b'\n' => break parse_connect(&hs.line),
                Ok(_) if hs.line.len() >= MAX_HANDSHAKE_LINE => break Err("line too long"),
                Ok(_) => hs.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Err("read failed"),
            }
        };
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        // The socket moves to a connection, registered afresh with its own interest set.
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        {
            tracing::warn!("vsock: cannot stop polling a host client: {e}");
        }
        match port {
            // Clients that gave up on a guest that was not up yet (a readiness poll's timed-out
            // attempts) wait in the listener's backlog with their CONNECT line written; they
            // must not each become a connection the guest accepts and then sees reset.
            Ok(_) if peer_gone(&hs.stream) => {
                tracing::debug!("vsock: dropping host client: it left before connecting")
            }
            Ok(port) => self.host_connect(hs.stream, port),
            Err(why) => tracing::debug!("vsock: dropping host client: {why}"),
        }
    }

    fn host_connect(&mut self, stream: UnixStream, peer_port: u32) {
        let Some(local_port) = self.allocate_local_port(peer_port) else {
            tracing::warn!("vsock: no free host port for a connection to guest port {peer_port}");
            return;
        };
        tracing::debug!(
            local_port,
            peer_port,
            "vsock: host client connecting to the guest"
        );
        let conn = Connection::new_local(stream, local_port, self.guest_cid, peer_port);
        self.insert(
            ConnKey {
                local_port,
                peer_port,
            },
            conn,
        );
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(LOCAL_PORT_BASE);
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return Some(port);
            }
        }
        None
    }

    fn insert(&mut self, key: ConnKey, conn: Connection<UnixStream>) {
        let fd = conn.stream().as_raw_fd();
        self.fd_keys.insert(fd, key);
        self.conns.insert(
            key,
            MuxConn {
                conn,
                registered: None,
                in_rxq: false,
            },
        );
        self.refresh(key);
    }

    /// Brings the muxer's view of one connection up to date after anything happened to it:
    /// drops it when dead, re-registers its socket's interest, queues it for the rx queue.
    fn refresh(&mut self, key: ConnKey) {
        let Some(mc) = self.conns.get_mut(&key) else {
            return;
        };
        let fd = mc.conn.stream().as_raw_fd();
        if mc.conn.is_dead() {
            self.fd_keys.remove(&fd);
            self.conns.remove(&key);
            tracing::debug!(
                local_port = key.local_port,
                peer_port = key.peer_port,
                "vsock: connection closed"
            );
            return;
        }
        let want = if mc.conn.host_hung_up() {
            None
        } else {
            Some(mc.conn.interest())
        };
        if want != mc.registered {
            let result = match (mc.registered, want) {
                (None, Some(ev)) => {
                    self.epoll
                        .ctl(ControlOperation::Add, fd, EpollEvent::new(ev, fd as u64))
                }
                (Some(_), Some(ev)) => {
                    self.epoll
                        .ctl(ControlOperation::Modify, fd, EpollEvent::new(ev, fd as u64))
                }
                (Some(_), None) => {
                    self.epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                }
                (None, None) => Ok(()),
            };
            match result {
                Ok(()) => mc.registered = want,
                Err(e) => {
                    tracing::warn!("vsock: cannot update polling of a connection: {e}");
                    mc.conn.kill();
                }
            }
        }
        if mc.conn.has_pending_rx() && !mc.in_rxq {
            mc.in_rxq = true;
            self.rxq.push_back(key);
        }
    }

    /// A packet from the guest.
    pub fn send_pkt(&mut self, pkt: &TxPacket) {
        let hdr = &pkt.hdr;
        if hdr.src_cid != self.guest_cid {
            tracing::warn!(
                src_cid = hdr.src_cid,
                "vsock: dropping a packet with a foreign source CID"
            );
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            tracing::debug!(
                dst_cid = hdr.dst_cid,
                type_ = hdr.type_,
                "vsock: packet not for a host stream"
            );
            self.queue_rst(hdr);
            return;
        }
        if let Some(mc) = self.conns.get_mut(&key) {
            mc.conn.send_pkt(hdr, &pkt.data);
            self.refresh(key);
        } else if hdr.op == OP_REQUEST {
            self.guest_connect(hdr);
        } else if hdr.op != OP_RST {
            self.queue_rst(hdr);
        }
    }

    fn guest_connect(&mut self, req: &VsockHeader) {
        if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
            tracing::warn!("vsock: too many connections, refusing one from the guest");
            return self.queue_rst(req);
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", req.dst_port));
        let stream = match UnixStream::connect(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(
                    "vsock: guest connection to port {}: {}: {e}",
                    req.dst_port,
                    Path::new(&path).display()
                );
                return self.queue_rst(req);
            }
        };
        if let Err(e) = stream.set_nonblocking(true) {
            tracing::warn!("vsock: cannot make a host socket non-blocking: {e}");
            return self.queue_rst(req);
        }
        tracing::debug!(
            port = req.dst_port,
            peer_port = req.src_port,
            "vsock: guest connected to the host"
        );
        let conn = Connection::new_peer(stream, req.dst_port, req);
        self.insert(
            ConnKey {
                local_port: req.dst_port,
                peer_port: req.src_port,
            },
            conn,
        );
    }

    /// Answers a packet that has no connection with a RST.
    fn queue_rst(&mut self, to: &VsockHeader) {
        self.rst_backlog.push_back(VsockHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// The next packet for the guest, with at most `max_data` data bytes.
    pub fn recv_pkt(&mut self, max_data: usize) -> Option<(VsockHeader, Vec<u8>)> {
        if let Some(hdr) = self.rst_backlog.pop_front() {
            return Some((hdr, Vec::new()));
        }
        // Each queued connection gets one try; one that has nothing after all (its socket
        // would block) leaves the queue until it has something again.
        for _ in 0..self.rxq.len() {
            let key = self.rxq.pop_front()?;
            let Some(mc) = self.conns.get_mut(&key) else {
                continue;
            };
            mc.in_rxq = false;
            let pkt = mc.conn.recv_pkt(max_data);
            self.refresh(key);
            if pkt.is_some() {
                return pkt;
            }
        }
        None
    }
}

impl AsRawFd for Muxer {
    /// The muxer's epoll set: readable when one of its sockets needs attention.
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The socket file is ours; leaving it would only make the next start clean it up.
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::debug!("vsock: cannot remove {}: {e}", self.uds_path.display());
            }
        }
    }
}

/// Whether the other end of a Unix stream has closed (both directions: not a half-close).
fn peer_gone(stream: &UnixStream) -> bool {
    let mut fds = [libc::pollfd {
        fd: stream.as_raw_fd(),
        events: 0,
        revents: 0,
    }];
    // SAFETY: `fds` is a valid array of one pollfd for the duration of the call, and the fd
    // belongs to `stream`, which outlives it; a zero timeout never blocks.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
    n == 1 && fds[0].revents & libc::POLLHUP != 0
}

fn prepare_socket_path(path: &Path) -> Result<(), VsockError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if !meta.file_type().is_socket() {
        return Err(VsockError::NotASocket(path.to_path_buf()));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(VsockError::SocketInUse(path.to_path_buf()));
    }
    tracing::info!("vsock: replacing stale socket {}", path.display());
    std::fs::remove_file(path)?;
    Ok(())
}

/// Parses `CONNECT <port>` (the newline already stripped; a trailing `\r` is tolerated).
fn parse_connect(line: &[u8]) -> Result<u32, &'static str> {
    let line = std::str::from_utf8(line).map_err(|_| "CONNECT line is not UTF-8")?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let port = line
        .strip_prefix("CONNECT ")
        .ok_or("expected CONNECT <port>")?;
    port.trim().parse::<u32>().map_err(|_| "bad port")
}

/// Milliseconds until `deadline`, for epoll_wait (-1: no deadline).
pub fn epoll_timeout_ms(deadline: Option<Instant>) -> i32 {
    match deadline {
        None => -1,
        Some(t) => {
            let left = t.saturating_duration_since(Instant::now());
            // Round up so we never wake just before the deadline and spin.
            i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::super::packet::{OP_RESPONSE, OP_RW};
    use super::*;

    const GUEST_CID: u64 = 3;

    fn guest_hdr(op: u16, src_port: u32, dst_port: u32) -> VsockHeader {
        VsockHeader {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        }
    }

    fn pkt(hdr: VsockHeader) -> TxPacket {
        TxPacket {
            hdr,
            data: Vec::new(),
        }
    }

    #[test]
    fn live_socket_is_an_error_and_stale_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let first = Muxer::new(GUEST_CID, path.clone()).unwrap();
        assert!(matches!(
            Muxer::new(GUEST_CID, path.clone()),
            Err(VsockError::SocketInUse(_))
        ));
        // A socket file nobody listens on any more.
        let stale = UnixListener::bind(dir.path().join("stale.sock")).unwrap();
        drop(stale);
        Muxer::new(GUEST_CID, dir.path().join("stale.sock")).unwrap();
        // Dropping the muxer removes its socket file.
        drop(first);
        assert!(!path.exists());
    }

    #[test]
    fn refuses_to_replace_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        std::fs::write(&path, b"keep me").unwrap();
        assert!(matches!(
            Muxer::new(GUEST_CID, path.clone()),
            Err(VsockError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }

    #[test]
    fn unknown_and_foreign_packets() {
        let dir = tempfile::tempdir().unwrap();
        let mut mux = Muxer::new(GUEST_CID, dir.path().join("v.sock")).unwrap();

        // Data for a connection that does not exist: RST, addressed back.
        mux.send_pkt(&pkt(guest_hdr(OP_RW, 1000, 2000)));
        let (hdr, _) = mux.recv_pkt(4096).unwrap();
        assert_eq!((hdr.op, hdr.src_port, hdr.dst_port), (OP_RST, 2000, 1000));
        assert_eq!((hdr.src_cid, hdr.dst_cid), (HOST_CID, GUEST_CID));

        // A RST for nothing is not answered; a spoofed source CID is dropped.
        mux.send_pkt(&pkt(guest_hdr(OP_RST, 1000, 2000)));
        let mut spoofed = guest_hdr(OP_RW, 1000, 2000);
        spoofed.src_cid = 7;
        mux.send_pkt(&pkt(spoofed));
        assert!(!mux.has_pending_rx());

        // Non-stream packets are refused.
        let mut dgram = guest_hdr(OP_REQUEST, 1000, 2000);
        dgram.type_ = 2;
        mux.send_pkt(&pkt(dgram));
        assert_eq!(mux.recv_pkt(4096).unwrap().0.op, OP_RST);
    }

    #[test]
    fn guest_connect_to_missing_and_present_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let mut mux = Muxer::new(GUEST_CID, path.clone()).unwrap();

        mux.send_pkt(&pkt(guest_hdr(OP_REQUEST, 1000, 7000)));
        assert_eq!(mux.recv_pkt(4096).unwrap().0.op, OP_RST);
        assert_eq!(mux.connection_count(), 0);

        let listener = UnixListener::bind(dir.path().join("v.sock_7000")).unwrap();
        mux.send_pkt(&pkt(guest_hdr(OP_REQUEST, 1000, 7000)));
        let (hdr, _) = mux.recv_pkt(4096).unwrap();
        assert_eq!(
            (hdr.op, hdr.src_port, hdr.dst_port),
            (OP_RESPONSE, 7000, 1000)
        );
        assert_eq!(mux.connection_count(), 1);
        let (_server, _) = listener.accept().unwrap();

        // A duplicate REQUEST on a live connection resets it.
        mux.send_pkt(&pkt(guest_hdr(OP_REQUEST, 1000, 7000)));
        assert_eq!(mux.recv_pkt(4096).unwrap().0.op, OP_RST);
        assert_eq!(mux.connection_count(), 0);
    }

    #[test]
    fn rst_backlog_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut mux = Muxer::new(GUEST_CID, dir.path().join("v.sock")).unwrap();
        for port in 0..MAX_RST_BACKLOG as u32 {
            assert!(!mux.rx_backlog_full());
            mux.send_pkt(&pkt(guest_hdr(OP_RW, port, 1)));
        }
        assert!(mux.rx_backlog_full());
        mux.recv_pkt(4096).unwrap();
        assert!(!mux.rx_backlog_full());
    }

    /// Runs the muxer's event handling until `done` or a few rounds pass (each round handles
    /// what the previous one registered).
    fn pump(mux: &mut Muxer, mut done: impl FnMut(&mut Muxer) -> bool) {
        for _ in 0..10 {
            mux.process_events();
            if done(mux) {
                return;
            }
        }
    }

    #[test]
    fn host_client_gone_before_its_connect_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let mut mux = Muxer::new(GUEST_CID, path.clone()).unwrap();
        // A client that wrote its line and gave up, and one still waiting behind it.
        let mut gone = UnixStream::connect(&path).unwrap();
        gone.write_all(b"CONNECT 52\n").unwrap();
        drop(gone);
        let mut live = UnixStream::connect(&path).unwrap();
        live.write_all(b"CONNECT 53\n").unwrap();
        pump(&mut mux, |m| m.connection_count() > 0);
        assert_eq!(mux.connection_count(), 1);
        let (hdr, _) = mux.recv_pkt(4096).unwrap();
        assert_eq!((hdr.op, hdr.dst_port), (OP_REQUEST, 53));
        assert!(mux.recv_pkt(4096).is_none());
    }

    #[test]
    fn parses_connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Ok(52));
        assert_eq!(parse_connect(b"CONNECT 49983\r"), Ok(49983));
        assert!(parse_connect(b"CONNECT").is_err());
        assert!(parse_connect(b"CONNECT x").is_err());
        assert!(parse_connect(b"connect 5").is_err());
        assert!(parse_connect(b"CONNECT 99999999999").is_err());
        assert!(parse_connect(&[0xff, 0xfe]).is_err());
    }
}
