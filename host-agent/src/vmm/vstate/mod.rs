//! The owners of KVM objects: the VM (memory slots, irqchip, PIT), the vCPUs, and guest memory.

pub mod memory;
pub mod vcpu;
pub mod vm;
