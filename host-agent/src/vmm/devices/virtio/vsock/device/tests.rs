//! The whole device driven through mock queues and real Unix sockets, the test playing the
//! guest's driver. Waits are on eventfd/epoll readiness with a deadline, never sleeps.

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::super::packet::{
    VsockHeader, HDR_SIZE, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
    OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::*;

const GUEST_CID: u64 = 3;
const QSIZE: u16 = 256;
const BUF_SIZE: u64 = 0x1000;
const DEADLINE: Duration = Duration::from_secs(5);
const F_NEXT: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
const F_WRITE: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

/// The test double at the interrupt seam: counts notifications and makes them pollable.
struct CountingInterrupt {
    used: AtomicUsize,
    evt: EventFd,
}

impl Interrupt for CountingInterrupt {
    fn notify_used(&self) -> io::Result<()> {
        self.used.fetch_add(1, Ordering::SeqCst);
        self.evt.write(1)
    }

    fn notify_config(&self) -> io::Result<()> {
        Ok(())
    }
}

/// One queue seen from the driver side. Descriptor `i` always uses buffer `i`, so a descriptor
/// index is enough to find what the device wrote.
struct DriverQueue<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    mem: &'a GuestMemoryMmap,
    buffers: u64,
    next_desc: u16,
    used_seen: u16,
}

impl<'a> DriverQueue<'a> {
    fn new(mem: &'a GuestMemoryMmap, ring: u64, buffers: u64) -> Self {
        DriverQueue {
            mock: MockSplitQueue::create(mem, GuestAddress(ring), QSIZE),
            mem,
            buffers,
            next_desc: 0,
            used_seen: 0,
        }
    }

    fn buf_addr(&self, desc: u16) -> GuestAddress {
        GuestAddress(self.buffers + u64::from(desc) * BUF_SIZE)
    }

    /// Makes one chain of descriptors from `(contents, writable size)` parts and offers it.
    fn offer(&mut self, parts: &[(&[u8], u32)], writable: bool) -> u16 {
        if self.next_desc as usize + parts.len() > QSIZE as usize {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        let mut descs = Vec::new();
        for (i, (bytes, len)) in parts.iter().enumerate() {
            let idx = head + i as u16;
            let addr = self.buf_addr(idx);
            self.mem.write_slice(bytes, addr).unwrap();
            let mut flags = if writable { F_WRITE } else { 0 };
            if i + 1 < parts.len() {
                flags |= F_NEXT;
            }
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                addr.0,
                *len,
                flags,
                idx + 1,
            )));
        }
        self.mock.add_desc_chains(&descs, head).unwrap();
        self.next_desc += parts.len() as u16;
        head
    }

    fn pop_used(&mut self) -> Option<(u16, u32)> {
        if self.mock.used().idx().load() == self.used_seen {
            return None;
        }
        let elem = self
            .mock
            .used()
            .ring()
            .ref_at((self.used_seen % QSIZE) as usize)
            .unwrap()
            .load();
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((elem.id() as u16, elem.len()))
    }
}

struct TestGuest<'a> {
    mem: &'a GuestMemoryMmap,
    rx: DriverQueue<'a>,
    tx: DriverQueue<'a>,
    ev: DriverQueue<'a>,
    kicks: Vec<EventFd>,
    interrupt: Arc<CountingInterrupt>,
    irq_poll: Epoll,
}

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

impl<'a> TestGuest<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let interrupt = Arc::new(CountingInterrupt {
            used: AtomicUsize::new(0),
            evt: EventFd::new(EFD_NONBLOCK).unwrap(),
        });
        let irq_poll = Epoll::new().unwrap();
        irq_poll
            .ctl(
                ControlOperation::Add,
                interrupt.evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .unwrap();
        TestGuest {
            mem,
            rx: DriverQueue::new(mem, 0x0, 0x10_0000),
            tx: DriverQueue::new(mem, 0x1_0000, 0x20_0000),
            ev: DriverQueue::new(mem, 0x2_0000, 0x30_0000),
            kicks: (0..3)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
            interrupt,
            irq_poll,
        }
    }

    /// What the transport hands the device at DRIVER_OK.
    fn activate(&mut self, dev: &mut Vsock) {
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues: vec![
                self.rx.mock.create_queue().unwrap(),
                self.tx.mock.create_queue().unwrap(),
                self.ev.mock.create_queue().unwrap(),
            ],
            queue_events: self.kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
            interrupt: self.interrupt.clone(),
        };
        dev.activate(ctx).unwrap();
        for _ in 0..16 {
            self.rx.offer(&[(&[], BUF_SIZE as u32)], true);
        }
        self.kick(RXQ);
    }

    fn kick(&self, queue: usize) {
        self.kicks[queue].write(1).unwrap();
    }

    fn wait_interrupt(&self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out waiting for the device");
        let mut events = [EpollEvent::default(); 1];
        self.irq_poll
            .wait(left.as_millis() as i32 + 1, &mut events)
            .unwrap();
        let _ = self.interrupt.evt.read();
    }

    fn send(&mut self, hdr: VsockHeader, data: &[u8]) {
        let hdr = VsockHeader {
            len: data.len() as u32,
            ..hdr
        };
        let raw = hdr.encode();
        // Header and data in separate descriptors, as Linux lays them out.
        if data.is_empty() {
            self.tx.offer(&[(&raw, HDR_SIZE as u32)], false);
        } else {
            self.tx
                .offer(&[(&raw, HDR_SIZE as u32), (data, data.len() as u32)], false);
        }
        self.kick(TXQ);
    }

    /// The next packet the device put on the rx queue; the buffer goes back to the queue.
    fn recv(&mut self) -> (VsockHeader, Vec<u8>) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some((desc, len)) = self.rx.pop_used() {
                let addr = self.rx.buf_addr(desc);
                let mut raw = [0u8; HDR_SIZE];
                self.mem.read_slice(&mut raw, addr).unwrap();
                let hdr = VsockHeader::decode(&raw);
                assert_eq!(len as usize, HDR_SIZE + hdr.len as usize);
                let mut data = vec![0u8; hdr.len as usize];
                self.mem
                    .read_slice(&mut data, addr.unchecked_add(HDR_SIZE as u64))
                    .unwrap();
                self.rx.offer(&[(&[], BUF_SIZE as u32)], true);
                self.kick(RXQ);
                return (hdr, data);
            }
            self.wait_interrupt(deadline);
        }
    }

    fn wait_tx_used(&mut self, count: usize) {
        let deadline = Instant::now() + DEADLINE;
        let mut seen = 0;
        while seen < count {
            if self.tx.pop_used().is_some() {
                seen += 1;
            } else {
                self.wait_interrupt(deadline);
            }
        }
    }
}

/// A vsock device on a Unix socket in a fresh directory, activated by a test guest on `mem`.
fn active_device(
    mem: &GuestMemoryMmap,
) -> (tempfile::TempDir, std::path::PathBuf, Vsock, TestGuest<'_>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let mut dev = Vsock::new(GUEST_CID, path.clone()).unwrap();
    let mut guest = TestGuest::new(mem);
    guest.activate(&mut dev);
    (dir, path, dev, guest)
}

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
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

fn host_client(path: &std::path::Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap()
}

/// A host client asks for guest port 52 and the guest accepts; returns the host port.
fn connect_from_host(guest: &mut TestGuest, path: &std::path::Path) -> (UnixStream, u32) {
    let mut host = host_client(path);
    host.write_all(b"CONNECT 52\n").unwrap();
    let (req, _) = guest.recv();
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(req.dst_port, 52);
    let local = req.src_port;
    guest.send(guest_hdr(OP_RESPONSE, 52, local), &[]);
    assert_eq!(read_line(&mut host), format!("OK {local}"));
    (host, local)
}

#[test]
fn config_and_features() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = Vsock::new(0x1_0203, dir.path().join("v.sock")).unwrap();
    assert_eq!(dev.device_type(), TYPE_VSOCK);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(dev.avail_features(), VIRTIO_F_VERSION_1);
    dev.set_acked_features(u64::MAX);
    assert_eq!(dev.acked_features, VIRTIO_F_VERSION_1);

    let mut all = [0xaau8; 8];
    dev.read_config(0, &mut all);
    assert_eq!(u64::from_le_bytes(all), 0x1_0203);
    let mut mid = [0u8; 2];
    dev.read_config(1, &mut mid);
    assert_eq!(mid, [0x02, 0x01]);
    let mut past = [0xaau8; 4];
    dev.read_config(6, &mut past);
    assert_eq!(past, [0, 0, 0, 0]);
    dev.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0, 0, 0, 0]);

    assert!(matches!(
        Vsock::new(2, dir.path().join("w.sock")),
        Err(VsockError::InvalidCid(2))
    ));
    assert!(matches!(
        Vsock::new(GUEST_CID, dir.path().join("v.sock")),
        Err(VsockError::SocketInUse(_))
    ));
}

#[test]
fn host_initiated_connection_moves_data_both_ways_and_closes() {
    let mem = guest_memory();
    let (_dir, path, mut dev, mut guest) = active_device(&mem);

    let (mut host, local) = connect_from_host(&mut guest, &path);

    host.write_all(b"hello from the host").unwrap();
    let (hdr, data) = guest.recv();
    assert_eq!((hdr.op, hdr.src_port, hdr.dst_port), (OP_RW, local, 52));
    assert_eq!(data, b"hello from the host");

    guest.send(guest_hdr(OP_RW, 52, local), b"hello from the guest");
    let mut buf = [0u8; 20];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello from the guest");

    // More than one rx buffer's worth goes out in several packets, in order.
    let big: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
    host.write_all(&big).unwrap();
    let mut got = Vec::new();
    while got.len() < big.len() {
        let (hdr, data) = guest.recv();
        assert_eq!(hdr.op, OP_RW);
        assert!(data.len() <= BUF_SIZE as usize - HDR_SIZE);
        got.extend(data);
    }
    assert_eq!(got, big);

    // The host client goes away: a full SHUTDOWN, the guest answers RST.
    drop(host);
    let (hdr, _) = guest.recv();
    assert_eq!(hdr.op, OP_SHUTDOWN);
    assert_eq!(hdr.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    guest.send(guest_hdr(OP_RST, 52, local), &[]);
    guest.wait_tx_used(3);
    assert!(guest.interrupt.used.load(Ordering::SeqCst) > 0);

    assert!(dev.reset());
    assert_eq!(dev.muxer.as_ref().map(|m| m.connection_count()), Some(0));
}

#[test]
fn host_connect_refused_by_guest_closes_host_stream() {
    let mem = guest_memory();
    let (_dir, path, _dev, mut guest) = active_device(&mem);

    let mut host = host_client(&path);
    host.write_all(b"CONNECT 52\n").unwrap();
    let (req, _) = guest.recv();
    // Nothing listens on port 52 in the guest.
    guest.send(guest_hdr(OP_RST, 52, req.src_port), &[]);
    let mut buf = [0u8; 8];
    assert_eq!(host.read(&mut buf).unwrap(), 0);

    // A malformed handshake line closes the client too.
    let mut host = host_client(&path);
    host.write_all(b"HELLO\n").unwrap();
    assert_eq!(host.read(&mut buf).unwrap(), 0);
}

#[test]
fn guest_initiated_connection_and_refusal() {
    let mem = guest_memory();
    let (dir, _path, _dev, mut guest) = active_device(&mem);

    let listener = UnixListener::bind(dir.path().join("v.sock_1234")).unwrap();
    guest.send(guest_hdr(OP_REQUEST, 5000, 1234), &[]);
    let (hdr, _) = guest.recv();
    assert_eq!(
        (hdr.op, hdr.src_port, hdr.dst_port),
        (OP_RESPONSE, 1234, 5000)
    );
    assert_eq!((hdr.src_cid, hdr.dst_cid), (HOST_CID, GUEST_CID));
    let (mut server, _) = listener.accept().unwrap();
    server.set_read_timeout(Some(DEADLINE)).unwrap();

    guest.send(guest_hdr(OP_RW, 5000, 1234), b"ping");
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    server.write_all(b"pong").unwrap();
    let (hdr, data) = guest.recv();
    assert_eq!((hdr.op, data.as_slice()), (OP_RW, &b"pong"[..]));

    // The guest half-closes: the host reads EOF after the data.
    let mut shut = guest_hdr(OP_SHUTDOWN, 5000, 1234);
    shut.flags = SHUTDOWN_SEND;
    guest.send(shut, &[]);
    assert_eq!(server.read(&mut buf).unwrap(), 0);

    // Nothing listens on <uds>_999: RST.
    guest.send(guest_hdr(OP_REQUEST, 5001, 999), &[]);
    let (hdr, _) = guest.recv();
    assert_eq!((hdr.op, hdr.src_port, hdr.dst_port), (OP_RST, 999, 5001));
}

#[test]
fn malformed_tx_is_dropped_and_device_survives_reset() {
    let mem = guest_memory();
    let (_dir, path, mut dev, mut guest) = active_device(&mem);

    // Too short to hold a header, then a header claiming more data than its chain has.
    guest.tx.offer(&[(&[1, 2, 3], 3)], false);
    let mut lying = guest_hdr(OP_RW, 1, 2);
    lying.len = 4000;
    guest.tx.offer(&[(&lying.encode(), HDR_SIZE as u32)], false);
    guest.kick(TXQ);
    guest.wait_tx_used(2);

    // Still working: a request to a missing socket is refused.
    guest.send(guest_hdr(OP_REQUEST, 7, 999), &[]);
    assert_eq!(guest.recv().0.op, OP_RST);

    // Reset, then the driver sets the device up again with fresh queues.
    assert!(dev.reset());
    let mem2 = guest_memory();
    let mut guest2 = TestGuest::new(&mem2);
    guest2.activate(&mut dev);
    let (_host, _) = connect_from_host(&mut guest2, &path);
}

#[test]
fn transport_reset_drops_connections_and_notifies_the_guest() {
    let mem = guest_memory();
    let (_dir, path, dev, mut guest) = active_device(&mem);
    let handle = dev.handle();
    let (mut host, _) = connect_from_host(&mut guest, &path);

    let event_buf = guest.ev.offer(&[(&[0xff; 4], 4)], true);
    guest.kick(EVQ);
    handle.transport_reset().unwrap();

    let deadline = Instant::now() + DEADLINE;
    let (desc, len) = loop {
        if let Some(used) = guest.ev.pop_used() {
            break used;
        }
        guest.wait_interrupt(deadline);
    };
    assert_eq!((desc, len), (event_buf, 4));
    let id: u32 = mem.read_obj(guest.ev.buf_addr(desc)).unwrap();
    assert_eq!(id, 0);

    // The host side of the dropped connection sees it closed.
    let mut buf = [0u8; 8];
    assert_eq!(host.read(&mut buf).unwrap(), 0);
    // The guest handled the reset: it gives the event buffer back. New connections work.
    guest.ev.offer(&[(&[0xff; 4], 4)], true);
    guest.kick(EVQ);
    let (_host, _) = connect_from_host(&mut guest, &path);
}

/// Delivers a transport reset and waits until the guest has it.
fn deliver_transport_reset(guest: &mut TestGuest, handle: &VsockHandle) {
    guest.ev.offer(&[(&[0xff; 4], 4)], true);
    guest.kick(EVQ);
    handle.transport_reset().unwrap();
    let deadline = Instant::now() + DEADLINE;
    while guest.ev.pop_used().is_none() {
        guest.wait_interrupt(deadline);
    }
}

/// Whether an rx buffer comes back used within `window`.
fn rx_used_within(guest: &mut TestGuest, window: Duration) -> bool {
    let deadline = Instant::now() + window;
    loop {
        if guest.rx.mock.used().idx().load() != guest.rx.used_seen {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let mut events = [EpollEvent::default(); 1];
        let _ = guest
            .irq_poll
            .wait(left.as_millis() as i32 + 1, &mut events);
        let _ = guest.interrupt.evt.read();
    }
}

#[test]
fn host_connections_wait_until_the_guest_handled_a_transport_reset() {
    let mem = guest_memory();
    let (_dir, path, dev, mut guest) = active_device(&mem);
    let handle = dev.handle();
    deliver_transport_reset(&mut guest, &handle);

    // A host client connects before the guest has handled the reset: its request is held back
    // (delivered now, the guest's reset would kill the new connection without a word).
    let mut host = host_client(&path);
    host.write_all(b"CONNECT 52\n").unwrap();
    assert!(
        !rx_used_within(&mut guest, Duration::from_millis(500)),
        "a packet reached the guest before it acknowledged the reset"
    );

    // The guest's driver refills the event queue and kicks it once the reset is done.
    guest.ev.offer(&[(&[0xff; 4], 4)], true);
    guest.kick(EVQ);
    let (req, _) = guest.recv();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 52));
    guest.send(guest_hdr(OP_RESPONSE, 52, req.src_port), &[]);
    assert_eq!(read_line(&mut host), format!("OK {}", req.src_port));
}

#[test]
fn a_guest_that_never_acknowledges_a_reset_still_gets_connections() {
    let mem = guest_memory();
    let (_dir, path, dev, mut guest) = active_device(&mem);
    let handle = dev.handle();
    deliver_transport_reset(&mut guest, &handle);
    // No acknowledgement: after the device's grace period the request goes through anyway.
    let started = Instant::now();
    let (_host, _) = connect_from_host(&mut guest, &path);
    assert!(started.elapsed() >= RESET_ACK_TIMEOUT - Duration::from_millis(100));
}

#[test]
fn host_data_respects_guest_credit_and_early_bytes_survive_the_handshake() {
    let mem = guest_memory();
    let (_dir, path, _dev, mut guest) = active_device(&mem);

    // The client does not wait for OK before sending: those bytes are connection data.
    let mut host = host_client(&path);
    host.write_all(b"CONNECT 52\nearly").unwrap();
    let (req, _) = guest.recv();
    let local = req.src_port;
    // The guest has room for 100 bytes only.
    let mut resp = guest_hdr(OP_RESPONSE, 52, local);
    resp.buf_alloc = 100;
    guest.send(resp, &[]);
    assert_eq!(read_line(&mut host), format!("OK {local}"));

    host.write_all(&[b'x'; 295]).unwrap();
    let mut got = Vec::new();
    let mut asked = false;
    while got.len() < 100 || !asked {
        let (hdr, data) = guest.recv();
        match hdr.op {
            OP_RW => got.extend(data),
            OP_CREDIT_REQUEST => asked = true,
            op => panic!("unexpected op {op}"),
        }
    }
    assert_eq!(got.len(), 100, "sent beyond the guest's credit");
    assert!(got.starts_with(b"early"));

    // The guest consumed everything: the rest flows.
    let mut update = guest_hdr(OP_CREDIT_UPDATE, 52, local);
    update.buf_alloc = 1000;
    update.fwd_cnt = 100;
    guest.send(update, &[]);
    while got.len() < 300 {
        let (hdr, data) = guest.recv();
        assert_eq!(hdr.op, OP_RW);
        got.extend(data);
    }
    assert_eq!(got.len(), 300);
}
