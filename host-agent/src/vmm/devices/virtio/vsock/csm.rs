//! One vsock connection: its state machine (virtio spec 5.10.6.4) and credit accounting
//! (5.10.6.3), bridged to a host stream.
//!
//! A connection never talks to the queues. The muxer hands it the guest's packets
//! ([`Connection::send_pkt`]) and host readiness ([`Connection::notify`]), and asks it for the
//! next packet toward the guest ([`Connection::recv_pkt`]) when an rx buffer is free. What it
//! wants to send is kept as a set of pending operations, so a connection never holds more than
//! one of each kind and the muxer's queue of work stays bounded.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::packet::{
    VsockHeader, HOST_CID, MAX_PKT_DATA, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST,
    OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// How many bytes of guest data a connection holds before they reach the host socket; this is
/// the `buf_alloc` we advertise, so it bounds the memory one connection can make us use.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;

/// Tell the guest about freed buffer space once this much was forwarded since the last time
/// it heard our `fwd_cnt`. Any value up to `CONN_BUF_ALLOC` avoids a stall: a guest that ran out
/// of credit has `CONN_BUF_ALLOC` bytes in flight, and forwarding them crosses the threshold.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

/// How long the guest has to answer a REQUEST, or a full SHUTDOWN with a RST, before we give up
/// on it and reset the connection ourselves. Generous: a busy guest (dozens of connections at once,
/// or a nested VM) can take seconds to answer while it is alive, and a dead one costs only this.
pub const CONN_TIMEOUT: Duration = Duration::from_secs(10);

/// Credit accounting for one connection. Pure arithmetic; counters wrap like the spec's u32s.
#[derive(Clone, Debug)]
pub struct Credit {
    /// Guest data we have written to the host socket (freed from our buffer).
    fwd_cnt: u32,
    /// The `fwd_cnt` the guest last heard from us.
    fwd_cnt_sent: u32,
    /// Guest data we have received.
    rx_cnt: u32,
    /// Data we have sent to the guest.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("guest sent {excess} bytes beyond the credit we gave it")]
pub struct CreditOverflow {
    excess: u32,
}

impl Credit {
    pub fn new(peer_buf_alloc: u32, peer_fwd_cnt: u32) -> Credit {
        Credit {
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            rx_cnt: 0,
            tx_cnt: 0,
            peer_buf_alloc,
            peer_fwd_cnt,
        }
    }

    /// How many more bytes the guest can take right now: its buffer less what is in flight.
    pub fn peer_free(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Every guest packet carries its current buffer size and forward count.
    pub fn update_peer(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// We sent `n` data bytes to the guest.
    pub fn on_sent(&mut self, n: u32) {
        self.tx_cnt = self.tx_cnt.wrapping_add(n);
    }

    /// The guest sent us `n` data bytes; it must not exceed our buffer. Checked against what we
    /// actually hold rather than the `fwd_cnt` the guest last heard, which is never stricter.
    pub fn on_received(&mut self, n: u32) -> Result<(), CreditOverflow> {
        let held = self.rx_cnt.wrapping_sub(self.fwd_cnt);
        let room = CONN_BUF_ALLOC.saturating_sub(held);
        if n > room {
            return Err(CreditOverflow { excess: n - room });
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(n);
        Ok(())
    }

    /// `n` bytes of guest data left our buffer for the host socket.
    pub fn on_forwarded(&mut self, n: u32) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n);
    }

    /// Whether the guest should hear about the space we freed since we last told it.
    pub fn needs_update(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD
    }

    /// Puts our credit into an outgoing header; the guest then knows our current `fwd_cnt`.
    pub fn stamp(&mut self, hdr: &mut VsockHeader) {
        hdr.buf_alloc = CONN_BUF_ALLOC;
        hdr.fwd_cnt = self.fwd_cnt;
        self.fwd_cnt_sent = self.fwd_cnt;
    }
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// A host client asked for it; our REQUEST is pending or sent, the guest has not answered.
    LocalInit,
    /// The guest asked for it and the host socket is connected; our RESPONSE is pending.
    PeerInit,
    Established,
    /// A full SHUTDOWN went to the guest (the host side is gone); waiting for its RST.
    Closing,
    /// A RST is pending toward the guest; the connection goes once it is sent.
    Killing,
    /// Nothing more to do: the muxer drops it (and with it the host socket).
    Dead,
}

/// Operations waiting to be sent to the guest, at most one of each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Pending(u8);

impl Pending {
    const REQUEST: u8 = 1;
    const RESPONSE: u8 = 1 << 1;
    const RW: u8 = 1 << 2;
    const CREDIT_UPDATE: u8 = 1 << 3;
    const CREDIT_REQUEST: u8 = 1 << 4;
    const SHUTDOWN: u8 = 1 << 5;

    fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }
    fn set(&mut self, bit: u8) {
        self.0 |= bit;
    }
    fn clear(&mut self, bit: u8) {
        self.0 &= !bit;
    }
}

/// What a connection needs from its host socket.
pub trait HostStream: Read + Write {
    /// Half-closes the host side for writing: the host reads EOF.
    fn shutdown_write(&self) -> io::Result<()>;
}

impl HostStream for UnixStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

pub struct Connection<S> {
    stream: S,
    local_port: u32,
    peer_cid: u64,
    peer_port: u32,
    state: State,
    credit: Credit,
    pending: Pending,
    shutdown_flags: u32,
    /// Bytes for the host before any guest data: the `OK <port>\n` reply of the handshake.
    prefix: Vec<u8>,
    /// Guest data the host socket has not taken yet (bounded by `CONN_BUF_ALLOC`).
    tx_buf: VecDeque<u8>,
    /// The host socket may have data (or EOF) to read; cleared when a read would block.
    readable: bool,
    /// We asked the guest for credit and have not heard back.
    credit_requested: bool,
    host_eof: bool,
    host_hup: bool,
    host_write_shut: bool,
    peer_shut_send: bool,
    peer_shut_rcv: bool,
    expiry: Option<Instant>,
}

impl<S: HostStream> Connection<S> {
    /// A connection a host client asked for: a REQUEST goes to the guest.
    pub fn new_local(stream: S, local_port: u32, peer_cid: u64, peer_port: u32) -> Self {
        let mut conn = Self::new(stream, local_port, peer_cid, peer_port, State::LocalInit);
        conn.pending.set(Pending::REQUEST);
        conn.expiry = Some(Instant::now() + CONN_TIMEOUT);
        conn
    }

    /// A connection the guest asked for (`req` is its REQUEST), already connected on the host.
    pub fn new_peer(stream: S, local_port: u32, req: &VsockHeader) -> Self {
        let mut conn = Self::new(
            stream,
            local_port,
            req.src_cid,
            req.src_port,
            State::PeerInit,
        );
        conn.credit.update_peer(req.buf_alloc, req.fwd_cnt);
        conn.pending.set(Pending::RESPONSE);
        conn
    }

    fn new(stream: S, local_port: u32, peer_cid: u64, peer_port: u32, state: State) -> Self {
        Connection {
            stream,
            local_port,
            peer_cid,
            peer_port,
            state,
            credit: Credit::new(0, 0),
            pending: Pending::default(),
            shutdown_flags: 0,
            prefix: Vec::new(),
            tx_buf: VecDeque::new(),
            readable: false,
            credit_requested: false,
            host_eof: false,
            host_hup: false,
            host_write_shut: false,
            peer_shut_send: false,
            peer_shut_rcv: false,
            expiry: None,
        }
    }

    #[cfg(test)]
    pub fn state(&self) -> State {
        self.state
    }

    pub fn stream(&self) -> &S {
        &self.stream
    }

    #[cfg(test)]
    pub fn credit(&self) -> &Credit {
        &self.credit
    }

    pub fn has_pending_rx(&self) -> bool {
        self.state == State::Killing || self.pending.0 != 0
    }

    /// The muxer removes a dead connection, which closes its host socket.
    pub fn is_dead(&self) -> bool {
        self.state == State::Dead
    }

    /// The host socket is gone both ways; the muxer stops polling it (EPOLLHUP would otherwise
    /// be reported on every wait) and we read what is left without readiness.
    pub fn host_hung_up(&self) -> bool {
        self.host_hup
    }

    pub fn expiry(&self) -> Option<Instant> {
        self.expiry
    }

    /// The epoll events the host socket should be polled for.
    pub fn interest(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.host_hup || matches!(self.state, State::Killing | State::Dead) {
            return ev;
        }
        if self.wants_host_data() && !self.readable {
            ev |= EventSet::IN;
        }
        if !self.prefix.is_empty() || !self.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        ev
    }

    /// Whether we would move host data to the guest now: stop reading the host socket when the
    /// guest has no credit, so the host sees backpressure instead of us buffering.
    fn wants_host_data(&self) -> bool {
        matches!(self.state, State::Established)
            && !self.host_eof
            && !self.peer_shut_rcv
            && self.credit.peer_free() > 0
    }

    /// Resets the connection: a RST goes to the guest, then the connection is dropped.
    pub fn kill(&mut self) {
        if self.state != State::Dead {
            self.state = State::Killing;
            self.pending = Pending::default();
            self.expiry = None;
        }
    }

    /// The guest gave up or never answered in time.
    pub fn on_expired(&mut self, now: Instant) {
        if self.expiry.is_some_and(|t| t <= now) {
            tracing::debug!(
                local_port = self.local_port,
                peer_port = self.peer_port,
                state = ?self.state,
                "vsock: connection timed out, resetting"
            );
            self.kill();
        }
    }

    /// A packet from the guest for this connection.
    pub fn send_pkt(&mut self, hdr: &VsockHeader, data: &[u8]) {
        if matches!(self.state, State::Dead | State::Killing) {
            return;
        }
        self.credit.update_peer(hdr.buf_alloc, hdr.fwd_cnt);
        match (self.state, hdr.op) {
            (_, OP_RST) => {
                // The guest dropped the connection (or nothing listens on the port): close the
                // host side without answering.
                self.state = State::Dead;
                self.pending = Pending::default();
                return;
            }
            (State::LocalInit, OP_RESPONSE) => {
                self.state = State::Established;
                self.expiry = None;
                self.prefix = format!("OK {}\n", self.local_port).into_bytes();
                self.flush();
            }
            (State::Established | State::Closing, OP_RW) => self.on_guest_data(data),
            (State::Established | State::Closing, OP_SHUTDOWN) => self.on_guest_shutdown(hdr),
            (State::Established | State::Closing, OP_CREDIT_UPDATE) => {
                self.credit_requested = false;
            }
            (State::Established | State::Closing, OP_CREDIT_REQUEST) => {
                self.pending.set(Pending::CREDIT_UPDATE);
            }
            (state, op) => {
                tracing::debug!(?state, op, "vsock: unexpected packet, resetting connection");
                self.kill();
                return;
            }
        }
        if self.readable && self.wants_host_data() {
            self.pending.set(Pending::RW);
        }
    }

    fn on_guest_data(&mut self, data: &[u8]) {
        if self.peer_shut_send {
            tracing::debug!("vsock: guest sent data after shutting down sending");
            self.kill();
            return;
        }
        if let Err(e) = self.credit.on_received(data.len() as u32) {
            tracing::warn!("vsock: {e}; resetting connection");
            self.kill();
            return;
        }
        self.tx_buf.extend(data);
        self.flush();
    }

    fn on_guest_shutdown(&mut self, hdr: &VsockHeader) {
        self.peer_shut_rcv |= hdr.flags & SHUTDOWN_RCV != 0;
        self.peer_shut_send |= hdr.flags & SHUTDOWN_SEND != 0;
        if self.peer_shut_rcv {
            self.pending.clear(Pending::RW);
        }
        self.flush();
    }

    /// Readiness of the host socket, from epoll.
    pub fn notify(&mut self, events: EventSet) {
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            self.host_hup = true;
            if self.state == State::LocalInit {
                // The host client left before the guest answered. While our REQUEST has not
                // gone out, the guest never hears of the connection; after it, a RST.
                if self.pending.has(Pending::REQUEST) {
                    self.state = State::Dead;
                    self.pending = Pending::default();
                } else {
                    self.kill();
                }
                return;
            }
            // Whatever the host wrote before closing is still in the socket: keep reading until
            // EOF, without readiness, then close toward the guest.
            self.readable = true;
            // Nothing more will go to the guest (EOF already sent, or it receives no more).
            if (self.host_eof || self.peer_shut_rcv) && self.state == State::Established {
                self.start_closing();
            }
        }
        if events.contains(EventSet::IN) {
            self.readable = true;
        }
        if self.readable && self.wants_host_data() {
            self.pending.set(Pending::RW);
        }
        if events.contains(EventSet::OUT) {
            self.flush();
        }
    }

    /// Writes buffered data to the host socket as far as it takes it.
    fn flush(&mut self) {
        while !self.prefix.is_empty() {
            match self.stream.write(&self.prefix) {
                Ok(0) => return self.host_write_failed(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.prefix.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.host_write_failed(e),
            }
        }
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return self.host_write_failed(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.credit.on_forwarded(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.host_write_failed(e),
            }
        }
        if self.credit.needs_update() {
            self.pending.set(Pending::CREDIT_UPDATE);
        }
        if !self.tx_buf.is_empty() {
            return;
        }
        // Everything the guest sent has reached the host: now its shutdown can take effect.
        if self.peer_shut_send && self.peer_shut_rcv {
            // The guest closed; it waits for our RST.
            self.kill();
        } else if self.peer_shut_send && !self.host_write_shut {
            self.host_write_shut = true;
            if let Err(e) = self.stream.shutdown_write() {
                tracing::debug!("vsock: host socket shutdown failed: {e}");
            }
        }
    }

    fn host_write_failed(&mut self, e: io::Error) {
        tracing::debug!(
            local_port = self.local_port,
            "vsock: host socket write failed ({e}), resetting connection"
        );
        self.kill();
    }

    /// We will never send the guest anything again and the host is gone: a full SHUTDOWN, then
    /// the guest answers with a RST (or we reset after a timeout).
    fn start_closing(&mut self) {
        self.state = State::Closing;
        self.shutdown_flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        self.pending.set(Pending::SHUTDOWN);
        self.expiry = Some(Instant::now() + CONN_TIMEOUT);
    }

    fn header(&mut self, op: u16) -> VsockHeader {
        let mut hdr = VsockHeader {
            src_cid: HOST_CID,
            dst_cid: self.peer_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        };
        self.credit.stamp(&mut hdr);
        hdr
    }

    /// The next packet toward the guest, with at most `max_data` data bytes, if any is due.
    pub fn recv_pkt(&mut self, max_data: usize) -> Option<(VsockHeader, Vec<u8>)> {
        if self.state == State::Killing {
            self.state = State::Dead;
            return Some((self.header(OP_RST), Vec::new()));
        }
        for (bit, op) in [
            (Pending::REQUEST, OP_REQUEST),
            (Pending::RESPONSE, OP_RESPONSE),
            (Pending::CREDIT_UPDATE, OP_CREDIT_UPDATE),
            (Pending::CREDIT_REQUEST, OP_CREDIT_REQUEST),
        ] {
            if self.pending.has(bit) {
                self.pending.clear(bit);
                if bit == Pending::RESPONSE {
                    self.state = State::Established;
                }
                return Some((self.header(op), Vec::new()));
            }
        }
        if self.pending.has(Pending::RW) {
            if let Some(pkt) = self.read_host(max_data) {
                return Some(pkt);
            }
        }
        if self.pending.has(Pending::SHUTDOWN) {
            self.pending.clear(Pending::SHUTDOWN);
            let mut hdr = self.header(OP_SHUTDOWN);
            hdr.flags = self.shutdown_flags;
            return Some((hdr, Vec::new()));
        }
        None
    }

    /// Moves data from the host socket into one packet. Leaves RW pending while the socket may
    /// hold more, so the muxer comes back for it with the next rx buffer.
    fn read_host(&mut self, max_data: usize) -> Option<(VsockHeader, Vec<u8>)> {
        if !self.wants_host_data() {
            self.pending.clear(Pending::RW);
            if self.state == State::Established
                && self.readable
                && self.credit.peer_free() == 0
                && !self.credit_requested
            {
                // The guest may simply not have told us about space it freed.
                self.credit_requested = true;
                return Some((self.header(OP_CREDIT_REQUEST), Vec::new()));
            }
            return None;
        }
        let n = max_data
            .min(MAX_PKT_DATA)
            .min(self.credit.peer_free() as usize);
        if n == 0 {
            // No room in this rx buffer; RW stays pending for a bigger one.
            return None;
        }
        let mut buf = vec![0u8; n];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    self.host_eof = true;
                    self.readable = false;
                    self.pending.clear(Pending::RW);
                    if self.host_hup {
                        self.start_closing();
                    } else {
                        // A half-close: the host may still read what the guest sends.
                        self.shutdown_flags = SHUTDOWN_SEND;
                        self.pending.set(Pending::SHUTDOWN);
                    }
                    return None;
                }
                Ok(read) => {
                    buf.truncate(read);
                    self.credit.on_sent(read as u32);
                    return Some((self.header(OP_RW), buf));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    self.pending.clear(Pending::RW);
                    return None;
                }
                Err(e) => {
                    tracing::debug!("vsock: host socket read failed ({e}), resetting connection");
                    self.kill();
                    return self.recv_pkt(0);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST_CID: u64 = 3;
    const LOCAL_PORT: u32 = 1 << 30;
    const PEER_PORT: u32 = 52;

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    fn guest_pkt(op: u16, len: usize) -> VsockHeader {
        VsockHeader {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: PEER_PORT,
            dst_port: LOCAL_PORT,
            len: len as u32,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 1024,
            fwd_cnt: 0,
        }
    }

    fn read_all(s: &mut UnixStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return out,
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn established() -> (Connection<UnixStream>, UnixStream) {
        let (ours, mut host) = pair();
        let mut conn = Connection::new_local(ours, LOCAL_PORT, GUEST_CID, PEER_PORT);
        let (req, _) = conn.recv_pkt(4096).unwrap();
        assert_eq!(req.op, OP_REQUEST);
        conn.send_pkt(&guest_pkt(OP_RESPONSE, 0), &[]);
        assert_eq!(conn.state(), State::Established);
        assert_eq!(read_all(&mut host), format!("OK {LOCAL_PORT}\n").as_bytes());
        (conn, host)
    }

    #[test]
    fn credit_peer_free_and_wrapping() {
        let mut c = Credit::new(100, 0);
        assert_eq!(c.peer_free(), 100);
        c.on_sent(60);
        assert_eq!(c.peer_free(), 40);
        c.on_sent(40);
        assert_eq!(c.peer_free(), 0);
        c.update_peer(100, 70);
        assert_eq!(c.peer_free(), 70);
        // A peer that shrinks its buffer below what is in flight has no free credit, not a
        // negative amount.
        c.update_peer(10, 70);
        assert_eq!(c.peer_free(), 0);

        // Counters wrap around u32.
        let mut c = Credit::new(100, u32::MAX - 10);
        c.tx_cnt = u32::MAX - 10;
        c.on_sent(50);
        assert_eq!(c.peer_free(), 50);
    }

    #[test]
    fn credit_receive_limit_and_update_threshold() {
        let mut c = Credit::new(0, 0);
        assert!(c.on_received(CONN_BUF_ALLOC).is_ok());
        assert_eq!(c.on_received(1), Err(CreditOverflow { excess: 1 }));
        c.on_forwarded(CREDIT_UPDATE_THRESHOLD - 1);
        assert!(!c.needs_update());
        c.on_forwarded(1);
        assert!(c.needs_update());
        let mut hdr = VsockHeader::default();
        c.stamp(&mut hdr);
        assert_eq!(hdr.buf_alloc, CONN_BUF_ALLOC);
        assert_eq!(hdr.fwd_cnt, CREDIT_UPDATE_THRESHOLD);
        assert!(!c.needs_update());
        // Forwarded bytes are room for more.
        assert!(c.on_received(CREDIT_UPDATE_THRESHOLD).is_ok());
    }

    #[test]
    fn host_initiated_handshake_and_data_both_ways() {
        let (mut conn, mut host) = established();

        host.write_all(b"ping").unwrap();
        conn.notify(EventSet::IN);
        assert!(conn.has_pending_rx());
        let (hdr, data) = conn.recv_pkt(4096).unwrap();
        assert_eq!(
            (hdr.op, hdr.src_port, hdr.dst_port),
            (OP_RW, LOCAL_PORT, PEER_PORT)
        );
        assert_eq!((hdr.src_cid, hdr.dst_cid), (HOST_CID, GUEST_CID));
        assert_eq!(data, b"ping");
        // Nothing more to read: RW is dropped and the socket is polled again.
        assert!(conn.recv_pkt(4096).is_none());
        assert!(conn.interest().contains(EventSet::IN));

        conn.send_pkt(&guest_pkt(OP_RW, 4), b"pong");
        assert_eq!(read_all(&mut host), b"pong");
    }

    #[test]
    fn rst_during_connect_closes_host_stream() {
        let (ours, mut host) = pair();
        let mut conn = Connection::new_local(ours, LOCAL_PORT, GUEST_CID, PEER_PORT);
        conn.recv_pkt(4096).unwrap();
        conn.send_pkt(&guest_pkt(OP_RST, 0), &[]);
        assert!(conn.is_dead());
        drop(conn);
        host.set_nonblocking(false).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(host.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn host_leaving_before_the_request_went_out_tells_the_guest_nothing() {
        let (ours, host) = pair();
        let mut conn = Connection::new_local(ours, LOCAL_PORT, GUEST_CID, PEER_PORT);
        drop(host);
        conn.notify(EventSet::HANG_UP);
        assert!(conn.is_dead());
        assert!(!conn.has_pending_rx());
        assert!(conn.recv_pkt(4096).is_none());

        // Once the REQUEST is out, the guest gets a RST.
        let (ours, host) = pair();
        let mut conn = Connection::new_local(ours, LOCAL_PORT, GUEST_CID, PEER_PORT);
        assert_eq!(conn.recv_pkt(4096).unwrap().0.op, OP_REQUEST);
        drop(host);
        conn.notify(EventSet::HANG_UP);
        assert_eq!(conn.recv_pkt(4096).unwrap().0.op, OP_RST);
        assert!(conn.is_dead());
    }

    #[test]
    fn data_before_response_resets() {
        let (ours, _host) = pair();
        let mut conn = Connection::new_local(ours, LOCAL_PORT, GUEST_CID, PEER_PORT);
        conn.recv_pkt(4096).unwrap();
        conn.send_pkt(&guest_pkt(OP_RW, 1), b"x");
        let (hdr, _) = conn.recv_pkt(4096).unwrap();
        assert_eq!(hdr.op, OP_RST);
        assert!(conn.is_dead());
    }

    #[test]
    fn connect_timeout_resets() {
        let (ours, _host) = pair();
        let mut conn = Connection::new_local(ours, LOCAL_PORT, GUEST_CID, PEER_PORT);
        conn.recv_pkt(4096).unwrap();
        conn.on_expired(Instant::now());
        assert_eq!(conn.state(), State::LocalInit);
        conn.on_expired(Instant::now() + CONN_TIMEOUT);
        assert_eq!(conn.recv_pkt(4096).unwrap().0.op, OP_RST);
        assert!(conn.is_dead());
    }

    #[test]
    fn peer_initiated_gets_response_with_peer_credit() {
        let (ours, _host) = pair();
        let mut req = guest_pkt(OP_REQUEST, 0);
        req.buf_alloc = 777;
        let mut conn = Connection::new_peer(ours, 5000, &req);
        assert_eq!(conn.state(), State::PeerInit);
        let (hdr, _) = conn.recv_pkt(4096).unwrap();
        assert_eq!(hdr.op, OP_RESPONSE);
        assert_eq!((hdr.src_port, hdr.dst_port), (5000, PEER_PORT));
        assert_eq!(hdr.buf_alloc, CONN_BUF_ALLOC);
        assert_eq!(conn.state(), State::Established);
        assert_eq!(conn.credit().peer_free(), 777);
    }

    #[test]
    fn never_sends_more_than_peer_credit() {
        let (mut conn, mut host) = established();
        // guest_pkt advertises buf_alloc 1024.
        host.write_all(&[7u8; 3000]).unwrap();
        conn.notify(EventSet::IN);
        let (hdr, data) = conn.recv_pkt(600).unwrap();
        assert_eq!((hdr.op, data.len()), (OP_RW, 600));
        let (_, data) = conn.recv_pkt(4096).unwrap();
        assert_eq!(data.len(), 424);
        // Out of credit: one CREDIT_REQUEST, no polling of the host socket.
        let (hdr, _) = conn.recv_pkt(4096).unwrap();
        assert_eq!(hdr.op, OP_CREDIT_REQUEST);
        assert!(conn.recv_pkt(4096).is_none());
        assert!(!conn.interest().contains(EventSet::IN));

        // The guest consumed 1000 bytes.
        let mut upd = guest_pkt(OP_CREDIT_UPDATE, 0);
        upd.fwd_cnt = 1000;
        conn.send_pkt(&upd, &[]);
        let (hdr, data) = conn.recv_pkt(4096).unwrap();
        assert_eq!((hdr.op, data.len()), (OP_RW, 1000));
    }

    #[test]
    fn answers_credit_request_and_sends_updates_after_forwarding() {
        let (mut conn, mut host) = established();
        conn.send_pkt(&guest_pkt(OP_CREDIT_REQUEST, 0), &[]);
        let (hdr, _) = conn.recv_pkt(4096).unwrap();
        assert_eq!(
            (hdr.op, hdr.buf_alloc, hdr.fwd_cnt),
            (OP_CREDIT_UPDATE, CONN_BUF_ALLOC, 0)
        );

        let chunk = vec![1u8; 16 * 1024];
        let mut total = 0;
        while total < CREDIT_UPDATE_THRESHOLD as usize {
            conn.send_pkt(&guest_pkt(OP_RW, chunk.len()), &chunk);
            total += read_all(&mut host).len();
        }
        let (hdr, _) = conn.recv_pkt(4096).unwrap();
        assert_eq!(hdr.op, OP_CREDIT_UPDATE);
        assert_eq!(hdr.fwd_cnt as usize, total);
    }

    /// A host socket that never takes or gives a byte.
    struct StuckStream;

    impl Read for StuckStream {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    impl Write for StuckStream {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl HostStream for StuckStream {
        fn shutdown_write(&self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_overrunning_credit_is_reset() {
        let req = guest_pkt(OP_REQUEST, 0);
        let mut conn = Connection::new_peer(StuckStream, 5000, &req);
        conn.recv_pkt(4096).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        for _ in 0..(CONN_BUF_ALLOC as usize / chunk.len()) {
            conn.send_pkt(&guest_pkt(OP_RW, chunk.len()), &chunk);
        }
        // Everything the guest may send is buffered, waiting for the host socket.
        assert_eq!(conn.state(), State::Established);
        assert!(conn.interest().contains(EventSet::OUT));
        conn.send_pkt(&guest_pkt(OP_RW, 1), b"x");
        assert_eq!(conn.state(), State::Killing);
        assert_eq!(conn.recv_pkt(4096).unwrap().0.op, OP_RST);
        assert!(conn.is_dead());
    }

    #[test]
    fn guest_half_close_and_close() {
        let (mut conn, mut host) = established();
        let mut shut = guest_pkt(OP_SHUTDOWN, 0);
        shut.flags = SHUTDOWN_SEND;
        conn.send_pkt(&guest_pkt(OP_RW, 3), b"bye");
        conn.send_pkt(&shut, &[]);
        host.set_nonblocking(false).unwrap();
        let mut got = Vec::new();
        host.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"bye");
        // The host can still talk to the guest.
        host.write_all(b"still here").unwrap();
        conn.notify(EventSet::IN);
        assert_eq!(conn.recv_pkt(4096).unwrap().1, b"still here");

        shut.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
        conn.send_pkt(&shut, &[]);
        assert_eq!(conn.recv_pkt(4096).unwrap().0.op, OP_RST);
        assert!(conn.is_dead());
    }

    #[test]
    fn host_close_sends_full_shutdown_then_waits_for_rst() {
        let (mut conn, host) = established();
        let mut host = host;
        host.write_all(b"last words").unwrap();
        drop(host);
        conn.notify(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP);
        assert!(conn.host_hung_up());
        assert_eq!(conn.interest(), EventSet::empty());
        assert_eq!(conn.recv_pkt(4096).unwrap().1, b"last words");
        let (hdr, _) = conn.recv_pkt(4096).unwrap();
        assert_eq!(
            (hdr.op, hdr.flags),
            (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
        );
        assert_eq!(conn.state(), State::Closing);
        conn.send_pkt(&guest_pkt(OP_RST, 0), &[]);
        assert!(conn.is_dead());
    }

    #[test]
    fn host_half_close_sends_send_shutdown() {
        let (mut conn, host) = established();
        host.shutdown(std::net::Shutdown::Write).unwrap();
        conn.notify(EventSet::IN);
        let (hdr, _) = conn.recv_pkt(4096).unwrap();
        assert_eq!((hdr.op, hdr.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        assert_eq!(conn.state(), State::Established);
        assert!(!conn.interest().contains(EventSet::IN));
        // Then the host closes entirely.
        drop(host);
        conn.notify(EventSet::HANG_UP);
        let (hdr, _) = conn.recv_pkt(4096).unwrap();
        assert_eq!(
            (hdr.op, hdr.flags),
            (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
        );
        conn.on_expired(Instant::now() + CONN_TIMEOUT);
        assert_eq!(conn.recv_pkt(4096).unwrap().0.op, OP_RST);
    }

    #[test]
    fn guest_data_to_a_closed_host_resets() {
        let (mut conn, host) = established();
        drop(host);
        conn.send_pkt(&guest_pkt(OP_RW, 3), b"abc");
        assert_eq!(conn.recv_pkt(4096).unwrap().0.op, OP_RST);
    }
}
