//! Layering a rootfs tarball (`docker export` output, or a tar of a debootstrap tree; plain or gzip) under
//! the files the builder adds.
//!
//! Two passes over the tarball: `scan` records what it contains (so the builder's weak entries, like busybox
//! applet links, can yield to the image's own tools, and our directories do not replace the image's
//! directory symlinks such as `bin -> usr/bin`), then `write_layer` streams its contents into the archive.
//! Ownership is not carried over (every entry is root-owned), and hard links become symlinks.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use crate::cpio::CpioWriter;
use crate::tree::{self, Node, Tree};

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("rootfs {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink(String),
    Other,
}

/// What a rootfs tarball contains, by cleaned path.
#[derive(Debug, Default)]
pub struct Layer {
    pub entries: HashMap<String, Kind>,
}

fn open(path: &Path) -> Result<Box<dyn Read>, RootfsError> {
    let err = |source| RootfsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = BufReader::new(File::open(path).map_err(err)?);
    let mut magic = [0u8; 2];
    f.read_exact(&mut magic).map_err(err)?;
    let f = BufReader::new(File::open(path).map_err(err)?);
    Ok(if magic == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(f))
    } else {
        Box::new(f)
    })
}

pub fn scan(path: &Path) -> Result<Layer, RootfsError> {
    let err = |source| RootfsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut ar = tar::Archive::new(open(path)?);
    let mut layer = Layer::default();
    for e in ar.entries().map_err(err)? {
        let e = e.map_err(err)?;
        let Ok(name) = tree::clean(&e.path().map_err(err)?.to_string_lossy()) else {
            continue;
        };
        let kind = match e.header().entry_type() {
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::Link => {
                Kind::File
            }
            tar::EntryType::Symlink => Kind::Symlink(
                e.link_name()
                    .map_err(err)?
                    .map(|l| l.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
            _ => Kind::Other,
        };
        layer.entries.insert(name, kind);
    }
    Ok(layer)
}

impl Layer {
    /// Resolves the parent components of `path` through the layer's symlinks (as the kernel does when it
    /// unpacks), leaving the last component as is.
    pub fn resolve_parent(&self, path: &str) -> String {
        let mut resolved: Vec<String> = Vec::new();
        let mut pending: Vec<String> = path.split('/').rev().map(str::to_string).collect();
        let mut hops = 0;
        while let Some(c) = pending.pop() {
            if c.is_empty() || c == "." {
                continue;
            }
            if c == ".." {
                resolved.pop();
                continue;
            }
            resolved.push(c);
            if pending.is_empty() {
                break;
            }
            let cur = resolved.join("/");
            if let Some(Kind::Symlink(target)) = self.entries.get(&cur) {
                hops += 1;
                if hops > 40 {
                    break;
                }
                resolved.pop();
                if target.starts_with('/') {
                    resolved.clear();
                }
                pending.extend(target.split('/').rev().map(str::to_string));
            }
        }
        resolved.join("/")
    }

    /// Whether the builder's entry at `path` should be left out because the layer provides that path:
    /// our directories never replace the layer's entries, and weak entries yield.
    pub fn shadows(&self, path: &str, node: &Node, tree: &Tree) -> bool {
        let resolved = self.resolve_parent(path);
        if !self.entries.contains_key(&resolved) {
            return false;
        }
        matches!(node, Node::Dir { .. }) || tree.is_weak(path)
    }
}

/// Streams the layer's entries into `w`, leaving out those the tree replaces with a non-directory strong
/// entry (a symlink cannot be replaced in place by the unpacker, and a duplicate file is wasted space).
pub fn write_layer<W: Write>(
    path: &Path,
    _layer: &Layer,
    tree: &Tree,
    w: &mut CpioWriter<W>,
) -> Result<(), RootfsError> {
    let err = |source| RootfsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut ar = tar::Archive::new(open(path)?);
    for e in ar.entries().map_err(err)? {
        let mut e = e.map_err(err)?;
        let Ok(name) = tree::clean(&e.path().map_err(err)?.to_string_lossy()) else {
            continue;
        };
        if let Some(node) = tree.get(&name) {
            if !matches!(node, Node::Dir { .. }) && !tree.is_weak(&name) {
                continue;
            }
        }
        let perm = e.header().mode().unwrap_or(0o644) & 0o7777;
        match e.header().entry_type() {
            tar::EntryType::Directory => w.dir(&name, perm).map_err(err)?,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let len = e.size();
                w.file(&name, perm, len, &mut e).map_err(err)?
            }
            tar::EntryType::Symlink => {
                let target = e
                    .link_name()
                    .map_err(err)?
                    .map(|l| l.to_string_lossy().into_owned())
                    .unwrap_or_default();
                w.symlink(&name, &target).map_err(err)?
            }
            tar::EntryType::Link => {
                let target = e
                    .link_name()
                    .map_err(err)?
                    .map(|l| l.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if let Ok(t) = tree::clean(&target) {
                    w.symlink(&name, &format!("/{t}")).map_err(err)?
                }
            }
            tar::EntryType::Char => {
                let major = e.header().device_major().ok().flatten().unwrap_or(0);
                let minor = e.header().device_minor().ok().flatten().unwrap_or(0);
                w.char_dev(&name, perm, major, minor).map_err(err)?
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio;

    fn sample_tar() -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut b = tar::Builder::new(File::create(f.path()).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, "bin", "usr/bin").unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        b.append_data(&mut h, "usr/bin/", std::io::empty()).unwrap();
        for (p, data) in [
            ("usr/bin/sh", &b"#!dash"[..]),
            ("etc/passwd", b"root:x:0:0::/root:/bin/bash\n"),
            ("init", b"old"),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            b.append_data(&mut h, p, data).unwrap();
        }
        b.finish().unwrap();
        f
    }

    #[test]
    fn layering_rules() {
        let tar = sample_tar();
        let layer = scan(tar.path()).unwrap();
        assert_eq!(layer.resolve_parent("bin/sh"), "usr/bin/sh");
        assert_eq!(layer.resolve_parent("bin"), "bin");

        let mut t = Tree::new();
        crate::components::base_layout(&mut t).unwrap();
        t.insert_weak(
            "bin/sh",
            Node::Symlink {
                target: "/bin/busybox".into(),
            },
        )
        .unwrap();
        t.insert_weak(
            "bin/tr",
            Node::Symlink {
                target: "/bin/busybox".into(),
            },
        )
        .unwrap();
        t.bytes("init", 0o755, "envd").unwrap();
        let mut w = CpioWriter::new(Vec::new());
        write_layer(tar.path(), &layer, &t, &mut w).unwrap();
        t.write_entries(&mut w, &|p, n| layer.shadows(p, n, &t))
            .unwrap();
        let entries = cpio::parse(&w.finish().unwrap()).unwrap();
        let find = |n: &str| entries.iter().filter(|e| e.name == n).collect::<Vec<_>>();
        // The image's bin symlink is kept, not replaced by our directory.
        assert_eq!(find("bin").len(), 1);
        assert_eq!(find("bin")[0].data, b"usr/bin");
        // The image's sh wins over the busybox applet; tr (absent from the image) is added.
        assert!(find("bin/sh").is_empty());
        assert_eq!(find("bin/tr").len(), 1);
        // The image's passwd wins over our default; our /init replaces the image's.
        assert_eq!(find("etc/passwd").len(), 1);
        assert!(find("etc/passwd")[0].data.ends_with(b"bash\n"));
        assert_eq!(find("init").len(), 1);
        assert_eq!(find("init")[0].data, b"envd");
    }
}
