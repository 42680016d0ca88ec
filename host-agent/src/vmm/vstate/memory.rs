//! Guest memory: one memfd mapped shared, so a snapshot can copy it out as a file and a restore can map
//! a file privately (copy-on-write) instead.

use std::fs::File;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::vmm::layout::{MMIO_GAP_END, MMIO_GAP_START};

pub type GuestMemory = GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB is too small (at least 64 MiB)")]
    TooSmall(u64),
    #[error("cannot create the guest memory file: {0}")]
    Memfd(std::io::Error),
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

/// Creates guest memory of `mem_mib` MiB backed by a memfd. Returns the memory and the file.
pub fn create(mem_mib: u64) -> Result<(GuestMemory, File), MemoryError> {
    if mem_mib < MIN_MEM_MIB {
        return Err(MemoryError::TooSmall(mem_mib));
    }
    let size = mem_mib << 20;
    let fd = rustix::fs::memfd_create("guest-ram", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| MemoryError::Memfd(e.into()))?;
    let file = File::from(fd);
    file.set_len(size).map_err(MemoryError::Memfd)?;
    let mut offset = 0;
    let mut ranges = Vec::new();
    for (addr, len) in ram_ranges(size) {
        let file = file.try_clone().map_err(MemoryError::Memfd)?;
        ranges.push((addr, len as usize, Some(FileOffset::new(file, offset))));
        offset += len;
    }
    Ok((GuestMemoryMmap::from_ranges_with_files(ranges)?, file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

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
    fn memory_is_backed_by_one_file() {
        let (mem, file) = create(64).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(file.metadata().unwrap().len(), 64 << 20);
        assert_eq!(mem.num_regions(), 1);
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert!(matches!(create(16), Err(MemoryError::TooSmall(16))));
    }
}
