//! The Linux boot protocol's zero page: setup header from the bzImage, command line, initrd, the
//! e820 memory map and the ACPI RSDP address.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

use crate::vmm::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START, ZERO_PAGE_START};
use crate::vmm::vstate::memory::GuestMemory;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader id: we are not one of the registered loaders.
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootError {
    #[error("too many e820 entries")]
    E820Overflow,
    #[error("cannot write the zero page into guest memory")]
    WriteZeroPage,
}

/// The e820 map for guest RAM of `mem_size` bytes: low RAM up to the EBDA, the reserved legacy area
/// (where the ACPI tables are), RAM from 1 MiB, and RAM above 4 GiB when there is more than fits
/// below the MMIO gap.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, r#type| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    let low_end = mem_size.min(MMIO_GAP_START);
    map.push(entry(HIMEM_START, low_end - HIMEM_START, E820_RAM));
    if mem_size > MMIO_GAP_START {
        map.push(entry(MMIO_GAP_END, mem_size - MMIO_GAP_START, E820_RAM));
    }
    map
}

pub struct ZeroPage {
    pub cmdline_addr: u64,
    pub cmdline_size: usize,
    pub initrd: Option<(u64, u32)>,
    pub rsdp_addr: u64,
    pub mem_size: u64,
}

/// Builds the zero page from the kernel's own setup header and our layout.
pub fn zero_page(header: Option<setup_header>, zp: &ZeroPage) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = zp.cmdline_addr as u32;
    params.hdr.cmdline_size = zp.cmdline_size as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some((addr, size)) = zp.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size;
    }
    params.acpi_rsdp_addr = zp.rsdp_addr;
    let map = e820_map(zp.mem_size);
    if map.len() > params.e820_table.len() {
        return Err(BootError::E820Overflow);
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = *entry;
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Writes the zero page where the boot vCPU's RSI will point.
pub fn write_zero_page(mem: &GuestMemory, params: &boot_params) -> Result<(), BootError> {
    // SAFETY-free: boot_params is plain data (ByteValued in linux-loader).
    mem.write_obj(*params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| BootError::WriteZeroPage)
}

/// Where to put an initrd of `size` bytes: page-aligned, as high as the kernel allows in low RAM.
pub fn initrd_address(mem_size: u64, initrd_addr_max: u32, size: u64) -> Option<u64> {
    let top = mem_size
        .min(MMIO_GAP_START)
        .min(u64::from(initrd_addr_max) + 1);
    let addr = top.checked_sub(size)? & !0xfff;
    (addr >= HIMEM_START).then_some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_and_reserves_the_legacy_area() {
        let map = e820_map(256 << 20);
        assert_eq!(map.len(), 3);
        // The entries are packed: copy fields out before comparing.
        let fields = |e: &boot_e820_entry| ({ e.addr }, { e.size }, { e.r#type });
        assert_eq!(fields(&map[0]), (0, EBDA_START, E820_RAM));
        assert_eq!(
            fields(&map[1]),
            (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED)
        );
        assert_eq!(
            fields(&map[2]),
            (HIMEM_START, (256 << 20) - HIMEM_START, E820_RAM)
        );

        let big = e820_map(5 << 30);
        assert_eq!(big.len(), 4);
        assert_eq!(
            fields(&big[2]),
            (HIMEM_START, MMIO_GAP_START - HIMEM_START, E820_RAM)
        );
        assert_eq!(
            fields(&big[3]),
            (MMIO_GAP_END, (5 << 30) - MMIO_GAP_START, E820_RAM)
        );
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_rsdp_and_map() {
        let zp = ZeroPage {
            cmdline_addr: 0x20000,
            cmdline_size: 42,
            initrd: Some((0x0800_0000, 1234)),
            rsdp_addr: 0xe0000,
            mem_size: 256 << 20,
        };
        let p = zero_page(None, &zp).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.ramdisk_image }, 0x0800_0000);
        assert_eq!({ hdr.ramdisk_size }, 1234);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries, 3);
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        let addr = initrd_address(256 << 20, 0x7fff_ffff, 10_000).unwrap();
        assert_eq!(addr % 4096, 0);
        assert!(addr + 10_000 <= 256 << 20);
        assert!(initrd_address(256 << 20, 0x7fff_ffff, 300 << 20).is_none());
    }
}
