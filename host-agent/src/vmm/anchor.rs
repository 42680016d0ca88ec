//! The physical-limit anchor for benchmarks: the KVM work every VM start pays with no guest work at
//! all (create a VM with irqchip and PIT, map and register memory, create and configure one vCPU).

use super::vstate::memory;
use super::vstate::vcpu::Vcpu;
use super::vstate::vm::Vm;

#[derive(Debug, thiserror::Error)]
#[error("anchor VM: {0}")]
pub struct AnchorError(String);

/// Creates and drops a 64 MiB VM with one vCPU in its boot state.
pub fn create_vm_with_vcpu() -> Result<(), AnchorError> {
    let err = |e: &dyn std::fmt::Display| AnchorError(e.to_string());
    let vm = Vm::new().map_err(|e| err(&e))?;
    let (mem, _mappings) = memory::create(memory::MIN_MEM_MIB).map_err(|e| err(&e))?;
    vm.register_memory(&mem).map_err(|e| err(&e))?;
    let vcpu = Vcpu::new(&vm, 0).map_err(|e| err(&e))?;
    vcpu.configure(&vm, 1, Some(0x100_0200))
        .map_err(|e| err(&e))?;
    Ok(())
}
