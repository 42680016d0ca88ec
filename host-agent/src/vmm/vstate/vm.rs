//! The KVM VM: created with an in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT, and guest memory
//! registered as memory slots.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::memory::GuestMemory;
use crate::vmm::layout::KVM_TSS_ADDRESS;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and accessible?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("cannot create the VM: {0}")]
    Create(kvm_ioctls::Error),
    #[error("cannot set up {what}: {source}")]
    Setup {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// The VM-wide KVM state a snapshot carries: the interrupt controllers, the PIT and kvmclock.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
}

impl Vm {
    pub fn new() -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        let setup = |what| move |source| VmError::Setup { what, source };
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(setup("the TSS address"))?;
        fd.create_irq_chip()
            .map_err(setup("the in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(setup("the PIT"))?;
        Ok(Vm { kvm, fd })
    }

    pub fn save_state(&self) -> Result<VmState, VmError> {
        let setup = |what| move |source| VmError::Setup { what, source };
        let chip = |id| {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map(|()| c)
                .map_err(setup("read the irqchip"))
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(setup("read the PIT"))?,
            clock: self.fd.get_clock().map_err(setup("read kvmclock"))?,
        })
    }

    /// Sets the saved VM state: PIT, kvmclock (its flags are only meaningful on the source, KVM
    /// refuses them on set), then the PICs and the IOAPIC.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        let setup = |what| move |source| VmError::Setup { what, source };
        self.fd
            .set_pit2(&state.pit)
            .map_err(setup("restore the PIT"))?;
        let mut clock = state.clock;
        clock.flags = 0;
        self.fd
            .set_clock(&clock)
            .map_err(setup("restore kvmclock"))?;
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd
                .set_irqchip(chip)
                .map_err(setup("restore the irqchip"))?;
        }
        Ok(())
    }

    /// Registers every region of `mem` as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemory) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the VM keeps (through the
            // devices and the VMM) for as long as the VM exists; KVM maps exactly its length.
            unsafe { self.fd.set_user_memory_region(desc) }.map_err(|source| VmError::Setup {
                what: "a guest memory slot",
                source,
            })?;
        }
        Ok(())
    }
}
