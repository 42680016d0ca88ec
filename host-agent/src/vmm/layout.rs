//! Where things live in guest physical memory and I/O space (x86_64). One place, so the boot code,
//! ACPI tables and devices agree.

/// Boot GDT and (empty) IDT.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapped boot page tables: PML4, PDPT, and one PD of 2 MiB pages (first 1 GiB).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the EBDA: RAM below it is usable, from here to 1 MiB is reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables, in the reserved area below 1 MiB (RSDP first).
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
/// Where the kernel goes, and where "high" memory starts.
pub const HIMEM_START: u64 = 0x100000;

/// RAM below 4 GiB ends here; above it sits the MMIO hole (virtio devices, IOAPIC, LAPIC).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Virtio-mmio devices: one 4 KiB window each, from here.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

/// Legacy I/O ports.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_PORT_LEN: u16 = 8;
pub const SERIAL_IRQ: u32 = 4;
pub const I8042_PORT: u16 = 0x60;
pub const I8042_PORT_LEN: u16 = 5;
/// Hardware-reduced ACPI sleep control (write) and status (read) registers.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;

/// First interrupt line handed to virtio devices (edge-triggered, through the IOAPIC).
pub const VIRTIO_IRQ_BASE: u32 = 5;

/// Address of the TSS and identity map page KVM needs on Intel (top of the 32-bit space, unused).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
