//! The virtio-mmio transport (virtio spec 4.2, version 2 register layout). It owns the registers,
//! the queues' configuration and the interrupt status; the device behind it only sees activate and
//! reset.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateContext, GuestMemory, Interrupt, VirtioDevice};
use crate::vmm::devices::bus::BusDevice;

const MMIO_MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;

/// Interrupt status bits.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// Device status bits (virtio spec 2.1).
const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;

/// Register offsets.
pub const REG_QUEUE_NOTIFY: u64 = 0x50;
const REG_CONFIG: u64 = 0x100;

/// The interrupt line of one device: a status word the driver reads and acks, and the irqfd.
pub struct IrqInterrupt {
    pub status: AtomicU32,
    pub irqfd: EventFd,
}

impl IrqInterrupt {
    fn raise(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irqfd.write(1)
    }
}

impl Interrupt for IrqInterrupt {
    fn notify_used(&self) -> io::Result<()> {
        self.raise(INT_USED_RING)
    }

    fn notify_config(&self) -> io::Result<()> {
        self.raise(INT_CONFIG)
    }
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    interrupt: Arc<IrqInterrupt>,
    status: u32,
    features_select: u32,
    acked_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irqfd: EventFd,
    ) -> io::Result<MmioTransport> {
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(|e| io::Error::other(format!("queue: {e:?}")))?);
            queue_events.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            queues,
            queue_events,
            interrupt: Arc::new(IrqInterrupt {
                status: AtomicU32::new(0),
                irqfd,
            }),
            status: 0,
            features_select: 0,
            acked_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The eventfds to register as ioeventfds at `base + REG_QUEUE_NOTIFY`, one per queue index.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    pub fn interrupt(&self) -> &Arc<IrqInterrupt> {
        &self.interrupt
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        // Queue configuration is only writable before the driver is done.
        if self.status & STATUS_DRIVER_OK != 0 {
            tracing::warn!("virtio-mmio: queue configured after DRIVER_OK; ignored");
            return;
        }
        if let Some(q) = self.selected_queue() {
            f(q)
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => MMIO_MAGIC_VALUE,
            0x04 => MMIO_VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => {
                let features = self.device.avail_features();
                match self.features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status.load(Ordering::SeqCst),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => {
                tracing::debug!(offset, "virtio-mmio: read of an unknown register");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            0x14 => self.features_select = value,
            0x20 => {
                let shift = match self.acked_features_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                self.acked_features |= u64::from(value) << shift;
            }
            0x24 => self.acked_features_select = value,
            0x30 => self.queue_select = value,
            0x38 => self.with_queue(|q| q.set_size(value as u16)),
            0x44 => self.with_queue(|q| q.set_ready(value == 1)),
            0x50 => {
                // Normally an ioeventfd catches this write before it becomes an exit.
                if let Some(evt) = self.queue_events.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            0x64 => {
                self.interrupt.status.fetch_and(!value, Ordering::SeqCst);
            }
            0x70 => self.set_status(value),
            0x80 => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            0x84 => self.with_queue(|q| q.set_desc_table_address(None, Some(value))),
            0x90 => self.with_queue(|q| q.set_avail_ring_address(Some(value), None)),
            0x94 => self.with_queue(|q| q.set_avail_ring_address(None, Some(value))),
            0xa0 => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            0xa4 => self.with_queue(|q| q.set_used_ring_address(None, Some(value))),
            _ => tracing::debug!(offset, value, "virtio-mmio: write to an unknown register"),
        }
    }

    fn set_status(&mut self, status: u32) {
        if status == 0 {
            self.reset();
            return;
        }
        let newly = status & !self.status;
        self.status = status;
        if newly & STATUS_FEATURES_OK != 0 {
            self.device.set_acked_features(self.acked_features);
        }
        if newly & STATUS_DRIVER_OK != 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let ready = self
            .queues
            .iter()
            .all(|q| !q.ready() || q.is_valid(&self.mem));
        if !ready {
            tracing::warn!("virtio-mmio: invalid queue configuration at DRIVER_OK");
            self.status |= STATUS_FAILED;
            return;
        }
        let queue_events = match self
            .queue_events
            .iter()
            .map(|e| e.try_clone())
            .collect::<io::Result<Vec<_>>>()
        {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "virtio-mmio: cannot clone queue events");
                self.status |= STATUS_FAILED;
                return;
            }
        };
        let queues = match self
            .queues
            .iter()
            .map(copy_queue)
            .collect::<io::Result<Vec<_>>>()
        {
            Ok(q) => q,
            Err(e) => {
                tracing::error!(error = %e, "virtio-mmio: cannot hand over the queues");
                self.status |= STATUS_FAILED;
                return;
            }
        };
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
        };
        match self.device.activate(ctx) {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::error!(error = %e, "virtio device activation failed");
                self.status |= STATUS_NEEDS_RESET;
                let _ = self.interrupt.notify_config();
            }
        }
    }

    fn reset(&mut self) {
        if self.activated && !self.device.reset() {
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        self.activated = false;
        self.status = 0;
        self.features_select = 0;
        self.acked_features_select = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        self.interrupt.status.store(0, Ordering::SeqCst);
        for q in &mut self.queues {
            q.reset();
        }
    }

    /// Stops the device's processing for a snapshot; the live queue positions come back into the
    /// transport so that `save_state` records them. `resume_device` starts it again.
    pub fn quiesce(&mut self) {
        if !self.activated {
            return;
        }
        match self.device.quiesce() {
            Some(queues) => {
                self.queues = queues;
                self.activated = false;
            }
            None => tracing::warn!("virtio-mmio: device could not be quiesced"),
        }
    }

    /// Activates the device again after `quiesce` (or after a restore) if the driver had set it up.
    pub fn resume_device(&mut self) {
        if !self.activated && self.driver_ok() {
            self.activate();
        }
    }

    pub fn save_state(&self) -> MmioTransportState {
        MmioTransportState {
            status: self.status,
            features_select: self.features_select,
            acked_features_select: self.acked_features_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status.load(Ordering::SeqCst),
            queues: self.queues.iter().map(QueueState::of).collect(),
        }
    }

    /// A transport in the saved state; call `resume_device` to start the device.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irqfd: EventFd,
        state: &MmioTransportState,
    ) -> io::Result<MmioTransport> {
        let mut t = MmioTransport::new(device, mem, irqfd)?;
        if state.queues.len() != t.queues.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "snapshot has {} queues for a device with {}",
                    state.queues.len(),
                    t.queues.len()
                ),
            ));
        }
        for (q, saved) in t.queues.iter_mut().zip(&state.queues) {
            saved.apply(q);
        }
        t.status = state.status;
        t.features_select = state.features_select;
        t.acked_features_select = state.acked_features_select;
        t.acked_features = state.acked_features;
        t.queue_select = state.queue_select;
        t.config_generation = state.config_generation;
        t.interrupt
            .status
            .store(state.interrupt_status, Ordering::SeqCst);
        if state.status & STATUS_FEATURES_OK != 0 {
            t.device.set_acked_features(state.acked_features);
        }
        Ok(t)
    }

    /// The driver-visible status (for tests and snapshots).
    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// True when the driver went through the whole init sequence.
    pub fn driver_ok(&self) -> bool {
        self.status & (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
            == (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
    }
}

/// A queue's configuration and positions, as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl QueueState {
    pub fn of(q: &Queue) -> QueueState {
        QueueState {
            max_size: q.max_size(),
            size: q.size(),
            ready: q.ready(),
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            event_idx: q.event_idx_enabled(),
        }
    }

    /// Configures `q` (created with the same max size) like the saved queue.
    pub fn apply(&self, q: &mut Queue) {
        q.set_size(self.size);
        let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
        let (lo, hi) = split(self.desc_table);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail_ring);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used_ring);
        q.set_used_ring_address(lo, hi);
        q.set_next_avail(self.next_avail);
        q.set_next_used(self.next_used);
        q.set_event_idx(self.event_idx);
        q.set_ready(self.ready);
    }
}

/// The transport's registers and queues, as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioTransportState {
    pub status: u32,
    pub features_select: u32,
    pub acked_features_select: u32,
    pub acked_features: u64,
    pub queue_select: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueState>,
}

/// A queue with the same configuration (the device gets its own; `Queue` is not `Clone`).
fn copy_queue(q: &Queue) -> io::Result<Queue> {
    let mut copy =
        Queue::new(q.max_size()).map_err(|e| io::Error::other(format!("queue: {e:?}")))?;
    QueueState::of(q).apply(&mut copy);
    Ok(copy)
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: register read not 32-bit"
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            self.device.write_config(offset - REG_CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: register write not 32-bit"
            );
            return;
        };
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[derive(Default)]
    struct Seen {
        acked: u64,
        activated: usize,
        resets: usize,
    }

    struct FakeDevice(Arc<Mutex<Seen>>);

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            19
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn avail_features(&self) -> u64 {
            super::super::VIRTIO_F_VERSION_1 | 1
        }
        fn set_acked_features(&mut self, features: u64) {
            self.0.lock().unwrap().acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 0x40);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), super::super::DeviceError> {
            assert_eq!(ctx.queues.len(), 2);
            self.0.lock().unwrap().activated += 1;
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.0.lock().unwrap().resets += 1;
            true
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Seen>>) {
        let mem: GuestMemory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let t = MmioTransport::new(
            Box::new(FakeDevice(seen.clone())),
            mem,
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        )
        .unwrap();
        (t, seen)
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    #[test]
    fn identifies_itself_and_negotiates_features() {
        let (mut t, seen) = transport();
        assert_eq!(rd(&mut t, 0), MMIO_MAGIC_VALUE);
        assert_eq!(rd(&mut t, 4), 2);
        assert_eq!(rd(&mut t, 8), 19);
        wr(&mut t, 0x14, 1);
        assert_eq!(rd(&mut t, 0x10), 1, "VERSION_1 in the high word");
        wr(&mut t, 0x14, 0);
        assert_eq!(rd(&mut t, 0x10), 1);
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 1);
        wr(&mut t, 0x24, 0);
        wr(&mut t, 0x20, 1);
        wr(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(seen.lock().unwrap().acked, (1 << 32) | 1);
    }

    #[test]
    fn configures_queues_activates_and_resets() {
        let (mut t, seen) = transport();
        wr(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        for (q, base) in [(0u32, 0x1000u32), (1, 0x4000)] {
            wr(&mut t, 0x30, q);
            assert_eq!(rd(&mut t, 0x34), 16);
            wr(&mut t, 0x38, 16);
            wr(&mut t, 0x80, base);
            wr(&mut t, 0x84, 0);
            wr(&mut t, 0x90, base + 0x100);
            wr(&mut t, 0x94, 0);
            wr(&mut t, 0xa0, base + 0x200);
            wr(&mut t, 0xa4, 0);
            wr(&mut t, 0x44, 1);
            assert_eq!(rd(&mut t, 0x44), 1);
        }
        wr(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(t.driver_ok());
        assert!(t.is_activated());
        assert_eq!(seen.lock().unwrap().activated, 1);

        // Interrupt status is set by the device side and acked by the driver.
        t.interrupt().notify_used().unwrap();
        assert_eq!(rd(&mut t, 0x60), INT_USED_RING);
        wr(&mut t, 0x64, INT_USED_RING);
        assert_eq!(rd(&mut t, 0x60), 0);

        // A kick that reaches the transport (no ioeventfd) still signals the queue's event.
        wr(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_events()[1].read().unwrap(), 1);

        // Saved state restores into an identical transport.
        let saved = t.save_state();
        let mem2: GuestMemory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let seen2 = Arc::new(Mutex::new(Seen::default()));
        let mut restored = MmioTransport::restore(
            Box::new(FakeDevice(seen2.clone())),
            mem2,
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            &saved,
        )
        .unwrap();
        assert_eq!(restored.save_state(), saved);
        assert_eq!(saved.queues[1].desc_table, 0x4000);
        restored.resume_device();
        assert!(restored.is_activated());
        assert_eq!(seen2.lock().unwrap().activated, 1);

        wr(&mut t, 0x70, 0);
        assert_eq!(seen.lock().unwrap().resets, 1);
        assert_eq!(rd(&mut t, 0x70), 0);
        assert!(!t.is_activated());
    }

    #[test]
    fn config_space_goes_to_the_device_and_odd_accesses_are_harmless() {
        let (mut t, _) = transport();
        let mut b = [0u8; 8];
        t.read(0x100, &mut b);
        assert_eq!(b, [0x40; 8]);
        let mut one = [0xffu8; 1];
        t.read(0x00, &mut one);
        assert_eq!(one, [0]);
        t.write(0x70, &[1]); // not 32-bit: ignored
        assert_eq!(rd(&mut t, 0x70), 0);
        wr(&mut t, 0x30, 7); // no such queue
        assert_eq!(rd(&mut t, 0x34), 0);
    }
}
