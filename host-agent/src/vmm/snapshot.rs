//! Snapshot files. A snapshot is a directory:
//! - `state`: a versioned header, the bincode-encoded [`MicrovmState`], and a CRC32 of it;
//! - `memory`: guest RAM as a sparse file (all-zero pages are holes), in guest-physical order of
//!   the RAM regions;
//! - `snapshot.json`: the same facts for humans (kind, sizes, when).
//!
//! Reading checks everything before anything is created: magic, version, length, checksum,
//! decoding, the memory file's size, and the CPU model.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::persist::MicrovmState;
use super::vstate::memory::GuestMemory;

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";
pub const META_FILE: &str = "snapshot.json";

const MAGIC: &[u8; 8] = b"ENVDSNAP";
/// Bump when `MicrovmState` changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 4 + 8;
/// A state file is tens of KiB; anything near this is not ours.
const MAX_STATE_LEN: u64 = 64 << 20;
const PAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not an envd-rs snapshot state file (bad magic)")]
    BadMagic(PathBuf),
    #[error(
        "{path}: snapshot format version {found}, this host-agent reads version {FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("{path} is truncated: header announces {expected} bytes of state, file has {actual}")]
    Truncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{path} is corrupted: checksum {actual:#010x} does not match {expected:#010x}")]
    Checksum {
        path: PathBuf,
        expected: u32,
        actual: u32,
    },
    #[error("{path} cannot be decoded: {reason}")]
    Decode { path: PathBuf, reason: String },
    #[error("memory file {path} has {actual} bytes, the snapshot needs {expected}")]
    MemorySize {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("snapshot was taken on a different CPU ({saved}); this host has {host}")]
    CpuMismatch { saved: String, host: String },
    #[error("cannot encode the VM state: {0}")]
    Encode(String),
}

/// What `snapshot.json` holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub format_version: u32,
    pub kind: SnapshotKind,
    pub mem_mib: u64,
    pub vcpus: usize,
    pub created_unix: u64,
    pub host_agent_version: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    /// Taken before any instance /init: safe to restore into many sandboxes.
    Template,
    /// A sandbox's full state, with whatever it received.
    Full,
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Write {
        path: path.to_path_buf(),
        source,
    }
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Read {
        path: path.to_path_buf(),
        source,
    }
}

/// Encodes the state file's bytes.
pub fn encode_state(state: &MicrovmState) -> Result<Vec<u8>, SnapshotError> {
    let payload = bincode::serialize(state).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    Ok(out)
}

/// Decodes and checks a state file's bytes.
pub fn decode_state(path: &Path, bytes: &[u8]) -> Result<MicrovmState, SnapshotError> {
    let p = || path.to_path_buf();
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err(SnapshotError::BadMagic(p()));
    }
    let u32_at =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: p(),
            found: version,
        });
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&bytes[16..24]);
    let len = u64::from_le_bytes(len_bytes);
    let actual = (bytes.len() - HEADER_LEN) as u64;
    if len > MAX_STATE_LEN || actual < len + 4 {
        return Err(SnapshotError::Truncated {
            path: p(),
            expected: len + 4,
            actual,
        });
    }
    let len = len as usize;
    let payload = &bytes[HEADER_LEN..HEADER_LEN + len];
    let expected = u32_at(HEADER_LEN + len);
    let computed = crc32fast::hash(payload);
    if computed != expected {
        return Err(SnapshotError::Checksum {
            path: p(),
            expected,
            actual: computed,
        });
    }
    bincode::deserialize(payload).map_err(|e| SnapshotError::Decode {
        path: p(),
        reason: e.to_string(),
    })
}

/// Reads and checks `dir/state`.
pub fn read_state(dir: &Path) -> Result<MicrovmState, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let mut file = File::open(&path).map_err(read_err(&path))?;
    let size = file.metadata().map_err(read_err(&path))?.len();
    if size > MAX_STATE_LEN + HEADER_LEN as u64 + 4 {
        return Err(SnapshotError::Decode {
            path,
            reason: format!("{size} bytes is too large for a state file"),
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.read_to_end(&mut bytes).map_err(read_err(&path))?;
    decode_state(&path, &bytes)
}

/// Opens `dir/memory` read-only and checks its size.
pub fn open_memory(dir: &Path, expected: u64) -> Result<File, SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let file = File::open(&path).map_err(read_err(&path))?;
    let actual = file.metadata().map_err(read_err(&path))?.len();
    if actual != expected {
        return Err(SnapshotError::MemorySize {
            path,
            expected,
            actual,
        });
    }
    Ok(file)
}

/// Writes guest memory to `path` as a sparse file: pages of zeros stay holes, so a template's
/// memory file costs only what the guest touched.
pub fn write_memory(mem: &GuestMemory, path: &Path) -> Result<u64, SnapshotError> {
    let file = File::create(path).map_err(write_err(path))?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total).map_err(write_err(path))?;
    let mut buf = vec![0u8; 2 << 20];
    let mut file_offset = 0u64;
    let mut written = 0u64;
    for region in mem.iter() {
        let start = region.start_addr().0;
        let mut at = 0u64;
        while at < region.len() {
            let n = buf.len().min((region.len() - at) as usize);
            mem.read_slice(&mut buf[..n], GuestAddress(start + at))
                .map_err(|e| SnapshotError::Write {
                    path: path.to_path_buf(),
                    source: std::io::Error::other(e.to_string()),
                })?;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                if page.iter().any(|b| *b != 0) {
                    file.write_all_at(page, file_offset + at + (i * PAGE) as u64)
                        .map_err(write_err(path))?;
                    written += page.len() as u64;
                }
            }
            at += n as u64;
        }
        file_offset += region.len();
    }
    file.sync_all().map_err(write_err(path))?;
    Ok(written)
}

/// Writes the state file atomically.
pub fn write_state(dir: &Path, state: &MicrovmState) -> Result<(), SnapshotError> {
    write_atomically(dir, STATE_FILE, &encode_state(state)?)
}

/// Writes `dir/name` atomically: a temporary file of this process's own beside it, synced, then
/// renamed over it, so a reader sees the old file or the whole new one, never half of one.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), SnapshotError> {
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut f = File::create(&tmp).map_err(write_err(&tmp))?;
    f.write_all(bytes).map_err(write_err(&tmp))?;
    f.sync_all().map_err(write_err(&tmp))?;
    let path = dir.join(name);
    std::fs::rename(&tmp, &path).map_err(write_err(&path))
}

pub fn write_meta(dir: &Path, meta: &SnapshotMeta) -> Result<(), SnapshotError> {
    let path = dir.join(META_FILE);
    let text =
        serde_json::to_string_pretty(meta).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    std::fs::write(&path, text).map_err(write_err(&path))
}
