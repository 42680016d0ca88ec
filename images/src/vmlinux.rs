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
}
