//! Kernel module metadata from each `.ko`'s own `.modinfo` ELF section, and a load order derived from it.
//!
//! We deliberately do not read `modules.dep`: the `.modinfo` `depends=` list is what the kernel itself
//! checks, and it travels with the module file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};

#[derive(Debug, thiserror::Error)]
pub enum ModError {
    #[error("reading module {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("module {0} has no .modinfo section")]
    NoModinfo(PathBuf),
    #[error("module {name:?} (needed by {needed_by}) not found under {dir}")]
    NotFound {
        name: String,
        needed_by: String,
        dir: PathBuf,
    },
    #[error("module dependency cycle through {0:?}")]
    Cycle(String),
    #[error("module {0} is compressed; only uncompressed .ko files are supported")]
    Compressed(PathBuf),
}

/// The fields of `.modinfo` we use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModInfo {
    pub name: Option<String>,
    pub depends: Vec<String>,
    pub vermagic: Option<String>,
}

/// Module names use `_` where file names may use `-`; the kernel treats them as equal.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Parses the NUL-separated `key=value` strings of a `.modinfo` section.
pub fn parse_modinfo_section(section: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    for field in section.split(|b| *b == 0) {
        let Ok(field) = std::str::from_utf8(field) else {
            continue;
        };
        let Some((key, value)) = field.split_once('=') else {
            continue;
        };
        match key {
            "name" => info.name = Some(normalize(value)),
            "vermagic" => info.vermagic = Some(value.to_string()),
            "depends" => {
                info.depends = value
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(normalize)
                    .collect();
            }
            _ => {}
        }
    }
    info
}

/// Reads `.modinfo` from an ELF module image. Falls back to scanning for the `depends=` / `name=` strings
/// when the ELF cannot be parsed (the strings are NUL-delimited either way).
pub fn modinfo_from_elf(data: &[u8]) -> Option<ModInfo> {
    if let Ok(file) = object::File::parse(data) {
        let section = file.section_by_name(".modinfo")?;
        return section.data().ok().map(parse_modinfo_section);
    }
    let mut info = ModInfo::default();
    let mut found = false;
    for field in data.split(|b| *b == 0) {
        for key in [&b"depends="[..], b"name="] {
            if field.starts_with(key) {
                found = true;
                let parsed = parse_modinfo_section(field);
                if key == b"depends=" {
                    info.depends = parsed.depends;
                } else {
                    info.name = parsed.name;
                }
            }
        }
    }
    found.then_some(info)
}

pub fn read_modinfo(path: &Path) -> Result<ModInfo, ModError> {
    let data = std::fs::read(path).map_err(|source| ModError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    modinfo_from_elf(&data).ok_or_else(|| ModError::NoModinfo(path.to_path_buf()))
}

/// Orders `roots` and everything they depend on so that every module comes after its dependencies.
/// Deterministic: roots are visited in the given order, dependencies in their listed order.
/// `deps` maps a module name to its `depends=` list; a name missing from `deps` is an error unless it is in
/// `builtin` (built into the kernel image, so there is nothing to load).
pub fn load_order(
    roots: &[String],
    deps: &HashMap<String, Vec<String>>,
    builtin: &HashSet<String>,
) -> Result<Vec<String>, (String, String)> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit(
        name: &str,
        parent: &str,
        deps: &HashMap<String, Vec<String>>,
        builtin: &HashSet<String>,
        marks: &mut HashMap<String, Mark>,
        out: &mut Vec<String>,
    ) -> Result<(), (String, String)> {
        match marks.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => return Err((name.to_string(), "cycle".to_string())),
            None => {}
        }
        let Some(list) = deps.get(name) else {
            if builtin.contains(name) {
                marks.insert(name.to_string(), Mark::Done);
                return Ok(());
            }
            return Err((name.to_string(), parent.to_string()));
        };
        marks.insert(name.to_string(), Mark::Visiting);
        for d in list {
            visit(d, name, deps, builtin, marks, out)?;
        }
        marks.insert(name.to_string(), Mark::Done);
        out.push(name.to_string());
        Ok(())
    }
    let mut marks = HashMap::new();
    let mut out = Vec::new();
    for r in roots {
        visit(
            &normalize(r),
            "(requested)",
            deps,
            builtin,
            &mut marks,
            &mut out,
        )?;
    }
    Ok(out)
}

/// The modules of one kernel release: an index from module name to `.ko` path.
#[derive(Debug, Clone)]
pub struct ModuleTree {
    /// `lib/modules/<release>` inside an unpacked kernel package.
    pub dir: PathBuf,
    index: BTreeMap<String, PathBuf>,
    builtin: HashSet<String>,
}

/// One module selected for loading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectedModule {
    pub name: String,
    /// Path relative to `lib/modules/<release>`, e.g. `kernel/drivers/virtio/virtio.ko`.
    pub rel_path: PathBuf,
    pub depends: Vec<String>,
}

impl ModuleTree {
    pub fn open(dir: &Path) -> Result<Self, ModError> {
        let mut index = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ModError::Io { path, source }
        };
        let mut compressed = BTreeMap::new();
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).map_err(io(&d))? {
                let entry = entry.map_err(io(&d))?;
                let path = entry.path();
                let ft = entry.file_type().map_err(io(&path))?;
                if ft.is_dir() {
                    stack.push(path);
                    continue;
                }
                let fname = entry.file_name().to_string_lossy().into_owned();
                if let Some(stem) = fname.strip_suffix(".ko") {
                    index.insert(normalize(stem), path);
                } else if let Some(stem) = [".ko.xz", ".ko.zst", ".ko.gz"]
                    .iter()
                    .find_map(|s| fname.strip_suffix(s))
                {
                    compressed.insert(normalize(stem), path);
                }
            }
        }
        let builtin = std::fs::read_to_string(dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.rsplit('/').next())
            .filter_map(|f| f.strip_suffix(".ko"))
            .map(normalize)
            .collect();
        if index.is_empty() {
            if let Some((_, p)) = compressed.into_iter().next() {
                return Err(ModError::Compressed(p));
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            index,
            builtin,
        })
    }

    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize(name))
    }

    /// Resolves `roots` and their dependencies (from `.modinfo`) into a load order.
    pub fn resolve(&self, roots: &[String]) -> Result<Vec<SelectedModule>, ModError> {
        // Read .modinfo of the closure only, breadth first.
        let mut deps: HashMap<String, Vec<String>> = HashMap::new();
        let mut queue: Vec<(String, String)> = roots
            .iter()
            .map(|r| (normalize(r), "(requested)".to_string()))
            .collect();
        while let Some((name, parent)) = queue.pop() {
            if deps.contains_key(&name) {
                continue;
            }
            let Some(path) = self.index.get(&name) else {
                if self.builtin.contains(&name) {
                    continue;
                }
                return Err(ModError::NotFound {
                    name,
                    needed_by: parent,
                    dir: self.dir.clone(),
                });
            };
            let info = read_modinfo(path)?;
            for d in &info.depends {
                queue.push((d.clone(), name.clone()));
            }
            deps.insert(name, info.depends);
        }
        let order = load_order(roots, &deps, &self.builtin).map_err(|(name, parent)| {
            if parent == "cycle" {
                ModError::Cycle(name)
            } else {
                ModError::NotFound {
                    name,
                    needed_by: parent,
                    dir: self.dir.clone(),
                }
            }
        })?;
        order
            .into_iter()
            .map(|name| {
                let path = &self.index[&name];
                let rel_path = path.strip_prefix(&self.dir).unwrap_or(path).to_path_buf();
                let depends = deps.get(&name).cloned().unwrap_or_default();
                Ok(SelectedModule {
                    name,
                    rel_path,
                    depends,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses_modinfo_fields() {
        let sec = b"license=GPL\0depends=virtio_ring,virtio\0retpoline=Y\0intree=Y\0name=virtio_pci\0vermagic=6.1.0 SMP\0";
        let info = parse_modinfo_section(sec);
        assert_eq!(info.name.as_deref(), Some("virtio_pci"));
        assert_eq!(info.depends, s(&["virtio_ring", "virtio"]));
        assert_eq!(info.vermagic.as_deref(), Some("6.1.0 SMP"));
    }

    #[test]
    fn empty_depends_and_hyphens() {
        let info = parse_modinfo_section(b"depends=\0name=kvm-amd\0");
        assert!(info.depends.is_empty());
        assert_eq!(info.name.as_deref(), Some("kvm_amd"));
        let info = parse_modinfo_section(b"depends=a-b,,c\0");
        assert_eq!(info.depends, s(&["a_b", "c"]));
    }

    #[test]
    fn scan_fallback_without_elf() {
        let mut blob = b"\x00garbage\x00".to_vec();
        blob.extend_from_slice(b"depends=vsock,virtio\0name=vmw_vsock_virtio_transport\0");
        let info = modinfo_from_elf(&blob).unwrap();
        assert_eq!(info.depends, s(&["vsock", "virtio"]));
        assert_eq!(info.name.as_deref(), Some("vmw_vsock_virtio_transport"));
        assert!(modinfo_from_elf(b"nothing here").is_none());
    }

    fn virtio_deps() -> HashMap<String, Vec<String>> {
        [
            ("virtio", vec![]),
            ("virtio_ring", vec![]),
            ("virtio_mmio", vec!["virtio", "virtio_ring"]),
            ("virtio_pci_modern_dev", vec![]),
            ("virtio_pci_legacy_dev", vec![]),
            (
                "virtio_pci",
                vec![
                    "virtio_pci_modern_dev",
                    "virtio_pci_legacy_dev",
                    "virtio",
                    "virtio_ring",
                ],
            ),
            ("vsock", vec![]),
            ("vmw_vsock_virtio_transport_common", vec!["vsock"]),
            (
                "vmw_vsock_virtio_transport",
                vec![
                    "vmw_vsock_virtio_transport_common",
                    "virtio",
                    "virtio_ring",
                    "vsock",
                ],
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), s(&v)))
        .collect()
    }

    #[test]
    fn orders_dependencies_first() {
        let deps = virtio_deps();
        let order = load_order(
            &s(&["vmw_vsock_virtio_transport", "virtio_pci", "virtio_mmio"]),
            &deps,
            &HashSet::new(),
        )
        .unwrap();
        let pos = |n: &str| order.iter().position(|x| x == n).unwrap();
        for (m, ds) in &deps {
            if order.contains(m) {
                for d in ds {
                    assert!(pos(d) < pos(m), "{d} must load before {m}: {order:?}");
                }
            }
        }
        assert_eq!(order.len(), deps.len());
        // No duplicates.
        let uniq: HashSet<_> = order.iter().collect();
        assert_eq!(uniq.len(), order.len());
        // Deterministic.
        assert_eq!(
            order,
            load_order(
                &s(&["vmw_vsock_virtio_transport", "virtio_pci", "virtio_mmio"]),
                &deps,
                &HashSet::new()
            )
            .unwrap()
        );
    }

    #[test]
    fn builtin_is_skipped_missing_is_error_cycle_detected() {
        let mut deps = HashMap::new();
        deps.insert("a".to_string(), s(&["b", "c"]));
        deps.insert("c".to_string(), vec![]);
        let builtin: HashSet<String> = ["b".to_string()].into();
        assert_eq!(
            load_order(&s(&["a"]), &deps, &builtin).unwrap(),
            s(&["c", "a"])
        );
        let err = load_order(&s(&["a"]), &deps, &HashSet::new()).unwrap_err();
        assert_eq!(err, ("b".to_string(), "a".to_string()));
        deps.insert("c".to_string(), s(&["a"]));
        assert_eq!(
            load_order(&s(&["a"]), &deps, &builtin).unwrap_err().1,
            "cycle"
        );
    }
}
