//! Devices the guest sees: a bus of port-I/O and MMIO devices, the legacy ones (serial, i8042 reset,
//! ACPI sleep control), and virtio devices behind the virtio-mmio transport.

pub mod bus;
pub mod legacy;
pub mod serial;
pub mod virtio;
