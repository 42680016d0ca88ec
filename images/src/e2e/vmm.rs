//! The VMMs the e2e checks run under. Each boots a template and says how to reach its envd; adding a VMM
//! (our own `host-agent` VMM, with its hybrid-vsock Unix socket) means adding one implementation here.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::template::Manifest;

/// A booted VM.
pub struct Vm {
    pub child: Child,
    /// The address `host-agent envd --connect` takes.
    pub address: String,
    pub console_log: PathBuf,
    pub started: Instant,
}

impl Vm {
    /// `Err` if the VMM process has already exited.
    pub fn alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(st)) => Err(format!("the VMM exited early ({st})")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Waits for the VMM to exit; kills it and errs at the deadline.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(format!("the VMM did not exit within {timeout:?} (killed)"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub struct Template<'a> {
    pub dir: &'a Path,
    pub manifest: &'a Manifest,
}

pub trait Vmm {
    fn name(&self) -> &'static str;
    /// Why this VMM cannot run here, if it cannot.
    fn unavailable(&self) -> Option<String>;
    fn boot(&self, template: &Template<'_>, work_dir: &Path) -> Result<Vm, String>;
}

/// QEMU with KVM, `-M pc` (virtio-pci) and vhost-vsock.
pub struct Qemu {
    pub binary: PathBuf,
    pub cid: u32,
    pub memory_mib: u32,
}

impl Qemu {
    pub fn args(&self, template: &Template<'_>, console: &Path) -> Vec<String> {
        let t = template.dir;
        let mut a: Vec<String> = [
            "-enable-kvm",
            "-M",
            "pc",
            "-cpu",
            "host",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(["-m".into(), self.memory_mib.to_string()]);
        a.extend([
            "-kernel".into(),
            t.join("vmlinuz").to_string_lossy().into_owned(),
        ]);
        a.extend([
            "-initrd".into(),
            t.join("initrd").to_string_lossy().into_owned(),
        ]);
        a.extend(["-append".into(), template.manifest.cmdline.clone()]);
        a.extend(["-serial".into(), format!("file:{}", console.display())]);
        a.extend([
            "-device".into(),
            format!("vhost-vsock-pci,guest-cid={}", self.cid),
        ]);
        a
    }
}

impl Vmm for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn unavailable(&self) -> Option<String> {
        if !self.binary.is_file() {
            return Some(format!("{} not found", self.binary.display()));
        }
        for dev in ["/dev/kvm", "/dev/vhost-vsock"] {
            if !Path::new(dev).exists() {
                return Some(format!("{dev} missing (load kvm and vhost_vsock)"));
            }
        }
        None
    }

    fn boot(&self, template: &Template<'_>, work_dir: &Path) -> Result<Vm, String> {
        let console = work_dir.join("qemu-console.log");
        let child = Command::new(&self.binary)
            .args(self.args(template, &console))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.binary.display()))?;
        Ok(Vm {
            child,
            address: format!("vsock:{}:{}", self.cid, template.manifest.envd_port),
            console_log: console,
            started: Instant::now(),
        })
    }
}
