//! Assembles a VM from a [`VmConfig`]: KVM VM and memory, the kernel and initrd, the command line,
//! devices on their buses, ACPI tables, the zero page and the vCPUs; then runs it until it stops.

use std::fs::File;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::IoEventAddress;
use linux_loader::loader::{bzimage::BzImage, load_cmdline, Cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::acpi::{self, MmioDeviceInfo};
use super::arch::x86_64::{boot, regs};
use super::devices::bus::{Bus, BusError};
use super::devices::legacy::{AcpiSleep, I8042};
use super::devices::serial::{ConsoleOutput, PanicWatch, SerialDevice};
use super::devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use super::devices::virtio::vsock::Vsock;
use super::layout::*;
use super::vstate::memory::{self, GuestMemory, MemoryError};
use super::vstate::vcpu::{Vcpu, VcpuError};
use super::vstate::vm::{Vm, VmError};
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

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("between 1 and {MAX_VCPUS} vCPUs are supported, not {0}")]
    VcpuCount(u8),
    #[error("cannot read the kernel {path}: {source}")]
    KernelFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a bootable bzImage ({reason})")]
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

/// A built VM, ready to run.
pub struct Vmm {
    // Kept alive for as long as the vCPUs run: KVM maps this memory and the devices use it.
    _vm: Vm,
    _mem: GuestMemory,
    _mem_file: File,
    vcpus: Vec<Vcpu>,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    stop_tx: Sender<VmStop>,
    stop_rx: Receiver<VmStop>,
    panic: PanicWatch,
    serial: Arc<Mutex<SerialDevice>>,
    pub build_time: Duration,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Kvm { what, source }
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
        let initrd = match &cfg.initrd {
            Some(path) => Some(
                std::fs::read(path).map_err(|source| BuildError::InitrdFile {
                    path: path.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        let console = match &cfg.console_log {
            Some(path) => Some(File::create(path).map_err(|source| BuildError::ConsoleLog {
                path: path.clone(),
                source,
            })?),
            None => None,
        };

        let vm = Vm::new()?;
        let (mem, mem_file) = memory::create(cfg.mem_mib)?;
        vm.register_memory(&mem)?;
        let mem_size = cfg.mem_mib << 20;

        let loaded = BzImage::load(&mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| BuildError::Kernel {
                path: cfg.kernel.clone(),
                reason: e.to_string(),
            })?;
        let header = loaded.setup_header;
        let initrd_place = match &initrd {
            Some(bytes) => {
                let max = header.map_or(0x37ff_ffff, |h| h.initrd_addr_max);
                let addr = boot::initrd_address(mem_size, max, bytes.len() as u64)
                    .filter(|a| *a >= loaded.kernel_end)
                    .ok_or(BuildError::InitrdTooLarge {
                        size: bytes.len() as u64,
                        mem_mib: cfg.mem_mib,
                    })?;
                mem.write_slice(bytes, GuestAddress(addr)).map_err(|_| {
                    BuildError::InitrdTooLarge {
                        size: bytes.len() as u64,
                        mem_mib: cfg.mem_mib,
                    }
                })?;
                Some((addr, bytes.len() as u32))
            }
            None => None,
        };

        let mut cmdline =
            Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BuildError::Cmdline(e.to_string()))?;
        cmdline
            .insert_str(&cfg.cmdline)
            .map_err(|e| BuildError::Cmdline(e.to_string()))?;
        load_cmdline(&mem, GuestAddress(CMDLINE_START), &cmdline)
            .map_err(|e| BuildError::Cmdline(e.to_string()))?;
        let cmdline_size = cmdline
            .as_cstring()
            .map_err(|e| BuildError::Cmdline(e.to_string()))?
            .as_bytes_with_nul()
            .len();

        // Legacy devices on the I/O bus.
        let (stop_tx, stop_rx) = channel();
        let panic = PanicWatch::default();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK)?;
        vm.fd
            .register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(kvm_err("the serial interrupt"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            serial_irq,
            ConsoleOutput::new(console, panic.clone()),
        )));
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

        // Virtio devices on the MMIO bus.
        let mut mmio_bus = Bus::default();
        let mut mmio_devices = Vec::new();
        if let Some(vsock) = &cfg.vsock {
            let device = Vsock::new(vsock.guest_cid, vsock.uds_path.clone())
                .map_err(|e| BuildError::Vsock(e.to_string()))?;
            let info = MmioDeviceInfo {
                base: VIRTIO_MMIO_START + (mmio_devices.len() as u64) * VIRTIO_MMIO_SIZE,
                len: VIRTIO_MMIO_SIZE,
                irq: VIRTIO_IRQ_BASE + mmio_devices.len() as u32,
            };
            let irqfd = EventFd::new(libc::EFD_NONBLOCK)?;
            vm.fd
                .register_irqfd(&irqfd, info.irq)
                .map_err(kvm_err("a virtio interrupt"))?;
            let transport = MmioTransport::new(Box::new(device), mem.clone(), irqfd)?;
            for (index, event) in transport.queue_events().iter().enumerate() {
                vm.fd
                    .register_ioevent(
                        event,
                        &IoEventAddress::Mmio(info.base + REG_QUEUE_NOTIFY),
                        index as u32,
                    )
                    .map_err(kvm_err("a virtio queue notifier"))?;
            }
            mmio_bus.insert(info.base, info.len, Arc::new(Mutex::new(transport)))?;
            mmio_devices.push(info);
        }

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

        // The 64-bit entry point of a bzImage is 0x200 past where its protected-mode part loads.
        let entry = loaded.kernel_load.0 + 0x200;
        let mut vcpus = Vec::new();
        for id in 0..cfg.vcpus {
            let vcpu = Vcpu::new(&vm, id)?;
            vcpu.configure(&vm, cfg.vcpus, (id == 0).then_some(entry))?;
            vcpus.push(vcpu);
        }
        tracing::debug!(regions = mem.num_regions(), "guest memory ready");

        Ok(Vmm {
            _vm: vm,
            _mem: mem,
            _mem_file: mem_file,
            vcpus,
            io_bus: Arc::new(io_bus),
            mmio_bus: Arc::new(mmio_bus),
            stop_tx,
            stop_rx,
            panic,
            serial,
            build_time: started.elapsed(),
        })
    }

    /// Starts the vCPUs; returns a handle to wait for the VM to stop.
    pub fn start(self) -> Result<RunningVm, BuildError> {
        for vcpu in self.vcpus {
            vcpu.spawn(
                self.io_bus.clone(),
                self.mmio_bus.clone(),
                self.stop_tx.clone(),
            )?;
        }
        Ok(RunningVm {
            _vm: self._vm,
            _mem: self._mem,
            _mem_file: self._mem_file,
            stop_rx: self.stop_rx,
            panic: self.panic,
            serial: self.serial,
        })
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
}

pub struct RunningVm {
    _vm: Vm,
    _mem: GuestMemory,
    _mem_file: File,
    stop_rx: Receiver<VmStop>,
    panic: PanicWatch,
    serial: Arc<Mutex<SerialDevice>>,
}

impl RunningVm {
    /// Waits until the guest stops the VM (or a vCPU fails).
    pub fn wait(&self) -> Result<GuestExit, RunError> {
        let stop = self
            .stop_rx
            .recv()
            .unwrap_or_else(|_| VmStop::Failed("every vCPU thread ended".into()));
        {
            let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
            let _ = std::io::Write::flush(serial.0.writer_mut());
        }
        let panic = self.panic.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match (stop, panic) {
            (_, Some(line)) => Err(RunError::GuestPanic(line)),
            (VmStop::PowerOff, None) => Ok(GuestExit::PowerOff),
            (VmStop::Reset, None) => Ok(GuestExit::Reset),
            (VmStop::Failed(msg), None) => Err(RunError::Failed(msg)),
        }
    }
}
