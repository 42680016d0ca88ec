//! Guest memory of a VM. A booted VM gets private anonymous memory with transparent huge pages
//! asked for; a restored one maps its snapshot's memory file privately (copy-on-write), see
//! [`map_file_private`]. A snapshot copies memory out to a sparse file (`snapshot::write_memory`).
//!
//! Why anonymous and huge: a boot touches tens of MiB (the kernel, the unpacked initramfs, the
//! memory map). Every first touch of a 4 KiB page is a nested-paging fault the host kernel must
//! serve, and a shmem (memfd) page fault costs more than an anonymous one; with 2 MiB pages the
//! same boot takes a few hundred faults instead of tens of thousands. QEMU does the same for its RAM.
//!
//! Why every mapping starts on a 2 MiB boundary of the host's address space: KVM maps guest memory
//! with 2 MiB pages only where a guest address and its host address agree modulo 2 MiB, and a
//! mapping placed wherever the kernel puts it (any 4 KiB boundary on the kernels we run on; only
//! 6.7 and later align large anonymous mappings) leaves every 4 KiB page of the guest a
//! nested-paging fault of its own even when the host backs it with huge pages. Measured in the
//! harness: one boot took 19,042 such faults unaligned, 356 aligned (README, Benchmarks).

use std::fs::File;
use std::os::fd::AsRawFd;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::vmm::layout::{MMIO_GAP_END, MMIO_GAP_START};

pub type GuestMemory = GuestMemoryMmap<()>;

/// Where every guest RAM mapping starts in the host's address space: a huge page boundary.
pub const HOST_ALIGN: usize = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB is too small (at least 64 MiB)")]
    TooSmall(u64),
    #[error("cannot map {len} bytes of guest memory: {source}")]
    Map { len: usize, source: std::io::Error },
    #[error("cannot map guest memory: {0}")]
    Region(String),
}

/// The smallest memory a stock kernel boots in with room for the initramfs.
pub const MIN_MEM_MIB: u64 = 64;

/// Guest RAM ranges for `size` bytes: below the MMIO gap, and the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

/// The host mappings behind a [`GuestMemory`], unmapped when this is dropped. `GuestMemory` does
/// not own them (vm-memory only unmaps what it mapped itself, and it cannot place a mapping), so
/// whoever holds this must drop it only after every user of the memory is gone: the VM's vCPU
/// threads and device workers.
#[derive(Debug, Default)]
pub struct RamMappings(Vec<(usize, usize)>);

impl RamMappings {
    /// Gives the mappings up without unmapping them, for when a user of the memory may still run.
    pub fn leak(&mut self) {
        self.0.clear();
    }
}

impl Drop for RamMappings {
    fn drop(&mut self) {
        for &(addr, len) in &self.0 {
            // SAFETY: `addr..addr+len` is a mapping `map_aligned` created for this value and that
            // nothing else unmaps; the holder's contract is that no one uses it any more.
            if unsafe { libc::munmap(addr as *mut libc::c_void, len) } != 0 {
                tracing::warn!(
                    error = %std::io::Error::last_os_error(),
                    "cannot unmap guest memory"
                );
            }
        }
    }
}

/// Maps `len` bytes (a multiple of the page size) readable and writable at a host address
/// aligned to [`HOST_ALIGN`]: anonymous (with transparent huge pages asked for; a kernel with THP
/// off ignores the advice), or `file` from `offset` on. Private and not reserved up front either
/// way. The caller owns the mapping and unmaps it.
pub(crate) fn map_aligned(len: usize, file: Option<(&File, u64)>) -> Result<usize, MemoryError> {
    let map_err = |source| MemoryError::Map { len, source };
    let reserve_len = len
        .checked_add(HOST_ALIGN)
        .ok_or_else(|| map_err(std::io::Error::from_raw_os_error(libc::ENOMEM)))?;
    // SAFETY: a new inaccessible mapping at an address the kernel picks; it replaces nothing.
    let reserved = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve_len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if reserved == libc::MAP_FAILED {
        return Err(map_err(std::io::Error::last_os_error()));
    }
    let start = reserved as usize;
    let aligned = start.next_multiple_of(HOST_ALIGN);
    let (fd, offset, anon) = match file {
        Some((f, off)) => (f.as_raw_fd(), off as libc::off_t, 0),
        None => (-1, 0, libc::MAP_ANONYMOUS),
    };
    // SAFETY: `aligned..aligned+len` lies inside the reservation just made (`aligned - start` is
    // below HOST_ALIGN), which this function owns; MAP_FIXED replaces only that.
    let mapped = unsafe {
        libc::mmap(
            aligned as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE | libc::MAP_FIXED | anon,
            fd,
            offset,
        )
    };
    let mapped_err = (mapped == libc::MAP_FAILED).then(std::io::Error::last_os_error);
    // The reservation's ends around the mapping (or all of it, on failure) are not needed.
    let unused = match mapped_err {
        Some(_) => vec![(start, reserve_len)],
        None => vec![
            (start, aligned - start),
            (aligned + len, start + reserve_len - (aligned + len)),
        ],
    };
    for (addr, n) in unused.into_iter().filter(|&(_, n)| n > 0) {
        // SAFETY: a part of the reservation above that holds no mapping anyone uses.
        unsafe { libc::munmap(addr as *mut libc::c_void, n) };
    }
    if let Some(source) = mapped_err {
        return Err(map_err(source));
    }
    if file.is_none() {
        // SAFETY: `aligned..aligned+len` is the mapping just made; MADV_HUGEPAGE only changes how
        // the kernel backs it, never its contents or validity.
        if unsafe { libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE) } != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "guest memory: no transparent huge pages"
            );
        }
    }
    Ok(aligned)
}

/// Guest memory over `ranges`, each range mapped by [`map_aligned`] (the file, when given, holds
/// the ranges back to back).
fn map_ranges(
    ranges: &[(GuestAddress, u64)],
    file: Option<&File>,
) -> Result<(GuestMemory, RamMappings), MemoryError> {
    let mut mappings = RamMappings::default();
    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    for &(addr, len) in ranges {
        let len = usize::try_from(len).map_err(|e| MemoryError::Region(e.to_string()))?;
        let host = map_aligned(len, file.map(|f| (f, file_offset)))?;
        mappings.0.push((host, len));
        let mut builder = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE);
        if let Some(f) = file {
            let fd = f
                .try_clone()
                .map_err(|source| MemoryError::Map { len, source })?;
            builder = builder.with_file_offset(FileOffset::new(fd, file_offset));
        }
        // SAFETY: `host..host+len` is the mapping just made, owned by `mappings`, which the caller
        // keeps until the memory has no users (see RamMappings).
        let region = unsafe { builder.with_raw_mmap_pointer(host as *mut u8) }
            .build()
            .map_err(|e| MemoryError::Region(e.to_string()))?;
        regions.push(
            GuestRegionMmap::new(region, addr)
                .ok_or_else(|| MemoryError::Region("region address overflow".into()))?,
        );
        file_offset += len as u64;
    }
    let mem =
        GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Region(e.to_string()))?;
    Ok((mem, mappings))
}

/// Creates guest memory of `mem_mib` MiB: anonymous, private, not reserved up front, with
/// transparent huge pages requested (a kernel with THP off simply ignores the advice).
pub fn create(mem_mib: u64) -> Result<(GuestMemory, RamMappings), MemoryError> {
    if mem_mib < MIN_MEM_MIB {
        return Err(MemoryError::TooSmall(mem_mib));
    }
    map_ranges(&ram_ranges(mem_mib << 20), None)
}

/// Maps a snapshot's memory file (`size` bytes of guest RAM, its ranges back to back) privately:
/// reads come from the file (and the page cache shared by every clone of the template), writes go
/// to this process's own copies.
pub fn map_file_private(file: &File, size: u64) -> Result<(GuestMemory, RamMappings), MemoryError> {
    map_ranges(&ram_ranges(size), Some(file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn ranges_skip_the_mmio_gap() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let big = ram_ranges(4 << 30);
        assert_eq!(big[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(
            big[1],
            (GuestAddress(MMIO_GAP_END), (4 << 30) - MMIO_GAP_START)
        );
    }

    #[test]
    fn memory_is_private_zeroed_and_sized() {
        let (mem, _mappings) = create(64).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.iter().map(|r| r.len()).sum::<u64>(), 64 << 20);
        let mut buf = [0xffu8; 4];
        mem.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
        assert_eq!(buf, [0; 4], "fresh guest memory reads as zeros");
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert!(matches!(create(16), Err(MemoryError::TooSmall(16))));
    }

    /// Whether any page of `addr..addr+len` is unmapped (mincore fails with ENOMEM then).
    fn has_unmapped_pages(addr: usize, len: usize) -> bool {
        let mut vec = vec![0u8; len.div_ceil(4096)];
        // SAFETY: mincore only reads the page tables of this range and writes `vec`, which has one
        // byte per page.
        let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
        rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOMEM)
    }

    #[test]
    fn every_mapping_starts_on_a_huge_page_boundary_and_goes_with_its_owner() {
        let (mem, mappings) = create(64).unwrap();
        let region = mem.iter().next().unwrap();
        let (addr, len) = (region.as_ptr() as usize, region.len() as usize);
        assert_eq!(addr % HOST_ALIGN, 0, "guest RAM at {addr:#x}");
        assert!(!has_unmapped_pages(addr, len));
        drop(mappings);
        assert!(
            has_unmapped_pages(addr, len),
            "dropping the owner unmaps the memory"
        );
    }

    #[test]
    fn a_file_maps_aligned_and_private() {
        use std::io::Write;
        let mut file = tempfile::tempfile().unwrap();
        let mut content = vec![0u8; 64 << 20];
        content[0x2000..0x2004].copy_from_slice(b"envd");
        file.write_all(&content).unwrap();
        let (mem, _mappings) = map_file_private(&file, 64 << 20).unwrap();
        let region = mem.iter().next().unwrap();
        assert_eq!(region.as_ptr() as usize % HOST_ALIGN, 0);
        let mut buf = [0u8; 4];
        mem.read_slice(&mut buf, GuestAddress(0x2000)).unwrap();
        assert_eq!(&buf, b"envd", "reads come from the file");
        mem.write_slice(b"VMM!", GuestAddress(0x2000)).unwrap();
        let mut on_disk = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut on_disk, 0x2000).unwrap();
        assert_eq!(&on_disk, b"envd", "writes stay in this process");
    }
}
