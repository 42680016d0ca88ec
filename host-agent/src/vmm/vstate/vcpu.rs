//! vCPUs: boot configuration (CPUID, MSRs, registers, FPU, LAPIC) and the run loop that dispatches
//! I/O and MMIO exits to the buses.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

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
    #[error("vCPU {id}: KVM set {set} of {total} MSRs; MSR {index:#x} was refused")]
    MsrRestore {
        id: u8,
        set: usize,
        total: usize,
        index: u32,
    },
    #[error("vCPU {0}: the vCPU thread is gone")]
    ThreadGone(u8),
    #[error("vCPU {0}: did not pause within {1:?}")]
    PauseTimeout(u8, Duration),
    #[error("cannot start vCPU {0}'s thread: {1}")]
    Spawn(u8, std::io::Error),
}

/// Everything KVM holds for one vCPU, as saved in a snapshot.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub vcpu_events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

/// How many MSRs go in one KVM_GET_MSRS call.
const MSR_CHUNK: usize = 64;

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
        let tsc_deadline = vm.kvm.check_extension(Cap::TscDeadlineTimer);
        cpuid::for_vcpu(&mut cpuid, self.id, count, tsc_deadline);
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

    /// Reads every piece of vCPU state. `msr_indices` are the MSRs KVM can save (from the
    /// system's index list); any KVM refuses to read are skipped.
    pub fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
        let cpuid = self.setup("read CPUID", self.fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES))?;
        Ok(VcpuState {
            id: self.id,
            cpuid: cpuid.as_slice().to_vec(),
            msrs: self.save_msrs(msr_indices)?,
            regs: self.setup("read registers", self.fd.get_regs())?,
            sregs: self.setup("read special registers", self.fd.get_sregs())?,
            xsave: self.setup("read XSAVE state", self.fd.get_xsave())?,
            xcrs: self.setup("read XCRs", self.fd.get_xcrs())?,
            debug_regs: self.setup("read debug registers", self.fd.get_debug_regs())?,
            lapic: self.setup("read the LAPIC", self.fd.get_lapic())?,
            mp_state: self.setup("read the MP state", self.fd.get_mp_state())?,
            vcpu_events: self.setup("read vCPU events", self.fd.get_vcpu_events())?,
            tsc_khz: self.fd.get_tsc_khz().ok(),
        })
    }

    fn save_msrs(&self, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
        let mut saved = Vec::with_capacity(indices.len());
        let mut rest = indices;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(MSR_CHUNK)];
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Setup {
                id: self.id,
                what: "build the MSR list",
                source: kvm_ioctls::Error::new(libc::EINVAL),
            })?;
            let read = self.setup("read MSRs", self.fd.get_msrs(&mut msrs))?;
            saved.extend_from_slice(&msrs.as_slice()[..read]);
            // KVM stops at the first MSR it cannot read: skip that one and go on after it.
            rest = &rest[(read + 1).min(rest.len())..];
        }
        Ok(saved)
    }

    /// Sets every piece of saved state, in the order KVM needs:
    /// - the TSC frequency before anything that depends on TSC scaling;
    /// - CPUID first of the rest: it decides which MSRs and XSAVE features are valid;
    /// - MP state, then registers, special registers (paging, EFER), XSAVE/XCRs, debug registers;
    /// - the LAPIC after the special registers (its base address lives in an MSR and sregs);
    /// - MSRs after the LAPIC (TSC deadline and x2APIC MSRs need the LAPIC in place);
    /// - vCPU events last: pending exceptions, NMIs and interrupt shadow apply to the state above.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VcpuError> {
        if let Some(khz) = state.tsc_khz {
            if self.fd.get_tsc_khz().ok() != Some(khz) {
                self.setup("set the TSC frequency", self.fd.set_tsc_khz(khz))?;
            }
        }
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuError::Setup {
            id: self.id,
            what: "rebuild CPUID",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        self.setup("set CPUID", self.fd.set_cpuid2(&cpuid))?;
        self.setup("set the MP state", self.fd.set_mp_state(state.mp_state))?;
        self.setup("set registers", self.fd.set_regs(&state.regs))?;
        self.setup("set special registers", self.fd.set_sregs(&state.sregs))?;
        // SAFETY: the buffer is a complete kvm_xsave read from KVM for a vCPU with the same
        // CPUID (set just above), so its size matches what KVM_SET_XSAVE reads.
        self.setup("set XSAVE state", unsafe {
            self.fd.set_xsave(&state.xsave)
        })?;
        self.setup("set XCRs", self.fd.set_xcrs(&state.xcrs))?;
        self.setup(
            "set debug registers",
            self.fd.set_debug_regs(&state.debug_regs),
        )?;
        self.setup("set the LAPIC", self.fd.set_lapic(&state.lapic))?;
        for chunk in state.msrs.chunks(MSR_CHUNK) {
            let msrs = Msrs::from_entries(chunk).map_err(|_| VcpuError::Setup {
                id: self.id,
                what: "build the MSR list",
                source: kvm_ioctls::Error::new(libc::EINVAL),
            })?;
            let set = self.setup("set MSRs", self.fd.set_msrs(&msrs))?;
            if set != chunk.len() {
                return Err(VcpuError::MsrRestore {
                    id: self.id,
                    set,
                    total: chunk.len(),
                    index: chunk[set].index,
                });
            }
        }
        self.setup(
            "set vCPU events",
            self.fd.set_vcpu_events(&state.vcpu_events),
        )?;
        Ok(())
    }

    /// Where this vCPU is (id, mode, instruction pointer, paging), for crash reports.
    fn describe_cpu(&self) -> String {
        let regs = self.fd.get_regs();
        let sregs = self.fd.get_sregs();
        let mp = self.fd.get_mp_state().map(|m| m.mp_state);
        match (regs, sregs) {
            (Ok(r), Ok(s)) => format!(
                "vCPU {}: rip {:#x} rsp {:#x} rflags {:#x} cs {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} idt {:#x}+{:#x} mp_state {:?}",
                self.id, r.rip, r.rsp, r.rflags, s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer,
                s.idt.base, s.idt.limit, mp
            ),
            (Err(e), _) | (_, Err(e)) => format!("vCPU {}: registers unreadable: {e}", self.id),
        }
    }

    /// Runs the vCPU until the guest stops it or KVM fails.
    pub fn run(mut self, io: Arc<Bus>, mmio: Arc<Bus>) -> VmStop {
        self.run_controlled(io, mmio, None)
    }

    fn run_controlled(
        &mut self,
        io: Arc<Bus>,
        mmio: Arc<Bus>,
        control: Option<&VcpuControl>,
    ) -> VmStop {
        loop {
            if let Some(control) = control {
                if let Err(stop) = control.between_runs(self) {
                    return stop;
                }
            }
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
                Ok(VcpuExit::Shutdown) => return VmStop::TripleFault(self.describe_cpu()),
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    tracing::info!(id = self.id, kind, "KVM system event");
                    return match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => VmStop::PowerOff,
                        KVM_SYSTEM_EVENT_RESET => VmStop::Reset,
                        _ => VmStop::Reset,
                    };
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

    /// Starts the run loop on its own thread; its stop reason goes to `stops`. The handle pauses,
    /// resumes and saves the vCPU.
    pub fn spawn(
        self,
        io: Arc<Bus>,
        mmio: Arc<Bus>,
        stops: Sender<VmStop>,
        msr_indices: Arc<Vec<u32>>,
    ) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler();
        let id = self.id;
        let (requests_tx, requests_rx) = mpsc::channel();
        let (events_tx, events_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let mut vcpu = self;
                let control = VcpuControl {
                    requests: requests_rx,
                    events: events_tx,
                    msr_indices,
                };
                let stop = vcpu.run_controlled(io, mmio, Some(&control));
                let _ = stops.send(stop);
            })
            .map_err(|e| VcpuError::Spawn(id, e))?;
        Ok(VcpuHandle {
            id,
            requests: requests_tx,
            events: events_rx,
            thread,
        })
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN (KVM_RUN returns EINTR).
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), on_kick) {
            tracing::error!(error = %e, "cannot install the vCPU kick handler");
        }
    });
}

enum VcpuRequest {
    Pause,
    Resume,
    Save(Sender<Result<VcpuState, VcpuError>>),
}

enum VcpuEvent {
    Paused,
    Resumed,
}

/// The vCPU thread's side of the control channel.
struct VcpuControl {
    requests: Receiver<VcpuRequest>,
    events: Sender<VcpuEvent>,
    msr_indices: Arc<Vec<u32>>,
}

impl VcpuControl {
    /// Handles requests between two KVM_RUNs; a pause parks the thread here until resume.
    fn between_runs(&self, vcpu: &Vcpu) -> Result<(), VmStop> {
        match self.requests.try_recv() {
            Ok(VcpuRequest::Pause) => self.park(vcpu),
            // Resume or save while running: nothing to do / answered from the parked state only.
            Ok(VcpuRequest::Resume) => Ok(()),
            Ok(VcpuRequest::Save(reply)) => {
                let _ = reply.send(Err(VcpuError::Setup {
                    id: vcpu.id,
                    what: "save state while running",
                    source: kvm_ioctls::Error::new(libc::EBUSY),
                }));
                Ok(())
            }
            Err(TryRecvError::Empty) => Ok(()),
            Err(TryRecvError::Disconnected) => Err(VmStop::Failed("VMM went away".into())),
        }
    }

    fn park(&self, vcpu: &Vcpu) -> Result<(), VmStop> {
        // Tell the guest's kvmclock it was paused, so it does not report soft lockups.
        let _ = vcpu.fd.kvmclock_ctrl();
        let _ = self.events.send(VcpuEvent::Paused);
        loop {
            match self.requests.recv() {
                Ok(VcpuRequest::Resume) => {
                    let _ = self.events.send(VcpuEvent::Resumed);
                    return Ok(());
                }
                Ok(VcpuRequest::Pause) => {
                    let _ = self.events.send(VcpuEvent::Paused);
                }
                Ok(VcpuRequest::Save(reply)) => {
                    let _ = reply.send(vcpu.save_state(&self.msr_indices));
                }
                Err(_) => return Err(VmStop::Failed("VMM went away".into())),
            }
        }
    }
}

/// The VMM's side: pause, resume, save.
pub struct VcpuHandle {
    pub id: u8,
    requests: Sender<VcpuRequest>,
    events: Receiver<VcpuEvent>,
    thread: JoinHandle<()>,
}

/// How long a pause may take before it is reported as failed.
const PAUSE_DEADLINE: Duration = Duration::from_secs(10);
/// How often a pause kicks the vCPU thread again (a kick that lands outside KVM_RUN is lost).
const KICK_INTERVAL: Duration = Duration::from_millis(5);

impl VcpuHandle {
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.requests
            .send(VcpuRequest::Pause)
            .map_err(|_| VcpuError::ThreadGone(self.id))?;
        let started = Instant::now();
        loop {
            let _ = self.thread.kill(kick_signal());
            match self.events.recv_timeout(KICK_INTERVAL) {
                Ok(VcpuEvent::Paused) => return Ok(()),
                Ok(VcpuEvent::Resumed) => {}
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuError::ThreadGone(self.id)),
            }
            if started.elapsed() > PAUSE_DEADLINE {
                return Err(VcpuError::PauseTimeout(self.id, PAUSE_DEADLINE));
            }
        }
    }

    pub fn resume(&self) -> Result<(), VcpuError> {
        self.requests
            .send(VcpuRequest::Resume)
            .map_err(|_| VcpuError::ThreadGone(self.id))?;
        loop {
            match self.events.recv_timeout(PAUSE_DEADLINE) {
                Ok(VcpuEvent::Resumed) => return Ok(()),
                Ok(VcpuEvent::Paused) => {}
                Err(_) => return Err(VcpuError::ThreadGone(self.id)),
            }
        }
    }

    /// Ends the vCPU thread and waits for it: a running vCPU is kicked out of KVM_RUN and finds
    /// the VMM gone, a paused one stops waiting for a resume. False when the thread did not end
    /// within the pause deadline (or panicked): it may still touch guest memory then.
    pub fn stop(self) -> bool {
        let VcpuHandle {
            id,
            requests,
            events,
            thread,
        } = self;
        drop(requests);
        let started = Instant::now();
        loop {
            let _ = thread.kill(kick_signal());
            // The thread's end drops its side of the events channel.
            match events.recv_timeout(KICK_INTERVAL) {
                Err(RecvTimeoutError::Disconnected) => break,
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
            }
            if started.elapsed() > PAUSE_DEADLINE {
                tracing::error!(vcpu = id, "the vCPU thread did not end");
                return false;
            }
        }
        thread.join().is_ok()
    }

    /// Saves the state of a paused vCPU.
    pub fn save(&self) -> Result<VcpuState, VcpuError> {
        let (tx, rx) = mpsc::channel();
        self.requests
            .send(VcpuRequest::Save(tx))
            .map_err(|_| VcpuError::ThreadGone(self.id))?;
        rx.recv().map_err(|_| VcpuError::ThreadGone(self.id))?
    }
}
