//! File helpers for the snapshot checks: sparse-aware copy and search (snapshot memory files are
//! sparse, and the test host keeps everything in RAM), snapshot state mutations, `/proc` smaps
//! parsing.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// The byte ranges of `file` that hold data (SEEK_DATA/SEEK_HOLE); the whole file when the
/// filesystem cannot say.
pub fn data_ranges(file: &File) -> io::Result<Vec<(u64, u64)>> {
    let len = file.metadata()?.len();
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: lseek on a file descriptor we own.
        let start = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if start < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(ranges),
                Some(libc::EINVAL) if pos == 0 => Ok(vec![(0, len)]),
                _ => Err(e),
            };
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(io::Error::last_os_error());
        }
        let end = (end as u64).min(len);
        ranges.push((start as u64, end));
        pos = end.max(start as u64 + 1);
    }
    Ok(ranges)
}

/// An unchanged copy of the snapshot file `from` at `to`: a hard link, which costs no memory on the
/// test host's tmpfs, or a sparse copy where linking fails.
pub fn link_or_copy(from: &Path, to: &Path) -> io::Result<()> {
    if std::fs::hard_link(from, to).is_err() {
        sparse_copy(from, to)?;
    }
    Ok(())
}

/// Copies `from` to `to`, leaving holes (and all-zero pages) as holes.
pub fn sparse_copy(from: &Path, to: &Path) -> io::Result<u64> {
    let src = File::open(from)?;
    let len = src.metadata()?.len();
    let dst = File::create(to)?;
    dst.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    for (start, end) in data_ranges(&src)? {
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at)?;
            for (i, page) in buf[..n].chunks(4096).enumerate() {
                if page.iter().any(|b| *b != 0) {
                    dst.write_all_at(page, at + (i * 4096) as u64)?;
                    written += page.len() as u64;
                }
            }
            at += n as u64;
        }
    }
    dst.sync_all()?;
    Ok(written)
}

/// Which of `needles` occur in `path` (data ranges only: a hole is zeros, and no needle holds a
/// zero byte). Scans once for the needles' common prefix.
pub fn find_needles(path: &Path, needles: &[Vec<u8>]) -> io::Result<Vec<bool>> {
    let mut found = vec![false; needles.len()];
    if needles.is_empty() {
        return Ok(found);
    }
    let prefix_len = needles
        .iter()
        .map(|n| {
            n.iter()
                .zip(needles[0].iter())
                .take_while(|(a, b)| a == b)
                .count()
        })
        .min()
        .unwrap_or(0);
    let longest = needles.iter().map(|n| n.len()).max().unwrap_or(0);
    let file = File::open(path)?;
    let chunk = 4 << 20;
    let mut buf = vec![0u8; chunk + longest];
    for (start, end) in data_ranges(&file)? {
        let mut at = start;
        while at < end {
            // Read a chunk plus an overlap, so a needle across a chunk border is seen.
            let n = ((end - at) as usize).min(chunk + longest);
            file.read_exact_at(&mut buf[..n], at)?;
            let hay = &buf[..n];
            let scan_to = ((end - at) as usize).min(chunk);
            scan(hay, scan_to, needles, prefix_len, &mut found);
            at += scan_to as u64;
        }
    }
    Ok(found)
}

/// Marks the needles that start at an offset below `scan_to` in `hay`.
fn scan(hay: &[u8], scan_to: usize, needles: &[Vec<u8>], prefix_len: usize, found: &mut [bool]) {
    if prefix_len == 0 {
        for (i, n) in needles.iter().enumerate() {
            if !n.is_empty()
                && hay
                    .windows(n.len())
                    .take(scan_to)
                    .any(|w| w == n.as_slice())
            {
                found[i] = true;
            }
        }
        return;
    }
    let prefix = &needles[0][..prefix_len];
    let first = prefix[0];
    let mut i = 0;
    while i < scan_to {
        match hay[i..scan_to].iter().position(|b| *b == first) {
            None => return,
            Some(off) => {
                let p = i + off;
                if hay[p..].starts_with(prefix) {
                    for (k, n) in needles.iter().enumerate() {
                        if hay[p..].starts_with(n) {
                            found[k] = true;
                        }
                    }
                }
                i = p + 1;
            }
        }
    }
}

/// SHA-256 over the file's non-zero pages and their offsets, plus its length: equal for two files
/// with the same bytes, however their holes are laid out (a read fault on a tmpfs hole fills it).
pub fn content_digest(path: &Path) -> io::Result<String> {
    use sha2::{Digest, Sha256};
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut h = Sha256::new();
    h.update(len.to_le_bytes());
    let mut buf = vec![0u8; 1 << 20];
    for (start, end) in data_ranges(&file)? {
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], at)?;
            for (i, page) in buf[..n].chunks(4096).enumerate() {
                if page.iter().any(|b| *b != 0) {
                    h.update((at + (i * 4096) as u64).to_le_bytes());
                    h.update(page);
                }
            }
            at += n as u64;
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The snapshot state file's header: magic, then the u32 LE format version at this offset.
pub const STATE_VERSION_OFFSET: usize = 8;
pub const STATE_MAGIC: &[u8; 8] = b"ENVDSNAP";

/// How a bad-input case breaks a copied snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    TruncatedState,
    CorruptedState,
    WrongVersion,
    MemoryWrongSize,
    MissingMemory,
}

impl Damage {
    pub const ALL: [Damage; 5] = [
        Damage::TruncatedState,
        Damage::CorruptedState,
        Damage::WrongVersion,
        Damage::MemoryWrongSize,
        Damage::MissingMemory,
    ];

    pub fn slug(self) -> &'static str {
        match self {
            Damage::TruncatedState => "truncated_state",
            Damage::CorruptedState => "corrupted_state",
            Damage::WrongVersion => "wrong_version",
            Damage::MemoryWrongSize => "memory_wrong_size",
            Damage::MissingMemory => "missing_memory",
        }
    }

    /// Words of which the error message must hold at least one (lower case).
    pub fn expect_any(self) -> &'static [&'static str] {
        match self {
            Damage::TruncatedState => &["truncated"],
            Damage::CorruptedState => &["corrupt", "checksum"],
            Damage::WrongVersion => &["version 99"],
            Damage::MemoryWrongSize => &["memory file"],
            Damage::MissingMemory => &["no such file", "missing", "not found"],
        }
    }

    /// Changes the state file's bytes (cases that damage memory leave them).
    pub fn damage_state(self, state: &mut Vec<u8>) {
        match self {
            Damage::TruncatedState => state.truncate(state.len() / 2),
            Damage::CorruptedState => {
                let mid = state.len() / 2;
                state[mid] ^= 0xff;
            }
            Damage::WrongVersion => {
                state[STATE_VERSION_OFFSET..STATE_VERSION_OFFSET + 4]
                    .copy_from_slice(&99u32.to_le_bytes());
            }
            Damage::MemoryWrongSize | Damage::MissingMemory => {}
        }
    }
}

/// Memory figures of one process (kB), from smaps_rollup or summed over some smaps entries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Mem {
    pub rss: u64,
    pub pss: u64,
    pub shared_clean: u64,
    pub shared_dirty: u64,
    pub private_clean: u64,
    pub private_dirty: u64,
}

impl Mem {
    fn add_line(&mut self, line: &str) {
        let mut it = line.split_whitespace();
        let (Some(key), Some(val)) = (it.next(), it.next()) else {
            return;
        };
        let Ok(kb) = val.parse::<u64>() else {
            return;
        };
        match key {
            "Rss:" => self.rss += kb,
            "Pss:" => self.pss += kb,
            "Shared_Clean:" => self.shared_clean += kb,
            "Shared_Dirty:" => self.shared_dirty += kb,
            "Private_Clean:" => self.private_clean += kb,
            "Private_Dirty:" => self.private_dirty += kb,
            _ => {}
        }
    }

    pub fn add(&mut self, o: &Mem) {
        self.rss += o.rss;
        self.pss += o.pss;
        self.shared_clean += o.shared_clean;
        self.shared_dirty += o.shared_dirty;
        self.private_clean += o.private_clean;
        self.private_dirty += o.private_dirty;
    }
}

/// Parses `/proc/PID/smaps_rollup`.
pub fn parse_rollup(text: &str) -> Mem {
    let mut m = Mem::default();
    for line in text.lines() {
        m.add_line(line);
    }
    m
}

/// Sums the smaps entries (`/proc/PID/smaps`) whose mapped path is `path`.
pub fn parse_smaps_for(text: &str, path: &str) -> Mem {
    let mut m = Mem::default();
    let mut inside = false;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        let is_header = first.contains('-')
            && first
                .split('-')
                .all(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()));
        if is_header {
            // address perms offset dev inode [path]
            let mapped: Vec<&str> = line.split_whitespace().skip(5).collect();
            inside = mapped.join(" ") == path;
        } else if inside {
            m.add_line(line);
        }
    }
    m
}

/// 16 random hex digits.
pub fn random_hex() -> String {
    let mut b = [0u8; 8];
    let ok = File::open("/dev/urandom").and_then(|f| f.read_exact_at(&mut b, 0));
    if ok.is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        b = (t ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_needles_in_sparse_files_and_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mem");
        let f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"xx secret-1-abc yy", 8 << 20).unwrap();
        // Across the 4 MiB chunk border of the scan.
        let border = (8 << 20) + (4 << 20) - 5;
        f.write_all_at(b"secret-2-def", border).unwrap();
        drop(f);
        let needles: Vec<Vec<u8>> = ["secret-1-abc", "secret-2-def", "secret-3-ghi"]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect();
        assert_eq!(find_needles(&p, &needles).unwrap(), vec![true, true, false]);
        let copy = dir.path().join("copy");
        sparse_copy(&p, &copy).unwrap();
        assert_eq!(std::fs::metadata(&copy).unwrap().len(), 64 << 20);
        assert_eq!(
            find_needles(&copy, &needles).unwrap(),
            vec![true, true, false]
        );
        assert_eq!(content_digest(&p).unwrap(), content_digest(&copy).unwrap());
        // No common prefix: the slow path.
        let other = vec![b"abc yy".to_vec(), b"zzz".to_vec()];
        assert_eq!(find_needles(&p, &other).unwrap(), vec![true, false]);
    }

    #[test]
    fn damages_state() {
        let mut s = b"ENVDSNAP\x01\0\0\0\0\0\0\0payloadpayload".to_vec();
        let orig = s.clone();
        Damage::WrongVersion.damage_state(&mut s);
        assert_eq!(&s[8..12], &99u32.to_le_bytes());
        let mut c = orig.clone();
        Damage::CorruptedState.damage_state(&mut c);
        assert_eq!(c.iter().zip(&orig).filter(|(a, b)| a != b).count(), 1);
        let mut t = orig.clone();
        Damage::TruncatedState.damage_state(&mut t);
        assert_eq!(t.len(), orig.len() / 2);
    }

    #[test]
    fn parses_smaps() {
        let rollup = "55d0-7ffe ---p 00000000 00:00 0 [rollup]\nRss:  100 kB\nPss:  40 kB\nShared_Clean:  70 kB\nPrivate_Dirty:  30 kB\n";
        let m = parse_rollup(rollup);
        assert_eq!(
            (m.rss, m.pss, m.shared_clean, m.private_dirty),
            (100, 40, 70, 30)
        );
        let smaps = "7f00-7f10 r--p 00000000 00:1a 12 /tmp/t/memory\nRss: 8 kB\nPss: 4 kB\n\
                     7f10-7f20 rw-p 00000000 00:00 0 \nRss: 100 kB\n\
                     7f20-7f30 rw-p 00001000 00:1a 12 /tmp/t/memory\nRss: 2 kB\nPss: 2 kB\n";
        let m = parse_smaps_for(smaps, "/tmp/t/memory");
        assert_eq!((m.rss, m.pss), (10, 6));
    }

    #[test]
    fn random_hex_is_16_digits() {
        let a = random_hex();
        assert_eq!(a.len(), 16);
        assert_ne!(a, random_hex());
    }
}
