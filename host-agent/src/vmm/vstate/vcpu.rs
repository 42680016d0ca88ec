//! vCPUs: boot configuration (CPUID, MSRs, registers, FPU, LAPIC) and the run loop that dispatches
//! I/O and MMIO exits to the buses.

use std::sync::mpsc::Sender;
use std::sync::Arc;

use kvm_bindings::{
    Msrs, KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::vm::Vm;
use crate::vmm::arch::x86_64::{cpuid, interrupts, msr, regs};
use crate::vmm::devices::bus::Bus;
use crate::vmm::VmStop;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {id}: cannot {what}: {source}")]
    Setup {
        id: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
}

impl Vcpu {
    pub fn new(vm: &Vm, id: u8) -> Result<Vcpu, VcpuError> {
        let fd = vm
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Setup {
                id,
                what: "create it",
                source,
            })?;
        Ok(Vcpu { id, fd })
    }

    fn setup<T>(
        &self,
        what: &'static str,
        r: Result<T, kvm_ioctls::Error>,
    ) -> Result<T, VcpuError> {
        r.map_err(|source| VcpuError::Setup {
            id: self.id,
            what,
            source,
        })
    }

    /// CPUID, MSRs and LAPIC for every vCPU; registers for the boot vCPU only (the others wait
    /// for INIT/SIPI from the guest).
    pub fn configure(&self, vm: &Vm, count: u8, boot_entry: Option<u64>) -> Result<(), VcpuError> {
        let mut cpuid = self.setup(
            "read supported CPUID",
            vm.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
        )?;
        cpuid::for_vcpu(&mut cpuid, self.id, count);
        self.setup("set CPUID", self.fd.set_cpuid2(&cpuid))?;

        let msrs = Msrs::from_entries(&msr::boot_msrs()).map_err(|_| VcpuError::Setup {
            id: self.id,
            what: "build the MSR list",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        self.setup("set MSRs", self.fd.set_msrs(&msrs))?;

        let mut lapic = self.setup("read the LAPIC", self.fd.get_lapic())?;
        interrupts::set_lint(&mut lapic);
        self.setup("set the LAPIC", self.fd.set_lapic(&lapic))?;

        if let Some(entry) = boot_entry {
            self.setup("set registers", self.fd.set_regs(&regs::boot_regs(entry)))?;
            let sregs = self.setup("read special registers", self.fd.get_sregs())?;
            self.setup(
                "set special registers",
                self.fd.set_sregs(&regs::boot_sregs(sregs)),
            )?;
            self.setup("set the FPU", self.fd.set_fpu(&regs::boot_fpu()))?;
        }
        Ok(())
    }

    /// Runs the vCPU until the guest stops it or KVM fails.
    pub fn run(mut self, io: Arc<Bus>, mmio: Arc<Bus>) -> VmStop {
        loop {
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !io.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    io.write(u64::from(port), data);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    mmio.write(addr, data);
                }
                // With the in-kernel irqchip KVM handles HLT itself; an exit here is harmless.
                Ok(VcpuExit::Hlt) => {}
                Ok(VcpuExit::Shutdown) => return VmStop::Reset,
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    return match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => VmStop::PowerOff,
                        KVM_SYSTEM_EVENT_RESET => VmStop::Reset,
                        _ => VmStop::Reset,
                    }
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    return VmStop::Failed(format!(
                        "vCPU {}: VM entry failed (reason {reason:#x}, cpu {cpu})",
                        self.id
                    ))
                }
                Ok(VcpuExit::InternalError) => {
                    return VmStop::Failed(format!("vCPU {}: KVM internal error", self.id))
                }
                Ok(other) => {
                    tracing::debug!(id = self.id, exit = ?other, "unhandled vCPU exit");
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => return VmStop::Failed(format!("vCPU {}: KVM_RUN failed: {e}", self.id)),
            }
        }
    }

    /// Starts the run loop on its own thread; its stop reason goes to `stops`.
    pub fn spawn(
        self,
        io: Arc<Bus>,
        mmio: Arc<Bus>,
        stops: Sender<VmStop>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || {
                let stop = self.run(io, mmio);
                let _ = stops.send(stop);
            })
    }
}
