//! The virtio-vsock device: its configuration, its three virtqueues, and the worker thread that
//! moves packets between the queues and the muxer.
//!
//! The worker owns everything that changes while the device runs (queues, muxer), so nothing is
//! shared or locked: the device talks to it only through eventfds (stop, transport reset) and
//! gets the muxer back when the thread ends, so the device can be activated again after a reset
//! without giving up its listening socket.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT, Writer};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::super::{
    ActivateContext, DeviceError, GuestMemory, Interrupt, VirtioDevice, TYPE_VSOCK,
    VIRTIO_F_VERSION_1,
};
use super::muxer::{epoll_timeout_ms, Muxer};
use super::packet::{read_tx_packet, RxBuffer, EVENT_TRANSPORT_RESET};
use super::VsockError;

const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
const QUEUE_SIZES: [u16; 3] = [256; 3];

/// The vsock device, as the transport sees it.
pub struct Vsock {
    guest_cid: u64,
    acked_features: u64,
    /// The backend while no worker runs (before activation, after reset); the worker owns it
    /// otherwise.
    muxer: Option<Muxer>,
    worker: Option<WorkerHandle>,
    reset_evt: Arc<EventFd>,
    /// The queues as the last worker left them (live positions, for a snapshot).
    stopped_queues: Option<Vec<Queue>>,
}

struct WorkerHandle {
    stop: EventFd,
    /// Gives the muxer and the queues back when the worker ends.
    thread: JoinHandle<Option<(Muxer, Vec<Queue>)>>,
}

/// Asks a running vsock device to reset its transport (see [`VsockHandle::transport_reset`]).
/// Cheap to clone and usable after the device was handed to its transport.
#[derive(Clone)]
pub struct VsockHandle {
    reset_evt: Arc<EventFd>,
}

impl VsockHandle {
    /// Drops every connection and queues a VIRTIO_VSOCK_EVENT_TRANSPORT_RESET for the guest, as
    /// needed after a snapshot restore: the guest's connections point at host sockets that no
    /// longer exist, while its listeners survive. If the device is not active yet, the reset
    /// happens when it is activated.
    pub fn transport_reset(&self) -> Result<(), VsockError> {
        self.reset_evt.write(1)?;
        Ok(())
    }
}

impl Vsock {
    /// A vsock device for a guest with CID `guest_cid`, listening for host clients on
    /// `uds_path` (and connecting guest-initiated connections to `<uds_path>_<port>`).
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Vsock, VsockError> {
        // Linux keeps CIDs in 32 bits; 0-2 are the hypervisor, local and host, u32::MAX is "any".
        if guest_cid < 3 || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let muxer = Muxer::new(guest_cid, uds_path)?;
        Ok(Vsock {
            guest_cid,
            acked_features: 0,
            muxer: Some(muxer),
            worker: None,
            reset_evt: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            stopped_queues: None,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn handle(&self) -> VsockHandle {
        VsockHandle {
            reset_evt: self.reset_evt.clone(),
        }
    }

    /// See [`VsockHandle::transport_reset`].
    pub fn transport_reset(&self) -> Result<(), VsockError> {
        self.handle().transport_reset()
    }

    fn stop_worker(&mut self) -> bool {
        let Some(worker) = self.worker.take() else {
            return true;
        };
        if let Err(e) = worker.stop.write(1) {
            // Without the stop signal a join would hang; keep the worker as it is.
            tracing::error!("vsock: cannot signal the worker to stop: {e}");
            self.worker = Some(worker);
            return false;
        }
        match worker.thread.join() {
            Ok(Some((mut muxer, queues))) => {
                muxer.reset_connections();
                self.muxer = Some(muxer);
                self.stopped_queues = Some(queues);
                true
            }
            Ok(None) => {
                tracing::error!("vsock: the worker thread never started");
                false
            }
            Err(_) => {
                tracing::error!("vsock: the worker thread panicked");
                false
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    /// The configuration space is `le64 guest_cid`; bytes past it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            offset,
            len = data.len(),
            "vsock: ignoring a write to read-only config"
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), DeviceError> {
        if ctx.queues.len() != QUEUE_SIZES.len() || ctx.queue_events.len() != QUEUE_SIZES.len() {
            return Err(DeviceError::Activate(format!(
                "vsock needs {} queues, got {}",
                QUEUE_SIZES.len(),
                ctx.queues.len()
            )));
        }
        if self.worker.is_some() {
            return Err(DeviceError::Activate("vsock is already active".into()));
        }
        let Some(muxer) = self.muxer.as_ref() else {
            return Err(DeviceError::Activate(
                "vsock lost its backend (a worker panicked)".into(),
            ));
        };
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Worker::epoll_set(&ctx, muxer, &stop, &self.reset_evt)?;
        let Some(muxer) = self.muxer.take() else {
            return Err(DeviceError::Activate("vsock backend vanished".into()));
        };
        let worker = Worker {
            mem: ctx.mem,
            queues: ctx.queues,
            queue_events: ctx.queue_events,
            interrupt: ctx.interrupt,
            muxer,
            reset_evt: self.reset_evt.clone(),
            epoll,
            event_pending: false,
            reset_unacked_until: None,
            tx_stalled: false,
            used_added: false,
        };
        // The worker goes to the thread only once it runs: if the spawn fails, the device keeps
        // its muxer (and listening socket) and can be activated again.
        let (send, recv) = std::sync::mpsc::sync_channel::<Worker>(1);
        let spawned = std::thread::Builder::new()
            .name("vsock".into())
            .spawn(move || recv.recv().ok().map(Worker::run));
        let thread = match spawned {
            Ok(t) => t,
            Err(e) => {
                self.muxer = Some(worker.muxer);
                return Err(e.into());
            }
        };
        if let Err(std::sync::mpsc::SendError(worker)) = send.send(worker) {
            // The thread is alive until it receives; this is unreachable in practice.
            self.muxer = Some(worker.muxer);
            return Err(DeviceError::Activate("vsock worker did not start".into()));
        }
        self.worker = Some(WorkerHandle { stop, thread });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.acked_features = 0;
        let stopped = self.stop_worker();
        self.stopped_queues = None;
        stopped
    }

    fn quiesce(&mut self) -> Option<Vec<Queue>> {
        if self.worker.is_none() || !self.stop_worker() {
            return None;
        }
        self.stopped_queues.take()
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

/// How long the device holds host-to-guest packets back waiting for the guest to handle a
/// transport reset (see `Worker::reset_unacked_until`).
const RESET_ACK_TIMEOUT: Duration = Duration::from_secs(2);

// epoll tokens of the worker.
const TOKEN_RXQ: u64 = 0;
const TOKEN_TXQ: u64 = 1;
const TOKEN_EVQ: u64 = 2;
const TOKEN_STOP: u64 = 3;
const TOKEN_RESET: u64 = 4;
const TOKEN_MUXER: u64 = 5;

struct Worker {
    mem: GuestMemory,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    interrupt: Arc<dyn Interrupt>,
    muxer: Muxer,
    reset_evt: Arc<EventFd>,
    /// Polls the queue kicks, the reset eventfd, the muxer, and the stop eventfd (owned by the
    /// `WorkerHandle`, which is dropped only after the thread was joined).
    epoll: Epoll,
    /// A transport reset event waits for a buffer on the event queue.
    event_pending: bool,
    /// Set once a transport reset event is in the guest's hands, until the guest acknowledges it
    /// (its driver refills the event buffer and kicks the event queue after resetting its
    /// sockets), or until this deadline. Meanwhile nothing goes to the guest's rx queue: a
    /// connection request delivered before the guest handles the reset would be established and
    /// then silently reset by it, leaving the host client waiting for an answer that never comes.
    reset_unacked_until: Option<Instant>,
    /// Tx processing paused because the muxer's rx backlog is full.
    tx_stalled: bool,
    /// Used buffers added since the last interrupt.
    used_added: bool,
}

impl Worker {
    /// The worker's epoll set: the queue kicks, its control eventfds and the muxer.
    fn epoll_set(
        ctx: &ActivateContext,
        muxer: &Muxer,
        stop: &EventFd,
        reset_evt: &EventFd,
    ) -> io::Result<Epoll> {
        let epoll = Epoll::new()?;
        let sources: [(RawFd, u64); 6] = [
            (ctx.queue_events[RXQ].as_raw_fd(), TOKEN_RXQ),
            (ctx.queue_events[TXQ].as_raw_fd(), TOKEN_TXQ),
            (ctx.queue_events[EVQ].as_raw_fd(), TOKEN_EVQ),
            (stop.as_raw_fd(), TOKEN_STOP),
            (reset_evt.as_raw_fd(), TOKEN_RESET),
            (muxer.as_raw_fd(), TOKEN_MUXER),
        ];
        for (fd, token) in sources {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(epoll)
    }

    /// The event loop; returns the muxer and the queues (with their live positions) when asked to
    /// stop (or on a fatal epoll error).
    fn run(mut self) -> (Muxer, Vec<Queue>) {
        // The guest may have queued buffers before the kick we would wait for.
        self.process_queues();
        let mut events = [EpollEvent::default(); 16];
        loop {
            let next = [self.muxer.next_deadline(), self.reset_unacked_until]
                .into_iter()
                .flatten()
                .min();
            let timeout = epoll_timeout_ms(next);
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("vsock: epoll_wait failed, stopping the device: {e}");
                    return (self.muxer, self.queues);
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => return (self.muxer, self.queues),
                    TOKEN_RXQ => drain(&self.queue_events[RXQ]),
                    TOKEN_TXQ => drain(&self.queue_events[TXQ]),
                    TOKEN_EVQ => {
                        drain(&self.queue_events[EVQ]);
                        if self.reset_unacked_until.take().is_some() {
                            tracing::debug!("vsock: the guest handled the transport reset");
                        }
                    }
                    TOKEN_RESET => {
                        drain(&self.reset_evt);
                        tracing::info!("vsock: transport reset");
                        self.muxer.reset_connections();
                        self.event_pending = true;
                    }
                    TOKEN_MUXER => self.muxer.process_events(),
                    other => tracing::warn!("vsock: unexpected epoll token {other}"),
                }
            }
            // Connection deadlines, whether the wait timed out for them or not.
            self.muxer.sweep(std::time::Instant::now());
            // Every wakeup may have made progress possible on any queue (a kick, host data, a
            // freed backlog), and checking an empty queue is cheap.
            self.process_queues();
        }
    }

    fn process_queues(&mut self) {
        if let Some(until) = self.reset_unacked_until {
            if Instant::now() >= until {
                tracing::warn!(
                    "vsock: the guest did not acknowledge the transport reset within {RESET_ACK_TIMEOUT:?}; going on"
                );
                self.reset_unacked_until = None;
            }
        }
        loop {
            self.process_tx();
            if self.reset_unacked_until.is_none() {
                self.process_rx();
            }
            // Draining rx may have made room for the tx packets we held back.
            if !self.tx_stalled || self.muxer.rx_backlog_full() {
                break;
            }
        }
        self.process_evq();
        if self.used_added {
            self.used_added = false;
            if let Err(e) = self.interrupt.notify_used() {
                tracing::error!("vsock: cannot interrupt the guest: {e}");
            }
        }
    }

    fn add_used(&mut self, queue: usize, head: u16, len: u32) {
        if let Err(e) = self.queues[queue].add_used(&self.mem, head, len) {
            tracing::error!("vsock: cannot return a buffer on queue {queue}: {e}");
        }
        self.used_added = true;
    }

    /// Guest to host: every tx buffer holds one packet for the muxer.
    fn process_tx(&mut self) {
        self.tx_stalled = false;
        loop {
            if self.muxer.rx_backlog_full() {
                self.tx_stalled = true;
                return;
            }
            let Some(chain) = self.queues[TXQ].pop_descriptor_chain(&self.mem) else {
                return;
            };
            let head = chain.head_index();
            match read_tx_packet(&self.mem, chain) {
                Ok(pkt) => self.muxer.send_pkt(&pkt),
                Err(e) => tracing::warn!("vsock: dropping a malformed tx packet: {e}"),
            }
            self.add_used(TXQ, head, 0);
        }
    }

    /// Host to guest: fill rx buffers while the muxer has packets.
    fn process_rx(&mut self) {
        while self.muxer.has_pending_rx() {
            let Some(chain) = self.queues[RXQ].pop_descriptor_chain(&self.mem) else {
                // Wait for the guest to add buffers (an rx kick).
                return;
            };
            let head = chain.head_index();
            let buf = match RxBuffer::new(&self.mem, chain) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!("vsock: dropping a malformed rx buffer: {e}");
                    self.add_used(RXQ, head, 0);
                    continue;
                }
            };
            let Some((hdr, data)) = self.muxer.recv_pkt(buf.data_capacity()) else {
                // Nothing after all: give the buffer back for next time.
                self.queues[RXQ].go_to_previous_position();
                return;
            };
            let len = match buf.write(&hdr, &data) {
                Ok(len) => len,
                Err(e) => {
                    // Cannot happen with the capacity we passed; the packet is lost, so say so.
                    tracing::error!("vsock: cannot write an rx packet: {e}");
                    0
                }
            };
            self.add_used(RXQ, head, len);
        }
    }

    /// Delivers a pending transport reset event (`le32 id`).
    fn process_evq(&mut self) {
        while self.event_pending {
            let Some(chain) = self.queues[EVQ].pop_descriptor_chain(&self.mem) else {
                return;
            };
            let head = chain.head_index();
            let written = Writer::new(&self.mem, chain)
                .map_err(io::Error::other)
                .and_then(|mut w: Writer<'_>| {
                    w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes())?;
                    Ok(w.bytes_written())
                });
            match written {
                Ok(n) => {
                    self.event_pending = false;
                    self.reset_unacked_until = Some(Instant::now() + RESET_ACK_TIMEOUT);
                    self.add_used(EVQ, head, n as u32);
                }
                Err(e) => {
                    tracing::warn!("vsock: dropping a malformed event buffer: {e}");
                    self.add_used(EVQ, head, 0);
                }
            }
        }
    }
}

/// Clears an eventfd's counter (the kick it reports is handled by processing the queue).
fn drain(evt: &EventFd) {
    if let Err(e) = evt.read() {
        if e.kind() != io::ErrorKind::WouldBlock {
            tracing::warn!("vsock: cannot read an eventfd: {e}");
        }
    }
}

#[cfg(test)]
mod tests;
