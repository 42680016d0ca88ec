//! A writer for the "newc" cpio format (`070701`), the format the Linux kernel unpacks as an initramfs.
//!
//! Hand-written because it is a few dozen lines and the crates that exist either read only or pull in a
//! filesystem walker we do not need. Timestamps are zero and inode numbers sequential, so equal inputs give
//! byte-equal archives. Several archives may be concatenated; the kernel unpacks them in order and a later
//! entry replaces an earlier one at the same path.

use std::io::{self, Read, Write};

/// File type bits of `st_mode`.
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;

const MAGIC: &[u8] = b"070701";
const TRAILER: &str = "TRAILER!!!";

/// Streams newc entries into `W`. Call [`CpioWriter::finish`] to write the trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

struct Header<'a> {
    name: &'a str,
    mode: u32,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        let h = Header {
            name,
            mode: S_IFDIR | (perm & 0o7777),
            nlink: 2,
            size: 0,
            rdev: (0, 0),
        };
        self.header(&h)
    }

    pub fn file_bytes(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.file(name, perm, data.len() as u64, &mut &data[..])
    }

    /// A regular file whose `len` bytes are read from `data`; fails if `data` has fewer.
    pub fn file(&mut self, name: &str, perm: u32, len: u64, data: &mut dyn Read) -> io::Result<()> {
        let size = u32::try_from(len).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: file too large for cpio"),
            )
        })?;
        let h = Header {
            name,
            mode: S_IFREG | (perm & 0o7777),
            nlink: 1,
            size,
            rdev: (0, 0),
        };
        self.header(&h)?;
        let copied = io::copy(&mut data.take(len), &mut self.out)?;
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{name}: expected {len} bytes, got {copied}"),
            ));
        }
        self.written += copied;
        self.pad()
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        let h = Header {
            name,
            mode: S_IFLNK | 0o777,
            nlink: 1,
            size: target.len() as u32,
            rdev: (0, 0),
        };
        self.header(&h)?;
        self.raw(target.as_bytes())?;
        self.pad()
    }

    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        let h = Header {
            name,
            mode: S_IFCHR | (perm & 0o7777),
            nlink: 1,
            size: 0,
            rdev: (major, minor),
        };
        self.header(&h)
    }

    /// Writes the trailer entry and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        let h = Header {
            name: TRAILER,
            mode: 0,
            nlink: 1,
            size: 0,
            rdev: (0, 0),
        };
        self.write_header(&h, 0)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn header(&mut self, h: &Header<'_>) -> io::Result<()> {
        if h.name.is_empty() || h.name.starts_with('/') || h.name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cpio entry name {:?}", h.name),
            ));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.write_header(h, ino)
    }

    fn write_header(&mut self, h: &Header<'_>, ino: u32) -> io::Result<()> {
        let namesize = h.name.len() as u32 + 1;
        let fields = [
            ino, h.mode, 0, 0, h.nlink, 0, h.size, 0, 0, h.rdev.0, h.rdev.1, namesize, 0,
        ];
        let mut buf = Vec::with_capacity(110 + h.name.len() + 4);
        buf.extend_from_slice(MAGIC);
        for f in fields {
            buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        buf.extend_from_slice(h.name.as_bytes());
        buf.push(0);
        self.raw(&buf)?;
        self.pad()
    }

    fn raw(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4)) % 4;
        self.raw(&[0u8; 3][..n as usize])
    }
}

/// One entry read back from a newc archive (used by tests and by `envd-image inspect`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub mode: u32,
    pub rdev: (u32, u32),
    pub data: Vec<u8>,
}

/// Parses a newc archive up to its trailer. Small reader for checking what the writer produced.
pub fn parse(mut buf: &[u8]) -> io::Result<Vec<Entry>> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let mut out = Vec::new();
    let mut offset = 0usize;
    loop {
        if buf.len() < 110 || &buf[..6] != MAGIC {
            return Err(bad("bad cpio magic"));
        }
        let field = |i: usize| -> io::Result<u32> {
            let s =
                std::str::from_utf8(&buf[6 + i * 8..14 + i * 8]).map_err(|_| bad("bad header"))?;
            u32::from_str_radix(s, 16).map_err(|_| bad("bad header"))
        };
        let mode = field(1)?;
        let size = field(6)? as usize;
        let rdev = (field(9)?, field(10)?);
        let namesize = field(11)? as usize;
        let name_end = 110 + namesize;
        if buf.len() < name_end || namesize == 0 {
            return Err(bad("truncated name"));
        }
        let name =
            String::from_utf8(buf[110..name_end - 1].to_vec()).map_err(|_| bad("bad name"))?;
        let data_start = (offset + name_end).next_multiple_of(4) - offset;
        let data_end = data_start + size;
        if buf.len() < data_end {
            return Err(bad("truncated data"));
        }
        if name == TRAILER {
            return Ok(out);
        }
        out.push(Entry {
            name,
            mode,
            rdev,
            data: buf[data_start..data_end].to_vec(),
        });
        let next = (offset + data_end).next_multiple_of(4) - offset;
        if buf.len() < next {
            return Err(bad("truncated padding"));
        }
        offset += next;
        buf = &buf[next..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_all_entry_types() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("etc", 0o755).unwrap();
        w.file_bytes("etc/hello", 0o644, b"hello world").unwrap();
        w.file_bytes("empty", 0o600, b"").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        let buf = w.finish().unwrap();
        assert_eq!(buf.len() % 4, 0);
        let entries = parse(&buf).unwrap();
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["etc", "etc/hello", "empty", "bin/sh", "dev/console"]
        );
        assert_eq!(entries[0].mode, S_IFDIR | 0o755);
        assert_eq!(entries[1].data, b"hello world");
        assert_eq!(entries[1].mode, S_IFREG | 0o644);
        assert_eq!(entries[3].mode & 0o170000, S_IFLNK);
        assert_eq!(entries[3].data, b"busybox");
        assert_eq!(entries[4].rdev, (5, 1));
    }

    #[test]
    fn header_layout_is_newc() {
        let mut w = CpioWriter::new(Vec::new());
        w.file_bytes("a", 0o755, b"xyz").unwrap();
        let buf = w.finish().unwrap();
        let hdr = std::str::from_utf8(&buf[..110]).unwrap();
        assert!(hdr.starts_with("070701"));
        // ino 1, mode 0o100755 = 0x81ED, nlink 1, size 3, namesize 2
        assert_eq!(&hdr[6..14], "00000001");
        assert_eq!(&hdr[14..22], "000081ED");
        assert_eq!(&hdr[38..46], "00000001");
        assert_eq!(&hdr[54..62], "00000003");
        assert_eq!(&hdr[94..102], "00000002");
        // name "a\0" ends at 112, already aligned; data "xyz" + 1 pad byte.
        assert_eq!(&buf[110..112], b"a\0");
        assert_eq!(&buf[112..116], b"xyz\0");
        assert!(std::str::from_utf8(&buf[116..122]).unwrap() == "070701");
    }

    #[test]
    fn rejects_absolute_and_short_reads() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.dir("/etc", 0o755).is_err());
        let mut short: &[u8] = b"ab";
        assert!(w.file("f", 0o644, 5, &mut short).is_err());
    }

    #[test]
    fn deterministic() {
        let build = || {
            let mut w = CpioWriter::new(Vec::new());
            w.file_bytes("x", 0o644, b"1").unwrap();
            w.finish().unwrap()
        };
        assert_eq!(build(), build());
    }
}
