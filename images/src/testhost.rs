//! The test host image: the same Debian cloud kernel, an initramfs with the KVM and vhost-vsock modules,
//! busybox, Debian's `qemu-system-x86_64` with its shared libraries and firmware, and a busybox-sh `/init`
//! that runs one command and reports its output and exit status on serial ports.
//!
//! Serial ports of the test host: `ttyS0` kernel console, `ttyS1` the command's stdout+stderr (raw),
//! `ttyS2` status lines (`READY <uptime>`, `EXIT <code>`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::components::{self, ComponentError};
use crate::deb::DebCache;
use crate::paths;
use crate::tree::{Tree, TreeError};

/// Modules the test host loads: KVM (AMD, as the harness CPU is an EPYC with SVM) and host-side vsock.
pub const TESTHOST_MODULES: &[&str] = &[
    "irqbypass",
    "kvm",
    "kvm_amd",
    "vhost_iotlb",
    "vhost",
    "vsock",
    "vhost_vsock",
];

/// QEMU firmware the inner VMs need (`-M pc` with `-kernel`), searched in QEMU's data dirs.
const QEMU_FIRMWARE: &[&str] = &[
    "share/seabios/bios-256k.bin",
    "share/seabios/bios.bin",
    "share/qemu/kvmvapic.bin",
    "share/qemu/linuxboot.bin",
    "share/qemu/linuxboot_dma.bin",
    "share/qemu/multiboot.bin",
    "share/qemu/multiboot_dma.bin",
    "share/qemu/pvh.bin",
    "share/seabios/vgabios-stdvga.bin",
    "lib/ipxe/qemu/efi-virtio.rom",
];

pub const GUEST_QEMU: &str = "/usr/bin/qemu-system-x86_64";

#[derive(Debug, thiserror::Error)]
pub enum TestHostError {
    #[error(transparent)]
    Component(#[from] ComponentError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error(
        "qemu-system-x86_64 not found (set ENVD_QEMU or run `apt-get install -y qemu-system-x86`)"
    )]
    NoQemu,
    #[error("ldd {path}: {why}")]
    Ldd { path: PathBuf, why: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Default)]
pub struct TestHostOptions {
    /// QEMU to put inside (default: `$ENVD_QEMU` or `qemu-system-x86_64` on `$PATH`).
    pub qemu: Option<PathBuf>,
}

/// A prepared test host: its kernel and the initramfs tree, to which a run adds its files.
pub struct TestHost {
    pub kernel_release: String,
    pub kernel_version: String,
    pub vmlinuz: PathBuf,
    pub tree: Tree,
    /// Directories holding the shared libraries copied in (for `LD_LIBRARY_PATH`).
    pub lib_dirs: Vec<String>,
}

/// The host QEMU binary: `$ENVD_QEMU`, else `qemu-system-x86_64` on `$PATH`.
pub fn find_qemu(explicit: Option<&Path>) -> Result<PathBuf, TestHostError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(TestHostError::NoQemu)
        };
    }
    if let Some(p) = std::env::var_os("ENVD_QEMU") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(TestHostError::NoQemu)
        };
    }
    paths::which("qemu-system-x86_64").ok_or(TestHostError::NoQemu)
}

/// Parses `ldd` output into the library paths it resolved. A missing library is an error.
pub fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            return Err(format!("missing library: {line}"));
        }
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            out.push(PathBuf::from(p));
        }
    }
    Ok(out)
}

/// Whether `path` is an ELF file with a program interpreter (a dynamically linked executable).
pub fn is_dynamic_elf(path: &Path) -> bool {
    use object::Object;
    let Ok(data) = std::fs::read(path) else {
        return false;
    };
    let Ok(file) = object::File::parse(&*data) else {
        return false;
    };
    // A dynamic executable has an .interp section; static-pie ones do not.
    file.section_by_name(".interp").is_some()
}

/// Shared libraries of a dynamically linked executable, by `ldd`.
pub fn shared_libs(path: &Path) -> Result<Vec<PathBuf>, TestHostError> {
    let err = |why: String| TestHostError::Ldd {
        path: path.to_path_buf(),
        why,
    };
    let out = Command::new("ldd")
        .arg(path)
        .output()
        .map_err(|e| err(e.to_string()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable") || text.contains("statically linked") {
            return Ok(Vec::new());
        }
        return Err(err(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    parse_ldd(&text).map_err(err)
}

/// Adds an executable and, if it is dynamically linked, its libraries at the paths `ldd` gave.
pub fn add_executable(
    tree: &mut Tree,
    guest: &str,
    host: &Path,
    lib_dirs: &mut Vec<String>,
) -> Result<(), TestHostError> {
    tree.host_file(guest, host, None)?;
    if is_dynamic_elf(host) {
        for lib in shared_libs(host)? {
            let g = lib.to_string_lossy().into_owned();
            if tree.get(&g).is_none() {
                tree.host_file(&g, &lib, None)?;
            }
            if let Some(dir) = lib.parent().map(|d| d.to_string_lossy().into_owned()) {
                if !lib_dirs.contains(&dir) {
                    lib_dirs.push(dir);
                }
            }
        }
    }
    Ok(())
}

const INIT: &str = r#"#!/bin/sh
# envd-rs test host init (busybox sh). ttyS1: command output, ttyS2: status lines.
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
# What udev sets up on a normal system (bash process substitution needs /dev/fd).
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mount -t devpts devpts /dev/pts
# Snapshots live under /tmp in the tests and benches: with huge=within_size the page cache of a
# snapshot's memory file is 2 MiB pages, so a restored guest faults its read-only memory (kernel
# text, page cache) in 2 MiB at a time instead of 4 KiB (README, "Snapshot storage").
mount -t tmpfs -o mode=1777,huge=within_size tmpfs /tmp
mount -t tmpfs tmpfs /run
# Polled output and status ports (see envd-serial-polling), when the tool is there; at the highest
# rate, which makes the driver's poll interval shortest.
poll=""
command -v envd-serial-polling >/dev/null && envd-serial-polling /dev/ttyS1 /dev/ttyS2 && poll=1
stty -F /dev/ttyS1 raw -echo 115200 2>/dev/null
stty -F /dev/ttyS2 raw -echo 115200 2>/dev/null
exec 8>/dev/ttyS1 9>/dev/ttyS2
while read -r m; do
  insmod "$m" || echo "WARN insmod $m failed" >&9
done < /harness/modules
ip link set lo up 2>/dev/null
echo "READY $(cut -d' ' -f1 /proc/uptime)" >&9
. /harness/env
cd /
sh /harness/cmd >&8 2>&8 </dev/null
st=$?
[ -n "$poll" ] && envd-serial-polling --drain /dev/ttyS1
echo "EXIT $st" >&9
[ -n "$poll" ] && envd-serial-polling --drain /dev/ttyS2
sync
poweroff -f
"#;

/// Prepares the test host: kernel, modules, busybox, QEMU (+libs, firmware) and the init script.
pub fn prepare(cache: &DebCache, opts: &TestHostOptions) -> Result<TestHost, TestHostError> {
    let qemu = find_qemu(opts.qemu.as_deref())?;
    let kernel = components::fetch_kernel(cache)?;
    let busybox = components::fetch_busybox(cache)?;
    let mut tree = Tree::new();
    components::base_layout(&mut tree)?;
    busybox.install(&mut tree)?;
    let roots: Vec<String> = TESTHOST_MODULES.iter().map(|s| s.to_string()).collect();
    let modules = kernel.install_modules(&mut tree, &roots)?;
    let list: String = modules.iter().map(|(_, p)| format!("{p}\n")).collect();
    tree.bytes("/harness/modules", 0o644, list)?;
    tree.bytes("/init", 0o755, INIT)?;
    tree.dir("/usr/local/bin", 0o755)?;

    let mut lib_dirs = Vec::new();
    add_executable(&mut tree, GUEST_QEMU, &qemu, &mut lib_dirs)?;
    // Firmware from QEMU's data dirs, relative to its binary (`<prefix>/bin/..`), as QEMU looks them up.
    let prefix = qemu
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().and_then(Path::parent).map(Path::to_path_buf));
    let prefix = prefix.unwrap_or_else(|| PathBuf::from("/usr"));
    for fw in QEMU_FIRMWARE {
        let host = prefix.join(fw);
        if host.exists() {
            tree.host_file(&format!("/usr/{fw}"), &host, Some(0o644))?;
        }
    }
    Ok(TestHost {
        kernel_release: kernel.release.clone(),
        kernel_version: kernel.version.clone(),
        vmlinuz: kernel.vmlinuz.clone(),
        tree,
        lib_dirs,
    })
}

/// Builds a standalone test host image into `out` (vmlinuz, initrd) whose command is an interactive-less
/// `uname -r` (the harness builds its own per run; this is for inspection).
pub fn build(
    cache: &DebCache,
    opts: &TestHostOptions,
    out: &Path,
) -> Result<TestHost, TestHostError> {
    let mut host = prepare(cache, opts)?;
    host.tree.bytes("/harness/cmd", 0o644, "uname -r\n")?;
    host.tree.bytes("/harness/env", 0o644, "")?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TestHostError::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    host.tree.write_cpio_file(&out.join("initrd"))?;
    std::fs::copy(&host.vmlinuz, out.join("vmlinuz")).map_err(io(out))?;
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
    }
}
