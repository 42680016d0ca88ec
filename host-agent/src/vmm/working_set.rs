//! The working set of a template snapshot, REAP-style: which 2 MiB regions of guest memory a
//! restored sandbox writes on its way to its first command, recorded once (`host-agent restore
//! --record-working-set`) into the snapshot directory; every later restore copies the busiest of
//! them into huge pages of its own before its vCPUs run.
//!
//! Why: a restore maps the snapshot's memory file privately. Every first touch of a 4 KiB page is a
//! nested-paging fault, and a write is also a copy-on-write copy. With the memory file in a page
//! cache of 2 MiB pages (tmpfs `huge=within_size`, see the README) the regions the guest only reads
//! are mapped 2 MiB at a time, but the first write into a region splits it back to 4 KiB pages, and
//! every other page of it then faults on its own. Measured inside the nested harness: about 1,300
//! faults at ~120 µs each in the ~22 regions a first exec writes, against ~3 ms to copy one region
//! into an anonymous huge page. Copied up front, such a region costs the guest one fault; a region
//! the guest touches only a few times is left to copy-on-write ([`MIN_WRITTEN_PAGES`]).
//!
//! The cost is memory: a copied region is 2 MiB of the sandbox's own, where copy-on-write would have
//! given it only the 4 KiB pages it writes (which it would, over a longer life, mostly write anyway).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::vmm::snapshot::{self, SnapshotError};
use crate::vmm::vstate::memory::{self, GuestMemory, MemoryError};

/// The unit of the working set: one x86-64 huge page.
pub const REGION_BYTES: u64 = 2 << 20;
/// Its file in a snapshot directory.
pub const FILE: &str = "working-set.json";
pub const FORMAT: u32 = 1;

/// A restore copies a recorded region only when the recording saw at least this many of its pages
/// written. A copy into a fresh huge page costs ~7.5 ms in the nested harness (zeroing it ~4.7 ms,
/// copying ~2.9 ms), a nested-paging fault ~115 µs, so a region pays for itself from ~65 faults;
/// regions with 20 or more written pages took 75-180 faults each, those with fewer mostly a handful
/// (measured: all 22 regions copied made a restore slower, 392 ms to the first output, the 7 with
/// 20 or more made it faster, 293-306 ms, against 314-340 ms without a working set).
pub const MIN_WRITTEN_PAGES: u32 = 20;

const PAGE: u64 = 4096;
/// /proc/self/pagemap: the page is present; the page is file-backed (or shared). A present page of
/// a private file mapping without the file bit is this process's own copy: the guest wrote it.
const PM_PRESENT: u64 = 1 << 63;
const PM_FILE: u64 = 1 << 61;

/// One region the guest wrote: its index (guest-physical address / 2 MiB) and how many of its
/// 4 KiB pages were written when it was recorded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegionUse {
    pub index: u64,
    pub written_pages: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkingSet {
    pub format: u32,
    pub region_bytes: u64,
    pub regions: Vec<RegionUse>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// Reading or writing the file (the snapshot directory's own errors).
    #[error(transparent)]
    File(#[from] SnapshotError),
    #[error("{path} is not a usable working set: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot read this process's page map: {0}")]
    Pagemap(std::io::Error),
    #[error("cannot map memory to copy the working set into: {0}")]
    Staging(MemoryError),
    #[error("cannot give guest memory region {index} its own huge page: {source}")]
    Materialize { index: u64, source: std::io::Error },
}

/// Where region `index` lives in this process; None when it is not entirely inside one RAM range.
fn locate(mem: &GuestMemory, index: u64) -> Option<*mut u8> {
    let gpa = index.checked_mul(REGION_BYTES)?;
    mem.iter().find_map(|region| {
        let start = region.start_addr().0;
        let inside = gpa >= start && gpa.checked_add(REGION_BYTES)? <= start + region.len();
        // `gpa - start < len`, and the region's mapping is `len` bytes long.
        inside.then(|| region.as_ptr().wrapping_add((gpa - start) as usize))
    })
}

impl WorkingSet {
    /// Reads the snapshot's working set; `None` when it has none. A file that does not describe
    /// regions of this guest memory is an error, not a silent skip.
    pub fn load(dir: &Path, mem: &GuestMemory) -> Result<Option<Self>, WorkingSetError> {
        let path = dir.join(FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(SnapshotError::Read { path, source }.into()),
        };
        let invalid = |reason: String| WorkingSetError::Invalid {
            path: path.clone(),
            reason,
        };
        let set: WorkingSet = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        set.check(mem).map_err(invalid)?;
        Ok(Some(set))
    }

    fn check(&self, mem: &GuestMemory) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!(
                "format {}, this host-agent reads {FORMAT}",
                self.format
            ));
        }
        if self.region_bytes != REGION_BYTES {
            return Err(format!(
                "regions of {} bytes, expected {REGION_BYTES}",
                self.region_bytes
            ));
        }
        let mut last = None;
        for r in &self.regions {
            if last.is_some_and(|l| r.index <= l) {
                return Err(format!("region {} is out of order or repeated", r.index));
            }
            if locate(mem, r.index).is_none() {
                return Err(format!("region {} is not guest RAM", r.index));
            }
            if u64::from(r.written_pages) > REGION_BYTES / PAGE {
                return Err(format!(
                    "region {} claims {} written pages",
                    r.index, r.written_pages
                ));
            }
            last = Some(r.index);
        }
        Ok(())
    }

    /// Writes it into the snapshot directory atomically, so a restore never reads half a file.
    pub fn save(&self, dir: &Path) -> Result<(), WorkingSetError> {
        let text =
            serde_json::to_vec_pretty(self).map_err(|e| SnapshotError::Encode(e.to_string()))?;
        Ok(snapshot::write_atomically(dir, FILE, &text)?)
    }

    /// The regions worth copying at a restore ([`MIN_WRITTEN_PAGES`]), by index.
    pub fn hot_regions(&self) -> Vec<u64> {
        self.regions
            .iter()
            .filter(|r| r.written_pages >= MIN_WRITTEN_PAGES)
            .map(|r| r.index)
            .collect()
    }
}

/// Records the regions of `mem` this process holds written pages of: with `mem` a private mapping
/// of a snapshot's memory file, those are the pages the guest (or a device model) wrote since the
/// restore.
pub fn record(mem: &GuestMemory) -> Result<WorkingSet, WorkingSetError> {
    let pagemap = File::open("/proc/self/pagemap").map_err(WorkingSetError::Pagemap)?;
    let mut written: BTreeMap<u64, u32> = BTreeMap::new();
    for region in mem.iter() {
        let host = region.as_ptr() as u64;
        let pages = region.len() / PAGE;
        let mut entries = vec![0u8; (pages * 8) as usize];
        pagemap
            .read_exact_at(&mut entries, host / PAGE * 8)
            .map_err(WorkingSetError::Pagemap)?;
        for (i, entry) in entries.chunks_exact(8).enumerate() {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(entry);
            let e = u64::from_ne_bytes(raw);
            if e & PM_PRESENT != 0 && e & PM_FILE == 0 {
                let gpa = region.start_addr().0 + i as u64 * PAGE;
                *written.entry(gpa / REGION_BYTES).or_default() += 1;
            }
        }
    }
    Ok(WorkingSet {
        format: FORMAT,
        region_bytes: REGION_BYTES,
        regions: written
            .into_iter()
            .map(|(index, written_pages)| RegionUse {
                index,
                written_pages,
            })
            .collect(),
    })
}

/// Gives each region in `indices` (checked by [`WorkingSet::load`]) its own anonymous memory with a
/// transparent huge page, filled with its contents, in place of the private file mapping. Call it
/// before the memory is registered with KVM (KVM must never map the pages it replaces). Returns how
/// many regions it replaced: none when the mapping is not 2 MiB-aligned (no huge page could map it,
/// so a copy would buy nothing).
pub fn materialize(mem: &GuestMemory, indices: &[u64]) -> Result<usize, WorkingSetError> {
    let mut places = Vec::with_capacity(indices.len());
    for &index in indices {
        let Some(host) = locate(mem, index) else {
            return Err(WorkingSetError::Materialize {
                index,
                source: std::io::Error::other("not guest RAM"),
            });
        };
        if !(host as u64).is_multiple_of(REGION_BYTES) {
            tracing::info!("guest memory is not 2 MiB-aligned: working set not applied");
            return Ok(0);
        }
        places.push((index, host));
    }
    if places.is_empty() {
        return Ok(0);
    }
    let staging = Staging::new(places.len())?;
    for (i, (index, host)) in places.iter().enumerate() {
        let piece = staging.piece(i);
        // SAFETY: `host` is REGION_BYTES of `mem`'s mapping (checked by `locate`), readable and
        // not written by anyone yet, so it holds the file's bytes; `piece` is REGION_BYTES of the
        // staging mapping, which only this function uses. The ranges are different mappings.
        // Copying from the mapping instead of reading the file: the page cache's huge pages map
        // with one fault per region, where a read() walks them 4 KiB at a time.
        unsafe { std::ptr::copy_nonoverlapping(*host, piece, REGION_BYTES as usize) };
        // SAFETY: moves the filled piece (pages and all, a huge page moves as one) onto the
        // region's place in guest memory, replacing the private file mapping there. Both ranges
        // are REGION_BYTES long, 2 MiB-aligned and owned by this process: `host` lies inside
        // `mem`'s mapping, which outlives this call and is unmapped as a whole by its owner
        // (`memory::RamMappings`); the guest does not run yet and KVM does not map this memory yet.
        let moved = unsafe {
            libc::mremap(
                piece.cast(),
                REGION_BYTES as usize,
                REGION_BYTES as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                host.cast::<libc::c_void>(),
            )
        };
        if moved == libc::MAP_FAILED {
            return Err(WorkingSetError::Materialize {
                index: *index,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(places.len())
}

/// An anonymous, 2 MiB-aligned mapping with huge pages asked for ([`memory::map_aligned`]), cut
/// into pieces that are moved away one by one; what is left of it is unmapped on drop.
struct Staging {
    aligned: *mut u8,
    len: usize,
}

impl Staging {
    fn new(regions: usize) -> Result<Self, WorkingSetError> {
        let len = regions * REGION_BYTES as usize;
        let aligned = memory::map_aligned(len, None).map_err(WorkingSetError::Staging)?;
        Ok(Staging {
            aligned: aligned as *mut u8,
            len,
        })
    }

    fn piece(&self, i: usize) -> *mut u8 {
        self.aligned.wrapping_add(i * REGION_BYTES as usize)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: `aligned..aligned+len` is the mapping `new` created; the pieces moved out of it
        // are no longer part of it, and munmap skips holes.
        unsafe { libc::munmap(self.aligned.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{
        Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
    };

    /// `mib` MiB of guest memory mapped privately from a file whose every 4 KiB page holds its own
    /// page number, as a restore maps a snapshot.
    fn private_file_memory(mib: u64) -> (GuestMemory, File, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("memory");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("memory file");
        let size = mib << 20;
        for page in 0..size / PAGE {
            file.write_all_at(&page.to_le_bytes(), page * PAGE)
                .expect("write");
        }
        file.set_len(size).expect("size");
        let region = MmapRegion::build(
            Some(FileOffset::new(file.try_clone().expect("clone"), 0)),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_NORESERVE | libc::MAP_PRIVATE,
        )
        .expect("map");
        let region = GuestRegionMmap::new(region, GuestAddress(0)).expect("region");
        let mem = GuestMemoryMmap::from_regions(vec![region]).expect("memory");
        (mem, file, dir)
    }

    fn page_number(mem: &GuestMemory, page: u64) -> u64 {
        let mut raw = [0u8; 8];
        mem.read_slice(&mut raw, GuestAddress(page * PAGE))
            .expect("read");
        u64::from_le_bytes(raw)
    }

    #[test]
    fn record_finds_the_regions_written_and_nothing_read() {
        let (mem, _file, _dir) = private_file_memory(8);
        // Read all of region 0, write two pages of region 1 and one of region 3.
        for page in 0..REGION_BYTES / PAGE {
            assert_eq!(page_number(&mem, page), page);
        }
        mem.write_slice(&[1], GuestAddress(REGION_BYTES + 5 * PAGE))
            .expect("write");
        mem.write_slice(&[1], GuestAddress(REGION_BYTES + 9 * PAGE))
            .expect("write");
        mem.write_slice(&[1], GuestAddress(3 * REGION_BYTES))
            .expect("write");
        let set = record(&mem).expect("record");
        assert_eq!(
            set.regions,
            vec![
                RegionUse {
                    index: 1,
                    written_pages: 2
                },
                RegionUse {
                    index: 3,
                    written_pages: 1
                },
            ]
        );
    }

    #[test]
    fn materialized_regions_hold_the_file_and_stay_private() {
        let (mem, file, _dir) = private_file_memory(8);
        let aligned =
            (mem.iter().next().expect("region").as_ptr() as u64).is_multiple_of(REGION_BYTES);
        let n = materialize(&mem, &[1, 2]).expect("materialize");
        assert_eq!(n, if aligned { 2 } else { 0 });
        for page in [0, 512, 700, 1023, 1024, 1500, 2047] {
            assert_eq!(page_number(&mem, page), page, "page {page}");
        }
        // Writes land in this memory only, never in the file.
        mem.write_slice(&7u64.to_le_bytes(), GuestAddress(600 * PAGE))
            .expect("write");
        assert_eq!(page_number(&mem, 600), 7);
        let mut raw = [0u8; 8];
        file.read_exact_at(&mut raw, 600 * PAGE).expect("read");
        assert_eq!(u64::from_le_bytes(raw), 600);
        if aligned {
            // The copied regions are this process's own memory: they record as written.
            let set = record(&mem).expect("record");
            assert!(set
                .regions
                .iter()
                .any(|r| r.index == 1 && r.written_pages == 512));
        }
    }

    #[test]
    fn load_refuses_what_does_not_fit_this_memory() {
        let (mem, _file, dir) = private_file_memory(8);
        assert_eq!(WorkingSet::load(dir.path(), &mem).expect("load"), None);
        let good = WorkingSet {
            format: FORMAT,
            region_bytes: REGION_BYTES,
            regions: vec![RegionUse {
                index: 3,
                written_pages: 4,
            }],
        };
        good.save(dir.path()).expect("save");
        assert_eq!(
            WorkingSet::load(dir.path(), &mem).expect("load"),
            Some(good)
        );
        for (text, why) in [
            ("{", "EOF"),
            (
                r#"{"format":1,"region_bytes":2097152,"regions":[{"index":4,"written_pages":1}]}"#,
                "region 4 is not guest RAM",
            ),
            (
                r#"{"format":1,"region_bytes":2097152,"regions":[{"index":2,"written_pages":1},{"index":1,"written_pages":1}]}"#,
                "out of order",
            ),
            (
                r#"{"format":2,"region_bytes":2097152,"regions":[]}"#,
                "format 2",
            ),
            (
                r#"{"format":1,"region_bytes":4096,"regions":[]}"#,
                "regions of 4096 bytes",
            ),
            (
                r#"{"format":1,"region_bytes":2097152,"regions":[{"index":0,"written_pages":513}]}"#,
                "513 written pages",
            ),
        ] {
            std::fs::write(dir.path().join(FILE), text).expect("write");
            let err = WorkingSet::load(dir.path(), &mem).expect_err(text);
            assert!(err.to_string().contains(why), "{text}: {err}");
        }
    }
}
