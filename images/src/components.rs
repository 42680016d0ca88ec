//! The registry packages every image is made of: Debian's cloud kernel and busybox-static.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::deb::{DebCache, DebError};
use crate::modinfo::{ModError, ModuleTree, SelectedModule};
use crate::tree::{Node, Tree, TreeError};

pub const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";
pub const BUSYBOX_PACKAGE: &str = "busybox-static";

#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    #[error(transparent)]
    Deb(#[from] DebError),
    #[error(transparent)]
    Mod(#[from] ModError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("kernel package {package} has no {what}")]
    KernelLayout { package: String, what: String },
    #[error("running {path} --list-full: {why}")]
    Busybox { path: PathBuf, why: String },
}

/// An unpacked kernel package.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// e.g. `linux-image-6.1.0-37-cloud-amd64`
    pub package: String,
    /// Debian package version, e.g. `6.1.140-1`
    pub version: String,
    /// `uname -r`, e.g. `6.1.0-37-cloud-amd64`
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules: ModuleTree,
}

/// What a manifest records about the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    pub package: String,
    pub version: String,
    pub release: String,
}

impl Kernel {
    pub fn info(&self) -> KernelInfo {
        KernelInfo {
            package: self.package.clone(),
            version: self.version.clone(),
            release: self.release.clone(),
        }
    }

    /// Adds the modules `roots` need, in load order, under `/lib/modules/<release>/`; returns them with their
    /// absolute paths inside the image.
    pub fn install_modules(
        &self,
        tree: &mut Tree,
        roots: &[String],
    ) -> Result<Vec<(SelectedModule, String)>, ComponentError> {
        let selected = self.modules.resolve(roots)?;
        let mut out = Vec::new();
        for m in selected {
            let guest = format!(
                "/lib/modules/{}/{}",
                self.release,
                m.rel_path.to_string_lossy()
            );
            tree.host_file(&guest, &self.modules.dir.join(&m.rel_path), Some(0o644))?;
            out.push((m, guest));
        }
        Ok(out)
    }
}

pub fn fetch_kernel(cache: &DebCache) -> Result<Kernel, ComponentError> {
    let package = cache.resolve_meta(
        KERNEL_META_PACKAGE,
        "linux-image-",
        ("linux-image-", "-cloud-amd64"),
    )?;
    let pkg = cache.unpacked(&package)?;
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_string();
    let vmlinuz = pkg.root.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        return Err(ComponentError::KernelLayout {
            package,
            what: format!("boot/vmlinuz-{release}"),
        });
    }
    let mod_dir = pkg.root.join("lib/modules").join(&release);
    if !mod_dir.is_dir() {
        return Err(ComponentError::KernelLayout {
            package,
            what: format!("lib/modules/{release}"),
        });
    }
    let modules = ModuleTree::open(&mod_dir)?;
    Ok(Kernel {
        package,
        version: pkg.version,
        release,
        vmlinuz,
        modules,
    })
}

#[derive(Debug, Clone)]
pub struct Busybox {
    pub version: String,
    pub binary: PathBuf,
    /// Applet paths without a leading `/`, e.g. `bin/sh`, `usr/bin/tr`.
    pub applets: Vec<String>,
}

pub fn fetch_busybox(cache: &DebCache) -> Result<Busybox, ComponentError> {
    let pkg = cache.unpacked(BUSYBOX_PACKAGE)?;
    let binary = pkg.root.join("bin/busybox");
    let applets = list_applets(&binary)?;
    Ok(Busybox {
        version: pkg.version,
        binary,
        applets,
    })
}

/// Busybox's own list of applet install paths (the binary is static x86-64, so it runs on the build host).
pub fn list_applets(binary: &Path) -> Result<Vec<String>, ComponentError> {
    let err = |why: String| ComponentError::Busybox {
        path: binary.to_path_buf(),
        why,
    };
    let out = Command::new(binary)
        .arg("--list-full")
        .output()
        .map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().trim_start_matches('/').to_string())
        .filter(|l| l.contains('/') && l != "bin/busybox")
        .collect())
}

/// Applets an image does not get. `modprobe`: the kernel runs it for every module it asks for,
/// and a boot asks for six (crypto algorithms it then builds from built-in parts); busybox's
/// modprobe loads nothing without a `modules.dep`, which the image does not have, so each run
/// only cost the guest a process start (about 150 ms of a boot in the nested harness). Without
/// it the kernel's requests fail at once. envd loads the image's modules by path; a rootfs layer
/// that brings kmod's modprobe and its module tree gets a working one back.
const APPLETS_LEFT_OUT: &[&str] = &["sbin/modprobe"];

impl Busybox {
    /// Installs `/bin/busybox` and applet symlinks (but not [`APPLETS_LEFT_OUT`]). Applets are
    /// weak: a rootfs layer's own tools win.
    pub fn install(&self, tree: &mut Tree) -> Result<(), ComponentError> {
        tree.host_file("/bin/busybox", &self.binary, Some(0o755))?;
        for a in self
            .applets
            .iter()
            .filter(|a| !APPLETS_LEFT_OUT.contains(&a.as_str()))
        {
            tree.insert_weak(
                a,
                Node::Symlink {
                    target: "/bin/busybox".to_string(),
                },
            )?;
        }
        Ok(())
    }
}

/// The directories and device nodes every initramfs needs before anything is mounted.
pub fn base_layout(tree: &mut Tree) -> Result<(), TreeError> {
    for d in [
        "proc", "sys", "dev", "run", "etc", "bin", "sbin", "usr/bin", "usr/sbin", "var", "mnt",
    ] {
        tree.dir(d, 0o755)?;
    }
    tree.dir("tmp", 0o1777)?;
    tree.dir("root", 0o700)?;
    tree.insert(
        "dev/console",
        Node::CharDev {
            perm: 0o600,
            major: 5,
            minor: 1,
        },
    )?;
    tree.insert(
        "dev/null",
        Node::CharDev {
            perm: 0o666,
            major: 1,
            minor: 3,
        },
    )?;
    let weak_file = |data: &str| Node::File {
        src: crate::tree::Source::Bytes(data.as_bytes().to_vec()),
        perm: 0o644,
    };
    tree.insert_weak(
        "etc/passwd",
        weak_file(
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
    )?;
    tree.insert_weak("etc/group", weak_file("root:x:0:\nnogroup:x:65534:\n"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busybox_installs_its_applets_but_not_modprobe() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("busybox");
        std::fs::write(&binary, b"\x7fELF").unwrap();
        let busybox = Busybox {
            version: "1".into(),
            binary,
            applets: ["bin/sh", "sbin/modprobe", "sbin/insmod", "usr/bin/tr"]
                .map(String::from)
                .to_vec(),
        };
        let mut tree = Tree::new();
        busybox.install(&mut tree).unwrap();
        for applet in ["bin/sh", "sbin/insmod", "usr/bin/tr"] {
            assert!(
                matches!(tree.get(applet), Some(Node::Symlink { target }) if target == "/bin/busybox"),
                "{applet}"
            );
            assert!(tree.is_weak(applet), "{applet}: a rootfs layer's own wins");
        }
        assert!(tree.get("sbin/modprobe").is_none());
        assert!(tree.get("bin/busybox").is_some());
    }
}
