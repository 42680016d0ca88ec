//! The VMM: a KVM virtual machine that boots a stock Linux bzImage with an initramfs, with a serial
//! console, virtio-mmio devices described through ACPI, and virtio-vsock to reach envd.
//!
//! Shaped like Firecracker's `vmm`: `arch/` computes boot state, `vstate/` owns KVM objects,
//! `devices/` holds the device models, `builder.rs` assembles a VM from a config.

pub mod acpi;
pub mod anchor;
pub mod arch;
pub mod builder;
pub mod devices;
pub mod layout;
pub mod persist;
pub mod snapshot;
pub mod vstate;
pub mod working_set;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmStop {
    /// The guest powered off (ACPI S5 or a KVM shutdown event).
    PowerOff,
    /// The guest asked for a reset (i8042 pulse, KVM reset event, or a panic with `panic=-1`).
    Reset,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN): the guest crashed. Carries where it was.
    TripleFault(String),
    /// KVM reported a failure the guest cannot recover from.
    Failed(String),
}
