//! An in-memory description of an initramfs: paths mapped to directories, files (host paths or bytes),
//! symlinks and device nodes, written out as one newc cpio archive.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::cpio::CpioWriter;

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad image path {0:?}")]
    BadPath(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TreeError + '_ {
    move |source| TreeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { perm: u32 },
    File { src: Source, perm: u32 },
    Symlink { target: String },
    CharDev { perm: u32, major: u32, minor: u32 },
}

/// Paths are stored without the leading `/`; a `BTreeMap` orders every parent before its children.
#[derive(Debug, Default, Clone)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
    /// Entries that a rootfs layer may replace (applet links, default /etc/passwd).
    weak: std::collections::BTreeSet<String>,
}

/// Normalizes `/a//b/./c` to `a/b/c`; rejects `..` and empty paths.
pub fn clean(path: &str) -> Result<String, TreeError> {
    let mut parts = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => return Err(TreeError::BadPath(path.to_string())),
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(TreeError::BadPath(path.to_string()));
    }
    Ok(parts.join("/"))
}

impl Tree {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, path: &str) -> Option<&Node> {
        clean(path).ok().and_then(|p| self.nodes.get(&p))
    }

    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(String::as_str)
    }

    pub fn is_weak(&self, path: &str) -> bool {
        self.weak.contains(path)
    }

    /// Inserts (or replaces) a node, creating missing parent directories (0755).
    pub fn insert(&mut self, path: &str, node: Node) -> Result<(), TreeError> {
        let path = clean(path)?;
        let mut parent = String::new();
        let comps: Vec<&str> = path.split('/').collect();
        for c in &comps[..comps.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(c);
            self.nodes
                .entry(parent.clone())
                .or_insert(Node::Dir { perm: 0o755 });
        }
        self.weak.remove(&path);
        self.nodes.insert(path, node);
        Ok(())
    }

    /// Like [`Tree::insert`], but a rootfs layer wins over it.
    pub fn insert_weak(&mut self, path: &str, node: Node) -> Result<(), TreeError> {
        self.insert(path, node)?;
        self.weak.insert(clean(path)?);
        Ok(())
    }

    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), TreeError> {
        self.insert(path, Node::Dir { perm })
    }

    pub fn bytes(
        &mut self,
        path: &str,
        perm: u32,
        data: impl Into<Vec<u8>>,
    ) -> Result<(), TreeError> {
        self.insert(
            path,
            Node::File {
                src: Source::Bytes(data.into()),
                perm,
            },
        )
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), TreeError> {
        self.insert(
            path,
            Node::Symlink {
                target: target.to_string(),
            },
        )
    }

    /// A host file (symlinks followed), keeping its permission bits unless `perm` is given.
    pub fn host_file(
        &mut self,
        path: &str,
        host: &Path,
        perm: Option<u32>,
    ) -> Result<(), TreeError> {
        let meta = std::fs::metadata(host).map_err(io_err(host))?;
        if !meta.is_file() {
            return Err(TreeError::Io {
                path: host.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
            });
        }
        let perm = perm.unwrap_or(meta.permissions().mode() & 0o7777);
        self.insert(
            path,
            Node::File {
                src: Source::Host(host.to_path_buf()),
                perm,
            },
        )
    }

    /// A host directory tree copied under `path`; symlinks are kept as symlinks.
    pub fn host_dir(&mut self, path: &str, host: &Path) -> Result<(), TreeError> {
        let meta = std::fs::metadata(host).map_err(io_err(host))?;
        self.dir(path, meta.permissions().mode() & 0o7777)?;
        let mut entries: Vec<_> = std::fs::read_dir(host)
            .map_err(io_err(host))?
            .collect::<Result<_, _>>()
            .map_err(io_err(host))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let child = format!("{path}/{name}");
            let hp = e.path();
            let ft = e.file_type().map_err(io_err(&hp))?;
            if ft.is_symlink() {
                let target = std::fs::read_link(&hp).map_err(io_err(&hp))?;
                self.symlink(&child, &target.to_string_lossy())?;
            } else if ft.is_dir() {
                self.host_dir(&child, &hp)?;
            } else if ft.is_file() {
                self.host_file(&child, &hp, None)?;
            }
        }
        Ok(())
    }

    /// Writes every node, in path order, into a cpio writer (no trailer).
    pub fn write_entries<W: Write>(
        &self,
        w: &mut CpioWriter<W>,
        skip: &dyn Fn(&str, &Node) -> bool,
    ) -> Result<(), TreeError> {
        for (path, node) in &self.nodes {
            if skip(path, node) {
                continue;
            }
            let e = |source| TreeError::Io {
                path: PathBuf::from(path),
                source,
            };
            match node {
                Node::Dir { perm } => w.dir(path, *perm).map_err(e)?,
                Node::Symlink { target } => w.symlink(path, target).map_err(e)?,
                Node::CharDev { perm, major, minor } => {
                    w.char_dev(path, *perm, *major, *minor).map_err(e)?
                }
                Node::File {
                    src: Source::Bytes(b),
                    perm,
                } => w.file_bytes(path, *perm, b).map_err(e)?,
                Node::File {
                    src: Source::Host(h),
                    perm,
                } => {
                    let mut f = File::open(h).map_err(io_err(h))?;
                    let len = f.metadata().map_err(io_err(h))?.len();
                    w.file(path, *perm, len, &mut f).map_err(io_err(h))?;
                }
            }
        }
        Ok(())
    }

    /// Writes the whole tree as one cpio archive to `out`; returns its size.
    pub fn write_cpio_file(&self, out: &Path) -> Result<u64, TreeError> {
        let f = File::create(out).map_err(io_err(out))?;
        let mut w = CpioWriter::new(BufWriter::with_capacity(1 << 20, f));
        self.write_entries(&mut w, &|_, _| false)?;
        let n = w.written();
        w.finish().map_err(io_err(out))?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio;

    #[test]
    fn parents_are_created_and_ordered() {
        let mut t = Tree::new();
        t.bytes("/etc/envd/envd.json", 0o644, "{}").unwrap();
        t.symlink("bin/sh", "busybox").unwrap();
        t.dir("etc-extra", 0o700).unwrap();
        let mut w = CpioWriter::new(Vec::new());
        t.write_entries(&mut w, &|_, _| false).unwrap();
        let buf = w.finish().unwrap();
        let names: Vec<String> = cpio::parse(&buf)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "etc",
                "etc-extra",
                "etc/envd",
                "etc/envd/envd.json"
            ]
        );
    }

    #[test]
    fn clean_paths() {
        assert_eq!(clean("/a//b/./c").unwrap(), "a/b/c");
        assert!(clean("/a/../b").is_err());
        assert!(clean("/").is_err());
    }

    #[test]
    fn weak_entries_are_tracked_and_overridden() {
        let mut t = Tree::new();
        t.insert_weak(
            "etc/passwd",
            Node::File {
                src: Source::Bytes(vec![]),
                perm: 0o644,
            },
        )
        .unwrap();
        assert!(t.is_weak("etc/passwd"));
        t.bytes("etc/passwd", 0o644, "root:x:0:0::/root:/bin/sh\n")
            .unwrap();
        assert!(!t.is_weak("etc/passwd"));
    }
}
