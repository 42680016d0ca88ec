//! The uncompressed kernel (`vmlinux`, an ELF) inside a bzImage, so a VMM can boot it directly and the
//! guest skips decompressing and relocating itself. The bzImage's setup header says where its
//! compressed payload is; Debian's cloud kernel packs it with LZ4 (legacy frame format), others use
//! gzip. Other formats are reported as unsupported (the template then only has `vmlinuz`).

use std::io::Read;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmlinuxError {
    #[error("not a bzImage (no \"HdrS\" setup header of version 2.08 or later)")]
    NotBzImage,
    #[error("the bzImage's payload lies outside the file")]
    PayloadOutOfBounds,
    #[error("the payload is compressed with a format this tool does not read (magic {0})")]
    UnsupportedFormat(String),
    #[error("the payload does not decompress: {0}")]
    Corrupt(String),
    #[error("the decompressed payload is not an ELF image")]
    NotElf,
}

const SETUP_SECTS: usize = 0x1f1;
const HEADER_MAGIC: usize = 0x202;
const VERSION: usize = 0x206;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;
/// The LZ4 legacy frame magic (what `lz4 -l` writes, and the kernel's build uses).
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// Every block of the legacy format decompresses to at most 8 MiB.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The compressed payload of a bzImage.
pub fn payload(bzimage: &[u8]) -> Result<&[u8], VmlinuxError> {
    if bzimage.get(HEADER_MAGIC..HEADER_MAGIC + 4) != Some(b"HdrS".as_slice())
        || u16_at(bzimage, VERSION).is_none_or(|v| v < 0x0208)
    {
        return Err(VmlinuxError::NotBzImage);
    }
    let setup_sects = match bzimage[SETUP_SECTS] {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512;
    let offset = u32_at(bzimage, PAYLOAD_OFFSET).ok_or(VmlinuxError::NotBzImage)? as usize;
    let len = u32_at(bzimage, PAYLOAD_LENGTH).ok_or(VmlinuxError::NotBzImage)? as usize;
    start
        .checked_add(offset)
        .and_then(|from| Some(from..from.checked_add(len)?))
        .and_then(|range| bzimage.get(range))
        .ok_or(VmlinuxError::PayloadOutOfBounds)
}

/// Decodes the LZ4 legacy frame format: the magic, then blocks each preceded by its compressed
/// length; the kernel's build appends the uncompressed size, which ends the walk.
fn lz4_legacy(data: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    let corrupt = |e: String| VmlinuxError::Corrupt(format!("LZ4: {e}"));
    let mut out = Vec::new();
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    let mut rest = &data[4..];
    while let Some(n) = u32_at(rest, 0) {
        if n == LZ4_LEGACY_MAGIC {
            rest = &rest[4..];
            continue;
        }
        let n = n as usize;
        let Some(compressed) = rest.get(4..4 + n) else {
            // Not a block: the trailing uncompressed size.
            break;
        };
        let k = lz4_flex::block::decompress_into(compressed, &mut block)
            .map_err(|e| corrupt(e.to_string()))?;
        out.extend_from_slice(&block[..k]);
        rest = &rest[4 + n..];
    }
    if out.is_empty() {
        return Err(corrupt("no blocks".into()));
    }
    Ok(out)
}

/// The vmlinux ELF inside `bzimage`.
pub fn extract(bzimage: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    let payload = payload(bzimage)?;
    let elf = match payload {
        [0x02, 0x21, 0x4c, 0x18, ..] => lz4_legacy(payload)?,
        [0x1f, 0x8b, ..] => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(payload)
                .read_to_end(&mut out)
                .map_err(|e| VmlinuxError::Corrupt(format!("gzip: {e}")))?;
            out
        }
        other => {
            let magic: String = other.iter().take(4).map(|b| format!("{b:02x}")).collect();
            return Err(VmlinuxError::UnsupportedFormat(magic));
        }
    };
    if !elf.starts_with(b"\x7fELF") {
        return Err(VmlinuxError::NotElf);
    }
    Ok(elf)
}

/// ELF64 header fields and program header layout (little-endian, `EI_CLASS` 2, `EI_DATA` 1).
const E_PHOFF: usize = 0x20;
const E_PHENTSIZE: usize = 0x36;
const E_PHNUM: usize = 0x38;
const PT_LOAD: u32 = 1;
const P_OFFSET: usize = 0x08;
const P_FILESZ: usize = 0x20;
const P_MEMSZ: usize = 0x28;

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Leaves the zero bytes at the end of each loadable segment to the loader, as a linker does for
/// `.bss`: a segment's file size shrinks to its last non-zero byte, its memory size stays. The
/// kernel the bzImage carries stores its `.bss`, `.brk` and `.init.scratch` as zeros in the file
/// (11 MiB of Debian's 6.1 cloud kernel); a VMM loading into fresh (zeroed) guest memory then
/// neither copies them nor faults in host pages the guest may never touch. A segment keeps at
/// least one byte, because a loader skips empty ones and would not count their memory as the
/// kernel's. Returns the bytes no longer loaded; an ELF this does not understand is left as it is.
pub fn trim_segment_zero_tails(elf: &mut [u8]) -> u64 {
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return 0;
    }
    let (Some(phoff), Some(entsize), Some(phnum)) = (
        u64_at(elf, E_PHOFF),
        u16_at(elf, E_PHENTSIZE),
        u16_at(elf, E_PHNUM),
    ) else {
        return 0;
    };
    let mut trimmed = 0;
    for i in 0..u64::from(phnum) {
        let Some(ph) = usize::try_from(phoff + i * u64::from(entsize)).ok() else {
            return trimmed;
        };
        let (Some(kind), Some(offset), Some(filesz), Some(memsz)) = (
            u32_at(elf, ph),
            u64_at(elf, ph + P_OFFSET),
            u64_at(elf, ph + P_FILESZ),
            u64_at(elf, ph + P_MEMSZ),
        ) else {
            return trimmed;
        };
        let data = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(offset.saturating_add(filesz)).ok())
            .and_then(|(from, to)| elf.get(from..to));
        let Some(data) = data.filter(|_| kind == PT_LOAD && filesz <= memsz) else {
            continue;
        };
        let kept = data
            .iter()
            .rposition(|&b| b != 0)
            .map_or(1, |last| last + 1) as u64;
        let kept = kept.min(filesz);
        elf[ph + P_FILESZ..ph + P_FILESZ + 8].copy_from_slice(&kept.to_le_bytes());
        trimmed += filesz - kept;
    }
    trimmed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal bzImage: one setup sector plus the boot sector, then the payload.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 2 * 512];
        img[SETUP_SECTS] = 1;
        img[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
        img[VERSION..VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        img[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&16u32.to_le_bytes());
        img[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(&[0u8; 16]);
        img.extend_from_slice(payload);
        img
    }

    fn fake_elf(len: usize) -> Vec<u8> {
        let mut elf = b"\x7fELF".to_vec();
        elf.extend((0..len).map(|i| (i % 251) as u8));
        elf
    }

    fn lz4_legacy_frame(data: &[u8], block: usize) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(block) {
            let c = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            out.extend_from_slice(&c);
        }
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out
    }

    #[test]
    fn lz4_legacy_payload_with_several_blocks() {
        let elf = fake_elf(3 * LZ4_LEGACY_BLOCK / 2);
        let img = bzimage(&lz4_legacy_frame(&elf, LZ4_LEGACY_BLOCK));
        assert_eq!(extract(&img).unwrap(), elf);
    }

    #[test]
    fn gzip_payload() {
        let elf = fake_elf(100_000);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&elf).unwrap();
        assert_eq!(extract(&bzimage(&gz.finish().unwrap())).unwrap(), elf);
    }

    #[test]
    fn bad_input_is_reported() {
        assert_eq!(extract(&[0u8; 4096]), Err(VmlinuxError::NotBzImage));
        let mut img = bzimage(b"\x28\xb5\x2f\xfdzstd");
        assert!(
            matches!(extract(&img), Err(VmlinuxError::UnsupportedFormat(m)) if m == "28b52ffd")
        );
        img[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(extract(&img), Err(VmlinuxError::PayloadOutOfBounds));
        let not_elf = lz4_legacy_frame(&[7u8; 1000], LZ4_LEGACY_BLOCK);
        assert_eq!(extract(&bzimage(&not_elf)), Err(VmlinuxError::NotElf));
        let mut broken = lz4_legacy_frame(&fake_elf(1000), LZ4_LEGACY_BLOCK);
        broken[8] ^= 0xff;
        broken[9] ^= 0xff;
        assert!(extract(&bzimage(&broken)).is_err());
    }

    /// An ELF64 with the given loadable segments (data, memory size), data laid out after the
    /// program headers.
    fn elf_with_segments(segments: &[(&[u8], u64)]) -> Vec<u8> {
        let phoff = 64usize;
        let mut elf = vec![0u8; phoff + 56 * segments.len()];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[E_PHOFF..E_PHOFF + 8].copy_from_slice(&(phoff as u64).to_le_bytes());
        elf[E_PHENTSIZE..E_PHENTSIZE + 2].copy_from_slice(&56u16.to_le_bytes());
        elf[E_PHNUM..E_PHNUM + 2].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        for (i, (data, memsz)) in segments.iter().enumerate() {
            let ph = phoff + 56 * i;
            let offset = elf.len() as u64;
            elf[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
            elf[ph + P_OFFSET..ph + P_OFFSET + 8].copy_from_slice(&offset.to_le_bytes());
            elf[ph + P_FILESZ..ph + P_FILESZ + 8]
                .copy_from_slice(&(data.len() as u64).to_le_bytes());
            elf[ph + P_MEMSZ..ph + P_MEMSZ + 8].copy_from_slice(&memsz.to_le_bytes());
            elf.extend_from_slice(data);
        }
        elf
    }

    fn filesz(elf: &[u8], i: usize) -> u64 {
        u64_at(elf, 64 + 56 * i + P_FILESZ).unwrap()
    }

    #[test]
    fn segment_zero_tails_are_left_to_the_loader() {
        let text = [1u8, 2, 3, 4];
        let data_then_bss = [5u8, 0, 6, 0, 0, 0, 0, 0];
        let all_zero = [0u8; 16];
        let mut elf = elf_with_segments(&[(&text, 4), (&data_then_bss, 32), (&all_zero, 16)]);
        let before = elf.clone();
        assert_eq!(trim_segment_zero_tails(&mut elf), 5 + 15);
        assert_eq!(filesz(&elf, 0), 4, "no zero tail: unchanged");
        assert_eq!(filesz(&elf, 1), 3, "up to the last non-zero byte");
        assert_eq!(filesz(&elf, 2), 1, "an all-zero segment keeps one byte");
        for i in 0..3 {
            let memsz = 64 + 56 * i + P_MEMSZ;
            assert_eq!(elf[memsz..memsz + 8], before[memsz..memsz + 8]);
        }
        assert_eq!(elf[232..], before[232..], "segment data is not moved");
        assert_eq!(
            trim_segment_zero_tails(&mut elf),
            0,
            "trimming twice changes nothing"
        );
    }

    #[test]
    fn elfs_it_does_not_understand_are_left_alone() {
        let mut not_elf = fake_elf(1000);
        let copy = not_elf.clone();
        assert_eq!(trim_segment_zero_tails(&mut not_elf), 0);
        assert_eq!(not_elf, copy);
        // Program headers past the end of the file, and a segment whose data is outside it.
        let mut elf = elf_with_segments(&[(&[1, 0, 0], 3)]);
        elf[E_PHNUM..E_PHNUM + 2].copy_from_slice(&9u16.to_le_bytes());
        let ph = 64 + P_OFFSET;
        elf[ph..ph + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let copy = elf.clone();
        assert_eq!(trim_segment_zero_tails(&mut elf), 0);
        assert_eq!(elf, copy);
    }
}
