//! Guest memory of a booted VM: private anonymous memory with transparent huge pages asked for. A
//! snapshot copies it out to a sparse file (`snapshot::write_memory`); a restore maps that file
//! privately (copy-on-write) instead of calling [`create`].
//!
//! Why anonymous and huge: a boot touches tens of MiB (the decompressed kernel, the unpacked
//! initramfs, the memory map). Every first touch of a 4 KiB page is a nested-paging fault the host
//! kernel must serve, and a shmem (memfd) page fault costs more than an anonymous one; with 2 MiB
//! pages the same boot takes a few hundred faults instead of tens of thousands, and KVM can map the
//! guest with large pages. QEMU does the same for its RAM.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::vmm::layout::{MMIO_GAP_END, MMIO_GAP_START};

pub type GuestMemory = GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB is too small (at least 64 MiB)")]
    TooSmall(u64),
    #[error("cannot map guest memory: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
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

/// Creates guest memory of `mem_mib` MiB: anonymous, private, not reserved up front, with
/// transparent huge pages requested (a kernel with THP off simply ignores the advice).
pub fn create(mem_mib: u64) -> Result<GuestMemory, MemoryError> {
    if mem_mib < MIN_MEM_MIB {
        return Err(MemoryError::TooSmall(mem_mib));
    }
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_mib << 20)
        .into_iter()
        .map(|(addr, len)| (addr, len as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges)?;
    for region in mem.iter() {
        let (addr, len) = (region.as_ptr(), region.len() as usize);
        // SAFETY: `addr..addr+len` is exactly one mapping this process owns (created just above and
        // alive as long as `mem`); MADV_HUGEPAGE only changes how the kernel backs it, never its
        // contents or validity.
        let rc = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "guest memory: no transparent huge pages"
            );
        }
    }
    Ok(mem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

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
        let mem = create(64).unwrap();
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
}
