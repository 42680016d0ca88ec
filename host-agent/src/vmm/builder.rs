//! Assembles a VM from a [`VmConfig`]: KVM VM and memory, the kernel and initrd, the command line,
//! devices on their buses, ACPI tables, the zero page and the vCPUs; then runs it until it stops.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::IoEventAddress;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, load_cmdline, Cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::acpi::{self, MmioDeviceInfo};
use super::arch::x86_64::{boot, regs};
use super::devices::bus::{Bus, BusError};
use super::devices::legacy::{AcpiSleep, I8042};
use super::devices::serial::{ConsoleOutput, PanicWatch, SerialDevice};
use super::devices::virtio::mmio::{MmioTransport, MmioTransportState, REG_QUEUE_NOTIFY};
use super::devices::virtio::vsock::{Vsock, VsockHandle};
use super::layout::*;
use super::persist::{CpuModel, MicrovmState, VsockDeviceState};
use super::snapshot::{self, SnapshotError, SnapshotKind, SnapshotMeta};
use super::vstate::memory::{self, GuestMemory, MemoryError, RamMappings};
use super::vstate::vcpu::{Vcpu, VcpuError, VcpuHandle};
use super::vstate::vm::{Vm, VmError};
use super::working_set::{self, WorkingSet, WorkingSetError};
use super::VmStop;

/// The vsock device's host side.
#[derive(Debug, Clone)]
pub struct VsockConfig {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub vsock: Option<VsockConfig>,
    pub console_log: Option<PathBuf>,
}

pub const MAX_VCPUS: u8 = 32;

/// What the guest kernel is told about this machine on top of the configured command line: it
/// has no PCI bus, so the kernel does not probe the configuration ports for one (and does not log
/// "PCI: Fatal: No config space access function found" on every boot). Left out where the
/// configured command line already says something about `pci=`.
const MACHINE_CMDLINE: &str = "pci=off";

/// The configured command line with this machine's own arguments.
fn guest_cmdline(configured: &str) -> String {
    if configured
        .split_whitespace()
        .any(|arg| arg.starts_with("pci="))
    {
        configured.to_string()
    } else {
        format!("{configured} {MACHINE_CMDLINE}")
            .trim_start()
            .to_string()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("between 1 and {MAX_VCPUS} vCPUs are supported, not {0}")]
    VcpuCount(u8),
    #[error("cannot read the kernel {path}: {source}")]
    KernelFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a bootable bzImage or vmlinux ({reason})")]
    Kernel { path: PathBuf, reason: String },
    #[error("cannot read the initrd {path}: {source}")]
    InitrdFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the initrd ({size} bytes) does not fit in {mem_mib} MiB of guest memory next to the kernel")]
    InitrdTooLarge { size: u64, mem_mib: u64 },
    #[error("bad kernel command line: {0}")]
    Cmdline(String),
    #[error("cannot open the console log {path}: {source}")]
    ConsoleLog {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("vsock device: {0}")]
    Vsock(String),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    BootTables(#[from] regs::WriteError),
    #[error("cannot set up {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// How to restore a snapshot.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    pub snapshot_dir: PathBuf,
    /// The new sandbox's vsock Unix socket (each clone gets its own).
    pub vsock_uds: Option<PathBuf>,
    pub console_log: Option<PathBuf>,
    /// Copy the snapshot's recorded working set (`working_set.rs`) into huge pages of this VM's
    /// own before it runs. Off when recording one.
    pub apply_working_set: bool,
}

/// The vsock device as the VMM keeps it: the transport for snapshots, the handle for resets.
struct VsockAttachment {
    transport: Arc<Mutex<MmioTransport>>,
    handle: VsockHandle,
    guest_cid: u64,
    base: u64,
    irq: u32,
}

/// A built (or restored) VM, ready to run.
pub struct Vmm {
    vm: Vm,
    mem: GuestMemory,
    mem_mib: u64,
    vcpus: Vec<Vcpu>,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    stop_tx: Sender<VmStop>,
    stop_rx: Receiver<VmStop>,
    panic: PanicWatch,
    serial: Arc<Mutex<SerialDevice>>,
    vsock: Option<VsockAttachment>,
    msr_indices: Arc<Vec<u32>>,
    cpu: CpuModel,
    /// Where the time went while building or restoring, in order.
    pub timings: Vec<(&'static str, Duration)>,
    /// Last, so that it is dropped after every device holding the memory.
    ram: RamMappings,
}

/// Whether the kernel file is an ELF image (a vmlinux) rather than a bzImage. Leaves the file at
/// its start.
fn is_elf(kernel: &mut File) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut magic = [0u8; 4];
    let n = kernel.read(&mut magic)?;
    kernel.seek(SeekFrom::Start(0))?;
    Ok(n == 4 && magic == *b"\x7fELF")
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Kvm { what, source }
}

/// The serial console, the i8042 reset line and the ACPI sleep registers on a new I/O bus.
fn legacy_devices(
    vm: &Vm,
    serial: SerialDevice,
    serial_irq: &EventFd,
    stop_tx: &Sender<VmStop>,
) -> Result<(Bus, Arc<Mutex<SerialDevice>>), BuildError> {
    vm.fd
        .register_irqfd(serial_irq, SERIAL_IRQ)
        .map_err(kvm_err("the serial interrupt"))?;
    let serial = Arc::new(Mutex::new(serial));
    let mut io_bus = Bus::default();
    io_bus.insert(
        u64::from(SERIAL_PORT),
        u64::from(SERIAL_PORT_LEN),
        serial.clone(),
    )?;
    io_bus.insert(
        u64::from(I8042_PORT),
        u64::from(I8042_PORT_LEN),
        Arc::new(Mutex::new(I8042::new(stop_tx.clone()))),
    )?;
    io_bus.insert(
        u64::from(ACPI_SLEEP_CONTROL_PORT),
        2,
        Arc::new(Mutex::new(AcpiSleep::new(stop_tx.clone()))),
    )?;
    Ok((io_bus, serial))
}

/// Puts a vsock device on the MMIO bus with its interrupt and queue notifiers; from a snapshot's
/// transport state when one is given.
fn attach_vsock(
    vm: &Vm,
    mem: &GuestMemory,
    mmio_bus: &mut Bus,
    device: Vsock,
    info: MmioDeviceInfo,
    state: Option<&MmioTransportState>,
) -> Result<VsockAttachment, BuildError> {
    let guest_cid = device.guest_cid();
    let handle = device.handle();
    let irqfd = EventFd::new(libc::EFD_NONBLOCK)?;
    vm.fd
        .register_irqfd(&irqfd, info.irq)
        .map_err(kvm_err("a virtio interrupt"))?;
    let transport = match state {
        Some(state) => MmioTransport::restore(Box::new(device), mem.clone(), irqfd, state)?,
        None => MmioTransport::new(Box::new(device), mem.clone(), irqfd)?,
    };
    for (index, event) in transport.queue_events().iter().enumerate() {
        vm.fd
            .register_ioevent(
                event,
                &IoEventAddress::Mmio(info.base + REG_QUEUE_NOTIFY),
                index as u32,
            )
            .map_err(kvm_err("a virtio queue notifier"))?;
    }
    let transport = Arc::new(Mutex::new(transport));
    mmio_bus.insert(info.base, info.len, transport.clone())?;
    Ok(VsockAttachment {
        transport,
        handle,
        guest_cid,
        base: info.base,
        irq: info.irq,
    })
}

/// The MSRs KVM can save and restore on this host.
fn msr_indices(vm: &Vm) -> Result<Arc<Vec<u32>>, BuildError> {
    let list = vm
        .kvm
        .get_msr_index_list()
        .map_err(kvm_err("the MSR index list"))?;
    Ok(Arc::new(list.as_slice().to_vec()))
}

fn host_cpu(vm: &Vm) -> Result<CpuModel, BuildError> {
    let cpuid = vm
        .kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("the supported CPUID"))?;
    Ok(CpuModel::from_cpuid(&cpuid))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Vmm {
    pub fn build(cfg: &VmConfig) -> Result<Vmm, BuildError> {
        let started = Instant::now();
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(BuildError::VcpuCount(cfg.vcpus));
        }
        let mut kernel = File::open(&cfg.kernel).map_err(|source| BuildError::KernelFile {
            path: cfg.kernel.clone(),
            source,
        })?;
        // Opened (and sized) before any KVM work, so a missing initrd fails fast; read straight
        // into guest memory below.
        let mut initrd = match &cfg.initrd {
            Some(path) => {
                let initrd_err = |source| BuildError::InitrdFile {
                    path: path.clone(),
                    source,
                };
                let file = File::open(path).map_err(initrd_err)?;
                let size = file.metadata().map_err(initrd_err)?.len();
                Some((file, size, path))
            }
            None => None,
        };
        let console = match &cfg.console_log {
            Some(path) => Some(File::create(path).map_err(|source| BuildError::ConsoleLog {
                path: path.clone(),
                source,
            })?),
            None => None,
        };

        let mut timings = vec![("files_read", started.elapsed())];
        let vm = Vm::new()?;
        let (mem, ram) = memory::create(cfg.mem_mib)?;
        vm.register_memory(&mem)?;
        let mem_size = cfg.mem_mib << 20;
        timings.push(("vm_created", started.elapsed()));

        let kernel_err = |reason: String| BuildError::Kernel {
            path: cfg.kernel.clone(),
            reason,
        };
        // An uncompressed vmlinux (ELF) boots at its 64-bit entry with no decompression step in
        // the guest; a bzImage at the 64-bit entry of its protected-mode part.
        let (loaded, entry) = if is_elf(&mut kernel).map_err(|e| kernel_err(e.to_string()))? {
            let loaded = Elf::load(&mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))
                .map_err(|e| kernel_err(e.to_string()))?;
            let entry = loaded.kernel_load.0;
            (loaded, entry)
        } else {
            let loaded = BzImage::load(&mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))
                .map_err(|e| kernel_err(e.to_string()))?;
            // 0x200 past where its protected-mode part loads.
            let entry = loaded.kernel_load.0 + 0x200;
            (loaded, entry)
        };
        timings.push(("kernel_loaded", started.elapsed()));
        let header = loaded.setup_header;
        let initrd_place = match &mut initrd {
            Some((file, size, path)) => {
                let max = header.map_or(0x37ff_ffff, |h| h.initrd_addr_max);
                let too_large = || BuildError::InitrdTooLarge {
                    size: *size,
                    mem_mib: cfg.mem_mib,
                };
                let addr = boot::initrd_address(mem_size, max, *size)
                    .filter(|a| *a >= loaded.kernel_end)
                    .ok_or_else(too_large)?;
                let len = u32::try_from(*size).map_err(|_| too_large())?;
                mem.read_exact_volatile_from(GuestAddress(addr), file, len as usize)
                    .map_err(|e| BuildError::InitrdFile {
                        path: path.to_path_buf(),
                        source: std::io::Error::other(e.to_string()),
                    })?;
                Some((addr, len))
            }
            None => None,
        };
        timings.push(("initrd_loaded", started.elapsed()));

        let mut cmdline =
            Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BuildError::Cmdline(e.to_string()))?;
        cmdline
            .insert_str(guest_cmdline(&cfg.cmdline))
            .map_err(|e| BuildError::Cmdline(e.to_string()))?;
        load_cmdline(&mem, GuestAddress(CMDLINE_START), &cmdline)
            .map_err(|e| BuildError::Cmdline(e.to_string()))?;
        let cmdline_size = cmdline
            .as_cstring()
            .map_err(|e| BuildError::Cmdline(e.to_string()))?
            .as_bytes_with_nul()
            .len();

        let (stop_tx, stop_rx) = channel();
        let panic = PanicWatch::default();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK)?;
        let (io_bus, serial) = legacy_devices(
            &vm,
            SerialDevice::new(
                serial_irq.try_clone()?,
                ConsoleOutput::new(console, panic.clone()).stop_on_panic(stop_tx.clone()),
            ),
            &serial_irq,
            &stop_tx,
        )?;

        // Virtio devices on the MMIO bus.
        let mut mmio_bus = Bus::default();
        let mut mmio_devices = Vec::new();
        let mut vsock_attachment = None;
        if let Some(vsock) = &cfg.vsock {
            let device = Vsock::new(vsock.guest_cid, vsock.uds_path.clone())
                .map_err(|e| BuildError::Vsock(e.to_string()))?;
            let info = MmioDeviceInfo {
                base: VIRTIO_MMIO_START,
                len: VIRTIO_MMIO_SIZE,
                irq: VIRTIO_IRQ_BASE,
            };
            vsock_attachment = Some(attach_vsock(&vm, &mem, &mut mmio_bus, device, info, None)?);
            mmio_devices.push(info);
        }

        timings.push(("devices_attached", started.elapsed()));
        let rsdp = acpi::write_tables(&mem, cfg.vcpus, &mmio_devices)?;
        let params = boot::zero_page(
            header,
            &boot::ZeroPage {
                cmdline_addr: CMDLINE_START,
                cmdline_size,
                initrd: initrd_place,
                rsdp_addr: rsdp,
                mem_size,
            },
        )?;
        boot::write_zero_page(&mem, &params)?;
        regs::write_boot_tables(&mem)?;
        timings.push(("boot_tables_written", started.elapsed()));

        let mut vcpus = Vec::new();
        for id in 0..cfg.vcpus {
            let vcpu = Vcpu::new(&vm, id)?;
            vcpu.configure(&vm, cfg.vcpus, (id == 0).then_some(entry))?;
            vcpus.push(vcpu);
        }
        tracing::debug!(regions = mem.num_regions(), "guest memory ready");

        let msr_indices = msr_indices(&vm)?;
        let cpu = host_cpu(&vm)?;
        Ok(Vmm {
            vm,
            mem,
            mem_mib: cfg.mem_mib,
            vcpus,
            io_bus: Arc::new(io_bus),
            mmio_bus: Arc::new(mmio_bus),
            stop_tx,
            stop_rx,
            panic,
            serial,
            vsock: vsock_attachment,
            msr_indices,
            cpu,
            timings: {
                timings.push(("vm_built", started.elapsed()));
                timings
            },
            ram,
        })
    }

    /// Restores a snapshot into a new VM. Everything in the snapshot is checked before the VM is
    /// created; guest memory is the snapshot's memory file mapped privately (copy-on-write), so
    /// clones share the template's pages until they write them.
    pub fn restore(cfg: &RestoreConfig) -> Result<Vmm, RestoreError> {
        let started = Instant::now();
        let mut timings = Vec::new();
        let state = snapshot::read_state(&cfg.snapshot_dir)?;
        let mem_size = state.mem_mib << 20;
        let mem_file = snapshot::open_memory(&cfg.snapshot_dir, mem_size)?;
        let console = match &cfg.console_log {
            Some(path) => Some(File::create(path).map_err(|source| BuildError::ConsoleLog {
                path: path.clone(),
                source,
            })?),
            None => None,
        };
        // The vsock socket is claimed before any KVM work, so a path in use fails fast.
        let vsock_device = match (&state.vsock, &cfg.vsock_uds) {
            (Some(v), Some(uds)) => Some(
                Vsock::new(v.guest_cid, uds.clone())
                    .map_err(|e| BuildError::Vsock(e.to_string()))?,
            ),
            (Some(_), None) => return Err(RestoreError::NeedsVsock),
            (None, _) => None,
        };
        timings.push(("state_read", started.elapsed()));

        let vm = Vm::new().map_err(BuildError::from)?;
        let host = host_cpu(&vm)?;
        if host != state.cpu {
            return Err(SnapshotError::CpuMismatch {
                saved: state.cpu.to_string(),
                host: host.to_string(),
            }
            .into());
        }
        timings.push(("vm_created", started.elapsed()));

        let (mem, ram) =
            memory::map_file_private(&mem_file, mem_size).map_err(RestoreError::Map)?;
        timings.push(("memory_mapped", started.elapsed()));
        if cfg.apply_working_set {
            if let Some(set) = WorkingSet::load(&cfg.snapshot_dir, &mem)? {
                let copied = working_set::materialize(&mem, &set.hot_regions())?;
                tracing::debug!(regions = copied, "working set copied into huge pages");
                timings.push(("working_set_copied", started.elapsed()));
            }
        }
        vm.register_memory(&mem).map_err(BuildError::from)?;

        let (stop_tx, stop_rx) = channel();
        let panic = PanicWatch::default();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::from)?;
        let serial = SerialDevice::restore(
            serial_irq.try_clone().map_err(BuildError::from)?,
            ConsoleOutput::new(console, panic.clone()).stop_on_panic(stop_tx.clone()),
            &state.serial,
        )
        .map_err(BuildError::from)?;
        let (io_bus, serial) = legacy_devices(&vm, serial, &serial_irq, &stop_tx)?;

        let mut vcpus = Vec::new();
        for vcpu_state in &state.vcpus {
            vcpus.push(Vcpu::new(&vm, vcpu_state.id).map_err(BuildError::from)?);
        }
        vm.restore_state(&state.vm).map_err(BuildError::from)?;
        for (vcpu, vcpu_state) in vcpus.iter().zip(&state.vcpus) {
            vcpu.restore_state(vcpu_state).map_err(BuildError::from)?;
        }
        let mut mmio_bus = Bus::default();
        let vsock = match (vsock_device, &state.vsock) {
            (Some(device), Some(saved)) => {
                let info = MmioDeviceInfo {
                    base: saved.mmio_base,
                    len: VIRTIO_MMIO_SIZE,
                    irq: saved.irq,
                };
                let attachment = attach_vsock(
                    &vm,
                    &mem,
                    &mut mmio_bus,
                    device,
                    info,
                    Some(&saved.transport),
                )?;
                {
                    let mut transport = lock(&attachment.transport);
                    transport.resume_device();
                }
                // The guest's connections pointed at the template's host sockets: reset them; its
                // listeners (envd) survive.
                attachment
                    .handle
                    .transport_reset()
                    .map_err(|e| BuildError::Vsock(e.to_string()))?;
                Some(attachment)
            }
            _ => None,
        };
        timings.push(("state_set", started.elapsed()));
        let msr_indices = msr_indices(&vm)?;
        Ok(Vmm {
            vm,
            mem,
            mem_mib: state.mem_mib,
            vcpus,
            io_bus: Arc::new(io_bus),
            mmio_bus: Arc::new(mmio_bus),
            stop_tx,
            stop_rx,
            panic,
            serial,
            vsock,
            msr_indices,
            cpu: host,
            timings,
            ram,
        })
    }

    /// Starts the vCPUs.
    pub fn start(mut self) -> Result<RunningVm, BuildError> {
        let mut handles = Vec::new();
        for vcpu in self.vcpus {
            match vcpu.spawn(
                self.io_bus.clone(),
                self.mmio_bus.clone(),
                self.stop_tx.clone(),
                self.msr_indices.clone(),
            ) {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    if !stop_vcpus(handles) {
                        self.ram.leak();
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(RunningVm {
            vm: self.vm,
            mem: self.mem,
            mem_mib: self.mem_mib,
            vcpus: Mutex::new(VcpuSet {
                handles,
                paused: false,
            }),
            stop_rx: Mutex::new(self.stop_rx),
            panic: self.panic,
            serial: self.serial,
            vsock: self.vsock,
            cpu: self.cpu,
            received_instance_init: AtomicBool::new(false),
            ram: self.ram,
        })
    }
}

/// Ends the vCPU threads (see `VcpuHandle::stop`); false when one of them did not end.
fn stop_vcpus(handles: Vec<VcpuHandle>) -> bool {
    // Every handle is stopped, even after one failed (hence no `all`, which stops early).
    let stopped: Vec<bool> = handles.into_iter().map(VcpuHandle::stop).collect();
    stopped.into_iter().all(|s| s)
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("the snapshot has a vsock device: give the new sandbox a vsock socket path")]
    NeedsVsock,
    #[error("cannot map the snapshot's memory: {0}")]
    Map(MemoryError),
    #[error(transparent)]
    WorkingSet(#[from] WorkingSetError),
}

impl From<VcpuError> for RestoreError {
    fn from(e: VcpuError) -> Self {
        RestoreError::Build(BuildError::Vcpu(e))
    }
}

/// How the guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    PowerOff,
    Reset,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("guest kernel panicked: {0}")]
    GuestPanic(String),
    #[error("the VM failed: {0}")]
    Failed(String),
    #[error("the guest crashed (triple fault): {0}")]
    TripleFault(String),
}

/// Operations on a running VM that conflict with its state, or fail.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the VM is already paused")]
    AlreadyPaused,
    #[error("the VM is not paused (pause it before taking a snapshot)")]
    NotPaused,
    #[error("refusing a template snapshot: this sandbox has received instance env or a token (/init was applied); a template must be snapshotted before any instance /init")]
    InstanceInitialized,
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

struct VcpuSet {
    handles: Vec<VcpuHandle>,
    paused: bool,
}

/// What a snapshot wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotReport {
    pub dir: PathBuf,
    pub memory_bytes_written: u64,
    pub took_ms: u64,
}

pub struct RunningVm {
    vm: Vm,
    mem: GuestMemory,
    mem_mib: u64,
    vcpus: Mutex<VcpuSet>,
    stop_rx: Mutex<Receiver<VmStop>>,
    panic: PanicWatch,
    serial: Arc<Mutex<SerialDevice>>,
    vsock: Option<VsockAttachment>,
    cpu: CpuModel,
    received_instance_init: AtomicBool,
    /// Last, so that it is dropped after every device holding the memory (the vCPU threads are
    /// ended first, in `drop`).
    ram: RamMappings,
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        let handles = std::mem::take(&mut lock(&self.vcpus).handles);
        if !stop_vcpus(handles) {
            tracing::error!("a vCPU thread did not end: its guest memory stays mapped");
            self.ram.leak();
        }
    }
}

impl RunningVm {
    /// Waits until the guest stops the VM (or a vCPU fails).
    pub fn wait(&self) -> Result<GuestExit, RunError> {
        let stop = lock(&self.stop_rx)
            .recv()
            .unwrap_or_else(|_| VmStop::Failed("every vCPU thread ended".into()));
        {
            let mut serial = lock(&self.serial);
            let _ = std::io::Write::flush(serial.0.writer_mut());
        }
        let panic = lock(&self.panic).clone();
        match (stop, panic) {
            (_, Some(line)) => Err(RunError::GuestPanic(line)),
            (VmStop::PowerOff, None) => Ok(GuestExit::PowerOff),
            (VmStop::Reset, None) => Ok(GuestExit::Reset),
            (VmStop::Failed(msg), None) => Err(RunError::Failed(msg)),
            (VmStop::TripleFault(at), None) => Err(RunError::TripleFault(at)),
        }
    }

    /// The working set of this sandbox so far: the 2 MiB regions of guest memory it wrote since
    /// its restore (meaningful for a VM restored without one applied).
    pub fn record_working_set(&self) -> Result<WorkingSet, WorkingSetError> {
        working_set::record(&self.mem)
    }

    /// Records that this host-agent delivered instance env or a token to the sandbox, which
    /// rules out template snapshots of it.
    pub fn mark_instance_initialized(&self) {
        self.received_instance_init.store(true, Ordering::SeqCst);
    }

    pub fn instance_initialized(&self) -> bool {
        self.received_instance_init.load(Ordering::SeqCst)
    }

    pub fn is_paused(&self) -> bool {
        lock(&self.vcpus).paused
    }

    pub fn pause(&self) -> Result<(), ControlError> {
        let mut vcpus = lock(&self.vcpus);
        if vcpus.paused {
            return Err(ControlError::AlreadyPaused);
        }
        for h in &vcpus.handles {
            h.pause()?;
        }
        vcpus.paused = true;
        Ok(())
    }

    pub fn resume(&self) -> Result<(), ControlError> {
        let mut vcpus = lock(&self.vcpus);
        if !vcpus.paused {
            return Err(ControlError::NotPaused);
        }
        for h in &vcpus.handles {
            h.resume()?;
        }
        vcpus.paused = false;
        Ok(())
    }

    /// Snapshots the paused VM into `dir` (created if needed). Device processing is stopped while
    /// state and memory are written; host vsock connections are reset afterwards.
    pub fn snapshot(&self, dir: &Path, kind: SnapshotKind) -> Result<SnapshotReport, ControlError> {
        let started = Instant::now();
        let vcpus = lock(&self.vcpus);
        if !vcpus.paused {
            return Err(ControlError::NotPaused);
        }
        if kind == SnapshotKind::Template && self.instance_initialized() {
            return Err(ControlError::InstanceInitialized);
        }
        std::fs::create_dir_all(dir).map_err(|source| SnapshotError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let vsock_transport = self.vsock.as_ref().map(|v| lock(&v.transport));
        let result = (|| {
            let mut transport = vsock_transport;
            if let Some(t) = transport.as_mut() {
                t.quiesce();
            }
            let mut vcpu_states = Vec::new();
            for h in &vcpus.handles {
                vcpu_states.push(h.save()?);
            }
            let state = MicrovmState {
                kind,
                cpu: self.cpu.clone(),
                mem_mib: self.mem_mib,
                vm: self.vm.save_state()?,
                vcpus: vcpu_states,
                serial: lock(&self.serial).save_state(),
                vsock: match (&self.vsock, &transport) {
                    (Some(v), Some(t)) => Some(VsockDeviceState {
                        guest_cid: v.guest_cid,
                        mmio_base: v.base,
                        irq: v.irq,
                        transport: t.save_state(),
                    }),
                    _ => None,
                },
            };
            let written = snapshot::write_memory(&self.mem, &dir.join(snapshot::MEMORY_FILE))?;
            snapshot::write_state(dir, &state)?;
            snapshot::write_meta(
                dir,
                &SnapshotMeta {
                    format_version: snapshot::FORMAT_VERSION,
                    kind,
                    mem_mib: self.mem_mib,
                    vcpus: state.vcpus.len(),
                    created_unix: SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                    host_agent_version: env!("CARGO_PKG_VERSION").to_string(),
                },
            )?;
            if let Some(t) = transport.as_mut() {
                t.resume_device();
            }
            Ok::<_, ControlError>(written)
        })();
        if let Some(v) = &self.vsock {
            // Host connections were dropped when the device stopped; tell the guest.
            let _ = v.handle.transport_reset();
        }
        let written = result?;
        Ok(SnapshotReport {
            dir: dir.to_path_buf(),
            memory_bytes_written: written,
            took_ms: started.elapsed().as_millis() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::guest_cmdline;

    #[test]
    fn the_machine_adds_pci_off_unless_told_otherwise() {
        assert_eq!(
            guest_cmdline("console=ttyS0 quiet"),
            "console=ttyS0 quiet pci=off"
        );
        assert_eq!(guest_cmdline(""), "pci=off");
        assert_eq!(
            guest_cmdline("console=ttyS0 pci=noacpi"),
            "console=ttyS0 pci=noacpi"
        );
    }
}
