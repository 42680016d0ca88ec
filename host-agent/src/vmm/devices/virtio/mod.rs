//! Virtio devices and the virtio-mmio transport that presents them to the guest.
//!
//! The seam: a device implements [`VirtioDevice`]; the transport (`mmio.rs`) owns the register
//! interface and, when the driver sets DRIVER_OK, hands the device its queues, their kick eventfds
//! (ioeventfds registered with KVM) and an [`Interrupt`] to signal used buffers.

pub mod mmio;
pub mod vsock;

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Guest memory as every device sees it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// Virtio device ids (virtio spec 5).
pub const TYPE_VSOCK: u32 = 19;

/// VIRTIO_F_VERSION_1: the modern (non-legacy) interface, required for virtio-mmio version 2.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Raises a device's interrupt toward the guest.
pub trait Interrupt: Send + Sync {
    /// Marks "used buffer" in the interrupt status and signals the guest.
    fn notify_used(&self) -> io::Result<()>;
    /// Marks "configuration change" in the interrupt status and signals the guest.
    fn notify_config(&self) -> io::Result<()>;
}

/// What a device gets when the driver has finished setting it up.
pub struct ActivateContext {
    pub mem: GuestMemory,
    pub queues: Vec<virtio_queue::Queue>,
    /// One per queue, signalled when the guest kicks that queue.
    pub queue_events: Vec<EventFd>,
    pub interrupt: Arc<dyn Interrupt>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device activation failed: {0}")]
    Activate(String),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// A virtio device, independent of its transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    fn avail_features(&self) -> u64;
    fn set_acked_features(&mut self, features: u64);
    /// Reads device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device's work (its worker thread) with the queues the driver configured.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), DeviceError>;
    /// Stops the device's work and returns it to the state before activation. Returns false when
    /// the device cannot be reset (the transport then marks it as needing a reset).
    fn reset(&mut self) -> bool;
    /// Stops processing (for a snapshot) and hands back the queues with their live positions; the
    /// transport activates the device again with them to go on. `None` when the device was not
    /// active or cannot stop.
    fn quiesce(&mut self) -> Option<Vec<virtio_queue::Queue>> {
        None
    }
}
