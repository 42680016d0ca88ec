//! ACPI tables that let a stock kernel find our devices without any kernel options: RSDP → XSDT →
//! FADT (hardware-reduced, with the sleep registers used for power-off) → DSDT (virtio-mmio devices as
//! `LNRO0005`, the serial port, `\_S5_`), and MADT (LAPICs, IOAPIC).

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};

use crate::vmm::layout::{
    ACPI_END, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, ACPI_START, IOAPIC_ADDR, LAPIC_ADDR,
    SERIAL_IRQ, SERIAL_PORT, SERIAL_PORT_LEN,
};
use crate::vmm::vstate::memory::GuestMemory;

const OEM_ID: [u8; 6] = *b"ENVDRS";
const OEM_TABLE_ID: [u8; 8] = *b"ENVDVMM ";
const OEM_REVISION: u32 = 1;

/// The value `\_S5_` gives for SLP_TYP; the sleep-control device powers off when it sees it.
pub const S5_SLEEP_TYPE: u8 = 5;

const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;
const IAPC_BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;

/// One virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy)]
pub struct MmioDeviceInfo {
    pub base: u64,
    pub len: u64,
    pub irq: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    #[error("ACPI tables ({0} bytes) do not fit their reserved area")]
    TooLarge(usize),
    #[error("cannot write ACPI tables into guest memory")]
    Write,
}

/// The DSDT's AML body.
pub fn dsdt_aml(devices: &[MmioDeviceInfo]) -> Vec<u8> {
    let mut body = Vec::new();
    for (i, dev) in devices.iter().enumerate() {
        let path = format!("_SB_.V{i:03X}");
        let window = aml::Memory32Fixed::new(true, dev.base as u32, dev.len as u32);
        let irq = aml::Interrupt::new(true, true, false, false, dev.irq);
        let crs = aml::ResourceTemplate::new(vec![&window, &irq]);
        aml::Device::new(
            path.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &(i as u64)),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut body);
    }
    let com1_ports = aml::IO::new(SERIAL_PORT, SERIAL_PORT, 1, SERIAL_PORT_LEN as u8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_ports, &com1_irq]);
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &com1_crs),
        ],
    )
    .to_aml_bytes(&mut body);
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8]),
    )
    .to_aml_bytes(&mut body);
    body
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// The tables, laid out from `ACPI_START`: returns (address, bytes) pairs, RSDP first.
pub fn build_tables(
    vcpus: u8,
    devices: &[MmioDeviceInfo],
) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    let align = |a: u64| (a + 7) & !7;
    let rsdp_addr = ACPI_START;
    let dsdt_addr = align(rsdp_addr + Rsdp::len() as u64);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&dsdt_aml(devices));
    dsdt.update_checksum();
    let dsdt = dsdt.as_slice().to_vec();

    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi);
    // No CMOS RTC (the kernel would spend seconds probing ports nobody answers; the wall clock comes
    // from kvmclock) and no VGA.
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_NO_VGA | IAPC_BOOT_ARCH_NO_CMOS_RTC).into();
    fadt.sleep_control_reg = io_register(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_register(ACPI_SLEEP_STATUS_PORT);
    let fadt = to_bytes(&fadt.finalize());

    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    let madt = to_bytes(&madt);

    let xsdt_addr = align(madt_addr + madt.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = to_bytes(&xsdt);

    let end = xsdt_addr + xsdt.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge((end - ACPI_START) as usize));
    }
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    Ok(vec![
        (rsdp_addr, rsdp),
        (dsdt_addr, dsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
        (xsdt_addr, xsdt),
    ])
}

/// Writes the tables into guest memory and returns the RSDP's address.
pub fn write_tables(
    mem: &GuestMemory,
    vcpus: u8,
    devices: &[MmioDeviceInfo],
) -> Result<u64, AcpiError> {
    let tables = build_tables(vcpus, devices)?;
    for (addr, bytes) in &tables {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(|_| AcpiError::Write)?;
    }
    Ok(ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    fn le64(b: &[u8], at: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(a)
    }

    fn devices() -> Vec<MmioDeviceInfo> {
        vec![MmioDeviceInfo {
            base: 0xd000_0000,
            len: 0x1000,
            irq: 5,
        }]
    }

    #[test]
    fn every_table_has_a_valid_checksum_and_length() {
        let tables = build_tables(2, &devices()).unwrap();
        let (_, rsdp) = &tables[0];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        for (_, t) in &tables[1..] {
            assert_eq!(
                le32(t, 4) as usize,
                t.len(),
                "{}",
                String::from_utf8_lossy(&t[..4])
            );
            assert_eq!(sum(t), 0, "{}", String::from_utf8_lossy(&t[..4]));
        }
        let sigs: Vec<&[u8]> = tables[1..].iter().map(|(_, t)| &t[..4]).collect();
        assert_eq!(sigs, vec![&b"DSDT"[..], b"FACP", b"APIC", b"XSDT"]);
    }

    #[test]
    fn pointers_chain_from_rsdp_to_the_dsdt() {
        let tables = build_tables(1, &devices()).unwrap();
        let addr_of = |sig: &[u8]| tables.iter().find(|(_, t)| &t[..4] == sig).unwrap().0;
        let rsdp = &tables[0].1;
        assert_eq!(le64(rsdp, 24), addr_of(b"XSDT"));
        let xsdt = &tables.iter().find(|(_, t)| &t[..4] == b"XSDT").unwrap().1;
        assert_eq!(le64(xsdt, 36), addr_of(b"FACP"));
        assert_eq!(le64(xsdt, 44), addr_of(b"APIC"));
        let fadt = &tables.iter().find(|(_, t)| &t[..4] == b"FACP").unwrap().1;
        assert_eq!(le64(fadt, 140), addr_of(b"DSDT"), "X_DSDT");
        assert_ne!(le32(fadt, 112) & (1 << 20), 0, "hardware-reduced flag");
        let boot_arch = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_ne!(boot_arch & IAPC_BOOT_ARCH_NO_CMOS_RTC, 0);
        // SLEEP_CONTROL_REG (offset 244) is a system-I/O GAS at our port.
        assert_eq!(fadt[244], 1);
        assert_eq!(le64(fadt, 248), u64::from(ACPI_SLEEP_CONTROL_PORT));
    }

    #[test]
    fn madt_lists_each_vcpu_and_the_ioapic() {
        let tables = build_tables(4, &devices()).unwrap();
        let madt = &tables.iter().find(|(_, t)| &t[..4] == b"APIC").unwrap().1;
        assert_eq!(le32(madt, 36), LAPIC_ADDR);
        let mut at = 44;
        let mut lapics = 0;
        let mut ioapics = 0;
        while at < madt.len() {
            match madt[at] {
                0 => lapics += 1,
                1 => ioapics += 1,
                _ => {}
            }
            at += madt[at + 1] as usize;
        }
        assert_eq!((lapics, ioapics), (4, 1));
    }

    #[test]
    fn dsdt_describes_the_virtio_device() {
        let aml = dsdt_aml(&devices());
        let find = |needle: &[u8]| aml.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"LNRO0005"));
        assert!(find(b"_S5_"));
        // Memory32Fixed descriptor: tag 0x86, length 9, read-write, base, length.
        let mut m32 = vec![0x86, 9, 0, 1];
        m32.extend_from_slice(&0xd000_0000u32.to_le_bytes());
        m32.extend_from_slice(&0x1000u32.to_le_bytes());
        assert!(find(&m32));
    }

    #[test]
    fn too_many_devices_do_not_fit() {
        let many: Vec<_> = (0..4000)
            .map(|i| MmioDeviceInfo {
                base: 0xd000_0000 + i * 0x1000,
                len: 0x1000,
                irq: 5,
            })
            .collect();
        assert!(matches!(
            build_tables(1, &many),
            Err(AcpiError::TooLarge(_))
        ));
    }
}
